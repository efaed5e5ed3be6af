#!/usr/bin/env bash
# Usage: scripts/sanitize.sh [address|thread]   (default address: ASan + UBSan, build-asan/; thread: TSan, build-tsan/)
# Sanitizer builds of the whole project (server included), then the server's unit tests (scheduler, admission,
# conversion, options, auth) and a short soak (scripts/soak.py) against the sanitized server. Any report aborts
# the process that hit it, which fails that test or shows as lost calls / a bad exit status in the soak. Not part
# of scripts/test.sh (a build takes about half an hour on 2 cores).
#   SANITIZE_SOAK_CALLS=300  BUILD_JOBS=2
# libtorch and gRPC come uninstrumented (prebuilt): the sanitizers check what our code does, not their insides.
# Leak checking is off (both keep process-lifetime allocations that LeakSanitizer would report at exit), and RSS
# growth in the soak is not a finding (ASan's quarantine and TSan's shadow memory grow on purpose). Under TSan the
# server runs one intra-op thread (OMP_NUM_THREADS=1): libgomp's uninstrumented pool would hide its
# synchronisation from TSan. TSan must see every lock: Debian's abseil is not built with TSan, so absl::Mutex
# (ours and gRPC's) would be invisible and every access it guards reported. `thread` therefore builds the same
# abseil (Debian's source package of the installed version, its patches and CMake options) with -fsanitize=thread
# into $build/abseil once, and runs everything with it first on LD_LIBRARY_PATH (same SONAMEs and ABI, so gRPC
# and our binaries load the instrumented copy).
for arg in "$@"; do case "$arg" in -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac; done
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
mode="${1:-address}"
calls="${SANITIZE_SOAK_CALLS:-300}"
t0=$SECONDS
log() { echo "[sanitize $mode +$((SECONDS - t0))s] $*" >&2; }
case "$mode" in
  address)
    build=build-asan
    flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"
    link="-fsanitize=address,undefined"
    targets=(tomeserve tomeserve-cli server_scheduler_test server_convert_test step_batch_test)
    tests=(server_scheduler_test server_convert_test step_batch_test)
    export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1
    export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 ;;
  thread)
    build=build-tsan
    flags="-fsanitize=thread -fno-omit-frame-pointer -g"
    link="-fsanitize=thread"
    targets=(tomeserve tomeserve-cli server_scheduler_test server_convert_test)
    tests=(server_scheduler_test server_convert_test)
    export TSAN_OPTIONS="halt_on_error=1:abort_on_error=1:second_deadlock_stack=1:suppressions=$root/tests/tsan_suppressions.txt" ;;
  *) echo "sanitize.sh: mode is address or thread, got \"$mode\"" >&2; exit 2 ;;
esac

bash scripts/bootstrap.sh
if [ "$mode" = thread ]; then
  absl="$root/$build/abseil"
  version="$(dpkg-query -W -f='${Version}' libabsl-dev)"
  if [ "$(cat "$absl/.version" 2>/dev/null)" != "$version" ]; then
    log "abseil $version from Debian's source package, built with TSan (once)"
    src="$root/$build/abseil-src"
    rm -rf "$src" "$absl" "$root/$build/abseil-build" && mkdir -p "$src/lists/partial"
    # A private deb-src list and state folder: the machine's apt configuration is left as it is.
    for suite in bookworm bookworm-updates; do echo "deb-src http://deb.debian.org/debian $suite main"; done \
      >"$src/sources.list"
    echo "deb-src http://deb.debian.org/debian-security bookworm-security main" >>"$src/sources.list"
    apt_src=(-o "Dir::Etc::sourcelist=$src/sources.list" -o Dir::Etc::sourceparts=- -o "Dir::State::Lists=$src/lists")
    apt-get "${apt_src[@]}" -q update >/dev/null
    (cd "$src" && apt-get "${apt_src[@]}" -q source --download-only "abseil=$version" >/dev/null 2>&1)
    # Applies Debian's patches. apt checked the files against the signed Sources index; dpkg-source's own check
    # of the .dsc signature needs debian-keyring, so its "cannot verify" warning is dropped.
    dpkg-source -x "$src"/abseil_*.dsc "$src/tree" >/dev/null 2>&1
    # debian/rules' shared-library configuration (C++17, shared), plus the sanitizer.
    cmake -S "$src/tree" -B "$root/$build/abseil-build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      -DCMAKE_CXX_STANDARD=17 -DBUILD_SHARED_LIBS=ON -DCMAKE_INSTALL_PREFIX="$absl" -DCMAKE_INSTALL_LIBDIR=lib \
      -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_SHARED_LINKER_FLAGS="$link" >/dev/null
    cmake --build "$root/$build/abseil-build" -j "${BUILD_JOBS:-2}" >/dev/null
    cmake --install "$root/$build/abseil-build" >/dev/null
    echo "$version" >"$absl/.version"
  fi
  export LD_LIBRARY_PATH="$absl/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS="$flags" \
  -DCMAKE_EXE_LINKER_FLAGS="$link" -DTOMESERVE_ASAN_TESTS=OFF >/dev/null
log "build ${targets[*]}"
cmake --build "$build" -j "${BUILD_JOBS:-2}" --target "${targets[@]}"

# The test data comes from the regular build (scripts/test.sh makes it); the sanitized binaries only run on it.
td="${TESTDATA:-build/testdata}"
[ -f "$td/tiny/model_index.json" ] || { log "no test models in $td: run scripts/test.sh first"; exit 2; }
export TOMESERVE_TINY_MODEL="$root/$td/tiny" TOMESERVE_TEST_TOKENIZER_DIR="$root/$td/tiny/tokenizer" OMP_NUM_THREADS=1
for t in "${tests[@]}"; do
  log "$t"
  "$build/bin/$t" --gtest_brief=1
done

log "soak: $calls calls against the sanitized server"
json="$build/soak.json"
.venv/bin/python scripts/soak.py --model "$TOMESERVE_TINY_MODEL" --calls "$calls" --clients 16 --seed 3 \
  --warmup-fraction 0.25 --bin "$build/bin" --json "$json" || true
.venv/bin/python - "$json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
real = [p for p in r["problems"] if not p.startswith("RSS grew")]
print(f"soak under the sanitizer: {r['calls_sent']} calls, statuses {r['codes']}, lost {r['lost']}, "
      f"problems other than RSS growth: {len(real)} (RSS {r['warm'] and r['warm']['rss_mb']} -> "
      f"{r['end']['rss_mb']} MiB)")
for p in real:
    print("  ", p)
sys.exit(1 if real or r["lost"] else 0)
EOF
log "clean"
