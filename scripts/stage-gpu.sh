#!/usr/bin/env bash
# Builds xent and its GPU test binaries here and stages them, with the Vulkan loader and the
# glvnd libraries that NVIDIA's Vulkan driver needs, and the peers' script with Liger, into
# .gpu/ (ignored by git). A device call then carries ".gpu" and runs scripts/gpu-run.sh there:
#
#   scripts/stage-gpu.sh
#   device run: command "scripts/gpu-run.sh final", carry [".gpu"]
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release
# The test binaries that check the GPU against the CPU reference and PyTorch.
cargo test --release --no-run --test gpu_vs_cpu --test golden --test errors --test resident \
    --test gradient --test half --test metrics --test distill --test sparse --test shard 2>&1 |
    sed -n 's/.*Executable tests\/\([a-z_]*\)\.rs (\(.*\))/\1 \2/p' > target/gpu-tests.txt

rm -rf .gpu && mkdir -p .gpu/bin .gpu/lib
# The loader and glvnd libraries, run.sh, xent, and the peers (peers.py with Liger unzipped).
../shared/gpu/stage.sh target/release/xent
while read -r name path; do cp "$path" ".gpu/bin/test-$name"; done < target/gpu-tests.txt
strip .gpu/bin/* 2>/dev/null || true
# Ten test binaries and xent are ~80 MB, over the 64 MiB a device call carries: packed (~8 MB),
# unpacked there by gpu-run.sh.
tar cJf .gpu/bin.tar.xz -C .gpu bin && rm -rf .gpu/bin
grep -qx '.gpu/' .gitignore || echo '.gpu/' >> .gitignore
du -sh .gpu
