#!/usr/bin/env python3
"""llama-cpp-python's OpenAI-compatible server (2 threads) on the EM workload, as
`emlab bench generate --workload em` measures it: the prompts in FILE (written by `emlab bench
generate --workload em ... --prompts-out FILE`; the server renders their messages with the
GGUF's chat template), SAMPLES each at temperature 1 with natural stopping up to max_tokens,
CONCURRENCY requests in flight. Starts the server on a free local port and stops it after.
Prints useful (completion) tokens/s from the responses' usage as JSON.

    python3 scripts/bench_llama_server.py MODEL.gguf FILE --concurrency 16
"""
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request


def post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=3600) as r:
        return json.load(r)


def main(model, file, concurrency):
    w = json.load(open(file))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    longest = max(len(p["tokens"]) for p in w["prompts"])
    server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", model, "--n_threads", "2",
                               "--n_ctx", str(longest + w["max_tokens"] + 64), "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(base + "/models", timeout=1).read()
                break
            except Exception:
                time.sleep(0.2)
        jobs = [(p, s) for p in w["prompts"] for s in range(w["samples"])]
        lock = threading.Lock()
        done = {"useful": 0, "answers": 0, "stopped": 0}
        nxt = [0]

        def worker():
            while True:
                with lock:
                    if nxt[0] >= len(jobs):
                        return
                    p, s = jobs[nxt[0]]
                    nxt[0] += 1
                r = post(base + "/chat/completions", {"messages": p["messages"], "max_tokens": w["max_tokens"],
                                                      "temperature": 1.0, "top_p": 1.0, "seed": s})
                with lock:
                    done["useful"] += r["usage"]["completion_tokens"]
                    done["answers"] += 1
                    done["stopped"] += r["choices"][0]["finish_reason"] == "stop"

        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        print(json.dumps({"engine": "llama-cpp-python server", "concurrency": concurrency, "answers": done["answers"],
                          "useful_tokens": done["useful"], "wall_s": wall, "useful_tokens_per_s": done["useful"] / wall,
                          "mean_answer_tokens": done["useful"] / max(done["answers"], 1), "stopped": done["stopped"]}))
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    conc = int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[3] == "--concurrency" else 16
    main(sys.argv[1], sys.argv[2], conc)
