/*
The CPU backend's threads: one persistent pool, created at the first parallel call, sized to the
cores this process may run on (sched_getaffinity), or XFT_NUM_THREADS (alias XFT_CPU_THREADS) read
at every call, so a process (a test) can change it between calls; a larger value grows the pool.

A job is `chunks` contiguous ranges of [0, n) that the caller and the workers take in turn from an
atomic counter: which thread runs a range varies, what each range computes does not, so a kernel that
writes disjoint outputs per index gives the same bits on any number of threads. The caller takes
ranges too, and never waits for a worker that has not started: a late worker finds none left.

Waiting: a worker that finished a job polls for the next one for kSpin (200 us) before it sleeps on a
condition variable, and the caller polls for the workers' last ranges the same way; a job's hand-off
then costs about a microsecond instead of a futex wake-up (tens of microseconds on a VM, as long as a
small GEMM), at the price of up to kSpin of busy CPU per thread after the last job of a burst.

Lifetime: the pool is allocated once and never freed (its workers sleep on it until the process ends,
so exit and static destructors never wait for or free under a worker); native threads do not keep the
Node event loop alive. A job submitted while the pool is busy (another thread of the process, e.g. a
worker_thread, or a nested parallel call from inside a job) runs inline on the caller: never a
deadlock, the same results. After fork() the child has none of the workers: a pthread_atfork handler
makes it start a fresh pool (the parent's is abandoned in the child).
*/
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#include "xft_cpu.h"

namespace {

constexpr int kMaxThreads = 64;
// below this many flops per thread, waking a worker costs more than it saves
constexpr double kWorkPerThread = 2e6;
// ranges per thread of a parallel_for
constexpr size_t kChunksPerThread = 4;

int env_threads() {
  for (const char* name : {"XFT_NUM_THREADS", "XFT_CPU_THREADS"})
    if (const char* v = getenv(name))
      if (*v) return atoi(v);
  return 0;
}

int hardware_threads() {
  static const int n = [] {
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
#endif
    unsigned h = std::thread::hardware_concurrency();
    return h ? (int)h : 1;
  }();
  return n;
}

thread_local bool t_in_job = false;  // this thread is running a range of a job

// How long a thread busy-waits before it sleeps: a worker for the next job after finishing one, the
// caller for the workers' last ranges. Waking a sleeping thread costs a futex call and, on a VM, an
// inter-processor interrupt: tens of microseconds, as long as a whole small GEMM. The GEMMs of a
// training step follow each other within microseconds, so a worker that waits this long is usually
// awake for the next one; an idle process stops spinning after it.
constexpr auto kSpin = std::chrono::microseconds(200);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// true as soon as done() holds, false once kSpin has passed without it
template <typename Done>
bool spin_until(Done done) {
  const auto until = std::chrono::steady_clock::now() + kSpin;
  for (unsigned i = 1;; i++) {
    if (done()) return true;
    cpu_relax();
    if ((i & 63) == 0 && std::chrono::steady_clock::now() > until) return done();
  }
}

class Pool {
 public:
  // runs fn over `chunks` ranges of [0, n) on up to `threads` threads (the caller is one of them)
  void run(size_t n, size_t chunks, int threads, const std::function<void(size_t, size_t)>& fn) {
    if (t_in_job) {  // a parallel call from inside a job: inline
      fn(0, n);
      return;
    }
    std::unique_lock<std::mutex> busy(submit_, std::try_to_lock);
    if (!busy.owns_lock()) {
      fn(0, n);
      return;
    }
    const int helpers = grow(threads - 1);
    Job job{&fn, n, chunks};
    {
      std::lock_guard<std::mutex> g(m_);
      job_ = job;
      next_.store(0, std::memory_order_relaxed);
      pending_.store(chunks, std::memory_order_relaxed);
      helpers_ = helpers;
      generation_.store(generation_.load(std::memory_order_relaxed) + 1, std::memory_order_release);
      if (sleeping_) wake_.notify_all();  // spinning workers see the generation without a call
    }
    work(job);
    // the workers' last ranges: spin, then sleep; a worker that has not started by now finds no range
    // left (it never holds the caller back)
    auto finished = [&] { return pending_.load(std::memory_order_acquire) == 0 && active_.load(std::memory_order_acquire) == 0; };
    spin_until(finished);
    std::unique_lock<std::mutex> g(m_);
    waiting_ = true;
    done_.wait(g, finished);
    waiting_ = false;
    job_ = Job{};
  }

 private:
  struct Job {
    const std::function<void(size_t, size_t)>* fn = nullptr;
    size_t n = 0, chunks = 0;
  };

  // take ranges of the job until none is left
  void work(const Job& job) {
    t_in_job = true;
    struct Leave {
      ~Leave() { t_in_job = false; }
    } leave;
    for (;;) {
      size_t c = next_.fetch_add(1, std::memory_order_relaxed);
      if (c >= job.chunks) return;
      size_t b = job.n * c / job.chunks, e = job.n * (c + 1) / job.chunks;
      if (b < e) (*job.fn)(b, e);
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) notify_done();
    }
  }

  void notify_done() {
    std::lock_guard<std::mutex> g(m_);
    if (waiting_) done_.notify_all();
  }

  void worker(int index) {
    uint64_t seen = 0;
    for (;;) {
      auto fresh = [&] { return generation_.load(std::memory_order_acquire) != seen; };
      if (!spin_until(fresh)) {
        std::unique_lock<std::mutex> g(m_);
        sleeping_++;
        wake_.wait(g, fresh);
        sleeping_--;
      }
      std::unique_lock<std::mutex> g(m_);
      seen = generation_.load(std::memory_order_relaxed);
      // a job that wants fewer threads, or one already finished (its submitter clears job_ under the
      // lock once active_ is 0, so a job seen here under the lock is the current one)
      if (index >= helpers_ || !job_.fn) continue;
      const Job job = job_;
      active_.fetch_add(1, std::memory_order_relaxed);
      g.unlock();
      work(job);
      if (active_.fetch_sub(1, std::memory_order_acq_rel) == 1) notify_done();
    }
  }

  // up to `workers` workers; returns how many there are (a thread the system refuses is done without)
  int grow(int workers) {
    while ((int)workers_.size() < workers) {
      int index = (int)workers_.size();
      try {
        std::thread th([this, index] { worker(index); });
        th.detach();
      } catch (const std::system_error&) {
        break;
      }
      workers_.push_back(index);
    }
    return std::min(workers, (int)workers_.size());
  }

  std::mutex submit_;  // one job at a time
  std::mutex m_;       // guards job_, helpers_, sleeping_, waiting_ and the workers' entry into a job
  std::condition_variable wake_, done_;
  std::vector<int> workers_;  // the started workers' indices (detached threads)
  Job job_;
  // the counters the threads poll, each on its own cache line (no false sharing with the lock)
  alignas(64) std::atomic<size_t> next_{0};
  alignas(64) std::atomic<size_t> pending_{0};
  alignas(64) std::atomic<int> active_{0};
  alignas(64) std::atomic<uint64_t> generation_{0};
  int helpers_ = 0, sleeping_ = 0;
  bool waiting_ = false;
};

std::atomic<Pool*> g_pool{nullptr};
std::once_flag g_atfork_once;

Pool& pool() {
  std::call_once(g_atfork_once, [] {
    // the child of a fork has none of the workers: it starts a new pool (the old one is abandoned)
    pthread_atfork(nullptr, nullptr, [] { g_pool.store(nullptr); });
  });
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (!p) {
    Pool* fresh = new Pool();  // never freed: see the comment at the top
    if (g_pool.compare_exchange_strong(p, fresh)) p = fresh;
    else delete fresh;
  }
  return *p;
}

}  // namespace

namespace xft_cpu {

int threads() {
  int t = env_threads();
  if (t <= 0) t = hardware_threads();
  return t > kMaxThreads ? kMaxThreads : t;
}

int threads_for(double work) {
  const int t = threads();
  if (work < 2 * kWorkPerThread) return 1;
  return (double)t * kWorkPerThread > work ? (int)(work / kWorkPerThread) : t;
}

void parallel_for(size_t n, double work, const std::function<void(size_t, size_t)>& fn) {
  size_t t = (size_t)threads_for(work);
  if (t > n) t = n;
  if (t <= 1) {
    if (n) fn(0, n);
    return;
  }
  // a few ranges per thread: a thread that starts late (woken, or preempted on a busy machine) leaves
  // its share to the others instead of holding the caller back
  pool().run(n, std::min(n, t * kChunksPerThread), (int)t, fn);
}

void parallel_tasks(size_t tasks, double work, const std::function<void(size_t)>& fn) {
  size_t t = (size_t)threads_for(work);
  if (t > tasks) t = tasks;
  if (t <= 1) {
    for (size_t i = 0; i < tasks; i++) fn(i);
    return;
  }
  pool().run(tasks, tasks, (int)t, [&](size_t b, size_t e) {
    for (size_t i = b; i < e; i++) fn(i);
  });
}

}  // namespace xft_cpu
