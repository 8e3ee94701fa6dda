"""The GPU acceptance run: build, test and bench on a machine with a CUDA GPU, offline, with the torch it has.

    python3 scripts/gpu_check.py build   # the extension against this python's torch (never installs torch)
    python3 scripts/gpu_check.py test    # GPU runtime tests, then the correctness suite on cuda and triton
    python3 scripts/gpu_check.py sanitize  # compute-sanitizer memcheck and racecheck on a trimmed suite
    python3 scripts/gpu_check.py equivalence  # every backend against float64 (minutes: Triton compiles each case)
    python3 scripts/gpu_check.py bench   # the op benchmark on resnet50's convs (CUDA events)
    python3 scripts/gpu_check.py all     # the five, in order
    python3 scripts/gpu_check.py build,test --deadline 560 --bundle out/gpu_check.tgz   # one time-limited command

Steps can run alone (``make gpu-build``, ``make gpu-test``, ``make gpu-sanitize``, ``make gpu-equivalence``,
``make gpu-bench``; ``make gpu-check`` runs all) or as a comma list. ``--deadline S`` fits one invocation into S
seconds: every command gets at most what is left (a step that would start with under 30 s is skipped), so a
machine rented for a fixed time never kills the run from outside. Results go to benchmarks/results/gpu/ (or
``--out``): ``gpu_check.json`` and ``gpu_check.md`` (every step passed, failed or skipped, with its log tail),
``environment.json`` (GPU, driver and versions), the test logs and the benchmark JSON/markdown/PNG. The summary is
rewritten after every step, and ``--bundle PATH`` packs the results folder into one .tgz each time (a remote runner
may return only a few files). SIGTERM or SIGINT ends the running step's process group and writes the summary. Without
a GPU every step reports "skipped: no GPU", so the command dry-runs on any machine; a step fails instead where torch
does not import, does not see the GPU nvidia-smi lists, or (after the build) the cuda or triton backend cannot run. Uses the standard library only,
so it runs before anything is built.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "gpu"
# The oldest torch whose torch.library APIs the package uses (custom_op, register_fake/autograd, opcheck).
MIN_TORCH = (2, 6)
STEP_TIMEOUT_S = 540
# A timed-out command gets SIGINT first (pytest then writes its summary and JUnit XML), then SIGKILL.
INTERRUPT_GRACE_S = 15
# Left at the end of a --deadline for the interrupt grace, the summary and the bundle.
DEADLINE_MARGIN_S = 25
MIN_STEP_S = 30
# The H100 run: the suite took ~5 minutes on 12 workers of 16 cores, the GPU tests 2.5 minutes on 4.
GPU_TEST_WORKERS = int(os.environ.get("RESNET_FUSED_GPU_WORKERS", "12"))
PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts="]
GPU_ENV = {"RESNET_FUSED_TEST_BACKENDS": "cuda,triton"}

# The GPU suite: the shared correctness suite on both GPU backends, then the backend-specific GPU tests.
SUITE = ["tests/test_conv_bias_add_relu.py"]
GPU_TESTS = [
    "tests/test_cuda_runtime.py",
    "tests/test_gpu_devices.py",
    "tests/test_triton_kernels.py",
    "tests/test_triton_launch.py",
    "tests/test_select.py",
    "tests/test_large_index.py",
    "tests/test_nn_gpu.py",
]
# compute-sanitizer runs a trimmed set: every kernel once, small shapes. racecheck is the slower tool (64 tests in
# 224 s on the H200): a smaller set still reaches every kernel.
SANITIZE_K = "batch_zero or nan_inf or (every_epilogue and float32)"
RACECHECK_K = "every_epilogue and float32 and not noncontig"


class _Clock:
    """The time this invocation may still use (--deadline), and the process group running now (for signals)."""

    deadline: float | None = None
    running: subprocess.Popen | None = None

    @classmethod
    def left(cls) -> float:
        return float("inf") if cls.deadline is None else cls.deadline - time.monotonic()


def _python_info() -> dict:
    """Versions and the GPU, read in a child process so that this script never imports torch itself."""
    code = (
        "import json, torch\n"
        "info = {'torch': torch.__version__, 'cuda': torch.version.cuda, 'gpu': None}\n"
        "try:\n    import triton; info['triton'] = triton.__version__\nexcept Exception as e:\n"
        "    info['triton'] = f'unavailable: {e}'\n"
        "info['cudnn'] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None\n"
        "if torch.cuda.is_available():\n"
        "    p = torch.cuda.get_device_properties(0)\n"
        "    info['gpu'] = p.name; info['capability'] = list(torch.cuda.get_device_capability(0))\n"
        "    info['gpu_count'] = torch.cuda.device_count(); info['memory_gib'] = round(p.total_memory / 2**30, 1)\n"
        "print(json.dumps(info))\n"
    )
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return {"error": "importing torch took over 300 s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            q = subprocess.run(
                [smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True,
                timeout=60,
            ).stdout.strip()  # fmt: skip
        except subprocess.TimeoutExpired:
            q = ""
        info["driver"] = q.splitlines()[0] if q else None
        try:
            listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60).stdout
        except subprocess.TimeoutExpired:
            listed = ""
        info["smi_gpus"] = sum(line.startswith("GPU ") for line in listed.splitlines())
    info["python"] = platform.python_version()
    info["sanitizer"] = shutil.which("compute-sanitizer")
    return info


def _failed(name: str, why: str) -> dict:
    return {**_skipped(name, ""), "status": f"failed: {why}"}


def _no_gpu(info: dict, names: tuple[str, ...], dry_run_why: str = "no GPU") -> list[dict] | None:
    """Rows for steps that cannot use a GPU: skipped on a machine without one (a dry run), failed where torch does
    not import or does not see the GPU nvidia-smi lists (a broken GPU machine must not look like a dry run). None
    when torch sees a GPU."""
    if "error" in info:
        return [_failed(name, f"torch does not import: {info['error']}") for name in names]
    if info.get("gpu"):
        return None
    if info.get("smi_gpus"):
        why = f"nvidia-smi lists {info['smi_gpus']} GPU(s), but torch.cuda.is_available() is False"
        return [_failed(name, why) for name in names]
    return [_skipped(name, dry_run_why) for name in names]


_PROBED: dict[str, str] = {}  # the backend probe's answer, once per invocation (after the build step)


def _probe_backends() -> str:
    """Why the built package cannot run the cuda or triton backend here, or "" when both run."""
    code = (
        "import json\nfrom resnet_fused.backends import BACKENDS\n"
        "print(json.dumps({name: BACKENDS[name].unavailable() for name in ('cuda', 'triton')}))\n"
    )
    limit = min(300.0, max(_Clock.left() - DEADLINE_MARGIN_S, 1.0))
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return f"the backend probe took over {limit:.0f} s"
    if proc.returncode != 0:
        return f"the backend probe failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}"
    unavailable = {k: v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items() if v}
    return "; ".join(f"{k} unavailable: {v}" for k, v in unavailable.items())


def _backends_missing(names: tuple[str, ...]) -> list[dict] | None:
    """Failed rows where the built package cannot run the cuda or triton backend on this GPU (their tests would
    all be skipped, and a step of skips passes), else None."""
    if "why" not in _PROBED:
        _PROBED["why"] = _probe_backends()
    why = _PROBED["why"]
    return [_failed(name, why) for name in names] if why else None


def _gpu_steps_blocked(info: dict, names: tuple[str, ...]) -> list[dict] | None:
    return _no_gpu(info, names) or _backends_missing(names)


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _end_group(proc: subprocess.Popen) -> None:
    """SIGINT to the command's process group (pytest writes its summary and XML), then SIGKILL to what is left."""
    for sig, wait in ((signal.SIGINT, INTERRUPT_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            if sig == signal.SIGINT:  # the leader is gone; its workers may not be
                os.killpg(proc.pid, signal.SIGKILL)
            break
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            break
    proc.wait()


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _run(name: str, cmd: list[str], log: Path, env: dict | None = None) -> dict:
    start = time.monotonic()
    left = _Clock.left() - DEADLINE_MARGIN_S
    if left < MIN_STEP_S:
        return _skipped(name, f"deadline: {max(_Clock.left(), 0):.0f} s left")
    limit = min(STEP_TIMEOUT_S, left)
    with log.open("w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        # A session of its own, so that a timeout ends the step's whole process group (pytest-xdist workers,
        # equivalence shards), not only its first process: nothing may run on into the next step's timings.
        # SIGINT restored to its default: a parent that ignores it (a pytest-xdist worker, nohup) would pass that on,
        # and the timeout's interrupt would then not reach pytest.
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
            start_new_session=True, preexec_fn=_default_sigint,
        )  # fmt: skip
        _Clock.running = proc
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            _end_group(proc)
            rc = 124
        finally:
            _Clock.running = None
    tail = log.read_text(errors="replace").splitlines()[-15:]
    status = "passed" if rc == 0 else ("failed (timed out)" if rc == 124 else f"failed (exit {rc})")
    return {"name": name, "status": status, "seconds": round(time.monotonic() - start, 1), "log": log.name,
            "tail": tail}  # fmt: skip


def _has_module(name: str) -> bool:
    return subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True).returncode == 0


def _skipped(name: str, why: str) -> dict:
    return {"name": name, "status": f"skipped: {why}", "seconds": 0.0, "log": None, "tail": []}


def step_build(info: dict, out: Path) -> list[dict]:
    torch_version = info.get("torch")
    if torch_version is None:
        return [{**_skipped("build", "torch does not import"), "status": f"failed: torch does not import {info}"}]
    if _version_tuple(torch_version) < MIN_TORCH:
        need = ".".join(map(str, MIN_TORCH))
        return [{**_skipped("build", ""), "status": f"failed: torch {torch_version} is older than the {need} needed"}]
    blocked = _no_gpu(info, ("build",), "no GPU (the CUDA build itself is covered by tests/test_cuda_build.py)")
    if blocked:
        return blocked
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-v", "-e", "."]
    # This GPU's arch only: half the build time of the default two (about 50 s against 100 s on the H200).
    env = {"RESNET_FUSED_BUILD_CUDA": "1"}
    if info.get("capability"):
        env["RESNET_FUSED_CUDA_ARCHS"] = "".join(map(str, info["capability"]))
    _PROBED.clear()  # a new build: probe its backends again
    build = _run("build", cmd, out / "build.log", env)
    if build["status"] != "passed":
        return [build]
    # A toolchain that links libstdc++ statically makes every C++ error message crash the process; say so here,
    # before the suite's workers start dying of it.
    # The same flag as the build: the test then holds the build to having CUDA device code.
    check = [*PYTEST, "tests/test_cuda_build.py", "-k", "shared_cxx_runtime or loads_and_registers or forced_cuda"]
    return [build, _run("link-check", check, out / "link_check.log", env)]


def step_test(info: dict, out: Path) -> list[dict]:
    blocked = _gpu_steps_blocked(info, ("gpu-tests", "suite"))
    if blocked:
        return blocked
    pytest, gpu = [*PYTEST, "-rfE"], GPU_ENV
    # Triton compiles each new specialisation on the host: spread the tests over worker processes that share
    # the one GPU (and Triton's on-disk cache), when pytest-xdist is installed.
    workers = ["-n", str(GPU_TEST_WORKERS)] if _has_module("xdist") else []
    # The GPU tests first: they finish in minutes and hold what only a GPU shows (large indices, cuDNN, launch
    # and capture); the longer suite then takes what is left of a deadline.
    gpu_tests = [*pytest, *workers, f"--junitxml={out / 'gpu_tests.xml'}", *GPU_TESTS]
    suite = [*pytest, *workers, f"--junitxml={out / 'suite.xml'}", *SUITE]
    return [_run("gpu-tests", gpu_tests, out / "gpu_tests.log", gpu), _run("suite", suite, out / "suite.log", gpu)]


def step_sanitize(info: dict, out: Path) -> list[dict]:
    """compute-sanitizer's memcheck and racecheck on a trimmed suite (one process: the tool follows it alone)."""
    blocked = _gpu_steps_blocked(info, ("memcheck", "racecheck"))
    if blocked:
        return blocked
    sanitizer = info.get("sanitizer")
    results = []
    for tool in ("memcheck", "racecheck"):
        if not sanitizer:
            results.append(_skipped(tool, "compute-sanitizer not found"))
            continue
        k = RACECHECK_K if tool == "racecheck" else SANITIZE_K
        cmd = [sanitizer, f"--tool={tool}", "--error-exitcode=99", *PYTEST, "-rfE", "-x", "-k", k, *SUITE]
        results.append(_run(tool, cmd, out / f"{tool}.log", GPU_ENV))
    return results


def step_equivalence(info: dict, out: Path) -> list[dict]:
    """Its own step, over worker processes: Triton compiles every case on the host (on an H200 one process got through
    83 of 136 cases in 285 s)."""
    blocked = _gpu_steps_blocked(info, ("equivalence",))
    if blocked:
        return blocked
    cmd = [sys.executable, "-m", "benchmarks.equivalence", "--no-progress", "--jobs", str(GPU_TEST_WORKERS)]
    cmd += ["--json", str(out / "equivalence.json")]
    return [_run("equivalence", cmd, out / "equivalence.log")]


def step_bench(info: dict, out: Path) -> list[dict]:
    """The op benchmark on resnet50's convs, sized for one slot: no torch.compile peer (it compiles every case) and
    short samples (the GPU's are microseconds). The model benchmark did not finish in 10 minutes on the H200."""
    blocked = _gpu_steps_blocked(info, ("bench",))
    if blocked:
        return blocked
    cmd = [sys.executable, "-m", "benchmarks.bench_ops", "--models", "resnet50", "--no-compile", "--rounds", "5"]
    cmd += ["--min-sample-ms", "5", "--no-progress"]
    cmd += ["--json", str(out / "ops.json"), "--md", str(out / "ops.md"), "--png", str(out / "ops.png")]
    return [_run("bench", cmd, out / "bench.log")]


STEPS = {
    "build": step_build,
    "test": step_test,
    "sanitize": step_sanitize,
    "equivalence": step_equivalence,
    "bench": step_bench,
}


def _write(out: Path, info: dict, results: list[dict], bundle: Path | None = None, fresh: bool = False) -> None:
    """The summary files (and the bundle): ``results`` over an earlier invocation's, unless ``fresh``."""
    (out / "environment.json").write_text(json.dumps(info, indent=2) + "\n")
    previous = {}
    summary = out / "gpu_check.json"
    if summary.exists() and not fresh:
        previous = {r["name"]: r for r in json.loads(summary.read_text()).get("steps", [])}
    previous.update({r["name"]: r for r in results})
    steps = list(previous.values())
    summary.write_text(json.dumps({"environment": info, "steps": steps}, indent=2) + "\n")
    gpu = info.get("gpu") or "no GPU"
    lines = [
        "# GPU check",
        "",
        f"GPU: {gpu}, driver {info.get('driver')}; torch {info.get('torch')} (CUDA {info.get('cuda')}, cuDNN "
        f"{info.get('cudnn')}), triton {info.get('triton')}, Python {info.get('python')}.",
        "",
        "| step | status | seconds | log |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {r['name']} | {r['status']} | {r['seconds']} | {r['log'] or ''} |" for r in steps]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    if bundle is not None:
        bundle.parent.mkdir(parents=True, exist_ok=True)
        partial = bundle.with_name(bundle.name + ".part")
        with tarfile.open(partial, "w:gz") as tar:
            tar.add(out, arcname=out.name, filter=lambda m: None if m.name.endswith((".tgz", ".part")) else m)
        partial.replace(bundle)  # whole or not at all, should the run be killed while packing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", help=f"one of {', '.join([*STEPS, 'all'])}, or a comma list of steps")
    parser.add_argument("--out", default=str(OUT), help="results folder (default: benchmarks/results/gpu)")
    parser.add_argument("--deadline", type=float, default=None, help="seconds this invocation may take in all")
    parser.add_argument("--bundle", default=None, help="also pack the results folder into this .tgz, after each step")
    args = parser.parse_args(argv)
    names = list(STEPS) if args.step == "all" else [n for n in args.step.split(",") if n]
    unknown = [n for n in names if n not in STEPS]
    if unknown or not names:
        parser.error(f"step: expected one of {[*STEPS, 'all']} or a comma list of steps, got {args.step!r}")
    if args.deadline is not None:
        _Clock.deadline = time.monotonic() + args.deadline
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = Path(args.bundle) if args.bundle else None
    info = _python_info()
    results: list[dict] = []

    def stop(signum, frame) -> None:  # killed from outside: end the step's group, keep what was measured
        if _Clock.running is not None:
            _end_group(_Clock.running)
        _write(out, info, [*results, _skipped("interrupted", f"signal {signum}")], bundle, fresh)
        sys.exit(128 + signum)

    # Steps run one at a time accumulate into one summary; a build starts a new one (earlier results were of another
    # build), from the start, so that an interrupted build leaves none of them beside it.
    fresh = "build" in names
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    _write(out, info, results, bundle, fresh)
    for name in names:
        step = STEPS[name](info, out)
        results += step
        _write(out, info, results, bundle, fresh)
        if name == "build" and step[0]["status"].startswith("failed"):  # a failed link check still lets tests run
            break
    for r in results:
        print(f"{r['name']:>10}: {r['status']} ({r['seconds']} s)")
        if r["status"].startswith("failed"):
            print("\n".join("    " + line for line in r["tail"]))
    print(f"results: {out / 'gpu_check.md'}")
    return 1 if any(r["status"].startswith("failed") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
