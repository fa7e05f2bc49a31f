// Lanner's weight-only-quantized matmul kernels for CPUs (built on first use by app/quant/kernels.py).
//
//   lanner::int8_mm(x fp32 [M, K], wt int8 [T, K, 16], scales fp32 [16 T], int n) -> y fp32 [M, n]
//       y[m, r] = scales[r] * sum_k x[m, k] * q[r, k],  wt[t, k, j] = q[16 t + j, k] (rows >= n are zero)
//
// Decode is memory-bound: a token reads every weight once, so the kernel's job is to stream int8 weights
// at the memory bandwidth while the core converts them to fp32 and multiplies.  The weights are packed
// in tiles of 16 output rows, k-major, so a thread's share of the matrix is one sequential stream, and
// each k gives the 16 weights that multiply one broadcast activation: a tile's outputs accumulate in two
// 8-wide vectors, with no horizontal sums.  Activations stay fp32 (ATen's packed kernel rounds them to
// bf16).  A pass over K covers MR activation rows and NT tiles with 8-12 accumulators, so the same code
// is register-blocked for batches (it beats dequant + MKL sgemm up to M=256 on the dev box).  Threads
// split the tiles with at::parallel_for (torch's OpenMP pool, sized by torch.set_num_threads).
//
// Written with AVX2+FMA intrinsics (every x86-64 CPU Lanner targets: Zen, Xeon) plus a scalar fallback
// for other CPUs; compiled with -march=native on the machine that runs it.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LANNER_AVX2 1
#else
#define LANNER_AVX2 0
#endif

namespace {

constexpr int64_t kTile = 16;

// One pass over K for MR activation rows and NT consecutive tiles: out[m * ldo + 16 i + j] =
// scale[16 i + j] * sum_k x[m * ldx + k] * wt[i * K * 16 + k * 16 + j], for the first n_left outputs.
// Every output lane sums its products in k order in one accumulator whatever MR and NT are, so a row's
// result does not depend on the batch it is in (decode is batch-invariant).
#if LANNER_AVX2
template <int MR, int NT>
inline void int8_tile(const float* x, int64_t ldx, int64_t K, const int8_t* wt, const float* scale,
                      float* out, int64_t ldo, int64_t n_left) {
  __m256 c[MR][NT][2];
  for (int m = 0; m < MR; ++m)
    for (int i = 0; i < NT; ++i) c[m][i][0] = c[m][i][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m256 xb[MR];
    for (int m = 0; m < MR; ++m) xb[m] = _mm256_broadcast_ss(x + m * ldx + k);
    for (int i = 0; i < NT; ++i) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wt + (i * K + k) * kTile));
      const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
      const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(b, b)));
      for (int m = 0; m < MR; ++m) {
        c[m][i][0] = _mm256_fmadd_ps(w0, xb[m], c[m][i][0]);
        c[m][i][1] = _mm256_fmadd_ps(w1, xb[m], c[m][i][1]);
      }
    }
  }
  for (int i = 0; i < NT; ++i) {
    const __m256 s0 = _mm256_loadu_ps(scale + i * kTile), s1 = _mm256_loadu_ps(scale + i * kTile + 8);
    const int64_t nvalid = std::min<int64_t>(kTile, n_left - i * kTile);
    for (int m = 0; m < MR; ++m) {
      alignas(32) float tmp[kTile];
      float* dst = nvalid == kTile ? out + m * ldo + i * kTile : tmp;
      _mm256_storeu_ps(dst, _mm256_mul_ps(c[m][i][0], s0));
      _mm256_storeu_ps(dst + 8, _mm256_mul_ps(c[m][i][1], s1));
      if (dst == tmp) std::copy(tmp, tmp + nvalid, out + m * ldo + i * kTile);
    }
  }
}
#else
template <int MR, int NT>
inline void int8_tile(const float* x, int64_t ldx, int64_t K, const int8_t* wt, const float* scale,
                      float* out, int64_t ldo, int64_t n_left) {
  const int64_t n = std::min<int64_t>(NT * kTile, n_left);
  for (int m = 0; m < MR; ++m)
    for (int64_t j = 0; j < n; ++j) {
      const int8_t* w = wt + (j / kTile) * K * kTile + j % kTile;
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += x[m * ldx + k] * static_cast<float>(w[k * kTile]);
      out[m * ldo + j] = scale[j] * acc;
    }
}
#endif

// MR activation rows (at x) against tiles [t0, t1): NT tiles at a time, 12 accumulators in all (with
// 2 weight vectors and MR broadcasts that fills AVX2's 16 registers for MR = 2..6).
template <int MR>
void int8_rows(const float* x, int64_t K, const int8_t* wt, const float* scale, float* y, int64_t N,
               int64_t t0, int64_t t1) {
  constexpr int NT = MR == 1 ? 4 : (MR <= 3 ? 2 : 1);
  int64_t t = t0;
  for (; t + NT <= t1; t += NT)
    int8_tile<MR, NT>(x, K, K, wt + t * K * kTile, scale + t * kTile, y + t * kTile, N, N - t * kTile);
  for (; t < t1; ++t)
    int8_tile<MR, 1>(x, K, K, wt + t * K * kTile, scale + t * kTile, y + t * kTile, N, N - t * kTile);
}

constexpr int kMR = 6;  // activation rows per pass over a tile

// All M activation rows against weight tiles [t0, t1).
void int8_tiles(const float* x, int64_t M, int64_t K, const int8_t* wt, const float* scale, float* y,
                int64_t N, int64_t t0, int64_t t1) {
  int64_t m = 0;
  for (; m + kMR <= M; m += kMR) int8_rows<kMR>(x + m * K, K, wt, scale, y + m * N, N, t0, t1);
  const float* xr = x + m * K;
  float* yr = y + m * N;
  switch (M - m) {
    case 5: int8_rows<5>(xr, K, wt, scale, yr, N, t0, t1); break;
    case 4: int8_rows<4>(xr, K, wt, scale, yr, N, t0, t1); break;
    case 3: int8_rows<3>(xr, K, wt, scale, yr, N, t0, t1); break;
    case 2: int8_rows<2>(xr, K, wt, scale, yr, N, t0, t1); break;
    case 1: int8_rows<1>(xr, K, wt, scale, yr, N, t0, t1); break;
    default: break;
  }
}

// x [M, K] fp32, wt [N_pad / 16, K, 16] int8 (see kTile), scales [N_pad] fp32, n = the real N.
at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& wt, const at::Tensor& scales, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && wt.dim() == 3 && scales.dim() == 1, "int8_mm: x [M, K], wt [T, K, 16], scales [16 T]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && wt.scalar_type() == at::kChar &&
                  scales.scalar_type() == at::kFloat, "int8_mm: x fp32, wt int8, scales fp32");
  TORCH_CHECK(x.is_contiguous() && wt.is_contiguous() && scales.is_contiguous(), "int8_mm: contiguous inputs");
  const int64_t M = x.size(0), K = x.size(1), T = wt.size(0);
  TORCH_CHECK(wt.size(1) == K && wt.size(2) == kTile && scales.size(0) == T * kTile, "int8_mm: shape mismatch");
  TORCH_CHECK(n > (T - 1) * kTile && n <= T * kTile, "int8_mm: n does not match the tiles");
  at::Tensor y = at::empty({M, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = wt.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) { int8_tiles(xp, M, K, wp, sp, yp, n, t0, t1); });
  return y;
}

// ----------------------------------------------------------------------------------------------- int4
//
//   lanner::int4_mm(x fp32 [M, K], nib uint8 [T, K, 8], sz bf16 [T, K / G, 2, 16], int group, int n)
//       w[r, k] = (q[r, k] - 8) * s[r, g] + z[r, g],  g = k / G;  nib[t, k, j] = q[16t + j, k] | q[16t + j + 8, k] << 4
//       sz[t, g, 0, j] = s[16 t + j, g],  sz[t, g, 1, j] = z[16 t + j, g]
// Each weight is converted and scaled, q * s (exact in fp32), and multiplied into the tile's 16 outputs;
// at each group's end acc[r] += (z[r, g] - 8 s[r, g]) * sum_{k in g} x[k] (activation sums per group are
// computed once per call).  Weights stream at half a byte each plus
// 4 bytes of scale and zero per 16 rows and group.

#if LANNER_AVX2
inline __m256 load_bf16x8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

template <int MR, int NT>
inline void int4_tile(const float* x, const float* xsum, int64_t ldx, int64_t K, int64_t G,
                      const uint8_t* nib, const uint16_t* sz, float* out, int64_t ldo, int64_t n_left) {
  const int64_t groups = K / G;
  const __m256i low4 = _mm256_set1_epi32(0x0F);
  const __m256 eight = _mm256_set1_ps(8.f);
  __m256 acc[MR][NT][2];
  for (int m = 0; m < MR; ++m)
    for (int i = 0; i < NT; ++i) acc[m][i][0] = acc[m][i][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 sc[NT][2];
    for (int i = 0; i < NT; ++i) {
      const uint16_t* p = sz + (i * groups + g) * 32;
      sc[i][0] = load_bf16x8(p);
      sc[i][1] = load_bf16x8(p + 8);
    }
    for (int64_t k = g * G; k < (g + 1) * G; ++k) {
      for (int i = 0; i < NT; ++i) {
        const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(nib + (i * K + k) * 8));
        const __m256i v = _mm256_cvtepu8_epi32(b);
        // q * s is exact in fp32 (4 bits times bf16's 8), so the scale can go on the weight
        const __m256 lo = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, low4)), sc[i][0]);
        const __m256 hi = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), sc[i][1]);
        for (int m = 0; m < MR; ++m) {
          const __m256 xb = _mm256_broadcast_ss(x + m * ldx + k);
          acc[m][i][0] = _mm256_fmadd_ps(lo, xb, acc[m][i][0]);
          acc[m][i][1] = _mm256_fmadd_ps(hi, xb, acc[m][i][1]);
        }
      }
    }
    for (int i = 0; i < NT; ++i) {
      const uint16_t* p = sz + (i * groups + g) * 32;
      const __m256 c0 = _mm256_fnmadd_ps(eight, sc[i][0], load_bf16x8(p + 16));  // z - 8 s
      const __m256 c1 = _mm256_fnmadd_ps(eight, sc[i][1], load_bf16x8(p + 24));
      for (int m = 0; m < MR; ++m) {
        const __m256 xs = _mm256_broadcast_ss(xsum + m * groups + g);
        acc[m][i][0] = _mm256_fmadd_ps(c0, xs, acc[m][i][0]);
        acc[m][i][1] = _mm256_fmadd_ps(c1, xs, acc[m][i][1]);
      }
    }
  }
  for (int i = 0; i < NT; ++i) {
    const int64_t nvalid = std::min<int64_t>(kTile, n_left - i * kTile);
    for (int m = 0; m < MR; ++m) {
      alignas(32) float tmp[kTile];
      float* dst = nvalid == kTile ? out + m * ldo + i * kTile : tmp;
      _mm256_storeu_ps(dst, acc[m][i][0]);
      _mm256_storeu_ps(dst + 8, acc[m][i][1]);
      if (dst == tmp) std::copy(tmp, tmp + nvalid, out + m * ldo + i * kTile);
    }
  }
}
// One activation row (decode): the group's products accumulate unscaled and the scale is applied once per
// group, which saves a multiply per weight vector (0.54 against 0.68 ms at 2048->11264); rows of a batch
// use int4_tile above, so a row's rounding differs between M = 1 and M > 1 (by ~1e-6 relative).
template <int NT>
inline void int4_tile1(const float* x, const float* xsum, int64_t K, int64_t G, const uint8_t* nib,
                       const uint16_t* sz, float* out, int64_t n_left) {
  const int64_t groups = K / G;
  const __m256i low4 = _mm256_set1_epi32(0x0F);
  const __m256 eight = _mm256_set1_ps(8.f);
  __m256 acc[NT][2];
  for (int i = 0; i < NT; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 ga[NT][2];
    for (int i = 0; i < NT; ++i) ga[i][0] = ga[i][1] = _mm256_setzero_ps();
    for (int64_t k = g * G; k < (g + 1) * G; ++k) {
      const __m256 xb = _mm256_broadcast_ss(x + k);
      for (int i = 0; i < NT; ++i) {
        const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(nib + (i * K + k) * 8));
        const __m256i v = _mm256_cvtepu8_epi32(b);
        ga[i][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, low4)), xb, ga[i][0]);
        ga[i][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), xb, ga[i][1]);
      }
    }
    const __m256 xs = _mm256_broadcast_ss(xsum + g);
    for (int i = 0; i < NT; ++i) {
      const uint16_t* p = sz + (i * groups + g) * 32;
      const __m256 s0 = load_bf16x8(p), s1 = load_bf16x8(p + 8);
      const __m256 c0 = _mm256_fnmadd_ps(eight, s0, load_bf16x8(p + 16));  // z - 8 s
      const __m256 c1 = _mm256_fnmadd_ps(eight, s1, load_bf16x8(p + 24));
      acc[i][0] = _mm256_fmadd_ps(c0, xs, _mm256_fmadd_ps(ga[i][0], s0, acc[i][0]));
      acc[i][1] = _mm256_fmadd_ps(c1, xs, _mm256_fmadd_ps(ga[i][1], s1, acc[i][1]));
    }
  }
  for (int i = 0; i < NT; ++i) {
    const int64_t nvalid = std::min<int64_t>(kTile, n_left - i * kTile);
    alignas(32) float tmp[kTile];
    float* dst = nvalid == kTile ? out + i * kTile : tmp;
    _mm256_storeu_ps(dst, acc[i][0]);
    _mm256_storeu_ps(dst + 8, acc[i][1]);
    if (dst == tmp) std::copy(tmp, tmp + nvalid, out + i * kTile);
  }
}
#else
inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

template <int MR, int NT>
inline void int4_tile(const float* x, const float* xsum, int64_t ldx, int64_t K, int64_t G,
                      const uint8_t* nib, const uint16_t* sz, float* out, int64_t ldo, int64_t n_left) {
  const int64_t groups = K / G, n = std::min<int64_t>(NT * kTile, n_left);
  for (int m = 0; m < MR; ++m)
    for (int64_t r = 0; r < n; ++r) {
      const int64_t i = r / kTile, j = r % kTile;
      float acc = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        const uint16_t* p = sz + (i * groups + g) * 32;
        const float s = bf16_to_float(p[j]), c = bf16_to_float(p[16 + j]) - 8.f * s;
        for (int64_t k = g * G; k < (g + 1) * G; ++k) {
          const uint8_t b = nib[(i * K + k) * 8 + j % 8];
          acc += x[m * ldx + k] * (static_cast<float>(j < 8 ? b & 0x0F : b >> 4) * s);
        }
        acc += c * xsum[m * groups + g];
      }
      out[m * ldo + r] = acc;
    }
}
#endif

#if !LANNER_AVX2
template <int NT>
inline void int4_tile1(const float* x, const float* xsum, int64_t K, int64_t G, const uint8_t* nib,
                       const uint16_t* sz, float* out, int64_t n_left) {
  int4_tile<1, NT>(x, xsum, K, K, G, nib, sz, out, 0, n_left);
}
#endif

// MR activation rows against tiles [t0, t1), NT tiles at a time (2 MR NT accumulators, 2 NT scales).
template <int MR>
void int4_rows(const float* x, const float* xsum, int64_t K, int64_t G, const uint8_t* nib,
               const uint16_t* sz, float* y, int64_t N, int64_t t0, int64_t t1, bool one_row = false) {
  constexpr int NT = MR == 1 ? 3 : 1;
  const int64_t groups = K / G;
  int64_t t = t0;
  if (MR == 1 && one_row) {
    for (; t + 2 <= t1; t += 2)
      int4_tile1<2>(x, xsum, K, G, nib + t * K * 8, sz + t * groups * 32, y + t * kTile, N - t * kTile);
    for (; t < t1; ++t)
      int4_tile1<1>(x, xsum, K, G, nib + t * K * 8, sz + t * groups * 32, y + t * kTile, N - t * kTile);
    return;
  }
  for (; t + NT <= t1; t += NT)
    int4_tile<MR, NT>(x, xsum, K, K, G, nib + t * K * 8, sz + t * groups * 32, y + t * kTile, N, N - t * kTile);
  for (; t < t1; ++t)
    int4_tile<MR, 1>(x, xsum, K, K, G, nib + t * K * 8, sz + t * groups * 32, y + t * kTile, N, N - t * kTile);
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& nib, const at::Tensor& sz, int64_t group, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && nib.dim() == 3 && sz.dim() == 4,
              "int4_mm: x [M, K], nib [T, K, 8], sz [T, K/G, 2, 16]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && nib.scalar_type() == at::kByte &&
                  sz.scalar_type() == at::kBFloat16, "int4_mm: x fp32, nib uint8, sz bf16");
  TORCH_CHECK(x.is_contiguous() && nib.is_contiguous() && sz.is_contiguous(), "int4_mm: contiguous inputs");
  const int64_t M = x.size(0), K = x.size(1), T = nib.size(0);
  TORCH_CHECK(group > 0 && K % group == 0, "int4_mm: the group size must divide K");
  TORCH_CHECK(nib.size(1) == K && nib.size(2) == 8 && sz.size(0) == T && sz.size(1) == K / group &&
                  sz.size(2) == 2 && sz.size(3) == kTile, "int4_mm: shape mismatch");
  TORCH_CHECK(n > (T - 1) * kTile && n <= T * kTile, "int4_mm: n does not match the tiles");
  const int64_t groups = K / group;
  at::Tensor y = at::empty({M, n}, x.options());
  at::Tensor xsum = at::empty({M, groups}, x.options());
  const float* xp = x.data_ptr<float>();
  float* xs = xsum.data_ptr<float>();
  for (int64_t i = 0; i < M * groups; ++i) {  // in k order, so a row's sums do not depend on M
    float s = 0.f;
    for (int64_t k = 0; k < group; ++k) s += xp[i * group + k];
    xs[i] = s;
  }
  const uint8_t* np = nib.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(sz.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    int64_t m = 0;
    for (; m + 6 <= M; m += 6)
      int4_rows<6>(xp + m * K, xs + m * groups, K, group, np, sp, yp + m * n, n, t0, t1);
    const float* xr = xp + m * K;
    const float* sr = xs + m * groups;
    float* yr = yp + m * n;
    switch (M - m) {
      case 5: int4_rows<5>(xr, sr, K, group, np, sp, yr, n, t0, t1); break;
      case 4: int4_rows<4>(xr, sr, K, group, np, sp, yr, n, t0, t1); break;
      case 3: int4_rows<3>(xr, sr, K, group, np, sp, yr, n, t0, t1); break;
      case 2: int4_rows<2>(xr, sr, K, group, np, sp, yr, n, t0, t1); break;
      case 1: int4_rows<1>(xr, sr, K, group, np, sp, yr, n, t0, t1, M == 1); break;
      default: break;
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(lanner, m) {
  m.def("int8_mm(Tensor x, Tensor wt, Tensor scales, int n) -> Tensor");
  m.def("int4_mm(Tensor x, Tensor nib, Tensor sz, int group, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(lanner, CPU, m) {
  m.impl("int8_mm", &int8_mm);
  m.impl("int4_mm", &int4_mm);
}
