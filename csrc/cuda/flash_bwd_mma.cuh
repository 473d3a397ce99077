// Tensor-core backward (sm80-class mma.sync) without dropout, P / dS fed from registers
// (flash_mma.cuh), so nothing but Q/dO/K/V tiles, dS and per-row scalars goes through shared memory.
//   dkdv_mma_kernel  kWarps warps x 16 keys; per step of kRowsPerStep packed query rows
//                    (double-buffered): S^T = K Q^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q
//                    (summed over the KV group's heads). kFusedDq: also dQ += dS K, through dS^T in
//                    shared memory and float32 atomics into the workspace (FlashAttention-2's
//                    backward: S and dP once); dq_convert_kernel then writes dq. Default for calls
//                    that are not deterministic, with 8 warps (128 keys) where the shared memory
//                    allows.
//   dq_mma_kernel    deterministic calls (head dims <= 128): dQ by its own kernel over key blocks,
//                    S = Q K^T, dP = dO V^T, dS = P (dP - Di) cap' scale, dQ += dS K, no atomics.
// Head dims above 128 split dK/dV (and dQ) columns over kDSplit CTAs per key block, each recomputing
// S^T and dP^T, so the accumulators fit the registers; their shared memory (up to 141 KB at 256
// with 4 warps) exceeds what sm86/sm89/sm120 offer, where they fall back to the SIMT kernels.
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
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int tid = threadIdx.x;
  const int offset = si.sk - si.sq;

  if (d0 == 0) zero_unused_key_rows<T>(p, si, b, hk, j0, BK);
  if (j0 >= si.sk) return;

  const T* q = static_cast<const T*>(p.q);
  const T* dout = static_cast<const T*>(p.dout);
  // Copies of row block mb into buffer buf: Q and dO through cp.async, the scalars directly.
  auto load_rows = [&](int mb, int buf) {
    const int r0 = mb * BR;
    auto q_rows = [&](const T* base, int64_t bs, int64_t rst, int64_t hs) {
      return [=, &si](int rw) -> const T* {
        const int r = r0 + rw;
        if (r >= rows) return nullptr;
        return base + q_offset(varlen, bs, rst, hs, si, b, gs.row(r), hk * group + gs.head(r));
      };
    };
    // Packed rows r0 + row, r0 + row + kRowStep, ... of one thread share a head when the group
    // divides kRowStep, and are then kRowStep / group query rows apart: one pointer per thread.
    bool strided = false;
    constexpr int kChunks = D / 8;
    if constexpr (kCtaThreads % kChunks == 0 && BR % (kCtaThreads / kChunks) == 0) {
      constexpr int kRowStep = kCtaThreads / kChunks;
      if (kRowStep % group == 0) {
        const int r = r0 + tid / kChunks;  // this thread's first packed row
        const int i = gs.row(r), h = hk * group + gs.head(r);
        const int64_t step = kRowStep / group;
        cp_async_thread_rows<T, D, BR, kCtaThreads>(
            sQ + buf * BR * kPitch, q + q_offset(varlen, p.q_batch_stride, p.q_row_stride, p.q_head_stride, si, b, i, h),
            step * p.q_row_stride, rows - r0, p.head_dim, q);
        cp_async_thread_rows<T, D, BR, kCtaThreads>(
            sdO + buf * BR * kPitch,
            dout + q_offset(varlen, p.do_batch_stride, p.do_row_stride, p.do_head_stride, si, b, i, h),
            step * p.do_row_stride, rows - r0, p.head_dim, dout);
        strided = true;
      }
    }
    if (!strided) {
      cp_async_tile<T, D, BR, kCtaThreads>(
          sQ + buf * BR * kPitch, q_rows(q, p.q_batch_stride, p.q_row_stride, p.q_head_stride), p.head_dim, q);
      cp_async_tile<T, D, BR, kCtaThreads>(sdO + buf * BR * kPitch,
                                           q_rows(dout, p.do_batch_stride, p.do_row_stride, p.do_head_stride),
                                           p.head_dim, dout);
    }
    if (tid < BR) {
      const int r = r0 + tid;
      const bool ok = r < rows;
      const int i = ok ? gs.row(r) : 0;
      const int h = hk * group + (ok ? gs.head(r) : 0);
      sI[buf * BR + tid] = ok ? i : -1;
      // lse and Di complete with the block's copies: a load here would hold this thread (and the
      // block's next barrier) for a global round trip.
      cp_async4(sLse + buf * BR + tid, p.softmax_lse + lse_offset(p, si, b, i, h), ok ? 4 : 0);
      cp_async4(sDi + buf * BR + tid, p.workspace + di_offset(p, b, h, i), ok ? 4 : 0);
      sSlope[buf * BR + tid] = !kPlain && p.alibi_slopes != nullptr ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.f;
    }
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
      // Lanes tq and tq ^ 1 trade halves so that each adds four consecutive floats of one row (one
      // vector atomic on sm90): the even lane row g, the odd lane row g + 8. All the trades first,
      // so that the atomics do not wait on one shuffle each.
      const int e = tq & 1;
      float4 x[2 * kQC];
#pragma unroll
      for (int t = 0; t < 2 * kQC; ++t) {
        const float give0 = e ? dq[t][0] : dq[t][2], give1 = e ? dq[t][1] : dq[t][3];
        const float got0 = __shfl_xor_sync(0xffffffffu, give0, 1), got1 = __shfl_xor_sync(0xffffffffu, give1, 1);
        x[t] = e ? make_float4(got0, got1, dq[t][2], dq[t][3]) : make_float4(dq[t][0], dq[t][1], got0, got1);
      }
      const int r = r0 + wr + g + 8 * e;
      if (r < rows) {
        float* acc = dq_accum_row(p, si, b, gs.row(r), hk * group + gs.head(r));
#pragma unroll
        for (int t = 0; t < 2 * kQC; ++t) {
          const int d = d0 + (c0 + t / 2) * 16 + (t & 1) * 8 + (tq & 2) * 2;
          if (c0 + t / 2 < kChunks && d < p.head_dim) atomic_add4(acc + d, x[t]);
        }
      }
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

// The fused backward of one (dtype, head-dim bucket, CTA shape): the dK/dV kernel adding dQ by
// atomics, then the dQ conversion.
template <typename T, int D, bool kPlain, int kWarps, int kRowsPerStep>
void launch_bwd_mma_fused(const BwdArgs& args, cudaStream_t stream) {
  using Tr = BwdMmaTraits<D, kWarps, kRowsPerStep>;
  auto kernel = dkdv_mma_kernel<T, D, kPlain, true, kWarps, kRowsPerStep>;
  set_smem(kernel, Tr::kDkdvSmem, "cudaFuncSetAttribute(dkdv_mma_kernel)");
  launch_fused_bwd<T>(args, kernel, ceil_div(args.p.seqlen_k, Tr::kKeys) * Tr::kDSplit, Tr::kDkdvThreads,
                      Tr::kDkdvSmem, "dkdv_mma_kernel launch", stream);
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
    // The fused CTA shape (measured on the H200, cuda_kernel_notes.md v15): 8 warps (128 keys) with
    // 64-row steps up to head dim 64, 32-row steps above (where 64 would spill: the dK / dV
    // accumulators take the registers); 4 warps of 32-row steps where the device lacks the shared
    // memory.
    using Wide = BwdMmaTraits<D, 8, D <= 64 ? 64 : 32>;
    if (!bwd_fused_dq(args.p)) {
      if constexpr (BwdMmaTraits<D>::kDSplit == 1) launch_bwd_mma_deterministic<T, D, kPlain>(args, stream);
    } else if (max_smem_optin() >= Wide::kDkdvSmem) {
      launch_bwd_mma_fused<T, D, kPlain, 8, Wide::kRows>(args, stream);
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
