#!/usr/bin/env bash
# Usage: scripts/image-test.sh                  (no arguments; root; environment below)
# Builds the container image from the Dockerfile for real and runs it: debian:12 made from the Debian mirror
# (scripts/image-base.sh; no registry is reachable), `podman build --pull=never --isolation=chroot`, then the
# server started inside the image with `buildah run --isolation=chroot` (the host's network, so 127.0.0.1) on the
# tiny test model mounted read-only: health checked with grpcurl (through reflection), one Generate call, a
# /metrics scrape, SIGTERM, exit 0 expected. Bounded in time; removes its container and images at the end
# (IMAGE_TEST_KEEP=1 keeps them for a faster re-run). Needs root (podman/buildah here run rootful).
#   IMAGE_TEST_TIMEOUT=5400   seconds for the whole build     BUILD_JOBS=2   compile jobs inside the build
for arg in "$@"; do case "$arg" in -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac; done
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
image=localhost/tomeserve:image-test
t0=$SECONDS
step() { printf '[image-test %4d s] %s\n' "$((SECONDS - t0))" "$*" >&2; }

TOMESERVE_EXTRA_APT="podman buildah debootstrap" bash scripts/bootstrap.sh
model="$root/build/testdata/tiny"
.venv/bin/python tests/data/ensure_testdata.py model --preset tiny --out "$model" >&2
grpcurl="$root/.venv/bin/grpcurl"

work="$(mktemp -d)"
chmod 0777 "$work"  # the server runs as the image's uid 10001 and writes its port file here
ctr=""
base_was_there=0
podman image exists docker.io/library/debian:12 && base_was_there=1
cleanup() {
  local rc=$?
  set +e
  [ -n "${server_pid:-}" ] && kill -KILL "$server_pid" 2>/dev/null
  [ -n "$ctr" ] && buildah rm "$ctr" >/dev/null 2>&1
  if [ "${IMAGE_TEST_KEEP:-0}" != 1 ]; then
    podman rmi -f "$image" >/dev/null 2>&1
    ((base_was_there)) || podman rmi -f docker.io/library/debian:12 >/dev/null 2>&1
    podman image prune -f >/dev/null 2>&1  # the build's intermediate layers
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT

bash scripts/image-base.sh

step "podman build (log: build/image-cache/build.log)"
# The build's pip step reaches PyPI through this machine's CA bundle, mounted at build time only.
ca=/etc/ssl/certs/ca-certificates.crt
# Docker format: OCI images have no SHELL or HEALTHCHECK, which the Dockerfile uses.
build_args=(--pull=never --isolation=chroot --format docker --build-arg "BUILD_JOBS=${BUILD_JOBS:-2}" -t "$image")
[ -s "$ca" ] && build_args+=(-v "$ca:/run/host-ca.crt:ro" --build-arg PIP_CA_BUNDLE=/run/host-ca.crt)
mkdir -p build/image-cache
if ! timeout "${IMAGE_TEST_TIMEOUT:-5400}" podman build "${build_args[@]}" . >build/image-cache/build.log 2>&1; then
  tail -n 40 build/image-cache/build.log >&2
  step "podman build failed"; exit 1
fi
step "built $image ($(podman image inspect --format '{{.Size}}' "$image" | numfmt --to=iec))"

# The image's configuration is what Kubernetes will run: check it, not just the build.
config="$(podman image inspect --format '{{.Config.User}} {{json .Config.Entrypoint}} {{.Config.StopSignal}}' "$image")"
[ "$config" = '10001:10001 ["/opt/tomeserve/bin/tomeserve"] SIGTERM' ] || { step "unexpected image config: $config"; exit 1; }
podman image inspect --format '{{json .Config.Healthcheck}}' "$image" | grep -q tomeserve-cli \
  || { step "the image has no HEALTHCHECK"; exit 1; }

free_port() { .venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
metrics_port="$(free_port)"
http_port="$(free_port)"
ctr="$(buildah from --pull-never "$image")"
step "starting the server in $ctr (log: $work/server.log)"
# The server runs as the image's uid 10001: give it a world-readable copy of the model (the test data may be
# private to the user who made it).
cp -r "$model" "$work/tiny" && chmod -R a+rX "$work/tiny"
buildah run --isolation=chroot -v "$work/tiny:/models/tiny:ro" -v "$work:/out" "$ctr" -- \
  /opt/tomeserve/bin/tomeserve --model tiny=/models/tiny --devices cpu --listen 127.0.0.1:0 \
  --port-file /out/port --metrics-listen "127.0.0.1:$metrics_port" --http-listen "127.0.0.1:$http_port" \
  --warmup-steps 1 >"$work/server.log" 2>&1 &
runner=$!
# The server process itself (buildah run, its parent, carries the same arguments after "--"): its command line
# starts with the binary and names this run's metrics port.
for _ in $(seq 60); do
  server_pid="$(pgrep -f -- "^/opt/tomeserve/bin/tomeserve .*--metrics-listen 127.0.0.1:$metrics_port" | head -1 || true)"
  [ -n "$server_pid" ] && break
  sleep 1
done
[ -n "$server_pid" ] || { cat "$work/server.log" >&2; step "the server did not start"; exit 1; }
uid="$(awk '/^Uid:/ {print $2}' "/proc/$server_pid/status")"
[ "$uid" = 10001 ] || { step "the server runs as uid $uid, not 10001"; exit 1; }

status=""
for _ in $(seq 180); do
  kill -0 "$runner" 2>/dev/null || { cat "$work/server.log" >&2; step "the server exited during startup"; exit 1; }
  if [ -s "$work/port" ]; then
    target="127.0.0.1:$(cat "$work/port")"
    status="$("$grpcurl" -plaintext -max-time 5 "$target" grpc.health.v1.Health/Check 2>/dev/null || true)"
    grep -q '"SERVING"' <<<"$status" && break
  fi
  sleep 1
done
grep -q '"SERVING"' <<<"$status" || { cat "$work/server.log" >&2; step "health never turned SERVING"; exit 1; }
step "health: SERVING at $target"
# The image's own HEALTHCHECK command, run inside the container next to the server (its fixed 127.0.0.1:50051
# replaced by this run's port).
mapfile -t hc < <(podman image inspect --format '{{json .Config.Healthcheck.Test}}' "$image" | .venv/bin/python -c \
  'import json, sys; t = json.load(sys.stdin); assert t[0] == "CMD", t; print("\n".join(a.replace("127.0.0.1:50051", sys.argv[1]) for a in t[1:]))' "$target")
hc_out="$(buildah run --isolation=chroot "$ctr" -- "${hc[@]}")" || { step "HEALTHCHECK failed: $hc_out"; exit 1; }
step "HEALTHCHECK command: $hc_out"

response="$("$grpcurl" -plaintext -max-time 300 -max-msg-sz $((64 << 20)) \
  -d '{"prompt": "a lighthouse", "num_inference_steps": 2, "seed": "7", "num_images": 1, "tome": {"ratio": 0.5}}' \
  "$target" tomeserve.v1.ImageGenerator/Generate)"
.venv/bin/python - "$response" <<'PY'
import base64, json, sys
out = json.loads(sys.argv[1])
image = base64.b64decode(out["images"][0]["data"])
assert image.startswith(b"\x89PNG\r\n\x1a\n"), "not a PNG"
assert out["images"][0]["seed"] == "7" and abs(out["tome"]["ratio"] - 0.5) < 1e-6, out["tome"]
print(f"[image-test] Generate: one {len(image)}-byte PNG, seed 7, tome ratio 0.5", file=sys.stderr)
PY
.venv/bin/python - "$http_port" <<'PY'
import base64, json, sys, urllib.request
body = json.dumps({"prompt": "a lighthouse", "size": "64x64", "num_inference_steps": 2, "seed": 7,
                   "tome": {"ratio": 0.5}}).encode()
request = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/v1/images/generations", data=body,
                                 headers={"Content-Type": "application/json"})
out = json.load(urllib.request.urlopen(request, timeout=300))
image = base64.b64decode(out["data"][0]["b64_json"])
assert image.startswith(b"\x89PNG\r\n\x1a\n") and out["tomeserve"]["seeds"] == [7], out["tomeserve"]
print(f"[image-test] POST /v1/images/generations: one {len(image)}-byte PNG, seed 7", file=sys.stderr)
PY
.venv/bin/python - "$metrics_port" <<'PY'
import sys, urllib.request
body = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=10).read().decode()
assert "tomeserve_requests_total" in body, "no tomeserve metrics in /metrics"
print("[image-test] /metrics scraped", file=sys.stderr)
PY

step "SIGTERM"
kill -TERM "$server_pid"
rc=0
timeout 60 tail --pid="$server_pid" -f /dev/null || { step "the server did not exit within 60 s of SIGTERM"; exit 1; }
server_pid=""
wait "$runner" || rc=$?
[ "$rc" = 0 ] || { tail -n 20 "$work/server.log" >&2; step "exit status $rc after SIGTERM, expected 0"; exit 1; }
step "passed: exit 0 after SIGTERM"
