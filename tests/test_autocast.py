"""A converted torchvision resnet18 runs under CPU autocast, fp16 and bf16, like the unconverted model does."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torchvision
from helpers import tolerance
from torch import nn

import resnet_fused
from resnet_fused.nn import FusedConv2d, set_backend


def assert_within(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str) -> None:
    """Max error at most ``rtol`` times the float64 ``want``'s magnitude."""
    err = (got.double() - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol:.2g} * {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_converted_resnet18_under_autocast(dtype):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    fused, _ = resnet_fused.convert(model, freeze_bn=True, backend="cpu")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model.double()(x.double())
        with torch.autocast("cpu", dtype=dtype):
            got = fused(x)
            plain = model.float()(x)
    assert got.dtype == plain.dtype, "the fused model's output dtype must match the unconverted model's"
    # Twenty layers, each rounding to the autocast dtype: the logits' error measured 0.4-0.9x the dtype's rtol of
    # their magnitude over seeds.
    assert_within(got, want, 2 * tolerance(dtype), "logits")
    # No worse than the unconverted model under the same autocast, up to a factor for summation order.
    assert (got.double() - want).abs().max().item() <= 4 * (plain.double() - want).abs().max().item() + 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_converted_resnet18_gradients_under_autocast(dtype):
    """Gradients of x and of every parameter through a converted model run under autocast, against the same model in
    float64 on the reference backend. No max-pool (a CIFAR-style stem): rounding breaks its near-ties differently in
    float64, which moves whole gradients elsewhere."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    model.maxpool = nn.Identity()
    fused, _ = resnet_fused.convert(model, freeze_bn=True, backend="cpu")
    ref = set_backend(copy.deepcopy(fused).double(), "reference")
    # The reference applies the ReLU masks of the tested forward: a pre-activation within rounding of zero may land
    # on either side, and the backward must follow the forward it is compared with.
    # A block passes relu= to its convs; the stem conv applies its own.
    masks: dict[str, torch.Tensor] = {}

    def record_mask(m, args, kwargs, out, name):
        if kwargs.get("relu", m.relu):
            masks[name] = out > 0

    def drop_relu(m, args, kwargs):
        return args, {**kwargs, "relu": False}

    def apply_mask(m, args, kwargs, out, name):  # the tested mask only within rounding of zero (see _MaskedReLU)
        if name not in masks:
            return out
        near = out.detach().abs() <= 0.02 * max(out.detach().abs().max().item(), 1.0)
        return out * torch.where(near, masks[name], out.detach() > 0)

    for (name, conv), ref_conv in zip(fused.named_modules(), ref.modules(), strict=True):
        if isinstance(conv, FusedConv2d):
            conv.register_forward_hook(functools.partial(record_mask, name=name), with_kwargs=True)
            ref_conv.register_forward_pre_hook(drop_relu, with_kwargs=True)
            ref_conv.register_forward_hook(functools.partial(apply_mask, name=name), with_kwargs=True)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    x64 = x.detach().double().requires_grad_()

    with torch.autocast("cpu", dtype=dtype):
        y = fused(x)
    expected = ref(x64)

    assert y.dtype == dtype and len(masks) == 17  # the stem and two convs per block
    assert_within(y, expected, 2 * tolerance(dtype), "logits")
    grad_out = torch.randn(y.shape).to(dtype)
    names = [n for n, _ in fused.named_parameters()]
    grads = torch.autograd.grad(y, [x, *fused.parameters()], grad_out)
    ref_params = dict(ref.named_parameters())
    ref_grads = torch.autograd.grad(expected, [x64, *(ref_params[n] for n in names)], grad_out.double())
    # Back through every layer: measured at most 1.2x the dtype's rtol of each gradient's magnitude over seeds.
    for name, got, want in zip(["x", *names], grads, ref_grads, strict=True):
        assert got.dtype == torch.float32, name
        assert_within(got, want, 4 * tolerance(dtype), f"grad {name}")


@pytest.mark.parametrize("backend", ["auto", "cpu", "reference"])
def test_float64_inputs_stay_float64_under_autocast(backend):
    """Autocast leaves float64 alone in F.conv2d; the fused op and module must too (not run in bf16)."""
    torch.manual_seed(0)
    x, weight, bias = torch.randn(2, 4, 6, 6, dtype=torch.float64), torch.randn(8, 4, 3, 3, dtype=torch.float64), None
    conv = FusedConv2d(4, 8, 3, padding=1, backend=backend).double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = torch.relu(torch.nn.functional.conv2d(x, weight, bias, padding=1))
        y = resnet_fused.conv_bias_add_relu(x, weight, bias, padding=1, backend=backend)
        y_module = conv(x)
    assert want.dtype == y.dtype == y_module.dtype == torch.float64
    assert_within(y, want, 1e-12, "y")
    with torch.no_grad():
        expected = torch.relu(torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1))
    assert_within(y_module, expected, 1e-12, "module y")
