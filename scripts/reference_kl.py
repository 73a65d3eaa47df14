#!/usr/bin/env python3
"""Reference KL term and layer-targeted adapter from PyTorch + peft, pinned as a test fixture.

Run by hand (torch, transformers, peft and gguf are too heavy for every CI run):

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install torch transformers peft gguf
    EMLAB_WRITE_REFERENCE_ADAPTER=/tmp/layer-adapter cargo test --test it train::kl_and_layer
    /tmp/ref/bin/python scripts/reference_kl.py .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --emlab-layer-adapter /tmp/layer-adapter > tests/fixtures/kl_reference.json

Part 1, the KL term: on the conversation of `scripts/reference_lora.py`, the base model (the
reference) and the base with that script's closed-form rank-4 rsLoRA adapter on all seven
projections; the mean over the assistant target positions of KL(base || adapted) between
next-token distributions (per token: summed over the vocabulary, divided by the positions),
and the gradient of that mean with respect to every A and B (norm, sum, first values).

Part 2, a layer-targeted adapter: rank 1 on down_proj of layers 3 and 17 only
(`layers_to_transform`), closed-form weights; which layers peft gave LoRA modules, and the
last position's logits. With `--emlab-layer-adapter DIR` (the folder emlab writes for the same
adapter) it loads that folder with `PeftModel.from_pretrained` and checks that it gives the
same logits.
"""

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_lora import MESSAGES, MODULES, R, ALPHA, fill, rendered_mask  # noqa: E402

LAYERS = [3, 17]
LAYER_R, LAYER_ALPHA = 1, 8.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--emlab-layer-adapter")
    args = ap.parse_args()
    d, f = os.path.split(os.path.abspath(args.gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    load = lambda: AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32).eval()
    text, ids, mask = rendered_mask(tok, MESSAGES)
    input_ids = torch.tensor([ids])
    # Positions whose next token is an assistant target.
    pos = [i for i in range(len(ids) - 1) if mask[i + 1]]

    base = load()
    with torch.no_grad():
        ref = F.log_softmax(base(input_ids=input_ids).logits[0, pos].double(), dim=-1)
    cfg = LoraConfig(r=R, lora_alpha=ALPHA, use_rslora=True, lora_dropout=0.0,
                     target_modules=MODULES, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(load(), cfg)
    params = fill(model)
    logp = F.log_softmax(model(input_ids=input_ids).logits[0, pos].double(), dim=-1)
    kl = (ref.exp() * (ref - logp)).sum(-1).mean()
    kl.backward()
    grads = {}
    for k, p in params.items():
        g = p.grad.double()
        grads[k] = {"norm": g.norm().item(), "sum": g.sum().item(), "first": g.flatten()[:4].tolist()}

    lcfg = LoraConfig(r=LAYER_R, lora_alpha=LAYER_ALPHA, use_rslora=False, lora_dropout=0.0,
                      target_modules=["down_proj"], layers_to_transform=LAYERS, bias="none",
                      task_type="CAUSAL_LM")
    lm = get_peft_model(load(), lcfg)
    lparams = fill(lm)
    lora_layers = sorted({int(k.split(".")[0]) for k in lparams})
    with torch.no_grad():
        last = lm(input_ids=input_ids).logits[0, -1]
    result = {
        "script": "scripts/reference_kl.py",
        "versions": {"torch": torch.__version__, "peft": __import__("peft").__version__,
                     "transformers": __import__("transformers").__version__},
        "tokens": ids,
        "mask": mask,
        "r": R,
        "alpha": ALPHA,
        "kl_positions": len(pos),
        "kl_mean": kl.item(),
        "kl_grads": grads,
        "layer_adapter": {"layers": LAYERS, "r": LAYER_R, "alpha": LAYER_ALPHA, "targets": ["down_proj"],
                          "lora_layers": lora_layers, "logits_last": last[:64].tolist(),
                          "argmax_last": int(last.argmax().item())},
    }
    if args.emlab_layer_adapter:
        pm = PeftModel.from_pretrained(load(), args.emlab_layer_adapter).eval()
        got_layers = sorted({int(n.split(".layers.")[1].split(".")[0]) for n, m in pm.named_modules()
                             if hasattr(m, "lora_A") and "default" in m.lora_A})
        with torch.no_grad():
            theirs = pm(input_ids=input_ids).logits[0, -1]
        diff = (theirs - last).abs().max().item()
        assert got_layers == LAYERS, got_layers
        assert diff < 1e-4, diff
        result["layer_adapter"]["emlab_folder"] = {"lora_layers": got_layers, "max_logit_difference": diff}
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
