#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer build of the whole project (server included) in build-asan/, then:
# the server's unit tests (scheduler, admission, conversion, options, auth), the step-batching pipeline test,
# and a short soak (scripts/soak.py) against the sanitized server. Any sanitizer report aborts the process that
# hit it, which fails that test or shows as lost calls / a bad exit status in the soak. Not part of
# scripts/test.sh (the build alone takes about half an hour on 2 cores).
#   SANITIZE_SOAK_CALLS=300  BUILD_JOBS=2
# libtorch and gRPC come uninstrumented (prebuilt): ASan still checks every access our code makes and every
# heap block it frees, but not the inside of those libraries. Leak checking is off for the same reason (both keep
# process-lifetime allocations that LeakSanitizer would report at exit). RSS growth in the soak is not a finding
# here: ASan's quarantine holds freed memory on purpose.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
build=build-asan
calls="${SANITIZE_SOAK_CALLS:-300}"
t0=$SECONDS
log() { echo "[sanitize +$((SECONDS - t0))s] $*" >&2; }

bash scripts/bootstrap.sh
flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS="$flags" \
  -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" >/dev/null
targets=(tomeserve tomeserve-cli server_scheduler_test server_convert_test step_batch_test)
log "build ${targets[*]}"
cmake --build "$build" -j "${BUILD_JOBS:-2}" --target "${targets[@]}"

export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
# The test data comes from the regular build (scripts/test.sh makes it); the sanitized binaries only run on it.
td="${TESTDATA:-build/testdata}"
[ -f "$td/tiny/model_index.json" ] || { log "no test models in $td: run scripts/test.sh first"; exit 2; }
export TOMESERVE_TINY_MODEL="$root/$td/tiny" TOMESERVE_TEST_TOKENIZER_DIR="$root/$td/tiny/tokenizer" OMP_NUM_THREADS=1
for t in server_scheduler_test server_convert_test step_batch_test; do
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
print(f"soak under ASan+UBSan: {r['calls_sent']} calls, statuses {r['codes']}, lost {r['lost']}, "
      f"problems other than RSS growth: {len(real)} (RSS {r['warm'] and r['warm']['rss_mb']} -> "
      f"{r['end']['rss_mb']} MiB)")
for p in real:
    print("  ", p)
sys.exit(1 if real or r["lost"] else 0)
EOF
log "clean"
