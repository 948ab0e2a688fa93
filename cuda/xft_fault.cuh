/*
Index faults from kernels (xft_cuda.h, "Index faults"): a kernel that meets an out-of-range index
skips the access and calls xft_raise_fault; the first fault since the last synchronisation wins
(atomicCAS on kind), the others are dropped. The host reads the record only where the stream
already waits, so a valid run costs one predicated branch per index and no extra sync.
*/
#pragma once
#include "xft_cuda.h"

namespace {

__device__ __forceinline__ void xft_raise_fault(xft_cuda_fault* f, int kind, long long index, int value, int bound) {
  if (f == nullptr) return;
  if (atomicCAS(&f->kind, 0, -1) == 0) {  // -1: claimed, fields being written
    f->index = index > 0x7fffffff ? 0x7fffffff : (int)index;
    f->value = value;
    f->bound = bound;
    __threadfence();
    atomicExch(&f->kind, kind);
  }
}

}  // namespace
