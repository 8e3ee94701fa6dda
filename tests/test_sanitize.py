"""The C++ CPU kernels under AddressSanitizer and UBSan: CI runs ``scripts/sanitize.py --quick``.

The script builds the extension with ``-fsanitize=address,undefined`` out of tree, checks that a planted heap
overflow and signed overflow are reported in the same setup, then runs a trimmed CPU correctness suite against the
sanitized build. `make sanitize` runs the fuller selection.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "sanitize.py")


def _has_asan() -> bool:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return False
    path = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return os.path.isabs(path) and os.path.exists(path)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sanitizer run is set up for Linux (LD_PRELOAD)")
@pytest.mark.skipif(not _has_asan(), reason="no C++ compiler with an AddressSanitizer runtime (libasan)")
def test_cpu_suite_is_clean_under_asan_and_ubsan():
    proc = subprocess.run([sys.executable, SCRIPT, "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-20000:]
    assert "canaries reported as expected" in out, out[-5000:]
    assert "clean under ASan+UBSan (quick selection" in out, out[-5000:]


def test_the_build_folder_follows_torch_and_the_compiler(monkeypatch):
    """ninja does not track torch's headers: objects built against one torch must not be reused for another."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import sanitize
    finally:
        sys.path.pop(0)
    here = sanitize.default_build_dir()
    assert here == sanitize.default_build_dir()  # reruns reuse it
    monkeypatch.setattr(sanitize.importlib.metadata, "version", lambda name: "0.0.1")
    other_torch = sanitize.default_build_dir()
    monkeypatch.setenv("CXX", "a-compiler-that-is-not-there")
    assert len({here, other_torch, sanitize.default_build_dir()}) == 3
