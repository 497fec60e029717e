#!/usr/bin/env bash
# GPU suite: the GPU tests and every GPU benchmark, from the source tree, on a CUDA machine that
# already has torch and triton (nothing else is installed; tests of optional oracles such as
# kornia, insightface or diffusers skip themselves there). Writes into OUT_DIR (default ./gpu_results):
#   env.txt          idflux env (device, versions, backends)
#   tests.log        pytest output (kernels compiled, larger shapes, fp16/bf16)
#   bench.log        benchmark rows as printed
#   bench_cuda.json  benchmark rows (device, versions, commit in each row) + speed-ups
#   <op>.png         one plot per op, drawn from bench_cuda.json
# Optional pure-Python packages travel as wheels in .whl/ (git-ignored), e.g. for the engine's
# benchmarks (`adapter`, `sample`) and oracle tests:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 kornia==0.9.0 kornia_rs==0.2.0
# and pass .whl in the device call's `carry`. Without them those parts skip or record an error row.
# Budget: under 9 minutes on an H100/H200 (tests <= 170 s with pytest-xdist, each op's sweep stops
# starting cases after 45 s, the whole benchmark <= 330 s; bench_cuda.json is rewritten after every
# op, so a run cut by the limit keeps what it measured).
set -uo pipefail
OUT_DIR=${1:-gpu_results}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$OUT_DIR"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRITON_INTERPRET=0 IDFLUX_GPU_SUITE=1
PY=${PYTHON:-python3}
cd "$ROOT"
if ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/idflux-site "$ROOT"/.whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/idflux-site"
fi
status=0
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; $PY -m idflux env; } > "$OUT_DIR/env.txt" 2>&1 || status=1
cat "$OUT_DIR/env.txt"
# Most of the test time is Triton compiling kernel variants (CPU-bound): spread it over workers.
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
timeout 170 $PY -m pytest -q -rfEs -p no:cacheprovider --durations=15 $XDIST \
  tests/kernels tests/engine tests/losses tests/train tests/bench_perf tests/test_cli.py tests/test_environment.py 2>&1 | tee "$OUT_DIR/tests.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
timeout 330 $PY -m idflux bench --device cuda --op-budget 45 --out "$OUT_DIR/bench_cuda.json" --plot "$OUT_DIR" 2>&1 | tee "$OUT_DIR/bench.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
echo "gpu_suite: exit $status; results in $OUT_DIR"
exit $status
