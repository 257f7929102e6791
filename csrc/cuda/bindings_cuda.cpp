// pybind11 module kernswap._C_cuda: the only file of csrc/cuda that sees Python.  No torch headers: tensors arrive as
// data_ptr() integers, the stream as torch.cuda.current_stream().cuda_stream.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "moe_align.cuh"
#include "qgemv.cuh"

namespace py = pybind11;

namespace {

template <typename P>
P* as_ptr(std::uintptr_t v) {
  return reinterpret_cast<P*>(v);
}

void qgemv(std::uintptr_t x_ptr, int x_dtype, int64_t M, int64_t K, int64_t x_row_stride, std::uintptr_t packed_ptr,
           int bits, int64_t group_size, int64_t N, std::uintptr_t scale_ptr, std::uintptr_t zero_ptr,
           std::uintptr_t bias_ptr, std::uintptr_t y_ptr, int y_dtype, int64_t y_row_stride, std::uintptr_t stream) {
  int rc;
  {
    py::gil_scoped_release nogil;
    rc = kernswap::cuda::qgemv(as_ptr<const void>(x_ptr), x_dtype, M, K, x_row_stride, as_ptr<const void>(packed_ptr),
                               bits, group_size, N, as_ptr<const float>(scale_ptr), as_ptr<const uint8_t>(zero_ptr),
                               as_ptr<const float>(bias_ptr), as_ptr<void>(y_ptr), y_dtype, y_row_stride, stream);
  }
  if (rc < 0) throw std::invalid_argument(kernswap::cuda::error_string(rc));
  if (rc > 0) throw std::runtime_error(std::string("kernswap._C_cuda.qgemv: CUDA error ") + std::to_string(rc) + ": " +
                                       kernswap::cuda::error_string(rc));
}

void moe_align(std::uintptr_t ids_ptr, int64_t num_pairs, int64_t num_experts, int64_t block_size,
               std::uintptr_t sorted_ptr, int64_t sorted_len, std::uintptr_t offsets_ptr, std::uintptr_t ws_ptr,
               int64_t ws_elems, std::uintptr_t stream) {
  int rc;
  {
    py::gil_scoped_release nogil;
    rc = kernswap::cuda::moe_align(as_ptr<const int32_t>(ids_ptr), num_pairs, num_experts, block_size,
                                   as_ptr<int32_t>(sorted_ptr), sorted_len, as_ptr<int32_t>(offsets_ptr),
                                   as_ptr<int32_t>(ws_ptr), ws_elems, stream);
  }
  if (rc < 0) throw std::invalid_argument(kernswap::cuda::moe_align_error_string(rc));
  if (rc > 0) throw std::runtime_error(std::string("kernswap._C_cuda.moe_align: CUDA error ") + std::to_string(rc) +
                                       ": " + kernswap::cuda::moe_align_error_string(rc));
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "kernswap CUDA kernels (torch-free): small-M weight-only int8/int4 GEMV on the packed SPEC layouts";
  m.def("qgemv", &qgemv, py::arg("x_ptr"), py::arg("x_dtype"), py::arg("M"), py::arg("K"), py::arg("x_row_stride"),
        py::arg("packed_ptr"), py::arg("bits"), py::arg("group_size"), py::arg("N"), py::arg("scale_ptr"),
        py::arg("zero_ptr"), py::arg("bias_ptr"), py::arg("y_ptr"), py::arg("y_dtype"), py::arg("y_row_stride"),
        py::arg("stream"),
        "y[M,N] = x[M,K] @ dequant(W)^T (+ bias).  dtype codes 1 = bf16, 2 = fp16 (x and y equal); zero_ptr / "
        "bias_ptr 0 when absent; strides in elements; stream = cudaStream_t as int.  Raises ValueError on bad "
        "arguments, RuntimeError on a CUDA launch error.");
  m.attr("MAX_M_FAST") = 16;
  m.def("moe_align", &moe_align, py::arg("ids_ptr"), py::arg("num_pairs"), py::arg("num_experts"),
        py::arg("block_size"), py::arg("sorted_ptr"), py::arg("sorted_len"), py::arg("offsets_ptr"), py::arg("ws_ptr"),
        py::arg("ws_elems"), py::arg("stream"),
        "Sort MoE pairs by expert with block padding: int32 ids [num_pairs] -> sorted pair ids [sorted_len >= "
        "min(P*bs, P + min(E,P)*(bs-1))] and offsets [E+1]; workspace int32 [ceil(P/MOE_ALIGN_CHUNK)*E].  Raises "
        "ValueError on bad arguments, RuntimeError on a CUDA launch error.");
  m.attr("MOE_ALIGN_CHUNK") = kernswap::cuda::kMoeAlignChunk;
}
