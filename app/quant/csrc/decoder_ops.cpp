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
//   lanner::decode_attention(q fp32 [R, nh, d] (rows may be strided), k_cache, v_cache, slots long [R],
//                            positions long [R], float scale) -> out fp32 [R, nh * d]
//       Row r attends keys 0..positions[r] of slot slots[r] (no mask tensors); the nh / nkv query heads of
//       a KV head are adjacent (grouped-query attention).  Replaces the masked SDPA of the decode rows.
//
// The KV caches are fp32 or bf16 (both the same; app/models/kv_cache.py).  bf16 elements are stored rounded
// to nearest even from the fp32 result, as ATen's conversion does, and widened back to fp32 (exact) when read:
// all arithmetic stays fp32.
//
// rms_norm and rope_store are plain loops (decoder_core.h: the standalone build of lite.cpp shares them) that the compiler vectorizes (-O3 -march=native); their rows are
// split across torch's threads only when there are many of them (a decode row is a few microseconds of
// work, less than a fork/join of the thread pool).  decode_attention runs one task per (row, KV head)
// with AVX2 blocks of 8 keys / 16 values where the CPU has them and plain loops otherwise; with fewer
// (row, KV head) pairs than threads, a pair's query heads are split over several tasks.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "decoder_core.h"
#include "lanner_ops.h"

#include <cstdint>

namespace {

bool is_f32(const at::Tensor& t) { return t.scalar_type() == at::kFloat && t.is_contiguous(); }

// a pair of KV caches: contiguous, 4-d, same shape, both fp32 or both bf16
bool is_kv_pair(const at::Tensor& kc, const at::Tensor& vc) {
  return kc.is_contiguous() && vc.is_contiguous() && kc.dim() == 4 && kc.sizes() == vc.sizes() &&
         kc.scalar_type() == vc.scalar_type() &&
         (kc.scalar_type() == at::kFloat || kc.scalar_type() == at::kBFloat16);
}

// a bf16 cache's elements as decoder_core.h's bf16 (the same 16 bits)
bf16* bf16_ptr(const at::Tensor& t) { return static_cast<bf16*>(t.data_ptr()); }

}  // namespace

namespace lanner {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 1 && is_f32(x) && is_f32(w) && w.size(0) == x.size(1),
              "rms_norm: x contiguous fp32 [T, H], w contiguous fp32 [H]");
  const int64_t T = x.size(0), H = x.size(1);
  at::Tensor y = at::empty_like(x);
  rms_norm_raw(x.data_ptr<float>(), T, H, w.data_ptr<float>(), static_cast<float>(eps), y.data_ptr<float>());
  return y;
}

void rope_store(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& kc,
                const at::Tensor& vc, const at::Tensor& slots, const at::Tensor& positions, int64_t nh,
                int64_t nkv) {
  TORCH_CHECK(qkv.dim() == 2 && is_f32(qkv) && is_f32(cos) && is_f32(sin) && is_kv_pair(kc, vc),
              "rope_store: contiguous fp32 qkv [T, (nh + 2 nkv) d], cos/sin [T, d], caches [S, nkv, L, d] "
              "(both fp32 or both bf16)");
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
  TORCH_CHECK(d <= 1024, "rope_store: head_dim above 1024");
  float* qp = qkv.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* snp = sin.data_ptr<float>();
  if (kc.scalar_type() == at::kBFloat16)
    rope_store_rows(qp, cp, snp, bf16_ptr(kc), bf16_ptr(vc), sp, pp, T, L, d, nh, nkv);
  else
    rope_store_rows(qp, cp, snp, kc.data_ptr<float>(), vc.data_ptr<float>(), sp, pp, T, L, d, nh, nkv);
}

// ------------------------------------------------------------------------------- decode attention

// Attention of single-token rows over their own cached keys/values: row r (query heads nkv x g, the g heads
// of a KV head adjacent) attends positions 0..positions[r] of slot slots[r].
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
                            const at::Tensor& slots, const at::Tensor& positions, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.stride(2) == 1 && q.stride(1) == q.size(2) &&
                  is_kv_pair(kc, vc),
              "decode_attention: fp32 q [R, nh, d] (rows may be strided), caches contiguous [S, nkv, L, d] "
              "(both fp32 or both bf16)");
  const int64_t R = q.size(0), nh = q.size(1), d = q.size(2), S = kc.size(0), nkv = kc.size(1), L = kc.size(2);
  TORCH_CHECK(kc.size(3) == d && nh % nkv == 0, "decode_attention: shape mismatch");
  TORCH_CHECK(slots.scalar_type() == at::kLong && positions.scalar_type() == at::kLong && slots.is_contiguous() &&
                  positions.is_contiguous() && slots.numel() == R && positions.numel() == R,
              "decode_attention: slots and positions must be contiguous int64 [R]");
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(sp[r] >= 0 && sp[r] < S && pp[r] >= 0 && pp[r] < L, "decode_attention: slot or position out of range");
  at::Tensor out = at::empty({R, nh * d}, q.options().memory_format(at::MemoryFormat::Contiguous));
  const float sc = static_cast<float>(scale);
  if (kc.scalar_type() == at::kBFloat16)
    attend_rows(q.data_ptr<float>(), q.stride(0), bf16_ptr(kc), bf16_ptr(vc), out.data_ptr<float>(),
                sp, pp, R, nh, nkv, L, d, sc);
  else
    attend_rows(q.data_ptr<float>(), q.stride(0), kc.data_ptr<float>(), vc.data_ptr<float>(),
                out.data_ptr<float>(), sp, pp, R, nh, nkv, L, d, sc);
  return out;
}

}  // namespace lanner

TORCH_LIBRARY_FRAGMENT(lanner, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("rope_store(Tensor(a!) qkv, Tensor cos, Tensor sin, Tensor(b!) k_cache, Tensor(c!) v_cache, "
        "Tensor slots, Tensor positions, int nh, int nkv) -> ()");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, Tensor positions, "
        "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(lanner, CPU, m) {
  m.impl("rms_norm", &lanner::rms_norm);
  m.impl("rope_store", &lanner::rope_store);
  m.impl("decode_attention", &lanner::decode_attention);
}
