// Declarations shared by the backends of resnet_fused::conv_bias_add_relu.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

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

// The backward op's checks: the forward's on x/weight/scale, plus grad_out
// (and out, when relu) against the output's shape, device and dtype.
void check_conv_bias_add_relu_backward_args(
    const at::Tensor& grad_out,
    const at::Tensor& out,
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& scale,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups,
    bool relu,
    std::array<bool, 4> output_mask);

// (N, K, P, Q) of conv2d(x, weight).
std::vector<int64_t> conv_output_shape(
    const at::Tensor& x,
    const at::Tensor& weight,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation);

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
