// Bindings of the small-N router linears (cuda/router_linear.cu, binding/cpu/router_linear.cc) and of
// UpIT's routing-vector loss (cuda/routing_probe.cu, binding/cpu/routing_probe.cc).
// lib/ops_router.ts validates shapes, dtypes and devices and allocates outputs; this layer re-checks
// sizes, dtypes and devices (a second line of defence against out-of-bounds access) and dispatches.
#include <cmath>

#include "common.h"

namespace xft {

namespace {

const int64_t kMaxRouterOutputs = 32;  // cuda/router_linear.cu (NB <= 32), lib/ops_router.ts ROUTER_LINEAR_MAX_N

void CheckRouterShape(Napi::Env env, const char* op, int64_t T, int64_t N, int64_t d, int dtype) {
  if (T < 0 || T > INT32_MAX || d < 1 || d > INT32_MAX || N < 1 || N > kMaxRouterOutputs)
    Throw(env, "XFT_SHAPE", std::string(op) + ": invalid sizes T=" + std::to_string(T) + " N=" + std::to_string(N) +
                                " d=" + std::to_string(d) + " (expected T >= 0, d >= 1, 1 <= N <= " +
                                std::to_string(kMaxRouterOutputs) + ")");
  if (dtype != XFT_F32 && dtype != XFT_BF16)
    Throw(env, "XFT_DTYPE", std::string(op) + ": expected f32 or bf16 operands, got " + DtypeName(dtype));
}

// routerLinearForward(x, w, y, dtype, T, N, d)
Napi::Value RouterLinearForward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "routerLinear";
  Storage* x = ArgStorage(info, 0, op, "x");
  Storage* w = ArgStorage(info, 1, op, "w");
  Storage* y = ArgStorage(info, 2, op, "y");
  int dtype = ArgDtype(info, 3, op, "dtype");
  int64_t T = ArgInt(info, 4, op, "T"), N = ArgInt(info, 5, op, "N"), d = ArgInt(info, 6, op, "d");
  CheckRouterShape(env, op, T, N, d, dtype);
  RequireBytes(env, x, T * d, dtype, op, "x");
  RequireBytes(env, w, N * d, dtype, op, "w");
  RequireBytes(env, y, T * N, dtype, op, "y");
  int device = CommonDevice(env, op, {x, w, y});
  XFT_DISPATCH(env, op, device, router_linear_forward, x->data, w->data, y->data, dtype, (int)T, (int)N, (int)d);
  return env.Undefined();
}

// routerLinearBackward(x, w, dy, dx|null, dw|null, dtype, dwDtype, T, N, d, accumulate)
Napi::Value RouterLinearBackward(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "routerLinearBackward";
  Storage* x = ArgStorage(info, 0, op, "x");
  Storage* w = ArgStorage(info, 1, op, "w");
  Storage* dy = ArgStorage(info, 2, op, "dy");
  Storage* dx = ArgStorageOrNull(info, 3, op, "dx");
  Storage* dw = ArgStorageOrNull(info, 4, op, "dw");
  int dtype = ArgDtype(info, 5, op, "dtype");
  int dw_dtype = ArgDtype(info, 6, op, "dwDtype");
  int64_t T = ArgInt(info, 7, op, "T"), N = ArgInt(info, 8, op, "N"), d = ArgInt(info, 9, op, "d");
  bool accumulate = info[10].ToBoolean();
  CheckRouterShape(env, op, T, N, d, dtype);
  if (dw_dtype != dtype && dw_dtype != XFT_F32)
    Throw(env, "XFT_DTYPE", std::string(op) + ": dw must have the inputs' dtype or f32");
  RequireBytes(env, x, T * d, dtype, op, "x");
  RequireBytes(env, w, N * d, dtype, op, "w");
  RequireBytes(env, dy, T * N, dtype, op, "dy");
  RequireBytes(env, dx, T * d, dtype, op, "dx");
  RequireBytes(env, dw, N * d, dw_dtype, op, "dw");
  int device = CommonDevice(env, op, {x, w, dy, dx, dw});
  XFT_DISPATCH(env, op, device, router_linear_backward, x->data, w->data, dy->data, dx ? dx->data : nullptr,
               dw ? dw->data : nullptr, dtype, dw_dtype, (int)T, (int)N, (int)d, accumulate);
  return env.Undefined();
}

// routingProbe(h, targets, dh|null, stats, dtype, N, scale)
Napi::Value RoutingProbe(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* op = "routingProbeLoss";
  Storage* h = ArgStorage(info, 0, op, "h");
  Storage* targets = ArgStorage(info, 1, op, "targets");
  Storage* dh = ArgStorageOrNull(info, 2, op, "dh");
  Storage* stats = ArgStorage(info, 3, op, "stats");
  int dtype = ArgDtype(info, 4, op, "dtype");
  int64_t N = ArgInt(info, 5, op, "N");
  double scale = ArgNumber(info, 6, op, "scale");
  if (N < 0 || N > INT32_MAX) Throw(env, "XFT_SHAPE", std::string(op) + ": invalid N=" + std::to_string(N));
  if (dtype != XFT_F32 && dtype != XFT_BF16)
    Throw(env, "XFT_DTYPE", std::string(op) + ": expected f32 or bf16 logits, got " + DtypeName(dtype));
  if (!std::isfinite(scale)) Throw(env, "XFT_VALUE", std::string(op) + ": scale must be finite");
  RequireBytes(env, h, N, dtype, op, "h");
  RequireBytes(env, targets, N, XFT_I32, op, "targets");
  RequireBytes(env, dh, N, dtype, op, "dh");
  RequireBytes(env, stats, 3, XFT_F32, op, "stats");
  int device = CommonDevice(env, op, {h, targets, dh, stats});
  XFT_DISPATCH(env, op, device, routing_probe, h->data, (const int*)targets->data, dh ? dh->data : nullptr,
               (float*)stats->data, dtype, (int)N, (float)scale);
  return env.Undefined();
}

}  // namespace

void RegisterRouterOps(Napi::Env env, Napi::Object exports) {
  exports.Set("routerLinearForward", Napi::Function::New(env, RouterLinearForward, "routerLinearForward"));
  exports.Set("routerLinearBackward", Napi::Function::New(env, RouterLinearBackward, "routerLinearBackward"));
  exports.Set("routingProbe", Napi::Function::New(env, RoutingProbe, "routingProbe"));
}

}  // namespace xft
