"""scripts/gpu_check.py (make gpu-check) dry-runs here: every GPU step reports why it was skipped, and the
summary names the machine's versions."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tarfile
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
    assert_gone(int(pidfile.read_text()))


def assert_gone(pid: int) -> None:
    """The process ``pid`` ends (or is a zombie) within 5 s: an orphan is reaped by init shortly after its kill."""
    for _ in range(50):
        state = Path(f"/proc/{pid}/stat")
        if not state.exists() or state.read_text().split(")")[-1].split()[0] == "Z":
            return
        time.sleep(0.1)
    pytest.fail(f"the step's process {pid} outlived the step")


def _gpu_check():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return gpu_check


def test_a_timed_out_step_is_interrupted_first_so_pytest_can_write_its_summary(tmp_path, monkeypatch):
    gpu_check = _gpu_check()
    monkeypatch.setattr(gpu_check, "STEP_TIMEOUT_S", 2)
    code = (
        "import time\n"
        "try:\n    time.sleep(120)\n"
        "except KeyboardInterrupt:\n    print('summary written on SIGINT', flush=True)\n"
    )
    result = gpu_check._run("slow", [sys.executable, "-c", code], tmp_path / "slow.log")
    assert result["status"] == "failed (timed out)" and "summary written on SIGINT" in result["tail"], result


def test_a_deadline_shortens_or_skips_steps(tmp_path, monkeypatch):
    """Under --deadline no command outlives the time left, so a machine rented for a fixed time never kills the run."""
    gpu_check = _gpu_check()
    monkeypatch.setattr(gpu_check._Clock, "deadline", time.monotonic() + gpu_check.DEADLINE_MARGIN_S + 10)
    result = gpu_check._run("late", [sys.executable, "-c", "print('ran')"], tmp_path / "late.log")
    assert result["status"].startswith("skipped: deadline"), result
    monkeypatch.setattr(gpu_check._Clock, "deadline", time.monotonic() + gpu_check.DEADLINE_MARGIN_S + 35)
    start = time.monotonic()
    result = gpu_check._run("long", [sys.executable, "-c", "import time; time.sleep(120)"], tmp_path / "long.log")
    assert result["status"] == "failed (timed out)" and time.monotonic() - start < 60, result


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is for machines without a GPU")
def test_a_comma_list_of_steps_and_a_bundle(tmp_path):
    bundle = tmp_path / "new" / "gpu_check.tgz"  # its folder is made
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "build,bench", "--out", str(tmp_path / "r")]
    proc = subprocess.run([*cmd, "--bundle", str(bundle)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with tarfile.open(bundle) as tar:
        summary = json.load(tar.extractfile("r/gpu_check.json"))
    assert [s["name"] for s in summary["steps"]] == ["build", "bench"]
    bad = subprocess.run([*cmd[:2], "build,tset"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "got 'build,tset'" in bad.stderr


def test_a_run_killed_from_outside_keeps_its_summary_and_ends_its_step(tmp_path):
    """SIGTERM (a rented machine's time limit) ends the running step's process group and writes the summary."""
    pidfile = tmp_path / "child.pid"
    child = tmp_path / "child.py"
    child.write_text(f"import os, time\nopen({str(pidfile)!r}, 'w').write(str(os.getpid()))\ntime.sleep(120)\n")
    runner = tmp_path / "runner.py"
    runner.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT / 'scripts')!r})\n"
        "import gpu_check\n"
        "def slow(info, out):\n"
        f"    return [gpu_check._run('slow', [sys.executable, {str(child)!r}], out / 'slow.log')]\n"
        "gpu_check.STEPS['build'] = slow\n"
        f"gpu_check.main(['build', '--out', {str(tmp_path)!r}])\n"
    )
    proc = subprocess.Popen([sys.executable, str(runner)])
    for _ in range(300):
        if (pidfile.exists() and pidfile.read_text()) or proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["name"] for s in summary["steps"]] == ["interrupted"]
    assert_gone(int(pidfile.read_text()))


def _gpu_check():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    return gpu_check


def test_a_broken_gpu_machine_fails_instead_of_dry_running(tmp_path, monkeypatch):
    """Where torch does not import, or does not see the GPU nvidia-smi lists, every step fails (exit 1): only a
    machine with no GPU at all dry-runs."""
    gpu_check = _gpu_check()
    broken = {
        "torch does not import": {"error": ["ModuleNotFoundError: No module named 'torch'"]},
        "nvidia-smi lists 1 GPU(s), but torch.cuda.is_available() is False": {
            "torch": torch.__version__, "gpu": None, "smi_gpus": 1,
        },
    }  # fmt: skip
    for why, info in broken.items():
        monkeypatch.setattr(gpu_check, "_python_info", lambda info=info: info)
        for steps, names in (
            ("build", {"build"}),  # a failed build ends the run
            (
                "test,sanitize,equivalence,bench",
                {"suite", "gpu-tests", "memcheck", "racecheck", "equivalence", "bench"},
            ),
        ):
            out = tmp_path / f"{len(why)}-{len(names)}"
            assert gpu_check.main([steps, "--out", str(out)]) == 1
            rows = json.loads((out / "gpu_check.json").read_text())["steps"]
            assert {r["name"] for r in rows} == names, rows
            assert all(r["status"].startswith(f"failed: {why}") for r in rows), rows


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where the cuda backend cannot run")
def test_gpu_steps_fail_where_a_gpu_backend_cannot_run(tmp_path):
    """With a GPU but without the cuda backend (here: none runs) the suite would be all skips, and pass: it fails,
    naming the backend and why."""
    gpu_check = _gpu_check()
    rows = gpu_check.step_test({"torch": torch.__version__, "gpu": "a GPU"}, tmp_path)
    assert [r["name"] for r in rows] == ["gpu-tests", "suite"]
    assert all(r["status"].startswith("failed: cuda unavailable: ") for r in rows), rows


def test_a_build_starts_a_new_summary(tmp_path, monkeypatch):
    """Steps run one at a time accumulate, but results of an earlier build do not outlive a new one, from the moment
    it starts (an interrupted build leaves none of them beside it)."""
    gpu_check = _gpu_check()
    info = {"torch": torch.__version__, "gpu": None}
    monkeypatch.setattr(gpu_check, "_python_info", lambda: info)
    passed = {"status": "passed", "seconds": 1.0, "log": None, "tail": []}
    gpu_check._write(tmp_path, info, [{"name": "build", **passed}, {"name": "suite", **passed}])
    assert gpu_check.main(["bench", "--out", str(tmp_path)]) == 0  # no GPU here: bench skips, and accumulates
    names = [s["name"] for s in json.loads((tmp_path / "gpu_check.json").read_text())["steps"]]
    assert names == ["build", "suite", "bench"]
    seen = []  # what the summary holds when the build step starts
    build = gpu_check.STEPS["build"]

    def build_step(info, out):
        seen.extend(s["name"] for s in json.loads((out / "gpu_check.json").read_text())["steps"])
        return build(info, out)

    monkeypatch.setitem(gpu_check.STEPS, "build", build_step)
    assert gpu_check.main(["build", "--out", str(tmp_path)]) == 0
    steps = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]
    assert [s["name"] for s in steps] == ["build"] and steps[0]["status"].startswith("skipped: no GPU")
    assert seen == []
