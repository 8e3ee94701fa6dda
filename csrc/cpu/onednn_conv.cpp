// See onednn_conv.h. The ops are the ones Inductor emits for frozen CPU
// convolutions (torch/_inductor/fx_passes/mkldnn_fusion.py).
#include "cpu/onednn_conv.h"

#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/native/ConvUtils.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>

#include <cstdlib>
#include <cstring>
#include <string_view>

#include "conv_bias_add_relu.h"

namespace resnet_fused::cpu {

namespace {

using ScalarList = c10::List<std::optional<at::Scalar>>;

// mkldnn::_convolution_pointwise(X, W, B, padding, stride, dilation, groups,
// attr, scalars, algorithm): conv + bias + one unary post-op.
using UnaryOp = at::Tensor(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t,
    std::string_view, ScalarList, std::optional<std::string_view>);

// mkldnn::_convolution_pointwise.binary(X, other, W, B, padding, stride,
// dilation, groups, binary_attr, alpha, unary_attr, unary_scalars,
// unary_algorithm): conv + bias, `other` added, then an optional unary.
using BinaryOp = at::Tensor(
    const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const std::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef,
    at::IntArrayRef, int64_t, std::string_view, std::optional<at::Scalar>,
    std::optional<std::string_view>, ScalarList,
    std::optional<std::string_view>);

// Looked up (and signature-checked) outside the try below, so that a
// mismatch is an error rather than a silent fallback.
const c10::TypedOperatorHandle<UnaryOp>& unary_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkldnn::_convolution_pointwise", "")
          .typed<UnaryOp>();
  return op;
}

const c10::TypedOperatorHandle<BinaryOp>& binary_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkldnn::_convolution_pointwise", "binary")
          .typed<BinaryOp>();
  return op;
}

bool mkldnn_flag(const char* name) {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow(name, "")
                .typed<bool()>();
  return op.call();
}

// fp32 always; bf16 and fp16 only where torch's oneDNN has kernels for this
// CPU (it refuses them on plain AVX2 rather than emulating).
bool onednn_takes(at::ScalarType dtype) {
  if (!at::hasMKLDNN() || !at::globalContext().userEnabledMkldnn()) {
    return false;
  }
  switch (dtype) {
    case at::kFloat:
      return true;
    case at::kBFloat16: {
      static const bool ok = mkldnn_flag("mkldnn::_is_mkldnn_bf16_supported");
      return ok;
    }
    case at::kHalf: {
      static const bool ok = mkldnn_flag("mkldnn::_is_mkldnn_fp16_supported");
      return ok;
    }
    default:
      return false;
  }
}

// Whether ATen itself would run this conv on oneDNN. For small convs (batch 1,
// few elements; single-threaded 1x1 below batch 16) it picks its native
// kernel instead, faster than a oneDNN primitive on unpacked weights, whose
// setup alone costs tens of microseconds; there the conv + epilogue pass
// wins, so post-ops ride only where ATen goes.
bool aten_picks_onednn(
    const at::Tensor& x,
    const at::Tensor& weight,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups) {
  const int64_t no_output_padding[2] = {0, 0};
  return at::native::select_conv_backend(
             x, weight, std::nullopt, c10::fromIntArrayRefSlow(stride),
             c10::fromIntArrayRefSlow(padding),
             c10::fromIntArrayRefSlow(dilation), /*transposed=*/false,
             c10::fromIntArrayRefSlow(no_output_padding), groups,
             std::nullopt) == at::native::ConvBackend::Mkldnn;
}

// oneDNN's ReLU post-op is max(v, 0) with v first, so a NaN pre-activation
// becomes 0 (and its NCHW binary kernel turns +inf into FLT_MAX), unlike
// torch.relu. Unless RESNET_FUSED_ONEDNN_RELU=fused, ReLU runs as an
// in-place pass after the primitive so NaN/Inf match the reference.
bool fuse_relu() {
  const char* mode = std::getenv("RESNET_FUSED_ONEDNN_RELU");
  return mode != nullptr && std::strcmp(mode, "fused") == 0;
}

// With that ReLU pass to run anyway, the pass (conv + epilogue route) is
// the cheaper place for the rest of the epilogue: it adds the residual with
// no extra traffic, where the primitive's binary post-op followed by the
// pass cost 8-15 % more on ResNet-50's residual convs, and it applies the
// scale for free, where the primitive needs the weight folded on every call
// (a read and a write of the weight: up to 11 % more on late layers; it
// paid only where the output had over 16x the weight's elements).
// Measured with fp32, channels_last, batch 8, AVX2.
bool pass_takes_epilogue(
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& scale,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation) {
  if (residual.has_value()) {
    return true;
  }
  if (!scale.has_value()) {
    return false;
  }
  const int64_t y_numel = c10::multiply_integers(
      conv_output_shape(x, weight, stride, padding, dilation));
  return y_numel < 16 * weight.numel();
}

// The largest output whose residual add rides in oneDNN's binary post-op.
// Above a few MiB the post-op stalls on the residual's read: 1.97x the conv
// alone against 1.46x for conv + pass (1x1 64->256 56x56, batch 8), while at
// batch 1 it wins (1.12x against 1.37x). The prepared path's
// BINARY_POST_OP_MAX_BYTES (resnet_fused/inference.py) is the same rule.
constexpr int64_t kBinaryPostOpMaxBytes = int64_t{4} << 20;

} // namespace

at::Tensor onednn_conv_bias_add_relu(
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
  if (!onednn_takes(x.scalar_type())) {
    return at::Tensor();
  }
  const auto fmt = output_memory_format(x);
  // torch's binary (residual-add) op fuses only channels_last and ungrouped
  // convs; else it runs conv, add and ReLU as ATen ops, no better than conv +
  // our pass (and its add_relu_ has no bf16 kernel: the call would throw after
  // the conv). Neither does it pay on a large output (kBinaryPostOpMaxBytes).
  if (residual.has_value() &&
      (fmt != at::MemoryFormat::ChannelsLast || groups != 1 ||
       residual->numel() * residual->element_size() > kBinaryPostOpMaxBytes)) {
    return at::Tensor();
  }
  const bool fused = relu && fuse_relu();
  if (relu && !fused &&
      pass_takes_epilogue(
          x, weight, residual, scale, stride, padding, dilation)) {
    return at::Tensor();
  }
  if (!aten_picks_onednn(x, weight, stride, padding, dilation, groups)) {
    return at::Tensor();
  }
  // conv(x, w) * s + b == conv(x, w * s) + b: the scale rides in the weight,
  // but not in fp16, whose range w * s may leave where conv(x, w) * s stays
  // inside, and only where w * s comes out finite: an infinite s, or a huge
  // finite one times a large weight, makes filter entries +-inf, whose sums
  // of +inf and -inf are NaN where conv(x, w) * s is +-inf or finite.
  if (scale.has_value() && x.scalar_type() == at::kHalf) {
    return at::Tensor();
  }
  const at::Tensor w = canonical_strides(
      scale.has_value() ? weight * scale->view({-1, 1, 1, 1})
                        : weight.contiguous(weight.suggest_memory_format()));
  if (scale.has_value() && !finite_by_sum(w)) {
    return at::Tensor();
  }
  const at::Tensor xc = canonical_strides(x.contiguous(fmt));
  // oneDNN reads the bias as a dense (K,) vector: a strided or expanded one
  // must be copied.
  const std::optional<at::Tensor> b =
      bias.has_value() ? std::optional<at::Tensor>(bias->contiguous())
                       : std::nullopt;
  const auto& unary = unary_op();
  const auto& binary = binary_op();
  at::Tensor y;
  try {
    if (residual.has_value()) {
      y = binary.call(
          xc, canonical_strides(residual->contiguous(fmt)), w, b, padding,
          stride, dilation, groups, "add", at::Scalar(1.0),
          fused ? std::optional<std::string_view>("relu") : std::nullopt,
          ScalarList(), std::nullopt);
    } else {
      y = unary.call(
          xc, w, b, padding, stride, dilation, groups,
          fused ? "relu" : "none", ScalarList(), std::nullopt);
    }
  } catch (const c10::OutOfMemoryError&) {
    throw;
  } catch (const c10::Error&) {
    return at::Tensor(); // refused by oneDNN: the conv + epilogue pass runs
  }
  if (!y.is_contiguous(fmt)) {
    y = y.contiguous(fmt);
  }
  if (relu && !fused) {
    y.relu_();
  }
  return y;
}

} // namespace resnet_fused::cpu

