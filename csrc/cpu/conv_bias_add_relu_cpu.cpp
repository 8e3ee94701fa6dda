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
#include "epilogue.h"

namespace resnet_fused {

namespace cpu {
bool use_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx2 = [] {
    const std::string cap = at::get_cpu_capability(); // "DEFAULT", "AVX2", ...
    return (cap == "AVX2" || cap == "AVX512") && __builtin_cpu_supports("avx2") &&
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

// Rows of the flattened (rows, k, inner) view for a tensor in `fmt`.
std::tuple<int64_t, int64_t, int64_t> rows_k_inner(
    const at::Tensor& t,
    at::MemoryFormat fmt) {
  const int64_t n = t.size(0), k = t.size(1), hw = t.size(2) * t.size(3);
  if (fmt == at::MemoryFormat::ChannelsLast) {
    return {n * hw, k, 1};
  }
  return {n, k, hw};
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
  check_conv_bias_add_relu_args(
      x, weight, bias, residual, scale, stride, padding, dilation, groups);
  at::Tensor y = conv2d_no_bias(x, weight, stride, padding, dilation, groups);
  if (y.numel() == 0 ||
      (!bias.has_value() && !residual.has_value() && !scale.has_value() &&
       !relu)) {
    return y;
  }
  const auto fmt = output_memory_format(x);
  const at::Tensor res =
      residual.has_value() ? residual->contiguous(fmt) : at::Tensor();
  const auto [rows, k, inner] = rows_k_inner(y, fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, y.scalar_type(), "conv_bias_add_relu_cpu", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const auto [s, b] =
            channel_affine<opmath_t>(scale, bias, k, x.options());
        const cpu::EpilogueArgs args{
            y.data_ptr(), res.defined() ? res.const_data_ptr() : nullptr,
            s.const_data_ptr(), b.const_data_ptr(), rows, k, inner, relu,
            y.scalar_type()};
        cpu::use_avx2() ? cpu::AVX2::epilogue_pass(args)
                        : cpu::DEFAULT::epilogue_pass(args);
      });
  return y;
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
    std::array<bool, 4> output_mask) {
  check_conv_bias_add_relu_backward_args(
      grad_out, out, x, weight, scale, stride, padding, dilation, groups, relu,
      output_mask);
  const auto [need_x, need_w, need_b, need_r] = output_mask;
  const auto fmt = output_memory_format(x);
  auto empty = [&]() { return at::empty({0}, x.options()); };

  // With relu=False the mask is the identity: use grad_out as it is.
  const bool need_g = relu && (need_x || need_w || need_r);
  at::Tensor grad = grad_out.contiguous(fmt);
  at::Tensor g = need_g ? at::empty_like(grad, fmt) : grad;
  at::Tensor grad_bias = need_b ? at::empty({out.size(1)}, x.options()) : empty();

  if (grad.numel() == 0) {
    if (need_b) {
      grad_bias.zero_();
    }
  } else if (need_g || need_b) {
    const at::Tensor o = relu ? out.contiguous(fmt) : at::Tensor();
    const auto [rows, k, inner] = rows_k_inner(grad, fmt);
    // Blocks depend only on the shape, never on the thread count, and stay
    // small enough for an accurate opmath sum: NCHW sums chunks of <= 64K
    // elements of one (n, c) plane, NHWC blocks of ~64K elements of rows.
    constexpr int64_t kBlockElems = int64_t{1} << 16;
    const int64_t rows_per_block =
        inner == 1 ? std::max<int64_t>(1, kBlockElems / k) : 1;
    const int64_t outer_blocks = (rows + rows_per_block - 1) / rows_per_block;
    const int64_t inner_blocks = (inner + kBlockElems - 1) / kBlockElems;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, grad.scalar_type(),
        "conv_bias_add_relu_backward_cpu", [&] {
          using opmath_t = at::opmath_type<scalar_t>;
          at::Tensor partials = need_b
              ? at::empty({outer_blocks, k, inner_blocks},
                          x.options().dtype(
                              c10::CppTypeToScalarType<opmath_t>::value))
              : at::Tensor();
          const cpu::BackwardArgs args{
              grad.const_data_ptr(), relu ? o.const_data_ptr() : nullptr,
              need_g ? g.data_ptr() : nullptr,
              need_b ? partials.data_ptr() : nullptr, rows, k, inner,
              rows_per_block, kBlockElems, relu, grad.scalar_type()};
          cpu::use_avx2() ? cpu::AVX2::backward_pass(args)
                          : cpu::DEFAULT::backward_pass(args);
          if (need_b) {
            // Second stage: combine the block partials in block order, in
            // double so that millions of blocks lose nothing.
            const opmath_t* p = partials.const_data_ptr<opmath_t>();
            scalar_t* gb = grad_bias.data_ptr<scalar_t>();
            std::vector<double> total(k, 0.0);
            for (int64_t o = 0; o < outer_blocks; ++o) {
              for (int64_t c = 0; c < k; ++c) {
                for (int64_t j = 0; j < inner_blocks; ++j) {
                  total[c] = reduce_combine(
                      total[c],
                      static_cast<double>(p[(o * k + c) * inner_blocks + j]));
                }
              }
            }
            for (int64_t c = 0; c < k; ++c) {
              gb[c] = scalar_t(total[c]);
            }
          }
        });
  }

  auto [grad_x, grad_weight] = conv2d_backward(
      g, x, weight, scale, stride, padding, dilation, groups, need_x, need_w);
  return {grad_x, grad_weight, grad_bias, need_r ? g : empty()};
}

} // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CPU, m) {
  m.impl("conv_bias_add_relu", &conv_bias_add_relu_cpu);
  m.impl("conv_bias_add_relu_backward", &conv_bias_add_relu_backward_cpu);
}

} // namespace resnet_fused
