// Tensor-core forward (FlashAttention-2 style, sm80-class mma.sync): one CTA of kWarps warps per
// (BM packed query rows, KV head, batch[, split]); each warp owns kMT x 16 query rows, so every K/V
// fragment it loads from shared memory feeds kMT products. K/V tiles are double-buffered in shared
// memory with cp.async, S = Q K^T and O += P V use mma.sync.m16n8k16 (bf16/fp16 in, fp32
// accumulate) with ldmatrix fragment loads, and P stays in registers between the two products.
//
// The softmax runs in the log2 domain (x = score * log2(e), p = 2^(x - m)): one FFMA and one ex2
// per element, and the O rescale only when a row max of the warp moved. Masks (causal, window,
// sequence end) and score modifiers (softcap, ALiBi) cost per element, so they run only where
// needed: tiles every row sees entirely skip the mask, and kPlain instantiations (no softcap, ALiBi
// or dropout: the common case) have no code for them, which also frees the registers that let a
// warp own two m-tiles.
// Same contract and results as fwd_kernel (flash_fwd.cu). Fragment layouts: flash_mma.cuh.
#pragma once

#include <atomic>

#include "flash_mma.cuh"

namespace flash {
namespace cuda {
namespace detail {

// Tile shape: BM = 16 * kMT * kWarps query rows, BN keys; with kKeyWarps (decode-like calls of at
// most 16 packed rows) BM = 16 rows shared by all warps, each warp taking BN / kWarps keys of every
// tile, merged through shared memory at the end. kStages K/V buffers, kStages - 1 tiles in flight
// (kStages = 1: one K and one V buffer, each copied while the other is read); kMinCtas CTAs per SM
// asked of the register allocation (__launch_bounds__).
template <int D, int kWarps, int kMT, int BN, bool kKeyWarps = false, int kStages = 2, int kMinCtas = 2>
struct FwdMmaConfig {
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = kKeyWarps ? 16 : 16 * kMT * kWarps;
  static constexpr int kBlockN = BN;
  static constexpr int kWarpKeys = kKeyWarps ? BN / kWarps : BN;  // keys of a tile one warp computes
  static constexpr int kPitch = mma_pitch(D);
  static constexpr int kMergePitch = D + 8;  // floats per row of a warp's partial O in the merge
  static constexpr size_t kSmemBytes = sizeof(uint16_t) * (kBlockM + 2 * kStages * kBlockN) * kPitch;
  static_assert(!kKeyWarps || (kMT == 1 && kWarpKeys % 16 == 0), "key warps: one m-tile, 16-key steps");
  static_assert(!kKeyWarps || sizeof(float) * kWarps * 16 * (kMergePitch + 2) <= kSmemBytes,
                "the merge reuses the tiles' shared memory");
};

// Query row i and query head h of packed row r of KV head hk.
struct PackedRow {
  int i, h;
  __device__ __forceinline__ PackedRow(int r, int hk, int group) : i(r / group), h(hk * group + r % group) {}
};

// One tile's online softmax on the S accumulators of kMT m-tiles x kNT 8-key column tiles (row
// 2mt + e of the thread is C-fragment half e of m-tile mt; sc takes the scores to the log2 domain):
// moves the running max m (log2 domain) and this thread's share of the row sums l, turns s into P
// and leaves O's rescale per row in corr. Returns whether a row max of this thread moved: O and l
// are rescaled only then (after the first tiles that is rare, and skipping a multiplication by 1
// changes nothing). Row max and row sum as trees: a chain over the tile's columns was the kernel's
// main stall (fixed-latency dependencies, Nsight Compute).
template <int kMT, int kNT>
__device__ __forceinline__ bool online_softmax(float (&s)[kMT][kNT][4], float (&m)[2 * kMT], float (&l)[2 * kMT],
                                               float (&corr)[2 * kMT], float sc) {
  static_assert((kNT & (kNT - 1)) == 0, "tree reductions over a power-of-two column count");
  float m_use[2 * kMT];
  bool moved = false;
#pragma unroll
  for (int e = 0; e < 2 * kMT; ++e) {
    float part[kNT];
#pragma unroll
    for (int t = 0; t < kNT; ++t) part[t] = fmaxf(s[e >> 1][t][2 * (e & 1)], s[e >> 1][t][2 * (e & 1) + 1]);
#pragma unroll
    for (int w = kNT / 2; w > 0; w /= 2) {
#pragma unroll
      for (int t = 0; t < w; ++t) part[t] = fmaxf(part[t], part[t + w]);
    }
    const float m_new = fmaxf(m[e], quad_max(part[0]) * sc);
    m_use[e] = m_new == neg_inf() ? 0.f : m_new;  // no key seen yet: avoid inf - inf
    corr[e] = m_new == m[e] ? 1.f : fast_exp2(m[e] - m_use[e]);
    moved |= m_new != m[e];
    m[e] = m_new;
    l[e] *= corr[e];
  }
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int t = 0; t < kNT; ++t)
#pragma unroll
      for (int c = 0; c < 4; ++c) s[mt][t][c] = fast_exp2(fmaf(s[mt][t][c], sc, -m_use[2 * mt + (c >> 1)]));
#pragma unroll
  for (int e = 0; e < 2 * kMT; ++e) {
    float part[kNT];
#pragma unroll
    for (int t = 0; t < kNT; ++t) part[t] = s[e >> 1][t][2 * (e & 1)] + s[e >> 1][t][2 * (e & 1) + 1];
#pragma unroll
    for (int w = kNT / 2; w > 0; w /= 2) {
#pragma unroll
      for (int t = 0; t < w; ++t) part[t] += part[t + w];
    }
    l[e] += part[0];
  }
  return moved;
}

// The key-warps merge: kWarps warps hold partial (m, l, O) of the same 16 rows, each over its share
// of the keys; warp 0 ends with the merged ones, the other warps get false and are done. `smem`
// (free once every warp is done with the tiles) holds kWarps x 16 x (D + 10) floats; `sync` is a
// barrier of the kWarps warps.
template <int kWarps, int D, typename Sync>
__device__ __forceinline__ bool merge_key_warps(float* smem, int warp, float (&m)[2], float (&l)[2],
                                                float (&o)[D / 8][4], Sync sync) {
  constexpr int kMP = D + 8;  // floats per row of a warp's partial O
  const int g = (threadIdx.x % 32) >> 2;
  const int tq = threadIdx.x & 3;
  float* s_m = smem;                 // [kWarps][16]
  float* s_l = s_m + kWarps * 16;    // [kWarps][16]
  float* s_o = s_l + kWarps * 16;    // [kWarps][16][kMP]
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int row = warp * 16 + g + 8 * e;
    if (tq == 0) {
      s_m[row] = m[e];
      s_l[row] = l[e];
    }
#pragma unroll
    for (int t = 0; t < D / 8; ++t) {
      *reinterpret_cast<float2*>(s_o + row * kMP + t * 8 + tq * 2) = make_float2(o[t][2 * e], o[t][2 * e + 1]);
    }
  }
  sync();
  if (warp != 0) return false;
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int row = g + 8 * e;
    float mx = neg_inf();
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, s_m[w * 16 + row]);
    const float mx_use = mx == neg_inf() ? 0.f : mx;
    float f[kWarps];
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      f[w] = fast_exp2(s_m[w * 16 + row] - mx_use);
      total += s_l[w * 16 + row] * f[w];
    }
#pragma unroll
    for (int t = 0; t < D / 8; ++t) {
      float2 acc = make_float2(0.f, 0.f);
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float2 x = *reinterpret_cast<const float2*>(s_o + (w * 16 + row) * kMP + t * 8 + tq * 2);
        acc.x = fmaf(x.x, f[w], acc.x);
        acc.y = fmaf(x.y, f[w], acc.y);
      }
      o[t][2 * e] = acc.x;
      o[t][2 * e + 1] = acc.y;
    }
    m[e] = mx;
    l[e] = total;
  }
  return true;
}

// The forward's epilogue of one warp (m in the log2 domain, l the whole row sums): out and
// softmax_lse with the sink, or with num_splits > 1 the split's normalized partial out_accum and its
// lse_accum (without the sink). Row 2mt + e of the thread is C-fragment half e of m-tile mt,
// packed row packed_row(2mt + e); rows at or past `rows` are skipped.
template <typename T, int kMT, int kDT, typename RowOf>
__device__ __forceinline__ void store_fwd_rows(const FwdArgs& args, const SeqInfo& si, int b, int hk, int split,
                                               int rows, RowOf packed_row, const float (&m)[2 * kMT],
                                               const float (&l)[2 * kMT], const float (&o)[kMT][kDT][4]) {
  const FlashFwdParams& p = args.p;
  const int tq = threadIdx.x & 3;
  const bool varlen = p.cu_seqlens_q != nullptr;
  // Back to natural units: max m2 (log2 domain) is m2 * ln2; lse = (m2 + log2(l)) * ln2.
#pragma unroll
  for (int e = 0; e < 2 * kMT; ++e) {
    if (packed_row(e) >= rows) continue;
    const PackedRow pr(packed_row(e), hk, args.s.group);
    const int mt = e >> 1, hc = 2 * (e & 1);  // this row's C-fragment columns c = hc, hc + 1
    if (args.num_splits > 1) {
      const int64_t ar = ((static_cast<int64_t>(split) * p.batch + b) * p.heads_q + pr.h) * p.seqlen_q + pr.i;
      const float inv = l[e] > 0.f ? 1.f / l[e] : 0.f;
      float* oa = p.out_accum + ar * p.head_dim;
#pragma unroll
      for (int t = 0; t < kDT; ++t) {
        const int d = t * 8 + tq * 2;
        if (d < p.head_dim) *reinterpret_cast<float2*>(oa + d) = make_float2(o[mt][t][hc] * inv, o[mt][t][hc + 1] * inv);
      }
      if (tq == 0) p.lse_accum[ar] = l[e] > 0.f ? (m[e] + log2f(l[e])) * kLn2 : neg_inf();
      continue;
    }
    // l == 0 exactly when the row saw no key (the max score contributes 2^0 = 1 otherwise).
    float out_scale, lse;
    if (l[e] == 0.f) {
      out_scale = 0.f;
      lse = pos_inf();
    } else if (p.sinks != nullptr) {
      const float sink2 = p.sinks[pr.h] * kLog2e;
      const float mx = fmaxf(m[e], sink2);
      const float total = l[e] * exp2f(m[e] - mx) + exp2f(sink2 - mx);
      out_scale = exp2f(m[e] - mx) / total;
      lse = (mx + log2f(total)) * kLn2;
    } else {
      out_scale = 1.f / l[e];
      lse = (m[e] + log2f(l[e])) * kLn2;
    }
    T* out = static_cast<T*>(p.out) +
             q_offset(varlen, p.o_batch_stride, p.o_row_stride, p.o_head_stride, si, b, pr.i, pr.h);
#pragma unroll
    for (int t = 0; t < kDT; ++t) {
      const int d = t * 8 + tq * 2;
      if (d < p.head_dim) {
        *reinterpret_cast<uint32_t*>(out + d) = pack2<T>(o[mt][t][hc] * out_scale, o[mt][t][hc + 1] * out_scale);
      }
    }
    if (tq == 0 && p.softmax_lse != nullptr) p.softmax_lse[lse_offset(p, si, b, pr.i, pr.h)] = lse;
  }
}

template <typename T, int D, int kWarps, int kMT, int BN, bool kPlain, bool kKeyWarps = false, int kStages = 2,
          int kMinCtas = 2>
__global__ void __launch_bounds__(32 * kWarps, kMinCtas) fwd_mma_kernel(const FwdArgs args) {
  using Cfg = FwdMmaConfig<D, kWarps, kMT, BN, kKeyWarps, kStages, kMinCtas>;
  static_assert(!kKeyWarps || kPlain, "key warps: plain calls only");
  constexpr int NT = Cfg::kThreads;
  constexpr int BM = Cfg::kBlockM;
  constexpr int kPitch = Cfg::kPitch;
  constexpr int kNT = Cfg::kWarpKeys / 8;  // 8-key column tiles of S per warp
  constexpr int kDT = D / 8;       // 8-column tiles of O
  constexpr int kRows = 2 * kMT;   // query rows per thread: row 2*mt + e is fragment half e of m-tile mt
  extern __shared__ __align__(16) uint16_t smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * kPitch;            // [kStages][BN][kPitch]
  T* sV = sK + kStages * BN * kPitch;  // [kStages][BN][kPitch]

  const FlashFwdParams& p = args.p;
  const ScoreArgs& sa = args.s;
  const int b = blockIdx.z;
  const int hk = blockIdx.y / args.num_splits;
  const int split = blockIdx.y % args.num_splits;
  const SeqInfo si = seq_info(p, b);
  const int group = sa.group;
  const GroupSplit gs(group);
  const int rows = si.sq * group;
  // Under a right window (causal) the last row blocks see the most keys: they start first, so
  // that the short ones fill the last wave.
  const int r0 = (sa.window_right >= 0 ? gridDim.x - 1 - blockIdx.x : blockIdx.x) * BM;
  if (r0 >= rows) return;

  const bool varlen = p.cu_seqlens_q != nullptr;
  const T* q = static_cast<const T*>(p.q);

  const int i_lo = r0 / group;
  const int i_hi = (min(r0 + BM, rows) - 1) / group;
  const int offset = si.sk - si.sq;
  const BlockRange blocks = split_share(visible_key_blocks(sa, si, i_lo, i_hi, BN), split, args.num_splits);
  const int n_lo = blocks.begin, n_hi = blocks.end;

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane >> 2;
  const int tq = lane & 3;
  const int warp_row0 = kKeyWarps ? 0 : warp * 16 * kMT;  // first tile row of this warp
  const int kw = kKeyWarps ? warp * Cfg::kWarpKeys : 0;   // first key of a tile this warp computes
  // Packed row of this thread's row e (C-fragment half e & 1 of m-tile e >> 1); rows past `rows`
  // read zero Q, compute harmless values and are never stored.
  auto packed_row = [&](int e) { return r0 + warp_row0 + (e >> 1) * 16 + g + 8 * (e & 1); };
  // Per-row ALiBi slopes: only the general instantiation keeps them in registers.
  float slope[kPlain ? 1 : kRows];
#pragma unroll
  for (int e = 0; e < (kPlain ? 0 : kRows); ++e) {
    const PackedRow pr(min(packed_row(e), rows - 1), hk, group);
    slope[e] = p.alibi_slopes != nullptr ? p.alibi_slopes[b * p.alibi_batch_stride + pr.h] : 0.f;
  }

  const KvTileCopier<T, D, BN, NT> kv{p, si, b, hk};
  using KvStart = typename KvTileCopier<T, D, BN, NT>::Start;
  auto load_kv = [&](int n, int buf, const KvStart& at) {
    kv.copy(sK + buf * BN * kPitch, sV + buf * BN * kPitch, n, at);
  };

  float o[kMT][kDT][4];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int t = 0; t < kDT; ++t) o[mt][t][0] = o[mt][t][1] = o[mt][t][2] = o[mt][t][3] = 0.f;
  float m[kRows], l[kRows];  // running max (log2 domain) and this thread's share of the row sums
#pragma unroll
  for (int e = 0; e < kRows; ++e) {
    m[e] = neg_inf();
    l[e] = 0.f;
  }
  const float scale_log2 = p.softmax_scale * kLog2e;

  KvStart at{-1, -1};  // kStages == 1: start of tile n
  if (n_lo < n_hi) {
    cp_async_tile<T, D, BM, NT>(sQ, [&](int rr) -> const T* {
      const int r = r0 + rr;
      if (r >= rows) return nullptr;
      return q + q_offset(varlen, p.q_batch_stride, p.q_row_stride, p.q_head_stride, si, b, r / group, hk * group + r % group);
    }, p.head_dim, q);
    at = kv.start(n_lo);
    if constexpr (kStages == 1) {
      kv.copy_k(sK, n_lo, at);
    } else {
      load_kv(n_lo, 0, at);
    }
    cp_async_commit();
    // The first kStages - 1 tiles in flight; empty groups keep one group per tile for the waits.
    for (int st = 1; st < kStages - 1; ++st) {
      if (n_lo + st < n_hi) load_kv(n_lo + st, st, kv.start(n_lo + st));
      cp_async_commit();
    }
  }
  KvStart ahead{-1, -1};  // start of the next tile to copy
  if (n_lo + kStages - 1 < n_hi) ahead = kv.start(n_lo + kStages - 1);

  const int mi = lane >> 3;  // which of the four ldmatrix matrices this lane addresses
  const int rr = lane & 7;
  for (int n = n_lo; n < n_hi; ++n) {
    const int buf = (n - n_lo) % kStages;
    if constexpr (kStages == 1) {
      // One K and one V buffer (FlashAttention-2's pipeline: half the shared memory of two stages,
      // two barriers per tile): V(n) copies during S = Q K^T, K(n+1) during the softmax and P V.
      cp_async_wait_group<0>();  // K(n) landed
      __syncthreads();  // K(n) visible to all warps; every warp is done with V(n-1)
      kv.copy_v(sV, n, at);
      cp_async_commit();
      if (n + 1 < n_hi) at = kv.start(n + 1);  // read while S computes
    } else {
      cp_async_wait_group<kStages - 2>();  // tile n landed (the kStages - 2 after it may be in flight)
      __syncthreads();  // tile n visible to all warps; every warp is done with tile n-1, whose buffer is refilled
      if (n + kStages - 1 < n_hi) load_kv(n + kStages - 1, (n - n_lo + kStages - 1) % kStages, ahead);
      if (kStages > 2 || n + 1 < n_hi) cp_async_commit();
      if (n + kStages < n_hi) ahead = kv.start(n + kStages);  // read while this tile's products run
    }
    const T* cK = sK + buf * BN * kPitch;
    const T* cV = sV + buf * BN * kPitch;
    const int j0 = n * BN;

    // S = Q K^T for this warp's kMT x 16 rows.
    float s[kMT][kNT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int t = 0; t < kNT; ++t) s[mt][t][0] = s[mt][t][1] = s[mt][t][2] = s[mt][t][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        ldmatrix_x4(a[mt], sQ + (warp_row0 + mt * 16 + rr + (mi & 1) * 8) * kPitch + kk * 16 + (mi >> 1) * 8);
      }
#pragma unroll
      for (int t2 = 0; t2 < kNT / 2; ++t2) {
        uint32_t bk[4];
        ldmatrix_x4(bk, cK + (kw + t2 * 16 + rr + (mi >> 1) * 8) * kPitch + kk * 16 + (mi & 1) * 8);
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma_16816<T>(s[mt][2 * t2], a[mt], bk[0], bk[1]);
          mma_16816<T>(s[mt][2 * t2 + 1], a[mt], bk[2], bk[3]);
        }
      }
    }

    if constexpr (kStages == 1) {
      cp_async_wait_group<0>();  // V(n) landed
      __syncthreads();  // V(n) visible; every warp is done with K(n)
      if (n + 1 < n_hi) {
        kv.copy_k(sK, n + 1, at);
        cp_async_commit();
      }
    }

    // Masked entries -inf. The general instantiation takes scores to the log2 domain here; the plain
    // one folds scale * log2(e) into the exponent below (its scale is positive, so the row max of
    // the raw scores is the max of the scaled ones). c0,c1 belong to row 2mt, c2,c3 to row 2mt+1.
    // The tile needs the mask unless every row of the CTA sees every key of it.
    const bool need_mask = tile_needs_mask(sa, si.sk, offset, j0, BN, i_lo, i_hi);
    if (!kPlain || need_mask) {
#pragma unroll
      for (int e = 0; e < kRows; ++e) {
        const int r = packed_row(e);
        const int i = gs.row(r);
        const int mt = e >> 1, hc = 2 * (e & 1);
#pragma unroll
        for (int t = 0; t < kNT; ++t)
#pragma unroll
          for (int c = hc; c < hc + 2; ++c) {
            const int j = j0 + kw + t * 8 + tq * 2 + (c & 1);
            if (!need_mask || (r < rows && visible(sa, i, j, si.sq, si.sk))) {
              if (!kPlain) {
                float dcap;
                s[mt][t][c] = modify_score(sa, s[mt][t][c] * p.softmax_scale, slope[e], i, j, si.sq, si.sk, dcap) * kLog2e;
              }
            } else {
              s[mt][t][c] = neg_inf();
            }
          }
      }
    }
    const float sc = kPlain ? scale_log2 : 1.f;  // what takes s to the log2 domain

    float corr[kRows];
    const bool moved = online_softmax<kMT, kNT>(s, m, l, corr, sc);
    if (!kPlain && sa.dropout) {
      // Keys j0 + 8t + 2tq + {0, 1} are words 2(tq & 1) + {0, 1} of Philox group (j0 + 8t + 2tq) / 4
      // (j0 is a multiple of 8); l keeps the undropped sum, as the contract's lse does.
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int t = 0; t < kNT; ++t)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const PackedRow pr(packed_row(2 * mt + h), hk, group);
            const int64_t bh = static_cast<int64_t>(b) * p.heads_q + pr.h;  // the Philox head word
            const Philox4 rnd = dropout_randoms(p.philox_seed, p.philox_offset, bh, pr.i, j0 + t * 8 + tq * 2);
            const uint32_t w0 = (tq & 1) ? rnd.z : rnd.x;
            const uint32_t w1 = (tq & 1) ? rnd.w : rnd.y;
            s[mt][t][2 * h] = w0 >= sa.drop_threshold ? s[mt][t][2 * h] * sa.drop_scale : 0.f;
            s[mt][t][2 * h + 1] = w1 >= sa.drop_threshold ? s[mt][t][2 * h + 1] * sa.drop_scale : 0.f;
          }
    }
    if (__any_sync(0xFFFFFFFFu, moved)) {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int t = 0; t < kDT; ++t) {
          o[mt][t][0] *= corr[2 * mt];
          o[mt][t][1] *= corr[2 * mt];
          o[mt][t][2] *= corr[2 * mt + 1];
          o[mt][t][3] *= corr[2 * mt + 1];
        }
    }

    // O += P V: the S accumulators of column tiles 2kk, 2kk+1 are the A fragment of keys kk*16..+15.
#pragma unroll
    for (int kk = 0; kk < Cfg::kWarpKeys / 16; ++kk) {
      uint32_t a[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        a[mt][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        a[mt][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        a[mt][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        a[mt][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int t2 = 0; t2 < kDT / 2; ++t2) {
        uint32_t bv[4];
        ldmatrix_x4_trans(bv, cV + (kw + kk * 16 + rr + (mi & 1) * 8) * kPitch + t2 * 16 + (mi >> 1) * 8);
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma_16816<T>(o[mt][2 * t2], a[mt], bv[0], bv[1]);
          mma_16816<T>(o[mt][2 * t2 + 1], a[mt], bv[2], bv[3]);
        }
      }
    }
  }

#pragma unroll
  for (int e = 0; e < kRows; ++e) l[e] = quad_sum(l[e]);

  if constexpr (kKeyWarps) {
    __syncthreads();  // every warp is done with the K/V tiles
    if (!merge_key_warps<kWarps, D>(reinterpret_cast<float*>(smem_raw), warp, m, l, o[0], [] { __syncthreads(); })) return;
  }
  store_fwd_rows<T, kMT, kDT>(args, si, b, hk, split, rows, packed_row, m, l, o);
}

template <typename T, int D, int kWarps, int kMT, int BN, bool kPlain, bool kKeyWarps = false, int kStages = 2,
          int kMinCtas = 2>
void launch_fwd_mma_config(const FwdArgs& args, cudaStream_t stream) {
  using Cfg = FwdMmaConfig<D, kWarps, kMT, BN, kKeyWarps, kStages, kMinCtas>;
  auto kernel = fwd_mma_kernel<T, D, kWarps, kMT, BN, kPlain, kKeyWarps, kStages, kMinCtas>;
  set_smem(kernel, Cfg::kSmemBytes, "cudaFuncSetAttribute(fwd_mma_kernel)");
  const FlashFwdParams& p = args.p;
  const dim3 grid(ceil_div(p.seqlen_q * args.s.group, Cfg::kBlockM), p.heads_kv * args.num_splits, p.batch);
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(args);
  check_launch("fwd_mma_kernel launch");
}

// CTAs of one split of a call and how many CTAs of its kernel an SM holds (for the split heuristic).
template <typename T, int D, int kWarps, int kMT, int BN, bool kPlain, bool kKeyWarps = false, int kStages = 2,
          int kMinCtas = 2>
FwdOccupancy fwd_mma_config_occupancy(const FwdArgs& args) {
  using Cfg = FwdMmaConfig<D, kWarps, kMT, BN, kKeyWarps, kStages, kMinCtas>;
  auto kernel = fwd_mma_kernel<T, D, kWarps, kMT, BN, kPlain, kKeyWarps, kStages, kMinCtas>;
  // Queried once per device: the query cost ~5 us on every decode step (the split heuristic's).
  static std::atomic<int> known[kMaxDevices] = {};
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  int per_sm = device < kMaxDevices ? known[device].load(std::memory_order_relaxed) : 0;
  if (per_sm == 0) {
    set_smem(kernel, Cfg::kSmemBytes, "cudaFuncSetAttribute(fwd_mma_kernel)");
    check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, Cfg::kThreads, Cfg::kSmemBytes),
               "cudaOccupancyMaxActiveBlocksPerMultiprocessor(fwd_mma_kernel)");
    per_sm = std::max(per_sm, 1);
    if (device < kMaxDevices) known[device].store(per_sm, std::memory_order_relaxed);
  }
  const FlashFwdParams& p = args.p;
  const int64_t ctas = static_cast<int64_t>(ceil_div(p.seqlen_q * args.s.group, Cfg::kBlockM)) * p.heads_kv * p.batch;
  return {ctas, per_sm};
}

// The tensor-core forward of one (dtype, head-dim bucket) calls f with the launch and occupancy
// functions of its kernel: the general instantiation when a call has softcap, ALiBi, dropout or a
// softmax scale <= 0, else a plain one. Plain, D <= 128: warps over keys for at most 16 packed rows
// (as in decode), else two m-tiles per warp above 64 rows (at 64, short causal calls: one m-tile,
// four CTAs per SM), one K and one V buffer. Plain above 128,
// where the shared memory allows (sm90, sm100): at 256 FlashAttention-2's H100 shape (64 x 64 tiles,
// 4 warps, one K and one V buffer, two CTAs per SM), at 160-224 128-row CTAs of 8 warps over
// double-buffered 64-key tiles (their rows are not a whole number of copies per thread, and one
// stage exposed the copies: -17% at 192 on the H200, v17).
template <typename T, int D, typename F>
auto with_fwd_mma_kernel(const FwdArgs& args, F&& f) {
  // Keys per tile: fewer for large D so that the double-buffered K and V fit the 99 KB of
  // sm86/sm89 next to Q.
  constexpr int BN = D <= 128 ? 64 : 32;
  const bool plain =
      args.s.softcap == 0.f && args.p.alibi_slopes == nullptr && !args.s.dropout && args.p.softmax_scale > 0.f;
  if (!plain) {
    return f(launch_fwd_mma_config<T, D, 4, 1, BN, false>, fwd_mma_config_occupancy<T, D, 4, 1, BN, false>);
  }
  const int rows = args.p.seqlen_q * args.s.group;
  if constexpr (D <= 128) {
    if (rows <= 16) {
      return f(launch_fwd_mma_config<T, D, 4, 1, BN, true, true>, fwd_mma_config_occupancy<T, D, 4, 1, BN, true, true>);
    }
    if constexpr (D == 64) {
      // Short causal calls: 64-row CTAs, four per SM, balance the triangle better (+13% at 2k
      // causal on the H200, v17; -12% at 16k).
      if (args.s.window_right >= 0 && args.p.seqlen_q <= 2048 && rows > 64) {
        return f(launch_fwd_mma_config<T, D, 4, 1, BN, true, false, 1, 4>,
                 fwd_mma_config_occupancy<T, D, 4, 1, BN, true, false, 1, 4>);
      }
    }
    // One stage: +1-5% over two at D = 64 and 128 on the H200 (v17), and half the shared memory.
    if (rows > 64) {
      return f(launch_fwd_mma_config<T, D, 4, 2, BN, true, false, 1>,
               fwd_mma_config_occupancy<T, D, 4, 2, BN, true, false, 1>);
    }
  } else if constexpr (D == 256) {
    // +8-15% over the 8-warp CTAs at 256 on the H200 (v17).
    using Pair = FwdMmaConfig<D, 4, 1, 64, false, 1, 2>;
    if (max_smem_optin() >= 2 * Pair::kSmemBytes) {
      return f(launch_fwd_mma_config<T, D, 4, 1, 64, true, false, 1>,
               fwd_mma_config_occupancy<T, D, 4, 1, 64, true, false, 1>);
    }
  } else {
    using Wide = FwdMmaConfig<D, 8, 1, 64, false, 2, 1>;
    if (rows > 64 && max_smem_optin() >= Wide::kSmemBytes) {
      return f(launch_fwd_mma_config<T, D, 8, 1, 64, true, false, 2, 1>,
               fwd_mma_config_occupancy<T, D, 8, 1, 64, true, false, 2, 1>);
    }
  }
  return f(launch_fwd_mma_config<T, D, 4, 1, BN, true>, fwd_mma_config_occupancy<T, D, 4, 1, BN, true>);
}

// Explicitly instantiated once per head dim (flash_fwd_mma_hdim*.cu), so the head dims compile in
// parallel and no translation unit compiles them twice.
template <typename T, int D>
void launch_fwd_mma(const FwdArgs& args, cudaStream_t stream) {
  with_fwd_mma_kernel<T, D>(args, [&](auto launch, auto) { launch(args, stream); });
}
template <typename T, int D>
FwdOccupancy fwd_mma_occupancy(const FwdArgs& args) {
  return with_fwd_mma_kernel<T, D>(args, [&](auto, auto occupancy) { return occupancy(args); });
}

}  // namespace detail
}  // namespace cuda
}  // namespace flash
