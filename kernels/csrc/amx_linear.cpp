// A bfloat16 linear layer on AMX tiles (amx_tiles.h), the weight kept once in column-tile strips
// made at load (amx_linear_pack), the input read as it lies.
//
// Blocking by row count: up to 16 rows, one A tile against 3 column strips at a time, each thread
// streaming its half of the weight once with software prefetch (the weight's bytes bound it); more
// rows, 2 x 2 tiles (32 rows x 32 columns) per K step, cache-blocked (kPanelBytes, kChunkBytes),
// with the next strips and input rows prefetched into L2 while the current ones multiply.
// Measured against oneDNN's packed bfloat16 matmul on the default model's projections
// (bench/bench_limits.py --amx-linear, one thread, a loaded 2-vCPU AMX VM): 0.43-0.63x its time at
// 1-16 rows, 0.44-1.1x at 64, 0.94-1.6x at 256, 1.2-1.8x at 2000 (the 2 x 2 loop reaches ~200-500
// GFLOP/s where oneDNN reaches 250-1100). The engine (engine/layers/linear.py) keeps bfloat16
// projections only in these strips and calls this up to AMX_STRIPS_MAX_ROWS rows; past that it
// multiplies a per-call amx_linear_unpack with F.linear (vectorized: ~1.03-1.15x F.linear's time on a plain
// weight at 1000-2000 rows, the hand loop ~1.2-1.45x).
// Both threads split the column tiles (kernel_pool::parallel_for). Bias and the rounding to bfloat16 are in
// the store. Requires K a multiple of 32 (callers fall back otherwise); any N and row count (the
// last 1-15 rows are one padded 16-row block: tail_block).
// Functions with AMX/AVX-512 bodies carry their own target attribute, so the file builds on any
// x86-64; the ops refuse to run unless the CPU has AMX-BF16 (amx_linear_supported), but for
// amx_linear_unpack, which needs only AVX-512F (bf16_linear.cpp multiplies the same strips without AMX).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <vector>

#include "amx_tiles.h"
#include "silu_lanes.h"
#include "strips_call.h"
#include "thread_pool.h"
#include "transpose16.h"

namespace {

using amx_tiles::kColumns;
using amx_tiles::kK;
using amx_tiles::kRows;

// The many-row loop's cache blocking: a chunk of column strips (kChunkBytes of weight) stays in L2
// across every panel of input rows (kPanelBytes of input); each column pair's strips are reused
// from L1 across the panel's rows. Chosen by a sweep on the default model's shapes at 2000 rows
// (one thread; 64-512 KB panels x 256 KB-all chunks): 128/512 was best or near it on each shape.
constexpr int64_t kPanelBytes = 128 << 10;
constexpr int64_t kChunkBytes = 512 << 10;
constexpr int64_t kPrefetchSteps = 4;  // B tiles ahead per strip in the few-row loop
// A fused MLP at few rows whose weights are smaller than this runs on the calling thread. The rule
// came from projections measured on OpenMP: two threads read a small weight no faster than one (the default model's 0.66 MB o_proj took 69 us at 1 row
// on two threads of a quiet 2-vCPU AMX VM, ~9.6 GB/s, what one thread reads alone), and waking
// the other thread (a futex under the passive wait the engine sets) costs, worst where other
// processes share the cores: at 1 row on a loaded machine, qkv_proj + o_proj x 30 took min 4.4-5.0
// ms on one thread against 5.3-5.4 on two (min of 200-300 passes, alternating; measured on OpenMP,
// before kernel_pool, whose sleeping worker is woken the same way; not re-measured on it).
constexpr int64_t kSerialMlpBytes = 1 << 20;
// A projection at few rows runs on the calling thread only under this: on kernel_pool (a worker
// that is spinning takes its part at once, and the caller takes the part of one that is not
// running) the default model's 0.66 MB o_proj x 30 at 1 row took 1.79 / 2.06 ms on two threads
// against 2.70 / 3.04 ms on one (bench/bench_limits.py, two A/B pairs of builds, quiet but with
// the VM's bandwidth at 12-23 GB/s).
constexpr int64_t kSerialLinearBytes = 256 << 10;

bool amx_linear_supported() { return amx_tiles::supported(); }

// [N, K] -> [ceil(N / 16), K / 32, 16, 32]: strip n, step s, pair p, 2 j + e = W[16 n + j, 32 s + 2 p + e]
// (rows past N are zeros).
at::Tensor amx_linear_pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16, "weight: a [N, K] bfloat16 matrix");
  const int64_t n = weight.size(0), k = weight.size(1), tiles = (n + kColumns - 1) / kColumns;
  TORCH_CHECK(k % kK == 0, "amx_linear needs K a multiple of ", kK, ", got ", k);
  at::Tensor padded = at::constant_pad_nd(weight, {0, 0, 0, tiles * kColumns - n});
  return padded.view({tiles, kColumns, k / kK, kRows, 2}).permute({0, 2, 3, 1, 4}).contiguous().view(
      {tiles, k / kK, kRows, 2 * kColumns});
}

// Strips [t0, t1) of amx_linear_pack's layout (`steps` B tiles each) into rows of the plain [N, K]
// weight w (N = n_total, in 32-bit pairs: K / 2 a row): each B tile (16 K pairs x 16 columns) a
// 16 x 16 transpose in registers (the scalar loop before took ~4x as long: ~2 ms a layer of the
// default model, one thread). AVX-512F only: bf16_linear.cpp's CPUs without AMX unpack too.
__attribute__((target("avx512f"))) void unpack_strips(const uint32_t* in, int64_t steps, int64_t n_total, uint32_t* w, int64_t t0,
                                    int64_t t1) {
  const int64_t half_k = steps * kK / 2;
  __m512i rows[16], columns[16];
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t count = std::min(kColumns, n_total - t * kColumns);
    for (int64_t s = 0; s < steps; ++s) {
      const uint32_t* tile = in + (t * steps + s) * kRows * kColumns;
      for (int p = 0; p < kRows; ++p) rows[p] = _mm512_loadu_si512(tile + p * kColumns);
      transpose16::transpose_16x16(rows, columns);
      for (int64_t j = 0; j < count; ++j) _mm512_storeu_si512(w + (t * kColumns + j) * half_k + s * kRows, columns[j]);
    }
  }
}

// The inverse of amx_linear_pack: the plain [N, K] weight (for a caller that hands the product to
// another library), on any CPU with AVX-512F (the strips are also bf16_linear.cpp's layout).
at::Tensor amx_linear_unpack(const at::Tensor& packed, int64_t n_total) {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  TORCH_CHECK(avx512, "amx_linear_unpack needs a CPU with AVX-512F");
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == at::kBFloat16 && packed.is_contiguous() &&
                  packed.size(2) == kRows && packed.size(3) == 2 * kColumns,
              "packed: amx_linear_pack's [N/16, K/32, 16, 32] layout");
  const int64_t tiles = packed.size(0);
  TORCH_CHECK(n_total > (tiles - 1) * kColumns && n_total <= tiles * kColumns, "out_features ", n_total,
              " does not match the packed weight");
  at::Tensor out = at::empty({n_total, packed.size(1) * kK}, packed.options());
  const auto* in = reinterpret_cast<const uint32_t*>(packed.data_ptr<c10::BFloat16>());
  auto* w = reinterpret_cast<uint32_t*>(out.data_ptr<c10::BFloat16>());
  kernel_pool::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) { unpack_strips(in, packed.size(1), n_total, w, t0, t1); });
  return out;
}

AMX_TILES_TARGET inline __m512 load_bias(const c10::BFloat16* bias, __mmask16 mask) {
  if (!bias) return _mm512_setzero_ps();
  const __m256i raw = _mm256_maskz_loadu_epi16(mask, bias);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// out[r, j] = bf16(c[r, j] + bias[j]) for r < rows, j < columns (c: row stride ldc floats).
AMX_TILES_TARGET void store_block(const float* c, int64_t ldc, int64_t rows, int64_t columns,
                                  const c10::BFloat16* bias, c10::BFloat16* out, int64_t ldo) {
  for (int64_t j = 0; j < columns; j += 16) {
    const __mmask16 mask = static_cast<__mmask16>((1u << std::min<int64_t>(16, columns - j)) - 1);
    const __m512 b = load_bias(bias ? bias + j : nullptr, mask);
    for (int64_t r = 0; r < rows; ++r) {
      const __m512 v = _mm512_add_ps(_mm512_loadu_ps(c + r * ldc + j), b);
      _mm256_mask_storeu_epi16(out + r * ldo + j, mask, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
    }
  }
}

struct RowBlock {
  const uint16_t* a;
  int64_t lda;
  int64_t first_row, rows;
};

AMX_TILES_TARGET void run_columns(const std::vector<RowBlock>& blocks, const uint16_t* packed, int64_t steps,
                                  int64_t n_total, const c10::BFloat16* bias, c10::BFloat16* y, int64_t t0, int64_t t1) {
  const int64_t strip = steps * amx_tiles::kTileElems;
  alignas(64) float c[2 * kRows * 3 * kColumns];
  constexpr int64_t ldc = 3 * kColumns;
  auto store = [&](const RowBlock& rb, int64_t row_offset, int64_t t, int64_t nr) {
    const int64_t col = t * kColumns, columns = std::min(nr * kColumns, n_total - col);
    store_block(c + row_offset * ldc, ldc, rb.rows, columns, bias ? bias + col : nullptr, y + rb.first_row * n_total + col,
                n_total);
  };
  amx_tiles::configure_tiles();
  if (blocks.size() == 1) {
    const RowBlock& rb = blocks[0];
    for (int64_t t = t0; t < t1; t += 3) {
      const int64_t nr = std::min<int64_t>(3, t1 - t);
      const uint16_t* b[3] = {packed + t * strip, packed + (t + 1) * strip, packed + (t + 2) * strip};
      if (nr == 3) amx_tiles::block_1xn<3>(rb.a, rb.lda, b, steps, c, ldc, kPrefetchSteps);
      else if (nr == 2) amx_tiles::block_1xn<2>(rb.a, rb.lda, b, steps, c, ldc, kPrefetchSteps);
      else amx_tiles::block_1xn<1>(rb.a, rb.lda, b, steps, c, ldc, kPrefetchSteps);
      store(rb, 0, t, nr);
    }
  } else {
    // Column chunks whose strips stay in L2 across every row panel; panels of the input that stay
    // in L2 across the chunk's column pairs.
    const int64_t strip_bytes = strip * 2;
    const int64_t chunk_tiles = std::max<int64_t>(2, kChunkBytes / strip_bytes / 2 * 2);
    const int64_t panel_blocks = std::max<int64_t>(2, kPanelBytes / (steps * kK * 2) / (2 * kRows) * 2);
    const int64_t count = static_cast<int64_t>(blocks.size());
    // Spreads `bytes` from `from` evenly over `blocks` 2 x 2 blocks of `steps` steps: block i's share.
    auto share = [&](const char* from, int64_t bytes, int64_t blocks_total, int64_t i) {
      const int64_t per_step = (bytes / 64 + blocks_total * steps - 1) / (blocks_total * steps);
      return amx_tiles::Prefetch{from + i * steps * per_step * 64, per_step};
    };
    for (int64_t c0 = t0; c0 < t1; c0 += chunk_tiles) {
      const int64_t c1 = std::min(t1, c0 + chunk_tiles);
      for (int64_t p0 = 0; p0 < count; p0 += panel_blocks) {
        const int64_t p1 = std::min(count, p0 + panel_blocks);
        const int64_t pairs = (p1 - p0 + 1) / 2, column_pairs = (c1 - c0 + 1) / 2;
        // The next panel's input rows (the next chunk's first panel after the last), read while
        // this panel's column pairs run.
        const int64_t next_p0 = p1 < count ? p1 : (c1 < t1 ? 0 : count);
        const int64_t next_p1 = std::min(count, next_p0 + panel_blocks);
        const char* next_rows = next_p0 < count ? reinterpret_cast<const char*>(blocks[next_p0].a) : nullptr;
        const int64_t next_rows_bytes =
            next_p0 < count ? (blocks[next_p1 - 1].first_row + kRows - blocks[next_p0].first_row) * blocks[next_p0].lda * 2 : 0;
        for (int64_t t = c0; t < c1; t += 2) {
          const int64_t nr = std::min<int64_t>(2, c1 - t);
          const uint16_t* b[2] = {packed + t * strip, packed + (t + 1) * strip};
          // The next column pair's strips (contiguous; after the chunk's last pair, its first for
          // the next panel, or the next chunk's), read while this pair runs over the panel's rows.
          const int64_t next = t + 2 < c1 ? t + 2 : (p1 < count ? c0 : c1);
          const char* upcoming = reinterpret_cast<const char*>(packed + next * strip);
          const int64_t upcoming_bytes = std::max<int64_t>(0, std::min(next + 2, t1) - next) * strip_bytes;
          for (int64_t i = p0; i < p1; i += 2) {
            const int64_t pair = (i - p0) / 2;
            const amx_tiles::Prefetch strips = share(upcoming, upcoming_bytes, pairs, pair);
            const amx_tiles::Prefetch rows = next_rows ? share(next_rows, next_rows_bytes, pairs * column_pairs,
                                                               (t - c0) / 2 * pairs + pair)
                                                       : amx_tiles::Prefetch{};
            const RowBlock& r0 = blocks[i];
            if (i + 1 < p1) {
              const RowBlock& r1 = blocks[i + 1];
              if (nr == 2) amx_tiles::block_2xn<2>(r0.a, r0.lda, r1.a, r1.lda, b, steps, c, ldc, strips, rows);
              else amx_tiles::block_2xn<1>(r0.a, r0.lda, r1.a, r1.lda, b, steps, c, ldc, strips, rows);
              store(r1, kRows, t, nr);
            } else if (nr == 2) {
              amx_tiles::block_1xn<2>(r0.a, r0.lda, b, steps, c, ldc, 0);
            } else {
              amx_tiles::block_1xn<1>(r0.a, r0.lda, b, steps, c, ldc, 0);
            }
            store(r0, 0, t, nr);
          }
        }
      }
    }
  }
  amx_tiles::release_tiles();
}

// The last 1-15 input rows (at `rows`, row stride lda, K columns) as an A tile's 16 rows: a lone
// row is read 16 times over (row stride 0: each tile row a copy of it, no copy made); more rows
// are copied into this thread's buffer, the rest of whose rows hold whatever finite values an
// earlier call left (a C row depends only on its own A row, and rows past `tail` are never
// stored). Plain C++: the at::zeros + narrow + copy_ this replaced were ~10 dispatcher calls,
// 1.5-3 us each, per projection (4 of them per decoder layer at every decode step).
RowBlock tail_block(const uint16_t* rows, int64_t lda, int64_t k, int64_t first_row, int64_t tail) {
  if (tail == 1) return {rows, 0, first_row, 1};
  thread_local std::vector<uint16_t> padded;
  if (static_cast<int64_t>(padded.size()) < kRows * k) padded.resize(kRows * k);
  for (int64_t r = 0; r < tail; ++r) std::memcpy(padded.data() + r * k, rows + r * lda, k * sizeof(uint16_t));
  return {padded.data(), k, first_row, tail};
}

// x [M, K] bfloat16 @ packed weight (amx_linear_pack of an [N, K] weight) + bias -> [M, N] bfloat16.
at::Tensor amx_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                      int64_t n_total) {
  TORCH_CHECK(amx_linear_supported(), "amx_linear needs a CPU with AMX-BF16");
  auto call = strips_call::check(x, packed, bias, n_total);
  const int64_t rows = call.rows, k = call.k, steps = call.steps, tiles = call.tiles;
  const c10::BFloat16* bias_ptr = call.bias;
  at::Tensor out = call.out;
  if (rows == 0) return out;
  const auto* a = reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>());
  const int64_t lda = x.stride(0), full = rows / kRows, tail = rows % kRows;
  std::vector<RowBlock> blocks;
  for (int64_t i = 0; i < full; ++i) blocks.push_back({a + i * kRows * lda, lda, i * kRows, kRows});
  if (tail) blocks.push_back(tail_block(a + full * kRows * lda, lda, k, full * kRows, tail));
  const auto* w = reinterpret_cast<const uint16_t*>(packed.data_ptr<c10::BFloat16>());
  auto* y = out.data_ptr<c10::BFloat16>();
  // Even chunks of column tiles: the many-row loop takes them in pairs; a small weight at few rows,
  // all of them on this thread (no parallel region).
  const bool serial = blocks.size() == 1 && tiles * steps * amx_tiles::kTileElems * 2 < kSerialLinearBytes;
  const int64_t grain = serial ? tiles : blocks.size() == 1 ? 1 : 2;
  kernel_pool::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    run_columns(blocks, w, steps, n_total, bias_ptr, y, t0, t1);
  });
  return out;
}

// ---- a gated MLP (SwiGLU) at few rows in one parallel region ----------------------------------
//
// Why: at a decode step's few rows the MLP was three calls, gate_up's and down's products each a
// parallel region (the OpenMP threads woken, then joined: with the passive wait the engine sets,
// each region costs futex round trips, and a batch-1 step had ~120 regions). Here each thread takes
// a slice of the intermediate width I: its columns of gate and up (their strips), the activation
// on them, then down's product over that slice of down's K, a partial sum of every output column;
// the caller adds the threads' partial sums (in float32) and rounds once. No barrier inside, one
// region per MLP, and each thread still streams its share of both weights.

// Rounds 16 floats to bfloat16 and back (the unfused path stores gate_up's product in bfloat16).
AMX_TILES_TARGET inline __m512 round_bf16(__m512 v) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v))), 16));
}

// One thread's slice [s0, s1) of down's K steps (intermediate columns [32 s0, 32 s1)): gate and up
// for those columns (strips 2 s0.. of each half of gate_up), h = silu(gate) * up in bfloat16 into an
// A block (silu_mul_lanes: silu_mul's own arithmetic), then partial[r][n] = h[r] . down[n][32 s0, 32 s1) for r < rows.
AMX_TILES_TARGET void silu_mlp_slice(const uint16_t* a, int64_t lda, const uint16_t* gate_up, int64_t k_steps,
                                     int64_t inter, const uint16_t* down, int64_t n_total, int64_t s0, int64_t s1,
                                     int64_t rows, float* partial) {
  const int64_t width = (s1 - s0) * kK, strip = k_steps * amx_tiles::kTileElems;
  const int64_t down_steps = inter / kK, down_strip = down_steps * amx_tiles::kTileElems;
  thread_local std::vector<uint16_t> h;  // [16][width]: rows past `rows` hold finite leftovers
  if (static_cast<int64_t>(h.size()) < kRows * width) h.resize(kRows * width);
  constexpr int64_t ldc = 3 * kColumns;
  alignas(64) float gate[kRows * ldc], up[kRows * ldc];
  amx_tiles::configure_tiles();
  const int64_t t_end = 2 * s1, up_first = inter / kColumns;
  for (int64_t t = 2 * s0; t < t_end; t += 3) {
    const int64_t nr = std::min<int64_t>(3, t_end - t);
    const uint16_t* g[3] = {gate_up + t * strip, gate_up + (t + 1) * strip, gate_up + (t + 2) * strip};
    const uint16_t* u[3] = {g[0] + up_first * strip, g[1] + up_first * strip, g[2] + up_first * strip};
    if (nr == 3) {
      amx_tiles::block_1xn<3>(a, lda, g, k_steps, gate, ldc, kPrefetchSteps);
      amx_tiles::block_1xn<3>(a, lda, u, k_steps, up, ldc, kPrefetchSteps);
    } else if (nr == 2) {
      amx_tiles::block_1xn<2>(a, lda, g, k_steps, gate, ldc, kPrefetchSteps);
      amx_tiles::block_1xn<2>(a, lda, u, k_steps, up, ldc, kPrefetchSteps);
    } else {
      amx_tiles::block_1xn<1>(a, lda, g, k_steps, gate, ldc, kPrefetchSteps);
      amx_tiles::block_1xn<1>(a, lda, u, k_steps, up, ldc, kPrefetchSteps);
    }
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < nr * kColumns; j += 16) {
        const __m512 gv = round_bf16(_mm512_load_ps(gate + r * ldc + j));
        const __m512 uv = round_bf16(_mm512_load_ps(up + r * ldc + j));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(h.data() + r * width + (t - 2 * s0) * kColumns + j),
                            reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(silu_mul_lanes<true>(gv, uv))));
      }
    }
  }
  alignas(64) float c[kRows * ldc];
  const int64_t tiles = (n_total + kColumns - 1) / kColumns;
  for (int64_t t = 0; t < tiles; t += 3) {
    const int64_t nr = std::min<int64_t>(3, tiles - t);
    const uint16_t* b[3] = {down + t * down_strip + s0 * amx_tiles::kTileElems,
                            down + (t + 1) * down_strip + s0 * amx_tiles::kTileElems,
                            down + (t + 2) * down_strip + s0 * amx_tiles::kTileElems};
    if (nr == 3) amx_tiles::block_1xn<3>(h.data(), width, b, s1 - s0, c, ldc, kPrefetchSteps);
    else if (nr == 2) amx_tiles::block_1xn<2>(h.data(), width, b, s1 - s0, c, ldc, kPrefetchSteps);
    else amx_tiles::block_1xn<1>(h.data(), width, b, s1 - s0, c, ldc, kPrefetchSteps);
    const int64_t columns = std::min(nr * kColumns, n_total - t * kColumns);
    for (int64_t r = 0; r < rows; ++r) std::memcpy(partial + r * n_total + t * kColumns, c + r * ldc, columns * sizeof(float));
  }
  amx_tiles::release_tiles();
}

// out[r, j] = bf16(sum over slices of partial[slice][r][j]).
AMX_TILES_TARGET void sum_slices(const float* partial, int64_t slices, int64_t count, c10::BFloat16* out) {
  for (int64_t i = 0; i < count; i += 16) {
    const __mmask16 mask = static_cast<__mmask16>((1u << std::min<int64_t>(16, count - i)) - 1);
    __m512 v = _mm512_maskz_loadu_ps(mask, partial + i);
    for (int64_t p = 1; p < slices; ++p) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, partial + p * count + i));
    _mm256_mask_storeu_epi16(out + i, mask, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
  }
}

// Rows up to which amx_silu_mlp runs (one A tile); the engine calls it at decode batch sizes.
constexpr int64_t kSiluMlpMaxRows = kRows;

// down(silu(gate) * up) for x [M <= 16, K] bfloat16 with gate_up = amx_linear_pack of the fused
// [2 I, K] weight (gate's I rows, then up's) and down = amx_linear_pack of the [N, I] weight
// (I a multiple of 32; no biases) -> [M, N] bfloat16.
at::Tensor amx_silu_mlp(const at::Tensor& x, const at::Tensor& gate_up, const at::Tensor& down, int64_t n_total) {
  TORCH_CHECK(amx_linear_supported(), "amx_silu_mlp needs a CPU with AMX-BF16");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.stride(1) == 1, "x: a [rows, K] bfloat16 matrix");
  const auto check_packed = [](const at::Tensor& w, const char* name) {
    TORCH_CHECK(w.dim() == 4 && w.scalar_type() == at::kBFloat16 && w.is_contiguous() && w.size(2) == kRows &&
                    w.size(3) == 2 * kColumns,
                name, ": amx_linear_pack's [N/16, K/32, 16, 32] layout");
  };
  check_packed(gate_up, "gate_up");
  check_packed(down, "down");
  const int64_t rows = x.size(0), k = x.size(1), k_steps = gate_up.size(1), down_steps = down.size(1);
  const int64_t inter = down_steps * kK;
  TORCH_CHECK(rows <= kSiluMlpMaxRows, "amx_silu_mlp takes at most ", kSiluMlpMaxRows, " rows, got ", rows);
  TORCH_CHECK(k == k_steps * kK, "x has ", k, " columns, gate_up's weight ", k_steps * kK);
  TORCH_CHECK(gate_up.size(0) * kColumns == 2 * inter, "gate_up has ", gate_up.size(0) * kColumns,
              " rows, down's input width ", inter, " implies ", 2 * inter);
  const int64_t tiles = down.size(0);
  TORCH_CHECK(n_total > (tiles - 1) * kColumns && n_total <= tiles * kColumns, "out_features ", n_total,
              " does not match the packed down weight");
  at::Tensor out = at::empty({rows, n_total}, x.options());
  if (rows == 0) return out;
  const auto* in = reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>());
  const RowBlock block = rows == kRows ? RowBlock{in, x.stride(0), 0, rows} : tail_block(in, x.stride(0), k, 0, rows);
  // One slice per thread; a small MLP (both weights under kSerialMlpBytes) on this thread alone.
  const bool serial = (gate_up.numel() + down.numel()) * 2 < kSerialMlpBytes;
  const int64_t slices = serial ? 1 : std::min<int64_t>(at::get_num_threads(), down_steps);
  thread_local std::vector<float> partial_sums;  // this (the calling) thread's: named outside the region
  if (static_cast<int64_t>(partial_sums.size()) < slices * rows * n_total) partial_sums.resize(slices * rows * n_total);
  float* partial = partial_sums.data();
  const auto* gu = reinterpret_cast<const uint16_t*>(gate_up.data_ptr<c10::BFloat16>());
  const auto* dw = reinterpret_cast<const uint16_t*>(down.data_ptr<c10::BFloat16>());
  kernel_pool::parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p)
      silu_mlp_slice(block.a, block.lda, gu, k_steps, inter, dw, n_total, down_steps * p / slices,
                     down_steps * (p + 1) / slices, rows, partial + p * rows * n_total);
  });
  sum_slices(partial, slices, rows * n_total, out.data_ptr<c10::BFloat16>());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bento_llm, m) {
  m.def("amx_linear_supported() -> bool", &amx_linear_supported);
  m.def("amx_linear_pack(Tensor weight) -> Tensor", &amx_linear_pack);
  m.def("amx_linear_unpack(Tensor packed, int out_features) -> Tensor", &amx_linear_unpack);
  m.def("amx_linear(Tensor x, Tensor packed, Tensor? bias, int out_features) -> Tensor", &amx_linear);
  m.def("amx_silu_mlp(Tensor x, Tensor gate_up, Tensor down, int out_features) -> Tensor", &amx_silu_mlp);
  m.def("amx_silu_mlp_max_rows() -> int", [] { return kSiluMlpMaxRows; });
}
