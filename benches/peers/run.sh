#!/usr/bin/env bash
# modserve and its peers side by side, in one run, on this machine: prints ONE markdown table
# `| figure | modserve | peer | ratio |` (ratio = modserve / peer, higher is better for modserve)
# with the CPU model and the date, and keeps every raw output in OUT_DIR.
#
# Usage: benches/peers/run.sh [OUT_DIR]     (default: a new folder under ${TMPDIR:-/tmp})
# Needs benches/peers/setup.sh first (same PEERS_DIR).
#
# Figures, all on the same GGUF (models/SmolLM2-135M-Instruct.Q4_1.gguf), THREADS threads,
# greedy, NEW_TOKENS new tokens per request, 32 rank-8 LoRAs on all 7 projections:
#   single        `modserve bench --scenarios single` vs `llama-bench -p 0 -n NEW_TOKENS`, decode tok/s,
#                 SINGLE_ROUNDS interleaved rounds, the best of each side
#   server base   `modserve serve` + `modserve loadgen` (gRPC, mix base32) vs `llama-server -np 32`
#                 driven by stream_driver.py; 32 closed-loop streams
#   server LoRA   the same with each request on one of the 32 LoRAs, uniformly at random: modserve
#                 over the PEFT adapters (adapter root), llama-server over their GGUF conversions
#                 (--lora ... --lora-init-without-apply, "lora": [{"id": i, "scale": 1.0}])
#   same client   (SAME_CLIENT=1) both servers driven by stream_driver.py over HTTP, base and LoRA
#   batch         `modserve bench --scenarios base32,lora32` (in-process) vs transformers and PEFT's
#                 mixed-adapter batch (peft_bench.py), batch 32
# Environment:
#   MODSERVE_BIN   modserve binary (default target/release/modserve)
#   MODSERVE_MODEL the GGUF (default models/SmolLM2-135M-Instruct.Q4_1.gguf)
#   PEERS_DIR      what setup.sh made (default ${TMPDIR:-/tmp}/modserve-peers)
#   THREADS        compute threads of every system (default 2)
#   NEW_TOKENS     new tokens per request (default 128)
#   STREAMS        concurrent streams / batch size (default 32)
#   WARMUP, WINDOW seconds of unmeasured load, then of measured window, per server run (20, 60)
#   SINGLE_ROUNDS  interleaved rounds of the single-stream figure (default 2)
#   SAME_CLIENT    1 (default): also drive modserve's OpenAI HTTP API with stream_driver.py
#   FIGURES        which to run (default "single server batch")
#   WAIT_BUSY, WAIT_MAX  before each measurement, wait (at most WAIT_MAX s, default 600) until the
#                  machine's other processes use less than WAIT_BUSY (default 0.25) of its CPU
#   PEER_TIMEOUT   seconds peft_bench.py may run before its rows say "failed" (default 1800)
#   QUICK=1        a fast check of the script: NEW_TOKENS 32, WARMUP 5, WINDOW 15, one round,
#                  llama-bench -r 1 (its numbers are not for publishing)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
cd "$ROOT"
TMP="${TMPDIR:-/tmp}"
PEERS_DIR="${PEERS_DIR:-$TMP/modserve-peers}"
BIN="${MODSERVE_BIN:-target/release/modserve}"
MODEL="${MODSERVE_MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
THREADS="${THREADS:-2}"
STREAMS="${STREAMS:-32}"
N_LORAS=32
QUICK="${QUICK:-0}"
if [[ "$QUICK" == 1 ]]; then
  NEW_TOKENS="${NEW_TOKENS:-32}"; WARMUP="${WARMUP:-5}"; WINDOW="${WINDOW:-15}"; SINGLE_ROUNDS="${SINGLE_ROUNDS:-1}"; BENCH_REPS=1
else
  NEW_TOKENS="${NEW_TOKENS:-128}"; WARMUP="${WARMUP:-20}"; WINDOW="${WINDOW:-60}"; SINGLE_ROUNDS="${SINGLE_ROUNDS:-2}"; BENCH_REPS=5
fi
SAME_CLIENT="${SAME_CLIENT:-1}"
PEER_TIMEOUT="${PEER_TIMEOUT:-1800}"
FIGURES=" ${FIGURES:-single server batch} "
OUT="${1:-$(mktemp -d "$TMP/modserve-peers-run.XXXXXX")}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

T0=$SECONDS
say() { printf 'peers [%4ds]: %s\n' "$((SECONDS - T0))" "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }
need() { [[ -e "$1" ]] || die "$1 missing: $2"; }
fig() { [[ "$FIGURES" == *" $1 "* ]]; }
# quiet LABEL: waits (up to WAIT_MAX s) until the other processes of the machine use less than
# WAIT_BUSY of its CPU time (sampled over 3 s), so that no figure is taken while a build runs
# beside it; logs what it saw to OUT/quiet.log.
WAIT_BUSY="${WAIT_BUSY:-0.25}"
WAIT_MAX="${WAIT_MAX:-600}"
busy() { python3 - <<'PY'
import time
def snap():
    v = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return sum(v), v[3] + v[4]
t0, i0 = snap(); time.sleep(3); t1, i1 = snap()
print(f"{1 - (i1 - i0) / max(1, t1 - t0):.2f}")
PY
}
quiet() {
  local waited=0 b
  while :; do
    b="$(busy)"
    if python3 -c "import sys; sys.exit(0 if $b < $WAIT_BUSY else 1)"; then break; fi
    if ((waited >= WAIT_MAX)); then say "$1: the machine is still busy ($b of its CPU) after ${WAIT_MAX}s; measuring anyway"; break; fi
    ((waited == 0)) && say "$1: the machine is busy ($b of its CPU used by other processes); waiting up to ${WAIT_MAX}s"
    sleep 7; waited=$((waited + 10))
  done
  echo "$(date -u +%H:%M:%S) before $1: others' CPU share $b, waited ${waited}s, load $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/quiet.log"
  python3 -c "import sys; sys.exit(0 if $b < $WAIT_BUSY else 1)" || echo "$1 (others used $b of the CPU just before)" >>"$OUT/disturbed.txt"
}
# after LABEL: the same sample right after a measurement (its own processes idle or gone).
after() {
  local b; b="$(busy)"
  echo "$(date -u +%H:%M:%S) after $1: others' CPU share $b, load $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/quiet.log"
  python3 -c "import sys; sys.exit(0 if $b < $WAIT_BUSY else 1)" || echo "$1 (others used $b of the CPU just after)" >>"$OUT/disturbed.txt"
}

LLAMA="$PEERS_DIR/build/bin"
PY="$PEERS_DIR/venv/bin/python"
HF="$PEERS_DIR/hf"
PEFT="$PEERS_DIR/peft"
LG="$PEERS_DIR/lora-gguf"
last=$((N_LORAS - 1))
need "$BIN" "build modserve (cargo build --release) or set MODSERVE_BIN"
need "$MODEL" "run \`modserve fetch-model\` or set MODSERVE_MODEL"
SETUP="run benches/peers/setup.sh $PEERS_DIR"
if fig single || fig server; then
  need "$LLAMA/llama-bench" "$SETUP (step build)"
  need "$LLAMA/llama-server" "$SETUP (step build)"
fi
need "$PY" "$SETUP (step venv)"
need "$HF/config.json" "$SETUP (step hf)"
if fig server || fig batch; then
  need "$PEFT/lora$last/a$last/adapter_model.safetensors" "$SETUP (step adapters)"
fi
if fig server; then
  need "$LG/lora$last.gguf" "$SETUP (step gguf-loras)"
fi
[[ -x "$BIN" ]] || die "$BIN is not executable"
"$PY" -c "import torch, transformers, peft" 2>/dev/null || die "$PY lacks torch/transformers/peft: run setup.sh (step venv)"

RESULTS="$OUT/results.tsv"
: >"$RESULTS"
: >"$OUT/disturbed.txt"
# result FIGURE MODSERVE PEER NOTE: one row of the table.
result() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$RESULTS"; say "$1: modserve $2, peer $3"; }
jget() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {"d": d}))' "$@"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
stop() { kill -TERM "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

{
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "cpu: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), $(nproc) cores visible; threads per system: $THREADS"
  echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "modserve: $BIN ($("$BIN" --version)); model $MODEL ($(sha256sum "$MODEL" | cut -c1-12))"
  echo "llama.cpp: $({ "$LLAMA/llama-bench" --version 2>&1 || true; } | grep -m1 version || echo "not built"), built with AMX off (setup.sh)"
  echo "python peers: $("$PY" -c 'import torch, transformers, peft; print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")')"
  echo "settings: NEW_TOKENS=$NEW_TOKENS STREAMS=$STREAMS WARMUP=${WARMUP}s WINDOW=${WINDOW}s SINGLE_ROUNDS=$SINGLE_ROUNDS SAME_CLIENT=$SAME_CLIENT QUICK=$QUICK"
} >"$OUT/header.txt"
cat "$OUT/header.txt" >&2

# ---- single stream ----------------------------------------------------------------------------
if fig single; then
  ms_best=0; ll_best=0
  for ((r = 1; r <= SINGLE_ROUNDS; r++)); do
    quiet "single modserve $r"
    say "single: modserve bench --scenarios single (round $r)"
    "$BIN" bench --threads "$THREADS" --model "$MODEL" --weights quantized --scenarios single --new-tokens "$NEW_TOKENS" \
      --json "$OUT/single-modserve-$r.json" >"$OUT/single-modserve-$r.txt" 2>"$OUT/single-modserve-$r.log" \
      || { tail -5 "$OUT/single-modserve-$r.log" >&2; die "modserve bench single failed"; }
    after "single modserve $r"
    ms="$(jget "$OUT/single-modserve-$r.json" '[x for x in d["rows"] if x["scenario"]=="single"][0]["tok_s"]')"
    quiet "single llama-bench $r"
    say "single: llama-bench -p 0 -n $NEW_TOKENS -t $THREADS -r $BENCH_REPS (round $r)"
    "$LLAMA/llama-bench" -m "$MODEL" -p 0 -n "$NEW_TOKENS" -t "$THREADS" -r "$BENCH_REPS" -o json \
      >"$OUT/single-llama-bench-$r.json" 2>"$OUT/single-llama-bench-$r.log" \
      || { tail -5 "$OUT/single-llama-bench-$r.log" >&2; die "llama-bench failed"; }
    after "single llama-bench $r"
    ll="$(jget "$OUT/single-llama-bench-$r.json" '[x for x in d if x["n_gen"]>0][0]["avg_ts"]')"
    say "single round $r: modserve $ms tok/s, llama-bench $ll tok/s"
    ms_best="$(python3 -c "print(max($ms_best, $ms))")"; ll_best="$(python3 -c "print(max($ll_best, $ll))")"
  done
  result "single stream, decode tok/s ($NEW_TOKENS new tokens; best of $SINGLE_ROUNDS rounds)" "$ms_best" "$ll_best" \
    "modserve bench single vs llama-bench tg$NEW_TOKENS"
fi

# ---- servers ----------------------------------------------------------------------------------
# wait_http URL PID LOG: until URL answers 200 (the server is ready).
wait_http() {
  for _ in $(seq 1 600); do
    kill -0 "$2" 2>/dev/null || { tail -20 "$3" >&2; die "the server exited (log $3)"; }
    python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$1" 2>/dev/null && return 0
    sleep 0.5
  done
  die "the server at $1 did not get ready (log $3)"
}
# llama_server NAME [ARGS...]: starts llama-server, sets LLAMA_PID and LLAMA_URL.
llama_server() {
  local name="$1"; shift
  local port; port="$(free_port)"
  say "server: llama-server -np $STREAMS -c 8192 -t $THREADS $* (port $port)"
  "$LLAMA/llama-server" -m "$MODEL" -np "$STREAMS" -c 8192 -t "$THREADS" --host 127.0.0.1 --port "$port" "$@" \
    >"$OUT/$name.log" 2>&1 &
  LLAMA_PID=$!; PIDS+=("$LLAMA_PID")
  LLAMA_URL="http://127.0.0.1:$port"
  wait_http "$LLAMA_URL/health" "$LLAMA_PID" "$OUT/$name.log"
}
# drive NAME URL API [ARGS...]: stream_driver.py, prints its tok/s.
drive() {
  local name="$1" url="$2" api="$3"; shift 3
  quiet "$name"
  say "server: stream_driver.py $name ($STREAMS streams, ${WARMUP}s warm-up, ${WINDOW}s window)"
  "$PY" "$HERE/stream_driver.py" --url "$url" --api "$api" --concurrency "$STREAMS" --new-tokens "$NEW_TOKENS" \
    --warmup "$WARMUP" --window "$WINDOW" --report "$OUT/$name.json" "$@" >/dev/null 2>"$OUT/$name.err" \
    || { cat "$OUT/$name.err" >&2; die "stream_driver.py $name failed (report $OUT/$name.json)"; }
  after "$name"
  jget "$OUT/$name.json" 'd["tok_s"]'
}
# loadgen MIX: modserve loadgen over gRPC, prints its tok/s.
loadgen() {
  local mix="$1"
  quiet "loadgen $mix"
  say "server: modserve loadgen $mix (gRPC, $STREAMS streams, ${WARMUP}s warm-up, ${WINDOW}s window)"
  "$BIN" loadgen --protocol grpc --target "http://$MS_ADDR" --concurrency "$STREAMS" --warmup "${WARMUP}s" \
    --duration "${WINDOW}s" --grace 900s --mix "$OUT/loadgen-$mix.mix.json" --report "$OUT/loadgen-$mix.json" --quiet \
    >/dev/null 2>"$OUT/loadgen-$mix.log" || { tail -5 "$OUT/loadgen-$mix.log" >&2; die "loadgen $mix failed"; }
  after "loadgen $mix"
  local bad; bad="$(jget "$OUT/loadgen-$mix.json" 'd["requests"]["errors"] + d["requests"]["cancelled"]')"
  [[ "$bad" == 0 ]] || die "loadgen $mix: $bad requests failed or were cancelled (report $OUT/loadgen-$mix.json)"
  # Tokens that arrived inside the window, as stream_driver.py counts them (not the requests
  # started in it: equal-length streams run in waves, and whole waves moved that by a fifth).
  jget "$OUT/loadgen-$mix.json" 'd["window_tokens_per_s"]'
}

if fig server; then
  # modserve's adapter root: the same 32 PEFT adapters, one module folder each (hard links).
  AROOT="$OUT/adapter-root"
  rm -rf "$AROOT"
  ids=()
  for ((i = 0; i < N_LORAS; i++)); do
    id="$(printf 'lora_%03d' "$i")"; mkdir -p "$AROOT/$id"
    for f in adapter_config.json adapter_model.safetensors; do
      ln "$PEFT/lora$i/a$i/$f" "$AROOT/$id/$f" 2>/dev/null || cp "$PEFT/lora$i/a$i/$f" "$AROOT/$id/$f"
    done
    ids+=("$id")
  done
  IDS_CSV="$(IFS=,; echo "${ids[*]}")"
  entry() { printf '{"name": "%s", "prompt": "Write a short note about topic number 1:", "max_new_tokens": %d, "min_new_tokens": %d}' "$1" "$NEW_TOKENS" "$NEW_TOKENS"; }
  printf '{"entries": [%s]}\n' "$(entry base)" >"$OUT/loadgen-base32.mix.json"
  printf '{"entries": [%s], "zipf": {"s": 0.0, "modules": [%s]}}\n' "$(entry lora)" \
    "$(printf '"%s",' "${ids[@]}" | sed 's/,$//')" >"$OUT/loadgen-lora32.mix.json"

  # 1. llama-server, base.
  llama_server llama-server-base
  ll_base="$(drive llama-server-base "$LLAMA_URL" llama)"
  stop "$LLAMA_PID"

  # 2. modserve serve: base, then LoRAs; gRPC loadgen, then the same client as llama-server's.
  say "server: modserve serve --threads $THREADS --adapter-root $AROOT"
  "$BIN" serve --threads "$THREADS" --model "$MODEL" --adapter-root "$AROOT" --listen 127.0.0.1:0 --metrics-listen "" \
    --http-listen 127.0.0.1:0 --state-dir "$OUT/modserve-state" >"$OUT/modserve-server.out" 2>"$OUT/modserve-server.log" &
  MS_PID=$!; PIDS+=("$MS_PID")
  MS_ADDR=""; MS_HTTP=""
  for _ in $(seq 1 1200); do
    kill -0 "$MS_PID" 2>/dev/null || { tail -20 "$OUT/modserve-server.log" >&2; die "modserve serve exited"; }
    [[ -n "$MS_ADDR" ]] || MS_ADDR="$(sed -n 's/^modserve listening on //p' "$OUT/modserve-server.out" | head -1)"
    [[ -n "$MS_ADDR" ]] && grep -q "model ready: serving" "$OUT/modserve-server.log" && break
    sleep 0.1
  done
  grep -q "model ready: serving" "$OUT/modserve-server.log" || die "modserve serve did not get ready (log $OUT/modserve-server.log)"
  MS_HTTP="$(sed -n 's/^modserve http listening on //p' "$OUT/modserve-server.out" | head -1)"
  ms_base="$(loadgen base32)"
  [[ "$SAME_CLIENT" == 1 ]] && ms_base_http="$(drive modserve-http-base "http://$MS_HTTP" openai --model base)"
  ms_lora="$(loadgen lora32)"
  [[ "$SAME_CLIENT" == 1 ]] && ms_lora_http="$(drive modserve-http-lora "http://$MS_HTTP" openai --modules "$IDS_CSV")"
  stop "$MS_PID"

  # 3. llama-server with the 32 GGUF LoRAs, one per request.
  lora_args=()
  for ((i = 0; i < N_LORAS; i++)); do lora_args+=(--lora "$LG/lora$i.gguf"); done
  llama_server llama-server-lora "${lora_args[@]}" --lora-init-without-apply
  python3 -c 'import json, sys, urllib.request; a = json.load(urllib.request.urlopen(sys.argv[1] + "/lora-adapters")); print(json.dumps(a))' \
    "$LLAMA_URL" >"$OUT/llama-server-lora-adapters.json"
  n_loaded="$(jget "$OUT/llama-server-lora-adapters.json" 'len(d)')"
  [[ "$n_loaded" == "$N_LORAS" ]] || die "llama-server loaded $n_loaded LoRAs, not $N_LORAS (log $OUT/llama-server-lora.log)"
  ll_lora="$(drive llama-server-lora "$LLAMA_URL" llama --loras "$N_LORAS")"
  stop "$LLAMA_PID"

  result "server, $STREAMS streams base, tok/s (modserve loadgen gRPC; llama-server -np $STREAMS)" "$ms_base" "$ll_base" ""
  result "server, $STREAMS streams, each on one of $N_LORAS LoRAs, tok/s (same)" "$ms_lora" "$ll_lora" ""
  if [[ "$SAME_CLIENT" == 1 ]]; then
    result "server, $STREAMS streams base, tok/s, same client (stream_driver.py over HTTP, both)" "$ms_base_http" "$ll_base" ""
    result "server, $STREAMS streams on $N_LORAS LoRAs, tok/s, same client (same)" "$ms_lora_http" "$ll_lora" ""
  fi
  result "server, LoRA mix / base (gRPC loadgen; llama-server)" \
    "$(python3 -c "print(round($ms_lora / $ms_base, 3))")" "$(python3 -c "print(round($ll_lora / $ll_base, 3))")" ""
fi

# ---- in-process batch -------------------------------------------------------------------------
if fig batch; then
  quiet "batch modserve"
  say "batch: modserve bench --scenarios base32,lora32 --streams $STREAMS --new-tokens $NEW_TOKENS"
  "$BIN" bench --threads "$THREADS" --model "$MODEL" --weights quantized --scenarios base32,lora32 --streams "$STREAMS" \
    --new-tokens "$NEW_TOKENS" --work-dir "$PEERS_DIR/modserve-bench-work" --json "$OUT/batch-modserve.json" \
    >"$OUT/batch-modserve.txt" 2>"$OUT/batch-modserve.log" || { tail -5 "$OUT/batch-modserve.log" >&2; die "modserve bench base32,lora32 failed"; }
  after "batch modserve"
  ms_b="$(jget "$OUT/batch-modserve.json" '[x for x in d["rows"] if x["scenario"]=="base32"][0]["tok_s"]')"
  ms_l="$(jget "$OUT/batch-modserve.json" '[x for x in d["rows"] if x["scenario"]=="lora32"][0]["tok_s"]')"
  quiet "batch peft"
  say "batch: peft_bench.py batch $STREAMS, $NEW_TOKENS new tokens, $N_LORAS adapters, $THREADS threads"
  if timeout "$PEER_TIMEOUT" "$PY" "$HERE/peft_bench.py" "$HF" "$PEFT" "$STREAMS" "$NEW_TOKENS" "$N_LORAS" "$THREADS" \
    "$OUT/batch-peft.json" >"$OUT/batch-peft.txt" 2>"$OUT/batch-peft.log"; then
    after "batch peft"
    pf_b="$(jget "$OUT/batch-peft.json" 'd["base_tok_s"]')"
    pf_l="$(jget "$OUT/batch-peft.json" 'd["mixed_tok_s"]')"
  else
    tail -5 "$OUT/batch-peft.log" >&2
    say "batch: peft_bench.py failed or ran past PEER_TIMEOUT=${PEER_TIMEOUT}s: its rows say so"
    pf_b="failed"; pf_l="failed"
  fi
  result "in-process batch $STREAMS base, tok/s (modserve bench base32; transformers generate)" "$ms_b" "$pf_b" ""
  result "in-process batch $STREAMS, $N_LORAS LoRAs mixed, tok/s (modserve bench lora32; PEFT adapter_names)" "$ms_l" "$pf_l" ""
  pf_r=failed; [[ "$pf_b" == failed ]] || pf_r="$(python3 -c "print(round($pf_l / $pf_b, 3))")"
  result "in-process, LoRA mix / base" "$(python3 -c "print(round($ms_l / $ms_b, 3))")" "$pf_r" ""
fi

# ---- the table --------------------------------------------------------------------------------
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg); run took $((SECONDS - T0)) s" >>"$OUT/header.txt"
python3 - "$OUT/header.txt" "$RESULTS" "$OUT/disturbed.txt" >"$OUT/table.md" <<'PY'
import sys
print("".join(open(sys.argv[1]).readlines()).rstrip())
print()
print("| figure | modserve | peer | ratio |")
print("|---|---:|---:|---:|")
for line in open(sys.argv[2]):
    fig, ms, peer, _ = line.rstrip("\n").split("\t")
    if peer == "failed":
        print(f"| {fig} | {float(ms):.1f} | failed (see OUT_DIR) | - |")
        continue
    ms, peer = float(ms), float(peer)
    print(f"| {fig} | {ms:.1f} | {peer:.1f} | {ms / peer:.2f} |" if ms > 10 else f"| {fig} | {ms:.3f} | {peer:.3f} | {ms / peer:.2f} |")
dist = [l.strip() for l in open(sys.argv[3]) if l.strip()]
print()
if dist:
    print("Other processes were using the CPU around these measurements (their figures are suspect):")
    for l in dist:
        print(f"- {l}")
else:
    print("No other process used more than WAIT_BUSY of the CPU just before or just after any measurement.")
PY
cat "$OUT/table.md"
say "done: raw outputs in $OUT"
