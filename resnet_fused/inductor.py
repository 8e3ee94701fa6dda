"""``torch.compile``: Inductor receives the fused op as the unfused aten ops it stands for.

Inductor cannot look into a custom op. It called the fused op as one opaque kernel, so it neither prepacked its weight
nor fused the epilogue its own way: a converted resnet50 compiled with freezing ran at the converted model's eager
speed, about 1.5x slower at batch 1 than the original compiled the same way. A decomposition in Inductor's table (as
torchao registers its ops) hands Inductor the conv, scale, bias, residual add and ReLU instead: it then compiles a
converted model as it compiles the original (on CPU with freezing: prepacked oneDNN convs with the bias, the add and
the ReLU as post-ops). The backward stays the package's op.

Every device takes it: a decomposition that declined (kept the op) for some calls would leave Inductor both a
decomposition and, for the kept op, its automatic fallback, which it refuses. Only Inductor's table holds it: eager
calls, ``aot_eager``, ``torch.export``, the jit tracer and the ONNX exporters keep the op (``aot_eager_decomp_partition``
uses Inductor's table, and decomposes it too). It is registered when ``torch._inductor.decomposition`` is first
imported (by the first ``torch.compile`` with Inductor), so ``import resnet_fused`` does not import it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from resnet_fused import reference
from resnet_fused._after_import import when_imported
from resnet_fused.backends import FORWARD  # the C++ op of the cpu and cuda rows; the Triton op stays whole
from resnet_fused.contract import memory_format


def decomposed(x, weight, bias, residual, scale, stride, padding, dilation, groups, relu) -> Tensor:
    """The op's forward as aten ops, in the op's argument order, for Inductor's decomposition table. Shapes as
    :func:`resnet_fused.conv_bias_add_relu`; y in x's memory format, as the op's."""
    y = reference.unchecked(x, weight, bias, residual, scale, stride, padding, dilation, groups, relu)
    return y.contiguous(memory_format=memory_format(x))


def _register() -> None:
    from torch._inductor import decomposition

    namespace, name = FORWARD.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default
    if op not in decomposition.decompositions:  # a reloaded module: the table refuses a second entry
        decomposition.register_decomposition([op])(decomposed)
    # Inductor reads the table through a cached copy, made by any compile before resnet_fused was imported.
    cached = getattr(decomposition, "fast_random_decomps", None)
    if hasattr(cached, "cache_clear"):
        cached.cache_clear()


when_imported(
    "torch._inductor.decomposition",
    _register,
    "registering the fused op's decomposition with Inductor failed; torch.compile of fused models runs the op whole, "
    "at the converted model's eager speed",
)
