// The row layout of a UNet call as CUDA graphs see it, torch-free so that the server's UNetGraphs and
// tomeserve-sim run the same code: the canonical row order DenoiseBatch builds, the key a graph is captured
// for, the row buckets, and which layouts hold a graph (GraphLayoutCache).
//
// Canonical order: rows grouped by hook settings (groups ascending by settings key, "" = the plain block
// first), each group's rows contiguous; inside a group the guided samples first, each as its two halves side by
// side (unconditional, then conditional), then the samples without guidance (one conditional row each). A call
// in that order is fixed, for the device, by its latent size, text length, dtype, row bucket and, per group, its
// settings and counts of guided and unguided samples: which sample a row belongs to, its step, seed or values
// change only what the hooks upload (refilled at every replay). So a layout is a multiset of (settings, pairs,
// singles) per size, not the identity of the samples, and the same graph serves every call of that shape.
// Padding rows (bucket - rows) join the last group as unguided samples.
//
// Plain values and free functions; GraphLayoutCache is used on one thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <list>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"

namespace tomeserve::pipeline {

// The server's defaults (UNetGraphs::Options), which tomeserve-sim counts with: graphs held per model and
// worker, and the most rows a graph serves (calls with more run eagerly).
inline constexpr size_t kDefaultGraphCapacity = 32;
inline constexpr int64_t kDefaultGraphMaxRows = 32;

// One sample of a call, as the layout sees it.
struct LayoutSample {
  std::string settings;  // the hook factory's capture key; "" for the plain block
  bool guided = false;   // two rows (classifier-free guidance), else one
};

struct LayoutGroup {
  std::string settings;
  int64_t pairs = 0;    // guided samples: rows 2k, 2k + 1 of the group are one sample's halves
  int64_t singles = 0;  // unguided samples, after the pairs
  int64_t rows() const { return 2 * pairs + singles; }
};

struct CallLayout {
  int64_t latent_height = 0, latent_width = 0, text_length = 0;
  std::string dtype;
  std::vector<LayoutGroup> groups;  // canonical order
  int64_t rows() const;
};

// The canonical order of `samples`: a permutation (indices into `samples`), stable within equal
// (settings, guided).
std::vector<size_t> CanonicalOrder(const std::vector<LayoutSample>& samples);
// The groups of `samples` in canonical order.
std::vector<LayoutGroup> CanonicalGroups(const std::vector<LayoutSample>& samples);

// How graphs pad rows. kFine (the default): 1, 2, then every even count to 16, multiples of 4 to 32, of 8
// above: at most one padding row up to 16 rows (guided calls, with even rows, need none), three up to 32, seven
// above. kPowerOfTwo: 1, 2, 4, 8, then multiples of
// 8 (the earlier scheme, kept for the simulator's comparison).
enum class RowBuckets { kFine, kPowerOfTwo };
// The padded row count for `rows`; `rows` itself when the next bucket is above `max_rows`; 0 when `rows` is
// not in [1, max_rows] (the call runs eagerly).
int64_t GraphRowsBucket(int64_t rows, int64_t max_rows, RowBuckets buckets = RowBuckets::kFine);
// The key a graph of `layout` padded to `bucket` rows is captured for.
std::string GraphLayoutKey(const CallLayout& layout, int64_t bucket);

// Which layouts hold a graph: the first call of a layout runs eagerly, the second warms up and captures, later
// ones replay. At most `capacity` graphs are held and 8x as many layouts remembered, least recently used
// dropped. The caller owns the graphs; it releases what TakeReleased() names.
class GraphLayoutCache {
 public:
  enum class Action { kEager, kCapture, kReplay };
  struct Stats {
    int64_t replays = 0, captures = 0, eager = 0, capture_failures = 0;
    int64_t layouts = 0;  // distinct layouts seen
    size_t graphs = 0;    // held now
  };

  explicit GraphLayoutCache(size_t capacity) : capacity_(capacity) {}

  // What to do for a call of layout `key`; counts the call (a kCapture is an eager warm-up until Captured).
  Action Next(const std::string& key);
  // The capture of `key` (after Next gave kCapture) succeeded: later calls replay it.
  void Captured(const std::string& key);
  // It failed: the layout runs eagerly from now on.
  void CaptureFailed(const std::string& key);
  // Layouts whose graphs were dropped since the last call (their memory is the caller's to free).
  std::vector<std::string> TakeReleased();
  // Drops every graph (after an out-of-memory error); the layouts stay known, so each captures again.
  void ReleaseAll();
  const Stats& stats() const { return stats_; }

 private:
  enum class State { kSeen, kCaptured, kEager };
  struct Entry {
    State state = State::kSeen;
    std::list<std::string>::iterator lru;
  };
  void Trim();

  size_t capacity_;
  absl::flat_hash_map<std::string, Entry> entries_;
  std::list<std::string> lru_;  // most recent first
  absl::flat_hash_set<size_t> seen_;  // hashes of the layouts seen (for stats().layouts)
  std::vector<std::string> released_;
  Stats stats_;
};

}  // namespace tomeserve::pipeline
