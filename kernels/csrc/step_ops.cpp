// One attention layer's work after its fused q/k/v projection, as one op
// (torch.ops.bento_llm.qkv_attention; the same name and arguments as kernels/reference.py's).
//
// Why: at decode batch sizes a layer's attention was five Python-level steps (slice and view the
// fused projection into q/k and v, split q from k, rotate, write the cache, attend), each a torch
// op call from Python at 2-13 us apiece on this machine, more than the rotation and the cache write
// themselves cost. Here the views are C++ views and the kernels are called through the
// dispatcher (well under a microsecond each); the kernels are the registered ops of cpu_ops.cpp,
// so there is one implementation of each (rotation, cache write incl. 8-bit, attention).

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>

namespace {

template <typename Signature>
c10::TypedOperatorHandle<Signature> registered(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using RotarySig = void(at::Tensor&, const at::Tensor&, const at::Tensor&);
using WriteSig = void(const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&);
using DecodeSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const at::Tensor&, double, std::optional<int64_t>, std::optional<double>);
using PagedSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, double, std::optional<int64_t>,
                            std::optional<double>);

// qkv [tokens, (num_heads + 2 * num_kv_heads) * head_dim] (rows may be strided, dense in the last
// dimension): q and k heads are rotated in place (cos/sin [tokens, 1, head_dim]; none: no rotary),
// k and v written to the paged cache at slot_mapping, then q attends over the cache: decode
// attention when cu_query_lens is None (one query token per sequence), else paged attention.
// Returns the attention output [tokens, num_heads * head_dim].
at::Tensor qkv_attention(at::Tensor& qkv, const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                         at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slot_mapping,
                         const at::Tensor& block_tables, const at::Tensor& context_lens,
                         const std::optional<at::Tensor>& cu_query_lens, int64_t num_heads, double scale,
                         std::optional<int64_t> sliding_window, std::optional<double> soft_cap) {
  static const auto rotary = registered<RotarySig>("bento_llm::rotary_embedding_");
  static const auto write = registered<WriteSig>("bento_llm::write_kv_cache");
  static const auto decode = registered<DecodeSig>("bento_llm::decode_attention");
  static const auto paged = registered<PagedSig>("bento_llm::paged_attention");
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1, "qkv must be [tokens, width], dense in its last dimension");
  TORCH_CHECK(k_cache.dim() == 4, "k_cache must be [num_blocks, block_size, num_kv_heads, head_dim]");
  TORCH_CHECK(cos.has_value() == sin.has_value(), "cos and sin must be given together");
  const int64_t tokens = qkv.size(0), kv_heads = k_cache.size(2), heads = num_heads + 2 * kv_heads;
  TORCH_CHECK(num_heads > 0 && qkv.size(1) % heads == 0, "qkv's width ", qkv.size(1), " is not (num_heads ",
              num_heads, " + 2 * num_kv_heads ", kv_heads, ") * head_dim");
  const int64_t dim = qkv.size(1) / heads;
  // Each view in one as_strided call: narrow + view cost three or four dispatcher calls apiece
  // (narrow -> slice -> as_strided, then view), ten more per layer than these four.
  const int64_t row = qkv.stride(0), offset = qkv.storage_offset();
  const auto heads_view = [&](int64_t first_head, int64_t count) {
    return qkv.as_strided({tokens, count, dim}, {row, dim, 1}, offset + first_head * dim);
  };
  at::Tensor qk = heads_view(0, num_heads + kv_heads);
  if (cos.has_value()) rotary.call(qk, *cos, *sin);
  write.call(heads_view(num_heads, kv_heads), heads_view(num_heads + kv_heads, kv_heads), k_cache, v_cache,
             slot_mapping);
  const at::Tensor q = heads_view(0, num_heads);
  const at::Tensor out =
      cu_query_lens.has_value()
          ? paged.call(q, k_cache, v_cache, block_tables, context_lens, *cu_query_lens, scale, sliding_window,
                       soft_cap)
          : decode.call(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window, soft_cap);
  return out.view({tokens, num_heads * dim});
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bento_llm, m) {
  m.def(
      "qkv_attention(Tensor(a!) qkv, Tensor? cos, Tensor? sin, Tensor(b!) k_cache, Tensor(c!) v_cache, "
      "Tensor slot_mapping, Tensor block_tables, Tensor context_lens, Tensor? cu_query_lens, int num_heads, "
      "float scale, int? sliding_window=None, float? soft_cap=None) -> Tensor",
      &qkv_attention);
}
