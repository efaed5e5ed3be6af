#!/usr/bin/env bash
# The GPU session's one command: CUDA tests and the benchmark on a lent GPU machine (torch 2.11 + CUDA, no
# network, none of our apt packages). Binaries come prebuilt from this project's build (same torch 2.11.0 wheel,
# so the same libtorch ABI): scripts/gpu-prepare.sh copies them and the non-torch shared libraries they need into
# .devbuild/, and the diffusers/tomesd wheels into .whl/. Run from the repository root; results go to $OUT.
#   GPU_BENCH_SIZES=512,768  GPU_BENCH_STEPS=20  GPU_BENCH_REPS=5
set -uo pipefail
out="${OUT:-/tmp/gpu-out}"
mkdir -p "$out"
root="$(pwd)"
log() { echo "[gpu-bench $(date +%H:%M:%S)] $*"; }

python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
torch_lib="$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
run_bin() { LD_LIBRARY_PATH="$torch_lib:$root/.devbuild/lib:/usr/local/cuda/lib64" "$@"; }

td=/tmp/testdata
log "test models"
python3 tests/data/ensure_testdata.py model --preset tiny --out $td/tiny >/dev/null || exit 1
python3 tests/data/ensure_testdata.py model --preset sd15 --out $td/sd15 >/dev/null || exit 1
mkdir -p $td/refs
for p in tiny sd15; do
  python3 tests/data/ensure_testdata.py text-encoder-ref --model $td/$p --out $td/refs/text_encoder_$p.safetensors >/dev/null
  [ -f scripts/reference_unet.py ] && python3 scripts/reference_unet.py --model $td/$p --out $td/refs/unet_$p.safetensors >/dev/null
  [ -f scripts/reference_vae.py ] && python3 scripts/reference_vae.py --model $td/$p --out $td/refs/vae_$p.safetensors >/dev/null
done

log "CUDA tests"
export TOMESERVE_TINY_MODEL=$td/tiny TOMESERVE_SD15_MODEL=$td/sd15 TOMESERVE_REF_DIR=$td/refs
status=0
for t in .devbuild/bin/*_test; do
  run_bin "$t" --gtest_filter='*CUDA*' 2>&1 | tee "$out/$(basename "$t").log" | grep -E "^\[  (PASSED|FAILED|SKIPPED) |OK \]|FAILED \]" || true
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done

log "benchmark"
for dtype in fp16; do
  LD_LIBRARY_PATH="$torch_lib:$root/.devbuild/lib:/usr/local/cuda/lib64" python3 scripts/bench.py --model $td/sd15 \
    --label "sd15, $(head -1 "$out/gpu.txt" | cut -d, -f1)" --device cuda --dtype $dtype \
    --sizes "${GPU_BENCH_SIZES:-512,768}" --modes unet,generate --steps "${GPU_BENCH_STEPS:-20}" \
    --reps "${GPU_BENCH_REPS:-5}" --warmup 2 --bin .devbuild/bin --section "gpu-sd15-$dtype" \
    --doc "$out/benchmarks.md" 2>&1 | grep -v Warn | tee -a "$out/bench.log"
  # Token Merging: UNet forward and the merge machinery at tomesd's ratios (the speed-up grows with resolution).
  LD_LIBRARY_PATH="$torch_lib:$root/.devbuild/lib:/usr/local/cuda/lib64" python3 scripts/bench.py --model $td/sd15 \
    --label "sd15 ToMe, $(head -1 "$out/gpu.txt" | cut -d, -f1)" --device cuda --dtype $dtype \
    --sizes "${GPU_TOME_SIZES:-512,1024}" --modes merge,unet --tome-ratios 0,0.3,0.5,0.6 \
    --reps "${GPU_BENCH_REPS:-5}" --warmup 2 --bin .devbuild/bin --section "gpu-sd15-tome-$dtype" \
    --doc "$out/benchmarks.md" 2>&1 | grep -v Warn | tee -a "$out/bench.log"
done
exit $status
