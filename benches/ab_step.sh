#!/usr/bin/env bash
# Interleaved A/B of modserve builds on the decode step: runs `modserve bench --profile` with
# each binary in turn, ROUNDS times (A B C A B C ...), and prints every run's decode-step time and
# phase times, then per binary the median, min and max, and each median as a ratio to the first
# binary's. On a shared 2-core VM the host's speed drifts by a third within minutes, so only
# interleaved runs compare; and two builds of one source can differ by 10% (docs/BENCHMARKS.md,
# 2026-12-05 08:03), so compare several builds, not one pair.
#
#   benches/ab_step.sh [-r ROUNDS] [-s SCENARIO] [-n NEW_TOKENS] BIN_A BIN_B [BIN ...] [-- BENCH_ARGS]
#
# BIN: copies of target/release/modserve (a later build must not replace one mid-run), built from
# a commit whose bench writes its phase profiles into --json (2026-12-05 or later). Defaults:
# 6 rounds, scenario base32, 128 new tokens, THREADS=2, WORK_DIR=${TMPDIR:-/tmp}/mbw (the bench's
# adapter work folder, shared by the runs). Prints to stdout; each run's full output goes to
# OUT_DIR (default: a new folder under ${TMPDIR:-/tmp}).
set -euo pipefail

ROUNDS=6
SCENARIO=base32
NEW_TOKENS=128
THREADS="${THREADS:-2}"
WORK_DIR="${WORK_DIR:-${TMPDIR:-/tmp}/mbw}"
usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while getopts "r:s:n:h" o; do
  case "$o" in
    r) ROUNDS="$OPTARG" ;;
    s) SCENARIO="$OPTARG" ;;
    n) NEW_TOKENS="$OPTARG" ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
BINS=()
while [[ $# -gt 0 && "$1" != "--" ]]; do BINS+=("$1"); shift; done
[[ "${1:-}" == "--" ]] && shift
EXTRA=("$@")
[[ ${#BINS[@]} -ge 2 ]] || usage
for b in "${BINS[@]}"; do [[ -x "$b" ]] || { echo "ab_step: $b is not an executable" >&2; exit 2; }; done
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || { echo "ab_step: -r takes a positive number" >&2; exit 2; }
OUT_DIR="${OUT_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/ab_step.XXXXXX")}"
mkdir -p "$OUT_DIR" "$WORK_DIR"

echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'); cpu: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) CPUs"
echo "bench: --threads $THREADS --new-tokens $NEW_TOKENS --scenarios $SCENARIO --profile ${EXTRA[*]:-}; $ROUNDS rounds; outputs in $OUT_DIR"
for ((i = 0; i < ${#BINS[@]}; i++)); do echo "build $i: ${BINS[$i]} ($(sha256sum "${BINS[$i]}" | cut -c1-12))"; done
RESULTS="$OUT_DIR/results.tsv"
: >"$RESULTS"
for ((r = 1; r <= ROUNDS; r++)); do
  for ((i = 0; i < ${#BINS[@]}; i++)); do
    log="$OUT_DIR/round$r-build$i.txt"
    json="$OUT_DIR/round$r-build$i.json"
    "${BINS[$i]}" bench --threads "$THREADS" --new-tokens "$NEW_TOKENS" --scenarios "$SCENARIO" --profile \
      --work-dir "$WORK_DIR" --json "$json" "${EXTRA[@]}" >"$log" 2>&1 || { tail -5 "$log" >&2; echo "ab_step: build $i failed (log $log)" >&2; exit 1; }
    # The last profiled run's decode step (the bench's --json "profiles"), phases by time.
    line="$(python3 - "$json" "$r" "$i" <<'PY'
import json, sys
path, rnd, build = sys.argv[1:]
profiles = json.load(open(path)).get("profiles") or []
step = next((p["steps"]["decode_step"] for p in reversed(profiles) if "decode_step" in p["steps"]), None)
if step is None:
    sys.exit(f"ab_step: no decode_step profile in {path}")
phases = sorted(step["phases"].items(), key=lambda kv: -kv[1]["ms_per_step"])
text = " ".join("%s=%.2f" % (k, v["ms_per_step"]) for k, v in phases)
print(f"{rnd}\t{build}\t{step['ms_per_step']:.2f}\t{text}")
PY
)"
    echo "$line" >>"$RESULTS"
    echo "round $r build $i: decode step $(cut -f3 <<<"$line") ms  ($(cut -f4 <<<"$line"))"
  done
done
python3 - "$RESULTS" "${#BINS[@]}" <<'PY'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
n = int(sys.argv[2])
steps = {b: [float(r[2]) for r in rows if int(r[1]) == b] for b in range(n)}
base = statistics.median(steps[0])
print("\n| build | runs | decode step median ms | min | max | median / build 0 |")
print("|---|---:|---:|---:|---:|---:|")
for b in range(n):
    s = steps[b]
    print(f"| {b} | {len(s)} | {statistics.median(s):.2f} | {min(s):.2f} | {max(s):.2f} | {statistics.median(s) / base:.3f} |")
PY
