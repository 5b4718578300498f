#!/usr/bin/env bash
# The project's test command: sets up the environment, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${HEADAVATAR_VENV:-.venv}/bin/activate"
# byte code is written as modules are first imported (setup.sh installs with --no-compile)
unset PYTHONDONTWRITEBYTECODE
# one torch thread per xdist worker: two workers on two cores, no oversubscription
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# lint first: a finding fails the test command (ruff comes with the dev extra)
python -m ruff check headavatar tests benchmarks
# the installed path (wheel -> fresh venv -> the commands from a folder without ../shared) runs beside
# pytest: its pip install waits on the disk and its commands fill the cores pytest leaves idle; its
# log is printed after pytest's (skipped when arguments select part of the suite, or with
# HEADAVATAR_SKIP_INSTALLED=1)
inst=""
if [ $# -eq 0 ] && [ "${HEADAVATAR_SKIP_INSTALLED:-0}" != 1 ]; then
  inst_log="$(mktemp "${TMPDIR:-/tmp}/headavatar-installed-log.XXXXXX")"
  # its own process group where setsid exists (util-linux), so that stopping this script (Ctrl-C,
  # a failed pytest) stops all of it; elsewhere (macOS) the check's own shell is stopped
  if command -v setsid >/dev/null; then
    setsid bash scripts/check_installed.sh > "$inst_log" 2>&1 &
    inst=$!; target="-$inst"
  else
    bash scripts/check_installed.sh > "$inst_log" 2>&1 &
    inst=$!; target="$inst"
  fi
  trap '[ -n "$inst" ] && kill -- "$target" 2>/dev/null; true' EXIT
  echo "[test] installed-path check started beside pytest (log: $inst_log)"
fi
set +e
python -m pytest -n "${HEADAVATAR_TEST_WORKERS:-2}" -q -p no:cacheprovider "$@"
rc=$?
set -e
# pytest exits 5 when no test ran: that is a failure for us too
[ $rc -eq 0 ] || exit $rc
if [ -n "$inst" ]; then
  set +e
  wait "$inst"
  irc=$?
  set -e
  inst=""
  cat "$inst_log"
  rm -f "$inst_log"
  [ $irc -eq 0 ] || { echo "[test] the installed-path check failed (exit $irc)"; exit $irc; }
fi
