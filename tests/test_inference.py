"""optimize_for_inference: prepacked oneDNN weights give the unpacked path's outputs, and never a stale result."""

from __future__ import annotations

import concurrent.futures
import copy
import functools
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close
from torch import nn

import resnet_fused
from resnet_fused import inference
from resnet_fused.inference import PackedFusedConv2d, optimize_for_inference
from resnet_fused.nn import FusedConv2d

tv = pytest.importorskip("torchvision")

PACKED_OP = "mkldnn::_convolution_pointwise"


def converted(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with non-trivial BatchNorm statistics (so the folded scales matter), converted."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return resnet_fused.convert(model.eval())[0]


def converted_resnet18() -> nn.Module:
    torch.manual_seed(0)
    return converted(tv.models.resnet18(weights=None))


def small_net(**conv_kwargs) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(FusedConv2d(4, 8, 3, padding=1, **conv_kwargs), FusedConv2d(8, 8, 1, relu=False)).eval()
    return net


def packs(model: nn.Module) -> int:
    return sum(len(m._packs) for m in model.modules() if isinstance(m, PackedFusedConv2d))


def assert_like_unpacked(y: torch.Tensor, unpacked: torch.Tensor, what: str, reductions: int) -> None:
    """A prepared model's fp32 ``y`` against the unprepared model's: NaN and Inf where it has them, finite values
    within fp32's tolerance. Not bit for bit: on the packed weight oneDNN may run another kernel than on the plain
    one, which sums in another order (it does on one thread here)."""
    assert_close(y, unpacked, torch.float32, what, reductions)


def trace(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, set[str]]:
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = model(x)
    return y, {e.name for e in prof.events()}


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_resnet18_matches_unpacked_and_float64(batch, layout):
    model = converted_resnet18()
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(batch, 3, 64, 64).contiguous(memory_format=fmt)
    with torch.no_grad():
        unpacked = model(x)
        expected = copy.deepcopy(model).double()(x.double())
    prepared = optimize_for_inference(copy.deepcopy(model))
    y, ops = trace(prepared, x)
    assert PACKED_OP in ops and packs(prepared) == 20  # every conv of resnet18 packed once, for this shape
    assert_close(y, expected, torch.float32, "packed y", reductions=4608)
    assert_close(unpacked, expected, torch.float32, "unpacked y", reductions=4608)
    torch.testing.assert_close(y, unpacked, rtol=1e-4, atol=1e-4)
    y2, _ = trace(prepared, x)  # second call reuses the packs
    assert packs(prepared) == 20 and torch.equal(y2, y)


def plain_copy(net: nn.Module) -> nn.Module:
    """A copy of a prepared net that runs the unpacked op (same parameters)."""
    plain = copy.deepcopy(net)
    for m in plain.modules():
        if isinstance(m, PackedFusedConv2d):
            m.__class__ = FusedConv2d
    return plain


def assert_fresh(net: nn.Module, x: torch.Tensor) -> None:
    """The prepared net's output equals a plain copy's (same parameters, the unpacked op)."""
    plain = plain_copy(net)
    with torch.no_grad():
        torch.testing.assert_close(net(x), plain(x), rtol=1e-5, atol=1e-5)


def test_packed_path_follows_each_input_shape():
    net = optimize_for_inference(small_net())
    plain = plain_copy(net)
    for shape in [(2, 4, 9, 9), (1, 4, 5, 7), (2, 4, 9, 9)]:
        x = torch.randn(shape)
        with torch.no_grad():
            y = net(x)
            expected = plain(x)
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert packs(net) == 2 * 2


def test_packs_are_kept_for_the_most_recently_used_shapes_only():
    """Variable image sizes (a detection backbone) must not keep one weight copy per size for the process's life."""
    net = optimize_for_inference(small_net())
    plain = plain_copy(net)
    shapes = [(1, 4, 5 + i, 5) for i in range(inference.MAX_PACKED_SHAPES + 3)]
    steady = shapes[0]
    for shape in shapes:
        for s in (shape, steady):  # the steady shape, used between the others, stays packed
            x = torch.randn(s)
            with torch.no_grad():
                y = net(x)
                expected = plain(x)
            torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    held = list(net[0]._packs)  # least recently used first
    assert held[-2:] == [shapes[-1], steady] and shapes[1] not in held
    assert packs(net) == 2 * inference.MAX_PACKED_SHAPES


def test_in_place_weight_change_repacks():
    net = optimize_for_inference(small_net())
    x = torch.randn(2, 4, 9, 9)
    assert_fresh(net, x)
    with torch.no_grad():
        net[0].weight.mul_(-2.0)
    assert_fresh(net, x)


def test_replaced_weight_repacks():
    net = optimize_for_inference(small_net())
    x = torch.randn(2, 4, 9, 9)
    assert_fresh(net, x)
    net[0].weight = nn.Parameter(torch.randn_like(net[0].weight))
    assert_fresh(net, x)


def test_load_state_dict_repacks():
    net = optimize_for_inference(small_net())
    x = torch.randn(2, 4, 9, 9)
    assert_fresh(net, x)
    other = small_net()
    with torch.no_grad():
        for p in other.parameters():
            p.normal_()
    net.load_state_dict(other.state_dict())
    assert_fresh(net, x)
    with torch.no_grad():
        torch.testing.assert_close(net(x), other(x), rtol=1e-5, atol=1e-5)


def test_to_dtype_repacks_and_to_float_again():
    net = optimize_for_inference(small_net())
    x = torch.randn(2, 4, 9, 9)
    assert_fresh(net, x)
    net.double()  # fp64: the ordinary op runs
    assert packs(net) == 0
    assert_fresh(net, x.double())
    net.float()
    assert_fresh(net, x)


def test_scale_shift_change_repacks():
    net = optimize_for_inference(small_net())
    x = torch.randn(2, 4, 9, 9)
    net[0].set_scale_shift(torch.rand(8) + 0.5, torch.randn(8))
    assert_fresh(net, x)
    with torch.no_grad():
        net[0].scale.mul_(3.0)  # the packed weight holds the folded scale
    assert_fresh(net, x)


def test_train_mode_runs_the_ordinary_op_with_gradients():
    net = optimize_for_inference(small_net())
    x = torch.randn(2, 4, 9, 9)
    trace(net, x)
    net.train()
    assert packs(net) == 0
    y = net(x)
    y.sum().backward()
    assert net[0].weight.grad is not None
    with torch.no_grad():
        net[0].weight.sub_(0.1 * net[0].weight.grad)  # an optimizer step
    net.eval()
    assert_fresh(net, x)


def test_grad_enabled_eval_call_keeps_autograd():
    """An eval-mode call with autograd takes the ordinary op, after a packed one for the same shape: y and the
    gradients of x and of both convs' weights and biases match float64's, NaN and Inf in x included."""
    net = optimize_for_inference(small_net())
    ref = copy.deepcopy(net).double()
    x = torch.randn(2, 4, 9, 9)
    x[0, 0, 1, 1], x[1, 2, 3, 3] = float("nan"), float("inf")
    _, ops = trace(net, x)
    assert PACKED_OP in ops
    x.requires_grad_()
    x64 = x.detach().double().requires_grad_()

    y = net(x)
    expected = nn.Conv2d.forward(ref[1], F.relu(nn.Conv2d.forward(ref[0], x64)))

    assert_close(y, expected, torch.float32, "y", reductions=36)
    grad_out = torch.randn(y.shape, dtype=torch.float64)
    names = ["x", *(n for n, _ in net.named_parameters())]
    grads = torch.autograd.grad(y, [x, *net.parameters()], grad_out.float())
    ref_params = dict(ref.named_parameters())
    ref_grads = torch.autograd.grad(expected, [x64, *(ref_params[n] for n in names[1:])], grad_out)
    for name, g, rg in zip(names, grads, ref_grads, strict=True):
        assert_close(g, rg, torch.float32, f"grad {name}", reductions=2 * 9 * 9)
    # NaN spreads to the weight gradients of the channels that saw it; others stay finite.
    assert grads[1].isnan().any() and grads[1].isfinite().any() and grads[0].isfinite().all()


def test_nan_inf_like_the_unpacked_path():
    net = optimize_for_inference(small_net())
    x = torch.randn(2, 4, 9, 9)
    x[0, 0, 1, 1] = float("nan")
    x[1, 2, 3, 3] = float("inf")
    y, ops = trace(net, x)
    assert PACKED_OP in ops
    plain = copy.deepcopy(net)
    for m in plain.modules():
        m.__class__ = FusedConv2d if isinstance(m, PackedFusedConv2d) else m.__class__
    with torch.no_grad():
        torch.testing.assert_close(y, plain(x), equal_nan=True)
    assert y.isnan().any()


def test_an_infinite_scale_takes_the_ordinary_op():
    """Folded into the packed weight, an infinite scale gave NaN where conv * scale is +-inf."""
    net = small_net(bias=False)
    with torch.no_grad():
        scale = torch.ones(8)
        scale[2] = float("inf")
        net[0].set_scale_shift(scale, torch.zeros(8))
    optimize_for_inference(net)
    x = torch.randn(2, 4, 9, 9).contiguous(memory_format=torch.channels_last)
    y, ops = trace(net[:1], x)
    with torch.no_grad():
        expected = net[:1].double()(x.double())
    assert PACKED_OP not in ops and expected[:, 2].isinf().any()
    assert torch.equal(y.isnan(), expected.isnan()) and torch.equal(y.isinf(), expected.isinf())
    conv = net[0]  # and the finite values: relu(conv(x) * scale + shift) in float64, not the package's own model
    want = F.conv2d(x.double(), conv.weight.double(), None, conv.stride, conv.padding) * scale.double().view(
        1, -1, 1, 1
    )
    want = torch.relu(want)
    finite = want.isfinite()
    assert_close(y[finite], want[finite], torch.float32, "finite outputs", reductions=4 * 9)


def test_a_scale_that_overflows_the_folded_weight_takes_the_ordinary_op():
    """A finite scale (3e38) times a weight of 2 overflows: the folded filter's sums of +inf and -inf were NaN where
    conv(x, w) * scale (0.25 * 3e38) is finite."""
    conv = FusedConv2d(2, 4, 1, bias=False, relu=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([2.0, -1.75]).repeat(4, 1).view(4, 2, 1, 1))
        conv.set_scale_shift(torch.full((4,), 3e38), torch.zeros(4))
    net = optimize_for_inference(nn.Sequential(conv).eval())
    x = torch.ones(2, 2, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = copy.deepcopy(net).double()(x.double())
    assert expected.isfinite().all()
    for _ in range(2):  # no pack is kept for the fast path to reuse
        y, ops = trace(net, x)
        assert PACKED_OP not in ops
        assert_close(y, expected, torch.float32, "y")


def onednn_dtype(name: str) -> torch.dtype:
    dtype = DTYPES[name]
    if not inference.onednn_supports(dtype):
        pytest.skip(f"torch's oneDNN has no {name} convolutions on this CPU: the packed path is not taken")
    return dtype


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("route", ["post-op", "pass"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("relu", [True, False])
def test_residual_conv_matches_float64_with_nan_inf(layout, relu, route, dtype_name, monkeypatch):
    # Without ReLU, a small channels_last output takes the residual as oneDNN's binary post-op; a large one, NCHW and
    # an exact ReLU run the packed conv with its bias, then one in-place pass that adds the residual and applies the
    # ReLU (resnet_fused::_epilogue_).
    if route == "pass":
        monkeypatch.setattr(inference, "BINARY_POST_OP_MAX_BYTES", 0)
    post_op = route == "post-op" and layout == "channels_last" and not relu
    dtype = onednn_dtype(dtype_name)
    torch.manual_seed(0)
    conv = FusedConv2d(4, 8, 3, padding=1, relu=relu).eval()
    with torch.no_grad():
        conv.bias.uniform_(-0.5, 0.5)
    conv.to(dtype)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, 4, 9, 9).to(dtype).contiguous(memory_format=fmt)
    residual = torch.randn(2, 8, 9, 9).to(dtype).contiguous(memory_format=fmt)
    x[0, 0, 1, 1], residual[1, 2, 3, 3], residual[0, 5, 7, 7] = float("nan"), float("inf"), float("-inf")
    before = (x.clone(), residual.clone())
    expected = copy.deepcopy(conv).double()(x.double(), residual.double())
    prepared = optimize_for_inference(copy.deepcopy(conv))
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = prepared(x, residual)
    ops = {e.name for e in prof.events()}
    assert PACKED_OP in ops and packs(prepared) == 1
    assert ("resnet_fused::_epilogue_" in ops) == (not post_op), sorted(ops)
    assert "aten::relu_" not in ops, sorted(ops)
    assert y.is_contiguous(memory_format=fmt)
    assert y.dtype == dtype and y.isnan().any() and y.isinf().any()
    assert_close(y, expected, dtype, "packed y", reductions=36)
    for t, b in zip((x, residual), before, strict=True):  # the caller's tensors untouched
        torch.testing.assert_close(t, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("groups", [1, 2])
def test_grouped_conv_with_residual_and_fused_relu_matches_float64(groups, dtype_name):
    """A small channels_last residual with a fused ReLU: the binary post-op for groups=1; for groups > 1, where torch
    does not fuse it (and its own fallback has no bf16 add_relu), the conv then one pass."""
    dtype = onednn_dtype(dtype_name)
    torch.manual_seed(0)
    conv = FusedConv2d(4, 8, 3, padding=1, groups=groups, relu=True).eval().to(dtype)
    x = torch.randn(2, 4, 6, 6).to(dtype).contiguous(memory_format=torch.channels_last)
    residual = torch.randn(2, 8, 6, 6).to(dtype).contiguous(memory_format=torch.channels_last)
    before = residual.clone()
    expected = copy.deepcopy(conv).double()(x.double(), residual.double())
    prepared = optimize_for_inference(copy.deepcopy(conv), fuse_relu=True)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = prepared(x, residual)
    ops = {e.name for e in prof.events()}
    assert PACKED_OP in ops and packs(prepared) == 1
    assert ("resnet_fused::_epilogue_" in ops) == (groups > 1), sorted(ops)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, expected, dtype, "packed y", reductions=36 // groups)
    assert torch.equal(residual, before)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_fuse_relu_is_one_pass_and_equal_on_finite_inputs(layout):
    model = converted_resnet18()
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=fmt)
    exact = optimize_for_inference(copy.deepcopy(model))
    fused = optimize_for_inference(copy.deepcopy(model), fuse_relu=True)
    y_exact, ops_exact = trace(exact, x)
    y_fused, ops_fused = trace(fused, x)
    assert "aten::relu_" in ops_exact
    # Every ReLU of resnet18 follows a FusedConv2d (the stem's too), so with fuse_relu no ReLU pass runs at all; the
    # residual add of an NCHW block is one pass (which applies the ReLU as well), of a small channels_last one a post-op.
    assert "aten::relu_" not in ops_fused
    assert ("resnet_fused::_epilogue_" in ops_fused) == (layout == "nchw")
    # The README says bitwise. Every route adds the residual after the conv's rounding, as the binary post-op does.
    assert torch.equal(y_fused, y_exact), "fused ReLU changed a finite output"


def test_fuse_relu_turns_a_nan_pre_activation_into_zero():
    """The documented cost of fuse_relu=True: where the exact path gives NaN, oneDNN's ReLU gives 0."""
    x = torch.randn(2, 4, 9, 9).contiguous(memory_format=torch.channels_last)
    x[0, 0, 1, 1] = float("nan")
    exact = optimize_for_inference(nn.Sequential(small_net()[0]).eval())
    fused = optimize_for_inference(copy.deepcopy(exact), fuse_relu=True)
    with torch.no_grad():
        y_exact, y_fused = exact(x), fused(x)
    nan = y_exact.isnan()
    assert nan.any()
    assert (y_fused[nan] == 0).all()
    torch.testing.assert_close(y_fused[~nan], y_exact[~nan], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("frozen_bn", [True, False], ids=["scale-shift", "bias"])
def test_repeated_calls_skip_the_checks_and_still_see_every_change(monkeypatch, frozen_bn):
    """Serving's steady state skips the argument checks; a changed input, parameter, buffer or setting still gets
    the checked path and a fresh result."""
    checks = []
    real = resnet_fused.contract.check_inputs
    monkeypatch.setattr(resnet_fused.contract, "check_inputs", lambda *a: checks.append(1) or real(*a))
    torch.manual_seed(0)
    conv = FusedConv2d(4, 6, 3, padding=1, bias=not frozen_bn)
    if frozen_bn:  # a converted conv: a frozen BatchNorm's buffers, no bias
        conv.scale, conv.shift = torch.rand(6) + 0.5, torch.randn(6)
    optimize_for_inference(nn.Sequential(conv).eval())
    x = torch.randn(2, 4, 7, 7).contiguous(memory_format=torch.channels_last)
    res = torch.randn(2, 6, 7, 7).contiguous(memory_format=torch.channels_last)

    def call(*args) -> tuple[torch.Tensor, int]:
        """The prepared conv's output, and how many times it ran the checks."""
        before = len(checks)
        with torch.no_grad():
            y = conv(*args)
        return y, len(checks) - before

    def fresh(*args) -> torch.Tensor:
        scale, bias = conv.scale_shift()
        with torch.no_grad():
            return FusedConv2d.conv_bias_add_relu(conv, *args, weight=conv.weight.clone(), scale=scale, bias=bias)

    call(x)
    for _ in range(3):
        y, checked = call(x)
        torch.testing.assert_close(y, fresh(x))
        assert checked == 0, "a repeated call ran the checks"
    changes = [lambda: conv.weight.mul_(-1), lambda: setattr(conv, "relu", False)]
    if frozen_bn:
        changes += [lambda: conv.scale.mul_(2), lambda: conv.shift.sub_(3)]
    else:
        changes += [lambda: conv.bias.add_(1)]
    for change in changes:
        with torch.no_grad():
            change()
        y, checked = call(x)
        torch.testing.assert_close(y, fresh(x))
        assert checked == 1, "a change did not get the checked path"
    for args in [(x, res), (x[:1],)]:  # a residual, a new shape: new signatures
        y, checked = call(*args)
        torch.testing.assert_close(y, fresh(*args))
        assert checked == 1
    with pytest.raises(ValueError, match="residual: expected the output's shape"):
        call(x, res[:, :, :6])  # a bad residual after good calls still gets the error


@pytest.mark.parametrize("grad_mode", ["no_grad", "grad"])
def test_forward_mode_ad_matches_float64(grad_mode):
    """Forward AD runs even under no_grad, where the packed path would drop the tangent: a prepared model (and a
    converted one) takes the unfused ops for dual inputs and torch.func.jvp, with float64's tangent."""
    model = converted_resnet18()
    x, tx = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    _, expected = torch.func.jvp(copy.deepcopy(model).double(), (x.double(),), (tx.double(),))
    prepared = optimize_for_inference(copy.deepcopy(model))
    with torch.no_grad() if grad_mode == "no_grad" else torch.enable_grad():
        prepared(x)  # packs, and remembers this call's signature
        for net in (model, prepared):
            _, t = torch.func.jvp(net, (x,), (tx,))
            assert_close(t, expected, torch.float32, "torch.func.jvp tangent", reductions=4608)
            with torch.autograd.forward_ad.dual_level():
                y = net(torch.autograd.forward_ad.make_dual(x, tx))
                t = torch.autograd.forward_ad.unpack_dual(y).tangent
            assert t is not None
            assert_close(t, expected, torch.float32, "dual tangent", reductions=4608)


def test_forward_mode_ad_in_a_weight_matches_float64():
    """A tangent on a weight (forward AD over parameters, via functional_call) is not lost on the packed path."""
    net = small_net()
    x = torch.randn(2, 4, 8, 8)
    w = net[0].weight.detach()
    tw = torch.randn_like(w)
    ref = copy.deepcopy(net).double()
    _, expected = torch.func.jvp(
        lambda v: torch.func.functional_call(ref, {"0.weight": v}, (x.double(),)), (w.double(),), (tw.double(),)
    )
    prepared = optimize_for_inference(copy.deepcopy(net))
    with torch.no_grad():
        prepared(x)
        with torch.autograd.forward_ad.dual_level():
            dual = torch.autograd.forward_ad.make_dual(w, tw)
            y = torch.func.functional_call(prepared, {"0.weight": dual}, (x,))
            t = torch.autograd.forward_ad.unpack_dual(y).tangent
    assert t is not None
    assert_close(t, expected, torch.float32, "dual weight tangent", reductions=72)


def test_vmap_over_a_prepared_model_matches_per_sample_calls():
    """vmap leaves the packed path (it has no batching rule) for the ordinary op's, which batches in one call."""
    prepared = optimize_for_inference(small_net())
    xb = torch.randn(3, 2, 4, 8, 8)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = torch.func.vmap(prepared)(xb)
    assert "resnet_fused::conv_bias_add_relu" in {e.name for e in prof.events()}  # the packed path never calls it
    with torch.no_grad():
        expected = torch.stack([prepared(x) for x in xb])
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_clear_errors():
    with pytest.raises(ValueError, match=r"expected a model in eval mode .* got training=True"):
        optimize_for_inference(small_net().train())
    with pytest.raises(ValueError, match=r"expected a model holding resnet_fused.nn.FusedConv2d modules, got none"):
        optimize_for_inference(nn.Sequential(nn.Conv2d(3, 3, 1)).eval())
    with pytest.raises(TypeError, match=r"expected an nn.Module, got int"):
        optimize_for_inference(3)
    with pytest.raises(TypeError, match=r"fuse_relu: expected a bool, got str"):
        optimize_for_inference(small_net(), fuse_relu="yes")


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("where", ["x", "residual"])
@pytest.mark.parametrize("kind", ["nested", "sparse"])
def test_a_nested_or_sparse_input_is_named_as_the_ordinary_op_names_it(kind, where, mode):
    """A nested tensor reads layout strided but has no sizes, a sparse one no strides: the prepared path, before and
    after a fast-path call, gives the ordinary op's error naming the argument, not torch's internal one."""
    conv = optimize_for_inference(nn.Sequential(FusedConv2d(4, 6, 3, padding=1)).eval())[0]
    x, residual = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 8, 8)
    shape = x.shape if where == "x" else residual.shape
    bad = (
        torch.nested.nested_tensor([torch.randn(*shape[1:])] * 2)
        if kind == "nested"
        else torch.randn(shape).to_sparse()
    )
    got = "got a nested tensor" if kind == "nested" else "got layout torch.sparse_coo"
    call = {"x": x, "residual": residual, where: bad}
    with mode():
        for _ in range(2):  # the second after a fast-path call
            with pytest.raises(TypeError, match=rf"^{where}: expected a dense \(strided\) tensor, {got}$"):
                conv(call["x"], residual=call["residual"])
            conv(x, residual=residual)


class MyConv(FusedConv2d):
    pass


def test_fused_conv_subclasses_are_named_not_packed():
    """A subclass may change what a call computes, so it is not packed; that is said, not silent."""
    with pytest.raises(ValueError, match=r"got none \(subclasses of FusedConv2d keep their own class, unpacked: 0 "):
        optimize_for_inference(nn.Sequential(MyConv(3, 3, 1)).eval())
    net = nn.Sequential(MyConv(4, 4, 1), *small_net()).eval()
    with pytest.warns(UserWarning, match=r"1 subclasses of FusedConv2d keep their own class, unpacked: 0 \(MyConv\)"):
        optimize_for_inference(net)
    assert type(net[0]) is MyConv and type(net[1]) is PackedFusedConv2d


def test_weights_made_under_inference_mode_are_named_in_a_warning():
    """Converted under inference_mode, the weights are inference tensors, which are never packed: said, not silent."""
    net = small_net()
    with torch.inference_mode():
        net[0].weight = nn.Parameter(net[0].weight * 1.0, requires_grad=False)  # e.g. a fold done in inference mode
    with pytest.warns(UserWarning, match=r"1 of 2 fused convs have a weight made under torch.inference_mode \(0\)"):
        optimize_for_inference(net)
    x = torch.randn(1, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        y = net(x)
    assert packs(net) == 1  # the other conv packs as before
    assert_close(y, net.double()(x.double()), torch.float32, "y")


def test_state_dict_and_deepcopy_unchanged():
    net = small_net()
    keys = list(net.state_dict())
    prepared = optimize_for_inference(copy.deepcopy(net))
    trace(prepared, torch.randn(1, 4, 5, 5))
    assert list(prepared.state_dict()) == keys
    clone = copy.deepcopy(prepared)
    assert packs(clone) == 0
    assert_fresh(clone, torch.randn(1, 4, 5, 5))


@pytest.mark.parametrize("relu", [True, False])
def test_strided_bias_parameter_matches_float64(relu):
    """oneDNN reads the bias as a dense vector: a strided bias Parameter takes the ordinary op, which copies it."""
    torch.manual_seed(0)
    conv = FusedConv2d(4, 8, 3, padding=1, relu=relu).eval()
    x = torch.randn(2, 4, 9, 9).contiguous(memory_format=torch.channels_last)
    expected = copy.deepcopy(conv).double()(x.double())
    prepared = optimize_for_inference(conv)
    prepared.bias = nn.Parameter(prepared.bias.detach().repeat_interleave(2)[::2])  # deepcopy would make it dense
    assert not prepared.bias.is_contiguous()
    with torch.no_grad():
        for _ in range(2):  # the first call and a repeated one (which must not take a remembered packed launch)
            assert_close(prepared(x), expected, torch.float32, "packed y", reductions=36)


SUM_INTO = "mkldnn::_convolution_pointwise_"  # the in-place op: the conv summed into a donated residual


def projection_block(kind: str) -> nn.Module:
    """A converted torchvision block with a projection shortcut (stride 2), non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    block = tv.models.resnet.Bottleneck if kind == "bottleneck" else tv.models.resnet.BasicBlock
    planes = 4
    out = planes * block.expansion
    ds = nn.Sequential(nn.Conv2d(8, out, 1, stride=2, bias=False), nn.BatchNorm2d(out))
    return converted(nn.Sequential(block(8, planes, stride=2, downsample=ds)))


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("fuse_relu", [False, True], ids=["exact-relu", "fused-relu"])
@pytest.mark.parametrize("kind", ["bottleneck", "basic"])
def test_block_sums_into_its_own_projection_with_nan_inf(kind, fuse_relu, dtype_name):
    """The block owns its projection's output, so the last conv sums into it in place (channels_last): the float64
    reference's outputs (NaN where it has NaN with the exact ReLU), in fp32 the out-of-place route's bit for bit on
    finite values (the same packed weights; oneDNN may pick other kernels for the separate model's plain weights,
    as it does on one thread), and the caller's input untouched."""
    dtype = onednn_dtype(dtype_name)
    model = projection_block(kind).to(dtype)
    x = torch.randn(2, 8, 10, 10).to(dtype).contiguous(memory_format=torch.channels_last)
    x[0, 1, 2, 2], x[1, 3, 5, 5] = float("nan"), float("inf")
    before = x.clone()
    with torch.no_grad():
        expected = copy.deepcopy(model).double()(x.double())
    prepared = optimize_for_inference(copy.deepcopy(model), fuse_relu=fuse_relu)
    out_of_place = copy.deepcopy(prepared)
    out_of_place[0].downsample[0].register_forward_hook(lambda *args: None)  # a hook sees the projection: no sum
    separate, ops = trace(out_of_place, x)
    assert SUM_INTO not in ops, sorted(ops)
    for _ in range(2):  # the first call and the remembered launch
        y, ops = trace(prepared, x)
        assert SUM_INTO in ops, sorted(ops)
        assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
        reductions = 72 if kind == "basic" else 36  # the block's longest conv reduction: a 3x3 over 8 or 4 channels
        if not fuse_relu:
            assert y.isnan().any()  # an Inf input meets weights of both signs: NaN, as in the reference
            assert_close(y, expected, dtype, "packed y", reductions=reductions)
        finite = expected.isfinite()  # the fused ReLU turns a NaN pre-activation into 0
        assert_close(y[finite], expected[finite], dtype, "packed y", reductions=reductions)
        if dtype == torch.float32:
            assert torch.equal(y[finite], separate[finite]), "the sum changed a finite output"
            if not fuse_relu:
                assert torch.equal(y.isnan(), separate.isnan())
        torch.testing.assert_close(x, before, rtol=0, atol=0, equal_nan=True)


def test_nchw_block_does_not_sum_in_place_and_matches():
    model = projection_block("bottleneck")
    x = torch.randn(2, 8, 10, 10)
    with torch.no_grad():
        unpacked = model(x)
    y, ops = trace(optimize_for_inference(copy.deepcopy(model)), x)
    assert SUM_INTO not in ops and PACKED_OP in ops
    torch.testing.assert_close(y, unpacked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hook_on", ["projection", "projection-norm", "last-conv", "global"])
def test_no_donation_when_a_hook_can_see_the_shortcut(hook_on):
    """A forward hook may keep the projection's output, or see it as the last conv's residual argument: the block then
    never writes into it, and what the hook kept stays what it saw."""
    model = projection_block("bottleneck")
    block = model[0]
    x = torch.randn(2, 8, 10, 10).contiguous(memory_format=torch.channels_last)
    kept = []

    def keep(module, args, kwargs, output):
        seen = output if module is not block.conv3 else kwargs["residual"]
        kept.append((seen, seen.clone()))

    prepared = optimize_for_inference(copy.deepcopy(model))
    block = prepared[0]
    target = {"projection": block.downsample[0], "projection-norm": block.downsample[1], "last-conv": block.conv3}
    if hook_on == "global":
        handle = torch.nn.modules.module.register_module_forward_hook(
            lambda m, i, o: kept.append((o, o.clone())) if m is block.downsample[0] else None
        )
    else:
        handle = target[hook_on].register_forward_hook(keep, with_kwargs=True)
    try:
        y, ops = trace(prepared, x)
    finally:
        handle.remove()
    assert SUM_INTO not in ops and PACKED_OP in ops
    assert kept and all(torch.equal(t, snapshot) for t, snapshot in kept)
    with torch.no_grad():
        expected = copy.deepcopy(model).double()(x.double())
    assert_close(y, expected, torch.float32, "y", reductions=36)
    _, ops = trace(prepared, x)  # hooks gone: the block donates again
    assert SUM_INTO in ops


def test_donate_residual_other_than_true_never_writes():
    """A truthy typo must not let the conv write into the caller's residual: forward donates only for True (the
    TorchScript exporter passes its default as a tensor), and the conv_bias_add_relu methods refuse a non-bool."""
    conv = optimize_for_inference(nn.Sequential(FusedConv2d(8, 8, 1)).eval())[0]
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    residual = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    before = residual.clone()
    with torch.no_grad():
        for value in ("no", 1, torch.tensor(True)):
            y = conv(x, residual, donate_residual=value)
            assert y.data_ptr() != residual.data_ptr() and torch.equal(residual, before), value
        for method in (conv.conv_bias_add_relu, functools.partial(FusedConv2d.conv_bias_add_relu, conv)):
            with pytest.raises(TypeError, match=r"donate_residual: expected a bool, got 1"):
                method(x, residual, donate_residual=1)
    assert torch.equal(residual, before)


def test_donate_residual_is_refused_where_the_residual_cannot_take_the_output():
    """FusedConv2d(..., donate_residual=True) on a prepared conv: a residual that overlaps x, an inference tensor
    outside inference mode, or an NCHW one is left as it is, and the result is still right."""
    torch.manual_seed(0)
    conv = optimize_for_inference(nn.Sequential(FusedConv2d(8, 8, 1)).eval())[0]
    plain = copy.deepcopy(conv)
    plain.__class__ = FusedConv2d
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        inference_residual = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    cases = {
        "overlaps x": (x, x),
        "inference tensor": (x, inference_residual),
        "nchw": (x.contiguous(), torch.randn(2, 8, 6, 6)),
    }
    for name, (inp, residual) in cases.items():
        before = residual.clone()
        with torch.no_grad():
            expected = plain(inp, residual.clone())
            y = conv(inp, residual, donate_residual=True)
        assert y.data_ptr() != residual.data_ptr(), name
        torch.testing.assert_close(residual, before, rtol=0, atol=0, msg=name)
        assert_like_unpacked(y, expected, name, reductions=8)
    residual = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = plain(x, residual.clone())
        y = conv(x, residual, donate_residual=True)
    assert y.data_ptr() == residual.data_ptr()  # a donatable one takes the output
    assert_like_unpacked(y, expected, "donated y", reductions=8)


def stage_of_blocks(kind: str) -> nn.Module:
    """A converted torchvision stage: a projection block, then two identity blocks (an nn.Sequential of blocks)."""
    torch.manual_seed(0)
    block = tv.models.resnet.Bottleneck if kind == "bottleneck" else tv.models.resnet.BasicBlock
    out = 4 * block.expansion
    ds = nn.Sequential(nn.Conv2d(8, out, 1, stride=2, bias=False), nn.BatchNorm2d(out))
    stage = nn.Sequential(block(8, 4, stride=2, downsample=ds), block(out, 4), block(out, 4))
    return converted(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), stage))


@pytest.mark.parametrize("fuse_relu", [False, True], ids=["exact-relu", "fused-relu"])
@pytest.mark.parametrize("kind", ["bottleneck", "basic"])
def test_stage_blocks_sum_into_the_previous_blocks_output(kind, fuse_relu):
    """In a prepared stage every block after the first gets its predecessor's fresh output to sum into: every residual
    add runs in place, outputs match the unpacked model's, and the stage's own input, the caller's, is never
    written."""
    model = stage_of_blocks(kind)
    prepared = optimize_for_inference(copy.deepcopy(model), fuse_relu=fuse_relu)
    stage = prepared[1]
    assert type(stage) is inference.PreparedSequential and list(stage.state_dict()) == list(model[1].state_dict())
    x = torch.randn(2, 3, 12, 12).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = model(x)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = prepared(x)
    sums = sum(e.name == SUM_INTO for e in prof.events())
    assert sums == 3 and "resnet_fused::_epilogue_" not in {e.name for e in prof.events()}
    assert_like_unpacked(y, expected, "stage y", reductions=72)
    # Called directly, the stage's input is the caller's tensor: read, never written.
    h = prepared[0](x).detach()
    before = h.clone()
    with torch.no_grad():
        assert_like_unpacked(stage(h), model[1](h), "stage(h)", reductions=72)
    assert torch.equal(h, before)
    for clone in (copy.deepcopy(prepared), pickle.loads(pickle.dumps(prepared))):
        with torch.no_grad():
            assert torch.equal(clone(x), y)  # the same packed route


@pytest.mark.parametrize(
    "hook_on", ["previous-block", "previous-last-conv", "previous-relu", "block-pre", "first-conv", "global"]
)
def test_stage_does_not_donate_what_a_hook_can_see(hook_on):
    """A hook that keeps a block's output, or sees it as the next block's input, stops that donation; what it kept
    stays what it saw."""
    model = stage_of_blocks("bottleneck")
    prepared = optimize_for_inference(copy.deepcopy(model))
    first, second = prepared[1][0], prepared[1][1]
    kept = []

    def keep_output(module, inputs, output):
        kept.append((output, output.clone()))

    def keep_input(module, inputs):
        kept.append((inputs[0], inputs[0].clone()))

    if hook_on == "previous-block":
        handle = first.register_forward_hook(keep_output)
    elif hook_on == "previous-last-conv":
        handle = first.conv3.register_forward_hook(keep_output)
    elif hook_on == "previous-relu":  # called as a module after the last conv: its output is the block's
        handle = first.relu.register_forward_hook(keep_output)
    elif hook_on == "block-pre":
        handle = second.register_forward_pre_hook(keep_input)
    elif hook_on == "first-conv":
        handle = second.conv1.register_forward_pre_hook(keep_input)
    else:
        handle = torch.nn.modules.module.register_module_forward_hook(
            lambda m, i, o: kept.append((o, o.clone())) if m is first else None
        )
    x = torch.randn(2, 3, 12, 12).contiguous(memory_format=torch.channels_last)
    try:
        with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            y = prepared(x)
    finally:
        handle.remove()
    assert kept and all(torch.equal(t, snapshot) for t, snapshot in kept)
    # Of the three in-place sums, the hook stops the second block's. One on the first block's last conv stops the
    # projection's too (it sees that residual as an input); one on the second block, the third's (any hook on a block
    # counts as one that may keep its output); a global hook, every one.
    expected = {"previous-last-conv": 1, "block-pre": 1, "global": 0}.get(hook_on, 2)
    if hook_on == "previous-relu":  # the first block runs its convs without their ReLU: no in-place projection sum
        expected = 1
    assert sum(e.name == SUM_INTO for e in prof.events()) == expected
    with torch.no_grad():
        assert_like_unpacked(y, model(x), "stage y", reductions=72)


def test_prepared_stage_trains_like_the_converted_one():
    """In training mode the stage passes donate_input on, and the ordinary op ignores it: same outputs and
    gradients as the converted model, and the input unchanged."""
    model = stage_of_blocks("bottleneck")
    prepared = optimize_for_inference(copy.deepcopy(model)).train()
    model.train()
    x = torch.randn(2, 3, 12, 12).contiguous(memory_format=torch.channels_last)
    before = x.clone()
    grads = []
    for net in (model, prepared):
        xg = x.clone().requires_grad_()
        net(xg).square().sum().backward()
        grads.append((xg.grad, [p.grad for p in net.parameters()]))
    assert torch.equal(x, before)
    torch.testing.assert_close(grads[1][0], grads[0][0])
    for a, b in zip(grads[1][1], grads[0][1], strict=True):
        torch.testing.assert_close(a, b)


def test_stage_keeps_every_module_call_semantics():
    """The stage calls its blocks as modules: global backward hooks fire, a patched instance forward runs (and gets
    no hand-over), and a block compiled with Module.compile still gives the same output."""
    model = stage_of_blocks("bottleneck")
    prepared = optimize_for_inference(copy.deepcopy(model))
    x = torch.randn(2, 3, 12, 12).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = model(x)
    seen = []
    handle = torch.nn.modules.module.register_module_full_backward_hook(
        lambda m, gi, go: seen.append(type(m)) if isinstance(m, resnet_fused.nn.Bottleneck) else None
    )
    try:
        xg = x.clone().requires_grad_()
        prepared(xg).sum().backward()  # eval mode with gradients: the ordinary op
    finally:
        handle.remove()
    assert seen.count(resnet_fused.nn.Bottleneck) == 3
    second = prepared[1][1]
    calls = []
    original = second.forward
    second.forward = lambda h: calls.append(h.clone()) or original(h)
    try:
        with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            y = prepared(x)
    finally:
        del second.forward
    assert len(calls) == 1
    assert_like_unpacked(y, expected, "stage y", reductions=72)
    # The patched block gets no hand-over, nor does the next one get the patched block's output: the projection's
    # sum alone runs in place.
    assert sum(e.name == SUM_INTO for e in prof.events()) == 1
    third = prepared[1][2]
    third.compile(backend="eager")
    with torch.no_grad():
        assert_like_unpacked(prepared(x), expected, "stage y", reductions=72)


def test_a_subclassed_projection_conv_keeps_its_output():
    """Only resnet_fused's own conv types are known to keep no reference to their output: a subclass that does keeps
    what it returned."""

    class Keeping(FusedConv2d):
        def forward(self, *args, **kwargs):
            self.kept = super().forward(*args, **kwargs)
            self.snapshot = self.kept.clone()
            return self.kept

    model = projection_block("bottleneck")
    prepared = optimize_for_inference(copy.deepcopy(model))
    projection = prepared[0].downsample[0]
    projection.__class__ = type("PackedKeeping", (Keeping, PackedFusedConv2d), {})
    x = torch.randn(2, 8, 10, 10).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = prepared(x)
        expected = model(x)
    assert torch.equal(projection.kept, projection.snapshot)
    assert_like_unpacked(y, expected, "block y", reductions=72)


@pytest.mark.parametrize("dtype_name", ["bf16", "fp16"])
def test_stage_in_low_precision_matches_float64(dtype_name):
    """bf16/fp16: the in-place sums round once where the pass rounds the conv first, so outputs may differ from the
    unpacked model's by a rounding step; both stay within the dtype's tolerance of float64."""
    dtype = onednn_dtype(dtype_name)
    model = stage_of_blocks("bottleneck").to(dtype)
    x = torch.randn(2, 3, 12, 12).to(dtype).contiguous(memory_format=torch.channels_last)
    prepared = optimize_for_inference(copy.deepcopy(model))
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = prepared(x)
        unpacked = model(x)
        expected = copy.deepcopy(model).double()(x.double())
    assert sum(e.name == SUM_INTO for e in prof.events()) == 3
    assert y.dtype == dtype
    assert_close(y, expected, dtype, "prepared y", reductions=216)
    assert_close(unpacked, expected, dtype, "unpacked y", reductions=216)


def test_fp16_without_onednn_kernels_takes_the_ordinary_op(monkeypatch):
    """Where oneDNN has no fp16 convolutions (hidden on a CPU that has them), a prepared fp16 model builds no packs and
    runs the ordinary op, within fp16's tolerance of float64; that op never writes into a donated residual."""
    supports = inference.onednn_supports
    monkeypatch.setattr(inference, "onednn_supports", lambda dtype: dtype != torch.float16 and supports(dtype))
    model = stage_of_blocks("bottleneck").half()
    prepared = optimize_for_inference(copy.deepcopy(model))
    x = torch.randn(2, 3, 12, 12).half().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = copy.deepcopy(model).double()(x.double())
    for _ in range(2):  # the first call and a repeated one
        with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            y = prepared(x)
        ops = {e.name for e in prof.events()}
        assert "resnet_fused::conv_bias_add_relu" in ops and PACKED_OP not in ops and SUM_INTO not in ops, sorted(ops)
        assert packs(prepared) == 0 and y.dtype == torch.float16
        assert_close(y, expected, torch.float16, "prepared y", reductions=216)

    conv = prepared[1][1].conv3  # the last conv of an identity block: the one a block donates its residual to
    assert conv.scale is None
    h = torch.randn(2, 4, 6, 6).half().contiguous(memory_format=torch.channels_last)
    residual = torch.randn(2, 16, 6, 6).half().contiguous(memory_format=torch.channels_last)
    before = residual.clone()
    with torch.no_grad():
        y = conv(h, residual, donate_residual=True, relu=True)  # as the block calls it
        ref = copy.deepcopy(conv).double()
        expected = F.relu(nn.Conv2d.forward(ref, h.double()) + residual.double())
    assert packs(prepared) == 0
    assert y.data_ptr() != residual.data_ptr() and torch.equal(residual, before)
    assert_close(y, expected, torch.float16, "donated call y", reductions=4)


def test_threads_sharing_a_prepared_model_get_their_own_results():
    """The hand-over between blocks is per thread: concurrent forwards of one prepared model stay correct."""
    model = stage_of_blocks("bottleneck")
    prepared = optimize_for_inference(copy.deepcopy(model))
    xs = [torch.randn(2, 3, 12, 12).contiguous(memory_format=torch.channels_last) for _ in range(4)]
    with torch.no_grad():
        expected = [model(x) for x in xs]
        prepared(xs[0])  # packed once before the threads start

    def run(i: int) -> None:
        with torch.no_grad():
            for _ in range(20):
                assert_like_unpacked(prepared(xs[i]), expected[i], f"thread {i} y", reductions=72)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(run, range(4)))  # re-raises a thread's failure


def test_the_fast_path_refuses_a_non_bool_relu_as_the_ordinary_op_does():
    """A call like the last one skips the checks; relu=1 equals True, so the type is checked before that."""
    conv = optimize_for_inference(nn.Sequential(FusedConv2d(4, 4, 3, padding=1)).eval())[0]
    x = torch.randn(1, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        conv(x, relu=True)
        for relu in (1, 1.0):
            with pytest.raises(TypeError, match=r"relu: expected a bool"):
                conv(x, relu=relu)


def _stage_model() -> nn.Module:
    """A converted stem conv and a stage of three torchvision Bottlenecks (the first with a projection)."""
    import torchvision.models.resnet as tv

    import resnet_fused

    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    blocks = nn.Sequential(tv.Bottleneck(8, 4, stride=2, downsample=down), tv.Bottleneck(16, 4), tv.Bottleneck(16, 4))
    return resnet_fused.convert(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), blocks).eval())[0]


@pytest.mark.parametrize("how", ["hooked norm", "conv forward set on the instance"])
def test_a_tensor_a_hook_or_wrapper_kept_is_never_summed_into(how):
    """The next block sums into a block's output only where nothing could have kept it: not where the last norm has
    a hook, nor where the last conv's forward is patched (a wrapper may keep its output)."""
    x = torch.randn(2, 3, 12, 12).contiguous(memory_format=torch.channels_last)
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    prepared = optimize_for_inference(_stage_model())
    block = prepared[1][0]
    if how == "hooked norm":
        block.bn3.register_forward_hook(lambda m, a, out: kept.append((out, out.clone())))
    else:
        forward = block.conv3.forward

        def patched(*args, **kwargs):
            out = forward(*args, **kwargs)
            kept.append((out, out.clone()))
            return out

        block.conv3.forward = patched
    with torch.no_grad():
        prepared(x)
        out, snapshot = kept[0]
        if how == "hooked norm":  # the block's add and ReLU ran in place on it, as in torchvision: its output
            assert torch.equal(out, block(prepared[0](x)))
        else:
            assert torch.equal(out, snapshot)


def test_one_conv_with_two_scales_from_two_threads():
    """A prepared conv served from two threads with different scales (shared by two branches): each thread's call
    uses a weight packed with its own scale."""
    import threading

    torch.manual_seed(0)
    conv = optimize_for_inference(nn.Sequential(FusedConv2d(64, 64, 3, padding=1, relu=False)).eval())[0]
    x = torch.randn(4, 64, 28, 28).contiguous(memory_format=torch.channels_last)
    scales = [torch.full((64,), 1.0), torch.full((64,), 2.0)]
    with torch.no_grad():
        refs = [F.conv2d(x, conv.weight * s.view(-1, 1, 1, 1), conv.bias * s, padding=1) for s in scales]
    wrong = [0, 0]

    def work(i: int) -> None:
        with torch.no_grad():
            for _ in range(150):
                y = conv.conv_bias_add_relu(x, scale=scales[i], bias=conv.bias * scales[i])
                wrong[i] += not torch.allclose(y, refs[i], atol=1e-3, rtol=1e-3)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == [0, 0]


def test_a_weight_data_swap_is_never_served_stale():
    """``weight.data = ...`` keeps the version counter, and the new storage could land at the freed old address; the
    packs hold the old storage, so it cannot."""
    torch.manual_seed(0)
    # A 64 MiB weight: glibc maps it on its own, and a freed mapping is where the next one of that size lands.
    prepared = optimize_for_inference(nn.Sequential(FusedConv2d(4096, 4096, 1, relu=False)).eval())
    w = prepared[0].weight
    x = torch.randn(1, 4096, 2, 2).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        prepared(x)
        old = w.data_ptr()
        for i in range(1, 30):
            w.data = torch.full_like(w, i / 1000)  # weight averaging, vector_to_parameters: swaps between calls
            if w.data_ptr() == old:  # landed where the packed weight's source was (unless the packs hold it)
                break
        expected = F.conv2d(x.double(), w.double(), prepared[0].bias.double())
        assert_close(prepared(x), expected, torch.float32, "y", reductions=4096)


# Other views of a (6, 6, 3, 3) weight's memory, with the same data pointer.
SAME_MEMORY = {
    "transpose(0, 1)": lambda w: w.transpose(0, 1),
    "transpose(2, 3)": lambda w: w.transpose(2, 3),
    # the same flat buffer reinstalled in another shape (weights loaded from one vector)
    "reshaped": lambda w: w.flatten().view(6, 3, 3, 6).permute(0, 3, 1, 2),
}


@pytest.mark.parametrize("view", list(SAME_MEMORY))
def test_a_data_swap_for_another_view_of_the_same_memory_is_never_served_stale(view):
    """``weight.data = weight.data.transpose(...)`` keeps the version counter, the storage and the data pointer; only
    the shape or strides tell the new weight from the one that was packed."""
    torch.manual_seed(0)
    prepared = optimize_for_inference(nn.Sequential(FusedConv2d(6, 6, 3, padding=1)).eval())
    conv = prepared[0]
    x = torch.randn(2, 6, 7, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for _ in range(2):  # the second call is the fast path's
            prepared(x)
        conv.weight.data = SAME_MEMORY[view](conv.weight.data)
        assert conv.weight.data_ptr() == conv.weight.untyped_storage().data_ptr()
        for _ in range(2):
            expected = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1).relu()
            assert_close(prepared(x), expected, torch.float32, "y", reductions=54)


def test_a_scale_written_without_a_version_bump_is_seen_by_the_fast_path():
    """A frozen BatchNorm's scale changed through ``.data`` (or a NumPy view, or a broadcast of buffers) keeps its
    version counter: the fast path compares the scale by value, as the pack does."""
    torch.manual_seed(0)
    conv = FusedConv2d(4, 6, 3, padding=1, bias=False)
    conv.scale, conv.shift = torch.rand(6) + 0.5, torch.randn(6)
    optimize_for_inference(nn.Sequential(conv).eval())
    x = torch.randn(2, 4, 7, 7).contiguous(memory_format=torch.channels_last)

    def expected() -> torch.Tensor:
        y = F.conv2d(x.double(), conv.weight.double(), padding=1) * conv.scale.double().reshape(-1, 1, 1)
        return (y + conv.shift.double().reshape(-1, 1, 1)).relu()

    with torch.no_grad():
        for _ in range(2):
            conv(x)
        conv.scale.data.mul_(3.0)
        conv.scale.numpy()[0] = -2.0
        for _ in range(2):
            assert_close(conv(x), expected(), torch.float32, "y", reductions=36)


def test_eval_keeps_the_packs_and_train_drops_them():
    """A serving loop may call model.eval() before every request: that changes nothing, so it must not repack."""
    net = optimize_for_inference(small_net())
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        y = net(x)
    assert packs(net) == 2
    net.eval()
    assert packs(net) == 2
    with torch.no_grad():
        assert torch.equal(net(x), y)
    net.train()
    assert packs(net) == 0


def ask_for_the_reference(monkeypatch, net: nn.Module, how: str) -> list:
    """Set the reference backend on ``net`` ("module") or by RESNET_FUSED_BACKEND ("env"); returns the list that
    gets an entry for each call the reference row runs."""
    calls = []
    real = resnet_fused.reference.unchecked  # what the reference row runs
    monkeypatch.setattr(resnet_fused.reference, "unchecked", lambda *a, **k: calls.append(1) or real(*a, **k))
    if how == "module":
        resnet_fused.nn.set_backend(net, "reference")
    else:
        monkeypatch.setenv("RESNET_FUSED_BACKEND", "reference")
    return calls


@pytest.mark.parametrize("how", ["module", "env"])
def test_another_backend_asked_for_runs_instead_of_the_packs(monkeypatch, how):
    """``backend="reference"`` (say, to compare numerics) or RESNET_FUSED_BACKEND runs that backend, never the packs;
    a backend that cannot run here fails as the unprepared module does."""
    net = optimize_for_inference(small_net())
    x = torch.randn(2, 4, 9, 9)
    calls = ask_for_the_reference(monkeypatch, net, how)
    with torch.no_grad():
        for _ in range(2):
            assert_fresh(net, x)
    assert packs(net) == 0 and len(calls) == 8  # two convs, two calls, prepared and plain each
    if "cuda" not in resnet_fused.available_backends():
        if how == "module":
            resnet_fused.nn.set_backend(net, "cuda")
        else:
            monkeypatch.setenv("RESNET_FUSED_BACKEND", "cuda")
        with torch.no_grad(), pytest.raises(RuntimeError, match="'cuda' is not available in this install"):
            net(x)


def test_an_explicit_cpu_backend_keeps_its_packs_whatever_the_env_var_says(monkeypatch):
    """``backend="cpu"`` never reads RESNET_FUSED_BACKEND (the module runs cpu whatever it says), so its packs stay."""
    net = optimize_for_inference(small_net())
    resnet_fused.nn.set_backend(net, "cpu")
    x = torch.randn(2, 4, 9, 9)
    for value in ("reference", "gpu"):
        monkeypatch.setenv("RESNET_FUSED_BACKEND", value)
        with torch.no_grad():
            assert_fresh(net, x)
        assert packs(net) == 2


class _CountReads(nn.Module):
    """A parametrization that counts how often the weight is computed."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        self.reads += 1
        return w


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last-weight"])
def test_a_parametrized_weight_is_computed_once_a_call_as_by_nn_conv2d(training, grad, channels_last):
    """A parametrized weight is recomputed on every read (spectral norm's training forward runs a power iteration per
    read): prepared or not, a fused conv reads it once a call, as nn.Conv2d does, or its weight drifts from the
    original model's. With a channels_last weight on NCHW input too (the layout check reads the parameter)."""
    reads = {}
    for kind in ("nn.Conv2d", "FusedConv2d", "prepared"):
        torch.manual_seed(0)
        conv = nn.Conv2d(4, 8, 3, padding=1) if kind == "nn.Conv2d" else FusedConv2d(4, 8, 3, padding=1, relu=False)
        if kind == "prepared":
            conv = optimize_for_inference(nn.Sequential(conv).eval())[0]
        if channels_last:
            conv = conv.to(memory_format=torch.channels_last)
        counter = _CountReads()
        nn.utils.parametrize.register_parametrization(conv, "weight", counter)
        conv.train(training)
        counter.reads = 0  # registering computed it once
        with torch.set_grad_enabled(grad):
            for _ in range(3):
                conv(torch.randn(2, 4, 6, 6))
        reads[kind] = counter.reads
    assert reads == {"nn.Conv2d": 3, "FusedConv2d": 3, "prepared": 3}


def test_spectral_norm_trains_a_prepared_conv_as_nn_conv2d():
    torch.manual_seed(0)
    original = nn.Conv2d(4, 8, 3, padding=1)
    x = torch.randn(2, 4, 6, 6)

    def run(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        conv = copy.deepcopy(original)
        if kind == "prepared":
            conv = FusedConv2d(4, 8, 3, padding=1, relu=False)
            conv.load_state_dict(original.state_dict())
            conv = optimize_for_inference(nn.Sequential(conv).eval())[0]
        conv.train()  # before registering: registration computes the weight once, a power iteration in training
        torch.manual_seed(1)  # spectral norm's random start
        nn.utils.parametrizations.spectral_norm(conv, "weight")
        with torch.no_grad():
            ys = [conv(x) for _ in range(3)]
        return torch.stack(ys), conv.parametrizations.weight[0]._u.clone()

    (y_ref, u_ref), (y, u) = run("nn.Conv2d"), run("prepared")
    torch.testing.assert_close(u, u_ref, rtol=0, atol=0)  # as many power iterations
    torch.testing.assert_close(y, y_ref)


def test_a_dilated_one_wide_kernel_runs_packed():
    """A kernel 1 wide in a dilated dimension (legal: nn.Conv2d runs it) crashed the process on torch's packed-weight
    route for some small inputs; such a dilation changes nothing, and the packed path drops it. The first three
    inputs are also all padding along W (see the next test), which run the ordinary op; the last two are packed.
    In a child process, so that a crash fails this test alone."""
    code = """
import torch, torch.nn.functional as F
from resnet_fused.nn import FusedConv2d
from resnet_fused.inference import optimize_for_inference
torch.manual_seed(0)
for k, stride, padding, dilation, w, packed in [
    (1, (1, 2), (0, 1), (1, 2), 1, False), ((3, 1), (1, 3), (1, 2), (2, 3), 1, False),
    (1, (1, 3), (0, 1), (1, 3), 2, False), (1, (1, 2), (0, 1), (1, 2), 4, True), ((3, 1), (1, 3), (1, 0), (2, 3), 5, True),
]:
    conv = optimize_for_inference(FusedConv2d(8, 8, k, stride=stride, padding=padding, dilation=dilation).eval())
    x = torch.randn(1, 8, 4, w)
    with torch.no_grad():
        y = conv(x)
    want = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), stride, padding, dilation).relu()
    print((y.double() - want).abs().max().item() < 1e-5 and bool(conv._packs) == packed)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    assert proc.stdout.split() == ["True"] * 5


def test_an_output_all_padding_along_a_dimension_runs_unpacked():
    """A conv whose kernel taps along one dimension all land on padding (legal: nn.Conv2d gives the bias there)
    crashed the process on torch's packed-weight route (one thread; 5 of 800 random small geometries, all of this
    kind). Such a call takes the ordinary op; a neighbour whose taps reach the input stays packed. In a child
    process, so that a crash fails this test alone."""
    code = """
import torch, torch.nn.functional as F
from resnet_fused.nn import FusedConv2d
from resnet_fused.inference import optimize_for_inference
torch.manual_seed(0)
torch.set_num_threads(1)
# (kernel, stride, padding, dilation, input H, W, packed): the first five crashed packed.
for k, s, p, d, h, w, packed in [
    ((2, 2), (2, 2), (0, 3), (2, 2), 3, 1, False), ((3, 2), (2, 2), (3, 3), (3, 2), 1, 1, False),
    ((3, 2), (2, 3), (0, 4), (1, 2), 6, 1, False), ((1, 2), (2, 3), (4, 4), (3, 3), 2, 2, False),
    ((3, 2), (1, 2), (1, 3), (1, 2), 1, 1, False), ((2, 2), (2, 2), (0, 2), (2, 2), 3, 1, True),
]:
    conv = optimize_for_inference(FusedConv2d(4, 4, k, stride=s, padding=p, dilation=d, relu=False).eval())
    x = torch.randn(1, 4, h, w)
    with torch.no_grad():
        y = conv(x)
        y = conv(x)
    want = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), s, p, d)
    print((y.double() - want).abs().max().item() < 1e-5 and bool(conv._packs) == packed)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    assert proc.stdout.split() == ["True"] * 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("c_in", "groups", "kernel", "stride", "hw", "packed"),
    [
        (1, 1, 2, (1, 2), (8, 3), False),  # one input channel, one output column: wrong values packed
        (3, 3, 2, (1, 2), (7, 2), False),
        (1, 1, 3, (1, 3), (5, 5), False),
        (2, 1, 2, (1, 2), (8, 3), True),  # two input channels: packed, and right
        (1, 1, 2, (1, 2), (8, 5), True),  # two output columns: packed, and right
    ],
)
def test_one_input_channel_and_one_output_column_runs_unpacked(c_in, groups, kernel, stride, hw, packed, dtype):
    """torch's packed-weight route gave wrong values (up to 1e37, or NaN) for one input channel per group with a
    stride (1, 2) or (1, 3) and a one-column output; such a call takes the ordinary op, its neighbours stay packed."""
    if not inference.onednn_supports(dtype):
        pytest.skip(f"torch's oneDNN has no {dtype} convolutions on this CPU")
    torch.manual_seed(0)
    conv = FusedConv2d(c_in, 3 * groups, kernel, stride=stride, groups=groups, relu=False).to(dtype)
    model = optimize_for_inference(nn.Sequential(conv).eval())
    x = torch.randn(2, c_in, *hw).to(dtype)
    with torch.no_grad():
        for _ in range(2):
            assert_close(model(x), F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), stride, 0, 1, groups),
                         dtype, "prepared y", c_in // groups * kernel * kernel)  # fmt: skip
    # In 16 bits one input channel per group runs unpacked anyway (see the next test).
    assert bool(model[0]._packs) == (packed and (dtype == torch.float32 or c_in // groups > 1))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize(
    ("c_in", "groups", "kernel", "stride", "packed"),
    [
        (1, 1, (1, 1), (1, 1), False),  # one input channel per group: a NaN leaked to a neighbour packed
        (2, 2, (3, 1), (1, 2), False),
        (4, 4, (1, 3), (1, 1), False),
        (2, 1, (1, 1), (1, 1), True),  # two: packed, and right
    ],
)
def test_one_input_channel_per_group_in_bf16_runs_unpacked(c_in, groups, kernel, stride, packed, layout):
    """In bf16, torch's packed-weight route with one input channel per group also made an output next to an Inf or
    NaN input NaN (finite inputs came out right); such a call takes the ordinary op, whose non-finite outputs are
    where float64's are."""
    if not inference.onednn_supports(torch.bfloat16):
        pytest.skip("torch's oneDNN has no bf16 convolutions on this CPU")
    torch.manual_seed(0)
    padding = (kernel[0] // 2, kernel[1] // 2)
    conv = FusedConv2d(c_in, 4, kernel, stride=stride, padding=padding, groups=groups, relu=False).bfloat16()
    model = optimize_for_inference(nn.Sequential(conv).eval())
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    for value in (float("inf"), float("nan")):
        x = torch.randn(2, c_in, 6, 7).bfloat16()
        x[1, c_in // 2, 2, 3] = value
        x = x.contiguous(memory_format=fmt)
        want = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), stride, padding, 1, groups)
        with torch.no_grad():
            y = model(x)
        assert torch.equal(y.isnan(), want.isnan()) and torch.equal(y.isinf(), want.isinf()), value
        finite = want.isfinite()
        assert_close(y[finite], want[finite], torch.bfloat16, "finite outputs", c_in // groups * kernel[0] * kernel[1])
    assert bool(model[0]._packs) == packed


def test_a_deep_copy_after_a_parametrization_leaves_the_packs_behind():
    """A parametrization (weight norm, to fine-tune) added to a prepared conv that has packed: its class copies
    __dict__ unless the module defines __deepcopy__, and the opaque packs cannot be copied (AveragedModel deep-copies
    its model). The copy computes as the original; the original drops its packs, which could never serve again."""
    net = optimize_for_inference(small_net())
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        net(x)
    assert net[0]._packs
    copied = copy.deepcopy(net)  # unparametrized: no packs either
    assert not copied[0]._packs
    torch.nn.utils.parametrizations.weight_norm(net[0], "weight")
    ema = torch.optim.swa_utils.AveragedModel(net)
    with torch.no_grad():
        y = net(x)
        torch.testing.assert_close(ema(x), y, rtol=0, atol=0)
    assert not net[0]._packs and net[0]._last_call is None
    assert type(ema.module[0]).__name__ == "ParametrizedPackedFusedConv2d"


@pytest.mark.parametrize("how", ["module", "env"])
def test_a_backend_asked_for_after_packed_calls_runs_from_the_next_call(monkeypatch, how):
    """The fast path's cached signature holds the module's backend and RESNET_FUSED_BACKEND: asked for after calls
    that ran the packs, another backend runs from the next call on."""
    net = optimize_for_inference(small_net())
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        net(x)
        net(x)  # the second call takes the fast path
    calls = ask_for_the_reference(monkeypatch, net, how)
    assert_fresh(net, x)
    assert len(calls) == 4  # two convs, prepared and plain


def test_the_onednn_relu_variable_applies_to_prepared_models(monkeypatch):
    """RESNET_FUSED_ONEDNN_RELU=fused makes every prepared conv take oneDNN's ReLU (NaN becomes 0), also when set
    after calls that took the fast path with the exact ReLU (which keeps NaN)."""
    net = optimize_for_inference(nn.Sequential(FusedConv2d(4, 8, 3, padding=1)).eval())
    x = torch.randn(1, 4, 6, 6)
    x[0, 0, 2, 2] = float("nan")
    with torch.no_grad():
        assert net(x).isnan().any()
        net(x)
        monkeypatch.setenv(inference.RELU_MODE_VAR, "fused")
        y = net(x)
        fused = optimize_for_inference(copy.deepcopy(net), fuse_relu=True)
        monkeypatch.delenv(inference.RELU_MODE_VAR)
        expected = fused(x)
    assert not y.isnan().any() and packs(net) == 1
    torch.testing.assert_close(y, expected)


def test_a_fused_step_through_a_flat_parameter_buffer_repacks():
    """A weight that is a view of a flat parameter (as some wrappers keep them): a fused optimizer stepping the flat
    buffer updates the weight without bumping its version; the step hook drops its packs by storage."""
    torch.manual_seed(0)
    conv = FusedConv2d(4, 8, 3, padding=1, bias=False, relu=False)
    flat = nn.Parameter(torch.randn(8 * 4 * 9 + 16))
    conv.weight = nn.Parameter(flat.detach()[16:].view(8, 4, 3, 3))
    net = optimize_for_inference(nn.Sequential(conv).eval())
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        net(x)
    flat.grad = torch.ones_like(flat)
    torch.optim.SGD([flat], lr=1.0, fused=True).step()
    with torch.no_grad():
        y = net(x)
    assert_close(y, F.conv2d(x.double(), conv.weight.double(), padding=1), torch.float32, "y", reductions=36)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_an_empty_batch_runs_the_ordinary_op(layout):
    """Batch 0 takes no pack (it would hold one of the few slots for nothing) and gives the unprepared module's shape
    and strides."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    net = optimize_for_inference(small_net())
    plain = plain_copy(net)
    x = torch.randn(0, 4, 9, 9).contiguous(memory_format=fmt)
    with torch.no_grad():
        y, want = net(x), plain(x)
    assert y.shape == want.shape == (0, 8, 9, 9) and y.stride() == want.stride()
    assert packs(net) == 0
