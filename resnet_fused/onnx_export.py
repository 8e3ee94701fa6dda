"""ONNX export of the fused op: both ``torch.onnx.export`` exporters write it as standard ONNX.

``conv_bias_add_relu`` (and ``conv_bias_add_relu_triton``) become ``Conv``, then ``Mul`` by ``scale``, ``Add`` of
``bias``, ``Add`` of ``residual`` and ``Relu`` when ``relu=True``, each only when present. Every node is in the
default ONNX domain, so any runtime loads the model and applies its own Conv fusions.

Importing this module registers the translations, so ``torch.onnx.export(model, args)`` needs no extra argument:

- ``dynamo=False`` (TorchScript exporter): ``torch.onnx.register_custom_op_symbolic``.
- ``dynamo=True``: a trace-only ONNX Script function in ``onnxscript``'s torch_lib default registry
  (``onnxscript.function_libs.torch_lib.registration.torch_op``), which the exporter reads on every export to build
  its op table. It is registered when ``onnxscript`` is imported (the dynamo exporter imports it): at once if it
  already is, else right after its import, so that ``import resnet_fused`` does not pay for onnxscript and onnx
  (about 0.3 s, and 20K more objects for the garbage collector to scan). Never when ``onnxscript`` is not
  installed, as the dynamo exporter needs it anyway.

Each exported graph is built for any batch size: the per-channel vectors are reshaped to ``(K, 1, 1)`` and broadcast.
"""

from collections.abc import Sequence
from typing import Optional

import torch
from torch.onnx import symbolic_helper

from resnet_fused._after_import import when_imported

# The op and its Triton twin share one schema, so one translation serves both. The Triton op exists only where
# Triton runs; registering by name is harmless when it does not.
OPS = ("resnet_fused::conv_bias_add_relu", "resnet_fused::conv_bias_add_relu_triton")
# The TorchScript exporter's oldest opset (Conv, Mul, Add, Relu and Reshape all hold from it on), and 9: the exporter
# looks a target below 9 up from that target towards 9, so a symbolic at 7 alone would not serve opset 8.
_SYMBOLIC_OPSETS = (7, 9)


# ---- dynamo=False: TorchScript symbolic ----


@symbolic_helper.parse_args("v", "v", "v", "v", "v", "is", "is", "is", "i", "b")
def _torchscript_symbolic(g, x, weight, bias, residual, scale, stride, padding, dilation, groups, relu):
    def present(v) -> bool:
        return not v.node().mustBeNone()

    y = g.op("Conv", x, weight, strides_i=stride, pads_i=[*padding, *padding], dilations_i=dilation, group_i=groups)
    # (K,) -> (K, 1, 1): broadcasts over (N, K, P, Q) for any batch size.
    per_channel = g.op("Constant", value_t=torch.tensor([-1, 1, 1], dtype=torch.int64))
    if present(scale):
        y = g.op("Mul", y, g.op("Reshape", scale, per_channel))
    if present(bias):
        y = g.op("Add", y, g.op("Reshape", bias, per_channel))
    if present(residual):
        y = g.op("Add", y, residual)
    return g.op("Relu", y) if relu else y


def _register_symbolic() -> None:
    for name in OPS:
        for opset in _SYMBOLIC_OPSETS:
            torch.onnx.register_custom_op_symbolic(name, _torchscript_symbolic, opset)


# ---- dynamo=True: ONNX Script translation ----


def _register_onnxscript() -> None:
    # ONNX Script parses the translation's source: its annotations resolve in module globals, and it takes
    # Optional[...] but not `X | None`. The exporter reads them to tell inputs (tensors) from attributes.
    global op, TensorType
    from onnxscript import opset18 as op
    from onnxscript.function_libs.torch_lib.registration import torch_op
    from onnxscript.onnx_types import TensorType

    @torch_op(OPS, trace_only=True)
    def _onnxscript_translation(
        x: TensorType,
        weight: TensorType,
        bias: Optional[TensorType] = None,  # noqa: UP045
        residual: Optional[TensorType] = None,  # noqa: UP045
        scale: Optional[TensorType] = None,  # noqa: UP045
        stride: Sequence[int] = (1, 1),
        padding: Sequence[int] = (0, 0),
        dilation: Sequence[int] = (1, 1),
        groups: int = 1,
        relu: bool = True,
    ) -> TensorType:
        """y (N, K, P, Q) = act(Conv(x (N, C, H, W), weight (K, C/groups, R, S)) * scale + bias + residual)."""
        y = op.Conv(x, weight, strides=list(stride), pads=[*padding, *padding], dilations=list(dilation), group=groups)
        per_channel = op.Constant(value_ints=[-1, 1, 1])
        if scale is not None:
            y = op.Mul(y, op.Reshape(scale, per_channel))
        if bias is not None:
            y = op.Add(y, op.Reshape(bias, per_channel))
        if residual is not None:
            y = op.Add(y, residual)
        return op.Relu(y) if relu else y


_register_symbolic()
# Hooked on the package, not a submodule: its body imports what the translation needs, so the registration runs once
# that body is complete.
when_imported(
    "onnxscript",
    _register_onnxscript,
    "registering the ONNX translation with onnxscript failed; torch.onnx.export(..., dynamo=True) of fused models "
    "will fail, dynamo=False still works",
)
