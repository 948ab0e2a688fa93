/*
CPU twin of cuda/embedding.cu: token embedding (HF nn.Embedding, no padding_idx).
  forward:  out[r, :] = table[ids[r], :]        ids i32 [R], table [V, d], out [R, d] (table dtype)
            a row whose id is outside [0, V) is written as zeros (lib/ops_layers.ts rejects such ids
            on CPU tensors; the kernels never read or write outside the table).
  backward: dtable[v, :] (+)= sum over r with ids[r] = v of dout[r, :]    dout [R, d], dtable f32 [V, d]
            Like the CUDA kernel: rows are grouped by id by a stable counting sort, each group is summed
            in token order in fp32, in chunks of XFT_EMBEDDING_CHUNK rows each from zero and then the
            chunk sums in order, and the sum is added to dtable (zeroed first unless accumulate), so
            CPU and GPU add in the same order.
*/
#include <string.h>

#include <vector>

#include "xft_cpu.h"

int xft_cpu_embedding_forward(const int* ids, const void* table, void* out, int dtype, int R, int V, int d) {
  const size_t row_bytes = (size_t)d * (dtype == XFT_BF16 ? 2 : 4);
  for (int r = 0; r < R; r++) {
    char* dst = (char*)out + (size_t)r * row_bytes;
    int id = ids[r];
    if (id >= 0 && id < V) memcpy(dst, (const char*)table + (size_t)id * row_bytes, row_bytes);
    else memset(dst, 0, row_bytes);
  }
  return 0;
}

int xft_cpu_embedding_backward(const int* ids, const void* dout, float* dtable, int dtype, int R, int V, int d,
                               int accumulate) {
  if (!accumulate) memset(dtable, 0, (size_t)V * d * sizeof(float));
  // stable counting sort of the rows with a valid id, by id
  std::vector<int> start(V + 1, 0), sorted;
  for (int r = 0; r < R; r++)
    if (ids[r] >= 0 && ids[r] < V) start[ids[r] + 1]++;
  for (int v = 0; v < V; v++) start[v + 1] += start[v];
  sorted.resize(start[V]);
  std::vector<int> cursor(start.begin(), start.end() - 1);
  for (int r = 0; r < R; r++)
    if (ids[r] >= 0 && ids[r] < V) sorted[cursor[ids[r]]++] = r;
  std::vector<float> acc(d), part(d), row(d);
  for (int v = 0; v < V; v++) {
    const int end = start[v + 1];
    for (int j0 = start[v]; j0 < end; j0 += XFT_EMBEDDING_CHUNK) {
      float* sum = j0 == start[v] ? acc.data() : part.data();
      for (int c = 0; c < d; c++) sum[c] = 0.f;
      for (int j = j0; j < end && j < j0 + XFT_EMBEDDING_CHUNK; j++) {
        xft_cpu::to_f32(row.data(), (const char*)dout + (size_t)sorted[j] * d * (dtype == XFT_BF16 ? 2 : 4), dtype, d);
        for (int c = 0; c < d; c++) sum[c] += row[c];
      }
      if (sum != acc.data())
        for (int c = 0; c < d; c++) acc[c] += part[c];
    }
    if (start[v] == end) continue;
    float* dst = dtable + (size_t)v * d;
    for (int c = 0; c < d; c++) dst[c] += acc[c];
  }
  return 0;
}
