"""Helpers for the client-side tests: a fake ImageGenerator server whose answers a test scripts, so that the CLI's
contract (request fields, files, summary, exit code per status class) is tested without a model."""
from concurrent import futures

from tomeserve_server import health_stubs, proto


def stubs():
    """(pb2, pb2_grpc, health_pb2, health_pb2_grpc): the stubs tomeserve_server generates (one copy per process:
    a second grpc.health.v1 module would clash in protobuf's descriptor pool)."""
    return (*proto(), *health_stubs())


class FakeServer:
    """An ImageGenerator + Health server on 127.0.0.1 (free port). `fail` (a grpc.StatusCode or None) makes every
    call fail with that code; otherwise GenerateStream sends queued, progress, then a result with `num_images`
    fake images, and records each request in `requests`."""

    def __init__(self):
        import grpc

        pb2, pb2_grpc, health_pb2, health_pb2_grpc = stubs()
        self.requests = []
        self.fail = None
        self.serving = True
        fake = self

        class Generator(pb2_grpc.ImageGeneratorServicer):
            def _check(self, context):
                if fake.fail is not None:
                    context.abort(fake.fail, f"fake failure {fake.fail.name}\nsecond line")

            def _result(self, request):
                n = request.num_images or 1
                seed = request.seed if request.HasField("seed") else 1234
                images = [pb2.Image(data=b"\x89PNG fake %d" % i, mime_type="image/png", width=request.width or 64,
                                    height=request.height or 64, seed=(seed + i) % 2**64) for i in range(n)]
                tome = pb2.TokenMerging(ratio=request.tome.ratio if request.tome.HasField("ratio") else 0.0,
                                        max_downsample=1, sx=2, sy=2, use_rand=True, merge_attn=True)
                merged = [pb2.MergedTokens(block="down_blocks.0.attentions.0.transformer_blocks.0",
                                           tokens_before=64, tokens_after=32)] if tome.ratio > 0 else []
                return pb2.GenerateResponse(
                    images=images, batch_size=n, tome=tome, merged_tokens=merged,
                    request_id=request.request_id or "fake-id", model=request.model or "tiny",
                    timings=pb2.Timings(queue_seconds=0.001, text_encoding_seconds=0.002,
                                        denoising_seconds=0.003, decoding_seconds=0.004, total_seconds=0.01))

            def Generate(self, request, context):
                fake.requests.append(request)
                self._check(context)
                return self._result(request)

            def GenerateStream(self, request, context):
                fake.requests.append(request)
                self._check(context)
                yield pb2.GenerateEvent(queued=pb2.Queued(position=1))
                steps = request.num_inference_steps or 50
                for i in range(1, steps + 1):
                    yield pb2.GenerateEvent(progress=pb2.Progress(step=i, num_steps=steps))
                yield pb2.GenerateEvent(result=self._result(request))

            def ListModels(self, request, context):
                self._check(context)
                return pb2.ListModelsResponse(models=[pb2.ModelInfo(
                    name="tiny", native_width=64, native_height=64, default_scheduler=pb2.SCHEDULER_PNDM,
                    devices=["cpu"], dtype="fp32", default_tome_ratio=0.5,
                    limits=pb2.RequestLimits(max_side=1024, max_pixels=1 << 20, max_steps=150, max_images=4,
                                             max_prompt_tokens=77, max_prompt_bytes=4096))])

        class Health(health_pb2_grpc.HealthServicer):
            def Check(self, request, context):
                status = health_pb2.HealthCheckResponse.SERVING if fake.serving else \
                    health_pb2.HealthCheckResponse.NOT_SERVING
                return health_pb2.HealthCheckResponse(status=status)

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb2_grpc.add_ImageGeneratorServicer_to_server(Generator(), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(Health(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.target = f"127.0.0.1:{self.port}"
        self.server.start()

    def stop(self):
        self.server.stop(grace=None)


def closed_port():
    """A 127.0.0.1 port with nothing listening (bound once, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

