"""Compile report of the Triton kernels for sm_80 / sm_90, with no GPU, and a DRAM-bytes model.

    python -m resnet_fused.triton.report --arch 80 90 [--json PATH]

Part 1 compiles every shipped kernel x autotune config x dtype x arch with ``triton.compile`` and a
``GPUTarget`` and reads the cubin: registers, stack/local bytes (spills land there), shared memory,
tensor-core instructions (HMMA, DMMA for fp64; HGMMA is sm_90's wgmma), async copies (LDGSTS = cp.async;
TMA) and FFMA/DFMA, which beside the tensor-core dot only an epilogue contracted into an FMA would have.
fp64, there for gradcheck, is held to compiling and fitting shared memory; its spills cost only speed.
The kernels are specialised as the runtime would for a ResNet-50 problem (16-byte aligned pointers) in both
layouts: NHWC (channels_last, channel stride 1, a constexpr) and NCHW (contiguous, pixel stride 1), with every
epilogue option on; each layout's own configs (``launch.shipped_configs``).

Part 2 is a MODEL, not a measurement: the minimum DRAM bytes that the fused forward and backward
must move for each ResNet-50 conv, against the unfused sequence of kernels.
"""

import argparse
import concurrent.futures
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
import triton.language as tl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource

from resnet_fused.contract import conv_output_shape

from . import kernels, launch

KERNELS = {
    "fwd": kernels._forward_kernel,
    "dgrad": kernels._dgrad_kernel,
    "wgrad": kernels._wgrad_kernel,
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
# Per-block shared memory opt-in limits (bytes): sm_80 (A100) 163 KB, sm_90 (H100) 227 KB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# sm_86, sm_89 and sm_120 (A10, L4, RTX) give a block 99 KB: every list needs a config within it (the pinned launch
# falls back to the first that fits). A tile takes the same shared memory there as on sm_80 (the same cp.async
# pipeline).
SMALL_SMEM_LIMIT = 99 * 1024
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")

# Representative problem: ResNet-50 layer3 3x3 conv, NHWC, batch 32 (N, C, H, W, K, R, S, stride, pad).
_PROBLEM = {"3x3": (32, 256, 14, 14, 256, 3, 3, 1, 1), "1x1": (32, 1024, 14, 14, 256, 1, 1, 1, 0)}


@dataclasses.dataclass
class Row:
    kernel: str
    shape: str
    layout: str
    config: str
    dtype: str
    arch: int
    regs: int
    stack: int
    local: int
    smem: int
    mma: int  # HMMA, or DMMA (fp64)
    hgmma: int
    ldgsts: int
    tma: int
    fma: int  # FFMA and DFMA: with the MMA dot, only a contracted epilogue would have any
    error: str = ""


LAYOUTS = ("nhwc", "nchw")


def _strides(layout: str, n: int, c: int, h: int, w: int) -> tuple[int, int, int, int]:
    """(N, C, H, W) strides of a dense tensor: channels_last ("nhwc") or contiguous ("nchw")."""
    return (h * w * c, 1, w * c, c) if layout == "nhwc" else (c * h * w, h * w, w, 1)


def _args(kernel: str, shape: str, layout: str = "nhwc") -> dict:
    """Runtime argument values of one launch of ``kernel`` on the representative problem, every tensor (the
    weight too) in ``layout``."""
    n, c, h, w, k, r, s, st, pad = _PROBLEM[shape]
    _, _, p, q = conv_output_shape((n, c, h, w), (k, c, r, s), (st, st), (pad, pad), (1, 1))
    conv = dict(stride_h=st, stride_w=st, pad_h=pad, pad_w=pad, dil_h=1, dil_w=1)
    xs = _strides(layout, n, c, h, w)
    ys = _strides(layout, n, k, p, q)
    ws = _strides(layout, k, c, r, s)
    if kernel == "fwd":
        a = dict(N=n, H=h, W=w, P=p, Q=q, M=n * p * q, CG=c, KG=k, G=1)
        a.update(zip(("sxn", "sxc", "sxh", "sxw"), xs, strict=True))
        a.update(zip(("swk", "swc", "swr", "sws"), ws, strict=True))
        a.update(zip(("srn", "src", "srh", "srw"), ys, strict=True))
        a.update(zip(("syn", "syc", "syh", "syw"), ys, strict=True))
        a.update(conv, HAS_SCALE=True, HAS_BIAS=True, HAS_RES=True, RELU=True)
    elif kernel == "dgrad":
        a = dict(H=h, W=w, P=p, Q=q, M=n * h * w, CG=c, KG=k, G=1)
        a.update(zip(("sgn", "sgc", "sgh", "sgw"), ys, strict=True))
        a.update(zip(("son", "soc", "soh", "sow"), ys, strict=True))
        a.update(zip(("swk", "swc", "swr", "sws"), ws, strict=True))
        a.update(zip(("sxn", "sxc", "sxh", "sxw"), xs, strict=True))
        a.update(conv, HAS_SCALE=True, RELU=True)
    else:
        a = dict(H=h, W=w, P=p, Q=q, M=n * p * q, CG=c, KG=k, CRS=c * r * s, G=1)
        a.update(zip(("sgn", "sgc", "sgh", "sgw"), ys, strict=True))
        a.update(zip(("son", "soc", "soh", "sow"), ys, strict=True))
        a.update(zip(("sxn", "sxc", "sxh", "sxw"), xs, strict=True))
        a.update(sgwn=k * c * r * s, sgwk=c * r * s, sgwj=1, sgbn=k)
        a.update(zip(("srn", "src", "srh", "srw"), ys, strict=True))
        a.update(conv, num_splits=launch.wgrad_splits(n * p * q, k, c * r * s, 1))
        a.update(HAS_SCALE=True, RELU=True, COMPUTE_W=True, COMPUTE_B=True, STORE_GRES=True, INT64_PIXELS=False)
    a.update(R=r, S=s, UPCAST=False)
    return a


def _source(kernel: str, shape: str, dtype: str, config: triton.Config, layout: str = "nhwc", **overrides) -> ASTSource:
    """An ASTSource specialised the way the JIT would specialise the real launch (``overrides``: argument values)."""
    from triton._C.libtriton import native_specialize_impl

    fn = KERNELS[kernel]
    values = {**_args(kernel, shape, layout), "ACC": tl.float64 if dtype == "fp64" else tl.float32, **overrides}
    values.update(config.kwargs, DOT_PRECISION="tf32" if dtype == "fp32" else "ieee")
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name.endswith("_ptr"):
            signature[name] = f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif fn.params[i].is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = values[name]
        else:
            ty, spec = native_specialize_impl(BaseBackend, values[name], False, True, True)
            signature[name] = ty
            if ty == "constexpr":
                constexprs[name] = spec
            elif spec == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def _config_name(cfg: triton.Config) -> str:
    kw = cfg.kwargs
    return f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}/w{cfg.num_warps}/s{cfg.num_stages}"


def _count(pattern: str, sass: str) -> int:
    return len(re.findall(pattern, sass))


def compile_one(kernel: str, shape: str, dtype: str, cfg_index: int, arch: int, layout: str = "nhwc") -> Row:
    """Compile one kernel variant for sm_<arch> and read its resources from the cubin."""
    cfg = launch.shipped_configs(kernel, DTYPES[dtype], layout)[cfg_index]
    row = Row(kernel, shape, layout, _config_name(cfg), dtype, arch, -1, -1, -1, -1, -1, -1, -1, -1, -1)
    try:
        compiled = triton.compile(
            _source(kernel, shape, dtype, cfg, layout),
            target=GPUTarget("cuda", arch, 32),
            options={**launch.COMPILE_OPTIONS, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
        )
    except Exception as e:  # reported as a failed row; the test fails on any
        row.error = f"{type(e).__name__}: {str(e)[:300]}"
        return row
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [os.path.join(_BIN, "cuobjdump"), "--dump-resource-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        sass = subprocess.run(
            [os.path.join(_BIN, "cuobjdump"), "-sass", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    def field(name: str) -> int:
        m = re.search(rf"\b{name}:\s*(\d+)", usage)
        return int(m.group(1)) if m else -1

    row.regs, row.stack, row.local = field("REG"), field("STACK"), field("LOCAL")
    row.smem = int(compiled.metadata.shared)
    row.mma = _count(r"\b[HD]MMA\.", sass)
    row.hgmma = _count(r"\bHGMMA\.", sass)
    row.ldgsts = _count(r"\bLDGSTS", sass)
    row.tma = _count(r"\bUTMALDG|\bUBLKCP", sass)
    row.fma = _count(r"\b[FD]FMA2?\b", sass)
    return row


def jobs(archs: list[int], shapes: list[str] | None = None, layouts: tuple[str, ...] = LAYOUTS) -> list[tuple]:
    """Every (kernel, shape, dtype, config index, arch, layout) that ships."""
    shapes = shapes or list(_PROBLEM)
    return [
        (kernel, shape, dtype, i, arch, layout)
        for kernel in KERNELS
        for shape in shapes
        for layout in layouts
        for dtype in DTYPES
        for i in range(len(launch.shipped_configs(kernel, DTYPES[dtype], layout)))
        for arch in archs
    ]


def compile_all(
    archs: list[int], shapes: list[str] | None = None, workers: int | None = None, layouts: tuple[str, ...] = LAYOUTS
) -> list[Row]:
    """compile_one over jobs(), in parallel processes (triton.compile holds the GIL)."""
    work = jobs(archs, shapes, layouts)
    workers = workers or max(1, os.cpu_count() or 1)
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        return list(pool.map(compile_one, *zip(*work, strict=True)))


# The one spill the rules allow, exactly (stack bytes by kernel, shape, layout, config, dtype, arch): ptxas caps the
# 128x64 fp16 dgrad tile of a 1x1 conv at 168 registers on sm_80 (three blocks a multiprocessor) and keeps two values
# on the stack, reloaded in the epilogue. The 64x64 tile spills nowhere; which is faster is not measured.
ALLOWED_SPILLS = {("dgrad", "1x1", "nhwc", "128x64x32/w4/s4", "fp16", 80): 8}


def _allowed_spill(r: Row) -> bool:
    return r.local == 0 and r.stack == ALLOWED_SPILLS.get((r.kernel, r.shape, r.layout, r.config, r.dtype, r.arch))


def held_to_no_spills(r: Row) -> bool:
    """Every NHWC config, and NCHW's pinned one, in every dtype but fp64 (there for gradcheck: spills cost only
    speed). NCHW's other configs spill (its channel reads are strided); the autotuner times them, and they are
    reported, not held."""
    if r.dtype == "fp64":
        return False
    return r.layout == "nhwc" or r.config == _config_name(launch.pinned_config(r.kernel, DTYPES[r.dtype], r.layout))


def problems(rows: list[Row]) -> list[str]:
    """What the shipped configs must never do: fail, spill (see held_to_no_spills), overflow smem, miss tensor
    cores, contract the epilogue into an FMA."""
    bad = []
    for r in rows:
        where = f"{r.kernel}[{r.shape} {r.layout}] {r.config} {r.dtype} sm_{r.arch}"
        if r.error:
            bad.append(f"{where}: compile failed: {r.error}")
            continue
        if (r.stack or r.local) and held_to_no_spills(r) and not _allowed_spill(r):
            bad.append(f"{where}: {r.stack} stack / {r.local} local bytes (spills)")
        if r.smem > SMEM_LIMIT[r.arch]:
            bad.append(f"{where}: {r.smem} B shared memory > {SMEM_LIMIT[r.arch]} B")
        if r.dtype in ("fp16", "bf16") and r.mma + r.hgmma == 0:
            bad.append(f"{where}: no tensor-core instruction (HMMA/HGMMA)")
        if r.fma:
            bad.append(f"{where}: {r.fma} FFMA/DFMA (an epilogue contracted into an FMA, or a dot off tensor cores)")
    smallest: dict[tuple, int] = {}
    for r in rows:
        if r.arch == 80 and not r.error:
            key = (r.kernel, r.shape, r.layout, r.dtype)
            smallest[key] = min(smallest.get(key, r.smem), r.smem)
    for (kernel, shape, layout, dtype), smem in smallest.items():
        if smem > SMALL_SMEM_LIMIT:
            bad.append(f"{kernel}[{shape} {layout}] {dtype}: no config within {SMALL_SMEM_LIMIT} B of shared memory "
                       f"(sm_86/89/120); the smallest takes {smem} B")  # fmt: skip
    return bad


# ---- Part 2: the DRAM-bytes model ----


@dataclasses.dataclass
class Layer:
    name: str
    count: int  # how many times the shape occurs in ResNet-50
    c: int
    h: int
    k: int
    r: int
    stride: int
    residual: bool
    relu: bool


def resnet50_layers() -> list[Layer]:
    """Every distinct conv of ResNet-50 (torchvision v1.5: stride on the 3x3), 224x224 input."""
    layers = [Layer("stem 7x7/2", 1, 3, 224, 64, 7, 2, False, True)]
    h, c_in = 56, 64
    for stage, (width, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))):
        out = width * 4
        tag = f"layer{stage + 1}"
        h_out = h // stride
        layers += [
            Layer(f"{tag}.0 conv1 1x1", 1, c_in, h, width, 1, 1, False, True),
            Layer(f"{tag}.0 conv2 3x3/{stride}", 1, width, h, width, 3, stride, False, True),
            Layer(f"{tag}.0 conv3 1x1 +res", 1, width, h_out, out, 1, 1, True, True),
            Layer(f"{tag}.0 downsample 1x1/{stride}", 1, c_in, h, out, 1, stride, False, False),
            Layer(f"{tag}.n conv1 1x1", blocks - 1, out, h_out, width, 1, 1, False, True),
            Layer(f"{tag}.n conv2 3x3", blocks - 1, width, h_out, width, 3, 1, False, True),
            Layer(f"{tag}.n conv3 1x1 +res", blocks - 1, width, h_out, out, 1, 1, True, True),
        ]
        h, c_in = h_out, out
    return layers


def layer_bytes(layer: Layer, batch: int, elem: int) -> dict[str, int]:
    """Minimum DRAM bytes per kernel sequence, each tensor crossing DRAM once per kernel using it.

    Every conv carries a per-channel scale and bias (a folded BatchNorm).
    Unfused forward: conv (x, W -> z); affine (z -> z'); add (z', res -> s); relu (s -> y).
    Fused forward: one kernel (x, W, res -> y).
    Unfused backward: relu-bwd (gy, y -> g); bias-grad sum (g); affine-bwd (g -> gz); dgrad
    (gz, W -> gx); wgrad (gz, x -> gW). The residual's gradient is g itself (no copy).
    Fused backward, this package's two kernels: dgrad (gy, y, W -> gx) and wgrad (gy, y, x ->
    gW, gb, g_res); grad_out and out are read by both.
    """
    pad = layer.r // 2
    p = (layer.h + 2 * pad - layer.r) // layer.stride + 1
    x = batch * layer.c * layer.h * layer.h * elem
    y = batch * layer.k * p * p * elem
    w = layer.k * layer.c * layer.r * layer.r * elem
    vec = 2 * layer.k * elem
    res = y if layer.residual else 0
    relu = layer.relu
    unfused_fwd = (x + w + y) + (2 * y + vec)
    if layer.residual:
        unfused_fwd += 3 * y
    if relu:
        unfused_fwd += 2 * y
    fused_fwd = x + w + vec + res + y
    unfused_bwd = (3 * y if relu else 0) + y + (2 * y + vec) + (y + w + x) + (y + x + w)
    reads_go = 2 * y if relu else y  # grad_out, plus out for the mask
    fused_bwd = (reads_go + w + x + vec) + (reads_go + x + w + vec + (res if relu else 0))
    return {"unfused_fwd": unfused_fwd, "fused_fwd": fused_fwd, "unfused_bwd": unfused_bwd, "fused_bwd": fused_bwd}


def bytes_model(batch: int = 32, elem: int = 2) -> list[dict]:
    """layer_bytes for every ResNet-50 conv, with the layer's description and count."""
    return [{**dataclasses.asdict(layer), **layer_bytes(layer, batch, elem)} for layer in resnet50_layers()]


def _mb(b: int) -> str:
    return f"{b / 1e6:9.1f}"


def format_report(rows: list[Row], model: list[dict], batch: int) -> str:
    out = ["## Part 1: compiled kernels (triton.compile for a GPUTarget; no GPU needed)", ""]
    head = "kernel shape layout config              dtype arch regs stack local  smem_B   MMA HGMMA LDGSTS TMA FMA"
    out.append(head)
    for r in rows:
        if r.error:
            out.append(f"{r.kernel:6} {r.shape:5} {r.layout:6} {r.config:19} {r.dtype:5} sm_{r.arch}  ERROR {r.error}")
            continue
        out.append(
            f"{r.kernel:6} {r.shape:5} {r.layout:6} {r.config:19} {r.dtype:5} sm_{r.arch} {r.regs:4} {r.stack:5} "
            f"{r.local:5} {r.smem:7} {r.mma:5} {r.hgmma:5} {r.ldgsts:6} {r.tma:3} {r.fma:3}"
        )
    bad = problems(rows)
    out += ["", "checks: " + ("all pass" if not bad else f"{len(bad)} FAIL"), *bad, ""]
    out += [
        f"## Part 2: MODEL of minimum DRAM traffic, ResNet-50, batch {batch}, fp16 (not a measurement)",
        "MB per occurrence; fused forward = 1 kernel; fused backward = dgrad + wgrad kernels.",
        "",
        f"{'layer':28} {'x':>3} {'unf fwd':>9} {'fus fwd':>9} {'save':>5} {'unf bwd':>9} {'fus bwd':>9} {'save':>5}",
    ]
    tot = dict.fromkeys(("unfused_fwd", "fused_fwd", "unfused_bwd", "fused_bwd"), 0)
    for m in model:
        for key in tot:
            tot[key] += m[key] * m["count"]
        out.append(
            f"{m['name']:28} {m['count']:3} {_mb(m['unfused_fwd'])} {_mb(m['fused_fwd'])} "
            f"{1 - m['fused_fwd'] / m['unfused_fwd']:5.0%} {_mb(m['unfused_bwd'])} {_mb(m['fused_bwd'])} "
            f"{1 - m['fused_bwd'] / m['unfused_bwd']:5.0%}"
        )
    out.append(
        f"{'whole network':28} {'':3} {_mb(tot['unfused_fwd'])} {_mb(tot['fused_fwd'])} "
        f"{1 - tot['fused_fwd'] / tot['unfused_fwd']:5.0%} {_mb(tot['unfused_bwd'])} {_mb(tot['fused_bwd'])} "
        f"{1 - tot['fused_bwd'] / tot['unfused_bwd']:5.0%}"
    )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SMEM_LIMIT))
    parser.add_argument("--json", help="also write the rows and the model to this file")
    parser.add_argument("--batch", type=int, default=32, help="batch size of the bytes model")
    parser.add_argument("--shapes", nargs="+", choices=list(_PROBLEM), help="default: all")
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument("--workers", type=int, help="parallel compile processes (default: CPU count)")
    args = parser.parse_args(argv)
    rows = compile_all(args.arch, args.shapes, args.workers, tuple(args.layouts))
    model = bytes_model(args.batch)
    print(format_report(rows, model, args.batch))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "compiled": [dataclasses.asdict(r) for r in rows],
                    "problems": problems(rows),
                    "dram_bytes_model": {
                        "batch": args.batch,
                        "elem_bytes": 2,
                        "note": "model, not measured",
                        "layers": model,
                    },
                },
                f,
                indent=1,
            )
    return 1 if problems(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
