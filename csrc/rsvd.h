// Randomized SVD (Halko–Martinsson–Tropp) on CUDA: declarations shared by the bindings and the implementation.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace loranull {

// U (B, m, rank), S (B, rank), Vh (B, rank, n), float32, of M (I − QQᵀ) for each of the B matrices.
//   M:           (B, m, n) float32, contiguous, CUDA.
//   omega:       (B, l, n) float32, contiguous: the Gaussian test matrix, read as a column-major n × l matrix
//                (drawn by the caller, so results are reproducible from a seed and match the PyTorch path).
//   project_out: (1 or B, n, k) float32, contiguous, orthonormal columns; or None / undefined for no projection.
//   rank ≤ l ≤ min(m, n); n_iter ≥ 0 power iterations, each re-orthonormalised by Householder QR.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rsvd_cuda(const at::Tensor& M, const at::Tensor& omega,
                                                         const std::optional<at::Tensor>& project_out,
                                                         int64_t rank, int64_t n_iter);

}  // namespace loranull
