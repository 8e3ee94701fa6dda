// Schema of the fused op and the pieces every backend shares. The Python
// module _C is only a loader: importing it runs the static registrations.
#include <Python.h>

#include <ATen/MemoryOverlap.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/accumulate.h>
#include <c10/util/safe_numerics.h>
#include <c10/util/strides.h>
#include <torch/library.h>

#include <cmath>
#include <sstream>
#include <string>
#include <string_view>

#include "conv_bias_add_relu.h"

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace resnet_fused {

namespace {

// Shapes and dtypes as Python prints them, so the C++ op's messages match the
// Python contract's word for word: (2, 6) and torch.float32.
std::string py_shape(at::IntArrayRef v) {
  std::string s = "(";
  for (size_t i = 0; i < v.size(); ++i) {
    s += (i ? ", " : "") + std::to_string(v[i]);
  }
  return s + (v.size() == 1 ? ",)" : ")");
}

std::string py_dtype(at::ScalarType t) {
  return "torch." + std::string(c10::getDtypeNames(t).first);
}

void check_pair(at::IntArrayRef v, const char* name, int64_t min_value) {
  TORCH_CHECK_VALUE(
      v.size() == 2, name, ": expected 2 values, got ", v.size());
  for (auto e : v) {
    TORCH_CHECK_VALUE(
        e >= min_value, name, ": expected values >= ", min_value, ", got ",
        py_shape(v));
  }
}

// The dtypes every kernel takes (isFloatingType also admits the float8s).
bool supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf ||
      t == at::kBFloat16;
}

// t (when given) on x's device and of x's dtype; `like` names x in messages.
void check_like_x(
    const std::optional<at::Tensor>& t,
    const char* name,
    const at::Tensor& x,
    const char* like = "x") {
  if (!t.has_value()) {
    return;
  }
  TORCH_CHECK_VALUE(
      t->device() == x.device(), name, ": expected device ", x.device(), " (",
      like, "'s), got ", t->device());
  TORCH_CHECK_TYPE(
      t->scalar_type() == x.scalar_type(), name, ": expected dtype ",
      py_dtype(x.scalar_type()), " (", like, "'s), got ",
      py_dtype(t->scalar_type()));
}

// bias and scale (when given) of shape (k,).
void check_channel_vectors(
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& scale,
    int64_t k) {
  for (const auto& [t, name] :
       {std::pair{&bias, "bias"}, std::pair{&scale, "scale"}}) {
    if (t->has_value()) {
      TORCH_CHECK_VALUE(
          (*t)->dim() == 1 && (*t)->size(0) == k, name, ": expected shape (",
          k, ",), got ", py_shape((*t)->sizes()));
    }
  }
}

// The op has no forward-mode (jvp) rule, and torch.library would drop a dual
// tensor's tangent without a word; refuse it instead. Forward AD has one
// level, 0 (torch refuses nested levels).
void check_no_tangent(const std::optional<at::Tensor>& t, const char* name) {
  if (std::string_view(name) == "scale") {
    TORCH_CHECK_NOT_IMPLEMENTED(
        !t.has_value() || !t->_fw_grad(/*level=*/0).defined(),
        "scale: expected a constant without a forward-mode tangent (like a "
        "frozen BatchNorm's, it gets no derivative), got a dual tensor. Detach "
        "it or keep it as a buffer.");
    return;
  }
  TORCH_CHECK_NOT_IMPLEMENTED(
      !t.has_value() || !t->_fw_grad(/*level=*/0).defined(), name,
      ": expected a tensor without a forward-mode tangent (the fused op has no "
      "jvp rule), got a dual tensor. resnet_fused.conv_bias_add_relu(..., "
      "backend='auto') computes forward-mode AD through the unfused ops.");
}

// The op's derivative is registered from Python (import resnet_fused), whose
// autograd kernel calls this one below autograd. Reached with autograd still
// active, a call came through torch's fallback (the library loaded alone, or
// the backward op called directly): the ATen conv inside would record a graph
// without the epilogue, and its gradients would be wrong.
void check_not_recorded(
    std::initializer_list<std::pair<const std::optional<at::Tensor>*, const char*>>
        inputs,
    const char* why) {
  if (!at::GradMode::is_enabled() ||
      c10::impl::tls_is_dispatch_keyset_excluded(
          c10::autograd_dispatch_keyset)) {
    return;
  }
  for (const auto& [t, name] : inputs) {
    TORCH_CHECK_NOT_IMPLEMENTED(
        !t->has_value() || !(*t)->requires_grad(), name,
        ": expected a tensor that does not require grad here, got "
        "requires_grad=True (",
        why, ")");
  }
}

} // namespace

void check_conv_bias_add_relu_args(
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& scale,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups) {
  TORCH_CHECK_VALUE(
      x.dim() == 4, "x: expected a 4-D tensor (N, C, H, W), got ", x.dim(),
      "-D with shape ", py_shape(x.sizes()));
  TORCH_CHECK_VALUE(
      weight.dim() == 4, "weight: expected a 4-D tensor (K, C/groups, R, S), got ",
      weight.dim(), "-D with shape ", py_shape(weight.sizes()));
  TORCH_CHECK_TYPE(
      supported_float(x.scalar_type()),
      "x: expected a floating dtype (float32, float16, bfloat16, float64), got ",
      py_dtype(x.scalar_type()));
  TORCH_CHECK_VALUE(
      x.size(1) >= 1, "x: expected at least 1 input channel, got C=", x.size(1));
  TORCH_CHECK_VALUE(  // as ATen's conv2d refuses
      weight.size(0) >= 1,
      "weight: expected at least 1 output channel, got K=", weight.size(0));
  TORCH_CHECK_VALUE(  // as ATen's conv2d refuses
      x.size(2) >= 1 && x.size(3) >= 1,
      "x: expected a spatial size (H, W) >= 1, got (", x.size(2), ", ",
      x.size(3), ")");
  TORCH_CHECK_VALUE(
      weight.size(2) >= 1 && weight.size(3) >= 1,
      "weight: expected a kernel size (R, S) >= 1, got (", weight.size(2), ", ",
      weight.size(3), ")");
  check_like_x(weight, "weight", x);
  check_like_x(bias, "bias", x);
  check_like_x(residual, "residual", x);
  check_like_x(scale, "scale", x);
  check_pair(stride, "stride", 1);
  check_pair(padding, "padding", 0);
  check_pair(dilation, "dilation", 1);
  TORCH_CHECK_VALUE(groups >= 1, "groups: expected an int >= 1, got ", groups);

  const int64_t c = x.size(1);
  const int64_t k = weight.size(0);
  TORCH_CHECK_VALUE(
      c % groups == 0, "x: expected channels divisible by groups=", groups,
      ", got C=", c);
  TORCH_CHECK_VALUE(
      weight.size(1) * groups == c,
      "x: expected C = weight.shape[1] * groups = ", weight.size(1) * groups,
      " channels, got C=", c);
  TORCH_CHECK_VALUE(
      k % groups == 0, "weight: expected out channels divisible by groups=",
      groups, ", got K=", k);
  for (int d = 0; d < 2; ++d) {
    // Checked arithmetic: the schema takes any int64, and a wrapped sum would pass.
    int64_t padded = 0;
    const bool padded_overflows =
        c10::mul_overflows(padding[d], int64_t{2}, &padded) ||
        c10::add_overflows(padded, x.size(2 + d), &padded);
    TORCH_CHECK_VALUE(
        !padded_overflows, "padding: expected the padded input to fit in int64, got padding ", padding[d],
        " on size ", x.size(2 + d), " in dim ", 2 + d);
    int64_t extent = 0;
    const bool extent_overflows =
        c10::mul_overflows(dilation[d], weight.size(2 + d) - 1, &extent) ||
        c10::add_overflows(extent, int64_t{1}, &extent);
    TORCH_CHECK_VALUE(
        !extent_overflows && extent <= padded,
        "weight: expected a (dilated) kernel no larger than the padded input, got kernel extent ",
        extent_overflows ? std::string(">9223372036854775807") : std::to_string(extent), " > padded input ",
        padded, " in dim ", 2 + d);
  }
  check_channel_vectors(bias, scale, k);
  const auto out_shape =
      conv_output_shape(x, weight, stride, padding, dilation);
  // N * K * P * Q must fit the int64 sizes every kernel and allocation uses;
  // a wrapped product would read as an empty (or small) output.
  int64_t numel = 1;
  bool numel_overflows = false;
  for (const int64_t size : out_shape) {
    numel_overflows = numel_overflows || c10::mul_overflows(numel, size, &numel);
  }
  TORCH_CHECK_VALUE(
      !numel_overflows,
      "x, weight and padding: expected an output (N, K, P, Q) of at most "
      "2**63-1 elements, got shape ",
      py_shape(out_shape));
  if (residual.has_value()) {
    TORCH_CHECK_VALUE(
        residual->sizes() == at::IntArrayRef(out_shape),
        "residual: expected the output's shape ", py_shape(out_shape),
        ", got ", py_shape(residual->sizes()));
  }
}

void check_conv_bias_add_relu_backward_args(
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
  check_conv_bias_add_relu_args(
      x, weight, std::nullopt, std::nullopt, scale, stride, padding, dilation,
      groups);
  const auto shape = conv_output_shape(x, weight, stride, padding, dilation);
  std::vector<std::pair<const at::Tensor*, const char*>> grads{
      {&grad_out, "grad_out"}};
  if (relu) {
    grads.emplace_back(&out, "out");
  }
  for (const auto& [t, name] : grads) {
    TORCH_CHECK_VALUE(
        t->sizes() == at::IntArrayRef(shape), name,
        ": expected the output's shape ", py_shape(shape), ", got ",
        py_shape(t->sizes()));
    check_like_x(*t, name, x);
  }
  if (output_mask.size() != 4) {
    std::ostringstream got;
    for (size_t i = 0; i < output_mask.size(); ++i) {
      got << (i ? ", " : "") << (output_mask.get(i) ? "True" : "False");
    }
    TORCH_CHECK_VALUE(
        false,
        "output_mask: expected 4 bools (x, weight, bias, residual), got [",
        got.str(), "]");
  }
  TORCH_CHECK_VALUE(
      relu || !output_mask.get(3),
      "output_mask: grad_residual is grad_out itself when relu=False; "
      "expected output_mask[3]=false, got true");
}

std::vector<int64_t> conv_output_shape(
    const at::Tensor& x,
    const at::Tensor& weight,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation) {
  std::vector<int64_t> shape{x.size(0), weight.size(0)};
  for (int d = 0; d < 2; ++d) {
    shape.push_back(
        (x.size(2 + d) + 2 * padding[d] -
         dilation[d] * (weight.size(2 + d) - 1) - 1) /
            stride[d] +
        1);
  }
  return shape;
}

at::MemoryFormat output_memory_format(const at::Tensor& x) {
  return x.suggest_memory_format();
}

at::Tensor canonical_strides(const at::Tensor& t) {
  if (t.dim() != 4) {
    return t;
  }
  // The suggested format first: a tensor with size-1 dims can be dense in
  // both. An odd stride of a size-1 dim can hide the format from the
  // suggestion (not from is_contiguous): ATen may then run the conv in the
  // other layout than the output's, at the cost of a copy.
  auto fmt = t.suggest_memory_format();
  if (!t.is_contiguous(fmt)) {
    fmt = t.is_contiguous(at::MemoryFormat::ChannelsLast)
        ? at::MemoryFormat::ChannelsLast
        : at::MemoryFormat::Contiguous;
    if (!t.is_contiguous(fmt)) {
      return t;
    }
  }
  const c10::DimVector strides = fmt == at::MemoryFormat::ChannelsLast
      ? c10::DimVector(c10::get_channels_last_strides_2d(t.sizes()))
      : c10::contiguous_strides(t.sizes());
  return t.strides() == at::IntArrayRef(strides)
      ? t
      : t.as_strided(t.sizes(), strides, t.storage_offset());
}

bool finite_by_sum(const at::Tensor& t) {
  // fp16 summed in float: an fp16 sum past 65504 says nothing of its
  // elements. (bf16 has float's range, and its sum accumulates in float.)
  const auto dtype =
      t.scalar_type() == at::kHalf ? at::kFloat : t.scalar_type();
  return std::isfinite(at::sum(t, dtype).item<double>());
}

at::Tensor aten_conv(
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups) {
  const auto fmt = output_memory_format(x);
  at::Tensor y = at::convolution(
      canonical_strides(x), canonical_strides(weight), bias, stride, padding,
      dilation, /*transposed=*/false, /*output_padding=*/{0, 0}, groups);
  // ATen may pick another layout (e.g. for a channels_last weight); keep x's.
  return y.is_contiguous(fmt) ? y : y.contiguous(fmt);
}

std::tuple<at::Tensor, at::Tensor> conv2d_backward(
    const at::Tensor& g,
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& scale,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups,
    bool need_grad_x,
    bool need_grad_weight,
    bool g_is_scratch) {
  at::Tensor grad_x, grad_weight;
  if (need_grad_x || need_grad_weight) {
    // d(conv(x, w) * s) is the conv backward of g * s, or equally dgrad with
    // w * s and wgrad scaled by s after. The scaled copy is a temporary beside
    // every saved activation, so scale the smaller of g and w: g in late
    // layers, where a 3x3 512-channel weight is 9 MB and g under 1 MB. A
    // scratch g is scaled in place, so the peak holds no copy at all. fp16
    // always scales g, as the unfused backward does: its narrow range lets
    // w * s, or the unscaled wgrad, overflow where g * s does not. So does a
    // scale on a GPU: whether w * s is finite (below) would cost a sync.
    bool scale_g = scale.has_value() &&
        (g.numel() <= weight.numel() || g.scalar_type() == at::kHalf ||
         !scale->is_cpu());
    at::Tensor ws;
    if (!scale_g && scale.has_value()) {
      // So does a non-finite s, or a w * s that overflows: the unfused
      // backward sums g * s * x, NaN where s * sum(g * x) is +-inf, and
      // feeds its dgrad g * s, finite where w * s is not. Checked on CPU,
      // where reading the result costs no device sync.
      if (need_grad_x) {
        ws = weight * scale->view({-1, 1, 1, 1});
        scale_g = !finite_by_sum(ws); // s finite if ws is
        if (scale_g) {
          ws = at::Tensor(); // not held through the conv backward
        }
      } else {
        scale_g = !finite_by_sum(*scale);
      }
    }
    const bool scale_w = scale.has_value() && !scale_g;
    const at::Tensor gs = !scale_g ? g
        : g_is_scratch             ? g.mul_(scale->view({1, -1, 1, 1}))
                                   : g * scale->view({1, -1, 1, 1});
    if (scale_w && need_grad_x && !ws.defined()) {
      ws = weight * scale->view({-1, 1, 1, 1});
    }
    const at::Tensor& w = scale_w && need_grad_x ? ws : weight;
    std::tie(grad_x, grad_weight, std::ignore) = at::convolution_backward(
        canonical_strides(gs), canonical_strides(x), canonical_strides(w),
        /*bias_sizes=*/std::nullopt, stride, padding, dilation,
        /*transposed=*/false, /*output_padding=*/{0, 0}, groups,
        {need_grad_x, need_grad_weight, false});
    if (need_grad_weight && scale_w) {
      grad_weight.mul_(scale->view({-1, 1, 1, 1}));
      // The unscaled sum may overflow where the unfused sum(g * s * x) does
      // not (|s| < 1; s = 0 gives inf * 0 = NaN): then it is taken from g * s,
      // as the unfused backward does. On CPU (scale_w), where it costs no sync;
      // a NaN or Inf in x or g (a diverging run) pays for a second wgrad too.
      if (!finite_by_sum(grad_weight)) {
        grad_weight = std::get<1>(at::convolution_backward(
            canonical_strides(g * scale->view({1, -1, 1, 1})),
            canonical_strides(x), canonical_strides(weight),
            /*bias_sizes=*/std::nullopt, stride, padding, dilation,
            /*transposed=*/false, /*output_padding=*/{0, 0}, groups,
            {false, true, false}));
      }
    }
  }
  // Fixed layouts (x's and weight's), whatever the conv backend picked, so
  // the fake kernels can state them.
  auto empty = [&]() { return at::empty({0}, x.options()); };
  return {
      need_grad_x ? grad_x.contiguous(output_memory_format(x)) : empty(),
      need_grad_weight
          ? grad_weight.contiguous(weight.suggest_memory_format())
          : empty()};
}

std::tuple<int64_t, int64_t, int64_t> rows_k_inner(
    const at::Tensor& t,
    at::MemoryFormat fmt) {
  const int64_t n = t.size(0), k = t.size(1), hw = t.size(2) * t.size(3);
  if (fmt == at::MemoryFormat::ChannelsLast) {
    return {n * hw, k, 1};
  }
  return {n, k, hw};
}

at::Tensor run_conv_bias_add_relu(
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& scale,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups,
    bool relu,
    EpiloguePass epilogue_pass,
    FusedForward fused_forward,
    bool bias_in_conv) {
  check_conv_bias_add_relu_args(
      x, weight, bias, residual, scale, stride, padding, dilation, groups);
  check_no_tangent(x, "x");
  check_no_tangent(weight, "weight");
  check_no_tangent(bias, "bias");
  check_no_tangent(residual, "residual");
  check_no_tangent(scale, "scale");
  const std::optional<at::Tensor> x_opt(x), weight_opt(weight);
  check_not_recorded(
      {{&x_opt, "x"},
       {&weight_opt, "weight"},
       {&bias, "bias"},
       {&residual, "residual"},
       {&scale, "scale"}},
      "resnet_fused::conv_bias_add_relu has no autograd formula in this "
      "process: loading the library alone registers none; import resnet_fused "
      "for its gradients, or call it under torch.no_grad()");
  const auto fmt = output_memory_format(x);
  const auto shape = conv_output_shape(x, weight, stride, padding, dilation);
  if (c10::multiply_integers(shape) == 0) {
    return at::empty(shape, x.options().memory_format(fmt));
  }
  if (fused_forward != nullptr) {
    at::Tensor y = fused_forward(
        x, weight, bias, residual, scale, stride, padding, dilation, groups,
        relu);
    if (y.defined()) {
      return y;
    }
  }
  const bool conv_bias = bias_in_conv && !scale.has_value();
  at::Tensor y = aten_conv(
      x, weight, conv_bias ? bias : std::nullopt, stride, padding, dilation,
      groups);
  const std::optional<at::Tensor> pass_bias =
      conv_bias ? std::nullopt : bias;
  if (pass_bias.has_value() || residual.has_value() || scale.has_value() ||
      relu) {
    const at::Tensor res =
        residual.has_value() ? residual->contiguous(fmt) : at::Tensor();
    epilogue_pass(y, res, scale, pass_bias, relu, fmt);
  }
  return y;
}

void run_epilogue_(
    const at::Tensor& y,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& scale,
    bool relu,
    EpiloguePass epilogue_pass) {
  // As every in-place op: an inference tensor (which dispatches straight
  // here, with no autograd keys) changes only inside inference mode.
  TORCH_CHECK(
      !y.is_inference() || c10::InferenceMode::is_enabled(),
      "y: expected a tensor that may be changed in place here, got an "
      "inference tensor outside torch.inference_mode() (in-place updates to "
      "inference tensors are allowed only inside it)");
  // In place on a dual y the tangent would go stale; the others' be dropped.
  check_no_tangent(y, "y");
  check_no_tangent(bias, "bias");
  check_no_tangent(residual, "residual");
  check_no_tangent(scale, "scale");
  TORCH_CHECK_VALUE(
      y.dim() == 4, "y: expected a 4-D tensor (N, K, P, Q), got ", y.dim(),
      "-D with shape ", py_shape(y.sizes()));
  TORCH_CHECK_TYPE(
      supported_float(y.scalar_type()),
      "y: expected a floating dtype (float32, float16, bfloat16, float64), got ",
      py_dtype(y.scalar_type()));
  // The pass walks y as one dense block in either layout.
  const bool nchw = y.is_contiguous();
  TORCH_CHECK_VALUE(
      nchw || y.is_contiguous(at::MemoryFormat::ChannelsLast),
      "y: expected a tensor contiguous in NCHW or channels_last (written in "
      "place), got strides ",
      py_shape(y.strides()), " for shape ", py_shape(y.sizes()));
  const int64_t k = y.size(1);
  check_channel_vectors(bias, scale, k);
  if (residual.has_value()) {
    TORCH_CHECK_VALUE(
        residual->sizes() == y.sizes(), "residual: expected y's shape ",
        py_shape(y.sizes()), ", got ", py_shape(residual->sizes()));
  }
  for (const auto& [t, name] :
       {std::pair{&bias, "bias"}, std::pair{&residual, "residual"},
        std::pair{&scale, "scale"}}) {
    check_like_x(*t, name, y, "y");
    if (t->has_value()) {
      TORCH_CHECK_VALUE(
          at::get_overlap_status(y, **t) != at::MemOverlapStatus::Partial,
          name, ": expected memory apart from y's, or y itself (y is written "
          "in place), got a partial overlap with y");
    }
  }
  if (y.numel() == 0 ||
      !(bias.has_value() || residual.has_value() || scale.has_value() ||
        relu)) {
    return;
  }
  const auto fmt =
      nchw ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
  const at::Tensor res =
      residual.has_value() ? residual->contiguous(fmt) : at::Tensor();
  epilogue_pass(y, res, scale, bias, relu, fmt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
run_conv_bias_add_relu_backward(
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
    const c10::List<bool>& output_mask,
    BackwardPass backward_pass) {
  check_conv_bias_add_relu_backward_args(
      grad_out, out, x, weight, scale, stride, padding, dilation, groups, relu,
      output_mask);
  check_no_tangent(grad_out, "grad_out");
  check_no_tangent(out, "out");
  check_no_tangent(x, "x");
  check_no_tangent(weight, "weight");
  check_no_tangent(scale, "scale");
  const std::optional<at::Tensor> grad_out_opt(grad_out), out_opt(out),
      x_opt(x), weight_opt(weight);
  check_not_recorded(
      {{&grad_out_opt, "grad_out"},
       {&out_opt, "out"},
       {&x_opt, "x"},
       {&weight_opt, "weight"},
       {&scale, "scale"}},
      "resnet_fused::conv_bias_add_relu_backward has no derivative of its "
      "own; call it under torch.no_grad()");
  const bool need_x = output_mask.get(0), need_w = output_mask.get(1),
             need_b = output_mask.get(2), need_r = output_mask.get(3);
  const auto fmt = output_memory_format(x);
  auto empty = [&]() { return at::empty({0}, x.options()); };
  if (grad_out.numel() == 0) {
    // Nothing flows back: every requested gradient is zero (and conv
    // backends need not handle an empty batch).
    return {
        need_x ? at::zeros_like(x, fmt) : empty(),
        // The weight's layout as the non-empty path gives it (and the fake
        // states), not its strides: zeros_like keeps a permuted order.
        need_w ? at::zeros_like(weight, weight.suggest_memory_format())
               : empty(),
        need_b ? at::zeros({weight.size(0)}, x.options()) : empty(),
        need_r ? at::zeros(grad_out.sizes(), x.options().memory_format(fmt))
               : empty()};
  }
  const at::Tensor grad = grad_out.contiguous(fmt);
  // Without ReLU the mask is the identity: g is grad itself.
  const bool need_g = relu && (need_x || need_w || need_r);
  const at::Tensor g = need_g ? at::empty_like(grad, fmt) : grad;
  const at::Tensor grad_bias =
      need_b ? at::empty({weight.size(0)}, x.options()) : at::Tensor();
  if (need_g || need_b) {
    backward_pass(
        grad, relu ? out.contiguous(fmt) : at::Tensor(),
        need_g ? g : at::Tensor(), grad_bias, relu, fmt);
  }
  // g is ours to overwrite unless it is grad_out itself or returned.
  auto [grad_x, grad_weight] = conv2d_backward(
      g, x, weight, scale, stride, padding, dilation, groups, need_x, need_w,
      /*g_is_scratch=*/need_g && !need_r);
  return {
      grad_x, grad_weight, need_b ? grad_bias : empty(), need_r ? g : empty()};
}

namespace {

const auto& epilogue_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("resnet_fused::_epilogue_", "")
          .typed<void(
              const at::Tensor&, const std::optional<at::Tensor>&,
              const std::optional<at::Tensor>&,
              const std::optional<at::Tensor>&, bool)>();
  return op;
}

// _epilogue_ has no derivative: it serves inference, on a conv output the
// caller made. Refuse what autograd would have to record.
void epilogue_autograd_(
    const at::Tensor& y,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& scale,
    bool relu) {
  if (at::GradMode::is_enabled()) {
    for (const auto& [t, name] :
         {std::pair{std::optional<at::Tensor>(y), "y"},
          std::pair{bias, "bias"}, std::pair{residual, "residual"},
          std::pair{scale, "scale"}}) {
      TORCH_CHECK_NOT_IMPLEMENTED(
          !t.has_value() || !t->requires_grad(), name,
          ": expected a tensor that does not require grad (_epilogue_ has no "
          "derivative), got requires_grad=True; call it under torch.no_grad()");
    }
  }
  at::AutoDispatchBelowAutograd guard;
  epilogue_op().call(y, bias, residual, scale, relu);
}

// Bump y's version as every in-place op does, so a saved y is caught as
// modified. Here rather than in the Autograd kernel: inference mode skips
// that one, but not this one, for a tensor made outside it. An inference
// tensor (no version counter) comes here only outside inference mode, where
// run_epilogue_ refuses it before the bump.
void epilogue_ad_inplace_or_view_(
    const at::Tensor& y,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& scale,
    bool relu) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    epilogue_op().call(y, bias, residual, scale, relu);
  }
  y.unsafeGetTensorImpl()->bump_version();
}

} // namespace

TORCH_LIBRARY(resnet_fused, m) {
  m.def(
      "conv_bias_add_relu(Tensor x, Tensor weight, Tensor? bias, "
      "Tensor? residual, Tensor? scale, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, bool relu) -> Tensor");
  // output_mask: (x, weight, bias, residual). Unrequested grads are empty.
  // bool[], not bool[4]: the dispatcher's own length error names no argument.
  m.def(
      "conv_bias_add_relu_backward(Tensor grad_out, Tensor out, Tensor x, "
      "Tensor weight, Tensor? scale, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, bool relu, bool[] output_mask) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
  // The epilogue pass alone, in place on a conv's fresh output: for callers
  // that run the conv themselves (prepared inference's packed oneDNN conv).
  m.def(
      "_epilogue_(Tensor(a!) y, Tensor? bias, Tensor? residual, "
      "Tensor? scale, bool relu) -> ()");
}

TORCH_LIBRARY_IMPL(resnet_fused, Autograd, m) {
  m.impl("_epilogue_", &epilogue_autograd_);
}

TORCH_LIBRARY_IMPL(resnet_fused, ADInplaceOrView, m) {
  m.impl("_epilogue_", &epilogue_ad_inplace_or_view_);
}

} // namespace resnet_fused
