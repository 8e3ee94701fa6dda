"""Triton backend of resnet_fused: implicit-GEMM conv kernels with the epilogue and its backward fused.

Importing this module registers ``resnet_fused::conv_bias_add_relu_triton`` (and its backward) when
Triton can run here; it imports cleanly either way, and ``is_available()`` says why not.
"""

import importlib.util
import os


def is_available() -> tuple[bool, str]:
    """(True, "") when the Triton kernels can run: triton imports and a GPU or the interpreter is there."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    try:
        import triton  # noqa: F401
    except Exception as e:  # a broken install must not break `import resnet_fused`
        return False, f"triton failed to import: {e}"
    import torch

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return True, ""
    return False, "no CUDA device, and TRITON_INTERPRET=1 is not set"


_REGISTERED = False


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from resnet_fused.ops import register_op_family

    from . import op

    register_op_family(op.FORWARD, op.BACKWARD, fake=True)
    _REGISTERED = True


if is_available()[0]:
    _register()
