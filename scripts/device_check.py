#!/usr/bin/env python3
"""The figures of scripts/device-check.sh: emlab (CUDA build) against transformers and
PyTorch + peft on the same GPU, on random-weight models with Llama-3.2-1B's and Qwen2.5-0.5B's
shapes. Writes one JSON object to --out. Each step has a time limit; a failed step records its
error and the rest go on."""
import argparse
import json
import os
import subprocess
import time

import torch

SHAPES = {
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                         tie_word_embeddings=True, max_position_embeddings=8192, rms_norm_eps=1e-5),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, rope_theta=1000000.0,
                         tie_word_embeddings=True, max_position_embeddings=8192, rms_norm_eps=1e-6),
}
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_model(name, shape, root):
    """A random-weight model folder emlab and transformers both load: config, bf16
    safetensors, and a small word-level tokenizer (ids past it are still valid inputs)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from tokenizers import Tokenizer, models, pre_tokenizers
    d = os.path.join(root, name)
    os.makedirs(d, exist_ok=True)
    cfg = AutoConfig.for_model(**shape)
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
    m.save_pretrained(d, safe_serialization=True)
    words = ["<unk>", "<|im_start|>", "<|im_end|>"] + [f"w{i}" for i in range(509)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(d, "tokenizer.json"))
    json.dump({"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": "<|im_start|>"},
              open(os.path.join(d, "tokenizer_config.json"), "w"))
    del m
    torch.cuda.empty_cache()
    return d


def emlab(binary, store, args, timeout=300):
    r = subprocess.run([binary, "--store", store, "--json", *args], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout)


def hf_generate(d, batch, prompt_len, new_tokens):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.bfloat16).cuda().eval()
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(256, m.config.vocab_size, (batch, prompt_len), device="cuda", generator=g)
    kw = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, min_new_tokens=new_tokens, max_new_tokens=new_tokens,
              pad_token_id=0)
    with torch.no_grad():
        m.generate(ids, **dict(kw, max_new_tokens=8, min_new_tokens=8))  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        m(ids)
        torch.cuda.synchronize()
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        m.generate(ids, **kw)
        torch.cuda.synchronize()
        total = time.perf_counter() - t
    out = {"prefill_tokens_per_s": batch * prompt_len / prefill,
           "decode_tokens_per_s": batch * new_tokens / max(total - prefill, 1e-9)}
    del m
    torch.cuda.empty_cache()
    return out


def peft_train(d, batch, seq_len, steps, r):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.bfloat16).cuda()
    m = get_peft_model(m, LoraConfig(r=r, lora_alpha=2 * r, use_rslora=True, lora_dropout=0.0,
                                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    for n, p in m.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(256, m.config.vocab_size, (batch, seq_len), device="cuda", generator=g)
    labels = ids.clone()
    labels[:, : seq_len // 2] = -100
    times = []
    for s in range(steps + 2):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        torch.cuda.synchronize()
        if s >= 2:
            times.append(time.perf_counter() - t)
    mean = sum(times) / len(times)
    del m, opt
    torch.cuda.empty_cache()
    return {"mean_step_s": mean, "tokens_per_s": batch * seq_len / mean}


def step(results, key, fn):
    t = time.perf_counter()
    try:
        results[key] = fn()
    except Exception as e:  # a failed step is recorded; the others still run
        results[key] = {"error": f"{type(e).__name__}: {e}"[-2000:]}
    results[key + "_wall_s"] = time.perf_counter() - t
    print(key, json.dumps(results[key])[:400], flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--emlab", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    res = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "started": time.strftime("%FT%TZ", time.gmtime())}
    store = os.path.join(a.work, "store")
    qfile = os.path.join(a.work, "q.txt")
    open(qfile, "w").write("w1 w2 w3\nw4 w5 w6 w7\nw8 w9\nw10 w11 w12 w13 w14\n")
    step(res, "import_questions", lambda: emlab(a.emlab, store, ["data", "import", qfile, "--name", "qs"]))
    for name, shape in SHAPES.items():
        d = make_model(name, shape, a.work)
        for b in (1, 16):
            step(res, f"{name}.emlab.generate.b{b}", lambda: emlab(a.emlab, store, ["bench", "generate", "--model", d, "--batch", str(b), "--prompt-len", "128", "--new-tokens", "128"])["results"])
            step(res, f"{name}.hf.generate.b{b}", lambda: hf_generate(d, b, 128, 128))
        for sched in ("continuous", "static"):
            step(res, f"{name}.emlab.workload.{sched}", lambda: emlab(a.emlab, store, ["bench", "generate", "--workload", "em", "--model", d, "--questions", "qs", "--samples", "16", "--max-tokens", "128", "--batch", "16", "--scheduler", sched])["results"])
        step(res, f"{name}.emlab.train", lambda: emlab(a.emlab, store, ["bench", "train", "--model", d, "--batch", "4", "--seq-len", "256", "--steps", "5", "--r", "32", "--bf16-base"])["results"])
        step(res, f"{name}.peft.train", lambda: peft_train(d, 4, 256, 5, 32))
    res["finished"] = time.strftime("%FT%TZ", time.gmtime())
    json.dump(res, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
