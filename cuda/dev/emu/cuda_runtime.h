// cuda_runtime.h for cuda/dev/emu/run.sh: a host emulation of the bits of CUDA the xft kernels
// use. Every CUDA thread of a block is a coroutine on one OS thread (started with ucontext,
// switched with _setjmp/_longjmp: no signal-mask syscalls); blocks run one after another.
// Warp barriers open when every lane of the warp waits at one, the block barrier when every
// live thread does; anything else is reported as a deadlock (divergent barrier or shuffle).
#pragma once
#include <ucontext.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <limits.h>
#include <vector>
#include <functional>
#include <algorithm>
using std::min;
using std::max;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 { unsigned x, y, z; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
struct uint3 { unsigned x, y, z; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return uint4{a, b, c, d}; }
inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

typedef void* cudaStream_t;
typedef void* cudaEvent_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaMallocAsync(void** p, size_t n, cudaStream_t) { *p = malloc(n ? n : 1); memset(*p, 0xCD, n); return cudaSuccess; }
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t) { free(p); return cudaSuccess; }
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) { memset(p, v, n); return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t e) { return e ? "emu error" : "no error"; }
inline int cudaEventCreate(cudaEvent_t*) { return 0; }
inline int cudaEventRecord(cudaEvent_t, cudaStream_t) { return 0; }
inline int cudaEventSynchronize(cudaEvent_t) { return 0; }
inline int cudaEventElapsedTime(float* ms, cudaEvent_t, cudaEvent_t) { *ms = 0; return 0; }

inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
template <class T> inline T __ldcs(const T* p) { return *p; }

struct EmuThread { ucontext_t ctx; jmp_buf jb; int state; bool started; };  // 0 runnable, 1 warp barrier, 2 block barrier, 3 done
struct EmuBlock {
  std::vector<EmuThread> th;
  std::vector<char> stacks;
  ucontext_t sched;
  jmp_buf sched_jb;
  unsigned cur = 0, n = 0;
  unsigned long long slot[1024];
  std::function<void()> fn;
};
inline EmuBlock g_blk;
inline long long g_emu_errors = 0;
inline const size_t kEmuStack = 256 * 1024;

inline void emu_wait(int state) {
  EmuThread& t = g_blk.th[g_blk.cur];
  t.state = state;
  if (_setjmp(t.jb) == 0) _longjmp(g_blk.sched_jb, 1);
}
inline void __syncthreads() { emu_wait(2); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu_wait(1); }

template <class T> inline T emu_shfl(T v, unsigned src_lane) {
  const unsigned me = threadIdx.x, base = me & ~31u;
  memcpy(&g_blk.slot[me], &v, sizeof(T));
  __syncwarp();
  if (base + src_lane >= g_blk.n) { fprintf(stderr, "EMU: shuffle from a missing lane\n"); g_emu_errors++; }
  T r;
  memcpy(&r, &g_blk.slot[base + src_lane], sizeof(T));
  __syncwarp();
  return r;
}
template <class T> inline T __shfl_xor_sync(unsigned, T v, int o, int w = 32) { return emu_shfl(v, (threadIdx.x % 32) ^ o); }
template <class T> inline T __shfl_sync(unsigned, T v, int src, int w = 32) {
  const int lane = threadIdx.x % 32;
  return emu_shfl(v, (lane & ~(w - 1)) + (src & (w - 1)));
}
template <class T> inline T __shfl_up_sync(unsigned, T v, unsigned d, int w = 32) {
  const int lane = threadIdx.x % 32;
  return emu_shfl(v, (unsigned)((lane % w) >= (int)d ? lane - (int)d : lane));
}

inline void emu_trampoline() {
  g_blk.fn();
  g_blk.th[g_blk.cur].state = 3;
  _longjmp(g_blk.sched_jb, 1);
}

inline void emu_launch(dim3 grid, dim3 block, std::function<void()> fn) {
  const unsigned n = block.x;
  if (n == 0 || n > 1024 || grid.x == 0) { fprintf(stderr, "EMU: bad launch %u x %u\n", grid.x, n); g_emu_errors++; return; }
  gridDim = grid;
  blockDim = block;
  g_blk.fn = fn;
  g_blk.n = n;
  g_blk.th.assign(n, EmuThread{});
  if (g_blk.stacks.size() < n * kEmuStack) g_blk.stacks.resize(n * kEmuStack);
  for (unsigned b = 0; b < grid.x; b++) {
    blockIdx = uint3{b, 0, 0};
    for (unsigned t = 0; t < n; t++) {
      EmuThread& th = g_blk.th[t];
      getcontext(&th.ctx);
      th.ctx.uc_stack.ss_sp = g_blk.stacks.data() + t * kEmuStack;
      th.ctx.uc_stack.ss_size = kEmuStack;
      th.ctx.uc_link = nullptr;
      makecontext(&th.ctx, emu_trampoline, 0);
      th.state = 0;
      th.started = false;
    }
    for (;;) {
      for (unsigned t = 0; t < n; t++)
        if (g_blk.th[t].state == 0) {
          g_blk.cur = t;
          threadIdx = uint3{t, 0, 0};
          if (_setjmp(g_blk.sched_jb) == 0) {
            if (!g_blk.th[t].started) {
              g_blk.th[t].started = true;
              setcontext(&g_blk.th[t].ctx);
            }
            _longjmp(g_blk.th[t].jb, 1);
          }
        }
      bool all_done = true, released = false;
      for (unsigned t = 0; t < n; t++) all_done = all_done && g_blk.th[t].state == 3;
      if (all_done) break;
      for (unsigned w0 = 0; w0 < n; w0 += 32) {  // a warp barrier opens when every lane of the warp is at one
        bool all1 = true;
        for (unsigned t = w0; t < std::min(n, w0 + 32); t++) all1 = all1 && g_blk.th[t].state == 1;
        if (all1) {
          for (unsigned t = w0; t < std::min(n, w0 + 32); t++) g_blk.th[t].state = 0;
          released = true;
        }
      }
      if (!released) {  // the block barrier opens when every live thread is at it
        bool all2 = true;
        for (unsigned t = 0; t < n; t++) all2 = all2 && (g_blk.th[t].state == 2 || g_blk.th[t].state == 3);
        if (all2) {
          for (unsigned t = 0; t < n; t++)
            if (g_blk.th[t].state == 2) g_blk.th[t].state = 0;
          released = true;
        }
      }
      if (!released) {
        fprintf(stderr, "EMU: deadlock / divergent barrier in block %u:", b);
        for (unsigned t = 0; t < n; t++) fprintf(stderr, " %d", g_blk.th[t].state);
        fprintf(stderr, "\n");
        g_emu_errors++;
        exit(3);
      }
    }
  }
}
