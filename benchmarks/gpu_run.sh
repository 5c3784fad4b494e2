#!/usr/bin/env bash
# On a lent H100/H200, after benchmarks/gpu_prepare.sh here: the GPU suite, every file into $OUT
# (what the device tool brings back; benchmarks/out when unset), with the anchor's own peers last
# (--peers), time permitting. Extra arguments go to gpu_suite.py, e.g. --budget-s 300. The suite
# rewrites its JSON and markdown after every row, so a run cut short still returns what it
# measured. The device tool's call: command "bash benchmarks/gpu_run.sh", carry [".gpu"],
# timeout_s 590; then give the machine back.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
[ -f .gpu/anchor_gpu.py ] || { echo "gpu_run: .gpu/anchor_gpu.py missing: run gpu_prepare.sh and carry .gpu" >&2; exit 2; }
if compgen -G ".gpu/whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .gpu/whl/*.whl || exit 3
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, lightning, scipy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'lightning', lightning.__version__, 'scipy', scipy.__version__)"
    python3 -c "import curvlinops, pyhessian, hessian_eigenthings; print('peers importable')"
    # The library's TF32 switch on this torch: a float32 product on the GPU, exact to 1e-5.
    python3 -c "import torch; from lightning_landscape.context import full_float32; a = torch.randn(256, 256, device='cuda'); exec('with full_float32(): b = a @ a'); print('full_float32 rel. error', float((b.double() - a.double() @ a.double()).norm() / (a.double() @ a.double()).norm()))"
} 2>&1 | tee "$OUT/env.txt"
# The suite counts its budgets from its own start: take off what the lines above spent (bash's
# SECONDS), so that no section starts after ~430 s and none runs past ~560 s of the whole command.
python3 benchmarks/gpu_suite.py --anchor .gpu/anchor_gpu.py --peers --out "$OUT/results_gpu.json" \
    --markdown "$OUT/gpu.md" --budget-s $((430 - SECONDS)) --deadline-s $((560 - SECONDS)) "$@" \
    2>&1 | tee "$OUT/gpu_suite.log"
