// Randomized null-space solver on CUDA, batched over same-shape matrices: the two steps of
// loranull_kernels/ops/null_space/torch_backend.py (the contract), whose precision policy and random start stay in
// Python (ops/null_space/__init__.py).
//
// Ridged Cholesky: cuSOLVER's potrfBatched, the routine torch.linalg.cholesky_ex calls on batched CUDA input, so
// both backends factor alike. It reports one info entry per matrix, and a retry is the same call on a shorter array
// of matrix addresses: only the entries that failed are shifted again (tenfold ridge) and refactored. Reading the
// info array back synchronises the stream once per attempt, as the torch backend's check does.
//
// Triangular solves: cuBLAS trsm, a loop of trsm for a few large matrices and trsmBatched otherwise, the rule
// torch.linalg.solve_triangular applies on CUDA (cuBLAS documents trsmBatched as meant for small matrices). QRs:
// cuSOLVER geqrf + orgqr (csrc/cuda_linalg.h, shared with rsvd). The l × l eigh and the two thin products of the
// Ritz step go through ATen. Everything runs on torch's handles, bound to the caller's current stream; no kernels
// of our own.
//
// Layout (csrc/cuda_linalg.h): the row-major lower factor L is, in the column-major view, the upper triangular
// U = Lᵀ, which is what potrf(UPPER) leaves there; L⁻¹ X is trsm(UPPER, T) and L⁻ᵀ X is trsm(UPPER, N). The
// iterates are column-major n × l, stored as (l, n) torch tensors.

#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "nullspace.h"

#include "cuda_linalg.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linalg_eigh.h>
#include <ATen/ops/matmul.h>
#include <c10/cuda/CUDAGuard.h>

#include <cublas_v2.h>
#include <cusolverDn.h>

#include <algorithm>
#include <numeric>
#include <vector>

namespace loranull {
namespace {

// cuSOLVER's batched Cholesky and cuBLAS's triangular solves, overloaded on the element type; `U` is the
// column-major upper factor (ld n), the right-hand sides are column-major n × cols (ld n), solved in place.
cusolverStatus_t potrf_batched(cusolverDnHandle_t h, int n, float** A, int* info, int batch) {
  return cusolverDnSpotrfBatched(h, CUBLAS_FILL_MODE_UPPER, n, A, n, info, batch);
}
cusolverStatus_t potrf_batched(cusolverDnHandle_t h, int n, double** A, int* info, int batch) {
  return cusolverDnDpotrfBatched(h, CUBLAS_FILL_MODE_UPPER, n, A, n, info, batch);
}
cublasStatus_t trsm(cublasHandle_t h, cublasOperation_t op, int n, int cols, const float* U, float* X) {
  const float one = 1.f;
  return cublasStrsm(h, CUBLAS_SIDE_LEFT, CUBLAS_FILL_MODE_UPPER, op, CUBLAS_DIAG_NON_UNIT, n, cols, &one, U, n, X, n);
}
cublasStatus_t trsm(cublasHandle_t h, cublasOperation_t op, int n, int cols, const double* U, double* X) {
  const double one = 1.0;
  return cublasDtrsm(h, CUBLAS_SIDE_LEFT, CUBLAS_FILL_MODE_UPPER, op, CUBLAS_DIAG_NON_UNIT, n, cols, &one, U, n, X, n);
}
cublasStatus_t trsm_batched(cublasHandle_t h, cublasOperation_t op, int n, int cols, float** U, float** X,
                            int batch) {
  const float one = 1.f;
  return cublasStrsmBatched(h, CUBLAS_SIDE_LEFT, CUBLAS_FILL_MODE_UPPER, op, CUBLAS_DIAG_NON_UNIT, n, cols, &one, U,
                            n, X, n, batch);
}
cublasStatus_t trsm_batched(cublasHandle_t h, cublasOperation_t op, int n, int cols, double** U, double** X,
                            int batch) {
  const double one = 1.0;
  return cublasDtrsmBatched(h, CUBLAS_SIDE_LEFT, CUBLAS_FILL_MODE_UPPER, op, CUBLAS_DIAG_NON_UNIT, n, cols, &one, U,
                            n, X, n, batch);
}

void check_working_dtype(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

// The device array of the addresses of matrices `todo` of the contiguous batch at `base`.
template <typename T>
at::Tensor addresses_of(T* base, int64_t stride, const std::vector<int64_t>& todo, const at::Device& device) {
  at::Tensor index = at::empty({static_cast<int64_t>(todo.size())}, at::kLong);
  std::copy(todo.begin(), todo.end(), index.data_ptr<int64_t>());
  return matrix_addresses(base, stride, index.to(at::TensorOptions().device(device).dtype(at::kLong)));
}

// L_b = chol(A_b + δ_b I) for every b, raising δ_b tenfold (ridge, in place) while entry b fails, at most
// `retries` times. True when every entry factored.
template <typename T>
bool ridged_cholesky(const at::Tensor& A, at::Tensor& L, std::vector<double>& ridge, int64_t retries) {
  cusolverDnHandle_t solver = at::cuda::getCurrentCUDASolverDnHandle();
  const int64_t B = A.size(0), n = A.size(1);
  at::Tensor info = at::empty({B}, A.options().dtype(at::kInt));
  std::vector<int64_t> todo(B);
  std::iota(todo.begin(), todo.end(), 0);
  for (int64_t attempt = 0; attempt <= retries && !todo.empty(); ++attempt) {
    for (int64_t b : todo) {
      at::Tensor Lb = L.select(0, b);
      Lb.copy_(A.select(0, b));
      // The ridge rounded to A's dtype first, as the torch backend shifts: the same shifted matrix.
      Lb.diagonal().add_(static_cast<double>(static_cast<T>(ridge[b])));
    }
    at::Tensor factors = addresses_of(L.data_ptr<T>(), n * n, todo, L.device());
    const int count = as_int(static_cast<int64_t>(todo.size()), "batch");
    TORCH_CUSOLVER_CHECK(
        potrf_batched(solver, as_int(n, "n"), as_pointer_array<T>(factors), info.data_ptr<int>(), count));
    const at::Tensor status = info.narrow(0, 0, count).cpu();  // synchronises: the retry depends on it
    std::vector<int64_t> failed;
    for (int i = 0; i < count; ++i) {
      if (status.data_ptr<int>()[i] != 0) failed.push_back(todo[i]);
    }
    for (int64_t b : failed) ridge[b] *= 10;
    todo = std::move(failed);
  }
  return todo.empty();
}

// X ← L⁻¹ X and X ← L⁻ᵀ X for the batch of column-major n × cols right-hand sides at X (n · cols apart).
template <typename T>
class CholeskySolves {
 public:
  CholeskySolves(cublasHandle_t h, const at::Tensor& L, int64_t cols)
      : h_(h), L_(L), batch_(L.size(0)), n_(L.size(1)), cols_(cols), looped_(batch_ <= 8 && n_ >= 64) {
    if (!looped_) {
      index_ = at::arange(batch_, L.options().dtype(at::kLong));
      factors_ = matrix_addresses(L.data_ptr<T>(), n_ * n_, index_);
    }
  }

  void lower(T* X) { solve(CUBLAS_OP_T, X); }
  void lower_transposed(T* X) { solve(CUBLAS_OP_N, X); }

 private:
  void solve(cublasOperation_t op, T* X) {
    const int n = as_int(n_, "n"), cols = as_int(cols_, "l");
    if (looped_) {
      for (int64_t b = 0; b < batch_; ++b) {
        TORCH_CUDABLAS_CHECK(trsm(h_, op, n, cols, L_.data_ptr<T>() + b * n_ * n_, X + b * n_ * cols_));
      }
      return;
    }
    // Freed at return while trsmBatched may still read it: safe, the caching allocator hands the block out again
    // only to work ordered after it on this stream.
    at::Tensor rhs = matrix_addresses(X, n_ * cols_, index_);
    TORCH_CUDABLAS_CHECK(trsm_batched(h_, op, n, cols, as_pointer_array<T>(factors_), as_pointer_array<T>(rhs),
                                      as_int(batch_, "batch")));
  }

  cublasHandle_t h_;
  at::Tensor L_;
  int64_t batch_, n_, cols_;
  bool looped_;
  at::Tensor index_, factors_;
};

template <typename T>
std::tuple<at::Tensor, at::Tensor> subspace_ritz(const at::Tensor& L, const at::Tensor& start, int64_t k,
                                                 int64_t n_iter) {
  const int64_t B = L.size(0), n = L.size(1), l = start.size(2);
  cublasHandle_t blas = at::cuda::getCurrentCUDABlasHandle();            // bound to the current stream
  cusolverDnHandle_t solver = at::cuda::getCurrentCUDASolverDnHandle();  // bound to the current stream
  HostPointerMode pointer_mode(blas);
  CholeskySolves<T> solves(blas, L, l);

  // A fresh copy even when no cast is needed (l = 1 makes the transposed view contiguous): start is not ours.
  at::Tensor Yt = start.transpose(1, 2).clone(at::MemoryFormat::Contiguous).to(L.scalar_type());
  T* Y = Yt.data_ptr<T>();
  Householder<T> qr(solver, L, B, l, {{Y, n}});
  qr.orthonormalize(Y, n, n * l, B);
  for (int64_t i = 0; i < n_iter; ++i) {
    solves.lower(Y);
    solves.lower_transposed(Y);
    qr.orthonormalize(Y, n, n * l, B);
  }
  // The returned basis, orthonormal to float64 precision. For T = double this is Yt itself, no longer needed.
  at::Tensor Qt = Yt.to(at::kDouble);
  double* Q = Qt.data_ptr<double>();
  Householder<double> qr64(solver, L, B, l, {{Q, n}});
  qr64.orthonormalize(Q, n, n * l, B);
  // Rayleigh–Ritz on (C + δI)⁻¹ (why: the torch backend): with W = L⁻¹Q, Qᵀ(C + δI)⁻¹Q = WᵀW.
  at::Tensor Wt = Qt.to(L.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
  solves.lower(Wt.data_ptr<T>());
  const at::Tensor W64 = Wt.to(at::kDouble);  // (B, l, n): Wᵀ
  auto eig = at::linalg_eigh(at::matmul(W64, W64.transpose(1, 2)));  // ascending θ: the last are C's smallest
  at::Tensor theta = std::get<0>(eig).narrow(1, l - k, k).flip({1});
  at::Tensor V = std::get<1>(eig).narrow(2, l - k, k).flip({2});
  return {theta.contiguous(), at::matmul(Qt.transpose(1, 2), V).contiguous()};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, bool> nullspace_cholesky_cuda(const at::Tensor& A, const at::Tensor& delta,
                                                                 int64_t retries) {
  check_working_dtype(A, "nullspace_cholesky", "A");
  check_operand(A, "nullspace_cholesky", "A", A, A.scalar_type());
  const int64_t B = A.size(0);
  TORCH_CHECK(A.size(1) == A.size(2), "nullspace_cholesky: A must be (B, n, n), got ", A.sizes());
  TORCH_CHECK(delta.dim() == 1 && delta.size(0) == B && delta.scalar_type() == at::kDouble,
              "nullspace_cholesky: delta must be (", B, ",) float64, got ", delta.sizes(), " ", delta.scalar_type());
  TORCH_CHECK(retries >= 0, "nullspace_cholesky: retries must be >= 0, got ", retries);
  c10::cuda::CUDAGuard device_guard(A.device());

  const at::Tensor first = delta.cpu().contiguous();
  std::vector<double> ridge(first.data_ptr<double>(), first.data_ptr<double>() + B);
  at::Tensor L = at::empty(A.sizes(), A.options());
  bool ok = false;
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "nullspace_cholesky",
                             [&] { ok = ridged_cholesky<scalar_t>(A, L, ridge, retries); });
  if (ok) L.tril_();  // zeros above the factor, as torch.linalg.cholesky_ex returns it
  at::Tensor used = at::empty({B}, at::kDouble);
  std::copy(ridge.begin(), ridge.end(), used.data_ptr<double>());
  return {L, used.to(delta.options()), ok};
}

std::tuple<at::Tensor, at::Tensor> nullspace_ritz_cuda(const at::Tensor& L, const at::Tensor& start, int64_t k,
                                                       int64_t n_iter) {
  check_working_dtype(L, "nullspace_ritz", "L");
  check_operand(L, "nullspace_ritz", "L", L, L.scalar_type());
  check_operand(start, "nullspace_ritz", "start", L, at::kDouble);
  const int64_t B = L.size(0), n = L.size(1), l = start.size(2);
  TORCH_CHECK(L.size(2) == n, "nullspace_ritz: L must be (B, n, n), got ", L.sizes());
  TORCH_CHECK(start.size(0) == B && start.size(1) == n, "nullspace_ritz: start must be (", B, ", ", n,
              ", l), got ", start.sizes());
  TORCH_CHECK(1 <= k && k <= l && l < n, "nullspace_ritz: need 1 <= k (", k, ") <= l (", l, ") < n (", n, ")");
  TORCH_CHECK(n_iter >= 0, "nullspace_ritz: n_iter must be >= 0, got ", n_iter);
  c10::cuda::CUDAGuard device_guard(L.device());
  if (B == 0) return {at::empty({0, k}, start.options()), at::empty({0, n, k}, start.options())};

  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(L.scalar_type(), "nullspace_ritz",
                             [&] { out = subspace_ritz<scalar_t>(L, start, k, n_iter); });
  return out;
}

}  // namespace loranull
