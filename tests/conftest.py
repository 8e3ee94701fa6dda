"""Shared test helpers: backends under test, dtype tolerances, float64 comparison and input makers."""

from __future__ import annotations

import os

import pytest
import torch

import resnet_fused

# Backends the correctness suite runs against. CI runs the Triton ones in a separate invocation under
# TRITON_INTERPRET=1 with RESNET_FUSED_TEST_BACKENDS=triton.
TEST_BACKENDS = [b for b in os.environ.get("RESNET_FUSED_TEST_BACKENDS", "cpu").split(",") if b]
# Trimmed parametrization for slow backends (the interpreter); every code path stays covered.
TRIM = os.environ.get("RESNET_FUSED_TEST_TRIM", "1" if "triton" in TEST_BACKENDS else "0") == "1"

# Relative tolerance per dtype against a float64 reference; atol scales with the reference's magnitude.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def backend_params() -> list:
    return [
        pytest.param(b, marks=pytest.mark.skipif(b not in resnet_fused.available_backends(), reason=f"{b} unavailable"))
        for b in TEST_BACKENDS
    ]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str, reductions: int = 1):
    """Compare with a float64 ``expected``. ``reductions`` is the length of the sums behind each element: the
    rounding error of an fp sum grows with it, so the bound does too (sqrt, as for random rounding errors)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    tol = TOL[dtype] * max(1.0, reductions**0.5 / 4)
    finite = expected[torch.isfinite(expected)]
    mag = finite.abs().max().item() if finite.numel() else 1.0
    torch.testing.assert_close(
        actual.double(), expected, rtol=tol, atol=tol * max(mag, 1.0), equal_nan=True, msg=lambda m: f"{what}: {m}"
    )


def make_tensor(shape, dtype: torch.dtype, *, seed_gen: torch.Generator, exact: bool = False) -> torch.Tensor:
    """Random values; with ``exact``, small multiples of 1/4 so that sums of products are exact in bf16/fp16 and a
    reference cannot round a pre-activation across zero (which would flip the ReLU mask)."""
    if exact:
        return (torch.randint(-4, 5, shape, generator=seed_gen) / 4).to(dtype)
    return torch.randn(shape, generator=seed_gen, dtype=torch.float64).to(dtype)


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """'nchw', 'channels_last', or 'noncontig' (a strided view that is neither)."""
    if layout == "nchw":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "noncontig":
        # Every other column of a wider tensor: neither layout once W > 1 and C, H are not both 1.
        n, c, h, w = t.shape
        big = torch.zeros(n, c, h, 2 * w, dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    raise ValueError(layout)
