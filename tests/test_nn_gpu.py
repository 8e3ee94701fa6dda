"""The modules on a GPU: a converted ResNet on each GPU backend against the float64 original.

The correctness suite checks the op on a GPU; these check what users run there: ``convert`` and its fused blocks
moved with ``.to("cuda")``, fine-tuned with frozen norms (forward and every trainable parameter's gradient) and
served with folded norms (fp32, and bf16 under autocast), in NCHW and channels_last. On a machine without a GPU
backend they are skipped; tests/test_convert.py runs the same models on the CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import Target, assert_close, target_params
from test_convert import small_resnet
from test_nn import randomize_norms_

from resnet_fused.backends import BACKENDS
from resnet_fused.convert import convert

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
# The longest reduction behind a gradient element of small_resnet at 32x32, as tests/test_convert.py counts it.
GRAD_REDUCTIONS = 4608


def _gpu_targets() -> list:
    """The GPU targets, and the visible skip of each requested GPU backend that cannot run here."""
    params = []
    for p in target_params():
        t = p.values[0]
        if t.device == "cuda" or (t.device == "-" and "cuda" in BACKENDS[t.backend].devices):
            params.append(p)
    return params or [pytest.param(None, marks=pytest.mark.skip(reason="no GPU backend runs here"))]


def fine_tune_step_matches(target: Target, layout: str) -> None:
    """convert(freeze_bn=True) on ``target``: the output and every trainable parameter's gradient against the
    original in eval mode (what frozen norms compute), in float64 on the CPU."""
    torch.manual_seed(0)
    model = randomize_norms_(small_resnet()).train()
    converted, report = convert(model, freeze_bn=True, backend=target.backend)
    assert report.unfused == []
    converted = converted.to(device=target.device, memory_format=LAYOUTS[layout])
    reference = copy.deepcopy(model).double().eval()
    x = torch.randn(2, 3, 32, 32)
    y = converted(x.to(device=target.device, memory_format=LAYOUTS[layout]))
    expected = reference(x.double())
    assert_close(y, expected, torch.float32, "output")
    # A sum, not a mean: gradients of order 1 to 100, where assert_close's floor of 1 on the magnitude is no slack.
    y.square().sum().backward()
    expected.square().sum().backward()
    ref = dict(reference.named_parameters())
    trained = {name: p for name, p in converted.named_parameters() if p.requires_grad}
    assert "conv1.weight" in trained and "layer4.0.conv2.weight" in trained and "fc.weight" in trained
    for name, p in trained.items():
        assert p.grad is not None, f"{name} got no gradient"
        assert p.grad.device.type == target.device
        assert_close(p.grad, ref[name].grad, torch.float32, f"grad {name}", reductions=GRAD_REDUCTIONS)


def serving_matches(target: Target, layout: str, autocast: torch.dtype | None) -> None:
    """convert() of an eval model (norms folded) on ``target``: the logits against the float64 original, in fp32
    or under autocast to ``autocast``."""
    torch.manual_seed(0)
    model = randomize_norms_(small_resnet()).eval()
    converted, report = convert(model, backend=target.backend)
    assert report.scale_shift == [] and report.unfused == []
    converted = converted.to(device=target.device, memory_format=LAYOUTS[layout])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast(target.device, dtype=autocast or torch.float32, enabled=autocast is not None):
        y = converted(x.to(device=target.device, memory_format=LAYOUTS[layout]))
        expected = copy.deepcopy(model).double()(x.double())
    assert y.device.type == target.device
    assert_close(y.float(), expected, autocast or torch.float32, "logits")


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("target", _gpu_targets())
def test_a_converted_resnet_fine_tunes_as_the_float64_original(target, layout):
    fine_tune_step_matches(target, layout)


@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "autocast_bf16"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("target", _gpu_targets())
def test_a_converted_resnet_serves_as_the_float64_original(target, layout, autocast):
    serving_matches(target, layout, autocast)
