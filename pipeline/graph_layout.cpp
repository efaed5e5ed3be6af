#include "pipeline/graph_layout.h"

#include <algorithm>
#include <numeric>
#include <tuple>
#include <utility>

#include "absl/hash/hash.h"
#include "absl/strings/str_cat.h"

namespace tomeserve::pipeline {

int64_t CallLayout::rows() const {
  int64_t n = 0;
  for (const LayoutGroup& g : groups) n += g.rows();
  return n;
}

std::vector<size_t> CanonicalOrder(const std::vector<LayoutSample>& samples) {
  std::vector<size_t> order(samples.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return std::forward_as_tuple(samples[a].settings, !samples[a].guided) <
           std::forward_as_tuple(samples[b].settings, !samples[b].guided);
  });
  return order;
}

std::vector<LayoutGroup> CanonicalGroups(const std::vector<LayoutSample>& samples) {
  std::vector<LayoutGroup> groups;
  for (size_t i : CanonicalOrder(samples)) {
    const LayoutSample& s = samples[i];
    if (groups.empty() || groups.back().settings != s.settings) groups.push_back({.settings = s.settings});
    ++(s.guided ? groups.back().pairs : groups.back().singles);
  }
  return groups;
}

int64_t GraphRowsBucket(int64_t rows, int64_t max_rows, RowBuckets buckets) {
  if (rows <= 0 || rows > max_rows) return 0;
  int64_t bucket = rows;
  if (buckets == RowBuckets::kPowerOfTwo) {
    bucket = 1;
    while (bucket < rows && bucket < 8) bucket *= 2;
    if (rows > 8) bucket = (rows + 7) / 8 * 8;
  } else if (rows > 2) {
    const int64_t step = rows <= 16 ? 2 : rows <= 32 ? 4 : 8;
    bucket = (rows + step - 1) / step * step;
  }
  return bucket <= max_rows ? bucket : rows;
}

std::string GraphLayoutKey(const CallLayout& layout, int64_t bucket) {
  std::string key = absl::StrCat(layout.latent_height, "x", layout.latent_width, " rows ", layout.rows(), "/",
                                 bucket, " text ", layout.text_length, " ", layout.dtype);
  for (const LayoutGroup& g : layout.groups) {
    absl::StrAppend(&key, " | ", g.settings.empty() ? "plain" : g.settings, " ", g.pairs, "p", g.singles, "s");
  }
  return key;
}

GraphLayoutCache::Action GraphLayoutCache::Next(const std::string& key) {
  seen_.insert(absl::HashOf(key));
  stats_.layouts = static_cast<int64_t>(seen_.size());
  auto [it, inserted] = entries_.try_emplace(key);
  Entry& e = it->second;
  if (inserted) {
    lru_.push_front(key);
    e.lru = lru_.begin();
    ++stats_.eager;
    Trim();  // may drop the oldest layouts (never this one: it is the most recent)
    return Action::kEager;
  }
  lru_.splice(lru_.begin(), lru_, e.lru);
  switch (e.state) {
    case State::kSeen:
      ++stats_.eager;  // the warm-up; a capture follows
      return Action::kCapture;
    case State::kCaptured:
      ++stats_.replays;
      return Action::kReplay;
    case State::kEager:
      break;
  }
  ++stats_.eager;
  return Action::kEager;
}

void GraphLayoutCache::Captured(const std::string& key) {
  auto it = entries_.find(key);
  if (it == entries_.end() || it->second.state == State::kCaptured) return;
  it->second.state = State::kCaptured;
  ++stats_.captures;
  ++stats_.graphs;
  Trim();
}

void GraphLayoutCache::CaptureFailed(const std::string& key) {
  auto it = entries_.find(key);
  if (it == entries_.end()) return;
  ++stats_.capture_failures;
  it->second.state = State::kEager;
}

std::vector<std::string> GraphLayoutCache::TakeReleased() { return std::exchange(released_, {}); }

void GraphLayoutCache::ReleaseAll() {
  for (auto& [key, e] : entries_) {
    if (e.state != State::kCaptured) continue;
    e.state = State::kSeen;
    released_.push_back(key);
  }
  stats_.graphs = 0;
}

void GraphLayoutCache::Trim() {
  // The least recently used graphs beyond `capacity_` (the most recent layout keeps its graph).
  for (auto it = lru_.rbegin(); it != lru_.rend() && stats_.graphs > capacity_; ++it) {
    Entry& e = entries_.at(*it);
    if (e.state != State::kCaptured) continue;
    e.state = State::kSeen;
    released_.push_back(*it);
    --stats_.graphs;
  }
  while (lru_.size() > 8 * capacity_) {
    const std::string& oldest = lru_.back();
    if (entries_.at(oldest).state == State::kCaptured) {
      released_.push_back(oldest);
      --stats_.graphs;
    }
    entries_.erase(oldest);
    lru_.pop_back();
  }
}

}  // namespace tomeserve::pipeline
