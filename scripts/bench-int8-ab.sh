#!/usr/bin/env bash
# The base product's kernels side by side, in one run: `modserve bench` with candle's quantized
# kernels (MODSERVE_INT8_GEMM=0) and with the int8 GEMM this CPU selects (AVX-512 VNNI or AVX2),
# interleaved twice, same binary, same scenarios. Prints the CPU, both tables per round, and the
# int8 / candle ratio of each scenario's tok/s.
#
# Usage: scripts/bench-int8-ab.sh [SCENARIOS]   (default single,base32,lora32,sft32,poly32)
# Environment: BENCH_BIN (default target/release/modserve), BENCH_THREADS (2), BENCH_TOKENS (16),
#              BENCH_WORK (synthetic adapters, reused; default ${TMPDIR:-/tmp}/mbw-ab)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${BENCH_BIN:-$ROOT/target/release/modserve}"
SCEN="${1:-single,base32,lora32,sft32,poly32}"
WORK="${BENCH_WORK:-${TMPDIR:-/tmp}/mbw-ab}"
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; flags:" \
  "$(grep -m1 -o -w 'avx512_vnni\|avx2\|f16c' /proc/cpuinfo | sort -u | xargs)"
run() { "$BIN" bench --scenarios "$SCEN" --threads "${BENCH_THREADS:-2}" --new-tokens "${BENCH_TOKENS:-16}" --work-dir "$WORK" 2>/dev/null | grep -E '^\| [a-z]' | grep -v '^| scenario'; }
declare -A sum_c sum_i
for round in 1 2; do
  echo "--- round $round: candle kernels (MODSERVE_INT8_GEMM=0)"
  c="$(MODSERVE_INT8_GEMM=0 run)"; echo "$c"
  echo "--- round $round: int8 GEMM"
  i="$(run)"; echo "$i"
  while IFS='|' read -r _ name _ tps _; do sum_c[$(echo $name)]+=" $(echo $tps)"; done <<<"$c"
  while IFS='|' read -r _ name _ tps _; do sum_i[$(echo $name)]+=" $(echo $tps)"; done <<<"$i"
done
echo "--- tok/s per round, int8 / candle"
for k in "${!sum_c[@]}"; do
  python3 -c "import sys; c=[float(x) for x in sys.argv[2].split()]; i=[float(x) for x in sys.argv[3].split()]; print(f'{sys.argv[1]:<8} candle {c}  int8 {i}  ratio {sum(i)/sum(c):.2f}x')" "$k" "${sum_c[$k]}" "${sum_i[$k]}"
done
