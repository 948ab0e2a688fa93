// Bindings of the train op families (see cuda/xft_cuda.h, section [train]): attention,
// cross-entropy, AdamW, Adafactor, MoE permutation, balance loss. lib/ops_train.ts validates shapes and dtypes
// and allocates outputs; this layer re-checks sizes and devices (a second line of defence against
// out-of-bounds access) and dispatches to the CPU or CUDA twin.
#include "common.h"
#include "../cuda/load_estimate.h"

#include <vector>

namespace xft {

namespace {

const int64_t kMaxHeadDim = 128;     // mirrored in lib/ops_train.ts (MAX_HEAD_DIM); the CUDA kernels' limit
const int64_t kMaxGridDim = 65535;   // batch and heads: CUDA grid y/z limits (lib/ops_train.ts MAX_ATTENTION_GRID)

std::string Sizes(std::initializer_list<std::pair<const char*, int64_t>> sizes) {
  std::string s;
  for (auto& kv : sizes) s += std::string(s.empty() ? "" : " ") + kv.first + "=" + std::to_string(kv.second);
  return s;
}

void RequireFloat(Napi::Env env, const char* op, int dtype, const char* name) {
  if (dtype != XFT_F32 && dtype != XFT_BF16)
    Throw(env, "XFT_DTYPE", std::string(op) + ": expected f32 or bf16 " + name + ", got " + DtypeName(dtype));
}

// ---- attention ----

void CheckAttentionShape(Napi::Env env, const char* op, int dtype, int64_t B, int64_t T, int64_t H, int64_t Hkv, int64_t hd) {
  RequireFloat(env, op, dtype, "q, k, v");
  if (B < 1 || B > kMaxGridDim || T < 0 || H < 1 || H > kMaxGridDim || Hkv < 1 || hd < 1 || hd > kMaxHeadDim ||
      H % Hkv != 0 || B * T > INT32_MAX ||
      B * T * H * hd > ((int64_t)1 << 40))
    Throw(env, "XFT_SHAPE", std::string(op) + ": invalid sizes " + Sizes({{"B", B}, {"T", T}, {"H", H}, {"Hkv", Hkv}, {"hd", hd}}) +
                                " (need 1 <= B, H <= " + std::to_string(kMaxGridDim) + ", T >= 0, H % Hkv == 0, 1 <= hd <= " +
                                std::to_string(kMaxHeadDim) + ")");
}

// attentionForward(q, k, v, out, lse, dtype, B, T, H, Hkv, hd)
Napi::Value AttentionForward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "attention";
  Storage* q = ArgStorage(info, 0, op, "q");
  Storage* k = ArgStorage(info, 1, op, "k");
  Storage* v = ArgStorage(info, 2, op, "v");
  Storage* out = ArgStorage(info, 3, op, "out");
  Storage* lse = ArgStorage(info, 4, op, "lse");
  int dtype = ArgDtype(info, 5, op, "dtype");
  int64_t B = ArgInt(info, 6, op, "B"), T = ArgInt(info, 7, op, "T"), H = ArgInt(info, 8, op, "H"),
          Hkv = ArgInt(info, 9, op, "Hkv"), hd = ArgInt(info, 10, op, "hd");
  CheckAttentionShape(env, op, dtype, B, T, H, Hkv, hd);
  RequireBytes(env, q, B * T * H * hd, dtype, op, "q");
  RequireBytes(env, k, B * T * Hkv * hd, dtype, op, "k");
  RequireBytes(env, v, B * T * Hkv * hd, dtype, op, "v");
  RequireBytes(env, out, B * T * H * hd, dtype, op, "out");
  RequireBytes(env, lse, B * H * T, XFT_F32, op, "lse");
  int device = CommonDevice(env, op, {q, k, v, out, lse});
  XFT_DISPATCH(env, op, device, attention_forward, q->data, k->data, v->data, out->data, (float*)lse->data, dtype,
               (int)B, (int)T, (int)H, (int)Hkv, (int)hd);
  return env.Undefined();
}

// attentionBackward(q, k, v, out, lse, dout, dq, dk, dv, dtype, B, T, H, Hkv, hd)
Napi::Value AttentionBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "attentionBackward";
  Storage* q = ArgStorage(info, 0, op, "q");
  Storage* k = ArgStorage(info, 1, op, "k");
  Storage* v = ArgStorage(info, 2, op, "v");
  Storage* out = ArgStorage(info, 3, op, "out");
  Storage* lse = ArgStorage(info, 4, op, "lse");
  Storage* dout = ArgStorage(info, 5, op, "dOut");
  Storage* dq = ArgStorage(info, 6, op, "dq");
  Storage* dk = ArgStorage(info, 7, op, "dk");
  Storage* dv = ArgStorage(info, 8, op, "dv");
  int dtype = ArgDtype(info, 9, op, "dtype");
  int64_t B = ArgInt(info, 10, op, "B"), T = ArgInt(info, 11, op, "T"), H = ArgInt(info, 12, op, "H"),
          Hkv = ArgInt(info, 13, op, "Hkv"), hd = ArgInt(info, 14, op, "hd");
  CheckAttentionShape(env, op, dtype, B, T, H, Hkv, hd);
  const int64_t nq = B * T * H * hd, nkv = B * T * Hkv * hd;
  RequireBytes(env, q, nq, dtype, op, "q");
  RequireBytes(env, k, nkv, dtype, op, "k");
  RequireBytes(env, v, nkv, dtype, op, "v");
  RequireBytes(env, out, nq, dtype, op, "out");
  RequireBytes(env, lse, B * H * T, XFT_F32, op, "lse");
  RequireBytes(env, dout, nq, dtype, op, "dOut");
  RequireBytes(env, dq, nq, dtype, op, "dq");
  RequireBytes(env, dk, nkv, dtype, op, "dk");
  RequireBytes(env, dv, nkv, dtype, op, "dv");
  int device = CommonDevice(env, op, {q, k, v, out, lse, dout, dq, dk, dv});
  XFT_DISPATCH(env, op, device, attention_backward, q->data, k->data, v->data, out->data, (const float*)lse->data,
               dout->data, dq->data, dk->data, dv->data, dtype, (int)B, (int)T, (int)H, (int)Hkv, (int)hd);
  return env.Undefined();
}

// ---- cross-entropy ----

void CheckCrossEntropyShape(Napi::Env env, const char* op, int dtype, int64_t R, int64_t V) {
  RequireFloat(env, op, dtype, "logits");
  if (R < 0 || V < 1 || R > INT32_MAX || V > INT32_MAX)
    Throw(env, "XFT_SHAPE", std::string(op) + ": invalid sizes " + Sizes({{"R", R}, {"V", V}}) + " (need R >= 0, V >= 1)");
}

// crossEntropyForward(logits, dtype, targets, R, V, losses, predictions)
Napi::Value CrossEntropyForward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "crossEntropy";
  Storage* logits = ArgStorage(info, 0, op, "logits");
  int dtype = ArgDtype(info, 1, op, "dtype");
  Storage* targets = ArgStorage(info, 2, op, "targets");
  int64_t R = ArgInt(info, 3, op, "R"), V = ArgInt(info, 4, op, "V");
  Storage* losses = ArgStorage(info, 5, op, "losses");
  Storage* predictions = ArgStorage(info, 6, op, "predictions");
  CheckCrossEntropyShape(env, op, dtype, R, V);
  RequireBytes(env, logits, R * V, dtype, op, "logits");
  RequireBytes(env, targets, R, XFT_I32, op, "targets");
  RequireBytes(env, losses, R, XFT_F32, op, "losses");
  RequireBytes(env, predictions, R, XFT_I32, op, "predictions");
  int device = CommonDevice(env, op, {logits, targets, losses, predictions});
  XFT_DISPATCH(env, op, device, cross_entropy_forward, logits->data, dtype, (const int*)targets->data, (int)R, (int)V,
               (float*)losses->data, (int*)predictions->data);
  return env.Undefined();
}

// crossEntropyBackward(logits, dtype, targets, dloss, R, V, dlogits)   (dlogits may be logits)
Napi::Value CrossEntropyBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "crossEntropyBackward";
  Storage* logits = ArgStorage(info, 0, op, "logits");
  int dtype = ArgDtype(info, 1, op, "dtype");
  Storage* targets = ArgStorage(info, 2, op, "targets");
  Storage* dloss = ArgStorage(info, 3, op, "dLoss");
  int64_t R = ArgInt(info, 4, op, "R"), V = ArgInt(info, 5, op, "V");
  Storage* dlogits = ArgStorage(info, 6, op, "dLogits");
  CheckCrossEntropyShape(env, op, dtype, R, V);
  RequireBytes(env, logits, R * V, dtype, op, "logits");
  RequireBytes(env, targets, R, XFT_I32, op, "targets");
  RequireBytes(env, dloss, R, XFT_F32, op, "dLoss");
  RequireBytes(env, dlogits, R * V, dtype, op, "dLogits");
  int device = CommonDevice(env, op, {logits, targets, dloss, dlogits});
  XFT_DISPATCH(env, op, device, cross_entropy_backward, logits->data, dtype, (const int*)targets->data,
               (const float*)dloss->data, (int)R, (int)V, dlogits->data);
  return env.Undefined();
}

// ---- optimizers: AdamW, Adafactor ----

// adamw(p, pDtype, g, gDtype, m, v, n, lr, beta1, beta2, eps, weightDecay, step, gradScale, pCopy|null, copyDtype,
//       stochastic, seed, tensorIndex)
Napi::Value AdamW(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "adamw";
  Storage* p = ArgStorage(info, 0, op, "params");
  int p_dtype = ArgDtype(info, 1, op, "paramsDtype");
  Storage* g = ArgStorage(info, 2, op, "grads");
  int g_dtype = ArgDtype(info, 3, op, "gradsDtype");
  Storage* m = ArgStorage(info, 4, op, "m");
  Storage* v = ArgStorage(info, 5, op, "v");
  int64_t n = ArgInt(info, 6, op, "n");
  double lr = ArgNumber(info, 7, op, "lr"), beta1 = ArgNumber(info, 8, op, "beta1"), beta2 = ArgNumber(info, 9, op, "beta2"),
         eps = ArgNumber(info, 10, op, "eps"), wd = ArgNumber(info, 11, op, "weightDecay");
  int64_t step = ArgInt(info, 12, op, "step");
  double gscale = ArgNumber(info, 13, op, "gradScale");
  Storage* copy = ArgStorageOrNull(info, 14, op, "copyTo");
  int copy_dtype = ArgDtype(info, 15, op, "copyDtype");
  int64_t stochastic = ArgInt(info, 16, op, "stochastic");
  uint64_t seed = (uint64_t)ArgInt(info, 17, op, "seed");
  int64_t index = ArgInt(info, 18, op, "tensorIndex");
  if (n < 0) Throw(env, "XFT_SHAPE", std::string(op) + ": invalid size n=" + std::to_string(n));
  if (step < 1 || step > INT32_MAX) Throw(env, "XFT_VALUE", std::string(op) + ": step must be an integer >= 1, got " + std::to_string(step));
  if (!(beta1 >= 0 && beta1 < 1) || !(beta2 >= 0 && beta2 < 1))
    Throw(env, "XFT_VALUE", std::string(op) + ": beta1 and beta2 must be in [0, 1)");
  RequireFloat(env, op, p_dtype, "params");
  RequireFloat(env, op, g_dtype, "grads");
  if (copy) RequireFloat(env, op, copy_dtype, "copyTo");
  RequireBytes(env, p, n, p_dtype, op, "params");
  RequireBytes(env, g, n, g_dtype, op, "grads");
  RequireBytes(env, m, n, XFT_F32, op, "m");
  RequireBytes(env, v, n, XFT_F32, op, "v");
  RequireBytes(env, copy, n, copy_dtype, op, "copyTo");
  int device = CommonDevice(env, op, {p, g, m, v, copy});
  XFT_DISPATCH(env, op, device, adamw, p->data, p_dtype, g->data, g_dtype, (float*)m->data, (float*)v->data, (size_t)n,
               (float)lr, (float)beta1, (float)beta2, (float)eps, (float)wd, (int)step, (float)gscale,
               copy ? copy->data : nullptr, copy_dtype, stochastic != 0, xft_sr_stream(seed, (uint64_t)step, (uint64_t)index));
  return env.Undefined();
}

// adafactor(entries, lr, eps1, clipThreshold, decayRate, step, gradScale, stochastic, seed, control?|null); control: the
// step's device control block (cuda/step.h, f32 [2]: gradient scale factor, skip flag); entries: an array of
// [p, pDtype, g, gDtype, row|null, col|null, v|null, pCopy|null, copyDtype, slices, rows, cols, clipPerSlice, tensorIndex]
Napi::Value Adafactor(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "adafactor";
  if (!info[0].IsArray()) Throw(env, "XFT_TYPE", std::string(op) + ": entries must be an array");
  Napi::Array list = info[0].As<Napi::Array>();
  double lr = ArgNumber(info, 1, op, "lr"), eps1 = ArgNumber(info, 2, op, "eps1"), clip = ArgNumber(info, 3, op, "clipThreshold"),
         decay = ArgNumber(info, 4, op, "decayRate");
  int64_t step = ArgInt(info, 5, op, "step");
  double gscale = ArgNumber(info, 6, op, "gradScale");
  int64_t stochastic = ArgInt(info, 7, op, "stochastic");
  uint64_t seed = (uint64_t)ArgInt(info, 8, op, "seed");
  Storage* control = ArgStorageOrNull(info, 9, op, "control");
  if (control) RequireBytes(env, control, 2, XFT_F32, op, "control");
  if (step < 1 || step > INT32_MAX) Throw(env, "XFT_VALUE", std::string(op) + ": step must be an integer >= 1, got " + std::to_string(step));
  if (!(clip > 0) || !(decay < 0) || !(eps1 >= 0) || !(lr >= 0))
    Throw(env, "XFT_VALUE", std::string(op) + ": need lr >= 0, eps1 >= 0, clipThreshold > 0 and decayRate < 0");
  std::vector<xft_adafactor_tensor> tensors;
  int device = control ? control->device : -1;
  for (uint32_t k = 0; k < list.Length(); k++) {
    Napi::Value ev = list.Get(k);
    if (!ev.IsArray() || ev.As<Napi::Array>().Length() != 14) Throw(env, "XFT_TYPE", std::string(op) + ": each entry must be an array of 14 fields");
    Napi::Array e = ev.As<Napi::Array>();
    auto storage = [&](uint32_t i, const char* name, bool nullable) -> Storage* {
      Napi::Value x = e.Get(i);
      if (nullable && (x.IsNull() || x.IsUndefined())) return nullptr;
      return ValueStorage(env, x, op, name);
    };
    auto integer = [&](uint32_t i, const char* name) -> int64_t {
      Napi::Value x = e.Get(i);
      if (!x.IsNumber()) Throw(env, "XFT_TYPE", std::string(op) + ": " + name + " must be an integer");
      double d = x.As<Napi::Number>().DoubleValue();
      if (d != (double)(int64_t)d) Throw(env, "XFT_TYPE", std::string(op) + ": " + name + " must be an integer");
      return (int64_t)d;
    };
    xft_adafactor_tensor t = {};
    Storage* p = storage(0, "params", false);
    t.p_dtype = (int)integer(1, "paramsDtype");
    Storage* g = storage(2, "grads", false);
    t.g_dtype = (int)integer(3, "gradsDtype");
    Storage* row = storage(4, "row", true);
    Storage* col = storage(5, "col", true);
    Storage* v = storage(6, "v", true);
    Storage* copy = storage(7, "copyTo", true);
    t.copy_dtype = (int)integer(8, "copyDtype");
    t.slices = integer(9, "slices"), t.rows = integer(10, "rows"), t.cols = integer(11, "cols");
    t.clip_per_slice = integer(12, "clipPerSlice") != 0;
    const int64_t index = integer(13, "tensorIndex");
    RequireFloat(env, op, t.p_dtype, "params");
    RequireFloat(env, op, t.g_dtype, "grads");
    if (copy) RequireFloat(env, op, t.copy_dtype, "copyTo");
    const int64_t S = t.slices, R = t.rows, C = t.cols;
    if (S < 0 || R < 0 || C < 0 || S > ((int64_t)1 << 40) || R > ((int64_t)1 << 40) || C > ((int64_t)1 << 40) ||
        (double)S * (double)R * (double)C > (double)((int64_t)1 << 50))
      Throw(env, "XFT_SHAPE", std::string(op) + ": invalid sizes " + Sizes({{"slices", S}, {"rows", R}, {"cols", C}}));
    const bool factored = row != nullptr;
    if (factored ? (col == nullptr || v != nullptr) : (col != nullptr || v == nullptr || S != 1 || R != 1))
      Throw(env, "XFT_VALUE", std::string(op) + ": an entry is factored (row and col, no v) or a vector (v only, slices = rows = 1)");
    const size_t n = (size_t)(S * R * C);
    RequireBytes(env, p, n, t.p_dtype, op, "params");
    RequireBytes(env, g, n, t.g_dtype, op, "grads");
    RequireBytes(env, copy, n, t.copy_dtype, op, "copyTo");
    if (factored) {
      RequireBytes(env, row, (size_t)(S * R), XFT_F32, op, "row");
      RequireBytes(env, col, (size_t)(S * C), XFT_F32, op, "col");
    } else RequireBytes(env, v, (size_t)C, XFT_F32, op, "v");
    const int d = CommonDevice(env, op, {p, g, row, col, v, copy});
    if (device >= 0 && d != device) Throw(env, "XFT_DEVICE", std::string(op) + ": all tensors must be on one device");
    device = d;
    t.p = p->data, t.g = g->data, t.p_copy = copy ? copy->data : nullptr;
    t.row = row ? (float*)row->data : nullptr, t.col = col ? (float*)col->data : nullptr, t.v = v ? (float*)v->data : nullptr;
    t.sr_stream = xft_sr_stream(seed, (uint64_t)step, (uint64_t)index);
    tensors.push_back(t);
  }
  if (tensors.empty()) return env.Undefined();
  xft_adafactor_options o = {};
  o.control = control ? (const float*)control->data : nullptr;
  o.lr = (float)lr, o.eps1 = (float)eps1, o.clip_threshold = (float)clip, o.decay_rate = (float)decay, o.grad_scale = (float)gscale;
  o.step = (int)step, o.stochastic = stochastic != 0;
  XFT_DISPATCH(env, op, device, adafactor, tensors.data(), (int)tensors.size(), &o);
  return env.Undefined();
}

// ---- MoE permutation ----

void CheckPermuteShape(Napi::Env env, const char* op, int dtype, int64_t T, int64_t K, int64_t d) {
  RequireFloat(env, op, dtype, "activations");
  if (T < 0 || K < 1 || d < 1 || T * K > INT32_MAX || d > INT32_MAX)
    Throw(env, "XFT_SHAPE", std::string(op) + ": invalid sizes " + Sizes({{"T", T}, {"K", K}, {"d", d}}) + " (need T >= 0, K >= 1, d >= 1)");
}

// invertPermutation(order, position, n)
Napi::Value InvertPermutation(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "invertPermutation";
  Storage* order = ArgStorage(info, 0, op, "order");
  Storage* position = ArgStorage(info, 1, op, "position");
  int64_t n = ArgInt(info, 2, op, "n");
  if (n < 0 || n > INT32_MAX) Throw(env, "XFT_SHAPE", std::string(op) + ": invalid size n=" + std::to_string(n));
  RequireBytes(env, order, n, XFT_I32, op, "order");
  RequireBytes(env, position, n, XFT_I32, op, "position");
  int device = CommonDevice(env, op, {order, position});
  XFT_DISPATCH(env, op, device, invert_permutation, (const int*)order->data, (int*)position->data, (int)n);
  return env.Undefined();
}

// permuteForward(x, order, xp, dtype, T, K, d)
Napi::Value PermuteForward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "permute";
  Storage* x = ArgStorage(info, 0, op, "x");
  Storage* order = ArgStorage(info, 1, op, "order");
  Storage* xp = ArgStorage(info, 2, op, "xp");
  int dtype = ArgDtype(info, 3, op, "dtype");
  int64_t T = ArgInt(info, 4, op, "T"), K = ArgInt(info, 5, op, "K"), d = ArgInt(info, 6, op, "d");
  CheckPermuteShape(env, op, dtype, T, K, d);
  RequireBytes(env, x, T * d, dtype, op, "x");
  RequireBytes(env, order, T * K, XFT_I32, op, "order");
  RequireBytes(env, xp, T * K * d, dtype, op, "xp");
  int device = CommonDevice(env, op, {x, order, xp});
  XFT_DISPATCH(env, op, device, permute_forward, x->data, (const int*)order->data, xp->data, dtype, (int)T, (int)K, (int)d);
  return env.Undefined();
}

// permuteBackward(dxp, position, dx, dtype, T, K, d)
Napi::Value PermuteBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "permuteBackward";
  Storage* dxp = ArgStorage(info, 0, op, "dxp");
  Storage* position = ArgStorage(info, 1, op, "position");
  Storage* dx = ArgStorage(info, 2, op, "dx");
  int dtype = ArgDtype(info, 3, op, "dtype");
  int64_t T = ArgInt(info, 4, op, "T"), K = ArgInt(info, 5, op, "K"), d = ArgInt(info, 6, op, "d");
  CheckPermuteShape(env, op, dtype, T, K, d);
  RequireBytes(env, dxp, T * K * d, dtype, op, "dxp");
  RequireBytes(env, position, T * K, XFT_I32, op, "position");
  RequireBytes(env, dx, T * d, dtype, op, "dx");
  int device = CommonDevice(env, op, {dxp, position, dx});
  XFT_DISPATCH(env, op, device, permute_backward, dxp->data, (const int*)position->data, dx->data, dtype, (int)T, (int)K, (int)d);
  return env.Undefined();
}

// unpermuteForward(y, position, g, out, dtype, T, K, d)
Napi::Value UnpermuteForward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "unpermute";
  Storage* y = ArgStorage(info, 0, op, "y");
  Storage* position = ArgStorage(info, 1, op, "position");
  Storage* g = ArgStorage(info, 2, op, "g");
  Storage* out = ArgStorage(info, 3, op, "out");
  int dtype = ArgDtype(info, 4, op, "dtype");
  int64_t T = ArgInt(info, 5, op, "T"), K = ArgInt(info, 6, op, "K"), d = ArgInt(info, 7, op, "d");
  CheckPermuteShape(env, op, dtype, T, K, d);
  RequireBytes(env, y, T * K * d, dtype, op, "y");
  RequireBytes(env, position, T * K, XFT_I32, op, "position");
  RequireBytes(env, g, T * K, XFT_F32, op, "g");
  RequireBytes(env, out, T * d, dtype, op, "out");
  int device = CommonDevice(env, op, {y, position, g, out});
  XFT_DISPATCH(env, op, device, unpermute_forward, y->data, (const int*)position->data, (const float*)g->data, out->data,
               dtype, (int)T, (int)K, (int)d);
  return env.Undefined();
}

// unpermuteBackward(dout, y, position, g, dy, dg, dtype, T, K, d)
Napi::Value UnpermuteBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "unpermuteBackward";
  Storage* dout = ArgStorage(info, 0, op, "dOut");
  Storage* y = ArgStorage(info, 1, op, "y");
  Storage* position = ArgStorage(info, 2, op, "position");
  Storage* g = ArgStorage(info, 3, op, "g");
  Storage* dy = ArgStorage(info, 4, op, "dy");
  Storage* dg = ArgStorage(info, 5, op, "dg");
  int dtype = ArgDtype(info, 6, op, "dtype");
  int64_t T = ArgInt(info, 7, op, "T"), K = ArgInt(info, 8, op, "K"), d = ArgInt(info, 9, op, "d");
  CheckPermuteShape(env, op, dtype, T, K, d);
  RequireBytes(env, dout, T * d, dtype, op, "dOut");
  RequireBytes(env, y, T * K * d, dtype, op, "y");
  RequireBytes(env, position, T * K, XFT_I32, op, "position");
  RequireBytes(env, g, T * K, XFT_F32, op, "g");
  RequireBytes(env, dy, T * K * d, dtype, op, "dy");
  RequireBytes(env, dg, T * K, XFT_F32, op, "dg");
  int device = CommonDevice(env, op, {dout, y, position, g, dy, dg});
  XFT_DISPATCH(env, op, device, unpermute_backward, dout->data, y->data, (const int*)position->data, (const float*)g->data,
               dy->data, (float*)dg->data, dtype, (int)T, (int)K, (int)d);
  return env.Undefined();
}

// ---- balance loss ----

// balanceLossForward(importance, load, N, weight, loss)
Napi::Value BalanceLossForward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "balanceLoss";
  Storage* importance = ArgStorage(info, 0, op, "importance");
  Storage* load = ArgStorage(info, 1, op, "load");
  int64_t N = ArgInt(info, 2, op, "N");
  double weight = ArgNumber(info, 3, op, "weight");
  Storage* loss = ArgStorage(info, 4, op, "loss");
  if (N < 1 || N > INT32_MAX) Throw(env, "XFT_SHAPE", std::string(op) + ": invalid size N=" + std::to_string(N));
  RequireBytes(env, importance, N, XFT_F32, op, "importance");
  RequireBytes(env, load, N, XFT_F32, op, "load");
  RequireBytes(env, loss, 1, XFT_F32, op, "loss");
  int device = CommonDevice(env, op, {importance, load, loss});
  XFT_DISPATCH(env, op, device, balance_loss_forward, (const float*)importance->data, (const float*)load->data, (int)N,
               (float)weight, (float*)loss->data);
  return env.Undefined();
}

// balanceLossBackward(importance, load, N, weight, dloss, dImportance, dLoad)
Napi::Value BalanceLossBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "balanceLossBackward";
  Storage* importance = ArgStorage(info, 0, op, "importance");
  Storage* load = ArgStorage(info, 1, op, "load");
  int64_t N = ArgInt(info, 2, op, "N");
  double weight = ArgNumber(info, 3, op, "weight"), dloss = ArgNumber(info, 4, op, "dLoss");
  Storage* dimportance = ArgStorage(info, 5, op, "dImportance");
  Storage* dload = ArgStorage(info, 6, op, "dLoad");
  if (N < 1 || N > INT32_MAX) Throw(env, "XFT_SHAPE", std::string(op) + ": invalid size N=" + std::to_string(N));
  RequireBytes(env, importance, N, XFT_F32, op, "importance");
  RequireBytes(env, load, N, XFT_F32, op, "load");
  RequireBytes(env, dimportance, N, XFT_F32, op, "dImportance");
  RequireBytes(env, dload, N, XFT_F32, op, "dLoad");
  int device = CommonDevice(env, op, {importance, load, dimportance, dload});
  XFT_DISPATCH(env, op, device, balance_loss_backward, (const float*)importance->data, (const float*)load->data, (int)N,
               (float)weight, (float)dloss, (float*)dimportance->data, (float*)dload->data);
  return env.Undefined();
}

// ---- noisy top-k load estimate ----

// Checks the sizes and the three [T, N] inputs of the load estimate; returns T * N.
size_t LoadEstimateInputs(Napi::Env env, const char* op, Storage* clean, Storage* z, Storage* noisy, int dtype, int64_t T,
                          int64_t N, int64_t k) {
  RequireFloat(env, op, dtype, "clean, z, noisy");
  if (T < 0 || T > INT32_MAX || N < 2 || N > XFT_LOAD_MAX_EXPERTS || k < 1 || k >= N)
    Throw(env, "XFT_SHAPE", std::string(op) + ": invalid sizes T=" + std::to_string(T) + " N=" + std::to_string(N) + " k=" + std::to_string(k));
  const size_t n = (size_t)T * (size_t)N;
  RequireBytes(env, clean, n, dtype, op, "clean");
  RequireBytes(env, z, n, dtype, op, "z");
  RequireBytes(env, noisy, n, dtype, op, "noisy");
  return n;
}

// loadEstimateForward(clean, z, noisy, dtype, T, N, k, eps, prob, load)
Napi::Value LoadEstimateForward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "loadEstimate";
  Storage* clean = ArgStorage(info, 0, op, "clean");
  Storage* z = ArgStorage(info, 1, op, "z");
  Storage* noisy = ArgStorage(info, 2, op, "noisy");
  int dtype = ArgDtype(info, 3, op, "dtype");
  int64_t T = ArgInt(info, 4, op, "T"), N = ArgInt(info, 5, op, "N"), k = ArgInt(info, 6, op, "k");
  double eps = ArgNumber(info, 7, op, "eps");
  Storage* prob = ArgStorage(info, 8, op, "prob");
  Storage* load = ArgStorage(info, 9, op, "load");
  const size_t n = LoadEstimateInputs(env, op, clean, z, noisy, dtype, T, N, k);
  RequireBytes(env, prob, n, XFT_F32, op, "prob");
  RequireBytes(env, load, (size_t)N, XFT_F32, op, "load");
  int device = CommonDevice(env, op, {clean, z, noisy, prob, load});
  XFT_DISPATCH(env, op, device, load_estimate_forward, clean->data, z->data, noisy->data, dtype, (int)T, (int)N, (int)k,
               (float)eps, (float*)prob->data, (float*)load->data);
  return env.Undefined();
}

// loadEstimateBackward(clean, z, noisy, dLoad, dtype, T, N, k, eps, seed, dClean, dz)
Napi::Value LoadEstimateBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "loadEstimateBackward";
  Storage* clean = ArgStorage(info, 0, op, "clean");
  Storage* z = ArgStorage(info, 1, op, "z");
  Storage* noisy = ArgStorage(info, 2, op, "noisy");
  Storage* dload = ArgStorage(info, 3, op, "dLoad");
  int dtype = ArgDtype(info, 4, op, "dtype");
  int64_t T = ArgInt(info, 5, op, "T"), N = ArgInt(info, 6, op, "N"), k = ArgInt(info, 7, op, "k");
  double eps = ArgNumber(info, 8, op, "eps");
  uint64_t seed = (uint64_t)ArgInt(info, 9, op, "seed");
  Storage* dclean = ArgStorage(info, 10, op, "dClean");
  Storage* dz = ArgStorage(info, 11, op, "dz");
  const size_t n = LoadEstimateInputs(env, op, clean, z, noisy, dtype, T, N, k);
  RequireBytes(env, dload, (size_t)N, XFT_F32, op, "dLoad");
  RequireBytes(env, dclean, n, dtype, op, "dClean");
  RequireBytes(env, dz, n, dtype, op, "dz");
  int device = CommonDevice(env, op, {clean, z, noisy, dload, dclean, dz});
  XFT_DISPATCH(env, op, device, load_estimate_backward, clean->data, z->data, noisy->data, (const float*)dload->data, dtype,
               (int)T, (int)N, (int)k, (float)eps, seed, dclean->data, dz->data);
  return env.Undefined();
}

}  // namespace

void RegisterTrainOps(Napi::Env env, Napi::Object exports) {
  exports.Set("attentionForward", Napi::Function::New(env, AttentionForward, "attentionForward"));
  exports.Set("attentionBackward", Napi::Function::New(env, AttentionBackward, "attentionBackward"));
  exports.Set("crossEntropyForward", Napi::Function::New(env, CrossEntropyForward, "crossEntropyForward"));
  exports.Set("crossEntropyBackward", Napi::Function::New(env, CrossEntropyBackward, "crossEntropyBackward"));
  exports.Set("adamw", Napi::Function::New(env, AdamW, "adamw"));
  exports.Set("adafactor", Napi::Function::New(env, Adafactor, "adafactor"));
  exports.Set("invertPermutation", Napi::Function::New(env, InvertPermutation, "invertPermutation"));
  exports.Set("permuteForward", Napi::Function::New(env, PermuteForward, "permuteForward"));
  exports.Set("permuteBackward", Napi::Function::New(env, PermuteBackward, "permuteBackward"));
  exports.Set("unpermuteForward", Napi::Function::New(env, UnpermuteForward, "unpermuteForward"));
  exports.Set("unpermuteBackward", Napi::Function::New(env, UnpermuteBackward, "unpermuteBackward"));
  exports.Set("balanceLossForward", Napi::Function::New(env, BalanceLossForward, "balanceLossForward"));
  exports.Set("balanceLossBackward", Napi::Function::New(env, BalanceLossBackward, "balanceLossBackward"));
  exports.Set("loadEstimateForward", Napi::Function::New(env, LoadEstimateForward, "loadEstimateForward"));
  exports.Set("loadEstimateBackward", Napi::Function::New(env, LoadEstimateBackward, "loadEstimateBackward"));
}

}  // namespace xft
