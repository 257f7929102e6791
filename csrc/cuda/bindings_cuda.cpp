// pybind11 module kernswap._C_cuda: the only file of csrc/cuda that sees Python.  No torch headers: tensors arrive as
// data_ptr() integers with their element counts (checked as the CPU bindings do, bind_checks.h), the stream as
// torch.cuda.current_stream().cuda_stream.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "bind_checks.h"
#include "moe_align.cuh"
#include "qgemv.cuh"

namespace py = pybind11;

namespace {

template <typename P>
P* as_ptr(std::uintptr_t v) {
  return reinterpret_cast<P*>(v);
}

void qgemv(std::uintptr_t x_ptr, int64_t x_numel, int x_dtype, int64_t M, int64_t K, int64_t x_row_stride,
           std::uintptr_t packed_ptr, int64_t packed_numel, int bits, int64_t group_size, int64_t N,
           std::uintptr_t scale_ptr, int64_t scale_numel, std::uintptr_t zero_ptr, int64_t zero_numel,
           bool zero_is_float, std::uintptr_t bias_ptr, int64_t bias_numel, std::uintptr_t y_ptr, int64_t y_numel, int y_dtype,
           int64_t y_row_stride, std::uintptr_t stream) {
  using namespace kernswap::bind;
  const char* fn = "qgemv";
  at_least(fn, "M", M, 0);
  at_least(fn, "K", K, 1);
  at_least(fn, "N", N, 1);
  check_weight(fn, packed_ptr, packed_numel, bits, bits == 4 ? group_size : K, N, K, scale_ptr, scale_numel,
               zero_ptr, zero_numel);
  if (bias_ptr) need(fn, "bias_numel", bias_ptr, bias_numel, N, [&] { return dims({{"N", N}}); });
  if (M > 1) at_least(fn, "y_row_stride", y_row_stride, N);
  need(fn, "x_numel", x_ptr, x_numel, span2(fn, "x", M, K, x_row_stride),
       [&] { return dims({{"M", M}, {"K", K}, {"x_row_stride", x_row_stride}}); });
  need(fn, "y_numel", y_ptr, y_numel, span2(fn, "y", M, N, y_row_stride),
       [&] { return dims({{"M", M}, {"N", N}, {"y_row_stride", y_row_stride}}); });
  int rc;
  {
    py::gil_scoped_release nogil;
    rc = kernswap::cuda::qgemv(as_ptr<const void>(x_ptr), x_dtype, M, K, x_row_stride, as_ptr<const void>(packed_ptr),
                               bits, group_size, N, as_ptr<const float>(scale_ptr),
                               zero_is_float ? nullptr : as_ptr<const uint8_t>(zero_ptr),
                               zero_is_float ? as_ptr<const float>(zero_ptr) : nullptr, as_ptr<const float>(bias_ptr), as_ptr<void>(y_ptr), y_dtype, y_row_stride, stream);
  }
  if (rc < 0) throw std::invalid_argument(kernswap::cuda::error_string(rc));
  if (rc > 0) throw std::runtime_error(std::string("kernswap._C_cuda.qgemv: CUDA error ") + std::to_string(rc) + ": " +
                                       kernswap::cuda::error_string(rc));
}

void moe_align(std::uintptr_t ids_ptr, int64_t ids_numel, int64_t num_pairs, int64_t num_experts,
               int64_t block_size, std::uintptr_t sorted_ptr, int64_t sorted_len, std::uintptr_t offsets_ptr,
               int64_t offsets_numel, std::uintptr_t ws_ptr, int64_t ws_elems, std::uintptr_t stream) {
  using namespace kernswap::bind;
  const char* fn = "moe_align";
  at_least(fn, "num_pairs", num_pairs, 0);
  at_least(fn, "num_experts", num_experts, 1);
  need(fn, "ids_numel", ids_ptr, ids_numel, num_pairs, [&] { return dims({{"num_pairs", num_pairs}}); });
  need(fn, "offsets_numel", offsets_ptr, offsets_numel, add(fn, num_experts, 1),
       [&] { return dims({{"num_experts + 1", num_experts + 1}}); });
  // sorted_len and ws_elems are checked against what the kernel needs by kernswap::cuda::moe_align itself
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
  m.def("qgemv", &qgemv, py::arg("x_ptr"), py::arg("x_numel"), py::arg("x_dtype"), py::arg("M"), py::arg("K"),
        py::arg("x_row_stride"), py::arg("packed_ptr"), py::arg("packed_numel"), py::arg("bits"),
        py::arg("group_size"), py::arg("N"), py::arg("scale_ptr"), py::arg("scale_numel"), py::arg("zero_ptr"),
        py::arg("zero_numel"), py::arg("zero_is_float"), py::arg("bias_ptr"), py::arg("bias_numel"), py::arg("y_ptr"),
        py::arg("y_numel"), py::arg("y_dtype"), py::arg("y_row_stride"), py::arg("stream"),
        "y[M,N] = x[M,K] @ dequant(W)^T (+ bias).  dtype codes 1 = bf16, 2 = fp16 (x and y equal); zero_ptr / "
        "bias_ptr 0 when absent (zero_is_float: fp32 float zero-points, else uint8); strides in elements; each *_numel: the elements the buffer holds from its "
        "address (checked against every size and stride before launching); stream = cudaStream_t as int.  "
        "Raises ValueError on bad arguments, RuntimeError on a CUDA launch error.");
  m.attr("MAX_M_FAST") = 16;
  m.def("moe_align", &moe_align, py::arg("ids_ptr"), py::arg("ids_numel"), py::arg("num_pairs"),
        py::arg("num_experts"), py::arg("block_size"), py::arg("sorted_ptr"), py::arg("sorted_len"),
        py::arg("offsets_ptr"), py::arg("offsets_numel"), py::arg("ws_ptr"), py::arg("ws_elems"), py::arg("stream"),
        "Sort MoE pairs by expert with block padding: int32 ids [num_pairs] -> sorted pair ids [sorted_len >= "
        "min(P*bs, P + min(E,P)*(bs-1))] and offsets [E+1]; workspace int32 [ceil(P/MOE_ALIGN_CHUNK)*E].  Raises "
        "ValueError on bad arguments, RuntimeError on a CUDA launch error.");
  m.attr("MOE_ALIGN_CHUNK") = kernswap::cuda::kMoeAlignChunk;
}
