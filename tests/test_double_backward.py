"""Double backward through the fused op: gradients taken with ``create_graph=True`` (gradient penalties such as R1
or WGAN-GP, Hessian-vector products) are differentiable again, through both autograd graphs of a call: the op's
one node (the dispatcher op, torch.compile, tracers, backends without a split) and the two nodes eager training
records on CPU. Without ``create_graph`` the backward ops run as before; with it the backwards compute the same
gradients from differentiable ATen ops (resnet_fused/contract.py)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torchvision
from helpers import (
    ALL_EPILOGUES,
    FULL,
    PREACT,
    Case,
    Epilogue,
    Target,
    assert_close,
    forward_op,
    make_inputs,
    tolerance,
)
from helpers import target_params as _target_params
from test_nn import randomize_norms_

import resnet_fused

F64 = torch.float64
CL = "channels_last"
# The split graph puts the frozen scale on the smaller of g and the weight: y (1, 4, 3, 3) is smaller than the
# weight (4, 2, 3, 3), so the epilogue node scales g; y (1, 3, 5, 5) is larger than the weight (3, 2, 2, 2), so the
# conv node's backward applies it. Stride, padding, groups and dilation between them.
SCALE_ON_G = Case(1, 4, 5, 5, 4, 3, 3, 2, 1, 1, 2)
SCALE_ON_WEIGHT = Case(1, 2, 5, 5, 3, 2, 2, 1, 1, 2)
UNREGISTERED = "autograd kernel was not registered"


def _graphs(t: Target) -> list[str]:
    """ "split": the public function, two nodes where the backend has a split backward (cpu), else the op's node;
    "op": the backend's dispatcher op called directly, always the op's one node."""
    return ["split", "op"] if t.backend == "cpu" else ["op"]


def target_params(variants):
    return _target_params(lambda t: [(*v, g) for v in variants(t) for g in _graphs(t)])


def call(target: Target, graph: str, inputs, tensors: dict | None = None) -> torch.Tensor:
    tensors = inputs.tensors if tensors is None else tensors
    if graph == "op":
        return forward_op(target.backend)(*inputs._replace(tensors=tensors).op_args())
    return resnet_fused.conv_bias_add_relu(**tensors, **inputs.kwargs, backend=target.backend)


def _first_node(y: torch.Tensor) -> str:
    return type(y.grad_fn).__name__


def check_graph(target: Target, graph: str, y: torch.Tensor) -> None:
    name = _first_node(y)
    if graph == "split" and target.backend == "cpu":
        assert name == "_SplitEpilogueBackward", name
    else:
        assert name.startswith("GeneratedBackwardFor_resnet_fused_conv_bias_add_relu"), name


def case_for(target: Target, layout: str, epilogue: Epilogue) -> Case:
    """Both scale placements for each layout, alternating with ReLU on and off (one under the interpreter)."""
    if target.slow:
        return SCALE_ON_G
    return (SCALE_ON_G, SCALE_ON_WEIGHT)[(ALL_EPILOGUES.index(epilogue) + (layout == CL)) % 2]


def gradgradcheck(
    target: Target, graph: str, inputs, wanted: tuple[str, ...] | None = None, *, fast_mode: bool = True
) -> None:
    """gradgradcheck of the call in float64 over the leaves in ``wanted`` (default: all) and a random grad_out.
    ``fast_mode`` checks the second-order Jacobian along random directions (any wrong entry shows, ~40 times faster
    than the full Jacobian)."""
    leaves = {k: v for k, v in inputs.leaves().items() if wanted is None or k in wanted}
    for k, v in inputs.leaves().items():
        v.requires_grad_(k in leaves)

    def fn(*tensors):
        y = call(target, graph, inputs, dict(inputs.tensors, **dict(zip(leaves, tensors, strict=True))))
        check_graph(target, graph, y)
        return y

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=f".*{UNREGISTERED}")
        assert torch.autograd.gradgradcheck(
            fn, list(leaves.values()), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=fast_mode
        )


# ---- gradgradcheck, float64 ----


def epilogue_variants(t: Target) -> list:
    # Under the Triton interpreter every forward of the numerical Jacobian runs the kernels in Python: two variants
    # that reach every backward branch (mask, scale, residual, bias; both layouts).
    if t.slow:
        return [(CL, FULL), ("nchw", PREACT)]
    return [(layout, e) for layout in ("nchw", CL) for e in ALL_EPILOGUES]


@pytest.mark.parametrize("target,variant", target_params(epilogue_variants))
def test_gradgradcheck_every_epilogue(target, variant):
    layout, epilogue, graph = variant
    inputs = make_inputs(case_for(target, layout, epilogue), F64, layout, epilogue, device=target.device)
    gradgradcheck(target, graph, inputs)


def full_variants(t: Target) -> list:
    return [] if t.slow else [(CL, FULL), ("nchw", PREACT)]


@pytest.mark.parametrize("target,variant", target_params(full_variants))
def test_gradgradcheck_full_jacobian(target, variant):
    layout, epilogue, graph = variant
    inputs = make_inputs(SCALE_ON_G, F64, layout, epilogue, device=target.device)
    gradgradcheck(target, graph, inputs, fast_mode=False)


def subset_variants(t: Target) -> list:
    # Which nodes run and what each returns: no conv node (bias, residual only), dgrad or wgrad alone, the residual
    # sharing g with the conv; both places the scale can go.
    subsets = [("x",), ("weight",), ("bias", "residual"), ("x", "residual")]
    if t.slow:
        return [(("weight",), "scale_on_g")]
    return [(s, c) for s in subsets for c in ("scale_on_g", "scale_on_weight")]


@pytest.mark.parametrize("target,variant", target_params(subset_variants))
def test_gradgradcheck_subsets_of_inputs(target, variant):
    wanted, case, graph = variant
    case = SCALE_ON_G if case == "scale_on_g" else SCALE_ON_WEIGHT
    for relu in (True, False):
        inputs = make_inputs(case, F64, CL, Epilogue(True, True, True, relu), device=target.device)
        gradgradcheck(target, graph, inputs, wanted)


# ---- the differentiable backward gives the fast path's gradients ----


def same_grad_variants(t: Target) -> list:
    if t.slow:
        return [(CL, FULL)]
    return [(layout, e) for layout in ("nchw", CL) for e in ALL_EPILOGUES]


@pytest.mark.parametrize("target,variant", target_params(same_grad_variants))
def test_create_graph_gives_the_fast_paths_gradients(target, variant):
    """Same values, shapes and dtypes with and without create_graph, NaN and Inf included: the mask follows the
    saved output as the kernels do (``out <= 0`` blocks, a NaN output passes its gradient)."""
    layout, epilogue, graph = variant
    inputs = make_inputs(case_for(target, layout, epilogue), F64, layout, epilogue, device=target.device)
    with torch.no_grad():
        inputs.tensors["x"][0, 0, 1, 1] = float("nan")
        inputs.tensors["x"][0, 1, 3, 4] = float("inf")
        if epilogue.residual:
            inputs.tensors["residual"][0, 1, 0, 0] = float("-inf")
    leaves = list(inputs.leaves().values())
    fast = torch.autograd.grad(call(target, graph, inputs), leaves, inputs.grad_out)
    grad_out = inputs.grad_out.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=f".*{UNREGISTERED}")
        slow = torch.autograd.grad(call(target, graph, inputs), leaves, grad_out, create_graph=True)
    for name, a, b in zip(inputs.leaves(), slow, fast, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype and a.device == b.device, name
        assert a.requires_grad, f"grad_{name} is not differentiable"
        assert_close(a, b, F64, f"{target} {graph} grad_{name}")


@pytest.mark.parametrize("target,variant", target_params(same_grad_variants))
def test_a_dual_incoming_gradient_keeps_its_tangent(target, variant):
    """Forward-over-reverse (a Hessian-vector product as the jvp of a vjp): autograd.grad with a dual grad_outputs
    inside fwAD.dual_level(). Each gradient's primal and tangent are the unfused ops' in float64; the fused backward
    op, which has no jvp rule, dropped the tangents without a word."""
    layout, epilogue, graph = variant
    inputs = make_inputs(case_for(target, layout, epilogue), F64, layout, epilogue, device=target.device)
    leaves = inputs.leaves()
    tangent = torch.randn_like(inputs.grad_out)
    got, want = {}, {}
    for out, run in ((got, lambda: call(target, graph, inputs)), (want, lambda: call(Target("reference", target.device), "split", inputs))):  # fmt: skip
        y = run()
        with fwAD.dual_level():
            grads = torch.autograd.grad(y, list(leaves.values()), fwAD.make_dual(inputs.grad_out, tangent))
            out.update({name: fwAD.unpack_dual(g) for name, g in zip(leaves, grads, strict=True)})
    for name in leaves:
        assert want[name].tangent is not None and got[name].tangent is not None, f"grad_{name} lost its tangent"
        assert_close(got[name].primal, want[name].primal, F64, f"{target} {graph} grad_{name}")
        assert_close(got[name].tangent, want[name].tangent, F64, f"{target} {graph} tangent of grad_{name}")


def test_plain_backward_runs_the_backward_op():
    """Without create_graph the fused backward op runs, in both graphs; with it, none does."""
    inputs = make_inputs(SCALE_ON_G, torch.float32, CL, FULL)
    for graph in ("split", "op"):
        for create_graph in (False, True):
            y = call(Target("cpu", "cpu"), graph, inputs)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                torch.autograd.grad(y, list(inputs.leaves().values()), inputs.grad_out, create_graph=create_graph)
            calls = [e.name for e in prof.events()].count("resnet_fused::conv_bias_add_relu_backward")
            assert (calls > 0) != create_graph, (graph, create_graph, calls)


# ---- a gradient penalty through a converted torchvision resnet18 ----


def assert_grads_close(got: dict, want: dict) -> None:
    """Each parameter's gradient within float64 tolerance of a long reduction, relative to its largest entry (a
    cheap check first: assert_close's elementwise one costs seconds on resnet18's 11M parameters)."""
    tol = tolerance(F64, 64 * 9 * 20)
    assert [n for n, g in got.items() if g is None] == [n for n, w in want.items() if w is None and n in got]
    for name, g in got.items():
        w = want[name]
        if g is None:
            continue
        if not (g - w).abs().max() <= tol * max(w.abs().max().item(), 1.0):
            assert_close(g, w, F64, f"grad of {name}", reductions=64 * 9 * 20)


def r1_grads(model: torch.nn.Module, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """An R1-style penalty ``|d <v, model(x)> / dx|^2`` and its gradients (None where the penalty does not depend
    on a parameter)."""
    x = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad((model(x) * v).sum(), x, create_graph=True)
    penalty = gx.square().sum()
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(penalty, list(params.values()), allow_unused=True)
    return penalty.detach(), dict(zip(params, grads, strict=True))


@pytest.fixture(scope="module")
def resnet18() -> torch.nn.Module:
    """torchvision's resnet18 in float64 with non-trivial norms; tests convert or deep-copy it, never change it."""
    torch.manual_seed(0)
    return randomize_norms_(torchvision.models.resnet18(weights=None, num_classes=4)).double()


@pytest.mark.filterwarnings("ignore:convert. norms left unfused")
@pytest.mark.parametrize("mode", ["eval", "freeze_bn"])
def test_r1_penalty_through_converted_resnet18_matches_torchvision(mode, resnet18):
    """eval: converted in train mode (the BatchNorm modules, and their parameters, kept), then both put in eval
    mode: each norm folds on the fly, its gamma into the weight. freeze_bn: the norms become constant scale/shift
    epilogues, compared with torchvision's BatchNorm in eval mode (their parameters then get no gradient here)."""
    tv = copy.deepcopy(resnet18).train()
    fused, _ = resnet_fused.convert(tv, freeze_bn=mode == "freeze_bn", backend="cpu")
    tv.eval()
    if mode == "eval":
        fused.eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 32, 32, dtype=F64, generator=gen)
    v = torch.randn(1, 4, dtype=F64, generator=gen)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=f".*{UNREGISTERED}")
        got_penalty, got = r1_grads(fused, x, v)
    want_penalty, want = r1_grads(tv, x, v)
    assert_close(got_penalty, want_penalty, F64, "penalty")
    if mode == "eval":
        assert got.keys() == want.keys()
    else:
        assert {"conv1.weight", "layer4.1.conv2.weight", "fc.weight"} <= got.keys() <= want.keys()
    assert_grads_close(got, want)
    assert any(g.abs().max() > 0 for n, g in got.items() if "conv" in n)


def test_r1_penalty_through_eval_converted_resnet18_matches_the_reference_backend(resnet18):
    """A model converted in eval mode has its norms folded into the conv weights, so its parameters are not
    torchvision's: compare with the same conversion on the unfused reference backend."""
    tv = copy.deepcopy(resnet18).eval()
    fused, _ = resnet_fused.convert(tv, backend="cpu")
    ref, _ = resnet_fused.convert(tv, backend="reference")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 32, 32, dtype=F64, generator=gen)
    v = torch.randn(1, 4, dtype=F64, generator=gen)
    got_penalty, got = r1_grads(fused, x, v)
    want_penalty, want = r1_grads(ref, x, v)
    assert_close(got_penalty, want_penalty, F64, "penalty")
    assert_close(got_penalty, r1_grads(tv, x, v)[0], F64, "penalty vs torchvision")
    assert_grads_close(got, want)
