#!/usr/bin/env bash
# Runs the server on its embedded defaults: fetches the embedding model and
# ONNX Runtime into the data dir (once, checksummed), builds, and serves on
# 127.0.0.1:7420. Extra arguments go to `secrets-agent serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR="${SECRETS_AGENT_HOME:-${XDG_DATA_HOME:-$HOME/.local/share}/secrets-agent}"
scripts/fetch-models.sh "$DATA_DIR/models/all-MiniLM-L6-v2"
exec cargo run --release --bin secrets-agent -- serve --data-dir "$DATA_DIR" "$@"
