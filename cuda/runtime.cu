/*
The CUDA runtime of the addon: one device, one non-blocking stream, and a stream-ordered
memory pool (cudaMallocAsync on the device's default pool with the release threshold raised
so that freed blocks stay reserved for reuse: a training step never reaches cudaMalloc).
Every op is enqueued on xft_cuda_stream(); only d2h copies and xft_cuda_synchronize wait.
The index-fault record (xft_cuda.h) rides along with each of those waits: one 16-byte copy.
The CUDA runtime is linked statically and finds the driver at run time, so a host without a
driver (or without a GPU, or with a driver older than the runtime) loads the addon and says why
the GPU cannot be used (xft_cuda_probe) instead of failing to load.
*/
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <unordered_set>
#include <vector>

#include "xft_cuda.h"

static cudaStream_t g_stream = nullptr;
static cudaMemPool_t g_pool = nullptr;
static int g_device = -1;
static xft_cuda_fault_slot* g_fault = nullptr;  // device record the kernels write index faults to
static xft_cuda_fault_slot g_fault_host;        // its copy at the last synchronisation
static xft_cuda_sync_stats g_sync_stats = {0, 0, 0, -1};

extern "C" void xft_cuda_get_sync_stats(xft_cuda_sync_stats* out) {
  *out = g_sync_stats;
#ifdef XFT_EMU_RUNTIME
  out->launches = (long long)g_emu.launches;  // the emulator counts every kernel launch
#endif
}

// every host wait on the stream goes through here (counted: a training step makes none)
static cudaError_t host_sync(void) {
  g_sync_stats.host_syncs++;
  return cudaStreamSynchronize(g_stream);
}

extern "C" xft_cuda_fault_slot* xft_cuda_fault_record(void) { return g_fault; }

// Enqueues the fault record's copy to the host; the caller's synchronisation completes it.
static cudaError_t fetch_fault(void) {
  if (g_fault == nullptr) return cudaSuccess;
  return cudaMemcpyAsync(&g_fault_host, g_fault, sizeof(g_fault_host), cudaMemcpyDeviceToHost, g_stream);
}

extern "C" int xft_cuda_take_fault(xft_cuda_fault* out) {
  const unsigned long long first = ~g_fault_host.worst;  // (index << 32) | (uint32)value
  out->kind = g_fault_host.kind;
  out->index = (int)(first >> 32);
  out->value = (int)(unsigned)(first & 0xffffffffu);
  out->bound = g_fault_host.bound;
  if (g_fault_host.kind == XFT_FAULT_NONE) return 0;
  memset(&g_fault_host, 0, sizeof(g_fault_host));
  return cudaMemsetAsync(g_fault, 0, sizeof(*g_fault), g_stream);
}

extern "C" cudaStream_t xft_cuda_stream(void) { return g_stream; }

extern "C" const char* xft_cuda_error_string(int err) { return cudaGetErrorString((cudaError_t)err); }

extern "C" const char* xft_cuda_error_name(int err) { return cudaGetErrorName((cudaError_t)err); }

// The NVIDIA kernel module's version from its /proc file ("... Kernel Module  550.54.15  ..." or
// "... Open Kernel Module for x86_64  580.65.06  ..."): the first word of digits and dots after
// "Kernel Module". The emulator points XFT_NVIDIA_VERSION_PATH at a file of its choosing.
#ifndef XFT_NVIDIA_VERSION_PATH
#define XFT_NVIDIA_VERSION_PATH "/proc/driver/nvidia/version"
#endif
static void read_driver_release(char* out, size_t size) {
  out[0] = 0;
  const char* path = XFT_NVIDIA_VERSION_PATH;
  FILE* f = path ? fopen(path, "r") : nullptr;
  if (!f) return;
  char line[512];
  const char* found = nullptr;
  while (!found && fgets(line, sizeof line, f)) {
    const char* p = strstr(line, "Kernel Module");
    if (!p) continue;
    for (p += 13; *p && !found;) {
      while (*p == ' ' || *p == '\t') p++;
      const char* w = p;
      bool digits = *w >= '0' && *w <= '9', dot = false;
      while (*p && *p != ' ' && *p != '\t' && *p != '\n') {
        if (*p == '.') dot = true;
        else if (*p < '0' || *p > '9') digits = false;
        p++;
      }
      if (digits && dot && (size_t)(p - w) < size) {
        memcpy(out, w, p - w);
        out[p - w] = 0;
        found = out;
      }
    }
  }
  fclose(f);
}

extern "C" int xft_cuda_probe(int ordinal, xft_cuda_probe_result* out) {
  memset(out, 0, sizeof(*out));
  out->ordinal = ordinal;
  cudaRuntimeGetVersion(&out->runtime_version);
  if (cudaDriverGetVersion(&out->driver_version) != cudaSuccess) out->driver_version = 0;
  read_driver_release(out->driver_release, sizeof(out->driver_release));
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();  // not sticky: clear it so that it is not reported by a later call
    out->error = e;
    return 0;
  }
  out->device_count = n;
  if (ordinal < 0 || ordinal >= n) return 0;
  cudaDeviceProp prop;
  if ((e = cudaGetDeviceProperties(&prop, ordinal)) != cudaSuccess) {
    cudaGetLastError();
    out->error = e;
    return 0;
  }
  snprintf(out->name, sizeof(out->name), "%s", prop.name);
  out->major = prop.major;
  out->minor = prop.minor;
  out->max_smem_optin = (int)prop.sharedMemPerBlockOptin;
  return 0;
}

extern "C" int xft_cuda_device_count(int* count) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();  // no driver / no device: clear the error, report none
    n = 0;
  }
  *count = n;
  return 0;
}

extern "C" int xft_cuda_query(xft_cuda_device* info) {
  cudaDeviceProp prop;
  cudaError_t e = cudaGetDeviceProperties(&prop, g_device);
  if (e != cudaSuccess) return e;
  memset(info, 0, sizeof(*info));
  snprintf(info->name, sizeof(info->name), "%s", prop.name);
  info->ordinal = g_device;
  info->major = prop.major;
  info->minor = prop.minor;
  info->multiprocessors = prop.multiProcessorCount;
  size_t free_b = 0, total_b = 0;
  if ((e = cudaMemGetInfo(&free_b, &total_b)) != cudaSuccess) return e;
  info->total_memory = total_b;
  info->free_memory = free_b;
  cudaDriverGetVersion(&info->driver_version);
  cudaRuntimeGetVersion(&info->runtime_version);
  return 0;
}

extern "C" int xft_cuda_init(int ordinal, xft_cuda_device* info) {
  cudaError_t e;
  if (g_stream == nullptr) {
    if ((e = cudaSetDevice(ordinal)) != cudaSuccess) return e;
    g_device = ordinal;
    if ((e = cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking)) != cudaSuccess) return e;
    if ((e = cudaDeviceGetDefaultMemPool(&g_pool, ordinal)) != cudaSuccess) return e;
    uint64_t threshold = UINT64_MAX;
    if ((e = cudaMemPoolSetAttribute(g_pool, cudaMemPoolAttrReleaseThreshold, &threshold)) != cudaSuccess) return e;
    if ((e = cudaMalloc((void**)&g_fault, sizeof(*g_fault))) != cudaSuccess) return e;
    if ((e = cudaMemset(g_fault, 0, sizeof(*g_fault))) != cudaSuccess) return e;
  }
  return xft_cuda_query(info);
}

// While a graph is captured, allocations are graph memory (allocation nodes at fixed addresses) and
// must be freed inside the capture (free nodes): xft_cuda_graph_end refuses a capture that lets one
// outlive it. Memory allocated before the capture and freed during it (a tensor disposed, or
// collected by the garbage collector, meanwhile) is freed after the capture instead: a graph cannot
// free memory it did not allocate, and a replay must not free it again.
static bool g_capturing = false;
static std::unordered_set<void*> g_capture_allocs;
static std::vector<void*> g_deferred_frees;

extern "C" int xft_cuda_malloc(void** ptr, size_t bytes) {
  // a zero-byte tensor still gets a distinct, valid pointer
  cudaError_t e = cudaMallocAsync(ptr, bytes ? bytes : 16, g_stream);
  if (e == cudaSuccess && g_capturing) g_capture_allocs.insert(*ptr);
  return e;
}

extern "C" int xft_cuda_free(void* ptr) {
  if (g_capturing && ptr && g_capture_allocs.erase(ptr) == 0) {
    g_deferred_frees.push_back(ptr);
    return cudaSuccess;
  }
  return cudaFreeAsync(ptr, g_stream);
}

// Host -> device copies go through two pinned staging buffers, so that the caller's (pageable)
// source may be freed or reused as soon as the call returns: the copy from a pinned buffer is truly
// asynchronous, and nothing needs the source after the memcpy into the buffer. Copying straight
// from pageable memory is safe only where the driver stages it before returning, which is not so
// on HMM/ATS systems (GH200), where the DMA may read the source later. A buffer is refilled once the
// event recorded after its last copy has completed, so large uploads pipeline the host memcpy of
// one chunk with the DMA of the other. Without pinned memory: one synchronous copy.
static const size_t kStageBytes = (size_t)8 << 20;
static char* g_stage[2] = {nullptr, nullptr};
static cudaEvent_t g_stage_done[2] = {nullptr, nullptr};
static int g_stage_next = 0;

static cudaError_t stage_init(void) {
  cudaError_t e = cudaSuccess;
  for (int i = 0; i < 2 && e == cudaSuccess; i++) {
    if (!g_stage_done[i]) e = cudaEventCreateWithFlags(&g_stage_done[i], cudaEventDisableTiming);
    if (e == cudaSuccess && !g_stage[i]) e = cudaMallocHost((void**)&g_stage[i], kStageBytes);
  }
  return e;
}

extern "C" int xft_cuda_memcpy_h2d(void* dst, const void* host_src, size_t bytes) {
  if (bytes == 0) return 0;
  if (stage_init() != cudaSuccess) {  // no pinned memory to be had: copy and wait
    cudaGetLastError();
    cudaError_t e = cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, g_stream);
    return e != cudaSuccess ? e : host_sync();
  }
  for (size_t off = 0; off < bytes; off += kStageBytes) {
    const size_t n = bytes - off < kStageBytes ? bytes - off : kStageBytes;
    const int i = g_stage_next;
    g_stage_next ^= 1;
    cudaError_t e = cudaEventQuery(g_stage_done[i]);
    if (e == cudaErrorNotReady) {  // its previous copy is still queued: wait for it to land
      g_sync_stats.staging_waits++;
      e = cudaEventSynchronize(g_stage_done[i]);
    }
    if (e != cudaSuccess) return e;
    memcpy(g_stage[i], (const char*)host_src + off, n);
    if ((e = cudaMemcpyAsync((char*)dst + off, g_stage[i], n, cudaMemcpyHostToDevice, g_stream)) != cudaSuccess) return e;
    if ((e = cudaEventRecord(g_stage_done[i], g_stream)) != cudaSuccess) return e;
  }
  return 0;
}

extern "C" int xft_cuda_memcpy_d2h(void* host_dst, const void* src, size_t bytes) {
  if (bytes) {
    cudaError_t e = cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, g_stream);
    if (e != cudaSuccess) return e;
    g_sync_stats.d2h_copies++;
  }
  cudaError_t e = fetch_fault();
  if (e != cudaSuccess) return e;
  return host_sync();
}

extern "C" int xft_cuda_memcpy_d2d(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return 0;
  return cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, g_stream);
}

extern "C" int xft_cuda_memset(void* dst, int byte, size_t bytes) {
  if (bytes == 0) return 0;
  return cudaMemsetAsync(dst, byte, bytes, g_stream);
}

extern "C" int xft_cuda_synchronize(void) {
  cudaError_t e = fetch_fault();
  if (e != cudaSuccess) return e;
  return host_sync();
}

extern "C" int xft_cuda_check(void) { return cudaGetLastError(); }

extern "C" int xft_cuda_pool_stats(size_t* used_bytes, size_t* reserved_bytes) {
  uint64_t used = 0, reserved = 0;
  cudaError_t e;
  if ((e = cudaMemPoolGetAttribute(g_pool, cudaMemPoolAttrUsedMemCurrent, &used)) != cudaSuccess) return e;
  if ((e = cudaMemPoolGetAttribute(g_pool, cudaMemPoolAttrReservedMemCurrent, &reserved)) != cudaSuccess) return e;
  *used_bytes = used;
  *reserved_bytes = reserved;
  return 0;
}

extern "C" int xft_cuda_pool_trim(void) {
  cudaError_t e = fetch_fault();
  if (e != cudaSuccess) return e;
  e = host_sync();
  if (e != cudaSuccess) return e;
  return cudaMemPoolTrimTo(g_pool, 0);
}

// ---- CUDA graphs: a capture of the stream's work, replayed by one launch ----
// Between xft_cuda_graph_begin and xft_cuda_graph_end the stream records instead of running; what
// a capture refuses (a synchronisation, a device -> host copy, an upload through the staging
// buffers, on the emulator also an allocation) fails that operation and the capture. Buffers a
// graph uses are made before its capture: every replay reads and writes the same addresses, and
// the values that change from step to step are read from device memory.
static const int kMaxGraphs = 64;
static cudaGraphExec_t g_graphs[kMaxGraphs] = {};

extern "C" int xft_cuda_graph_begin(void) {
  const cudaError_t e = cudaStreamBeginCapture(g_stream, cudaStreamCaptureModeThreadLocal);
  if (e == cudaSuccess) g_capturing = true, g_capture_allocs.clear();
  return e;
}

// ends the capture; *handle (>= 1) names the instantiated graph. A capture that failed returns its error.
extern "C" int xft_cuda_graph_end(int* handle) {
  *handle = 0;
  cudaGraph_t graph = nullptr;
  cudaError_t e = cudaStreamEndCapture(g_stream, &graph);
  const bool escaped = !g_capture_allocs.empty();
  g_capturing = false;
  g_capture_allocs.clear();
  for (void* p : g_deferred_frees) cudaFreeAsync(p, g_stream);
  g_deferred_frees.clear();
  if (e == cudaSuccess && escaped) {  // an allocation of the capture outlives it (not one a replay could own)
    cudaGraphDestroy(graph);
    e = cudaErrorStreamCaptureUnsupported;
  }
  if (e != cudaSuccess) {
    cudaGetLastError();
    return e;
  }
  int slot = 0;
  while (slot < kMaxGraphs && g_graphs[slot] != nullptr) slot++;
  if (slot == kMaxGraphs) {
    cudaGraphDestroy(graph);
    return cudaErrorMemoryAllocation;
  }
  e = cudaGraphInstantiate(&g_graphs[slot], graph, 0);
  cudaGraphDestroy(graph);
  if (e != cudaSuccess) {
    g_graphs[slot] = nullptr;
    return e;
  }
  *handle = slot + 1;
  return 0;
}

extern "C" int xft_cuda_graph_launch(int handle) {
  if (handle < 1 || handle > kMaxGraphs || g_graphs[handle - 1] == nullptr) return cudaErrorInvalidValue;
  return cudaGraphLaunch(g_graphs[handle - 1], g_stream);
}

extern "C" int xft_cuda_graph_destroy(int handle) {
  if (handle < 1 || handle > kMaxGraphs || g_graphs[handle - 1] == nullptr) return cudaErrorInvalidValue;
  cudaError_t e = cudaGraphExecDestroy(g_graphs[handle - 1]);
  g_graphs[handle - 1] = nullptr;
  return e;
}
