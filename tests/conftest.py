"""pytest setup shared by every test file. Helpers live in tests/helpers.py; import them from there."""

from __future__ import annotations

import pytest
import torch
from helpers import TOL, assert_close  # noqa: F401  (re-exported for test files that still import them from here)


@pytest.fixture(autouse=True)
def _fp32_without_tf32():
    """fp32 results are compared at fp32 tolerances, so convolutions must not round inputs to TF32 on a GPU; a test
    that wants TF32 turns it on itself (and compares with ``tf32=True``)."""
    if not torch.cuda.is_available():
        yield
        return
    conv = getattr(torch.backends.cudnn, "conv", None)
    if not hasattr(conv, "fp32_precision"):  # a torch without the per-op settings
        old = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        yield
        torch.backends.cudnn.allow_tf32 = old
        return
    old = conv.fp32_precision
    conv.fp32_precision = "ieee"
    yield
    conv.fp32_precision = old
