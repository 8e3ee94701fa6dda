"""The modules through the Triton backend, on CPU tensors under the interpreter.

Run with ``TRITON_INTERPRET=1 pytest tests/test_nn_triton.py`` (the variable must be set before
triton is imported, hence a separate pytest invocation); skipped otherwise. The interpreter costs
~0.2 s per kernel launch, so the model is as small as a ResNet gets: a stem and one BasicBlock.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import INTERPRET
from test_nn import synthetic_batches, train
from torch import nn

import resnet_fused
from resnet_fused.nn import BasicBlock, FusedConv2d

pytestmark = pytest.mark.skipif(
    not INTERPRET or "triton" not in resnet_fused.available_backends(),
    reason="needs TRITON_INTERPRET=1 and the triton backend",
)


class MicroResNet(nn.Module):
    """BN-free: fused stem conv, one BasicBlock, pool, linear head; every conv on ``backend``."""

    def __init__(self, backend: str, classes: int = 5) -> None:
        super().__init__()
        self.stem = FusedConv2d(3, 4, 3, padding=1, backend=backend)
        self.block = BasicBlock(4, 4, norm_layer=nn.Identity)
        self.block.conv1.backend = self.block.conv2.backend = backend
        self.fc = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(self.stem(x)).mean((2, 3)))


def unfused_forward(model: MicroResNet, x: torch.Tensor) -> torch.Tensor:
    def conv(c, a):
        return nn.Conv2d.forward(c, a)

    a = F.relu(conv(model.stem, x))
    h = F.relu(conv(model.block.conv1, a))
    a = F.relu(conv(model.block.conv2, h) + a)
    return model.fc(a.mean((2, 3)))


def test_bn_free_resnet_trains_like_the_unfused_model_through_triton():
    torch.manual_seed(0)
    fused = MicroResNet("triton")
    unfused = copy.deepcopy(fused)
    x, target = synthetic_batches(batch=2, size=6)

    losses = train(fused, lambda m, a: m(a), 20, x, target)
    ref_losses = train(unfused, unfused_forward, 20, x, target)

    assert losses[-1] < losses[0]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fused(x[0])
    ran = {e.key for e in prof.key_averages()}
    assert "resnet_fused::conv_bias_add_relu_triton" in ran, sorted(ran)  # no silent fallback
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(fused.named_parameters(), unfused.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
