#include "pipeline/text_embedding_cache.h"

namespace tomeserve::pipeline {

std::optional<TextConditioning> TextEmbeddingCache::Find(const std::string& text) {
  absl::MutexLock lock(&mu_);
  auto it = index_.find(text);
  if (it == index_.end()) {
    ++misses_;
    return std::nullopt;
  }
  ++hits_;
  order_.splice(order_.begin(), order_, it->second);
  return it->second->second;
}

void TextEmbeddingCache::Insert(const std::string& text, TextConditioning embedding) {
  if (capacity_ == 0) return;
  absl::MutexLock lock(&mu_);
  if (auto it = index_.find(text); it != index_.end()) {
    it->second->second = std::move(embedding);
    order_.splice(order_.begin(), order_, it->second);
    return;
  }
  order_.emplace_front(text, std::move(embedding));
  index_[text] = order_.begin();
  if (order_.size() > capacity_) {
    index_.erase(order_.back().first);
    order_.pop_back();
  }
}

TextEmbeddingCache::Stats TextEmbeddingCache::stats() const {
  absl::MutexLock lock(&mu_);
  return {.hits = hits_, .misses = misses_, .entries = order_.size()};
}

}  // namespace tomeserve::pipeline
