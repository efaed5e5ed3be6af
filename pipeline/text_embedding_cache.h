// A bounded least-recently-used map from a prompt's text to its text-encoder output (TextConditioning with one
// row: [1, 77, hidden] on the model's device, plus SDXL's pooled [1, P]), so that repeated texts (the empty negative prompt of nearly every call, a popular prompt, the
// N images of one request) skip the text encoder across calls. Each entry is the text encoded alone, so a cached
// row is bit-identical to a fresh one whatever else was encoded with it (batch composition never changes a
// prompt's embedding, and neither does the cache's state).
//
// Thread-safe (one mutex; held for map updates only, never across an encoder call). Entries are shared,
// read-only tensors: callers must not write into them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <list>
#include <optional>
#include <string>
#include <utility>

#include <ATen/ATen.h>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/synchronization/mutex.h"
#include "pipeline/text_conditioning.h"

namespace tomeserve::pipeline {

class TextEmbeddingCache {
 public:
  // `capacity` entries at most; 0 turns the cache off (Find always misses, Insert keeps nothing).
  explicit TextEmbeddingCache(size_t capacity) : capacity_(capacity) {}
  TextEmbeddingCache(const TextEmbeddingCache&) = delete;
  TextEmbeddingCache& operator=(const TextEmbeddingCache&) = delete;

  // The embedding of `text`, which becomes the most recently used entry; nullopt on a miss.
  std::optional<TextConditioning> Find(const std::string& text);
  // Adds (or replaces) `text`'s embedding as the most recently used entry, evicting the least recently used one
  // beyond the capacity.
  void Insert(const std::string& text, TextConditioning embedding);

  struct Stats {
    int64_t hits = 0, misses = 0;
    size_t entries = 0;
  };
  Stats stats() const;
  size_t capacity() const { return capacity_; }

 private:
  using Entry = std::pair<std::string, TextConditioning>;
  const size_t capacity_;
  mutable absl::Mutex mu_;
  std::list<Entry> order_ ABSL_GUARDED_BY(mu_);  // most recently used first
  absl::flat_hash_map<std::string, std::list<Entry>::iterator> index_ ABSL_GUARDED_BY(mu_);
  int64_t hits_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t misses_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace tomeserve::pipeline
