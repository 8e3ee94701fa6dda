"""Equivalence check printed before any timing: each available backend's output and gradients against a float64
reference, on every distinct conv of ResNet-18/50 (traced at a small input size), per dtype and layout.

Every available row of ``resnet_fused.backends.BACKENDS`` is checked, on a CUDA device when it runs there and one is
present, else on CPU tensors; the float64 reference is computed on CPU.

The inputs are random normals rounded to the dtype under test; the float64 reference gets exactly those rounded values,
so what is measured is the backend's own arithmetic error. For each tensor (out, grad_x, grad_weight, grad_bias,
grad_residual) the error is ``max |a - ref| / max(max |ref|, 1)``; a tensor passes when every element is within
``tol * (max(max |ref|, 1) + |ref|)``, with ``tol`` the dtype's tolerance scaled by ``sqrt(reduction length) / 4``
(the length of the sums behind an element), as in the test suite.

The ReLU mask is checked apart: where the backend's ``out > 0`` disagrees with the sign of the float64
pre-activation ("mask flips", counted), the float64 value must lie within the dtype's rounding band around zero
(in bf16 a few hundred such elements are normal, for the eager op too). The gradients are then compared with the
float64 backward *through the backend's own mask*, so a legitimate flip near zero is not counted as a gradient error
while any error of the backward itself still is.

On a CUDA device "fp32" runs with TF32 off for convolutions (every backend follows that setting, ``triton`` too), so it
is held to the fp32 tolerance; "tf32" runs the same fp32 tensors with TF32 on, torch's default for cuDNN convolutions,
at a tolerance for TF32's 10 mantissa bits. On CPU tensors "tf32" has no cases.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

import resnet_fused
from benchmarks import timing
from benchmarks.bench_ops import LAYOUTS, ConvCase, trace_conv_cases
from resnet_fused.backends import BACKENDS, INTERPRET

# Per checked dtype: the tensors' dtype, the conv fp32 precision on CUDA (None: left as set) and the tolerance.
# TF32 keeps 10 mantissa bits (unit roundoff 2^-11); bf16 keeps 7.
CHECKED = {
    "fp64": (torch.float64, None, 1e-10),
    "fp32": (torch.float32, "ieee", 1e-5),
    "tf32": (torch.float32, "tf32", 2e-3),
    "fp16": (torch.float16, None, 2e-3),
    "bf16": (torch.bfloat16, None, 1.6e-2),
}
TENSORS = ("out", "grad_x", "grad_weight", "grad_bias", "grad_residual")
ROOT = Path(__file__).resolve().parent.parent
INTERPRETER_MAX_CASES = 3  # the Triton interpreter is slow; it gets the smallest few convs


def _device(backend: str) -> torch.device:
    """Where ``backend`` is checked: a CUDA device when it runs there and one is present, else the CPU."""
    cuda = "cuda" in BACKENDS[backend].devices and torch.cuda.is_available()
    return torch.device("cuda" if cuda else "cpu")


def _interpreted(backend: str) -> bool:
    """A GPU row (``auto`` picks it on CUDA only) run on CPU tensors: that is the Triton interpreter."""
    auto = BACKENDS[backend].auto_devices
    return INTERPRET and _device(backend).type == "cpu" and "cuda" in auto and "cpu" not in auto


@contextlib.contextmanager
def conv_fp32_precision(precision: str | None) -> Iterator[None]:
    """cuDNN convolutions' fp32 precision ("ieee" or "tf32") for the block; ``triton`` reads the same setting."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if precision is None or not torch.cuda.is_available():
        yield
    elif not hasattr(conv, "fp32_precision"):  # a torch before the per-op settings
        old = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = old
    else:
        old = conv.fp32_precision
        conv.fp32_precision = precision
        try:
            yield
        finally:
            conv.fp32_precision = old


def _run(backend: str | None, case: ConvCase, leaves: dict[str, Tensor | None], grad_out: Tensor) -> dict[str, Tensor]:
    """Output and gradients of one call (``backend=None``: the reference), as CPU tensors."""
    device = torch.device("cpu") if backend is None else _device(backend)
    leaves = {
        k: None if v is None else v.detach().to(device, copy=True).requires_grad_(True) for k, v in leaves.items()
    }
    kwargs = {**case.conv_args, "relu": case.epilogue != "bias"}
    args = (leaves["x"], leaves["weight"], leaves["bias"], leaves["residual"])
    if backend is None:
        out = resnet_fused.reference.conv_bias_add_relu(*args, **kwargs)
    else:
        out = resnet_fused.conv_bias_add_relu(*args, **kwargs, backend=backend)
    out.backward(grad_out.to(device=device, dtype=out.dtype))
    res = {"out": out.detach().cpu()}
    for k, v in leaves.items():
        if v is not None:
            res[f"grad_{k}"] = v.grad.cpu()
    return res


def _masked_reference(
    case: ConvCase, leaves: dict[str, Tensor | None], grad_out: Tensor, mask: Tensor | None
) -> dict[str, Tensor]:
    """float64 gradients of ``conv(x, w) + b + residual`` for ``grad_out * mask``: the backward given a ReLU mask."""
    lv = {k: None if v is None else v.double().detach().requires_grad_(True) for k, v in leaves.items()}
    lin = torch.nn.functional.conv2d(lv["x"], lv["weight"], lv["bias"], **case.conv_args)
    if lv["residual"] is not None:
        lin = lin + lv["residual"]
    g = grad_out.double() if mask is None else grad_out.double() * mask
    lin.backward(g)
    return {f"grad_{k}": v.grad for k, v in lv.items() if v is not None}


def _reductions(case: ConvCase, batch: int) -> dict[str, int]:
    p, q = case.out_hw()
    return {
        "out": case.c * case.r * case.s,
        "grad_x": case.k * case.r * case.s,
        "grad_weight": batch * p * q,
        "grad_bias": batch * p * q,
        "grad_residual": 1,
    }


def check_case(
    case: ConvCase, backends: Sequence[str], checked: str, layout: str, batch: int, seed: int = 0
) -> dict[str, dict]:
    """backend -> {tensor -> (normalized max error, passed)} plus mask-flip counts, for one case.

    ``checked`` is a key of ``CHECKED`` (the tensors' dtype, TF32 on or off, the tolerance).
    """
    dtype, precision, base_tol = CHECKED[checked]
    g = torch.Generator().manual_seed(seed)
    fmt = LAYOUTS[layout]
    p, q = case.out_hw()
    fan_in = case.c * case.r * case.s

    def rand(*shape: int, scale: float = 1.0) -> Tensor:
        t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)
        return t.contiguous(memory_format=fmt) if t.dim() == 4 else t

    leaves = {
        "x": rand(batch, case.c, case.h, case.w),
        "weight": rand(case.k, case.c, case.r, case.s, scale=fan_in**-0.5),
        "bias": rand(case.k, scale=0.1),
        "residual": rand(batch, case.k, p, q) if case.epilogue == "bias+res+relu" else None,
    }
    grad_out = rand(batch, case.k, p, q)
    ref = _run(None, case, {k: None if v is None else v.double() for k, v in leaves.items()}, grad_out.double())
    relu = case.epilogue != "bias"
    with torch.no_grad():
        pre = torch.nn.functional.conv2d(
            leaves["x"].double(), leaves["weight"].double(), leaves["bias"].double(), **case.conv_args
        )
        if leaves["residual"] is not None:
            pre = pre + leaves["residual"].double()
    red = _reductions(case, batch)
    results: dict[str, dict] = {}
    for backend in backends:
        with conv_fp32_precision(precision):
            got = _run(backend, case, leaves, grad_out)
        row: dict = {"mask_flips": 0, "mask_flips_outside_band": 0}
        expected = ref
        if relu:
            tol_out = base_tol * max(1.0, red["out"] ** 0.5 / 4)
            band = 4 * tol_out * max(pre.abs().max().item(), 1.0)
            flips = (got["out"] > 0) != (pre > 0)
            row["mask_flips"] = int(flips.sum())
            row["mask_flips_outside_band"] = int((flips & (pre.abs() > band)).sum())
            if row["mask_flips"]:
                mask = (got["out"] > 0).double()
                expected = {"out": ref["out"], **_masked_reference(case, leaves, grad_out, mask)}
        for name in TENSORS:
            if name not in expected:
                continue
            a, e = got[name].double(), expected[name]
            tol = base_tol * max(1.0, red[name] ** 0.5 / 4)
            mag = max(e.abs().max().item() if e.numel() else 0.0, 1.0)
            diff = (a - e).abs()
            err = diff.max().item() / mag if diff.numel() else 0.0
            ok = bool((diff <= tol * (mag + e.abs())).all()) and bool(torch.isfinite(a).all())
            row[name] = (err, ok)
        results[backend] = row
    return results


def run(
    *,
    models: Sequence[str] = ("resnet18", "resnet50"),
    hw: int = 32,
    batch: int = 2,
    dtypes: Sequence[str] = ("fp32", "tf32", "bf16"),
    layouts: Sequence[str] = ("channels_last", "nchw"),
    backends: Sequence[str] | None = None,
    max_cases: int | None = None,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> dict:
    """Check every backend on every case; returns per (backend, dtype) the max error per tensor and pass/fail.

    ``dtypes`` are keys of ``CHECKED``; "tf32" checks only backends that run on a CUDA device. ``shard=(i, n)``
    checks every n-th (case, dtype, layout) from the i-th, for :func:`merge` to combine.
    """
    from tqdm import tqdm

    backends = list(backends or BACKENDS.available())
    cases = trace_conv_cases(models, hw)
    if max_cases is not None:
        cases = cases[:max_cases]
    small = sorted(cases, key=lambda c: c.c * c.k * c.r * c.s)[:INTERPRETER_MAX_CASES]
    table: dict[tuple[str, str], dict] = {}
    work = [(c, d, lay) for d in dtypes for lay in layouts for c in cases][shard[0] :: shard[1]]
    for case, dtype_name, layout in tqdm(work, desc="equivalence", unit="case", disable=not progress, leave=False):
        todo = [b for b in backends if case in small or not _interpreted(b)]
        if CHECKED[dtype_name][1] == "tf32":  # TF32 exists on CUDA devices only
            todo = [b for b in todo if _device(b).type == "cuda"]
        if not todo:
            continue
        res = check_case(case, todo, dtype_name, layout, batch)
        for backend, row in res.items():
            agg = table.setdefault(
                (backend, dtype_name), {"cases": 0, "passed": True, "mask_flips": 0, "failures": [], "errors": {}}
            )
            agg["cases"] += 1
            agg["mask_flips"] += row["mask_flips"]
            if row["mask_flips_outside_band"]:
                agg["passed"] = False
                agg["failures"].append(f"{case.name} {layout}: {row['mask_flips_outside_band']} ReLU mask flips")
            for name in TENSORS:
                if name not in row:
                    continue
                err, ok = row[name]
                agg["errors"][name] = max(agg["errors"].get(name, 0.0), err)
                if not ok:
                    agg["passed"] = False
                    agg["failures"].append(f"{case.name} {layout}: {name} error {err:.2e}")
    return {
        "config": {
            "models": list(models),
            "input_hw": hw,
            "batch": batch,
            "dtypes": list(dtypes),
            "layouts": list(layouts),
            "n_cases": len(cases),
            "backends": backends,
            "shard": list(shard),
        },
        "results": [{"backend": b, "dtype": d, **v} for (b, d), v in table.items()],
        # Nothing checked (say "tf32" alone on CPU tensors) is no pass.
        "passed": bool(table) and all(v["passed"] for v in table.values()),
    }


def merge(parts: Sequence[dict]) -> dict:
    """One result from the results of ``run`` over all shards of the same work."""
    config = parts[0]["config"]
    table: dict[tuple[str, str], dict] = {}
    for part in parts:
        for r in part["results"]:
            agg = table.setdefault(
                (r["backend"], r["dtype"]), {"cases": 0, "passed": True, "mask_flips": 0, "failures": [], "errors": {}}
            )
            agg["cases"] += r["cases"]
            agg["passed"] &= r["passed"]
            agg["mask_flips"] += r["mask_flips"]
            agg["failures"] += r["failures"]
            for name, err in r["errors"].items():
                agg["errors"][name] = max(agg["errors"].get(name, 0.0), err)
    order = sorted(table, key=lambda k: (config["dtypes"].index(k[1]), config["backends"].index(k[0])))
    return {
        "config": {**config, "shard": [0, 1]},
        "results": [{"backend": b, "dtype": d, **table[(b, d)]} for b, d in order],
        "passed": bool(table) and all(v["passed"] for v in table.values()),
    }


def _run_jobs(argv: Sequence[str], jobs: int, tmp: Path) -> dict:
    """The same check in ``jobs`` processes (Triton compiles each case on one host core), merged."""
    procs = []
    try:
        for i in range(jobs):
            cmd = [sys.executable, "-m", "benchmarks.equivalence", *argv, "--shard", f"{i}/{jobs}"]
            cmd += ["--no-progress", "--json", str(tmp / f"shard{i}.json")]
            with (tmp / f"shard{i}.log").open("w") as log:  # a file, not a pipe: no shard waits on a full pipe
                procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
        for proc in procs:
            proc.wait()
    finally:  # interrupted or timed out: no shard outlives the check
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    parts = []
    for i, proc in enumerate(procs):
        path = tmp / f"shard{i}.json"
        if proc.returncode not in (0, 1) or not path.exists():
            out = (tmp / f"shard{i}.log").read_text()
            raise RuntimeError(f"equivalence shard {i}/{jobs} exited with {proc.returncode}:\n{out[-4000:]}")
        parts.append(json.loads(path.read_text()))
    return merge(parts)


def format_table(result: dict) -> str:
    """Console table: max normalized error per tensor for each (backend, dtype)."""
    head = f"{'backend':10s} {'dtype':5s} {'cases':>5s} " + " ".join(f"{t:>13s}" for t in TENSORS) + "  flips  result"
    lines = [
        "equivalence vs float64 reference (max |a - ref| / max(max |ref|, 1); 'reference' is the unfused eager op "
        "in that dtype, for comparison)",
        head,
    ]
    for r in result["results"]:
        errs = " ".join(f"{r['errors'][t]:13.2e}" if t in r["errors"] else f"{'-':>13s}" for t in TENSORS)
        lines.append(
            f"{r['backend']:10s} {r['dtype']:5s} {r['cases']:5d} {errs} {r['mask_flips']:6d}  "
            f"{'PASS' if r['passed'] else 'FAIL'}"
        )
        for f in r["failures"][:5]:
            lines.append(f"    {f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.equivalence [--json PATH]``: the check alone; exit status 1 when a backend fails."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None, help="also write the result as JSON")
    parser.add_argument("--max-cases", type=int, default=None, help="only the first N distinct convs")
    parser.add_argument("--backends", default=None, help="comma list (default: every available backend)")
    parser.add_argument("--dtypes", default="fp32,tf32,bf16", help=f"comma list of {','.join(CHECKED)}")
    parser.add_argument("--layouts", default="channels_last,nchw", help=f"comma list of {','.join(LAYOUTS)}")
    parser.add_argument("--jobs", type=int, default=1, help="processes to spread the cases over (default 1)")
    parser.add_argument("--shard", default="0/1", help="i/n: every n-th case from the i-th (what --jobs runs)")
    parser.add_argument("--no-progress", action="store_true")
    a = parser.parse_args(argv)
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    if a.jobs < 1:
        parser.error(f"--jobs: expected a positive number, got {a.jobs}")
    for option, given, known in (("--dtypes", a.dtypes, CHECKED), ("--layouts", a.layouts, LAYOUTS)):
        unknown = [v for v in split(given) if v not in known]
        if unknown or not split(given):
            parser.error(f"{option}: expected a comma list of {','.join(known)}, got {given!r}")
    if a.jobs > 1:
        keep = ["--dtypes", a.dtypes, "--layouts", a.layouts]
        keep += ["--backends", a.backends] if a.backends else []
        keep += ["--max-cases", str(a.max_cases)] if a.max_cases is not None else []
        with tempfile.TemporaryDirectory() as tmp:
            result = _run_jobs(keep, a.jobs, Path(tmp))
    else:
        i, _, n = a.shard.partition("/")
        i, n = (int(v) if v.isdigit() else -1 for v in (i, n))
        if not 0 <= i < n:
            parser.error(f"--shard: expected i/n with 0 <= i < n, got {a.shard}")
        result = run(
            backends=split(a.backends) if a.backends else None,
            dtypes=split(a.dtypes),
            layouts=split(a.layouts),
            max_cases=a.max_cases,
            shard=(i, n),
            progress=not a.no_progress,
        )
    print(format_table(result))
    if a.json:
        timing.write_json(Path(a.json), result)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
