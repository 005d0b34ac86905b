#!/usr/bin/env bash
# Fuzzes modserve's adapter-file parsers with cargo-fuzz (libFuzzer): the targets of fuzz/Cargo.toml
# (harness in fuzz/src/lib.rs), each for SECONDS_PER_TARGET seconds, starting from the seeds in
# fuzz/corpus/<target>/ (plus what earlier runs added there). Known findings are not fed back:
# they would stop libFuzzer at start-up until fixed; `cargo test --test fuzz_regressions` replays
# them instead.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET=60] [TARGET...]
#
# Every crash / timeout / out-of-memory input is copied to tests/fixtures/fuzz/<target>/ (all are
# then replayed by `cargo test --test fuzz_regressions` on stable; a timeout-* / oom-* input also
# needs its expected refusal in that test's RESOURCE_REASONS) and the script exits 1 when any was
# found. Logs: fuzz/artifacts/<target>/fuzz.log.
#
# Environment:
#   FUZZ_SANITIZER  none (default: the code is safe Rust; panics and overflow checks are what the
#                   targets look for) or address (needs a nightly toolchain, not RUSTC_BOOTSTRAP).
#   FUZZ_TIMEOUT    seconds one input may take before libFuzzer calls it a timeout (default 10).
#   FUZZ_RSS_MB     libFuzzer -rss_limit_mb (default 2048).
#   FUZZ_CGU        codegen units of the fuzz build (default 16: faster builds on few cores).
#   FUZZ_KEEP_GOING 1: run libFuzzer in fork mode ignoring crashes, timeouts and OOMs, so one run
#                   collects every finding instead of stopping at the first (default 0).
#   FUZZ_RELEASE    1: build without debug assertions / overflow checks, like the production
#                   release build (a separate full build in fuzz/target/production; default 0:
#                   overflow checks on).
#
# Toolchain: cargo-fuzz needs nightly-only flags. The script uses an installed nightly, else tries
# `rustup toolchain install nightly`, else falls back to the stable toolchain with
# RUSTC_BOOTSTRAP=1 (works with FUZZ_SANITIZER=none). cargo-fuzz itself is installed from crates.io
# when missing. The first build compiles candle and the rest of modserve again with coverage
# instrumentation (release, several minutes on 2 cores); later runs reuse fuzz/target/.
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-60}"
shift || true
if ! [[ "$secs" =~ ^[0-9]+$ ]] || [ "$secs" -lt 1 ]; then
  echo "usage: $0 [SECONDS_PER_TARGET=60] [TARGET...]" >&2
  exit 2
fi
all_targets=(safetensors_task_vector peft_config peft_bin pickle_diff pickle_bin merge_recipe)
if [ "$#" -gt 0 ]; then targets=("$@"); else targets=("${all_targets[@]}"); fi
sanitizer="${FUZZ_SANITIZER:-none}"
timeout_s="${FUZZ_TIMEOUT:-10}"
rss_mb="${FUZZ_RSS_MB:-2048}"
cgu="${FUZZ_CGU:-16}"
run_opts=()
if [ "${FUZZ_KEEP_GOING:-0}" = 1 ]; then
  run_opts=(-fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1)
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi

toolchain=()
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  toolchain=(+nightly)
elif rustup toolchain install nightly --profile minimal >/dev/null 2>&1; then
  toolchain=(+nightly)
else
  if [ "$sanitizer" != none ]; then
    echo "no nightly toolchain: FUZZ_SANITIZER=$sanitizer needs one (use FUZZ_SANITIZER=none)" >&2
    exit 2
  fi
  echo "== no nightly toolchain: using stable with RUSTC_BOOTSTRAP=1" >&2
  export RUSTC_BOOTSTRAP=1
fi
fuzz=(cargo "${toolchain[@]}" fuzz)
build_opts=(--sanitizer "$sanitizer" --codegen-units "$cgu")
if [ "${FUZZ_RELEASE:-0}" = 1 ]; then build_opts+=(-O --target-dir fuzz/target/production); fi

echo "== building fuzz targets (${toolchain[*]:-stable}, sanitizer $sanitizer)" >&2
"${fuzz[@]}" build "${build_opts[@]}"

dict_of() {
  case "$1" in
    safetensors_task_vector) echo fuzz/dicts/safetensors.dict ;;
    peft_config | merge_recipe) echo fuzz/dicts/json.dict ;;
    *) echo fuzz/dicts/pickle.dict ;;
  esac
}

found=0
summary=()
# The harness writes its files under TMPDIR; keep them inside fuzz/target and remove them after.
export TMPDIR="$PWD/fuzz/target/fuzz-tmp"
for t in "${targets[@]}"; do
  corpus="fuzz/corpus/$t"
  kept="tests/fixtures/fuzz/$t"
  art="fuzz/artifacts/$t"
  mkdir -p "$corpus" "$kept" "$TMPDIR"
  rm -rf "$art"
  mkdir -p "$art"
  echo "== fuzzing $t for ${secs}s" >&2
  set +e
  "${fuzz[@]}" run "${build_opts[@]}" "$t" "$corpus" -- \
    -max_total_time="$secs" -timeout="$timeout_s" -rss_limit_mb="$rss_mb" \
    -dict="$(dict_of "$t")" -artifact_prefix="$art/" -print_final_stats=1 ${run_opts[@]+"${run_opts[@]}"} \
    >"$art/fuzz.log" 2>&1
  rc=$?
  set -e
  rm -rf "$TMPDIR"
  tail -n 25 "$art/fuzz.log" >&2
  execs=$(grep -a -o 'stat::number_of_executed_units: *[0-9]*' "$art/fuzz.log" | grep -o '[0-9]*$' | tail -n1 || true)
  last=$(grep -a -E '^#[0-9]+' "$art/fuzz.log" | tail -n1 || true)
  # fork mode (FUZZ_KEEP_GOING) prints no final stats: the last status line counts the executions.
  [ -n "$execs" ] || execs=$(sed -n 's/^#\([0-9]*\).*/\1/p' <<<"$last")
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  corp=$(sed -n 's/.* corp: \([0-9][0-9/a-zA-Z]*\).*/\1/p' <<<"$last")
  n=0
  for f in "$art"/crash-* "$art"/oom-* "$art"/timeout-* "$art"/leak-*; do
    [ -e "$f" ] || continue
    cp "$f" "$kept/"
    echo "!! $t: $(basename "$f") -> $kept/" >&2
    n=$((n + 1))
  done
  if [ "$n" -eq 0 ] && [ "$rc" -ne 0 ]; then
    echo "!! $t: cargo fuzz exited $rc without an artifact; see $art/fuzz.log" >&2
    n=1
  fi
  [ "$n" -gt 0 ] && found=1
  summary+=("$(printf '%-24s execs=%-9s cov=%-6s ft=%-6s corpus=%-10s findings=%s' "$t" "${execs:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$n")")
done

echo "== summary (${secs}s per target)"
printf '%s\n' "${summary[@]}"
if [ "$found" -ne 0 ]; then
  echo "findings were copied to tests/fixtures/fuzz/<target>/; replay: cargo test --test fuzz_regressions"
  exit 1
fi
