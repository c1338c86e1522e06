// AMX tile microkernels for bfloat16 x bfloat16 -> float32 blocks, written on the tile
// intrinsics (no oneDNN): the building block of amx_linear.cpp, usable by any matmul whose
// weight is packed in column-tile strips (below).
//
// Tiles: every one of the 8 tile registers is configured as 16 rows x 64 bytes (configure_tiles):
// an A tile is 16 input rows x 32 bfloat16 of K, read straight from a row-major input (any row
// stride); a B tile is 16 K pairs x 16 columns x 2 (the VNNI pair layout), one contiguous 1 KB
// block; a C tile is 16 rows x 16 float32. _tile_dpbf16ps(C, A, B) adds A . B into C.
//
// Weight strips: column tile n (16 output columns) of a [N, K] weight is K / 32 B tiles back to
// back, strip[s][p][j][e] = W[16 n + j][32 s + 2 p + e], so a strip streams sequentially along K.
//
// Tile register numbers must be literals (GCC's intrinsics paste them into the asm), hence the
// explicit bodies. Per thread: call configure_tiles() before the first block and release_tiles()
// after the last (other AMX users, oneDNN included, load their own configuration each time they
// start; torch's cpublas::brgemm reloads its own after brgemm_release(), which its callers here do).

#pragma once

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>

namespace amx_tiles {

#define AMX_TILES_TARGET __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

constexpr int64_t kRows = 16;          // rows of an A or C tile
constexpr int64_t kK = 32;             // bfloat16 of K per A tile row (one B tile: 16 pairs)
constexpr int64_t kColumns = 16;       // columns of a B or C tile
constexpr int64_t kTileElems = 512;    // bfloat16 in one B tile (1 KB)

// Linux grants a process AMX tile data only on request (arch_prctl ARCH_REQ_XCOMP_PERM); asked
// once, process-wide. False where the kernel or the CPU refuses.
inline bool request_permission() {
  static const bool granted = [] {
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return granted;
}

inline bool supported() {
  return __builtin_cpu_supports("amx-bf16") && __builtin_cpu_supports("avx512bf16") && request_permission();
}

// Every tile 16 rows x 64 bytes: an A tile 16 rows x 32 bfloat16, a B tile 16 K pairs x 16
// columns x 2, a C tile 16 x 16 float32.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {kRows, kRows, kRows, kRows, kRows, kRows, kRows, kRows};
};

// A constant in memory: built on the stack, gcc may drop the stores ldtilecfg reads (it does not
// see the instruction read them; quant_ops.cpp's tile loop met that).
inline const TileConfig kTileConfig;

AMX_TILES_TARGET inline void configure_tiles() { _tile_loadconfig(&kTileConfig); }

AMX_TILES_TARGET inline void release_tiles() { _tile_release(); }

// Prefetch one B tile (16 lines) into L1, `ahead` tiles past the one being read.
AMX_TILES_TARGET inline void prefetch_tile(const uint16_t* tile) {
  const char* p = reinterpret_cast<const char*>(tile);
  for (int line = 0; line < 16; ++line) _mm_prefetch(p + 64 * line, _MM_HINT_T0);
}

// c[16][NR * 16] (float32, row stride ldc floats) = a[16][K] . strips b[0..NR); a has row stride
// lda (bfloat16 elements), K = 32 * steps. prefetch > 0: prefetch each strip's tile that many
// steps ahead (the weight streams from memory: the few-row case).
template <int NR>
AMX_TILES_TARGET void block_1xn(const uint16_t* a, int64_t lda, const uint16_t* const* b, int64_t steps, float* c,
                                int64_t ldc, int64_t prefetch) {
  static_assert(NR >= 1 && NR <= 3, "C 0-2, A 3, B 4-6");
  const int64_t a_stride = lda * 2;
  _tile_zero(0);
  if constexpr (NR > 1) _tile_zero(1);
  if constexpr (NR > 2) _tile_zero(2);
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t off = s * kTileElems;
    if (prefetch) {
      for (int n = 0; n < NR; ++n) prefetch_tile(b[n] + off + prefetch * kTileElems);
    }
    _tile_loadd(3, a + s * kK, a_stride);
    _tile_loadd(4, b[0] + off, 64);
    _tile_dpbf16ps(0, 3, 4);
    if constexpr (NR > 1) {
      _tile_loadd(5, b[1] + off, 64);
      _tile_dpbf16ps(1, 3, 5);
    }
    if constexpr (NR > 2) {
      _tile_loadd(6, b[2] + off, 64);
      _tile_dpbf16ps(2, 3, 6);
    }
  }
  _tile_stored(0, c, ldc * 4);
  if constexpr (NR > 1) _tile_stored(1, c + 16, ldc * 4);
  if constexpr (NR > 2) _tile_stored(2, c + 32, ldc * 4);
}

// A stretch of memory a block prefetches: `lines` 64-byte lines per K step from `from` on.
struct Prefetch {
  const char* from = nullptr;
  int64_t lines = 0;
};

// c[32][NR * 16] = (a0 rows 0-15, a1 rows 16-31) . strips b[0..NR): 2 x NR C tiles, each A and B
// tile loaded once per step for 2 x NR products (the compute-bound, many-row case). Step s also
// prefetches lines [s * n, (s + 1) * n) of each of two streams into L2 (the caller spreads what it
// reads next over its blocks: a tile load that misses L2 stalls the tile unit for its latency).
template <int NR>
AMX_TILES_TARGET void block_2xn(const uint16_t* a0, int64_t lda0, const uint16_t* a1, int64_t lda1,
                                const uint16_t* const* b, int64_t steps, float* c, int64_t ldc,
                                const Prefetch& first, const Prefetch& second) {
  static_assert(NR >= 1 && NR <= 2, "C 0-3, A 4-5, B 6-7");
  _tile_zero(0);
  _tile_zero(2);
  if constexpr (NR > 1) {
    _tile_zero(1);
    _tile_zero(3);
  }
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t off = s * kTileElems;
    for (int64_t line = s * first.lines; line < (s + 1) * first.lines; ++line) _mm_prefetch(first.from + 64 * line, _MM_HINT_T1);
    for (int64_t line = s * second.lines; line < (s + 1) * second.lines; ++line) _mm_prefetch(second.from + 64 * line, _MM_HINT_T1);
    // Each A tile's two products first, so the next step's load into its register can start
    // while the other A tile's products run.
    _tile_loadd(4, a0 + s * kK, lda0 * 2);
    _tile_loadd(6, b[0] + off, 64);
    if constexpr (NR > 1) _tile_loadd(7, b[1] + off, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NR > 1) _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(5, a1 + s * kK, lda1 * 2);
    _tile_dpbf16ps(2, 5, 6);
    if constexpr (NR > 1) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, ldc * 4);
  _tile_stored(2, c + 16 * ldc, ldc * 4);
  if constexpr (NR > 1) {
    _tile_stored(1, c + 16, ldc * 4);
    _tile_stored(3, c + 16 * ldc + 16, ldc * 4);
  }
}

}  // namespace amx_tiles
