"""Op-level benchmark: ``conv_bias_add_relu`` on each backend against the unfused eager reference, torch.compile of the
reference, and the bare conv alone (the floor), on every distinct conv of ResNet-18/50.

The shapes are traced from torchvision's models with forward hooks on their ``nn.Conv2d`` modules (on the meta
device, so tracing costs nothing); each conv gets the epilogue it has in a fused ResNet:

- ``bias+relu``: the stem and every conv inside a block but the last;
- ``bias+res+relu``: the last conv of a block (``conv2`` of BasicBlock, ``conv3`` of Bottleneck), with the shortcut
  added before the ReLU;
- ``bias``: the strided 1x1 projection shortcut (``downsample.0``), linear.

Two convs are the same case when geometry, input size and epilogue all match. Implementations (per case, dtype,
layout and pass, measured side by side in one process, interleaved; see :mod:`benchmarks.timing`), each labelled
by its name:

- ``<backend>`` (``cpu``, ``cuda``, ``triton``): ``resnet_fused.conv_bias_add_relu`` on every available row of
  ``resnet_fused.backends.BACKENDS`` that ``backend="auto"`` may pick on the device (so never the Triton
  interpreter, and never ``reference``, which *is* the eager row);
- ``eager``: :func:`eager_block_tail`, the unfused ops as a torchvision block runs them with its norm folded into
  the conv's bias: ``F.conv2d`` with the bias, then ``out += identity`` and an in-place ReLU;
- ``compile``: ``torch.compile(resnet_fused.reference.conv_bias_add_relu, dynamic=False)``; its compile time (the
  first call) is reported apart;
- ``conv_alone``: ``F.conv2d(x, w)`` without bias, the floor a fused op can approach (it can come out below it
  only by noise);
- the inference path (forward pass, CPU, dtypes torch's oneDNN runs here), on a weight reordered once into oneDNN's
  blocked layout for the input size (``torch._C._nn.mkldnn_reorder_conv2d_weight``):

  - ``prepacked``: a ``FusedConv2d`` prepared by ``resnet_fused.inference.optimize_for_inference``; where that is not
    importable, ``onednn_prepacked`` instead: torch's own ``mkldnn::_convolution_pointwise(.binary)`` with the bias,
    residual add and ReLU as oneDNN post-ops (the ops Inductor emits under freezing), so the comparison still exists;
  - ``prepacked-fuse-relu``: ``prepacked`` with ``fuse_relu=True`` (the ReLU as a oneDNN post-op too: one pass, but
    a NaN pre-activation becomes 0);
  - ``conv_prepacked``: ``mkldnn::_convolution_pointwise`` on the same packed weight without bias or post-ops, the
    inference path's floor.

Each fused implementation is reported against the floor with the same weight handling: ``time / conv_alone`` for
the backends (the training path), ``time / conv_prepacked`` for the prepacked rows. Before they are timed, the
prepacked rows' outputs are checked against float64 on the batch's first sample (:data:`PREPACKED_TOL`); a row out of
tolerance, or with a NaN, gets the status "wrong result", is not timed and makes the script exit with status 1. Their
peak memory leaves out the packed weight they hold between calls; each record gives its size (``held_bytes``).

A backend that cannot run here, or a row left out (``--no-compile``), is listed under "not timed" with the reason,
and the targets it would have had are listed as "not measured".

Forward runs under ``torch.no_grad()``; forward+backward has ``x``, ``weight``, ``bias`` and ``residual`` all
requiring grad as in training, back-propagates a fixed random ``grad_out`` and clears the grads each step.

    python -m benchmarks.bench_ops --models resnet50 --dtypes fp32 --layouts channels_last --json out.json
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import resnet_fused
from benchmarks import timing
from resnet_fused import contract
from resnet_fused.backends import BACKENDS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
LAYOUTS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}
PASSES = ("fwd", "fwd+bwd")
# The fields that name the rounds a record was timed in: records agreeing on them were timed together.
ROUND_KEYS = ("case", "pass", "dtype", "layout", "batch")
EPILOGUES = ("bias+relu", "bias+res+relu", "bias")
FLOORS = ("conv_alone", "conv_prepacked")
BASE_IMPLS = ("eager", "compile", *FLOORS)  # every other implementation is a fused op: a backend or a prepacked row
PREPACKED_IMPLS = ("prepacked", "prepacked-fuse-relu", "onednn_prepacked")
PACKAGE_PREPACKED = ("prepacked", "prepacked-fuse-relu")  # the package's own; onednn_prepacked stands in without it
PEER_IMPLS = ("onednn_prepacked",)  # torch's own kernels: timed for comparison, never held to the package's targets
OUT_DIR = Path(__file__).resolve().parent / "out"
# Largest error of a prepacked row's output against float64, over max(max |ref|, 1), by dtype: a few roundings of the
# output (bf16 and fp16 keep 8 and 11 significant bits) and fp32's accumulation, with room to spare.
PREPACKED_TOL = {"fp64": 1e-10, "fp32": 1e-4, "fp16": 4e-3, "bf16": 2e-2}


@dataclass(frozen=True)
class ConvCase:
    """One distinct conv of a ResNet with the epilogue it has there. ``h, w`` is the input's spatial size."""

    c: int
    k: int
    r: int
    s: int
    stride: int
    padding: int
    dilation: int
    h: int
    w: int
    epilogue: str
    layers: tuple[str, ...] = field(default=(), compare=False)  # "resnet50:layer1.0.conv3", ...

    @property
    def name(self) -> str:
        dilated = f" d{self.dilation}" if self.dilation != 1 else ""
        return f"{self.r}x{self.s} {self.c}->{self.k} {self.h}x{self.w} s{self.stride}{dilated} {self.epilogue}"

    @property
    def models(self) -> list[str]:
        return sorted({layer.split(":")[0] for layer in self.layers})

    @property
    def conv_args(self) -> dict[str, tuple[int, int]]:
        """stride, padding and dilation as the op takes them."""
        return {
            "stride": contract.pair(self.stride, "stride", 1),
            "padding": contract.pair(self.padding, "padding", 0),
            "dilation": contract.pair(self.dilation, "dilation", 1),
        }

    def out_hw(self) -> tuple[int, int]:
        """(P, Q) of the conv's output."""
        x_shape, weight_shape = (1, self.c, self.h, self.w), (self.k, self.c, self.r, self.s)
        _, _, p, q = contract.conv_output_shape(x_shape, weight_shape, **self.conv_args)
        return p, q

    def flops(self, batch: int) -> int:
        """Multiply-adds x 2 of the conv itself."""
        p, q = self.out_hw()
        return 2 * batch * self.k * p * q * self.c * self.r * self.s


def _epilogue(model: nn.Module, modules: dict[str, nn.Module], name: str) -> str:
    from torchvision.models.resnet import BasicBlock, Bottleneck

    parent_name, _, leaf = name.rpartition(".")
    parent = modules[parent_name] if parent_name else model
    if name.endswith("downsample.0"):
        return "bias"
    if (isinstance(parent, BasicBlock) and leaf == "conv2") or (isinstance(parent, Bottleneck) and leaf == "conv3"):
        return "bias+res+relu"
    return "bias+relu"


def trace_conv_cases(model_names: Sequence[str] = ("resnet18", "resnet50"), hw: int = 224) -> list[ConvCase]:
    """Every distinct conv (geometry, input size, epilogue) of the torchvision models, in order of first use.

    Traced with forward hooks on the ``nn.Conv2d`` modules of each model, run on the meta device at ``hw x hw``.
    """
    import torchvision

    found: dict[tuple, list[str]] = {}
    for model_name in model_names:
        with torch.device("meta"):
            model = getattr(torchvision.models, model_name)().eval()
        modules = dict(model.named_modules())
        handles = []

        def make_hook(name: str, model_name: str = model_name, model: nn.Module = model, modules=modules):
            def hook(conv: nn.Conv2d, inputs: tuple[Tensor, ...], output: Tensor) -> None:
                x = inputs[0]
                if conv.groups != 1 or isinstance(conv.padding, str):
                    raise NotImplementedError(f"{model_name}:{name}: grouped or string-padded conv")
                if any(len(set(v)) != 1 for v in (conv.kernel_size, conv.stride, conv.padding, conv.dilation)):
                    raise NotImplementedError(f"{model_name}:{name}: non-square kernel, stride, padding or dilation")
                key = (
                    x.shape[1],
                    conv.out_channels,
                    conv.kernel_size[0],
                    conv.kernel_size[1],
                    conv.stride[0],
                    conv.padding[0],
                    conv.dilation[0],
                    x.shape[2],
                    x.shape[3],
                    _epilogue(model, modules, name),
                )
                found.setdefault(key, []).append(f"{model_name}:{name}")

            return hook

        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d):
                handles.append(module.register_forward_hook(make_hook(name)))
        with torch.no_grad():
            model(torch.empty(1, 3, hw, hw, device="meta"))
        for h in handles:
            h.remove()
    return [ConvCase(*key, layers=tuple(layers)) for key, layers in found.items()]


# ---- implementations ----


@dataclass
class CaseInputs:
    """Tensors of one case: x, weight, bias, residual (None unless the epilogue adds it) and a grad for the output."""

    x: Tensor
    weight: Tensor
    bias: Tensor
    residual: Tensor | None
    grad_out: Tensor


def make_inputs(
    case: ConvCase,
    batch: int,
    dtype: torch.dtype,
    memory_format: torch.memory_format,
    device: torch.device,
    requires_grad: bool,
    seed: int = 0,
) -> CaseInputs:
    """Random unit-scale inputs (weights scaled by 1/sqrt(fan-in)) in ``memory_format``, as a model has them."""
    g = torch.Generator().manual_seed(seed)
    p, q = case.out_hw()

    def rand(*shape: int, scale: float = 1.0, fmt: torch.memory_format | None = None) -> Tensor:
        t = (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)
        if fmt is not None:
            t = t.contiguous(memory_format=fmt)
        return t.requires_grad_(requires_grad)

    fan_in = case.c * case.r * case.s
    x = rand(batch, case.c, case.h, case.w, fmt=memory_format)
    weight = rand(case.k, case.c, case.r, case.s, scale=fan_in**-0.5, fmt=memory_format)
    bias = rand(case.k, scale=0.1)
    residual = rand(batch, case.k, p, q, fmt=memory_format) if case.epilogue == "bias+res+relu" else None
    grad_out = torch.randn(batch, case.k, p, q, generator=g).to(device=device, dtype=dtype)
    grad_out = grad_out.contiguous(memory_format=memory_format)
    return CaseInputs(x, weight, bias, residual, grad_out)


def eager_block_tail(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    residual: Tensor | None,
    *,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    relu: bool,
) -> Tensor:
    """The eager baseline: x (N, C, H, W), weight (K, C, R, S), bias (K,), residual and y (N, K, P, Q).

    As torchvision's blocks write it (``out += identity; out = self.relu(out)`` with ``inplace=True``), with the norm
    already folded into the conv's bias: the fastest unfused code a user would write, not one op per term.
    """
    y = F.conv2d(x, weight, bias, stride, padding, dilation)
    if residual is not None:
        y += residual
    return F.relu_(y) if relu else y


def op_impls(
    case: ConvCase, inp: CaseInputs, backends: Sequence[str], with_compile: bool
) -> dict[str, Callable[[], Tensor]]:
    """name -> zero-argument forward callable for every implementation."""
    relu = case.epilogue != "bias"
    conv = case.conv_args
    args = (inp.x, inp.weight, inp.bias, inp.residual)
    impls: dict[str, Callable[[], Tensor]] = {}
    for backend in backends:
        impls[backend] = lambda b=backend: resnet_fused.conv_bias_add_relu(*args, **conv, relu=relu, backend=b)
    impls["eager"] = lambda: eager_block_tail(*args, **conv, relu=relu)
    if with_compile:
        compiled = torch.compile(resnet_fused.reference.conv_bias_add_relu, dynamic=False)
        impls["compile"] = lambda: compiled(*args, **conv, relu=relu)
    impls["conv_alone"] = lambda: F.conv2d(inp.x, inp.weight, None, **conv)
    return impls


def floor_of(impl: str) -> str:
    """The floor ``impl`` is compared with: the conv alone with the same weight handling."""
    return "conv_prepacked" if impl in PREPACKED_IMPLS else "conv_alone"


def prepack_unsupported(device: torch.device, dtype: torch.dtype) -> str:
    """ "" when torch's oneDNN can run a prepacked conv on ``dtype`` tensors on ``device`` here, else why not."""
    if device.type != "cpu":
        return f"oneDNN prepacking is CPU-only, got device {device.type}"
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return "torch was built without oneDNN, or torch.backends.mkldnn is disabled"
    supported = {
        torch.float32: True,
        torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported(),
        torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported(),
    }
    if not supported.get(dtype, False):
        return f"torch's oneDNN does not run {dtype} convolutions on this CPU"
    return ""


def packed_bytes(model: nn.Module) -> int:
    """Bytes of the oneDNN weight copies a prepared model holds between calls (outside any call's peak)."""
    return sum(t.numel() * t.element_size() for m in model.modules() for t in getattr(m, "_packs", {}).values())


def package_prepack_unavailable() -> str:
    """ "" when the package offers its prepacked conv (``resnet_fused.inference.optimize_for_inference``), else why
    not (then ``onednn_prepacked`` is timed in its place)."""
    try:
        from resnet_fused.inference import optimize_for_inference  # noqa: F401
    except ImportError as e:
        return f"resnet_fused.inference.optimize_for_inference is not importable ({e}); onednn_prepacked stands in"
    return ""


def _package_prepacked(case: ConvCase, inp: CaseInputs, fuse_relu: bool = False) -> Callable[[], Tensor] | None:
    """The package's prepacked fused conv on the case's tensors, or None where the package does not offer one. Its
    ``held_bytes()`` gives the size of the packed weight it keeps between calls."""
    try:
        from resnet_fused.inference import optimize_for_inference
    except ImportError:
        return None
    from resnet_fused.nn import FusedConv2d

    module = FusedConv2d(
        case.c, case.k, (case.r, case.s), case.stride, case.padding, case.dilation, device="meta",
        relu=case.epilogue != "bias",
    )  # fmt: skip
    # Parameters that share the case's tensors, as a converted model's convs do.
    module.weight = nn.Parameter(inp.weight.detach(), requires_grad=False)
    module.bias = nn.Parameter(inp.bias.detach(), requires_grad=False)
    module = optimize_for_inference(module.eval(), fuse_relu=fuse_relu)

    def call() -> Tensor:
        return module(inp.x, inp.residual)

    call.held_bytes = lambda: packed_bytes(module)  # type: ignore[attr-defined]
    return call


def prepacked_impls(case: ConvCase, inp: CaseInputs) -> dict[str, Callable[[], Tensor]]:
    """The inference path's rows: the fused conv on a prepacked weight (``prepacked``, or ``onednn_prepacked`` where
    the package has no prepacked op), and its floor ``conv_prepacked``, the same packed conv without post-ops."""
    conv = case.conv_args
    geometry = (list(conv["padding"]), list(conv["stride"]), list(conv["dilation"]), 1)
    with torch.no_grad():
        packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
            inp.weight.detach().contiguous().to_mkldnn(), *geometry, list(inp.x.shape)
        )
    pointwise = torch.ops.mkldnn._convolution_pointwise
    impls: dict[str, Callable[[], Tensor]] = {}
    package = _package_prepacked(case, inp)
    if package is not None:
        impls["prepacked"] = package
        impls["prepacked-fuse-relu"] = _package_prepacked(case, inp, fuse_relu=True)
    else:
        relu = case.epilogue != "bias"

        def onednn_prepacked() -> Tensor:
            if inp.residual is None:
                return pointwise(inp.x, packed, inp.bias, *geometry, "relu" if relu else "none", [], None)
            return pointwise.binary(inp.x, inp.residual, packed, inp.bias, *geometry, "add", 1.0, "relu", [], None)

        impls["onednn_prepacked"] = onednn_prepacked

    def conv_prepacked() -> Tensor:
        return pointwise(inp.x, packed, None, *geometry, "none", [], None)

    impls["conv_prepacked"] = conv_prepacked
    for name in ("onednn_prepacked", "conv_prepacked"):
        if name in impls:
            impls[name].held_bytes = lambda: packed.numel() * packed.element_size()  # type: ignore[attr-defined]
    return impls


def check_prepacked(
    case: ConvCase, inp: CaseInputs, dtype_name: str, impls: dict[str, Callable[[], Tensor]]
) -> dict[str, tuple[float, bool]]:
    """name -> (error, passed) of each prepacked row's output (one call): the batch's first sample against float64
    (``max |y - ref| / max(max |ref|, 1)``) within ``PREPACKED_TOL[dtype_name]``, and no NaN or inf anywhere."""
    conv = case.conv_args
    x = inp.x.detach()[:1].double()
    w = inp.weight.detach().double()
    res = None if inp.residual is None else inp.residual.detach()[:1].double()
    fused = resnet_fused.reference.conv_bias_add_relu(
        x, w, inp.bias.detach().double(), res, **conv, relu=case.epilogue != "bias"
    )
    out = {}
    for name, fn in impls.items():
        if name not in PREPACKED_IMPLS and name != "conv_prepacked":
            continue
        want = F.conv2d(x, w, None, **conv) if name == "conv_prepacked" else fused
        with torch.no_grad():
            y = fn()
        if y[:1].shape != want.shape:  # a wrong shape fails this row; the check goes on
            out[name] = (math.nan, False)
            continue
        # The whole batch must be finite, not only the sample compared.
        err = (y[:1].double() - want).abs().max().item() / max(want.abs().max().item(), 1.0)
        finite = bool(torch.isfinite(y).all())
        out[name] = (err if finite else math.nan, finite and err <= PREPACKED_TOL[dtype_name])
    return out


def as_pass(fwd: Callable[[], Tensor], inp: CaseInputs, pass_: str) -> Callable[[], None]:
    """Wrap a forward callable into one timed call of ``pass_``: forward under no_grad, or a training step."""
    if pass_ == "fwd":

        def run_fwd() -> None:
            with torch.no_grad():
                fwd()

        return run_fwd
    leaves = [t for t in (inp.x, inp.weight, inp.bias, inp.residual) if t is not None]

    def run_fwd_bwd() -> None:
        fwd().backward(inp.grad_out)
        for t in leaves:
            t.grad = None

    return run_fwd_bwd


def timed_backends(device: torch.device, requested: Sequence[str] | None = None) -> list[str]:
    """Backends to time on ``device``: the available rows of the backend table that ``backend="auto"`` may pick
    there. That leaves out the reference (the eager row) and the Triton interpreter (a correctness tool)."""
    out = [row.name for row in BACKENDS.auto_candidates(device.type)]
    if requested is not None:
        missing = [b for b in requested if b not in out]
        if missing:
            raise ValueError(f"backends: expected some of {out} (the fused backends on {device.type}), got {missing}")
        out = [b for b in out if b in requested]
    return out


def backend_impls(impls: Sequence[str]) -> list[str]:
    """The implementation labels that are fused ops (backends and prepacked rows; not eager, compile or a floor), in
    order."""
    return [i for i in impls if i not in BASE_IMPLS]


def _configure_dynamo() -> None:
    # One compiled graph per case; the cache is reset between cases, and shapes are never made dynamic.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    torch._dynamo.config.automatic_dynamic_shapes = False


def run_case(
    case: ConvCase,
    *,
    batch: int,
    dtype_name: str,
    layout: str,
    pass_: str,
    backends: Sequence[str],
    with_compile: bool,
    device: torch.device,
    rounds: int,
    warmup: int,
    min_sample_ms: float,
    measure_memory: bool = True,
) -> list[dict]:
    """Measure every implementation on one (case, dtype, layout, pass); one JSON record per implementation."""
    dtype = DTYPES[dtype_name]
    inp = make_inputs(case, batch, dtype, LAYOUTS[layout], device, requires_grad=pass_ == "fwd+bwd")
    torch._dynamo.reset()
    fwds = op_impls(case, inp, backends, with_compile)
    base = {"pass": pass_, "dtype": dtype_name, "layout": layout, "batch": batch,
            "shape": {k: v for k, v in asdict(case).items() if k != "layers"}, "layers": list(case.layers),
            "models": case.models}  # fmt: skip
    records = []
    checked: dict[str, tuple[float, bool]] = {}
    if pass_ == "fwd" and not prepack_unsupported(device, dtype):
        fwds.update(prepacked_impls(case, inp))
        checked = check_prepacked(case, inp, dtype_name, fwds)
        for name, (err, ok) in checked.items():
            if not ok:  # a wrong result is not timed: its speed would mean nothing
                del fwds[name]
                why = f"wrong result: error {err:.2e} against float64, tolerance {PREPACKED_TOL[dtype_name]:.0e}"
                records.append({"case": case.name, "impl": name, **base, "status": why, "max_error_vs_float64": err})
        if "conv_prepacked" not in fwds:  # no floor to read the prepacked rows against: they are not timed either
            for name in [n for n in fwds if floor_of(n) == "conv_prepacked"]:
                del fwds[name]
                records.append({"case": case.name, "impl": name, **base, "status": FLOOR_FAILED})
    baselines = ("eager", *(f for f in FLOORS if f in fwds))
    calls = {name: as_pass(fn, inp, pass_) for name, fn in fwds.items()}
    compile_s = None
    if "compile" in calls:
        t0 = time.perf_counter()
        calls["compile"]()  # compiles the forward (and, for fwd+bwd, the backward)
        timing.synchronize(device)
        compile_s = time.perf_counter() - t0
    stats = timing.time_interleaved(
        calls,
        rounds=rounds,
        warmup=warmup,
        min_sample_ms=min_sample_ms,
        baselines=baselines,
        device=device,
        # Each case its own sequence of orders: a position effect left over then averages out over the shapes.
        seed=zlib.crc32(f"{case.name}|{dtype_name}|{layout}|{pass_}".encode()),
    )
    for name, st in stats.items():
        rec = {
            "case": case.name,
            "impl": name,
            **base,
            "gflop": case.flops(batch) * (3 if pass_ == "fwd+bwd" else 1) / 1e9,
            **timing.stats_record(st, baselines=baselines),
            "peak_mem_bytes": timing.peak_memory_bytes(calls[name], device) if measure_memory else None,
        }
        if name == "compile":
            rec["compile_s"] = compile_s
        if name in checked:
            rec["max_error_vs_float64"] = checked[name][0]
        if hasattr(fwds[name], "held_bytes"):  # outside the peak above: kept between calls
            rec["held_bytes"] = fwds[name].held_bytes()
        records.append(rec)
    torch._dynamo.reset()
    return records


# ---- summary, targets, tables, chart ----


def _by_case(records: Sequence[dict], dtype: str, layout: str, pass_: str, model: str | None) -> dict[str, dict]:
    """case -> impl -> record, of the timed records (a row with a ``status`` was not timed)."""
    out: dict[str, dict] = {}
    for r in records:
        if "status" in r or (r["dtype"], r["layout"], r["pass"]) != (dtype, layout, pass_):
            continue
        if model is not None and model not in r["models"]:
            continue
        out.setdefault(r["case"], {})[r["impl"]] = r
    return out


def groups(records: Sequence[dict]) -> list[tuple[str, str, str]]:
    """The distinct (dtype, layout, pass) groups of timed records, in order of first appearance."""
    seen: dict[tuple[str, str, str], None] = {}
    for r in records:
        if "status" not in r:
            seen.setdefault((r["dtype"], r["layout"], r["pass"]), None)
    return list(seen)


def _impls_of(cases: dict[str, dict]) -> list[str]:
    """Every implementation timed on some case, in order of first appearance (a row left out of one case, as a wrong
    result is, still has its column)."""
    return list(dict.fromkeys(i for v in cases.values() for i in v))


def _per_round(num: dict, den: dict) -> list[float]:
    """``num time / den time`` in each round (the records' samples, taken in the same interleaved rounds)."""
    return [a / b for a, b in zip(num["samples_ms"], den["samples_ms"], strict=True)]


def _over_floor(case: dict, impl: str) -> float | None:
    """``impl``'s time over its floor's: the median of the per-round ratios (whose interval the verdict reads; the
    reciprocal of the floor's speedup median differs from it for an even number of rounds). None where either is
    missing."""
    floor = case.get(floor_of(impl))
    if impl not in case or floor is None or "samples_ms" not in floor:
        return None
    return statistics.median(_per_round(case[impl], floor))


FLOOR_FAILED = "not timed: its floor, conv_prepacked, gave a wrong result"


def wrong_results(records: Sequence[dict]) -> list[dict]:
    """The records of rows whose output failed the check before timing."""
    return [r for r in records if r.get("status", "").startswith("wrong result")]


def summarize(records: Sequence[dict], model: str | None = "resnet50") -> list[dict]:
    """Per (dtype, layout, pass, fused implementation or compile): geomean speedup over eager, worst shape, time over
    the floor with the same weight handling (:func:`floor_of`), memory."""
    out = []
    for dtype, layout, pass_ in groups(records):
        cases = _by_case(records, dtype, layout, pass_, model)
        if not cases:
            continue
        impls = [i for i in _impls_of(cases) if i not in ("eager", *FLOORS)]
        for impl in impls:
            floor = floor_of(impl)
            speedups = {c: v[impl]["speedup_vs_eager"]["median"] for c, v in cases.items() if impl in v}
            over_floor = {c: _over_floor(v, impl) for c, v in cases.items() if impl in v}
            timed = {c: v for c, v in cases.items() if impl in v}
            held = {c: v[impl]["held_bytes"] for c, v in timed.items() if "held_bytes" in v[impl]}
            mem = {
                c: (v[impl]["peak_mem_bytes"], v["eager"]["peak_mem_bytes"])
                for c, v in cases.items()
                if impl in v and v[impl].get("peak_mem_bytes") is not None
            }
            worst = min(speedups, key=speedups.get)
            out.append(
                {
                    "dtype": dtype,
                    "layout": layout,
                    "pass": pass_,
                    "impl": impl,
                    "model_shapes": model or "all",
                    "n_shapes": len(speedups),
                    "geomean_speedup_vs_eager": timing.geomean(list(speedups.values())),
                    "min_speedup_vs_eager": speedups[worst],
                    "min_speedup_case": worst,
                    "slower_than_eager": {c: s for c, s in speedups.items() if s < 1.0},
                    "floor": floor,
                    "geomean_over_floor": timing.geomean(list(over_floor.values())),
                    "max_over_floor": max(over_floor.values()),
                    "max_over_floor_case": max(over_floor, key=over_floor.get),
                    "mem_above_eager": {c: {"impl": a, "eager": b} for c, (a, b) in mem.items() if a > b},
                    # The intervals the verdicts read (see targets): per shape, and of the geomeans, bootstrapping
                    # each shape's rounds apart.
                    "rounds": min(len(v[impl]["samples_ms"]) for v in timed.values()),
                    "speedup_ci_vs_eager": {
                        c: [v[impl]["speedup_vs_eager"]["ci_lo"], v[impl]["speedup_vs_eager"]["ci_hi"]]
                        for c, v in timed.items()
                    },
                    "geomean_speedup_ci": list(
                        timing.geomean_median_ci([_per_round(v["eager"], v[impl]) for v in timed.values()])
                    ),
                    "geomean_over_floor_ci": list(
                        timing.geomean_median_ci([_per_round(v[impl], v[floor]) for v in timed.values()])
                    ),
                    **({"held_bytes": held} if held else {}),
                }
            )
    return out


FLOOR_GOAL = 1.03  # fused forward time over the conv alone, with the same weight handling
SHAPE_GOAL = 0.98  # no shape's speedup over eager below this
# pass -> (geomean speedup over eager that must be reached, or None; the aim)
GEOMEAN_GOALS = {"fwd": (None, 1.10), "fwd+bwd": (1.08, 1.15)}
TARGET_GROUP = ("fp32", "channels_last", "resnet50")  # (dtype, layout, model shapes) the targets are stated for


def _target_names(impl: str, pass_: str) -> dict[str, str]:
    """kind -> the line of each target of ``impl`` in ``pass_``."""
    goal, aim = GEOMEAN_GOALS[pass_]
    wanted = f">= {goal} (aim {aim})" if goal else f">= {aim} (aim)"
    label = f"{impl} {pass_}"
    names = {
        "geomean": f"{label}: geomean speedup over eager {wanted}",
        "shapes": f"{label}: no shape below {SHAPE_GOAL}x of eager",
    }
    if pass_ == "fwd":
        names["floor"] = f"{label}: geomean time / {floor_of(impl)} (same weight handling) <= {FLOOR_GOAL}"
    names["memory"] = f"{label}: peak memory never above eager's"
    return names


def _ci_text(value: float, ci: Sequence[float], rounds: int | None) -> str:
    return f"{value:.3f} (95% CI {ci[0]:.3f}-{ci[1]:.3f}, {rounds} rounds)"


def targets(
    summary: Sequence[dict], missing: dict[str, str] | None = None, passes: Sequence[str] = PASSES
) -> list[dict]:
    """The op-level targets of each fused implementation (CPU, fp32, channels_last, ResNet-50 shapes): met, missed,
    or undecided where the 95 % interval straddles the goal (:func:`timing.verdict`): a geomean's interval
    bootstraps each shape's rounds apart; "no shape below" is missed when some shape's whole interval is below,
    met when every shape's whole interval is above. ``missing`` (impl -> why) lists the rows that could not be
    measured: their targets in ``passes`` are listed as not measured."""
    out = []
    nan2 = [math.nan, math.nan]  # a summary written before the intervals: undecided
    for s in summary:
        if (s["dtype"], s["layout"], s["model_shapes"]) != TARGET_GROUP:
            continue
        if s["impl"] in BASE_IMPLS or s["impl"] in PEER_IMPLS or s["impl"] in (missing or {}):
            continue
        names = _target_names(s["impl"], s["pass"])
        goal, aim = GEOMEAN_GOALS[s["pass"]]
        rounds = s.get("rounds")
        ci = s.get("geomean_speedup_ci", nan2)
        out.append({"target": names["geomean"], "measured": _ci_text(s["geomean_speedup_vs_eager"], ci, rounds),
                    "met": timing.verdict(*ci, goal or aim, rounds)})  # fmt: skip
        shape = {c: timing.verdict(*ci, SHAPE_GOAL, rounds) for c, ci in s.get("speedup_ci_vs_eager", {}).items()}
        below = [c for c, v in shape.items() if v is False]
        unsure = [c for c, v in shape.items() if v is None]
        met = False if below else (None if unsure or not shape else True)
        out.append({"target": names["shapes"],
                    "measured": f"{len(below)} below, {len(unsure)} undecided ({len(s['slower_than_eager'])} slower, "
                                f"medians); worst {s['min_speedup_vs_eager']:.3f}x ({s['min_speedup_case']})",
                    "met": met})  # fmt: skip
        if "floor" in names:
            ci = s.get("geomean_over_floor_ci", nan2)
            out.append({"target": names["floor"],
                        "measured": _ci_text(s["geomean_over_floor"], ci, rounds)
                                    + f"; worst {s['max_over_floor']:.3f} ({s['max_over_floor_case']})",
                        "met": timing.verdict(*ci, FLOOR_GOAL, rounds, higher_is_better=False)})  # fmt: skip
        held = s.get("held_bytes", {})
        note = f" (plus up to {max(held.values()) / 2**20:.1f} MiB of packed weight held between calls)" if held else ""
        out.append({"target": names["memory"],
                    "measured": f"{len(s['mem_above_eager'])} of {s['n_shapes']} shapes above eager{note}",
                    "met": not s["mem_above_eager"]})  # fmt: skip
    for impl, why in (missing or {}).items():
        for pass_ in passes:
            if pass_ == "fwd" or impl not in PREPACKED_IMPLS:  # the prepacked rows are forward only
                out += [timing.not_measured(name, why) for name in _target_names(impl, pass_).values()]
    return out


def _fmt_ms(rec: dict | None) -> str:
    return "-" if rec is None else f"{rec['median_ms']:.3f}"


def _fmt_ratio(rec: dict | None, key: str) -> str:
    if rec is None or key not in rec:
        return "-"
    r = rec[key]
    return f"{r['median']:.2f} ({r['p25']:.2f}-{r['p75']:.2f})"


def table_markdown(records: Sequence[dict]) -> str:
    """One markdown table per (dtype, layout, pass): times, speedups over eager, time over the floor and memory."""
    lines = []
    for dtype, layout, pass_ in groups(records):
        cases = _by_case(records, dtype, layout, pass_, None)
        impls = _impls_of(cases)
        timed = backend_impls(impls)
        batch = next(iter(next(iter(cases.values())).values()))["batch"]
        lines.append(
            f"\n**{pass_}, {dtype}, {layout}, batch {batch}** "
            "(median ms; speedup = eager/impl per round, median (p25-p75); impl / floor = time over the conv alone "
            "with the same weight handling, per-round median)\n"
        )
        head = ["shape", *[f"{i} ms" for i in impls]]
        head += [f"{i} speedup" for i in timed + (["compile"] if "compile" in impls else [])]
        head += [f"{i} / {floor_of(i)}" for i in timed] + [f"{i} mem / eager" for i in timed]
        if "compile" in impls:
            head.append("compile s")
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for case, v in cases.items():
            row = [f"`{case}`", *[_fmt_ms(v.get(i)) for i in impls]]
            row += [
                _fmt_ratio(v.get(i), "speedup_vs_eager") for i in timed + (["compile"] if "compile" in impls else [])
            ]
            for i in timed:
                r = _over_floor(v, i)
                row.append(f"{r:.2f}" if r is not None else "-")
            for i in timed:
                a, b = v.get(i, {}).get("peak_mem_bytes"), v["eager"].get("peak_mem_bytes")
                row.append(f"{a / b:.2f}" if a is not None and b else "-")
            if "compile" in impls:
                cs = v.get("compile", {}).get("compile_s")
                row.append(f"{cs:.1f}" if cs is not None else "-")
            lines.append("| " + " | ".join(row) + " |")
        held = {i: [r["held_bytes"] for v in cases.values() if "held_bytes" in (r := v.get(i, {}))] for i in timed}
        held = {i: b for i, b in held.items() if b}
        if held:
            sizes = ", ".join(f"{i} {min(b) / 2**20:.2f}-{max(b) / 2**20:.2f} MiB" for i, b in held.items())
            lines.append(
                f"\nNot in `mem / eager`: the packed weight each prepacked row holds between calls ({sizes} per shape; "
                "`held_bytes` in the JSON), while eager's peak includes the weight reorder oneDNN makes in every call."
            )
    return "\n".join(lines).lstrip("\n") + "\n"


def summary_text(summary: Sequence[dict], target_list: Sequence[dict], not_timed: Sequence[str] = ()) -> str:
    """Plain-text lines of the summary, the rows not timed and why, and the target checks."""
    lines = []
    for s in summary:
        lines.append(
            f"{s['pass']:8s} {s['dtype']} {s['layout']:13s} {s['impl']:12s} over {s['n_shapes']} {s['model_shapes']} "
            f"shapes: geomean speedup vs eager {s['geomean_speedup_vs_eager']:.3f}x, worst "
            f"{s['min_speedup_vs_eager']:.3f}x ({s['min_speedup_case']}), geomean time / {s['floor']} "
            f"{s['geomean_over_floor']:.3f}, {len(s['slower_than_eager'])} slower than eager, "
            f"{len(s['mem_above_eager'])} above eager's peak memory"
        )
    lines += [f"not timed: {why}" for why in not_timed]
    if target_list:
        lines.append("targets (CPU, fp32, channels_last, ResNet-50 shapes):")
        for t in target_list:
            lines.append(f"  [{timing.verdict_label(t)}] {t['target']}: {t['measured']}")
    return "\n".join(lines)


def plot(records: Sequence[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Bar chart of speedup over eager per shape (median, p25-p75 whiskers), one panel per (pass, dtype, layout),
    with the floors (eager / conv alone, and eager / prepacked conv where measured) drawn as ticks: no fused op with
    that weight handling can reach above its floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grp = groups(records)
    n_cases = max(len(_by_case(records, *g, None)) for g in grp)
    fig, axes = plt.subplots(len(grp), 1, figsize=(max(8, 0.55 * n_cases + 2), 4.2 * len(grp)), squeeze=False)
    for ax, (dtype, layout, pass_) in zip(axes[:, 0], grp, strict=True):
        cases = _by_case(records, dtype, layout, pass_, None)
        names = list(cases)
        impls = [i for i in _impls_of(cases) if i not in ("eager", *FLOORS)]
        width = 0.8 / max(1, len(impls))
        for j, impl in enumerate(impls):
            xs, ys, lo, hi = [], [], [], []
            for i, c in enumerate(names):
                rec = cases[c].get(impl)
                if rec is None:
                    continue
                r = rec["speedup_vs_eager"]
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(r["median"])
                lo.append(max(0.0, r["median"] - r["p25"]))
                hi.append(max(0.0, r["p75"] - r["median"]))
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=impl)
        for floor, color, label in (
            ("conv_alone", "k", "conv alone (floor time = speedup ceiling)"),
            ("conv_prepacked", "tab:red", "prepacked conv alone (floor of the prepacked rows)"),
        ):
            with_floor = [i for i, c in enumerate(names) if floor in cases[c]]
            if with_floor:
                ys = [cases[names[i]][floor]["speedup_vs_eager"]["median"] for i in with_floor]
                ax.hlines(ys, [i - 0.45 for i in with_floor], [i + 0.45 for i in with_floor], colors=color,
                          linewidth=2, label=label)  # fmt: skip
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="eager")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=75, ha="right", fontsize=7)
        ax.set_ylabel("speedup over eager (x)")
        batch = next(iter(cases[names[0]].values()))["batch"]
        ax.set_title(f"{pass_}, {dtype}, {layout}, batch {batch}", fontsize=10)
        ax.legend(fontsize=7, ncol=len(impls) + 3, loc="upper left")
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- driver ----


def run(
    *,
    models: Sequence[str] = ("resnet50",),
    hw: int = 224,
    batch: int = 8,
    dtypes: Sequence[str] = ("fp32",),
    layouts: Sequence[str] = ("channels_last",),
    passes: Sequence[str] = PASSES,
    backends: Sequence[str] | None = None,
    with_compile: bool = True,
    rounds: int = 10,
    warmup: int = 2,
    min_sample_ms: float = 20.0,
    threads: int | None = None,
    max_cases: int | None = None,
    only: Sequence[str] = (),
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Run the op benchmark; return the payload (``machine``, ``config``, ``records``, ``summary``, ``targets``)."""
    dev, machine = timing.start(device, threads)
    _configure_dynamo()
    traced = trace_conv_cases(models, hw)
    cases = [c for c in traced if not only or any(o in c.name for o in only)][:max_cases]
    timed = timed_backends(dev, backends)
    work = [(c, d, lay, p) for d in dtypes for lay in layouts for p in passes for c in cases]
    records: list[dict] = []
    t0 = time.perf_counter()
    bar = timing.progress(work, desc="ops", unit="case", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for case, dtype_name, layout, pass_ in bar:
        bar.set_postfix_str(f"{pass_} {dtype_name} {layout} {case.name}", refresh=False)
        records += run_case(
            case,
            batch=batch,
            dtype_name=dtype_name,
            layout=layout,
            pass_=pass_,
            backends=timed,
            with_compile=with_compile,
            device=dev,
            rounds=rounds,
            warmup=warmup,
            min_sample_ms=min_sample_ms,
        )
    not_timed = [
        f"the prepacked rows in {d}: {why}"
        for d in dtypes
        if "fwd" in passes and (why := prepack_unsupported(dev, DTYPES[d]))
    ]
    # Rows this run meant to time but could not: listed, and their targets reported as not measured.
    unavailable = {
        row.name: f"not available: {row.unavailable()}"
        for row in BACKENDS
        if dev.type in row.auto_devices and row.unavailable() and (backends is None or row.name in backends)
    }
    if "fwd" in passes and "fp32" in dtypes:
        why = prepack_unsupported(dev, torch.float32) or package_prepack_unavailable()
        unavailable.update({name: f"not available: {why}" for name in PACKAGE_PREPACKED if why})
    not_timed += [f"{name}: {why}" for name, why in unavailable.items()]
    if not with_compile:
        not_timed.append("compile: skipped (--no-compile)")
    config = timing.config_record(
        t0, models=models, input_hw=hw, batch=batch, dtypes=dtypes, layouts=layouts, passes=passes, backends=timed,
        compile=with_compile, rounds=rounds, warmup=warmup, min_sample_ms=min_sample_ms, n_cases=len(cases),
        only=list(only), max_cases=max_cases,
    )  # fmt: skip
    payload = {
        "benchmark": "ops",
        "machine": machine,
        "config": config,
        "records": records,
        "not_timed": not_timed,
        "unavailable": unavailable,
        # The targets hold for every ResNet-50 shape: a subset (--only, --max-cases) gets no verdict.
        "targets_apply": timing.targets_apply(dev, batch, hw) and len(cases) == len(traced),
    }
    return analyze(payload)


def analyze(payload: dict) -> dict:
    """``payload`` with its ``summary``, ``targets`` and wrong-result lines (in ``not_timed``) computed from its
    records and config: what :func:`run` returns, and how a saved ops.json is rendered again."""
    records, config = payload["records"], payload["config"]
    models = config["models"]
    summary = summarize(records, "resnet50") if "resnet50" in models else []
    if list(models) != ["resnet50"]:
        summary += summarize(records, None)
    wrong = wrong_results(records)
    not_timed = [line for line in payload.get("not_timed", []) if not line.startswith("WRONG RESULT")]
    not_timed += [f"WRONG RESULT, {r['impl']} {r['pass']} {r['dtype']} {r['layout']} {r['case']}: {r['status']}"
                  for r in wrong]  # fmt: skip
    dtype, layout, model = TARGET_GROUP
    # A row with a wrong result on some shape is left out of the targets, which list it as not measured.
    missing = {}
    for r in wrong:
        if (r["dtype"], r["layout"]) == (dtype, layout) and model in r["models"]:
            why = f"wrong result on {sum(w['impl'] == r['impl'] for w in wrong)} shape(s)"
            if r["impl"] in FLOORS:  # a floor has no targets of its own: those of the rows read against it
                missing.update(
                    {i: f"{r['impl']} (their floor): {why}" for i in PREPACKED_IMPLS if floor_of(i) == r["impl"]}
                )
            else:
                missing[r["impl"]] = why
    if dtype in config["dtypes"] and layout in config["layouts"] and model in models:
        missing = {**payload.get("unavailable", {}), **missing}
    else:
        missing = {}
    # Files written before targets_apply was recorded had targets exactly when they applied.
    applies = payload.get("targets_apply", bool(payload.get("targets")))
    return {
        **payload,
        "summary": summary,
        "not_timed": not_timed,
        "targets": targets(summary, missing, config["passes"]) if applies else [],
    }


def write_outputs(payload: dict, json_path: str | os.PathLike | None, png_path: str | os.PathLike | None,
                  md_path: str | os.PathLike | None) -> list[Path]:  # fmt: skip
    """Write the JSON, PNG and markdown table of a :func:`run` payload; returns the paths written. Without matplotlib
    (optional) the PNG is not written, and a line says so."""
    written = []
    if json_path:
        written.append(timing.write_json(json_path, payload))
    if png_path and payload["records"]:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(f"not written: {png_path}: matplotlib not installed")
        else:
            m = payload["machine"]
            title = f"resnet_fused ops on {m['cpu_model']} ({m['threads']} threads), torch {m['torch']}"
            written.append(plot(payload["records"], png_path, title))
    if md_path:
        text = (
            table_markdown(payload["records"])
            + f"\n```\n{summary_text(payload['summary'], payload['targets'], payload['not_timed'])}\n```\n"
        )
        written.append(timing.write_text(md_path, text))
    return written


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Options shared by the op and model scripts."""
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--hw", type=int, default=224, help="input resolution the shapes are traced at")
    parser.add_argument("--dtypes", default="fp32", help=f"comma list of {','.join(DTYPES)}")
    parser.add_argument("--layouts", default="channels_last", help=f"comma list of {','.join(LAYOUTS)}")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--min-sample-ms", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all usable CPUs)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        timing.DEFAULT_MALLOC_FLAG, action="store_true",
        help="keep glibc's default heap trimming (by default the run re-executes with freed blocks kept on the heap)",
    )  # fmt: skip


def _split(s: str) -> list[str]:
    return [p for p in s.split(",") if p]


def check_lists(parser: argparse.ArgumentParser, lists: Sequence[tuple[str, str, Sequence[str]]]) -> None:
    """Exit with a usage error naming the option if a comma list ``(option, value, valid names)`` has a typo."""
    for name, values, valid in lists:
        bad = [v for v in _split(values) if v not in valid]
        if bad:
            parser.error(f"--{name}: unknown {bad}; expected some of {list(valid)}")


def resnet_names() -> list[str]:
    """The torchvision models built from ResNet blocks (resnet18 ... resnet152, wide_resnet*, resnext*)."""
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    return [n for n in names if torchvision.models.get_model_builder(n).__module__ == "torchvision.models.resnet"]


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m benchmarks.bench_ops [--json PATH] ...``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet18,resnet50")
    parser.add_argument("--passes", default="fwd,fwd+bwd")
    parser.add_argument("--backends", default=None, help="comma list of backends to time (default: all)")
    parser.add_argument("--max-cases", type=int, default=None, help="only the first N distinct convs")
    parser.add_argument("--only", default="", help="comma list of substrings of case names, e.g. '1x1 64->256'")
    parser.add_argument("--json", default=str(OUT_DIR / "ops.json"))
    parser.add_argument("--png", default=str(OUT_DIR / "ops.png"))
    parser.add_argument("--md", default=str(OUT_DIR / "ops.md"))
    add_common_args(parser)
    a = parser.parse_args(argv)
    check_lists(
        parser,
        [
            ("models", a.models, resnet_names()),
            ("dtypes", a.dtypes, DTYPES),
            ("layouts", a.layouts, LAYOUTS),
            ("passes", a.passes, PASSES),
        ],
    )
    if a.backends:
        try:
            timed_backends(timing.run_device(a.device), _split(a.backends))
        except ValueError as e:
            parser.error(f"--{e}")
    payload = run(
        models=_split(a.models),
        hw=a.hw,
        batch=a.batch,
        dtypes=_split(a.dtypes),
        layouts=_split(a.layouts),
        passes=_split(a.passes),
        backends=_split(a.backends) if a.backends else None,
        with_compile=not a.no_compile,
        rounds=a.rounds,
        warmup=a.warmup,
        min_sample_ms=a.min_sample_ms,
        threads=a.threads,
        max_cases=a.max_cases,
        only=[o for o in a.only.split(",") if o],
        device=a.device,
        progress=not a.no_progress,
    )
    print(table_markdown(payload["records"]))
    print(summary_text(payload["summary"], payload["targets"], payload["not_timed"]))
    for p in write_outputs(payload, a.json, a.png, a.md):
        print(f"wrote {p}")
    if wrong_results(payload["records"]):
        print("WRONG RESULTS: see the lines above; those rows were not timed.")
        return 1
    return 0


if __name__ == "__main__":
    timing.steady_heap("benchmarks.bench_ops")
    raise SystemExit(main())
