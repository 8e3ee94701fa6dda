"""resnet_fused.select: the backend="auto" choice, tested on CPU with a fake device check and a fake timer."""

from __future__ import annotations

import pytest
import torch

import resnet_fused
from resnet_fused import select

_REAL_CAN_TIME = select._can_time


def make_args(n=2, c=8, k=8, hw=6, dtype=torch.float32, channels_last=False, residual=True, **opts):
    x = torch.randn(n, c, hw, hw, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(k, c, 3, 3, dtype=dtype)
    b = torch.randn(k, dtype=dtype)
    r = torch.randn(n, k, hw, hw, dtype=dtype) if residual else None
    conv = {"scale": None, "stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 1, "relu": True}
    conv.update(opts)
    return (x, w, b, r, conv["scale"], conv["stride"], conv["padding"], conv["dilation"], conv["groups"], conv["relu"])


def explain(args, **kwargs) -> str:
    """select.explain for a make_args() tuple."""
    x, w, b, r, scale, stride, padding, dilation, groups, relu = args
    conv = {"scale": scale, "stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    return select.explain(x, w, b, r, **conv, relu=relu, **kwargs)


class FakeTimer:
    def __init__(self, times: dict[str, float], fail: dict[str, Exception] | None = None):
        self.times = times
        self.fail = fail or {}
        self.calls: list[str] = []

    def __call__(self, name, fn, device):
        assert callable(fn)
        self.calls.append(name)
        if name in self.fail:
            raise self.fail[name]
        return self.times[name]


@pytest.fixture
def fake_cuda(monkeypatch):
    """Pretend x is a CUDA tensor and both CUDA backends can run; return the fake timer to configure."""
    monkeypatch.delenv(select.ENV_VAR, raising=False)
    select.clear_cache()
    timer = FakeTimer({"cuda": 2.0, "triton": 1.0})
    monkeypatch.setattr(select, "_is_cuda", lambda x: True)
    monkeypatch.setattr(select, "_cuda_backend_status", lambda: {"cuda": "", "triton": ""})
    monkeypatch.setattr(select, "_can_time", lambda: True)
    monkeypatch.setattr(select, "_time_backend", timer)
    yield timer
    select.clear_cache()


def test_cpu_tensors_choose_cpu(monkeypatch):
    monkeypatch.delenv(select.ENV_VAR, raising=False)
    args = make_args()
    assert select.choose_backend(*args) == "cpu"
    text = explain(args)
    assert text.startswith("cpu: ") and "only fused CPU backend" in text


def test_times_once_per_key_and_picks_the_fastest(fake_cuda):
    args = make_args()
    assert select.choose_backend(*args) == "triton"
    assert sorted(fake_cuda.calls) == ["cuda", "triton"]
    # Same key, even with fresh tensors: no new timing.
    fake_cuda.times = {"cuda": 0.5, "triton": 9.0}
    assert select.choose_backend(*make_args()) == "triton"
    assert len(fake_cuda.calls) == 2
    assert len(select.cached_choices()) == 1


@pytest.mark.parametrize(
    "change",
    [
        {"n": 3},
        {"k": 16},
        {"hw": 7},
        {"dtype": torch.float64},
        {"channels_last": True},
        {"residual": False},
        {"stride": (2, 2)},
        {"padding": (0, 0)},
        {"dilation": (2, 2)},
        {"relu": False},
        {"scale": torch.ones(8)},
    ],
    ids=lambda d: next(iter(d)),
)
def test_each_key_part_gets_its_own_timing(fake_cuda, change):
    assert select.choose_backend(*make_args()) == "triton"
    fake_cuda.times = {"cuda": 0.5, "triton": 9.0}
    assert select.choose_backend(*make_args(**change)) == "cuda"
    assert len(fake_cuda.calls) == 4
    assert len(select.cached_choices()) == 2


def test_explain_reports_timings_and_winner(fake_cuda):
    text = explain(make_args())
    assert text.startswith("triton: fastest")
    assert "triton 1.000 ms" in text and "cuda 2.000 ms" in text
    # explain and the call agree, and explain's timing is the call's: no second timing.
    assert select.choose_backend(*make_args()) == "triton"
    assert len(fake_cuda.calls) == 2


def test_explicit_backend_is_explained_without_timing(fake_cuda):
    args = make_args()
    assert explain(args, backend="cpu") == "cpu: requested explicitly with backend='cpu'"
    assert explain(args, backend="reference") == "reference: requested explicitly with backend='reference'"
    assert fake_cuda.calls == []
    with pytest.raises(ValueError, match="backend: expected one of"):
        explain(args, backend="fastest")


def test_explicit_backend_that_cannot_run_raises_like_the_call():
    args = make_args()  # CPU tensors, and no GPU here
    x, w, b, r, scale, stride, padding, dilation, groups, relu = args
    kwargs = {"scale": scale, "stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    with pytest.raises((RuntimeError, ValueError)) as from_call:
        resnet_fused.conv_bias_add_relu(x, w, b, r, **kwargs, relu=relu, backend="cuda")
    with pytest.raises(type(from_call.value), match="backend: 'cuda'"):
        explain(args, backend="cuda")


def test_env_var_forces_a_backend_without_timing(fake_cuda, monkeypatch):
    monkeypatch.setenv(select.ENV_VAR, "cuda")
    args = make_args()
    assert select.choose_backend(*args) == "cuda"
    assert "forced by RESNET_FUSED_BACKEND=cuda" in explain(args)
    assert fake_cuda.calls == []
    monkeypatch.setenv(select.ENV_VAR, "Triton ")
    assert select.choose_backend(*args) == "triton"
    monkeypatch.setenv(select.ENV_VAR, "auto")
    assert select.choose_backend(*args) == "triton"
    assert len(fake_cuda.calls) == 2


def test_env_var_errors(monkeypatch):
    args = make_args()  # CPU tensors
    monkeypatch.setenv(select.ENV_VAR, "gpu")
    with pytest.raises(ValueError, match=r"RESNET_FUSED_BACKEND: expected one of .*got 'gpu'"):
        select.choose_backend(*args)
    monkeypatch.setenv(select.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="RESNET_FUSED_BACKEND=cuda forces the cuda backend, but x is on cpu"):
        select.choose_backend(*args)
    monkeypatch.setenv(select.ENV_VAR, "reference")
    assert select.choose_backend(*args) == "reference"
    monkeypatch.setenv(select.ENV_VAR, "cpu")
    assert select.choose_backend(*args) == "cpu"


def test_env_var_forcing_an_unavailable_backend(fake_cuda, monkeypatch):
    monkeypatch.setattr(select, "_cuda_backend_status", lambda: {"cuda": "", "triton": "triton is not installed"})
    monkeypatch.setenv(select.ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match="forces the triton backend, which cannot run: triton is not installed"):
        select.choose_backend(*make_args())


def test_single_available_backend_is_not_timed(fake_cuda, monkeypatch):
    monkeypatch.setattr(select, "_cuda_backend_status", lambda: {"cuda": "", "triton": "no triton here"})
    args = make_args()
    assert select.choose_backend(*args) == "cuda"
    assert fake_cuda.calls == []
    assert "the only available CUDA backend (triton unavailable: no triton here)" in explain(args)


def test_no_available_backend_raises(fake_cuda, monkeypatch):
    monkeypatch.setattr(select, "_cuda_backend_status", lambda: {"cuda": "built without CUDA", "triton": "no triton"})
    with pytest.raises(RuntimeError, match=r"no CUDA backend can run here.*built without CUDA.*no triton"):
        select.choose_backend(*make_args())


def test_failing_backend_loses(fake_cuda):
    fake_cuda.fail = {"triton": RuntimeError("unsupported dilation\nmore")}
    args = make_args()
    assert select.choose_backend(*args) == "cuda"
    text = explain(args)
    assert "triton failed (RuntimeError: unsupported dilation)" in text


def test_all_backends_failing_raises(fake_cuda):
    fake_cuda.fail = {"triton": RuntimeError("bad"), "cuda": ValueError("worse")}
    with pytest.raises(RuntimeError, match="every CUDA backend failed"):
        select.choose_backend(*make_args())
    assert select.cached_choices() == {}


def test_no_timing_while_compiling_or_capturing(fake_cuda, monkeypatch):
    monkeypatch.setattr(select, "_can_time", lambda: False)
    args = make_args()
    assert select.choose_backend(*args) == "cuda"
    assert "cannot be timed inside torch.compile" in explain(args)
    assert fake_cuda.calls == [] and select.cached_choices() == {}
    # Once timing can run, the case is timed and cached.
    monkeypatch.setattr(select, "_can_time", lambda: True)
    assert select.choose_backend(*args) == "triton"
    assert len(select.cached_choices()) == 1


def test_cuda_available_matches_the_dispatcher_and_device():
    ok, why = select.cuda_available()
    registered = torch._C._dispatch_has_kernel_for_dispatch_key("resnet_fused::conv_bias_add_relu", "CUDA")
    assert ok == (registered and torch.cuda.is_available())
    assert isinstance(why, str) and why


def test_real_timer_needs_no_mocks_on_cpu_choice(monkeypatch):
    """Without mocks, CPU tensors never reach the timer (which needs CUDA events)."""
    monkeypatch.delenv(select.ENV_VAR, raising=False)

    def boom(*a, **k):
        raise AssertionError("timer called for a CPU tensor")

    monkeypatch.setattr(select, "_time_backend", boom)
    assert select.choose_backend(*make_args()) == "cpu"


def test_choice_traces_under_torch_compile_fullgraph(fake_cuda, monkeypatch):
    """Inside torch.compile nothing is timed: the default until the case is timed eagerly, then the cached winner."""
    monkeypatch.setattr(select, "_can_time", _REAL_CAN_TIME)  # the fixture's fake says "always"
    args = make_args()

    def f(x):
        chosen = select.choose_backend(x, *args[1:])
        return x * (2.0 if chosen == "cuda" else 3.0)

    x = args[0]
    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, fullgraph=True, backend="eager")(x), x * 2.0)
    assert fake_cuda.calls == []
    assert f(x).equal(x * 3.0)  # eager: times, triton wins
    assert sorted(fake_cuda.calls) == ["cuda", "triton"]
    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, fullgraph=True, backend="eager")(x), x * 3.0)
    assert len(fake_cuda.calls) == 2
    torch._dynamo.reset()
