// GlooComm: the CPU communicator over Gloo (Debian's libgloo-dev; compiled when CMake found it, as
// XFT_GLOO). Pairs over TCP, rendezvous through rank 0's store (store.cc). Every collective runs on
// one communication thread in submission order (as ProcessGroupGloo's worker), so the order is the
// same on every rank and an all-reduce can overlap the caller's work. Sums run in f32: bf16 tensors
// (and several tensors of one call) are packed into an f32 buffer, reduced, and rounded back once.
// Gloo's ring all-reduce reduces each segment on one rank and copies it to the others, so every rank
// ends with the same bits.
#include "dist.h"

#ifdef XFT_GLOO

#include <gloo/allgather.h>
#include <gloo/allreduce.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/common/error.h>
#include <gloo/math.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/tcp/device.h>

#include <string.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <thread>
#include <unordered_map>

#include "../../cuda/xft_math.h"

namespace xft {
namespace dist {

namespace {

// Gloo's rendezvous store over the store client, keys under the group's prefix.
class GlooStore : public gloo::rendezvous::Store {
 public:
  GlooStore(std::shared_ptr<StoreClient> client, std::string prefix, int64_t timeout_ms)
      : client_(std::move(client)), prefix_(std::move(prefix)), timeout_ms_(timeout_ms) {}
  void set(const std::string& key, const std::vector<char>& data) override { client_->set(prefix_ + "gloo/" + key, data); }
  std::vector<char> get(const std::string& key) override { return client_->get(prefix_ + "gloo/" + key, timeout_ms_, Describe(key)); }
  void wait(const std::vector<std::string>& keys) override { wait(keys, std::chrono::milliseconds(timeout_ms_)); }
  void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) override {
    for (const std::string& key : keys) client_->get(prefix_ + "gloo/" + key, timeout.count(), Describe(key));
  }

 private:
  // gloo's rendezvous keys are the ranks' numbers (each holds that rank's pair addresses)
  static std::string Describe(const std::string& key) {
    bool number = !key.empty() && key.find_first_not_of("0123456789") == std::string::npos;
    return number ? "rank " + key + " to join (its Gloo pair addresses)" : "the store key '" + key + "'";
  }
  std::shared_ptr<StoreClient> client_;
  std::string prefix_;
  int64_t timeout_ms_;
};

void SumF32(void* c, const void* a, const void* b, size_t n) { gloo::sum<float>(c, a, b, n); }
void SumF64(void* c, const void* a, const void* b, size_t n) { gloo::sum<double>(c, a, b, n); }

class GlooComm : public Comm {
 public:
  GlooComm(const CommOptions& o, std::shared_ptr<StoreClient> store) : o_(o), store_(std::move(store)), timeout_(o.timeout_ms) {
    try {
      gloo::transport::tcp::attr attr;
      attr.hostname = o.bind_host;
      device_ = gloo::transport::tcp::CreateDevice(attr);
      ctx_ = std::make_shared<gloo::rendezvous::Context>(o.rank, o.size);
      ctx_->setTimeout(std::chrono::milliseconds(o.init_timeout_ms));
      GlooStore gs(store_, o.prefix, o.init_timeout_ms);
      ctx_->connectFullMesh(gs, device_);
      ctx_->setTimeout(timeout_);
    } catch (const DistError&) {
      throw;
    } catch (const std::exception& e) {
      throw DistError(std::string("Gloo rendezvous failed: ") + e.what());
    }
    worker_ = std::thread([this] { Run(); });
  }
  ~GlooComm() override { close(); }

  int64_t submit(Request req) override {
    return Enqueue([this, req = std::move(req)] { Execute(req); });
  }

  void wait(int64_t id) override {
    std::unique_lock<std::mutex> lock(mu_);
    auto it = works_.find(id);
    if (it == works_.end()) throw DistError("unknown work " + std::to_string(id));
    cv_.wait(lock, [&] { return it->second.done; });
    std::string error = std::move(it->second.error);
    works_.erase(it);
    if (!error.empty()) throw DistError(error);
  }

  bool done(int64_t id) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = works_.find(id);
    return it == works_.end() || it->second.done;
  }

  void all_reduce_host(double* values, size_t n, int op, uint32_t seq) override {
    wait(Enqueue([=] {
      gloo::AllreduceOptions opts(ctx_);
      opts.setOutput(values, n);
      opts.setReduceFunction(&SumF64);
      opts.setTag(seq);
      opts.setTimeout(timeout_);
      gloo::allreduce(opts);
      if (op == OP_AVG)
        for (size_t i = 0; i < n; i++) values[i] /= o_.size;
    }));
  }

  void broadcast_host(uint8_t* bytes, size_t n, int root, uint32_t seq) override {
    wait(Enqueue([=] { Broadcast(bytes, n, root, seq); }));
  }

  void close() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stop_) return;
      stop_ = true;
    }
    cv_.notify_all();
    if (worker_.joinable()) worker_.join();
    ctx_.reset();
    device_.reset();
  }

 private:
  struct Work {
    bool done = false;
    std::string error;
  };

  int64_t Enqueue(std::function<void()> job) {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) throw DistError("the process group was disposed");
    int64_t id = next_id_++;
    works_[id];
    queue_.emplace_back(id, std::move(job));
    cv_.notify_all();
    return id;
  }

  void Run() {
    for (;;) {
      std::pair<int64_t, std::function<void()>> item;
      std::string broken;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;  // stopping, nothing left
        item = std::move(queue_.front());
        queue_.pop_front();
        broken = broken_;
      }
      std::string error;
      if (!broken.empty()) error = "the process group failed earlier: " + broken;
      else {
        try {
          item.second();
        } catch (const std::exception& e) {
          error = e.what();
        }
      }
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (!error.empty() && broken_.empty()) broken_ = error;
        Work& w = works_[item.first];
        w.done = true;
        w.error = error;
      }
      cv_.notify_all();
    }
  }

  void Execute(const Request& r) {
    switch (r.kind) {
      case KIND_ALL_REDUCE: return AllReduce(r);
      case KIND_REDUCE_SCATTER: return ReduceScatter(r);
      case KIND_ALL_GATHER: return AllGather(r);
      case KIND_BROADCAST:
        for (const Buf& b : r.bufs) Broadcast((uint8_t*)b.data, b.numel * (r.dtype == XFT_BF16 ? 2 : 4), r.root, r.seq);
        return;
      case KIND_BARRIER: {
        gloo::BarrierOptions opts(ctx_);
        opts.setTag(r.seq);
        opts.setTimeout(timeout_);
        gloo::barrier(opts);
        return;
      }
      default:
        throw DistError("unknown collective kind " + std::to_string(r.kind));
    }
  }

  // Sums `n` f32 values in place over the ranks (avg: then divides by the world size).
  void AllReduceF32(float* data, size_t n, int op, uint32_t seq) {
    if (n == 0) return;
    gloo::AllreduceOptions opts(ctx_);
    opts.setOutput(data, n);
    opts.setReduceFunction(&SumF32);
    opts.setTag(seq);
    opts.setTimeout(timeout_);
    gloo::allreduce(opts);
    if (op == OP_AVG) {
      const float ws = (float)o_.size;
      for (size_t i = 0; i < n; i++) data[i] /= ws;
    }
  }

  static void Pack(const Buf& b, int dtype, float* dst) {
    if (dtype == XFT_F32) memcpy(dst, b.data, b.numel * 4);
    else
      for (size_t i = 0; i < b.numel; i++) dst[i] = xft_bf16_to_f32(((const uint16_t*)b.data)[i]);
  }
  static void Unpack(const float* src, int dtype, const Buf& b) {
    if (dtype == XFT_F32) memcpy(b.data, src, b.numel * 4);
    else
      for (size_t i = 0; i < b.numel; i++) ((uint16_t*)b.data)[i] = xft_f32_to_bf16(src[i]);
  }

  void AllReduce(const Request& r) {
    if (r.dtype == XFT_F32 && r.bufs.size() == 1) return AllReduceF32((float*)r.bufs[0].data, r.bufs[0].numel, r.op, r.seq);
    size_t total = 0;
    for (const Buf& b : r.bufs) total += b.numel;
    std::vector<float> scratch(total);
    size_t at = 0;
    for (const Buf& b : r.bufs) Pack(b, r.dtype, scratch.data() + at), at += b.numel;
    AllReduceF32(scratch.data(), total, r.op, r.seq);
    at = 0;
    for (const Buf& b : r.bufs) Unpack(scratch.data() + at, r.dtype, b), at += b.numel;
  }

  // Gloo 0.5 has no reduce-scatter of the new API: an all-reduce of the whole input, then this rank's chunk.
  void ReduceScatter(const Request& r) {
    const Buf& in = r.bufs[0];
    std::vector<float> scratch(in.numel);
    Pack(in, r.dtype, scratch.data());
    AllReduceF32(scratch.data(), in.numel, r.op, r.seq);
    Unpack(scratch.data() + (size_t)o_.rank * r.out.numel, r.dtype, r.out);
  }

  void AllGather(const Request& r) {
    const Buf& in = r.bufs[0];
    if (in.numel == 0) return;
    gloo::AllgatherOptions opts(ctx_);
    if (r.dtype == XFT_BF16) {
      opts.setInput((uint16_t*)in.data, in.numel);
      opts.setOutput((uint16_t*)r.out.data, r.out.numel);
    } else {
      opts.setInput((float*)in.data, in.numel);
      opts.setOutput((float*)r.out.data, r.out.numel);
    }
    opts.setTag(r.seq);
    opts.setTimeout(timeout_);
    gloo::allgather(opts);
  }

  void Broadcast(uint8_t* bytes, size_t n, int root, uint32_t seq) {
    if (n == 0) return;
    gloo::BroadcastOptions opts(ctx_);
    opts.setOutput(bytes, n);
    opts.setRoot(root);
    opts.setTag(seq);
    opts.setTimeout(timeout_);
    gloo::broadcast(opts);
  }

  CommOptions o_;
  std::shared_ptr<StoreClient> store_;
  std::chrono::milliseconds timeout_;
  std::shared_ptr<gloo::transport::Device> device_;
  std::shared_ptr<gloo::rendezvous::Context> ctx_;
  std::thread worker_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::pair<int64_t, std::function<void()>>> queue_;
  std::unordered_map<int64_t, Work> works_;
  int64_t next_id_ = 1;
  bool stop_ = false;
  std::string broken_;  // the first failure: later work fails at once with it
};

}  // namespace

bool GlooCompiled() { return true; }

std::unique_ptr<Comm> MakeGlooComm(const CommOptions& o, std::shared_ptr<StoreClient> store) {
  return std::make_unique<GlooComm>(o, std::move(store));
}

}  // namespace dist
}  // namespace xft

#else  // no Gloo in this build

namespace xft {
namespace dist {
bool GlooCompiled() { return false; }
std::unique_ptr<Comm> MakeGlooComm(const CommOptions&, std::shared_ptr<StoreClient>) {
  throw MissingLibrary("this build of xft has no Gloo: install it (Debian/Ubuntu: apt-get install libgloo-dev) and rebuild the addon");
}
}  // namespace dist
}  // namespace xft

#endif
