"""Model-level benchmark: whole ResNets, inference and a training step, fused against unfused.

- **Inference** (``mode="inference"``), under ``torch.no_grad()``, at batch 1 and the training batch, each variant
  checked against eager's output before it is timed: ``max |y - eager| / max(max |eager|, 1)`` within
  :data:`OUTPUT_TOL` of the dtype, and finite (``max_abs_diff_vs_eager`` in the record). A variant that fails gets
  the status "wrong result", is not timed, is left out of the targets (listed as not measured), and makes the script
  exit with status 1:

  - ``eager``: torchvision ``resnet18``/``resnet50`` in eval mode;
  - ``fused``: the same model through ``resnet_fused.convert.convert`` (BatchNorm folded, blocks and stem fused);
  - ``prepared``: ``fused`` through ``resnet_fused.inference.optimize_for_inference`` (weights prepacked for oneDNN);
    where this install has no such function, the row says "not available";
  - ``prepared-fuse-relu``: the same with ``fuse_relu=True`` (ReLU inside oneDNN: NaN pre-activations become 0, as
    under Inductor freezing; ONNX Runtime keeps them, as ``torch.relu`` does);
  - ``compile``: ``torch.compile`` of the original;
  - ``compile-freezing``: the same with Inductor freezing (weights folded as constants and prepacked), compiled
    under ``torch.no_grad()``; compile times are reported apart;
  - ``fused-compile-freezing``: ``fused`` compiled the same way, what a user who compiles a converted model gets
    (Inductor compiles the fused op from its aten decomposition, :mod:`resnet_fused.inductor`);
  - ``ort``: ONNX Runtime's CPU execution provider (fp32; intra-op threads = the benchmark's, one inter-op thread,
    other session options default), on the original
    model exported by ``torch.onnx.export`` (export and session set-up time reported apart). Without onnxruntime,
    the row says "not installed"; its memory is not measured (it allocates outside torch's allocator).

  A variant that cannot run has a row saying why ("not installed", "not available", "skipped", e.g. the compiled
  ones under ``--no-compile``), and the targets that need it are listed as not measured.
- **Training** (``mode="train"``), one SGD step (forward, cross-entropy, backward, optimizer step):
  - ``bn-free``: a BN-free ResNet built from ``resnet_fused.nn`` blocks (convs with biases; the last conv of each
    block scaled down so activations stay bounded), ``fused``, against the same weights in torchvision's own blocks
    over ``nn.Conv2d`` with biases (``unfused``, :func:`eager_twin`: in-place add and ReLU, as torchvision writes it);
  - ``frozen-bn``: torchvision's ResNet with ``FrozenBatchNorm2d`` (a detection backbone's setting), ``unfused``
    as torchvision runs it against ``fused``, its conversion (the frozen norm becomes the epilogue's scale/shift).

Timing, ratios and peak memory as described in :mod:`benchmarks.timing`: every variant of a run is timed interleaved
in one process; the reported memory is an allocator peak during one call (on CPU, torch's CPU allocator), not RSS;
the output states the method.

    python -m benchmarks.bench_model --models resnet50 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks import timing
from benchmarks.bench_ops import DTYPES, LAYOUTS, OUT_DIR, _split, add_common_args, check_lists, packed_bytes
from benchmarks.equivalence import REF_FACTOR

ARCHS = {
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
}
MODES = ("inference", "train")
# The fields that name the rounds a record was timed in: records agreeing on them were timed together.
ROUND_KEYS = ("model", "mode", "variant", "dtype", "layout", "batch", "input_hw")
COMPILED_IMPLS = ("compile", "compile-freezing", "fused-compile-freezing")  # skipped under --no-compile
INFERENCE_IMPLS = ("eager", "fused", "prepared", "prepared-fuse-relu", *COMPILED_IMPLS, "ort")
INFERENCE_BASELINES = ("eager", "compile", "compile-freezing", "ort")  # ratios of every variant against these
# Variants whose memory torch's CPU allocator does not see, so the allocator peak would read near zero.
OUTSIDE_ALLOCATOR = {"ort": "not measured: ONNX Runtime allocates from its own arena, outside torch's allocator"}
TRAIN_VARIANTS = ("bn-free", "frozen-bn")
# ONNX Runtime's intra-op threads spin on after a call (its default, kept) and slow whatever runs next on two cores:
# `python -m benchmarks.diagnose after-ort` gave 68.5 ms for a resnet50 eager forward at batch 1 right after one, 46.9 ms
# 20 ms later, 34.3-35.0 ms from 50 ms on (36.6 ms alone; benchmarks/results/diagnose/after-ort.txt).
# So a sample after one of ONNX Runtime's waits this long first; and every inference sample follows an untimed call
# of its own variant, so that each is timed warm, whatever ran before it.
ORT_SETTLE_MS = 100.0
CLASSES = 1000
# Largest max |y - eager| / max(max |eager|, 1) of a variant's logits, by dtype. Measured (resnet18/50, 32x32 and
# 224x224, batch 1): fp32 about 2e-6 (folded norms, other conv algorithms), bf16 up to 1.6e-2 (roundings over ~50
# layers); a variant off by a factor, or NaN, is far outside.
OUTPUT_TOL = {"fp64": 1e-9, "fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
# In these, eager's own rounding is large (bf16 resnet50: 8.7e-3 of float64's logits): each variant is also held to
# REF_FACTOR x eager's error against a float64 run of the same model (measured: fused and prepared rows 0.6-0.8x).
CHECKED_VS_FLOAT64 = (torch.float16, torch.bfloat16)


def bn_free_resnet(arch: str, num_classes: int = CLASSES) -> nn.Module:
    """torchvision's ResNet layout built from BN-free ``resnet_fused.nn`` blocks (``norm_layer=nn.Identity``: convs
    with biases, no norm) and a fused stem."""
    from resnet_fused.nn import BasicBlock, Bottleneck, FusedConv2d, projection

    kind, layers = ARCHS[arch]
    block = BasicBlock if kind == "basic" else Bottleneck
    stages: list[nn.Module] = []
    inplanes = 64
    for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
        stride = 1 if i == 0 else 2
        out = planes * block.expansion
        down = projection(inplanes, out, stride, nn.Identity) if stride != 1 or inplanes != out else None
        blocks = [block(inplanes, planes, stride, down, norm_layer=nn.Identity)]
        blocks += [block(out, planes, norm_layer=nn.Identity) for _ in range(n - 1)]
        stages.append(nn.Sequential(*blocks))
        inplanes = out
    model = nn.Sequential(
        FusedConv2d(3, 64, 7, stride=2, padding=3, relu=True),
        nn.MaxPool2d(3, 2, 1),
        *stages,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(inplanes, num_classes),
    )
    with torch.no_grad():  # keep the residual stream bounded without a norm (SkipInit-like damping)
        for m in model.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):
                last = m.conv3 if isinstance(m, Bottleneck) else m.conv2
                last.weight.mul_(0.2)
    return model


def eager_twin(model: nn.Module) -> nn.Module:
    """A copy of a BN-free ``bn_free_resnet`` model in plain torch as torchvision writes it, the eager baseline at its
    best: each fused block becomes torchvision's own block (``norm_layer=nn.Identity``, in-place ``out += identity``
    and ReLU) over ``nn.Conv2d`` layers with the same weights and biases, the fused stem ``nn.Conv2d`` then an in-place
    ``nn.ReLU``. Same parameters, same function."""
    import torchvision.models.resnet as tv

    from resnet_fused.nn import BasicBlock, FusedConv2d

    def plain(f: FusedConv2d) -> nn.Conv2d:
        conv = nn.Conv2d(
            f.in_channels, f.out_channels, f.kernel_size, f.stride, f.padding, f.dilation, f.groups,
            bias=f.bias is not None, padding_mode=f.padding_mode,
        )  # fmt: skip
        conv.weight, conv.bias = f.weight, f.bias
        return conv

    def block(b: nn.Module) -> nn.Module:
        kind, n = (tv.BasicBlock, 2) if isinstance(b, BasicBlock) else (tv.Bottleneck, 3)
        twin = kind.__new__(kind)
        nn.Module.__init__(twin)
        for i in range(1, n + 1):
            setattr(twin, f"conv{i}", plain(getattr(b, f"conv{i}")))
            setattr(twin, f"bn{i}", nn.Identity())
        twin.relu = nn.ReLU(inplace=True)
        twin.downsample = None if b.downsample is None else nn.Sequential(plain(b.downsample[0]), nn.Identity())
        twin.stride = b.stride
        return twin

    model = copy.deepcopy(model)
    layers = []
    for m in model:
        if isinstance(m, FusedConv2d):  # the stem
            layers += [plain(m), nn.ReLU(inplace=True)] if m.relu else [plain(m)]
        elif isinstance(m, nn.Sequential):
            layers.append(nn.Sequential(*(block(b) for b in m)))
        else:
            layers.append(m)
    return nn.Sequential(*layers).train(model.training)


def _prepare(model: nn.Module, dtype: torch.dtype, fmt: torch.memory_format, device: torch.device) -> nn.Module:
    return model.to(device=device, dtype=dtype, memory_format=fmt)


@dataclass
class InferenceSetup:
    """The inference variants of one (model, dtype, layout, batch) run.

    Attributes:
        impls: name -> zero-argument callable running one forward pass under ``torch.no_grad()``.
        setup: name -> one-off costs and facts (``compile_s``, ``export_s``, ``exporter``, ...), merged into the record.
        skipped: name -> why that variant has no timing ("not installed: ...", "skipped: ...").
        held: name -> bytes the variant keeps between calls (packed weights), outside any call's peak.
        float64: the original model's output in float64 on x, for the dtypes of ``CHECKED_VS_FLOAT64``; else None.
    """

    impls: dict[str, Callable[[], object]] = field(default_factory=dict)
    setup: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    held: dict[str, Callable[[], int]] = field(default_factory=dict)
    float64: Tensor | None = None


def _no_grad(fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return fn()

    return run


def optimize_for_inference_hook() -> Callable[[nn.Module], nn.Module] | None:
    """The package's ``resnet_fused.inference.optimize_for_inference``, or None where this install has none (then the
    ``prepared`` row says so)."""
    try:
        from resnet_fused.inference import optimize_for_inference
    except ImportError:
        return None
    return optimize_for_inference


def export_onnx(model: nn.Module, x: Tensor) -> tuple[bytes, str]:
    """``model`` as a serialized ONNX model for inputs shaped like ``x`` (static shapes), and the exporter used.

    torch's dynamo-based exporter (the default and maintained one) first; the TorchScript exporter where it fails.
    """
    model = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    x = x.detach().contiguous()
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
        return program.model_proto.SerializeToString(), "dynamo"
    except Exception as dynamo_error:  # any exporter failure: the older exporter still gives a comparable model
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), buf, dynamo=False, input_names=["x"], output_names=["y"])
        return buf.getvalue(), f"torchscript (dynamo exporter failed: {type(dynamo_error).__name__})"


def ort_impl(model: nn.Module, x: Tensor, threads: int) -> tuple[Callable[[], object], dict]:
    """ONNX Runtime (CPU execution provider, ``threads`` intra-op threads) on ``model`` exported to ONNX, fed
    ``x`` as a float32 NCHW array made once; and its setup facts. Raises ImportError without onnxruntime."""
    import onnxruntime as ort

    t0 = time.perf_counter()
    onnx_bytes, exporter = export_onnx(model, x)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.detach().contiguous().numpy()}
    session.run(None, feed)
    facts = {"export_s": time.perf_counter() - t0, "exporter": exporter, "onnxruntime": ort.__version__}
    return lambda: torch.from_numpy(session.run(None, feed)[0]), facts


def inference_impls(
    arch: str,
    dtype: torch.dtype,
    fmt: torch.memory_format,
    device: torch.device,
    with_compile: bool,
    x: Tensor,
    threads: int,
    with_ort: bool = True,
) -> InferenceSetup:
    """Every inference variant of torchvision's ``arch`` on input ``x``: ``eager``, ``fused`` (converted),
    ``prepared`` (converted, then ``optimize_for_inference``), ``compile``, ``compile-freezing``,
    ``fused-compile-freezing`` and ``ort``."""
    import torchvision

    from resnet_fused.convert import convert

    torch.manual_seed(0)
    original = getattr(torchvision.models, arch)().eval()
    _randomize_bn(original)
    converted, _ = convert(original)
    out = InferenceSetup()
    if dtype in CHECKED_VS_FLOAT64:
        with torch.no_grad():  # x holds the low-precision input: the reference sees the same rounded values
            out.float64 = _prepare(copy.deepcopy(original), torch.float64, fmt, device)(x.double())
    eager = _prepare(original, dtype, fmt, device)
    fused = _prepare(converted.eval(), dtype, fmt, device)
    out.impls = {"eager": lambda: eager(x), "fused": lambda: fused(x)}

    optimize = optimize_for_inference_hook()
    if optimize is None:
        for name in ("prepared", "prepared-fuse-relu"):
            out.skipped[name] = "not available: this install has no resnet_fused.inference.optimize_for_inference"
    else:
        for name, fuse_relu in (("prepared", False), ("prepared-fuse-relu", True)):
            model = optimize(copy.deepcopy(fused), fuse_relu=fuse_relu)
            out.impls[name] = functools.partial(model, x)
            out.held[name] = functools.partial(packed_bytes, model)

    if not with_compile:
        out.skipped.update({name: "skipped: --no-compile" for name in COMPILED_IMPLS})
    else:
        compiled = torch.compile(eager)
        # A copy, and the option given to torch.compile itself: dynamo serves a graph it already compiled for the same
        # code and backend, so the frozen variant would otherwise run the plain compile's graph, unfrozen.
        frozen = torch.compile(copy.deepcopy(eager), options={"freezing": True})
        fused_frozen = torch.compile(copy.deepcopy(fused), options={"freezing": True})
        variants = (("compile", compiled), ("compile-freezing", frozen), ("fused-compile-freezing", fused_frozen))
        for name, fn in variants:
            with torch.no_grad(), torch._inductor.config.patch(freezing=name != "compile"):
                t0 = time.perf_counter()
                fn(x)
                timing.synchronize(device)
                out.setup[name] = {"compile_s": time.perf_counter() - t0}
            out.impls[name] = lambda fn=fn: fn(x)

    if not with_ort:
        out.skipped["ort"] = "skipped: --no-ort"
    elif device.type != "cpu" or dtype != torch.float32:
        out.skipped["ort"] = "skipped: measured for CPU fp32 only (ONNX Runtime's CPU execution provider)"
    else:
        try:
            out.impls["ort"], out.setup["ort"] = ort_impl(eager, x, threads)
        except ImportError as e:
            out.skipped["ort"] = f"not installed: {e}"
        except Exception as e:  # a failed export or session is reported in its row; the other variants still run
            out.skipped["ort"] = f"failed: {type(e).__name__}: {e}"
    out.impls = {k: _no_grad(v) for k, v in out.impls.items()}
    return out


def max_abs_diff(y: object, ref: Tensor) -> float:
    """max |y - ref| in float64, ``y`` a model's output (a tensor, or ONNX Runtime's); NaN where either has one."""
    return (torch.as_tensor(y).double().cpu() - ref.double().cpu()).abs().max().item()


def check_output(y: object, ref: Tensor, dtype_name: str) -> tuple[float, str]:
    """(max |y - ref|, "" or why ``y`` is a wrong result): ``max |y - ref| / max(max |ref|, 1)`` above
    ``OUTPUT_TOL[dtype_name]``, a NaN or inf, or another shape."""
    y = torch.as_tensor(y).detach().double().cpu()
    ref = ref.detach().double().cpu()
    if y.shape != ref.shape:
        return math.nan, f"wrong result: output shape {tuple(y.shape)}, eager's {tuple(ref.shape)}"
    diff = (y - ref).abs().max().item()
    if not (torch.isfinite(y).all() and torch.isfinite(ref).all()):
        return diff, "wrong result: a NaN or inf in the output (or in eager's)"
    err = diff / max(ref.abs().max().item(), 1.0)
    if err > OUTPUT_TOL[dtype_name]:
        return diff, (
            f"wrong result: max |y - eager| / max(max |eager|, 1) = {err:.2e}, tolerance {OUTPUT_TOL[dtype_name]:.0e}"
        )
    return diff, ""


def check_vs_float64(y: object, eager: object, float64: Tensor) -> str:
    """ "" or why ``y`` is a wrong result: its error against the float64 run above ``REF_FACTOR`` x eager's own, both
    as max |. - float64| / max(max |float64|, 1)."""
    ref = float64.detach().double().cpu()
    scale = max(ref.abs().max().item(), 1.0)
    err, eager_err = ((torch.as_tensor(t).detach().double().cpu() - ref).abs().max().item() / scale for t in (y, eager))
    if not err <= REF_FACTOR * eager_err:
        return f"wrong result: error {err:.2e} against float64, above {REF_FACTOR:g} x eager's {eager_err:.2e}"
    return ""


def wrong_results(records: Sequence[dict]) -> list[dict]:
    """The records of variants whose output failed the check against eager's."""
    return [r for r in records if r.get("status", "").startswith("wrong result")]


def _randomize_bn(model: nn.Module) -> None:
    """Non-trivial running statistics and affine parameters, so folding does real work (fixed seed)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) or type(m).__name__ == "FrozenBatchNorm2d":
                c = m.running_mean.numel()
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)


def train_impls(
    arch: str, variant: str, dtype: torch.dtype, fmt: torch.memory_format, device: torch.device, x: Tensor, y: Tensor
) -> dict[str, Callable[[], object]]:
    """fused / unfused train-step callables of one variant (``bn-free`` or ``frozen-bn``)."""

    torch.manual_seed(0)
    if variant == "bn-free":
        fused = bn_free_resnet(arch)
        unfused = eager_twin(fused)
    elif variant == "frozen-bn":
        import torchvision
        from torchvision.ops import FrozenBatchNorm2d

        from resnet_fused.convert import convert

        unfused = getattr(torchvision.models, arch)(norm_layer=FrozenBatchNorm2d)
        _randomize_bn(unfused)
        fused, _ = convert(unfused)
    else:
        raise ValueError(f"variant: expected one of {TRAIN_VARIANTS}, got {variant!r}")
    models = {
        "fused": _prepare(fused.train(), dtype, fmt, device),
        "unfused": _prepare(unfused.train(), dtype, fmt, device),
    }

    def make_step(model: nn.Module) -> Callable[[], object]:
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            opt.step()

        # Before a memory measurement: free the last step's gradients, which this step's zero_grad would free inside
        # it. Then the measured peak is the step's own: on CUDA the baseline no longer counts them (the peak came out
        # low by their size), and on CPU it does not rest on which of their frees the profiler reports.
        step.before_memory_trace = lambda: opt.zero_grad(set_to_none=True)  # type: ignore[attr-defined]
        return step

    return {name: make_step(m) for name, m in models.items()}


def run(
    *,
    models: Sequence[str] = ("resnet50",),
    modes: Sequence[str] = MODES,
    train_variants: Sequence[str] = TRAIN_VARIANTS,
    hw: int = 224,
    batch: int = 8,
    inference_batches: Sequence[int] | None = None,
    dtypes: Sequence[str] = ("fp32",),
    layouts: Sequence[str] = ("channels_last",),
    with_compile: bool = True,
    with_ort: bool = True,
    rounds: int = 10,
    train_rounds: int | None = None,
    warmup: int = 2,
    min_sample_ms: float = 20.0,
    threads: int | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Run the model benchmark and return the JSON payload: ``machine``, ``config``, ``records``, ``targets``.

    Training steps run at ``batch``; inference at each of ``inference_batches`` (default: 1 and ``batch``).
    ``train_rounds`` (default ``rounds``) times the train steps, whose per-round ratios scatter most.
    """
    dev, machine = timing.start(device, threads)
    inference_batches = default_inference_batches(batch) if inference_batches is None else list(inference_batches)
    work = []
    for arch in models:
        for d in dtypes:
            for lay in layouts:
                if "inference" in modes:
                    work += [(arch, d, lay, "inference", "eval-bn", b) for b in inference_batches]
                if "train" in modes:
                    work += [(arch, d, lay, "train", v, batch) for v in train_variants]
    records: list[dict] = []
    t0 = time.perf_counter()
    bar = timing.progress(work, desc="models", unit="run", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for arch, dtype_name, layout, mode, variant, n in bar:
        bar.set_postfix_str(f"{arch} {mode} {variant} {dtype_name} {layout} batch {n}", refresh=False)
        dtype, fmt = DTYPES[dtype_name], LAYOUTS[layout]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 3, hw, hw, generator=g).to(device=dev, dtype=dtype).contiguous(memory_format=fmt)
        base = {"model": arch, "mode": mode, "variant": variant, "dtype": dtype_name, "layout": layout, "batch": n,
                "input_hw": hw}  # fmt: skip
        setup: dict[str, dict] = {}
        diffs: dict[str, float] = {}
        held: dict[str, Callable[[], int]] = {}
        if mode == "inference":
            torch._dynamo.reset()
            inf = inference_impls(arch, dtype, fmt, dev, with_compile, x, machine["threads"], with_ort)
            impls, setup, held = inf.impls, inf.setup, inf.held
            records += [{**base, "impl": name, "status": why} for name, why in inf.skipped.items()]
            # Every variant must compute the same function: a wrong one is not timed, and fails the run.
            ref = impls["eager"]()
            for name, fn in list(impls.items()):
                y_name = fn()
                diffs[name], why = check_output(y_name, ref, dtype_name)
                if not why and inf.float64 is not None:
                    why = check_vs_float64(y_name, ref, inf.float64)
                if why:
                    records.append({**base, "impl": name, "status": why, "max_abs_diff_vs_eager": diffs[name]})
                    del impls[name]
            baselines = tuple(b for b in INFERENCE_BASELINES if b in impls)
        else:
            y = torch.randint(0, CLASSES, (n,), generator=g).to(dev)
            impls = train_impls(arch, variant, dtype, fmt, dev, x, y)
            baselines = ("unfused",)
        if not impls:  # eager's own output was not finite: nothing to time
            continue
        stats = timing.time_interleaved(
            impls,
            rounds=rounds if mode == "inference" else (train_rounds or rounds),
            warmup=warmup,
            min_sample_ms=min_sample_ms,
            baselines=baselines,
            device=dev,
            settle={"ort": ORT_SETTLE_MS},
            prime=mode == "inference",
        )
        for name, st in stats.items():
            rec = {**base, "impl": name, **timing.stats_record(st, baselines=baselines), **setup.get(name, {})}
            if name in diffs:
                rec["max_abs_diff_vs_eager"] = diffs[name]
            if name in OUTSIDE_ALLOCATOR:
                rec["peak_mem_bytes"] = None
                rec["peak_mem_note"] = OUTSIDE_ALLOCATOR[name]
            else:
                getattr(impls[name], "before_memory_trace", lambda: None)()
                rec["peak_mem_bytes"] = timing.peak_memory_bytes(impls[name], dev)
            if name in held:
                rec["held_bytes"] = held[name]()
                rec["peak_mem_note"] = f"plus {rec['held_bytes'] / 2**20:.1f} MiB of packed weights held between calls"
            records.append(rec)
        del impls
        torch._dynamo.reset()
    config = timing.config_record(
        t0, models=models, modes=modes, train_variants=train_variants, input_hw=hw, batch=batch,
        inference_batches=inference_batches, dtypes=dtypes, layouts=layouts, compile=with_compile, ort=with_ort,
        rounds=rounds, train_rounds=train_rounds or rounds, warmup=warmup, min_sample_ms=min_sample_ms,
    )  # fmt: skip
    return {
        "benchmark": "model",
        "machine": machine,
        "config": config,
        "records": records,
        "targets": targets(records) if dev.type == "cpu" and hw == 224 else [],
    }


def default_inference_batches(batch: int) -> list[int]:
    """Batch 1 (serving one request) and the training batch."""
    return sorted({1, batch})


def _find(records: Sequence[dict], **kw: object) -> dict | None:
    for r in records:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def _mib(rec: dict) -> str:
    return "n/a" if rec.get("peak_mem_bytes") is None else f"{rec['peak_mem_bytes'] / 2**20:.1f}"


# (peer, must reach, aim): the prepared model's inference speedup over each peer, at batch 1 and 8.
PEER_TARGETS = (("compile-freezing", 1.05, 1.15), ("ort", 0.90, 1.0))
# (must reach, aim): the fused train step's speedup over the unfused one.
TRAIN_TARGET = (1.05, 1.10)


def _verdict(ratio: dict, goal: float, rounds: int | None) -> bool | None:
    """Met (True) when the median ratio's whole 95 % interval reaches ``goal``, missed (False) when none of it does,
    else undecided (None): one run cannot tell; so too with fewer than ``timing.MIN_ROUNDS`` rounds."""
    return timing.verdict(ratio["ci_lo"], ratio["ci_hi"], goal, rounds)


def _speed(ratio: dict, goal: float, rounds: int | None) -> dict:
    """A speed target's figure (median, its 95 % interval, rounds) and verdict, by the rule of :func:`_verdict`."""
    text = f"{ratio['median']:.3f} (95% CI {ratio['ci_lo']:.3f}-{ratio['ci_hi']:.3f}, {rounds} rounds)"
    return {"measured": text, "met": _verdict(ratio, goal, rounds)}


def _why_not(records: Sequence[dict], impls: Sequence[str], **kw: object) -> str:
    """Why a target over ``impls`` has no figure: the first of them with no record or a status."""
    for impl in impls:
        rec = _find(records, impl=impl, **kw)
        if rec is None:
            return f"{impl}: not run"
        if "status" in rec:
            return f"{impl}: {rec['status']}"
    return "no figure"


def _speed_target(records: Sequence[dict], target: str, impl: str, peer: str, goal: float, **kw: object) -> dict:
    """The target ``impl`` >= ``goal`` x ``peer``'s speed, or not measured (and why) where either did not run."""
    rec = _find(records, impl=impl, **kw)
    key = f"speedup_vs_{peer}"
    if rec is not None and key in rec and "status" not in rec:
        return {"target": target, **_speed(rec[key], goal, rec.get("rounds"))}
    return timing.not_measured(target, _why_not(records, (impl, peer), **kw))


def _memory_target(records: Sequence[dict], target: str, impl: str, peer: str, **kw: object) -> dict:
    a, b = _find(records, impl=impl, **kw), _find(records, impl=peer, **kw)
    if a is None or b is None or a.get("peak_mem_bytes") is None or b.get("peak_mem_bytes") is None:
        return timing.not_measured(target, _why_not(records, (impl, peer), **kw))
    return {"target": target, "measured": f"{_mib(a)} MiB vs {_mib(b)} MiB",
            "met": a["peak_mem_bytes"] <= b["peak_mem_bytes"]}  # fmt: skip


def targets(records: Sequence[dict]) -> list[dict]:
    """The model-level targets (CPU, fp32, channels_last, 224x224; batch 8, and batch 1 for the peers) of the modes and
    batches this run covered: met, missed or, for a speed whose 95 % interval straddles the goal, undecided
    (``"met"``: True / False / None), with the figures; a target whose variant or peer did not run or gave a wrong
    result is listed as not measured, with the reason."""
    out = []
    base = {"dtype": "fp32", "layout": "channels_last", "input_hw": 224}
    inf = {"model": "resnet50", "mode": "inference", **base}
    ran = [n for n in (1, 8) if _find(records, batch=n, **inf) is not None]
    if 8 in ran:
        kw = {"batch": 8, **inf}
        out.append(_speed_target(records, "resnet50 inference b8: converted >= 1.3x over eager torchvision",
                                 "fused", "eager", 1.3, **kw))  # fmt: skip
        out.append(_speed_target(records, "resnet50 inference b8: converted no slower than torch.compile of the "
                                 "original", "fused", "compile", 1.0, **kw))  # fmt: skip
        out.append(_memory_target(records, "resnet50 inference b8: peak memory not above eager's", "fused", "eager",
                                  **kw))  # fmt: skip
    for n in ran:
        for impl in ("prepared", "prepared-fuse-relu"):
            for peer, goal, aim in PEER_TARGETS:
                target = f"resnet50 inference b{n}: {impl} >= {goal}x over {peer} (aim {aim}x)"
                out.append(_speed_target(records, target, impl, peer, goal, batch=n, **inf))
    for variant in TRAIN_VARIANTS:
        kw = {"model": "resnet50", "mode": "train", "variant": variant, "batch": 8, **base}
        if _find(records, **kw) is None:
            continue
        goal, aim = TRAIN_TARGET
        target = f"resnet50 train step ({variant}) b8: fused >= {goal}x over unfused (aim {aim}x)"
        out.append(_speed_target(records, target, "fused", "unfused", goal, **kw))
        out.append(_memory_target(records, f"resnet50 train step ({variant}) b8: peak memory not above unfused",
                                  "fused", "unfused", **kw))  # fmt: skip
    return out


def table_markdown(records: Sequence[dict], memory_method: str | None = None) -> str:
    """One markdown table of every model run; ``memory_method`` (how peak memory was measured) is stated under it."""
    head = ["model", "mode", "variant", "dtype", "layout", "batch", "impl", "median ms", "p25-p75 ms", "speedup",
            "peak MiB", "max abs diff vs eager", "compile/export s", "notes"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        key = [r["model"], r["mode"], r["variant"], r["dtype"], r["layout"], str(r["batch"]), r["impl"]]
        if "median_ms" not in r:
            row = key + ["-"] * (len(head) - len(key) - 1) + [r["status"]]
            if "max_abs_diff_vs_eager" in r:  # a wrong result: by how much
                row[head.index("max abs diff vs eager")] = f"{r['max_abs_diff_vs_eager']:.2g}"
            lines.append("| " + " | ".join(row) + " |")
            continue
        sp = [f"{r[k]['median']:.2f}x vs {k[len('speedup_vs_') :]}" for k in r if k.startswith("speedup_vs_")]
        sp = [s for s in sp if not s.endswith(f"vs {r['impl']}")]
        setup_s = r.get("compile_s", r.get("export_s"))
        notes = [f"{r['exporter']} export, onnxruntime {r['onnxruntime']}"] if "exporter" in r else []
        notes += [r["peak_mem_note"]] if "peak_mem_note" in r else []
        row = key + [
            f"{r['median_ms']:.1f}",
            f"{r['p25_ms']:.1f}-{r['p75_ms']:.1f}",
            ", ".join(sp) or "-",
            _mib(r),
            f"{r['max_abs_diff_vs_eager']:.2g}" if "max_abs_diff_vs_eager" in r else "-",
            f"{setup_s:.1f}" if setup_s is not None else "-",
            "; ".join(notes) or "-",
        ]
        lines.append("| " + " | ".join(row) + " |")
    text = "\n".join(lines) + "\n"
    if memory_method:
        text += f"\npeak MiB: {memory_method}\n"
    return text


def targets_text(target_list: Sequence[dict]) -> str:
    """Plain-text lines of the target checks."""
    if not target_list:
        return ""
    lines = ["targets (CPU, fp32, channels_last, 224x224):"]
    lines += [f"  [{timing.verdict_label(t)}] {t['target']}: {t['measured']}" for t in target_list]
    return "\n".join(lines)


def write_outputs(payload: dict, json_path: str | os.PathLike | None, md_path: str | os.PathLike | None) -> list[Path]:
    """Write the JSON and markdown table of a :func:`run` payload; returns the paths written."""
    written = []
    if json_path:
        written.append(timing.write_json(json_path, payload))
    if md_path:
        table = table_markdown(payload["records"], payload["machine"]["memory_method"])
        text = table + f"\n```\n{targets_text(payload['targets'])}\n```\n"
        written.append(timing.write_text(md_path, text))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m benchmarks.bench_model [--json PATH] ...``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet18,resnet50", help=f"comma list of {','.join(ARCHS)}")
    parser.add_argument("--modes", default="inference,train", help=f"comma list of {','.join(MODES)}")
    parser.add_argument("--train-variants", default=",".join(TRAIN_VARIANTS), help="comma list of the same")
    parser.add_argument(
        "--inference-batches", default=None, help="comma list of inference batch sizes (default: 1 and --batch)"
    )
    parser.add_argument("--no-ort", action="store_true", help="skip ONNX Runtime")
    parser.add_argument(
        "--train-rounds", type=int, default=None, help="timed rounds of the train steps (default --rounds)"
    )
    parser.add_argument("--json", default=str(OUT_DIR / "model.json"))
    parser.add_argument("--md", default=str(OUT_DIR / "model.md"))
    add_common_args(parser)
    a = parser.parse_args(argv)
    check_lists(parser, [("models", a.models, ARCHS), ("modes", a.modes, MODES), ("dtypes", a.dtypes, DTYPES),
                         ("layouts", a.layouts, LAYOUTS), ("train-variants", a.train_variants, TRAIN_VARIANTS)])  # fmt: skip
    payload = run(
        models=_split(a.models),
        modes=_split(a.modes),
        train_variants=_split(a.train_variants),
        hw=a.hw,
        batch=a.batch,
        inference_batches=[int(b) for b in _split(a.inference_batches)] if a.inference_batches else None,
        dtypes=_split(a.dtypes),
        layouts=_split(a.layouts),
        with_compile=not a.no_compile,
        with_ort=not a.no_ort,
        rounds=a.rounds,
        train_rounds=a.train_rounds,
        warmup=a.warmup,
        min_sample_ms=a.min_sample_ms,
        threads=a.threads,
        device=a.device,
        progress=not a.no_progress,
    )
    print(table_markdown(payload["records"], payload["machine"]["memory_method"]))
    print(targets_text(payload["targets"]))
    for p in write_outputs(payload, a.json, a.md):
        print(f"wrote {p}")
    if wrong_results(payload["records"]):
        print("WRONG RESULTS: see the table; those variants were not timed.")
        return 1
    return 0


if __name__ == "__main__":
    timing.steady_heap("benchmarks.bench_model")
    raise SystemExit(main())
