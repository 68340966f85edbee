// See pool.h. The pool is created on first use and deliberately never destroyed: sleeping
// workers are torn down with the process, so exit never waits on a join.
#include "pool.h"

#include "denormals.h"

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

namespace st {
namespace {

class Pool {
 public:
  explicit Pool(int threads) {
    for (int i = 1; i < threads; i++) workers_.emplace_back([this] { loop(); });
  }
  int size() const { return static_cast<int>(workers_.size()) + 1; }

  void run(int n, const std::function<void(int)>& f) {
    if (n <= 1 || workers_.empty()) {
      for (int i = 0; i < n; i++) f(i);
      return;
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      job_ = &f;
      ntasks_ = n;
      csr_ = fp_control();  // workers compute with the caller's denormal flags (denormals.h)
      next_.store(0);
      active_ = static_cast<int>(workers_.size());
      generation_++;
    }
    wake_.notify_all();
    work();
    std::unique_lock<std::mutex> lk(mu_);
    done_.wait(lk, [this] { return active_ == 0; });
    job_ = nullptr;
  }

 private:
  void work() {
    for (int i; (i = next_.fetch_add(1)) < ntasks_;) (*job_)(i);
  }
  void loop() {
    unsigned long seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lk(mu_);
        wake_.wait(lk, [&] { return generation_ != seen; });
        seen = generation_;
      }
      set_fp_control(csr_);
      work();
      std::lock_guard<std::mutex> lk(mu_);
      if (--active_ == 0) done_.notify_one();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable wake_, done_;
  const std::function<void(int)>* job_ = nullptr;
  int ntasks_ = 0;
  unsigned csr_ = 0;
  std::atomic<int> next_{0};
  int active_ = 0;
  unsigned long generation_ = 0;
};

Pool& pool() {
  static Pool* p = [] {
    int n = static_cast<int>(std::thread::hardware_concurrency());
    if (const char* env = std::getenv("SIDETRAIN_THREADS")) n = std::atoi(env);
    return new Pool(n < 1 ? 1 : n);
  }();
  return *p;
}

}  // namespace

int pool_threads() { return pool().size(); }
void parallel_for(int n, const std::function<void(int)>& f) { pool().run(n, f); }

void* kept_buffer(int slot, size_t bytes) {
  static void* buf[3] = {};
  static size_t cap[3] = {};
  if (bytes > cap[slot]) {
    std::free(buf[slot]);
    cap[slot] = bytes + bytes / 4;
    buf[slot] = std::aligned_alloc(64, ((cap[slot] + 63) / 64) * 64);
  }
  return buf[slot];
}

}  // namespace st
