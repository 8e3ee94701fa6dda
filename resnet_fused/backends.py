"""The backend table: every implementation of the fused op, in one place.

Each row says what the backend is called, which devices it runs on, on which of them ``backend="auto"`` may pick
it, the op it calls and how to tell whether it can run in this process. ``resolve_backend``, the auto chooser
(:mod:`resnet_fused.select`), ``explain``, ``available_backends``, the tests and the benchmarks all read this table.
Adding a backend is one :class:`Backend` row plus its kernel files (see docs/adding-a-backend.md).
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from resnet_fused import contract, reference

# The Triton ops' schemas, fakes and autograd, without triton (their kernels import it on the first call): a program
# exported or traced on that backend loads after `import resnet_fused`, as one on the C++ op does.
from resnet_fused.triton import op as triton_ops

try:
    from resnet_fused import _C  # noqa: F401  (importing runs the C++ op registrations)
except ImportError as e:
    raise ImportError(
        f"resnet_fused's C++ extension is missing, or was built against another torch than this one "
        f"({torch.__version__}): {e}. Build it against the torch you run: pip install --no-build-isolation . "
        "(or make build) in the source tree"
    ) from e

# The dispatcher ops of the C++ backends (one op, a kernel per dispatch key).
FORWARD = "resnet_fused::conv_bias_add_relu"
BACKWARD = "resnet_fused::conv_bias_add_relu_backward"
contract.register_op(FORWARD, BACKWARD)
# The epilogue pass alone, in place on a conv's fresh output (CPU): prepared inference runs its own packed conv.
EPILOGUE = "resnet_fused::_epilogue_"
torch.library.register_fake(EPILOGUE)(contract.epilogue_fake)
contract.register_not_dense(EPILOGUE, contract.epilogue_fake)


INTERPRET = triton_ops.INTERPRET


# A row's first use may happen inside torch.compile. The probe then runs eagerly, as a constant (its torch calls would
# return no tensor in the trace), and fills the whole cache at once: a key added later, during a trace, would fail the
# trace's guard on the cache at the next call and compile the whole model a second time. It takes the row's key, a
# string: Dynamo cannot pass a dataclass instance to a constant function on every torch (2.11 raised "can't reconstruct
# arbitrary frozen dataclass instances"), nor an int under dynamic=True (it may be traced as a symbol).
_ROWS: weakref.WeakValueDictionary[str, Backend] = weakref.WeakValueDictionary()
_KEYS = itertools.count()


@torch.compiler.assume_constant_result
def _probed(key: str) -> str:
    row = _ROWS[key]
    cache = row._cache
    if "why" not in cache:
        cache["why"] = row.probe()
        if not cache["why"]:
            cache["op"] = row.load()
            if row.load_backward is not None:
                cache["backward"] = row.load_backward()
    return cache["why"]


@dataclass(frozen=True)
class Backend:
    """One implementation of ``conv_bias_add_relu``.

    Attributes:
        name: what users pass as ``backend=``.
        devices: device types (``torch.device.type``) whose tensors it takes.
        auto_devices: device types on which ``backend="auto"`` may pick it (the first listed row wins without
            timing; several candidates are timed).
        load: returns the forward callable, with the contract's positional argument list. Called once, right
            after a probe that finds the backend available.
        probe: returns "" when the backend can run in this process, else the reason. Called once.
        load_backward: returns the backward op, given when eager training records a call as two autograd nodes
            (:func:`resnet_fused.contract.record_split_graph`), which frees the incoming gradient and the saved
            output before the conv backward allocates; None keeps the op's own single node.
    """

    name: str
    devices: tuple[str, ...]
    auto_devices: tuple[str, ...]
    load: Callable[[], Callable[..., Tensor]]
    probe: Callable[[], str]
    load_backward: Callable[[], Callable[..., tuple[Tensor, ...]]] | None = None
    _cache: dict = field(default_factory=dict, init=False, compare=False, repr=False)
    _key: str = field(default_factory=lambda: f"row{next(_KEYS)}", init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        _ROWS[self._key] = self

    def __reduce__(self) -> tuple:
        # A copy or an unpickled row is a new row, with its own key in _ROWS and its own probe: restored field by
        # field, it would share the original's key (gone with it, or another row's in another process).
        return (type(self), (self.name, self.devices, self.auto_devices, self.load, self.probe, self.load_backward))

    def unavailable(self) -> str:
        """ "" when this backend can run here, else why not (probed once)."""
        return _probed(self._key)

    @property
    def op(self) -> Callable[..., Tensor]:
        """The forward callable: ``op(x, weight, bias, residual, scale, stride, padding, dilation, groups, relu)``."""
        _probed(self._key)
        if "op" not in self._cache:  # an unavailable row: load() says why it cannot
            self._cache["op"] = self.load()
        return self._cache["op"]

    @property
    def split_backward(self) -> Callable[..., tuple[Tensor, ...]] | None:
        """The backward op for :func:`resnet_fused.contract.record_split_graph`, or None (see ``load_backward``)."""
        if self.load_backward is None:
            return None
        _probed(self._key)
        if "backward" not in self._cache:
            self._cache["backward"] = self.load_backward()
        return self._cache["backward"]


class Table:
    """An ordered set of backends: the order is the auto chooser's preference where it cannot time."""

    def __init__(self, rows: list[Backend]) -> None:
        self._rows = {row.name: row for row in rows}

    def __iter__(self) -> Iterator[Backend]:
        return iter(self._rows.values())

    def __contains__(self, name: object) -> bool:
        return name in self._rows

    def names(self) -> tuple[str, ...]:
        """The concrete backend names, in preference order."""
        return tuple(self._rows)

    def choices(self) -> tuple[str, ...]:
        """Every value ``backend=`` accepts: "auto" and the names."""
        return ("auto", *self._rows)

    def __getitem__(self, name: str) -> Backend:
        if name not in self._rows:
            raise ValueError(f"backend: expected one of {self.choices()}, got {name!r}")
        return self._rows[name]

    def available(self) -> list[str]:
        """The backends that can run in this process."""
        return [row.name for row in self if not row.unavailable()]

    def auto_candidates(self, device_type: str) -> list[Backend]:
        """Available backends that ``auto`` may pick for tensors on ``device_type``, in preference order."""
        return [row for row in self if device_type in row.auto_devices and not row.unavailable()]


# ---- the rows ----


def _reference_op(x, weight, bias, residual, scale, stride, padding, dilation, groups, relu) -> Tensor:
    return reference.unchecked(x, weight, bias, residual, scale, stride, padding, dilation, groups, relu)


def _cpp_op() -> Callable[..., Tensor]:
    return torch.ops.resnet_fused.conv_bias_add_relu.default


def _cpp_backward_op() -> Callable[..., tuple[Tensor, ...]]:
    return torch.ops.resnet_fused.conv_bias_add_relu_backward.default


def _cuda_probe() -> str:
    if not torch._C._dispatch_has_kernel_for_dispatch_key(FORWARD, "CUDA"):
        if torch.version.cuda is None:
            return "this torch is a CPU-only build (install a CUDA build of torch, then rebuild resnet_fused)"
        return (
            "the extension was built without CUDA kernels (CPU-only build: no usable CUDA toolkit was found, as the "
            "build log says, or RESNET_FUSED_BUILD_CUDA=0); rebuild with a CUDA toolkit to get them"
        )
    if not torch.cuda.is_available():
        return "the extension has CUDA kernels, but torch.cuda.is_available() is False (no GPU or driver)"
    status = getattr(torch.ops.resnet_fused, "cuda_kernel_status", None)
    # The current device only: the probe makes a CUDA context there, which a process using another GPU (a DDP rank,
    # after torch.cuda.set_device) should not pay on every GPU it can see.
    return "" if status is None else status(torch.cuda.current_device())


def _triton_op() -> Callable[..., Tensor]:
    return triton_ops.conv_bias_add_relu_triton


BACKENDS = Table(
    [
        # Two nodes in eager training: the train step's allocator peak is then no higher than the unfused graph's.
        # Meta tensors (shape inference, as for nn.Conv2d) take the dispatcher op's fake kernel.
        Backend("cpu", ("cpu", "meta"), ("cpu", "meta"), _cpp_op, lambda: "", load_backward=_cpp_backward_op),
        Backend("cuda", ("cuda", "meta"), ("cuda",), _cpp_op, _cuda_probe),
        # Under the interpreter Triton runs on CPU tensors; auto never picks it there.
        Backend(
            "triton",
            ("cuda", "cpu", "meta") if INTERPRET else ("cuda", "meta"),
            ("cuda",),
            _triton_op,
            triton_ops.unavailable,
        ),
        Backend("reference", ("cpu", "cuda", "meta"), (), lambda: _reference_op, lambda: ""),
    ]
)


def check_name(backend: str, table: Table = BACKENDS) -> str:
    """``backend`` if it is "auto" or a row of ``table``; else a ValueError naming the choices."""
    if backend not in table.choices():
        raise ValueError(f"backend: expected one of {table.choices()}, got {backend!r}")
    return backend


def available_backends() -> list[str]:
    """The concrete backends this install can run, e.g. ``["cpu", "reference"]``; ``"auto"`` picks among them."""
    return BACKENDS.available()
