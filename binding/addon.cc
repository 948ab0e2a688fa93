// Module entry: the error class, the backend, storages, memory statistics.
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <deque>
#include <map>
#include <mutex>
#include <unordered_map>

#include "common.h"

namespace xft {

static void ReleaseMemory(Storage& s);

namespace {

struct InstanceData {
  Napi::FunctionReference error_class;
  // the live storages of this environment by handle; handles count up from 1 and are never reused,
  // so a stale handle is always recognised as disposed
  std::unordered_map<uint64_t, Storage> storages;
  uint64_t next_handle = 1;
  // what JavaScript never disposed nor collected is freed when the environment ends
  ~InstanceData() {
    for (auto& entry : storages) ReleaseMemory(entry.second);
  }
};

InstanceData* Data(Napi::Env env) { return env.GetInstanceData<InstanceData>(); }

Counters g_counters;

// CUDA backend state: 0 not tried, 1 ready, -1 unavailable (g_cuda_reason says why)
int g_cuda_state = 0;
std::string g_cuda_reason;
#ifdef XFT_WITH_CUDA
xft_cuda_device g_cuda_info;
xft_cuda_probe_result g_cuda_probe;  // what the host offered (backend() passes it on when the GPU is not used)
bool g_cuda_probed = false;
#endif
// the oldest GPU the kernels are built for (sm_80: cp.async, ldmatrix, bf16 mma)
const int kMinComputeMajor = 8;

bool g_sync_each_op = false;
bool g_poison = false;  // fill new storages with 0xFF bytes (NaN floats, -1 ints): finds unwritten outputs

}  // namespace

Counters& LiveCounters() { return g_counters; }

void Throw(Napi::Env env, const char* code, const std::string& message) {
  InstanceData* d = Data(env);
  if (d && !d->error_class.IsEmpty()) {
    Napi::Value err = d->error_class.New({Napi::String::New(env, message), Napi::String::New(env, code)});
    throw Napi::Error(env, err);
  }
  Napi::Error err = Napi::Error::New(env, message);
  err.Set("code", Napi::String::New(env, code));
  throw err;
}

void CheckStatus(Napi::Env env, const char* op, int status) {
  if (status == 0) return;
#ifdef XFT_WITH_CUDA
  Throw(env, "XFT_CUDA", std::string(op) + ": CUDA error " + std::to_string(status) + " (" +
                             xft_cuda_error_string(status) + ")");
#else
  Throw(env, "XFT_CUDA", std::string(op) + ": backend error " + std::to_string(status));
#endif
}

void CheckSynced(Napi::Env env, const char* op, int status) {
  CheckStatus(env, op, status);
#ifdef XFT_WITH_CUDA
  xft_cuda_fault f;
  CheckStatus(env, op, xft_cuda_take_fault(&f));
  if (f.kind == XFT_FAULT_NONE) return;
  const std::string where = " (found by a GPU kernel and reported at the next synchronisation, here " + std::string(op) +
                            "; the entry was skipped, so that op's outputs are not meaningful)";
  const std::string at = "[" + std::to_string(f.index) + "] = " + std::to_string(f.value);
  const std::string B = std::to_string(f.bound);
  if (f.kind == XFT_FAULT_ROUTE_EXPERTS)
    Throw(env, "XFT_INDEX", "routeSharedBackward: routing.experts" + at + " (flat index) is not an expert of the routing (" + B +
                                " logit columns: expected 1 <= e <= " + B + " with a shared expert, 0 <= e < " + B + " without)" + where);
  if (f.kind == XFT_FAULT_EMBEDDING_IDS)
    Throw(env, "XFT_INDEX", "embedding: ids" + at + " (flat index) is out of range for a table of " + B +
                                " rows (expected 0 <= id < " + B + ")" + where);
  Throw(env, "XFT_INDEX", "a GPU kernel met an out-of-range index (fault kind " + std::to_string(f.kind) + ")" + where);
#endif
}

void AfterLaunch(Napi::Env env, const char* op, int device) {
#ifdef XFT_WITH_CUDA
  if (device != DEV_CUDA) return;
  CheckStatus(env, op, xft_cuda_check());
  if (g_sync_each_op) CheckSynced(env, op, xft_cuda_synchronize());
#else
  (void)env, (void)op, (void)device;
#endif
}

bool CudaAvailable(Napi::Env env) {
  (void)env;
  if (g_cuda_state != 0) return g_cuda_state == 1;
  g_cuda_state = -1;
  const char* forced = getenv("XFT_DEVICE");
  if (forced && strcmp(forced, "cpu") == 0) {
    g_cuda_reason = "the CPU backend was forced by XFT_DEVICE=cpu";
    return false;
  }
#ifdef XFT_WITH_CUDA
  int ordinal = 0;
  const char* want = getenv("XFT_CUDA_DEVICE");
  if (want) ordinal = atoi(want);
  xft_cuda_probe(ordinal, &g_cuda_probe);
  g_cuda_probed = true;
  const xft_cuda_probe_result& p = g_cuda_probe;
  // a short reason here; lib/backend_reason.ts words the full one from the probe
  if (p.error != 0) {
    g_cuda_reason = std::string("CUDA is not usable: ") + xft_cuda_error_string(p.error) + " (" +
                    xft_cuda_error_name(p.error) + ")";
    return false;
  }
  if (p.device_count == 0) {
    g_cuda_reason = "no CUDA device was found (no GPU, or no NVIDIA driver)";
    return false;
  }
  if (ordinal < 0 || ordinal >= p.device_count) {
    g_cuda_reason = "XFT_CUDA_DEVICE=" + std::to_string(ordinal) + " names no device (" +
                    std::to_string(p.device_count) + " found)";
    return false;
  }
  if (p.major < kMinComputeMajor) {
    g_cuda_reason = std::string(p.name) + " has compute capability " + std::to_string(p.major) + "." +
                    std::to_string(p.minor) + "; xft's CUDA kernels need 8.0 or newer";
    return false;
  }
  int status = xft_cuda_init(ordinal, &g_cuda_info);
  if (status != 0) {
    g_cuda_reason = std::string("CUDA initialisation failed: ") + xft_cuda_error_string(status);
    return false;
  }
  g_cuda_state = 1;
  return true;
#else
  g_cuda_reason = "this build of xft has no CUDA backend (built without nvcc or with XFT_CUDA=OFF)";
  return false;
#endif
}

void RequireCuda(Napi::Env env, const char* op) {
  if (!CudaAvailable(env)) Throw(env, "XFT_DEVICE", std::string(op) + ": device 'cuda' is not available: " + g_cuda_reason);
}

// ---- Storage ----

// Host memory: 64-byte aligned and never null (a zero-byte tensor still owns a distinct pointer).
// Small blocks come from malloc. Large blocks (>= kHostCacheMinBytes) come from mmap through a cache
// of freed blocks by size class (2^k, 1.25 2^k, 1.5 2^k, 1.75 2^k: at most 25% slack), the host twin
// of the CUDA stream-ordered pool: a training step frees and allocates the same sizes every step,
// and reusing them makes no mmap/munmap (page faults, zeroing in the kernel) after the first step.
// A freed block goes back to the cache at once; while the cache would hold more than its cap
// (XFT_HOST_CACHE_BYTES, default min(2 GiB, RAM / 8)), the least recently freed blocks are unmapped;
// emptyHostCache() unmaps all of them. Fresh and reused blocks alike are uninitialised (alloc()
// promises nothing; Tensor.zeros fills explicitly). A mutex guards the cache: storages are freed
// from dispose() and from finalizers, and a worker thread could free one.
static const size_t kHostCacheMinBytes = 64 * 1024;

namespace {

struct HostCache {
  std::mutex mu;
  // freed blocks by class size; the list of each class is in freeing order (most recent at the back)
  std::map<size_t, std::deque<std::pair<void*, uint64_t>>> free_blocks;
  // every cached block by its freeing tick, for least-recently-freed eviction: tick -> (class, ptr)
  std::map<uint64_t, std::pair<size_t, void*>> by_age;
  uint64_t tick = 0;
  size_t cached_bytes = 0, cap = 0;
  int64_t hits = 0, misses = 0, maps = 0, unmaps = 0;
  size_t reserved_bytes = 0;  // mapped large blocks: live plus cached

  HostCache() {
    const char* env = getenv("XFT_HOST_CACHE_BYTES");
    if (env && *env) {
      char* end = nullptr;
      double v = strtod(env, &end);
      cap = v > 0 ? (size_t)v : 0;
    } else {
      long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
      size_t ram = pages > 0 && page > 0 ? (size_t)pages * (size_t)page : ((size_t)16 << 30);
      cap = std::min((size_t)2 << 30, ram / 8);
    }
  }

  // the class of a large block: bytes rounded up to a quarter step of its power of two, then to pages
  static size_t ClassOf(size_t bytes) {
    int top = 63 - __builtin_clzll((unsigned long long)bytes);  // 2^top <= bytes
    size_t step = (size_t)1 << (top >= 2 ? top - 2 : 0);
    size_t c = (bytes + step - 1) / step * step;
    return (c + 4095) / 4096 * 4096;
  }

  void Unmap(void* p, size_t c) {
    munmap(p, c);
    unmaps++;
    reserved_bytes -= c;
  }

  // drops the least recently freed blocks until at most `limit` bytes stay cached (lock held)
  void TrimTo(size_t limit) {
    while (cached_bytes > limit && !by_age.empty()) {
      auto oldest = by_age.begin();
      size_t c = oldest->second.first;
      void* p = oldest->second.second;
      auto& list = free_blocks[c];
      for (auto it = list.begin(); it != list.end(); ++it)
        if (it->first == p) {
          list.erase(it);
          break;
        }
      if (list.empty()) free_blocks.erase(c);
      by_age.erase(oldest);
      cached_bytes -= c;
      Unmap(p, c);
    }
  }

  void* Take(size_t bytes) {
    const size_t c = ClassOf(bytes);
    {
      std::lock_guard<std::mutex> lock(mu);
      auto it = free_blocks.find(c);
      if (it != free_blocks.end() && !it->second.empty()) {
        auto block = it->second.back();  // the most recently freed: likeliest still in cache
        it->second.pop_back();
        if (it->second.empty()) free_blocks.erase(it);
        by_age.erase(block.second);
        cached_bytes -= c;
        hits++;
        return block.first;
      }
      misses++;
    }
    void* p = mmap(nullptr, c, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      // the cache may hold what the system lacks: give it back and try once more
      Empty();
      p = mmap(nullptr, c, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) return nullptr;
    }
    std::lock_guard<std::mutex> lock(mu);
    maps++;
    reserved_bytes += c;
    return p;
  }

  void Give(void* p, size_t bytes) {
    const size_t c = ClassOf(bytes);
    std::lock_guard<std::mutex> lock(mu);
    if (c > cap) {
      Unmap(p, c);
      return;
    }
    const uint64_t t = ++tick;
    free_blocks[c].emplace_back(p, t);
    by_age.emplace(t, std::make_pair(c, p));
    cached_bytes += c;
    TrimTo(cap);
  }

  void Empty() {
    std::lock_guard<std::mutex> lock(mu);
    TrimTo(0);
  }

  void SetCap(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu);
    cap = bytes;
    TrimTo(cap);
  }
};

HostCache& Cache() {
  static HostCache* cache = new HostCache();  // never destroyed: a finalizer may run during exit
  return *cache;
}

}  // namespace

static void* HostAlloc(size_t bytes) {
  if (bytes >= kHostCacheMinBytes) return Cache().Take(bytes);
  size_t rounded = ((bytes + 63) / 64) * 64;
  return aligned_alloc(64, rounded ? rounded : 64);
}

static void HostFree(void* p, size_t bytes) {
  if (bytes >= kHostCacheMinBytes) Cache().Give(p, bytes);
  else free(p);
}

static void ReleaseMemory(Storage& s) {
  if (s.data == nullptr) return;
  if (s.device == DEV_CPU) {
    HostFree(s.data, s.bytes);
    g_counters.host_bytes -= (int64_t)s.bytes;
    g_counters.host_count--;
  } else {
#ifdef XFT_WITH_CUDA
    xft_cuda_free(s.data);  // stream ordered: safe while kernels using it are still queued
#endif
    g_counters.cuda_bytes -= (int64_t)s.bytes;
    g_counters.cuda_count--;
  }
  s.data = nullptr;
}

// Handles travel as JS numbers: exact up to 2^53, far beyond any number of allocations.
static const double kMaxHandle = 9007199254740991.0;

// Releases a storage's memory and its owner's finalizer, and forgets its handle.
static void Forget(napi_env env, InstanceData* d, std::unordered_map<uint64_t, Storage>::iterator it) {
  int64_t nbytes = (int64_t)it->second.bytes;
  if (it->second.owner) napi_delete_reference(env, it->second.owner);
  ReleaseMemory(it->second);
  d->storages.erase(it);
  int64_t adjusted = 0;
  napi_adjust_external_memory(env, -nbytes, &adjusted);
}

// The finalizer of a forgotten owner (runs after garbage collection, from the event loop).
static void FinalizeOwner(napi_env env, void* data, void* hint) {
  (void)hint;
  void* raw = nullptr;
  if (napi_get_instance_data(env, &raw) != napi_ok || raw == nullptr) return;
  InstanceData* d = static_cast<InstanceData*>(raw);
  auto it = d->storages.find((uint64_t)(uintptr_t)data);
  if (it != d->storages.end()) Forget(env, d, it);
}

// alloc(device, bytes, owner) -> handle: a new storage (uninitialised; 0xFF bytes with setPoison(true))
// that is freed when `owner` (an object) is garbage collected, unless free() came first.
static Napi::Value Alloc(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[2].IsObject()) Throw(env, "XFT_TYPE", "alloc: owner must be an object");
  int64_t dev = ArgInt(info, 0, "alloc", "device");
  int64_t nbytes = ArgInt(info, 1, "alloc", "bytes");
  if (dev != DEV_CPU && dev != DEV_CUDA) Throw(env, "XFT_DEVICE", "alloc: device must be 0 (cpu) or 1 (cuda)");
  if (nbytes < 0) Throw(env, "XFT_SHAPE", "alloc: bytes must be >= 0, got " + std::to_string(nbytes));
  Storage s;
  s.device = (int)dev;
  s.bytes = (size_t)nbytes;
  if (s.device == DEV_CPU) {
    s.data = HostAlloc(s.bytes);
    if (!s.data) Throw(env, "XFT_OOM", "alloc: out of host memory allocating " + std::to_string(s.bytes) + " bytes");
    if (g_poison) memset(s.data, 0xFF, s.bytes);
    g_counters.host_bytes += nbytes;
    g_counters.host_count++;
    if (g_counters.host_bytes > g_counters.host_peak) g_counters.host_peak = g_counters.host_bytes;
  } else {
    RequireCuda(env, "alloc");
#ifdef XFT_WITH_CUDA
    int status = xft_cuda_malloc(&s.data, s.bytes);
    if (status == 900)  // cudaErrorStreamCaptureUnsupported: inside a CUDA graph capture that does not take allocation nodes
      Throw(env, "XFT_CUDA", "alloc: cannot allocate " + std::to_string(s.bytes) + " bytes while a CUDA graph is being captured: " +
                                 xft_cuda_error_string(status) + " (make the buffers before the capture)");
    if (status != 0)
      Throw(env, "XFT_OOM", "alloc: cannot allocate " + std::to_string(s.bytes) + " bytes on the GPU: " +
                                xft_cuda_error_string(status));
    g_counters.cuda_bytes += nbytes;
    g_counters.cuda_count++;
    if (g_counters.cuda_bytes > g_counters.cuda_peak) g_counters.cuda_peak = g_counters.cuda_bytes;
    if (g_poison) {
      int poison = xft_cuda_memset(s.data, 0xFF, s.bytes);
      if (poison != 0) {
        ReleaseMemory(s);
        CheckStatus(env, "alloc", poison);
      }
    }
#endif
  }
  InstanceData* d = Data(env);
  uint64_t handle = d->next_handle++;
  napi_status status = napi_add_finalizer(env, info[2], (void*)(uintptr_t)handle, FinalizeOwner, nullptr, &s.owner);
  if (status != napi_ok) {
    ReleaseMemory(s);
    Throw(env, "XFT_NATIVE", "alloc: cannot attach a finalizer to the owner");
  }
  d->storages.emplace(handle, s);
  Napi::MemoryManagement::AdjustExternalMemory(env, nbytes);
  return Napi::Number::New(env, (double)handle);
}

// free(handle) -> boolean: releases the memory now; false when it was already released.
static Napi::Value Free(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsNumber()) Throw(env, "XFT_TYPE", "free: expected a storage handle");
  double h = info[0].As<Napi::Number>().DoubleValue();
  InstanceData* d = Data(env);
  auto it = h >= 1 && h <= kMaxHandle ? d->storages.find((uint64_t)h) : d->storages.end();
  if (it == d->storages.end()) return Napi::Boolean::New(env, false);
  Forget(env, d, it);
  return Napi::Boolean::New(env, true);
}

// ---- argument helpers ----

static std::string Where(const char* op, const char* name) { return std::string(op) + ": " + name; }

Storage* ValueStorage(Napi::Env env, Napi::Value v, const char* op, const char* name) {
  double h = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : 0;
  InstanceData* d = Data(env);
  if (!(h >= 1 && h <= kMaxHandle) || h != (double)(uint64_t)h) Throw(env, "XFT_TYPE", Where(op, name) + " must be a tensor storage");
  auto it = d->storages.find((uint64_t)h);
  if (it == d->storages.end()) {
    if ((uint64_t)h < d->next_handle) Throw(env, "XFT_DISPOSED", Where(op, name) + " was used after dispose()");
    Throw(env, "XFT_TYPE", Where(op, name) + " must be a tensor storage");
  }
  return &it->second;
}

Storage* ArgStorageOrNull(const Napi::CallbackInfo& info, size_t i, const char* op, const char* name) {
  Napi::Value v = info[i];
  if (v.IsNull() || v.IsUndefined()) return nullptr;
  return ValueStorage(info.Env(), v, op, name);
}

Storage* ArgStorage(const Napi::CallbackInfo& info, size_t i, const char* op, const char* name) {
  Storage* s = ArgStorageOrNull(info, i, op, name);
  if (!s) Throw(info.Env(), "XFT_TYPE", Where(op, name) + " is required");
  return s;
}

void RequireBytes(Napi::Env env, Storage* s, size_t elements, int dtype, const char* op, const char* name) {
  if (s && s->bytes < elements * DtypeSize(dtype))
    Throw(env, "XFT_SHAPE", Where(op, name) + " holds " + std::to_string(s->bytes) + " bytes, expected at least " +
                                std::to_string(elements) + " " + DtypeName(dtype) + " elements");
}

int CommonDevice(Napi::Env env, const char* op, std::initializer_list<Storage*> storages) {
  int device = -1;
  for (Storage* s : storages) {
    if (!s) continue;
    if (device < 0) device = s->device;
    else if (device != s->device)
      Throw(env, "XFT_DEVICE", std::string(op) + ": all tensors must be on one device, got both cpu and cuda");
  }
  return device < 0 ? DEV_CPU : device;
}

int64_t ArgInt(const Napi::CallbackInfo& info, size_t i, const char* op, const char* name) {
  Napi::Value v = info[i];
  if (v.IsBigInt()) {
    bool lossless = true;
    return v.As<Napi::BigInt>().Int64Value(&lossless);
  }
  if (!v.IsNumber()) Throw(info.Env(), "XFT_TYPE", Where(op, name) + " must be an integer");
  double d = v.As<Napi::Number>().DoubleValue();
  if (d != (double)(int64_t)d) Throw(info.Env(), "XFT_TYPE", Where(op, name) + " must be an integer, got " + std::to_string(d));
  return (int64_t)d;
}

double ArgNumber(const Napi::CallbackInfo& info, size_t i, const char* op, const char* name) {
  if (!info[i].IsNumber()) Throw(info.Env(), "XFT_TYPE", Where(op, name) + " must be a number");
  return info[i].As<Napi::Number>().DoubleValue();
}

int ArgDtype(const Napi::CallbackInfo& info, size_t i, const char* op, const char* name) {
  int64_t d = ArgInt(info, i, op, name);
  if (d != XFT_F32 && d != XFT_BF16 && d != XFT_I32) Throw(info.Env(), "XFT_DTYPE", Where(op, name) + " is not a dtype code");
  return (int)d;
}

// ---- module functions ----

static Napi::Value SetErrorClass(const Napi::CallbackInfo& info) {
  if (!info[0].IsFunction()) throw Napi::TypeError::New(info.Env(), "setErrorClass: expected a class");
  Data(info.Env())->error_class = Napi::Persistent(info[0].As<Napi::Function>());
  return info.Env().Undefined();
}

static Napi::Value Backend(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object out = Napi::Object::New(env);
#ifdef XFT_WITH_CUDA
  out.Set("compiledWithCuda", true);
#else
  out.Set("compiledWithCuda", false);
#endif
  if (!CudaAvailable(env)) {
    out.Set("kind", "cpu");
    out.Set("reason", g_cuda_reason);
#ifdef XFT_WITH_CUDA
    if (g_cuda_probed) {
      const xft_cuda_probe_result& p = g_cuda_probe;
      Napi::Object c = Napi::Object::New(env);
      c.Set("error", p.error);
      c.Set("errorName", p.error ? xft_cuda_error_name(p.error) : "cudaSuccess");
      c.Set("errorString", p.error ? xft_cuda_error_string(p.error) : "no error");
      c.Set("deviceCount", p.device_count);
      c.Set("driverVersion", p.driver_version);
      c.Set("runtimeVersion", p.runtime_version);
      c.Set("driverRelease", std::string(p.driver_release));
      c.Set("ordinal", p.ordinal);
      if (p.major > 0) {
        c.Set("name", std::string(p.name));
        Napi::Array cc = Napi::Array::New(env, 2);
        cc.Set((uint32_t)0, p.major);
        cc.Set((uint32_t)1, p.minor);
        c.Set("computeCapability", cc);
      }
      out.Set("cuda", c);
    }
#endif
    return out;
  }
#ifdef XFT_WITH_CUDA
  CheckStatus(env, "backend", xft_cuda_query(&g_cuda_info));
  out.Set("kind", "cuda");
  out.Set("name", std::string(g_cuda_info.name));
  out.Set("ordinal", g_cuda_info.ordinal);
  Napi::Array cc = Napi::Array::New(env, 2);
  cc.Set((uint32_t)0, g_cuda_info.major);
  cc.Set((uint32_t)1, g_cuda_info.minor);
  out.Set("computeCapability", cc);
  out.Set("multiprocessors", g_cuda_info.multiprocessors);
  out.Set("totalMemory", (double)g_cuda_info.total_memory);
  out.Set("freeMemory", (double)g_cuda_info.free_memory);
  out.Set("driverVersion", g_cuda_info.driver_version);
  out.Set("runtimeVersion", g_cuda_info.runtime_version);
  out.Set("driverRelease", std::string(g_cuda_probe.driver_release));
  out.Set("maxSharedMemoryPerBlock", g_cuda_probe.max_smem_optin);
#endif
  return out;
}

static Napi::Value MemoryStats(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object out = Napi::Object::New(env);
  out.Set("hostBytes", (double)g_counters.host_bytes);
  out.Set("hostTensors", (double)g_counters.host_count);
  out.Set("cudaBytes", (double)g_counters.cuda_bytes);
  out.Set("cudaTensors", (double)g_counters.cuda_count);
  out.Set("hostPeakBytes", (double)g_counters.host_peak);
  out.Set("cudaPeakBytes", (double)g_counters.cuda_peak);
  {
    HostCache& c = Cache();
    std::lock_guard<std::mutex> lock(c.mu);
    out.Set("hostCachedBytes", (double)c.cached_bytes);
    out.Set("hostReservedBytes", (double)c.reserved_bytes);
    out.Set("hostCacheLimitBytes", (double)c.cap);
    out.Set("hostCacheHits", (double)c.hits);
    out.Set("hostCacheMisses", (double)c.misses);
    out.Set("hostMaps", (double)c.maps);
    out.Set("hostUnmaps", (double)c.unmaps);
  }
#ifdef XFT_WITH_CUDA
  if (g_cuda_state == 1) {
    size_t used = 0, reserved = 0;
    CheckStatus(env, "memoryStats", xft_cuda_pool_stats(&used, &reserved));
    out.Set("poolUsedBytes", (double)used);
    out.Set("poolReservedBytes", (double)reserved);
    xft_cuda_sync_stats sync;
    xft_cuda_get_sync_stats(&sync);
    out.Set("hostSyncs", (double)sync.host_syncs);
    out.Set("d2hCopies", (double)sync.d2h_copies);
    out.Set("stagingWaits", (double)sync.staging_waits);
    out.Set("kernelLaunches", (double)sync.launches);
  }
#endif
  return out;
}

// Starts the high-water marks of memoryStats() again from the bytes live now.
static Napi::Value ResetPeakMemory(const Napi::CallbackInfo& info) {
  g_counters.host_peak = g_counters.host_bytes;
  g_counters.cuda_peak = g_counters.cuda_bytes;
  return info.Env().Undefined();
}

static Napi::Value Synchronize(const Napi::CallbackInfo& info) {
#ifdef XFT_WITH_CUDA
  if (g_cuda_state == 1) CheckSynced(info.Env(), "synchronize", xft_cuda_synchronize());
#endif
  return info.Env().Undefined();
}

static Napi::Value SetPoison(const Napi::CallbackInfo& info) {
  g_poison = info[0].ToBoolean();
  return info.Env().Undefined();
}

static Napi::Value TrimPool(const Napi::CallbackInfo& info) {
#ifdef XFT_WITH_CUDA
  if (g_cuda_state == 1) CheckSynced(info.Env(), "trimPool", xft_cuda_pool_trim());
#endif
  return info.Env().Undefined();
}

// emptyHostCache(): unmaps every cached host block (live tensors keep theirs).
static Napi::Value EmptyHostCache(const Napi::CallbackInfo& info) {
  Cache().Empty();
  return info.Env().Undefined();
}

// setHostCacheLimit(bytes): the most bytes of freed host blocks kept for reuse (0: none); trims at once.
static Napi::Value SetHostCacheLimit(const Napi::CallbackInfo& info) {
  double v = ArgNumber(info, 0, "setHostCacheLimit", "bytes");
  if (!(v >= 0) || v > 9007199254740991.0)
    Throw(info.Env(), "XFT_VALUE", "setHostCacheLimit: bytes must be a number >= 0, got " + std::to_string(v));
  Cache().SetCap((size_t)v);
  return info.Env().Undefined();
}

static Napi::Object Init(Napi::Env env, Napi::Object exports) {
  InstanceData* d = new InstanceData();
  env.SetInstanceData(d);
  const char* sync = getenv("XFT_SYNC");
  g_sync_each_op = sync && strcmp(sync, "1") == 0;
  exports.Set("alloc", Napi::Function::New(env, Alloc, "alloc"));
  exports.Set("free", Napi::Function::New(env, Free, "free"));
  exports.Set("setErrorClass", Napi::Function::New(env, SetErrorClass, "setErrorClass"));
  exports.Set("backend", Napi::Function::New(env, Backend, "backend"));
  exports.Set("memoryStats", Napi::Function::New(env, MemoryStats, "memoryStats"));
  exports.Set("resetPeakMemory", Napi::Function::New(env, ResetPeakMemory, "resetPeakMemory"));
  exports.Set("synchronize", Napi::Function::New(env, Synchronize, "synchronize"));
  exports.Set("setPoison", Napi::Function::New(env, SetPoison, "setPoison"));
  exports.Set("trimPool", Napi::Function::New(env, TrimPool, "trimPool"));
  exports.Set("emptyHostCache", Napi::Function::New(env, EmptyHostCache, "emptyHostCache"));
  exports.Set("setHostCacheLimit", Napi::Function::New(env, SetHostCacheLimit, "setHostCacheLimit"));
#ifdef XFT_WITH_CUDA
  exports.Set("compiledWithCuda", Napi::Boolean::New(env, true));
#else
  exports.Set("compiledWithCuda", Napi::Boolean::New(env, false));
#endif
  RegisterTensorOps(env, exports);
  RegisterXftOps(env, exports);
  RegisterLayerOps(env, exports);
  RegisterTrainOps(env, exports);
  RegisterDist(env, exports);
  RegisterRouterOps(env, exports);
  RegisterTimerOps(env, exports);
  RegisterExpandOps(env, exports);
  RegisterStepOps(env, exports);
  return exports;
}

}  // namespace xft

static Napi::Object InitAddon(Napi::Env env, Napi::Object exports) { return xft::Init(env, exports); }

NODE_API_MODULE(xft, InitAddon)
