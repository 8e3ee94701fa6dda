"""The op contract: what every backend of the fused op agrees on. Depends on torch only.

Names, used with one meaning from the C++ and Triton kernels to the modules, tests and benchmarks:

- **op**: ``conv_bias_add_relu``, ``y = act(conv2d(x, weight) * scale + bias + residual)``. Its backward op is
  ``conv_bias_add_relu_backward``. A backend whose kernels are a separate dispatcher op appends its name
  (``conv_bias_add_relu_triton``).
- **epilogue**: the per-element math after the conv, ``act(acc * scale + bias + residual)``. Its options are
  ``bias``, ``scale``, ``residual`` and ``relu`` (``act`` is ReLU when ``relu`` is true, else the identity).
- **scale_shift**: a module's frozen per-channel ``(scale, shift)`` pair, e.g. a folded BatchNorm; it reaches the op
  as ``scale`` and part of ``bias``. ``scale`` is a constant: it gets no gradient.
- **mask**: the ReLU's gradient mask, taken from the saved output ``y`` (``y <= 0`` blocks the gradient), never
  from a saved pre-activation.
- **forward** / **backward**: the two ops of a backend. Inside the backward, **dgrad** is ``grad_x`` and **wgrad**
  is ``grad_weight`` (with ``grad_bias`` and ``grad_residual`` from the same reads of the masked gradient).
- **backend**: one row of :mod:`resnet_fused.backends`' table.

Argument lists, the same for every backend's ops::

    forward (x, weight, bias, residual, scale, stride, padding, dilation, groups, relu) -> y
    backward(grad_out, out, x, weight, scale, stride, padding, dilation, groups, relu, output_mask)
        -> (grad_x, grad_weight, grad_bias, grad_residual)

Shapes: x (N, C, H, W), weight (K, C/groups, R, S), bias and scale (K,), residual, y, grad_out and out
(N, K, P, Q). ``output_mask`` is (x, weight, bias, residual); a gradient not asked for comes back empty.
y and every gradient of an activation take x's memory format (NCHW or channels_last).

This module holds the argument checks, the conv geometry, the fake kernels, the shared autograd and the autocast
rule. The C++ op checks its arguments with the same messages (csrc/conv_bias_add_relu.cpp).
"""

from __future__ import annotations

import contextlib
import math
import operator
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from packaging.version import Version
from torch import Tensor

# The oldest torch with every torch.library API used here (custom_op, register_fake/autograd, opcheck).
MIN_TORCH = "2.6"
if Version(torch.__version__).release < Version(MIN_TORCH).release:  # a 2.6 pre-release or dev build counts as 2.6
    raise ImportError(f"resnet_fused needs torch>={MIN_TORCH}; found torch {torch.__version__}")

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
IntPair = int | tuple[int, int] | Sequence[int]


# ---- conv geometry ----


def _as_int(v: object) -> int | None:
    """``v`` as a Python int if it is an integer (an int, a NumPy integer: anything with ``__index__``), else None.
    Bools and tensors are not integers here."""
    if type(v) is int:
        return v
    # Asked of the type, not by catching operator.index's TypeError: dynamo (torch 2.11) does not trace that except.
    if isinstance(v, (bool, Tensor)) or not hasattr(type(v), "__index__"):
        return None
    return operator.index(v)


def pair(value: IntPair, name: str, min_value: int, op: bool = False) -> tuple[int, int]:
    """``value`` as an (h, w) pair of ints >= ``min_value``; the error names ``name``. As ``F.conv2d``, an integer or
    a sequence of one or two integers; with ``op``, the ops' ``int[]``, exactly two (as the C++ ops check)."""
    if op and len(value) != 2:
        raise ValueError(f"{name}: expected 2 values, got {len(value)}")
    single = _as_int(value)
    if single is not None:
        result = (single, single)
    elif isinstance(value, (tuple, list, torch.Size)) and len(value) in (1, 2):
        ints = [_as_int(v) for v in value]
        if None in ints:
            raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}")
        result = (ints[0], ints[-1])
    else:
        raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}")
    if min(result) < min_value:
        raise ValueError(f"{name}: expected values >= {min_value}, got {result}")
    if max(result) > _INT64_MAX:  # the ops take int64
        raise ValueError(f"{name}: expected values <= {_INT64_MAX}, got {result}")
    return result


_INT64_MAX = 2**63 - 1

try:  # torch >= 2.8
    from torch.fx.experimental.symbolic_shapes import guard_or_false as _guard_or_false
except ImportError:
    _guard_or_false = None
# torch >= 2.10 has only the first name, earlier versions only the second; on concrete ints both answer alike.
_strides_like_channels_last = getattr(torch._prims_common, "are_strides_like_channels_last_or_false", None) or getattr(
    torch._prims_common, "are_strides_like_channels_last", None
)


def conv_output_shape(
    x_shape: Sequence[int],
    weight_shape: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> list[int]:
    """(N, K, P, Q) of conv2d for x (N, C, H, W) and weight (K, C/groups, R, S); conv arguments as pairs."""
    spatial = [
        (x_shape[2 + d] + 2 * padding[d] - dilation[d] * (weight_shape[2 + d] - 1) - 1) // stride[d] + 1
        for d in range(2)
    ]
    return [x_shape[0], weight_shape[0], *spatial]


def memory_format(t: Tensor) -> torch.memory_format:
    """The memory format y and the activation gradients take from x: channels_last or contiguous."""
    fmt = torch._prims_common.suggest_memory_format(t)
    if (
        fmt == torch.contiguous_format
        and t.dim() == 4
        and _guard_or_false is not None
        and t._has_symbolic_sizes_strides
    ):
        # A data-dependent (unbacked) batch: torch's rule cannot decide and says contiguous, where the kernels see
        # channels_last. The batch's size does not change the rule's answer past 1, so ask it for a batch of 2;
        # with symbolic C, H or W strides, read them as a dense channels_last tensor's (where both fit, contiguous).
        (c, h, w), strides = t.shape[1:], t.stride()
        if all(type(v) is int for v in (c, h, w, *strides)):
            like = _strides_like_channels_last((2, c, h, w), strides)
            return torch.channels_last if like else fmt
        sc, sh, sw = strides[1:]
        channels_last = all(_guard_or_false(a == b) for a, b in ((sc, 1), (sw, c), (sh, w * c)))
        contiguous = all(_guard_or_false(a == b) for a, b in ((sw, 1), (sh, w), (sc, h * w)))
        if channels_last and not contiguous:
            return torch.channels_last
    return fmt


# ---- argument checks: each message names the argument, the expected value and the actual one ----


def _check_tensor(name: str, t: object, x: Tensor | None, optional: bool, like: str = "x") -> None:
    if t is None and optional:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a Tensor{' or None' if optional else ''}, got {type(t).__name__}")
    if t.layout != torch.strided:  # the dispatcher would refuse it without naming it
        raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {t.layout}")
    if t.is_nested:  # a nested tensor's layout reads strided, but it has no sizes to check
        raise TypeError(f"{name}: expected a dense (strided) tensor, got a nested tensor")
    if t.is_quantized:
        raise TypeError(f"{name}: expected a dense (strided) tensor of floats, got a quantized tensor ({t.dtype})")
    if x is None:
        return
    if t.device != x.device:
        raise ValueError(f"{name}: expected device {x.device} ({like}'s), got {t.device}")
    if t.dtype != x.dtype:
        raise TypeError(f"{name}: expected dtype {x.dtype} ({like}'s), got {t.dtype}")


def check_inputs(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor | None,
    scale: Tensor | None,
    stride: IntPair,
    padding: IntPair,
    dilation: IntPair,
    groups: int,
    relu: bool = True,
    op: bool = False,
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Validate the forward's arguments; returns ``(stride, padding, dilation)`` as pairs. ``op``: the arguments of
    an op (``int[]`` pairs of exactly two values), not of the public function."""
    if torch.jit.is_tracing():  # (dynamo folds this; it cannot trace torch._C._is_tracing)
        with quiet_tracer():
            return _check_inputs(x, weight, bias, residual, scale, stride, padding, dilation, groups, relu, op)
    return _check_inputs(x, weight, bias, residual, scale, stride, padding, dilation, groups, relu, op)


@contextlib.contextmanager
def quiet_tracer() -> Iterator[None]:
    """For argument checks under ``torch.jit.trace``: they only raise, and the trace records none of them, so its
    "might not generalize" warnings about their comparisons of traced sizes are noise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def _check_inputs(x, weight, bias, residual, scale, stride, padding, dilation, groups, relu, op):
    # In the C++ op's order (check_conv_bias_add_relu_args), so that an input with two faults gets the same message
    # from the op, its fake and this function.
    _check_tensor("x", x, None, optional=False)
    _check_tensor("weight", weight, None, optional=False)
    xs, ws = x.shape, weight.shape  # read once: every .shape builds a new torch.Size
    if len(xs) != 4:
        raise ValueError(f"x: expected a 4-D tensor (N, C, H, W), got {len(xs)}-D with shape {tuple(xs)}")
    if len(ws) != 4:
        raise ValueError(f"weight: expected a 4-D tensor (K, C/groups, R, S), got {len(ws)}-D with shape {tuple(ws)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x: expected a floating dtype (float32, float16, bfloat16, float64), got {x.dtype}")
    c, k = xs[1], ws[0]
    if c < 1:
        # ATen's conv2d returns a (N, 0, P, Q) output for C = 0, so there is no reference to agree with.
        raise ValueError(f"x: expected at least 1 input channel, got C={c}")
    if k < 1:
        raise ValueError(f"weight: expected at least 1 output channel, got K={k}")  # as conv2d refuses
    if xs[2] < 1 or xs[3] < 1:
        raise ValueError(f"x: expected a spatial size (H, W) >= 1, got {tuple(xs[2:])}")  # as conv2d refuses
    if ws[2] < 1 or ws[3] < 1:
        raise ValueError(f"weight: expected a kernel size (R, S) >= 1, got {tuple(ws[2:])}")
    for name, t in (("weight", weight), ("bias", bias), ("residual", residual), ("scale", scale)):
        _check_tensor(name, t, x, optional=name != "weight")
    stride = pair(stride, "stride", 1, op)
    padding = pair(padding, "padding", 0, op)
    dilation = pair(dilation, "dilation", 1, op)
    if _as_int(groups) is None or groups < 1:
        raise ValueError(f"groups: expected an int >= 1, got {groups!r}")
    if not isinstance(relu, bool):
        raise TypeError(f"relu: expected a bool, got {relu!r}")
    if c % groups:
        raise ValueError(f"x: expected channels divisible by groups={groups}, got C={c}")
    if ws[1] * groups != c:
        raise ValueError(f"x: expected C = weight.shape[1] * groups = {ws[1] * groups} channels, got C={c}")
    if k % groups:
        raise ValueError(f"weight: expected out channels divisible by groups={groups}, got K={k}")
    for d in range(2):
        padded = xs[2 + d] + 2 * padding[d]
        # A symbolic size is compared only where the padding alone could overflow: no guard on every compile.
        if (type(xs[2 + d]) is int or padding[d] > _INT64_MAX // 4) and padded > _INT64_MAX:
            raise ValueError(
                f"padding: expected the padded input to fit in int64, got padding {padding[d]} on size {xs[2 + d]} "
                f"in dim {2 + d}"
            )
        extent = dilation[d] * (ws[2 + d] - 1) + 1
        if extent > padded:
            raise ValueError(
                "weight: expected a (dilated) kernel no larger than the padded input, got kernel extent "
                f"{f'>{_INT64_MAX}' if extent > _INT64_MAX else extent} > padded input {padded} in dim {2 + d}"
            )
    for name, t in (("bias", bias), ("scale", scale)):
        if t is not None and t.shape != (k,):
            raise ValueError(f"{name}: expected shape ({k},), got {tuple(t.shape)}")
    out_shape = conv_output_shape(xs, ws, stride, padding, dilation)
    # Asked of the tensors (one attribute each), not of every size: this runs on every call.
    symbolic = torch.compiler.is_compiling() or x._has_symbolic_sizes_strides or weight._has_symbolic_sizes_strides
    if not symbolic and math.prod(out_shape) > _INT64_MAX:  # every kernel and allocation sizes the output in int64
        raise ValueError(
            f"x, weight and padding: expected an output (N, K, P, Q) of at most 2**63-1 elements, got shape "
            f"{tuple(out_shape)}"
        )
    if residual is not None:
        rs = list(residual.shape)
        said = "residual: expected the output's shape"
        symbolic = symbolic or residual._has_symbolic_sizes_strides
        if len(rs) != len(out_shape) or not symbolic or _guard_or_false is None:
            if rs != out_shape:
                raise ValueError(f"{said} {tuple(out_shape)}, got {tuple(rs)}")
        elif any(_guard_or_false(r != o) for r, o in zip(rs, out_shape, strict=True)):  # known to differ
            raise ValueError(f"{said} {tuple(out_shape)}, got {tuple(rs)}")
        else:  # a data-dependent (unbacked) size cannot be compared while tracing: asserted when the graph runs
            # Under Dynamo no message: strict export keeps a message closure as a graph constant and then fails on
            # it, and Dynamo 2.11 refuses a None message.
            dynamo = torch.compiler.is_dynamo_compiling()
            for r, o in zip(rs, out_shape, strict=True):
                if dynamo:
                    torch._check(r == o)
                else:
                    torch._check(r == o, lambda: said)
    return stride, padding, dilation


def check_backward_inputs(
    grad_out: Tensor,
    out: Tensor,
    x: Tensor,
    weight: Tensor,
    scale: Tensor | None,
    stride: IntPair,
    padding: IntPair,
    dilation: IntPair,
    groups: int,
    relu: bool,
    output_mask: Sequence[bool],
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Validate the backward op's arguments: the forward's, plus grad_out (and out, with relu) shaped like y."""
    stride, padding, dilation = check_inputs(
        x, weight, None, None, scale, stride, padding, dilation, groups, relu, op=True
    )
    check_no_tangent(grad_out=grad_out, out=out, x=x, weight=weight, scale=scale)
    shape = conv_output_shape(x.shape, weight.shape, stride, padding, dilation)
    for name, t in (("grad_out", grad_out), ("out", out))[: 2 if relu else 1]:
        _check_tensor(name, t, None, optional=False)  # a tensor, dense: then its shape, device and dtype, as in C++
        if list(t.shape) != shape:
            raise ValueError(f"{name}: expected the output's shape {tuple(shape)}, got {tuple(t.shape)}")
        _check_tensor(name, t, x, optional=False)
    if len(output_mask) != 4:
        raise ValueError(f"output_mask: expected 4 bools (x, weight, bias, residual), got {list(output_mask)}")
    if not relu and output_mask[3]:
        raise ValueError(
            "output_mask: grad_residual is grad_out itself when relu=False; expected output_mask[3]=false, got true"
        )
    return stride, padding, dilation


def check_scale_constant(scale: Tensor | None) -> None:
    """``scale`` gets no gradient, so autograd refuses one that requires it."""
    if scale is not None and scale.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "scale: expected a constant (requires_grad=False); like a frozen BatchNorm's it gets no gradient, "
            "got requires_grad=True. Detach it or keep it as a buffer."
        )


def _tangent(t: Tensor | None) -> bool:
    return t is not None and torch.autograd.forward_ad.unpack_dual(t).tangent is not None


def check_no_tangent(**tensors: Tensor | None) -> None:
    """The fused ops have no forward-mode (jvp) rule, and torch.library would drop a dual tensor's tangent without a
    word; refuse it instead. :func:`resnet_fused.conv_bias_add_relu` routes such calls to the unfused ops."""
    if torch.autograd.forward_ad._current_level < 0:  # no dual level entered: no tangents anywhere
        return
    for name, t in tensors.items():
        if name == "scale" and _tangent(t):
            raise NotImplementedError(
                "scale: expected a constant without a forward-mode tangent (like a frozen BatchNorm's, it gets no "
                "derivative), got a dual tensor. Detach it or keep it as a buffer."
            )
        if _tangent(t):
            raise NotImplementedError(
                f"{name}: expected a tensor without a forward-mode tangent (the fused op has no jvp rule), got a "
                "dual tensor. resnet_fused.conv_bias_add_relu(..., backend='auto') computes forward-mode AD through "
                "the unfused ops."
            )


# Whether any torch.func transform (vmap, grad, jvp, ...) is running; dynamo folds it while tracing.
functorch_active: Callable[[], bool] = torch._C._are_functorch_transforms_active


def differentiated_by_transform(*tensors: Tensor | None) -> bool:
    """Whether this call runs under forward-mode AD with a dual input, or under a ``torch.func`` transform that
    differentiates (grad, vjp, jvp, jacrev, jacfwd, hessian). torch.library custom ops support neither: ``jvp`` would
    silently give zero tangents, ``grad`` raises from inside torch. ``vmap`` alone works and is not counted, except
    while ``torch.compile`` traces: dynamo cannot read functorch's interpreter stack but folds whether any transform
    is active, so there every transform counts (the unfused ops are exact under all of them)."""
    if torch.compiler.is_compiling():
        return functorch_active()
    if torch.autograd.forward_ad._current_level >= 0 and any(_tangent(t) for t in tensors):
        return True
    if torch._C._functorch.peek_interpreter_stack() is None:
        return False
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return any(i.key() in (TransformType.Grad, TransformType.Jvp) for i in retrieve_all_functorch_interpreters())


# ---- autocast: the op runs in the dtype autocast gives F.conv2d ----

AUTOCAST_DEVICES = ("cpu", "cuda")


def autocast_cast(device_type: str, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """The tensors as autocast casts conv2d's: every floating tensor but float64 goes to the autocast dtype."""
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in tensors
    )


def autocast_inputs(x: object, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """``(x, *tensors)`` cast for the autocast region x's device is in (unchanged outside one)."""
    if isinstance(x, Tensor) and x.device.type in AUTOCAST_DEVICES and torch.is_autocast_enabled(x.device.type):
        return autocast_cast(x.device.type, x, *tensors)
    return (x, *tensors)


def _register_autocast(lib: torch.library.Library, qualname: str) -> None:
    namespace, name = qualname.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default
    for device_type in AUTOCAST_DEVICES:
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset, *args, device_type=device_type, keyset=keyset):
            # Not register_autocast: it fixes one dtype per device, while conv2d follows the region's dtype.
            with torch._C._ExcludeDispatchKeyGuard(keyset):
                return op(*autocast_cast(device_type, *args))

        lib.impl(name, kernel, key, with_keyset=True)


# ---- fake kernels: shapes and layouts only, never data ----


def forward_fake(x, weight, bias, residual, scale, stride, padding, dilation, groups, relu) -> Tensor:
    """The forward op's fake kernel: the real one's checks, then an empty ``y`` (N, K, P, Q) in x's memory format."""
    stride, padding, dilation = check_inputs(
        x, weight, bias, residual, scale, stride, padding, dilation, groups, relu, op=True
    )
    shape = conv_output_shape(x.shape, weight.shape, stride, padding, dilation)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=memory_format(x))


def check_epilogue_inputs(
    y: Tensor, bias: Tensor | None, residual: Tensor | None, scale: Tensor | None, relu: bool
) -> None:
    """Validate the ``_epilogue_`` op's arguments, as its C++ kernels do: y (N, K, P, Q), dense in NCHW or
    channels_last (it is written in place); bias, scale (K,); residual y's shape."""
    _check_tensor("y", y, None, optional=False)
    if y.dim() != 4:
        raise ValueError(f"y: expected a 4-D tensor (N, K, P, Q), got {y.dim()}-D with shape {tuple(y.shape)}")
    if y.dtype not in FLOAT_DTYPES:
        raise TypeError(f"y: expected a floating dtype (float32, float16, bfloat16, float64), got {y.dtype}")
    if not (y.is_contiguous() or y.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError(
            "y: expected a tensor contiguous in NCHW or channels_last (written in place), got strides "
            f"{tuple(y.stride())} for shape {tuple(y.shape)}"
        )
    if not isinstance(relu, bool):
        raise TypeError(f"relu: expected a bool, got {relu!r}")
    for name, t in (("bias", bias), ("residual", residual), ("scale", scale)):
        _check_tensor(name, t, None, optional=True)
    k = y.shape[1]
    for name, t in (("bias", bias), ("scale", scale)):
        if t is not None and t.shape != (k,):
            raise ValueError(f"{name}: expected shape ({k},), got {tuple(t.shape)}")
    if residual is not None and residual.shape != y.shape:
        raise ValueError(f"residual: expected y's shape {tuple(y.shape)}, got {tuple(residual.shape)}")
    for name, t in (("bias", bias), ("residual", residual), ("scale", scale)):
        _check_tensor(name, t, y, optional=True, like="y")
        if t is not None and _partial_overlap(y, t):
            raise ValueError(
                f"{name}: expected memory apart from y's, or y itself (y is written in place), got a partial overlap "
                "with y"
            )


def _partial_overlap(a: Tensor, b: Tensor) -> bool:
    """ATen's ``get_overlap_status(a, b) == Partial`` (the C++ kernels' check), on real and fake tensors alike: dense
    tensors on one storage whose byte ranges meet without being the same view. Tensors that are not dense are "too
    hard" there, and pass."""
    if a is b or a.numel() == 0 or b.numel() == 0:
        return False
    pc = torch._prims_common  # the helper's name differs across torch versions
    dense = getattr(pc, "is_non_overlapping_and_dense_or_false", None) or pc.is_non_overlapping_and_dense
    if not (dense(a) and dense(b)) or not torch._C._overlaps(a, b):  # _overlaps: one storage, any range
        return False
    a0, b0 = a.storage_offset() * a.element_size(), b.storage_offset() * b.element_size()
    a1, b1 = a0 + a.numel() * a.element_size(), b0 + b.numel() * b.element_size()
    if (a0, a1) == (b0, b1):
        return a.stride() != b.stride()
    return a0 < b1 and b0 < a1


def epilogue_fake(y: Tensor, bias: Tensor | None, residual: Tensor | None, scale: Tensor | None, relu: bool) -> None:
    """The in-place epilogue op's fake kernel: the real one's checks (it returns nothing)."""
    check_epilogue_inputs(y, bias, residual, scale, relu)


def backward_fake(
    grad_out, out, x, weight, scale, stride, padding, dilation, groups, relu, output_mask
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The backward op's fake kernel: the real one's checks, then empty ``(grad_x, grad_weight, grad_bias,
    grad_residual)`` in the real one's shapes and layouts, those not in ``output_mask`` of shape (0,)."""
    check_backward_inputs(grad_out, out, x, weight, scale, stride, padding, dilation, groups, relu, output_mask)
    need_x, need_w, need_b, need_r = output_mask
    fmt = memory_format(x)

    def empty() -> Tensor:
        return x.new_empty(0)

    return (
        torch.empty_like(x, memory_format=fmt) if need_x else empty(),
        torch.empty_like(weight, memory_format=memory_format(weight)) if need_w else empty(),
        x.new_empty(weight.shape[0]) if need_b else empty(),
        torch.empty(grad_out.shape, dtype=x.dtype, device=x.device, memory_format=fmt) if need_r else empty(),
    )


# ---- autograd, shared by every backend's op pair ----


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _bias, _residual, scale, stride, padding, dilation, groups, relu = inputs
    # Grad mode is off in here, and a graph is being recorded: a scale that requires grad is refused outright.
    with torch.enable_grad():
        check_scale_constant(scale)
    # The output carries the mask; the pre-activation is never kept. x and weight only for a conv gradient, as ATen's
    # conv saves them: an in-place change of x after the forward then stays legal where only bias or residual train.
    conv_grad = any(ctx.needs_input_grad[:2])
    ctx.save_for_backward(x if conv_grad else None, weight if conv_grad else None, output if relu else None, scale)
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.relu = relu


# ---- double backward: the same gradients from differentiable ATen ops ----
#
# The backward ops have no autograd formula, so a backward run with create_graph=True (a gradient penalty such as R1
# or WGAN-GP, Hessian-vector products) would drop how the gradients depend on grad_out, x and weight, and torch only
# warns. There grad mode is on inside the backward, and the backwards below compute the same math from ATen ops that
# have double-backward formulas: the mask as threshold_backward (the kernels' relu_backward: zero where out <= 0, so
# a NaN output passes its gradient), grad_bias as g's sums, dgrad/wgrad as convolution_backward. Without
# create_graph (every plain backward, and torch.compile's traced backward) the backward ops run as before.


def _masked_differentiable(grad_out: Tensor, out: Tensor | None, relu: bool) -> Tensor:
    """g: grad_out through the ReLU mask taken from the saved output. Not detached, as in torch's own ReLU: the
    mask's gradient is zero, but the parameters behind it then get zeros, not None, as in the unfused model."""
    return torch.ops.aten.threshold_backward(grad_out, out, 0) if relu else grad_out


def _canonical_strides(t: Tensor) -> Tensor:
    """``t``, or where it is dense in a memory format but for an odd stride of a size-1 dim, a copy with that format's
    strides: ATen's CPU convs misread or refuse such a stride (the kernels hand them a view; here a copy keeps the
    graph differentiable)."""
    if t.dim() != 4:
        return t
    c, h, w = t.shape[1:]
    dense = {torch.contiguous_format: (c * h * w, h * w, w, 1), torch.channels_last: (h * w * c, 1, w * c, c)}
    for fmt in dict.fromkeys((memory_format(t), torch.channels_last, torch.contiguous_format)):
        if t.is_contiguous(memory_format=fmt):
            return t if t.stride() == dense[fmt] else t.clone(memory_format=fmt)
    return t


def _conv_grads_differentiable(
    g: Tensor, x: Tensor, weight: Tensor, scale: Tensor | None, conv_args: tuple, need_x: bool, need_w: bool
) -> tuple[Tensor | None, Tensor | None]:
    """dgrad and wgrad of ``conv(x, weight) * scale`` for the (masked) gradient ``g``. The kernels put the scale on
    g or on the weight, whichever is smaller; both equal the conv backward of ``g * scale``."""
    if not (need_x or need_w):
        return None, None
    if scale is not None:
        g = g * scale.view(1, -1, 1, 1)
    stride, padding, dilation, groups = conv_args
    g, x, weight = (_canonical_strides(t) for t in (g, x, weight))
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        g, x, weight, None, stride, padding, dilation, False, [0, 0], groups, [need_x, need_w, False]
    )
    return grad_x, grad_w


def _engine_needs(ctx, n: int) -> list[bool]:
    """Whether this backward run uses the gradients of the node's first ``n`` inputs (all tensors: x and weight, or
    the epilogue's conv input). ``needs_input_grad`` is fixed at forward time, so ``torch.autograd.grad(loss, x)``
    with parameters that require grad would compute every wgrad and drop it; ATen's conv backward asks the engine."""
    needs = list(ctx.needs_input_grad[:n])
    if torch.compiler.is_compiling():  # a traced backward (compiled autograd, AOTAutograd): the static needs
        return needs
    try:
        edges = ctx.next_functions[:n]
    except (AttributeError, RuntimeError):  # a ctx that is not an autograd node: the static needs
        return needs
    for i, (node, _) in enumerate(edges):
        if needs[i] and node is not None:
            try:
                needs[i] = bool(torch._C._will_engine_execute_node(node))
            except RuntimeError:  # outside an engine run, or a leaf that autograd.grad returns: needed
                pass
    return needs


def _differentiable(grad: Tensor) -> bool:
    """Whether a backward must run the differentiable ops (see _masked_differentiable): under create_graph=True, or
    forward-over-reverse (a Hessian-vector product), where the incoming gradient is a dual tensor whose tangent the
    fused backward op would refuse."""
    return torch.is_grad_enabled() or (torch.autograd.forward_ad._current_level >= 0 and _tangent(grad))


def _make_backward(backward_op: Callable) -> Callable:
    def backward(ctx, grad_out: Tensor):
        x, weight, out, scale = ctx.saved_tensors
        need_x, need_w = _engine_needs(ctx, 2)
        need_b, need_r = ctx.needs_input_grad[2:4]
        if _differentiable(grad_out):
            g = _masked_differentiable(grad_out, out, ctx.relu)
            grad_x, grad_w = _conv_grads_differentiable(g, x, weight, scale, ctx.conv_args, need_x, need_w)
            return (
                grad_x,
                grad_w,
                g.sum((0, 2, 3)) if need_b else None,
                g if need_r else None,
                *([None] * 6),
            )
        # Without ReLU, grad_residual is grad_out itself; the op only makes it when masked.
        mask = [need_x, need_w, need_b, need_r and ctx.relu]
        out = out if ctx.relu else grad_out  # read only with relu
        if x is None:  # no conv gradient: the epilogue's pass alone (mask, grad_bias), on stand-ins
            grad_x = grad_w = grad_b = grad_r = None
            if need_b or mask[3]:
                t = out if ctx.relu else grad_out.contiguous(memory_format=memory_format(grad_out))
                g = grad_out if ctx.relu else t
                _, _, grad_b, grad_r = backward_op(g, t, *_epilogue_stand_ins(t), ctx.relu, mask)
        else:
            grad_x, grad_w, grad_b, grad_r = backward_op(
                grad_out, out, x, weight, scale, *ctx.conv_args, ctx.relu, mask
            )
        if need_r and not ctx.relu:
            grad_r = grad_out
        return (
            grad_x if need_x else None,
            grad_w if need_w else None,
            grad_b if need_b else None,
            grad_r if need_r else None,
            *([None] * 6),
        )

    return backward


# ---- eager training: the same backward as two autograd nodes ----
#
# A custom op's incoming gradient and saved output live until its whole backward returns, so the conv backward would
# allocate beside two output-sized buffers that the unfused graph has freed by then (its ReLU node finishes first).
# Recorded as two nodes, the epilogue's backward (mask, grad_bias, grad_residual) returns and frees both before the
# conv's backward runs. The forward stays one fused call.


class _SplitPlan:
    """What the two nodes of one call share: the backward op, the conv settings and where the scale goes; the
    tensors only until the nodes have saved them (saved, they get autograd's version checks and hooks)."""

    __slots__ = ("backward_op", "conv_args", "relu", "scale", "scale_in_epilogue", "weight", "x", "y")

    def __init__(self, backward_op, x, weight, y, scale, conv_args, relu) -> None:
        self.backward_op = backward_op
        self.conv_args = conv_args
        self.relu = relu
        # The scale goes on the smaller of g and the weight (as the one-node backward does): g in late layers,
        # where the conv then gets the scaled g; otherwise the conv backward scales the weight.
        self.scale_in_epilogue = scale is not None and y.numel() <= weight.numel()
        self.x, self.weight, self.y, self.scale = x, weight, y, scale


class _SplitConv(torch.autograd.Function):
    """The conv part: an input of the epilogue node standing for ``conv(x, weight)``; backward gives dgrad/wgrad."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, plan: _SplitPlan) -> Tensor:
        ctx.save_for_backward(x, weight, None if plan.scale_in_epilogue else plan.scale)
        ctx.plan = plan
        # One element, zero strides: the graph edge needs the output's shape, dtype and device, not its memory.
        return torch.empty_strided(plan.y.shape, (0,) * plan.y.dim(), dtype=x.dtype, device=x.device)

    @staticmethod
    def backward(ctx, grad_conv: Tensor):
        x, weight, scale = ctx.saved_tensors
        plan = ctx.plan
        need_x, need_w = _engine_needs(ctx, 2)
        if _differentiable(grad_conv):  # scale None if in the epilogue
            return (*_conv_grads_differentiable(grad_conv, x, weight, scale, plan.conv_args, need_x, need_w), None)
        mask = [need_x, need_w, False, False]
        grad_x, grad_w, _, _ = plan.backward_op(grad_conv, grad_conv, x, weight, scale, *plan.conv_args, False, mask)
        return (grad_x if need_x else None, grad_w if need_w else None, None)


def _epilogue_stand_ins(t: Tensor) -> tuple:
    """(x, weight, scale, stride, padding, dilation, groups) for a backward op call that runs only the epilogue's pass
    (mask, grad_bias): a 1x1 depthwise conv of ``t`` itself, whose output has ``t``'s shape and layout. The op reads
    neither x nor weight for that pass, so the epilogue node saves none: under saved-tensor hooks (non-reentrant
    checkpointing, offloading) and compiled autograd, x and weight are the conv node's, unpacked once."""
    k = t.shape[1]
    return t, t.new_empty(()).expand(k, 1, 1, 1), None, [1, 1], [0, 0], [1, 1], k


class _SplitEpilogue(torch.autograd.Function):
    """The epilogue part: y from the conv node's output, bias and residual; backward gives the mask, grad_bias and
    grad_residual in one pass, and the conv node's gradient."""

    @staticmethod
    def forward(ctx, conv: Tensor, bias: Tensor | None, residual: Tensor | None, plan: _SplitPlan) -> Tensor:
        y = plan.y
        scale = plan.scale if plan.scale_in_epilogue else None
        # x and weight are the conv node's alone: this node's backward needs neither (see _epilogue_stand_ins).
        ctx.save_for_backward(y if plan.relu else None, scale)
        ctx.fmt = memory_format(plan.x)
        plan.x = plan.weight = plan.y = plan.scale = None
        ctx.plan = plan
        return y

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        out, scale = ctx.saved_tensors
        plan = ctx.plan
        (need_conv,) = _engine_needs(ctx, 1)
        need_b, need_r = ctx.needs_input_grad[1:3]
        if _differentiable(grad_out):
            g = _masked_differentiable(grad_out, out, plan.relu)
            grad_conv = g * scale.view(1, -1, 1, 1) if need_conv and scale is not None else g
            return (
                grad_conv if need_conv else None,
                g.sum((0, 2, 3)) if need_b else None,
                g if need_r else None,
                None,
            )
        if plan.relu:
            mask = [False, False, need_b, need_conv or need_r]
            _, _, grad_b, g = plan.backward_op(grad_out, out, *_epilogue_stand_ins(out), True, mask)
        else:  # the identity mask: g is grad_out in x's layout (copied once for both nodes), grad_bias its sums
            g = grad_out.contiguous(memory_format=ctx.fmt)
            mask = [False, False, True, False]
            grad_b = plan.backward_op(g, g, *_epilogue_stand_ins(g), False, mask)[2] if need_b else None
        grad_conv = g
        if need_conv and scale is not None:
            s = scale.view(1, -1, 1, 1)
            # g is this node's own buffer when masked and not returned for the residual: scaled in place, no copy.
            grad_conv = g.mul_(s) if plan.relu and not need_r else g * s
        return (grad_conv if need_conv else None, grad_b if need_b else None, g if need_r else None, None)


def record_split_graph(
    backward_op: Callable,
    y: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor | None,
    scale: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    relu: bool,
) -> Tensor:
    """Attach autograd to ``y``, the fused forward's output computed without autograd, as two nodes: the conv
    (x, weight) and the epilogue (bias, residual, the mask). ``backward_op`` is the backend's backward op; its
    output_mask runs each half alone. Gradients equal the one-node op's; saved: x, weight and (with ReLU) y."""
    plan = _SplitPlan(backward_op, x, weight, y, scale, (stride, padding, dilation, groups), relu)
    if x.requires_grad or weight.requires_grad:
        conv = _SplitConv.apply(x, weight, plan)
    else:  # nothing flows into the conv: the epilogue node alone, with a placeholder input
        conv = torch.empty_strided(y.shape, (0,) * y.dim(), dtype=y.dtype, device=y.device)
    return _SplitEpilogue.apply(conv, bias, residual, plan)


# ---- vmap: one fused call for the whole batch, as functorch batches conv2d ----


def _make_vmap(op: Callable) -> Callable:
    """A vmap rule for a forward op: without it torch runs the op once per sample (BatchedFallback).

    Batched x or residual only: the vmapped dim folds into N. A batched weight, bias or scale (a model ensemble,
    ``torch.func.stack_module_state``): with an unbatched x and groups=1, the members join the output channels,
    weight (B*K, C, R, S), y (N, B*K, P, Q); otherwise they become conv groups, x (N, B*C, H, W), weight
    (B*K, C/g, R, S), y (N, B*K, P, Q), as functorch's conv2d rule does (there an unbatched x is copied B times)."""

    def rule(info, in_dims, x, weight, bias, residual, scale, stride, padding, dilation, groups, relu):
        # Unwrapped here, scale shows requires_grad; the batched wrapper the public function saw did not.
        check_scale_constant(scale)
        b = info.batch_size
        xd, wd, bd, rd, sd = in_dims[:5]
        if b > 0:  # errors name one sample's shapes, not the flattened ones the op below would see
            ins = [
                t if t is None or d is None else t.select(d, 0)
                for t, d in zip((x, weight, bias, residual, scale), in_dims[:5], strict=True)
            ]
            check_inputs(*ins, stride, padding, dilation, groups, relu, op=True)
        elif (wd, bd, sd) != (None, None, None) and not (xd is None and groups == 1):
            # No member to check, and conv groups of zero members would be refused as C=0: say what it is.
            raise ValueError(
                "vmap: expected at least one member when weight, bias or scale is batched and x is batched or "
                f"groups > 1 (the members become conv groups), got a vmapped dim of size {b}"
            )

        def front(t: Tensor | None, d: int | None) -> Tensor | None:
            """The vmapped dim first; an unbatched tensor is expanded (a view) to the batch."""
            if t is None:
                return None
            return t.movedim(d, 0) if d is not None else t.expand(b, *t.shape)

        if wd is None and bd is None and sd is None:
            xs = front(x, xd)
            rs = front(residual, rd) if residual is not None else None
            n = xs.shape[1]
            y = op(
                xs.flatten(0, 1), weight, bias, None if rs is None else rs.flatten(0, 1), scale, stride, padding,
                dilation, groups, relu,
            )  # fmt: skip
            return y.unflatten(0, (b, n)), 0
        ws = front(weight, wd)
        k = ws.shape[1]
        flat = [None if t is None else t.flatten(0, 1) for t in (front(bias, bd), front(scale, sd))]
        rs = None if residual is None else front(residual, rd).movedim(0, 1).flatten(1, 2)
        if xd is None and groups == 1:
            # Every member reads the same x (an ensemble on one batch): the members join K, x is read as it is.
            if b == 0:  # an empty ensemble: nothing to compute (the op refuses K = 0, as conv2d does)
                n, _, p, q = conv_output_shape(x.shape, ws.shape[1:], stride, padding, dilation)
                y = x.new_empty((n, 0, p, q)).contiguous(memory_format=memory_format(x))
            else:
                y = op(x, ws.flatten(0, 1), flat[0], rs, flat[1], stride, padding, dilation, 1, relu)
        else:  # each member its own x: the members become conv groups
            xs = front(x, xd).movedim(0, 1).flatten(1, 2)  # (N, B*C, H, W)
            y = op(xs, ws.flatten(0, 1), flat[0], rs, flat[1], stride, padding, dilation, groups * b, relu)
        return y.unflatten(1, (b, k)), 1

    return rule


_LIBS: list[torch.library.Library] = []
# The dispatch keys of tensors that are not dense (sparse, oneDNN's opaque layout). No kernel of the ops takes them,
# and the dispatcher's own refusal names the op and the key, not the argument: their kernel runs the checks, which do.
_NOT_DENSE_KEYS = (
    *("SparseCPU", "SparseCUDA", "SparseCsrCPU", "SparseCsrCUDA", "MkldnnCPU"),
    *("NestedTensorCPU", "NestedTensorCUDA", "AutogradNestedTensor", "QuantizedCPU", "QuantizedCUDA"),
)


def register_not_dense(qualname: str, checks: Callable) -> None:
    """Give op ``qualname`` a kernel for every non-dense dispatch key that runs ``checks`` (its fake kernel): they
    refuse such a tensor naming the argument (see _check_tensor)."""

    def refuse(*args, **kwargs):
        checks(*args, **kwargs)
        raise TypeError(f"{qualname}: expected dense (strided) tensors")  # not reached: the checks name the argument

    namespace, name = qualname.split("::")
    lib = torch.library.Library(namespace, "FRAGMENT")
    _LIBS.append(lib)
    for key in _NOT_DENSE_KEYS:
        lib.impl(name, refuse, key)


def _register_flops(forward_packet, backward_packet) -> None:
    """FLOP counters (``torch.utils.flop_counter.FlopCounterMode``) count the op as the conv it holds, by torch's own
    conv formulas, forward and backward: a converted model counts what the original did (the epilogue, like the
    unfused bias, add and ReLU, counts nothing)."""
    from torch.utils.flop_counter import conv_backward_flop, conv_flop_count, register_flop_formula

    @register_flop_formula(forward_packet)
    def forward_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return conv_flop_count(x_shape, w_shape, out_shape, transposed=False)

    @register_flop_formula(backward_packet)
    def backward_flops(grad_out_shape, out, x_shape, w_shape, scale, stride, padding, dilation, groups, relu,
                       output_mask, out_shape=None, **kwargs) -> int:  # fmt: skip
        mask = [bool(output_mask[0]), bool(output_mask[1]), False]  # grad_bias: a sum, not counted for convs either
        return conv_backward_flop(grad_out_shape, x_shape, w_shape, None, stride, padding, dilation, False, [0, 0],
                                  groups, mask, out_val=[x_shape, w_shape, None])  # fmt: skip


def register_op(forward: str, backward: str) -> None:
    """Give one backend's op pair (qualified names, e.g. ``"resnet_fused::conv_bias_add_relu"``) the contract:
    fake kernels, the shared autograd, the vmap rule, the autocast rule and the FLOP count."""
    torch.library.register_fake(forward)(forward_fake)
    torch.library.register_fake(backward)(backward_fake)
    namespace, name = backward.split("::")
    backward_op = getattr(getattr(torch.ops, namespace), name).default
    _register_flops(getattr(getattr(torch.ops, namespace), forward.split("::")[1]), backward_op.overloadpacket)
    torch.library.register_autograd(forward, _make_backward(backward_op), setup_context=_setup_context)
    lib = torch.library.Library(namespace, "FRAGMENT")
    _LIBS.append(lib)  # a Library deregisters its kernels when collected
    forward_op = getattr(getattr(torch.ops, namespace), forward.split("::")[1]).default
    torch.library.register_vmap(forward, _make_vmap(forward_op), lib=lib)
    _register_autocast(lib, forward)
    register_not_dense(forward, forward_fake)
    register_not_dense(backward, backward_fake)
