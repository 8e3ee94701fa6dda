"""Which backend a call runs: ``resolve_backend`` for every ``backend=`` value, and the ``auto`` chooser.

``auto`` reads the backend table (:mod:`resnet_fused.backends`): among the available backends whose
``auto_devices`` hold x's device type, a single candidate is used as is; several are timed once per call key
(shapes, dtype, layouts, device, conv options, cuDNN settings and which inputs a backward differentiates), running
what the call will run: the forward, plus the backward when autograd will need it. The fastest is remembered for the
process, unless a candidate ran out of memory while timed: then the choice holds for that call only (the case is
timed again on its next calls, ``OUT_OF_MEMORY_RETRIES`` times at most, then kept), and where every candidate did, the
call raises ``torch.OutOfMemoryError``.

Timing is skipped, and the first candidate in table order is used, where it cannot be trusted or cannot run:

- under ``torch.use_deterministic_algorithms(True)`` or ``torch.backends.cudnn.deterministic = True`` (a timed choice
  could change the gradients' bits from run to run);
- while ``torch.compile`` or ``torch.export`` traces: timing synchronizes, and reading an eagerly timed choice would
  make the compiled code depend on the cache and on the shapes (a key hashes them, which specializes a dynamic batch
  size);
- while a CUDA graph captures or a ``torch.func`` transform runs (timing synchronizes, or sees other shapes); an
  earlier timed choice for the same key is still used.

``RESNET_FUSED_BACKEND`` forces one backend on every call left on ``auto`` (an explicit ``backend=`` wins).
"""

from __future__ import annotations

import operator
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from resnet_fused import contract
from resnet_fused.backends import BACKENDS, Backend, Table, check_name

ENV_VAR = "RESNET_FUSED_BACKEND"
WARMUP_CALLS = 1
TIMED_CALLS = 3
# A case whose timing ran out of memory is timed again on its next calls, this many times at most; then its choice
# is kept, so a step near the memory limit does not time the candidates on every call.
OUT_OF_MEMORY_RETRIES = 2

# timer(backend, call, device) -> milliseconds per call
Timer = Callable[[Backend, Callable[[], object], torch.device], float]


def default_timer(backend: Backend, call: Callable[[], object], device: torch.device) -> float:
    """Mean milliseconds of ``call()`` over TIMED_CALLS calls after WARMUP_CALLS: CUDA events on CUDA, else wall."""
    del backend  # a fake timer in a test may key on it
    if device.type != "cuda":
        for _ in range(WARMUP_CALLS):
            call()
        start = time.perf_counter()
        for _ in range(TIMED_CALLS):
            call()
        return (time.perf_counter() - start) * 1e3 / TIMED_CALLS
    with torch.cuda.device(device):
        for _ in range(WARMUP_CALLS):
            call()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(TIMED_CALLS):
            call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / TIMED_CALLS


@dataclass(frozen=True)
class Choice:
    backend: str
    reason: str
    timings_ms: dict[str, float] = field(default_factory=dict)


_CACHE: dict[tuple, Choice] = {}
_OUT_OF_MEMORY: dict[tuple, int] = {}  # key -> timings of it that ran out of memory
_LOCK = threading.RLock()


def clear_cache() -> None:
    """Forget every timed choice (they are timed again on the next call)."""
    with _LOCK:
        _CACHE.clear()
        _OUT_OF_MEMORY.clear()


def cached_choices() -> dict[tuple, Choice]:
    """A copy of the per-process cache: key -> Choice."""
    with _LOCK:
        return dict(_CACHE)


def _layout(t: Tensor | None) -> str:
    if t is None:
        return "none"
    return "channels_last" if contract.memory_format(t) == torch.channels_last else "contiguous"


def _cudnn_settings() -> str:
    """The cuDNN settings a conv's speed depends on: TF32, ``benchmark`` and ``enabled``."""
    cudnn = torch.backends.cudnn
    tf32 = cudnn.conv.fp32_precision if hasattr(cudnn, "conv") else "n/a"
    return f"tf32={tf32} benchmark={cudnn.benchmark} enabled={cudnn.enabled}"


def cache_key(x, weight, bias, residual, scale, stride, padding, dilation, groups, relu, *, backward: bool) -> tuple:
    """What a timed choice depends on: shapes, dtype, layouts, device, the conv options, the cuDNN settings and, where
    a backward follows, which of x, weight, bias and residual it differentiates."""
    grads = tuple(isinstance(t, Tensor) and t.requires_grad for t in (x, weight, bias, residual)) if backward else None
    return (
        tuple(x.shape), tuple(weight.shape), str(x.dtype), _layout(x), _layout(weight), _layout(residual),
        str(x.device), bias is not None, scale is not None, tuple(stride), tuple(padding), tuple(dilation),
        int(groups), bool(relu), _cudnn_settings(), grads,
    )  # fmt: skip


def needs_backward(*tensors: Tensor | None) -> bool:
    """Whether autograd will record this call: grad mode is on and one of ``tensors`` requires grad."""
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


def _can_time() -> bool:
    """Timing runs kernels and synchronizes: impossible while tracing or capturing a CUDA graph. Under a torch.func
    transform (vmap) the call is not the per-sample one its shapes describe, nor does ``requires_grad`` tell whether
    autograd records it: a timing there would be cached for the wrong case."""
    if contract.functorch_active():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _forced(table: Table) -> str | None:
    raw = os.environ.get(ENV_VAR, "")
    value = raw.strip().lower()
    if value in ("", "auto"):
        return None
    if value not in table:
        raise ValueError(f"{ENV_VAR}: expected one of {table.choices()}, got {raw!r}")
    return value


def _timed_call(row: Backend, args: tuple, backward: bool) -> Callable[[], object]:
    """What the call will run on this backend: the forward, and the backward when autograd needs it."""
    if not backward:

        def forward() -> object:
            with torch.no_grad():
                return row.op(*args)

        return forward
    leaves = [t.detach().requires_grad_(t.requires_grad) if isinstance(t, Tensor) else t for t in args[:4]]
    inputs = [t for t in leaves if isinstance(t, Tensor) and t.requires_grad]

    def forward_backward() -> object:
        # The timing's own graph, apart from the caller's saved-tensor hooks: under non-reentrant checkpointing they
        # would pack its tensors and start a recomputation inside it.
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            y = row.op(*leaves, *args[4:])
            return torch.autograd.grad(y, inputs, torch.ones_like(y))

    return forward_backward


def _format_timings(timings: dict[str, float], failures: dict[str, str]) -> str:
    parts = [f"{name} {ms:.3f} ms" for name, ms in sorted(timings.items(), key=lambda kv: kv[1])]
    parts += [f"{name} failed ({why})" for name, why in failures.items()]
    return ", ".join(parts)


def check_runs(table: Table, name: str, x: Tensor, source: str = "backend") -> Backend:
    """The row ``name`` if it can run here on x's device; else the error the call raises."""
    row = table[name]
    why = row.unavailable()
    if why:
        raise RuntimeError(
            f"{source}: {name!r} is not available in this install ({why}); available: {table.available()}"
        )
    if x.device.type not in row.devices:
        raise ValueError(f"{source}: {name!r} runs on {' or '.join(row.devices)} tensors, got x on {x.device}")
    return row


def choose(x, weight, bias, residual, scale, stride, padding, dilation, groups, relu, *,
           table: Table = BACKENDS, timer: Timer = default_timer) -> Choice:  # fmt: skip
    """The backend ``auto`` runs for these (checked) arguments, and why."""
    forced = _forced(table)
    if forced is not None:
        check_runs(table, forced, x, source=f"{ENV_VAR}={forced}")
        return Choice(forced, f"forced by {ENV_VAR}={forced}")
    device = x.device.type
    candidates = table.auto_candidates(device)
    if not candidates:
        reasons = "; ".join(f"{row.name}: {row.unavailable()}" for row in table if device in row.auto_devices)
        # Only rows that take this device: the reference row lists cpu and cuda, while its function runs anywhere.
        others = [row.name for row in table if device in row.devices and not row.unavailable()]
        hint = " or ".join(f"backend={n!r}" for n in others) or (
            "resnet_fused.reference.conv_bias_add_relu (the unfused ops, on any device)"
        )
        raise RuntimeError(
            f"x: no fused backend can run on {x.device}{f' ({reasons})' if reasons else ''}; "
            f"expected a cpu or cuda tensor, or use {hint}"
        )
    names = [row.name for row in candidates]
    if len(candidates) == 1:
        others = "; ".join(
            f"{row.name} unavailable: {row.unavailable()}" for row in table if device in row.auto_devices and row.unavailable()
        )  # fmt: skip
        return Choice(names[0], f"the only available backend for {device} tensors" + (f" ({others})" if others else ""))
    if torch.compiler.is_compiling():
        # Reading an eager call's timing would tie the compiled code to the cache, and hashing traced shapes into a
        # key specializes a dynamic batch size (or fails on it).
        return Choice(
            names[0],
            f"traced by torch.compile or torch.export: the first of {names} in the backend table, never by timing",
        )
    if torch.are_deterministic_algorithms_enabled() or torch.backends.cudnn.deterministic:
        return Choice(
            names[0],
            f"torch.use_deterministic_algorithms(True) or cudnn.deterministic: the first of {names} in the backend "
            "table, never by timing",
        )
    if torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack() > 0:
        # A tracer or dispatch mode would record the timing's calls, and the key cannot be read from traced shapes.
        return Choice(
            names[0],
            f"recorded by torch.jit.trace or a dispatch mode (make_fx): the first of {names} in the backend table, "
            "never by timing",
        )
    backward = needs_backward(x, weight, bias, residual)
    args = (x, weight, bias, residual, scale, stride, padding, dilation, groups, relu)
    key = (id(table), *cache_key(*args, backward=backward))
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    if not _can_time():
        return Choice(
            names[0],
            "this case is not timed yet and cannot be timed inside CUDA graph capture or a torch.func transform; "
            f"{names[0]!r} (first in the backend table) until a call outside them times it",
        )
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            return hit
        timings: dict[str, float] = {}
        failures: dict[str, str] = {}
        out_of_memory = ""  # the first message; the exception itself would keep its frames' tensors alive
        for row in candidates:
            try:
                timings[row.name] = timer(row, _timed_call(row, args, backward), x.device)
            except torch.OutOfMemoryError as e:  # may pass once memory is freed: remembered only after retries
                out_of_memory = out_of_memory or str(e)
                failures[row.name] = "torch.OutOfMemoryError"
            except Exception as e:  # a backend that cannot run this case simply loses
                failures[row.name] = f"{type(e).__name__}: {e}".splitlines()[0]
        if not timings:
            if out_of_memory:
                raise torch.OutOfMemoryError(out_of_memory)  # the caller's OOM handling must see its own type
            raise RuntimeError(f"every candidate backend failed on this case: {_format_timings({}, failures)}")
        winner = min(timings, key=timings.__getitem__)
        what = "forward+backward" if backward else "forward"
        retry = False
        if out_of_memory:
            _OUT_OF_MEMORY[key] = _OUT_OF_MEMORY.get(key, 0) + 1
            retry = _OUT_OF_MEMORY[key] <= OUT_OF_MEMORY_RETRIES
        kept = "for this call only, as a candidate ran out of memory" if retry else "timed once per process"
        choice = Choice(
            winner,
            f"fastest {what} when timed on the first call for this shape/dtype/layout/device/options "
            f"({_format_timings(timings, failures)}; {kept}, {ENV_VAR} forces a backend)",
            timings,
        )
        if not retry:
            _CACHE[key] = choice
            _OUT_OF_MEMORY.pop(key, None)
        return choice


def resolve_backend(backend: str, x: Tensor, *args, table: Table = BACKENDS, timer: Timer = default_timer) -> str:
    """The concrete backend a call with ``backend`` runs. ``args`` are the op's other (checked) arguments."""
    check_name(backend, table)
    if backend == "auto":
        if _forced(table) is None:  # the common case without building choose()'s explanation
            candidates = table.auto_candidates(x.device.type)
            if len(candidates) == 1:
                return candidates[0].name
        return choose(x, *args, table=table, timer=timer).backend
    check_runs(table, backend, x)
    return backend


def call_inputs(x, weight, bias, residual, scale, stride, padding, dilation, groups, relu) -> tuple:
    """The call's first steps, shared by :func:`resnet_fused.conv_bias_add_relu` and :func:`explain`: autocast's
    casts (as autocast casts conv2d, so chained fused layers see one dtype), then the argument checks. Returns
    ``(x, weight, bias, residual, scale, stride, padding, dilation, groups)``, checked, with the conv arguments as
    pairs and ``groups`` a Python int (a NumPy integer passes the check)."""
    x, weight, bias, residual, scale = contract.autocast_inputs(x, weight, bias, residual, scale)
    stride, padding, dilation = contract.check_inputs(
        x, weight, bias, residual, scale, stride, padding, dilation, groups, relu
    )
    contract.check_scale_constant(scale)
    return x, weight, bias, residual, scale, stride, padding, dilation, operator.index(groups)


def check_transform_backend(backend: str, table: Table = BACKENDS) -> None:
    """Under forward-mode AD or a differentiating ``torch.func`` transform, which no fused op supports, only ``auto``
    and ``reference`` run (through the unfused ops); a named fused backend is refused. ``RESNET_FUSED_BACKEND`` is
    checked as on any ``auto`` call, though the unfused ops run whatever it names."""
    if backend == "auto":
        _forced(table)
    if backend not in ("auto", "reference"):
        raise NotImplementedError(
            f"backend: expected 'auto' or 'reference' under forward-mode AD (dual tensors) or torch.func.grad/jvp/"
            f"vjp/jacrev/jacfwd, which the fused ops do not support, got {backend!r}"
        )


def explain(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    residual: Tensor | None = None,
    *,
    scale: Tensor | None = None,
    stride: contract.IntPair = 1,
    padding: contract.IntPair = 0,
    dilation: contract.IntPair = 1,
    groups: int = 1,
    relu: bool = True,
    backend: str = "auto",
    table: Table = BACKENDS,
    timer: Timer = default_timer,
) -> str:
    """Which backend ``conv_bias_add_relu`` with these arguments would run, and why, as one line.

    With ``backend="auto"`` this does what the call would do: it casts as autocast would, answers "reference" under
    forward-mode AD or a differentiating ``torch.func`` transform (where the call runs the unfused ops), and times
    the candidates if the case was not timed yet, so the answer is the one the call will use.

    Args: those of :func:`resnet_fused.conv_bias_add_relu`: x (N, C, H, W), weight (K, C/groups, R, S), bias and
    scale (K,) or None, residual (N, K, P, Q) or None; ``table`` and ``timer`` replace the backend table and the
    timer (for tests).

    Returns:
        ``"<backend>: <reason>"``, e.g. ``"cpu: the only available backend for cpu tensors"``.
    """
    # The call's own first steps, then the route of differentiating transforms.
    x, weight, bias, residual, scale, stride, padding, dilation, groups = call_inputs(
        x, weight, bias, residual, scale, stride, padding, dilation, groups, relu
    )
    check_name(backend, table)
    if contract.differentiated_by_transform(x, weight, bias, residual, scale):
        check_transform_backend(backend, table)
        return "reference: forward-mode AD or a differentiating torch.func transform, which no fused op supports"
    if backend != "auto":
        check_runs(table, backend, x)
        return f"{backend}: requested explicitly with backend={backend!r}"
    choice = choose(x, weight, bias, residual, scale, stride, padding, dilation, groups, relu, table=table, timer=timer)
    return f"{choice.backend}: {choice.reason}"
