"""Drop-in modules over the fused op ``conv_bias_add_relu``.

- :class:`FusedConv2d` is an ``nn.Conv2d`` (same constructor, parameters and ``state_dict``) whose
  ``forward(input, residual=None, norm=None, donate_residual=False, relu=None)`` computes
  ``act(conv(input) + bias + residual)`` in one fused op (``act(norm(conv(input)) + residual)`` with ``norm``).
- :class:`BasicBlock` and :class:`Bottleneck` take torchvision's constructors with the same defaults,
  so with the same arguments they have torchvision's architecture, parameters and ``state_dict``
  (``norm_layer=None`` means ``nn.BatchNorm2d``) and torchvision checkpoints load with
  ``load_state_dict(strict=True)``. ``norm_layer=nn.Identity`` gives BN-free blocks whose convs
  carry biases: ``a[l+2] = relu(W2 · a[l+1] + b2 + a[l])`` (Fixup/SkipInit style).
- :class:`SkipBlock` (skip over 1, 2 or 3 layers) and :class:`PreActBlock` (pre-activation, linear
  skip path) show how other residual shapes are built from :class:`FusedConv2d`.

How a conv and the norm after it run (``conv(input, residual=residual, norm=norm)``, :meth:`FusedConv2d.forward`):

- no norm: the conv's own bias (and frozen scale/shift, if set) in the fused epilogue;
- ``torchvision.ops.FrozenBatchNorm2d``, or ``nn.BatchNorm2d`` in eval mode: folded on the fly
  into the epilogue as a per-channel scale and shift. When that scale may be differentiated (eval-mode
  BN with trainable gamma under grad mode, forward-mode AD or a ``torch.func`` transform, or recorded by
  ``torch.jit.trace`` or ``torch.export`` without grad: the program may run under grad) it is folded into the
  weight instead, so gamma gets its derivative;
- anything else (BatchNorm in train mode, GroupNorm, ...), a norm with hooks, or any norm while
  ``torch.fx`` traces (so the graph reads its mode and statistics when it runs): the conv runs fused
  without activation, then the norm (called as a module), the residual add and the ReLU run as
  ordinary PyTorch ops.

Convs are called as modules, so their hooks run (``torch.nn.utils.prune``, weight norm); a conv's
forward hooks see its fused output.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable
from typing import Literal, NoReturn

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module_globals  # the global hook registries

from resnet_fused import contract
from resnet_fused.backends import check_name
from resnet_fused.ops import conv_bias_add_relu

try:
    from torchvision.ops import FrozenBatchNorm2d as _FrozenBatchNorm2d
except ImportError:  # torchvision is optional; without it no FrozenBatchNorm2d can exist
    _FrozenBatchNorm2d = None

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "FusedConv2d",
    "PreActBlock",
    "SkipBlock",
    "conv_norm",
    "norm_scale_shift",
    "projection",
    "set_backend",
    "zero_init_residual_",
]

NormLayer = Callable[[int], nn.Module]
# How _fused_conv treats a scale: fold it into the weight never, where it needs its derivative, or always.
Fold = Literal["never", "trainable", "always"]


class FusedConv2d(nn.Conv2d):
    """``nn.Conv2d`` computing ``act(conv(x) * scale + shift + scale * bias + residual)`` in one op.

    The constructor is ``nn.Conv2d``'s plus keyword-only ``relu`` and ``backend``; parameters and
    ``state_dict`` are ``nn.Conv2d``'s. ``act`` is ReLU when ``relu`` is true, else identity.

    ``scale`` and ``shift`` are optional frozen per-channel buffers of shape ``(out_channels,)``,
    ``None`` by default (then ``scale = 1``, ``shift = 0`` and they are not in the ``state_dict``).
    They hold a frozen BatchNorm (``FrozenBatchNorm2d``): ``BN(conv(x) + bias)`` equals
    ``conv(x) * scale + shift + scale * bias``. Set them with :meth:`set_scale_shift`.

    Padding: numbers and ``'valid'`` go to the op as they are; ``'same'`` becomes explicit numbers
    (plus a one-sided zero pad of ``x`` when the total is odd, as ``F.conv2d`` does). Only
    ``padding_mode='zeros'`` is fused into the conv; for ``'reflect'``, ``'replicate'`` and
    ``'circular'`` ``x`` is first padded with ``F.pad`` (one extra copy of ``x``, as ``nn.Conv2d``
    does), and the conv and epilogue still run fused.

    Shapes: ``x`` is ``(N, C_in, H, W)``, or ``(C_in, H, W)`` unbatched; ``residual`` and the output
    ``(N, C_out, H_out, W_out)``, or ``(C_out, H_out, W_out)``.

    Example::

        conv = FusedConv2d(64, 64, 3, padding=1)           # relu(conv(x) + b)
        y = conv(x)
        conv2 = FusedConv2d(64, 64, 3, padding=1)
        z = conv2(y, residual=x)                           # relu(conv(y) + b + x)
    """

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls._conv_forward is not nn.Conv2d._conv_forward:  # nn.Conv2d's extension point (weight standardisation)
            raise TypeError(
                f"{cls.__name__}: FusedConv2d never calls _conv_forward (the fused op computes the conv); expected a "
                "subclass that overrides forward, or a weight changed by a parametrization, got _conv_forward"
            )

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        relu: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device,
            dtype,
        )
        if not isinstance(relu, bool):
            raise TypeError(f"relu: expected a bool, got {relu!r}")
        self.relu = relu
        self.backend = check_name(backend)
        self.register_buffer("scale", None)
        self.register_buffer("shift", None)

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, *, relu: bool, backend: str = "auto") -> FusedConv2d:
        """A FusedConv2d with ``conv``'s hyperparameters that shares its Parameter objects."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_conv2d: expected an nn.Conv2d, got {type(conv).__name__}")
        if not isinstance(conv, FusedConv2d) and (
            type(conv).forward is not nn.Conv2d.forward
            or type(conv)._conv_forward is not nn.Conv2d._conv_forward
            or "forward" in conv.__dict__
        ):
            raise TypeError(
                f"from_conv2d: expected an nn.Conv2d computing a plain conv, got {type(conv).__name__}, whose own "
                "forward or _conv_forward the fused op would not run"
            )
        fused = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            device="meta",  # no allocation: the parameters are replaced right away
            relu=relu,
            backend=backend,
        )
        fused.weight = conv.weight
        fused.bias = conv.bias
        if isinstance(conv, FusedConv2d) and conv.scale is not None:
            fused.set_scale_shift(conv.scale, conv.shift)
        fused.train(conv.training)
        return fused

    def set_scale_shift(self, scale: Tensor | None, shift: Tensor | None) -> None:
        """Set, or with ``(None, None)`` clear, the frozen ``(out_channels,)`` epilogue."""
        if (scale is None) != (shift is None):
            raise ValueError("set_scale_shift: give both scale and shift, or neither")
        if scale is not None:
            w = self.weight
            for name, t in (("scale", scale), ("shift", shift)):
                if not isinstance(t, Tensor):
                    raise TypeError(f"set_scale_shift: {name}: expected a Tensor, got {type(t).__name__}")
                if t.dtype != w.dtype:
                    raise TypeError(f"set_scale_shift: {name}: expected dtype {w.dtype} (the weight's), got {t.dtype}")
                if t.device != w.device:
                    raise ValueError(
                        f"set_scale_shift: {name}: expected device {w.device} (the weight's), got {t.device}"
                    )
                if t.shape != (self.out_channels,):
                    raise ValueError(
                        f"set_scale_shift: {name} must have shape ({self.out_channels},), got {tuple(t.shape)}"
                    )
            scale, shift = scale.detach().clone(), shift.detach().clone()
        self.scale = scale
        self.shift = shift

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        # Buffers registered as None are skipped by load_state_dict; materialise them so that a
        # converted model's state_dict (which has scale/shift) loads into a fresh FusedConv2d.
        if self.scale is None and prefix + "scale" in state_dict:
            # The identity map until loaded: a partial (strict=False) load of scale alone leaves a defined shift.
            opts = {"device": self.weight.device, "dtype": self.weight.dtype}
            self.scale, self.shift = torch.ones(self.out_channels, **opts), torch.zeros(self.out_channels, **opts)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __prepare_scriptable__(self) -> NoReturn:
        # torch.jit.script calls this on every module before compiling: refuse here with the way out, rather than
        # with the TorchScript compiler's error about the first Python construct it meets in forward.
        raise TypeError(
            f"torch.jit.script: {type(self).__name__} cannot be scripted (its forward is Python around a custom op); "
            "use torch.jit.trace, torch.export, torch.compile or torch.onnx.export, which record the fused op"
        )

    def extra_repr(self) -> str:
        s = super().extra_repr() + f", relu={self.relu}"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        if self.scale is not None:
            s += ", frozen scale/shift"
        return s

    def scale_shift(self) -> tuple[Tensor | None, Tensor | None]:
        """The per-channel ``(scale, shift)`` applied after the conv: ``conv(x) * scale + shift``.

        This is the frozen scale/shift combined with the conv's bias, as the op's ``scale`` and
        ``bias`` take it; each is ``(out_channels,)`` or ``None`` (absent).
        """
        if self.scale is None:
            return None, self.bias
        if self.bias is None:
            return self.scale, self.shift
        return self.scale, self.shift + self.scale * self.bias

    def _padding_plan(self, weight: Tensor | None = None) -> tuple[list[int] | None, tuple[int, int]]:
        """``(F.pad amounts or None, padding for the op)`` equivalent to ``nn.Conv2d``'s padding; ``weight``: the
        one this call convolves with (default: the Parameter)."""
        if self.padding_mode != "zeros":
            return list(self._reversed_padding_repeated_twice), (0, 0)
        if self.padding == "valid":
            return None, (0, 0)
        if self.padding == "same":
            # From this call's dilation and weight, as F.conv2d reads them: the amounts nn.Conv2d kept at
            # construction go stale when the dilation or the weight's kernel changes later.
            if any(s != 1 for s in contract.pair(self.stride, "stride", 1)):
                raise ValueError(f"padding: expected 'same' only with stride 1, got stride {self.stride}")
            weight = self._parameters.get("weight") if weight is None else weight
            kernel = contract.pair(self.kernel_size, "kernel_size", 1)
            if isinstance(weight, Tensor) and weight.dim() == 4:
                kernel = _kernel_of(weight)
            totals = [d * (k - 1) for d, k in zip(contract.pair(self.dilation, "dilation", 1), kernel, strict=True)]
            lo = [t // 2 for t in totals]
            extra = [0, totals[1] - 2 * lo[1], 0, totals[0] - 2 * lo[0]]  # an odd total's extra pixel goes at the end
            return (extra if any(extra) else None), (lo[0], lo[1])
        if isinstance(self.padding, str):
            raise ValueError(f"padding: expected 'same', 'valid' or numbers, got {self.padding!r}")
        if isinstance(self.padding, int):  # set after construction: F.conv2d, which nn.Conv2d calls, takes it
            return None, (self.padding, self.padding)
        # A 1-tuple stands for both dims, as F.conv2d reads it; any other length is the op's to refuse.
        return None, tuple(self.padding) * 2 if len(self.padding) == 1 else tuple(self.padding)

    def _folded_norm(self, norm: nn.Module) -> tuple[Tensor | None, tuple[Tensor, Tensor]] | None:
        """``(weight or None, (scale, bias))`` for the op: ``norm`` after this conv's ``scale_shift()``, or
        ``None`` where ``norm`` is no per-channel affine map (batch statistics). ``weight`` is ``None`` for the
        Parameter itself, left for the op to read (and the packed path to pack); a computed weight (a
        parametrization: spectral norm's power iteration) is computed here once, as nn.Conv2d computes it."""
        affine = norm_scale_shift(norm)
        if affine is None:
            return None
        # norm(conv * cs + cb) = conv * (s * cs) + (s * cb + t), in the norm's dtype, which may be wider than the
        # conv's (a float32 BatchNorm after bf16 convs, which BatchNorm accepts): rounded once to the conv's.
        s, t = affine
        if isinstance(s, Tensor) and _shape_is_not(s, (self.out_channels,)):  # not an fx Proxy (shape unknown)
            raise ValueError(
                f"norm: expected a per-channel map of out_channels={self.out_channels} channels, got "
                f"{type(norm).__name__} of {s.numel()}"
            )
        scale, shift = self.scale_shift()  # here, in the grad mode the fold is recorded in
        if scale is not None:
            s, t = s * scale.to(s.dtype), t + s * shift.to(s.dtype)
        elif shift is not None:
            t = t + s * shift.to(s.dtype)
        weight = None if "weight" in self._parameters else self.weight
        dtype = (self._parameters["weight"] if weight is None else weight).dtype
        return weight, (s.to(dtype), t.to(dtype))

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
        """``conv_bias_add_relu`` with this conv's geometry; ``weight``/``relu`` default to the module's.

        Unlike :meth:`forward`, ``scale`` and ``bias`` are taken as given (``None`` = absent). The op's
        scale is a constant; with ``fold_trainable_scale``, a scale that requires grad (under grad mode)
        is folded into the weight instead, so it gets its gradient (a norm's gamma, in :meth:`forward`).
        ``donate_residual`` is as in :meth:`forward`; the ordinary op never writes into ``residual``.
        Shapes: ``x`` ``(N, C_in, H, W)`` or ``(C_in, H, W)``; ``residual`` and the result
        ``(N, C_out, H_out, W_out)`` or ``(C_out, H_out, W_out)``.
        """
        return self._call_op(
            x, residual, weight, scale, bias, relu, "trainable" if fold_trainable_scale else "never", donate_residual
        )

    def _call_op(
        self,
        x: Tensor,
        residual: Tensor | None,
        weight: Tensor | None,
        scale: Tensor | None,
        bias: Tensor | None,
        relu: bool | None,
        fold: Fold,
        donate_residual: bool,
    ) -> Tensor:
        """:meth:`conv_bias_add_relu`, with ``fold`` as :func:`_fused_conv` takes it."""
        _check_donate(donate_residual)
        pad, padding = self._padding_plan(weight)
        if pad is not None:
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, pad, mode=mode)
            if _channels_last_by_weight(x, self):  # circular F.pad returns NCHW: as nn.Conv2d, the weight's layout
                x = _channels_last(x)
        return _fused_conv(
            x,
            self.weight if weight is None else weight,
            bias,
            residual,
            scale,
            self.stride,
            padding,
            self.dilation,
            self.groups,
            self.relu if relu is None else relu,
            self.backend,
            fold,
        )

    def forward(
        self,
        input: Tensor,  # nn.Conv2d's name: conv(input=t) works on either
        residual: Tensor | None = None,
        norm: nn.Module | None = None,
        donate_residual: bool = False,  # not keyword-only: the TorchScript ONNX exporter passes every default by position
        relu: bool | None = None,
    ) -> Tensor:
        """``act(conv(input) * scale + bias + residual)``; with ``norm``, ``act(norm(conv(input)) + residual)``.

        ``norm`` (the norm layer after this conv, e.g. a block's ``bn1``) is folded into the epilogue
        where it is a per-channel affine map, else run after the conv (see the module docstring). Called
        as a module, so hooks on it (pruning, weight norm, ``register_forward_hook``) run as for
        ``nn.Conv2d``; its forward hooks see this fused output.

        ``donate_residual=True`` gives ``residual``'s memory to this call, as a block does with its
        projection shortcut's output: prepared inference (:mod:`resnet_fused.inference`) may then sum the
        conv into it in place and return it, saving a pass. Pass it only for a residual that nothing
        reads afterwards; every other path leaves ``residual`` untouched. ``relu`` overrides the module's
        ``relu`` for this call.

        Shapes: ``input`` ``(N, C_in, H, W)`` or unbatched ``(C_in, H, W)``, as ``nn.Conv2d``; ``residual``
        and the result ``(N, C_out, H_out, W_out)`` or ``(C_out, H_out, W_out)``.
        """
        x = input
        if isinstance(x, Tensor) and x.dim() not in (3, 4):  # the op would name 4-D alone
            raise ValueError(
                f"input: expected a 3-D (C, H, W) or 4-D (N, C, H, W) tensor, as nn.Conv2d, got {x.dim()}-D with "
                f"shape {tuple(x.shape)}"
            )
        relu = self.relu if relu is None else relu
        if isinstance(relu, Tensor) and relu.dtype == torch.bool and relu.dim() == 0 and torch.jit.is_tracing():
            # The TorchScript ONNX exporter passes a bool input as a tensor: the trace keeps its value, as `if relu:`
            # does in any module.
            relu = bool(relu)
        # Only True donates: the TorchScript ONNX exporter passes the default as tensor(False), and a truthy typo must
        # not let the conv write into the caller's residual.
        donate_residual = donate_residual is True
        if _channels_last_by_weight(x, self):
            x = _channels_last(x)
        if norm is not None and not isinstance(norm, nn.Module):
            if isinstance(norm, torch.fx.Proxy):  # the root module of symbolic_trace: its defaulted arguments too
                raise TypeError(
                    "norm: expected an nn.Module or None, got an fx Proxy: torch.fx.symbolic_trace of a FusedConv2d "
                    "as the root module traces every forward argument; pass concrete_args={'norm': None, "
                    "'donate_residual': False, 'relu': None}, or trace a module that calls it"
                )
            raise TypeError(f"norm: expected an nn.Module or None, got {type(norm).__name__}")
        if norm is None or (_plain_identity(norm) and _unseen(norm)):
            scale, shift = self.scale_shift()
            return self.conv_bias_add_relu(
                x, residual, scale=scale, bias=shift, relu=relu, donate_residual=donate_residual
            )
        # A norm with hooks of its own is called as a module, so they see what they see in the unfused model. So is
        # every norm while torch.fx traces: a fold would fix its train/eval mode and running statistics in the graph.
        if _has_hooks(norm) or isinstance(x, torch.fx.Proxy):
            affine = None
        else:
            affine = self._folded_norm(norm)
        if affine is None:  # e.g. batch statistics: the norm must see the whole conv output first
            if not isinstance(relu, bool):
                raise TypeError(f"relu: expected a bool, got {relu!r}")
            scale, shift = self.scale_shift()
            y = self.conv_bias_add_relu(x, scale=scale, bias=shift, relu=False)
            if residual is not None and isinstance(y, Tensor) and not isinstance(y, torch.fx.Proxy):
                _check_late_residual(residual, y)  # before the norm runs (and updates its statistics)
            y = norm(y)
            # In place on the norm's output, as torchvision's blocks (`out += identity`, ReLU(inplace=True)): a hook
            # that kept that tensor sees what it sees there.
            if residual is not None:
                y = y.add_(residual)
            return F.relu_(y) if relu else y
        weight, (s, t) = affine
        if _recorded_without_grad(self, norm):
            # The program may run under grad, where gamma needs its gradient, but under no_grad the scale does not
            # require grad to say so: fold it as grad mode would. (torch.jit.trace also checks its trace by tracing
            # again under no_grad: both traces must fold alike.)
            return self._call_op(x, residual, weight, s, t, relu, "always", donate_residual)
        return self.conv_bias_add_relu(
            x,
            residual,
            weight=weight,
            scale=s,
            bias=t,
            relu=relu,
            fold_trainable_scale=True,
            donate_residual=donate_residual,
        )


def _channels_last_by_weight(x: Tensor, conv: nn.Conv2d) -> bool:
    """Whether nn.Conv2d would run this call channels_last though ``x`` is not: ATen's oneDNN and cuDNN convs go
    channels_last when x or the weight reads so (a ``.to(memory_format=torch.channels_last)`` model fed NCHW input),
    while the op follows x alone. Cheapest checks first, the weight last: this runs on every call."""
    cl = torch.channels_last
    if isinstance(x, torch.fx.Proxy) or x.dim() != 4 or contract.functorch_active() or torch.jit.is_tracing():
        return False  # functorch cannot query a batched tensor's layout, nor torch.jit.trace read traced strides
    if x.is_contiguous(memory_format=cl) and not x.is_contiguous():
        return False  # x is channels_last already
    # The parameter itself: reading conv.weight would recompute a parametrized weight (spectral norm's power
    # iteration, say) once more per call; such a conv keeps x's layout.
    w = conv._parameters.get("weight")
    if w is None or w.dim() != 4 or not w.is_contiguous(memory_format=cl):
        return False
    return contract.memory_format(w) == cl and contract.memory_format(x) != cl


def _channels_last(x: Tensor) -> Tensor:
    """``x`` (N, C, H, W) with channels_last strides, copied only where its memory is not in that order. With one
    channel, NCHW memory is in that order too, but ``contiguous`` keeps the NCHW strides, which the layout checks
    read as NCHW (the output would follow): a view with channels_last strides instead, as nn.Conv2d's output has."""
    n, c, h, w = x.shape
    if c == 1 and x.is_contiguous():
        return x.view(n, h, w, 1).permute(0, 3, 1, 2)
    return x.contiguous(memory_format=torch.channels_last)


def _fused_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    residual: Tensor | None,
    scale: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    relu: bool,
    backend: str,
    fold: Fold,
) -> Tensor:
    """The op call of every FusedConv2d. A leaf for ``torch.fx`` (its checks need real tensors), so it also takes
    nn.Conv2d's unbatched ``(C, H, W)`` input and folds the scale into the weight, as the op's scale is a constant:
    ``fold`` ``"trainable"`` folds a scale that needs its gradient (eval-mode BN with trainable gamma under grad mode),
    ``"always"`` any scale, ``"never"`` none."""
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
        if residual is not None:
            _check_unbatched_residual(x, weight, residual, stride, padding, dilation)
            residual = residual.unsqueeze(0)
    if scale is not None and (fold == "always" or (fold == "trainable" and _scale_needs_derivative(scale))):
        if _runs_in_fp16(x, weight):
            y = _conv_then_affine(x, weight, bias, residual, scale, stride, padding, dilation, groups, relu, backend)
            return y.squeeze(0) if unbatched else y
        weight, scale = weight * scale.reshape(-1, 1, 1, 1), None
    y = conv_bias_add_relu(
        x,
        weight,
        bias,
        residual,
        scale=scale,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        relu=relu,
        backend=backend,
    )
    return y.squeeze(0) if unbatched else y


torch.fx.wrap("_fused_conv")


def _recorded_without_grad(conv: FusedConv2d, norm: nn.Module) -> bool:
    """Whether torch.jit.trace or torch.export records this call without grad (no_grad, inference_mode) while
    ``norm`` (or the conv's frozen scale) has a parameter that requires grad. Decided without a grad-mode switch:
    under torch.export one wraps the graph in set_grad_enabled regions, which the ONNX exporter fails to decompose."""
    if torch.is_grad_enabled() or not (torch.jit.is_tracing() or torch.compiler.is_exporting()):
        return False
    return (conv.scale is not None and conv.scale.requires_grad) or any(p.requires_grad for p in norm.parameters())


def _scale_needs_derivative(scale: Tensor) -> bool:
    """Whether a scale may be differentiated, so that it must be folded into the weight (the op's scale is a
    constant): it requires grad under grad mode (or while torch.jit.trace records: the graph may replay under
    grad), it carries a forward-mode tangent, a torch.func transform differentiates, or vmap batches it (an
    ensemble's stacked gamma, whose wrapper hides requires_grad)."""
    if torch.autograd.forward_ad._current_level >= 0 and contract._tangent(scale):
        return True
    if contract.functorch_active() and (
        contract.differentiated_by_transform(scale) or torch._C._functorch.is_batchedtensor(scale)
    ):
        return True
    return scale.requires_grad and (torch.is_grad_enabled() or torch.jit.is_tracing())


def _runs_in_fp16(x: Tensor, weight: Tensor) -> bool:
    """Whether the conv runs in fp16 (its dtype, or autocast's), whose range weight * scale may leave where
    conv(x, weight) * scale stays inside."""
    device = x.device.type
    if device in contract.AUTOCAST_DEVICES and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device) == torch.float16 and x.dtype != torch.float64
    return weight.dtype == torch.float16


def _kernel_of(weight: Tensor) -> list[int]:
    """(R, S) of a (K, C/groups, R, S) weight. Under torch.jit.trace its sizes are constants of the model, so the
    tracer's warning is silenced; only there, as Dynamo cannot trace the warnings filter (fullgraph)."""
    if torch.jit.is_tracing():
        with contract.quiet_tracer():
            return [int(k) for k in weight.shape[2:]]
    return [int(k) for k in weight.shape[2:]]


def _shape_is_not(t: Tensor, shape: tuple[int, ...]) -> bool:
    if torch.jit.is_tracing():
        with contract.quiet_tracer():
            return t.shape != shape
    return t.shape != shape


def _conv_then_affine(x, weight, bias, residual, scale, stride, padding, dilation, groups, relu, backend) -> Tensor:
    """act(conv(x) * scale + bias + residual) with the scale applied after the conv, as differentiable ops: the
    fp16 route of a scale that needs its derivative."""
    # Cast as the op casts under autocast: a block's later convs get an fp16 x with fp32 weights and residual.
    x, weight, bias, residual = contract.autocast_inputs(x, weight, bias, residual)
    contract.check_inputs(x, weight, bias, residual, None, stride, padding, dilation, groups, relu)
    y = conv_bias_add_relu(x, weight, stride=stride, padding=padding, dilation=dilation, groups=groups, relu=False,
                           backend=backend)  # fmt: skip
    z = y * scale.reshape(-1, 1, 1)
    if bias is not None:
        z = z + bias.reshape(-1, 1, 1)
    if residual is not None:
        z = z + residual
    return (F.relu(z) if relu else z).to(y.dtype)


def _check_late_residual(residual: Tensor, y: Tensor) -> None:
    """A residual added after an unfused norm, checked as the fused path checks it: no broadcast, and (outside
    autocast, which casts it there) no type promotion."""
    contract._check_tensor("residual", residual, None, optional=False)
    if residual.shape != y.shape:
        raise ValueError(f"residual: expected the output's shape {tuple(y.shape)}, got {tuple(residual.shape)}")
    if residual.device != y.device:
        raise ValueError(f"residual: expected device {y.device} (the output's), got {residual.device}")
    device = y.device.type
    autocast = device in contract.AUTOCAST_DEVICES and torch.is_autocast_enabled(device)
    if not autocast and residual.dtype != y.dtype:
        raise TypeError(f"residual: expected dtype {y.dtype} (the output's), got {residual.dtype}")


def _check_unbatched_residual(x: Tensor, weight: Tensor, residual: Tensor, stride, padding, dilation) -> None:
    """An unbatched x (here unsqueezed to (1, C, H, W)) takes an unbatched residual of the output's shape."""
    if not isinstance(residual, Tensor) or not isinstance(weight, Tensor) or weight.dim() != 4:
        return  # the op names what is wrong
    want = tuple(contract.conv_output_shape(x.shape, weight.shape, stride, padding, dilation)[1:])
    if tuple(residual.shape) != want:
        raise ValueError(f"residual: expected the output's shape {want} (x is unbatched), got {tuple(residual.shape)}")


def _has_hooks(m: nn.Module) -> bool:
    """Whether ``m`` has hooks of its own. Global module hooks (module trackers, FLOP counters, profilers) do not
    count: they would unfuse every norm of every model while registered."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


# The forwards whose eval mode is y * scale + shift: a subclass overriding forward may compute anything else.
_BN_FORWARDS = (nn.BatchNorm2d.forward, nn.SyncBatchNorm.forward)


def _plain_identity(m: nn.Module | None) -> bool:
    """An ``nn.Identity`` that computes nothing: a subclass with a forward of its own may compute anything."""
    return isinstance(m, nn.Identity) and type(m).forward is nn.Identity.forward and "forward" not in m.__dict__


def norm_scale_shift(norm: nn.Module) -> tuple[Tensor, Tensor] | None:
    """``(scale, shift)``, each ``(C,)``, with ``norm(y) == y * scale + shift``, or ``None``.

    ``None`` when ``norm`` is not a per-channel affine map: BatchNorm in train mode (batch
    statistics), BatchNorm without running statistics, a subclass with its own ``forward``, or any
    other module.
    """
    if "forward" in norm.__dict__:
        return None  # a forward set on the instance: it may compute anything
    if _FrozenBatchNorm2d is not None and isinstance(norm, _FrozenBatchNorm2d):
        if type(norm).forward is not _FrozenBatchNorm2d.forward:
            return None
        scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
        return scale, norm.bias - norm.running_mean * scale
    is_bn = isinstance(norm, (nn.BatchNorm2d, nn.SyncBatchNorm)) and type(norm).forward in _BN_FORWARDS
    if is_bn and not norm.training and norm.running_var is not None:
        scale = torch.rsqrt(norm.running_var + norm.eps)
        if norm.weight is not None:
            scale = norm.weight * scale
        shift = -norm.running_mean * scale
        if norm.bias is not None:
            shift = norm.bias + shift
        return scale, shift
    return None


def conv_norm(conv: FusedConv2d, norm: nn.Module | None, x: Tensor, residual: Tensor | None = None) -> Tensor:
    """``act(norm(conv(x)) + residual)``, fused as far as ``norm`` allows (act: ``conv.relu``):
    ``conv(x, residual=residual, norm=norm)``.

    Shapes: ``x`` ``(N, C_in, H, W)``; ``residual`` and the result ``(N, C_out, H_out, W_out)``.
    """
    return conv(x, residual=residual, norm=norm)


def _conv3x3(
    in_planes: int,
    out_planes: int,
    stride: int = 1,
    groups: int = 1,
    dilation: int = 1,
    *,
    bias: bool,
) -> FusedConv2d:
    return FusedConv2d(in_planes, out_planes, 3, stride, dilation, dilation, groups, bias=bias, relu=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1, *, bias: bool) -> FusedConv2d:
    return FusedConv2d(in_planes, out_planes, 1, stride, bias=bias, relu=False)


def _make_norm(norm_layer: NormLayer | None, channels: int) -> tuple[nn.Module, bool]:
    """``(norm, whether the conv before it needs a bias)``; ``None`` is BatchNorm2d, as in torchvision."""
    norm = (nn.BatchNorm2d if norm_layer is None else norm_layer)(channels)
    # With no norm the conv's bias is the only shift left; a norm with a shift makes it redundant.
    return norm, _plain_identity(norm)


def projection(inplanes: int, out_channels: int, stride: int = 1, norm_layer: NormLayer | None = None) -> nn.Sequential:
    """The shortcut ``norm(W_s · a[l])`` (strided 1x1 conv, no activation) for a shape-changing block.

    torchvision's ``downsample``: ``Sequential(conv1x1, norm_layer(out_channels))`` with keys ``0.weight`` then
    ``1.*``; ``norm_layer=None`` means ``nn.BatchNorm2d``. With ``norm_layer=nn.Identity`` the conv has a bias
    (keys ``0.weight``, ``0.bias``). Shapes: ``(N, inplanes, H, W) -> (N, out_channels, ceil(H / s), ceil(W / s))``.
    """
    norm, bias = _make_norm(norm_layer, out_channels)
    return nn.Sequential(_conv1x1(inplanes, out_channels, stride, bias=bias), norm)


def check_residual(
    block: str, inplanes: int, out_channels: int, stride: int | tuple[int, int], downsample: object
) -> None:
    """Raise ``ValueError`` if, with no shortcut projection, ``x`` cannot be added to the output."""
    strides = contract.pair(stride, f"{block}: stride", 1)  # as nn.Conv2d takes it: (1,) is (1, 1)
    if downsample is None and (inplanes != out_channels or strides != (1, 1)):
        raise ValueError(
            f"{block}: the residual add needs the input ({inplanes} channels, stride 1) to match "
            f"the output ({out_channels} channels, stride {stride}), and downsample is None; pass "
            f"downsample=projection({inplanes}, {out_channels}, {stride}, norm_layer)"
        )


# Norms whose output (or the conv's, when folded) is a new tensor that the norm keeps no reference to.
_FRESH_NORMS = tuple(t for t in (nn.Identity, nn.BatchNorm2d, nn.SyncBatchNorm, _FrozenBatchNorm2d) if t is not None)


# Conv types whose forward returns a new tensor and keeps no reference to it (a subclass may do either):
# resnet_fused.inference adds its PackedFusedConv2d.
_FRESH_CONVS: set[type] = {FusedConv2d}


def _check_donate(donate_residual: object) -> None:
    # A truthy typo would let the conv write into the caller's residual.
    if not isinstance(donate_residual, bool):
        raise TypeError(f"donate_residual: expected a bool, got {donate_residual!r}")


def _plain_relu(act: nn.Module) -> bool:
    """Whether a block's ``relu`` is torchvision's own, unhooked: then the convs apply it in the fused op. Any other
    module (swapped, with hooks of its own or a forward set on it) is called where torchvision calls it."""
    return type(act) is nn.ReLU and _unseen(act)


def _fused_slots(*convs: nn.Module) -> bool:
    """Whether each of a block's conv slots holds a FusedConv2d with no forward set on the instance, whose forward
    (a subclass's own too) takes the block's keywords: the block then fuses around them, passing ``norm``,
    ``residual`` and ``relu``. Anything else there (an nn.Conv2d swapped in, a wrapper, a forward set on the
    instance, a subclass's ``forward(x)``) is called as torchvision's block calls it, with the input alone
    (:func:`_unfused_forward`)."""
    return all(
        isinstance(c, FusedConv2d)
        and "forward" not in c.__dict__
        and (type(c).forward is FusedConv2d.forward or _takes_block_keywords(type(c).forward))
        for c in convs
    )


@functools.cache
def _takes_block_keywords(forward: Callable) -> bool:
    """Whether a FusedConv2d subclass's own forward takes the keywords a block passes."""
    try:
        params = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a C function, say): called with the input alone
        return False
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return True
    names = {p.name for p in params if p.kind is not inspect.Parameter.POSITIONAL_ONLY}
    return {"residual", "norm", "donate_residual", "relu"} <= names


def _unfused_forward(block: nn.Module, x: Tensor, convs: tuple[nn.Module, ...], norms: tuple[nn.Module, ...]) -> Tensor:
    """torchvision's block forward, for a block whose conv slots do not all hold fused convs: each conv, norm and
    ReLU called as a module, the shortcut added in place. A fused conv in it runs as nn.Conv2d (its frozen
    scale/shift kept), asked for no ReLU; anything else computes what it computes (a FusedConv2d called with the
    input alone, inside a wrapper say, applies its own ``relu``)."""
    out = x
    for i, (conv, norm) in enumerate(zip(convs, norms, strict=True)):
        fused = _fused_slots(conv)
        y = conv(out, relu=False) if fused else conv(out)
        out = norm(y)
        if out is y and not fused:
            # The norm (folded into the conv, or none) passed on the output of a conv that may have kept it: the
            # in-place ReLU and add below must not change it (a folded norm made a new tensor in the original).
            out = out.clone()
        if i < len(convs) - 1:
            out = block.relu(out)
    identity = x if block.downsample is None else block.downsample(x)
    out += identity
    return block.relu(out)


def _global_hooks() -> bool:
    """Whether a global forward (pre-)hook is registered: it sees every module's inputs or outputs, and may keep them."""
    return bool(_module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks)


# An input handed to the next block call that receives exactly this tensor (resnet_fused.inference.PreparedSequential
# sets it), per thread, so that concurrent forwards of one model never see each other's. Not a forward argument: the
# call stays an ordinary module call, and torch.fx would trace an argument as a tensor.
_handover = threading.local()


def hand_over(x: Tensor | None) -> None:
    """Give ``x`` to the next BasicBlock/Bottleneck called with exactly ``x`` (``None`` withdraws it)."""
    _handover.tensor = x


def _handed_over(x: Tensor) -> bool:
    """Whether ``x`` was handed to this block call; the hand-over is spent either way."""
    if torch.compiler.is_compiling():  # a compiled block runs the ordinary op, which never writes into its input
        return False
    given = getattr(_handover, "tensor", None)
    _handover.tensor = None
    return given is x


def _unseen(module: nn.Module | None) -> bool:
    """Whether nothing but the module's own forward sees its inputs and output: no hooks, no forward set on the
    instance (a wrapper may keep them)."""
    return module is None or (not _has_hooks(module) and "forward" not in module.__dict__)


def _shortcut(
    block: nn.Module, x: Tensor, first_conv: nn.Module, last_conv: nn.Module, donate_input: bool
) -> tuple[Tensor, bool]:
    """A block's residual for ``last_conv``, and whether the block may donate it (``donate_residual``): a fused
    projection's fresh output, or with ``donate_input`` the block's input itself, that no hook has seen, nor will see
    as an input of ``last_conv``."""
    downsample = block.downsample
    if downsample is None:  # the block's input: the caller's, unless handed over
        return x, (donate_input and all(map(_unseen, (block, first_conv, last_conv))) and not _global_hooks())
    if (
        isinstance(downsample, nn.Sequential)
        and type(downsample).forward is nn.Sequential.forward  # a subclass may compute anything
        and len(downsample) in (1, 2)
        and _fused_slots(downsample[0])
        and not downsample[0].relu  # with its ReLU the Sequential computes norm(relu(conv)), not relu(norm(conv))
        and _unseen(downsample)  # its hooks, or a forward set on it, see what the Sequential computes
    ):
        norm = downsample[1] if len(downsample) == 2 else None
        s = downsample[0](x, norm=norm)
        owned = (
            type(downsample[0]) in _FRESH_CONVS
            and type(norm) in (type(None), *_FRESH_NORMS)
            and all(map(_unseen, (downsample, downsample[0], norm, last_conv)))
            and not _global_hooks()
        )
        return s, owned
    return downsample(x), False  # any other shortcut module, or one with hooks, runs as it is


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock`` fused: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + s(x))``.

    Same constructor, defaults, parameter names and errors as ``torchvision.models.resnet.BasicBlock``
    (``norm_layer=None`` means ``nn.BatchNorm2d``), plus a ValueError at construction where the residual add
    cannot work (the shape changes and ``downsample`` is None), which torchvision raises only in forward.
    ``norm_layer=nn.Identity`` gives the BN-free block: ``bn1``/``bn2`` are ``nn.Identity`` and the convs have
    biases. ``s`` is ``downsample`` (see
    :func:`projection`) or the identity.

    Shapes: ``(N, inplanes, H, W) -> (N, planes, ceil(H / stride), ceil(W / stride))``.
    """

    expansion: int = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        check_residual("BasicBlock", inplanes, planes * self.expansion, stride, downsample)
        bn1, bias1 = _make_norm(norm_layer, planes)
        bn2, bias2 = _make_norm(norm_layer, planes)
        # Registration order is torchvision's, so that state_dict keys come in the same order.
        self.conv1 = _conv3x3(inplanes, planes, stride, bias=bias1)
        self.bn1 = bn1
        # Applied inside the fused convs; swapped or hooked, it is called where torchvision calls it.
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, bias=bias2)
        self.bn2 = bn2
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        # An x handed over (hand_over) is the block's to write into: prepared inference sums into it in place.
        donate_input = _handed_over(x)
        if not _fused_slots(self.conv1, self.conv2):
            return _unfused_forward(self, x, (self.conv1, self.conv2), (self.bn1, self.bn2))
        if not _plain_relu(self.relu):
            act = self.relu
            out = act(self.conv1(x, norm=self.bn1, relu=False))
            residual, _ = _shortcut(self, x, self.conv1, self.conv2, False)
            return act(self.conv2(out, residual=residual, norm=self.bn2, relu=False))
        out = self.conv1(x, norm=self.bn1, relu=True)
        # The shortcut last, as torchvision: autograd then runs its backward first and frees its input gradient
        # before the main branch's backward allocates (a lower training peak).
        residual, owned = _shortcut(self, x, self.conv1, self.conv2, donate_input)
        return self.conv2(out, residual=residual, norm=self.bn2, donate_residual=owned, relu=True)


class Bottleneck(nn.Module):
    """torchvision's ``Bottleneck`` (ResNet v1.5: stride on the 3x3) through the fused op.

    1x1 reduce -> 3x3 (stride, groups, dilation) -> 1x1 expand by 4, each followed by its norm,
    the last one adding the shortcut before the ReLU. Same constructor, defaults and parameter names
    as ``torchvision.models.resnet.Bottleneck`` (``norm_layer=None`` means ``nn.BatchNorm2d``).
    ``norm_layer=nn.Identity`` gives the BN-free block, whose convs have biases.

    Shapes: ``(N, inplanes, H, W) -> (N, planes * 4, ceil(H / stride), ceil(W / stride))``.
    """

    expansion: int = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: NormLayer | None = None,
    ) -> None:
        super().__init__()
        check_residual("Bottleneck", inplanes, planes * self.expansion, stride, downsample)
        width = int(planes * (base_width / 64.0)) * groups
        bn1, bias1 = _make_norm(norm_layer, width)
        bn2, bias2 = _make_norm(norm_layer, width)
        bn3, bias3 = _make_norm(norm_layer, planes * self.expansion)
        self.conv1 = _conv1x1(inplanes, width, bias=bias1)
        self.bn1 = bn1
        self.conv2 = _conv3x3(width, width, stride, groups, dilation, bias=bias2)
        self.bn2 = bn2
        self.conv3 = _conv1x1(width, planes * self.expansion, bias=bias3)
        self.bn3 = bn3
        # Applied inside the fused convs; swapped or hooked, it is called where torchvision calls it.
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        donate_input = _handed_over(x)  # as in BasicBlock.forward
        if not _fused_slots(self.conv1, self.conv2, self.conv3):
            return _unfused_forward(self, x, (self.conv1, self.conv2, self.conv3), (self.bn1, self.bn2, self.bn3))
        if not _plain_relu(self.relu):
            act = self.relu
            out = act(self.conv1(x, norm=self.bn1, relu=False))
            out = act(self.conv2(out, norm=self.bn2, relu=False))
            residual, _ = _shortcut(self, x, self.conv1, self.conv3, False)
            return act(self.conv3(out, residual=residual, norm=self.bn3, relu=False))
        out = self.conv1(x, norm=self.bn1, relu=True)
        out = self.conv2(out, norm=self.bn2, relu=True)
        # The shortcut last, as torchvision: autograd then runs its backward first and frees its input gradient
        # before the main branch's backward allocates (a lower training peak).
        residual, owned = _shortcut(self, x, self.conv1, self.conv3, donate_input)
        return self.conv3(out, residual=residual, norm=self.bn3, donate_residual=owned, relu=True)


class SkipBlock(nn.Module):
    """BN-free block whose shortcut skips ``num_layers`` (1, 2 or 3) convs.

    ``a[l+i] = relu(W_i · a[l+i-1] + b_i)`` for ``i < n``, and
    ``a[l+n] = relu(W_n · a[l+n-1] + b_n + a[l])``: the add and the ReLU ride in the last conv's
    epilogue. Built only from :class:`FusedConv2d`::

        layers = [FusedConv2d(c, c, 3, padding=1) for _ in range(n)]
        a = x
        for conv in layers[:-1]:
            a = conv(a)
        y = layers[-1](a, residual=x)

    Shapes: ``(N, channels, H, W) -> (N, channels, H, W)``.
    """

    def __init__(self, channels: int, num_layers: int = 2, kernel_size: int = 3) -> None:
        super().__init__()
        if isinstance(num_layers, bool) or contract._as_int(num_layers) is None:
            raise TypeError(f"SkipBlock: num_layers: expected an int, got {num_layers!r}")
        if num_layers not in (1, 2, 3):
            raise ValueError(f"SkipBlock: num_layers must be 1, 2 or 3, got {num_layers}")
        self.layers = nn.ModuleList(
            FusedConv2d(channels, channels, kernel_size, padding="same") for _ in range(num_layers)
        )

    def forward(self, x: Tensor) -> Tensor:
        a = x
        for conv in self.layers[:-1]:
            a = conv(a)
        return self.layers[-1](a, residual=x)


class PreActBlock(nn.Module):
    """BN-free pre-activation block (He et al. 2016): ``y = x + W2 · relu(W1 · relu(x) + b1) + b2``.

    The skip path stays linear (no ReLU after the add), so the last conv runs with
    ``relu=False`` and the add in its epilogue; the leading ``relu(x)`` is a separate op because
    the shortcut needs ``x`` before it. Shapes: ``(N, channels, H, W) -> (N, channels, H, W)``.
    """

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv1 = FusedConv2d(channels, channels, kernel_size, padding="same", relu=True)
        self.conv2 = FusedConv2d(channels, channels, kernel_size, padding="same", relu=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(F.relu(x)), residual=x)


def zero_init_residual_(model: nn.Module) -> nn.Module:
    """Zero every :class:`BasicBlock`/:class:`Bottleneck` branch, so each block starts as identity.

    BN blocks: the last norm's weight is zeroed (torchvision's ``zero_init_residual=True``, which
    does not recognise these classes). BN-free blocks: the last conv's weight and bias are zeroed,
    as Fixup does; it still gets gradients, so training starts from the shortcut path alone. A last
    conv carrying a frozen norm (scale/shift) also gets its shift zeroed, which the branch would add.
    A block whose last norm has no weight (BatchNorm with ``affine=False``) is left alone, as torchvision
    leaves it. Returns ``model``.

    Raises:
        TypeError: a BN-free block's last conv slot holds something other than an ``nn.Conv2d`` (a wrapper put
            there), or the layer to zero has a computed weight (pruning, a parametrization); nothing is changed then.
    """
    zero: list[Tensor] = []
    for name, m in model.named_modules():
        if isinstance(m, (BasicBlock, Bottleneck)):
            slot = "conv3" if isinstance(m, Bottleneck) else "conv2"
            conv, norm = getattr(m, slot), getattr(m, "bn" + slot[-1])
            if getattr(norm, "weight", None) is not None:
                # A Parameter, or a buffer (FrozenBatchNorm2d's); else recomputed on every call: zeroing would not last.
                if "weight" not in norm._parameters and "weight" not in norm._buffers:
                    raise TypeError(
                        f"zero_init_residual_: {name}.bn{slot[-1]}.weight: expected an nn.Parameter to zero, got a "
                        "computed weight (a parametrization)"
                    )
                zero.append(norm.weight)
            elif _plain_identity(norm):
                if not isinstance(conv, nn.Conv2d):
                    raise TypeError(
                        f"zero_init_residual_: {name}.{slot}: expected an nn.Conv2d to zero, got {type(conv).__name__}"
                    )
                if "weight" not in conv._parameters:  # recomputed on every call: zeroing it would not last
                    raise TypeError(
                        f"zero_init_residual_: {name}.{slot}.weight: expected an nn.Parameter to zero, got a computed "
                        "weight (pruning, weight norm or a parametrization)"
                    )
                zero += [t for t in (conv.weight, conv.bias, getattr(conv, "shift", None)) if t is not None]
    with torch.no_grad():
        for t in zero:
            t.zero_()
    return model


def set_backend(module: nn.Module, backend: str) -> nn.Module:
    """Set ``backend`` on every :class:`FusedConv2d` inside ``module``; returns ``module``.

    Raises ``ValueError`` naming the allowed backends when ``backend`` is not one of them.
    """
    check_name(backend)
    for m in module.modules():
        if isinstance(m, FusedConv2d):
            m.backend = backend
    return module
