"""What only the cuda backend has, on a GPU: cuDNN on/off and the opt-in cuDNN fused path (NaN propagation, a
NaN-poisoned allocator), the unaligned scalar kernels, grad_bias determinism, the backward's output mask, the
kernel-image check, and int64 indexing.

The correctness suite (every case, dtype, layout and epilogue against float64) runs on cuda as one of its targets in
tests/test_conv_bias_add_relu.py. Skipped without a GPU or with a CPU-only build; a user with a GPU runs
``pytest tests/test_cuda_runtime.py``.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import FULL, PREACT, Case, Epilogue, assert_close, check_call, make_inputs, reference_forward

from resnet_fused.backends import BACKENDS

CUDA_WHY = BACKENDS["cuda"].unavailable()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(bool(CUDA_WHY), reason=f"cuda backend unavailable: {CUDA_WHY}")]

OP = torch.ops.resnet_fused.conv_bias_add_relu.default
BACKWARD = torch.ops.resnet_fused.conv_bias_add_relu_backward.default
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ODD = Case(3, 5, 9, 11, 7, 3, 3, 1, 2, 2)
RESNET_3X3 = Case(2, 64, 14, 14, 64, 3, 3, 1, 1)
RELU_ONLY = Epilogue(False, False, False, True)
BIAS_RELU = Epilogue(True, False, False, True)
CUDNN_FUSED_ENV = "RESNET_FUSED_CUDNN_FUSED"


@contextlib.contextmanager
def cudnn_disabled():
    """cudnn.flags(enabled=False) would also read the legacy allow_tf32, which torch refuses once a test has set
    conv's per-op setting."""
    old = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = False
    try:
        yield
    finally:
        torch.backends.cudnn.enabled = old


def cuda_inputs(case, dtype, epilogue=FULL, layout="nchw", **kw):
    return make_inputs(case, dtype, layout, epilogue, device="cuda", **kw)


def run(inputs):
    return OP(*inputs.op_args())


def test_kernel_image_for_every_device():
    """The build has an image (SASS, or PTX the driver JITs) for every visible GPU, and says so."""
    for device in range(torch.cuda.device_count()):
        assert torch.ops.resnet_fused.cuda_kernel_status(device) == "", device


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("epilogue", [FULL, RELU_ONLY], ids=["full", "relu"])
def test_without_cudnn(epilogue, layout, dtype):
    """With cuDNN disabled, ATen's (non-cuDNN) conv feeds our epilogue kernel."""
    inputs = cuda_inputs(ODD, dtype, epilogue, layout)
    with cudnn_disabled():
        y = run(inputs)
        check_call(y, inputs, dtype, f"no-cudnn/{layout}/{dtype}")


@pytest.mark.parametrize("fused", [False, True], ids=["default", "cudnn_fused"])
@pytest.mark.parametrize("epilogue", [FULL, RELU_ONLY, BIAS_RELU], ids=["full", "relu", "bias_relu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_propagates_through_relu(dtype, epilogue, fused, monkeypatch):
    """relu(NaN) is NaN on every path, as torch.relu gives; cuDNN's fused ReLU (NOT_PROPAGATE_NAN by default) must
    pass this before it may be turned on by default."""
    monkeypatch.setenv(CUDNN_FUSED_ENV, "1" if fused else "0")
    inputs = cuda_inputs(RESNET_3X3, dtype, epilogue, "channels_last", requires_grad=False)
    x = inputs.tensors["x"]
    x[0, :, 3, 4] = float("nan")
    x[1, 2, 7, 7] = float("-inf")
    y = run(inputs)
    assert torch.isnan(y[0, :, 2:5, 3:6]).all(), "a NaN input must give NaN outputs where the 3x3 window sees it"
    assert_close(y, reference_forward(inputs), dtype, f"nan/{'fused' if fused else 'default'}", 64 * 9)


@pytest.mark.parametrize("fused", [False, True], ids=["default", "cudnn_fused"])
@pytest.mark.parametrize("epilogue", [RELU_ONLY, BIAS_RELU, FULL], ids=["relu", "bias_relu", "full"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_poisoned_allocator_never_leaks_into_the_output(dtype, epilogue, fused, monkeypatch):
    """Fill the caching allocator's free blocks with NaN bit patterns, then run: no path may read an uninitialised
    buffer (at::cudnn_convolution_relu passes its fresh output as z with alpha2 = 0)."""
    monkeypatch.setenv(CUDNN_FUSED_ENV, "1" if fused else "0")
    inputs = cuda_inputs(RESNET_3X3, dtype, epilogue, "channels_last", requires_grad=False)
    for _ in range(2):
        poison = [torch.full((1 << 22,), float("nan"), dtype=dt, device="cuda") for dt in (dtype, torch.float32)]
        poison += [torch.full((n,), float("nan"), dtype=dtype, device="cuda") for n in (2 * 64 * 14 * 14, 64 * 64 * 9)]
        torch.cuda.synchronize()
        del poison  # the blocks stay in the allocator's cache, full of NaN
        y = run(inputs)
        torch.cuda.synchronize()
        assert not torch.isnan(y).any(), "NaN in the output of finite inputs: an uninitialised buffer was read"
        assert_close(y, reference_forward(inputs), dtype, "poisoned", 64 * 9)


def unaligned_copy(t):
    """A contiguous copy of t whose data starts one element past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    shifted = buf[1:].view(t.shape)
    shifted.copy_(t)
    assert shifted.data_ptr() % 16 != 0 and shifted.is_contiguous()
    return shifted.requires_grad_(t.requires_grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "epilogue", [FULL, PREACT, Epilogue(False, True, True, True)], ids=["full", "preact", "no-bias"]
)
def test_unaligned_tensors_take_the_scalar_path(epilogue, dtype):
    """An unaligned residual (forward epilogue) and grad_out (backward) use the VEC=1 kernels. With a bias gradient
    the backward copies grad_out to aligned memory first (its per-block sums depend on the shape alone): only the
    bias-free epilogue runs the scalar backward kernel."""
    inputs = cuda_inputs(ODD, dtype, epilogue)
    inputs.tensors["residual"] = unaligned_copy(inputs.tensors["residual"].detach())
    inputs = inputs._replace(grad_out=unaligned_copy(inputs.grad_out))
    y = run(inputs)
    check_call(y, inputs, dtype, f"unaligned/{dtype}")


def backward_args(inputs, y):
    kw = inputs.kwargs
    t = inputs.tensors
    return (inputs.grad_out, y.detach(), t["x"].detach(), t["weight"].detach(), kw["scale"], [1, 1], [1, 1], [1, 1],
            1, kw["relu"])  # fmt: skip


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_grad_bias_is_deterministic(layout):
    inputs = cuda_inputs(RESNET_3X3, torch.float32, FULL, layout)
    args = backward_args(inputs, run(inputs))
    first = BACKWARD(*args, [False, False, True, True])
    for _ in range(3):
        again = BACKWARD(*args, [False, False, True, True])
        assert torch.equal(first[2], again[2]) and torch.equal(first[3], again[3])


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_grad_bias_bits_do_not_follow_alignment(layout):
    """The same grad_out values at a misaligned address (a view 4 bytes into its storage) give the same grad_bias
    bits: the vector and scalar kernels summed in different orders."""
    inputs = cuda_inputs(RESNET_3X3, torch.float32, FULL, layout)
    args = list(backward_args(inputs, run(inputs)))
    grad = args[0]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    storage = torch.empty(grad.numel() + 1, dtype=grad.dtype, device=grad.device)
    shifted = storage[1:].view(grad.permute(0, 2, 3, 1).shape if layout == "channels_last" else grad.shape)
    shifted = shifted.permute(0, 3, 1, 2) if layout == "channels_last" else shifted
    shifted.copy_(grad)
    assert shifted.is_contiguous(memory_format=fmt) and shifted.data_ptr() % 16 != 0
    first = BACKWARD(*args, [False, False, True, False])
    args[0] = shifted
    again = BACKWARD(*args, [False, False, True, False])
    assert torch.equal(first[2], again[2])


def test_backward_output_mask():
    inputs = cuda_inputs(RESNET_3X3, torch.float16, FULL)
    args = backward_args(inputs, run(inputs))
    grads = BACKWARD(*args, [False, False, True, False])
    assert [g.numel() == 0 for g in grads] == [True, True, False, True]
    assert grads[2].shape == (64,)
    grads = BACKWARD(*args, [True, False, False, False])
    assert grads[0].shape == inputs.tensors["x"].shape and all(g.numel() == 0 for g in grads[1:])
    with pytest.raises(ValueError, match="output_mask"):
        BACKWARD(*args[:-1], False, [False, False, False, True])


@pytest.mark.slow
def test_indexing_past_2_pow_31_elements():
    """int64 indexing: an output of 2^31 + 4633 elements (1x1 conv, bf16); checks the last elements."""
    side = 46341  # side**2 > 2**31
    need = 4 * side * side * 2  # x, residual, y, grad in bf16
    free, _ = torch.cuda.mem_get_info()
    if free < need * 1.3:
        pytest.skip(f"needs ~{need * 1.3 / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    dt = torch.bfloat16
    x = torch.full((1, 1, side, side), 0.5, dtype=dt, device="cuda")
    x[..., -1, -8:] = torch.arange(8, device="cuda", dtype=dt)
    w = torch.full((1, 1, 1, 1), 2.0, dtype=dt, device="cuda")
    b = torch.full((1,), 0.25, dtype=dt, device="cuda")
    r = torch.full((1, 1, side, side), 1.0, dtype=dt, device="cuda")
    y = OP(x, w, b, r, None, [1, 1], [0, 0], [1, 1], 1, False)
    expected_tail = torch.arange(8, device="cuda", dtype=torch.float64) * 2 + 1.25
    assert torch.equal(y[0, 0, -1, -8:].double(), expected_tail)
    assert torch.all(y[0, 0, -2, :] == 2.25)
    del x, r
    grad = torch.ones_like(y)
    _, _, grad_bias, _ = BACKWARD(
        grad, y, y.new_empty(1, 1, side, side), w, None, [1, 1], [0, 0], [1, 1], 1, False, [False, False, True, False]
    )
    torch.testing.assert_close(grad_bias.double().cpu(), torch.tensor([float(side * side)], dtype=torch.float64),
                               rtol=1e-2, atol=0)  # fmt: skip
