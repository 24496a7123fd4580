// Randomized null-space solver on CUDA (the two backend steps of loranull_kernels/ops/null_space/): declarations
// shared by the bindings and the implementation. The contract is that of ops/null_space/torch_backend.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace loranull {

// (L, delta, ok): lower Cholesky factors L (B, n, n) of A_b + δ_b I, each δ_b raised tenfold (at most `retries`
// times) until entry b factors; only the entries that failed are factored again.
//   A:     (B, n, n) float32 or float64, contiguous, CUDA; only its lower triangle is read; not modified.
//   delta: (B,) float64, the first ridges. Returned: the ridges used (for a failed entry, ten times the last tried).
//   ok:    false when some entry did not factor within `retries` raises (L is then not a factor).
std::tuple<at::Tensor, at::Tensor, bool> nullspace_cholesky_cuda(const at::Tensor& A, const at::Tensor& delta,
                                                                 int64_t retries);

// (theta, vectors): subspace iteration on (L Lᵀ)⁻¹ from `start`, then Rayleigh–Ritz in the last subspace.
//   L:      (B, n, n) lower triangular (the strict upper triangle is not read), float32 or float64: the working
//           dtype of the iteration. start: (B, n, l) float64, contiguous, k ≤ l < n. n_iter ≥ 0 solve-and-QR steps.
//   theta:  (B, k) float64, the k largest Ritz values of (L Lᵀ)⁻¹, descending; vectors: (B, n, k) float64, theirs.
std::tuple<at::Tensor, at::Tensor> nullspace_ritz_cuda(const at::Tensor& L, const at::Tensor& start, int64_t k,
                                                       int64_t n_iter);

}  // namespace loranull
