// Fused CPU kernels: the "cpu" attention backend (kernels/cpu_ops.py builds this file once per
// machine with torch.utils.cpp_extension and registers the ops as torch.ops.bento_llm.*).
//
// Why they exist: at decode batch sizes a step on a few CPU cores is mostly not matmuls but
// hundreds of small torch ops per layer (norms, rotary, SiLU, cache writes, the gathers around
// SDPA), each paying dispatch and a pass over memory. Each kernel here is one pass, arithmetic in
// float32 whatever the storage dtype, and is tested against the plain-torch ops of
// kernels/reference.py (tests/test_cpu_ops.py).
//
// Shapes follow kernels/reference.py: caches [num_blocks, block_size, num_kv_heads, head_dim],
// rows of a [tokens, ...] tensor may be strided (views into the fused qkv projection), the last
// dimensions must be dense.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <immintrin.h>
#include <torch/library.h>

#include "attention_products.h"
#include "cpu_features.h"
#include "float_rows.h"
#include "layer_kernels.h"
#include "kv_codes.h"
#include "silu_lanes.h"
#include "thread_pool.h"
#include "transpose16.h"

#include <algorithm>
#include <atomic>
#include <bit>
#include <optional>
#include <type_traits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// Rows this small run on the calling thread: waking the pool costs more than the work.
constexpr int64_t kGrainElements = 1 << 15;

inline int64_t row_grain(int64_t row_elements) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, row_elements));
}

void check_rows(const at::Tensor& t, const char* name, int64_t dims) {
  TORCH_CHECK(t.dim() == dims, name, " must have ", dims, " dimensions, got ", t.dim());
  TORCH_CHECK(t.stride(-1) == 1, name, " must be dense in its last dimension");
  if (dims == 3) {
    TORCH_CHECK(t.stride(1) == t.size(2), name, " must be dense within a row");
  }
}

template <typename T>
void rms_norm_row(T* out, const T* x, const float* w, int64_t n, float eps) {
  float sum_sq = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float v = load(x, i);
    sum_sq += v * v;
  }
  const float inv_rms = 1.0f / std::sqrt(sum_sq / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) {
    store(out, i, load(x, i) * inv_rms * w[i]);
  }
}

template <typename T>
void add_row(T* acc, const T* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) store(acc, i, load(acc, i) + load(x, i));
}

void check_norm_args(const at::Tensor& x, const at::Tensor& weight) {
  check_rows(x, "x", 2);
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous(), "weight must be dense float32");
  TORCH_CHECK(weight.numel() == x.size(1), "weight has ", weight.numel(), " elements for rows of ", x.size(1));
}

// An op's output: dense, shaped and typed as it must be (decoder_layer passes its own, kept across calls).
void check_out(const at::Tensor& out, c10::IntArrayRef sizes, at::ScalarType dtype) {
  TORCH_CHECK(out.is_contiguous() && out.sizes() == sizes && out.scalar_type() == dtype, "out must be dense ", sizes,
              " of ", dtype, ", got ", out.sizes(), " of ", out.scalar_type());
}

// out = x / rms(x) * weight, computed in float32 and rounded once to x's dtype.
void rms_norm_into(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& out) {
  check_norm_args(x, weight);
  check_out(out, x.sizes(), x.scalar_type());
  const int64_t rows = x.size(0), n = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const float* w = weight.data_ptr<float>();
    const int64_t stride = x.stride(0);
    kernel_pool::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) rms_norm_row(dst + r * n, src + r * stride, w, n, static_cast<float>(eps));
    });
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  auto out = at::empty(x.sizes(), x.options());
  rms_norm_into(x, weight, eps, out);
  return out;
}

// residual += x (rounded to the residual's dtype, as the unfused add would), then out = the norm
// of the new residual: the pre-norm of one decoder sublayer in one pass.
void add_rms_norm_into(at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& out) {
  check_norm_args(x, weight);
  TORCH_CHECK(residual.is_contiguous() && residual.sizes() == x.sizes(), "residual must be dense and shaped like x");
  TORCH_CHECK(residual.scalar_type() == x.scalar_type(), "residual and x must share a dtype");
  check_out(out, x.sizes(), x.scalar_type());
  const int64_t rows = x.size(0), n = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* res = residual.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const float* w = weight.data_ptr<float>();
    const int64_t stride = x.stride(0);
    kernel_pool::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        add_row(res + r * n, src + r * stride, n);
        rms_norm_row(dst + r * n, res + r * n, w, n, static_cast<float>(eps));
      }
    });
  });
}

at::Tensor add_rms_norm(at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight, double eps) {
  auto out = at::empty(x.sizes(), x.options());
  add_rms_norm_into(residual, x, weight, eps, out);
  return out;
}

template <typename T>
void silu_mul_tail(T* out, const T* gate, const T* up, int64_t begin, int64_t n) {
  for (int64_t i = begin; i < n; ++i) {
    const float g = load(gate, i);
    store(out, i, g * (1.0f / (1.0f + fast_exp(-g))) * load(up, i));
  }
}

#if defined(__AVX512F__)
inline __m512 load_bf16_lanes(const c10::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// bfloat16 rows where the CPU has AVX512-BF16 (every AMX CPU): its rounding is one instruction (the
// same rounding as store's, except that results below float's normal range, 1e-38, become zero).
// Other AVX-512 CPUs keep silu_mul_tail's loop for bfloat16.
__attribute__((target("avx512bf16"))) void silu_mul_row_avx512bf16(c10::BFloat16* out, const c10::BFloat16* gate,
                                                                   int64_t n) {
  const c10::BFloat16* up = gate + n;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = silu_mul_lanes<true>(load_bf16_lanes(gate + i), load_bf16_lanes(up + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
  }
  silu_mul_tail(out, gate, up, i, n);
}

bool cpu_has_avx512bf16() { return cpu_features::avx512_bf16(); }
#endif

template <typename T>
void silu_mul_row(T* out, const T* gate, int64_t n) {
  const T* up = gate + n;
  int64_t i = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (cpu_has_avx512bf16()) return silu_mul_row_avx512bf16(out, gate, n);
  }
  if constexpr (std::is_same_v<T, float>) {
    for (; i + 16 <= n; i += 16) {
      _mm512_storeu_ps(out + i, silu_mul_lanes<false>(_mm512_loadu_ps(gate + i), _mm512_loadu_ps(up + i)));
    }
  }
#endif
  // The rest; all of it in AVX2 builds, for float16, and for bfloat16 without AVX512-BF16.
  silu_mul_tail(out, gate, up, i, n);
}

// SwiGLU's activation: gate_up is [tokens, 2 * I] (gate then up); out [tokens, I] = silu(gate) * up.
void silu_mul_into(const at::Tensor& gate_up, at::Tensor& out) {
  check_rows(gate_up, "gate_up", 2);
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up must have an even number of columns");
  const int64_t rows = gate_up.size(0), n = gate_up.size(1) / 2;
  check_out(out, {rows, n}, gate_up.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_mul", [&] {
    const scalar_t* src = gate_up.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int64_t stride = gate_up.stride(0);
    kernel_pool::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) silu_mul_row(dst + r * n, src + r * stride, n);
    });
  });
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "gate_up", 2);
  auto out = at::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  silu_mul_into(gate_up, out);
  return out;
}

template <typename T>
void rotate_half_row(T* x, const T* c, const T* s, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float a = load(x, i), b = load(x, i + half);
    store(x, i, a * load(c, i) + b * load(s, i));
    store(x, i + half, b * load(c, i + half) + a * load(s, i + half));
  }
}

// In place on qk [tokens, heads, head_dim] (rows may be strided): Hugging Face's rotate-half
// convention, x * cos + roll(x, head_dim / 2) * sin, with cos and sin [tokens, 1, head_dim]
// full-width tables (one row for all heads) whose sin is signed (-sin for the first half), as in
// engine/models/llama.py's RotaryEmbedding.table.
void rotary_embedding_(at::Tensor& qk, const at::Tensor& cos, const at::Tensor& sin) {
  check_rows(qk, "qk", 3);
  TORCH_CHECK(cos.scalar_type() == qk.scalar_type() && sin.scalar_type() == qk.scalar_type(),
              "cos and sin must have qk's dtype");
  TORCH_CHECK(cos.size(0) == qk.size(0) && cos.size(-1) == qk.size(2) && cos.stride(-1) == 1 &&
                  sin.sizes() == cos.sizes() && sin.strides() == cos.strides(),
              "cos and sin must be [tokens, 1, head_dim] tables, dense in the last dimension");
  const int64_t tokens = qk.size(0), heads = qk.size(1), dim = qk.size(2), half = dim / 2;
  TORCH_CHECK(dim % 2 == 0, "head_dim must be even");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qk.scalar_type(), "rotary_embedding_", [&] {
    scalar_t* base = qk.data_ptr<scalar_t>();
    const scalar_t* cos_base = cos.data_ptr<scalar_t>();
    const scalar_t* sin_base = sin.data_ptr<scalar_t>();
    const int64_t stride = qk.stride(0), table_stride = cos.stride(0);
    kernel_pool::parallel_for(0, tokens, row_grain(heads * dim), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* c = cos_base + t * table_stride;
        const scalar_t* s = sin_base + t * table_stride;
        for (int64_t h = 0; h < heads; ++h) rotate_half_row(base + t * stride + h * dim, c, s, half);
      }
    });
  });
}

// ---------------------------------------------------------------- greedy sampling

// logits [rows, vocab] (rows may be strided) -> int64 [rows]: each row's argmax.
at::Tensor argmax_rows(const at::Tensor& logits) {
  check_rows(logits, "logits", 2);
  TORCH_CHECK(logits.size(1) > 0 && logits.size(1) <= std::numeric_limits<int32_t>::max(),
              "logits must have between 1 and 2^31 - 1 columns, got ", logits.size(1));
  const int64_t rows = logits.size(0), n = logits.size(1);
  auto out = at::empty({rows}, logits.options().dtype(at::kLong));
  int64_t* dst = out.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "argmax_rows", [&] {
    const scalar_t* src = logits.data_ptr<scalar_t>();
    const int64_t stride = logits.stride(0);
    kernel_pool::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) dst[r] = argmax_row(src + r * stride, n);
    });
  });
  return out;
}

// ---------------------------------------------------------------- int8 rows, gathered

// A tied embedding's lookup in the LM head's int8 codes: codes [N/64][K/4][64][4] (AMX-INT8's
// order, quant_ops.cpp's int8 matmuls read it; K may be padded past in_features), scales [N] in
// the output dtype (float32, bfloat16 or float16), index int64 or int32 [rows] -> [rows, in_features]
// of code * scale, rounded once to the scales' dtype: the bits of engine/layers/quant.py's gather
// codes.to(dtype) * scales[index] (an int8 code and a 16-bit scale multiply exactly in float32).
//
// rotation_block > 0 (w8a8's table: codes of W R, R the block Hadamard matrix of
// engine/layers/rotation.py): each row is rotated back, times R again (its own inverse), in
// float32 before its one rounding.
//
// Why: that gather was ten torch ops from Python (row block and lane, the strided gather, views,
// the cast, the scales' gather and the product), ~25 us of a batch-1 decode step alone, and several
// times that right after the step's weight read has cycled the caches; this is one. (w8a8's
// rotation as a torch matmul of the rows' blocks took ~185 us a step more, waking OpenMP's threads.)
at::Tensor int8_quad_rows(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& index,
                          int64_t in_features, int64_t rotation_block) {
  TORCH_CHECK(codes.dim() == 4 && codes.size(2) == 64 && codes.size(3) == 4 && codes.scalar_type() == at::kChar &&
                  codes.is_contiguous(),
              "codes must be contiguous int8 [N/64, K/4, 64, 4]");
  TORCH_CHECK(in_features > 0 && in_features <= codes.size(1) * 4, "in_features must be in 1..", codes.size(1) * 4);
  TORCH_CHECK(scales.dim() == 1 && scales.is_contiguous() && scales.size(0) <= codes.size(0) * 64,
              "scales must be contiguous [N], N at most codes' 64 * ", codes.size(0));
  TORCH_CHECK(codes.is_cpu() && scales.is_cpu() && index.is_cpu(), "int8_quad_rows: codes, scales and index must be CPU tensors");
  TORCH_CHECK(scales.scalar_type() == at::kFloat || scales.scalar_type() == at::kBFloat16 || scales.scalar_type() == at::kHalf,
              "scales must be float32, bfloat16 or float16 (the product is formed in float32)");
  TORCH_CHECK(index.dim() == 1 && (index.scalar_type() == at::kLong || index.scalar_type() == at::kInt),
              "index must be int64 or int32 [rows]");
  TORCH_CHECK(rotation_block == 0 || (rotation_block >= 2 && (rotation_block & (rotation_block - 1)) == 0 &&
                                      in_features % rotation_block == 0),
              "rotation_block must be 0 or a power of two dividing in_features ", in_features, ", got ", rotation_block);
  const at::Tensor ids = index.to(at::kLong).contiguous();  // (no copy for a dense int64 index)
  const int64_t rows = ids.size(0), vocab = scales.size(0), quads = codes.size(1);
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(id[r] >= 0 && id[r] < vocab, "index ", id[r], " is out of range for ", vocab, " rows");
  }
  auto out = at::empty({rows, in_features}, scales.options());
  const int8_t* src = codes.data_ptr<int8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, scales.scalar_type(), "int8_quad_rows", [&] {
    const scalar_t* scale = scales.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    kernel_pool::parallel_for(0, rows, row_grain(in_features), [&](int64_t begin, int64_t end) {
      std::vector<float> rotated(rotation_block ? in_features : 0);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t row = id[r];
        // Row `row`'s quad q sits at block row / 64, quad q, lane row % 64.
        const int8_t* lane = src + (row / 64) * quads * 256 + (row % 64) * 4;
        const float s = static_cast<float>(scale[row]);
        scalar_t* o = dst + r * in_features;
        if (rotation_block == 0) {
          for (int64_t c = 0; c < in_features; ++c) {
            o[c] = static_cast<scalar_t>(static_cast<float>(lane[(c / 4) * 256 + c % 4]) * s);
          }
          continue;
        }
        float* v = rotated.data();
        for (int64_t c = 0; c < in_features; ++c) v[c] = static_cast<float>(lane[(c / 4) * 256 + c % 4]) * s;
        // A fast Walsh-Hadamard transform of each block (Sylvester's order, as rotation.py's).
        for (int64_t h = 1; h < rotation_block; h *= 2) {
          for (int64_t i = 0; i < in_features; i += 2 * h) {
            for (int64_t j = i; j < i + h; ++j) {
              const float a = v[j], b = v[j + h];
              v[j] = a + b;
              v[j + h] = a - b;
            }
          }
        }
        const float norm = 1.0f / std::sqrt(static_cast<float>(rotation_block));
        for (int64_t c = 0; c < in_features; ++c) o[c] = static_cast<scalar_t>(v[c] * norm);
      }
    });
  });
  return out;
}

void check_cache(const at::Tensor& cache, const char* name) {
  TORCH_CHECK(cache.dim() == 4 && cache.is_contiguous(), name,
              " must be a dense [num_blocks, block_size, num_kv_heads, head_dim] tensor");
}

// ---------------------------------------------------------------- 8-bit KV cache
//
// A cache of dtype int8 or float8_e4m3fn holds rows of head_dim codes followed by the row's
// scale as the 2 bytes of a float16 (see kernels/reference.py): x ~= code * scale, scale =
// max|x| / 127 (int8, codes rounded to nearest even) or max|x| / 448 (e4m3).

constexpr int64_t kScaleBytes = 2;

bool is_quantized(const at::Tensor& cache) {
  return cache.scalar_type() == at::kChar || cache.scalar_type() == at::kFloat8_e4m3fn;
}

inline float load_scale(const void* row_end) {
  uint16_t bits;
  std::memcpy(&bits, row_end, sizeof(bits));
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// An e4m3 code's value, branch-free so the row loop vectorizes: exponent field e > 0 is the
// float32 with the same mantissa bits and exponent e - 7 + 127; e == 0 (subnormal) is m * 2^-9.
inline float e4m3_value(uint8_t code) {
  const uint32_t mag = code & 0x7Fu;
  const float normal = std::bit_cast<float>((mag << 20) + (120u << 23));
  const float value = mag < 8u ? static_cast<float>(mag) * 0.001953125f : normal;
  return code & 0x80u ? -value : value;
}

// An 8-bit cache's codes in vector registers (kv_codes.h): lanes hold each code's value / unit.
template <typename C>
struct CodeLanes {
  static constexpr bool e4m3 = std::is_same_v<C, c10::Float8_e4m3fn>;
  static constexpr float unit = e4m3 ? kv_codes::kE4m3Unit : 1.0f;
  static float value(const C* src, int64_t d) {
    if constexpr (e4m3) {
      return e4m3_value(reinterpret_cast<const uint8_t*>(src)[d]);
    } else {
      return static_cast<float>(src[d]);
    }
  }
#if defined(__AVX512F__)
  static __m512 load16(const C* p) { return e4m3 ? kv_codes::e4m3_lanes(p) : kv_codes::int8_lanes(p); }
#elif defined(__AVX2__)
  static __m256 load8(const C* p) { return e4m3 ? kv_codes::e4m3_lanes8(p) : kv_codes::int8_lanes8(p); }
#endif
};

// A float32 cache's rows as they are, for attend_codes: a float32 model's decodes read their K/V
// in place, as an 8-bit cache's do, instead of staging each tile (see attend_codes).
template <>
struct CodeLanes<float> {
  static constexpr float unit = 1.0f;
  static float value(const float* src, int64_t d) { return src[d]; }
#if defined(__AVX512F__)
  static __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
#endif
};

// The row's scale times unit: lanes times it are the values (exactly: unit is a power of 2). A
// float32 row has no scale: 1.
template <typename C>
inline float lane_scale(const C* row, int64_t dim) {
  if constexpr (std::is_same_v<C, float>) {
    return 1.0f;
  } else {
    return load_scale(row + dim) * CodeLanes<C>::unit;
  }
}

// One cache row -> dim float32 values.
template <typename C>
inline void load_row(float* dst, const C* src, int64_t dim) {
  if constexpr (std::is_same_v<C, int8_t> || std::is_same_v<C, c10::Float8_e4m3fn>) {
    int64_t d = 0;
#if defined(__AVX512F__)
    const __m512 s = _mm512_set1_ps(lane_scale(src, dim));
    for (; d + 16 <= dim; d += 16) _mm512_storeu_ps(dst + d, _mm512_mul_ps(CodeLanes<C>::load16(src + d), s));
#elif defined(__AVX2__)
    const __m256 s = _mm256_set1_ps(lane_scale(src, dim));
    for (; d + 8 <= dim; d += 8) _mm256_storeu_ps(dst + d, _mm256_mul_ps(CodeLanes<C>::load8(src + d), s));
#endif
    const float scale = load_scale(src + dim);
    for (; d < dim; ++d) dst[d] = CodeLanes<C>::value(src, d) * scale;
  } else {
    for (int64_t d = 0; d < dim; ++d) dst[d] = load(src, d);
  }
}

#if defined(__AVX512F__)
// quantize_row on 16 lanes (dim a multiple of 16): the same values, bit for bit. The cache write
// runs per token and layer; scalar, with c10's e4m3 conversion per code, it took 1.3 ms (int8) and
// 2.6 ms (e4m3) per layer for a 2048-token prompt where a bfloat16 cache's copy took 0.14.
template <typename T>
void quantize_row_lanes(char* dst, const T* x, int64_t dim, bool int8) {
  const auto lanes = [&](int64_t d) {
    if constexpr (std::is_same_v<T, float>) {
      return _mm512_loadu_ps(x + d);
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
      return load_bf16_lanes(x + d);
    } else {
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + d)));
    }
  };
  __m512 max = _mm512_setzero_ps();
  for (int64_t d = 0; d < dim; d += 16) max = _mm512_max_ps(max, _mm512_abs_ps(lanes(d)));
  const c10::Half scale(_mm512_reduce_max_ps(max) / (int8 ? 127.0f : 448.0f));
  const float s = static_cast<float>(scale);
  const __m512 inv = _mm512_set1_ps(s > 0.0f ? 1.0f / s : 0.0f);
  const __m512 high = _mm512_set1_ps(int8 ? 127.0f : 448.0f), low = _mm512_set1_ps(int8 ? -127.0f : -448.0f);
  for (int64_t d = 0; d < dim; d += 16) {
    const __m512 v = _mm512_min_ps(high, _mm512_max_ps(low, _mm512_mul_ps(lanes(d), inv)));
    if (int8) {
      kv_codes::store_int8_codes(dst + d, v);
    } else {
      kv_codes::store_e4m3_codes(dst + d, v);
    }
  }
  std::memcpy(dst + dim, &scale.x, kScaleBytes);
}
#endif

// One float row (dim values of x) -> dim codes and their float16 scale, as reference.quantize_rows.
template <typename T>
void quantize_row(char* dst, const T* x, int64_t dim, bool int8) {
#if defined(__AVX512F__)
  if constexpr (!std::is_same_v<T, double>) {
    if (dim % 16 == 0) return quantize_row_lanes(dst, x, dim, int8);
  }
#endif
  float absmax = 0.0f;
  for (int64_t d = 0; d < dim; ++d) absmax = std::max(absmax, std::fabs(load(x, d)));
  const c10::Half scale(absmax / (int8 ? 127.0f : 448.0f));
  const float s = static_cast<float>(scale);
  const float inv = s > 0.0f ? 1.0f / s : 0.0f;
  for (int64_t d = 0; d < dim; ++d) {
    const float v = load(x, d) * inv;
    if (int8) {
      dst[d] = static_cast<char>(static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, std::nearbyint(v)))));
    } else {
      dst[d] = static_cast<char>(c10::Float8_e4m3fn(std::min(448.0f, std::max(-448.0f, v))).x);
    }
  }
  std::memcpy(dst + dim, &scale.x, kScaleBytes);
}

// One row per token into the slot slot_mapping names; slot -1 skips the token (padding).
// key and value are converted to the caches' dtype first where it differs, or quantized row by
// row into an 8-bit cache.
void write_kv_cache(const at::Tensor& key_in, const at::Tensor& value_in, at::Tensor& k_cache, at::Tensor& v_cache,
                    const at::Tensor& slot_mapping) {
  check_cache(k_cache, "k_cache");
  check_cache(v_cache, "v_cache");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == v_cache.scalar_type(),
              "k_cache and v_cache must have one shape and dtype");
  const bool quantized = is_quantized(k_cache);
  // Converted only where the dtype differs: a to() that returns its input is still a dispatcher
  // call (~0.2 us apiece at a batch-1 decode, whose copy takes less).
  const auto as_dtype = [](const at::Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); };
  const at::Tensor key = quantized ? key_in : as_dtype(key_in, k_cache.scalar_type());
  const at::Tensor value = as_dtype(value_in, quantized ? key_in.scalar_type() : v_cache.scalar_type());
  check_rows(key, "key", 3);
  check_rows(value, "value", 3);
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() &&
                  slot_mapping.numel() == key.size(0),
              "slot_mapping must be dense int64 with one slot per token");
  const int64_t heads = key.size(1), dim = key.size(2), row = heads * dim;
  TORCH_CHECK(k_cache.size(2) == heads && k_cache.size(3) == dim + (quantized ? kScaleBytes : 0) &&
                  value.size(1) * value.size(2) == row,
              "key/value rows do not match the cache's heads and head_dim");
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  // Every slot is checked before any is written: a refused call leaves the caches as they were.
  for (int64_t t = 0; t < key.size(0); ++t) {
    TORCH_CHECK(slots[t] < num_slots, "slot ", slots[t], " is outside the cache (", num_slots, " slots)");
  }
  char* k_dst = static_cast<char*>(k_cache.data_ptr());
  char* v_dst = static_cast<char*>(v_cache.data_ptr());
  if (quantized) {
    const bool int8 = k_cache.scalar_type() == at::kChar;
    const int64_t cache_row = dim + kScaleBytes;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, key.scalar_type(), "write_kv_cache", [&] {
      const scalar_t* k_src = key.data_ptr<scalar_t>();
      const scalar_t* v_src = value.data_ptr<scalar_t>();
      for (int64_t t = 0; t < key.size(0); ++t) {
        if (slots[t] < 0) continue;
        for (int64_t h = 0; h < heads; ++h) {
          const int64_t at_row = (slots[t] * heads + h) * cache_row;
          quantize_row(k_dst + at_row, k_src + t * key.stride(0) + h * dim, dim, int8);
          quantize_row(v_dst + at_row, v_src + t * value.stride(0) + h * dim, dim, int8);
        }
      }
    });
    return;
  }
  const int64_t bytes = row * key.element_size();
  const char* k_src = static_cast<const char*>(key.data_ptr());
  const char* v_src = static_cast<const char*>(value.data_ptr());
  const int64_t k_stride = key.stride(0) * key.element_size(), v_stride = value.stride(0) * value.element_size();
  for (int64_t t = 0; t < key.size(0); ++t) {
    const int64_t slot = slots[t];
    if (slot < 0) continue;
    std::memcpy(k_dst + slot * bytes, k_src + t * k_stride, bytes);
    std::memcpy(v_dst + slot * bytes, v_src + t * v_stride, bytes);
  }
}

// ---------------------------------------------------------------- paged attention
//
// One kernel for prefill chunks, decodes and mixed batches: each sequence's query rows attend to
// its context read where the block table says it is (no gathered copy), causally (query token j
// of a sequence with q query tokens and c context tokens sits at position c - q + j). Flash
// style: the keys are walked in tiles of kKeyTile, each staged to float32, with an online softmax
// in float32, so scores exist for one [rows, kKeyTile] tile at a time.
//
// A unit of work is (sequence, KV head, query tile): the query heads sharing a KV head are rows
// of one tile (row = token * group + head in group), so each K/V row is read once for the group;
// a decode's unit may take several KV heads (kv_heads_per_unit).
// A unit much costlier than an even share of the batch (a lone decode at long context, a short
// question after a long cached document) splits its keys into partitions reduced afterwards, as
// the Triton decode kernel's split-K does. The split depends on the batch's shape only, never on
// the thread count: 1 or N threads give the same bits.

constexpr int64_t kTileRows = 192;      // query rows per tile: a GEMM shape that runs near peak
constexpr int64_t kKeyTile = 256;       // keys per tile: scores and staged K/V stay in L2 (256 over 128:
                                        // bfloat16 tiles 15-25% faster, float32 ones the same)
constexpr int64_t kMatmulRows = 16;     // below this (decodes), hand loops beat a GEMM call's overhead
constexpr int64_t kPartitionKeys = 512; // the shortest partition worth a reduction
constexpr int64_t kTargetItems = 16;    // split so that no item costs more than 1/16 of the batch
// A call whose query rows x keys and K/V bytes are both below these runs on one thread.
constexpr int64_t kParallelCost = 16384;
constexpr int64_t kParallelBytes = 128 << 10;

struct Unit {
  int64_t seq, head, first_token, tokens, q_pos, kv_begin, parts, part_keys, workspace;
  // bfloat16 tiles only: this (sequence, KV head)'s key tiles packed before the tile products
  // (see prepack_contexts), packed_keys of them; nullptr where the unit packs as it goes.
  const c10::BFloat16* packed = nullptr;
  int64_t packed_keys = 0;
  // KV heads from `head` on: 1, or several for a decode (kv_heads_per_unit: attend_codes, attend_bf16).
  // Row r of a unit is (token, KV head, query head in group), so a token's rows are its outputs'.
  int64_t kv_heads = 1;
  int64_t kv_end() const { return q_pos + tokens; }  // keys the tile's last token sees
  int64_t rows(int64_t group) const { return tokens * kv_heads * group; }
  int64_t keys() const { return kv_end() - kv_begin; }
};

struct Item {
  int64_t unit, part, cost;
};

// T: the query's and output's dtype; C: the cache's (T, or int8 / e4m3 codes with scales).
// window <= 0: no sliding window; soft_cap <= 0: no soft-capping.
template <typename T, typename C>
struct AttentionArgs {
  const T* q;
  const C *k, *v;
  T* out;
  const int32_t* tables;
  int64_t q_stride, table_stride, group, dim, cache_row, num_heads, block_size, slot_stride, block_stride, window;
  float scale, soft_cap;
  bool bf16_tiles;  // tile products in bfloat16 on AMX (see below); else float32
  bool bf16_pairs;  // no AMX: tile products on AVX512-BF16 pairs where those are fast (see below)
  bool bf16_rows;   // no AMX tiles, but units of few rows take attend_bf16's AVX512-BF16 row products
};

// scores = soft_cap * tanh(scale * scores / soft_cap), tanh(x) = 1 - 2 / (e^2x + 1) on fast_exp
// so the loop vectorizes; its absolute error stays near float32's epsilon times soft_cap.
void soft_cap_scores(float* scores, int64_t count, float soft_cap, float scale) {
  const float inv = 2.0f * scale / soft_cap;
  for (int64_t i = 0; i < count; ++i) {
    scores[i] = soft_cap - 2.0f * soft_cap / (fast_exp(scores[i] * inv) + 1.0f);
  }
}

// scores [rows, n] = q [rows, dim] . K^T, K^T [dim][kKeyTile] as transpose_rows stages it:
// attention_products.h's register-blocked FMA loops (AVX-512's, or AVX2's in AVX2 builds; no ATen
// call inside a pool part).
void tile_scores(float* scores, const float* q, const float* kt, int64_t rows, int64_t n, int64_t dim) {
  attention_products::float_product(rows, n, dim, dim, kKeyTile, n, false, q, kt, scores);
}

// acc [rows, dim] += weights [rows, n] . v [n, dim]
void tile_accumulate(float* acc, const float* weights, const float* v, int64_t rows, int64_t n, int64_t dim) {
  attention_products::float_product(rows, dim, n, n, dim, dim, true, weights, v, acc);
}

// max(scale * s[0..n)) in vector registers: written as a loop, a running max is a chain of
// dependent scalar compares (the compiler keeps NaN semantics and does not vectorize it), which
// profiled as the costliest step of a bfloat16 prefill once the products ran on AMX.
inline float scaled_max(const float* s, int64_t n, float scale) {
  float max = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
#if defined(__AVX512F__)
  const __m512 k = _mm512_set1_ps(scale);
  __m512 lanes = _mm512_set1_ps(max);
  for (; j + 16 <= n; j += 16) lanes = _mm512_max_ps(lanes, _mm512_mul_ps(_mm512_loadu_ps(s + j), k));
  max = _mm512_reduce_max_ps(lanes);
#elif defined(__AVX2__)
  const __m256 k = _mm256_set1_ps(scale);
  __m256 lanes = _mm256_set1_ps(max);
  for (; j + 8 <= n; j += 8) lanes = _mm256_max_ps(lanes, _mm256_mul_ps(_mm256_loadu_ps(s + j), k));
  alignas(32) float out[8];
  _mm256_store_ps(out, lanes);
  max = *std::max_element(out, out + 8);
#endif
  for (; j < n; ++j) max = std::max(max, s[j] * scale);
  return max;
}

// ---------------------------------------------------------------- bfloat16 tiles on AMX
//
// With a bfloat16 query and cache on a CPU with AMX, the two tile products run as bfloat16
// products with float32 accumulation, through oneDNN's brgemm ukernel as ATen exports it
// (at::native::cpublas::brgemm): Q.K^T on the query and key elements as stored (each product of
// two bfloat16 values is exact in float32), P.V on the softmax weights rounded to bfloat16, as
// flash attention does. Scaling, soft-capping, the online softmax, the running sums and the
// accumulator stay float32, and each row's sum adds exactly the rounded weights P.V uses.
// Accuracy rule: each output row is a convex combination of V rows whose weights carry a relative
// error of at most u = 2^-8 (bfloat16's unit roundoff), so before its one rounding to bfloat16
// (at most u |out|) it lies within u / (1 - u) max|v - exact| of the exact answer, the max over the
// keys the row sees (tests/test_cpu_ops.py holds it to that).
// Without AMX tiles on a CPU whose AVX512-BF16 dot products issue as fast as FMAs (AMD's:
// bf16_pairs_available), the same packed tiles and products run on attention_products.h's pair
// blocks (same accuracy rule). Elsewhere (other CPUs without AMX, oneDNN disabled through
// torch.backends.mkldnn on an AMX one, other dtypes) the tile products stay float32:
// attention_products.h's FMA blocks (AVX512-BF16 dot products measured 4x slower per instruction
// than FMAs on a Sapphire Rapids: see that file), its AVX2 blocks in AVX2 builds (no ATen call
// inside a pool part: at::mm nested OpenMP's team in ours, and a forked child cannot restart it).
// Decodes' units of few rows take the AVX512-BF16 row products below wherever the CPU has it.
//
// brgemm takes B in the VNNI layout: pairs along the reduction dimension interleaved, [K/2][ldb][2],
// here in column blocks of kPackColumns (the widths oneDNN's own packing produces).

constexpr int64_t kPackColumns = 64;
constexpr int64_t kPackKeys = 32;  // P.V's reduction rounded up to this: few kernel shapes to generate

using bf16 = c10::BFloat16;
typedef uint32_t __attribute__((may_alias)) pair_t;  // two bfloat16 elements

bool bf16_tiles_available() {
#if defined(__AVX512F__)
  return at::native::cpublas::could_pack(at::kBFloat16);
#else
  return false;
#endif
}

// Whether a bfloat16 decode's units (under kMatmulRows rows) take attend_bf16's AVX512-BF16 row
// products without AMX tiles (or with oneDNN disabled) too: a bfloat16 decode then reads its K/V
// rows in place, where the float path stages them to float32 first.
bool bf16_rows_available() {
#if defined(__AVX512F__)
  return cpu_has_avx512bf16();
#else
  return false;
#endif
}

// Whether, without AMX tiles, a bfloat16 attention's tile products take attention_products.h's
// AVX512-BF16 pair blocks on the packed tiles (the same packing, products and rounded weights as
// the AMX path, so its accuracy rule) instead of float32 FMA blocks: the CPUs where those issue as
// fast as FMAs (cpu_features::bf16_pair_products_fast says which, and why).
bool bf16_pairs_available() {
#if defined(__AVX512F__)
  return cpu_features::bf16_pair_products_fast();
#else
  return false;
#endif
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Per-thread scratch, kept across calls (a call's first use on a thread grows it to the batch's
// tallest tile; allocating and zeroing it per call cost more than a whole decode).
struct TileBuffers {
  std::vector<float> q, k, kt, v, scores, acc, row_max, row_sum, new_max, alpha, sum_lanes, key_scales, value_scales;
  std::vector<bf16> q16, k16, v16, p16, zeros;
  std::vector<const bf16*> key_rows, value_rows;
  void reserve(int64_t rows, int64_t dim) {
    const auto grow = [](auto& buffer, int64_t n) {
      if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
    };
    for (auto* buffer : {&row_max, &row_sum, &new_max, &alpha}) grow(*buffer, rows);
    grow(acc, rows * dim);
    grow(sum_lanes, rows * 16);
    grow(scores, rows * kKeyTile);
    grow(key_scales, kKeyTile * kMatmulRows);  // a KV head's keys, for up to 15 heads
    grow(value_scales, kKeyTile);
    grow(q, rows * dim);
    grow(k, kKeyTile * dim);
    grow(kt, kKeyTile * dim);  // K^T for the FMA products
    grow(v, kKeyTile * dim);
    grow(q16, rows * dim);
    grow(k16, kKeyTile * dim);
    grow(v16, kKeyTile * round_up(dim, kPackColumns));
    grow(p16, rows * kKeyTile);
    grow(zeros, 2 * dim);  // zero-initialized: read for the keys past a tile's end (dim floats at most)
    grow(key_rows, kKeyTile * kMatmulRows);  // a decode unit's KV heads' rows (up to 15 heads), as key_scales
    grow(value_rows, kKeyTile * kMatmulRows);
  }
};

TileBuffers& thread_buffers(int64_t rows, int64_t dim) {
  static thread_local TileBuffers buffers;
  buffers.reserve(rows, dim);
  return buffers;
}

// Scores (row stride ld) times scale -> softmax weights against each row's running max; rescales
// the row's running sum and accumulator when the max moves. Row r's token sees keys
// [first0 + r / group, visible0 + r / group) of the tile (the window's edge and the causal edge).
// weigh(r, s, first, visible, max, alpha) writes the row's weights, e^(scale * s - max) on [first,
// visible) and 0 on the rest of the tile, where the tile's products read them, and adds their sum
// to the row's running sum times alpha (the rescale; the weigher keeps the sums in its own form).
template <typename Weigh>
void online_softmax(float* scores, int64_t ld, float scale, TileBuffers& b, int64_t rows, int64_t n, int64_t group,
                    int64_t dim, int64_t first0, int64_t visible0, const Weigh& weigh) {
  const auto sees = [&](int64_t r) {
    return std::pair{std::max<int64_t>(0, first0 + r / group), std::min(n, visible0 + r / group)};
  };
  for (int64_t r = 0; r < rows; ++r) {
    const auto [first, visible] = sees(r);
    b.new_max[r] = b.row_max[r];
    if (visible > first) {
      b.new_max[r] = std::max(b.new_max[r], scaled_max(scores + r * ld + first, visible - first, scale));
    }
  }
  // Every row's rescale factor in one vectorized loop: one e^x per row on its own is a chain of
  // dependent scalar operations (8% of a bfloat16 prefill's time when it was). 1 where the max
  // stayed (-inf included), 0 on a row's first visible tile.
  for (int64_t r = 0; r < rows; ++r) {
    b.alpha[r] = b.new_max[r] == b.row_max[r] ? 1.0f : fast_exp(b.row_max[r] - b.new_max[r]);
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* s = scores + r * ld;
    const auto [first, visible] = sees(r);
    if (visible <= first) {
      weigh(r, s, 0, 0, 0.0f, 1.0f);
      continue;
    }
    weigh(r, s, first, visible, b.new_max[r], b.alpha[r]);
    b.row_max[r] = b.new_max[r];
    if (b.alpha[r] != 1.0f) {
      for (int64_t d = 0; d < dim; ++d) b.acc[r * dim + d] *= b.alpha[r];
    }
  }
}

// float32 weights in place of the scores (s holds n of them); row r's running sum in sums[r].
struct Float32Weights {
  int64_t n;
  float scale;
  float* sums;
  void operator()(int64_t r, float* s, int64_t first, int64_t visible, float max, float alpha) const {
    float total = 0.0f;
    std::fill(s, s + first, 0.0f);
    for (int64_t j = first; j < visible; ++j) {
      s[j] = fast_exp(s[j] * scale - max);
      total += s[j];
    }
    std::fill(s + visible, s + n, 0.0f);
    sums[r] = sums[r] * alpha + total;
  }
};

// Pointers to rows [first, first + n) of one KV head of a sequence's context.
template <typename T, typename C>
void find_rows(const C** dst, const C* cache, const int32_t* table, int64_t first, int64_t n, int64_t head,
               const AttentionArgs<T, C>& a) {
  for (int64_t j = 0; j < n;) {
    const int64_t p = first + j, offset = p % a.block_size, run = std::min(a.block_size - offset, n - j);
    const C* src = cache + table[p / a.block_size] * a.block_stride + offset * a.slot_stride + head * a.cache_row;
    for (int64_t r = 0; r < run; ++r, ++j) dst[j] = src + r * a.slot_stride;
  }
}

// Pointers to rows [first, first + n) of each of a unit's KV heads h, K's at keys + h * kKeyTile and
// V's at values + h * kKeyTile: a decode's unit of several heads (attend_bf16, attend_codes).
template <typename T, typename C>
void find_unit_rows(const C** keys, const C** values, const AttentionArgs<T, C>& a, const Unit& u,
                    const int32_t* table, int64_t first, int64_t n) {
  for (int64_t h = 0; h < u.kv_heads; ++h) {
    find_rows(keys + h * kKeyTile, a.k, table, first, n, u.head + h, a);
    find_rows(values + h * kKeyTile, a.v, table, first, n, u.head + h, a);
  }
}

// A token at position p sees keys (p - window, p]: the first row's window starts at q_pos - window + 1.
template <typename T, typename C>
int64_t first_visible(const AttentionArgs<T, C>& a, const Unit& u, int64_t k0, int64_t rows) {
  return a.window > 0 ? u.q_pos - a.window + 1 - k0 : -k0 - rows;  // none: from key 0
}

template <typename T, typename C>
void reset_rows(const AttentionArgs<T, C>& a, int64_t rows, TileBuffers& b) {
  std::fill_n(b.row_max.begin(), rows, -std::numeric_limits<float>::infinity());
  std::fill_n(b.row_sum.begin(), rows, 0.0f);
  std::fill_n(b.acc.begin(), rows * a.dim, 0.0f);
}

// The cache lines of span bytes from p on their way into L2: a decode's keys and values are short
// runs in blocks scattered through memory, which the hardware prefetchers, trained on long
// streams, do not see coming. Each line once: a bfloat16 decode's 128-byte rows start on a line,
// and prefetching the row's last byte after its lines (as this did) asked for its second line
// twice. Each prefetch is an asm statement, which the compiler may not delete: this loop of
// _mm_prefetch calls, whose end GCC 12 at -O2 cannot prove, it deleted as a loop without effect
// (C++'s forward-progress rule lets it assume the loop ends, and a prefetch changes no value), so
// decode attention ran with no prefetch at all (objdump: not one prefetcht2 in row_scores) and
// read its K/V from memory at 2.2-3x their read time (tests/test_cpu_ops.py checks the build).
// Into L2: on the Zen 4, prefetcht0 and prefetchnta (into L1) ran at the no-prefetch speed,
// prefetcht1 as prefetcht2 (bench_kv_cache.py --before-tree, 16 and 64 sequences x 128 and 512).
inline void prefetch_span(const void* p, int64_t span) {
  const uintptr_t first = reinterpret_cast<uintptr_t>(p) & ~uintptr_t{63};
  const uintptr_t last = (reinterpret_cast<uintptr_t>(p) + span - 1) & ~uintptr_t{63};
  for (uintptr_t line = first; line <= last; line += 64) {
    asm volatile("prefetcht2 %0" : : "m"(*reinterpret_cast<const char*>(line)));
  }
}

// Keys (and their values) a decode's score loops (row_scores, code_scores) prefetch this far ahead
// into L2, nothing into L1 (the 16 keys a pass reads are independent loads that out-of-order
// execution overlaps once they are in L2). Measured on an EPYC Zen 4 with the prefetches in the
// build (bench_kv_cache.py --before-tree, 2 threads, 16 and 64 sequences at 128 and 512 tokens, K/V
// from memory): 16, 32, 64 and 128 keys ahead ran within the noise of each other, each 1.24-1.50x
// faster than no prefetch for bfloat16 and 1.4-1.8x for int8 (into L1 instead: no faster than none,
// see prefetch_span). (Earlier tunings here, "32 beat 64" and "no L1 prefetches: 0.85-0.89x the
// time", were measured from 851624d on, while GCC had deleted every prefetch in attention: see
// prefetch_span. The first one, before that: prefetching only the next 16 keys ran at ~3.7x the
// K/V's read time, 64 ahead 1.35-1.6x faster.)
constexpr int64_t kL2KeysAhead = 32;

// Rows [first, first + n) (n <= kKeyTile) of one KV head of a sequence's context, as dense float32
// [n, dim]; each row's lines on their way into L2 kL2KeysAhead rows before it is read (the rows
// before that: prefetch_start's, or the caller's wait). The float path's decodes (a float16
// model's; a float32 one's where attend_codes does not run) read their K/V from memory as
// attend_bf16's do.
template <typename T, typename C>
void stage_keys(float* dst, const C* cache, const int32_t* table, int64_t first, int64_t n, int64_t head,
                const AttentionArgs<T, C>& a) {
  const C* rows[kKeyTile];
  find_rows(rows, cache, table, first, n, head, a);
  const int64_t bytes = a.cache_row * static_cast<int64_t>(sizeof(C));
  for (int64_t j = 0; j < n; ++j) {
    if (j + kL2KeysAhead < n) prefetch_span(rows[j + kL2KeysAhead], bytes);
    load_row(dst + j * a.dim, rows[j], a.dim);
  }
}

#if defined(__AVX512F__)  // the bfloat16 tile path: AVX-512 builds (every AMX CPU has it)

// dst[x * ld + l] = src[l][x] for l, x < 16: sixteen rows of 16 32-bit elements transposed in registers.
inline void transpose_16x16(const pair_t* const* src, int64_t offset, pair_t* dst, int64_t ld) {
  __m512i rows[16], columns[16];
  for (int l = 0; l < 16; ++l) rows[l] = _mm512_loadu_si512(src[l] + offset);
  transpose16::transpose_16x16(rows, columns);
  for (int x = 0; x < 16; ++x) _mm512_storeu_si512(dst + x * ld, columns[x]);
}

// K^T for Q.K^T: [dim/2][kKeyTile] pairs (elements 2i, 2i + 1 of one key), so that one brgemm
// call multiplies the whole tile (a call per 64 keys was 4x the calls, each loading Q's tiles
// again); keys from n up to round_up(n, kPackColumns) are zero. 16 keys x 16 pairs at a time in
// registers (one store per element, scattered 256 bytes apart, was 9% of a bfloat16 prefill).
void pack_keys(bf16* dst, const bf16* const* rows, const bf16* zeros, int64_t n, int64_t dim) {
  const int64_t pairs = dim / 2, whole = pairs / 16 * 16;
  pair_t* out = reinterpret_cast<pair_t*>(dst);
  for (int64_t j = 0; j < round_up(n, kPackColumns); j += 16) {
    const pair_t* src[16];
    for (int64_t l = 0; l < 16; ++l) src[l] = reinterpret_cast<const pair_t*>(j + l < n ? rows[j + l] : zeros);
    for (int64_t i = 0; i < whole; i += 16) transpose_16x16(src, i, out + i * kKeyTile + j, kKeyTile);
    for (int64_t i = whole; i < pairs; ++i) {
      for (int64_t l = 0; l < 16; ++l) out[i * kKeyTile + j + l] = src[l][i];
    }
  }
}

// V for P.V: column block c (elements c .. c + 63) is [keys/2][kPackColumns] pairs (one element
// of keys 2i and 2i + 1); keys from n up to `keys` are zero.
void pack_values(bf16* dst, const bf16* const* rows, const bf16* zeros, int64_t n, int64_t keys, int64_t dim) {
  const uint16_t* zero = reinterpret_cast<const uint16_t*>(zeros);
  for (int64_t c = 0; c < dim; c += kPackColumns) {
    pair_t* block = reinterpret_cast<pair_t*>(dst + c * keys);
    const int64_t cols = std::min(kPackColumns, dim - c);
    for (int64_t i = 0; i < keys / 2; ++i) {
      const uint16_t* lo = 2 * i < n ? reinterpret_cast<const uint16_t*>(rows[2 * i]) + c : zero;
      const uint16_t* hi = 2 * i + 1 < n ? reinterpret_cast<const uint16_t*>(rows[2 * i + 1]) + c : zero;
      pair_t* out = block + i * kPackColumns;
      for (int64_t d = 0; d < cols; ++d) out[d] = static_cast<uint32_t>(lo[d]) | static_cast<uint32_t>(hi[d]) << 16;
    }
  }
}

// One row of P for the bfloat16 P.V: p[j] = e^(scale * s[j] - max) rounded to bfloat16 for j in
// [first, visible), 0 for the rest of [0, keys); lanes (16 floats, the row's running sum spread
// over a vector's lanes, reduced once per unit: a reduction per row and tile was a fifth of this
// loop's time) become lanes * alpha + the rounded weights. e^x is 2^(x log2 e) on exp2_lanes (the
// Taylor degree 5 before its polynomial was 3e-6 for one more FMA); exponents are clamped at -100, so weights stay
// normal floats (2^-100 at least) rather than denormals that cost a microcode assist. The rounding
// (to nearest even) is AVX512-BF16's conversion, 32 weights an instruction: every AMX CPU has it.
// This loop is about a third of a long bfloat16 prefill's attention, so it counts its operations.
inline __m512 exp2_weights(__m512 scores, __m512 scale_log2e, __m512 max_log2e) {
  return exp2_lanes(_mm512_max_ps(_mm512_fmsub_ps(scores, scale_log2e, max_log2e), _mm512_set1_ps(-100.0f)));
}

__attribute__((target("avx512bf16"))) void bfloat16_weights(uint16_t* p, const float* s, int64_t first, int64_t visible,
                                                            int64_t keys, float scale, float max, float* lanes,
                                                            float alpha) {
  std::fill(p, p + first, uint16_t{0});
  std::fill(p + std::max(first, visible), p + keys, uint16_t{0});
  constexpr float kLog2e = 1.44269504088896341f;
  const __m512 c = _mm512_set1_ps(scale * kLog2e), m = _mm512_set1_ps(max * kLog2e);
  __m512 total = _mm512_setzero_ps();
  int64_t j = first;
  // 32 weights at a time: as 32-bit lanes, the packed pair (2i, 2i + 1) holds weight 2i in its low
  // half and 2i + 1 in its high half, each a float32 once shifted or masked into the high half.
  const __m512i high = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  for (; j + 32 <= visible; j += 32) {
    const __m512 low = exp2_weights(_mm512_loadu_ps(s + j), c, m), up = exp2_weights(_mm512_loadu_ps(s + j + 16), c, m);
    const __m512i rounded = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(up, low));
    _mm512_storeu_si512(p + j, rounded);
    total = _mm512_add_ps(total, _mm512_castsi512_ps(_mm512_slli_epi32(rounded, 16)));
    total = _mm512_add_ps(total, _mm512_castsi512_ps(_mm512_and_si512(rounded, high)));
  }
  for (; j < visible; j += 16) {
    const __mmask16 tail = visible - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (visible - j)) - 1);
    const __m256i rounded =
        reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(exp2_weights(_mm512_maskz_loadu_ps(tail, s + j), c, m)));
    _mm256_mask_storeu_epi16(p + j, tail, rounded);
    const __m512 weights = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(rounded), 16));
    total = _mm512_mask_add_ps(total, tail, total, weights);
  }
  _mm512_storeu_ps(lanes, _mm512_fmadd_ps(_mm512_loadu_ps(lanes), _mm512_set1_ps(alpha), total));
}

// A packed key tile: K^T (kKeyTile * dim elements), then V (kKeyTile * round_up(dim, kPackColumns)).
inline int64_t packed_tile_size(int64_t dim) { return kKeyTile * (dim + round_up(dim, kPackColumns)); }

constexpr int64_t kPrepackBytes = int64_t{64} << 20;  // a 2048-token chunk at 8k context: 6 MiB (SmolLM2)

// The query tiles of a prefill chunk all walk the same key tiles of their (sequence, KV head):
// those are packed once per call, in parallel, before any tile product, into storage (packing
// them per query tile was ~6% of a long prefill). Where a (sequence, KV head) has one query tile
// (decodes) or a sliding window moves each unit's first key, units pack as they go; so do those
// past kPrepackBytes of packed tiles in one call (the storage is kept for the next call).
void prepack_contexts(const AttentionArgs<bf16, bf16>& a, std::vector<Unit>& units, std::vector<bf16>& storage) {
  if (a.window > 0) return;
  const int64_t heads = a.num_heads / a.group, tile_size = packed_tile_size(a.dim);
  int64_t num_seqs = 0;
  for (const Unit& u : units) num_seqs = std::max(num_seqs, u.seq + 1);
  std::vector<int64_t> query_tiles(num_seqs * heads, 0), keys(num_seqs * heads, 0), offset(num_seqs * heads, -1);
  for (const Unit& u : units) {
    query_tiles[u.seq * heads + u.head] += 1;
    keys[u.seq * heads + u.head] = std::max(keys[u.seq * heads + u.head], u.kv_end());
  }
  std::vector<std::pair<int64_t, int64_t>> jobs;  // (sequence * heads + head, key tile)
  int64_t total = 0;
  for (int64_t c = 0; c < num_seqs * heads; ++c) {
    const int64_t size = (keys[c] + kKeyTile - 1) / kKeyTile * tile_size;
    if (query_tiles[c] < 2 || (total + size) * static_cast<int64_t>(sizeof(bf16)) > kPrepackBytes) continue;
    offset[c] = total;
    for (int64_t t = 0; t * kKeyTile < keys[c]; ++t) jobs.emplace_back(c, t);
    total += size;
  }
  if (jobs.empty()) return;
  if (static_cast<int64_t>(storage.size()) < total) storage.resize(total);
  kernel_pool::parallel_for(0, static_cast<int64_t>(jobs.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<const bf16*> rows(kKeyTile);
    const std::vector<bf16> zeros(a.dim);
    for (int64_t i = begin; i < end; ++i) {
      const auto [c, t] = jobs[i];
      const int64_t k0 = t * kKeyTile, n = std::min(kKeyTile, keys[c] - k0), seq = c / heads, head = c % heads;
      bf16* dst = storage.data() + offset[c] + t * tile_size;
      const int32_t* table = a.tables + seq * a.table_stride;
      find_rows(rows.data(), a.k, table, k0, n, head, a);
      pack_keys(dst, rows.data(), zeros.data(), n, a.dim);
      find_rows(rows.data(), a.v, table, k0, n, head, a);
      pack_values(dst + kKeyTile * a.dim, rows.data(), zeros.data(), n, round_up(n, kPackKeys), a.dim);
    }
  });
  for (Unit& u : units) {
    const int64_t c = u.seq * heads + u.head;
    if (offset[c] < 0) continue;
    u.packed = storage.data() + offset[c];
    u.packed_keys = keys[c];
  }
}

// ---------------------------------------------------------------- few query rows (decodes)
//
// A decode's unit has `group` query rows (3 for SmolLM2), far below an AMX tile's 16: its tile
// products used to pack K^T and V (a register transpose per 16 keys) and call brgemm twice per
// key tile: the packing was the largest part of a batch-64 decode's attention profile (23% of all
// samples, brgemm 8%), a cost per unit, not per byte read. Units under kMatmulRows rows with
// head_dim a multiple of 32 (on every CPU with AVX512-BF16, AMX or not: bf16_rows_available)
// instead read each key and value row once where the block table says it is, with AVX512-BF16 dot
// products on bfloat16 pairs summed in float32: the same products and the same bfloat16 softmax weights as the tile
// path, so the same accuracy rule (and one rounding order for any thread count). A decode's unit
// takes as many KV heads as keep it under kMatmulRows rows (kv_heads_per_unit: SmolLM2's 3 heads,
// 9 rows), so a token's K (and V) rows of those heads, adjacent in its slot, are read in one run:
// 1.10-1.17x faster than a unit per head with 30 layers' caches from memory, 16-64 sequences at
// 128-512 tokens (bench_kv_cache.py --layers 30 --before-tree, EPYC Zen 4), 1.07-1.15x from L3.

constexpr int64_t kRowBlock = 8;  // query rows per pass over the values (2 accumulators a row: 16 registers)

// Lane l of the result = the sum of v[l]'s 16 lanes (45 shuffles and adds for 16 horizontal sums).
inline __m512 sum_each(__m512* v) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i) {  // 128-bit lane L: [a0+a2, b0+b2, a1+a3, b1+b3] of a = v[2i], b = v[2i+1]
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {  // lane L: v[4i .. 4i + 3]'s sums over lane L
    const __m512d x = _mm512_castps_pd(t[2 * i]), y = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  __m512 s[2];
  for (int i = 0; i < 2; ++i) {  // [u0 lanes 0+2, 1+3, u1 lanes 0+2, 1+3]
    s[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  return _mm512_add_ps(_mm512_shuffle_f32x4(s[0], s[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(s[0], s[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// A score loop's keys [begin, end) into L2, then their values: span bytes from each row (a
// bfloat16 row; or a token's rows of a unit's KV heads, adjacent in its slot), as prefetch_span.
template <typename C>
inline void prefetch_keys_and_values(const C* const* keys, const C* const* values, int64_t begin, int64_t end,
                                     int64_t span) {
  for (int64_t j = begin; j < end; ++j) prefetch_span(keys[j], span);
  for (int64_t j = begin; j < end; ++j) prefetch_span(values[j], span);
}

// Part `part` of `parts` of the 16 keys from `ahead` (and their values) into L2, keys from n on
// none: a score loop's pass spreads the next pass's prefetches over its products, a part before
// each. All 16 keys' lines at the top of a pass (192 prefetches for a SmolLM2 unit) waited for
// miss buffers while the products behind them could not start: spread over the pass's heads,
// bfloat16 decodes from memory ran 1.09-1.32x faster, over its 9 query rows 0.98-1.16x faster
// again (int8 over its heads: 0.97-1.11x); bench_kv_cache.py --before-tree, EPYC Zen 4.
template <typename C>
inline void prefetch_pass_part(const C* const* keys, const C* const* values, int64_t ahead, int64_t part,
                               int64_t parts, int64_t n, int64_t span) {
  prefetch_keys_and_values(keys, values, std::min(ahead + 16 * part / parts, n),
                           std::min(ahead + 16 * (part + 1) / parts, n), span);
}

// For each of `heads` KV heads h: scores [rows][ld] from scores + h * rows * ld, keys
// [0, round_up(n, 16)) = q's rows (dim apart, head h's from q + h * rows * dim) . the key rows (head
// h's from keys + h * kKeyTile); keys from n on read `zeros`. 16 keys at a time for every head: a
// token's rows of a unit's KV heads are adjacent in its slot, so each pass reads whole runs of
// lines, and each prefetch (the keys and values kL2KeysAhead on, all heads' rows, into L2; head
// 0's pointers carry the span; a part before each query row's products, prefetch_pass_part) has
// every head's products to hide behind (accumulate_rows reads the values after the whole tile's
// scores).
__attribute__((target("avx512bf16"))) void row_scores(float* scores, int64_t ld, const bf16* q, int64_t rows,
                                                      int64_t heads, const bf16* const* keys, const bf16* const* values,
                                                      const bf16* zeros, int64_t n, int64_t dim) {
  const int64_t span = heads * dim * static_cast<int64_t>(sizeof(bf16));
  prefetch_keys_and_values(keys, values, 0, std::min(kL2KeysAhead, n), span);
  for (int64_t j = 0; j < n; j += 16) {
    for (int64_t h = 0; h < heads; ++h) {
      const bf16* k[16];
      for (int l = 0; l < 16; ++l) k[l] = j + l < n ? keys[h * kKeyTile + j + l] : zeros;
      for (int64_t r = h * rows; r < (h + 1) * rows; ++r) {
        prefetch_pass_part(keys, values, j + kL2KeysAhead, r, heads * rows, n, span);
        __m512 part[16];
        for (int l = 0; l < 16; ++l) part[l] = _mm512_setzero_ps();
        for (int64_t c = 0; c < dim; c += 32) {
          const __m512bh qc = reinterpret_cast<__m512bh>(_mm512_loadu_si512(q + r * dim + c));
          for (int l = 0; l < 16; ++l) {
            part[l] = _mm512_dpbf16_ps(part[l], reinterpret_cast<__m512bh>(_mm512_loadu_si512(k[l] + c)), qc);
          }
        }
        _mm512_storeu_ps(scores + r * ld + j, sum_each(part));
      }
    }
  }
}

// acc [R][dim] += p [R][n] (bfloat16, ld apart; zero at n when n is odd) . the value rows, in
// pair order: within each 32 columns, lanes 4L + i of the first 16 accumulators hold column
// 8L + i and of the second 8L + 4 + i (the order unpacking two rows' bfloat16 into pairs gives);
// pair_order_to_columns puts them back.
template <int R>
__attribute__((target("avx512bf16"))) void accumulate_rows(float* acc, int64_t dim, const uint16_t* p, int64_t ld,
                                                           const bf16* const* values, const bf16* zeros, int64_t n) {
  for (int64_t c = 0; c < dim; c += 32) {
    __m512 lo[R], hi[R];
    for (int r = 0; r < R; ++r) {
      lo[r] = _mm512_loadu_ps(acc + r * dim + c);
      hi[r] = _mm512_loadu_ps(acc + r * dim + c + 16);
    }
    for (int64_t j = 0; j < n; j += 2) {
      const __m512i x = _mm512_loadu_si512(values[j] + c), y = _mm512_loadu_si512((j + 1 < n ? values[j + 1] : zeros) + c);
      const __m512bh low = reinterpret_cast<__m512bh>(_mm512_unpacklo_epi16(x, y));
      const __m512bh high = reinterpret_cast<__m512bh>(_mm512_unpackhi_epi16(x, y));
      for (int r = 0; r < R; ++r) {
        const __m512bh w = reinterpret_cast<__m512bh>(_mm512_set1_epi32(*reinterpret_cast<const pair_t*>(p + r * ld + j)));
        lo[r] = _mm512_dpbf16_ps(lo[r], low, w);
        hi[r] = _mm512_dpbf16_ps(hi[r], high, w);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm512_storeu_ps(acc + r * dim + c, lo[r]);
      _mm512_storeu_ps(acc + r * dim + c + 16, hi[r]);
    }
  }
}

template <int R = kRowBlock>
void accumulate_any_rows(float* acc, int64_t rows, int64_t dim, const uint16_t* p, int64_t ld,
                         const bf16* const* values, const bf16* zeros, int64_t n) {
  if constexpr (R > 0) {
    if (rows >= R) {
      for (; rows >= R; rows -= R, acc += R * dim, p += R * ld) accumulate_rows<R>(acc, dim, p, ld, values, zeros, n);
    }
    if (rows > 0) accumulate_any_rows<R - 1>(acc, rows, dim, p, ld, values, zeros, n);
  }
}

void pair_order_to_columns(float* row, int64_t dim) {
  for (int64_t c = 0; c < dim; c += 32) {
    const __m512 lo = _mm512_loadu_ps(row + c), hi = _mm512_loadu_ps(row + c + 16);
    const __m512 first = _mm512_shuffle_f32x4(lo, hi, _MM_SHUFFLE(1, 0, 1, 0));   // lo L0, L1, hi L0, L1
    const __m512 second = _mm512_shuffle_f32x4(lo, hi, _MM_SHUFFLE(3, 2, 3, 2));  // lo L2, L3, hi L2, L3
    _mm512_storeu_ps(row + c, _mm512_shuffle_f32x4(first, first, _MM_SHUFFLE(3, 1, 2, 0)));
    _mm512_storeu_ps(row + c + 16, _mm512_shuffle_f32x4(second, second, _MM_SHUFFLE(3, 1, 2, 0)));
  }
}

inline const uint32_t* pairs(const bf16* p) { return reinterpret_cast<const uint32_t*>(p); }

// attend() with bfloat16 tile products (see above: on AMX, or pair blocks where bf16_pairs), or
// under kMatmulRows rows with products on the rows in place; scores have row stride kKeyTile.
void attend_bf16(const AttentionArgs<bf16, bf16>& a, const Unit& u, int64_t k_begin, int64_t k_end, TileBuffers& b) {
  using at::native::cpublas::brgemm;
  const int64_t rows = u.rows(a.group), width = u.kv_heads * a.group * a.dim, dim = a.dim;
  const int64_t head_rows = u.tokens * a.group;  // a head's rows: consecutive (kv_heads > 1 only for one token)
  const bool in_place = rows < kMatmulRows && dim % 32 == 0 && cpu_has_avx512bf16();
  TORCH_INTERNAL_ASSERT(in_place || u.kv_heads == 1, "a unit of several KV heads outside the in-place products");
  for (int64_t i = 0; i < u.tokens; ++i) {
    std::memcpy(b.q16.data() + i * width, a.q + (u.first_token + i) * a.q_stride + u.head * a.group * a.dim,
                width * sizeof(bf16));
  }
  reset_rows(a, rows, b);
  float* lanes = b.sum_lanes.data();  // row r's running sum: 16 lanes from r * 16
  std::fill_n(lanes, rows * 16, 0.0f);
  const int32_t* table = a.tables + u.seq * a.table_stride;
  float* scores = b.scores.data();
  uint16_t* p16 = reinterpret_cast<uint16_t*>(b.p16.data());
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kKeyTile) {
    const int64_t n = std::min(kKeyTile, k_end - k0);
    const bf16 *k16 = b.k16.data(), *v16 = b.v16.data();
    int64_t keys = in_place ? round_up(n, 2) : round_up(n, kPackKeys);  // P's columns, zero from n on
    if (in_place) {
      find_unit_rows(b.key_rows.data(), b.value_rows.data(), a, u, table, k0, n);
      row_scores(scores, kKeyTile, b.q16.data(), head_rows, u.kv_heads, b.key_rows.data(), b.value_rows.data(),
                 b.zeros.data(), n, dim);
    } else {
      if (u.packed) {  // k0 is a multiple of kKeyTile (no window: units and partitions start there)
        k16 = u.packed + k0 / kKeyTile * packed_tile_size(dim);
        v16 = k16 + kKeyTile * dim;
        keys = round_up(std::min(kKeyTile, u.packed_keys - k0), kPackKeys);  // the tile as packed
      } else {
        find_rows(b.key_rows.data(), a.k, table, k0, n, u.head, a);
        pack_keys(b.k16.data(), b.key_rows.data(), b.zeros.data(), n, dim);
        find_rows(b.key_rows.data(), a.v, table, k0, n, u.head, a);
        pack_values(b.v16.data(), b.key_rows.data(), b.zeros.data(), n, keys, dim);
      }
      if (a.bf16_tiles) {
        brgemm(rows, round_up(n, kPackColumns), dim, dim, kKeyTile, kKeyTile, false, b.q16.data(), k16, scores);
      } else {
        attention_products::pair_product(rows, n, dim / 2, dim / 2, kKeyTile, kKeyTile, false, pairs(b.q16.data()),
                                         pairs(k16), scores);
      }
    }
    float scale = a.scale;
    if (a.soft_cap > 0.0f) {
      soft_cap_scores(scores, rows * kKeyTile, a.soft_cap, scale);
      scale = 1.0f;
    }
    online_softmax(scores, kKeyTile, scale, b, rows, n, a.group * u.kv_heads, dim, first_visible(a, u, k0, rows),
                   u.q_pos - k0 + 1,
                   [&](int64_t r, const float* s, int64_t first, int64_t visible, float max, float alpha) {
                     bfloat16_weights(p16 + r * kKeyTile, s, first, visible, keys, scale, max, lanes + r * 16, alpha);
                   });
    if (in_place) {
      for (int64_t h = 0; h < u.kv_heads; ++h) {
        accumulate_any_rows(b.acc.data() + h * head_rows * dim, head_rows, dim, p16 + h * head_rows * kKeyTile,
                            kKeyTile, b.value_rows.data() + h * kKeyTile, b.zeros.data(), n);
      }
      continue;
    }
    for (int64_t c = 0; c < dim; c += kPackColumns) {
      if (a.bf16_tiles) {
        brgemm(rows, std::min(kPackColumns, dim - c), keys, kKeyTile, kPackColumns, dim, true, b.p16.data(),
               v16 + c * keys, b.acc.data() + c);
      } else {
        attention_products::pair_product(rows, std::min(kPackColumns, dim - c), keys / 2, kKeyTile / 2, kPackColumns,
                                         dim, true, pairs(b.p16.data()), pairs(v16 + c * keys), b.acc.data() + c);
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    b.row_sum[r] = _mm512_reduce_add_ps(_mm512_loadu_ps(lanes + r * 16));
    if (in_place) pair_order_to_columns(b.acc.data() + r * dim, dim);
  }
}

// ---------------------------------------------------------------- few query rows over 8-bit caches
//
// A decode over an int8 or e4m3 cache reads each key and value row once where the block table
// says it is, its codes converted in registers (kv_codes.h), the row's scale applied once per row:
// q.k = scale_k * sum_d q_d code_d, and p.v accumulates (p * scale_v) code. Everything is float32
// (the query as the float path scales it), so it matches reference.py's dequantize-then-attend
// within float32 rounding. Staging the rows dequantized into float tiles first, as the tile path
// does, made an 8-bit decode 2x slower than a bfloat16 one over half the bytes.

constexpr int64_t kCodeRowBlock = 4;  // query rows per pass over the values (4 x 4 accumulators)

// Scores of R query rows (float32, dim apart) against 16 key rows k: each key's codes converted
// once for the R rows, 8 keys at a time (R x 8 accumulators), the 16 partial sums of a row reduced
// together (sum_each).
template <typename C, int R>
inline void code_scores_rows(float* scores, int64_t ld, const float* q, const C* const* k, __m512 scale,
                             int64_t dim) {
  __m512 parts[R][16];
  for (int h = 0; h < 16; h += 8) {
    __m512 sum[R][8];
    for (int r = 0; r < R; ++r) {
      for (int l = 0; l < 8; ++l) sum[r][l] = _mm512_setzero_ps();
    }
    for (int64_t c = 0; c < dim; c += 16) {
      __m512 qc[R];
      for (int r = 0; r < R; ++r) qc[r] = _mm512_loadu_ps(q + r * dim + c);
      for (int l = 0; l < 8; ++l) {
        const __m512 x = CodeLanes<C>::load16(k[h + l] + c);
        for (int r = 0; r < R; ++r) sum[r][l] = _mm512_fmadd_ps(x, qc[r], sum[r][l]);
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int l = 0; l < 8; ++l) parts[r][h + l] = sum[r][l];
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(scores + r * ld, _mm512_mul_ps(sum_each(parts[r]), scale));
}

// For each of `heads` KV heads h: scores [head_rows][ld] from scores + h * head_rows * ld, keys [0,
// round_up(n, 16)) = q's float rows (dim apart, head h's from q + h * head_rows * dim) . the key
// rows' values (head h's from keys + h * kKeyTile); keys from n on read `zeros` (codes and scale
// 0). 16 keys at a time for every head, so each prefetch (the keys and values kL2KeysAhead on into
// L2, a part before each head's products: prefetch_pass_part) has every head's products to hide
// behind. key_scales: room for heads x kKeyTile floats, the keys' lane_scale, each 16 keys' written
// one pass of the loop before their vector load (a vector load right after its lanes' scalar stores
// waits for them, 15% of this function when it did) and after their prefetch (during the pass
// before, the last head's part a head's products before): a pass over the whole tile's scales
// before the loop read every key's first line from memory one at a time (65% of this function at
// batch 64 and 512 tokens of an int8 cache). row_bytes: one KV head's row in the cache (codes and
// scale, or floats), so a token's rows of the unit's heads span heads x row_bytes.
template <typename C>
void code_scores(float* scores, int64_t ld, const float* q, int64_t head_rows, int64_t heads, const C* const* keys,
                 const C* const* values, const C* zeros, int64_t n, int64_t dim, int64_t row_bytes,
                 float* key_scales) {
  const auto find_scales = [&](int64_t j0) {  // keys [j0, j0 + 16)'s scales, 0 from n on
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t j = j0; j < j0 + 16; ++j) {
        key_scales[h * kKeyTile + j] = j < n ? lane_scale(keys[h * kKeyTile + j], dim) : 0.0f;
      }
    }
  };
  const int64_t span = heads * row_bytes;
  prefetch_keys_and_values(keys, values, 0, std::min(kL2KeysAhead, n), span);
  find_scales(0);
  for (int64_t j = 0; j < n; j += 16) {
    if (j + 16 < n) find_scales(j + 16);  // prefetched a pass ago
    for (int64_t h = 0; h < heads; ++h) {
      prefetch_pass_part(keys, values, j + kL2KeysAhead, h, heads, n, span);
      const C* k[16];
      for (int l = 0; l < 16; ++l) k[l] = j + l < n ? keys[h * kKeyTile + j + l] : zeros;
      const __m512 scale = _mm512_loadu_ps(key_scales + h * kKeyTile + j);
      float* out = scores + h * head_rows * ld + j;
      const float* qh = q + h * head_rows * dim;
      int64_t r = 0;
      for (; r + 3 <= head_rows; r += 3) code_scores_rows<C, 3>(out + r * ld, ld, qh + r * dim, k, scale, dim);
      if (head_rows - r == 2) code_scores_rows<C, 2>(out + r * ld, ld, qh + r * dim, k, scale, dim);
      if (head_rows - r == 1) code_scores_rows<C, 1>(out + r * ld, ld, qh + r * dim, k, scale, dim);
    }
  }
}

// acc [R][dim] columns [c0, c0 + 16 W) += p [R][n] (ld apart, each weight times its value row's
// lane_scale) . the value rows' codes: R x W accumulators in registers, each row's codes converted once.
template <typename C, int R, int W>
void accumulate_code_columns(float* acc, int64_t dim, int64_t c0, const float* p, int64_t ld,
                             const C* const* values, int64_t n) {
  __m512 sum[R][W];
  for (int r = 0; r < R; ++r) {
    for (int w = 0; w < W; ++w) sum[r][w] = _mm512_loadu_ps(acc + r * dim + c0 + 16 * w);
  }
  for (int64_t j = 0; j < n; ++j) {
    __m512 x[W];
    for (int w = 0; w < W; ++w) x[w] = CodeLanes<C>::load16(values[j] + c0 + 16 * w);
    for (int r = 0; r < R; ++r) {
      const __m512 weight = _mm512_set1_ps(p[r * ld + j]);
      for (int w = 0; w < W; ++w) sum[r][w] = _mm512_fmadd_ps(weight, x[w], sum[r][w]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int w = 0; w < W; ++w) _mm512_storeu_ps(acc + r * dim + c0 + 16 * w, sum[r][w]);
  }
}

template <typename C, int R = kCodeRowBlock>
void accumulate_code_rows(float* acc, int64_t rows, int64_t dim, const float* p, int64_t ld, const C* const* values,
                          int64_t n) {
  if constexpr (R > 0) {
    for (; rows >= R; rows -= R, acc += R * dim, p += R * ld) {
      int64_t c = 0;
      for (; c + 64 <= dim; c += 64) accumulate_code_columns<C, R, 4>(acc, dim, c, p, ld, values, n);
      for (; c < dim; c += 16) accumulate_code_columns<C, R, 1>(acc, dim, c, p, ld, values, n);
    }
    if (rows > 0) accumulate_code_rows<C, R - 1>(acc, rows, dim, p, ld, values, n);
  }
}

// attend() over an 8-bit or float32 cache for units under kMatmulRows rows, head_dim a multiple of
// 16: scores have row stride kKeyTile. A decode's unit takes several KV heads (kv_heads_per_unit),
// read together 16 keys at a time: with head_dim 64 a head's row (66 bytes) shares its cache lines
// with its neighbours', so this fetches each line once, where units of a head each fetched the
// lines a second and third time (an 8-bit decode then moved as many cache lines as a bfloat16 one).
// A float32 row is read as it is (CodeLanes<float>, scale 1). A float32 decode used to stage and
// transpose each tile first, as the tile path does: 1.31-1.37x slower at 16-64 sequences x
// 128-2048 tokens from memory (bench_kv_cache.py --kv-dtypes f32 --layers auto --before-tree, 2
// threads, a Xeon with AVX-512 and no AVX512-BF16); 8 to 64 keys of prefetch ahead ran alike.
template <typename T, typename C>
void attend_codes(const AttentionArgs<T, C>& a, const Unit& u, int64_t k_begin, int64_t k_end, TileBuffers& b) {
  const int64_t rows = u.rows(a.group), width = u.kv_heads * a.group * a.dim, dim = a.dim;
  const int64_t head_rows = u.tokens * a.group;  // a head's rows: consecutive (kv_heads > 1 only for one token)
  for (int64_t i = 0; i < u.tokens; ++i) {
    const T* src = a.q + (u.first_token + i) * a.q_stride + u.head * a.group * a.dim;
    for (int64_t e = 0; e < width; ++e) b.q[i * width + e] = load(src, e) * a.scale;
  }
  reset_rows(a, rows, b);
  static thread_local std::vector<const C*> key_rows, value_rows;
  if (static_cast<int64_t>(key_rows.size()) < u.kv_heads * kKeyTile) {
    key_rows.resize(u.kv_heads * kKeyTile);
    value_rows.resize(u.kv_heads * kKeyTile);
  }
  const C* zeros = reinterpret_cast<const C*>(b.zeros.data());  // 4 dim zero bytes: a row of codes or floats
  const int32_t* table = a.tables + u.seq * a.table_stride;
  float* scores = b.scores.data();
  float* key_scales = b.key_scales.data();
  float* value_scales = b.value_scales.data();
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kKeyTile) {
    const int64_t n = std::min(kKeyTile, k_end - k0);
    find_unit_rows(key_rows.data(), value_rows.data(), a, u, table, k0, n);
    code_scores(scores, kKeyTile, b.q.data(), head_rows, u.kv_heads, key_rows.data(), value_rows.data(), zeros, n,
                dim, a.cache_row * static_cast<int64_t>(sizeof(C)), key_scales);
    if (a.soft_cap > 0.0f) {
      for (int64_t r = 0; r < rows; ++r) soft_cap_scores(scores + r * kKeyTile, n, a.soft_cap, 1.0f);
    }
    online_softmax(scores, kKeyTile, 1.0f, b, rows, n, a.group * u.kv_heads, dim, first_visible(a, u, k0, rows),
                   u.q_pos - k0 + 1, Float32Weights{n, 1.0f, b.row_sum.data()});
    for (int64_t h = 0; h < u.kv_heads; ++h) {
      const C* const* values = value_rows.data() + h * kKeyTile;
      float* weights = scores + h * head_rows * kKeyTile;
      if constexpr (!std::is_same_v<C, float>) {  // a float32 row's scale is 1
        for (int64_t j = 0; j < n; ++j) value_scales[j] = lane_scale(values[j], dim);
        for (int64_t r = 0; r < head_rows; ++r) {
          for (int64_t j = 0; j < n; ++j) weights[r * kKeyTile + j] *= value_scales[j];
        }
      }
      accumulate_code_rows(b.acc.data() + h * head_rows * dim, head_rows, dim, weights, kKeyTile, values, n);
    }
  }
}

#endif  // __AVX512F__

// One unit's rows against keys [k_begin, k_end): leaves the unnormalized accumulator, each row's
// max and sum in b.
template <typename T, typename C>
void attend(const AttentionArgs<T, C>& a, const Unit& u, int64_t k_begin, int64_t k_end, TileBuffers& b) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, bf16> && std::is_same_v<C, bf16>) {
    if (a.bf16_tiles || a.bf16_pairs) return attend_bf16(a, u, k_begin, k_end, b);
    // Without AMX: its in-place products on rows (in_place there), not on tiles (see attention_products.h).
    if (a.bf16_rows && u.rows(a.group) < kMatmulRows && a.dim % 32 == 0) return attend_bf16(a, u, k_begin, k_end, b);
  }
  if constexpr (std::is_same_v<C, int8_t> || std::is_same_v<C, c10::Float8_e4m3fn> || std::is_same_v<C, float>) {
    if (u.rows(a.group) < kMatmulRows && a.dim % 16 == 0) return attend_codes(a, u, k_begin, k_end, b);
  }
#endif
  TORCH_INTERNAL_ASSERT(u.kv_heads == 1, "a unit of several KV heads outside attend_codes and attend_bf16");
  const int64_t rows = u.tokens * a.group, width = a.group * a.dim;
  for (int64_t i = 0; i < u.tokens; ++i) {
    const T* src = a.q + (u.first_token + i) * a.q_stride + u.head * width;
    for (int64_t e = 0; e < width; ++e) b.q[i * width + e] = load(src, e) * a.scale;
  }
  reset_rows(a, rows, b);
  const int32_t* table = a.tables + u.seq * a.table_stride;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kKeyTile) {
    const int64_t n = std::min(kKeyTile, k_end - k0);
    stage_keys(b.k.data(), a.k, table, k0, n, u.head, a);
    stage_keys(b.v.data(), a.v, table, k0, n, u.head, a);
    attention_products::transpose_rows(b.kt.data(), kKeyTile, b.k.data(), n, a.dim);
    tile_scores(b.scores.data(), b.q.data(), b.kt.data(), rows, n, a.dim);
    if (a.soft_cap > 0.0f) soft_cap_scores(b.scores.data(), rows * n, a.soft_cap, 1.0f);
    online_softmax(b.scores.data(), n, 1.0f, b, rows, n, a.group, a.dim, first_visible(a, u, k0, rows),
                   u.q_pos - k0 + 1, Float32Weights{n, 1.0f, b.row_sum.data()});
    tile_accumulate(b.acc.data(), b.scores.data(), b.v.data(), rows, n, a.dim);
  }
}

// KV heads per unit for a sequence's q_len query tokens: several for a decode over an 8-bit or
// float32 cache where attend_codes runs, or over a bfloat16 one where attend_bf16's in-place row
// products run, as many as keep the unit under kMatmulRows rows; else 1. A bfloat16 decode's unit per KV head read
// every third 128-byte run of a SmolLM2 cache's slots (3 KV heads side by side), the three units of
// a sequence at different times on different threads: 16 sequences x 128-512 tokens from memory
// read at 2.1-2.3x the K/V's read time, 64 x 512 at 4.5x (bench_kv_cache.py, EPYC Zen 4).
int64_t kv_heads_per_unit(const at::Tensor& k_cache, int64_t group, int64_t q_len, int64_t dim) {
#if defined(__AVX512F__)
  const bool codes = (is_quantized(k_cache) || k_cache.scalar_type() == at::kFloat) && dim % 16 == 0;
  const bool bf16_rows = k_cache.scalar_type() == at::kBFloat16 && dim % 32 == 0 && bf16_rows_available();
  if (q_len == 1 && (codes || bf16_rows)) {
    return std::clamp<int64_t>((kMatmulRows - 1) / group, 1, k_cache.size(2));
  }
#endif
  return 1;
}

template <typename T, typename C>
void write_rows(const AttentionArgs<T, C>& a, const Unit& u, const float* acc, const float* row_sum) {
  const int64_t token_rows = u.kv_heads * a.group;  // a token's rows are consecutive query heads
  for (int64_t i = 0; i < u.tokens; ++i) {
    T* dst = a.out + (u.first_token + i) * a.num_heads * a.dim + u.head * a.group * a.dim;
    for (int64_t g = 0; g < token_rows; ++g) {
      const int64_t r = i * token_rows + g;
      const float inv = 1.0f / row_sum[r];
      for (int64_t d = 0; d < a.dim; ++d) store(dst, g * a.dim + d, acc[r * a.dim + d] * inv);
    }
  }
}

// Partition p of a split unit left [rows] maxes, [rows] sums and [rows, dim] accumulators at
// workspace + offset + p * rows * (dim + 2); combine them with each partition's weight
// e^(max_p - max), as one softmax over all the keys would have.
template <typename T, typename C>
void reduce_partitions(const AttentionArgs<T, C>& a, const Unit& u, const float* workspace, TileBuffers& b) {
  const int64_t rows = u.rows(a.group), stride = rows * (a.dim + 2);
  const float* base = workspace + u.workspace;
  std::fill_n(b.acc.begin(), rows * a.dim, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    float max = -std::numeric_limits<float>::infinity();
    for (int64_t p = 0; p < u.parts; ++p) max = std::max(max, base[p * stride + r]);
    float total = 0.0f;
    for (int64_t p = 0; p < u.parts; ++p) {
      const float* part = base + p * stride;
      const float w = fast_exp(part[r] - max);  // 0 for a partition this row sees none of
      if (w == 0.0f) continue;
      total += w * part[rows + r];
      const float* acc = part + 2 * rows + r * a.dim;
      for (int64_t d = 0; d < a.dim; ++d) b.acc[r * a.dim + d] += w * acc[d];
    }
    b.row_sum[r] = total;
  }
  write_rows(a, u, b.acc.data(), b.row_sum.data());
}

// Keys of a decode's item prefetched into L2 while the thread's item before it runs (see
// prefetch_start): as many as the score loops keep in flight ahead (kL2KeysAhead), so an item
// starts with its first window of keys and values on its way.
constexpr int64_t kStartKeys = kL2KeysAhead;

// The cache lines of the first kStartKeys keys' K and V rows (its unit's KV heads) of an item of
// few query rows (a decode's), on their way into L2 while the item before it on the same thread
// runs (for_each_dynamic's `following`): the kernels prefetch ahead within an item, not across
// items, so each item's first keys came from memory while it waited (at 128 tokens of context
// half an item's keys). Not the next item in order: with threads claiming items in turn, that one
// is most often running on another thread already, its lines read into the wrong core's L2.
// Against none (bench_kv_cache.py --before-tree, 2-vCPU EPYC Zen 4, bfloat16, 16 and 64 sequences
// at 128 and 512 tokens, two alternations): 1.37-1.58x the no-prefetch tree's speed with it,
// 1.27-1.53x without. Prefill items are compute-bound: none.
template <typename T, typename C>
void prefetch_start(const AttentionArgs<T, C>& a, const Unit& u, int64_t k_begin) {
  if (u.rows(a.group) >= kMatmulRows) return;
  const int32_t* table = a.tables + u.seq * a.table_stride;
  const int64_t bytes = u.kv_heads * a.cache_row * static_cast<int64_t>(sizeof(C));
  for (int64_t p = k_begin; p < std::min(u.kv_end(), k_begin + kStartKeys); ++p) {
    const int64_t at = table[p / a.block_size] * a.block_stride + p % a.block_size * a.slot_stride + u.head * a.cache_row;
    for (const C* cache : {a.k, a.v}) prefetch_span(cache + at, bytes);
  }
}

// Runs fn(thread buffers, index, following) for index in [0, n), handed out one at a time in order
// to whichever thread is free (items come sorted costliest first, so the threads finish
// together), on at most max_threads threads. following: the index this thread runs next (n: none),
// claimed before index runs, so that fn can start its reads (see prefetch_start): the item after
// index in order is the one another thread is likely running by then.
template <typename Fn>
void for_each_dynamic(int64_t n, int64_t max_threads, int64_t rows, int64_t dim, bool bf16_tiles, const Fn& fn) {
  if (n == 0) return;
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>({at::get_num_threads(), n, max_threads});
  kernel_pool::parallel_for(0, std::max<int64_t>(threads, 1), 1, [&](int64_t, int64_t) {
    TileBuffers& buffers = thread_buffers(rows, dim);
    for (int64_t i = next++; i < n;) {
      const int64_t following = std::min<int64_t>(next++, n);
      fn(buffers, i, following);
      i = following;
    }
    // AMX tile state is per thread and oneDNN's matmuls configure it too: hand it back when done.
    if (bf16_tiles) at::native::cpublas::brgemm_release();
  });
}

template <typename T, typename C>
void paged_attention_kernel(const AttentionArgs<T, C>& a, std::vector<Unit>& units) {
  // Buffers sized for this batch's tallest tile (a decode batch's are a few rows, not kTileRows).
  int64_t max_rows = 1, total_cost = 0, total_keys = 0;
  for (const Unit& u : units) {
    max_rows = std::max(max_rows, u.rows(a.group));
    total_cost += u.rows(a.group) * u.keys();
    total_keys += u.keys() * u.kv_heads;
  }
  // Waking the other threads costs more than a small call's whole work (a decode at batch 1 and
  // short context: 3 units of a few microseconds each): such calls run on this thread.
  const int64_t kv_bytes = total_keys * 2 * a.dim * static_cast<int64_t>(sizeof(C));
  const int64_t max_threads = total_cost >= kParallelCost || kv_bytes >= kParallelBytes ? at::get_num_threads() : 1;
  const int64_t target = total_cost / kTargetItems + 1;
  // Kept across calls (cleared, capacity kept): a batch-1 decode's attention is a few
  // microseconds, and each vector's allocation and free a measurable part of it. A reference:
  // the parts below name the calling thread's vector (a thread_local named in a lambda would be
  // the running thread's own).
  static thread_local std::vector<Item> item_storage;
  std::vector<Item>& items = item_storage;
  items.clear();
  int64_t workspace_size = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(units.size()); ++i) {
    Unit& u = units[i];
    const int64_t rows = u.rows(a.group);
    // A unit of several KV heads does kv_heads units' work per key: its shortest partition is as
    // short in work, not in keys (a lone 2048-token decode: 8 items, as 12 for its heads apart).
    const int64_t keys = std::max(kPartitionKeys / u.kv_heads, (target + rows - 1) / rows);
    u.part_keys = (keys + kKeyTile - 1) / kKeyTile * kKeyTile;
    u.parts = (u.keys() + u.part_keys - 1) / u.part_keys;
    if (u.parts > 1) {
      u.workspace = workspace_size;
      workspace_size += u.parts * rows * (a.dim + 2);
    }
    for (int64_t p = 0; p < u.parts; ++p) {
      const int64_t begin = u.kv_begin + p * u.part_keys;
      items.push_back({i, p, rows * (std::min(u.kv_end(), begin + u.part_keys) - begin)});
    }
  }
  // Sorted only where not already (a batch-1 decode's units cost the same): std::stable_sort
  // allocates a buffer on every call. The same order either way.
  const auto costlier = [](const Item& x, const Item& y) { return x.cost > y.cost; };
  if (!std::is_sorted(items.begin(), items.end(), costlier)) std::stable_sort(items.begin(), items.end(), costlier);
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, bf16> && std::is_same_v<C, bf16>) {
    static thread_local std::vector<bf16> packed;  // grown as needed, kept across calls
    if (a.bf16_tiles || a.bf16_pairs) prepack_contexts(a, units, packed);
  }
#endif
  std::vector<float> workspace(workspace_size);
  const int64_t num_items = static_cast<int64_t>(items.size());
  for_each_dynamic(num_items, max_threads, max_rows, a.dim, a.bf16_tiles,
                   [&](TileBuffers& b, int64_t index, int64_t following) {
    if (following < num_items) {
      const Item& after = items[following];
      const Unit& next = units[after.unit];
      prefetch_start(a, next, next.kv_begin + after.part * next.part_keys);
    }
    const Item& item = items[index];
    const Unit& u = units[item.unit];
    const int64_t k_begin = u.kv_begin + item.part * u.part_keys;
    const int64_t k_end = std::min(u.kv_end(), k_begin + u.part_keys);
    attend(a, u, k_begin, k_end, b);
    if (u.parts == 1) {
      write_rows(a, u, b.acc.data(), b.row_sum.data());
      return;
    }
    const int64_t rows = u.rows(a.group);
    float* part = workspace.data() + u.workspace + item.part * rows * (a.dim + 2);
    std::copy_n(b.row_max.begin(), rows, part);
    std::copy_n(b.row_sum.begin(), rows, part + rows);
    std::copy_n(b.acc.begin(), rows * a.dim, part + 2 * rows);
  });
  std::vector<int64_t> split;
  for (int64_t i = 0; i < static_cast<int64_t>(units.size()); ++i) {
    if (units[i].parts > 1) split.push_back(i);
  }
  for_each_dynamic(static_cast<int64_t>(split.size()), max_threads, max_rows, a.dim, false,
                   [&](TileBuffers& b, int64_t index, int64_t) {
    reduce_partitions(a, units[split[index]], workspace.data(), b);
  });
}

void check_attention_args(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t num_seqs) {
  check_rows(query, "query", 3);
  check_cache(k_cache, "k_cache");
  check_cache(v_cache, "v_cache");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache must have one shape");
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type() &&
                  (query.scalar_type() == k_cache.scalar_type() || is_quantized(k_cache)),
              "query and the caches must share a dtype (or the caches be 8-bit: int8, float8_e4m3fn)");
  TORCH_CHECK(query.size(2) + (is_quantized(k_cache) ? kScaleBytes : 0) == k_cache.size(3),
              "query's head_dim does not match the cache's");
  TORCH_CHECK(query.size(1) % k_cache.size(2) == 0, "query heads must be a multiple of the KV heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 && block_tables.stride(1) == 1 &&
                  block_tables.size(0) == num_seqs,
              "block_tables must be int32 [num_seqs, max_blocks], dense in its rows");
  TORCH_CHECK(context_lens.scalar_type() == at::kInt && context_lens.is_contiguous() &&
                  context_lens.numel() == num_seqs,
              "context_lens must be dense int32 [num_seqs]");
  const int64_t block_size = k_cache.size(1), max_blocks = block_tables.size(1), num_blocks = k_cache.size(0);
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t used = (static_cast<int64_t>(lens[s]) + block_size - 1) / block_size;
    TORCH_CHECK(lens[s] >= 0 && used <= max_blocks, "context_lens[", s, "] = ", lens[s],
                " needs more blocks than block_tables holds");
    for (int64_t b = 0; b < used; ++b) {
      const int32_t block = tables[s * block_tables.stride(0) + b];
      TORCH_CHECK(block >= 0 && block < num_blocks, "block_tables[", s, "][", b, "] = ", block,
                  " is outside the cache (", num_blocks, " blocks)");
    }
  }
}

// cu (num_seqs + 1 offsets into query's tokens), or nullptr for one query token per sequence.
void check_variants(const std::optional<int64_t>& sliding_window, const std::optional<double>& soft_cap) {
  TORCH_CHECK(!sliding_window || *sliding_window >= 1, "sliding_window must be at least 1, got ", *sliding_window);
  TORCH_CHECK(!soft_cap || *soft_cap > 0.0, "soft_cap must be positive, got ", *soft_cap);
}

template <typename T, typename C>
void run_attention(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& block_tables, at::Tensor& out, std::vector<Unit>& units, double scale,
                   int64_t window, double soft_cap) {
  const int64_t dim = query.size(2), row = k_cache.size(3), heads = k_cache.size(2);
  const AttentionArgs<T, C> args{
      query.data_ptr<T>(), static_cast<const C*>(k_cache.data_ptr()), static_cast<const C*>(v_cache.data_ptr()),
      out.data_ptr<T>(), block_tables.data_ptr<int32_t>(), query.stride(0), block_tables.stride(0),
      query.size(1) / heads, dim, row, query.size(1), k_cache.size(1), heads * row, k_cache.size(1) * heads * row,
      window, static_cast<float>(scale), static_cast<float>(soft_cap),
      std::is_same_v<T, bf16> && std::is_same_v<C, bf16> && dim % 2 == 0 && bf16_tiles_available(),
      std::is_same_v<T, bf16> && std::is_same_v<C, bf16> && dim % 2 == 0 && !bf16_tiles_available() &&
          bf16_pairs_available(),
      std::is_same_v<T, bf16> && std::is_same_v<C, bf16> && bf16_rows_available()};
  paged_attention_kernel(args, units);
}

at::Tensor attention(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_tables, const at::Tensor& context_lens, const int32_t* cu,
                     double scale, const std::optional<int64_t>& sliding_window,
                     const std::optional<double>& soft_cap) {
  const int64_t window = sliding_window.value_or(0);
  const int64_t num_seqs = context_lens.numel(), num_heads = query.size(1);
  const int64_t group = num_heads / k_cache.size(2), tile_tokens = std::max<int64_t>(1, kTileRows / group);
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  auto out = at::empty(query.sizes(), query.options());
  static thread_local std::vector<Unit> unit_storage;  // kept across calls, as paged_attention_kernel's items
  std::vector<Unit>& units = unit_storage;
  units.clear();
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t first = cu ? cu[s] : s, q_len = cu ? cu[s + 1] - cu[s] : 1, ctx = lens[s];
    if (ctx == 0 && q_len <= 1) {  // a padding row attends to nothing: zeros
      out.narrow(0, first, q_len).zero_();
      continue;
    }
    TORCH_CHECK(q_len <= ctx, "sequence ", s, " has ", q_len, " query tokens but context_lens[", s, "] = ", ctx);
    const int64_t heads_per_unit = kv_heads_per_unit(k_cache, group, q_len, query.size(2));
    for (int64_t t = 0; t < q_len; t += tile_tokens) {
      for (int64_t h = 0; h < k_cache.size(2); h += heads_per_unit) {
        const int64_t q_pos = ctx - q_len + t;
        const int64_t kv_begin = window > 0 ? std::max<int64_t>(0, q_pos - window + 1) : 0;
        units.push_back({s, h, first + t, std::min(tile_tokens, q_len - t), q_pos, kv_begin, 1, 0, 0});
        units.back().kv_heads = std::min(heads_per_unit, k_cache.size(2) - h);
      }
    }
  }
  const double cap = soft_cap.value_or(0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "paged_attention", [&] {
    if (k_cache.scalar_type() == at::kChar) {
      run_attention<scalar_t, int8_t>(query, k_cache, v_cache, block_tables, out, units, scale, window, cap);
    } else if (k_cache.scalar_type() == at::kFloat8_e4m3fn) {
      run_attention<scalar_t, c10::Float8_e4m3fn>(query, k_cache, v_cache, block_tables, out, units, scale, window,
                                                   cap);
    } else {
      run_attention<scalar_t, scalar_t>(query, k_cache, v_cache, block_tables, out, units, scale, window, cap);
    }
  });
  return out;
}

// a [m, k] . b [k, n] (bfloat16, k even) as float32 on attention_products.h's pair blocks, b's
// rows packed to pairs first as pack_values does: the blocks' direct test (tests/test_cpu_ops.py),
// on any CPU with AVX512-BF16, where attention itself would take AMX or FMA tiles.
at::Tensor bfloat16_pair_product(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(cpu_features::avx512_bf16(), "bfloat16_pair_product needs AVX512-BF16");
  TORCH_CHECK(a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16 && a.dim() == 2 && b.dim() == 2 &&
                  a.size(1) == b.size(0) && a.size(1) % 2 == 0,
              "bfloat16_pair_product takes bfloat16 a [m, k] and b [k, n], k even");
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  const at::Tensor rows = a.contiguous();
  // [k / 2][n][2]: pair (2i, 2i + 1) of column j at (i, j)
  const at::Tensor packed = b.contiguous().view({k / 2, 2, n}).transpose(1, 2).contiguous();
  auto out = at::empty({m, n}, a.options().dtype(at::kFloat));
  attention_products::pair_product(m, n, k / 2, k / 2, n, n, false,
                                   reinterpret_cast<const uint32_t*>(rows.data_ptr<at::BFloat16>()),
                                   reinterpret_cast<const uint32_t*>(packed.data_ptr<at::BFloat16>()),
                                   out.data_ptr<float>());
  return out;
}

// One query token per sequence (query is [num_seqs, num_heads, head_dim]).
at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                            std::optional<int64_t> sliding_window, std::optional<double> soft_cap) {
  check_attention_args(query, k_cache, v_cache, block_tables, context_lens, query.size(0));
  check_variants(sliding_window, soft_cap);
  return attention(query, k_cache, v_cache, block_tables, context_lens, nullptr, scale, sliding_window, soft_cap);
}

// A mixed batch: sequence i's query tokens are query[cu_query_lens[i]:cu_query_lens[i + 1]], the
// last tokens of its context (a prefill chunk, possibly after cached context, or a decode).
at::Tensor paged_attention(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& context_lens,
                           const at::Tensor& cu_query_lens, double scale, std::optional<int64_t> sliding_window,
                           std::optional<double> soft_cap) {
  check_attention_args(query, k_cache, v_cache, block_tables, context_lens, context_lens.numel());
  check_variants(sliding_window, soft_cap);
  TORCH_CHECK(cu_query_lens.scalar_type() == at::kInt && cu_query_lens.is_contiguous() &&
                  cu_query_lens.numel() == context_lens.numel() + 1,
              "cu_query_lens must be dense int32 [num_seqs + 1]");
  const int32_t* cu = cu_query_lens.data_ptr<int32_t>();
  TORCH_CHECK(cu[0] == 0 && cu[context_lens.numel()] == query.size(0),
              "cu_query_lens must run from 0 to the number of query tokens");
  for (int64_t s = 0; s < context_lens.numel(); ++s) {
    TORCH_CHECK(cu[s + 1] >= cu[s], "cu_query_lens must not decrease (at ", s, ")");
  }
  return attention(query, k_cache, v_cache, block_tables, context_lens, cu, scale, sliding_window, soft_cap);
}

}  // namespace

// layer_kernels.h: the kernels above into a caller's outputs, for step_ops.cpp's decoder_layer.
namespace layer_kernels {
void rms_norm_into(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& out) {
  ::rms_norm_into(x, weight, eps, out);
}
void add_rms_norm_into(at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& out) {
  ::add_rms_norm_into(residual, x, weight, eps, out);
}
void silu_mul_into(const at::Tensor& gate_up, at::Tensor& out) { ::silu_mul_into(gate_up, out); }
}  // namespace layer_kernels

TORCH_LIBRARY(bento_llm, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
  m.def("add_rms_norm(Tensor(a!) residual, Tensor x, Tensor weight, float eps) -> Tensor", &add_rms_norm);
  m.def("silu_mul(Tensor gate_up) -> Tensor", &silu_mul);
  m.def("argmax_rows(Tensor logits) -> Tensor", &argmax_rows);
  m.def("int8_quad_rows(Tensor codes, Tensor scales, Tensor index, int in_features, int rotation_block=0) -> Tensor",
        &int8_quad_rows);
  m.def("rotary_embedding_(Tensor(a!) qk, Tensor cos, Tensor sin) -> ()", &rotary_embedding_);
  m.def("write_kv_cache(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()",
        &write_kv_cache);
  m.def("decode_attention(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
        "float scale, int? sliding_window=None, float? soft_cap=None) -> Tensor",
        &decode_attention);
  m.def("paged_attention(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
        "Tensor cu_query_lens, float scale, int? sliding_window=None, float? soft_cap=None) -> Tensor",
        &paged_attention);
  m.def("bfloat16_tiles_available() -> bool", &bf16_tiles_available);
  m.def("bfloat16_pairs_available() -> bool", &bf16_pairs_available);
  m.def("bfloat16_pair_product(Tensor a, Tensor b) -> Tensor", &bfloat16_pair_product);
}
