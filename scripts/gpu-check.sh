#!/usr/bin/env bash
# The GPU session's one prepared check, within 8 minutes on an H100/H200: run on the GPU host from the
# project root after staging (../shared/gpu/README.md):
#   bash .gpu/enter.sh "bash scripts/gpu-check.sh"        (device run: carry [".gpu"], timeout_s 540)
# GPU tests, compute-sanitizer memcheck + racecheck over every kernel family, bench/kernels at the
# 1.3B-layer shape and bench/train at the ~100M model beside PyTorch; one JSON and one markdown summary
# (and a tarball of the logs) in $OUT. The steps, their time limits and the options are in
# scripts/gpu-check.mjs (`--help`); XFT_GPU_CHECK_DRY=1 runs the same orchestration without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ ! -f dist/lib/cli.js ] || [ ! -f dist/bench/kernel_families.js ]; then
  echo "gpu-check: dist/ is missing or stale: build the TypeScript here first (npx tsc -p tsconfig.json) and stage it" >&2
  exit 2
fi
exec node scripts/gpu-check.mjs "$@"
