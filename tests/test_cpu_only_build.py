"""`pip install --no-build-isolation .` (not editable) on a machine without a CUDA toolkit gives a working CPU-only
build; RESNET_FUSED_BUILD_CUDA=0 stands in for the missing toolkit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import torch, resnet_fused
from resnet_fused import reference
assert resnet_fused.__file__.startswith({root!r}), resnet_fused.__file__
assert not torch._C._dispatch_has_kernel_for_dispatch_key("resnet_fused::conv_bias_add_relu", "CUDA")
assert "cuda" not in resnet_fused.available_backends()
x, w, r = torch.randn(2, 4, 6, 6), torch.randn(4, 4, 3, 3), torch.randn(2, 4, 6, 6)
y = resnet_fused.conv_bias_add_relu(x, w, None, r, padding=1, backend="cpu")
torch.testing.assert_close(y, reference.conv_bias_add_relu(x, w, None, r, padding=1))
print("cpu-only build ok")
"""


@pytest.mark.slow
def test_pip_install_cpu_only_build_works(tmp_path):
    src_dir, site = tmp_path / "src", tmp_path / "site"
    for name in ("setup.py", "pyproject.toml", "csrc", "resnet_fused"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, src_dir / name, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
        else:
            src_dir.mkdir(exist_ok=True)
            shutil.copy(src, src_dir / name)
    env = dict(os.environ, RESNET_FUSED_BUILD_CUDA="0", MAX_JOBS="2")
    env.pop("CUDA_HOME", None)
    pip = [sys.executable, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "--target", str(site)]
    build = subprocess.run([*pip, str(src_dir)], env=env, capture_output=True, text=True, timeout=1500)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert "building the CPU extension (CppExtension)" in build.stdout + build.stderr
    env["PYTHONPATH"] = str(site)
    check = subprocess.run(
        [sys.executable, "-c", CHECK.format(root=str(site))], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    assert "cpu-only build ok" in check.stdout
