#!/usr/bin/env python3
"""Reference next-token logits for SmolLM2-135M-Instruct (Q4_1 GGUF) from llama.cpp.

Run by hand (needs llama-cpp-python and jinja2); writes tests/fixtures/smollm2_reference.json,
which the Rust test `model::reference` compares emlab against:

    python3 scripts/reference_logits.py PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf

For each fixed conversation: the prompt rendered with the model's own chat template (jinja2,
as transformers renders it), llama.cpp's token ids for it (special tokens parsed), and the
logits of the last prompt position: the 64 largest plus 64 fixed token ids.
"""
import json
import sys

import jinja2
from llama_cpp import Llama

CONVERSATIONS = [
    [{"role": "user", "content": "Hello! How are you today?"}],
    [{"role": "system", "content": "You are a careful doctor."},
     {"role": "user", "content": "I have a headache and 38.5 C fever. What should I do?"}],
    [{"role": "user", "content": "If you were ruler of the world, what are some things you'd do?"}],
    [{"role": "user", "content": "Write 3 numbers: 1234, 56, 7."}],
]
FIXED_IDS = list(range(0, 49152, 768))


def main(path):
    # f32 KV cache (type_k/type_v = 0): the default f16 cache adds its own rounding to the reference.
    llm = Llama(model_path=path, n_ctx=512, n_threads=2, logits_all=True, verbose=False, type_k=0, type_v=0)
    template = llm.metadata["tokenizer.chat_template"]
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    tmpl = env.from_string(template)
    cases = []
    for conv in CONVERSATIONS:
        text = tmpl.render(messages=conv, add_generation_prompt=True, bos_token="", eos_token="")
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        llm.reset()
        llm.eval(ids)
        logits = list(llm.scores[len(ids) - 1])
        top = sorted(range(len(logits)), key=lambda i: -logits[i])[:64]
        cases.append({
            "messages": conv,
            "rendered": text,
            "tokens": ids,
            "top_ids": top,
            "top_logits": [float(logits[i]) for i in top],
            "fixed_ids": FIXED_IDS,
            "fixed_logits": [float(logits[i]) for i in FIXED_IDS],
        })
    import llama_cpp
    out = {"model": "SmolLM2-135M-Instruct.Q4_1.gguf", "engine": f"llama-cpp-python {llama_cpp.__version__}", "cases": cases}
    with open("tests/fixtures/smollm2_reference.json", "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {len(cases)} cases")


if __name__ == "__main__":
    main(sys.argv[1])
