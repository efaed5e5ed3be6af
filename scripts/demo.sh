#!/usr/bin/env bash
# Usage: [MODEL_DIR=DIR] scripts/demo.sh        (no arguments; the environment variables below adjust it)
# The README's demo command: on a fresh Debian 12 machine, install (scripts/bootstrap.sh, idempotent), build the
# server and the CLI, start the server on 127.0.0.1, generate the same prompt and seed at ToMe ratios 0 and 0.5
# through tomeserve-cli, write the images under demo-out/, and stop the server (also on failure or Ctrl-C).
#   MODEL_DIR=/models/sd15   a real SD 1.x diffusers folder (default: the random-weight tiny test model, created
#                            once under $BUILD_DIR/testdata/tiny; its images are noise, the path is the point)
#   BUILD_DIR=build  DEMO_OUT=demo-out  DEMO_STEPS=N  DEMO_PROMPT=TEXT  DEMO_DEVICES=auto|cpu|cuda:0
#   DEMO_KEEP_SERVING=1      keep the server up after the images (Ctrl-C stops it), for the playground page whose
#                            URL the demo prints (the HTTP front door on 127.0.0.1, a free port)
for arg in "$@"; do case "$arg" in -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac; done
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
build="${BUILD_DIR:-build}"
out="${DEMO_OUT:-demo-out}"
prompt="${DEMO_PROMPT:-a photo of an astronaut riding a horse on mars}"
step() { printf '[demo] %s\n' "$*" >&2; }

if [ -n "${MODEL_DIR:-}" ] && [ ! -f "$MODEL_DIR/model_index.json" ]; then
  step "MODEL_DIR=$MODEL_DIR is not a diffusers model folder (no model_index.json)"; exit 1
fi

bash scripts/bootstrap.sh
step "configure + build tomeserve, tomeserve-cli ($build)"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j "${BUILD_JOBS:-2}" --target tomeserve tomeserve-cli

if [ -n "${MODEL_DIR:-}" ]; then
  model="$MODEL_DIR"
  steps="${DEMO_STEPS:-25}"
else
  model="$build/testdata/tiny"
  step "tiny random-weight model: $model (set MODEL_DIR to use a real SD 1.5 folder)"
  .venv/bin/python tests/data/ensure_testdata.py model --preset tiny --out "$model" >&2
  steps="${DEMO_STEPS:-20}"
fi

tmp="$(mktemp -d)"
server_pid=""
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

step "starting the server (log: $out/server.log)"
mkdir -p "$out"
"$build/bin/tomeserve" --model "demo=$model" --listen 127.0.0.1:0 --port-file "$tmp/port" \
  --http-listen 127.0.0.1:0 --http-port-file "$tmp/http.port" \
  --devices "${DEMO_DEVICES:-auto}" >"$out/server.log" 2>&1 &
server_pid=$!

# The port file appears once the server listens; health turns SERVING after the models are loaded and warmed up.
cli=("$build/bin/tomeserve-cli")
for ((i = 0; ; i++)); do
  if ! kill -0 "$server_pid" 2>/dev/null; then
    step "the server exited during startup:"; tail -n 20 "$out/server.log" >&2; exit 1
  fi
  if [ -s "$tmp/port" ] && "${cli[@]}" --target "127.0.0.1:$(cat "$tmp/port")" --timeout 2 health >/dev/null 2>&1; then
    break
  fi
  if ((i >= ${DEMO_START_TIMEOUT:-600} * 2)); then step "the server did not become healthy"; exit 1; fi
  sleep 0.5
done
target="127.0.0.1:$(cat "$tmp/port")"
step "server healthy on $target"
playground="http://127.0.0.1:$(cat "$tmp/http.port")/"
step "playground (ratios side by side in a browser): $playground"
"${cli[@]}" --target "$target" list-models

for ratio in 0 0.5; do
  step "generate at ToMe ratio $ratio"
  "${cli[@]}" --target "$target" generate --prompt "$prompt" --seed 42 --steps "$steps" --ratio "$ratio" \
    --num-images 2 -o "$out/ratio-$ratio.png"
done

if [ "${DEMO_KEEP_SERVING:-0}" = 1 ]; then
  step "serving until Ctrl-C: playground $playground, gRPC $target"
  wait "$server_pid" || true
  server_pid=""
  exit 0
fi
kill -TERM "$server_pid"
wait "$server_pid" || { step "the server exited with status $?"; exit 1; }
server_pid=""
step "images: $(cd "$out" && pwd)/ (ratio-0-*.png without Token Merging, ratio-0.5-*.png with 50% merged)"
step "DEMO_KEEP_SERVING=1 scripts/demo.sh keeps the server up for the playground page"
ls -l "$out"/*.png
