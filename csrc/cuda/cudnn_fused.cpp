// Off by default, for two reasons that only a GPU run can settle:
//  - PyTorch builds cuDNN's fused ReLU with the frontend's default
//    CUDNN_NOT_PROPAGATE_NAN, so relu(NaN) may come out as 0, unlike every
//    other path (and the backward mask would then drop the gradient);
//  - at::cudnn_convolution_relu passes its uninitialised output as z with
//    alpha2 = 0, which can turn a recycled NaN bit pattern into a NaN. This
//    path never calls it: without a residual, z is a zero tensor.
// tests/test_cuda_runtime.py checks both (NaN inputs, a NaN-poisoned
// allocator cache) with RESNET_FUSED_CUDNN_FUSED=1.
#include "cuda/cudnn_fused.h"

#include <ATen/Context.h>
#include <ATen/cuda/CUDAConfig.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/util/accumulate.h>
#include <c10/util/env.h>
#include <torch/version.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "conv_bias_add_relu.h"
#include "cuda/failure_cache.h"

namespace resnet_fused::cuda {

namespace {

bool opted_in() {
  const auto v = c10::utils::get_env(kCudnnFusedEnv);
  return v.has_value() && *v == "1";
}

// Whether cuDNN's fused graph may serve this call at all. It fuses only
// ReLU, has no double runtime-fusion engines and no deterministic mode.
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

// The largest power of two (up to 256) that divides t's data address:
// cuDNN's engines differ by the alignment they need.
int64_t alignment(const at::Tensor& t) {
  const auto addr = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  return addr == 0 ? 256 : std::min<int64_t>(256, addr & (~addr + 1));
}

// Everything that decides whether cuDNN finds an engine: dtype, device,
// shapes, strides and alignment of what it is given, the conv geometry, and
// the TF32 and benchmark settings.
FailureCache::Key case_key(
    const at::Tensor& x,
    const at::Tensor& w,
    const at::Tensor& z,
    const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups) {
  const auto& ctx = at::globalContext();
  FailureCache::Key key{
      static_cast<int64_t>(x.scalar_type()), x.device().index(), groups,
      ctx.allowTF32CuDNN(at::Float32Op::CONV), ctx.benchmarkCuDNN(),
      bias.has_value()};
  for (const at::Tensor* t : {&x, &w, &z}) {
    key.insert(key.end(), t->sizes().begin(), t->sizes().end());
    key.insert(key.end(), t->strides().begin(), t->strides().end());
    key.push_back(alignment(*t));
  }
  if (bias.has_value()) {
    key.push_back(alignment(*bias));
  }
  for (auto a : {stride, padding, dilation}) {
    key.insert(key.end(), a.begin(), a.end());
  }
  return key;
}

FailureCache& failures() {
  static FailureCache cache;
  return cache;
}

} // namespace

at::Tensor try_cudnn_fused(
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
  // A scale would have to ride in the weight, where an infinite one turns a
  // filter's sums into NaN and fp16's w * s may overflow; telling those apart
  // would sync the stream (and break graph capture). Scaled calls take the
  // cuDNN conv and our epilogue.
  if (!opted_in() || !cudnn_may_fuse(x, relu) || scale.has_value()) {
    return at::Tensor();
  }
  const auto fmt = output_memory_format(x);
  const auto shape = conv_output_shape(x, weight, stride, padding, dilation);
  const at::Tensor& w = weight;
  const at::Tensor z = residual.has_value()
      ? residual->contiguous(fmt)
      : at::empty(shape, x.options().memory_format(fmt));
  const std::optional<at::Tensor> b = bias.has_value()
      ? std::optional<at::Tensor>(bias->contiguous())
      : std::nullopt;
  const auto key = case_key(x, w, z, b, stride, padding, dilation, groups);
  if (failures().skip(key)) {
    return at::Tensor();
  }
  if (!residual.has_value()) {
    z.zero_(); // after the cache lookup: a known failure pays no memset
  }
  try {
    at::Tensor y = at::cudnn_convolution_add_relu(
        x, w, z, /*alpha=*/std::nullopt, b, stride, padding, dilation, groups);
    failures().record_success(key);
    return y.is_contiguous(fmt) ? y : y.contiguous(fmt);
  } catch (const c10::OutOfMemoryError&) {
    throw; // the fallback needs memory too; never remembered as a failure
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
  } catch (const c10::AcceleratorError&) {
    throw; // a CUDA error (an illegal address, say) is no missing engine
#endif
  } catch (const c10::Error&) {
    // "unable to find an engine": runtime fusion does not cover every
    // dtype/layout/arch.
    failures().record_failure(key);
    return at::Tensor();
  } catch (const std::exception&) {
    // cudnn_frontend::cudnnException (a std::runtime_error): ATen builds the
    // fused graph and its heuristics outside its own catch.
    failures().record_failure(key);
    return at::Tensor();
  }
}

} // namespace resnet_fused::cuda
