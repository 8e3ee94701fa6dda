"""The main job (``make bench``): an equivalence check, then the op benchmark, a table, JSON and a PNG.

1. Equivalence: each available backend's output and gradients against a float64 reference, max error per dtype
   (see :mod:`benchmarks.equivalence`); a failure is printed and makes the exit status 1, after the timings.
2. Op benchmark (see :mod:`benchmarks.bench_ops`): the distinct convs of ResNet-50 at batch 8, fp32, channels_last,
   forward (with the prepacked inference rows) and forward+backward, every implementation.
3. Model benchmark (see :mod:`benchmarks.bench_model`): ResNet-50 inference at batch 1 and 8, fp32, channels_last,
   against its peers (``torch.compile``, with and without Inductor freezing, and ONNX Runtime).

``--with-model`` adds the ResNet-50 training steps to the model benchmark. ``--full`` runs everything: ResNet-18 and
ResNet-50 convs, fp32 and bf16, channels_last and NCHW, and the model benchmark of both models, inference and
training, in fp32 and bf16. ``--no-model`` leaves the model benchmark out.

Writes ``ops.json``, ``ops.md``, ``ops.png``, ``summary.md`` (and ``model.json``, ``model.md`` with a model run) to
``--out`` (default ``benchmarks/out/``), and everything in one JSON to ``--json`` (default ``<out>/bench.json``).
Any of these files in ``--out`` that this run did not write (``model.md`` of an earlier run under ``--no-model``,
``equivalence.json`` under ``--skip-equivalence``) is removed, so that every file there is of this run.

A wrong result (a model variant or prepacked op row whose output fails its check before timing) is not timed and
makes the exit status 1, as an equivalence failure does.

``--render BENCH_JSON`` times nothing: it writes the tables, summary and verdicts again from a saved ``bench.json``
(recomputing the op summary and the targets from its records), e.g. after a change to how they are judged.

    python -m benchmarks.main            # make bench
    python -m benchmarks.main --full     # make bench-full
    python -m benchmarks.main --render benchmarks/results/bench.json --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks import bench_model, bench_ops, equivalence, timing

TINY = {"hw": 32, "batch": 2, "rounds": 2, "warmup": 1, "min_sample_ms": 1.0, "max_cases": 1}
TINY_MODEL = {"models": ("resnet18",), "modes": ("inference",), "inference_batches": (2,), "with_compile": False,
              "hw": 32, "batch": 2, "rounds": 2, "warmup": 1, "min_sample_ms": 1.0}  # fmt: skip


# Every file a run may write to --out; those this run did not write are removed.
OUTPUTS = ("equivalence.json", "ops.json", "ops.md", "ops.png", "model.json", "model.md", "summary.md", "bench.json")


def _header(m: dict) -> str:
    """The machine lines of ``timing.machine_info``'s record ``m``, taken before any timing."""
    gpu = f", GPU {m['gpu']}" if "gpu" in m else ""
    return (
        f"machine: {m['cpu_model']} ({m['cpus_usable']} usable CPUs, flags {' '.join(m['cpu_flags'])}){gpu}; "
        f"{m['threads']} threads; torch {m['torch']}, torchvision {m['torchvision']}, triton {m['triton']}; "
        f"resnet_fused {m['resnet_fused']} @ {m['git_commit']}\n"
        f"backends available: {m['backends_available']}; timer: {m['timer']}; load average {m['load_avg_1_5_15']}\n"
        f"heap: {m['heap']}\n"
        f"peak memory: {m['memory_method']}"
    )


def _write_summary(path: Path, header: str, combined: dict) -> Path:
    """The headline in one markdown file: machine, equivalence, op summary and every target, met or missed."""
    parts = ["```", header, "```"]
    if "equivalence" in combined:
        parts += ["", "```", equivalence.format_table(combined["equivalence"]), "```"]
    ops = combined["ops"]
    ops_lines = [bench_ops.summary_text(ops["summary"], ops["targets"], ops["not_timed"])]
    ops_lines += timing.disturbed_text(timing.disturbed_rounds(ops["records"], bench_ops.ROUND_KEYS), "op benchmark")
    parts += ["", "```", "\n".join(ops_lines), "```"]
    if "model" in combined:
        model = combined["model"]
        parts += ["", bench_model.table_markdown(model["records"], model["machine"]["memory_method"])]
        model_lines = [bench_model.targets_text(combined["model"]["targets"])]
        disturbed = timing.disturbed_rounds(model["records"], bench_model.ROUND_KEYS)
        model_lines += timing.disturbed_text(disturbed, "model benchmark")
        parts += ["```", "\n".join(model_lines), "```"]
    parts.append(f"\nwall time {combined['wall_s']:.0f} s\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path


def _remove_stale(out: Path, written: Sequence[Path]) -> list[Path]:
    """Remove the files of :data:`OUTPUTS` in ``out`` that this run did not write (an earlier run's); returns them."""
    keep = {p.resolve() for p in written}
    stale = [out / name for name in OUTPUTS if (out / name).is_file() and (out / name).resolve() not in keep]
    for p in stale:
        p.unlink()
    return stale


def _failures(combined: dict) -> list[str]:
    """Why the run fails: an equivalence failure, a wrong result in the op or model benchmark."""
    out = []
    if "equivalence" in combined and not combined["equivalence"]["passed"]:
        out.append("EQUIVALENCE CHECK FAILED: see the table at the top; the timings above are of a wrong result.")
    wrong = bench_ops.wrong_results(combined["ops"]["records"])
    if "model" in combined:
        wrong += bench_model.wrong_results(combined["model"]["records"])
    if wrong:
        out.append(f"WRONG RESULTS: {len(wrong)} row(s) failed the output check before timing (not timed): "
                   + "; ".join(f"{r['impl']}: {r['status']}" for r in wrong[:5]))  # fmt: skip
    return out


def _finish(
    out: Path,
    json_path: Path,
    header: str,
    combined: dict,
    written: list[Path],
    remove_stale: bool = True,
    rendered: bool = False,
) -> int:
    """Write bench.json and summary.md, remove an earlier run's files (``remove_stale``), print what was written; the
    exit status. ``rendered``: the figures are a saved run's."""
    written.append(timing.write_json(json_path, combined))
    written.append(_write_summary(out / "summary.md", header, combined))
    print()
    for p in written:
        print(f"wrote {p}")
    for p in _remove_stale(out, written) if remove_stale else []:
        print(f"removed {p} (an earlier run's; this run did not produce it)")
    print(f"total {combined['wall_s']:.0f} s" + (" (the saved run's)" if rendered else ""))
    failures = _failures(combined)
    for line in failures:
        print(line)
    return 1 if failures else 0


def render(bench_json: Path, out: Path, json_path: Path | None = None) -> int:
    """Write every table, summary.md and the verdicts again from a saved ``bench.json``, timing nothing: the op
    summary and targets and the model targets are recomputed from the records by the current rules."""
    combined = json.loads(Path(bench_json).read_text())
    # The per-round ratios' summaries too, from the saved samples: the records keep the rules they were timed under.
    timing.refresh_ratio_summaries(combined["ops"]["records"], bench_ops.ROUND_KEYS)
    if "model" in combined:
        timing.refresh_ratio_summaries(combined["model"]["records"], bench_model.ROUND_KEYS)
    ops = combined["ops"] = bench_ops.analyze(combined["ops"])
    written = bench_ops.write_outputs(ops, out / "ops.json", out / "ops.png", out / "ops.md")
    if "equivalence" in combined:
        written.append(timing.write_json(out / "equivalence.json", combined["equivalence"]))
    if "model" in combined:
        model = combined["model"]
        if model["targets"]:  # they applied to that run
            model["targets"] = bench_model.targets(model["records"])
        written += bench_model.write_outputs(model, out / "model.json", out / "model.md")
    print(bench_ops.summary_text(ops["summary"], ops["targets"], ops["not_timed"]))
    if "model" in combined:
        print(bench_model.targets_text(combined["model"]["targets"]))
    # The header main took before timing; a file written before it was kept has the op benchmark's.
    header = _header(combined.get("machine", ops["machine"]))
    header += f"\nrendered again by the rules at {timing._git_commit()} from the saved records (nothing re-timed)"
    # Rendered into the saved run's own folder, everything there is that run's, the record it reads included: nothing
    # is stale. Into another folder, files this rendering did not write are another run's.
    own_folder = Path(out).resolve() == Path(bench_json).resolve().parent
    return _finish(out, json_path or out / "bench.json", header, combined, written, not own_folder, rendered=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the equivalence check and the benchmark suite; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="every shape, dtype, layout and pass, plus the models")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (tests)")
    parser.add_argument("--with-model", action="store_true", help="also the resnet50 train steps (fp32, NHWC)")
    parser.add_argument("--no-model", action="store_true", help="leave the model benchmark out")
    parser.add_argument("--out", default=str(bench_ops.OUT_DIR), help="directory for json/md/png")
    parser.add_argument("--json", default=None, help="combined JSON (default: <out>/bench.json)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="timed rounds (default 7 for the ops, 15 for the models; 10 with --full)",
    )
    parser.add_argument("--train-rounds", type=int, default=30,
                        help="timed rounds of the train steps, whose ratios scatter most (default 30)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all usable CPUs)")
    parser.add_argument("--skip-equivalence", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--render", default=None, metavar="BENCH_JSON",
                        help="time nothing: write the outputs again from a saved bench.json")  # fmt: skip
    parser.add_argument(
        timing.DEFAULT_MALLOC_FLAG, action="store_true",
        help="keep glibc's default heap trimming (by default the run re-executes with freed blocks kept on the heap)",
    )  # fmt: skip
    a = parser.parse_args(argv)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime" noise on CPU compiles
    out = Path(a.out)
    if a.render:
        return render(Path(a.render), out, Path(a.json) if a.json else None)
    t_start = time.perf_counter()
    device = timing.run_device(None)
    threads = timing.set_threads(a.threads)
    progress = not a.no_progress
    # Taken once, before any timing: the load average it records is the one the timings started under.
    machine = timing.machine_info(threads, device)
    header = _header(machine)
    print(header, flush=True)
    combined: dict = {"machine": machine}

    # 1. equivalence
    if not a.skip_equivalence:
        t0 = time.perf_counter()
        eq_kw = {"max_cases": 2, "dtypes": ("fp32", "bf16"), "layouts": ("channels_last",)} if a.tiny else {}
        eq = equivalence.run(progress=progress, **eq_kw)
        eq["wall_s"] = time.perf_counter() - t0
        print("\n" + equivalence.format_table(eq) + f"\n({eq['wall_s']:.0f} s)", flush=True)
        combined["equivalence"] = eq
        written = [timing.write_json(out / "equivalence.json", eq)]
    else:
        written = []

    # 2. ops
    if a.tiny:
        ops_kw: dict = {"models": ("resnet18",), **TINY}
    elif a.full:
        ops_kw = {"models": ("resnet18", "resnet50"), "dtypes": ("fp32", "bf16"), "layouts": ("channels_last", "nchw")}
    else:
        ops_kw = {"models": ("resnet50",), "dtypes": ("fp32",), "layouts": ("channels_last",)}
    if not a.tiny:
        ops_kw.update(batch=a.batch, rounds=a.rounds or (10 if a.full else 7))
    ops = bench_ops.run(threads=threads, progress=progress, **ops_kw)
    print(f"\nop benchmark ({ops['config']['wall_s']:.0f} s)\n")
    print(bench_ops.table_markdown(ops["records"]))
    print(bench_ops.summary_text(ops["summary"], ops["targets"], ops["not_timed"]), flush=True)
    combined["ops"] = ops
    written += bench_ops.write_outputs(ops, out / "ops.json", out / "ops.png", out / "ops.md")

    # 3. models: resnet50 inference against its peers; the train steps with --with-model; everything with --full
    if not a.no_model:
        if a.tiny:
            model_kw: dict = dict(TINY_MODEL)
        elif a.full:
            model_kw = {"models": ("resnet18", "resnet50"), "dtypes": ("fp32", "bf16"), "rounds": a.rounds or 10,
                        "train_rounds": a.train_rounds}  # fmt: skip
        else:
            modes = ("inference", "train") if a.with_model else ("inference",)
            model_kw = {"models": ("resnet50",), "modes": modes, "dtypes": ("fp32",), "rounds": a.rounds or 15,
                        "train_rounds": a.train_rounds}  # fmt: skip
        if not a.tiny:
            model_kw["batch"] = a.batch
        model = bench_model.run(threads=threads, progress=progress, **model_kw)
        print(f"\nmodel benchmark ({model['config']['wall_s']:.0f} s)\n")
        print(bench_model.table_markdown(model["records"], model["machine"]["memory_method"]))
        print(bench_model.targets_text(model["targets"]), flush=True)
        combined["model"] = model
        written += bench_model.write_outputs(model, out / "model.json", out / "model.md")

    combined["wall_s"] = time.perf_counter() - t_start
    return _finish(out, Path(a.json) if a.json else out / "bench.json", header, combined, written)


if __name__ == "__main__":
    timing.steady_heap("benchmarks.main")
    sys.exit(main())
