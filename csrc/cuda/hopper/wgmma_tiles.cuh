// Building blocks of the Hopper kernels (sm90a): 128-byte swizzled shared-memory tiles filled with
// cp.async, their wgmma matrix descriptors, and the ordering primitives around warpgroup MMAs.
#pragma once

#include "cuda/flash_mma.cuh"
#include "cuda/hopper/wgmma_ops.cuh"

namespace flash {
namespace cuda {
namespace detail {

// ---- 128-byte swizzled tiles ----------------------------------------------------------------
// A ROWS x D tile is stored as column blocks of ROWS rows x 128 bytes (64 16-bit or 128 8-bit
// elements; a last partial block is padded); the 16-byte chunk c of a row r sits at chunk
// c ^ (r % 8) of its row. This is wgmma's SWIZZLE_128B layout both for a K-major operand (rows = M
// or N: Q and K in S = Q K^T, V transposed in the FP8 forward's O = P V) and for an MN-major one
// (rows = K, 64 N-elements per block: V in the 16-bit O = P V).
template <typename T>
struct Sw128 {
  static constexpr int kChunk = 16 / sizeof(T);   // elements per 16-byte chunk
  static constexpr int kBlock = 128 / sizeof(T);  // elements per 128-byte row of a column block
  static constexpr int blocks(int d) { return (d + kBlock - 1) / kBlock; }
};
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

// cp.async copies of a ROWS x D tile into the swizzled layout at shared address `tile`, by threads
// 0 .. NT-1. Each thread owns one 16-byte chunk column (of the 8 in a 128-byte row) in every
// column block, and the rows NT / 8 apart from its first: rows that far apart keep their swizzle
// phase, so the destination steps by a constant (and every D that is a multiple of 64, 192 included,
// takes the same loop). Null rows and chunks at or past head_dim are zero-filled.
template <typename T, int D, int ROWS, int NT, typename RowPtr>
__device__ __forceinline__ void cp_async_tile_sw128(uint32_t tile, RowPtr row_ptr, int head_dim, const T* any_valid) {
  using L = Sw128<T>;
  constexpr int kRowStep = NT / 8;
  static_assert(NT % 64 == 0, "rows of a thread keep their swizzle phase");
  const int c = threadIdx.x % 8;
  const int row0 = threadIdx.x / 8;
  const uint32_t dst0 = tile + row0 * 128 + ((c ^ (row0 & 7)) << 4);  // sw128_offset(row0, c, ROWS)
#pragma unroll
  for (int it = 0; it < ceil_div(ROWS, kRowStep); ++it) {
    if (ROWS % kRowStep != 0 && row0 + it * kRowStep >= ROWS) break;
    const T* src = row_ptr(row0 + it * kRowStep);
#pragma unroll
    for (int cb = 0; cb < L::blocks(D); ++cb) {
      const int col = (cb * 8 + c) * L::kChunk;
      const bool ok = src != nullptr && col < head_dim;
      cp_async16_shared(dst0 + (cb * ROWS + it * kRowStep) * 128, ok ? src + col : any_valid, ok ? 16 : 0);
    }
  }
}

// The same for a tile whose rows are `row_stride` elements apart from `first` (one address per
// tile: not paged, or inside one page); rows at or past `valid_rows` are zero-filled. No per-row
// branch: each thread steps one pointer through its rows.
template <typename T, int D, int ROWS, int NT>
__device__ __forceinline__ void cp_async_rows_sw128(uint32_t tile, const T* first, int64_t row_stride, int valid_rows,
                                                    int head_dim) {
  using L = Sw128<T>;
  constexpr int kRowStep = NT / 8;
  static_assert(NT % 64 == 0, "rows of a thread keep their swizzle phase");
  const int c = threadIdx.x % 8;
  const int row0 = threadIdx.x / 8;
  const uint32_t dst0 = tile + row0 * 128 + ((c ^ (row0 & 7)) << 4);  // sw128_offset(row0, c, ROWS)
  const T* src = first + row0 * row_stride + c * L::kChunk;
#pragma unroll
  for (int it = 0; it < ceil_div(ROWS, kRowStep); ++it) {
    if (ROWS % kRowStep != 0 && row0 + it * kRowStep >= ROWS) break;
    const bool row_ok = row0 + it * kRowStep < valid_rows;
#pragma unroll
    for (int cb = 0; cb < L::blocks(D); ++cb) {
      const bool ok = row_ok && (cb * 8 + c) * L::kChunk < head_dim;
      cp_async16_shared(dst0 + (cb * ROWS + it * kRowStep) * 128, ok ? src + cb * L::kBlock : first, ok ? 16 : 0);
    }
    src += kRowStep * row_stride;
  }
}

// ---- mbarriers, named barriers, register reallocation -----------------------------------------
// A producer warpgroup fills a ring of buffers; each buffer has a "full" mbarrier (completes when
// the producer's copies into it have landed) and an "empty" one (completes when every consumer
// warp is done reading it). Phase parity alternates each time a buffer is reused.
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Arrives on `bar` once every cp.async this thread issued so far has landed (the barrier's count
// includes this arrival: .noinc).
__device__ __forceinline__ void cp_async_mbar_arrive(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
// Waits for every cp.async of this thread, committed to a group or not.
__device__ __forceinline__ void cp_async_drain() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
// Named barriers 1..15 (0 is __syncthreads): `count` threads take part, some waiting, some arriving.
__device__ __forceinline__ void named_barrier_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int count) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
// Warpgroup-wide register reallocation: the producer gives registers back, the consumers take them.
template <int kRegs>
__device__ __forceinline__ void release_registers() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void claim_registers() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

// ---- bulk reductions into global memory -----------------------------------------------------
// `bytes` (a multiple of 16, both addresses 16-byte aligned) of float32 at shared address `src`
// added to global `dst` by the copy engine (cp.reduce.async.bulk: one instruction for a contiguous
// run, where per-thread atomics cost a shuffle and an address per 16 bytes; it takes its operands
// from uniform registers, so lanes issuing their own runs take turns). It reads shared memory
// through the async proxy: fence_proxy_async() after the writes, before the issuing thread's
// barrier. Tracked per issuing thread in bulk groups.
__device__ __forceinline__ void bulk_reduce_add_f32(float* dst, uint32_t src, uint32_t bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(dst), "r"(src),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Waits until this thread's bulk groups but the last N have read their shared memory (the buffer
// may be written again).
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}
// Waits until this thread's bulk groups but the last N are complete.
template <int N>
__device__ __forceinline__ void bulk_wait() {
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
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
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// acc (+)= A B^T over K = D with both operands K-major in the 128-byte swizzled layout: A's column
// blocks are a_rows rows apart, B's b_rows; K-step kk (16 16-bit or 32 8-bit elements) is 32 bytes
// into the rows of block kk / 4. N is B's row count (the product's N); the first step overwrites acc.
template <typename T, int N, int D, int kAcc>
__device__ __forceinline__ void wgmma_ss_k_major(float (&acc)[kAcc], uint32_t a, int a_rows, uint32_t b, int b_rows) {
#pragma unroll
  for (int kk = 0; kk < D * static_cast<int>(sizeof(T)) / 32; ++kk) {
    const uint32_t step = (kk % 4) * 32;
    Wgmma<T, N>::ss(acc, sw128_desc(a + (kk / 4) * a_rows * 128 + step, 16),
                    sw128_desc(b + (kk / 4) * b_rows * 128 + step, 16), kk > 0);
  }
}

// Reduces x[0..N) pairwise, halving the count each step (a chain over N was the sm80-class kernel's
// main stall); written as a recursion so that every step unrolls. An odd count folds its last
// element into the first.
template <int N, typename Op>
__device__ __forceinline__ float tree_reduce(float* x, Op op) {
  if constexpr (N == 1) {
    return x[0];
  } else if constexpr (N % 2 == 1) {
    x[0] = op(x[0], x[N - 1]);
    return tree_reduce<N - 1>(x, op);
  } else {
#pragma unroll
    for (int t = 0; t < N / 2; ++t) x[t] = op(x[t], x[t + N / 2]);
    return tree_reduce<N / 2>(x, op);
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace flash
