"""Quick op-level check of the CPU oneDNN route: fused / conv alone on a few ResNet-50 convs (interleaved rounds).

    python -m benchmarks.bench_onednn [--batch 8] [--threads 2] [--rounds 7]

Ratios are medians over rounds of (variant time / F.conv2d-without-bias time) from the same round; "packed"
variants use a weight reordered once (the optimize_for_inference path) and are compared with the packed conv
alone. Not the committed benchmark suite (benchmarks.main); a tool for checking the route while developing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

import resnet_fused
from resnet_fused.inference import RELU_MODE_VAR as RELU_VAR

# (C, H, K, R, stride, has residual): the shapes of a bottleneck's three convs at each stage.
SHAPES = [
    (64, 56, 64, 1, 1, False),
    (64, 56, 64, 3, 1, False),
    (64, 56, 256, 1, 1, True),
    (128, 28, 128, 3, 1, False),
    (128, 28, 512, 1, 1, True),
    (256, 14, 256, 3, 1, False),
    (256, 14, 1024, 1, 1, True),
    (512, 7, 512, 3, 1, False),
    (512, 7, 2048, 1, 1, True),
]


def per_call(fn, inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def bench_shape(shape: tuple, batch: int, rounds: int) -> tuple[float, dict[str, float]]:
    """(F.conv2d time in ms, {variant: median per-round time / its floor}) for one conv shape."""
    c, h, k, r, s, has_res = shape
    pointwise = torch.ops.mkldnn._convolution_pointwise
    x = torch.randn(batch, c, h, h).contiguous(memory_format=torch.channels_last)
    w = torch.randn(k, c, r, r) * 0.05
    b = torch.randn(k)
    p = r // 2
    res = torch.randn_like(F.conv2d(x, w, None, s, p)) if has_res else None
    geo = ([p, p], [s, s], [1, 1], 1)
    wp = torch._C._nn.mkldnn_reorder_conv2d_weight(w.to_mkldnn(), *geo[:3], 1, list(x.shape))

    def onednn(weight: torch.Tensor, relu_attr: str | None) -> torch.Tensor:
        if res is None:
            return pointwise(x, weight, b, *geo, relu_attr or "none", [], None)
        return pointwise.binary(x, res, weight, b, *geo, "add", 1.0, relu_attr, [], None)

    variants = {
        "conv": lambda: F.conv2d(x, w, None, s, p),
        "eager": lambda: torch.relu_(F.conv2d(x, w, b, s, p) + (0 if res is None else res)),
        "fused": lambda: resnet_fused.conv_bias_add_relu(x, w, b, res, stride=s, padding=p, backend="cpu"),
        "fused_relu_in_onednn": lambda: onednn(w, "relu"),
        "packed_conv": lambda: pointwise(x, wp, None, *geo, "none", [], None),
        "packed_fused": lambda: onednn(wp, None).relu_(),
        "packed_relu_in_onednn": lambda: onednn(wp, "relu"),
    }
    inner = max(1, int(0.05 / per_call(variants["conv"], 1)))
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for rnd in range(rounds):
        for name in names[rnd % len(names) :] + names[: rnd % len(names)]:
            times[name].append(per_call(variants[name], inner))
    row = {}
    for name in names[1:]:
        base = "packed_conv" if name.startswith("packed_") and name != "packed_conv" else "conv"
        row[name] = statistics.median(t / t0 for t, t0 in zip(times[name], times[base], strict=True))
    return statistics.median(times["conv"]) * 1e3, row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ratios: dict[str, list[float]] = {}
    for shape in SHAPES:
        conv_ms, row = bench_shape(shape, args.batch, args.rounds)
        for name, value in row.items():
            ratios.setdefault(name, []).append(value)
        c, h, k, r, _, has_res = shape
        print(f"C{c} H{h} K{k} {r}x{r} res={int(has_res)} conv {conv_ms:.2f} ms  " + "  ".join(
            f"{n}={v:.3f}" for n, v in row.items()), flush=True)  # fmt: skip
    print("geomean (time / floor; packed_* over packed_conv, others over F.conv2d):")
    for name, vals in ratios.items():
        print(f"  {name}: {statistics.geometric_mean(vals):.3f}")
    print(f"threads={args.threads} batch={args.batch} {RELU_VAR}={os.environ.get(RELU_VAR)}")


if __name__ == "__main__":
    main()
