#!/usr/bin/env bash
# Usage: scripts/bootstrap.sh [--build]
# Installs everything tomeserve needs on a fresh Debian 12 machine: the C++ toolchain's libraries from apt and the
# Python reference stack (plus libtorch, which ships inside the torch wheel) in .venv. Idempotent: a second run
# only checks. Timings of each step go to stderr so install cost stays visible in CI logs.
#   scripts/bootstrap.sh           everything: build, tests, benchmarks (developers, CI)
#   scripts/bootstrap.sh --build   only what building the server needs (the Dockerfile's builder stage):
#                                  build packages and requirements-build.txt (torch), no test stack
# Where the machine has no CUDA toolkit (nvcc) but the torch wheel is a CUDA build, the toolkit pieces that
# torch's CMake config needs (nvcc, nvvm, crt, cccl headers) come from NVIDIA's PyPI wheels
# (requirements-cuda-toolkit.txt) and .venv/cuda-toolkit is made a toolkit root over them; cmake/ finds it.
for arg in "$@"; do case "$arg" in -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac; done
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
mode=all
case "${1:-}" in
  "") ;;
  --build) mode=build ;;
  *) echo "usage: scripts/bootstrap.sh [--build]" >&2; exit 2 ;;
esac

apt_packages=(
  build-essential cmake ninja-build pkg-config ca-certificates
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev libspdlog-dev libfmt-dev prometheus-cpp-dev
  nlohmann-json3-dev libpng-dev libpcre2-dev libutf8proc-dev libyaml-cpp-dev libcpp-httplib-dev
  python3-venv
)
if [ "$mode" = all ]; then
  apt_packages+=(
    libgtest-dev libgmock-dev libbenchmark-dev unzip openssl
    prometheus  # the observability test runs a real Prometheus (and promtool) on 127.0.0.1
    chromium    # the HTTP playground test loads the page in headless Chromium
  )
fi

# Tools only some scripts need ask for their packages here, so there is one install path
# (scripts/fuzz.sh: TOMESERVE_EXTRA_APT="clang libclang-rt-14-dev").
read -ra extra_packages <<<"${TOMESERVE_EXTRA_APT:-}"
apt_packages+=("${extra_packages[@]}")

step() { printf '[bootstrap] %s\n' "$*" >&2; }
timed() { local t0=$SECONDS; "$@"; step "  done in $((SECONDS - t0)) s"; }

missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  step "apt: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  sudo_cmd=(); [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  timed "${sudo_cmd[@]}" apt-get update -q
  # No package here is meant to run as a system service (Debian's prometheus would start one listening on
  # every interface): forbid service starts during the install unless the machine already has a policy.
  policy=/usr/sbin/policy-rc.d
  own_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo_cmd[@]}" tee "$policy" >/dev/null
    "${sudo_cmd[@]}" chmod +x "$policy"
    own_policy=1
  fi
  timed "${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
  if ((own_policy)); then "${sudo_cmd[@]}" rm -f "$policy"; fi
else
  step "apt: all packages present"
fi

# The venv is keyed by the requirements files: a changed pin re-runs pip, an unchanged one costs nothing.
venv="$root/.venv"
reqs=requirements.txt
[ "$mode" = build ] && reqs=requirements-build.txt
stamp="$venv/.${reqs%.txt}.sha256"
want="$(cat requirements*.txt | sha256sum | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
  step "venv: creating $venv"
  python3 -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  step "pip: installing $reqs (the CUDA torch wheel and its nvidia-* wheels are several GB)"
  timed "$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  timed "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$reqs"
  echo "$want" > "$stamp"
else
  step "pip: $reqs unchanged"
fi

# A CUDA torch wheel's CMake config enables the CUDA language, so building against it needs nvcc. Use the
# machine's toolkit where there is one; otherwise make one from NVIDIA's wheels (same CUDA release as torch's).
toolkit="$venv/cuda-toolkit"
torch_cuda="$("$venv/bin/python" -c 'import torch; print(torch.version.cuda or "")')"
if [ -n "$torch_cuda" ] && [ ! -x /usr/local/cuda/bin/nvcc ] && ! command -v nvcc >/dev/null \
   && [ ! -x "$toolkit/bin/nvcc" ]; then
  step "CUDA $torch_cuda toolkit from PyPI wheels into $toolkit (no nvcc on this machine)"
  timed "$venv/bin/python" -m pip install -q --disable-pip-version-check -r requirements-cuda-toolkit.txt
  cu="$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')"
  # nvcc finds its pieces from the folder it was called from (nvcc.profile: TOP = bin/..), so bin/ is a real
  # folder of links here (a linked bin/ would make bin/.. the wheel folder again); FindCUDAToolkit and nvcc's
  # link step want lib64/ with unversioned names the wheels do not ship.
  mkdir -p "$toolkit/bin" "$toolkit/lib64"
  for d in nvvm include; do ln -sfn "$cu/$d" "$toolkit/$d"; done
  for f in "$cu"/bin/*; do ln -sfn "$f" "$toolkit/bin/$(basename "$f")"; done
  for f in "$cu"/lib/*.so.* "$cu"/lib/*.a; do
    name="$(basename "$f")"
    ln -sfn "$f" "$toolkit/lib64/$name"
    case "$name" in *.so.*) ln -sfn "$f" "$toolkit/lib64/${name%%.so.*}.so" ;; esac
  done
fi

# The CLIP BPE merges ship inside open_clip's wheel; take the one data file, not the package and its deps.
bpe="$root/build/cache/bpe_simple_vocab_16e6.txt.gz"
if [ "$mode" = all ] && [ ! -s "$bpe" ]; then
  step "fetching the CLIP BPE merges from the open-clip-torch wheel"
  tmp="$(mktemp -d)"
  "$venv/bin/python" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    open-clip-torch==3.3.0 -d "$tmp"
  mkdir -p "$(dirname "$bpe")"
  unzip -p "$tmp"/open_clip_torch-*.whl 'open_clip/bpe_simple_vocab_16e6.txt.gz' > "$bpe"
  rm -rf "$tmp"
fi
step "ready"
