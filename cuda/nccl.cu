/*
NCCL for the communicator, loaded at run time (xft_nccl.h says what each function does). The few C
entry points used are declared here with NCCL's own types and values (its C API is stable: these
are unchanged since NCCL 2.10, the first with bf16 and ncclAvg), so that the build needs no NCCL.
*/
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

#include <mutex>
#include <string>

#include "xft_math.h"
#include "xft_nccl.h"

extern "C" cudaStream_t xft_cuda_stream(void);

// ---- NCCL's C API, as nccl.h declares it ----
typedef struct ncclComm* ncclComm_t;
typedef struct {
  char internal[XFT_NCCL_ID_BYTES];
} ncclUniqueId;
typedef int ncclResult_t;  // ncclSuccess = 0
enum { ncclUint8 = 1, ncclFloat32 = 7, ncclFloat64 = 8, ncclBfloat16 = 9 };
enum { ncclSum = 0, ncclAvg = 4 };
typedef int ncclDataType_t;
typedef int ncclRedOp_t;

struct NcclApi {
  ncclResult_t (*GetVersion)(int*);
  ncclResult_t (*GetUniqueId)(ncclUniqueId*);
  ncclResult_t (*CommInitRank)(ncclComm_t*, int, ncclUniqueId, int);
  ncclResult_t (*CommDestroy)(ncclComm_t);
  ncclResult_t (*CommAbort)(ncclComm_t);
  ncclResult_t (*CommGetAsyncError)(ncclComm_t, ncclResult_t*);
  const char* (*GetErrorString)(ncclResult_t);
  ncclResult_t (*AllReduce)(const void*, void*, size_t, ncclDataType_t, ncclRedOp_t, ncclComm_t, cudaStream_t);
  ncclResult_t (*ReduceScatter)(const void*, void*, size_t, ncclDataType_t, ncclRedOp_t, ncclComm_t, cudaStream_t);
  ncclResult_t (*AllGather)(const void*, void*, size_t, ncclDataType_t, ncclComm_t, cudaStream_t);
  ncclResult_t (*Broadcast)(const void*, void*, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t);
  ncclResult_t (*GroupStart)(void);
  ncclResult_t (*GroupEnd)(void);
};

static NcclApi g_nccl;
static void* g_lib = nullptr;
static int g_version = 0;
static std::mutex g_load_mu;
static thread_local std::string g_error;
static cudaStream_t g_side = nullptr;
static int g_device = -1;

#ifdef XFT_EMU
// the host emulator runs every stream in order at once: waiting on an event is a no-op (its
// cudaEventQuery, in cuda_runtime.h, says done)
static cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned) { return cudaSuccess; }
#endif

static int Fail(const std::string& what) {
  g_error = what;
  return -1;
}
static int Cuda(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return 0;
  return Fail(std::string(what) + ": CUDA error " + std::to_string((int)e) + " (" + cudaGetErrorString(e) + ")");
}
static int Nccl(ncclResult_t r, const char* what) {
  if (r == 0) return 0;
  const char* s = g_nccl.GetErrorString ? g_nccl.GetErrorString(r) : "unknown";
  return Fail(std::string(what) + ": NCCL error " + std::to_string(r) + " (" + s + ")");
}
static ncclDataType_t Type(int dtype) {
  return dtype == XFT_BF16 ? ncclBfloat16 : dtype == 3 ? ncclFloat64 : dtype == 4 ? ncclUint8 : ncclFloat32;
}

extern "C" const char* xft_nccl_last_error(void) { return g_error.c_str(); }

extern "C" int xft_nccl_load(const char* paths, int* version) {
  std::lock_guard<std::mutex> lock(g_load_mu);
  if (g_lib) {
    *version = g_version;
    return 0;
  }
  std::string tried;
  const char* p = paths;
  while (p && *p) {
    const char* nl = strchr(p, '\n');
    std::string path = nl ? std::string(p, nl - p) : std::string(p);
    p = nl ? nl + 1 : nullptr;
    if (path.empty()) continue;
    void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      const char* e = dlerror();
      tried += "\n  " + path + ": " + (e ? e : "not loadable");
      continue;
    }
    NcclApi api;
    bool ok = true;
    auto sym = [&](const char* name) {
      void* s = dlsym(lib, name);
      if (!s) {
        ok = false;
        tried += "\n  " + path + ": has no " + name;
      }
      return s;
    };
    api.GetVersion = (decltype(api.GetVersion))sym("ncclGetVersion");
    api.GetUniqueId = (decltype(api.GetUniqueId))sym("ncclGetUniqueId");
    api.CommInitRank = (decltype(api.CommInitRank))sym("ncclCommInitRank");
    api.CommDestroy = (decltype(api.CommDestroy))sym("ncclCommDestroy");
    api.CommAbort = (decltype(api.CommAbort))sym("ncclCommAbort");
    api.CommGetAsyncError = (decltype(api.CommGetAsyncError))sym("ncclCommGetAsyncError");
    api.GetErrorString = (decltype(api.GetErrorString))sym("ncclGetErrorString");
    api.AllReduce = (decltype(api.AllReduce))sym("ncclAllReduce");
    api.ReduceScatter = (decltype(api.ReduceScatter))sym("ncclReduceScatter");
    api.AllGather = (decltype(api.AllGather))sym("ncclAllGather");
    api.Broadcast = (decltype(api.Broadcast))sym("ncclBroadcast");
    api.GroupStart = (decltype(api.GroupStart))sym("ncclGroupStart");
    api.GroupEnd = (decltype(api.GroupEnd))sym("ncclGroupEnd");
    int v = 0;
    if (ok && api.GetVersion(&v) == 0 && v < 21000) {
      ok = false;
      tried += "\n  " + path + ": NCCL " + std::to_string(v) + " is older than 2.10 (no bf16, no ncclAvg)";
    }
    if (!ok) {
      dlclose(lib);
      continue;
    }
    g_nccl = api;
    g_lib = lib;
    g_version = v;
    *version = v;
    return 0;
  }
  return Fail("cannot load NCCL (libnccl.so.2); tried:" + tried +
              "\ninstall it (pip install nvidia-nccl-cu12 or nvidia-nccl-cu13, or the system package libnccl2) or point "
              "XFT_NCCL_LIBRARY at libnccl.so.2");
}

extern "C" int xft_nccl_unique_id(void* id) {
  ncclUniqueId u;
  if (Nccl(g_nccl.GetUniqueId(&u), "ncclGetUniqueId")) return -1;
  memcpy(id, u.internal, XFT_NCCL_ID_BYTES);
  return 0;
}

extern "C" int xft_nccl_bind_thread(void) {
  if (g_device < 0 && Cuda(cudaGetDevice(&g_device), "cudaGetDevice")) return -1;
  return Cuda(cudaSetDevice(g_device), "cudaSetDevice");
}

extern "C" int xft_nccl_comm_init(void** comm, int size, const void* id, int rank) {
  if (xft_nccl_bind_thread()) return -1;
  if (!g_side && Cuda(cudaStreamCreateWithFlags(&g_side, cudaStreamNonBlocking), "cudaStreamCreate")) return -1;
  ncclUniqueId u;
  memcpy(u.internal, id, XFT_NCCL_ID_BYTES);
  ncclComm_t c = nullptr;
  if (Nccl(g_nccl.CommInitRank(&c, size, u, rank), "ncclCommInitRank")) return -1;
  *comm = c;
  return 0;
}

extern "C" int xft_nccl_comm_check(void* comm, int* failed) {
  ncclResult_t async = 0;
  *failed = 0;
  if (Nccl(g_nccl.CommGetAsyncError((ncclComm_t)comm, &async), "ncclCommGetAsyncError")) return -1;
  if (async != 0 && async != 7 /* ncclInProgress */) {
    *failed = 1;
    Nccl(async, "a collective failed (ncclCommGetAsyncError)");
  }
  return 0;
}

extern "C" int xft_nccl_comm_abort(void* comm) { return Nccl(g_nccl.CommAbort((ncclComm_t)comm), "ncclCommAbort"); }
extern "C" int xft_nccl_comm_destroy(void* comm) { return Nccl(g_nccl.CommDestroy((ncclComm_t)comm), "ncclCommDestroy"); }

extern "C" int xft_nccl_begin(void) {
  cudaEvent_t e;
  if (Cuda(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate")) return -1;
  int r = Cuda(cudaEventRecord(e, xft_cuda_stream()), "cudaEventRecord");
  if (!r) r = Cuda(cudaStreamWaitEvent(g_side, e, 0), "cudaStreamWaitEvent");
  cudaEventDestroy(e);  // released once the wait is done
  return r;
}

extern "C" int xft_nccl_group_start(void) { return Nccl(g_nccl.GroupStart(), "ncclGroupStart"); }
extern "C" int xft_nccl_group_end(void) { return Nccl(g_nccl.GroupEnd(), "ncclGroupEnd"); }

extern "C" int xft_nccl_all_reduce(void* comm, const void* send, void* recv, size_t count, int dtype, int op) {
  return Nccl(g_nccl.AllReduce(send, recv, count, Type(dtype), op == 1 ? ncclAvg : ncclSum, (ncclComm_t)comm, g_side), "ncclAllReduce");
}
extern "C" int xft_nccl_reduce_scatter(void* comm, const void* send, void* recv, size_t recv_count, int dtype, int op) {
  return Nccl(g_nccl.ReduceScatter(send, recv, recv_count, Type(dtype), op == 1 ? ncclAvg : ncclSum, (ncclComm_t)comm, g_side),
              "ncclReduceScatter");
}
extern "C" int xft_nccl_all_gather(void* comm, const void* send, void* recv, size_t send_count, int dtype) {
  return Nccl(g_nccl.AllGather(send, recv, send_count, Type(dtype), (ncclComm_t)comm, g_side), "ncclAllGather");
}
extern "C" int xft_nccl_broadcast(void* comm, void* buf, size_t count, int dtype, int root) {
  return Nccl(g_nccl.Broadcast(buf, buf, count, Type(dtype), root, (ncclComm_t)comm, g_side), "ncclBroadcast");
}

extern "C" int xft_nccl_end(void** event) {
  cudaEvent_t e;
  if (Cuda(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate")) return -1;
  if (Cuda(cudaEventRecord(e, g_side), "cudaEventRecord")) {
    cudaEventDestroy(e);
    return -1;
  }
  *event = e;
  return 0;
}

extern "C" int xft_nccl_event_done(void* event, int* failed) {
  *failed = 0;
  cudaError_t e = cudaEventQuery((cudaEvent_t)event);
  if (e == cudaSuccess) return 0;
  if ((int)e == 600 /* cudaErrorNotReady (the emulator never returns it) */) return 1;
  *failed = 1;
  Cuda(e, "cudaEventQuery");
  return 0;
}

extern "C" int xft_nccl_join(void* event) {
  return Cuda(cudaStreamWaitEvent(xft_cuda_stream(), (cudaEvent_t)event, 0), "cudaStreamWaitEvent");
}

extern "C" int xft_nccl_event_free(void* event) { return Cuda(cudaEventDestroy((cudaEvent_t)event), "cudaEventDestroy"); }
