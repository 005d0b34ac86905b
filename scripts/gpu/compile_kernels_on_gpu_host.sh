#!/bin/bash
# Step 1 of the offline CUDA build (for a build machine without nvcc): run this ON the GPU machine,
# in a checkout whose .gpu/kern holds a copy of the candle-kernels 0.11.1 crate source
# ($CANDLE_KERNELS_SRC to take it from elsewhere).
# It compiles candle-kernels' PTX and its static libmoe.a for sm_90a (H100/H200) with that
# machine's nvcc ($CUDA_HOME, default /usr/local/cuda) in $KERNEL_BUILD_DIR (default
# ${TMPDIR:-/tmp}/build) and packs them, with libcudart, into $OUT/kern.tgz ($OUT is required).
# On a machine that has nvcc, none of this is needed: `cargo build --release --features cuda`.
set -u
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
: "${OUT:?set OUT to the folder that receives info.txt and kern.tgz}"
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
{ nvidia-smi; nvcc --version; } > "$OUT/info.txt" 2>&1
B="${KERNEL_BUILD_DIR:-${TMPDIR:-/tmp}/build}"
K="${CANDLE_KERNELS_SRC:-$ROOT/.gpu/kern}"; P=$B/ptx; M=$B/moe; mkdir -p "$P" "$M"
cd "$K"
G=-gencode=arch=compute_90a,code=sm_90a
for f in affine binary cast conv fill indexing quantized reduce sort ternary unary; do
  nvcc $G --ptx --default-stream per-thread --output-directory "$P" --expt-relaxed-constexpr -std=c++17 -O3 src/$f.cu > "$P/$f.log" 2>&1 &
done
i=0
for f in src/moe/moe_gguf.cu src/moe/moe_wmma.cu src/moe/moe_wmma_gguf.cu src/mmvq_gguf.cu src/mmq_gguf/mmq_quantize.cu src/mmq_gguf/mmq_instance_*.cu; do
  i=$((i+1)); nvcc $G -c -o "$M/o$i.o" --default-stream per-thread --expt-relaxed-constexpr -std=c++17 -O3 -Xcompiler -fPIC $f > "$M/o$i.log" 2>&1 &
done
wait
ar rcs "$M/libmoe.a" "$M"/*.o
cp -L "$CUDA_HOME"/lib64/libcudart.so* "$B/"
tar czf "$OUT/kern.tgz" -C "$B" ptx moe/libmoe.a $(cd "$B" && ls libcudart.so*)
