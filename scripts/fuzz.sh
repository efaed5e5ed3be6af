#!/usr/bin/env bash
# Usage: scripts/fuzz.sh [TARGET ...]   (default: fuzz_request fuzz_safetensors fuzz_tokenizer fuzz_png fuzz_config)
# Builds the libFuzzer targets (tests/fuzz, clang with ASan + UBSan) and runs each for FUZZ_SECONDS on a copy of
# its checked-in corpus (tests/fuzz/corpus/TARGET), then appends one line per target to FUZZ_LOG. Not part of
# scripts/test.sh: a run is minutes per target. A crash or sanitizer report stops that target, leaves the
# reproducer in build-fuzz/findings/TARGET/ and makes the script exit 1.
#   FUZZ_SECONDS=600 FUZZ_JOBS=2 FUZZ_LOG=build-fuzz/fuzz.log
# New inputs the fuzzer finds stay in build-fuzz/corpus/ (merge them into tests/fuzz/corpus by hand with
# `-merge=1` when they add coverage worth keeping).
for arg in "$@"; do case "$arg" in -h|--help) sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0 ;; esac; done
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
seconds="${FUZZ_SECONDS:-600}"
jobs="${FUZZ_JOBS:-2}"
out=build-fuzz
log="${FUZZ_LOG:-$out/fuzz.log}"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(fuzz_request fuzz_safetensors fuzz_tokenizer fuzz_png fuzz_config)

TOMESERVE_EXTRA_APT="clang libclang-rt-14-dev" bash scripts/bootstrap.sh
tokenizer="${TOMESERVE_FUZZ_TOKENIZER_DIR:-build/testdata/tiny/tokenizer}"
[ -f "$tokenizer/vocab.json" ] || { echo "fuzz.sh: no tokenizer in $tokenizer (run scripts/test.sh first, or set TOMESERVE_FUZZ_TOKENIZER_DIR)" >&2; exit 2; }
export TOMESERVE_FUZZ_TOKENIZER_DIR="$(cd "$tokenizer" && pwd)"

cmake -S tests/fuzz -B "$out" -G Ninja -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$out" -j "$jobs" --target "${targets[@]}"

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
status=0
run_one() {
  local t="$1" corpus="$out/corpus/$1" findings="$out/findings/$1"
  mkdir -p "$corpus" "$findings"
  cp -n tests/fuzz/corpus/"$t"/* "$corpus"/ 2>/dev/null || true
  local started=$SECONDS rc=0
  "$out/$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
    -artifact_prefix="$findings/" "$corpus" >"$out/$t.out" 2>&1 || rc=$?
  local execs cov
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$out/$t.out" | grep -o '[0-9]*$' || echo "?")
  cov=$(grep -o 'cov: [0-9]*' "$out/$t.out" | tail -1 | grep -o '[0-9]*' || echo "?")
  local result="clean"
  [ "$rc" -eq 0 ] || result="FINDING (exit $rc; see $findings and $out/$t.out)"
  printf '%s %s: %ss, %s executions, coverage %s, corpus %s files, %s\n' "$(date -u +%FT%TZ)" "$t" \
    $((SECONDS - started)) "$execs" "$cov" "$(ls "$corpus" | wc -l)" "$result" | tee -a "$log"
  [ "$rc" -eq 0 ]
}
pids=()
for t in "${targets[@]}"; do
  run_one "$t" & pids+=($!)
  if [ ${#pids[@]} -ge "$jobs" ]; then wait "${pids[0]}" || status=1; pids=("${pids[@]:1}"); fi
done
for p in "${pids[@]}"; do wait "$p" || status=1; done
exit $status
