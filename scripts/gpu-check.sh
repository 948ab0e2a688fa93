#!/usr/bin/env bash
# The GPU session's checklist in one command, run on the GPU host from the project root after
# staging (../shared/gpu/README.md):  bash .gpu/enter.sh "bash scripts/gpu-check.sh"
# Logs go to $OUT (or ./gpu-out): the whole suite on the CUDA backend, the GPU comparison tests
# with XFT_SYNC=1 and under compute-sanitizer (memcheck, racecheck), the demo on the GPU, then the
# kernel benchmark.
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
node dist/lib/cli.js info | tee "$out/info.txt"
step() { echo "== $1"; shift; "$@" > "$out/$LOG" 2>&1; echo "exit $? ($LOG)"; grep -E '^# \{|^not ok' "$out/$LOG" | head -20; }
LOG=test.log step "npm test (CUDA backend)" npx tap --disable-coverage
LOG=sync.log step "GPU tests with XFT_SYNC=1" env XFT_SYNC=1 npx tap --disable-coverage test/30.cuda.ts test/31.cuda_layers.ts test/32.cuda_train.ts test/33.cuda_model.ts
if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    LOG=sanitizer-$tool.log step "compute-sanitizer $tool" compute-sanitizer --tool $tool --target-processes all --error-exitcode 3 \
      npx tap --disable-coverage --jobs 1 --timeout 1800 test/30.cuda.ts test/31.cuda_layers.ts test/32.cuda_train.ts test/33.cuda_model.ts
  done
fi
LOG=demo.log step "xft demo on the GPU" node dist/lib/cli.js demo --out "$out/demo" --scale 0.5
tail -12 "$out/demo.log"
LOG=bench.log step "bench/kernels" node dist/bench/kernels.js --out "$out/kernels.json"
tail -40 "$out/bench.log"
LOG=bench-train.log step "bench/train" node dist/bench/train.js --out "$out/train.json"
tail -30 "$out/bench-train.log"
