#!/usr/bin/env python3
"""llama.cpp (llama-cpp-python, in-process, 2 threads) on the same GGUF, measured the way
emlab measures.

Microbenchmark, as `emlab bench generate`: BATCH prompts of PROMPT_LEN random ordinary tokens,
then NEW_TOKENS sampled at temperature 1 each, one sequence after another; prints prefill and
decode tokens/s as JSON.

    python3 scripts/bench_llama_cpp.py MODEL.gguf BATCH PROMPT_LEN NEW_TOKENS

The EM workload, as `emlab bench generate --workload em`: the prompts `emlab bench generate
--workload em ... --prompts-out FILE` wrote (the same tokens), SAMPLES each at temperature 1
with natural stopping (the stop tokens in FILE) up to max_tokens, decoded as SLOTS sequences
in one llama.cpp batch per step (llama_decode with one sequence id per row); a finished
sequence's slot is refilled at once with the next sample, whose prompt is copied from the
question's prefilled sequence (llama_memory_seq_cp: each prompt prefilled once), the way emlab
schedules. Prints useful (answer) tokens/s and wall time as JSON.

    python3 scripts/bench_llama_cpp.py MODEL.gguf --workload FILE --slots 16
"""
import ctypes
import json
import random
import sys
import time

import numpy as np
import llama_cpp
from llama_cpp import Llama


def micro(path, batch, prompt_len, new_tokens):
    llm = Llama(model_path=path, n_ctx=prompt_len + new_tokens + 8, n_threads=2, verbose=False)
    rng = random.Random(0)
    prefill_s = decode_s = 0.0
    decoded = 0
    for b in range(batch):
        prompt = [256 + rng.randrange(llm.n_vocab() - 256) for _ in range(prompt_len)]
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        prefill_s += time.perf_counter() - t
        t = time.perf_counter()
        n = 0
        for tok in llm.generate([], temp=1.0, top_p=1.0, top_k=0, reset=False):
            n += 1
            if n >= new_tokens:
                break
        decode_s += time.perf_counter() - t
        decoded += n
    print(json.dumps({"engine": "llama.cpp", "batch": batch, "prefill_tokens_per_s": batch * prompt_len / prefill_s,
                      "decode_tokens_per_s": decoded / decode_s}))


_quiet = llama_cpp.llama_log_callback(lambda level, text, data: None)


def workload(path, file, slots):
    w = json.load(open(file))
    prompts = [p["tokens"] for p in w["prompts"]]
    samples, max_tokens, stops = w["samples"], w["max_tokens"], set(w["stop_ids"])
    nq = len(prompts)
    longest = max(len(p) for p in prompts)
    llama_cpp.llama_log_set(_quiet, ctypes.c_void_p())
    llama_cpp.llama_backend_init()
    mp = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(path.encode(), mp)
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    cp = llama_cpp.llama_context_default_params()
    # Sequences 0..slots-1 decode; slots..slots+nq-1 hold the prefilled prompts. One unified
    # KV buffer: copied prompt cells are shared, not duplicated.
    cp.n_seq_max = slots + nq
    cp.kv_unified = True
    cp.n_ctx = nq * longest + slots * (longest + max_tokens) + 64
    cp.n_batch = max(512, longest)
    cp.n_ubatch = cp.n_batch
    cp.n_threads = cp.n_threads_batch = 2
    ctx = llama_cpp.llama_init_from_model(model, cp)
    mem = llama_cpp.llama_get_memory(ctx)
    batch = llama_cpp.llama_batch_init(max(cp.n_batch, slots), 0, 1)
    rng = np.random.default_rng(0)

    def fill(rows):
        """rows: (token, pos, seq, want_logits)"""
        batch.n_tokens = len(rows)
        for i, (tok, pos, seq, lg) in enumerate(rows):
            batch.token[i] = tok
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = lg
        rc = llama_cpp.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def sample(i):
        ptr = llama_cpp.llama_get_logits_ith(ctx, i)
        logits = np.ctypeslib.as_array(ptr, shape=(n_vocab,)).astype(np.float64)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        return int(rng.choice(n_vocab, p=p))

    t0 = time.perf_counter()
    first_logits = {}
    prefill_tokens = 0
    queue = [(q, s) for q in range(nq) for s in range(samples)]
    nxt = 0
    useful = 0
    answers = 0
    stopped = 0
    steps = 0
    occupied = 0
    # slot -> [pos, last token, n tokens]
    active = {}

    def start(slot):
        nonlocal nxt, useful, answers, stopped, prefill_tokens
        while nxt < len(queue):
            q, _ = queue[nxt]
            nxt += 1
            if q not in first_logits:
                toks = prompts[q]
                fill([(t, i, slots + q, i == len(toks) - 1) for i, t in enumerate(toks)])
                prefill_tokens += len(toks)
                first_logits[q] = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, len(toks) - 1), shape=(n_vocab,)).copy()
            lg = first_logits[q].astype(np.float64)
            p = np.exp(lg - lg.max())
            p /= p.sum()
            tok = int(rng.choice(n_vocab, p=p))
            if tok in stops:
                answers += 1
                stopped += 1
                continue
            useful += 1
            if max_tokens <= 1:
                answers += 1
                continue
            llama_cpp.llama_memory_seq_rm(mem, slot, -1, -1)
            llama_cpp.llama_memory_seq_cp(mem, slots + q, slot, -1, -1)
            active[slot] = [len(prompts[q]), tok, 1]
            return

    for s in range(slots):
        start(s)
    while active:
        order = sorted(active)
        fill([(active[s][1], active[s][0], s, True) for s in order])
        steps += 1
        occupied += len(order)
        # Draw every row before starting new samples (a new prompt's prefill reuses the batch).
        drawn = [sample(i) for i in range(len(order))]
        for s, tok in zip(order, drawn):
            st = active[s]
            st[0] += 1
            if tok in stops:
                answers += 1
                stopped += 1
                del active[s]
                start(s)
                continue
            useful += 1
            st[1] = tok
            st[2] += 1
            if st[2] >= max_tokens:
                answers += 1
                del active[s]
                start(s)
    wall = time.perf_counter() - t0
    print(json.dumps({"engine": "llama.cpp in-process, multi-sequence batches", "slots": slots, "answers": answers,
                      "useful_tokens": useful, "wall_s": wall, "useful_tokens_per_s": useful / wall,
                      "mean_answer_tokens": useful / max(answers, 1), "stopped": stopped,
                      "slot_occupancy": occupied / max(steps * slots, 1), "prefill_tokens": prefill_tokens}))
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[2] == "--workload":
        slots = int(sys.argv[5]) if len(sys.argv) > 5 and sys.argv[4] == "--slots" else 16
        workload(sys.argv[1], sys.argv[3], slots)
    else:
        micro(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
