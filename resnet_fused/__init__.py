"""resnet_fused: a residual block's y = relu(conv2d(x, W) * scale + bias + residual) in one fused op."""

# Importing onnx_export and inductor registers the exporters' translations and Inductor's decomposition.
from resnet_fused import inductor, nn, onnx_export, reference
from resnet_fused.convert import ConversionReport, convert
from resnet_fused.inference import optimize_for_inference
from resnet_fused.ops import available_backends, conv_bias_add_relu
from resnet_fused.select import explain

__all__ = [
    "ConversionReport",
    "available_backends",
    "conv_bias_add_relu",
    "convert",
    "explain",
    "inductor",
    "nn",
    "onnx_export",
    "optimize_for_inference",
    "reference",
]
__version__ = "0.1.0"
