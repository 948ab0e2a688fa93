// The communicator interface of the binding (PyTorch's ProcessGroup split: one interface, one backend
// per library): Comm, with GlooComm (gloo.cc, CPU memory) and NcclComm (nccl.cc over cuda/nccl.cu,
// GPU memory) behind it, the rendezvous store client both use (store.cc), and the N-API class
// DistGroup (group.cc) that lib/dist/group.ts drives. Errors are DistError (-> XftError XFT_DIST).
#pragma once
#include <stddef.h>
#include <stdint.h>

#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace xft {
namespace dist {

// A peer failed, timed out or could not be reached; the message says what the backend saw.
struct DistError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum Kind { KIND_ALL_REDUCE = 0, KIND_REDUCE_SCATTER = 1, KIND_ALL_GATHER = 2, KIND_BROADCAST = 3, KIND_BARRIER = 4 };
enum ReduceOp { OP_SUM = 0, OP_AVG = 1 };

// `numel` elements of the request's dtype at `data` (host or device memory, as the backend needs).
struct Buf {
  void* data = nullptr;
  size_t numel = 0;
};

// One collective. all-reduce and broadcast: in place over `bufs`; reduce-scatter: bufs[0] (size x n)
// into `out` (n); all-gather: bufs[0] (n) into `out` (size x n).
struct Request {
  int kind = KIND_ALL_REDUCE;
  int dtype = 0;  // xft_dtype: XFT_F32 or XFT_BF16
  int op = OP_SUM;
  int root = 0;
  std::vector<Buf> bufs;
  Buf out;
  uint32_t seq = 0;  // the collective's number on this rank (the Gloo tag)
};

// The client of rank 0's rendezvous store (lib/dist/store.ts has the protocol). Thread safe.
class StoreClient {
 public:
  // Connects (retrying until timeout_ms: rank 0 may not be listening yet) and says HELLO as `rank`.
  StoreClient(const std::string& host, int port, int rank, int64_t timeout_ms);
  ~StoreClient();
  void set(const std::string& key, const std::vector<char>& value);
  // Waits until `key` is set (at most timeout_ms), else DistError naming `what`.
  std::vector<char> get(const std::string& key, int64_t timeout_ms, const std::string& what);
  // The store's JSON view of the ranks (one quick try; DistError when rank 0 is unreachable).
  std::string status();
  // Records that this rank entered collective `seq` of `kind` (no reply; failures ignored).
  void progress(uint32_t seq, int kind);
  // Says BYE (this rank leaves cleanly); failures ignored.
  void bye();
  const std::string& where() const { return where_; }

 private:
  void connect_locked(int64_t timeout_ms);
  std::vector<char> request_locked(int op, const std::string& key, const std::vector<char>& value, int64_t timeout_ms, bool reply);
  void close_locked();
  std::string host_;
  int port_, rank_;
  std::string where_;
  int fd_ = -1;
  std::mutex mu_;
};

class Comm {
 public:
  virtual ~Comm() = default;
  // Enqueues the collective; returns its work id (> 0).
  virtual int64_t submit(Request req) = 0;
  // Blocks until the work is done; throws its DistError.
  virtual void wait(int64_t id) = 0;
  virtual bool done(int64_t id) = 0;
  // Synchronous collectives over host memory, in order with the submitted work.
  virtual void all_reduce_host(double* values, size_t n, int op, uint32_t seq) = 0;
  virtual void broadcast_host(uint8_t* bytes, size_t n, int root, uint32_t seq) = 0;
  // Waits for the work in flight (errors dropped) and frees the communicator.
  virtual void close() = 0;
};

struct CommOptions {
  int rank = 0, size = 1;
  int64_t timeout_ms = 300000;       // each collective
  int64_t init_timeout_ms = 300000;  // rendezvous: all ranks started and connected
  std::string prefix;     // key prefix of this group in the store
  std::string bind_host;  // gloo: where this rank's pairs listen
  int device = 0;         // nccl: CUDA device ordinal
  std::string nccl_paths; // nccl: the files to dlopen, one per line (lib/dist/group.ts ncclCandidates)
};

// Both throw DistError (peers) or std::runtime_error (XFT_NATIVE: no library) on failure.
bool GlooCompiled();
std::unique_ptr<Comm> MakeGlooComm(const CommOptions& o, std::shared_ptr<StoreClient> store);
bool NcclCompiled();
std::unique_ptr<Comm> MakeNcclComm(const CommOptions& o, std::shared_ptr<StoreClient> store);

// The library could not be loaded or is missing from the build (XFT_NATIVE, not a peer failure).
struct MissingLibrary : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace dist
}  // namespace xft
