// Batched randomized SVD of M (I − QQᵀ) on CUDA: Halko, Martinsson & Tropp (2011), Algorithms 4.4 and 5.1.
//
// The same steps as loranull_kernels/ops/rsvd/torch_backend.py. The products with M (the whole cost for large matrices)
// are strided-batched cuBLAS GEMMs and the re-orthonormalisations are cuSOLVER Householder QRs (geqrf + orgqr),
// both on torch's per-stream handles, so everything runs on the caller's current stream with torch's cuBLAS
// workspace and TF32 setting. The projection is applied as X ↦ X − Q(QᵀX) (two thin GEMMs), never formed.
//
// Layout (csrc/cuda_linalg.h): a row-major torch tensor of shape (r, c) is the column-major c × r matrix cuBLAS
// sees. Working matrices are kept column-major (stored as torch tensors of shape (l, rows)) because that is what
// cuSOLVER's QR takes; M itself is read in place as the column-major Mᵀ.
//
// No kernels of our own: every step is a library call (cuBLAS / cuSOLVER) or, for the l × l tail, an ATen op.

#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "rsvd.h"

#include "cuda_linalg.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linalg_svd.h>
#include <ATen/ops/matmul.h>
#include <c10/cuda/CUDAGuard.h>

#include <cublas_v2.h>
#include <cusolverDn.h>

#include <algorithm>

namespace loranull {
namespace {

// C_b = alpha · op(A_b) · op(B_b) + beta · C_b for b < batch; column-major, op(A) rows × inner, op(B) inner × cols.
void gemm(cublasHandle_t h, bool trans_a, bool trans_b, int64_t rows, int64_t cols, int64_t inner, float alpha,
          const float* A, int64_t lda, int64_t stride_a, const float* B, int64_t ldb, int64_t stride_b, float beta,
          float* C, int64_t ldc, int64_t stride_c, int64_t batch) {
  TORCH_CUDABLAS_CHECK(cublasSgemmStridedBatched(
      h, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, as_int(rows, "rows"),
      as_int(cols, "cols"), as_int(inner, "inner"), &alpha, A, as_int(lda, "lda"), stride_a, B, as_int(ldb, "ldb"),
      stride_b, &beta, C, as_int(ldc, "ldc"), stride_c, as_int(batch, "batch")));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> rsvd_cuda(const at::Tensor& M, const at::Tensor& omega,
                                                         const std::optional<at::Tensor>& project_out,
                                                         int64_t rank, int64_t n_iter) {
  check_operand(M, "rsvd", "M", M, at::kFloat);
  check_operand(omega, "rsvd", "omega", M, at::kFloat);
  const int64_t B = M.size(0), m = M.size(1), n = M.size(2);
  const int64_t l = omega.size(1);
  TORCH_CHECK(omega.size(0) == B && omega.size(2) == n, "rsvd: omega must be (", B, ", l, ", n, "), got ",
              omega.sizes());
  TORCH_CHECK(1 <= rank && rank <= l && l <= std::min(m, n), "rsvd: need 1 <= rank (", rank, ") <= l (", l,
              ") <= min(m, n) (", std::min(m, n), ")");
  TORCH_CHECK(n_iter >= 0, "rsvd: n_iter must be >= 0, got ", n_iter);
  const float* Q = nullptr;
  int64_t k = 0, stride_q = 0;
  if (project_out.has_value() && project_out->defined()) {
    check_operand(*project_out, "rsvd", "project_out", M, at::kFloat);
    TORCH_CHECK((project_out->size(0) == 1 || project_out->size(0) == B) && project_out->size(1) == n,
                "rsvd: project_out must be (1 or ", B, ", ", n, ", k), got ", project_out->sizes());
    Q = project_out->data_ptr<float>();
    k = project_out->size(2);
    stride_q = project_out->size(0) == 1 ? 0 : n * k;  // stride 0: one Q shared by the whole batch
  }

  c10::cuda::CUDAGuard device_guard(M.device());
  cublasHandle_t blas = at::cuda::getCurrentCUDABlasHandle();      // bound to the current stream
  cusolverDnHandle_t solver = at::cuda::getCurrentCUDASolverDnHandle();  // bound to the current stream
  HostPointerMode pointer_mode(blas);

  const float* Mp = M.data_ptr<float>();
  at::Tensor Yt = at::empty({B, l, m}, M.options());  // column-major m × l: the range basis
  at::Tensor Zt = omega.clone();                      // column-major n × l: Ω, then the co-range iterates
  at::Tensor Wt = k > 0 ? at::empty({B, l, k}, M.options()) : at::Tensor();
  float* Y = Yt.data_ptr<float>();
  float* Z = Zt.data_ptr<float>();
  Householder<float> qr(solver, M, B, l, {{Y, m}, {Z, n}});

  // X ← (I − QQᵀ) X for the column-major n × l matrices X. Q's storage is the column-major k × n matrix Qᵀ.
  auto project = [&](float* X) {
    if (k == 0) return;
    float* W = Wt.data_ptr<float>();
    gemm(blas, false, false, k, l, n, 1.f, Q, k, stride_q, X, n, n * l, 0.f, W, k, k * l, B);   // W = Qᵀ X
    gemm(blas, true, false, n, l, k, -1.f, Q, k, stride_q, W, k, k * l, 1.f, X, n, n * l, B);   // X −= Q W
  };
  // Y = A Z = M (P Z). M's storage is the column-major n × m matrix Mᵀ, hence op T.
  auto apply_a = [&]() {
    project(Z);
    gemm(blas, true, false, m, l, n, 1.f, Mp, n, m * n, Z, n, n * l, 0.f, Y, m, m * l, B);
  };
  // Z = Aᵀ Y = P (Mᵀ Y).
  auto apply_at = [&]() {
    gemm(blas, false, false, n, l, m, 1.f, Mp, n, m * n, Y, m, m * l, 0.f, Z, n, n * l, B);
    project(Z);
  };

  apply_a();
  qr.orthonormalize(Y, m, m * l, B);
  for (int64_t i = 0; i < n_iter; ++i) {
    apply_at();
    qr.orthonormalize(Z, n, n * l, B);
    apply_a();
    qr.orthonormalize(Y, m, m * l, B);
  }
  // Yᵀ A = Zᵀ with Z = Aᵀ Y. Z = Q_Z R, so Yᵀ A = Rᵀ Q_Zᵀ and only the l × l matrix Rᵀ needs an SVD.
  apply_at();
  qr.factor(Z, n, n * l, B);
  // R is the upper triangle of the top l × l block of column-major Z; in Zt's row-major view that block is
  // transposed, so its lower triangle is Rᵀ.
  at::Tensor Rt = Zt.narrow(2, 0, l).tril();
  qr.form_q(Z, n, n * l, B);  // Zt now holds Q_Zᵀ (l × n, row-major)

  // The l × l tail goes through ATen: linalg_svd already picks between cuSOLVER's batched Jacobi and gesvd by size
  // and checks convergence, and at::matmul takes its LAPACK-strided factors as they come. Together these cost
  // O(B·l²·(m + n)), a fraction l/min(m, n) of one product with M.
  auto [Ub, S, Vbh] = at::linalg_svd(Rt, /*full_matrices=*/false);
  at::Tensor U = at::matmul(Yt.transpose(1, 2), Ub.narrow(2, 0, rank));  // (B, m, rank)
  at::Tensor Vh = at::matmul(Vbh.narrow(1, 0, rank), Zt);               // (B, rank, n)
  return {U.contiguous(), S.narrow(1, 0, rank).contiguous(), Vh.contiguous()};
}

}  // namespace loranull
