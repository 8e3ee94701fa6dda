"""The CPU passes index with int64: a tensor past 2^31 elements is right at its far end (bf16, ~4.3 GB each), in NCHW
and in channels_last. Each test holds at most two such tensors (~9 GB), one after the other."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close

import resnet_fused

BIG = 2**31 + 2**20  # elements in x and y


@pytest.fixture  # freed after its test, before the next one allocates its own
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


# channels_last y (1, K, H, W): rows of K = 1031 channels, not a multiple of bf16's 16 lanes, so each pixel ends in
# a scalar tail, and so does the flat tensor.
K_CL, H_CL, W_CL = 1031, 1024, 2036
PERIOD = 4093  # prime: no power-of-two offset (a wrapped 32-bit index) maps a pixel onto one with the same values


def _pixel_values(p: torch.Tensor) -> torch.Tensor:
    """A position-dependent value per pixel: multiples of 1/8 in [-4, 4), periodic in the pixel index."""
    return ((p % PERIOD) % 64).double() / 8 - 4


def _channel_vectors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per channel: the value added to each pixel's, the scale (1 or 0.5) and the bias (multiples of 1/16 in [-1, 1)),
    so that every y and its float64 reference are equal in bf16: sums of at most 8 significant bits."""
    k = torch.arange(K_CL)
    return (k * 7 % 64).double() / 8 - 4, 1 - (k % 2).double() / 2, (k * 5 % 32).double() / 16 - 1


def _windows(numel: int) -> torch.Tensor:
    """Flat indices before, across and at the end of 2^31."""
    starts = (0, 2**31 - 2053, numel - 4099)
    return torch.cat([torch.arange(s, s + 4099) for s in starts])


def _lin_reference(e: torch.Tensor) -> torch.Tensor:
    """y = (pixel + channel value) * scale + bias in float64 at flat channels_last indices ``e``."""
    add, scale, bias = _channel_vectors()
    p, k = e // K_CL, e % K_CL
    return (_pixel_values(p) + add[k]) * scale[k] + bias[k]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU kernels; the GPU suites have their own large tests")
def test_channels_last_epilogue_and_masked_grads_past_2_31_elements():
    """The channels_last branches of the epilogue pass (the forward's when oneDNN does not take the epilogue, here
    called alone, without a conv that would cost a minute) and of the backward's mask pass, with and without
    grad_bias, checked in windows around element 2^31. grad_out and out are one tensor with negative and positive
    values, so the mask matters: grad_residual = out where out > 0, else 0."""
    y = torch.empty(1, K_CL, H_CL, W_CL, dtype=torch.bfloat16, memory_format=torch.channels_last)
    assert y.numel() > 2**31
    flat = y.permute(0, 2, 3, 1).view(-1)  # channels_last memory order
    rows = flat.view(-1, K_CL)
    add, scale, bias = (t.to(torch.bfloat16) for t in _channel_vectors())
    for p0 in range(0, rows.shape[0], 2**18):
        p = torch.arange(p0, min(p0 + 2**18, rows.shape[0]))
        torch.add(_pixel_values(p).to(torch.bfloat16)[:, None], add, out=rows[p[0] : p[-1] + 1])
    idx = _windows(y.numel())
    expected = _lin_reference(idx)
    assert torch.equal(expected.to(torch.bfloat16).double(), expected), "the reference must be exact in bf16"

    torch.ops.resnet_fused._epilogue_(y, bias, None, scale, False)
    assert torch.equal(flat[idx].double(), expected), "y: wrong values in the windows around 2^31"

    # x and weight are read for their shapes and x's layout only: no conv gradient is asked for.
    x = torch.empty(1, 2, H_CL, W_CL, dtype=torch.bfloat16, memory_format=torch.channels_last)
    weight = y.new_empty(()).expand(K_CL, 2, 1, 1)
    backward = torch.ops.resnet_fused.conv_bias_add_relu_backward
    conv = ([1, 1], [0, 0], [1, 1], 1, True)
    masked = torch.where(expected <= 0, 0.0, expected)
    assert (expected < 0).any() and (expected > 0).any()
    for mask in ([False, False, False, True], [False, False, True, True]):  # the flat pass; the blocked sums
        _, _, grad_bias, grad_residual = backward(y, y, x, weight, None, *conv, mask)
        assert grad_residual.is_contiguous(memory_format=torch.channels_last)
        got = grad_residual.permute(0, 2, 3, 1).reshape(-1)[idx].double()
        assert torch.equal(got, masked), f"grad_residual (output_mask={mask}): wrong values around 2^31"
        del grad_residual
    # grad_bias: the pixel values repeat with PERIOD, so the float64 sum over all pixels is a weighted sum of one.
    hw = H_CL * W_CL
    counts = torch.full((PERIOD,), hw // PERIOD, dtype=torch.float64)
    counts[: hw % PERIOD] += 1
    one_period = _lin_reference(torch.arange(PERIOD * K_CL)).view(PERIOD, K_CL).clamp_min(0)
    assert_close(grad_bias, counts @ one_period, torch.bfloat16, "grad_bias")

    torch.ops.resnet_fused._epilogue_(y, None, None, None, True)
    assert torch.equal(flat[idx].double(), masked), "relu(y): wrong values in the windows around 2^31"
