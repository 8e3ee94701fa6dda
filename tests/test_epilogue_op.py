"""The ``_epilogue_`` op: the CPU epilogue pass alone, in place on a conv's fresh output (prepared inference runs its
own packed conv, then this pass). Compared with float64, with NaN/Inf, and its argument errors from both the C++
kernel and the fake."""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
from helpers import assert_close, to_layout
from torch._subclasses.fake_tensor import FakeTensorMode

import resnet_fused  # noqa: F401  (registers the ops)

OP = torch.ops.resnet_fused._epilogue_.default


def inputs(dtype, layout, *, bias=True, residual=True, scale=True, shape=(2, 12, 5, 7), seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*s):
        return torch.randn(*s, generator=gen).to(dtype)

    k = shape[1]
    return dict(
        y=to_layout(rand(*shape), layout),
        bias=rand(k) if bias else None,
        residual=to_layout(rand(*shape), layout) if residual else None,
        scale=(torch.rand(k, generator=gen) + 0.5).to(dtype) if scale else None,
    )


def expected(y, bias, residual, scale, relu):
    """act(y * scale + bias + residual) in float64."""
    v = y.double()
    if scale is not None:
        v = v * scale.double().view(1, -1, 1, 1)
    if bias is not None:
        v = v + bias.double().view(1, -1, 1, 1)
    if residual is not None:
        v = v + residual.double()
    return torch.relu(v) if relu else v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("epilogue", range(8))
@pytest.mark.parametrize("relu", [True, False])
def test_matches_float64_in_place(dtype, layout, epilogue, relu):
    bias, residual, scale = (bool(epilogue & b) for b in (1, 2, 4))
    kw = inputs(dtype, layout, bias=bias, residual=residual, scale=scale)
    want = expected(**kw, relu=relu)
    before = {k: v.clone() for k, v in kw.items() if v is not None and k != "y"}
    y = kw["y"]
    ptr, strides = y.data_ptr(), y.stride()
    assert OP(**kw, relu=relu) is None
    assert y.data_ptr() == ptr and y.stride() == strides  # in place, layout kept
    assert_close(y, want, dtype, f"y (bias={bias}, residual={residual}, scale={scale}, relu={relu})")
    for k, v in before.items():
        assert torch.equal(kw[k], v), f"{k} was written"


def test_nan_inf_like_the_reference():
    kw = inputs(torch.float32, "channels_last")
    y, r = kw["y"], kw["residual"]
    y[0, 0, 0, 0], y[0, 1, 0, 0], y[1, 2, 3, 4] = float("nan"), float("inf"), float("-inf")
    r[0, 3, 1, 1], r[1, 4, 2, 2] = float("nan"), float("-inf")
    for relu in (True, False):
        kw_relu = {k: v.clone() if v is not None else None for k, v in kw.items()}
        want = expected(**kw_relu, relu=relu)
        OP(**kw_relu, relu=relu)
        assert kw_relu["y"].isnan().any() and kw_relu["y"].isinf().any()
        assert_close(kw_relu["y"], want, torch.float32, f"y (relu={relu})")


def test_residual_view_is_read_as_it_is():
    # A residual in the other layout, or a non-contiguous view, is read through a dense copy; y is not.
    kw = inputs(torch.float32, "channels_last")
    wide = torch.randn(2, 24, 5, 7)
    kw["residual"] = wide[:, ::2]
    want = expected(**kw, relu=True)
    OP(**kw, relu=True)
    assert_close(kw["y"], want, torch.float32, "y")


def test_empty_and_nothing_to_apply():
    kw = inputs(torch.float32, "nchw", shape=(0, 12, 5, 7))
    OP(**kw, relu=True)
    assert kw["y"].shape == (0, 12, 5, 7)
    kw = inputs(torch.float32, "nchw", bias=False, residual=False, scale=False)
    before = kw["y"].clone()
    OP(**kw, relu=False)
    assert torch.equal(kw["y"], before)


@pytest.mark.parametrize("layout, epilogue, relu", [("nchw", 7, True), ("channels_last", 2, True), ("nchw", 5, False)])
def test_opcheck(layout, epilogue, relu):
    bias, residual, scale = (bool(epilogue & b) for b in (1, 2, 4))
    kw = inputs(torch.float32, layout, bias=bias, residual=residual, scale=scale)
    torch.library.opcheck(OP, (kw["y"], kw["bias"], kw["residual"], kw["scale"], relu))


def bad_calls():
    """(description, kwargs, exception type, message pattern)."""
    ok = inputs(torch.float32, "nchw")

    def with_(**changes):
        return {**{k: (v.clone() if v is not None else None) for k, v in ok.items()}, **changes}

    y = ok["y"]
    return [
        ("3-D y", with_(y=y[0].clone()), ValueError, r"y: expected a 4-D tensor \(N, K, P, Q\), got 3-D"),
        ("int y", with_(y=y.to(torch.int32)), TypeError, r"y: expected a floating dtype .* got torch.int32"),
        (
            "float8 y",
            with_(y=y.to(torch.float8_e4m3fn)),
            TypeError,
            r"y: expected a floating dtype .* got torch.float8",
        ),
        (
            "strided y",
            with_(y=torch.randn(2, 12, 5, 14)[..., ::2]),
            ValueError,
            r"y: expected a tensor contiguous in NCHW or channels_last \(written in place\), got strides",
        ),
        ("bias shape", with_(bias=torch.randn(11)), ValueError, r"bias: expected shape \(12,\), got \(11,\)"),
        ("scale shape", with_(scale=torch.randn(1, 12)), ValueError, r"scale: expected shape \(12,\), got \(1, 12\)"),
        (
            "residual shape",
            with_(residual=torch.randn(2, 12, 5, 6)),
            ValueError,
            r"residual: expected y's shape \(2, 12, 5, 7\), got \(2, 12, 5, 6\)",
        ),
        (
            "residual dtype",
            with_(residual=torch.randn(2, 12, 5, 7, dtype=torch.float64)),
            TypeError,
            r"residual: expected dtype torch.float32 \(y's\), got torch.float64",
        ),
        (
            "bias dtype",
            with_(bias=torch.randn(12, dtype=torch.bfloat16)),
            TypeError,
            r"bias: expected dtype torch.float32 \(y's\), got torch.bfloat16",
        ),
    ]


def test_a_sparse_argument_is_named():
    """No kernel takes a sparse, nested or quantized tensor; the dispatcher's refusal would not name the argument, the
    checks do."""
    y = torch.randn(2, 12, 5, 7)
    nested = torch.nested.nested_tensor([torch.randn(12, 5, 7)] * 2)
    quantized = torch.quantize_per_tensor(torch.randn(12), 0.1, 0, torch.quint8)
    for name, kw, got in (
        ("bias", {"bias": torch.randn(12).to_sparse()}, ", got layout torch.sparse"),
        ("y", {"y": y.to_sparse()}, ", got layout torch.sparse"),
        ("residual", {"residual": nested}, ", got a nested tensor"),
        ("scale", {"scale": quantized}, r" of floats, got a quantized tensor \(torch.quint8\)"),
    ):
        args = {"y": y, "bias": None, "residual": None, "scale": None, **kw}
        with pytest.raises(TypeError, match=rf"{name}: expected a dense \(strided\) tensor{got}"):
            OP(**args, relu=True)


@pytest.mark.parametrize("fake", [False, True], ids=["kernel", "fake"])
@pytest.mark.parametrize("case", range(len(bad_calls())))
def test_bad_arguments_name_the_argument(case, fake):
    what, kw, exc, pattern = bad_calls()[case]
    before = {k: v.clone() for k, v in kw.items() if v is not None}
    if fake:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            args = {k: mode.from_tensor(v) if v is not None else None for k, v in kw.items()}
            with pytest.raises(exc, match=pattern):
                OP(**args, relu=True)
    else:
        with pytest.raises(exc, match=pattern):
            OP(**kw, relu=True)
    for k, v in before.items():
        assert torch.equal(kw[k], v), f"{what}: {k} was written"


@pytest.mark.parametrize("fake", [False, True], ids=["kernel", "fake"])
def test_partially_overlapping_residual_is_refused(fake):
    buf = torch.randn(2 * 12 * 5 * 7 + 1)
    with FakeTensorMode() if fake else contextlib.nullcontext():
        buf = torch.empty(buf.shape) if fake else buf
        y = buf[:-1].view(2, 12, 5, 7)
        residual = buf[1:].view(2, 12, 5, 7)
        with pytest.raises(ValueError, match=r"residual: expected memory apart from y's, or y itself .* got a partial"):
            OP(y, None, residual, None, True)
        with pytest.raises(ValueError, match=r"residual: expected memory apart from y's, or y itself .* got a partial"):
            # The same bytes as y in another order (each plane read column by column): read and written out of step.
            OP(y, None, y.as_strided(y.shape, (420, 35, 1, 5)), None, True)
        OP(y, None, y, None, True)  # y itself: accepted by the kernel and the fake alike
        OP(y, None, y.clone(), None, True)
        two = torch.empty(2 * y.numel()) if fake else torch.randn(2 * y.numel())
        OP(two[: y.numel()].view(y.shape), None, two[y.numel() :].view(y.shape), None, True)  # one buffer, apart
    if fake:
        return
    # y itself as the residual is an elementwise read-then-write: y = relu(2 y).
    y = torch.randn(2, 12, 5, 7)
    want = torch.relu(2 * y.double())
    OP(y, None, y, None, True)
    assert_close(y, want, torch.float32, "y")


def test_autograd_refuses_and_in_place_bumps_the_version():
    # No derivative: with grad enabled, an input that requires grad is refused (the result would silently drop its
    # gradient); like any in-place op, the call bumps y's version, so a y saved for backward is caught as modified.
    a = torch.randn(1, 2, 3, 3, requires_grad=True)
    for name, kw in (
        ("y", dict(y=a.exp(), bias=None, residual=None, scale=None)),
        ("residual", dict(y=torch.randn(1, 2, 3, 3), bias=None, residual=a, scale=None)),
        ("bias", dict(y=torch.randn(1, 2, 3, 3), bias=torch.zeros(2, requires_grad=True), residual=None, scale=None)),
    ):
        with pytest.raises(NotImplementedError, match=rf"{name}: expected a tensor that does not require grad"):
            OP(**kw, relu=True)
    y = a.exp()
    version = y._version
    with torch.no_grad():
        OP(y, None, None, None, True)
    assert y._version == version + 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    with torch.inference_mode():
        z = torch.randn(1, 2, 3, 3)
        OP(z, None, None, None, True)
        assert (z >= 0).all()


def test_inference_mode_bumps_the_version_of_a_normal_tensor():
    """Inference mode skips the Autograd kernel, so a bump there missed a y saved for backward outside it: backward
    then used the changed y silently. torch's own in-place ops bump it there too."""
    w = torch.randn(1, 2, 3, 3, requires_grad=True)
    y = torch.randn(1, 2, 3, 3)
    z = (w * y).sum()  # saves y
    version = y._version
    with torch.inference_mode():
        OP(y, torch.ones(2), None, None, False)
    assert y._version == version + 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.backward()


@pytest.mark.parametrize("name", ["y", "bias", "residual", "scale"])
def test_a_dual_tensor_is_refused(name):
    """In place on a dual y the old tangent stayed with the new values; a dual bias, residual or scale lost its
    tangent. No jvp rule: refused, as the forward op refuses them."""
    fwAD = torch.autograd.forward_ad
    args = dict(y=torch.randn(1, 2, 3, 3), bias=torch.randn(2), residual=torch.randn(1, 2, 3, 3), scale=torch.rand(2))
    before = args["y"].clone()
    with fwAD.dual_level():
        args[name] = fwAD.make_dual(args[name], torch.ones_like(args[name]))
        with pytest.raises(NotImplementedError, match=rf"{name}: expected a .*without a forward-mode tangent"):
            OP(**args, relu=True)
        assert torch.equal(fwAD.unpack_dual(args["y"]).primal, before)


def test_compile_fullgraph_on_a_fresh_output():
    def f(x, w, r):
        y = torch.nn.functional.conv2d(x, w)
        torch.ops.resnet_fused._epilogue_(y, None, r, None, True)
        return y

    x, w = torch.randn(2, 4, 6, 6), torch.randn(8, 4, 3, 3)
    r = torch.randn(2, 8, 4, 4)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for a, b in itertools.pairwise((f(x, w, r), compiled(x, w, r))):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_an_inference_tensor_is_refused_outside_inference_mode():
    """As every in-place op: an inference tensor may be changed only inside inference mode."""
    with torch.inference_mode():
        y = torch.randn(1, 2, 3, 3)
    before = y.clone()
    with pytest.raises(RuntimeError, match=r"y: expected a tensor that may be changed in place here, got an inference"):
        OP(y, None, None, None, True)
    assert torch.equal(y, before)
