"""Launchers: allocate outputs, pick the grid and the kernel config, and call the kernel.

Public: ``forward`` and ``backward`` (the op's two halves), ``shipped_configs`` and ``pinned_config`` (what the
compile report checks), ``dot_precision`` and ``wgrad_splits``.

How a launch picks its config (the tile sizes, warps and stages; never the math):

- normally, Triton's autotuner times each shipped config once per key and kind of device and keeps the fastest; the
  key holds the shape, the dtypes, the layouts (channel strides), the groups and every constexpr variant (epilogue,
  ReLU, TF32...), since each variant compiles to another kernel with its own registers and shared memory; GPUs of
  another name, arch, SM count or shared memory tune on their own;
- under ``torch.use_deterministic_algorithms(True)`` nothing is chosen by timing: each kernel runs its pinned
  config, the first of its list for the dtype and layout (``pinned_config``), so grad_weight and grad_bias come out with the
  same bits from run to run and from process to process; on a GPU with less shared memory a block than that config
  needs (99 KB on sm_86, sm_89 and sm_120), the first config of the list that fits, the same on every call;
- autotuning runs one call at a time (Triton's tuner keeps the call's arguments on itself);
- while a CUDA graph is being captured, tuning is refused (it synchronizes, which breaks the capture) with an error
  saying to run forward and backward once before capturing; already tuned keys, and pinned configs, launch fine.

Under ``TRITON_INTERPRET=1`` (or true, on, yes: as Triton reads it) each kernel has one small config instead, so
there is nothing to tune.

Every launch, and with it every autotuning run, happens under ``torch.cuda.device(x.device)``: Triton launches
on the current device and its current stream, which need not be x's.
"""

import contextlib
import inspect
import math
import threading
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from resnet_fused.contract import conv_output_shape, memory_format
from resnet_fused.triton import interprets

from .kernels import _dgrad_kernel, _forward_kernel, _wgrad_kernel

# Read as @triton.jit read it when kernels.py was imported.
INTERPRET = interprets()
_INT32_MAX = 2**31 - 1
# Enough programs to fill the largest GPU twice over; the wgrad split aims for this many.
_TARGET_PROGRAMS = 264
_MIN_ROWS_PER_SPLIT = 1024
# Larger than any block size: an index below 2^31 - _MAX_BLOCK stays below 2^31 within its last block.
_MAX_BLOCK = 1024
# CUDA caps grid axes 1 and 2 at 65535 blocks.
_MAX_GRID_YZ = 65535


def _config(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), chosen with the compile report: on NHWC (channels_last)
# tensors none spills on sm_80 or sm_90 in fp32, fp16 or bf16 (128x128 tiles and deeper wgrad pipelines did), but
# for 8 bytes in the 128x64 fp16 dgrad tile of a 1x1 conv on sm_80 (report.ALLOWED_SPILLS). That is at stride 1, what
# the report compiles: at stride 2 the 128x64 fp32 dgrad tile keeps 32 bytes on the stack on sm_80.
# No num_warps=8: upstream saw wrong results with it on non-1x1 conv tiles (pytorch#173068), and 4 warps do not
# spill here (but for the two cases above). The first config of each list is the pinned one (deterministic mode).
FWD_CONFIGS = [
    _config(128, 64, 32, 4, 4),
    _config(64, 128, 32, 4, 4),
    _config(64, 64, 32, 4, 4),
]
DGRAD_CONFIGS = [
    _config(128, 64, 32, 4, 4),
    _config(64, 64, 32, 4, 4),
]
WGRAD_CONFIGS = [
    _config(64, 64, 32, 4, 3),
    _config(32, 64, 32, 4, 4),
    _config(64, 32, 32, 4, 4),
]
# fp64 (for gradcheck) tiles take twice fp32's bytes: the 128x64 dgrad tile needs 246 KB of shared memory
# there, over sm_90's 227 KB, so fp64 runs the configs that fit. fp64 spills, which costs only speed. Each fp64 list
# ends with a tile of at most 50 KB: on GPUs with 99 KB a block (sm_86, sm_89, sm_120) no other fp64 dgrad or wgrad
# tile fits.
FP64_SMALL = {"fwd": _config(64, 32, 32, 4, 2), "dgrad": _config(32, 64, 16, 4, 4), "wgrad": _config(32, 64, 32, 4, 2)}
FP64_CONFIGS = {
    "fwd": [*FWD_CONFIGS, FP64_SMALL["fwd"]],
    "dgrad": [*DGRAD_CONFIGS[1:], FP64_SMALL["dgrad"]],
    "wgrad": [*WGRAD_CONFIGS, FP64_SMALL["wgrad"]],
}
# On NCHW tensors the kernels read channels with a stride, and the forward and dgrad tiles above spill (the
# forward's 128x64 up to 3.4 KB a thread; the report's nchw rows). Each kernel's NCHW list starts with a config
# that spills in no dtype on either arch, pinned there; the autotuner still times the others.
NCHW_PINNED = {
    "fwd": _config(32, 64, 32, 4, 4),
    "dgrad": _config(64, 64, 16, 4, 4),
    "wgrad": WGRAD_CONFIGS[1],
}
INTERPRET_CONFIG = _config(32, 32, 16, 4, 1)


def shipped_configs(kernel: str, dtype: torch.dtype | None = None, layout: str | None = None) -> list[triton.Config]:
    """The autotune configs of ``kernel`` ("fwd", "dgrad" or "wgrad") for ``dtype`` and ``layout`` ("nhwc" or
    "nchw", see :func:`layout_of`) in this process.

    ``dtype`` and ``layout`` None: every config the autotuner holds; it prunes them to those of the call's.
    """
    if INTERPRET:
        return [INTERPRET_CONFIG]
    configs = FP64_CONFIGS[kernel] if dtype == torch.float64 else {"fwd": FWD_CONFIGS, "dgrad": DGRAD_CONFIGS, "wgrad": WGRAD_CONFIGS}[kernel]  # fmt: skip
    if dtype is None:  # every list's: fp64's small tile too
        configs = [*configs, *(c for c in FP64_CONFIGS[kernel] if c not in configs)]
    if layout == "nhwc":
        return configs
    return [NCHW_PINNED[kernel], *(c for c in configs if c != NCHW_PINNED[kernel])]  # nchw; None: every config


def layout_of(channel_stride: int) -> str:
    """ "nhwc" where a tensor's channels are adjacent (channels_last), else "nchw": which configs fit its reads."""
    return "nhwc" if channel_stride == 1 else "nchw"


# The channel stride that picks a kernel's config list: that of the activation its loop reads (x, or grad_out for
# dgrad), whatever layout the others have.
_LAYOUT_ARG = {"fwd": "sxc", "dgrad": "sgc", "wgrad": "sxc"}


def pinned_config(kernel: str, dtype: torch.dtype, layout: str = "nhwc") -> triton.Config:
    """The config ``kernel`` runs on ``dtype`` and ``layout`` under deterministic algorithms: the first shipped one
    (on a GPU whose shared memory it does not fit, the first that fits; see ``_launch_pinned``)."""
    return shipped_configs(kernel, dtype, layout)[0]


def _prune(kernel: str) -> Callable:
    # Triton's autotuner calls its config pruner only for a key it has not tuned yet, right before timing;
    # the key holds the tensors' dtypes, so each dtype is pruned on its own.
    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        dtype = next(v.dtype for v in named_args.values() if isinstance(v, torch.Tensor))
        fits = shipped_configs(kernel, dtype, layout_of(named_args[_LAYOUT_ARG[kernel]]))
        configs = [c for c in configs if c in fits]
        on_cuda = any(isinstance(v, torch.Tensor) and v.is_cuda for v in named_args.values())
        if len(configs) > 1 and on_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"resnet_fused triton backend: the {kernel} kernel has no tuned config for this shape yet, and "
                "autotuning synchronizes, which a CUDA graph capture does not allow. Run the forward and "
                "backward once with the same shapes and dtypes before capturing (a warm-up), or capture under "
                "torch.use_deterministic_algorithms(True), which uses pinned configs and never tunes."
            )
        return configs

    return prune


def _tuning_key(fn: triton.JITFunction, runtime: list[str]) -> list[str]:
    """The autotune key of ``fn``: the ``runtime`` arguments named and every constexpr but the tile sizes.

    Each constexpr variant (epilogue, ReLU, gradients asked for, TF32, int64 pixels...) compiles to another kernel,
    whose best tile may differ, or may not fit at all. The autotuner adds the tensors' dtypes itself.
    """
    # fn.fn: the Python function, under the interpreter as well (whose InterpretedFunction has no .params).
    params = inspect.signature(fn.fn).parameters.values()
    return [*runtime, *(p.name for p in params if p.annotation is tl.constexpr and not p.name.startswith("BLOCK_"))]


def _autotuned(kernel: str, fn: triton.JITFunction, runtime_key: list[str]) -> triton.runtime.Autotuner:
    return triton.autotune(
        configs=shipped_configs(kernel),
        key=_tuning_key(fn, runtime_key),
        prune_configs_by={"early_config_prune": _prune(kernel)},
    )(fn)


# The shape, the groups and the channel strides of the tensors read in the loop (their layouts). R and S are
# constexprs, in the key anyway.
_FWD_KEY = ["M", "CG", "KG", "G", "stride_h", "stride_w", "sxc", "swc", "src", "syc"]
_DGRAD_KEY = ["M", "CG", "KG", "G", "stride_h", "stride_w", "sgc", "soc", "swk", "swc", "sxc"]
_WGRAD_KEY = ["M", "CRS", "KG", "G", "stride_h", "stride_w", "num_splits", "sgc", "soc", "sxc", "sgwj"]
# kernel name -> (the kernel, its autotune key's runtime arguments)
_KERNELS = {
    "fwd": (_forward_kernel, _FWD_KEY),
    "dgrad": (_dgrad_kernel, _DGRAD_KEY),
    "wgrad": (_wgrad_kernel, _WGRAD_KEY),
}
# (kernel name, device kind) -> its autotuned wrapper. Triton's key holds only the call's arguments, and a tile tuned
# on one GPU may be slow on another, or not fit its shared memory at all: each kind of device tunes on its own.
_TUNERS: dict[tuple[str, tuple], triton.runtime.Autotuner] = {}
# CUDA device index -> its kind; fixed for the life of a process.
_DEVICE_KINDS: dict[int, tuple] = {}


def _device_kind(device: torch.device) -> tuple:
    """What a tuned config depends on in ``device``: its type, and on a GPU its name, arch, SM count and shared
    memory a block. GPUs of one kind (the eight of a DGX, say) share their tuning."""
    if device.type != "cuda":
        return (device.type,)
    index = torch.cuda.current_device() if device.index is None else device.index
    kind = _DEVICE_KINDS.get(index)
    if kind is None:
        p = torch.cuda.get_device_properties(index)
        optin = getattr(p, "shared_memory_per_block_optin", None)
        kind = _DEVICE_KINDS.setdefault(index, ("cuda", p.name, p.major, p.minor, p.multi_processor_count, optin))
    return kind


def _tuner(kernel: str, device: torch.device) -> triton.runtime.Autotuner:
    """The autotuned wrapper of ``kernel`` for ``device``'s kind, made on first use (called under ``_TUNING``)."""
    key = (kernel, _device_kind(device))
    tuned = _TUNERS.get(key)
    if tuned is None:
        fn, runtime_key = _KERNELS[kernel]
        tuned = _TUNERS[key] = _autotuned(kernel, fn, runtime_key)
    return tuned


# Under deterministic algorithms: (kernel, dtype, layout, device, constexpr variant) -> the index of the first
# shipped config that fits the device's shared memory, never the order of calls. (Triton's 16-byte alignment
# specialisation also changes a tile's shared memory, for 16-bit dtypes only, whose tiles all fit in 99 KB.)
_PINNED_FITS: dict[tuple, int] = {}
# Triton's autotuner (one object per kernel and kind of GPU) keeps the call's arguments on itself while it times: two threads
# tuning at once (DataParallel replicas, a threaded server) would read each other's, or None.
_TUNING = threading.Lock()


def _launch_pinned(kernel: str, fn: triton.JITFunction, grid: Callable, x: torch.Tensor, args, meta) -> None:
    layout = layout_of(args[fn.arg_names.index(_LAYOUT_ARG[kernel])])
    configs = shipped_configs(kernel, x.dtype, layout)
    values = {**dict(zip(fn.arg_names, args, strict=False)), **meta}  # the tile sizes come from the config
    variant = tuple(values.get(name) for name in _VARIANT_ARGS[kernel])
    key = (kernel, x.dtype, layout, x.device, variant)
    first = _PINNED_FITS.get(key, 0)
    for i in range(first, len(configs)):
        try:
            fn[grid](*args, **meta, **configs[i].all_kwargs())
        except OutOfResources:  # raised before the kernel runs: nothing was written
            if i == len(configs) - 1:
                raise
            continue
        _PINNED_FITS.setdefault(key, i)  # the first answer stays: another thread's cannot move it
        return


# Each kernel's constexprs but the tile sizes: what a variant of one kernel is (its key in _PINNED_FITS).
_VARIANT_ARGS = {name: _tuning_key(fn, []) for name, (fn, _) in _KERNELS.items()}


# Options of every compile, shipped or reported. No FMA contraction: the epilogue rounds conv * scale before adding
# the bias, as the unfused ops do, so a product that overflows does so in both (tl.dot's own FMAs stay).
COMPILE_OPTIONS = {"enable_fp_fusion": False}


def _launch(kernel: str, grid: Callable, x: torch.Tensor, *args, **meta) -> None:
    """Run ``kernel`` on x's device: the pinned config for x's dtype and the layout its loop reads under
    deterministic algorithms, else the autotuned one."""
    fn = _KERNELS[kernel][0]
    meta = {**meta, **COMPILE_OPTIONS}
    guard = torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()
    with guard:
        if torch.are_deterministic_algorithms_enabled():
            _launch_pinned(kernel, fn, grid, x, args, meta)
        else:
            with _TUNING:
                _tuner(kernel, x.device)[grid](*args, **meta)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 uses TF32 exactly when cuDNN convolutions would.

    Read as ATen's allowTF32CuDNN(conv) reads it: the conv setting, then, while the value is "none", cuDNN's
    and then the global fp32_precision. Never through ``cudnn.allow_tf32``, which raises once the per-op
    settings differ.
    """
    if dtype != torch.float32:
        return "ieee"
    if not hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision"):  # a torch before the per-op API
        return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    precision = "none"
    for level in (torch.backends.cudnn.conv, torch.backends.cudnn, torch.backends):
        precision = level.fp32_precision
        if precision != "none":
            break
    return "tf32" if precision == "tf32" else "ieee"


def _upcast(dtype: torch.dtype) -> bool:
    # The 3.8.0 interpreter cannot run a bf16 tl.dot; see kernels.py.
    return INTERPRET and dtype == torch.bfloat16


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check_image_offsets(name: str, t: torch.Tensor, unit: str = "one image") -> None:
    # Offsets inside one image (one filter of the weight) are int32 in the kernels; the batch offset and the pixel
    # index (the filter index) are int64.
    span = sum((size - 1) * st for size, st in zip(t.shape[1:], t.stride()[1:], strict=True))
    if span > _INT32_MAX:
        raise ValueError(
            f"{name}: {unit} spans {span} elements, more than the Triton kernels' int32 "
            f"offsets inside it allow ({_INT32_MAX}); use another backend"
        )


def _check_grid_axis1(kernel: str, dtype: torch.dtype, name: str, what: str, count: int) -> None:
    # Axis 1 of the grid holds count / BLOCK_N blocks; the smallest BLOCK_N of the dtype's configs sets the limit,
    # so that every config, the pinned one included, can run.
    block = min(c.kwargs["BLOCK_N"] for c in shipped_configs(kernel, dtype))
    limit = _MAX_GRID_YZ * block
    if count > limit:
        raise ValueError(
            f"{name}: expected at most {limit} {what} for the triton backend (CUDA caps grid axis 1 at "
            f"{_MAX_GRID_YZ} blocks of {block}), got {count}"
        )


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    scale: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    relu: bool,
) -> torch.Tensor:
    """y = act(conv2d(x, weight) * scale + bias + residual), stored once.

    x (N, C, H, W), weight (K, C // groups, R, S), scale and bias (K,), residual (N, K, P, Q).
    Returns y (N, K, P, Q) in x's memory format. Any strides of x, weight and residual are accepted as they
    are; the arguments are taken as already checked (the op contract does that).
    """
    # The kernels read scale and bias as dense (K,) vectors.
    scale, bias = (None if t is None else t.contiguous() for t in (scale, bias))
    n, _, h, w = x.shape
    k, cg, r, s = weight.shape
    _, _, p, q = conv_output_shape(x.shape, weight.shape, stride, padding, dilation)
    y = torch.empty((n, k, p, q), dtype=x.dtype, device=x.device, memory_format=memory_format(x))
    if y.numel() == 0:
        return y
    for name, t in (("x", x), ("residual", residual), ("y", y)):
        if t is not None:
            _check_image_offsets(name, t)
    _check_image_offsets("weight", weight, "one filter")
    kg = k // groups
    _check_grid_axis1("fwd", x.dtype, "weight", "output channels per group", kg)
    m = n * p * q
    res = residual if residual is not None else y

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(kg, meta["BLOCK_N"]), groups)

    _launch(
        "fwd",
        grid,
        x,
        x,
        weight,
        scale if scale is not None else y,
        bias if bias is not None else y,
        res,
        y,
        n,
        h,
        w,
        p,
        q,
        m,
        cg,
        kg,
        groups,
        *x.stride(),
        *weight.stride(),
        *res.stride(),
        *y.stride(),
        stride[0],
        stride[1],
        padding[0],
        padding[1],
        dilation[0],
        dilation[1],
        R=r,
        S=s,
        HAS_SCALE=scale is not None,
        HAS_BIAS=bias is not None,
        HAS_RES=residual is not None,
        RELU=relu,
        DOT_PRECISION=dot_precision(x.dtype),
        UPCAST=_upcast(x.dtype),
        ACC=_acc(x.dtype),
    )
    return y


def wgrad_splits(m: int, kg: int, crs: int, groups: int) -> int:
    """How many slices the wgrad reduction over m = N*P*Q is cut into (1 = no partials).

    Small K x CRS problems (early ResNet layers: 64 x 64 with m = 100k) have too few output
    tiles to fill a GPU, so the long m reduction is split; the partials are summed in a fixed
    order, keeping the result deterministic.
    """
    tiles = triton.cdiv(kg, 64) * triton.cdiv(crs, 64) * groups
    want = math.ceil(_TARGET_PROGRAMS / tiles)
    # Grid dim 2 holds groups * splits and is capped at 65535 by CUDA.
    return max(1, min(want, m // _MIN_ROWS_PER_SPLIT, 64, 65535 // groups))


def backward(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    relu: bool,
    output_mask: Sequence[bool],
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of forward: (grad_x, grad_weight, grad_bias, grad_residual).

    grad_out and out (N, K, P, Q), x (N, C, H, W), weight (K, C // groups, R, S), scale (K,).
    The ReLU mask comes from the saved output (out > 0). output_mask = (x, weight, bias,
    residual); a gradient not asked for is returned as an empty tensor. Two kernels at most:
    dgrad for grad_x, and wgrad, which also yields grad_bias and grad_residual from the same
    reads of grad_out. ``num_splits`` overrides the wgrad split heuristic (tests use it).
    """
    n, _, h, w = x.shape
    k, cg, r, s = weight.shape
    _, _, p, q = grad_out.shape
    kg = k // groups
    crs = cg * r * s
    need_x, need_w, need_b, need_r = (bool(v) for v in output_mask)
    if not relu:
        out = grad_out  # without the ReLU mask out is never read, and the op's contract does not check it

    def empty() -> torch.Tensor:
        return torch.empty(0, dtype=x.dtype, device=x.device)

    grad_x, grad_w, grad_b, grad_r = empty(), empty(), empty(), empty()
    fmt = memory_format(x)
    if need_x:
        grad_x = torch.empty_like(x, memory_format=fmt)
    if need_w:
        grad_w = torch.empty_like(weight, memory_format=memory_format(weight))
    if need_b:
        grad_b = torch.empty(k, dtype=x.dtype, device=x.device)
    if need_r:
        grad_r = torch.empty_like(grad_out, memory_format=fmt)
    if grad_out.numel() == 0:
        # Empty sums: every gradient is exactly zero.
        return grad_x.zero_(), grad_w.zero_(), grad_b.zero_(), grad_r.zero_()
    # x is never empty here: the contract refuses C = 0 and an empty image, so an empty x means N = 0.
    # The outputs too: an expanded x spans little, while its dense grad_x may not.
    for name, t in (("grad_out", grad_out), ("out", out), ("x", x), ("grad_x", grad_x), ("grad_residual", grad_r)):
        _check_image_offsets(name, t)
    if need_x:  # only dgrad reads the weight
        _check_image_offsets("weight", weight, "one filter")
        _check_grid_axis1("dgrad", x.dtype, "weight", "input channels per group", cg)
    if need_w:  # wgrad's axis 1 walks the (c, r, s) of one filter only when grad_weight is asked for
        _check_grid_axis1("wgrad", x.dtype, "weight", "elements per filter (C / groups * R * S)", crs)
    m_out = n * p * q
    common = dict(
        R=r,
        S=s,
        HAS_SCALE=scale is not None,
        RELU=relu,
        DOT_PRECISION=dot_precision(x.dtype),
        UPCAST=_upcast(x.dtype),
        ACC=_acc(x.dtype),
    )
    convargs = (stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1])
    sc = scale.contiguous() if scale is not None else grad_out  # read as a dense (K,) vector

    if need_x:
        m_in = n * h * w

        def dgrid(meta):
            return (triton.cdiv(m_in, meta["BLOCK_M"]), triton.cdiv(cg, meta["BLOCK_N"]), groups)

        _launch(
            "dgrad",
            dgrid,
            x,
            grad_out,
            out,
            weight,
            sc,
            grad_x,
            h,
            w,
            p,
            q,
            m_in,
            cg,
            kg,
            groups,
            *grad_out.stride(),
            *out.stride(),
            *weight.stride(),
            *grad_x.stride(),
            *convargs,
            **common,
        )

    if need_w or need_b or need_r:
        splits = num_splits if num_splits is not None else wgrad_splits(m_out, kg, max(crs, 1), groups)
        acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        direct_w = need_w and splits == 1 and grad_w.is_contiguous()
        if direct_w:
            gw = grad_w.view(k, crs)
            sgw = (0, *gw.stride())
        elif need_w:
            gw = torch.empty((splits, k, crs), dtype=acc_dtype, device=x.device)
            sgw = gw.stride()
        else:
            gw, sgw = grad_out, (0, 0, 0)
        if need_b and splits == 1:
            gb, sgb = grad_b, 0
        elif need_b:
            gb = torch.empty((splits, k), dtype=acc_dtype, device=x.device)
            sgb = gb.stride(0)
        else:
            gb, sgb = grad_out, 0
        gres = grad_r if need_r else grad_out
        cols = crs if need_w else 1

        def wgrid(meta):
            return (
                triton.cdiv(kg, meta["BLOCK_M"]),
                triton.cdiv(cols, meta["BLOCK_N"]),
                groups * splits,
            )

        _launch(
            "wgrad",
            wgrid,
            x,
            grad_out,
            out,
            x,
            sc,
            gw,
            gb,
            gres,
            h,
            w,
            p,
            q,
            m_out,
            cg,
            kg,
            crs,
            groups,
            *grad_out.stride(),
            *out.stride(),
            *x.stride(),
            *sgw,
            sgb,
            *gres.stride(),
            *convargs,
            splits,
            COMPUTE_W=need_w,
            COMPUTE_B=need_b,
            STORE_GRES=need_r,
            INT64_PIXELS=m_out > _INT32_MAX - _MAX_BLOCK,
            **common,
        )
        if need_w and not direct_w:
            grad_w.copy_(gw.sum(0).view(grad_w.shape))
        if need_b and splits > 1:
            grad_b.copy_(gb.sum(0))
    return grad_x, grad_w, grad_b, grad_r
