// Lanner's small decoder ops: the per-layer work around the matmuls of a decode step, one call each
// instead of a chain of ATen ops (built with woq_kernels.cpp into the same library, app/quant/kernels.py).
//
//   lanner::rms_norm(x fp32 [T, H], w fp32 [H], float eps) -> y fp32 [T, H]
//       y = x / sqrt(mean(x^2) + eps) * w per row (Llama's RMSNorm; ATen's CPU rms_norm is six ops).
//   lanner::rope_store(qkv fp32 [T, (nh + 2 nkv) d], cos [T, d], sin [T, d], k_cache, v_cache,
//                      slots long [T], positions long [T], int nh, int nkv) -> ()
//       Rotates the nh query heads of each row in place (RoPE, rotate-half form, `sin` with its first
//       half negated as app/models/llama.py's tables are), and writes the rotated nkv key heads and the nkv
//       value heads to k_cache / v_cache [slots, nkv, max_len, d] at (slot, :, position).  Replaces two
//       rope chains (mul, roll, addcmul each) and two index_put_.
//
// Both are plain loops that the compiler vectorizes (-O3 -march=native); rows are split across torch's
// threads only when there are many of them (a decode row is a few microseconds of work, less than a
// fork/join of the thread pool).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

namespace {

constexpr int64_t kRowsPerTask = 16;  // rows a thread takes at once: fewer rows run on the calling thread

bool is_f32(const at::Tensor& t) { return t.scalar_type() == at::kFloat && t.is_contiguous(); }

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 1 && is_f32(x) && is_f32(w) && w.size(0) == x.size(1),
              "rms_norm: x contiguous fp32 [T, H], w contiguous fp32 [H]");
  const int64_t T = x.size(0), H = x.size(1);
  at::Tensor y = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, T, kRowsPerTask, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* a = xp + r * H;
      float* o = yp + r * H;
      float part[16] = {};  // 16 partial sums: the compiler keeps them in vector registers
      int64_t i = 0;
      for (; i + 16 <= H; i += 16)
        for (int j = 0; j < 16; ++j) part[j] += a[i + j] * a[i + j];
      float ss = 0.f;
      for (int j = 0; j < 16; ++j) ss += part[j];
      for (; i < H; ++i) ss += a[i] * a[i];
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(H) + e);
      for (int64_t k = 0; k < H; ++k) o[k] = a[k] * inv * wp[k];
    }
  });
  return y;
}

// out[i] = x[i] cos[i] + x[(i + d/2) mod d] sin[i]: rotate_half(x) * sin with sin's first half negated.
inline void rotate(const float* x, const float* cs, const float* sn, float* out, int64_t d) {
  const int64_t h = d / 2;
  for (int64_t i = 0; i < h; ++i) out[i] = x[i] * cs[i] + x[i + h] * sn[i];
  for (int64_t i = h; i < d; ++i) out[i] = x[i] * cs[i] + x[i - h] * sn[i];
}

void rope_store(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& kc,
                const at::Tensor& vc, const at::Tensor& slots, const at::Tensor& positions, int64_t nh,
                int64_t nkv) {
  TORCH_CHECK(qkv.dim() == 2 && is_f32(qkv) && is_f32(cos) && is_f32(sin) && is_f32(kc) && is_f32(vc) &&
                  kc.dim() == 4 && kc.sizes() == vc.sizes(),
              "rope_store: contiguous fp32 qkv [T, (nh + 2 nkv) d], cos/sin [T, d], caches [S, nkv, L, d]");
  const int64_t T = qkv.size(0), S = kc.size(0), L = kc.size(2), d = kc.size(3);
  TORCH_CHECK(nh > 0 && nkv == kc.size(1) && d % 2 == 0 && qkv.size(1) == (nh + 2 * nkv) * d &&
                  cos.numel() == T * d && sin.numel() == T * d, "rope_store: shape mismatch");
  TORCH_CHECK(slots.scalar_type() == at::kLong && positions.scalar_type() == at::kLong &&
                  slots.is_contiguous() && positions.is_contiguous() && slots.numel() == T && positions.numel() == T,
              "rope_store: slots and positions must be contiguous int64 [T]");
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)  // checked before anything is written
    TORCH_CHECK(sp[t] >= 0 && sp[t] < S && pp[t] >= 0 && pp[t] < L, "rope_store: slot or position out of range");
  float* qp = qkv.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* snp = sin.data_ptr<float>();
  float* kp = kc.data_ptr<float>();
  float* vp = vc.data_ptr<float>();
  TORCH_CHECK(d <= 1024, "rope_store: head_dim above 1024");
  const int64_t width = (nh + 2 * nkv) * d;
  at::parallel_for(0, T, kRowsPerTask, [&](int64_t t0, int64_t t1) {
    float tmp[1024];
    for (int64_t t = t0; t < t1; ++t) {
      float* row = qp + t * width;
      const float* cs = cp + t * d;
      const float* sn = snp + t * d;
      for (int64_t h = 0; h < nh; ++h) {  // queries, in place (through tmp: rotate reads both halves)
        float* x = row + h * d;
        rotate(x, cs, sn, tmp, d);
        for (int64_t i = 0; i < d; ++i) x[i] = tmp[i];
      }
      for (int64_t h = 0; h < nkv; ++h) {  // keys rotated straight into the cache, values copied
        const int64_t at = ((sp[t] * nkv + h) * L + pp[t]) * d;
        rotate(row + (nh + h) * d, cs, sn, kp + at, d);
        const float* v = row + (nh + nkv + h) * d;
        for (int64_t i = 0; i < d; ++i) vp[at + i] = v[i];
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lanner, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("rope_store(Tensor(a!) qkv, Tensor cos, Tensor sin, Tensor(b!) k_cache, Tensor(c!) v_cache, "
        "Tensor slots, Tensor positions, int nh, int nkv) -> ()");
}

TORCH_LIBRARY_IMPL(lanner, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rope_store", &rope_store);
}
