#!/usr/bin/env bash
# The project's test command (README, .ci/run): fetch the reference model if needed, run every
# Rust test, validate the Kubernetes manifests offline, and run the Python grpcio end-to-end test.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --quiet -- fetch-model
cargo test --all-targets -- --test-threads="${MODSERVE_TEST_THREADS:-2}"
scripts/validate-k8s.sh
if [ -x scripts/e2e-python.sh ]; then
  scripts/e2e-python.sh
fi
