// NcclComm: the GPU communicator over NCCL, loaded at run time by cuda/nccl.cu (CUDA builds only).
// Rendezvous: rank 0 makes the unique id and sets it in the store, the others get it. Every
// collective runs on the side stream after the work already queued on xft's stream; `wait` makes
// xft's stream wait for it (no host wait). bf16 all-reduces and reduce-scatters are cast to an f32
// scratch on xft's stream, reduced in f32 and cast back after the wait, like GlooComm.
// A watchdog thread polls every collective in flight: one not finished within the timeout, or an
// error NCCL reports (ncclCommGetAsyncError), aborts the communicator (its kernels end, so no stream
// waits forever) and every later call throws that error.
#include "dist.h"

#ifdef XFT_WITH_CUDA

#include <chrono>
#include <condition_variable>
#include <thread>
#include <unordered_map>

#include "../../cuda/xft_cuda.h"
#include "../../cuda/xft_math.h"
#include "../../cuda/xft_nccl.h"

namespace xft {
namespace dist {

namespace {

const char* KindWord(int kind) {
  static const char* names[] = {"allReduce", "reduceScatter", "allGather", "broadcast", "barrier", "allReduceNumbers", "broadcastJson"};
  return kind >= 0 && kind <= 6 ? names[kind] : "collective";
}

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

class NcclComm : public Comm {
 public:
  NcclComm(const CommOptions& o, std::shared_ptr<StoreClient> store) : o_(o), store_(std::move(store)) {
    int version = 0;
    if (xft_nccl_load(o.nccl_paths.c_str(), &version)) throw MissingLibrary(xft_nccl_last_error());
    std::vector<char> id(XFT_NCCL_ID_BYTES);
    const std::string key = o.prefix + "nccl/id";
    if (o.rank == 0) {
      if (xft_nccl_unique_id(id.data())) throw DistError(xft_nccl_last_error());
      store_->set(key, id);
    } else {
      id = store_->get(key, o.init_timeout_ms, "rank 0's NCCL unique id");
      if (id.size() != XFT_NCCL_ID_BYTES) throw DistError("rank 0's NCCL unique id has the wrong size");
    }
    if (xft_nccl_comm_init(&comm_, o.size, id.data(), o.rank)) throw DistError(xft_nccl_last_error());
    if (xft_cuda_malloc(&one_, sizeof(float)) || xft_cuda_memset(one_, 0, sizeof(float))) {
      xft_nccl_comm_destroy(comm_);
      throw DistError("cannot allocate the barrier's scratch on the GPU");
    }
    watchdog_ = std::thread([this] { Watch(); });
  }
  ~NcclComm() override { close(); }

  int64_t submit(Request r) override {
    std::lock_guard<std::mutex> lock(mu_);
    ThrowIfBroken();
    Work w;
    w.seq = r.seq;
    w.kind = r.kind;
    Check(Enqueue(r, w));
    int64_t id = next_id_++;
    works_.emplace(id, std::move(w));
    return id;
  }

  void wait(int64_t id) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = works_.find(id);
    if (it == works_.end()) throw DistError("unknown work " + std::to_string(id));
    Work& w = it->second;
    ThrowIfBroken();
    if (!w.joined) {
      w.joined = true;
      Check(xft_nccl_join(w.event) == 0 ? 0 : -1);
      for (const Post& p : w.posts)
        if (xft_cuda_cast(p.dst, XFT_BF16, p.src, XFT_F32, p.n)) throw DistError("casting a bf16 collective's f32 result back failed");
      for (void* s : w.scratch) xft_cuda_free(s);
      w.scratch.clear();
      w.posts.clear();
    }
    if (w.completed) Release(it);
  }

  bool done(int64_t id) override {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = works_.find(id);
    return it == works_.end() || it->second.completed || !broken_.empty();
  }

  void all_reduce_host(double* values, size_t n, int op, uint32_t seq) override { Host(values, n * 8, 3, op, -1, seq, 5); }
  void broadcast_host(uint8_t* bytes, size_t n, int root, uint32_t seq) override { Host(bytes, n, 4, 0, root, seq, 6); }

  void close() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (closed_) return;
      closed_ = true;
    }
    cv_.notify_all();
    if (watchdog_.joinable()) watchdog_.join();
    std::lock_guard<std::mutex> lock(mu_);
    if (comm_) {
      if (aborted_ || !broken_.empty()) xft_nccl_comm_abort(comm_);
      else xft_nccl_comm_destroy(comm_);  // waits for the work in flight
      comm_ = nullptr;
    }
    for (auto& e : works_) {
      for (void* s : e.second.scratch) xft_cuda_free(s);
      if (e.second.event) xft_nccl_event_free(e.second.event);
    }
    works_.clear();
    if (one_) xft_cuda_free(one_);
    one_ = nullptr;
  }

 private:
  struct Post {
    void* dst;
    const void* src;
    size_t n;
  };
  struct Work {
    void* event = nullptr;
    uint32_t seq = 0;
    int kind = 0;
    int64_t start = NowMs();
    bool joined = false, completed = false;
    std::vector<void*> scratch;  // freed (stream ordered) after the join
    std::vector<Post> posts;     // f32 scratch -> bf16 tensor casts after the join
  };

  void Check(int status) {
    if (status != 0) throw DistError(xft_nccl_last_error());
  }
  void ThrowIfBroken() {
    if (!broken_.empty()) throw DistError(broken_);
  }
  void Release(std::unordered_map<int64_t, Work>::iterator it) {
    if (it->second.event) xft_nccl_event_free(it->second.event);
    works_.erase(it);
  }

  // An f32 scratch of n elements holding the bf16 buffers' values (cast on xft's stream).
  int Widen(Work& w, const std::vector<Buf>& bufs, size_t n, float** out) {
    void* s = nullptr;
    if (xft_cuda_malloc(&s, n * sizeof(float))) return -1;
    w.scratch.push_back(s);
    size_t at = 0;
    for (const Buf& b : bufs) {
      if (b.numel && xft_cuda_cast((float*)s + at, XFT_F32, b.data, XFT_BF16, b.numel)) return -1;
      at += b.numel;
    }
    *out = (float*)s;
    return 0;
  }

  int Enqueue(const Request& r, Work& w) {
    const bool bf16 = r.dtype == XFT_BF16;
    float* wide = nullptr;
    float* wide_out = nullptr;
    size_t total = 0;
    for (const Buf& b : r.bufs) total += b.numel;
    // casts first, on xft's stream, so that the side stream's wait covers them
    if (bf16 && (r.kind == KIND_ALL_REDUCE || r.kind == KIND_REDUCE_SCATTER)) {
      if (Widen(w, r.bufs, total, &wide)) return -1;
      if (r.kind == KIND_REDUCE_SCATTER) {
        void* s = nullptr;
        if (xft_cuda_malloc(&s, r.out.numel * sizeof(float) + 4)) return -1;
        w.scratch.push_back(s);
        wide_out = (float*)s;
      }
    }
    if (xft_nccl_begin()) return -1;
    int st = 0;
    switch (r.kind) {
      case KIND_ALL_REDUCE:
        if (bf16) {
          if (total) st = xft_nccl_all_reduce(comm_, wide, wide, total, XFT_F32, r.op);
          size_t at = 0;
          for (const Buf& b : r.bufs) w.posts.push_back({b.data, wide + at, b.numel}), at += b.numel;
        } else {
          st = xft_nccl_group_start();
          for (const Buf& b : r.bufs)
            if (!st && b.numel) st = xft_nccl_all_reduce(comm_, b.data, b.data, b.numel, XFT_F32, r.op);
          if (!st) st = xft_nccl_group_end();
        }
        break;
      case KIND_REDUCE_SCATTER:
        if (r.out.numel == 0) break;
        if (bf16) {
          st = xft_nccl_reduce_scatter(comm_, wide, wide_out, r.out.numel, XFT_F32, r.op);
          w.posts.push_back({r.out.data, wide_out, r.out.numel});
        } else
          st = xft_nccl_reduce_scatter(comm_, r.bufs[0].data, r.out.data, r.out.numel, XFT_F32, r.op);
        break;
      case KIND_ALL_GATHER:
        if (r.bufs[0].numel) st = xft_nccl_all_gather(comm_, r.bufs[0].data, r.out.data, r.bufs[0].numel, r.dtype);
        break;
      case KIND_BROADCAST:
        st = xft_nccl_group_start();
        for (const Buf& b : r.bufs)
          if (!st && b.numel) st = xft_nccl_broadcast(comm_, b.data, b.numel, r.dtype, r.root);
        if (!st) st = xft_nccl_group_end();
        break;
      case KIND_BARRIER:
        st = xft_nccl_all_reduce(comm_, one_, one_, 1, XFT_F32, OP_SUM);
        break;
      default:
        return -1;
    }
    if (st) return -1;
    return xft_nccl_end(&w.event);
  }

  // A synchronous collective over host bytes: staged through the GPU (dtype 3 f64 all-reduce, 4 u8 broadcast).
  void Host(void* data, size_t bytes, int dtype, int op, int root, uint32_t seq, int kind) {
    if (bytes == 0) return;
    void* dev = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      ThrowIfBroken();
      if (xft_cuda_malloc(&dev, bytes)) throw DistError("cannot allocate " + std::to_string(bytes) + " bytes on the GPU");
      Work w;
      w.seq = seq;
      w.kind = kind;
      w.scratch.push_back(dev);
      int st = xft_cuda_memcpy_h2d(dev, data, bytes) == 0 && xft_nccl_begin() == 0 ? 0 : -1;
      if (!st) st = dtype == 3 ? xft_nccl_all_reduce(comm_, dev, dev, bytes / 8, 3, op) : xft_nccl_broadcast(comm_, dev, bytes, 4, root);
      if (!st) st = xft_nccl_end(&w.event);
      if (!st) st = xft_nccl_join(w.event);
      w.joined = true;
      int64_t id = next_id_++;
      works_.emplace(id, std::move(w));
      Check(st);
    }
    // the copy back waits on xft's stream (outside the lock: the watchdog may abort meanwhile)
    int st = xft_cuda_memcpy_d2h(data, dev, bytes);
    std::lock_guard<std::mutex> lock(mu_);
    ThrowIfBroken();
    if (st) throw DistError(std::string("copying a host collective's result back failed: CUDA error ") + std::to_string(st));
  }

  void Watch() {
    xft_nccl_bind_thread();
    std::unique_lock<std::mutex> lock(mu_);
    while (!closed_) {
      cv_.wait_for(lock, std::chrono::milliseconds(50));
      if (closed_ || aborted_) continue;
      const int64_t now = NowMs();
      std::string why;
      for (auto it = works_.begin(); it != works_.end();) {
        Work& w = it->second;
        if (!w.completed) {
          int failed = 0;
          if (xft_nccl_event_done(w.event, &failed) == 0) w.completed = true;
          if (failed && why.empty()) why = xft_nccl_last_error();
          else if (!w.completed && now - w.start > o_.timeout_ms && why.empty())
            why = "timed out: " + std::string(KindWord(w.kind)) + " #" + std::to_string(w.seq) + " did not complete within " +
                  std::to_string(o_.timeout_ms) + " ms";
        }
        if (w.completed && w.joined) {
          xft_nccl_event_free(w.event);
          it = works_.erase(it);
        } else
          ++it;
      }
      int failed = 0;
      if (why.empty() && xft_nccl_comm_check(comm_, &failed) == 0 && failed) why = xft_nccl_last_error();
      if (!why.empty()) {
        broken_ = why;
        aborted_ = true;
        xft_nccl_comm_abort(comm_);  // the kernels in flight end, so no stream waits forever
        comm_ = nullptr;
      }
    }
  }

  CommOptions o_;
  std::shared_ptr<StoreClient> store_;
  void* comm_ = nullptr;
  void* one_ = nullptr;
  std::mutex mu_;
  std::condition_variable cv_;
  std::thread watchdog_;
  std::unordered_map<int64_t, Work> works_;
  int64_t next_id_ = 1;
  bool closed_ = false, aborted_ = false;
  std::string broken_;
};

}  // namespace

bool NcclCompiled() { return true; }

std::unique_ptr<Comm> MakeNcclComm(const CommOptions& o, std::shared_ptr<StoreClient> store) {
  return std::make_unique<NcclComm>(o, std::move(store));
}

}  // namespace dist
}  // namespace xft

#else  // a build without CUDA

namespace xft {
namespace dist {
bool NcclCompiled() { return false; }
std::unique_ptr<Comm> MakeNcclComm(const CommOptions&, std::shared_ptr<StoreClient>) {
  throw MissingLibrary("this build of xft has no CUDA backend, so no NCCL");
}
}  // namespace dist
}  // namespace xft

#endif
