// Bindings of the profiling timers (cuda/timer.h: cudaEvents on the CUDA stream, the host clock on the
// CPU), used by bench/profile.ts for bench/train --profile. device: 0 cpu, 1 cuda.
#include "common.h"
#include "../cuda/timer.h"

namespace xft {

namespace {

const int kMaxTimers = 1 << 20;

int TimerDevice(const Napi::CallbackInfo& info, const char* op) {
  int64_t device = ArgInt(info, 0, op, "device");
  if (device != DEV_CPU && device != DEV_CUDA) Throw(info.Env(), "XFT_VALUE", std::string(op) + ": device must be 0 (cpu) or 1 (cuda)");
  if (device == DEV_CUDA) RequireCuda(info.Env(), op);
  return (int)device;
}

#ifdef XFT_WITH_CUDA
#define XFT_TIMER(device, fn, ...) ((device) == DEV_CUDA ? xft_cuda_timer_##fn(__VA_ARGS__) : xft_cpu_timer_##fn(__VA_ARGS__))
#else
#define XFT_TIMER(device, fn, ...) ((void)(device), xft_cpu_timer_##fn(__VA_ARGS__))
#endif

// timerReset(device, count)
Napi::Value TimerReset(const Napi::CallbackInfo& info) {
  const char* op = "timerReset";
  int device = TimerDevice(info, op);
  int64_t count = ArgInt(info, 1, op, "count");
  if (count < 0 || count > kMaxTimers) Throw(info.Env(), "XFT_VALUE", std::string(op) + ": count out of range [0, 2^20]");
  CheckStatus(info.Env(), op, XFT_TIMER(device, reset, (int)count));
  return info.Env().Undefined();
}

// timerRecord(device, slot)
Napi::Value TimerRecord(const Napi::CallbackInfo& info) {
  const char* op = "timerRecord";
  int device = TimerDevice(info, op);
  int64_t slot = ArgInt(info, 1, op, "slot");
  if (slot < 0 || slot >= kMaxTimers) Throw(info.Env(), "XFT_VALUE", std::string(op) + ": slot out of range");
  CheckStatus(info.Env(), op, XFT_TIMER(device, record, (int)slot));
  return info.Env().Undefined();
}

// timerElapsed(device, from, to) -> ms
Napi::Value TimerElapsed(const Napi::CallbackInfo& info) {
  const char* op = "timerElapsed";
  int device = TimerDevice(info, op);
  int64_t from = ArgInt(info, 1, op, "from"), to = ArgInt(info, 2, op, "to");
  if (from < 0 || from >= kMaxTimers || to < 0 || to >= kMaxTimers) Throw(info.Env(), "XFT_VALUE", std::string(op) + ": slot out of range");
  float ms = 0.f;
  CheckStatus(info.Env(), op, XFT_TIMER(device, elapsed, (int)from, (int)to, &ms));
  return Napi::Number::New(info.Env(), ms);
}

}  // namespace

void RegisterTimerOps(Napi::Env env, Napi::Object exports) {
  exports.Set("timerReset", Napi::Function::New(env, TimerReset, "timerReset"));
  exports.Set("timerRecord", Napi::Function::New(env, TimerRecord, "timerRecord"));
  exports.Set("timerElapsed", Napi::Function::New(env, TimerElapsed, "timerElapsed"));
}

}  // namespace xft
