"""Correctness of resnet_fused.conv_bias_add_relu: every output and gradient against a float64 reference.

Runs against the backends in RESNET_FUSED_TEST_BACKENDS (default "cpu"); CI also runs it for "triton" under
TRITON_INTERPRET=1.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from conftest import TEST_BACKENDS, TRIM, assert_close, backend_params, make_tensor, to_layout
from hypothesis import given, settings
from hypothesis import strategies as st

import resnet_fused
from resnet_fused import reference

# name: (N, C, H, W, K, R, S, stride, padding, dilation, groups)
CASES = {
    "3x3": (2, 8, 8, 8, 8, 3, 3, 1, 1, 1, 1),
    "1x1": (3, 16, 5, 5, 8, 1, 1, 1, 0, 1, 1),
    "1x1_s2": (2, 8, 9, 9, 16, 1, 1, 2, 0, 1, 1),
    "c3_k5_nonsquare": (2, 3, 11, 7, 4, 5, 5, 1, 2, 1, 1),
    "7x7_s2_p3": (2, 3, 16, 14, 8, 7, 7, 2, 3, 1, 1),
    "3x3_dil2": (2, 4, 10, 9, 6, 3, 3, 1, 2, 2, 1),
    "groups2": (2, 6, 8, 8, 4, 3, 3, 1, 1, 1, 2),
    "depthwise_s2": (2, 5, 8, 7, 5, 3, 3, 2, 1, 1, 5),
    "rect_kernel_pad": (1, 4, 6, 9, 3, 1, 3, (2, 1), (0, 1), 1, 1),
}
# (bias, scale, residual, relu)
ALL_EPILOGUES = list(itertools.product([False, True], repeat=4))
FULL, PREACT = (True, True, True, True), (True, False, True, False)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
LAYOUTS = ["nchw", "channels_last", "noncontig"]
# (dtype, layout, epilogue) for every case; the interpreter (TRIM) keeps fewer while every path stays covered.
CASE_VARIANTS = [(d, lay, e) for d in DTYPES for lay in LAYOUTS for e in (FULL, PREACT)]
EPILOGUE_VARIANTS = [(d, lay, e) for d in DTYPES for lay in LAYOUTS for e in ALL_EPILOGUES]
if TRIM:
    CASE_VARIANTS = [
        (torch.float32, "channels_last", FULL), (torch.float32, "nchw", PREACT), (torch.float16, "channels_last", FULL)
    ]  # fmt: skip
    EPILOGUE_VARIANTS = [(torch.float32, LAYOUTS[i % 2], e) for i, e in enumerate(ALL_EPILOGUES)]
    DTYPES = [torch.float32, torch.float16]
    LAYOUTS = ["nchw", "channels_last"]


def variant_id(v) -> str:
    dtype, layout, (bias, scale, res, relu) = v
    return f"{str(dtype)[6:]}-{layout}-" + "".join(
        c if f else "-" for c, f in zip("BSRA", (bias, scale, res, relu), strict=True)
    )


def make_case(case, dtype, layout, epilogue, *, seed=0, requires_grad=True):
    n, c, h, w, k, r, s, stride, padding, dilation, groups = case
    has_bias, has_scale, has_res, relu = epilogue
    gen = torch.Generator().manual_seed(seed)
    exact = dtype in (torch.float16, torch.bfloat16)
    x = to_layout(make_tensor((n, c, h, w), dtype, seed_gen=gen, exact=exact), layout)
    weight = make_tensor((k, c // groups, r, s), dtype, seed_gen=gen, exact=exact)
    out_shape = resnet_fused.ops.conv_output_shape(
        x.shape, weight.shape, resnet_fused.ops._pair(stride, "stride", 1), resnet_fused.ops._pair(padding, "p", 0),
        resnet_fused.ops._pair(dilation, "d", 1),
    )  # fmt: skip
    bias = make_tensor((k,), dtype, seed_gen=gen, exact=exact) if has_bias else None
    scale = (make_tensor((k,), dtype, seed_gen=gen, exact=exact).abs() + 0.5) if has_scale else None
    residual = to_layout(make_tensor(out_shape, dtype, seed_gen=gen, exact=exact), layout) if has_res else None
    grad_out = make_tensor(out_shape, dtype, seed_gen=gen, exact=exact)
    inputs = {"x": x, "weight": weight, "bias": bias, "residual": residual}
    if requires_grad:
        for t in inputs.values():
            if t is not None:
                t.requires_grad_()
    kwargs = dict(scale=scale, stride=stride, padding=padding, dilation=dilation, groups=groups, relu=relu)
    return inputs, kwargs, grad_out


def check_against_float64(backend, case, dtype, layout, epilogue):
    inputs, kwargs, grad_out = make_case(case, dtype, layout, epilogue)
    y = resnet_fused.conv_bias_add_relu(**inputs, **kwargs, backend=backend)
    grad_inputs = {k: v for k, v in inputs.items() if v is not None}
    grads = torch.autograd.grad(y, list(grad_inputs.values()), grad_out)

    ref_inputs = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    ref_kwargs = dict(kwargs, scale=kwargs["scale"].double() if kwargs["scale"] is not None else None)
    y_ref = reference.conv_bias_add_relu(**ref_inputs, **ref_kwargs)
    ref_grads = torch.autograd.grad(y_ref, [v for v in ref_inputs.values() if v is not None], grad_out.double())

    x, weight = inputs["x"], inputs["weight"]
    n, k, p, q = y_ref.shape
    conv_len = weight[0].numel()
    assert y.dtype == dtype
    assert_close(y, y_ref, dtype, "y", reductions=conv_len)
    reductions = {"x": k * weight.shape[2] * weight.shape[3], "weight": n * p * q, "bias": n * p * q, "residual": 1}
    for (name, t), g, g_ref in zip(grad_inputs.items(), grads, ref_grads, strict=True):
        assert g.shape == t.shape and g.dtype == dtype, name
        assert_close(g, g_ref, dtype, f"grad_{name}", reductions=reductions[name] * (conv_len if name == "x" else 1))
    if layout == "noncontig" and min(x.shape[1:]) > 1:
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    x_fmt = torch._prims_common.suggest_memory_format(x)
    assert y.is_contiguous(memory_format=x_fmt), "y must come out in x's memory format"
    assert x.dtype == dtype


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("variant", CASE_VARIANTS, ids=variant_id)
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_cases_match_float64(backend, case, variant):
    check_against_float64(backend, case, *variant)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("variant", EPILOGUE_VARIANTS, ids=variant_id)
def test_every_epilogue_matches_float64(backend, variant):
    check_against_float64(backend, CASES["3x3"], *variant)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("epilogue", [FULL, PREACT, (False, True, False, True)], ids=["full", "preact", "scale_relu"])
def test_gradcheck_float64(backend, epilogue):
    inputs, kwargs, _ = make_case(
        CASES["groups2"][:0] + (1, 4, 6, 5, 4, 3, 3, 2, 1, 1, 2), torch.float64, "nchw", epilogue
    )
    names = [k for k, v in inputs.items() if v is not None]

    def fn(*tensors):
        return resnet_fused.conv_bias_add_relu(**dict(zip(names, tensors, strict=True)), **kwargs, backend=backend)

    assert torch.autograd.gradcheck(fn, [inputs[k] for k in names], eps=1e-6, atol=1e-6)


def _op_for(backend):
    return resnet_fused.ops._backend_op(backend)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize(
    "requires_grad,layout,epilogue",
    [(True, "channels_last", FULL), (False, "nchw", PREACT)]
    if TRIM
    else list(itertools.product([False, True], ["nchw", "channels_last"], [FULL, PREACT])),
)
def test_opcheck(backend, requires_grad, layout, epilogue):
    inputs, kwargs, _grad_out = make_case(CASES["3x3"], torch.float32, layout, epilogue, requires_grad=requires_grad)
    args = (
        inputs["x"], inputs["weight"], inputs["bias"], inputs["residual"], kwargs["scale"], [1, 1], [1, 1], [1, 1], 1,
        kwargs["relu"],
    )  # fmt: skip
    torch.library.opcheck(_op_for(backend), args)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("relu", [True, False])
def test_opcheck_backward_op(backend, relu):
    inputs, kwargs, grad_out = make_case(CASES["1x1_s2"], torch.float32, "channels_last", FULL, requires_grad=False)
    y = resnet_fused.conv_bias_add_relu(**inputs, **dict(kwargs, relu=relu), backend=backend)
    bwd = (
        torch.ops.resnet_fused.conv_bias_add_relu_triton_backward
        if backend == "triton"
        else torch.ops.resnet_fused.conv_bias_add_relu_backward
    )
    for mask in ([True, True, True, relu], [False, True, False, False], [True, False, True, relu]):
        args = (grad_out, y, inputs["x"], inputs["weight"], kwargs["scale"], [2, 2], [0, 0], [1, 1], 1, relu, mask)
        torch.library.opcheck(bwd.default, args)


@pytest.mark.parametrize("backend", backend_params())
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    inputs, kwargs, grad_out = make_case(CASES["3x3"], torch.float32, "channels_last", FULL)

    def block(x, weight, bias, residual):
        return resnet_fused.conv_bias_add_relu(x, weight, bias, residual, **kwargs, backend=backend)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager" if backend == "triton" else "inductor")
    y = compiled(**inputs)
    y_eager = block(**inputs)
    torch.testing.assert_close(y, y_eager)
    grads = torch.autograd.grad(y, list(inputs.values()), grad_out)
    grads_eager = torch.autograd.grad(y_eager, list(inputs.values()), grad_out)
    for g, ge in zip(grads, grads_eager, strict=True):
        torch.testing.assert_close(g, ge)


@pytest.mark.parametrize("backend", backend_params())
@settings(max_examples=5 if TRIM else 40, deadline=None)
@given(data=st.data())
def test_random_configs_match_float64(backend, data):
    groups = data.draw(st.sampled_from([1, 1, 2, 3]), "groups")
    c = groups * data.draw(st.integers(1, 4), "C/groups")
    k = groups * data.draw(st.integers(1, 4), "K/groups")
    r, s = data.draw(st.integers(1, 5), "R"), data.draw(st.integers(1, 5), "S")
    stride = (data.draw(st.integers(1, 3), "stride_h"), data.draw(st.integers(1, 3), "stride_w"))
    dilation = (data.draw(st.integers(1, 2), "dil_h"), data.draw(st.integers(1, 2), "dil_w"))
    padding = (data.draw(st.integers(0, 3), "pad_h"), data.draw(st.integers(0, 3), "pad_w"))
    min_h = max(1, dilation[0] * (r - 1) + 1 - 2 * padding[0])
    min_w = max(1, dilation[1] * (s - 1) + 1 - 2 * padding[1])
    h, w = data.draw(st.integers(min_h, min_h + 8), "H"), data.draw(st.integers(min_w, min_w + 8), "W")
    n = data.draw(st.integers(1, 3), "N")
    dtype = data.draw(st.sampled_from(DTYPES), "dtype")
    layout = data.draw(st.sampled_from(LAYOUTS), "layout")
    epilogue = data.draw(st.tuples(*[st.booleans()] * 4), "epilogue")
    check_against_float64(backend, (n, c, h, w, k, r, s, stride, padding, dilation, groups), dtype, layout, epilogue)


@pytest.mark.parametrize("backend", backend_params())
def test_inputs_never_modified(backend):
    inputs, kwargs, grad_out = make_case(CASES["1x1"], torch.float32, "channels_last", FULL)
    saved = {k: v.detach().clone() for k, v in inputs.items()}
    scale, grad_saved = kwargs["scale"].clone(), grad_out.clone()
    y = resnet_fused.conv_bias_add_relu(**inputs, **kwargs, backend=backend)
    y.backward(grad_out)
    for k, v in inputs.items():
        assert torch.equal(v.detach(), saved[k]), f"{k} was modified"
    assert torch.equal(kwargs["scale"], scale) and torch.equal(grad_out, grad_saved)
    for k, v in inputs.items():
        assert v.grad is not None and v.grad.data_ptr() not in {t.data_ptr() for t in inputs.values()}, k


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_batch_zero(backend, layout):
    inputs, kwargs, _ = make_case((0, *CASES["3x3"][1:]), torch.float32, layout, FULL)
    y = resnet_fused.conv_bias_add_relu(**inputs, **kwargs, backend=backend)
    assert y.shape == (0, 8, 8, 8)
    y.sum().backward()
    assert torch.equal(inputs["bias"].grad, torch.zeros(8))
    assert inputs["weight"].grad.shape == inputs["weight"].shape and not inputs["weight"].grad.any()
    assert inputs["x"].grad.shape == inputs["x"].shape and inputs["residual"].grad.shape == (0, 8, 8, 8)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("relu", [True, False])
def test_nan_inf_propagate_like_reference(backend, layout, relu):
    inputs, kwargs, grad_out = make_case(CASES["3x3"], torch.float32, layout, (True, True, True, relu))
    with torch.no_grad():
        inputs["x"][0, 0, 2, 3] = float("nan")
        inputs["x"][1, 1, 5, 5] = float("inf")
        inputs["residual"][0, 3, 0, 0] = float("-inf")
        inputs["residual"][1, 2, 7, 7] = float("nan")
        inputs["residual"][1, 4, 4, 1] = float("inf")
    y = resnet_fused.conv_bias_add_relu(**inputs, **kwargs, backend=backend)
    y_ref = reference.conv_bias_add_relu(**inputs, **kwargs)
    assert torch.equal(y.isnan(), y_ref.isnan()) and torch.equal(y.isinf(), y_ref.isinf())
    assert y.isnan().any() and (y.isinf().any() or not relu)
    torch.testing.assert_close(y, y_ref, equal_nan=True)
    grads = torch.autograd.grad(y, list(inputs.values()), grad_out)
    ref_grads = torch.autograd.grad(y_ref, list(inputs.values()), grad_out)
    for name, g, gr in zip(inputs, grads, ref_grads, strict=True):
        assert torch.equal(g.isnan(), gr.isnan()), name
        torch.testing.assert_close(g, gr, equal_nan=True, msg=lambda m, name=name: f"grad_{name}: {m}")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bias_grad_is_deterministic_across_thread_counts(backend, layout):
    inputs, kwargs, grad_out = make_case((4, 8, 33, 31, 24, 3, 3, 1, 1, 1, 1), torch.float32, layout, FULL)
    results = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 1, 3):
            torch.set_num_threads(t)
            y = resnet_fused.conv_bias_add_relu(**inputs, **kwargs, backend=backend)
            results.append(torch.autograd.grad(y, inputs["bias"], grad_out)[0])
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        assert torch.equal(r, results[0])


def test_scale_requiring_grad_is_an_error():
    inputs, kwargs, _ = make_case(CASES["3x3"], torch.float32, "nchw", FULL)
    kwargs["scale"].requires_grad_()
    with pytest.raises(ValueError, match=r"scale: expected a constant \(requires_grad=False\).*got requires_grad=True"):
        resnet_fused.conv_bias_add_relu(**inputs, **kwargs)
    with torch.no_grad():  # without autograd there is nothing to refuse
        resnet_fused.conv_bias_add_relu(**inputs, **kwargs)


def test_available_backends():
    backends = resnet_fused.available_backends()
    assert {"cpu", "reference"} <= set(backends)
    assert "auto" not in backends
    if not torch.cuda.is_available():
        assert "cuda" not in backends


def test_auto_on_cpu_runs_the_cpu_kernels():
    inputs, kwargs, _ = make_case(CASES["3x3"], torch.float32, "nchw", FULL, requires_grad=False)
    x, weight, bias, residual = inputs.values()
    conv_args = (kwargs["scale"], (1, 1), (1, 1), (1, 1), 1, True)
    assert resnet_fused.ops.resolve_backend("auto", x, weight, bias, residual, *conv_args) == "cpu"
    y_auto = resnet_fused.conv_bias_add_relu(**inputs, **kwargs)
    y_cpu = resnet_fused.conv_bias_add_relu(**inputs, **kwargs, backend="cpu")
    assert torch.equal(y_auto, y_cpu)


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
     r"weight: expected shape\[1\] == C/groups = 4, got 3"),
    ("dtype_mix", lambda: _args(bias=torch.randn(6, dtype=torch.float64)), TypeError,
     r"bias: expected dtype torch.float32 \(x's\), got torch.float64"),
    ("dtype_int", lambda: (torch.ones(2, 4, 8, 8, dtype=torch.int32), torch.ones(6, 4, 3, 3, dtype=torch.int32), {}),
     TypeError, r"x: expected a floating dtype .*got torch.int32"),
    ("device_mix", lambda: _args(residual=torch.randn(2, 6, 8, 8, device="meta")), ValueError,
     r"residual: expected device cpu \(x's\), got meta"),
    ("stride_zero", lambda: _args(stride=0), ValueError, r"stride: expected values >= 1, got \(0, 0\)"),
    ("stride_neg", lambda: _args(stride=(1, -1)), ValueError, r"stride: expected values >= 1, got \(1, -1\)"),
    ("padding_neg", lambda: _args(padding=-1), ValueError, r"padding: expected values >= 0, got \(-1, -1\)"),
    ("padding_str", lambda: _args(padding="same"), TypeError, r"padding: expected an int or a pair of ints, got 'same'"),
    ("dilation_zero", lambda: _args(dilation=0), ValueError, r"dilation: expected values >= 1, got \(0, 0\)"),
    ("kernel_too_big", lambda: (torch.randn(1, 4, 5, 5), torch.randn(6, 4, 7, 7), {"padding": 0}), ValueError,
     r"weight: expected a \(dilated\) kernel no larger than the padded input, got kernel extent 7 > padded input 5"),
    ("groups_zero", lambda: _args(groups=0), ValueError, r"groups: expected an int >= 1, got 0"),
]  # fmt: skip


@pytest.mark.parametrize("make,error,match", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
@pytest.mark.parametrize("backend", ["auto", "cpu", "reference"])
def test_bad_input_errors(make, error, match, backend):
    x, weight, kw = make()
    with pytest.raises(error, match=match):
        resnet_fused.conv_bias_add_relu(x, weight, **kw, backend=backend)


@pytest.mark.parametrize(
    "make,error,match",
    [b[1:] for b in BAD_INPUTS if b[0] not in ("padding_str", "device_mix")],  # a meta tensor dispatches to the fake
    ids=[b[0] for b in BAD_INPUTS if b[0] not in ("padding_str", "device_mix")],
)
def test_bad_input_errors_from_the_cpp_op(make, error, match):
    """The dispatcher op checks too, for callers that skip the Python API: same argument, same error class."""
    x, weight, kw = make()
    pair = {k: (v, v) if isinstance(v, int) else v for k, v in kw.items() if k in ("stride", "padding", "dilation")}
    args = (
        x, weight, kw.get("bias"), kw.get("residual"), kw.get("scale"), list(pair.get("stride", (1, 1))),
        list(pair.get("padding", (0, 0))), list(pair.get("dilation", (1, 1))), kw.get("groups", 1), True,
    )  # fmt: skip
    with pytest.raises(error, match=match.split(":")[0] + ": expected .*, got "):
        torch.ops.resnet_fused.conv_bias_add_relu(*args)


def test_unknown_and_unavailable_backends():
    x, weight, kw = _args()
    with pytest.raises(
        ValueError, match=r"backend: expected one of \('auto', 'cpu', 'cuda', 'triton', 'reference'\), got 'cudnn'"
    ):
        resnet_fused.conv_bias_add_relu(x, weight, **kw, backend="cudnn")
    for missing in {"cuda", "triton"} - set(resnet_fused.available_backends()):
        with pytest.raises(
            RuntimeError, match=rf"backend: '{missing}' is not available in this install \(.+\); available: "
        ):
            resnet_fused.conv_bias_add_relu(x, weight, **kw, backend=missing)


def test_cpu_backend_refuses_other_devices():
    x, weight, kw = _args()
    meta = {k: v.to("meta") for k, v in kw.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match=r"backend: 'cpu' runs on cpu tensors, got x on meta"):
        resnet_fused.conv_bias_add_relu(x.to("meta"), weight.to("meta"), **dict(kw, **meta), backend="cpu")


def test_inference_mode_matches_reference():
    inputs, kwargs, _ = make_case(CASES["3x3"], torch.float32, "channels_last", FULL, requires_grad=False)
    with torch.inference_mode():
        y = resnet_fused.conv_bias_add_relu(**inputs, **kwargs)
    assert y.is_inference()
    torch.testing.assert_close(y, reference.conv_bias_add_relu(**inputs, **kwargs))


@pytest.mark.skipif("cpu" not in TEST_BACKENDS, reason="covers the CPU kernels")
def test_portable_cpu_kernels_match_float64():
    """The CPU passes are built per CPU capability; ATEN_CPU_CAPABILITY=default runs the portable at::vec build."""
    import subprocess
    import sys

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


def test_backward_op_checks_its_arguments():
    x, weight = torch.randn(2, 4, 8, 8), torch.randn(6, 4, 3, 3)
    good = torch.randn(2, 6, 8, 8)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    bwd = torch.ops.resnet_fused.conv_bias_add_relu_backward
    mask = [True, True, True, True]
    with pytest.raises(ValueError, match=r"grad_out: expected the output's shape \[2, 6, 8, 8\], got \[2, 6, 8, 7\]"):
        bwd(torch.randn(2, 6, 8, 7), good, x, weight, None, *conv, True, mask)
    with pytest.raises(TypeError, match=r"out: expected dtype Float \(x's\), got Double"):
        bwd(good, good.double(), x, weight, None, *conv, True, mask)
    with pytest.raises(ValueError, match=r"output_mask: grad_residual is grad_out itself when relu=False"):
        bwd(good, good, x, weight, None, *conv, False, mask)


@pytest.mark.parametrize("backend", backend_params())
def test_autocast_casts_like_conv2d(backend):
    """Under CPU autocast the op runs in bf16, as conv2d would, whatever dtype its fp32 inputs have."""
    inputs, kwargs, _ = make_case(CASES["3x3"], torch.float32, "channels_last", FULL, requires_grad=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = resnet_fused.conv_bias_add_relu(**inputs, **kwargs, backend=backend)
        y2 = resnet_fused.conv_bias_add_relu(y, inputs["weight"], inputs["bias"], padding=1, backend=backend)
    assert y.dtype == torch.bfloat16 and y2.dtype == torch.bfloat16
    cast = {k: v.to(torch.bfloat16) for k, v in inputs.items()}
    expected = reference.conv_bias_add_relu(
        **{k: v.double() for k, v in cast.items()}, **dict(kwargs, scale=kwargs["scale"].bfloat16().double())
    )
    assert_close(y, expected, torch.bfloat16, "y", reductions=72)
