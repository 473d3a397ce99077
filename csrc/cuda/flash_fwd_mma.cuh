// Tensor-core forward (FlashAttention-2 style, sm80-class mma.sync): one CTA of 4 warps per
// (64 packed query rows, KV head, batch[, split]); each warp owns 16 query rows. K/V tiles are
// double-buffered in shared memory with cp.async, S = Q K^T and O += P V use
// mma.sync.m16n8k16 (bf16/fp16 in, fp32 accumulate) with ldmatrix fragment loads, and P stays in
// registers between the two products. Same contract and results as fwd_kernel (flash_fwd.cu).
// Fragment layouts and ldmatrix addressing: flash_mma.cuh.
#pragma once

#include "flash_mma.cuh"

namespace flash {
namespace cuda {
namespace detail {

// Tile shape per head-dim bucket: 64 query rows, kBlockN keys (smaller for large D so that
// double-buffered K and V fit the 99 KB of sm86/sm89).
template <int D>
struct MmaTraits {
  static constexpr int kBlockM = 64;
  static constexpr int kBlockN = D <= 128 ? 64 : 32;
  static constexpr int kPitch = mma_pitch(D);
  static constexpr size_t kSmemBytes = sizeof(uint16_t) * (kBlockM + 4 * kBlockN) * kPitch;
};

// Per-row constants of one of the two query rows a thread holds C-fragment values of.
struct MmaRow {
  bool ok;
  int i, h;
  int64_t bh;  // b * heads_q + h: the Philox counter's head word
  float slope;
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) fwd_mma_kernel(const FwdArgs args) {
  using Tr = MmaTraits<D>;
  constexpr int BM = Tr::kBlockM;
  constexpr int BN = Tr::kBlockN;
  constexpr int kPitch = Tr::kPitch;
  constexpr int kNT = BN / 8;  // 8-key column tiles of S
  constexpr int kDT = D / 8;   // 8-column tiles of O
  extern __shared__ __align__(16) uint16_t smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * kPitch;      // [2][BN][kPitch]
  T* sV = sK + 2 * BN * kPitch;  // [2][BN][kPitch]

  const FlashFwdParams& p = args.p;
  const ScoreArgs& sa = args.s;
  const int b = blockIdx.z;
  const int hk = blockIdx.y / args.num_splits;
  const int split = blockIdx.y % args.num_splits;
  const SeqInfo si = seq_info(p, b);
  const int group = sa.group;
  const int rows = si.sq * group;
  const int r0 = blockIdx.x * BM;
  if (r0 >= rows) return;

  const bool varlen = p.cu_seqlens_q != nullptr;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);

  const int i_lo = r0 / group;
  const int i_hi = (min(r0 + BM, rows) - 1) / group;
  const int offset = si.sk - si.sq;
  int j_begin = 0, j_end = si.sk;
  if (sa.window_right >= 0) j_end = min(j_end, i_hi + offset + sa.window_right + 1);
  if (sa.window_left >= 0) j_begin = max(j_begin, i_lo + offset - sa.window_left);
  const int n_begin = j_begin / BN;
  const int n_end = j_end > j_begin ? ceil_div(j_end, BN) : n_begin;
  const int per_split = ceil_div(n_end - n_begin, args.num_splits);
  const int n_lo = min(n_end, n_begin + split * per_split);
  const int n_hi = min(n_end, n_lo + per_split);

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane >> 2;
  const int tq = lane & 3;
  MmaRow row[2];
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int r = r0 + warp * 16 + g + 8 * e;
    row[e].ok = r < rows;
    row[e].i = row[e].ok ? r / group : 0;
    row[e].h = hk * group + (row[e].ok ? r % group : 0);
    row[e].bh = static_cast<int64_t>(b) * p.heads_q + row[e].h;
    row[e].slope = p.alibi_slopes != nullptr ? p.alibi_slopes[b * p.alibi_batch_stride + row[e].h] : 0.f;
  }

  auto k_rows = [&](const T* base, int64_t bs, int64_t rst, int64_t hs, int j0) {
    return [=, &si, &p](int rr) -> const T* {
      if (j0 + rr >= si.sk) return nullptr;
      return base + kv_offset(p, bs, rst, hs, si, b, j0 + rr, hk);
    };
  };
  auto load_kv = [&](int n, int buf) {
    cp_async_tile<T, D, BN>(sK + buf * BN * kPitch, k_rows(k, p.k_batch_stride, p.k_row_stride, p.k_head_stride, n * BN),
                            p.head_dim, k);
    cp_async_tile<T, D, BN>(sV + buf * BN * kPitch, k_rows(v, p.v_batch_stride, p.v_row_stride, p.v_head_stride, n * BN),
                            p.head_dim, v);
  };

  float o[kDT][4];
#pragma unroll
  for (int t = 0; t < kDT; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.f;
  float m[2] = {neg_inf(), neg_inf()};
  float l[2] = {0.f, 0.f};  // this thread's share of the row sums; quad-reduced at the end

  if (n_lo < n_hi) {
    cp_async_tile<T, D, BM>(sQ, [&](int rr) -> const T* {
      const int r = r0 + rr;
      if (r >= rows) return nullptr;
      return q + q_offset(varlen, p.q_batch_stride, p.q_row_stride, p.q_head_stride, si, b, r / group, hk * group + r % group);
    }, p.head_dim, q);
    load_kv(n_lo, 0);
    cp_async_commit();
  }

  for (int n = n_lo; n < n_hi; ++n) {
    const int buf = (n - n_lo) & 1;
    cp_async_wait_all();
    __syncthreads();  // tile n visible to all warps; every warp is done with tile n-1 (buffer buf^1)
    if (n + 1 < n_hi) {
      load_kv(n + 1, buf ^ 1);
      cp_async_commit();
    }
    const T* cK = sK + buf * BN * kPitch;
    const T* cV = sV + buf * BN * kPitch;
    const int j0 = n * BN;

    // S = Q K^T for this warp's 16 rows.
    float s[kNT][4];
#pragma unroll
    for (int t = 0; t < kNT; ++t) s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.f;
    const int mi = lane >> 3;  // which of the four ldmatrix matrices this lane addresses
    const int rr = lane & 7;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];
      ldmatrix_x4(a, sQ + (warp * 16 + rr + (mi & 1) * 8) * kPitch + kk * 16 + (mi >> 1) * 8);
#pragma unroll
      for (int t2 = 0; t2 < kNT / 2; ++t2) {
        uint32_t bk[4];
        ldmatrix_x4(bk, cK + (t2 * 16 + rr + (mi >> 1) * 8) * kPitch + kk * 16 + (mi & 1) * 8);
        mma_16816<T>(s[2 * t2], a, bk[0], bk[1]);
        mma_16816<T>(s[2 * t2 + 1], a, bk[2], bk[3]);
      }
    }

    // Score modifiers, mask and online softmax; c0,c1 belong to row[0], c2,c3 to row[1].
    float tile_max[2] = {neg_inf(), neg_inf()};
#pragma unroll
    for (int t = 0; t < kNT; ++t) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const MmaRow& rw = row[c >> 1];
        const int j = j0 + t * 8 + tq * 2 + (c & 1);
        if (rw.ok && visible(sa, rw.i, j, si.sq, si.sk)) {
          float dcap;
          s[t][c] = modify_score(sa, s[t][c] * p.softmax_scale, rw.slope, rw.i, j, si.sq, si.sk, dcap);
        } else {
          s[t][c] = neg_inf();
        }
        tile_max[c >> 1] = fmaxf(tile_max[c >> 1], s[t][c]);
      }
    }
    float corr[2], m_use[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const float m_new = fmaxf(m[e], quad_max(tile_max[e]));
      m_use[e] = m_new == neg_inf() ? 0.f : m_new;  // no key seen yet: avoid inf - inf
      corr[e] = __expf(m[e] - m_use[e]);
      m[e] = m_new;
      l[e] *= corr[e];
    }
#pragma unroll
    for (int t = 0; t < kNT; ++t) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        s[t][c] = __expf(s[t][c] - m_use[c >> 1]);
        l[c >> 1] += s[t][c];
      }
    }
    if (sa.dropout) {
      // Keys j0 + 8t + 2tq + {0, 1} are words 2(tq & 1) + {0, 1} of Philox group (j0 + 8t + 2tq) / 4
      // (j0 is a multiple of 8); l keeps the undropped sum, as the contract's lse does.
#pragma unroll
      for (int t = 0; t < kNT; ++t) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const Philox4 rnd = dropout_randoms(p.philox_seed, p.philox_offset, row[e].bh, row[e].i, j0 + t * 8 + tq * 2);
          const uint32_t w0 = (tq & 1) ? rnd.z : rnd.x;
          const uint32_t w1 = (tq & 1) ? rnd.w : rnd.y;
          s[t][2 * e] = w0 >= sa.drop_threshold ? s[t][2 * e] * sa.drop_scale : 0.f;
          s[t][2 * e + 1] = w1 >= sa.drop_threshold ? s[t][2 * e + 1] * sa.drop_scale : 0.f;
        }
      }
    }
#pragma unroll
    for (int t = 0; t < kDT; ++t) {
      o[t][0] *= corr[0];
      o[t][1] *= corr[0];
      o[t][2] *= corr[1];
      o[t][3] *= corr[1];
    }

    // O += P V: the S accumulators of column tiles 2kk, 2kk+1 are the A fragment of keys kk*16..+15.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[4];
      a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int t2 = 0; t2 < kDT / 2; ++t2) {
        uint32_t bv[4];
        ldmatrix_x4_trans(bv, cV + (kk * 16 + rr + (mi & 1) * 8) * kPitch + t2 * 16 + (mi >> 1) * 8);
        mma_16816<T>(o[2 * t2], a, bv[0], bv[1]);
        mma_16816<T>(o[2 * t2 + 1], a, bv[2], bv[3]);
      }
    }
  }

#pragma unroll
  for (int e = 0; e < 2; ++e) l[e] = quad_sum(l[e]);

  if (args.num_splits > 1) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      if (!row[e].ok) continue;
      const int64_t ar = ((static_cast<int64_t>(split) * p.batch + b) * p.heads_q + row[e].h) * p.seqlen_q + row[e].i;
      const float inv = l[e] > 0.f ? 1.f / l[e] : 0.f;
      float* oa = p.out_accum + ar * p.head_dim;
#pragma unroll
      for (int t = 0; t < kDT; ++t) {
        const int d = t * 8 + tq * 2;
        if (d < p.head_dim) *reinterpret_cast<float2*>(oa + d) = make_float2(o[t][2 * e] * inv, o[t][2 * e + 1] * inv);
      }
      if (tq == 0) p.lse_accum[ar] = l[e] > 0.f ? m[e] + logf(l[e]) : neg_inf();
    }
    return;
  }

#pragma unroll
  for (int e = 0; e < 2; ++e) {
    if (!row[e].ok) continue;
    // l == 0 exactly when the row saw no key (the max score contributes exp(0) = 1 otherwise).
    float out_scale, lse;
    if (l[e] == 0.f) {
      out_scale = 0.f;
      lse = pos_inf();
    } else if (p.sinks != nullptr) {
      const float sink = p.sinks[row[e].h];
      const float mx = fmaxf(m[e], sink);
      const float total = l[e] * expf(m[e] - mx) + expf(sink - mx);
      out_scale = expf(m[e] - mx) / total;
      lse = mx + logf(total);
    } else {
      out_scale = 1.f / l[e];
      lse = m[e] + logf(l[e]);
    }
    T* out = static_cast<T*>(p.out) +
             q_offset(varlen, p.o_batch_stride, p.o_row_stride, p.o_head_stride, si, b, row[e].i, row[e].h);
#pragma unroll
    for (int t = 0; t < kDT; ++t) {
      const int d = t * 8 + tq * 2;
      if (d < p.head_dim) {
        *reinterpret_cast<uint32_t*>(out + d) = pack2<T>(o[t][2 * e] * out_scale, o[t][2 * e + 1] * out_scale);
      }
    }
    if (tq == 0 && p.softmax_lse != nullptr) p.softmax_lse[lse_offset(p, si, b, row[e].i, row[e].h)] = lse;
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace flash
