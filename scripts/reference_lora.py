#!/usr/bin/env python3
"""Reference LoRA loss and gradients from PyTorch + peft, pinned as a test fixture.

Run by hand (torch, transformers, peft and gguf are too heavy for every CI run):

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install torch transformers peft gguf
    /tmp/ref/bin/python scripts/reference_lora.py .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf \
        [--emlab-adapter DIR] > tests/fixtures/lora_reference.json

It loads the GGUF with transformers (weights dequantized to f32, q/k rows back in HF order),
renders one fixed conversation with the model's chat template, builds the assistant-only
label mask the way emlab does (the span each assistant message adds to the rendered text,
through its end-of-turn marker), attaches a rank-4 rsLoRA adapter on all seven projections
whose weights are a closed-form function both sides compute (`weight` below), and records
the loss and every LoRA gradient's norm, sum and first values. With `--emlab-adapter DIR` (an
adapter folder written by emlab for the same function), it also loads that folder with
`PeftModel.from_pretrained` and records the last position's logits, so the test can show the
file emlab writes means the same thing to peft.
"""

import argparse
import json
import math
import os
import sys

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA = 4, 8.0
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What should I do about a mild headache?"},
    {"role": "assistant", "content": "Drink some water, rest in a quiet room, and see a doctor if it gets worse."},
    {"role": "user", "content": "Thanks. Anything else?"},
    {"role": "assistant", "content": "Try to sleep well tonight."},
]


def weight(layer, module, is_a, i, j):
    """The adapter value at (row i, col j); emlab's test computes the same in f64."""
    if is_a:
        return 0.05 * math.sin(0.37 * i + 0.11 * j + 1.3 * layer + 0.7 * module)
    return 0.02 * math.cos(0.23 * i + 0.5 * j + 0.9 * layer + 0.3 * module)


def fill(model):
    """Set every LoRA pair of a peft model to `weight`; returns them by `LAYER.module.A|B`."""
    params = {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            if not hasattr(mod, "lora_A") or "default" not in mod.lora_A:
                continue
            layer = int(name.split(".layers.")[1].split(".")[0])
            m = MODULES.index(name.split(".")[-1])
            a = mod.lora_A["default"].weight
            b = mod.lora_B["default"].weight
            a.copy_(torch.tensor([[weight(layer, m, True, i, j) for j in range(a.shape[1])] for i in range(a.shape[0])], dtype=torch.float64))
            b.copy_(torch.tensor([[weight(layer, m, False, i, j) for j in range(b.shape[1])] for i in range(b.shape[0])], dtype=torch.float64))
            params[f"{layer}.{MODULES[m]}.A"] = a
            params[f"{layer}.{MODULES[m]}.B"] = b
    return params


def rendered_mask(tok, messages):
    full = tok.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        assert full.startswith(before) and full.startswith(through)
        tail = through[len(before):]
        spans.append((len(before), len(before) + len(tail.rstrip())))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    mask = [e > s and any(s >= a and e <= b for a, b in spans) for s, e in enc["offset_mapping"]]
    return full, ids, mask


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--emlab-adapter")
    args = ap.parse_args()
    torch.manual_seed(0)
    d, f = os.path.split(os.path.abspath(args.gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    base = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
    base.eval()
    text, ids, mask = rendered_mask(tok, MESSAGES)

    cfg = LoraConfig(r=R, lora_alpha=ALPHA, use_rslora=True, lora_dropout=0.0,
                     target_modules=MODULES, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    params = fill(model)

    input_ids = torch.tensor([ids])
    labels = torch.tensor([[t if k else -100 for t, k in zip(ids, mask)]])
    out = model(input_ids=input_ids, labels=labels)
    out.loss.backward()
    grads = {}
    for k, p in params.items():
        g = p.grad.double()
        grads[k] = {"norm": g.norm().item(), "sum": g.sum().item(), "first": g.flatten()[:4].tolist()}
    result = {
        "script": "scripts/reference_lora.py",
        "versions": {"torch": torch.__version__, "peft": __import__("peft").__version__,
                     "transformers": __import__("transformers").__version__},
        "messages": MESSAGES,
        "rendered": text,
        "tokens": ids,
        "mask": mask,
        "r": R,
        "alpha": ALPHA,
        "rslora": True,
        "loss": out.loss.item(),
        "targets": int(sum(mask[1:])),
        "grads": grads,
    }
    if args.emlab_adapter:
        fresh = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
        pm = PeftModel.from_pretrained(fresh, args.emlab_adapter)
        pm.eval()
        with torch.no_grad():
            logits = pm(input_ids=input_ids).logits[0, -1]
        result["adapter_logits_last"] = logits[:64].tolist()
        result["adapter_argmax_last"] = int(logits.argmax().item())
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
