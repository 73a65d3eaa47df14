#!/usr/bin/env bash
# Runs emlab's tests. Installs what they need when it is missing: the DuckDB CLI and
# llama-cpp-python's OpenAI-compatible server from PyPI (the server built from source, about
# 7 minutes the first time; pip caches the wheel), Debian's chromium (the report test), and
# the small real model (scripts/fetch-model.sh). Expects
# ../shared/data beside the repository for the real-data tests.
# Ends with one line totalling every test binary's results, skipped tests included (a test of a
# CPU path this machine lacks reports itself skipped; EMLAB_NO_SKIP=1 makes that a failure).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v duckdb >/dev/null 2>&1; then
  python3 -m pip install --quiet duckdb-cli
fi
if ! python3 -c "import llama_cpp.server" >/dev/null 2>&1; then
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
    python3 -m pip install --quiet 'llama-cpp-python[server]==0.3.36'
fi
# Debian's Chromium opens the study report in a test.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi
bash scripts/fetch-model.sh
log=$(mktemp)
export EMLAB_SKIP_LOG
EMLAB_SKIP_LOG=$(mktemp)
trap 'rm -f "$log" "$EMLAB_SKIP_LOG"' EXIT
set +e
cargo test --workspace --locked "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
skipped=$(wc -l < "$EMLAB_SKIP_LOG")
if [ "$skipped" -gt 0 ]; then
  echo "skipped (this machine lacks what they test):"
  sed 's/^/  /' "$EMLAB_SKIP_LOG"
fi
awk -v s="$skipped" '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "total: %d passed, %d skipped, %d failed\n", p - s, s, f }' "$log"
exit "$status"
