"""Shared timing, memory and machine-info helpers for the benchmarks.

Method (the same for every script):

- every implementation is warmed up, then timed in *interleaved rounds*: each round times every implementation once,
  in an order shuffled every round (seeded), so a slow spell on a shared machine hits all of them alike and no
  implementation always follows the same one (ONNX Runtime's threads spin on after its call and slow whatever runs
  next: a fixed order once made eager, which followed it in 12 of 15 rounds, look up to 2x slower); after a call of an
  implementation a caller names in ``settle``, the next waits that long, so that such threads have gone idle, and
  with ``prime`` every sample follows one untimed call of its own implementation, so that each is timed warm
  whatever ran before it;
- one sample is ``inner`` back-to-back calls, with ``inner`` calibrated during warmup so a sample lasts at least
  ``min_sample_ms``; the time per call is the sample divided by ``inner``;
- we report the median and the 25th/75th percentiles of the per-call times, and ratios taken *within each round*
  (``baseline time / impl time`` of the same round), summarised by their median, quartiles and a distribution-free
  95 % confidence interval of the median, from order statistics (this run's uncertainty; a rerun on a drifting
  machine can land outside it); a geomean over shapes gets a bootstrap interval that resamples each shape's rounds;
- on CPU, the wall clock (``time.perf_counter``); on a GPU, CUDA events around the sample;
- peak memory is measured in a separate, untimed call: on a GPU ``torch.cuda.max_memory_allocated`` minus what was
  allocated before; on CPU the running sum of the allocation/free events that ``torch.profiler(profile_memory=True)``
  records from c10's CPU allocator (tensor storage, including oneDNN scratch buffers that PyTorch allocates for it),
  i.e. the peak of bytes allocated during the call. Memory a library mallocs directly is not seen.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

CPU_MEMORY_METHOD = (
    "torch.profiler(profile_memory=True): peak of the running sum of c10 CPU allocator alloc/free events during "
    "one call, relative to the start (frees of blocks allocated before the call left out): an allocator peak, not "
    "RSS (tensor storage only; memory a library mallocs itself, such as ONNX Runtime's arena, is not seen)"
)
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated() during one call minus memory_allocated() before it"


@dataclass
class Stats:
    """Per-implementation result of :func:`time_interleaved` (times in ms, per call)."""

    times_ms: list[float]
    inner: int
    ratios: dict[str, list[float]] = field(default_factory=dict)  # baseline name -> per-round baseline/impl

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def p25_ms(self) -> float:
        return quantile(self.times_ms, 0.25)

    @property
    def p75_ms(self) -> float:
        return quantile(self.times_ms, 0.75)

    def ratio_summary(self, baseline: str) -> dict[str, float] | None:
        """Median, quartiles and the median's 95 % interval (``ci_lo``, ``ci_hi``, :func:`median_ci`) of the
        per-round ``baseline / self`` time ratios (> 1: faster than the baseline)."""
        r = self.ratios.get(baseline)
        return ratio_summary(r) if r else None


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile ``q`` in [0, 1] of ``values`` (numpy's default method)."""
    s = sorted(values)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def median_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Distribution-free interval of the median of ``values``: the ``j``-th smallest and ``j``-th largest value, with
    ``j`` the largest rank whose interval covers the median with probability >= ``level`` (the count of values below
    the median is Binomial(n, 1/2)): the smallest and largest of 7, the 4th and 12th of 15, the 10th and 21st of 30.
    A percentile bootstrap of the median covers less at these sizes (about 87 % for 7 values). ``(nan, nan)`` where
    no rank reaches ``level`` (fewer than 6 values at 95 %)."""
    n = len(values)
    rank = 0
    for j in range(1, n // 2 + 1):
        below = sum(math.comb(n, i) for i in range(j)) / 2**n  # P(fewer than j values below the median)
        if 1 - 2 * below < level:
            break
        rank = j
    if rank == 0:
        return float("nan"), float("nan")
    s = sorted(values)
    return s[rank - 1], s[n - rank]


def ratio_summary(ratios: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and the median's 95 % interval (:func:`median_ci`) of per-round time ratios."""
    lo, hi = median_ci(ratios)
    return {"median": statistics.median(ratios), "p25": quantile(ratios, 0.25), "p75": quantile(ratios, 0.75),
            "ci_lo": lo, "ci_hi": hi}  # fmt: skip


def refresh_ratio_summaries(records: Sequence[dict], keys: Sequence[str]) -> None:
    """Recompute, in place, every ``speedup_vs_<impl>`` summary of ``records`` from the saved per-round samples by
    the current rules: against the record of ``<impl>`` that agrees on ``keys`` (timed in the same rounds)."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in records:
        by_key.setdefault(tuple(r.get(k) for k in keys), {})[r["impl"]] = r
    for group in by_key.values():
        for r in group.values():
            for field_name in [k for k in r if k.startswith("speedup_vs_")]:
                base = group.get(field_name[len("speedup_vs_") :])
                if base is None or not base.get("samples_ms") or not r.get("samples_ms"):
                    continue
                if len(base["samples_ms"]) != len(r["samples_ms"]):
                    continue  # not timed in the same rounds: kept as saved
                r[field_name] = ratio_summary([b / t for b, t in zip(base["samples_ms"], r["samples_ms"], strict=True)])


def geomean(values: Sequence[float]) -> float:
    """Geometric mean (nan for an empty list)."""
    vals = [v for v in values if v > 0 and math.isfinite(v)]
    if not vals:
        return float("nan")
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def geomean_median_ci(
    per_case: Sequence[Sequence[float]], level: float = 0.95, resamples: int = 2000
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the geomean over cases of each case's median: every resample draws each
    case's rounds again, independently (cases are timed apart), and takes the geomean of their medians."""
    if not per_case or any(not v for v in per_case):
        return float("nan"), float("nan")
    rng = random.Random(0)
    geos = []
    for _ in range(resamples):
        meds = [statistics.median(rng.choices(v, k=len(v))) for v in per_case]
        geos.append(geomean(meds))
    geos.sort()
    tail = (1 - level) / 2
    return quantile(geos, tail), quantile(geos, 1 - tail)


# A round in which every variant timed together ran at least this many times its own fastest round was slowed by
# something else on the machine, not by one variant (disturbed_rounds). The fastest, not the median: a spell can last
# most of a case's rounds (4 of 7 in one record).
DISTURBED_FACTOR = 1.5


def disturbed_rounds(
    records: Sequence[dict], keys: Sequence[str], factor: float = DISTURBED_FACTOR
) -> dict[str, list[int]]:
    """The rounds (0-based) of each group of records timed together (agreeing on ``keys``, two variants or more)
    in which every variant ran at least ``factor`` times its own fastest round: a slow spell that no ratio of that
    round can be trusted through. Keyed by the group's ``keys`` values joined by spaces; groups with none are left out."""
    groups: dict[tuple, list[list[float]]] = {}
    for r in records:
        if r.get("samples_ms"):
            groups.setdefault(tuple(r.get(k) for k in keys), []).append(r["samples_ms"])
    out = {}
    for key, samples in groups.items():
        n = len(samples[0])
        if len(samples) < 2 or any(len(s) != n for s in samples):
            continue
        fastest = [min(s) for s in samples]
        slow = [i for i in range(n) if all(s[i] >= factor * f for s, f in zip(samples, fastest, strict=True))]
        if slow:
            out[" ".join(str(k) for k in key)] = slow
    return out


def disturbed_text(disturbed: dict[str, list[int]], rounds_of: str) -> list[str]:
    """Lines naming the disturbed rounds of :func:`disturbed_rounds` (none when there are none)."""
    if not disturbed:
        return []
    lines = [f"disturbed rounds ({rounds_of}; every variant at >= {DISTURBED_FACTOR}x its own fastest round there):"]
    lines += [f"  {key}: rounds {', '.join(str(i + 1) for i in rounds)}" for key, rounds in disturbed.items()]
    return lines


# Fewer rounds than this make no 95 % interval of a median (see median_ci), so no verdict.
MIN_ROUNDS = 6


def verdict(lo: float, hi: float, goal: float, rounds: int | None, higher_is_better: bool = True) -> bool | None:
    """Met (True) when the whole 95 % interval ``[lo, hi]`` is on the goal's good side, missed (False) when all of it
    is on the other, else undecided (None), as it is with fewer than :data:`MIN_ROUNDS` rounds or no interval."""
    if rounds is None or rounds < MIN_ROUNDS or not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    if not higher_is_better:
        lo, hi, goal = -hi, -lo, -goal
    if lo >= goal:
        return True
    return None if hi >= goal else False


def verdict_label(target: dict) -> str:
    """How a target's line reads: met, MISSED, undecided, or not measured (a row that could not run)."""
    if target.get("not_measured"):
        return "not measured"
    return {True: "met", False: "MISSED", None: "undecided"}[target["met"]]


def not_measured(target: str, why: str) -> dict:
    """A target whose figure this run could not take, and why (it is listed, not dropped)."""
    return {"target": target, "measured": f"not measured: {why}", "met": None, "not_measured": why}


class _NoProgress:
    """What the benchmarks use of a tqdm bar, for when tqdm is not installed."""

    def __init__(self, iterable: object, **_: object) -> None:
        self._iterable = iterable

    def __iter__(self):
        return iter(self._iterable)

    def set_postfix_str(self, *_: object, **__: object) -> None:
        pass


def progress(iterable: object, **kwargs: object) -> object:
    """A tqdm progress bar over ``iterable``, or a silent stand-in when tqdm is not installed (it is optional)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoProgress(iterable)
    return tqdm(iterable, **kwargs)


def set_threads(threads: int | None) -> int:
    """Fix torch's intra-op thread count (default: every CPU this process may run on) and return it."""
    if threads is None or threads <= 0:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def run_device(device: str | None) -> torch.device:
    """The device a run uses: ``device``, or cuda if available, else cpu."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def start(device: str | None, threads: int | None) -> tuple[torch.device, dict]:
    """Set up a benchmark run: the device (see :func:`run_device`), the fixed thread count (see
    :func:`set_threads`) and the machine info, taken before any timing so that it records the commit and load the
    timings ran under."""
    dev = run_device(device)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime" noise on CPU
    return dev, machine_info(set_threads(threads), dev)


def config_record(t0: float, **settings: object) -> dict:
    """A run's settings as JSON fields (sequences as lists), with its wall time since ``t0`` (perf_counter)."""
    fields = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in settings.items()}
    return {**fields, "wall_s": time.perf_counter() - t0}


def targets_apply(device: torch.device, batch: int, hw: int) -> bool:
    """The targets are stated for CPU at batch 8 and 224x224 inputs; other runs report no verdict."""
    return device.type == "cpu" and batch == 8 and hw == 224


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (nothing to wait for on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sample_ms(fn: Callable[[], object], inner: int, device: torch.device) -> float:
    """Time ``inner`` calls; return ms per call."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / inner
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) * 1e3 / inner


def time_interleaved(
    impls: dict[str, Callable[[], object]],
    *,
    rounds: int = 10,
    warmup: int = 2,
    min_sample_ms: float = 20.0,
    baselines: Sequence[str] = (),
    device: torch.device | str = "cpu",
    settle: dict[str, float] | None = None,
    prime: bool = False,
    seed: int = 0,
) -> dict[str, Stats]:
    """Time each zero-argument callable in interleaved rounds after warmup; see the module docstring.

    Args:
        impls: name -> callable running one call of the implementation (forward, or forward+backward).
        rounds: timed rounds; each round takes one sample of every implementation.
        warmup: untimed calls of each implementation before calibration.
        min_sample_ms: a sample repeats the call until it lasts about this long.
        baselines: implementation names to take per-round ratios against (``baseline time / impl time``).
        device: where the callables run; CUDA devices are timed with CUDA events.
        settle: name -> ms to wait after each sample of that implementation, whose threads keep spinning after a call.
        prime: one untimed call of the implementation before each of its samples.
        seed: the seed of the per-round shuffles of the order.

    Returns:
        name -> :class:`Stats` with per-call times in ms and per-round ratios against each baseline.
    """
    device = torch.device(device)
    names = list(impls)
    inner: dict[str, int] = {}
    for name in names:
        fn = impls[name]
        for _ in range(warmup):
            fn()
        synchronize(device)
        once = _sample_ms(fn, 1, device)
        inner[name] = max(1, min(1000, math.ceil(min_sample_ms / max(once, 1e-3))))
        if settle and name in settle:  # the next one's calibration too
            time.sleep(settle[name] / 1e3)
    times: dict[str, list[float]] = {n: [] for n in names}
    order, rng = list(names), random.Random(seed)
    with _gc_paused():
        for _ in range(rounds):
            rng.shuffle(order)
            for name in order:
                if prime:
                    impls[name]()
                times[name].append(_sample_ms(impls[name], inner[name], device))
                if settle and name in settle:
                    time.sleep(settle[name] / 1e3)
    stats = {n: Stats(times_ms=times[n], inner=inner[n]) for n in names}
    for base in baselines:
        if base not in times:
            continue
        for n in names:
            stats[n].ratios[base] = [b / t for b, t in zip(times[base], times[n], strict=True)]
    return stats


@contextlib.contextmanager
def _gc_paused():
    """Collect garbage once, then keep Python's cyclic GC from running inside timed samples (as timeit does)."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@contextlib.contextmanager
def _quiet_profiler_stderr():
    """Drop the profiler's own log lines (``USDT: ... profiler_start``, GPU probing errors) that kineto writes to
    file descriptor 2 on every start/stop; any other stderr output is passed through."""
    noise = ("USDT:", "gpuGetDeviceCount", "Memory block of unknown size")
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines(keepends=True):
                if not any(n in line for n in noise):
                    os.write(2, line.encode())


def peak_memory_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes allocated during one call of ``fn`` above what was allocated before it (see module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    mem, _ = cpu_memory_trace(fn)
    return running_peak(mem)[0]


def running_peak(mem: Sequence[dict]) -> tuple[int, int]:
    """(peak bytes, index of the event reaching it) of the running sum of a trace's alloc/free events. Frees of
    blocks allocated before the trace are left out: the profiler reports only some of them (those allocated while an
    earlier trace recorded), which would make the peak depend on what earlier traces saw."""
    running = peak = 0
    peak_i = -1
    allocated: set = set()
    for i, e in enumerate(mem):
        size, addr = int(e["args"].get("Bytes", 0)), e["args"].get("Addr")
        if size > 0:
            allocated.add(addr)
        elif addr in allocated:
            allocated.discard(addr)
        else:
            continue
        running += size
        if running > peak:
            peak, peak_i = running, i
    return peak, peak_i


def cpu_memory_trace(fn: Callable[[], object], *, record_shapes: bool = False) -> tuple[list[dict], list[dict]]:
    """One call of ``fn`` under ``torch.profiler(profile_memory=True)``: (the CPU allocator's alloc/free events in
    order, each with ``args["Bytes"]`` (negative for a free) and ``args["Addr"]``; every chrome-trace event)."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_profiler_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=record_shapes) as prof:
            fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text()).get("traceEvents", [])
    mem = sorted(
        (e for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0),
        key=lambda e: (e.get("ts", 0), e["args"].get("Ev Idx", 0)),
    )
    return mem, events


def memory_method(device: torch.device | str = "cpu") -> str:
    """One line saying how :func:`peak_memory_bytes` measures on ``device``."""
    return CUDA_MEMORY_METHOD if torch.device(device).type == "cuda" else CPU_MEMORY_METHOD


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "avx_vnni")
                return [f for f in wanted if f in flags]
    except OSError:
        pass
    return []


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


# What the numbers depend on: the package, its build and the benchmark code. Results are outputs, not inputs.
DIRTY_PATHS = ("csrc", "resnet_fused", "benchmarks", "setup.py", "pyproject.toml", "requirements.txt",
               ":(exclude)benchmarks/results", ":(exclude)benchmarks/out")  # fmt: skip


def _git_commit() -> str | None:
    """HEAD, with "+dirty" when the code measured differs from it: a change, tracked or new (untracked and not
    ignored), under :data:`DIRTY_PATHS`."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=all", "--", *DIRTY_PATHS],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


# glibc's malloc returns large freed blocks to the kernel as its heap top shrinks, so a tensor of tens of MB can
# fault in fresh zeroed pages on every call, or not, depending on the order of earlier allocations; here that moved
# single op rows by up to 2x between implementations running the same oneDNN primitive. These settings (within
# glibc's limits) keep freed blocks on the heap, for every row alike, as jemalloc or tcmalloc would.
HEAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
DEFAULT_MALLOC_FLAG = "--default-malloc"


def steady_heap(module: str) -> None:
    """Run ``python -m module`` again, in place, with :data:`HEAP_ENV` set, unless it is set already or the command
    line has ``--default-malloc``. glibc reads these variables at process start, hence a new process."""
    if DEFAULT_MALLOC_FLAG in sys.argv[1:] or not sys.platform.startswith("linux"):
        return
    if all(os.environ.get(k) == v for k, v in HEAP_ENV.items()):
        return
    # sys.orig_argv keeps the interpreter's own flags (-X, -W, -u); "-m module" is how the benchmarks run.
    argv = sys.orig_argv[1:] if hasattr(sys, "orig_argv") else ["-m", module, *sys.argv[1:]]
    os.execve(sys.executable, [sys.executable, *argv], {**os.environ, **HEAP_ENV})


def heap_setting() -> str:
    """How the C heap was set up for this run, for the records."""
    set_here = {k: os.environ[k] for k in HEAP_ENV if k in os.environ}
    if not set_here:
        return "glibc defaults"
    text = " ".join(f"{k}={v}" for k, v in set_here.items())
    return text + " (freed blocks stay on the heap)" if set_here == HEAP_ENV else text


def machine_info(threads: int, device: torch.device | str = "cpu") -> dict:
    """What the numbers were measured on: CPU model and cores, threads, versions, GPU, load and git commit."""
    import resnet_fused

    device = torch.device(device)
    info = {
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "threads": threads,
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "heap": heap_setting(),
        "load_avg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "triton": _version("triton"),
        "resnet_fused": resnet_fused.__version__,
        "git_commit": _git_commit(),
        "backends_available": resnet_fused.available_backends(),
        "triton_interpret": resnet_fused.backends.INTERPRET,
        "device": str(device),
        "timer": "CUDA events" if device.type == "cuda" else "time.perf_counter (wall clock)",
        "memory_method": memory_method(device),
        "inductor_fx_graph_cache": bool(getattr(torch._inductor.config, "fx_graph_cache", False)),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["cuda"] = torch.version.cuda
    return info


def stats_record(stats: Stats, baselines: Sequence[str] = ("eager",)) -> dict:
    """The JSON fields of one measured implementation: median/p25/p75 in ms, samples and per-round ratios."""
    rec: dict = {
        "median_ms": stats.median_ms,
        "p25_ms": stats.p25_ms,
        "p75_ms": stats.p75_ms,
        "rounds": len(stats.times_ms),
        "inner": stats.inner,
        "samples_ms": stats.times_ms,
    }
    for base in baselines:
        summary = stats.ratio_summary(base)
        if summary is not None:
            rec[f"speedup_vs_{base}"] = summary
    return rec


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path``, creating parent directories; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    """Write ``payload`` as indented JSON, creating parent directories."""
    return write_text(path, json.dumps(payload, indent=1, default=_json_default) + "\n")


def _json_default(obj: object) -> object:
    if isinstance(obj, Stats):
        return asdict(obj)
    if isinstance(obj, (torch.dtype, torch.device, torch.memory_format)):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
