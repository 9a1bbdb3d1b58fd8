#!/usr/bin/env bash
# Coverage-guided fuzzing with cargo-fuzz (libFuzzer + AddressSanitizer):
# frame decoding and every action's params parsing. SECS per target
# (default 60; CI runs 10). Installs cargo-fuzz from crates.io if missing.
# The stable toolchain runs it with RUSTC_BOOTSTRAP=1 (sanitizer flags).
# A crash leaves its input in fuzz/artifacts/<target>/ and fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${1:-60}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked --version 0.13.2
export RUSTC_BOOTSTRAP=1
cd fuzz
for target in frame_decode action_params; do
  echo "== fuzz $target for ${SECS}s"
  cargo fuzz run "$target" -- -max_total_time="$SECS" -rss_limit_mb=2048 -malloc_limit_mb=512 -print_final_stats=1 2>&1 | tail -n 8
  test "${PIPESTATUS[0]}" -eq 0
done
