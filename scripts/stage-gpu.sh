#!/usr/bin/env bash
# Builds xent and its GPU test binaries here and stages them, with the Vulkan loader and the
# glvnd libraries that NVIDIA's Vulkan driver needs, into .gpu/ (ignored by git). A device
# call then carries ".gpu" and runs scripts/gpu-run.sh there:
#
#   scripts/stage-gpu.sh
#   device run: command "scripts/gpu-run.sh sweep|final", carry [".gpu"]
#
# The libraries come from ../shared/gpu/lib when that exists, otherwise from Debian's
# packages (apt-get download; x86-64).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release
# The test binaries that check the GPU against the CPU reference and PyTorch.
cargo test --release --no-run --test gpu_vs_cpu --test golden --test errors 2>&1 |
    sed -n 's/.*Executable tests\/\([a-z_]*\)\.rs (\(.*\))/\1 \2/p' > target/gpu-tests.txt

rm -rf .gpu && mkdir -p .gpu/bin .gpu/lib
cp target/release/xent .gpu/bin/
while read -r name path; do cp "$path" ".gpu/bin/test-$name"; done < target/gpu-tests.txt
strip .gpu/bin/* 2>/dev/null || true

if [ -d ../shared/gpu/lib ]; then
    cp ../shared/gpu/lib/* .gpu/lib/
else
    debs=$(mktemp -d)
    opts='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64'
    (cd "$debs" && apt-get $opts download libvulkan1 libglvnd0 libglx0 libgl1 libegl1 libgles2 libopengl0)
    for d in "$debs"/*.deb; do dpkg-deb -x "$d" "$debs/root"; done
    find "$debs/root" -name '*.so*' -exec cp -P {} .gpu/lib/ \;
fi
grep -qx '.gpu/' .gitignore || echo '.gpu/' >> .gitignore
du -sh .gpu
