#!/usr/bin/env bash
# The project's test command (README, .ci/run): fetch the reference model if needed, check the
# layout rules (formatting, clippy with warnings as errors, no import cycles, `unsafe` only in
# src/kernels, no file over 600 lines), run every Rust test, validate the Kubernetes manifests
# offline, run the Python grpcio end-to-end test and a 60-second soak through the load generator.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --check
python3 scripts/module_graph.py --check >/dev/null
cargo run --quiet -- fetch-model
cargo clippy --quiet --all-targets -- -D warnings
cargo test --all-targets -- --test-threads="${MODSERVE_TEST_THREADS:-2}"
scripts/validate-k8s.sh
scripts/e2e-python.sh
cargo build --quiet
SOAK_SHORT=1 SOAK_BIN=target/debug/modserve scripts/soak.sh
