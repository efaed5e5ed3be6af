// One binary that links libtorch (from the PyPI wheel) together with Debian's gRPC, protobuf and abseil, and
// uses all of them at run time: protobuf symbol clashes or a _GLIBCXX_USE_CXX11_ABI mismatch between the two
// worlds show up here as link errors or crashes instead of in the server.
#include <grpcpp/grpcpp.h>

#include <ATen/ATen.h>

#include "gtest/gtest.h"
#include "tomeserve/v1/image_generator.grpc.pb.h"

namespace tomeserve {
namespace {

// Answers ListModels with a value computed by torch, on the gRPC thread (fine in a test; the server never does).
class TorchBackedService final : public v1::ImageGenerator::CallbackService {
  grpc::ServerUnaryReactor* ListModels(grpc::CallbackServerContext* ctx, const v1::ListModelsRequest*,
                                       v1::ListModelsResponse* response) override {
    at::Tensor t = at::arange(1, 5, at::kFloat).sum();  // 1+2+3+4
    auto* m = response->add_models();
    m->set_name("torch-" + std::to_string(static_cast<int>(t.item<float>())));
    m->set_native_width(512);
    auto* reactor = ctx->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }
};

TEST(TorchGrpcLink, TorchAndGrpcWorkInOneProcess) {
  EXPECT_EQ(_GLIBCXX_USE_CXX11_ABI, 1);
  TorchBackedService service;
  int port = 0;
  grpc::ServerBuilder builder;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_NE(server, nullptr);
  ASSERT_GT(port, 0);

  auto channel = grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials());
  auto stub = v1::ImageGenerator::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  v1::ListModelsResponse response;
  grpc::Status status = stub->ListModels(&ctx, v1::ListModelsRequest(), &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  ASSERT_EQ(response.models_size(), 1);
  EXPECT_EQ(response.models(0).name(), "torch-10");

  // A protobuf round trip through the wire format, in the same process as torch's own protobuf-using code.
  v1::GenerateRequest request;
  request.set_prompt("a photo of a cat");
  request.mutable_tome()->set_ratio(0.5f);
  v1::GenerateRequest back;
  ASSERT_TRUE(back.ParseFromString(request.SerializeAsString()));
  EXPECT_FLOAT_EQ(back.tome().ratio(), 0.5f);
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
}

}  // namespace
}  // namespace tomeserve
