// cub::DeviceRadixSort::SortPairs of the host emulation (cuda/dev/emu): a stable sort of the
// pairs by the key bits [begin_bit, end_bit), like the radix sort; the first call (temp == NULL)
// asks for scratch bytes, as cub does. Inside a CUDA graph capture the sort is recorded as a node
// (it runs at each replay, on what the replay's earlier nodes wrote), not run at the capture.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <numeric>
#include <vector>

namespace cub {
struct DeviceRadixSort {
  template <class K, class V>
  static cudaError_t SortPairs(void* temp, size_t& temp_bytes, const K* keys_in, K* keys_out, const V* values_in,
                               V* values_out, int n, int begin_bit = 0, int end_bit = sizeof(K) * 8,
                               cudaStream_t stream = 0) {
    if (temp == nullptr) {
      temp_bytes = 256 + (size_t)n * sizeof(K);
      return cudaSuccess;
    }
    if (n <= 0) return cudaSuccess;
    if (!emu_device_range(temp, temp_bytes, "SortPairs temp") || !emu_device_range(keys_in, n * sizeof(K), "SortPairs keys_in") ||
        !emu_device_range(keys_out, n * sizeof(K), "SortPairs keys_out") ||
        !emu_device_range(values_in, n * sizeof(V), "SortPairs values_in") ||
        !emu_device_range(values_out, n * sizeof(V), "SortPairs values_out"))
      return cudaErrorInvalidValue;
    auto sort = [=] {
      const int bits = end_bit - begin_bit;
      const unsigned long long mask = bits >= 64 ? ~0ull : ((1ull << bits) - 1);
      auto key = [&](int i) { return ((unsigned long long)keys_in[i] >> begin_bit) & mask; };
      std::vector<int> idx(n);
      std::iota(idx.begin(), idx.end(), 0);
      std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return key(a) < key(b); });
      std::vector<K> k(n);
      std::vector<V> v(n);
      for (int i = 0; i < n; i++) k[i] = keys_in[idx[i]], v[i] = values_in[idx[i]];
      std::copy(k.begin(), k.end(), keys_out);
      std::copy(v.begin(), v.end(), values_out);
    };
    emu_land_h2d();  // stream order
    if (!emu_capture_record(sort)) sort();
    return cudaSuccess;
  }
};
}  // namespace cub
