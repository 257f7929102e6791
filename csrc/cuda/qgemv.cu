// kernswap: small-M weight-only int8 / int4 GEMV on the SPEC packed layouts (torch-free; see qgemv.cuh).
//
// One CTA = one packed tile row (16 output channels n) x up to MT rows of x; NWARPS warps split K.
// A packed tile row is a sequence of 64-byte "k-steps" (16 n x 4 bytes): int8 -> 4 k per step, int4 -> 8 k.
// Lane l of a warp takes k-step (chunk*8 + l/4) and the 16 bytes of n = 4*(l%4) .. +3 in it: one 128-bit load,
// so a warp reads 512 contiguous bytes per iteration.  Lane-partial sums (fp32) are reduced over the 8 lanes
// sharing l%4 with xor shuffles, then across warps in shared memory.  Bytes become floats with the
// 0x4B000000 magic (PRMT + FADD, no I2F).  Template parameters: activation type, bits, rows per CTA.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "qgemv.cuh"

// flash-attention static_switch style: turn run-time values into compile-time constants.
#define KS_BITS_SWITCH(VAL, NAME, ...)     \
  [&] {                                    \
    if ((VAL) == 8) {                      \
      constexpr int NAME = 8;              \
      return __VA_ARGS__();                \
    } else {                               \
      constexpr int NAME = 4;              \
      return __VA_ARGS__();                \
    }                                      \
  }()

#define KS_DTYPE_SWITCH(VAL, TYPE, ...)    \
  [&] {                                    \
    if ((VAL) == kBFloat16) {              \
      using TYPE = __nv_bfloat16;          \
      return __VA_ARGS__();                \
    } else {                               \
      using TYPE = __half;                 \
      return __VA_ARGS__();                \
    }                                      \
  }()

#define KS_MTILE_SWITCH(M, NAME, ...)                  \
  [&] {                                                \
    if ((M) <= 1) {                                    \
      constexpr int NAME = 1;                          \
      return __VA_ARGS__();                            \
    } else if ((M) <= 2) {                             \
      constexpr int NAME = 2;                          \
      return __VA_ARGS__();                            \
    } else if ((M) <= 4) {                             \
      constexpr int NAME = 4;                          \
      return __VA_ARGS__();                            \
    } else if ((M) <= 8) {                             \
      constexpr int NAME = 8;                          \
      return __VA_ARGS__();                            \
    } else {                                           \
      constexpr int NAME = 16;                         \
      return __VA_ARGS__();                            \
    }                                                  \
  }()

namespace kernswap {
namespace cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kTileN = 16;
constexpr float kMagic = 8388608.f;  // 2^23: __int_as_float(0x4B000000 | b) == 2^23 + b for b < 2^23

template <typename T>
struct Act;
template <>
struct Act<__half> {
  static __device__ __forceinline__ float2 f2(uint32_t v) { return __half22float2(*reinterpret_cast<__half2*>(&v)); }
  static __device__ __forceinline__ float f1(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); }
};
template <>
struct Act<__nv_bfloat16> {
  static __device__ __forceinline__ float2 f2(uint32_t v) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&v));
  }
  static __device__ __forceinline__ float f1(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};

// byte i of `word` (0..255) as float 2^23 + byte
template <int I>
__device__ __forceinline__ float byte_f(uint32_t word) {
  return __int_as_float(__byte_perm(word, 0x4B000000u, 0x7540 + I));
}

// NV consecutive activations x[k0 .. k0+NV) as float: one vector load when `vec`, else bounds-checked scalars.
template <typename T, int NV>
__device__ __forceinline__ void load_x(const T* row, int64_t k0, int64_t K, bool vec, float* out) {
  if (vec && k0 + NV <= K) {
    if constexpr (NV == 8) {
      uint4 v = *reinterpret_cast<const uint4*>(row + k0);
      uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float2 f = Act<T>::f2(w[i]);
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
      }
    } else {
      uint2 v = *reinterpret_cast<const uint2*>(row + k0);
      float2 a = Act<T>::f2(v.x), b = Act<T>::f2(v.y);
      out[0] = a.x; out[1] = a.y; out[2] = b.x; out[3] = b.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < NV; ++i) out[i] = (k0 + i < K) ? Act<T>::f1(row[k0 + i]) : 0.f;
  }
}

template <typename T, int BITS, int MT>
__global__ void __launch_bounds__(kWarps * 32)
qgemv_kernel(const T* __restrict__ x, int64_t M, int64_t K, int64_t xs, const uint8_t* __restrict__ packed,
             int64_t row_bytes, int64_t steps, int64_t group_size, int64_t N, int64_t Np,
             const float* __restrict__ scale, const uint8_t* __restrict__ zero, const float* __restrict__ zero_f,
             const float* __restrict__ bias, T* __restrict__ y, int64_t ys, bool xvec) {
  constexpr int KPS = BITS == 8 ? 4 : 8;  // k per 64-byte step
  __shared__ float red[kWarps][MT][kTileN];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sub = lane >> 2, quad = lane & 3;
  const int64_t t = blockIdx.x, m0 = int64_t(blockIdx.y) * MT;
  const int64_t n0 = t * kTileN + quad * 4;  // first of this lane's 4 output channels
  const uint8_t* wrow = packed + t * row_bytes + quad * 16;

  float acc[MT][4];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[m][j] = 0.f;

  for (int64_t s = int64_t(warp) * 8 + sub; s < steps; s += kWarps * 8) {
    const uint4 wv = __ldg(reinterpret_cast<const uint4*>(wrow + s * 64));
    const uint32_t words[4] = {wv.x, wv.y, wv.z, wv.w};  // word j: 4 bytes of channel n0 + j
    float w[4][KPS];
    float s4[4] = {1.f, 1.f, 1.f, 1.f};
    float fz[4] = {0.f, 0.f, 0.f, 0.f};  // float zero-points: sum (q - z) x = sum q x - z sum x
    if constexpr (BITS == 8) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t u = words[j] ^ 0x80808080u;  // signed q -> q + 128
        w[j][0] = byte_f<0>(u) - (kMagic + 128.f);
        w[j][1] = byte_f<1>(u) - (kMagic + 128.f);
        w[j][2] = byte_f<2>(u) - (kMagic + 128.f);
        w[j][3] = byte_f<3>(u) - (kMagic + 128.f);
      }
    } else {
      const int64_t g = (s * KPS) / group_size;
      const float4 sc = __ldg(reinterpret_cast<const float4*>(scale + g * Np + n0));
      s4[0] = sc.x; s4[1] = sc.y; s4[2] = sc.z; s4[3] = sc.w;
      uint32_t zw = 0x08080808u;
      if (zero != nullptr) zw = __ldg(reinterpret_cast<const unsigned int*>(zero + g * Np + n0));
      if (zero_f != nullptr) {
        const float4 zv = __ldg(reinterpret_cast<const float4*>(zero_f + g * Np + n0));
        fz[0] = zv.x; fz[1] = zv.y; fz[2] = zv.z; fz[3] = zv.w;
        zw = 0;
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float zf = kMagic + float((zw >> (8 * j)) & 0xFF);
        const uint32_t lo = words[j] & 0x0F0F0F0Fu, hi = (words[j] >> 4) & 0x0F0F0F0Fu;
        w[j][0] = byte_f<0>(lo) - zf; w[j][1] = byte_f<1>(lo) - zf;
        w[j][2] = byte_f<2>(lo) - zf; w[j][3] = byte_f<3>(lo) - zf;
        w[j][4] = byte_f<0>(hi) - zf; w[j][5] = byte_f<1>(hi) - zf;
        w[j][6] = byte_f<2>(hi) - zf; w[j][7] = byte_f<3>(hi) - zf;
      }
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m0 + m < M) {
        float xf[KPS];
        load_x<T, KPS>(x + (m0 + m) * xs, s * KPS, K, xvec, xf);
        float xsum = 0.f;
        if (BITS == 4 && zero_f != nullptr) {
#pragma unroll
          for (int i = 0; i < KPS; ++i) xsum += xf[i];
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          float p = -fz[j] * xsum;
#pragma unroll
          for (int i = 0; i < KPS; ++i) p = fmaf(w[j][i], xf[i], p);
          acc[m][j] = (BITS == 8) ? acc[m][j] + p : fmaf(p, s4[j], acc[m][j]);
        }
      }
    }
  }

  // reduce over the 8 lanes with the same quad (lane bits 2..4), then over warps
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float v = acc[m][j];
      v += __shfl_xor_sync(0xffffffffu, v, 4);
      v += __shfl_xor_sync(0xffffffffu, v, 8);
      v += __shfl_xor_sync(0xffffffffu, v, 16);
      if (sub == 0) red[warp][m][quad * 4 + j] = v;
    }
  __syncthreads();
  for (int i = threadIdx.x; i < MT * kTileN; i += blockDim.x) {
    const int m = i / kTileN, nn = i % kTileN;
    const int64_t n = t * kTileN + nn;
    if (m0 + m >= M || n >= N) continue;
    float v = 0.f;
#pragma unroll
    for (int wi = 0; wi < kWarps; ++wi) v += red[wi][m][nn];
    if (BITS == 8) v *= scale[n];
    if (bias != nullptr) v += bias[n];
    y[(m0 + m) * ys + n] = Act<T>::from(v);
  }
}

inline bool aligned(const void* p, std::uintptr_t a) { return (reinterpret_cast<std::uintptr_t>(p) % a) == 0; }

}  // namespace

const char* error_string(int code) {
  switch (code) {
    case 0: return "success";
    case -1: return "qgemv: x_dtype and y_dtype must both be 1 (bf16) or both be 2 (fp16)";
    case -2: return "qgemv: bits must be 8 or 4";
    case -3: return "qgemv: int4 needs group_size in {32, 64, 128} dividing K";
    case -4: return "qgemv: packed must be 16-byte aligned, scale and float zero 16-byte, integer zero 4-byte aligned";
    case -6: return "qgemv: pass integer (zero) or float (zero_f) zero-points, not both";
    case -5: return "qgemv: sizes must be non-negative";
    default: return code > 0 ? cudaGetErrorString(static_cast<cudaError_t>(code)) : "qgemv: unknown error";
  }
}

int qgemv(const void* x, int x_dtype, int64_t M, int64_t K, int64_t x_row_stride, const void* packed, int bits,
          int64_t group_size, int64_t N, const float* scale, const uint8_t* zero, const float* zero_f,
          const float* bias, void* y, int y_dtype, int64_t y_row_stride, std::uintptr_t stream) {
  if (x_dtype != y_dtype || (x_dtype != kBFloat16 && x_dtype != kFloat16)) return -1;
  if (bits != 8 && bits != 4) return -2;
  if (M < 0 || N < 0 || K < 0) return -5;
  if (bits == 4 && (!(group_size == 32 || group_size == 64 || group_size == 128) || K % group_size != 0)) return -3;
  if (zero && zero_f) return -6;
  if (!aligned(packed, 16) ||
      (bits == 4 && (!aligned(scale, 16) || (zero && !aligned(zero, 4)) || (zero_f && !aligned(zero_f, 16)))))
    return -4;
  if (M == 0 || N == 0) return 0;
  const int64_t Np = (N + kTileN - 1) / kTileN * kTileN;
  const int64_t Kp = bits == 8 ? (K + 3) / 4 * 4 : K;
  const int64_t row_bytes = bits == 8 ? Kp * kTileN : K * 8;
  const int64_t steps = bits == 8 ? Kp / 4 : K / 8;
  const int elt = 2;  // bf16 / fp16
  const int vec_elems = bits == 8 ? 4 : 8;
  const bool xvec = aligned(x, elt * vec_elems) && (x_row_stride % vec_elems == 0);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  KS_DTYPE_SWITCH(x_dtype, T, [&] {
    KS_BITS_SWITCH(bits, BITS, [&] {
      KS_MTILE_SWITCH(M, MT, [&] {
        dim3 grid(static_cast<unsigned>(Np / kTileN), static_cast<unsigned>((M + MT - 1) / MT));
        qgemv_kernel<T, BITS, MT><<<grid, kWarps * 32, 0, st>>>(
            static_cast<const T*>(x), M, K, x_row_stride, static_cast<const uint8_t*>(packed), row_bytes, steps,
            bits == 8 ? K : group_size, N, Np, scale, bits == 4 ? zero : nullptr, bits == 4 ? zero_f : nullptr, bias,
            static_cast<T*>(y), y_row_stride, xvec);
      });
    });
  });
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace kernswap
