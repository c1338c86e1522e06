// One attention layer's work after its fused q/k/v projection, as one op (qkv_attention), and a whole
// Llama-shaped decoder layer at decode batch sizes as one op (decoder_layer, below): torch.ops.bento_llm's,
// with the same names and arguments as kernels/reference.py's. DecoderStack (a torch.classes.bento_llm
// custom class, cpu backend only: no reference twin) runs a step's whole stack of such layers in one call.
//
// Why: at decode batch sizes a layer's attention was five Python-level steps (slice and view the
// fused projection into q/k and v, split q from k, rotate, write the cache, attend), each a torch
// op call from Python at 2-13 us apiece on this machine, more than the rotation and the cache write
// themselves cost. Here the views are C++ views and the kernels are called through the
// dispatcher (well under a microsecond each); the kernels are the registered ops of cpu_ops.cpp,
// so there is one implementation of each (rotation, cache write incl. 8-bit, attention).

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include "layer_kernels.h"

#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

template <typename Signature>
c10::TypedOperatorHandle<Signature> registered(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// A strided view of t's storage, made without the dispatcher: an as_strided call (dispatcher,
// autograd's view bookkeeping) cost ~0.4 us apiece, as much as a batch-1 decode's rotation and
// cache write together, and qkv_attention makes five per layer. For views that only our kernels
// read or write within one op (or a fresh output): no autograd view (the ops run under
// inference_mode and never take gradients), no version counter shared with t.
at::Tensor internal_view(const at::Tensor& t, c10::IntArrayRef sizes, c10::IntArrayRef strides, int64_t offset) {
  auto impl = c10::make_intrusive<c10::TensorImpl>(c10::TensorImpl::VIEW, c10::Storage(t.storage()), t.key_set(),
                                                   t.dtype());
  impl->set_sizes_and_strides(sizes, strides, offset);
  return at::Tensor(std::move(impl));
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
  const int64_t row = qkv.stride(0), offset = qkv.storage_offset();
  const auto heads_view = [&](int64_t first_head, int64_t count) {
    return internal_view(qkv, {tokens, count, dim}, {row, dim, 1}, offset + first_head * dim);
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
  // The attention kernels return a fresh dense [tokens, heads, dim]; checked, as the view assumes it.
  TORCH_CHECK(out.is_contiguous(), "qkv_attention: the attention kernel's output must be contiguous");
  return internal_view(out, {tokens, num_heads * dim}, {num_heads * dim, 1}, out.storage_offset());
}

using QkvSig = at::Tensor(at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, at::Tensor&,
                          at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const std::optional<at::Tensor>&, int64_t, double, std::optional<int64_t>,
                          std::optional<double>);

// How project() fills one argument of a projection's op (after x, its first).
enum class ArgKind { kTensor, kOptionalTensor, kInt, kIntList, kDefault };

// A projection's op and the kind of each of its arguments after the first, read from its schema once.
struct ProjectionOp {
  c10::OperatorHandle handle;
  std::vector<ArgKind> kinds;
};

// The registered op named "namespace::name" (or "namespace::name.overload"), looked up once per
// thread, with its arguments' kinds: walking the schema's types on every call cost ~0.2 us a
// projection (four a layer).
const ProjectionOp& op_named(const std::string& name) {
  thread_local std::unordered_map<std::string, ProjectionOp> found;
  auto it = found.find(name);
  if (it == found.end()) {
    const auto dot = name.find('.');
    const std::string base = name.substr(0, dot), overload = dot == std::string::npos ? "" : name.substr(dot + 1);
    ProjectionOp op{c10::Dispatcher::singleton().findSchemaOrThrow(base.c_str(), overload.c_str()), {}};
    const auto& schema = op.handle.schema().arguments();
    for (size_t i = 1; i < schema.size(); ++i) {
      const c10::TypePtr& type = schema[i].type();
      const bool positional = !schema[i].kwarg_only();
      ArgKind kind = ArgKind::kDefault;
      if (positional && type->isSubtypeOf(*c10::OptionalType::ofTensor())) {
        kind = type->kind() == c10::TypeKind::OptionalType ? ArgKind::kOptionalTensor : ArgKind::kTensor;
      } else if (positional && type->kind() == c10::TypeKind::IntType) {
        kind = ArgKind::kInt;
      } else if (positional && type->kind() == c10::TypeKind::ListType &&
                 (type->containedType(0)->kind() == c10::TypeKind::IntType ||
                  type->containedType(0)->kind() == c10::TypeKind::SymIntType)) {
        kind = ArgKind::kIntList;
      } else {
        TORCH_CHECK(schema[i].default_value().has_value(), name, "'s argument ", schema[i].name(),
                    " is neither a tensor nor an int and has no default");
      }
      op.kinds.push_back(kind);
    }
    it = found.emplace(name, std::move(op)).first;
  }
  return it->second;
}

// Arguments of the projections, taken in order as each projection's op schema asks for them.
struct ProjectionArgs {
  const c10::List<std::optional<at::Tensor>>& tensors;
  c10::IntArrayRef ints;
  size_t next_tensor = 0, next_int = 0;
};

// One projection of x: the registered op `name` called through the dispatcher with x as its first
// argument, its positional Tensor / Tensor? arguments from args.tensors and int arguments from
// args.ints (in schema order; an int list argument takes its length, then its elements), any other
// argument, keyword-only ones included, at its default (as kernels/reference.py's projection). The op is the one Linear.project runs for
// these rows (engine/layers/linear.py's kernel_call names it), so there is one implementation of it.
at::Tensor project(const std::string& name, const at::Tensor& x, ProjectionArgs& args) {
  const ProjectionOp& op = op_named(name);
  const auto& schema = op.handle.schema().arguments();
  torch::jit::Stack stack;
  stack.reserve(schema.size());
  stack.emplace_back(x);
  for (size_t i = 1; i < schema.size(); ++i) {
    switch (op.kinds[i - 1]) {
      case ArgKind::kTensor:
      case ArgKind::kOptionalTensor: {
        TORCH_CHECK(args.next_tensor < args.tensors.size(), name, " needs more tensor arguments than given");
        const std::optional<at::Tensor> t = args.tensors.get(args.next_tensor++);
        TORCH_CHECK(t.has_value() || op.kinds[i - 1] == ArgKind::kOptionalTensor, name, "'s argument ",
                    schema[i].name(), " is a Tensor: None given");
        stack.emplace_back(t.has_value() ? c10::IValue(*t) : c10::IValue());
        break;
      }
      case ArgKind::kInt:
        TORCH_CHECK(args.next_int < args.ints.size(), name, " needs more int arguments than given");
        stack.emplace_back(args.ints[args.next_int++]);
        break;
      case ArgKind::kIntList: {  // a shape: its length, then its elements
        TORCH_CHECK(args.next_int < args.ints.size(), name, " needs more int arguments than given");
        const int64_t length = args.ints[args.next_int++];
        TORCH_CHECK(length >= 0 && args.next_int + length <= args.ints.size(), name,
                    " needs more int arguments than given");
        stack.emplace_back(std::vector<int64_t>(args.ints.begin() + args.next_int,
                                                args.ints.begin() + args.next_int + length));
        args.next_int += length;
        break;
      }
      case ArgKind::kDefault:
        stack.push_back(*schema[i].default_value());
        break;
    }
  }
  op.handle.callBoxed(&stack);
  return stack[0].toTensor();
}

// decoder_layer's intermediates that no projection returns: the norms' output (the q/k/v and
// gate/up projections' input) and the SiLU-and-multiply's (the down projection's), one tensor each,
// reused by every layer and step on the thread while rows, width and dtype stay (an at::empty cost
// ~0.3 us, as much as a batch-1 norm's arithmetic). They live only within one decoder_layer call:
// the projections read them and return tensors of their own.
struct LayerScratch {
  at::Tensor normed, activated;
  at::Tensor& take(at::Tensor& t, int64_t rows, int64_t width, const at::TensorOptions& options) {
    // Also anew when inference mode changed: an inference tensor cannot enter a graph autograd records.
    if (!t.defined() || t.size(0) != rows || t.size(1) != width || t.scalar_type() != options.dtype() ||
        t.is_inference() != c10::InferenceMode::is_enabled())
      t = at::empty({rows, width}, options);
    return t;
  }
};

// A Llama-shaped pre-norm decoder layer at decode batch sizes, as one op: the residual add and
// input norm, the fused q/k/v projection, qkv_attention, the output projection, the residual add
// and post-attention norm, the gate/up projection, SiLU-and-multiply and the down projection.
//
// Why: each of those was a Python-level call (through several Python frames for the projections),
// ~40 us per layer of a 30-layer model's ~10 ms batch-1 step on this 2-vCPU machine besides the
// kernels; here they are C++ calls. Every kernel is a registered op's (the projections and
// qkv_attention through the dispatcher; the norms and SiLU-and-multiply directly, into outputs kept
// across calls: layer_kernels.h), called in the order engine/models/llama.py's LlamaDecoderLayer
// calls them, so the result is the unfused layer's bit for bit (tests/test_decoder_layer_op.py).
//
// residual: the residual stream, updated in place (residual += x, then += the attention's output);
// x: the previous layer's output (None: the first layer, whose residual is the embedding as is).
// projections: the ops of q/k/v, o, gate/up and down (see project()). Returns the MLP's output.
at::Tensor decoder_layer(at::Tensor& residual, const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& cos,
                         const std::optional<at::Tensor>& sin, at::Tensor& k_cache, at::Tensor& v_cache,
                         const at::Tensor& slot_mapping, const at::Tensor& block_tables, const at::Tensor& context_lens,
                         const std::optional<at::Tensor>& cu_query_lens, const at::Tensor& input_norm,
                         const at::Tensor& post_norm, double eps, const std::vector<std::string>& projections,
                         const c10::List<std::optional<at::Tensor>>& projection_tensors,
                         c10::IntArrayRef projection_ints, int64_t num_heads, double scale,
                         std::optional<int64_t> sliding_window, std::optional<double> soft_cap) {
  static const auto attention = registered<QkvSig>("bento_llm::qkv_attention");
  TORCH_CHECK(projections.size() == 4, "projections must name q/k/v, o, gate/up and down's ops");
  ProjectionArgs args{projection_tensors, projection_ints};
  // The norms' and the activation's outputs, kept across calls on this thread (see LayerScratch).
  thread_local LayerScratch scratch;
  const int64_t rows = residual.size(0);
  at::Tensor& normed = scratch.take(scratch.normed, rows, residual.size(1), residual.options());
  if (x.has_value()) {
    layer_kernels::add_rms_norm_into(residual, *x, input_norm, eps, normed);
  } else {
    layer_kernels::rms_norm_into(residual, input_norm, eps, normed);
  }
  // Each projection's output is freed as soon as the next step has read it (at 64 rows gate/up is 0.4 MB).
  at::Tensor qkv = project(projections[0], normed, args);
  at::Tensor attended = attention.call(qkv, cos, sin, k_cache, v_cache, slot_mapping, block_tables, context_lens,
                                       cu_query_lens, num_heads, scale, sliding_window, soft_cap);
  qkv.reset();
  at::Tensor o = project(projections[1], attended, args);
  attended.reset();
  layer_kernels::add_rms_norm_into(residual, o, post_norm, eps, normed);
  o.reset();
  at::Tensor gate_up = project(projections[2], normed, args);
  at::Tensor& activated = scratch.take(scratch.activated, rows, gate_up.size(1) / 2, gate_up.options());
  layer_kernels::silu_mul_into(gate_up, activated);
  gate_up.reset();
  const at::Tensor out = project(projections[3], activated, args);
  TORCH_CHECK(args.next_tensor == projection_tensors.size() && args.next_int == projection_ints.size(),
              "the projections took ", args.next_tensor, " of ", projection_tensors.size(), " tensors and ",
              args.next_int, " of ", projection_ints.size(), " ints");
  return out;
}

// A decode step's whole stack of decoder layers as one call from Python: each layer's decoder_layer
// arguments that do not change between steps (a layer_op_plan, engine/models/llama.py) kept here,
// once per row count, with the model's KV caches (set_caches), and run() calls decoder_layer (the
// function above, not the op) for each layer in turn.
//
// Why: at batch 1 the per-layer Python around the op (the layer loop, nn.Module.__call__,
// LlamaDecoderLayer.forward, converting decoder_layer's 20 arguments, three of them lists) was
// about half of a ~20 us layer besides the matmuls. The caches are kept too: converting two lists
// of a tensor per layer on every run cost ~5 us of a 30-layer step.
struct DecoderStack : torch::CustomClassHolder {
  struct Layer {
    int64_t cache_index;
    at::Tensor input_norm, post_norm;
    double eps;
    std::vector<std::string> projections;
    c10::List<std::optional<at::Tensor>> projection_tensors;
    std::vector<int64_t> projection_ints;
    int64_t num_heads;
    double scale;
    std::optional<int64_t> sliding_window;
    std::optional<double> soft_cap;
  };
  std::vector<Layer> layers;
  std::vector<at::Tensor> k_caches, v_caches;

  void add_layer(int64_t cache_index, at::Tensor input_norm, at::Tensor post_norm, double eps,
                 std::vector<std::string> projections, c10::List<std::optional<at::Tensor>> projection_tensors,
                 std::vector<int64_t> projection_ints, int64_t num_heads, double scale,
                 std::optional<int64_t> sliding_window, std::optional<double> soft_cap) {
    TORCH_CHECK(cache_index >= 0, "a layer's cache index must not be negative");
    layers.push_back({cache_index, std::move(input_norm), std::move(post_norm), eps, std::move(projections),
                      std::move(projection_tensors), std::move(projection_ints), num_heads, scale, sliding_window,
                      soft_cap});
  }

  // The KV caches every run() writes and reads, each layer's at its cache index (the tensors, not
  // copies: the runner's cache).
  void set_caches(std::vector<at::Tensor> k, std::vector<at::Tensor> v) {
    k_caches = std::move(k);
    v_caches = std::move(v);
  }

  // residual: the embeddings (the first layer's residual stream), updated in place as each layer's
  // decoder_layer updates it. Returns [the last layer's output, the residual stream before it].
  std::vector<at::Tensor> run(at::Tensor residual, const std::optional<at::Tensor>& cos,
                              const std::optional<at::Tensor>& sin, const at::Tensor& slot_mapping,
                              const at::Tensor& block_tables, const at::Tensor& context_lens,
                              const std::optional<at::Tensor>& cu_query_lens) {
    TORCH_CHECK(!layers.empty(), "a DecoderStack without layers");
    std::optional<at::Tensor> x;
    for (const Layer& layer : layers) {
      TORCH_CHECK(layer.cache_index < static_cast<int64_t>(k_caches.size()) &&
                      layer.cache_index < static_cast<int64_t>(v_caches.size()),
                  "no KV cache for layer ", layer.cache_index);
      at::Tensor& k_cache = k_caches[layer.cache_index];
      at::Tensor& v_cache = v_caches[layer.cache_index];
      x = decoder_layer(residual, x, cos, sin, k_cache, v_cache, slot_mapping, block_tables, context_lens,
                        cu_query_lens, layer.input_norm, layer.post_norm, layer.eps, layer.projections,
                        layer.projection_tensors, layer.projection_ints, layer.num_heads, layer.scale,
                        layer.sliding_window, layer.soft_cap);
    }
    return {*x, residual};
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(bento_llm, m) {
  m.def(
      "qkv_attention(Tensor(a!) qkv, Tensor? cos, Tensor? sin, Tensor(b!) k_cache, Tensor(c!) v_cache, "
      "Tensor slot_mapping, Tensor block_tables, Tensor context_lens, Tensor? cu_query_lens, int num_heads, "
      "float scale, int? sliding_window=None, float? soft_cap=None) -> Tensor",
      &qkv_attention);
  m.def(
      "decoder_layer(Tensor(a!) residual, Tensor? x, Tensor? cos, Tensor? sin, Tensor(b!) k_cache, "
      "Tensor(c!) v_cache, Tensor slot_mapping, Tensor block_tables, Tensor context_lens, Tensor? cu_query_lens, "
      "Tensor input_norm, Tensor post_norm, float eps, str[] projections, Tensor?[] projection_tensors, "
      "int[] projection_ints, int num_heads, float scale, int? sliding_window=None, float? soft_cap=None) -> Tensor",
      &decoder_layer);
  m.class_<DecoderStack>("DecoderStack")
      .def(torch::init<>())
      .def("add_layer", &DecoderStack::add_layer)
      .def("set_caches", &DecoderStack::set_caches)
      .def("run", &DecoderStack::run);
}
