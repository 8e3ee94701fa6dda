// cuDNN's fused conv + bias + add + ReLU graph: an opt-in forward path.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace resnet_fused::cuda {

// Environment variable that opts in: RESNET_FUSED_CUDNN_FUSED=1.
inline constexpr const char* kCudnnFusedEnv = "RESNET_FUSED_CUDNN_FUSED";

// relu(conv(x, weight * scale) + bias + residual) through cuDNN's fused graph
// when opted in and cuDNN can run the case, else an undefined tensor (use
// conv + epilogue). A FusedForward: checked arguments, a non-empty output.
at::Tensor try_cudnn_fused(
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

} // namespace resnet_fused::cuda
