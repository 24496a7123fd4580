// Randomized null-space solver on CUDA, batched over same-shape matrices: the two steps of
// loranull_kernels/ops/null_space/torch_backend.py (the contract), whose precision policy and random start stay in
// Python (ops/null_space/__init__.py).
//
// Ridged Cholesky: cuSOLVER's potrfBatched, the routine torch.linalg.cholesky_ex calls on batched CUDA input, so
// both backends factor alike. It reports one info entry per matrix, and a retry is the same call on a shorter array
// of matrix addresses: only the entries that failed are shifted again (tenfold ridge) and refactored. Reading the
// info array back synchronises the stream once per attempt, as the torch backend's check does.
//
// Block Krylov with a Rayleigh–Ritz test after each block (krylov_ritz): the torch backend's steps in its order.
// Triangular solves: cuBLAS trsm, a loop of trsm for a few large matrices and trsmBatched otherwise, the rule
// torch.linalg.solve_triangular applies on CUDA (cuBLAS documents trsmBatched as meant for small matrices). QRs:
// cuSOLVER geqrf + orgqr (csrc/cuda_linalg.h, shared with rsvd). The Gram–Schmidt products, the Gram matrices
// KᵀK and WᵀW, the small (width × width) Ritz problems and the final Cholesky–QR go through ATen. Everything runs
// on torch's handles, bound to the caller's current stream; no kernels of our own. The Ritz test reads a flag back
// (the stopping decision, and whether the Gram matrix factored), so each test synchronises the stream, as the torch
// backend's does.
//
// Layout (csrc/cuda_linalg.h): the row-major lower factor L is, in the column-major view, the upper triangular
// U = Lᵀ, which is what potrf(UPPER) leaves there; L⁻¹ X is trsm(UPPER, T) and L⁻ᵀ X is trsm(UPPER, N). The
// iterates (Y, the blocks Q_i of K, and W_i = L⁻¹Q_i) are column-major n × c, stored as (B, c, n) torch tensors,
// i.e. transposed in torch's row-major view, so trsm and geqrf/orgqr work on them in place. The ATen products keep
// that layout by writing the transposes out: KᵀY is Kt Ytᵀ, Y − K(KᵀY) is Yt − (Yt Ktᵀ) Kt, QᵢᵀQⱼ is Qᵢt Qⱼtᵀ.
// What is returned is ordinary row-major: theta (B, k), vectors (B, n, k) = Σᵢ Qᵢtᵀ Vᵢ.

#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "nullspace.h"

#include "cuda_linalg.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/eye.h>
#include <ATen/ops/linalg_cholesky.h>
#include <ATen/ops/linalg_cholesky_ex.h>
#include <ATen/ops/linalg_eigh.h>
#include <ATen/ops/linalg_eigvalsh.h>
#include <ATen/ops/linalg_solve_triangular.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>

#include <cublas_v2.h>
#include <cusolverDn.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <tuple>
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

// The Gram matrix of [*blocks, fresh] from S, that of `blocks` (undefined when empty): only the products with the
// new block. Blocks are stored transposed, (B, c, n), so Xᵀ Y is Xt Ytᵀ. Appends `fresh` to `blocks`.
at::Tensor grow(const at::Tensor& S, std::vector<at::Tensor>& blocks, const at::Tensor& fresh) {
  at::Tensor corner = at::matmul(fresh, fresh.mT());
  if (S.defined()) {
    std::vector<at::Tensor> rows;
    rows.reserve(blocks.size());
    for (const at::Tensor& X : blocks) rows.push_back(at::matmul(X, fresh.mT()));
    const at::Tensor cross = at::cat(rows, 1);
    corner = at::cat({at::cat({S, cross}, 2), at::cat({cross.mT(), corner}, 2)}, 1);
  }
  blocks.push_back(fresh);
  return corner;
}

// Rayleigh–Ritz in a basis K with Gram matrix G = KᵀK (≈ I) and M = Kᵀ(C + δI)⁻¹K, both (B, w, w) in the working
// dtype (why not float64: the torch backend's krylov_ritz): the generalized problem M v = θ G v, so a basis
// orthonormal only to the working precision loses nothing more. (θ ascending, V with VᵀGV = I, undefined unless
// `vectors`). Reading the Cholesky info back synchronises the stream,
// as the torch backend's check does.
std::tuple<at::Tensor, at::Tensor> ritz(const at::Tensor& G, const at::Tensor& M, bool vectors) {
  const int64_t w = G.size(-1);
  auto [R, info] = at::linalg_cholesky_ex(G);
  at::Tensor T;
  if (info.ne(0).any().item<bool>()) {  // a degenerate basis (an exhausted Krylov space): drop its null directions
    auto [s, U] = at::linalg_eigh(G);
    const at::Tensor keep = s.gt(s.narrow(-1, w - 1, 1).mul(1e-10));
    const double tiny = G.scalar_type() == at::kFloat ? std::numeric_limits<float>::min()
                                                      : std::numeric_limits<double>::min();
    const at::Tensor scale = at::where(keep, s.clamp_min(tiny).rsqrt(), at::zeros_like(s));
    T = U.mul(scale.unsqueeze(-2));
  } else {
    T = at::linalg_solve_triangular(R.mT(), at::eye(w, G.options()), /*upper=*/true);  // R⁻ᵀ: TᵀGT = I
  }
  at::Tensor P = at::matmul(at::matmul(T.mT(), M), T);
  P = P.add(P.mT()).div(2);
  if (!vectors) return {at::linalg_eigvalsh(P), at::Tensor()};
  auto [theta, V] = at::linalg_eigh(P);
  return {theta, at::matmul(T, V)};
}

// Block Krylov on (L Lᵀ)⁻¹ with Rayleigh–Ritz after every block (why each step: the torch backend's krylov_ritz).
// Every block is a transposed (B, c, n) tensor, the column-major n × c matrix the trsm and Householder calls work on
// in place; the Gram–Schmidt and Gram products are ATen matmuls of the same tensors with the transposes written out.
template <typename T>
std::tuple<at::Tensor, at::Tensor, int64_t> krylov_ritz(const at::Tensor& L, const at::Tensor& start, int64_t k,
                                                        int64_t max_blocks, double tol) {
  const int64_t B = L.size(0), n = L.size(1), b = start.size(2);
  max_blocks = std::max<int64_t>(1, std::min(max_blocks, (n + b - 1) / b));
  cublasHandle_t blas = at::cuda::getCurrentCUDABlasHandle();            // bound to the current stream
  cusolverDnHandle_t solver = at::cuda::getCurrentCUDASolverDnHandle();  // bound to the current stream
  HostPointerMode pointer_mode(blas);

  // A fresh copy even when start is already in this layout (b = 1 makes the transposed view contiguous): start is
  // not ours to solve in place.
  at::Tensor Yt = start.transpose(1, 2).clone(at::MemoryFormat::Contiguous);  // (B, b, n): Yᵀ
  {
    CholeskySolves<T> solves(blas, L, b);
    solves.lower(Yt.data_ptr<T>());
    solves.lower_transposed(Yt.data_ptr<T>());
  }
  // The library's Householder QR rather than at::linalg_qr: it works in place on the column-major n × b block the
  // solves leave, with one workspace for every block and no info read back, where linalg_qr would copy the block
  // into its own column-major buffer and out again on each call. Its Q is n × b like linalg_qr's reduced one.
  Householder<T> qr(solver, L, B, b, {{Yt.data_ptr<T>(), n}});
  std::vector<at::Tensor> blocks;  // the basis K, (B, c, n) each, working dtype
  std::vector<at::Tensor> solved;  // W = L⁻¹K, block by block, same layout
  at::Tensor G, M, theta, V, previous;
  int64_t width = 0;  // the basis size so far
  int64_t q = 1;
  for (; q <= max_blocks; ++q) {
    if (!blocks.empty()) {
      const at::Tensor Kt = at::cat(blocks, 1);
      // Y − K(KᵀY) transposed: Yt − (Yt Kᵀ) Kt, classical Gram–Schmidt twice.
      for (int pass = 0; pass < 2; ++pass) Yt = at::baddbmm(Yt, at::matmul(Yt, Kt.mT()), Kt, 1, -1);
    }
    qr.orthonormalize(Yt.data_ptr<T>(), n, n * b, B);
    // A last block that would overflow n keeps its first n − width columns: the basis then spans the whole space.
    // Only ever the last (max_blocks ≤ ⌈n / b⌉), so every block the Householder QR sees is n × b.
    const int64_t cols = std::min(b, n - width);
    const at::Tensor Qt = cols == b ? Yt : Yt.narrow(1, 0, cols).contiguous();
    width += cols;
    at::Tensor Zt = Qt.clone();
    CholeskySolves<T> solves(blas, L, cols);
    solves.lower(Zt.data_ptr<T>());
    G = grow(G, blocks, Qt);
    M = grow(M, solved, Zt);
    const bool last = q == max_blocks;
    if (tol > 0 && !last) {
      // From the second block on with the vectors: when the test stops the iteration they are the answer.
      std::tie(theta, V) = ritz(G, M, /*vectors=*/q >= 2);
      const at::Tensor energy = theta.narrow(-1, width - k, k).to(at::kDouble).reciprocal().sum(-1);
      if (previous.defined() && previous.sub(energy).le(energy.mul(tol)).all().item<bool>()) break;
      previous = energy;
    } else {
      V = at::Tensor();
    }
    if (!last) {
      Yt = Zt.clone();  // Zt stays in `solved` for the later blocks' M
      solves.lower_transposed(Yt.data_ptr<T>());
    }
  }
  if (q > max_blocks) q = max_blocks;  // the loop ran out rather than stopping at the test
  if (!V.defined()) std::tie(theta, V) = ritz(G, M, /*vectors=*/true);
  const at::Tensor top = V.narrow(-1, width - k, k).flip({-1});  // (B, width, k), working dtype
  // K V block by block, without concatenating K (n × width) once more.
  at::Tensor vectors;
  int64_t offset = 0;
  for (const at::Tensor& X : blocks) {
    const at::Tensor part = at::matmul(X.mT(), top.narrow(1, offset, X.size(1)));  // (B, n, k)
    vectors = vectors.defined() ? vectors.add(part) : part;
    offset += X.size(1);
  }
  vectors = vectors.to(at::kDouble);
  // ≈ I: one Cholesky–QR pass makes the vectors orthonormal to float64 precision.
  const at::Tensor R = at::linalg_cholesky(at::matmul(vectors.mT(), vectors), /*upper=*/true);
  vectors = at::linalg_solve_triangular(R, vectors, /*upper=*/true, /*left=*/false);
  return {theta.narrow(-1, width - k, k).flip({-1}).to(at::kDouble).contiguous(), vectors.contiguous(), q};
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

std::tuple<at::Tensor, at::Tensor, int64_t> nullspace_krylov_cuda(const at::Tensor& L, const at::Tensor& start,
                                                                  int64_t k, int64_t max_blocks, double tol) {
  check_working_dtype(L, "nullspace_krylov", "L");
  check_operand(L, "nullspace_krylov", "L", L, L.scalar_type());
  check_operand(start, "nullspace_krylov", "start", L, L.scalar_type());
  const int64_t B = L.size(0), n = L.size(1), b = start.size(2);
  TORCH_CHECK(L.size(2) == n, "nullspace_krylov: L must be (B, n, n), got ", L.sizes());
  TORCH_CHECK(start.size(0) == B && start.size(1) == n, "nullspace_krylov: start must be (", B, ", ", n,
              ", b), got ", start.sizes());
  TORCH_CHECK(1 <= k && k <= b && b < n, "nullspace_krylov: need 1 <= k (", k, ") <= b (", b, ") < n (", n, ")");
  TORCH_CHECK(tol >= 0, "nullspace_krylov: tol must be >= 0, got ", tol);  // false for NaN too
  c10::cuda::CUDAGuard device_guard(L.device());
  const auto float64 = start.options().dtype(at::kDouble);
  if (B == 0) {
    // What the torch backend returns on an empty batch: its test holds vacuously ("every entry converged") at the
    // first block that has a previous estimate, block 2, unless tol = 0 or the cap comes first.
    max_blocks = std::max<int64_t>(1, std::min(max_blocks, (n + b - 1) / b));
    const int64_t used = tol > 0 ? std::min<int64_t>(2, max_blocks) : max_blocks;
    return {at::empty({0, k}, float64), at::empty({0, n, k}, float64), used};
  }

  std::tuple<at::Tensor, at::Tensor, int64_t> out;
  AT_DISPATCH_FLOATING_TYPES(L.scalar_type(), "nullspace_krylov",
                             [&] { out = krylov_ritz<scalar_t>(L, start, k, max_blocks, tol); });
  return out;
}

}  // namespace loranull
