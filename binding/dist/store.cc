// The client of rank 0's rendezvous store (the server and the wire format: lib/dist/store.ts).
// Blocking sockets with poll() deadlines; a request that fails or times out closes the connection
// (a late reply must not be read as the next one's) and the next request reconnects.
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <thread>

#include "dist.h"

namespace xft {
namespace dist {

namespace {

enum StoreOp { OP_SET = 1, OP_GET = 2, OP_HELLO = 3, OP_BYE = 4, OP_STATUS = 5, OP_PROGRESS = 6 };

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Writes all of buf, else false.
bool SendAll(int fd, const char* buf, size_t n) {
  while (n > 0) {
    ssize_t k = send(fd, buf, n, MSG_NOSIGNAL);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return false;
    buf += k;
    n -= (size_t)k;
  }
  return true;
}

// Reads exactly n bytes before deadline (ms, steady clock); 0 ok, -1 error/closed, -2 timed out.
int RecvAll(int fd, char* buf, size_t n, int64_t deadline) {
  while (n > 0) {
    int64_t left = deadline - NowMs();
    if (left <= 0) return -2;
    pollfd p{fd, POLLIN, 0};
    int r = poll(&p, 1, (int)std::min<int64_t>(left, 1 << 30));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return -1;
    if (r == 0) return -2;
    ssize_t k = recv(fd, buf, n, 0);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return -1;
    buf += k;
    n -= (size_t)k;
  }
  return 0;
}

}  // namespace

StoreClient::StoreClient(const std::string& host, int port, int rank, int64_t timeout_ms)
    : host_(host), port_(port), rank_(rank), where_(host + ":" + std::to_string(port)) {
  std::lock_guard<std::mutex> lock(mu_);
  connect_locked(timeout_ms);
}

StoreClient::~StoreClient() {
  std::lock_guard<std::mutex> lock(mu_);
  close_locked();
}

void StoreClient::close_locked() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

void StoreClient::connect_locked(int64_t timeout_ms) {
  const int64_t deadline = NowMs() + timeout_ms;
  std::string last = "no attempt";
  for (;;) {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* found = nullptr;
    int gai = getaddrinfo(host_.c_str(), std::to_string(port_).c_str(), &hints, &found);
    if (gai != 0) {
      last = std::string("cannot resolve the host: ") + gai_strerror(gai);
    } else {
      for (addrinfo* a = found; a && fd_ < 0; a = a->ai_next) {
        int fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0) continue;
        if (::connect(fd, a->ai_addr, a->ai_addrlen) == 0) {
          int one = 1;
          setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
          fd_ = fd;
        } else {
          last = strerror(errno);
          ::close(fd);
        }
      }
      freeaddrinfo(found);
    }
    if (fd_ >= 0) break;
    if (NowMs() >= deadline)
      throw DistError("cannot reach rank 0's rendezvous store at " + where_ + " within " + std::to_string(timeout_ms) +
                      " ms (" + last + "): is rank 0 running, and MASTER_ADDR/MASTER_PORT the same on every rank?");
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  request_locked(OP_HELLO, std::to_string(rank_), {}, std::max<int64_t>(deadline - NowMs(), 1000), true);
}

std::vector<char> StoreClient::request_locked(int op, const std::string& key, const std::vector<char>& value, int64_t timeout_ms,
                                              bool reply) {
  if (fd_ < 0) connect_locked(timeout_ms);
  std::string frame;
  frame.reserve(9 + key.size() + value.size());
  uint32_t klen = (uint32_t)key.size(), vlen = (uint32_t)value.size();
  frame.push_back((char)op);
  frame.append((const char*)&klen, 4);  // little endian hosts only (x86-64, arm64)
  frame.append(key);
  frame.append((const char*)&vlen, 4);
  frame.append(value.data(), value.size());
  if (!SendAll(fd_, frame.data(), frame.size())) {
    close_locked();
    throw DistError("lost the connection to rank 0's rendezvous store at " + where_);
  }
  if (!reply) return {};
  const int64_t deadline = NowMs() + timeout_ms;
  char head[5];
  int r = RecvAll(fd_, head, 5, deadline);
  std::vector<char> out;
  if (r == 0) {
    uint32_t n;
    memcpy(&n, head + 1, 4);
    out.resize(n);
    r = RecvAll(fd_, out.data(), n, deadline);
  }
  if (r != 0) {
    close_locked();
    if (r == -2) throw DistError("timed out after " + std::to_string(timeout_ms) + " ms");
    throw DistError("lost the connection to rank 0's rendezvous store at " + where_);
  }
  if (head[0] != 0) throw DistError("the rendezvous store refused a request: " + std::string(out.begin(), out.end()));
  return out;
}

void StoreClient::set(const std::string& key, const std::vector<char>& value) {
  std::lock_guard<std::mutex> lock(mu_);
  request_locked(OP_SET, key, value, 30000, true);
}

std::vector<char> StoreClient::get(const std::string& key, int64_t timeout_ms, const std::string& what) {
  std::lock_guard<std::mutex> lock(mu_);
  try {
    return request_locked(OP_GET, key, {}, timeout_ms, true);
  } catch (const DistError& e) {
    throw DistError("waiting for " + what + ": " + e.what());
  }
}

std::string StoreClient::status() {
  std::lock_guard<std::mutex> lock(mu_);
  if (fd_ < 0) connect_locked(500);
  std::vector<char> v = request_locked(OP_STATUS, "", {}, 2000, true);
  return std::string(v.begin(), v.end());
}

void StoreClient::progress(uint32_t seq, int kind) {
  std::lock_guard<std::mutex> lock(mu_);
  if (fd_ < 0) return;
  try {
    request_locked(OP_PROGRESS, std::to_string(seq) + " " + std::to_string(kind), {}, 0, false);
  } catch (const DistError&) {
    // the collective itself will report the lost peer
  }
}

void StoreClient::bye() {
  std::lock_guard<std::mutex> lock(mu_);
  if (fd_ < 0) return;
  try {
    request_locked(OP_BYE, "", {}, 2000, true);
  } catch (const DistError&) {
  }
  close_locked();
}

}  // namespace dist
}  // namespace xft
