// Lanner's C++ ops, callable from each other's translation units (all built into one library by
// app/quant/kernels.py and registered as torch.ops.lanner.*; the comments at their definitions say what they
// compute).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

namespace lanner {

// woq_kernels.cpp
at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& wt, const at::Tensor& scales, int64_t n);
at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& nib, const at::Tensor& scales, const at::Tensor& zeros,
                   int64_t group, int64_t n);
std::tuple<at::Tensor, at::Tensor, at::Tensor> int4_quantize(const at::Tensor& w, int64_t group,
                                                             const std::vector<double>& ratios);
std::string isa();

// decoder_ops.cpp
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
void rope_store(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& kc,
                const at::Tensor& vc, const at::Tensor& slots, const at::Tensor& positions, int64_t nh,
                int64_t nkv);
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
                            const at::Tensor& slots, const at::Tensor& positions, double scale);

}  // namespace lanner
