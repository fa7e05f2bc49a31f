// Lanner's small decoder ops on raw pointers (RMSNorm, RoPE + KV store, decode attention), shared by the
// torch build (decoder_ops.cpp, whose comment describes them) and the standalone one (lite.cpp, app/lite).
#pragma once

#include "parallel.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kRowsPerTask = 16;  // rows a thread takes at once: fewer rows run on the calling thread

// A bf16 cache element: the upper 16 bits of an fp32, rounded to nearest even from fp32 (NaN -> 0x7FC0), bit
// for bit as c10::BFloat16 converts, so the two builds store the same caches.
struct bf16 {
  uint16_t x;
};

inline float widen(float x) { return x; }
inline float widen(bf16 h) {
  const uint32_t bits = static_cast<uint32_t>(h.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline void narrow_to(float* p, float x) { *p = x; }
inline void narrow_to(bf16* p, float x) {
  if (std::isnan(x)) {
    p->x = 0x7FC0;
    return;
  }
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  p->x = static_cast<uint16_t>((u + ((u >> 16) & 1) + 0x7FFFu) >> 16);
}

// y = x / sqrt(mean(x^2) + eps) * w per row of x [T, H] (contiguous)
void rms_norm_raw(const float* xp, int64_t T, int64_t H, const float* wp, float e, float* yp) {
  lanner::parallel_for(0, T, kRowsPerTask, [&](int64_t r0, int64_t r1) {
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
}

// out[i] = x[i] cos[i] + x[(i + d/2) mod d] sin[i]: rotate_half(x) * sin with sin's first half negated.
inline void rotate(const float* x, const float* cs, const float* sn, float* out, int64_t d) {
  const int64_t h = d / 2;
  for (int64_t i = 0; i < h; ++i) out[i] = x[i] * cs[i] + x[i + h] * sn[i];
  for (int64_t i = h; i < d; ++i) out[i] = x[i] * cs[i] + x[i - h] * sn[i];
}
template <typename KV>
void rope_store_rows(float* qp, const float* cp, const float* snp, KV* kp, KV* vp, const int64_t* sp,
                     const int64_t* pp, int64_t T, int64_t L, int64_t d, int64_t nh, int64_t nkv) {
  const int64_t width = (nh + 2 * nkv) * d;
  lanner::parallel_for(0, T, kRowsPerTask, [&](int64_t t0, int64_t t1) {
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
      for (int64_t h = 0; h < nkv; ++h) {  // keys rotated into the cache, values copied
        const int64_t at = ((sp[t] * nkv + h) * L + pp[t]) * d;
        rotate(row + (nh + h) * d, cs, sn, tmp, d);
        const float* v = row + (nh + nkv + h) * d;
        for (int64_t i = 0; i < d; ++i) {
          narrow_to(kp + at + i, tmp[i]);
          narrow_to(vp + at + i, v[i]);
        }
      }
    }
  });
}
template <typename KV>
inline float dot(const float* a, const KV* b, int64_t d) {
  float part[16] = {};
  int64_t k = 0;
  for (; k + 16 <= d; k += 16)
    for (int l = 0; l < 16; ++l) part[l] += a[k + l] * widen(b[k + l]);
  for (int w = 8; w > 0; w /= 2)  // a tree, so the compiler reduces in vector registers
    for (int l = 0; l < w; ++l) part[l] += part[l + w];
  float s = part[0];
  for (; k < d; ++k) s += a[k] * widen(b[k]);
  return s;
}

// exp(x) for x <= 0 (softmax after subtracting the max), vectorizable: x = n ln2 + r, |r| <= ln2 / 2,
// exp(r) by its degree-6 Taylor polynomial (relative error < 3e-7 there), times 2^n through the exponent
// bits.  Below -87 the result is 0 (exp would be subnormal).
inline float exp_nonpositive(float x) {
  x = x < -87.f ? -87.f : x;
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const float n = (x * 1.44269504088896341f + kRound) - kRound;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;  // ln2 split in two for an exact n * ln2
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

#if defined(__AVX2__) && defined(__FMA__)
#define LANNER_ATTN_AVX2 1
// n (a multiple of 8) cache elements as fp32: the cache itself when it is fp32; a bf16 block is widened once
// into buf (the 16 bits become the upper half), so the g query heads that read it do not widen it g times
inline const float* as_f32(const float* p, int64_t, float*) { return p; }
inline const float* as_f32(const bf16* p, int64_t n, float* buf) {
  for (int64_t i = 0; i < n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i));
    _mm256_storeu_ps(buf + i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
  }
  return buf;
}

// out[jj] = q . K[jj] for the 8 keys at K (rows of d floats, d % 8 == 0): 8 accumulators, then one
// transposing reduction (hadd tree) instead of 8 horizontal sums.
inline void qk8(const float* q, const float* K, int64_t d, float* out) {
  __m256 acc[8];
  for (int jj = 0; jj < 8; ++jj) acc[jj] = _mm256_setzero_ps();
  for (int64_t k = 0; k < d; k += 8) {
    const __m256 qv = _mm256_loadu_ps(q + k);
    for (int jj = 0; jj < 8; ++jj) acc[jj] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(K + jj * d + k), acc[jj]);
  }
  const __m256 t0 = _mm256_hadd_ps(acc[0], acc[1]), t1 = _mm256_hadd_ps(acc[2], acc[3]);
  const __m256 t2 = _mm256_hadd_ps(acc[4], acc[5]), t3 = _mm256_hadd_ps(acc[6], acc[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31)));
}

// o[0..8 W) += sum_j p[j] V[j][0..8 W) over n rows of V (row stride d), in W registers.  W is a compile-time
// constant: with a run-time width (and a test per register) the accumulators were not kept in registers and
// the values' side of attention ran at 60% of this speed.
template <int W>
inline void pv_chunk(const float* p, const float* V, int64_t n, int64_t d, float* o) {
  __m256 acc[W];
  for (int c = 0; c < W; ++c) acc[c] = _mm256_loadu_ps(o + 8 * c);
  for (int64_t j = 0; j < n; ++j) {
    const __m256 pj = _mm256_set1_ps(p[j]);
    const float* v = V + j * d;
    for (int c = 0; c < W; ++c) acc[c] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + 8 * c), acc[c]);
  }
  for (int c = 0; c < W; ++c) _mm256_storeu_ps(o + 8 * c, acc[c]);
}

// o[0..d) += sum_j p[j] V[j] over n rows of V (d % 8 == 0): 64 dims at a time, then 32, 16 and 8.
inline void pv_acc(const float* p, const float* V, int64_t n, int64_t d, float* o) {
  int64_t c = 0;
  for (; c + 64 <= d; c += 64) pv_chunk<8>(p, V + c, n, d, o + c);
  if (c + 32 <= d) pv_chunk<4>(p, V + c, n, d, o + c), c += 32;
  if (c + 16 <= d) pv_chunk<2>(p, V + c, n, d, o + c), c += 16;
  if (c + 8 <= d) pv_chunk<1>(p, V + c, n, d, o + c);
}

inline float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

inline float hmax(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}

// exp_nonpositive of 8 lanes, the same steps
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 round = _mm256_set1_ps(12582912.f);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 n = _mm256_sub_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), round), round);
  const __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f),
                                   _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x));
  __m256 p = _mm256_set1_ps(1.f / 720.f);
  for (const float c : {1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f}) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
#else
#define LANNER_ATTN_AVX2 0
#endif

// p[0..n) = exp(p - max(p)) (n >= 1); returns their sum.  The caller divides its weighted sum of the values
// by it once, instead of normalizing n probabilities.
inline float exp_shifted(float* p, int64_t n) {
  int64_t j = 0;
  float mx = p[0], sum = 0.f;
#if LANNER_ATTN_AVX2
  __m256 m = _mm256_set1_ps(mx), acc = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(p + j));
  mx = hmax(m);
  for (int64_t k = j; k < n; ++k) mx = std::max(mx, p[k]);
  m = _mm256_set1_ps(mx);
  for (j = 0; j + 8 <= n; j += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(p + j), m));
    _mm256_storeu_ps(p + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = hsum(acc);
#else
  for (int64_t k = 1; k < n; ++k) mx = std::max(mx, p[k]);
#endif
  for (; j < n; ++j) {
    p[j] = exp_nonpositive(p[j] - mx);
    sum += p[j];
  }
  return sum;
}
// One task per (row, KV head, share of its query heads): scores of those heads against every key, softmax,
// weighted sum of the values (see decode_attention).
template <typename KV>
void attend_rows(const float* qp, int64_t ldq, const KV* kp, const KV* vp, float* op, const int64_t* sp,
                 const int64_t* pp, int64_t R, int64_t nh, int64_t nkv, int64_t L, int64_t d, float sc) {
  const int64_t heads = nh / nkv;
  // A task is a (row, KV head) and some of its query heads: all of them, unless rows x KV heads are fewer
  // than the threads (a row of falcon-7b has one KV head for its 71 query heads; TinyLlama's 4 KV heads
  // are too few for 8 threads).  A head's arithmetic does not depend on how the heads are split, so neither
  // do the results.
  const int64_t pairs = R * nkv, threads = lanner::num_threads();
  if (pairs == 0) return;
  const int64_t per_task = pairs >= threads ? heads : (heads * pairs + threads - 1) / threads;
  const int64_t parts = (heads + per_task - 1) / per_task;
  lanner::parallel_for(0, pairs * parts, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> prob, inv(heads), block(16 * d);  // block: a bf16 cache's keys / values widened (as_f32)
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = i / (nkv * parts), h = i / parts % nkv, a0 = i % parts * per_task, n = pp[r] + 1;
      const int64_t g = std::min(per_task, heads - a0);  // this task's query heads: a0 .. a0 + g of the KV head
      const KV* K = kp + (sp[r] * nkv + h) * L * d;
      const KV* V = vp + (sp[r] * nkv + h) * L * d;
      prob.resize(g * n);
      const float* Q = qp + r * ldq + (h * heads + a0) * d;  // the task's query heads, d apart
      float* O = op + r * nh * d + (h * heads + a0) * d;
      int64_t j = 0;
#if LANNER_ATTN_AVX2
      // blocks of 8 keys (8 d elements: L1-resident) against all g query heads
      if (d % 8 == 0) {
        float s8[8];
        for (; j + 8 <= n; j += 8) {
          const float* Kj = as_f32(K + j * d, 8 * d, block.data());
          for (int64_t a = 0; a < g; ++a) {
            qk8(Q + a * d, Kj, d, s8);
            for (int l = 0; l < 8; ++l) prob[a * n + j + l] = s8[l] * sc;
          }
        }
      }
#endif
      for (; j < n; ++j)
        for (int64_t a = 0; a < g; ++a) prob[a * n + j] = dot(Q + a * d, K + j * d, d) * sc;
      for (int64_t a = 0; a < g; ++a) inv[a] = 1.f / exp_shifted(prob.data() + a * n, n);  // softmax numerators
      std::fill(O, O + g * d, 0.f);
#if LANNER_ATTN_AVX2
      if (d % 8 == 0) {
        for (int64_t j0 = 0; j0 < n; j0 += 16) {  // blocks of 16 value rows against all g heads
          const int64_t rows = std::min<int64_t>(16, n - j0);
          const float* Vj = as_f32(V + j0 * d, rows * d, block.data());
          for (int64_t a = 0; a < g; ++a) pv_acc(prob.data() + a * n + j0, Vj, rows, d, O + a * d);
        }
      } else
#endif
        for (int64_t a = 0; a < g; ++a)
          for (int64_t jj = 0; jj < n; ++jj) {
            const float w = prob[a * n + jj];
            const KV* v = V + jj * d;
            for (int64_t k = 0; k < d; ++k) O[a * d + k] += w * widen(v[k]);
          }
      for (int64_t a = 0; a < g; ++a)
        for (int64_t k = 0; k < d; ++k) O[a * d + k] *= inv[a];
    }
  });
}
}  // namespace
