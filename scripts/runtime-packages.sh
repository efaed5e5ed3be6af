#!/usr/bin/env bash
# Usage: scripts/runtime-packages.sh PREFIX
# Prints the Debian packages that the shared libraries of an installed tomeserve tree come from, one per line:
# every library ldd resolves for PREFIX/bin/* and PREFIX/lib/site-packages/torch/lib/*.so that is not itself
# inside PREFIX. The Dockerfile's runtime stage installs exactly these. Fails on a library ldd cannot find or
# no package owns, so the list cannot silently miss one. The one exception is libcuda.so.1 (needed by
# libcaffe2_nvrtc.so): the GPU driver's library, which the NVIDIA container runtime mounts from the node.
for arg in "$@"; do case "$arg" in -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac; done
set -euo pipefail
prefix="${1:?usage: scripts/runtime-packages.sh PREFIX}"
prefix="$(cd "$prefix" && pwd)"

mapfile -t objects < <(find "$prefix/bin" -type f -executable; find "$prefix/lib/site-packages/torch/lib" \
  -maxdepth 1 -name '*.so' -type f)
ldd_out="$(ldd "${objects[@]}")"
if grep -F 'not found' <<<"$ldd_out" | grep -v -E '^\s*libcuda\.so\.1 ' >&2; then
  echo "runtime-packages: unresolved libraries (above)" >&2
  exit 1
fi
mapfile -t libs < <(awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' <<<"$ldd_out" | sort -u)
packages=()
for lib in "${libs[@]}"; do
  case "$lib" in "$prefix"/*) continue ;; esac
  owner=""
  # Debian 12 is merged-/usr: ldd may name /lib/... where dpkg recorded /usr/lib/... or the other way round.
  for p in "$lib" "/usr$lib" "${lib#/usr}" "$(readlink -f "$lib")"; do
    owner="$(dpkg-query -S "$p" 2>/dev/null | head -1 | cut -d: -f1)" && [ -n "$owner" ] && break
  done
  if [ -z "$owner" ]; then
    echo "runtime-packages: no Debian package owns $lib" >&2
    exit 1
  fi
  packages+=("$owner")
done
printf '%s\n' "${packages[@]}" | sort -u
