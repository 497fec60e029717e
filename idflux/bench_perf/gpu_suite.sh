#!/usr/bin/env bash
# GPU suite, goal cases first. On a CUDA machine that has torch and triton (the device image), from
# the source tree, into OUT_DIR (default ./gpu_results), in this order:
#   1. goals (<= 170 s): `idflux bench --goals --device cuda`: the cases every goal is judged on, one
#      op at a time in the issues' goal order (16: region_attention SigLIP then ArcFace, adapter,
#      sampling step; 17: cosine_infonce, face_warp, training step), eager and CUDA-graph device
#      time, every case called once (Triton compiles, autotuning) before it is timed; goals.json and
#      the goal table goals.goals.md are rewritten after every op, so a run cut short keeps them;
#   2. tests (<= 60 s): the CUDA tests only (-p idflux.bench_perf.cuda_tests deselects the rest);
#   3. sweeps (<= 60 s): the wider benchmark sweeps -> bench_cuda.json + plots.
# The first run ends within 5 minutes (plus the wheels' install). Written into OUT_DIR:
#   run.txt          commit, device, driver, versions (also in every JSON row), start/end time
#   goals.json, goals.goals.md, goals.log    phase 1
#   tests.log        phase 2;  bench_cuda.json, bench.log, <op>.png, roofline_*.png   phase 3
# `gpu_suite.sh --list` prints the phases and the goals in order and exits (no GPU needed).
#
# How to run it with the device tool (the device copy has no .git: the commit travels in .whl/COMMIT):
#   here, once:  sh idflux/bench_perf/fetch_wheels.sh      # diffusers + kornia wheels and .whl/COMMIT
#   (after a new commit, rerun it or just: git rev-parse --short HEAD > .whl/COMMIT)
#   device run:  carry [".whl"], timeout_s 420, command:
#     bash idflux/bench_perf/gpu_suite.sh $OUT
#   The files come back from $OUT (at most 8 files: run.txt, goals.json, goals.goals.md, goals.log,
#   tests.log, bench.log, bench_cuda.json and one plot; the rest of the plots stay unless asked for).
#   Optional: xformers (the region_attention `xformers` rows) as a wheel in .whl too
#   (fetch_wheels.sh --xformers); without it those rows say why.
# Commit the returned folder under idflux/bench_perf/results/<device>_<date>/ with the device name.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-python3}
if [ "${1:-}" = "--list" ]; then
  cd "$ROOT" && PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec $PY -m idflux.bench_perf.suite --list
fi
OUT_DIR=${1:-gpu_results}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRITON_INTERPRET=0 IDFLUX_GPU_SUITE=1
cd "$ROOT"
if ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/idflux-site "$ROOT"/.whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/idflux-site"
fi
# The commit: passed in ($IDFLUX_COMMIT), else git, else .whl/COMMIT written here before the carry.
IDFLUX_COMMIT=${IDFLUX_COMMIT:-$($PY -m idflux.bench_perf.suite --run-id 2>/dev/null || echo unknown)}
export IDFLUX_COMMIT
{
  echo "commit: $IDFLUX_COMMIT"
  echo "start: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
  $PY -m idflux env
} > "$OUT_DIR/run.txt" 2>&1
cat "$OUT_DIR/run.txt"
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
export XDIST
status=0
phase() {  # name, log file, command...
  local name=$1 log=$2; shift 2
  echo "== $name: $*" | tee -a "$OUT_DIR/run.txt"
  local t0=$SECONDS
  eval "$@" 2>&1 | tee "$OUT_DIR/$log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT_DIR/run.txt"
  [ "$rc" = 0 ] || status=1
}
phase goals goals.log "timeout 170 $PY -m idflux bench --goals --device cuda --budget 0 --out '$OUT_DIR/goals.json'"
phase tests tests.log "timeout 60 $PY -m pytest -q -rfEs -p no:cacheprovider -p idflux.bench_perf.cuda_tests $XDIST \
  tests/kernels tests/engine tests/losses tests/train"
phase sweeps bench.log "timeout 60 $PY -m idflux bench region_attention cosine_infonce face_warp adapter --device cuda \
  --op-budget 15 --out '$OUT_DIR/bench_cuda.json' --plot '$OUT_DIR'"
echo "end: $(date -u +%FT%TZ)" >> "$OUT_DIR/run.txt"
echo "gpu_suite: exit $status; results in $OUT_DIR"
exit $status
