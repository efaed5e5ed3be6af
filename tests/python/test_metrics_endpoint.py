"""The /metrics endpoint under hostile clients (real server, 127.0.0.1): 100 idle connections, slow and partial
requests, an oversized request, wrong paths and methods — a scrape still succeeds at once, HEAD has no body, and
the idle connections are closed by the server within its limits."""
import socket
import time
import urllib.error
import urllib.request

import pytest

from conftest import binary
from tomeserve_server import running_server


def scrape(url, timeout=5.0):
    t0 = time.monotonic()
    with urllib.request.urlopen(url, timeout=timeout) as r:
        body = r.read().decode()
    return body, time.monotonic() - t0


def raw(port, data, timeout=5.0):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def test_scrapes_succeed_under_idle_slow_partial_and_oversized_clients(tiny_model):
    binary("tomeserve")
    with running_server(["--model", tiny_model], metrics=True) as s:
        port = s.metrics_port
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(100)]
        partial = socket.create_connection(("127.0.0.1", port), timeout=5)
        partial.sendall(b"GET /metr")  # and never more
        slow = socket.create_connection(("127.0.0.1", port), timeout=15)
        try:
            body, seconds = scrape(s.metrics_url)
            assert "tomeserve_build_info" in body and seconds < 2.0, seconds
            # A slow client trickling a valid request still gets its answer.
            for piece in (b"GET /met", b"rics HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n"):
                slow.sendall(piece)
                time.sleep(0.3)
            answer = slow.recv(1 << 20)
            assert answer.startswith(b"HTTP/1.1 200 OK"), answer[:100]
            assert raw(port, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 431")
            assert raw(port, b"GET /nope HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404")
            assert raw(port, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405")
            head = raw(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK") and head.endswith(b"\r\n\r\n"), head[-50:]
            body, seconds = scrape(s.metrics_url)
            assert "tomeserve_queue_depth" in body and seconds < 2.0, seconds
            # Idle connections are closed by the server (5 s to send a request).
            time.sleep(6)
            closed = 0
            for c in idle:
                c.settimeout(2)
                try:
                    closed += c.recv(1) == b""
                except (ConnectionResetError, socket.timeout):
                    closed += 1
            assert closed == len(idle), closed
        finally:
            for c in idle + [partial, slow]:
                c.close()
