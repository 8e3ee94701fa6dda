"""The CPU passes index with int64: a tensor past 2^31 elements is right at its far end (bf16, ~4.3 GB each)."""

from __future__ import annotations

import pytest
import torch

import resnet_fused

BIG = 2**31 + 2**20  # elements in x and y


@pytest.fixture(scope="module")
def big_case():
    h = 32768
    w = -(-BIG // h)
    x = torch.empty(1, 1, h, w, dtype=torch.bfloat16)
    # Cheap, position-dependent values: a repeating ramp, so a wrong offset reads a wrong value.
    ramp = (torch.arange(4093, dtype=torch.float32) / 512 - 4).to(torch.bfloat16)
    flat = x.view(-1)
    for start in range(0, flat.numel(), 2**26):
        n = min(2**26, flat.numel() - start)
        idx = torch.arange(start, start + n, dtype=torch.int64) % ramp.numel()
        flat[start : start + n] = ramp[idx]
    weight = torch.full((1, 1, 1, 1), 2.0, dtype=torch.bfloat16)
    bias = torch.tensor([0.5], dtype=torch.bfloat16)
    return x, weight, bias, ramp


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU kernels; the GPU suites have their own large tests")
def test_forward_and_bias_grad_past_2_31_elements(big_case):
    x, weight, bias, ramp = big_case
    assert x.numel() > 2**31
    y = resnet_fused.conv_bias_add_relu(x, weight, bias, backend="cpu")
    flat_y = y.view(-1)
    for start in (0, 2**31 - 17, x.numel() - 4099):  # a window before, across and at the end of 2^31
        idx = torch.arange(start, start + 4099, dtype=torch.int64)
        expected = torch.relu(ramp[idx % ramp.numel()].float() * 2 + 0.5).to(torch.bfloat16)
        assert torch.equal(flat_y[idx], expected), f"wrong values in the window at {start}"

    # grad_bias alone: one pass over grad_out (= y here) and out, summed in fp32 per block.
    _, _, grad_bias, _ = torch.ops.resnet_fused.conv_bias_add_relu_backward(
        y, y, x, weight, None, [1, 1], [0, 0], [1, 1], 1, True, [False, False, True, False]
    )
    period = ramp.numel()
    per_period = torch.relu(ramp.float() * 2 + 0.5).to(torch.bfloat16).double()
    full, rest = divmod(x.numel(), period)
    expected_sum = full * per_period.sum() + per_period[:rest].sum()
    # bf16 result of a sum of ~2^31 values: compare at bf16 resolution.
    torch.testing.assert_close(grad_bias.double(), expected_sum.view(1), rtol=8e-3, atol=0)
