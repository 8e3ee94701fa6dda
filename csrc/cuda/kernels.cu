// The CUDA kernels and their launchers.
//
// Forward: one vectorized epilogue pass, in place over the conv's own output.
// Backward: one pass over grad_out and the saved output gives the masked
// gradient g (= grad_residual) and per-block partial sums of g per channel; a
// second kernel adds the partials in a fixed order (no atomics), so grad_bias
// is deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/StringUtil.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include "cuda/kernels.h"
#include "cuda/vec_io.cuh"
#include "epilogue.h"

// The archs setup.py builds SASS for, e.g. sm_80/sm_90 (PTX for the newest).
#ifndef RESNET_FUSED_CUDA_ARCHS
#define RESNET_FUSED_CUDA_ARCHS unknown
#endif
#define RESNET_FUSED_STRINGIFY(x) #x
#define RESNET_FUSED_STR(x) RESNET_FUSED_STRINGIFY(x)

namespace resnet_fused::cuda {

namespace {

constexpr int kThreads = 256;
// 2-D blocks of the channels-last kernels: 32 lanes along K, 8 rows.
constexpr int kLanes = 32;
constexpr int kRows = 8;
constexpr int64_t kMaxGridY = 65535;

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

// Launch shape of one pass over a (rows, k, inner) tensor.
//  - NCHW (inner > 1): grid (N*K planes, chunks of each plane), 32..kThreads
//    threads sized to the plane (7x7 and 14x14 planes get small blocks, not
//    idle threads), chunks so that gridDim.y <= 65535.
//  - channels-last (inner == 1): blocks (kLanes, kRows) over kLanes * VEC
//    channels of `span` rows; VEC > 1 needs k % VEC == 0 so rows stay aligned.
struct LaunchShape {
  dim3 grid, block;
  bool vec;             // use the VEC > 1 kernel
  int64_t span;         // elements per chunk (NCHW) or rows per block (NHWC)
  int64_t partial_rows; // rows of the (partial_rows, k) partial sums
};

LaunchShape launch_shape(
    int64_t rows,
    int64_t k,
    int64_t inner,
    bool aligned,
    int vec_size) {
  LaunchShape s;
  if (inner != 1) {
    const int64_t step = aligned ? vec_size : 1;
    const int threads = static_cast<int>(std::clamp<int64_t>(
        ceil_div(ceil_div(inner, step), C10_WARP_SIZE) * C10_WARP_SIZE,
        C10_WARP_SIZE, kThreads));
    s.span = std::max<int64_t>(
        threads * step * 4, ceil_div(ceil_div(inner, kMaxGridY), step) * step);
    const int64_t chunks = ceil_div(inner, s.span);
    const int64_t planes = rows * k;
    TORCH_CHECK(
        planes <= std::numeric_limits<int32_t>::max(),
        "conv_bias_add_relu: expected N*K <= 2^31-1 (n, c) planes, got ", planes);
    s.grid = dim3(static_cast<unsigned>(planes), static_cast<unsigned>(chunks));
    s.block = dim3(threads);
    s.vec = aligned;
    s.partial_rows = rows * chunks;
    return s;
  }
  s.vec = aligned && k % vec_size == 0;
  s.span = std::max<int64_t>(kRows * 16, ceil_div(rows, kMaxGridY));
  const int64_t col_blocks = ceil_div(k, kLanes * (s.vec ? vec_size : 1));
  TORCH_CHECK(
      col_blocks <= std::numeric_limits<int32_t>::max(),
      "conv_bias_add_relu: too many channels, got K=", k);
  s.partial_rows = ceil_div(rows, s.span);
  s.grid = dim3(
      static_cast<unsigned>(col_blocks), static_cast<unsigned>(s.partial_rows));
  s.block = dim3(kLanes, kRows);
  return s;
}

// Calls launch(std::integral_constant<int, VEC>) with VEC = kVec when vec,
// else 1 (the scalar kernels for unaligned tensors).
template <int kVec, typename Launch>
void with_vec(bool vec, const Launch& launch) {
  if (vec) {
    launch(std::integral_constant<int, kVec>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

} // namespace

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
        const bool aligned = is_aligned(y_ptr) && (!r_ptr || is_aligned(r_ptr));
        const LaunchShape ls = launch_shape(rows, k, inner, aligned, kVec);
        const auto stream = at::cuda::getCurrentCUDAStream();
        with_vec<kVec>(ls.vec, [&](auto v) {
          constexpr int VEC = decltype(v)::value;
          if (inner != 1) {
            epilogue_planes_kernel<scalar_t, VEC><<<ls.grid, ls.block, 0, stream>>>(
                y_ptr, r_ptr, s_ptr, b_ptr, k, inner, ls.span, relu);
          } else {
            epilogue_rows_kernel<scalar_t, VEC><<<ls.grid, ls.block, 0, stream>>>(
                y_ptr, r_ptr, s_ptr, b_ptr, rows, k, ls.span, relu);
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
}

void launch_backward(
    const at::Tensor& grad_in,
    const at::Tensor& out_in,
    const at::Tensor& g,
    const at::Tensor& grad_bias,
    bool relu,
    at::MemoryFormat fmt) {
  // The vector and scalar kernels split a plane among threads differently, so
  // grad_bias's summation order would follow the inputs' alignment, not only
  // their shape: a misaligned view (grad_out of a torch.cat, say) is copied
  // into fresh, aligned memory. g is always fresh.
  auto aligned_copy = [&](const at::Tensor& t) {
    return !grad_bias.defined() || !t.defined() || is_aligned(t.const_data_ptr())
        ? t
        : t.clone(fmt);
  };
  const at::Tensor grad = aligned_copy(grad_in);
  const at::Tensor out = aligned_copy(out_in);
  const auto [rows, k, inner] = rows_k_inner(grad, fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(),
      "conv_bias_add_relu_backward_cuda", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        constexpr int kVec = vec_size<scalar_t>();
        const scalar_t* grad_ptr = grad.const_data_ptr<scalar_t>();
        const scalar_t* out_ptr = relu ? out.const_data_ptr<scalar_t>() : nullptr;
        scalar_t* g_ptr = g.defined() ? g.mutable_data_ptr<scalar_t>() : nullptr;
        const bool aligned = is_aligned(grad_ptr) &&
            (!out_ptr || is_aligned(out_ptr)) && (!g_ptr || is_aligned(g_ptr));
        const LaunchShape ls = launch_shape(rows, k, inner, aligned, kVec);
        const auto stream = at::cuda::getCurrentCUDAStream();
        // Stage 1 writes (ls.partial_rows, k) partial sums; stage 2 adds them.
        const at::Tensor partial = grad_bias.defined()
            ? at::empty(
                  {ls.partial_rows, k},
                  grad.options().dtype(c10::CppTypeToScalarType<opmath_t>::value))
            : at::Tensor();
        opmath_t* p_ptr =
            partial.defined() ? partial.mutable_data_ptr<opmath_t>() : nullptr;
        with_vec<kVec>(ls.vec, [&](auto v) {
          constexpr int VEC = decltype(v)::value;
          if (inner != 1) {
            backward_planes_kernel<scalar_t, VEC><<<ls.grid, ls.block, 0, stream>>>(
                grad_ptr, out_ptr, g_ptr, p_ptr, k, inner, ls.span, relu);
          } else {
            backward_rows_kernel<scalar_t, VEC><<<ls.grid, ls.block, 0, stream>>>(
                grad_ptr, out_ptr, g_ptr, p_ptr, rows, k, ls.span, relu);
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
        if (grad_bias.defined()) {
          const dim3 grid(static_cast<unsigned>(ceil_div(k, kLanes)));
          const dim3 block(kLanes, kRows);
          reduce_partials_kernel<scalar_t><<<grid, block, 0, stream>>>(
              p_ptr, grad_bias.mutable_data_ptr<scalar_t>(), ls.partial_rows, k);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
}

std::string kernel_image_status(int64_t device) {
  const int64_t count = c10::cuda::device_count();
  if (count == 0) {
    return "no CUDA device is visible";
  }
  TORCH_CHECK_VALUE(
      device >= 0 && device < count, "device: expected an index in [0, ",
      count, "), got ", device);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  // Fails with cudaErrorNoKernelImageForDevice (or InvalidDeviceFunction)
  // when the build has neither SASS nor JIT-able PTX for this device.
  cudaFuncAttributes attr;
  const cudaError_t err =
      cudaFuncGetAttributes(&attr, reduce_partials_kernel<float>);
  if (err == cudaSuccess) {
    return "";
  }
  (void)cudaGetLastError(); // clear it, so the next launch check is not blamed
  switch (err) {
    case cudaErrorNoKernelImageForDevice:
    case cudaErrorInvalidKernelImage:
    case cudaErrorInvalidDeviceFunction:
    case cudaErrorUnsupportedPtxVersion:
    case cudaErrorInvalidPtx:
    case cudaErrorJitCompilerNotFound:
      break;
    default:
      // Anything else (an earlier kernel's sticky error, a device that is
      // busy or out of memory) is no fault of the build: raised, and as an
      // exception it is not remembered as this backend's status.
      C10_CUDA_CHECK(err);
  }
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device);
  return c10::str(
      "resnet_fused's CUDA kernels cannot run on cuda:", device, " (",
      prop->name, ", compute capability ", prop->major, ".", prop->minor,
      "): this build has SASS for ",
      RESNET_FUSED_STR(RESNET_FUSED_CUDA_ARCHS),
      " and PTX for the newest of them (", cudaGetErrorString(err),
      "); rebuild with RESNET_FUSED_CUDA_ARCHS=\"", prop->major, prop->minor,
      "\"");
}

} // namespace resnet_fused::cuda
