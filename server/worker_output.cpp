// Retiring finished samples at a step boundary: VAE decode in chunks (with the out-of-memory fallbacks), image
// encoding (on the EncodePool or inline), and the calls' results. Worker thread only; see worker_impl.h.
#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <utility>

#include "absl/cleanup/cleanup.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "pipeline/torch_status.h"
#include "server/image_output.h"
#include "server/worker_impl.h"

namespace tomeserve::server {

using worker_internal::kDecodeChunk;
using worker_internal::Seconds;

void Worker::Impl::RetireDone() {
  // Every sample that finished at this boundary leaves the batch; their images are decoded together in chunks
  // of kDecodeChunk (one VAE call each), so the batch-mates wait for a few short decodes, not a long one.
  std::vector<FinishedSample> finished;
  for (auto& run : jobs) {
    if (run->ended) continue;
    for (int i = 0; i < static_cast<int>(run->sample_ids.size()); ++i) {
      const int id = run->sample_ids[i];
      if (id < 0 || !run->batch->denoise->sample(id).done()) continue;
      std::optional<pipeline::DenoiseBatch::Sample> s = run->batch->denoise->Remove(id);
      run->sample_ids[i] = -1;
      finished.push_back({run.get(), i, s->latents});
    }
  }
  for (size_t first = 0; first < finished.size(); first += kDecodeChunk) {
    const size_t last = std::min(finished.size(), first + kDecodeChunk);
    DecodeChunk(std::vector<FinishedSample>(finished.begin() + first, finished.begin() + last));
  }
  // While samples are still denoising, images still encoding wait for a later boundary; once none is, the
  // worker waits for them (nothing else to do, and a run must not sit finished but unreported).
  CollectEncoded(/*all=*/std::all_of(batches.begin(), batches.end(), [](const auto& b) { return b->denoise->Done(); }));
  for (auto& run : jobs) {
    if (run->ended || run->images_left() > 0) continue;
    GenerationResult result = std::move(run->result);
    for (auto& img : run->images) result.images.push_back(*std::move(img));
    result.denoising_seconds = std::max(0.0, Seconds(absl::Now() - run->admitted) - result.decoding_seconds);
    result.total_seconds = Seconds(absl::Now() - run->job->enqueued());
    const GenerationRequest& req = run->job->request();
    const double ratio = tome::Canonical(run->tome).ratio;
    if (run->hooks) {
      int64_t before = 0, after = 0;
      for (const tome::BlockMergeCount& c : run->hooks->MergeCounts()) {
        result.merged_tokens.push_back({c.block, c.tokens_before, c.tokens_after});
        before += c.tokens_before;
        after += c.tokens_after;
      }
      const int64_t per_call = static_cast<int64_t>(req.num_images) * run->num_calls;
      metrics->CountMergedTokens(req.key.model, ratio, before * per_call, after * per_call);
    }
    metrics->CountImages(req.key.model, ratio, req.key.width, req.key.height, req.num_images);
    End(*run, std::move(result));
  }
}

void Worker::Impl::DecodeChunk(const std::vector<FinishedSample>& chunk) {
  std::vector<FinishedSample> live;
  for (const FinishedSample& f : chunk) {
    if (!f.run->ended) live.push_back(f);
  }
  if (live.empty()) return;
  Watch("a VAE decode");  // the decode, its fallbacks and the images encoded here
  absl::Cleanup unwatch = [this] { Unwatch(); };
  const int batch_width = live.front().run->call.width, batch_height = live.front().run->call.height;
  clock->Start();
  absl::StatusOr<std::vector<at::Tensor>> rgb = pipeline::GuardTorch("batching latents", [&]() {
    std::vector<at::Tensor> latents;
    for (const FinishedSample& f : live) latents.push_back(f.latents);
    return live.front().run->model->Decode(at::cat(latents));
  });
  if (!rgb.ok() && pipeline::IsOutOfMemory(rgb.status())) {
    // The latents are kept: free the cache and decode the images one at a time; the denoise is not rerun.
    spdlog::warn("out of memory decoding {} image(s) on {}; retrying one at a time after freeing the cache",
                 live.size(), options.device);
    metrics->CountOom(live.front().run->call.model, tome::Canonical(live.front().run->tome).ratio, batch_width, batch_height);
    EmptyCache();
    std::vector<at::Tensor> one_by_one;
    for (const FinishedSample& f : live) {
      absl::StatusOr<std::vector<at::Tensor>> one = f.run->model->Decode(f.latents);
      if (!one.ok() && pipeline::IsOutOfMemory(one.status())) {
        // Not even one image fits: diffusers' tiled decode, one tile's memory at a time.
        spdlog::warn("out of memory decoding one {}x{} image on {}; decoding it in tiles", batch_width,
                     batch_height, options.device);
        metrics->CountOom(f.run->call.model, tome::Canonical(f.run->tome).ratio, batch_width, batch_height);
        EmptyCache();
        one = f.run->model->Decode(f.latents, /*tiled=*/true);
      }
      if (!one.ok()) {
        rgb = one.status();
        break;
      }
      one_by_one.push_back((*one)[0]);
    }
    if (one_by_one.size() == live.size()) rgb = std::move(one_by_one);
  }
  if (!rgb.ok()) {
    for (const FinishedSample& f : live) End(*f.run, rgb.status());
    return;
  }
  const double decode_seconds = clock->Stop();
  for (size_t k = 0; k < live.size(); ++k) {
    RunningJob& run = *live[k].run;
    if (run.ended) continue;
    absl::StatusOr<at::Tensor> pixels =
        pipeline::GuardTorch("copying the image", [&]() -> absl::StatusOr<at::Tensor> {
          return (*rgb)[k].to(at::kCPU).contiguous();
        });
    if (!pixels.ok()) {
      End(run, pixels.status());
      continue;
    }
    // Each image of the chunk is charged its share of the chunk's decode.
    run.result.decoding_seconds += decode_seconds / static_cast<double>(live.size());
    if (encode_pool != nullptr) {
      ++run.encoding;
      ++encodes_pending;
      encode_pool->Submit([this, r = &run, job = run.job, tome = run.tome, rgb = *std::move(pixels),
                           image = live[k].image] {
        absl::StatusOr<EncodedImage> e = EncodeImage(job->request(), tome, rgb.data_ptr<uint8_t>(),
                                                     static_cast<int>(rgb.size(1)), static_cast<int>(rgb.size(0)), image);
        absl::MutexLock lock(&encoded_mu);
        encoded.push_back({r, image, std::move(e)});
      });
      continue;
    }
    absl::StatusOr<EncodedImage> e =
        EncodeImage(run.job->request(), run.tome, pixels->data_ptr<uint8_t>(), static_cast<int>(pixels->size(1)),
                    static_cast<int>(pixels->size(0)), live[k].image);
    if (!e.ok()) {
      End(run, e.status());
      continue;
    }
    run.images[live[k].image] = *std::move(e);
  }
}

void Worker::Impl::CollectEncoded(bool all) {
  while (encodes_pending > 0) {
    std::vector<Encoded> done;
    if (all) Watch("waiting for the image encoder pool");
    {
      absl::MutexLock lock(&encoded_mu);
      if (all) {
        encoded_mu.Await(absl::Condition(
            +[](std::vector<Encoded>* e) { return !e->empty(); }, &encoded));
      }
      done.swap(encoded);
    }
    if (all) Unwatch();
    if (done.empty()) return;
    for (Encoded& e : done) {
      --encodes_pending;
      --e.run->encoding;
      if (e.run->ended) continue;  // cancelled, timed out or failed meanwhile
      if (!e.encoded.ok()) {
        End(*e.run, e.encoded.status());
        continue;
      }
      e.run->images[e.image] = *std::move(e.encoded);
    }
    if (!all) return;
  }
}

}  // namespace tomeserve::server
