// Python bindings of the extension loranull_kernels._C (pybind11 through torch.utils.cpp_extension).
// torch/python.h rather than torch/extension.h: the tensor type casters without the whole C++ frontend, which
// halves the compile time of this file.
#include <torch/python.h>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "rsvd.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "loranull_kernels CUDA extension: batched randomized SVD with an implicit projection";
  m.def("rsvd", &loranull::rsvd_cuda,
        "rsvd(M (B,m,n) f32, omega (B,l,n) f32, project_out (1|B,n,k) f32 or None, rank, n_iter) -> "
        "(U (B,m,rank), S (B,rank), Vh (B,rank,n)): randomized SVD of M (I - Q Q^T), Halko-Martinsson-Tropp",
        pybind11::arg("M"), pybind11::arg("omega"), pybind11::arg("project_out"), pybind11::arg("rank"),
        pybind11::arg("n_iter"));
}
