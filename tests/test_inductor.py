"""torch.compile with Inductor compiles the fused op from its aten decomposition (resnet_fused.inductor): the same
results as the op, float64-checked, with and without freezing, and no opaque call left in the generated code (on CPU
here; the decomposition covers every device)."""

from __future__ import annotations

import pytest
import torch
from helpers import ALL_EPILOGUES, CASES, FULL, PREACT, assert_close, check_call, make_inputs, run_fresh
from torch._inductor.utils import run_and_get_code

import resnet_fused
from resnet_fused.nn import FusedConv2d

OP_CALL = "torch.ops.resnet_fused"  # how generated code calls the op, where it keeps one


def compiled_code(fn, *args, freezing: bool = False):
    """``fn(*args)`` compiled by Inductor, and the code it generated. Compiled afresh: AOTAutograd's cache keys on
    the graph dynamo traced, which is the same with and without the decomposition."""
    torch._dynamo.reset()
    no_cache = {"enable_autograd_cache": False} if hasattr(torch._functorch.config, "enable_autograd_cache") else {}
    try:
        with (
            torch._inductor.config.patch(freezing=freezing, fx_graph_cache=False),
            torch._functorch.config.patch(**no_cache),
        ):
            out, code = run_and_get_code(torch.compile(fn, fullgraph=True), *args)
    finally:
        torch._dynamo.reset()
    return out, "\n".join(code)


# Every epilogue on one conv; every layout and conv geometry with the full epilogue and the pre-activation one.
F32 = torch.float32
COMPILED_CASES = [
    *(("3x3", "channels_last", e, F32) for e in ALL_EPILOGUES),
    *(("3x3", layout, e, F32) for layout in ("nchw", "noncontig") for e in (FULL, PREACT)),
    *((case, "nchw", FULL, F32) for case in ("1x1_s2", "groups2", "dilated_rect", "depthwise_s2")),
    *(("3x3", "channels_last", FULL, dtype) for dtype in (torch.bfloat16, torch.float64)),
]


@pytest.mark.parametrize(
    ("case", "layout", "epilogue", "dtype"),
    COMPILED_CASES,
    ids=[
        f"{c}-{lay}-{str(d)[6:]}-" + "".join("BSRA"[i] for i, on in enumerate(e) if on)
        for c, lay, e, d in COMPILED_CASES
    ],
)
def test_compiled_op_is_inductors_own_code(case, layout, epilogue, dtype):
    """Every epilogue, layout and conv geometry: y and the gradients against float64, y in x's memory format (the
    op's contract), and the op itself gone from the generated code (the backward stays the package's)."""
    inputs = make_inputs(CASES[case], dtype, layout, epilogue)
    kwargs = inputs.kwargs

    def block(x, weight, bias, residual):
        return resnet_fused.conv_bias_add_relu(x, weight, bias, residual, **kwargs)

    with torch.no_grad():
        _, code = compiled_code(block, *inputs.tensors.values())
    assert "convolution" in code and f"{OP_CALL}.conv_bias_add_relu.default" not in code
    y, _ = compiled_code(block, *inputs.tensors.values())
    check_call(y, inputs, dtype, f"compiled {case} {layout} {dtype} {epilogue}")


def test_frozen_compile_prepacks_and_fuses_as_for_the_original():
    """Under freezing, a converted block's convs become Inductor's prepacked oneDNN convs with their post-ops, as the
    original's do; without the decomposition they stayed opaque calls of the op. Inductor's fused ReLU turns a NaN
    pre-activation into 0 there, as for any model it freezes; without freezing NaN stays NaN, as in eager."""
    torch.manual_seed(0)
    block = torch.nn.Sequential(FusedConv2d(8, 16, 3, padding=1), FusedConv2d(16, 16, 1, relu=False)).eval()
    block = block.to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 10, 10).to(memory_format=torch.channels_last)
    x_nan = x.clone()
    x_nan[0, 0, 4, 4] = float("nan")
    with torch.no_grad():
        eager, eager_nan = block(x), block(x_nan)
        for freezing in (False, True):
            y, code = compiled_code(block, x, freezing=freezing)
            assert OP_CALL not in code
            assert ("mkldnn._convolution_pointwise" in code) == freezing, code
            torch.testing.assert_close(y, eager)  # fp32 default tolerance
            y_nan, _ = compiled_code(block, x_nan, freezing=freezing)
            if freezing:
                assert y_nan.isnan().sum() < eager_nan.isnan().sum()  # NaN -> 0 in the first conv's fused ReLU
            else:
                assert torch.equal(y_nan.isnan(), eager_nan.isnan())


def test_a_compile_before_import_still_sees_the_decomposition():
    """Inductor reads its table through a cached copy: a compile before ``import resnet_fused`` made one without the
    op, and the op then stayed opaque, silently."""
    code = (
        "import torch, torch._inductor.config as c, torch._functorch.config as f\n"
        "from torch._inductor.utils import run_and_get_code\n"
        "c.fx_graph_cache = False\n"
        "f.enable_autograd_cache = False\n"
        "torch.compile(lambda x: x.relu() + 1)(torch.randn(4))\n"
        "import resnet_fused\n"
        "torch.manual_seed(0)\n"
        "x, w = torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3)\n"
        "f = lambda x: resnet_fused.conv_bias_add_relu(x, w, padding=1)\n"
        "with torch.no_grad():\n"
        "    y, code = run_and_get_code(torch.compile(f, fullgraph=True), x)\n"
        "assert 'torch.ops.resnet_fused' not in '\\n'.join(code)\n"
        # Inductor's conv and the op's may sum in another order: fp32's tolerance, not allclose's atol of 1e-8.
        "torch.testing.assert_close(y, f(x))\n"
    )
    run_fresh(code)


def test_an_unbacked_batch_compiles_without_layout_optimization():
    """With a data-dependent batch, torch 2.14's Inductor fails NCHW convs in its layout optimization (a plain
    F.conv2d as well); turning that off compiles the decomposition correctly."""
    from torch._dynamo.decorators import mark_unbacked

    g = torch.Generator().manual_seed(0)
    x, w, r = (torch.randn(s, generator=g) for s in [(4, 3, 8, 8), (5, 3, 3, 3), (4, 5, 8, 8)])
    mark_unbacked(x, 0)
    mark_unbacked(r, 0)
    with torch._inductor.config.patch(layout_optimization=False):
        y, code = compiled_code(lambda x, r: resnet_fused.conv_bias_add_relu(x, w, None, r, padding=1), x, r)
    assert OP_CALL not in code
    torch.testing.assert_close(y, resnet_fused.conv_bias_add_relu(x, w, None, r, padding=1))


@pytest.mark.parametrize("view", ["dense", "channel_slice"])
def test_an_unbacked_batch_keeps_channels_last_forward_and_backward(view):
    """With a data-dependent batch torch's memory-format rule cannot decide and says contiguous; the op's fakes must
    still say channels_last where x is, as its kernels do (a dense x, and a slice of a channels_last x's channels).
    They said NCHW: Inductor's check of the backward op's output strides failed (training a channels_last model),
    and the forward came out NCHW."""
    from torch._dynamo.decorators import mark_unbacked

    g = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    base = torch.randn(4, 3 if view == "dense" else 6, 8, 8, generator=g).contiguous(memory_format=cl)
    base.requires_grad_()
    w = torch.randn(5, 3, 3, 3, generator=g, requires_grad=True)
    r = torch.randn(4, 5, 8, 8, generator=g).contiguous(memory_format=cl)

    def f(base, r):
        x = base if view == "dense" else base[:, :3]
        return resnet_fused.conv_bias_add_relu(x, w, None, r, padding=1)

    want = f(base, r)
    want_grads = torch.autograd.grad(want.sum(), (base, w))
    mark_unbacked(base, 0)
    mark_unbacked(r, 0)
    torch._dynamo.reset()
    # Caches off: a graph compiled earlier from other fakes must not stand in for this one.
    caches = torch._inductor.config.patch(layout_optimization=False, fx_graph_cache=False)
    try:
        with caches, torch._functorch.config.patch(enable_autograd_cache=False):
            y = torch.compile(f, fullgraph=True)(base, r)
            grads = torch.autograd.grad(y.sum(), (base, w))
    finally:
        torch._dynamo.reset()
    assert y.stride() == want.stride() and grads[0].stride() == want_grads[0].stride()
    torch.testing.assert_close(y, want)
    for got, expected in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("order", ["resnet_fused first", "inductor first"])
def test_registered_when_inductor_is_imported(order):
    """``import resnet_fused`` does not import Inductor's decomposition table, and the op is in it once Inductor is
    imported, whichever came first."""
    table = "torch._inductor.decomposition"
    code = (
        "import sys, torch\n"
        + (f"import {table}\n" if order == "inductor first" else "")
        + "import resnet_fused\n"
        + (f"assert '{table}' not in sys.modules\n" if order == "resnet_fused first" else "")
        + f"import {table} as d\n"
        "assert torch.ops.resnet_fused.conv_bias_add_relu.default in d.decompositions\n"
        "assert torch.ops.resnet_fused.conv_bias_add_relu_backward.default not in d.decompositions\n"
    )
    run_fresh(code)


def test_a_failing_registration_warns_and_the_op_stays_whole():
    """Were Inductor's private registry to move, ``import resnet_fused`` must still work: it warns, and compiled
    models call the op whole."""
    code = (
        "import warnings, torch\n"
        "import torch._inductor.decomposition as d\n"
        "def moved(*a, **k):\n"
        "    raise ImportError('registry moved')\n"
        "d.register_decomposition = moved\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import resnet_fused\n"
        "said = [str(w.message) for w in caught if 'resnet_fused' in str(w.message)]\n"
        "assert said and 'registry moved' in said[0] and 'runs the op whole' in said[0], said\n"
        "x, w = torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3)\n"
        "f = lambda x: resnet_fused.conv_bias_add_relu(x, w, padding=1)\n"
        "assert torch.allclose(torch.compile(f, fullgraph=True)(x), f(x))\n"
    )
    run_fresh(code)


def test_a_prepared_model_compiles_from_the_decomposition_too():
    """A prepared model under torch.compile runs the ordinary op (the packs are eager-only), which Inductor then
    compiles from its decomposition: frozen, it matches the prepared model's eager output."""
    import torchvision

    torch.manual_seed(0)
    model, _ = resnet_fused.convert(torchvision.models.resnet18(num_classes=10).eval())
    prepared = resnet_fused.optimize_for_inference(model.to(memory_format=torch.channels_last))
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.no_grad():
        eager = prepared(x)
        y, code = compiled_code(prepared, x, freezing=True)
    assert OP_CALL not in code and "mkldnn._convolution_pointwise" in code
    torch.testing.assert_close(y, eager)  # fp32's default tolerance: 3e-7 apart here


def test_an_aot_inductor_package_runs_where_resnet_fused_is_not_installed(tmp_path):
    """torch.export, then AOTInductor: the package holds Inductor's code for the decomposed op, so a process that never
    imports resnet_fused loads and runs it (a deployment target needs torch alone). Its output is checked against the
    original model in float64."""
    import copy

    import torchvision.models.resnet as tv
    from test_nn import randomize_norms_

    torch.manual_seed(0)
    shortcut = torch.nn.Sequential(tv.conv1x1(8, 16, 2), torch.nn.BatchNorm2d(16))
    model = torch.nn.Sequential(tv.BasicBlock(8, 16, 2, shortcut), tv.Bottleneck(16, 4))
    model = randomize_norms_(model).eval()
    converted, _ = resnet_fused.convert(copy.deepcopy(model))
    x = torch.randn(2, 8, 12, 12)
    with torch.no_grad():
        expected = model.double()(x.double())
    program = torch.export.export(converted, (x,))
    assert any(str(n.target) == "resnet_fused.conv_bias_add_relu.default" for n in program.graph.nodes)
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "model.pt2"))
    with torch.no_grad():
        y = torch._inductor.aoti_load_package(package)(x)
    assert_close(y, expected, torch.float32, "y", reductions=9 * 16 * 3)
    torch.save({"x": x, "y": y}, tmp_path / "io.pt")
    run_fresh(
        "import sys, torch\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        f"run = torch._inductor.aoti_load_package({package!r})\n"
        "with torch.no_grad():\n"
        "    torch.testing.assert_close(run(io['x']), io['y'])  # the same code; threads may split sums otherwise\n"
        "assert 'resnet_fused' not in sys.modules\n"
    )
