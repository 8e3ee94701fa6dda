"""The Triton backend as dispatcher ops: ``resnet_fused::conv_bias_add_relu_triton`` and its backward.

Registered with ``torch.library.custom_op``, not ``triton_op``: under ``TRITON_INTERPRET=1`` (how CI runs the
kernels) ``wrap_triton`` hands back the raw interpreted kernel, so a ``triton_op`` body traced with fake tensors
would launch the interpreter on them (opcheck fails) or drop the launch from a compiled graph. An opaque custom
op behaves the same under the interpreter and on a GPU, so the path CI proves is the path that ships. Both ops
validate through the op contract; fakes, autograd and autocast come from ``contract.register_op``. This module
imports no triton: ``import resnet_fused`` registers the ops, and the kernels load on the first call.
"""

import importlib.util
from collections.abc import Sequence

import torch
from torch import Tensor

from resnet_fused import contract
from resnet_fused import triton as triton_package
from resnet_fused.triton import interprets

FORWARD = "resnet_fused::conv_bias_add_relu_triton"
BACKWARD = "resnet_fused::conv_bias_add_relu_triton_backward"
# CUDA caps grid dims y and z at 65535; the kernels put groups on z.
MAX_GROUPS = 65535


# Read once, as @triton.jit reads it: setting TRITON_INTERPRET later changes neither (the backend table reads this).
INTERPRET = interprets()


def unavailable() -> str:
    """Why the Triton kernels cannot run in this process, or "" where they can: triton missing or failing to import,
    or neither a CUDA device nor the interpreter (``TRITON_INTERPRET=1`` when resnet_fused was imported)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if not (torch.cuda.is_available() or INTERPRET):
        if triton_package.IMPORT_ERROR:  # TRITON_INTERPRET was set, but triton did not import
            return f"the Triton backend failed to import: {triton_package.IMPORT_ERROR}"
        return "no CUDA device, and TRITON_INTERPRET=1 was not set when resnet_fused was imported"
    try:
        from . import launch  # noqa: F401  (imports triton and the kernels)
    except Exception as e:  # a broken triton install must not break the other backends
        return f"the Triton backend failed to import: {type(e).__name__}: {e}"
    return ""


_LAUNCH = None  # the launchers module, once a call has found Triton runnable


def _launchers(op: str, device: torch.device):
    """The launchers, imported on the first call (importing them imports triton). The ops are registered when
    resnet_fused is imported, so that a program exported or traced on this backend loads wherever resnet_fused is
    imported; it runs where Triton can, on CUDA tensors (on CPU tensors under the interpreter)."""
    global _LAUNCH
    if _LAUNCH is None:
        why = unavailable()
        if why:
            raise RuntimeError(
                f"{op}: the triton backend cannot run here: {why}. A program exported or traced on the triton "
                "backend runs where Triton does; export it on the cpu or cuda backend to run it here"
            )
        from . import launch

        _LAUNCH = launch
    if device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"{op}: the triton backend runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), got "
            f"{device.type} tensors"
        )
    return _LAUNCH


def _check_groups(groups: int) -> None:
    if groups > MAX_GROUPS:
        raise ValueError(f"groups: expected at most {MAX_GROUPS} for the triton backend (a grid limit), got {groups}")


@torch.library.custom_op(FORWARD, mutates_args=())
def conv_bias_add_relu_triton(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor | None,
    scale: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    relu: bool,
) -> Tensor:
    """y (N, K, P, Q) = act(conv2d(x (N, C, H, W), weight (K, C/groups, R, S)) * scale + bias + residual)."""
    stride, padding, dilation = contract.check_inputs(
        x, weight, bias, residual, scale, stride, padding, dilation, groups, relu, op=True
    )
    contract.check_no_tangent(x=x, weight=weight, bias=bias, residual=residual, scale=scale)
    _check_groups(groups)
    return _launchers(FORWARD, x.device).forward(
        x, weight, bias, residual, scale, stride, padding, dilation, groups, relu
    )


@torch.library.custom_op(BACKWARD, mutates_args=())
def conv_bias_add_relu_triton_backward(
    grad_out: Tensor,
    out: Tensor,
    x: Tensor,
    weight: Tensor,
    scale: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    relu: bool,
    output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_bias, grad_residual); those not in output_mask are empty tensors."""
    stride, padding, dilation = contract.check_backward_inputs(
        grad_out, out, x, weight, scale, stride, padding, dilation, groups, relu, output_mask
    )
    _check_groups(groups)
    return _launchers(BACKWARD, x.device).backward(
        grad_out, out, x, weight, scale, stride, padding, dilation, groups, relu, output_mask
    )


contract.register_op(FORWARD, BACKWARD)
