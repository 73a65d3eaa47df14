#!/usr/bin/env python3
"""Request rate of a plain concurrent client, for comparison with `emlab judge`.

Sends the exact judge requests emlab sent (the filled prompts of the judgment records of an
exported store: max_tokens 1, temperature 0, logprobs with top_logprobs 20, seed 0) to the
same OpenAI-compatible endpoint with CONCURRENCY threads and prints requests/s as JSON.

    python3 scripts/bench_judge_client.py URL MODEL EXPORT_DIR CONCURRENCY
"""
import json
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor


def main(url, model, export_dir, concurrency):
    out = subprocess.run(
        ["duckdb", "-json", "-c", f"SELECT prompt FROM read_parquet('{export_dir}/judgment/*/*.parquet') WHERE prompt <> ''"],
        check=True, capture_output=True, text=True).stdout
    prompts = [r["prompt"] for r in json.loads(out)]

    def one(p):
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": p}], "max_tokens": 1,
                           "temperature": 0, "logprobs": True, "top_logprobs": 20, "seed": 0}).encode()
        req = urllib.request.Request(url.rstrip("/") + "/chat/completions", data=body,
                                     headers={"Content-Type": "application/json", "Authorization": "Bearer none"})
        with urllib.request.urlopen(req, timeout=120) as r:
            json.load(r)

    t = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        list(ex.map(one, prompts))
    dt = time.perf_counter() - t
    print(json.dumps({"client": "python threads + urllib", "requests": len(prompts), "concurrency": concurrency,
                      "seconds": dt, "requests_per_s": len(prompts) / dt}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
