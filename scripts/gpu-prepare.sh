#!/usr/bin/env bash
# Prepares what scripts/gpu-bench.sh needs on a GPU machine that has torch but none of our apt packages and no
# network: the built test and benchmark binaries with the non-torch, non-glibc shared libraries they load
# (.devbuild/), and the reference wheels torch's image lacks (.whl/). Both folders are git-ignored.
#   BUILD_DIR=build
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
build="${BUILD_DIR:-build}"
rm -rf .devbuild && mkdir -p .devbuild/bin .devbuild/lib .whl
for b in "$build"/bin/*_test "$build"/bin/tomeserve-bench "$build"/bin/tomeserve-gen; do
  [ -x "$b" ] && cp "$b" .devbuild/bin/
done
# Shared libraries from the system (absl, pcre2, utf8proc, spdlog, fmt, png, ...) but not glibc/libstdc++,
# which the GPU image has, nor torch/CUDA, which come from its torch.
ldd .devbuild/bin/* 2>/dev/null | awk '/=> \/(usr\/)?lib/ {print $3}' | sort -u |
  grep -vE '/(libc|libm|libdl|librt|libpthread|libstdc\+\+|libgcc_s|ld-linux)[.-]' |
  grep -vE 'torch|cuda|nvidia|libcu|libnv' | xargs -r -I{} cp -L {} .devbuild/lib/
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl diffusers==0.42.1 tomesd==0.1.3
du -sh .devbuild .whl
