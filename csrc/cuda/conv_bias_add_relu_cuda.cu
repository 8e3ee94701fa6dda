// CUDA backend of resnet_fused::conv_bias_add_relu and its backward.
//
// Forward: cuDNN's fused conv+bias+add+relu graph when it can run the case
// (relu=True; a per-channel scale is folded into the weights), else ATen's
// conv followed by one vectorized epilogue pass over the conv's own output.
// Backward: one pass over grad_out and the saved output gives the masked
// gradient g (= grad_residual) and per-block partial sums of g per channel; a
// second kernel adds the partials in a fixed order (no atomics), so grad_bias
// is deterministic. ATen's convolution_backward then gives dx and dw, only if
// they are asked for.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAConfig.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <mutex>
#include <set>
#include <tuple>
#include <vector>

#include "conv_bias_add_relu.h"
#include "epilogue.h"

namespace resnet_fused {

namespace {

constexpr int kVecBytes = 16;
constexpr int kThreads = 256;
// 2-D blocks of the channels-last kernels: 32 lanes along K, 8 rows.
constexpr int kLanes = 32;
constexpr int kRows = 8;
constexpr int64_t kMaxGridY = 65535;

template <typename scalar_t>
constexpr int vec_size() {
  return kVecBytes / static_cast<int>(sizeof(scalar_t));
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// One 16-byte load/store of a Vec. The store is an explicit st.global.v4
// (as CUTLASS does): a struct or int4 assignment was split by NVVM into four
// 32-bit stores in the backward kernels, and __stwb compiles to a strong
// (STG.E.128.STRONG.SM) store.
template <typename V>
__device__ __forceinline__ V load_vec(const void* p) {
  if constexpr (sizeof(V) == kVecBytes) {
    union {
      int4 raw;
      V vec;
    } u;
    u.raw = *reinterpret_cast<const int4*>(p);
    return u.vec;
  } else {
    return *reinterpret_cast<const V*>(p);
  }
}

template <typename V>
__device__ __forceinline__ void store_vec(void* p, const V& v) {
  if constexpr (sizeof(V) == kVecBytes) {
    union {
      V vec;
      int4 raw;
    } u;
    u.vec = v;
    asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p),
                 "r"(u.raw.x), "r"(u.raw.y), "r"(u.raw.z), "r"(u.raw.w)
                 : "memory");
  } else {
    *reinterpret_cast<V*>(p) = v;
  }
}

bool is_aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % kVecBytes == 0;
}

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// ---------------------------------------------------------------------------
// Forward epilogue, in place on the conv's fresh output y (contiguous in its
// memory format): y = act(y * scale[c] + bias[c] + residual). Same two
// layouts as the backward, so the channel is known per block (NCHW) or per
// column (channels-last) and the loops do no division.
// ---------------------------------------------------------------------------

template <typename scalar_t, typename opmath_t>
__device__ __forceinline__ scalar_t epilogue_value(
    scalar_t acc,
    opmath_t s,
    opmath_t b,
    opmath_t r,
    bool relu) {
  opmath_t v = epilogue(static_cast<opmath_t>(acc), s, b, r);
  return static_cast<scalar_t>(relu ? relu_forward(v) : v);
}

// NCHW: grid (N*K planes, chunks of H*W). Plane bases need not be 16-byte
// aligned (H*W % VEC != 0): each chunk is a scalar head up to the first
// aligned element, whole vectors, then a scalar tail.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads) epilogue_planes_kernel(
    scalar_t* __restrict__ y,
    const scalar_t* __restrict__ residual,
    const scalar_t* __restrict__ scale,
    const scalar_t* __restrict__ bias,
    int64_t k,
    int64_t inner,
    int64_t chunk,
    bool relu) {
  using opmath_t = at::opmath_type<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  const int64_t plane = blockIdx.x;
  const int64_t c = plane % k;
  const opmath_t s = scale ? static_cast<opmath_t>(scale[c]) : opmath_t(1);
  const opmath_t b = bias ? static_cast<opmath_t>(bias[c]) : opmath_t(0);
  const int64_t base = plane * inner;
  const int64_t begin = base + static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t end = std::min(begin + chunk, base + inner);
  // [begin, vbegin) head, [vbegin, vend) vectors, [vend, end) tail.
  const int64_t vbegin = std::min(end, begin + (VEC - begin % VEC) % VEC);
  const int64_t vend = vbegin + (end - vbegin) / VEC * VEC;
  for (int64_t e = vbegin + static_cast<int64_t>(threadIdx.x) * VEC; e < vend;
       e += static_cast<int64_t>(blockDim.x) * VEC) {
    V yv = load_vec<V>(y + e);
    const V rv = residual ? load_vec<V>(residual + e) : yv;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const opmath_t r = residual ? static_cast<opmath_t>(rv.v[j]) : opmath_t(0);
      yv.v[j] = epilogue_value(yv.v[j], s, b, r, relu);
    }
    store_vec(y + e, yv);
  }
  // Head and tail: fewer than VEC elements each (everything when VEC == 1).
  const int64_t head = vbegin - begin;
  const int64_t scalars = head + (end - vend);
  for (int64_t t = threadIdx.x; t < scalars; t += blockDim.x) {
    const int64_t e = t < head ? begin + t : vend + (t - head);
    const opmath_t r = residual ? static_cast<opmath_t>(residual[e]) : opmath_t(0);
    y[e] = epilogue_value(y[e], s, b, r, relu);
  }
}

// Channels-last: (M = N*H*W rows, K). Block (kLanes, kRows) covers
// kLanes * VEC channels of rows_per_block rows. With VEC > 1 the host
// guarantees K % VEC == 0, so every row starts 16-byte aligned.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kLanes * kRows) epilogue_rows_kernel(
    scalar_t* __restrict__ y,
    const scalar_t* __restrict__ residual,
    const scalar_t* __restrict__ scale,
    const scalar_t* __restrict__ bias,
    int64_t m,
    int64_t k,
    int64_t rows_per_block,
    bool relu) {
  using opmath_t = at::opmath_type<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * kLanes + threadIdx.x) * VEC;
  if (col >= k) {
    return;
  }
  opmath_t s[VEC], b[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    s[j] = scale ? static_cast<opmath_t>(scale[col + j]) : opmath_t(1);
    b[j] = bias ? static_cast<opmath_t>(bias[col + j]) : opmath_t(0);
  }
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t row_end = std::min(row_begin + rows_per_block, m);
  for (int64_t row = row_begin + threadIdx.y; row < row_end; row += kRows) {
    const int64_t e = row * k + col;
    V yv = load_vec<V>(y + e);
    const V rv = residual ? load_vec<V>(residual + e) : yv;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const opmath_t r = residual ? static_cast<opmath_t>(rv.v[j]) : opmath_t(0);
      yv.v[j] = epilogue_value(yv.v[j], s[j], b[j], r, relu);
    }
    store_vec(y + e, yv);
  }
}

// ---------------------------------------------------------------------------
// Backward, stage 1. g = relu_backward(grad, out) (or grad without ReLU),
// stored when g != nullptr; per-block sums of g per channel stored in
// partial[row][c] when partial != nullptr.
// ---------------------------------------------------------------------------

// Sum over the block in a fixed order (shuffle tree, then warp order).
template <typename T>
__device__ T block_sum(T v, T* warp_sums) {
  const int lane = threadIdx.x % C10_WARP_SIZE;
  const int warp = threadIdx.x / C10_WARP_SIZE;
#pragma unroll
  for (int offset = C10_WARP_SIZE / 2; offset > 0; offset /= 2) {
    v = reduce_combine(v, __shfl_down_sync(0xffffffffu, v, offset));
  }
  if (lane == 0) {
    warp_sums[warp] = v;
  }
  __syncthreads();
  T total = T(0);
  if (threadIdx.x == 0) {
    for (int w = 0; w < static_cast<int>(blockDim.x / C10_WARP_SIZE); ++w) {
      total = reduce_combine(total, warp_sums[w]);
    }
  }
  return total;  // valid in thread 0 only
}

// NCHW: grid (N*K planes, chunks of H*W), 32 to kThreads threads per block.
// Block (plane, chunk) writes partial[n * chunks + chunk][c]. As in the
// epilogue, each chunk is a scalar head, whole aligned vectors, a scalar tail.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads) backward_planes_kernel(
    const scalar_t* __restrict__ grad,
    const scalar_t* __restrict__ out,
    scalar_t* __restrict__ g,
    at::opmath_type<scalar_t>* __restrict__ partial,
    int64_t k,
    int64_t inner,
    int64_t chunk,
    bool relu) {
  using opmath_t = at::opmath_type<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  __shared__ opmath_t warp_sums[kThreads / C10_WARP_SIZE];
  const int64_t plane = blockIdx.x;
  const int64_t base = plane * inner;
  const int64_t begin = base + static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t end = std::min(begin + chunk, base + inner);
  const int64_t vbegin = std::min(end, begin + (VEC - begin % VEC) % VEC);
  const int64_t vend = vbegin + (end - vbegin) / VEC * VEC;
  opmath_t acc = opmath_t(0);
  for (int64_t e = vbegin + static_cast<int64_t>(threadIdx.x) * VEC; e < vend;
       e += static_cast<int64_t>(blockDim.x) * VEC) {
    const V gv_in = load_vec<V>(grad + e);
    // (An ov left unset without ReLU made ptxas spill on sm_80.)
    const V ov = relu ? load_vec<V>(out + e) : gv_in;
    V gv = gv_in;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const opmath_t gr = static_cast<opmath_t>(gv.v[j]);
      const opmath_t m = relu ? relu_backward(gr, static_cast<opmath_t>(ov.v[j])) : gr;
      acc = reduce_combine(acc, m);
      gv.v[j] = static_cast<scalar_t>(m);
    }
    if (g) {
      store_vec(g + e, gv);
    }
  }
  const int64_t head = vbegin - begin;
  const int64_t scalars = head + (end - vend);
  for (int64_t t = threadIdx.x; t < scalars; t += blockDim.x) {
    const int64_t e = t < head ? begin + t : vend + (t - head);
    const opmath_t gr = static_cast<opmath_t>(grad[e]);
    const opmath_t m = relu ? relu_backward(gr, static_cast<opmath_t>(out[e])) : gr;
    acc = reduce_combine(acc, m);
    if (g) {
      g[e] = static_cast<scalar_t>(m);
    }
  }
  if (partial) {
    const opmath_t total = block_sum(acc, warp_sums);
    if (threadIdx.x == 0) {
      const int64_t n = plane / k;
      const int64_t c = plane - n * k;
      partial[(n * gridDim.y + blockIdx.y) * k + c] = total;
    }
  }
}

// Channels-last: (M = N*H*W rows, K). Block (kLanes, kRows) covers
// kLanes * VEC channels of rows_per_block rows and writes partial[blockIdx.y][c].
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kLanes * kRows) backward_rows_kernel(
    const scalar_t* __restrict__ grad,
    const scalar_t* __restrict__ out,
    scalar_t* __restrict__ g,
    at::opmath_type<scalar_t>* __restrict__ partial,
    int64_t m,
    int64_t k,
    int64_t rows_per_block,
    bool relu) {
  using opmath_t = at::opmath_type<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  __shared__ opmath_t sums[kRows][kLanes * VEC];
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * kLanes + tx) * VEC;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t row_end = std::min(row_begin + rows_per_block, m);
  opmath_t acc[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    acc[j] = opmath_t(0);
  }
  // With VEC > 1 the host guarantees k % VEC == 0: a vector is in bounds
  // exactly when its first channel is.
  if (col < k) {
    for (int64_t row = row_begin + ty; row < row_end; row += kRows) {
      const int64_t e = row * k + col;
      const V gv_in = load_vec<V>(grad + e);
      // (An ov left unset without ReLU made ptxas spill on sm_80.)
      const V ov = relu ? load_vec<V>(out + e) : gv_in;
      V gv = gv_in;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const opmath_t gr = static_cast<opmath_t>(gv.v[j]);
        const opmath_t mg = relu ? relu_backward(gr, static_cast<opmath_t>(ov.v[j])) : gr;
        acc[j] = reduce_combine(acc[j], mg);
        gv.v[j] = static_cast<scalar_t>(mg);
      }
      if (g) {
        store_vec(g + e, gv);
      }
    }
  }
  if (partial) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      sums[ty][tx * VEC + j] = acc[j];
    }
    __syncthreads();
    if (ty == 0 && col < k) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        opmath_t total = sums[0][tx * VEC + j];
        for (int r = 1; r < kRows; ++r) {
          total = reduce_combine(total, sums[r][tx * VEC + j]);
        }
        partial[static_cast<int64_t>(blockIdx.y) * k + col + j] = total;
      }
    }
  }
}

// Stage 2: grad_bias[c] = sum over rows of partial[row][c], rows in a fixed
// order: lane ty takes rows ty, ty + kRows, ..., then lanes combine in order.
template <typename scalar_t>
__global__ void __launch_bounds__(kLanes * kRows) reduce_partials_kernel(
    const at::opmath_type<scalar_t>* __restrict__ partial,
    scalar_t* __restrict__ grad_bias,
    int64_t rows,
    int64_t k) {
  using opmath_t = at::opmath_type<scalar_t>;
  __shared__ opmath_t sums[kRows][kLanes];
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kLanes + tx;
  opmath_t acc = opmath_t(0);
  if (c < k) {
    for (int64_t r = ty; r < rows; r += kRows) {
      acc = reduce_combine(acc, partial[r * k + c]);
    }
  }
  sums[ty][tx] = acc;
  __syncthreads();
  if (ty == 0 && c < k) {
    opmath_t total = sums[0][tx];
    for (int r = 1; r < kRows; ++r) {
      total = reduce_combine(total, sums[r][tx]);
    }
    grad_bias[c] = static_cast<scalar_t>(total);
  }
}

// ---------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------


void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(
      t.is_cuda(), name, ": expected a CUDA tensor for the cuda backend, got device ",
      t.device());
}

// Launch shape of the NCHW kernels: 32..kThreads threads sized to the plane
// (7x7 and 14x14 planes get small blocks, not idle threads), and chunks of
// the plane so that gridDim.y <= 65535.
struct PlaneConfig {
  int threads;
  int64_t chunk;
  int64_t chunks;
};

PlaneConfig plane_config(int64_t inner, int64_t step) {
  PlaneConfig cfg;
  cfg.threads = static_cast<int>(std::clamp<int64_t>(
      ceil_div(ceil_div(inner, step), C10_WARP_SIZE) * C10_WARP_SIZE,
      C10_WARP_SIZE, kThreads));
  cfg.chunk = std::max<int64_t>(
      cfg.threads * step * 4, ceil_div(ceil_div(inner, kMaxGridY), step) * step);
  cfg.chunks = ceil_div(inner, cfg.chunk);
  return cfg;
}

// Rows per block of the channels-last kernels, so that gridDim.y <= 65535.
int64_t rows_per_block_for(int64_t rows) {
  return std::max<int64_t>(kRows * 16, ceil_div(rows, kMaxGridY));
}

dim3 planes_grid(int64_t planes, int64_t chunks) {
  TORCH_CHECK(
      planes <= std::numeric_limits<int32_t>::max(),
      "conv_bias_add_relu: expected N*K <= 2^31-1 (n, c) planes, got ", planes);
  return dim3(static_cast<unsigned>(planes), static_cast<unsigned>(chunks));
}

dim3 rows_grid(int64_t k, int64_t step, int64_t rows_per_block, int64_t rows) {
  const int64_t col_blocks = ceil_div(k, kLanes * step);
  TORCH_CHECK(
      col_blocks <= std::numeric_limits<int32_t>::max(),
      "conv_bias_add_relu: too many channels, got K=", k);
  return dim3(
      static_cast<unsigned>(col_blocks),
      static_cast<unsigned>(ceil_div(rows, rows_per_block)));
}

// Cases (shapes, layouts, dtype, options) where cuDNN found no engine for the
// fused graph; they go straight to conv + epilogue afterwards.
std::mutex cudnn_failed_mutex;
std::set<std::vector<int64_t>> cudnn_failed;

std::vector<int64_t> cudnn_case_key(
    const at::Tensor& x,
    const at::Tensor& w,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups) {
  std::vector<int64_t> key{
      static_cast<int64_t>(x.scalar_type()), x.device().index(), groups,
      bias.has_value(), residual.has_value()};
  for (const at::Tensor* t : {&x, &w}) {
    key.insert(key.end(), t->sizes().begin(), t->sizes().end());
    key.insert(key.end(), t->strides().begin(), t->strides().end());
  }
  if (residual.has_value()) {
    key.insert(key.end(), residual->strides().begin(), residual->strides().end());
  }
  for (auto a : {stride, padding, dilation}) {
    key.insert(key.end(), a.begin(), a.end());
  }
  return key;
}

// Whether to try cuDNN's fused conv+bias+add+relu for this call. It fuses
// only ReLU; it has no double runtime-fusion engines; it offers no
// deterministic mode for the fused graph.
bool cudnn_may_fuse(const at::Tensor& x, bool relu) {
#if AT_CUDNN_ENABLED()
  const auto& ctx = at::globalContext();
  const auto dtype = x.scalar_type();
  return relu &&
      (dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16) &&
      ctx.userEnabledCuDNN() && at::detail::getCUDAHooks().hasCuDNN() &&
      !ctx.deterministicCuDNN() && !ctx.deterministicAlgorithms();
#else
  (void)x;
  (void)relu;
  return false;
#endif
}

// relu(conv(x, weight * scale) + bias + residual) through cuDNN's fused
// graph, or an undefined tensor when cuDNN has no engine for the case.
// Folding the scale into the weights is exact in real arithmetic; in floating
// point it rounds each folded weight once in the dtype, the same folding
// conv2d_backward uses for grad_x.
at::Tensor try_cudnn_fused(
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& scale,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups) {
  const auto key =
      cudnn_case_key(x, weight, bias, residual, stride, padding, dilation, groups);
  {
    std::lock_guard<std::mutex> lock(cudnn_failed_mutex);
    if (cudnn_failed.count(key)) {
      return at::Tensor();
    }
  }
  const at::Tensor w =
      scale.has_value() ? weight * scale->view({-1, 1, 1, 1}) : weight;
  // The failure cache does not key on the bias's strides: give cuDNN a dense one.
  const std::optional<at::Tensor> b = bias.has_value()
      ? std::optional<at::Tensor>(bias->contiguous())
      : std::nullopt;
  try {
    return residual.has_value()
        ? at::cudnn_convolution_add_relu(
              x, w, *residual, /*alpha=*/std::nullopt, b, stride, padding,
              dilation, groups)
        : at::cudnn_convolution_relu(x, w, b, stride, padding, dilation, groups);
  } catch (const c10::OutOfMemoryError&) {
    throw;
  } catch (const c10::Error&) {
    // "unable to find an engine": cuDNN's runtime fusion does not cover every
    // dtype/layout/arch. Remember it and use conv + epilogue.
    std::lock_guard<std::mutex> lock(cudnn_failed_mutex);
    cudnn_failed.insert(key);
    return at::Tensor();
  }
}

void launch_epilogue(
    const at::Tensor& y,
    const at::Tensor& residual,
    const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& bias,
    bool relu,
    at::MemoryFormat fmt) {
  const auto [rows, k, inner] = rows_k_inner(y, fmt);
  const at::Tensor s = scale.has_value() ? scale->contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, y.scalar_type(), "conv_bias_add_relu_cuda", [&] {
        scalar_t* y_ptr = y.mutable_data_ptr<scalar_t>();
        const scalar_t* r_ptr =
            residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr;
        const scalar_t* s_ptr = s.defined() ? s.const_data_ptr<scalar_t>() : nullptr;
        const scalar_t* b_ptr = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
        constexpr int kVec = vec_size<scalar_t>();
        const bool ptrs_aligned = is_aligned(y_ptr) && (!r_ptr || is_aligned(r_ptr));
        const auto stream = at::cuda::getCurrentCUDAStream();
        if (inner != 1) {
          const int64_t step = ptrs_aligned ? kVec : 1;
          const PlaneConfig cfg = plane_config(inner, step);
          const dim3 grid = planes_grid(rows * k, cfg.chunks);
          if (ptrs_aligned) {
            epilogue_planes_kernel<scalar_t, kVec><<<grid, cfg.threads, 0, stream>>>(
                y_ptr, r_ptr, s_ptr, b_ptr, k, inner, cfg.chunk, relu);
          } else {
            epilogue_planes_kernel<scalar_t, 1><<<grid, cfg.threads, 0, stream>>>(
                y_ptr, r_ptr, s_ptr, b_ptr, k, inner, cfg.chunk, relu);
          }
        } else {
          const bool vec = ptrs_aligned && k % kVec == 0;
          const int64_t rpb = rows_per_block_for(rows);
          const dim3 block(kLanes, kRows);
          if (vec) {
            epilogue_rows_kernel<scalar_t, kVec>
                <<<rows_grid(k, kVec, rpb, rows), block, 0, stream>>>(
                    y_ptr, r_ptr, s_ptr, b_ptr, rows, k, rpb, relu);
          } else {
            epilogue_rows_kernel<scalar_t, 1>
                <<<rows_grid(k, 1, rpb, rows), block, 0, stream>>>(
                    y_ptr, r_ptr, s_ptr, b_ptr, rows, k, rpb, relu);
          }
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
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
  if (cudnn_may_fuse(x, relu)) {
    check_conv_bias_add_relu_args(
        x, weight, bias, residual, scale, stride, padding, dilation, groups);
    const auto fmt = output_memory_format(x);
    const auto shape = conv_output_shape(x, weight, stride, padding, dilation);
    if (c10::multiply_integers(shape) > 0) {
      const at::Tensor res =
          residual.has_value() ? residual->contiguous(fmt) : at::Tensor();
      at::Tensor y = try_cudnn_fused(
          x, weight, bias,
          res.defined() ? std::optional<at::Tensor>(res) : std::nullopt, scale,
          stride, padding, dilation, groups);
      if (y.defined()) {
        return y.is_contiguous(fmt) ? y : y.contiguous(fmt);
      }
    }
  }
  return run_conv_bias_add_relu(
      x, weight, bias, residual, scale, stride, padding, dilation, groups, relu,
      &launch_epilogue);
}

// Stage 1 + stage 2 of the backward's elementwise part. g_ptr/grad_bias may
// be null (not needed).
void launch_backward(
    const at::Tensor& grad,
    const at::Tensor& out,
    const at::Tensor& g,
    const at::Tensor& grad_bias,
    bool relu,
    at::MemoryFormat fmt) {
  const auto [rows, k, inner] = rows_k_inner(grad, fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(),
      "conv_bias_add_relu_backward_cuda", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        constexpr int kVec = vec_size<scalar_t>();
        const scalar_t* grad_ptr = grad.const_data_ptr<scalar_t>();
        const scalar_t* out_ptr = relu ? out.const_data_ptr<scalar_t>() : nullptr;
        scalar_t* g_ptr = g.defined() ? g.mutable_data_ptr<scalar_t>() : nullptr;
        const bool ptrs_aligned = is_aligned(grad_ptr) &&
            (!out_ptr || is_aligned(out_ptr)) && (!g_ptr || is_aligned(g_ptr));
        const auto stream = at::cuda::getCurrentCUDAStream();
        const auto acc_options = grad.options().dtype(
            c10::CppTypeToScalarType<opmath_t>::value);
        at::Tensor partial;
        int64_t partial_rows = 0;
        if (inner != 1) {
          // NCHW: one block per (n, c) plane and chunk of the plane.
          const int64_t step = ptrs_aligned ? kVec : 1;
          const PlaneConfig cfg = plane_config(inner, step);
          const dim3 grid = planes_grid(rows * k, cfg.chunks);
          partial_rows = rows * cfg.chunks;
          if (grad_bias.defined()) {
            partial = at::empty({partial_rows, k}, acc_options);
          }
          opmath_t* p_ptr = partial.defined() ? partial.mutable_data_ptr<opmath_t>() : nullptr;
          if (ptrs_aligned) {
            backward_planes_kernel<scalar_t, kVec><<<grid, cfg.threads, 0, stream>>>(
                grad_ptr, out_ptr, g_ptr, p_ptr, k, inner, cfg.chunk, relu);
          } else {
            backward_planes_kernel<scalar_t, 1><<<grid, cfg.threads, 0, stream>>>(
                grad_ptr, out_ptr, g_ptr, p_ptr, k, inner, cfg.chunk, relu);
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        } else {
          // Channels-last: rows of K channels, tiles of rows_per_block rows.
          const bool vec = ptrs_aligned && k % kVec == 0;
          const int64_t rpb = rows_per_block_for(rows);
          partial_rows = ceil_div(rows, rpb);
          if (grad_bias.defined()) {
            partial = at::empty({partial_rows, k}, acc_options);
          }
          opmath_t* p_ptr = partial.defined() ? partial.mutable_data_ptr<opmath_t>() : nullptr;
          const dim3 block(kLanes, kRows);
          if (vec) {
            backward_rows_kernel<scalar_t, kVec>
                <<<rows_grid(k, kVec, rpb, rows), block, 0, stream>>>(
                    grad_ptr, out_ptr, g_ptr, p_ptr, rows, k, rpb, relu);
          } else {
            backward_rows_kernel<scalar_t, 1>
                <<<rows_grid(k, 1, rpb, rows), block, 0, stream>>>(
                    grad_ptr, out_ptr, g_ptr, p_ptr, rows, k, rpb, relu);
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        if (grad_bias.defined()) {
          const dim3 grid(static_cast<unsigned>(ceil_div(k, kLanes)));
          const dim3 block(kLanes, kRows);
          reduce_partials_kernel<scalar_t><<<grid, block, 0, stream>>>(
              partial.const_data_ptr<opmath_t>(),
              grad_bias.mutable_data_ptr<scalar_t>(), partial_rows, k);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
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
    std::array<bool, 4> output_mask) {
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard device_guard(x.device());
  return run_conv_bias_add_relu_backward(
      grad_out, out, x, weight, scale, stride, padding, dilation, groups, relu,
      output_mask, &launch_backward);
}

} // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("conv_bias_add_relu", &conv_bias_add_relu_cuda);
  m.impl("conv_bias_add_relu_backward", &conv_bias_add_relu_backward_cuda);
}

} // namespace resnet_fused
