#include "pipeline/unet_graphs.h"

#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
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

std::optional<CallLayout> UNetGraphs::Layout(const UNetCall& call) {
  CallLayout layout{.latent_height = call.sample.size(2),
                    .latent_width = call.sample.size(3),
                    .text_length = call.encoder_hidden_states.size(1),
                    .dtype = std::string(c10::toString(call.sample.scalar_type()))};
  int64_t next_row = 0;
  for (const UNetCall::Group& g : call.groups) {
    LayoutGroup group;
    if (g.factory != nullptr) {
      std::optional<std::string> k = g.factory->CaptureKey();
      if (!k || k->empty()) return std::nullopt;
      group.settings = *std::move(k);
    }
    const size_t n = g.rows.size();
    if (g.info.row_sample.size() != n || g.info.row_is_uncond.size() != n) return std::nullopt;
    // Canonical: the group's rows contiguous and after the previous group's, pairs (u, c of one sample) first,
    // then single conditional rows.
    for (size_t i = 0; i < n; ++i) {
      if (g.rows[i] != next_row++) return std::nullopt;
    }
    size_t i = 0;
    for (; i + 1 < n && g.info.row_is_uncond[i]; i += 2) {
      if (g.info.row_is_uncond[i + 1] || g.info.row_sample[i] != g.info.row_sample[i + 1]) return std::nullopt;
      ++group.pairs;
    }
    for (; i < n; ++i) {
      if (g.info.row_is_uncond[i]) return std::nullopt;
      ++group.singles;
    }
    layout.groups.push_back(std::move(group));
  }
  if (next_row != call.rows()) return std::nullopt;
  return layout;
}

std::optional<std::string> UNetGraphs::LayoutKey(const UNetCall& call, int64_t bucket) {
  std::optional<CallLayout> layout = Layout(call);
  if (!layout) return std::nullopt;
  return GraphLayoutKey(*layout, bucket);
}

#ifdef TOMESERVE_HAVE_CUDA

struct UNetGraphs::Impl {
  struct Graph {
    std::unique_ptr<at::cuda::CUDAGraph> graph;
    int64_t bucket = 0;
    at::Tensor sample, timesteps, encoder_hidden_states, output;  // static, bucket rows
    at::Tensor embeddings_source;  // the call tensor last copied into encoder_hidden_states
    UNetAddedConditions added;     // static (SDXL), bucket rows; undefined for models without them
    at::Tensor added_source;       // the call's text_embeds last copied into `added`
    std::vector<std::unique_ptr<RecordedHookInputs>> inputs;       // per group
  };

  c10::Device device;
  Options options;
  c10::MempoolId_t pool;
  GraphLayoutCache cache{options.capacity};
  absl::flat_hash_map<std::string, Graph> graphs;  // the layouts `cache` holds a graph for
  int64_t eager_outside = 0;  // calls no layout could serve
  int64_t rows = 0, padded_rows = 0;
  bool warned_default_stream = false;

  at::Tensor Eager(const UNet2DConditionModelImpl& unet, const UNetCall& call) {
    ++eager_outside;
    return RunUNetCall(unet, call);
  }

  void DropReleased() {
    for (const std::string& key : cache.TakeReleased()) graphs.erase(key);
  }

  // The layout's second call: an eager warm-up on the padded shapes (this call's result), then the capture.
  at::Tensor WarmUpAndCapture(const UNet2DConditionModelImpl& unet, const UNetCall& call, int64_t bucket,
                              const std::string& key) {
    const int64_t real_rows = call.rows();
    Graph g{.bucket = bucket};
    UNetCall padded = PadRows(call, bucket);
    // Static inputs, allocated outside the capture so its pool never holds them.
    padded.sample = padded.sample.clone();
    padded.timesteps = ToDeviceAsync(padded.timesteps, device).clone();
    padded.encoder_hidden_states = padded.encoder_hidden_states.clone();
    if (padded.added.text_embeds.defined()) {
      padded.added = {.text_embeds = padded.added.text_embeds.clone(), .time_ids = padded.added.time_ids.clone()};
    }
    if (padded.groups.size() > 1) {
      for (UNetCall::Group& group : padded.groups) {
        group.device_rows = ToDeviceAsync(at::tensor(group.rows, at::TensorOptions().dtype(at::kLong)), device);
      }
    }
    std::vector<HookInputs*> raw;
    for (size_t i = 0; i < padded.groups.size(); ++i) {
      g.inputs.push_back(std::make_unique<RecordedHookInputs>(device));
      raw.push_back(g.inputs.back().get());
    }
    const at::Tensor result = RunUNetCall(unet, padded, raw).narrow(0, 0, real_rows);
    rows += real_rows;
    padded_rows += bucket - real_rows;

    for (auto& in : g.inputs) in->Rewind();
    auto graph = std::make_unique<at::cuda::CUDAGraph>();
    try {
      graph->capture_begin(pool, cudaStreamCaptureModeThreadLocal);
      try {
        g.output = RunUNetCall(unet, padded, raw);
      } catch (...) {
        try {
          graph->capture_end();  // ends the stream's capture; reports the invalidated graph, ignored here
        } catch (...) {
        }
        throw;
      }
      graph->capture_end();
    } catch (const c10::Error& err) {
      cache.CaptureFailed(key);
      spdlog::warn("CUDA graph capture failed for UNet layout {}; it runs eagerly: {}", key,
                   err.what_without_backtrace());
      c10::cuda::CUDACachingAllocator::emptyCache();
      return result;
    }
    g.graph = std::move(graph);
    g.sample = padded.sample;
    g.timesteps = padded.timesteps;
    g.encoder_hidden_states = padded.encoder_hidden_states;
    g.embeddings_source = call.encoder_hidden_states;
    g.added = padded.added;
    g.added_source = call.added.text_embeds;
    graphs[key] = std::move(g);
    cache.Captured(key);
    DropReleased();
    return result;
  }

  at::Tensor Replay(const UNetCall& call, Graph& g) {
    const int64_t real_rows = call.rows();
    CopyAsync(g.sample.narrow(0, 0, real_rows), call.sample);
    CopyAsync(g.timesteps.narrow(0, 0, real_rows), call.timesteps);
    // A running batch passes the same embeddings tensor while its composition stays (DenoiseBatch).
    if (!g.embeddings_source.is_same(call.encoder_hidden_states)) {
      CopyAsync(g.encoder_hidden_states.narrow(0, 0, real_rows), call.encoder_hidden_states);
      g.embeddings_source = call.encoder_hidden_states;
    }
    // Added conditions change with the composition too (DenoiseBatch keeps them beside the embeddings).
    if (g.added.text_embeds.defined() && !g.added_source.is_same(call.added.text_embeds)) {
      CopyAsync(g.added.text_embeds.narrow(0, 0, real_rows), call.added.text_embeds);
      CopyAsync(g.added.time_ids.narrow(0, 0, real_rows), call.added.time_ids);
      g.added_source = call.added.text_embeds;
    }
    std::vector<UNetCall::Group> groups = call.groups;
    PadGroupRows(&groups, real_rows, g.bucket);
    for (size_t i = 0; i < groups.size(); ++i) g.inputs[i]->Refill(groups[i].factory, groups[i].info);
    g.graph->replay();
    rows += real_rows;
    padded_rows += g.bucket - real_rows;
    return g.output.narrow(0, 0, real_rows).clone();
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
  const int64_t bucket = GraphRowsBucket(call.rows(), im.options.max_rows, im.options.buckets);
  std::optional<std::string> key = bucket > 0 ? LayoutKey(call, bucket) : std::nullopt;
  if (!key) return im.Eager(unet, call);
  const GraphLayoutCache::Action action = im.cache.Next(*key);
  im.DropReleased();
  switch (action) {
    case GraphLayoutCache::Action::kEager:
      return RunUNetCall(unet, call);
    case GraphLayoutCache::Action::kCapture:
      return im.WarmUpAndCapture(unet, call, bucket, *key);
    case GraphLayoutCache::Action::kReplay:
      return im.Replay(call, im.graphs.at(*key));
  }
  return im.Eager(unet, call);
}

UNetGraphs::Stats UNetGraphs::stats() const {
  const GraphLayoutCache::Stats& c = impl_->cache.stats();
  return {.replays = c.replays,
          .captures = c.captures,
          .eager = c.eager + impl_->eager_outside,
          .capture_failures = c.capture_failures,
          .graphs = c.graphs,
          .layouts = c.layouts,
          .rows = impl_->rows,
          .padded_rows = impl_->padded_rows};
}

void UNetGraphs::Release() {
  impl_->cache.ReleaseAll();
  impl_->DropReleased();
  c10::cuda::CUDACachingAllocator::emptyCache();
}

#else  // !TOMESERVE_HAVE_CUDA

struct UNetGraphs::Impl {};

absl::StatusOr<std::unique_ptr<UNetGraphs>> UNetGraphs::Create(const c10::Device&, const Options&) {
  return absl::UnimplementedError("this build of tomeserve has no CUDA (libtorch without CUDA): no CUDA graphs");
}

at::Tensor UNetGraphs::Run(const UNet2DConditionModelImpl& unet, const UNetCall& call) {
  return RunUNetCall(unet, call);
}

UNetGraphs::Stats UNetGraphs::stats() const { return {}; }

void UNetGraphs::Release() {}

#endif  // TOMESERVE_HAVE_CUDA

UNetGraphs::UNetGraphs(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
UNetGraphs::~UNetGraphs() = default;

}  // namespace tomeserve::pipeline
