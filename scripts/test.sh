#!/usr/bin/env bash
# Runs the whole test suite: fetches the test model into .deps/ (once,
# checksummed), then every test of the workspace (server, simulator,
# examples, doc tests).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-models.sh .deps/models/all-MiniLM-L6-v2
cargo test --workspace --locked
