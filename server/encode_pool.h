// A few threads that encode finished images off a worker's thread: PNG encoding of a 512x512 image takes tens of
// milliseconds even at zlib level 1, which the device would otherwise sit through at every step boundary where a
// sample finishes. Tasks are plain closures that hand their results back themselves (the worker collects them
// at its next step boundary). One pool per worker, owned by it.
//
// Thread-safe. The destructor runs every task already submitted, then joins.
#pragma once

#include <deque>
#include <functional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace tomeserve::server {

class EncodePool {
 public:
  // `threads` >= 1.
  explicit EncodePool(int threads);
  ~EncodePool();
  EncodePool(const EncodePool&) = delete;
  EncodePool& operator=(const EncodePool&) = delete;

  void Submit(std::function<void()> task);

 private:
  void Run();

  absl::Mutex mu_;
  std::deque<std::function<void()>> tasks_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

}  // namespace tomeserve::server
