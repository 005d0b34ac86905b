#!/usr/bin/env bash
# Soak test: a release server with 100 registered LoRAs behind a small adapter cache (~16
# resident), driven by `modserve loadgen` with a Zipf(1.0) popularity mix over the 100 ids, while
# the server's RSS is sampled every 10 s.
#
# Usage: scripts/soak.sh [DURATION=600s] [CONCURRENCY=32]
#        (positional, or as KEY=VALUE arguments, or as environment variables)
#        SOAK_SHORT=1 scripts/soak.sh      # CI: 60 s, concurrency 8
# Other knobs (environment): SOAK_WORK (work dir, default a fresh temp dir, kept on failure),
# SOAK_CACHE_BYTES (adapter cache budget), SOAK_THREADS (server compute threads),
# SOAK_NO_BUILD=1 (use the existing target/release/modserve).
#
# The run is split in two halves (two loadgen runs against the same server) so inter-token
# latency can be compared first half vs second half. Prints both loadgen JSON reports, the error
# count, RSS at 1/4 of the run and at the end (and the mean and max of the samples after 1/4, first
# vs second half), and p99 ITL per half.
# Exits non-zero if any request failed, or if RSS grew by more than 20% after the warm-up
# (1/4 mark -> end); "flat" means within 10%.
#
# The 100 modules are copies of tests/fixtures/parity/lora_qv_r4 (r=4, q_proj+v_proj), each with a
# small deterministic perturbation of its lora_B weights so their contents (and outputs) differ;
# without python3 they are plain copies (identical content, which is fine for load behaviour:
# the cache keys by module id and file fingerprint, not by content).
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in curl jq; do
  command -v "$tool" >/dev/null 2>&1 || { echo "soak: needs $tool" >&2; exit 2; }
done

for arg in "$@"; do
  case "$arg" in
    DURATION=*) DURATION="${arg#DURATION=}" ;;
    CONCURRENCY=*) CONCURRENCY="${arg#CONCURRENCY=}" ;;
    *=*) echo "soak: unknown argument $arg" >&2; exit 2 ;;
    *) if [ -z "${_pos1:-}" ]; then _pos1=1; DURATION="$arg"; else CONCURRENCY="$arg"; fi ;;
  esac
done
if [ "${SOAK_SHORT:-0}" = 1 ]; then
  DURATION="${DURATION:-60s}"
  CONCURRENCY="${CONCURRENCY:-8}"
fi
DURATION="${DURATION:-600s}"
CONCURRENCY="${CONCURRENCY:-32}"
N_MODULES=100
# lora_qv_r4 is 1,843,200 bytes resident (factors + CPU kernel layout): 16 of them fit in 30 MB.
CACHE_BYTES="${SOAK_CACHE_BYTES:-30000000}"

to_seconds() {
  local d="$1" total=0 num
  if [[ "$d" =~ ^[0-9]+$ ]]; then echo "$d"; return; fi
  while [[ -n "$d" ]]; do
    if [[ "$d" =~ ^([0-9]+)(h|m|s)(.*)$ ]]; then
      num="${BASH_REMATCH[1]}"
      case "${BASH_REMATCH[2]}" in h) total=$((total + num * 3600)) ;; m) total=$((total + num * 60)) ;; s) total=$((total + num)) ;; esac
      d="${BASH_REMATCH[3]}"
    else
      echo "soak: cannot parse duration '$1' (use e.g. 600s, 10m, 1m30s)" >&2; exit 2
    fi
  done
  echo "$total"
}
TOTAL_S=$(to_seconds "$DURATION")
[ "$TOTAL_S" -ge 20 ] || { echo "soak: DURATION must be at least 20s" >&2; exit 2; }
HALF_S=$((TOTAL_S / 2))
WARMUP_S=$(( TOTAL_S >= 120 ? 15 : 5 ))

MODEL="${MODSERVE_MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
[ -f "$MODEL" ] || { echo "soak: model $MODEL missing: run \`cargo run --release -- fetch-model\`" >&2; exit 2; }

# SOAK_BIN: an already built binary (CI uses the test build); otherwise build release.
if [ -n "${SOAK_BIN:-}" ]; then
  BIN="$SOAK_BIN"
else
  if [ "${SOAK_NO_BUILD:-0}" != 1 ]; then
    echo "soak: building release" >&2
    cargo build --release --quiet
  fi
  BIN=target/release/modserve
fi

WORK="${SOAK_WORK:-$(mktemp -d -t modserve-soak.XXXXXX)}"
mkdir -p "$WORK"
ROOT="$WORK/adapters"
rm -rf "$ROOT"
mkdir -p "$ROOT"
SRC=tests/fixtures/parity/lora_qv_r4
for i in $(seq 0 $((N_MODULES - 1))); do
  mkdir -p "$ROOT/bench_lora_$i"
  cp "$SRC/adapter_config.json" "$ROOT/bench_lora_$i/"
done
if command -v python3 >/dev/null 2>&1; then
  python3 - "$SRC/adapter_model.safetensors" "$ROOT" "$N_MODULES" <<'PY'
import array, json, struct, sys
src, root, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
raw = open(src, "rb").read()
hlen = struct.unpack("<Q", raw[:8])[0]
header = json.loads(raw[8:8 + hlen])
base = 8 + hlen
# Only lora_B factors are scaled: (1 + 0.02 * (i % 50) - 0.5) keeps them finite and small.
spans = [(base + v["data_offsets"][0], base + v["data_offsets"][1])
         for k, v in header.items() if k != "__metadata__" and ".lora_B." in k and v["dtype"] == "F32"]
for i in range(n):
    out = bytearray(raw)
    f = 1.0 + 0.02 * (i % 50) - 0.5
    for s, e in spans:
        a = array.array("f", raw[s:e])
        out[s:e] = array.array("f", (x * f for x in a)).tobytes()
    open(f"{root}/bench_lora_{i}/adapter_model.safetensors", "wb").write(out)
PY
else
  echo "soak: python3 not found: the 100 modules are identical copies" >&2
  for i in $(seq 0 $((N_MODULES - 1))); do cp "$SRC/adapter_model.safetensors" "$ROOT/bench_lora_$i/"; done
fi

cat >"$WORK/mix.json" <<EOF
{
  "entries": [
    {"name": "short", "weight": 3, "prompt": "The quick brown fox", "max_new_tokens": 32},
    {"name": "chat", "weight": 1, "chat_user": "Name three colors.", "max_new_tokens": 32},
    {"name": "ids", "weight": 1, "token_ids": [504, 2365, 6354, 16438], "max_new_tokens": 24, "temperature": 0.7, "seed": 5}
  ],
  "zipf": {"s": 1.0, "template": "bench_lora_{}", "count": $N_MODULES, "start": 0}
}
EOF

METRICS_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null || echo 19090)
SERVER_LOG="$WORK/server.log"
"$BIN" serve --listen 127.0.0.1:0 --metrics-listen "127.0.0.1:$METRICS_PORT" --model "$MODEL" \
  --adapter-root "$ROOT" --adapter-cache-bytes "$CACHE_BYTES" --max-running 64 --max-queued 256 \
  ${SOAK_THREADS:+--threads "$SOAK_THREADS"} --log-format json >"$WORK/server.out" 2>"$SERVER_LOG" &
SERVER_PID=$!
SAMPLER_PID=""
cleanup() {
  [ -n "$SAMPLER_PID" ] && kill "$SAMPLER_PID" 2>/dev/null || true
  if kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
  fi
}
trap cleanup EXIT

ADDR=""
for _ in $(seq 1 600); do
  ADDR=$(sed -n 's/^modserve listening on //p' "$WORK/server.out" 2>/dev/null | head -1)
  [ -n "$ADDR" ] && break
  kill -0 "$SERVER_PID" 2>/dev/null || { echo "soak: server exited; log:" >&2; tail -20 "$SERVER_LOG" >&2; exit 1; }
  sleep 0.1
done
[ -n "$ADDR" ] || { echo "soak: server did not listen" >&2; exit 1; }
scrape() { curl -fsS "http://127.0.0.1:$METRICS_PORT/metrics" 2>/dev/null || true; }
for _ in $(seq 1 1200); do
  scrape | grep -q '^modserve_model_load_seconds' && break
  kill -0 "$SERVER_PID" 2>/dev/null || { echo "soak: server exited; log:" >&2; tail -20 "$SERVER_LOG" >&2; exit 1; }
  sleep 0.1
done
REGISTERED=$(grep -c '"registered"' "$SERVER_LOG" || true)
echo "soak: server pid $SERVER_PID on $ADDR (metrics :$METRICS_PORT), $REGISTERED modules registered, cache $CACHE_BYTES bytes; duration ${TOTAL_S}s, concurrency $CONCURRENCY; work dir $WORK" >&2

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$SERVER_PID/status" 2>/dev/null || echo 0; }
RSS_CSV="$WORK/rss.csv"
echo "elapsed_s,rss_kib" >"$RSS_CSV"
T0=$(date +%s)
(
  while kill -0 "$SERVER_PID" 2>/dev/null; do
    echo "$(( $(date +%s) - T0 )),$(rss_kib)" >>"$RSS_CSV"
    sleep 10
  done
) &
SAMPLER_PID=$!

run_half() { # $1 = label, $2 = warm-up seconds, $3 = seed
  "$BIN" loadgen --target "http://$ADDR" --concurrency "$CONCURRENCY" --duration "${HALF_S}s" \
    --warmup "${2}s" --mix "$WORK/mix.json" --seed "$3" --quiet --report "$WORK/report_$1.json" >/dev/null
}
run_half first "$WARMUP_S" 1
run_half second 0 2
echo "$(( $(date +%s) - T0 )),$(rss_kib)" >>"$RSS_CSV"
kill "$SAMPLER_PID" 2>/dev/null || true
SAMPLER_PID=""
METRICS_END=$(scrape)

echo "=== loadgen report, first half ==="
cat "$WORK/report_first.json"; echo
echo "=== loadgen report, second half ==="
cat "$WORK/report_second.json"; echo

ERRORS=$(jq -s '[.[].requests.errors] | add' "$WORK/report_first.json" "$WORK/report_second.json")
OK=$(jq -s '[.[].requests.ok] | add' "$WORK/report_first.json" "$WORK/report_second.json")
CANCELLED=$(jq -s '[.[].requests.cancelled] | add' "$WORK/report_first.json" "$WORK/report_second.json")
P99_1=$(jq -r '.itl_ms.p99 // "null"' "$WORK/report_first.json")
P99_2=$(jq -r '.itl_ms.p99 // "null"' "$WORK/report_second.json")
# RSS after warm-up: the first sample at or after 1/4 of the run; end: the last sample.
QUARTER=$(( (WARMUP_S + TOTAL_S) / 4 ))
RSS_Q=$(awk -F, -v q="$QUARTER" 'NR > 1 && $1 >= q && !done {print $2; done = 1}' "$RSS_CSV")
RSS_END=$(tail -1 "$RSS_CSV" | cut -d, -f2)
RSS_Q=${RSS_Q:-$RSS_END}
GROWTH=$(awk -v a="$RSS_Q" -v b="$RSS_END" 'BEGIN { if (a > 0) printf "%.1f", (b - a) * 100 / a; else print "nan" }')
# The samples after the warm-up split in two windows of equal count: mean and max of each. The
# server returns free heap pages every 30 s, so RSS saw-tooths by a few percent between samples;
# the windows' means and maxima show a trend that two single samples can miss or invent.
WINDOWS=$(awk -F, -v q="$QUARTER" 'NR > 1 && $1 >= q {v[n++] = $2}
  END { if (n < 2) { print "n/a"; exit }
        h = int(n / 2); for (i = 0; i < n; i++) { w = (i < h) ? 1 : 2; s[w] += v[i]; c[w]++; if (v[i] > mx[w]) mx[w] = v[i] }
        m1 = s[1] / c[1]; m2 = s[2] / c[2];
        printf "mean %.0f -> %.0f KiB (%+.2f%%), max %d -> %d KiB (%+.2f%%)", m1, m2, (m2 - m1) * 100 / m1, mx[1], mx[2], (mx[2] - mx[1]) * 100 / mx[1] }' "$RSS_CSV")
m() { echo "$METRICS_END" | awk -v n="$1" '$1 == n {print $2}' | head -1; }

echo "=== soak summary ==="
echo "requests ok: $OK, errors: $ERRORS, cancelled at the end of a half: $CANCELLED"
jq -s -c '[.[].errors_by_code]' "$WORK/report_first.json" "$WORK/report_second.json"
echo "RSS samples (elapsed_s,rss_kib): $(tail -n +2 "$RSS_CSV" | tr '\n' ' ')"
echo "RSS at 1/4 (t>=${QUARTER}s): ${RSS_Q} KiB; at end: ${RSS_END} KiB; growth ${GROWTH}%"
echo "RSS after the warm-up, first vs second half of the samples: ${WINDOWS}"
echo "p99 ITL first half: ${P99_1} ms; second half: ${P99_2} ms"
echo "adapter cache: hits $(m modserve_adapter_cache_hits_total), misses $(m modserve_adapter_cache_misses_total), loads $(m modserve_adapter_loads_total), evictions $(m modserve_adapter_cache_evictions_total), resident bytes $(m modserve_adapter_cache_bytes) / $CACHE_BYTES"
echo "server: running $(m modserve_running_sequences), kv bytes $(m modserve_kv_cache_bytes), slow-client drops $(m modserve_slow_client_drops_total)"
if [ -n "${SOAK_WORK:-}" ]; then echo "work dir: $WORK (rss.csv, report_*.json, server.log)"; fi

STATUS=0
if [ "${ERRORS:-1}" != 0 ]; then
  echo "soak: FAIL: $ERRORS requests failed" >&2
  STATUS=1
fi
if awk -v g="$GROWTH" 'BEGIN { exit !(g + 0 > 20) }'; then
  echo "soak: FAIL: RSS grew ${GROWTH}% after the warm-up (limit 20%)" >&2
  STATUS=1
elif awk -v g="$GROWTH" 'BEGIN { exit !(g + 0 > 10 || g + 0 < -10) }'; then
  echo "soak: note: RSS moved ${GROWTH}% after the warm-up (flat = within 10%)" >&2
else
  echo "RSS flat after the warm-up (within 10%)"
fi
if [ -z "${SOAK_WORK:-}" ]; then
  if [ "$STATUS" = 0 ]; then rm -rf "$WORK"; else echo "soak: kept $WORK (rss.csv, report_*.json, server.log)" >&2; fi
fi
exit "$STATUS"
