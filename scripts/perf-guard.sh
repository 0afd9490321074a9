#!/usr/bin/env bash
# Hot-path regression guard for CI. Counts the instructions of the embedded
# store's hot path (submit → claim → complete, crates/store-sqlite/examples/
# hotpath.rs) under callgrind — a count, not a time, so it is stable on a
# noisy shared machine — and fails if it exceeds the baseline by more than
# the allowed factor. Update the baseline deliberately when the hot path
# changes on purpose: scripts/perf-guard.sh --update
set -euo pipefail
cd "$(dirname "$0")/.."

N=320
FACTOR=1.5
BASELINE_FILE=scripts/perf-guard.baseline

if ! command -v valgrind >/dev/null 2>&1; then
  echo "perf-guard: valgrind is not installed (apt-get install valgrind)" >&2
  exit 1
fi
cargo build --quiet --example hotpath -p coatcheck-store-sqlite
out=$(mktemp)
valgrind --tool=callgrind --callgrind-out-file=/dev/null target/debug/examples/hotpath "$N" 2>"$out" >/dev/null
count=$(grep -E 'Collected :' "$out" | awk '{print $NF}')
rm -f "$out"
if [ -z "$count" ]; then
  echo "perf-guard: no instruction count from callgrind" >&2
  exit 1
fi
if [ "${1:-}" = "--update" ]; then
  echo "$count" > "$BASELINE_FILE"
  echo "perf-guard: baseline set to $count instructions"
  exit 0
fi
baseline=$(cat "$BASELINE_FILE")
ratio=$(awk -v c="$count" -v b="$baseline" 'BEGIN { printf "%.3f", c / b }')
echo "perf-guard: $count instructions for $N round trips (baseline $baseline, ratio $ratio, limit $FACTOR)"
if awk -v r="$ratio" -v f="$FACTOR" 'BEGIN { exit !(r > f) }'; then
  echo "perf-guard: the hot path got more than ${FACTOR}x more expensive" >&2
  exit 1
fi
