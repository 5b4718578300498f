#!/usr/bin/env bash
# The project's test command: sets up the environment, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${HEADAVATAR_VENV:-.venv}/bin/activate"
# one torch thread per xdist worker: two workers on two cores, no oversubscription
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# lint first: a finding fails the test command (ruff comes with the dev extra)
python -m ruff check headavatar tests benchmarks
set +e
python -m pytest -n "${HEADAVATAR_TEST_WORKERS:-2}" -q -p no:cacheprovider "$@"
rc=$?
set -e
# pytest exits 5 when no test ran: that is a failure for us too
[ $rc -eq 0 ] || exit $rc
# the installed path: wheel -> fresh venv -> the commands from a folder without ../shared
# (skipped when arguments select part of the suite, or with HEADAVATAR_SKIP_INSTALLED=1)
if [ $# -eq 0 ] && [ "${HEADAVATAR_SKIP_INSTALLED:-0}" != 1 ]; then
  bash scripts/check_installed.sh
fi
