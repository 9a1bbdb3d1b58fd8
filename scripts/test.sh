#!/usr/bin/env bash
# Runs the whole test suite: fetches the test model into .deps/ (once,
# checksummed), then every test of the workspace (server, simulator,
# examples, doc tests).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-models.sh .deps/models/all-MiniLM-L6-v2
# The web companion's browser tests (tests/web_browser.rs) drive headless
# Chromium; install Debian's package when it is missing and we may (root).
# Without it those tests say SKIPPED.
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        { apt-get update && apt-get install -y chromium; } \
            || echo "note: installing chromium failed; the browser tests will be skipped" >&2
    else
        echo "note: chromium is not installed (apt-get install -y chromium as root); the browser tests will be skipped" >&2
    fi
fi
cargo test --workspace --locked
