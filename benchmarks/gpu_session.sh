#!/usr/bin/env bash
# One call on the GPU machine: install gsplat from the carried wheel (when one is carried; gsplat is
# optional, the default rasteriser is the Triton one), build (or reuse) its CUDA kernels, then run
# the requested steps, writing logs and JSON under $OUT.
#   bash benchmarks/gpu_session.sh [triton] [parity] [frame] [fa] [flare] [train:SUBJECT_DIR ...]
# Uses an installed gsplat, else installs .whl/gsplat-*.whl (carried to a machine without network). A stripped, gzipped build of the
# kernels comes back as $OUT/gsplat_cuda.so.gz; carried back in .whl/ it skips the compile.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=/tmp/site:$PWD TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=/tmp/ext
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
have_gsplat=1
if python3 -c "import gsplat" 2>/dev/null; then
  :  # gsplat already installed (or carried in an earlier call)
elif ! ls .whl/gsplat-*.whl >/dev/null 2>&1 && [ ! -d /tmp/site/gsplat ]; then
  have_gsplat=0; echo "no gsplat wheel carried: gsplat steps skipped, the triton backend is used"
elif [ ! -d /tmp/site/gsplat ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/gsplat-*.whl || exit 1
  if [ -f .whl/gsplat_cuda.so.gz ]; then  # a build from an earlier call: load it instead of compiling
    gunzip -c .whl/gsplat_cuda.so.gz > /tmp/gsplat_cuda.so
    cat > /tmp/site/gsplat/csrc.py <<'PY'
import importlib.util, torch  # noqa: F401  (torch first: the extension links against it)
_spec = importlib.util.spec_from_file_location("gsplat_cuda", "/tmp/gsplat_cuda.so")
_m = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_m)
globals().update({k: getattr(_m, k) for k in dir(_m) if not k.startswith("__")})
PY
  fi
fi
if [ "$have_gsplat" = 1 ]; then
  t0=$(date +%s)
  python3 -c "from gsplat.cuda._backend import _C; assert _C is not None, 'gsplat kernels unavailable'" || exit 1
  echo "gsplat kernels ready in $(( $(date +%s) - t0 )) s"
  so=$(find /tmp/ext -name gsplat_cuda.so 2>/dev/null | head -1)
  if [ -n "$so" ] && [ ! -f .whl/gsplat_cuda.so.gz ]; then
    strip -S -o /tmp/g.so "$so" 2>/dev/null || cp "$so" /tmp/g.so; gzip -c /tmp/g.so > "$OUT/gsplat_cuda.so.gz"; ls -la "$OUT/gsplat_cuda.so.gz"
  fi
fi
rc=0
for step in "$@"; do
  echo "=== $step ($(date +%T))"
  case "$step" in
    triton) python3 benchmarks/gaussian_parity.py --backend triton --batches 1,16,64 --avatar --out "$OUT/triton.json" 2>&1 | tee "$OUT/triton.log" || rc=1 ;;
    parity) [ "$have_gsplat" = 1 ] || { echo "parity (gsplat) skipped: no gsplat"; continue; }
      python3 benchmarks/gaussian_parity.py --backend gsplat --quick --no-timing --out "$OUT/parity.json" 2>&1 | tee "$OUT/parity.log" || rc=1 ;;
    frame)  # issue 15's pending figures: fuse_frame=triton on CUDA (parity, the frame with it), prefetch_bwd, a kernel profile
      python3 -m pytest -q tests/test_mlp_triton.py 2>&1 | tail -3 | tee "$OUT/frame_tests.log" || rc=1
      python3 benchmarks/avatar_frame.py --batches 1,16,64 --modes off,triton,compile --out "$OUT/avatar_frame.json" 2>&1 | grep -v Warn | tail -20 | tee "$OUT/avatar_frame.log" || rc=1
      python3 benchmarks/gaussian_parity.py --backend triton --batches 1,16,64 --fwd-variants --out "$OUT/fwd_variants.json" 2>&1 | tail -25 | tee "$OUT/fwd_variants.log" || rc=1
      python3 -m pytest -q tests/test_skinning_triton.py 2>&1 | tail -3 | tee -a "$OUT/frame_tests.log" || rc=1
      python3 benchmarks/frame_profile.py --batches 1,16 --modes off,triton --train-batch 16 --out "$OUT/frame_profile.json" 2>&1 | grep -v -e Warn -e USDT | tee "$OUT/frame_profile.log" || rc=1 ;;
    fa) python3 benchmarks/flashavatar_gpu.py --out "$OUT/fa.json" --ttq-seconds "${TTQ_SECONDS:-150}" --memory-frames 200,2000 2>&1 | tee "$OUT/fa.log" || rc=1 ;;
    flare) python3 benchmarks/flare_speed.py --device cuda --out "$OUT/flare.json" ${FLARE_ARGS:-} 2>&1 | tee "$OUT/flare.log" || rc=1 ;;
    train:*)
      s=${step#train:}; n=$(basename "$s"); r=/tmp/runs/$n
      python3 -m headavatar train "$s" -o "$r" --device cuda ${TRAIN_ARGS:-} 2>&1 | tee "$OUT/train_$n.log" | tail -5 || rc=1
      python3 -m headavatar eval "$r" --device cuda --no-video --no-lpips 2>&1 | tee "$OUT/eval_$n.log" || rc=1
      mkdir -p "$OUT/run_$n"; cp "$r/run.json" "$r/curves.jsonl" "$OUT/run_$n/"; cp "$r"/eval/metrics.json "$OUT/run_$n/" 2>/dev/null
      ck=$(ls "$r"/checkpoints/*.pt 2>/dev/null | tail -1); [ -n "$ck" ] && cp "$ck" "$OUT/run_$n/" ;;
    *) echo "unknown step $step"; rc=2 ;;
  esac
done
exit $rc
