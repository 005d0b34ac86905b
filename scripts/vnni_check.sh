#!/usr/bin/env bash
# The AVX-512 VNNI int8 kernels checked and timed on a CPU that has them, from binaries built on
# one that may not (this project's usual 2-core machines are often AVX2-only; the `device` tool's
# GPU hosts have AVX-512 VNNI CPUs, and nothing can be built there).
#
#   scripts/vnni_check.sh stage            # here: builds the binaries into target/vnni (~3 min)
#   scripts/vnni_check.sh run [OUT_DIR]    # there: runs them, prints and writes the results
#
# With the device tool: stage here, then one call such as
#   run(command="bash scripts/vnni_check.sh run $OUT", carry=["target/vnni"], timeout_s=300)
# `run` checks the CPU's flags, runs the int8 GEMM's unit tests (every variant the CPU runs,
# the Q4_1 VNNI tile among them: equal to candle's Q4_1 matmul, no saturation, zero rows) and
# times `examples/int8_gemm` at 1 and 32 rows with the Q8_0 weights (VNNI), the Q4_1 weights on
# the best 4-bit variant (VNNI) and on the AVX2 one, with THREADS threads (default 2, as the
# project's machine kind), in cache and from memory. The Q4_1-vs-Q8_0 lines decide whether
# `MODSERVE_Q4_1` should default to native on VNNI CPUs (src/kernels/mod.rs).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="$ROOT/target/vnni"
case "${1:-}" in
  stage)
    cd "$ROOT"
    cargo build --release --example int8_gemm
    # The lib's unit-test binary: the last "Executable unittests src/lib.rs" line names it.
    bin="$(cargo test --release --lib --no-run 2>&1 | sed -n 's/.*Executable unittests src\/lib.rs (\(.*\))/\1/p' | tail -1)"
    [[ -x "$bin" ]] || { echo "vnni_check: no lib test binary found" >&2; exit 1; }
    mkdir -p "$DIR"
    cp "$bin" "$DIR/lib-tests"
    cp target/release/examples/int8_gemm "$DIR/int8_gemm"
    strip "$DIR/lib-tests" "$DIR/int8_gemm" 2>/dev/null || true
    du -sh "$DIR"
    ;;
  run)
    OUT="${2:-${TMPDIR:-/tmp}/vnni-check}"
    THREADS="${THREADS:-2}"
    mkdir -p "$OUT"
    [[ -x "$DIR/lib-tests" && -x "$DIR/int8_gemm" ]] || { echo "vnni_check: run 'stage' first (and carry target/vnni)" >&2; exit 2; }
    {
      echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'); cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) CPUs"
      echo "flags: $(grep -o -w 'avx2\|avx512f\|avx512bw\|avx512vl\|avx512vnni\|avx_vnni\|amx_int8' /proc/cpuinfo | sort -u | tr '\n' ' ')"
    } | tee "$OUT/cpu.txt"
    grep -q -w avx512vnni /proc/cpuinfo || echo "vnni_check: this CPU has no AVX-512 VNNI; only the AVX2 variants run" | tee -a "$OUT/cpu.txt"
    set +e
    "$DIR/lib-tests" int8_gemm --test-threads 2 2>&1 | tee "$OUT/int8_tests.txt"
    tests_rc=${PIPESTATUS[0]}
    for where in cached memory; do
      for rows in 1 32; do
        for w in q8_0 q4_1 q4_1_avx2; do
          args=("$rows")
          [[ "$where" == cached ]] && args+=(cached)
          [[ "$w" != q8_0 ]] && args+=("$w")
          echo "== int8_gemm ${args[*]} (threads $THREADS)"
          RAYON_NUM_THREADS="$THREADS" timeout 120 "$DIR/int8_gemm" "${args[@]}" 2>&1 | grep -v '^packing'
        done
      done
    done 2>&1 | tee "$OUT/int8_gemm.txt"
    echo "vnni_check: unit tests exit $tests_rc; outputs in $OUT"
    exit "$tests_rc"
    ;;
  *)
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
