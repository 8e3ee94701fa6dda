// Entry points of the CPU passes, one set per CPU capability; the caller
// picks one at run time (see conv_bias_add_relu_cpu.cpp).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace resnet_fused::cpu {

// y = act(y * scale + bias + residual) in place. The tensor is viewed as
// (rows, k, inner): NCHW is (N, K, H*W), NHWC is (N*H*W, K, 1). scale and
// bias are opmath (float, or double for double) arrays of length k.
struct EpilogueArgs {
  void* y;
  const void* residual; // null: no residual
  const void* scale;
  const void* bias;
  int64_t rows, k, inner;
  bool relu;
  c10::ScalarType dtype;
};

// g = relu_backward(grad, out) (stored when g is not null) and opmath partial
// sums of g into bias_partials (when not null): (rows / rows_per_block, k, 1)
// for NHWC, (rows, k, inner / inner_per_block) for NCHW (ceil divisions).
struct BackwardArgs {
  const void* grad;
  const void* out; // read only when relu
  void* g;
  void* bias_partials;
  int64_t rows, k, inner, rows_per_block, inner_per_block;
  bool relu;
  c10::ScalarType dtype;
};

namespace DEFAULT {
void epilogue_pass(const EpilogueArgs& args);
void backward_pass(const BackwardArgs& args);
} // namespace DEFAULT

namespace AVX2 {
void epilogue_pass(const EpilogueArgs& args);
void backward_pass(const BackwardArgs& args);
} // namespace AVX2

// True when kernels_vec_avx2.cpp was compiled with AVX2 (setup.py's per-file
// flags on x86-64).
bool avx2_built();

// True when this build has the AVX2 passes and ATen's CPU capability (which
// honours ATEN_CPU_CAPABILITY) allows them.
bool use_avx2();

} // namespace resnet_fused::cpu
