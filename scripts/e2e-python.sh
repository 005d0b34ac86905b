#!/usr/bin/env bash
# End-to-end test from Python grpcio, a gRPC client this project did not write: creates a venv,
# pip-installs grpcio and friends, generates Python stubs from proto/modserve/v1/modserve.proto,
# starts `modserve serve` on a free loopback port with the parity adapter kit, waits for the health
# service to report SERVING, and runs tests/python/test_e2e.py (health, reflection, Adapters.List,
# streamed generations with a LoRA and a Poly route checked against HF transformers + PEFT tokens,
# NOT_FOUND for an unknown module), then tests/python/test_openai.py against the OpenAI-compatible
# HTTP API of the same server with the official `openai` package (chat and completions, streamed
# and not, base / LoRA / named composition / expression / Poly route equal to gRPC, errors) and
# the stock grpcio-reflection (v1alpha) client. Both run twice: against a server with
# `--weights f32` (the kit's tokens exactly) and one with the default `--weights quantized` (the
# kit's first token in our top 5, every delta moving the logprobs, HTTP equal to gRPC). The server
# is always stopped. Exits non-zero on any failure.
#
# Needs: python3 (with venv + pip) and network access to PyPI; cargo when the binary is missing.
# Environment:
#   MODSERVE_MODEL      model file (default models/SmolLM2-135M-Instruct.Q4_1.gguf, fetched with
#                       `modserve fetch-model` when missing)
#   MODSERVE_BIN        server binary (default target/debug/modserve, built with `cargo build`)
#   PY_E2E_VENV         venv folder (default target/py-e2e/venv; reused when already set up)
#   PY_E2E_READY_TIMEOUT seconds to wait for SERVING (default 120)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

PYTHON=${PYTHON:-python3}
VENV=${PY_E2E_VENV:-$ROOT/target/py-e2e/venv}
BIN=${MODSERVE_BIN:-$ROOT/target/debug/modserve}
MODEL=${MODSERVE_MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
READY_TIMEOUT=${PY_E2E_READY_TIMEOUT:-120}
# Versions that resolve together on PyPI (grpcio-tools 1.76 needs protobuf >= 6.31.1, < 7).
PY_PKGS=(grpcio==1.76.0 grpcio-tools==1.76.0 grpcio-health-checking==1.76.0 grpcio-reflection==1.76.0 protobuf==6.33.5 openai==3.57.0)

log() { echo "e2e-python: $*" >&2; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/modserve-py-e2e.XXXXXX")
SERVER_PID=""
cleanup() {
  local rc=$?
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  if [[ $rc -ne 0 && -s "$WORK/server.log" ]]; then
    log "server log (last 40 lines):"
    tail -n 40 "$WORK/server.log" >&2 || true
  fi
  rm -rf "$WORK"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# (a) Python environment.
if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c 'import grpc, grpc_tools, grpc_health, grpc_reflection, openai' 2>/dev/null; then
  log "creating venv $VENV"
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  if "$PYTHON" -m venv "$VENV" 2>"$WORK/venv.err"; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PY_PKGS[@]}"
  else
    # Debian's python3 without python3-venv has no ensurepip: make the venv without pip and
    # install into it with the system pip (`pip --python`, pip >= 22.3).
    log "venv with pip failed ($(tail -n 1 "$WORK/venv.err")); using the system pip"
    rm -rf "$VENV"
    "$PYTHON" -m venv --without-pip "$VENV"
    "$PYTHON" -m pip --python "$VENV/bin/python" install --quiet --disable-pip-version-check "${PY_PKGS[@]}"
  fi
fi
PY="$VENV/bin/python"
"$PY" -c 'import grpc, google.protobuf; print("e2e-python: grpcio", grpc.__version__, "protobuf", google.protobuf.__version__)' >&2

# (b) Stubs from the proto.
STUBS="$WORK/stubs"
mkdir -p "$STUBS"
"$PY" -m grpc_tools.protoc -I proto --python_out="$STUBS" --grpc_python_out="$STUBS" proto/modserve/v1/modserve.proto

# (c) Binary, model, server.
if [[ ! -x "$BIN" ]]; then
  log "building $BIN"
  cargo build --quiet --bin modserve
fi
if [[ ! -f "$MODEL" && -z "${MODSERVE_MODEL:-}" ]]; then
  log "fetching the model"
  "$BIN" fetch-model >&2
fi
[[ -f "$MODEL" ]] || { log "model $MODEL not found"; exit 1; }

run_mode() {  # run_mode f32|quantized: one server with those weights, both test files
  # A free port for /metrics (picked by binding port 0, then released).
  METRICS_PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
  NO_COLOR=1 "$BIN" serve --listen 127.0.0.1:0 --metrics-listen "127.0.0.1:$METRICS_PORT" \
    --http-listen 127.0.0.1:0 --state-dir "$WORK/state-$1" \
    --adapter-root tests/fixtures/parity --model "$MODEL" --weights "$1" --threads 2 \
    >"$WORK/server.out" 2>"$WORK/server.log" &
  SERVER_PID=$!

  ADDR=""
  for _ in $(seq 300); do  # up to 30 s for the bind
    ADDR=$(sed -n 's/^modserve listening on \(.*\)$/\1/p' "$WORK/server.out" | head -n 1)
    [[ -n "$ADDR" ]] && break
    kill -0 "$SERVER_PID" 2>/dev/null || { log "server exited before listening"; exit 1; }
    sleep 0.1
  done
  [[ -n "$ADDR" ]] || { log "server did not print its address"; exit 1; }
  HTTP_ADDR=""
  for _ in $(seq 100); do
    HTTP_ADDR=$(sed -n 's/^modserve http listening on \(.*\)$/\1/p' "$WORK/server.out" | head -n 1)
    [[ -n "$HTTP_ADDR" ]] && break
    sleep 0.1
  done
  [[ -n "$HTTP_ADDR" ]] || { log "server did not print its HTTP address"; exit 1; }
  log "server pid $SERVER_PID on $ADDR; waiting for SERVING (up to ${READY_TIMEOUT}s)"

  "$PY" - "$ADDR" "$READY_TIMEOUT" "$SERVER_PID" <<'EOF'
import os, sys, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
addr, timeout, pid = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(addr))
deadline = time.monotonic() + timeout
last = None
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("e2e-python: server exited while loading")
    try:
        last = stub.Check(health_pb2.HealthCheckRequest(service="modserve.v1.Inference"), timeout=2).status
        if last == health_pb2.HealthCheckResponse.SERVING:
            sys.exit(0)
    except grpc.RpcError as e:
        last = e.code()
    time.sleep(0.25)
sys.exit(f"e2e-python: not SERVING after {timeout}s (last: {last})")
EOF

  # (d) The tests.
  "$PY" tests/python/test_e2e.py --target "$ADDR" --stubs "$STUBS" --cases tests/fixtures/parity/cases.json --weights "$1"
  "$PY" tests/python/test_openai.py --grpc "$ADDR" --http "$HTTP_ADDR" --stubs "$STUBS" --cases tests/fixtures/parity/cases.json --weights "$1"
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
}

# f32 reproduces the kit exactly; quantized (the default mode users run) checks the same
# protocol behaviour with the looser parity of tests/parity_adapters.rs.
for weights in f32 quantized; do
  log "=== --weights $weights"
  run_mode "$weights"
done
