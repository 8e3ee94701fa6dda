"""The unfused PyTorch reference: F.conv2d followed by separate mul/add/relu ops, as an unfused model runs them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from resnet_fused import contract


def conv_bias_add_relu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    *,
    scale: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    relu: bool = True,
) -> torch.Tensor:
    """y = act(conv2d(x, weight) * scale + bias + residual), one eager op at a time.

    Shapes: x (N, C, H, W), weight (K, C/groups, R, S), bias and scale (K,), residual and y (N, K, P, Q).
    Same signature and argument checks as :func:`resnet_fused.conv_bias_add_relu`, without ``backend``; unlike it,
    differentiable with respect to ``scale`` too.
    """
    stride, padding, dilation = contract.check_inputs(
        x, weight, bias, residual, scale, stride, padding, dilation, groups, relu
    )
    return unchecked(x, weight, bias, residual, scale, stride, padding, dilation, groups, relu)


def unchecked(x, weight, bias, residual, scale, stride, padding, dilation, groups, relu) -> torch.Tensor:
    """:func:`conv_bias_add_relu` without the argument checks, in the op's argument order, for callers that made
    them (the public function, the fake kernels' graphs)."""
    if scale is None:
        # A conv with a bias is one op, as in an nn.Conv2d(bias=True) model.
        y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    else:
        # conv -> frozen norm, as torchvision's FrozenBatchNorm2d computes it (x * scale + shift).
        y = F.conv2d(x, weight, None, stride, padding, dilation, groups) * scale.view(1, -1, 1, 1)
        if bias is not None:
            y = y + bias.view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual
    return F.relu(y) if relu else y
