#!/usr/bin/env sh
# Wheels the GPU suite needs on the device image (Python 3.12, no network there) into .whl/
# (git-ignored), and .whl/COMMIT: the commit the suite records (the device copy has no .git).
# Run here, from anywhere in the checkout:  sh idflux/bench_perf/fetch_wheels.sh [--xformers]
set -eu
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
mkdir -p .whl
PKGS="diffusers==0.42.1 kornia==0.9.0 kornia_rs==0.2.0"
[ "${1:-}" = "--xformers" ] && PKGS="$PKGS xformers==0.0.35"
$PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 --platform any -d .whl $PKGS
COMMIT=$(git rev-parse --short HEAD)
[ -z "$(git status --porcelain --untracked-files=no)" ] || COMMIT="$COMMIT-dirty"
echo "$COMMIT" > .whl/COMMIT
echo "wrote .whl/ ($(ls .whl | wc -l) files) and .whl/COMMIT = $COMMIT; carry [\".whl\"] in the device call"
