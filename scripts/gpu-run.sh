#!/usr/bin/env bash
# Runs on the GPU machine from the project root, after scripts/stage-gpu.sh here:
#   scripts/gpu-run.sh again   as final without the host path and the peers (a re-measure)
#   scripts/gpu-run.sh probe   tests, then the gradient, and z-loss and soft-capping taken apart
#   scripts/gpu-run.sh half    tests, then the loss and gradient in f32, bf16 and f16 and the
#                              peers in bf16 and f16 (issue 10)
#   scripts/gpu-run.sh scoring tests, then the loss beside token metrics, distillation (f32,
#                              bf16), top-8 sparse targets and the loss in 2 and 4 vocabulary
#                              shards (issues 11 and 13)
#   scripts/gpu-run.sh next    tests, then every open issue's unmeasured figure, one bounded
#                              xent process per shape (≈ 6 min; at most 9.75): resident, pipelined,
#                              round trip (8); metrics, sparse, distillation, shards (11, 13); loss
#                              and gradient in f32 and bf16, z-loss, soft-capping (9, 10); top-128
#                              sparse targets
#   scripts/gpu-run.sh lanes   the test binaries at once, then the loss, metrics and gradient
#                              (f32, bf16) at 256, 128 and 64 lanes a row with the read-and-
#                              write roofline, and pipelined calls 1 to 6 deep (≈ 5 min)
#   scripts/gpu-run.sh peers   the peers in f32 and bf16 (≈ 6 min), a call of its own
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
# The binaries travel packed (scripts/stage-gpu.sh).
# (Python's tarfile where the machine has no xz.)
if [ -f .gpu/bin.tar.xz ] && [ ! -d .gpu/bin ]; then
    tar xJf .gpu/bin.tar.xz -C .gpu 2>/dev/null ||
        python3 -c "import tarfile; tarfile.open('.gpu/bin.tar.xz').extractall('.gpu')"
fi
export LD_LIBRARY_PATH="$PWD/.gpu/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PATH="$PWD/.gpu/bin:$PATH"
export PYTHONPATH="$PWD/.gpu/peers${PYTHONPATH:+:$PYTHONPATH}"
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
export XENT_GOLDEN_DIR="$PWD/tests/golden"
# XENT_BENCH_QUICK=1 shrinks the bench shapes, for a dry run on a software adapter.
quick=${XENT_BENCH_QUICK:+--quick}
# Seconds per GPU test binary (a hung one must not eat the call).
test_limit=${XENT_TEST_LIMIT:-120}
[ "$mode" = next ] && test_limit=${XENT_TEST_LIMIT:-30}
[ "$mode" = lanes ] && test_limit=${XENT_TEST_LIMIT:-150}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
    xent info 2>&1
    echo "== GPU tests (against the CPU reference and PyTorch's golden cases)"
    run_test() { # test binary, log file
        timeout "$test_limit" "$1" --test-threads 4 > "$2" 2>&1
        rc=$?
        grep -E "^test result|FAILED|panicked" -A3 "$2" | sed "s#^#$(basename "$1"): #"
        [ $rc -eq 124 ] && echo "$(basename "$1"): TIMED OUT after $test_limit s"
        rm -f "$2"
    }
    for t in .gpu/bin/test-*; do
        [ "$mode" = figures ] && break
        # lanes: all test binaries at once (the machine has 16 cores), reported in turn.
        if [ "$mode" = lanes ]; then
            run_test "$t" "$out/test-$(basename "$t").log" > "$out/report-$(basename "$t")" &
        else
            run_test "$t" "$out/test.log"
        fi
    done
    wait
    cat "$out"/report-* 2>/dev/null && rm -f "$out"/report-*
} 2>&1 | tee "$out/log.txt"

bench() { # label, then xent bench arguments
    local label=$1
    shift
    echo "== $label" | tee -a "$out/bench.txt"
    timeout "${XENT_LIMIT:-600}" xent bench $quick --no-cpu --json-out "$out/one.json" "$@" 2>&1 |
        grep -v XDG_RUNTIME | tee -a "$out/bench.txt"
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
if [ "$mode" = next ]; then
    # Every open issue's unmeasured figure in one call, most wanted first: resident, pipelined
    # and the round trip (8); metrics, sparse, distillation and shards (11, 13); loss and
    # gradient in f32 and bf16 (9, 10); z-loss and soft-capping (9). One xent process per
    # shape, each time-bounded, so that a call that runs out keeps every finished shape.
    # The peers are `peers` mode, a call of their own.
    shapes=${XENT_SHAPES:-4096x32000 1024x128256 8192x1000 65536x10}
    for s in $shapes; do
        XENT_LIMIT=50 bench "$s: loss (kernel, resident, pipelined), metrics, sparse top-8 (loss, gradient), distillation, 2 and 4 shards" \
            --shapes "$s" --path kernel,resident,pipelined --task loss,metrics,sparse,sparse-grad,distill --shards 2,4
    done
    for s in $shapes; do
        XENT_LIMIT=45 bench "$s: loss and gradient (separate, in place) in f32 and bf16" \
            --shapes "$s" --task loss,grad,grad-inplace --dtype f32,bf16
    done
    for extra in "--z-loss 1e-4" "--softcap 30"; do
        XENT_LIMIT=30 bench "loss + gradient with $extra" --task grad $extra --shapes "${shapes%% *}"
    done
    XENT_LIMIT=15 bench "top-128 sparse targets (loss, gradient)" --task sparse,sparse-grad \
        --sparse-k 128 --shapes "${shapes%% *}"
    exit 0
fi
if [ "$mode" = lanes ]; then
    # Lanes per row (256 = the planner's row/wg, 128, 64) for the loss and the gradient in
    # f32 and bf16, the gradient beside the read-and-write roofline; pipelined calls 1 to 6
    # deep beside the kernel.
    XENT_LIMIT=200 bench "loss, metrics, gradient in f32 and bf16 at 256, 128 and 64 lanes a row" \
        --shapes 4096x32000,1024x128256 --task loss,metrics,grad --dtype f32,bf16 \
        --kernel auto,256/128/1/vec4/sg,256/64/1/vec4/sg
    XENT_LIMIT=60 bench "resident and pipelined calls (1, 2, 4, 6 in flight) beside the kernel" \
        --shapes 4096x32000 --path kernel,resident,pipelined --in-flight 1,2,4,6
    exit 0
fi
if [ "$mode" = peers ]; then
    # PyTorch eager, torch.compile and Liger in f32 (issue 9) and bf16 (issue 10) on this card.
    for d in float32 bfloat16; do
        { timeout 240 python3 .gpu/peers/peers.py --dtype $d 2>&1; } | tee -a "$out/peers.txt"
    done
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
