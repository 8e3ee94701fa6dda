"""Triton backend of resnet_fused: implicit-GEMM conv kernels with the epilogue and its backward fused.

``resnet_fused.triton.op`` registers ``resnet_fused::conv_bias_add_relu_triton`` and its backward when resnet_fused is
imported; their kernels (``launch``, ``kernels``, which import triton) load on the first call, where Triton can run
(a GPU, or ``TRITON_INTERPRET=1``).
"""

import importlib.util
import os

IMPORT_ERROR = ""  # why triton failed to import under TRITON_INTERPRET, if it did


def interprets() -> bool:
    """Whether Triton runs its interpreter, read as Triton reads TRITON_INTERPRET.

    This imports triton only when the variable is set (torch's compiler, which resnet_fused imports, may import it
    anyway). A failed import is kept in ``IMPORT_ERROR`` for the backend's probe to report.
    """
    global IMPORT_ERROR
    if not os.environ.get("TRITON_INTERPRET") or importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton
    except Exception as e:  # a broken triton install must not break the other backends; the probe reports it
        IMPORT_ERROR = f"{type(e).__name__}: {e}"
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is None:  # Triton < 3.4 took "1" only
        return os.environ["TRITON_INTERPRET"] == "1"
    return bool(knobs.runtime.interpret)  # 1, true, on, yes...
