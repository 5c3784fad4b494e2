#!/usr/bin/env bash
# Here, before a lent GPU run: put what benchmarks/gpu_run.sh needs into .gpu/ (git-ignored),
# which the device tool carries (`carry: [".gpu"]`). The device has no network and only the
# repository travels, so the anchor file and the peers' wheels go with it:
#   .gpu/anchor_gpu.py   a copy of ../shared/bench/anchor_gpu.py
#   .gpu/whl/*.whl       curvlinops and PyHessian / hessian-eigenthings with the dependencies the
#                        device image lacks (pure-Python wheels, ~0.5 MB in all)
# Usage: bash benchmarks/gpu_prepare.sh [path/to/anchor_gpu.py]
set -euo pipefail
cd "$(dirname "$0")/.."
anchor="${1:-../shared/bench/anchor_gpu.py}"
[ -f "$anchor" ] || { echo "gpu_prepare: $anchor not found" >&2; exit 2; }
mkdir -p .gpu/whl
cp "$anchor" .gpu/anchor_gpu.py
# The device's python3 is 3.12; everything below is py3-none-any. Its image already has einops,
# linear-operator, opt-einsum, scipy, tqdm, torchvision and numpy.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform any -d .gpu/whl \
    curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1 einconv==0.1.0 unfoldNd==0.2.3 \
    pyhessian==0.1 hessian-eigenthings==1.0.0a5
du -sh .gpu
echo "gpu_prepare: ready; on the device run: bash benchmarks/gpu_run.sh (carry .gpu)"
