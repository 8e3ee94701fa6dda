"""What only a GPU can show for both GPU backends (cuda, triton): tensors on a device other than the current one,
CUDA graph capture and replay, and bitwise-equal gradients across processes under deterministic algorithms.

Skipped without a GPU; `make gpu-test` runs it.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import FULL, Case, check_call, make_inputs

import resnet_fused
from resnet_fused.backends import BACKENDS

GPU_BACKENDS = [
    pytest.param(
        name, marks=pytest.mark.skipif(bool(BACKENDS[name].unavailable()), reason=BACKENDS[name].unavailable())
    )
    for name in ("cuda", "triton")
]
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CASE = Case(2, 16, 12, 10, 24, 3, 3, 1, 1)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_tensors_on_another_device_than_the_current_one(backend):
    """Device 0 current, tensors on cuda:1 (a DDP script that never calls set_device): right results on cuda:1."""
    inputs = make_inputs(CASE, torch.float32, "channels_last", FULL, device="cuda:1")
    with torch.cuda.device(0):
        y = resnet_fused.conv_bias_add_relu(**inputs.tensors, **inputs.kwargs, backend=backend)
        check_call(y, inputs, torch.float32, f"{backend} on cuda:1")
        assert torch.cuda.current_device() == 0
    assert y.device == torch.device("cuda:1")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_capture_after_warmup(backend):
    """Forward and backward warmed up once, then captured and replayed: the same bits as eager."""
    inputs = make_inputs(CASE, torch.float32, "channels_last", FULL, device="cuda")
    leaves = inputs.leaves()
    grad_out = inputs.grad_out

    def step():
        y = resnet_fused.conv_bias_add_relu(**inputs.tensors, **inputs.kwargs, backend=backend)
        return (y.detach(), *torch.autograd.grad(y, list(leaves.values()), grad_out))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        eager = step()  # warm-up: autotuning and cuDNN plans happen here, outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for name, a, b in zip(["y", *leaves], eager, captured, strict=True):
        assert torch.equal(a, b), name


_SCRIPT = """
import sys, torch, resnet_fused
torch.use_deterministic_algorithms(True)
g = torch.Generator().manual_seed(0)
x = torch.randn(8, 64, 28, 28, generator=g).cuda().to(memory_format=torch.channels_last).requires_grad_()
w = (torch.randn(64, 64, 3, 3, generator=g) / 24).cuda().requires_grad_()
b = torch.randn(64, generator=g).cuda().requires_grad_()
r = torch.randn(8, 64, 28, 28, generator=g).cuda().to(memory_format=torch.channels_last).requires_grad_()
y = resnet_fused.conv_bias_add_relu(x, w, b, r, padding=1, backend=sys.argv[1])
grads = torch.autograd.grad(y, [x, w, b, r], torch.randn(y.shape, generator=g).cuda())
torch.save([t.cpu() for t in (y.detach(), *grads)], sys.argv[2])
"""


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_deterministic_gradients_across_processes(backend, tmp_path):
    results = []
    for i in range(2):
        path = tmp_path / f"{i}.pt"
        subprocess.run([sys.executable, "-c", _SCRIPT, backend, str(path)], check=True, timeout=600)
        results.append(torch.load(path))
    for name, a, b in zip(("y", "grad_x", "grad_weight", "grad_bias", "grad_residual"), *results, strict=True):
        assert torch.equal(a, b), f"{backend}: {name} differs between two processes"
