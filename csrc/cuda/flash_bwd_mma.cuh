// Tensor-core backward (sm80-class mma.sync) without dropout.
//   bwd_tiled_mma_kernel  the default where the shared memory allows (sm90 and sm100; on sm80
//                    head dims 32, 96 and 160): FlashAttention-2's partition. A CTA of 8 warps owns
//                    BN keys (dK, dV in registers) and walks the query rows in double-buffered steps
//                    of BM packed rows (the rows of the KV group's heads): S = Q K^T and dP = dO V^T,
//                    P and dS through shared memory, dV += P^T dO, dQ += dS K (float32 atomics into
//                    the workspace; dq_convert_kernel then writes dq), dK += dS^T Q, each product on
//                    its own grid of warps (BwdTiledShape).
//   dkdv_mma_kernel  the fallback elsewhere, with 4 warps: kWarps warps x 16 keys, P^T and dS^T fed
//                    from registers (flash_mma.cuh); per step of kRowsPerStep packed rows:
//                    S^T = K Q^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q. kFusedDq: also
//                    dQ += dS K through dS^T in shared memory and float32 atomics. Without it (the
//                    deterministic backward), dq_mma_kernel computes dQ.
//   dq_mma_kernel    deterministic calls (head dims <= 128): dQ by its own kernel over key blocks,
//                    S = Q K^T, dP = dO V^T, dS = P (dP - Di) cap' scale, dQ += dS K, no atomics.
// dkdv_mma_kernel splits head dims above 128 into kDSplit CTAs per key block, each recomputing S^T
// and dP^T, so the accumulators fit the registers; their shared memory (up to 141 KB at 256 with 4
// warps) exceeds what sm86/sm89/sm120 offer, where they fall back to the SIMT kernels.
// As in the forward (flash_fwd_mma.cuh), kPlain instantiations (no softcap, no ALiBi) have no
// modifier code and compute P = 2^(S scale log2(e) - lse log2(e)), and the mask runs only on tiles
// some (row, key) pair of which is not visible.
#pragma once

#include <type_traits>

#include "flash_mma.cuh"

namespace flash {
namespace cuda {
namespace detail {

// kWarps: warps of the dK/dV kernel, 16 keys each (more keys per CTA: fewer dQ atomics and Q / dO
// copies per product); kRowsPerStep: packed query rows of its steps.
template <int D, int kWarps = 4, int kRowsPerStep = 32>
struct BwdMmaTraits {
  static constexpr int kBlockM = 64;                // dq: packed query rows per CTA
  static constexpr int kBlockN = D <= 64 ? 64 : 32; // dq: keys per step
  static constexpr int kDkdvThreads = 32 * kWarps;
  static constexpr int kKeys = 16 * kWarps;         // dkdv: keys per CTA
  static constexpr int kRows = kRowsPerStep;        // dkdv: packed query rows per step
  static constexpr int kDSplit = D <= 128 ? 1 : 2;  // dkdv: CTAs per key block, each D / kDSplit columns
  static constexpr int kDAcc = D / kDSplit;
  static constexpr int kPitch = mma_pitch(D);
  static constexpr int kDsPitch = kRows + 8;        // dS^T tile [kKeys][kDsPitch]
  static constexpr size_t kDqSmem = sizeof(uint16_t) * (2 * kBlockM + 4 * kBlockN) * kPitch;
  static constexpr size_t kDkdvSmem =
      sizeof(uint16_t) * ((2 * kKeys + 4 * kRows) * kPitch + kKeys * kDsPitch) + 8 * sizeof(float) * kRows;
};

// Copies of the dK/dV kernels' row blocks: BR packed query rows (the rows of KV head hk's group of
// query heads) from block mb on. Q and dO go through cp.async into [BR][mma_pitch(D)] tiles, lse and
// Di through 4-byte cp.async (a plain load would hold the thread, and the block's next barrier, for a
// global round trip), the ALiBi slope and the query row (-1 past the end) by plain stores.
// Where the group divides the copies' row step, a thread's packed rows keep their heads from block
// to block and move by BR / group query rows: with kCarry the copier computes their offsets once
// (for block `first`) and a block adds a multiple of a constant, no offset arithmetic per block
// (the copies' address math was a sixth of the tiled kernel's loop, v16). The carried offsets live
// in registers: at head dim 256 they spill, so the tiled kernel carries them up to 128.
template <typename T, int D, int BR, int NT, bool kPlain, bool kCarry = false>
struct RowBlockCopier {
  static constexpr int kChunks = D / 8;
  static constexpr bool kStrideable = NT % kChunks == 0 && BR % (NT / kChunks) == 0;
  static constexpr int kRowStep = kStrideable ? NT / kChunks : 1;  // a thread's rows of a block, packed
  const FlashBwdParams& p;
  const SeqInfo& si;
  const GroupSplit& gs;
  int b, hk, rows;
  // kCarry: block `first`'s offsets of this thread's first Q / dO row, and of packed row tid's
  // lse / Di and query row.
  int first = 0;
  int64_t q_at = 0, do_at = 0, lse_at = 0, di_at = 0;
  int qi_at = 0;

  __device__ __forceinline__ RowBlockCopier(const FlashBwdParams& p_, const SeqInfo& si_, const GroupSplit& gs_,
                                            int b_, int hk_, int rows_, int first_ = 0)
      : p(p_), si(si_), gs(gs_), b(b_), hk(hk_), rows(rows_), first(first_) {
    if constexpr (kCarry) {
      if (!strided()) return;
      const bool varlen = p.cu_seqlens_q != nullptr;
      const int tid = threadIdx.x;
      int r = first * BR + tid / kChunks;
      int i = gs.row(r), h = hk * gs.group + gs.head(r);
      q_at = q_offset(varlen, p.q_batch_stride, p.q_row_stride, p.q_head_stride, si, b, i, h);
      do_at = q_offset(varlen, p.do_batch_stride, p.do_row_stride, p.do_head_stride, si, b, i, h);
      r = first * BR + tid % BR;
      qi_at = gs.row(r);
      h = hk * gs.group + gs.head(r);
      lse_at = lse_offset(p, si, b, qi_at, h);
      di_at = di_offset(p, b, h, qi_at);
    }
  }

  // The group divides kRowStep: each thread's rows share a head (one pointer per thread for Q / dO).
  __device__ __forceinline__ bool strided() const { return kStrideable && gs.divides(kRowStep); }

  __device__ __forceinline__ void copy(int mb, T* tQ, T* tdO, float* lse, float* di, float* slope, int* qi) const {
    const int group = gs.group;
    const int r0 = mb * BR;
    const int tid = threadIdx.x;
    const bool varlen = p.cu_seqlens_q != nullptr;
    const T* q = static_cast<const T*>(p.q);
    const T* dout = static_cast<const T*>(p.dout);
    if constexpr (kCarry && kStrideable) {
      if (strided()) {
        // gs.row: shifts for a power-of-two group, not a division per block.
        const int64_t moved = static_cast<int64_t>(mb - first) * gs.row(BR);  // query rows since `first`
        const int64_t gap = gs.row(kRowStep);  // query rows between a thread's rows of one block
        cp_async_thread_rows<T, D, BR, NT>(tQ, q + q_at + moved * p.q_row_stride, gap * p.q_row_stride, rows - r0,
                                           p.head_dim, q);
        cp_async_thread_rows<T, D, BR, NT>(tdO, dout + do_at + moved * p.do_row_stride, gap * p.do_row_stride,
                                           rows - r0, p.head_dim, dout);
        if (tid < BR) {
          const bool ok = r0 + tid < rows;
          qi[tid] = ok ? qi_at + static_cast<int>(moved) : -1;
          cp_async4(lse + tid, p.softmax_lse + (ok ? lse_at + moved : 0), ok ? 4 : 0);
          cp_async4(di + tid, p.workspace + (ok ? di_at + moved : 0), ok ? 4 : 0);
          slope[tid] = !kPlain && p.alibi_slopes != nullptr
                           ? p.alibi_slopes[b * p.alibi_batch_stride + hk * group + gs.head(r0 + tid)]
                           : 0.f;
        }
        return;
      }
    }
    // Packed rows r0 + row, r0 + row + kRowStep, ... of one thread share a head when the group
    // divides kRowStep, and are then kRowStep / group query rows apart: one pointer per thread.
    bool strided = false;
    if constexpr (kStrideable) {
      if (gs.divides(kRowStep)) {
        const int r = r0 + tid / kChunks;  // this thread's first packed row
        const int i = gs.row(r), h = hk * group + gs.head(r);
        const int64_t step = gs.row(kRowStep);
        cp_async_thread_rows<T, D, BR, NT>(
            tQ, q + q_offset(varlen, p.q_batch_stride, p.q_row_stride, p.q_head_stride, si, b, i, h),
            step * p.q_row_stride, rows - r0, p.head_dim, q);
        cp_async_thread_rows<T, D, BR, NT>(
            tdO, dout + q_offset(varlen, p.do_batch_stride, p.do_row_stride, p.do_head_stride, si, b, i, h),
            step * p.do_row_stride, rows - r0, p.head_dim, dout);
        strided = true;
      }
    }
    if (!strided) {
      auto q_rows = [&](const T* base, int64_t bs, int64_t rst, int64_t hs) {
        return [=](int rw) -> const T* {
          const int r = r0 + rw;
          if (r >= rows) return nullptr;
          return base + q_offset(varlen, bs, rst, hs, si, b, gs.row(r), hk * gs.group + gs.head(r));
        };
      };
      cp_async_tile<T, D, BR, NT>(tQ, q_rows(q, p.q_batch_stride, p.q_row_stride, p.q_head_stride), p.head_dim, q);
      cp_async_tile<T, D, BR, NT>(tdO, q_rows(dout, p.do_batch_stride, p.do_row_stride, p.do_head_stride),
                                  p.head_dim, dout);
    }
    if (tid < BR) {
      const int r = r0 + tid;
      const bool ok = r < rows;
      const int i = ok ? gs.row(r) : 0;
      const int h = hk * group + (ok ? gs.head(r) : 0);
      qi[tid] = ok ? i : -1;
      cp_async4(lse + tid, p.softmax_lse + lse_offset(p, si, b, i, h), ok ? 4 : 0);
      cp_async4(di + tid, p.workspace + di_offset(p, b, h, i), ok ? 4 : 0);
      slope[tid] = !kPlain && p.alibi_slopes != nullptr ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.f;
    }
  }
};

// Adds a warp's 16-row dQ tile (C fragments of kN 8-column tiles, tile t at column col0 + 8t) to
// the float32 accumulator: each thread adds its two floats of row g (`row_lo`) and of row g + 8
// (`row_hi`) per tile, one float2 atomic each on sm90 (two scalar ones before). Null rows (past the
// end) and columns at or past col_end (a multiple of 8) are not added. (Trading halves between lanes
// for float4 atomics halved the atomics but cost more in shuffles, selects and moves: the dQ
// atomics were 178 of the D = 128 loop's 1131 instructions per warp and row block, v18.)
template <int kN>
__device__ __forceinline__ void atomic_add_dq_tile(float* row_lo, float* row_hi, const float (&dq)[kN][4], int col0,
                                                   int col_end) {
  const int c = col0 + 2 * (threadIdx.x & 3);
  if (col0 + 8 * kN <= col_end) {
    // Every column in range: one branch per row around its kN atomics, off one address (the
    // columns are immediate offsets).
    if (row_lo != nullptr) {
      float* at = row_lo + c;
#pragma unroll
      for (int t = 0; t < kN; ++t) atomic_add2(at + 8 * t, dq[t][0], dq[t][1]);
    }
    if (row_hi != nullptr) {
      float* at = row_hi + c;
#pragma unroll
      for (int t = 0; t < kN; ++t) atomic_add2(at + 8 * t, dq[t][2], dq[t][3]);
    }
    return;
  }
#pragma unroll
  for (int t = 0; t < kN; ++t) {
    if (col0 + 8 * t >= col_end) break;
    if (row_lo != nullptr) atomic_add2(row_lo + c + 8 * t, dq[t][0], dq[t][1]);
    if (row_hi != nullptr) atomic_add2(row_hi + c + 8 * t, dq[t][2], dq[t][3]);
  }
}

template <typename T, int D, bool kPlain>
__global__ void __launch_bounds__(kThreads, 1) dq_mma_kernel(const BwdArgs args) {
  using Tr = BwdMmaTraits<D>;
  constexpr int BM = Tr::kBlockM;
  constexpr int BN = Tr::kBlockN;
  constexpr int kPitch = Tr::kPitch;
  constexpr int kNT = BN / 8;
  constexpr int kDT = D / 8;
  extern __shared__ __align__(16) uint16_t smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + BM * kPitch;
  T* sK = sdO + BM * kPitch;     // [2][BN][kPitch]
  T* sV = sK + 2 * BN * kPitch;  // [2][BN][kPitch]

  const FlashBwdParams& p = args.p;
  const ScoreArgs& sa = args.s;
  const int b = blockIdx.z;
  const int hk = blockIdx.y;
  const SeqInfo si = seq_info(p, b);
  const int group = sa.group;
  const int rows = si.sq * group;
  const int r0 = blockIdx.x * BM;
  if (r0 >= rows) return;
  const bool varlen = p.cu_seqlens_q != nullptr;

  const int i_lo = r0 / group;
  const int i_hi = (min(r0 + BM, rows) - 1) / group;
  const int offset = si.sk - si.sq;
  const BlockRange blocks = visible_key_blocks(sa, si, i_lo, i_hi, BN);
  const int n_begin = blocks.begin, n_end = blocks.end;

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane >> 2;
  const int tq = lane & 3;
  const int mi = lane >> 3;
  const int rr = lane & 7;
  struct Row {
    bool ok;
    int i, h;
    float lse, di, slope;
  } row[2];
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int r = r0 + warp * 16 + g + 8 * e;
    row[e].ok = r < rows;
    row[e].i = row[e].ok ? r / group : 0;
    row[e].h = hk * group + (row[e].ok ? r % group : 0);
    row[e].lse = row[e].ok ? p.softmax_lse[lse_offset(p, si, b, row[e].i, row[e].h)] : 0.f;
    if (kPlain) row[e].lse *= kLog2e;
    row[e].di = row[e].ok ? p.workspace[di_offset(p, b, row[e].h, row[e].i)] : 0.f;
    row[e].slope = !kPlain && p.alibi_slopes != nullptr ? p.alibi_slopes[b * p.alibi_batch_stride + row[e].h] : 0.f;
  }
  const float scale_log2 = p.softmax_scale * kLog2e;

  const T* q = static_cast<const T*>(p.q);
  const T* dout = static_cast<const T*>(p.dout);
  auto q_rows = [&](const T* base, int64_t bs, int64_t rst, int64_t hs) {
    return [=, &si](int rw) -> const T* {
      const int r = r0 + rw;
      if (r >= rows) return nullptr;
      return base + q_offset(varlen, bs, rst, hs, si, b, r / group, hk * group + r % group);
    };
  };
  const KvTileCopier<T, D, BN, kThreads> kv{p, si, b, hk};
  using KvStart = typename KvTileCopier<T, D, BN, kThreads>::Start;
  auto load_kv = [&](int n, int buf, const KvStart& at) {
    kv.copy(sK + buf * BN * kPitch, sV + buf * BN * kPitch, n, at);
  };

  float acc[kDT][4];
#pragma unroll
  for (int t = 0; t < kDT; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;

  if (n_begin < n_end) {
    cp_async_tile<T, D, BM>(sQ, q_rows(q, p.q_batch_stride, p.q_row_stride, p.q_head_stride), p.head_dim, q);
    cp_async_tile<T, D, BM>(sdO, q_rows(dout, p.do_batch_stride, p.do_row_stride, p.do_head_stride), p.head_dim, dout);
    load_kv(n_begin, 0, kv.start(n_begin));
    cp_async_commit();
  }
  KvStart ahead{-1, -1};  // start of the next tile to copy, found a tile ahead
  if (n_begin + 1 < n_end) ahead = kv.start(n_begin + 1);

  for (int n = n_begin; n < n_end; ++n) {
    const int buf = (n - n_begin) & 1;
    cp_async_wait_all();
    __syncthreads();  // tile n visible; every warp is done with buffer buf^1
    if (n + 1 < n_end) {
      load_kv(n + 1, buf ^ 1, ahead);
      cp_async_commit();
    }
    if (n + 2 < n_end) ahead = kv.start(n + 2);
    const T* cK = sK + buf * BN * kPitch;
    const T* cV = sV + buf * BN * kPitch;
    const int j0 = n * BN;

    float s[kNT][4], dp[kNT][4];
#pragma unroll
    for (int t = 0; t < kNT; ++t) {
#pragma unroll
      for (int c = 0; c < 4; ++c) s[t][c] = dp[t][c] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t aq[4], ao[4];
      ldmatrix_x4(aq, sQ + (warp * 16 + rr + (mi & 1) * 8) * kPitch + kk * 16 + (mi >> 1) * 8);
      ldmatrix_x4(ao, sdO + (warp * 16 + rr + (mi & 1) * 8) * kPitch + kk * 16 + (mi >> 1) * 8);
#pragma unroll
      for (int t2 = 0; t2 < kNT / 2; ++t2) {
        uint32_t bk[4], bv[4];
        ldmatrix_x4(bk, cK + (t2 * 16 + rr + (mi >> 1) * 8) * kPitch + kk * 16 + (mi & 1) * 8);
        ldmatrix_x4(bv, cV + (t2 * 16 + rr + (mi >> 1) * 8) * kPitch + kk * 16 + (mi & 1) * 8);
        mma_16816<T>(s[2 * t2], aq, bk[0], bk[1]);
        mma_16816<T>(s[2 * t2 + 1], aq, bk[2], bk[3]);
        mma_16816<T>(dp[2 * t2], ao, bv[0], bv[1]);
        mma_16816<T>(dp[2 * t2 + 1], ao, bv[2], bv[3]);
      }
    }
    // dS in place of s; c0,c1 belong to row[0], c2,c3 to row[1]. The tile needs the mask unless
    // every row of the CTA sees every key of it.
    const bool need_mask = r0 + BM > rows || tile_needs_mask(sa, si.sk, offset, j0, BN, i_lo, i_hi);
#pragma unroll
    for (int t = 0; t < kNT; ++t) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const auto& rw = row[c >> 1];
        const int j = j0 + t * 8 + tq * 2 + (c & 1);
        float ds = 0.f;
        if (kPlain) {
          if (!need_mask || (rw.ok && visible(sa, rw.i, j, si.sq, si.sk))) {
            ds = fast_exp2(s[t][c] * scale_log2 - rw.lse) * (dp[t][c] - rw.di) * p.softmax_scale;
          }
        } else if (rw.ok && visible(sa, rw.i, j, si.sq, si.sk)) {
          float dcap;
          const float x = modify_score(sa, s[t][c] * p.softmax_scale, rw.slope, rw.i, j, si.sq, si.sk, dcap);
          const float prob = __expf(x - rw.lse);
          ds = prob * (dp[t][c] - rw.di) * dcap * p.softmax_scale;
        }
        s[t][c] = ds;
      }
    }
    // dQ += dS K: the dS accumulators of column tiles 2kk, 2kk+1 are the A fragment of keys 16kk..
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[4];
      a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int t2 = 0; t2 < kDT / 2; ++t2) {
        uint32_t bk[4];
        ldmatrix_x4_trans(bk, cK + (kk * 16 + rr + (mi & 1) * 8) * kPitch + t2 * 16 + (mi >> 1) * 8);
        mma_16816<T>(acc[2 * t2], a, bk[0], bk[1]);
        mma_16816<T>(acc[2 * t2 + 1], a, bk[2], bk[3]);
      }
    }
  }

#pragma unroll
  for (int e = 0; e < 2; ++e) {
    if (!row[e].ok) continue;
    T* dq = static_cast<T*>(p.dq) +
            q_offset(varlen, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride, si, b, row[e].i, row[e].h);
#pragma unroll
    for (int t = 0; t < kDT; ++t) {
      const int d = t * 8 + tq * 2;
      if (d < p.head_dim) *reinterpret_cast<uint32_t*>(dq + d) = pack2<T>(acc[t][2 * e], acc[t][2 * e + 1]);
    }
  }
}

template <typename T, int D, bool kPlain, bool kFusedDq, int kWarps, int kRowsPerStep>
__global__ void __launch_bounds__(32 * kWarps, 1) dkdv_mma_kernel(const BwdArgs args) {
  using Tr = BwdMmaTraits<D, kWarps, kRowsPerStep>;
  constexpr int kCtaThreads = Tr::kDkdvThreads;
  constexpr int BK = Tr::kKeys;
  constexpr int BR = Tr::kRows;
  constexpr int kPitch = Tr::kPitch;
  constexpr int kDsPitch = Tr::kDsPitch;
  constexpr int kRT = BR / 8;         // 8-row column tiles of S^T
  constexpr int kAT = Tr::kDAcc / 8;  // 8-column tiles of this CTA's dK / dV columns
  static_assert(Tr::kDSplit == 1 || kFusedDq, "split head dims run the fused backward only");
  extern __shared__ __align__(16) uint16_t smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + BK * kPitch;
  T* sQ = sV + BK * kPitch;        // [2][BR][kPitch]
  T* sdO = sQ + 2 * BR * kPitch;   // [2][BR][kPitch]
  T* sdS = sdO + 2 * BR * kPitch;  // [BK][kDsPitch]: dS^T of the current row block (kFusedDq)
  // Row scalars of the two buffered row blocks, [2][BR] each.
  float* sLse = reinterpret_cast<float*>(sdS + BK * kDsPitch);
  float* sDi = sLse + 2 * BR;
  float* sSlope = sDi + 2 * BR;
  int* sI = reinterpret_cast<int*>(sSlope + 2 * BR);  // query row of each packed row, -1 past the end

  const FlashBwdParams& p = args.p;
  const ScoreArgs& sa = args.s;
  const int b = blockIdx.z;
  const int hk = blockIdx.y;
  const int j0 = blockIdx.x / Tr::kDSplit * BK;
  const int d0 = blockIdx.x % Tr::kDSplit * Tr::kDAcc;  // first dK / dV / dQ column of this CTA
  const SeqInfo si = seq_info(p, b);
  const int group = sa.group;
  const GroupSplit gs(group);
  const int rows = si.sq * group;
  const int tid = threadIdx.x;
  const int offset = si.sk - si.sq;

  if (d0 == 0) zero_unused_key_rows<T>(p, si, b, hk, j0, BK);
  if (j0 >= si.sk) return;

  const RowBlockCopier<T, D, BR, kCtaThreads, kPlain> row_copier{p, si, gs, b, hk, rows};
  auto load_rows = [&](int mb, int buf) {
    row_copier.copy(mb, sQ + buf * BR * kPitch, sdO + buf * BR * kPitch, sLse + buf * BR, sDi + buf * BR,
                    sSlope + buf * BR, sI + buf * BR);
  };

  const BlockRange steps = visible_row_blocks(sa, si, j0, BK, BR);  // packed rows, in steps of BR
  const int m_begin = steps.begin, m_end = steps.end;

  const KvTileCopier<T, D, BK, kCtaThreads> kv{p, si, b, hk};
  kv.copy(sK, sV, j0 / BK, kv.start(j0 / BK));
  if (m_begin < m_end) load_rows(m_begin, 0);
  cp_async_commit();

  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane >> 2;
  const int tq = lane & 3;
  const int mi = lane >> 3;
  const int rr = lane & 7;
  const float scale_log2 = p.softmax_scale * kLog2e;
  float dk[kAT][4], dv[kAT][4];
#pragma unroll
  for (int t = 0; t < kAT; ++t) {
#pragma unroll
    for (int c = 0; c < 4; ++c) dk[t][c] = dv[t][c] = 0.f;
  }

  for (int mb = m_begin; mb < m_end; ++mb) {
    const int buf = (mb - m_begin) & 1;
    cp_async_wait_all();
    __syncthreads();  // block mb visible to all warps; every warp is done with buffer buf^1 and sdS
    if (mb + 1 < m_end) {
      load_rows(mb + 1, buf ^ 1);
      cp_async_commit();
    }
    const T* cQ = sQ + buf * BR * kPitch;
    const T* cdO = sdO + buf * BR * kPitch;
    const float* cLse = sLse + buf * BR;
    const float* cDi = sDi + buf * BR;
    const int* cI = sI + buf * BR;

    // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys x BR rows.
    float st[kRT][4], dpt[kRT][4];
#pragma unroll
    for (int t = 0; t < kRT; ++t) {
#pragma unroll
      for (int c = 0; c < 4; ++c) st[t][c] = dpt[t][c] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t ak[4], av[4];
      ldmatrix_x4(ak, sK + (warp * 16 + rr + (mi & 1) * 8) * kPitch + kk * 16 + (mi >> 1) * 8);
      ldmatrix_x4(av, sV + (warp * 16 + rr + (mi & 1) * 8) * kPitch + kk * 16 + (mi >> 1) * 8);
#pragma unroll
      for (int t2 = 0; t2 < kRT / 2; ++t2) {
        uint32_t bq[4], bo[4];
        ldmatrix_x4(bq, cQ + (t2 * 16 + rr + (mi >> 1) * 8) * kPitch + kk * 16 + (mi & 1) * 8);
        ldmatrix_x4(bo, cdO + (t2 * 16 + rr + (mi >> 1) * 8) * kPitch + kk * 16 + (mi & 1) * 8);
        mma_16816<T>(st[2 * t2], ak, bq[0], bq[1]);
        mma_16816<T>(st[2 * t2 + 1], ak, bq[2], bq[3]);
        mma_16816<T>(dpt[2 * t2], av, bo[0], bo[1]);
        mma_16816<T>(dpt[2 * t2 + 1], av, bo[2], bo[3]);
      }
    }
    // P^T into st, dS^T into dpt: rows of the fragments are keys (g, g+8), columns query rows.
    // The block needs the mask unless every (row, key) pair of it is visible.
    const int r0 = mb * BR;
    const int row_i_lo = gs.row(r0), row_i_hi = gs.row(r0 + BR - 1);
    const bool need_mask = r0 + BR > rows || tile_needs_mask(sa, si.sk, offset, j0, BK, row_i_lo, row_i_hi);
#pragma unroll
    for (int t = 0; t < kRT; ++t) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int j = j0 + warp * 16 + g + 8 * (c >> 1);
        const int col = t * 8 + tq * 2 + (c & 1);
        float prob = 0.f, ds = 0.f;
        if (kPlain) {
          if (!need_mask || (cI[col] >= 0 && visible(sa, cI[col], j, si.sq, si.sk))) {
            prob = fast_exp2(fmaf(st[t][c], scale_log2, -cLse[col] * kLog2e));
            ds = prob * ((dpt[t][c] - cDi[col]) * p.softmax_scale);
          }
        } else {
          const int i = cI[col];
          if (i >= 0 && visible(sa, i, j, si.sq, si.sk)) {
            float dcap;
            const float x = modify_score(sa, st[t][c] * p.softmax_scale, sSlope[buf * BR + col], i, j, si.sq, si.sk, dcap);
            prob = __expf(x - cLse[col]);
            ds = prob * (dpt[t][c] - cDi[col]) * dcap * p.softmax_scale;
          }
        }
        st[t][c] = prob;
        dpt[t][c] = ds;
      }
    }
    // P^T and dS^T as A fragments (16 keys x 16 rows per kk), rounded once for every product.
    uint32_t ap[BR / 16][4], as[BR / 16][4];
#pragma unroll
    for (int kk = 0; kk < BR / 16; ++kk) {
      ap[kk][0] = pack2<T>(st[2 * kk][0], st[2 * kk][1]);
      ap[kk][1] = pack2<T>(st[2 * kk][2], st[2 * kk][3]);
      ap[kk][2] = pack2<T>(st[2 * kk + 1][0], st[2 * kk + 1][1]);
      ap[kk][3] = pack2<T>(st[2 * kk + 1][2], st[2 * kk + 1][3]);
      as[kk][0] = pack2<T>(dpt[2 * kk][0], dpt[2 * kk][1]);
      as[kk][1] = pack2<T>(dpt[2 * kk][2], dpt[2 * kk][3]);
      as[kk][2] = pack2<T>(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]);
      as[kk][3] = pack2<T>(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
    }
    if constexpr (kFusedDq) {
      // dS^T of this warp's 16 keys to shared memory (row = key), for dQ = dS K below: a1/a3 are
      // key rows g + 8, columns (query rows) 16kk + 2tq (a0, a1) and + 8 (a2, a3).
#pragma unroll
      for (int kk = 0; kk < BR / 16; ++kk) {
        T* base = sdS + (warp * 16 + g) * kDsPitch + kk * 16 + tq * 2;
        *reinterpret_cast<uint32_t*>(base) = as[kk][0];
        *reinterpret_cast<uint32_t*>(base + 8 * kDsPitch) = as[kk][1];
        *reinterpret_cast<uint32_t*>(base + 8) = as[kk][2];
        *reinterpret_cast<uint32_t*>(base + 8 * kDsPitch + 8) = as[kk][3];
      }
    }
    // dV += P^T dO and dK += dS^T Q over this CTA's columns: B = dO / Q through ldmatrix.trans.
#pragma unroll
    for (int kk = 0; kk < BR / 16; ++kk) {
#pragma unroll
      for (int t2 = 0; t2 < kAT / 2; ++t2) {
        uint32_t bo[4], bq[4];
        ldmatrix_x4_trans(bo, cdO + (kk * 16 + rr + (mi & 1) * 8) * kPitch + d0 + t2 * 16 + (mi >> 1) * 8);
        ldmatrix_x4_trans(bq, cQ + (kk * 16 + rr + (mi & 1) * 8) * kPitch + d0 + t2 * 16 + (mi >> 1) * 8);
        mma_16816<T>(dv[2 * t2], ap[kk], bo[0], bo[1]);
        mma_16816<T>(dv[2 * t2 + 1], ap[kk], bo[2], bo[3]);
        mma_16816<T>(dk[2 * t2], as[kk], bq[0], bq[1]);
        mma_16816<T>(dk[2 * t2 + 1], as[kk], bq[2], bq[3]);
      }
    }
    if constexpr (kFusedDq) {
      __syncthreads();  // dS^T of every warp visible
      // dQ (BR rows x this CTA's columns) += dS (BR x BK) K (BK x D): warp w takes the 16 rows
      // 16 (w % kRowTiles).. and one of the kWarps / kRowTiles groups of the 16-column chunks, then
      // adds its tile to the float32 accumulator.
      constexpr int kChunks = kAT / 2;
      constexpr int kRowTiles = BR / 16;
      static_assert(kWarps % kRowTiles == 0, "the warps split dQ's rows evenly");
      constexpr int kGroups = kWarps / kRowTiles;
      constexpr int kQC = (kChunks + kGroups - 1) / kGroups;  // chunks per warp (the last group may be short)
      const int wr = (warp % kRowTiles) * 16;
      const int c0 = (warp / kRowTiles) * kQC;
      float dq[2 * kQC][4];
#pragma unroll
      for (int t = 0; t < 2 * kQC; ++t) dq[t][0] = dq[t][1] = dq[t][2] = dq[t][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk) {
        uint32_t a[4];  // dS rows wr.., keys 16kk..: the transposed 8x8 blocks of sdS
        ldmatrix_x4_trans(a, sdS + (kk * 16 + rr + (mi >> 1) * 8) * kDsPitch + wr + (mi & 1) * 8);
#pragma unroll
        for (int t2 = 0; t2 < kQC; ++t2) {
          if (c0 + t2 >= kChunks) break;
          uint32_t bk[4];
          ldmatrix_x4_trans(bk, sK + (kk * 16 + rr + (mi & 1) * 8) * kPitch + d0 + (c0 + t2) * 16 + (mi >> 1) * 8);
          mma_16816<T>(dq[2 * t2], a, bk[0], bk[1]);
          mma_16816<T>(dq[2 * t2 + 1], a, bk[2], bk[3]);
        }
      }
      const int r = r0 + wr + g;
      float* lo = r < rows ? dq_accum_row(p, si, b, gs.row(r), hk * group + gs.head(r)) : nullptr;
      float* hi = r + 8 < rows ? dq_accum_row(p, si, b, gs.row(r + 8), hk * group + gs.head(r + 8)) : nullptr;
      atomic_add_dq_tile(lo, hi, dq, d0 + c0 * 16, min(p.head_dim, d0 + Tr::kDAcc));
    }
  }
  cp_async_wait_all();  // K/V copies are still in flight when no query row sees this block

#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int j = j0 + warp * 16 + g + 8 * e;
    if (j >= si.sk) continue;
    T* dkp = static_cast<T*>(p.dk) + kv_offset(p, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride, si, b, j, hk);
    T* dvp = static_cast<T*>(p.dv) + kv_offset(p, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride, si, b, j, hk);
#pragma unroll
    for (int t = 0; t < kAT; ++t) {
      const int d = d0 + t * 8 + tq * 2;
      if (d < p.head_dim) {
        *reinterpret_cast<uint32_t*>(dkp + d) = pack2<T>(dk[t][2 * e], dk[t][2 * e + 1]);
        *reinterpret_cast<uint32_t*>(dvp + d) = pack2<T>(dv[t][2 * e], dv[t][2 * e + 1]);
      }
    }
  }
}

// One warp's acc (kM x kN, C fragments [kM / 16][kN / 8]) += A (kM x kK) B (kK x kN), both from
// shared memory: A's rows m0.. of a tile stored row-major (a[m][k], pitch lda) or, kATrans,
// transposed (a[k][m]); B's columns n0.. of a tile stored transposed (b[n][k], pitch ldb) or,
// kBTrans, as it is (b[k][n]). Per 16-deep step, the A fragments first, then each B fragment pair
// feeds every A fragment; kPrefetch: all of a step's fragments are loaded during the step before
// (twice the fragment registers, no product waiting on its own loads).
template <typename T, int kM, int kN, int kK, bool kATrans, bool kBTrans, bool kPrefetch = false>
__device__ __forceinline__ void warp_mma_smem(float (&acc)[kM / 16][kN / 8][4], const T* a, int m0, int lda,
                                              const T* b, int n0, int ldb) {
  const int lane = threadIdx.x % 32;
  const int mi = lane >> 3;
  const int rr = lane & 7;
  auto load_a = [&](uint32_t (&f)[4], int kk, int i) {
    if constexpr (kATrans) {
      ldmatrix_x4_trans(f, a + (kk * 16 + rr + 8 * (mi >> 1)) * lda + m0 + 16 * i + 8 * (mi & 1));
    } else {
      ldmatrix_x4(f, a + (m0 + 16 * i + rr + 8 * (mi & 1)) * lda + kk * 16 + 8 * (mi >> 1));
    }
  };
  auto load_b = [&](uint32_t (&f)[4], int kk, int t2) {
    if constexpr (kBTrans) {
      ldmatrix_x4_trans(f, b + (kk * 16 + rr + 8 * (mi & 1)) * ldb + n0 + 16 * t2 + 8 * (mi >> 1));
    } else {
      ldmatrix_x4(f, b + (n0 + 16 * t2 + rr + 8 * (mi >> 1)) * ldb + kk * 16 + 8 * (mi & 1));
    }
  };
  if constexpr (kPrefetch) {
    uint32_t af[2][kM / 16][4], bf[2][kN / 16][4];
    auto load_step = [&](int kk) {
#pragma unroll
      for (int i = 0; i < kM / 16; ++i) load_a(af[kk & 1][i], kk, i);
#pragma unroll
      for (int t2 = 0; t2 < kN / 16; ++t2) load_b(bf[kk & 1][t2], kk, t2);
    };
    load_step(0);
#pragma unroll
    for (int kk = 0; kk < kK / 16; ++kk) {
      if (kk + 1 < kK / 16) load_step(kk + 1);
#pragma unroll
      for (int t2 = 0; t2 < kN / 16; ++t2) {
#pragma unroll
        for (int i = 0; i < kM / 16; ++i) {
          mma_16816<T>(acc[i][2 * t2], af[kk & 1][i], bf[kk & 1][t2][0], bf[kk & 1][t2][1]);
          mma_16816<T>(acc[i][2 * t2 + 1], af[kk & 1][i], bf[kk & 1][t2][2], bf[kk & 1][t2][3]);
        }
      }
    }
  } else {
#pragma unroll
    for (int kk = 0; kk < kK / 16; ++kk) {
      uint32_t af[kM / 16][4];
#pragma unroll
      for (int i = 0; i < kM / 16; ++i) load_a(af[i], kk, i);
#pragma unroll
      for (int t2 = 0; t2 < kN / 16; ++t2) {
        uint32_t bf[4];
        load_b(bf, kk, t2);
#pragma unroll
        for (int i = 0; i < kM / 16; ++i) {
          mma_16816<T>(acc[i][2 * t2], af[i], bf[0], bf[1]);
          mma_16816<T>(acc[i][2 * t2 + 1], af[i], bf[2], bf[3]);
        }
      }
    }
  }
}

// The CTA shape of bwd_tiled_mma_kernel: 8 warps over BN keys, steps of BM packed query rows, and
// each of the step's products on its own grid of warps, with tiles of at least 16 x 16 per warp:
//   1. S = Q K^T, dP = dO V^T (BM x BN): WM1 warps over the rows x 8 / WM1 over the keys;
//   2. dV += P^T dO, dK += dS^T Q (BN x D): WN2 warps over the keys x 8 / WN2 over the columns;
//   3. dQ = dS K (BM x D): WM3 warps over the rows x 8 / WM3 over the columns.
template <int D, int BM_, int BN_, int WM1, int WN2, int WM3, int kPrefetch_ = 0>
struct BwdTiledShape {
  static constexpr int kWarps = 8;
  // Products whose fragments warp_mma_smem loads a step ahead: bit 0 S / dP, 1 dV / dK, 2 dQ.
  static constexpr int kPrefetch = kPrefetch_;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int BM = BM_, BN = BN_;
  static constexpr int TM1 = BM / WM1, TN1 = BN / (kWarps / WM1);
  static constexpr int TN2 = BN / WN2, TD2 = D / (kWarps / WN2);
  static constexpr int TM3 = BM / WM3, TD3 = D / (kWarps / WM3);
  static constexpr int kPitch = mma_pitch(D);
  static constexpr int kPsPitch = BN + 8;  // P and dS tiles [BM][kPsPitch]: conflict-free rows, as kPitch
  // K, V; Q and dO double-buffered; P, dS; lse, Di, ALiBi slope and query row of both buffers.
  static constexpr size_t kSmem =
      sizeof(uint16_t) * ((2 * BN + 4 * BM) * kPitch + 2 * BM * kPsPitch) + 8 * sizeof(float) * BM;
  static_assert(TM1 % 16 == 0 && TN1 % 16 == 0 && TN2 % 16 == 0 && TD2 % 16 == 0 && TM3 % 16 == 0 &&
                    TD3 % 16 == 0,
                "every warp tile is a whole number of 16 x 16 blocks");
};

// The default shape per head-dim bucket (measured on the H200, cuda_kernel_notes.md v16, v17): 128
// keys with 128-row steps up to 64, 64-row steps at 96 and 128 (the dK / dV accumulators of 32 keys
// x D / 2 per warp), 64 keys with 64-row steps above; at 256 the S / dP and dQ fragments a step
// ahead (+2-3% there, -1% at 64 and 128).
template <int D>
using BwdTiledDefault =
    std::conditional_t<(D <= 64), BwdTiledShape<D, 128, 128, 2, 4, 4>,
    std::conditional_t<(D == 96), BwdTiledShape<D, 64, 128, 2, 4, 4>,
    std::conditional_t<(D == 128), BwdTiledShape<D, 64, 128, 2, 4, 2>,
    std::conditional_t<(D == 160 || D == 224), BwdTiledShape<D, 64, 64, 4, 4, 4>,
    std::conditional_t<(D == 192), BwdTiledShape<D, 64, 64, 4, 2, 2>,
                       BwdTiledShape<D, 64, 64, 4, 2, 2, 5>>>>>>;

// FlashAttention-2's partition of the fused backward (one CTA per BN keys of a KV head; dK, dV in
// registers; P and dS through shared memory, so that every product has a tile of its own and fewer
// fragment loads per mma than dkdv_mma_kernel's 16 keys per warp; see BwdTiledShape); dQ is added
// to the float32 accumulator by atomics.
template <typename T, int D, bool kPlain, typename Shape>
__global__ void __launch_bounds__(Shape::kThreads, 1) bwd_tiled_mma_kernel(const BwdArgs args) {
  constexpr int BM = Shape::BM, BN = Shape::BN;
  constexpr int TM1 = Shape::TM1, TN1 = Shape::TN1, TN2 = Shape::TN2, TD2 = Shape::TD2, TM3 = Shape::TM3,
                TD3 = Shape::TD3;
  constexpr int kPitch = Shape::kPitch, kPsPitch = Shape::kPsPitch;
  constexpr bool kPrefetchSdP = Shape::kPrefetch & 1, kPrefetchDkDv = Shape::kPrefetch & 2,
                 kPrefetchDq = Shape::kPrefetch & 4;
  extern __shared__ __align__(16) uint16_t smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + BN * kPitch;
  T* sQ = sV + BN * kPitch;        // [2][BM][kPitch]
  T* sdO = sQ + 2 * BM * kPitch;   // [2][BM][kPitch]
  T* sP = sdO + 2 * BM * kPitch;   // [BM][kPsPitch]
  T* sdS = sP + BM * kPsPitch;     // [BM][kPsPitch]
  float* sLse = reinterpret_cast<float*>(sdS + BM * kPsPitch);  // [2][BM] each
  float* sDi = sLse + 2 * BM;
  float* sSlope = sDi + 2 * BM;
  int* sI = reinterpret_cast<int*>(sSlope + 2 * BM);  // query row of each packed row, -1 past the end

  const FlashBwdParams& p = args.p;
  const ScoreArgs& sa = args.s;
  const int b = blockIdx.z;
  const int hk = blockIdx.y;
  const int j0 = blockIdx.x * BN;
  const SeqInfo si = seq_info(p, b);
  const GroupSplit gs(sa.group);
  const int rows = si.sq * sa.group;
  const int offset = si.sk - si.sq;

  zero_unused_key_rows<T>(p, si, b, hk, j0, BN);
  if (j0 >= si.sk) return;

  const BlockRange steps = visible_row_blocks(sa, si, j0, BN, BM);
  constexpr bool kCarry = D <= 128;  // carried row offsets (RowBlockCopier, dq_rows below)
  const RowBlockCopier<T, D, BM, Shape::kThreads, kPlain, kCarry> row_copier{p, si, gs, b, hk, rows, steps.begin};
  auto load_rows = [&](int mb, int buf) {
    row_copier.copy(mb, sQ + buf * BM * kPitch, sdO + buf * BM * kPitch, sLse + buf * BM, sDi + buf * BM,
                    sSlope + buf * BM, sI + buf * BM);
  };
  const KvTileCopier<T, D, BN, Shape::kThreads> kv{p, si, b, hk};
  kv.copy(sK, sV, blockIdx.x, kv.start(blockIdx.x));
  if (steps.begin < steps.end) load_rows(steps.begin, 0);
  cp_async_commit();

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int g = lane >> 2;
  const int tq = lane & 3;
  // The warp's tile in each product: rows m1.. x keys n1.. of S / dP, keys n2.. x columns c2.. of
  // dK / dV, rows m3.. x columns c3.. of dQ.
  constexpr int kWM1 = BM / TM1, kWN2 = BN / TN2, kWM3 = BM / TM3;
  const int m1 = warp % kWM1 * TM1, n1 = warp / kWM1 * TN1;
  const int n2 = warp % kWN2 * TN2, c2 = warp / kWN2 * TD2;
  const int m3 = warp % kWM3 * TM3, c3 = warp / kWM3 * TD3;
  const float scale_log2 = p.softmax_scale * kLog2e;
  // The dQ accumulator rows of this thread's fragments (rows g and g + 8 of each 16-row block).
  // Carried as the copies' offsets where the copier carries them and the group divides 8 (a block
  // moves a row by BM / group query rows of heads_q x head_dim floats, row g + 8 is 8 / group query
  // rows past row g), else found per block.
  const bool carried = kCarry && row_copier.strided() && gs.divides(8);
  const int64_t dq_query_row_floats = static_cast<int64_t>(p.heads_q) * p.head_dim;
  const int64_t dq_block_floats = carried ? gs.row(BM) * dq_query_row_floats : 0;
  const int64_t dq_hi_floats = carried ? gs.row(8) * dq_query_row_floats : 0;
  float* dq_first[TM3 / 16];
#pragma unroll
  for (int i = 0; i < TM3 / 16; ++i) {
    const int r = steps.begin * BM + m3 + 16 * i + g;
    dq_first[i] = carried ? dq_accum_row(p, si, b, gs.row(r), hk * sa.group + gs.head(r)) : nullptr;
  }
  auto dq_rows = [&](int i, int mb, float*& lo, float*& hi) {
    const int r = mb * BM + m3 + 16 * i + g;
    if (carried) {
      float* at = dq_first[i] + (mb - steps.begin) * dq_block_floats;
      lo = r < rows ? at : nullptr;
      hi = r + 8 < rows ? at + dq_hi_floats : nullptr;
    } else {
      lo = r < rows ? dq_accum_row(p, si, b, gs.row(r), hk * sa.group + gs.head(r)) : nullptr;
      hi = r + 8 < rows ? dq_accum_row(p, si, b, gs.row(r + 8), hk * sa.group + gs.head(r + 8)) : nullptr;
    }
  };

  float dk[TN2 / 16][TD2 / 8][4], dv[TN2 / 16][TD2 / 8][4];
#pragma unroll
  for (int i = 0; i < TN2 / 16; ++i) {
#pragma unroll
    for (int t = 0; t < TD2 / 8; ++t) {
#pragma unroll
      for (int c = 0; c < 4; ++c) dk[i][t][c] = dv[i][t][c] = 0.f;
    }
  }

  for (int mb = steps.begin; mb < steps.end; ++mb) {
    const int buf = (mb - steps.begin) & 1;
    cp_async_wait_all();
    __syncthreads();  // block mb visible; every warp is done with buffer buf^1, sP and sdS
    if (mb + 1 < steps.end) {
      load_rows(mb + 1, buf ^ 1);
      cp_async_commit();
    }
    const T* cQ = sQ + buf * BM * kPitch;
    const T* cdO = sdO + buf * BM * kPitch;
    const int r0 = mb * BM;

    // 1. S = Q K^T, then dP = dO V^T, over this warp's TM1 rows x TN1 keys (one after the other:
    // fewer live fragments).
    constexpr int kMT = TM1 / 16, kNT = TN1 / 8;
    float s[kMT][kNT][4], dp[kMT][kNT][4];
    auto product = [&](float (&acc)[kMT][kNT][4], const T* rows_tile, const T* keys_tile) {
#pragma unroll
      for (int i = 0; i < kMT; ++i) {
#pragma unroll
        for (int t = 0; t < kNT; ++t) acc[i][t][0] = acc[i][t][1] = acc[i][t][2] = acc[i][t][3] = 0.f;
      }
      warp_mma_smem<T, TM1, TN1, D, false, false, kPrefetchSdP>(acc, rows_tile, m1, kPitch, keys_tile, n1, kPitch);
    };
    product(s, cQ, sK);
    product(dp, cdO, sV);

    // P and dS (c0, c1 of row g of each 16-row block, c2, c3 of row g + 8), rounded into sP / sdS.
    // Blocks that need the mask and those that do not take separate code: no branch per element
    // where every pair is visible.
    const int row_i_lo = gs.row(r0), row_i_hi = gs.row(r0 + BM - 1);
    const bool need_mask = r0 + BM > rows || tile_needs_mask(sa, si.sk, offset, j0, BN, row_i_lo, row_i_hi);
    auto softmax_grad = [&](auto masked) {
#pragma unroll
      for (int i = 0; i < kMT; ++i) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int row = m1 + 16 * i + g + 8 * e;
          const int qi = sI[buf * BM + row];
          const float lse = sLse[buf * BM + row];
          const float di = sDi[buf * BM + row];
#pragma unroll
          for (int t = 0; t < kNT; ++t) {
            float pr[2], ds[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int c = 2 * e + h;
              const int j = j0 + n1 + 8 * t + 2 * tq + h;
              const bool seen = !decltype(masked)::value || (qi >= 0 && visible(sa, qi, j, si.sq, si.sk));
              if (kPlain) {
                // Computed for every pair, then zeroed where not seen (a select, not a branch).
                pr[h] = fast_exp2(fmaf(s[i][t][c], scale_log2, -lse * kLog2e));
                ds[h] = pr[h] * ((dp[i][t][c] - di) * p.softmax_scale);
                if (!seen) pr[h] = ds[h] = 0.f;
              } else {
                pr[h] = ds[h] = 0.f;
                if (seen) {
                  float dcap;
                  const float x = modify_score(sa, s[i][t][c] * p.softmax_scale, sSlope[buf * BM + row], qi, j,
                                               si.sq, si.sk, dcap);
                  pr[h] = __expf(x - lse);
                  ds[h] = pr[h] * (dp[i][t][c] - di) * dcap * p.softmax_scale;
                }
              }
            }
            const int at = row * kPsPitch + n1 + 8 * t + 2 * tq;
            *reinterpret_cast<uint32_t*>(sP + at) = pack2<T>(pr[0], pr[1]);
            *reinterpret_cast<uint32_t*>(sdS + at) = pack2<T>(ds[0], ds[1]);
          }
        }
      }
    };
    if (need_mask) {
      softmax_grad(std::true_type{});
    } else {
      softmax_grad(std::false_type{});
    }
    __syncthreads();  // P and dS of every warp visible

    // 2. dV += P^T dO, then (3.) dQ, then dK += dS^T Q: the dQ atomics in flight while dK computes.
    // dV and dK over this warp's TN2 keys x TD2 columns: A = P^T / dS^T by ldmatrix.trans of sP /
    // sdS, B = dO / Q by ldmatrix.trans.
    warp_mma_smem<T, TN2, TD2, BM, true, true, kPrefetchDkDv>(dv, sP, n2, kPsPitch, cdO, c2, kPitch);

    // 3. dQ = dS K over this warp's TM3 rows x TD3 columns, added to the float32 accumulator.
    {
      float dq[TM3 / 16][TD3 / 8][4];
#pragma unroll
      for (int i = 0; i < TM3 / 16; ++i) {
#pragma unroll
        for (int t = 0; t < TD3 / 8; ++t) dq[i][t][0] = dq[i][t][1] = dq[i][t][2] = dq[i][t][3] = 0.f;
      }
      warp_mma_smem<T, TM3, TD3, BN, false, true, kPrefetchDq>(dq, sdS, m3, kPsPitch, sK, c3, kPitch);
#pragma unroll
      for (int i = 0; i < TM3 / 16; ++i) {
        float *lo, *hi;
        dq_rows(i, mb, lo, hi);
        atomic_add_dq_tile(lo, hi, dq[i], c3, p.head_dim);
      }
    }
    warp_mma_smem<T, TN2, TD2, BM, true, true, kPrefetchDkDv>(dk, sdS, n2, kPsPitch, cQ, c2, kPitch);
  }
  cp_async_wait_all();  // K/V copies are still in flight when no query row sees this block

#pragma unroll
  for (int i = 0; i < TN2 / 16; ++i) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int j = j0 + n2 + 16 * i + g + 8 * e;
      if (j >= si.sk) continue;
      T* dkp = static_cast<T*>(p.dk) + kv_offset(p, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride, si, b, j, hk);
      T* dvp = static_cast<T*>(p.dv) + kv_offset(p, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride, si, b, j, hk);
#pragma unroll
      for (int t = 0; t < TD2 / 8; ++t) {
        const int d = c2 + t * 8 + tq * 2;
        if (d < p.head_dim) {
          *reinterpret_cast<uint32_t*>(dkp + d) = pack2<T>(dk[i][t][2 * e], dk[i][t][2 * e + 1]);
          *reinterpret_cast<uint32_t*>(dvp + d) = pack2<T>(dv[i][t][2 * e], dv[i][t][2 * e + 1]);
        }
      }
    }
  }
}

// dq = the float32 accumulator of the fused backward, one warp per (query row, head).
template <typename T>
__global__ void __launch_bounds__(kThreads) dq_convert_kernel(const BwdArgs args) {
  const FlashBwdParams& p = args.p;
  const int b = blockIdx.z;
  const int h = blockIdx.y;
  const int i = blockIdx.x * (kThreads / 32) + threadIdx.x / 32;
  const SeqInfo si = seq_info(p, b);
  if (i >= si.sq) return;
  const float* acc = dq_accum_row(p, si, b, i, h);
  T* dq = static_cast<T*>(p.dq) +
          q_offset(p.cu_seqlens_q != nullptr, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride, si, b, i, h);
  for (int d = 2 * (threadIdx.x % 32); d < p.head_dim; d += 64) {
    const float2 x = *reinterpret_cast<const float2*>(acc + d);
    *reinterpret_cast<uint32_t*>(dq + d) = pack2<T>(x.x, x.y);
  }
}

// The fused backward around its dK/dV kernel (which adds dQ into the float32 accumulator, key_ctas
// CTAs per (KV head, batch); dot_do_o_kernel has zeroed it): run the kernel, convert dQ.
template <typename T, typename Kernel>
void launch_fused_bwd(const BwdArgs& args, Kernel kernel, int key_ctas, int threads, size_t smem, const char* name,
                      cudaStream_t stream) {
  const FlashBwdParams& p = args.p;
  if (p.seqlen_k > 0) {
    const dim3 grid(key_ctas, p.heads_kv, p.batch);
    kernel<<<grid, threads, smem, stream>>>(args);
    check_launch(name);
  }
  if (p.seqlen_q > 0) {
    const dim3 grid(ceil_div(p.seqlen_q, kThreads / 32), p.heads_q, p.batch);
    dq_convert_kernel<T><<<grid, kThreads, 0, stream>>>(args);
    check_launch("dq_convert_kernel launch");
  }
}

// The fused backward of one (dtype, head-dim bucket, CTA shape) of dkdv_mma_kernel (the fallback where
// the shared memory is short of bwd_tiled_mma_kernel's): the dK/dV kernel adding dQ by atomics, then
// the dQ conversion.
template <typename T, int D, bool kPlain, int kWarps, int kRowsPerStep>
void launch_bwd_mma_fused(const BwdArgs& args, cudaStream_t stream) {
  using Tr = BwdMmaTraits<D, kWarps, kRowsPerStep>;
  auto kernel = dkdv_mma_kernel<T, D, kPlain, true, kWarps, kRowsPerStep>;
  set_smem(kernel, Tr::kDkdvSmem, "cudaFuncSetAttribute(dkdv_mma_kernel)");
  launch_fused_bwd<T>(args, kernel, ceil_div(args.p.seqlen_k, Tr::kKeys) * Tr::kDSplit, Tr::kDkdvThreads,
                      Tr::kDkdvSmem, "dkdv_mma_kernel launch", stream);
}

// The same with bwd_tiled_mma_kernel of one shape.
template <typename T, int D, bool kPlain, typename Shape>
void launch_bwd_tiled_fused(const BwdArgs& args, cudaStream_t stream) {
  auto kernel = bwd_tiled_mma_kernel<T, D, kPlain, Shape>;
  set_smem(kernel, Shape::kSmem, "cudaFuncSetAttribute(bwd_tiled_mma_kernel)");
  launch_fused_bwd<T>(args, kernel, ceil_div(args.p.seqlen_k, Shape::BN), Shape::kThreads, Shape::kSmem,
                      "bwd_tiled_mma_kernel launch", stream);
}

// The deterministic backward (head dims <= 128): the dQ kernel, then the dK/dV kernel without dQ.
template <typename T, int D, bool kPlain, int kWarps = 4, int kRowsPerStep = 32>
void launch_bwd_mma_deterministic(const BwdArgs& args, cudaStream_t stream) {
  using Tr = BwdMmaTraits<D, kWarps, kRowsPerStep>;
  static_assert(Tr::kDSplit == 1, "split head dims run the fused backward only");
  const FlashBwdParams& p = args.p;
  if (p.seqlen_q > 0) {
    auto kernel = dq_mma_kernel<T, D, kPlain>;
    set_smem(kernel, Tr::kDqSmem, "cudaFuncSetAttribute(dq_mma_kernel)");
    const dim3 grid(ceil_div(p.seqlen_q * args.s.group, Tr::kBlockM), p.heads_kv, p.batch);
    kernel<<<grid, kThreads, Tr::kDqSmem, stream>>>(args);
    check_launch("dq_mma_kernel launch");
  }
  if (p.seqlen_k > 0) {
    auto kernel = dkdv_mma_kernel<T, D, kPlain, false, kWarps, kRowsPerStep>;
    set_smem(kernel, Tr::kDkdvSmem, "cudaFuncSetAttribute(dkdv_mma_kernel)");
    const dim3 grid(ceil_div(p.seqlen_k, Tr::kKeys), p.heads_kv, p.batch);
    kernel<<<grid, Tr::kDkdvThreads, Tr::kDkdvSmem, stream>>>(args);
    check_launch("dkdv_mma_kernel launch");
  }
}

// Whether the tensor-core backward covers the call: no dropout; head dims above 128 only fused and
// where the device has the shared memory. The SIMT kernels take the rest.
template <int D>
bool bwd_mma_covers(const FlashBwdParams& p) {
  using Tr = BwdMmaTraits<D>;
  if (p.dropout_p > 0.f) return false;
  return Tr::kDSplit == 1 || (bwd_fused_dq(p) && max_smem_optin() >= Tr::kDkdvSmem);
}

// The tensor-core backward of a call it covers (bwd_mma_covers). Explicitly instantiated once per
// head dim (instantiations/flash_bwd_mma_hdim*.cu).
template <typename T, int D>
void launch_bwd_mma(const BwdArgs& args, cudaStream_t stream) {
  const auto run = [&](auto plain) {
    constexpr bool kPlain = decltype(plain)::value;
    if (!bwd_fused_dq(args.p)) {
      if constexpr (BwdMmaTraits<D>::kDSplit == 1) launch_bwd_mma_deterministic<T, D, kPlain>(args, stream);
    } else if (max_smem_optin() >= BwdTiledDefault<D>::kSmem) {
      launch_bwd_tiled_fused<T, D, kPlain, BwdTiledDefault<D>>(args, stream);
    } else {
      launch_bwd_mma_fused<T, D, kPlain, 4, 32>(args, stream);
    }
  };
  if (args.s.softcap == 0.f && args.p.alibi_slopes == nullptr) {
    run(std::true_type{});
  } else {
    run(std::false_type{});
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace flash
