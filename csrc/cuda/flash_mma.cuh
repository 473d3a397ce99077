// Tensor-core building blocks shared by the mma.sync kernels (sm80-class): cp.async tile copies,
// ldmatrix fragment loads and the m16n8k16 mma with fp32 accumulation.
//
// Fragment layouts (PTX ISA, mma.m16n8k16, g = lane / 4, t = lane % 4):
//   A (16x16, row): a0 (g, 2t..2t+1)  a1 (g+8, 2t..)  a2 (g, 2t+8..)  a3 (g+8, 2t+8..)
//   B (16x8, col):  b0 (k = 2t..2t+1, n = g)  b1 (k = 2t+8.., n = g)
//   C (16x8):       c0 c1 (g, 2t..2t+1)  c2 c3 (g+8, 2t..2t+1)
// ldmatrix.x4 loads four 8x8 matrices whose row addresses come from lanes 0-7, 8-15, 16-23,
// 24-31; register j of lane L holds row L/4, columns 2(L%4)..+1 of matrix j (with .trans: column
// L/4, rows 2(L%4)..+1). So for a row-major tile X in shared memory:
//   A fragment of X[r0.., c0..]:          lane address X[r0 + L%8 + 8*(mi&1)][c0 + 8*(mi>>1)]
//   B fragments (two n-tiles) of X^T:     lane address X[n0 + L%8 + 8*(mi>>1)][k0 + 8*(mi&1)]
//   B fragments (two n-tiles) of X (.trans): lane address X[k0 + L%8 + 8*(mi&1)][n0 + 8*(mi>>1)]
// with mi = L / 8; and the C fragments of two adjacent 8-column tiles (2kk, 2kk+1) packed to 16 bits
// are the A fragment of columns 16kk..16kk+15 (how P and dS feed the next product from registers).
#pragma once

#include "flash_common.cuh"

namespace flash {
namespace cuda {
namespace detail {

// Row pitch (elements) of mma tiles: the 16-byte pad puts the 8 rows an ldmatrix reads in 8
// different bank groups for every head-dim bucket.
__host__ __device__ constexpr int mma_pitch(int d) { return d + 8; }

// The softmax of the tensor-core kernels runs in the log2 domain (one FFMA-class op and one ex2
// per element).
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// 2^x with the SFU (ex2.approx, flush-to-zero): 2^-inf = 0.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ uint32_t smem_addr(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// 16-byte global -> shared copy; src_bytes = 0 writes zeros and reads nothing.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes)
               : "memory");
}
// 4-byte global -> shared copy (cp.async of 4 bytes goes through L1: .ca); src_bytes = 0 writes zero.
__device__ __forceinline__ void cp_async4(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }
// Waits until at most `kPending` of this thread's most recent cp.async groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait_group() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(ptr))
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* ptr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(ptr))
               : "memory");
}

template <typename T>
__device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Adds (x, y) to addr[0..1] in global memory (8-byte aligned): one vector atomic on sm90+.
__device__ __forceinline__ void atomic_add2(float* addr, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(addr), make_float2(x, y));
#else
  atomicAdd(addr, x);
  atomicAdd(addr + 1, y);
#endif
}

// Issues the cp.async copies of a ROWS x D tile (row pitch mma_pitch(D) elements) with the NT threads
// of the CTA. Rows whose pointer is null and chunks at or past head_dim are zero-filled. Where the
// shapes allow, each thread copies one fixed 16-byte column of every (NT / chunks)-th row in an
// unrolled loop: one row address and no bounds arithmetic per copy.
template <typename T, int D, int ROWS, int NT = kThreads, typename RowPtr>
__device__ __forceinline__ void cp_async_tile(T* tile, RowPtr row_ptr, int head_dim, const T* any_valid) {
  constexpr int kChunks = D / 8;
  constexpr int kPitch = mma_pitch(D);
  if constexpr (NT % kChunks == 0 && ROWS % (NT / kChunks) == 0) {
    constexpr int kRowStep = NT / kChunks;
    const int c = threadIdx.x % kChunks;
    const bool column_ok = c * 8 < head_dim;
#pragma unroll
    for (int it = 0; it < ROWS / kRowStep; ++it) {
      const int row = threadIdx.x / kChunks + it * kRowStep;
      const T* src = column_ok ? row_ptr(row) : nullptr;
      cp_async16(tile + row * kPitch + c * 8, src != nullptr ? src + c * 8 : any_valid, src != nullptr ? 16 : 0);
    }
  } else {
    for (int idx = threadIdx.x; idx < ROWS * kChunks; idx += NT) {
      const int row = idx / kChunks;
      const int c = idx - row * kChunks;
      const T* src = c * 8 < head_dim ? row_ptr(row) : nullptr;
      cp_async16(tile + row * kPitch + c * 8, src != nullptr ? src + c * 8 : any_valid, src != nullptr ? 16 : 0);
    }
  }
}

// The same where each thread's rows are evenly strided on their own: `own_first` is the thread's
// first row (tile row threadIdx.x / (D / 8)) and `own_step` the distance to its next one (NT / (D / 8)
// tile rows on); tile rows at or past `valid_rows` are zero-filled (read from `any_valid`: nothing).
// No per-row lookup or branch: each thread steps one pointer through its rows.
template <typename T, int D, int ROWS, int NT>
__device__ __forceinline__ void cp_async_thread_rows(T* tile, const T* own_first, int64_t own_step, int valid_rows,
                                                     int head_dim, const T* any_valid) {
  constexpr int kChunks = D / 8;
  constexpr int kPitch = mma_pitch(D);
  static_assert(NT % kChunks == 0 && ROWS % (NT / kChunks) == 0, "each thread copies one column of evenly spaced rows");
  constexpr int kRowStep = NT / kChunks;
  const int c = threadIdx.x % kChunks;
  const int row0 = threadIdx.x / kChunks;
  const bool column_ok = c * 8 < head_dim;
  const T* src = own_first + c * 8;
#pragma unroll
  for (int it = 0; it < ROWS / kRowStep; ++it) {
    const bool ok = column_ok && row0 + it * kRowStep < valid_rows;
    cp_async16(tile + (row0 + it * kRowStep) * kPitch + c * 8, ok ? src : any_valid, ok ? 16 : 0);
    src += own_step;
  }
}

// A tile whose rows are `row_stride` elements apart from `first` (one address per tile: not paged,
// or inside one page).
template <typename T, int D, int ROWS, int NT>
__device__ __forceinline__ void cp_async_rows(T* tile, const T* first, int64_t row_stride, int valid_rows, int head_dim) {
  constexpr int kRowStep = NT / (D / 8);
  cp_async_thread_rows<T, D, ROWS, NT>(tile, first + (threadIdx.x / (D / 8)) * row_stride, kRowStep * row_stride,
                                       valid_rows, head_dim, first);
}

// Copies of K / V tiles (BN keys of KV head hk of sequence b) into the padded layout. start(n) finds
// where tile n's rows begin when they are evenly strided (not paged, or inside one page; else -1):
// a kernel computes it a tile ahead of the copies, so that a paged cache's block-table read (a
// global load) is not between a tile's barrier and its copies. copy() then issues one pointer per
// thread for a strided tile and falls back to a lookup per row otherwise.
template <typename T, int D, int BN, int NT>
struct KvTileCopier {
  struct Start {
    int64_t k, v;
  };
  const FlashFwdParams& p;
  const SeqInfo& si;
  int b, hk;

  __device__ __forceinline__ Start start(int n) const {
    return {kv_tile_offset(p, p.k_batch_stride, p.k_row_stride, p.k_head_stride, si, b, n * BN, BN, hk),
            kv_tile_offset(p, p.v_batch_stride, p.v_row_stride, p.v_head_stride, si, b, n * BN, BN, hk)};
  }

  __device__ __forceinline__ void copy(T* dk, T* dv, int n, const Start& at) const {
    copy_k(dk, n, at);
    copy_v(dv, n, at);
  }
  // K or V alone (kernels that wait for them separately).
  __device__ __forceinline__ void copy_k(T* dk, int n, const Start& at) const {
    copy_one(dk, static_cast<const T*>(p.k), n, at.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  }
  __device__ __forceinline__ void copy_v(T* dv, int n, const Start& at) const {
    copy_one(dv, static_cast<const T*>(p.v), n, at.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  }

 private:
  __device__ __forceinline__ void copy_one(T* tile, const T* base, int n, int64_t at, int64_t bs, int64_t rst,
                                           int64_t hs) const {
    const int j0 = n * BN;
    if constexpr (NT % (D / 8) == 0 && BN % (NT / (D / 8)) == 0) {
      if (at >= 0) {
        cp_async_rows<T, D, BN, NT>(tile, base + at, rst, si.sk - j0, p.head_dim);
        return;
      }
    }
    cp_async_tile<T, D, BN, NT>(tile, [=](int rr) -> const T* {  // this, j0 and the arguments
      if (j0 + rr >= si.sk) return nullptr;
      return base + (at >= 0 ? at + rr * rst : kv_offset(p, bs, rst, hs, si, b, j0 + rr, hk));
    }, p.head_dim, base);
  }
};

}  // namespace detail
}  // namespace cuda
}  // namespace flash
