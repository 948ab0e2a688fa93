// The training step's device-side ops (cuda/step.cu, cuda/step.h; CPU twin binding/cpu/step.cc) and the
// multi-tensor AdamW: glue only (read arguments, check sizes, dispatch). lib/train_step.ts calls them.
#include <string>
#include <vector>

#include "common.h"

namespace xft {
namespace {

std::string Op(const char* op) { return std::string(op) + ": "; }

// the ledger (f64, as f32 pairs) holds the accumulators and `slots` log records
void RequireLedger(Napi::Env env, Storage* ledger, size_t slots, const char* op) {
  RequireBytes(env, ledger, 2 * (XFT_LEDGER_HEAD + slots * XFT_LEDGER_FIELDS), XFT_F32, op, "ledger");
}

// lossStats(losses f32 [R], predictions i32 [R], targets i32 [R], R, auxDiv, ledger)
Napi::Value LossStats(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "lossStats";
  Storage* losses = ArgStorage(info, 0, op, "losses");
  Storage* predictions = ArgStorage(info, 1, op, "predictions");
  Storage* targets = ArgStorage(info, 2, op, "targets");
  int64_t R = ArgInt(info, 3, op, "rows");
  double aux_div = ArgNumber(info, 4, op, "auxDiv");
  Storage* ledger = ArgStorage(info, 5, op, "ledger");
  if (R < 0 || R > INT32_MAX) Throw(env, "XFT_SHAPE", Op(op) + "invalid rows " + std::to_string(R));
  if (!(aux_div > 0)) Throw(env, "XFT_VALUE", Op(op) + "auxDiv must be > 0");
  RequireBytes(env, losses, (size_t)R, XFT_F32, op, "losses");
  RequireBytes(env, predictions, (size_t)R, XFT_I32, op, "predictions");
  RequireBytes(env, targets, (size_t)R, XFT_I32, op, "targets");
  RequireLedger(env, ledger, 0, op);
  int device = CommonDevice(env, op, {losses, predictions, targets, ledger});
  XFT_DISPATCH(env, op, device, loss_stats, (const float*)losses->data, (const int*)predictions->data,
               (const int*)targets->data, (int)R, aux_div, (double*)ledger->data);
  return env.Undefined();
}

// statAdd(x f32 [1], ledger, index): ledger[index] += x[0]
Napi::Value StatAdd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "statAdd";
  Storage* x = ArgStorage(info, 0, op, "x");
  Storage* ledger = ArgStorage(info, 1, op, "ledger");
  int64_t index = ArgInt(info, 2, op, "index");
  RequireBytes(env, x, 1, XFT_F32, op, "x");
  if (index < 0 || index >= XFT_LEDGER_HEAD) Throw(env, "XFT_VALUE", Op(op) + "index must be an accumulator of the ledger");
  RequireLedger(env, ledger, 0, op);
  int device = CommonDevice(env, op, {x, ledger});
  XFT_DISPATCH(env, op, device, stat_add, (const float*)x->data, (double*)ledger->data + index);
  return env.Undefined();
}

// ledgerFlag(ledger, out f32 [1]): out[0] = 1 when the step so far has a non-finite loss or balance loss, else 0
Napi::Value LedgerFlag(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "ledgerFlag";
  Storage* ledger = ArgStorage(info, 0, op, "ledger");
  Storage* out = ArgStorage(info, 1, op, "out");
  RequireLedger(env, ledger, 0, op);
  RequireBytes(env, out, 1, XFT_F32, op, "out");
  int device = CommonDevice(env, op, {ledger, out});
  XFT_DISPATCH(env, op, device, ledger_flag, (const double*)ledger->data, (float*)out->data);
  return env.Undefined();
}

// stepEnd(sumsq f32 [1], ledger, control f32 [2], slot (-1: the ledger's next), slots, clip, budget, nonfinite f32 [1] | null)
Napi::Value StepEnd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "stepEnd";
  Storage* sumsq = ArgStorage(info, 0, op, "sumsq");
  Storage* ledger = ArgStorage(info, 1, op, "ledger");
  Storage* control = ArgStorage(info, 2, op, "control");
  int64_t slot = ArgInt(info, 3, op, "slot"), slots = ArgInt(info, 4, op, "slots");
  double clip = ArgNumber(info, 5, op, "clip"), budget = ArgNumber(info, 6, op, "budget");
  Storage* nonfinite = ArgStorageOrNull(info, 7, op, "nonfinite");
  if (slots < 1 || slots > (1 << 24) || slot < -1 || slot >= slots) Throw(env, "XFT_VALUE", Op(op) + "need -1 <= slot < slots (-1: the ledger's next)");
  if (!(clip >= 0) || !(budget >= 0)) Throw(env, "XFT_VALUE", Op(op) + "need clip >= 0 and budget >= 0");
  RequireBytes(env, sumsq, 1, XFT_F32, op, "sumsq");
  RequireBytes(env, control, 2, XFT_F32, op, "control");
  if (nonfinite) RequireBytes(env, nonfinite, 1, XFT_F32, op, "nonfinite");
  RequireLedger(env, ledger, (size_t)slots, op);
  int device = CommonDevice(env, op, {sumsq, ledger, control, nonfinite});
  XFT_DISPATCH(env, op, device, step_end, (const float*)sumsq->data, (double*)ledger->data, (float*)control->data,
               nonfinite ? (const float*)nonfinite->data : nullptr, (int)slot, (int)slots, clip, budget);
  return env.Undefined();
}

// zeroMany(storages[], bytes[]): the first bytes[k] bytes of storages[k] set to zero, all in one launch
Napi::Value ZeroMany(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "zeroMany";
  if (!info[0].IsArray() || !info[1].IsArray()) Throw(env, "XFT_TYPE", Op(op) + "storages and bytes must be arrays");
  Napi::Array list = info[0].As<Napi::Array>(), sizes = info[1].As<Napi::Array>();
  if (list.Length() != sizes.Length()) Throw(env, "XFT_SHAPE", Op(op) + "storages and bytes must have the same length");
  std::vector<void*> ptrs;
  std::vector<size_t> bytes;
  int device = -1;
  for (uint32_t k = 0; k < list.Length(); k++) {
    Storage* s = ValueStorage(env, list.Get(k), op, "storages[i]");
    if (device >= 0 && s->device != device) Throw(env, "XFT_DEVICE", Op(op) + "all storages must be on one device");
    device = s->device;
    Napi::Value b = sizes.Get(k);
    const double n = b.IsNumber() ? b.As<Napi::Number>().DoubleValue() : -1;
    if (!(n >= 0 && n <= (double)s->bytes && n == (double)(int64_t)n))
      Throw(env, "XFT_SHAPE", Op(op) + "bytes[" + std::to_string(k) + "] must be an integer in [0, the storage's " + std::to_string(s->bytes) + " bytes]");
    ptrs.push_back(s->data);
    bytes.push_back((size_t)n);
  }
  if (ptrs.empty()) return env.Undefined();
  XFT_DISPATCH(env, op, device, zero_many, ptrs.data(), bytes.data(), (int)ptrs.size());
  return env.Undefined();
}

// adamwBiasCorrection(beta, step): 1 - beta^t as the AdamW launchers compute it (f32, from double), for a graph's hyper block
Napi::Value AdamWBiasCorrection(const Napi::CallbackInfo& info) {
  const double beta = ArgNumber(info, 0, "adamwBiasCorrection", "beta");
  const int64_t step = ArgInt(info, 1, "adamwBiasCorrection", "step");
  if (!(beta >= 0 && beta < 1) || step < 1 || step > INT32_MAX)
    Throw(info.Env(), "XFT_VALUE", "adamwBiasCorrection: need beta in [0, 1) and an integer step >= 1");
  return Napi::Number::New(info.Env(), xft_adamw_bias_correction((float)beta, (int)step));
}

// adamwMulti(entries, lr, beta1, beta2, eps, weightDecay, step, gradScale, stochastic, seed, control|null, hyper|null);
// hyper: f32 [4] on the device (lr, bc1, bc2, step), read by the kernel instead of lr and step; entries:
// an array of [p, pDtype, g, gDtype, m, v, n, pCopy|null, copyDtype, tensorIndex]
Napi::Value AdamWMulti(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "adamwMulti";
  if (!info[0].IsArray()) Throw(env, "XFT_TYPE", Op(op) + "entries must be an array");
  Napi::Array list = info[0].As<Napi::Array>();
  xft_adamw_options o = {};
  o.lr = (float)ArgNumber(info, 1, op, "lr");
  const double beta1 = ArgNumber(info, 2, op, "beta1"), beta2 = ArgNumber(info, 3, op, "beta2");
  o.eps = (float)ArgNumber(info, 4, op, "eps");
  o.weight_decay = (float)ArgNumber(info, 5, op, "weightDecay");
  const int64_t step = ArgInt(info, 6, op, "step");
  o.grad_scale = (float)ArgNumber(info, 7, op, "gradScale");
  o.stochastic = ArgInt(info, 8, op, "stochastic") != 0;
  o.seed = (uint64_t)ArgInt(info, 9, op, "seed");
  Storage* control = ArgStorageOrNull(info, 10, op, "control");
  Storage* hyper = info.Length() > 11 ? ArgStorageOrNull(info, 11, op, "hyper") : nullptr;
  if (step < 1 || step > INT32_MAX) Throw(env, "XFT_VALUE", Op(op) + "step must be an integer >= 1, got " + std::to_string(step));
  if (!(beta1 >= 0 && beta1 < 1) || !(beta2 >= 0 && beta2 < 1)) Throw(env, "XFT_VALUE", Op(op) + "beta1 and beta2 must be in [0, 1)");
  o.beta1 = (float)beta1, o.beta2 = (float)beta2, o.step = (int)step;
  o.bc1 = xft_adamw_bias_correction(o.beta1, o.step), o.bc2 = xft_adamw_bias_correction(o.beta2, o.step);
  if (control) RequireBytes(env, control, 2, XFT_F32, op, "control");
  o.control = control ? (const float*)control->data : nullptr;
  if (hyper) RequireBytes(env, hyper, 4, XFT_F32, op, "hyper");
  o.hyper = hyper ? (const float*)hyper->data : nullptr;
  if (control && hyper && control->device != hyper->device) Throw(env, "XFT_DEVICE", Op(op) + "control and hyper must be on one device");
  std::vector<xft_adamw_tensor> tensors;
  int device = control ? control->device : hyper ? hyper->device : -1;
  for (uint32_t k = 0; k < list.Length(); k++) {
    Napi::Value ev = list.Get(k);
    if (!ev.IsArray() || ev.As<Napi::Array>().Length() != 10) Throw(env, "XFT_TYPE", Op(op) + "each entry must be an array of 10 fields");
    Napi::Array e = ev.As<Napi::Array>();
    auto integer = [&](uint32_t i, const char* name) -> int64_t {
      Napi::Value x = e.Get(i);
      if (!x.IsNumber()) Throw(env, "XFT_TYPE", Op(op) + name + " must be an integer");
      double d = x.As<Napi::Number>().DoubleValue();
      if (d != (double)(int64_t)d) Throw(env, "XFT_TYPE", Op(op) + name + " must be an integer");
      return (int64_t)d;
    };
    xft_adamw_tensor t = {};
    Storage* p = ValueStorage(env, e.Get(0u), op, "params");
    t.p_dtype = (int)integer(1, "paramsDtype");
    Storage* g = ValueStorage(env, e.Get(2u), op, "grads");
    t.g_dtype = (int)integer(3, "gradsDtype");
    Storage* m = ValueStorage(env, e.Get(4u), op, "m");
    Storage* v = ValueStorage(env, e.Get(5u), op, "v");
    t.n = integer(6, "n");
    Napi::Value cv = e.Get(7u);
    Storage* copy = cv.IsNull() || cv.IsUndefined() ? nullptr : ValueStorage(env, cv, op, "copyTo");
    t.copy_dtype = (int)integer(8, "copyDtype");
    const int64_t index = integer(9, "tensorIndex");
    if (t.n < 0 || t.n > ((int64_t)1 << 50)) Throw(env, "XFT_SHAPE", Op(op) + "invalid size n=" + std::to_string(t.n));
    if (index < 0 || index >= (1 << 24)) Throw(env, "XFT_VALUE", Op(op) + "tensorIndex must be in [0, 2^24)");
    for (auto [dt, name] : {std::pair<int, const char*>{t.p_dtype, "params"}, {t.g_dtype, "grads"}})
      if (dt != XFT_F32 && dt != XFT_BF16) Throw(env, "XFT_DTYPE", Op(op) + name + " must be f32 or bf16");
    if (copy && t.copy_dtype != XFT_F32 && t.copy_dtype != XFT_BF16) Throw(env, "XFT_DTYPE", Op(op) + "copyTo must be f32 or bf16");
    RequireBytes(env, p, (size_t)t.n, t.p_dtype, op, "params");
    RequireBytes(env, g, (size_t)t.n, t.g_dtype, op, "grads");
    RequireBytes(env, m, (size_t)t.n, XFT_F32, op, "m");
    RequireBytes(env, v, (size_t)t.n, XFT_F32, op, "v");
    RequireBytes(env, copy, (size_t)t.n, t.copy_dtype, op, "copyTo");
    const int d = CommonDevice(env, op, {p, g, m, v, copy});
    if (device >= 0 && d != device) Throw(env, "XFT_DEVICE", Op(op) + "all tensors (and control) must be on one device");
    device = d;
    t.p = p->data, t.g = g->data, t.m = (float*)m->data, t.v = (float*)v->data, t.p_copy = copy ? copy->data : nullptr;
    t.index = (int)index;
    tensors.push_back(t);
  }
  if (tensors.empty()) return env.Undefined();
  XFT_DISPATCH(env, op, device, adamw_multi, tensors.data(), (int)tensors.size(), &o);
  return env.Undefined();
}

// ---- CUDA graphs (cuda/runtime.cu): the CUDA backend only ----

void RequireGraphs(Napi::Env env, const char* op) {
  if (!CudaAvailable(env))
    Throw(env, "XFT_DEVICE", Op(op) + "CUDA graphs need the CUDA backend (the CPU backend runs each op as it is called: there is nothing to capture)");
}

#ifdef XFT_WITH_CUDA
Napi::Value GraphBegin(const Napi::CallbackInfo& info) {
  RequireGraphs(info.Env(), "graphBegin");
  CheckStatus(info.Env(), "graphBegin (a capture already running?)", xft_cuda_graph_begin());
  return info.Env().Undefined();
}

Napi::Value GraphEnd(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int handle = 0;
  const int e = xft_cuda_graph_end(&handle);
  if (e != 0)
    Throw(env, "XFT_CUDA", std::string("graph capture failed: CUDA error ") + std::to_string(e) + " (" + xft_cuda_error_string(e) +
                               "): an operation inside the capture is not permitted while capturing (a synchronisation, a read back "
                               "to the host such as toArray or item, an upload from host memory, or a tensor made inside the capture "
                               "and not disposed inside it: make such buffers before the capture)");
  return Napi::Number::New(env, handle);
}

Napi::Value GraphLaunch(const Napi::CallbackInfo& info) {
  const int64_t h = ArgInt(info, 0, "graphLaunch", "handle");
  CheckStatus(info.Env(), "graphLaunch", xft_cuda_graph_launch((int)h));
  return info.Env().Undefined();
}

Napi::Value GraphDestroy(const Napi::CallbackInfo& info) {
  const int64_t h = ArgInt(info, 0, "graphDestroy", "handle");
  CheckStatus(info.Env(), "graphDestroy", xft_cuda_graph_destroy((int)h));
  return info.Env().Undefined();
}
#else
Napi::Value GraphUnavailable(const Napi::CallbackInfo& info) {
  RequireGraphs(info.Env(), "captureGraph");
  return info.Env().Undefined();
}
#endif

}  // namespace

void RegisterStepOps(Napi::Env env, Napi::Object exports) {
  exports.Set("lossStats", Napi::Function::New(env, LossStats, "lossStats"));
  exports.Set("statAdd", Napi::Function::New(env, StatAdd, "statAdd"));
  exports.Set("ledgerFlag", Napi::Function::New(env, LedgerFlag, "ledgerFlag"));
  exports.Set("stepEnd", Napi::Function::New(env, StepEnd, "stepEnd"));
  exports.Set("zeroMany", Napi::Function::New(env, ZeroMany, "zeroMany"));
  exports.Set("adamwMulti", Napi::Function::New(env, AdamWMulti, "adamwMulti"));
  exports.Set("adamwBiasCorrection", Napi::Function::New(env, AdamWBiasCorrection, "adamwBiasCorrection"));
#ifdef XFT_WITH_CUDA
  exports.Set("graphBegin", Napi::Function::New(env, GraphBegin, "graphBegin"));
  exports.Set("graphEnd", Napi::Function::New(env, GraphEnd, "graphEnd"));
  exports.Set("graphLaunch", Napi::Function::New(env, GraphLaunch, "graphLaunch"));
  exports.Set("graphDestroy", Napi::Function::New(env, GraphDestroy, "graphDestroy"));
#else
  for (const char* name : {"graphBegin", "graphEnd", "graphLaunch", "graphDestroy"})
    exports.Set(name, Napi::Function::New(env, GraphUnavailable, name));
#endif
}

}  // namespace xft
