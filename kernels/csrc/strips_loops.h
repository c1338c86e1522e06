// The loop nest the two vector kernels on column strips share: bf16_linear.cpp (vdpbf16ps on
// amx_linear_pack's bfloat16 strips) and f32_linear.cpp (FMAs on float32 strips). Rows go in
// register blocks of up to kBlockRows, strips in groups of Kernel::strips_for(rows, streaming), one
// float32 accumulator register per (row, strip) across all of K (K stays whole: a block's input
// rows stay in L1/L2 across a chunk of strips). A call of at most kStreamingRows rows streams each
// thread's share of the weight once, without software prefetch, where the CPU's rule says so
// (cpu_features::few_rows_stream_weights; the kernels' comments give the measurements); otherwise a
// chunk of strips (kChunkBytes) stays in L2 while every row block passes over it, each strip's next
// lines prefetched by the kernel. Both threads split the strips (kernel_pool::parallel_for); a small
// weight at few rows runs on the calling thread.
//
// A Kernel is a struct with
//   using Problem = strips_loops::Problem<its element types>;
//   static constexpr int strips_for(int rows, bool streaming);  // strips per register block
//   static int64_t strip_bytes(const Problem&);
//   template <int R, int NS, bool Prefetch> static void block(const Problem&, int64_t r0, int64_t t);
//     // rows [r0, r0 + R) against strips [t, t + NS), their outputs stored

#pragma once

#include <algorithm>
#include <cstdint>

#include "thread_pool.h"

namespace strips_loops {

constexpr int kBlockRows = 8;               // rows of one register block
constexpr int kStreamingRows = 6;           // calls up to this many rows may stream (see above)
constexpr int64_t kChunkBytes = 512 << 10;  // weight bytes per chunk of strips that stays in L2
// At most one row block with a weight under this: the calling thread alone (amx_linear's rule).
constexpr int64_t kSerialLinearBytes = 256 << 10;

// One call: x [rows, k] (rows lda elements apart) times the strips of an [n_total, k] weight, plus
// bias (or none), into y [rows, n_total].
// first_strip: the strip w starts at (a chunk of a weight converted per call holds strips from
// there on; a whole weight's w starts at strip 0).
template <class In, class Out>
struct Problem {
  const In* a;
  int64_t lda, rows;
  const In* w;
  int64_t k, n_total;
  const Out* bias;
  Out* y;
  int64_t first_strip = 0;
};

// block<R, NS> on the first `count` (1..NS) strips from t: the last group of a thread's strips.
template <class Kernel, int R, int NS, bool Prefetch>
void first_strips(int64_t count, const typename Kernel::Problem& p, int64_t r0, int64_t t) {
  if constexpr (NS > 1)
    if (count < NS) return first_strips<Kernel, R, NS - 1, Prefetch>(count, p, r0, t);
  Kernel::template block<R, NS, Prefetch>(p, r0, t);
}

// Rows [r0, r0 + R) against strips [t0, t1), strips_for(R, Streaming) at a time (the last group
// fewer); Streaming: a call of at most kStreamingRows rows (no software prefetch).
template <class Kernel, int R, bool Streaming>
void row_block(const typename Kernel::Problem& p, int64_t r0, int64_t t0, int64_t t1) {
  constexpr int NS = Kernel::strips_for(R, Streaming);
  for (int64_t t = t0; t < t1; t += NS) first_strips<Kernel, R, NS, !Streaming>(std::min<int64_t>(NS, t1 - t), p, r0, t);
}

template <class Kernel, bool Streaming>
void rows_against_strips(const typename Kernel::Problem& p, int64_t r0, int64_t rows, int64_t t0, int64_t t1) {
  switch (rows) {
    case 1: row_block<Kernel, 1, Streaming>(p, r0, t0, t1); break;
    case 2: row_block<Kernel, 2, Streaming>(p, r0, t0, t1); break;
    case 3: row_block<Kernel, 3, Streaming>(p, r0, t0, t1); break;
    case 4: row_block<Kernel, 4, Streaming>(p, r0, t0, t1); break;
    case 5: row_block<Kernel, 5, Streaming>(p, r0, t0, t1); break;
    case 6: row_block<Kernel, 6, Streaming>(p, r0, t0, t1); break;
    case 7: row_block<Kernel, 7, Streaming>(p, r0, t0, t1); break;
    default: row_block<Kernel, 8, Streaming>(p, r0, t0, t1); break;
  }
}

// One thread's strips [t0, t1): up to kStreamingRows rows in one pass over them (if `streaming`);
// more, chunks of them that stay in L2, every row block over each chunk.
template <class Kernel>
void run_strips(const typename Kernel::Problem& p, int64_t t0, int64_t t1, bool streaming) {
  const int64_t chunk = std::max<int64_t>(4, kChunkBytes / Kernel::strip_bytes(p));
  if (p.rows <= kStreamingRows && streaming) return rows_against_strips<Kernel, true>(p, 0, p.rows, t0, t1);
  for (int64_t c0 = t0; c0 < t1; c0 += chunk) {
    const int64_t c1 = std::min(t1, c0 + chunk);
    for (int64_t r0 = 0; r0 < p.rows; r0 += kBlockRows)
      rows_against_strips<Kernel, false>(p, r0, std::min<int64_t>(kBlockRows, p.rows - r0), c0, c1);
  }
}

// The whole call: `tiles` strips of a weight of `weight_bytes` at `weight` split between the pool's
// threads (named to its read-ahead), or on this thread for a small weight at few rows.
template <class Kernel>
void run(const typename Kernel::Problem& p, int64_t tiles, const void* weight, int64_t weight_bytes, bool streaming) {
  const bool serial = p.rows <= kBlockRows && weight_bytes < kSerialLinearBytes;
  kernel_pool::parallel_for(0, tiles, serial ? tiles : 1,
                            [&](int64_t t0, int64_t t1) { run_strips<Kernel>(p, t0, t1, streaming); },
                            {weight, weight_bytes});
}

}  // namespace strips_loops
