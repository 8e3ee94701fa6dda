"""The fused residual-block op: public API, argument checks, fake kernels, autograd and backend choice.

The schemas live in C++ (csrc/conv_bias_add_relu.cpp); each backend is a dispatcher op with one argument list:
``(x, weight, bias, residual, scale, stride, padding, dilation, groups, relu)``, and a backward op
``(grad_out, out, x, weight, scale, stride, padding, dilation, groups, relu, output_mask) -> 4 grads``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from resnet_fused import (
    _C,  # noqa: F401  (importing runs the C++ op registrations)
    reference,
)

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
IntPair = int | tuple[int, int] | Sequence[int]


def _pair(value: IntPair, name: str, min_value: int) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        pair = (value, value)
    elif (
        isinstance(value, (tuple, list, torch.Size))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        pair = (value[0], value[1])
    else:
        raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}")
    if min(pair) < min_value:
        raise ValueError(f"{name}: expected values >= {min_value}, got {pair}")
    return pair


def conv_output_shape(
    x_shape: Sequence[int],
    weight_shape: Sequence[int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> list[int]:
    """(N, K, P, Q) of conv2d for x (N, C, H, W) and weight (K, C/groups, R, S)."""
    spatial = [
        (x_shape[2 + d] + 2 * padding[d] - dilation[d] * (weight_shape[2 + d] - 1) - 1) // stride[d] + 1
        for d in range(2)
    ]
    return [x_shape[0], weight_shape[0], *spatial]


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
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Validate arguments with messages that name the argument, the expected and the actual value.

    Returns ``(stride, padding, dilation)`` as pairs.
    """
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a Tensor, got {type(t).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x: expected a 4-D tensor (N, C, H, W), got {x.dim()}-D with shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(
            f"weight: expected a 4-D tensor (K, C/groups, R, S), got {weight.dim()}-D with shape {tuple(weight.shape)}"
        )
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x: expected a floating dtype (float32, float16, bfloat16, float64), got {x.dtype}")
    for name, t in (("weight", weight), ("bias", bias), ("residual", residual), ("scale", scale)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a Tensor or None, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (x's), got {t.device}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name}: expected dtype {x.dtype} (x's), got {t.dtype}")
    stride = _pair(stride, "stride", 1)
    padding = _pair(padding, "padding", 0)
    dilation = _pair(dilation, "dilation", 1)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups: expected an int >= 1, got {groups!r}")
    c, k = x.shape[1], weight.shape[0]
    if c % groups:
        raise ValueError(f"x: expected channels divisible by groups={groups}, got C={c}")
    if weight.shape[1] * groups != c:
        raise ValueError(f"weight: expected shape[1] == C/groups = {c // groups}, got {weight.shape[1]}")
    if k % groups:
        raise ValueError(f"weight: expected out channels divisible by groups={groups}, got K={k}")
    for d in range(2):
        padded = x.shape[2 + d] + 2 * padding[d]
        extent = dilation[d] * (weight.shape[2 + d] - 1) + 1
        if extent > padded:
            raise ValueError(
                f"weight: expected a (dilated) kernel no larger than the padded input, got kernel extent {extent} "
                f"> padded input {padded} in dim {2 + d}"
            )
    for name, t in (("bias", bias), ("scale", scale)):
        if t is not None and tuple(t.shape) != (k,):
            raise ValueError(f"{name}: expected shape ({k},), got {tuple(t.shape)}")
    if residual is not None:
        out_shape = conv_output_shape(x.shape, weight.shape, stride, padding, dilation)
        if list(residual.shape) != out_shape:
            raise ValueError(f"residual: expected the output's shape {tuple(out_shape)}, got {tuple(residual.shape)}")
    _check_scale_constant(scale)
    return stride, padding, dilation


def _check_scale_constant(scale: Tensor | None) -> None:
    if scale is not None and scale.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "scale: expected a constant (requires_grad=False); like a frozen BatchNorm's it gets no gradient, "
            "got requires_grad=True. Detach it or keep it as a buffer."
        )


# ---- fake kernels: shapes and layouts only, never data ----


def _memory_format(t: Tensor) -> torch.memory_format:
    return torch._prims_common.suggest_memory_format(t)


def _forward_fake(x, weight, bias, residual, scale, stride, padding, dilation, groups, relu):
    shape = conv_output_shape(x.shape, weight.shape, stride, padding, dilation)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))


def _backward_fake(grad_out, out, x, weight, scale, stride, padding, dilation, groups, relu, output_mask):
    def empty() -> Tensor:
        return x.new_empty(0)

    need_x, need_w, need_b, need_r = output_mask
    fmt = _memory_format(x)
    return (
        torch.empty_like(x, memory_format=fmt) if need_x else empty(),
        torch.empty_like(weight, memory_format=_memory_format(weight)) if need_w else empty(),
        x.new_empty(weight.shape[0]) if need_b else empty(),
        torch.empty(out.shape, dtype=x.dtype, device=x.device, memory_format=fmt) if need_r else empty(),
    )


# ---- autograd, shared by every backend's op pair ----


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _bias, _residual, scale, stride, padding, dilation, groups, relu = inputs
    _check_scale_constant(scale)
    # The output carries the ReLU mask; the pre-activation is never kept.
    ctx.save_for_backward(x, weight, output, scale)
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.relu = relu


def _make_backward(backward_op: Callable) -> Callable:
    def backward(ctx, grad_out: Tensor):
        x, weight, out, scale = ctx.saved_tensors
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
        # Without ReLU, grad_residual is grad_out itself; the op only makes it when masked.
        mask = [need_x, need_w, need_b, need_r and ctx.relu]
        grad_x, grad_w, grad_b, grad_r = backward_op(grad_out, out, x, weight, scale, *ctx.conv_args, ctx.relu, mask)
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


def register_op_family(forward_op: str, backward_op: str, *, fake: bool = True) -> None:
    """Register the shared autograd (and, if ``fake``, the fake kernels) for one backend's forward/backward ops.

    Both names are qualified (``"resnet_fused::..."``) and follow the argument lists of this module's docstring.
    """
    if fake:
        torch.library.register_fake(forward_op)(_forward_fake)
        torch.library.register_fake(backward_op)(_backward_fake)
    namespace, name = backward_op.split("::")
    bwd = getattr(getattr(torch.ops, namespace), name).default
    torch.library.register_autograd(forward_op, _make_backward(bwd), setup_context=_setup_context)


register_op_family("resnet_fused::conv_bias_add_relu", "resnet_fused::conv_bias_add_relu_backward")
# Autocast runs the op in the dtype it runs conv2d in.
torch.library.register_autocast("resnet_fused::conv_bias_add_relu", "cpu", torch.bfloat16)
torch.library.register_autocast("resnet_fused::conv_bias_add_relu", "cuda", torch.float16)


# ---- backends ----


def _probe_backends() -> dict[str, str]:
    """Backend name -> "" if it can run here, else why not."""
    from resnet_fused.select import cuda_available, triton_available

    status = {"reference": "", "cpu": ""}
    for name, probe in (("triton", triton_available), ("cuda", cuda_available)):
        ok, why = probe()
        status[name] = "" if ok else why
    return status


_BACKEND_STATUS: dict[str, str] | None = None


def _backend_status() -> dict[str, str]:
    global _BACKEND_STATUS
    if _BACKEND_STATUS is None:
        _BACKEND_STATUS = _probe_backends()
    return _BACKEND_STATUS


def available_backends() -> list[str]:
    """The concrete backends this install can run, e.g. ``["reference", "cpu"]``; ``"auto"`` picks among them."""
    return [name for name, why in _backend_status().items() if not why]


def resolve_backend(backend: str, x: Tensor, *args) -> str:
    """The concrete backend a call with ``backend`` runs on x's device. ``args`` are the op's other arguments."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        from resnet_fused.select import choose_backend

        return choose_backend(x, *args)
    why = _backend_status()[backend]
    if why:
        raise RuntimeError(
            f"backend: {backend!r} is not available in this install ({why}); available: {available_backends()}"
        )
    expected_device = {"cpu": "cpu", "cuda": "cuda"}.get(backend)
    if expected_device is not None and x.device.type != expected_device:
        raise ValueError(f"backend: {backend!r} runs on {expected_device} tensors, got x on {x.device}")
    return backend


def _backend_op(backend: str):
    if backend == "triton":
        return torch.ops.resnet_fused.conv_bias_add_relu_triton.default
    return torch.ops.resnet_fused.conv_bias_add_relu.default


def _autocast_inputs(device_type: str, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype) if isinstance(t, Tensor) and t.dtype == torch.float32 else t for t in tensors
    )  # fmt: skip


def conv_bias_add_relu(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    residual: Tensor | None = None,
    *,
    scale: Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    relu: bool = True,
    backend: str = "auto",
) -> Tensor:
    """y = relu(conv2d(x, weight) * scale + bias + residual), fused, forward and backward.

    Args:
        x: (N, C, H, W), NCHW or channels_last; y comes out in x's memory format.
        weight: (K, C/groups, R, S).
        bias: (K,) or None.
        residual: (N, K, P, Q), the output's shape, or None.
        scale: (K,) constant per-channel scale (a frozen BatchNorm's gamma / sqrt(var + eps)) or None; no gradient.
        stride, padding, dilation: an int or a pair; padding is explicit numbers.
        groups: conv groups (C and K divisible by it; groups == C is depthwise).
        relu: apply ReLU after the add; False keeps the add linear (pre-activation blocks).
        backend: "auto", "cpu", "cuda", "triton" or "reference" (the unfused eager ops).

    Returns:
        y: (N, K, P, Q) in x's dtype.
    """
    if isinstance(x, Tensor) and x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
        # Cast as autocast casts conv2d, before the dtype checks: chained fused layers then see one dtype.
        x, weight, bias, residual, scale = _autocast_inputs(x.device.type, x, weight, bias, residual, scale)
    stride, padding, dilation = check_inputs(x, weight, bias, residual, scale, stride, padding, dilation, groups)
    args = (weight, bias, residual, scale, stride, padding, dilation, groups, relu)
    backend = resolve_backend(backend, x, *args)
    if backend == "reference":
        return reference.conv_bias_add_relu(
            x, weight, bias, residual, scale=scale, stride=stride, padding=padding, dilation=dilation, groups=groups,
            relu=relu,
        )  # fmt: skip
    return _backend_op(backend)(x, *args)
