"""Diagnostics behind the README's "what limits the misses": where time and memory go, measured, not timed targets.

    python -m benchmarks.diagnose conv-time [--batch 1] [--rounds 8]    # oneDNN conv time, page faults: vs freezing
    python -m benchmarks.diagnose train-peak [--variant frozen-bn]     # what the train step's allocator peak holds
    python -m benchmarks.diagnose train-ops [--variant frozen-bn]      # where a train step's CPU time goes
    python -m benchmarks.diagnose per-call [--device cuda]              # host time per call on a tiny conv
    python -m benchmarks.diagnose residual-routes [--batches 1,8] [--model]  # the prepared residual add's routes
    python -m benchmarks.diagnose after-ort [--batch 1]                 # eager after ONNX Runtime, by the gap between

``conv-time`` runs resnet50 prepared with ``optimize_for_inference`` (exact ReLU, and ``fuse_relu=True``) and under
``torch.compile`` with Inductor freezing, alternating forwards in one process, and sums the execution times oneDNN's
verbose mode reports for its convolution primitives in each forward: what is left of the wall time is everything else
(pooling, classifier, Python, allocation). The verbose printing itself slows all alike. It also counts the minor page
faults of each forward (``getrusage``): memory the forward touches for the first time, such as fresh outputs.

``train-peak`` traces one fused and one unfused resnet50 train step (``bench_model``'s) with
``torch.profiler(profile_memory=True)``, finds each step's allocator peak and lists the op running at that moment and
the live blocks grouped by the op that allocated them. ``train-ops`` profiles two steps of each and lists the ops by
their own CPU time.

``per-call`` times a tiny conv (x ``(1, 64, 8, 8)``, a 1x1 64->64 weight, bias, residual and ReLU; fp32,
channels_last, under ``torch.no_grad()``) whose arithmetic is nearly free, so each implementation's time per call is
its host cost: the conv alone, the eager baseline, and every available backend through the public op.

``residual-routes`` times the routes a prepared conv can give its residual add (``resnet_fused.inference``) on
ResNet-50's four 1x1 residual convs (packed weights, fp32, channels_last), interleaved, each over the packed conv with
its bias post-op alone (no residual, no ReLU; the op benchmark's floor ``conv_prepacked`` has no bias):
oneDNN's binary post-op, the conv then one pass (``_epilogue_``), and the sum into a donated residual; each with the
exact ReLU pass and with oneDNN's ReLU. With ``--model`` it also runs a prepared resnet50 under the route rule against
the same model with every residual on the pass, and (with oneDNN's ReLU) on the post-op, neither donating
(alternating forwards, the ratio's median and 95 % interval).

``after-ort`` times an eager resnet50 forward (channels_last) started right after an ONNX Runtime call on the same
model, and after idle gaps of 20 to 200 ms, against the same forward after an idle gap with no ONNX Runtime call
before it: how long ONNX Runtime's threads keep spinning and slowing the next call (the model benchmark's
``ORT_SETTLE_MS``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import ctypes
import os
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

import resnet_fused
from benchmarks.bench_model import train_impls
from benchmarks.bench_ops import eager_block_tail
from benchmarks.timing import (
    _gc_paused,
    _quiet_profiler_stderr,
    cpu_memory_trace,
    running_peak,
    set_threads,
    time_interleaved,
)
from resnet_fused.backends import BACKENDS


@contextlib.contextmanager
def _captured_stdout(path: Path) -> Iterator[None]:
    """Send the process's C-level stdout (where oneDNN's verbose lines go) to ``path`` for the block."""
    libc = ctypes.CDLL(None)
    libc.fflush(None)
    saved = os.dup(1)
    with open(path, "wb") as f:
        os.dup2(f.fileno(), 1)
        try:
            yield
        finally:
            libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)


def onednn_conv_ms(verbose_text: str) -> tuple[float, int]:
    """(total ms, count) of the convolution executions in oneDNN verbose output (``onednn_verbose,...,exec,cpu,
    convolution,...,<ms>`` lines)."""
    total, count = 0.0, 0
    for line in verbose_text.splitlines():
        fields = line.split(",")
        if line.startswith("onednn_verbose") and "exec" in fields and "convolution" in fields:
            total += float(fields[-1])
            count += 1
    return total, count


def conv_time(*, batch: int = 1, hw: int = 224, rounds: int = 8, threads: int = 2, arch: str = "resnet50") -> dict:
    """Per impl: median wall ms per forward, median oneDNN convolution ms, the number of convolutions and the median
    minor page faults per forward."""
    import resource

    import torch._inductor.config as inductor_config
    import torchvision

    import resnet_fused
    from resnet_fused.inference import optimize_for_inference

    torch.set_num_threads(threads)
    model = getattr(torchvision.models, arch)().eval().to(memory_format=torch.channels_last)
    fused, _ = resnet_fused.convert(copy.deepcopy(model))
    fused = fused.to(memory_format=torch.channels_last)
    prepared = optimize_for_inference(copy.deepcopy(fused))
    prepared_fuse_relu = optimize_for_inference(fused, fuse_relu=True)
    x = torch.randn(batch, 3, hw, hw).to(memory_format=torch.channels_last)
    with torch.no_grad(), _freezing(inductor_config):
        frozen = torch.compile(model)
        impls = {"prepared": prepared, "prepared-fuse-relu": prepared_fuse_relu, "compile-freezing": frozen}
        for fn in impls.values():
            for _ in range(3):
                fn(x)
        samples: dict[str, dict[str, list[float]]] = {k: {"wall": [], "conv": [], "n": [], "faults": []} for k in impls}
        with tempfile.TemporaryDirectory() as tmp:
            log = Path(tmp) / "verbose.txt"
            for r in range(rounds):
                for name in list(impls)[:: 1 if r % 2 == 0 else -1]:
                    with _captured_stdout(log), torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                        start = time.perf_counter()
                        impls[name](x)
                        wall = (time.perf_counter() - start) * 1e3
                        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
                    conv, n = onednn_conv_ms(log.read_text(errors="replace"))
                    samples[name]["faults"].append(faults)
                    samples[name]["wall"].append(wall)
                    samples[name]["conv"].append(conv)
                    samples[name]["n"].append(n)
    return {
        name: {
            "wall_ms": statistics.median(s["wall"]),
            "conv_ms": statistics.median(s["conv"]),
            "other_ms": statistics.median(w - c for w, c in zip(s["wall"], s["conv"], strict=True)),
            "convs": int(statistics.median(s["n"])),
            "page_faults": int(statistics.median(s["faults"])),
        }
        for name, s in samples.items()
    }


@contextlib.contextmanager
def _freezing(config) -> Iterator[None]:
    old = config.freezing
    config.freezing = True
    try:
        yield
    finally:
        config.freezing = old


def _trace_step(step) -> dict:
    mem, events = cpu_memory_trace(step, record_shapes=True)
    ops = [e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op"]

    def stack(ts: float) -> list[dict]:
        return sorted((o for o in ops if o["ts"] <= ts <= o["ts"] + o["dur"]), key=lambda o: -o["dur"])

    peak, peak_i = running_peak(mem)
    live: dict[int, dict] = {}
    for e in mem[: peak_i + 1]:
        if int(e["args"]["Bytes"]) > 0:
            live[e["args"]["Addr"]] = e
        else:
            live.pop(e["args"]["Addr"], None)
    by_op: collections.Counter = collections.Counter()
    for e in live.values():
        names = [o["name"] for o in stack(e["ts"])]
        by_op[" > ".join(names[-2:]) or "?"] += int(e["args"]["Bytes"])
    at_peak = [
        {"op": o["name"], "input_dims": o.get("args", {}).get("Input Dims")}
        for o in (stack(mem[peak_i]["ts"]) if peak_i >= 0 else [])
    ]
    return {
        "peak_mib": peak / 2**20,
        "at_peak": at_peak,
        "live_mib_by_op": {k: v / 2**20 for k, v in by_op.most_common()},
    }


def _train_steps(variant: str, batch: int, hw: int, threads: int, arch: str) -> dict:
    """``bench_model``'s fused and unfused train steps, each run once so that optimizer state exists."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, hw, hw).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,))
    steps = train_impls(arch, variant, torch.float32, torch.channels_last, torch.device("cpu"), x, y)
    for step in steps.values():
        step()
    return steps


def train_peak(
    *, variant: str = "frozen-bn", batch: int = 8, hw: int = 224, threads: int = 2, arch: str = "resnet50"
) -> dict:
    """Per impl (fused, unfused): the allocator peak of one train step, the ops running at it, the live blocks."""
    out = {}
    for name, step in _train_steps(variant, batch, hw, threads, arch).items():
        step.before_memory_trace()
        out[name] = _trace_step(step)
    return out


def train_ops(
    *, variant: str = "frozen-bn", batch: int = 8, hw: int = 224, threads: int = 2, arch: str = "resnet50"
) -> dict:
    """Per impl (fused, unfused): {op name: own CPU ms per step}, from torch.profiler over two steps."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for name, step in _train_steps(variant, batch, hw, threads, arch).items():
        with _quiet_profiler_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
            step()
        own = {e.key: e.self_cpu_time_total / 1e3 / 2 for e in prof.key_averages()}
        out[name] = dict(sorted(own.items(), key=lambda kv: -kv[1]))
    return out


def backends_on(device: torch.device) -> list[str]:
    """The available backends that run on ``device``'s tensors (the reference included)."""
    return [row.name for row in BACKENDS if device.type in row.devices and not row.unavailable()]


def per_call(device: str = "cpu", rounds: int = 7, threads: int = 2) -> dict[str, float]:
    """Median microseconds per call of each implementation on the tiny conv (see the module docstring), interleaved."""
    set_threads(threads)
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dev)

    x, residual = (rand(1, 64, 8, 8).to(memory_format=torch.channels_last) for _ in range(2))
    weight, bias = rand(64, 64, 1, 1), rand(64)
    geometry = {"stride": (1, 1), "padding": (0, 0), "dilation": (1, 1)}
    impls = {
        "conv alone": lambda: torch.nn.functional.conv2d(x, weight),
        "eager": lambda: eager_block_tail(x, weight, bias, residual, **geometry, relu=True),
    }
    for name in backends_on(dev):
        impls[name] = lambda b=name: resnet_fused.conv_bias_add_relu(x, weight, bias, residual, backend=b)
    with torch.no_grad():
        stats = time_interleaved(impls, rounds=rounds, warmup=3, min_sample_ms=20.0, device=dev)
    return {name: statistics.median(st.times_ms) * 1e3 for name, st in stats.items()}


AFTER_ORT_GAPS_MS = (0, 20, 50, 100, 200)


def after_ort(
    *, batch: int = 1, hw: int = 224, rounds: int = 8, threads: int = 2, arch: str = "resnet50"
) -> dict[str, float]:
    """Median ms of an eager forward run ``gap`` ms after an ONNX Runtime call (key ``"after ort, <gap> ms"``), and
    after 300 ms idle with no such call (``"alone"``); the cases alternate, ``rounds`` samples each."""
    import torchvision

    from benchmarks.bench_model import ort_impl

    set_threads(threads)
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)().eval()
    x = torch.randn(batch, 3, hw, hw)
    ort_call, _ = ort_impl(model, x, threads)
    model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    samples: dict[str, list[float]] = collections.defaultdict(list)
    with torch.no_grad(), _gc_paused():
        for _ in range(2):
            model(x)
            ort_call()
        for _ in range(rounds):
            for gap in (*AFTER_ORT_GAPS_MS, None):
                if gap is None:
                    time.sleep(0.3)
                else:
                    ort_call()
                    time.sleep(gap / 1e3)
                t0 = time.perf_counter()
                model(x)
                samples["alone" if gap is None else f"after ort, {gap} ms"].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}


RESIDUAL_CONVS = ((64, 256, 56), (128, 512, 28), (256, 1024, 14), (512, 2048, 7))  # 1x1 C->K at HxW, +res


def residual_routes(batch: int, rounds: int = 15, threads: int = 2) -> dict[str, dict[str, float]]:
    """Per residual conv (``RESIDUAL_CONVS`` at ``batch``): each route's median time over the packed conv with its
    bias alone, that conv's ms and the output's MiB (see the module docstring)."""
    set_threads(threads)
    g = torch.Generator().manual_seed(0)
    return {f"1x1 {c}->{k} {hw}x{hw}": _route_times(batch, c, k, hw, g, rounds) for c, k, hw in RESIDUAL_CONVS}


def _route_times(batch: int, c: int, k: int, hw: int, g: torch.Generator, rounds: int) -> dict[str, float]:
    conv = torch.ops.mkldnn._convolution_pointwise
    geometry = ([0, 0], [1, 1], [1, 1], 1)
    x, residual = (
        torch.randn(batch, ch, hw, hw, generator=g).contiguous(memory_format=torch.channels_last) for ch in (c, k)
    )
    bias = torch.randn(k, generator=g)
    packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
        (torch.randn(k, c, 1, 1, generator=g) * c**-0.5).to_mkldnn(), *geometry[:3], 1, list(x.shape)
    )
    owned = residual.clone()  # summed into on every call: its values grow, its cost does not

    def with_bias() -> torch.Tensor:
        return conv(x, packed, bias, *geometry, "none", [], None)

    def post_op(relu: str | None) -> torch.Tensor:
        y = conv.binary(x, residual, packed, bias, *geometry, "add", 1.0, relu, [], None)
        return y if relu else y.relu_()

    def one_pass() -> torch.Tensor:
        y = with_bias()
        torch.ops.resnet_fused._epilogue_(y, None, residual, None, True)
        return y

    def donated(relu: str | None) -> torch.Tensor:
        y = torch.ops.mkldnn._convolution_pointwise_.binary(
            owned, x, packed, bias, *geometry, "add", 1.0, relu, [], None
        )
        return y if relu else y.relu_()

    impls = {
        "conv + bias": with_bias,
        "post-op": lambda: post_op(None),
        "post-op, oneDNN ReLU": lambda: post_op("relu"),
        "pass": one_pass,
        "donated": lambda: donated(None),
        "donated, oneDNN ReLU": lambda: donated("relu"),
    }
    with torch.no_grad():
        stats = time_interleaved(impls, rounds=rounds, warmup=3, baselines=("conv + bias",))
    row = {name: 1 / statistics.median(st.ratios["conv + bias"]) for name, st in stats.items() if name != "conv + bias"}
    row["conv + bias ms"] = stats["conv + bias"].median_ms
    row["y MiB"] = residual.numel() * residual.element_size() / 2**20
    return row


def residual_rule_model(batch: int, rounds: int = 20, threads: int = 2, arch: str = "resnet50") -> dict[str, dict]:
    """A prepared ``arch`` under the residual route rule against every residual on the pass and on the post-op,
    neither donating; per ReLU mode, the rule's median speedup over each and its 95 % interval, and per variant the
    residual adds of one forward that ran in place and as a pass."""
    from unittest import mock

    import torchvision

    from benchmarks.timing import median_ci
    from resnet_fused import inference

    set_threads(threads)
    torch.manual_seed(0)
    model = resnet_fused.convert(getattr(torchvision.models, arch)().eval())[0].to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=torch.channels_last)

    @contextlib.contextmanager
    def routes(max_bytes: float, donate: bool) -> Iterator[None]:
        # Every variant patches, so that each pays the same few microseconds for it.
        with mock.patch.object(inference, "BINARY_POST_OP_MAX_BYTES", max_bytes), contextlib.ExitStack() as stack:
            if not donate:
                stack.enter_context(mock.patch.object(inference, "_can_sum_into", lambda *args: False))
            yield

    variants = {
        "rule": lambda: routes(inference.BINARY_POST_OP_MAX_BYTES, donate=True),
        "pass": lambda: routes(-1, donate=False),
        "post-op": lambda: routes(float("inf"), donate=False),
    }
    out = {}
    for fuse_relu in (False, True):
        prepared = inference.optimize_for_inference(copy.deepcopy(model), fuse_relu=fuse_relu)

        def forward(ctx, prepared=prepared):
            with ctx(), torch.inference_mode():
                prepared(x)

        # With the exact ReLU the rule never takes the post-op: there it differs from the pass only by donating.
        names = ("rule", "pass", "post-op") if fuse_relu else ("rule", "pass")
        impls = {name: (lambda ctx=variants[name]: forward(ctx)) for name in names}
        stats = time_interleaved(impls, rounds=rounds, warmup=2, min_sample_ms=50.0)
        mode = "oneDNN ReLU" if fuse_relu else "exact ReLU"
        out[mode] = {"rule ms": stats["rule"].median_ms, "speedup": {}, "in place / pass": {}}
        for name in names:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                forward(variants[name])
            ops = collections.Counter(e.name for e in prof.events())
            out[mode]["in place / pass"][name] = (
                ops["mkldnn::_convolution_pointwise_"],
                ops["resnet_fused::_epilogue_"],
            )
        for other in names[1:]:
            ratios = [o / r for o, r in zip(stats[other].times_ms, stats["rule"].times_ms, strict=True)]
            out[mode]["speedup"][f"over {other}"] = (statistics.median(ratios), *median_ci(ratios))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    ct = sub.add_parser("conv-time", help="oneDNN conv time per forward: prepared vs compile + freezing")
    ct.add_argument("--batch", type=int, default=1)
    ct.add_argument("--rounds", type=int, default=8)
    tp = sub.add_parser("train-peak", help="what a train step's allocator peak holds, fused vs unfused")
    tp.add_argument("--variant", default="frozen-bn", choices=["frozen-bn", "bn-free"])
    tp.add_argument("--batch", type=int, default=8)
    to = sub.add_parser("train-ops", help="a train step's ops by their own CPU time, fused vs unfused")
    to.add_argument("--variant", default="frozen-bn", choices=["frozen-bn", "bn-free"])
    to.add_argument("--batch", type=int, default=8)
    to.add_argument("--top", type=int, default=12)
    for p in (ct, tp, to):
        p.add_argument("--hw", type=int, default=224)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--model", default="resnet50")
    rr = sub.add_parser("residual-routes", help="the prepared residual add's routes over the packed conv + bias")
    rr.add_argument("--batches", default="1,8", help="comma list of batch sizes")
    rr.add_argument("--rounds", type=int, default=15)
    rr.add_argument("--threads", type=int, default=2)
    rr.add_argument("--model", action="store_true", help="also the route rule on a prepared resnet50")
    ao = sub.add_parser("after-ort", help="an eager forward right after ONNX Runtime, by the idle gap between")
    ao.add_argument("--batch", type=int, default=1)
    ao.add_argument("--rounds", type=int, default=8)
    ao.add_argument("--hw", type=int, default=224)
    ao.add_argument("--threads", type=int, default=2)
    ao.add_argument("--model", default="resnet50")
    pc = sub.add_parser("per-call", help="host time per call on a tiny conv: conv alone, eager, each backend")
    pc.add_argument("--device", default="cpu", help="cpu or cuda")
    pc.add_argument("--rounds", type=int, default=7)
    pc.add_argument("--threads", type=int, default=2)
    a = parser.parse_args(argv)
    if a.what == "after-ort":
        try:
            import onnxruntime  # noqa: F401
        except ImportError as e:
            parser.error(f"after-ort needs onnxruntime (`make bench` installs it): {e}")
        res = after_ort(batch=a.batch, hw=a.hw, rounds=a.rounds, threads=a.threads, arch=a.model)
        print(f"eager {a.model} forward, batch {a.batch}, {a.hw}x{a.hw}, channels_last, {a.threads} threads (medians):")
        for name, ms in res.items():
            print(f"  {name:20s} {ms:8.1f} ms")
    elif a.what == "per-call":
        res = per_call(device=a.device, rounds=a.rounds, threads=a.threads)
        print(f"per call, 1x1 64->64 8x8 batch 1 +bias+res+relu, fp32 channels_last, no_grad, {a.device} (median us):")
        for name, us in res.items():
            print(f"  {name:12s} {us:8.1f}")
    elif a.what == "residual-routes":
        for batch in (int(b) for b in a.batches.split(",")):
            print(
                f"batch {batch}: time over the packed conv + bias alone (medians, fp32 channels_last, {a.threads} threads)"
            )
            for case, row in residual_routes(batch, rounds=a.rounds, threads=a.threads).items():
                routes = "  ".join(f"{k} {v:.2f}" for k, v in row.items() if not k.endswith(("ms", "MiB")))
                print(f"  {case:22s} y {row['y MiB']:5.1f} MiB  conv + bias {row['conv + bias ms']:.3f} ms  {routes}")
            if a.model:
                for mode, r in residual_rule_model(batch, threads=a.threads).items():
                    others = "  ".join(f"{k} {m:.3f} ({lo:.3f}-{hi:.3f})" for k, (m, lo, hi) in r["speedup"].items())
                    counts = ", ".join(f"{k} {a}/{b}" for k, (a, b) in r["in place / pass"].items())
                    print(f"  resnet50 prepared, {mode}: rule {r['rule ms']:.2f} ms, speedup {others}")
                    print(f"    residual adds in place / as a pass: {counts}")
    elif a.what == "conv-time":
        res = conv_time(batch=a.batch, hw=a.hw, rounds=a.rounds, threads=a.threads, arch=a.model)
        print(f"{a.model}, batch {a.batch}, {a.hw}x{a.hw}, {a.threads} threads, {a.rounds} alternating forwards each")
        for name, r in res.items():
            print(
                f"  {name:20s} wall {r['wall_ms']:8.2f} ms  oneDNN convs {r['conv_ms']:8.2f} ms ({r['convs']})"
                f"  other {r['other_ms']:7.2f} ms  page faults {r['page_faults']:6d}   (medians, verbose on)"
            )
    elif a.what == "train-ops":
        res = train_ops(variant=a.variant, batch=a.batch, hw=a.hw, threads=a.threads, arch=a.model)
        for name, own in res.items():
            print(
                f"== {name}: {sum(own.values()):.1f} ms per step in ops (each op's own time, wall clock on the calling thread)"
            )
            for op, ms in list(own.items())[: a.top]:
                print(f"     {ms:9.1f} ms  {op}")
    else:
        res = train_peak(variant=a.variant, batch=a.batch, hw=a.hw, threads=a.threads, arch=a.model)
        for name, r in res.items():
            print(f"== {name}: allocator peak {r['peak_mib']:.1f} MiB, during:")
            for frame in r["at_peak"]:
                print(f"     {frame['op']} {frame['input_dims'] or ''}")
            print("   live at the peak, by allocating op:")
            for op, mib in r["live_mib_by_op"].items():
                print(f"     {mib:8.2f} MiB  {op}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
