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

// Blocks for a grid-stride loop over `work` items: enough to fill the device,
// never more than the work needs.
int64_t grid_for(int64_t work) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, std::min(ceil_div(work, kThreads), sms * 8));
}

// ---------------------------------------------------------------------------
// Forward epilogue, in place on the conv's fresh output y (contiguous in its
// memory format). Flat element i has channel (i / inner) % k: inner = H*W for
// NCHW, 1 for channels-last.
// ---------------------------------------------------------------------------

template <typename scalar_t, typename opmath_t>
__device__ __forceinline__ void epilogue_one(
    scalar_t* y,
    const scalar_t* residual,
    const scalar_t* scale,
    const scalar_t* bias,
    int64_t i,
    int64_t c,
    bool relu) {
  const opmath_t s = scale ? static_cast<opmath_t>(scale[c]) : opmath_t(1);
  const opmath_t b = bias ? static_cast<opmath_t>(bias[c]) : opmath_t(0);
  const opmath_t r = residual ? static_cast<opmath_t>(residual[i]) : opmath_t(0);
  opmath_t v = epilogue(static_cast<opmath_t>(y[i]), s, b, r);
  if (relu) {
    v = relu_forward(v);
  }
  y[i] = static_cast<scalar_t>(v);
}

template <typename scalar_t, int VEC>
__global__ void epilogue_kernel(
    scalar_t* __restrict__ y,
    const scalar_t* __restrict__ residual,
    const scalar_t* __restrict__ scale,
    const scalar_t* __restrict__ bias,
    int64_t numel,
    int64_t k,
    int64_t inner,
    bool relu) {
  using opmath_t = at::opmath_type<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = VEC > 1 ? numel / VEC : 0;
  for (int64_t vi = first; vi < nvec; vi += stride) {
    const int64_t i0 = vi * VEC;
    // Channel of the first lane, then walk it along the vector.
    const int64_t q = i0 / inner;
    int64_t pos = i0 - q * inner;
    int64_t c = q % k;
    V yv = load_vec<V>(y + i0);
    const V rv = residual ? load_vec<V>(residual + i0) : yv;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const opmath_t s = scale ? static_cast<opmath_t>(scale[c]) : opmath_t(1);
      const opmath_t b = bias ? static_cast<opmath_t>(bias[c]) : opmath_t(0);
      const opmath_t r = residual ? static_cast<opmath_t>(rv.v[j]) : opmath_t(0);
      opmath_t v = epilogue(static_cast<opmath_t>(yv.v[j]), s, b, r);
      if (relu) {
        v = relu_forward(v);
      }
      yv.v[j] = static_cast<scalar_t>(v);
      if (++pos == inner) {
        pos = 0;
        if (++c == k) {
          c = 0;
        }
      }
    }
    store_vec(y + i0, yv);
  }
  // Scalar tail (everything when VEC == 1).
  for (int64_t i = nvec * VEC + first; i < numel; i += stride) {
    epilogue_one<scalar_t, opmath_t>(
        y, residual, scale, bias, i, (i / inner) % k, relu);
  }
}

// ---------------------------------------------------------------------------
// Backward, stage 1. g = relu_backward(grad, out) (or grad without ReLU),
// stored when g != nullptr; per-block sums of g per channel stored in
// partial[row][c] when partial != nullptr.
// ---------------------------------------------------------------------------

template <typename scalar_t, typename opmath_t>
__device__ __forceinline__ opmath_t masked_grad(
    scalar_t grad,
    const scalar_t* out,
    int64_t i,
    bool relu) {
  const opmath_t gr = static_cast<opmath_t>(grad);
  return relu ? relu_backward(gr, static_cast<opmath_t>(out[i])) : gr;
}

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
// Block (plane, chunk) writes partial[n * chunks + chunk][c].
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
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t end = std::min(begin + chunk, inner);
  const int64_t base = plane * inner;
  opmath_t acc = opmath_t(0);
  // With VEC > 1 the host guarantees inner % VEC == 0 and chunk % VEC == 0,
  // so [begin, end) is whole vectors.
  for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * VEC; i < end;
       i += static_cast<int64_t>(blockDim.x) * VEC) {
    const int64_t e = base + i;
    const V gv_in = load_vec<V>(grad + e);
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

std::vector<int64_t> output_shape(
    const at::Tensor& x,
    const at::Tensor& weight,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation) {
  std::vector<int64_t> shape{x.size(0), weight.size(0)};
  for (int d = 0; d < 2; ++d) {
    shape.push_back(
        (x.size(2 + d) + 2 * padding[d] - dilation[d] * (weight.size(2 + d) - 1) - 1) /
            stride[d] +
        1);
  }
  return shape;
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(
      t.is_cuda(), name, ": expected a CUDA tensor for the cuda backend, got device ",
      t.device());
}

// (rows, k, inner) of a 4-D tensor contiguous in fmt: NCHW is (N, K, H*W),
// channels-last (N*H*W, K, 1).
std::tuple<int64_t, int64_t, int64_t> rows_k_inner(
    const at::Tensor& t,
    at::MemoryFormat fmt) {
  const int64_t n = t.size(0), k = t.size(1), hw = t.size(2) * t.size(3);
  if (fmt == at::MemoryFormat::ChannelsLast) {
    return {n * hw, k, 1};
  }
  return {n, k, hw};
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
    at::Tensor& y,
    const at::Tensor& residual,
    const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& bias,
    bool relu,
    at::MemoryFormat fmt) {
  const auto [rows, k, inner] = rows_k_inner(y, fmt);
  (void)rows;
  const int64_t numel = y.numel();
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
        const bool vec_ok = is_aligned(y_ptr) && (!r_ptr || is_aligned(r_ptr));
        const auto stream = at::cuda::getCurrentCUDAStream();
        if (vec_ok) {
          const int64_t blocks = grid_for(std::max<int64_t>(numel / kVec, 1));
          epilogue_kernel<scalar_t, kVec><<<blocks, kThreads, 0, stream>>>(
              y_ptr, r_ptr, s_ptr, b_ptr, numel, k, inner, relu);
        } else {
          epilogue_kernel<scalar_t, 1><<<grid_for(numel), kThreads, 0, stream>>>(
              y_ptr, r_ptr, s_ptr, b_ptr, numel, k, inner, relu);
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
  // 1. checks
  check_conv_bias_add_relu_args(
      x, weight, bias, residual, scale, stride, padding, dilation, groups);
  check_cuda(x, "x");
  // 2. device guard
  const c10::cuda::CUDAGuard device_guard(x.device());
  // 3. empty output
  const auto fmt = output_memory_format(x);
  const auto shape = output_shape(x, weight, stride, padding, dilation);
  if (c10::multiply_integers(shape) == 0) {
    return at::empty(shape, x.options().memory_format(fmt));
  }
  // 4. memory format: y and residual in x's suggested format.
  const at::Tensor res =
      residual.has_value() ? residual->contiguous(fmt) : at::Tensor();
  if (cudnn_may_fuse(x, relu)) {
    at::Tensor y = try_cudnn_fused(
        x, weight, bias,
        res.defined() ? std::optional<at::Tensor>(res) : std::nullopt, scale,
        stride, padding, dilation, groups);
    if (y.defined()) {
      return y.is_contiguous(fmt) ? y : y.contiguous(fmt);
    }
  }
  at::Tensor y = conv2d_no_bias(x, weight, stride, padding, dilation, groups);
  if (!bias.has_value() && !residual.has_value() && !scale.has_value() && !relu) {
    return y;
  }
  // 5-7. dtype dispatch, launch on the current stream, launch check.
  launch_epilogue(y, res, scale, bias, relu, fmt);
  return y;
}

// Stage 1 + stage 2 of the backward's elementwise part. g_ptr/grad_bias may
// be null (not needed).
void launch_backward(
    const at::Tensor& grad,
    const at::Tensor& out,
    at::Tensor& g,
    at::Tensor& grad_bias,
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
          // NCHW: one block per (n, c) plane and chunk of the plane. Small
          // planes (7x7, 14x14) get small blocks rather than idle threads.
          const bool vec = ptrs_aligned && inner % kVec == 0;
          const int64_t step = vec ? kVec : 1;
          const int threads = static_cast<int>(std::clamp<int64_t>(
              ceil_div(ceil_div(inner, step), C10_WARP_SIZE) * C10_WARP_SIZE,
              C10_WARP_SIZE, kThreads));
          int64_t chunk = threads * step * 4;
          chunk = std::max(chunk, ceil_div(ceil_div(inner, kMaxGridY), step) * step);
          const int64_t chunks = ceil_div(inner, chunk);
          const int64_t planes = rows * k;
          TORCH_CHECK(
              planes <= std::numeric_limits<int32_t>::max(),
              "conv_bias_add_relu_backward: expected N*K <= 2^31-1 planes, got ",
              planes);
          partial_rows = rows * chunks;
          if (grad_bias.defined()) {
            partial = at::empty({partial_rows, k}, acc_options);
          }
          opmath_t* p_ptr = partial.defined() ? partial.mutable_data_ptr<opmath_t>() : nullptr;
          const dim3 grid(static_cast<unsigned>(planes), static_cast<unsigned>(chunks));
          if (vec) {
            backward_planes_kernel<scalar_t, kVec><<<grid, threads, 0, stream>>>(
                grad_ptr, out_ptr, g_ptr, p_ptr, k, inner, chunk, relu);
          } else {
            backward_planes_kernel<scalar_t, 1><<<grid, threads, 0, stream>>>(
                grad_ptr, out_ptr, g_ptr, p_ptr, k, inner, chunk, relu);
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        } else {
          // Channels-last: rows of K channels, tiles of rows_per_block rows.
          const bool vec = ptrs_aligned && k % kVec == 0;
          const int64_t step = vec ? kVec : 1;
          const int64_t rows_per_block =
              std::max<int64_t>(kRows * 16, ceil_div(rows, kMaxGridY));
          partial_rows = ceil_div(rows, rows_per_block);
          if (grad_bias.defined()) {
            partial = at::empty({partial_rows, k}, acc_options);
          }
          opmath_t* p_ptr = partial.defined() ? partial.mutable_data_ptr<opmath_t>() : nullptr;
          const int64_t col_blocks = ceil_div(k, kLanes * step);
          TORCH_CHECK(
              col_blocks <= std::numeric_limits<int32_t>::max(),
              "conv_bias_add_relu_backward: too many channels, got K=", k);
          const dim3 grid(
              static_cast<unsigned>(col_blocks), static_cast<unsigned>(partial_rows));
          const dim3 block(kLanes, kRows);
          if (vec) {
            backward_rows_kernel<scalar_t, kVec><<<grid, block, 0, stream>>>(
                grad_ptr, out_ptr, g_ptr, p_ptr, rows, k, rows_per_block, relu);
          } else {
            backward_rows_kernel<scalar_t, 1><<<grid, block, 0, stream>>>(
                grad_ptr, out_ptr, g_ptr, p_ptr, rows, k, rows_per_block, relu);
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
  // 1. checks
  check_conv_bias_add_relu_args(
      x, weight, std::nullopt, std::nullopt, scale, stride, padding, dilation,
      groups);
  check_cuda(x, "x");
  const auto shape = output_shape(x, weight, stride, padding, dilation);
  TORCH_CHECK_VALUE(
      grad_out.sizes() == at::IntArrayRef(shape),
      "grad_out: expected the output's shape ", shape, ", got ", grad_out.sizes());
  TORCH_CHECK_VALUE(
      grad_out.device() == x.device(), "grad_out: expected device ", x.device(),
      " (x's), got ", grad_out.device());
  TORCH_CHECK_TYPE(
      grad_out.scalar_type() == x.scalar_type(), "grad_out: expected dtype ",
      x.scalar_type(), " (x's), got ", grad_out.scalar_type());
  if (relu) {
    TORCH_CHECK_VALUE(
        out.sizes() == grad_out.sizes(), "out: expected grad_out's shape ",
        grad_out.sizes(), ", got ", out.sizes());
    TORCH_CHECK_VALUE(
        out.device() == x.device(), "out: expected device ", x.device(),
        " (x's), got ", out.device());
    TORCH_CHECK_TYPE(
        out.scalar_type() == x.scalar_type(), "out: expected dtype ",
        x.scalar_type(), " (x's), got ", out.scalar_type());
  }
  TORCH_CHECK_VALUE(
      relu || !output_mask[3],
      "output_mask: grad_residual is grad_out itself when relu=False; "
      "expected output_mask[3]=false, got true");
  const auto [need_x, need_w, need_b, need_r] = output_mask;
  auto empty = [&]() { return at::empty({0}, x.options()); };
  // 2. device guard
  const c10::cuda::CUDAGuard device_guard(x.device());
  // 3. empty gradient: nothing flows back, every requested grad is zero.
  if (grad_out.numel() == 0) {
    const auto fmt = output_memory_format(x);
    return {
        need_x ? at::zeros_like(x, fmt) : empty(),
        need_w ? at::zeros_like(weight) : empty(),
        need_b ? at::zeros({weight.size(0)}, x.options()) : empty(),
        need_r ? at::zeros(shape, x.options().memory_format(fmt)) : empty()};
  }
  // 4. memory format: everything in x's suggested format.
  const auto fmt = output_memory_format(x);
  const at::Tensor grad = grad_out.contiguous(fmt);
  // Without ReLU the mask is the identity: g is grad_out itself.
  const bool need_g = relu && (need_x || need_w || need_r);
  at::Tensor g = need_g ? at::empty_like(grad, fmt) : at::Tensor();
  at::Tensor grad_bias =
      need_b ? at::empty({weight.size(0)}, x.options()) : at::Tensor();
  if (need_g || need_b) {
    const at::Tensor o = relu ? out.contiguous(fmt) : at::Tensor();
    // 5-7. dtype dispatch, launch on the current stream, launch checks.
    launch_backward(grad, o, g, grad_bias, relu, fmt);
  }
  if (!need_g) {
    g = grad;
  }
  auto [grad_x, grad_weight] = conv2d_backward(
      g, x, weight, scale, stride, padding, dilation, groups, need_x, need_w);
  return {
      grad_x, grad_weight, need_b ? grad_bias : empty(), need_r ? g : empty()};
}

} // namespace

TORCH_LIBRARY_IMPL(resnet_fused, CUDA, m) {
  m.impl("conv_bias_add_relu", &conv_bias_add_relu_cuda);
  m.impl("conv_bias_add_relu_backward", &conv_bias_add_relu_backward_cuda);
}

} // namespace resnet_fused
