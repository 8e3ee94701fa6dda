"""resnet_fused: a residual block's y = relu(conv2d(x, W) * scale + bias + residual) in one fused op."""

from resnet_fused import reference
from resnet_fused.ops import available_backends, conv_bias_add_relu

__all__ = ["available_backends", "conv_bias_add_relu", "reference"]
__version__ = "0.1.0"
