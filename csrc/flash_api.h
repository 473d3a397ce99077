// Entry points each backend implements for a filled FlashFwdParams / FlashBwdParams.
// Kernel translation units include no torch header; errors are thrown as
// std::invalid_argument / std::runtime_error and turned into torch errors by the binding.
#pragma once

#include <cstddef>
#include <cstdint>

#include "flash_params.h"

namespace flash {

// Runs fn(ctx, begin, end) over [0, n) on the host's intra-op thread pool. The binding
// passes torch's parallel_for, so the CPU kernels share torch's threads and settings.
using ParallelFn = void (*)(void* ctx, int64_t begin, int64_t end);
using ParallelFor = void (*)(int64_t n, void* ctx, ParallelFn fn);

namespace cpu {
void run_fwd(const FlashFwdParams& params, ParallelFor parallel_for);
void run_bwd(const FlashBwdParams& params, ParallelFor parallel_for);
}  // namespace cpu

namespace cuda {
// `stream` is a cudaStream_t; the device is the current one.
void run_fwd(const FlashFwdParams& params, void* stream);
void run_bwd(const FlashBwdParams& params, void* stream);
// Split-KV count run_fwd uses: params.num_splits when > 0, else a heuristic for the current device
// (1 when splitting does not pay). When it is > 1 the caller sets params.num_splits to it and
// allocates out_accum / lse_accum for that many splits (shapes in flash_params.h, float32, no
// initialization needed); without them run_fwd falls back to one split for a heuristic choice.
int fwd_num_splits(const FlashFwdParams& params);
// Bytes of out_accum plus lse_accum for fwd_num_splits(params) splits (0 when it is 1).
size_t fwd_workspace_bytes(const FlashFwdParams& params);
// FP8 calls (dtype kFloat8E4M3): bytes of FlashFwdParams::fp8_scratch run_fwd needs (any
// contents); 0 for other dtypes.
size_t fwd_fp8_scratch_bytes(const FlashFwdParams& params);
// Which forward kernel run_fwd picks for params on the current device: "wgmma" (Hopper), "decode"
// (Hopper, at most 16 packed rows), "mma" (sm80-class tensor cores) or "simt".
const char* fwd_kernel_name(const FlashFwdParams& params);
// Which backward kernels run_bwd picks for params on the current device: "wgmma" (Hopper), "mma"
// (sm80-class tensor cores, fused or deterministic) or "simt".
const char* bwd_kernel_name(const FlashBwdParams& params);
// Bytes of FlashBwdParams::workspace the backward needs (any contents: run_bwd initializes what it reads).
size_t bwd_workspace_bytes(const FlashBwdParams& params);
}  // namespace cuda

}  // namespace flash
