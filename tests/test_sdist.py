"""The package as users get it from a registry or an archive: an sdist holding every source the build needs, a
CPU-only wheel built from it in a fresh directory against the installed torch, and that wheel installed into a fresh
venv (the repository off ``sys.path``) running the op, a converted torchvision model and ``available_backends()``.

RESNET_FUSED_BUILD_CUDA=0 stands in for a machine without a CUDA toolkit and keeps the build short.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
NAME, VERSION = "resnet_fused", "0.1.0"


def build_env() -> dict[str, str]:
    """A CPU-only build on at most 2 cores; no PYTHONPATH, so that nothing but the installed package is found."""
    env = dict(os.environ, RESNET_FUSED_BUILD_CUDA="0", MAX_JOBS="2")
    for var in ("CUDA_HOME", "PYTHONPATH"):
        env.pop(var, None)
    return env


def run(cmd: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=build_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd[:4]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def source_files() -> list[str]:
    """The files a clone of the working tree has: tracked plus untracked-but-not-ignored (no builds, no .venv)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return [f for f in listed if (ROOT / f).is_file()]  # a tracked file deleted in the work tree is not there


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    """The sdist, made by the PEP 517 hook (what ``python -m build --sdist --no-isolation`` calls) in a copy of the
    tree, so that the shared checkout gets no egg-info."""
    src, out = tmp_path_factory.mktemp("clone"), tmp_path_factory.mktemp("dist")
    for f in source_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    hook = f"from setuptools import build_meta; print(build_meta.build_sdist({str(out)!r}))"
    name = run([sys.executable, "-c", hook], cwd=src).stdout.strip().splitlines()[-1]
    return out / name


def test_build_requirements_follow_the_installed_torch():
    """No pinned torch in the build requirements (an isolated build would fetch a second torch), and the installed
    torch satisfies both the build and the runtime requirement."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python >= 3.11")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    installed = Version(torch.__version__)
    for where, reqs in (
        ("build-system.requires", meta["build-system"]["requires"]),
        ("dependencies", meta["project"]["dependencies"]),
    ):
        (torch_req,) = [Requirement(r) for r in reqs if Requirement(r).name == "torch"]
        assert not any(s.operator in ("==", "===") for s in torch_req.specifier), f"{where} pins torch: {torch_req}"
        assert torch_req.specifier.contains(installed, prereleases=True), f"{where}: {torch_req} excludes {installed}"


def test_sdist_holds_every_source_the_build_needs(sdist):
    assert sdist.name == f"{NAME}-{VERSION}.tar.gz"
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    needed = [f for f in source_files() if f.startswith(("csrc/", f"{NAME}/"))]
    needed += ["setup.py", "pyproject.toml", "README.md"]
    assert any(f.endswith(".h") for f in needed) and any(f.endswith(".cu") for f in needed)
    missing = sorted(set(needed) - names)
    assert not missing, f"the sdist lacks {missing}"
    built = sorted(n for n in names if n.endswith((".so", ".o", ".pyc")))
    assert not built, f"the sdist holds build outputs: {built}"
    assert "resnet_fused/py.typed" in names
    tests = sorted(n for n in names if n.startswith("tests/"))
    assert not tests, f"the sdist holds tests without the repository they need: {tests}"


CHECK = """
import importlib.metadata as md
import os
import sys

import torch
import torchvision
from packaging.requirements import Requirement
from packaging.version import Version

import resnet_fused
from resnet_fused import reference
from resnet_fused.nn import FusedConv2d

site, repo = sys.argv[1], sys.argv[2]
assert resnet_fused.__file__.startswith(site), resnet_fused.__file__
assert repo not in {os.path.realpath(p or ".") for p in sys.path}, sys.path
dist = md.distribution("resnet_fused")
assert dist.version == "0.1.0", dist.version
(torch_req,) = [Requirement(r) for r in dist.requires if Requirement(r).name == "torch" and not Requirement(r).marker]
assert torch_req.specifier.contains(Version(torch.__version__), prereleases=True), (torch_req, torch.__version__)

backends = resnet_fused.available_backends()
assert {"cpu", "reference"} <= set(backends) and "cuda" not in backends, backends
assert not torch._C._dispatch_has_kernel_for_dispatch_key("resnet_fused::conv_bias_add_relu", "CUDA")

g = torch.Generator().manual_seed(0)
x, w, r = (torch.randn(s, generator=g) for s in [(2, 4, 7, 7), (6, 4, 3, 3), (2, 6, 4, 4)])
b, s = torch.randn(6, generator=g), torch.rand(6, generator=g) + 0.5
y = resnet_fused.conv_bias_add_relu(x, w, b, r, scale=s, stride=2, padding=1, backend="cpu")
expected = reference.conv_bias_add_relu(
    *(t.double() for t in (x, w, b, r)), scale=s.double(), stride=2, padding=1
)
torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())

model = torchvision.models.resnet18(num_classes=10).eval()
with torch.no_grad():  # non-trivial statistics, so that folding BatchNorm is checked
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)
            m.weight.uniform_(0.5, 1.5, generator=g)
            m.bias.uniform_(-0.5, 0.5, generator=g)
fused, report = resnet_fused.convert(model)
assert len(report.folded) == 9 and not report.unfused, report  # 8 blocks and the stem
assert sum(isinstance(m, FusedConv2d) for m in fused.modules()) == 20
img = torch.randn(2, 3, 64, 64, generator=g)
with torch.no_grad():
    logits = fused(img)
    expected = model.double()(img.double())
torch.testing.assert_close(logits.double(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
print("installed package ok", backends)
"""


@pytest.mark.slow
def test_wheel_from_the_sdist_installs_and_runs_in_a_fresh_venv(sdist, tmp_path):
    # pip unpacks the sdist into a fresh directory and builds there, against this torch; no cache, so it builds.
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip"]
    wheel_cmd = [*pip, "wheel", "-v", "--no-build-isolation", "--no-deps", "--no-cache-dir", "-w", str(wheels)]
    build = run([*wheel_cmd, str(sdist)], cwd=tmp_path, timeout=1500)
    assert "building the CPU extension (CppExtension)" in build.stdout + build.stderr
    (wheel,) = wheels.glob(f"{NAME}-{VERSION}-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert any(n.startswith(f"{NAME}/_C") and n.endswith(".so") for n in names), names
    assert not any(n.startswith("csrc/") for n in names), "the wheel ships C++ sources"
    assert f"{NAME}/py.typed" in names, "the wheel does not say the package is typed"

    # A venv without the repository or the dev venv on its path; torch (and torchvision, for convert) come from a
    # .pth naming the directory that holds them. A .pth line adds the directory without running its own .pth
    # files, so the dev venv's editable install of this package stays invisible.
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path)
    site = Path(purelib.stdout.strip())
    (site / "torch_from_the_test_env.pth").write_text(str(Path(torch.__file__).resolve().parents[1]) + "\n")
    # --ignore-installed: pip sees the dev venv's editable install through the .pth and must leave it alone.
    install = ["install", "--no-deps", "--no-index", "--no-cache-dir", "--ignore-installed", str(wheel)]
    run([*pip, "--python", str(python), *install], cwd=tmp_path)

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    check = run([str(python), "-c", CHECK, str(site), str(ROOT)], cwd=run_dir)
    assert "installed package ok" in check.stdout
