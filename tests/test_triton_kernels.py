"""Numerics of the Triton kernels: run under TRITON_INTERPRET=1 on CPU tensors, or on a GPU.

    TRITON_INTERPRET=1 pytest tests/test_triton_kernels.py

Backend-specific behaviour of the Triton kernels: every output_mask with the wgrad reduction whole or split,
its determinism, fp32 under the per-op TF32 setting, dgrad's scaling in fp16, and on a GPU a comparison with
cuDNN. Every case x dtype x layout x epilogue runs in the shared suite, tests/test_conv_bias_add_relu.py.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import FULL, INTERPRET, Case, check_call, make_inputs

HAS_GPU = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    not (INTERPRET or HAS_GPU), reason="needs TRITON_INTERPRET=1 (set before triton is imported) or a GPU"
)
DEVICE = "cuda" if HAS_GPU and not INTERPRET else "cpu"

if INTERPRET or HAS_GPU:
    import resnet_fused
    from resnet_fused.contract import conv_output_shape
    from resnet_fused.triton import launch

# Relative to the reference's max magnitude: fp32 allows TF32 on a GPU (cuDNN's default).
TOL = {torch.float32: 2e-3 if DEVICE == "cuda" else 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _assert_close(name: str, got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    got = got.double().cpu()
    ref = ref.double().cpu()
    assert torch.isnan(got).eq(torch.isnan(ref)).all(), f"{name}: NaN pattern differs"
    err = (got - ref).abs()
    scale = ref.abs().max().item() or 1.0
    worst = err.max().item() / scale
    if worst > TOL[dtype]:
        idx = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        raise AssertionError(
            f"{name} ({dtype}): max rel err {worst:.3g} > {TOL[dtype]:.1g} at {idx}: "
            f"got {got[idx].item():.6g}, want {ref[idx].item():.6g}"
        )


def _reference(x, w, b, res, sc, stride, padding, dilation, groups, relu):
    y = F.conv2d(x, w, None, stride, padding, dilation, groups)
    if sc is not None:
        y = y * sc[None, :, None, None]
    if b is not None:
        y = y + b[None, :, None, None]
    if res is not None:
        y = y + res
    return y.relu() if relu else y


# (N, C, H, W, K, R, S, stride, padding, dilation, groups): deliberately odd sizes.
SHAPES = {
    "3x3": (2, 5, 7, 6, 9, 3, 3, (1, 1), (1, 1), (1, 1), 1),
    "1x1": (2, 20, 5, 3, 18, 1, 1, (1, 1), (0, 0), (1, 1), 1),
    "strided": (1, 6, 9, 8, 7, 3, 3, (2, 2), (1, 1), (1, 1), 1),
    "1x1_strided": (2, 8, 7, 7, 5, 1, 1, (2, 2), (0, 0), (1, 1), 1),
    "dilated_rect": (1, 4, 9, 10, 6, 3, 2, (1, 2), (2, 1), (2, 3), 1),
    "grouped": (1, 6, 6, 5, 9, 3, 3, (1, 1), (1, 1), (1, 1), 3),
    "depthwise": (1, 4, 6, 6, 4, 3, 3, (2, 1), (1, 1), (1, 1), 4),
    "7x7": (1, 3, 11, 11, 8, 7, 7, (2, 2), (3, 3), (1, 1), 1),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _make(shape, dtype, channels_last, bias=True, residual=True, scale=True, seed=0):
    n, c, h, w, k, r, s, stride, padding, dilation, groups = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    wt = torch.randn(k, c // groups, r, s, generator=g) / (c // groups * r * s) ** 0.5
    _, _, p, q = conv_output_shape((n, c, h, w), (k, c // groups, r, s), stride, padding, dilation)
    b = torch.randn(k, generator=g) if bias else None
    res = torch.randn(n, k, p, q, generator=g) if residual else None
    sc = torch.rand(k, generator=g) + 0.5 if scale else None

    def cast(t):
        if t is None:
            return None
        t = t.to(dtype).to(DEVICE)
        return t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t

    conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return cast(x), cast(wt), cast(b), cast(res), cast(sc), conv


def _run_and_check(shape, dtype, channels_last, relu, bias=True, residual=True, scale=True):
    x, w, b, res, sc, conv = _make(shape, dtype, channels_last, bias, residual, scale)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w) + tuple(t for t in (b, res) if t is not None)]
    xl, wl = leaves[0], leaves[1]
    bl = leaves[2] if b is not None else None
    rl = leaves[-1] if res is not None else None
    y = resnet_fused.conv_bias_add_relu(xl, wl, bl, rl, scale=sc, relu=relu, backend="triton", **conv)
    assert y.dtype == dtype
    want_fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=want_fmt), "y must come out in x's memory format"

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rx, rw = ref_leaves[0], ref_leaves[1]
    rb = ref_leaves[2] if b is not None else None
    rr = ref_leaves[-1] if res is not None else None
    rsc = sc.double() if sc is not None else None
    y_ref = _reference(rx, rw, rb, rr, rsc, relu=relu, **conv)
    _assert_close("y", y, y_ref, dtype)

    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEVICE)
    # The reference backward masks with the *rounded* output, like the kernels do.
    mask = (y.detach().double() > 0) if relu else torch.ones_like(y_ref, dtype=torch.bool)
    y_lin = _reference(rx, rw, rb, rr, rsc, relu=False, **conv)
    grads = torch.autograd.grad(y, leaves, gy)
    ref_grads = torch.autograd.grad(y_lin, ref_leaves, gy.double() * mask)
    names = ["grad_x", "grad_weight", "grad_bias", "grad_residual"]
    names = names[:2] + [n for n, t in zip(names[2:], (b, res), strict=True) if t is not None]
    for name, got, want in zip(names, grads, ref_grads, strict=True):
        _assert_close(name, got, want, dtype)


# More channels per group than one interpreter tile (32 wide, launch.INTERPRET_CONFIG), so that the second block of
# output channels (the forward's columns, wgrad's rows) and of input channels (dgrad's columns) runs in a program
# of its own; the shared suite's cases stay below it.
WIDE_CASES = {
    "wide_3x3": Case(1, 36, 5, 4, 34, 3, 3, 1, 1),
    "wide_grouped_1x1": Case(2, 68, 3, 3, 70, 1, 1, groups=2),
}


@pytest.mark.parametrize(
    "name,dtype,layout",
    [("wide_3x3", torch.float32, "nchw"), ("wide_grouped_1x1", torch.float32, "channels_last"),
     ("wide_3x3", torch.bfloat16, "channels_last")],
)  # fmt: skip
def test_channel_blocks_past_the_first_tile_match_float64(name, dtype, layout):
    case = WIDE_CASES[name]
    if INTERPRET:
        tile = launch.INTERPRET_CONFIG.kwargs
        cg, kg = case.c // case.groups, case.k // case.groups
        assert min(cg, kg) > max(tile["BLOCK_M"], tile["BLOCK_N"]), "the case no longer spans two tiles"
    inputs = make_inputs(case, dtype, layout, FULL, device=DEVICE)
    y = resnet_fused.conv_bias_add_relu(**inputs.tensors, **inputs.kwargs, backend="triton")
    check_call(y, inputs, dtype, f"{name} {dtype} {layout}")


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize(
    "mask",
    [(True, True, True, True), (False, True, False, False), (False, False, True, True), (True, False, False, True)],
)
def test_backward_output_mask_and_split(mask, splits):
    """Each gradient alone and together, with the wgrad reduction whole or split into partials."""
    shape = SHAPES["grouped"]
    dtype = torch.float32
    x, w, b, res, sc, conv = _make(shape, dtype, channels_last=True)
    out = resnet_fused.conv_bias_add_relu(x, w, b, res, scale=sc, relu=True, backend="triton", **conv)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    args = (conv["stride"], conv["padding"], conv["dilation"], conv["groups"], True, mask)
    got = launch.backward(go, out, x, w, sc, *args, num_splits=splits)

    rx, rw, rb, rr = (t.double().requires_grad_() for t in (x, w, b, res))
    y_lin = _reference(rx, rw, rb, rr, sc.double(), relu=False, **conv)
    want = torch.autograd.grad(y_lin, (rx, rw, rb, rr), go.double() * (out.double() > 0))
    for name, need, g, r in zip(("grad_x", "grad_weight", "grad_bias", "grad_residual"), mask, got, want, strict=True):
        if need:
            _assert_close(name, g, r, dtype)
        else:
            assert g.numel() == 0, f"{name} was not asked for but came back with shape {tuple(g.shape)}"
    if mask[3]:
        # The residual's gradient is the masked grad_out, bit for bit.
        assert torch.equal(got[3], go * (out > 0))


def test_wgrad_split_is_deterministic():
    shape = SHAPES["1x1"]
    x, w, b, res, sc, conv = _make(shape, torch.float32, channels_last=False)
    out = resnet_fused.conv_bias_add_relu(x, w, b, res, scale=sc, backend="triton", **conv)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    args = (conv["stride"], conv["padding"], conv["dilation"], conv["groups"], True, (False, True, True, False))
    first = launch.backward(go, out, x, w, sc, *args, num_splits=2)
    for _ in range(2):
        again = launch.backward(go, out, x, w, sc, *args, num_splits=2)
        assert torch.equal(first[1], again[1]) and torch.equal(first[2], again[2])


def test_dgrad_scales_grad_out_as_the_unfused_backward_does():
    """fp16 with weight * scale past fp16's range (about 250 * 300 > 65504) while grad_out * scale, which the unfused
    backward rounds and feeds its conv, is small: grad_x is finite and matches the float64 reference."""
    g = torch.Generator().manual_seed(0)
    dtype = torch.float16
    x = (torch.rand(1, 3, 5, 5, generator=g) * 1e-3).to(dtype).to(DEVICE).requires_grad_()
    w = (torch.rand(4, 3, 3, 3, generator=g) * 100 + 200).to(dtype).to(DEVICE)
    sc = torch.full((4,), 300.0, dtype=dtype, device=DEVICE)
    y = resnet_fused.conv_bias_add_relu(x, w, scale=sc, padding=1, relu=False, backend="triton")
    gy = (torch.rand(y.shape, generator=g) * 1e-3).to(dtype).to(DEVICE)
    (gx,) = torch.autograd.grad(y, x, gy)
    x64 = x.detach().double().requires_grad_()
    y64 = F.conv2d(x64, w.double(), padding=1) * sc.double()[None, :, None, None]
    (want,) = torch.autograd.grad(y64, x64, gy.double())
    assert torch.isfinite(gx).all(), gx
    _assert_close("grad_x", gx, want, dtype)


@pytest.mark.parametrize("relu", [True, False])
def test_wgrad_scales_before_the_sum_as_the_unfused_backward_does(relu):
    """An infinite scale entry: the unfused backward sums g * scale * x, NaN where terms of both signs meet; a scale
    applied after the sum gave +-inf. grad_weight's NaN and Inf positions and its finite values match float64."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 6, 6, generator=g).to(DEVICE)
    w = torch.randn(4, 3, 3, 3, generator=g).to(DEVICE).requires_grad_()
    sc = torch.randn(4, generator=g).to(DEVICE)
    sc[2] = float("inf")
    y = resnet_fused.conv_bias_add_relu(x, w, scale=sc, padding=1, relu=relu, backend="triton")
    gy = torch.randn(y.shape, generator=g).to(DEVICE)
    (gw,) = torch.autograd.grad(y, w, gy)
    w64 = w.detach().double().requires_grad_()
    y64 = F.conv2d(x.double(), w64, padding=1) * sc.double()[None, :, None, None]
    (want,) = torch.autograd.grad(torch.relu(y64) if relu else y64, w64, gy.double())
    assert want[2].isnan().any()
    assert torch.equal(gw.isnan(), want.isnan()) and torch.equal(gw.isinf(), want.isinf())
    finite = want.isfinite()
    _assert_close("grad_weight", gw[finite], want[finite], torch.float32)


@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_fp32_under_the_per_op_tf32_setting(precision):
    """torch's per-op precision API for cuDNN convolutions; the Triton fp32 path reads the same setting."""
    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    conv.fp32_precision = precision
    try:
        _run_and_check(SHAPES["3x3"], torch.float32, channels_last=False, relu=True)
    finally:
        conv.fp32_precision = before


@pytest.mark.skipif(not HAS_GPU or INTERPRET, reason="compares with cuDNN on a GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_matches_cudnn_on_gpu(dtype, channels_last):
    """A ResNet-50 layer3 bottleneck 3x3 shape against cuDNN's conv + eager epilogue."""
    g = torch.Generator(device="cuda").manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(8, 256, 14, 14, device="cuda", generator=g).to(dtype).contiguous(memory_format=fmt)
    w = (torch.randn(256, 256, 3, 3, device="cuda", generator=g) / 48).to(dtype)
    b = torch.randn(256, device="cuda", generator=g).to(dtype)
    res = torch.randn(8, 256, 14, 14, device="cuda", generator=g).to(dtype).contiguous(memory_format=fmt)
    sc = (torch.rand(256, device="cuda", generator=g) + 0.5).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (x, w, b, res)]
    y = resnet_fused.conv_bias_add_relu(*leaves, scale=sc, padding=1, backend="triton")
    cud = [t.clone().requires_grad_() for t in (x, w, b, res)]
    y_cudnn = (
        F.conv2d(cud[0], cud[1], None, 1, 1) * sc[None, :, None, None] + cud[2][None, :, None, None] + cud[3]
    ).relu()
    y64 = _reference(*(t.double() for t in (x, w, b, res)), sc.double(), 1, 1, 1, 1, True)
    _assert_close("y", y, y64, dtype)
    # No worse than cuDNN in the same dtype, up to a factor for different summation orders.
    assert (y.double() - y64).abs().max() <= 4 * (y_cudnn.double() - y64).abs().max() + 1e-6
    # Each backward against float64 with the relu mask of the output it was given: where a pre-activation rounds
    # to either side of zero, the two dtype computations take different masks and cannot be compared directly.
    gy = torch.randn_like(y)
    names = ("grad_x", "grad_weight", "grad_bias", "grad_residual")
    ours = torch.autograd.grad(y, leaves, gy)
    theirs = torch.autograd.grad(y_cudnn, cud, gy)
    for name, got, want, got_c, want_c in zip(
        names, ours, _grads64(leaves, sc, gy, y), theirs, _grads64(cud, sc, gy, y_cudnn), strict=True
    ):
        _assert_close(name, got, want, dtype)
        if dtype == torch.float32:
            # fp32 error is the summation order's: one K*R*S = 2304-term chain here, where cuDNN splits its sums.
            continue
        floor = torch.finfo(dtype).eps * want.abs().max().item()
        err, err_cudnn = ((g.double() - w).abs().max().item() for g, w in ((got, want), (got_c, want_c)))
        assert err <= 4 * err_cudnn + floor, f"{name}: error {err:.3g} against cuDNN's {err_cudnn:.3g}"


def _grads64(leaves, sc, gy, out):
    """float64 gradients of the 3x3 layer above, with the relu mask of ``out``."""
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    lin = _reference(*l64, sc.double(), 1, 1, 1, 1, False)
    return torch.autograd.grad(lin, l64, gy.double() * (~(out.detach() <= 0)).double())


@pytest.mark.skipif(not INTERPRET, reason="calls the kernel on CPU tensors with a pixel count they do not hold")
@pytest.mark.parametrize("where", ["below_the_window", "window_start", "window_end"])
def test_wgrad_reduces_every_block_when_the_pixel_count_nears_2_31(where):
    """The wgrad kernel's count of pixel blocks, cdiv(M, BLOCK_K) in int32, wrapped for M in the last BLOCK_K - 1
    values below 2^31: the loop never ran, and grad_weight and grad_bias came back 0 with grad_residual never
    written. A tensor that large does not fit here, so the kernel is called directly with M near 2^31 and a split
    whose first slice covers exactly the 256 pixels given (the grid runs that slice alone)."""
    import triton.language as tl

    kernel = launch._KERNELS["wgrad"][0]
    tile = {k: launch.INTERPRET_CONFIG.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")}
    block = tile["BLOCK_K"]
    m = 2**31 - {"below_the_window": 2048, "window_start": block - 1, "window_end": 1}[where]
    k, c, pixels = 4, 3, 256
    blocks = -(-m // block)
    splits = -(-blocks // (pixels // block))
    assert -(-blocks // splits) == pixels // block  # the first slice is exactly the pixels given
    gen = torch.Generator().manual_seed(0)
    go, x = torch.randn(1, k, 1, pixels, generator=gen), torch.randn(1, c, 1, pixels, generator=gen)
    gw, gb = torch.zeros(1, k, c), torch.zeros(1, k)
    gres = torch.full((1, k, 1, pixels), float("nan"))
    shape = (1, m, 1, m, m, c, k, c, 1)  # H, W, P, Q, M, C/groups, K/groups, C*R*S/groups, groups
    strides = (*go.stride(), *go.stride(), *x.stride(), *gw.stride(), gb.stride(0), *gres.stride())
    kernel[(1, 1, 1)](
        go, go, x, go, gw, gb, gres, *shape, *strides, 1, 1, 0, 0, 1, 1, splits, R=1, S=1, HAS_SCALE=False,
        RELU=False, COMPUTE_W=True, COMPUTE_B=True, STORE_GRES=True, INT64_PIXELS=m > launch._INT32_MAX - launch._MAX_BLOCK,
        DOT_PRECISION="ieee", UPCAST=False, ACC=tl.float32, **tile,
    )  # fmt: skip
    g64, x64 = go[0, :, 0].double(), x[0, :, 0].double()
    _assert_close("grad_weight", gw[0], g64 @ x64.T, torch.float32)
    _assert_close("grad_bias", gb[0], g64.sum(1), torch.float32)
    assert torch.equal(gres, go), "grad_residual was not written"


@pytest.mark.slow
@pytest.mark.skipif(INTERPRET or not HAS_GPU, reason="a GPU run of the case above: 2^31 - 2 pixels, about 31 GiB")
def test_wgrad_and_forward_cover_2_31_minus_2_pixels_on_a_gpu():
    """The case above through the op on a GPU, in the shape where the wrap was seen (N*P*Q = 2^31 - 2, fp16, pinned
    configs). y is compared over every pixel. The gradients are exact sums built to show a block lost at the end of
    the reduction: grad_out alternates +-2^-16 (pairs that cancel) but for its last 256 pixels, which are 1, so the
    last blocks carry grad_bias (256) and most of grad_weight, far above fp16's rounding there. Every output is
    positive and relu=True, so the kernel writes grad_residual (without relu it is grad_out itself)."""
    shape = (1986, 1, 1023, 1057)
    pixels = shape[0] * shape[2] * shape[3]
    assert pixels == 2**31 - 2
    free, _ = torch.cuda.mem_get_info()
    need = 6 * 2 * pixels * 1.3  # x, residual, y, grad_out, grad_residual, x + 1.25; fp16
    if free < need:
        pytest.skip(f"needs ~{need / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    dt = torch.float16
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randint(0, 2, shape, generator=gen, device="cuda", dtype=dt)
    w = torch.ones(1, 1, 1, 1, dtype=dt, device="cuda", requires_grad=True)
    b = torch.full((1,), 0.25, dtype=dt, device="cuda", requires_grad=True)
    r = torch.ones(shape, dtype=dt, device="cuda", requires_grad=True)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # the pinned configs: no tuning on 2^31 pixels
    try:
        y = resnet_fused.conv_bias_add_relu(x, w, b, r, backend="triton")
        assert torch.equal(y, x + 1.25), "y differs from x + 1.25"
        go = torch.empty_like(y)
        go.view(-1, 2)[:, 0] = 2.0**-16
        go.view(-1, 2)[:, 1] = -(2.0**-16)
        go.view(-1)[-256:] = 1.0
        y.backward(go)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    even, odd = x.view(-1, 2)[:-128].sum(0, dtype=torch.float64)  # the pixels before the last 256
    want_w = (even - odd) * 2.0**-16 + x.view(-1)[-256:].sum(dtype=torch.float64)
    _assert_close("grad_weight", w.grad.view(1), want_w.view(1), dt)
    _assert_close("grad_bias", b.grad, torch.tensor([256.0], dtype=torch.float64), dt)
    assert r.grad.data_ptr() != go.data_ptr(), "grad_residual is grad_out itself: the kernel did not write it"
    assert torch.equal(r.grad, go), "grad_residual differs from grad_out"
