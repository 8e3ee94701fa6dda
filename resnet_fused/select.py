"""Which backend ``backend="auto"`` runs, per call shape.

On CPU tensors the answer is always ``"cpu"``, the only fused CPU backend. On CUDA tensors the available
backends (``"cuda"``: cuDNN's fused forward or ATen conv + our epilogue; ``"triton"``) are each timed once with
CUDA events on the first call for a key (shapes, dtype, layouts, device and conv options), and the faster one is
remembered for the rest of the process. ``RESNET_FUSED_BACKEND`` forces one backend everywhere.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

ENV_VAR = "RESNET_FUSED_BACKEND"
CUDA_BACKENDS = ("cuda", "triton")  # in order of preference when timing cannot run
FORCEABLE = ("cpu", "cuda", "triton", "reference")
WARMUP_CALLS = 1
TIMED_CALLS = 3

IntPair = int | Sequence[int]


# ---- availability ----


def cuda_available() -> tuple[bool, str]:
    """(True, why) when the extension has CUDA kernels and a GPU is there; else (False, the reason)."""
    try:
        from resnet_fused import _C  # noqa: F401
    except ImportError as e:
        return False, f"the resnet_fused._C extension did not load: {e}"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("resnet_fused::conv_bias_add_relu", "CUDA"):
        return False, (
            "the extension was built without CUDA kernels (CPU-only build: no nvcc was found, "
            "or RESNET_FUSED_BUILD_CUDA=0); rebuild with a CUDA toolkit to get them"
        )
    if not torch.cuda.is_available():
        return False, "the extension has CUDA kernels, but torch.cuda.is_available() is False (no GPU or driver)"
    return True, "the extension has CUDA kernels and a CUDA device is available"


def triton_available() -> tuple[bool, str]:
    """(True, why) when the Triton op is registered and can run; else (False, the reason)."""
    try:
        from resnet_fused import triton as triton_backend
    except ImportError as e:
        return False, f"resnet_fused.triton did not import: {e}"
    ok, why = triton_backend.is_available()
    if not ok:
        return False, why
    if not hasattr(torch.ops.resnet_fused, "conv_bias_add_relu_triton"):
        return False, "the op resnet_fused::conv_bias_add_relu_triton is not registered"
    return True, "triton imports and its op is registered"


@torch.compiler.assume_constant_result
def _cuda_backend_status() -> dict[str, str]:
    """CUDA backend name -> "" when it can run, else why not. Replaced in tests.

    A process constant: torch.compile calls it once while tracing instead of tracing through it.
    """
    status = {}
    for name, probe in (("cuda", cuda_available), ("triton", triton_available)):
        ok, why = probe()
        status[name] = "" if ok else why
    return status


# ---- timing ----


def _is_cuda(x: Tensor) -> bool:
    return x.device.type == "cuda"


def _can_time() -> bool:
    """Timing runs kernels and synchronizes: impossible while tracing or capturing a CUDA graph."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _time_backend(name: str, fn: Callable[[], object], device: torch.device) -> float:
    """Mean milliseconds of ``fn()`` over TIMED_CALLS calls after WARMUP_CALLS, by CUDA events."""
    del name  # the real timer only needs the call; fake timers in tests key on the name
    with torch.cuda.device(device):
        for _ in range(WARMUP_CALLS):
            fn()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(TIMED_CALLS):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / TIMED_CALLS


def _backend_fn(name: str, args: tuple) -> Callable[[], object]:
    op_name = "conv_bias_add_relu_triton" if name == "triton" else "conv_bias_add_relu"

    def call() -> object:
        with torch.no_grad():
            return getattr(torch.ops.resnet_fused, op_name)(*args)

    return call


# ---- the choice ----


@dataclass(frozen=True)
class Choice:
    backend: str
    reason: str
    timings_ms: dict[str, float] = field(default_factory=dict)


_CACHE: dict[tuple, Choice] = {}
_LOCK = threading.RLock()


def clear_cache() -> None:
    """Forget every timed choice (they are re-timed on the next call)."""
    with _LOCK:
        _CACHE.clear()


def cached_choices() -> dict[tuple, Choice]:
    """A copy of the per-process cache: key -> Choice."""
    with _LOCK:
        return dict(_CACHE)


def _pair(v: IntPair) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


def _layout(t: Tensor | None) -> str:
    if t is None:
        return "none"
    fmt = torch._prims_common.suggest_memory_format(t)
    return "channels_last" if fmt == torch.channels_last else "contiguous"


def cache_key(x, weight, bias, residual, scale, stride, padding, dilation, groups, relu) -> tuple:
    """What the timed choice depends on: shapes, dtype, layouts, device and the conv options."""
    return (
        tuple(x.shape),
        tuple(weight.shape),
        x.dtype,
        _layout(x),
        _layout(weight),
        _layout(residual),
        str(x.device),
        bias is not None,
        scale is not None,
        _pair(stride),
        _pair(padding),
        _pair(dilation),
        int(groups),
        bool(relu),
    )


def _forced() -> str | None:
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in FORCEABLE:
        raise ValueError(f"{ENV_VAR}: expected one of {('auto', *FORCEABLE)}, got {value!r}")
    return value


def _format_timings(timings: dict[str, float], failures: dict[str, str]) -> str:
    parts = [f"{name} {ms:.3f} ms" for name, ms in sorted(timings.items(), key=lambda kv: kv[1])]
    parts += [f"{name} failed ({why})" for name, why in failures.items()]
    return ", ".join(parts)


def _decide(x, weight, bias, residual, scale, stride, padding, dilation, groups, relu) -> Choice:
    forced = _forced()
    on_cuda = _is_cuda(x)
    if forced is not None:
        if forced == "cpu" and on_cuda:
            raise ValueError(f"{ENV_VAR}=cpu forces the cpu backend, but x is on {x.device}")
        if forced == "cuda" and not on_cuda:
            raise ValueError(f"{ENV_VAR}=cuda forces the cuda backend, but x is on {x.device}")
        if forced in CUDA_BACKENDS:
            why = _cuda_backend_status()[forced]
            if why:
                raise RuntimeError(f"{ENV_VAR}={forced} forces the {forced} backend, which cannot run: {why}")
        return Choice(forced, f"forced by {ENV_VAR}={forced}")
    if not on_cuda:
        if x.device.type == "cpu":
            return Choice("cpu", "x is on cpu, and 'cpu' is the only fused CPU backend")
        raise ValueError(
            f"x: no fused backend runs on {x.device}; expected a cpu or cuda tensor (or backend='reference')"
        )

    status = _cuda_backend_status()
    candidates = [name for name in CUDA_BACKENDS if not status[name]]
    if not candidates:
        reasons = "; ".join(f"{name}: {why}" for name, why in status.items())
        raise RuntimeError(f"no CUDA backend can run here ({reasons}); use backend='reference'")
    if len(candidates) == 1:
        (only,) = candidates
        others = "; ".join(f"{name} unavailable: {why}" for name, why in status.items() if why)
        return Choice(only, f"the only available CUDA backend ({others})")

    key = cache_key(x, weight, bias, residual, scale, stride, padding, dilation, groups, relu)
    hit = _CACHE.get(key)  # a dict read needs no lock (and torch.compile can trace it)
    if hit is not None:
        return hit
    if not _can_time():
        return Choice(
            candidates[0],
            "this case is not timed yet and cannot be timed inside torch.compile tracing or CUDA graph "
            f"capture; {candidates[0]!r} is the default until a call outside them times it",
        )
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            return hit
        args = (x, weight, bias, residual, scale, _pair(stride), _pair(padding), _pair(dilation), groups, relu)
        timings: dict[str, float] = {}
        failures: dict[str, str] = {}
        for name in candidates:
            try:
                timings[name] = _time_backend(name, _backend_fn(name, args), x.device)
            except Exception as e:  # a backend that cannot run this case simply loses
                failures[name] = f"{type(e).__name__}: {e}".splitlines()[0]
        if not timings:
            raise RuntimeError(f"every CUDA backend failed on this case: {_format_timings({}, failures)}")
        winner = min(timings, key=timings.__getitem__)
        choice = Choice(
            winner,
            f"fastest when timed on the first call for this shape/dtype/layout/device/options "
            f"({_format_timings(timings, failures)}; timed once per process with CUDA events, "
            f"{ENV_VAR} forces a backend)",
            timings,
        )
        _CACHE[key] = choice
        return choice


def choose_backend(x, weight, bias, residual, scale, stride, padding, dilation, groups, relu) -> str:
    """The backend ``backend="auto"`` runs for this call: "cpu", "cuda", "triton" (or as forced by env)."""
    return _decide(x, weight, bias, residual, scale, stride, padding, dilation, groups, relu).backend


def explain(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    residual: Tensor | None = None,
    *,
    scale: Tensor | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    relu: bool = True,
    backend: str = "auto",
) -> str:
    """Which backend ``conv_bias_add_relu`` with these arguments would run, and why, as one line.

    With ``backend="auto"`` on CUDA this does what the call would do: it times the backends if the case was
    not timed yet, so the answer is the one the call will use.
    """
    from resnet_fused.ops import BACKENDS, check_inputs, resolve_backend

    stride, padding, dilation = check_inputs(x, weight, bias, residual, scale, stride, padding, dilation, groups)
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        # Raises what the call would raise if this backend cannot run these tensors.
        resolve_backend(backend, x, weight, bias, residual, scale, stride, padding, dilation, groups, relu)
        return f"{backend}: requested explicitly with backend={backend!r}"
    choice = _decide(x, weight, bias, residual, scale, stride, padding, dilation, groups, relu)
    return f"{choice.backend}: {choice.reason}"
