// Our kernels' own thread pool: kernel_pool::parallel_for(begin, end, grain, fn(begin, end)), a
// drop-in for at::parallel_for at our call sites (torch's own ops stay on OpenMP).
//
// Why: the engine makes OpenMP wait passively (engine/config.py: libgomp's spinning made steps
// ~60x slower beside any other busy process), so every at::parallel_for woke the other thread
// with a futex, tens of microseconds on a VM whose halted vCPU must be woken; a batch-1 decode
// step makes ~120-180 of them (int4: 11.8-16.6 ms a step passive, 9.6 spinning). Here:
// - the range is cut into the same contiguous parts at::parallel_for gives each thread (results
//   stay bit-identical, each kernel's per-part cache blocking is unchanged), and every part is
//   claimed by an atomic: the calling thread runs one, then any part no worker has claimed yet,
//   so a descheduled worker never makes it wait (under contention an op degrades to one thread's
//   speed, not to a futex wait);
// - a worker, done with its part, spins for a bounded time (set_spin_us) for the next op (the
//   Python between a step's ops is ~5-30 us), then sleeps on a futex; the caller makes the wake
//   syscall only for a worker that sleeps;
// - one op at a time: a call while another thread's op holds the pool, or from inside a part,
//   runs serially on its thread (as at::parallel_for does in a parallel region).
// - a matmul names the weight it reads (Weight): the pool learns which weight each one is
//   followed by (a decode step calls the same projections in the same order every time), and a
//   worker done with its parts reads the next weight into its cache while the caller runs the
//   ops between (norms, attention, Python: ~45 us a layer at batch 1, when the memory bus is
//   otherwise idle), until the next op arrives; the next matmul then finds its first lines in
//   cache rather than in memory.
// Workers: at::get_num_threads() - 1, started on first use, restarted when that number changes
// and in a forked child. No AMX or AVX-512 here (each kernel configures its own tiles per part,
// and tile state is per thread).

#pragma once

#include <cstdint>

namespace kernel_pool {

using PartFn = void (*)(const void* fn, int64_t begin, int64_t end);

// The weight an op reads, whole (none: data null): the key of the pool's read-ahead.
struct Weight {
  const void* data = nullptr;
  int64_t bytes = 0;
};

// fn over [begin, end) in at::parallel_for's parts (or whole, serially); rethrows a part's error.
void run(int64_t begin, int64_t end, int64_t grain, PartFn call, const void* fn, Weight weight = {});

template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f, Weight weight = {}) {
  if (begin >= end) return;
  run(begin, end, grain, [](const void* fn, int64_t b, int64_t e) { (*static_cast<const F*>(fn))(b, e); }, &f, weight);
}

}  // namespace kernel_pool
