#!/bin/bash
# Host emulation of cuda/routing.cu and cuda/merge.cu, for machines without a GPU: every CUDA
# thread of a block runs as a coroutine on one OS thread (cuda_runtime.h here), warp shuffles and
# barriers are emulated and checked for divergence (a lane that misses a barrier is a deadlock
# and exits 3). convert.py turns kernel launches into emu_launch calls. Then the checks of
# cuda/dev/test_routing_merge.cu run against the CPU twins, with small shapes (XFT_DEV_SMALL).
# Variant 'tiny' shrinks the grid caps so grid-stride loops and several tokens per group run.
# Not a substitute for the GPU: it checks indexing, ordering, barriers, not the memory model.
# Usage, from the repo root: bash cuda/dev/emu/run.sh [full|tiny]   (about 2 minutes each)
set -euo pipefail
V=${1:-full}
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
mkdir -p "$OUT/inc"
cp "$HERE/cuda_runtime.h" "$OUT/inc/"
for f in routing merge; do python3 "$HERE/convert.py" "cuda/$f.cu" > "$OUT/$f.cc"; done
if [ "$V" = tiny ]; then
  sed -i 's/#define ROUTE_TARGET_BLOCKS 1024/#define ROUTE_TARGET_BLOCKS 2/; s/#define ROUTE_ORDER_MAX_GRID 4096/#define ROUTE_ORDER_MAX_GRID 3/; s/#define ROUTE_BACKWARD_MAX_GRID 8192/#define ROUTE_BACKWARD_MAX_GRID 2/' "$OUT/routing.cc"
  sed -i 's/#define MERGE_FORWARD_MAX_GRID 2048/#define MERGE_FORWARD_MAX_GRID 3/; s/#define MERGE_BACKWARD_MAX_GRID 1024/#define MERGE_BACKWARD_MAX_GRID 2/' "$OUT/merge.cc"
fi
g++ -std=c++17 -O2 -ffp-contract=off -Wno-unknown-pragmas -Wno-comment -DXFT_DEV_SMALL -I"$OUT/inc" -Icuda -Ibinding/cpu \
  -x c++ cuda/dev/test_routing_merge.cu "$OUT/routing.cc" "$OUT/merge.cc" "$HERE/runtime_emu.cc" \
  binding/cpu/routing.cc binding/cpu/merge.cc binding/cpu/fill.cc -o "$OUT/test"
"$OUT/test"
