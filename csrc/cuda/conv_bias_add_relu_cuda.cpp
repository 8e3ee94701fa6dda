// CUDA backend of resnet_fused::conv_bias_add_relu and its backward: the
// shared host flow (conv_bias_add_relu.h) with the kernels of cuda/kernels.cu,
// plus the opt-in cuDNN fused forward (cuda/cudnn_fused.cpp).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "conv_bias_add_relu.h"
#include "cuda/cudnn_fused.h"
#include "cuda/kernels.h"

namespace resnet_fused {

namespace {

// The dispatcher picks CUDA when any tensor is on a GPU; x must be.
void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(
      t.is_cuda(), name, ": expected a CUDA tensor for the cuda backend, got device ",
      t.device());
}

at::Tensor conv_bias_add_relu_cuda(
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& scale,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups,
    bool relu) {
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard device_guard(x.device());
  return run_conv_bias_add_relu(
      x, weight, bias, residual, scale, stride, padding, dilation, groups, relu,
      &cuda::launch_epilogue, &cuda::try_cudnn_fused);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
conv_bias_add_relu_backward_cuda(
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
    const c10::List<bool>& output_mask) {
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard device_guard(x.device());
  return run_conv_bias_add_relu_backward(
      grad_out, out, x, weight, scale, stride, padding, dilation, groups, relu,
      output_mask, &cuda::launch_backward);
}

} // namespace

// Only CUDA builds define this op: its absence means "built without CUDA
// kernels". It takes no tensor, so it is registered for every dispatch key.
TORCH_LIBRARY_FRAGMENT(resnet_fused, m) {
  m.def(
      "cuda_kernel_status(int device) -> str", &cuda::kernel_image_status);
}

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("conv_bias_add_relu", &conv_bias_add_relu_cuda);
  m.impl("conv_bias_add_relu_backward", &conv_bias_add_relu_backward_cuda);
}

} // namespace resnet_fused
