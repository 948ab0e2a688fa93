/*
Device timers for profiling: a pool of cudaEvents recorded on the runtime's stream (cuda/timer.h).
No kernels. CPU twin: binding/cpu/timer.cc (the host clock).
*/
#include <cuda_runtime.h>

#include <vector>

#include "timer.h"

extern "C" cudaStream_t xft_cuda_stream(void);

namespace {
std::vector<cudaEvent_t> g_timers;
}

extern "C" int xft_cuda_timer_reset(int count) {
  for (cudaEvent_t e : g_timers) cudaEventDestroy(e);
  g_timers.clear();
  for (int i = 0; i < count; i++) {
    cudaEvent_t e;
    int err = cudaEventCreate(&e);
    if (err) return err;
    g_timers.push_back(e);
  }
  return 0;
}

extern "C" int xft_cuda_timer_record(int slot) {
  if (slot < 0 || slot >= (int)g_timers.size()) return cudaErrorInvalidValue;
  return cudaEventRecord(g_timers[slot], xft_cuda_stream());
}

extern "C" int xft_cuda_timer_elapsed(int from, int to, float* ms) {
  const int n = (int)g_timers.size();
  if (from < 0 || from >= n || to < 0 || to >= n) return cudaErrorInvalidValue;
  int err = cudaEventSynchronize(g_timers[to]);
  if (err) return err;
  return cudaEventElapsedTime(ms, g_timers[from], g_timers[to]);
}
