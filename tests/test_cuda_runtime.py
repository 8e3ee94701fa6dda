"""backend=BACKEND against the float64 reference on a GPU: forward and every gradient, fp32/fp16/bf16, ResNet shapes.

Skipped without a GPU (or with a CPU-only build); written so that a user with a GPU can run them:
``pytest tests/test_cuda_runtime.py``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

import resnet_fused
from resnet_fused import reference, select

CUDA_OK, CUDA_WHY = select.cuda_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA_OK, reason=f"cuda backend unavailable: {CUDA_WHY}")]

# name: (N, C, K, H, W, R, stride, padding, dilation, groups)
SHAPES = {
    "stem7x7": (2, 3, 64, 32, 32, 7, 2, 3, 1, 1),
    "3x3": (2, 64, 64, 14, 14, 3, 1, 1, 1, 1),
    "3x3s2": (2, 64, 128, 14, 14, 3, 2, 1, 1, 1),
    "1x1down": (2, 64, 128, 14, 14, 1, 2, 0, 1, 1),
    "1x1expand": (2, 64, 256, 7, 7, 1, 1, 0, 1, 1),
    "odd_dilated": (3, 5, 7, 9, 11, 3, 1, 2, 2, 1),
    "depthwise": (2, 32, 32, 9, 9, 3, 1, 1, 1, 32),
    # 96*96 output pixels: several chunks per (n, c) plane in the NCHW backward kernel
    "large_plane": (1, 8, 8, 96, 96, 3, 1, 1, 1, 1),
}
# Which optional parts are present, and relu.
EPILOGUES = {
    "full": dict(bias=True, residual=True, scale=True, relu=True),
    "bias_relu": dict(bias=True, residual=False, scale=False, relu=True),
    "relu": dict(bias=False, residual=False, scale=False, relu=True),
    "preact": dict(bias=True, residual=True, scale=True, relu=False),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKEND = "cuda"
DEVICE = "cuda"


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 is compared at fp32 tolerances, so cuDNN must not round inputs to TF32."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def make_case(shape_name, dtype, epilogue, layout="nchw", seed=0):
    n, c, k, h, w, r, stride, padding, dilation, groups = SHAPES[shape_name]
    ep = EPILOGUES[epilogue]
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEVICE)

    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = rand(n, c, h, w).contiguous(memory_format=fmt)
    weight = rand(k, c // groups, r, r, scale=(c // groups * r * r) ** -0.5)
    p = (h + 2 * padding - dilation * (r - 1) - 1) // stride + 1
    q = (w + 2 * padding - dilation * (r - 1) - 1) // stride + 1
    inputs = {
        "x": x,
        "weight": weight,
        "bias": rand(k) if ep["bias"] else None,
        "residual": rand(n, k, p, q).contiguous(memory_format=fmt) if ep["residual"] else None,
    }
    kwargs = {
        "scale": (rand(k).abs() + 0.5) if ep["scale"] else None,
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "groups": groups,
        "relu": ep["relu"],
    }
    grad_out = rand(n, k, p, q)
    return inputs, kwargs, grad_out


def reference_grads(inputs, kwargs, out, grad_out):
    """float64 gradients of the reference, with the ReLU mask taken from the tested output: a pre-activation within
    rounding of 0 may land on either side in low precision, and the backward must follow the forward's mask."""
    leaves = {name: t.detach().double().requires_grad_(t.requires_grad) for name, t in inputs.items() if t is not None}
    kw = dict(kwargs, relu=False, scale=None if kwargs["scale"] is None else kwargs["scale"].double())
    lin = reference.conv_bias_add_relu(leaves["x"], leaves["weight"], leaves.get("bias"), leaves.get("residual"), **kw)
    g = grad_out.double()
    if kwargs["relu"]:
        g = g * (out.detach() > 0).double()
    wanted = [name for name, t in leaves.items() if t.requires_grad]
    grads = torch.autograd.grad(lin, [leaves[name] for name in wanted], g)
    return dict(zip(wanted, grads, strict=True))


def reference_forward(inputs, kwargs):
    kw = dict(kwargs, scale=None if kwargs["scale"] is None else kwargs["scale"].double())
    d = {name: None if t is None else t.double() for name, t in inputs.items()}
    return reference.conv_bias_add_relu(d["x"], d["weight"], d["bias"], d["residual"], **kw)


def reductions(inputs, kwargs, out) -> dict[str, int]:
    n, k, p, q = out.shape
    c_per_group, r, s = inputs["weight"].shape[1:]
    return {
        "y": c_per_group * r * s,
        "x": (k // kwargs["groups"]) * r * s,
        "weight": n * p * q,
        "bias": n * p * q,
        "residual": 1,
    }


def run_and_check(inputs, kwargs, grad_out, dtype, what):
    for t in inputs.values():
        if t is not None:
            t.requires_grad_(True)
    before = {name: t.detach().clone() for name, t in inputs.items() if t is not None}
    y = resnet_fused.conv_bias_add_relu(**inputs, **kwargs, backend=BACKEND)
    torch.cuda.synchronize()
    red = reductions(inputs, kwargs, y)
    assert y.dtype == dtype and y.device == inputs["x"].device
    expected_fmt = torch._prims_common.suggest_memory_format(inputs["x"])
    assert y.is_contiguous(memory_format=expected_fmt), f"{what}: y not in x's memory format"
    assert_close(y, reference_forward(inputs, kwargs), dtype, f"{what} y", red["y"])
    y.backward(grad_out)
    expected = reference_grads(inputs, kwargs, y, grad_out)
    for name, g in expected.items():
        actual = inputs[name].grad
        assert actual is not None, f"{what}: no grad for {name}"
        assert_close(actual, g, dtype, f"{what} grad_{name}", red[name])
    for name, t in before.items():
        assert torch.equal(inputs[name].detach(), t), f"{what}: {name} was written to"
    return y


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("epilogue", list(EPILOGUES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_forward_backward_vs_float64(shape, epilogue, layout, dtype):
    inputs, kwargs, grad_out = make_case(shape, dtype, epilogue, layout)
    run_and_check(inputs, kwargs, grad_out, dtype, f"{shape}/{epilogue}/{layout}/{dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("epilogue", ["full", "relu"])
def test_without_cudnn_uses_the_epilogue_kernel(epilogue, layout, dtype):
    """With cuDNN disabled, relu=True goes through ATen's conv and our epilogue kernel instead of cuDNN's fusion."""
    inputs, kwargs, grad_out = make_case("odd_dilated", dtype, epilogue, layout)
    with torch.backends.cudnn.flags(enabled=False):
        run_and_check(inputs, kwargs, grad_out, dtype, f"no-cudnn/{epilogue}/{layout}/{dtype}")


def unaligned_copy(t):
    """A contiguous copy of t whose data starts one element past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    shifted = buf[1:].view(t.shape)
    shifted.copy_(t)
    assert shifted.data_ptr() % 16 != 0 and shifted.is_contiguous()
    return shifted


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("epilogue", ["full", "preact"])
def test_unaligned_tensors_take_the_scalar_path(epilogue, dtype):
    """An unaligned residual (forward epilogue) and grad_out (backward) use the VEC=1 kernels."""
    inputs, kwargs, grad_out = make_case("odd_dilated", dtype, epilogue)
    inputs["residual"] = unaligned_copy(inputs["residual"])
    run_and_check(inputs, kwargs, unaligned_copy(grad_out), dtype, f"unaligned/{epilogue}/{dtype}")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_grad_bias_is_deterministic(layout):
    inputs, kwargs, grad_out = make_case("3x3", torch.float32, "full", layout)
    y = resnet_fused.conv_bias_add_relu(**inputs, **kwargs, backend=BACKEND)
    args = (grad_out, y, inputs["x"], inputs["weight"], kwargs["scale"], [1, 1], [1, 1], [1, 1], 1, True)
    first = torch.ops.resnet_fused.conv_bias_add_relu_backward(*args, [False, False, True, True])
    for _ in range(3):
        again = torch.ops.resnet_fused.conv_bias_add_relu_backward(*args, [False, False, True, True])
        assert torch.equal(first[2], again[2]) and torch.equal(first[3], again[3])


def test_backward_output_mask():
    inputs, kwargs, grad_out = make_case("3x3", torch.float16, "full")
    y = resnet_fused.conv_bias_add_relu(**inputs, **kwargs, backend=BACKEND)
    args = (grad_out, y, inputs["x"], inputs["weight"], kwargs["scale"], [1, 1], [1, 1], [1, 1], 1, True)
    grads = torch.ops.resnet_fused.conv_bias_add_relu_backward(*args, [False, False, True, False])
    assert [g.numel() == 0 for g in grads] == [True, True, False, True]
    assert grads[2].shape == (64,)
    grads = torch.ops.resnet_fused.conv_bias_add_relu_backward(*args, [True, False, False, False])
    assert grads[0].shape == inputs["x"].shape and all(g.numel() == 0 for g in grads[1:])
    with pytest.raises(ValueError, match="output_mask"):
        torch.ops.resnet_fused.conv_bias_add_relu_backward(*args[:-1], False, [False, False, False, True])


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_batch_zero(layout):
    inputs, kwargs, _ = make_case("3x3", torch.float32, "full", layout)
    inputs["x"] = inputs["x"][:0]
    inputs["residual"] = inputs["residual"][:0]
    for t in inputs.values():
        t.requires_grad_(True)
    y = resnet_fused.conv_bias_add_relu(**inputs, **kwargs, backend=BACKEND)
    assert y.shape == (0, 64, 14, 14)
    y.sum().backward()
    assert inputs["x"].grad.shape == inputs["x"].shape
    assert torch.count_nonzero(inputs["weight"].grad) == 0
    assert torch.count_nonzero(inputs["bias"].grad) == 0


def test_errors_name_the_argument():
    inputs, _, _ = make_case("3x3", torch.float32, "full")
    with pytest.raises(ValueError, match="residual: expected the output's shape"):
        torch.ops.resnet_fused.conv_bias_add_relu(
            inputs["x"], inputs["weight"], inputs["bias"], inputs["residual"][:, :3], None, [1, 1], [1, 1], [1, 1],
            1, True,
        )  # fmt: skip
    with pytest.raises(ValueError, match="bias: expected device"):
        torch.ops.resnet_fused.conv_bias_add_relu(
            inputs["x"], inputs["weight"], inputs["bias"].cpu(), None, None, [1, 1], [1, 1], [1, 1], 1, True
        )


def test_gradcheck_float64():
    inputs, kwargs, _ = make_case("odd_dilated", torch.float64, "full")
    scale = kwargs.pop("scale")
    names = ["x", "weight", "bias", "residual"]
    leaves = [inputs[n].detach().requires_grad_(True) for n in names]

    def fn(x, w, b, r):
        return resnet_fused.conv_bias_add_relu(x, w, b, r, scale=scale, **kwargs, backend=BACKEND)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


def test_opcheck():
    inputs, kwargs, _ = make_case("3x3", torch.float32, "full", "channels_last")
    args = (
        inputs["x"].requires_grad_(True), inputs["weight"].requires_grad_(True), inputs["bias"],
        inputs["residual"], kwargs["scale"], [1, 1], [1, 1], [1, 1], 1, True,
    )  # fmt: skip
    torch.library.opcheck(torch.ops.resnet_fused.conv_bias_add_relu.default, args)


def test_auto_times_and_caches_on_gpu(monkeypatch):
    monkeypatch.delenv(select.ENV_VAR, raising=False)
    select.clear_cache()
    inputs, kwargs, _ = make_case("3x3", torch.float16, "full", "channels_last")
    text = select.explain(**inputs, **kwargs)
    chosen = select.choose_backend(
        inputs["x"], inputs["weight"], inputs["bias"], inputs["residual"], kwargs["scale"], (1, 1), (1, 1), (1, 1),
        1, True,
    )  # fmt: skip
    assert text.startswith(f"{chosen}: ")
    assert chosen in ("cuda", "triton")
    assert len(select.cached_choices()) <= 1
    y = resnet_fused.conv_bias_add_relu(**inputs, **kwargs)
    assert_close(y, reference_forward(inputs, kwargs), torch.float16, "auto y", 576)


@pytest.mark.slow
def test_indexing_past_2_pow_31_elements():
    """int64 indexing: an output of 2^31 + 4633 elements (1x1 conv, bf16); checks the last elements."""
    side = 46341  # side**2 > 2**31
    need = 4 * side * side * 2  # x, residual, y, grad in bf16
    free, _ = torch.cuda.mem_get_info()
    if free < need * 1.3:
        pytest.skip(f"needs ~{need * 1.3 / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    dt = torch.bfloat16
    x = torch.full((1, 1, side, side), 0.5, dtype=dt, device=DEVICE)
    x[..., -1, -8:] = torch.arange(8, device=DEVICE, dtype=dt)
    w = torch.full((1, 1, 1, 1), 2.0, dtype=dt, device=DEVICE)
    b = torch.full((1,), 0.25, dtype=dt, device=DEVICE)
    r = torch.full((1, 1, side, side), 1.0, dtype=dt, device=DEVICE)
    y = torch.ops.resnet_fused.conv_bias_add_relu(x, w, b, r, None, [1, 1], [0, 0], [1, 1], 1, False)
    expected_tail = torch.arange(8, device=DEVICE, dtype=torch.float64) * 2 + 1.25
    assert torch.equal(y[0, 0, -1, -8:].double(), expected_tail)
    assert torch.all(y[0, 0, -2, :] == 2.25)
    del x, r
    grad = torch.ones_like(y)
    _, _, grad_bias, _ = torch.ops.resnet_fused.conv_bias_add_relu_backward(
        grad, y, y.new_empty(1, 1, side, side), w, None, [1, 1], [0, 0], [1, 1], 1, False, [False, False, True, False]
    )
    torch.testing.assert_close(grad_bias.double().cpu(), torch.tensor([float(side * side)], dtype=torch.float64),
                               rtol=1e-2, atol=0)  # fmt: skip
