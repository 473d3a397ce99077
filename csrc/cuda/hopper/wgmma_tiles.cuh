// Building blocks of the Hopper kernels (sm90a): 128-byte swizzled shared-memory tiles filled with
// cp.async, their wgmma matrix descriptors, and the ordering primitives around warpgroup MMAs.
#pragma once

#include "cuda/flash_mma.cuh"
#include "cuda/hopper/wgmma_ops.cuh"

namespace flash {
namespace cuda {
namespace detail {

// ---- 128-byte swizzled tiles ----------------------------------------------------------------
// A ROWS x D tile is stored as D / 64 column blocks of ROWS rows x 128 bytes; the 16-byte chunk c of
// a row r sits at chunk c ^ (r % 8) of its row. This is wgmma's SWIZZLE_128B layout both for a
// K-major operand (rows = M or N, 64 K-elements per block: Q and K in S = Q K^T) and for an
// MN-major one (rows = K, 64 N-elements per block: V in O = P V).
__device__ __forceinline__ uint32_t sw128_offset(int row, int chunk, int rows) {
  return static_cast<uint32_t>(((chunk >> 3) * rows + row) * 128 + (((chunk & 7) ^ (row & 7)) << 4));
}

// Shared-memory matrix descriptor of a SWIZZLE_128B operand starting at `addr` (1024-byte aligned
// pattern; a K-step inside a 128-byte row adds its byte offset to the start address).
//   lbo: K-major: unused (16); MN-major: bytes between the 64-element column blocks along N.
//   sbo: bytes between 8-row groups (1024 for dense 128-byte rows).
__device__ __forceinline__ uint64_t sw128_desc(uint32_t addr, uint32_t lbo) {
  return static_cast<uint64_t>((addr & 0x3FFFFu) >> 4) | (static_cast<uint64_t>(lbo >> 4) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (1ull << 62);
}

__device__ __forceinline__ void cp_async16_shared(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
// One float; src_bytes = 0 writes 0 and reads nothing.
__device__ __forceinline__ void cp_async4_shared(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}

// cp.async copies of a ROWS x D tile into the swizzled layout at shared address `tile`, by the NT
// threads of the CTA. Null rows and chunks at or past head_dim are zero-filled (as cp_async_tile).
template <typename T, int D, int ROWS, int NT, typename RowPtr>
__device__ __forceinline__ void cp_async_tile_sw128(uint32_t tile, RowPtr row_ptr, int head_dim, const T* any_valid) {
  constexpr int kChunks = D / 8;
  if constexpr (NT % kChunks == 0 && ROWS % (NT / kChunks) == 0) {
    // One fixed column per thread: its swizzled chunk is the same in every row it copies.
    constexpr int kRowStep = NT / kChunks;
    static_assert(kRowStep % 8 == 0, "rows of a thread keep their swizzle phase");
    const int c = threadIdx.x % kChunks;
    const int row0 = threadIdx.x / kChunks;
    const bool column_ok = c * 8 < head_dim;
    const uint32_t dst0 = tile + sw128_offset(row0, c, ROWS);
#pragma unroll
    for (int it = 0; it < ROWS / kRowStep; ++it) {
      const T* src = column_ok ? row_ptr(row0 + it * kRowStep) : nullptr;
      cp_async16_shared(dst0 + it * kRowStep * 128, src != nullptr ? src + c * 8 : any_valid, src != nullptr ? 16 : 0);
    }
  } else {
#pragma unroll 4
    for (int idx = threadIdx.x; idx < ROWS * kChunks; idx += NT) {
      const int row = idx / kChunks;
      const int c = idx - row * kChunks;
      const T* src = c * 8 < head_dim ? row_ptr(row) : nullptr;
      cp_async16_shared(tile + sw128_offset(row, c, ROWS), src != nullptr ? src + c * 8 : any_valid,
                        src != nullptr ? 16 : 0);
    }
  }
}

// The same for a tile whose rows are `row_stride` elements apart from `first` (one address per
// tile: not paged, or inside one page); rows at or past `valid_rows` are zero-filled. No per-row
// branch: each thread steps one pointer through its rows.
template <typename T, int D, int ROWS, int NT>
__device__ __forceinline__ void cp_async_rows_sw128(uint32_t tile, const T* first, int64_t row_stride, int valid_rows,
                                                    int head_dim) {
  constexpr int kChunks = D / 8;
  static_assert(NT % kChunks == 0, "whole rows per pass");
  constexpr int kRowStep = NT / kChunks;
  static_assert(kRowStep % 8 == 0, "rows of a thread keep their swizzle phase");
  const int c = threadIdx.x % kChunks;
  const int row0 = threadIdx.x / kChunks;
  const bool column_ok = c * 8 < head_dim;
  const uint32_t dst0 = tile + sw128_offset(row0, c, ROWS);
  const T* src = first + row0 * row_stride + c * 8;
#pragma unroll
  for (int it = 0; it < ceil_div(ROWS, kRowStep); ++it) {
    if (ROWS % kRowStep != 0 && row0 + it * kRowStep >= ROWS) break;
    const bool ok = column_ok && row0 + it * kRowStep < valid_rows;
    cp_async16_shared(dst0 + it * kRowStep * 128, ok ? src : first, ok ? 16 : 0);
    src += kRowStep * row_stride;
  }
}

// ---- warpgroup MMA ordering -------------------------------------------------------------------
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Pins registers an in-flight wgmma reads or writes: the compiler may not move their other uses
// across this point (it sees the asynchronous wgmma's operands as ready when it is issued).
template <int N>
__device__ __forceinline__ void pin_registers(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N>
__device__ __forceinline__ void pin_registers(uint32_t (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}
// cp.async writes through the generic proxy, wgmma reads through the async proxy.
template <int N>
__device__ __forceinline__ void cp_async_wait_group() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Reduces x[0..N) pairwise, halving the count each step (a chain over N was the sm80-class kernel's
// main stall); written as a recursion so that every step unrolls.
template <int N, typename Op>
__device__ __forceinline__ float tree_reduce(float* x, Op op) {
  if constexpr (N == 1) {
    return x[0];
  } else {
#pragma unroll
    for (int t = 0; t < N / 2; ++t) x[t] = op(x[t], x[t + N / 2]);
    return tree_reduce<N / 2>(x, op);
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace flash
