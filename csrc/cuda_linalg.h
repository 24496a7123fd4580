// Helpers shared by the extension's ops (rsvd_cuda.cu, nullspace_cuda.cu): checks, the 32-bit cuBLAS / cuSOLVER
// size guard, host scalars on torch's shared cuBLAS handle, device arrays of matrix addresses for the batched
// library calls, and the Householder QR both ops orthonormalise with, for float and double.
//
// Layout convention of both ops: a row-major torch tensor of shape (r, c) is the column-major c × r matrix that
// cuBLAS and cuSOLVER see.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>

#include <cublas_v2.h>
#include <cusolverDn.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <utility>

namespace loranull {

// Scalars (alpha, beta) are passed from the host; torch's handle is shared, so restore whatever mode it had.
class HostPointerMode {
 public:
  explicit HostPointerMode(cublasHandle_t handle) : handle_(handle) {
    TORCH_CUDABLAS_CHECK(cublasGetPointerMode(handle_, &previous_));
    TORCH_CUDABLAS_CHECK(cublasSetPointerMode(handle_, CUBLAS_POINTER_MODE_HOST));
  }
  ~HostPointerMode() { cublasSetPointerMode(handle_, previous_); }
  HostPointerMode(const HostPointerMode&) = delete;
  HostPointerMode& operator=(const HostPointerMode&) = delete;

 private:
  cublasHandle_t handle_;
  cublasPointerMode_t previous_;
};

inline int as_int(int64_t v, const char* what) {
  TORCH_CHECK(v <= std::numeric_limits<int>::max(), "loranull_kernels._C: ", what, " = ", v,
              " exceeds the 32-bit cuBLAS/cuSOLVER API");
  return static_cast<int>(v);
}

// A 3-D contiguous CUDA tensor of `dtype` on the device of `like` (the op's first operand).
inline void check_operand(const at::Tensor& t, const char* op, const char* name, const at::Tensor& like,
                          at::ScalarType dtype) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but the first operand is on ",
              like.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 3, op, ": ", name, " must be 3-D (batch, rows, cols), got ", t.dim(), "-D");
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// The device addresses of matrices `index` (int64, on the device) of a contiguous batch starting at `base`, `stride`
// elements apart: the T*[] argument of cuSOLVER's / cuBLAS's pointer-array batched calls. Built by ATen ops on the
// current stream, so no host round trip.
template <typename T>
at::Tensor matrix_addresses(T* base, int64_t stride, const at::Tensor& index) {
  static_assert(sizeof(T*) == sizeof(int64_t), "device pointers are stored as int64");
  return index.mul(stride * static_cast<int64_t>(sizeof(T))).add(reinterpret_cast<int64_t>(base));
}

template <typename T>
T** as_pointer_array(const at::Tensor& addresses) {
  return reinterpret_cast<T**>(addresses.data_ptr<int64_t>());
}

// cuSOLVER's Householder QR entry points, overloaded on the element type.
inline cusolverStatus_t geqrf_work(cusolverDnHandle_t h, int m, int n, float* A, int lda, int* lwork) {
  return cusolverDnSgeqrf_bufferSize(h, m, n, A, lda, lwork);
}
inline cusolverStatus_t geqrf_work(cusolverDnHandle_t h, int m, int n, double* A, int lda, int* lwork) {
  return cusolverDnDgeqrf_bufferSize(h, m, n, A, lda, lwork);
}
inline cusolverStatus_t orgqr_work(cusolverDnHandle_t h, int m, int n, int k, const float* A, int lda,
                                   const float* tau, int* lwork) {
  return cusolverDnSorgqr_bufferSize(h, m, n, k, A, lda, tau, lwork);
}
inline cusolverStatus_t orgqr_work(cusolverDnHandle_t h, int m, int n, int k, const double* A, int lda,
                                   const double* tau, int* lwork) {
  return cusolverDnDorgqr_bufferSize(h, m, n, k, A, lda, tau, lwork);
}
inline cusolverStatus_t geqrf(cusolverDnHandle_t h, int m, int n, float* A, int lda, float* tau, float* work,
                              int lwork, int* info) {
  return cusolverDnSgeqrf(h, m, n, A, lda, tau, work, lwork, info);
}
inline cusolverStatus_t geqrf(cusolverDnHandle_t h, int m, int n, double* A, int lda, double* tau, double* work,
                              int lwork, int* info) {
  return cusolverDnDgeqrf(h, m, n, A, lda, tau, work, lwork, info);
}
inline cusolverStatus_t orgqr(cusolverDnHandle_t h, int m, int n, int k, float* A, int lda, const float* tau,
                              float* work, int lwork, int* info) {
  return cusolverDnSorgqr(h, m, n, k, A, lda, tau, work, lwork, info);
}
inline cusolverStatus_t orgqr(cusolverDnHandle_t h, int m, int n, int k, double* A, int lda, const double* tau,
                              double* work, int lwork, int* info) {
  return cusolverDnDorgqr(h, m, n, k, A, lda, tau, work, lwork, info);
}

// Householder QR of `batch` column-major rows × cols matrices (rows ≥ cols) with one shared workspace, sized for
// every (matrix, rows) shape in `probes`. cuSOLVER has no batched Householder QR for matrices this size, so this is
// a loop of asynchronous calls on one stream. devInfo is not read back: geqrf/orgqr only report illegal arguments
// there (checked by the callers), and a read would synchronise the stream on every call.
template <typename T>
class Householder {
 public:
  Householder(cusolverDnHandle_t h, const at::Tensor& like, int64_t batch, int64_t cols,
              std::initializer_list<std::pair<T*, int64_t>> probes)
      : h_(h), cols_(cols) {
    const auto options = like.options().dtype(c10::CppTypeToScalarType<T>::value);
    tau_ = at::empty({batch, cols}, options);
    info_ = at::empty({batch}, options.dtype(at::kInt));
    int lwork = 1;
    for (const auto& [A, rows] : probes) {
      int lq = 0, lo = 0;
      const int r = as_int(rows, "rows"), c = as_int(cols, "cols");
      TORCH_CUSOLVER_CHECK(geqrf_work(h_, r, c, A, r, &lq));
      TORCH_CUSOLVER_CHECK(orgqr_work(h_, r, c, c, A, r, tau_.data_ptr<T>(), &lo));
      lwork = std::max({lwork, lq, lo});
    }
    lwork_ = lwork;
    work_ = at::empty({lwork_}, options);
  }

  // In place: R in the upper triangle, the Householder vectors below it, their scales in tau.
  void factor(T* X, int64_t rows, int64_t stride, int64_t batch) {
    const int r = as_int(rows, "rows"), c = as_int(cols_, "cols");
    for (int64_t b = 0; b < batch; ++b) {
      TORCH_CUSOLVER_CHECK(
          geqrf(h_, r, c, X + b * stride, r, tau(b), work_.data_ptr<T>(), lwork_, info_.data_ptr<int>() + b));
    }
  }

  // In place, after factor(): the rows × cols matrix with orthonormal columns spanning the input's columns.
  void form_q(T* X, int64_t rows, int64_t stride, int64_t batch) {
    const int r = as_int(rows, "rows"), c = as_int(cols_, "cols");
    for (int64_t b = 0; b < batch; ++b) {
      TORCH_CUSOLVER_CHECK(
          orgqr(h_, r, c, c, X + b * stride, r, tau(b), work_.data_ptr<T>(), lwork_, info_.data_ptr<int>() + b));
    }
  }

  void orthonormalize(T* X, int64_t rows, int64_t stride, int64_t batch) {
    factor(X, rows, stride, batch);
    form_q(X, rows, stride, batch);
  }

 private:
  T* tau(int64_t b) { return tau_.data_ptr<T>() + b * cols_; }

  cusolverDnHandle_t h_;
  int64_t cols_;
  int lwork_ = 1;
  at::Tensor tau_, info_, work_;
};

}  // namespace loranull
