#!/usr/bin/env bash
# Runs emlab's tests. Installs the one outside tool they need (the DuckDB CLI, from PyPI)
# when it is missing. Expects ../shared/data beside the repository for the real-data tests.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v duckdb >/dev/null 2>&1; then
  python3 -m pip install --quiet duckdb-cli
fi
cargo test --workspace --locked "$@"
