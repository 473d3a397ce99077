// Shared pieces of the portable (sm80-class) CUDA kernels: element conversion, the per-sequence
// bookkeeping (varlen, seqused_k, leftpad_k, paged KV, cache_batch_idx), the mask and score
// modifiers of flash_params.h, the dropout stream of philox.h, shared-memory tile loads, and the
// host-side checks every entry point runs.
//
// Key positions. For sequence b the key cache holds `k_stored` rows (cu_seqlens_k[b+1] - cu_seqlens_k[b]
// for varlen, else seqlen_k). The valid keys are the cache positions [first, end) with
//   first = leftpad_k ? leftpad_k[b] : 0
//   end   = min(seqused_k ? seqused_k[b] : k_stored, k_stored)
// The kernels index keys by j = position - first, so a sequence has sk = max(0, end - first) keys
// j = 0 .. sk-1 and every formula of flash_params.h (mask, ALiBi) and philox.h (dropout column j)
// uses that j and seqlen_k = sk. This is flash-attn 2's convention: a left-padded sequence behaves
// exactly like the unpadded one. (The bottom-right alignment is the same as with absolute
// positions, since both i + sk - sq - j and the window bounds only depend on end - position.)
// Cache position `pos` of sequence b is found at
//   block_table: page block_table[b][pos / page_size], row pos % page_size (k_batch_stride = page stride)
//   varlen:      row cu_seqlens_k[b] + pos of the packed tensor
//   otherwise:   batch (cache_batch_idx ? cache_batch_idx[b] : b), row pos.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "flash_params.h"
#include "philox.h"

namespace flash {
namespace cuda {
namespace detail {

constexpr int kThreads = 128;  // threads per CTA of the SIMT kernels
constexpr int kMaxDevices = 64;  // devices a per-device memo (attributes, occupancy) holds
constexpr int kBlockM = 32;    // query rows per tile (4 threads per row)
constexpr int kBlockN = 32;    // keys per tile
constexpr int kMaxSplits = 128;
// Minimum CTAs per SM given to __launch_bounds__ of the main kernels: it is no constraint (255
// registers fit), but without it ptxas aims for higher occupancy and spills a few registers.
constexpr int kMinBlocks = 2;

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// ---- element conversion ------------------------------------------------------------------
// Tiles live in shared memory as 32-bit words holding two consecutive elements.
template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t w);
template <>
__device__ __forceinline__ float2 unpack2<__half>(uint32_t w) {
  return make_float2(__half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xFFFFu))),
                     __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16))));
}
template <>
__device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t w) {
  return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xFFFF0000u));
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  return static_cast<uint32_t>(__half_as_ushort(__float2half_rn(a))) |
         (static_cast<uint32_t>(__half_as_ushort(__float2half_rn(b))) << 16);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(a))) |
         (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(b))) << 16);
}

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xFF800000); }
__device__ __forceinline__ float pos_inf() { return __int_as_float(0x7F800000); }

// ---- per-sequence bookkeeping --------------------------------------------------------------
struct SeqInfo {
  int sq = 0;          // query rows of this sequence
  int sk = 0;          // valid keys; key j is cache position j + k_first
  int k_first = 0;     // leftpad_k[b]
  int k_stored = 0;    // key rows stored for this sequence
  int64_t q_row0 = 0;  // first q / out row of this sequence in a varlen batch
  int64_t k_row0 = 0;  // first k / v row of this sequence in a varlen batch
  int kv_batch = 0;    // batch index of k / v (cache_batch_idx)
};

__device__ __forceinline__ SeqInfo seq_info(const FlashFwdParams& p, int b) {
  SeqInfo s;
  if (p.cu_seqlens_q != nullptr) {
    s.q_row0 = p.cu_seqlens_q[b];
    s.sq = p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b];
  } else {
    s.sq = p.seqlen_q;
  }
  if (p.cu_seqlens_k != nullptr) {
    s.k_row0 = p.cu_seqlens_k[b];
    s.k_stored = p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b];
  } else {
    s.k_stored = p.seqlen_k;
  }
  const int end = p.seqused_k != nullptr ? min(p.seqused_k[b], s.k_stored) : s.k_stored;
  s.k_first = p.leftpad_k != nullptr ? max(p.leftpad_k[b], 0) : 0;
  s.sk = max(end - s.k_first, 0);
  s.kv_batch = p.cache_batch_idx != nullptr ? p.cache_batch_idx[b] : b;
  return s;
}

// Offset (elements) of row i, head h of a q-like tensor (q, out, dout, dq).
__device__ __forceinline__ int64_t q_offset(bool varlen, int64_t batch_stride, int64_t row_stride,
                                            int64_t head_stride, const SeqInfo& s, int b, int i, int h) {
  const int64_t base = varlen ? (s.q_row0 + i) * row_stride : b * batch_stride + i * row_stride;
  return base + h * head_stride;
}

// Offset (elements) of key j (after leftpad), head hk of a k-like tensor (k, v, dk, dv).
__device__ __forceinline__ int64_t kv_offset(const FlashFwdParams& p, int64_t batch_stride, int64_t row_stride,
                                             int64_t head_stride, const SeqInfo& s, int b, int j, int hk) {
  const int pos = j + s.k_first;  // a stored row (< k_stored, an int): 32-bit page division
  if (p.block_table != nullptr) {
    const int64_t page = p.block_table[b * p.block_table_batch_stride + pos / p.page_size];
    return page * batch_stride + (pos % p.page_size) * row_stride + hk * head_stride;
  }
  if (p.cu_seqlens_k != nullptr) return (s.k_row0 + pos) * row_stride + hk * head_stride;
  return static_cast<int64_t>(s.kv_batch) * batch_stride + pos * row_stride + hk * head_stride;
}

// Offset of keys j0 .. j0 + count - 1 of head hk when they are row_stride apart (not paged, or
// inside one page), else -1: tile loads then compute one address per tile instead of one per row.
__device__ __forceinline__ int64_t kv_tile_offset(const FlashFwdParams& p, int64_t batch_stride, int64_t row_stride,
                                                  int64_t head_stride, const SeqInfo& s, int b, int j0, int count,
                                                  int hk) {
  if (p.block_table != nullptr && (j0 + s.k_first) % p.page_size + count > p.page_size) return -1;
  return kv_offset(p, batch_stride, row_stride, head_stride, s, b, j0, hk);
}

// Offset of row i, head h in softmax_lse: (batch, heads_q, seqlen_q), varlen (heads_q, total_q).
__device__ __forceinline__ int64_t lse_offset(const FlashFwdParams& p, const SeqInfo& s, int b, int i, int h) {
  if (p.cu_seqlens_q != nullptr) return static_cast<int64_t>(h) * p.cu_seqlens_q[p.batch] + s.q_row0 + i;
  return (static_cast<int64_t>(b) * p.heads_q + h) * p.seqlen_q + i;
}

// ---- mask and score modifiers ---------------------------------------------------------------
// Call-wide constants the host derives once from the params.
struct ScoreArgs {
  int group = 1;          // heads_q / heads_kv
  int window_left = -1;   // -1 unbounded; clamped to 2^30 so i + offset +- window never overflows
  int window_right = -1;  // causal resolved to 0
  float softcap = 0.f;
  float inv_softcap = 0.f;
  bool dropout = false;
  uint32_t drop_threshold = 0;
  float drop_scale = 1.f;  // 1 / (1 - dropout_p)
};

// What a forward kernel receives: the params, their derived constants and the split count.
struct FwdArgs {
  FlashFwdParams p;
  ScoreArgs s;
  int num_splits;
};

// CTAs of one split of a forward call and how many CTAs of its kernel one SM holds.
struct FwdOccupancy {
  int64_t ctas;
  int per_sm;
};

// What a backward kernel receives.
struct BwdArgs {
  FlashBwdParams p;
  ScoreArgs s;
};

// Offset of (b, h, i) in the backward's Di workspace, laid out (batch, heads_q, seqlen_q) also for varlen.
__device__ __forceinline__ int64_t di_offset(const FlashFwdParams& p, int b, int h, int i) {
  return (static_cast<int64_t>(b) * p.heads_q + h) * p.seqlen_q + i;
}

// float32 dQ accumulator of the fused backwards, after Di in the workspace. The sm80-class kernel
// (flash_bwd_mma.cuh) lays it out (q row, head, head_dim) with q row = b * seqlen_q + i, or the
// varlen row; the Hopper kernel in 64-column blocks (flash_bwd_wgmma.cuh). dot_do_o_kernel zeroes it.
__host__ __device__ inline int64_t di_floats(const FlashBwdParams& p) {
  return (static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q + 3) / 4 * 4;  // keeps dQ 16-byte aligned
}
__host__ __device__ inline float* dq_accum(const FlashBwdParams& p) { return p.workspace + di_floats(p); }
__host__ __device__ inline int64_t dq_accum_q_rows(const FlashBwdParams& p) {
  return p.cu_seqlens_q != nullptr ? p.total_q : static_cast<int64_t>(p.batch) * p.seqlen_q;
}
// Its capacity: head_dim rounded up to the Hopper layout's 64-column blocks.
__host__ __device__ inline int64_t dq_accum_floats(const FlashBwdParams& p) {
  return dq_accum_q_rows(p) * p.heads_q * ((p.head_dim + 63) / 64 * 64);
}
__device__ __forceinline__ float* dq_accum_row(const FlashBwdParams& p, const SeqInfo& si, int b, int i, int h) {
  const int64_t row = p.cu_seqlens_q != nullptr ? si.q_row0 + i : static_cast<int64_t>(b) * p.seqlen_q + i;
  return dq_accum(p) + (row * p.heads_q + h) * p.head_dim;
}

// Packed row r of a KV group -> query row r / group and head offset r % group: shifts when the
// group is a power of two (the usual GQA ratios, and 1), a division otherwise.
struct GroupSplit {
  int group, shift = 0;
  __device__ __forceinline__ explicit GroupSplit(int g) : group(g) {
    while ((1 << shift) < g) ++shift;
    if ((1 << shift) != g) shift = -1;
  }
  __device__ __forceinline__ int row(int r) const { return shift >= 0 ? r >> shift : r / group; }
  __device__ __forceinline__ int head(int r) const { return shift >= 0 ? r & (group - 1) : r % group; }
  __device__ __forceinline__ bool divides(int n) const { return shift >= 0 ? (n & (group - 1)) == 0 : n % group == 0; }
};

// Query row i of a sequence with sq rows sees key j of sk keys (flash_params.h, bottom-right).
__device__ __forceinline__ bool visible(const ScoreArgs& a, int i, int j, int sq, int sk) {
  if (j >= sk) return false;
  const int diag = i + sk - sq;
  if (a.window_right >= 0 && j > diag + a.window_right) return false;
  if (a.window_left >= 0 && j < diag - a.window_left) return false;
  return true;
}

// Whether a tile of keys j0 .. j0 + bn - 1 seen by query rows i_lo .. i_hi needs the per-element
// mask: a key past the end, or a (row, key) pair outside the window (rows past the end are the
// caller's to add). offset = sk - sq, the kernels' bottom-right alignment.
__device__ __forceinline__ bool tile_needs_mask(const ScoreArgs& a, int sk, int offset, int j0, int bn, int i_lo,
                                                int i_hi) {
  return j0 + bn > sk || (a.window_right >= 0 && j0 + bn - 1 > i_lo + offset + a.window_right) ||
         (a.window_left >= 0 && j0 < i_hi + offset - a.window_left);
}

struct BlockRange {
  int begin, end;
};
// Key blocks [begin, end) of bn keys holding a key that some query row i_lo .. i_hi may see under the
// window bounds; the kernels mask the single (row, key) pairs, and keys past sk, per element.
__device__ __forceinline__ BlockRange visible_key_blocks(const ScoreArgs& a, const SeqInfo& si, int i_lo, int i_hi,
                                                        int bn) {
  const int offset = si.sk - si.sq;
  int j_begin = 0, j_end = si.sk;
  if (a.window_right >= 0) j_end = min(j_end, i_hi + offset + a.window_right + 1);
  if (a.window_left >= 0) j_begin = max(j_begin, i_lo + offset - a.window_left);
  const int n_begin = j_begin / bn;
  return {n_begin, j_end > j_begin ? ceil_div(j_end, bn) : n_begin};
}
// The backward's walk over a key block: blocks [begin, end) of bm packed rows (rows of a KV group of
// `group` query heads) holding a row that may see one of the keys j0 .. j0 + bn - 1.
__device__ __forceinline__ BlockRange visible_row_blocks(const ScoreArgs& a, const SeqInfo& si, int j0, int bn,
                                                         int bm) {
  const int offset = si.sk - si.sq;
  const int j_last = min(si.sk, j0 + bn) - 1;
  int i_lo = 0, i_hi = si.sq - 1;
  if (a.window_right >= 0) i_lo = max(i_lo, j0 - offset - a.window_right);
  if (a.window_left >= 0) i_hi = min(i_hi, j_last + a.window_left - offset);
  if (i_lo > i_hi) return {0, 0};
  return {i_lo * a.group / bm, ceil_div((i_hi + 1) * a.group, bm)};
}
// Split `split` of `splits` contiguous, equal shares of the blocks (the last ones may be short or empty).
__device__ __forceinline__ BlockRange split_share(BlockRange blocks, int split, int splits) {
  const int per_split = ceil_div(blocks.end - blocks.begin, splits);
  const int lo = min(blocks.end, blocks.begin + split * per_split);
  return {lo, min(blocks.end, lo + per_split)};
}

// Scaled score -> modified score (softcap, then ALiBi). `dcap` receives d(modified)/d(scaled).
__device__ __forceinline__ float modify_score(const ScoreArgs& a, float x, float slope, int i, int j, int sq,
                                              int sk, float& dcap) {
  dcap = 1.f;
  if (a.softcap > 0.f) {
    const float t = tanhf(x * a.inv_softcap);
    x = a.softcap * t;
    dcap = 1.f - t * t;
  }
  if (slope != 0.f) x -= slope * fabsf(static_cast<float>(i + sk - sq - j));
  return x;
}

// Keep flags of keys j0 .. j0+3 (j0 a multiple of 4) of row i: one Philox call.
__device__ __forceinline__ void dropout_keep4(const FlashFwdParams& p, const ScoreArgs& a, int64_t bh, int i, int j0,
                                              bool keep[4]) {
  const Philox4 r = dropout_randoms(p.philox_seed, p.philox_offset, bh, i, j0);
  keep[0] = r.x >= a.drop_threshold;
  keep[1] = r.y >= a.drop_threshold;
  keep[2] = r.z >= a.drop_threshold;
  keep[3] = r.w >= a.drop_threshold;
}

// ---- shared-memory tiles --------------------------------------------------------------------
// A tile of ROWS rows of D (head-dim bucket) elements, stored as D/2 + 1 words per row: the odd
// row pitch makes the column accesses of different rows hit different banks. Columns at or past
// head_dim and rows whose pointer is null are zero, so the dot products over the bucket are exact
// and no uninitialized value (possibly NaN) reaches an accumulator.
template <int D>
struct Tile {
  static constexpr int kPitch = D / 2 + 1;  // words
};

template <typename T, int D, int ROWS, typename RowPtr>
__device__ __forceinline__ void load_tile(uint32_t* tile, RowPtr row_ptr, int head_dim) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  constexpr int kPitch = Tile<D>::kPitch;
  for (int idx = threadIdx.x; idx < ROWS * kChunks; idx += kThreads) {
    const int row = idx / kChunks;
    const int c = idx - row * kChunks;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (c * 8 < head_dim) {
      const T* src = row_ptr(row);
      if (src != nullptr) v = *reinterpret_cast<const uint4*>(src + c * 8);
    }
    uint32_t* dst = tile + row * kPitch + c * 4;
    dst[0] = v.x;
    dst[1] = v.y;
    dst[2] = v.z;
    dst[3] = v.w;
  }
}

// The S-tile element c (0..7) of a thread in quad position `quad` is key (c/4)*16 + quad*4 + c%4:
// each group of 4 consecutive keys starts at a multiple of 4, so one Philox call covers it.
__device__ __forceinline__ int key_of(int quad, int c) { return (c >> 2) * 16 + quad * 4 + (c & 3); }

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xFFFFFFFFu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xFFFFFFFFu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xFFFFFFFFu, x, 1);
  return x + __shfl_xor_sync(0xFFFFFFFFu, x, 2);
}

// dK / dV of the stored key rows [pos0, pos0 + count) that are not valid keys (before leftpad_k or
// at / past seqused_k) are zero: the backward writes every row of dk and dv.
template <typename T>
__device__ __forceinline__ void zero_unused_key_rows(const FlashBwdParams& p, const SeqInfo& si, int b, int hk,
                                                     int pos0, int count) {
  const int words = p.head_dim / 2;
  for (int idx = threadIdx.x; idx < count * words; idx += blockDim.x) {
    const int row = idx / words;
    const int pos = pos0 + row;
    if (pos >= si.k_stored || (pos >= si.k_first && pos < si.k_first + si.sk)) continue;
    const int d = 2 * (idx - row * words);
    const int j = pos - si.k_first;  // kv_offset adds k_first back
    *reinterpret_cast<uint32_t*>(static_cast<T*>(p.dk) +
                                 kv_offset(p, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride, si, b, j, hk) + d) = 0u;
    *reinterpret_cast<uint32_t*>(static_cast<T*>(p.dv) +
                                 kv_offset(p, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride, si, b, j, hk) + d) = 0u;
  }
}

// ---- host side ----------------------------------------------------------------------------------
inline void throw_invalid(const std::string& where, const std::string& what) {
  throw std::invalid_argument("flash_attn CUDA " + where + ": " + what);
}

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("flash_attn CUDA: ") + what + " failed: " + cudaGetErrorString(err));
  }
}

// Checks the launch just made (configuration errors) without synchronizing.
inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

template <typename Kernel>
inline void set_smem(Kernel kernel, size_t bytes, const char* name) {
  if (bytes > 48 * 1024) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
               name);
  }
}

// Kernel-selection switches read from the environment on every call:
//   FLASH_ATTN_CUDA_SIMT=1     SIMT kernels only (tells a tensor-core bug from a contract bug)
inline bool env_flag(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && value[0] == '1';
}

// Whether the Hopper (sm90a) kernels may run on the current device: it runs this library's sm_90a
// code (an sm90 device could be running code built for sm80), and neither FLASH_ATTN_CUDA_HOPPER=0
// nor FLASH_ATTN_CUDA_SIMT=1 is set (so the sm80-class kernels stay testable on an H100). In flash_fwd.cu.
// Whether the current device runs this library's sm_90a code (an sm90 device could be running code
// built for sm80), and whether the 16-bit calls take it (FLASH_ATTN_CUDA_HOPPER=0 and
// FLASH_ATTN_CUDA_SIMT=1 keep them on the sm80-class kernels; FP8 has no other path).
bool sm90a_code_available();
bool hopper_kernels_enabled();

// The backward accumulates dQ in float32 with atomics (one pass over S and dP) unless the call
// asks for determinism; dropout runs on the SIMT kernels.
inline bool bwd_fused_dq(const FlashBwdParams& p) { return !p.deterministic && p.dropout_p == 0.f; }

// Largest dynamic shared memory a block of the current device can opt into.
inline size_t max_smem_optin() {
  int device = 0, bytes = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  return static_cast<size_t>(bytes);
}

inline bool aligned16(const void* ptr) { return ptr == nullptr || (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

// Validates what every CUDA entry point relies on; throws std::invalid_argument naming the field.
inline void validate_common(const FlashFwdParams& p, const std::string& where) {
  auto need = [&](bool ok, const std::string& what) {
    if (!ok) throw_invalid(where, what);
  };
  const bool fp8 = p.dtype == DType::kFloat8E4M3;
  need(p.dtype == DType::kFloat16 || p.dtype == DType::kBFloat16 || fp8,
       "dtype must be float16, bfloat16 or float8_e4m3, got DType(" + std::to_string(static_cast<int>(p.dtype)) + ")");
  const int chunk = fp8 ? 16 : 8;  // elements per 16 bytes
  need(p.head_dim > 0 && p.head_dim <= 256 && p.head_dim % 8 == 0,
       "head_dim must be a multiple of 8 in [8, 256], got " + std::to_string(p.head_dim));
  need(p.batch >= 0 && p.batch <= 65535, "batch must be in [0, 65535], got " + std::to_string(p.batch));
  need(p.seqlen_q >= 0 && p.seqlen_k >= 0, "seqlen_q / seqlen_k must be >= 0, got " + std::to_string(p.seqlen_q) +
                                               " / " + std::to_string(p.seqlen_k));
  need(p.heads_kv > 0 && p.heads_q > 0 && p.heads_q % p.heads_kv == 0,
       "heads_q must be a positive multiple of heads_kv, got heads_q=" + std::to_string(p.heads_q) +
           " heads_kv=" + std::to_string(p.heads_kv));
  // Empty tensors may have null data pointers; only what a kernel reads must be set.
  const bool has_q = p.batch > 0 && p.seqlen_q > 0;
  const bool has_k = p.batch > 0 && p.seqlen_k > 0;
  need(!has_q || (p.q != nullptr && p.out != nullptr), "q and out must be set");
  need(!has_k || (p.k != nullptr && p.v != nullptr), "k and v must be set");
  need(aligned16(p.q) && aligned16(p.k) && aligned16(p.v) && aligned16(p.out),
       "q, k, v and out must be 16-byte aligned");
  const int64_t strides[] = {p.q_batch_stride, p.q_row_stride, p.q_head_stride, p.k_batch_stride,
                             p.k_row_stride,   p.k_head_stride, p.v_batch_stride, p.v_row_stride,
                             p.v_head_stride, p.o_batch_stride, p.o_row_stride, p.o_head_stride};
  for (int64_t s : strides) {
    need(s % chunk == 0, "q/k/v/out strides must be multiples of " + std::to_string(chunk) +
                             " elements (16 bytes), got " + std::to_string(s));
  }
  if (fp8) {
    need(p.head_dim % 16 == 0, "float8_e4m3 head_dim must be a multiple of 16, got " + std::to_string(p.head_dim));
    need(p.softcap == 0.f && p.alibi_slopes == nullptr && p.dropout_p == 0.f,
         "float8_e4m3 attention has no softcap, ALiBi or dropout");
    need(p.softmax_scale > 0.f, "float8_e4m3 attention needs softmax_scale > 0, got " + std::to_string(p.softmax_scale));
  }
  need(p.softmax_scale == p.softmax_scale, "softmax_scale is NaN");
  need(p.softcap >= 0.f, "softcap must be >= 0, got " + std::to_string(p.softcap));
  need(p.dropout_p >= 0.f && p.dropout_p < 1.f, "dropout_p must be in [0, 1), got " + std::to_string(p.dropout_p));
  need(p.block_table == nullptr || p.page_size > 0,
       "page_size must be > 0 with block_table, got " + std::to_string(p.page_size));
  need(p.block_table == nullptr || p.cache_batch_idx == nullptr,
       "cache_batch_idx cannot be combined with block_table (a paged cache is indexed through block_table)");
}

inline ScoreArgs make_score_args(const FlashFwdParams& p) {
  constexpr int kWindowCap = 1 << 30;
  ScoreArgs a;
  a.group = p.heads_q / p.heads_kv;
  a.window_left = p.window_left < 0 ? -1 : (p.window_left > kWindowCap ? kWindowCap : p.window_left);
  a.window_right = p.is_causal ? 0 : (p.window_right < 0 ? -1 : (p.window_right > kWindowCap ? kWindowCap : p.window_right));
  a.softcap = p.softcap;
  a.inv_softcap = p.softcap > 0.f ? 1.f / p.softcap : 0.f;
  a.dropout = p.dropout_p > 0.f;
  a.drop_threshold = dropout_threshold(p.dropout_p);
  a.drop_scale = a.dropout ? 1.f / (1.f - p.dropout_p) : 1.f;
  return a;
}

// Calls f(std::integral_constant<int, D>) for the head-dim bucket of head_dim.
template <typename F>
inline void dispatch_head_dim(int head_dim, F&& f) {
  if (head_dim <= 32) return f(std::integral_constant<int, 32>{});
  if (head_dim <= 64) return f(std::integral_constant<int, 64>{});
  if (head_dim <= 96) return f(std::integral_constant<int, 96>{});
  if (head_dim <= 128) return f(std::integral_constant<int, 128>{});
  if (head_dim <= 160) return f(std::integral_constant<int, 160>{});
  if (head_dim <= 192) return f(std::integral_constant<int, 192>{});
  if (head_dim <= 224) return f(std::integral_constant<int, 224>{});
  return f(std::integral_constant<int, 256>{});
}

// Calls f(std::integral_constant<int, D>) for the Hopper kernels' tile width D of head_dim: head_dim
// rounded up to whole 128-byte swizzle rows (64, 128, 192, 256); the columns past head_dim are zero.
template <typename F>
inline void dispatch_hopper_head_dim(int head_dim, F&& f) {
  if (head_dim <= 64) return f(std::integral_constant<int, 64>{});
  if (head_dim <= 128) return f(std::integral_constant<int, 128>{});
  if (head_dim <= 192) return f(std::integral_constant<int, 192>{});
  return f(std::integral_constant<int, 256>{});
}

// Calls f(std::integral_constant<int, D>) for the FP8 forward's tile width D of head_dim (64, 128 or
// 256; the columns past head_dim are zero).
template <typename F>
inline void dispatch_fp8_head_dim(int head_dim, F&& f) {
  if (head_dim <= 64) return f(std::integral_constant<int, 64>{});
  if (head_dim <= 128) return f(std::integral_constant<int, 128>{});
  return f(std::integral_constant<int, 256>{});
}

// The FP8 forward's copy of V, transposed: (batch, heads_kv, head_dim, fp8_vt_keys) bytes, key
// columns padded to whole 128-key tiles with zeros.
__host__ __device__ inline int fp8_vt_keys(const FlashFwdParams& p) { return (p.seqlen_k + 127) / 128 * 128; }

// Calls f(T{}) with T the element type of a 16-bit dtype (validated before; the FP8 forward has
// its own path).
template <typename F>
inline void dispatch_dtype(DType dtype, F&& f) {
  if (dtype == DType::kFloat16) return f(__half{});
  return f(__nv_bfloat16{});
}

}  // namespace detail
}  // namespace cuda
}  // namespace flash
