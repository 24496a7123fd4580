// Python bindings of the extension loranull_kernels._C (pybind11 through torch.utils.cpp_extension).
// torch/python.h rather than torch/extension.h: the tensor type casters without the whole C++ frontend, which
// halves the compile time of this file.
#include <torch/python.h>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "nullspace.h"
#include "rsvd.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() =
      "loranull_kernels CUDA extension: batched randomized SVD with an implicit projection; batched randomized "
      "null-space solver (ridged Cholesky, block Krylov on the inverse with a Rayleigh-Ritz convergence test)";
  m.def("rsvd", &loranull::rsvd_cuda,
        "rsvd(M (B,m,n) f32, omega (B,l,n) f32, project_out (1|B,n,k) f32 or None, rank, n_iter) -> "
        "(U (B,m,rank), S (B,rank), Vh (B,rank,n)): randomized SVD of M (I - Q Q^T), Halko-Martinsson-Tropp",
        pybind11::arg("M"), pybind11::arg("omega"), pybind11::arg("project_out"), pybind11::arg("rank"),
        pybind11::arg("n_iter"));
  m.def("nullspace_cholesky", &loranull::nullspace_cholesky_cuda,
        "nullspace_cholesky(A (B,n,n) f32|f64, delta (B,) f64, retries) -> (L (B,n,n), delta (B,), ok): lower "
        "Cholesky factors of A_b + delta_b I, each delta_b raised tenfold while entry b fails",
        pybind11::arg("A"), pybind11::arg("delta"), pybind11::arg("retries"));
  m.def("nullspace_krylov", &loranull::nullspace_krylov_cuda,
        "nullspace_krylov(L (B,n,n) f32|f64, start (B,n,b) L's dtype, k, max_blocks, tol) -> (theta (B,k) f64 "
        "descending, vectors (B,n,k) f64 orthonormal, blocks): block Krylov on (L L^T)^-1 with Rayleigh-Ritz after "
        "every block, stopped when the sum of 1/theta over the top k falls by at most tol (relative)",
        pybind11::arg("L"), pybind11::arg("start"), pybind11::arg("k"), pybind11::arg("max_blocks"),
        pybind11::arg("tol"));
}
