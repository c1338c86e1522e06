// Sampling kernels: temperature, top-k, top-p and min-p filters and the inverse-transform draw of
// engine/sampler.py, one row per task, with the names and arguments of kernels/reference.py's
// filter_rows and sample_rows (the plain-torch oracle; tests/test_sampler_ops.py compares them).
//
// Why: the torch path needs each row's 256 largest logits (torch.topk: ~27 ms for 64 rows of
// 49152 on 2 vCPUs) and half a dozen full passes over [rows, vocab] tensors besides; a batch of 64
// top_p rows took 53-84 ms, as long as the model's forward. Here a row is read from cache a few
// times: its exponentials once, then per-threshold counts and masses locate the few candidates the
// filters can keep (those within some nats of the row's maximum), and only they are sorted.
//
// Semantics (those of reference.py): x = logits / temperature. Rows are ordered by x descending,
// equal values by index ascending. top_k keeps the first top_k of that order; top_p keeps its
// shortest prefix whose mass, renormalized over the top-k set (the whole row without top_k),
// reaches top_p (top_p >= 1: no filter); min_p then drops tokens whose probability is below
// min_p times the largest. The draw: the first token, in vocabulary order, whose cumulative mass
// over the kept tokens passes uniform * their total. Masses are sums of float exponentials in
// double here and float softmax values in the reference: the two agree except where a
// cumulative mass lands within rounding of top_p or of the drawn target.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "float_rows.h"
#include "silu_lanes.h"
#include "thread_pool.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// One row's filter parameters; the neutral values filter nothing.
struct Filter {
  float temperature = 1.0f;
  int64_t top_k = std::numeric_limits<int64_t>::max();
  float top_p = 1.0f;
  float min_p = 0.0f;
};

// What a row keeps: x_i > cut_value, or x_i == cut_value at an index <= cut_index (a prefix of
// the order), and e_i = exp(x_i - max) >= min_e (min-p relative to the largest probability).
struct Kept {
  float cut_value = -kInf;
  int64_t cut_index = std::numeric_limits<int64_t>::max();
  float min_e = 0.0f;
  int64_t count = -1;  // with a cut: how many tokens it keeps (before min-p); -1: no cut
};

// A thread's working rows, reused across rows and calls.
struct Scratch {
  std::vector<float> x, e;
  std::vector<int32_t> candidates;
  std::vector<float> block_mass;
  double row_mass = 0.0;
};

Scratch& scratch(int64_t n) {
  thread_local Scratch s;
  if (static_cast<int64_t>(s.e.size()) < n) {
    s.x.resize(n);
    s.e.resize(n);
  }
  return s;
}

// e[i] = exp(x[i] - max): fast_exp (0 below e^-80, so -inf is 0; exactly 1 at the maximum), on
// 16 lanes where the build has AVX-512 (the compiler leaves fast_exp's loop scalar here).
void exp_row(float* e, const float* x, float max, int64_t n) {
  int64_t i = 0;
#ifdef __AVX512F__
  const __m512 shift = _mm512_set1_ps(max), low = _mm512_set1_ps(-80.0f);
  for (; i + 16 <= n; i += 16) {
    const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(x + i), shift);
    _mm512_storeu_ps(e + i, _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(d, low, _CMP_GE_OQ), fast_exp_lanes(d)));
  }
#endif
  for (; i < n; ++i) e[i] = fast_exp(x[i] - max);
}

// Elements per block of a row's mass (s.block_mass): the draw finds the target's block first.
constexpr int64_t kBlock = 256;

// x (logits / temperature, in s.x unless the temperature is 1) and e = exp(x - max) in s.e, its
// block masses and s.row_mass their sum; returns x, and max(x) in max_x: not finite where the
// row has no finite value or a NaN (then nothing else is computed).
const float* scale_and_exp(const float* logits, int64_t n, float temperature, Scratch& s, float& max_x) {
  const float* x = logits;
  if (temperature != 1.0f) {
    float* scaled = s.x.data();
    for (int64_t i = 0; i < n; ++i) scaled[i] = logits[i] / temperature;  // as torch's division rounds
    x = scaled;
  }
  // Per-lane maxima (and NaN flags) so the loop vectorizes: one running maximum is a chain of
  // dependent scalar max instructions, 4 cycles an element.
  constexpr int64_t kLanes = 32;
  float lane_max[kLanes];
  int32_t lane_nan[kLanes] = {};
  std::fill(lane_max, lane_max + kLanes, -kInf);
  const int64_t full = n - n % kLanes;
  for (int64_t j = 0; j < full; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const float v = x[j + l];
      lane_max[l] = v > lane_max[l] ? v : lane_max[l];
      lane_nan[l] |= v != v;
    }
  }
  for (int64_t l = 0; l < n - full; ++l) {
    const float v = x[full + l];
    lane_max[l] = v > lane_max[l] ? v : lane_max[l];
    lane_nan[l] |= v != v;
  }
  float best = -kInf;
  int32_t nan = 0;
  for (int64_t l = 0; l < kLanes; ++l) best = std::max(best, lane_max[l]), nan |= lane_nan[l];
  max_x = nan ? std::numeric_limits<float>::quiet_NaN() : best;
  if (!(best > -kInf && best < kInf) || nan) return x;
  float* e = s.e.data();
  exp_row(e, x, best, n);
  // Two loops, not one: the exponentials vectorize only in a loop of their own.
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  s.block_mass.resize(blocks);
  double total = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    const float* block = e + b * kBlock;
    float m = 0.0f;
    for (int64_t i = 0, end = std::min(kBlock, n - b * kBlock); i < end; ++i) m += block[i];
    s.block_mass[b] = m;
    total += m;
  }
  s.row_mass = total;
  return x;
}

// Counts and float masses of {e >= theta[j]} for kTallies thresholds, in one vectorized pass.
constexpr int kTallies = 8;

void tally(const float* e, int64_t n, const float* theta, int64_t* count, float* mass) {
  int32_t c[kTallies] = {};
  float m[kTallies] = {};
  for (int64_t i = 0; i < n; ++i) {
    const float v = e[i];
    for (int j = 0; j < kTallies; ++j) {
      const bool in = v >= theta[j];
      c[j] += in;
      m[j] += in ? v : 0.0f;
    }
  }
  for (int j = 0; j < kTallies; ++j) count[j] = c[j], mass[j] = m[j];
}

// The largest threshold (in nats below the maximum: e >= exp(-nats)) whose candidates hold the
// top_k set (count >= top_k) or, without top_k, about top_p of the mass: a pass over a ladder of
// distances, further passes subdividing the step that crossed while it holds many tokens, or
// extending the ladder to e^-88 when no step did. Returns 0 (every token) when none does.
float candidate_threshold(const float* e, int64_t n, bool by_count, double need) {
  static constexpr float kLadder[kTallies] = {1.0f, 2.0f, 3.0f, 4.5f, 6.5f, 9.0f, 13.0f, 19.0f};
  constexpr float kFarthest = 88.0f;  // fast_exp is 0 past 80 nats
  constexpr int64_t kFewCandidates = 512;
  float nats[kTallies], theta[kTallies], mass[kTallies];
  int64_t count[kTallies];
  std::copy(kLadder, kLadder + kTallies, nats);
  float chosen = 0.0f, above = 0.0f;  // above: the rung before the crossing one (0 nats: the maximum)
  for (int round = 0; round < 4; ++round) {
    for (int j = 0; j < kTallies; ++j) theta[j] = std::exp(-nats[j]);
    tally(e, n, theta, count, mass);
    int j = 0;
    while (j < kTallies && (by_count ? static_cast<double>(count[j]) : static_cast<double>(mass[j])) < need) ++j;
    if (j == kTallies) {
      // A subdivision's last rung is the previous choice (its float mass may differ by rounding).
      if (chosen > 0.0f || nats[kTallies - 1] >= kFarthest) return chosen;
      const float lo = nats[kTallies - 1];
      for (int r = 0; r < kTallies; ++r) nats[r] = lo + (kFarthest - lo) * static_cast<float>(r + 1) / kTallies;
      continue;
    }
    chosen = theta[j];
    if (count[j] <= kFewCandidates) break;
    const float lo = j == 0 ? above : nats[j - 1], hi = nats[j];
    above = lo;
    for (int r = 0; r < kTallies; ++r) nats[r] = lo + (hi - lo) * static_cast<float>(r + 1) / kTallies;
  }
  return chosen;
}

// The cut of a row's top-k / top-p filter from its candidates {e >= theta}, sorted in the order;
// false when top_p alone is set and every candidate is inside the nucleus (it may reach past them).
bool cut_from_candidates(const float* x, const float* e, int64_t n, const Filter& f, bool top_k, bool top_p,
                         double row_mass, float theta, Scratch& s, Kept& kept) {
  std::vector<int32_t>& c = s.candidates;
  c.clear();
  // 16 comparisons to one mask, then its few set bits: a branch per element cost more than the
  // rest of the filter.
  int64_t i = 0;
#ifdef __AVX512F__
  const __m512 bound = _mm512_set1_ps(theta);
  for (; i + 16 <= n; i += 16) {
    uint32_t mask = _mm512_cmp_ps_mask(_mm512_loadu_ps(e + i), bound, _CMP_GE_OQ);
    for (; mask != 0; mask &= mask - 1) c.push_back(static_cast<int32_t>(i + __builtin_ctz(mask)));
  }
#endif
  for (; i < n; ++i) {
    if (e[i] >= theta) c.push_back(static_cast<int32_t>(i));
  }
  const auto before = [x](int32_t a, int32_t b) { return x[a] > x[b] || (x[a] == x[b] && a < b); };
  int64_t keep = top_k ? std::min<int64_t>(f.top_k, c.size()) : c.size();
  if (top_k) std::nth_element(c.begin(), c.begin() + (keep - 1), c.end(), before);  // the top-k set first
  if (top_p) std::sort(c.begin(), c.begin() + keep, before);
  if (top_p) {
    double total = row_mass;
    if (top_k) {
      total = 0.0;
      for (int64_t j = 0; j < keep; ++j) total += e[c[j]];
    }
    const double limit = static_cast<double>(f.top_p) * total;
    double mass = e[c[0]];  // the first token is always kept
    int64_t j = 1;
    for (; j < keep && mass < limit; ++j) mass += e[c[j]];
    if (j == keep && !top_k && theta > 0.0f && mass < limit) return false;
    keep = j;
  }
  kept.cut_value = x[c[keep - 1]];
  kept.cut_index = c[keep - 1];
  kept.count = keep;
  return true;
}

// The kept set of one row, given x and e; with a top-k/top-p cut, kept.count is the number of
// its tokens, the first of s.candidates (before min-p).
Kept filter_row(const float* x, const float* e, int64_t n, const Filter& f, Scratch& s) {
  Kept kept;
  kept.min_e = f.min_p;
  const bool top_k = f.top_k < n, top_p = f.top_p < 1.0f;
  if (!top_k && !top_p) return kept;
  const double row_mass = s.row_mass;
  const bool by_count = top_k;
  const double need = by_count ? static_cast<double>(f.top_k) : static_cast<double>(f.top_p) * row_mass;
  float theta = candidate_threshold(e, n, by_count, need);
  while (!cut_from_candidates(x, e, n, f, top_k, top_p, row_mass, theta, s, kept)) {
    theta = theta > 1e-30f ? theta * 0.0183f : 0.0f;  // e^-4 lower, then every token
  }
  return kept;
}

inline bool is_kept(const float* x, const float* e, int64_t i, const Kept& k) {
  return (x[i] > k.cut_value || (x[i] == k.cut_value && i <= k.cut_index)) && e[i] >= k.min_e;
}

// The first kept token in vocabulary order whose cumulative mass passes uniform * the kept total
// (the target): the target's block first, then its elements.
int64_t draw_row(const float* x, const float* e, int64_t n, float max_x, const Kept& kept, float uniform,
                 Scratch& s) {
  const int64_t blocks = static_cast<int64_t>(s.block_mass.size());
  double total = s.row_mass;  // every token's, as scale_and_exp summed them
  if (kept.count >= 0 || kept.min_e > 0.0f) {
    total = 0.0;
    for (int64_t b = 0; b < blocks; ++b) {
      float m = 0.0f;
      for (int64_t i = b * kBlock, end = std::min(n, i + kBlock); i < end; ++i) {
        m += is_kept(x, e, i, kept) ? e[i] : 0.0f;
      }
      s.block_mass[b] = m;
      total += m;
    }
  }
  const double target = static_cast<double>(uniform) * total;
  double mass = 0.0;
  int64_t b = 0;
  while (b + 1 < blocks && mass + s.block_mass[b] <= target) mass += s.block_mass[b++];
  for (int64_t i = b * kBlock; i < n; ++i) {
    if (is_kept(x, e, i, kept)) {
      mass += e[i];
      if (mass > target) return i;
    }
  }
  // The target rounded up to the total: the first token of the order (the maximum), as the reference.
  for (int64_t i = 0;; ++i) {
    if (x[i] == max_x) return i;
  }
}

// draw_row for a cut that keeps few tokens: over the first kept.count of s.candidates, without
// another pass over the row.
int64_t draw_candidates(const float* x, const float* e, float max_x, const Kept& kept, float uniform, Scratch& s) {
  std::vector<int32_t>& c = s.candidates;
  c.resize(kept.count);
  c.erase(std::remove_if(c.begin(), c.end(), [&](int32_t i) { return e[i] < kept.min_e; }), c.end());
  std::sort(c.begin(), c.end());
  double total = 0.0;
  for (const int32_t i : c) total += e[i];
  const double target = static_cast<double>(uniform) * total;
  double mass = 0.0;
  for (const int32_t i : c) {
    mass += e[i];
    if (mass > target) return i;
  }
  for (const int32_t i : c) {
    if (x[i] == max_x) return i;
  }
  return c.front();
}

void check_row_params(const at::Tensor& logits, const std::optional<at::Tensor>& t, const char* name,
                      at::ScalarType dtype) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == logits.size(0) && t->scalar_type() == dtype && t->is_contiguous(),
              name, " must be a dense ", dtype, " tensor of one value per row");
}

// The row parameters of filter_rows and sample_rows as plain arrays (null: not given).
struct RowParams {
  const float* temperature = nullptr;
  const int64_t* top_k = nullptr;
  const float* top_p = nullptr;
  const float* min_p = nullptr;

  Filter row(int64_t r) const {
    Filter f;
    if (temperature) f.temperature = temperature[r];
    if (top_k) f.top_k = top_k[r];
    if (top_p) f.top_p = top_p[r];
    if (min_p) f.min_p = min_p[r];
    return f;
  }
};

RowParams row_params(const at::Tensor& logits, const std::optional<at::Tensor>& temperature,
                     const std::optional<at::Tensor>& top_k, const std::optional<at::Tensor>& top_p,
                     const std::optional<at::Tensor>& min_p) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1 && logits.scalar_type() == at::kFloat,
              "logits must be float32 [rows, vocab], dense in its last dimension");
  TORCH_CHECK(top_k.has_value() == top_p.has_value(), "top_k and top_p must be given together");
  check_row_params(logits, temperature, "temperature", at::kFloat);
  check_row_params(logits, top_k, "top_k", at::kLong);
  check_row_params(logits, top_p, "top_p", at::kFloat);
  check_row_params(logits, min_p, "min_p", at::kFloat);
  RowParams p;
  if (temperature) p.temperature = temperature->data_ptr<float>();
  if (top_k) p.top_k = top_k->data_ptr<int64_t>(), p.top_p = top_p->data_ptr<float>();
  if (min_p) p.min_p = min_p->data_ptr<float>();
  return p;
}

// Each row's logits / temperature where its filters keep it, -inf elsewhere (reference.py's
// filter_rows; the engine draws without it: tests compare the kept sets through it).
at::Tensor filter_rows(const at::Tensor& logits, const std::optional<at::Tensor>& temperature,
                       const std::optional<at::Tensor>& top_k, const std::optional<at::Tensor>& top_p,
                       const std::optional<at::Tensor>& min_p) {
  const RowParams params = row_params(logits, temperature, top_k, top_p, min_p);
  const int64_t rows = logits.size(0), n = logits.size(1), stride = logits.stride(0);
  auto out = at::empty({rows, n}, logits.options());
  const float* src = logits.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  kernel_pool::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    Scratch& s = scratch(n);
    for (int64_t r = begin; r < end; ++r) {
      const Filter f = params.row(r);
      float max_x;
      const float* x = scale_and_exp(src + r * stride, n, f.temperature, s, max_x);
      float* o = dst + r * n;
      if (!(max_x > -kInf && max_x < kInf)) {  // nothing finite to filter (or a NaN): as it is
        std::copy(x, x + n, o);
        continue;
      }
      const Kept kept = filter_row(x, s.e.data(), n, f, s);
      for (int64_t i = 0; i < n; ++i) o[i] = is_kept(x, s.e.data(), i, kept) ? x[i] : -kInf;
    }
  });
  return out;
}

// Each row's token [rows] (int64): greedy rows their argmax, the others a draw from their filtered
// distribution at their uniform in [0, 1) (reference.py's sample_rows).
at::Tensor sample_rows(const at::Tensor& logits, const at::Tensor& uniform, const at::Tensor& greedy,
                       const std::optional<at::Tensor>& temperature, const std::optional<at::Tensor>& top_k,
                       const std::optional<at::Tensor>& top_p, const std::optional<at::Tensor>& min_p) {
  const RowParams params = row_params(logits, temperature, top_k, top_p, min_p);
  check_row_params(logits, uniform, "uniform", at::kFloat);
  check_row_params(logits, greedy, "greedy", at::kBool);
  const int64_t rows = logits.size(0), n = logits.size(1), stride = logits.stride(0);
  TORCH_CHECK(n > 0 && n <= std::numeric_limits<int32_t>::max(), "logits must have between 1 and 2^31 - 1 columns");
  auto out = at::empty({rows}, logits.options().dtype(at::kLong));
  const float* src = logits.data_ptr<float>();
  const float* u = uniform.data_ptr<float>();
  const bool* is_greedy = greedy.data_ptr<bool>();
  int64_t* dst = out.data_ptr<int64_t>();
  kernel_pool::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    Scratch& s = scratch(n);
    for (int64_t r = begin; r < end; ++r) {
      const float* row = src + r * stride;
      if (is_greedy[r]) {
        dst[r] = argmax_row(row, n);
        continue;
      }
      const Filter f = params.row(r);
      float max_x;
      const float* x = scale_and_exp(row, n, f.temperature, s, max_x);
      if (!(max_x > -kInf && max_x < kInf)) {  // no finite logit (or a NaN): nothing to draw from
        dst[r] = argmax_row(row, n);
        continue;
      }
      const Kept kept = filter_row(x, s.e.data(), n, f, s);
      dst[r] = kept.count >= 0 && kept.count * 16 <= n ? draw_candidates(x, s.e.data(), max_x, kept, u[r], s)
                                                       : draw_row(x, s.e.data(), n, max_x, kept, u[r], s);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bento_llm, m) {
  m.def("filter_rows(Tensor logits, Tensor? temperature, Tensor? top_k, Tensor? top_p, Tensor? min_p) -> Tensor",
        &filter_rows);
  m.def("sample_rows(Tensor logits, Tensor uniform, Tensor greedy, Tensor? temperature, Tensor? top_k, "
        "Tensor? top_p, Tensor? min_p) -> Tensor",
        &sample_rows);
}
