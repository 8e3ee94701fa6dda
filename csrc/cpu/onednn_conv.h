// The CPU forward in one oneDNN primitive: torch's own mkldnn conv ops with
// bias, residual-add and ReLU post-ops, reached through the dispatcher (no
// second oneDNN is linked).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace resnet_fused::cpu {

// y = act(conv2d(x, weight) * scale + bias + residual) from one oneDNN
// convolution with post-ops, or an undefined tensor when oneDNN cannot run
// it (dtype it does not support on this CPU, mkldnn disabled, a residual
// with a non-channels_last x, which torch's op would not fuse, a residual on
// an output over 4 MiB, where the post-op is slower than the pass, a conv
// ATen itself would not run on oneDNN, such as a small batch-1 one, an exact
// ReLU whose pass would also take the residual or scale more cheaply, or
// refused);
// the caller then takes the conv + epilogue pass. Arguments are checked and
// numel() > 0. x: (N, C, H, W); weight: (K, C/groups, R, S); bias, scale:
// (K,); residual: (N, K, P, Q). y: (N, K, P, Q) in x's memory format.
at::Tensor onednn_conv_bias_add_relu(
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& scale,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups,
    bool relu);

} // namespace resnet_fused::cpu
