#!/usr/bin/env python3
"""llama.cpp (llama-cpp-python, in-process, 2 threads) on the same GGUF, measured the way
`emlab bench generate` measures: BATCH prompts of PROMPT_LEN random ordinary tokens, then
NEW_TOKENS sampled at temperature 1 each. llama-cpp-python decodes one sequence at a time, so
a batch is its sequences one after another; prints prefill and decode tokens/s as JSON.

    python3 scripts/bench_llama_cpp.py MODEL.gguf BATCH PROMPT_LEN NEW_TOKENS
"""
import json
import random
import sys
import time

from llama_cpp import Llama


def main(path, batch, prompt_len, new_tokens):
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


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
