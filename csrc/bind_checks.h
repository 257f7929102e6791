// Bounds checks of the bindings (csrc/bind_*.cpp): every buffer arrives as (address, element count), and each
// binding checks, before any kernel reads or writes a byte, that the sizes, strides and shape arguments it got
// address nothing past those counts. 64-bit arithmetic that refuses to overflow; a failed check throws
// std::invalid_argument (Python: ValueError) naming the function, the argument, the expected and the received
// value. The element count of a buffer is the number of elements of its dtype from the address to the end of
// its storage (kernswap.backends.cpu.extent), so a strided view passes as long as it stays inside its storage.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

namespace kernswap {
namespace bind {

[[noreturn]] inline void fail(const char* fn, const std::string& msg) {
  throw std::invalid_argument(std::string(fn) + ": " + msg);
}

inline int64_t mul(const char* fn, int64_t a, int64_t b) {
  int64_t r = 0;
  if (__builtin_mul_overflow(a, b, &r)) fail(fn, "size overflows 64 bits (" + std::to_string(a) + " * " +
                                                     std::to_string(b) + ")");
  return r;
}

inline int64_t add(const char* fn, int64_t a, int64_t b) {
  int64_t r = 0;
  if (__builtin_add_overflow(a, b, &r)) fail(fn, "size overflows 64 bits (" + std::to_string(a) + " + " +
                                                     std::to_string(b) + ")");
  return r;
}

// v >= lo, else "fn: name must be >= lo, got v".
inline void at_least(const char* fn, const char* name, int64_t v, int64_t lo) {
  if (v < lo) fail(fn, std::string(name) + " must be >= " + std::to_string(lo) + ", got " + std::to_string(v));
}

// Elements spanned by a view: 0 when a size is 0, else 1 + sum (size - 1) * stride over the (size, stride)
// pairs plus (inner - 1) for a contiguous innermost run of `inner` elements. Strides must be >= 0.
inline int64_t span(const char* fn, const char* what, std::initializer_list<std::pair<int64_t, int64_t>> dims,
                    int64_t inner = 1) {
  if (inner <= 0) return 0;
  int64_t last = inner - 1;
  for (const auto& d : dims) {
    if (d.first <= 0) return 0;
    if (d.second < 0)
      fail(fn, std::string(what) + " strides must be >= 0, got " + std::to_string(d.second));
    last = add(fn, last, mul(fn, d.first - 1, d.second));
  }
  return last + 1;
}

// rows x cols with row stride ld (elements): (rows - 1) * ld + cols, 0 when empty.
inline int64_t span2(const char* fn, const char* what, int64_t rows, int64_t cols, int64_t ld) {
  return span(fn, what, {{rows, ld}}, cols);
}

// The buffer `name` (count elements at ptr) must hold `required` elements; a non-empty one needs an address.
// why() (called on failure only, so a passing check builds no string) says where `required` comes from.
template <class Why>
inline void need(const char* fn, const char* name, uintptr_t ptr, int64_t count, int64_t required, Why why) {
  if (count < required)
    fail(fn, std::string(name) + " must be >= " + std::to_string(required) + " elements (" + why() + "), got " +
                 std::to_string(count));
  if (required > 0 && !ptr) fail(fn, std::string(name) + ": null address for a buffer of " +
                                         std::to_string(required) + " elements");
}

inline std::string dims(std::initializer_list<std::pair<const char*, int64_t>> kv) {
  std::string s;
  for (const auto& p : kv) s += (s.empty() ? "" : ", ") + std::string(p.first) + "=" + std::to_string(p.second);
  return s;
}

// ---- the packed quantized formats (python/kernswap/formats/base.py: layout) -------------------------------
inline int64_t padded_n(int64_t n) { return (n + 15) / 16 * 16; }

// bits 8 or 4; int4: group_size > 0, a multiple of 32, dividing K.
inline void check_qformat(const char* fn, int bits, int64_t group_size, int64_t K) {
  if (bits != 8 && bits != 4) fail(fn, "bits must be 8 or 4, got " + std::to_string(bits));
  if (bits == 4 && (group_size <= 0 || group_size % 32 != 0 || K % group_size != 0))
    fail(fn, "int4 needs group_size > 0, a multiple of 32 dividing K=" + std::to_string(K) + ", got group_size=" +
                 std::to_string(group_size));
}

// Bytes of one packed [N, K] weight: int8 [Np / 16, Kp * 16] (Kp = K rounded up to 4), int4 [Np / 16, K * 8].
inline int64_t qpacked_bytes(const char* fn, int bits, int64_t N, int64_t K) {
  const int64_t kk = bits == 8 ? (K + 3) / 4 * 4 : K / 2;
  return mul(fn, padded_n(N), kk);
}

// Scales (fp32) and zero points (uint8 or fp32) of one packed weight: [K / group_size, Np] (int8: [1, Np]).
inline int64_t qscale_count(const char* fn, int bits, int64_t group_size, int64_t N, int64_t K) {
  return mul(fn, bits == 8 ? 1 : K / group_size, padded_n(N));
}

// The packed weight, its scales and zero points for an [N, K] weight (bytes, floats, elements).
inline void check_weight(const char* fn, uintptr_t packed, int64_t packed_numel, int bits, int64_t group_size, int64_t N,
                  int64_t K, uintptr_t scale, int64_t scale_numel, uintptr_t zero, int64_t zero_numel) {
  check_qformat(fn, bits, group_size, K);
  const auto nk = [&] { return dims({{"bits", bits}, {"N", N}, {"K", K}}); };
  need(fn, "packed_numel", packed, packed_numel, qpacked_bytes(fn, bits, N, K), nk);
  const int64_t ns = qscale_count(fn, bits, group_size, N, K);
  const auto gk = [&] { return dims({{"bits", bits}, {"group_size", group_size}, {"N", N}, {"K", K}}); };
  need(fn, "scale_numel", scale, scale_numel, ns, gk);
  if (zero) {
    if (bits != 4) fail(fn, "zero points are for int4 only, got a zero buffer with bits=8");
    need(fn, "zero_numel", zero, zero_numel, ns, gk);
  }
}

}  // namespace bind
}  // namespace kernswap
