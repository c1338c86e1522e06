// kernel_pool (thread_pool.h): persistent workers, parts claimed by an atomic, spin-then-futex
// waiting, and workers reading the next weight ahead between ops. Registered ops: set_kernel_pool_spin_us /
// kernel_pool_spin_us / set_kernel_pool_enabled / set_kernel_pool_read_ahead (benchmarks),
// kernel_pool_stats and kernel_pool_hold_workers (tests).

#include "thread_pool.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <c10/util/ParallelGuard.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace kernel_pool {
namespace {

// How long a worker spins for the next op before it sleeps. The gaps between our ops in a decode
// step (int4, batch 1, torch.profiler on the shared 2-vCPU VM, so on the long side): median 18 us,
// 95% under 50 us, 98% under 100 us; between two steps (sampling, scheduling) ~0.5-1 ms. 50 us
// covers a step's gaps and sleeps between steps. Int4 batch-1 steps, bench/profile_step.py
// --ab-pool-spin 200,50 3 (interleaved in one process, load ~1.7): spin 200 us 13.1 ms, 50 us 11.6,
// 0 us 14.7, OpenMP (passive) 16.9, one thread 19.5. At load 8-15 spin 0 was as fast as 50 or
// faster, and 200 the slowest of the three: a worker that has spun has used up its share of the
// core, is preempted more often, and a part it has claimed then holds up the caller.
constexpr int64_t kDefaultSpinUs = 50;
constexpr int64_t kMaxSpinUs = 1'000'000;
// How long the caller spins for a part a worker has claimed and is running (it started about
// when the caller's own did, and takes about as long) before it sleeps: sleeping sooner leaves its
// core idle, so that a worker preempted mid-part can be moved onto it. While it spins it yields
// every kYieldEveryNs: a worker preempted on its core runs instead.
constexpr int64_t kCallerSpinNs = 100'000;
constexpr int64_t kYieldEveryNs = 20'000;
// A worker that finds it was off its core while it spun (two looks at the clock, ~3 us of pauses
// apart, more than kPreemptedNs apart) or during a part (wall time past its CPU time by that much,
// checked on one op in kCheckEvery) shares its core with other work: it sleeps right after its
// parts for the next kCooldownOps ops (about two batch-1 steps), then tries spinning again.
// Measured on the shared 2-vCPU VM (load 8-12, bench/profile_step.py --ab-pool-spin): workers
// that spun regardless ran 4-33% of the parts, workers that slept after each op 54-63% (a woken
// sleeper is scheduled ahead of a thread that used its share spinning), and the spinning stole
// the core from the caller and from torch's own OpenMP worker.
constexpr int64_t kPreemptedNs = 30'000;
constexpr int64_t kCooldownOps = 256;
constexpr int64_t kCheckEvery = 8;
// Read-ahead (thread_pool.h): a worker reads the next weight in chunks of this many bytes per
// part (one look at the epoch per chunk of every part: ~0.5 us of reading), at most
// kAheadMaxBytes of it in all (the worker's 1-2 MiB L2; what it evicts lands in L3 on Zen, and
// the gaps between a layer's ops are too short for more), in as many parts as the pool has
// threads: a part's first lines first, each thread's share of the next op is early in cache.
// Only the next weight. Going on along the learned chain in a long gap (8 MiB: the next step's
// first layers, read while the engine samples and schedules between two decode steps) pushed the
// engine's own data out of cache there. In one process on a 2-vCPU Zen 5 (bench/RESULTS.md
// 2026-12-04 23:33), the int4 batch-1 step took 0.96x the time without it, and 0.88x together with
// the few-row loops' non-temporal prefetches (quant_ops.cpp). bfloat16 at 1 and 64 rows and int4
// at 16 and 64 were even or better. float32 batch 1 lost 1-2%.
// The weights followed are remembered in kNextSlots slots (a 30-layer model has 121 matmuls).
constexpr int64_t kAheadChunk = 4096;
constexpr int64_t kAheadMaxBytes = 2 << 20;
constexpr int64_t kNextSlots = 2048;
constexpr int64_t kProbeSlots = 8;

std::atomic<int64_t> spin_us{kDefaultSpinUs};
std::atomic<bool> enabled{true};        // false: at::parallel_for (OpenMP), for A/B benchmarks
std::atomic<bool> hold_workers{false};  // tests: a worker that sees an op waits while this is set
std::atomic<bool> read_ahead{true};     // false: workers read no weight ahead (A/B benchmarks)

struct Stats {
  alignas(64) std::atomic<int64_t> pooled{0};         // ops split into parts in the pool
  alignas(64) std::atomic<int64_t> serial_busy{0};    // ops run serially: the pool held by another thread
  alignas(64) std::atomic<int64_t> caller_parts{0};   // parts run by the calling thread
  alignas(64) std::atomic<int64_t> worker_parts{0};   // parts run by workers
  alignas(64) std::atomic<int64_t> worker_sleeps{0};  // times a worker went to sleep on the futex
  alignas(64) std::atomic<int64_t> wakes{0};          // wake syscalls made by callers
  alignas(64) std::atomic<int64_t> worker_moves{0};      // times a worker moved off the caller's core
  alignas(64) std::atomic<int64_t> worker_preempted{0};  // times a worker found itself preempted (cooldown)
  alignas(64) std::atomic<int64_t> ahead_bytes{0};       // weight bytes workers read ahead
};
Stats stats;

thread_local bool in_part = false;  // this thread runs a part (or a serial op): nested calls are serial

long futex(std::atomic<uint32_t>* word, int op, uint32_t value) {
  return syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), op | FUTEX_PRIVATE_FLAG, value, nullptr, nullptr, 0);
}

int64_t thread_cpu_ns() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec * 1'000'000'000LL + t.tv_nsec;
}

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Spins (pause) until done() or budget_ns has passed, yielding every kYieldEveryNs if `yield`;
// *preempted: whether it stopped early because the thread had been off its core (when given).
// done()'s last value.
template <class Done>
bool spin_until(const Done& done, int64_t budget_ns, bool yield, bool* preempted) {
  if (budget_ns <= 0) return done();
  const int64_t start = now_ns();
  int64_t yielded = start, last = start;
  for (uint32_t i = 1;; ++i) {
    if (done()) return true;
    _mm_pause();
    if (i % 64 == 0) {
      const int64_t t = now_ns();
      if (t - start >= budget_ns) return done();
      if (preempted && t - last >= kPreemptedNs) {
        *preempted = true;
        return done();
      }
      last = t;
      if (yield && t - yielded >= kYieldEveryNs) {
        sched_yield();
        yielded = last = now_ns();
      }
    }
  }
}

void run_serially(int64_t begin, int64_t end, PartFn call, const void* fn) {
  c10::ParallelGuard guard(true);
  const bool outer = in_part;
  in_part = true;
  try {
    call(fn, begin, end);
  } catch (...) {
    in_part = outer;
    throw;
  }
  in_part = outer;
}

class Pool {
 public:
  explicit Pool(int64_t workers) : threads_(workers + 1) {
    for (int64_t i = 0; i < workers; ++i) workers_.emplace_back([this, i] { work(i); });
  }

  const int64_t threads_;
  std::atomic<bool> busy{false};  // an op (or a restart) holds the pool

  // One op on the pool: the caller holds `busy`.
  void run(int64_t begin, int64_t end, int64_t grain, PartFn call, const void* fn, Weight weight) {
    if (weight.data) follow(weight);
    // at::parallel_for's parts (ATen/ParallelOpenMP.h): min(threads, ceil(n / grain)) chunks of
    // ceil(n / that) iterations; n > max(grain, 1) here, so there are at least two.
    const int64_t n = end - begin;
    int64_t num = threads_;
    if (grain > 0) num = std::min(num, (n + grain - 1) / grain);
    const int64_t chunk = (n + num - 1) / num, parts = (n + chunk - 1) / chunk;
    call_ = call;
    fn_ = fn;
    begin_ = begin;
    end_ = end;
    chunk_ = chunk;
    error_ = nullptr;
    error_set_.clear();
    done_.store(0, std::memory_order_relaxed);
    const uint32_t epoch = epoch_.load(std::memory_order_relaxed) + 1;
    // The op's fields above are read only by a thread whose claim() succeeded on this word.
    claim_.store(static_cast<uint64_t>(epoch) << 32 | static_cast<uint64_t>(parts) << 16, std::memory_order_release);
    epoch_.store(epoch, std::memory_order_seq_cst);
    // One wake per sleep: a woken worker that has not yet run is not woken again by the next ops.
    if (sleepers_.exchange(0, std::memory_order_seq_cst) > 0) {
      futex(&epoch_, FUTEX_WAKE, static_cast<uint32_t>(std::min<int64_t>(parts - 1, INT_MAX)));
      stats.wakes.fetch_add(1, std::memory_order_relaxed);
    }
    stats.pooled.fetch_add(1, std::memory_order_relaxed);
    caller_cpu_.store(sched_getcpu(), std::memory_order_relaxed);
    for (int64_t p; (p = claim(epoch)) >= 0;) run_part(p, stats.caller_parts);
    const uint32_t total = static_cast<uint32_t>(parts);
    auto finished = [&] { return done_.load(std::memory_order_acquire) == total; };
    if (!spin_until(finished, kCallerSpinNs, true, nullptr)) {
      caller_sleeping_.store(1, std::memory_order_seq_cst);
      for (uint32_t d; (d = done_.load(std::memory_order_seq_cst)) != total;) futex(&done_, FUTEX_WAIT, d);
      caller_sleeping_.store(0, std::memory_order_relaxed);
    }
    if (error_) std::rethrow_exception(error_);
  }

  // Stops and joins the workers (the caller holds `busy`, and keeps it: the pool is retired).
  void stop() {
    stop_.store(true, std::memory_order_seq_cst);
    epoch_.fetch_add(1, std::memory_order_seq_cst);
    futex(&epoch_, FUTEX_WAKE, INT_MAX);
    for (std::thread& t : workers_) t.join();
  }

 private:
  // Slot of weight `key`: the weight whose op came after key's last time. Written and read by
  // callers only, under `busy`.
  struct Next {
    const void* key = nullptr;
    const void* data = nullptr;
    int64_t bytes = 0;
  };

  // A worker's read-ahead: the weight read ahead after op generation `gen`, and how far it got (per part).
  struct Ahead {
    uint64_t gen = 0;
    const char* data = nullptr;
    int64_t bytes = 0, offset = 0;
  };

  // The weight read ahead after this op: the one that followed `weight` last time (learned here:
  // `weight` follows the last weighted op's). An op without a weight (attention, a norm) keeps
  // the read-ahead of the matmul before it.
  void follow(Weight weight) {
    if (last_weight_ && last_weight_ != weight.data) {
      Next* s = slot(last_weight_);
      *s = {last_weight_, weight.data, weight.bytes};
    }
    last_weight_ = weight.data;
    const Weight ahead = next_after(weight.data);
    ahead_data_.store(ahead.data, std::memory_order_relaxed);
    ahead_bytes_.store(ahead.bytes, std::memory_order_relaxed);
    ahead_gen_.fetch_add(1, std::memory_order_relaxed);
  }

  // The slot of weight `key`: its own or a free one among kProbeSlots from its hash (open
  // addressing on its address), else the first of them, taken over. Bounded, so a process that
  // keeps making new weights (reloads, tests, benchmarks) neither fills the table for good nor
  // scans all of it on every op; a slot taken over only misdirects one read-ahead.
  Next* slot(const void* key) {
    const uint64_t hash = ((reinterpret_cast<uintptr_t>(key) >> 6) * 0x9E3779B97F4A7C15ull) >> 32;
    for (int64_t i = 0; i < kProbeSlots; ++i) {
      Next& s = next_of_[(hash + i) % kNextSlots];
      if (s.key == key || s.key == nullptr) return &s;
    }
    return &next_of_[hash % kNextSlots];
  }

  // The weight that came after `key`'s op last time (none: data null).
  Weight next_after(const void* key) {
    const Next* s = slot(key);
    if (s->key != key) return {};
    return {s->data, s->bytes};
  }

  // Worker `worker` between ops: its share of the read-ahead weights into its cache, until op
  // `seen` is no longer the latest. A weight is cut into threads_ parts as its op will be, and
  // worker w reads parts w, w + workers, ... (one worker: all of them), a chunk of each in turn,
  // from where it left off (`a`). Prefetches: never a fault, even for a weight freed since.
  void read_weight_ahead(uint32_t seen, int64_t worker, Ahead& a) {
    const uint64_t g = ahead_gen_.load(std::memory_order_relaxed);
    if (g != a.gen)
      a = {g, static_cast<const char*>(ahead_data_.load(std::memory_order_relaxed)),
           ahead_bytes_.load(std::memory_order_relaxed), 0};
    int64_t read = 0;
    const int64_t part = (a.bytes / threads_ + 63) & ~int64_t{63};
    const int64_t limit = std::min(part, kAheadMaxBytes / threads_);  // 0: a weight of under threads_ bytes
    while (a.data && a.offset < limit && epoch_.load(std::memory_order_relaxed) == seen) {
      for (int64_t q = worker; q < threads_; q += threads_ - 1) {
        const int64_t end = std::min({a.offset + kAheadChunk, limit, a.bytes - q * part});
        for (int64_t b = a.offset; b < end; b += 64) _mm_prefetch(a.data + q * part + b, _MM_HINT_T1);
        read += std::max<int64_t>(0, end - a.offset);
      }
      a.offset += kAheadChunk;
    }
    if (read) stats.ahead_bytes.fetch_add(read, std::memory_order_relaxed);
  }

  // The next unclaimed part of op `epoch`, or -1 when none is left or that op is over. The word:
  // epoch << 32 | parts << 16 | next part.
  int64_t claim(uint32_t epoch) {
    uint64_t word = claim_.load(std::memory_order_acquire);
    while (true) {
      const uint64_t next = word & 0xffff, parts = (word >> 16) & 0xffff;
      if ((word >> 32) != epoch || next >= parts) return -1;
      if (claim_.compare_exchange_weak(word, word + 1, std::memory_order_acq_rel, std::memory_order_acquire))
        return static_cast<int64_t>(next);
    }
  }

  // Part p of the current op; counted in `parts` before the caller can see it done.
  void run_part(int64_t p, std::atomic<int64_t>& parts) {
    const int64_t b = begin_ + p * chunk_, e = std::min(end_, b + chunk_);
    try {
      c10::ParallelGuard guard(true);  // an at::parallel_for inside a part runs serially
      in_part = true;
      call_(fn_, b, e);
    } catch (...) {
      if (!error_set_.test_and_set()) error_ = std::current_exception();
    }
    in_part = false;
    parts.fetch_add(1, std::memory_order_relaxed);
    done_.fetch_add(1, std::memory_order_seq_cst);
    if (caller_sleeping_.load(std::memory_order_seq_cst)) futex(&done_, FUTEX_WAKE, 1);
  }

  // Moves this worker off `core` (the caller's): the scheduler wakes a worker on its waker's core
  // when the others are busy, and keeps it there, where its parts ran one after the caller's
  // instead of beside them (measured on the loaded 2-vCPU VM: 209 of 209 and 350 of 350 worker
  // parts of int4_mm_rows ran on the caller's core; the op took one thread's time). Allowing every
  // core but this one migrates the thread now; allowing them all again leaves it where it went.
  static void move_off(int core) {
    cpu_set_t allowed;
    if (sched_getaffinity(0, sizeof(allowed), &allowed) != 0 || !CPU_ISSET(core, &allowed) || CPU_COUNT(&allowed) < 2) return;
    CPU_CLR(core, &allowed);
    if (sched_setaffinity(0, sizeof(allowed), &allowed) != 0) return;
    CPU_SET(core, &allowed);
    sched_setaffinity(0, sizeof(allowed), &allowed);
    stats.worker_moves.fetch_add(1, std::memory_order_relaxed);
  }

  void work(int64_t worker) {
    uint32_t seen = 0;  // the epoch before the first op (workers start in the constructor)
    int64_t cooldown = 0;  // ops left before this worker spins again (it was preempted)
    int64_t ops = 0;
    Ahead ahead;  // the read-ahead this worker is on
    while (true) {
      const int64_t budget = cooldown > 0 ? 0 : spin_us.load(std::memory_order_relaxed) * 1000;
      cooldown = std::max<int64_t>(0, cooldown - 1);
      bool preempted = false;
      spin_until([&] { return epoch_.load(std::memory_order_acquire) != seen; }, budget, false, &preempted);
      if (preempted) {
        cooldown = kCooldownOps;
        stats.worker_preempted.fetch_add(1, std::memory_order_relaxed);
      }
      // Announced in sleepers_ before the last look at the epoch (the caller zeroes it when it
      // wakes the sleepers; a count left over from a look that found a new op costs one spare wake).
      while (epoch_.load(std::memory_order_acquire) == seen) {
        sleepers_.fetch_add(1, std::memory_order_seq_cst);
        if (epoch_.load(std::memory_order_seq_cst) == seen) {
          stats.worker_sleeps.fetch_add(1, std::memory_order_relaxed);
          futex(&epoch_, FUTEX_WAIT, seen);
        }
      }
      if (stop_.load(std::memory_order_acquire)) return;
      seen = epoch_.load(std::memory_order_acquire);
      while (hold_workers.load(std::memory_order_seq_cst)) std::this_thread::sleep_for(std::chrono::microseconds(100));
      // One op in kCheckEvery while spinning: was this worker off its core during its part? (A
      // part it has claimed and not finished holds up the caller.) Thread CPU time is a syscall.
      const bool check = spin_us.load(std::memory_order_relaxed) > 0 && cooldown == 0 && ++ops % kCheckEvery == 0;
      const int core = sched_getcpu();
      if (core >= 0 && core == caller_cpu_.load(std::memory_order_relaxed)) move_off(core);
      const int64_t wall = check ? now_ns() : 0, cpu = check ? thread_cpu_ns() : 0;
      int64_t claimed = 0;
      for (int64_t p; (p = claim(seen)) >= 0; ++claimed) run_part(p, stats.worker_parts);
      if (check && claimed > 0 && (now_ns() - wall) - (thread_cpu_ns() - cpu) >= kPreemptedNs) {
        cooldown = kCooldownOps;
        stats.worker_preempted.fetch_add(1, std::memory_order_relaxed);
      }
      // In the time it would spin (a worker that shares its core sleeps instead, reading nothing).
      if (cooldown == 0 && spin_us.load(std::memory_order_relaxed) > 0 && read_ahead.load(std::memory_order_relaxed))
        read_weight_ahead(seen, worker, ahead);
    }
  }

  // The current op, written by its caller before it publishes the op in claim_.
  PartFn call_ = nullptr;
  const void* fn_ = nullptr;
  int64_t begin_ = 0, end_ = 0, chunk_ = 1;
  std::exception_ptr error_;
  std::atomic_flag error_set_ = ATOMIC_FLAG_INIT;

  // Read-ahead: the caller's record of which weight followed which (touched only under `busy`),
  // and the weight workers read ahead now (its generation: bumped per weighted op).
  std::unique_ptr<Next[]> next_of_{new Next[kNextSlots]};
  const void* last_weight_ = nullptr;
  alignas(64) std::atomic<const void*> ahead_data_{nullptr};
  std::atomic<int64_t> ahead_bytes_{0};
  std::atomic<uint64_t> ahead_gen_{0};

  alignas(64) std::atomic<uint64_t> claim_{0};
  alignas(64) std::atomic<uint32_t> epoch_{0};  // bumped per op: the word workers sleep on
  std::atomic<int> caller_cpu_{-1};  // the core the current op's caller started on
  std::atomic<uint32_t> sleepers_{0};  // workers that went to sleep since the last wake
  std::atomic<bool> stop_{false};
  alignas(64) std::atomic<uint32_t> done_{0};  // parts finished: the word a waiting caller sleeps on
  std::atomic<uint32_t> caller_sleeping_{0};
  std::vector<std::thread> workers_;
};

std::atomic<Pool*> current{nullptr};
std::mutex restart_mutex;

// A forked child has none of the parent's workers: it starts its own pool (the parent's object is
// left as it was, never used).
void forget_pool_in_child() { current.store(nullptr, std::memory_order_relaxed); }

// The pool for `threads` threads (workers started on first use); nullptr when a pool of another
// size is busy (that op runs serially; the restart happens on a later call). A replaced pool is
// stopped and left allocated, busy: a thread that loaded its address just before finds it busy.
Pool* pool_for(int64_t threads) {
  Pool* pool = current.load(std::memory_order_acquire);
  if (pool && pool->threads_ == threads) return pool;
  std::lock_guard<std::mutex> lock(restart_mutex);
  static const bool registered = pthread_atfork(nullptr, nullptr, forget_pool_in_child) == 0;
  (void)registered;
  pool = current.load(std::memory_order_acquire);
  if (pool && pool->threads_ == threads) return pool;
  if (pool) {
    if (pool->busy.exchange(true, std::memory_order_acquire)) return nullptr;
    pool->stop();
  }
  pool = new Pool(threads - 1);
  current.store(pool, std::memory_order_release);
  return pool;
}

}  // namespace

void run(int64_t begin, int64_t end, int64_t grain, PartFn call, const void* fn, Weight weight) {
  if (begin >= end) return;
  if (!enabled.load(std::memory_order_relaxed)) {
    at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { call(fn, b, e); });
    return;
  }
  at::internal::lazy_init_num_threads();
  const int64_t n = end - begin, threads = at::get_num_threads();
  if (n <= grain || n <= 1 || threads <= 1 || in_part || at::in_parallel_region()) {
    run_serially(begin, end, call, fn);
    return;
  }
  Pool* pool = pool_for(threads);
  if (!pool || pool->busy.exchange(true, std::memory_order_acquire)) {
    stats.serial_busy.fetch_add(1, std::memory_order_relaxed);
    run_serially(begin, end, call, fn);
    return;
  }
  try {
    pool->run(begin, end, grain, call, fn, weight);
  } catch (...) {
    pool->busy.store(false, std::memory_order_release);
    throw;
  }
  pool->busy.store(false, std::memory_order_release);
}

}  // namespace kernel_pool

TORCH_LIBRARY_FRAGMENT(bento_llm, m) {
  using namespace kernel_pool;
  m.def("set_kernel_pool_spin_us(int us) -> ()", [](int64_t us) {
    TORCH_CHECK(us >= 0, "set_kernel_pool_spin_us: us must be >= 0 (0: workers sleep after every part), got ", us);
    // Bounded: a worker spinning for seconds between ops would hold a core the rest of the machine needs.
    TORCH_CHECK(us <= kMaxSpinUs, "set_kernel_pool_spin_us: us must be <= ", kMaxSpinUs, " (1 s), got ", us);
    spin_us.store(us, std::memory_order_relaxed);
  });
  // Benchmarks: false runs our kernels' regions on torch's OpenMP threads, as before the pool.
  m.def("set_kernel_pool_enabled(bool enabled) -> ()", [](bool on) { enabled.store(on, std::memory_order_relaxed); });
  // Benchmarks: false, workers read no weight ahead between ops.
  m.def("set_kernel_pool_read_ahead(bool on) -> ()", [](bool on) { read_ahead.store(on, std::memory_order_relaxed); });
  m.def("kernel_pool_spin_us() -> int", [] { return spin_us.load(std::memory_order_relaxed); });
  // Tests: workers that see a new op wait (sleeping) while held, as a descheduled worker would.
  m.def("kernel_pool_hold_workers(bool held) -> ()", [](bool held) { hold_workers.store(held, std::memory_order_seq_cst); });
  // [pooled ops, ops run serially because the pool was busy, caller parts, worker parts, worker
  // sleeps, wake syscalls, times a worker found itself preempted (and stopped spinning for a
  // while), times a worker moved off the caller's core, weight bytes workers read ahead],
  // counted since the process started.
  m.def("kernel_pool_stats() -> int[]", [] {
    return std::vector<int64_t>{stats.pooled.load(),       stats.serial_busy.load(), stats.caller_parts.load(),
                                stats.worker_parts.load(), stats.worker_sleeps.load(), stats.wakes.load(),
                                stats.worker_preempted.load(), stats.worker_moves.load(), stats.ahead_bytes.load()};
  });
}
