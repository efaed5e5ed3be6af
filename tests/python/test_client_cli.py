"""tomeserve-cli's contract against a scripted fake server (client_support.FakeServer): request fields from flags,
files and summary, one error line and one exit code per gRPC status class, usage errors (exit 2), and an
unreachable target that fails fast. The same CLI against the real server is in test_client_e2e.py."""
import subprocess

import grpc
import pytest

from client_support import FakeServer, closed_port, stubs
from conftest import binary

# The table tomeserve-cli --help prints (tools/client_status.h).
EXIT_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT: 3, grpc.StatusCode.OUT_OF_RANGE: 3, grpc.StatusCode.FAILED_PRECONDITION: 3,
    grpc.StatusCode.NOT_FOUND: 4, grpc.StatusCode.UNAVAILABLE: 5, grpc.StatusCode.DEADLINE_EXCEEDED: 6,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 7, grpc.StatusCode.CANCELLED: 8, grpc.StatusCode.ABORTED: 8,
    grpc.StatusCode.UNAUTHENTICATED: 9, grpc.StatusCode.PERMISSION_DENIED: 9, grpc.StatusCode.INTERNAL: 10,
    grpc.StatusCode.UNKNOWN: 10, grpc.StatusCode.UNIMPLEMENTED: 10, grpc.StatusCode.DATA_LOSS: 10,
}


@pytest.fixture(scope="module")
def cli():
    return binary("tomeserve-cli")


@pytest.fixture
def fake():
    server = FakeServer()
    yield server
    server.stop()


def run(cli, *args, timeout=60):
    return subprocess.run([str(cli), *args], capture_output=True, text=True, timeout=timeout)


def one_line(stderr):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_generate_sends_flags_and_writes_every_image(cli, fake, tmp_path):
    pb2 = stubs()[0]
    r = run(cli, "--target", fake.target, "generate", "--prompt", "a cat", "--negative-prompt", "blurry",
            "--width", "128", "--height", "96", "--steps", "3", "--guidance", "5.5", "--seed", "18446744073709551615",
            "--num-images", "2", "--scheduler", "euler_a", "--ratio", "0.5", "--tome-max-downsample", "2",
            "--tome-sx", "4", "--tome-sy", "1", "--tome-no-rand", "--tome-merge-crossattn", "--tome-merge-mlp",
            "--tome-seed", "7", "--model", "tiny", "--request-id", "req-1", "-o", str(tmp_path / "out.png"))
    assert r.returncode == 0, r.stderr
    req = fake.requests[-1]
    assert (req.prompt, req.negative_prompt, req.width, req.height, req.num_inference_steps) == \
        ("a cat", "blurry", 128, 96, 3)
    assert req.guidance_scale == pytest.approx(5.5) and req.seed == 2**64 - 1 and req.num_images == 2
    assert req.scheduler == pb2.SCHEDULER_EULER_ANCESTRAL and req.model == "tiny" and req.request_id == "req-1"
    assert req.output_format == pb2.OUTPUT_FORMAT_PNG
    t = req.tome
    assert t.ratio == pytest.approx(0.5) and (t.max_downsample, t.sx, t.sy, t.seed) == (2, 4, 1, 7)
    assert t.HasField("use_rand") and not t.use_rand and t.merge_crossattn and t.merge_mlp
    assert not t.HasField("merge_attn")
    assert (tmp_path / "out-0.png").read_bytes() == b"\x89PNG fake 0"
    assert (tmp_path / "out-1.png").read_bytes() == b"\x89PNG fake 1"
    assert "wrote " + str(tmp_path / "out-0.png") in r.stdout
    assert "batch size 2" in r.stdout and "denoising 0.003" in r.stdout and "merged tokens: 64 -> 32" in r.stdout
    assert r.stderr == ""  # not a terminal: no progress line


def test_unset_flags_stay_unset(cli, fake, tmp_path):
    r = run(cli, "--target", fake.target, "generate", "--prompt", "x", "--raw", "-o", str(tmp_path / "x.rgb"))
    assert r.returncode == 0, r.stderr
    req = fake.requests[-1]
    assert not req.HasField("seed") and not req.HasField("guidance_scale") and not req.tome.HasField("ratio")
    assert (req.width, req.height, req.num_inference_steps, req.num_images, req.scheduler) == (0, 0, 0, 0, 0)
    assert req.output_format == stubs()[0].OUTPUT_FORMAT_RAW_RGB8
    assert (tmp_path / "x.rgb").exists()  # one image: the name as given
    # --seed -1 (A1111's "random") leaves the seed unset: the server draws one.
    r = run(cli, "--target", fake.target, "generate", "--prompt", "x", "--seed", "-1", "-o", str(tmp_path / "y.png"))
    assert r.returncode == 0, r.stderr
    assert not fake.requests[-1].HasField("seed")


def test_connection_flags_after_the_command(cli, fake):
    r = run(cli, "list-models", "--target", fake.target, "--timeout", "5")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\t")[:3] == ["tiny", "64x64", "scheduler pndm"]
    assert "default ratio 0.5\tlimits: side <= 1024, pixels <= 1048576, steps <= 150, images <= 4, prompt <= 77 " \
           "tokens" in r.stdout


def test_health(cli, fake):
    r = run(cli, "--target", fake.target, "health")
    assert (r.returncode, r.stdout.strip()) == (0, "SERVING")
    fake.serving = False
    r = run(cli, "--target", fake.target, "health")
    assert (r.returncode, r.stdout.strip()) == (5, "NOT_SERVING")


@pytest.mark.parametrize("code", list(EXIT_CODES), ids=lambda c: c.name)
def test_status_class_exit_codes(cli, fake, tmp_path, code):
    fake.fail = code
    r = run(cli, "--target", fake.target, "generate", "--prompt", "x", "-o", str(tmp_path / "x.png"))
    assert r.returncode == EXIT_CODES[code], r.stderr
    assert one_line(r.stderr) == f"tomeserve-cli: {code.name}: fake failure {code.name} second line"
    assert not (tmp_path / "x.png").exists()


def test_list_models_error(cli, fake):
    fake.fail = grpc.StatusCode.UNAVAILABLE
    r = run(cli, "--target", fake.target, "list-models")
    assert r.returncode == 5 and one_line(r.stderr).startswith("tomeserve-cli: UNAVAILABLE: ")


@pytest.mark.parametrize("command", [["list-models"], ["health"], ["generate", "--prompt", "x", "-o", "x.png"]])
def test_unreachable_target_fails_fast(cli, tmp_path, command):
    r = run(cli, "--target", f"127.0.0.1:{closed_port()}", *command, timeout=30)
    assert r.returncode == 5, r
    line = one_line(r.stderr)
    assert line.startswith("tomeserve-cli: UNAVAILABLE: ") and "127.0.0.1" in line


def test_deadline(cli, tmp_path):
    import socket

    # A listener that accepts TCP but never speaks HTTP/2: the call can only end by its deadline.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = run(cli, "--target", f"127.0.0.1:{s.getsockname()[1]}", "--timeout", "0.5", "list-models", timeout=30)
    assert r.returncode == 6, r
    assert one_line(r.stderr).startswith("tomeserve-cli: DEADLINE_EXCEEDED: ")


@pytest.mark.parametrize(
    "args, needle",
    [
        ([], "missing command"),
        (["--target", "h:1", "frobnicate"], 'unknown command "frobnicate"'),
        (["list-models"], "--target HOST:PORT is required"),
        (["--target", "h:1", "generate", "-o", "x.png"], "--prompt is required"),
        (["--target", "h:1", "generate", "--prompt", "x"], "-o OUT.png is required"),
        (["--target", "h:1", "generate", "--prompt", "x", "--steps", "many", "-o", "x.png"],
         '--steps must be an integer in [0, 1048576], got "many"'),
        (["--target", "h:1", "generate", "--prompt", "x", "--ratio", "1.5", "-o", "x.png"],
         "--ratio must be a number in [0, 1]"),
        (["--target", "h:1", "generate", "--prompt", "x", "--seed", "-2", "-o", "x.png"], "--seed must be an integer"),
        (["--target", "h:1", "generate", "--prompt", "x", "--scheduler", "lms", "-o", "x.png"],
         "--scheduler must be one of pndm, ddim, euler, euler_a, dpmpp_2m, dpmpp_2m_karras"),
        (["--target", "h:1", "generate", "--prompt", "x", "-o", "/nonexistent/dir/x.png"], "does not exist"),
        (["--target", "h:1", "generate", "--prompt", "x", "--bogus", "-o", "x.png"], "unknown flag --bogus"),
        (["--target", "h:1", "--timeout", "0", "list-models"], "--timeout must be a number"),
        (["--target", "h:1", "--tls-cert", "c.pem", "list-models"], "--tls-cert and --tls-key go together"),
        (["--target", "h:1", "list-models", "--raw"], "unknown flag --raw"),
        (["--target", "127.0.0.1", "health"], "--target 127.0.0.1: needs a port, HOST:PORT"),
        (["--target", "http://127.0.0.1:5", "health"], "without http:// or https://"),
    ],
)
def test_usage_errors_exit_2_with_one_line(cli, args, needle):
    r = run(cli, *args)
    assert r.returncode == 2, r
    assert r.stdout == ""
    line = one_line(r.stderr)
    assert line.startswith("tomeserve-cli: ") and needle in line, line


def test_unreadable_tls_file_is_a_local_error(cli, tmp_path):
    r = run(cli, "--target", "127.0.0.1:1", "--tls-ca", str(tmp_path / "missing.pem"), "list-models")
    assert r.returncode == 1 and "missing.pem" in one_line(r.stderr)


@pytest.mark.parametrize("args", [["--help"], ["-h"], ["generate", "--help"]])
def test_help_lists_every_exit_code(cli, args):
    r = run(cli, *args)
    assert r.returncode == 0 and r.stderr == ""
    for code in range(11):
        assert f"\n{code:>4}  " in r.stdout
    for flag in ["--tome-merge-crossattn", "--scheduler", "list-models", "health", "--tls-ca", "--timeout"]:
        assert flag in r.stdout


def test_progress_line_on_a_terminal(cli, fake, tmp_path):
    import os
    import pty

    leader, follower = pty.openpty()
    try:
        r = subprocess.run([str(cli), "--target", fake.target, "generate", "--prompt", "x", "--steps", "4",
                            "-o", str(tmp_path / "x.png")], stdout=subprocess.PIPE, stderr=follower, timeout=60)
        os.close(follower)
        follower = None
        drawn = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the terminal's other side is closed and drained
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        if follower is not None:
            os.close(follower)
        os.close(leader)
    assert r.returncode == 0
    text = drawn.decode()
    assert "queued: position 1" in text and "step 4/4" in text and "[" + "#" * 30 + "]" in text
    assert text.endswith("\r\x1b[K")  # the line is erased before the summary
    assert "wrote" in r.stdout.decode() and "step" not in r.stdout.decode()
