#!/usr/bin/env bash
# Runs every fuzz target in the module for a short time each (FUZZTIME, default 5s),
# FUZZJOBS at a time (default 2), each with one fuzzing worker. New crashers are written
# under the package's testdata/fuzz and fail the run.
set -euo pipefail
cd "$(dirname "$0")/.."
export FUZZTIME=${FUZZTIME:-5s}
jobs=${FUZZJOBS:-2}

# Targets are found in the source: listing them with 'go test -list' would build every
# package's tests once more just to learn that most have none.
targets=$(grep -rl --include='*_test.go' '^func Fuzz' . | sort | while read -r f; do
  dir=$(dirname "$f")
  grep -ho '^func Fuzz[A-Za-z0-9_]*' "$f" | sed 's/^func //' | while read -r t; do
    echo "$dir $t"
  done
done | sort -u)

# one runs a target, and once more when the fuzzer only reports its own deadline.
one() {
  local dir=$1 target=$2 log
  log=$(mktemp)
  trap 'rm -f "$log"' RETURN
  for try in 1 2; do
    if go test -run '^$' -fuzz "^${target}\$" -fuzztime "$FUZZTIME" -parallel 1 "$dir" >"$log" 2>&1; then
      echo "fuzz: $dir $target ($FUZZTIME): ok"
      return 0
    fi
    # The fuzzer sometimes reports "context deadline exceeded" when its time runs out
    # mid-input, without a failing input: that is the fuzzer, not the code, so the
    # target runs once more. A real failure writes the input and fails at once.
    if [ "$try" = 2 ] || grep -q "Failing input written" "$log" || ! grep -q "context deadline exceeded" "$log"; then
      echo "fuzz: $dir $target: FAILED"
      cat "$log"
      return 1
    fi
    echo "fuzz: $dir $target: the fuzzer's deadline, not a failing input; once more"
  done
}
export -f one

# A package's targets run one after another (they share its test binary and corpus
# directory); packages run side by side.
echo "$targets" | awk '{ if ($1 != dir) { if (line) print line; line = $1; dir = $1 } line = line " " $2 } END { if (line) print line }' |
  xargs -P "$jobs" -I{} bash -c 'set -- {}; dir=$1; shift; for t in "$@"; do one "$dir" "$t" || exit 255; done'
