// The CPU passes, written once with at::vec and compiled once per CPU
// capability (kernels_default.cpp, kernels_vec_avx2.cpp): ATen's CPU_CAPABILITY
// macro selects the at::vec implementation, as in ATen's own kernels.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <tuple>

#include "cpu/kernels.h"
#include "epilogue.h"

namespace resnet_fused::cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// Elements per task of the elementwise passes: large enough to amortise a
// task, small enough to split a late layer's output between threads.
constexpr int64_t kElementwiseGrain = 32768;

// Vectorized forms of the shared epilogue.h ReLU math, with the same compares
// (clamp_min is `a < 0 ? 0 : a` per lane, so NaN passes as in relu_forward).
template <typename V>
inline V relu_forward_vec(V v) {
  return at::vec::clamp_min(v, V(0));
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

// The per-element work of the epilogue pass, with its pointers and sizes.
// Each task copies this struct into a local, so that they stay in registers:
// read through a captured reference they would be reloaded after every vector
// store (intrinsic stores may alias anything), as profiles showed.
template <typename scalar_t, bool kResidual, bool kRelu>
struct EpilogueOps {
  using IO = VecIO<scalar_t>;
  using opmath_t = typename IO::opmath_t;
  using OVec = typename IO::OVec;
  static constexpr int P = IO::kParts;

  scalar_t* y;
  const scalar_t* residual;
  const opmath_t* scale;
  const opmath_t* bias;
  int64_t k, inner;

  inline void scalar_at(int64_t i, opmath_t s, opmath_t b) const {
    const opmath_t r = kResidual ? opmath_t(residual[i]) : opmath_t(0);
    opmath_t v = epilogue(opmath_t(y[i]), s, b, r);
    y[i] = scalar_t(kRelu ? relu_forward(v) : v);
  }
  inline void vec_at(int64_t i, const OVec (&s)[P], const OVec (&b)[P]) const {
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
  }
};

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
  using Ops = EpilogueOps<scalar_t, kResidual, kRelu>;
  using OVec = typename Ops::OVec;
  constexpr int64_t V = Ops::IO::kSize;
  constexpr int P = Ops::P;
  constexpr int64_t W = OVec::size();
  const Ops ops{y, residual, scale, bias, k, inner};

  if (inner == 1) {
    // Channels innermost: vectors of scale/bias along K.
    at::parallel_for(0, rows, std::max<int64_t>(1, kElementwiseGrain / k), [&](int64_t r0, int64_t r1) {
      const Ops op = ops;
      for (int64_t row = r0; row < r1; ++row) {
        const int64_t base = row * op.k;
        int64_t c = 0;
        for (; c + V <= op.k; c += V) {
          OVec s[P], b[P];
          for (int p = 0; p < P; ++p) {
            s[p] = OVec::loadu(op.scale + c + p * W);
            b[p] = OVec::loadu(op.bias + c + p * W);
          }
          op.vec_at(base + c, s, b);
        }
        for (; c < op.k; ++c) {
          op.scalar_at(base + c, op.scale[c], op.bias[c]);
        }
      }
    });
  } else {
    // One (n, c) plane per task: scale/bias are scalars along the plane.
    at::parallel_for(0, rows * k, std::max<int64_t>(1, kElementwiseGrain / inner), [&](int64_t p0, int64_t p1) {
      const Ops op = ops;
      for (int64_t plane = p0; plane < p1; ++plane) {
        const int64_t c = plane % op.k;
        const int64_t base = plane * op.inner;
        OVec s[P], b[P];
        for (int p = 0; p < P; ++p) {
          s[p] = OVec(op.scale[c]);
          b[p] = OVec(op.bias[c]);
        }
        int64_t i = 0;
        for (; i + V <= op.inner; i += V) {
          op.vec_at(base + i, s, b);
        }
        for (; i < op.inner; ++i) {
          op.scalar_at(base + i, op.scale[c], op.bias[c]);
        }
      }
    });
  }
}

// The per-element work of the backward pass, with its pointers and sizes
// (see EpilogueOps for why each task copies it): g = relu_backward(grad, out),
// stored when g_out is set, and the partial sums' layout (see BackwardArgs).
template <typename scalar_t, bool kRelu>
struct BackwardOps {
  using IO = VecIO<scalar_t>;
  using opmath_t = typename IO::opmath_t;
  using OVec = typename IO::OVec;
  static constexpr int P = IO::kParts;

  const scalar_t* grad;
  const scalar_t* out;
  scalar_t* g_out;
  opmath_t* bias_partials;
  int64_t rows, k, inner, rows_per_block, inner_per_block;

  inline void masked(int64_t i, OVec (&g)[P]) const {
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
  }
  inline opmath_t masked_scalar(int64_t i) const {
    opmath_t g = opmath_t(grad[i]);
    if constexpr (kRelu) {
      g = relu_backward(g, opmath_t(out[i]));
    }
    if (g_out != nullptr) {
      g_out[i] = scalar_t(g);
    }
    return g;
  }
};

// One pass over grad_out and out: g = relu_backward(grad, out) (stored if
// g_out) and per-block, per-channel partial sums of g. Blocks depend only on
// the shape and are combined in block order by the caller, so grad_bias does
// not depend on the thread count.
template <typename scalar_t, bool kRelu>
void backward_kernel(
    const scalar_t* grad,
    const scalar_t* out,
    scalar_t* g_out,
    at::opmath_type<scalar_t>* bias_partials, // see BackwardArgs, or null
    int64_t rows,
    int64_t k,
    int64_t inner,
    int64_t rows_per_block,
    int64_t inner_per_block) {
  using Ops = BackwardOps<scalar_t, kRelu>;
  using opmath_t = typename Ops::opmath_t;
  using OVec = typename Ops::OVec;
  constexpr int64_t V = Ops::IO::kSize;
  constexpr int P = Ops::P;
  constexpr int64_t W = OVec::size();
  const Ops ops{grad, out, g_out, bias_partials, rows, k, inner, rows_per_block, inner_per_block};

  if (inner != 1) {
    // NCHW: blocks are chunks of inner_per_block elements of one (n, c)
    // plane; the sum of chunk j of plane (n, c) goes to bias_partials[n, c, j].
    const int64_t chunks = (inner + inner_per_block - 1) / inner_per_block;
    at::parallel_for(0, rows * k * chunks, 1, [&](int64_t t0, int64_t t1) {
      const Ops op = ops;
      const int64_t n_chunks = chunks;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t i0 = (t % n_chunks) * op.inner_per_block;
        const int64_t i1 = std::min(op.inner, i0 + op.inner_per_block);
        const int64_t base = (t / n_chunks) * op.inner;
        OVec acc(0);
        int64_t i = i0;
        for (; i + V <= i1; i += V) {
          OVec g[P];
          op.masked(base + i, g);
          for (int p = 0; p < P; ++p) {
            acc = acc + g[p];
          }
        }
        opmath_t tail = 0;
        for (; i < i1; ++i) {
          tail = reduce_combine(tail, op.masked_scalar(base + i));
        }
        if (op.bias_partials) {
          op.bias_partials[t] = reduce_combine(
              at::vec::vec_reduce_all<opmath_t>(
                  [](OVec a, OVec b) { return a + b; }, acc),
              tail);
        }
      }
    });
    return;
  }
  if (bias_partials == nullptr) {
    // NHWC, the mask alone: elementwise, so the flat tensor splits into even
    // chunks of whole vectors, however few its rows. The scalar tail is the
    // last elements whatever the thread count: a scalar and a vector store
    // may write a reduced-precision NaN with different bits.
    const int64_t n = rows * k;
    const int64_t vectors = n / V;
    at::parallel_for(0, vectors, std::max<int64_t>(1, kElementwiseGrain / V), [&](int64_t v0, int64_t v1) {
      const Ops op = ops;
      for (int64_t i = v0 * V; i < v1 * V; i += V) {
        OVec g[P];
        op.masked(i, g);
      }
    });
    for (int64_t i = vectors * V; i < n; ++i) {
      ops.masked_scalar(i);
    }
    return;
  }
  // NHWC with grad_bias: fixed blocks of rows; each block sums its rows into
  // its own row of bias_partials.
  const int64_t num_blocks = (rows + rows_per_block - 1) / rows_per_block;
  at::parallel_for(0, num_blocks, 1, [&](int64_t b0, int64_t b1) {
    const Ops op = ops;
    for (int64_t blk = b0; blk < b1; ++blk) {
      opmath_t* sums = op.bias_partials + blk * op.k;
      std::fill(sums, sums + op.k, opmath_t(0));
      const int64_t r_end = std::min(op.rows, (blk + 1) * op.rows_per_block);
      for (int64_t row = blk * op.rows_per_block; row < r_end; ++row) {
        const int64_t base = row * op.k;
        int64_t c = 0;
        for (; c + V <= op.k; c += V) {
          OVec g[P];
          op.masked(base + c, g);
          for (int p = 0; p < P; ++p) {
            (OVec::loadu(sums + c + p * W) + g[p]).store(sums + c + p * W);
          }
        }
        for (; c < op.k; ++c) {
          sums[c] = reduce_combine(sums[c], op.masked_scalar(base + c));
        }
      }
    }
  });
}

template <typename scalar_t>
void run_epilogue(const EpilogueArgs& a) {
  using opmath_t = at::opmath_type<scalar_t>;
  auto run = [&](auto has_res, auto has_relu) {
    epilogue_kernel<scalar_t, decltype(has_res)::value, decltype(has_relu)::value>(
        static_cast<scalar_t*>(a.y), static_cast<const scalar_t*>(a.residual),
        static_cast<const opmath_t*>(a.scale), static_cast<const opmath_t*>(a.bias),
        a.rows, a.k, a.inner);
  };
  using T = std::true_type;
  using F = std::false_type;
  if (a.residual != nullptr) {
    a.relu ? run(T{}, T{}) : run(T{}, F{});
  } else {
    a.relu ? run(F{}, T{}) : run(F{}, F{});
  }
}

template <typename scalar_t>
void run_backward(const BackwardArgs& a) {
  using opmath_t = at::opmath_type<scalar_t>;
  auto* partials = static_cast<opmath_t*>(a.bias_partials);
  auto* g = static_cast<scalar_t*>(a.g);
  const auto* grad = static_cast<const scalar_t*>(a.grad);
  if (a.relu) {
    backward_kernel<scalar_t, true>(
        grad, static_cast<const scalar_t*>(a.out), g, partials, a.rows, a.k, a.inner, a.rows_per_block,
        a.inner_per_block);
  } else {
    backward_kernel<scalar_t, false>(
        grad, nullptr, g, partials, a.rows, a.k, a.inner, a.rows_per_block, a.inner_per_block);
  }
}

#define RESNET_FUSED_DTYPE_SWITCH(dtype, fn, arg)                          \
  switch (dtype) {                                                          \
    case c10::ScalarType::Float: return fn<float>(arg);                    \
    case c10::ScalarType::Double: return fn<double>(arg);                  \
    case c10::ScalarType::BFloat16: return fn<c10::BFloat16>(arg);         \
    case c10::ScalarType::Half: return fn<c10::Half>(arg);                 \
    default: TORCH_CHECK(false, "resnet_fused: unsupported dtype ", dtype); \
  }

void epilogue_pass(const EpilogueArgs& args) {
  RESNET_FUSED_DTYPE_SWITCH(args.dtype, run_epilogue, args);
}

void backward_pass(const BackwardArgs& args) {
  RESNET_FUSED_DTYPE_SWITCH(args.dtype, run_backward, args);
}

} // namespace CPU_CAPABILITY
} // namespace resnet_fused::cpu
