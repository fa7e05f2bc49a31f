// Lanner's weight-only-quantized matmul kernels for CPUs (built on first use by app/quant/kernels.py).
//
//   lanner::int8_mm(x fp32 [M, K], wt int8 [T, Kp/4, 16, 4], scales fp32 [16 T], int n) -> y fp32 [M, n]
//   lanner::int4_mm(x fp32 [M, K], nib uint8 [T, K/4, 8, 4], scales uint8 [T, 4 + K/G, 16],
//                   zeros uint8 [T, K/G, 8], int group, int n) -> y fp32 [M, n]
//
// Weights are packed in tiles of 16 output rows; within a tile, k comes in quads and each row's 4 weights
// of a quad are adjacent: wt[t, k/4, j, k%4] = q[16 t + j, k] (int8; rows and k past the matrix are 0),
// nib[t, k/4, j, k%4] = q[16 t + j, k] | q[16 t + j + 8, k] << 4 (int4, j < 8; the zero points of a group
// likewise: zeros[t, g, j] = z[16 t + j, g] | z[16 t + j + 8, g] << 4; an int4 scale is an 8-bit code
// times a power of two per row, s[r, g] = c[r, g] u[r]: a tile's scales are its 16 rows' fp32 units u
// (64 bytes), then each group's 16 codes, scales[t, 4 + g, j] = c[16 t + j, g]).  A thread's share of the
// matrix is one sequential stream, and one 32-byte load holds 4 k of 8 rows: the layout of the x86
// integer dot-product instructions (VNNI vpdpbusd: 4 u8 x s8 products summed into each int32 lane).
//
// Activations are quantized per row in blocks of 32 (as llama.cpp's Q8 activations): sx = max|x| / 127,
// xq = round(x / sx) in [-127, 127].  Each block's dot products are exact int32; the float sums are
//   int8:  y[m, r] = s[r] * sum_b sx[m, b] * dot_b(xq, q[r])
//   int4:  y[m, r] = u[r] * sum_b sx[m, b] * (c[r, g] * dot_b(xq, q[r]) - z[r, g] c[r, g] * sum_{k in b} xq[k])
// with w = (q - z) * c * u for int4, z an integer 0..15 and c one 1..255 (g = the weight group of block b;
// G is a multiple of 32; z * c is exact in fp32, and so is the product by the power of two u, so this is
// bit for bit the sum with the scale s = c u inside).  The float
// work is done in the same order on every ISA and for any batch, so a row's result is bit-identical alone
// or in a batch, on any thread count, and with AVX-512-VNNI, AVX-VNNI, AVX2 or the scalar code.
//
// Integer dot of a quad: VNNI `dpbusd(acc, u8, s8)`; int8 weights become u8 by `q ^ 0x80` (= q + 128),
// so the dot is corrected by 128 * sum(xq) per block.  AVX2 without VNNI: `maddubs` (u8 x s8 -> pairs of
// int16) + `madd` with ones; its int16 pairs would overflow with u8 weights up to 255, so int8 uses the
// sign trick there (|xq| as u8, q with xq's sign as s8), which needs q != -128: packing clamps int8 weights
// to [-127, 127] on every ISA (a -128 is at most a 1/127 change of that one weight).  int4 nibbles are
// u8 already.  Threads split the tiles with at::parallel_for (torch's OpenMP pool).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "lanner_ops.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LANNER_AVX2 1
#else
#define LANNER_AVX2 0
#endif
#if LANNER_AVX2 && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define LANNER_VNNI 1
#define LANNER_DPBUSD_ASM "vpdpbusd %2, %1, %0"
#elif LANNER_AVX2 && defined(__AVXVNNI__)
#define LANNER_VNNI 1
#define LANNER_DPBUSD_ASM "%{vex%} vpdpbusd %2, %1, %0"  // VEX: AVX-VNNI CPUs lack EVEX
#else
#define LANNER_VNNI 0
#endif

#if LANNER_VNNI
// acc += the dot products of u (u8) and s (s8) in each group of 4 bytes.  Inline asm, not the intrinsic:
// GCC wraps each `_mm256_dpbusd_epi32` in two register copies (its accumulator operand is tied), which
// made the batched loop issue-bound; with the accumulator as an in/out operand, batches of rows ran
// ~20% faster (2048 x 2048 int8, M = 16 and 64, one thread).
inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) {
  asm(LANNER_DPBUSD_ASM : "+v"(acc) : "v"(u), "v"(s));
  return acc;
}
#define LANNER_DPBUSD(acc, u, s) dpbusd(acc, u, s)
#endif

namespace {

constexpr int64_t kTile = 16;   // output rows per tile
constexpr int64_t kBlock = 32;  // activation quantization block (k)
constexpr int64_t kUnitBytes = kTile * 4;  // int4 scales: a tile's 16 fp32 row units, before its codes

// ------------------------------------------------------------------------------- activations

struct QuantizedRows {
  at::Tensor q;    // int8 [M, Kp]
  at::Tensor sx;   // fp32 [M, Kp / 32]
  at::Tensor sum;  // fp32 [M, Kp / 32]: sum of the block's xq (exact: |sum| <= 32 * 127)
};

QuantizedRows quantize_rows(const at::Tensor& x, int64_t Kp) {
  const int64_t M = x.size(0), K = x.size(1), blocks = Kp / kBlock;
  QuantizedRows r{at::empty({M, Kp}, x.options().dtype(at::kChar)), at::empty({M, blocks}, x.options()),
                  at::empty({M, blocks}, x.options())};
  const float* xp = x.data_ptr<float>();
  int8_t* qp = r.q.data_ptr<int8_t>();
  float* sp = r.sx.data_ptr<float>();
  float* cp = r.sum.data_ptr<float>();
  at::parallel_for(0, M * blocks, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t m = i / blocks, k0 = (i % blocks) * kBlock, n = std::max<int64_t>(0, std::min(kBlock, K - k0));
      const float* src = xp + m * K + k0;
      float amax = 0.f;
      bool finite = true;
      for (int64_t k = 0; k < n; ++k) {
        const float a = std::fabs(src[k]);
        finite = finite && a <= std::numeric_limits<float>::max();  // false for inf and NaN
        amax = std::max(amax, a);
      }
      // A block with inf or NaN gets a NaN scale and zero values: the row's outputs become NaN, as an
      // fp32 matmul's would (rounding NaN to an integer would be undefined).
      const float scale = finite ? amax / 127.f : std::numeric_limits<float>::quiet_NaN();
      const float inv = finite && amax > 0.f ? 127.f / amax : 0.f;
      int8_t* dst = qp + m * Kp + k0;
      int32_t sum = 0;
      for (int64_t k = 0; k < kBlock; ++k) {
        const int32_t v = k < n && finite ? static_cast<int32_t>(std::nearbyint(src[k] * inv)) : 0;
        dst[k] = static_cast<int8_t>(v);
        sum += v;
      }
      sp[i] = scale;
      cp[i] = static_cast<float>(sum);
    }
  });
  return r;
}

// ------------------------------------------------------------------------------- tiles
//
// One pass over K for MR activation rows and one tile of 16 outputs.  Per block: exact int32 dot products
// in two 8-lane vectors (rows 0-7, 8-15), then the float update above.

#if LANNER_AVX2
inline __m256 load_u8x8(const uint8_t* p) {  // 8 bytes -> 8 floats (exact)
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

inline int32_t load_quad(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

template <int MR>
inline void int8_tile(const int8_t* xq, const float* sx, const float* xsum, int64_t Kp, const int8_t* wt,
                      const float* scale, float* out, int64_t ldo, int64_t nvalid, const int8_t* next) {
  const int64_t blocks = Kp / kBlock;
  __m256 fa[MR][2];
  for (int m = 0; m < MR; ++m) fa[m][0] = fa[m][1] = _mm256_setzero_ps();
#if LANNER_VNNI
  const __m256i bias = _mm256_set1_epi8(static_cast<char>(0x80));
#else
  const __m256i ones = _mm256_set1_epi16(1);
#endif
  for (int64_t b = 0; b < blocks; ++b) {
    __m256i ia[MR][2];
    for (int m = 0; m < MR; ++m) ia[m][0] = ia[m][1] = _mm256_setzero_si256();
    for (int64_t k = b * kBlock; k < (b + 1) * kBlock; k += 4) {
      const int8_t* w = wt + k * kTile;  // the quad's 64 bytes
      if (next != nullptr) _mm_prefetch(reinterpret_cast<const char*>(next + k * kTile), _MM_HINT_T0);
      __m256i wa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
      __m256i wb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32));
#if LANNER_VNNI
      wa = _mm256_xor_si256(wa, bias);  // q + 128 as u8
      wb = _mm256_xor_si256(wb, bias);
      for (int m = 0; m < MR; ++m) {
        const __m256i xb = _mm256_set1_epi32(load_quad(xq + m * Kp + k));
        ia[m][0] = LANNER_DPBUSD(ia[m][0], wa, xb);
        ia[m][1] = LANNER_DPBUSD(ia[m][1], wb, xb);
      }
#else
      for (int m = 0; m < MR; ++m) {
        const __m256i xb = _mm256_set1_epi32(load_quad(xq + m * Kp + k));
        const __m256i xa = _mm256_abs_epi8(xb);
        ia[m][0] = _mm256_add_epi32(ia[m][0], _mm256_madd_epi16(_mm256_maddubs_epi16(xa, _mm256_sign_epi8(wa, xb)), ones));
        ia[m][1] = _mm256_add_epi32(ia[m][1], _mm256_madd_epi16(_mm256_maddubs_epi16(xa, _mm256_sign_epi8(wb, xb)), ones));
      }
#endif
    }
    for (int m = 0; m < MR; ++m) {
#if LANNER_VNNI
      const __m256i corr = _mm256_set1_epi32(128 * static_cast<int32_t>(xsum[m * blocks + b]));
      ia[m][0] = _mm256_sub_epi32(ia[m][0], corr);
      ia[m][1] = _mm256_sub_epi32(ia[m][1], corr);
#endif
      const __m256 s = _mm256_set1_ps(sx[m * blocks + b]);
      fa[m][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia[m][0]), s, fa[m][0]);
      fa[m][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia[m][1]), s, fa[m][1]);
    }
  }
  const __m256 s0 = _mm256_loadu_ps(scale), s1 = _mm256_loadu_ps(scale + 8);
  for (int m = 0; m < MR; ++m) {
    alignas(32) float tmp[kTile];
    float* dst = nvalid == kTile ? out + m * ldo : tmp;
    _mm256_storeu_ps(dst, _mm256_mul_ps(fa[m][0], s0));
    _mm256_storeu_ps(dst + 8, _mm256_mul_ps(fa[m][1], s1));
    if (dst == tmp) std::copy(tmp, tmp + nvalid, out + m * ldo);
  }
}

template <int MR>
inline void int4_tile(const int8_t* xq, const float* sx, const float* xsum, int64_t Kp, int64_t G,
                      const uint8_t* nib, const uint8_t* scales, const uint8_t* zeros, float* out,
                      int64_t ldo, int64_t nvalid, const uint8_t* next) {
  const int64_t blocks = Kp / kBlock, groups = Kp / G;
  const uint8_t* codes = scales + kUnitBytes;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m128i low4x = _mm_set1_epi8(0x0F);
#if !LANNER_VNNI
  const __m256i ones = _mm256_set1_epi16(1);
#endif
  __m256 fa[MR][2];
  for (int m = 0; m < MR; ++m) fa[m][0] = fa[m][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const __m256 s0 = load_u8x8(codes + g * 16), s1 = load_u8x8(codes + g * 16 + 8);
    const __m128i z = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(zeros + g * 8));
    const __m256 z0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(z, low4x)));
    const __m256 z1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(z, 4), low4x)));
    const __m256 c0 = _mm256_mul_ps(z0, s0), c1 = _mm256_mul_ps(z1, s1);  // z c (exact)
    for (int64_t b = g * G / kBlock; b < (g + 1) * G / kBlock; ++b) {
      __m256i ia[MR][2];
      for (int m = 0; m < MR; ++m) ia[m][0] = ia[m][1] = _mm256_setzero_si256();
      for (int64_t k = b * kBlock; k < (b + 1) * kBlock; k += 4) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(nib + k * 8));
        if (next != nullptr && k % 8 == 0) _mm_prefetch(reinterpret_cast<const char*>(next + k * 8), _MM_HINT_T0);
        const __m256i wa = _mm256_and_si256(v, low4);                         // rows 0-7
        const __m256i wb = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);   // rows 8-15
        for (int m = 0; m < MR; ++m) {
          const __m256i xb = _mm256_set1_epi32(load_quad(xq + m * Kp + k));
#if LANNER_VNNI
          ia[m][0] = LANNER_DPBUSD(ia[m][0], wa, xb);
          ia[m][1] = LANNER_DPBUSD(ia[m][1], wb, xb);
#else
          ia[m][0] = _mm256_add_epi32(ia[m][0], _mm256_madd_epi16(_mm256_maddubs_epi16(wa, xb), ones));
          ia[m][1] = _mm256_add_epi32(ia[m][1], _mm256_madd_epi16(_mm256_maddubs_epi16(wb, xb), ones));
#endif
        }
      }
      for (int m = 0; m < MR; ++m) {
        const __m256 s = _mm256_set1_ps(sx[m * blocks + b]);
        const __m256 zs = _mm256_set1_ps(sx[m * blocks + b] * xsum[m * blocks + b]);
        fa[m][0] = _mm256_fnmadd_ps(c0, zs, _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia[m][0]), _mm256_mul_ps(s0, s), fa[m][0]));
        fa[m][1] = _mm256_fnmadd_ps(c1, zs, _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia[m][1]), _mm256_mul_ps(s1, s), fa[m][1]));
      }
    }
  }
  const __m256 u0 = _mm256_loadu_ps(reinterpret_cast<const float*>(scales));
  const __m256 u1 = _mm256_loadu_ps(reinterpret_cast<const float*>(scales) + 8);
  for (int m = 0; m < MR; ++m) {
    alignas(32) float tmp[kTile];
    float* dst = nvalid == kTile ? out + m * ldo : tmp;
    _mm256_storeu_ps(dst, _mm256_mul_ps(fa[m][0], u0));
    _mm256_storeu_ps(dst + 8, _mm256_mul_ps(fa[m][1], u1));
    if (dst == tmp) std::copy(tmp, tmp + nvalid, out + m * ldo);
  }
}
#else
// Scalar code with the same float operations in the same order (fmaf = one rounding, like the FMAs).
template <int MR>
inline void int8_tile(const int8_t* xq, const float* sx, const float* xsum, int64_t Kp, const int8_t* wt,
                      const float* scale, float* out, int64_t ldo, int64_t nvalid, const int8_t* next) {
  const int64_t blocks = Kp / kBlock;
  for (int m = 0; m < MR; ++m)
    for (int64_t j = 0; j < nvalid; ++j) {
      float acc = 0.f;
      for (int64_t b = 0; b < blocks; ++b) {
        int32_t dot = 0;
        for (int64_t k = b * kBlock; k < (b + 1) * kBlock; ++k)
          dot += static_cast<int32_t>(xq[m * Kp + k]) * wt[(k / 4) * 64 + j * 4 + k % 4];
        acc = std::fmaf(static_cast<float>(dot), sx[m * blocks + b], acc);
      }
      out[m * ldo + j] = acc * scale[j];
    }
}

template <int MR>
inline void int4_tile(const int8_t* xq, const float* sx, const float* xsum, int64_t Kp, int64_t G,
                      const uint8_t* nib, const uint8_t* scales, const uint8_t* zeros, float* out,
                      int64_t ldo, int64_t nvalid, const uint8_t* next) {
  const int64_t blocks = Kp / kBlock;
  float unit[kTile];
  std::memcpy(unit, scales, sizeof unit);
  const uint8_t* codes = scales + kUnitBytes;
  for (int m = 0; m < MR; ++m)
    for (int64_t j = 0; j < nvalid; ++j) {
      float acc = 0.f;
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t g = b * kBlock / G;
        const float s = codes[g * 16 + j];
        const uint8_t zb = zeros[g * 8 + j % 8];
        const float c = static_cast<float>(j < 8 ? zb & 0x0F : zb >> 4) * s;
        int32_t dot = 0;
        for (int64_t k = b * kBlock; k < (b + 1) * kBlock; ++k) {
          const uint8_t byte = nib[(k / 4) * 32 + (j % 8) * 4 + k % 4];
          dot += static_cast<int32_t>(xq[m * Kp + k]) * (j < 8 ? byte & 0x0F : byte >> 4);
        }
        const float sxb = sx[m * blocks + b];
        acc = std::fmaf(-c, sxb * xsum[m * blocks + b], std::fmaf(static_cast<float>(dot), s * sxb, acc));
      }
      out[m * ldo + j] = acc * unit[j];
    }
}
#endif

// Every activation row against tiles [t0, t1): `tile(MR, m, t, ahead)` for row blocks of MR <= 4 (4 rows
// share each loaded weight vector: 16 accumulators, 8 int and 8 float, + 2 weight vectors).  Tiles are the
// outer loop, so a tile (16 x K bytes) is read from memory once and stays in cache for all the row blocks.
// The first row block of a tile also prefetches the next tile (`ahead`): without it, each tile's first
// pass waited for DRAM and only the later passes computed, so a batch of 16 rows streamed the weights at
// half the rate of a single row (the 1.1B shape's 22 layers, int8, M = 16, 2 threads: 117-121 ms per pass over
// all layers without, 90-107 ms with; M = 1 unchanged at ~31 ms).
template <typename Tile>
void all_rows(int64_t M, int64_t t0, int64_t t1, Tile&& tile) {
  constexpr int kMR = 4;
  for (int64_t t = t0; t < t1; ++t) {
    const bool ahead = t + 1 < t1;
    int64_t m = 0;
    for (; m + kMR <= M; m += kMR) tile(std::integral_constant<int, kMR>{}, m, t, ahead && m == 0);
    switch (M - m) {
      case 3: tile(std::integral_constant<int, 3>{}, m, t, ahead && m == 0); break;
      case 2: tile(std::integral_constant<int, 2>{}, m, t, ahead && m == 0); break;
      case 1: tile(std::integral_constant<int, 1>{}, m, t, ahead && m == 0); break;
      default: break;
    }
  }
}

int64_t padded_k(int64_t K) { return (K + kBlock - 1) / kBlock * kBlock; }

void check_activations(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), op,
              ": x must be a contiguous fp32 [M, K] tensor");
}

// What both ops share: the check of n, the activation quantization, and the parallel loop over weight
// tiles and row blocks.  `tile(mr, xq, sx, xsum, t, out, nvalid, ahead)` computes MR rows x tile t (and
// prefetches tile t + 1 when `ahead`).
template <typename Tile>
at::Tensor over_tiles(const char* op, const at::Tensor& x, int64_t Kp, int64_t T, int64_t n, Tile&& tile) {
  TORCH_CHECK(n > (T - 1) * kTile && n <= T * kTile, op, ": n does not match the tiles");
  const int64_t M = x.size(0), blocks = Kp / kBlock;
  at::Tensor y = at::empty({M, n}, x.options());
  if (M == 0) return y;
  const QuantizedRows xr = quantize_rows(x, Kp);
  const int8_t* xq = xr.q.data_ptr<int8_t>();
  const float* sx = xr.sx.data_ptr<float>();
  const float* xs = xr.sum.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    all_rows(M, t0, t1, [&](auto mr, int64_t m, int64_t t, bool ahead) {
      tile(mr, xq + m * Kp, sx + m * blocks, xs + m * blocks, t, yp + m * n + t * kTile,
           std::min<int64_t>(kTile, n - t * kTile), ahead);
    });
  });
  return y;
}

}  // namespace

namespace lanner {

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& wt, const at::Tensor& scales, int64_t n) {
  check_activations("int8_mm", x);
  TORCH_CHECK(wt.dim() == 4 && scales.dim() == 1 && wt.scalar_type() == at::kChar &&
                  scales.scalar_type() == at::kFloat && wt.is_contiguous() && scales.is_contiguous(),
              "int8_mm: wt contiguous int8 [T, Kp/4, 16, 4], scales contiguous fp32 [16 T]");
  const int64_t K = x.size(1), T = wt.size(0), Kp = padded_k(K);
  TORCH_CHECK(wt.size(1) * 4 == Kp && wt.size(2) == kTile && wt.size(3) == 4 && scales.size(0) == T * kTile,
              "int8_mm: shape mismatch");
  const int8_t* wp = wt.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  return over_tiles("int8_mm", x, Kp, T, n, [&](auto mr, const int8_t* xq, const float* sx, const float* xs,
                                                  int64_t t, float* out, int64_t nvalid, bool ahead) {
    const int8_t* tile = wp + t * Kp * kTile;
    int8_tile<decltype(mr)::value>(xq, sx, xs, Kp, tile, sp + t * kTile, out, n, nvalid,
                                   ahead ? tile + Kp * kTile : nullptr);
  });
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& nib, const at::Tensor& scales, const at::Tensor& zeros,
                   int64_t group, int64_t n) {
  check_activations("int4_mm", x);
  TORCH_CHECK(nib.dim() == 4 && scales.dim() == 3 && zeros.dim() == 3 && nib.scalar_type() == at::kByte &&
                  scales.scalar_type() == at::kByte && zeros.scalar_type() == at::kByte &&
                  nib.is_contiguous() && scales.is_contiguous() && zeros.is_contiguous(),
              "int4_mm: nib contiguous uint8 [T, K/4, 8, 4], scales contiguous uint8 [T, 4 + K/G, 16], "
              "zeros contiguous uint8 [T, K/G, 8]");
  const int64_t K = x.size(1), T = nib.size(0);
  TORCH_CHECK(group > 0 && group % kBlock == 0 && K % group == 0,
              "int4_mm: the group size must be a multiple of 32 that divides K");
  const int64_t groups = K / group;
  TORCH_CHECK(nib.size(1) * 4 == K && nib.size(2) == 8 && nib.size(3) == 4 && scales.size(0) == T &&
                  scales.size(1) * kTile == kUnitBytes + groups * kTile && scales.size(2) == kTile &&
                  zeros.size(0) == T &&
                  zeros.size(1) == groups && zeros.size(2) == kTile / 2, "int4_mm: shape mismatch");
  const uint8_t* np = nib.data_ptr<uint8_t>();
  const uint8_t* sp = scales.data_ptr<uint8_t>();
  const uint8_t* zp = zeros.data_ptr<uint8_t>();
  return over_tiles("int4_mm", x, K, T, n, [&](auto mr, const int8_t* xq, const float* sx, const float* xs,
                                               int64_t t, float* out, int64_t nvalid, bool ahead) {
    const uint8_t* tile = np + t * K * 8;
    int4_tile<decltype(mr)::value>(xq, sx, xs, K, group, tile, sp + t * (kUnitBytes + groups * kTile),
                                   zp + t * groups * (kTile / 2), out, n, nvalid, ahead ? tile + K * 8 : nullptr);
  });
}

// Group-wise int4 quantization, app/quant/woq.py's `quantize_int4` (its Python code is the reference and
// the fallback; see there for the grid): per group of `group` weights, the range [min(w, 0), max(w, 0)] is
// shrunk about its middle by each ratio; z = where 0 falls on 16 levels, s = the step that reaches both
// ends from z, rounded to the row's code grid (c * 2^e, c in 1..255, e from the row's widest unclipped
// step); the ratio with the least squared error wins (the first of equal ones).  One pass over each row,
// in cache, instead of ~8 whole-matrix tensor ops per ratio: the 1.1B shape's int4 load spent most of its
// time there.  Float steps as in the Python code; the error sums run in another order, so a near-tie
// between two ratios may go the other way (tests/unit/test_own_kernels.py bounds it).
std::tuple<at::Tensor, at::Tensor, at::Tensor> int4_quantize(const at::Tensor& w, int64_t group,
                                                             const std::vector<double>& ratios) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.is_contiguous(),
              "int4_quantize: w must be a contiguous fp32 [N, K] tensor");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(group > 0 && K % group == 0 && !ratios.empty(), "int4_quantize: the group must divide K");
  TORCH_CHECK(group % 8 == 0, "int4_quantize: the group size must be a multiple of 8");
  const int64_t groups = K / group;
  at::Tensor q = at::empty({N, K}, w.options().dtype(at::kByte));
  at::Tensor scales = at::empty({N, groups}, w.options());
  at::Tensor zeros = at::empty({N, groups}, w.options().dtype(at::kByte));
  const float* wp = w.data_ptr<float>();
  uint8_t* qp = q.data_ptr<uint8_t>();
  float* sp = scales.data_ptr<float>();
  uint8_t* zp = zeros.data_ptr<uint8_t>();
  const std::vector<float> rs(ratios.begin(), ratios.end());
  // round half to even, then clamp to 0..15 (NaN -> 0); min/max so that the loops below vectorize
  const auto level = [](float p) { return std::min(std::max(0.f, std::nearbyint(p)), 15.f); };
  // the unrounded step from zero point z that reaches both ends of [l, h] (l <= 0 <= h), and that z
  const auto reach = [](float l, float h, float& z) {
    z = std::min(std::max(0.f, std::nearbyint(l / std::max(h - l, 1e-12f) * -15.f)), 15.f);
    const float reach_hi = z < 15.f ? h / std::max(15.f - z, 1.f) : 0.f;
    const float reach_lo = z > 0.f ? -l / std::max(z, 1.f) : 0.f;
    return std::max(reach_hi, reach_lo);
  };
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> lohi(2 * groups);
    for (int64_t n = n0; n < n1; ++n) {
      float widest = 0.f, z = 0.f;
      for (int64_t i = 0; i < groups; ++i) {
        const float* g = wp + (n * groups + i) * group;
        float lo = 0.f, hi = 0.f;
        for (int64_t k = 0; k < group; ++k) lo = std::min(lo, g[k]), hi = std::max(hi, g[k]);
        lohi[2 * i] = lo, lohi[2 * i + 1] = hi;
        widest = std::max(widest, reach(lo, hi, z));  // a NaN step (NaN weights) is skipped
      }
      int exponent = 127 + 8;  // an infinite step: the largest unit
      if (std::isfinite(widest)) std::frexp(widest, &exponent);
      const float unit = std::ldexp(1.f, std::min(std::max(exponent - 8, -126), 119));
      for (int64_t i = 0; i < groups; ++i) {
        const float* g = wp + (n * groups + i) * group;
        const float lo = lohi[2 * i], hi = lohi[2 * i + 1];
        const float mid = (lo + hi) / 2.f, half = (hi - lo) / 2.f;
        float best_err = 0.f, best_s = 0.f, best_z = 0.f;
        for (size_t j = 0; j < rs.size(); ++j) {
          const float step = reach(mid - half * rs[j], mid + half * rs[j], z);
          const float sc = std::min(std::max(std::nearbyint(step / unit), 1.f), 255.f) * unit;
          const float inv = 1.f / sc;
          float part[8] = {};  // 8 partial sums in a fixed order: the same on every ISA (no FMA contraction
          for (int64_t k0 = 0; k0 < group; k0 += 8)  // under -std=c++20), and the compiler vectorizes them
            for (int l8 = 0; l8 < 8; ++l8) {
              const float p = g[k0 + l8] * inv + z;
              const float d = level(p) - p;
              part[l8] += d * d;
            }
          const float err =
              (((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]))) * (sc * sc);
          if (j == 0 || err < best_err) best_err = err, best_s = sc, best_z = z;
        }
        const float inv = 1.f / best_s;
        const int64_t at = n * groups + i;
        for (int64_t k = 0; k < group; ++k) qp[at * group + k] = static_cast<uint8_t>(level(g[k] * inv + best_z));
        sp[at] = best_s;
        zp[at] = static_cast<uint8_t>(best_z);
      }
    }
  });
  return {q, scales, zeros};
}

// The integer dot-product code this build uses (for logs, metrics and tests).
std::string isa() {
#if LANNER_VNNI && defined(__AVX512VNNI__)
  return "avx512-vnni";
#elif LANNER_VNNI
  return "avx-vnni";
#elif LANNER_AVX2
  return "avx2";
#else
  return "scalar";
#endif
}

}  // namespace lanner

TORCH_LIBRARY(lanner, m) {
  m.def("int8_mm(Tensor x, Tensor wt, Tensor scales, int n) -> Tensor");
  m.def("int4_mm(Tensor x, Tensor nib, Tensor scales, Tensor zeros, int group, int n) -> Tensor");
  m.def("isa() -> str", &lanner::isa);
  m.def("int4_quantize(Tensor w, int group, float[] ratios) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lanner, CPU, m) {
  m.impl("int8_mm", &lanner::int8_mm);
  m.impl("int4_mm", &lanner::int4_mm);
  m.impl("int4_quantize", &lanner::int4_quantize);
}
