"""scripts/gpu_check.py (make gpu-check) dry-runs here: every GPU step reports why it was skipped, and the
summary names the machine's versions."""

from __future__ import annotations

import json
import subprocess
import sys
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
