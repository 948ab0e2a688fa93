/*
CPU twin of cuda/timer.cu (cuda/timer.h): timestamps from the host's steady clock. On the CPU backend
the ops run synchronously, so the time between two timestamps is the ops' own.
*/
#include <chrono>
#include <vector>

#include "../../cuda/timer.h"

namespace {
std::vector<std::chrono::steady_clock::time_point> g_stamps;
}

extern "C" int xft_cpu_timer_reset(int count) {
  g_stamps.assign(count < 0 ? 0 : count, std::chrono::steady_clock::time_point());
  return 0;
}

extern "C" int xft_cpu_timer_record(int slot) {
  if (slot < 0 || slot >= (int)g_stamps.size()) return 1;
  g_stamps[slot] = std::chrono::steady_clock::now();
  return 0;
}

extern "C" int xft_cpu_timer_elapsed(int from, int to, float* ms) {
  const int n = (int)g_stamps.size();
  if (from < 0 || from >= n || to < 0 || to >= n) return 1;
  *ms = std::chrono::duration<float, std::milli>(g_stamps[to] - g_stamps[from]).count();
  return 0;
}
