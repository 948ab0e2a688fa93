// Stand-ins for the xft_cuda_* runtime (cuda/runtime.cu) on host memory, for cuda/dev/emu/run.sh.
#include <cuda_runtime.h>
#include "xft_cuda.h"
extern "C" cudaStream_t xft_cuda_stream(void) { return nullptr; }
extern "C" const char* xft_cuda_error_string(int e) { return e ? "emu error" : "no error"; }
extern "C" int xft_cuda_device_count(int* c) { *c = 1; return 0; }
extern "C" int xft_cuda_init(int, xft_cuda_device* info) { memset(info, 0, sizeof *info); strcpy(info->name, "host emulation"); return 0; }
extern "C" int xft_cuda_malloc(void** p, size_t n) { *p = aligned_alloc(256, ((n ? n : 16) + 255) / 256 * 256); return 0; }
extern "C" int xft_cuda_free(void* p) { free(p); return 0; }
extern "C" int xft_cuda_memcpy_h2d(void* d, const void* s, size_t n) { memcpy(d, s, n); return 0; }
extern "C" int xft_cuda_memcpy_d2h(void* d, const void* s, size_t n) { memcpy(d, s, n); return 0; }
extern "C" int xft_cuda_memset(void* d, int v, size_t n) { memset(d, v, n); return 0; }
extern "C" int xft_cuda_synchronize(void) { return 0; }
