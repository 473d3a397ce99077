// The few tensor operations the binding needs, over torch's stable ABI or its full ABI, so
// torch_binding.cpp is written once.
//
//   TORCH_TARGET_VERSION defined (CUDA variants, target 2.11): torch::stable::Tensor and the
//     C shim; only functions that exist at stable ABI 2.11 are used.
//   otherwise (CPU variants): at::Tensor.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include <torch/csrc/stable/c/shim.h>  // torch_parallel_for, in both ABIs
#ifdef TORCH_TARGET_VERSION
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#else
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/library.h>
#endif

namespace flash_binding {

#ifdef TORCH_TARGET_VERSION
using Tensor = torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;
#else
using Tensor = at::Tensor;
using ScalarType = at::ScalarType;
#endif
using OptTensor = std::optional<Tensor>;

// Messages are built with std::string, not iostreams: an iostream insert inside the module
// runs libstdc++'s locale machinery, which crashed in modules built with GCC 13 (seen on the
// H100 machine); string appends and std::to_string need none of it.
inline void append(std::string& out, const std::string& s) { out += s; }
inline void append(std::string& out, const char* s) { out += s; }
inline void append(std::string& out, char c) { out += c; }
inline void append(std::string& out, bool b) { out += b ? "true" : "false"; }
template <typename T, typename = std::enable_if_t<std::is_arithmetic_v<T>>>
inline void append(std::string& out, T value) { out += std::to_string(value); }

// Thrown for a bad argument; torch turns it into a Python RuntimeError with this message.
template <typename... Args>
[[noreturn]] void fail(const Args&... args) {
  std::string message;
  (append(message, args), ...);
  throw std::invalid_argument(message);
}

// Fails with the message built from the remaining arguments, which are only evaluated then.
#define FLASH_CHECK(condition, ...)                         \
  do {                                                      \
    if (!(condition)) ::flash_binding::fail(__VA_ARGS__);   \
  } while (0)

inline ScalarType dtype(const Tensor& t) { return t.scalar_type(); }
inline bool is_cuda(const Tensor& t) { return t.is_cuda(); }
inline bool is_cpu(const Tensor& t) { return t.is_cpu(); }
inline int device_index(const Tensor& t) { return static_cast<int>(t.get_device()); }
inline void* data_ptr(const Tensor& t) { return t.data_ptr(); }

inline const char* dtype_name(ScalarType s) {
  switch (s) {
    case ScalarType::Float: return "float32";
    case ScalarType::Half: return "float16";
    case ScalarType::BFloat16: return "bfloat16";
    case ScalarType::Int: return "int32";
    case ScalarType::Long: return "int64";
    case ScalarType::Double: return "float64";
    case ScalarType::Float8_e4m3fn: return "float8_e4m3fn";
    case ScalarType::Byte: return "uint8";
    default: return "another dtype";
  }
}

inline std::string shape_str(const Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + ")";
}

// A new tensor of `sizes` and `type` on `like`'s device; zero-filled when `zero`.
inline Tensor new_tensor(const Tensor& like, const std::vector<int64_t>& sizes, ScalarType type, bool zero) {
#ifdef TORCH_TARGET_VERSION
  torch::headeronly::IntHeaderOnlyArrayRef shape(sizes.data(), sizes.size());
  return zero ? torch::stable::new_zeros(like, shape, type) : torch::stable::new_empty(like, shape, type);
#else
  auto options = like.options().dtype(type);
  return zero ? at::zeros(sizes, options) : at::empty(sizes, options);
#endif
}

#if defined(CUDA_KERNEL)
// The current CUDA stream of `device` (a cudaStream_t), through torch's C shim (declared
// there under USE_CUDA, which CUDA builds define).
inline void* current_cuda_stream(int device) {
  void* stream = nullptr;
  if (aoti_torch_get_current_cuda_stream(device, &stream) != AOTI_TORCH_SUCCESS)
    throw std::runtime_error("could not get the current CUDA stream of device " + std::to_string(device));
  return stream;
}
#endif

// Makes `t`'s device current for the guard's lifetime. Hidden like the stable ABI's guard it
// wraps (an internal detail of this extension either way).
class __attribute__((visibility("hidden"))) DeviceGuard {
 public:
#ifdef TORCH_TARGET_VERSION
  explicit DeviceGuard(const Tensor& t)
      : guard_(static_cast<torch::stable::accelerator::DeviceIndex>(t.get_device())) {}

 private:
  torch::stable::accelerator::DeviceGuard guard_;
#else
  explicit DeviceGuard(const Tensor& t) : guard_(t.device()) {}

 private:
  c10::DeviceGuard guard_;
#endif
};

// flash::ParallelFor over torch's intra-op thread pool (grain 1: items are whole tiles), through
// torch's C shim in both ABIs: at::parallel_for is a header template whose OpenMP pragmas run
// serially unless this module is compiled with -fopenmp; the shim runs inside libtorch.
inline void parallel_for(int64_t n, void* ctx, void (*fn)(void* ctx, int64_t begin, int64_t end)) {
  struct Call {
    void* ctx;
    void (*fn)(void* ctx, int64_t begin, int64_t end);
  } call{ctx, fn};
  auto trampoline = [](int64_t begin, int64_t end, void* c) {
    auto* call = static_cast<Call*>(c);
    call->fn(call->ctx, begin, end);
  };
  if (torch_parallel_for(0, n, 1, trampoline, &call) != AOTI_TORCH_SUCCESS)
    throw std::runtime_error("torch_parallel_for failed while running the CPU kernel");
}

}  // namespace flash_binding
