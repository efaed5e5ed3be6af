#include "pipeline/unet_graphs.h"

#include <list>
#include <map>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "pipeline/device.h"

#ifdef TOMESERVE_HAVE_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAStream.h>
#include <spdlog/spdlog.h>
#endif

namespace tomeserve::pipeline {
namespace {

// `src` (any device) into `dst` without making the host wait: a CPU source goes through pinned memory.
void CopyAsync(const at::Tensor& dst, const at::Tensor& src) {
  if (dst.is_cuda() && src.is_cpu()) {
    dst.copy_(src.pin_memory(), /*non_blocking=*/true);
  } else {
    dst.copy_(src, /*non_blocking=*/true);
  }
}

}  // namespace

at::Tensor RecordedHookInputs::Upload(const at::Tensor& host, Redraw redraw) {
  TORCH_CHECK(host.is_cpu(), "hook inputs are computed on the CPU");
  if (replaying_) {  // a run of the recorded layout: the same uploads, in the same order
    TORCH_CHECK(cursor_ < slots_.size(), "a run of a recorded call layout uploads more than its ", slots_.size(),
                " recorded hook inputs");
    const at::Tensor& slot = slots_[cursor_++];
    TORCH_CHECK(slot.sizes() == host.sizes() && slot.scalar_type() == host.scalar_type(),
                "hook input ", cursor_ - 1, " changed from ", slot.sizes(), " to ", host.sizes(),
                " within one call layout");
    return slot;
  }
  // Recording: a slot of its own (never the caller's tensor), holding this call's value.
  at::Tensor slot = device_.is_cpu() ? host.clone() : ToDeviceAsync(host, device_);
  slots_.push_back(slot);
  redraws_.push_back(std::move(redraw));
  return slot;
}

void RecordedHookInputs::OnReplay(Effect effect) {
  if (!replaying_) effects_.push_back(std::move(effect));
}

void RecordedHookInputs::Refill(const HookFactory* factory, const UNetCallInfo& info) {
  for (size_t i = 0; i < slots_.size(); ++i) {
    const at::Tensor host = redraws_[i](info);
    TORCH_CHECK(host.defined() && host.sizes() == slots_[i].sizes() && host.scalar_type() == slots_[i].scalar_type(),
                "hook input ", i, " redrawn with shape ", host.defined() ? host.sizes() : at::IntArrayRef{},
                ", recorded ", slots_[i].sizes());
    CopyAsync(slots_[i], host);
  }
  if (factory != nullptr) {
    for (const Effect& effect : effects_) effect(*factory);
  }
}

int64_t UNetGraphs::RowsBucket(int64_t rows, int64_t max_rows) {
  if (rows <= 0 || rows > max_rows) return 0;
  int64_t bucket = rows <= 8 ? 1 : (rows + 7) / 8 * 8;
  while (rows <= 8 && bucket < rows) bucket *= 2;
  return bucket <= max_rows ? bucket : rows;
}

std::optional<std::string> UNetGraphs::LayoutKey(const UNetCall& call, int64_t bucket) {
  std::string key = absl::StrCat(call.sample.size(2), "x", call.sample.size(3), " rows ", call.rows(), "/",
                                 bucket, " text ", call.encoder_hidden_states.size(1), " ",
                                 c10::toString(call.sample.scalar_type()));
  for (const UNetCall::Group& g : call.groups) {
    std::string factory = "plain";
    if (g.factory != nullptr) {
      std::optional<std::string> k = g.factory->CaptureKey();
      if (!k) return std::nullopt;
      factory = *std::move(k);
    }
    // Each row as its sample's ordinal within the group and its half (u/c): which rows pair up.
    std::vector<int> seen;
    std::vector<std::string> rows;
    for (size_t i = 0; i < g.rows.size(); ++i) {
      const int sample = i < g.info.row_sample.size() ? g.info.row_sample[i] : -1;
      auto it = std::find(seen.begin(), seen.end(), sample);
      if (it == seen.end()) it = seen.insert(seen.end(), sample);
      const bool uncond = i < g.info.row_is_uncond.size() && g.info.row_is_uncond[i];
      absl::StrAppend(&rows.emplace_back(), g.rows[i], "=", it - seen.begin(), uncond ? "u" : "c");
    }
    absl::StrAppend(&key, " | ", factory, " [", absl::StrJoin(rows, ","), "]");
  }
  return key;
}

#ifdef TOMESERVE_HAVE_CUDA

struct UNetGraphs::Impl {
  enum class State { kSeen, kCaptured, kEager };
  struct Entry {
    State state = State::kSeen;
    int64_t bucket = 0;
    std::unique_ptr<at::cuda::CUDAGraph> graph;
    at::Tensor sample, timesteps, encoder_hidden_states, output;  // static, bucket rows
    at::Tensor embeddings_source;  // the call tensor last copied into encoder_hidden_states
    std::vector<std::unique_ptr<RecordedHookInputs>> inputs;       // per group
    std::list<std::string>::iterator lru;
  };

  c10::Device device;
  Options options;
  c10::MempoolId_t pool;
  absl::flat_hash_map<std::string, Entry> entries;
  std::list<std::string> lru;  // most recent first
  Stats stats;
  bool warned_default_stream = false;

  at::Tensor Eager(const UNet2DConditionModelImpl& unet, const UNetCall& call) {
    ++stats.eager;
    return RunUNetCall(unet, call);
  }

  void Release(Entry& e) {
    if (e.state == State::kCaptured) --stats.graphs;
    e = Entry{.lru = e.lru};
  }

  // Keeps at most `capacity` graphs and 8x as many layouts, dropping the least recently used.
  void Trim() {
    size_t graphs = stats.graphs;
    for (auto it = lru.rbegin(); it != lru.rend() && graphs > options.capacity; ++it) {
      Entry& e = entries.at(*it);
      if (e.state == State::kCaptured) {
        Release(e);
        --graphs;
      }
    }
    while (lru.size() > 8 * options.capacity) {
      entries.erase(lru.back());
      lru.pop_back();
    }
  }

  // The layout's second call: an eager warm-up on the padded shapes (this call's result), then the capture.
  at::Tensor WarmUpAndCapture(const UNet2DConditionModelImpl& unet, const UNetCall& call, Entry& e,
                              const std::string& key) {
    const int64_t rows = call.rows();
    e.inputs.clear();  // a warm-up that failed (out of memory, say) may have left some behind
    UNetCall padded = PadRows(call, e.bucket);
    // Static inputs, allocated outside the capture so its pool never holds them.
    padded.sample = padded.sample.clone();
    padded.timesteps = ToDeviceAsync(padded.timesteps, device).clone();
    padded.encoder_hidden_states = padded.encoder_hidden_states.clone();
    if (padded.groups.size() > 1) {
      for (UNetCall::Group& g : padded.groups) {
        g.device_rows = ToDeviceAsync(at::tensor(g.rows, at::TensorOptions().dtype(at::kLong)), device);
      }
    }
    std::vector<HookInputs*> raw;
    for (size_t g = 0; g < padded.groups.size(); ++g) {
      e.inputs.push_back(std::make_unique<RecordedHookInputs>(device));
      raw.push_back(e.inputs.back().get());
    }
    ++stats.eager;
    const at::Tensor result = RunUNetCall(unet, padded, raw).narrow(0, 0, rows);

    for (auto& in : e.inputs) in->Rewind();
    auto graph = std::make_unique<at::cuda::CUDAGraph>();
    try {
      graph->capture_begin(pool, cudaStreamCaptureModeThreadLocal);
      try {
        e.output = RunUNetCall(unet, padded, raw);
      } catch (...) {
        try {
          graph->capture_end();  // ends the stream's capture; reports the invalidated graph, ignored here
        } catch (...) {
        }
        throw;
      }
      graph->capture_end();
    } catch (const c10::Error& err) {
      ++stats.capture_failures;
      spdlog::warn("CUDA graph capture failed for UNet layout {}; it runs eagerly: {}", key,
                   err.what_without_backtrace());
      e = Entry{.state = State::kEager, .lru = e.lru};
      c10::cuda::CUDACachingAllocator::emptyCache();
      return result;
    }
    e.graph = std::move(graph);
    e.sample = padded.sample;
    e.timesteps = padded.timesteps;
    e.encoder_hidden_states = padded.encoder_hidden_states;
    e.embeddings_source = call.encoder_hidden_states;
    e.state = State::kCaptured;
    ++stats.captures;
    ++stats.graphs;
    return result;
  }

  at::Tensor Replay(const UNetCall& call, Entry& e) {
    const int64_t rows = call.rows();
    CopyAsync(e.sample.narrow(0, 0, rows), call.sample);
    CopyAsync(e.timesteps.narrow(0, 0, rows), call.timesteps);
    // A running batch passes the same embeddings tensor while its composition stays (DenoiseBatch).
    if (!e.embeddings_source.is_same(call.encoder_hidden_states)) {
      CopyAsync(e.encoder_hidden_states.narrow(0, 0, rows), call.encoder_hidden_states);
      e.embeddings_source = call.encoder_hidden_states;
    }
    std::vector<UNetCall::Group> groups = call.groups;
    PadGroupRows(&groups, rows, e.bucket);
    for (size_t g = 0; g < groups.size(); ++g) e.inputs[g]->Refill(groups[g].factory, groups[g].info);
    e.graph->replay();
    ++stats.replays;
    return e.output.narrow(0, 0, rows).clone();
  }
};

absl::StatusOr<std::unique_ptr<UNetGraphs>> UNetGraphs::Create(const c10::Device& device, const Options& options) {
  if (!device.is_cuda()) {
    return absl::FailedPreconditionError(absl::StrCat("CUDA graphs need a CUDA device, not ", device.str()));
  }
  auto impl = std::make_unique<Impl>(Impl{.device = device, .options = options, .pool = at::cuda::graph_pool_handle()});
  return std::unique_ptr<UNetGraphs>(new UNetGraphs(std::move(impl)));
}

at::Tensor UNetGraphs::Run(const UNet2DConditionModelImpl& unet, const UNetCall& call) {
  Impl& im = *impl_;
  if (c10::cuda::getCurrentCUDAStream(im.device.index()) == c10::cuda::getDefaultCUDAStream(im.device.index())) {
    if (!im.warned_default_stream) {
      spdlog::warn("CUDA graphs cannot be captured on the default stream; UNet calls run eagerly");
      im.warned_default_stream = true;
    }
    return im.Eager(unet, call);
  }
  const int64_t bucket = RowsBucket(call.rows(), im.options.max_rows);
  std::optional<std::string> key = bucket > 0 ? LayoutKey(call, bucket) : std::nullopt;
  if (!key) return im.Eager(unet, call);
  auto [it, inserted] = im.entries.try_emplace(*key);
  Impl::Entry& e = it->second;
  if (inserted) {
    im.lru.push_front(*key);
    e.lru = im.lru.begin();
    e.bucket = bucket;
    im.Trim();
    return im.Eager(unet, call);  // `e` may be gone: Trim drops the oldest layouts
  }
  im.lru.splice(im.lru.begin(), im.lru, e.lru);
  switch (e.state) {
    case Impl::State::kEager:
      return im.Eager(unet, call);
    case Impl::State::kSeen: {
      e.bucket = bucket;
      at::Tensor out = im.WarmUpAndCapture(unet, call, e, *key);
      im.Trim();
      return out;
    }
    case Impl::State::kCaptured:
      return im.Replay(call, e);
  }
  return im.Eager(unet, call);
}

UNetGraphs::Stats UNetGraphs::stats() const { return impl_->stats; }

#else  // !TOMESERVE_HAVE_CUDA

struct UNetGraphs::Impl {};

absl::StatusOr<std::unique_ptr<UNetGraphs>> UNetGraphs::Create(const c10::Device&, const Options&) {
  return absl::UnimplementedError("this build of tomeserve has no CUDA (libtorch without CUDA): no CUDA graphs");
}

at::Tensor UNetGraphs::Run(const UNet2DConditionModelImpl& unet, const UNetCall& call) {
  return RunUNetCall(unet, call);
}

UNetGraphs::Stats UNetGraphs::stats() const { return {}; }

#endif  // TOMESERVE_HAVE_CUDA

UNetGraphs::UNetGraphs(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
UNetGraphs::~UNetGraphs() = default;

}  // namespace tomeserve::pipeline
