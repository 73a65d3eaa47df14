#!/usr/bin/env bash
# Runs emlab's tests. Installs what they need when it is missing: the DuckDB CLI and
# llama-cpp-python's OpenAI-compatible server from PyPI (the server built from source, about
# 7 minutes the first time; pip caches the wheel), moto's S3 server with DuckDB 1.4.4 and
# httpfs in .cache/s3-venv, Debian's chromium (the report test), and
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
# A local S3 (moto's server) and DuckDB 1.4.4 with its httpfs extension from PyPI, in their
# own virtual environment, for the object-storage export tests (duckdb-cli 1.5 cannot load
# httpfs offline).
if ! .cache/s3-venv/bin/python -c "import duckdb, boto3, moto" >/dev/null 2>&1; then
  python3 -m venv .cache/s3-venv
  .cache/s3-venv/bin/pip install --quiet "moto[server]" "duckdb==1.4.4" "duckdb-ext-httpfs==1.4.4.*" boto3
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
# Each kernel path below the best this CPU runs (EMLAB_KERNELS caps the level; the run above
# took the best): the kernels' own tests, and batched-equals-unbatched sampling and the
# PyTorch + peft fixtures through the whole model. A level above this CPU's best reports
# itself skipped. Not when arguments select tests.
if [ "$status" = 0 ] && [ $# = 0 ]; then
  best=$(target/debug/emlab cpu --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["best"])')
  path_tests="model::same_seed_same_text_and_batched_equals_unbatched
    model::quantized_logits_do_not_depend_on_the_batch model::quantized_matches_llama_cpp_reference
    sampling::continuous_batching_with_an_adapter_on_blocks_matches_alone
    sampling::ragged_tensor_cache_matches_rows_alone
    train::lora_loss_and_gradients_match_pytorch_peft_on_smollm2
    train::kl_and_layer_adapter_match_pytorch_peft_on_smollm2
    train::bf16_base_products_keep_the_adapters_share"
  below=1
  for level in amx avx512 avx2 scalar; do
    if [ "$level" = "$best" ]; then below=0; continue; fi
    if [ "$below" = 1 ]; then
      echo "path $level of the per-path tests: this CPU runs up to $best" >> "$EMLAB_SKIP_LOG"
      continue
    fi
    echo "== kernel path $level (EMLAB_KERNELS=$level)"
    set +e
    # shellcheck disable=SC2086
    { EMLAB_KERNELS=$level cargo test -p emlab-kernels --locked &&
      EMLAB_KERNELS=$level cargo test -p emlab --locked --test it -- --exact $path_tests; } 2>&1 | tee -a "$log"
    status=${PIPESTATUS[0]}
    set -e
    [ "$status" = 0 ] || break
  done
fi
skipped=$(grep -vc '^path ' "$EMLAB_SKIP_LOG" || true)
paths=$(grep -c '^path ' "$EMLAB_SKIP_LOG" || true)
if [ -s "$EMLAB_SKIP_LOG" ]; then
  echo "skipped (this machine lacks what they test):"
  sed 's/^/  /' "$EMLAB_SKIP_LOG"
fi
awk -v s="$skipped" -v k="$paths" '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "total: %d passed, %d skipped, %d failed; %d kernel paths not run on this CPU\n", p - s, s, f, k }' "$log"
exit "$status"
