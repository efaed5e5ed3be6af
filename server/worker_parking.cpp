// The worker's parked samples: samples taken out of their running batch with their state (latents, schedule,
// generator) and added back later. Out-of-memory eviction parks the newest half of a batch that did not fit
// (Evict); fair preemption parks a running call's samples for another tenant's call (Pause, AdmitPlan::pause);
// Readmit adds them back at a step boundary, oldest evicted first, within the batch's image cap, a paused one
// only once the call it was paused for has ended. Worker thread only; the state is worker_impl.h's.
#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <optional>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "server/worker_impl.h"

namespace tomeserve::server {

bool Worker::Impl::Live(uint64_t id) const {
  return std::any_of(jobs.begin(), jobs.end(), [&](const auto& r) { return r->call.id == id && !r->ended; });
}

void Worker::Impl::Pause(const AdmittedCall& call) {
  const uint64_t for_id = call.call.id;
  for (const uint64_t id : call.pause) {
    for (auto& run : jobs) {
      if (run->ended || run->call.id != id) continue;
      pipeline::DenoiseBatch& denoise = *run->batch->denoise;
      for (int i = 0; i < static_cast<int>(run->sample_ids.size()); ++i) {
        const int sid = run->sample_ids[i];
        if (sid < 0 || !denoise.sample(sid).active()) continue;
        std::optional<pipeline::DenoiseBatch::Sample> s = denoise.Remove(sid);
        run->sample_ids[i] = -1;
        parked.push_back({run.get(), i, *std::move(s), for_id});
        run->paused_for = for_id;
      }
      if (run->paused_for == for_id) {
        spdlog::info("worker {} on {}: paused id={} (tenant {}) for id={} (tenant {}): fair share", options.index,
                     options.device, run->job->request().request_id, run->call.tenant,
                     call.job->request().request_id, call.call.tenant);
      }
    }
  }
}

void Worker::Impl::Readmit() {
  const int cap = std::min(options.max_batch_images, oom_cap);
  // Oldest evicted first; a sample waits while its batch is at the cap (a later one of another batch may pass),
  // and a paused one while the call it was paused for runs.
  for (auto it = parked.begin(); it != parked.end();) {
    if (it->run->ended) {
      it = parked.erase(it);
      continue;
    }
    if (it->held_for && Live(*it->held_for)) {
      ++it;
      continue;
    }
    pipeline::DenoiseBatch& denoise = *it->run->batch->denoise;
    if (denoise.active_samples() >= cap) {
      ++it;
      continue;
    }
    Parked p = std::move(*it);
    it = parked.erase(it);
    absl::StatusOr<int> id = denoise.Add(std::move(p.sample));
    if (!id.ok()) {
      End(*p.run, id.status());
      continue;
    }
    p.run->sample_ids[p.image] = *id;
    p.run->paused_for.reset();
  }
}

void Worker::Impl::Evict(RunningBatch& b, const absl::Status& oom, int active) {
  // The graphs' pool first: its memory goes back before the smaller batch is retried (each layout captures
  // again when next seen).
  for (auto& [model, model_graphs] : graphs) model_graphs->Release();
  EmptyCache();
  pipeline::DenoiseBatch* const batch = b.denoise.get();
  const int batch_width = b.width, batch_height = b.height;
  // The batch's active samples, newest first.
  std::vector<std::pair<RunningJob*, int>> newest_first;
  for (auto it = jobs.rbegin(); it != jobs.rend(); ++it) {
    if ((*it)->batch != &b) continue;
    for (int i = static_cast<int>((*it)->sample_ids.size()) - 1; i >= 0; --i) {
      const int id = (*it)->sample_ids[i];
      if (id >= 0 && batch->sample(id).active()) newest_first.emplace_back(it->get(), i);
    }
  }
  const RunningJob* newest = newest_first.empty() ? nullptr : newest_first.front().first;
  metrics->CountOom(b.model, newest != nullptr ? tome::Canonical(newest->tome).ratio : 0.0, batch_width, batch_height);
  if (active <= 1) {
    RunningJob& run = *newest_first.front().first;
    spdlog::warn("out of memory for a single image ({}x{}) on {}: {}", batch_width, batch_height, options.device,
                 std::string(oom.message()));
    End(run, absl::ResourceExhaustedError(absl::StrCat(
                 "out of memory on ", options.device, ": a single ", batch_width, "x", batch_height,
                 " image does not fit even alone; try a smaller size: ", oom.message())));
    return;
  }
  const int keep = active / 2;
  const int evict = active - keep;
  spdlog::warn("out of memory for a batch of {} ({}x{}) on {}; evicting the {} most recently admitted, state kept",
               active, batch_width, batch_height, options.device, evict);
  oom_cap = keep;
  steps_at_cap = 0;
  for (int k = 0; k < evict; ++k) {
    auto [run, image] = newest_first[k];
    std::optional<pipeline::DenoiseBatch::Sample> s = batch->Remove(run->sample_ids[image]);
    run->sample_ids[image] = -1;
    // Newest evicted first, each to the front: the oldest evicted rejoins first.
    parked.push_front({run, image, *std::move(s)});
  }
  metrics->CountEvictions(evict);
}

}  // namespace tomeserve::server
