#!/usr/bin/env bash
# Usage: BIN=DIR scripts/gpu-serve.sh NAME MODEL_DIR SIZE STEPS OUT_DIR   (BIN: folder of tomeserve/tomeserve-cli launchers)
# A served request on the GPU machine (part of scripts/gpu-bench.sh): starts tomeserve on 127.0.0.1 with one
# model on cuda:0, checks health, makes CLI calls at two ToMe ratios and a burst of concurrent calls at mixed
# ratios (step-level batching), scrapes /metrics, then SIGTERM and expects exit 0. Bounded: every wait has a limit.
for arg in "$@"; do case "$arg" in -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac; done
[ $# -eq 5 ] || { sed -n '2s/^# //p' "$0" >&2; exit 2; }
set -uo pipefail
name="$1" model="$2" size="$3" steps="$4" out="$5"
bin="${BIN:?BIN must name the launcher folder}"
dtype="${GPU_SERVE_DTYPE:-fp16}"
devices="${GPU_DEVICE:-cuda}"; [ "$devices" = cuda ] && devices=cuda:0
log() { echo "[gpu-serve $name $(date +%H:%M:%S)] $*"; }
tmp="$(mktemp -d)"
metrics_port=$((19000 + RANDOM % 1000))

"$bin/tomeserve" --model "$name=$model" --listen 127.0.0.1:0 --port-file "$tmp/port" --devices "$devices" \
  --dtype "$dtype" --metrics-listen "127.0.0.1:$metrics_port" >"$out/server-$name.log" 2>&1 &
pid=$!
stop() {
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
  kill -KILL "$pid" 2>/dev/null
}
started=$SECONDS
until [ -s "$tmp/port" ] && "$bin/tomeserve-cli" --target "127.0.0.1:$(cat "$tmp/port")" --timeout 2 health \
  >/dev/null 2>&1; do
  if ! kill -0 "$pid" 2>/dev/null; then log "server exited during startup"; tail -20 "$out/server-$name.log"; exit 1; fi
  if ((SECONDS - started > 180)); then log "not healthy after 180 s"; tail -20 "$out/server-$name.log"; stop; exit 1; fi
  sleep 0.5
done
target="127.0.0.1:$(cat "$tmp/port")"
log "healthy on $target after $((SECONDS - started)) s (load + warm-up)"
cli=("$bin/tomeserve-cli" --target "$target" --timeout 300)
"${cli[@]}" list-models
status=0
for ratio in 0 0.5; do
  for n in 1 4; do
    log "generate ${size}x${size}, $steps steps, ratio $ratio, $n image(s)"
    "${cli[@]}" generate --prompt "a photo of an astronaut riding a horse on mars" --seed 7 --width "$size" \
      --height "$size" --steps "$steps" --ratio "$ratio" --num-images "$n" --quiet -o "$tmp/r$ratio-n$n.png" ||
      status=1
  done
done
# A burst of 8 concurrent single-image calls at mixed ratios joins one running batch step by step.
log "burst: 8 concurrent calls, ratios 0/0.3/0.5/0.6"
t0=$(date +%s%N)
pids=()
for i in 0 1 2 3 4 5 6 7; do
  r=$(echo "0 0.3 0.5 0.6" | cut -d' ' -f$((i % 4 + 1)))
  "${cli[@]}" generate --prompt "burst $i" --seed "$i" --width "$size" --height "$size" --steps "$steps" \
    --ratio "$r" --quiet -o "$tmp/burst-$i.png" >"$tmp/burst-$i.txt" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || status=1; done
log "burst wall time: $((($(date +%s%N) - t0) / 1000000)) ms"
grep -h "total\|batch" "$tmp"/burst-*.txt | head -16
python3 - "$metrics_port" <<'EOF' || status=1
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=10).read().decode()
keep = ("tomeserve_requests_total", "tomeserve_oom_total", "tomeserve_unet_rows_sum", "tomeserve_worker_healthy",
        "tomeserve_unet_step_seconds_sum", "tomeserve_unet_step_seconds_count", "tomeserve_batch_size_sum",
        "tomeserve_batch_size_count", "tomeserve_device_memory_bytes", "tomeserve_phase_seconds_sum",
        "tomeserve_build_info", "tomeserve_worker_seconds_total", "tomeserve_unet_calls_total",
        "tomeserve_unet_graph_rows_total", "tomeserve_unet_graph_layouts")
total = {}
for line in text.splitlines():
    if line.startswith(keep):
        print(line)
    name = line.split("{")[0].split(" ")[0]
    if name in ("tomeserve_unet_step_seconds_sum", "tomeserve_unet_step_seconds_count"):
        total[name] = total.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
# Served step (host-inclusive, single-ratio steps) next to the benchmark's UNet call: issue 21's <= 1.1x goal.
if total.get("tomeserve_unet_step_seconds_count"):
    mean = total["tomeserve_unet_step_seconds_sum"] / total["tomeserve_unet_step_seconds_count"]
    print(f"served step mean: {mean * 1000:.1f} ms over {int(total['tomeserve_unet_step_seconds_count'])} steps")
EOF
ls -l "$tmp"/*.png | awk '{print $5, $9}' | head -20
kill -TERM "$pid"
for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
if kill -0 "$pid" 2>/dev/null; then log "still running 30 s after SIGTERM"; kill -KILL "$pid"; status=1; fi
wait "$pid"; rc=$?
log "server exit status after SIGTERM: $rc"
[ "$rc" -eq 0 ] || status=1
tail -5 "$out/server-$name.log"
rm -rf "$tmp"
exit $status
