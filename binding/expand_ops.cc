// The expand op family (UpIT's expert expansion: cuda/expand.cu, twin binding/cpu/expand.cc). lib/upit/ops.ts
// validates shapes, dtypes and options and allocates outputs; this layer re-checks sizes and devices and
// dispatches CPU or CUDA.
#include <cmath>
#include <vector>

#include "common.h"
#include "../cuda/expand.h"

namespace xft {

namespace {

void CheckFloat(Napi::Env env, const char* op, int dtype, const char* name) {
  if (dtype == XFT_I32) Throw(env, "XFT_DTYPE", std::string(op) + ": expected f32 or bf16 " + name + ", got i32");
}

// expandDeltaDots(base, a, others[], dtype, numel, out): out holds count fp64 values (2 * count i32 slots)
Napi::Value ExpandDeltaDots(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "deltaDots";
  Storage* base = ArgStorage(info, 0, op, "base");
  Storage* a = ArgStorage(info, 1, op, "a");
  if (!info[2].IsArray()) Throw(env, "XFT_TYPE", std::string(op) + ": others must be an array");
  int dtype = ArgDtype(info, 3, op, "dtype");
  CheckFloat(env, op, dtype, "tensors");
  int64_t n = ArgInt(info, 4, op, "numel");
  if (n < 0) Throw(env, "XFT_SHAPE", std::string(op) + ": numel must be >= 0");
  Storage* out = ArgStorage(info, 5, op, "out");
  Napi::Array list = info[2].As<Napi::Array>();
  const uint32_t count = list.Length();
  if (count > 4096) Throw(env, "XFT_SHAPE", std::string(op) + ": at most 4096 others per call");
  RequireBytes(env, base, (size_t)n, dtype, op, "base");
  RequireBytes(env, a, (size_t)n, dtype, op, "a");
  RequireBytes(env, out, (size_t)count * 2, XFT_I32, op, "out");
  int device = CommonDevice(env, op, {base, a, out});
  std::vector<const void*> others;
  for (uint32_t q = 0; q < count; q++) {
    Storage* s = ValueStorage(env, list.Get(q), op, "others[i]");
    RequireBytes(env, s, (size_t)n, dtype, op, "others[i]");
    if (s->device != device) Throw(env, "XFT_DEVICE", std::string(op) + ": all tensors must be on one device");
    others.push_back(s->data);
  }
  XFT_DISPATCH(env, op, device, expand_delta_dots, base->data, a->data, others.data(), (int)count, dtype, (size_t)n,
               (double*)out->data);
  return env.Undefined();
}

// expandChild(base, a, b, dtype, numel, out, outDtype, alpha, beta, dropRate, seed, tensorId)
Napi::Value ExpandChild(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "dareMerge";
  Storage* base = ArgStorage(info, 0, op, "base");
  Storage* a = ArgStorage(info, 1, op, "a");
  Storage* b = ArgStorage(info, 2, op, "b");
  int dtype = ArgDtype(info, 3, op, "dtype");
  CheckFloat(env, op, dtype, "inputs");
  int64_t n = ArgInt(info, 4, op, "numel");
  if (n < 0) Throw(env, "XFT_SHAPE", std::string(op) + ": numel must be >= 0");
  Storage* out = ArgStorage(info, 5, op, "out");
  int out_dtype = ArgDtype(info, 6, op, "outDtype");
  CheckFloat(env, op, out_dtype, "output");
  double alpha = ArgNumber(info, 7, op, "alpha"), beta = ArgNumber(info, 8, op, "beta");
  double drop_rate = ArgNumber(info, 9, op, "dropRate");
  if (!(drop_rate >= 0.0 && drop_rate < 1.0)) Throw(env, "XFT_VALUE", std::string(op) + ": dropRate must be in [0, 1)");
  if (!std::isfinite(alpha) || !std::isfinite(beta)) Throw(env, "XFT_VALUE", std::string(op) + ": alpha and beta must be finite");
  uint64_t seed = (uint64_t)ArgInt(info, 10, op, "seed");
  int64_t tensor_id = ArgInt(info, 11, op, "tensorId");
  if (tensor_id < 0 || tensor_id > 0xffffffffLL) Throw(env, "XFT_VALUE", std::string(op) + ": tensorId must be in [0, 2^32)");
  RequireBytes(env, base, (size_t)n, dtype, op, "base");
  RequireBytes(env, a, (size_t)n, dtype, op, "a");
  RequireBytes(env, b, (size_t)n, dtype, op, "b");
  RequireBytes(env, out, (size_t)n, out_dtype, op, "out");
  int device = CommonDevice(env, op, {base, a, b, out});
  XFT_DISPATCH(env, op, device, expand_child, base->data, a->data, b->data, dtype, (size_t)n, out->data, out_dtype,
               alpha, beta, drop_rate, seed, (uint32_t)tensor_id);
  return env.Undefined();
}

}  // namespace

void RegisterExpandOps(Napi::Env env, Napi::Object exports) {
  exports.Set("expandDeltaDots", Napi::Function::New(env, ExpandDeltaDots, "expandDeltaDots"));
  exports.Set("expandChild", Napi::Function::New(env, ExpandChild, "expandChild"));
}

}  // namespace xft
