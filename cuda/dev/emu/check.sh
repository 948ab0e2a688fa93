#!/bin/bash
# The GPU test files (test/3x, the leak and index-safety tests) against the CUDA backend run by the host
# emulation (cuda_runtime.h here), on a machine without a GPU. Builds the addon with XFT_EMU=ON
# into build-emu (and build-emu-asan for 'asan'), then runs tap with it. Modes:
#   quick    the default order (threads and blocks in index order, cp.async lands at wait_group)
#   shake    threads and blocks in reverse, then random order, and cp.async landing at issue:
#            a missing barrier or a read of another thread's unwritten result shows as a failure
#   asan     AddressSanitizer + alignment checks over global memory (out-of-bounds, use after free)
#   contract the kernels compiled with multiply-adds contracted into FMAs, as nvcc does by default
#            (-O2 -ffp-contract=fast -mfma; needs an x86-64 CPU with FMA): bit-for-bit promises hold?
# The emulated host can be changed through the environment (cuda_runtime.h: XFT_EMU_SMEM_OPTIN=101376
# plays an sm_86/sm_89 GPU's shared memory, XFT_EMU_DRIVER_VERSION=12040 an R550 driver, XFT_EMU_SM=75).
# Usage, from the repo root: bash cuda/dev/emu/check.sh [quick|shake|asan] [test files...]
# XFT_TEST_SEEDS="1 2 random" runs the files once per seed of the GPU tests' random inputs ('random':
# one from the clock, printed); unset, one run with the tests' fixed default seed (test/helpers/gpu.ts).
# Not a substitute for the GPU (no memory model between barriers, no timing); see cuda_runtime.h.
set -euo pipefail
MODE=${1:-quick}
shift || true
FILES=("$@")
[ ${#FILES[@]} -gt 0 ] || FILES=(test/10.tensor.ts test/15.backend.ts test/30.cuda.ts test/31.cuda_layers.ts test/32.cuda_train.ts test/33.cuda_model.ts test/34.cuda_vocab.ts test/35.cuda_attention.ts test/36.cuda_router.ts test/37.cuda_expand.ts test/37.cuda_switch.ts test/12.leak.ts test/13.index_safety.ts)
read -r -a SEEDS <<< "${XFT_TEST_SEEDS:-default}"
cd "$(dirname "$0")/../../.."

build() {  # out-dir, extra cmake-js flags
  npx cmake-js compile --out "$1" --CDXFT_EMU=ON "${@:2}" >"$1.log" 2>&1 || { tail -50 "$1.log"; exit 1; }
}
run() {  # addon, env... (once per seed; test/10 asserts that the backend is the emulated CUDA one)
  local addon=$1 seed
  shift
  for seed in "${SEEDS[@]}"; do
    local seeded=()
    case "$seed" in
      default) ;;
      random) seeded=(XFT_TEST_SEED=$(( (RANDOM << 15 | RANDOM) % 1000000 ))) ;;
      *) seeded=(XFT_TEST_SEED="$seed") ;;
    esac
    echo "== emulated CUDA backend: $* ${seeded[*]} ${FILES[*]}"
    env "$@" "${seeded[@]}" XFT_TEST_EXPECT_BACKEND=cuda XFT_ADDON_PATH="$PWD/$addon" npx tap --disable-coverage --timeout 3000 "${FILES[@]}"
  done
}

case "$MODE" in
  quick)
    build build-emu
    run build-emu/Release/xft.node XFT_EMU_ORDER=forward ;;
  shake)
    build build-emu
    run build-emu/Release/xft.node XFT_EMU_ORDER=reverse XFT_EMU_CP_ASYNC=eager
    run build-emu/Release/xft.node XFT_EMU_ORDER=random XFT_EMU_SEED=$RANDOM ;;
  contract)
    build build-emu-contract --CDXFT_EMU_CONTRACT=ON
    run build-emu-contract/Release/xft.node XFT_EMU_ORDER=forward ;;
  asan)
    build build-emu-asan --CDXFT_EMU_SANITIZE=ON
    run build-emu-asan/Release/xft.node LD_PRELOAD="$(gcc -print-file-name=libasan.so)" \
      ASAN_OPTIONS=detect_leaks=0:detect_stack_use_after_return=0:halt_on_error=1 ;;
  *) echo "usage: $0 [quick|shake|asan|contract] [test files...]" >&2; exit 2 ;;
esac
