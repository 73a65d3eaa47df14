#!/usr/bin/env bash
# The CPU speed figures against the peers, alternating in one shell, one line per figure and
# round (issue 17's table): batch-1 prefill and decode against llama.cpp in-process, batch-16
# decode against llama.cpp's one-sequence-at-a-time rate of the same round, and a LoRA step
# (4 x 256 tokens, r 32) against PyTorch + peft in f32 and with a bf16 base.
#
#   bash scripts/bench-cpu.sh [ROUNDS] [EMLAB_BINARY]
#
# Needs llama-cpp-python (python3) and torch + peft (PEFT_PYTHON, default /tmp/ref/bin/python).
# emlab's runs are stored as `bench` records in BENCH_STORE (default /tmp/emlab-bench-cpu):
# each names the CPU model and the kernel paths that ran. Prints the CPU first (`emlab cpu`).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
emlab=${2:-target/release/emlab}
model=${MODEL:-.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf}
peft_py=${PEFT_PYTHON:-/tmp/ref/bin/python}
store=${BENCH_STORE:-/tmp/emlab-bench-cpu}
steps=${TRAIN_STEPS:-3}
lora=${LORA:-1}   # LORA=0: decode figures only

if "$emlab" cpu --help >/dev/null 2>&1; then "$emlab" cpu; fi
echo "lscpu model: $(lscpu | sed -n 's/^Model name: *//p')"

jq_py() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)" "${@:2}"; }
# The shares of a bench record's phases (util::prof): "base_products 61%, attention 6%, ...";
# an argument picks a part (decode, prefill).
phases_py='", ".join(f"{k[:-6]} {v:.0%}" for k, v in (d["results"]["phases"][sys.argv[1]] if len(sys.argv) > 1 else d["results"]["phases"]).items() if k.endswith("_share"))'

for round in $(seq 1 "$rounds"); do
    e1=$("$emlab" bench generate --model "$model" --store "$store" --batch 1 --json)
    l1=$(python3 scripts/bench_llama_cpp.py "$model" 1 128 128)
    e16=$("$emlab" bench generate --model "$model" --store "$store" --batch 16 --json)
    ed=$(echo "$e1" | jq_py 'd["results"]["decode_tokens_per_s"]')
    ep=$(echo "$e1" | jq_py 'd["results"]["prefill_tokens_per_s"]')
    ld=$(echo "$l1" | jq_py 'd["decode_tokens_per_s"]')
    lp=$(echo "$l1" | jq_py 'd["prefill_tokens_per_s"]')
    e16d=$(echo "$e16" | jq_py 'd["results"]["decode_tokens_per_s"]')
    printf 'round %s decode-b1   emlab %7.1f  llama.cpp %7.1f  ratio %.2fx\n' "$round" "$ed" "$ld" "$(python3 -c "print($ed/$ld)")"
    printf 'round %s prefill-b1  emlab %7.1f  llama.cpp %7.1f  ratio %.2fx\n' "$round" "$ep" "$lp" "$(python3 -c "print($ep/$lp)")"
    printf 'round %s decode-b16  emlab %7.1f  llama.cpp %7.1f  ratio %.2fx (llama.cpp: one sequence at a time, this round)\n' "$round" "$e16d" "$ld" "$(python3 -c "print($e16d/$ld)")"
    echo "round $round emlab decode-b1 time by phase: $(echo "$e1" | jq_py "$phases_py" decode)"
    [ "$lora" = 1 ] || continue
    for prec in f32 bf16; do
        if [ "$prec" = bf16 ]; then flag=--bf16-base; dt=bfloat16; else flag=; dt=float32; fi
        er=$("$emlab" bench train --model "$model" --store "$store" --batch 4 --seq-len 256 --steps "$steps" $flag --json)
        et=$(echo "$er" | jq_py 'd["results"]["tokens_per_s"]')
        echo "round $round emlab lora-$prec time by phase: $(echo "$er" | jq_py "$phases_py")"
        pt=$("$peft_py" scripts/bench_peft_train.py "$model" --batch 4 --seq-len 256 --steps "$steps" --threads 2 --dtype "$dt" 2>/dev/null | tail -1 | jq_py 'd["tokens_per_s"]')
        printf 'round %s lora-%-5s  emlab %7.1f  peft      %7.1f  ratio %.2fx\n' "$round" "$prec" "$et" "$pt" "$(python3 -c "print($et/$pt)")"
    done
done
