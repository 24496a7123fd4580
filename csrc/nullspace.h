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

// (theta, vectors, blocks): block Krylov iteration on (L Lᵀ)⁻¹ from `start`, with Rayleigh–Ritz after every block
// and the convergence test of ops/null_space/torch_backend.py's krylov_ritz (the contract).
//   L:          (B, n, n) lower triangular (the strict upper triangle is not read), float32 or float64, contiguous,
//               CUDA: the working dtype of the solves, the basis and its Gram matrices.
//   start:      (B, n, b) in L's dtype, contiguous, on L's device (the Gaussian start); not modified. 1 ≤ k ≤ b < n.
//   max_blocks: at most this many blocks of b columns (and at most ⌈n / b⌉; a last block that would overflow n is
//               cut to the n − width dimensions left; values < 1 count as 1).
//   tol:        ≥ 0; > 0 stops after block q ≥ 2 when Σ 1/θ over the top k fell by at most tol (relative) since
//               block q − 1 for every matrix of the batch; 0 runs all blocks.
//   theta:      (B, k) float64, the k largest Ritz values of (L Lᵀ)⁻¹, descending; vectors: (B, n, k) float64,
//               theirs, orthonormal to float64 precision; blocks: the number of blocks used.
std::tuple<at::Tensor, at::Tensor, int64_t> nullspace_krylov_cuda(const at::Tensor& L, const at::Tensor& start,
                                                                  int64_t k, int64_t max_blocks, double tol);

}  // namespace loranull
