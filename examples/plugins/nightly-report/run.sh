#!/bin/sh
# Reads the run description (JSON) from stdin and appends it to report.log.
run=$(cat)
printf '%s %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$run" >> report.log
echo "report written"
