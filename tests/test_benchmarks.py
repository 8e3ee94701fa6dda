"""Each benchmark script runs on a tiny configuration and writes JSON with the documented fields.

No timing is asserted: only that every implementation was measured and the records carry median/p25/p75 (ms), peak
memory and the machine info.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

import resnet_fused
from resnet_fused.backends import BACKENDS

pytest.importorskip("torchvision")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from benchmarks import bench_model, bench_ops, main, timing

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


def _prepacked_impls() -> set[str]:
    """The labels of the prepacked fused rows: the package's two (exact and fused ReLU) where it offers them, else
    torch's oneDNN post-ops."""
    try:
        from resnet_fused.inference import optimize_for_inference  # noqa: F401
    except ImportError:
        return {"onednn_prepacked"}
    return {"prepacked", "prepacked-fuse-relu"}


def _timed(records: list[dict]) -> list[dict]:
    """The records with timings (a variant that could not run has a ``status`` instead)."""
    return [r for r in records if "status" not in r]


def _check_record(rec: dict, rounds: int = 2) -> None:
    for key in ("median_ms", "p25_ms", "p75_ms"):
        assert isinstance(rec[key], float) and math.isfinite(rec[key]) and rec[key] > 0, (key, rec)
    assert rec["p25_ms"] <= rec["median_ms"] <= rec["p75_ms"]
    if rec["impl"] == "ort":
        assert rec["peak_mem_bytes"] is None and "own arena" in rec["peak_mem_note"]
    else:
        assert isinstance(rec["peak_mem_bytes"], int) and rec["peak_mem_bytes"] >= 0
    assert len(rec["samples_ms"]) == rec["rounds"] == rounds


def _check_machine(machine: dict, threads: int | None = None) -> None:
    assert MACHINE_KEYS <= machine.keys()
    assert machine["threads"] >= 1
    if threads is not None:
        assert machine["threads"] == threads


def test_median_ci_brackets_the_median_and_narrows_with_rounds():
    rng = random.Random(1)
    few = [1.0 + rng.gauss(0, 0.05) for _ in range(8)]
    many = [1.0 + rng.gauss(0, 0.05) for _ in range(200)]
    for values in (few, many):
        lo, hi = timing.median_ci(values)
        assert lo <= statistics.median(values) <= hi
    assert timing.median_ci(many)[1] - timing.median_ci(many)[0] < timing.median_ci(few)[1] - timing.median_ci(few)[0]
    assert timing.median_ci([2.0] * 6) == (2.0, 2.0)
    summary = timing.Stats(times_ms=[1.0] * 8, inner=1, ratios={"eager": few}).ratio_summary("eager")
    assert (summary["ci_lo"], summary["ci_hi"]) == timing.median_ci(few)


@pytest.mark.parametrize("n, ranks", [(5, None), (6, (1, 6)), (7, (1, 7)), (10, (2, 9)), (15, (4, 12)), (30, (10, 21))])
def test_median_ci_is_the_order_statistic_interval_that_covers_95_percent(n, ranks):
    values = [float(v) for v in range(1, n + 1)]
    random.Random(n).shuffle(values)
    lo, hi = timing.median_ci(values)
    if ranks is None:  # no rank covers 95 %: no interval, so no verdict
        assert math.isnan(lo) and math.isnan(hi)
        assert timing.verdict(lo, hi, 1.0, n) is None
        return
    assert (lo, hi) == ranks
    # Its coverage, P(lo <= median <= hi) = 1 - 2 P(Binomial(n, 1/2) < j), reaches 95 %, and the next rank's does not.
    j = ranks[0]
    coverage = [1 - 2 * sum(math.comb(n, i) for i in range(r)) / 2**n for r in (j, j + 1)]
    assert coverage[0] >= 0.95 > coverage[1]


def test_disturbed_rounds_are_those_where_every_variant_ran_slow():
    def rec(case, impl, samples):
        return {"case": case, "pass": "fwd", "dtype": "fp32", "layout": "nchw", "batch": 8, "impl": impl,
                "samples_ms": samples}  # fmt: skip

    records = [
        # a spell over most of the rounds (the median is a slow round): rounds 4-7 flagged
        rec("a", "eager", [3.9, 3.9, 3.9, 24.2, 21.4, 26.5, 24.7]),
        rec("a", "cpu", [3.8, 3.7, 3.8, 20.0, 19.9, 25.0, 22.0]),
        # one variant slow alone: its own doing, not the machine's
        rec("b", "eager", [2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]),
        rec("b", "cpu", [2.0, 9.0, 9.0, 2.0, 2.0, 2.0, 2.0]),
        # a single variant: nothing to tell a spell by
        rec("c", "eager", [1.0, 5.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
    ]
    found = timing.disturbed_rounds(records, bench_ops.ROUND_KEYS)
    assert found == {"a fwd fp32 nchw 8": [3, 4, 5, 6]}
    assert timing.disturbed_text(found, "op benchmark")[1] == "  a fwd fp32 nchw 8: rounds 4, 5, 6, 7"
    assert timing.disturbed_text({}, "op benchmark") == []


def test_render_recomputes_ratio_summaries_from_the_saved_samples():
    base = {"case": "c", "pass": "fwd", "dtype": "fp32", "layout": "nchw", "batch": 8}
    eager = {**base, "impl": "eager", "samples_ms": [2.0, 2.2, 1.8, 2.0, 2.1, 1.9, 2.0]}
    fused = {**base, "impl": "cpu", "samples_ms": [1.0, 1.0, 1.0, 1.1, 1.0, 0.9, 1.0],
             "speedup_vs_eager": {"median": -1.0, "p25": -1.0, "p75": -1.0, "ci_lo": -1.0, "ci_hi": -1.0}}  # fmt: skip
    other_rounds = {**fused, "batch": 1, "speedup_vs_eager": {"median": -1.0}}  # no eager timed with it: kept
    timing.refresh_ratio_summaries([eager, fused, other_rounds], bench_ops.ROUND_KEYS)
    ratios = [e / f for e, f in zip(eager["samples_ms"], fused["samples_ms"], strict=True)]
    assert fused["speedup_vs_eager"] == timing.ratio_summary(ratios)
    assert fused["speedup_vs_eager"]["median"] == statistics.median(ratios)
    assert other_rounds["speedup_vs_eager"] == {"median": -1.0}


@pytest.mark.parametrize(
    ("ci", "rounds", "verdict"),
    [((1.06, 1.12), 30, "met"), ((1.01, 1.07), 30, "undecided"), ((0.97, 1.04), 30, "MISSED"),
     ((1.06, 1.12), 3, "undecided"), ((0.97, 1.04), 4, "undecided")],
)  # fmt: skip
def test_train_target_is_decided_by_the_interval(ci, rounds, verdict):
    """Met or missed only when the whole interval is on one side of the goal, and only from timing.MIN_ROUNDS rounds
    on: fewer make no 95 % interval of a median."""
    base = {"model": "resnet50", "mode": "train", "variant": "bn-free", "dtype": "fp32", "layout": "channels_last",
            "input_hw": 224, "batch": 8, "rounds": rounds, "peak_mem_bytes": 1}  # fmt: skip
    ratio = {"median": sum(ci) / 2, "p25": ci[0], "p75": ci[1], "ci_lo": ci[0], "ci_hi": ci[1]}
    records = [{**base, "impl": "fused", "speedup_vs_unfused": ratio}, {**base, "impl": "unfused"}]
    lines = bench_model.targets_text(bench_model.targets(records)).splitlines()
    speed = next(line for line in lines if "fused >=" in line)
    assert speed.startswith(f"  [{verdict}]") and f"95% CI {ci[0]:.3f}-{ci[1]:.3f}, {rounds} rounds" in speed


def _op_summary(pass_: str, shape_ci: dict, geomean_ci=(1.085, 1.095), floor_ci=(0.99, 1.01), rounds=7) -> dict:
    """A summary entry of the target group with the given per-shape and geomean intervals (medians inside them)."""
    medians = {c: sum(ci) / 2 for c, ci in shape_ci.items()}
    worst = min(medians, key=medians.get)
    return {"dtype": "fp32", "layout": "channels_last", "model_shapes": "resnet50", "impl": "cpu", "pass": pass_,
            "n_shapes": len(shape_ci), "geomean_speedup_vs_eager": sum(geomean_ci) / 2,
            "geomean_speedup_ci": list(geomean_ci), "min_speedup_vs_eager": medians[worst], "min_speedup_case": worst,
            "slower_than_eager": {c: m for c, m in medians.items() if m < 1}, "floor": "conv_alone",
            "geomean_over_floor": sum(floor_ci) / 2, "geomean_over_floor_ci": list(floor_ci), "max_over_floor": 1.0,
            "max_over_floor_case": "a", "mem_above_eager": {}, "rounds": rounds,
            "speedup_ci_vs_eager": {c: list(ci) for c, ci in shape_ci.items()}}  # fmt: skip


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_op_targets_are_decided_by_the_intervals(pass_):
    """A shape is below 0.98x of eager only when its whole interval is, above only when its whole interval is; one
    straddling 0.98 leaves the target undecided, as a geomean interval straddling its goal does."""

    def verdicts(summary: dict) -> dict[str, bool | None]:
        return {t["target"].split(": ", 1)[1]: t["met"] for t in bench_ops.targets([summary])}

    shapes = "no shape below 0.98x of eager"
    geomean = ("geomean speedup over eager >= 1.08 (aim 1.15)" if pass_ == "fwd+bwd" else
               "geomean speedup over eager >= 1.1 (aim)")  # fmt: skip
    above = {"a": (1.0, 1.05), "b": (0.981, 0.99)}
    assert verdicts(_op_summary(pass_, above))[shapes] is True
    # Median 0.975, below the goal, but the interval reaches above it: one run cannot tell.
    assert verdicts(_op_summary(pass_, {**above, "c": (0.96, 0.99)}))[shapes] is None
    assert verdicts(_op_summary(pass_, {**above, "c": (0.96, 0.99), "d": (0.95, 0.97)}))[shapes] is False
    assert verdicts(_op_summary(pass_, above, rounds=4))[shapes] is None  # too few rounds for an interval
    # 1.085-1.095 reaches 1.08, not the forward's 1.10 aim; 1.075-1.095 straddles 1.08.
    assert verdicts(_op_summary(pass_, above))[geomean] is (pass_ == "fwd+bwd")
    straddling = verdicts(_op_summary(pass_, above, geomean_ci=(1.075, 1.095)))[geomean]
    assert straddling is (None if pass_ == "fwd+bwd" else False)
    if pass_ == "fwd":
        floor = "geomean time / conv_alone (same weight handling) <= 1.03"
        assert verdicts(_op_summary(pass_, above, floor_ci=(1.0, 1.02)))[floor] is True
        assert verdicts(_op_summary(pass_, above, floor_ci=(1.02, 1.04)))[floor] is None
        assert verdicts(_op_summary(pass_, above, floor_ci=(1.04, 1.05)))[floor] is False
    text = bench_ops.summary_text([], bench_ops.targets([_op_summary(pass_, {**above, "c": (0.96, 0.99)})]))
    assert f"[undecided] cpu {pass_}: no shape below 0.98x of eager: 0 below, 1 undecided" in text
    # torch's own prepacked kernels, timed where the package's prepacked rows cannot be, meet no target of ours
    assert bench_ops.targets([{**_op_summary(pass_, above), "impl": "onednn_prepacked"}]) == []


def test_op_summary_gives_the_geomeans_an_interval():
    """The geomean's interval bootstraps each shape's rounds apart: it brackets the geomean, and narrows when the
    rounds agree."""
    rng = random.Random(0)

    def records(spread: float) -> list[dict]:
        out = []
        for case in ("a", "b", "c"):
            eager = [1.0 + rng.gauss(0, spread) for _ in range(9)]
            impl = [e / (1.05 + rng.gauss(0, spread)) for e in eager]
            for name, samples in (("eager", eager), ("cpu", impl), ("conv_alone", [0.9] * 9)):
                ratios = {"eager": [e / t for e, t in zip(eager, samples, strict=True)],
                          "conv_alone": [0.9 / t for t in samples]}  # fmt: skip
                stats = timing.Stats(times_ms=samples, inner=1, ratios=ratios)
                out.append({"case": case, "impl": name, "pass": "fwd", "dtype": "fp32", "layout": "channels_last",
                            "models": ["resnet50"], "peak_mem_bytes": 1,
                            **timing.stats_record(stats, baselines=("eager", "conv_alone"))})  # fmt: skip
        return out

    wide, narrow = (bench_ops.summarize(records(s))[0] for s in (0.05, 0.005))
    for s in (wide, narrow):
        lo, hi = s["geomean_speedup_ci"]
        assert lo <= s["geomean_speedup_vs_eager"] <= hi and s["rounds"] == 9
        assert s["geomean_over_floor_ci"][0] <= s["geomean_over_floor"] <= s["geomean_over_floor_ci"][1]
    width = [s["geomean_speedup_ci"][1] - s["geomean_speedup_ci"][0] for s in (wide, narrow)]
    assert width[1] < width[0] / 3


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
    prepacked = _prepacked_impls()
    training = _backend_impls() | {"eager", "compile", "conv_alone"}
    expected = {"fwd": training | prepacked | {"conv_prepacked"}, "fwd+bwd": training}
    assert "cpu" in training
    seen: dict[tuple, set] = {}
    for rec in records:
        _check_record(rec)
        seen.setdefault((rec["case"], rec["pass"], rec["dtype"], rec["layout"]), set()).add(rec["impl"])
        assert rec["speedup_vs_eager"]["median"] > 0 and rec["speedup_vs_conv_alone"]["median"] > 0
        if rec["pass"] == "fwd":
            assert rec["speedup_vs_conv_prepacked"]["median"] > 0
    assert len(seen) == 2 * 2  # 2 cases x (fwd, fwd+bwd)
    assert all(impls == expected[key[1]] for key, impls in seen.items()), seen
    assert all(r["compile_s"] > 0 for r in records if r["impl"] == "compile")
    summary = {(s["pass"], s["impl"]): s for s in payload["summary"] if s["model_shapes"] == "all"}
    assert set(summary) == {("fwd", p) for p in prepacked} | {
        (p, i) for p in expected for i in _backend_impls() | {"compile"}
    }
    # Each fused row is held against the conv alone with its own weight handling.
    assert all(summary[("fwd", p)]["floor"] == "conv_prepacked" for p in prepacked)
    assert all(s["floor"] == "conv_alone" for key, s in summary.items() if key[1] not in prepacked)
    assert (tmp_path / "ops.png").stat().st_size > 0
    md = (tmp_path / "ops.md").read_text()
    assert "speedup" in md and all(f"{p} / conv_prepacked" in md for p in prepacked) and "cpu / conv_alone" in md
    # The prepacked rows were checked against float64 before timing, and hold their packed weight between calls: its
    # size is recorded (the weight's fp32 bytes at least) and the table says the memory ratio leaves it out.
    for rec in records:
        if rec["impl"] in prepacked | {"conv_prepacked"}:
            shape = rec["shape"]
            assert rec["held_bytes"] >= 4 * shape["k"] * shape["c"] * shape["r"] * shape["s"], rec
            assert rec["max_error_vs_float64"] < bench_ops.PREPACKED_TOL["fp32"], rec
        else:
            assert "held_bytes" not in rec
    assert "Not in `mem / eager`: the packed weight each prepacked row holds between calls" in md


def test_bench_model_tiny(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    import torch._inductor.freezing

    froze = []
    freeze = torch._inductor.freezing.freeze
    monkeypatch.setattr(
        torch._inductor.freezing, "freeze", lambda gm, aot_gm, *a: froze.append(aot_gm) or freeze(gm, aot_gm, *a)
    )
    path = tmp_path / "model.json"
    argv = ["--models", "resnet18", "--json", str(path), "--md", str(tmp_path / "model.md"), *TINY]
    assert bench_model.main([*argv, "--inference-batches", "2", "--train-rounds", "3"]) == 0
    payload = json.loads(path.read_text())
    _check_machine(payload["machine"])
    assert [r for r in payload["records"] if "status" in r] == []
    impls: dict[tuple, set] = {}
    for rec in payload["records"]:
        _check_record(rec, rounds=3 if rec["mode"] == "train" else 2)
        assert rec["batch"] == 2
        impls.setdefault((rec["mode"], rec["variant"]), set()).add(rec["impl"])
    assert impls == {
        ("inference", "eval-bn"): set(bench_model.INFERENCE_IMPLS),
        ("train", "bn-free"): {"fused", "unfused"},
        ("train", "frozen-bn"): {"fused", "unfused"},
    }
    # Two graphs frozen: one a graph dynamo reused for the converted model would not be.
    assert len(froze) >= 2, "a compile-freezing variant (original or fused) was not frozen by Inductor"
    inference = {r["impl"]: r for r in payload["records"] if r["mode"] == "inference"}
    for name, rec in inference.items():
        # Each variant computed the eager model's function (fp32 logits of order 1).
        assert rec["max_abs_diff_vs_eager"] <= 1e-3, (name, rec["max_abs_diff_vs_eager"])
        assert {f"speedup_vs_{b}" for b in bench_model.INFERENCE_BASELINES} - {f"speedup_vs_{name}"} <= rec.keys()
    assert inference["compile-freezing"]["compile_s"] > 0 and inference["ort"]["export_s"] > 0
    assert inference["ort"]["exporter"] in ("dynamo",) or inference["ort"]["exporter"].startswith("torchscript")
    md = (tmp_path / "model.md").read_text()
    assert "peak MiB: torch.profiler" in md and "own arena" in md


def test_bench_model_rows_say_why_a_peer_is_missing(tmp_path, monkeypatch):
    """Without onnxruntime, or without the package's prepare step, or under --no-compile, the row says so and the
    rest still runs; the inference runs cover batch 1 and the training batch."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    monkeypatch.setattr(bench_model, "optimize_for_inference_hook", lambda: None)
    path = tmp_path / "model.json"
    argv = ["--models", "resnet18", "--modes", "inference", "--no-compile", "--json", str(path)]
    assert bench_model.main([*argv, "--md", str(tmp_path / "model.md"), *TINY]) == 0
    records = json.loads(path.read_text())["records"]
    status = {(r["impl"], r["batch"]): r["status"] for r in records if "status" in r}
    missing = ("ort", "prepared", "prepared-fuse-relu", *bench_model.COMPILED_IMPLS)
    assert set(status) == {(impl, b) for impl in missing for b in (1, 2)}
    assert all(status[("ort", b)].startswith("not installed") for b in (1, 2))
    assert all(status[(p, b)].startswith("not available") for p in ("prepared", "prepared-fuse-relu") for b in (1, 2))
    assert all(status[(c, b)] == "skipped: --no-compile" for c in bench_model.COMPILED_IMPLS for b in (1, 2))
    timed = {(r["impl"], r["batch"]) for r in _timed(records)}
    assert timed == {(impl, b) for impl in ("eager", "fused") for b in (1, 2)}
    for rec in _timed(records):
        _check_record(rec)
    md = (tmp_path / "model.md").read_text()
    assert md.count("not installed") == 2 and md.count("not available") == 4 and md.count("--no-compile") == 6


def test_bench_model_does_not_time_a_wrong_variant_and_fails(tmp_path, monkeypatch):
    """A variant whose output is off (x3) or NaN gets the status "wrong result" with its difference, is not timed,
    and the script exits with status 1; the right variants are still timed."""
    inference_impls = bench_model.inference_impls

    def broken(*args, **kwargs):
        inf = inference_impls(*args, **kwargs)
        fused, prepared = inf.impls["fused"], inf.impls["prepared"]
        inf.impls["fused"] = lambda: fused() * 3
        inf.impls["prepared"] = lambda: prepared() * float("nan")
        return inf

    monkeypatch.setattr(bench_model, "inference_impls", broken)
    path = tmp_path / "model.json"
    argv = ["--models", "resnet18", "--modes", "inference", "--inference-batches", "2", "--no-compile", "--no-ort"]
    assert bench_model.main([*argv, "--json", str(path), "--md", str(tmp_path / "model.md"), *TINY]) == 1
    records = {r["impl"]: r for r in json.loads(path.read_text())["records"]}
    assert records["fused"]["status"].startswith("wrong result: max |y - eager| / max(max |eager|, 1) = 2.00e+00")
    assert records["fused"]["max_abs_diff_vs_eager"] > 1
    assert records["prepared"]["status"] == "wrong result: a NaN or inf in the output (or in eager's)"
    assert all("median_ms" not in records[i] for i in ("fused", "prepared"))
    for impl in ("eager", "prepared-fuse-relu"):
        _check_record(records[impl])
        assert records[impl]["max_abs_diff_vs_eager"] <= 1e-3
    assert bench_model.check_output(torch.ones(3) * 1.04, torch.ones(3), "bf16")[1] == ""  # bf16 logits: 4 % is fine
    assert bench_model.check_output(torch.ones(3) * 1.04, torch.ones(3), "fp32")[1].startswith("wrong result")
    assert "wrong result" in (tmp_path / "model.md").read_text()


def test_bench_model_holds_low_precision_variants_to_float64(tmp_path, monkeypatch):
    """In bf16 a variant 4 % off passes the check against eager's output (whose own rounding needs 5e-2), but not the
    one against a float64 run of the model: it may be at most REF_FACTOR x as far from it as eager."""
    inference_impls = bench_model.inference_impls

    def broken(*args, **kwargs):
        inf = inference_impls(*args, **kwargs)
        fused = inf.impls["fused"]
        inf.impls["fused"] = lambda: fused() * 1.04
        return inf

    monkeypatch.setattr(bench_model, "inference_impls", broken)
    path = tmp_path / "model.json"
    argv = ["--models", "resnet18", "--modes", "inference", "--inference-batches", "2", "--dtypes", "bf16"]
    argv += ["--no-compile", "--no-ort", "--json", str(path), "--md", str(tmp_path / "model.md")]
    assert bench_model.main([*argv, *TINY]) == 1
    records = {r["impl"]: r for r in json.loads(path.read_text())["records"]}
    assert records["fused"]["max_abs_diff_vs_eager"] > 0
    assert re.fullmatch(r"wrong result: error \S+ against float64, above 2 x eager's \S+", records["fused"]["status"])
    for impl in ("eager", "prepared", "prepared-fuse-relu"):
        _check_record(records[impl])


def test_main_tiny(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main.main(["--tiny", "--threads", "1", "--out", str(tmp_path), "--json", str(path), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "equivalence vs float64 reference" in printed and "FAIL" not in printed
    payload = json.loads(path.read_text())
    eq = payload["equivalence"]
    assert eq["passed"]
    assert {(r["backend"], r["dtype"]) for r in eq["results"]} == {
        (b, d) for b in _equivalence_rows() for d in ("fp32", "bf16")
    }
    _check_machine(payload["ops"]["machine"])
    for rec in payload["ops"]["records"]:
        _check_record(rec)
    model = payload["model"]["records"]
    for rec in _timed(model):
        _check_record(rec)
    assert {r["impl"] for r in model} == set(bench_model.INFERENCE_IMPLS)
    assert {r["impl"] for r in _timed(model)} == set(bench_model.INFERENCE_IMPLS) - set(bench_model.COMPILED_IMPLS)
    for name in ("ops.json", "ops.png", "ops.md", "model.json", "model.md", "equivalence.json"):
        assert (tmp_path / name).stat().st_size > 0


def test_equivalence_alone(tmp_path, capsys):
    """``python -m benchmarks.equivalence``, the GPU check's own step: the table, the JSON, and the exit status."""
    from benchmarks import equivalence

    path = tmp_path / "equivalence.json"
    assert equivalence.main(["--max-cases", "1", "--no-progress", "--json", str(path)]) == 0
    assert "equivalence vs float64 reference" in capsys.readouterr().out
    result = json.loads(path.read_text())
    assert result["passed"] and result["config"]["n_cases"] == 1
    assert {r["backend"] for r in result["results"]} == _equivalence_rows()
    unavailable = {row.name for row in BACKENDS if row.unavailable()}
    assert set(result["not_checked"]) == unavailable  # listed with the reason, not dropped


def test_equivalence_alone_splits_by_backend_dtype_and_layout(tmp_path, capsys):
    """The check can be narrowed to some backends, dtypes and layouts (a GPU run splits its slow Triton cases so)."""
    from benchmarks import equivalence

    path = tmp_path / "equivalence.json"
    args = ["--max-cases", "1", "--backends", "reference", "--dtypes", "fp32", "--layouts", "nchw", "--no-progress"]
    assert equivalence.main([*args, "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["config"]["layouts"] == ["nchw"] and result["config"]["backends"] == ["reference"]
    assert [(r["backend"], r["dtype"], r["cases"]) for r in result["results"]] == [("reference", "fp32", 1)]


def test_equivalence_in_several_processes_equals_one(tmp_path, capsys):
    """``--jobs 2`` shards the cases over two processes; the merged result is the one-process result."""
    from benchmarks import equivalence

    args = ["--max-cases", "2", "--backends", "cpu,reference", "--dtypes", "fp32", "--layouts", "nchw,channels_last"]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert equivalence.main([*args, "--no-progress", "--json", str(one)]) == 0
    assert equivalence.main([*args, "--jobs", "2", "--no-progress", "--json", str(two)]) == 0
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["results"] == b["results"] and a["passed"] and b["passed"]
    assert [r["cases"] for r in b["results"]] == [4, 4]
    half = equivalence.run(backends=["reference"], dtypes=["fp32"], layouts=["nchw"], max_cases=2, shard=(1, 2))
    assert [r["cases"] for r in half["results"]] == [1]
    with pytest.raises(SystemExit):
        equivalence.main([*args, "--shard", "2/2"])
    assert "--shard: expected i/n with 0 <= i < n, got 2/2" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--dtypes", "fp33"], "--dtypes: expected a comma list of fp64,fp32,tf32,fp16,bf16, got 'fp33'"),
        (["--layouts", "nhwc"], "--layouts: expected a comma list of channels_last,nchw, got 'nhwc'"),
        (["--jobs", "0"], "--jobs: expected a positive number, got 0"),
    ],
)
def test_equivalence_refuses_unknown_options(args, message, capsys):
    from benchmarks import equivalence

    with pytest.raises(SystemExit):
        equivalence.main([*args, "--max-cases", "1"])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--models", "resnet5"], "--models: unknown ['resnet5']; expected some of ['resnet101', "),
        (["--backends", "reference"], "--backends: expected some of ['cpu'] (the fused backends on cpu), got"),
    ],
)
def test_bench_ops_refuses_unknown_options(args, message, capsys):
    with pytest.raises(SystemExit):
        bench_ops.main([*args, "--device", "cpu", "--no-progress", "--json", "", "--png", "", "--md", ""])
    assert message in capsys.readouterr().err


def test_diagnose_after_ort_without_onnxruntime_is_a_usage_error(monkeypatch, capsys):
    from benchmarks import diagnose

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(SystemExit):
        diagnose.main(["after-ort", "--rounds", "1", "--model", "resnet18"])
    assert "after-ort needs onnxruntime" in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_equivalence_sets_the_conv_fp32_precision_and_restores_it(monkeypatch, precision):
    """On CUDA "fp32" is checked with TF32 off and "tf32" with it on (torch's default turns it on for convs)."""
    from benchmarks import equivalence

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    with equivalence.conv_fp32_precision(precision):
        assert conv.fp32_precision == precision
    assert conv.fp32_precision == before
    with pytest.raises(RuntimeError), equivalence.conv_fp32_precision(precision):
        raise RuntimeError("a failing case still restores the setting")
    assert conv.fp32_precision == before


def test_equivalence_has_no_tf32_cases_on_cpu_tensors():
    from benchmarks import equivalence

    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    result = equivalence.run(dtypes=("tf32",), max_cases=1, progress=False)
    assert result["results"] == [] and not result["passed"]  # nothing checked is no pass
    assert [r["dtype"] for r in equivalence.run(dtypes=("fp32",), max_cases=1, progress=False)["results"]] == [
        "fp32"
    ] * len(_equivalence_rows())


def _equivalence_rows() -> set[str]:
    """What the equivalence check covers here: every available backend, and the prepared route's two rows."""
    from benchmarks import equivalence

    prepacked = set() if equivalence.prepacked_unavailable() else set(equivalence.PREPACKED_ROWS)
    return set(resnet_fused.available_backends()) | prepacked


def _gain(monkeypatch, backend: str, gain: float) -> None:
    """Make ``backend`` compute ``gain`` x the op (forward, and so backward): a uniformly wrong backend."""
    op = resnet_fused.conv_bias_add_relu

    def wrong(*args, **kwargs):
        y = op(*args, **kwargs)
        return y * gain if kwargs.get("backend") == backend else y

    monkeypatch.setattr(resnet_fused, "conv_bias_add_relu", wrong)


def test_equivalence_checks_the_scale_and_the_prepared_route(monkeypatch):
    """Every other case passes a per-channel scale, as converted models do, and the prepared route (both ReLU modes)
    is checked: a backend that drops the scale fails, and so does a prepared conv 2 % off."""
    from benchmarks import equivalence

    if equivalence.prepacked_unavailable(torch.float32):
        pytest.skip(equivalence.prepacked_unavailable(torch.float32))
    kw = {"backends": ["cpu", "reference", *equivalence.PREPACKED_ROWS], "dtypes": ["fp32"], "max_cases": 2,
          "layouts": ["channels_last"], "progress": False}  # fmt: skip
    result = equivalence.run(**kw)
    rows = {r["backend"]: r for r in result["results"]}
    assert result["passed"] and set(rows) == set(kw["backends"])
    assert all((r["cases"], r["scaled_cases"]) == (2, 1) for r in rows.values())
    assert all(set(rows[p]["errors"]) == {"out"} for p in equivalence.PREPACKED_ROWS)  # forward only
    op = resnet_fused.conv_bias_add_relu

    def scale_dropped(*args, scale=None, **kwargs):
        return op(*args, **kwargs) if kwargs.get("backend") == "cpu" else op(*args, scale=scale, **kwargs)

    monkeypatch.setattr(resnet_fused, "conv_bias_add_relu", scale_dropped)
    rows = {r["backend"]: r for r in equivalence.run(**kw)["results"]}
    assert not rows["cpu"]["passed"] and rows["reference"]["passed"]
    assert all("+scale" in f for f in rows["cpu"]["failures"])
    monkeypatch.setattr(resnet_fused, "conv_bias_add_relu", op)

    from resnet_fused import inference

    optimize = inference.optimize_for_inference

    def off(model, *, fuse_relu=False):
        model = optimize(model, fuse_relu=fuse_relu)
        forward = model.forward
        model.forward = lambda *a, **k: forward(*a, **k) * 1.02
        return model

    monkeypatch.setattr(inference, "optimize_for_inference", off)
    rows = {r["backend"]: r for r in equivalence.run(**kw)["results"]}
    assert all(not rows[p]["passed"] and rows[p]["errors"]["out"] > 1e-3 for p in equivalence.PREPACKED_ROWS)
    assert rows["cpu"]["passed"]


def test_equivalence_prepacked_fp16_with_a_scale_is_the_ordinary_op_by_design(monkeypatch):
    """Where oneDNN runs fp16 (emulated here), a prepared conv with a scale still takes the ordinary op (w * scale
    may overflow in fp16): that is the route, not a failure of the row."""
    from benchmarks import equivalence
    from benchmarks.bench_ops import ConvCase
    from resnet_fused import inference

    monkeypatch.setattr(inference, "onednn_supports", lambda dtype: True)
    case = ConvCase(8, 6, 3, 3, 1, 1, 1, 5, 5, "bias+relu")
    g = torch.Generator().manual_seed(0)
    leaves = {"x": torch.randn(2, 8, 5, 5, generator=g).half(), "weight": torch.randn(6, 8, 3, 3, generator=g).half(),
              "bias": torch.randn(6, generator=g).half(), "residual": None}  # fmt: skip
    scale = (torch.rand(6, generator=g) + 0.5).half()
    got, problems = equivalence._run_prepacked("prepacked", case, leaves, scale)
    assert problems == []
    y = F.conv2d(leaves["x"].double(), leaves["weight"].double(), padding=1) * scale.double().view(-1, 1, 1)
    expected = (y + leaves["bias"].double().view(-1, 1, 1)).relu()
    assert_close(got["out"], expected, torch.float16, "out", reductions=72)


def test_equivalence_bf16_fails_a_backend_two_percent_off(monkeypatch):
    """In bf16 a row is held to twice the reference row's error plus an ulp, not to the sqrt(n)-grown dtype bound
    (a quarter of the output's range on the longest sums): a backend uniformly 2 % off fails, the real ones pass."""
    from benchmarks import equivalence

    kw = {"backends": ["cpu", "reference"], "dtypes": ["bf16"], "layouts": ["channels_last"], "max_cases": 4,
          "progress": False}  # fmt: skip
    assert equivalence.run(**kw)["passed"]
    _gain(monkeypatch, "cpu", 1.02)
    rows = {r["backend"]: r for r in equivalence.run(**kw)["results"]}
    assert rows["reference"]["passed"] and not rows["cpu"]["passed"]
    assert any(": out error" in f for f in rows["cpu"]["failures"])


@pytest.mark.parametrize(
    ("broken", "reason"),
    [
        (lambda y: y.detach(), "the output has no grad_fn: no backward to check"),
        ("x", "no gradient for x"),
        (lambda y: y * float("nan"), "out error nan"),
        ("raise", "raised RuntimeError: backend crashed"),
        (lambda y: y[:, :, :-1], "out: shape (2, 64, 15, 16), expected (2, 64, 16, 16)"),
    ],
    ids=["no-grad-fn", "no-grad-for-x", "nan", "raises", "wrong-shape"],
)
def test_equivalence_records_a_broken_backend_as_a_failure(monkeypatch, broken, reason):
    """A backend that returns no backward, no gradient for an input, a NaN, or raises, is a FAIL with the reason in
    the table (NaN shown as nan, not as the 0 that max(0.0, nan) gives), not a crash of the check."""
    from benchmarks import equivalence

    op = resnet_fused.conv_bias_add_relu

    def wrong(x, *args, **kwargs):
        if kwargs.get("backend") != "cpu":
            return op(x, *args, **kwargs)
        if broken == "raise":
            raise RuntimeError("backend crashed")
        if broken == "x":
            return op(x.detach(), *args, **kwargs)
        return broken(op(x, *args, **kwargs))

    monkeypatch.setattr(resnet_fused, "conv_bias_add_relu", wrong)
    result = equivalence.run(backends=["cpu", "reference"], dtypes=["fp32"], layouts=["nchw"], max_cases=1,
                             progress=False)  # fmt: skip
    rows = {r["backend"]: r for r in result["results"]}
    assert not result["passed"] and rows["reference"]["passed"] and not rows["cpu"]["passed"]
    assert any(f.endswith(reason) for f in rows["cpu"]["failures"]), rows["cpu"]["failures"]
    table = equivalence.format_table(result)
    (line,) = [line for line in table.splitlines() if line.startswith("cpu ")]
    assert line.endswith("FAIL")
    if broken not in ("x",):
        assert "nan" in line  # the missing or NaN tensors


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


def _prepacked_broken(monkeypatch, how: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> None:
    """Make the named prepacked rows of the op benchmark return ``how[name](their output)``."""
    prepacked_impls = bench_ops.prepacked_impls

    def broken(case, inp):
        impls = prepacked_impls(case, inp)
        for name, f in how.items():
            impls[name] = lambda fn=impls[name], f=f: f(fn())
        return impls

    monkeypatch.setattr(bench_ops, "prepacked_impls", broken)


def _run_with_broken_prepacked_rows(tmp_path, monkeypatch, broken: dict, argv: list[str]) -> dict:
    """The op benchmark's forward on a tiny run with the rows of ``broken`` made wrong (see _prepacked_broken): it
    must exit with status 1; returns its JSON payload."""
    if "prepacked" not in _prepacked_impls() or bench_ops.prepack_unsupported(torch.device("cpu"), torch.float32):
        pytest.skip("no prepacked rows here")
    _prepacked_broken(monkeypatch, broken)
    path = tmp_path / "ops.json"
    argv = [
        *argv,
        "--passes",
        "fwd",
        "--no-compile",
        "--json",
        str(path),
        "--png",
        "",
        "--md",
        str(tmp_path / "ops.md"),
    ]
    assert bench_ops.main([*argv, *TINY]) == 1
    return json.loads(path.read_text())


def test_bench_ops_does_not_time_a_wrong_prepacked_row_and_fails(tmp_path, monkeypatch):
    """A prepacked row whose output is off (x3, or a NaN) gets the status "wrong result", is not timed, and the script
    exits with status 1; the other rows are timed and summarized without it."""
    broken = {"prepacked": lambda y: y * 3, "prepacked-fuse-relu": lambda y: y * float("nan")}
    payload = _run_with_broken_prepacked_rows(
        tmp_path, monkeypatch, broken, ["--models", "resnet18", "--max-cases", "1"]
    )
    records = {r["impl"]: r for r in payload["records"]}
    assert records["prepacked"]["status"].startswith("wrong result: error 2.00e+00 against float64")
    assert math.isnan(records["prepacked-fuse-relu"]["max_error_vs_float64"])
    assert all("median_ms" not in records[i] for i in ("prepacked", "prepacked-fuse-relu"))
    for impl in ("cpu", "eager", "conv_alone", "conv_prepacked"):
        _check_record(records[impl])
    assert {s["impl"] for s in payload["summary"]} == {"cpu"}
    assert sum(line.startswith("WRONG RESULT") for line in payload["not_timed"]) == 2
    assert "WRONG RESULT, prepacked fwd fp32 channels_last" in (tmp_path / "ops.md").read_text()


def test_a_wrong_prepacked_floor_leaves_its_rows_untimed_and_fails(tmp_path, monkeypatch):
    """The prepacked conv alone is checked against float64 too: when it is wrong, the rows read against it are not
    timed (no floor to read them by), their targets say why, and the script exits with status 1 (it crashed with a
    KeyError after timing everything, writing no file)."""
    _one_case_judged(monkeypatch)
    broken = {"conv_prepacked": lambda y: y * 3}
    payload = _run_with_broken_prepacked_rows(
        tmp_path, monkeypatch, broken, ["--models", "resnet50", "--backends", "cpu"]
    )
    records = {r["impl"]: r for r in payload["records"]}
    assert records["conv_prepacked"]["status"].startswith("wrong result: error 2.00e+00 against float64")
    for impl in bench_ops.PREPACKED_IMPLS:
        if impl in records:
            assert records[impl]["status"] == bench_ops.FLOOR_FAILED
    assert {s["impl"] for s in payload["summary"]} == {"cpu"}
    targets = {t["target"]: t for t in payload["targets"]}
    assert not [name for name in targets if name.startswith("conv_prepacked")]
    prepacked = [t for name, t in targets.items() if name.startswith("prepacked fwd")]
    assert prepacked and all(t["met"] is None for t in prepacked)
    assert all("conv_prepacked (their floor): wrong result on 1 shape(s)" in t["measured"] for t in prepacked)
    assert [line for line in payload["not_timed"] if line.startswith("WRONG RESULT")] == [
        "WRONG RESULT, conv_prepacked fwd fp32 channels_last "
        f"{records['conv_prepacked']['case']}: {records['conv_prepacked']['status']}"
    ]


@pytest.mark.parametrize("package", [True, False], ids=["package", "onednn-fallback"])
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("epilogue", bench_ops.EPILOGUES)
def test_prepacked_rows_compute_the_case(epilogue, layout, package, monkeypatch):
    """The inference path's rows compute what they claim: the fused row the case's epilogue, its floor the bare conv
    (float64 reference, fp32 tolerance), on the package's prepacked op or on torch's oneDNN post-ops."""
    if bench_ops.prepack_unsupported(torch.device("cpu"), torch.float32):
        pytest.skip(bench_ops.prepack_unsupported(torch.device("cpu"), torch.float32))
    if package and "prepacked" not in _prepacked_impls():
        pytest.skip("this install has no resnet_fused.inference.optimize_for_inference")
    if not package:
        monkeypatch.setattr(bench_ops, "_package_prepacked", lambda case, inp, fuse_relu=False: None)
    case = bench_ops.ConvCase(c=4, k=6, r=3, s=3, stride=2, padding=1, dilation=2, h=11, w=8, epilogue=epilogue)
    inp = bench_ops.make_inputs(case, 2, torch.float32, bench_ops.LAYOUTS[layout], torch.device("cpu"), False)
    impls = bench_ops.prepacked_impls(case, inp)
    fused_names = ["prepacked", "prepacked-fuse-relu"] if package else ["onednn_prepacked"]
    assert set(impls) == {*fused_names, "conv_prepacked"}
    f64 = [None if t is None else t.double() for t in (inp.x, inp.weight, inp.bias, inp.residual)]
    want = resnet_fused.reference.conv_bias_add_relu(*f64, **case.conv_args, relu=epilogue != "bias")
    want_floor = F.conv2d(f64[0], f64[1], None, **case.conv_args)
    reductions = case.c * case.r * case.s
    for call in range(2):  # the second call runs on the weight packed by the first
        with torch.no_grad():
            floor = impls["conv_prepacked"]()
            for name in fused_names:
                assert_close(
                    impls[name](), want, torch.float32, f"{name}, {epilogue}, {layout}, call {call}", reductions
                )
        assert_close(floor, want_floor, torch.float32, f"conv_prepacked, {layout}, call {call}", reductions)


def test_diagnose_parses_onednn_verbose():
    from benchmarks.diagnose import onednn_conv_ms

    text = "\n".join(
        [
            "onednn_verbose,v1,info,oneDNN v3.12.0",
            "onednn_verbose,v1,primitive,exec,cpu,convolution,brgconv_1x1:avx2,forward_inference,src:f32,,mb1_ic64,0.5",
            "onednn_verbose,v1,primitive,exec,cpu,reorder,simple:any,undef,src:f32,,2x3,0.25",
            "onednn_verbose,v1,primitive,exec,cpu,convolution,brg_conv_fwd:avx2,forward_inference,src:f32,,mb1_ic3,1.25",
            "unrelated output",
        ]
    )
    assert onednn_conv_ms(text) == (1.75, 2)


def test_diagnose_runs_on_a_tiny_model():
    """Both diagnostics see every conv of resnet18 and an allocator peak in each train step."""
    from benchmarks import diagnose

    times = diagnose.conv_time(batch=1, hw=32, rounds=2, threads=1, arch="resnet18")
    assert set(times) == {"prepared", "prepared-fuse-relu", "compile-freezing"}
    for name, r in times.items():
        assert r["convs"] == 20, f"{name}: {r['convs']} oneDNN convolutions seen, resnet18 has 20"
        assert 0 < r["conv_ms"] < r["wall_ms"], name
    peaks = diagnose.train_peak(variant="frozen-bn", batch=2, hw=32, threads=1, arch="resnet18")
    assert set(peaks) == {"fused", "unfused"}
    for name, r in peaks.items():
        assert r["peak_mib"] > 0 and r["at_peak"] and r["live_mib_by_op"], name
        # Live blocks cover the peak (more when a block from before the trace was freed during it).
        assert sum(r["live_mib_by_op"].values()) >= r["peak_mib"] - 1e-6, name


def test_diagnose_train_ops_sees_the_convolutions():
    from benchmarks import diagnose

    ops = diagnose.train_ops(variant="bn-free", batch=2, hw=32, threads=1, arch="resnet18")
    assert set(ops) == {"fused", "unfused"}
    for name, own in ops.items():
        assert own.get("aten::convolution_backward", 0) > 0, name
    assert ops["fused"].get("resnet_fused::conv_bias_add_relu_backward", 0) > 0


def test_running_peak_leaves_out_frees_of_blocks_allocated_before_the_trace():
    from benchmarks.timing import running_peak

    def ev(size, addr):
        return {"args": {"Bytes": size, "Addr": addr}}

    # A block from before the trace (addr 1) is freed first; the profiler reports such frees only sometimes, so they
    # must not lower the baseline: the peak is the 300 bytes allocated inside the trace.
    mem = [ev(-500, 1), ev(100, 2), ev(200, 3), ev(-100, 2), ev(50, 4)]
    assert running_peak(mem) == (300, 2)
    assert running_peak(mem[1:]) == (300, 1)
    assert running_peak([]) == (0, -1)


@pytest.mark.parametrize(
    ("ci", "verdict"), [((0.91, 0.95), "met"), ((0.86, 0.91), "undecided"), ((0.80, 0.89), "MISSED")]
)
def test_inference_peer_target_is_decided_by_the_interval(ci, verdict):
    ratio = {"median": sum(ci) / 2, "p25": ci[0], "p75": ci[1], "ci_lo": ci[0], "ci_hi": ci[1]}
    record = {"model": "resnet50", "mode": "inference", "dtype": "fp32", "layout": "channels_last", "input_hw": 224,
              "batch": 8, "impl": "prepared", "speedup_vs_ort": ratio, "rounds": 15}  # fmt: skip
    lines = bench_model.targets_text(bench_model.targets([record])).splitlines()
    (line,) = [line for line in lines if "prepared >= 0.9x over ort" in line]
    assert line.startswith(f"  [{verdict}]") and f"95% CI {ci[0]:.3f}-{ci[1]:.3f}, 15 rounds)" in line


def test_model_targets_of_a_missing_or_wrong_variant_are_listed_as_not_measured():
    """A peer that could not run (ONNX Runtime not installed, no torch.compile) and a variant with a wrong result
    keep their targets, as not measured with the reason; a variant that ran keeps its verdict."""
    base = {"model": "resnet50", "mode": "inference", "variant": "eval-bn", "dtype": "fp32", "layout": "channels_last",
            "input_hw": 224}  # fmt: skip
    ratio = {"median": 1.2, "p25": 1.1, "p75": 1.3, "ci_lo": 1.1, "ci_hi": 1.3}
    records = []
    for n in (1, 8):
        timed = {"rounds": 15, "peak_mem_bytes": 1, "speedup_vs_eager": ratio, "speedup_vs_compile-freezing": ratio}
        records += [{**base, "batch": n, "impl": "eager", "rounds": 15, "peak_mem_bytes": 2},
                    {**base, "batch": n, "impl": "fused", **timed},
                    {**base, "batch": n, "impl": "prepared", **timed},
                    {**base, "batch": n, "impl": "prepared-fuse-relu", "status": "wrong result: NaN"},
                    {**base, "batch": n, "impl": "compile", "status": "skipped: --no-compile"},
                    {**base, "batch": n, "impl": "compile-freezing", **timed},
                    {**base, "batch": n, "impl": "ort", "status": "not installed: No module named 'onnxruntime'"}]  # fmt: skip
    got = {t["target"]: t for t in bench_model.targets(records)}
    assert len(got) == 3 + 2 * 2 * 2  # fused at batch 8, and both prepared rows against both peers at batch 1 and 8
    compile_target = got["resnet50 inference b8: converted no slower than torch.compile of the original"]
    assert compile_target["not_measured"] == "compile: skipped: --no-compile" and compile_target["met"] is None
    for n in (1, 8):
        assert got[f"resnet50 inference b{n}: prepared >= 0.9x over ort (aim 1.0x)"]["not_measured"].startswith(
            "ort: not installed"
        )
        wrong = got[f"resnet50 inference b{n}: prepared-fuse-relu >= 1.05x over compile-freezing (aim 1.15x)"]
        assert wrong["not_measured"] == "prepared-fuse-relu: wrong result: NaN"
        assert got[f"resnet50 inference b{n}: prepared >= 1.05x over compile-freezing (aim 1.15x)"]["met"] is True
    text = bench_model.targets_text(list(got.values()))
    assert "[not measured] resnet50 inference b8: prepared >= 0.9x over ort (aim 1.0x): not measured: ort: not" in text


def test_diagnose_per_call_times_every_backend():
    from benchmarks import diagnose

    us = diagnose.per_call(rounds=2, threads=1)
    cpu_rows = {row.name for row in BACKENDS if "cpu" in row.devices and not row.unavailable()}
    assert set(us) == {"conv alone", "eager", *cpu_rows} and {"cpu", "reference"} <= cpu_rows
    assert all(0 < t < 1e5 for t in us.values()), us


def test_benchmarks_run_with_freed_blocks_kept_on_the_heap(tmp_path):
    """``python -m benchmarks.bench_ops`` re-executes itself with glibc's heap settings (every row alike) and records
    them; --default-malloc keeps the defaults."""
    env = {k: v for k, v in os.environ.items() if k not in timing.HEAP_ENV}
    for flags, expected in (([], timing.HEAP_ENV["MALLOC_TRIM_THRESHOLD_"]), ([timing.DEFAULT_MALLOC_FLAG], "glibc")):
        out = tmp_path / f"ops{len(flags)}.json"
        cmd = [sys.executable, "-m", "benchmarks.bench_ops", "--models", "resnet18", "--max-cases", "1", "--hw", "32",
               "--batch", "1", "--rounds", "1", "--warmup", "1", "--min-sample-ms", "1", "--passes", "fwd",
               "--no-compile", "--no-progress", "--threads", "1", "--json", str(out), "--png", "", "--md", "", *flags]  # fmt: skip
        subprocess.run(cmd, check=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)), capture_output=True)
        assert expected in json.loads(out.read_text())["machine"]["heap"]


def test_diagnose_residual_routes_times_every_route():
    from benchmarks import diagnose

    rows = diagnose.residual_routes(batch=1, rounds=2, threads=1)
    assert list(rows) == [f"1x1 {c}->{k} {hw}x{hw}" for c, k, hw in diagnose.RESIDUAL_CONVS]
    routes = {"post-op", "post-op, oneDNN ReLU", "pass", "donated", "donated, oneDNN ReLU"}
    for case, row in rows.items():
        assert set(row) == routes | {"conv + bias ms", "y MiB"}, case
        # Timed, not judged: a loaded machine (a parallel test run) can put any ratio anywhere.
        assert all(math.isfinite(row[r]) and row[r] > 0 for r in routes) and row["conv + bias ms"] > 0, (case, row)
    assert rows["1x1 64->256 56x56"]["y MiB"] == 56 * 56 * 256 * 4 / 2**20
    model = diagnose.residual_rule_model(batch=1, rounds=2, threads=1, arch="resnet18")
    assert set(model) == {"exact ReLU", "oneDNN ReLU"}
    assert set(model["exact ReLU"]["speedup"]) == {"over pass"}  # the exact ReLU never takes the post-op
    assert set(model["oneDNN ReLU"]["speedup"]) == {"over pass", "over post-op"}
    for mode, r in model.items():
        assert r["rule ms"] > 0 and all(math.isfinite(m) and m > 0 for m, _, _ in r["speedup"].values()), (mode, r)
    # resnet18's 8 residual adds at batch 1: in place but the stage's first (its input is the caller's), which takes
    # the pass with the exact ReLU and the post-op (at most 4 MiB) with oneDNN's; the fixed routes as named.
    assert model["exact ReLU"]["in place / pass"] == {"rule": (7, 1), "pass": (0, 8)}
    assert model["oneDNN ReLU"]["in place / pass"] == {"rule": (7, 0), "pass": (0, 8), "post-op": (0, 0)}


@pytest.mark.parametrize("arch,block,blocks", [("resnet18", "BasicBlock", 8), ("resnet50", "Bottleneck", 16)])
def test_the_bn_free_train_baseline_is_torchvisions_own_code_on_the_same_weights(arch, block, blocks):
    """The unfused BN-free step runs torchvision's blocks (in-place add and ReLU) over nn.Conv2d with the fused model's
    weights and biases: the same function and gradients, the same parameters, nothing of resnet_fused inside."""
    import torchvision.models.resnet as tv

    torch.manual_seed(0)
    fused = bench_model.bn_free_resnet(arch).train()
    twin = bench_model.eager_twin(fused)
    assert twin.training and not any(type(m).__module__.startswith("resnet_fused") for m in twin.modules())
    assert sum(isinstance(m, getattr(tv, block)) for m in twin.modules()) == blocks
    assert [p.shape for p in twin.parameters()] == [p.shape for p in fused.parameters()]
    x = torch.randn(2, 3, 32, 32)
    y_twin, y_fused = twin(x), fused(x)
    assert_close(y_twin, y_fused.detach(), torch.float32, "logits", reductions=4608)
    y_twin.square().sum().backward()
    y_fused.square().sum().backward()
    for (name, a), b in zip(fused.named_parameters(), twin.parameters(), strict=True):
        assert_close(b.grad, a.grad, torch.float32, f"grad {name}", reductions=4608)


def test_diagnose_after_ort_times_every_gap():
    pytest.importorskip("onnxruntime")
    from benchmarks import diagnose

    res = diagnose.after_ort(batch=1, hw=32, rounds=1, arch="resnet18")
    assert set(res) == {"alone", *(f"after ort, {g} ms" for g in diagnose.AFTER_ORT_GAPS_MS)}
    assert all(ms > 0 for ms in res.values())


def test_interleaving_shuffles_the_order_settles_and_primes(monkeypatch):
    """No implementation always follows the same one; after a sample of a named one the next waits; with prime, each
    sample follows one untimed call of its own implementation."""
    calls: list[str] = []
    impls = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
    slept: list[float] = []
    monkeypatch.setattr(timing.time, "sleep", slept.append)
    timing.time_interleaved(impls, rounds=12, warmup=0, min_sample_ms=0.0, settle={"d": 30.0}, prime=True)
    timed = calls[-96:]  # per sample: the untimed call, then one timed call (min_sample_ms=0 gives inner=1)
    assert all(timed[i] == timed[i + 1] for i in range(0, 96, 2))
    samples = timed[::2]
    predecessors = {samples[i - 1] for i in range(1, 48) if samples[i] == "a"}
    assert len(predecessors) > 1
    assert slept == [0.03] * 13  # after d's calibration, and after each of its 12 samples


def test_benchmarks_run_without_matplotlib_and_tqdm(tmp_path, monkeypatch, capsys):
    """Both are optional: without tqdm there is no progress bar, without matplotlib no PNG and a line saying so."""
    from benchmarks import equivalence

    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes `import tqdm` raise ImportError
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    argv = ["--models", "resnet18", "--max-cases", "1", "--passes", "fwd", "--no-compile", "--json", "", "--md", ""]
    png = tmp_path / "ops.png"
    progress = [a for a in TINY if a != "--no-progress"]
    assert bench_ops.main([*argv, "--png", str(png), *progress]) == 0
    assert not png.exists() and f"not written: {png}: matplotlib not installed" in capsys.readouterr().out
    assert equivalence.run(backends=["reference"], dtypes=["fp32"], layouts=["nchw"], max_cases=1)["passed"]
    model = bench_model.run(models=("resnet18",), modes=("inference",), inference_batches=(1,), with_compile=False,
                            with_ort=False, hw=32, rounds=1, warmup=1, min_sample_ms=1.0, threads=1)  # fmt: skip
    assert {r["impl"] for r in _timed(model["records"])} >= {"eager", "fused"}


def _one_case_judged(monkeypatch) -> None:
    """A tiny op run judged as a full one: ResNet-50's first conv stands for all of them, at any size."""
    trace = bench_ops.trace_conv_cases
    monkeypatch.setattr(bench_ops, "trace_conv_cases", lambda models, hw: trace(models, hw)[:1])
    monkeypatch.setattr(bench_ops.timing, "targets_apply", lambda device, batch, hw: True)


def test_bench_ops_judges_no_subset_of_the_shapes(tmp_path, monkeypatch):
    """The op targets hold for every ResNet-50 conv: a run of some of them (--only, --max-cases) gets no verdict,
    which two 1x1 64->256 convs alone could pass where the 24 miss; its config says which it ran."""
    monkeypatch.setattr(bench_ops.timing, "targets_apply", lambda device, batch, hw: True)
    argv = ["--models", "resnet50", "--passes", "fwd", "--backends", "cpu", "--no-compile", "--png", "", *TINY]
    for subset in (["--only", "1x1 64->256"], ["--max-cases", "1"]):
        path = tmp_path / "ops.json"
        assert bench_ops.main([*argv, *subset, "--json", str(path), "--md", str(tmp_path / "ops.md")]) == 0
        payload = json.loads(path.read_text())
        assert payload["targets_apply"] is False and payload["targets"] == []
        assert payload["summary"] and (payload["config"]["only"], payload["config"]["max_cases"]) in (
            (["1x1 64->256"], None), ([], 1)
        )  # fmt: skip


def test_bench_ops_lists_rows_that_cannot_run_and_their_targets(tmp_path, monkeypatch):
    """A backend that cannot run here and the package's prepacked rows where it has none are listed under "not
    timed" with the reason, and their targets as not measured; the rows that ran keep theirs."""
    BACKENDS["cpu"].unavailable()  # probed once, then read from its cache
    monkeypatch.setitem(BACKENDS["cpu"]._cache, "why", "the extension is not built (test)")
    monkeypatch.setattr(bench_ops, "package_prepack_unavailable", lambda: "no optimize_for_inference (test)")
    monkeypatch.setattr(bench_ops, "_package_prepacked", lambda case, inp, fuse_relu=False: None)
    _one_case_judged(monkeypatch)
    path = tmp_path / "ops.json"
    argv = ["--models", "resnet50", "--no-compile", "--json", str(path), "--png", ""]
    assert bench_ops.main([*argv, "--md", str(tmp_path / "ops.md"), *TINY]) == 0
    payload = json.loads(path.read_text())
    assert "cpu" not in {r["impl"] for r in payload["records"]}
    assert "cpu: not available: the extension is not built (test)" in payload["not_timed"]
    assert "compile: skipped (--no-compile)" in payload["not_timed"]
    targets = {t["target"]: t for t in payload["targets"]}
    for name in ("cpu fwd: geomean speedup over eager >= 1.1 (aim)", "cpu fwd+bwd: peak memory never above eager's",
                 "prepacked fwd: no shape below 0.98x of eager", "prepacked-fuse-relu fwd: peak memory never above "
                 "eager's"):  # fmt: skip
        assert targets[name]["met"] is None and targets[name]["measured"].startswith("not measured: not available")
    assert "prepacked fwd+bwd: peak memory never above eager's" not in targets  # forward only
    # torch's own prepacked kernels stand in, timed as a peer and held to none of the package's targets
    assert "onednn_prepacked" in {r["impl"] for r in payload["records"]}
    assert not [t for t in targets if t.startswith("onednn_prepacked")]
    md = (tmp_path / "ops.md").read_text()
    assert "[not measured] cpu fwd+bwd: no shape below 0.98x of eager: not measured: not available" in md


def test_main_writes_one_runs_files_with_the_header_taken_before_timing(tmp_path, monkeypatch, capsys):
    """summary.md has the machine header (load average) taken before the timings, files of an earlier run that this
    one did not produce are removed, a wrong result makes the exit status 1, and --render writes the same tables
    again from bench.json without timing anything."""
    calls = []

    def getloadavg():
        calls.append(1)
        return (1.25, 1.5, 1.75) if len(calls) == 1 else (9.25, 9.5, 9.75)

    monkeypatch.setattr(timing.os, "getloadavg", getloadavg)
    stale = ("equivalence.json", "model.json", "model.md")
    for name in stale:
        (tmp_path / name).write_text("an earlier run's\n")
    if "prepacked" in _prepacked_impls() and not bench_ops.prepack_unsupported(torch.device("cpu"), torch.float32):
        _prepacked_broken(monkeypatch, {"prepacked": lambda y: y * 3})
        expected = 1
    else:
        expected = 0
    argv = ["--tiny", "--threads", "1", "--out", str(tmp_path), "--no-progress", "--skip-equivalence", "--no-model"]
    assert main.main(argv) == expected
    printed = capsys.readouterr().out
    summary = (tmp_path / "summary.md").read_text()
    assert "load average [1.25, 1.5, 1.75]" in summary and len(calls) > 1  # later calls read 9.25
    assert all(not (tmp_path / name).exists() for name in stale)
    assert all(f"removed {tmp_path / name}" in printed for name in stale)
    assert {p.name for p in tmp_path.iterdir()} == {"ops.json", "ops.md", "ops.png", "summary.md", "bench.json"}
    if expected:
        assert "WRONG RESULTS: 1 row(s) failed the output check before timing" in printed
    md = (tmp_path / "ops.md").read_text()
    again = tmp_path / "again"
    again.mkdir()
    (again / "model.md").write_text("another run's")  # rendered into another folder: removed
    assert main.main(["--render", str(tmp_path / "bench.json"), "--out", str(again)]) == expected
    assert not (again / "model.md").exists() and f"removed {again / 'model.md'}" in capsys.readouterr().out
    rendered = (again / "summary.md").read_text()
    said = re.search(r"\nrendered again by the rules at \S+ from the saved records \(nothing re-timed\)", rendered)
    assert (again / "ops.md").read_text() == md and said and rendered.replace(said[0], "") == summary
    # Rendered in place with the combined record written elsewhere: the record it read is not an earlier run's.
    other = tmp_path / "other.json"
    assert (
        main.main(["--render", str(tmp_path / "bench.json"), "--out", str(tmp_path), "--json", str(other)]) == expected
    )
    assert (tmp_path / "bench.json").is_file() and other.is_file() and "removed" not in capsys.readouterr().out
    failures = main._failures(
        {"ops": {"records": []}, "model": {"records": [{"impl": "fused", "status": "wrong result"}]}}
    )
    assert failures == [
        "WRONG RESULTS: 1 row(s) failed the output check before timing (not timed): fused: wrong result"
    ]


def test_git_commit_is_dirty_for_any_change_to_what_is_measured(tmp_path, monkeypatch):
    """A change to the benchmark code, setup.py or a new source file marks the commit dirty, as one to the package
    does; a change to committed results does not."""
    repo = tmp_path / "repo"
    for path in ("csrc/op.cpp", "resnet_fused/ops.py", "benchmarks/timing.py", "benchmarks/results/ops.md",
                 "setup.py", "README.md"):  # fmt: skip
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text("x\n")
    (repo / ".gitignore").write_text("__pycache__/\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "c"], check=True)
    monkeypatch.setattr(timing, "__file__", str(repo / "benchmarks" / "timing.py"))
    assert timing._git_commit() and not timing._git_commit().endswith("+dirty")
    for path in ("benchmarks/results/ops.md", "README.md", "resnet_fused/__pycache__/ops.pyc"):
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text("y\n")
    assert not timing._git_commit().endswith("+dirty")  # results, docs and ignored files are not what is measured
    for change in ("benchmarks/timing.py", "setup.py", "benchmarks/new.py", "csrc/cpu/new.cpp"):
        (repo / change).parent.mkdir(parents=True, exist_ok=True)
        (repo / change).write_text("changed\n")
        assert timing._git_commit().endswith("+dirty"), change
        subprocess.run([*git, "checkout", "-q", "--", "."], check=True)
        subprocess.run([*git, "clean", "-qfd", "benchmarks/new.py", "csrc/cpu"], check=True)
        assert not timing._git_commit().endswith("+dirty"), change


def test_every_benchmark_script_is_documented():
    """Every runnable module in benchmarks/ is described in docs/benchmarks.md, so none is a stray tool whose numbers
    nobody checks."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    docs = open(os.path.join(root, "docs", "benchmarks.md")).read()
    scripts = []
    for name in sorted(os.listdir(os.path.join(root, "benchmarks"))):
        if name.endswith(".py") and 'if __name__ == "__main__"' in open(os.path.join(root, "benchmarks", name)).read():
            scripts.append(name[:-3])
    assert {"main", "bench_ops", "bench_model", "equivalence", "diagnose"} <= set(scripts)
    undocumented = [s for s in scripts if f"benchmarks.{s}" not in docs and f"benchmarks/{s}.py" not in docs]
    assert not undocumented


def test_time_over_floor_is_the_median_of_the_per_round_ratios():
    """The figure whose interval the verdict reads: with an even number of rounds the reciprocal of the floor's
    speedup median is another number."""
    case = {"prepacked": {"samples_ms": [1.0, 1.1, 1.2, 1.5]}, "conv_prepacked": {"samples_ms": [1.0] * 4}}
    assert bench_ops._over_floor(case, "prepacked") == pytest.approx(1.15)
    assert bench_ops._over_floor({"prepacked": case["prepacked"]}, "prepacked") is None


def test_the_geomean_interval_covers_the_true_geomean_at_least_as_often_as_it_says():
    """The op targets' interval on synthetic per-round ratios with a known geomean of medians (1.0), 24 shapes x 7
    rounds as the benchmark times them: it must cover 1.0 in at least 95 % of runs. It is conservative (about 99 %,
    as docs/benchmarks.md says); one that covered less would call targets met or missed too often."""
    rng = random.Random(42)
    runs, covered = 100, 0
    for _ in range(runs):
        cases = []
        for _ in range(24):
            spread = rng.uniform(0.005, 0.05)
            cases.append([math.exp(rng.gauss(0, spread)) for _ in range(7)])
        lo, hi = timing.geomean_median_ci(cases, resamples=1000)
        covered += lo <= 1.0 <= hi
    assert covered >= 97, covered


@pytest.mark.parametrize(
    ("lo", "hi", "higher_is_better", "met"),
    [
        (1.0, 1.2, True, True),  # the interval's low end on the goal: reached
        (0.8, 1.0, True, None),  # its high end on the goal: not all of it below
        (0.8, 0.99, True, False),
        (0.8, 1.0, False, True),  # lower is better: the high end on the goal is reached
        (1.0, 1.2, False, None),
        (1.01, 1.2, False, False),
    ],
)
def test_a_verdict_counts_an_interval_end_on_the_goal_as_reaching_it(lo, hi, higher_is_better, met):
    assert timing.verdict(lo, hi, 1.0, timing.MIN_ROUNDS, higher_is_better) is met


def test_render_keeps_a_saved_ratio_whose_rounds_do_not_pair():
    """Records timed with different round counts (not in the same rounds) keep their saved ratio summary."""
    records = [
        {"impl": "eager", "shape": "a", "samples_ms": [2.0] * 7},
        {"impl": "fused", "shape": "a", "samples_ms": [1.0] * 5, "speedup_vs_eager": {"median": 1.9}},
        {"impl": "other", "shape": "a", "samples_ms": [1.0] * 7, "speedup_vs_eager": {"median": 1.9}},
    ]
    timing.refresh_ratio_summaries(records, ["shape"])
    assert records[1]["speedup_vs_eager"] == {"median": 1.9}
    assert records[2]["speedup_vs_eager"]["median"] == 2.0
