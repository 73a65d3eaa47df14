#!/usr/bin/env bash
# Issue 17, decoding on a lent GPU machine's host CPU (an Intel Xeon with AMX): batch-1
# prefill and decode against llama.cpp in-process and batch-16 decode, by
# scripts/bench-cpu.sh on two pinned cores, alternating (LoRA steps: device-cpu-check.sh);
# then emlab's best path (AMX tiles for products of more than 4 rows) against the same binary
# capped at AVX-512 (VNNI rows), emlab's decoding on one core against two, and (where the
# device lets a process open performance counters) `perf stat` and a `perf` profile of
# batch-1 decoding.
#
# The real model (98 MB) and llama.cpp's Python package do not fit one carry (64 MiB), so
# the run takes two calls on one warm machine (files under .cache/ stay between calls):
#
#   bash scripts/device-cpu-decode.sh pack        # here: writes dist/stage1 and dist/stage2
#   run(carry=["dist/stage1"]):  STAGE=1 OUT=$OUT bash scripts/device-cpu-decode.sh
#   run(carry=["dist/stage2"]):  OUT=$OUT bash scripts/device-cpu-decode.sh [ROUNDS]
#
# stage1: the emlab CPU release binary and the model's first half (xz); stage2: the second
# half and llama-cpp-python's package as installed here (ctypes bindings and the llama.cpp
# libraries, built with scripts/test.sh's flags: AVX2, no AVX-512, no AMX, as the issue's
# peer), with libgomp, run by the device's own python3.
set -euo pipefail
cd "$(dirname "$0")/.."
keep=.cache/device-cpu
if [ "${1:-}" = pack ]; then
    model=.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf
    [ -f "$model" ] || bash scripts/fetch-model.sh
    cargo build --release --locked
    pkg=$(python3 -c 'import llama_cpp, os; print(os.path.dirname(llama_cpp.__file__))') || {
        echo "llama-cpp-python is not installed: run scripts/test.sh once (it builds it)"; exit 1; }
    rm -rf dist/stage1 dist/stage2 && mkdir -p dist/stage1 dist/stage2
    # Symbols kept (for `perf`), debug information dropped.
    strip --strip-debug -o dist/emlab.strip target/release/emlab
    xz -T2 -c dist/emlab.strip > dist/stage1/emlab.xz && rm dist/emlab.strip
    xz -T2 -c "$model" > dist/model.xz
    half=$(( ($(stat -c %s dist/model.xz) + 1) / 2 ))
    split -b "$half" -d -a 1 dist/model.xz dist/model.xz. && rm dist/model.xz
    mv dist/model.xz.0 dist/stage1/ && mv dist/model.xz.1 dist/stage2/
    gomp=$(ldconfig -p | sed -n 's/.*libgomp.so.1 .*=> //p' | head -1)
    tar -C "$(dirname "$pkg")" -cJf dist/stage2/llama_cpp.tar.xz --exclude=__pycache__ llama_cpp
    [ -n "$gomp" ] && cp "$gomp" dist/stage2/libgomp.so.1
    # `perf` (not installed there) with every library it loads, its own loader included, so
    # it runs whatever the device's glibc is.
    if command -v perf >/dev/null; then
        pk=$(mktemp -d) && mkdir "$pk/lib" && cp "$(command -v perf)" "$pk/"
        for l in $(ldd "$(command -v perf)" | grep -o '/[^ ]*'); do cp -L "$l" "$pk/lib/"; done
        tar -C "$pk" -cJf dist/stage2/perf.tar.xz . && rm -rf "$pk"
    fi
    du -sh dist/stage1 dist/stage2
    exit 0
fi
: "${OUT:?set OUT}"
exec > >(tee -a "$OUT/cpu-decode.log") 2>&1
mkdir -p "$keep"
if [ "${STAGE:-2}" = 1 ]; then
    cp dist/stage1/* "$keep"/
    ls -la "$keep"
    exit 0
fi
cp dist/stage2/* "$keep"/
ls -la "$keep"
w=$(mktemp -d)
cat "$keep"/model.xz.0 "$keep"/model.xz.1 | xz -dc > "$w/model.gguf"
xz -dc "$keep/emlab.xz" > "$w/emlab" && chmod +x "$w/emlab"
mkdir -p "$w/py" "$w/lib" && tar -C "$w/py" -xJf "$keep/llama_cpp.tar.xz"
[ -f "$keep/libgomp.so.1" ] && cp "$keep/libgomp.so.1" "$w/lib/"
export PYTHONPATH="$w/py" LD_LIBRARY_PATH="$w/lib:${LD_LIBRARY_PATH:-}"
python3 -c 'import llama_cpp; print("llama_cpp", llama_cpp.__version__)'
lscpu | grep -E 'Model name|^CPU\(s\)|L2'
pin="taskset -c 0,1"; command -v taskset >/dev/null || pin=""
export RAYON_NUM_THREADS=2 OMP_NUM_THREADS=2 CUDA_VISIBLE_DEVICES=
MODEL="$w/model.gguf" PEFT_PYTHON=python3 BENCH_STORE="$w/s" LORA=0 \
    $pin bash scripts/bench-cpu.sh "${1:-3}" "$w/emlab"
gen() {  # LEVEL BATCH [PIN]: prefill and decode tok/s and the quantized-product path
    quant=$(EMLAB_KERNELS=$1 "$w/emlab" cpu --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["kernels"]["quant"])')
    EMLAB_KERNELS=$1 ${3:-$pin} "$w/emlab" bench generate --model "$w/model.gguf" --store "$w/s" \
        --batch "$2" --json | python3 -c 'import json,sys; r=json.load(sys.stdin)["results"]
print("prefill %.1f decode %.1f tok/s, quant path %s" % (r["prefill_tokens_per_s"],
      r["decode_tokens_per_s"], sys.argv[1]))' "$quant"
}
for round in 1 2; do
    for b in 1 16; do
        for level in auto avx512; do
            echo "round $round batch $b EMLAB_KERNELS=$level: $(gen $level $b)"
        done
    done
    echo "round $round batch 1, one core: $(RAYON_NUM_THREADS=1 gen auto 1 'taskset -c 0')"
done
if [ -f "$keep/perf.tar.xz" ]; then
    mkdir -p "$w/perf" && tar -C "$w/perf" -xJf "$keep/perf.tar.xz"
    perf=("$w/perf/lib/ld-linux-x86-64.so.2" --library-path "$w/perf/lib" "$w/perf/perf")
    dec=("$w/emlab" bench generate --model "$w/model.gguf" --store "$w/s" --batch 1 --new-tokens 512)
    echo "== perf stat, batch-1 decoding (512 tokens)"
    $pin "${perf[@]}" stat -e task-clock,context-switches,cpu-migrations,cycles,instructions,cache-misses \
        -- "${dec[@]}" 2>&1 | tail -20 || true
    echo "== perf profile, batch-1 decoding"
    if $pin "${perf[@]}" record -F 2000 -o "$w/perf.data" -- "${dec[@]}" >/dev/null 2>&1; then
        "${perf[@]}" report -i "$w/perf.data" --stdio --percent-limit 0.5 --sort dso,symbol \
            2>/dev/null | grep -v '^#' | grep -v '^$' | cut -c1-150 | head -40
    else
        echo "perf record failed here (performance counters not open to this process?)"
    fi
fi
