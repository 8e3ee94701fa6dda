"""resnet_fused.nn blocks built exactly like torchvision's: same arguments (defaults included) give the same
architecture, parameters and state_dict, checkpoints load strictly both ways, and outputs and gradients match a
float64 torchvision block in eval and train mode."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torchvision.models.resnet as tv
from helpers import assert_close
from test_nn import randomize_norms_
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from resnet_fused.nn import BasicBlock, Bottleneck, FusedConv2d, projection

OURS = {tv.BasicBlock: BasicBlock, tv.Bottleneck: Bottleneck}

# (torchvision's class, inplanes, planes, keyword arguments); omitted keywords keep the defaults on both sides.
CASES = [
    (tv.BasicBlock, 8, 8, {}),
    (tv.BasicBlock, 8, 16, {"stride": 2}),
    (tv.BasicBlock, 8, 8, {"groups": 1, "base_width": 64, "dilation": 1, "norm_layer": nn.BatchNorm2d}),
    (tv.BasicBlock, 8, 8, {"norm_layer": FrozenBatchNorm2d}),
    (tv.Bottleneck, 32, 8, {}),
    (tv.Bottleneck, 16, 8, {"stride": 2}),
    (tv.Bottleneck, 16, 8, {"stride": 2, "groups": 4, "base_width": 8}),  # ResNeXt
    (tv.Bottleneck, 32, 8, {"base_width": 128}),  # wide ResNet
    (tv.Bottleneck, 32, 8, {"dilation": 2}),  # segmentation backbones replace stride by dilation
    (tv.Bottleneck, 32, 8, {"norm_layer": functools.partial(nn.GroupNorm, 4)}),
]


def case_id(case) -> str:
    cls, inplanes, planes, kwargs = case
    args = ",".join(
        f"{k}={getattr(v, '__name__', 'partial')}" if k == "norm_layer" else f"{k}={v}" for k, v in kwargs.items()
    )
    return f"{cls.__name__}({inplanes},{planes}{',' if args else ''}{args})"


def downsample_for(cls, inplanes: int, planes: int, kwargs: dict, *, ours: bool) -> nn.Module | None:
    """torchvision's ``ResNet._make_layer`` shortcut, or ours (:func:`projection`), when the shape changes."""
    out, stride = planes * cls.expansion, kwargs.get("stride", 1)
    if stride == 1 and inplanes == out:
        return None
    norm_layer = kwargs.get("norm_layer")
    if ours:
        return projection(inplanes, out, stride, norm_layer)
    return nn.Sequential(tv.conv1x1(inplanes, out, stride), (norm_layer or nn.BatchNorm2d)(out))


def build_pair(case) -> tuple[nn.Module, nn.Module]:
    """``(ours, torchvision's)`` from the same seed, so that their initial weights can be compared too."""
    cls, inplanes, planes, kwargs = case
    torch.manual_seed(0)
    theirs = cls(inplanes, planes, downsample=downsample_for(cls, inplanes, planes, kwargs, ours=False), **kwargs)
    torch.manual_seed(0)
    ours = OURS[cls](inplanes, planes, downsample=downsample_for(cls, inplanes, planes, kwargs, ours=True), **kwargs)
    return ours, theirs


def randomize_(model: nn.Module, seed: int = 1) -> nn.Module:
    """Every parameter and norm statistic random, so that a load that skipped or swapped a tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return randomize_norms_(model, seed)


def layer_config(m: nn.Module) -> tuple:
    """What a layer is, with our FusedConv2d compared as the nn.Conv2d it is."""
    if isinstance(m, nn.Conv2d):
        return ("Conv2d", nn.Conv2d.extra_repr(m))
    return (type(m).__name__, m.extra_repr())


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_same_architecture_parameters_and_state_dict(case):
    ours, theirs = build_pair(case)
    assert type(ours).expansion == type(theirs).expansion
    assert ours.stride == theirs.stride
    ours_layers = [(n, layer_config(m)) for n, m in ours.named_modules() if n]
    theirs_layers = [(n, layer_config(m)) for n, m in theirs.named_modules() if n]
    assert ours_layers == theirs_layers
    for name, m in ours.named_modules():
        if isinstance(m, nn.Conv2d):
            assert isinstance(m, FusedConv2d), f"{name} does not run through the fused op"
    assert [(n, p.shape, p.requires_grad) for n, p in ours.named_parameters()] == [
        (n, p.shape, p.requires_grad) for n, p in theirs.named_parameters()
    ]
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert list(ours_sd) == list(theirs_sd)
    for k in theirs_sd:  # same seed, same initialisation
        assert torch.equal(ours_sd[k], theirs_sd[k]), k


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_state_dict_loads_strictly_both_ways(case):
    ours, theirs = build_pair(case)
    randomize_(theirs, seed=1)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k

    randomize_(ours, seed=2)
    fresh = build_pair(case)[1]
    fresh.load_state_dict(ours.state_dict(), strict=True)
    for k, v in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def reductions_of(case) -> int:
    """Length of the longest chain of sums behind one output: each conv's 3x3xC_in taps, per layer."""
    cls, inplanes, planes, kwargs = case
    width = planes * kwargs.get("base_width", 64) // 64 * kwargs.get("groups", 1)
    return 9 * max(inplanes, width) * (3 if cls is tv.Bottleneck else 2)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_outputs_and_gradients_match_torchvision(case, mode):
    ours, theirs = build_pair(case)
    randomize_(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ref = copy.deepcopy(theirs).double()
    ours.train(mode == "train")
    ref.train(mode == "train")
    torch.manual_seed(3)
    x = torch.randn(3, case[1], 9, 9, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    reductions = reductions_of(case)

    y = ours(x)
    expected = ref(x64)
    assert_close(y, expected, torch.float32, "y", reductions=reductions)

    # A random upstream gradient: every output element and channel weighs differently.
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    grads = torch.autograd.grad(y, [x, *ours.parameters()], g.float())
    ref_grads = torch.autograd.grad(expected, [x64, *ref.parameters()], g)
    names = ["x", *(n for n, _ in ours.named_parameters())]
    for name, a, b in zip(names, grads, ref_grads, strict=True):
        assert_close(a, b, torch.float32, f"grad {name}", reductions=27 * reductions)
    if mode == "train":  # BatchNorm's running statistics advance as torchvision's do
        for k, v in ref.state_dict().items():
            assert_close(ours.state_dict()[k].double(), v.double(), torch.float32, k)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"groups": 2}, ValueError),
        ({"base_width": 32}, ValueError),
        ({"dilation": 2}, NotImplementedError),
    ],
)
def test_basic_block_raises_as_torchvision_does(kwargs, error):
    with pytest.raises(error) as theirs:
        tv.BasicBlock(8, 8, **kwargs)
    with pytest.raises(error) as ours:
        BasicBlock(8, 8, **kwargs)
    assert str(ours.value) == str(theirs.value)


def test_projection_is_torchvisions_downsample():
    torch.manual_seed(0)
    theirs = nn.Sequential(tv.conv1x1(8, 16, 2), nn.BatchNorm2d(16))
    torch.manual_seed(0)
    ours = projection(8, 16, 2)
    assert [layer_config(m) for m in ours] == [layer_config(m) for m in theirs]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    randomize_(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 8, 7, 7)
    assert_close(ours.eval()(x), copy.deepcopy(theirs).double().eval()(x.double()), torch.float32, "y", reductions=8)


@pytest.mark.parametrize("cls", [tv.BasicBlock, tv.Bottleneck])
def test_identity_norm_gives_the_bn_free_block_with_conv_biases(cls):
    planes = 4
    out = planes * cls.expansion
    block = OURS[cls](6, planes, 2, projection(6, out, 2, nn.Identity), norm_layer=nn.Identity)
    convs = [n for n, m in block.named_modules() if isinstance(m, nn.Conv2d)]
    assert all(isinstance(block.get_submodule(n), FusedConv2d) for n in convs)
    # torchvision's block with nn.Identity has the same layers, but its convs have no bias.
    theirs = cls(6, planes, 2, nn.Sequential(tv.conv1x1(6, out, 2), nn.Identity()), norm_layer=nn.Identity)
    assert [n for n, m in theirs.named_modules() if isinstance(m, nn.Conv2d)] == convs
    expected = sorted([*theirs.state_dict(), *(f"{n}.bias" for n in convs)])
    assert sorted(block.state_dict()) == expected
    assert all(isinstance(block.get_submodule(n), nn.Identity) for n in ["bn1", "bn2", "downsample.1"])


@pytest.mark.parametrize(
    ("ours_cls", "tv_cls", "calls"), [(BasicBlock, tv.BasicBlock, 2), (Bottleneck, tv.Bottleneck, 3)]
)
def test_a_hooked_or_swapped_block_relu_runs_where_torchvision_runs_it(ours_cls, tv_cls, calls):
    """A block's relu with hooks of its own fires as often as torchvision's and sees the same tensors; swapped for
    another module, it is the activation, as in torchvision."""
    torch.manual_seed(0)
    theirs = randomize_norms_(tv_cls(16, 4 if tv_cls is tv.Bottleneck else 16)).eval()
    ours = ours_cls(16, 4 if ours_cls is Bottleneck else 16).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64)
    ours.double(), theirs.double()
    seen: dict[str, list] = {"ours": [], "theirs": []}
    for name, block in (("ours", ours), ("theirs", theirs)):
        handle = block.relu.register_forward_hook(lambda m, i, o, name=name: seen[name].append(o.clone()))
        with torch.no_grad():
            y = block(x.clone())
        handle.remove()
        seen[name].append(y)
    assert len(seen["ours"]) == len(seen["theirs"]) == calls + 1
    for a, b in zip(seen["ours"], seen["theirs"], strict=True):
        torch.testing.assert_close(a, b)
    ours.relu, theirs.relu = nn.SiLU(), nn.SiLU()
    with torch.no_grad():
        y_ours, y_theirs = ours(x.clone()), theirs(x.clone())
    assert (y_ours < 0).any()  # SiLU, not ReLU
    torch.testing.assert_close(y_ours, y_theirs)
