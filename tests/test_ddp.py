"""A converted model under DDP (gloo, 2 CPU processes) trains like the original."""

from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision.models.resnet as tv
from test_nn import randomize_norms_
from torchvision.ops import FrozenBatchNorm2d

from resnet_fused.convert import convert

WORLD_SIZE = 2
STEPS = 4
GLOBAL_BATCH = 8
TIMEOUT_S = 180


def make_model() -> torch.nn.Module:
    """A small detection-style ResNet (FrozenBatchNorm2d), the same in every process."""
    torch.manual_seed(0)
    model = tv.ResNet(tv.BasicBlock, [1, 1, 1, 1], num_classes=5, norm_layer=FrozenBatchNorm2d)
    return randomize_norms_(model)


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g)
    return x, torch.randint(0, 5, (GLOBAL_BATCH,), generator=g)


def train(model, x, target, rank=0, world_size=1) -> list[float]:
    """SGD on this rank's slice of the global batch; returns the global mean loss per step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    shard = GLOBAL_BATCH // world_size
    rows = slice(rank * shard, (rank + 1) * shard)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = F.cross_entropy(model(x[rows]), target[rows])
        loss.backward()  # under DDP: gradients averaged over ranks = the global batch's gradient
        opt.step()
        if world_size > 1:
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= world_size
        losses.append(loss.item())
    return losses


def _worker(rank: int, port: int, out_path: str) -> None:
    torch.set_num_threads(1)  # two processes on two cores
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=60))
    try:
        model, report = convert(make_model())
        assert report.scale_shift, report
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        losses = train(ddp, *make_data(), rank=rank, world_size=WORLD_SIZE)
        if rank == 0:
            torch.save({"losses": losses, "state": model.state_dict()}, out_path)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_gloo_available(), reason="torch.distributed without gloo")
def test_ddp_matches_single_process_training_of_the_original(tmp_path):
    out_path = str(tmp_path / "rank0.pt")
    ctx = mp.start_processes(_worker, args=(free_port(), out_path), nprocs=WORLD_SIZE, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"DDP workers did not finish in {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    result = torch.load(out_path)

    original = make_model()
    losses = train(original, *make_data())

    assert losses[-1] < losses[0]
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(losses), rtol=1e-4, atol=1e-5)
    reference = original.state_dict()
    for name, value in result["state"].items():
        if name in reference:  # FrozenBN buffers became the convs' scale/shift
            torch.testing.assert_close(value, reference[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    trained = [n for n, p in original.named_parameters()]
    assert set(trained) <= set(result["state"])  # every trained weight was compared
