"""Prepared CPU inference: each fused conv's weight packed once into oneDNN's blocked layout.

    model, _ = resnet_fused.convert(torchvision.models.resnet50().eval())
    model = resnet_fused.inference.optimize_for_inference(model.to(memory_format=torch.channels_last))
    with torch.inference_mode():
        y = model(x)

Each :class:`~resnet_fused.nn.FusedConv2d` then runs as one oneDNN convolution (torch's own
``mkldnn::_convolution_pointwise`` ops, the ones Inductor emits under freezing) on a weight that was
scale-folded and reordered once per input shape, instead of on every call. Outputs equal the unpacked
path's up to oneDNN's own rounding. channels_last inputs are the fast layout; NCHW works too.

A packed weight is never used stale: it is rebuilt when the weight is replaced, changed in place by a
torch op (``load_state_dict``, ``with torch.no_grad(): w.mul_(2)``; tracked by the tensor's version
counter), moved or cast (``.to()``), or when the per-channel scale changes; ``.train()`` drops the
packs and runs the ordinary op. A step of any ``torch.optim.Optimizer`` (a global step post-hook) drops
the packs of the modules whose parameters it holds, since fused optimizers (``fused=True``) write in
place without bumping the version counter. Other writes that bypass the version counter go unseen:
through ``weight.data``, a NumPy or DLPack view, another tensor over the same memory (a flat buffer the
weights were made views of by ``vector_to_parameters``), another process (``share_memory()``), or an
in-place ``torch.distributed`` collective (``broadcast``, ``all_reduce``); call
:func:`optimize_for_inference` again after such a write.

Calls that need autograd, autocast, a non-CPU device, a dtype oneDNN cannot run on this CPU, a
non-zero padding mode or an empty batch take the ordinary op, so every call stays correct. So do calls
being recorded (``torch.jit.trace``, ``torch.export``, ``torch.compile``, both ONNX exporters,
``torch.fx.symbolic_trace``, a dispatch mode such as ``make_fx``) and tensor-subclass inputs: a
prepared model traces, exports and compiles as the converted one does.
"""

from __future__ import annotations

import copy
import itertools
import os
import threading
import warnings
import weakref

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from resnet_fused import contract, select
from resnet_fused import nn as fused_nn
from resnet_fused.nn import BasicBlock, Bottleneck, FusedConv2d, _global_hooks, hand_over

__all__ = ["PackedFusedConv2d", "PreparedSequential", "optimize_for_inference"]

# oneDNN's ReLU post-op turns a NaN pre-activation into 0, unlike torch.relu; only with this set to "fused" is
# ReLU left to oneDNN (the C++ CPU kernel reads the same variable). Otherwise it runs in place after the conv.
RELU_MODE_VAR = "RESNET_FUSED_ONEDNN_RELU"


# Bound once: these run on every prepared call. torch.jit.is_tracing() is _is_tracing behind an is_scripting() check;
# torch.backends.mkldnn.enabled is _get_mkldnn_enabled behind a property.
_jit_tracing = torch._C._is_tracing
_grad_enabled = torch.is_grad_enabled
_autocast_enabled = torch.is_autocast_enabled
_mkldnn_enabled = torch._C._get_mkldnn_enabled
_forward_ad = torch.autograd.forward_ad
_peek_interpreter = torch._C._functorch.peek_interpreter_stack

# The largest output (bytes) whose residual add rides in oneDNN's binary post-op when no ReLU pass follows. Up to
# about 3 MiB the post-op beat a separate pass (the residual comes from cache); from about 6 MiB it stalled on memory,
# up to 2.0x the conv alone against 1.55x with the pass (`python -m benchmarks.diagnose residual-routes`). NCHW
# always takes the pass: torch's binary op fuses only channels_last. The C++ CPU kernel's kBinaryPostOpMaxBytes
# (csrc/cpu/onednn_conv.cpp) is the same rule.
BINARY_POST_OP_MAX_BYTES = 4 << 20
# Input shapes a prepared conv keeps a packed weight for (the most recently used ones): each is a copy of the weight.
MAX_PACKED_SHAPES = 4
_dispatch_modes = torch._C._len_torch_dispatch_stack


_PLAIN_TYPES = (Tensor, nn.Parameter)


def _traced(x: Tensor, residual: Tensor | None) -> bool:
    """Whether this call is recorded rather than only run: ``torch.compile`` or ``torch.export`` (strict or not; both set
    ``torch.compiler.is_compiling``), ``torch.jit.trace`` (and the TorchScript ONNX exporter), a dispatch mode (make_fx,
    FakeTensorMode, functionalization, user modes), or an input that is not a plain tensor (a subclass such as
    FakeTensor, an fx Proxy). A trace must record the ordinary op, which tracers and exporters know; the packed weight
    is an opaque oneDNN tensor with no fake or symbolic counterpart."""
    return (
        torch.compiler.is_compiling()  # first: dynamo folds it to True and stops there
        or type(x) is not Tensor
        or (residual is not None and type(residual) is not Tensor)
        or _jit_tracing()
        or _dispatch_modes() != 0
    )


def _taps_reach_input(kernel: int, stride: int, padding: int, dilation: int, size: int) -> bool:
    """Whether some output position of a conv dimension has a kernel tap on the input rather than on its padding: a
    tap ``r`` of output ``p`` reads padded position ``p * stride + r * dilation``, the input spans ``[padding,
    padding + size)``."""
    outputs = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    for r in range(kernel):
        first = max(0, -(-(padding - r * dilation) // stride))  # the first output whose tap r is past the left padding
        if first < outputs and first * stride + r * dilation < padding + size:
            return True
    return False


def _packed_route_sound(x_shape, weight_shape, stride, padding, dilation, dtype: torch.dtype) -> bool:
    """Whether torch's packed-weight route computes this conv right; where it does not, the ordinary op runs it."""
    if weight_shape[1] == 1 and dtype in (torch.bfloat16, torch.float16):
        # One input channel per group in 16 bits: an Inf or NaN input also made a neighbouring output NaN (a
        # zero-padded tap times Inf, seemingly), where the ordinary op's is right. Finite inputs came out right.
        return False
    geometry = zip(weight_shape[2:], stride, padding, dilation, x_shape[2:], strict=True)
    if not all(_taps_reach_input(*dim) for dim in geometry):
        return False  # an output all padding along a dimension (nn.Conv2d gives the bias there) crashed the process
    # One input channel per group and one output column gave wrong values (stride (1, 2) or (1, 3); fp32 and bf16,
    # either layout, any groups); no other swept geometry did. Rows measured right, and are kept out to be safe.
    out_hw = contract.conv_output_shape(x_shape, weight_shape, stride, padding, dilation)[2:]
    return not (weight_shape[1] == 1 and 1 in out_hw)


def _dense(t: Tensor) -> bool:
    """Whether ``t`` has sizes and strides to key a call by: not sparse, nor nested (whose layout reads strided)."""
    return t.layout == torch.strided and not t.is_nested


def _held(t: Tensor) -> tuple:
    """What a pack depends on in ``t``: its identity, version, memory and metadata."""
    return (id(t), t._version, t.data_ptr(), t.dtype, t.device, t.shape, t.stride())


def _forced_backend() -> str | None:
    """The backend ``RESNET_FUSED_BACKEND`` forces, or None (unset or "auto")."""
    value = os.environ.get(select.ENV_VAR, "").strip().lower()
    return None if value in ("", "auto") else value


def onednn_supports(dtype: torch.dtype) -> bool:
    """Whether torch's oneDNN runs convolutions of ``dtype`` on this CPU (fp32 always; bf16/fp16 by CPU support)."""
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if dtype == torch.float16:
        return torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return False


class PackedFusedConv2d(FusedConv2d):
    """A :class:`FusedConv2d` whose eval-mode forward uses a prepacked oneDNN weight.

    Made by :func:`optimize_for_inference` from an existing FusedConv2d (same parameters, buffers and
    ``state_dict``); not constructed directly. Shapes as :class:`FusedConv2d`.
    """

    # (source, {input shape: packed weight}): the weight, scale and storages the packs were made from, replaced as one
    # tuple, so that a thread reads a source and its packs together.
    _pack_state: tuple = (None, {})
    # True: ReLU inside the oneDNN primitive (see optimize_for_inference's fuse_relu).
    _fuse_relu: bool = False
    # The last call that passed every check, as (signature, the tensors whose ids it holds, launch arguments, the
    # scale folded into the pack): a call with the same signature and scale, the steady state of serving, goes
    # straight to oneDNN.
    _last_call: tuple | None = None
    # Counts _drop_packs calls: a call that packed before a drop in another thread (an optimizer step's hook) must
    # not publish its _last_call after it.
    _generation: int = 0

    def _drop_packs(self) -> None:
        self._generation += 1
        self._pack_state = (None, {})
        self._last_call = None
        with _PACKED_LOCK:
            _PACKED.discard(self)

    def train(self, mode: bool = True) -> PackedFusedConv2d:
        if mode:  # packs are made in eval mode only: eval() keeps them (a serving loop may call it per request)
            self._drop_packs()
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        self._drop_packs()  # .to(), .half(), .cuda(), ...: the packed copies belong to the old tensors
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        self._drop_packs()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state = dict(state)
        state["_pack_state"], state["_last_call"] = (None, {}), None  # opaque oneDNN tensors: rebuilt
        return state

    def __deepcopy__(self, memo: dict) -> PackedFusedConv2d:
        # Through this class's __getstate__ (no packs) even where a parametrization's class has replaced it with one
        # that raises, and would otherwise copy __dict__ with its opaque oneDNN tensors.
        replica = type(self).__new__(type(self))
        memo[id(self)] = replica
        replica.__setstate__(copy.deepcopy(PackedFusedConv2d.__getstate__(self), memo))
        return replica

    @property
    def _packs(self) -> dict:
        """The packed weights by input shape."""
        return self._pack_state[1]

    def _packed_weight(
        self, x: Tensor, scale: Tensor | None, stride, padding, dilation
    ) -> tuple[Tensor | None, Tensor | None]:
        """The (scale-folded) weight reordered for ``x``'s shape, rebuilt when its source changed, and the copy of
        the scale it was folded with; no weight (None) where the folded one is not finite."""
        w = self.weight
        # Shape and strides too: a .data swap for another view of the same memory (a transpose) keeps the rest.
        source = (w, *_held(w)[1:])  # the weight itself, not its id: its identity is checked with `is`
        n = len(source)
        old, packs = self._pack_state  # read once: a thread with another scale may publish its own meanwhile
        same = (
            old is not None
            and old[0] is w
            and old[1:n] == source[1:]
            and (old[n] is None) == (scale is None)
            and (scale is None or torch.equal(old[n], scale))
        )
        if same:
            frozen = old[n]
        else:
            # The weight's storage rides along: while it lives, no new one (a weight.data swap) can take its
            # address, so an equal data_ptr means the same memory.
            frozen = None if scale is None else scale.detach().clone()
            packs = {}
            self._pack_state = ((*source, frozen, w.untyped_storage()), packs)
            _track(self)
        key = tuple(x.shape)
        packed = packs.pop(key, None)  # put back last: the dict runs from least to most recently used
        if packed is None:
            with torch.no_grad():
                folded = w if scale is None else w * scale.reshape(-1, 1, 1, 1)
                if scale is not None and not torch.isfinite(folded.sum()):
                    # A finite scale times a large weight overflowed: conv(x, w * s) would sum +-inf where
                    # conv(x, w) * s is finite. The ordinary op applies such a scale after the conv. One sum, as
                    # the op's own check: a NaN or Inf element makes it non-finite.
                    return None, frozen
                packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                    folded.contiguous().to_mkldnn(), list(padding), list(stride), list(dilation), self.groups, list(key)
                )
            while len(packs) >= MAX_PACKED_SHAPES:  # variable image sizes must not hold a weight copy each
                try:
                    packs.pop(next(iter(packs)))
                except (KeyError, StopIteration, RuntimeError):  # another thread changed the dict meanwhile
                    break
        packs[key] = packed
        return packed, frozen

    def _signature(self, x: Tensor, residual: Tensor | None, scale: Tensor | None, bias: Tensor | None, relu: bool):
        """Everything the checks, the packed weight and the launch depend on, as plain values: the inputs' metadata;
        the identity, version and storage of weight, scale and bias; the conv's settings; the global switches.
        None where one of them is an inference tensor (e.g. a scale computed under inference_mode), which has no
        version counter, or an input without sizes or strides: such a call is checked every time."""
        # Tuples built inline, not by nested helpers: this runs on every prepared call, where each Python call counts.
        w = self.weight
        fused = relu and (self._fuse_relu or os.environ.get(RELU_MODE_VAR) == "fused")
        try:
            inputs = (
                (x.shape, x.stride(), x.dtype, x.device),
                None if residual is None else (residual.shape, residual.stride(), residual.dtype, residual.device),
            )
            tensors = (_held(w), None if scale is None else _held(scale), None if bias is None else _held(bias))
        except (
            RuntimeError
        ):  # no sizes or strides (nested, sparse), or "Inference tensors do not track version counter"
            return None
        return (
            *inputs,
            *tensors,
            relu,
            fused,
            (self.stride, self.padding, self.dilation, self.groups, self.padding_mode, self.backend),
            (_autocast_enabled("cpu"), _mkldnn_enabled(), os.environ.get(select.ENV_VAR)),
        )

    def _packed_path_ok(self, x: Tensor, residual: Tensor | None, scale: Tensor | None, bias: Tensor | None) -> bool:
        if not _dense(x) or (residual is not None and not _dense(residual)):
            return False  # the ordinary op's checks name them
        if self.training or x.device.type != "cpu" or x.dim() != 4 or x.shape[0] == 0:
            return False
        if self.backend != "cpu" and (self.backend != "auto" or _forced_backend() not in (None, "cpu")):
            return False  # another backend asked for (to compare numerics, say): the ordinary op runs it
        if self._padding_plan()[0] is not None or torch.is_autocast_enabled("cpu"):
            return False
        tensors = [t for t in (x, self.weight, residual, scale, bias) if t is not None]
        if any(type(t) not in _PLAIN_TYPES for t in tensors):
            return False  # a tensor subclass parameter (e.g. quantized or distributed): its own ops, no data_ptr
        if "weight" not in self._parameters:
            return False  # recomputed on every call (pruning, legacy weight norm): a pack would never be reused
        if self.weight.is_inference():
            return False  # made under inference_mode: no version counter to tell an in-place change by
        if any(t.dtype != x.dtype or t.device != x.device for t in tensors):
            return False  # the ordinary op gives the error message
        if bias is not None and not bias.is_contiguous():
            return False  # oneDNN reads the bias as a dense vector; the ordinary op copies it
        if scale is not None and (x.dtype == torch.float16 or not torch.isfinite(scale).all()):
            # Folded into the weight, an infinite scale gives NaN sums where conv * scale is +-inf, and fp16's
            # w * scale may overflow where conv * scale does not.
            return False
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return False
        return onednn_supports(x.dtype)

    def conv_bias_add_relu(
        self,
        x: Tensor,
        residual: Tensor | None = None,
        *,
        weight: Tensor | None = None,
        scale: Tensor | None = None,
        bias: Tensor | None = None,
        relu: bool | None = None,
        fold_trainable_scale: bool = False,
        donate_residual: bool = False,
    ) -> Tensor:
        """As :meth:`FusedConv2d.conv_bias_add_relu`, on the prepacked weight when the call allows it; there a
        donated channels_last ``residual`` receives the output in place."""
        if type(donate_residual) is not bool:
            fused_nn._check_donate(donate_residual)
        if relu is None:
            relu = self.relu
        # 1 == True: the cached signature would let it pass; the ordinary op refuses it. A weight recomputed on every
        # read (a parametrization, pruning) is never packed: the ordinary op reads it once, as an unprepared conv does.
        if type(relu) is not bool or (weight is None and "weight" not in self._parameters):
            if self._pack_state[0] is not None and "weight" not in self._parameters:
                self._drop_packs()  # parametrized after it packed: they would never serve again
            return super().conv_bias_add_relu(
                x, residual, weight=weight, scale=scale, bias=bias, relu=relu, fold_trainable_scale=fold_trainable_scale
            )
        # Forward AD runs even under no_grad, where the packed path would drop a tangent (the weight's too); under
        # vmap the ordinary op batches in one call, while the packed path has no batching rule.
        # A trace, export or compile records the ordinary op (see _traced); checked before the fast path below.
        if (
            _traced(x, residual)
            or contract.functorch_active()
            # Its checks, where there is anything to check: a dual level entered or a functorch interpreter pushed.
            or (
                (_forward_ad._current_level >= 0 or _peek_interpreter() is not None)
                and contract.differentiated_by_transform(
                    x, self.weight if weight is None else weight, residual, scale, bias
                )
            )
        ):
            return super().conv_bias_add_relu(
                x, residual, weight=weight, scale=scale, bias=bias, relu=relu, fold_trainable_scale=fold_trainable_scale
            )
        # Without autograd, a call like the last checked one skips the checks (their inputs are all in the
        # signature) and the pack lookup. With autograd, every call is checked.
        signature = None
        if weight is None and not _grad_enabled():
            signature = self._signature(x, residual, scale, bias, relu)
            last = self._last_call
            # never when signature is None: _last_call holds none. The scale by value: a write that bumps no
            # version counter (.data, NumPy, a broadcast of buffers) still changes the folded weight.
            if last is not None and last[0] == signature and (scale is None or torch.equal(scale, last[3])):
                return _launch(x, residual, bias, relu, *last[2], donate_residual)
        if weight is not None or not self._packed_path_ok(x, residual, scale, bias):
            return super().conv_bias_add_relu(
                x, residual, weight=weight, scale=scale, bias=bias, relu=relu, fold_trainable_scale=fold_trainable_scale
            )
        generation = self._generation
        padding = self._padding_plan()[1]
        stride, padding, dilation = contract.check_inputs(
            x, self.weight, bias, residual, scale, self.stride, padding, self.dilation, self.groups, relu
        )
        # A 1-wide kernel has no gaps to dilate, and torch's packed-weight route crashes on a dilated one.
        dilation = tuple(1 if k == 1 else d for k, d in zip(self.weight.shape[2:], dilation, strict=True))
        if not _packed_route_sound(x.shape, self.weight.shape, stride, padding, dilation, x.dtype):
            return super().conv_bias_add_relu(
                x, residual, weight=weight, scale=scale, bias=bias, relu=relu, fold_trainable_scale=fold_trainable_scale
            )
        packed, frozen = self._packed_weight(x, scale, stride, padding, dilation)
        if packed is None:
            return super().conv_bias_add_relu(
                x, residual, weight=weight, scale=scale, bias=bias, relu=relu, fold_trainable_scale=fold_trainable_scale
            )
        fused = relu and (self._fuse_relu or os.environ.get(RELU_MODE_VAR) == "fused")
        launch = (packed, (list(padding), list(stride), list(dilation), self.groups), contract.memory_format(x), fused)
        if signature is not None and generation == self._generation:
            # Holding the tensors keeps their ids unique, and their storages their data_ptrs (a .data swap frees one).
            held = (self.weight, scale, bias, *(t.untyped_storage() for t in (self.weight, scale) if t is not None))
            self._last_call = (signature, held, launch, frozen)
        return _launch(x, residual, bias, relu, *launch, donate_residual)


# The prepared modules holding packs, for _drop_stepped_packs; weak, so it keeps no module alive. The lock lets an
# optimizer step in one thread list them while another thread packs.
_PACKED: weakref.WeakSet[PackedFusedConv2d] = weakref.WeakSet()
_PACKED_LOCK = threading.Lock()
_optimizer_hook = None  # the handle of _drop_stepped_packs, registered once per process


def _track(module: PackedFusedConv2d) -> None:
    global _optimizer_hook
    with _PACKED_LOCK:
        if _optimizer_hook is None:
            _optimizer_hook = register_optimizer_step_post_hook(_drop_stepped_packs)
        _PACKED.add(module)


def _storage_key(t: Tensor) -> int:
    """Where ``t``'s data lives: a tensor and its views (an alias, a flat parameter buffer) share one key."""
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # no plain storage (sparse, nested, some subclasses): by identity
        return id(t)


@torch.compiler.disable  # a compiled step runs this after its graph, on the real parameters
def _drop_stepped_packs(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """A global optimizer step post-hook: drops the packs of every prepared module whose weight, bias or scale shares
    storage with one of the optimizer's parameters. Fused optimizers (``fused=True``) and third-party ones with their
    own kernels update parameters in place without bumping their version counter, so the packs' own check of the
    weight's version cannot see such a step."""
    with _PACKED_LOCK:
        modules = list(_PACKED)
    if not modules:
        return
    stepped = set(map(_storage_key, itertools.chain.from_iterable(g["params"] for g in optimizer.param_groups)))
    for m in modules:
        for t in (m.weight, m.bias, m.scale):
            if t is not None and _storage_key(t) in stepped:
                m._drop_packs()
                break


def _launch(
    x: Tensor,
    residual: Tensor | None,
    bias: Tensor | None,
    relu: bool,
    packed: Tensor,
    geometry: tuple,
    fmt: torch.memory_format,
    fused: bool,
    donate_residual: bool = False,
) -> Tensor:
    """One oneDNN convolution on the packed weight with the bias as a post-op, then the ReLU pass where the ReLU is
    exact. A residual is summed into in place where donated; else, where no ReLU pass follows, it is oneDNN's binary
    post-op on a small channels_last output of an ungrouped conv; else the conv runs alone and one pass adds it (and
    applies the ReLU)."""
    conv = torch.ops.mkldnn._convolution_pointwise
    x = x.contiguous(memory_format=fmt)
    exact_relu = relu and not fused
    if residual is not None:
        post_relu = "relu" if fused else None
        if donate_residual and _can_sum_into(residual, x, fmt):
            # The cheapest route measured: it reads the residual once and writes nothing new (Inductor's freezing
            # does the same where a buffer is free).
            y = torch.ops.mkldnn._convolution_pointwise_.binary(
                residual, x, packed, bias, *geometry, "add", 1.0, post_relu, [], None
            )
            return y.relu_() if exact_relu else y
        # With an exact ReLU a pass runs anyway, and it adds the residual for free: the post-op only where none runs.
        # torch fuses it for groups == 1 alone; others run the conv, then its own add (add_relu_: no bf16 kernel).
        small = residual.numel() * residual.element_size() <= BINARY_POST_OP_MAX_BYTES
        if not exact_relu and fmt == torch.channels_last and small and geometry[3] == 1:
            residual = residual.contiguous(memory_format=fmt)
            y = conv.binary(x, residual, packed, bias, *geometry, "add", 1.0, post_relu, [], None)
            return y.contiguous(memory_format=fmt)
        y = conv(x, packed, bias, *geometry, "none", [], None).contiguous(memory_format=fmt)
        torch.ops.resnet_fused._epilogue_(y, None, residual, None, relu)
        return y
    y = conv(x, packed, bias, *geometry, "relu" if fused else "none", [], None).contiguous(memory_format=fmt)
    return y.relu_() if exact_relu else y


class PreparedSequential(nn.Sequential):
    """An ``nn.Sequential`` of residual blocks in a prepared model (a ResNet stage): each block after one of
    resnet_fused's :class:`~resnet_fused.nn.BasicBlock`/:class:`~resnet_fused.nn.Bottleneck` is handed that block's
    fresh output (:func:`resnet_fused.nn.hand_over`), so its identity shortcut takes the last conv's sum in place.
    Made by :func:`optimize_for_inference` from an ``nn.Sequential`` (same children and ``state_dict``). Shapes as
    the blocks'.
    """

    def forward(self, x: Tensor) -> Tensor:
        if _traced(x, None) or _global_hooks():
            return super().forward(x)  # a trace records the modules as they are; a global hook sees every output
        owned = False  # the stage's input is the caller's
        for module in self:
            # One of our blocks with no hooks and no forward set on it: nothing but its forward sees its input first.
            plain = type(module) in _BLOCKS and fused_nn._unseen(module)
            if plain and owned:
                hand_over(x)
            try:
                x = module(x)
            finally:
                hand_over(None)
            # The output is new and nothing else holds it: the block's last conv's, or the residual it summed into.
            # A hooked or swapped relu is called as a module after the last conv: its output is the block's; so is
            # the last norm's where the norm runs as a module (train mode, other norms), whose hooks may keep it.
            if plain:
                basic = type(module) is BasicBlock
                last_conv, last_norm = (module.conv2, module.bn2) if basic else (module.conv3, module.bn3)
            owned = (
                plain
                and fused_nn._plain_relu(module.relu)
                and type(last_conv) in fused_nn._FRESH_CONVS
                and type(last_norm) in fused_nn._FRESH_NORMS
                and fused_nn._unseen(last_conv)
                and fused_nn._unseen(last_norm)
            )
        return x


_BLOCKS = (BasicBlock, Bottleneck)
fused_nn._FRESH_CONVS.add(PackedFusedConv2d)


def _can_sum_into(residual: Tensor, x: Tensor, fmt: torch.memory_format) -> bool:
    """Whether oneDNN can sum a conv of ``x`` into ``residual`` in place: a dense channels_last buffer (torch's
    in-place binary op fuses only that layout) apart from the input, writable here (an inference tensor only inside
    inference mode)."""
    return (
        fmt == torch.channels_last
        and residual.is_contiguous(memory_format=fmt)
        and not torch._C._overlaps(residual, x)
        and (not residual.is_inference() or torch.is_inference_mode_enabled())
    )


def optimize_for_inference(model: nn.Module, *, fuse_relu: bool = False) -> nn.Module:
    """Prepare a converted model for CPU inference: every ``FusedConv2d`` in it packs its weight once per input shape.

    ``model`` (in eval mode, holding :class:`~resnet_fused.nn.FusedConv2d` modules, e.g. from
    :func:`resnet_fused.convert`) is changed in place and returned; its parameters, buffers and
    ``state_dict`` stay the same. Input and output shapes are the model's own. Its ``FusedConv2d`` modules
    become :class:`PackedFusedConv2d`, and each ``nn.Sequential`` holding resnet_fused blocks a
    :class:`PreparedSequential`, whose blocks sum their identity shortcut in place.

    ``fuse_relu=False`` (the default) keeps ``torch.relu``'s exact semantics: the ReLU runs as an in-place pass
    after the oneDNN convolution, so a NaN pre-activation stays NaN. ``fuse_relu=True`` hands the ReLU to oneDNN's
    post-op, so the convolution writes the final output in one pass, but a NaN pre-activation then comes out as 0,
    as it does under Inductor's freezing (ONNX Runtime keeps it, as ``torch.relu`` does), and some of oneDNN's
    kernels turn an infinite one into NaN (-inf) or the largest finite value (+inf). Wherever the pre-activation is
    finite, the two agree.

    A conv whose weight is an inference tensor (the model was built or converted under ``torch.inference_mode``)
    cannot be packed safely and keeps the ordinary op; a warning names such convs.

    Raises:
        ValueError: ``model`` is in training mode, or holds no FusedConv2d.
        TypeError: ``fuse_relu`` is not a bool.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize_for_inference: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(fuse_relu, bool):
        raise TypeError(f"optimize_for_inference: fuse_relu: expected a bool, got {type(fuse_relu).__name__}")
    if model.training:
        raise ValueError("optimize_for_inference: expected a model in eval mode (call model.eval()), got training=True")
    found, unpackable, subclassed = 0, [], []
    for name, m in model.named_modules():
        if type(m) is FusedConv2d:
            m.__class__ = PackedFusedConv2d
        elif isinstance(m, FusedConv2d) and not isinstance(m, PackedFusedConv2d):
            subclassed.append(f"{name or '<model>'} ({type(m).__name__})")
        if type(m) is nn.Sequential and any(type(child) in _BLOCKS for child in m):
            m.__class__ = PreparedSequential
        if isinstance(m, PackedFusedConv2d):
            m._drop_packs()
            m._fuse_relu = fuse_relu
            found += 1
            if isinstance(m.weight, Tensor) and m.weight.is_inference():
                unpackable.append(name or "<model>")
    # A subclass may override what a call computes: packing it would skip that.
    kept = f"subclasses of FusedConv2d keep their own class, unpacked: {', '.join(subclassed[:3])}" + (
        ", ..." if len(subclassed) > 3 else ""
    )
    if not found:
        raise ValueError(
            "optimize_for_inference: expected a model holding resnet_fused.nn.FusedConv2d modules, got none"
            + (f" ({kept})" if subclassed else "; run resnet_fused.convert(model) first")
        )
    if subclassed:
        warnings.warn(f"optimize_for_inference: {len(subclassed)} {kept}", stacklevel=2)
    if unpackable:
        warnings.warn(
            f"optimize_for_inference: {len(unpackable)} of {found} fused convs have a weight made under "
            f"torch.inference_mode ({', '.join(unpackable[:3])}{', ...' if len(unpackable) > 3 else ''}): an inference "
            "tensor has no version counter to tell a changed weight by, so these run the ordinary op, unpacked (and "
            "fuse_relu does not apply to them). Build and convert the model outside inference_mode.",
            stacklevel=2,
        )
    return model
