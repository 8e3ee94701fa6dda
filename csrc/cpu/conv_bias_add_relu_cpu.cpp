// CPU backend: ATen (oneDNN) convolution, then one fused vectorized pass
// (cpu/kernels_impl.h), run with the best at::vec build the CPU allows.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <vector>

#include "conv_bias_add_relu.h"
#include "cpu/kernels.h"
#include "cpu/onednn_conv.h"
#include "epilogue.h"

namespace resnet_fused {

namespace cpu {
bool use_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx2 = [] {
    const std::string cap = at::get_cpu_capability(); // "DEFAULT", "AVX2", ...
    return avx2_built() && (cap == "AVX2" || cap == "AVX512") && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return avx2;
#else
  return false;
#endif
}
} // namespace cpu

namespace {

// Per-channel scale and bias as opmath arrays (1 and 0 when absent).
template <typename opmath_t>
std::pair<at::Tensor, at::Tensor> channel_affine(
    const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& bias,
    int64_t k,
    const at::TensorOptions& options) {
  const auto opts = options.dtype(c10::CppTypeToScalarType<opmath_t>::value);
  at::Tensor s = scale.has_value() ? scale->to(opts).contiguous()
                                   : at::ones({k}, opts);
  at::Tensor b =
      bias.has_value() ? bias->to(opts).contiguous() : at::zeros({k}, opts);
  return {s, b};
}

void epilogue_pass(
    const at::Tensor& y,
    const at::Tensor& residual,
    const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& bias,
    bool relu,
    at::MemoryFormat fmt) {
  const auto [rows, k, inner] = rows_k_inner(y, fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, y.scalar_type(), "conv_bias_add_relu_cpu", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const auto [s, b] =
            channel_affine<opmath_t>(scale, bias, k, y.options());
        const cpu::EpilogueArgs args{
            y.data_ptr(),
            residual.defined() ? residual.const_data_ptr() : nullptr,
            s.const_data_ptr(), b.const_data_ptr(), rows, k, inner, relu,
            y.scalar_type()};
        cpu::use_avx2() ? cpu::AVX2::epilogue_pass(args)
                        : cpu::DEFAULT::epilogue_pass(args);
      });
}

void backward_pass(
    const at::Tensor& grad,
    const at::Tensor& out,
    const at::Tensor& g,
    const at::Tensor& grad_bias,
    bool relu,
    at::MemoryFormat fmt) {
  const auto [rows, k, inner] = rows_k_inner(grad, fmt);
  // Blocks depend only on the shape, never on the thread count, and stay
  // small enough for an accurate opmath sum: NCHW sums chunks of <= 64K
  // elements of one (n, c) plane, NHWC blocks of ~64K elements of rows.
  constexpr int64_t kBlockElems = int64_t{1} << 16;
  const int64_t rows_per_block =
      inner == 1 ? std::max<int64_t>(1, kBlockElems / k) : 1;
  const int64_t outer_blocks = (rows + rows_per_block - 1) / rows_per_block;
  const int64_t inner_blocks = (inner + kBlockElems - 1) / kBlockElems;
  const bool need_b = grad_bias.defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, grad.scalar_type(),
      "conv_bias_add_relu_backward_cpu", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        at::Tensor partials = need_b
            ? at::empty({outer_blocks, k, inner_blocks},
                        grad.options().dtype(
                            c10::CppTypeToScalarType<opmath_t>::value))
            : at::Tensor();
        const cpu::BackwardArgs args{
            grad.const_data_ptr(), relu ? out.const_data_ptr() : nullptr,
            g.defined() ? g.data_ptr() : nullptr,
            need_b ? partials.data_ptr() : nullptr, rows, k, inner,
            rows_per_block, kBlockElems, relu, grad.scalar_type()};
        cpu::use_avx2() ? cpu::AVX2::backward_pass(args)
                        : cpu::DEFAULT::backward_pass(args);
        if (need_b) {
          // Second stage: combine the block partials in block order, in
          // double so that millions of blocks lose nothing. Threads take
          // ranges of channels; each channel's order stays the same.
          const opmath_t* p = partials.const_data_ptr<opmath_t>();
          scalar_t* gb = grad_bias.data_ptr<scalar_t>();
          const int64_t per_channel = outer_blocks * inner_blocks;
          at::parallel_for(
              0, k, std::max<int64_t>(1, (int64_t{1} << 14) / per_channel),
              [&](int64_t c0, int64_t c1) {
                std::vector<double> total(c1 - c0, 0.0);
                for (int64_t o = 0; o < outer_blocks; ++o) {
                  for (int64_t c = c0; c < c1; ++c) {
                    for (int64_t j = 0; j < inner_blocks; ++j) {
                      total[c - c0] = reduce_combine(
                          total[c - c0],
                          static_cast<double>(
                              p[(o * k + c) * inner_blocks + j]));
                    }
                  }
                }
                for (int64_t c = c0; c < c1; ++c) {
                  gb[c] = scalar_t(total[c - c0]);
                }
              });
        }
      });
}

at::Tensor conv_bias_add_relu_cpu(
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
  // One oneDNN primitive with post-ops where it takes the call (see
  // onednn_conv.h for when it declines), else conv + pass.
  return run_conv_bias_add_relu(
      x, weight, bias, residual, scale, stride, padding, dilation, groups, relu,
      &epilogue_pass, &cpu::onednn_conv_bias_add_relu,
      /*bias_in_conv=*/true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
conv_bias_add_relu_backward_cpu(
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
  return run_conv_bias_add_relu_backward(
      grad_out, out, x, weight, scale, stride, padding, dilation, groups, relu,
      output_mask, &backward_pass);
}

void epilogue_cpu_(
    const at::Tensor& y,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& scale,
    bool relu) {
  run_epilogue_(y, bias, residual, scale, relu, &epilogue_pass);
}

} // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("conv_bias_add_relu", &conv_bias_add_relu_cpu);
  m.impl("_epilogue_", &epilogue_cpu_);
  m.impl("conv_bias_add_relu_backward", &conv_bias_add_relu_backward_cpu);
}

} // namespace resnet_fused
