"""Swap torchvision ResNet blocks (and stems) inside any model for fused ones, keeping weights.

    model, report = resnet_fused.convert(torchvision.models.resnet50().eval())
    print(report)

What happens to each norm after a conv depends on what it is at conversion time:

- ``nn.BatchNorm2d`` in eval mode: folded into the conv's weight and bias (the norm becomes
  ``nn.Identity``); the converted model is BN-free from then on, also if trained later. But where the
  norm's weight (gamma) trains and the conv's weight is frozen (fine-tuning only the norms), folding would
  freeze gamma: the BatchNorm is kept, folded into the fused conv on each call, and listed in
  ``report.unfused``.
- ``torchvision.ops.FrozenBatchNorm2d`` (detection backbones): kept as the conv's frozen per-channel
  scale/shift epilogue (:meth:`FusedConv2d.set_scale_shift`); the conv weights stay trainable.
- ``nn.BatchNorm2d`` in train mode: cannot be folded (it normalises with batch statistics). The
  block is still swapped, keeping the BatchNorm module, which runs unfused between the conv and the
  residual add (and folds on the fly once the model is put in eval mode). Such blocks are listed in
  ``report.unfused`` and a warning names them. ``freeze_bn=True`` instead freezes them from their
  running statistics into a scale/shift epilogue, like FrozenBatchNorm2d.
- any other norm (GroupNorm, ...), or a norm with hooks, a forward or extra state set on the instance: kept and
  run unfused, listed in ``report.unfused``.

Hooks are never dropped (forward, backward or state-dict hooks), nor a forward set on an instance
(``m.forward = ...``), nor a parameter, buffer or child its class does not make: a block, conv or stem module with
any of them, or a stem ReLU subclass with its own forward, keeps its block or stem as it was (``report.kept``, with
a warning); a block's ``relu`` and its kept norms stay the same module objects.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .backends import check_name
from .contract import pair
from .nn import (
    _BN_FORWARDS,
    BasicBlock,
    Bottleneck,
    FusedConv2d,
    _plain_identity,
    _unseen,
    check_residual,
    norm_scale_shift,
)

__all__ = ["ConversionReport", "convert"]


@dataclass
class ConversionReport:
    """What :func:`convert` did, by qualified module name (``""`` is the model itself).

    Attributes:
        folded: blocks and stems whose norms were all folded into conv weight and bias (or were
            ``nn.Identity``).
        scale_shift: blocks and stems with at least one norm kept as a frozen scale/shift epilogue
            (FrozenBatchNorm2d, or BatchNorm2d with ``freeze_bn=True``); the others are folded.
        unfused: blocks and stems with a norm left as a module (BatchNorm2d in train mode, BatchNorm2d whose weight
            trains under a frozen conv, other norms, a norm with hooks, a forward or extra state set on the instance);
            their convs still run through the fused op. Unfused stems are not swapped.
        kept: blocks and stems left as they were because a module convert would replace has hooks, a forward or
            extra state (a parameter, buffer or child its class does not make) set on the instance (the block
            itself, one of its convs, a stem's conv, norm or ReLU): they would be dropped, or see other tensors.
    """

    folded: list[str] = field(default_factory=list)
    scale_shift: list[str] = field(default_factory=list)
    unfused: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"ConversionReport: {len(self.folded)} folded, {len(self.scale_shift)} scale/shift, "
            f"{len(self.unfused)} with unfused norms, {len(self.kept)} kept for their hooks, forwards or state"
        ]
        for title, names in (
            ("folded", self.folded),
            ("scale/shift", self.scale_shift),
            ("unfused norm", self.unfused),
            ("kept (hooks, forwards or state)", self.kept),
        ):
            if names:
                lines.append(f"  {title}: {', '.join(n or '<model>' for n in names)}")
        return "\n".join(lines)


def _tv():
    try:
        import torchvision.models._utils as tv_utils
        import torchvision.models.resnet as tv_resnet
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("resnet_fused.convert needs torchvision, which is not installed") from e
    return tv_resnet, tv_utils


def _batchnorm_scale_shift(norm: nn.Module, where: str = "a BatchNorm") -> tuple[Tensor, Tensor] | None:
    """(scale, shift) of a BatchNorm from its running statistics, whatever its mode; None for a subclass with its own
    forward (see ``norm_scale_shift``). ``where`` names the norm in the error."""
    if "forward" in norm.__dict__ or type(norm).forward not in _BN_FORWARDS:
        return None  # its own forward: kept as a module, whatever its statistics
    if norm.running_var is None:
        raise ValueError(
            f"convert: freeze_bn=True needs running statistics, but {where} ({norm}) has track_running_stats=False"
        )
    was_training = norm.training
    norm.eval()
    try:
        affine = norm_scale_shift(norm)
    finally:
        norm.train(was_training)
    return affine


# What each module convert replaces is made of; anything else on it (an extra parameter, buffer or child), or a
# state-dict hook, would be dropped with it.
_CONV_OWN = frozenset({"weight", "bias"})
_NORM_OWN = frozenset({"weight", "bias", "running_mean", "running_var", "num_batches_tracked"})
_BLOCK_OWN = frozenset({"conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "relu", "downsample"})
_SHORTCUT_OWN = frozenset({"0", "1"})
_STATE_DICT_HOOKS = ("_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")  # fmt: skip


def _kept_as_is(m: nn.Module, own: frozenset[str]) -> bool:
    """Whether replacing ``m`` would drop something set on the instance: hooks (forward, backward or state-dict), a
    forward, or a parameter, buffer or child other than ``own``."""
    if not _unseen(m) or any(getattr(m, table, None) for table in _STATE_DICT_HOOKS):
        return True
    return not {*m._parameters, *m._buffers, *m._modules} <= own


def _fuse_conv_norm(
    conv: nn.Conv2d, norm: nn.Module, *, relu: bool, freeze_bn: bool, backend: str
) -> tuple[FusedConv2d, nn.Module, str]:
    """``(fused conv, norm to keep or nn.Identity, 'folded' | 'scale_shift' | 'unfused')``."""
    fused = FusedConv2d.from_conv2d(conv, relu=relu, backend=backend)
    if _plain_identity(norm) and not _kept_as_is(norm, _NORM_OWN):  # a BN-free block: nothing to fold
        return fused, norm, "folded"
    if _kept_as_is(norm, _NORM_OWN):  # a module the fused conv calls: its hooks, forward and state see what they saw
        return fused, norm, "unfused"
    is_bn = isinstance(norm, (nn.BatchNorm2d, nn.SyncBatchNorm))
    if is_bn and not (freeze_bn and norm.training) and _scale_trains_alone(conv, norm):
        # Folded, gamma would become part of a frozen weight, and stop training. Kept, the fused conv folds it on
        # each call (into the weight where gamma needs its gradient), as for any eval-mode BatchNorm module.
        return fused, norm, "unfused"
    if is_bn and norm.training and freeze_bn:
        fold_into_weight, affine = False, _batchnorm_scale_shift(norm)
    else:
        # eval BN with running stats -> fold; FrozenBatchNorm2d -> scale/shift; else None
        fold_into_weight, affine = is_bn, norm_scale_shift(norm)
    if affine is None:
        return fused, norm, "unfused"
    with torch.no_grad():
        scale, shift = affine
        if not fold_into_weight:
            # BN(conv + b) = conv * s + (t + s * b): the conv keeps its own weight and bias.
            fused.set_scale_shift(scale.to(conv.weight.dtype), shift.to(conv.weight.dtype))
            return fused, _identity_for(norm), "scale_shift"
        s64, t64 = scale.double(), shift.double()  # fold in float64, round once
        weight = conv.weight.double() * s64.reshape(-1, 1, 1, 1)
        bias = t64 if conv.bias is None else t64 + s64 * conv.bias.double()
        # Training the folded bias is training the norm's shift (or the conv's bias): trainable where one of them was.
        # The folded weight follows the conv's (a norm scale that trains under a frozen conv is not folded, above).
        shift_trained = any(p is not None and p.requires_grad for p in (getattr(norm, "bias", None), conv.bias))
        fused.weight = nn.Parameter(weight.to(conv.weight.dtype), conv.weight.requires_grad)
        fused.bias = nn.Parameter(bias.to(conv.weight.dtype), shift_trained)
    return fused, _identity_for(norm), "folded"


def _scale_trains_alone(conv: nn.Conv2d, norm: nn.Module) -> bool:
    """Whether ``norm``'s affine weight (gamma) trains while ``conv``'s weight is frozen: folding would freeze it."""
    gamma = getattr(norm, "weight", None)
    return isinstance(gamma, Tensor) and gamma.requires_grad and not conv.weight.requires_grad


def _hook_dicts(m: nn.Module) -> tuple[dict, ...]:
    """The module's own forward and backward hook tables (those ``_has_hooks`` reads)."""
    return m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks


def _identity_for(replaced: nn.Module) -> nn.Identity:
    """An ``nn.Identity`` standing where ``replaced`` was, in its train/eval mode."""
    identity = nn.Identity()
    identity.training = replaced.training
    return identity


def _merge_status(statuses: list[str]) -> str:
    for status in ("unfused", "scale_shift"):
        if status in statuses:
            return status
    return "folded"


def _check_block(name: str, block: nn.Module) -> tuple[type, list[str], list[nn.Conv2d]]:
    """``(fused block class, layer suffixes, convs)`` of a torchvision block convert can swap; else the error."""
    tv_resnet, _ = _tv()
    kind = type(block)
    base = tv_resnet.BasicBlock if isinstance(block, tv_resnet.BasicBlock) else tv_resnet.Bottleneck
    if kind.forward is not base.forward:
        raise TypeError(
            f"convert: {name or '<model>'} is a {kind.__name__}, a subclass of torchvision's "
            f"{base.__name__} with its own forward; convert cannot know what it computes"
        )
    if type(getattr(block, "relu", None)) is not nn.ReLU:
        raise TypeError(
            f"convert: {name or '<model>'}.relu: expected nn.ReLU (the fused blocks apply ReLU), got "
            f"{type(getattr(block, 'relu', None)).__name__}; convert cannot keep another activation"
        )
    ours = BasicBlock if base is tv_resnet.BasicBlock else Bottleneck
    layers = ["1", "2"] if ours is BasicBlock else ["1", "2", "3"]
    convs = [getattr(block, "conv" + i) for i in layers]
    for i, conv in zip(layers, convs, strict=True):
        if type(conv) is not nn.Conv2d:
            where = f"{name}.conv{i}" if name else f"conv{i}"
            raise TypeError(f"convert: {where}: expected an nn.Conv2d, got {type(conv).__name__}")
    in_channels, out_channels = convs[0].in_channels, convs[-1].out_channels
    # An int where set after construction (a "last stride 1" edit), as nn.Conv2d's forward takes it.
    prefix = f"{name}." if name else ""
    strides = [pair(c.stride, f"convert: {prefix}conv{i}.stride", 1) for i, c in zip(layers, convs, strict=True)]
    stride = tuple(math.prod(s[i] for s in strides) for i in range(2))
    check_residual(f"convert: {name or '<model>'}", in_channels, out_channels, stride, block.downsample)
    return ours, layers, convs


def _fusable_shortcut(block: nn.Module) -> bool:
    """Whether the block's ``downsample`` is the ``Sequential(conv, norm)`` projection convert fuses."""
    ds = block.downsample
    return (
        isinstance(ds, nn.Sequential)
        and type(ds).forward is nn.Sequential.forward  # a subclass may compute anything
        and len(ds) == 2
        and type(ds[0]) is nn.Conv2d
    )


def _block_seen(block: nn.Module) -> bool:
    """Whether a module that swapping ``block`` replaces has hooks, a forward or state set on the instance (see
    _kept_as_is): the block, a conv, or the projection shortcut and its conv. (Its ReLU is kept as it is, and such a
    norm stays a module.)"""
    layers = [(block, _BLOCK_OWN)]
    layers += [(m, _CONV_OWN) for attr, m in block.named_children() if attr.startswith("conv")]
    if _fusable_shortcut(block):
        layers += [(block.downsample, _SHORTCUT_OWN), (block.downsample[0], _CONV_OWN)]
    return any(_kept_as_is(m, own) for m, own in layers)


def _norms_to_fuse(module: nn.Module) -> list[nn.Module]:
    """The norms converting a block or a stem parent would fold or freeze (those with hooks or a forward set on the
    instance stay modules)."""
    tv_resnet, _ = _tv()
    if isinstance(module, (tv_resnet.BasicBlock, tv_resnet.Bottleneck)):
        if _block_seen(module):
            return []
        norms = [getattr(module, f"bn{i}") for i in "123" if hasattr(module, f"bn{i}")]
        if _fusable_shortcut(module):
            norms.append(module.downsample[1])
    else:
        parts = _stem_parts(module)
        if parts is None or _stem_seen(parts):
            return []
        norms = [parts[1]]
    return [norm for norm in norms if not _kept_as_is(norm, _NORM_OWN)]


def _stem_parts(parent: nn.Module) -> tuple[nn.Conv2d, nn.Module, nn.Module] | None:
    """``(conv1, bn1, relu)`` of a stem convert may fuse, or None: the parent must compute ``relu(bn1(conv1(x)))``
    with torchvision's own forward, and an IntermediateLayerGetter must not return one of them."""
    tv_resnet, tv_utils = _tv()
    own = (
        type(parent).forward is not tv_resnet.ResNet.forward
        or type(parent)._forward_impl is not tv_resnet.ResNet._forward_impl
        if isinstance(parent, tv_resnet.ResNet)
        else type(parent).forward is not tv_utils.IntermediateLayerGetter.forward
    )
    if own or "forward" in parent.__dict__ or "_forward_impl" in parent.__dict__:
        return None  # a subclass with its own forward, or one set on it: convert cannot know how it uses the stem
    if isinstance(parent, tv_utils.IntermediateLayerGetter):
        if {"conv1", "bn1", "relu"} & set(parent.return_layers):
            return None  # the stem's intermediate outputs are requested: keep them
        names = list(parent._modules)
        if "conv1" not in names or names[names.index("conv1") : names.index("conv1") + 3] != ["conv1", "bn1", "relu"]:
            return None  # it runs its children in order: only conv1, bn1, relu in a row are relu(bn1(conv1(x)))
    conv, norm, relu = (getattr(parent, a, None) for a in ("conv1", "bn1", "relu"))
    if type(conv) is not nn.Conv2d or not isinstance(relu, nn.ReLU) or norm is None:
        return None
    return conv, norm, relu


def _stem_seen(parts: tuple[nn.Conv2d, nn.Module, nn.Module]) -> bool:
    """Whether a stem part has hooks, a forward or state set on the instance (see _kept_as_is), or its ReLU a forward
    of its own (a subclass): the stem is then kept as it is."""
    conv, norm, relu = parts
    own = ((conv, _CONV_OWN), (norm, _NORM_OWN), (relu, frozenset()))
    return any(_kept_as_is(m, o) for m, o in own) or type(relu).forward is not nn.ReLU.forward


def _convert_block(name: str, block: nn.Module, *, freeze_bn: bool, backend: str) -> tuple[nn.Module, str]:
    ours, layers, convs = _check_block(name, block)
    new = ours.__new__(ours)
    nn.Module.__init__(new)
    statuses = []
    for i, conv in zip(layers, convs, strict=True):
        fused, norm, status = _fuse_conv_norm(
            conv, getattr(block, "bn" + i), relu=False, freeze_bn=freeze_bn, backend=backend
        )
        setattr(new, "conv" + i, fused)
        setattr(new, "bn" + i, norm)
        statuses.append(status)
    new.relu = block.relu  # kept, hooks and all: a hooked ReLU is called where torchvision calls it
    ds = block.downsample
    if _fusable_shortcut(block):
        fused, norm, status = _fuse_conv_norm(ds[0], ds[1], relu=False, freeze_bn=freeze_bn, backend=backend)
        ds = nn.Sequential(fused, norm)  # a new container: the original may be shared with a block left as it was
        ds.training = block.downsample.training
        statuses.append(status)
    new.downsample = ds  # fused above, or none, or one convert does not know: kept and run as it is
    # The block's own child order (torchvision's BasicBlock has relu after bn1), as print and named_modules show it.
    new._modules = {k: new._modules[k] for k in (*block._modules, *new._modules) if k in new._modules}
    new.stride = block.stride
    # Only the block's own mode: every module inside keeps its own (a BatchNorm put in eval mode in a model that
    # trains stays in eval mode).
    new.training = block.training
    return new, _merge_status(statuses)


def _check_plain_weights(model: nn.Module, tv_resnet, tv_utils) -> None:
    """Refuse the convs convert would replace when their weight is computed (pruning, weight norm, a
    parametrization): a fused conv takes a Parameter, and the computation would be lost."""
    blocks = (tv_resnet.BasicBlock, tv_resnet.Bottleneck)
    for name, m in model.named_modules():
        if isinstance(m, blocks):
            convs = [f"conv{i}" for i in (1, 2, 3) if hasattr(m, f"conv{i}")]
            if _fusable_shortcut(m):
                convs.append("downsample.0")  # any other shortcut is kept as it is
        elif isinstance(m, (tv_resnet.ResNet, tv_utils.IntermediateLayerGetter)):
            if _stem_parts(m) is None:  # the stem, where _convert_stem would fuse it
                continue
            convs = ["conv1"]
        else:
            continue
        for attr in convs:
            conv = m.get_submodule(attr)
            if isinstance(conv, nn.Conv2d) and (
                parametrize.is_parametrized(conv) or not isinstance(conv.weight, nn.Parameter)
            ):
                where = f"{name}.{attr}" if name else attr
                raise TypeError(
                    f"convert: {where}.weight: expected an nn.Parameter, got a computed weight (pruning, weight norm "
                    "or a parametrization); remove it (torch.nn.utils.prune.remove, "
                    "torch.nn.utils.parametrize.remove_parametrizations), convert, then apply it to the fused convs"
                )


def _convert_stem(name: str, parent: nn.Module, *, freeze_bn: bool, backend: str) -> str | None:
    """Fuse ``parent.conv1 -> bn1 -> relu`` in place; returns the status, "kept" (hooks or a forward set on a part),
    or None if no stem."""
    parts = _stem_parts(parent)
    if parts is None:
        return None
    conv, norm, relu = parts
    if _stem_seen(parts):
        return "kept"
    fused, kept_norm, status = _fuse_conv_norm(conv, norm, relu=True, freeze_bn=freeze_bn, backend=backend)
    if status == "unfused":
        return status  # conv -> BN(batch stats) -> relu: nothing to fuse, leave the stem alone
    parent.conv1, parent.bn1, parent.relu = fused, kept_norm, _identity_for(relu)
    return status


def convert(
    model: nn.Module, inplace: bool = False, freeze_bn: bool = False, backend: str = "auto"
) -> tuple[nn.Module, ConversionReport]:
    """Swap torchvision ``BasicBlock``/``Bottleneck`` blocks and ResNet stems for fused ones.

    Works on any model containing such blocks: a ``torchvision.models.ResNet`` (resnet18 ...
    resnet152, wide_resnet*, resnext*), a detection backbone (``IntermediateLayerGetter``), a
    ``Sequential`` of blocks, or a block itself. Weights are kept; the module docstring says what
    happens to each kind of norm. The stem (``conv1 -> bn1 -> relu`` of a ResNet or
    IntermediateLayerGetter) becomes one fused conv+bias+relu with ``bn1`` and ``relu`` replaced by
    ``nn.Identity``; a ResNet with its own ``forward`` (a subclass's, or one set on the instance) keeps its stem. Other modules (maxpool, fc, FPN,
    ...) are untouched, and every module keeps its train/eval mode. A block that appears in several places becomes
    one fused block in all of them.

    Args:
        model: the model; left unmodified unless ``inplace`` (and, when convert raises, left as it was).
        inplace: convert ``model`` itself (reusing its Parameter objects where weights are not
            folded) instead of a deep copy. A block passed as ``model`` cannot become another class
            in place: use the returned module.
        freeze_bn: freeze train-mode BatchNorm2d from its running statistics into a scale/shift
            epilogue instead of leaving it unfused.
        backend: the op backend every new :class:`FusedConv2d` uses (``"auto"``, ``"cpu"``, ...).

    Returns:
        ``(converted model, ConversionReport)``.

    Raises:
        TypeError: ``model`` is not a plain ``nn.Module`` (scripted, compiled or DDP-wrapped
            models: convert before that), or contains a block subclass with its own forward, a block
            whose ``relu`` is not an ``nn.ReLU``, or a conv to replace whose weight is computed (pruning,
            weight norm, a parametrization).
        ValueError: no torchvision ResNet block or stem was found, or a block without
            ``downsample`` changes shape so its residual add cannot work.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected an nn.Module, got {type(model).__name__}")
    for arg, value in (("inplace", inplace), ("freeze_bn", freeze_bn)):
        if not isinstance(value, bool):  # a truthy string from a config would change the caller's model
            raise TypeError(f"convert: {arg}: expected a bool, got {value!r}")
    check_name(backend)
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("convert: cannot convert a scripted model; convert the eager model first")
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise TypeError("convert: cannot convert a torch.compile'd model; convert, then compile")
    if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        raise TypeError(
            "convert: cannot convert a model wrapped in DistributedDataParallel/DataParallel; "
            "convert model.module, then wrap it"
        )
    tv_resnet, tv_utils = _tv()
    _check_plain_weights(model, tv_resnet, tv_utils)
    if not inplace:
        # Hooks are the caller's objects (a callable with state): the copy calls the same ones. But a method of one of
        # the model's own modules is copied with it, as deepcopy does, so that it works on the copy's module.
        own = {id(m) for m in model.modules()}
        hooks = (h for m in model.modules() for d in _hook_dicts(m) for h in d.values())
        model = copy.deepcopy(model, {id(h): h for h in hooks if id(getattr(h, "__self__", None)) not in own})
    report = ConversionReport()

    def record(name: str, status: str) -> None:
        lists = {"folded": report.folded, "scale_shift": report.scale_shift, "unfused": report.unfused}
        lists.get(status, report.kept).append(name)

    blocks = (tv_resnet.BasicBlock, tv_resnet.Bottleneck)
    stem_parents = (tv_resnet.ResNet, tv_utils.IntermediateLayerGetter)
    # Collect first: the module tree must not change while it is being walked. Every place a module sits, so that a
    # block shared by two parents becomes one fused block in both.
    found = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, blocks + stem_parents)]
    # Check every block before changing anything: a refused model is left as it was (inplace=True).
    paths = {id(m): n for n, m in reversed(list(model.named_modules(remove_duplicate=False)))}  # first path wins
    for name, module in found:
        if isinstance(module, blocks):
            _check_block(name, module)
        if freeze_bn:
            for norm in _norms_to_fuse(module):
                if isinstance(norm, (nn.BatchNorm2d, nn.SyncBatchNorm)) and norm.training:
                    # raises where there are no running statistics to freeze
                    _batchnorm_scale_shift(norm, paths.get(id(norm), "a BatchNorm"))
    done: dict[int, tuple[nn.Module, str]] = {}  # id(original) -> (its replacement, status)
    for name, module in found:
        if id(module) in done:
            new, status = done[id(module)]
        elif isinstance(module, stem_parents):
            status = _convert_stem(name, module, freeze_bn=freeze_bn, backend=backend)
            new = module  # changed in place
        elif _block_seen(module):
            new, status = module, "kept"
        else:
            new, status = _convert_block(name, module, freeze_bn=freeze_bn, backend=backend)
        done[id(module)] = new, status
        if status is not None:
            stem = isinstance(module, stem_parents)
            record((f"{name}.conv1" if name else "conv1") if stem else name, status)
        if new is module:
            continue
        if not name:
            model = new
        else:
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, new)
    if not (report.folded or report.scale_shift or report.unfused or report.kept):
        if any(isinstance(m, (FusedConv2d, BasicBlock, Bottleneck)) for m in model.modules()):
            raise ValueError(
                f"convert: found no torchvision ResNet block (BasicBlock/Bottleneck) or stem in "
                f"{type(model).__name__}, only resnet_fused modules (converted already, or built from "
                f"resnet_fused.nn): nothing to convert"
            )
        raise ValueError(
            f"convert: found no torchvision ResNet block (BasicBlock/Bottleneck) or stem in "
            f"{type(model).__name__}; build custom models from resnet_fused.nn modules instead"
        )
    if report.unfused:
        warnings.warn(
            f"convert: norms left unfused (BatchNorm in train mode or without running statistics, BatchNorm whose "
            f"weight trains under a frozen conv, other norms, norms with hooks, forwards or extra state set on the "
            f"instance) in {', '.join(n or '<model>' for n in report.unfused)}; to fold a BatchNorm that "
            f"has running statistics, call model.eval() before convert, or pass freeze_bn=True to freeze it (one "
            f"whose weight trains under a frozen conv: freeze that weight or train the conv)",
            stacklevel=2,
        )
    if report.kept:
        warnings.warn(
            f"convert: kept as they were, for the hooks (or forward methods, or parameters, buffers or children their "
            f"class does not make, set on an instance) on modules convert would replace: "
            f"{', '.join(n or '<model>' for n in report.kept)}; remove them, convert, and set them on the converted "
            f"model's modules to fuse these too",
            stacklevel=2,
        )
    return model, report
