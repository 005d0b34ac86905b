#!/usr/bin/env bash
# The project's test command (README, .ci/run): fetch the reference model if needed, then run
# every test. Fails on the first error.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --quiet -- fetch-model
cargo test --all-targets -- --test-threads="${MODSERVE_TEST_THREADS:-2}"
