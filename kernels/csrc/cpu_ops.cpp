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
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// Loads and stores convert to and from float32 on raw bits, in forms the compiler vectorizes
// (c10's conversion operators keep these loops scalar). The loops vectorize under the math
// flags kernels/cpu_ops.py passes (-fno-trapping-math, -fassociative-math for the reductions).
template <typename T>
inline float load(const T* p, int64_t i) {
  return static_cast<float>(p[i]);
}

template <>
inline float load<c10::BFloat16>(const c10::BFloat16* p, int64_t i) {
  // bfloat16 is the top half of a float32.
  return std::bit_cast<float>(static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16);
}

template <typename T>
inline void store(T* p, int64_t i, float v) {
  p[i] = static_cast<T>(v);
}

template <>
inline void store<c10::BFloat16>(c10::BFloat16* p, int64_t i, float v) {
  // Round to nearest even, as torch's float -> bfloat16 conversion; NaN stays a quiet NaN.
  const uint32_t bits = std::bit_cast<uint32_t>(v);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  reinterpret_cast<uint16_t*>(p)[i] = v != v ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
}

// exp for the softmax and SiLU: Cephes' single-precision polynomial after a base-2 range
// reduction, written branch-free so that loops over it vectorize (std::exp does not here).
// Relative error about 2e-7 inside [-80, 80]; above, the input is clamped to 80. The clamp is
// kept well inside float's normal range on purpose: denormal intermediates (say 1 / (1 + e^88))
// cost a microcode assist per vector, measured 9x slower SiLU.
inline float fast_exp(float x_in) {
  const float x = std::min(std::max(x_in, -80.0f), 80.0f);
  const float k = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - k * 0.693359375f + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const float value = e * std::bit_cast<float>(static_cast<uint32_t>(static_cast<int32_t>(k) + 127) << 23);
  // Below the range, 0 rather than e^-80: a softmax weight of 1e-35 times a small V element
  // would be a denormal product in the PV loop.
  return x_in < -80.0f ? 0.0f : value;
}

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

// y = x / rms(x) * weight, computed in float32 and rounded once to x's dtype.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm_args(x, weight);
  auto out = at::empty(x.sizes(), x.options());
  const int64_t rows = x.size(0), n = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const float* w = weight.data_ptr<float>();
    const int64_t stride = x.stride(0);
    at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) rms_norm_row(dst + r * n, src + r * stride, w, n, static_cast<float>(eps));
    });
  });
  return out;
}

// residual += x (rounded to the residual's dtype, as the unfused add would), then the norm of
// the new residual: the pre-norm of one decoder sublayer in one pass.
at::Tensor add_rms_norm(at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm_args(x, weight);
  TORCH_CHECK(residual.is_contiguous() && residual.sizes() == x.sizes(), "residual must be dense and shaped like x");
  TORCH_CHECK(residual.scalar_type() == x.scalar_type(), "residual and x must share a dtype");
  auto out = at::empty(x.sizes(), x.options());
  const int64_t rows = x.size(0), n = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* res = residual.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const float* w = weight.data_ptr<float>();
    const int64_t stride = x.stride(0);
    at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        add_row(res + r * n, src + r * stride, n);
        rms_norm_row(dst + r * n, res + r * n, w, n, static_cast<float>(eps));
      }
    });
  });
  return out;
}

template <typename T>
void silu_mul_row(T* out, const T* gate, int64_t n) {
  const T* up = gate + n;
  for (int64_t i = 0; i < n; ++i) {
    const float g = load(gate, i);
    store(out, i, g * (1.0f / (1.0f + fast_exp(-g))) * load(up, i));
  }
}

// SwiGLU's activation: gate_up is [tokens, 2 * I] (gate then up); out = silu(gate) * up.
at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "gate_up", 2);
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up must have an even number of columns");
  const int64_t rows = gate_up.size(0), n = gate_up.size(1) / 2;
  auto out = at::empty({rows, n}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_mul", [&] {
    const scalar_t* src = gate_up.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    const int64_t stride = gate_up.stride(0);
    at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) silu_mul_row(dst + r * n, src + r * stride, n);
    });
  });
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
    at::parallel_for(0, tokens, row_grain(heads * dim), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* c = cos_base + t * table_stride;
        const scalar_t* s = sin_base + t * table_stride;
        for (int64_t h = 0; h < heads; ++h) rotate_half_row(base + t * stride + h * dim, c, s, half);
      }
    });
  });
}

void check_cache(const at::Tensor& cache, const char* name) {
  TORCH_CHECK(cache.dim() == 4 && cache.is_contiguous(), name,
              " must be a dense [num_blocks, block_size, num_kv_heads, head_dim] tensor");
}

// One row per token into the slot slot_mapping names; slot -1 skips the token (padding).
// key and value are converted to the caches' dtype first where it differs.
void write_kv_cache(const at::Tensor& key_in, const at::Tensor& value_in, at::Tensor& k_cache, at::Tensor& v_cache,
                    const at::Tensor& slot_mapping) {
  check_cache(k_cache, "k_cache");
  check_cache(v_cache, "v_cache");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache must have one shape");
  const at::Tensor key = key_in.to(k_cache.scalar_type());
  const at::Tensor value = value_in.to(v_cache.scalar_type());
  check_rows(key, "key", 3);
  check_rows(value, "value", 3);
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() &&
                  slot_mapping.numel() == key.size(0),
              "slot_mapping must be dense int64 with one slot per token");
  const int64_t row = key.size(1) * key.size(2);
  TORCH_CHECK(k_cache.size(2) * k_cache.size(3) == row && value.size(1) * value.size(2) == row,
              "key/value rows do not match the cache's heads and head_dim");
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t bytes = row * key.element_size();
  const char* k_src = static_cast<const char*>(key.data_ptr());
  const char* v_src = static_cast<const char*>(value.data_ptr());
  char* k_dst = static_cast<char*>(k_cache.data_ptr());
  char* v_dst = static_cast<char*>(v_cache.data_ptr());
  const int64_t k_stride = key.stride(0) * key.element_size(), v_stride = value.stride(0) * value.element_size();
  // Every slot is checked before any is written: a refused call leaves the caches as they were.
  for (int64_t t = 0; t < key.size(0); ++t) {
    TORCH_CHECK(slots[t] < num_slots, "slot ", slots[t], " is outside the cache (", num_slots, " slots)");
  }
  for (int64_t t = 0; t < key.size(0); ++t) {
    const int64_t slot = slots[t];
    if (slot < 0) continue;
    std::memcpy(k_dst + slot * bytes, k_src + t * k_stride, bytes);
    std::memcpy(v_dst + slot * bytes, v_src + t * v_stride, bytes);
  }
}

// One query token per sequence, reading keys and values where the block table says they are
// (no gather copy). A work item is one (sequence, KV head): the query heads that share that KV
// head are scored together, so each cached row is loaded once for all of them.
template <typename T>
void decode_attention_kernel(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& block_tables, const at::Tensor& context_lens, float scale,
                             at::Tensor& out) {
  const int64_t num_seqs = query.size(0), num_heads = query.size(1), dim = query.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  const int64_t group = num_heads / kv_heads;
  const int64_t slot_stride = kv_heads * dim, block_stride = block_size * slot_stride;
  const int64_t table_stride = block_tables.stride(0), max_blocks = block_tables.size(1);
  const int64_t q_stride = query.stride(0);
  const T* q_base = query.data_ptr<T>();
  const T* k_base = k_cache.data_ptr<T>();
  const T* v_base = v_cache.data_ptr<T>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  T* o_base = out.data_ptr<T>();
  const int64_t num_blocks = k_cache.size(0);
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t used = (static_cast<int64_t>(lens[s]) + block_size - 1) / block_size;
    TORCH_CHECK(lens[s] >= 0 && used <= max_blocks, "context_lens[", s, "] = ", lens[s],
                " needs more blocks than block_tables holds");
    for (int64_t b = 0; b < used; ++b) {
      const int32_t block = tables[s * table_stride + b];
      TORCH_CHECK(block >= 0 && block < num_blocks, "block_tables[", s, "][", b, "] = ", block,
                  " is outside the cache (", num_blocks, " blocks)");
    }
  }
  at::parallel_for(0, num_seqs * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q(group * dim), acc(group * dim), scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / kv_heads, h = item % kv_heads, len = lens[s];
      T* o = o_base + (s * num_heads + h * group) * dim;
      if (len == 0) {  // a padding row attends to nothing: zeros
        for (int64_t i = 0; i < group * dim; ++i) store(o, i, 0.0f);
        continue;
      }
      const T* q_src = q_base + s * q_stride + h * group * dim;
      for (int64_t i = 0; i < group * dim; ++i) q[i] = load(q_src, i) * scale;
      scores.resize(group * len);
      const int32_t* table = tables + s * table_stride;
      for (int64_t p = 0; p < len; ++p) {
        const T* k = k_base + table[p / block_size] * block_stride + (p % block_size) * slot_stride + h * dim;
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = q.data() + g * dim;
          float dot = 0.0f;
          for (int64_t d = 0; d < dim; ++d) dot += qg[d] * load(k, d);
          scores[g * len + p] = dot;
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* sc = scores.data() + g * len;
        float max_score = sc[0];
        for (int64_t p = 1; p < len; ++p) max_score = std::max(max_score, sc[p]);
        float total = 0.0f;
        for (int64_t p = 0; p < len; ++p) {
          sc[p] = fast_exp(sc[p] - max_score);
          total += sc[p];
        }
        const float inv_total = 1.0f / total;
        for (int64_t p = 0; p < len; ++p) sc[p] *= inv_total;
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t p = 0; p < len; ++p) {
        const T* v = v_base + table[p / block_size] * block_stride + (p % block_size) * slot_stride + h * dim;
        for (int64_t g = 0; g < group; ++g) {
          const float weight = scores[g * len + p];
          float* a = acc.data() + g * dim;
          for (int64_t d = 0; d < dim; ++d) a[d] += weight * load(v, d);
        }
      }
      for (int64_t i = 0; i < group * dim; ++i) store(o, i, acc[i]);
    }
  });
}

at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  check_rows(query, "query", 3);
  check_cache(k_cache, "k_cache");
  check_cache(v_cache, "v_cache");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache must have one shape");
  TORCH_CHECK(query.scalar_type() == k_cache.scalar_type() && v_cache.scalar_type() == k_cache.scalar_type(),
              "query and the caches must share a dtype");
  TORCH_CHECK(query.size(2) == k_cache.size(3), "query's head_dim does not match the cache's");
  TORCH_CHECK(query.size(1) % k_cache.size(2) == 0, "query heads must be a multiple of the KV heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 && block_tables.stride(1) == 1 &&
                  block_tables.size(0) == query.size(0),
              "block_tables must be int32 [num_seqs, max_blocks], dense in its rows");
  TORCH_CHECK(context_lens.scalar_type() == at::kInt && context_lens.is_contiguous() &&
                  context_lens.numel() == query.size(0),
              "context_lens must be dense int32 [num_seqs]");
  auto out = at::empty(query.sizes(), query.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "decode_attention", [&] {
    decode_attention_kernel<scalar_t>(query, k_cache, v_cache, block_tables, context_lens,
                                      static_cast<float>(scale), out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(bento_llm, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
  m.def("add_rms_norm(Tensor(a!) residual, Tensor x, Tensor weight, float eps) -> Tensor", &add_rms_norm);
  m.def("silu_mul(Tensor gate_up) -> Tensor", &silu_mul);
  m.def("rotary_embedding_(Tensor(a!) qk, Tensor cos, Tensor sin) -> ()", &rotary_embedding_);
  m.def("write_kv_cache(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()",
        &write_kv_cache);
  m.def("decode_attention(Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
        "float scale) -> Tensor",
        &decode_attention);
}
