// Host entry points of the CUDA kernels (cuda/kernels.cu).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "conv_bias_add_relu.h"

namespace resnet_fused::cuda {

// The forward's EpiloguePass, on the current stream of y's device.
void launch_epilogue(
    const at::Tensor& y,
    const at::Tensor& residual,
    const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& bias,
    bool relu,
    at::MemoryFormat fmt);

// The backward's BackwardPass: stage 1 writes g and per-block partial sums,
// stage 2 adds the partials in a fixed order into grad_bias.
void launch_backward(
    const at::Tensor& grad,
    const at::Tensor& out,
    const at::Tensor& g,
    const at::Tensor& grad_bias,
    bool relu,
    at::MemoryFormat fmt);

// "" when the kernels have an image (SASS, or PTX the driver can JIT) for
// CUDA device `device`, else why not: the device's capability and the archs
// this extension was built for.
std::string kernel_image_status(int64_t device);

} // namespace resnet_fused::cuda
