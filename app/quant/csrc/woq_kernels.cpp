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

}  // namespace

TORCH_LIBRARY(lanner, m) {
  m.def("int8_mm(Tensor x, Tensor wt, Tensor scales, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(lanner, CPU, m) {
  m.impl("int8_mm", &int8_mm);
}
