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
    const c10::List<bool>& output_mask);

// (N, K, P, Q) of conv2d(x, weight).
std::vector<int64_t> conv_output_shape(
    const at::Tensor& x,
    const at::Tensor& weight,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation);

// y follows x's memory format, as nn.Conv2d's output does.
at::MemoryFormat output_memory_format(const at::Tensor& x);

// t as a view with the strides of its memory format where it is dense in one
// (no copy): what every ATen or oneDNN conv here is given. A size-1 dim's
// stride addresses nothing, yet ATen's CPU convs can misread or refuse an odd
// one (wrong outputs and gradients).
at::Tensor canonical_strides(const at::Tensor& t);

// Whether every element of a CPU tensor is finite, from one read and no
// temporaries but fp16's float copy (at::isfinite(t).all() makes several
// passes and t-sized temporaries: 30x slower on a 1M-element weight): a NaN
// or +-inf element makes the sum non-finite. A finite t whose sum overflows
// reads as not finite; callers only take their safe route for it.
bool finite_by_sum(const at::Tensor& t);

// ATen's convolution (with bias if given), laid out in output_memory_format(x).
at::Tensor aten_conv(
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups);

// grad_x and grad_weight of conv(x, weight) * scale from the masked gradient g,
// computing only what need_grad_x / need_grad_weight ask for (the others are
// empty tensors). The per-channel scale goes on the smaller of g and weight:
// in place on g when g_is_scratch (the caller's own buffer, not returned),
// else on a temporary copy.
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
    bool need_grad_weight,
    bool g_is_scratch);

// (rows, k, inner) of a 4-D tensor contiguous in fmt: NCHW is (N, K, H*W),
// channels-last (N*H*W, K, 1). The CPU and CUDA passes index by this view.
std::tuple<int64_t, int64_t, int64_t> rows_k_inner(
    const at::Tensor& t,
    at::MemoryFormat fmt);

// A backend's in-place epilogue over y (the conv's fresh output, contiguous
// in fmt, numel > 0): y = act(y * scale + bias + residual). residual is
// undefined when absent, else contiguous in fmt.
using EpiloguePass = void (*)(
    const at::Tensor& y,
    const at::Tensor& residual,
    const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& bias,
    bool relu,
    at::MemoryFormat fmt);

// A backend's elementwise backward over grad (and out, read only when relu),
// both contiguous in fmt with numel > 0: writes g = relu_backward(grad, out)
// when g is defined, and grad_bias[c] = sum of g over (n, h, w), in an order
// that depends only on the shape, when grad_bias is defined.
using BackwardPass = void (*)(
    const at::Tensor& grad,
    const at::Tensor& out,
    const at::Tensor& g,
    const at::Tensor& grad_bias,
    bool relu,
    at::MemoryFormat fmt);

// A backend's one-primitive forward (oneDNN or cuDNN post-ops), given
// checked arguments and an output with numel() > 0: returns y, or an
// undefined tensor to decline (then the conv + epilogue pass runs).
using FusedForward = at::Tensor (*)(
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

// The forward every backend shares: checks, the backend's fused forward if it
// has one and takes the call, else ATen's conv and the backend's epilogue pass
// (skipped when there is nothing to apply). With bias_in_conv and no scale,
// the bias rides in ATen's conv, summed before its rounding as in F.conv2d
// (where ATen's conv adds it for free: CPU; cuDNN's would add a pass).
// x: (N, C, H, W); weight: (K, C/groups, R, S); bias, scale: (K,);
// residual: (N, K, P, Q). Returns y: (N, K, P, Q) in x's memory format.
at::Tensor run_conv_bias_add_relu(
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& scale,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups,
    bool relu,
    EpiloguePass epilogue_pass,
    FusedForward fused_forward = nullptr,
    bool bias_in_conv = false);

// The body of a backend's _epilogue_ kernel (CPU has one): checks (y:
// (N, K, P, Q), dense in NCHW or channels_last; bias, scale: (K,); residual:
// y's shape), then the backend's pass in place on y:
// y = act(y * scale + bias + residual).
void run_epilogue_(
    const at::Tensor& y,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& scale,
    bool relu,
    EpiloguePass epilogue_pass);

// The backward every backend shares: checks, the masked gradient g and
// grad_bias from the backend's pass, then conv2d_backward. Returns
// (grad_x, grad_weight, grad_bias, grad_residual); unrequested ones are empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
run_conv_bias_add_relu_backward(
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
    const c10::List<bool>& output_mask,
    BackwardPass backward_pass);

} // namespace resnet_fused
