/*
The opt-in above 48 KiB of dynamic shared memory (cudaFuncSetAttribute), made once per kernel and
size instead of before every launch: a driver call per launch costs microseconds on the host, more
than a small kernel runs. The largest size granted so far is remembered per kernel (the addon's
launches come from one thread).
*/
#pragma once
#include <cuda_runtime.h>

#include <unordered_map>

namespace {

template <typename K>
cudaError_t xft_allow_smem(K* kernel, size_t bytes) {
  static std::unordered_map<const void*, size_t> granted;
  size_t& have = granted[(const void*)kernel];
  if (bytes <= have) return cudaSuccess;
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
  if (e == cudaSuccess) have = bytes;
  return e;
}

}  // namespace
