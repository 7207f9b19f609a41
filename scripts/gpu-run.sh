#!/usr/bin/env bash
# Runs on the GPU machine from the project root, after scripts/stage-gpu.sh here:
#   scripts/gpu-run.sh final   info, the GPU test binaries, demo, and the bench table
#                              (naive beside auto, CPU reference timed) for BENCHMARKS.md
#   scripts/gpu-run.sh sweep   the above plus every candidate strategy per reference shape
# Results go to $OUT when OUT is set, else to ./gpu-out: log.txt (GPU, info, tests, demo),
# bench.txt and bench.json, and sweep.json (one JSON array per line). A device call brings
# back at most 8 files, so everything fits in these four.
set -uo pipefail
mode=${1:-final}
out=${OUT:-$PWD/gpu-out}
mkdir -p "$out"
export LD_LIBRARY_PATH="$PWD/.gpu/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PATH="$PWD/.gpu/bin:$PATH"
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
export XENT_GOLDEN_DIR="$PWD/tests/golden"
# XENT_BENCH_QUICK=1 shrinks the bench shapes, for a dry run on a software adapter.
quick=${XENT_BENCH_QUICK:+--quick}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
    xent info 2>&1
    echo "== GPU tests (against the CPU reference and PyTorch's golden cases)"
    for t in .gpu/bin/test-*; do
        "$t" --test-threads 4 2>&1 | grep -E "^test result|FAILED|panicked" | sed "s#^#$(basename "$t"): #"
    done
    xent demo 2>&1
} | tee "$out/log.txt"

if [ "$mode" = sweep ]; then
    sweep() { # shape, kernels
        echo "== sweep $1"
        xent bench --shapes "$1" --kernel "$2" --no-cpu --json-out "$out/sweep-one.json" 2>&1 | tail -n +2
        cat "$out/sweep-one.json" >> "$out/sweep.json" && echo >> "$out/sweep.json" && rm "$out/sweep-one.json"
    }
    sweep 8192x1000 naive,auto,256/8/1/vec4/sg,256/32/1/vec4/sg,256/64/1/vec4/sg,256/16/1/scalar/sg,256/16/1/vec4,128/16/1/vec4/sg
    sweep 4096x32000 naive,auto,512/512/1/vec4/sg,256/128/1/vec4/sg,256/64/1/vec4/sg,256/256/1/vec4
    sweep 1024x128256 naive,auto,256/256/2/vec4/sg,256/256/4/vec4/sg,512/512/1/vec4/sg
    sweep 65536x10 naive,auto,128/1/1/vec4/sg,64/2/1/vec4/sg,256/2/1/vec4/sg
fi

echo "== bench (reference shapes)"
xent bench $quick --kernel naive,auto --json-out "$out/bench.json" 2>&1 | tee "$out/bench.txt"
