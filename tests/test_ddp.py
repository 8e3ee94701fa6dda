"""A converted model under DDP (gloo, 2 CPU processes) trains like the original: with frozen BN (a scale/shift
epilogue), BN-free (fused convs and nothing else) and train-mode BN (kept as modules between fused convs)."""

from __future__ import annotations

import datetime
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision.models.resnet as tv
from test_nn import randomize_norms_
from torchvision.ops import FrozenBatchNorm2d

from resnet_fused.convert import convert
from resnet_fused.nn import FusedConv2d

WORLD_SIZE = 2
STEPS = 4
GLOBAL_BATCH = 8
TIMEOUT_S = 180


NORMS = {
    "frozen_bn": FrozenBatchNorm2d,  # detection-style
    "bn_free": lambda channels: torch.nn.Identity(),
    "train_bn": torch.nn.BatchNorm2d,
}
# What convert() must make of each kind's norms (a ConversionReport field), so each test covers the route it names.
REPORTED = {"frozen_bn": "scale_shift", "bn_free": "folded", "train_bn": "unfused"}


def make_model(norm: str) -> torch.nn.Module:
    """A small ResNet with ``norm``'s layers, the same in every process."""
    torch.manual_seed(0)
    model = tv.ResNet(tv.BasicBlock, [1, 1, 1, 1], num_classes=5, norm_layer=NORMS[norm])
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


def _worker(rank: int, store: str, out_path: str, norm: str) -> None:
    torch.set_num_threads(1)  # two processes on two cores
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=60)
    )
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, report = convert(make_model(norm))
        train_bn = norm == "train_bn"
        messages = [str(w.message) for w in caught]
        assert all("norms left unfused" in m for m in messages) and bool(messages) == train_bn, messages
        assert getattr(report, REPORTED[norm]) and not report.kept and bool(report.unfused) == train_bn, report
        # Every conv fused; with a train-mode BN after it, the stem stays as torchvision wrote it.
        plain = [name for name, m in model.named_modules() if type(m) is torch.nn.Conv2d]
        assert plain == (["conv1"] if train_bn else []), plain
        assert sum(isinstance(m, FusedConv2d) for m in model.modules()) > 0
        result = {"report": str(report)}
        for name, m in (("converted", model), ("original", make_model(norm))):
            # Train-mode BN normalizes each rank's shard by its own statistics: only the original under DDP is
            # comparable, so both run here (one after the other, same data).
            if name == "original" and norm != "train_bn":
                continue
            ddp = torch.nn.parallel.DistributedDataParallel(m)
            result[name] = {
                "losses": train(ddp, *make_data(), rank=rank, world_size=WORLD_SIZE),
                "state": m.state_dict(),
            }
        if rank == 0:
            torch.save(result, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_gloo_available(), reason="torch.distributed without gloo")
@pytest.mark.parametrize("norm", list(NORMS))
def test_ddp_trains_like_the_original(tmp_path, norm):
    """frozen_bn and bn_free against single-process training of the original on the global batch; train_bn against
    the original under DDP."""
    out_path = str(tmp_path / "rank0.pt")
    ctx = mp.start_processes(
        _worker, args=(str(tmp_path / "store"), out_path, norm), nprocs=WORLD_SIZE, join=False, start_method="spawn"
    )
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

    if norm == "train_bn":
        losses, reference = result["original"]["losses"], result["original"]["state"]
        trained = list(reference)  # parameters and the BN running statistics DDP broadcasts
    else:
        original = make_model(norm)
        losses = train(original, *make_data())
        reference = original.state_dict()
        trained = [n for n, p in original.named_parameters()]
    converted = result["converted"]

    assert losses[-1] < losses[0]
    torch.testing.assert_close(torch.tensor(converted["losses"]), torch.tensor(losses), rtol=1e-4, atol=1e-5)
    for name, value in converted["state"].items():
        if name in reference:  # FrozenBN buffers became the convs' scale/shift
            torch.testing.assert_close(value, reference[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    assert set(trained) <= set(converted["state"]), result["report"]  # every trained weight was compared
