// How fast two threads read a weight-sized buffer in the access patterns a batch-1 bfloat16 projection
// could use, in interleaved rounds (the host's bandwidth drifts), as GB/s and as a ratio to one
// sequential stream per thread (bench_limits.py's float32 sum reads that way):
// - seq: each thread sums its half front to back (4 accumulators);
// - strips: bf16_linear.cpp's streaming loop over the column strips (amx_linear_pack's layout): 8 strips
//   of K/2 x 64 bytes at once, line j of each in turn, so 8 streams a thread; K 576 (18 KiB strips, the
//   default model's qkv/o/gate_up) and K 1536 (48 KiB, its down_proj); "+dp" adds the loop's vdpbf16ps
//   on each line (the products the kernel does), plain "strips" only an add;
// - inter: the same 8 strips' lines interleaved in memory (one stream a thread), as a repacked layout
//   would read them.
//
//   gcc -O3 -march=native -fopenmp bench/read_patterns.c -o /tmp/read_patterns && /tmp/read_patterns 10
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define BYTES (256ul << 20) /* the default model's bfloat16 weights read a step: 257 MiB */
#define LANES_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

LANES_TARGET static float seq(const char* p, size_t n) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i < n; i += 256) {
    a0 = _mm512_add_ps(a0, _mm512_load_ps((const float*)(p + i)));
    a1 = _mm512_add_ps(a1, _mm512_load_ps((const float*)(p + i + 64)));
    a2 = _mm512_add_ps(a2, _mm512_load_ps((const float*)(p + i + 128)));
    a3 = _mm512_add_ps(a3, _mm512_load_ps((const float*)(p + i + 192)));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

// Line j of strip s at base + s * strip_bytes + j (strips) or base + j * 8 + s * 64 (interleaved).
LANES_TARGET static float strips(const char* p, size_t n, size_t strip_bytes, int interleaved, int products) {
  __m512 acc[8];
  for (int s = 0; s < 8; s++) acc[s] = _mm512_setzero_ps();
  const __m512i x = _mm512_set1_epi32(0x3f803f80);  // a broadcast input pair (1.0, 1.0)
  for (size_t base = 0; base + 8 * strip_bytes <= n; base += 8 * strip_bytes) {
    for (size_t j = 0; j < strip_bytes; j += 64) {
      for (int s = 0; s < 8; s++) {
        const size_t at = interleaved ? base + j * 8 + s * 64 : base + s * strip_bytes + j;
        const __m512 w = _mm512_load_ps((const float*)(p + at));
        acc[s] = products ? _mm512_dpbf16_ps(acc[s], (__m512bh)_mm512_castps_si512(w), (__m512bh)x)
                          : _mm512_add_ps(acc[s], w);
      }
    }
  }
  for (int s = 1; s < 8; s++) acc[0] = _mm512_add_ps(acc[0], acc[s]);
  return _mm512_reduce_add_ps(acc[0]);
}

static int by_value(const void* a, const void* b) {
  const double x = *(const double*)a, y = *(const double*)b;
  return (x > y) - (x < y);
}

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? atoi(argv[1]) : 8;
  char* buffer = aligned_alloc(2 << 20, BYTES);
  memset(buffer, 1, BYTES);
  enum { SEQ, STRIPS_576, STRIPS_1536, STRIPS_576_DP, STRIPS_1536_DP, INTER_576, INTER_576_DP, PATTERNS };
  const char* names[PATTERNS] = {"seq", "strips K576", "strips K1536", "strips K576+dp", "strips K1536+dp",
                                 "inter K576", "inter K576+dp"};
  double* rates = calloc((size_t)PATTERNS * rounds, sizeof(double));
  volatile float sink = 0;
  for (int r = 0; r < rounds; r++) {
    for (int k = 0; k < PATTERNS; k++) {
      float total = 0;
      const double start = now();
#pragma omp parallel num_threads(2) reduction(+ : total)
      {
        const size_t half = BYTES / 2;
        const char* p = buffer + omp_get_thread_num() * half;
        switch (k) {
          case SEQ: total += seq(p, half); break;
          case STRIPS_576: total += strips(p, half, 576 * 32, 0, 0); break;
          case STRIPS_1536: total += strips(p, half, 1536 * 32, 0, 0); break;
          case STRIPS_576_DP: total += strips(p, half, 576 * 32, 0, 1); break;
          case STRIPS_1536_DP: total += strips(p, half, 1536 * 32, 0, 1); break;
          case INTER_576: total += strips(p, half, 576 * 32, 1, 0); break;
          case INTER_576_DP: total += strips(p, half, 576 * 32, 1, 1); break;
        }
      }
      rates[k * rounds + r] = BYTES / (now() - start) / 1e9;
      sink += total;
    }
  }
  printf("| pattern (2 threads, %d rounds) | GB/s median | min-max | median of its ratio to seq per round |\n", rounds);
  printf("| --- | --- | --- | --- |\n");
  for (int k = 0; k < PATTERNS; k++) {
    double sorted[rounds], ratio[rounds];
    for (int r = 0; r < rounds; r++) {
      sorted[r] = rates[k * rounds + r];
      ratio[r] = rates[k * rounds + r] / rates[SEQ * rounds + r];
    }
    qsort(sorted, rounds, sizeof(double), by_value);
    qsort(ratio, rounds, sizeof(double), by_value);
    printf("| %s | %.1f | %.1f-%.1f | %.2f |\n", names[k], sorted[rounds / 2], sorted[0], sorted[rounds - 1],
           ratio[rounds / 2]);
  }
  return 0;
}
