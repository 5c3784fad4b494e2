#!/usr/bin/env bash
# Single entry point for lightning-landscape. Sets up everything itself on a fresh machine.
#
#   ./run.sh demo [args...]     run the demo (python -m lightning_landscape.cli demo)
#   ./run.sh test [pytest args] lint, then the test suite
#   ./run.sh lint               ruff check + ruff format --check + mypy
#   ./run.sh fmt                apply ruff's fixes and formatting (the fix for a failing lint)
#   ./run.sh bench [args...]    CPU benchmark against PyHessian / hessian-eigenthings / curvlinops
#   ./run.sh setup              only create / update the virtualenv
#
# Set-up: creates .venv (with $PYTHON, default python3) if missing, installs torch==2.13.0 first if
# torch is not importable (on the project's machines that is a CPU wheel on local disk; a bare
# `torch` requirement would instead pull a multi-GB CUDA build), then `pip install -e ".[dev]"`
# whenever pyproject.toml changed since the last install (sha256 kept in .venv/.ll-stamp).
# Everything runs from the repository root.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.ll-stamp"
BENCH_STAMP="$VENV/.ll-bench-stamp"
CONSTRAINTS="$VENV/.ll-constraints.txt"
TORCH_PIN="torch==2.13.0"
LINT_PATHS=(lightning_landscape tests examples benchmarks)

export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_NO_INPUT=1              # CI has no stdin; never prompt
export MPLBACKEND="${MPLBACKEND:-Agg}"  # headless plotting
# OMP_NUM_THREADS is deliberately left alone: torch picks its own default.

log() { echo "run.sh: $*" >&2; }

usage() {
  sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
}

pip_install() { "$PY" -m pip install -q "$@"; }

pyproject_hash() {
  "$PY" -c 'import hashlib; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())'
}

# Pin whatever torch is installed so that no later install (ours or a dependency's) swaps it for
# another build.
write_torch_constraint() {
  "$PY" -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' >"$CONSTRAINTS"
}

ensure_env() {
  if [[ ! -x "$PY" ]]; then
    local base="${PYTHON:-python3}"
    if ! "$base" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
      log "need Python >= 3.10 ($base is $("$base" --version 2>&1))"
      exit 1
    fi
    log "creating virtualenv in $VENV"
    "$base" -m venv "$VENV"
  fi

  local want have
  want="$(pyproject_hash)"
  have="$(cat "$STAMP" 2>/dev/null || true)"
  # Fast path: nothing changed since the last successful install (no torch import: it is slow).
  # -I keeps the cwd off sys.path, so lightning_landscape must be found through the editable
  # install itself, not merely because we stand in the repository root.
  if [[ "$want" == "$have" ]] && "$PY" -I -c '
import importlib.metadata as m, importlib.util as u, sys
m.distribution("lightning-landscape")
sys.exit(u.find_spec("torch") is None or u.find_spec("lightning_landscape") is None)' \
    >/dev/null 2>&1; then
    return 0
  fi

  if ! "$PY" -c 'import torch' >/dev/null 2>&1; then
    log "installing $TORCH_PIN (before anything that depends on torch)"
    pip_install "$TORCH_PIN"
  fi
  write_torch_constraint
  log "installing lightning-landscape[dev] (editable)"
  pip_install -c "$CONSTRAINTS" -e ".[dev]"
  echo "$want" >"$STAMP"
}

ensure_bench_env() {
  local want
  want="$(pyproject_hash)"
  if [[ "$want" != "$(cat "$BENCH_STAMP" 2>/dev/null || true)" ]]; then
    # pyhessian==0.1 declares plain `torch` and hessian-eigenthings `torch>=2.3`; the installed
    # torch satisfies both, and the constraint guarantees pip keeps it.
    write_torch_constraint
    log "installing lightning-landscape[bench]"
    pip_install -c "$CONSTRAINTS" -e ".[bench]"
    # curvlinops-for-pytorch needs backpack-for-pytorch, which requires torchvision; torchvision's
    # wheel for this torch is a CUDA build whose extension does not load (and breaks torchmetrics'
    # import). curvlinops' Hessian path never imports torchvision, so both go in without deps.
    pip_install -c "$CONSTRAINTS" --no-deps curvlinops-for-pytorch==3.0.1 backpack-for-pytorch
    pip_install -c "$CONSTRAINTS" einops einconv opt-einsum linear_operator tqdm unfoldNd
    echo "$want" >"$BENCH_STAMP"
  fi
}

existing_lint_paths() {
  # git does not keep empty folders, so in a fresh clone some of these may not exist yet.
  local p
  for p in "${LINT_PATHS[@]}"; do
    if [[ -e "$p" ]]; then echo "$p"; fi
  done
}

run_lint() {
  local paths
  mapfile -t paths < <(existing_lint_paths)
  log "ruff check ${paths[*]}"
  "$PY" -m ruff check "${paths[@]}"
  log "ruff format --check ${paths[*]}"
  "$PY" -m ruff format --check "${paths[@]}"
  log "mypy (strict, lightning_landscape)"
  "$PY" -m mypy
}

run_fmt() {
  local paths
  mapfile -t paths < <(existing_lint_paths)
  "$PY" -m ruff check --fix "${paths[@]}"
  "$PY" -m ruff format "${paths[@]}"
}

if [[ $# -eq 0 ]]; then
  usage
  exit 2
fi
cmd="$1"
shift

case "$cmd" in
  demo)
    ensure_env
    exec "$PY" -m lightning_landscape.cli demo "$@"
    ;;
  test)
    ensure_env
    run_lint
    exec "$PY" -m pytest "$@"
    ;;
  lint)
    [[ $# -eq 0 ]] || { log "lint takes no arguments"; exit 2; }
    ensure_env
    run_lint
    ;;
  fmt)
    [[ $# -eq 0 ]] || { log "fmt takes no arguments"; exit 2; }
    ensure_env
    run_fmt
    ;;
  bench)
    ensure_env
    ensure_bench_env
    exec "$PY" benchmarks/bench_cpu.py "$@"
    ;;
  setup)
    ensure_env
    ;;
  -h | --help | help)
    usage
    ;;
  *)
    log "unknown command: $cmd"
    usage
    exit 2
    ;;
esac
