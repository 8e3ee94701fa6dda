"""The correctness suite of conv_bias_add_relu: every output and gradient against float64, per (backend, device).

The targets are the backend table's available rows (not "reference") on each of their devices that exists here;
RESNET_FUSED_TEST_BACKENDS narrows them. CI runs it on cpu, and on triton under TRITON_INTERPRET=1 (trimmed
variants, every code path still covered); on a GPU the same suite runs on cuda and triton-on-cuda.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    ALL_EPILOGUES,
    CASES,
    DTYPES,
    FULL,
    LAYOUTS,
    PREACT,
    Case,
    Epilogue,
    Inputs,
    Target,
    assert_close,
    backward_op,
    cases_for,
    check_call,
    forward_op,
    make_inputs,
    reference_forward,
    reference_grads,
    registered_forward_ops,
    sweep_draws,
    target_params,
    targets,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import resnet_fused
from resnet_fused import reference
from resnet_fused.backends import BACKENDS

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
CL = "channels_last"


def run(target: Target, inputs: Inputs, **over) -> torch.Tensor:
    kwargs = dict(inputs.kwargs, **over)
    return resnet_fused.conv_bias_add_relu(**inputs.tensors, **kwargs, backend=target.backend)


def check(target: Target, case: Case, dtype, layout, epilogue, what: str = "") -> None:
    inputs = make_inputs(case, dtype, layout, epilogue, device=target.device)
    y = run(target, inputs)
    check_call(y, inputs, dtype, what or f"{target}")
    for name, t in inputs.tensors.items():
        assert t is None or t.dtype == dtype, f"{name} changed dtype"


# ---- every case x dtype x layout x epilogue ----


FIRST_CASES = list(CASES)[:9]


def case_variants(t: Target) -> list:
    cases = cases_for(t.device)
    if not t.slow:
        full = [(d, lay, e) for d in DTYPES for lay in LAYOUTS for e in (FULL, PREACT)]
        # The tile-shape cases add geometry, not layout paths: every dtype, both memory formats, one view.
        lean = [(d, lay, FULL) for d in DTYPES for lay in ("nchw", CL)] + [(F32, "noncontig", PREACT)]
        return [(name, *v) for name in cases for v in (full if name in FIRST_CASES else lean)]
    trimmed = [(F32, CL, FULL), (F32, "nchw", PREACT), (F16, CL, FULL), (BF16, "noncontig", FULL)]
    every_dtype = [(d, lay, FULL) for d in (F32, F16, BF16) for lay in ("nchw", CL)]
    return [(name, *v) for name in cases for v in trimmed] + [
        (name, *v) for name in ("odd_3x3", "odd_1x1") for v in every_dtype if v not in trimmed
    ]


@pytest.mark.parametrize("target,variant", target_params(case_variants))
def test_cases_match_float64(target, variant):
    name, dtype, layout, epilogue = variant
    check(target, cases_for(target.device)[name], dtype, layout, epilogue)


def epilogue_variants(t: Target) -> list:
    if not t.slow:
        return [(d, lay, e) for d in DTYPES for lay in LAYOUTS for e in ALL_EPILOGUES]
    return [(F32, LAYOUTS[i % 2], e) for i, e in enumerate(ALL_EPILOGUES)] + [
        (F16, CL, e) for e in ALL_EPILOGUES if e.residual or e.scale
    ]


@pytest.mark.parametrize("target,variant", target_params(epilogue_variants))
def test_every_epilogue_matches_float64(target, variant):
    check(target, CASES["3x3"], *variant)


# ---- gradcheck, opcheck, compile ----


def gradcheck_variants(t: Target) -> list:
    # Under the interpreter one gradcheck takes minutes; the full epilogue reaches every backward path.
    return [(FULL,)] if t.slow else [(FULL,), (PREACT,), (Epilogue(False, True, False, True),)]


@pytest.mark.parametrize("target,variant", target_params(gradcheck_variants))
def test_gradcheck_float64(target, variant):
    (epilogue,) = variant
    inputs = make_inputs(Case(1, 4, 6, 5, 4, 3, 3, 2, 1, 1, 2), F64, "nchw", epilogue, device=target.device)
    leaves = inputs.leaves()

    def fn(*tensors):
        return run(target, inputs._replace(tensors=dict(inputs.tensors, **dict(zip(leaves, tensors, strict=True)))))

    assert torch.autograd.gradcheck(fn, list(leaves.values()), eps=1e-6, atol=1e-6)


def opcheck_variants(t: Target) -> list:
    if t.slow:
        return [(True, CL, FULL), (False, "nchw", PREACT)]
    return [(g, lay, e) for g in (False, True) for lay in ("nchw", CL) for e in (FULL, PREACT)]


@pytest.mark.parametrize("target,variant", target_params(opcheck_variants))
def test_opcheck_forward_op(target, variant):
    requires_grad, layout, epilogue = variant
    inputs = make_inputs(CASES["3x3"], F32, layout, epilogue, device=target.device, requires_grad=requires_grad)
    torch.library.opcheck(forward_op(target.backend), inputs.op_args())


@pytest.mark.parametrize("target", target_params())
@pytest.mark.parametrize("relu", [True, False])
def test_opcheck_backward_op(target, relu):
    inputs = make_inputs(CASES["1x1_s2"], F32, CL, FULL, device=target.device, requires_grad=False)
    y = run(target, inputs, relu=relu)
    x, weight = inputs.tensors["x"], inputs.tensors["weight"]
    for mask in ([True, True, True, relu], [False, True, False, False], [True, False, True, relu]):
        args = (inputs.grad_out, y, x, weight, inputs.kwargs["scale"], [2, 2], [0, 0], [1, 1], 1, relu, mask)
        torch.library.opcheck(backward_op(target.backend), args)


@pytest.mark.parametrize("target", target_params())
def test_compile_fullgraph(target):
    torch._dynamo.reset()
    inputs = make_inputs(CASES["3x3"], F32, CL, FULL, device=target.device)
    kwargs = inputs.kwargs

    def block(x, weight, bias, residual):
        return resnet_fused.conv_bias_add_relu(x, weight, bias, residual, **kwargs, backend=target.backend)

    # Under the interpreter inductor would try to compile Triton code for the surrounding graph.
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager" if target.slow else "inductor")
    check_call(compiled(**inputs.tensors), inputs, F32, f"{target} compiled")  # against float64, gradients too
    for t in inputs.tensors.values():
        t.grad = None
    y = compiled(**inputs.tensors)
    y_eager = block(**inputs.tensors)
    torch.testing.assert_close(y, y_eager)
    leaves = list(inputs.tensors.values())
    for g, ge in zip(
        torch.autograd.grad(y, leaves, inputs.grad_out),
        torch.autograd.grad(y_eager, leaves, inputs.grad_out),
        strict=True,
    ):
        torch.testing.assert_close(g, ge)
    torch._dynamo.reset()


@pytest.mark.parametrize("residual_batch", ["unbacked", "static"])
def test_compile_with_an_unbacked_batch(residual_batch):
    """A data-dependent (unbacked) batch size, as after a filter: the residual's shape check cannot compare in
    Python there, so it is a runtime assert. (A mismatched call of the same graph trips a dynamo guard assertion in
    torch 2.14 before the assert runs, so it is not tested here; eager calls keep the ValueError.)"""
    from torch._dynamo.decorators import mark_unbacked

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    x, w, r = (torch.randn(s, generator=g) for s in [(4, 3, 8, 8), (5, 3, 3, 3), (4, 5, 8, 8)])

    def block(x, r):
        return resnet_fused.conv_bias_add_relu(x, w, None, r, padding=1)

    mark_unbacked(x, 0)
    if residual_batch == "unbacked":
        mark_unbacked(r, 0)
    try:
        compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
        y = compiled(x, r)
        expected = (F.conv2d(x.double(), w.double(), padding=1) + r.double()).relu()
        assert_close(y, expected, torch.float32, "y", reductions=27)
    finally:
        torch._dynamo.reset()


def test_compiled_residual_shape_error_names_the_shapes():
    """With static shapes a wrong residual is known while tracing: the error names both shapes, as in eager."""
    torch._dynamo.reset()
    x, w, r = torch.randn(2, 4, 8, 8), torch.randn(4, 4, 3, 3), torch.randn(2, 4, 7, 7)
    try:
        with pytest.raises(
            Exception, match=re.escape("residual: expected the output's shape (2, 4, 8, 8), got (2, 4, 7, 7)")
        ):
            torch.compile(lambda x, r: resnet_fused.conv_bias_add_relu(x, w, None, r, padding=1), fullgraph=True)(x, r)
    finally:
        torch._dynamo.reset()


# ---- the random sweep ----


@st.composite
def configs(draw, device: str):
    """A valid configuration: geometry, dtype, layout, every epilogue option and which gradients are asked for."""
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    c, k = groups * draw(st.integers(1, 4)), groups * draw(st.integers(1, 4))
    r, s = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    min_h = max(1, dilation[0] * (r - 1) + 1 - 2 * padding[0])
    min_w = max(1, dilation[1] * (s - 1) + 1 - 2 * padding[1])
    h, w = draw(st.integers(min_h, min_h + 8)), draw(st.integers(min_w, min_w + 8))
    case = Case(draw(st.integers(1, 3)), c, h, w, k, r, s, stride, padding, dilation, groups)
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from([*LAYOUTS, "offset"]))
    epilogue = Epilogue(*draw(st.tuples(*[st.booleans()] * 4)))
    wants = draw(st.tuples(*[st.booleans()] * 4).filter(any))  # x, weight, bias, residual
    return case, dtype, layout, epilogue, wants


@pytest.mark.parametrize("target", target_params())
def test_random_sweep_matches_float64(target):
    """Forward and every gradient asked for, against float64. RESNET_FUSED_SWEEP=full draws 500 per target."""

    @settings(
        max_examples=sweep_draws(target),
        deadline=None,
        database=None,
        derandomize=os.environ.get("RESNET_FUSED_SWEEP") != "full",
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(config=configs(target.device))
    def sweep(config):
        case, dtype, layout, epilogue, wants = config
        inputs = make_inputs(case, dtype, layout, epilogue, device=target.device)
        for t, want in zip(inputs.tensors.values(), wants, strict=True):
            if t is not None:
                t.requires_grad_(want)
        check_call(run(target, inputs), inputs, dtype, f"{target} {config}")

    sweep()


# ---- edge cases: batch 0, C = 0, NaN/Inf, no mutation, determinism ----


@pytest.mark.parametrize("target", target_params())
def test_inputs_never_modified(target):
    inputs = make_inputs(CASES["1x1"], F32, CL, FULL, device=target.device)
    saved = {k: v.detach().clone() for k, v in inputs.tensors.items()}
    scale, grad_saved = inputs.kwargs["scale"].clone(), inputs.grad_out.clone()
    y = run(target, inputs)
    y.backward(inputs.grad_out)
    ptrs = {t.data_ptr() for t in inputs.tensors.values()}
    for k, v in inputs.tensors.items():
        assert torch.equal(v.detach(), saved[k]), f"{k} was modified"
        assert v.grad is not None and v.grad.data_ptr() not in ptrs, f"grad_{k} aliases an input"
    assert torch.equal(inputs.kwargs["scale"], scale) and torch.equal(inputs.grad_out, grad_saved)


def scale_route_variants(t: Target) -> list:
    # The backward puts the frozen scale on the smaller of g and the weight ("3x3": the weight; "odd_strided": g),
    # and scales g in place when it is the op's own buffer (ReLU on, no gradient returned for the residual).
    routes = [(case, res) for case in ("3x3", "odd_strided") for res in ("none", "constant", "grad")]
    return routes[3:5] if t.slow else [(c, r, d) for c, r in routes for d in (F32, BF16)]


@pytest.mark.parametrize("target,variant", target_params(scale_route_variants))
def test_scale_backward_routes_match_float64(target, variant):
    case, residual, dtype = (*variant, F32)[:3]
    inputs = make_inputs(CASES[case], dtype, CL, Epilogue(True, True, residual != "none", True), device=target.device)
    if residual == "constant":
        inputs.tensors["residual"].requires_grad_(False)
    grad_saved = inputs.grad_out.clone()
    check_call(run(target, inputs), inputs, dtype, f"{target} {case} residual={residual}")
    assert torch.equal(inputs.grad_out, grad_saved), "grad_out was modified"


@pytest.mark.parametrize("target", target_params())
@pytest.mark.parametrize("layout", ["nchw", CL])
def test_batch_zero(target, layout):
    inputs = make_inputs(Case(0, *CASES["3x3"][1:]), F32, layout, FULL, device=target.device)
    y = run(target, inputs)
    assert y.shape == (0, 8, 8, 8)
    y.sum().backward()
    t = inputs.tensors
    assert torch.equal(t["bias"].grad, torch.zeros(8, device=target.device))
    assert t["weight"].grad.shape == t["weight"].shape and not t["weight"].grad.any()
    assert t["x"].grad.shape == t["x"].shape and t["residual"].grad.shape == (0, 8, 8, 8)


@pytest.mark.parametrize("backend", registered_forward_ops())
@pytest.mark.parametrize("batch", [0, 2])
def test_backward_op_strides_match_its_fake_for_a_permuted_weight(backend, batch):
    """grad_weight takes the weight's memory format, dense, as the fake says: for a weight whose strides are neither
    format's (H and W swapped), and for batch 0, whose zero gradients took the weight's own strides."""
    dev = "cuda" if backend in ("cuda", "triton") and torch.cuda.is_available() else "cpu"
    weight = torch.randn(6, 4, 3, 3, device=dev).transpose(2, 3).contiguous().transpose(2, 3)
    x = torch.randn(batch, 4, 5, 5, device=dev)
    grad_out, out = torch.randn(batch, 6, 3, 3, device=dev), torch.rand(batch, 6, 3, 3, device=dev)
    args = (grad_out, out, x, weight, None, [1, 1], [0, 0], [1, 1], 1, True, [True] * 4)
    torch.library.opcheck(backward_op(backend), args, test_utils=("test_faketensor",))
    assert backward_op(backend)(*args)[1].is_contiguous()


def test_zero_input_channels_are_refused_by_the_public_function():
    """C = 0: ATen's conv2d gives a 0-channel output, so no backend could agree with the reference; the public
    function refuses it for every backend, naming x (the ops directly: test_bad_input_errors_from_every_*_op)."""
    x, weight = torch.randn(2, 0, 5, 4), torch.randn(3, 0, 3, 3)
    for backend in BACKENDS.choices():
        with pytest.raises(ValueError, match=r"x: expected at least 1 input channel, got C=0"):
            resnet_fused.conv_bias_add_relu(
                x, weight, torch.randn(3), torch.randn(2, 3, 5, 4), padding=1, backend=backend
            )


@pytest.mark.parametrize("target", target_params())
@pytest.mark.parametrize("layout", ["nchw", CL])
@pytest.mark.parametrize("relu", [True, False])
def test_nan_inf_propagate_like_reference(target, layout, relu):
    inputs = make_inputs(CASES["3x3"], F32, layout, Epilogue(True, True, True, relu), device=target.device)
    t = inputs.tensors
    with torch.no_grad():
        t["x"][0, 0, 2, 3] = float("nan")
        t["x"][1, 1, 5, 5] = float("inf")
        t["residual"][0, 3, 0, 0] = float("-inf")
        t["residual"][1, 2, 7, 7] = float("nan")
        t["residual"][1, 4, 4, 1] = float("inf")
    y = run(target, inputs)
    assert y.isnan().any() and (y.isinf().any() or not relu)
    # y and every gradient against float64, NaN and Inf positions equal
    check_call(y, inputs, F32, f"{target} {layout} relu={relu}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("kind", ["inf", "huge"])
@pytest.mark.parametrize("target", target_params())
def test_a_scale_whose_product_with_the_weight_is_not_finite_matches_float64(target, kind, relu, dtype):
    """Where the output has many elements beside the weight, the CPU forward folds the scale into the weight and a
    backward may take w * s for its dgrad and scale its wgrad after the sum. An infinite scale, or a finite one (3e38)
    whose product with a weight of 2 overflows, must give the unfused ops' results: the fold made filters +-inf,
    whose sums are NaN where conv * scale is finite (huge) or +-inf, and s * sum(g * x) was +-inf where the
    unfused sum(g * s * x) is NaN (inf)."""
    dev = target.device
    x = torch.ones(2, 2, 8, 8, dtype=dtype, device=dev).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.tensor([2.0, -1.75]).repeat(4, 1).view(4, 2, 1, 1).to(dev, dtype).requires_grad_()  # conv(x, w) = 0.25
    scale = torch.full((4,), 3e38 if kind == "huge" else 1.5, dtype=dtype, device=dev)
    if kind == "inf":
        scale[1] = float("inf")
    grad = torch.full(
        (2, 4, 8, 8), 1e-3 if kind == "huge" else 1.0, dtype=dtype, device=dev
    )  # keeps the huge case's sums finite
    if kind == "inf":
        grad[:, :, ::2] *= -0.5  # terms of both signs, not summing to 0: the unfused sums of +-inf are NaN
    y = resnet_fused.conv_bias_add_relu(x, w, scale=scale, relu=relu, backend=target.backend)
    gx, gw = torch.autograd.grad(y, (x, w), grad)
    x64, w64 = (t.detach().cpu().double().requires_grad_() for t in (x, w))
    y64 = reference.conv_bias_add_relu(x64, w64, scale=scale.cpu().double(), relu=relu)
    rx, rw = torch.autograd.grad(y64, (x64, w64), grad.cpu().double())
    for name, got, want, n in (("y", y, y64, 2), ("grad_x", gx, rx, 4), ("grad_weight", gw, rw, 128)):
        assert_close(got, want, dtype, name, n)  # NaN and Inf positions first
    assert rw.isnan().any() if kind == "inf" else (y64.isfinite().all() and y64.abs().max() > 1e37)


# (dtype, x's shape and strides, weight's shape and strides, conv): dense tensors whose size-1 dim has an odd stride
ODD_SIZE_ONE_STRIDES = {
    # F.conv2d's grad_weight is wrong
    "x-grouped-fp64": (F64, (2, 9, 1, 2), (18, 1, 1, 9), (6, 3, 3, 2), (18, 1, 6, 3), dict(stride=(1, 3), padding=(2, 0), groups=3)),
    # F.conv2d's y (with a scale folded into the weight) and grad_x are wrong
    "weight-grouped-fp32": (F32, (1, 9, 1, 2), (18, 1, 18, 9), (6, 3, 2, 1), (6, 1, 3, 23), dict(padding=(1, 0), groups=3)),
    # F.conv2d raises "slow_conv2d: grad_weight must be contiguous"
    "weight-fp64": (F64, (2, 2, 2, 2), (8, 1, 4, 2), (1, 2, 2, 1), (4, 1, 2, 7), dict(padding=(1, 0))),
    # x and weight canonical: with bias_residual, the residual's odd stride reaches oneDNN's binary post-op
    "residual-fp32": (F32, (2, 16, 1, 12), (192, 1, 192, 16), (8, 16, 3, 3), (144, 1, 48, 16), dict(padding=(1, 1))),
}  # fmt: skip


def _odd_size_one_strides(shape: torch.Size, dtype: torch.dtype, device: str) -> torch.Tensor:
    """A channels_last tensor whose size-1 dims have stride 1, not their canonical one."""
    c, h, w = shape[1:]
    strides = [1 if size == 1 else stride for size, stride in zip(shape, (h * w * c, 1, w * c, c), strict=True)]
    return torch.empty_strided(shape, strides, dtype=dtype, device=device)


@pytest.mark.parametrize("create_graph", [False, True], ids=["", "create_graph"])
@pytest.mark.parametrize("epilogue", ["conv", "scale_bias_residual_relu", "bias_residual"])
@pytest.mark.parametrize("case", list(ODD_SIZE_ONE_STRIDES))
@pytest.mark.parametrize("target", target_params())
def test_an_odd_stride_of_a_size_one_dim_gives_the_right_gradients(target, case, epilogue, create_graph):
    """Dense channels_last tensors but for the stride of a size-1 dim: ATen's CPU convs misread such a stride, or
    refuse it; the op gives them canonical strides. Against float64 from contiguous copies; with create_graph, the
    backward of differentiable ATen ops."""
    torch.manual_seed(0)
    dtype, x_shape, x_strides, w_shape, w_strides, conv = ODD_SIZE_ONE_STRIDES[case]
    dev = target.device
    x0, w0 = (torch.randn(shape, dtype=F64, device=dev) for shape in (x_shape, w_shape))
    x, w = (torch.empty_strided(sh, st, dtype=dtype, device=dev).copy_(t).requires_grad_()
            for sh, st, t in ((x_shape, x_strides, x0), (w_shape, w_strides, w0)))  # fmt: skip
    k = w_shape[0]
    out_shape = F.conv2d(x0, w0, **conv).shape
    relu = epilogue == "scale_bias_residual_relu"
    extra = {}
    if epilogue != "conv":
        extra = dict(bias=torch.randn(k, dtype=F64, device=dev), residual=torch.randn(out_shape, dtype=F64, device=dev))
    if relu:
        extra["scale"] = torch.rand(k, dtype=F64, device=dev) + 0.5
    given = {n: t.to(dtype) for n, t in extra.items()}
    if "residual" in extra:
        given["residual"] = _odd_size_one_strides(out_shape, dtype, dev).copy_(extra["residual"])
    g = torch.randn(out_shape, dtype=F64, device=dev)
    y = resnet_fused.conv_bias_add_relu(x, w, **given, **conv, relu=relu, backend=target.backend)
    got = torch.autograd.grad(y, (x, w), g.to(dtype), create_graph=create_graph)
    x64, w64 = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    want_y = reference.conv_bias_add_relu(x64, w64, **extra, **conv, relu=relu)
    want = torch.autograd.grad(want_y, (x64, w64), g)
    for name, a, b in (("y", y, want_y), ("grad_x", got[0], want[0]), ("grad_weight", got[1], want[1])):
        torch.testing.assert_close(a, b.to(dtype), msg=lambda m, name=name: f"{target} {case} {name}: {m}")


@pytest.mark.parametrize("layout", ["nchw", CL])
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("target", target_params())
def test_conv_times_scale_is_rounded_before_the_bias_is_added(target, dtype, layout):
    """Where conv * scale overflows and the bias would bring the exact product back into range (what an FMA
    computes), y is inf as in the unfused ops of the same dtype: every backend rounds the product first (the GPU
    builds compile their epilogues without FMA contraction). Powers of two, exact in TF32 too."""
    big = 2.0 ** (127 if dtype == F32 else 1023)  # the largest power of two
    dev = target.device
    fmt = torch.channels_last if layout == CL else torch.contiguous_format
    x = torch.ones(2, 1, 3, 4, dtype=dtype, device=dev).contiguous(memory_format=fmt)
    weight = torch.full((3, 1, 1, 1), big, dtype=dtype, device=dev)
    scale = torch.tensor([2.0, 0.5, -2.0], dtype=dtype, device=dev)
    bias = torch.tensor([-big, -big / 4, big], dtype=dtype, device=dev)
    residual = torch.zeros(2, 3, 3, 4, dtype=dtype, device=dev)
    for relu in (True, False):
        kw = dict(weight=weight, scale=scale, bias=bias, residual=residual, relu=relu)
        y = resnet_fused.conv_bias_add_relu(x, **kw, backend=target.backend)
        want = reference.conv_bias_add_relu(x, **kw)
        # +inf in channel 0; channel 1 finite (big / 4); channel 2 -inf (0 after the ReLU)
        assert want[:, 0].isposinf().all() and (want[:, 1] == big / 4).all(), want[0, :, 0, 0]
        torch.testing.assert_close(y, want, rtol=0, atol=0, msg=lambda m, relu=relu: f"{target} relu={relu}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("target", target_params())
def test_a_small_scale_whose_unscaled_weight_gradient_overflows_matches_float64(target, dtype):
    """Where the output has many elements beside the weight, the CPU backward scales its wgrad after the sum: with
    |s| < 1 that sum may overflow where the unfused sum(g * s * x) is finite, and s = 0 (a zero-initialised last
    norm) made inf * 0 = NaN where the unfused gradient is 0."""
    dev = target.device
    x = torch.full((2, 4, 8, 8), 1e20, dtype=dtype, device=dev).requires_grad_()
    w = torch.full((4, 4, 1, 1), 1e-3, dtype=dtype, device=dev).requires_grad_()  # 16 weights beside 512 outputs
    scale = torch.tensor([1e-10, 1e-10, 0.0, 0.5], dtype=dtype, device=dev)
    grad = torch.full((2, 4, 8, 8), 1e20, dtype=dtype, device=dev)
    y = resnet_fused.conv_bias_add_relu(x, w, scale=scale, relu=False, backend=target.backend)
    gx, gw = torch.autograd.grad(y, (x, w), grad)
    x64, w64 = (t.detach().cpu().double().requires_grad_() for t in (x, w))
    y64 = reference.conv_bias_add_relu(x64, w64, scale=scale.cpu().double(), relu=False)
    rx, rw = torch.autograd.grad(y64, (x64, w64), grad.cpu().double())
    rw = rw.to(dtype).double()  # 6.4e41 is inf in the dtype, as the unfused gradient is
    for name, got, want, n in (("y", y, y64, 4), ("grad_x", gx, rx, 4), ("grad_weight", gw, rw, 128)):
        assert_close(got, want, dtype, name, n)  # NaN and Inf positions first
    assert (rw[2] == 0).all() and rw[:2].isfinite().all() and rw[3].isinf().all()


def conv_grad_free_variants(t: Target) -> list:
    full = [(lay, relu, tr) for lay in ("nchw", CL) for relu in (True, False) for tr in ("bias", "residual", "both")]
    return [("nchw", True, "residual"), (CL, False, "both")] if t.slow else full


@pytest.mark.parametrize("target,variant", target_params(conv_grad_free_variants))
def test_training_only_bias_or_residual_leaves_x_and_weight_free_to_change(target, variant):
    """Where neither x nor the weight needs a gradient, neither is saved (as ATen's conv saves them): changed in place
    after the forward (an input buffer refilled), the bias and residual gradients still match float64, on every
    backend's graph (the cpu split graph, the one-node graph of the others) with and without ReLU."""
    layout, relu, trained = variant
    names = ("bias", "residual") if trained == "both" else (trained,)
    inputs = make_inputs(CASES["3x3"], F32, layout, Epilogue(True, True, True, relu), device=target.device,
                         requires_grad=False)  # fmt: skip
    t = inputs.tensors
    ref = {k: v.detach().cpu().double().requires_grad_(k in names) for k, v in t.items()}
    scale = inputs.kwargs["scale"]
    y64 = reference.conv_bias_add_relu(**ref, **{**inputs.kwargs, "scale": scale.cpu().double()})
    want = torch.autograd.grad(y64, [ref[k] for k in names], inputs.grad_out.cpu().double())
    for k in names:
        t[k].requires_grad_()
    y = run(target, inputs)
    with torch.no_grad():
        t["x"].mul_(2)
        t["weight"].mul_(2)
    got = torch.autograd.grad(y, [t[k] for k in names], inputs.grad_out)
    for k, g, w in zip(names, got, want, strict=True):
        assert_close(g, w, F32, f"{target} {variant} grad_{k}", reductions=128)


# 7x7 output planes (49 elements) and K = 9: neither a multiple of a CPU vector's 8 (fp32) or 16 (bf16, fp16) lanes,
# so the last pixel of each NCHW plane, channel 8 of each channels_last pixel, and the tensor's last elements take
# the passes' scalar tails.
NAN_TAIL_CASE = Case(2, 4, 7, 7, 9, 3, 3, 1, 1)


def nan_tail_variants(t: Target) -> list:
    full = [(d, lay, bias) for d in (F32, BF16, F16) for lay in ("nchw", CL) for bias in (True, False)]
    return [(F32, CL, True), (BF16, "nchw", True), (F16, CL, False)] if t.slow else full


@pytest.mark.parametrize("target,variant", target_params(nan_tail_variants))
def test_nan_inf_in_vector_tails_match_float64(target, variant):
    """NaN and Inf outputs in the scalar tails: y and all four gradients against float64, NaN and Inf positions
    equal. A NaN output passes its gradient on (the mask blocks only out <= 0), into grad_residual and grad_bias.
    With a bias the backward sums the masked gradient per block; without one the channels_last mask pass walks the
    flat tensor, whose last elements are its tail."""
    dtype, layout, bias = variant
    inputs = make_inputs(NAN_TAIL_CASE, dtype, layout, Epilogue(bias, True, True, True), device=target.device)
    t, grad_out = inputs.tensors, inputs.grad_out
    with torch.no_grad():
        # Inside the image: oneDNN's bf16 channels_last wgrad (eager's too) turns an Inf on the border into NaN in
        # grad_weight taps that never meet it.
        t["x"][0, 1, 5, 5] = float("nan")  # every channel of output pixels (0, 4:7, 4:7)
        t["x"][1, 0, 3, 3] = float("inf")
        t["residual"][1, 8, 6, 6] = float("nan")  # the last element in either layout
        t["residual"][0, 8, 2, 6] = float("inf")  # channel 8: each channels_last pixel's scalar tail
        t["residual"][1, 8, 4, 4] = float("-inf")
        # A zero gradient would hide a blocked one: exact inputs draw zeros.
        grad_out.masked_fill_(grad_out == 0, 0.5)
    y = run(target, inputs)
    for idx in ((1, 8, 6, 6), (0, 8, 6, 6), (0, 5, 6, 6)):
        assert y[idx].isnan(), f"y{list(idx)} should be NaN"
    assert y[0, 8, 2, 6] == float("inf")
    check_call(y, inputs, dtype, f"{target} {variant}")


@pytest.mark.parametrize("target", [p for p in target_params() if p.values[0].device == "cpu"])
@pytest.mark.parametrize("layout", ["nchw", CL])
def test_gradients_are_deterministic_across_thread_counts(target, layout):
    """Bit-identical gradients for one thread count, and across thread counts wherever ATen's own conv backward is:
    oneDNN's channels_last wgrad on AVX-512 splits its reduction by thread, so grad_weight may differ there only
    where eager's does."""
    case = Case(2, 4, 9, 7, 6, 3, 3, 1, 1) if target.slow else Case(4, 8, 33, 31, 24, 3, 3, 1, 1)
    inputs = make_inputs(case, F32, layout, FULL, device=target.device)
    names = list(inputs.tensors)
    ours, eager = {}, {}
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 1, 3, 2):
            torch.set_num_threads(n)
            grads = torch.autograd.grad(run(target, inputs), list(inputs.tensors.values()), inputs.grad_out)
            y_ref = reference.conv_bias_add_relu(**inputs.tensors, **inputs.kwargs)
            ref = torch.autograd.grad(y_ref, list(inputs.tensors.values()), inputs.grad_out)
            if n in ours:
                for name, a, b in zip(names, ours[n], grads, strict=True):
                    assert torch.equal(a, b), f"grad_{name} changed between two runs on {n} threads"
            ours[n], eager[n] = grads, ref
    finally:
        torch.set_num_threads(threads)
    for n in (2, 3):
        for i, name in enumerate(names):
            if name != "weight" or torch.equal(eager[n][i], eager[1][i]):
                assert torch.equal(ours[n][i], ours[1][i]), f"grad_{name} changed from 1 to {n} threads"


@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
def test_cpu_mask_pass_nan_bits_do_not_depend_on_thread_count(dtype):
    """The CPU backward's mask pass writes a NaN with the same bits on any thread count. A vector and a scalar store
    of a reduced-precision NaN can differ in bits, so which elements take the scalar tail must follow from the shape
    alone, not from where the threads' chunks end."""
    # channels_last with K = 3: 90000 elements, which 2 and 3 threads split away from vector boundaries.
    grad = torch.full((1, 3, 300, 100), float("nan"), dtype=dtype).contiguous(memory_format=torch.channels_last)
    out = torch.ones_like(grad)
    stand_in_weight = out.new_empty(()).expand(3, 1, 1, 1)  # read for its shape only: no conv gradient is asked
    backward = torch.ops.resnet_fused.conv_bias_add_relu_backward
    bits = {}
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            g = backward(
                grad, out, out, stand_in_weight, None, [1, 1], [0, 0], [1, 1], 3, True, [False, False, False, True]
            )[3]
            bits[n] = g.view(torch.int16)
    finally:
        torch.set_num_threads(threads)
    assert g.isnan().all()
    for n in (2, 3):
        assert torch.equal(bits[n], bits[1]), f"grad_residual's NaN bits changed from 1 to {n} threads"


# ---- autocast: the op computes in the dtype autocast gives F.conv2d ----


@pytest.mark.parametrize("target", target_params())
@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
def test_autocast_chain_matches_conv2d_dtype(target, dtype):
    """Two chained fused layers under autocast: each output in conv2d's autocast dtype, values and gradients
    against float64 at that dtype's tolerance."""
    dev = target.device
    first = make_inputs(CASES["3x3"], F32, CL, FULL, device=dev)
    second = make_inputs(CASES["3x3"], F32, CL, Epilogue(True, False, False, True), device=dev, seed=1)
    x, w1 = first.tensors["x"], first.tensors["weight"]
    with torch.autocast(dev, dtype=dtype):
        y1 = run(target, first)
        y2 = resnet_fused.conv_bias_add_relu(
            y1, second.tensors["weight"], second.tensors["bias"], padding=1, backend=target.backend
        )
        conv_dtype = F.conv2d(x, w1, padding=1).dtype
    assert conv_dtype == dtype and y1.dtype == dtype and y2.dtype == dtype
    # The exact inputs are exact in both autocast dtypes, so the float64 reference of the fp32 inputs applies.
    assert_close(y1, reference_forward(first), dtype, "y1", 72)
    y1_in = second._replace(tensors=dict(second.tensors, x=y1.detach()))
    assert_close(y2, reference_forward(y1_in), dtype, "y2", 72)
    grads = torch.autograd.grad(y1, list(first.tensors.values()), first.grad_out.to(dtype))
    expected = reference_grads(first, y1, first.grad_out.to(dtype))
    for (name, t), g in zip(first.tensors.items(), grads, strict=True):
        assert g.dtype == t.dtype == F32, f"grad_{name} must come back in its leaf's dtype"
        assert_close(g, expected[name], dtype, f"grad_{name}", 72)


@pytest.mark.parametrize("target", target_params())
@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
def test_autocast_on_the_bare_dispatcher_op(target, dtype):
    inputs = make_inputs(CASES["3x3"], F32, "nchw", FULL, device=target.device, requires_grad=False)
    with torch.autocast(target.device, dtype=dtype):
        y = forward_op(target.backend)(*inputs.op_args())
    assert y.dtype == dtype
    assert_close(y, reference_forward(inputs), dtype, "y", 72)


# ---- errors: the public function and every registered op, with the same message ----


def _args(**over):
    x = torch.randn(2, 4, 8, 8)
    weight = torch.randn(6, 4, 3, 3)
    kw = dict(bias=torch.randn(6), residual=torch.randn(2, 6, 8, 8), scale=torch.rand(6), padding=1)
    kw.update(over)
    return x, weight, kw


BAD_INPUTS = [
    ("x_dims", lambda: (torch.randn(4, 8, 8), torch.randn(6, 4, 3, 3), {}), ValueError,
     r"x: expected a 4-D tensor \(N, C, H, W\), got 3-D with shape \(4, 8, 8\)"),
    ("weight_dims", lambda: (torch.randn(2, 4, 8, 8), torch.randn(6, 4, 3), {}), ValueError,
     r"weight: expected a 4-D tensor .*got 3-D"),
    ("residual_shape", lambda: _args(residual=torch.randn(2, 6, 7, 8)), ValueError,
     r"residual: expected the output's shape \(2, 6, 8, 8\), got \(2, 6, 7, 8\)"),
    ("bias_len", lambda: _args(bias=torch.randn(5)), ValueError, r"bias: expected shape \(6,\), got \(5,\)"),
    ("scale_len", lambda: _args(scale=torch.rand(7)), ValueError, r"scale: expected shape \(6,\), got \(7,\)"),
    ("groups_divide", lambda: (torch.randn(2, 3, 8, 8), torch.randn(6, 1, 3, 3), {"groups": 2}), ValueError,
     r"x: expected channels divisible by groups=2, got C=3"),
    ("weight_channels", lambda: (torch.randn(2, 4, 8, 8), torch.randn(6, 3, 3, 3), {}), ValueError,
     r"x: expected C = weight.shape\[1\] \* groups = 3 channels, got C=4"),
    ("dtype_mix", lambda: _args(bias=torch.randn(6, dtype=torch.float64)), TypeError,
     r"bias: expected dtype torch.float32 \(x's\), got torch.float64"),
    ("dtype_int", lambda: (torch.ones(2, 4, 8, 8, dtype=torch.int32), torch.ones(6, 4, 3, 3, dtype=torch.int32), {}),
     TypeError, r"x: expected a floating dtype .*got torch.int32"),
    ("dtype_float8", lambda: (torch.ones(2, 4, 8, 8).to(torch.float8_e4m3fn),
                              torch.ones(6, 4, 3, 3).to(torch.float8_e4m3fn), {}),
     TypeError, r"x: expected a floating dtype \(float32, float16, bfloat16, float64\), got torch.float8_e4m3fn"),
    ("device_mix", lambda: _args(residual=torch.randn(2, 6, 8, 8, device="meta")), ValueError,
     r"residual: expected device cpu \(x's\), got meta"),
    ("stride_zero", lambda: _args(stride=0), ValueError, r"stride: expected values >= 1, got \(0, 0\)"),
    ("stride_neg", lambda: _args(stride=(1, -1)), ValueError, r"stride: expected values >= 1, got \(1, -1\)"),
    ("padding_neg", lambda: _args(padding=-1), ValueError, r"padding: expected values >= 0, got \(-1, -1\)"),
    ("padding_str", lambda: _args(padding="same"), TypeError,
     r"padding: expected an int or a pair of ints, got 'same'"),
    ("dilation_zero", lambda: _args(dilation=0), ValueError, r"dilation: expected values >= 1, got \(0, 0\)"),
    ("k_groups", lambda: (torch.randn(1, 4, 5, 5), torch.randn(3, 2, 3, 3), {"groups": 2}), ValueError,
     r"weight: expected out channels divisible by groups=2, got K=3"),
    ("kernel_one_past", lambda: (torch.randn(1, 4, 5, 5), torch.randn(6, 4, 6, 5), {}), ValueError,
     r"weight: expected a \(dilated\) kernel no larger than the padded input, got kernel extent 6 > padded input 5 "
     r"in dim 2"),
    ("kernel_too_big", lambda: (torch.randn(1, 4, 5, 5), torch.randn(6, 4, 7, 7), {"padding": 0}), ValueError,
     r"weight: expected a \(dilated\) kernel no larger than the padded input, got kernel extent 7 > padded input 5"),
    ("dilation_wraps_int64", lambda: (torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3, 3), {"dilation": 2**62}),
     ValueError, r"weight: expected a \(dilated\) kernel no larger than the padded input, got kernel extent \S+ > "
     r"padded input 5"),
    ("output_numel_wraps_int64", lambda: (torch.randn(1, 1, 2, 2), torch.randn(1, 1, 1, 1), {"padding": 2**31 - 1}),
     ValueError, r"x, weight and padding: expected an output \(N, K, P, Q\) of at most 2\*\*63-1 elements, got "
     r"shape \(1, 1, 4294967296, 4294967296\)"),
    ("kernel_r0", lambda: (torch.randn(1, 4, 5, 5), torch.randn(6, 4, 0, 3), {}), ValueError,
     r"weight: expected a kernel size \(R, S\) >= 1, got \(0, 3\)"),
    ("kernel_s0", lambda: (torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3, 0), {}), ValueError,
     r"weight: expected a kernel size \(R, S\) >= 1, got \(3, 0\)"),
    ("c0", lambda: (torch.randn(2, 0, 5, 4), torch.randn(3, 0, 3, 3), {"padding": 1}), ValueError,
     r"x: expected at least 1 input channel, got C=0"),
    ("k0", lambda: (torch.randn(2, 4, 5, 5), torch.randn(0, 4, 3, 3), {"padding": 1}), ValueError,
     r"weight: expected at least 1 output channel, got K=0"),
    ("h0", lambda: (torch.randn(2, 4, 0, 5), torch.randn(6, 4, 3, 3), {"padding": 1}), ValueError,
     r"x: expected a spatial size \(H, W\) >= 1, got \(0, 5\)"),
    ("w0", lambda: (torch.randn(2, 4, 5, 0), torch.randn(6, 4, 1, 1), {}), ValueError,
     r"x: expected a spatial size \(H, W\) >= 1, got \(5, 0\)"),
    ("groups_zero", lambda: _args(groups=0), ValueError, r"groups: expected an int >= 1, got 0"),
    ("residual_sparse", lambda: _args(residual=torch.randn(2, 6, 8, 8).to_sparse()), TypeError,
     r"residual: expected a dense \(strided\) tensor, got layout torch.sparse_coo"),
    ("bias_sparse", lambda: _args(bias=torch.randn(6).to_sparse()), TypeError,
     r"bias: expected a dense \(strided\) tensor, got layout torch.sparse_coo"),
    # A nested tensor reads layout strided but has no sizes; a quantized one is strided with an integer storage.
    ("x_nested", lambda: (torch.nested.nested_tensor([torch.randn(4, 8, 8)] * 2), torch.randn(6, 4, 3, 3), {}),
     TypeError, r"x: expected a dense \(strided\) tensor, got a nested tensor"),
    ("residual_quantized", lambda: _args(residual=torch.quantize_per_tensor(torch.randn(2, 6, 8, 8), 0.1, 0,
                                                                            torch.quint8)),
     TypeError, r"residual: expected a dense \(strided\) tensor of floats, got a quantized tensor \(torch.quint8\)"),
    ("stride_past_int64", lambda: _args(stride=2**63), ValueError,
     r"stride: expected values <= 9223372036854775807, got \(9223372036854775808, 9223372036854775808\)"),
]  # fmt: skip
BAD_IDS = [b[0] for b in BAD_INPUTS]
# A meta tensor dispatches the op to its fake kernel, and the dispatcher's schema refuses a string padding.
# The dispatcher cannot pass an integer past int64 to any op at all.
NOT_FOR_OPS = ("padding_str", "device_mix", "stride_past_int64")


@pytest.mark.parametrize("make,error,match", [b[1:] for b in BAD_INPUTS], ids=BAD_IDS)
@pytest.mark.parametrize("backend", ["auto", *sorted({t.backend for t in targets()}), "reference"])
def test_bad_input_errors_from_the_public_function(make, error, match, backend):
    x, weight, kw = make()
    with pytest.raises(error, match=match):
        resnet_fused.conv_bias_add_relu(x, weight, **kw, backend=backend)


@pytest.mark.parametrize("make,error,match", [b[1:] for b in BAD_INPUTS], ids=BAD_IDS)
def test_bad_input_errors_from_the_reference_function(make, error, match):
    """resnet_fused.reference.conv_bias_add_relu, public too, checks as the fused function does (it broadcast a
    (1,) scale or residual, promoted a float64 residual, and gave ATen's messages that name no argument)."""
    x, weight, kw = make()
    with pytest.raises(error, match=match):
        reference.conv_bias_add_relu(x, weight, **kw)


def _op_args(x, weight, kw, relu=True) -> tuple:
    def pair(v, default):
        v = kw.get(v, default)
        return [v, v] if isinstance(v, int) else list(v)

    return (
        x, weight, kw.get("bias"), kw.get("residual"), kw.get("scale"), pair("stride", 1), pair("padding", 0),
        pair("dilation", 1), kw.get("groups", 1), relu,
    )  # fmt: skip


def op_cases(table: list, backends: dict) -> list:
    """(op name, make, error, match) params: every registered op raises the public function's message."""
    params = []
    for backend in backends:
        for name, *rest in table:
            if name in NOT_FOR_OPS:
                continue
            params.append(pytest.param(backend, *rest, id=f"{backend}-{name}"))
    return params


@pytest.mark.parametrize("backend,make,error,match", op_cases(BAD_INPUTS, registered_forward_ops()))
def test_bad_input_errors_from_every_forward_op(backend, make, error, match):
    """A direct call of a registered forward op checks what the public function checks, with the same message."""
    x, weight, kw = make()
    with pytest.raises(error, match=match):
        forward_op(backend)(*_op_args(x, weight, kw))


@pytest.mark.parametrize("route", ["fake_mode", "meta"])
@pytest.mark.parametrize("backend,make,error,match", op_cases(BAD_INPUTS, registered_forward_ops()))
def test_bad_input_errors_from_every_forward_fake(backend, make, error, match, route):
    """The forward ops' fakes (torch.compile and torch.export run them) refuse what the op refuses, with its message:
    a fake that accepted a bad shape would make up an output where eager raises."""
    x, weight, kw = make()
    args = _op_args(x, weight, kw)
    if any(isinstance(a, torch.Tensor) and (a.layout != torch.strided or a.is_nested or a.is_quantized) for a in args):
        pytest.skip("a sparse, nested or quantized tensor has no fake or meta copy to test with")
    mode = FakeTensorMode() if route == "fake_mode" else contextlib.nullcontext()
    if route == "meta":
        args = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    else:
        args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    with mode, pytest.raises(error, match=match):
        forward_op(backend)(*args)


def test_a_kernel_as_large_as_the_padded_input_gives_one_output_pixel():
    """The kernel-extent check's boundary: extent == padded input is a conv, extent == padded input + 1 is not."""
    x, weight = torch.randn(1, 4, 5, 5), torch.randn(6, 4, 5, 3)
    y = resnet_fused.conv_bias_add_relu(x, weight, relu=False)
    assert y.shape == (1, 6, 1, 3)
    assert_close(y, F.conv2d(x.double(), weight.double()), F32, "y", reductions=60)


def _bwd(**over) -> dict:
    """The backward op's arguments for x (2, 4, 8, 8), weight (6, 4, 3, 3), padding 1 (y: (2, 6, 8, 8)), all valid,
    with ``over`` replacing some."""
    args = dict(
        grad_out=torch.randn(2, 6, 8, 8), out=torch.randn(2, 6, 8, 8), x=torch.randn(2, 4, 8, 8),
        weight=torch.randn(6, 4, 3, 3), scale=torch.rand(6) + 0.5, stride=[1, 1], padding=[1, 1], dilation=[1, 1],
        groups=1, relu=True, output_mask=[True] * 4,
    )  # fmt: skip
    args.update(over)
    return args


# A second device for the device checks: with CUDA the op's own check answers; without it a meta tensor sends the
# call to the fake kernel, which must say the same.
OTHER_DEVICE = "cuda" if torch.cuda.is_available() else "meta"
I32 = torch.int32

# The forward's BAD_INPUTS for the backward ops, plus their own arguments: grad_out, out and output_mask.
BAD_BACKWARD = [
    ("x_dims", lambda: _bwd(x=torch.randn(4, 8, 8)), ValueError,
     r"x: expected a 4-D tensor \(N, C, H, W\), got 3-D with shape \(4, 8, 8\)"),
    ("weight_dims", lambda: _bwd(weight=torch.randn(6, 4, 3)), ValueError,
     r"weight: expected a 4-D tensor \(K, C/groups, R, S\), got 3-D with shape \(6, 4, 3\)"),
    ("grad_out_dims", lambda: _bwd(grad_out=torch.randn(6, 8, 8)), ValueError,
     r"grad_out: expected the output's shape \(2, 6, 8, 8\), got \(6, 8, 8\)"),
    ("grad_out_shape", lambda: _bwd(grad_out=torch.randn(2, 6, 8, 7)), ValueError,
     r"grad_out: expected the output's shape \(2, 6, 8, 8\), got \(2, 6, 8, 7\)"),
    ("out_shape", lambda: _bwd(out=torch.randn(2, 6, 7, 8)), ValueError,
     r"out: expected the output's shape \(2, 6, 8, 8\), got \(2, 6, 7, 8\)"),
    ("grad_out_dtype", lambda: _bwd(grad_out=torch.randn(2, 6, 8, 8, dtype=F64)), TypeError,
     r"grad_out: expected dtype torch.float32 \(x's\), got torch.float64"),
    ("out_dtype", lambda: _bwd(out=torch.randn(2, 6, 8, 8, dtype=F64)), TypeError,
     r"out: expected dtype torch.float32 \(x's\), got torch.float64"),
    ("weight_dtype", lambda: _bwd(weight=torch.randn(6, 4, 3, 3, dtype=F64)), TypeError,
     r"weight: expected dtype torch.float32 \(x's\), got torch.float64"),
    ("scale_dtype", lambda: _bwd(scale=torch.rand(6, dtype=F64)), TypeError,
     r"scale: expected dtype torch.float32 \(x's\), got torch.float64"),
    ("scale_len", lambda: _bwd(scale=torch.rand(7)), ValueError, r"scale: expected shape \(6,\), got \(7,\)"),
    ("scale_dims", lambda: _bwd(scale=torch.rand(6, 1)), ValueError, r"scale: expected shape \(6,\), got \(6, 1\)"),
    ("grad_out_device", lambda: _bwd(grad_out=torch.randn(2, 6, 8, 8, device=OTHER_DEVICE)), ValueError,
     rf"grad_out: expected device cpu \(x's\), got {OTHER_DEVICE}"),
    ("out_device", lambda: _bwd(out=torch.randn(2, 6, 8, 8, device=OTHER_DEVICE)), ValueError,
     rf"out: expected device cpu \(x's\), got {OTHER_DEVICE}"),
    ("scale_device", lambda: _bwd(scale=torch.rand(6, device=OTHER_DEVICE)), ValueError,
     rf"scale: expected device cpu \(x's\), got {OTHER_DEVICE}"),
    ("dtype_int", lambda: _bwd(**{k: torch.ones(s, dtype=I32) for k, s in
                                  (("grad_out", (2, 6, 8, 8)), ("out", (2, 6, 8, 8)), ("x", (2, 4, 8, 8)),
                                   ("weight", (6, 4, 3, 3)), ("scale", (6,)))}),
     TypeError, r"x: expected a floating dtype \(float32, float16, bfloat16, float64\), got torch.int32"),
    ("stride_zero", lambda: _bwd(stride=[0, 0]), ValueError, r"stride: expected values >= 1, got \(0, 0\)"),
    ("stride_neg", lambda: _bwd(stride=[1, -1]), ValueError, r"stride: expected values >= 1, got \(1, -1\)"),
    ("padding_neg", lambda: _bwd(padding=[-1, -1]), ValueError, r"padding: expected values >= 0, got \(-1, -1\)"),
    ("dilation_zero", lambda: _bwd(dilation=[0, 0]), ValueError, r"dilation: expected values >= 1, got \(0, 0\)"),
    ("groups_zero", lambda: _bwd(groups=0), ValueError, r"groups: expected an int >= 1, got 0"),
    ("groups_divide", lambda: _bwd(x=torch.randn(2, 3, 8, 8), weight=torch.randn(6, 1, 3, 3), groups=2), ValueError,
     r"x: expected channels divisible by groups=2, got C=3"),
    ("weight_channels", lambda: _bwd(weight=torch.randn(6, 3, 3, 3)), ValueError,
     r"x: expected C = weight.shape\[1\] \* groups = 3 channels, got C=4"),
    ("kernel_too_big", lambda: _bwd(x=torch.randn(2, 4, 5, 5), weight=torch.randn(6, 4, 7, 7), padding=[0, 0]),
     ValueError, r"weight: expected a \(dilated\) kernel no larger than the padded input, got kernel extent 7 > "
     r"padded input 5"),
    ("dilation_wraps_int64", lambda: _bwd(dilation=[2**62, 2**62]), ValueError,
     r"weight: expected a \(dilated\) kernel no larger than the padded input, got kernel extent \S+ > padded input 10"),
    ("output_numel_wraps_int64", lambda: _bwd(padding=[2**31, 2**31]), ValueError,
     r"x, weight and padding: expected an output \(N, K, P, Q\) of at most 2\*\*63-1 elements, got shape "
     r"\(2, 6, 4294967302, 4294967302\)"),
    ("kernel_r0", lambda: _bwd(weight=torch.randn(6, 4, 0, 3)), ValueError,
     r"weight: expected a kernel size \(R, S\) >= 1, got \(0, 3\)"),
    ("c0", lambda: _bwd(x=torch.randn(2, 0, 8, 8), weight=torch.randn(6, 0, 3, 3)), ValueError,
     r"x: expected at least 1 input channel, got C=0"),
    ("k0", lambda: _bwd(weight=torch.randn(0, 4, 3, 3), scale=None), ValueError,
     r"weight: expected at least 1 output channel, got K=0"),
    ("h0", lambda: _bwd(x=torch.randn(2, 4, 0, 8)), ValueError, r"x: expected a spatial size \(H, W\) >= 1, got \(0, 8\)"),
    ("mask_residual_without_relu", lambda: _bwd(relu=False), ValueError,
     r"output_mask: grad_residual is grad_out itself when relu=False; expected output_mask\[3\]=false, got true"),
    ("mask_len", lambda: _bwd(output_mask=[True] * 3), ValueError,
     r"output_mask: expected 4 bools \(x, weight, bias, residual\), got \[True, True, True\]"),
]  # fmt: skip


@pytest.mark.parametrize("backend,make,error,match", op_cases(BAD_BACKWARD, registered_forward_ops()))
def test_bad_input_errors_from_every_backward_op(backend, make, error, match):
    """A direct call of a registered backward op checks every argument before it reads one: unchecked, a float64
    grad_out beside a float32 x and out would have the mask pass read out's buffer as float64, past its end."""
    with pytest.raises(error, match=match):
        backward_op(backend)(*make().values())


def fake_cases() -> list:
    """op_cases for a FakeTensorMode and for meta tensors; all on meta, the device cases' tensors no longer differ."""
    params = []
    for route in ("fake_mode", "meta"):
        table = [b for b in BAD_BACKWARD if route != "meta" or not b[0].endswith("_device")]
        params += [
            pytest.param(route, *p.values, id=f"{route}-{p.id}") for p in op_cases(table, registered_forward_ops())
        ]
    return params


@pytest.mark.parametrize("backend", sorted(registered_forward_ops()))
def test_not_dense_tensors_are_named_by_every_backward_op(backend):
    """A sparse or oneDNN-layout tensor reaches no kernel of the ops: the dispatcher's refusal would name the op and
    its dispatch key, so those keys get a kernel that runs the checks, which name the argument."""
    cases = {
        "grad_out": _bwd(grad_out=torch.randn(2, 6, 8, 8).to_sparse()),
        "x": _bwd(x=torch.randn(2, 4, 8, 8).to_mkldnn()),
        "out": _bwd(out=torch.nested.nested_tensor([torch.randn(6, 8, 8)] * 2)),
        "weight": _bwd(weight=torch.quantize_per_tensor(torch.randn(6, 4, 3, 3), 0.1, 0, torch.qint8)),
    }
    for name, args in cases.items():
        with pytest.raises(TypeError, match=rf"{name}: expected a dense \(strided\) tensor"):
            backward_op(backend)(*args.values())


@pytest.mark.parametrize("route,backend,make,error,match", fake_cases())
def test_bad_input_errors_from_every_backward_fake(route, backend, make, error, match):
    """The fake kernel (torch.compile's tracing, meta tensors) refuses what the op refuses, with the same message."""
    args = list(make().values())
    if route == "meta":
        with pytest.raises(error, match=match):
            backward_op(backend)(*(v.to("meta") if isinstance(v, torch.Tensor) else v for v in args))
        return
    mode = FakeTensorMode()
    fakes = [mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for v in args]
    with mode, pytest.raises(error, match=match):
        backward_op(backend)(*fakes)


# Two faults at once: the op, its fake and the public function report the same one (the C++ order of checks).
DOUBLE_FAULTS = {
    "3-D fp64 weight": (lambda: (torch.randn(2, 4, 8, 8), torch.randn(6, 4, 3, dtype=torch.float64), {}), ValueError,
                        r"weight: expected a 4-D tensor \(K, C/groups, R, S\), got 3-D with shape \(6, 4, 3\)"),
    "groups 3 and kernel (0, 3)": (lambda: (torch.randn(2, 4, 8, 8), torch.randn(6, 4, 0, 3), {"groups": 3}),
                                   ValueError, r"weight: expected a kernel size \(R, S\) >= 1, got \(0, 3\)"),
    "padding 2**62": (lambda: (torch.randn(1, 4, 5, 5), torch.randn(6, 4, 3, 3), {"padding": 2**62}), ValueError,
                      r"padding: expected the padded input to fit in int64, got padding 4611686018427387904 on size 5 "
                      r"in dim 2"),
    # An expanded x of 2**63 - 11 rows: a small padding overflows too, and a huge stride would have hidden it
    "huge H, padding 10": (lambda: (torch.zeros(1, 1, 1, 1).expand(1, 1, 2**63 - 11, 1), torch.randn(1, 1, 1, 1),
                                    {"padding": (10, 0), "stride": (2**62, 1)}), ValueError,
                           r"padding: expected the padded input to fit in int64, got padding 10 on size "
                           r"9223372036854775797 in dim 2"),
}  # fmt: skip


@pytest.mark.parametrize("case", DOUBLE_FAULTS)
@pytest.mark.parametrize("route", ["op", "fake", "public"])
@pytest.mark.parametrize("backend", sorted(registered_forward_ops()))
def test_two_faults_give_the_same_error_on_every_route(case, route, backend):
    make, error, match = DOUBLE_FAULTS[case]
    x, weight, kw = make()
    with pytest.raises(error, match=match):
        if route == "public":
            resnet_fused.conv_bias_add_relu(x, weight, **kw, backend=backend)
        elif route == "op":
            forward_op(backend)(*_op_args(x, weight, kw))
        else:
            mode = FakeTensorMode()
            x, weight = mode.from_tensor(x), mode.from_tensor(weight)
            with mode:
                forward_op(backend)(*_op_args(x, weight, kw))


@pytest.mark.parametrize("route", ["op", "fake"])
@pytest.mark.parametrize("backend", sorted(registered_forward_ops()))
def test_a_backward_grad_out_of_wrong_shape_and_dtype_names_its_shape(route, backend):
    args = _bwd(grad_out=torch.randn(2, 6, 7, 7, dtype=torch.float64))
    values = list(args.values())
    if route == "fake":
        mode = FakeTensorMode()
        values = [mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for v in values]
    with pytest.raises(ValueError, match=r"grad_out: expected the output's shape \(2, 6, 8, 8\), got \(2, 6, 7, 7\)"):
        if route == "fake":
            with mode:
                backward_op(backend)(*values)
        else:
            backward_op(backend)(*values)


def test_scale_requiring_grad_is_an_error():
    inputs = make_inputs(CASES["3x3"], F32, "nchw", FULL)
    inputs.kwargs["scale"].requires_grad_()
    with pytest.raises(ValueError, match=r"scale: expected a constant \(requires_grad=False\).*got requires_grad=True"):
        resnet_fused.conv_bias_add_relu(**inputs.tensors, **inputs.kwargs)
    with torch.no_grad():  # without autograd there is nothing to refuse
        resnet_fused.conv_bias_add_relu(**inputs.tensors, **inputs.kwargs)


@pytest.mark.parametrize("backend", sorted(registered_forward_ops()))
@pytest.mark.parametrize("grad_x", [True, False])
def test_scale_requiring_grad_is_an_error_at_every_forward_op(backend, grad_x):
    """The bare op records its graph with grad mode off: it must still refuse a scale that would get no gradient."""
    x, weight = torch.randn(2, 4, 8, 8, requires_grad=grad_x), torch.randn(6, 4, 3, 3)
    scale = torch.rand(6, requires_grad=True)
    with pytest.raises(ValueError, match=r"scale: expected a constant \(requires_grad=False\)"):
        forward_op(backend)(*_op_args(x, weight, {"scale": scale, "padding": 1}))
    with torch.no_grad():  # no graph, nothing to refuse
        forward_op(backend)(*_op_args(x, weight, {"scale": scale, "padding": 1}))


def test_unknown_and_unavailable_backends():
    x, weight, kw = _args()
    with pytest.raises(ValueError, match=re.escape(f"backend: expected one of {BACKENDS.choices()}, got 'cudnn'")):
        resnet_fused.conv_bias_add_relu(x, weight, **kw, backend="cudnn")
    for missing in set(BACKENDS.names()) - set(resnet_fused.available_backends()):
        with pytest.raises(
            RuntimeError, match=rf"backend: '{missing}' is not available in this install \(.+\); available: "
        ):
            resnet_fused.conv_bias_add_relu(x, weight, **kw, backend=missing)


def test_backends_refuse_devices_outside_their_row():
    x, weight, kw = _args()
    meta = {k: v.to("meta") for k, v in kw.items() if isinstance(v, torch.Tensor)}
    for name in resnet_fused.available_backends():
        if "meta" in BACKENDS[name].devices:
            continue
        with pytest.raises(ValueError, match=rf"backend: '{name}' runs on .* tensors, got x on meta"):
            resnet_fused.conv_bias_add_relu(x.to("meta"), weight.to("meta"), **dict(kw, **meta), backend=name)


@pytest.mark.parametrize("target", [p for p in target_params() if p.values[0].backend == "triton"] or [None])
def test_triton_refuses_more_groups_than_its_grid_allows(target):
    if target is None:
        pytest.skip("the triton backend is not under test here")
    groups = 65536
    x, weight = torch.randn(1, groups, 1, 1, device=target.device), torch.randn(groups, 1, 1, 1, device=target.device)
    with pytest.raises(ValueError, match=r"groups: expected at most 65535 for the triton backend .*got 65536"):
        resnet_fused.conv_bias_add_relu(x, weight, groups=groups, backend="triton")


def test_available_backends():
    backends = resnet_fused.available_backends()
    assert {"cpu", "reference"} <= set(backends) and "auto" not in backends
    assert backends == [row.name for row in BACKENDS if not row.unavailable()]
    if not torch.cuda.is_available():
        assert "cuda" not in backends


def test_auto_on_cpu_runs_the_cpu_kernels():
    inputs = make_inputs(CASES["3x3"], F32, "nchw", FULL, requires_grad=False)
    assert resnet_fused.explain(**inputs.tensors, **inputs.kwargs).startswith("cpu: ")
    y_auto = resnet_fused.conv_bias_add_relu(**inputs.tensors, **inputs.kwargs)
    y_cpu = resnet_fused.conv_bias_add_relu(**inputs.tensors, **inputs.kwargs, backend="cpu")
    assert torch.equal(y_auto, y_cpu)


@pytest.mark.parametrize("target", target_params())
def test_calls_without_autograd_match_recorded_calls(target):
    """Without a gradient to record (no_grad, or no input requiring one) the public function bypasses torch.library's
    autograd layer; its y must equal, bit for bit, the y of a call autograd records, and nothing gets a grad_fn."""
    inputs = make_inputs(CASES["3x3"], F32, CL, FULL, device=target.device)
    assert inputs.tensors["x"].requires_grad
    recorded = run(target, inputs)
    assert recorded.grad_fn is not None
    with torch.no_grad():
        y_no_grad = run(target, inputs)
    detached = dict(inputs.tensors, **{k: t.detach() for k, t in inputs.tensors.items() if t is not None})
    y_constants = resnet_fused.conv_bias_add_relu(**detached, **inputs.kwargs, backend=target.backend)
    for y in (y_no_grad, y_constants):
        assert y.grad_fn is None and not y.requires_grad
        assert torch.equal(y, recorded.detach())
    assert_close(y_no_grad, reference_forward(inputs), F32, "y", 72)


def _with_tangents(inputs):
    """Float64 tensors of ``inputs`` (scale left constant) and a tangent for each, drawn from a fixed seed."""
    gen = torch.Generator().manual_seed(1)
    primals = {k: t.detach() for k, t in inputs.tensors.items() if t is not None}
    tangents = {k: torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device) for k, t in primals.items()}
    return primals, tangents


def _expected_jvp(inputs, primals, tangents):
    def f(*ts):
        return reference.conv_bias_add_relu(**dict(zip(primals, ts, strict=True)), **inputs.kwargs)

    return torch.func.jvp(f, tuple(primals.values()), tuple(tangents.values()))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_forward_mode_ad_goes_through_the_unfused_ops(backend):
    """No fused op has a jvp rule (torch.library would drop the tangent without a word), so under forward-mode AD
    ``auto`` and ``reference`` compute through the unfused ops: the tangent equals the float64 reference's, from dual
    tensors and from torch.func.jvp alike."""
    inputs = make_inputs(CASES["3x3"], F64, CL, FULL)
    primals, tangents = _with_tangents(inputs)
    y_ref, ty_ref = _expected_jvp(inputs, primals, tangents)
    assert ty_ref.abs().sum() > 0
    with torch.autograd.forward_ad.dual_level():
        duals = {k: torch.autograd.forward_ad.make_dual(primals[k], tangents[k]) for k in primals}
        y = resnet_fused.conv_bias_add_relu(**duals, **inputs.kwargs, backend=backend)
        y, ty = torch.autograd.forward_ad.unpack_dual(y)
    assert_close(y, y_ref, F64, "y", 72)
    assert_close(ty, ty_ref, F64, "tangent", 72)

    def f(*ts):
        return resnet_fused.conv_bias_add_relu(**dict(zip(primals, ts, strict=True)), **inputs.kwargs, backend=backend)

    _, ty = torch.func.jvp(f, tuple(primals.values()), tuple(tangents.values()))
    assert_close(ty, ty_ref, F64, "torch.func.jvp tangent", 72)


def test_torch_func_grad_goes_through_the_unfused_ops():
    """torch.func.grad cannot run torch.library's autograd; ``auto`` takes the unfused ops, with float64's gradients."""
    inputs = make_inputs(CASES["3x3"], F64, CL, FULL)
    primals = {k: t.detach() for k, t in inputs.tensors.items() if t is not None}

    def loss(fn, *ts):
        return (fn(**dict(zip(primals, ts, strict=True)), **inputs.kwargs) * inputs.grad_out).sum()

    argnums = tuple(range(len(primals)))
    got = torch.func.grad(lambda *ts: loss(resnet_fused.conv_bias_add_relu, *ts), argnums)(*primals.values())
    expected = torch.func.grad(lambda *ts: loss(reference.conv_bias_add_relu, *ts), argnums)(*primals.values())
    for name, g, e in zip(primals, got, expected, strict=True):
        assert_close(g, e, F64, f"grad_{name}", 72)


VMAP_DIMS = {  # in_dims of (x, weight, bias, residual, scale)
    "x": (0, None, None, None, None),
    "x-residual": (0, None, None, 0, None),
    "residual-only": (None, None, None, 0, None),
    "ensemble": (0, 0, 0, 0, 0),
    "weight-only": (None, 0, None, None, None),
    "moved-dims": (1, 0, None, 2, None),
    "scale-only": (None, None, None, None, 0),
    "ensemble-shared-x": (None, 0, 0, 0, 0),
}


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("dims", list(VMAP_DIMS), ids=list(VMAP_DIMS))
@pytest.mark.parametrize("target", target_params())
def test_vmap_is_one_fused_call_matching_float64(target, dims, groups):
    """vmap over samples folds into N; over weights (an ensemble) into the output channels when x is shared and
    groups=1, else into conv groups: one op call, not one per sample, and y and the gradients of the batched inputs
    match float64."""
    in_dims = VMAP_DIMS[dims]
    b, n, c, k = 3, 2, 4, 6
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, d, scale=1.0):
        t = torch.randn(b, *shape, generator=gen, dtype=F64) * scale
        t = t.movedim(0, d) if d is not None else t[0]
        return t.to(target.device)

    full = [
        rand(n, c, 7, 7, d=in_dims[0]), rand(k, c // groups, 3, 3, d=in_dims[1], scale=0.4),
        rand(k, d=in_dims[2]), rand(n, k, 7, 7, d=in_dims[3]), rand(k, d=in_dims[4]).abs() + 0.5,
    ]  # fmt: skip
    leaves = [t.float().requires_grad_(i != 4) for i, t in enumerate(full)]

    def call(fn, **kw):
        return lambda x, w, bias, r, s: fn(x, w, bias, r, scale=s, padding=1, groups=groups, **kw)

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        y = torch.func.vmap(call(resnet_fused.conv_bias_add_relu, backend=target.backend), in_dims=in_dims)(*leaves)
    # The batched call, then the rule's one call on the whole batch; torch's per-sample fallback makes it 1 + b.
    events = [e for e in prof.events() if e.name.startswith("resnet_fused::conv_bias_add_relu")]
    calls = [e.name for e in events]
    assert len(set(calls)) == 1 and len(calls) == 2, calls
    if in_dims[0] is None and in_dims[1] is not None and groups == 1:  # x read as it is, not copied per member
        assert [list(e.input_shapes[0]) for e in events] == [[n, c, 7, 7]] * 2, [e.input_shapes for e in events]
    ref_leaves = [t.detach().double().requires_grad_(i != 4) for i, t in enumerate(leaves)]
    expected = torch.func.vmap(call(reference.conv_bias_add_relu), in_dims=in_dims)(*ref_leaves)
    assert y.shape == expected.shape == (b, n, k, 7, 7)
    assert_close(y, expected, F32, "vmapped y", c // groups * 9)
    g = torch.randn(expected.shape, generator=gen, dtype=F64)
    y.backward(g.float().to(y.device))
    expected.backward(g.to(expected.device))
    for name, t, r in zip(("x", "weight", "bias", "residual"), leaves, ref_leaves, strict=False):
        assert_close(t.grad, r.grad, F32, f"vmapped grad_{name}", 72 * b)


def test_vmap_refuses_a_batched_scale_that_requires_grad():
    """Under vmap the public function sees a batched wrapper whose requires_grad reads False; the rule checks the
    unwrapped scale, so its gradient is refused, as without vmap, instead of dropped."""
    x = torch.randn(3, 2, 4, 7, 7, requires_grad=True)
    w, s = torch.randn(6, 4, 3, 3), (torch.rand(3, 6) + 0.5).requires_grad_()
    with pytest.raises(ValueError, match=r"scale: expected a constant \(requires_grad=False\)"):
        torch.func.vmap(lambda xi, si: resnet_fused.conv_bias_add_relu(xi, w, scale=si, padding=1))(x, s)


@pytest.mark.parametrize("backend", registered_forward_ops())
def test_bare_op_under_vmap_names_one_samples_shapes(backend):
    """The rule checks one sample before it flattens the members into groups or the batch: an error gives the
    per-sample shapes the caller wrote, not the flattened ones."""
    op = forward_op(backend)
    x, w = torch.randn(2, 4, 8, 8), torch.randn(3, 6, 4, 3, 3)
    conv = ([1, 1], [1, 1], [1, 1], 1, True)
    with pytest.raises(ValueError, match=re.escape("bias: expected shape (6,), got (5,)")):
        torch.func.vmap(lambda wi, bi: op(x, wi, bi, None, None, *conv))(w, torch.randn(3, 5))
    with pytest.raises(
        ValueError, match=re.escape("residual: expected the output's shape (2, 6, 8, 8), got (2, 6, 7, 8)")
    ):
        torch.func.vmap(lambda wi, ri: op(x, wi, None, ri, None, *conv))(w, torch.randn(3, 2, 6, 7, 8))


def test_vmap_over_zero_members():
    """An empty ensemble: on one shared batch with groups=1 the members join K and the result is empty; where they
    would become conv groups (zero channels), the error says so instead of naming C=0."""
    x, w = torch.randn(2, 4, 5, 5), torch.randn(0, 6, 4, 3, 3)
    y = torch.func.vmap(lambda wi: resnet_fused.conv_bias_add_relu(x, wi, padding=1))(w)
    assert y.shape == (0, 2, 6, 5, 5)
    with pytest.raises(ValueError, match=r"vmap: expected at least one member .* got a vmapped dim of size 0"):
        torch.func.vmap(lambda wi: resnet_fused.conv_bias_add_relu(x, wi, padding=1, groups=2))(w[:, :, :2])
    with pytest.raises(ValueError, match="got a vmapped dim of size 0"):
        torch.func.vmap(lambda xi, wi: resnet_fused.conv_bias_add_relu(xi, wi, padding=1))(x[None][:0], w)


def test_auto_does_not_time_under_vmap(monkeypatch):
    """A timing under vmap would measure the batched call and cache it for the per-sample shape."""
    from resnet_fused import select
    from resnet_fused.backends import Backend, Table

    rows = [Backend(name, ("cpu",), ("cpu",), lambda: BACKENDS["cpu"].op, lambda: "") for name in ("cpu", "reference")]
    table = Table(rows)

    def timer(*_):
        raise AssertionError("timed under vmap")

    x, w = torch.randn(3, 2, 4, 7, 7), torch.randn(6, 4, 3, 3)

    def pick(xi):
        args = (w, None, None, None, (1, 1), (1, 1), (1, 1), 1, True)
        return select.choose(xi, *args, table=table, timer=timer)

    choices = []
    torch.func.vmap(lambda xi: choices.append(pick(xi)) or xi)(x)
    assert choices[0].backend == "cpu" and "torch.func transform" in choices[0].reason
    assert not any(k[0] == id(table) for k in select._CACHE)


def test_torch_func_transforms_under_torch_compile():
    """Dynamo cannot read functorch's interpreter stack; under compile the routing reads whether any transform is
    active, so compile(jvp(f)) and compile(grad(f)) still get float64's derivatives, and a plain fullgraph compile
    keeps the fused op."""
    inputs = make_inputs(CASES["3x3"], F64, CL, FULL)
    primals, tangents = _with_tangents(inputs)
    rest = {k: v for k, v in primals.items() if k != "x"}

    def fused(x):
        return resnet_fused.conv_bias_add_relu(x, **rest, **inputs.kwargs)

    def unfused(x):
        return reference.conv_bias_add_relu(x, **rest, **inputs.kwargs)

    x, tx = primals["x"], tangents["x"]
    jvp = torch.compile(lambda a, t: torch.func.jvp(fused, (a,), (t,))[1], backend="eager")
    assert_close(jvp(x, tx), torch.func.jvp(unfused, (x,), (tx,))[1], F64, "compiled jvp tangent", 72)
    grad = torch.compile(lambda a: torch.func.grad(lambda z: (fused(z) * inputs.grad_out).sum())(a), backend="eager")
    expected = torch.func.grad(lambda z: (unfused(z) * inputs.grad_out).sum())(x)
    assert_close(grad(x), expected, F64, "compiled grad_x", 72)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = torch.compile(fused, backend="eager", fullgraph=True)(x)
    assert any(e.name.startswith("resnet_fused::") for e in prof.events())
    assert_close(y, unfused(x), F64, "compiled y", 72)


@pytest.mark.parametrize("target", target_params())
def test_forward_mode_ad_refused_by_a_named_fused_backend(target):
    inputs = make_inputs(CASES["3x3"], F32, CL, FULL, device=target.device)
    primals, tangents = _with_tangents(inputs)
    with torch.autograd.forward_ad.dual_level():
        x = torch.autograd.forward_ad.make_dual(primals["x"], tangents["x"])
        args = dict(primals, x=x)
        with pytest.raises(
            NotImplementedError, match=rf"backend: expected 'auto' or 'reference' .* got '{target.backend}'"
        ):
            resnet_fused.conv_bias_add_relu(**args, **inputs.kwargs, backend=target.backend)
    with pytest.raises(NotImplementedError, match="backend: expected 'auto' or 'reference'"):
        torch.func.jvp(
            lambda x: resnet_fused.conv_bias_add_relu(x, primals["weight"], backend=target.backend),
            (primals["x"],),
            (tangents["x"],),
        )


@pytest.mark.parametrize("name", ["x", "weight", "bias", "residual", "scale"])
@pytest.mark.parametrize("target", target_params())
def test_dual_tensor_refused_by_every_forward_op(target, name):
    """A direct op call with a dual tensor raises, naming the argument, instead of losing its tangent."""
    backend = target.backend
    inputs = make_inputs(CASES["3x3"], F32, CL, FULL, device=target.device)
    args = dict(inputs.tensors, scale=inputs.kwargs["scale"])
    args = {k: t.detach() for k, t in args.items()}
    with torch.autograd.forward_ad.dual_level():
        args[name] = torch.autograd.forward_ad.make_dual(args[name], torch.ones_like(args[name]))
        call = Inputs(
            {k: args[k] for k in ("x", "weight", "bias", "residual")}, dict(inputs.kwargs, scale=args["scale"]), None
        )
        expected = "a constant" if name == "scale" else "a tensor"
        with pytest.raises(NotImplementedError, match=f"{name}: expected {expected} without a forward-mode tangent"):
            forward_op(backend)(*call.op_args())
        if name == "scale":  # a constant for the public function too
            with pytest.raises(NotImplementedError, match="scale: expected a constant without a forward-mode tangent"):
                resnet_fused.conv_bias_add_relu(**call.tensors, **call.kwargs)


@pytest.mark.parametrize("name", ["grad_out", "out", "x", "weight", "scale"])
@pytest.mark.parametrize("target", target_params())
def test_dual_tensor_refused_by_every_backward_op(target, name):
    """A direct backward op call with a dual tensor (forward-over-reverse: a dual incoming gradient) raises, naming
    the argument, instead of losing its tangent."""
    args = {k: v.to(target.device) if isinstance(v, torch.Tensor) else v for k, v in _bwd().items()}
    with torch.autograd.forward_ad.dual_level():
        args[name] = torch.autograd.forward_ad.make_dual(args[name], torch.ones_like(args[name]))
        expected = "a constant" if name == "scale" else "a tensor"
        with pytest.raises(NotImplementedError, match=f"{name}: expected {expected} without a forward-mode tangent"):
            backward_op(target.backend)(*args.values())


def test_inference_mode_matches_reference():
    inputs = make_inputs(CASES["3x3"], F32, CL, FULL, requires_grad=False)
    with torch.inference_mode():
        y = resnet_fused.conv_bias_add_relu(**inputs.tensors, **inputs.kwargs)
    assert y.is_inference()
    assert_close(y, reference_forward(inputs), F32, "y", 72)


@pytest.mark.skipif(not any(t.backend == "cpu" for t in targets()), reason="covers the CPU kernels")
def test_portable_cpu_kernels_match_float64():
    """The CPU passes are built per CPU capability; ATEN_CPU_CAPABILITY=default runs the portable at::vec build."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default", RESNET_FUSED_TEST_BACKENDS="cpu")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        __file__,
        "-k",
        "every_epilogue or cases_match",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


def test_conv_arguments_as_conv2d_takes_them():
    """NumPy integers (groups too) and one-element sequences, as F.conv2d accepts them (configs often hold NumPy
    ints)."""
    np = pytest.importorskip("numpy")
    x, weight = torch.randn(2, 4, 9, 9), torch.randn(6, 4, 3, 3)
    expected = F.relu(F.conv2d(x.double(), weight.double(), None, (2, 2), (1, 1), (1, 1)))
    for stride, padding, dilation in [(np.int64(2), np.int32(1), np.int64(1)), ((2,), [1], (np.int64(1),))]:
        y = resnet_fused.conv_bias_add_relu(x, weight, stride=stride, padding=padding, dilation=dilation)
        assert_close(y, expected, F32, f"stride={stride!r}", reductions=36)
    grouped = F.relu(F.conv2d(x.double(), weight[:, :2].double(), None, 1, 1, 1, 2))
    for backend in ("auto", "reference"):
        y = resnet_fused.conv_bias_add_relu(x, weight[:, :2], padding=1, groups=np.int64(2), backend=backend)
        assert_close(y, grouped, F32, f"groups=np.int64(2), {backend}", reductions=18)
    for bad in (True, np.bool_(True), (2, 2, 2), (), 2.0, torch.tensor(2)):
        with pytest.raises(TypeError, match=r"stride: expected an int or a pair of ints"):
            resnet_fused.conv_bias_add_relu(x, weight, stride=bad)


@pytest.mark.parametrize("route", ["op", "fake_mode", "meta"])
@pytest.mark.parametrize("backend", sorted(registered_forward_ops()))
@pytest.mark.parametrize("name", ["stride", "padding", "dilation"])
def test_every_op_takes_exactly_two_values_per_pair(name, backend, route):
    """The ops' int[] arguments hold two values, as the C++ op checks; a fake or Triton op that took one would let
    a traced graph through that the real op refuses. (The public function takes an int or one value.)"""
    args = dict(zip(["stride", "padding", "dilation"], [[1, 1], [1, 1], [1, 1]], strict=True))
    args[name] = [1]
    x, w = torch.randn(2, 4, 8, 8), torch.randn(6, 4, 3, 3)
    fwd = (x, w, None, None, None, args["stride"], args["padding"], args["dilation"], 1, True)
    bwd = _bwd(**args, scale=None).values()
    mode = FakeTensorMode() if route == "fake_mode" else contextlib.nullcontext()
    for op, call in ((forward_op(backend), fwd), (backward_op(backend), bwd)):
        call = [v.to("meta") if route == "meta" and isinstance(v, torch.Tensor) else v for v in call]
        if route == "fake_mode":
            call = [mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for v in call]
        with mode, pytest.raises(ValueError, match=rf"{name}: expected 2 values, got 1"):
            op(*call)


@pytest.mark.parametrize("backend", sorted(registered_forward_ops()))
@pytest.mark.parametrize(
    "fault,over,error,match",
    [
        ("x_int", {"x": torch.ones(2, 4, 8, 8, dtype=torch.int32)}, TypeError, r"x: expected a floating dtype"),
        ("huge_dilation", {"dilation": [2**62, 1]}, ValueError,
         r"got kernel extent >9223372036854775807 > padded input 10 in dim 2"),
    ],
)  # fmt: skip
def test_an_op_and_its_fake_give_the_same_first_error(fault, over, error, match, backend):
    """With a second fault (a stride of three values), each op and its fake report the C++ op's first one: the fakes
    checked the pairs' lengths before everything else. A kernel extent past int64 reads the same everywhere."""
    args = _bwd(stride=[1, 1, 1] if fault == "x_int" else [1, 1], **over)
    fwd = [args[k] for k in ("x", "weight")] + [None, None, None] + [args[k] for k in ("stride", "padding", "dilation")]
    fwd += [1, True]
    mode = FakeTensorMode()
    for op, call in ((forward_op(backend), fwd), (backward_op(backend), list(args.values()))):
        for fake in (False, True):
            ctx = mode if fake else contextlib.nullcontext()
            values = [mode.from_tensor(v) if fake and isinstance(v, torch.Tensor) else v for v in call]
            with ctx, pytest.raises(error, match=match):
                op(*values)


@pytest.mark.skipif(not any(t.backend == "cpu" for t in targets()), reason="covers the C++ op")
@pytest.mark.parametrize("name", ["grad_out", "out", "x", "weight", "scale"])
def test_the_bare_backward_op_refuses_what_autograd_would_record(name):
    """The backward op has no derivative: with grad mode on and an input that requires grad, the ATen conv backward
    inside would record a graph of its own (a partial, wrong derivative); it refuses instead, and runs under
    no_grad."""
    args = _bwd()
    args[name].requires_grad_()
    op = backward_op("cpu")
    with pytest.raises(NotImplementedError, match=rf"^{name}: expected a tensor that does not require grad here"):
        op(*args.values())
    with torch.no_grad():
        grads = op(*args.values())
    assert not any(g.requires_grad for g in grads)


@pytest.mark.skipif(not any(t.backend == "cpu" for t in targets()), reason="covers the C++ op")
def test_the_library_loaded_alone_refuses_to_record_a_graph():
    """Loaded without `import resnet_fused`, the op has no autograd formula: a call autograd would record (its
    gradients would miss the epilogue) is refused, and a call under no_grad runs."""
    import resnet_fused._C as ext

    code = f"""
import torch
torch.ops.load_library({ext.__file__!r})
op = torch.ops.resnet_fused.conv_bias_add_relu
x, w = torch.randn(1, 3, 8, 8, requires_grad=True), torch.randn(4, 3, 3, 3)
try:
    op(x, w, None, None, None, [1, 1], [1, 1], [1, 1], 1, True)
    print("recorded")
except NotImplementedError as e:
    print(e)
with torch.no_grad():
    y = op(x, w, None, None, None, [1, 1], [1, 1], [1, 1], 1, True)
print(y.requires_grad, torch.allclose(y, torch.relu(torch.nn.functional.conv2d(x.detach(), w, padding=1)), atol=1e-5))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    refused, ran = proc.stdout.strip().splitlines()
    assert refused.startswith("x: expected a tensor that does not require grad here, got requires_grad=True")
    assert "import resnet_fused for its gradients" in refused
    assert ran == "False True"
