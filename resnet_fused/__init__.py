"""resnet_fused: a residual block's y = relu(conv2d(x, W) * scale + bias + residual) in one fused op."""

from resnet_fused import reference
from resnet_fused import triton as _triton_backend  # noqa: F401  (registers the Triton ops)
from resnet_fused.ops import available_backends, conv_bias_add_relu
from resnet_fused.select import explain

from resnet_fused import nn  # isort: skip  (nn and convert build on the op)
from resnet_fused.convert import ConversionReport, convert  # isort: skip

__all__ = ["ConversionReport", "available_backends", "conv_bias_add_relu", "convert", "explain", "nn", "reference"]
__version__ = "0.1.0"
