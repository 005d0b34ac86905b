#!/usr/bin/env bash
# The project's test command (README, .ci/run): fetch the reference model if needed, run every
# Rust test, validate the Kubernetes manifests offline, run the Python grpcio end-to-end test and a
# 60-second soak through the load generator.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --quiet -- fetch-model
cargo test --all-targets -- --test-threads="${MODSERVE_TEST_THREADS:-2}"
scripts/validate-k8s.sh
scripts/e2e-python.sh
cargo build --quiet
SOAK_SHORT=1 SOAK_BIN=target/debug/modserve scripts/soak.sh
