// FlashAttention forward and backward on the CPU: argument checks and instruction-set dispatch.
//
// The kernels themselves live in flash_cpu_kernels.h, compiled here twice: for the baseline
// target of the build and, on x86-64 with GCC/Clang, for AVX2+FMA+F16C; run_fwd/run_bwd pick the
// AVX2 build when the CPU has it. This translation unit includes no torch header.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "flash_api.h"
#include "philox.h"

namespace flash {
namespace cpu {
namespace {

namespace baseline {
#include "flash_cpu_kernels.h"
}  // namespace baseline

#if defined(__x86_64__) && defined(__GNUC__)
#define FLASH_CPU_HAVE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define FLASH_CPU_F16C 1  // half <-> float through vcvtph2ps / vcvtps2ph
#define FLASH_CPU_AVX2 1  // the target pragma does not define __AVX2__ for the preprocessor
namespace avx2 {
#include "flash_cpu_kernels.h"
}  // namespace avx2
#undef FLASH_CPU_AVX2
#undef FLASH_CPU_F16C
#pragma GCC pop_options
#endif

bool use_avx2() {
#if defined(FLASH_CPU_HAVE_AVX2)
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                                  __builtin_cpu_supports("f16c");
  return supported;
#else
  return false;
#endif
}

void check(const FlashFwdParams& p) {
  if (p.head_dim <= 0 || p.head_dim > 256 || p.head_dim % 8 != 0)
    throw std::invalid_argument("head_dim must be a positive multiple of 8 <= 256, got " + std::to_string(p.head_dim));
  if (p.heads_kv <= 0 || p.heads_q % p.heads_kv != 0)
    throw std::invalid_argument("heads_q (" + std::to_string(p.heads_q) + ") must be a multiple of heads_kv (" +
                                std::to_string(p.heads_kv) + ")");
  if (p.block_table && p.page_size <= 0) throw std::invalid_argument("page_size must be positive with a block_table");
  if (!(p.dropout_p >= 0.0f && p.dropout_p < 1.0f))
    throw std::invalid_argument("dropout_p must be in [0, 1), got " + std::to_string(p.dropout_p));
}

}  // namespace

void run_fwd(const FlashFwdParams& params, ParallelFor parallel_for) {
  check(params);
#if defined(FLASH_CPU_HAVE_AVX2)
  if (use_avx2()) return avx2::run_fwd(params, parallel_for);
#endif
  baseline::run_fwd(params, parallel_for);
}

void run_bwd(const FlashBwdParams& params, ParallelFor parallel_for) {
  check(params);
  if (params.block_table) throw std::invalid_argument("the backward does not support a paged KV cache (block_table)");
#if defined(FLASH_CPU_HAVE_AVX2)
  if (use_avx2()) return avx2::run_bwd(params, parallel_for);
#endif
  baseline::run_bwd(params, parallel_for);
}

}  // namespace cpu
}  // namespace flash
