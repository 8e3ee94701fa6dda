"""Equivalence check printed before any timing: each available backend's output and gradients against a float64
reference, on every distinct conv of ResNet-18/50 (traced at a small input size), per dtype and layout.

Every available row of ``resnet_fused.backends.BACKENDS`` is checked, on a CUDA device when it runs there and one is
present, else on CPU tensors; the float64 reference is computed on CPU.

Besides the backends, two rows check the prepared inference route on CPU tensors, forward only:
``prepacked`` and ``prepacked-fuse-relu``, a ``FusedConv2d`` through
``resnet_fused.inference.optimize_for_inference`` (exact ReLU, and ReLU as oneDNN's post-op), for the dtypes oneDNN
runs here. Every other (case, layout) of a dtype passes a per-channel ``scale`` (as a frozen BatchNorm's, with the
bias as its shift), the way converted models call the op, so each case is checked with and without one.

The inputs are random normals rounded to the dtype under test; the float64 reference gets exactly those rounded values,
so what is measured is the backend's own arithmetic error. For each tensor (out, grad_x, grad_weight, grad_bias,
grad_residual) the error is ``max |a - ref| / max(max |ref|, 1)``; a tensor passes when every element is within
``tol * (max(max |ref|, 1) + |ref|)``, with ``tol`` the dtype's tolerance scaled by ``sqrt(reduction length) / 4``
(the length of the sums behind an element), as in the test suite. In bf16 and fp16 that bound grows to a quarter of
the output's range on the longest sums, so every row but ``reference`` is also held to the error of the
``reference`` row (the unfused eager op, in the same dtype, on the same device and inputs): each element within
``2 x`` that row's largest error for the tensor plus one ulp of ``|ref|``. A backend that accumulates in fp32 and
rounds once passes that; one off by a uniform 2 % does not.

The ReLU mask is checked apart: where the backend's ``out > 0`` disagrees with the sign of the float64
pre-activation ("mask flips", counted), the float64 value must lie within the dtype's rounding band around zero
(in bf16 a few hundred such elements are normal, for the eager op too). The gradients are then compared with the
float64 backward *through the backend's own mask*, so a legitimate flip near zero is not counted as a gradient error
while any error of the backward itself still is.

A row that returns no gradient for an input, an output without a backward, a NaN, or raises, fails with the reason.

On a CUDA device "fp32" runs with TF32 off for convolutions (every backend follows that setting, ``triton`` too), so it
is held to the fp32 tolerance; "tf32" runs the same fp32 tensors with TF32 on, torch's default for cuDNN convolutions,
at a tolerance for TF32's 10 mantissa bits. On CPU tensors "tf32" has no cases.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
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
# The prepared inference route (forward only, CPU): row name -> optimize_for_inference's fuse_relu.
PREPACKED_ROWS = {"prepacked": False, "prepacked-fuse-relu": True}
# Low-precision dtypes, whose general bound grows with sqrt(reduction length): there a row is also held to
# REF_FACTOR x the reference row's error plus REF_ULPS ulps of |ref| (see the module docstring).
ANCHORED = {"fp16", "bf16"}
REF_FACTOR = 2.0
REF_ULPS = 1.0


def _device(backend: str) -> torch.device:
    """Where ``backend`` is checked: a CUDA device when it runs there and one is present, else the CPU."""
    if backend in PREPACKED_ROWS:
        return torch.device("cpu")
    cuda = "cuda" in BACKENDS[backend].devices and torch.cuda.is_available()
    return torch.device("cuda" if cuda else "cpu")


def _interpreted(backend: str) -> bool:
    """A GPU row (``auto`` picks it on CUDA only) run on CPU tensors: that is the Triton interpreter."""
    if backend in PREPACKED_ROWS:
        return False
    auto = BACKENDS[backend].auto_devices
    return INTERPRET and _device(backend).type == "cpu" and "cuda" in auto and "cpu" not in auto


def prepacked_unavailable(dtype: torch.dtype | None = None) -> str:
    """ "" when the prepacked rows can be checked (on ``dtype`` tensors, if given), else why not."""
    try:
        from resnet_fused.inference import onednn_supports, optimize_for_inference  # noqa: F401
    except ImportError as e:
        return f"resnet_fused.inference.optimize_for_inference is not importable ({e})"
    if dtype is not None and not onednn_supports(dtype):
        return f"torch's oneDNN does not run {dtype} convolutions on this CPU"
    return ""


def default_rows() -> tuple[list[str], dict[str, str]]:
    """(every row that can be checked here: the available backends, then the prepacked rows; row -> why it cannot)."""
    rows = [row.name for row in BACKENDS if not row.unavailable()]
    missing = {row.name: row.unavailable() for row in BACKENDS if row.unavailable()}
    why = prepacked_unavailable()
    for name in PREPACKED_ROWS:
        if why:
            missing[name] = why
        else:
            rows.append(name)
    return rows, missing


def _worst(a: float | None, b: float) -> float:
    """The larger error, NaN if either is (``max(0.0, nan)`` is 0.0)."""
    if a is None:
        return b
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


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


def _run_prepacked(
    row: str, case: ConvCase, leaves: dict[str, Tensor | None], scale: Tensor | None
) -> tuple[dict[str, Tensor], list[str]]:
    """The output of a prepared ``FusedConv2d`` (``optimize_for_inference``) on the case, under no_grad."""
    from resnet_fused.inference import optimize_for_inference
    from resnet_fused.nn import FusedConv2d

    module = FusedConv2d(
        case.c, case.k, (case.r, case.s), case.stride, case.padding, case.dilation, bias=scale is None,
        device="meta", relu=case.epilogue != "bias",
    )  # fmt: skip
    module.weight = torch.nn.Parameter(leaves["weight"].detach().clone(), requires_grad=False)
    if scale is None:
        module.bias = torch.nn.Parameter(leaves["bias"].detach().clone(), requires_grad=False)
    else:  # a converted conv after a frozen norm: scale and shift
        module.set_scale_shift(scale, leaves["bias"].detach())
    module = optimize_for_inference(module.eval(), fuse_relu=PREPACKED_ROWS[row])
    residual = leaves["residual"]
    with torch.no_grad():
        out = module(leaves["x"].detach(), None if residual is None else residual.detach().clone())
    # fp16 with a scale takes the ordinary op by design (w * scale may overflow in fp16 where conv * scale does not).
    by_design = leaves["x"].dtype == torch.float16 and scale is not None
    problems = [] if module._packs or by_design else ["the packed path did not run (the call took the ordinary op)"]
    return {"out": out.cpu()}, problems


def _run(
    backend: str | None,
    case: ConvCase,
    leaves: dict[str, Tensor | None],
    grad_out: Tensor,
    scale: Tensor | None = None,
    device: torch.device | None = None,
) -> tuple[dict[str, Tensor], list[str]]:
    """Output and gradients of one call (``backend=None``: the float64 reference), as CPU tensors, and what went
    wrong (a raise, no backward, a missing gradient): a row with problems fails, the check goes on."""
    if backend in PREPACKED_ROWS:
        try:
            return _run_prepacked(backend, case, leaves, scale)
        except Exception as e:  # a failing row is reported in the table; the other rows are still checked
            return {}, [f"raised {type(e).__name__}: {e}"]
    device = device or (torch.device("cpu") if backend is None else _device(backend))
    leaves = {
        k: None if v is None else v.detach().to(device, copy=True).requires_grad_(True) for k, v in leaves.items()
    }
    kwargs = {**case.conv_args, "relu": case.epilogue != "bias"}
    if scale is not None:
        kwargs["scale"] = scale.to(device)
    args = (leaves["x"], leaves["weight"], leaves["bias"], leaves["residual"])
    if backend is None:
        out = resnet_fused.reference.conv_bias_add_relu(*args, **kwargs)
        out.backward(grad_out.to(device=device, dtype=out.dtype))
    else:
        try:
            out = resnet_fused.conv_bias_add_relu(*args, **kwargs, backend=backend)
        except Exception as e:  # reported as a failure of this row
            return {}, [f"raised {type(e).__name__}: {e}"]
        if out.grad_fn is None:
            return {"out": out.detach().cpu()}, ["the output has no grad_fn: no backward to check"]
        try:
            out.backward(grad_out.to(device=device, dtype=out.dtype))
        except Exception as e:
            return {"out": out.detach().cpu()}, [f"backward raised {type(e).__name__}: {e}"]
    res = {"out": out.detach().cpu()}
    problems = []
    for k, v in leaves.items():
        if v is None:
            continue
        if v.grad is None:
            problems.append(f"no gradient for {k}")
        else:
            res[f"grad_{k}"] = v.grad.cpu()
    return res, problems


def _linear(case: ConvCase, lv: dict[str, Tensor | None], scale: Tensor | None) -> Tensor:
    """``conv(x, w) * scale + b + residual`` (the pre-activation) from float64 leaves."""
    conv = torch.nn.functional.conv2d
    if scale is None:
        lin = conv(lv["x"], lv["weight"], lv["bias"], **case.conv_args)
    else:
        lin = conv(lv["x"], lv["weight"], None, **case.conv_args) * scale.double().view(1, -1, 1, 1)
        lin = lin + lv["bias"].view(1, -1, 1, 1)
    return lin if lv["residual"] is None else lin + lv["residual"]


def _masked_reference(
    case: ConvCase, leaves: dict[str, Tensor | None], grad_out: Tensor, mask: Tensor | None, scale: Tensor | None = None
) -> dict[str, Tensor]:
    """float64 gradients of ``conv(x, w) * scale + b + residual`` for ``grad_out * mask``: the backward given a ReLU
    mask."""
    lv = {k: None if v is None else v.double().detach().requires_grad_(True) for k, v in leaves.items()}
    lin = _linear(case, lv, scale)
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
    case: ConvCase,
    backends: Sequence[str],
    checked: str,
    layout: str,
    batch: int,
    seed: int = 0,
    scaled: bool = False,
) -> dict[str, dict]:
    """backend -> {tensor -> (normalized max error, passed)} plus mask-flip counts and ``problems``, for one case.

    ``checked`` is a key of ``CHECKED`` (the tensors' dtype, TF32 on or off, the tolerance); ``scaled`` passes a
    per-channel scale (the bias then being its shift).
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
    # A frozen norm's gamma / sqrt(var + eps): positive, around 1.
    scale = (torch.rand(case.k, generator=g, dtype=torch.float64) + 0.5).to(dtype) if scaled else None
    f64 = {k: None if v is None else v.double() for k, v in leaves.items()}
    ref, _ = _run(None, case, f64, grad_out.double(), None if scale is None else scale.double())
    relu = case.epilogue != "bias"
    with torch.no_grad():
        pre = _linear(case, f64, scale)
    red = _reductions(case, batch)
    tol = {name: base_tol * max(1.0, red[name] ** 0.5 / 4) for name in TENSORS}
    eps = torch.finfo(dtype).eps

    def expected_for(got: dict[str, Tensor]) -> dict[str, Tensor]:
        """The float64 results to compare ``got`` with: its gradients through its own ReLU mask."""
        if not relu or "out" not in got or len(got) == 1 or not bool(((got["out"] > 0) != (pre > 0)).any()):
            return ref
        mask = (got["out"] > 0).double()
        return {"out": ref["out"], **_masked_reference(case, leaves, grad_out, mask, scale)}

    # The reference row's own largest error per tensor, per device: the anchor of the low-precision bound.
    anchors: dict[str, dict[str, float]] = {}

    def anchor(device: torch.device) -> dict[str, float]:
        if device.type not in anchors:
            with conv_fp32_precision(precision):
                got, _ = _run("reference", case, leaves, grad_out, scale, device=device)
            exp = expected_for(got)
            anchors[device.type] = {n: (got[n].double() - exp[n]).abs().max().item() for n in got if got[n].numel()}
        return anchors[device.type]

    results: dict[str, dict] = {}
    for backend in sorted(backends, key=lambda b: b != "reference"):  # the reference row first: it is the anchor
        with conv_fp32_precision(precision):
            got, problems = _run(backend, case, leaves, grad_out, scale)
        for name in [n for n in got if n in ref and got[n].shape != ref[n].shape]:
            # A wrong shape is this row's failure, not a crash of the whole check.
            problems.append(f"{name}: shape {tuple(got.pop(name).shape)}, expected {tuple(ref[name].shape)}")
        row: dict = {"mask_flips": 0, "mask_flips_outside_band": 0, "problems": problems}
        if relu and "out" in got:
            band = 4 * tol["out"] * max(pre.abs().max().item(), 1.0)
            flips = (got["out"] > 0) != (pre > 0)
            row["mask_flips"] = int(flips.sum())
            row["mask_flips_outside_band"] = int((flips & (pre.abs() > band)).sum())
        expected = expected_for(got)
        if backend == "reference":
            anchors[_device(backend).type] = {
                n: (got[n].double() - expected[n]).abs().max().item() for n in got if got[n].numel()
            }
        anchored = checked in ANCHORED and backend != "reference"
        for name in ("out",) if backend in PREPACKED_ROWS else TENSORS:  # the prepared route is forward only
            if name not in expected:
                continue
            if name not in got:  # a gradient the row did not return, or an output it did not make
                row[name] = (math.nan, False)
                continue
            a, e = got[name].double(), expected[name]
            mag = max(e.abs().max().item() if e.numel() else 0.0, 1.0)
            diff = (a - e).abs()
            err = diff.max().item() / mag if diff.numel() else 0.0
            allowed = tol[name] * (mag + e.abs())
            if anchored and diff.numel():
                ref_err = anchor(_device(backend)).get(name, 0.0)
                allowed = torch.minimum(allowed, REF_FACTOR * ref_err + REF_ULPS * eps * e.abs())
            ok = bool((diff <= allowed).all()) and bool(torch.isfinite(a).all())
            row[name] = (err, ok)
        results[backend] = row
    return {b: results[b] for b in backends}


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
    """Check every row on every case; returns per (row, dtype) the max error per tensor and pass/fail.

    ``backends`` (default: every row that can run here, see :func:`default_rows`) may name the prepacked rows too.
    ``dtypes`` are keys of ``CHECKED``; "tf32" checks only backends that run on a CUDA device. ``shard=(i, n)``
    checks every n-th (case, dtype, layout) from the i-th, for :func:`merge` to combine.
    """
    if backends:
        backends, not_checked = list(backends), {}
    else:
        backends, not_checked = default_rows()
    cases = trace_conv_cases(models, hw)
    if max_cases is not None:
        cases = cases[:max_cases]
    small = sorted(cases, key=lambda c: c.c * c.k * c.r * c.s)[:INTERPRETER_MAX_CASES]
    table: dict[tuple[str, str], dict] = {}
    # Every other (case, layout) of a dtype with a scale: each case is checked both ways over the two layouts.
    work = [
        (c, d, lay, (i + j + k) % 2 == 1)
        for k, d in enumerate(dtypes)
        for j, lay in enumerate(layouts)
        for i, c in enumerate(cases)
    ][shard[0] :: shard[1]]
    bar = timing.progress(work, desc="equivalence", unit="case", disable=not progress, leave=False)
    for case, dtype_name, layout, scaled in bar:
        todo = [b for b in backends if case in small or not _interpreted(b)]
        if CHECKED[dtype_name][1] == "tf32":  # TF32 exists on CUDA devices only
            todo = [b for b in todo if _device(b).type == "cuda"]
        todo = [b for b in todo if b not in PREPACKED_ROWS or not prepacked_unavailable(CHECKED[dtype_name][0])]
        if not todo:
            continue
        res = check_case(case, todo, dtype_name, layout, batch, scaled=scaled)
        label = f"{case.name}{' +scale' if scaled else ''} {layout}"
        for backend, row in res.items():
            agg = table.setdefault((backend, dtype_name), _empty_row())
            agg["cases"] += 1
            agg["scaled_cases"] += scaled
            agg["mask_flips"] += row["mask_flips"]
            if row["mask_flips_outside_band"]:
                agg["passed"] = False
                agg["failures"].append(f"{label}: {row['mask_flips_outside_band']} ReLU mask flips")
            for problem in row["problems"]:
                agg["passed"] = False
                agg["failures"].append(f"{label}: {problem}")
            for name in TENSORS:
                if name not in row:
                    continue
                err, ok = row[name]
                agg["errors"][name] = _worst(agg["errors"].get(name), err)
                if not ok:
                    agg["passed"] = False
                    agg["failures"].append(f"{label}: {name} error {err:.2e}")
    return {
        "config": {
            "models": list(models),
            "input_hw": hw,
            "batch": batch,
            "dtypes": list(dtypes),
            "layouts": list(layouts),
            "n_cases": len(cases),
            "backends": backends,
            "scale": "every other (case, layout) of a dtype",
            "shard": list(shard),
        },
        "results": [{"backend": b, "dtype": d, **v} for (b, d), v in table.items()],
        "not_checked": not_checked,
        # Nothing checked (say "tf32" alone on CPU tensors) is no pass.
        "passed": bool(table) and all(v["passed"] for v in table.values()),
    }


def _empty_row() -> dict:
    return {"cases": 0, "scaled_cases": 0, "passed": True, "mask_flips": 0, "failures": [], "errors": {}}


def merge(parts: Sequence[dict]) -> dict:
    """One result from the results of ``run`` over all shards of the same work."""
    config = parts[0]["config"]
    table: dict[tuple[str, str], dict] = {}
    for part in parts:
        for r in part["results"]:
            agg = table.setdefault((r["backend"], r["dtype"]), _empty_row())
            agg["cases"] += r["cases"]
            agg["scaled_cases"] += r.get("scaled_cases", 0)
            agg["passed"] &= r["passed"]
            agg["mask_flips"] += r["mask_flips"]
            agg["failures"] += r["failures"]
            for name, err in r["errors"].items():
                agg["errors"][name] = _worst(agg["errors"].get(name), err)
    order = sorted(table, key=lambda k: (config["dtypes"].index(k[1]), config["backends"].index(k[0])))
    return {
        "config": {**config, "shard": [0, 1]},
        "results": [{"backend": b, "dtype": d, **table[(b, d)]} for b, d in order],
        "not_checked": parts[0].get("not_checked", {}),
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
    """Console table: max normalized error per tensor for each (backend, dtype), then the rows not checked."""
    width = max([10, *(len(r["backend"]) for r in result["results"])])  # "prepacked-fuse-relu" is longer than 10
    head = f"{'backend':{width}s} {'dtype':5s} {'cases':>5s} " + " ".join(f"{t:>13s}" for t in TENSORS)
    lines = [
        "equivalence vs float64 reference (max |a - ref| / max(max |ref|, 1); 'reference' is the unfused eager op "
        "in that dtype, for comparison)",
        head + "  flips  result",
    ]
    for r in result["results"]:
        errs = " ".join(f"{r['errors'][t]:13.2e}" if t in r["errors"] else f"{'-':>13s}" for t in TENSORS)
        lines.append(
            f"{r['backend']:{width}s} {r['dtype']:5s} {r['cases']:5d} {errs} {r['mask_flips']:6d}  "
            f"{'PASS' if r['passed'] else 'FAIL'}"
        )
        for f in r["failures"][:5]:
            lines.append(f"    {f}")
    lines += [f"not checked: {name}: {why}" for name, why in result.get("not_checked", {}).items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.equivalence [--json PATH]``: the check alone; exit status 1 when a backend fails."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None, help="also write the result as JSON")
    parser.add_argument("--max-cases", type=int, default=None, help="only the first N distinct convs")
    parser.add_argument(
        "--backends",
        default=None,
        help="comma list of backends and prepacked rows (default: every one that can run here)",
    )
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
