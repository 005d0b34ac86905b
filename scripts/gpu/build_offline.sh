#!/bin/bash
# Step 2 of the offline CUDA build: on the build machine (no nvcc), with the kernels of step 1
# unpacked into $CANDLE_PREBUILT (default ${TMPDIR:-/tmp}/cudak: ptx/*.ptx, moe/libmoe.a,
# libcudart.so*). Builds `modserve` and the parity test binaries with `--features cuda` into
# $CARGO_TARGET_DIR (default target/cuda of this checkout), using patched copies of candle-core
# (cudarc loads the CUDA libraries at run time instead of linking them) and candle-kernels (its
# build script takes the prebuilt kernels instead of calling nvcc), made once in $CANDLE_VENDOR_DIR
# (default ${TMPDIR:-/tmp}/cudavend) from the cargo registry ($CARGO_HOME, default ~/.cargo).
# The patches go in through `--config`, so the repository's Cargo.toml and Cargo.lock are untouched
# (cargo rewrites Cargo.lock during the build; `git checkout Cargo.lock` afterwards).
# The test binaries remember this checkout's path and the target folder (CARGO_MANIFEST_DIR,
# CARGO_BIN_EXE_modserve): run_checks_on_gpu_host.sh recreates both on the GPU machine.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
TMP="${TMPDIR:-/tmp}"
export CANDLE_PREBUILT=${CANDLE_PREBUILT:-$TMP/cudak} CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target/cuda} CUDARC_CUDA_VERSION=13000
V=${CANDLE_VENDOR_DIR:-$TMP/cudavend}; R=$(echo "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/)
if [ ! -d "$V/candle-core" ]; then
  mkdir -p "$V"
  cp -r "$R/candle-kernels-0.11.1" "$V/candle-kernels"
  cp -r "$R/candle-core-0.11.1" "$V/candle-core"
  cp scripts/gpu/candle-kernels-prebuilt-build.rs "$V/candle-kernels/build.rs"
  sed -i '/^\[build-dependencies.cudaforge\]/,+1d' "$V/candle-kernels/Cargo.toml"
  sed -i 's/"dynamic-linking",/"dynamic-loading",/' "$V/candle-core/Cargo.toml"
fi
P=(--config "patch.crates-io.candle-core.path=\"$V/candle-core\"" --config "patch.crates-io.candle-kernels.path=\"$V/candle-kernels\"")
cargo build --release --features cuda --bin modserve "${P[@]}"
cargo test --release --features cuda --test parity_base --test parity_adapters --no-run "${P[@]}"
git checkout Cargo.lock
