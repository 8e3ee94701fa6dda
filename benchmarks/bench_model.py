"""Model-level benchmark: whole ResNets, inference and a training step, fused against unfused.

- **Inference** (``mode="inference"``): torchvision ``resnet18``/``resnet50`` in eval mode (``eager``), the same
  model through ``resnet_fused.convert.convert`` (``fused``: BatchNorm folded, blocks and stem fused) and
  ``torch.compile`` of the original (``compile``, compile time reported apart), under ``torch.no_grad()``.
- **Training** (``mode="train"``), one SGD step (forward, cross-entropy, backward, optimizer step):
  - ``bn-free``: a BN-free ResNet built from ``resnet_fused.nn`` blocks (convs with biases; the last conv of each
    block scaled down so activations stay bounded), ``fused`` on the fused backend against the very same model with
    every conv switched to ``backend="reference"`` (``unfused``: F.conv2d, then separate add/ReLU ops);
  - ``frozen-bn``: torchvision's ResNet with ``FrozenBatchNorm2d`` (a detection backbone's setting), ``unfused``
    as torchvision runs it against ``fused``, its conversion (the frozen norm becomes the epilogue's scale/shift).

Timing, ratios and peak memory as described in :mod:`benchmarks.timing`.

    python -m benchmarks.bench_model --models resnet50 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks import timing
from benchmarks.bench_ops import DTYPES, LAYOUTS, OUT_DIR, _split, add_common_args

ARCHS = {
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
}
MODES = ("inference", "train")
TRAIN_VARIANTS = ("bn-free", "frozen-bn")
CLASSES = 1000


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


def _prepare(model: nn.Module, dtype: torch.dtype, fmt: torch.memory_format, device: torch.device) -> nn.Module:
    return model.to(device=device, dtype=dtype, memory_format=fmt)


def inference_impls(
    arch: str, dtype: torch.dtype, fmt: torch.memory_format, device: torch.device, with_compile: bool, x: Tensor
) -> tuple[dict[str, Callable[[], object]], dict[str, float]]:
    """eager / fused / compile inference callables, and compile seconds."""
    import torchvision

    from resnet_fused.convert import convert

    torch.manual_seed(0)
    eager = getattr(torchvision.models, arch)().eval()
    _randomize_bn(eager)
    fused, _ = convert(eager)
    eager = _prepare(eager, dtype, fmt, device)
    fused = _prepare(fused.eval(), dtype, fmt, device)
    impls: dict[str, Callable[[], object]] = {"eager": lambda: eager(x), "fused": lambda: fused(x)}
    compile_s = {}
    if with_compile:
        compiled = torch.compile(eager)
        with torch.no_grad():
            t0 = time.perf_counter()
            compiled(x)
            timing.synchronize(device)
            compile_s["compile"] = time.perf_counter() - t0
        impls["compile"] = lambda: compiled(x)

    def no_grad(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return fn()

        return run

    return {k: no_grad(v) for k, v in impls.items()}, compile_s


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
    from resnet_fused.nn import set_backend

    torch.manual_seed(0)
    if variant == "bn-free":
        fused = bn_free_resnet(arch)
        unfused = set_backend(copy.deepcopy(fused), "reference")
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

        return step

    return {name: make_step(m) for name, m in models.items()}


def run(
    *,
    models: Sequence[str] = ("resnet50",),
    modes: Sequence[str] = MODES,
    train_variants: Sequence[str] = TRAIN_VARIANTS,
    hw: int = 224,
    batch: int = 8,
    dtypes: Sequence[str] = ("fp32",),
    layouts: Sequence[str] = ("channels_last",),
    with_compile: bool = True,
    rounds: int = 10,
    warmup: int = 2,
    min_sample_ms: float = 20.0,
    threads: int | None = None,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Run the model benchmark and return the JSON payload: ``machine``, ``config``, ``records``, ``targets``."""
    from tqdm import tqdm

    dev, machine = timing.start(device, threads)
    work = []
    for arch in models:
        for d in dtypes:
            for lay in layouts:
                if "inference" in modes:
                    work.append((arch, d, lay, "inference", "eval-bn"))
                if "train" in modes:
                    work += [(arch, d, lay, "train", v) for v in train_variants]
    records: list[dict] = []
    t0 = time.perf_counter()
    bar = tqdm(work, desc="models", unit="run", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for arch, dtype_name, layout, mode, variant in bar:
        bar.set_postfix_str(f"{arch} {mode} {variant} {dtype_name} {layout}", refresh=False)
        dtype, fmt = DTYPES[dtype_name], LAYOUTS[layout]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, hw, hw, generator=g).to(device=dev, dtype=dtype).contiguous(memory_format=fmt)
        compile_s: dict[str, float] = {}
        if mode == "inference":
            torch._dynamo.reset()
            impls, compile_s = inference_impls(arch, dtype, fmt, dev, with_compile, x)
            baselines = ("eager", "compile")
        else:
            y = torch.randint(0, CLASSES, (batch,), generator=g).to(dev)
            impls = train_impls(arch, variant, dtype, fmt, dev, x, y)
            baselines = ("unfused",)
        stats = timing.time_interleaved(
            impls, rounds=rounds, warmup=warmup, min_sample_ms=min_sample_ms, baselines=baselines, device=dev
        )
        for name, st in stats.items():
            rec = {
                "model": arch,
                "mode": mode,
                "variant": variant,
                "impl": name,
                "dtype": dtype_name,
                "layout": layout,
                "batch": batch,
                "input_hw": hw,
                **timing.stats_record(st, baselines=baselines),
                "peak_mem_bytes": timing.peak_memory_bytes(impls[name], dev),
            }
            if name in compile_s:
                rec["compile_s"] = compile_s[name]
            records.append(rec)
        del impls
        torch._dynamo.reset()
    config = timing.config_record(
        t0, models=models, modes=modes, train_variants=train_variants, input_hw=hw, batch=batch, dtypes=dtypes,
        layouts=layouts, compile=with_compile, rounds=rounds, warmup=warmup, min_sample_ms=min_sample_ms,
    )  # fmt: skip
    return {
        "benchmark": "model",
        "machine": machine,
        "config": config,
        "records": records,
        "targets": targets(records) if timing.targets_apply(dev, batch, hw) else [],
    }


def _find(records: Sequence[dict], **kw: object) -> dict | None:
    for r in records:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def _mib(rec: dict) -> str:
    return f"{rec['peak_mem_bytes'] / 2**20:.1f}"


def targets(records: Sequence[dict]) -> list[dict]:
    """The model-level targets (CPU, fp32, channels_last, batch 8), met or missed, with the figures."""
    out = []
    base = {"dtype": "fp32", "layout": "channels_last"}
    fused = _find(records, model="resnet50", mode="inference", impl="fused", **base)
    eager = _find(records, model="resnet50", mode="inference", impl="eager", **base)
    if fused and "speedup_vs_eager" in fused:
        s = fused["speedup_vs_eager"]["median"]
        out.append({"target": "resnet50 inference: converted >= 1.3x over eager torchvision", "measured": round(s, 3),
                    "met": s >= 1.3})  # fmt: skip
    if fused and "speedup_vs_compile" in fused:
        s = fused["speedup_vs_compile"]["median"]
        out.append({"target": "resnet50 inference: converted no slower than torch.compile of the original",
                    "measured": round(s, 3), "met": s >= 1.0})  # fmt: skip
    if fused and eager:
        out.append({"target": "resnet50 inference: peak memory not above eager's",
                    "measured": f"{_mib(fused)} MiB vs {_mib(eager)} MiB",
                    "met": fused["peak_mem_bytes"] <= eager["peak_mem_bytes"]})  # fmt: skip
    for variant in TRAIN_VARIANTS:
        f = _find(records, model="resnet50", mode="train", variant=variant, impl="fused", **base)
        u = _find(records, model="resnet50", mode="train", variant=variant, impl="unfused", **base)
        if f and "speedup_vs_unfused" in f:
            s = f["speedup_vs_unfused"]["median"]
            out.append({"target": f"resnet50 train step ({variant}): fused >= 1.1x over unfused",
                        "measured": round(s, 3),
                        "met": s >= 1.1})  # fmt: skip
        if f and u:
            out.append({"target": f"resnet50 train step ({variant}): peak memory not above unfused",
                        "measured": f"{_mib(f)} MiB vs {_mib(u)} MiB",
                        "met": f["peak_mem_bytes"] <= u["peak_mem_bytes"]})  # fmt: skip
    return out


def table_markdown(records: Sequence[dict]) -> str:
    """One markdown table of every model run."""
    head = ["model", "mode", "variant", "dtype", "layout", "batch", "impl", "median ms", "p25-p75 ms", "speedup",
            "peak MiB", "compile s"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        sp = [f"{r[k]['median']:.2f}x vs {k[len('speedup_vs_') :]}" for k in r if k.startswith("speedup_vs_")]
        sp = [s for s in sp if not s.endswith(f"vs {r['impl']}")]
        lines.append(
            "| "
            + " | ".join(
                [
                    r["model"],
                    r["mode"],
                    r["variant"],
                    r["dtype"],
                    r["layout"],
                    str(r["batch"]),
                    r["impl"],
                    f"{r['median_ms']:.1f}",
                    f"{r['p25_ms']:.1f}-{r['p75_ms']:.1f}",
                    ", ".join(sp) or "-",
                    f"{r['peak_mem_bytes'] / 2**20:.1f}",
                    f"{r['compile_s']:.1f}" if "compile_s" in r else "-",
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def targets_text(target_list: Sequence[dict]) -> str:
    """Plain-text lines of the target checks."""
    if not target_list:
        return ""
    lines = ["targets (CPU, fp32, channels_last, batch 8):"]
    lines += [f"  [{'met' if t['met'] else 'MISSED'}] {t['target']}: {t['measured']}" for t in target_list]
    return "\n".join(lines)


def write_outputs(payload: dict, json_path: str | os.PathLike | None, md_path: str | os.PathLike | None) -> list[Path]:
    """Write the JSON and markdown table of a :func:`run` payload; returns the paths written."""
    written = []
    if json_path:
        written.append(timing.write_json(json_path, payload))
    if md_path:
        text = table_markdown(payload["records"]) + f"\n```\n{targets_text(payload['targets'])}\n```\n"
        written.append(timing.write_text(md_path, text))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m benchmarks.bench_model [--json PATH] ...``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet18,resnet50", help=f"comma list of {','.join(ARCHS)}")
    parser.add_argument("--modes", default="inference,train")
    parser.add_argument("--train-variants", default=",".join(TRAIN_VARIANTS))
    parser.add_argument("--json", default=str(OUT_DIR / "model.json"))
    parser.add_argument("--md", default=str(OUT_DIR / "model.md"))
    add_common_args(parser)
    a = parser.parse_args(argv)
    payload = run(
        models=_split(a.models),
        modes=_split(a.modes),
        train_variants=_split(a.train_variants),
        hw=a.hw,
        batch=a.batch,
        dtypes=_split(a.dtypes),
        layouts=_split(a.layouts),
        with_compile=not a.no_compile,
        rounds=a.rounds,
        warmup=a.warmup,
        min_sample_ms=a.min_sample_ms,
        threads=a.threads,
        device=a.device,
        progress=not a.no_progress,
    )
    print(table_markdown(payload["records"]))
    print(targets_text(payload["targets"]))
    for p in write_outputs(payload, a.json, a.md):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
