#!/usr/bin/env bash
# Runs every fuzz target in the module for a short time each (FUZZTIME, default 5s).
# New crashers are written under the package's testdata/fuzz and fail the run.
set -euo pipefail
fuzztime=${FUZZTIME:-5s}
for pkg in $(go list ./...); do
  for target in $(go test -list '^Fuzz' "$pkg" 2>/dev/null | grep '^Fuzz' || true); do
    echo "fuzz: $pkg $target ($fuzztime)"
    go test -run '^$' -fuzz "^${target}\$" -fuzztime "$fuzztime" "$pkg" >/tmp/peerlink-fuzz.log 2>&1 || {
      cat /tmp/peerlink-fuzz.log
      exit 1
    }
  done
done
