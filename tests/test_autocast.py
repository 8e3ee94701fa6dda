"""A converted torchvision resnet18 runs under CPU autocast, fp16 and bf16, like the unconverted model does."""

from __future__ import annotations

import pytest
import torch
import torchvision
from helpers import tolerance

import resnet_fused


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
    # Many layers deep, each rounding to the autocast dtype: compare at the tolerance of a long reduction.
    rtol = tolerance(dtype, 64 * 9 * 20)
    err = (got.double() - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol:.2g} * {scale:.3g}"
    # No worse than the unconverted model under the same autocast, up to a factor for summation order.
    assert err <= 4 * (plain.double() - want).abs().max().item() + 1e-6
