// Lanner's weight-only-quantized matmul kernels on raw pointers, shared by the torch build (woq_kernels.cpp,
// torch.ops.lanner.int8_mm / int4_mm) and the standalone one (lite.cpp, app/lite); woq_kernels.cpp's
// comment describes the tile layouts and the arithmetic.
#pragma once

#include "parallel.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
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

// n elements left uninitialized (a std::vector would zero them): scratch that is written before it is read
template <typename T>
std::unique_ptr<T[]> scratch(int64_t n) {
  return std::make_unique_for_overwrite<T[]>(static_cast<size_t>(n));
}

struct QuantizedRows {
  std::unique_ptr<int8_t[]> q;   // [M, Kp]
  std::unique_ptr<float[]> sx;   // [M, Kp / 32]
  std::unique_ptr<float[]> sum;  // [M, Kp / 32]: sum of the block's xq (exact: |sum| <= 32 * 127)
};

// x fp32 [M, K] (contiguous) quantized per row in blocks of 32, zero-padded to Kp (every element written)
QuantizedRows quantize_rows(const float* xp, int64_t M, int64_t K, int64_t Kp) {
  const int64_t blocks = Kp / kBlock;
  QuantizedRows r{scratch<int8_t>(M * Kp), scratch<float>(M * blocks), scratch<float>(M * blocks)};
  int8_t* qp = r.q.get();
  float* sp = r.sx.get();
  float* cp = r.sum.get();
  lanner::parallel_for(0, M * blocks, 64, [&](int64_t i0, int64_t i1) {
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

// out[m][0..nvalid) = fa[m] * scale[0..16) for the tile's MR rows (a partial last tile through a buffer)
template <int MR>
inline void store_tile(const __m256 (&fa)[MR][2], const float* scale, float* out, int64_t ldo, int64_t nvalid) {
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
  store_tile<MR>(fa, scale, out, ldo, nvalid);
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
  store_tile<MR>(fa, reinterpret_cast<const float*>(scales), out, ldo, nvalid);  // the rows' units
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

// What both ops share: the activation quantization and the parallel loop over weight tiles and row blocks.
// `tile(mr, xq, sx, xsum, t, out, nvalid, ahead)` computes MR rows x tile t (and prefetches tile t + 1
// when `ahead`).  x fp32 [M, K] contiguous -> y fp32 [M, n]; n must fit the T tiles (checked by callers).
template <typename Tile>
void over_tiles(const float* x, int64_t M, int64_t K, int64_t Kp, int64_t T, int64_t n, float* yp, Tile&& tile) {
  if (M == 0) return;
  const int64_t blocks = Kp / kBlock;
  const QuantizedRows xr = quantize_rows(x, M, K, Kp);
  const int8_t* xq = xr.q.get();
  const float* sx = xr.sx.get();
  const float* xs = xr.sum.get();
  lanner::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    all_rows(M, t0, t1, [&](auto mr, int64_t m, int64_t t, bool ahead) {
      tile(mr, xq + m * Kp, sx + m * blocks, xs + m * blocks, t, yp + m * n + t * kTile,
           std::min<int64_t>(kTile, n - t * kTile), ahead);
    });
  });
}

// y [M, n] = x [M, K] times the int8 tiles wt [T, Kp/4, 16, 4] with per-row scales [16 T]
void int8_mm_raw(const float* x, int64_t M, int64_t K, const int8_t* wp, const float* sp, int64_t T, int64_t n,
                 float* y) {
  const int64_t Kp = padded_k(K);
  over_tiles(x, M, K, Kp, T, n, y, [&](auto mr, const int8_t* xq, const float* sx, const float* xs, int64_t t,
                                       float* out, int64_t nvalid, bool ahead) {
    const int8_t* tile = wp + t * Kp * kTile;
    int8_tile<decltype(mr)::value>(xq, sx, xs, Kp, tile, sp + t * kTile, out, n, nvalid,
                                   ahead ? tile + Kp * kTile : nullptr);
  });
}

// y [M, n] = x [M, K] times the int4 tiles (nib [T, K/4, 8, 4], scales [T, 4 + K/G, 16], zeros [T, K/G, 8])
void int4_mm_raw(const float* x, int64_t M, int64_t K, const uint8_t* np, const uint8_t* sp, const uint8_t* zp,
                 int64_t T, int64_t group, int64_t n, float* y) {
  const int64_t groups = K / group;
  over_tiles(x, M, K, K, T, n, y, [&](auto mr, const int8_t* xq, const float* sx, const float* xs, int64_t t,
                                      float* out, int64_t nvalid, bool ahead) {
    const uint8_t* tile = np + t * K * 8;
    int4_tile<decltype(mr)::value>(xq, sx, xs, K, group, tile, sp + t * (kUnitBytes + groups * kTile),
                                   zp + t * groups * (kTile / 2), out, n, nvalid, ahead ? tile + K * 8 : nullptr);
  });
}

// The integer dot-product code this build uses (for logs, metrics and tests).
inline const char* isa_name() {
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

}  // namespace

