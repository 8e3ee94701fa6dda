"""The cuDNN fused path's failure cache (csrc/cuda/failure_cache.h), compiled and run on CPU.

cuDNN's plan search reports a transient out-of-memory as the same "no engine" error as a case it cannot run, so a
failure must be retried after a bounded number of skipped calls, with a back-off, and a success must clear it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Replays a sequence of calls; prints one letter per call: s (skipped), t (tried).
DRIVER = r"""
#include <cstdio>
#include "cuda/failure_cache.h"

using resnet_fused::cuda::FailureCache;

int main() {
  FailureCache cache;
  const FailureCache::Key key{1, 2, 3}, other_tf32{1, 2, 4};
  auto call = [&](const FailureCache::Key& k, bool fails) {
    if (cache.skip(k)) { std::putchar('s'); return; }
    std::putchar('t');
    if (fails) cache.record_failure(k); else cache.record_success(k);
  };
  call(key, true);                                  // t: first failure
  for (int i = 0; i < 17; ++i) call(key, true);     // 16 s, then t (second failure)
  std::putchar('|');
  for (int i = 0; i < 33; ++i) call(key, false);    // 32 s, then t (succeeds)
  std::putchar('|');
  call(key, false);                                 // t: a success is not remembered as a failure
  call(other_tf32, false);                          // t: another key is independent
  std::putchar('|');
  // A case that always fails: the number of calls skipped before each retry.
  const FailureCache::Key always{9};
  cache.record_failure(always);
  for (int i = 0; i < 12; ++i) {
    int skipped = 0;
    while (skipped < 100000 && cache.skip(always)) ++skipped;  // bounded if it never retries
    cache.record_failure(always);
    std::printf("%d,", skipped);
  }
  std::printf("|%lld\n", static_cast<long long>(FailureCache::kMaxRetry));
}
"""


@pytest.fixture(scope="module")
def trace(tmp_path_factory) -> str:
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    d = tmp_path_factory.mktemp("failure_cache")
    (d / "main.cpp").write_text(DRIVER)
    exe = d / "main"
    subprocess.run([cxx, "-std=c++20", "-O1", f"-I{ROOT / 'csrc'}", str(d / "main.cpp"), "-o", str(exe)], check=True)
    return subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.strip()


def test_failure_is_skipped_then_retried_with_back_off(trace):
    first, second, after_success, _, max_retry = trace.split("|")
    assert trace.count("|") == 4
    assert first == "t" + "s" * 16 + "t"
    assert second == "s" * 32 + "t"
    assert after_success == "tt"
    assert int(max_retry) == 4096


def test_retry_interval_doubles_up_to_a_bound(trace):
    """A case that always fails is retried after 16, 32, ... skipped calls, never fewer and never more than 4096."""
    gaps = [int(v) for v in trace.split("|")[3].rstrip(",").split(",")]
    assert gaps == [16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 4096, 4096, 4096]
