// Remembers the cases where an optional fast path failed, so that later
// calls go straight to the fallback. Plain C++, so it is tested on CPU.
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <vector>

namespace resnet_fused::cuda {

class FailureCache {
 public:
  using Key = std::vector<int64_t>;

  // No failure is trusted forever: cuDNN's plan search reports a transient
  // out-of-memory as the same "no engine" error as a case it cannot run.
  // A failed key is tried again after kFirstRetry skipped calls, and after
  // twice as many each time it fails again, up to kMaxRetry.
  static constexpr int64_t kFirstRetry = 16;
  static constexpr int64_t kMaxRetry = 4096;

  // Whether to skip the fast path for key; counts the skip.
  bool skip(const Key& key) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = entries_.find(key);
    if (it == entries_.end()) {
      return false;
    }
    Entry& e = it->second;
    if (e.skipped < e.retry_after) {
      ++e.skipped;
      return true;
    }
    e.skipped = 0;
    return false;
  }

  void record_failure(const Key& key) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto [it, inserted] = entries_.try_emplace(key, Entry{0, kFirstRetry});
    if (!inserted) {
      it->second.skipped = 0;
      it->second.retry_after = std::min(kMaxRetry, it->second.retry_after * 2);
    }
  }

  void record_success(const Key& key) {
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.erase(key);
  }

 private:
  struct Entry {
    int64_t skipped;
    int64_t retry_after;
  };
  std::mutex mutex_;
  std::map<Key, Entry> entries_;
};

} // namespace resnet_fused::cuda
