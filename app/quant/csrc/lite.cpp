// Lanner's standalone library: the decoder of an int8/int4 Llama or Falcon model without libtorch, for the
// torch-free worker (app/lite).  Built by app/lite/native.py with -DLANNER_STANDALONE (OpenMP threads),
// called through ctypes on numpy buffers.  The matmuls and the per-layer ops are the torch build's own
// (woq_core.h, decoder_core.h); this file adds what ATen gave the torch build: LayerNorm, the activations,
// residual adds, activation buffers, and the loop over layers of decoder_stack.cpp.
//
// C API (every int-returning function returns 0, or -1 with lanner_last_error() saying why):
//   lanner_isa() -> the dot-product code compiled in (avx512-vnni | avx-vnni | avx2 | scalar)
//   lanner_int8_mm / lanner_int4_mm: y [M, n] = x [M, K] times a tiled weight (woq_core.h's layouts)
//   lanner_rms_norm / lanner_layer_norm: y [T, H] = norm(x [T, H]) (w, and LayerNorm's optional b)
//   lanner_stack_new(ints, n_ints, ptrs, n_ptrs, eps) -> handle (NULL on error): references to every
//       layer's weights and KV caches, no copies; the encoding is app/lite/model.py's (`stack_encoding`):
//       header ints (norm, layout, act, heads, KV heads, head dim, gated MLP's intermediate size, layers,
//       hidden size, KV slots, KV max length, KV dtype 0 fp32 / 1 bf16), then per layer 4 Linears x
//       (kind 1 int8 / 2 int4, group, out_features) and 22 pointers: 4 Linears x (weight, scales, zeros,
//       bias), norm 1 weight and bias, norm 2 weight and bias, K cache, V cache (NULL: none).
//   lanner_stack_forward(handle, x [T, H], T, cos [T, d], sin [T, d], slots [T], positions [T]): x in
//       place through every layer.  Row t is the token at positions[t] of KV slot slots[t]; its keys and
//       values are stored there, and it attends positions 0..positions[t] of its slot (causal attention
//       by position: a prompt chunk's rows and single decode rows alike, no masks).
//   lanner_stack_free(handle)
#include "decoder_core.h"
#include "woq_core.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

thread_local std::string last_error;

enum Kind : int64_t { kInt8 = 1, kInt4 = 2 };
enum Norm : int64_t { kRmsNorm = 0, kLayerNorm = 1 };
enum Layout : int64_t { kSequential = 0, kParallel = 1, kParallelTwoNorms = 2 };  // app/models/falcon.py's
enum Act : int64_t { kSiluGated = 0, kGelu = 1, kGeluTanh = 2, kRelu = 3 };

constexpr int64_t kHeaderInts = 12;
constexpr int64_t kIntsPerLayer = 12;
constexpr int64_t kPtrsPerLayer = 22;

void check(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(what);
}

// Run `f`, turning an exception into -1 and lanner_last_error's message.
template <typename F>
int guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
  } catch (...) {
    last_error = "unknown error";
  }
  return -1;
}

void layer_norm_raw(const float* x, int64_t T, int64_t H, const float* w, const float* b, float eps, float* y) {
  lanner::parallel_for(0, T, kRowsPerTask, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* a = x + r * H;
      float* o = y + r * H;
      double sum = 0.0, sq = 0.0;
      for (int64_t k = 0; k < H; ++k) sum += a[k];
      const float mean = static_cast<float>(sum / static_cast<double>(H));
      for (int64_t k = 0; k < H; ++k) sq += static_cast<double>((a[k] - mean) * (a[k] - mean));
      const float inv = 1.f / std::sqrt(static_cast<float>(sq / static_cast<double>(H)) + eps);
      for (int64_t k = 0; k < H; ++k) o[k] = (a[k] - mean) * inv * w[k] + (b != nullptr ? b[k] : 0.f);
    }
  });
}

struct Linear {
  int64_t kind = 0, group = 0, n = 0, k = 0;
  const void* w = nullptr;
  const void* s = nullptr;
  const uint8_t* z = nullptr;
  const float* bias = nullptr;

  int64_t tiles() const { return (n + 15) / 16; }

  // y [T, n] = x [T, k] W^T (+ bias)
  void operator()(const float* x, int64_t T, float* y) const {
    if (kind == kInt8)
      int8_mm_raw(x, T, k, static_cast<const int8_t*>(w), static_cast<const float*>(s), tiles(), n, y);
    else
      int4_mm_raw(x, T, k, static_cast<const uint8_t*>(w), static_cast<const uint8_t*>(s), z, tiles(), group, n, y);
    if (bias != nullptr)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t j = 0; j < n; ++j) y[t * n + j] += bias[j];
  }
};

struct Layer {
  Linear qkv, o, up, down;  // up: gate|up fused for kSiluGated
  const float *norm1_w, *norm1_b, *norm2_w, *norm2_b;
  void *k, *v;
};

struct Stack {
  int64_t norm, layout, act, nh, nkv, d, inter, hidden, slots, max_len, kv_bf16;
  float eps;
  std::vector<Layer> layers;

  void norm_(const float* x, int64_t T, const float* w, const float* b, float* y) const {
    if (norm == kRmsNorm)
      rms_norm_raw(x, T, hidden, w, eps, y);
    else
      layer_norm_raw(x, T, hidden, w, b, eps, y);
  }

  // attn [T, nh d] for rows whose q, k, v are in qkv [T, (nh + 2 nkv) d] (keys and values stored first)
  void attention(const Layer& L, float* qkv, int64_t T, const float* cos, const float* sin, const int64_t* sl,
                 const int64_t* pos, float* out) const {
    const float sc = 1.f / std::sqrt(static_cast<float>(d));
    if (kv_bf16) {
      rope_store_rows(qkv, cos, sin, static_cast<bf16*>(L.k), static_cast<bf16*>(L.v), sl, pos, T, max_len, d, nh, nkv);
      attend_rows(qkv, (nh + 2 * nkv) * d, static_cast<const bf16*>(L.k), static_cast<const bf16*>(L.v), out, sl,
                  pos, T, nh, nkv, max_len, d, sc);
    } else {
      rope_store_rows(qkv, cos, sin, static_cast<float*>(L.k), static_cast<float*>(L.v), sl, pos, T, max_len, d, nh,
                      nkv);
      attend_rows(qkv, (nh + 2 * nkv) * d, static_cast<const float*>(L.k), static_cast<const float*>(L.v), out, sl,
                  pos, T, nh, nkv, max_len, d, sc);
    }
  }

  // a [T, down.k] = act(up [T, up.n]).  Branch-free formulas over decoder_core.h's exp_nonpositive (relative
  // error < 3e-7), so the compiler vectorizes them: with libm's scalar expf / erff / tanhf the activations took
  // ~15% of a TinyLlama int4 prompt.
  //   silu(x) = x sigmoid(x), sigmoid from e = exp(-|x|): 1 / (1 + e) for x >= 0, e / (1 + e) below;
  //   tanh(y) = sign(y) (1 - e) / (1 + e) with e = exp(-2|y|);
  //   erf(z) = sign(z) (1 - poly(t) exp(-z^2)), t = 1 / (1 + p|z|) (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7).
  static float silu(float x) {
    const float e = exp_nonpositive(-std::fabs(x));
    return x * (x >= 0.f ? 1.f : e) / (1.f + e);
  }
  static float gelu_tanh(float x) {
    const float y = 0.79788456080286536f * (x + 0.044715f * x * x * x);
    const float e = exp_nonpositive(-2.f * std::fabs(y));
    const float t = std::copysign((1.f - e) / (1.f + e), y);
    return 0.5f * x * (1.f + t);
  }
  static float gelu_erf(float x) {
    const float z = std::fabs(x) * 0.70710678118654752f;
    const float t = 1.f / (1.f + 0.3275911f * z);
    const float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f +
                                                                                      t * 1.061405429f))));
    const float erf_abs = 1.f - poly * exp_nonpositive(-z * z);
    return 0.5f * x * (1.f + std::copysign(erf_abs, x));
  }

  void activation(const float* up, int64_t T, int64_t width, float* a) const {
    lanner::parallel_for(0, T, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const float* u = up + r * width;
        if (act == kSiluGated) {
          float* o = a + r * inter;
#pragma omp simd
          for (int64_t j = 0; j < inter; ++j) o[j] = silu(u[j]) * u[inter + j];
          continue;
        }
        float* o = a + r * width;
        if (act == kGelu) {
#pragma omp simd
          for (int64_t j = 0; j < width; ++j) o[j] = gelu_erf(u[j]);
        } else if (act == kGeluTanh) {
#pragma omp simd
          for (int64_t j = 0; j < width; ++j) o[j] = gelu_tanh(u[j]);
        } else {
          for (int64_t j = 0; j < width; ++j) o[j] = u[j] > 0.f || std::isnan(u[j]) ? u[j] : 0.f;  // NaN stays
        }
      }
    });
  }

  void forward(float* x, int64_t T, const float* cos, const float* sin, const int64_t* sl, const int64_t* pos) const {
    for (int64_t t = 0; t < T; ++t)  // checked before anything is written
      check(sl[t] >= 0 && sl[t] < slots && pos[t] >= 0 && pos[t] < max_len,
            "lanner_stack_forward: slot or position out of range");
    const int64_t H = hidden;
    const Layer& first = layers.front();
    // every buffer is written before it is read: left uninitialized (zeroing them cost a memset a step)
    const auto h = scratch<float>(T * H), h2 = scratch<float>(T * H), qkv = scratch<float>(T * first.qkv.n),
               attn = scratch<float>(T * nh * d), o = scratch<float>(T * H), up = scratch<float>(T * first.up.n),
               a = scratch<float>(T * first.down.k), down = scratch<float>(T * H);
    for (const Layer& L : layers) {
      norm_(x, T, L.norm1_w, L.norm1_b, h.get());
      L.qkv(h.get(), T, qkv.get());
      attention(L, qkv.get(), T, cos, sin, sl, pos, attn.get());
      L.o(attn.get(), T, o.get());
      if (layout == kSequential) {
        for (int64_t i = 0; i < T * H; ++i) x[i] += o[i];
        norm_(x, T, L.norm2_w, L.norm2_b, h2.get());
        L.up(h2.get(), T, up.get());
        activation(up.get(), T, L.up.n, a.get());
        L.down(a.get(), T, down.get());
        for (int64_t i = 0; i < T * H; ++i) x[i] += down[i];
      } else {
        const float* h_mlp = h.get();
        if (layout == kParallelTwoNorms) norm_(x, T, L.norm2_w, L.norm2_b, h2.get()), h_mlp = h2.get();
        L.up(h_mlp, T, up.get());
        activation(up.get(), T, L.up.n, a.get());
        L.down(a.get(), T, down.get());
        for (int64_t i = 0; i < T * H; ++i) x[i] += down[i] + o[i];
      }
    }
  }
};

Stack* make_stack(const int64_t* ints, int64_t n_ints, const void* const* ptrs, int64_t n_ptrs, double eps) {
  check(n_ints >= kHeaderInts, "lanner_stack_new: ints too short");
  auto s = new Stack();
  try {
    s->norm = ints[0], s->layout = ints[1], s->act = ints[2], s->nh = ints[3], s->nkv = ints[4], s->d = ints[5];
    s->inter = ints[6];
    const int64_t L = ints[7];
    s->hidden = ints[8], s->slots = ints[9], s->max_len = ints[10], s->kv_bf16 = ints[11];
    s->eps = static_cast<float>(eps);
    check(L > 0 && n_ints == kHeaderInts + L * kIntsPerLayer && n_ptrs == L * kPtrsPerLayer,
          "lanner_stack_new: expected 12 ints and 22 pointers per layer");
    check(s->norm >= kRmsNorm && s->norm <= kLayerNorm && s->layout >= kSequential &&
              s->layout <= kParallelTwoNorms && s->act >= kSiluGated && s->act <= kRelu && s->nh > 0 && s->nkv > 0 &&
              s->nh % s->nkv == 0 && s->d > 0 && s->d % 2 == 0 && s->d <= 1024 && s->hidden > 0 && s->slots > 0 &&
              s->max_len > 0 && (s->kv_bf16 == 0 || s->kv_bf16 == 1) && (s->act != kSiluGated || s->inter > 0),
          "lanner_stack_new: bad configuration");
    for (int64_t i = 0; i < L; ++i) {
      const int64_t* q = ints + kHeaderInts + i * kIntsPerLayer;
      const void* const* p = ptrs + i * kPtrsPerLayer;
      Layer layer{};
      Linear* lin[4] = {&layer.qkv, &layer.o, &layer.up, &layer.down};
      for (int j = 0; j < 4; ++j) {
        Linear& l = *lin[j];
        l.kind = q[3 * j], l.group = q[3 * j + 1], l.n = q[3 * j + 2];
        l.w = p[4 * j], l.s = p[4 * j + 1], l.z = static_cast<const uint8_t*>(p[4 * j + 2]);
        l.bias = static_cast<const float*>(p[4 * j + 3]);
        check((l.kind == kInt8 || (l.kind == kInt4 && l.group > 0 && l.group % 32 == 0 && l.z != nullptr)) &&
                  l.n > 0 && l.w != nullptr && l.s != nullptr,
              "lanner_stack_new: bad Linear");
      }
      const int64_t width = (s->nh + 2 * s->nkv) * s->d;
      layer.qkv.k = s->hidden, layer.o.k = s->nh * s->d, layer.up.k = s->hidden;
      layer.down.k = s->act == kSiluGated ? s->inter : layer.up.n;
      check(layer.qkv.n == width && layer.o.n == s->hidden && layer.down.n == s->hidden &&
                (s->act != kSiluGated || layer.up.n == 2 * s->inter),
            "lanner_stack_new: Linear shapes do not match the configuration");
      for (const Linear* l : lin) check(l->kind == kInt8 || l->k % l->group == 0, "lanner_stack_new: bad int4 group");
      // forward's activation buffers are sized by the first layer
      check(s->layers.empty() || layer.up.n == s->layers.front().up.n, "lanner_stack_new: layers of different widths");
      layer.norm1_w = static_cast<const float*>(p[16]), layer.norm1_b = static_cast<const float*>(p[17]);
      layer.norm2_w = static_cast<const float*>(p[18]), layer.norm2_b = static_cast<const float*>(p[19]);
      layer.k = const_cast<void*>(p[20]), layer.v = const_cast<void*>(p[21]);
      check(layer.norm1_w != nullptr && layer.k != nullptr && layer.v != nullptr &&
                (s->layout == kParallel || layer.norm2_w != nullptr),
            "lanner_stack_new: missing norm weight or KV cache");
      s->layers.push_back(layer);
    }
  } catch (...) {
    delete s;
    throw;
  }
  return s;
}

}  // namespace

extern "C" {

const char* lanner_isa() { return isa_name(); }

const char* lanner_last_error() { return last_error.c_str(); }

int lanner_int8_mm(const float* x, int64_t M, int64_t K, const int8_t* wt, const float* scales, int64_t n,
                   float* y) {
  return guarded([&] { int8_mm_raw(x, M, K, wt, scales, (n + 15) / 16, n, y); });
}

int lanner_int4_mm(const float* x, int64_t M, int64_t K, const uint8_t* nib, const uint8_t* scales,
                   const uint8_t* zeros, int64_t group, int64_t n, float* y) {
  return guarded([&] {
    check(group > 0 && group % 32 == 0 && K % group == 0, "lanner_int4_mm: bad group size");
    int4_mm_raw(x, M, K, nib, scales, zeros, (n + 15) / 16, group, n, y);
  });
}

int lanner_rms_norm(const float* x, int64_t T, int64_t H, const float* w, float eps, float* y) {
  return guarded([&] { rms_norm_raw(x, T, H, w, eps, y); });
}

int lanner_layer_norm(const float* x, int64_t T, int64_t H, const float* w, const float* b, float eps, float* y) {
  return guarded([&] { layer_norm_raw(x, T, H, w, b, eps, y); });
}

void* lanner_stack_new(const int64_t* ints, int64_t n_ints, const void* const* ptrs, int64_t n_ptrs, double eps) {
  Stack* s = nullptr;
  guarded([&] { s = make_stack(ints, n_ints, ptrs, n_ptrs, eps); });
  return s;
}

void lanner_stack_free(void* stack) { delete static_cast<Stack*>(stack); }

int lanner_stack_forward(void* stack, float* x, int64_t T, const float* cos, const float* sin, const int64_t* slots,
                         const int64_t* positions) {
  return guarded([&] {
    check(stack != nullptr && T > 0, "lanner_stack_forward: no stack or no rows");
    static_cast<const Stack*>(stack)->forward(x, T, cos, sin, slots, positions);
  });
}

}  // extern "C"
