#!/usr/bin/env bash
# The benchmark sequence of docs/BENCHMARKS.md ("Current results" and the sections it refers to),
# one binary, in this order:
#   1. single stream, 128 new tokens, quantized, and llama.cpp's script: twice, interleaved;
#   2. the streams scenarios (base32, lora32, sft32, poly32), 32 new tokens: twice, with
#      transformers + PEFT's mixed-adapter batch between;
#   3. coldload, ttft_under_load, zipf1000;
#   4. f32 weights: single and the streams scenarios, 32 new tokens;
#   5. the streams scenarios with 128 new tokens: twice;
#   6. over gRPC: `modserve serve` over the bench's adapters (hard-linked flat under one root:
#      module ids lora_000.., sft_lang_0.., sft_task_0.., poly_inv), then `modserve loadgen` per mix
#      (closed loop, 32 streams, 5 s warm-up, 30 s window, 32 new tokens per request): base32,
#      lora32 (each request one of the 32 LoRAs, uniformly), sft32 (the 32 lang_i + task_j
#      compositions), poly32 (task ids 0-31); then the mixes of HTTP_MIXES (default base32 and
#      lora32) once more over the OpenAI HTTP API of the same server (`loadgen --protocol http`,
#      same requests), each right after its gRPC run, with the ratio HTTP / gRPC;
#   7. ttft_under_load once more.
# Each step prints its table; the outputs are also kept in OUT_DIR (NN-step.txt, bench rows as
# NN-step.json, loadgen reports as grpc-MIX.json).
#
# Usage: scripts/bench-all.sh [OUT_DIR]    (default: a new folder under ${TMPDIR:-/tmp})
# Environment:
#   BENCH_BIN        the modserve binary (default target/release/modserve, built first unless
#                    BENCH_NO_BUILD=1)
#   BENCH_WORK       the bench's work dir: synthetic adapters, kept and reused by later runs
#                    (default ${TMPDIR:-/tmp}/mbw)
#   BENCH_THREADS    compute threads (default 2)
#   BENCH_STEPS      the steps to run (default "1 2 3 4 5 6 7"); 6 needs the adapters of 2
#   BENCH_STREAMS, BENCH_TOKENS, BENCH_LONG_TOKENS   streams (32) and new tokens (32 and 128),
#                    smaller for a quick check of the script only
#   GRPC_WARMUP, GRPC_DURATION                       loadgen windows (5s, 30s)
#   HTTP_MIXES       the step-6 mixes also run over HTTP (default "base32 lora32"; empty: none)
#   MODSERVE_MODEL   the GGUF (default models/SmolLM2-135M-Instruct.Q4_1.gguf: `modserve fetch-model`)
# Peers (the ratios' references; see ../shared/peers/README.md for their setup). A peer step is
# skipped, with a note, when its script or inputs are missing:
#   PEERS            folder of llamacpp_bench.py and peft_bench.py (default ../shared/peers)
#   LLAMACPP_PYTHON  a Python with llama-cpp-python (default python3)
#   PEFT_PYTHON      a Python with torch, transformers and peft (default python3)
#   HF_DIR           HF export of the model for PEFT (default ${TMPDIR:-/tmp}/hf)
#   PEFT_ADAPTERS    32 PEFT LoRAs of rank 8 (default ${TMPDIR:-/tmp}/peft_adapters; made with
#                    make_peft_adapters.py when missing)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
TMP="${TMPDIR:-/tmp}"
OUT="${1:-$(mktemp -d "$TMP/modserve-bench.XXXXXX")}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="${BENCH_WORK:-$TMP/mbw}"
THREADS="${BENCH_THREADS:-2}"
STEPS=" ${BENCH_STEPS:-1 2 3 4 5 6 7} "
STREAMS="${BENCH_STREAMS:-32}"
TOKENS="${BENCH_TOKENS:-32}"
LONG_TOKENS="${BENCH_LONG_TOKENS:-128}"
MODEL="${MODSERVE_MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
PEERS="${PEERS:-$ROOT/../shared/peers}"
LLAMACPP_PYTHON="${LLAMACPP_PYTHON:-python3}"
PEFT_PYTHON="${PEFT_PYTHON:-python3}"
HF_DIR="${HF_DIR:-$TMP/hf}"
PEFT_ADAPTERS="${PEFT_ADAPTERS:-$TMP/peft_adapters}"
STREAMS_SCENARIOS=base32,lora32,sft32,poly32

say() { printf 'bench-all: %s\n' "$*" >&2; }
[[ -f "$MODEL" ]] || { say "model $MODEL missing: run \`cargo run --release -- fetch-model\` (or set MODSERVE_MODEL)"; exit 2; }
if [[ -n "${BENCH_BIN:-}" ]]; then
  BIN="$BENCH_BIN"
else
  [[ "${BENCH_NO_BUILD:-0}" == 1 ]] || { say "building release"; cargo build --release --quiet; }
  BIN=target/release/modserve
fi
[[ -x "$BIN" ]] || { say "no binary at $BIN"; exit 2; }
say "binary $BIN, work dir $WORK, outputs in $OUT"

n=0
step() { [[ "$STEPS" == *" $1 "* ]]; }
# bench NAME ARGS...: one `modserve bench` run, its table on stdout and in OUT.
bench() {
  local name="$1"; shift
  n=$((n + 1))
  local base; base="$OUT/$(printf '%02d' "$n")-$name"
  say "$name: bench $*"
  "$BIN" bench --threads "$THREADS" --model "$MODEL" --work-dir "$WORK" --json "$base.json" "$@" 2>"$base.log" | tee "$base.txt"
}
# peer NAME PYTHON SCRIPT ARGS...: one peer run, or a note when it cannot run.
peer() {
  local name="$1" py="$2" script="$PEERS/$3"; shift 3
  n=$((n + 1))
  local base; base="$OUT/$(printf '%02d' "$n")-$name"
  if [[ ! -f "$script" ]]; then say "$name: skipped ($script not found)"; return 0; fi
  say "$name: $(basename "$script") $*"
  "$py" "$script" "$@" 2>"$base.log" | tee "$base.txt" || say "$name: FAILED (see $base.log)"
}
peft_ready() {
  [[ -d "$HF_DIR" ]] || { say "peft: skipped (no HF export of the model at $HF_DIR; see $PEERS/README.md)"; return 1; }
  if [[ ! -d "$PEFT_ADAPTERS/lora0" && -f "$PEERS/make_peft_adapters.py" ]]; then
    say "peft: making 32 rank-8 adapters in $PEFT_ADAPTERS"
    "$PEFT_PYTHON" "$PEERS/make_peft_adapters.py" "$HF_DIR" "$PEFT_ADAPTERS" 32 8 >&2 || return 1
  fi
  [[ -d "$PEFT_ADAPTERS/lora0" ]]
}

if step 1; then
  for _ in 1 2; do
    bench single --weights quantized --new-tokens "$LONG_TOKENS" --scenarios single
    peer llamacpp "$LLAMACPP_PYTHON" llamacpp_bench.py "$MODEL" "$LONG_TOKENS" "$THREADS"
  done
fi
if step 2; then
  bench streams --weights quantized --new-tokens "$TOKENS" --streams "$STREAMS" --scenarios "$STREAMS_SCENARIOS"
  if peft_ready; then peer peft "$PEFT_PYTHON" peft_bench.py "$HF_DIR" "$PEFT_ADAPTERS" "$STREAMS" "$TOKENS" 32; fi
  bench streams --weights quantized --new-tokens "$TOKENS" --streams "$STREAMS" --scenarios "$STREAMS_SCENARIOS"
fi
if step 3; then
  bench load --scenarios coldload,ttft_under_load,zipf1000
fi
if step 4; then
  bench f32 --weights f32 --new-tokens "$TOKENS" --streams "$STREAMS" --scenarios "single,$STREAMS_SCENARIOS"
fi
if step 5; then
  for _ in 1 2; do
    bench streams-long --weights quantized --new-tokens "$LONG_TOKENS" --streams "$STREAMS" --scenarios "$STREAMS_SCENARIOS"
  done
fi

if step 6; then
  # The bench's adapters, flat under one root (the server registers the folders of its root).
  AROOT="$OUT/grpc-adapters"
  rm -rf "$AROOT"
  link_module() { # link_module SRC_DIR ID: hard links of the module's files (not the bench's marker)
    [[ -d "$1" ]] || { say "grpc: $1 missing: run step 2 first (same BENCH_WORK)"; exit 1; }
    mkdir -p "$AROOT/$2"
    ln "$1"/* "$AROOT/$2/" 2>/dev/null || cp "$1"/* "$AROOT/$2/"
  }
  lora_ids=()
  for ((i = 0; i < STREAMS; i++)); do
    id="$(printf 'lora_%03d' "$i")"; link_module "$WORK/lora_r8_all/$id" "$id"; lora_ids+=("\"$id\"")
  done
  for ((i = 0; i < 4; i++)); do link_module "$WORK/sft/lang_$i" "sft_lang_$i"; done
  for ((i = 0; i < 8; i++)); do link_module "$WORK/sft/task_$i" "sft_task_$i"; done
  link_module "$WORK/poly/inv" poly_inv

  entry() { # entry NAME EXTRA_JSON: the bench prompt, exactly TOKENS new tokens
    printf '{"name": "%s", "prompt": "Write a short note about topic number 1:", "max_new_tokens": %d, "min_new_tokens": %d%s}' "$1" "$TOKENS" "$TOKENS" "$2"
  }
  join() { local IFS=,; echo "$*"; }
  printf '{"entries": [%s]}\n' "$(entry base "")" >"$OUT/grpc-base32.mix.json"
  printf '{"entries": [%s], "zipf": {"s": 0.0, "modules": [%s]}}\n' "$(entry lora "")" "$(join "${lora_ids[@]}")" >"$OUT/grpc-lora32.mix.json"
  sft=(); poly=()
  for ((s = 0; s < STREAMS; s++)); do
    sft+=("$(entry "sft_$s" ", \"deltas\": [{\"id\": \"sft_lang_$(((s / 8) % 4))\"}, {\"id\": \"sft_task_$((s % 8))\"}]")")
    poly+=("$(entry "poly_$s" ", \"route\": {\"inventory\": \"poly_inv\", \"task\": $((s % 32))}")")
  done
  printf '{"entries": [%s]}\n' "$(join "${sft[@]}")" >"$OUT/grpc-sft32.mix.json"
  printf '{"entries": [%s]}\n' "$(join "${poly[@]}")" >"$OUT/grpc-poly32.mix.json"

  say "grpc: serve --threads $THREADS --adapter-root $AROOT"
  "$BIN" serve --threads "$THREADS" --model "$MODEL" --adapter-root "$AROOT" --listen 127.0.0.1:0 --metrics-listen "" \
    --http-listen 127.0.0.1:0 --state-dir "$OUT/grpc-state" >"$OUT/grpc-server.out" 2>"$OUT/grpc-server.log" &
  SERVER_PID=$!
  trap 'kill -TERM "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true' EXIT
  ADDR=""
  for _ in $(seq 1 1200); do
    kill -0 "$SERVER_PID" 2>/dev/null || { say "grpc: the server exited:"; tail -20 "$OUT/grpc-server.log" >&2; exit 1; }
    [[ -n "$ADDR" ]] || ADDR="$(sed -n 's/^modserve listening on //p' "$OUT/grpc-server.out" | head -1)"
    [[ -n "$ADDR" ]] && grep -q "model ready: serving" "$OUT/grpc-server.log" && break
    sleep 0.1
  done
  grep -q "model ready: serving" "$OUT/grpc-server.log" || { say "grpc: the server did not get ready"; exit 1; }
  HTTP_ADDR="$(sed -n 's/^modserve http listening on //p' "$OUT/grpc-server.out" | head -1)"
  HTTP_MIXES=" ${HTTP_MIXES-base32 lora32} "
  for mix in base32 lora32 sft32 poly32; do
    protos=grpc
    [[ "$HTTP_MIXES" == *" $mix "* ]] && protos="grpc http"
    for proto in $protos; do
      target="http://$ADDR"
      [[ "$proto" == http ]] && target="http://$HTTP_ADDR"
      say "$proto: loadgen $mix"
      "$BIN" loadgen --protocol "$proto" --target "$target" --concurrency "$STREAMS" --warmup "${GRPC_WARMUP:-5s}" \
        --duration "${GRPC_DURATION:-30s}" --mix "$OUT/grpc-$mix.mix.json" --report "$OUT/$proto-$mix.json" --quiet >/dev/null
      python3 - "$proto" "$mix" "$OUT/$proto-$mix.json" "$OUT/grpc-$mix.json" <<'PY'
import json, sys
proto, mix, path, grpc_path = sys.argv[1:5]
r = json.load(open(path))
q = r["requests"]
# window_tokens_per_s: every token that arrived inside the window (what benches/peers counts).
line = (f"{proto} {mix}: {r['window_tokens_per_s']:.1f} tok/s in the window "
        f"({r['output_tokens_per_s']:.1f} by finished requests), ok {q['ok']}, errors {q['errors']}, "
        f"TTFT p50/p99 {r['ttft_ms']['p50']}/{r['ttft_ms']['p99']} ms, ITL p50/p99 {r['itl_ms']['p50']}/{r['itl_ms']['p99']} ms")
if proto == "http":
    g = json.load(open(grpc_path))["window_tokens_per_s"]
    line += f" | HTTP / gRPC = {r['window_tokens_per_s'] / g:.3f}" if g else ""
print(line)
PY
    done
  done
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  trap - EXIT
fi

if step 7; then
  bench ttft --scenarios ttft_under_load
fi
say "done: $OUT"
