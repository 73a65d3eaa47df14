#!/usr/bin/env bash
# Every GPU check in one go, for a machine with an NVIDIA GPU, PyTorch (+ transformers, peft,
# tokenizers) and no Rust toolchain. Writes every figure as one JSON file, $OUT/device-check.json
# (and the log beside it). Meant to finish in under 10 minutes on one H100/H200.
#
# Build the CUDA binaries beforehand, on a machine with the toolkit (see README, "CUDA"):
#   CARGO_TARGET_DIR=/work/cuda-target cargo build --release --locked --features cuda
#   CARGO_TARGET_DIR=/work/cuda-target cargo test --release --locked --features cuda --no-run 2>&1 \
#     | sed -n 's/.*(\(.*deps\/it-[0-9a-f]*\)).*/\1/p'          # the `it` test binary
#   mkdir -p dist && xz -T2 -c /work/cuda-target/release/emlab > dist/emlab-cuda.xz
#   xz -T2 -c <that it binary> > dist/it-cuda.xz                  # optional: the CUDA tests
# and carry `dist` to the GPU machine. There:
#   OUT=/some/dir bash scripts/device-check.sh
#
# What it measures, on random-weight models of Llama-3.2-1B's and Qwen2.5-0.5B's shapes (no
# model hub is needed; scripts/device_check.py writes them):
#   - emlab bench generate (batch 1 and 16, 128 + 128 tokens) and bench train (LoRA r 32,
#     4 x 256 tokens, bf16 base) on CUDA, and the EM workload scheduler (continuous vs static);
#   - transformers `generate` and PyTorch + peft training on the same GPU, the same shapes;
#   - the CUDA tests (dist/it-cuda.xz), when carried.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder for the results}"
mkdir -p "$OUT"
work=$(mktemp -d)
log="$OUT/device-check.log"
exec > >(tee -a "$log") 2>&1
[ -s dist/emlab-cuda.xz ] || { echo "dist/emlab-cuda.xz is missing: build it first (see the top of this script)"; exit 2; }
xz -dc dist/emlab-cuda.xz > "$work/emlab" && chmod +x "$work/emlab"
# CUDA libraries from the Python environment's nvidia-* wheels (cuBLAS, cuRAND...), if any.
libs=$(python3 - <<'PY'
import glob, os, site
dirs = set()
for sp in site.getsitepackages():
    dirs.update(os.path.dirname(p) for p in glob.glob(os.path.join(sp, "nvidia", "*", "lib", "*.so*")))
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 scripts/device_check.py --emlab "$work/emlab" --work "$work" --out "$OUT/device-check.json"
status=$?
if [ -s dist/it-cuda.xz ]; then
  xz -dc dist/it-cuda.xz > "$work/it" && chmod +x "$work/it"
  # The test binary runs the emlab binary at the path it was built with.
  built=/work/cuda-target/release/emlab
  mkdir -p "$(dirname "$built")" && cp "$work/emlab" "$built"
  # Tests on the tiny random models (the 92 MB GGUF does not travel): the CLI runs them on CUDA.
  timeout 240 "$work/it" model_tiny --test-threads 2 \
    > "$OUT/cuda-tests.log" 2>&1
  t=$?
  python3 - "$OUT/device-check.json" "$OUT/cuda-tests.log" "$t" <<'PY'
import json, re, sys
path, logf, rc = sys.argv[1], sys.argv[2], int(sys.argv[3])
d = json.load(open(path))
text = open(logf).read()
m = re.findall(r"test result: \w+\. (\d+) passed; (\d+) failed", text)
d["cuda_tests"] = {"exit": rc, "passed": sum(int(a) for a, _ in m), "failed": sum(int(b) for _, b in m)}
json.dump(d, open(path, "w"), indent=1)
PY
else
  echo "dist/it-cuda.xz not carried: CUDA tests not run"
fi
rm -rf "$work"
exit $status
