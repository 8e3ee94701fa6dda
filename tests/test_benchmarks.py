"""Each benchmark script runs on a tiny configuration and writes JSON with the documented fields.

No timing is asserted: only that every implementation was measured and the records carry median/p25/p75 (ms), peak
memory and the machine info.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import resnet_fused
from resnet_fused.backends import BACKENDS

pytest.importorskip("torchvision")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from benchmarks import bench_model, bench_ops, main

TINY = [
    "--hw",
    "32",
    "--batch",
    "2",
    "--rounds",
    "2",
    "--warmup",
    "1",
    "--min-sample-ms",
    "1",
    "--threads",
    "1",
    "--no-progress",
]
MACHINE_KEYS = {"cpu_model", "logical_cpus", "threads", "torch", "triton", "device", "memory_method", "timer"}


@pytest.fixture(autouse=True)
def _restore_threads():
    """The scripts fix torch's thread count; give the worker its own back afterwards."""
    threads = bench_ops.torch.get_num_threads()
    yield
    bench_ops.torch.set_num_threads(threads)


def _backend_impls() -> set[str]:
    """The backends the op benchmark times on CPU tensors: those ``auto`` may pick there, read from the table."""
    return {row.name for row in BACKENDS if "cpu" in row.auto_devices and not row.unavailable()}


def _check_record(rec: dict) -> None:
    for key in ("median_ms", "p25_ms", "p75_ms"):
        assert isinstance(rec[key], float) and math.isfinite(rec[key]) and rec[key] > 0, (key, rec)
    assert rec["p25_ms"] <= rec["median_ms"] <= rec["p75_ms"]
    assert isinstance(rec["peak_mem_bytes"], int) and rec["peak_mem_bytes"] >= 0
    assert len(rec["samples_ms"]) == rec["rounds"] == 2


def _check_machine(machine: dict, threads: int | None = None) -> None:
    assert MACHINE_KEYS <= machine.keys()
    assert machine["threads"] >= 1
    if threads is not None:
        assert machine["threads"] == threads


def test_shapes_are_traced_from_torchvision():
    cases = bench_ops.trace_conv_cases(("resnet18", "resnet50"))
    names = {c.name for c in cases}
    assert "7x7 3->64 224x224 s2 bias+relu" in names  # stem, shared by both models
    assert "1x1 64->256 56x56 s1 bias+res+relu" in names  # ResNet-50 expansion with the residual add
    assert "1x1 64->256 56x56 s1 bias" in names  # its projection shortcut, same conv, linear epilogue
    assert "3x3 128->128 28x28 s1 bias+res+relu" in names  # ResNet-18 block end
    assert {e for c in cases for e in [c.epilogue]} == set(bench_ops.EPILOGUES)
    assert len(cases) == len(set(cases)) == 34  # 15 of ResNet-18 + 24 of ResNet-50, 5 shared
    layers = [layer for c in cases for layer in c.layers]
    assert len(layers) == 20 + 53  # every conv of both models, each in exactly one case


def test_bench_ops_tiny(tmp_path):
    path = tmp_path / "ops.json"
    argv = ["--models", "resnet18", "--max-cases", "2", "--json", str(path)]
    argv += ["--png", str(tmp_path / "ops.png"), "--md", str(tmp_path / "ops.md"), *TINY]
    assert bench_ops.main(argv) == 0
    payload = json.loads(path.read_text())
    _check_machine(payload["machine"], threads=1)
    records = payload["records"]
    expected = _backend_impls() | set(bench_ops.BASE_IMPLS)
    assert "cpu" in expected
    seen: dict[tuple, set] = {}
    for rec in records:
        _check_record(rec)
        seen.setdefault((rec["case"], rec["pass"], rec["dtype"], rec["layout"]), set()).add(rec["impl"])
        assert rec["speedup_vs_eager"]["median"] > 0 and rec["speedup_vs_conv_alone"]["median"] > 0
    assert len(seen) == 2 * 2  # 2 cases x (fwd, fwd+bwd)
    assert all(impls == expected for impls in seen.values()), seen
    assert all(r["compile_s"] > 0 for r in records if r["impl"] == "compile")
    assert {s["impl"] for s in payload["summary"]} == (_backend_impls() | {"compile"})
    assert (tmp_path / "ops.png").stat().st_size > 0
    assert "speedup" in (tmp_path / "ops.md").read_text()


def test_bench_model_tiny(tmp_path):
    path = tmp_path / "model.json"
    argv = ["--models", "resnet18", "--json", str(path), "--md", str(tmp_path / "model.md"), *TINY]
    assert bench_model.main(argv) == 0
    payload = json.loads(path.read_text())
    _check_machine(payload["machine"])
    impls: dict[tuple, set] = {}
    for rec in payload["records"]:
        _check_record(rec)
        impls.setdefault((rec["mode"], rec["variant"]), set()).add(rec["impl"])
    assert impls == {
        ("inference", "eval-bn"): {"eager", "fused", "compile"},
        ("train", "bn-free"): {"fused", "unfused"},
        ("train", "frozen-bn"): {"fused", "unfused"},
    }


def test_main_tiny(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main.main(["--tiny", "--threads", "1", "--out", str(tmp_path), "--json", str(path), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "equivalence vs float64 reference" in printed and "FAIL" not in printed
    payload = json.loads(path.read_text())
    eq = payload["equivalence"]
    assert eq["passed"]
    assert {(r["backend"], r["dtype"]) for r in eq["results"]} == {
        (b, d) for b in resnet_fused.available_backends() for d in ("fp32", "bf16")
    }
    _check_machine(payload["ops"]["machine"])
    for rec in payload["ops"]["records"]:
        _check_record(rec)
    for name in ("ops.json", "ops.png", "ops.md", "equivalence.json"):
        assert (tmp_path / name).stat().st_size > 0


def test_dilated_case_geometry_matches_conv2d():
    """A dilated case's output size, inputs and every implementation agree with F.conv2d's shape."""
    case = bench_ops.ConvCase(c=4, k=6, r=3, s=3, stride=2, padding=1, dilation=2, h=11, w=8, epilogue="bias+res+relu")
    assert case.name == "3x3 4->6 11x8 s2 d2 bias+res+relu"
    inp = bench_ops.make_inputs(case, 2, torch.float32, torch.channels_last, torch.device("cpu"), requires_grad=False)
    expected = F.conv2d(inp.x, inp.weight, None, stride=2, padding=1, dilation=2).shape
    assert tuple(expected[2:]) == case.out_hw() and inp.residual.shape == expected
    impls = bench_ops.op_impls(case, inp, bench_ops.timed_backends(torch.device("cpu")), with_compile=False)
    assert "cpu" in impls
    for name, fn in impls.items():
        assert fn().shape == expected, name
