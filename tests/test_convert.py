"""resnet_fused.convert on torchvision models: outputs, grads, reports, state dicts, errors."""

from __future__ import annotations

import collections
import copy
import warnings

import pytest
import torch
import torchvision
import torchvision.models.resnet as tv
from helpers import assert_close
from test_nn import randomize_norms_
from torch import nn
from torch.nn.utils import prune
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d

from resnet_fused import nn as rf_nn
from resnet_fused.convert import ConversionReport, convert


def block_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (tv.BasicBlock, tv.Bottleneck))]


def snapshot(model: nn.Module) -> tuple[list[type], dict[str, torch.Tensor]]:
    return [type(m) for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before) -> None:
    types, state = snapshot(model)
    assert types == before[0], "convert changed the original's modules"
    assert state.keys() == before[1].keys()
    for k, v in state.items():
        assert torch.equal(v, before[1][k]), f"convert changed the original's {k}"


@pytest.mark.parametrize(
    "builder",
    [torchvision.models.resnet18, torchvision.models.resnet50, torchvision.models.resnext50_32x4d],
)
def test_eval_model_matches_original(builder):
    torch.manual_seed(0)
    model = randomize_norms_(builder()).eval()
    before = snapshot(model)

    converted, report = convert(model)

    assert_unchanged(model, before)
    assert report.folded == ["conv1", *block_names(model)]
    assert report.scale_shift == [] and report.unfused == []
    assert not any(isinstance(m, nn.BatchNorm2d) for m in converted.modules())
    convs = [m for m in converted.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(m, rf_nn.FusedConv2d) for m in convs)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = converted(x)
        expected = copy.deepcopy(model).double()(x.double())
    assert_close(y, expected, torch.float32, "logits")


def test_eval_model_matches_original_in_float64():
    """The folding itself is exact up to float64 rounding."""
    torch.manual_seed(0)
    model = randomize_norms_(torchvision.models.resnet18()).eval().double()
    converted, _ = convert(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert_close(converted(x), model(x), torch.float64, "logits", reductions=4608)


def small_resnet(**kwargs) -> nn.Module:
    """resnet18's structure with one block per stage: the same code paths at a third of the cost."""
    return tv.ResNet(tv.BasicBlock, [1, 1, 1, 1], **kwargs)


def train_and_compare(model, converted, x, *, tol_dtype=torch.float64):
    """Outputs and every trainable parameter's gradient agree, by parameter name."""
    y, expected = converted(x), model(x)
    assert_close(y, expected.detach(), tol_dtype, "output")
    y.square().mean().backward()
    expected.square().mean().backward()
    ref = dict(model.named_parameters())
    for name, p in converted.named_parameters():
        if p.requires_grad:
            assert_close(p.grad, ref[name].grad, tol_dtype, f"grad {name}", reductions=4608)


def test_frozen_batchnorm_becomes_a_scale_shift_epilogue():
    torch.manual_seed(0)
    model = randomize_norms_(small_resnet(norm_layer=FrozenBatchNorm2d)).double()

    converted, report = convert(model)

    assert report.scale_shift == ["conv1", *block_names(model)] and report.folded == []
    conv = converted.layer2[0].downsample[0]
    assert isinstance(conv, rf_nn.FusedConv2d) and conv.scale is not None
    assert conv.weight.requires_grad and not conv.scale.requires_grad
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in converted.modules())
    # Same parameter names as the original: conv weights train exactly as before.
    train_and_compare(model, converted, torch.randn(2, 3, 32, 32, dtype=torch.float64))


def test_detection_backbone():
    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=3)
    backbone = randomize_norms_(backbone).double()
    before = snapshot(backbone)

    converted, report = convert(backbone)

    assert_unchanged(backbone, before)
    assert report.scale_shift == ["body.conv1", *block_names(backbone)]
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        out, expected = converted(x), backbone(x)
    assert out.keys() == expected.keys()
    for k in out:
        assert_close(out[k], expected[k], torch.float64, f"feature {k}", reductions=4608)


def test_train_mode_batchnorm_is_left_unfused_and_reported():
    torch.manual_seed(0)
    model = randomize_norms_(small_resnet()).double().train()

    with pytest.warns(UserWarning, match="unfused"):
        converted, report = convert(model)

    assert report.unfused == ["conv1", *block_names(model)] and report.folded == []
    assert type(converted.conv1) is nn.Conv2d  # the stem is left as it was
    block = converted.layer2[0]
    assert isinstance(block, rf_nn.BasicBlock) and isinstance(block.bn1, nn.BatchNorm2d)
    assert converted.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    train_and_compare(model, converted, x)
    for k, v in converted.state_dict().items():  # running statistics advanced the same way
        assert_close(v.double(), model.state_dict()[k].double(), torch.float64, k)
    converted.eval(), model.eval()  # ...and once in eval mode the blocks fold BN on the fly
    with torch.no_grad():
        assert_close(converted(x), model(x), torch.float64, "eval output", reductions=4608)


def test_freeze_bn():
    torch.manual_seed(0)
    model = randomize_norms_(small_resnet()).double().train()

    converted, report = convert(model, freeze_bn=True)

    assert report.scale_shift == ["conv1", *block_names(model)] and report.unfused == []
    assert "bn1.weight" not in dict(converted.named_parameters())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():  # frozen: the converted model in train mode is the original in eval mode
        assert_close(converted(x), model.eval()(x), torch.float64, "output", reductions=4608)
    bn = nn.BatchNorm2d(4, track_running_stats=False)
    with pytest.raises(ValueError, match="running statistics"):
        convert(nn.Sequential(tv.BasicBlock(4, 4, norm_layer=lambda c: bn)), freeze_bn=True)


def test_other_norms_are_kept_unfused():
    torch.manual_seed(0)
    model = small_resnet(norm_layer=lambda c: nn.GroupNorm(4, c))
    model = model.double()
    with pytest.warns(UserWarning, match="unfused"):
        converted, report = convert(model)
    assert report.unfused == ["conv1", *block_names(model)]
    train_and_compare(model, converted, torch.randn(2, 3, 32, 32, dtype=torch.float64))


class ClampedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm subclass with its own forward: its eval mode is not a per-channel affine map."""

    def forward(self, x):
        return super().forward(x).clamp(max=0.25)


@pytest.mark.parametrize("freeze_bn", [False, True])
def test_a_batchnorm_subclass_with_its_own_forward_is_kept_as_a_module(freeze_bn):
    """It was folded by isinstance, as if it were a plain BatchNorm2d: its own forward silently dropped."""
    torch.manual_seed(0)
    model = randomize_norms_(small_resnet(norm_layer=ClampedBatchNorm2d)).double()
    model = model.train() if freeze_bn else model.eval()
    with pytest.warns(UserWarning, match="unfused"):
        converted, report = convert(model, freeze_bn=freeze_bn)
    assert report.unfused == ["conv1", *block_names(model)] and not report.folded and not report.scale_shift
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert_close(converted.eval()(x), model.eval()(x), torch.float64, "output", reductions=4608)
    if freeze_bn:  # kept whatever its statistics: there is nothing to freeze
        norm = ClampedBatchNorm2d(4, track_running_stats=False)
        with pytest.warns(UserWarning, match="unfused"):
            _, report = convert(nn.Sequential(tv.BasicBlock(4, 4, norm_layer=lambda c: norm)), freeze_bn=True)
        assert report.unfused == ["0"]


def test_stem_is_one_fused_conv():
    model = randomize_norms_(torchvision.models.resnet18()).eval()
    converted, _ = convert(model)
    assert isinstance(converted.conv1, rf_nn.FusedConv2d) and converted.conv1.relu
    assert converted.conv1.bias is not None
    assert isinstance(converted.bn1, nn.Identity) and isinstance(converted.relu, nn.Identity)


@pytest.mark.parametrize("layer", ["conv1", "bn1", "relu"])
def test_stem_outputs_requested_by_an_intermediate_layer_getter_are_kept(layer):
    """A getter that returns a stem layer's own output keeps the stem unfused; the blocks are still converted."""
    from torchvision.models._utils import IntermediateLayerGetter

    model = randomize_norms_(torchvision.models.resnet18()).eval().double()
    getter = IntermediateLayerGetter(model, return_layers={layer: "stem", "layer1": "l1"})
    converted, report = convert(getter)
    assert type(converted.conv1) is nn.Conv2d and "conv1" not in report.folded
    assert report.folded == block_names(getter)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        out, expected = converted(x), getter(x)
    for k in ("stem", "l1"):
        assert_close(out[k], expected[k], torch.float64, k, reductions=4608)


def test_bn_free_torchvision_blocks_are_fully_fused_and_not_warned_about():
    torch.manual_seed(0)
    model = nn.Sequential(tv.BasicBlock(8, 8, norm_layer=nn.Identity), tv.Bottleneck(32, 8, norm_layer=nn.Identity))
    model = model.eval().double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted, report = convert(model)
    assert report.folded == ["0", "1"] and report.unfused == []
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        assert_close(converted[0](x), model[0](x), torch.float64, "BasicBlock", reductions=576)
    x = torch.randn(2, 32, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        assert_close(converted[1](x), model[1](x), torch.float64, "Bottleneck", reductions=576)


def test_any_model_containing_blocks():
    torch.manual_seed(0)
    ds = nn.Sequential(tv.conv1x1(8, 16, 2), nn.BatchNorm2d(16))
    model = nn.Sequential(nn.Conv2d(3, 8, 3), tv.BasicBlock(8, 16, 2, ds), nn.Flatten())
    model = randomize_norms_(model).eval().double()
    converted, report = convert(model)
    assert report.folded == ["1"] and isinstance(converted[0], nn.Conv2d)
    assert type(converted[0]) is nn.Conv2d  # not a stem: left alone
    x = torch.randn(2, 3, 11, 11, dtype=torch.float64)
    with torch.no_grad():
        assert_close(converted(x), model(x), torch.float64, "output", reductions=4608)

    block = randomize_norms_(tv.Bottleneck(16, 4)).eval().double()
    converted_block, report = convert(block)
    assert isinstance(converted_block, rf_nn.Bottleneck) and report.folded == [""]
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        assert_close(converted_block(x), block(x), torch.float64, "output", reductions=4608)


def test_inplace_reuses_the_model_and_its_parameters():
    model = torchvision.models.resnet18().train()
    weight = model.layer1[0].conv1.weight
    with pytest.warns(UserWarning):
        converted, _ = convert(model, inplace=True)
    assert converted is model and isinstance(model.layer1[0], rf_nn.BasicBlock)
    assert model.layer1[0].conv1.weight is weight  # an optimizer built before still sees it


def test_backend_is_passed_to_every_fused_conv():
    model = torchvision.models.resnet18().eval()
    converted, _ = convert(model, backend="reference")
    backends = {m.backend for m in converted.modules() if isinstance(m, rf_nn.FusedConv2d)}
    assert backends == {"reference"}


@pytest.mark.parametrize("norm", ["eval_bn", "frozen_bn"])
def test_converted_state_dict_round_trips(norm):
    def make(seed):
        torch.manual_seed(seed)
        if norm == "frozen_bn":
            model = torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d)
        else:
            model = torchvision.models.resnet18().eval()
        return convert(randomize_norms_(model, seed))[0]

    saved, fresh = make(0), make(1)
    fresh.load_state_dict(saved.state_dict(), strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(x), saved(x))


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_module_names_come_in_torchvision_order(arch):
    model = getattr(torchvision.models, arch)().eval()
    converted, _ = convert(model)
    assert [n for n, _ in converted.named_modules()] == [n for n, _ in model.named_modules()]


def test_report_str():
    report = ConversionReport(folded=["conv1", "layer1.0"], unfused=[""])
    text = str(report)
    assert "2 folded" in text and "layer1.0" in text and "<model>" in text


class CustomForward(tv.BasicBlock):
    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_clear_errors():
    model = torchvision.models.resnet18()
    with pytest.raises(TypeError, match=r"nn\.Module"):
        convert(42)
    with pytest.raises(ValueError, match="no torchvision ResNet block"):
        convert(nn.Sequential(nn.Conv2d(3, 3, 3), nn.ReLU()))
    with pytest.raises(TypeError, match="compile"):
        convert(torch.compile(model))
    with pytest.raises(TypeError, match="scripted"):
        convert(torch.jit.script(tv.BasicBlock(4, 4).eval()))
    with pytest.raises(TypeError, match="its own forward"):
        convert(nn.Sequential(CustomForward(4, 4)))
    # torchvision builds it, but its residual add can never work
    with pytest.raises(ValueError, match=r"convert: 0: the residual add"):
        convert(nn.Sequential(tv.BasicBlock(8, 16, stride=2)))
    with pytest.raises(ValueError, match="residual add"):
        convert(nn.Sequential(tv.Bottleneck(16, 16)))
    block = tv.BasicBlock(4, 4)
    block.conv2 = nn.Sequential(block.conv2)
    with pytest.raises(TypeError, match=r"convert: 0\.conv2: expected an nn\.Conv2d, got Sequential"):
        convert(nn.Sequential(block))


@pytest.mark.parametrize("arg", ["inplace", "freeze_bn"])
def test_flags_must_be_bools_and_leave_the_model_as_it_was(arg):
    """A truthy string from a config ("no", "False") must not convert the caller's model in place or freeze BN."""
    model = torchvision.models.resnet18()
    before = snapshot(model)
    with pytest.raises(TypeError, match=rf"convert: {arg}: expected a bool, got 'no'"):
        convert(model, **{arg: "no"})
    assert_unchanged(model, before)


def test_backend_is_checked_where_no_conv_is_built():
    """A model whose only block convert keeps (for its hooks) builds no FusedConv2d, which checked the name."""
    block = tv.BasicBlock(4, 4)
    block.register_forward_hook(lambda *a: None)
    with pytest.raises(ValueError, match=r"backend: expected one of .*, got 12345"):
        convert(nn.Sequential(block), backend=12345)


def test_converting_twice_says_so():
    model, _ = convert(torchvision.models.resnet18().eval())
    with pytest.raises(ValueError, match=r"only resnet_fused modules \(converted already, or built from"):
        convert(model)


def test_converted_model_under_compile_and_channels_last():
    """The detection fine-tuning case: FrozenBN as scale/shift epilogues, trained through compile."""
    torch.manual_seed(0)
    original = randomize_norms_(small_resnet(norm_layer=FrozenBatchNorm2d))
    model, _ = convert(original)
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(x).square().mean()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ref_loss = model(x).square().mean()
    ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()))
    torch.testing.assert_close(loss, ref_loss)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg)

    # channels_last: outputs and gradients (x and every parameter, by name) against the original in float64.
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    x64 = x.double().requires_grad_()
    ref = copy.deepcopy(original).double()
    y = cl_model(x_cl)
    expected = ref(x64)
    assert_close(y, expected, torch.float32, "channels_last y", reductions=4608)
    grad_out = torch.randn(y.shape, dtype=torch.float64)
    names = [n for n, _ in cl_model.named_parameters()]
    grads = torch.autograd.grad(y, [x_cl, *cl_model.parameters()], grad_out.float())
    ref_params = dict(ref.named_parameters())
    ref_grads = torch.autograd.grad(expected, [x64, *(ref_params[n] for n in names)], grad_out)
    assert grads[0].is_contiguous(memory_format=torch.channels_last)
    for name, g, rg in zip(["x", *names], grads, ref_grads, strict=True):
        assert_close(g, rg, torch.float32, f"channels_last grad {name}", reductions=4608)


@pytest.mark.parametrize("activation", [nn.SiLU, nn.ReLU6, nn.LeakyReLU])
def test_block_with_another_activation_is_refused(activation):
    model = torchvision.models.resnet18().eval()
    model.layer2[1].relu = activation()
    with pytest.raises(TypeError, match=rf"layer2\.1\.relu: expected nn\.ReLU .* got {activation.__name__}"):
        convert(model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("how", ["blocks", "converted in train mode"])
def test_float32_norms_after_half_precision_convs(dtype, how):
    """BatchNorm kept in float32 (as mixed-precision recipes keep it) after bf16/fp16 convs, which torchvision runs:
    an eval-mode norm folded on the call comes out in the convs' dtype."""
    torch.manual_seed(0)
    original = randomize_norms_(torchvision.models.resnet18())
    if how == "blocks":
        model = tv.ResNet(rf_nn.BasicBlock, [2, 2, 2, 2])
        model.load_state_dict(original.state_dict())
    else:
        model, _ = convert(original.train(), freeze_bn=False)
    for m in (original, model):
        m.to(dtype).eval()
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.float()
    x = torch.randn(2, 3, 64, 64, dtype=dtype)
    with torch.no_grad():
        y, theirs = model(x), original(x)
        expected = copy.deepcopy(original).double()(x.double())
    assert y.dtype == theirs.dtype == dtype
    # Each stage rounds its input to the half-precision dtype, as torchvision's does.
    err, their_err = (y.double() - expected).abs().max(), (theirs.double() - expected).abs().max()
    assert err <= 2 * their_err + 1e-3 * expected.abs().max(), f"max abs err {err} vs torchvision's {their_err}"


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("how", ["pruned", "weight_norm", "parametrized"])
def test_a_computed_conv_weight_is_refused_by_name(how, inplace):
    """A pruned, weight-normed or parametrized conv has no Parameter weight for the fused conv to take: the error
    names the conv and says what to do, before anything is copied or changed."""
    model = torchvision.models.resnet18(weights=None).eval()
    conv = model.layer2[0].conv1
    if how == "pruned":
        prune.l1_unstructured(conv, "weight", amount=0.5)
    elif how == "weight_norm":
        torch.nn.utils.parametrizations.weight_norm(conv)
    else:
        torch.nn.utils.parametrize.register_parametrization(conv, "weight", nn.Identity())
    with pytest.raises(
        TypeError, match=r"convert: layer2\.0\.conv1\.weight: expected an nn\.Parameter, got a computed"
    ):
        convert(model, inplace=inplace)
    assert type(model.layer2[0]) is tv.BasicBlock  # nothing converted


def test_a_parametrized_shortcut_or_stem_that_convert_keeps_is_not_refused():
    """A parametrized downsample conv or stem conv is not an exact nn.Conv2d: convert keeps it as it is, as before."""
    model = torchvision.models.resnet18(weights=None).eval()
    torch.nn.utils.parametrize.register_parametrization(model.layer2[0].downsample[0], "weight", nn.Identity())
    torch.nn.utils.parametrize.register_parametrization(model.conv1, "weight", nn.Identity())
    converted, _ = convert(model)
    assert converted.layer2[0].downsample is not None and type(converted.layer2[0]) is rf_nn.BasicBlock
    assert torch.nn.utils.parametrize.is_parametrized(converted.conv1)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-4, atol=1e-4)


def test_modes_inside_a_block_are_kept():
    """A BatchNorm in eval mode inside a training model (frozen-BN fine-tuning), and one in train mode inside an eval
    block, keep their modes: convert sets only the new block's own. The stem's new Identity modules take the modes
    of the modules they replace."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 8, 8)
    # A shortcut convert does not know (pooling first), kept as it is, with its BatchNorm in eval mode.
    down = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))
    training = randomize_norms_(nn.Sequential(tv.BasicBlock(8, 16, stride=2, downsample=down))).train()
    training[0].downsample[2].eval()
    block = randomize_norms_(nn.Sequential(tv.BasicBlock(8, 8))).eval()
    block[0].bn1.train()
    for model in (training, block):
        modes = {n: m.training for n, m in model.named_modules()}
        with pytest.warns(UserWarning, match="unfused"):
            converted, _ = convert(model)
        for name, m in converted.named_modules():
            if name in modes and type(m) is type(model.get_submodule(name)):
                assert m.training == modes[name], f"{name}: training changed from {modes[name]} to {m.training}"
        assert_close(converted(x), copy.deepcopy(model)(x).detach(), torch.float32, "output")
    converted, _ = convert(small_resnet().eval())
    assert not [n for n, m in converted.named_modules() if m.training]


class OwnForwardResNet(tv.ResNet):
    """Uses conv1 and bn1 without the stem's ReLU: convert must not fuse a ReLU into conv1."""

    def forward(self, x):
        return self.bn1(self.conv1(x))


class OwnForwardImplResNet(tv.ResNet):
    """The same through ``_forward_impl``, which torchvision's ``forward`` calls."""

    def _forward_impl(self, x):
        return self.bn1(self.conv1(x))


@pytest.mark.parametrize("kind", [OwnForwardResNet, OwnForwardImplResNet])
def test_a_resnet_with_its_own_forward_keeps_its_stem(kind):
    torch.manual_seed(0)
    model = randomize_norms_(kind(tv.BasicBlock, [1, 1, 1, 1])).eval()
    converted, report = convert(model)
    assert "conv1" not in report.folded and type(converted.conv1) is nn.Conv2d
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        y = converted(x)
        assert (y < 0).any()  # no ReLU was added
        assert_close(y, model(x), torch.float32, "output")


def test_a_shared_block_stays_shared():
    torch.manual_seed(0)
    block = randomize_norms_(tv.BasicBlock(8, 8)).eval()
    model = nn.Sequential(block, nn.ReLU(), block)
    converted, report = convert(model)
    assert converted[0] is converted[2] and isinstance(converted[0], rf_nn.BasicBlock)
    assert sum(p.numel() for p in converted.parameters()) == sum(
        p.numel() for p in converted[0].parameters()
    )  # one set of parameters, as in the original
    assert report.folded == ["0", "2"]
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        assert_close(converted(x), model(x), torch.float32, "output")


def test_hooked_modules_are_kept_or_stay_modules():
    """Hooks are never dropped: a block or conv with hooks is kept as it was (reported, warned about); a hooked
    BatchNorm stays a module the fused conv calls, and a hooked ReLU is called where torchvision calls it; each hook
    sees what it saw in the original."""
    torch.manual_seed(0)
    model = randomize_norms_(small_resnet()).eval()
    x = torch.randn(1, 3, 32, 32)
    seen: dict[str, torch.Tensor] = {}
    for name in ("conv1", "layer1.0", "layer2.0.conv2", "layer3.0.bn1", "layer4.0.relu"):
        model.get_submodule(name).register_forward_hook(
            lambda mod, args, out, name=name: seen.__setitem__(name, out.detach().clone())
        )
    with torch.no_grad():
        expected = model(x)
    seen_before = dict(seen)
    seen.clear()
    with pytest.warns(UserWarning) as warned:
        converted, report = convert(model)  # a deep copy: the hooks come along
    assert any("kept as they were" in str(w.message) for w in warned)
    assert report.kept == ["conv1", "layer1.0", "layer2.0"]
    assert type(converted.layer1[0]) is tv.BasicBlock and type(converted.layer2[0]) is tv.BasicBlock
    assert isinstance(converted.layer3[0], rf_nn.BasicBlock) and type(converted.layer3[0].bn1) is nn.BatchNorm2d
    assert isinstance(converted.layer4[0], rf_nn.BasicBlock) and "layer4.0" in report.folded
    with torch.no_grad():
        assert_close(converted(x), expected, torch.float32, "output")
    assert seen.keys() == seen_before.keys()
    for name, out in seen_before.items():
        assert_close(seen[name], out, torch.float32, f"{name}'s hook output")


@pytest.mark.parametrize("attr", ["forward", "_forward_impl"])
def test_a_resnet_with_a_forward_set_on_it_keeps_its_stem(attr):
    """As for a subclass with its own forward: convert cannot know how such a model uses its stem."""
    torch.manual_seed(0)
    model = randomize_norms_(small_resnet(num_classes=4)).eval().double()

    # A stem without its ReLU: fusing the stem would add one.
    def stem_without_relu(x, m=model):
        return m.fc(m.avgpool(m.layer4(m.layer3(m.layer2(m.layer1(m.bn1(m.conv1(x))))))).flatten(1))

    setattr(model, attr, stem_without_relu)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    converted, report = convert(model, inplace=True)  # the function set calls this model's modules
    assert type(converted.conv1) is nn.Conv2d and "conv1" not in report.folded
    with torch.no_grad():
        assert_close(converted(x), expected, torch.float64, "output")


class _HalfReLU(nn.ReLU):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 0.5


@pytest.mark.parametrize(
    ("name", "kept"),
    [
        ("layer1.0", "layer1.0"),
        ("layer2.0.conv2", "layer2.0"),
        ("layer2.0.downsample.0", "layer2.0"),
        ("conv1", "conv1"),
        ("relu", "conv1"),
        ("layer3.0.bn1", None),
        ("layer3.0.bn2", None),
        ("layer4.0.relu", None),
        ("stem relu subclass", "conv1"),
    ],
)
def test_a_forward_set_on_an_instance_is_kept_as_a_hook_is(name, kept):
    """``m.forward = ...`` on a module convert would replace keeps its block or stem as it was; on a norm or a block's
    relu, that module is kept and called; a stem ReLU subclass with its own forward keeps the stem. Either way the
    output is the original's."""
    torch.manual_seed(0)
    model = randomize_norms_(small_resnet()).eval().double()
    if name == "stem relu subclass":
        model.relu = _HalfReLU(inplace=True)
    else:
        module = model.get_submodule(name)
        own_forward = type(module).forward
        module.forward = lambda *args, m=module: own_forward(m, *args) * 0.5
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted, report = convert(model, inplace=True)
    assert report.kept == ([kept] if kept else [])
    with torch.no_grad():
        assert_close(converted(x), expected, torch.float64, "output")


def _add_state(module: nn.Module, how: str, fired: list[str]) -> None:
    if how == "state_dict_hook":
        module.register_state_dict_post_hook(lambda mod, sd, prefix, local: fired.append(prefix))
    elif how == "load_pre_hook":
        module.register_load_state_dict_pre_hook(lambda mod, sd, prefix, *rest: fired.append(prefix))
    elif how == "buffer":
        module.register_buffer("ema", torch.ones(2, dtype=torch.float64))
    else:
        module.register_parameter("extra", nn.Parameter(torch.ones(2, dtype=torch.float64)))


@pytest.mark.parametrize("how", ["state_dict_hook", "load_pre_hook", "buffer", "parameter"])
@pytest.mark.parametrize(
    ("name", "kept", "unfused"),
    [
        ("layer1.0", "layer1.0", None),
        ("layer2.0.conv2", "layer2.0", None),
        ("layer2.0.downsample", "layer2.0", None),
        ("layer2.0.downsample.0", "layer2.0", None),
        ("conv1", "conv1", None),
        ("bn1", "conv1", None),
        ("layer3.0.bn1", None, "layer3.0"),
    ],
)
def test_state_set_on_an_instance_is_kept_as_a_hook_is(name, kept, unfused, how):
    """A state-dict hook, or a parameter or buffer a module's class does not make, on a module convert would replace
    keeps its block or stem as it was (on a norm, the norm stays a module): swapped, it was dropped without a word.
    The converted model's state_dict holds it, its hooks fire, and its output is the original's."""
    torch.manual_seed(0)
    model = randomize_norms_(small_resnet()).eval().double()
    fired: list[str] = []
    _add_state(model.get_submodule(name), how, fired)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    keys = set(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted, report = convert(model)
    assert report.kept == ([kept] if kept else [])
    assert unfused is None or unfused in report.unfused
    fired.clear()
    state = converted.state_dict()
    converted.load_state_dict(state)
    if how in ("buffer", "parameter"):
        assert f"{name}.{'ema' if how == 'buffer' else 'extra'}" in state
    else:
        assert f"{name}." in fired
    if kept is not None:  # a block or stem kept as it was has torchvision's keys
        assert {k for k in keys if k.startswith(f"{kept}.")} <= set(state)
    with torch.no_grad():
        assert_close(converted(x), expected, torch.float64, "output")


def test_a_refused_model_is_left_as_it_was():
    """convert checks every block before changing anything: with inplace=True a refusal leaves the model whole."""
    model = nn.Sequential(randomize_norms_(small_resnet()).eval(), CustomForward(4, 4))
    before = snapshot(model)
    with pytest.raises(TypeError, match="its own forward"):
        convert(model, inplace=True)
    assert_unchanged(model, before)
    assert type(model[0].conv1) is nn.Conv2d and type(model[0].bn1) is nn.BatchNorm2d


def test_a_hooked_norm_keeps_the_tensor_torchvision_gives_it():
    """torchvision adds the shortcut and applies its ReLU in place on the norm's output: a hook that keeps that
    tensor (no clone) holds the block's output there, and does after convert too."""
    torch.manual_seed(0)
    model = randomize_norms_(nn.Sequential(tv.BasicBlock(8, 8))).eval()
    kept: dict[str, torch.Tensor] = {}
    for name in ("0.bn1", "0.bn2"):
        model.get_submodule(name).register_forward_hook(lambda m, a, out, name=name: kept.__setitem__(name, out))
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        model(x)
        expected = dict(kept)
        with pytest.warns(UserWarning, match="unfused"):
            converted, _ = convert(model)
        converted(x)
    for name, out in expected.items():
        assert (out >= 0).all()  # torchvision's in-place ReLU ran on it
        assert_close(kept[name], out, torch.float32, f"{name}'s kept output")


def test_freeze_bn_without_running_statistics_is_refused_before_any_change():
    model = torchvision.models.resnet18().train()
    model.layer4[1].bn2 = nn.BatchNorm2d(512, track_running_stats=False)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"freeze_bn=True needs running statistics, but layer4\.1\.bn2 \(Batch"):
        convert(model, inplace=True, freeze_bn=True)
    assert_unchanged(model, before)


def test_hooks_stay_the_callers_objects():
    """A copy (inplace=False) calls the caller's own hook objects, not copies of them: their state is the caller's."""

    class Counter:
        def __init__(self) -> None:
            self.calls = 0

        def __call__(self, module, args, out) -> None:
            self.calls += 1

    model = randomize_norms_(small_resnet()).eval()
    counter = Counter()
    model.layer1[0].register_forward_hook(counter)
    with pytest.warns(UserWarning, match="kept as they were"):
        converted, report = convert(model)
    assert report.kept == ["layer1.0"]
    with torch.no_grad():
        converted(torch.randn(1, 3, 32, 32))
    assert counter.calls == 1


@pytest.mark.parametrize("block", ["basic", "bottleneck-groups"])
def test_flop_counters_count_a_converted_model_as_the_original(block):
    """FlopCounterMode counts each fused call as the conv it holds, forward and backward, by torch's own formulas."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    if block == "basic":
        model = small_resnet()
    else:
        model = tv.ResNet(tv.Bottleneck, [1, 1, 1, 1], groups=2, width_per_group=32)
    model.eval()
    fused, _ = convert(model)
    counts = []
    for m in (model, fused):
        x = torch.randn(2, 3, 32, 32, requires_grad=True)
        with FlopCounterMode(display=False) as counter:
            m(x).sum().backward()
        counts.append(counter.get_total_flops())
    assert counts[0] > 0 and counts[1] == counts[0], counts


class _HalfShortcut(nn.Sequential):
    """A projection shortcut computing half of what its layers do: a Sequential subclass with a forward of its own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * super().forward(x)


class _Double(nn.Identity):
    """An nn.Identity subclass that computes something (used as a norm layer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


def _float64_matches(model: nn.Module, converted: nn.Module, x: torch.Tensor, what: str) -> None:
    with torch.no_grad():
        expected = copy.deepcopy(model).double()(x.double())
        assert_close(converted(x), expected, torch.float32, what, 72)


def test_subclassed_shortcut_and_identity_norm_keep_their_forward():
    """A Sequential subclass as the shortcut, or an nn.Identity subclass as the norm, may compute anything: convert
    and the fused blocks call them as modules rather than fold them as a plain projection or no norm."""
    torch.manual_seed(0)
    ds = _HalfShortcut(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    block = randomize_norms_(nn.Sequential(tv.BasicBlock(8, 16, stride=2, downsample=ds))).eval()
    x = torch.randn(2, 8, 10, 10)
    _float64_matches(block, convert(block)[0], x, "converted block, Sequential-subclass shortcut")
    torch.manual_seed(0)
    identity_norm = tv.BasicBlock(8, 8, norm_layer=_Double).eval()
    converted = convert(nn.Sequential(identity_norm))[0]
    _float64_matches(nn.Sequential(identity_norm), converted, x, "converted block, Identity-subclass norm")
    # The fused block takes the same shortcut and norm as torchvision's, with torchvision's parameters
    for tv_block, rf_block in (
        (tv.BasicBlock(8, 16, stride=2, downsample=ds), rf_nn.BasicBlock(8, 16, stride=2, downsample=ds)),
        (tv.BasicBlock(8, 8, norm_layer=_Double), rf_nn.BasicBlock(8, 8, norm_layer=_Double)),
    ):
        assert list(rf_block.state_dict()) == list(tv_block.state_dict())
        rf_block.load_state_dict(tv_block.state_dict())
        _float64_matches(tv_block.eval(), rf_block.eval(), x, f"fused block of {type(tv_block).__name__}")


def test_a_getter_stem_out_of_order_is_kept():
    """An IntermediateLayerGetter runs its children in order: conv1, relu, bn1 is not relu(bn1(conv1(x)))."""
    from torchvision.models._utils import IntermediateLayerGetter

    torch.manual_seed(0)
    model = randomize_norms_(torchvision.models.resnet18()).eval()
    children = dict(model.named_children())
    order = ["conv1", "relu", "bn1", "maxpool", "layer1"]
    getter = IntermediateLayerGetter(
        nn.Sequential(collections.OrderedDict((k, children[k]) for k in order)), {"layer1": "out"}
    )
    converted, report = convert(getter)
    assert "conv1" not in report.folded
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = copy.deepcopy(getter).double()(x.double())["out"]
        assert_close(converted(x)["out"], expected, torch.float32, "out", 576)


@pytest.mark.parametrize("trained", ["conv", "norm", "norm_shift", "both"])
def test_a_folded_bias_is_trainable_where_the_shift_was(trained):
    """Training the folded bias is training the norm's shift: it requires grad exactly where the shift (or the conv's
    bias) did. The folded weight follows the conv's weight. A norm whose scale trains under a frozen conv is kept
    (see the next test); one whose shift alone trains folds, its shift training as the bias."""
    torch.manual_seed(0)
    model = randomize_norms_(torchvision.models.resnet18()).eval()
    for name, p in model.named_parameters():
        norm = ".bn" in name or name.startswith("bn") or "downsample.1" in name
        p.requires_grad_(
            {"conv": not norm, "norm": norm, "norm_shift": norm and name.endswith("bias"), "both": True}[trained]
        )
    converted, report = convert(model)
    conv = converted.layer1[0].conv1
    if trained == "norm":
        assert "layer1.0" in report.unfused and isinstance(converted.layer1[0].bn1, nn.BatchNorm2d)
        return
    assert report.unfused == [] and isinstance(converted.layer1[0].bn1, nn.Identity)
    assert conv.weight.requires_grad == (trained in ("conv", "both"))
    assert conv.bias.requires_grad == (trained != "conv")


def test_geometry_set_as_ints_after_construction_converts_and_runs():
    """A "last stride 1" edit (re-identification backbones) sets a block conv's stride as an int, and a dilation edit
    its padding, after construction; nn.Conv2d's forward takes both, and so do convert and the fused convs."""
    torch.manual_seed(0)
    model = randomize_norms_(tv.resnet50()).eval()
    model.layer4[0].conv2.stride = 1
    model.layer4[0].downsample[0].stride = 1
    converted, _ = convert(model)
    for m in (model, converted):
        m.layer4[1].conv2.dilation, m.layer4[1].conv2.padding = 2, 2
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = copy.deepcopy(model).double()(x.double())
        assert_close(converted(x), want, torch.float32, "logits", reductions=4608)


@pytest.mark.parametrize("norms", ["weight", "weight_and_bias"])
def test_norms_fine_tuned_under_frozen_convs_keep_training(norms):
    """Fine-tuning only the norms (frozen convs, trainable gamma): folding gamma into a frozen weight would stop it
    training, so each such BatchNorm is kept (folded on each call) and every trainable parameter gets the original
    model's gradient, with no warning about it missing."""
    torch.manual_seed(0)
    model = randomize_norms_(small_resnet()).double().eval()
    for name, p in model.named_parameters():
        is_norm = "bn" in name or "downsample.1" in name
        p.requires_grad_(is_norm and (norms == "weight_and_bias" or name.endswith("weight")))
    with pytest.warns(UserWarning, match="BatchNorm whose weight trains under a frozen conv"):
        converted, report = convert(model)
    assert report.unfused == ["conv1", *block_names(model)] and report.folded == []
    trainable = [n for n, p in converted.named_parameters() if p.requires_grad]
    assert trainable == [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(isinstance(m, rf_nn.FusedConv2d) for m in converted.layer1.modules())
    train_and_compare(model, converted, torch.randn(2, 3, 32, 32, dtype=torch.float64))
    # freeze_bn=True freezes train-mode norms only: these eval-mode ones are kept as well.
    with pytest.warns(UserWarning, match="freeze that weight or train the conv"):
        kept, report = convert(model, freeze_bn=True)
    assert report.unfused == ["conv1", *block_names(model)]
    assert [n for n, p in kept.named_parameters() if p.requires_grad] == trainable
    # With the norms' weights frozen as well, folding freezes nothing that trained: folded.
    for p in model.parameters():
        p.requires_grad_(False)
    _, report = convert(model)
    assert report.unfused == [] and report.folded == ["conv1", *block_names(model)]


class _GainHead(nn.Linear):
    """A classifier whose own forward hook (a bound method) scales its output by a Parameter of its own."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.tensor(2.0))
        self.register_forward_hook(self._apply_gain)

    def _apply_gain(self, module, args, output):
        return output * self.gain


def test_a_copy_keeps_hooks_that_are_methods_of_its_own_modules_on_the_copy():
    """convert(inplace=False) calls the caller's hook objects, but a hook that is a method of one of the model's
    modules works on the copy's module, as copy.deepcopy makes it."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval()
    model.fc = _GainHead(512, 4)
    converted, _ = convert(model)
    assert converted.fc._forward_hooks and next(iter(converted.fc._forward_hooks.values())).__self__ is converted.fc
    x = torch.randn(1, 3, 32, 32)
    converted(x).sum().backward()
    assert converted.fc.gain.grad is not None and model.fc.gain.grad is None
    with torch.no_grad():
        converted.fc.gain.zero_()
        assert not converted(x).any()


def test_a_biased_conv_is_folded_with_the_norms_scale():
    """torchvision's convs have no bias, but convert takes any nn.Conv2d: a fine-tuned block whose conv has one gets
    bias t + s * b (the norm scales the conv's bias too)."""
    block = tv.BasicBlock(4, 4)
    block.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=True)
    with torch.no_grad():
        block.conv1.bias.uniform_(-1, 1)
    block = randomize_norms_(block).eval()
    fused, report = convert(block)
    assert report.folded == [""]
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        expected = copy.deepcopy(block).double()(x.double())
        assert_close(fused(x), expected, torch.float32, "y", reductions=72)


def test_a_downsample_with_a_third_module_runs_as_it_is_in_a_fused_block():
    """Sequential(conv, bn, dropout) is not the projection convert fuses: the block is still converted (folded), its
    downsample kept and run as a module, with no warning."""
    ds = nn.Sequential(nn.Conv2d(4, 8, 1, 2, bias=False), nn.BatchNorm2d(8), nn.Dropout(0.0))
    block = randomize_norms_(tv.BasicBlock(4, 8, stride=2, downsample=ds)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused, report = convert(block)
    assert type(fused) is rf_nn.BasicBlock and report.folded == [""]
    assert list(map(type, fused.downsample)) == [nn.Conv2d, nn.BatchNorm2d, nn.Dropout]
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert_close(fused(x), copy.deepcopy(block).double()(x.double()), torch.float32, "y", reductions=72)


def test_a_block_with_a_frozen_norm_and_a_train_mode_norm_is_reported_unfused():
    """One norm left as a module outweighs one kept as scale/shift: the block is listed as unfused, with the
    warning."""
    block = tv.BasicBlock(4, 4)
    block.bn1 = FrozenBatchNorm2d(4)  # bn2 stays a train-mode BatchNorm2d
    with pytest.warns(UserWarning, match="norms left unfused"):
        _, report = convert(block)
    assert report.unfused == [""] and report.scale_shift == []
