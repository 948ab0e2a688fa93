/*
Device copies of the host tables of the multi-tensor kernels (AdamW, gradient zeroing), cached by
content: a training step whose tensors stay the same uploads nothing, and a CUDA graph captured
with a table keeps reading a valid one. Up to kTableCacheSize tables are kept; the least recently
used is freed to make room, except tables a graph capture used (pinned: a replay reads them).
*/
#pragma once
#include <cuda_runtime.h>
#include <string.h>

#include <vector>

#include "xft_cuda.h"

extern "C" cudaStream_t xft_cuda_stream(void);

namespace {

const size_t kTableCacheSize = 32;

struct DeviceTable {
  std::vector<unsigned char> host;
  void* dev = nullptr;
  unsigned long long used = 0;
  bool pinned = false;
};

// the device copy of `bytes` bytes of `host` (uploaded on a miss); *err set on failure (then NULL)
inline void* xft_device_table(std::vector<DeviceTable>& cache, const void* host, size_t bytes, int* err) {
  static unsigned long long clock = 0;
  *err = 0;
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(xft_cuda_stream(), &capturing) != cudaSuccess) capturing = cudaStreamCaptureStatusNone;
  for (DeviceTable& t : cache)
    if (t.host.size() == bytes && memcmp(t.host.data(), host, bytes) == 0) {
      t.used = ++clock;
      t.pinned = t.pinned || capturing != cudaStreamCaptureStatusNone;
      return t.dev;
    }
  if (cache.size() >= kTableCacheSize) {  // make room: the least recently used table no graph holds
    size_t victim = cache.size();
    for (size_t i = 0; i < cache.size(); i++)
      if (!cache[i].pinned && (victim == cache.size() || cache[i].used < cache[victim].used)) victim = i;
    if (victim < cache.size()) {
      if ((*err = xft_cuda_free(cache[victim].dev)) != 0) return nullptr;
      cache.erase(cache.begin() + victim);
    }
  }
  DeviceTable t;
  if ((*err = xft_cuda_malloc(&t.dev, bytes)) != 0) return nullptr;
  if ((*err = xft_cuda_memcpy_h2d(t.dev, host, bytes)) != 0) {
    xft_cuda_free(t.dev);
    return nullptr;
  }
  t.host.assign((const unsigned char*)host, (const unsigned char*)host + bytes);
  t.used = ++clock;
  t.pinned = capturing != cudaStreamCaptureStatusNone;
  cache.push_back(std::move(t));
  return cache.back().dev;
}

}  // namespace
