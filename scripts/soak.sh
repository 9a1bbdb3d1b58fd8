#!/usr/bin/env bash
# Soak: DURATION (default 10m) of mixed read actions at RATE req/s (default
# 2000) against a fresh release server whose audit log is capped at
# MAX_BYTES (default 256 MiB). Every REPORT_SECS (default 60) the bench
# prints the interval's rate, p50/p99 and errors, and this script prints
# the server's RSS and the audit volume (bytes and segments). Flat RSS and
# p99 across the reports, and an audit volume that stops at MAX_BYTES, are
# a pass; at the end `audit verify` must accept the retained chain.
#
#   scripts/soak.sh [DURATION] [MAX_BYTES]      DURATION: 30m, 180s, or minutes
#   RATE=5000 scripts/soak.sh 30m 268435456     the issue-14 soak
#   RATE=1500 scripts/soak.sh 3m 33554432       a short one for a small machine
#
# Other knobs: SEGMENT_BYTES (default MAX_BYTES/8, at least 1 MiB),
# REPORT_SECS, KEEP=1 (keep the data dir), CARGO_TARGET_DIR.
#
# The server is started here (not by the bench) so that it gets this
# config: one simulated phone sends all RATE requests, far over the
# per-device budget (SPEC §7 v1.1, default 200/s), so the budget is turned
# off (device_request_burst = 0) to measure the server, and the audit cap is
# set. The bench runs against it with --url.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${1:-10m}"
MAX_BYTES="${2:-268435456}"
RATE="${RATE:-2000}"
REPORT_SECS="${REPORT_SECS:-60}"
case "$DURATION" in
  *m) SECS=$(( ${DURATION%m} * 60 )) ;;
  *s) SECS=${DURATION%s} ;;
  *) SECS=$(( DURATION * 60 )) ;;
esac
SEGMENT_BYTES="${SEGMENT_BYTES:-$(( MAX_BYTES / 8 ))}"
if (( SEGMENT_BYTES < 1048576 )); then SEGMENT_BYTES=1048576; fi

cargo build --release -p secrets-agent -p mobile-client-sim --bin secrets-agent --bin mobile-sim
BIN="${CARGO_TARGET_DIR:-target}/release"

DATA="$(mktemp -d)"
STATE="$(mktemp -d)"
OUT="$DATA.serve.out"
cat >"$DATA/config.toml" <<EOF
[server]
max_in_flight = 1024
device_request_burst = 0

[audit]
segment_bytes = $SEGMENT_BYTES
max_bytes = $MAX_BYTES
EOF

SERVER_PID=""
MONITOR_PID=""
cleanup() {
  [[ -n "$MONITOR_PID" ]] && kill "$MONITOR_PID" 2>/dev/null || true
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  if [[ "${KEEP:-0}" != 1 ]]; then rm -rf "$DATA" "$STATE" "$OUT"; else echo "kept $DATA"; fi
}
trap cleanup EXIT

SECRETS_AGENT_LOG=warn "$BIN/secrets-agent" serve --data-dir "$DATA" --listen 127.0.0.1:0 >"$OUT" &
SERVER_PID=$!
for _ in $(seq 1 100); do
  grep -q "url:" "$OUT" 2>/dev/null && break
  sleep 0.1
done
CODE="$(sed -n 's/.*Pairing code: \([^ ]*\).*/\1/p' "$OUT" | head -1)"
URL="$(sed -n 's/^ *url: *//p' "$OUT" | head -1)"
[[ -n "$CODE" && -n "$URL" ]] || { echo "the server did not start:"; cat "$OUT"; exit 1; }
"$BIN/mobile-sim" --state "$STATE" pair --url "$URL" --code "$CODE" --name soak >/dev/null

audit_bytes() { find "$DATA/audit" -name '*.jsonl' -printf '%s\n' | awk '{s+=$1} END {print s+0}'; }
segments() { find "$DATA/audit" -name '*.jsonl' | wc -l; }
rss_mb() { awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$SERVER_PID/status"; }

echo "soak: ${SECS} s at ${RATE} req/s; audit.max_bytes = $MAX_BYTES, segment_bytes = $SEGMENT_BYTES; server pid $SERVER_PID"
(
  start=$(date +%s)
  while sleep "$REPORT_SECS"; do
    echo "server $(( $(date +%s) - start )) s: RSS $(rss_mb) MB  audit $(audit_bytes) bytes in $(segments) segments (limit $MAX_BYTES)"
  done
) &
MONITOR_PID=$!

"$BIN/mobile-sim" --state "$STATE" bench --url "$URL" --scenarios soak \
  --duration-secs "$SECS" --open-rate "$RATE" --report-secs "$REPORT_SECS"

kill "$MONITOR_PID" 2>/dev/null || true
MONITOR_PID=""
echo "end: RSS $(rss_mb) MB  audit $(audit_bytes) bytes in $(segments) segments (limit $MAX_BYTES)"
kill -TERM "$SERVER_PID"
wait "$SERVER_PID" || true
SERVER_PID=""
echo "final audit volume: $(audit_bytes) bytes (limit $MAX_BYTES)"
"$BIN/secrets-agent" audit verify --data-dir "$DATA"
