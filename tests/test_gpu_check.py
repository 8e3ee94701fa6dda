"""scripts/gpu_check.py (make gpu-check) dry-runs here: every GPU step reports why it was skipped, and the
summary names the machine's versions."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is for machines without a GPU")
def test_gpu_check_dry_runs_without_a_gpu(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "all", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = {s["name"]: s["status"] for s in summary["steps"]}
    assert set(steps) == {"build", "suite", "gpu-tests", "memcheck", "racecheck", "equivalence", "bench"}
    assert all(status.startswith("skipped: no GPU") for status in steps.values()), steps
    assert summary["environment"]["torch"] == torch.__version__
    assert summary["environment"]["gpu"] is None
    assert "| bench | skipped: no GPU |" in (tmp_path / "gpu_check.md").read_text()


def test_gpu_check_refuses_a_torch_older_than_supported(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    old = {"torch": "2.1.0+cu121", "gpu": "NVIDIA H100"}
    (result,) = gpu_check.step_build(old, tmp_path)
    assert result["status"].startswith("failed: torch 2.1.0+cu121 is older than the 2.6 needed"), result


def test_a_timed_out_step_ends_its_whole_process_group(tmp_path, monkeypatch):
    """A step past its limit is killed with every process it started (pytest-xdist workers, equivalence shards),
    so none runs on into the next step's timings."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    monkeypatch.setattr(gpu_check, "STEP_TIMEOUT_S", 3)
    pidfile = tmp_path / "child.pid"
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(120)\n"
    )
    result = gpu_check._run("slow", [sys.executable, "-c", code], tmp_path / "slow.log")
    assert result["status"] == "failed (timed out)"
    pid = int(pidfile.read_text())
    for _ in range(50):  # the orphaned child is reaped by init shortly after the kill
        state = Path(f"/proc/{pid}/stat")
        if not state.exists() or state.read_text().split(")")[-1].split()[0] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the step's child process {pid} outlived its timeout")
