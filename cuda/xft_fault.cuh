/*
Index faults from kernels (xft_cuda.h, "Index faults"): a kernel that meets an out-of-range index
skips the access and calls xft_raise_fault. The first op to fault since the last synchronisation
claims the record (atomicCAS on kind; ops run in stream order), and among its faults the smallest
index wins (atomicMax on the complement of index:value), so the report does not depend on thread
timing. The host reads the record only where the stream already waits: a valid run costs one
predicated branch per index and no extra synchronisation.
*/
#pragma once
#include "xft_cuda.h"

namespace {

__device__ __forceinline__ void xft_raise_fault(xft_cuda_fault_slot* f, int kind, long long index, int value, int bound) {
  if (f == nullptr) return;
  const int prev = atomicCAS(&f->kind, 0, kind);
  if (prev != 0 && prev != kind) return;  // an earlier op's fault is kept
  f->bound = bound;                        // the same for every thread of the op
  const unsigned long long i = (unsigned long long)(index > 0x7fffffffLL ? 0x7fffffffLL : index);
  atomicMax(&f->worst, ~((i << 32) | (unsigned)value));
}

}  // namespace
