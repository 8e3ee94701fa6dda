"""pytest setup shared by every test file. Helpers live in tests/helpers.py; import them from there."""

from __future__ import annotations

import pytest
import torch
from helpers import TOL, assert_close  # noqa: F401  (re-exported for test files that still import them from here)


@pytest.fixture(autouse=True)
def _fp32_without_tf32():
    """fp32 results are compared at fp32 tolerances, so convolutions must not round inputs to TF32 on a GPU; a test
    that wants TF32 turns it on itself (and compares with ``tf32=True``). Through the legacy ``allow_tf32``, which
    every torch has: after the per-op ``cudnn.conv.fp32_precision = "ieee"`` torch refuses the legacy read, which
    torch.export makes (it then fails on a plain nn.Conv2d, on any device)."""
    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = old
