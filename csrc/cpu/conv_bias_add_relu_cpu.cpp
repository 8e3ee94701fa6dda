// CPU backend: ATen (oneDNN) convolution, then one fused vectorized pass.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <vector>

#include "conv_bias_add_relu.h"
#include "epilogue.h"

namespace resnet_fused {

namespace {

using at::vec::Vectorized;
using FVec = Vectorized<float>;

// Vectorized forms of the shared epilogue.h ReLU math, with the same compares.
template <typename V>
inline V relu_forward_vec(V v) {
  return V::blendv(v, V(0), v < V(0));
}
template <typename V>
inline V relu_backward_vec(V grad, V out) {
  return V::blendv(grad, V(0), out <= V(0));
}

// Loads/stores n = Vectorized<scalar_t>::size() elements as opmath vectors:
// one vector for float/double, two float vectors for bf16/fp16.
template <typename scalar_t>
struct VecIO {
  using opmath_t = at::opmath_type<scalar_t>;
  using OVec = Vectorized<opmath_t>;
  static constexpr int64_t kSize = Vectorized<scalar_t>::size();
  static constexpr bool kReduced = at::is_reduced_floating_point_v<scalar_t>;
  static constexpr int kParts = kReduced ? 2 : 1;

  static inline void load(const scalar_t* p, OVec (&v)[kParts]) {
    if constexpr (kReduced) {
      std::tie(v[0], v[1]) =
          at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p));
    } else {
      v[0] = OVec::loadu(p);
    }
  }
  static inline void store(scalar_t* p, const OVec (&v)[kParts]) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<scalar_t>(v[0], v[1]).store(p);
    } else {
      v[0].store(p);
    }
  }
};

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

// y[i] = act(y[i] * scale[c] + bias[c] + residual[i]), in place on the conv's
// own fresh output. `rows` x `k` x `inner`: NCHW is (N, K, HW), NHWC is (NHW, K, 1).
template <typename scalar_t, bool kResidual, bool kRelu>
void epilogue_kernel(
    scalar_t* y,
    const scalar_t* residual,
    const at::opmath_type<scalar_t>* scale,
    const at::opmath_type<scalar_t>* bias,
    int64_t rows,
    int64_t k,
    int64_t inner) {
  using IO = VecIO<scalar_t>;
  using opmath_t = typename IO::opmath_t;
  using OVec = typename IO::OVec;
  constexpr int64_t V = IO::kSize;
  constexpr int P = IO::kParts;
  constexpr int64_t W = OVec::size();

  auto scalar_at = [&](int64_t i, opmath_t s, opmath_t b) {
    const opmath_t r = kResidual ? opmath_t(residual[i]) : opmath_t(0);
    opmath_t v = epilogue(opmath_t(y[i]), s, b, r);
    y[i] = scalar_t(kRelu ? relu_forward(v) : v);
  };
  auto vec_at = [&](int64_t i, const OVec (&s)[P], const OVec (&b)[P]) {
    OVec v[P], r[P];
    IO::load(y + i, v);
    if constexpr (kResidual) {
      IO::load(residual + i, r);
    }
    for (int p = 0; p < P; ++p) {
      v[p] = epilogue(v[p], s[p], b[p], kResidual ? r[p] : OVec(0));
      if constexpr (kRelu) {
        v[p] = relu_forward_vec(v[p]);
      }
    }
    IO::store(y + i, v);
  };

  if (inner == 1) {
    // Channels innermost: vectors of scale/bias along K.
    at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / k), [&](int64_t r0, int64_t r1) {
      for (int64_t row = r0; row < r1; ++row) {
        const int64_t base = row * k;
        int64_t c = 0;
        for (; c + V <= k; c += V) {
          OVec s[P], b[P];
          for (int p = 0; p < P; ++p) {
            s[p] = OVec::loadu(scale + c + p * W);
            b[p] = OVec::loadu(bias + c + p * W);
          }
          vec_at(base + c, s, b);
        }
        for (; c < k; ++c) {
          scalar_at(base + c, scale[c], bias[c]);
        }
      }
    });
  } else {
    // One (n, c) plane per task: scale/bias are scalars along the plane.
    at::parallel_for(0, rows * k, std::max<int64_t>(1, 32768 / inner), [&](int64_t p0, int64_t p1) {
      for (int64_t plane = p0; plane < p1; ++plane) {
        const int64_t c = plane % k;
        const int64_t base = plane * inner;
        OVec s[P], b[P];
        for (int p = 0; p < P; ++p) {
          s[p] = OVec(scale[c]);
          b[p] = OVec(bias[c]);
        }
        int64_t i = 0;
        for (; i + V <= inner; i += V) {
          vec_at(base + i, s, b);
        }
        for (; i < inner; ++i) {
          scalar_at(base + i, scale[c], bias[c]);
        }
      }
    });
  }
}

// One pass over grad_out and out: g = relu_backward(grad, out) (stored if
// g_out) and per-block, per-channel partial sums of g. Blocks depend only on
// the shape and are combined in block order by the caller, so grad_bias does
// not depend on the thread count.
template <typename scalar_t, bool kRelu>
void backward_kernel(
    const scalar_t* grad,
    const scalar_t* out,
    scalar_t* g_out,
    at::opmath_type<scalar_t>* bias_partials, // (num_blocks, k) or null
    int64_t rows,
    int64_t k,
    int64_t inner,
    int64_t rows_per_block) {
  using IO = VecIO<scalar_t>;
  using opmath_t = typename IO::opmath_t;
  using OVec = typename IO::OVec;
  constexpr int64_t V = IO::kSize;
  constexpr int P = IO::kParts;
  constexpr int64_t W = OVec::size();

  auto masked = [&](int64_t i, OVec (&g)[P]) {
    IO::load(grad + i, g);
    if constexpr (kRelu) {
      OVec o[P];
      IO::load(out + i, o);
      for (int p = 0; p < P; ++p) {
        g[p] = relu_backward_vec(g[p], o[p]);
      }
    }
    if (g_out != nullptr) {
      IO::store(g_out + i, g);
    }
  };
  auto masked_scalar = [&](int64_t i) {
    opmath_t g = opmath_t(grad[i]);
    if constexpr (kRelu) {
      g = relu_backward(g, opmath_t(out[i]));
    }
    if (g_out != nullptr) {
      g_out[i] = scalar_t(g);
    }
    return g;
  };

  if (inner != 1) {
    // NCHW: one (n, c) plane per block; its sum goes to bias_partials[n, c].
    at::parallel_for(0, rows * k, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t plane = p0; plane < p1; ++plane) {
        const int64_t base = plane * inner;
        OVec acc(0);
        int64_t i = 0;
        for (; i + V <= inner; i += V) {
          OVec g[P];
          masked(base + i, g);
          for (int p = 0; p < P; ++p) {
            acc = acc + g[p];
          }
        }
        opmath_t tail = 0;
        for (; i < inner; ++i) {
          tail = reduce_combine(tail, masked_scalar(base + i));
        }
        if (bias_partials) {
          bias_partials[plane] = reduce_combine(
              at::vec::vec_reduce_all<opmath_t>(
                  [](OVec a, OVec b) { return a + b; }, acc),
              tail);
        }
      }
    });
    return;
  }
  // NHWC: fixed blocks of rows; each block sums its rows into its own row of
  // bias_partials.
  const int64_t num_blocks = (rows + rows_per_block - 1) / rows_per_block;
  at::parallel_for(0, num_blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      opmath_t* sums = bias_partials ? bias_partials + blk * k : nullptr;
      if (sums) {
        std::fill(sums, sums + k, opmath_t(0));
      }
      const int64_t r_end = std::min(rows, (blk + 1) * rows_per_block);
      for (int64_t row = blk * rows_per_block; row < r_end; ++row) {
        const int64_t base = row * k;
        int64_t c = 0;
        for (; c + V <= k; c += V) {
          OVec g[P];
          masked(base + c, g);
          if (sums) {
            for (int p = 0; p < P; ++p) {
              (OVec::loadu(sums + c + p * W) + g[p]).store(sums + c + p * W);
            }
          }
        }
        for (; c < k; ++c) {
          const opmath_t g = masked_scalar(base + c);
          if (sums) {
            sums[c] = reduce_combine(sums[c], g);
          }
        }
      }
    }
  });
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
        auto run = [&](auto has_res, auto has_relu) {
          epilogue_kernel<scalar_t, decltype(has_res)::value,
                          decltype(has_relu)::value>(
              y.data_ptr<scalar_t>(),
              res.defined() ? res.const_data_ptr<scalar_t>() : nullptr,
              s.const_data_ptr<opmath_t>(), b.const_data_ptr<opmath_t>(),
              rows, k, inner);
        };
        using T = std::true_type;
        using F = std::false_type;
        if (res.defined()) {
          relu ? run(T{}, T{}) : run(T{}, F{});
        } else {
          relu ? run(F{}, T{}) : run(F{}, F{});
        }
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
  check_conv_bias_add_relu_args(
      x, weight, std::nullopt, std::nullopt, scale, stride, padding, dilation,
      groups);
  TORCH_CHECK_VALUE(
      grad_out.sizes() == out.sizes(), "grad_out: expected the output's shape ",
      out.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK_VALUE(
      relu || !output_mask[3],
      "output_mask: grad_residual is grad_out itself when relu=False; "
      "expected output_mask[3]=false, got true");
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
    // Blocks depend only on the shape, never on the thread count: NCHW sums
    // per (n, c) plane, NHWC per block of ~64K elements of rows.
    const int64_t rows_per_block =
        inner == 1 ? std::max<int64_t>(1, (int64_t{1} << 16) / k) : 1;
    const int64_t num_blocks = (rows + rows_per_block - 1) / rows_per_block;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kBFloat16, at::kHalf, grad.scalar_type(),
        "conv_bias_add_relu_backward_cpu", [&] {
          using opmath_t = at::opmath_type<scalar_t>;
          at::Tensor partials = need_b
              ? at::empty({num_blocks, k},
                          x.options().dtype(
                              c10::CppTypeToScalarType<opmath_t>::value))
              : at::Tensor();
          opmath_t* partials_ptr =
              need_b ? partials.data_ptr<opmath_t>() : nullptr;
          scalar_t* g_ptr = need_g ? g.data_ptr<scalar_t>() : nullptr;
          if (relu) {
            backward_kernel<scalar_t, true>(
                grad.const_data_ptr<scalar_t>(), o.const_data_ptr<scalar_t>(),
                g_ptr, partials_ptr, rows, k, inner, rows_per_block);
          } else {
            backward_kernel<scalar_t, false>(
                grad.const_data_ptr<scalar_t>(), nullptr, g_ptr, partials_ptr,
                rows, k, inner, rows_per_block);
          }
          if (need_b) {
            // Second stage: combine the block partials in block order.
            const opmath_t* p = partials.const_data_ptr<opmath_t>();
            scalar_t* gb = grad_bias.data_ptr<scalar_t>();
            std::vector<opmath_t> total(p, p + k);
            for (int64_t blk = 1; blk < num_blocks; ++blk) {
              for (int64_t c = 0; c < k; ++c) {
                total[c] = reduce_combine(total[c], p[blk * k + c]);
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
