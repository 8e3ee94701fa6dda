"""The backend="auto" chooser, on a backend table of fake rows with a fake timer: no GPU and no patching."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

import resnet_fused
from resnet_fused import reference, select
from resnet_fused.backends import BACKENDS, Backend, Table
from resnet_fused.contract import conv_output_shape


def _reference_op(x, weight, bias, residual, scale, stride, padding, dilation, groups, relu):
    kw = dict(scale=scale, stride=stride, padding=padding, dilation=dilation, groups=groups, relu=relu)
    return reference.conv_bias_add_relu(x, weight, bias, residual, **kw)


class Log:
    """What the fake backends ran: ("forward", name) and ("backward", name) events."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []


def fake_row(name: str, log: Log, why: str = "") -> Backend:
    """A cpu row that runs the reference and logs its forward and backward."""

    class Logged(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y):
            return y.clone()

        @staticmethod
        def backward(ctx, grad):
            log.events.append(("backward", name))
            return grad

    def op(*args):
        log.events.append(("forward", name))
        return Logged.apply(_reference_op(*args))

    return Backend(name, ("cpu",), ("cpu",), lambda: op, lambda: why)


class FakeTimer:
    """Returns set milliseconds per backend (or raises), after running the call once."""

    def __init__(self, times: dict[str, float], fail: dict[str, Exception] | None = None) -> None:
        self.times, self.fail = times, fail or {}
        self.calls: list[str] = []

    def __call__(self, backend: Backend, call, device: torch.device) -> float:
        self.calls.append(backend.name)
        call()
        if backend.name in self.fail:
            raise self.fail[backend.name]
        return self.times[backend.name]


@pytest.fixture
def setup(monkeypatch):
    """A two-row table ("slow" first, "fast" second), its log and a fake timer where "fast" wins."""
    monkeypatch.delenv(select.ENV_VAR, raising=False)
    log = Log()
    table = Table([fake_row("slow", log), fake_row("fast", log)])
    timer = FakeTimer({"slow": 2.0, "fast": 1.0})
    select.clear_cache()
    yield table, timer, log
    select.clear_cache()


def make_args(n=2, c=8, k=8, hw=6, dtype=torch.float32, channels_last=False, residual=True, grad=False, *,
              weight_cl=False, residual_cl=False, bias=True, x_grad=False, **opts):  # fmt: skip
    cl = torch.channels_last
    x = torch.randn(n, c, hw, hw, dtype=dtype, requires_grad=x_grad)
    if channels_last:
        x = x.detach().to(memory_format=cl).requires_grad_(x_grad)
    w = torch.randn(k, c, 3, 3, dtype=dtype)
    w = w.to(memory_format=cl if weight_cl else torch.contiguous_format).requires_grad_(grad)
    b = torch.randn(k, dtype=dtype) if bias else None
    conv = {"scale": None, "stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 1, "relu": True}
    conv.update(opts)
    shape = conv_output_shape(x.shape, w.shape, conv["stride"], conv["padding"], conv["dilation"])
    r = torch.randn(shape, dtype=dtype).to(memory_format=cl if residual_cl else torch.contiguous_format)
    r = r if residual else None
    return (x, w, b, r, conv["scale"], conv["stride"], conv["padding"], conv["dilation"], conv["groups"], conv["relu"])


def choose(args, table, timer) -> str:
    return select.choose(*args, table=table, timer=timer).backend


def explain(args, table, timer, **kwargs) -> str:
    x, w, b, r, scale, stride, padding, dilation, groups, relu = args
    conv = {"scale": scale, "stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
    return select.explain(x, w, b, r, **conv, relu=relu, table=table, timer=timer, **kwargs)


def doubled_if_slow(args, table, timer):
    """f(x): x * 2 where the chooser picks "slow" (the table's first) for x and the rest of ``args``, else x * 3: what
    the chooser picked, readable from a traced or compiled graph."""

    def f(x):
        chosen = select.choose(x, *args[1:], table=table, timer=timer).backend
        return x * (2.0 if chosen == "slow" else 3.0)

    return f


def test_cpu_tensors_choose_cpu_in_the_real_table(monkeypatch):
    monkeypatch.delenv(select.ENV_VAR, raising=False)
    args = make_args()
    assert select.choose(*args).backend == "cpu"
    text = select.explain(*args[:4], scale=None, padding=1)
    assert text.startswith("cpu: the only available backend for cpu tensors")
    assert select.cached_choices() == {} or all(c.backend == "cpu" for c in select.cached_choices().values())


def test_times_once_per_key_and_picks_the_fastest(setup):
    table, timer, _ = setup
    assert choose(make_args(), table, timer) == "fast"
    assert sorted(timer.calls) == ["fast", "slow"]
    # Same key, even with fresh tensors: no new timing.
    timer.times = {"slow": 0.5, "fast": 9.0}
    assert choose(make_args(), table, timer) == "fast"
    assert len(timer.calls) == 2 and len(select.cached_choices()) == 1


@pytest.mark.parametrize(
    "change",
    [{"n": 3}, {"k": 16}, {"hw": 7}, {"dtype": torch.float64}, {"channels_last": True}, {"residual": False},
     {"stride": (2, 2)}, {"padding": (0, 0)}, {"dilation": (2, 2)}, {"relu": False}, {"scale": torch.ones(8)},
     {"grad": True}, {"weight_cl": True}, {"residual_cl": True}, {"bias": False}],
    ids=lambda d: next(iter(d)),
)  # fmt: skip
def test_each_key_part_gets_its_own_timing(setup, change):
    table, timer, _ = setup
    assert choose(make_args(), table, timer) == "fast"
    timer.times = {"slow": 0.5, "fast": 9.0}
    assert choose(make_args(**change), table, timer) == "slow"
    assert len(timer.calls) == 4 and len(select.cached_choices()) == 2


def test_which_inputs_the_backward_differentiates_gets_its_own_timing(setup):
    """A frozen layer's backward (grad_x alone), a first layer's (grad_w alone) and both cost differently."""
    table, timer, _ = setup
    assert choose(make_args(grad=True), table, timer) == "fast"
    timer.times = {"slow": 0.5, "fast": 9.0}
    assert choose(make_args(x_grad=True), table, timer) == "slow"
    timer.times = {"slow": 9.0, "fast": 0.5}
    assert choose(make_args(grad=True, x_grad=True), table, timer) == "fast"
    assert len(timer.calls) == 6 and len(select.cached_choices()) == 3


def test_cudnn_settings_get_their_own_timing(setup):
    """cudnn.benchmark and cudnn.enabled change the cuda backend's speed: a choice timed under one says nothing of
    the other."""
    table, timer, _ = setup
    assert choose(make_args(), table, timer) == "fast"
    timer.times = {"slow": 0.5, "fast": 9.0}
    cudnn, before = torch.backends.cudnn, (torch.backends.cudnn.benchmark, torch.backends.cudnn.enabled)
    try:
        cudnn.benchmark = not before[0]
        assert choose(make_args(), table, timer) == "slow"
        cudnn.benchmark, cudnn.enabled = before[0], not before[1]
        assert choose(make_args(), table, timer) == "slow"
    finally:
        cudnn.benchmark, cudnn.enabled = before
    assert len(timer.calls) == 6 and len(select.cached_choices()) == 3


def test_timing_runs_the_backward_when_inputs_require_grad(setup):
    table, timer, log = setup
    choose(make_args(), table, timer)
    assert set(log.events) == {("forward", "slow"), ("forward", "fast")}
    log.events.clear()
    choose(make_args(grad=True), table, timer)
    assert set(log.events) == {("forward", "slow"), ("forward", "fast"), ("backward", "slow"), ("backward", "fast")}
    assert "fastest forward+backward" in explain(make_args(grad=True), table, timer)


def test_under_no_grad_timing_runs_the_forward_only(setup):
    """Inference under torch.no_grad() with parameters that require grad (the usual pattern): the call records no
    backward, so the choice is timed and kept as a forward-only one."""
    table, timer, log = setup
    with torch.no_grad():
        choose(make_args(grad=True), table, timer)
        assert "fastest forward when timed" in explain(make_args(grad=True), table, timer)
    assert set(log.events) == {("forward", "slow"), ("forward", "fast")}
    with torch.no_grad():
        choose(make_args(), table, timer)
    assert len(timer.calls) == 2  # one timing for both: the same forward-only key


def test_timing_never_writes_into_the_callers_tensors(setup):
    table, timer, _ = setup
    args = make_args(grad=True)
    choose(args, table, timer)
    assert args[1].grad is None


def test_explain_reports_timings_and_winner(setup):
    table, timer, _ = setup
    text = explain(make_args(), table, timer)
    assert text.startswith("fast: fastest forward")
    assert "fast 1.000 ms" in text and "slow 2.000 ms" in text
    # explain and the call agree, and explain's timing is the call's: no second timing.
    assert choose(make_args(), table, timer) == "fast" and len(timer.calls) == 2


def test_explicit_backend_is_explained_without_timing(setup):
    table, timer, _ = setup
    args = make_args()
    assert explain(args, table, timer, backend="slow") == "slow: requested explicitly with backend='slow'"
    assert timer.calls == []
    with pytest.raises(ValueError, match=r"backend: expected one of \('auto', 'slow', 'fast'\), got 'fastest'"):
        explain(args, table, timer, backend="fastest")
    assert select.resolve_backend("slow", *args, table=table, timer=timer) == "slow"


def test_explicit_backend_that_cannot_run_raises_like_the_call():
    x, w, b, r, scale, stride, padding, dilation, groups, relu = make_args()
    for name in set(BACKENDS.names()) - set(resnet_fused.available_backends()):
        kwargs = {"scale": scale, "stride": stride, "padding": padding, "dilation": dilation, "groups": groups}
        with pytest.raises(RuntimeError, match=f"backend: '{name}' is not available") as from_call:
            resnet_fused.conv_bias_add_relu(x, w, b, r, **kwargs, relu=relu, backend=name)
        with pytest.raises(RuntimeError) as from_explain:
            select.explain(x, w, b, r, **kwargs, relu=relu, backend=name)
        assert str(from_explain.value) == str(from_call.value)


def test_env_var_forces_a_backend_without_timing(setup, monkeypatch):
    table, timer, _ = setup
    monkeypatch.setenv(select.ENV_VAR, "slow")
    args = make_args()
    assert choose(args, table, timer) == "slow"
    assert "forced by RESNET_FUSED_BACKEND=slow" in explain(args, table, timer)
    assert timer.calls == []
    monkeypatch.setenv(select.ENV_VAR, " Fast ")
    assert choose(args, table, timer) == "fast"
    monkeypatch.setenv(select.ENV_VAR, "auto")
    assert choose(args, table, timer) == "fast" and len(timer.calls) == 2


def test_env_var_errors(setup, monkeypatch):
    table, timer, log = setup
    args = make_args()
    monkeypatch.setenv(select.ENV_VAR, " GpU ")  # the value as set, not as normalised
    with pytest.raises(
        ValueError, match=r"RESNET_FUSED_BACKEND: expected one of \('auto', 'slow', 'fast'\), got ' GpU '"
    ):
        choose(args, table, timer)
    monkeypatch.setenv(select.ENV_VAR, " Fast ")  # case and surrounding spaces do not matter
    assert choose(args, table, timer) == "fast"
    broken = Table([fake_row("slow", log, why="not built"), fake_row("fast", log)])
    monkeypatch.setenv(select.ENV_VAR, "slow")
    with pytest.raises(RuntimeError, match=r"RESNET_FUSED_BACKEND=slow: 'slow' is not available .*\(not built\)"):
        choose(args, broken, timer)
    gpu_only = Table([Backend("gpu", ("cuda",), ("cuda",), lambda: _reference_op, lambda: ""), fake_row("fast", log)])
    monkeypatch.setenv(select.ENV_VAR, "gpu")
    with pytest.raises(ValueError, match=r"RESNET_FUSED_BACKEND=gpu: 'gpu' runs on cuda tensors, got x on cpu"):
        choose(args, gpu_only, timer)


def test_env_var_is_checked_under_differentiating_transforms(monkeypatch):
    """Under torch.func.grad or forward-mode AD the call runs the unfused ops whatever the variable names, but a
    value that names no backend is still refused, as on any auto call."""
    import torch.autograd.forward_ad as fwAD

    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3)

    def loss(w):
        return resnet_fused.conv_bias_add_relu(x, w).sum()

    monkeypatch.setenv(select.ENV_VAR, "gpu")
    with pytest.raises(ValueError, match=r"RESNET_FUSED_BACKEND: expected one of \('auto', .*\), got 'gpu'"):
        torch.func.grad(loss)(w)
    said = []

    def explained(w):  # explain refuses it too, before the call would
        said.append(resnet_fused.explain(x, w))
        return loss(w)

    with pytest.raises(ValueError, match="RESNET_FUSED_BACKEND: expected one of"):
        torch.func.grad(explained)(w)
    assert said == []
    with fwAD.dual_level(), pytest.raises(ValueError, match="RESNET_FUSED_BACKEND: expected one of"):
        resnet_fused.conv_bias_add_relu(fwAD.make_dual(x, torch.ones_like(x)), w)
    monkeypatch.setenv(select.ENV_VAR, "cpu")
    expected = torch.func.grad(lambda w: reference.conv_bias_add_relu(x, w).sum())(w)
    torch.testing.assert_close(torch.func.grad(loss)(w), expected, rtol=0, atol=0)


def test_single_available_candidate_is_not_timed(setup):
    _, timer, log = setup
    table = Table([fake_row("slow", log, why="no slow here"), fake_row("fast", log)])
    args = make_args()
    assert choose(args, table, timer) == "fast" and timer.calls == []
    assert "the only available backend for cpu tensors (slow unavailable: no slow here)" in explain(args, table, timer)


def test_no_available_candidate_raises(setup):
    _, timer, log = setup
    table = Table([fake_row("slow", log, why="not built"), fake_row("fast", log, why="no driver")])
    with pytest.raises(RuntimeError, match=r"x: no fused backend can run on cpu \(slow: not built; fast: no driver\)"):
        choose(make_args(), table, timer)


def test_no_candidate_points_to_what_runs_on_that_device(setup):
    """The error suggests a backend only where its row takes x's device (it said backend='reference', whose row then
    refused a device it does not list); else the reference function, which runs the unfused ops anywhere."""
    _, timer, log = setup
    unfused = Backend("unfused", ("cpu",), (), lambda: _reference_op, lambda: "")
    table = Table([fake_row("fast", log, why="no driver"), unfused])
    with pytest.raises(
        RuntimeError, match=r"\(fast: no driver\); expected a cpu or cuda tensor, or use backend='unfused'$"
    ):
        choose(make_args(), table, timer)
    table = Table([fake_row("fast", log, why="no driver")])
    with pytest.raises(RuntimeError, match=r"or use resnet_fused\.reference\.conv_bias_add_relu \(the unfused ops"):
        choose(make_args(), table, timer)


def test_failing_backend_loses(setup):
    table, timer, _ = setup
    timer.fail = {"fast": RuntimeError("unsupported dilation\nmore")}
    args = make_args()
    assert choose(args, table, timer) == "slow"
    assert "fast failed (RuntimeError: unsupported dilation)" in explain(args, table, timer)


def test_out_of_memory_while_timing_is_retried_then_kept(setup):
    """A candidate out of memory may fit once memory is freed: the other wins this call only, and the next calls of
    the same case time both again, OUT_OF_MEMORY_RETRIES times at most (a step near the memory limit would
    otherwise time them on every call); then the choice is kept."""
    table, timer, _ = setup
    timer.fail = {"fast": torch.OutOfMemoryError("CUDA out of memory")}
    args = make_args()
    assert choose(args, table, timer) == "slow"
    assert select.cached_choices() == {}
    assert "fast failed (torch.OutOfMemoryError); for this call only" in explain(args, table, timer)
    timer.fail = {}
    assert choose(args, table, timer) == "fast"
    assert timer.calls == ["slow", "fast"] * 3 and len(select.cached_choices()) == 1
    select.clear_cache()
    timer.calls.clear()
    timer.fail = {"fast": torch.OutOfMemoryError("CUDA out of memory")}
    for _ in range(select.OUT_OF_MEMORY_RETRIES + 3):
        assert choose(args, table, timer) == "slow"
    assert len(timer.calls) == 2 * (select.OUT_OF_MEMORY_RETRIES + 1)
    assert "timed once per process" in select.cached_choices()[next(iter(select.cached_choices()))].reason


def test_out_of_memory_while_timing_frees_the_candidates_tensors(setup):
    """The exception's frames hold what the timed call allocated: the chooser keeps its message, not the exception,
    so the next candidate and the caller's step do not run beside that memory."""
    import weakref

    table, _, _ = setup
    alive = []

    def timer(backend, call, device):
        held = torch.empty(1 << 20)
        alive.append((backend.name, weakref.ref(held)))
        if backend.name == "fast":
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return 1.0

    assert select.choose(*make_args(), table=table, timer=timer).backend == "slow"
    assert [name for name, ref in alive if ref() is not None] == []


def test_every_candidate_out_of_memory_raises_out_of_memory(setup):
    """The caller's OOM handling (a smaller batch, say) catches torch.OutOfMemoryError: the chooser raises it."""
    table, timer, _ = setup
    timer.fail = {"fast": torch.OutOfMemoryError("fast: no memory"), "slow": torch.OutOfMemoryError("slow: none")}
    with pytest.raises(torch.OutOfMemoryError, match="slow: none"):
        choose(make_args(), table, timer)
    timer.fail = {"fast": RuntimeError("bad"), "slow": torch.OutOfMemoryError("slow: none")}
    with pytest.raises(torch.OutOfMemoryError, match="slow: none"):
        choose(make_args(), table, timer)
    assert select.cached_choices() == {}


def test_all_backends_failing_raises(setup):
    table, timer, _ = setup
    timer.fail = {"fast": RuntimeError("bad"), "slow": ValueError("worse")}
    with pytest.raises(RuntimeError, match="every candidate backend failed"):
        choose(make_args(), table, timer)
    assert select.cached_choices() == {}


def test_deterministic_mode_never_times(setup):
    table, timer, _ = setup
    args = make_args(grad=True)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert choose(args, table, timer) == "slow"  # the table's first, however fast the other would be
        assert "use_deterministic_algorithms(True)" in explain(args, table, timer)
    finally:
        torch.use_deterministic_algorithms(before)
    assert timer.calls == [] and select.cached_choices() == {}


def test_cudnn_deterministic_never_times(setup):
    """The usual reproducibility recipe sets cudnn.deterministic alone: a timed choice could differ between runs."""
    table, timer, _ = setup
    before = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        assert choose(make_args(grad=True), table, timer) == "slow"
        assert "cudnn.deterministic" in explain(make_args(grad=True), table, timer)
    finally:
        torch.backends.cudnn.deterministic = before
    assert timer.calls == [] and select.cached_choices() == {}


def test_choice_traces_under_torch_compile_fullgraph(setup):
    """Inside torch.compile nothing is timed, and an eager call's timing is not read either: the compiled code stays
    the table's first, with no guard on the cache (an eager timing later compiles nothing again)."""
    table, timer, _ = setup
    args = make_args()
    f = doubled_if_slow(args, table, timer)
    x = args[0]
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled = torch.compile(f, fullgraph=True, backend="eager")
            assert torch.equal(compiled(x), x * 2.0)
            assert timer.calls == [] and select.cached_choices() == {}
            assert f(x).equal(x * 3.0)  # eager: times, "fast" wins
            assert sorted(timer.calls) == ["fast", "slow"]
            assert torch.equal(compiled(x), x * 2.0)
    finally:
        torch._dynamo.reset()


def test_dynamic_shapes_stay_dynamic_with_several_candidates(setup):
    """A key hashes the shapes: read inside a trace, it specialized a dynamic batch size (one compile per batch size
    under torch.compile(dynamic=True); torch.export with a batch Dim refused or failed)."""
    table, timer, _ = setup
    f = doubled_if_slow(make_args(), table, timer)
    compiles = []

    def counting(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        compiled = torch.compile(f, fullgraph=True, dynamic=True, backend=counting)
        for n in (2, 3, 4):
            x = torch.randn(n, 8, 6, 6)
            assert torch.equal(compiled(x), x * 2.0)
    finally:
        torch._dynamo.reset()
    assert len(compiles) == 1

    class Module(torch.nn.Module):
        def forward(self, x):
            return f(x)

    batch = torch.export.Dim("batch")
    for strict in (True, False):
        program = torch.export.export(Module(), (torch.randn(4, 8, 6, 6),), dynamic_shapes={"x": {0: batch}},
                                      strict=strict)  # fmt: skip
        x = torch.randn(3, 8, 6, 6)
        assert torch.equal(program.module()(x), x * 2.0)
    assert timer.calls == [] and select.cached_choices() == {}


def test_the_default_timer_runs_the_call_on_cpu():
    ran = []
    row = BACKENDS["cpu"]
    ms = select.default_timer(row, lambda: ran.append(1), torch.device("cpu"))
    assert ms >= 0 and len(ran) == select.WARMUP_CALLS + select.TIMED_CALLS


def test_the_first_timing_inside_non_reentrant_checkpointing(setup):
    """The timing runs apart from the caller's saved-tensor hooks: under non-reentrant checkpointing they would pack
    its tensors and start a recomputation in the middle of it."""
    from torch.utils.checkpoint import checkpoint

    table, _, _ = setup
    x, w, b, r, *rest = make_args(grad=True)
    x.requires_grad_(True)

    def run(x, w):
        return resnet_fused.conv_bias_add_relu(x, w, b, r, padding=1)

    def choose_on(x, w):  # the call the op makes, on the checkpointed tensors, with the two-row table
        select.choose(x, w, b, r, *rest, table=table, timer=select.default_timer)
        return run(x, w)

    y = checkpoint(choose_on, x, w, use_reentrant=False)
    gx, gw = torch.autograd.grad(y.sum(), (x, w))
    ex, ew = torch.autograd.grad(run(x, w).sum(), (x, w))
    assert torch.allclose(gx, ex) and torch.allclose(gw, ew)
    assert len(select.cached_choices()) == 1


def test_tracers_and_dispatch_modes_are_never_timed(setup):
    """Under torch.jit.trace (the TorchScript ONNX exporter) or a dispatch mode (make_fx) the table's first is used:
    timing calls would be recorded, and traced shapes cannot make a key."""
    from torch.fx.experimental.proxy_tensor import make_fx

    table, timer, _ = setup
    args = make_args()
    f = doubled_if_slow(args, table, timer)
    x = args[0]
    assert torch.equal(torch.jit.trace(f, (x,), check_trace=False)(x), x * 2.0)
    graph = make_fx(f)(x)
    assert [n.target for n in graph.graph.nodes if n.op == "call_function"] == [torch.ops.aten.mul.Tensor]
    assert timer.calls == [] and select.cached_choices() == {}


def _says_missing() -> str:
    return "missing (test)"


def _says_nothing() -> str:
    return ""


def test_a_copied_replaced_or_unpickled_row_is_a_row_of_its_own():
    """The probe finds a row by its key: a copy restored field by field kept the original's key (a KeyError once the
    original was gone, another row's answer when unpickled in another process), and dataclasses.replace shared the
    original's probe cache (the new probe was never asked)."""
    import copy
    import dataclasses
    import gc
    import pickle

    from resnet_fused.backends import _cpp_op

    row = Backend("copied", ("cpu",), ("cpu",), _cpp_op, _says_missing)
    assert row.unavailable() == "missing (test)"
    others = [copy.copy(row), copy.deepcopy(row), pickle.loads(pickle.dumps(row))]
    others.append(dataclasses.replace(row, probe=_says_nothing))
    del row
    gc.collect()
    assert [o.unavailable() for o in others] == ["missing (test)"] * 3 + [""]
    assert others[3].op is _cpp_op()


def test_a_first_probe_inside_torch_compile_fullgraph():
    """The first ``auto`` call on a device may happen inside torch.compile, where the probe's torch calls (the
    dispatcher's kernel query, the CUDA checks) return no tensor: it runs eagerly, once, as a constant."""
    from resnet_fused.backends import _cpp_op, _cuda_probe

    row = Backend("cuda", ("cuda",), ("cuda",), _cpp_op, _cuda_probe)
    torch._dynamo.reset()
    try:
        x = torch.ones(2)
        y = torch.compile(lambda x: x + len(row.unavailable()), fullgraph=True, backend="eager")(x)
    finally:
        torch._dynamo.reset()
    assert torch.equal(y, x + len(_cuda_probe())) and row.unavailable() == _cuda_probe()


def test_a_first_probe_and_load_inside_torch_compile_leave_no_guard():
    """A row probed and loaded for the first time inside torch.compile (the first call of a compiled converted model
    in a fresh process) must not guard on the row's cache: filling it during the trace failed that guard on the next
    call, and the whole model compiled a second time."""
    from resnet_fused.backends import _cpp_backward_op, _cpp_op

    row = Backend("cpu", ("cpu",), ("cpu",), _cpp_op, lambda: "", load_backward=_cpp_backward_op)
    x, w = torch.randn(1, 2, 3, 3), torch.randn(2, 2, 1, 1)

    def f(x):
        assert row.unavailable() == "" and row.split_backward is not None
        return row.op(x, w, None, None, None, [1, 1], [0, 0], [1, 1], 1, True)

    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled = torch.compile(f, fullgraph=True, backend="eager")
            for _ in range(3):
                assert torch.equal(compiled(x), f(x))
    finally:
        torch._dynamo.reset()


def test_meta_tensors_infer_shapes_as_conv2d_does():
    """Meta tensors (shape inference, FLOP counting) run the dispatcher op's fake kernel, forward and backward,
    through ``auto``, the modules and convert, as nn.Conv2d runs on them."""
    from resnet_fused.nn import FusedConv2d

    x = torch.empty(2, 3, 9, 9, device="meta", requires_grad=True)
    w = torch.empty(4, 3, 3, 3, device="meta", requires_grad=True)
    r = torch.empty(2, 4, 5, 5, device="meta")
    y = resnet_fused.conv_bias_add_relu(x, w, None, r, stride=2, padding=1)
    assert y.device.type == "meta" and y.shape == torch.nn.functional.conv2d(x, w, stride=2, padding=1).shape
    y.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape
    m = FusedConv2d(3, 4, 3, stride=2, padding=1, device="meta")
    assert m(x).shape == torch.nn.Conv2d(3, 4, 3, stride=2, padding=1, device="meta")(x).shape
    assert resnet_fused.explain(x.detach(), w.detach()).startswith("cpu: ")


def test_explain_answers_what_the_call_runs_under_transforms_and_autocast():
    """Under a differentiating torch.func transform the call runs the unfused ops, and refuses a named fused backend;
    under autocast it casts first. explain says the same."""
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3)
    said = {}

    def loss(w, backend):
        said[backend] = resnet_fused.explain(x, w, backend=backend)
        return resnet_fused.conv_bias_add_relu(x, w, backend=backend).sum()

    torch.func.grad(loss)(w, "auto")
    assert said["auto"].startswith("reference: ")
    with pytest.raises(NotImplementedError, match=r"backend: expected 'auto' or 'reference' .* got 'cpu'"):
        torch.func.grad(loss)(w, "cpu")
    assert "cpu" not in said  # explain refused it first, as the call would
    with torch.autocast("cpu", dtype=torch.bfloat16):  # x fp32, weight bf16: both cast to bf16 by the call
        assert resnet_fused.conv_bias_add_relu(x, w.bfloat16()).dtype == torch.bfloat16
        assert resnet_fused.explain(x, w.bfloat16()).startswith("cpu: ")
    scale = torch.ones(4, requires_grad=True)  # refused by the call (no gradient for scale): by explain too
    for fn in (resnet_fused.conv_bias_add_relu, resnet_fused.explain):
        with pytest.raises(ValueError, match=r"scale: expected a constant \(requires_grad=False\)"):
            fn(x, w, scale=scale)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_a_program_saved_on_the_triton_backend_loads_after_import_resnet_fused(tmp_path):
    """torch.export and torch.jit.trace record the Triton op by name: `import resnet_fused` registers it, as it does
    the C++ op, so a fresh process loads the program; where Triton runs (the interpreter here) it runs, elsewhere the
    call says why not."""
    path = tmp_path / "program"
    save = f"""
import torch, resnet_fused
from resnet_fused.nn import FusedConv2d
torch.manual_seed(0)
conv = FusedConv2d(2, 3, 3, padding=1, backend="triton").eval()
x = torch.randn(1, 2, 5, 5)
program = torch.export.export(conv, (x,))
assert any("conv_bias_add_relu_triton" in str(n.target) for n in program.graph.nodes)
torch.export.save(program, {str(path)!r} + ".pt2")
torch.jit.save(torch.jit.trace(conv, (x,)), {str(path)!r} + ".jit")
torch.save((x, conv(x).detach()), {str(path)!r} + ".io")
"""
    load = f"""
import torch, resnet_fused
x, want = torch.load({str(path)!r} + ".io")
for program in (torch.export.load({str(path)!r} + ".pt2").module(), torch.jit.load({str(path)!r} + ".jit")):
    try:
        print(torch.allclose(program(x), want, atol=1e-5))
    except RuntimeError as e:  # TorchScript wraps the op's message in its own lines
        print(next(line for line in str(e).splitlines() if "cannot run here" in line).split("RuntimeError: ")[-1])
"""
    interpret = dict(os.environ, TRITON_INTERPRET="1")
    # Without the interpreter, and with no GPU even where the tests run on one.
    plain = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "CUDA_VISIBLE_DEVICES": ""}
    out = []
    for code, env in ((save, interpret), (load, interpret), (load, plain)):
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out.append(proc.stdout.splitlines())
    assert out[1] == ["True", "True"]  # where Triton runs
    refusal = (
        "resnet_fused::conv_bias_add_relu_triton: the triton backend cannot run here: no CUDA device, and "
        "TRITON_INTERPRET=1 was not set when resnet_fused was imported. A program exported or traced on the triton "
        "backend runs where Triton does; export it on the cpu or cuda backend to run it here"
    )
    assert out[2] == [refusal, refusal]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_the_triton_ops_refuse_cpu_tensors_outside_the_interpreter(monkeypatch):
    """Where Triton runs (a GPU host) but not its interpreter, a bare call on CPU tensors (a program recorded on CPU
    under the interpreter, say) says so, for the forward and the backward op, instead of launching on them."""
    from resnet_fused.triton import op

    monkeypatch.setattr(op, "INTERPRET", False)
    monkeypatch.setattr(op, "unavailable", lambda: "")
    monkeypatch.setattr(op, "_LAUNCH", None)
    x, w = torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3)
    conv = ([1, 1], [1, 1], [1, 1], 1, True)
    ones = torch.ones(1, 3, 4, 4)
    for name, call in (
        ("conv_bias_add_relu_triton", lambda: op.conv_bias_add_relu_triton(x, w, None, None, None, *conv)),
        (
            "conv_bias_add_relu_triton_backward",
            lambda: op.conv_bias_add_relu_triton_backward(ones, ones, x, w, None, *conv, [True, True, False, False]),
        ),
    ):
        want = f"resnet_fused::{name}: the triton backend runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), got cpu tensors"
        with pytest.raises(RuntimeError, match=f"^{re.escape(want)}$"):
            call()


def test_the_triton_probe_names_a_failed_import_under_the_interpreter(tmp_path):
    """With TRITON_INTERPRET=1 and a triton that fails to import, the row says so (it said the variable was not
    set)."""
    stub = tmp_path / "triton"
    stub.mkdir()
    (stub / "__init__.py").write_text('raise ImportError("libtriton.so: cannot open shared object file")\n')
    code = "from resnet_fused.backends import BACKENDS; print(BACKENDS['triton'].unavailable())"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == (
        "the Triton backend failed to import: ImportError: libtriton.so: cannot open shared object file"
    )
