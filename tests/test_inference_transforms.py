"""optimize_for_inference under tracers, exporters and compilers, and after optimizer steps.

A prepared model records the ordinary op wherever it is traced (the packed weight is an opaque oneDNN tensor that no
tracer can record), and an optimizer step, fused ones included, never leaves it serving the old weight.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from test_inference import PACKED_OP, packs, small_net
from test_nn import randomize_norms_
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx
from torch.nn.utils import prune
from torch.optim.optimizer import _global_optimizer_post_hooks
from torch.profiler import ProfilerActivity, profile

from resnet_fused.inference import PackedFusedConv2d, _drop_stepped_packs, optimize_for_inference
from resnet_fused.nn import Bottleneck, FusedConv2d, projection

GRAD_MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}
FUSED_OP = "resnet_fused::conv_bias_add_relu"
TOL = {"rtol": 1e-5, "atol": 1e-5}  # the packed path against the ordinary op: oneDNN's rounding


def bottlenecks() -> nn.Module:
    """Two resnet_fused.nn Bottlenecks (a strided one with a projection shortcut, then an identity shortcut), eval,
    channels_last, with non-trivial BatchNorms (folded into each call's scale): 1x1 and 3x3 convs, residual adds."""
    torch.manual_seed(0)
    model = nn.Sequential(Bottleneck(3, 4, stride=2, downsample=projection(3, 16, 2)), Bottleneck(16, 4))
    return randomize_norms_(model).eval().to(memory_format=torch.channels_last)


def image(batch: int = 1, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=gen).contiguous(memory_format=torch.channels_last)


def run(model: nn.Module, x: torch.Tensor, mode: str) -> tuple[torch.Tensor, set[str]]:
    """The model's output under ``mode`` and the names of the ops it ran."""
    with GRAD_MODES[mode](), profile(activities=[ProfilerActivity.CPU]) as prof:
        y = model(x)
    return y, {e.name for e in prof.events()}


def primed(mode: str) -> tuple[nn.Module, torch.Tensor]:
    """A prepared model that ran once on the returned input under ``mode``: it holds packs and its fast path
    remembers that call, which a traced call with the same metadata must still step past."""
    model = optimize_for_inference(bottlenecks())
    x = image()
    _, ops = run(model, x, mode)
    assert PACKED_OP in ops and packs(model) == 7
    return model, x


def assert_still_packed(model: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """Eager calls after a trace still take the packed path; returns the output."""
    y, ops = run(model, x, mode)
    assert PACKED_OP in ops and FUSED_OP not in ops, sorted(ops)
    return y


@pytest.mark.parametrize("mode", GRAD_MODES)
def test_packed_path_under_inference_mode_with_per_call_scales(mode):
    """nn blocks fold their BatchNorm per call, so under inference_mode scale and bias are inference tensors, which
    have no version counter: those calls are checked every time instead of failing in the fast path."""
    model, x = primed(mode)
    plain = copy.deepcopy(model)
    for m in plain.modules():
        if isinstance(m, PackedFusedConv2d):
            m.__class__ = FusedConv2d
    for _ in range(2):
        y = assert_still_packed(model, x, mode)
        with torch.no_grad():
            torch.testing.assert_close(y, plain(x), **TOL)


# ---- tracing, export, compile: the ordinary op is recorded ----


@pytest.mark.parametrize("mode", GRAD_MODES)
def test_jit_trace_records_the_ordinary_op(mode):
    model, x = primed(mode)
    with GRAD_MODES[mode](), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(model, x)
    # The checks only raise: the trace records none of them, and their shape compares must not warn that it might
    # not generalize (torch.jit.trace's own deprecation notice is a FutureWarning).
    tracer = [str(w.message)[:100] for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    assert not tracer, tracer
    graph = str(traced.inlined_graph)
    assert "mkldnn" not in graph and "resnet_fused::conv_bias_add_relu" in graph
    x2 = image(seed=2)
    with GRAD_MODES[mode]():
        y = traced(x2)
    torch.testing.assert_close(y, assert_still_packed(model, x2, mode), **TOL)


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
@pytest.mark.parametrize("mode", GRAD_MODES)
def test_torch_export_records_the_ordinary_op(mode, strict):
    model, x = primed(mode)
    with GRAD_MODES[mode]():
        program = torch.export.export(model, (x,), strict=strict)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("mkldnn" in t for t in targets) and any("conv_bias_add_relu" in t for t in targets), targets
    x2 = image(seed=2)
    with GRAD_MODES[mode]():
        y = program.module()(x2)
    torch.testing.assert_close(y, assert_still_packed(model, x2, mode), **TOL)


@pytest.mark.parametrize("mode", GRAD_MODES)
def test_torch_compile_fullgraph(mode):
    model, _ = primed(mode)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x2 = image(seed=2)
    with GRAD_MODES[mode]():
        y = compiled(x2)
    torch.testing.assert_close(y, assert_still_packed(model, x2, mode), **TOL)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("mode", GRAD_MODES)
def test_onnx_export_runs_in_onnxruntime(mode, exporter):
    pytest.importorskip("onnxruntime")
    from test_onnx_export import assert_matches, custom_domain_nodes, export, run_ort

    model, _ = primed(mode)
    x = image(batch=2)  # the exported batch dim is dynamic: exported at 2, run at 3
    run(model, x, mode)
    with GRAD_MODES[mode]():
        proto = export(model, (x,), exporter)
    assert not custom_domain_nodes(proto)
    x3 = image(batch=3, seed=3)
    (actual,) = run_ort(proto, (x3,))
    assert_matches(actual, assert_still_packed(model, x3, mode).double(), f"{exporter} export under {mode}")


def test_fake_tensors_and_make_fx_take_the_ordinary_op():
    """A FakeTensor with the metadata of the remembered call, and make_fx on real tensors (a dispatch mode)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    model, x = primed("no_grad")
    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as fake_mode:
        y = model(fake_mode.from_tensor(x))
    assert isinstance(y, FakeTensor) and y.shape == (1, 16, 16, 16)
    with torch.no_grad():
        graph = make_fx(model)(x)
    targets = {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
    assert not any("mkldnn" in t for t in targets) and any("conv_bias_add_relu" in t for t in targets), targets
    with torch.no_grad():
        torch.testing.assert_close(graph(x), assert_still_packed(model, x, "no_grad"), **TOL)


def test_fx_symbolic_trace_records_the_ordinary_op():
    model, _ = primed("no_grad")
    graph = torch.fx.symbolic_trace(model)
    x2 = image(seed=2)
    y, ops = run(graph, x2, "no_grad")
    assert "mkldnn" not in graph.code and PACKED_OP not in ops and FUSED_OP in ops
    torch.testing.assert_close(y, assert_still_packed(model, x2, "no_grad"), **TOL)


def test_tensor_subclass_input_takes_the_ordinary_op():
    class Marked(torch.Tensor):
        pass

    model, x = primed("no_grad")
    y, ops = run(model, x.as_subclass(Marked), "no_grad")
    assert type(y) is Marked and PACKED_OP not in ops and FUSED_OP in ops
    torch.testing.assert_close(y.as_subclass(torch.Tensor), assert_still_packed(model, x, "no_grad"), **TOL)


# ---- optimizer steps: fused ones write in place without bumping the version counter ----

OPTIMIZERS = {
    "Adam": (torch.optim.Adam, {}),
    "AdamW": (torch.optim.AdamW, {}),
    "SGD": (torch.optim.SGD, {"momentum": 0.9}),
    "Adagrad": (torch.optim.Adagrad, {}),
}
IMPLS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}


def make_optimizer(name: str, impl: str, params) -> torch.optim.Optimizer:
    cls, kwargs = OPTIMIZERS[name]
    try:
        return cls(params, lr=0.1, **kwargs, **IMPLS[impl])
    except RuntimeError as e:  # e.g. a torch without this fused kernel on the CPU
        pytest.skip(f"{name}({impl}) on the CPU: {e}")


def prepared_net() -> nn.Module:
    """small_net prepared; its first conv also has a frozen scale (packed folded into the weight) and a bias."""
    net = small_net()
    net[0].set_scale_shift(torch.rand(8) + 0.5, torch.randn(8))
    return optimize_for_inference(net)


def assert_serves_the_stepped_weights(net: nn.Module, x: torch.Tensor, before: torch.Tensor) -> None:
    """``net``'s no_grad output equals a freshly prepared copy's with the same state_dict, and the step changed it."""
    fresh = optimize_for_inference(small_net())
    fresh.load_state_dict(net.state_dict())
    with torch.no_grad():
        y, expected = net(x), fresh(x)
    assert not torch.equal(y, before), "the optimizer step changed nothing"
    assert torch.equal(y, expected), f"stale packed weight: max abs error {(y - expected).abs().max().item()}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_step_in_eval_mode_repacks(name, impl):
    net = prepared_net()
    x = torch.randn(2, 4, 9, 9).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        before = net(x)  # packs, and remembers this call
    assert packs(net) == 2
    optimizer = make_optimizer(name, impl, net.parameters())
    net(x).square().mean().backward()  # eval mode, with autograd: the ordinary op
    optimizer.step()
    assert_serves_the_stepped_weights(net, x, before)


def test_compiled_fused_optimizer_step_repacks():
    net = prepared_net()
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        before = net(x)
    optimizer = make_optimizer("Adam", "fused", net.parameters())
    net(x).square().mean().backward()
    torch.compile(optimizer.step, backend="eager")()
    assert_serves_the_stepped_weights(net, x, before)


def test_deepcopy_of_a_prepared_model_repacks_after_a_fused_step():
    """A copy's packs are its own (made after the copy), and a step on its parameters drops them too."""
    original = prepared_net()
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        original(x)
        net = copy.deepcopy(original)
        assert packs(net) == 0
        before = net(x)
    optimizer = make_optimizer("SGD", "fused", net.parameters())
    net(x).square().mean().backward()
    optimizer.step()
    assert_serves_the_stepped_weights(net, x, before)


def test_other_optimizers_keep_the_packs_and_one_hook_serves_all():
    net = prepared_net()
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        net(x)
    hooks = len(_global_optimizer_post_hooks)
    with torch.no_grad():
        optimize_for_inference(prepared_net())(x)  # a second prepared model: no second hook
    assert len(_global_optimizer_post_hooks) == hooks
    other = nn.Parameter(torch.randn(3))
    optimizer = make_optimizer("Adam", "fused", [other])
    other.sum().backward()
    optimizer.step()
    assert packs(net) == 2 and all(m._last_call is not None for m in net)  # untouched: not its parameters


def test_a_step_during_a_packing_call_never_leaves_a_stale_fast_path():
    """An optimizer step in another thread can drop the packs while a call is between packing and publishing its
    fast-path entry: that call must not publish it (a fused step leaves the weight's version as it was)."""
    torch.manual_seed(0)
    net = optimize_for_inference(torch.nn.Sequential(FusedConv2d(4, 8, 3, padding=1)).eval())
    conv = net[0]
    x = torch.randn(2, 4, 9, 9)
    opt = torch.optim.SGD(conv.parameters(), lr=0.5)
    conv(x).sum().backward()
    pack = PackedFusedConv2d._packed_weight
    stepped = []

    def racing(self, *args, **kwargs):
        packed = pack(self, *args, **kwargs)
        if not stepped:
            stepped.append(True)
            with torch.no_grad():  # the step of a fused optimizer: in place, no version bump
                conv.weight.data.sub_(0.5 * conv.weight.grad)
            _drop_stepped_packs(opt, (), {})
        return packed

    PackedFusedConv2d._packed_weight = racing
    try:
        with torch.no_grad():
            conv(x)
    finally:
        PackedFusedConv2d._packed_weight = pack
    with torch.no_grad():
        y = conv(x)
    expected = torch.relu(torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1))
    torch.testing.assert_close(y, expected)


def test_a_pruned_prepared_conv_takes_the_ordinary_op():
    """Pruning recomputes weight on every call: no pack (it would be rebuilt every time), and never a stale one."""
    torch.manual_seed(0)
    net = optimize_for_inference(torch.nn.Sequential(FusedConv2d(4, 8, 3, padding=1)).eval())
    conv = net[0]
    prune.l1_unstructured(conv, "weight", 0.5)
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        for scale in (1.0, 2.0):
            conv.weight_orig.mul_(scale)
            expected = torch.relu(
                torch.nn.functional.conv2d(x, conv.weight_orig * conv.weight_mask, conv.bias, padding=1)
            )
            torch.testing.assert_close(net(x), expected)
    assert conv._packs == {}
