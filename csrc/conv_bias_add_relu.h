// Declarations shared by the backends of resnet_fused::conv_bias_add_relu.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace resnet_fused {

// Argument checks shared by every dispatch key; each message names the
// argument, the expected value and the actual one.
void check_conv_bias_add_relu_args(
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& scale,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups);

// y follows x's memory format, as nn.Conv2d's output does.
at::MemoryFormat output_memory_format(const at::Tensor& x);

// The bare convolution (no bias), laid out in output_memory_format(x).
at::Tensor conv2d_no_bias(
    const at::Tensor& x,
    const at::Tensor& weight,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups);

// grad_x and grad_weight of conv(x, weight) * scale from the masked gradient g,
// computing only what output_mask asks for. The per-channel scale is folded
// into the weight for grad_x and applied to grad_weight, so no scaled copy of
// g is ever made. Unrequested results are empty tensors.
std::tuple<at::Tensor, at::Tensor> conv2d_backward(
    const at::Tensor& g,
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& scale,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups,
    bool need_grad_x,
    bool need_grad_weight);

} // namespace resnet_fused
