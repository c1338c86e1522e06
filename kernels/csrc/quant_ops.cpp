// Quantized matmuls on AMX: the weight stays in its int4/int8 codes; each call converts one
// block of 64 output columns at a time to a bfloat16 tile (K x 128 bytes, in L1/L2), once per call
// whatever the row count, and multiplies every input row with it in our own AMX tile loop
// (_tile_loadd / _tile_dpbf16ps: 2x2 tiles of 16 rows x 16 columns, A read straight from the
// row-major input, B from the converted block), the float32 sums converted to bfloat16 on the
// way out. Threads split the column blocks. For 1-2 rows (a decode step) int4_mm_rows reads the
// codes with AVX512-BF16 instead, no tile at all. int8 weight-only converts nothing either: it
// splits each input row into 16-bit fixed point (two byte planes, one scale) and multiplies both
// planes with the codes on AMX-INT8 in its own tile loop (int8_mm_amx). w8a8_mm_amx rounds the
// input to int8 per row and multiplies it with int8 codes on AMX-INT8 (oneDNN's brgemm ukernel).
// Registered as torch.ops.bento_llm.int4_mm_amx / int4_mm_rows / int4_mm_dpbf16 / int8_mm_amx /
// int8_mm_rows / int8_mm_dpbusd / int8_mm_dpbf16 / w8a8_mm_amx by the same extension as cpu_ops.cpp
// (kernels/cpu_ops.py builds both).
//
// Why: PyTorch's packed int4/int8 matmuls (_weight_int4pack_mm_for_cpu, _weight_int8pack_mm)
// are vector-unit loops, fast at one row (they read half or a quarter of bfloat16's bytes) but
// 3-20x slower than oneDNN's packed bfloat16 on AMX from 16 rows up. Converting a weight once
// per call costs less than reading it in bfloat16 from memory, and AMX does the rest. A
// hand-written tile loop rather than a brgemm call per block: no per-call setup, one tile
// configuration per thread, and rows beyond 256 pass in chunks over blocks kept converted
// (brgemm re-read the whole input per block: 1.6-2x bfloat16's time at 2000 rows).
//
// int4's layout is PyTorch's own, so one copy of the weight serves both its few-row kernel and
// this one; int8 and w8a8 have AMX-INT8's (every row count runs here):
// - int4: _convert_weight_to_int4pack_for_cpu on AVX-512, [N/64][K][32] bytes: byte j of row k
//   holds column j in its low nibble and column 32 + j in its high one; scales_and_zeros
//   [K/group][N][2] (scale, zero) in bfloat16, value = (code - 8) * scale + zero. A block is
//   dequantized straight into the VNNI layout of AMX's B operand ([K/2][64][2]).
// - int8: [N/64][K/4][64][4] codes, AMX-INT8's B order (PyTorch's [N][K] would need a transpose
//   per tile), zero rows padding N to 64 and zero codes padding K to 64, one bfloat16 scale per
//   output column applied to the result. The tile loop loads B tiles straight from the codes; each
//   input row becomes q = round(x / s), s = max |x| / 32767, split as 256 high (s8) + low (u8), and
//   y = s s_w (256 (high . w) + low . w): two int32 products per step, each covering 64 inputs
//   (bfloat16's: 32), so as many tile products as the bfloat16 loop and half its weight bytes,
//   none converted (the conversion to bfloat16 tiles it replaced cost about what the bfloat16
//   projection spends reading its weight: 0.8-0.95x its speed at 64 rows). For 1-2 rows
//   (int8_mm_rows) the same split rows meet the codes in AVX512-VNNI byte dot products, no tile
//   (torch's _weight_int8pack_mm ran at 0.8-0.9x bfloat16's time at one row, reading half its bytes).
// - w8a8: int8 codes in brgemm's int8 VNNI layout [N/64][K/4][64][4] (engine/layers/quant.py
//   arranges them at load), float32 scale per output row; where the weight was rotated at load
//   (a block Hadamard matrix R, engine/layers/rotation.py), each input row is rotated by the same
//   R as it is quantized, a fast Walsh-Hadamard transform in registers and L1.
// CPUs without AMX (Zen 4/5, cloud VMs that hide it) run the loops that need no tiles: int4_mm_rows
// and int8_mm_rows (AVX512-BF16 / AVX512-VNNI, as above), the whole-weight conversions, and vector
// loops in place of the tile loops: int4_mm_dpbf16 (int4_mm_amx's blocks converted per call, times
// the rows by AVX512-BF16 pair dot products, 6 rows x 64 columns of accumulators), int8_mm_dpbusd
// (int8_mm_rows's byte dot products over 3 rows at a time, each block's column sums taken once:
// Intel's) and int8_mm_dpbf16 (each block's codes converted exactly to bfloat16 while its first
// rows multiply them, then int4_mm_dpbf16's loop, the scales on the sums: AMD's, where the byte
// products run at half the rate). engine/layers/quant_kernels.py picks one per row count.
// Functions with AVX-512 or AMX bodies carry their own target attribute, so the file builds on
// any x86-64; the AMX ops refuse to run unless the CPU has AMX-BF16 and AVX512-VBMI and Linux
// grants the tile registers (amx_bf16_supported(); int8 and w8a8: AMX-INT8 too,
// amx_int8_supported()), the vector ones unless it has AVX512-BF16 and VBMI
// (avx512_bf16_supported(); int8's: AVX512-VNNI too, avx512_vnni_supported()).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "amx_tiles.h"
#include "cpu_features.h"
#include "thread_pool.h"

namespace {

constexpr int64_t kBlockN = 64;     // output columns per tile: torch's AVX-512 int4 block
constexpr int64_t kMaxRows = 512;   // input rows per brgemm call (bounds the float32 result tile)
constexpr int64_t kTileRows = 16;   // rows of an AMX tile
constexpr int64_t kTileK = 32;      // bfloat16 inputs per AMX tile row (64 bytes)
constexpr int64_t kRowChunk = 256;  // input rows per pass over a group of converted blocks (a multiple of 32)
constexpr int64_t kPrefetchAhead = 2048;  // bytes of codes the few-row loops ask for ahead of their reads
// The few-row loops that stream a decode step's weights (int4_block_rows, int8_block_rows' streaming
// loop) ask for the codes ahead as non-temporal (NTA): read once a step, the codes then need not
// push the engine's own data (the step's Python, the sampler's, the KV cache) out of L2 and L3.
// The default model's int4 batch-1 step, 2-vCPU Zen 5, alternating passes in one process, with
// the pool reading ahead only the next weight (bench/RESULTS.md 2026-12-04 23:33): int4's codes
// NTA rather than T0 0.95x the time, the int8 LM head's loop (which had no software prefetch)
// asking NTA 0.96x again.
constexpr int64_t kScalePrefetchGroups = 2;  // groups ahead whose scales int4's few-row loop asks for
// Input rows from which int4_mm_rows' threads split blocks by 32-column halves (for_each_half_block),
// not whole blocks: from 4 rows its vdpbf16ps products, not its reads, bound it (a half costs half
// the products but all of the block's code bytes; at 3 rows the two took about as long, and halves
// measured even). Two threads, spinning workers, Zen 4, load ~3.6, against whole blocks in one
// process: fastest of 21-25 rounds 0.91-0.99x at 16-32 rows on the 9-block projections (o, down),
// 0.91-0.96x on qkv (15 blocks).
constexpr int64_t kInt4HalvesMinRows = 4;
constexpr int64_t kGroupBytes = 2 << 20;  // converted blocks a thread keeps at once beyond kRowChunk rows

#define BENTO_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi")))
#define BENTO_AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi,amx-tile,amx-bf16")))
// AVX-512 without AVX512-BF16 or VBMI (Skylake-SP on): loading bfloat16 values (a shift) and
// w8a8's row rounding. BENTO_AVX512_INT8 adds AVX512-VNNI (Cascade Lake, Ice Lake on): w8a8_mm_vnni's
// byte products, which take float32 rows on CPUs without AVX512-BF16.
#define BENTO_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define BENTO_AVX512_INT8 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))

// Byte j of two 32-byte rows side by side (out bytes 2j, 2j + 1: the first row's byte j, the
// second's), in the order int4_block_rows unpacks them: 128-bit lane L holds the pairs of
// columns 4L..4L+3 (its low 8 bytes) and 16+4L..16+4L+3, so unpacking the low and high halves of
// the lanes gives columns 0-15 and 16-31 in order.
alignas(64) constexpr uint8_t kInterleaveRowsForUnpack[64] = {
    0,  32, 1,  33, 2,  34, 3,  35, 16, 48, 17, 49, 18, 50, 19, 51, 4,  36, 5,  37, 6,  38, 7,  39, 20, 52, 21, 53, 22, 54, 23, 55,
    8,  40, 9,  41, 10, 42, 11, 43, 24, 56, 25, 57, 26, 58, 27, 59, 12, 44, 13, 45, 14, 46, 15, 47, 28, 60, 29, 61, 30, 62, 31, 63};
// A pair row's 64 bytes (32 columns x (k, k + 1)) split: row k's 32 bytes, then row k + 1's.
alignas(64) constexpr uint8_t kSplitPairs[64] = {
    0,  2,  4,  6,  8,  10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 32, 34, 36, 38, 40, 42, 44, 46, 48, 50, 52, 54, 56, 58, 60, 62,
    1,  3,  5,  7,  9,  11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31, 33, 35, 37, 39, 41, 43, 45, 47, 49, 51, 53, 55, 57, 59, 61, 63};

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};

template <typename T>
std::unique_ptr<T[], AlignedFree> aligned_buffer(int64_t n) {
  const size_t bytes = ((n * sizeof(T) + 63) / 64) * 64;
  return std::unique_ptr<T[], AlignedFree>(static_cast<T*>(std::aligned_alloc(64, bytes)));
}

// Where each float of a VNNI tile row's 16-float vectors takes its code from: vector t of a
// 32-column half holds columns 8t..8t+7 of both rows of a pair (k, k + 1), float d = column
// 8t + d/2 of row k + d%2, whose code is nibble byte (d%2) * 32 + 8t + d/2 of the pair's 64
// bytes (low nibbles: the half's first 32 columns, high nibbles its last). The index sits in
// byte 2 of each float, where the code goes (see dequantize_int4_block); other bytes unused.
struct PairRowIndex {
  alignas(64) uint8_t bytes[4][64];
  constexpr PairRowIndex() : bytes{} {
    for (int t = 0; t < 4; ++t)
      for (int d = 0; d < 16; ++d) bytes[t][4 * d + 2] = static_cast<uint8_t>((d % 2) * 32 + 8 * t + d / 2);
  }
};
constexpr PairRowIndex kPairRowIndex;

// One block of 64 columns of an int4 weight into a bfloat16 VNNI tile [K/2][64][2] (64-byte
// aligned). Rows k and k + 1 are 64 contiguous bytes; one masked byte permutation per 8 columns
// x 2 rows puts each code in byte 2 of a float whose top byte is 0x43, which is exactly the
// float 128 + code (the code is the mantissa's top bits; as int4_block_rows's bfloat16 trick),
// already in VNNI order, and one multiply-add per 16 values makes it (code - 8) * scale + zero =
// (128 + code) * scale + (zero - 136 * scale) (the product exact inside the FMA, the offset
// rounded once to float32: ~1e-5 of a scale, far under the tile's bfloat16 rounding). Two
// instructions per 16 values where widening each byte to a float took four (extract, widen,
// convert, multiply-add): the conversion is what a 16-row step spends its time on. The next
// block's codes (next, or null) are prefetched to L2 on the way, so they arrive while AMX
// multiplies this one. Only the 32-column halves [H0, H1) (of 0, 1) are converted (template
// arguments: with run-time bounds the scales left registers for the stack, ~8% slower).
template <int H0, int H1>
BENTO_AVX512_BF16 void dequantize_int4_block(const uint8_t* codes, const uint8_t* next, const c10::BFloat16* scales_and_zeros,
                                             int64_t n_padded, int64_t k_total, int64_t group, uint16_t* tile) {
  const __m512i low_nibble = _mm512_set1_epi8(0x0F);
  const __m512i twice = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m512i high_half = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m512i float_128 = _mm512_set1_epi32(0x43000000);  // byte 2 (the code's) zero
  const __m512 offset_codes = _mm512_set1_ps(136.0f);
  constexpr __mmask64 kCodeBytes = 0x4444444444444444ULL;  // byte 2 of each float
  __m512i index[4];
  for (int t = 0; t < 4; ++t) index[t] = _mm512_load_si512(kPairRowIndex.bytes[t]);
  for (int64_t g = 0; g < k_total / group; ++g) {
    // (scale, offset) of columns 8q..8q+7, each twice (both rows of a pair), from their
    // (scale, zero) bfloat16 pairs.
    const auto* sz = reinterpret_cast<const uint32_t*>(scales_and_zeros + g * n_padded * 2);
    __m512 scale[8], offset[8];
    for (int q = 0; q < 8; ++q) {
      const __m512i pairs =
          _mm512_permutexvar_epi32(twice, _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sz + 8 * q))));
      scale[q] = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
      offset[q] = _mm512_fnmadd_ps(offset_codes, scale[q], _mm512_castsi512_ps(_mm512_and_si512(pairs, high_half)));
    }
    for (int64_t k = g * group; k < (g + 1) * group; k += 2) {
      if (next) _mm_prefetch(reinterpret_cast<const char*>(next + k * 32), _MM_HINT_T1);
      const __m512i raw = _mm512_loadu_si512(codes + k * 32);
      // Low nibbles are columns 0-31, high nibbles columns 32-63.
      const __m512i nibbles[2] = {_mm512_and_si512(raw, low_nibble), _mm512_and_si512(_mm512_srli_epi16(raw, 4), low_nibble)};
      uint16_t* out = tile + (k / 2) * kBlockN * 2;
      for (int h = H0; h < H1; ++h) {
        for (int p = 0; p < 2; ++p) {  // columns 32 h + 16 p + [0, 16), both rows
          const int t = 2 * p, q = 4 * h + t;
          const __m512 c0 = _mm512_castsi512_ps(_mm512_mask_permutexvar_epi8(float_128, kCodeBytes, index[t], nibbles[h]));
          const __m512 c1 = _mm512_castsi512_ps(_mm512_mask_permutexvar_epi8(float_128, kCodeBytes, index[t + 1], nibbles[h]));
          const __m512 v0 = _mm512_fmadd_ps(c0, scale[q], offset[q]);
          const __m512 v1 = _mm512_fmadd_ps(c1, scale[q + 1], offset[q + 1]);
          _mm512_store_si512(out + (32 * h + 16 * p) * 2, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(v1, v0)));
        }
      }
    }
  }
}

// Block b of an int4 weight's codes (its 32-column halves [h0, h1)) into `tile`, block `next`'s
// codes (or none: -1) prefetched on the way: what the AMX and the AVX512-BF16 int4 loops both do
// per block.
BENTO_AVX512_BF16 inline void dequantize_int4_halves(const uint8_t* codes, const c10::BFloat16* scales_and_zeros,
                                                     int64_t b, int64_t next, int64_t n_padded, int64_t k_total,
                                                     int64_t group_size, int h0, int h1, uint16_t* tile) {
  const int64_t block = k_total * 32;
  const uint8_t *from = codes + b * block, *ahead = next >= 0 ? codes + next * block : nullptr;
  const c10::BFloat16* block_scales = scales_and_zeros + b * kBlockN * 2;
  if (h0 == 0 && h1 == 2) {
    dequantize_int4_block<0, 2>(from, ahead, block_scales, n_padded, k_total, group_size, tile);
  } else if (h0 == 0) {
    dequantize_int4_block<0, 1>(from, ahead, block_scales, n_padded, k_total, group_size, tile);
  } else {
    dequantize_int4_block<1, 2>(from, ahead, block_scales, n_padded, k_total, group_size, tile);
  }
}

// 16 bfloat16 values (masked) as floats.
BENTO_AVX512 inline __m512 load_bfloat16(const uint16_t* p, __mmask16 mask) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}
BENTO_AVX512 inline __m512 load_bfloat16(const c10::BFloat16* p, __mmask16 mask) {
  return load_bfloat16(reinterpret_cast<const uint16_t*>(p), mask);
}
// 16 input values (masked) as floats: bfloat16 bits or float32 (w8a8's rows come in either).
BENTO_AVX512 inline __m512 load_floats(const uint16_t* p, __mmask16 mask) { return load_bfloat16(p, mask); }
BENTO_AVX512 inline __m512 load_floats(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }

// fn(b, columns) for each 64-column block b of out_features (the last may be narrower), the
// blocks split over the threads; `weight`: the codes the blocks read, for the pool's read-ahead
// (thread_pool.h: a worker reads the next op's weight between ops).
template <typename F>
void for_each_block(int64_t out_features, const F& fn, kernel_pool::Weight weight = {}) {
  kernel_pool::parallel_for(0, (out_features + kBlockN - 1) / kBlockN, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) fn(b, std::min(kBlockN, out_features - b * kBlockN));
  }, weight);
}

// fn(b, h0, h1, last) for each 64-column block b of out_features, the threads splitting the blocks'
// 32-column halves (units), so that a thread whose share ends inside a block takes only its
// halves [h0, h1) (of 0, 1) of it (the default model's 9- and 15-block projections split 5/4 and
// 8/7 by whole blocks); last: b is the thread's last block. tiled_matmul's loop, for the vector loops.
template <typename F>
void for_each_half_block(int64_t out_features, const F& fn, kernel_pool::Weight weight = {}) {
  kernel_pool::parallel_for(0, 2 * ((out_features + kBlockN - 1) / kBlockN), 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end;) {
      const int64_t b = u / 2;
      const int h0 = static_cast<int>(u % 2), h1 = static_cast<int>(std::min<int64_t>(2, end - 2 * b));
      fn(b, h0, h1, 2 * (b + 1) >= end);
      u = 2 * b + h1;
    }
  }, weight);
}

// out[m, n0 + j] = result[m, j] for j < columns, in bfloat16; result rows are ldc floats apart
// (int4's scales and zeros are in the converted tile already).
BENTO_AVX512_BF16 void store_block(const float* result, int64_t ldc, int64_t rows, int64_t columns, c10::BFloat16* out,
                                   int64_t out_stride) {
  for (int64_t j = 0; j < columns; j += 16) {
    const __mmask16 mask = static_cast<__mmask16>((1u << std::min<int64_t>(16, columns - j)) - 1);
    for (int64_t m = 0; m < rows; ++m) {
      const __m512 v = _mm512_loadu_ps(result + m * ldc + j);
      _mm256_mask_storeu_epi16(out + m * out_stride + j, mask, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
    }
  }
}

// The vector loops' instruction sets (no AMX needed): int4_mm_rows / int4_mm_dpbf16 and the
// dequantizations take AVX512-BF16 and VBMI (byte permutations), int8_mm_rows / int8_mm_dpbusd
// AVX512-VNNI too. Asked once, as amx_bf16_supported(): every op call checks it.
bool avx512_bf16_supported() {
  static const bool supported = cpu_features::avx512_bf16() && __builtin_cpu_supports("avx512vbmi");
  return supported;
}
bool avx512_vnni_supported() {
  static const bool supported = avx512_bf16_supported() && __builtin_cpu_supports("avx512vnni");
  return supported;
}

bool amx_bf16_supported() {
  // cpublas packs bfloat16 for brgemm exactly where oneDNN's ukernel runs it on AMX. Asked once:
  // every op checks it, and a decode step makes ~120 calls.
  static const bool supported = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vbmi") &&
                                at::native::cpublas::could_pack(at::kBFloat16) && amx_tiles::request_permission();
  return supported;
}

// (first row, rows) of each brgemm call: kMaxRows at a time, then the rest's multiple of 16 in
// powers of two, then its last 1-15 rows. oneDNN JIT-compiles and keeps a kernel per shape, so
// every row count a server meets maps onto at most 21 shapes per weight shape.
std::vector<std::pair<int64_t, int64_t>> row_chunks(int64_t rows) {
  std::vector<std::pair<int64_t, int64_t>> chunks;
  int64_t m = 0;
  for (; rows - m >= kMaxRows; m += kMaxRows) chunks.emplace_back(m, kMaxRows);
  for (int64_t size = kMaxRows / 2; size >= 16; size /= 2) {
    if (rows - m >= size) {
      chunks.emplace_back(m, size);
      m += size;
    }
  }
  if (m < rows) chunks.emplace_back(m, rows - m);
  return chunks;
}

// Tile registers (amx_tiles.h's configuration): C: tmm0-3, A: tmm4-5, B: tmm6-7.
using amx_tiles::configure_tiles;
using amx_tiles::release_tiles;

// R x 16 rows of A (bfloat16, lda elements apart, K a multiple of 32) times 32 columns of a
// dequantized block ([K/2][64][2], b at its first column) -> c [R x 16][32] float32: a 2x2 (or
// 1x2) tile product, each A tile used twice and each B tile R times per 32 inputs.
template <int R>
BENTO_AMX void tile_product(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t k_steps, float* c) {
  constexpr int64_t b_stride = kBlockN * 2 * sizeof(uint16_t), c_stride = 32 * sizeof(float);
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (R == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t s = 0; s < k_steps; ++s) {
    const uint16_t* bs = b + s * kTileK * kBlockN;  // 16 input pairs further
    _tile_loadd(6, bs, b_stride);
    _tile_loadd(7, bs + 32, b_stride);
    _tile_loadd(4, a + s * kTileK, lda * sizeof(uint16_t));
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if constexpr (R == 2) {
      _tile_loadd(5, a + kTileRows * lda + s * kTileK, lda * sizeof(uint16_t));
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, c_stride);
  _tile_stored(1, c + 16, c_stride);
  if constexpr (R == 2) {
    _tile_stored(2, c + kTileRows * 32, c_stride);
    _tile_stored(3, c + kTileRows * 32 + 16, c_stride);
  }
}

// The input as AMX reads it: row pairs of 16-row tiles straight from x where its width is a
// whole number of 32-input steps (else from a zero-padded copy), and its last rows % 32 rows
// from a zero-padded copy of one or two tiles.
struct InputTiles {
  at::Tensor padded;
  std::unique_ptr<uint16_t[], AlignedFree> tail_copy;
  const uint16_t* main;
  int64_t lda, main_rows;  // main_rows: a multiple of 32
  const uint16_t* tail;    // tail_tiles x 16 rows, k_padded apart
  int64_t tail_tiles;

  InputTiles(const at::Tensor& x, int64_t k_padded) {
    const at::Tensor& source = x.size(1) == k_padded ? x : (padded = at::constant_pad_nd(x, {0, k_padded - x.size(1)}));
    main = reinterpret_cast<const uint16_t*>(source.data_ptr<c10::BFloat16>());
    lda = source.stride(0);
    const int64_t rows = x.size(0);
    main_rows = rows / (2 * kTileRows) * (2 * kTileRows);
    tail_tiles = (rows - main_rows + kTileRows - 1) / kTileRows;
    tail = nullptr;
    if (tail_tiles) {
      tail_copy = aligned_buffer<uint16_t>(tail_tiles * kTileRows * k_padded);
      std::memset(tail_copy.get(), 0, tail_tiles * kTileRows * k_padded * sizeof(uint16_t));
      for (int64_t m = main_rows; m < rows; ++m) {
        std::memcpy(tail_copy.get() + (m - main_rows) * k_padded, main + m * lda, k_padded * sizeof(uint16_t));
      }
      tail = tail_copy.get();
    }
  }
};

// A thread's reusable buffer (grows, never shrinks: no allocation or page faults per call): int4's
// converted blocks, int8's split input. One op uses it at a time: no op calls another while it holds it.
uint16_t* block_buffer(int64_t elements) {
  thread_local std::unique_ptr<uint16_t[], AlignedFree> buffer;
  thread_local int64_t capacity = 0;
  if (elements > capacity) {
    buffer = aligned_buffer<uint16_t>(elements);
    capacity = elements;
  }
  return buffer.get();
}

// Rows [m0, m1) of the input times the 32-column halves [h0, h1) of one dequantized block, stored
// into its (up to) 64 columns.
BENTO_AMX void multiply_block(const InputTiles& in, int64_t m0, int64_t m1, int64_t rows, int64_t k_steps, const uint16_t* tile,
                              int h0, int h1, int64_t columns, c10::BFloat16* y, int64_t ldy) {
  alignas(64) float c[2 * kTileRows * 32];
  for (int64_t m = m0; m < m1; m += 2 * kTileRows) {
    const bool main = m < in.main_rows;
    const uint16_t* a = main ? in.main + m * in.lda : in.tail;
    const int64_t lda = main ? in.lda : k_steps * kTileK;
    const int64_t valid = std::min<int64_t>(2 * kTileRows, rows - m);
    for (int64_t half = 32 * h0; half < 32 * h1 && half < columns; half += 32) {
      if (main || in.tail_tiles == 2) {
        tile_product<2>(a, lda, tile + half * 2, k_steps, c);
      } else {
        tile_product<1>(a, lda, tile + half * 2, k_steps, c);
      }
      store_block(c, 32, valid, std::min<int64_t>(32, columns - half), y + m * ldy + half, ldy);
    }
  }
}

// The shared loop: each block is converted to a bfloat16 VNNI tile once per call (fill(b, next,
// tile, h0, h1): its 32-column halves [h0, h1), prefetching block next's codes) and multiplied
// with every input row by AMX tile products. Up to kRowChunk rows, one block at a time (the tile
// stays in L2), threads splitting the blocks' 32-column halves: a thread whose share ends inside
// a block converts and multiplies only its half (the default model's 9- and 15-block projections
// split 5/4 and 8/7 by whole blocks, ~10% idle for one of two threads). Beyond kRowChunk rows,
// threads split whole blocks and a group of a thread's blocks is kept converted while row chunks
// of kRowChunk pass over it (each chunk's rows stay in cache), so no block is converted twice and
// no input row is read from memory once per block.
template <typename Fill>
at::Tensor tiled_matmul(const at::Tensor& x, int64_t n_total, const Fill& fill) {
  const int64_t rows = x.size(0), k_total = x.size(1);
  const int64_t k_padded = (k_total + kTileK - 1) / kTileK * kTileK, tile_elements = k_padded * kBlockN;
  at::Tensor out = at::empty({rows, n_total}, x.options());
  auto* y = out.data_ptr<c10::BFloat16>();
  const InputTiles in(x, k_padded);
  const int64_t blocks = (n_total + kBlockN - 1) / kBlockN, k_steps = k_padded / kTileK;
  auto convert = [&](int64_t b, int64_t next, uint16_t* tile, int h0, int h1) {
    fill(b, next, tile, h0, h1);
    std::memset(tile + k_total * kBlockN, 0, (k_padded - k_total) * kBlockN * sizeof(uint16_t));
  };
  auto multiply = [&](int64_t m0, int64_t b, const uint16_t* tile, int h0, int h1) {
    multiply_block(in, m0, std::min(rows, m0 + kRowChunk), rows, k_steps, tile, h0, h1, std::min(kBlockN, n_total - b * kBlockN),
                   y + b * kBlockN, n_total);
  };
  if (rows <= kRowChunk) {
    kernel_pool::parallel_for(0, 2 * blocks, 1, [&](int64_t begin, int64_t end) {  // units: 32-column halves
      uint16_t* tile = block_buffer(tile_elements);
      configure_tiles();
      for (int64_t u = begin; u < end;) {
        const int64_t b = u / 2;
        const int h0 = static_cast<int>(u % 2), h1 = static_cast<int>(std::min<int64_t>(2, end - 2 * b));
        convert(b, 2 * (b + 1) < end ? b + 1 : -1, tile, h0, h1);
        multiply(0, b, tile, h0, h1);
        u = 2 * b + h1;
      }
      release_tiles();
    });
    return out;
  }
  const int64_t group = std::max<int64_t>(1, kGroupBytes / (tile_elements * 2));
  kernel_pool::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    uint16_t* tiles = block_buffer(std::min(group, end - begin) * tile_elements);
    configure_tiles();
    for (int64_t g0 = begin; g0 < end; g0 += group) {
      const int64_t g1 = std::min(end, g0 + group);
      for (int64_t m0 = 0; m0 < rows; m0 += kRowChunk) {
        for (int64_t b = g0; b < g1; ++b) {
          uint16_t* tile = tiles + (b - g0) * tile_elements;
          if (m0 == 0) convert(b, b + 1 < end ? b + 1 : -1, tile, 0, 2);
          multiply(m0, b, tile, 0, 2);
        }
      }
    }
    release_tiles();
  });
  return out;
}

void check_input(const at::Tensor& x, int64_t k_total) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.stride(1) == 1, "x: a [rows, K] bfloat16 matrix");
  TORCH_CHECK(x.size(1) == k_total, "x has ", x.size(1), " columns, the weight ", k_total);
}

// x [M, K] bfloat16 @ int4 weight (torch's CPU pack, N padded to 64) -> [M, out_features].
void check_int4(const at::Tensor& packed, const at::Tensor& scales_and_zeros, int64_t group_size, int64_t out_features,
                int64_t k_total, int64_t n_padded) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.numel() * 2 == n_padded * k_total,
              "packed: torch's CPU int4 pack of the [N, K] weight");
  TORCH_CHECK(n_padded % kBlockN == 0 && out_features <= n_padded && group_size % 2 == 0, "int4 shapes");
  TORCH_CHECK(scales_and_zeros.scalar_type() == at::kBFloat16 && scales_and_zeros.is_contiguous(),
              "scales_and_zeros: [K / group, N, 2] bfloat16");
}

// x [M, K] bfloat16 @ int4 weight (torch's CPU pack, N padded to 64) -> [M, out_features].
at::Tensor int4_mm_amx(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_and_zeros,
                       int64_t group_size, int64_t out_features) {
  TORCH_CHECK(amx_bf16_supported(), "the AMX quantized matmuls need a CPU with AMX-BF16");
  const int64_t n_padded = scales_and_zeros.size(1), k_total = scales_and_zeros.size(0) * group_size;
  check_input(x, k_total);
  check_int4(packed, scales_and_zeros, group_size, out_features, k_total, n_padded);
  const auto* codes = packed.data_ptr<uint8_t>();
  const auto* sz = scales_and_zeros.data_ptr<c10::BFloat16>();
  return tiled_matmul(x, out_features, [&](int64_t b, int64_t next, uint16_t* tile, int h0, int h1) {
    dequantize_int4_halves(codes, sz, b, next, n_padded, k_total, group_size, h0, h1, tile);
  });
}

// R rows of x (bfloat16, lda apart) times one 64-column block of int4 codes (torch's layout),
// for a few rows (a decode step), where reading the codes is the whole cost: no tile. Each code
// pair (k, k + 1) of a column becomes the exact bfloat16 pair (128 + code): the code as the low
// byte under 0x43 (bfloat16 128 + c for c < 128), one unpack per 32 codes; AVX512-BF16's pair
// dot product multiplies it with (x[k], x[k + 1]) into float32 sums per group. Each group then
// takes its column's scale s and zero z, with the bias removed through the group's sum of x
// (x_sums, [R][groups]): sum x ((c - 8) s + z) = s sum x (128 + c) + (z - 136 s) sum x.
// Only the block's 32-column halves [H0, H1) (of 0, 1: low nibbles, high nibbles) are multiplied
// and stored: int4_mm_rows splits a block between two threads by halves where the products, not
// the reads, bound it (template bounds: the accumulators stay in registers).
template <int R, int H0 = 0, int H1 = 2>
BENTO_AVX512_BF16 void int4_block_rows(const uint16_t* x, int64_t lda, const float* x_sums, int64_t k_total, int64_t group,
                                       const uint8_t* codes, const uint16_t* scales_and_zeros, int64_t n_padded, int64_t columns,
                                       c10::BFloat16* out, int64_t out_stride) {
  constexpr int I0 = 2 * H0, I1 = 2 * H1;  // the 16-column groups multiplied
  const __m512i interleave = _mm512_load_si512(kInterleaveRowsForUnpack);
  const __m512i low_nibble = _mm512_set1_epi8(0x0F), bias = _mm512_set1_epi8(0x43);
  const __m512i high_half = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m512 offset = _mm512_set1_ps(136.0f);
  const int64_t groups = k_total / group;
  __m512 total[R][4];
  for (int r = 0; r < R; ++r)
    for (int i = I0; i < I1; ++i) total[r][i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    if (g + kScalePrefetchGroups < groups) {  // a group's 256 bytes of scales lie a row of N away: no stream prefetcher sees them
      const auto* ahead = reinterpret_cast<const char*>(scales_and_zeros + (g + kScalePrefetchGroups) * n_padded * 2);
      for (int line = 2 * H0; line < 2 * H1; ++line) _mm_prefetch(ahead + 64 * line, _MM_HINT_T0);
    }
    __m512 acc[R][4];
    for (int r = 0; r < R; ++r)
      for (int i = I0; i < I1; ++i) acc[r][i] = _mm512_setzero_ps();
    for (int64_t k = g * group; k < (g + 1) * group; k += 2) {
      _mm_prefetch(reinterpret_cast<const char*>(codes + k * 32 + kPrefetchAhead), _MM_HINT_NTA);
      const __m512i both = _mm512_permutexvar_epi8(interleave, _mm512_loadu_si512(codes + k * 32));
      // Columns 16 i + [0, 16), each a (k, k + 1) pair of bfloat16 values 128 + code (low
      // nibbles: the first 32 columns, high: the last).
      __m512i w[4];
      if constexpr (H0 == 0) {
        const __m512i low = _mm512_and_si512(both, low_nibble);
        w[0] = _mm512_unpacklo_epi8(low, bias);
        w[1] = _mm512_unpackhi_epi8(low, bias);
      }
      if constexpr (H1 == 2) {
        const __m512i high = _mm512_and_si512(_mm512_srli_epi16(both, 4), low_nibble);
        w[2] = _mm512_unpacklo_epi8(high, bias);
        w[3] = _mm512_unpackhi_epi8(high, bias);
      }
      for (int r = 0; r < R; ++r) {
        uint32_t pair;
        std::memcpy(&pair, x + r * lda + k, sizeof(pair));
        const __m512bh xp = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(pair)));
        for (int i = I0; i < I1; ++i) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], reinterpret_cast<__m512bh>(w[i]), xp);
      }
    }
    const auto* sz = reinterpret_cast<const uint32_t*>(scales_and_zeros + g * n_padded * 2);
    for (int i = I0; i < I1; ++i) {
      const __m512i pairs = _mm512_loadu_si512(sz + 16 * i);  // (scale, zero) of 16 columns
      const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
      const __m512 zero = _mm512_fnmadd_ps(offset, scale, _mm512_castsi512_ps(_mm512_and_si512(pairs, high_half)));
      for (int r = 0; r < R; ++r) {
        total[r][i] = _mm512_fmadd_ps(scale, acc[r][i], _mm512_fmadd_ps(zero, _mm512_set1_ps(x_sums[r * groups + g]), total[r][i]));
      }
    }
  }
  for (int i = I0; i < I1 && 16 * i < columns; ++i) {
    const __mmask16 mask = static_cast<__mmask16>((1u << std::min<int64_t>(16, columns - 16 * i)) - 1);
    for (int r = 0; r < R; ++r) {
      _mm256_mask_storeu_epi16(out + r * out_stride + 16 * i, mask, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(total[r][i])));
    }
  }
}

// sums[r][g] = the sum of row r's bfloat16 values over group g (group: even), in float32: plain
// C++ here, not ATen ops (a conversion, a sum and their allocations: ~4 calls, more than the
// product itself costs at one row on the smaller projections).
BENTO_AVX512_BF16 void group_sums(const uint16_t* x, int64_t lda, int64_t rows, int64_t k_total, int64_t group, float* sums) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < k_total / group; ++g) {
      __m512 sum = _mm512_setzero_ps();
      for (int64_t k = g * group; k < (g + 1) * group; k += 16) {
        const __mmask16 mask = static_cast<__mmask16>((1u << std::min<int64_t>(16, (g + 1) * group - k)) - 1);
        sum = _mm512_add_ps(sum, load_bfloat16(x + r * lda + k, mask));
      }
      sums[r * (k_total / group) + g] = _mm512_reduce_add_ps(sum);
    }
  }
}

// x [M, K] bfloat16 (a few rows) @ int4 weight (torch's CPU pack) -> [M, out_features], reading
// the codes once per 4 rows; threads split the 64-column blocks (below kInt4HalvesMinRows rows) or
// their 32-column halves.
at::Tensor int4_mm_rows(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_and_zeros, int64_t group_size,
                        int64_t out_features) {
  TORCH_CHECK(avx512_bf16_supported(), "int4_mm_rows needs a CPU with AVX512-BF16 and AVX512-VBMI");
  const int64_t n_padded = scales_and_zeros.size(1), k_total = scales_and_zeros.size(0) * group_size;
  check_input(x, k_total);
  check_int4(packed, scales_and_zeros, group_size, out_features, k_total, n_padded);
  const int64_t rows = x.size(0), lda = x.stride(0), groups = k_total / group_size;
  at::Tensor out = at::empty({rows, out_features}, x.options());
  const auto* a = reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>());
  std::vector<float> x_sums(rows * groups);
  group_sums(a, lda, rows, k_total, group_size, x_sums.data());
  const float* sums = x_sums.data();
  auto* y = out.data_ptr<c10::BFloat16>();
  const auto* codes = packed.data_ptr<uint8_t>();
  const auto* sz = reinterpret_cast<const uint16_t*>(scales_and_zeros.data_ptr<c10::BFloat16>());
  // Block b's 32-column halves [h0, h1) times every row, 4 rows per pass over its codes.
  auto multiply = [&](int64_t b, int h0, int h1) {
    const int64_t n0 = b * kBlockN, columns = std::min(kBlockN, out_features - n0);
    const uint8_t* block = codes + b * k_total * 32;
    for (int64_t m = 0; m < rows; m += 4) {
      const uint16_t* xm = a + m * lda;
      const float* sm = sums + m * groups;
      c10::BFloat16* ym = y + m * out_features + n0;
      // int4_block_rows<rows of this pass, H0, H1>, the halves as template arguments.
      const auto pass = [&](auto first_half, auto end_half) {
        constexpr int H0 = decltype(first_half)::value, H1 = decltype(end_half)::value;
        const auto call = [&](auto fn) { fn(xm, lda, sm, k_total, group_size, block, sz + n0 * 2, n_padded, columns, ym, out_features); };
        switch (std::min<int64_t>(4, rows - m)) {
          case 1: call(int4_block_rows<1, H0, H1>); break;
          case 2: call(int4_block_rows<2, H0, H1>); break;
          case 3: call(int4_block_rows<3, H0, H1>); break;
          default: call(int4_block_rows<4, H0, H1>);
        }
      };
      using std::integral_constant;
      if (h0 == 0 && h1 == 2) pass(integral_constant<int, 0>{}, integral_constant<int, 2>{});
      else if (h0 == 0) pass(integral_constant<int, 0>{}, integral_constant<int, 1>{});
      else pass(integral_constant<int, 1>{}, integral_constant<int, 2>{});
    }
  };
  const kernel_pool::Weight weight{codes, packed.numel()};
  if (rows < kInt4HalvesMinRows) {
    for_each_block(out_features, [&](int64_t b, int64_t) { multiply(b, 0, 2); }, weight);
  } else {  // a block split between threads: each reads all of its codes for its half
    for_each_half_block(out_features, [&](int64_t b, int h0, int h1, bool) { multiply(b, h0, h1); }, weight);
  }
  return out;
}

// Rows per register block of the vector loops on converted blocks (tile_rows): 6 rows x 4 groups
// of 16 columns = 24 float32 accumulators, 4 tile vectors, 1 broadcast input pair: 29 of the 32
// vector registers.
constexpr int64_t kTileVectorRows = 6;

// R rows of x (bfloat16, lda apart) times the 16-column groups [G0, G1) of one converted block
// (a [K/2][64][2] bfloat16 VNNI tile: dequantize_int4_block's, int8_convert_rows's) -> out
// (the block's first `columns` columns; groups past them are not stored), each sum times its
// column's scale where column_scale is given (int8's; int4's scales are in the tile): AMX's tile
// loop with AVX512-BF16 pair dot products (vdpbf16ps) in place of tiles, for CPUs without AMX.
// Each tile vector is loaded once per R rows, each input pair broadcast once per 4 groups; the
// tile (K x 128 bytes) stays in L1/L2 while every row block passes over it. Template group
// bounds: run-time ones put the accumulators on the stack.
// out[r][16 (G0 + i) + j] = bf16(acc[r][i][j] (times column_scale[16 (G0 + i) + j] where given)) for
// the block's first `columns` columns.
template <int R, int G0, int G1>
BENTO_AVX512_BF16 inline void store_tile_sums(const __m512 (&acc)[R][G1 - G0], int64_t columns, const c10::BFloat16* column_scale,
                                              c10::BFloat16* out, int64_t out_stride) {
  for (int i = 0; i < G1 - G0 && 16 * (G0 + i) < columns; ++i) {
    const __mmask16 mask = static_cast<__mmask16>((1u << std::min<int64_t>(16, columns - 16 * (G0 + i))) - 1);
    const __m512 scale = column_scale ? load_bfloat16(column_scale + 16 * (G0 + i), mask) : _mm512_set1_ps(1.0f);
    for (int r = 0; r < R; ++r) {
      const __m512 v = _mm512_mul_ps(acc[r][i], scale);
      _mm256_mask_storeu_epi16(out + r * out_stride + 16 * (G0 + i), mask, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
    }
  }
}

template <int R, int G0, int G1>
BENTO_AVX512_BF16 void tile_rows(const uint16_t* x, int64_t lda, const uint16_t* tile, int64_t k_total, int64_t columns,
                                 const c10::BFloat16* column_scale, c10::BFloat16* out, int64_t out_stride) {
  constexpr int G = G1 - G0;
  __m512 acc[R][G];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < G; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < k_total; k += 2) {
    const uint16_t* pair_row = tile + k * kBlockN;  // pair row k / 2: 64 columns x (k, k + 1)
    __m512bh w[G];
    for (int i = 0; i < G; ++i) w[i] = reinterpret_cast<__m512bh>(_mm512_load_si512(pair_row + 32 * (G0 + i)));
    for (int r = 0; r < R; ++r) {
      uint32_t pair;
      std::memcpy(&pair, x + r * lda + k, sizeof(pair));
      const __m512bh xp = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(pair)));
      for (int i = 0; i < G; ++i) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], w[i], xp);
    }
  }
  store_tile_sums<R, G0, G1>(acc, columns, column_scale, out, out_stride);
}

// Every row of x times the groups [G0, G1) of one converted block, kTileVectorRows at a time.
template <int G0, int G1>
void tile_all_rows(const uint16_t* x, int64_t lda, int64_t rows, const uint16_t* tile, int64_t k_total, int64_t columns,
                   const c10::BFloat16* column_scale, c10::BFloat16* out, int64_t out_stride) {
  for (int64_t m = 0; m < rows; m += kTileVectorRows) {
    const uint16_t* xm = x + m * lda;
    c10::BFloat16* ym = out + m * out_stride;
    switch (std::min<int64_t>(kTileVectorRows, rows - m)) {
      case 1: tile_rows<1, G0, G1>(xm, lda, tile, k_total, columns, column_scale, ym, out_stride); break;
      case 2: tile_rows<2, G0, G1>(xm, lda, tile, k_total, columns, column_scale, ym, out_stride); break;
      case 3: tile_rows<3, G0, G1>(xm, lda, tile, k_total, columns, column_scale, ym, out_stride); break;
      case 4: tile_rows<4, G0, G1>(xm, lda, tile, k_total, columns, column_scale, ym, out_stride); break;
      case 5: tile_rows<5, G0, G1>(xm, lda, tile, k_total, columns, column_scale, ym, out_stride); break;
      default: tile_rows<6, G0, G1>(xm, lda, tile, k_total, columns, column_scale, ym, out_stride);
    }
  }
}

// The vector loops on converted blocks, for CPUs without AMX: int4_mm_amx's structure (each
// 64-column block converted once per call into the thread's bfloat16 VNNI tile, k_tile pair rows
// long, by fill(b, next, tile, h0, h1, out): its 32-column halves [h0, h1), prefetching block
// next's codes (-1: none), returning how many of the first rows it multiplied on the way into
// out (the block's first output); threads split the blocks' 32-column halves) with tile_rows's
// vector products over x's K (even) inputs for the other rows; column_scale: int8's scales per
// output column, or null.
template <typename Fill>
at::Tensor vector_tiled_matmul(const at::Tensor& x, int64_t out_features, int64_t k_tile, const c10::BFloat16* column_scale,
                               const Fill& fill) {
  const int64_t rows = x.size(0), lda = x.stride(0), k_total = x.size(1);
  at::Tensor out = at::empty({rows, out_features}, x.options());
  if (rows == 0) return out;  // fill multiplies at least one row
  const auto* a = reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>());
  auto* y = out.data_ptr<c10::BFloat16>();
  for_each_half_block(out_features, [&](int64_t b, int h0, int h1, bool last) {
    uint16_t* tile = block_buffer(k_tile * kBlockN);
    const int64_t columns = std::min(kBlockN, out_features - b * kBlockN);
    const int64_t done = fill(b, last ? -1 : b + 1, tile, h0, h1, y + b * kBlockN);
    const c10::BFloat16* scale = column_scale ? column_scale + b * kBlockN : nullptr;
    const uint16_t* xr = a + done * lda;
    c10::BFloat16* yb = y + done * out_features + b * kBlockN;
    if (h0 == 0 && h1 == 2) {
      tile_all_rows<0, 4>(xr, lda, rows - done, tile, k_total, columns, scale, yb, out_features);
    } else if (h0 == 0) {
      tile_all_rows<0, 2>(xr, lda, rows - done, tile, k_total, columns, scale, yb, out_features);
    } else {
      tile_all_rows<2, 4>(xr, lda, rows - done, tile, k_total, columns, scale, yb, out_features);
    }
  });
  return out;
}

// x [M, K] bfloat16 @ int4 weight (torch's CPU pack) -> [M, out_features] on CPUs with
// AVX512-BF16 and no AMX: vector_tiled_matmul on dequantize_int4_block's tiles. Converting while
// the first rows multiply, as int8_convert_rows does, measured slower here (one thread, Zen 4,
// against bf16_linear at 16 rows: 1.05-1.18x its time with 3 rows on whole blocks, 1.11-1.22x with
// 4 rows on 32-column halves, against 0.99-1.10x): int4's conversion is multiply-adds and float
// conversions, which compete with vdpbf16ps for the same units, where int8's is byte shuffles.
at::Tensor int4_mm_dpbf16(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_and_zeros, int64_t group_size,
                          int64_t out_features) {
  TORCH_CHECK(avx512_bf16_supported(), "int4_mm_dpbf16 needs a CPU with AVX512-BF16 and AVX512-VBMI");
  const int64_t n_padded = scales_and_zeros.size(1), k_total = scales_and_zeros.size(0) * group_size;
  check_input(x, k_total);
  check_int4(packed, scales_and_zeros, group_size, out_features, k_total, n_padded);
  const auto* codes = packed.data_ptr<uint8_t>();
  const auto* sz = scales_and_zeros.data_ptr<c10::BFloat16>();
  return vector_tiled_matmul(x, out_features, k_total, nullptr,
                             [&](int64_t b, int64_t next, uint16_t* tile, int h0, int h1, c10::BFloat16*) -> int64_t {
    dequantize_int4_halves(codes, sz, b, next, n_padded, k_total, group_size, h0, h1, tile);
    return 0;  // every row multiplies the converted tile
  });
}

// One block of 64 columns of an int4 weight (torch's layout) into rows of a bfloat16 [K][ldo]
// matrix (the weight transposed), its first `columns` columns: row k of the block is 64 codes
// in 32 bytes, low nibbles columns 0-31 and high nibbles 32-63, so each output row is written
// in order.
BENTO_AVX512_BF16 void dequantize_int4_transposed(const uint8_t* codes, const c10::BFloat16* scales_and_zeros, int64_t n_padded,
                                                  int64_t k_total, int64_t group, int64_t columns, c10::BFloat16* out, int64_t ldo) {
  const __m256i low_nibble = _mm256_set1_epi8(0x0F);
  const __m512i high_half = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m512 eight = _mm512_set1_ps(8.0f);
  const __mmask32 halves[2] = {static_cast<__mmask32>(columns >= 32 ? ~0u : (1u << columns) - 1),
                               static_cast<__mmask32>(columns >= 64 ? ~0u : columns <= 32 ? 0u : (1u << (columns - 32)) - 1)};
  for (int64_t g = 0; g < k_total / group; ++g) {
    const auto* sz = reinterpret_cast<const uint32_t*>(scales_and_zeros + g * n_padded * 2);
    __m512 scale[4], offset[4];  // columns 16 i + [0, 16)
    for (int i = 0; i < 4; ++i) {
      const __m512i pairs = _mm512_loadu_si512(sz + 16 * i);
      scale[i] = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
      offset[i] = _mm512_fnmadd_ps(eight, scale[i], _mm512_castsi512_ps(_mm512_and_si512(pairs, high_half)));
    }
    for (int64_t k = g * group; k < (g + 1) * group; ++k) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + k * 32));
      const __m256i nibbles[2] = {_mm256_and_si256(raw, low_nibble), _mm256_and_si256(_mm256_srli_epi16(raw, 4), low_nibble)};
      for (int h = 0; h < 2; ++h) {
        const __m512 v0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(nibbles[h]))),
                                          scale[2 * h], offset[2 * h]);
        const __m512 v1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(nibbles[h], 1))),
                                          scale[2 * h + 1], offset[2 * h + 1]);
        _mm512_mask_storeu_epi16(out + k * ldo + 32 * h, halves[h], reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(v1, v0)));
      }
    }
  }
}

// The int4 weight (torch's CPU pack) as bfloat16 [K, out_features], the weight transposed: for
// prefill-sized inputs, where oneDNN's bfloat16 matmul on it (x @ w) costs less than our tile
// loop by more than this conversion (about 0.1 ns per weight) costs.
at::Tensor int4_dequantize(const at::Tensor& packed, const at::Tensor& scales_and_zeros, int64_t group_size, int64_t out_features) {
  TORCH_CHECK(avx512_bf16_supported(), "int4_dequantize needs a CPU with AVX512-BF16 and AVX512-VBMI");
  const int64_t n_padded = scales_and_zeros.size(1), k_total = scales_and_zeros.size(0) * group_size;
  check_int4(packed, scales_and_zeros, group_size, out_features, k_total, n_padded);
  at::Tensor out = at::empty({k_total, out_features}, scales_and_zeros.options());
  const auto* codes = packed.data_ptr<uint8_t>();
  const auto* sz = scales_and_zeros.data_ptr<c10::BFloat16>();
  auto* y = out.data_ptr<c10::BFloat16>();
  for_each_block(out_features, [&](int64_t b, int64_t columns) {
    dequantize_int4_transposed(codes + b * k_total * 32, sz + b * kBlockN * 2, n_padded, k_total, group_size, columns,
                               y + b * kBlockN, out_features);
  });
  return out;
}

bool amx_int8_supported();

// int8 weight-only codes: [N/64][K/4][64][4] (AMX-INT8's B order: four inputs of one column side
// by side, 64 columns per block), K padded with zero codes to a multiple of kInt8StepK and N with
// zero rows to a multiple of 64; a bfloat16 scale per output column.
constexpr int64_t kInt8StepK = 64;  // int8 inputs per AMX tile row (64 bytes): one k-step
constexpr int64_t kInt8QuadBytes = kBlockN * 4;  // one input quad of a block: 64 columns x 4 codes
// The int32 sums cannot wrap: |low . w| <= 255 * 128 * K < 2^31 for K <= 65536 (and |high . w|
// <= 128 * 128 * K, less).
constexpr int64_t kInt8MaxK = 65536;

void check_int8(const at::Tensor& packed, const at::Tensor& scales, int64_t out_features) {
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.is_contiguous() && packed.dim() == 4 && packed.size(2) == kBlockN &&
                  packed.size(3) == 4 && (packed.size(1) * 4) % kInt8StepK == 0 && out_features <= packed.size(0) * kBlockN,
              "packed: [N/64, K/4, 64, 4] int8 codes, K padded to a multiple of 64");
  TORCH_CHECK(packed.size(1) * 4 <= kInt8MaxK, "int8: at most ", kInt8MaxK, " inputs (its int32 sums would wrap)");
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && scales.is_contiguous() && scales.numel() >= out_features,
              "scales: [N] bfloat16");
}

// x's width against the codes' padded one (K rounded up to 64).
void check_int8_input(const at::Tensor& x, int64_t k_padded) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.stride(1) == 1, "x: a [rows, K] bfloat16 matrix");
  TORCH_CHECK(x.size(1) <= k_padded && x.size(1) > k_padded - kInt8StepK, "x has ", x.size(1), " columns, the weight ",
              k_padded, " (padded to 64)");
}

// max |x| over a row of K bfloat16 (or float32: T) values: the per-row scale of int8's and w8a8's
// input rounding. NaN when the row holds a NaN (vmaxps drops NaN operands: without the flag a NaN
// input would come out as finite outputs, where a bfloat16 weight's product passes it on).
template <typename T>
BENTO_AVX512 float max_abs(const T* in, int64_t k_total) {
  __m512 max = _mm512_setzero_ps();
  __mmask16 nan = 0;
  for (int64_t k = 0; k < k_total; k += 16) {
    const __mmask16 mask = static_cast<__mmask16>((1u << std::min<int64_t>(16, k_total - k)) - 1);
    const __m512 v = load_floats(in + k, mask);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    max = _mm512_max_ps(max, _mm512_abs_ps(v));
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(max);
}

// The scale of a row whose largest |x| is top, rounded to `levels` steps each side of zero: top /
// levels; NaN for a NaN row (its outputs are NaN); 1 for a row of zeros or of values so small
// (top / levels below the smallest normal float) that 1 / scale would overflow: those round to 0,
// an error below 1e-33.
inline float input_scale(float top, float levels) {
  if (top != top) return top;
  return top >= levels * std::numeric_limits<float>::min() ? top / levels : 1.0f;
}

// One input row (K bfloat16 values) as 16-bit fixed point with one float32 scale s = max |x| /
// 32767: q = round(x / s) in [-32767, 32767], split into a signed high byte and an unsigned low
// one, q = 256 * high + low (AMX-INT8 multiplies bytes). |x - s q| <= s / 2 = max |x| / 65534,
// far below the int8 weight's own rounding (max |w| / 254 per weight). Columns K..k_padded are 0.
BENTO_AVX512_BF16 void split_row(const uint16_t* in, int64_t k_total, int64_t k_padded, int8_t* high, uint8_t* low,
                                 float* scale_out) {
  const float scale = input_scale(max_abs(in, k_total), 32767.0f);
  *scale_out = scale;
  const __m512 inverse = _mm512_set1_ps(1.0f / scale);
  const __m512i limit = _mm512_set1_epi32(32767), byte = _mm512_set1_epi32(0xFF);
  for (int64_t k = 0; k < k_padded; k += 16) {
    const __mmask16 mask = static_cast<__mmask16>((1u << std::clamp<int64_t>(k_total - k, 0, 16)) - 1);
    __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(load_bfloat16(in + k, mask), inverse));  // round to nearest even
    q = _mm512_max_epi32(_mm512_min_epi32(q, limit), _mm512_sub_epi32(_mm512_setzero_si512(), limit));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(high + k), _mm512_cvtepi32_epi8(_mm512_srai_epi32(q, 8)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(low + k), _mm512_cvtepi32_epi8(_mm512_and_si512(q, byte)));
  }
}

// x's rows split (split_row) into planes [rows rounded up to `multiple`][k_padded], the extra rows
// 0, in the calling thread's block_buffer (a call allocates nothing and takes no page faults,
// which at 64 rows and more cost more than splitting the rows does).
struct SplitInput {
  int8_t* high;
  uint8_t* low;
  float* scale;

  SplitInput(const at::Tensor& x, int64_t k_padded, int64_t multiple) {
    const int64_t rows = x.size(0), k_total = x.size(1), padded = (rows + multiple - 1) / multiple * multiple;
    const int64_t plane = padded * k_padded, bytes = 2 * plane + padded * static_cast<int64_t>(sizeof(float));
    auto* buffer = reinterpret_cast<uint8_t*>(block_buffer((bytes + 1) / 2));
    high = reinterpret_cast<int8_t*>(buffer);
    low = buffer + plane;
    scale = reinterpret_cast<float*>(buffer + 2 * plane);  // plane: a multiple of 64 bytes
    std::memset(high + rows * k_padded, 0, (padded - rows) * k_padded);
    std::memset(low + rows * k_padded, 0, (padded - rows) * k_padded);
    const auto* a = reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>());
    const int64_t lda = x.stride(0);
    kernel_pool::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        split_row(a + r * lda, k_total, k_padded, high + r * k_padded, low + r * k_padded, scale + r);
      }
    });
  }
};

#define BENTO_AMX_INT8 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi,amx-tile,amx-bf16,amx-int8")))

// 16 rows of the split input (high, low: lda bytes apart) times 32 columns of int8 codes (b at
// the block's column 32 h: every quad row of the block is 256 bytes, of which these columns are
// 128) -> c [2][16][32] int32: the high plane's sums, then the low plane's. Per 64-input step two
// B tiles straight from the codes, two A tiles, four products (s8 x s8 for high, u8 x s8 for
// low): the MACs per product and loads per product of the bfloat16 loop's 2 x 2 tiles, with no
// conversion of the weight. Step s also prefetches lines [s * n, (s + 1) * n) of `next` into L2
// (the next unit's codes, so its first tile loads do not wait on memory).
BENTO_AMX_INT8 void int8_tile_product(const int8_t* high, const uint8_t* low, int64_t lda, const int8_t* b, int64_t steps,
                                      int32_t* c, const char* next, int64_t next_lines) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t s = 0; s < steps; ++s) {
    for (int64_t line = s * next_lines; line < (s + 1) * next_lines; ++line) {
      // the unit's 2 lines of each 4-line quad row
      _mm_prefetch(next + (line / 2) * kInt8QuadBytes + 64 * (line % 2), _MM_HINT_T1);
    }
    const int8_t* bs = b + s * (kInt8StepK / 4) * kInt8QuadBytes;
    _tile_loadd(6, bs, kInt8QuadBytes);
    _tile_loadd(7, bs + 64, kInt8QuadBytes);
    _tile_loadd(4, high + s * kInt8StepK, lda);
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    _tile_loadd(5, low + s * kInt8StepK, lda);
    _tile_dpbusd(2, 5, 6);
    _tile_dpbusd(3, 5, 7);
  }
  _tile_stored(0, c, 32 * sizeof(int32_t));
  _tile_stored(1, c + 16, 32 * sizeof(int32_t));
  _tile_stored(2, c + 512, 32 * sizeof(int32_t));
  _tile_stored(3, c + 528, 32 * sizeof(int32_t));
}

// out[m, j] = (256 high[m][j] + low[m][j]) * row_scale[m] * column_scale[j] for m < rows, j <
// columns (<= 32), in bfloat16 (c: int8_tile_product's [2][16][32]; the sums combine in float32,
// where 256 high cannot wrap).
BENTO_AVX512_BF16 void store_int8_tile(const int32_t* c, int64_t rows, int64_t columns, const float* row_scale,
                                       const c10::BFloat16* column_scale, c10::BFloat16* out, int64_t out_stride) {
  const __m512 radix = _mm512_set1_ps(256.0f);
  for (int64_t j = 0; j < columns; j += 16) {
    const __mmask16 mask = static_cast<__mmask16>((1u << std::min<int64_t>(16, columns - j)) - 1);
    const __m512 s = load_bfloat16(column_scale + j, mask);
    for (int64_t m = 0; m < rows; ++m) {
      const __m512 sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(c + m * 32 + j)), radix,
                                         _mm512_cvtepi32_ps(_mm512_loadu_si512(c + 512 + m * 32 + j)));
      const __m512 v = _mm512_mul_ps(sum, _mm512_mul_ps(s, _mm512_set1_ps(row_scale[m])));
      _mm256_mask_storeu_epi16(out + m * out_stride + j, mask, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
    }
  }
}

// A thread's 32-column units [begin, end) (unit u: block u / 2, columns 32 (u % 2) + [0, 32)) times
// every row of the split input: one tile product per 16 rows, the unit's codes read from memory by
// the first and from cache by the rest while the next unit's are prefetched.
BENTO_AMX_INT8 void int8_units(const int8_t* high, const uint8_t* low, const float* row_scale, int64_t rows, int64_t k_padded,
                               const int8_t* codes, const c10::BFloat16* scale, int64_t out_features, int64_t begin, int64_t end,
                               c10::BFloat16* y) {
  alignas(64) int32_t c[2 * kTileRows * 32];
  const int64_t steps = k_padded / kInt8StepK, block_bytes = k_padded * kBlockN;
  configure_tiles();
  for (int64_t u = begin; u < end; ++u) {
    const int64_t n0 = u * 32, columns = std::min<int64_t>(32, out_features - n0);
    if (columns <= 0) break;
    const int8_t* b = codes + (u / 2) * block_bytes + (u % 2) * 128;
    const char* next = u + 1 < end ? reinterpret_cast<const char*>(codes + ((u + 1) / 2) * block_bytes + ((u + 1) % 2) * 128)
                                   : nullptr;
    for (int64_t m = 0; m < rows; m += kTileRows) {
      // The next unit's 2 lines per quad row, spread over the first row tile's steps.
      const int64_t lines = next && m == 0 ? 2 * (kInt8StepK / 4) : 0;
      int8_tile_product(high + m * k_padded, low + m * k_padded, k_padded, b, steps, c, next, lines);
      store_int8_tile(c, std::min<int64_t>(kTileRows, rows - m), columns, row_scale + m, scale + n0, y + m * out_features + n0,
                      out_features);
    }
  }
  release_tiles();
}

// x [M, K] bfloat16 @ int8 weight ([N/64][K/4][64][4] codes, a bfloat16 scale per output column)
// -> [M, out_features] on AMX-INT8, no conversion of the weight: each input row is split into
// 16-bit fixed point (split_row) and y = s_x s_w (256 (high . w) + (low . w)), two int32 tile
// products per step. Threads split the 32-column units.
at::Tensor int8_mm_amx(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t out_features) {
  TORCH_CHECK(amx_int8_supported(), "the AMX int8 matmuls need a CPU with AMX-INT8");
  check_int8(packed, scales, out_features);
  const int64_t k_padded = packed.size(1) * 4;
  check_int8_input(x, k_padded);
  const int64_t rows = x.size(0);
  const SplitInput in(x, k_padded, kTileRows);
  at::Tensor out = at::empty({rows, out_features}, x.options());
  auto* y = out.data_ptr<c10::BFloat16>();
  const int64_t units = (out_features + 31) / 32;
  kernel_pool::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    int8_units(in.high, in.low, in.scale, rows, k_padded, packed.data_ptr<int8_t>(),
               scales.data_ptr<c10::BFloat16>(), out_features, begin, end, y);
  });
  return out;
}

// A quad row's 64 bytes (16 columns x 4 inputs) split by input: bytes 16 i + j are column j's input i.
alignas(64) constexpr uint8_t kSplitQuads[64] = {
    0, 4, 8,  12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60, 1, 5, 9,  13, 17, 21, 25, 29, 33, 37, 41, 45, 49, 53, 57, 61,
    2, 6, 10, 14, 18, 22, 26, 30, 34, 38, 42, 46, 50, 54, 58, 62, 3, 7, 11, 15, 19, 23, 27, 31, 35, 39, 43, 47, 51, 55, 59, 63};

// One block of 64 columns of int8 codes ([K/4][64][4]) into rows of a bfloat16 [K][ldo] matrix
// (the weight transposed), its first `columns` columns, each value code * scale rounded to
// bfloat16: one byte permutation splits 16 columns' quad into their four input rows.
BENTO_AVX512_BF16 void dequantize_int8_transposed(const int8_t* codes, const c10::BFloat16* scale, int64_t k_padded,
                                                  int64_t columns, c10::BFloat16* out, int64_t ldo) {
  const __m512i split = _mm512_load_si512(kSplitQuads);
  __m512 s[4];
  __mmask16 masks[4];
  for (int i = 0; i < 4; ++i) {
    masks[i] = static_cast<__mmask16>((1u << std::clamp<int64_t>(columns - 16 * i, 0, 16)) - 1);
    s[i] = load_bfloat16(scale + 16 * i, masks[i]);
  }
  for (int64_t p = 0; p < k_padded / 4; ++p) {
    for (int i = 0; i < 4; ++i) {  // columns 16 i + [0, 16) of rows 4 p + [0, 4)
      if (!masks[i]) break;
      const __m512i inputs = _mm512_permutexvar_epi8(split, _mm512_loadu_si512(codes + p * kInt8QuadBytes + 64 * i));
      // The 128-bit lanes by constant index (vextracti32x4 takes an immediate: a loop variable
      // compiles only where the optimizer unrolls the loop).
      const __m128i lanes[4] = {_mm512_extracti32x4_epi32(inputs, 0), _mm512_extracti32x4_epi32(inputs, 1),
                                _mm512_extracti32x4_epi32(inputs, 2), _mm512_extracti32x4_epi32(inputs, 3)};
      for (int r = 0; r < 4; ++r) {
        const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lanes[r])), s[i]);
        _mm256_mask_storeu_epi16(out + (4 * p + r) * ldo + 16 * i, masks[i], reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
      }
    }
  }
}

// The int8 weight (codes [N/64, K/4, 64, 4], a scale per output) as bfloat16 [K padded to 64,
// out_features] (the padding rows 0), the weight transposed: what prefill-sized inputs multiply
// with, as int4_dequantize.
at::Tensor int8_dequantize(const at::Tensor& packed, const at::Tensor& scales, int64_t out_features) {
  TORCH_CHECK(avx512_bf16_supported(), "int8_dequantize needs a CPU with AVX512-BF16 and AVX512-VBMI");
  check_int8(packed, scales, out_features);
  const int64_t k_padded = packed.size(1) * 4;
  at::Tensor out = at::empty({k_padded, out_features}, scales.options());
  const auto* codes = packed.data_ptr<int8_t>();
  const auto* s = scales.data_ptr<c10::BFloat16>();
  auto* y = out.data_ptr<c10::BFloat16>();
  for_each_block(out_features, [&](int64_t b, int64_t columns) {
    dequantize_int8_transposed(codes + b * k_padded * kBlockN, s + b * kBlockN, k_padded, columns, y + b * kBlockN, out_features);
  });
  return out;
}

#define BENTO_AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni")))

// The VNNI loops' store: out[r][16 i + j] = bf16(s_w s_x[r] (256 (acc_high - bias) + acc_low)) for a
// block's `columns` (bias[r][i]: what the +128 that made one plane's bytes unsigned added: 128 times
// each column's code sum, or 128 times row r's high-plane sum).
template <int R>
BENTO_AVX512_VNNI inline void store_split_sums(const __m512i (&acc_high)[R][4], const __m512i (&acc_low)[R][4],
                                               const __m512i (&bias)[R][4], const float* row_scale, const c10::BFloat16* scale,
                                               int64_t columns, c10::BFloat16* out, int64_t out_stride) {
  const __m512 radix = _mm512_set1_ps(256.0f);
  for (int i = 0; i < 4 && 16 * i < columns; ++i) {
    const __mmask16 mask = static_cast<__mmask16>((1u << std::min<int64_t>(16, columns - 16 * i)) - 1);
    const __m512 s = load_bfloat16(scale + 16 * i, mask);
    for (int r = 0; r < R; ++r) {
      const __m512 sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc_high[r][i], bias[r][i])), radix,
                                         _mm512_cvtepi32_ps(acc_low[r][i]));
      const __m512 v = _mm512_mul_ps(sum, _mm512_mul_ps(s, _mm512_set1_ps(row_scale[r])));
      _mm256_mask_storeu_epi16(out + r * out_stride + 16 * i, mask, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
    }
  }
}

// R rows of the split input (high, low: [R][k_padded] planes, split_row's) times one 64-column
// block of int8 codes [K/4][64][4] with AVX512-VNNI's byte dot products, for a few rows where
// reading the codes is the whole cost: each 64-byte vector of codes (16 columns x an input quad)
// meets the row's quad broadcast, four products and their sum per column in one instruction
// (vpdpbusd: unsigned x signed bytes into int32), so the loop keeps up with memory where a float
// loop (convert, multiply-add: 12 instructions per 64 codes at one row) did not. One of the two
// planes' signs has to go: the high plane is signed, and so are the codes.
// - ColumnBias false (the row's): the codes enter as w + 128 (unsigned: a xor per vector) against
//   the high plane's quad, and 128 times the row's high-plane sum comes off at the end, one number a
//   row (summed again per block: K/64 products against the block's K/2, under 1%): two products per
//   64 codes and row.
// - ColumnBias true: the high plane enters as high + 128 against the codes, and 128 times each
//   column's code sum (a third product per 64 codes, with ones, shared by the R rows) comes off.
// Both take the same exact integer sums (int8_tile_product's), so the same bits:
// y = s_x s_w (256 high . w + low . w). The codes kPrefetchAhead bytes ahead are asked for (the
// blocks lie back to back, so this runs on into the next block): into L1 with Prefetch, else
// (the streaming loop) as non-temporal (kPrefetchAhead's note).
template <int R, bool ColumnBias, bool Prefetch>
BENTO_AVX512_VNNI void int8_block_rows(const int8_t* high, const uint8_t* low, const float* row_scale, int64_t k_padded,
                                       const int8_t* codes, const c10::BFloat16* scale, int64_t columns, c10::BFloat16* out,
                                       int64_t out_stride) {
  const __m512i ones = _mm512_set1_epi8(1), sign = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i sums[4], acc_high[R][4], acc_low[R][4];
  for (int i = 0; i < 4; ++i) {
    sums[i] = _mm512_setzero_si512();
    for (int r = 0; r < R; ++r) acc_high[r][i] = acc_low[r][i] = _mm512_setzero_si512();
  }
  for (int64_t p = 0; p < k_padded / 4; ++p) {
    const int8_t* line = codes + p * kInt8QuadBytes;
    for (int l = 0; l < 4; ++l) {
      const char* ahead = reinterpret_cast<const char*>(line + kPrefetchAhead + 64 * l);
      if (Prefetch) _mm_prefetch(ahead, _MM_HINT_T0);
      else _mm_prefetch(ahead, _MM_HINT_NTA);
    }
    __m512i h[R], lo[R];
    for (int r = 0; r < R; ++r) {
      int32_t quad_high, quad_low;
      std::memcpy(&quad_high, high + r * k_padded + 4 * p, 4);
      std::memcpy(&quad_low, low + r * k_padded + 4 * p, 4);
      const __m512i quad = _mm512_set1_epi32(quad_high);
      h[r] = ColumnBias ? _mm512_xor_si512(quad, sign) : quad;  // ColumnBias: high + 128
      lo[r] = _mm512_set1_epi32(quad_low);
    }
    for (int i = 0; i < 4; ++i) {
      const __m512i w = _mm512_loadu_si512(line + 64 * i);
      if (ColumnBias) {
        sums[i] = _mm512_dpbusd_epi32(sums[i], ones, w);
        for (int r = 0; r < R; ++r) acc_high[r][i] = _mm512_dpbusd_epi32(acc_high[r][i], h[r], w);
      } else {
        const __m512i biased = _mm512_xor_si512(w, sign);  // w + 128
        for (int r = 0; r < R; ++r) acc_high[r][i] = _mm512_dpbusd_epi32(acc_high[r][i], biased, h[r]);
      }
      for (int r = 0; r < R; ++r) acc_low[r][i] = _mm512_dpbusd_epi32(acc_low[r][i], lo[r], w);
    }
  }
  __m512i bias[R][4];
  for (int r = 0; r < R; ++r) {
    if (ColumnBias) {
      for (int i = 0; i < 4; ++i) bias[r][i] = _mm512_slli_epi32(sums[i], 7);  // 128 times the column's code sum
    } else {  // 128 times the row's high-plane sum (k_padded: a multiple of 64)
      __m512i sum = _mm512_setzero_si512();
      for (int64_t k = 0; k < k_padded; k += 64) sum = _mm512_dpbusd_epi32(sum, ones, _mm512_loadu_si512(high + r * k_padded + k));
      for (int i = 0; i < 4; ++i) bias[r][i] = _mm512_set1_epi32(_mm512_reduce_add_epi32(sum) * 128);
    }
  }
  store_split_sums<R>(acc_high, acc_low, bias, row_scale, scale, columns, out, out_stride);
}

// One block of 64 output columns for the VNNI int8 ops: its codes and scales, the split input
// rows, where its outputs go.
struct Int8Block {
  const SplitInput& in;
  int64_t rows, k_padded;
  const int8_t* codes;         // the block's [K/4][64][4] codes
  const c10::BFloat16* scale;  // its columns' scales
  int64_t columns;             // 1-64
  c10::BFloat16* out;          // row 0, the block's first column
  int64_t out_stride;
};

// The VNNI int8 ops' call: the checks, the input split once, the output, then per_block on each
// block of 64 columns (threads split the blocks).
template <typename PerBlock>
at::Tensor int8_vnni_call(const char* op, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                          int64_t out_features, const PerBlock& per_block) {
  TORCH_CHECK(avx512_vnni_supported(), op, " needs a CPU with AVX512-VNNI, AVX512-BF16 and AVX512-VBMI");
  check_int8(packed, scales, out_features);
  const int64_t k_padded = packed.size(1) * 4;
  check_int8_input(x, k_padded);
  const int64_t rows = x.size(0);
  const SplitInput in(x, k_padded, 1);
  at::Tensor out = at::empty({rows, out_features}, x.options());
  auto* y = out.data_ptr<c10::BFloat16>();
  const auto* codes = packed.data_ptr<int8_t>();
  const auto* s = scales.data_ptr<c10::BFloat16>();
  for_each_block(out_features, [&](int64_t b, int64_t columns) {
    const int64_t n0 = b * kBlockN;
    per_block(Int8Block{in, rows, k_padded, codes + b * k_padded * kBlockN, s + n0, columns, y + n0, out_features});
  }, {codes, packed.numel()});
  return out;
}

// Whether int8_mm_rows takes its streaming loop (int8_block_rows<R, false, false>: the row's bias,
// non-temporal prefetch) or the one before it (<R, true, true>: column sums, prefetch into L1): the
// CPU's rule (cpu_features::few_rows_stream_weights: AMD's, not Intel's, where the streaming loop
// is unmeasured) unless a benchmark or test forced one (set_int8_rows_streaming). Both give the same bits. EPYC Zen 4, one thread, the
// loops interleaved in one process (bench/RESULTS.md, 13head): with the weight in cache 1.2x (1
// row) and 1.55x (2 rows) the prefetching loop's speed (~2 cycles a 512-bit vpdpbusd: there the
// products bound it); from memory 1.07-1.37x at 1-2 rows on the default model's projections and
// its 28 MB LM head. Tried and slower from memory: 2, 4 or 8 streams at once through a block.
cpu_features::StreamingChoice int8_rows_streaming_choice;

template <int R>
BENTO_AVX512_VNNI void int8_block_rows_by(bool streaming, const int8_t* high, const uint8_t* low, const float* row_scale,
                                          int64_t k, const int8_t* codes, const c10::BFloat16* scale, int64_t columns,
                                          c10::BFloat16* out, int64_t ld) {
  if (streaming) return int8_block_rows<R, false, false>(high, low, row_scale, k, codes, scale, columns, out, ld);
  int8_block_rows<R, true, true>(high, low, row_scale, k, codes, scale, columns, out, ld);
}

// The same product for a few rows (a decode step): no tile, the split rows times each block of
// codes two rows at a time (int8_block_rows), threads split the blocks.
at::Tensor int8_mm_rows(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t out_features) {
  const bool streaming = int8_rows_streaming_choice.streaming();
  return int8_vnni_call("int8_mm_rows", x, packed, scales, out_features, [&](const Int8Block& b) {
    for (int64_t m = 0; m < b.rows; m += 2) {
      const int8_t* high = b.in.high + m * b.k_padded;
      const uint8_t* low = b.in.low + m * b.k_padded;
      c10::BFloat16* ym = b.out + m * b.out_stride;
      if (b.rows - m == 1) {
        int8_block_rows_by<1>(streaming, high, low, b.in.scale + m, b.k_padded, b.codes, b.scale, b.columns, ym, b.out_stride);
      } else {
        int8_block_rows_by<2>(streaming, high, low, b.in.scale + m, b.k_padded, b.codes, b.scale, b.columns, ym, b.out_stride);
      }
    }
  });
}

// Rows per register block of int8_rows_dpbusd: 3 rows x 4 groups of 16 columns x 2 planes = 24
// int32 accumulators, 6 broadcast input quads, 1 code vector: 31 of the 32 vector registers.
constexpr int64_t kInt8VectorRows = 3;

// 128 times each column's code sum over one block of int8 codes [K/4][64][4] (column_bias[64]):
// what int8_rows_dpbusd's biased high plane adds. Its one pass over the block also brings the
// codes into cache for the row passes that follow.
BENTO_AVX512_VNNI void int8_column_bias(const int8_t* codes, int64_t k_padded, int32_t* column_bias) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i sums[4];
  for (int i = 0; i < 4; ++i) sums[i] = _mm512_setzero_si512();
  for (int64_t p = 0; p < k_padded / 4; ++p) {
    const int8_t* line = codes + p * kInt8QuadBytes;
    for (int l = 0; l < 4; ++l) _mm_prefetch(reinterpret_cast<const char*>(line + kPrefetchAhead + 64 * l), _MM_HINT_T0);
    for (int i = 0; i < 4; ++i) sums[i] = _mm512_dpbusd_epi32(sums[i], ones, _mm512_loadu_si512(line + 64 * i));
  }
  for (int i = 0; i < 4; ++i) _mm512_storeu_si512(column_bias + 16 * i, _mm512_slli_epi32(sums[i], 7));
}

// int8_block_rows for more rows (CPUs with AVX512-VNNI and no AMX-INT8): R rows of the split input
// times one block of codes, the block's column sums (column_bias) taken once per call rather than
// once per row pair, so every code vector loaded feeds 2 R byte dot products (3 rows: 6) and
// nothing else. Same integer sums, same result rule: y = s_x s_w (256 high . w + low . w).
template <int R>
BENTO_AVX512_VNNI void int8_rows_dpbusd(const int8_t* high, const uint8_t* low, const float* row_scale, int64_t k_padded,
                                        const int8_t* codes, const int32_t* column_bias, const c10::BFloat16* scale,
                                        int64_t columns, c10::BFloat16* out, int64_t out_stride) {
  const __m512i sign = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i acc_high[R][4], acc_low[R][4];
  for (int i = 0; i < 4; ++i)
    for (int r = 0; r < R; ++r) acc_high[r][i] = acc_low[r][i] = _mm512_setzero_si512();
  for (int64_t p = 0; p < k_padded / 4; ++p) {
    const int8_t* line = codes + p * kInt8QuadBytes;
    __m512i h[R], lo[R];
    for (int r = 0; r < R; ++r) {
      int32_t quad_high, quad_low;
      std::memcpy(&quad_high, high + r * k_padded + 4 * p, 4);
      std::memcpy(&quad_low, low + r * k_padded + 4 * p, 4);
      h[r] = _mm512_xor_si512(_mm512_set1_epi32(quad_high), sign);  // high + 128
      lo[r] = _mm512_set1_epi32(quad_low);
    }
    for (int i = 0; i < 4; ++i) {
      const __m512i w = _mm512_loadu_si512(line + 64 * i);
      for (int r = 0; r < R; ++r) {
        acc_high[r][i] = _mm512_dpbusd_epi32(acc_high[r][i], h[r], w);
        acc_low[r][i] = _mm512_dpbusd_epi32(acc_low[r][i], lo[r], w);
      }
    }
  }
  __m512i bias[R][4];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < 4; ++i) bias[r][i] = _mm512_loadu_si512(column_bias + 16 * i);
  store_split_sums<R>(acc_high, acc_low, bias, row_scale, scale, columns, out, out_stride);
}

// x [M, K] bfloat16 @ int8 weight (int8_mm_amx's codes and scales) -> [M, out_features] on CPUs
// with AVX512-VNNI and no AMX-INT8, for more rows than int8_mm_rows: the input split as there
// (split_row), each block's column sums once, then kInt8VectorRows rows at a time over the block
// (in L1/L2 after the first pass); threads split the blocks.
at::Tensor int8_mm_dpbusd(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t out_features) {
  return int8_vnni_call("int8_mm_dpbusd", x, packed, scales, out_features, [&](const Int8Block& b) {
    alignas(64) int32_t column_bias[kBlockN];
    int8_column_bias(b.codes, b.k_padded, column_bias);
    for (int64_t m = 0; m < b.rows; m += kInt8VectorRows) {
      const int8_t* high = b.in.high + m * b.k_padded;
      const uint8_t* low = b.in.low + m * b.k_padded;
      c10::BFloat16* ym = b.out + m * b.out_stride;
      const int64_t k = b.k_padded, n = b.columns, ld = b.out_stride;
      switch (std::min<int64_t>(kInt8VectorRows, b.rows - m)) {
        case 1: int8_rows_dpbusd<1>(high, low, b.in.scale + m, k, b.codes, column_bias, b.scale, n, ym, ld); break;
        case 2: int8_rows_dpbusd<2>(high, low, b.in.scale + m, k, b.codes, column_bias, b.scale, n, ym, ld); break;
        default: int8_rows_dpbusd<3>(high, low, b.in.scale + m, k, b.codes, column_bias, b.scale, n, ym, ld);
      }
    }
  });
}

// The bfloat16 bits of the integers 0-127, as high and low bytes: every int8 code is exactly a
// bfloat16 value (|code| <= 128 needs 8 significant bits; bfloat16 has 8).
struct SmallIntegerBfloat16 {
  alignas(64) uint8_t high[128];
  alignas(64) uint8_t low[128];
  constexpr SmallIntegerBfloat16() : high{}, low{} {
    for (int a = 1; a < 128; ++a) {
      int e = 0;
      while (a >> (e + 1)) ++e;  // a = 2^e (1 + m / 128)
      const int bits = ((127 + e) << 7) | ((a << (7 - e)) & 0x7F);
      high[a] = static_cast<uint8_t>(bits >> 8);
      low[a] = static_cast<uint8_t>(bits & 0xFF);
    }
  }
};
constexpr SmallIntegerBfloat16 kSmallIntegerBfloat16;

// A quad row's 64 bytes (16 columns x inputs 4q..4q+3, column j's at 4j) reordered so that
// widening each 128-bit lane's low and high 8 bytes to 16-bit words (unpacklo/hi) gives pair rows
// 2q and 2q + 1 of 16 columns: lane l's low 8 bytes are columns 4l..4l+3's inputs (4q, 4q + 1),
// its high 8 their inputs (4q + 2, 4q + 3).
struct QuadsToPairs {
  alignas(64) uint8_t bytes[64];
  constexpr QuadsToPairs() : bytes{} {
    for (int l = 0; l < 4; ++l)
      for (int m = 0; m < 4; ++m)
        for (int t = 0; t < 2; ++t) {
          bytes[16 * l + 2 * m + t] = static_cast<uint8_t>(4 * (4 * l + m) + t);
          bytes[16 * l + 8 + 2 * m + t] = static_cast<uint8_t>(4 * (4 * l + m) + 2 + t);
        }
  }
};
constexpr QuadsToPairs kQuadsToPairs;

// Rows of the first pass of int8_mm_dpbf16 over a block, the pass that converts it
// (int8_convert_rows): 4 rows x 4 groups = 16 accumulators, beside the conversion's 7 constants
// and 8 converted vectors.
constexpr int64_t kInt8ConvertRows = 4;

// One block of 64 columns of int8 codes ([K/4][64][4]) into a bfloat16 VNNI tile [K/2][64][2]
// (64-byte aligned) of the codes themselves, exactly (the scales go on the sums), its 16-column
// groups [G0, G1), while its first R rows of x (lda apart, K = k_total even) multiply the
// converted vectors as they come (tile_rows's pair products, then store_tile_sums with the
// scales): the conversion's shuffles and the products' multiply-adds share the loop, so they
// overlap (converting first and multiplying after added their times: the conversion took 0.4x
// bfloat16's time at 16 rows). Per 64 codes one byte permutation into pair order, |code| looked
// up in two 128-entry byte tables (the bfloat16's high and low bytes: vpermi2b), the sign put
// back (and -128, whose |code| the 7-bit index cannot tell from 0), two unpacks into 16-bit
// words. The next block's codes (next, or null) are prefetched to L2 meanwhile.
template <int R, int G0, int G1>
BENTO_AVX512_BF16 void int8_convert_rows(const uint16_t* x, int64_t lda, const int8_t* codes, const int8_t* next, int64_t k_total,
                                         uint16_t* tile, int64_t columns, const c10::BFloat16* column_scale, c10::BFloat16* out,
                                         int64_t out_stride) {
  constexpr int G = G1 - G0;
  const __m512i order = _mm512_load_si512(kQuadsToPairs.bytes);
  const __m512i high0 = _mm512_load_si512(kSmallIntegerBfloat16.high), high1 = _mm512_load_si512(kSmallIntegerBfloat16.high + 64);
  const __m512i low0 = _mm512_load_si512(kSmallIntegerBfloat16.low), low1 = _mm512_load_si512(kSmallIntegerBfloat16.low + 64);
  const __m512i sign = _mm512_set1_epi8(static_cast<char>(0x80)), minus_128 = _mm512_set1_epi8(static_cast<char>(0xC3));
  __m512 acc[R][G];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < G; ++i) acc[r][i] = _mm512_setzero_ps();
  for (int64_t q = 0; 4 * q < k_total; ++q) {
    if (next) {
      for (int i = G0; i < G1; ++i) _mm_prefetch(reinterpret_cast<const char*>(next + q * kInt8QuadBytes + 64 * i), _MM_HINT_T1);
    }
    uint16_t* pair_rows = tile + 2 * q * kBlockN * 2;  // pair rows 2q, 2q + 1
    __m512bh first[G], second[G];
    for (int i = 0; i < G; ++i) {
      const __m512i c = _mm512_permutexvar_epi8(order, _mm512_loadu_si512(codes + q * kInt8QuadBytes + 64 * (G0 + i)));
      const __m512i magnitude = _mm512_abs_epi8(c);  // -128 stays 0x80: bit 7 marks it
      __m512i high = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(high0, magnitude, high1), c, sign, 0xF8);  // | sign
      high = _mm512_mask_mov_epi8(high, _mm512_movepi8_mask(magnitude), minus_128);
      const __m512i low = _mm512_permutex2var_epi8(low0, magnitude, low1);
      const __m512i even = _mm512_unpacklo_epi8(low, high), odd = _mm512_unpackhi_epi8(low, high);
      _mm512_store_si512(pair_rows + 32 * (G0 + i), even);
      _mm512_store_si512(pair_rows + kBlockN * 2 + 32 * (G0 + i), odd);
      first[i] = reinterpret_cast<__m512bh>(even);
      second[i] = reinterpret_cast<__m512bh>(odd);
    }
    const bool both = 4 * q + 2 < k_total;  // K = 2 mod 4: the last quad's second pair lies past x
    for (int r = 0; r < R; ++r) {
      uint32_t pair;
      std::memcpy(&pair, x + r * lda + 4 * q, sizeof(pair));
      const __m512bh xp = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(pair)));
      for (int i = 0; i < G; ++i) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], first[i], xp);
      if (both) {
        std::memcpy(&pair, x + r * lda + 4 * q + 2, sizeof(pair));
        const __m512bh xq = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(pair)));
        for (int i = 0; i < G; ++i) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], second[i], xq);
      }
    }
  }
  store_tile_sums<R, G0, G1>(acc, columns, column_scale, out, out_stride);
}

// int8_convert_rows for the first min(rows, kInt8ConvertRows) rows; returns that count.
template <int G0, int G1>
int64_t int8_convert_first_rows(const uint16_t* x, int64_t lda, int64_t rows, const int8_t* codes, const int8_t* next,
                                int64_t k_total, uint16_t* tile, int64_t columns, const c10::BFloat16* column_scale,
                                c10::BFloat16* out, int64_t out_stride) {
  const int64_t first = std::min(rows, kInt8ConvertRows);
  switch (first) {
    case 1: int8_convert_rows<1, G0, G1>(x, lda, codes, next, k_total, tile, columns, column_scale, out, out_stride); break;
    case 2: int8_convert_rows<2, G0, G1>(x, lda, codes, next, k_total, tile, columns, column_scale, out, out_stride); break;
    case 3: int8_convert_rows<3, G0, G1>(x, lda, codes, next, k_total, tile, columns, column_scale, out, out_stride); break;
    default: int8_convert_rows<4, G0, G1>(x, lda, codes, next, k_total, tile, columns, column_scale, out, out_stride);
  }
  return first;
}

// Whether int8's many-row loop without AMX-INT8 is int8_mm_dpbusd (two VNNI byte products per
// weight) rather than int8_mm_dpbf16: wherever AVX512-BF16's pair products are not the fast way to
// multiply (cpu_features::bf16_pair_products_fast says where, and what was measured).
bool int8_split_bytes_preferred() { return !cpu_features::bf16_pair_products_fast(); }

// x [M, K] bfloat16 @ int8 weight (int8_mm_amx's codes and scales) -> [M, out_features] on CPUs
// with AVX512-BF16 and no AMX, for more rows than int8_mm_rows: vector_tiled_matmul on the tiles
// int8_convert_rows makes (multiplying the first rows on the way), one product per input pair and
// column (int8_mm_dpbusd takes two,
// one per byte of the split input: on Zen 4 that loop ran at ~0.5x bfloat16's speed).
// Accuracy: the input as it is (no 16-bit split), the codes exact, the products exact in float32,
// summed in float32 (vdpbf16ps: subnormal inputs count as 0), then times the column's bfloat16
// scale and rounded once to bfloat16: a bfloat16 matmul's rule on the weight code * scale.
at::Tensor int8_mm_dpbf16(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t out_features) {
  TORCH_CHECK(avx512_bf16_supported(), "int8_mm_dpbf16 needs a CPU with AVX512-BF16 and AVX512-VBMI");
  check_int8(packed, scales, out_features);
  const int64_t k_padded = packed.size(1) * 4;
  check_int8_input(x, k_padded);
  // Pairs of inputs: an odd K takes one zero column (its codes are the zero padding).
  const at::Tensor even = x.size(1) % 2 ? at::constant_pad_nd(x, {0, 1}) : x;
  const auto* codes = packed.data_ptr<int8_t>();
  const auto* scale = scales.data_ptr<c10::BFloat16>();
  const auto* a = reinterpret_cast<const uint16_t*>(even.data_ptr<c10::BFloat16>());
  const int64_t rows = x.size(0), lda = even.stride(0), k_total = even.size(1), block = k_padded * kBlockN;
  return vector_tiled_matmul(even, out_features, k_padded, scale,
                             [&](int64_t b, int64_t next, uint16_t* tile, int h0, int h1, c10::BFloat16* out) -> int64_t {
    const int8_t *from = codes + b * block, *ahead = next >= 0 ? codes + next * block : nullptr;
    const int64_t columns = std::min(kBlockN, out_features - b * kBlockN);
    const c10::BFloat16* s = scale + b * kBlockN;
    if (h0 == 0 && h1 == 2) return int8_convert_first_rows<0, 4>(a, lda, rows, from, ahead, k_total, tile, columns, s, out, out_features);
    if (h0 == 0) return int8_convert_first_rows<0, 2>(a, lda, rows, from, ahead, k_total, tile, columns, s, out, out_features);
    return int8_convert_first_rows<2, 4>(a, lda, rows, from, ahead, k_total, tile, columns, s, out, out_features);
  });
}

// One row of K bfloat16 (or float32: T) values as int8 codes with one float32 scale (max |x| / 127,
// symmetric; codes rounded to nearest even). A function of its own, not the parallel_for lambda's
// body: a lambda does not inherit its enclosing function's target attribute, so AVX-512
// intrinsics in it fail to compile in an AVX2 build of this file.
template <typename T>
BENTO_AVX512 void quantize_row(const T* in, int64_t k_total, int8_t* codes, float* scale_out, bool biased) {
  const float scale = input_scale(max_abs(in, k_total), 127.0f);
  *scale_out = scale;
  const __m512 inverse = _mm512_set1_ps(1.0f / scale);
  const __m128i bias = _mm_set1_epi8(biased ? -128 : 0);
  for (int64_t k = 0; k < k_total; k += 16) {
    const __mmask16 mask = static_cast<__mmask16>((1u << std::min<int64_t>(16, k_total - k)) - 1);
    const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(load_floats(in + k, mask), inverse));  // round to nearest even
    _mm_mask_storeu_epi8(codes + k, mask, _mm_xor_si128(_mm512_cvtsepi32_epi8(q), bias));
  }
}

// One butterfly stage of the Walsh-Hadamard transform inside a vector: lanes i and i ^ h
// (partner, h < 16) become x_i + x_(i^h) where bit h of i is clear (sign +1) and x_(i^h) - x_i
// where it is set (sign -1): one fused multiply-add.
BENTO_AVX512 inline __m512 butterfly(__m512 x, __m512 partner, __mmask16 high_lanes) {
  return _mm512_fmadd_ps(x, _mm512_mask_blend_ps(high_lanes, _mm512_set1_ps(1.0f), _mm512_set1_ps(-1.0f)), partner);
}

// Row `in` [K] (bfloat16 or float32: T) as float32 into `work` (64-byte aligned) and multiplied there by the
// unnormalized Hadamard matrix of `block` columns, block by block (block: a power of two >= 16
// dividing K, Span the vectors of min(block, 256) columns); returns the result's max |value|.
// The transform's log2(block) butterfly passes run on Span vectors at a time in registers (the
// first four between lanes of one vector, the next between vectors), the rest between vectors
// in `work`, which stays in L1: two or three passes over the row in all, not log2(block).
template <int Span, typename T>
BENTO_AVX512 float hadamard_row(const T* in, int64_t k_total, int64_t block, float* work) {
  const bool in_registers = block == 16 * Span;
  __m512 max = _mm512_setzero_ps();
  for (int64_t k = 0; k < k_total; k += 16 * Span) {
    __m512 v[Span];
    for (int c = 0; c < Span; ++c) {
      __m512 x = load_floats(in + k + 16 * c, 0xFFFF);
      x = butterfly(x, _mm512_permute_ps(x, 0xB1), 0xAAAA);        // h = 1: swap neighbours
      x = butterfly(x, _mm512_permute_ps(x, 0x4E), 0xCCCC);        // h = 2: swap pairs
      x = butterfly(x, _mm512_shuffle_f32x4(x, x, 0xB1), 0xF0F0);  // h = 4: swap 128-bit quarters
      v[c] = butterfly(x, _mm512_shuffle_f32x4(x, x, 0x4E), 0xFF00);  // h = 8: swap 256-bit halves
    }
    for (int h = 1; h < Span; h *= 2) {  // h vectors = 16 h columns apart
      for (int c = 0; c < Span; ++c) {
        if (c & h) continue;
        const __m512 a = v[c], b = v[c + h];
        v[c] = _mm512_add_ps(a, b);
        v[c + h] = _mm512_sub_ps(a, b);
      }
    }
    for (int c = 0; c < Span; ++c) {
      _mm512_store_ps(work + k + 16 * c, v[c]);
      if (in_registers) max = _mm512_max_ps(max, _mm512_abs_ps(v[c]));
    }
  }
  for (int64_t h = 16 * Span; h < block; h *= 2) {
    const bool last = 2 * h == block;
    for (int64_t span = 0; span < k_total; span += 2 * h) {
      for (int64_t k = span; k < span + h; k += 16) {
        const __m512 a = _mm512_load_ps(work + k), b = _mm512_load_ps(work + k + h);
        const __m512 sum = _mm512_add_ps(a, b), difference = _mm512_sub_ps(a, b);
        _mm512_store_ps(work + k, sum);
        _mm512_store_ps(work + k + h, difference);
        if (last) max = _mm512_max_ps(max, _mm512_max_ps(_mm512_abs_ps(sum), _mm512_abs_ps(difference)));
      }
    }
  }
  return _mm512_reduce_max_ps(max);
}

// One row as quantize_row does, after rotating it by the block Hadamard matrix (w8a8's input
// side of y = (x R)(W R)^T; engine/layers/rotation.py rotates the weight at load), in `work`
// (K float32). The transform is unnormalized (entries +-1): its 1 / sqrt(block) goes into the
// row's scale.
template <typename T>
BENTO_AVX512 void quantize_rotated_row(const T* in, int64_t k_total, int64_t block, float* work, int8_t* codes,
                                       float* scale_out, bool biased) {
  float top;
  switch (std::min<int64_t>(block / 16, 16)) {
    case 1: top = hadamard_row<1, T>(in, k_total, block, work); break;
    case 2: top = hadamard_row<2, T>(in, k_total, block, work); break;
    case 4: top = hadamard_row<4, T>(in, k_total, block, work); break;
    case 8: top = hadamard_row<8, T>(in, k_total, block, work); break;
    default: top = hadamard_row<16, T>(in, k_total, block, work);
  }
  const float scale = top > 0.0f ? top / 127.0f : 1.0f;
  *scale_out = scale / std::sqrt(static_cast<float>(block));
  const __m512 inverse = _mm512_set1_ps(1.0f / scale);
  const __m128i bias = _mm_set1_epi8(biased ? -128 : 0);
  for (int64_t k = 0; k < k_total; k += 16) {
    const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_load_ps(work + k), inverse));  // round to nearest even
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + k), _mm_xor_si128(_mm512_cvtsepi32_epi8(q), bias));
  }
}

// Each row of x [M, K] (bfloat16 bits or float32: T) as int8 codes with one float32 scale, rotated
// first where rotation_block > 0 (then K is a multiple of it). K is a multiple of 4. biased: each code stored
// as the unsigned byte code + 128 (the codes are within +-127, so 1..255), the operand AVX512-VNNI's
// unsigned x signed byte products take (w8a8_mm_vnni).
template <typename T>
void quantize_rows(const T* x, int64_t lda, int64_t rows, int64_t k_total, int64_t rotation_block, int8_t* codes,
                   float* scales, bool biased) {
  kernel_pool::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    auto work = rotation_block > 0 ? aligned_buffer<float>(k_total) : nullptr;
    for (int64_t r = begin; r < end; ++r) {
      const T* row = x + r * lda;
      if (rotation_block > 0) {
        quantize_rotated_row(row, k_total, rotation_block, work.get(), codes + r * k_total, scales + r, biased);
      } else {
        quantize_row(row, k_total, codes + r * k_total, scales + r, biased);
      }
    }
  });
}

// w8a8's output value: sum * (column_scale * row_scale) in float32, in that order. The file builds
// with -fassociative-math, which may regroup a chain of products differently in each loop; the
// empty asm makes the scales' product opaque, so both kernels round the same float32 (the tests
// redo it in torch bit for bit).
BENTO_AVX512 inline __m512 w8a8_value(__m512i sum, __m512 column_scale, float row_scale) {
  __m512 scale = _mm512_mul_ps(column_scale, _mm512_set1_ps(row_scale));
  asm("" : "+v"(scale));
  return _mm512_mul_ps(_mm512_cvtepi32_ps(sum), scale);
}

// out[m, n0 + j] = result[m, j] * row_scale[m] * column_scale[j] for j < columns, in bfloat16.
BENTO_AVX512_BF16 void store_scaled(const int32_t* result, int64_t rows, int64_t columns, const float* row_scale,
                                    const float* column_scale, c10::BFloat16* out, int64_t out_stride) {
  for (int64_t j = 0; j < columns; j += 16) {
    const __mmask16 mask = static_cast<__mmask16>((1u << std::min<int64_t>(16, columns - j)) - 1);
    const __m512 s = _mm512_maskz_loadu_ps(mask, column_scale + j);
    for (int64_t m = 0; m < rows; ++m) {
      const __m512 v = w8a8_value(_mm512_loadu_si512(result + m * kBlockN + j), s, row_scale[m]);
      _mm256_mask_storeu_epi16(out + m * out_stride + j, mask, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
    }
  }
}

bool amx_int8_supported() {
  // int8_block_rows (1-2 rows) takes AVX512-VNNI's byte dot products: asked too, not implied.
  // Asked once, as amx_bf16_supported(): every int8 op call checks it.
  static const bool supported =
      amx_bf16_supported() && __builtin_cpu_supports("avx512vnni") && at::native::cpublas::could_pack(at::kChar);
  return supported;
}

// w8a8's operands, as both its kernels (w8a8_mm_amx, w8a8_mm_vnni) take them; float_rows: x may be
// float32 too (w8a8_mm_vnni's).
void check_w8a8(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t out_features,
                int64_t rotation_block, bool float_rows = false) {
  if (float_rows) {
    TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat) && x.stride(1) == 1,
                "x: a [rows, K] bfloat16 or float32 matrix");
  } else {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.stride(1) == 1, "x: a [rows, K] bfloat16 matrix");
  }
  const int64_t k_total = x.size(1), n_padded = k_total > 0 ? packed.numel() / k_total : 0;
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.is_contiguous() && k_total % 4 == 0 && n_padded % kBlockN == 0 &&
                  packed.numel() == n_padded * k_total && out_features <= n_padded,
              "packed: [N/64, K/4, 64, 4] int8 codes");
  TORCH_CHECK(k_total <= kInt8MaxK, "w8a8: at most ", kInt8MaxK, " inputs (its int32 sums would wrap)");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() >= out_features, "scales: [N] float32");
  TORCH_CHECK(rotation_block == 0 || (rotation_block >= 16 && (rotation_block & (rotation_block - 1)) == 0 &&
                                      k_total % rotation_block == 0),
              "rotation_block: 0 or a power of two >= 16 dividing K");
}

// w8a8: x [M, K] bfloat16, quantized per row to int8 here, @ int8 weight codes in brgemm's VNNI
// layout [N/64][K/4][64][4] with a float32 scale per output row -> [M, out_features]. Nothing is
// converted per weight: AMX multiplies the codes as they are (int8 x int8 -> int32).
// rotation_block > 0: the codes are of W R (R block Hadamard, engine/layers/rotation.py), and each
// input row is rotated by the same R before its rounding.
at::Tensor w8a8_mm_amx(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t out_features,
                       int64_t rotation_block) {
  TORCH_CHECK(amx_int8_supported(), "w8a8 needs a CPU with AMX-INT8");
  check_w8a8(x, packed, scales, out_features, rotation_block);
  const int64_t rows = x.size(0), k_total = x.size(1);
  auto codes = aligned_buffer<int8_t>(rows * k_total);
  auto row_scale = aligned_buffer<float>(rows);
  quantize_rows(reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>()), x.stride(0), rows, k_total, rotation_block,
                codes.get(), row_scale.get(), false);
  at::Tensor out = at::empty({rows, out_features}, x.options());
  auto* y = out.data_ptr<c10::BFloat16>();
  const auto* w = packed.data_ptr<int8_t>();
  const float* column_scale = scales.data_ptr<float>();
  const std::vector<std::pair<int64_t, int64_t>> chunks = row_chunks(rows);
  const int64_t blocks = (out_features + kBlockN - 1) / kBlockN;
  kernel_pool::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    auto result = aligned_buffer<int32_t>(std::min(rows, kMaxRows) * kBlockN);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t columns = std::min(kBlockN, out_features - b * kBlockN);
      for (const auto& [m, mb] : chunks) {
        at::native::cpublas::brgemm(mb, kBlockN, k_total, k_total, kBlockN, kBlockN, false,
                                    reinterpret_cast<const signed char*>(codes.get() + m * k_total),
                                    reinterpret_cast<const signed char*>(w + b * kBlockN * k_total), result.get());
        store_scaled(result.get(), mb, columns, row_scale.get() + m, column_scale + b * kBlockN, y + m * out_features + b * kBlockN,
                     out_features);
      }
    }
    at::native::cpublas::brgemm_release();
  });
  return out;
}

// w8a8 without AMX-INT8 (CPUs with AVX512-VNNI: Zen 4/5, Xeons whose AMX a VM hides, and Cascade
// Lake and Ice Lake, which lack AVX512-BF16 and take float32 rows: w8a8_vnni_supported()). VNNI's byte
// dot product (vpdpbusd) multiplies unsigned by signed bytes, so each input row is quantized
// biased (quantize_rows: u = code + 128) and the weight's codes stay as they are, w8a8_mm_amx's
// layout: u . w = x . w + 128 sum(w), and the second term (a column's code sum, taken per call in
// the same instruction) is subtracted in int32, so the sums, and the outputs, are w8a8_mm_amx's
// exactly. One vpdpbusd makes 64 byte products where vdpbf16ps makes 32 pair products, at the same
// rate on Zen 4 (one 512-bit instruction a cycle a core, measured): twice bfloat16's peak.

// w8a8_unit_rows' register blocks, rows x 16-column vectors. From kW8a8FewRows + 1 rows: 6 x 2 over
// 32-column units (12 int32 accumulators, one broadcast input quad per 2 products), the shape a
// Zen 4 core ran at 224 G byte products a second (97% of vpdpbusd's rate; 3 x 4: 160, 4 x 4: 168,
// 8 x 2: 214, a loop over one block's codes in L1). Up to kW8a8FewRows rows the codes' read bounds
// a call, so it takes whole 64-column blocks (rows x 4): each pass reads every 256-byte quad row
// whole, where a 32-column unit reads half of it and leaves the rest to the next unit. A/B in one
// process (two threads, 30 weights per shape of the default model's): 0.75-1.00x the 32-column
// units' time at 1-2 rows (mostly 0.86-0.96x), 0.92-1.13x at 4, where the 9-block projections
// split 5/4 between two threads.
constexpr int kW8a8Rows = 6;
constexpr int kW8a8FewRows = 2;

// R biased input rows (k_total bytes apart) times one unit of 16 C columns (C 64-byte vectors of
// each 256-byte quad row) -> out[r][j] = (u_r . w_j - bias_j) * (s_w[j] * s_x[r]) for j < columns
// (w8a8_value, as w8a8_mm_amx's store_scaled), as Out: float, or bfloat16 (staged as floats and
// converted by store_block: its vcvtneps2bf16 is AVX512-BF16's, which this loop does not ask of
// the CPU). Bias: the unit's bias_j = 128 sum_k w_kj, what the biased input adds, taken in this
// pass first (one more byte product per code vector, with ones) and stored, else read. next (or
// null): the next unit's codes, asked into L2 at the offset this pass reads, so that unit's first
// pass finds them there.
template <int R, int C, bool Bias, typename Out>
BENTO_AVX512_INT8 void w8a8_unit_rows(const uint8_t* in, int64_t k_total, const int8_t* unit, int32_t* bias,
                                      const int8_t* next, const float* row_scale, const float* column_scale, int64_t columns,
                                      Out* out, int64_t out_stride) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i acc[R][C], sums[C];
  for (int i = 0; i < C; ++i) {
    sums[i] = _mm512_setzero_si512();
    for (int r = 0; r < R; ++r) acc[r][i] = _mm512_setzero_si512();
  }
  for (int64_t k = 0; k < k_total; k += 4) {
    const int8_t* quad = unit + k * kBlockN;
    __m512i w[C];
    for (int i = 0; i < C; ++i) {
      if (next != nullptr) _mm_prefetch(reinterpret_cast<const char*>(next + k * kBlockN + 64 * i), _MM_HINT_T1);
      w[i] = _mm512_loadu_si512(quad + 64 * i);
      if (Bias) sums[i] = _mm512_dpbusd_epi32(sums[i], ones, w[i]);
    }
    for (int r = 0; r < R; ++r) {
      int32_t four;
      std::memcpy(&four, in + r * k_total + k, sizeof(four));
      const __m512i u = _mm512_set1_epi32(four);
      for (int i = 0; i < C; ++i) acc[r][i] = _mm512_dpbusd_epi32(acc[r][i], u, w[i]);
    }
  }
  if (Bias) {
    for (int i = 0; i < C; ++i) _mm512_storeu_si512(bias + 16 * i, _mm512_slli_epi32(sums[i], 7));
  }
  constexpr bool to_float = std::is_same_v<Out, float>;
  [[maybe_unused]] alignas(64) float staged[to_float ? 1 : R][16 * C];
  for (int i = 0; i < C && 16 * i < columns; ++i) {
    const __mmask16 mask = static_cast<__mmask16>((1u << std::min<int64_t>(16, columns - 16 * i)) - 1);
    const __m512 s = _mm512_maskz_loadu_ps(mask, column_scale + 16 * i);
    const __m512i b = _mm512_loadu_si512(bias + 16 * i);
    for (int r = 0; r < R; ++r) {
      const __m512 v = w8a8_value(_mm512_sub_epi32(acc[r][i], b), s, row_scale[r]);
      if constexpr (to_float) {
        _mm512_mask_storeu_ps(out + r * out_stride + 16 * i, mask, v);
      } else {
        _mm512_store_ps(&staged[r][16 * i], v);
      }
    }
  }
  if constexpr (!to_float) store_block(&staged[0][0], 16 * C, R, columns, out, out_stride);
}

// w8a8_unit_rows for `rows` (1..MaxRows) rows: the instantiation of that R.
template <int C, bool Bias, int MaxRows, typename Out, int R = 1>
void w8a8_unit_rows_by(int rows, const uint8_t* in, int64_t k_total, const int8_t* unit, int32_t* bias, const int8_t* next,
                       const float* row_scale, const float* column_scale, int64_t columns, Out* out, int64_t out_stride) {
  if constexpr (R < MaxRows) {
    if (rows > R) {
      return w8a8_unit_rows_by<C, Bias, MaxRows, Out, R + 1>(rows, in, k_total, unit, bias, next, row_scale, column_scale,
                                                              columns, out, out_stride);
    }
  }
  w8a8_unit_rows<R, C, Bias, Out>(in, k_total, unit, bias, next, row_scale, column_scale, columns, out, out_stride);
}

// A thread's units of 16 C columns [begin, end) times every biased input row, in chunks of
// kRowChunk rows (they stay in L2 while the units' codes pass), MaxRows rows a pass. A unit's
// first pass of a chunk asks the next unit's codes into L2 (the first chunk's also takes the
// unit's bias); the rest read them from cache.
template <int C, int MaxRows, typename Out>
void w8a8_units(const uint8_t* in, const float* row_scale, int64_t rows, int64_t k_total, const int8_t* codes,
                const float* column_scale, int64_t out_features, int64_t begin, int64_t end, Out* y) {
  constexpr int64_t width = 16 * C;
  auto bias = aligned_buffer<int32_t>((end - begin) * width);
  const auto unit_codes = [&](int64_t u) { return codes + (u * width / kBlockN) * kBlockN * k_total + (u * width % kBlockN) * 4; };
  for (int64_t m0 = 0; m0 < rows; m0 += kRowChunk) {
    const int64_t m1 = std::min(rows, m0 + kRowChunk);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t n0 = u * width, columns = std::min(width, out_features - n0);
      const int8_t* unit = unit_codes(u);
      const int8_t* next = u + 1 < end ? unit_codes(u + 1) : nullptr;
      int32_t* unit_bias = bias.get() + (u - begin) * width;
      for (int64_t m = m0; m < m1; m += MaxRows) {
        const int r = static_cast<int>(std::min<int64_t>(MaxRows, m1 - m));
        if (m == 0) {
          w8a8_unit_rows_by<C, true, MaxRows, Out>(r, in + m * k_total, k_total, unit, unit_bias, next, row_scale + m,
                                                   column_scale + n0, columns, y + m * out_features + n0, out_features);
        } else {
          w8a8_unit_rows_by<C, false, MaxRows, Out>(r, in + m * k_total, k_total, unit, unit_bias, m == m0 ? next : nullptr,
                                                    row_scale + m, column_scale + n0, columns, y + m * out_features + n0,
                                                    out_features);
        }
      }
    }
  }
}

// AVX-512 with AVX512-VNNI (Cascade Lake on; no AVX512-BF16 needed): what w8a8_mm_vnni asks of
// the CPU for float32 rows (bfloat16 rows: avx512_vnni_supported() too, for their conversion).
bool w8a8_vnni_supported() {
  static const bool supported = cpu_features::avx512_core() && __builtin_cpu_supports("avx512vnni");
  return supported;
}

// w8a8_mm_amx's product on AVX512-VNNI, equal to it bit for bit on bfloat16 rows; float32 rows (a
// float32 model's) come out in float32, the same sums unrounded. Threads split 32-column units (so
// the default model's 576-column projections split 9/9, not by 64-column blocks 5/4), or, up to
// kW8a8FewRows rows, 64-column blocks.
at::Tensor w8a8_mm_vnni(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, int64_t out_features,
                        int64_t rotation_block) {
  check_w8a8(x, packed, scales, out_features, rotation_block, true);
  const bool float_rows = x.scalar_type() == at::kFloat;
  TORCH_CHECK(float_rows ? w8a8_vnni_supported() : avx512_vnni_supported(),
              float_rows ? "w8a8_mm_vnni needs a CPU with AVX512-VNNI"
                         : "w8a8_mm_vnni on bfloat16 rows needs a CPU with AVX512-VNNI and AVX512-BF16 (float32 rows: AVX512-VNNI)");
  const int64_t rows = x.size(0), k_total = x.size(1);
  // The biased rows, then their scales (rows * K is a multiple of 4 bytes), in the calling
  // thread's block_buffer: no allocation or page faults per call, as int8's SplitInput.
  auto* in = reinterpret_cast<uint8_t*>(block_buffer((rows * k_total + rows * static_cast<int64_t>(sizeof(float)) + 1) / 2));
  auto* row_scale = reinterpret_cast<float*>(in + rows * k_total);
  auto* codes = reinterpret_cast<int8_t*>(in);
  if (float_rows) {
    quantize_rows(x.data_ptr<float>(), x.stride(0), rows, k_total, rotation_block, codes, row_scale, true);
  } else {
    quantize_rows(reinterpret_cast<const uint16_t*>(x.data_ptr<c10::BFloat16>()), x.stride(0), rows, k_total, rotation_block,
                  codes, row_scale, true);
  }
  at::Tensor out = at::empty({rows, out_features}, x.options());
  const bool few = rows <= kW8a8FewRows;
  const int64_t width = few ? kBlockN : kBlockN / 2, units = (out_features + width - 1) / width;
  kernel_pool::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    const int8_t* w = packed.data_ptr<int8_t>();
    const float* column_scale = scales.data_ptr<float>();
    if (float_rows) {
      const auto units_of = few ? w8a8_units<4, kW8a8FewRows, float> : w8a8_units<2, kW8a8Rows, float>;
      units_of(in, row_scale, rows, k_total, w, column_scale, out_features, begin, end, out.data_ptr<float>());
    } else {
      const auto units_of = few ? w8a8_units<4, kW8a8FewRows, c10::BFloat16> : w8a8_units<2, kW8a8Rows, c10::BFloat16>;
      units_of(in, row_scale, rows, k_total, w, column_scale, out_features, begin, end, out.data_ptr<c10::BFloat16>());
    }
  }, {packed.data_ptr(), packed.numel()});
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bento_llm, m) {
  m.def("amx_bf16_supported() -> bool", &amx_bf16_supported);
  m.def("int4_mm_amx(Tensor x, Tensor packed, Tensor scales_and_zeros, int group_size, int out_features) -> Tensor",
        &int4_mm_amx);
  m.def("int4_mm_rows(Tensor x, Tensor packed, Tensor scales_and_zeros, int group_size, int out_features) -> Tensor",
        &int4_mm_rows);
  m.def("int4_dequantize(Tensor packed, Tensor scales_and_zeros, int group_size, int out_features) -> Tensor", &int4_dequantize);
  m.def("int8_dequantize(Tensor packed, Tensor scales, int out_features) -> Tensor", &int8_dequantize);
  m.def("int8_mm_amx(Tensor x, Tensor packed, Tensor scales, int out_features) -> Tensor", &int8_mm_amx);
  m.def("int8_mm_rows(Tensor x, Tensor packed, Tensor scales, int out_features) -> Tensor", &int8_mm_rows);
  // Benchmarks and tests: int8_mm_rows on its streaming loop (true), its prefetching loop (false) or
  // the CPU's rule (None); profile_step-style A/Bs time one against the other.
  m.def("set_int8_rows_streaming(bool? on) -> ()", [](std::optional<bool> on) { int8_rows_streaming_choice.force(on); });
  m.def("amx_int8_supported() -> bool", &amx_int8_supported);
  m.def("avx512_bf16_supported() -> bool", &avx512_bf16_supported);
  m.def("avx512_vnni_supported() -> bool", &avx512_vnni_supported);
  m.def("w8a8_vnni_supported() -> bool", &w8a8_vnni_supported);
  m.def("int4_mm_dpbf16(Tensor x, Tensor packed, Tensor scales_and_zeros, int group_size, int out_features) -> Tensor",
        &int4_mm_dpbf16);
  m.def("int8_mm_dpbusd(Tensor x, Tensor packed, Tensor scales, int out_features) -> Tensor", &int8_mm_dpbusd);
  m.def("int8_mm_dpbf16(Tensor x, Tensor packed, Tensor scales, int out_features) -> Tensor", &int8_mm_dpbf16);
  m.def("int8_split_bytes_preferred() -> bool", &int8_split_bytes_preferred);
  m.def("w8a8_mm_amx(Tensor x, Tensor packed, Tensor scales, int out_features, int rotation_block=0) -> Tensor",
        &w8a8_mm_amx);
  m.def("w8a8_mm_vnni(Tensor x, Tensor packed, Tensor scales, int out_features, int rotation_block=0) -> Tensor",
        &w8a8_mm_vnni);
}
