"""Run the CPU correctness suite against the C++ CPU extension built with AddressSanitizer and UBSan.

    python scripts/sanitize.py            # what `make sanitize` runs: the fuller selection
    python scripts/sanitize.py --quick    # the trimmed selection CI runs (tests/test_sanitize.py)
    python scripts/sanitize.py -- -x -k epilogue   # extra pytest arguments after "--"

Steps:
1. Build ``csrc/*.cpp`` and ``csrc/cpu/*.cpp`` with the flags setup.py uses plus ``-fsanitize=address,undefined``,
   out of tree (``--build-dir``, by default a cache folder under the system temp dir, so a rerun recompiles only
   what changed). The repo's own ``resnet_fused/_C*.so`` is never touched.
2. Prove the sanitizers fire in this setup: a tiny C library with a heap overflow and a signed overflow, loaded
   into Python the same way, must be reported by ASan and UBSan.
3. Run pytest with the ASan runtime preloaded and a ``sitecustomize`` that makes ``import resnet_fused._C`` load
   the sanitized build; the run checks which ``.so`` it got before any test.

Any sanitizer report fails the run: UBSan halts on its first error, ASan always does, and the output is also scanned
in case a report came from a process that did not stop pytest. Leak detection is off: CPython and torch keep
objects alive until exit by design, so LeakSanitizer reports thousands of leaks that are not ours.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.metadata
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SO_VAR = "RESNET_FUSED_SANITIZED_SO"

# setup.py's make_extension() flags (mirrored, not imported: importing setup.py runs setup()), then the sanitizers.
# -O1 after -O3 wins: ASan's usual level, fast enough to run the suite, with frames the stack traces can name.
SETUP_CFLAGS = ["-O3", "-std=c++20", "-fopenmp", "-Wno-unknown-pragmas", "-ffp-contract=off"]
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]


def _host_has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return {"avx2", "fma", "f16c"} <= set(flags)


# load() has no per-file flags, so on an AVX2 host every file gets setup.py's AVX2 flags for its AVX2 file: the
# sanitized build runs here only, and so reaches the AVX2 passes as well as the portable ones.
ISA_FLAGS = ["-mavx2", "-mfma", "-mf16c", "-Wno-psabi"] if _host_has_avx2() else []
CFLAGS = [*SETUP_CFLAGS, *ISA_FLAGS, "-O1", *SANITIZE_FLAGS]
LDFLAGS = ["-fopenmp", "-lstdc++", "-fsanitize=address,undefined"]

SUITE = "tests/test_conv_bias_add_relu.py"
ONEDNN_SUITE = "tests/test_cpu_onednn.py"
EPILOGUE_SUITE = "tests/test_epilogue_op.py"  # small: all but torch.compile in both selections
# Each selection still reaches every C++ path: all 16 epilogues, NCHW / channels_last / a non-contiguous view, batch
# 0, NaN/Inf, every dtype (fp32, bf16, fp16 and the fp64 pass via gradcheck), every bad-input check of the three ops,
# the backward, the portable (non-AVX2) kernels, every oneDNN route and the _epilogue_ op. The fuller one adds the
# odd-shape case table, opcheck, the random sweep and the thread-count run; only torch.compile is left out (it adds
# no C++ path here).
QUICK_K = (
    "every_epilogue or gradcheck or batch_zero or nan_inf or inputs_never_modified or bad_input or autocast"
    " or portable or inference_mode"
)
FULL_K = "not compile"
QUICK_ONEDNN_K = "not route_matches or (float32 and noncontig) or (bfloat16 and channels_last) or (float16 and nchw)"

# What a sanitizer prints when it reports, whichever process it was in.
REPORT_MARKERS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer", "SUMMARY: UndefinedBehavior")


def default_build_dir() -> str:
    """A cache folder per checkout, torch, compiler and Python, outside the repo, so reruns reuse the objects ninja
    already built. ninja's dependency lists leave out torch's headers (system includes), so another torch gets a
    folder of its own rather than objects built against the old one."""
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "none"
    cxx = os.environ.get("CXX", "c++")
    try:
        compiler = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.split("\n", 1)[0]
    except OSError:
        compiler = cxx
    key = "\0".join((ROOT, torch_version, compiler, sys.implementation.cache_tag or ""))
    tag = hashlib.sha1(key.encode()).hexdigest()[:10]
    return os.path.join(tempfile.gettempdir(), f"resnet_fused-sanitize-{tag}")


def preload() -> str:
    """LD_PRELOAD for Python: the compiler's libasan, which must come first, and libstdc++.

    The python binary does not link libstdc++, so without it ASan starts before any C++ runtime exists and cannot
    intercept ``__cxa_throw``; the first C++ exception (pybind11 in triton, raised at import) then aborts with
    ``CHECK failed: ... real___cxa_throw``.
    """
    cxx = os.environ.get("CXX", "c++")
    paths = []
    for lib in ("libasan.so", "libstdc++.so"):
        path = subprocess.run([cxx, f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
        if not os.path.isabs(path) or not os.path.exists(path):
            sys.exit(f"sanitize: {cxx} has no {lib} (-print-file-name={lib} gave {path!r})")
        paths.append(os.path.realpath(path))
    return " ".join(paths)


def sanitizer_env(site_dir: str | None = None, so_path: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # torch's extension builds look for ninja on PATH alone; without one there, the venv's own (requirements.txt)
    # beside python, after the user's PATH (whose compilers stay first).
    if shutil.which("ninja") is None:
        env["PATH"] = os.pathsep.join(p for p in (env.get("PATH"), os.path.dirname(sys.executable)) if p)
    env["LD_PRELOAD"] = preload()
    # detect_leaks=0: see the module docstring.
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0:print_summary=1"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    env.pop("TRITON_INTERPRET", None)
    if site_dir:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (site_dir, env.get("PYTHONPATH")) if p)
    if so_path:
        env[SO_VAR] = so_path
    return env


def build(build_dir: str, jobs: int) -> str:
    """Compile the sanitized extension into build_dir; returns the .so's path."""
    os.makedirs(build_dir, exist_ok=True)
    sources = sorted(
        glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
    )
    # load() imports what it built, so it runs in a child with the ASan runtime preloaded.
    code = textwrap.dedent(
        f"""
        import torch.utils.cpp_extension as ext
        mod = ext.load(name="_C", sources={sources!r}, extra_cflags={CFLAGS!r}, extra_ldflags={LDFLAGS!r},
                       extra_include_paths={[os.path.join(ROOT, "csrc")]!r}, build_directory={build_dir!r},
                       with_cuda=False, verbose=True)
        print("SANITIZED_SO=" + mod.__file__)
        """
    )
    env = sanitizer_env()
    env["MAX_JOBS"] = str(jobs)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=build_dir)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("SANITIZED_SO=")]
    if proc.returncode != 0 or not lines:
        sys.stdout.write(proc.stdout[-8000:] + proc.stderr[-8000:])
        sys.exit(f"sanitize: building the sanitized extension failed (exit {proc.returncode})")
    so_path = lines[-1].split("=", 1)[1]
    deps = subprocess.run(["ldd", so_path], capture_output=True, text=True).stdout
    missing = [lib for lib in ("libasan", "libubsan") if lib not in deps]
    if missing:
        sys.exit(f"sanitize: {so_path} is not linked with {missing}; the sanitizer flags did not reach the build")
    return so_path


SITECUSTOMIZE = '''\
"""Written by scripts/sanitize.py: `import resnet_fused._C` loads the sanitized build named by {var}."""
import importlib.abc
import importlib.util
import os
import sys


class _SanitizedC(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "resnet_fused._C":
            return None
        return importlib.util.spec_from_file_location(fullname, os.environ["{var}"])


if os.environ.get("{var}"):
    sys.meta_path.insert(0, _SanitizedC())
'''

CANARY_C = r"""
#include <limits.h>
#include <stdlib.h>
int heap_overflow(int n) { int *p = malloc(n * sizeof(int)); int v = p[n]; free(p); return v; }
int signed_overflow(int x) { return x + INT_MAX; }
"""


def check_canaries(build_dir: str) -> None:
    """A heap overflow and a signed overflow in a loaded library must be reported, else a clean run proves nothing."""
    src = os.path.join(build_dir, "canary.c")
    lib = os.path.join(build_dir, "canary.so")
    with open(src, "w") as f:
        f.write(CANARY_C)
    cc = os.environ.get("CC", "cc")
    subprocess.run([cc, "-shared", "-fPIC", "-O1", *SANITIZE_FLAGS, src, "-o", lib], check=True)
    expected = {"heap_overflow": "heap-buffer-overflow", "signed_overflow": "signed integer overflow"}
    for fn, marker in expected.items():
        code = f"import ctypes; ctypes.CDLL({lib!r}).{fn}(4); print('not reported')"
        proc = subprocess.run([sys.executable, "-c", code], env=sanitizer_env(), capture_output=True, text=True)
        if proc.returncode == 0 or marker not in proc.stderr:
            sys.stdout.write(proc.stdout + proc.stderr[-4000:])
            sys.exit(f"sanitize: the canary {fn}() was not reported as {marker!r}; the sanitizer setup is broken")
    print("sanitize: canaries reported as expected (ASan heap-buffer-overflow, UBSan signed integer overflow)")


def pytest_command(quick: bool, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    files = [(SUITE, QUICK_K if quick else FULL_K)]
    for path, k in ((ONEDNN_SUITE, QUICK_ONEDNN_K if quick else None), (EPILOGUE_SUITE, "not compile")):
        if os.path.exists(os.path.join(ROOT, path)):
            files.append((path, k))
    return [cmd + [path, *(["-k", k] if k else []), *extra] for path, k in files]


def check_loaded(env: dict[str, str], so_path: str) -> None:
    """The suite's processes must import the sanitized build, not the repo's own."""
    code = "import resnet_fused, resnet_fused._C as c; print(c.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    got = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
    if proc.returncode != 0 or got != [so_path]:
        sys.stdout.write(proc.stdout + proc.stderr[-4000:])
        sys.exit(f"sanitize: resnet_fused._C did not resolve to {so_path} (got {got})")


def run_streaming(cmd: list[str], env: dict[str, str]) -> tuple[int, list[str]]:
    """Run cmd, echo its output as it comes, and return the exit code and the lines holding a sanitizer report."""
    print("sanitize: $", shlex.join(cmd[1:]), flush=True)
    reports = []
    with subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            if any(marker in line for marker in REPORT_MARKERS):
                reports.append(line.rstrip())
    sys.stdout.flush()
    return proc.returncode, reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the trimmed selection (CI)")
    parser.add_argument("--build-dir", default=default_build_dir(), help="where the sanitized build goes")
    parser.add_argument("--jobs", type=int, default=1, help="parallel compile jobs (default 1)")
    parser.add_argument("pytest_args", nargs="*", help="after '--': extra pytest arguments")
    args = parser.parse_args(argv)
    start = time.monotonic()
    so_path = build(os.path.abspath(args.build_dir), args.jobs)
    print(f"sanitize: built {so_path} in {time.monotonic() - start:.0f}s", flush=True)
    check_canaries(args.build_dir)

    site_dir = os.path.join(args.build_dir, "site")
    os.makedirs(site_dir, exist_ok=True)
    with open(os.path.join(site_dir, "sitecustomize.py"), "w") as f:
        f.write(SITECUSTOMIZE.format(var=SO_VAR))
    env = sanitizer_env(site_dir, so_path)
    env["RESNET_FUSED_TEST_BACKENDS"] = "cpu"
    check_loaded(env, so_path)

    failed = []
    for cmd in pytest_command(args.quick, args.pytest_args):
        code, reports = run_streaming(cmd, env)
        if code != 0 or reports:
            failed.append((cmd, code, reports))
    elapsed = time.monotonic() - start
    if failed:
        for cmd, code, reports in failed:
            print(f"sanitize: FAILED (exit {code}): {shlex.join(cmd[1:])}")
            for line in reports[:20]:
                print("  ", line)
        return 1
    selection = "custom" if args.pytest_args else "quick" if args.quick else "full"
    print(f"sanitize: clean under ASan+UBSan ({selection} selection, {elapsed:.0f}s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
