"""The Triton launchers' GPU-only duties, proved without a GPU: kernel launches are recorded, not run.

- every launch and every autotuning run happens under x's CUDA device (fake CUDA tensors, a recording
  ``torch.cuda.device``);
- an N*P*Q past 2^31 gets a grid that covers it, and the kernels' pixel index is int64 (TTIR of the kernels);
- a weight whose filter spans past int32 offsets, and a grid axis 1 past CUDA's 65535 blocks, are refused;
- deterministic algorithms run one pinned config per kernel and dtype and never time;
- each constexpr variant, layout and group count of one shape is tuned on its own, and so is each kind of GPU;
- a capture refuses to autotune, with an error that says to warm up; tuned keys and pinned configs launch;
- fp32 reads the per-op TF32 setting as ATen does for cuDNN convolutions;
- every launch is compiled without FMA contraction.

Runs in the normal invocation and under TRITON_INTERPRET=1 (where each kernel has one config, so the tests
about tuning skip).
"""

import contextlib
import importlib.util
import os
import re
import subprocess
import sys
import time
import types

import pytest
import torch
from helpers import INTERPRET, INTERPRETER_BROKEN
from torch._subclasses import fake_tensor
from torch._subclasses.fake_tensor import FakeTensorMode

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
needs_tuning = pytest.mark.skipif(INTERPRET, reason="under the interpreter each kernel has one config: no tuning")
KERNELS = ("fwd", "dgrad", "wgrad")
INT32_MAX = 2**31 - 1


@pytest.fixture
def launch():
    from resnet_fused.triton import launch

    return launch


class Recorder:
    """Stands in for the kernels' launch and for torch.cuda.device; remembers each launch and its device."""

    def __init__(self, launch, monkeypatch):
        self.device = None  # the device a torch.cuda.device guard made current, None outside any guard
        self.launches = []  # (kernel, device, grid, named args)
        self.timed = []  # kernels whose configs the autotuner timed
        self.delay = 0.0  # seconds each timing takes
        recorder = self

        class FakeDeviceGuard:
            def __init__(self, device):
                self.new = torch.device(device)

            def __enter__(self):
                self.old, recorder.device = recorder.device, self.new

            def __exit__(self, *exc):
                recorder.device = self.old

        monkeypatch.setattr(torch.cuda, "device", FakeDeviceGuard)
        # Every fake GPU is one kind (an H100) unless a test says otherwise; no driver is asked.
        self.props = {}
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: self.props.get(i, H100))
        monkeypatch.setattr(launch, "_DEVICE_KINDS", {})
        for name, (fn, _) in launch._KERNELS.items():
            monkeypatch.setattr(fn, "run", self._run(name, fn.arg_names))
        monkeypatch.setattr(launch, "_TUNERS", {})  # no tuning from earlier tests
        autotuned = launch._autotuned

        def new_tuner(kernel, fn, runtime_key):
            tuned = autotuned(kernel, fn, runtime_key)
            # do_bench is a cached property that asks the (absent) GPU driver; set the cached value itself.
            tuned.__dict__["do_bench"] = self._bench(kernel)
            return tuned

        monkeypatch.setattr(launch, "_autotuned", new_tuner)

    def tuners(self, launch, kernel=None):
        """The autotuned wrappers made so far (of ``kernel``), by device kind."""
        return {kind: t for (name, kind), t in launch._TUNERS.items() if kernel in (None, name)}

    def _run(self, name, arg_names):
        def run(*args, grid, warmup, **kwargs):
            self.launches.append((name, self.device, grid, {**dict(zip(arg_names, args, strict=False)), **kwargs}))

        return run

    def _bench(self, name):
        def bench(kernel_call, quantiles):
            time.sleep(self.delay)
            self.timed.append(name)
            kernel_call()
            return [1.0, 1.0, 1.0]

        return bench


@pytest.fixture
def recorder(launch, monkeypatch):
    return Recorder(launch, monkeypatch)


@pytest.fixture
def not_capturing(monkeypatch):
    # On a CUDA tensor the launcher asks whether a graph is being captured; this machine has no driver to ask.
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)


@contextlib.contextmanager
def deterministic(on: bool):
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


H100 = types.SimpleNamespace(
    name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132, shared_memory_per_block_optin=232448
)
L4 = types.SimpleNamespace(
    name="NVIDIA L4", major=8, minor=9, multi_processor_count=58, shared_memory_per_block_optin=101376
)


def _problem(device, n=2, c=3, hw=(7, 6), k=4, r=3, dtype=torch.float32):
    x = torch.empty(n, c, *hw, dtype=dtype, device=device)
    w = torch.empty(k, c, r, r, dtype=dtype, device=device)
    return x, w, torch.empty(k, dtype=dtype, device=device)


def _run_op(launch, x, w, b, pad=1):
    """forward, then backward asking for every gradient."""
    conv = ((1, 1), (pad, pad), (1, 1), 1, True)
    y = launch.forward(x, w, b, None, b, *conv)
    launch.backward(y, y, x, w, b, *conv, (True, True, True, True))


@pytest.mark.parametrize("det", [False, True], ids=["autotuned", "pinned"])
def test_every_launch_and_tuning_runs_on_x_device(launch, recorder, not_capturing, det, monkeypatch):
    # FakeTensorMode initialises a real context on each CUDA device it sees; cuda:1 need not exist here.
    monkeypatch.setattr(fake_tensor, "init_gpu_context", lambda device: None)
    with FakeTensorMode(), deterministic(det):
        x, w, b = _problem("cuda:1")
        _run_op(launch, x, w, b)
    launched = {name for name, *_ in recorder.launches}
    assert launched == set(KERNELS)
    for name, device, _, named in recorder.launches:
        assert device == torch.device("cuda:1"), f"{name} launched on {device}, not on x's device cuda:1"
        # The epilogue rounds as the unfused ops: conv * scale is never contracted into an FMA with the bias.
        assert named.get("enable_fp_fusion") is False, f"{name} launched with FMA contraction allowed"
    if not det and not INTERPRET:
        assert set(recorder.timed) == set(KERNELS), "each kernel is tuned once, under the guard like its launch"
    assert recorder.device is None, "the guard is left after the launch"


def test_cpu_tensors_take_no_device_guard(launch, recorder):
    with deterministic(True):
        x, w, b = _problem("cpu")
        _run_op(launch, x, w, b)
    assert {name for name, *_ in recorder.launches} == set(KERNELS)
    assert all(device is None for _, device, _, _ in recorder.launches)


def test_pixel_count_past_int32_gets_a_covering_grid(launch, recorder):
    """N=2, C=K=1, 32769 x 32769 bf16 (fits an H100): N*H*W = N*P*Q = 2147614722 > 2^31."""
    side = 32769
    m = 2 * side * side
    assert m > INT32_MAX
    with FakeTensorMode(), deterministic(True):
        x, w, b = _problem("cpu", n=2, c=1, hw=(side, side), k=1, r=1, dtype=torch.bfloat16)
        _run_op(launch, x, w, b, pad=0)
    assert {name for name, *_ in recorder.launches} == set(KERNELS)
    for name, _, grid, args in recorder.launches:
        assert args["M"] == m, f"{name}: M = {args['M']}, want N*P*Q = {m}"
        dims = grid(args)
        if name == "wgrad":
            # Over (K, C*R*S, groups * splits); its loop walks the m blocks.
            assert dims[0] * args["BLOCK_M"] >= 1 and dims[1] * args["BLOCK_N"] >= 1
            assert 1 <= dims[2] <= 65535
        else:
            assert (dims[0] - 1) * args["BLOCK_M"] < m <= dims[0] * args["BLOCK_M"], f"{name}: grid {dims}"
            assert dims[0] <= INT32_MAX and dims[1] <= 65535 and dims[2] <= 65535
        if name == "wgrad":
            assert args["INT64_PIXELS"] is True
        # Strides fit int32 here; only the pixel count does not, and the kernels index pixels in int64.
        ints = {k: v for k, v in args.items() if isinstance(v, int) and not isinstance(v, bool)}
        assert {k for k, v in ints.items() if v > INT32_MAX} == {"M"}, ints


@needs_tuning
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernels_index_pixels_in_int64(kernel):
    """The TTIR of each kernel (sm_90, M an int32 argument) computes the pixel index offs_m in int64."""
    import triton
    from triton.backends.compiler import GPUTarget

    from resnet_fused.triton import launch, report

    cfg = launch.shipped_configs(kernel)[0]
    compiled = triton.compile(
        # wgrad: the launcher asks for int64 pixels once N*P*Q nears 2^31 (checked above).
        report._source(kernel, "3x3", "fp16", cfg, **({"INT64_PIXELS": True} if kernel == "wgrad" else {})),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
    )
    lines = re.findall(r"^\s*%offs_m\w* = arith\.(?:muli|addi) .*$", compiled.asm["ttir"], re.MULTILINE)
    assert lines, f"{kernel}: no offs_m arithmetic found in the TTIR"
    narrow = [line.strip() for line in lines if not re.search(r"(: i64|xi64>) loc", line)]
    assert not narrow, f"{kernel}: int32 pixel index arithmetic (wraps past 2^31): {narrow}"


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_deterministic_runs_the_pinned_config_without_timing(launch, recorder, dtype, layout):
    """fp64 has its own list (its 128x64 dgrad tile overflows shared memory), and NCHW its own first config (the
    NHWC tiles spill there), and so their own pinned configs."""
    with deterministic(True):
        x, w, b = _problem("cpu", dtype=dtype)
        if layout == "nhwc":
            x = x.to(memory_format=torch.channels_last)
        _run_op(launch, x, w, b)
    assert recorder.timed == [], "deterministic mode must not choose a config by timing"
    assert [name for name, *_ in recorder.launches] == ["fwd", "dgrad", "wgrad"]
    for name, _, _, args in recorder.launches:
        pinned = launch.pinned_config(name, dtype, layout)
        assert pinned is launch.shipped_configs(name, dtype, layout)[0]
        if layout == "nchw" and not INTERPRET:
            assert pinned is launch.NCHW_PINNED[name]
        for key, value in pinned.all_kwargs().items():
            assert args[key] == value, f"{name}: {key} = {args[key]}, pinned {value}"


@needs_tuning
def test_deterministic_falls_back_to_the_first_config_that_fits_shared_memory(launch, recorder, monkeypatch):
    """On a GPU with less shared memory a block (99 KB on sm_86/89/120) Triton refuses a too-large tile before it
    runs: the pinned launch takes the next config of the list, the same one on every call of that variant."""
    from triton.runtime.errors import OutOfResources

    monkeypatch.setattr(launch, "_PINNED_FITS", {})
    refused = []
    for name, (fn, _) in launch._KERNELS.items():
        recorded = fn.run

        def run(*args, recorded=recorded, name=name, **kwargs):
            if kwargs["BLOCK_M"] == 128:  # the 128-row tiles "do not fit" this device
                refused.append(name)
                raise OutOfResources(123264, 101376, "shared memory")
            return recorded(*args, **kwargs)

        monkeypatch.setattr(fn, "run", run)
    x, w, b = _problem("cpu")
    x = x.to(memory_format=torch.channels_last)
    with deterministic(True):
        _run_op(launch, x, w, b)
        first = [(name, args["BLOCK_M"], args["BLOCK_N"]) for name, _, _, args in recorder.launches]
        assert refused == ["fwd", "dgrad"]  # their pinned NHWC tiles are 128 rows; wgrad's is not
        assert first == [("fwd", 64, 128), ("dgrad", 64, 64), ("wgrad", 64, 64)]
        recorder.launches.clear()
        _run_op(launch, x, w, b)  # remembered: no second refusal, the same configs
        assert refused == ["fwd", "dgrad"]
        assert [(name, args["BLOCK_M"], args["BLOCK_N"]) for name, _, _, args in recorder.launches] == first
        monkeypatch.setattr(launch, "FWD_CONFIGS", launch.FWD_CONFIGS[:1])  # nothing fits: Triton's error
        monkeypatch.setattr(launch, "_PINNED_FITS", {})
        with pytest.raises(OutOfResources):
            _run_op(launch, x, w, b)


@needs_tuning
def test_each_kind_of_gpu_tunes_on_its_own(launch, recorder, not_capturing, monkeypatch):
    """A tile tuned on one GPU may not fit another's shared memory (an H100's on an L4): GPUs of another kind tune
    the same shape again, and GPUs of one kind share their tuning."""
    monkeypatch.setattr(fake_tensor, "init_gpu_context", lambda device: None)
    recorder.props = {0: H100, 1: L4, 2: H100}
    with FakeTensorMode():
        for index in (0, 1, 2, 1):
            x, w, b = _problem(f"cuda:{index}")
            _run_op(launch, x, w, b)
            recorder.timed.append(f"after cuda:{index}")
    marks = [i for i, name in enumerate(recorder.timed) if name.startswith("after")]
    tuned_by = [sorted(set(recorder.timed[a + 1 : b])) for a, b in zip([-1, *marks], marks, strict=False)]
    # cuda:0 tunes each kernel; cuda:1, an L4, again; cuda:2, another H100, and cuda:1 again reuse theirs.
    assert tuned_by == [sorted(KERNELS), sorted(KERNELS), [], []], tuned_by
    for kernel in KERNELS:
        kinds = recorder.tuners(launch, kernel)
        assert sorted(kind[1] for kind in kinds) == sorted([H100.name, L4.name])
        assert all(len(t.cache) == 1 for t in kinds.values())
    assert {device.index for _, device, _, _ in recorder.launches} == {0, 1, 2}


def test_device_kind_is_asked_once_per_gpu(launch, recorder, monkeypatch):
    asked = []
    fake = torch.cuda.get_device_properties  # the recorder's

    def props(index):
        asked.append(index)
        return fake(index)

    recorder.props = {3: L4}
    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    want = ("cuda", L4.name, 8, 9, 58, 101376)
    assert launch._device_kind(torch.device("cuda:3")) == want
    assert launch._device_kind(torch.device("cuda:3")) == want
    assert asked == [3]
    assert launch._device_kind(torch.device("cpu")) == ("cpu",)


@needs_tuning
def test_two_threads_tuning_one_key_each_get_a_config(launch, recorder, not_capturing):
    """Triton's autotuner keeps the call's arguments on itself while it times: two threads tuning at once read each
    other's (or None) unless the launcher lets one tune at a time."""
    import threading

    recorder.delay = 0.02  # each timing: long enough for the other thread to start tuning too
    x, w, b = _problem("cpu")
    errors = []

    def forward():
        try:
            launch.forward(x, w, b, None, b, (1, 1), (1, 1), (1, 1), 1, True)
        except Exception as e:  # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=forward) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sum(name == "fwd" for name, *_ in recorder.launches) >= 2


def test_deterministic_dgrad_pins_grad_outs_layout(launch, recorder):
    """dgrad's loop reads grad_out: an NCHW grad_out (a one-node graph's, beside a channels_last x) runs NCHW's
    pinned config, which does not spill there, as the others read x's."""
    with deterministic(True):
        x, w, b = _problem("cpu")
        x = x.to(memory_format=torch.channels_last)
        conv = ((1, 1), (1, 1), (1, 1), 1, True)
        y = launch.forward(x, w, b, None, b, *conv)
        go = y.contiguous()
        launch.backward(go, go, x, w, b, *conv, (True, True, True, True))
    configs = {name: args for name, _, _, args in recorder.launches}
    for name, layout in (("fwd", "nhwc"), ("dgrad", "nchw"), ("wgrad", "nhwc")):
        for key, value in launch.pinned_config(name, torch.float32, layout).all_kwargs().items():
            assert configs[name][key] == value, f"{name}: {key} = {configs[name][key]}, {layout}'s pinned {value}"


@needs_tuning
@pytest.mark.parametrize("kernel", KERNELS)
def test_autotuning_times_the_configs_of_the_calls_dtype_and_layout(launch, kernel):
    """The autotuner holds every config; for a call it keeps the dtype's (fp64's fit its shared memory) and the
    layout's (NCHW's list starts with a config that does not spill there), read from the channel stride of the
    activation the kernel's loop reads (x; grad_out for dgrad)."""
    every = launch.shipped_configs(kernel)
    prune = launch._prune(kernel)
    for dtype in (torch.float32, torch.float64):
        t = torch.empty(1, dtype=dtype)
        for sxc, layout in ((1, "nhwc"), (42, "nchw")):
            others = {"sxc": 1, "sgc": 1}  # the other tensors' layouts do not pick the list
            kept = prune(every, {"a_ptr": t, **others, launch._LAYOUT_ARG[kernel]: sxc})
            assert kept == [c for c in every if c in launch.shipped_configs(kernel, dtype, layout)]
            assert set(map(str, kept)) == set(map(str, launch.shipped_configs(kernel, dtype, layout)))
    assert launch.NCHW_PINNED[kernel] in every


@needs_tuning
def test_capture_refuses_to_tune_and_says_to_warm_up(launch, recorder, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with FakeTensorMode():
        x, w, b = _problem("cuda:0")
        with pytest.raises(RuntimeError, match=r"fwd kernel has no tuned config.*Run the forward and backward once"):
            launch.forward(x, w, b, None, None, (1, 1), (1, 1), (1, 1), 1, True)
    assert recorder.launches == [] and recorder.timed == []


@needs_tuning
def test_capture_launches_tuned_keys_and_pinned_configs(launch, recorder, monkeypatch):
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    with FakeTensorMode():
        x, w, b = _problem("cuda:0")
        _run_op(launch, x, w, b)  # the warm-up: tunes each kernel once
        assert sorted(set(recorder.timed)) == sorted(KERNELS)
        tuned_runs = len(recorder.timed)
        capturing[0] = True
        _run_op(launch, x, w, b)  # same keys: no tuning, no error
        assert len(recorder.timed) == tuned_runs
        x2, w2, b2 = _problem("cuda:0", hw=(9, 9))
        with deterministic(True):
            _run_op(launch, x2, w2, b2)  # a new key, but pinned: nothing to tune
        assert len(recorder.timed) == tuned_runs


@pytest.fixture
def tf32_settings():
    levels = (torch.backends.cudnn.conv, torch.backends.cudnn, torch.backends)
    saved = [level.fp32_precision for level in levels]
    yield levels
    for level, value in zip(levels, saved, strict=True):
        level.fp32_precision = value


@pytest.mark.parametrize(
    "conv,cudnn,generic,want",
    [
        ("ieee", "none", "none", "ieee"),
        ("tf32", "none", "none", "tf32"),
        ("ieee", "tf32", "tf32", "ieee"),  # the conv setting wins over its parents
        ("none", "tf32", "ieee", "tf32"),
        ("none", "ieee", "tf32", "ieee"),
        ("none", "none", "tf32", "tf32"),
        ("none", "none", "none", "ieee"),
    ],
)
def test_dot_precision_follows_the_per_op_tf32_setting(launch, tf32_settings, conv, cudnn, generic, want):
    for level, value in zip(tf32_settings, (conv, cudnn, generic), strict=True):
        level.fp32_precision = value
    assert launch.dot_precision(torch.float32) == want
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        assert launch.dot_precision(dtype) == "ieee"


@pytest.fixture
def legacy_tf32_readable():
    """torch refuses to read the legacy cudnn.allow_tf32 once conv and rnn have different per-op settings (an
    earlier test's, say): make them agree for the test, then restore conv's."""
    cudnn = torch.backends.cudnn
    per_op = hasattr(getattr(cudnn, "conv", None), "fp32_precision")
    saved = cudnn.conv.fp32_precision if per_op else None
    if per_op:
        cudnn.conv.fp32_precision = cudnn.rnn.fp32_precision
    yield
    if per_op:
        cudnn.conv.fp32_precision = saved


@pytest.mark.parametrize("allow", [True, False])
def test_dot_precision_on_a_torch_without_the_per_op_setting(launch, legacy_tf32_readable, monkeypatch, allow):
    """Older torch has only cudnn.allow_tf32; it is read there and only there."""
    monkeypatch.setattr(torch.backends.cudnn, "conv", object(), raising=False)  # no fp32_precision there
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow)
    assert launch.dot_precision(torch.float32) == ("tf32" if allow else "ieee")


def test_backward_without_relu_never_reads_out(launch, recorder):
    """relu=False: the op's contract does not check ``out`` (an empty placeholder will do), and the kernels get
    grad_out in its place."""
    with FakeTensorMode():
        x, w, b = _problem("cpu")
        grad_out = torch.empty(2, 4, 7, 6)
        launch.backward(grad_out, torch.empty(0), x, w, b, (1, 1), (1, 1), (1, 1), 1, False, (True, True, True, False))
    assert {name for name, *_ in recorder.launches} == {"dgrad", "wgrad"}
    for name, _, _, args in recorder.launches:
        assert args["out_ptr"] is args["go_ptr"] is grad_out, name  # with its four strides, which the kernels take


def test_an_expanded_x_whose_dense_gradient_spans_past_int32_is_refused(launch, recorder):
    """x expanded from one element spans nothing; its gradient, dense in x's layout, spans 64 * 8192 * 8192 > 2^31
    elements in one image: a clear error instead of int32 offsets wrapping."""
    with FakeTensorMode():
        x = torch.empty(1, 1, 1, 1).expand(1, 64, 8192, 8192)
        w, b = torch.empty(1, 64, 1, 1), torch.empty(1)
        grad_out = torch.empty(1, 1, 8192, 8192)
        with pytest.raises(ValueError, match=r"grad_x: one image spans \d+ elements, more than"):
            launch.backward(grad_out, grad_out, x, w, b, (1, 1), (0, 0), (1, 1), 1, True, (True, False, False, False))
    assert not recorder.launches


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_a_weight_whose_filter_spans_past_int32_is_refused(launch, recorder, direction):
    """A strided weight view: 2 channels 2^31 elements apart span 2^31 elements in one filter, past the kernels'
    int32 offsets inside a filter (only the filter index is int64). A clear error instead of reading out of bounds;
    one element less still launches."""
    conv = ((1, 1), (0, 0), (1, 1), 1, False)
    for span, refused in ((2**31, True), (INT32_MAX, False)):
        recorder.launches.clear()
        with FakeTensorMode(), deterministic(True):
            base = torch.empty(span + 1, dtype=torch.float16)
            w = base.as_strided((1, 2, 1, 1), (1, span, 1, 1))
            x = torch.empty(1, 2, 1, 1, dtype=torch.float16)
            refusal = pytest.raises(ValueError, match=r"weight: one filter spans \d+ elements")
            with refusal if refused else contextlib.nullcontext():
                if direction == "forward":
                    launch.forward(x, w, None, None, None, *conv)
                else:
                    go = torch.empty(1, 1, 1, 1, dtype=torch.float16)
                    launch.backward(go, go, x, w, None, *conv, (True, False, False, False))
        assert bool(recorder.launches) != refused, (span, recorder.launches)


def _axis1_problem(kernel, count):
    """Fake tensors whose grid axis 1 must hold ``count`` columns: output channels (fwd), input channels (dgrad),
    C*R*S (wgrad); and the call that launches that kernel alone."""
    if kernel == "fwd":
        x, w = torch.empty(1, 1, 1, 1), torch.empty(count, 1, 1, 1)
        return lambda launch: launch.forward(x, w, None, None, None, (1, 1), (0, 0), (1, 1), 1, False)
    x, w, go = torch.empty(1, count, 1, 1), torch.empty(1, count, 1, 1), torch.empty(1, 1, 1, 1)
    mask = (True, False, False, False) if kernel == "dgrad" else (False, True, False, False)
    return lambda launch: launch.backward(go, go, x, w, None, (1, 1), (0, 0), (1, 1), 1, False, mask)


@pytest.mark.parametrize("kernel", KERNELS)
def test_grid_axis_1_past_65535_blocks_is_refused(launch, recorder, kernel):
    """CUDA caps grid axis 1 at 65535 blocks: past 65535 blocks of the dtype's smallest BLOCK_N the launcher refuses
    with a ValueError naming the weight, the limit and the value; at the limit every config's grid fits."""
    block = min(c.kwargs["BLOCK_N"] for c in launch.shipped_configs(kernel, torch.float32))
    limit = 65535 * block
    with FakeTensorMode(), deterministic(True):
        with pytest.raises(ValueError, match=rf"weight: expected at most {limit} .* got {limit + 1}$"):
            _axis1_problem(kernel, limit + 1)(launch)
        assert not recorder.launches
        _axis1_problem(kernel, limit)(launch)
    ((name, _, grid, args),) = recorder.launches
    assert name == kernel
    for cfg in launch.shipped_configs(kernel, torch.float32):
        assert grid({**args, **cfg.kwargs})[1] <= 65535, (kernel, cfg.kwargs)


# Two calls of each pair differ in one variant only, with the same shapes and dtypes; then the kernels that see the
# difference. dgrad sees neither bias nor residual: it rightly keeps one entry for both.
_VARIANTS = {
    "relu": ({"relu": False}, {"relu": True}, KERNELS),
    "scale": ({"scale": False}, {"scale": True}, KERNELS),
    "epilogue": ({"bias": False, "residual": False}, {"bias": True, "residual": True}, ("fwd", "wgrad")),
    "channels_last": ({"channels_last": False}, {"channels_last": True}, KERNELS),
    # The same C/groups and K/groups.
    "groups": ({"c": 2, "k": 2, "groups": 1}, {"c": 4, "k": 4, "groups": 2}, KERNELS),
    "tf32": ({"tf32": False}, {"tf32": True}, KERNELS),
}


def _tune_variant(
    launch, relu=True, scale=True, bias=True, residual=True, channels_last=False, c=2, k=2, groups=1, tf32=False
):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, c, 5, 5).contiguous(memory_format=fmt)
    w = torch.randn(k, c // groups, 3, 3).contiguous(memory_format=fmt)
    vec = torch.rand(k) + 0.5
    res = torch.randn(2, k, 5, 5).contiguous(memory_format=fmt) if residual else None
    conv = ((1, 1), (1, 1), (1, 1), groups, relu)
    before = torch.backends.cudnn.conv.fp32_precision
    torch.backends.cudnn.conv.fp32_precision = "tf32" if tf32 else "ieee"
    try:
        y = launch.forward(x, w, vec if bias else None, res, vec if scale else None, *conv)
        launch.backward(y, y, x, w, vec if scale else None, *conv, (True, True, bias, residual))
    finally:
        torch.backends.cudnn.conv.fp32_precision = before


@needs_tuning
@pytest.mark.parametrize("variant", list(_VARIANTS))
def test_each_variant_is_tuned_on_its_own(launch, recorder, variant):
    """A config tuned for one variant of a kernel (another constexpr, layout or group count, hence another
    compiled kernel) is not reused for another: each gets its own tuning entry."""
    first, second, differ = _VARIANTS[variant]
    _tune_variant(launch, **first)
    _tune_variant(launch, **second)
    for name in launch._KERNELS:
        (tuned,) = recorder.tuners(launch, name).values()  # one device (the CPU): one wrapper
        want = 2 if name in differ else 1
        assert len(tuned.cache) == want, f"{name}, {variant}: {len(tuned.cache)} tuning entries, want {want}"


@pytest.mark.parametrize(("value", "want"), [("1", True), ("true", True), ("on", True), ("0", False), ("", False)])
def test_triton_interpret_is_read_as_triton_reads_it(monkeypatch, value, want):
    from resnet_fused.triton import interprets

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert interprets() is want


@pytest.mark.parametrize(("value", "want"), [("1", True), ("true", False), ("0", False)])
def test_triton_interpret_is_read_as_a_triton_before_knobs_reads_it(monkeypatch, value, want):
    """Triton < 3.4 (torch 2.6 and 2.7 ship 3.2 and 3.3) has no ``triton.knobs`` and takes "1" only."""
    import importlib.machinery
    import types

    from resnet_fused.triton import interprets

    old = types.ModuleType("triton")
    old.__spec__ = importlib.machinery.ModuleSpec("triton", None)
    monkeypatch.setitem(sys.modules, "triton", old)
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert interprets() is want


@pytest.mark.skipif(bool(INTERPRETER_BROKEN), reason=INTERPRETER_BROKEN)
def test_triton_interpret_true_runs_the_kernels_in_the_interpreter():
    """TRITON_INTERPRET=true makes Triton interpret (its kernels take CPU tensors): the backend must know it too, or
    it calls itself unavailable (no GPU) and launches with the GPU configs."""
    code = (
        "import torch, torch.nn.functional as F, resnet_fused\n"
        "from resnet_fused.triton import launch\n"
        "assert launch.INTERPRET and resnet_fused.backends.INTERPRET\n"
        "x, w = torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3)\n"
        "y = resnet_fused.conv_bias_add_relu(x, w, padding=1, relu=False, backend='triton')\n"
        "assert torch.allclose(y, F.conv2d(x, w, padding=1), atol=1e-5)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "true"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
