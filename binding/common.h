// Shared pieces of the binding: devices, dtypes, the Storage wrapper, errors and dispatch.
#pragma once
#include <napi.h>

#include <string>

#include "../cuda/xft_math.h"
#include "cpu/xft_cpu.h"
#ifdef XFT_WITH_CUDA
#include "../cuda/xft_cuda.h"
#endif

namespace xft {

enum Device { DEV_CPU = 0, DEV_CUDA = 1 };

inline size_t DtypeSize(int dtype) { return dtype == XFT_BF16 ? 2 : 4; }
inline const char* DtypeName(int dtype) { return dtype == XFT_F32 ? "f32" : dtype == XFT_BF16 ? "bf16" : "i32"; }
inline const char* DeviceName(int device) { return device == DEV_CUDA ? "cuda" : "cpu"; }

// Throws the JS XftError (handed over by lib/native.ts) with a code such as "XFT_SHAPE".
[[noreturn]] void Throw(Napi::Env env, const char* code, const std::string& message);

// Throws XFT_CUDA naming the op when a backend call returned an error.
void CheckStatus(Napi::Env env, const char* op, int status);
// After a call that waited for the CUDA stream (d2h copy, synchronize): CheckStatus, then the
// index fault a kernel recorded since the last wait (cuda/xft_cuda.h), thrown as XFT_INDEX.
void CheckSynced(Napi::Env env, const char* op, int status);

// Is the CUDA backend usable (compiled in, a device present, not disabled by XFT_DEVICE=cpu)?
// Initialises it on first use.
bool CudaAvailable(Napi::Env env);
// Throws XFT_DEVICE with the reason when it is not.
void RequireCuda(Napi::Env env, const char* op);

// A block of memory on one device. JavaScript holds it by a number, its handle, and an owner object
// (lib/tensor.ts): alloc() makes one and attaches a finalizer to the owner, free() releases the
// memory and deletes that finalizer's reference at once, so a disposed tensor leaves nothing native
// behind. (An ObjectWrap's wrap and finalizer would stay until the event loop turns: Node runs
// finalizers from setImmediate, and a synchronous training loop would pile them up.) A forgotten
// owner's finalizer frees its block; what is left when the environment ends is freed then.
struct Storage {
  void* data = nullptr;
  size_t bytes = 0;
  int device = DEV_CPU;
  napi_ref owner = nullptr;  // weak reference carrying the finalizer of the owner object
};

// Live allocations, for memoryStats() and the leak tests.
struct Counters {
  int64_t host_bytes = 0, host_count = 0, cuda_bytes = 0, cuda_count = 0;
  // high-water marks of host_bytes / cuda_bytes since the last resetPeakMemory()
  int64_t host_peak = 0, cuda_peak = 0;
};
Counters& LiveCounters();

// Argument i (a storage handle) as a live Storage; throws XFT_DISPOSED or a type error naming `name`.
Storage* ArgStorage(const Napi::CallbackInfo& info, size_t i, const char* op, const char* name);
// A JS value as a live Storage; throws XFT_DISPOSED or XFT_TYPE naming `name`.
Storage* ValueStorage(Napi::Env env, Napi::Value v, const char* op, const char* name);
// Same, but null/undefined gives nullptr.
Storage* ArgStorageOrNull(const Napi::CallbackInfo& info, size_t i, const char* op, const char* name);
// Checks a storage holds at least `elements` of `dtype`, else XFT_SHAPE naming `name`.
void RequireBytes(Napi::Env env, Storage* s, size_t elements, int dtype, const char* op, const char* name);
// All non-null storages on one device, which is returned; else XFT_DEVICE.
int CommonDevice(Napi::Env env, const char* op, std::initializer_list<Storage*> storages);

int64_t ArgInt(const Napi::CallbackInfo& info, size_t i, const char* op, const char* name);
double ArgNumber(const Napi::CallbackInfo& info, size_t i, const char* op, const char* name);
int ArgDtype(const Napi::CallbackInfo& info, size_t i, const char* op, const char* name);

// After an op on the CUDA backend: the launch error, and with XFT_SYNC=1 the execution error.
void AfterLaunch(Napi::Env env, const char* op, int device);

void RegisterTensorOps(Napi::Env env, Napi::Object exports);
void RegisterXftOps(Napi::Env env, Napi::Object exports);
void RegisterLayerOps(Napi::Env env, Napi::Object exports);  // binding/layer_ops.cc
void RegisterTrainOps(Napi::Env env, Napi::Object exports);  // binding/train_ops.cc
void RegisterDist(Napi::Env env, Napi::Object exports);      // binding/dist/group.cc
void RegisterRouterOps(Napi::Env env, Napi::Object exports);  // binding/router_ops.cc
void RegisterTimerOps(Napi::Env env, Napi::Object exports);   // binding/timer_ops.cc
void RegisterExpandOps(Napi::Env env, Napi::Object exports);  // binding/expand_ops.cc
void RegisterStepOps(Napi::Env env, Napi::Object exports);   // binding/step_ops.cc

}  // namespace xft

// Calls the CPU or CUDA twin of an op (same name and arguments) on `device`.
#ifdef XFT_WITH_CUDA
#define XFT_DISPATCH(env, op, device, fn, ...)                                                      \
  do {                                                                                             \
    if ((device) == ::xft::DEV_CUDA) ::xft::CheckStatus(env, op, xft_cuda_##fn(__VA_ARGS__));       \
    else ::xft::CheckStatus(env, op, xft_cpu_##fn(__VA_ARGS__));                                    \
    ::xft::AfterLaunch(env, op, device);                                                           \
  } while (0)
#else
#define XFT_DISPATCH(env, op, device, fn, ...) \
  do {                                           \
    (void)(device);                              \
    ::xft::CheckStatus(env, op, xft_cpu_##fn(__VA_ARGS__)); \
  } while (0)
#endif
