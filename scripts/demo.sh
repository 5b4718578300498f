#!/usr/bin/env bash
# The main job: sets up the environment, then runs `headavatar demo` (extra arguments are passed on).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${HEADAVATAR_VENV:-.venv}/bin/activate"
exec headavatar demo "$@"
