#!/usr/bin/env bash
# Usage: bash scripts/gpu-bench.sh              (no arguments; run on the GPU machine, environment below)
# The GPU session's one command (torch 2.11 + CUDA, no network, none of our apt packages), run from the
# repository root after scripts/gpu-prepare.sh has filled .devbuild/ and .whl/ here and the device call carried
# them. Phases, in priority order, each bounded so that the whole run ends inside GPU_BENCH_BUDGET seconds:
#   1. environment: card, driver, torch; diffusers/tomesd from the carried wheels
#   2. test models (tiny, sd15) regenerated from their seeds and checked against .devbuild/models.sha256, so the
#      carried reference outputs apply; scheduler references recomputed on the GPU for the exact CUDA check
#   3. every *_CUDA gtest
#   4. a served request: tomeserve --devices cuda:0 --dtype fp16 on the tiny and sd15 models (scripts/gpu-serve.sh)
#   5. scripts/bench.py side by side with diffusers + tomesd (sd15, fp16 and bf16; CUDA graphs on and off) into
#      $OUT/benchmarks.md
#   6. (phase "sim") tomeserve-sim calibrate on sd15 (512/768/1024², rows 2/8, ratios 0/0.5) into
#      $OUT/gpu-sd15-profile.json, and the gpu-sd15 trace replayed on it next to the built-in h200-sd15-fp16;
#      then a short trace (GPU_REAL_CALLS=24) on the real server (scripts/load_open.py --transport http) next to
#      the simulator's prediction for the same arrivals
#   7. (phase "sdxl") the sdxl preset (full SDXL architecture, random weights, fp16; generated in the background
#      from phase 2 on) at 1024² batch 1 and 4, ToMe 0 and 0.5: max_downsample 2 (tomeserve's default on SDXL) on
#      both sides, then tomesd's own default 1 on both sides (which merges nothing on SDXL); CUDA graphs on and off
# Everything is logged to $OUT/gpu.log; $OUT/benchmarks.md is docs/benchmarks.md with the GPU sections added.
#   GPU_BENCH_BUDGET=420  GPU_BENCH_REPS=10
#   GPU_BENCH_PHASES="tests serve bench sdxl"   (a follow-up run can pick; "bench-short" = headline + UNet batch 1;
#                                           "table" = the seed's grid, scripts/bench_table.py; "sim")
#   GPU_SIM_MODEL=$td/sd15 GPU_SIM_SIZES=512x512,768x768,1024x1024 GPU_SIM_PRESET=gpu-sd15 GPU_REAL_CALLS=24
# Dry run on a CPU machine (plumbing only): PATH=.venv/bin:$PATH GPU_DEVICE=cpu GPU_BENCH_MODEL=build/testdata/tiny
for arg in "$@"; do case "$arg" in -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac; done
set -uo pipefail
out="${OUT:-/tmp/gpu-out}"
mkdir -p "$out"
exec > >(tee -a "$out/gpu.log") 2>&1
root="$(pwd)"
budget="${GPU_BENCH_BUDGET:-420}"
device="${GPU_DEVICE:-cuda}"
reps="${GPU_BENCH_REPS:-10}"
log() { echo "[gpu-bench +$((SECONDS))s] $*"; }
left() { echo $((budget - SECONDS)); }
status=0
phases="${GPU_BENCH_PHASES:-tests serve bench sdxl}"
want() { [[ " $phases " == *" $1 "* ]]; }

log "1. environment"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'cudnn', torch.backends.cudnn.version(), 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" |
  tee -a "$out/gpu.txt"
site="$(python3 -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')"
# Our binaries find torch, the CUDA runtime and the carried libraries through launchers, so that python3 itself
# never loads the carried (Debian) libssl/libz.
launchers=/tmp/tomeserve-bin
mkdir -p "$launchers"
for b in .devbuild/bin/*; do
  printf '#!/bin/sh\nLD_LIBRARY_PATH=%s exec %s "$@"\n' \
    "$site/torch/lib:$site/nvidia/cu13/lib:$root/.devbuild/lib" "$root/$b" >"$launchers/$(basename "$b")"
  chmod +x "$launchers/$(basename "$b")"
done
"$launchers/tomeserve" --help >/dev/null || { log "tomeserve does not start here"; ldd .devbuild/bin/tomeserve; exit 1; }

log "2. test models and references"
td=/tmp/testdata
mkdir -p build/cache "$td/refs" "$td/refs_cuda" && cp .devbuild/cache/* build/cache/
make_model() {  # NAME ARGS...: quiet unless it fails
  local name="$1"; shift
  python3 tests/data/ensure_testdata.py model "$@" --out "$td/$name" >"/tmp/model-$name.log" 2>&1 ||
    { log "model $name failed"; tail -5 "/tmp/model-$name.log"; }
}
pids=()
make_model tiny --preset tiny & pids+=($!)
make_model tiny_legacy --preset tiny --legacy-text-encoder-keys & pids+=($!)
make_model sd15 --preset sd15 & pids+=($!)
make_model tiny_xl --preset tiny-xl & pids+=($!)
wait "${pids[@]}"  # not a bare wait: that would also wait for the tee above
# The full SDXL architecture takes a minute or two to write; it is only needed by the last phase.
sdxl_pid=
if want sdxl; then make_model sdxl --preset sdxl --dtype fp16 & sdxl_pid=$!; fi
cp .devbuild/refs/*.safetensors "$td/refs/"
if (cd $td && sha256sum --quiet -c "$root/.devbuild/models.sha256"); then
  log "models equal the ones the carried references were computed from"
else
  log "models differ from the build machine's: recomputing text-encoder references here"
  for p in tiny sd15; do
    python3 tests/data/ensure_testdata.py text-encoder-ref --model $td/$p --out $td/refs/text_encoder_$p.safetensors
  done
fi
cp "$td"/refs/*.safetensors "$td/refs_cuda/"
python3 scripts/reference_schedulers.py --model $td/tiny --out $td/refs_cuda/schedulers.safetensors --device "$device" \
  >/dev/null || status=1
log "models ready ($(du -sh $td/sd15 | cut -f1) sd15)"

if want tests; then
log "3. CUDA tests"
export TOMESERVE_TINY_MODEL=$td/tiny TOMESERVE_TINY_LEGACY_MODEL=$td/tiny_legacy TOMESERVE_SD15_MODEL=$td/sd15 \
  TOMESERVE_TINY_XL_MODEL=$td/tiny_xl \
  TOMESERVE_REF_DIR=$td/refs TOMESERVE_TEST_TOKENIZER_DIR=$td/tiny/tokenizer
run_test() {  # NAME [ENV=VALUE ...]
  local t="$1"; shift
  env "$@" timeout 150 "$launchers/$t" --gtest_filter='*CUDA*' --gtest_brief=0 >"$out/test.log.tmp" 2>&1
  local rc=$?
  grep -E "^\[ +(OK|FAILED|SKIPPED) +\]|Failure|error|Expected|Which is|rel" "$out/test.log.tmp" | head -40
  cat "$out/test.log.tmp" >>"$out/tests.log"
  log "$t $*: exit $rc"
  [ "$rc" -eq 0 ] || status=1
}
for t in pipeline_load_test scheduler_test unet_test vae_test tome_test; do run_test $t; done
run_test scheduler_test TOMESERVE_REF_DIR=$td/refs_cuda
run_test step_batch_test
run_test unet_graphs_test
run_test step_timer_test
rm -f "$out/test.log.tmp"
fi

if want serve; then
log "4. served requests"
export BIN="$launchers"
timeout 150 bash scripts/gpu-serve.sh tiny $td/tiny 256 20 "$out" || { status=1; log "tiny serve failed"; }
serve_limit=$(($(left) - 150))
((serve_limit > 200)) && serve_limit=200
if ((serve_limit > 60)); then
  timeout "$serve_limit" bash scripts/gpu-serve.sh sd15 $td/sd15 512 25 "$out" || { status=1; log "sd15 serve failed"; }
else
  log "sd15 serve skipped (budget)"
fi
fi

log "5. benchmark ($(left) s left)"
cp docs/benchmarks.md "$out/benchmarks.md"
card="$(head -1 "$out/gpu.txt" | cut -d, -f1)"
bench() {  # SECONDS ARGS...: one bench.py run, cut off after SECONDS
  local limit="$1"; shift
  if (($(left) < 30)); then log "skipped (budget): $*"; return; fi
  ((limit > $(left) - 10)) && limit=$(($(left) - 10))
  timeout "$limit" python3 scripts/bench.py --model "${GPU_BENCH_MODEL:-$td/sd15}" --device "$device" \
    --dtype fp16 --bin "$launchers" --doc "$out/benchmarks.md" "$@" 2>&1 | grep -v -i warn
  local rc="${PIPESTATUS[0]}"
  [ "$rc" -eq 0 ] || log "bench.py $* ended with status $rc"
}
if want bench || want bench-short; then
# The headline: SD 1.5 512², 50 steps, batch 1, end to end (text encoding, denoising, VAE decode); eager and
# with CUDA graphs (the server's default on a GPU).
bench 70 --label "sd15 end to end, $card" --sizes 512 --modes generate --steps 50 --reps 3 --warmup 1 \
  --cpp-variants plain,cuda-graphs --section gpu-sd15-e2e-fp16
# The seed's table: UNet at 512/768/1024, batch 1, 4 and 8, vanilla vs ToMe 0.5, eager and with CUDA graphs
# (issue 21's goals: ToMe 0.5 >= 1.25x at 512² batch 4 and >= 1.5x at 1024² batch 4 with graphs); cuDNN
# benchmark as a variant at batch 1.
for b in 1 $(want bench && echo 4 8); do
  variants=plain,cuda-graphs; [ "$b" = 1 ] && variants=plain,cuda-graphs,cudnn-benchmark
  bench 70 --label "sd15 UNet batch $b, $card" --sizes 512,768,1024 --modes unet --tome-ratios 0,0.5 --batch $b \
    --reps "$reps" --warmup 3 --cpp-variants "$variants" --section gpu-sd15-unet-b$b-fp16
done
# bf16 against fp16 (the table above): same UNet cells at 512² and 1024², batch 1.
bench 50 --label "sd15 UNet batch 1 bf16, $card" --sizes 512,1024 --modes unet --tome-ratios 0,0.5 --batch 1 \
  --dtype bf16 --reps "$reps" --warmup 3 --cpp-variants plain,cuda-graphs --section gpu-sd15-unet-b1-bf16
fi
if want bench; then
# The merge machinery alone, and ToMe end to end at 1024².
bench 40 --label "sd15 ToMe merge, $card" --sizes 512,1024 --modes merge --tome-ratios 0,0.3,0.5,0.6 \
  --reps "$reps" --warmup 3 --section gpu-sd15-merge-fp16
bench 60 --label "sd15 ToMe end to end 1024, $card" --sizes 1024 --modes generate --tome-ratios 0,0.5 --steps 25 \
  --reps 2 --warmup 1 --section gpu-sd15-e2e1024-fp16
fi
if want table; then
# The seed's table (scripts/bench_table.py): generate at 25 steps over sizes x batches x ratios, both sides, with
# peak memory and OOM cells; CSV and plot under $OUT.
  if (($(left) > 60)); then
    timeout $(($(left) - 20)) python3 scripts/bench_table.py --model $td/sd15 --label "sd15, $card" \
      --sizes "${GPU_TABLE_SIZES:-512,768,1024}" --batches "${GPU_TABLE_BATCHES:-1,4,8}" --ratios 0,0.5 \
      --steps 25 --device "$device" --dtype fp16 --reps 2 --warmup 1 --bin "$launchers" --csv "$out/table.csv" \
      --plot "$out/table.png" --doc "$out/benchmarks.md" --section gpu-sd15-table-fp16 2>&1 | grep -v -i warn
  else
    log "table skipped (budget)"
  fi
fi
if want sim; then
  log "6. simulator profile ($(left) s left)"
  sim_model="${GPU_SIM_MODEL:-$td/sd15}"
  serve_device="$device"; [ "$serve_device" = cuda ] && serve_device=cuda:0
  if (($(left) > 60)); then
    timeout $(($(left) - 30)) "$launchers/tomeserve-sim" calibrate --model "$sim_model" --devices "$device" \
      --sizes "${GPU_SIM_SIZES:-512x512,768x768,1024x1024}" --rows 2,8 --ratios 0,0.5 --repeats 3 \
      --out "$out/gpu-sd15-profile.json" \
      || { status=1; log "calibrate failed"; }
    python3 scripts/make_trace.py --preset "${GPU_SIM_PRESET:-gpu-sd15}" --calls 200 -o "$out/gpu-trace.jsonl"
    for p in h200-sd15-fp16 "$out/gpu-sd15-profile.json"; do
      [ -f "$p" ] || [ "$p" = h200-sd15-fp16 ] || continue
      for m in request step; do
        # The calibrated profile carries the CPU budget; 430000 is the worker's derivation on an H200 (cost_profile.cpp).
        echo "sim $p $m: $("$launchers/tomeserve-sim" --trace "$out/gpu-trace.jsonl" --profile "$p" --load 0.8 \
          --batching "$m" --max-batch-cost 430000)"
      done
    done
  else
    log "simulator profile skipped (budget)"
  fi
  # The check that the projections are true: a short trace replayed on the real GPU server (over the HTTP front
  # door: this image has no grpcio), then the simulator on the calibrated profile with the real run's arrivals.
  if (($(left) > 150)) && [ -f "$out/gpu-sd15-profile.json" ]; then
    log "6b. trace on the real server ($(left) s left)"
    python3 scripts/make_trace.py --preset "${GPU_SIM_PRESET:-gpu-sd15}" --calls "${GPU_REAL_CALLS:-24}" \
      -o "$out/gpu-real-trace.jsonl"
    timeout $(($(left) - 30)) python3 scripts/load_open.py --trace "$out/gpu-real-trace.jsonl" --load 0.8 \
      --transport http --modes step --model "$sim_model" --devices "$serve_device" --bin "$launchers" \
      --server-flags "--dtype ${GPU_SERVE_DTYPE:-fp16}" --json "$out/gpu-real.json" | tee "$out/gpu-real.txt" ||
      { status=1; log "real trace replay failed"; }
    if [ -f "$out/gpu-real.json" ]; then
      scale=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['arrival_scale_s'])" "$out/gpu-real.json")
      echo "sim on the calibrated profile, the real run's arrivals: $("$launchers/tomeserve-sim" \
        --trace "$out/gpu-real-trace.jsonl" --profile "$out/gpu-sd15-profile.json" --arrival-scale "$scale" \
        --max-batch-cost 430000)"
    fi
  fi
fi
if want sdxl; then
  log "7. SDXL ($(left) s left)"
  [ -n "$sdxl_pid" ] && wait "$sdxl_pid"
  if [ -f "$td/sdxl/model_index.json" ] && (($(left) > 90)); then
    for b in 1 4; do
      GPU_BENCH_MODEL=$td/sdxl bench 90 --label "sdxl UNet batch $b, $card" --sizes 1024 --modes unet \
        --tome-ratios 0,0.5 --batch $b --reps "$reps" --warmup 3 --cpp-variants plain,cuda-graphs \
        --section gpu-sdxl-unet-b$b-fp16
    done
    GPU_BENCH_MODEL=$td/sdxl bench 60 --label "sdxl UNet batch 4, tomesd's default max_downsample 1, $card" \
      --sizes 1024 --modes unet --tome-ratios 0,0.5 --batch 4 --reps "$reps" --warmup 3 --tome-max-downsample 1 \
      --section gpu-sdxl-unet-b4-md1-fp16
  else
    log "sdxl skipped (model missing or budget)"
  fi
fi
log "done, status $status"
exit $status
