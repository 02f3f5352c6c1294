// The decode step's own thread pool: workers that spin between the step's phases instead of sleeping.
//
// Why not OpenMP: a step meets about 180 barriers (six per layer), so it is fast only while the threads
// wait for each other by spinning. libgomp spins only while it manages no more threads than the CPU has
// cores; once a second thread has run an OpenMP region (a server loads the model on its main thread and
// decodes on a scheduler thread), every barrier sleeps in the kernel and a SmolLM2 step took 6.5 ms
// instead of 2.8 (docs/benchmarks-history.md). These workers spin for up to kSpinSeconds after each job
// and then sleep on a futex (std::atomic::wait), so an idle server costs no CPU.
#pragma once

#include <immintrin.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace pocketlm {

class SpinPool {
 public:
  // One pool per process, with `threads - 1` workers (the caller is thread 0), made on first use.
  static SpinPool& get(int threads) {
    static SpinPool pool(threads);
    return pool;
  }

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // fn(t, n) on threads t = 0..n-1 (the caller runs t = 0); returns when every thread is done. Calls from
  // several threads (two models served side by side) take turns. In a child forked after the pool was
  // made, which has no workers, fn runs on the caller alone.
  void run(int n, const std::function<void(int, int)>& fn) {
    if (getpid() != pid_) {  // no workers here; and the mutex may have been copied locked: leave it alone
      active_ = 1;
      fn(0, 1);
      return;
    }
    std::lock_guard<std::mutex> turn(running_);
    n = std::max(1, std::min(n, size()));
    if (n == 1) {  // one thread wanted: the workers are not woken (they would spin for nothing)
      active_ = 1;
      fn(0, 1);
      return;
    }
    job_ = &fn;
    active_ = n;
    arrived_.store(0, std::memory_order_relaxed);
    finished_.store(0, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
    generation_.notify_all();
    fn(0, n);
    while (finished_.load(std::memory_order_acquire) != static_cast<int>(workers_.size())) _mm_pause();
  }

  // Every one of the job's n threads waits here until all have arrived.
  void barrier() {
    const uint64_t phase = phase_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == active_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      phase_.fetch_add(1, std::memory_order_release);
    } else {
      while (phase_.load(std::memory_order_acquire) == phase) _mm_pause();
    }
  }

  ~SpinPool() {
    stop_.store(true);
    generation_.fetch_add(1, std::memory_order_release);
    generation_.notify_all();
    for (std::thread& w : workers_) w.join();
  }

 private:
  static constexpr double kSpinSeconds = 0.002;

  explicit SpinPool(int threads) : pid_(getpid()) {
    for (int t = 1; t < threads; ++t) workers_.emplace_back([this, t] { work(t); });
  }

  void work(int t) {
    uint64_t seen = 0;
    for (;;) {
      seen = wait_for_job(seen);
      if (stop_.load()) return;
      if (t < active_) (*job_)(t, active_);
      finished_.fetch_add(1, std::memory_order_acq_rel);
    }
  }

  uint64_t wait_for_job(uint64_t seen) {
    const auto start = std::chrono::steady_clock::now();
    for (uint32_t i = 1;; ++i) {
      const uint64_t now = generation_.load(std::memory_order_acquire);
      if (now != seen) return now;
      _mm_pause();
      if (i % 1024 == 0 && std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() > kSpinSeconds) {
        generation_.wait(seen, std::memory_order_acquire);  // sleeps until run() bumps the generation
      }
    }
  }

  const pid_t pid_;
  std::mutex running_;
  std::vector<std::thread> workers_;
  const std::function<void(int, int)>* job_ = nullptr;
  std::atomic<uint64_t> generation_{0}, phase_{0};
  std::atomic<int> arrived_{0}, finished_{0};
  std::atomic<bool> stop_{false};
  int active_ = 1;
};

// One thread's part of a job: its share of a loop (OpenMP's static schedule) and the job's barrier.
struct Team {
  SpinPool& pool;
  int t, n;

  int64_t begin(int64_t total) const { return total * t / n; }
  int64_t end(int64_t total) const { return total * (t + 1) / n; }
  void barrier() const { pool.barrier(); }
};

}  // namespace pocketlm
