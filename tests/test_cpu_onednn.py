"""The CPU forward's routes: one oneDNN convolution with post-ops (fp32, and bf16/fp16 where this CPU has oneDNN
kernels for them), and the conv + epilogue pass for the rest. Each is compared with a float64 reference, and each
test checks, from profiler events, which route ran."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import Inputs, assert_close, reference_grads, to_layout
from helpers import reductions as grad_reductions

import resnet_fused
from resnet_fused import inference, reference
from resnet_fused.inference import RELU_MODE_VAR, onednn_supports

ONEDNN_OP = "mkldnn::_convolution_pointwise"


def run_and_trace(**kwargs) -> tuple[torch.Tensor, set[str]]:
    """y from the cpu backend, and the names of the ops the profiler saw during the call."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = resnet_fused.conv_bias_add_relu(**kwargs, backend="cpu")
    return y, {e.name for e in prof.events()}


def case(dtype, layout, *, bias=True, residual=True, scale=True, n=2, c=8, hw=(9, 10), k=12, r=3, stride=1, pad=1,
         dilation=1, groups=1, seed=0):  # fmt: skip
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    x = to_layout(rand(n, c, *hw), layout)
    weight = rand(k, c // groups, r, r)
    p, q = ((s + 2 * pad - dilation * (r - 1) - 1) // stride + 1 for s in hw)
    return dict(
        x=x,
        weight=weight,
        bias=rand(k) if bias else None,
        residual=to_layout(rand(n, k, p, q), layout) if residual else None,
        scale=(torch.rand(k, generator=gen) + 0.5).to(dtype) if scale else None,
        stride=stride,
        padding=pad,
        dilation=dilation,
        groups=groups,
    )


def aten_picks_onednn(kw) -> bool:
    """Whether ATen itself would run this conv on oneDNN: the cpu backend's post-ops ride only there."""
    pair = [kw[k] if isinstance(kw[k], (list, tuple)) else [kw[k]] * 2 for k in ("stride", "padding", "dilation")]
    choice = torch._C._select_conv_backend(kw["x"], kw["weight"], None, *pair, False, [0, 0], kw["groups"], None)
    return choice == torch._C._ConvBackend.Mkldnn


def pass_takes_epilogue(kw, relu: bool, fused: bool = False) -> bool:
    """Whether an exact ReLU sends the call to the conv + epilogue pass although oneDNN could run it: the pass, which
    runs anyway for the ReLU, also adds a residual and applies a scale, unless the output has at least 16x the
    weight's elements (then folding the scale into the weight is cheap)."""
    if not relu or fused:
        return False
    if kw["residual"] is not None:
        return True
    if kw["scale"] is None:
        return False
    y = reference.conv_bias_add_relu(**{k: v.to("meta") if torch.is_tensor(v) else v for k, v in kw.items()})
    return y.numel() < 16 * kw["weight"].numel()


def reductions(kw) -> int:
    w = kw["weight"]
    return w.shape[1] * w.shape[2] * w.shape[3]


def with_leaves(kw) -> dict:
    """kw with x, weight and the bias and residual that are there as fresh leaves that require grad."""
    return {
        **kw,
        **{k: kw[k].detach().requires_grad_() for k in ("x", "weight", "bias", "residual") if kw[k] is not None},
    }


def check_grads(kw, y, relu: bool, what: str = "") -> None:
    """Every gradient of kw's leaves against float64, with the ReLU mask of the tested y (NaN/Inf positions equal)."""
    tensors = {k: kw[k] for k in ("x", "weight", "bias", "residual")}
    conv = {k: kw[k] for k in ("stride", "padding", "dilation", "groups")}
    gen = torch.Generator().manual_seed(7)
    inputs = Inputs(
        tensors, dict(scale=kw["scale"], relu=relu, **conv), torch.randn(y.shape, generator=gen).to(y.dtype)
    )
    leaves = {k: t for k, t in tensors.items() if t is not None}
    grads = torch.autograd.grad(y, list(leaves.values()), inputs.grad_out)
    expected = reference_grads(inputs, y)
    red = grad_reductions(inputs, y.shape)
    for (name, t), g in zip(leaves.items(), grads, strict=True):
        assert g.shape == t.shape and g.dtype == t.dtype, f"{what} grad_{name}: {g.dtype} {tuple(g.shape)}"
        assert_close(g, expected[name], t.dtype, f"{what} grad_{name}", red[name])


GEOMETRIES = {
    "3x3": {},
    "1x1": dict(r=1, pad=0),
    "strided_dilated_grouped": dict(stride=2, pad=2, dilation=2, groups=4),
    "depthwise": dict(groups=8, k=8),
    "odd": dict(n=3, c=5, k=7, hw=(7, 11), r=1, pad=0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "noncontig"])
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("residual", [True, False])
def test_route_matches_float64(dtype, layout, geometry, relu, residual):
    kw = case(dtype, layout, residual=residual, **GEOMETRIES[geometry])
    y, ops = run_and_trace(**kw, relu=relu)
    # One oneDNN primitive where oneDNN takes the dtype and ATen would run the conv on oneDNN, except a residual add
    # with an NCHW x or a grouped conv (torch's binary op fuses only ungrouped channels_last convs) and an exact ReLU
    # whose pass takes the rest of the epilogue; else ATen's conv and the epilogue pass.
    onednn = (
        onednn_supports(dtype)
        and ((layout == "channels_last" and kw["groups"] == 1) or not residual)
        and aten_picks_onednn(kw)
        and not pass_takes_epilogue(kw, relu)
    )
    assert (ONEDNN_OP in ops) == onednn, sorted(ops)
    assert ("aten::convolution" in ops) == (not onednn), sorted(ops)
    expected = reference.conv_bias_add_relu(**{k: v.double() if torch.is_tensor(v) else v for k, v in kw.items()},
                                            relu=relu)  # fmt: skip
    assert_close(y, expected, dtype, "y", reductions(kw))
    assert y.dtype == dtype
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("epilogue", range(8))
@pytest.mark.parametrize("fused", [False, True])
def test_every_epilogue_on_its_route(epilogue, fused, monkeypatch):
    # The output has 2.5x the 3x3 weight's elements (the pass applies a scale) and 25x the strided 1x1 weight's (the
    # weight folds it). Strided, so that ATen keeps the 1x1 on oneDNN with one thread too.
    bias, residual, scale = (bool(epilogue & b) for b in (1, 2, 4))
    if fused:
        monkeypatch.setenv(RELU_MODE_VAR, "fused")
    geometries = {"3x3": {}, "1x1_s2": dict(r=1, pad=0, stride=2, hw=(20, 20))}
    for relu, geometry in itertools.product((True, False), geometries):
        kw = case(torch.float32, "channels_last", bias=bias, residual=residual, scale=scale, **geometries[geometry])
        assert aten_picks_onednn(kw)
        y, ops = run_and_trace(**kw, relu=relu)
        takes_pass = relu and not fused and (residual or (scale and geometry == "3x3"))
        assert pass_takes_epilogue(kw, relu, fused) == takes_pass
        assert (ONEDNN_OP in ops) == (not takes_pass), sorted(ops)
        assert ("aten::relu_" in ops) == (relu and not fused and not takes_pass), sorted(ops)
        expected = reference.conv_bias_add_relu(
            **{k: v.double() if torch.is_tensor(v) else v for k, v in kw.items()}, relu=relu
        )
        assert_close(y, expected, torch.float32, f"y (bias={bias}, residual={residual}, scale={scale}, relu={relu})",
                     reductions(kw))  # fmt: skip


@pytest.mark.parametrize("residual", [True, False])
def test_small_batch_one_conv_takes_atens_native_conv(residual):
    # ATen runs small batch-1 convs on its native kernel, faster there than a oneDNN primitive on unpacked weights;
    # the cpu backend follows it (conv + epilogue pass) and takes oneDNN where ATen does.
    # Without scale, and linear with a residual (an exact ReLU's pass would take it), so only ATen's choice decides.
    small = case(torch.float32, "channels_last", residual=residual, scale=False, n=1, c=8, hw=(6, 7), k=8)
    large = case(torch.float32, "channels_last", residual=residual, scale=False, n=1, c=64, hw=(20, 20), k=8)
    assert not aten_picks_onednn(small) and aten_picks_onednn(large)
    relu = not residual
    for kw, onednn in ((small, False), (large, True)):
        assert not pass_takes_epilogue(kw, relu)
        y, ops = run_and_trace(**kw, relu=relu)
        assert (ONEDNN_OP in ops) == onednn and ("aten::convolution" in ops) == (not onednn), sorted(ops)
        expected = reference.conv_bias_add_relu(
            **{k: v.double() if torch.is_tensor(v) else v for k, v in kw.items()}, relu=relu
        )
        assert_close(y, expected, torch.float32, "y", reductions(kw))
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_mkldnn_disabled_takes_the_pass():
    kw = case(torch.float32, "channels_last")
    with torch.backends.mkldnn.flags(enabled=False):
        y, ops = run_and_trace(**kw)
    assert ONEDNN_OP not in ops
    expected = reference.conv_bias_add_relu(**{k: v.double() if torch.is_tensor(v) else v for k, v in kw.items()})
    assert_close(y, expected, torch.float32, "y", reductions(kw))


@pytest.mark.parametrize("residual, relu", [(True, True), (True, False), (False, True)])
def test_equals_eager_conv_bias_add_relu(residual, relu):
    # Without scale either route runs the conv eager conv2d runs, with the add and ReLU after its accumulator.
    kw = case(torch.float32, "channels_last", scale=False, residual=residual)
    y, ops = run_and_trace(**kw, relu=relu)
    assert (ONEDNN_OP in ops) == (not pass_takes_epilogue(kw, relu)), sorted(ops)
    x, w, b, r = kw["x"], kw["weight"], kw["bias"], kw["residual"]
    eager = torch.nn.functional.conv2d(x, w, b, 1, 1) + (r if residual else 0)
    torch.testing.assert_close(y, eager.relu() if relu else eager, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout, residual", [("channels_last", True), ("channels_last", False), ("nchw", False)])
@pytest.mark.parametrize("relu", [True, False])
def test_nan_inf_like_the_reference(layout, residual, relu):
    # Without scale, every case but an exact ReLU over a residual (the pass) runs the primitive. The gradients come
    # from the one backward of every route, here behind a forward whose NaN and Inf came from oneDNN.
    kw = case(torch.float32, layout, residual=residual, scale=False)
    with torch.no_grad():
        kw["x"][0, 0, 2, 3] = float("nan")
        kw["x"][1, 1, 5, 5] = float("inf")
        if residual:
            kw["residual"][0, 3, 0, 0] = float("-inf")
            kw["residual"][1, 2, 7, 7] = float("nan")
            kw["residual"][1, 4, 4, 1] = float("inf")
    kw = with_leaves(kw)
    y, ops = run_and_trace(**kw, relu=relu)
    assert (ONEDNN_OP in ops) == (not (relu and residual)), sorted(ops)
    expected = reference.conv_bias_add_relu(**{k: v.double() if torch.is_tensor(v) else v for k, v in kw.items()},
                                            relu=relu)  # fmt: skip
    assert y.isnan().any() and (y.isinf().any() or not relu)
    assert_close(y, expected, torch.float32, "y", reductions(kw))
    check_grads(kw, y, relu)


@pytest.mark.skipif(not onednn_supports(torch.float32), reason="torch's oneDNN is not available here")
@pytest.mark.parametrize("residual", [True, False], ids=["binary", "unary"])
def test_a_call_onednn_refuses_takes_the_pass(residual):
    """Where torch's oneDNN op raises for a call the route gave it, the conv + epilogue pass computes y instead. Here
    its CPU kernels are fallthroughs, for this test only: the dispatcher then finds no kernel and raises, as the op's
    own checks do."""
    relu = not residual  # no exact ReLU over a residual, whose pass would take the call before oneDNN sees it
    kw = with_leaves(case(torch.float32, "channels_last", scale=False, residual=residual))
    assert ONEDNN_OP in run_and_trace(**kw, relu=relu)[1]
    lib = torch.library.Library("mkldnn", "IMPL")
    try:
        for overload in ("_convolution_pointwise", "_convolution_pointwise.binary"):
            lib.impl(overload, torch.library.fallthrough_kernel, "CPU")
        with pytest.raises(NotImplementedError):  # a c10::Error from C++, as oneDNN's own checks raise
            torch.ops.mkldnn._convolution_pointwise(kw["x"], kw["weight"], None, [1, 1], [1, 1], [1, 1], 1, "none",
                                                    [], None)  # fmt: skip
        y, ops = run_and_trace(**kw, relu=relu)
    finally:
        lib._destroy()
    assert "aten::convolution" in ops, sorted(ops)
    expected = reference.conv_bias_add_relu(**{k: v.double() if torch.is_tensor(v) else v for k, v in kw.items()},
                                            relu=relu)  # fmt: skip
    assert_close(y, expected, torch.float32, "y", reductions(kw))
    assert y.is_contiguous(memory_format=torch.channels_last)
    check_grads(kw, y, relu)
    assert ONEDNN_OP in run_and_trace(**kw, relu=relu)[1], "oneDNN's kernels were not restored"


@pytest.mark.parametrize("relu", [True, False])
def test_an_infinite_scale_is_not_folded_into_the_weight(relu):
    """Folded, an infinite scale made a whole filter +-inf, whose sums of +inf and -inf came out NaN where the
    reference's conv * scale is +-inf (a frozen BN with zero variance and eps)."""
    kw = case(torch.float32, "channels_last", residual=False, n=4, hw=(24, 24))
    kw["scale"][1] = float("inf")
    assert aten_picks_onednn(kw) and not pass_takes_epilogue(kw, relu)  # the route that would fold the scale
    y = resnet_fused.conv_bias_add_relu(**kw, relu=relu, backend="cpu")
    expected = reference.conv_bias_add_relu(**{k: v.double() if torch.is_tensor(v) else v for k, v in kw.items()},
                                            relu=relu)  # fmt: skip
    assert expected[:, 1].isinf().any() and not expected[:, 1].isnan().any()
    assert torch.equal(y.isnan(), expected.isnan()) and torch.equal(y.isinf(), expected.isinf())
    finite = expected.isfinite()
    assert_close(y[finite], expected[finite], torch.float32, "y", reductions(kw))


@pytest.mark.parametrize("relu", [True, False])
def test_a_finite_folded_weight_whose_sum_overflows_matches_float64(relu):
    """The non-finite checks of the folded weight and of the scaled weight gradient read one sum: a finite weight of
    huge entries, whose sum overflows, reads as not finite and takes the route that applies the scale after the conv.
    Still the reference's values, forward and backward."""
    kw = with_leaves(case(torch.float32, "channels_last", residual=False, n=4, hw=(24, 24)))
    kw["weight"] = torch.empty_like(kw["weight"]).uniform_(2e36, 4e36).requires_grad_()
    kw["x"] = (kw["x"].detach() * 1e-30).requires_grad_()
    kw["scale"] = torch.full_like(kw["scale"], 0.5)
    assert torch.isfinite(kw["weight"] * 0.5).all() and not torch.isfinite((kw["weight"] * 0.5).sum())
    y = resnet_fused.conv_bias_add_relu(**kw, relu=relu, backend="cpu")
    expected = reference.conv_bias_add_relu(**{k: v.double() if torch.is_tensor(v) else v for k, v in kw.items()},
                                            relu=relu)  # fmt: skip
    assert_close(y, expected, torch.float32, "y", reductions(kw))
    check_grads(kw, y, relu)


@pytest.mark.parametrize("layout, residual", [("channels_last", True), ("channels_last", False), ("nchw", False)])
def test_fused_relu_mode_runs_relu_inside_onednn(layout, residual, monkeypatch):
    # With RESNET_FUSED_ONEDNN_RELU=fused no separate ReLU runs, and a residual rides in the primitive too (the exact
    # ReLU's pass adds it otherwise); finite values agree.
    kw = case(torch.float32, layout, residual=residual, scale=False)
    y_exact, ops_exact = run_and_trace(**kw)
    assert ("aten::relu_" in ops_exact) == (ONEDNN_OP in ops_exact) == (not residual), sorted(ops_exact)
    monkeypatch.setenv(RELU_MODE_VAR, "fused")
    y_fused, ops_fused = run_and_trace(**kw)
    assert ONEDNN_OP in ops_fused and "aten::relu_" not in ops_fused
    torch.testing.assert_close(y_fused, y_exact, rtol=0 if not residual else 1e-6, atol=0 if not residual else 1e-6)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_pass_rounds_as_the_unfused_ops(dtype, layout):
    """On the conv + pass route (fp64; fp32 with a residual under an exact ReLU) the epilogue rounds conv * scale
    before adding the bias, as the unfused ops do: bitwise equal to them, also where conv * scale overflows and the
    bias would bring an unrounded product back into range (an FMA). Sizes with vector tails in both layouts."""
    kw = case(dtype, layout, n=2, c=3, k=11, hw=(5, 7), r=1, pad=0)
    big = torch.tensor(torch.finfo(dtype).max / 1.5, dtype=dtype)
    with torch.no_grad():
        kw["weight"][2:7] = torch.where(kw["weight"][2:7] > 0, big, -big)  # conv = +-big * (sum of x's signs)
        kw["scale"][2:7], kw["bias"][2:7] = 2.0, -big
        kw["x"].copy_(kw["x"].sign() * (kw["x"].abs() > 0.3))
    y, ops = run_and_trace(**kw, relu=True)
    assert ONEDNN_OP not in ops, sorted(ops)
    want = reference.conv_bias_add_relu(**kw, relu=True)
    assert want.isinf().any() and want[:, 2:7].isfinite().any()
    torch.testing.assert_close(y, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_without_a_scale_the_bias_is_summed_in_the_conv(dtype):
    """On the conv + pass route without a scale the bias is summed inside ATen's conv, as F.conv2d(x, w, b) sums it
    before rounding: bitwise equal to the unfused ops, also where the bare conv overflows fp16 (90000) and the bias
    brings it back (40000)."""
    kw = case(dtype, "nchw", scale=False, k=11, hw=(5, 7))
    with torch.no_grad():
        kw["weight"][3] = 0.0
        kw["weight"][3, 0, 1, 1] = 9.0
        kw["x"][:, 0] = 10000.0  # channel 3: 90000 before the bias
        kw["bias"][3] = -50000.0
    for relu in (True, False):
        y, ops = run_and_trace(**kw, relu=relu)
        assert ONEDNN_OP not in ops, sorted(ops)
        want = reference.conv_bias_add_relu(**kw, relu=relu)
        assert want[:, 3].isfinite().all()
        torch.testing.assert_close(y, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_relu_mode_runs_a_grouped_conv_with_residual_once(dtype, monkeypatch):
    """torch's binary op runs a grouped conv unfused, and its add_relu_ has no bf16 kernel: the call raised after
    the conv had run. A grouped conv with a residual takes ATen's conv and the pass, one conv."""
    if not onednn_supports(dtype):
        pytest.skip(f"torch's oneDNN has no {dtype} convolutions on this CPU")
    monkeypatch.setenv(RELU_MODE_VAR, "fused")
    kw = case(dtype, "channels_last", groups=4)
    assert aten_picks_onednn(kw)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = resnet_fused.conv_bias_add_relu(**kw, backend="cpu")
    names = [e.name for e in prof.events()]
    assert names.count("aten::convolution") == 1 and ONEDNN_OP not in names, sorted(set(names))
    expected = reference.conv_bias_add_relu(**{k: v.double() if torch.is_tensor(v) else v for k, v in kw.items()})
    assert_close(y, expected, dtype, "y", reductions(kw))


@pytest.mark.skipif(not onednn_supports(torch.float32), reason="torch's oneDNN is not available here")
def test_no_post_op_torch_exposes_keeps_nan_through_relu():
    """Why the exact ReLU is a pass after the primitive (docs/design.md): each ReLU-like post-op torch's oneDNN ops
    take turns a NaN pre-activation into 0, and the residual op takes no other unary post-op. Should this fail on a
    newer torch, the ReLU could move into the primitive."""
    op = torch.ops.mkldnn._convolution_pointwise
    x = torch.randn(1, 4, 3, 3).to(memory_format=torch.channels_last)
    x[0, 0, 1, 1] = float("nan")
    w, geometry = torch.randn(4, 4, 1, 1), ([0, 0], [1, 1], [1, 1], 1)
    assert F.conv2d(x, w).relu().isnan().sum() == 4  # the reference keeps the NaN pixel's 4 channels
    for attr, scalars in [
        ("relu", []),
        ("hardtanh", [0.0, float("inf")]),
        ("leaky_relu", [0.0]),
        ("leaky_relu", [-0.0]),
    ]:
        y = op(x, w, None, *geometry, attr, scalars, None)
        assert not y.isnan().any() and y[0, :, 1, 1].eq(0).all(), f"{attr}{scalars}"
    with pytest.raises(RuntimeError, match="Unary Fusion behavior undefined"):
        op.binary(x, x.clone(), w, None, *geometry, "add", 1.0, "leaky_relu", [0.0], None)


def test_batch_zero_and_inputs_untouched():
    kw = case(torch.float32, "channels_last", n=0)
    y = resnet_fused.conv_bias_add_relu(**kw, backend="cpu")
    assert y.shape == (0, 12, 9, 10)
    kw = case(torch.float32, "channels_last")
    before = {k: v.clone() for k, v in kw.items() if torch.is_tensor(v)}
    resnet_fused.conv_bias_add_relu(**kw, backend="cpu")
    for k, v in before.items():
        assert torch.equal(kw[k], v), k


@pytest.mark.parametrize("residual", [True, False])
def test_autograd_through_the_onednn_route(residual):
    # With a residual, the primitive (its binary overload) runs without ReLU; without one, with the ReLU pass.
    relu = not residual
    kw = case(torch.float32, "channels_last", scale=False, residual=residual)
    names = ("x", "weight", "bias", "residual") if residual else ("x", "weight", "bias")
    leaves = {k: kw[k].detach().requires_grad_() for k in names}
    kw.update(leaves)
    y, ops = run_and_trace(**kw, relu=relu)
    assert ONEDNN_OP in ops
    grad_out = torch.randn_like(y)
    grads = torch.autograd.grad(y, list(leaves.values()), grad_out)
    ref_leaves = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    y_ref = reference.conv_bias_add_relu(**{**kw, **ref_leaves}, relu=relu)
    ref_grads = torch.autograd.grad(y_ref, list(ref_leaves.values()), grad_out.double())
    for name, g, gr in zip(leaves, grads, ref_grads, strict=True):
        assert_close(g, gr, torch.float32, f"grad_{name}", 8 * 9 * 10 * 2)


@pytest.mark.parametrize("view", ["strided", "expanded"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("relu,residual", [(False, False), (True, False), (False, True)])
def test_bias_and_scale_views_on_the_onednn_route(view, layout, relu, residual):
    """oneDNN reads the bias as a dense vector: a strided or expanded bias (and scale) must give the same output."""
    kw = case(torch.float32, layout, residual=residual, r=1, pad=0, stride=2, hw=(20, 20))
    k = kw["weight"].shape[0]
    for name in ("bias", "scale"):
        t = kw[name]
        kw[name] = torch.zeros(2 * k)[::2].copy_(t) if view == "strided" else t[:1].expand(k)
    y, ops = run_and_trace(**kw, relu=relu)
    if layout == "channels_last" or not residual:
        assert ONEDNN_OP in ops, sorted(ops)
    expected = reference.conv_bias_add_relu(**{k: v.double() if torch.is_tensor(v) else v for k, v in kw.items()},
                                            relu=relu)  # fmt: skip
    assert_close(y, expected, torch.float32, "y", reductions(kw))


@pytest.mark.parametrize("over", [False, True], ids=["at-limit", "over-limit"])
@pytest.mark.parametrize("fused", [False, True], ids=["relu=False", "oneDNN-relu"])
def test_residual_post_op_only_up_to_its_size_limit(over, fused, monkeypatch):
    """Where no ReLU pass follows, the residual rides in oneDNN's binary post-op up to 4 MiB of output (the prepared
    path's BINARY_POST_OP_MAX_BYTES); above it, where the post-op is slower, ATen's conv and one pass take it."""
    limit = inference.BINARY_POST_OP_MAX_BYTES
    hw = (256, 257) if over else (256, 256)  # y (1, 16, 256, 256) in fp32 is exactly 4 MiB
    kw = case(torch.float32, "channels_last", n=1, c=8, k=16, hw=hw, scale=False)
    assert aten_picks_onednn(kw)
    assert (16 * hw[0] * hw[1] * 4 > limit) == over
    if fused:
        monkeypatch.setenv(RELU_MODE_VAR, "fused")
    y, ops = run_and_trace(**kw, relu=fused)
    assert (ONEDNN_OP in ops) == (not over), sorted(ops)
    assert ("aten::convolution" in ops) == over, sorted(ops)
    expected = reference.conv_bias_add_relu(**{k: v.double() if torch.is_tensor(v) else v for k, v in kw.items()},
                                            relu=fused)  # fmt: skip
    assert_close(y, expected, torch.float32, "y", reductions(kw))


def test_fp16_backward_scales_grad_out_not_the_weight():
    """With g larger than the weight the backward scaled the weight: fp16's weight * scale (90000) overflowed to inf,
    and so did grad_x, where the unfused backward's grad_out * scale stays in range."""
    x = torch.full((1, 1, 3, 3), 1e-3, dtype=torch.float16, requires_grad=True)
    w = torch.full((1, 1, 1, 1), 300.0, dtype=torch.float16, requires_grad=True)
    scale = torch.tensor([300.0], dtype=torch.float16)
    y = resnet_fused.conv_bias_add_relu(x, w, scale=scale, relu=False, backend="cpu")
    grad = torch.full_like(y, 1e-3)
    gx, gw = torch.autograd.grad(y, (x, w), grad)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = reference.conv_bias_add_relu(x64, w64, scale=scale.double(), relu=False)
    rx, rw = torch.autograd.grad(y64, (x64, w64), grad.double())
    assert gx.isfinite().all() and gw.isfinite().all()
    assert_close(gx, rx, torch.float16, "grad_x", 1)
    assert_close(gw, rw, torch.float16, "grad_weight", 9)
