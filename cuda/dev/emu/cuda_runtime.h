// cuda_runtime.h of the host emulation (cuda/dev/emu): the parts of CUDA the xft kernels and
// cuda/runtime.cu use, on the CPU, so that the whole CUDA backend can run on a machine without a
// GPU (the `XFT_EMU=ON` developer build, and cuda/dev/emu/run.sh). convert.py rewrites each .cu
// first: launches become emu_launch, inline PTX becomes the emu_* functions below, __shared__
// arrays are poisoned per block.
//
// Execution: blocks run one after another; every thread of a block is a coroutine on one OS
// thread (ucontext to start, _setjmp/_longjmp to switch) that runs until it reaches a barrier.
// A warp barrier (__syncwarp, and every warp-collective: shuffles, ldmatrix, mma) opens when all
// lanes of the warp wait at one; __syncthreads when every live thread of the block does. Warps
// run one at a time up to the next __syncthreads, so a warp reading what another warp writes
// without a __syncthreads between them reads stale or poisoned data and the results differ.
// Anything else is a divergent barrier and fails the launch (cudaErrorLaunchFailure).
//
// What it checks: launch configuration (block <= 1024 threads, grid limits, dynamic shared
// memory <= 48 KiB unless cudaFuncSetAttribute raised it, <= the device's opt-in limit, 227 KiB or
// XFT_EMU_SMEM_OPTIN); shared memory poisoned
// (0xFF: NaN / -1) at every block's start; cp.async / ldmatrix alignment and shared-window
// bounds; the stream-ordered pool (double frees, copies outside live allocations); host -> device
// copies from pageable memory land late (a source freed before then is caught). What it
// cannot: the memory model between barriers. Run with XFT_EMU_ORDER=reverse|random (threads and
// blocks in that order) and XFT_EMU_CP_ASYNC=eager (copies land at issue, not at wait_group) to
// shake out missing barriers; with -fsanitize=address (cuda/dev/emu/check.sh) for global memory.
#pragma once
#include <limits.h>
#include <stdarg.h>
#include <math.h>
#include <setjmp.h>
#include <signal.h>
#include <unistd.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

#include <algorithm>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <tuple>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static
#define warpSize 32

// ---- types ----
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct uint3 { unsigned x, y, z; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return uint4{a, b, c, d}; }
inline float2 make_float2(float a, float b) { return float2{a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }

typedef struct EmuStream* cudaStream_t;
typedef struct EmuEvent* cudaEvent_t;
typedef struct EmuPool* cudaMemPool_t;
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInsufficientDriver = 35,
  cudaErrorInvalidDevice = 101,
  cudaErrorNoDevice = 100,
  cudaErrorIllegalAddress = 700,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
  cudaErrorNotReady = 600,
  cudaErrorStreamCaptureUnsupported = 900,
  cudaErrorStreamCaptureInvalidated = 901,
  cudaErrorIllegalState = 401,
};
enum cudaMemcpyKind { cudaMemcpyHostToHost, cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice, cudaMemcpyDefault };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
#define cudaEventDisableTiming 0x02
enum cudaMemPoolAttr {
  cudaMemPoolAttrReleaseThreshold = 4,
  cudaMemPoolAttrReservedMemCurrent = 5,
  cudaMemPoolAttrUsedMemCurrent = 7,
};
#define cudaStreamNonBlocking 0x01
struct cudaDeviceProp {
  char name[256];
  int major, minor, multiProcessorCount;
  size_t totalGlobalMem, sharedMemPerBlockOptin;
};

// ---- math and bit intrinsics ----
template <class A, class B> inline typename std::common_type<A, B>::type min(A a, B b) { return b < a ? b : a; }
template <class A, class B> inline typename std::common_type<A, B>::type max(A a, B b) { return a < b ? b : a; }
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
// The _rn intrinsics are never contracted into an FMA, by nvcc nor here: the contraction build
// (check.sh contract: -O2 -ffp-contract=fast -mfma, like nvcc's default -fmad=true) would otherwise
// fuse them once inlined. An empty asm makes each operand and result opaque to the optimizer.
#if defined(__x86_64__)
#define EMU_OPAQUE(v) asm("" : "+x"(v))
#else
#define EMU_OPAQUE(v) asm("" : "+w"(v))
#endif
inline float __fadd_rn(float a, float b) { EMU_OPAQUE(a); EMU_OPAQUE(b); float r = a + b; EMU_OPAQUE(r); return r; }
inline float __fmul_rn(float a, float b) { EMU_OPAQUE(a); EMU_OPAQUE(b); float r = a * b; EMU_OPAQUE(r); return r; }
inline double __dadd_rn(double a, double b) { EMU_OPAQUE(a); EMU_OPAQUE(b); double r = a + b; EMU_OPAQUE(r); return r; }
inline double __dmul_rn(double a, double b) { EMU_OPAQUE(a); EMU_OPAQUE(b); double r = a * b; EMU_OPAQUE(r); return r; }
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
// integer atomics: emulated threads switch only at barriers, so a plain read-modify-write is atomic
inline int atomicCAS(int* p, int compare, int v) { int o = *p; if (o == compare) *p = v; return o; }
inline int atomicExch(int* p, int v) { int o = *p; *p = v; return o; }
inline int atomicMax(int* p, int v) { int o = *p; if (v > o) *p = v; return o; }
inline unsigned long long atomicMax(unsigned long long* p, unsigned long long v) { auto o = *p; if (v > o) *p = v; return o; }
inline void __threadfence() {}
inline void emu_rcp_approx(float& out, float in) { out = 1.0f / in; }

// ---- errors ----
struct EmuState {
  int pending = cudaSuccess;             // returned (and cleared) by cudaGetLastError, returned by syncs
  std::map<const void*, int> max_dynamic_smem;
  std::map<const char*, size_t> live;     // device allocations: start -> bytes
  size_t used = 0, reserved = 0;
  unsigned long long block_serial = 0;     // which block runs: __shared__ arrays are poisoned once per block
  unsigned long long launches = 0;         // kernel launches (cuda/runtime.cu reports them in memoryStats)
};
#define XFT_EMU_RUNTIME 1
inline EmuState g_emu;
inline void emu_fail(int err, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
inline void emu_fail(int err, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "xft emu: ");
  vfprintf(stderr, fmt, ap);
  fprintf(stderr, "\n");
  va_end(ap);
  if (g_emu.pending == cudaSuccess) g_emu.pending = err;
  if (getenv("XFT_EMU_ABORT")) abort();
}

inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument (emulated)";
    case cudaErrorMemoryAllocation: return "out of memory (emulated)";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument (emulated)";
    case cudaErrorInsufficientDriver: return "CUDA driver version is insufficient for CUDA runtime version (emulated)";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected (emulated)";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered (emulated)";
    case cudaErrorMisalignedAddress: return "misaligned address (emulated)";
    case cudaErrorLaunchFailure: return "unspecified launch failure (emulated: divergent barrier)";
    case cudaErrorStreamCaptureUnsupported: return "operation not permitted when stream is capturing (emulated)";
    case cudaErrorStreamCaptureInvalidated: return "operation failed due to a previous error during capture (emulated)";
    case cudaErrorIllegalState: return "the operation cannot be performed in the present state (emulated)";
    case cudaErrorNotReady: return "device not ready (emulated)";
    default: return "unknown error (emulated)";
  }
}
inline const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInsufficientDriver: return "cudaErrorInsufficientDriver";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorMisalignedAddress: return "cudaErrorMisalignedAddress";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorStreamCaptureUnsupported: return "cudaErrorStreamCaptureUnsupported";
    case cudaErrorStreamCaptureInvalidated: return "cudaErrorStreamCaptureInvalidated";
    case cudaErrorIllegalState: return "cudaErrorIllegalState";
    case cudaErrorNotReady: return "cudaErrorNotReady";
    default: return "cudaErrorUnknown";
  }
}
inline cudaError_t cudaGetLastError() {
  int e = g_emu.pending;
  g_emu.pending = cudaSuccess;
  return (cudaError_t)e;
}
inline cudaError_t cudaPeekAtLastError() { return (cudaError_t)g_emu.pending; }

// ---- stream capture (CUDA graphs) ----
// Between cudaStreamBeginCapture and cudaStreamEndCapture the stream's work is recorded, not run:
// launches (their arguments copied at the launch, as CUDA copies them), memsets, device -> device
// copies and host -> device copies from pinned memory become nodes that cudaGraphLaunch replays in
// order. What a real capture refuses fails the operation with cudaErrorStreamCaptureUnsupported and
// invalidates the capture (cudaStreamEndCapture then returns cudaErrorStreamCaptureInvalidated):
// stream, device and event synchronisation, event queries, device -> host copies into pageable
// memory, host -> device copies from pageable memory.
// Allocations inside a capture are graph memory (CUDA's allocation and free nodes): the block is made
// at the capture and kept by the graph, at the same address for every replay (as CUDA's fixed virtual
// addresses), refilled with garbage where each replay allocates it; freeing it inside the capture
// ends its use, and the graph frees it when destroyed. Stricter than CUDA: an allocation made inside
// the capture must be freed inside it (one that outlives it fails the capture), and memory allocated
// outside the capture cannot be freed inside it.
enum cudaStreamCaptureMode { cudaStreamCaptureModeGlobal = 0, cudaStreamCaptureModeThreadLocal = 1, cudaStreamCaptureModeRelaxed = 2 };
enum cudaStreamCaptureStatus { cudaStreamCaptureStatusNone = 0, cudaStreamCaptureStatusActive = 1, cudaStreamCaptureStatusInvalidated = 2 };
// the blocks a graph's capture allocated (and freed): released with the last copy of the graph
struct EmuGraphMemory {
  std::vector<std::pair<void*, size_t>> blocks;
  ~EmuGraphMemory();
};
struct EmuGraph {
  std::vector<std::function<void()>> nodes;
  std::shared_ptr<EmuGraphMemory> memory = std::make_shared<EmuGraphMemory>();
};
typedef EmuGraph* cudaGraph_t;
typedef EmuGraph* cudaGraphExec_t;
struct EmuCapture {
  bool on = false;
  int invalid = cudaSuccess;  // the first refused operation
  EmuGraph* graph = nullptr;
  std::map<const void*, size_t> allocated;  // allocated inside the capture and not yet freed there
};
inline EmuCapture g_emu_capture;
// inside a capture: false (and the capture invalidated) for an operation a capture refuses
inline bool emu_capture_allows(const char* what) {
  if (!g_emu_capture.on) return true;
  fprintf(stderr, "xft emu: %s while the stream is capturing a CUDA graph: not permitted (cudaErrorStreamCaptureUnsupported)\n", what);
  if (g_emu_capture.invalid == cudaSuccess) g_emu_capture.invalid = cudaErrorStreamCaptureUnsupported;
  return false;
}
// inside a capture: records fn as a node and returns true; else false (run it now)
inline bool emu_capture_record(std::function<void()> fn) {
  if (!g_emu_capture.on) return false;
  g_emu_capture.graph->nodes.push_back(std::move(fn));
  return true;
}

// ---- device, stream, pool ----
// The emulated host, from the environment (read once), so that tests can play hosts they do not have:
//   XFT_EMU_DRIVER_VERSION   the CUDA version the driver supports (default 13000; below the runtime's
//                            13000 cudaGetDeviceCount fails with cudaErrorInsufficientDriver, as an
//                            R550 driver does with this build; 0: no driver at all)
//   XFT_EMU_DEVICES          how many devices (default 1; 0: cudaErrorNoDevice, a driver without GPUs)
//   XFT_EMU_SM               compute capability as major*10 + minor (default 90)
//   XFT_EMU_SMEM_OPTIN       cudaDevAttrMaxSharedMemoryPerBlockOptin in bytes (default 232448, sm_90;
//                            101376 is sm_86/89/120): cudaFuncSetAttribute above it and launches
//                            asking for more fail as on that GPU
//   XFT_EMU_NVIDIA_VERSION_FILE  stands for /proc/driver/nvidia/version (unset: no such file)
inline int emu_env_int(const char* name, int fallback) {
  const char* s = getenv(name);
  return s && *s ? atoi(s) : fallback;
}
inline const size_t kEmuTotalMemory = (size_t)80 << 30;
inline const int kEmuRuntimeVersion = 13000;
inline int emu_driver_version() { static int v = emu_env_int("XFT_EMU_DRIVER_VERSION", 13000); return v; }
inline int emu_devices() { static int v = emu_env_int("XFT_EMU_DEVICES", 1); return v; }
inline int emu_sm() { static int v = emu_env_int("XFT_EMU_SM", 90); return v; }
inline int emu_smem_optin() { static int v = emu_env_int("XFT_EMU_SMEM_OPTIN", 227 * 1024); return v; }
#define XFT_NVIDIA_VERSION_PATH getenv("XFT_EMU_NVIDIA_VERSION_FILE")
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 0;
  if (emu_driver_version() < kEmuRuntimeVersion) return cudaErrorInsufficientDriver;
  if (emu_devices() <= 0) return cudaErrorNoDevice;
  *n = emu_devices();
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int d) { return d >= 0 && d < emu_devices() ? cudaSuccess : cudaErrorInvalidDevice; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int d) {
  if (d < 0 || d >= emu_devices()) return cudaErrorInvalidDevice;
  memset(p, 0, sizeof *p);
  snprintf(p->name, sizeof p->name, "xft host emulation (sm_%d)", emu_sm());
  p->major = emu_sm() / 10;
  p->minor = emu_sm() % 10;
  p->multiProcessorCount = 132;
  p->totalGlobalMem = kEmuTotalMemory;
  p->sharedMemPerBlockOptin = (size_t)emu_smem_optin();
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int d) {
  if (d < 0 || d >= emu_devices()) return cudaErrorInvalidDevice;
  if (a != cudaDevAttrMaxSharedMemoryPerBlockOptin) return cudaErrorInvalidValue;
  *v = emu_smem_optin();
  return cudaSuccess;
}
inline cudaError_t cudaMemGetInfo(size_t* free_b, size_t* total_b) {
  *total_b = kEmuTotalMemory;
  *free_b = kEmuTotalMemory - g_emu.reserved;
  return cudaSuccess;
}
inline cudaError_t cudaDriverGetVersion(int* v) { *v = emu_driver_version(); return cudaSuccess; }
inline cudaError_t cudaRuntimeGetVersion(int* v) { *v = kEmuRuntimeVersion; return cudaSuccess; }
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) { *s = (cudaStream_t)&g_emu; return cudaSuccess; }
inline void emu_land_h2d();
inline cudaError_t cudaStreamSynchronize(cudaStream_t) {
  if (!emu_capture_allows("cudaStreamSynchronize")) return cudaErrorStreamCaptureUnsupported;
  emu_land_h2d();
  return (cudaError_t)g_emu.pending;
}
inline cudaError_t cudaDeviceSynchronize() {
  if (!emu_capture_allows("cudaDeviceSynchronize")) return cudaErrorStreamCaptureUnsupported;
  emu_land_h2d();
  return (cudaError_t)g_emu.pending;
}
inline cudaError_t cudaDeviceGetDefaultMemPool(cudaMemPool_t* p, int) { *p = (cudaMemPool_t)&g_emu; return cudaSuccess; }
inline cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t, cudaMemPoolAttr, void*) { return cudaSuccess; }
inline cudaError_t cudaMemPoolGetAttribute(cudaMemPool_t, cudaMemPoolAttr a, void* v) {
  *(uint64_t*)v = a == cudaMemPoolAttrUsedMemCurrent ? g_emu.used : g_emu.reserved;
  return cudaSuccess;
}
inline cudaError_t cudaMemPoolTrimTo(cudaMemPool_t, size_t) {
  g_emu.reserved = g_emu.used;
  return cudaSuccess;
}
inline cudaError_t cudaMallocAsync(void** p, size_t n, cudaStream_t) {
  // malloc (not a private arena), so that an -fsanitize=address build sees every overrun
  const size_t bytes = n ? n : 1;
  *p = aligned_alloc(256, (bytes + 255) / 256 * 256);
  if (!*p) return cudaErrorMemoryAllocation;
  memset(*p, 0xFF, bytes);  // fresh device memory holds garbage: NaN floats, -1 ints
  g_emu.live[(const char*)*p] = n;
  g_emu.used += n;
  g_emu.reserved = std::max(g_emu.reserved, g_emu.used);
  if (g_emu_capture.on) {  // an allocation node: each replay finds garbage there again
    g_emu_capture.allocated[*p] = bytes;
    void* block = *p;
    emu_capture_record([block, bytes] { memset(block, 0xFF, bytes); });
  }
  return cudaSuccess;
}
inline cudaError_t cudaMalloc(void** p, size_t n) { return cudaMallocAsync(p, n, nullptr); }
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t) {
  if (g_emu_capture.on && p) {  // a free node: the block stays the graph's until the graph is destroyed
    auto a = g_emu_capture.allocated.find(p);
    if (a == g_emu_capture.allocated.end()) {
      emu_capture_allows("cudaFreeAsync of memory allocated before the capture");
      return cudaErrorStreamCaptureUnsupported;
    }
    g_emu_capture.graph->memory->blocks.push_back({p, a->second});
    g_emu_capture.allocated.erase(a);
    return cudaSuccess;
  }
  emu_land_h2d();
  if (!p) return cudaSuccess;
  auto it = g_emu.live.find((const char*)p);
  if (it == g_emu.live.end()) {
    emu_fail(cudaErrorInvalidValue, "cudaFreeAsync(%p): not a live allocation (double free?)", p);
    return cudaErrorInvalidValue;
  }
  g_emu.used -= it->second;
  g_emu.live.erase(it);
  free(p);
  return cudaSuccess;
}
inline cudaError_t cudaFree(void* p) { return cudaFreeAsync(p, nullptr); }
// [p, p + n) inside one live device allocation
inline bool emu_device_range(const void* p, size_t n, const char* what) {
  auto it = g_emu.live.upper_bound((const char*)p);
  if (it != g_emu.live.begin()) {
    --it;
    if ((const char*)p >= it->first && (const char*)p + n <= it->first + it->second) return true;
  }
  emu_fail(cudaErrorInvalidValue, "%s: [%p, +%zu) is not inside a live device allocation", what, p, n);
  return false;
}
// Host -> device copies from pageable (not cudaMallocHost) memory land late, at the next stream
// operation or synchronisation, as the DMA may read them on HMM/ATS systems (GH200): a caller that
// frees or reuses the source before then copies garbage (and -fsanitize=address reports the read).
struct EmuPendingCopy {
  void* dst;
  const void* src;
  size_t n;
};
inline std::vector<EmuPendingCopy> g_emu_late_h2d;
inline std::map<const char*, size_t> g_emu_pinned;  // cudaMallocHost blocks: start -> bytes
inline void emu_land_h2d() {
  for (const EmuPendingCopy& c : g_emu_late_h2d) memmove(c.dst, c.src, c.n);
  g_emu_late_h2d.clear();
}
inline bool emu_pinned(const void* p, size_t n) {
  auto it = g_emu_pinned.upper_bound((const char*)p);
  if (it == g_emu_pinned.begin()) return false;
  --it;
  return (const char*)p >= it->first && (const char*)p + n <= it->first + it->second;
}
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind kind, cudaStream_t) {
  emu_land_h2d();  // stream order
  if (n == 0) return cudaSuccess;
  const bool dd = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
  const bool sd = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
  if ((dd && !emu_device_range(d, n, "cudaMemcpyAsync dst")) || (sd && !emu_device_range(s, n, "cudaMemcpyAsync src")))
    return cudaGetLastError();
  if (g_emu_capture.on) {
    if (kind == cudaMemcpyDeviceToHost && !emu_pinned(d, n) && !emu_capture_allows("a device -> host copy into pageable memory"))
      return cudaErrorStreamCaptureUnsupported;
    if (kind == cudaMemcpyHostToDevice && !emu_pinned(s, n) && !emu_capture_allows("a host -> device copy from pageable memory"))
      return cudaErrorStreamCaptureUnsupported;
    emu_capture_record([d, s, n] { memmove(d, s, n); });  // the source is read at each replay
    return cudaSuccess;
  }
  if (kind == cudaMemcpyHostToDevice && !emu_pinned(s, n)) g_emu_late_h2d.push_back({d, s, n});
  else memmove(d, s, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind k) {
  cudaError_t e = cudaMemcpyAsync(d, s, n, k, nullptr);
  emu_land_h2d();  // synchronous
  return e;
}
inline cudaError_t cudaMemsetAsync(void* d, int v, size_t n, cudaStream_t) {
  emu_land_h2d();
  if (n == 0) return cudaSuccess;
  if (!emu_device_range(d, n, "cudaMemsetAsync")) return cudaGetLastError();
  if (emu_capture_record([d, v, n] { memset(d, v, n); })) return cudaSuccess;
  memset(d, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemset(void* d, int v, size_t n) { return cudaMemsetAsync(d, v, n, nullptr); }
inline cudaError_t cudaEventCreate(cudaEvent_t* e) { *e = (cudaEvent_t)&g_emu; return cudaSuccess; }
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned) { return cudaEventCreate(e); }
// pinned host memory: host -> device copies from it land at once (at issue)
inline cudaError_t cudaMallocHost(void** p, size_t n) {
  *p = malloc(n ? n : 1);
  if (!*p) return cudaErrorMemoryAllocation;
  g_emu_pinned[(const char*)*p] = n;
  return cudaSuccess;
}
inline cudaError_t cudaFreeHost(void* p) {
  emu_land_h2d();
  g_emu_pinned.erase((const char*)p);
  free(p);
  return cudaSuccess;
}
inline cudaError_t cudaEventDestroy(cudaEvent_t) { return cudaSuccess; }
inline cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t = nullptr) { return cudaSuccess; }
inline cudaError_t cudaEventQuery(cudaEvent_t) {  // work runs at issue: always complete
  return emu_capture_allows("cudaEventQuery") ? cudaSuccess : cudaErrorStreamCaptureUnsupported;
}
inline cudaError_t cudaEventSynchronize(cudaEvent_t) {
  if (!emu_capture_allows("cudaEventSynchronize")) return cudaErrorStreamCaptureUnsupported;
  emu_land_h2d();
  return (cudaError_t)g_emu.pending;
}
inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t, cudaEvent_t) { *ms = 0; return cudaSuccess; }
template <class F> inline cudaError_t cudaFuncSetAttribute(F* f, cudaFuncAttribute a, int v) {
  if (a == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (v < 0 || v > emu_smem_optin()) return cudaErrorInvalidValue;  // as the driver does past the GPU's opt-in limit
    g_emu.max_dynamic_smem[(const void*)f] = v;
  }
  return cudaSuccess;
}

// ---- the block scheduler ----
enum { EMU_RUN = 0, EMU_WARP = 1, EMU_BLOCK = 2, EMU_DONE = 3 };
struct EmuThread {
  ucontext_t ctx;
  jmp_buf jb;
  int state;
  bool started;
};
struct EmuCopy {
  unsigned char* dst;
  const unsigned char* src;
  int bytes;
};
struct EmuBlock {
  std::vector<EmuThread> th;
  std::vector<char> stacks;
  jmp_buf sched_jb;
  unsigned cur = 0, n = 0;
  uint64_t slot[1024][6];                       // per-thread exchange for warp collectives
  std::function<void()> fn;
  std::vector<unsigned char> smem;             // dynamic shared memory (the shared window of cvta)
  std::vector<std::vector<EmuCopy>> cp_open;   // per thread: cp.async not yet committed
  std::vector<std::vector<std::vector<EmuCopy>>> cp_groups;  // per thread: committed groups, oldest first
};
inline EmuBlock g_blk;
inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
inline const size_t kEmuStack = 128 * 1024;

inline int emu_order_mode() {  // 0 forward, 1 reverse, 2 random
  static int mode = [] {
    const char* s = getenv("XFT_EMU_ORDER");
    return !s ? 0 : !strcmp(s, "reverse") ? 1 : !strcmp(s, "random") ? 2 : 0;
  }();
  return mode;
}
inline std::mt19937& emu_rng() {
  static std::mt19937 rng(getenv("XFT_EMU_SEED") ? atoi(getenv("XFT_EMU_SEED")) : 12345);
  return rng;
}
inline bool emu_cp_async_eager() {
  static bool eager = getenv("XFT_EMU_CP_ASYNC") && !strcmp(getenv("XFT_EMU_CP_ASYNC"), "eager");
  return eager;
}

// AddressSanitizer is told of every stack switch (else it sees one thread jump between stacks)
#if defined(__SANITIZE_ADDRESS__)
extern "C" void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
extern "C" void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old);
inline const void* g_emu_sched_bottom = nullptr;
inline size_t g_emu_sched_size = 0;
inline void emu_to_thread(unsigned t) { __sanitizer_start_switch_fiber(nullptr, g_blk.stacks.data() + (size_t)t * kEmuStack, kEmuStack); }
inline void emu_in_thread() { __sanitizer_finish_switch_fiber(nullptr, &g_emu_sched_bottom, &g_emu_sched_size); }
inline void emu_to_scheduler() { __sanitizer_start_switch_fiber(nullptr, g_emu_sched_bottom, g_emu_sched_size); }
inline void emu_in_scheduler() { __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr); }
#else
inline void emu_to_thread(unsigned) {}
inline void emu_in_thread() {}
inline void emu_to_scheduler() {}
inline void emu_in_scheduler() {}
#endif

inline void emu_set_thread(unsigned t) {
  g_blk.cur = t;
  threadIdx = uint3{t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y)};
}
inline void emu_wait(int state) {
  EmuThread& t = g_blk.th[g_blk.cur];
  t.state = state;
  if (_setjmp(t.jb) == 0) {
    emu_to_scheduler();
    _longjmp(g_blk.sched_jb, 1);
  }
  emu_in_thread();
}
inline void __syncthreads() { emu_wait(EMU_BLOCK); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu_wait(EMU_WARP); }
inline unsigned emu_tid() { return g_blk.cur; }

template <class T> inline T emu_shfl(T v, unsigned src_lane) {
  static_assert(sizeof(T) <= 8, "shuffle of more than 8 bytes");
  const unsigned me = emu_tid(), base = me & ~31u;
  memcpy(&g_blk.slot[me][0], &v, sizeof(T));
  __syncwarp();
  T r = v;
  if (base + src_lane >= g_blk.n) emu_fail(cudaErrorLaunchFailure, "shuffle from lane %u, which does not exist", src_lane);
  else memcpy(&r, &g_blk.slot[base + src_lane][0], sizeof(T));
  __syncwarp();
  return r;
}
template <class T> inline T __shfl_xor_sync(unsigned, T v, int o, int w = 32) {
  const int lane = emu_tid() % 32;
  const int src = lane ^ o;
  return emu_shfl(v, (unsigned)((src & ~(w - 1)) == (lane & ~(w - 1)) ? src : lane));
}
template <class T> inline T __shfl_sync(unsigned, T v, int src, int w = 32) {
  const int lane = emu_tid() % 32;
  return emu_shfl(v, (unsigned)((lane & ~(w - 1)) + (src & (w - 1))));
}
template <class T> inline T __shfl_up_sync(unsigned, T v, unsigned d, int w = 32) {
  const int lane = emu_tid() % 32;
  return emu_shfl(v, (unsigned)((lane % w) >= (int)d ? lane - (int)d : lane));
}
template <class T> inline T __shfl_down_sync(unsigned, T v, unsigned d, int w = 32) {
  const int lane = emu_tid() % 32;
  return emu_shfl(v, (unsigned)((lane % w) + (int)d < w ? lane + (int)d : lane));
}

// __shared__ arrays (rewritten by convert.py): poisoned by the first thread of each block that
// reaches the declaration (no thread of the block can have written them before that); `seen` is
// the declaration site's own static, like the array
inline void emu_shared(void* p, size_t bytes, unsigned long long& seen) {
  if (seen != g_emu.block_serial) {
    memset(p, 0xFF, bytes);
    seen = g_emu.block_serial;
  }
}
#define EMU_SHARED(a)                          \
  do {                                         \
    static unsigned long long emu_seen_ = 0;   \
    emu_shared(a, sizeof(a), emu_seen_);       \
  } while (0)
inline void* emu_dynamic_smem() { return g_blk.smem.data(); }
inline size_t __cvta_generic_to_shared(const void* p) {
  const unsigned char* b = g_blk.smem.data();
  if ((const unsigned char*)p < b || (const unsigned char*)p > b + g_blk.smem.size()) {
    emu_fail(cudaErrorIllegalAddress, "__cvta_generic_to_shared of a pointer outside dynamic shared memory");
    return 0;
  }
  return (size_t)((const unsigned char*)p - b);
}
inline unsigned char* emu_shared_at(uint32_t addr, unsigned bytes, unsigned align, const char* what) {
  if (addr % align) emu_fail(cudaErrorMisalignedAddress, "%s: shared address %u is not %u-byte aligned", what, addr, align);
  if ((size_t)addr + bytes > g_blk.smem.size()) {
    emu_fail(cudaErrorIllegalAddress, "%s: shared [%u, +%u) past the %zu bytes of shared memory", what, addr, bytes, g_blk.smem.size());
    return nullptr;
  }
  return g_blk.smem.data() + addr;
}

// cp.async.cg.shared.global [dst], [src], 16, src_bytes: bytes past src_bytes are zero-filled.
// Lazy (default): the copy lands at the cp.async.wait_group that covers it; eager: at issue.
inline void emu_copy_now(const EmuCopy& c) {
  memcpy(c.dst, c.src, c.bytes);
  memset(c.dst + c.bytes, 0, 16 - c.bytes);
}
inline void emu_cp_async_cg_16(uint32_t dst, const void* src, int src_bytes) {
  unsigned char* d = emu_shared_at(dst, 16, 16, "cp.async");
  if ((uintptr_t)src % 16) emu_fail(cudaErrorMisalignedAddress, "cp.async: global source %p is not 16-byte aligned", src);
  if (src_bytes < 0 || src_bytes > 16) emu_fail(cudaErrorInvalidValue, "cp.async: src-size %d", src_bytes);
  if (!d || src_bytes < 0 || src_bytes > 16) return;
  EmuCopy c{d, (const unsigned char*)src, src_bytes};
  if (emu_cp_async_eager()) emu_copy_now(c);
  else g_blk.cp_open[emu_tid()].push_back(c);
}
inline void emu_cp_async_commit() {
  auto& open = g_blk.cp_open[emu_tid()];
  g_blk.cp_groups[emu_tid()].push_back(open);
  open.clear();
}
inline void emu_cp_async_wait(int n) {
  auto& groups = g_blk.cp_groups[emu_tid()];
  while ((int)groups.size() > n) {
    for (const EmuCopy& c : groups.front()) emu_copy_now(c);
    groups.erase(groups.begin());
  }
}

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: lane l gives the address of row l % 8 of
// matrix l / 8 (8 b16, 16-byte aligned); lane t gets, of matrix q, elements (t/4, 2(t%4) + {0,1})
// (or, .trans, elements (2(t%4) + {0,1}, t/4)) packed low half first.
inline void emu_ldmatrix(bool trans, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, uint32_t addr) {
  const unsigned me = emu_tid(), base = me & ~31u, lane = me % 32;
  g_blk.slot[me][0] = addr;
  __syncwarp();
  uint32_t* r[4] = {&r0, &r1, &r2, &r3};
  for (int q = 0; q < 4; q++) {
    uint16_t h[2];
    for (int j = 0; j < 2; j++) {
      const int row = trans ? 2 * (lane % 4) + j : lane / 4, col = trans ? lane / 4 : 2 * (lane % 4) + j;
      const unsigned char* p = emu_shared_at((uint32_t)g_blk.slot[base + 8 * q + row][0], 16, 16, "ldmatrix");
      h[j] = 0xFFFF;
      if (p) memcpy(&h[j], p + 2 * col, 2);
    }
    *r[q] = (uint32_t)h[0] | ((uint32_t)h[1] << 16);
  }
  __syncwarp();
}
inline void emu_ldmatrix_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, uint32_t addr) {
  emu_ldmatrix(false, r0, r1, r2, r3, addr);
}
inline void emu_ldmatrix_x4_trans(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, uint32_t addr) {
  emu_ldmatrix(true, r0, r1, r2, r3, addr);
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32: D (16x8) += A (16x16) B (16x8), lane
// t = 4g + i holds A (g, 2i..), (g+8, 2i..), (g, 2i+8..), (g+8, 2i+8..); B (2i.., g), (2i+8.., g);
// D (g, 2i..), (g+8, 2i..).
inline float emu_bf16(uint32_t reg, int half) { return __uint_as_float(((reg >> (16 * half)) & 0xFFFF) << 16); }
inline void emu_mma_m16n8k16_bf16(float& d0, float& d1, float& d2, float& d3, uint32_t a0, uint32_t a1, uint32_t a2,
                                  uint32_t a3, uint32_t b0, uint32_t b1) {
  const unsigned me = emu_tid(), base = me & ~31u, lane = me % 32;
  uint64_t* s = g_blk.slot[me];
  s[0] = a0; s[1] = a1; s[2] = a2; s[3] = a3; s[4] = b0; s[5] = b1;
  __syncwarp();
  auto A = [&](int row, int k) {
    const int reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
    return emu_bf16((uint32_t)g_blk.slot[base + 4 * (row % 8) + (k % 8) / 2][reg], k % 2);
  };
  auto B = [&](int k, int col) { return emu_bf16((uint32_t)g_blk.slot[base + 4 * col + (k % 8) / 2][k >= 8 ? 5 : 4], k % 2); };
  float* d[4] = {&d0, &d1, &d2, &d3};
  for (int c = 0; c < 4; c++) {
    const int row = lane / 4 + (c >= 2 ? 8 : 0), col = 2 * (lane % 4) + (c & 1);
    float acc = *d[c];
    for (int k = 0; k < 16; k++) acc += A(row, k) * B(k, col);
    *d[c] = acc;
  }
  __syncwarp();
}

// A thread's coroutine runs the kernel once per block: after a block it waits (EMU_DONE) where
// the next block resumes it, so contexts are made once per launch, not per block.
inline void emu_trampoline() {
  emu_in_thread();
  for (;;) {
    g_blk.fn();
    for (auto& g : g_blk.cp_groups[g_blk.cur])  // an exited thread's copies still land
      for (const EmuCopy& c : g) emu_copy_now(c);
    for (const EmuCopy& c : g_blk.cp_open[g_blk.cur]) emu_copy_now(c);
    emu_wait(EMU_DONE);
  }
}

// 0..n-1 in the XFT_EMU_ORDER order
template <class T> inline std::vector<T> emu_order(T n) {
  std::vector<T> o(n);
  for (T i = 0; i < n; i++) o[i] = i;
  if (emu_order_mode() == 1) std::reverse(o.begin(), o.end());
  if (emu_order_mode() == 2) std::shuffle(o.begin(), o.end(), emu_rng());
  return o;
}

// one block: run every runnable thread until it waits or ends, then open what barriers can open
inline bool emu_run_block(unsigned b) {
  const unsigned n = g_blk.n;
  g_emu.block_serial++;
  memset(g_blk.smem.data(), 0xFF, g_blk.smem.size());
  for (unsigned t = 0; t < n; t++) {
    EmuThread& th = g_blk.th[t];
    if (!th.started) {  // first block of the launch, or after a failed block abandoned it
      getcontext(&th.ctx);
      th.ctx.uc_stack.ss_sp = g_blk.stacks.data() + (size_t)t * kEmuStack;
      th.ctx.uc_stack.ss_size = kEmuStack;
      th.ctx.uc_link = nullptr;
      makecontext(&th.ctx, emu_trampoline, 0);
    }
    th.state = EMU_RUN;
    g_blk.cp_open[t].clear();
    g_blk.cp_groups[t].clear();
  }
  // Warp by warp: a warp runs (through its warp barriers) until every lane waits at
  // __syncthreads or has ended, before the next warp starts; so a warp never sees another warp's
  // writes that a missing __syncthreads would not order. Lanes within a warp run one after another.
  const std::vector<unsigned> warp_order = emu_order((n + 31) / 32), lane_order = emu_order(32u);
  for (;;) {
    for (unsigned w : warp_order) {
      const unsigned w0 = 32 * w, w1 = std::min(n, w0 + 32);
      for (;;) {
        for (unsigned l : lane_order) {
          const unsigned t = w0 + l;
          if (t >= w1) continue;
          if (g_blk.th[t].state != EMU_RUN) continue;
          emu_set_thread(t);
          if (_setjmp(g_blk.sched_jb) == 0) {
            emu_to_thread(t);
            if (!g_blk.th[t].started) {
              g_blk.th[t].started = true;
              setcontext(&g_blk.th[t].ctx);
            }
            _longjmp(g_blk.th[t].jb, 1);
          }
          emu_in_scheduler();
        }
        bool all = true;  // the warp barrier opens when every lane of the warp waits at one
        for (unsigned t = w0; t < w1; t++) all = all && g_blk.th[t].state == EMU_WARP;
        if (!all) break;
        for (unsigned t = w0; t < w1; t++) g_blk.th[t].state = EMU_RUN;
      }
    }
    bool all_done = true, all_block = true;
    for (unsigned t = 0; t < n; t++) {
      all_done = all_done && g_blk.th[t].state == EMU_DONE;
      all_block = all_block && (g_blk.th[t].state == EMU_BLOCK || g_blk.th[t].state == EMU_DONE);
    }
    if (all_done) return true;
    if (all_block) {  // __syncthreads opens when every live thread waits at it
      for (unsigned t = 0; t < n; t++)
        if (g_blk.th[t].state == EMU_BLOCK) g_blk.th[t].state = EMU_RUN;
      continue;
    }
    char states[1100];
    unsigned k = 0;
    for (unsigned t = 0; t < n && k + 1 < sizeof states; t++) states[k++] = "RWBD"[g_blk.th[t].state];
    states[k] = 0;
    emu_fail(cudaErrorLaunchFailure, "block %u: divergent barrier (R run, W warp barrier, B __syncthreads, D done): %s", b, states);
    for (unsigned t = 0; t < n; t++) g_blk.th[t].started = false;  // abandoned: remade by the next block
    return false;
  }
}

// A kernel that never returns hangs a GPU too; here a launch running longer than
// XFT_EMU_LAUNCH_TIMEOUT seconds (default 600) ends the process with its name, instead of a silent hang.
inline const char* g_emu_running = "";
inline void emu_watchdog(int) {
  const char* a = "xft emu: launch of ";
  const char* b = " ran past XFT_EMU_LAUNCH_TIMEOUT (a kernel that does not end?)\n";
  if (write(2, a, strlen(a)) < 0 || write(2, g_emu_running, strlen(g_emu_running)) < 0 || write(2, b, strlen(b)) < 0) {}
  _exit(124);
}
struct EmuWatchdog {
  EmuWatchdog(const char* name) {
    static const unsigned seconds = getenv("XFT_EMU_LAUNCH_TIMEOUT") ? atoi(getenv("XFT_EMU_LAUNCH_TIMEOUT")) : 600;
    g_emu_running = name;
    signal(SIGALRM, emu_watchdog);
    alarm(seconds);
  }
  ~EmuWatchdog() { alarm(0); }
};

inline void emu_launch(dim3 grid, dim3 block, size_t smem, const void* kernel, const char* name, std::function<void()> fn) {
  emu_land_h2d();
  if (emu_capture_record([grid, block, smem, kernel, name, fn] { emu_launch(grid, block, smem, kernel, name, fn); })) return;
  g_emu.launches++;
  EmuWatchdog watchdog(name);
  const unsigned long long n = (unsigned long long)block.x * block.y * block.z;
  if (n == 0 || n > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 ||
      grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    emu_fail(cudaErrorInvalidConfiguration, "%s: launch <<<(%u, %u, %u), (%u, %u, %u)>>>", name, grid.x, grid.y, grid.z,
             block.x, block.y, block.z);
    return;
  }
  auto it = g_emu.max_dynamic_smem.find(kernel);
  const size_t smem_cap = std::min<size_t>(std::max<size_t>(48 * 1024, it == g_emu.max_dynamic_smem.end() ? 0 : it->second),
                                           (size_t)emu_smem_optin());
  if (smem > smem_cap) {
    emu_fail(cudaErrorInvalidValue, "%s: %zu bytes of dynamic shared memory, over the %zu allowed", name, smem, smem_cap);
    return;
  }
  gridDim = grid;
  blockDim = block;
  g_blk.fn = fn;
  g_blk.n = (unsigned)n;
  g_blk.th.assign(n, EmuThread{});
  g_blk.cp_open.assign(n, {});
  g_blk.cp_groups.assign(n, {});
  g_blk.smem.resize(smem);  // poisoned by each block
  if (g_blk.stacks.size() < n * kEmuStack) g_blk.stacks.resize(n * kEmuStack);
  const unsigned long long blocks = (unsigned long long)grid.x * grid.y * grid.z;
  const std::vector<unsigned long long> order = emu_order_mode() != 0 && blocks <= (1u << 20) ? emu_order(blocks)
                                                                                               : std::vector<unsigned long long>();
  for (unsigned long long i = 0; i < blocks; i++) {
    const unsigned long long b = order.empty() ? i : order[i];
    blockIdx = uint3{(unsigned)(b % grid.x), (unsigned)((b / grid.x) % grid.y), (unsigned)(b / ((unsigned long long)grid.x * grid.y))};
    if (!emu_run_block((unsigned)b)) return;
  }
}

// A launch as convert.py writes it: the arguments copied now (as CUDA copies them at the launch), so
// that a captured launch replays with the values they had, not with what their expressions read later.
template <class K, class... A>
inline void emu_launch_kernel(dim3 grid, dim3 block, size_t smem, const void* key, const char* name, K call, A&&... a) {
  std::tuple<std::decay_t<A>...> args(std::forward<A>(a)...);
  emu_launch(grid, block, smem, key, name, [call, args]() mutable { std::apply(call, args); });
}

// ---- graphs: a capture's nodes, replayed in order ----
inline cudaError_t cudaStreamBeginCapture(cudaStream_t, cudaStreamCaptureMode) {
  if (g_emu_capture.on) return cudaErrorIllegalState;
  emu_land_h2d();
  g_emu_capture = EmuCapture{true, cudaSuccess, new EmuGraph(), {}};
  return cudaSuccess;
}
inline cudaError_t cudaStreamEndCapture(cudaStream_t, cudaGraph_t* graph) {
  *graph = nullptr;
  if (!g_emu_capture.on) return cudaErrorIllegalState;
  int invalid = g_emu_capture.invalid;
  EmuGraph* g = g_emu_capture.graph;
  if (!g_emu_capture.allocated.empty()) {
    // outliving the capture, they are plain allocations again (their owner frees them as usual)
    fprintf(stderr, "xft emu: %zu allocation(s) made inside the CUDA graph capture outlive it: not permitted here (free them inside it)\n",
            g_emu_capture.allocated.size());
    if (invalid == cudaSuccess) invalid = cudaErrorStreamCaptureUnsupported;
  }
  g_emu_capture = EmuCapture{};
  if (invalid != cudaSuccess) {
    delete g;
    return cudaErrorStreamCaptureInvalidated;
  }
  *graph = g;
  return cudaSuccess;
}
inline cudaError_t cudaStreamIsCapturing(cudaStream_t, cudaStreamCaptureStatus* status) {
  *status = !g_emu_capture.on ? cudaStreamCaptureStatusNone
            : g_emu_capture.invalid ? cudaStreamCaptureStatusInvalidated : cudaStreamCaptureStatusActive;
  return cudaSuccess;
}
inline cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t graph, unsigned long long = 0) {
  if (!graph) return cudaErrorInvalidValue;
  *exec = new EmuGraph(*graph);
  return cudaSuccess;
}
inline cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t) {
  if (!exec) return cudaErrorInvalidValue;
  if (!emu_capture_allows("cudaGraphLaunch")) return cudaErrorStreamCaptureUnsupported;
  for (auto& node : exec->nodes) node();
  return (cudaError_t)g_emu.pending;
}
inline EmuGraphMemory::~EmuGraphMemory() {
  for (auto& [p, n] : blocks) {
    auto it = g_emu.live.find((const char*)p);
    if (it != g_emu.live.end()) g_emu.used -= it->second, g_emu.live.erase(it);
    free(p);
  }
}
inline cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) { delete exec; return cudaSuccess; }
inline cudaError_t cudaGraphDestroy(cudaGraph_t graph) { delete graph; return cudaSuccess; }
