#!/usr/bin/env bash
# Usage: scripts/gpu-prepare.sh                 (no arguments; after a build)
# Prepares what scripts/gpu-bench.sh needs on a GPU machine that has torch 2.11 + CUDA but none of our apt
# packages (no gRPC, no abseil) and no network. Everything lands in two git-ignored folders that the device call
# carries (64 MiB limit on all that travels, working tree included; this script checks the size):
#   .devbuild/bin    stripped test binaries with *_CUDA tests, tomeserve-bench/-gen, tomeserve, tomeserve-cli
#   .devbuild/lib    the shared libraries they load that are neither glibc/libstdc++ (the GPU image has newer
#                    ones) nor torch/CUDA (they come from the GPU image's torch wheel), stripped
#   .devbuild/refs   the reference outputs of the C++ parity tests, computed here by diffusers/transformers
#   .devbuild/models.sha256  checksums of the test models' weights: the GPU machine regenerates the models
#                    (deterministic per seed) and checks them against these before trusting the carried refs
#   .devbuild/cache  the CLIP BPE file the model generator builds the tokenizer from
#   .whl             diffusers and tomesd wheels (the GPU image has torch and transformers, not these)
#   BUILD_DIR=build  GPU_CARRY_LIMIT_MIB=62
for arg in "$@"; do case "$arg" in -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac; done
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
build="${BUILD_DIR:-build}"
limit_mib="${GPU_CARRY_LIMIT_MIB:-62}"  # the device call carries 64 MiB in all; 2 kept in reserve
rm -rf .devbuild .whl && mkdir -p .devbuild/bin .devbuild/lib .devbuild/refs .devbuild/cache .whl

bins=(pipeline_load_test scheduler_test unet_test vae_test tome_test step_batch_test unet_graphs_test step_timer_test
      tomeserve-bench tomeserve-gen tomeserve tomeserve-cli tomeserve-sim)
for b in "${bins[@]}"; do
  [ -x "$build/bin/$b" ] || { echo "gpu-prepare: $build/bin/$b is missing (build first)" >&2; exit 1; }
  strip --strip-unneeded -o ".devbuild/bin/$b" "$build/bin/$b"
done

# ldd lists the transitive closure, so copying every resolved library outside the exclusions is enough.
ldd .devbuild/bin/* 2>/dev/null | awk '/=> \// {print $3}' | sort -u |
  grep -vE '/(libc|libm|libdl|librt|libpthread|libutil|libstdc\+\+|libgcc_s|ld-linux[^/]*)\.so' |
  grep -vE 'torch|/cuda|nvidia|libcu|libnv|libgomp' |
  while read -r lib; do strip --strip-unneeded -o ".devbuild/lib/$(basename "$lib")" "$lib"; done
if ldd .devbuild/bin/* | grep -q "not found"; then
  echo "gpu-prepare: unresolved libraries:" >&2; ldd .devbuild/bin/* | grep "not found" | sort -u >&2; exit 1
fi

td="$build/testdata"
# Only what the _CUDA cases read: pipeline_test has none, and tome_test's compares CUDA with the CPU, so their
# references (pipeline_*, tome_*) stay here.
for f in "$td"/refs/*.safetensors; do
  case "$(basename "$f")" in pipeline_* | tome_*) ;; *) cp "$f" .devbuild/refs/ ;; esac
done
(cd "$td" && sha256sum tiny/*/*.safetensors tiny_xl/*/*.safetensors sd15/text_encoder/*.safetensors \
  sd15/vae/*.safetensors) \
  > .devbuild/models.sha256
cp "$build/cache/bpe_simple_vocab_16e6.txt.gz" .devbuild/cache/

.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl diffusers==0.42.1 tomesd==0.1.3

tracked_kib=$(git ls-files -z | xargs -0 du -ck 2>/dev/null | tail -1 | cut -f1)
carried_kib=$(du -sk .devbuild .whl | awk '{s += $1} END {print s}')
total_mib=$(((tracked_kib + carried_kib) / 1024))
du -sh .devbuild/bin .devbuild/lib .devbuild/refs .whl
echo "gpu-prepare: ${total_mib} MiB travels (working tree + .devbuild + .whl; limit ${limit_mib} MiB)"
if ((total_mib > limit_mib)); then echo "gpu-prepare: over the limit" >&2; exit 1; fi
