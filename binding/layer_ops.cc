// Bindings of the layer op families (see cuda/xft_cuda.h, section [layers]): embedding, rmsnorm,
// rope, swiglu and the elementwise ops. lib/ops_layers.ts validates shapes, dtypes and values and
// allocates outputs; this layer re-checks sizes, dtypes and devices (a second line of defence against
// out-of-bounds access) and dispatches to the CPU or CUDA twin.
#include <vector>

#include "common.h"

namespace xft {

namespace {

const int64_t kMaxRmsnormDim = 8192;  // cuda/rmsnorm.cu kMaxD, lib/ops_layers.ts MAX_RMSNORM_DIM
const int64_t kMaxHeadDim = 512;      // cuda/rope.cu 2 * kMaxHalf, lib/ops_layers.ts MAX_ROPE_HEAD_DIM

std::string Op(const char* op) { return std::string(op) + ": "; }

void RequireFloat(Napi::Env env, const char* op, const char* name, int dtype) {
  if (dtype != XFT_F32 && dtype != XFT_BF16)
    Throw(env, "XFT_DTYPE", Op(op) + "expected " + name + " to be f32 or bf16, got " + DtypeName(dtype));
}

// a dimension that the kernels take as int
void RequireDim(Napi::Env env, const char* op, const char* name, int64_t v, int64_t min, int64_t max = INT32_MAX) {
  if (v < min || v > max)
    Throw(env, "XFT_SHAPE", Op(op) + name + " = " + std::to_string(v) + " is out of range [" + std::to_string(min) +
                                ", " + std::to_string(max) + "]");
}

// a product of dimensions, checked against overflow (RequireBytes multiplies it by the dtype size)
int64_t Product(Napi::Env env, const char* op, std::initializer_list<int64_t> dims) {
  const int64_t kMax = (int64_t)1 << 50;
  int64_t p = 1;
  for (int64_t v : dims) {
    if (v != 0 && p > kMax / v) Throw(env, "XFT_SHAPE", Op(op) + "tensor too large");
    p *= v;
  }
  return p;
}

// an element count that the kernels take as size_t
size_t ArgCount(const Napi::CallbackInfo& info, size_t i, const char* op) {
  int64_t n = ArgInt(info, i, op, "n");
  if (n < 0 || n > ((int64_t)1 << 50)) Throw(info.Env(), "XFT_SHAPE", Op(op) + "n out of range");
  return (size_t)n;
}

// embeddingForward(ids, table, out, dtype, R, V, d)
Napi::Value EmbeddingForward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "embedding";
  Storage* ids = ArgStorage(info, 0, op, "ids");
  Storage* table = ArgStorage(info, 1, op, "table");
  Storage* out = ArgStorage(info, 2, op, "out");
  int dtype = ArgDtype(info, 3, op, "dtype");
  int64_t R = ArgInt(info, 4, op, "R"), V = ArgInt(info, 5, op, "V"), d = ArgInt(info, 6, op, "d");
  RequireFloat(env, op, "table", dtype);
  RequireDim(env, op, "R", R, 0);
  RequireDim(env, op, "V", V, 1);
  RequireDim(env, op, "d", d, 1);
  RequireBytes(env, ids, R, XFT_I32, op, "ids");
  RequireBytes(env, table, Product(env, op, {V, d}), dtype, op, "table");
  RequireBytes(env, out, Product(env, op, {R, d}), dtype, op, "out");
  int device = CommonDevice(env, op, {ids, table, out});
  XFT_DISPATCH(env, op, device, embedding_forward, (const int*)ids->data, table->data, out->data, dtype, (int)R, (int)V,
               (int)d);
  return env.Undefined();
}

// embeddingBackward(ids, dOut, dTable, dtype, R, V, d, accumulate)
Napi::Value EmbeddingBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "embeddingBackward";
  Storage* ids = ArgStorage(info, 0, op, "ids");
  Storage* dout = ArgStorage(info, 1, op, "dOut");
  Storage* dtable = ArgStorage(info, 2, op, "dTable");
  int dtype = ArgDtype(info, 3, op, "dtype");
  int64_t R = ArgInt(info, 4, op, "R"), V = ArgInt(info, 5, op, "V"), d = ArgInt(info, 6, op, "d");
  bool accumulate = info[7].ToBoolean();
  RequireFloat(env, op, "dOut", dtype);
  RequireDim(env, op, "R", R, 0);
  RequireDim(env, op, "V", V, 1);
  RequireDim(env, op, "d", d, 1);
  RequireBytes(env, ids, R, XFT_I32, op, "ids");
  RequireBytes(env, dout, Product(env, op, {R, d}), dtype, op, "dOut");
  RequireBytes(env, dtable, Product(env, op, {V, d}), XFT_F32, op, "dTable");
  int device = CommonDevice(env, op, {ids, dout, dtable});
  XFT_DISPATCH(env, op, device, embedding_backward, (const int*)ids->data, dout->data, (float*)dtable->data, dtype,
               (int)R, (int)V, (int)d, accumulate);
  return env.Undefined();
}

// rmsnormForward(x, w, y, rstd, dtype, wDtype, R, d, eps)
Napi::Value RmsnormForward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "rmsnorm";
  Storage* x = ArgStorage(info, 0, op, "x");
  Storage* w = ArgStorage(info, 1, op, "w");
  Storage* y = ArgStorage(info, 2, op, "y");
  Storage* rstd = ArgStorage(info, 3, op, "rstd");
  int dtype = ArgDtype(info, 4, op, "dtype"), wdtype = ArgDtype(info, 5, op, "wDtype");
  int64_t R = ArgInt(info, 6, op, "R"), d = ArgInt(info, 7, op, "d");
  double eps = ArgNumber(info, 8, op, "eps");
  RequireFloat(env, op, "x", dtype);
  RequireFloat(env, op, "w", wdtype);
  RequireDim(env, op, "R", R, 0);
  RequireDim(env, op, "d", d, 1, kMaxRmsnormDim);
  if (!(eps >= 0)) Throw(env, "XFT_VALUE", Op(op) + "eps must be a non-negative number");
  const int64_t n = Product(env, op, {R, d});
  RequireBytes(env, x, n, dtype, op, "x");
  RequireBytes(env, w, d, wdtype, op, "w");
  RequireBytes(env, y, n, dtype, op, "y");
  RequireBytes(env, rstd, R, XFT_F32, op, "rstd");
  int device = CommonDevice(env, op, {x, w, y, rstd});
  XFT_DISPATCH(env, op, device, rmsnorm_forward, x->data, w->data, y->data, (float*)rstd->data, dtype, wdtype, (int)R,
               (int)d, (float)eps);
  return env.Undefined();
}

// rmsnormBackward(x, w, rstd, dy, dx, dw|null, dtype, wDtype, R, d, accumulate)
Napi::Value RmsnormBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "rmsnormBackward";
  Storage* x = ArgStorage(info, 0, op, "x");
  Storage* w = ArgStorage(info, 1, op, "w");
  Storage* rstd = ArgStorage(info, 2, op, "rstd");
  Storage* dy = ArgStorage(info, 3, op, "dy");
  Storage* dx = ArgStorage(info, 4, op, "dx");
  Storage* dw = ArgStorageOrNull(info, 5, op, "dw");
  int dtype = ArgDtype(info, 6, op, "dtype"), wdtype = ArgDtype(info, 7, op, "wDtype");
  int64_t R = ArgInt(info, 8, op, "R"), d = ArgInt(info, 9, op, "d");
  bool accumulate = info[10].ToBoolean();
  RequireFloat(env, op, "x", dtype);
  RequireFloat(env, op, "w", wdtype);
  RequireDim(env, op, "R", R, 0);
  RequireDim(env, op, "d", d, 1, kMaxRmsnormDim);
  const int64_t n = Product(env, op, {R, d});
  RequireBytes(env, x, n, dtype, op, "x");
  RequireBytes(env, w, d, wdtype, op, "w");
  RequireBytes(env, rstd, R, XFT_F32, op, "rstd");
  RequireBytes(env, dy, n, dtype, op, "dy");
  RequireBytes(env, dx, n, dtype, op, "dx");
  RequireBytes(env, dw, d, XFT_F32, op, "dw");
  int device = CommonDevice(env, op, {x, w, rstd, dy, dx, dw});
  XFT_DISPATCH(env, op, device, rmsnorm_backward, x->data, w->data, (const float*)rstd->data, dy->data, dx->data,
               dw ? (float*)dw->data : nullptr, dtype, wdtype, (int)R, (int)d, accumulate);
  return env.Undefined();
}

// ropeForward / ropeBackward(x, out, dtype, rows, T, H, hd, theta, scaling)
template <bool kBackward>
Napi::Value Rope(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = kBackward ? "ropeBackward" : "rope";
  Storage* x = ArgStorage(info, 0, op, kBackward ? "dOut" : "x");
  Storage* out = ArgStorage(info, 1, op, kBackward ? "dx" : "out");
  int dtype = ArgDtype(info, 2, op, "dtype");
  int64_t rows = ArgInt(info, 3, op, "rows"), T = ArgInt(info, 4, op, "seqLen"), H = ArgInt(info, 5, op, "heads"),
          hd = ArgInt(info, 6, op, "headDim");
  double theta = ArgNumber(info, 7, op, "theta"), scaling = ArgNumber(info, 8, op, "scalingFactor");
  RequireFloat(env, op, "x", dtype);
  RequireDim(env, op, "rows", rows, 0);
  RequireDim(env, op, "seqLen", T, 1);
  RequireDim(env, op, "heads", H, 1);
  RequireDim(env, op, "headDim", hd, 2, kMaxHeadDim);
  if (hd % 2) Throw(env, "XFT_SHAPE", Op(op) + "headDim must be even, got " + std::to_string(hd));
  if (rows % T) Throw(env, "XFT_SHAPE", Op(op) + "rows must be a multiple of seqLen");
  if (!(theta > 0) || !(scaling > 0)) Throw(env, "XFT_VALUE", Op(op) + "theta and scalingFactor must be positive");
  const int64_t n = Product(env, op, {rows, H, hd});
  RequireBytes(env, x, n, dtype, op, kBackward ? "dOut" : "x");
  RequireBytes(env, out, n, dtype, op, kBackward ? "dx" : "out");
  int device = CommonDevice(env, op, {x, out});
  if (kBackward)
    XFT_DISPATCH(env, op, device, rope_backward, x->data, out->data, dtype, (int)rows, (int)T, (int)H, (int)hd,
                 (float)theta, (float)scaling);
  else
    XFT_DISPATCH(env, op, device, rope_forward, x->data, out->data, dtype, (int)rows, (int)T, (int)H, (int)hd,
                 (float)theta, (float)scaling);
  return env.Undefined();
}

// swigluForward(g, u, h, dtype, n)
Napi::Value SwigluForward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "swiglu";
  Storage* g = ArgStorage(info, 0, op, "g");
  Storage* u = ArgStorage(info, 1, op, "u");
  Storage* h = ArgStorage(info, 2, op, "h");
  int dtype = ArgDtype(info, 3, op, "dtype");
  size_t n = ArgCount(info, 4, op);
  RequireFloat(env, op, "g", dtype);
  RequireBytes(env, g, n, dtype, op, "g");
  RequireBytes(env, u, n, dtype, op, "u");
  RequireBytes(env, h, n, dtype, op, "h");
  int device = CommonDevice(env, op, {g, u, h});
  XFT_DISPATCH(env, op, device, swiglu_forward, g->data, u->data, h->data, dtype, n);
  return env.Undefined();
}

// swigluBackward(g, u, dh, dg, du, dtype, n)
Napi::Value SwigluBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "swigluBackward";
  Storage* g = ArgStorage(info, 0, op, "g");
  Storage* u = ArgStorage(info, 1, op, "u");
  Storage* dh = ArgStorage(info, 2, op, "dh");
  Storage* dg = ArgStorage(info, 3, op, "dg");
  Storage* du = ArgStorage(info, 4, op, "du");
  int dtype = ArgDtype(info, 5, op, "dtype");
  size_t n = ArgCount(info, 6, op);
  RequireFloat(env, op, "g", dtype);
  for (auto [s, name] : {std::pair<Storage*, const char*>{g, "g"}, {u, "u"}, {dh, "dh"}, {dg, "dg"}, {du, "du"}})
    RequireBytes(env, s, n, dtype, op, name);
  int device = CommonDevice(env, op, {g, u, dh, dg, du});
  XFT_DISPATCH(env, op, device, swiglu_backward, g->data, u->data, dh->data, dg->data, du->data, dtype, n);
  return env.Undefined();
}

// add(a, b, y, dtype, n)
Napi::Value Add(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "add";
  Storage* a = ArgStorage(info, 0, op, "a");
  Storage* b = ArgStorage(info, 1, op, "b");
  Storage* y = ArgStorage(info, 2, op, "y");
  int dtype = ArgDtype(info, 3, op, "dtype");
  size_t n = ArgCount(info, 4, op);
  RequireFloat(env, op, "a", dtype);
  RequireBytes(env, a, n, dtype, op, "a");
  RequireBytes(env, b, n, dtype, op, "b");
  RequireBytes(env, y, n, dtype, op, "y");
  int device = CommonDevice(env, op, {a, b, y});
  XFT_DISPATCH(env, op, device, add, a->data, b->data, y->data, dtype, n);
  return env.Undefined();
}

// axpby(x, xDtype, y, yDtype, n, alpha, beta)
Napi::Value Axpby(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "axpby";
  Storage* x = ArgStorage(info, 0, op, "x");
  int xdtype = ArgDtype(info, 1, op, "xDtype");
  Storage* y = ArgStorage(info, 2, op, "y");
  int ydtype = ArgDtype(info, 3, op, "yDtype");
  size_t n = ArgCount(info, 4, op);
  double alpha = ArgNumber(info, 5, op, "alpha"), beta = ArgNumber(info, 6, op, "beta");
  RequireFloat(env, op, "x", xdtype);
  RequireFloat(env, op, "y", ydtype);
  RequireBytes(env, x, n, xdtype, op, "x");
  RequireBytes(env, y, n, ydtype, op, "y");
  int device = CommonDevice(env, op, {x, y});
  XFT_DISPATCH(env, op, device, axpby, x->data, xdtype, y->data, ydtype, n, (float)alpha, (float)beta);
  return env.Undefined();
}

// tanhForward(x, y, dtype, n)
Napi::Value TanhForward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "tanh";
  Storage* x = ArgStorage(info, 0, op, "x");
  Storage* y = ArgStorage(info, 1, op, "y");
  int dtype = ArgDtype(info, 2, op, "dtype");
  size_t n = ArgCount(info, 3, op);
  RequireFloat(env, op, "x", dtype);
  RequireBytes(env, x, n, dtype, op, "x");
  RequireBytes(env, y, n, dtype, op, "y");
  int device = CommonDevice(env, op, {x, y});
  XFT_DISPATCH(env, op, device, tanh_forward, x->data, y->data, dtype, n);
  return env.Undefined();
}

// tanhBackward(y, dy, dx, dtype, n)
Napi::Value TanhBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "tanhBackward";
  Storage* y = ArgStorage(info, 0, op, "y");
  Storage* dy = ArgStorage(info, 1, op, "dy");
  Storage* dx = ArgStorage(info, 2, op, "dx");
  int dtype = ArgDtype(info, 3, op, "dtype");
  size_t n = ArgCount(info, 4, op);
  RequireFloat(env, op, "y", dtype);
  RequireBytes(env, y, n, dtype, op, "y");
  RequireBytes(env, dy, n, dtype, op, "dy");
  RequireBytes(env, dx, n, dtype, op, "dx");
  int device = CommonDevice(env, op, {y, dy, dx});
  XFT_DISPATCH(env, op, device, tanh_backward, y->data, dy->data, dx->data, dtype, n);
  return env.Undefined();
}

// routerNoiseForward(clean, z, noisy, dtype, n, seed, eps)
Napi::Value RouterNoiseForward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "routerNoise";
  Storage* clean = ArgStorage(info, 0, op, "clean");
  Storage* z = ArgStorage(info, 1, op, "z");
  Storage* noisy = ArgStorage(info, 2, op, "noisy");
  int dtype = ArgDtype(info, 3, op, "dtype");
  size_t n = ArgCount(info, 4, op);
  uint64_t seed = (uint64_t)ArgInt(info, 5, op, "seed");
  double eps = ArgNumber(info, 6, op, "eps");
  RequireFloat(env, op, "clean", dtype);
  RequireBytes(env, clean, n, dtype, op, "clean");
  RequireBytes(env, z, n, dtype, op, "z");
  RequireBytes(env, noisy, n, dtype, op, "noisy");
  int device = CommonDevice(env, op, {clean, z, noisy});
  XFT_DISPATCH(env, op, device, router_noise_forward, clean->data, z->data, noisy->data, dtype, n, seed, (float)eps);
  return env.Undefined();
}

// routerNoiseBackward(z, dNoisy, dClean|null, dz, dtype, n, seed)
Napi::Value RouterNoiseBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "routerNoiseBackward";
  Storage* z = ArgStorage(info, 0, op, "z");
  Storage* dnoisy = ArgStorage(info, 1, op, "dNoisy");
  Storage* dclean = ArgStorageOrNull(info, 2, op, "dClean");
  Storage* dz = ArgStorage(info, 3, op, "dz");
  int dtype = ArgDtype(info, 4, op, "dtype");
  size_t n = ArgCount(info, 5, op);
  uint64_t seed = (uint64_t)ArgInt(info, 6, op, "seed");
  RequireFloat(env, op, "z", dtype);
  RequireBytes(env, z, n, dtype, op, "z");
  RequireBytes(env, dnoisy, n, dtype, op, "dNoisy");
  RequireBytes(env, dclean, n, dtype, op, "dClean");
  RequireBytes(env, dz, n, dtype, op, "dz");
  int device = CommonDevice(env, op, {z, dnoisy, dclean, dz});
  XFT_DISPATCH(env, op, device, router_noise_backward, z->data, dnoisy->data, dclean ? dclean->data : nullptr,
               dz->data, dtype, n, seed);
  return env.Undefined();
}

// sumSquares(tensors[], numel[], dtypes[], out)
Napi::Value SumSquares(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "sumSquares";
  if (!info[0].IsArray() || !info[1].IsArray() || !info[2].IsArray())
    Throw(env, "XFT_TYPE", Op(op) + "tensors, numel and dtypes must be arrays");
  Napi::Array ts = info[0].As<Napi::Array>(), ns = info[1].As<Napi::Array>(), ds = info[2].As<Napi::Array>();
  if (ts.Length() != ns.Length() || ts.Length() != ds.Length())
    Throw(env, "XFT_SHAPE", Op(op) + "tensors, numel and dtypes must have the same length");
  Storage* out = ArgStorage(info, 3, op, "out");
  RequireBytes(env, out, 1, XFT_F32, op, "out");
  std::vector<const void*> ptrs;
  std::vector<size_t> numel;
  std::vector<int> dtypes;
  for (uint32_t t = 0; t < ts.Length(); t++) {
    Storage* s = ValueStorage(env, ts.Get(t), op, "tensors[i]");
    Napi::Value nv = ns.Get(t), dv = ds.Get(t);
    if (!nv.IsNumber() || !dv.IsNumber()) Throw(env, "XFT_TYPE", Op(op) + "numel and dtypes must be numbers");
    int64_t n = nv.As<Napi::Number>().Int64Value();
    int dtype = (int)dv.As<Napi::Number>().Int32Value();
    if (n < 0 || n > ((int64_t)1 << 50)) Throw(env, "XFT_SHAPE", Op(op) + "numel out of range");
    RequireFloat(env, op, "tensors[i]", dtype);
    RequireBytes(env, s, (size_t)n, dtype, op, "tensors[i]");
    if (s->device != out->device) Throw(env, "XFT_DEVICE", Op(op) + "all tensors must be on one device");
    ptrs.push_back(s->data);
    numel.push_back((size_t)n);
    dtypes.push_back(dtype);
  }
  XFT_DISPATCH(env, op, out->device, sum_squares, ptrs.data(), numel.data(), dtypes.data(), (int)ptrs.size(),
               (float*)out->data);
  return env.Undefined();
}

}  // namespace

void RegisterLayerOps(Napi::Env env, Napi::Object exports) {
  exports.Set("embeddingForward", Napi::Function::New(env, EmbeddingForward, "embeddingForward"));
  exports.Set("embeddingBackward", Napi::Function::New(env, EmbeddingBackward, "embeddingBackward"));
  exports.Set("rmsnormForward", Napi::Function::New(env, RmsnormForward, "rmsnormForward"));
  exports.Set("rmsnormBackward", Napi::Function::New(env, RmsnormBackward, "rmsnormBackward"));
  exports.Set("ropeForward", Napi::Function::New(env, Rope<false>, "ropeForward"));
  exports.Set("ropeBackward", Napi::Function::New(env, Rope<true>, "ropeBackward"));
  exports.Set("swigluForward", Napi::Function::New(env, SwigluForward, "swigluForward"));
  exports.Set("swigluBackward", Napi::Function::New(env, SwigluBackward, "swigluBackward"));
  exports.Set("add", Napi::Function::New(env, Add, "add"));
  exports.Set("axpby", Napi::Function::New(env, Axpby, "axpby"));
  exports.Set("tanhForward", Napi::Function::New(env, TanhForward, "tanhForward"));
  exports.Set("tanhBackward", Napi::Function::New(env, TanhBackward, "tanhBackward"));
  exports.Set("routerNoiseForward", Napi::Function::New(env, RouterNoiseForward, "routerNoiseForward"));
  exports.Set("routerNoiseBackward", Napi::Function::New(env, RouterNoiseBackward, "routerNoiseBackward"));
  exports.Set("sumSquares", Napi::Function::New(env, SumSquares, "sumSquares"));
}

}  // namespace xft
