#!/usr/bin/env python3
"""PyTorch + peft LoRA training throughput, the peer `emlab bench train` is compared with.

The same work as `emlab bench train`: `--batch` rows of `--seq-len` seeded random tokens, loss on
the second half of each row, rank-r rsLoRA (alpha 2r) on all seven projections, AdamW, gradient
clipping at 1.0; one warm-up step, then `--steps` timed steps. Prints one JSON object.

    /tmp/ref/bin/python scripts/bench_peft_train.py MODEL.gguf --batch 4 --seq-len 256 --threads 2
"""

import argparse
import json
import os
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", help="a .gguf file or an HF model folder")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--r", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    if args.model.endswith(".gguf"):
        d, f = os.path.split(os.path.abspath(args.model))
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    model.to(args.device)
    cfg = LoraConfig(r=args.r, lora_alpha=2 * args.r, use_rslora=True, lora_dropout=0.0,
                     target_modules=MODULES, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(256, vocab, (args.batch, args.seq_len), generator=g).to(args.device)
    labels = ids.clone()
    labels[:, : args.seq_len // 2] = -100
    times = []
    for s in range(args.steps + 1):
        if args.device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.device != "cpu":
            torch.cuda.synchronize()
        if s > 0:
            times.append(time.perf_counter() - t0)
    mean = sum(times) / len(times)
    res = {
        "peer": "torch+peft",
        "torch": torch.__version__,
        "peft": __import__("peft").__version__,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "r": args.r,
        "threads": args.threads,
        "trainable_params": trainable,
        "step_s": times,
        "mean_step_s": mean,
        "tokens_per_s": args.batch * args.seq_len / mean,
    }
    if args.device != "cpu":
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(res))


if __name__ == "__main__":
    main()
