#!/bin/bash
# Step 3, ON the GPU machine: unpack the staged parts (model, stripped binaries, tests/fixtures/parity),
# run the parity tests on cuda:0, then the in-process bench on the GPU.
set -u
S=/root/stage; mkdir -p $S; cp .gpu/part* $S/ 2>/dev/null
cat $S/part* | tar xf - -C $S || { ls -la $S; exit 3; }
xz -d -f $S/bin/*.xz; chmod +x $S/bin/*
mkdir -p /work/main/tests/fixtures /tmp/tgt-cuda/release
cp -r $S/repo/tests/fixtures/parity /work/main/tests/fixtures/
cp $S/bin/modserve /tmp/tgt-cuda/release/modserve
export MODSERVE_MODEL=$S/SmolLM2-135M-Instruct.Q4_1.gguf MODSERVE_TEST_DEVICE=cuda:0 RUST_BACKTRACE=0
cd /work/main
( time timeout 200 $S/bin/parity_adapters --test-threads 1 ) > $OUT/parity_adapters.txt 2>&1; grep -v "^ *[0-9]*: " $OUT/parity_adapters.txt | tail -30
( time timeout 120 /tmp/tgt-cuda/release/modserve bench --device cuda:0 --model $MODSERVE_MODEL --new-tokens 32 --streams 32 --scenarios single,base32,lora32,sft32,poly32 --work-dir /tmp/mbw --json $OUT/bench.json ) > $OUT/bench.txt 2>&1; grep -v "^ *[0-9]*: \|INFO" $OUT/bench.txt | tail -12
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv
