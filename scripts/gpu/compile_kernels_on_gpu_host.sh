#!/bin/bash
# Step 1 of the offline CUDA build (for a build machine without nvcc): run this ON the GPU machine,
# in a checkout whose .gpu/kern holds a copy of the candle-kernels 0.11.1 crate source.
# It compiles candle-kernels' PTX and its static libmoe.a for sm_90a (H100/H200) with that
# machine's nvcc and packs them, with libcudart, into $OUT/kern.tgz.
# On a machine that has nvcc, none of this is needed: `cargo build --release --features cuda`.
set -u
export PATH=/usr/local/cuda/bin:$PATH
{ nvidia-smi; nvcc --version; } > $OUT/info.txt 2>&1
K=$PWD/.gpu/kern; P=/tmp/build/ptx; M=/tmp/build/moe; mkdir -p $P $M
cd $K
G=-gencode=arch=compute_90a,code=sm_90a
for f in affine binary cast conv fill indexing quantized reduce sort ternary unary; do
  nvcc $G --ptx --default-stream per-thread --output-directory $P --expt-relaxed-constexpr -std=c++17 -O3 src/$f.cu > $P/$f.log 2>&1 &
done
i=0
for f in src/moe/moe_gguf.cu src/moe/moe_wmma.cu src/moe/moe_wmma_gguf.cu src/mmvq_gguf.cu src/mmq_gguf/mmq_quantize.cu src/mmq_gguf/mmq_instance_*.cu; do
  i=$((i+1)); nvcc $G -c -o $M/o$i.o --default-stream per-thread --expt-relaxed-constexpr -std=c++17 -O3 -Xcompiler -fPIC $f > $M/o$i.log 2>&1 &
done
wait
ar rcs $M/libmoe.a $M/*.o
cp -L /usr/local/cuda/lib64/libcudart.so* /tmp/build/
tar czf $OUT/kern.tgz -C /tmp/build ptx moe/libmoe.a $(cd /tmp/build && ls libcudart.so*)
