#!/usr/bin/env bash
# The GPU session's checklist, run on the GPU host from the project root after staging
# (../shared/gpu/README.md). One device command may run 10 minutes at most, so it comes in stages:
#   bash .gpu/enter.sh "bash scripts/gpu-check.sh test"        # suite on CUDA + GPU tests with XFT_SYNC=1
#   bash .gpu/enter.sh "bash scripts/gpu-check.sh sanitizer"   # GPU tests under compute-sanitizer
#   bash .gpu/enter.sh "bash scripts/gpu-check.sh demo bench"  # demo on the GPU, both benchmarks
# (no argument: every stage). Each step has its own time limit (STEP_TIMEOUT seconds, default 280)
# so that one slow step cannot take the whole call. Logs go to $OUT (or ./gpu-out).
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
limit=${STEP_TIMEOUT:-280}
stages=${*:-test sanitizer demo bench}
GPU_TESTS="test/30.cuda.ts test/31.cuda_layers.ts test/32.cuda_train.ts test/33.cuda_model.ts test/34.cuda_vocab.ts test/35.cuda_attention.ts test/13.index_safety.ts"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
node dist/lib/cli.js info | tee "$out/info.txt"
step() {
  echo "== $1 ($(date +%T))"
  shift
  timeout "$limit" "$@" > "$out/$LOG" 2>&1
  local rc=$?
  echo "exit $rc ($LOG)$([ $rc = 124 ] && echo ", stopped after ${limit} s")"
  grep -E '^# \{|^not ok|ERROR SUMMARY' "$out/$LOG" | head -20
}
for stage in $stages; do
  case $stage in
    test)
      LOG=test.log step "npm test (CUDA backend)" npx tap --disable-coverage
      LOG=sync.log step "GPU tests with XFT_SYNC=1" env XFT_SYNC=1 npx tap --disable-coverage $GPU_TESTS ;;
    sanitizer)
      if command -v compute-sanitizer >/dev/null; then
        for tool in memcheck racecheck; do
          LOG=sanitizer-$tool.log step "compute-sanitizer $tool" compute-sanitizer --tool $tool --target-processes all --error-exitcode 3 \
            npx tap --disable-coverage --jobs 1 --timeout 1800 $GPU_TESTS
        done
      else echo "compute-sanitizer not found"; fi ;;
    demo)
      LOG=demo.log step "xft demo on the GPU" node dist/lib/cli.js demo --out "$out/demo" --scale 0.5
      tail -12 "$out/demo.log" ;;
    bench)
      LOG=bench.log step "bench/kernels" node dist/bench/kernels.js --out "$out/kernels.json"
      tail -40 "$out/bench.log"
      LOG=bench-train.log step "bench/train" node dist/bench/train.js --out "$out/train.json"
      tail -30 "$out/bench-train.log" ;;
    *) echo "unknown stage $stage (test, sanitizer, demo, bench)" ;;
  esac
done
