#!/usr/bin/env bash
# Download the peer libraries the reference tests compare against (NdLinear, tensor-spline,
# tltorch and its tensorly) as wheels into .whl/, for a GPU machine without network: carry .whl
# with the run and bench/gpu_check.sh installs them. The versions are the ones CI installs.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d .whl ndlinear==1.0.0 tensor-spline==1.0.0 tensorly==0.10.0 tensorly-torch==0.5.0
ls .whl
