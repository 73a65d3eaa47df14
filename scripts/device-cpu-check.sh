#!/usr/bin/env bash
# The CPU side of a lent GPU machine, for issue 17 (CPU families): which CPU it is, whether
# it has AMX, and if so the kernel tests on its best path and `bench train` (emlab bf16 base on
# AMX and on AVX-512 BF16, f32, each with its time by phase) against PyTorch + peft on two
# pinned cores, alternating.
# Needs dist/emlab-cuda.xz (any emlab build; CUDA is hidden) and dist/kern-cpu.xz (the
# emlab-kernels unit-test binary: `cargo test -p emlab-kernels --no-run`). OUT=dir bash $0
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT}"
exec > >(tee -a "$OUT/cpu-check.log") 2>&1
lscpu | grep -E 'Model name|^CPU\(s\)|Thread|L2'
echo "amx flags: $(grep -o -w 'amx_[a-z0-9]*' /proc/cpuinfo | sort -u | tr '\n' ' ')"
w=$(mktemp -d)
xz -dc dist/emlab-cuda.xz > "$w/emlab" && chmod +x "$w/emlab"
xz -dc dist/kern-cpu.xz > "$w/kern" && chmod +x "$w/kern"
export CUDA_VISIBLE_DEVICES=
"$w/emlab" cpu
timeout 120 "$w/kern" --test-threads 2 2>&1 | tail -28
grep -qw amx_bf16 /proc/cpuinfo || { echo "no AMX: nothing more to measure here"; exit 0; }
PYTHONUNBUFFERED=1 python3 - "$w/m" <<'PY'
import sys, os, json, torch
from transformers import AutoConfig, AutoModelForCausalLM
from tokenizers import Tokenizer, models, pre_tokenizers
d = sys.argv[1]; os.makedirs(d, exist_ok=True)
cfg = AutoConfig.for_model(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True,
    max_position_embeddings=2048, rms_norm_eps=1e-5)
torch.manual_seed(0)
AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16).save_pretrained(d, safe_serialization=True)
words = ["<unk>", "<|im_start|>", "<|im_end|>"] + [f"w{i}" for i in range(509)]
tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
tok.save(os.path.join(d, "tokenizer.json"))
json.dump({"chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}",
           "eos_token": "<|im_end|>"}, open(os.path.join(d, "tokenizer_config.json"), "w"))
print("model written")
PY
pin="taskset -c 0,1"; command -v taskset >/dev/null || pin=""
export RAYON_NUM_THREADS=2 OMP_NUM_THREADS=2
em() { $pin "$w/emlab" --store "$w/s" --json bench train --model "$w/m" --batch 4 --seq-len 256 --steps 3 --r 32 "$@" \
         | python3 -c "import json,sys; d=json.load(sys.stdin); r=d['results']; print(r.get('tokens_per_s', r), '(time by phase:', ', '.join(f'{k[:-6]} {v:.0%}' for k, v in r.get('phases', {}).items() if k.endswith('_share')) + ')')"; }
pf() { $pin python3 scripts/bench_peft_train.py "$w/m" --steps 3 --threads 2 --dtype "$1" 2>/dev/null | tail -1; }
for round in 1 2; do
  echo "round $round emlab bf16-base (best path): $(em --bf16-base)"
  echo "round $round peft bf16: $(pf bfloat16)"
done
echo "emlab bf16-base capped at avx512: $(EMLAB_KERNELS=avx512 em --bf16-base)"
echo "emlab f32: $(em)"
echo "peft f32: $(pf float32)"
