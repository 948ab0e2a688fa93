// DistGroup, the N-API class of one process group (lib/dist/native.ts declares it, lib/dist/group.ts
// drives it): converts and checks the arguments, connects the store client, makes the Gloo or NCCL
// communicator, and turns DistError into XftError XFT_DIST (a missing library into XFT_NATIVE).
#include "../common.h"
#include "dist.h"

namespace xft {
namespace dist {

namespace {

const char* KindName(int kind) {
  static const char* names[] = {"allReduce", "reduceScatter", "allGather", "broadcast", "barrier"};
  return kind >= 0 && kind <= 4 ? names[kind] : "collective";
}

class DistGroup : public Napi::ObjectWrap<DistGroup> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "DistGroup",
                       {InstanceMethod("submit", &DistGroup::Submit), InstanceMethod("wait", &DistGroup::Wait),
                        InstanceMethod("done", &DistGroup::Done), InstanceMethod("allReduceHost", &DistGroup::AllReduceHost),
                        InstanceMethod("broadcastHost", &DistGroup::BroadcastHost),
                        InstanceMethod("storeStatus", &DistGroup::StoreStatus), InstanceMethod("dispose", &DistGroup::Dispose),
                        InstanceAccessor("rank", &DistGroup::Rank, nullptr), InstanceAccessor("size", &DistGroup::Size, nullptr)});
  }

  DistGroup(const Napi::CallbackInfo& info) : Napi::ObjectWrap<DistGroup>(info) {
    Napi::Env env = info.Env();
    if (!info[0].IsObject()) Throw(env, "XFT_TYPE", "DistGroup: expected an options object");
    Napi::Object o = info[0].As<Napi::Object>();
    auto num = [&](const char* name) -> int64_t {
      Napi::Value v = o.Get(name);
      if (!v.IsNumber()) Throw(env, "XFT_TYPE", std::string("DistGroup: options.") + name + " must be a number");
      return v.As<Napi::Number>().Int64Value();
    };
    auto str = [&](const char* name) -> std::string {
      Napi::Value v = o.Get(name);
      if (!v.IsString()) Throw(env, "XFT_TYPE", std::string("DistGroup: options.") + name + " must be a string");
      return v.As<Napi::String>().Utf8Value();
    };
    backend_ = (int)num("backend");
    CommOptions c;
    c.rank = (int)num("rank");
    c.size = (int)num("size");
    c.timeout_ms = num("timeoutMs");
    c.init_timeout_ms = num("initTimeoutMs");
    c.prefix = str("prefix");
    c.bind_host = str("bindHost");
    c.device = (int)num("device");
    if (o.Get("ncclPaths").IsString()) c.nccl_paths = str("ncclPaths");
    const std::string host = str("storeHost");
    const int port = (int)num("storePort");
    if (c.size < 1 || c.rank < 0 || c.rank >= c.size) Throw(env, "XFT_VALUE", "DistGroup: rank must be in [0, size)");
    if (backend_ != 0 && backend_ != 1) Throw(env, "XFT_VALUE", "DistGroup: backend must be 0 (gloo) or 1 (nccl)");
    if (backend_ == 0 && !GlooCompiled())
      Throw(env, "XFT_NATIVE", "this build of xft has no Gloo: install it (Debian/Ubuntu: apt-get install libgloo-dev) and rebuild the addon");
    if (backend_ == 1) RequireCuda(env, "ProcessGroup.init");
    rank_ = c.rank;
    size_ = c.size;
    try {
      store_ = std::make_shared<StoreClient>(host, port, c.rank, c.init_timeout_ms);
      comm_ = backend_ == 0 ? MakeGlooComm(c, store_) : MakeNcclComm(c, store_);
    } catch (const MissingLibrary& e) {
      if (store_) store_->bye();
      Throw(env, "XFT_NATIVE", std::string("ProcessGroup.init: ") + e.what());
    } catch (const std::exception& e) {
      Throw(env, "XFT_DIST", std::string("ProcessGroup.init (rank ") + std::to_string(c.rank) + " of " + std::to_string(c.size) + "): " + e.what());
    }
  }

  ~DistGroup() override {
    if (comm_) comm_->close();
  }

 private:
  Comm* Live(Napi::Env env, const char* op) {
    if (!comm_) Throw(env, "XFT_DISPOSED", std::string(op) + ": the process group was disposed");
    return comm_.get();
  }

  // submit(kind, dtype, op, root, storages[], offsets[], numels[], outStorage|null, outOffset, outNumel) -> work id
  Napi::Value Submit(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Comm* comm = Live(env, "submit");
    Request r;
    r.kind = (int)ArgInt(info, 0, "submit", "kind");
    r.dtype = ArgDtype(info, 1, "submit", "dtype");
    r.op = (int)ArgInt(info, 2, "submit", "op");
    r.root = (int)ArgInt(info, 3, "submit", "root");
    const char* name = KindName(r.kind);
    if (r.kind < 0 || r.kind > KIND_BARRIER) Throw(env, "XFT_VALUE", "submit: unknown collective kind");
    if (r.dtype == XFT_I32) Throw(env, "XFT_DTYPE", std::string(name) + ": i32 tensors are not supported");
    if (r.op != OP_SUM && r.op != OP_AVG) Throw(env, "XFT_VALUE", std::string(name) + ": op must be 0 (sum) or 1 (avg)");
    if (r.root < 0 || r.root >= size_) Throw(env, "XFT_VALUE", std::string(name) + ": root out of range");
    if (!info[4].IsArray() || !info[5].IsArray() || !info[6].IsArray()) Throw(env, "XFT_TYPE", std::string(name) + ": expected arrays of buffers");
    Napi::Array st = info[4].As<Napi::Array>(), off = info[5].As<Napi::Array>(), num = info[6].As<Napi::Array>();
    if (off.Length() != st.Length() || num.Length() != st.Length()) Throw(env, "XFT_TYPE", std::string(name) + ": buffer arrays differ in length");
    for (uint32_t i = 0; i < st.Length(); i++) r.bufs.push_back(BufferOf(env, name, "tensors", st.Get(i), off.Get(i), num.Get(i), r.dtype));
    if (r.kind == KIND_REDUCE_SCATTER || r.kind == KIND_ALL_GATHER) {
      if (r.bufs.size() != 1) Throw(env, "XFT_VALUE", std::string(name) + ": expected one input");
      r.out = BufferOf(env, name, "output", info[7], info[8], info[9], r.dtype);
      size_t n = r.kind == KIND_REDUCE_SCATTER ? r.out.numel : r.bufs[0].numel;
      size_t big = r.kind == KIND_REDUCE_SCATTER ? r.bufs[0].numel : r.out.numel;
      if (big != n * (size_t)size_) Throw(env, "XFT_SHAPE", std::string(name) + ": sizes do not fit the world size");
    }
    r.seq = ++seq_;
    store_->progress(r.seq, r.kind);
    return Napi::Number::New(env, (double)Call(env, [&] { return comm->submit(std::move(r)); }));
  }

  Napi::Value Wait(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Comm* comm = Live(env, "wait");
    int64_t id = ArgInt(info, 0, "wait", "work");
    Call(env, [&] { comm->wait(id); return 0; });
    return env.Undefined();
  }

  Napi::Value Done(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!comm_) return Napi::Boolean::New(env, true);
    return Napi::Boolean::New(env, comm_->done(ArgInt(info, 0, "done", "work")));
  }

  Napi::Value AllReduceHost(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Comm* comm = Live(env, "allReduceNumbers");
    if (!info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array)
      Throw(env, "XFT_TYPE", "allReduceHost: expected a Float64Array");
    Napi::Float64Array a = info[0].As<Napi::Float64Array>();
    int op = (int)ArgInt(info, 1, "allReduceHost", "op");
    uint32_t seq = ++seq_;
    store_->progress(seq, 5);
    Call(env, [&] { comm->all_reduce_host(a.Data(), a.ElementLength(), op, seq); return 0; });
    return env.Undefined();
  }

  Napi::Value BroadcastHost(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Comm* comm = Live(env, "broadcastJson");
    if (!info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array)
      Throw(env, "XFT_TYPE", "broadcastHost: expected a Uint8Array");
    Napi::Uint8Array a = info[0].As<Napi::Uint8Array>();
    int root = (int)ArgInt(info, 1, "broadcastHost", "root");
    if (root < 0 || root >= size_) Throw(env, "XFT_VALUE", "broadcastHost: root out of range");
    uint32_t seq = ++seq_;
    store_->progress(seq, 6);
    Call(env, [&] { comm->broadcast_host(a.Data(), a.ElementLength(), root, seq); return 0; });
    return env.Undefined();
  }

  Napi::Value StoreStatus(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!store_) Throw(env, "XFT_DISPOSED", "storeStatus: the process group was disposed");
    return Napi::String::New(env, Call(env, [&] { return store_->status(); }));
  }

  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    if (comm_) {
      comm_->close();
      comm_.reset();
    }
    if (store_) {
      store_->bye();
      store_.reset();
    }
    return info.Env().Undefined();
  }

  Napi::Value Rank(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), rank_); }
  Napi::Value Size(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), size_); }

  // A (storage, element offset, element count) triple as a checked buffer on this group's device.
  Buf BufferOf(Napi::Env env, const char* op, const char* name, Napi::Value storage, Napi::Value offset, Napi::Value numel, int dtype) {
    Storage* s = ValueStorage(env, storage, op, name);
    if (!offset.IsNumber() || !numel.IsNumber()) Throw(env, "XFT_TYPE", std::string(op) + ": offsets and sizes must be numbers");
    double o = offset.As<Napi::Number>().DoubleValue(), n = numel.As<Napi::Number>().DoubleValue();
    if (o < 0 || n < 0 || o != (double)(size_t)o || n != (double)(size_t)n) Throw(env, "XFT_VALUE", std::string(op) + ": bad offset or size");
    const size_t es = DtypeSize(dtype);
    if (((size_t)o + (size_t)n) * es > s->bytes)
      Throw(env, "XFT_SHAPE", std::string(op) + ": " + name + " holds " + std::to_string(s->bytes) + " bytes, fewer than the collective reads");
    const int want = backend_ == 0 ? DEV_CPU : DEV_CUDA;
    if (s->device != want)
      Throw(env, "XFT_DEVICE", std::string(op) + ": " + name + " is on " + DeviceName(s->device) + ", the group runs on " + DeviceName(want));
    Buf b;
    b.data = (char*)s->data + (size_t)o * es;
    b.numel = (size_t)n;
    return b;
  }

  template <typename F>
  auto Call(Napi::Env env, F&& f) -> decltype(f()) {
    try {
      return f();
    } catch (const DistError& e) {
      Throw(env, "XFT_DIST", e.what());
    } catch (const MissingLibrary& e) {
      Throw(env, "XFT_NATIVE", e.what());
    } catch (const Napi::Error&) {
      throw;
    } catch (const std::exception& e) {
      Throw(env, "XFT_DIST", e.what());
    }
  }

  int backend_ = 0, rank_ = 0, size_ = 1;
  uint32_t seq_ = 0;
  std::shared_ptr<StoreClient> store_;
  std::unique_ptr<Comm> comm_;
};

}  // namespace

}  // namespace dist

void RegisterDist(Napi::Env env, Napi::Object exports) {
  exports.Set("distGloo", Napi::Boolean::New(env, dist::GlooCompiled()));
  exports.Set("distNccl", Napi::Boolean::New(env, dist::NcclCompiled()));
  exports.Set("DistGroup", dist::DistGroup::Define(env));
}

}  // namespace xft
