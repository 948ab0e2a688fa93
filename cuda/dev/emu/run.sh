#!/bin/bash
# Host emulation of cuda/routing.cu and cuda/merge.cu, for machines without a GPU (cuda_runtime.h
# here says how it works and what it checks). Then the checks of
# cuda/dev/test_routing_merge.cu run against the CPU twins, with small shapes (XFT_DEV_SMALL).
# Variant 'tiny' shrinks the grid caps so grid-stride loops and several tokens per group run.
# Not a substitute for the GPU: it checks indexing, ordering, barriers, not the memory model.
# Usage, from the repo root: bash cuda/dev/emu/run.sh [full|tiny]   (about 2 minutes each)
set -euo pipefail
V=${1:-full}
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
for f in routing merge runtime; do python3 "$HERE/convert.py" "cuda/$f.cu" "$OUT/$f.cc"; done
if [ "$V" = tiny ]; then
  sed -i 's/#define ROUTE_TARGET_BLOCKS 1024/#define ROUTE_TARGET_BLOCKS 2/; s/#define ROUTE_ORDER_MAX_GRID 4096/#define ROUTE_ORDER_MAX_GRID 3/; s/#define ROUTE_BACKWARD_MAX_GRID 8192/#define ROUTE_BACKWARD_MAX_GRID 2/' "$OUT/routing.cc"
  sed -i 's/#define MERGE_FORWARD_MAX_GRID 2048/#define MERGE_FORWARD_MAX_GRID 3/; s/#define MERGE_BACKWARD_MAX_GRID 1024/#define MERGE_BACKWARD_MAX_GRID 2/' "$OUT/merge.cc"
fi
g++ -std=c++17 -O2 -ffp-contract=off -w -DXFT_DEV_SMALL -I"$HERE" -Icuda -Ibinding/cpu \
  -x c++ cuda/dev/test_routing_merge.cu "$OUT/routing.cc" "$OUT/merge.cc" "$OUT/runtime.cc" \
  binding/cpu/routing.cc binding/cpu/merge.cc binding/cpu/fill.cc -o "$OUT/test"
"$OUT/test"
