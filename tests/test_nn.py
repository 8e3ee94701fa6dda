"""resnet_fused.nn: FusedConv2d and the residual blocks against plain PyTorch in float64."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision.models.resnet as tv
from helpers import TOL, assert_close
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from resnet_fused.nn import (
    BasicBlock,
    Bottleneck,
    FusedConv2d,
    PreActBlock,
    SkipBlock,
    projection,
    set_backend,
    zero_init_residual_,
)


def randomize_norms_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running stats and affine params, so that folding a norm is actually tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            c = m.running_mean.shape[0]
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                sign = torch.where(torch.rand(c, generator=g) < 0.5, -1.0, 1.0)  # a gamma may be negative
                m.weight.copy_((torch.rand(c, generator=g) + 0.5) * sign)
                m.bias.copy_(torch.rand(c, generator=g) - 0.5)
    return model


def conv_reference(conv: nn.Conv2d, x: torch.Tensor, residual=None, relu=True) -> torch.Tensor:
    """nn.Conv2d's own forward on a float64 ``conv``, then the add and the activation."""
    y = nn.Conv2d.forward(conv, x.double())
    if residual is not None:
        y = y + residual.double()
    return F.relu(y) if relu else y


# ---- FusedConv2d ----

CONV_CASES = [
    # (in, out, kernel, stride, padding, dilation, groups, bias, padding_mode)
    (3, 5, 3, 1, 1, 1, 1, True, "zeros"),
    (4, 6, (3, 1), (2, 1), (1, 0), 1, 2, False, "zeros"),
    (4, 4, 3, 1, "same", 2, 4, True, "zeros"),
    (3, 5, 4, 1, "same", 1, 1, True, "zeros"),  # even kernel: 'same' pads one more at the end
    (3, 5, (2, 5), 1, "same", (3, 1), 1, False, "zeros"),
    (3, 5, 3, 2, "valid", 1, 1, True, "zeros"),
    (3, 5, 3, 1, 1, 1, 1, True, "reflect"),
    (3, 5, 3, 2, (2, 1), 1, 1, True, "replicate"),
    (3, 5, 3, 1, "same", 1, 1, True, "circular"),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # the reference's
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_conv2d_matches_conv2d(case, relu, with_residual):
    torch.manual_seed(0)
    cin, cout, k, stride, padding, dilation, groups, bias, mode = case
    conv = FusedConv2d(cin, cout, k, stride, padding, dilation, groups, bias, mode, relu=relu)
    x = torch.randn(2, cin, 9, 10)
    expected_shape = nn.Conv2d.forward(conv, x).shape
    residual = torch.randn(expected_shape) if with_residual else None

    y = conv(x, residual)

    ref = copy.deepcopy(conv).double()
    ref_y = conv_reference(ref, x, residual, relu)
    assert_close(y, ref_y, torch.float32, "y", reductions=cin * 20)
    grads = torch.autograd.grad(y.square().sum(), [p for p in conv.parameters()])
    ref_grads = torch.autograd.grad(ref_y.square().sum(), [p for p in ref.parameters()])
    for name, g, rg in zip(["weight", "bias"], grads, ref_grads, strict=False):
        assert_close(g, rg, torch.float32, f"grad {name}", reductions=2 * 90)


def test_fused_conv2d_is_a_drop_in_conv2d():
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2, bias=True)
    fused = FusedConv2d(4, 8, 3, stride=2, padding=1, groups=2, bias=True, relu=False)
    assert isinstance(fused, nn.Conv2d)
    assert fused.state_dict().keys() == conv.state_dict().keys()
    fused.load_state_dict(conv.state_dict(), strict=True)
    conv.load_state_dict(fused.state_dict(), strict=True)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    assert_close(fused.double()(x), conv.double()(x), torch.float64, "relu=False == nn.Conv2d")
    # Called by keyword as nn.Conv2d is (its forward names the input `input`).
    assert_close(fused(input=x), conv(input=x), torch.float64, "conv(input=x) == nn.Conv2d")


@pytest.mark.parametrize("geometry", [{"padding": (1,)}, {"padding": [2]}, {"stride": (2,), "dilation": [2]}])
def test_one_element_geometry_means_both_dims_as_in_nn_conv2d(geometry):
    # nn.Conv2d keeps a 1-element tuple as given and F.conv2d repeats it.
    conv = nn.Conv2d(4, 6, 3, **geometry).double()
    fused = FusedConv2d(4, 6, 3, relu=False, **geometry).double()
    fused.load_state_dict(conv.state_dict())
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    assert_close(fused(x), conv(x), torch.float64, f"{geometry}")


def test_jit_script_is_refused_with_the_alternatives():
    for module in (FusedConv2d(3, 4, 3), BasicBlock(4, 4), nn.Sequential(nn.ReLU(), Bottleneck(16, 4))):
        with pytest.raises(TypeError, match=r"torch.jit.script: FusedConv2d cannot be scripted .* torch.jit.trace"):
            torch.jit.script(module)


def test_from_conv2d_shares_parameters():
    conv = nn.Conv2d(4, 8, 3, padding="same", padding_mode="reflect")
    fused = FusedConv2d.from_conv2d(conv, relu=True)
    assert fused.weight is conv.weight and fused.bias is conv.bias
    assert (fused.padding, fused.padding_mode) == ("same", "reflect")
    x = torch.randn(1, 4, 6, 6)
    assert_close(fused(x), conv_reference(copy.deepcopy(conv).double(), x), torch.float32, "y")
    with pytest.raises(TypeError, match=r"nn\.Conv2d"):
        FusedConv2d.from_conv2d(nn.Linear(2, 2), relu=True)


def test_scale_shift_is_a_frozen_batchnorm():
    torch.manual_seed(0)
    conv = FusedConv2d(4, 6, 3, padding=1, bias=True)
    bn = randomize_norms_(FrozenBatchNorm2d(6))
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    conv.set_scale_shift(scale, bn.bias - bn.running_mean * scale)
    x, residual = torch.randn(2, 4, 5, 5), torch.randn(2, 6, 5, 5)

    y = conv(x, residual)

    ref_conv = copy.deepcopy(conv).double()
    expected = F.relu(bn.double()(nn.Conv2d.forward(ref_conv, x.double())) + residual.double())
    assert_close(y, expected, torch.float32, "y", reductions=36)
    assert not conv.scale.requires_grad and {"scale", "shift"} <= conv.state_dict().keys()
    # The conv's own weight and bias stay trainable, with the frozen norm's scale in their gradients.
    grad_out = torch.randn(y.shape, dtype=torch.float64)
    grads = torch.autograd.grad(y, [conv.weight, conv.bias], grad_out.float())
    ref_grads = torch.autograd.grad(expected, [ref_conv.weight, ref_conv.bias], grad_out)
    for name, g, rg in zip(["weight", "bias"], grads, ref_grads, strict=True):
        assert_close(g, rg, torch.float32, f"grad {name}", reductions=2 * 25)

    fresh = FusedConv2d(4, 6, 3, padding=1, bias=True)
    fresh.load_state_dict(conv.state_dict(), strict=True)
    assert torch.equal(fresh(x, residual), y.detach())
    with pytest.raises(ValueError, match="shape"):
        conv.set_scale_shift(torch.ones(5), torch.zeros(5))
    with pytest.raises(ValueError, match="both"):
        conv.set_scale_shift(torch.ones(6), None)


# ---- BasicBlock / Bottleneck: torchvision parity ----

BLOCK_CASES = [
    # (ours, torchvision's, inplanes, planes, stride, groups, base_width)
    (BasicBlock, tv.BasicBlock, 8, 8, 1, 1, 64),
    (BasicBlock, tv.BasicBlock, 8, 16, 2, 1, 64),
    (Bottleneck, tv.Bottleneck, 16, 4, 1, 1, 64),
    (Bottleneck, tv.Bottleneck, 8, 8, 2, 4, 8),  # resnext-style: groups and width
]


def make_block_pair(ours, theirs, inplanes, planes, stride, groups, base_width, norm=nn.BatchNorm2d):
    torch.manual_seed(0)
    out = planes * ours.expansion
    need_ds = stride != 1 or inplanes != out
    tv_ds = nn.Sequential(tv.conv1x1(inplanes, out, stride), norm(out)) if need_ds else None
    our_ds = projection(inplanes, out, stride, norm) if need_ds else None
    tv_block = theirs(inplanes, planes, stride, tv_ds, groups, base_width, norm_layer=norm)
    block = ours(inplanes, planes, stride, our_ds, groups, base_width, norm_layer=norm)
    randomize_norms_(tv_block)
    return block, tv_block


@pytest.mark.parametrize("case", BLOCK_CASES, ids=lambda c: f"{c[0].__name__}-{c[2:]}")
@pytest.mark.parametrize("mode", ["train", "eval", "eval_no_grad", "frozen_bn"])
def test_block_matches_torchvision(case, mode):
    norm = FrozenBatchNorm2d if mode == "frozen_bn" else nn.BatchNorm2d
    block, tv_block = make_block_pair(*case, norm=norm)
    block.load_state_dict(tv_block.state_dict(), strict=True)
    ref = copy.deepcopy(tv_block).double()
    for m in (block, ref):
        m.train(mode == "train")
    x = torch.randn(3, case[2], 9, 9)
    reductions = 9 * case[2] * (3 if case[0] is Bottleneck else 2)

    with torch.set_grad_enabled(mode != "eval_no_grad"):
        y = block(x)
        expected = ref(x.double())
    assert_close(y, expected, torch.float32, "y", reductions=reductions)
    if mode == "eval_no_grad":
        return
    # eval: gamma is trainable, so the block folds BN into the weight; its grads must match too
    params = [p for p in block.parameters()]
    ref_params = [p for p in ref.parameters()]
    grads = torch.autograd.grad(y.square().sum(), params)
    ref_grads = torch.autograd.grad(expected.square().sum(), ref_params)
    names = [n for n, _ in block.named_parameters()]
    for name, g, rg in zip(names, grads, ref_grads, strict=True):
        assert_close(g, rg, torch.float32, f"grad {name}", reductions=27 * reductions)
    if mode == "train":  # running statistics advance as torchvision's do
        for (k, a), b in zip(block.state_dict().items(), ref.state_dict().values(), strict=True):
            assert_close(a.double(), b.double(), torch.float32, k)


class _Doubled(nn.Module):
    """A wrapper of the kind adapters put in a conv's place: passes any arguments through, changes the output."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x, *args, **kwargs):
        return 2 * self.conv(x, *args, **kwargs)


class _CountingConv(FusedConv2d):
    """A FusedConv2d subclass with a forward of its own that passes every argument on."""

    def forward(self, *args, **kwargs):
        self.calls = getattr(self, "calls", 0) + 1
        return super().forward(*args, **kwargs)


def _swap_conv(block: nn.Module, slot: str, how: str) -> None:
    conv = getattr(block, slot)
    if how == "subclass":
        if isinstance(conv, FusedConv2d):
            conv.__class__ = _CountingConv
            conv.relu = True  # FusedConv2d's default: the block asks for what it needs in each call
        return  # torchvision's block keeps its nn.Conv2d
    if how == "nn.Conv2d":
        plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          conv.dilation, conv.groups, conv.bias is not None).double()  # fmt: skip
        plain.load_state_dict(conv.state_dict())
        setattr(block, slot, plain)
    elif how == "wrapper":
        setattr(block, slot, _Doubled(conv))
    else:  # a forward set on the instance
        forward = conv.forward
        conv.forward = lambda x, *args, **kwargs: forward(x, *args, **kwargs) - 1


@pytest.mark.parametrize("case", BLOCK_CASES, ids=lambda c: f"{c[0].__name__}-{c[2:]}")
@pytest.mark.parametrize("slot", ["conv1", "last"])
@pytest.mark.parametrize("how", ["nn.Conv2d", "wrapper", "forward set on the instance", "subclass"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_conv_slot_changed_after_building_runs_as_in_torchvision(case, slot, how, mode):
    """torchvision's blocks call each conv with one argument, so anything may sit in a conv slot; a fused block whose
    slot holds anything but a fused conv runs torchvision's code (each conv, as nn.Conv2d, then its norm), and a
    FusedConv2d subclass with its own forward is called as the block calls a fused conv."""
    block, tv_block = make_block_pair(*case)
    if slot == "last":
        slot = "conv3" if case[0] is Bottleneck else "conv2"
    block.load_state_dict(tv_block.state_dict(), strict=True)
    block, ref = block.double(), copy.deepcopy(tv_block).double()
    for m in (block, ref):
        _swap_conv(m, slot, how)
        m.train(mode == "train")
    xs = [torch.randn(3, case[2], 9, 9, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    with torch.no_grad():
        xs[1].copy_(xs[0])
    ys = [block(xs[0]), ref(xs[1])]
    assert_close(ys[0], ys[1], torch.float64, "y")
    for y in ys:
        y.square().sum().backward()
    assert_close(xs[0].grad, xs[1].grad, torch.float64, "grad x")
    for (name, p), q in zip(block.named_parameters(), ref.parameters(), strict=True):
        assert_close(p.grad, q.grad, torch.float64, f"grad {name}")
    if how == "subclass":
        assert getattr(block, slot).calls == 1


class _InputOnlyConv(FusedConv2d):
    """A FusedConv2d subclass whose forward takes the input alone, as nn.Conv2d's does."""

    def forward(self, x):
        return super().forward(x, relu=False) * 3


def test_a_forward_set_on_the_projection_sequential_runs_as_in_torchvision():
    block, tv_block = make_block_pair(*BLOCK_CASES[1])
    block.load_state_dict(tv_block.state_dict(), strict=True)
    block, ref = block.double().eval(), copy.deepcopy(tv_block).double().eval()
    for m in (block, ref):
        m.downsample.forward = lambda t, f=m.downsample.forward: f(t) * -2
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        assert_close(block(x), ref(x), torch.float64, "y")


@pytest.mark.parametrize("slot", ["conv2", "downsample.0"])
def test_a_subclass_whose_forward_takes_the_input_alone_is_called_with_it(slot):
    torch.manual_seed(0)
    block, tv_block = make_block_pair(*BLOCK_CASES[1])
    block.load_state_dict(tv_block.state_dict(), strict=True)
    block, ref = block.double().eval(), copy.deepcopy(tv_block).double().eval()
    block.get_submodule(slot).__class__ = _InputOnlyConv
    conv = ref.get_submodule(slot)
    conv.forward = lambda x: nn.Conv2d.forward(conv, x) * 3
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        assert_close(block(x), ref(x), torch.float64, "y")


@pytest.mark.parametrize("case", [BLOCK_CASES[1], BLOCK_CASES[3]], ids=lambda c: c[0].__name__)
def test_a_blocks_conv_called_on_its_own_is_a_conv(case):
    """As in torchvision, ``block.conv1(x)`` is the convolution alone (the block applies the ReLU in its own call)."""
    block, _ = make_block_pair(*case)
    block.double()
    x = torch.randn(2, case[2], 9, 9, dtype=torch.float64)
    y = block.conv1(x)
    assert (y < 0).any()
    assert_close(y, nn.Conv2d.forward(block.conv1, x), torch.float64, "conv1(x)")


@pytest.mark.parametrize(
    ("ours", "theirs", "layers"),
    [(BasicBlock, tv.BasicBlock, [2, 1, 1, 1]), (Bottleneck, tv.Bottleneck, [1, 1, 1, 1])],
)
def test_torchvision_resnet_built_from_our_blocks_loads_its_checkpoints(ours, theirs, layers):
    """``tv.ResNet(ours, ...)`` is torchvision's model with fused blocks, checkpoints both ways."""
    torch.manual_seed(0)
    theirs_model = randomize_norms_(tv.ResNet(theirs, layers, num_classes=7)).eval()
    model = tv.ResNet(ours, layers, num_classes=7).eval()
    model.load_state_dict(theirs_model.state_dict(), strict=True)
    theirs_model.load_state_dict(model.state_dict(), strict=True)
    assert isinstance(model.layer2[0], ours)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = copy.deepcopy(theirs_model).double()(x.double())
        assert_close(model(x), expected, torch.float32, "logits")


@pytest.mark.parametrize("cls", [BasicBlock, Bottleneck])
def test_bn_free_block(cls):
    torch.manual_seed(0)
    planes = 4
    out = planes * cls.expansion
    block = cls(6, planes, stride=2, downsample=projection(6, out, 2, nn.Identity), norm_layer=nn.Identity)
    names = set(block.state_dict())
    assert not any(n.startswith("bn") for n in names)
    assert {"conv1.bias", "conv2.bias", "downsample.0.weight", "downsample.0.bias"} <= names
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    block = block.double()

    y = block(x)

    # a[l+n] = relu(W_n · a + b_n + W_s · a[l] + b_s), every conv written out in plain PyTorch
    convs = [block.conv1, block.conv2] + ([block.conv3] if cls is Bottleneck else [])
    a = x
    for conv in convs[:-1]:
        a = F.relu(nn.Conv2d.forward(conv, a))
    shortcut = nn.Conv2d.forward(block.downsample[0], x)
    expected = F.relu(nn.Conv2d.forward(convs[-1], a) + shortcut)
    assert_close(y, expected, torch.float64, "y")


@pytest.mark.parametrize("cls", [BasicBlock, Bottleneck])
def test_block_rejects_shapes_without_residual_add(cls):
    with pytest.raises(ValueError, match=r"residual add.*downsample=projection"):
        cls(8, 16, stride=1)
    with pytest.raises(ValueError, match="residual add"):
        cls(16 * cls.expansion, 16, stride=2)


@pytest.mark.parametrize("norm_layer", [nn.Identity, nn.BatchNorm2d, FrozenBatchNorm2d])
def test_zero_init_residual_makes_blocks_identities(norm_layer):
    """FrozenBatchNorm2d keeps its weight as a buffer, which torchvision's zero_init_residual zeroes too (it was
    refused as a computed weight)."""
    torch.manual_seed(0)
    model = nn.Sequential(BasicBlock(8, 8, norm_layer=norm_layer), Bottleneck(8, 2, norm_layer=norm_layer)).eval()
    x = torch.rand(2, 8, 5, 5)  # >= 0, so relu(0 + x) == x
    if norm_layer is FrozenBatchNorm2d:
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
    assert not torch.allclose(model(x), x)
    zero_init_residual_(model)
    torch.testing.assert_close(model(x), x)
    if norm_layer is FrozenBatchNorm2d:
        return  # frozen: nothing to learn
    model(x).sum().backward()
    last = model[0].conv2 if norm_layer is nn.Identity else model[0].bn2
    assert last.weight.grad.abs().sum() > 0  # the zeroed layer still learns


def test_a_computed_weight_is_computed_once_per_call_with_a_norm():
    """With ``norm=`` (every block with a BatchNorm in eval mode, or a frozen one) a parametrized weight was computed
    twice per call: spectral norm's power iteration then ran twice a forward, drifting from torchvision's."""

    class Count(nn.Module):
        reads = 0

        def forward(self, w):
            Count.reads += 1
            return w

    torch.manual_seed(0)
    conv = FusedConv2d(4, 8, 3, padding=1, relu=False)
    nn.utils.parametrize.register_parametrization(conv, "weight", Count())
    norm = nn.BatchNorm2d(8).eval()
    x = torch.randn(2, 4, 6, 6)
    for grad in (False, True):
        Count.reads = 0
        with torch.set_grad_enabled(grad):
            y = conv(x, norm=norm)
        assert Count.reads == 1, (grad, Count.reads)
    reference = copy.deepcopy(norm).double()(F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1))
    assert_close(y.detach(), reference, torch.float32, "conv then norm")


def test_zero_init_residual_with_a_swapped_last_conv():
    """A BN-free block's last slot holding an nn.Conv2d is zeroed like a fused conv; a wrapper there is refused before
    any block is changed."""
    torch.manual_seed(0)
    model = nn.Sequential(BasicBlock(8, 8, norm_layer=nn.Identity), BasicBlock(8, 8, norm_layer=nn.Identity)).eval()
    model[1].conv2 = nn.Conv2d(8, 8, 3, padding=1)
    x = torch.rand(2, 8, 5, 5)
    zero_init_residual_(model)
    torch.testing.assert_close(model(x), x)
    model = nn.Sequential(BasicBlock(8, 8, norm_layer=nn.Identity), BasicBlock(8, 8, norm_layer=nn.Identity))
    model[1].conv2 = _Doubled(nn.Conv2d(8, 8, 3, padding=1))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match=r"zero_init_residual_: 1.conv2: expected an nn.Conv2d to zero, got _Doubled"):
        zero_init_residual_(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model[1].conv2 = FusedConv2d(8, 8, 3, padding=1)
    torch.nn.utils.parametrizations.weight_norm(model[1].conv2)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match=r"zero_init_residual_: 1.conv2.weight: expected an nn.Parameter to zero"):
        zero_init_residual_(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model = nn.Sequential(BasicBlock(8, 8))
    torch.nn.utils.parametrize.register_parametrization(model[0].bn2, "weight", nn.Identity())
    with pytest.raises(TypeError, match=r"zero_init_residual_: 0.bn2.weight: expected an nn.Parameter to zero"):
        zero_init_residual_(model)


def test_set_backend_reaches_every_fused_conv_and_rejects_unknown_names():
    model = nn.Sequential(FusedConv2d(3, 4, 3), BasicBlock(4, 4), nn.Linear(2, 2))
    assert set_backend(model, "reference") is model
    convs = [m for m in model.modules() if isinstance(m, FusedConv2d)]
    assert len(convs) == 3 and all(m.backend == "reference" for m in convs)
    with pytest.raises(ValueError, match=r"backend: expected one of .*'cpu'.*, got 'gpu'"):
        set_backend(model, "gpu")
    assert all(m.backend == "reference" for m in convs)  # nothing half-changed
    with pytest.raises(ValueError, match=r"backend: expected one of .*, got 'gpu'"):
        FusedConv2d(3, 4, 3, backend="gpu")


# ---- other residual shapes built from FusedConv2d ----


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_skip_block(num_layers):
    torch.manual_seed(0)
    block = SkipBlock(5, num_layers).double()
    x = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    a = x
    for i, conv in enumerate(block.layers):
        z = nn.Conv2d.forward(conv, a)
        a = F.relu(z + x) if i == num_layers - 1 else F.relu(z)
    assert_close(block(x), a, torch.float64, "y")
    with pytest.raises(ValueError, match="1, 2 or 3"):
        SkipBlock(5, 4)


def test_preact_block_keeps_the_skip_path_linear():
    torch.manual_seed(0)
    block = PreActBlock(5).double()
    x = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    h = F.relu(nn.Conv2d.forward(block.conv1, F.relu(x)))
    expected = x + nn.Conv2d.forward(block.conv2, h)
    y = block(x)
    assert_close(y, expected, torch.float64, "y")
    assert (y < 0).any()  # no ReLU after the add


# ---- a BN-free ResNet trains like its unfused twin ----


class TinyResNet(nn.Module):
    """BN-free: fused stem, a BasicBlock, a strided Bottleneck, pool and a linear head."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = FusedConv2d(3, 8, 3, padding=1)
        self.block1 = BasicBlock(8, 8, norm_layer=nn.Identity)
        self.block2 = Bottleneck(8, 4, 2, projection(8, 16, 2, nn.Identity), norm_layer=nn.Identity)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(x.mean((2, 3)))


def unfused_forward(model: TinyResNet, x: torch.Tensor) -> torch.Tensor:
    """TinyResNet written with F.conv2d (nn.Conv2d.forward), separate adds and ReLUs."""

    def conv(c, a):
        return nn.Conv2d.forward(c, a)

    b1, b2 = model.block1, model.block2
    a = F.relu(conv(model.stem, x))
    h = F.relu(conv(b1.conv1, a))
    a = F.relu(conv(b1.conv2, h) + a)
    h = F.relu(conv(b2.conv2, F.relu(conv(b2.conv1, a))))
    a = F.relu(conv(b2.conv3, h) + conv(b2.downsample[0], a))
    return model.fc(a.mean((2, 3)))


def train(model, forward, steps, x, target, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for i in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(forward(model, x[i % len(x)]), target[i % len(x)])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def synthetic_batches(n_batches=1, batch=4, size=12, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches, batch, 3, size, size, generator=g)
    target = torch.randint(0, classes, (n_batches, batch), generator=g)
    return x, target


def test_bn_free_resnet_trains_like_the_unfused_model():
    torch.manual_seed(0)
    fused = TinyResNet()
    unfused = copy.deepcopy(fused)
    x, target = synthetic_batches()

    losses = train(fused, lambda m, a: m(a), 20, x, target)
    ref_losses = train(unfused, unfused_forward, 20, x, target)

    assert losses[-1] < losses[0]  # it does learn
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(fused.named_parameters(), unfused.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


# ---- torch.compile, autocast, channels_last, torch.export ----


def eval_bn_block() -> tuple[nn.Module, nn.Module]:
    block, tv_block = make_block_pair(*BLOCK_CASES[3])
    block.load_state_dict(tv_block.state_dict())
    return block.eval(), tv_block.eval()


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = TinyResNet()
    x, target = synthetic_batches(1)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = F.cross_entropy(compiled(x[0]), target[0])
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ref_loss = F.cross_entropy(model(x[0]), target[0])
    ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()))
    torch.testing.assert_close(loss, ref_loss)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg)

    block, _ = eval_bn_block()  # BN folded on the fly, under no_grad: the scale epilogue
    xb = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        compiled_block = torch.compile(block, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled_block(xb), block(xb))


@pytest.mark.parametrize(
    "make",
    [
        lambda: FusedConv2d(4, 4, (3, 2), padding="same", dilation=(1, 2)),
        lambda: SkipBlock(4, 2),
        lambda: PreActBlock(4),
    ],
    ids=["FusedConv2d-same", "SkipBlock", "PreActBlock"],
)
def test_compile_fullgraph_with_same_padding(make):
    """padding='same' (SkipBlock's and PreActBlock's convs have it) compiles without a graph break, as nn.Conv2d's
    does; outputs and gradients as eager."""
    torch.manual_seed(0)
    module = make().double()
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64, requires_grad=True)
    torch._dynamo.reset()
    y = torch.compile(module, fullgraph=True, backend="aot_eager")(x)
    grads = torch.autograd.grad(y.sum(), [x, *module.parameters()])
    want = module(x)
    want_grads = torch.autograd.grad(want.sum(), [x, *module.parameters()])
    torch.testing.assert_close(y, want)
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w)


def test_autocast_bf16():
    torch.manual_seed(0)
    block, tv_block = eval_bn_block()
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x)
    assert y.dtype == torch.bfloat16
    expected = copy.deepcopy(tv_block).double()(x.double())
    # bf16 rounds every stage's input: a few bf16 ulps of the output's magnitude
    scale = expected.abs().max().item()
    err = (y.double() - expected).abs().max().item()
    assert err <= 4 * TOL[torch.bfloat16] * scale, f"max abs err {err} vs magnitude {scale}"


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_channels_last(mode):
    torch.manual_seed(0)
    block, tv_block = eval_bn_block()
    block.train(mode == "train")
    ref = copy.deepcopy(tv_block).double().train(mode == "train")
    block = block.to(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    y = block(x)
    expected = ref(x64)
    assert y.is_contiguous(memory_format=torch.channels_last)
    reductions = 9 * 8 * 3
    assert_close(y, expected, torch.float32, "y", reductions=reductions)
    grad_out = torch.randn(y.shape, dtype=torch.float64)
    names = ["x", *(n for n, _ in block.named_parameters())]
    grads = torch.autograd.grad(y, [x, *block.parameters()], grad_out.float())
    ref_params = dict(ref.named_parameters())
    ref_grads = torch.autograd.grad(expected, [x64, *(ref_params[n] for n in names[1:])], grad_out)
    assert grads[0].is_contiguous(memory_format=torch.channels_last)
    for name, g, rg in zip(names, grads, ref_grads, strict=True):
        assert_close(g, rg, torch.float32, f"grad {name}", reductions=27 * reductions)


def test_torch_export():
    torch.manual_seed(0)
    model = TinyResNet().eval()
    x = torch.randn(2, 3, 12, 12)
    exported = torch.export.export(model, (x,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert any("resnet_fused.conv_bias_add_relu" in t for t in targets), targets
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x))


@pytest.mark.parametrize("strict", [False, True])
def test_torch_export_with_a_separate_residual_of_dynamic_size(strict):
    """A residual passed in with an automatic dynamic height: its size is checked when the program runs. Strict
    export failed (its graph kept the check's message closure as a constant)."""
    conv = FusedConv2d(4, 8, 3, stride=2, padding=1).eval()
    x, r = torch.randn(2, 4, 10, 12), torch.randn(2, 8, 5, 6)
    dims = {"input": {2: torch.export.Dim("H", min=4, max=64)}, "residual": {2: torch.export.Dim.AUTO}}
    program = torch.export.export(conv, (x, r), dynamic_shapes=dims, strict=strict).module()
    x2, r2 = torch.randn(2, 4, 17, 12), torch.randn(2, 8, 9, 6)
    with torch.no_grad():
        torch.testing.assert_close(program(x2, r2), conv(x2, r2))
        with pytest.raises(Exception, match=r"residual"):
            program(x2, torch.randn(2, 8, 8, 6))


def test_zero_init_residual_zeroes_a_frozen_norms_shift_too():
    """A converted FrozenBatchNorm2d block keeps its norm as the last conv's scale/shift: the shift, which the branch
    would add, is zeroed with the weight, so the block still starts as the identity."""
    torch.manual_seed(0)
    block = BasicBlock(8, 8, norm_layer=nn.Identity).eval()
    block.conv2.set_scale_shift(torch.rand(8) + 0.5, torch.randn(8))
    x = torch.rand(2, 8, 5, 5)
    zero_init_residual_(block)
    torch.testing.assert_close(block(x), x)


def test_a_downsample_whose_conv_applies_relu_runs_as_its_own_module():
    """The fused shortcut path computes relu(norm(conv x)); a Sequential(FusedConv2d(relu=True), norm) computes
    norm(relu(conv x)). The block must give what its downsample module gives."""
    torch.manual_seed(0)
    ds = nn.Sequential(FusedConv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    with torch.no_grad():
        ds[1].running_mean.uniform_(-1, 1)
        ds[1].bias.uniform_(-1, 1)
    block = BasicBlock(8, 16, stride=2, downsample=ds).eval()
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        expected = block.conv2(block.conv1(x, norm=block.bn1, relu=True), ds(x), norm=block.bn2, relu=True)
        assert (ds(x) < 0).any()  # the norm after the conv's ReLU makes negatives the other order would not
        torch.testing.assert_close(block(x), expected)


def test_partial_load_of_a_frozen_scale_leaves_the_shift_defined():
    conv = FusedConv2d(3, 4, 1)
    state = {k: v for k, v in conv.state_dict().items()}
    state["scale"] = torch.full((4,), 2.0)
    conv.load_state_dict(state, strict=False)  # a checkpoint with scale but no shift
    assert torch.equal(conv.scale, torch.full((4,), 2.0)) and torch.equal(conv.shift, torch.zeros(4))


def test_bad_module_arguments_name_the_argument():
    conv = FusedConv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 5, 5)
    for norm in (torch.randn(4), "bn"):
        with pytest.raises(TypeError, match=r"norm: expected an nn.Module or None, got"):
            conv(x, norm=norm)
    with pytest.raises(
        ValueError, match=r"norm: expected a per-channel map of out_channels=4 channels, got BatchNorm2d"
    ):
        conv(x, norm=nn.BatchNorm2d(8).eval())
    with pytest.raises(TypeError, match=r"SkipBlock: num_layers: expected an int, got 2.0"):
        SkipBlock(4, num_layers=2.0)


def test_blocks_take_a_numpy_integer_stride_as_torchvision_does():
    np = pytest.importorskip("numpy")
    for cls, planes in ((BasicBlock, 8), (Bottleneck, 2)):
        down = projection(4, planes * cls.expansion, 2, nn.BatchNorm2d)
        ours = cls(4, planes, stride=np.int64(2), downsample=down).eval()
        assert ours(torch.randn(1, 4, 6, 6)).shape == (1, planes * cls.expansion, 3, 3)
        with pytest.raises(ValueError, match="residual add"):
            cls(4, planes, stride=np.int64(2))


# ---- eval-mode BatchNorm under transforms and tracers: the fold follows the norm, not the grad mode ----


def _eval_bn_block(seed: int = 0) -> BasicBlock:
    torch.manual_seed(seed)
    return randomize_norms_(BasicBlock(4, 4), seed).double().eval()


def test_vmap_over_an_ensemble_of_eval_bn_blocks_matches_torchvision():
    """Under vmap the stacked gamma shows requires_grad=False, so it reached the op's constant scale, which refused it."""
    ours = [_eval_bn_block(seed) for seed in range(3)]
    theirs = [tv.BasicBlock(4, 4).double().eval() for _ in ours]
    for o, t in zip(ours, theirs, strict=True):
        t.load_state_dict(o.state_dict())
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    ys = []
    for models in (ours, theirs):
        params, buffers = torch.func.stack_module_state(models)
        base = copy.deepcopy(models[0]).to("meta")
        call = lambda p, b, x, base=base: torch.func.functional_call(base, (p, b), (x,))  # noqa: E731
        ys.append(torch.func.vmap(call, in_dims=(0, 0, None))(params, buffers, x))
    assert_close(ys[0], ys[1], torch.float64, "ensemble output")


def test_jvp_through_eval_bn_parameters_matches_torchvision():
    ours = _eval_bn_block()
    theirs = tv.BasicBlock(4, 4).double().eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    tangents = []
    for m in (ours, theirs):
        p = {k: v.detach() for k, v in m.named_parameters()}
        t = {k: torch.full_like(v, 0.5) for k, v in p.items()}
        tangents.append(torch.func.jvp(lambda p, m=m: torch.func.functional_call(m, p, (x,)), (p,), (t,))[1])
    assert_close(tangents[0], tangents[1], torch.float64, "jvp tangent")


def test_jit_trace_of_an_eval_bn_block_passes_its_own_check():
    """torch.jit.trace traces again under no_grad to check the graph: with the fold decided by grad mode, the two
    traces differed."""
    block = _eval_bn_block()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    traced = torch.jit.trace(block, (x,))  # check_trace=True: raises TracingCheckError if the graphs differ
    assert_close(traced(x), block(x), torch.float64, "traced output")


def test_fx_trace_reads_the_norms_mode_and_statistics_when_run():
    """A fold while fx traced wrote the norm's mode and running statistics into the graph as constants."""
    block = _eval_bn_block()
    theirs = tv.BasicBlock(4, 4).double().eval()
    theirs.load_state_dict(block.state_dict())
    graph = torch.fx.symbolic_trace(block)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    assert_close(graph(x), theirs(x), torch.float64, "traced, eval")
    state = randomize_norms_(copy.deepcopy(block), seed=5).state_dict()
    graph.load_state_dict(state)
    theirs.load_state_dict(state)
    assert_close(graph(x), theirs(x), torch.float64, "traced, new running statistics")
    graph.train()
    theirs.train()
    assert_close(graph(x), theirs(x), torch.float64, "traced, train mode")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_residual_and_relu_are_checked_whatever_the_norms_mode(mode):
    """A train-mode norm runs as a module after the conv; its residual add broadcast and promoted, and relu took any
    truthy value, where the eval-mode (folded) path refused them."""
    conv, bn = FusedConv2d(4, 4, 3, padding=1), getattr(nn.BatchNorm2d(4), mode)()
    x = torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match=r"residual: expected the output's shape \(2, 4, 5, 5\), got \(1, 4, 1, 1\)"):
        conv(x, torch.randn(1, 4, 1, 1), norm=bn)
    with pytest.raises(TypeError, match=r"residual: expected dtype torch.float32 \(.*\), got torch.float64"):
        conv(x, torch.randn(2, 4, 5, 5, dtype=torch.float64), norm=bn)
    with pytest.raises(TypeError, match=r"relu: expected a bool, got 'no'"):
        conv(x, norm=bn, relu="no")
    with pytest.raises(TypeError, match=r"relu: expected a bool, got 'false'"):
        FusedConv2d(4, 4, 3, relu="false")


def test_unbatched_x_takes_an_unbatched_residual():
    conv = FusedConv2d(4, 8, 3, relu=False)
    x = torch.randn(4, 6, 6)
    with pytest.raises(ValueError, match=r"residual: expected the output's shape \(8, 4, 4\) \(x is unbatched\), got "
                       r"\(8, 3, 3\)"):  # fmt: skip
        conv(x, torch.randn(8, 3, 3))
    with pytest.raises(ValueError, match=r"got \(1, 8, 4, 4\)"):  # was taken, and the result squeezed to (8, 4, 4)
        conv(x, torch.randn(1, 8, 4, 4))


def test_zero_init_residual_leaves_a_weightless_norm_alone_as_torchvision_does():
    """torchvision skips a block whose last norm has no weight; zeroing its conv instead left the block a
    non-identity map anyway (the norm still shifts by its running mean)."""
    block = BasicBlock(4, 4, norm_layer=lambda c: nn.BatchNorm2d(c, affine=False))
    before = block.conv2.weight.detach().clone()
    zero_init_residual_(block)
    assert torch.equal(block.conv2.weight, before)


def test_a_norm_with_its_own_forward_is_called_not_folded():
    """A BatchNorm subclass or a patched forward may compute anything: the block calls it as torchvision's does."""

    class Clamped(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x).clamp(max=0.25)

    ours = randomize_norms_(BasicBlock(4, 4, norm_layer=Clamped)).double().eval()
    theirs = tv.BasicBlock(4, 4, norm_layer=Clamped).double().eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    assert_close(ours(x), theirs(x), torch.float64, "subclass")
    for m in (ours.bn2, theirs.bn2):
        m.forward = lambda y, m=m: nn.BatchNorm2d.forward(m, y) * 0.5
    assert_close(ours(x), theirs(x), torch.float64, "patched forward")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_autocast_block_with_an_fp32_input_in_either_mode(mode):
    """In train mode the residual is added after the norm, in autocast's dtype: an fp32 block input was refused there
    as a type promotion, while the fused (eval) path and torchvision take it."""
    torch.manual_seed(0)
    ours = randomize_norms_(BasicBlock(4, 4))
    theirs = tv.BasicBlock(4, 4)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 4, 6, 6)
    outs = []
    for m in (ours, theirs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(getattr(m, mode)()(x))
    assert outs[0].dtype == outs[1].dtype == torch.bfloat16
    torch.testing.assert_close(outs[0].float(), outs[1].float(), rtol=0.05, atol=0.05)


def test_a_refused_residual_leaves_the_norms_statistics_alone():
    conv, bn = FusedConv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
    with pytest.raises(ValueError, match="residual: expected the output's shape"):
        conv(torch.randn(2, 4, 5, 5), torch.randn(1, 4, 5, 5), norm=bn)
    assert bn.num_batches_tracked == 0 and torch.equal(bn.running_mean, torch.zeros(4))


def _fp16_conv_with_a_large_scale() -> nn.Module:
    """conv weight 300 and an eval BN scale of about 300: weight * scale (90000) is past fp16's range, while
    conv(x) * scale for x = 1e-3 is 90."""
    conv = FusedConv2d(1, 1, 1, bias=False, relu=False).half()
    bn = nn.BatchNorm2d(1, eps=1e-12).half().eval()
    with torch.no_grad():
        conv.weight.fill_(300.0)
        bn.running_var.fill_(1.0 / 90000)

    class ConvNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = conv, bn

        def forward(self, x):
            return self.conv(x, norm=self.bn)

    return ConvNorm()


def test_fp16_scale_with_a_derivative_is_applied_after_the_conv():
    """Where gamma needs its derivative the scale was folded into the weight, and in fp16 weight * scale overflowed
    (inf where the unfused block gives 90): under grad mode, torch.jit.trace, and any torch.func transform."""
    m = _fp16_conv_with_a_large_scale()
    x = torch.full((1, 1, 2, 2), 1e-3, dtype=torch.float16)
    want = torch.full((1, 1, 2, 2), 90.0625, dtype=torch.float16)
    y = m(x)  # grad mode: gamma requires grad
    torch.testing.assert_close(y, want)
    (g,) = torch.autograd.grad(y.float().sum(), m.bn.weight)
    assert g.isfinite().all() and g.item() == pytest.approx(4 * 90.0625, rel=1e-2)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.trace(m, (x,), check_trace=False)(x), want)
        torch.testing.assert_close(torch.func.vmap(m)(x[None])[0], want)
    p = {k: v.detach() for k, v in m.named_parameters()}
    t = {k: torch.zeros_like(v) for k, v in p.items()}
    y_jvp, _ = torch.func.jvp(lambda p: torch.func.functional_call(m, p, (x,)), (p,), (t,))
    torch.testing.assert_close(y_jvp, want)


class _MaskedReLU(nn.Module):
    """A ReLU that takes the tested forward's masks, in call order, where its own pre-activation is within rounding
    of zero (it may land on either side there, and the reference's backward must follow the forward it is compared
    with); elsewhere its own. Taken everywhere, an element the tested path zeroed wrongly was zeroed here too."""

    def __init__(self, masks: list[torch.Tensor], rtol: float) -> None:
        super().__init__()
        self.masks, self.rtol = masks, rtol

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        tested = self.masks.pop(0)
        near = z.detach().abs() <= self.rtol * max(z.detach().abs().max().item(), 1.0)
        return z * torch.where(near, tested, (z.detach() > 0).double())


@pytest.mark.parametrize("case", BLOCK_CASES, ids=lambda c: f"{c[0].__name__}-{c[2:]}")
@pytest.mark.parametrize("how", ["fp16", "autocast_fp16"])
def test_fp16_eval_bn_block_with_trainable_norms_matches_float64(case, how):
    """Eval-mode BN whose gamma needs its gradient, in fp16 (module or autocast): each scale is applied after its
    conv, then the shift, the residual and the ReLU. Outputs and the gradients of x, the convs and the norms against
    torchvision's block in float64."""
    block, tv_block = make_block_pair(*case)
    block.load_state_dict(tv_block.state_dict())
    block.eval()
    if how == "fp16":
        block.half()
    ref = copy.deepcopy(tv_block).double().eval()
    ref.load_state_dict(block.state_dict())  # the values the tested block holds (rounded to fp16 for "fp16")
    masks: list[torch.Tensor] = []
    for name in ("conv1", "conv2", "conv3"):
        if hasattr(block, name):
            getattr(block, name).register_forward_hook(lambda m, i, out: masks.append((out > 0).double()))
    ref.relu = _MaskedReLU(masks, rtol=0.01)  # fp16's rounding over a block, with room
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, case[2], 9, 9, generator=g).to(block.conv1.weight.dtype).requires_grad_()
    x64 = x.detach().double().requires_grad_()

    with torch.autocast("cpu", dtype=torch.float16, enabled=how == "autocast_fp16"):
        y = block(x)
    expected = ref(x64)

    assert y.dtype == torch.float16 and not masks
    # The longest sum in these blocks: a weight gradient's, over N * H * W.
    reductions = 2 * 9 * 9
    assert_close(y, expected, torch.float16, "y", reductions=reductions)
    assert (y == 0).any() and (y > 0).any()  # the ReLU decides something here
    grad_out = torch.randn(y.shape, generator=g).half()
    names = ["x", *(n for n, _ in block.named_parameters())]
    grads = torch.autograd.grad(y, [x, *block.parameters()], grad_out)
    ref_params = dict(ref.named_parameters())
    ref_grads = torch.autograd.grad(expected, [x64, *(ref_params[n] for n in names[1:])], grad_out.double())
    for name, got, want in zip(names, grads, ref_grads, strict=True):
        assert_close(got, want, torch.float16, f"grad {name}", reductions=reductions)


def test_a_conv_forward_override_is_refused_rather_than_ignored():
    """nn.Conv2d subclasses extend _conv_forward (weight standardisation): the fused op never calls it."""

    class Standardized(nn.Conv2d):
        def _conv_forward(self, x, weight, bias):
            return super()._conv_forward(x, (weight - weight.mean()) / weight.std(), bias)

    with pytest.raises(TypeError, match=r"from_conv2d: expected an nn.Conv2d computing a plain conv, got Standard"):
        FusedConv2d.from_conv2d(Standardized(4, 4, 3), relu=True)
    with pytest.raises(TypeError, match=r"Sub: FusedConv2d never calls _conv_forward"):

        class Sub(FusedConv2d):
            def _conv_forward(self, x, weight, bias):
                return x

    class Mixin:
        def _conv_forward(self, x, weight, bias):
            return x

    with pytest.raises(TypeError, match=r"Mixed: FusedConv2d never calls _conv_forward"):

        class Mixed(Mixin, FusedConv2d):
            pass

    patched = nn.Conv2d(4, 4, 3)
    patched.forward = lambda x: x
    with pytest.raises(TypeError, match=r"from_conv2d: expected an nn.Conv2d computing a plain conv, got Conv2d"):
        FusedConv2d.from_conv2d(patched, relu=True)


def test_a_biased_conv_before_an_eval_norm_folds_the_norm_scale_into_the_bias():
    """norm(conv + b) = conv * s + (t + s * b): the conv's own bias is scaled by the norm's scale too."""
    torch.manual_seed(0)
    conv = FusedConv2d(4, 6, 3, padding=1, bias=True).eval()
    norm = randomize_norms_(nn.BatchNorm2d(6)).eval()
    with torch.no_grad():
        conv.bias.uniform_(-1, 1)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        y = conv(x, norm=norm, relu=True)
        expected = F.relu(F.batch_norm(F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1),
                                       norm.running_mean.double(), norm.running_var.double(), norm.weight.double(),
                                       norm.bias.double(), eps=norm.eps))  # fmt: skip
    assert_close(y, expected, torch.float32, "y", reductions=36)


def test_set_scale_shift_keeps_copies_of_the_callers_tensors():
    conv = FusedConv2d(4, 4, 3, padding=1)
    scale, shift = torch.rand(4) + 0.5, torch.randn(4)
    before = scale.clone(), shift.clone()
    conv.set_scale_shift(scale, shift)
    with torch.no_grad():
        conv.scale.mul_(2)
        conv.shift.zero_()
    assert torch.equal(scale, before[0]) and torch.equal(shift, before[1])


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("x_layout", ["nchw", "channels_last"])
def test_a_channels_last_weight_makes_the_output_channels_last_as_in_conv2d(x_layout, padding_mode):
    """A model moved to channels_last and fed NCHW input: nn.Conv2d (oneDNN) returns channels_last; so must the fused
    conv, or every later layer runs in the other layout. Every padding mode (circular F.pad returns NCHW)."""
    cl = torch.channels_last
    torch.manual_seed(0)
    ref = nn.Conv2d(4, 8, 3, padding=1, padding_mode=padding_mode).to(memory_format=cl)
    fused = FusedConv2d(4, 8, 3, padding=1, padding_mode=padding_mode, relu=False).to(memory_format=cl)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 4, 8, 8)
    if x_layout == "channels_last":
        x = x.contiguous(memory_format=cl)
    with torch.no_grad():
        want, got = ref(x), fused(x)
    assert want.is_contiguous(memory_format=cl) and not want.is_contiguous()
    assert got.stride() == want.stride()
    torch.testing.assert_close(got, want)


def test_a_fused_conv_as_the_root_of_symbolic_trace_says_to_pass_concrete_args():
    """torch.fx.symbolic_trace of the conv itself makes a Proxy of every forward argument, the defaulted norm too:
    the error says how to trace it, and traced so it computes as the module."""
    conv = FusedConv2d(4, 6, 3, padding=1)
    with pytest.raises(TypeError, match=r"norm: expected an nn.Module or None, got an fx Proxy: .* concrete_args="):
        torch.fx.symbolic_trace(conv)
    concrete = {"norm": None, "donate_residual": False, "relu": None}
    graph = torch.fx.symbolic_trace(conv, concrete_args=concrete)
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(graph(x), conv(x), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(4, 8), (1, 1, 4, 8, 8)])
def test_an_input_of_another_rank_is_refused_naming_both_ranks_nn_conv2d_takes(shape):
    want = f"input: expected a 3-D (C, H, W) or 4-D (N, C, H, W) tensor, as nn.Conv2d, got {len(shape)}-D with shape {shape}"
    with pytest.raises(ValueError, match=f"^{re.escape(want)}$"):
        FusedConv2d(4, 6, 3)(torch.randn(shape))


def _twin_blocks(norm_layer) -> tuple[nn.Module, nn.Module]:
    """Our BasicBlock and torchvision's with ``norm_layer``, the same float64 weights and statistics, in eval mode."""
    torch.manual_seed(0)
    ours = BasicBlock(4, 4, norm_layer=norm_layer)
    if ours.bn1.weight is not None:
        randomize_norms_(ours)
    else:  # no affine parameters: statistics alone
        for bn in (ours.bn1, ours.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
    ours = ours.double().eval()
    theirs = tv.BasicBlock(4, 4, norm_layer=norm_layer).double().eval()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@pytest.mark.parametrize(
    "norm",
    ["frozen_eps", "frozen_subclass", "bn_affine_false"],
)
def test_uncommon_norms_in_an_eval_block_match_torchvision(norm):
    """A FrozenBatchNorm2d with its own eps (folded with it), a FrozenBatchNorm2d subclass with its own forward
    (called, not folded) and a BatchNorm2d without affine parameters (folded without them)."""

    class Halved(FrozenBatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 0.5

    norm_layer = {
        "frozen_eps": lambda c: FrozenBatchNorm2d(c, eps=0.5),
        "frozen_subclass": Halved,
        "bn_affine_false": lambda c: nn.BatchNorm2d(c, affine=False),
    }[norm]
    ours, theirs = _twin_blocks(norm_layer)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    assert_close(ours(x), theirs(x), torch.float64, norm, reductions=72)


def test_a_block_whose_conv_and_norms_are_identities_leaves_the_input_alone():
    """With conv1 an nn.Identity and identity norms, the first conv's output is the caller's x: the block's in-place
    ReLU and add must not change it."""
    block = BasicBlock(4, 4, norm_layer=nn.Identity).double()
    block.conv1 = nn.Identity()
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    before = x.clone()
    y = block(x)
    assert torch.equal(x, before), "the block wrote into its input"
    assert_close(y, F.relu(nn.Conv2d.forward(block.conv2, F.relu(before)) + before), torch.float64, "y")


def test_block_stride_forms_as_nn_conv2d_takes_them():
    """(1,) is stride 1 for both dims, as nn.Conv2d and torchvision take it; None and 0 are refused naming stride."""
    x = torch.randn(1, 8, 5, 5)
    ref = BasicBlock(8, 8).eval()
    ours = BasicBlock(8, 8, stride=(1,)).eval()
    ours.load_state_dict(ref.state_dict())
    assert torch.equal(ours(x), ref(x))
    with pytest.raises(TypeError, match=r"BasicBlock: stride: expected an int or a pair of ints, got None"):
        BasicBlock(8, 8, stride=None)
    with pytest.raises(ValueError, match=r"Bottleneck: stride: expected values >= 1, got \(0, 0\)"):
        Bottleneck(8, 2, stride=0)


@pytest.mark.parametrize("kernel_size", [1, 5])
def test_skip_and_preact_blocks_take_their_kernel_size(kernel_size):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    skip, preact = SkipBlock(3, 2, kernel_size).double(), PreActBlock(3, kernel_size).double()
    convs = [*skip.layers, preact.conv1, preact.conv2]
    assert all(c.weight.shape == (3, 3, kernel_size, kernel_size) for c in convs)
    h = F.relu(nn.Conv2d.forward(skip.layers[0], x))
    assert_close(skip(x), F.relu(nn.Conv2d.forward(skip.layers[1], h) + x), torch.float64, "skip")
    h = F.relu(nn.Conv2d.forward(preact.conv1, F.relu(x)))
    assert_close(preact(x), x + nn.Conv2d.forward(preact.conv2, h), torch.float64, "preact")


def test_from_conv2d_of_a_fused_conv_keeps_its_frozen_scale_shift_and_mode():
    torch.manual_seed(0)
    src = FusedConv2d(4, 6, 3, padding=1, relu=False)
    src.set_scale_shift(torch.rand(6) + 0.5, torch.randn(6))
    src.eval()
    fused = FusedConv2d.from_conv2d(src, relu=False)
    assert not fused.training
    assert torch.equal(fused.scale, src.scale) and torch.equal(fused.shift, src.shift)
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(fused(x), src(x))


def test_extra_repr_names_the_backend_and_a_frozen_scale_shift():
    conv = FusedConv2d(3, 4, 3, backend="cpu")
    assert "relu=True, backend='cpu'" in repr(conv) and "frozen" not in repr(conv)
    conv.set_scale_shift(torch.ones(4), torch.zeros(4))
    assert repr(conv).endswith("relu=True, backend='cpu', frozen scale/shift)")
    assert "backend" not in repr(FusedConv2d(3, 4, 3))


def test_a_donate_residual_that_is_not_a_bool_never_donates():
    """The method refuses it; forward (whose argument the TorchScript ONNX exporter passes as a tensor) takes
    anything but True as False. Either way the caller's residual is left alone."""
    conv = FusedConv2d(4, 4, 3, padding=1)
    x, r = torch.randn(1, 4, 5, 5), torch.randn(1, 4, 5, 5)
    before = r.clone()
    with pytest.raises(TypeError, match=r"donate_residual: expected a bool, got 'yes'"):
        conv.conv_bias_add_relu(x, r, donate_residual="yes")
    assert torch.equal(conv(x, r, donate_residual="yes"), conv(x, r))
    assert torch.equal(r, before)


@pytest.mark.parametrize("prepared", [False, True], ids=["eager", "prepared"])
@pytest.mark.parametrize(
    "edit",
    [{"padding": "same"}, {"dilation": (2, 3)}, {"kernel_size": (4, 2)}, {"padding": "valid"}],
    ids=["same-set-later", "dilation", "another-weight-kernel", "valid-set-later"],
)
def test_string_padding_reads_the_geometry_at_call_time_as_nn_conv2d(edit, prepared):
    """nn.Conv2d keeps the per-side amounts of 'same' from its constructor, but its forward hands the string to
    F.conv2d, which reads the current dilation and the weight's kernel; so does the fused conv (eager and
    prepared)."""
    from resnet_fused.inference import optimize_for_inference

    torch.manual_seed(0)
    padding = 0 if edit.get("padding") == "same" else "same"
    conv = nn.Conv2d(4, 6, 3, padding=padding).double()
    fused = FusedConv2d(4, 6, 3, padding=padding, relu=False).double()
    fused.load_state_dict(conv.state_dict())
    if "kernel_size" in edit:
        conv.weight = nn.Parameter(torch.randn(6, 4, *edit["kernel_size"], dtype=torch.float64))
        fused.weight = nn.Parameter(conv.weight.detach().clone())
    for m in (conv, fused):
        for name, value in edit.items():
            if name != "kernel_size":  # F.conv2d reads the weight's kernel, not the attribute
                setattr(m, name, value)
    model = optimize_for_inference(nn.Sequential(fused).eval().float()) if prepared else fused
    x = torch.randn(2, 4, 9, 10, dtype=torch.float64)
    with torch.no_grad():
        y = model(x.float() if prepared else x)
    assert_close(y, conv(x), torch.float32 if prepared else torch.float64, f"{edit}", reductions=4 * 8)


def test_string_padding_set_later_that_f_conv2d_refuses_is_refused_naming_padding():
    fused = FusedConv2d(4, 6, 3, padding="same")
    fused.stride = (1, 2)
    with pytest.raises(ValueError, match=r"padding: expected 'same' only with stride 1, got stride \(1, 2\)"):
        fused(torch.randn(1, 4, 8, 8))
    fused.stride, fused.padding = 1, "SAME"
    with pytest.raises(ValueError, match=r"padding: expected 'same', 'valid' or numbers, got 'SAME'"):
        fused(torch.randn(1, 4, 8, 8))


class _ScaledConvThenNorm(nn.Module):
    """A fused conv with a frozen scale/shift, then an eval BatchNorm (trainable gamma) folded into its call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = FusedConv2d(4, 4, 3, padding=1, relu=True)
        self.conv.set_scale_shift(torch.rand(4) + 0.5, torch.randn(4))
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x, norm=self.bn)


def _record(how: str, model: nn.Module, x: torch.Tensor) -> nn.Module:
    if how == "jit.trace":
        return torch.jit.trace(model, (x,), check_trace=False)
    return torch.export.export(model, (x,), strict=how == "export-strict").module()


@pytest.mark.parametrize("how", ["jit.trace", "export", "export-strict"])
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
@pytest.mark.parametrize("make", [lambda: BasicBlock(4, 4), _ScaledConvThenNorm], ids=["block", "scale-shift-and-norm"])
def test_a_program_recorded_without_grad_trains_under_grad(make, mode, how):
    """An eval norm's gamma folds into the conv's weight where it may be differentiated, and into the op's constant
    scale where not: a torch.jit.trace or torch.export recorded under no_grad or inference_mode must still take the
    weight fold, so that the program run under grad gives gamma its gradient, as torchvision's block does."""
    torch.manual_seed(0)
    model = make().double().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 2)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    with mode():
        program = _record(how, model, x)
        assert_close(program(x), model(x), torch.float64, f"{how} under {mode.__name__}")
    want = model(x)
    want.square().sum().backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    y = program(x)
    assert_close(y, want, torch.float64, f"{how} under grad")
    model.zero_grad()  # an exported program holds its own parameters; a trace, the model's
    y.square().sum().backward()
    params = dict(program.named_parameters())
    assert params.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        assert params[name].grad is not None, f"{how}: no gradient for {name}"
        assert_close(params[name].grad, grad, torch.float64, f"{how} grad {name}", 144)
