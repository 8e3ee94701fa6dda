"""What the tests share: the (backend, device) targets, one case table, one tolerance model, the float64
reference, input makers, layouts and a comparison that says where it failed.

Tests import from here, never from conftest or from private names of the package.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

import pytest
import torch
from torch import Tensor

from resnet_fused import reference
from resnet_fused.backends import BACKENDS, INTERPRET
from resnet_fused.contract import conv_output_shape, pair


def _interpreter_breaks_on_numpy() -> str:
    """Why Triton's interpreter cannot run here, or "": before 3.7 it calls int() on one-element arrays, which
    NumPy 2.4 refuses (the GPU machine's torch 2.11 comes with triton 3.6 and NumPy 2.5)."""
    import importlib.metadata

    from packaging.version import Version

    try:
        triton_v, numpy_v = Version(importlib.metadata.version("triton")), Version(importlib.metadata.version("numpy"))
    except importlib.metadata.PackageNotFoundError:
        return ""
    if triton_v < Version("3.7") and numpy_v >= Version("2.4"):
        return f"Triton {triton_v}'s interpreter fails on NumPy {numpy_v} (int() of a one-element array)"
    return ""


INTERPRETER_BROKEN = _interpreter_breaks_on_numpy()

# ---- which (backend, device) pairs run ----

TEST_BACKENDS_VAR = "RESNET_FUSED_TEST_BACKENDS"
# "1" / "0" forces the trimmed / full parametrisation; by default only the interpreter is trimmed.
TRIM_VAR = "RESNET_FUSED_TEST_TRIM"
# "full" runs the random sweep's full count of draws per backend.
SWEEP_VAR = "RESNET_FUSED_SWEEP"


class Target(NamedTuple):
    """One (backend, device) pair the correctness suite runs on."""

    backend: str
    device: str

    @property
    def slow(self) -> bool:
        """Trimmed parametrisation: the Triton interpreter runs each kernel in Python on the CPU."""
        forced = os.environ.get(TRIM_VAR)
        if forced in ("0", "1"):
            return forced == "1"
        return self.backend == "triton" and self.device == "cpu"

    def __str__(self) -> str:
        return f"{self.backend}-{self.device}"


def _devices_here() -> set[str]:
    return {"cpu", "cuda"} if torch.cuda.is_available() else {"cpu"}


def requested_backends() -> list[str]:
    """The table's concrete backends (without "reference"), narrowed by RESNET_FUSED_TEST_BACKENDS."""
    names = [name for name in BACKENDS.names() if name != "reference"]
    value = os.environ.get(TEST_BACKENDS_VAR, "").strip()
    if not value:
        return names
    wanted = [b.strip().lower() for b in value.split(",") if b.strip()]
    unknown = [b for b in wanted if b not in names]
    if unknown:
        raise ValueError(f"{TEST_BACKENDS_VAR}: expected a comma list of {names}, got unknown {unknown}")
    return [name for name in names if name in wanted]


def targets() -> list[Target]:
    """Every available requested backend on each device type of its table row that exists here."""
    here = _devices_here()
    return [
        Target(name, device)
        for name in requested_backends()
        if not BACKENDS[name].unavailable()
        for device in BACKENDS[name].devices
        if device in here
    ]


def unavailable_requested() -> dict[str, str]:
    """Backends named in RESNET_FUSED_TEST_BACKENDS that cannot run here, with the reason (shown as skips)."""
    if not os.environ.get(TEST_BACKENDS_VAR, "").strip():
        return {}
    return {name: BACKENDS[name].unavailable() for name in requested_backends() if BACKENDS[name].unavailable()}


def target_params(variants: Callable[[Target], Sequence] | None = None) -> list:
    """pytest params: one per target, or ``(target, variant)`` for each of ``variants(target)`` (a test trims
    them where ``target.slow``). A requested backend that cannot run here becomes a visible skip."""
    params = []
    for t in targets():
        if variants is None:
            params.append(pytest.param(t, id=str(t)))
        else:
            params += [pytest.param(t, v, id=f"{t}-{variant_id(v)}") for v in variants(t)]
    for name, why in unavailable_requested().items():
        skip = pytest.mark.skip(reason=f"{name} unavailable: {why}")
        params.append(pytest.param(Target(name, "-"), *([] if variants is None else [None]), marks=skip, id=name))
    return params


def sweep_draws(target: Target) -> int:
    """Random sweep size: 500 with RESNET_FUSED_SWEEP=full, else a CI-sized count."""
    if os.environ.get(SWEEP_VAR) == "full":
        return 500
    return 8 if target.slow else 40


# ---- the case table ----


class Case(NamedTuple):
    """x (n, c, h, w), weight (k, c/groups, r, s); stride, padding, dilation an int or an (h, w) pair."""

    n: int
    c: int
    h: int
    w: int
    k: int
    r: int
    s: int
    stride: int | tuple[int, int] = 1
    padding: int | tuple[int, int] = 0
    dilation: int | tuple[int, int] = 1
    groups: int = 1

    def conv(self) -> dict:
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation, "groups": self.groups}

    def out_shape(self) -> list[int]:
        return conv_output_shape(
            (self.n, self.c, self.h, self.w),
            (self.k, self.c // self.groups, self.r, self.s),
            pair(self.stride, "stride", 1),
            pair(self.padding, "padding", 0),
            pair(self.dilation, "dilation", 1),
        )


CASES: dict[str, Case] = {
    "3x3": Case(2, 8, 8, 8, 8, 3, 3, 1, 1),
    "1x1": Case(3, 16, 5, 5, 8, 1, 1),
    "1x1_s2": Case(2, 8, 9, 9, 16, 1, 1, 2),
    "c3_k5_nonsquare": Case(2, 3, 11, 7, 4, 5, 5, 1, 2),
    "7x7_s2_p3": Case(2, 3, 16, 14, 8, 7, 7, 2, 3),
    "3x3_dil2": Case(2, 4, 10, 9, 6, 3, 3, 1, 2, 2),
    "groups2": Case(2, 6, 8, 8, 4, 3, 3, 1, 1, 1, 2),
    "depthwise_s2": Case(2, 5, 8, 7, 5, 3, 3, 2, 1, 1, 5),
    "rect_kernel_pad": Case(1, 4, 6, 9, 3, 1, 3, (2, 1), (0, 1)),
    # Deliberately odd sizes for the implicit-GEMM tiles.
    "odd_3x3": Case(2, 5, 7, 6, 9, 3, 3, 1, 1),
    "odd_1x1": Case(2, 20, 5, 3, 18, 1, 1),
    "odd_strided": Case(1, 6, 9, 8, 7, 3, 3, 2, 1),
    "odd_1x1_s2": Case(2, 8, 7, 7, 5, 1, 1, 2),
    "dilated_rect": Case(1, 4, 9, 10, 6, 3, 2, (1, 2), (2, 1), (2, 3)),
    "grouped3": Case(1, 6, 6, 5, 9, 3, 3, 1, 1, 1, 3),
    "depthwise_rect_stride": Case(1, 4, 6, 6, 4, 3, 3, (2, 1), 1, 1, 4),
    "7x7_odd": Case(1, 3, 11, 11, 8, 7, 7, 2, 3),
    "odd_dilated": Case(3, 5, 9, 11, 7, 3, 3, 1, 2, 2),
}
# ResNet-sized layers: quick on a GPU, minutes on a CPU, so only on cuda.
GPU_CASES: dict[str, Case] = {
    "stem7x7": Case(2, 3, 32, 32, 64, 7, 7, 2, 3),
    "resnet_3x3": Case(2, 64, 14, 14, 64, 3, 3, 1, 1),
    "resnet_3x3_s2": Case(2, 64, 14, 14, 128, 3, 3, 2, 1),
    "resnet_1x1_down": Case(2, 64, 14, 14, 128, 1, 1, 2),
    "resnet_1x1_expand": Case(2, 64, 7, 7, 256, 1, 1),
    "depthwise32": Case(2, 32, 9, 9, 32, 3, 3, 1, 1, 1, 32),
    # 96*96 output pixels: several chunks per (n, c) plane in the NCHW backward kernels.
    "large_plane": Case(1, 8, 96, 96, 8, 3, 3, 1, 1),
}


def cases_for(device: str) -> dict[str, Case]:
    return {**CASES, **GPU_CASES} if device == "cuda" else dict(CASES)


# ---- variants: dtype, layout, epilogue ----


class Epilogue(NamedTuple):
    """Which epilogue options are on."""

    bias: bool
    scale: bool
    residual: bool
    relu: bool


ALL_EPILOGUES = [Epilogue(*e) for e in itertools.product([False, True], repeat=4)]
FULL = Epilogue(True, True, True, True)
PREACT = Epilogue(True, False, True, False)
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
LOW_PRECISION = (torch.float16, torch.bfloat16)
LAYOUTS = ["nchw", "channels_last", "noncontig"]


def variant_id(v) -> str:
    """A readable id: tuples of dtypes, layouts, epilogues and case names joined with '-'."""
    if not isinstance(v, tuple) or isinstance(v, (Case,)):
        return str(v)
    parts = []
    for item in v:
        if isinstance(item, torch.dtype):
            parts.append(str(item)[6:])
        elif isinstance(item, Epilogue):
            parts.append("".join(c if f else "-" for c, f in zip("BSRA", item, strict=True)))
        else:
            parts.append(str(item))
    return "-".join(parts)


# ---- tolerances: one model, tied to the dtype ----

# Relative tolerance per dtype against a float64 reference.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# TF32 keeps 10 mantissa bits; fp32 on CUDA gets this only where a test turns TF32 on.
TF32_TOL = 2e-3


def tolerance(dtype: torch.dtype, reductions: int = 1, *, tf32: bool = False) -> float:
    """rtol for ``dtype``, scaled by the reduction length behind each element: the rounding error of a float sum
    grows like its square root for random rounding errors. fp16 and bf16 sums accumulate in fp32, so their error is
    the output's rounding: capped at 4x, where bf16's uncapped scale let a weight gradient missing a quarter of its
    rows pass (9216-long sums: 38 % of the largest gradient)."""
    base = TF32_TOL if (tf32 and dtype == torch.float32) else TOL[dtype]
    scale = max(1.0, math.sqrt(reductions) / 4)
    return base * (min(scale, 4.0) if dtype in (torch.float16, torch.bfloat16) else scale)


def assert_close(
    actual: Tensor, expected: Tensor, dtype: torch.dtype, what: str, reductions: int = 1, *, tf32: bool = False
) -> None:
    """Compare with a float64 ``expected``: equal NaN and Inf positions, then ``|a - e| <= tol * (|e| + mag)``
    where mag is the largest finite magnitude of ``expected`` (at least 1). The message says where it failed."""
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    for name, fa, fe in (("NaN", a.isnan(), e.isnan()), ("+Inf", a == math.inf, e == math.inf),
                         ("-Inf", a == -math.inf, e == -math.inf)):  # fmt: skip
        bad = (fa != fe).nonzero()
        if bad.numel():
            idx = tuple(bad[0].tolist())
            raise AssertionError(
                f"{what}: {name} positions differ at {bad.shape[0]} element(s), first at {idx}: "
                f"got {a[idx].item()}, want {e[idx].item()}"
            )
    finite = e.isfinite()
    tol = tolerance(dtype, reductions, tf32=tf32)
    mag = max(e[finite].abs().max().item() if finite.any() else 1.0, 1.0)
    err = torch.where(finite, (a - e).abs(), torch.zeros_like(a))
    bound = tol * (e.abs() + mag)
    bad = (err > bound).nonzero()
    if bad.numel():
        worst = tuple(int(i) for i in torch.unravel_index((err / bound).argmax(), err.shape))
        raise AssertionError(
            f"{what} ({dtype}, rtol {tol:.2g}): {bad.shape[0]} of {a.numel()} elements out of tolerance, first at "
            f"{tuple(bad[0].tolist())}; worst at {worst}: got {a[worst].item():.8g}, want {e[worst].item():.8g} "
            f"(|err| {err[worst].item():.3g} > {bound[worst].item():.3g})"
        )


# ---- inputs ----


def to_layout(t: Tensor, layout: str) -> Tensor:
    """'nchw', 'channels_last', 'noncontig' (a strided view that is neither) or 'offset' (a view into a larger
    buffer at a nonzero storage offset, with its own odd strides)."""
    if layout == "nchw":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "noncontig":
        # Every other column of a wider tensor: neither layout once W > 1 and C, H are not both 1.
        n, c, h, w = t.shape
        big = torch.zeros(n, c, h, 2 * w, dtype=t.dtype, device=t.device)
        big[..., ::2] = t
        return big[..., ::2]
    if layout == "offset":
        # Channels_last storage with one padding channel and one leading row: x[:, 1:, 1:] of a larger tensor.
        n, c, h, w = t.shape
        big = torch.zeros(n, c + 1, h + 1, w, dtype=t.dtype, device=t.device).contiguous(
            memory_format=torch.channels_last
        )
        view = big[:, 1:, 1:]
        view.copy_(t)
        return view
    raise ValueError(f"layout: expected one of {[*LAYOUTS, 'offset']}, got {layout!r}")


def make_tensor(shape, dtype: torch.dtype, gen: torch.Generator, *, exact: bool = False, device="cpu") -> Tensor:
    """Random values; with ``exact``, small multiples of 1/4 so that sums of products are exact in low precision
    and a reference cannot round a pre-activation across zero."""
    if exact:
        t = torch.randint(-4, 5, tuple(shape), generator=gen) / 4
    else:
        t = torch.randn(tuple(shape), generator=gen, dtype=torch.float64)
    return t.to(dtype).to(device)


class Inputs(NamedTuple):
    """One call's arguments: ``tensors`` x, weight, bias, residual (None where off); ``kwargs`` scale and the
    conv options and relu; ``grad_out`` shaped like y."""

    tensors: dict[str, Tensor | None]
    kwargs: dict
    grad_out: Tensor

    def leaves(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.tensors.items() if v is not None}

    def op_args(self) -> tuple:
        """The positional argument list of every backend's forward op."""
        kw = self.kwargs
        conv = [list(pair(kw[k], k, 0)) for k in ("stride", "padding", "dilation")]
        return (*self.tensors.values(), kw["scale"], *conv, kw["groups"], kw["relu"])


def make_inputs(
    case: Case,
    dtype: torch.dtype,
    layout: str = "nchw",
    epilogue: Epilogue = FULL,
    *,
    device: str = "cpu",
    seed: int = 0,
    requires_grad: bool = True,
) -> Inputs:
    """Random inputs for ``case``; x and residual in ``layout`` (for the two view layouts, the weight, bias and scale
    are strided views too). Low precision gets exact values (see make_tensor)."""
    gen = torch.Generator().manual_seed(seed)
    exact = dtype in LOW_PRECISION
    out_shape = case.out_shape()
    x = to_layout(make_tensor((case.n, case.c, case.h, case.w), dtype, gen, exact=exact, device=device), layout)
    weight = make_tensor((case.k, case.c // case.groups, case.r, case.s), dtype, gen, exact=exact, device=device)
    bias = make_tensor((case.k,), dtype, gen, exact=exact, device=device) if epilogue.bias else None
    scale = None
    if epilogue.scale:  # signed, away from zero: a frozen BatchNorm's gamma may be negative
        scale = make_tensor((case.k,), dtype, gen, exact=exact, device=device)
        scale = torch.where(scale < 0, scale - 0.5, scale + 0.5)
    if layout in ("noncontig", "offset"):  # the per-channel vectors and the weight as strided views too
        weight = to_layout(weight, "noncontig")
        bias, scale = (None if t is None else torch.zeros(2 * case.k, dtype=dtype, device=device)[::2].copy_(t)
                       for t in (bias, scale))  # fmt: skip
    residual = (
        to_layout(make_tensor(out_shape, dtype, gen, exact=exact, device=device), layout) if epilogue.residual else None
    )
    grad_out = make_tensor(out_shape, dtype, gen, exact=exact, device=device)
    tensors = {"x": x, "weight": weight, "bias": bias, "residual": residual}
    if requires_grad:
        for t in tensors.values():
            if t is not None:
                t.requires_grad_()
    return Inputs(tensors, dict(scale=scale, relu=epilogue.relu, **case.conv()), grad_out)


# ---- the reference ----


def _float64(t: Tensor) -> Tensor:
    """A contiguous float64 copy for the reference: torch's own CPU conv can depend on its inputs' layout (an odd
    stride of a size-1 dim gives wrong results), and the reference must not share a fault of the layout under
    test."""
    return t.detach().to(torch.float64, memory_format=torch.contiguous_format)


def reference_forward(inputs: Inputs) -> Tensor:
    """y of ``resnet_fused.reference`` in float64, from contiguous copies of the inputs."""
    d = {k: None if v is None else _float64(v) for k, v in inputs.tensors.items()}
    kw = dict(inputs.kwargs, scale=None if inputs.kwargs["scale"] is None else _float64(inputs.kwargs["scale"]))
    return reference.conv_bias_add_relu(**d, **kw)


def reference_grads(inputs: Inputs, out: Tensor, grad_out: Tensor | None = None) -> dict[str, Tensor]:
    """float64 gradients of the reference (from contiguous copies) for every leaf that requires grad. With relu,
    the mask comes from the tested output ``out`` (``out <= 0`` blocks): a pre-activation within rounding of zero
    may land on either side, and the backward must follow the forward it is given."""
    grad_out = inputs.grad_out if grad_out is None else grad_out
    leaves = {k: _float64(v).requires_grad_() for k, v in inputs.tensors.items() if v is not None}
    kw = dict(inputs.kwargs, relu=False)
    kw["scale"] = None if kw["scale"] is None else _float64(kw["scale"])
    lin = reference.conv_bias_add_relu(**{k: leaves.get(k) for k in inputs.tensors}, **kw)
    g = grad_out.detach().double()
    if inputs.kwargs["relu"]:
        g = g * (~(out.detach() <= 0)).double()
    wanted = [k for k, v in inputs.tensors.items() if v is not None and v.requires_grad]
    return dict(zip(wanted, torch.autograd.grad(lin, [leaves[k] for k in wanted], g), strict=True))


def reductions(inputs: Inputs, out_shape: Sequence[int]) -> dict[str, int]:
    """The length of the sums behind each element of y and of each gradient."""
    n, k, p, q = out_shape
    weight = inputs.tensors["weight"]
    cg, r, s = weight.shape[1:]
    groups = inputs.kwargs["groups"]
    return {"y": cg * r * s, "x": (k // groups) * r * s, "weight": n * p * q, "bias": n * p * q, "residual": 1}


def check_call(y: Tensor, inputs: Inputs, dtype: torch.dtype, what: str = "", *, tf32: bool = False) -> None:
    """y and every gradient of ``inputs``' leaves (already computed into ``.grad``, or computed here when
    absent) against the float64 reference, plus dtype, device and y's memory format."""
    x = inputs.tensors["x"]
    y_ref = reference_forward(inputs)
    red = reductions(inputs, y_ref.shape)
    assert y.dtype == dtype, f"{what}: y dtype {y.dtype}, expected {dtype}"
    assert y.device == x.device, f"{what}: y on {y.device}, expected {x.device}"
    # torch's own rule, not the package's (whose rule this checks): x's layout as ATen reads it
    want = torch._prims_common.suggest_memory_format(x)
    assert y.is_contiguous(memory_format=want), f"{what}: y is not in x's memory format"
    assert_close(y, y_ref, dtype, f"{what} y", red["y"], tf32=tf32)
    leaves = {k: v for k, v in inputs.leaves().items() if v.requires_grad}
    if not leaves:
        return
    grads = torch.autograd.grad(y, list(leaves.values()), inputs.grad_out)
    expected = reference_grads(inputs, y)
    for (name, t), g in zip(leaves.items(), grads, strict=True):
        assert g.shape == t.shape and g.dtype == dtype, f"{what}: grad_{name} {g.dtype} {tuple(g.shape)}"
        assert_close(g, expected[name], dtype, f"{what} grad_{name}", red[name], tf32=tf32)


# ---- the ops of a backend ----


def forward_op(backend: str):
    """The dispatcher op (an OpOverload) of ``backend``'s forward."""
    op = BACKENDS[backend].op
    return op if isinstance(op, torch._ops.OpOverload) else op._opoverload


def backward_op(backend: str):
    """The dispatcher op of ``backend``'s backward: its forward's name + ``_backward``."""
    name = forward_op(backend)._schema.name.split("::")[1]
    return getattr(torch.ops.resnet_fused, f"{name}_backward").default


def registered_forward_ops() -> dict[str, object]:
    """Every forward dispatcher op this install registers (the C++ op, and the Triton op when it can load)."""
    return {name: forward_op(name) for name in BACKENDS.available() if name != "reference"}


__all__ = [
    "ALL_EPILOGUES", "CASES", "DTYPES", "FULL", "GPU_CASES", "INTERPRET", "INTERPRETER_BROKEN", "LAYOUTS", "PREACT",
    "TOL", "Case",
    "Epilogue", "Inputs", "Target", "assert_close", "backward_op", "cases_for", "check_call", "forward_op",
    "make_inputs", "make_tensor", "reference_forward", "reference_grads", "registered_forward_ops", "sweep_draws",
    "target_params", "targets", "to_layout", "tolerance",
]  # fmt: skip


def run_fresh(code: str) -> None:
    """Run ``code`` in a fresh interpreter, where nothing was imported before it; it must succeed."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
