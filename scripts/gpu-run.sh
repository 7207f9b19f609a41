#!/usr/bin/env bash
# Runs on the GPU machine from the project root, after scripts/stage-gpu.sh here:
#   scripts/gpu-run.sh again   as final without the host path and the peers (a re-measure)
#   scripts/gpu-run.sh probe   tests, then the gradient, and z-loss and soft-capping taken apart
#   scripts/gpu-run.sh half    tests, then the loss and gradient in f32, bf16 and f16 and the
#                              peers in bf16 and f16 (issue 10)
#   scripts/gpu-run.sh scoring tests, then the loss beside token metrics, distillation (f32,
#                              bf16), top-8 sparse targets and the loss in 2 and 4 vocabulary
#                              shards (issues 11 and 13)
#   scripts/gpu-run.sh final   info, the GPU test binaries, and the benchmark: the loss on the
#                              kernel, resident and host paths; loss + gradient (separate and in
#                              place) beside the naive kernel; the gradient with z-loss and with
#                              soft-capping; then the peers (PyTorch, torch.compile, Liger) in f32
# Results go to $OUT when OUT is set, else to ./gpu-out: log.txt (GPU, info, tests), bench.txt
# and bench.json (ours), peers.txt.
set -uo pipefail
mode=${1:-final}
out=${OUT:-$PWD/gpu-out}
mkdir -p "$out"
export LD_LIBRARY_PATH="$PWD/.gpu/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PATH="$PWD/.gpu/bin:$PATH"
export PYTHONPATH="$PWD/.gpu/peers${PYTHONPATH:+:$PYTHONPATH}"
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
export XENT_GOLDEN_DIR="$PWD/tests/golden"
# XENT_BENCH_QUICK=1 shrinks the bench shapes, for a dry run on a software adapter.
quick=${XENT_BENCH_QUICK:+--quick}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
    xent info 2>&1
    echo "== GPU tests (against the CPU reference and PyTorch's golden cases)"
    for t in .gpu/bin/test-*; do
        [ "$mode" = figures ] && break
        timeout 120 "$t" --test-threads 4 2>&1 | grep -E "^test result|FAILED|panicked" | sed "s#^#$(basename "$t"): #"
    done
} 2>&1 | tee "$out/log.txt"

bench() { # label, then xent bench arguments
    local label=$1
    shift
    echo "== $label" | tee -a "$out/bench.txt"
    xent bench $quick --no-cpu --json-out "$out/one.json" "$@" 2>&1 | grep -v XDG_RUNTIME | tee -a "$out/bench.txt"
    [ -f "$out/one.json" ] && cat "$out/one.json" >> "$out/bench.json" && echo >> "$out/bench.json"
    rm -f "$out/one.json"
}
if [ "$mode" = figures ]; then
    # The figures only (no tests), in three processes: plain, z-loss, soft-capping.
    bench "loss and gradient: kernel path; loss: resident path" --path kernel,resident \
        --task loss,grad,grad-inplace
    bench "loss + gradient with z-loss 1e-4" --task grad --z-loss 1e-4
    bench "loss + gradient with soft-capping at 30" --task grad --softcap 30
    exit 0
fi
if [ "$mode" = half ]; then
    bench "loss and gradient (separate, in place) in f32, bf16 and f16" \
        --task loss,grad,grad-inplace --dtype f32,bf16,f16
    bench "loss and gradient, f16: unpack2x16float (auto) beside integer widening (fixed)" \
        --dtype f16 --task loss,grad --shapes 4096x32000,1024x128256 --kernel auto,256/256/1/vec4/sg/f16int
    if [ -z "$quick" ]; then
        for d in bfloat16 float16; do
            { timeout 200 python3 .gpu/peers/peers.py --dtype $d 2>&1; } | tee -a "$out/peers.txt"
        done
    fi
    exit 0
fi
if [ "$mode" = scoring ]; then
    bench "loss beside metrics, sparse top-8 and vocabulary shards (hard); distillation (soft)" \
        --task loss,metrics,sparse,distill --shards 2,4
    bench "distillation and the loss in bf16" --task loss,distill --dtype bf16
    exit 0
fi
if [ "$mode" = probe ]; then
    # Where z-loss and soft-capping lose time: the loss pass alone, and other workgroup shapes.
    bench "gradient (separate, in place), plain" --task grad,grad-inplace
    bench "loss alone with soft-capping at 30" --task loss --softcap 30
    bench "loss alone with z-loss 1e-4" --task loss --z-loss 1e-4
    for extra in "--z-loss 1e-4" "--softcap 30"; do
        bench "gradient $extra, 4096x32000, four workgroup shapes" --task grad $extra \
            --shapes 4096x32000 --kernel auto,256/64/1/vec4/sg,128/128/1/vec4/sg,512/512/1/vec4/sg
    done
    exit 0
fi
if [ "$mode" = final ]; then
    bench "loss: kernel, resident and host paths; naive beside auto" \
        --path kernel,resident,host --kernel naive,auto --task loss
else
    bench "loss: kernel and resident paths" --path kernel,resident --task loss
fi
bench "loss + gradient of the mean (separate buffer, in place); naive beside auto" \
    --task grad,grad-inplace --kernel naive,auto
bench "loss + gradient with z-loss 1e-4" --task grad --z-loss 1e-4
bench "loss + gradient with soft-capping at 30" --task grad --softcap 30

if [ -z "$quick" ] && [ "$mode" = final ]; then
    { timeout 240 python3 .gpu/peers/peers.py --dtype float32 2>&1; } | tee "$out/peers.txt"
fi
