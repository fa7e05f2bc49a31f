// Every decoder layer of a step in one call: the loop over layers of app/models/llama.py and falcon.py in
// C++, for models whose Linear layers run Lanner's kernels (or fp32).
//
//   torch.classes.lanner.DecoderStack(Tensor[] tensors, int[] ints, float eps)
//       Holds (references to, no copies of) every layer's weights and its KV cache tensors; built once per
//       model and KV cache by app/models/stack.py, which documents the encoding.
//   lanner::decoder_stack(DecoderStack stack, Tensor x [T, H], Tensor cos, Tensor sin, Tensor slots,
//                         Tensor positions, int num_decode, int[] spans, Tensor?[] masks) -> Tensor [T, H]
//       x after every layer, for the flat varlen batch of app/models/kv_cache.py: the first num_decode rows
//       are single-token inputs; `spans` holds (offset, length, slot, kv_len) of each multi-token input and
//       `masks` its attention mask from KVCache.plan (None: causal from position 0).
//
// Why: a decode step of the TinyLlama-1.1B shape spent 2.5-5 ms of its ~27 ms in Python between the C++
// ops (module calls, views, ~17 small tensors a layer); this runs the very same ops in the same order, so
// its results equal the Python layers' bit for bit (tests/model/test_parity.py), minus that time.
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/layer_norm.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <ATen/ops/silu.h>
#include <ATen/record_function.h>
#include <c10/util/Exception.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include "lanner_ops.h"

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

namespace {

enum Kind : int64_t { kFp32 = 0, kInt8 = 1, kInt4 = 2 };           // how a Linear's weight is held
enum Norm : int64_t { kRmsNorm = 0, kLayerNorm = 1 };
enum Layout : int64_t { kSequential = 0, kParallel = 1, kParallelTwoNorms = 2 };  // app/models/falcon.py's
enum Act : int64_t { kSiluGated = 0, kGelu = 1, kGeluTanh = 2, kRelu = 3 };

constexpr int64_t kTensorsPerLayer = 22;  // 4 Linear x (weight, scales, zeros, bias), 4 norm tensors, K, V
constexpr int64_t kIntsPerLayer = 12;     // 4 Linear x (kind, group, out_features)
constexpr int64_t kHeaderInts = 8;        // norm, layout, act, heads, kv heads, head dim, inter, layers

// An empty tensor in the list stands for None.
at::Tensor optional(const at::Tensor& t) { return t.numel() == 0 ? at::Tensor() : t; }

struct Linear {
  int64_t kind = kFp32, group = 0, n = 0;
  at::Tensor w, s, z, bias;

  // x [T, K] contiguous fp32 -> [T, n]; as app/quant/woq.py's _TiledLinear.forward / nn.Linear
  at::Tensor operator()(const at::Tensor& x) const {
    if (kind == kFp32) return at::linear(x, w, bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt);
    // called directly, not through the dispatcher: named for torch.profiler (free when it is off)
    RECORD_FUNCTION(kind == kInt8 ? "lanner::int8_mm" : "lanner::int4_mm", std::vector<c10::IValue>());
    at::Tensor y = kind == kInt8 ? lanner::int8_mm(x, w, s, n) : lanner::int4_mm(x, w, s, z, group, n);
    if (bias.defined()) y.add_(bias);
    return y;
  }
};

struct Layer {
  Linear qkv, o, up, down;  // up: gate|up fused for kSiluGated
  at::Tensor norm1_w, norm1_b, norm2_w, norm2_b, k, v;
};

struct Span {
  int64_t offset, length, slot, kv_len;
  at::Tensor mask;  // [length, kv_len] bool, undefined when causal from position 0
};

struct DecoderStack : torch::CustomClassHolder {
  int64_t norm, layout, act, nh, nkv, d, inter;
  double eps;
  std::vector<Layer> layers;

  DecoderStack(std::vector<at::Tensor> t, std::vector<int64_t> ints, double eps_) : eps(eps_) {
    TORCH_CHECK(static_cast<int64_t>(ints.size()) >= kHeaderInts, "DecoderStack: ints too short");
    norm = ints[0], layout = ints[1], act = ints[2], nh = ints[3], nkv = ints[4], d = ints[5], inter = ints[6];
    const int64_t L = ints[7];
    TORCH_CHECK(static_cast<int64_t>(t.size()) == L * kTensorsPerLayer &&
                    static_cast<int64_t>(ints.size()) == kHeaderInts + L * kIntsPerLayer,
                "DecoderStack: expected ", kTensorsPerLayer, " tensors and ", kIntsPerLayer, " ints per layer");
    TORCH_CHECK(norm >= kRmsNorm && norm <= kLayerNorm && layout >= kSequential && layout <= kParallelTwoNorms &&
                    act >= kSiluGated && act <= kRelu && nh > 0 && nkv > 0 && nh % nkv == 0 && d > 0,
                "DecoderStack: bad configuration");
    for (int64_t i = 0; i < L; ++i) {
      const at::Tensor* p = t.data() + i * kTensorsPerLayer;
      const int64_t* q = ints.data() + kHeaderInts + i * kIntsPerLayer;
      Layer layer;
      Linear* lin[4] = {&layer.qkv, &layer.o, &layer.up, &layer.down};
      for (int j = 0; j < 4; ++j) {
        Linear& l = *lin[j];
        l.kind = q[3 * j], l.group = q[3 * j + 1], l.n = q[3 * j + 2];
        l.w = p[4 * j], l.s = optional(p[4 * j + 1]), l.z = optional(p[4 * j + 2]), l.bias = optional(p[4 * j + 3]);
        TORCH_CHECK(l.kind >= kFp32 && l.kind <= kInt4 && l.w.defined() && l.w.numel() > 0,
                    "DecoderStack: bad Linear");
      }
      layer.norm1_w = p[16], layer.norm1_b = optional(p[17]), layer.norm2_w = optional(p[18]);
      layer.norm2_b = optional(p[19]), layer.k = p[20], layer.v = p[21];
      layers.push_back(std::move(layer));
    }
  }

  at::Tensor norm_(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) const {
    if (norm == kRmsNorm) {
      RECORD_FUNCTION("lanner::rms_norm", std::vector<c10::IValue>());
      return lanner::rms_norm(x, w, eps);
    }
    return at::layer_norm(x, {x.size(1)}, w, b.defined() ? std::optional<at::Tensor>(b) : std::nullopt, eps);
  }

  // As KVCache.store + KVCache.attend + o_proj (app/models/kv_cache.py).
  at::Tensor attention(const Layer& L, const at::Tensor& h, const at::Tensor& cos, const at::Tensor& sin,
                       const at::Tensor& slots, const at::Tensor& positions, int64_t nd,
                       const std::vector<Span>& spans) const {
    const at::Tensor qkv = L.qkv(h);
    const int64_t T = qkv.size(0);
    {
      RECORD_FUNCTION("lanner::rope_store", std::vector<c10::IValue>());
      lanner::rope_store(qkv, cos, sin, L.k, L.v, slots, positions, nh, nkv);
    }
    const at::Tensor q = qkv.narrow(1, 0, nh * d).view({T, nh, d});
    std::vector<at::Tensor> outs;
    if (nd > 0) {
      RECORD_FUNCTION("lanner::decode_attention", std::vector<c10::IValue>());
      outs.push_back(lanner::decode_attention(q.narrow(0, 0, nd), L.k, L.v, slots.narrow(0, 0, nd),
                                              positions.narrow(0, 0, nd), std::pow(static_cast<double>(d), -0.5)));
    }
    for (const Span& s : spans) {
      const at::Tensor qp = q.narrow(0, s.offset, s.length).transpose(0, 1).unsqueeze(0);  // [1, nh, n, d]
      // [1, nkv, kv_len, d], fp32 (a bf16 cache is widened for the chunk: prefill is compute-bound)
      const at::Tensor kp = L.k.select(0, s.slot).narrow(1, 0, s.kv_len).unsqueeze(0).to(at::kFloat);
      const at::Tensor vp = L.v.select(0, s.slot).narrow(1, 0, s.kv_len).unsqueeze(0).to(at::kFloat);
      const at::Tensor op = at::scaled_dot_product_attention(
          qp, kp, vp, s.mask.defined() ? std::optional<at::Tensor>(s.mask) : std::nullopt, 0.0,
          !s.mask.defined(), std::nullopt, nh > nkv);
      outs.push_back(op.select(0, 0).transpose(0, 1).reshape({s.length, nh * d}));
    }
    return L.o(outs.size() == 1 ? outs[0] : at::cat(outs));
  }

  at::Tensor mlp(const Layer& L, const at::Tensor& h) const {
    const at::Tensor up = L.up(h);
    at::Tensor a;
    switch (act) {
      case kSiluGated: a = at::silu(up.narrow(1, 0, inter)) * up.narrow(1, inter, inter); break;
      case kGelu: a = at::gelu(up); break;
      case kGeluTanh: a = at::gelu(up, "tanh"); break;
      default: a = at::relu(up); break;
    }
    return L.down(a);
  }

  at::Tensor forward(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& slots,
                     const at::Tensor& positions, int64_t nd, const std::vector<int64_t>& flat_spans,
                     const std::vector<std::optional<at::Tensor>>& masks) const {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "decoder_stack: x must be fp32 [T, H]");
    TORCH_CHECK(flat_spans.size() == 4 * masks.size() && nd >= 0 && nd <= x.size(0),
                "decoder_stack: bad spans");
    std::vector<Span> spans;
    for (size_t i = 0; i < flat_spans.size(); i += 4) {
      Span s{flat_spans[i], flat_spans[i + 1], flat_spans[i + 2], flat_spans[i + 3],
             masks[i / 4].value_or(at::Tensor())};
      TORCH_CHECK(s.offset >= nd && s.length > 0 && s.offset + s.length <= x.size(0) && s.kv_len >= s.length,
                  "decoder_stack: bad span");
      spans.push_back(std::move(s));
    }
    x = x.contiguous();
    for (const Layer& L : layers) {
      const at::Tensor h = norm_(x, L.norm1_w, L.norm1_b);
      if (layout == kSequential) {
        x = x + attention(L, h, cos, sin, slots, positions, nd, spans);
        x = x + mlp(L, norm_(x, L.norm2_w, L.norm2_b));
      } else {
        const at::Tensor h_mlp = layout == kParallel ? h : norm_(x, L.norm2_w, L.norm2_b);
        const at::Tensor attn = attention(L, h, cos, sin, slots, positions, nd, spans);
        x = x + (mlp(L, h_mlp) + attn);
      }
    }
    return x;
  }
};

at::Tensor decoder_stack(const c10::intrusive_ptr<DecoderStack>& stack, const at::Tensor& x, const at::Tensor& cos,
                         const at::Tensor& sin, const at::Tensor& slots, const at::Tensor& positions,
                         int64_t num_decode, std::vector<int64_t> spans,
                         std::vector<std::optional<at::Tensor>> masks) {
  return stack->forward(x, cos, sin, slots, positions, num_decode, spans, masks);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lanner, m) {
  m.class_<DecoderStack>("DecoderStack")
      .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, double>());
  m.def("decoder_stack(__torch__.torch.classes.lanner.DecoderStack stack, Tensor x, Tensor cos, Tensor sin, "
        "Tensor slots, Tensor positions, int num_decode, int[] spans, Tensor?[] masks) -> Tensor",
        &decoder_stack);
}
