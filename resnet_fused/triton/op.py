"""The Triton backend as dispatcher ops: ``resnet_fused::conv_bias_add_relu_triton`` and its backward.

Registered with ``torch.library.custom_op``, not ``triton_op``: under ``TRITON_INTERPRET=1`` (how CI runs the
kernels) ``wrap_triton`` hands back the raw interpreted kernel, so a ``triton_op`` body traced with fake tensors
would launch the interpreter on them (opcheck fails) or drop the launch from a compiled graph. An opaque custom
op behaves the same under the interpreter and on a GPU, so the path CI proves is the path that ships. Both ops
validate through the op contract; fakes, autograd and autocast come from ``contract.register_op``.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from resnet_fused import contract

from . import launch

FORWARD = "resnet_fused::conv_bias_add_relu_triton"
BACKWARD = "resnet_fused::conv_bias_add_relu_triton_backward"
# CUDA caps grid dims y and z at 65535; the kernels put groups on z.
MAX_GROUPS = 65535


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
    return launch.forward(x, weight, bias, residual, scale, stride, padding, dilation, groups, relu)


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
    return launch.backward(grad_out, out, x, weight, scale, stride, padding, dilation, groups, relu, output_mask)


contract.register_op(FORWARD, BACKWARD)
