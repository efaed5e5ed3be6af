// tomeserve-cli generate: one GenerateStream call. Queue and step events drive the progress line; the result
// event's images go to -o (OUT-0.png, OUT-1.png, ... for several) and a summary goes to stdout.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "grpcpp/client_context.h"
#include "tomeserve/v1/image_generator.grpc.pb.h"
#include "tools/client_commands.h"
#include "tools/client_progress.h"
#include "tools/client_request.h"
#include "tools/client_status.h"

namespace tomeserve::tools {
namespace {

// Long enough for 50 steps of SD 1.5 on a CPU; --timeout overrides.
constexpr std::chrono::seconds kGenerateDeadline{600};

absl::Status WriteFile(const std::string& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(data.data(), static_cast<std::streamsize>(data.size()));
  out.close();
  if (!out) return absl::InternalError(absl::StrCat("cannot write ", path));
  return absl::OkStatus();
}

const char* OnOff(bool value) { return value ? "on" : "off"; }

void PrintSummary(const v1::GenerateResponse& r, double wall_s) {
  const v1::Timings& t = r.timings();
  std::printf("request %s on model %s: batch size %u\n", r.request_id().c_str(), r.model().c_str(),
              r.batch_size());
  std::printf(
      "timings (s): queue %.3f, text encoding %.3f, denoising %.3f, decoding %.3f, server total %.3f, "
      "end to end %.3f\n",
      t.queue_seconds(), t.text_encoding_seconds(), t.denoising_seconds(), t.decoding_seconds(),
      t.total_seconds(), wall_s);
  const v1::TokenMerging& tome = r.tome();
  std::string line = absl::StrFormat("tome: ratio %.3f", tome.has_ratio() ? tome.ratio() : 0.0f);
  absl::StrAppendFormat(&line,
                        ", max_downsample %u, sx %u, sy %u, use_rand %s, merge attn %s, crossattn %s, mlp %s",
                        tome.max_downsample(), tome.sx(), tome.sy(), OnOff(tome.use_rand()),
                        OnOff(tome.merge_attn()), OnOff(tome.merge_crossattn()), OnOff(tome.merge_mlp()));
  if (tome.has_seed()) absl::StrAppend(&line, ", seed ", tome.seed());
  std::printf("%s\n", line.c_str());
  if (r.has_slo()) {
    const v1::SloDecision& slo = r.slo();
    std::printf("slo: ratio chosen in [%.2f, %.2f] for a %.3f s target: predicted %.3f s, target %s\n",
                slo.min_ratio(), slo.max_ratio(), slo.latency_target_seconds(), slo.predicted_seconds(),
                slo.target_met() ? "met" : "not met (max ratio used)");
  }
  if (r.merged_tokens_size() > 0) {
    uint64_t before = 0, after = 0;
    for (const v1::MergedTokens& m : r.merged_tokens()) {
      before += m.tokens_before();
      after += m.tokens_after();
    }
    std::printf("merged tokens: %llu -> %llu over %d blocks (%s: %u -> %u, ...)\n",
                static_cast<unsigned long long>(before), static_cast<unsigned long long>(after),
                r.merged_tokens_size(), r.merged_tokens(0).block().c_str(),
                r.merged_tokens(0).tokens_before(), r.merged_tokens(0).tokens_after());
  } else {
    std::printf("merged tokens: none\n");
  }
}

}  // namespace

int GenerateCommand(const ConnectionOptions& connection, const CliArgs& args) {
  absl::StatusOr<v1::GenerateRequest> request = BuildGenerateRequest(args);
  if (!request.ok()) return UsageError(request.status());
  absl::StatusOr<std::string> output = args.Required("output");
  if (!output.ok()) return UsageError(absl::InvalidArgumentError("-o OUT.png is required"));
  // Fail before the server spends minutes on the images, not after.
  const std::filesystem::path out_dir = std::filesystem::absolute(*output).parent_path();
  if (!std::filesystem::is_directory(out_dir)) {
    return UsageError(
        absl::InvalidArgumentError(absl::StrCat("-o: folder ", out_dir.string(), " does not exist")));
  }
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel = MakeChannel(connection);
  if (!channel.ok()) return LocalError(channel.status());
  auto stub = v1::ImageGenerator::NewStub(*channel);

  grpc::ClientContext context;
  PrepareContext(context, connection, kGenerateDeadline);
  ProgressLine progress(::isatty(STDERR_FILENO) && !args.Has("quiet"));
  const auto t0 = std::chrono::steady_clock::now();
  std::unique_ptr<grpc::ClientReader<v1::GenerateEvent>> reader = stub->GenerateStream(&context, *request);
  v1::GenerateEvent event;
  std::optional<v1::GenerateResponse> result;
  while (reader->Read(&event)) {
    switch (event.event_case()) {
      case v1::GenerateEvent::kQueued:
        progress.Queued(event.queued().position(),
                        event.queued().has_estimated_start_seconds() ? event.queued().estimated_start_seconds() : -1);
        break;
      case v1::GenerateEvent::kProgress:
        progress.Step(event.progress().step(), event.progress().num_steps());
        break;
      case v1::GenerateEvent::kResult:
        result = std::move(*event.mutable_result());
        break;
      default:
        break;  // an event kind newer than this client
    }
  }
  grpc::Status status = reader->Finish();
  const double wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  progress.Clear();
  if (!status.ok()) return RpcError(status);
  if (!result) return LocalError(absl::DataLossError("the stream ended without a result event"));
  if (result->images_size() == 0) return LocalError(absl::DataLossError("the result holds no images"));

  for (int i = 0; i < result->images_size(); ++i) {
    const v1::Image& image = result->images(i);
    const std::string path = OutputPath(*output, i, result->images_size());
    if (absl::Status s = WriteFile(path, image.data()); !s.ok()) return LocalError(s);
    std::printf("wrote %s (%ux%u %s, seed %llu)\n", path.c_str(), image.width(), image.height(),
                image.mime_type().c_str(), static_cast<unsigned long long>(image.seed()));
  }
  PrintSummary(*result, wall_s);
  std::fflush(stdout);
  return kExitOk;
}

}  // namespace tomeserve::tools
