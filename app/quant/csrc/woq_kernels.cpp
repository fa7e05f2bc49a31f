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
// u8 already.  Threads split the tiles with parallel.h's loop (torch's OpenMP pool here).
// The kernels themselves are in woq_core.h (raw pointers: the standalone build of lite.cpp shares them).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "lanner_ops.h"
#include "woq_core.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace lanner {

static void check_activations(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), op,
              ": x must be a contiguous fp32 [M, K] tensor");
}

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& wt, const at::Tensor& scales, int64_t n) {
  check_activations("int8_mm", x);
  TORCH_CHECK(wt.dim() == 4 && scales.dim() == 1 && wt.scalar_type() == at::kChar &&
                  scales.scalar_type() == at::kFloat && wt.is_contiguous() && scales.is_contiguous(),
              "int8_mm: wt contiguous int8 [T, Kp/4, 16, 4], scales contiguous fp32 [16 T]");
  const int64_t M = x.size(0), K = x.size(1), T = wt.size(0), Kp = padded_k(K);
  TORCH_CHECK(wt.size(1) * 4 == Kp && wt.size(2) == kTile && wt.size(3) == 4 && scales.size(0) == T * kTile,
              "int8_mm: shape mismatch");
  TORCH_CHECK(n > (T - 1) * kTile && n <= T * kTile, "int8_mm: n does not match the tiles");
  at::Tensor y = at::empty({M, n}, x.options());
  int8_mm_raw(x.data_ptr<float>(), M, K, wt.data_ptr<int8_t>(), scales.data_ptr<float>(), T, n,
              y.data_ptr<float>());
  return y;
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& nib, const at::Tensor& scales, const at::Tensor& zeros,
                   int64_t group, int64_t n) {
  check_activations("int4_mm", x);
  TORCH_CHECK(nib.dim() == 4 && scales.dim() == 3 && zeros.dim() == 3 && nib.scalar_type() == at::kByte &&
                  scales.scalar_type() == at::kByte && zeros.scalar_type() == at::kByte &&
                  nib.is_contiguous() && scales.is_contiguous() && zeros.is_contiguous(),
              "int4_mm: nib contiguous uint8 [T, K/4, 8, 4], scales contiguous uint8 [T, 4 + K/G, 16], "
              "zeros contiguous uint8 [T, K/G, 8]");
  const int64_t M = x.size(0), K = x.size(1), T = nib.size(0);
  TORCH_CHECK(group > 0 && group % kBlock == 0 && K % group == 0,
              "int4_mm: the group size must be a multiple of 32 that divides K");
  const int64_t groups = K / group;
  TORCH_CHECK(nib.size(1) * 4 == K && nib.size(2) == 8 && nib.size(3) == 4 && scales.size(0) == T &&
                  scales.size(1) * kTile == kUnitBytes + groups * kTile && scales.size(2) == kTile &&
                  zeros.size(0) == T &&
                  zeros.size(1) == groups && zeros.size(2) == kTile / 2, "int4_mm: shape mismatch");
  TORCH_CHECK(n > (T - 1) * kTile && n <= T * kTile, "int4_mm: n does not match the tiles");
  at::Tensor y = at::empty({M, n}, x.options());
  int4_mm_raw(x.data_ptr<float>(), M, K, nib.data_ptr<uint8_t>(), scales.data_ptr<uint8_t>(),
              zeros.data_ptr<uint8_t>(), T, group, n, y.data_ptr<float>());
  return y;
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
  lanner::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
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
std::string isa() { return isa_name(); }

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
