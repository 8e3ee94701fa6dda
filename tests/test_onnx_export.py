"""ONNX export of fused models with both exporters, run in ONNX Runtime (CPU) and compared with PyTorch.

The fused op must come out as standard ONNX (Conv, Mul, Add, Relu) with no custom-domain node. Each
dynamo export costs seconds (the exporter rebuilds its op table every time), so the option grid is one
module with one branch per case, exported once per exporter.
"""

from __future__ import annotations

import copy
import io
import itertools
import warnings
from typing import NamedTuple

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from helpers import run_fresh
from torch import Tensor, nn

import resnet_fused
import resnet_fused.onnx_export  # registers the exporters' translations
from resnet_fused.nn import BasicBlock, Bottleneck, FusedConv2d, PreActBlock, SkipBlock, projection

EXPORTERS = ("dynamo", "torchscript")
RTOL = 1e-4  # fp32 ONNX Runtime against PyTorch's float64 run of the same model
EXPORT_BATCH, RUN_BATCH = 2, 3  # exported with one batch size, run with another: the batch dim is dynamic
FUSED_OPS = ("conv_bias_add_relu", "conv_bias_add_relu_triton")  # in torch.ops.resnet_fused


# ---- export, run, compare ----


def _dynamic_names(n_inputs: int, n_outputs: int) -> tuple[list[str], list[str]]:
    return [f"in{i}" for i in range(n_inputs)], [f"out{i}" for i in range(n_outputs)]


def export(
    model: nn.Module, inputs: tuple[Tensor, ...], exporter: str, n_outputs: int = 1, packed: bool = False
) -> onnx.ModelProto:
    """``model`` exported with batch dim 0 of every input and output dynamic; no translation argument is passed.

    ``packed``: ``model.forward`` takes the inputs as one tuple argument.
    """
    input_names, output_names = _dynamic_names(len(inputs), n_outputs)
    args = (inputs,) if packed else inputs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        if exporter == "dynamo":
            batch = torch.export.Dim("batch")
            program = torch.onnx.export(
                model,
                args,
                dynamo=True,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=_pack(tuple({0: batch} for _ in inputs), packed),
                verbose=False,
            )
            return program.model_proto
        f = io.BytesIO()
        torch.onnx.export(
            model,
            args,
            f,
            dynamo=False,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes={name: {0: "batch"} for name in input_names + output_names},
        )
        return onnx.load_from_string(f.getvalue())


def _pack(items: tuple, packed: bool) -> tuple:
    return (items,) if packed else items


def run_ort(proto: onnx.ModelProto, inputs: tuple[Tensor, ...]) -> list[np.ndarray]:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert len(names) == len(inputs), f"ONNX inputs {names} for {len(inputs)} tensors"
    # ONNX tensors are dense NCHW: a channels_last tensor is handed over in its logical order.
    return session.run(None, {n: np.ascontiguousarray(t.detach().numpy()) for n, t in zip(names, inputs, strict=True)})


def float64_outputs(model: nn.Module, inputs: tuple[Tensor, ...], packed: bool = False) -> list[Tensor]:
    """The model's outputs in float64 (a float64 copy of the model on float64 inputs, layouts kept)."""
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        out = model64(*_pack(tuple(t.double() for t in inputs), packed))
    return list(out) if isinstance(out, (tuple, list)) else [out]


def assert_matches(actual: np.ndarray, expected: Tensor, what: str) -> None:
    """fp32 ``actual`` within RTOL of ``expected`` (float64), with an absolute floor at RTOL of the output's scale."""
    scale = max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(
        torch.from_numpy(actual).double(), expected, rtol=RTOL, atol=RTOL * scale, msg=lambda m: f"{what}: {m}"
    )


def custom_domain_nodes(proto: onnx.ModelProto) -> list[str]:
    """``domain::op_type`` of every node outside the default ONNX domain, in the graph and its functions."""
    nodes = list(proto.graph.node) + [n for f in proto.functions for n in f.node]
    return [f"{n.domain}::{n.op_type}" for n in nodes if n.domain not in ("", "ai.onnx")]


def op_counts(proto: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def fused_calls(model: nn.Module, inputs: tuple[Tensor, ...], packed: bool = False) -> int:
    """How many fused-op calls ``model`` makes on ``inputs`` (so a test can tell it exported the fused op)."""
    graph = torch.export.export(model, _pack(inputs, packed)).graph
    fused = {
        getattr(torch.ops.resnet_fused, name).default for name in FUSED_OPS if hasattr(torch.ops.resnet_fused, name)
    }
    return sum(1 for n in graph.nodes if n.op == "call_function" and n.target in fused)


# ---- the op over its options ----


class Case(NamedTuple):
    channels: int
    out_channels: int
    kernel: tuple[int, int]
    hw: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    scale: bool
    bias: bool
    residual: bool
    relu: bool
    channels_last: bool

    def __str__(self) -> str:
        flags = (
            "".join(c for c, on in zip("sbrR", (self.scale, self.bias, self.residual, self.relu), strict=True) if on)
            or "-"
        )
        layout = "cl" if self.channels_last else "nchw"
        return (
            f"{self.channels}to{self.out_channels}_k{self.kernel}_st{self.stride}_pad{self.padding}"
            f"_dil{self.dilation}_g{self.groups}_{flags}_{layout}".replace(" ", "")
        )


# (channels, out_channels, kernel, input hw, stride, padding, dilation, groups)
GEOMETRIES = [
    (4, 6, (1, 1), (5, 7), (1, 1), (0, 0), (1, 1), 1),
    (4, 8, (3, 3), (9, 8), (2, 2), (1, 1), (1, 1), 1),
    (4, 6, (3, 2), (10, 9), (1, 2), (2, 1), (2, 1), 2),
    (6, 6, (3, 3), (7, 7), (1, 1), (1, 1), (1, 1), 6),  # depthwise
]

# Every (scale, bias, residual, relu) combination once. Geometry and layout are spread so that each geometry meets
# each flag on and off and both layouts, and each flag meets both layouts (test_cases_cover_every_pairing).
CASES = [
    Case(*GEOMETRIES[(i + i // 4) % len(GEOMETRIES)], *flags, channels_last=flags[0] != flags[3])
    for i, flags in enumerate(itertools.product((False, True), repeat=4))
]
FLAGS = ("scale", "bias", "residual", "relu")


def test_cases_cover_every_pairing():
    geometries = {c[:8] for c in CASES}  # the fields before the flags
    assert len(geometries) == len(GEOMETRIES)
    names = (*FLAGS, "channels_last")
    pairs = {(c[:8], f, getattr(c, f)) for c in CASES for f in names}
    assert pairs == {(g, f, v) for g in geometries for f in names for v in (False, True)}
    for f in FLAGS:
        assert {(getattr(c, f), c.channels_last) for c in CASES} == set(itertools.product((False, True), repeat=2)), f


def out_hw(case: Case) -> tuple[int, int]:
    return tuple(
        (case.hw[d] + 2 * case.padding[d] - case.dilation[d] * (case.kernel[d] - 1) - 1) // case.stride[d] + 1
        for d in range(2)
    )


class OpGrid(nn.Module):
    """One branch per case: ``forward((x0, [r0,] x1, ...))`` returns each case's fused-op output."""

    def __init__(self, cases: list[Case], op_name: str = "conv_bias_add_relu") -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.cases = cases
        self.op = getattr(torch.ops.resnet_fused, op_name).default
        for i, c in enumerate(cases):
            k = c.out_channels
            self.register_parameter(
                f"w{i}", nn.Parameter(torch.randn(k, c.channels // c.groups, *c.kernel, generator=gen) * 0.5)
            )
            self.register_parameter(f"b{i}", nn.Parameter(torch.randn(k, generator=gen)) if c.bias else None)
            self.register_buffer(f"s{i}", torch.rand(k, generator=gen) + 0.5 if c.scale else None)

    def forward(self, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        it = iter(inputs)
        outs = []
        for i, c in enumerate(self.cases):
            x = next(it)
            residual = next(it) if c.residual else None
            w, b, s = getattr(self, f"w{i}"), getattr(self, f"b{i}"), getattr(self, f"s{i}")
            outs.append(self.op(x, w, b, residual, s, c.stride, c.padding, c.dilation, c.groups, c.relu))
        return tuple(outs)


def grid_inputs(cases: list[Case], batch: int, seed: int) -> tuple[Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    fmt = {True: torch.channels_last, False: torch.contiguous_format}
    tensors = []
    for c in cases:
        x = torch.randn(batch, c.channels, *c.hw, generator=gen)
        tensors.append(x.contiguous(memory_format=fmt[c.channels_last]))
        if c.residual:
            r = torch.randn(batch, c.out_channels, *out_hw(c), generator=gen)
            tensors.append(r.contiguous(memory_format=fmt[c.channels_last]))
    return tuple(tensors)


@pytest.fixture(scope="module", params=EXPORTERS)
def grid_export(request) -> tuple[str, OpGrid, onnx.ModelProto, tuple[Tensor, ...], list[np.ndarray], list[Tensor]]:
    """The option grid exported once per exporter, then run at another batch size in ORT and in float64."""
    model = OpGrid(CASES).eval()
    proto = export(model, grid_inputs(CASES, EXPORT_BATCH, seed=1), request.param, len(CASES), packed=True)
    inputs = grid_inputs(CASES, RUN_BATCH, seed=2)
    return request.param, model, proto, inputs, run_ort(proto, inputs), float64_outputs(model, inputs, packed=True)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[str(c) for c in CASES])
def test_op_options_match_pytorch(grid_export, index):
    exporter, _model, _proto, _inputs, actual, expected = grid_export
    assert actual[index].shape == (RUN_BATCH, CASES[index].out_channels, *out_hw(CASES[index]))
    assert_matches(actual[index], expected[index], f"{exporter} {CASES[index]}")


def test_op_grid_is_standard_onnx(grid_export):
    """Each case is one Conv, a Mul per scale, an Add per bias and residual, a Relu per relu=True: nothing else."""
    exporter, model, proto, inputs, _actual, _expected = grid_export
    assert fused_calls(model, inputs, packed=True) == len(CASES)  # the grid really calls the fused op
    assert custom_domain_nodes(proto) == []
    counts = op_counts(proto)
    expected = {
        "Conv": len(CASES),
        "Mul": sum(c.scale for c in CASES),
        "Add": sum(c.bias + c.residual for c in CASES),
        "Relu": sum(c.relu for c in CASES),
    }
    assert {op: counts.get(op, 0) for op in expected} == expected, f"{exporter}: {counts}"


@pytest.mark.skipif(
    "triton" not in resnet_fused.available_backends(),
    reason="the Triton backend cannot run here (no GPU, and TRITON_INTERPRET=1 is not set)",
)
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_triton_op_exports(exporter):
    # Every epilogue option with grouped dilation in NCHW, and a depthwise channels_last case without ReLU; small
    # inputs, as the interpreter is slow on the CPU.
    all_on = next(c for c in CASES if all(getattr(c, f) for f in FLAGS))
    depthwise = next(c for c in CASES if c.groups == c.channels and c.channels_last and not c.relu)
    cases = [all_on._replace(hw=(6, 5)), depthwise._replace(hw=(4, 5))]
    model = OpGrid(cases, op_name="conv_bias_add_relu_triton").eval()
    proto = export(model, grid_inputs(cases, EXPORT_BATCH, seed=1), exporter, len(cases), packed=True)
    assert custom_domain_nodes(proto) == []
    inputs = grid_inputs(cases, RUN_BATCH, seed=2)
    expected_all = float64_outputs(model, inputs, packed=True)
    for case, actual, expected in zip(cases, run_ort(proto, inputs), expected_all, strict=True):
        assert_matches(actual, expected, f"{exporter} triton {case}")


# ---- whole models ----


def _randomize_batchnorms(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so folding them into scale and bias is tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model


def converted_resnet18() -> nn.Module:
    torch.manual_seed(0)
    model = _randomize_batchnorms(torchvision.models.resnet18(weights=None), seed=0).eval()
    fused, _report = resnet_fused.convert(model)
    return fused.eval()


class BNFreeResNet(nn.Module):
    """A small BN-free ResNet built from ``resnet_fused.nn``: stem, BasicBlocks, Bottlenecks, Skip/PreAct blocks."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        no_norm = nn.Identity
        self.stem = FusedConv2d(3, 16, 3, stride=2, padding=1, relu=True)
        self.body = nn.Sequential(
            BasicBlock(16, 16, norm_layer=no_norm),
            BasicBlock(16, 32, stride=2, downsample=projection(16, 32, 2, no_norm), norm_layer=no_norm),
            Bottleneck(32, 8, norm_layer=no_norm),
            Bottleneck(32, 16, stride=2, downsample=projection(32, 64, 2, no_norm), groups=2, norm_layer=no_norm),
            SkipBlock(64, num_layers=3),
            PreActBlock(64),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(self.stem(x)))


def bn_free_resnet() -> nn.Module:
    torch.manual_seed(0)
    model = BNFreeResNet()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FusedConv2d) and m.bias is not None:
                m.bias.normal_(0, 0.1)  # zero-initialised biases would leave the Add untested
    return model.eval()


MODELS = {"converted_resnet18": (converted_resnet18, (3, 64, 64)), "bn_free_resnet": (bn_free_resnet, (3, 33, 31))}


@pytest.fixture(scope="module", params=[(m, e) for m in MODELS for e in EXPORTERS], ids=lambda p: f"{p[0]}-{p[1]}")
def model_export(request) -> tuple[str, nn.Module, onnx.ModelProto, Tensor]:
    name, exporter = request.param
    make, chw = MODELS[name]
    model = make()
    gen = torch.Generator().manual_seed(3)
    proto = export(model, (torch.randn(EXPORT_BATCH, *chw, generator=gen),), exporter)
    return f"{name} {exporter}", model, proto, torch.randn(RUN_BATCH, *chw, generator=gen)


def test_model_matches_pytorch(model_export):
    what, model, proto, x = model_export
    (actual,) = run_ort(proto, (x,))
    (expected,) = float64_outputs(model, (x,))
    assert_matches(actual, expected, what)
    with torch.no_grad():  # and the fp32 model the user exported
        assert_matches(actual, model(x).double(), f"{what} vs fp32 PyTorch")


def test_model_has_no_custom_domain_node(model_export):
    what, model, proto, x = model_export
    calls = fused_calls(model, (x,))
    assert calls > 0, f"{what}: the model makes no fused-op call, so this test proves nothing"
    assert custom_domain_nodes(proto) == [], what
    assert op_counts(proto).get("Conv", 0) >= calls, what


def test_channels_last_model_exports():
    """A channels_last model (weights and input) exports to the same ONNX results."""
    model = bn_free_resnet().to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(EXPORT_BATCH, 3, 20, 18, generator=gen).contiguous(memory_format=torch.channels_last)
    proto = export(model, (x,), "torchscript")
    x_run = torch.randn(RUN_BATCH, 3, 20, 18, generator=gen).contiguous(memory_format=torch.channels_last)
    (actual,) = run_ort(proto, (x_run,))
    assert_matches(actual, float64_outputs(model, (x_run,))[0], "channels_last bn_free_resnet")


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_a_fused_conv_exported_with_a_relu_argument(exporter):
    """forward's ``relu`` override given as an export argument: the TorchScript exporter passes it as a tensor."""
    torch.manual_seed(0)
    conv = FusedConv2d(4, 6, 3, padding=1, relu=True).eval()
    x = torch.randn(2, 4, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice and its tracer's
        if exporter == "dynamo":
            proto = torch.onnx.export(conv, (x,), kwargs={"relu": False}, dynamo=True).model_proto
        else:
            f = io.BytesIO()
            torch.onnx.export(conv, (x,), f, kwargs={"relu": False}, dynamo=False)
            proto = onnx.load_from_string(f.getvalue())
    assert custom_domain_nodes(proto) == [] and "Relu" not in op_counts(proto)
    with torch.no_grad():
        expected = copy.deepcopy(conv).double()(x.double(), relu=False)
    assert (expected < 0).any()  # a ReLU would have changed the output
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (feed,) = session.get_inputs()  # the bool is no graph input: its value is in the graph
    assert_matches(session.run(None, {feed.name: x.numpy()})[0], expected, "relu=False")


@pytest.mark.parametrize("opset", [7, 8, 9, 13, 20])
def test_torchscript_exporter_opsets(opset):
    """The TorchScript translation holds from the exporter's oldest opset to its newest."""
    case = next(c for c in CASES if all(getattr(c, f) for f in FLAGS))
    model = OpGrid([case]).eval()
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (grid_inputs([case], 2, seed=5),), f, dynamo=False, opset_version=opset)
    proto = onnx.load_from_string(f.getvalue())
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [opset]
    assert custom_domain_nodes(proto) == []
    inputs = grid_inputs([case], 2, seed=5)
    assert_matches(run_ort(proto, inputs)[0], float64_outputs(model, inputs, packed=True)[0], f"opset {opset}")


# ---- registration ----


def test_import_resnet_fused_alone_registers_exporters():
    """In a fresh interpreter, ``import resnet_fused`` alone is enough for both exporters."""
    code = (
        "import io, warnings, torch, resnet_fused\n"
        "from onnxscript.function_libs.torch_lib.registration import default_registry\n"
        "assert 'resnet_fused::conv_bias_add_relu' in default_registry, 'dynamo exporter: not registered'\n"
        "m = resnet_fused.nn.FusedConv2d(3, 4, 3, relu=True).eval()\n"
        "warnings.simplefilter('ignore')\n"
        "torch.onnx.export(m, (torch.randn(1, 3, 8, 8),), io.BytesIO(), dynamo=False)\n"
    )
    run_fresh(code)


@pytest.mark.parametrize("order", ["resnet_fused first", "onnxscript first", "looked up first"])
def test_dynamo_translation_registers_when_onnxscript_is_imported(order):
    """``import resnet_fused`` does not import onnxscript (nor onnx); the dynamo exporter, which imports it, still
    finds the translation, whichever of the two was imported first, and after a lookup that imports nothing
    (``importlib.util.find_spec``, as a check for an installed package does)."""
    code = (
        "import importlib.util, io, sys, warnings, torch\n"
        + ("import onnxscript\n" if order == "onnxscript first" else "")
        + "import resnet_fused\n"
        + (
            ""
            if order == "onnxscript first"
            else "assert 'onnxscript' not in sys.modules and 'onnx' not in sys.modules\n"
        )
        + ("assert importlib.util.find_spec('onnxscript') is not None\n" if order == "looked up first" else "")
        + "m = resnet_fused.nn.FusedConv2d(3, 4, 3, relu=True).eval()\n"
        "warnings.simplefilter('ignore')\n"
        "program = torch.onnx.export(m, (torch.randn(1, 3, 8, 8),), dynamo=True)\n"
        "ops = {(n.domain, n.op_type) for n in program.model_proto.graph.node}\n"
        "assert ('', 'Conv') in ops and all(d in ('', 'ai.onnx') for d, _ in ops), ops\n"
    )
    run_fresh(code)


def test_a_failing_registration_warns_and_leaves_onnxscript_working():
    """Were onnxscript's registry to move, registering the translation would fail inside ``import onnxscript``: that
    must warn, not break the import (and every other model's dynamo export) for the process."""
    code = (
        "import io, sys, warnings, torch, resnet_fused\n"
        "from resnet_fused._after_import import AfterImport\n"
        "(hook,) = [f for f in sys.meta_path if isinstance(f, AfterImport) and f.name == 'onnxscript']\n"
        "def moved():\n"
        "    raise ImportError('registration moved')\n"
        "hook.callback = moved\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import onnxscript\n"
        "said = [str(w.message) for w in caught if 'resnet_fused' in str(w.message)]\n"
        "assert said and 'registration moved' in said[0] and 'dynamo=False still works' in said[0], said\n"
        "warnings.simplefilter('ignore')\n"
        "program = torch.onnx.export(torch.nn.Conv2d(3, 4, 3).eval(), (torch.randn(1, 3, 8, 8),), dynamo=True)\n"
        "assert any(n.op_type == 'Conv' for n in program.model_proto.graph.node)\n"
    )
    run_fresh(code)
