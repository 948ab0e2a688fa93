/*
PTX wrappers of the bf16 tensor-core path (sm_80+): cp.async 16-byte copies with zero fill,
ldmatrix.x4 (.trans), mma.sync m16n8k16 (bf16 in, fp32 accumulate), and the packing of two fp32
into a bf16x2 register. The same instructions cuda/grouped_gemm.cu uses; the emulator
(cuda/dev/emu) implements each of them (convert.py inlines this header before it rewrites the asm).

Fragment layouts (lane t = 4g + i):
  A 16x16 row:  a0 (g, 2i..2i+1)  a1 (g+8, 2i..)  a2 (g, 2i+8..)  a3 (g+8, 2i+8..)
  B 16x8 col:   b0 (k 2i..2i+1, n g)  b1 (k 2i+8.., n g)
  C/D 16x8:     c0, c1 (g, 2i..2i+1)  c2, c3 (g+8, 2i..2i+1)
So the C fragments of two adjacent n8 tiles are, packed to bf16, the A fragment of one k16 step.
*/
#pragma once
#include <stdint.h>

#include "xft_math.h"
#if defined(__CUDACC__)
#include <cuda_bf16.h>
#endif

namespace {

__device__ __forceinline__ uint32_t smem_u32(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

// 16 bytes global -> shared; bytes past src_bytes (0..16) are zero-filled and not read
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// d += a (16 x 16, row) * b (16 x 8, col), bf16 in, fp32 accumulate
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// two fp32 rounded to bf16 (nearest even, as xft_f32_to_bf16) in one register, lo in the low half.
// On the device one cvt.rn.bf16x2.f32; the emulator (no __CUDA_ARCH__) takes the scalar twin, which
// agrees for every non-NaN input (a NaN stays a NaN, with another payload).
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
#if defined(__CUDA_ARCH__)
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
#else
  return (uint32_t)xft_f32_to_bf16(lo) | ((uint32_t)xft_f32_to_bf16(hi) << 16);
#endif
}

}  // namespace
