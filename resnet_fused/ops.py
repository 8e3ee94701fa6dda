"""The public fused op: ``conv_bias_add_relu``. The contract (checks, fakes, autograd, autocast) lives in
:mod:`resnet_fused.contract`, the backends in :mod:`resnet_fused.backends`, the ``auto`` choice in
:mod:`resnet_fused.select`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from resnet_fused import contract, reference
from resnet_fused.backends import BACKENDS, available_backends, check_name
from resnet_fused.select import call_inputs, check_transform_backend, needs_backward, resolve_backend

__all__ = ["available_backends", "conv_bias_add_relu"]


def conv_bias_add_relu(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    residual: Tensor | None = None,
    *,
    scale: Tensor | None = None,
    stride: contract.IntPair = 1,
    padding: contract.IntPair = 0,
    dilation: contract.IntPair = 1,
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
        backend: "auto" or a name from :func:`available_backends` ("cpu", "cuda", "triton", "reference").

    Returns:
        y: (N, K, P, Q) in x's dtype, or under autocast in the dtype autocast gives ``F.conv2d``.
    """
    x, weight, bias, residual, scale, stride, padding, dilation, groups = call_inputs(
        x, weight, bias, residual, scale, stride, padding, dilation, groups, relu
    )
    if contract.differentiated_by_transform(x, weight, bias, residual, scale):
        return _unfused_for_transform(
            x, weight, bias, residual, scale, stride, padding, dilation, groups, relu, backend
        )
    args = (weight, bias, residual, scale, stride, padding, dilation, groups, relu)
    row = BACKENDS[resolve_backend(backend, x, *args)]
    op = row.op
    # Under vmap the inputs are batched wrappers whose requires_grad says nothing of what they wrap: keep autograd.
    if torch.compiler.is_compiling() or contract.functorch_active():
        return op(x, *args)
    if needs_backward(x, weight, bias, residual):
        split_backward = row.split_backward
        if split_backward is None or not _plain_eager(x):
            return op(x, *args)
        with torch._C._AutoDispatchBelowAutograd():
            y = op(x, *args)
        return contract.record_split_graph(split_backward, y, x, *args)
    # Nothing for autograd to record: skip torch.library's autograd layer, a C++ -> Python -> C++ round trip that
    # costs ~20 us a call even under no_grad (as much as a small conv itself).
    with torch._C._AutoDispatchBelowAutograd():
        return op(x, *args)


def _plain_eager(x: Tensor) -> bool:
    """No tracer is watching: the jit tracer (the TorchScript ONNX exporter), a dispatch mode (make_fx, non-strict
    export) or a tensor subclass. Tracers must record the op itself, which they (and the ONNX translations) know;
    the two-node graph is for eager autograd only."""
    return type(x) is Tensor and not torch.jit.is_tracing() and torch._C._len_torch_dispatch_stack() == 0


def _unfused_for_transform(
    x, weight, bias, residual, scale, stride, padding, dilation, groups, relu, backend
) -> Tensor:
    """Forward-mode AD and ``torch.func``'s differentiating transforms, which no fused op supports: ``auto`` and
    ``reference`` compute through the unfused ops (exact derivatives, unfused speed); a named fused backend refuses."""
    check_name(backend, BACKENDS)
    check_transform_backend(backend)
    contract.check_no_tangent(scale=scale)  # a constant, as under reverse mode
    return reference.unchecked(x, weight, bias, residual, scale, stride, padding, dilation, groups, relu)
