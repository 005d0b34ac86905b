#!/bin/bash
# Step 3, ON the GPU machine: unpack the staged parts (.gpu/part* of this checkout: model, stripped
# binaries, tests/fixtures/parity) into $STAGE (default ${TMPDIR:-/tmp}/stage), run the parity
# tests on cuda:0, then the in-process bench on the GPU; results go to $OUT (required).
# The test binaries read the fixtures from the checkout they were built in and start the
# `modserve` of their target folder (paths compiled in by build_offline.sh): both are recreated
# here, at $BUILD_ROOT (default: this checkout) and $BUILD_TARGET_DIR (default
# $BUILD_ROOT/target/cuda, build_offline.sh's default). Set them to the build machine's paths
# when those differ from this machine's.
set -u
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
: "${OUT:?set OUT to the folder that receives the results}"
BUILD_ROOT="${BUILD_ROOT:-$ROOT}"
BIN_DIR="${BUILD_TARGET_DIR:-$BUILD_ROOT/target/cuda}/release"
S="${STAGE:-${TMPDIR:-/tmp}/stage}"; mkdir -p "$S"; cp "$ROOT"/.gpu/part* "$S"/ 2>/dev/null
cat "$S"/part* | tar xf - -C "$S" || { ls -la "$S"; exit 3; }
xz -d -f "$S"/bin/*.xz; chmod +x "$S"/bin/*
mkdir -p "$BUILD_ROOT/tests/fixtures" "$BIN_DIR"
cp -r "$S/repo/tests/fixtures/parity" "$BUILD_ROOT/tests/fixtures/"
cp "$S/bin/modserve" "$BIN_DIR/modserve"
export MODSERVE_MODEL=$S/SmolLM2-135M-Instruct.Q4_1.gguf MODSERVE_TEST_DEVICE=cuda:0 RUST_BACKTRACE=0
cd "$BUILD_ROOT"
( time timeout 200 "$S/bin/parity_adapters" --test-threads 1 ) > "$OUT/parity_adapters.txt" 2>&1; grep -v "^ *[0-9]*: " "$OUT/parity_adapters.txt" | tail -30
( time timeout 120 "$BIN_DIR/modserve" bench --device cuda:0 --model "$MODSERVE_MODEL" --new-tokens 32 --streams 32 --scenarios single,base32,lora32,sft32,poly32 --work-dir "$S/mbw" --json "$OUT/bench.json" ) > "$OUT/bench.txt" 2>&1; grep -v "^ *[0-9]*: \|INFO" "$OUT/bench.txt" | tail -12
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv
