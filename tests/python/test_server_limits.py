"""Limits that protect the process, over real gRPC on 127.0.0.1 (tiny model, CPU).

- An oversized message is refused by gRPC with RESOURCE_EXHAUSTED before it is parsed (--max-request-bytes), a
  prompt over --max-prompt-bytes gets INVALID_ARGUMENT naming the field, and the server serves the next call.
- Overload at 10x capacity (a queue of 2 and batches of 2, 40 concurrent calls): the excess is refused with
  RESOURCE_EXHAUSTED before any accepted call finishes, every call gets exactly one answer, every accepted call
  finishes OK, and health stays SERVING throughout.
- Prompts reach the log only with --log-prompts.
- A client that pings more often than --min-client-ping-interval is sent away by gRPC's own enforcement (GOAWAY
  too_many_pings: its channel drops to IDLE) while a polite client on the same server keeps its connection.
No timing assertions: "fast" is checked as an order (every refusal arrives before the first accepted call ends).
"""
import threading
import time

import grpc

from conftest import binary
from tomeserve_server import health_status, proto, running_server

pb, pb_grpc = proto()


def test_oversized_message_and_prompt_are_refused_and_the_server_goes_on(tiny_model):
    binary("tomeserve")
    with running_server(["--model", tiny_model, "--max-request-bytes", "20000", "--log-prompts"]) as s:
        stub = pb_grpc.ImageGeneratorStub(s.channel)
        try:
            stub.Generate(pb.GenerateRequest(prompt="x" * 30000, num_inference_steps=2), timeout=30)
            raise AssertionError("an oversized request was accepted")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
            assert "larger than max" in e.details(), e.details()
        try:
            stub.Generate(pb.GenerateRequest(prompt="y" * 5000, num_inference_steps=2), timeout=30)
            raise AssertionError("a prompt over --max-prompt-bytes was accepted")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e.details()
            assert "prompt" in e.details() and "4096" in e.details(), e.details()
        ok = stub.Generate(pb.GenerateRequest(prompt="zebra-7781 on a \"quoted\" line", num_inference_steps=2,
                                              request_id="after"), timeout=60)
        assert ok.request_id == "after" and len(ok.images) == 1
        assert health_status(s.channel) == "SERVING"
        log = s.log()
        # Logged escaped, on the call's one line.
        assert 'prompt="zebra-7781 on a \\"quoted\\" line"' in log, log


def test_overload_at_ten_times_capacity(tiny_model):
    binary("tomeserve")
    args = ["--model", tiny_model, "--max-queue-size", "2", "--max-batch-size", "2", "--max-batch-cost", "1000000"]
    with running_server(args) as s:
        stub = pb_grpc.ImageGeneratorStub(s.channel)
        calls = 40  # capacity: 2 running + 2 queued
        answers = [None] * calls
        finished_at = [0.0] * calls
        go = threading.Barrier(calls + 1)

        def call(i):
            go.wait()
            try:
                # 256x256, 20 steps: seconds per batch on a CPU, so every refusal is sent while the first
                # accepted calls still run.
                r = stub.Generate(pb.GenerateRequest(prompt=f"overload {i}", seed=i, width=256, height=256,
                                                     num_inference_steps=20, request_id=f"o{i}"), timeout=300)
                answers[i] = ("OK", r.request_id, len(r.images))
            except grpc.RpcError as e:
                answers[i] = (e.code().name, e.details(), 0)
            finished_at[i] = time.monotonic()

        health, stop = [], threading.Event()

        def watch():
            while not stop.is_set():
                health.append(health_status(s.channel, timeout=10))
                stop.wait(0.05)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(calls)]
        for t in threads:
            t.start()
        watcher = threading.Thread(target=watch)
        watcher.start()
        go.wait()
        for t in threads:
            t.join(timeout=600)
        stop.set()
        watcher.join()

        assert all(a is not None for a in answers), "a call got no answer"
        codes = [a[0] for a in answers]
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, answers
        ok = [i for i, a in enumerate(answers) if a[0] == "OK"]
        refused = [i for i, a in enumerate(answers) if a[0] == "RESOURCE_EXHAUSTED"]
        assert len(ok) >= 2 and len(refused) >= calls // 2, codes
        for i in ok:
            assert answers[i][1] == f"o{i}" and answers[i][2] == 1, answers[i]
        for i in refused:
            assert "queue is full" in answers[i][1] and "max-queue-size" in answers[i][1], answers[i]
        assert max(finished_at[i] for i in refused) < min(finished_at[i] for i in ok), \
            "a refusal waited for an accepted call"
        assert health and set(health) == {"SERVING"}, health
        # The server is fine afterwards, and prompts stayed out of the log (no --log-prompts).
        assert len(stub.Generate(pb.GenerateRequest(prompt="after", num_inference_steps=2), timeout=60).images) == 1
        assert "overload 3" not in s.log()


def test_a_client_pinging_too_often_is_sent_away(tiny_model):
    binary("tomeserve")
    with running_server(["--model", tiny_model, "--min-client-ping-interval", "10"]) as s:
        # Keepalive pings every 200 ms with no call open: far inside the 10 s the server allows.
        rude = grpc.insecure_channel(s.address, options=[
            ("grpc.keepalive_time_ms", 200), ("grpc.keepalive_timeout_ms", 5000),
            ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0)])
        polite = grpc.insecure_channel(s.address)
        states = []
        rude.subscribe(states.append, try_to_connect=True)
        try:
            assert health_status(rude) == "SERVING" and health_status(polite) == "SERVING"
            ready_at = states.index(grpc.ChannelConnectivity.READY)
            # After the strikes the server sends GOAWAY and closes: the rude channel leaves READY (bounded wait).
            for _ in range(300):
                if any(st != grpc.ChannelConnectivity.READY for st in states[ready_at + 1:]):
                    break
                time.sleep(0.1)
            assert any(st != grpc.ChannelConnectivity.READY for st in states[ready_at + 1:]), states
            polite_states = []
            polite.subscribe(polite_states.append)
            for _ in range(20):
                if polite_states:
                    break
                time.sleep(0.05)
            assert polite_states == [grpc.ChannelConnectivity.READY], polite_states
            assert health_status(polite) == "SERVING"
        finally:
            rude.close()
            polite.close()
