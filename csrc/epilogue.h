// Per-element math of the fused residual epilogue, shared by the CPU and CUDA
// kernels so the CPU tests exercise the expressions the GPU runs. Both builds
// turn FMA contraction off (-ffp-contract=off, --fmad=false), so acc * scale
// is rounded before the bias is added, as the unfused ops do.
#pragma once

#include <c10/macros/Macros.h>

namespace resnet_fused {

// v = acc * scale + bias + residual, in the accumulation type.
template <typename T>
C10_HOST_DEVICE inline T epilogue(T acc, T scale, T bias, T residual) {
  return acc * scale + bias + residual;
}

// ReLU that lets NaN through, as torch.relu does (NaN < 0 is false).
template <typename T>
C10_HOST_DEVICE inline T relu_forward(T v) {
  return v < T(0) ? T(0) : v;
}

// Gradient through ReLU from its saved output, as threshold_backward does:
// zero where out <= 0, so a NaN output passes its gradient on.
template <typename T>
C10_HOST_DEVICE inline T relu_backward(T grad, T out) {
  return out <= T(0) ? T(0) : grad;
}

// Deterministic combine step of the bias-gradient reduction: partial sums are
// always added in block order, never by atomics.
template <typename T>
C10_HOST_DEVICE inline T reduce_combine(T a, T b) {
  return a + b;
}

} // namespace resnet_fused
