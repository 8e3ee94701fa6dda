"""The compile report holds the shipped Triton configs to account, with no GPU.

Compiles every shipped kernel x shape (3x3, 1x1) x layout (NHWC, NCHW) x config x dtype for sm_80 and sm_90 and
asserts: no compile failure, zero spill/stack bytes for every NHWC config and each NCHW pinned one (but fp64, for
gradcheck, and the one spill report.ALLOWED_SPILLS names, exactly), shared memory within each arch's per-block
limit, tensor-core instructions in every GEMM, no FFMA/DFMA (an epilogue contracted into an FMA), and software
pipelining (cp.async) in every kernel but the 16-bit NCHW ones. Runs in the normal (non-interpreter) invocation.
"""

import importlib.util
import os

import pytest
from helpers import INTERPRET

pytestmark = [
    pytest.mark.skipif(
        INTERPRET,
        reason="compiles the GPU configs; under the interpreter only the interpreter config exists",
    ),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed"),
]


@pytest.fixture(scope="module")
def report():
    from resnet_fused.triton import report

    if not os.path.exists(os.path.join(report._BIN, "cuobjdump")):
        pytest.skip("triton's bundled cuobjdump is missing")
    return report


@pytest.fixture(scope="module")
def rows(report):
    return report.compile_all([80, 90])


def test_every_shipped_variant_compiled(report, rows):
    from resnet_fused.triton import launch

    want = {
        (k, layout, dt, report._config_name(c), a)
        for k in report.KERNELS
        for layout in report.LAYOUTS
        for dt, dtype in report.DTYPES.items()
        for c in launch.shipped_configs(k, dtype, layout)
        for a in (80, 90)
    }
    assert {(r.kernel, r.layout, r.dtype, r.config, r.arch) for r in rows} == want
    assert not [r for r in rows if r.error], [f"{r.kernel} {r.config} {r.dtype} sm_{r.arch}: {r.error}" for r in rows]


def test_no_spills_smem_in_limits_tensor_cores(report, rows):
    assert report.problems(rows) == []
    held = [r for r in rows if report.held_to_no_spills(r)]
    # Every NHWC config and each NCHW pinned one, in fp32, fp16 and bf16 on both archs.
    assert len({(r.kernel, r.layout, r.dtype, r.arch) for r in held}) == 3 * 2 * 3 * 2
    allowed = {key: None for key in report.ALLOWED_SPILLS}
    for r in rows:
        assert r.regs > 0
        key = (r.kernel, r.shape, r.layout, r.config, r.dtype, r.arch)
        if key in allowed:
            allowed[key] = r.stack
        elif r in held:  # fp64 is there for gradcheck: its spills cost only speed
            assert r.stack == 0 and r.local == 0, r
        assert 0 < r.smem <= report.SMEM_LIMIT[r.arch]
    # The allowed spill is what the report shows, no more and no less (the docs state it).
    assert allowed == report.ALLOWED_SPILLS


def test_pinned_configs_fit_shared_memory_in_every_dtype(report, rows):
    """Deterministic mode runs the pinned configs and nothing else, so each must launch in every dtype, fp64
    (twice fp32's tile bytes) included."""
    from resnet_fused.triton import launch

    assert "fp64" in report.DTYPES
    for kernel in report.KERNELS:
        for layout in report.LAYOUTS:
            for dt, dtype in report.DTYPES.items():
                pinned = report._config_name(launch.pinned_config(kernel, dtype, layout))
                for arch in (80, 90):
                    key = (kernel, layout, dt, pinned, arch)
                    found = [r for r in rows if (r.kernel, r.layout, r.dtype, r.config, r.arch) == key]
                    assert sorted(r.shape for r in found) == ["1x1", "3x3"], key
                    for row in found:
                        assert not row.error, row.error
                        assert row.smem <= report.SMEM_LIMIT[arch], f"{key} {row.shape}: {row.smem} B"


def test_tensor_cores_and_pipelining(rows):
    for r in rows:
        where = f"{r.kernel} {r.config} {r.dtype} sm_{r.arch}"
        if r.arch == 80:
            assert r.mma > 0, f"{where}: no HMMA"
        else:
            assert r.hgmma + r.mma > 0, f"{where}: no HGMMA/HMMA"
        # A naive implicit-GEMM conv kernel compiles with no LDGSTS: these kernels are pipelined, but for 16-bit
        # NCHW tensors, whose channel reads are strided (no config gets cp.async there; the report shows it).
        if r.layout == "nhwc" or r.dtype in ("fp32", "fp64"):
            assert r.ldgsts > 0, f"{where} {r.layout}: no cp.async (LDGSTS)"


def test_problems_catches_bad_rows(report):
    """The checker itself can fail: a spilling, oversized, tensor-core-less row is flagged, and so is a list with no
    config for 99 KB GPUs."""
    bad = report.Row("fwd", "3x3", "nhwc", "x", "bf16", 80, 255, 16, 0, 300 * 1024, 0, 0, 0, 0, 64)
    found = report.problems([bad])
    assert len(found) == 5, found
    assert "64 FFMA/DFMA" in found[3]
    assert "no config within 101376 B of shared memory" in found[-1]
    # The allowed spill passes at its exact size only
    (key, stack), *_ = report.ALLOWED_SPILLS.items()
    kernel, shape, layout, config, dtype, arch = key
    for spill, flagged in ((stack, 0), (stack + 8, 1)):
        row = report.Row(kernel, shape, layout, config, dtype, arch, 168, spill, 0, 1024, 1, 0, 1, 0, 0)
        assert len(report.problems([row])) == flagged, spill


def test_bytes_model(report):
    model = report.bytes_model(batch=32)
    names = [m["name"] for m in model]
    assert sum(m["count"] for m in model) == 53  # ResNet-50's convolutions incl. 4 downsamples
    assert "stem 7x7/2" in names
    for m in model:
        assert 0 < m["fused_fwd"] < m["unfused_fwd"], m["name"]
        assert 0 < m["fused_bwd"] < m["unfused_bwd"], m["name"]
    # layer3.n conv2: x and y are 32*256*14*14 fp16, W 256*256*9 fp16; fused fwd = x + W + y + 2 vectors.
    conv2 = next(m for m in model if m["name"] == "layer3.n conv2 3x3")
    act = 32 * 256 * 14 * 14 * 2
    assert conv2["fused_fwd"] == 2 * act + 256 * 256 * 9 * 2 + 2 * 256 * 2


def test_cli_json(report, rows, tmp_path, monkeypatch):
    """The CLI prints both parts and writes the JSON (compiles stubbed with the rows above)."""
    import json

    monkeypatch.setattr(report, "compile_all", lambda archs, shapes, workers, layouts: rows)
    out = tmp_path / "r.json"
    assert report.main(["--arch", "80", "90", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert len(data["compiled"]) == len(rows) and data["problems"] == []
    assert data["dram_bytes_model"]["note"] == "model, not measured"
