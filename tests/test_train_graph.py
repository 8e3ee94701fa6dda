"""Eager training on CPU records a fused call as two autograd nodes, the epilogue's then the conv's, from one fused
forward. Checked here: which graph each route records, gradients of both graphs against float64 for every epilogue
and every subset of inputs that require grad (both places the scale can go), and that the incoming gradient is
freed before the conv backward runs, which keeps a train step's allocator peak at the unfused graph's."""

from __future__ import annotations

import gc
import itertools
import weakref

import pytest
import torch
import torchvision
from helpers import (
    ALL_EPILOGUES,
    FULL,
    Case,
    Epilogue,
    assert_close,
    backward_op,
    check_call,
    forward_op,
    make_inputs,
    variant_id,
)
from torch.utils._python_dispatch import TorchDispatchMode

import resnet_fused
from resnet_fused import reference

# The scale goes on the smaller of g and the weight: y (1, 16, 3, 3) has fewer elements than the 3x3 weight, so the
# epilogue node scales g; y (2, 8, 6, 6) has more than the 1x1 weight, so the conv node scales the weight.
SCALE_ON_G = Case(1, 16, 3, 3, 16, 3, 3, 1, 1)
SCALE_ON_WEIGHT = Case(2, 4, 6, 6, 8, 1, 1)
# Each gradient alone, and the combinations that change a node's work: the residual sharing g with the conv (no
# in-place scale), only epilogue gradients (no conv node), all four.
GRAD_SETS = [("x",), ("weight",), ("bias",), ("residual",), ("x", "residual"), ("bias", "residual"),
             ("x", "weight", "bias", "residual")]  # fmt: skip


def _node_names(y: torch.Tensor) -> list[str]:
    names, stack = [], [y.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or type(node).__name__ == "AccumulateGrad":
            continue
        names.append(type(node).__name__)
        stack.extend(fn for fn, _ in node.next_functions)
    return names


def _inputs(case: Case, dtype, layout: str, epilogue: Epilogue, wanted: tuple[str, ...]):
    inputs = make_inputs(case, dtype, layout, epilogue, requires_grad=False)
    for name in wanted:
        t = inputs.tensors[name]
        if t is not None:
            t.requires_grad_()
    return inputs


@pytest.mark.parametrize("case", [SCALE_ON_G, SCALE_ON_WEIGHT], ids=["scale_on_g", "scale_on_weight"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=variant_id)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("epilogue", ALL_EPILOGUES, ids=variant_id)
@pytest.mark.parametrize("graph", ["two_nodes", "one_node"])
def test_gradients_of_each_graph_match_float64(graph, epilogue, layout, dtype, case):
    op = forward_op("cpu")
    for wanted in GRAD_SETS:
        inputs = _inputs(case, dtype, layout, epilogue, wanted)
        if not any(t.requires_grad for t in inputs.leaves().values()):
            continue
        if graph == "two_nodes":
            y = resnet_fused.conv_bias_add_relu(**inputs.tensors, **inputs.kwargs, backend="cpu")
            names = _node_names(y)
            assert names[0] == "_SplitEpilogueBackward", names
            assert ("_SplitConvBackward" in names) == any(inputs.tensors[k].requires_grad for k in ("x", "weight"))
        else:
            y = op(*inputs.op_args())
            assert _node_names(y)[0].startswith("GeneratedBackwardFor_resnet_fused_conv_bias_add_relu"), _node_names(y)
        check_call(y, inputs, dtype, f"{graph} grads of {wanted}")


def test_graphs_give_the_same_gradients_bit_for_bit():
    """The two nodes run the one-node backward's own passes, split by output_mask."""
    op = forward_op("cpu")
    for case, epilogue in itertools.product([SCALE_ON_G, SCALE_ON_WEIGHT], ALL_EPILOGUES):
        inputs = _inputs(case, torch.float32, "channels_last", epilogue, ("x", "weight", "bias", "residual"))
        leaves = list(inputs.leaves().values())
        split = torch.autograd.grad(
            resnet_fused.conv_bias_add_relu(**inputs.tensors, **inputs.kwargs), leaves, inputs.grad_out
        )
        one = torch.autograd.grad(op(*inputs.op_args()), leaves, inputs.grad_out)
        for a, b in zip(split, one, strict=True):
            assert torch.equal(a, b), (case, epilogue)


def test_which_route_records_which_graph():
    inputs = make_inputs(SCALE_ON_WEIGHT, torch.float32, "nchw")
    call = lambda: resnet_fused.conv_bias_add_relu(**inputs.tensors, **inputs.kwargs)  # noqa: E731
    assert _node_names(call())[:2] == ["_SplitEpilogueBackward", "_SplitConvBackward"]
    # The reference backend is the unfused ops; the table's other rows keep the op's single node.
    y = resnet_fused.conv_bias_add_relu(**inputs.tensors, **inputs.kwargs, backend="reference")
    assert "_SplitEpilogueBackward" not in _node_names(y)
    # torch.compile traces the op and its registered autograd.
    compiled = torch.compile(lambda: resnet_fused.conv_bias_add_relu(**inputs.tensors, **inputs.kwargs), fullgraph=True)
    y = compiled()
    assert "_SplitEpilogueBackward" not in _node_names(y)
    check_call(y, inputs, torch.float32, "compiled")
    with torch.no_grad():
        assert call().grad_fn is None
    # Tracers record the op itself (the ONNX exporters translate it): the jit tracer and make_fx.
    x, weight = inputs.tensors["x"], inputs.tensors["weight"]
    traced = torch.jit.trace(lambda t, w: resnet_fused.conv_bias_add_relu(t, w), (x, weight), check_trace=False)
    assert "resnet_fused::conv_bias_add_relu" in str(traced.graph)
    from torch.fx.experimental.proxy_tensor import make_fx

    graph = make_fx(lambda t, w: resnet_fused.conv_bias_add_relu(t, w))(x, weight).graph
    assert any("resnet_fused.conv_bias_add_relu" in str(n.target) for n in graph.nodes), graph


def test_incoming_gradient_is_freed_before_the_conv_backward():
    """The one-node op keeps grad_out alive through its conv backward; the split frees it when the epilogue's node
    returns. Seen from the conv backward's unpacking of x (a saved-tensor hook), with grad_out made by the graph
    downstream so that nothing else holds it."""
    inputs = make_inputs(SCALE_ON_G, torch.float32, "channels_last", Epilogue(True, True, False, True))
    x, weight, bias = (inputs.tensors[k] for k in ("x", "weight", "bias"))
    kw = {k: v for k, v in inputs.kwargs.items() if k != "relu"}
    op = forward_op("cpu")

    def alive_at_x_unpacks(make) -> list[bool]:
        grad_ref: list[weakref.ref] = []
        seen: list[bool] = []

        def unpack(t):
            if t.shape == x.shape and t.data_ptr() == x.data_ptr():
                seen.append(grad_ref[0]() is not None)
            return t

        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, unpack):
            y = make()
        y.register_hook(lambda g: grad_ref.append(weakref.ref(g)))
        loss = (y * 2).sum()
        del y
        gc.collect()
        loss.backward()
        return seen

    split = alive_at_x_unpacks(lambda: resnet_fused.conv_bias_add_relu(x, weight, bias, **kw))
    one = alive_at_x_unpacks(lambda: op(x, weight, bias, None, kw["scale"], [1, 1], [1, 1], [1, 1], 1, True))
    assert one == [True], one  # the single node's only unpack: grad_out still held
    # x is unpacked once, by the conv node, after the epilogue node has returned and freed grad_out.
    assert split == [False], split


def call(graph: str, inputs) -> torch.Tensor:
    """The fused call on the cpu backend, recorded as two nodes (the public function) or one (the op)."""
    if graph == "two_nodes":
        return resnet_fused.conv_bias_add_relu(**inputs.tensors, **inputs.kwargs, backend="cpu")
    return forward_op("cpu")(*inputs.op_args())


@pytest.mark.parametrize("graph", ["two_nodes", "one_node"])
def test_each_saved_tensor_is_unpacked_once(graph):
    """Non-reentrant checkpointing allows one unpack per saved tensor, and a decompressing or offloading hook pays for
    each: every node unpacks only what it saved itself."""
    inputs = _inputs(SCALE_ON_G, torch.float32, "channels_last", FULL, ("x", "weight", "bias", "residual"))
    packs: list[int] = []
    unpacks: list[int] = []

    def pack(t):
        packs.append(id(t))
        return len(packs) - 1

    def unpack(i):
        unpacks.append(i)
        return saved[i]

    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), pack(t))[1], unpack):
        y = call(graph, inputs)
    y.sum().backward()
    assert sorted(unpacks) == list(range(len(packs))), (packs, unpacks)


@pytest.mark.parametrize("channels_last", [False, True])
def test_non_reentrant_checkpoint_of_converted_blocks(channels_last):
    """torch.utils.checkpoint (use_reentrant=False) around fused blocks: the gradients of the unfused model."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    ref = torchvision.models.resnet18(weights=None, num_classes=4).double()
    fused, _ = resnet_fused.convert(ref, freeze_bn=True)
    ref.eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64).contiguous(memory_format=fmt)

    def run(model):
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
            h = checkpoint(layer, h, use_reentrant=False)
        return model.fc(torch.flatten(model.avgpool(h), 1))

    got = torch.autograd.grad(run(fused).square().sum(), [p for p in fused.parameters() if p.requires_grad])
    names = {n for n, p in fused.named_parameters() if p.requires_grad}
    want = torch.autograd.grad(run(ref).square().sum(), [p for n, p in ref.named_parameters() if n in names])
    for n, g, w in zip(sorted(names, key=list(dict(fused.named_parameters())).index), got, want, strict=True):
        assert_close(g, w, torch.float64, f"grad {n}", reductions=4608)


def test_compiled_autograd_runs_the_split_graph():
    """Compiled autograd frees each node's saved tensors as it goes: no node may read another's."""
    from torch._dynamo import compiled_autograd

    inputs = _inputs(SCALE_ON_G, torch.float64, "channels_last", FULL, ("x", "weight", "bias", "residual"))
    leaves = {k: t for k, t in inputs.leaves().items() if t.requires_grad}
    y = call("two_nodes", inputs)
    assert _node_names(y)[:2] == ["_SplitEpilogueBackward", "_SplitConvBackward"], _node_names(y)
    want = torch.autograd.grad(y.sin().sum(), list(leaves.values()))
    torch._dynamo.reset()
    with compiled_autograd._enable(torch.compile(backend="aot_eager")):
        call("two_nodes", inputs).sin().sum().backward()
    torch._dynamo.reset()
    for (name, t), w in zip(leaves.items(), want, strict=True):
        assert_close(t.grad, w, torch.float64, f"grad {name}")


@pytest.mark.parametrize("case", [SCALE_ON_G, SCALE_ON_WEIGHT], ids=["scale_on_g", "scale_on_weight"])
def test_saved_tensors_are_the_one_node_ones(case):
    """x, weight, the output and the scale, each saved once (a copying saved-tensor hook holds each once), and under
    autograd's version checks: a scale changed in place after the forward is an error, never a wrong gradient."""
    op = forward_op("cpu")
    for graph in ("two_nodes", "one_node"):
        inputs = _inputs(case, torch.float32, "channels_last", FULL, ("x", "weight", "bias"))
        packed: list[torch.Tensor] = []

        def pack(t, packed=packed):
            packed.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if graph == "two_nodes":
                y = resnet_fused.conv_bias_add_relu(**inputs.tensors, **inputs.kwargs)
            else:
                y = op(*inputs.op_args())
        x, weight, scale = inputs.tensors["x"], inputs.tensors["weight"], inputs.kwargs["scale"]
        want = sorted(t.data_ptr() for t in (x, weight, y, scale))
        assert sorted(t.data_ptr() for t in packed) == want, graph
        # Without hooks (with them, autograd leaves the version checks to the hooks).
        y = (
            resnet_fused.conv_bias_add_relu(**inputs.tensors, **inputs.kwargs)
            if graph == "two_nodes"
            else op(*inputs.op_args())
        )
        with torch.no_grad():
            scale.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward(inputs.grad_out)


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("trained", [("residual",), ("bias",), ("bias", "residual")])
@pytest.mark.parametrize("graph", ["two_nodes", "one_node"])
def test_without_conv_gradients_x_and_weight_are_not_saved(graph, trained, relu):
    """As ATen's conv, x and weight are saved only for their own gradients: where only the bias or the residual
    trains (the input batch's buffer refilled in place before the backward, say), both graphs give the gradients,
    and hold neither tensor."""
    epilogue = Epilogue(True, True, True, relu)
    inputs = _inputs(SCALE_ON_WEIGHT, torch.float32, "channels_last", epilogue, trained)
    t = inputs.tensors
    ref = {k: v.detach().double().requires_grad_(k in trained) for k, v in t.items()}
    want = dict(zip(trained, torch.autograd.grad(
        reference.conv_bias_add_relu(**ref, **{**inputs.kwargs, "scale": inputs.kwargs["scale"].double()}),
        [ref[k] for k in trained], inputs.grad_out.double(),
    ), strict=True))  # fmt: skip
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: (saved.append(s.data_ptr()), s)[1], lambda s: s):
        y = call(graph, inputs)
    assert not {t["x"].data_ptr(), t["weight"].data_ptr()} & set(saved)
    y = call(graph, inputs)
    with torch.no_grad():
        t["x"].mul_(2)
        t["weight"].mul_(2)
    got = torch.autograd.grad(y, [t[k] for k in trained], inputs.grad_out)
    for name, g in zip(trained, got, strict=True):
        assert_close(g, want[name], torch.float32, f"{graph} grad_{name}", reductions=128)


@pytest.mark.parametrize("bias", [False, True])
def test_no_extra_copy_of_a_gradient_in_another_layout(bias):
    """relu=False: the epilogue node puts grad_out into x's layout once, for both nodes, and runs no pass at all
    without a bias gradient; the backward makes as many copies as the one-node backward."""
    epilogue = Epilogue(bias, False, False, False)
    op = forward_op("cpu")

    def copies(graph: str) -> tuple[int, int]:
        inputs = _inputs(SCALE_ON_WEIGHT, torch.float32, "channels_last", epilogue, ("x", "weight", "bias"))
        if graph == "two_nodes":
            y = resnet_fused.conv_bias_add_relu(**inputs.tensors, **inputs.kwargs)
        else:
            y = op(*inputs.op_args())
        grad = torch.randn(y.shape)  # NCHW, while y is channels_last
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            y.backward(grad)
        names = [e.name for e in prof.events()]
        return names.count("aten::clone"), names.count("resnet_fused::conv_bias_add_relu_backward")

    (split_clones, split_calls), (one_clones, _) = copies("two_nodes"), copies("one_node")
    assert split_clones == one_clones, (split_clones, one_clones)
    assert split_calls == (2 if bias else 1)


class _BackwardMasks(TorchDispatchMode):
    """Records the output_mask (x, weight) of every cpu backward-op call."""

    def __init__(self) -> None:
        super().__init__()
        self.masks: list[tuple[bool, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is backward_op("cpu"):
            self.masks.append(tuple(args[-1][:2]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("graph", ["two_nodes", "one_node"])
def test_only_the_gradients_the_engine_uses_are_computed(graph):
    """needs_input_grad is fixed at forward time; like ATen's conv backward, the fused backward asks the engine, so
    torch.autograd.grad(loss, x) with a weight that requires grad runs no wgrad (the input-gradient loop of
    adversarial training), and the other way round."""
    inputs = _inputs(SCALE_ON_WEIGHT, torch.float64, "channels_last", FULL, ("x", "weight", "bias", "residual"))
    x, weight = inputs.tensors["x"], inputs.tensors["weight"]
    reference = torch.autograd.grad(call(graph, inputs).square().sum(), [x, weight])

    def run(backward) -> list[tuple[bool, bool]]:
        y = call(graph, inputs)
        mode = _BackwardMasks()
        with mode:
            backward(y.square().sum())
        return [m for m in mode.masks if any(m)]

    got = {}
    assert run(lambda loss: got.update(x=torch.autograd.grad(loss, x)[0])) == [(True, False)]
    assert run(lambda loss: got.update(w=torch.autograd.grad(loss, weight)[0])) == [(False, True)]
    bias = inputs.tensors["bias"]
    bias_ref = torch.autograd.grad(call(graph, inputs).square().sum(), bias)[0]
    assert run(lambda loss: got.update(b=torch.autograd.grad(loss, bias)[0])) == []  # no conv backward at all
    assert_close(got["b"], bias_ref, torch.float64, "grad bias alone")
    assert_close(got["x"], reference[0], torch.float64, "grad x alone")
    assert_close(got["w"], reference[1], torch.float64, "grad weight alone")
    assert run(lambda loss: loss.backward(inputs=[x])) == [(True, False)]
    assert weight.grad is None
    assert_close(x.grad, reference[0], torch.float64, "x.grad")
    x.grad = None
    assert run(lambda loss: loss.backward()) == [(True, True)]
    assert_close(weight.grad, reference[1], torch.float64, "weight.grad")
