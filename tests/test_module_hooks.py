"""The modules as nn.Module users drive them: hooks, pruning, torch.fx, unbatched input. Against torchvision and
nn.Conv2d in float64."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
import torchvision.models.resnet as tv
from helpers import assert_close
from test_nn import make_block_pair, randomize_norms_
from torch import nn
from torch.nn.utils import prune
from torchvision.models.feature_extraction import create_feature_extractor

import resnet_fused
from resnet_fused.nn import BasicBlock, Bottleneck, FusedConv2d


def converted_pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(torchvision resnet18, its conversion), float64, eval, non-trivial BN statistics folded in."""
    torch.manual_seed(seed)
    ref = randomize_norms_(torchvision.models.resnet18(weights=None, num_classes=10), seed).double().eval()
    ours, _ = resnet_fused.convert(copy.deepcopy(ref))
    return ref, ours


def test_forward_hooks_fire_on_every_conv_of_a_converted_model():
    ref, ours = converted_pair()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    for model in (ref, ours):
        calls = []
        handles = [
            m.register_forward_hook(lambda m, a, y, calls=calls, n=n: calls.append(n))
            for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d)
        ]
        model(x)
        for h in handles:
            h.remove()
        assert sorted(calls) == sorted(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize(("channels", "size"), [(4, 6), (1, 6), (4, 1)])
def test_a_channels_last_weight_makes_the_conv_channels_last_as_nn_conv2d(kernel, channels, size):
    """NCHW x, channels_last weight: nn.Conv2d (oneDNN, cuDNN) runs channels_last; so does FusedConv2d, outputs and
    gradients in the same layouts (a 1x1 kernel's strides are ambiguous: read as ATen reads them). One channel or a
    1x1 image makes x contiguous in both layouts, with strides that read as NCHW."""
    torch.manual_seed(0)
    ref = nn.Conv2d(channels, 8, kernel, padding=kernel // 2).double()
    ours = FusedConv2d(channels, 8, kernel, padding=kernel // 2, relu=False).double()
    ours.load_state_dict(ref.state_dict())
    ref, ours = (m.to(memory_format=torch.channels_last) for m in (ref, ours))
    x = torch.randn(2, channels, size, size, dtype=torch.float64)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    ys = [ref(xs[0]), ours(xs[1])]
    assert ys[1].stride() == ys[0].stride()
    assert ys[0].is_contiguous(memory_format=torch.channels_last) or ref.weight.shape[1:] == (1, 1, 1)  # ambiguous
    assert_close(ys[1], ys[0], torch.float64, "output")
    grad = torch.randn_like(ys[0])
    for y in ys:
        y.backward(grad)
    # One channel: x's NCHW and channels_last strides address memory alike, and the grad may take either.
    assert xs[1].grad.stride() == xs[0].grad.stride() or (channels == 1 and xs[1].grad.is_contiguous())
    assert ours.weight.grad.stride() == ref.weight.grad.stride()
    assert_close(xs[1].grad, xs[0].grad, torch.float64, "grad x")
    assert_close(ours.weight.grad, ref.weight.grad, torch.float64, "grad weight")


def test_a_channels_last_model_fed_nchw_input_runs_channels_last_as_torchvision():
    ref, ours = converted_pair()
    ref, ours = (m.to(memory_format=torch.channels_last) for m in (ref, ours))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)  # NCHW, as images usually come
    strides = {}
    for label, model in (("ref", ref), ("ours", ours)):
        seen = strides.setdefault(label, {})
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d):
                m.register_forward_hook(lambda m, args, y, seen=seen, name=name: seen.update({name: y.stride()}))
    with torch.no_grad():
        assert_close(ours(x), ref(x), torch.float64, "output")
    assert strides["ours"] == strides["ref"] and len(strides["ref"]) == 20


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_hooks_on_a_blocks_last_conv_see_its_input_as_on_nn_conv2d(arch):
    """The residual goes to a block's last conv by keyword: its hooks see one positional input, as nn.Conv2d's do, so a
    pre-hook that returns a changed input keeps the residual and a full backward hook gets one grad_input."""
    torch.manual_seed(0)
    ref = randomize_norms_(getattr(torchvision.models, arch)(weights=None, num_classes=10), 0).double().eval()
    ours, _ = resnet_fused.convert(copy.deepcopy(ref))
    last = "conv2" if arch == "resnet18" else "conv3"
    seen = []
    for model in (ref, ours):
        getattr(model.layer1[0], last).register_forward_pre_hook(lambda m, args: seen.append(len(args)) or args[0] / 2)
        getattr(model.layer2[1], last).register_full_backward_hook(lambda m, grad_in, grad_out: (grad_in[0] * 2,))
    xs = [torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) for _ in range(2)]
    ys = []
    for model, x in zip((ref, ours), xs, strict=True):
        x.requires_grad_()
        ys.append(model(x))
        ys[-1].sum().backward()
    assert seen == [1, 1]
    assert_close(ys[1], ys[0], torch.float64, "output")
    assert_close(xs[1].grad, xs[0].grad, torch.float64, "grad x")


@pytest.mark.parametrize("name", ["layer1.0.conv2", "layer2.0.downsample.0", "conv1"])
def test_pruning_inside_a_converted_block_is_applied_and_follows_weight_orig(name):
    """prune's forward pre-hook recomputes ``weight`` from ``weight_orig`` and the mask on every call: the fused
    block must run through it, as torchvision's does."""
    _, ours = converted_pair()
    unpruned = copy.deepcopy(ours)
    expected = copy.deepcopy(ours)  # the mask applied to the weight by hand
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    conv = ours.get_submodule(name)
    mask = (torch.rand(conv.weight.shape, generator=torch.Generator().manual_seed(1)) > 0.5).double()
    prune.custom_from_mask(conv, "weight", mask)
    with torch.no_grad():
        expected.get_submodule(name).weight.mul_(mask)
    assert_close(ours(x), expected(x), torch.float64, "pruned output")
    assert not torch.allclose(ours(x), unpruned(x)), "the mask changed nothing: the test would prove nothing"
    # An update of weight_orig (what an optimizer changes) reaches the output.
    with torch.no_grad():
        conv.weight_orig.mul_(1.5)
        expected.get_submodule(name).weight.mul_(1.5)
    assert_close(ours(x), expected(x), torch.float64, "after a weight_orig update")


def test_hooks_on_a_norm_run_it_as_a_module_and_see_torchvision_values():
    """A norm with hooks is called as a module (not folded on the fly), so the hook sees its output as in
    torchvision; the block output is unchanged."""
    block, tv_block = make_block_pair(Bottleneck, tv.Bottleneck, 8, 8, 2, 1, 64)
    block.load_state_dict(tv_block.state_dict())
    block, tv_block = block.double().eval(), tv_block.double().eval()
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    seen = {}
    # Cloned: torchvision's in-place ReLU overwrites the hooked output afterwards.
    for tag, m in (("ours", block), ("tv", tv_block)):
        for n in ("bn2", "downsample.1"):
            m.get_submodule(n).register_forward_hook(
                lambda mod, a, y, tag=tag, n=n: seen.__setitem__((tag, n), y.clone())
            )
    assert_close(block(x), tv_block(x), torch.float64, "block output")
    for n in ("bn2", "downsample.1"):
        assert_close(seen[("ours", n)], seen[("tv", n)], torch.float64, f"{n} hook output")


def test_forward_hooks_fire_in_the_order_the_readme_gives():
    """A train-mode Bottleneck (its norms run as modules): each norm's hook fires inside its conv's call, before the
    conv's own; the projection shortcut runs before the last conv. (A hook on the relu would make it a module call.)"""
    block, _ = make_block_pair(Bottleneck, tv.Bottleneck, 8, 8, 2, 1, 64)
    order = []
    for name, m in block.named_modules():
        if name and name != "relu":
            m.register_forward_hook(lambda mod, a, y, name=name: order.append(name))
    block(torch.randn(2, 8, 9, 9))
    assert order == ["bn1", "conv1", "bn2", "conv2", "downsample.0", "downsample.1", "downsample", "bn3", "conv3"]


def test_hooks_on_the_shortcut_sequential_fire():
    block, tv_block = make_block_pair(BasicBlock, tv.BasicBlock, 8, 16, 2, 1, 64)
    block.load_state_dict(tv_block.state_dict())
    block, tv_block = block.double().eval(), tv_block.double().eval()
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    seen = {}
    block.downsample.register_forward_hook(lambda m, a, y: seen.__setitem__("ours", y))
    tv_block.downsample.register_forward_hook(lambda m, a, y: seen.__setitem__("tv", y))
    assert_close(block(x), tv_block(x), torch.float64, "block output")
    assert_close(seen["ours"], seen["tv"], torch.float64, "downsample hook output")


def test_fx_symbolic_trace_and_feature_extraction_of_a_converted_model():
    ref, ours = converted_pair()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    traced = torch.fx.symbolic_trace(ours)
    assert_close(traced(x), ref(x), torch.float64, "traced output")
    nodes = {"layer1": "l1", "layer3.1": "l3", "layer4": "l4"}
    feats = create_feature_extractor(ours, return_nodes=nodes)(x)
    ref_feats = create_feature_extractor(ref, return_nodes=nodes)(x)
    for k in nodes.values():
        assert_close(feats[k], ref_feats[k], torch.float64, f"feature {k}")


def test_fx_trace_of_a_block_with_trainable_eval_bn_keeps_gamma_gradients():
    """The folded scale's requires_grad is decided when the traced graph runs, not when it is traced."""
    block, tv_block = make_block_pair(Bottleneck, tv.Bottleneck, 16, 4, 1, 1, 64)
    block.load_state_dict(tv_block.state_dict())
    block, tv_block = block.double().eval(), tv_block.double().eval()
    traced = torch.fx.symbolic_trace(block)
    x = torch.randn(2, 16, 9, 9, dtype=torch.float64)
    y, y_ref = traced(x), tv_block(x)
    assert_close(y, y_ref, torch.float64, "y")
    g = torch.autograd.grad(y.square().sum(), traced.bn1.weight)[0]
    g_ref = torch.autograd.grad(y_ref.square().sum(), tv_block.bn1.weight)[0]
    assert_close(g, g_ref, torch.float64, "bn1.weight grad")


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_unbatched_input_as_conv2d(padding_mode, with_residual):
    torch.manual_seed(0)
    conv = FusedConv2d(3, 5, 3, padding=1, padding_mode=padding_mode).double()
    x = torch.randn(3, 7, 6, dtype=torch.float64, requires_grad=True)
    r = torch.randn(5, 7, 6, dtype=torch.float64) if with_residual else None
    y = conv(x, r)
    expected = nn.Conv2d.forward(conv, x)
    expected = F.relu(expected + r if with_residual else expected)
    assert y.shape == (5, 7, 6)
    assert_close(y, expected, torch.float64, "y")
    (gx,) = torch.autograd.grad(y.sum(), x)
    (gx_ref,) = torch.autograd.grad(expected.sum(), x)
    assert_close(gx, gx_ref, torch.float64, "grad x")


def test_set_scale_shift_rejects_what_the_op_would_refuse_later():
    conv = FusedConv2d(3, 4, 1)
    with pytest.raises(TypeError, match=r"scale: expected dtype torch.float32 \(the weight's\), got torch.float64"):
        conv.set_scale_shift(torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))
    with pytest.raises(TypeError, match="shift: expected a Tensor, got list"):
        conv.set_scale_shift(torch.ones(4), [0.0] * 4)
    assert conv.scale is None and conv.shift is None


def test_set_scale_shift_refuses_another_device():
    conv = FusedConv2d(3, 4, 1)
    with pytest.raises(ValueError, match=r"scale: expected device cpu \(the weight's\), got meta"):
        conv.set_scale_shift(torch.ones(4, device="meta"), torch.zeros(4, device="meta"))


def test_a_trainable_scale_is_folded_only_when_asked():
    """The op's scale is a constant: the method passes a scale that requires grad to the op, which refuses it, unless
    fold_trainable_scale folds it into the weight (what forward does for a norm's gamma)."""
    torch.manual_seed(0)
    conv = FusedConv2d(3, 4, 3, padding=1).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    scale = torch.rand(4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="scale"):
        conv.conv_bias_add_relu(x, scale=scale, bias=conv.bias)
    y = conv.conv_bias_add_relu(x, scale=scale, bias=conv.bias, fold_trainable_scale=True)
    expected = F.relu(F.conv2d(x, conv.weight, padding=1) * scale.view(1, -1, 1, 1) + conv.bias.view(1, -1, 1, 1))
    assert_close(y, expected, torch.float64, "y")
    (g,) = torch.autograd.grad(y.square().sum(), scale)
    (g_ref,) = torch.autograd.grad(expected.square().sum(), scale)
    assert_close(g, g_ref, torch.float64, "grad scale")


def test_global_module_hooks_leave_blocks_fused():
    """A global hook (module trackers, FLOP counters) sees the modules that run; it does not unfuse the blocks."""
    _, ours = converted_pair()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    expected = ours(x)
    ran = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, y: ran.append(m))
    try:
        y = ours(x)
    finally:
        handle.remove()
    assert_close(y, expected, torch.float64, "output")
    block_norms = [m for n, m in ours.named_modules() if n.startswith("layer") and ".bn" in n]
    assert block_norms and all(isinstance(m, nn.Identity) for m in block_norms)
    assert not any(m is n for m in ran for n in block_norms), "a folded norm ran: the block took the unfused path"
    assert ours.layer1[0].conv1 in ran
