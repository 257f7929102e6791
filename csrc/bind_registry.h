// Each op's binding file (csrc/bind_<op>.cpp) registers a function that adds its entry points to the
// kernswap._C module; bindings.cpp runs them all. Adding an op then touches no shared file.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

namespace kernswap {

using BindFn = void (*)(pybind11::module_&);
std::vector<BindFn>& binding_registry();
inline int register_binding(BindFn fn) {
  binding_registry().push_back(fn);
  return 0;
}

// Raw address from Python (tensor.data_ptr()) to a typed pointer.
template <class T>
inline T* ptr_of(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

}  // namespace kernswap

#define KS_CONCAT_(a, b) a##b
#define KS_CONCAT(a, b) KS_CONCAT_(a, b)
// KS_REGISTER_BINDING(fn): run fn(module) when kernswap._C is imported.
#define KS_REGISTER_BINDING(fn) static const int KS_CONCAT(ks_binding_, __LINE__) = ::kernswap::register_binding(fn)
