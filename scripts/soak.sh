#!/usr/bin/env bash
# Soak: MINUTES (default 10) at RATE req/s (default 2000) of mixed actions
# against a fresh release server, printing rate, p50/p99 and server RSS every
# minute. Flat RSS and p99 across the reports is a pass.
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES="${1:-10}"
RATE="${RATE:-2000}"
cargo build --release --bin secrets-agent --bin mobile-sim
exec target/release/mobile-sim --state "$(mktemp -d)" bench --scenarios soak \
  --duration-secs "$((MINUTES * 60))" --open-rate "$RATE" --report-secs 60
