"""The Triton backend as dispatcher ops: ``resnet_fused::conv_bias_add_relu_triton`` and its backward.

Registered with ``torch.library.custom_op``, not ``triton_op``: under ``TRITON_INTERPRET=1`` (how CI runs the
kernels) ``wrap_triton`` hands back the raw interpreted kernel, so a ``triton_op`` body traced with fake tensors
would launch the interpreter on them (opcheck fails) or drop the launch from a compiled graph. An opaque custom
op behaves the same under the interpreter and on a GPU, so the path CI proves is the path that ships. The shared
autograd and fake kernels come from ``resnet_fused.ops.register_op_family``.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from . import launch

FORWARD = "resnet_fused::conv_bias_add_relu_triton"
BACKWARD = "resnet_fused::conv_bias_add_relu_triton_backward"


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
    return launch.conv_fwd(x, weight, bias, residual, scale, stride, padding, dilation, groups, relu)


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
    return launch.conv_bwd(grad_out, out, x, weight, scale, stride, padding, dilation, groups, relu, output_mask)
