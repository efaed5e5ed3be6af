// tomeserve-cli list-models and health: the two small unary calls.
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_join.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/wire_format_lite.h"
#include "grpcpp/client_context.h"
#include "grpcpp/completion_queue.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/support/byte_buffer.h"
#include "tomeserve/v1/image_generator.grpc.pb.h"
#include "tools/client_commands.h"
#include "tools/client_status.h"

namespace tomeserve::tools {
namespace {

constexpr std::chrono::seconds kInfoDeadline{10};

const char* SchedulerName(v1::Scheduler s) {
  switch (s) {
    case v1::SCHEDULER_PNDM:
      return "pndm";
    case v1::SCHEDULER_DDIM:
      return "ddim";
    case v1::SCHEDULER_EULER:
      return "euler";
    case v1::SCHEDULER_EULER_ANCESTRAL:
      return "euler_a";
    case v1::SCHEDULER_DPMPP_2M:
      return "dpmpp_2m";
    case v1::SCHEDULER_DPMPP_2M_KARRAS:
      return "dpmpp_2m_karras";
    default:
      return "unspecified";
  }
}

// grpc.health.v1's messages are two fields; encoding them by hand spares a second generated proto (whose
// descriptor could clash with one linked into the same binary elsewhere).
//   HealthCheckRequest { string service = 1; }   HealthCheckResponse { ServingStatus status = 1; }
std::string EncodeHealthRequest(const std::string& service) {
  std::string out;
  if (service.empty()) return out;
  out.push_back(0x0a);  // field 1, length-delimited
  for (uint64_t n = service.size();; n >>= 7) {
    if (n < 0x80) {
      out.push_back(static_cast<char>(n));
      break;
    }
    out.push_back(static_cast<char>((n & 0x7f) | 0x80));
  }
  return out + service;
}

// Returns the status field (0 UNKNOWN, 1 SERVING, 2 NOT_SERVING, 3 SERVICE_UNKNOWN), or -1 if malformed.
int DecodeHealthResponse(const std::string& bytes) {
  google::protobuf::io::CodedInputStream in(reinterpret_cast<const uint8_t*>(bytes.data()),
                                            static_cast<int>(bytes.size()));
  int status = 0;
  while (uint32_t tag = in.ReadTag()) {
    if (tag == 0x08) {
      uint32_t value = 0;
      if (!in.ReadVarint32(&value)) return -1;
      status = static_cast<int>(value);
    } else if (!google::protobuf::internal::WireFormatLite::SkipField(&in, tag)) {
      return -1;
    }
  }
  return status;
}

}  // namespace

int ListModelsCommand(const ConnectionOptions& connection, const CliArgs& /*args*/) {
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel = MakeChannel(connection);
  if (!channel.ok()) return LocalError(channel.status());
  auto stub = v1::ImageGenerator::NewStub(*channel);
  grpc::ClientContext context;
  PrepareContext(context, connection, kInfoDeadline);
  v1::ListModelsResponse response;
  grpc::Status status = stub->ListModels(&context, v1::ListModelsRequest(), &response);
  if (!status.ok()) return RpcError(status);
  for (const v1::ModelInfo& m : response.models()) {
    std::printf("%s\t%ux%u\tscheduler %s\tdtype %s\tdevices %s\tdefault ratio %g\tlimits: side <= %u, "
                "pixels <= %llu, steps <= %u, images <= %u, prompt <= %u tokens\n",
                m.name().c_str(), m.native_width(), m.native_height(), SchedulerName(m.default_scheduler()),
                m.dtype().c_str(), absl::StrJoin(m.devices(), ",").c_str(), m.default_tome_ratio(),
                m.limits().max_side(), static_cast<unsigned long long>(m.limits().max_pixels()),
                m.limits().max_steps(), m.limits().max_images(), m.limits().max_prompt_tokens());
  }
  std::fflush(stdout);
  return kExitOk;
}

int HealthCommand(const ConnectionOptions& connection, const CliArgs& args) {
  absl::StatusOr<std::shared_ptr<grpc::Channel>> channel = MakeChannel(connection);
  if (!channel.ok()) return LocalError(channel.status());
  grpc::GenericStub stub(*channel);
  grpc::ClientContext context;
  PrepareContext(context, connection, kInfoDeadline);
  const std::string request_bytes = EncodeHealthRequest(args.Get("service").value_or(""));
  grpc::Slice slice(request_bytes);
  grpc::ByteBuffer request(&slice, 1);
  grpc::ByteBuffer response;
  grpc::CompletionQueue cq;
  auto call = stub.PrepareUnaryCall(&context, "/grpc.health.v1.Health/Check", request, &cq);
  call->StartCall();
  grpc::Status status;
  int tag = 1;
  call->Finish(&response, &status, &tag);
  void* got = nullptr;
  bool ok = false;
  const bool completed = cq.Next(&got, &ok) && ok;
  cq.Shutdown();
  while (cq.Next(&got, &ok)) {
  }
  if (!completed) return LocalError(absl::InternalError("health call did not complete"));
  if (!status.ok()) return RpcError(status);
  std::vector<grpc::Slice> slices;
  if (!response.Dump(&slices).ok()) return LocalError(absl::DataLossError("unreadable health response"));
  std::string bytes;
  for (const grpc::Slice& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  const int serving = DecodeHealthResponse(bytes);
  static constexpr const char* kNames[] = {"UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"};
  if (serving < 0 || serving > 3) return LocalError(absl::DataLossError("malformed health response"));
  std::printf("%s\n", kNames[serving]);
  std::fflush(stdout);
  return serving == 1 ? kExitOk : kExitUnavailable;
}

}  // namespace tomeserve::tools
