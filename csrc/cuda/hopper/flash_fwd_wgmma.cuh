// Hopper forward (sm90a, warpgroup MMA): one CTA of two warpgroups per (128 packed query rows, KV
// head, batch[, split]), two CTAs per SM at head dim 64; each warpgroup owns 64 rows. Q and a
// ring of K/V tiles are copied with cp.async into the 128-byte swizzled layout wgmma reads from
// shared memory, S = Q K^T is a shared-memory x shared-memory wgmma, and O += P V takes P from
// registers (the S accumulators converted in place: wgmma's accumulator layout is mma.sync's C
// fragment, its register A operand mma.sync's A fragment). The softmax, masks and epilogue are
// those of the sm80-class kernel (flash_fwd_mma.cuh), on two rows per thread.
//
// Calls it takes (hopper_fwd_supported, flash_fwd.cu): head dims above 32 (run at the next multiple
// of 64, the columns past head_dim zero), more than 64 packed rows, no softcap, ALiBi or dropout,
// softmax_scale > 0; every other call runs on the sm80-class kernels. Everything else of
// FlashFwdParams is covered (causal, window, GQA, varlen, seqused/leftpad, paged KV with any page
// size, cache_batch_idx, sinks, split-KV).
#pragma once

#include "cuda/hopper/wgmma_tiles.cuh"

namespace flash {
namespace cuda {
namespace detail {

// Tile shape of a head-dim bucket D: kWarpgroups x 64 query rows, BN keys per tile, kCtas CTAs per
// SM (shared memory and registers are split between them).
// Defaults (measured with the alternatives in flash_cuda_tune.cu): at head dim 64 two CTAs of 64-key
// tiles per SM (128 registers, no spill), whose independent barriers keep the tensor cores fed better
// than one CTA of three warpgroups; at 128 one CTA of 128-key tiles; above, 64-key tiles so that the S
// accumulators (BN / 2 registers) next to O's (D / 2) stay under 255.
template <int D, int kWarpgroups_ = 2, int BN = (D == 128 ? 128 : 64), int kCtas = (D <= 64 ? 2 : 1)>
struct FwdWgmmaConfig {
  static_assert(D % 64 == 0 && D <= 256, "head-dim bucket: whole 128-byte swizzle rows");
  static constexpr int kWarpgroups = kWarpgroups_;
  static constexpr int kThreads = 128 * kWarpgroups;
  static constexpr int kBlockM = 64 * kWarpgroups;
  static constexpr int kBlockN = BN;
  static constexpr int kCtasPerSm = kCtas;
  static constexpr uint32_t kQBytes = kBlockM * D * 2;
  static constexpr uint32_t kKVBytes = kBlockN * D * 2;  // one K or V tile
  // K/V buffers each: three (loads two tiles ahead) where they fit next to Q in an sm90 SM's 228 KB
  // (1 KB of it reserved per CTA), else two. + 1 KB to align the tiles to the swizzle period.
  static constexpr size_t kSmemLimit = 228 * 1024 / kCtas - 1024;
  static constexpr int kStages = kQBytes + 6 * kKVBytes + 1024 <= kSmemLimit ? 3 : 2;
  static constexpr size_t kSmemBytes = kQBytes + 2 * kStages * kKVBytes + 1024;
  static_assert(kSmemBytes <= kSmemLimit, "tiles fit the shared memory");
};

template <typename T, int D, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kCtasPerSm) fwd_wgmma_kernel(const FwdArgs args) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kStages = Cfg::kStages;
  constexpr int NT = Cfg::kThreads;
  constexpr int BM = Cfg::kBlockM;
  constexpr int BN = Cfg::kBlockN;
  constexpr int kNT = BN / 8;  // 8-key column tiles of S
  constexpr int kDT = D / 8;   // 8-column tiles of O
  extern __shared__ __align__(16) uint8_t wgmma_smem[];
  const uint32_t sQ = (smem_addr(wgmma_smem) + 1023u) & ~1023u;
  const uint32_t sK = sQ + Cfg::kQBytes;             // [kStages] K tiles
  const uint32_t sV = sK + kStages * Cfg::kKVBytes;  // [kStages] V tiles

  const FlashFwdParams& p = args.p;
  const ScoreArgs& sa = args.s;
  const int b = blockIdx.z;
  const int hk = blockIdx.y / args.num_splits;
  const int split = blockIdx.y % args.num_splits;
  const SeqInfo si = seq_info(p, b);
  const int group = sa.group;
  const GroupSplit gs(group);
  const int rows = si.sq * group;
  // With a right window (causal) the last row blocks see the most keys: start them first.
  const int m_block = sa.window_right >= 0 ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const int r0 = m_block * BM;
  if (r0 >= rows) return;

  const bool varlen = p.cu_seqlens_q != nullptr;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);

  const int i_lo = gs.row(r0);
  const int i_hi = gs.row(min(r0 + BM, rows) - 1);
  const int offset = si.sk - si.sq;
  const BlockRange blocks = split_share(visible_key_blocks(sa, si, i_lo, i_hi, BN), split, args.num_splits);
  const int n_lo = blocks.begin, n_hi = blocks.end;

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane >> 2;
  const int tq = lane & 3;
  const int wg = warp / 4;                              // warpgroup: rows 64 wg .. 64 wg + 63 of the tile
  const int warp_row0 = wg * 64 + (warp % 4) * 16;      // first tile row of this warp
  auto packed_row = [&](int e) { return r0 + warp_row0 + g + 8 * e; };  // e = 0, 1: c0,c1 / c2,c3

  auto k_rows = [&](const T* base, int64_t bs, int64_t rst, int64_t hs, int j0) {
    const int64_t tile = kv_tile_offset(p, bs, rst, hs, si, b, j0, BN, hk);
    return [=, &si, &p](int rr) -> const T* {
      if (j0 + rr >= si.sk) return nullptr;
      return base + (tile >= 0 ? tile + rr * rst : kv_offset(p, bs, rst, hs, si, b, j0 + rr, hk));
    };
  };
  auto stage = [&](int n) { return static_cast<uint32_t>((n - n_lo) % kStages); };  // buffer of tile n
  // Tile n of K or V into its buffer: one address per tile where the rows are evenly strided.
  auto load_kv = [&](uint32_t dst, const T* base, int64_t bs, int64_t rst, int64_t hs, int n) {
    const int j0 = n * BN;
    if constexpr (NT % (D / 8) == 0) {
      const int64_t tile = kv_tile_offset(p, bs, rst, hs, si, b, j0, BN, hk);
      if (tile >= 0) return cp_async_rows_sw128<T, D, BN, NT>(dst, base + tile, rst, si.sk - j0, p.head_dim);
    }
    cp_async_tile_sw128<T, D, BN, NT>(dst, k_rows(base, bs, rst, hs, j0), p.head_dim, base);
  };
  auto load_k = [&](int n) {
    load_kv(sK + stage(n) * Cfg::kKVBytes, k, p.k_batch_stride, p.k_row_stride, p.k_head_stride, n);
  };
  auto load_v = [&](int n) {
    load_kv(sV + stage(n) * Cfg::kKVBytes, v, p.v_batch_stride, p.v_row_stride, p.v_head_stride, n);
  };

  float o[D / 2];  // this warpgroup's 64 x D accumulators: o[4t + c] (wgmma_ops.cuh)
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
  float m[2] = {neg_inf(), neg_inf()};  // running row max (log2 domain)
  float l[2] = {0.f, 0.f};              // this thread's share of the row sums
  float corr[2];                        // O's rescale for the tile whose softmax ran last
  bool moved = false;                   // whether a row max of the warp moved in that tile
  const float scale_log2 = p.softmax_scale * kLog2e;
  const uint32_t sQ_wg = sQ + wg * 64 * 128;  // this warpgroup's 64 rows in every column block

  float s[BN / 2];              // S of one tile, then its probabilities P (fp32)
  uint32_t pa[BN / 16][4];      // P as the A operand of O += P V
  // S = Q K^T of tile n: D / 16 K-steps; step kk is 32 bytes into the 128-byte rows of column block kk / 4.
  auto issue_s = [&](int n) {
    const uint32_t cK = sK + stage(n) * Cfg::kKVBytes;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t step = (kk % 4) * 32;
      Wgmma<T, BN>::ss(s, sw128_desc(sQ_wg + (kk / 4) * BM * 128 + step, 16),
                       sw128_desc(cK + (kk / 4) * BN * 128 + step, 16), kk > 0);
    }
    wgmma_commit();
  };
  // O += P V of tile n: K-step kk starts 16 rows (2048 bytes) into the V tile, whose column blocks
  // are BN rows apart.
  auto issue_pv = [&](int n) {
    const uint32_t cV = sV + stage(n) * Cfg::kKVBytes;
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) pin_registers(pa[kk]);
    pin_registers(o);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) WgmmaRs<T, D>::rs(o, pa[kk], sw128_desc(cV + kk * 16 * 128, BN * 128));
    wgmma_commit();
  };
  // Masks tile n's S, updates the running max and sum and leaves P (fp32) in s; O's rescale is
  // left to the caller (corr, moved), which applies it once the previous O += P V has completed.
  auto softmax = [&](int n) {
    const int j0 = n * BN;
    // The tile needs the mask unless every row of the CTA sees every key of it.
    const bool need_mask = j0 + BN > si.sk ||
                           (sa.window_right >= 0 && j0 + BN - 1 > i_lo + offset + sa.window_right) ||
                           (sa.window_left >= 0 && j0 < i_hi + offset - sa.window_left);
    if (need_mask) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int r = packed_row(e);
        const int i = gs.row(r);
#pragma unroll
        for (int t = 0; t < kNT; ++t)
#pragma unroll
          for (int c = 2 * e; c < 2 * e + 2; ++c) {
            const int j = j0 + t * 8 + tq * 2 + (c & 1);
            if (!(r < rows && visible(sa, i, j, si.sq, si.sk))) s[4 * t + c] = neg_inf();
          }
      }
    }
    float m_use[2];
    moved = false;
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float part[kNT];
#pragma unroll
      for (int t = 0; t < kNT; ++t) part[t] = fmaxf(s[4 * t + 2 * e], s[4 * t + 2 * e + 1]);
      const float m_new = fmaxf(m[e], quad_max(tree_reduce<kNT>(part, [](float x, float y) { return fmaxf(x, y); })) * scale_log2);
      m_use[e] = m_new == neg_inf() ? 0.f : m_new;  // no key seen yet: avoid inf - inf
      corr[e] = m_new == m[e] ? 1.f : fast_exp2(m[e] - m_use[e]);
      moved |= m_new != m[e];
      m[e] = m_new;
      l[e] *= corr[e];
    }
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) s[i] = fast_exp2(fmaf(s[i], scale_log2, -m_use[(i >> 1) & 1]));
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float part[kNT];
#pragma unroll
      for (int t = 0; t < kNT; ++t) part[t] = s[4 * t + 2 * e] + s[4 * t + 2 * e + 1];
      l[e] += tree_reduce<kNT>(part, [](float x, float y) { return x + y; });
    }
  };
  // Rescales O (when a row max moved) and converts P to the A operand: the S accumulators of
  // column tiles 2kk, 2kk+1 are the A fragment of keys 16kk..16kk+15.
  auto rescale_and_pack = [&]() {
    if (__any_sync(0xFFFFFFFFu, moved)) {
#pragma unroll
      for (int i = 0; i < D / 2; ++i) o[i] *= corr[(i >> 1) & 1];
    }
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      pa[kk][0] = pack2<T>(s[8 * kk + 0], s[8 * kk + 1]);
      pa[kk][1] = pack2<T>(s[8 * kk + 2], s[8 * kk + 3]);
      pa[kk][2] = pack2<T>(s[8 * kk + 4], s[8 * kk + 5]);
      pa[kk][3] = pack2<T>(s[8 * kk + 6], s[8 * kk + 7]);
    }
  };

  // Pipeline (after FlashAttention-3's intra-warpgroup overlap): iteration n issues S of tile n+1
  // and O += P V of tile n back to back, runs tile n+1's softmax while the second product is in
  // flight, then rescales O. With kStages buffers each for K and V, iteration n reads K(n+1) and
  // V(n) and refills the buffers of K(n) and V(n-1), which the previous iteration finished with,
  // with K(n+kStages) and V(n+kStages-1): one cp.async group per iteration, kStages-2 of them may
  // still be in flight when an iteration starts. The prologue's groups keep that count:
  // {Q, K(lo), V(lo)}, {K(lo+s), V(lo+s)} for s = 1 .. kStages-2, {K(lo+kStages-1)}.
  if (n_lo < n_hi) {
    cp_async_tile_sw128<T, D, BM, NT>(sQ, [&](int rr) -> const T* {
      const int r = r0 + rr;
      if (r >= rows) return nullptr;
      return q + q_offset(varlen, p.q_batch_stride, p.q_row_stride, p.q_head_stride, si, b, gs.row(r), hk * group + gs.head(r));
    }, p.head_dim, q);
    load_k(n_lo);
    load_v(n_lo);
    cp_async_commit();
#pragma unroll
    for (int t = 1; t < kStages; ++t) {
      if (n_lo + t < n_hi) load_k(n_lo + t);
      if (t < kStages - 1 && n_lo + t < n_hi) load_v(n_lo + t);
      cp_async_commit();
    }
    cp_async_wait_group<kStages - 1>();  // Q, K(n_lo), V(n_lo)
    fence_proxy_async();
    __syncthreads();
    issue_s(n_lo);
    wgmma_wait<0>();
    pin_registers(s);
    softmax(n_lo);
    rescale_and_pack();
  }
  // No branch between a wgmma and its wait: ptxas serializes the products it cannot follow (C7514),
  // so the last tile's product is peeled off the loop.
  for (int n = n_lo; n + 1 < n_hi; ++n) {
    cp_async_wait_group<kStages - 2>();
    fence_proxy_async();
    __syncthreads();  // K(n+1) and V(n) landed; every warp is done with K(n) and V(n-1)
    issue_s(n + 1);
    issue_pv(n);
    // The copies' address math runs while the tensor cores work (their buffers are not these).
    if (n + kStages < n_hi) load_k(n + kStages);
    if (n + kStages - 1 < n_hi) load_v(n + kStages - 1);
    cp_async_commit();
    wgmma_wait<1>();  // S(n+1) done; P V of tile n may still run
    pin_registers(s);
    softmax(n + 1);
    wgmma_wait<0>();
    pin_registers(o);
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) pin_registers(pa[kk]);  // P of tile n stays put until its product is done
    rescale_and_pack();
  }
  if (n_lo < n_hi) {
    cp_async_wait_all();
    fence_proxy_async();
    __syncthreads();  // V of the last tile landed
    issue_pv(n_hi - 1);
    wgmma_wait<0>();
    pin_registers(o);
  }

#pragma unroll
  for (int e = 0; e < 2; ++e) l[e] = quad_sum(l[e]);

  // Epilogue (as the sm80-class kernel's): natural-log lse, the sink, split partials.
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int r = packed_row(e);
    if (r >= rows) continue;
    const int i = gs.row(r);
    const int h = hk * group + gs.head(r);
    if (args.num_splits > 1) {
      const int64_t ar = ((static_cast<int64_t>(split) * p.batch + b) * p.heads_q + h) * p.seqlen_q + i;
      const float inv = l[e] > 0.f ? 1.f / l[e] : 0.f;
      float* oa = p.out_accum + ar * p.head_dim;
#pragma unroll
      for (int t = 0; t < kDT; ++t) {
        const int d = t * 8 + tq * 2;
        if (d < p.head_dim) *reinterpret_cast<float2*>(oa + d) = make_float2(o[4 * t + 2 * e] * inv, o[4 * t + 2 * e + 1] * inv);
      }
      if (tq == 0) p.lse_accum[ar] = l[e] > 0.f ? (m[e] + log2f(l[e])) * kLn2 : neg_inf();
      continue;
    }
    float out_scale, lse;
    if (l[e] == 0.f) {  // the row saw no key
      out_scale = 0.f;
      lse = pos_inf();
    } else if (p.sinks != nullptr) {
      const float sink2 = p.sinks[h] * kLog2e;
      const float mx = fmaxf(m[e], sink2);
      const float total = l[e] * exp2f(m[e] - mx) + exp2f(sink2 - mx);
      out_scale = exp2f(m[e] - mx) / total;
      lse = (mx + log2f(total)) * kLn2;
    } else {
      out_scale = 1.f / l[e];
      lse = (m[e] + log2f(l[e])) * kLn2;
    }
    T* out = static_cast<T*>(p.out) + q_offset(varlen, p.o_batch_stride, p.o_row_stride, p.o_head_stride, si, b, i, h);
#pragma unroll
    for (int t = 0; t < kDT; ++t) {
      const int d = t * 8 + tq * 2;
      if (d < p.head_dim) {
        *reinterpret_cast<uint32_t*>(out + d) = pack2<T>(o[4 * t + 2 * e] * out_scale, o[4 * t + 2 * e + 1] * out_scale);
      }
    }
    if (tq == 0 && p.softmax_lse != nullptr) p.softmax_lse[lse_offset(p, si, b, i, h)] = lse;
  }
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

template <typename T, int D, typename Cfg>
void launch_fwd_wgmma_config(const FwdArgs& args, cudaStream_t stream) {
  auto kernel = fwd_wgmma_kernel<T, D, Cfg>;
  set_smem(kernel, Cfg::kSmemBytes, "cudaFuncSetAttribute(fwd_wgmma_kernel)");
  const FlashFwdParams& p = args.p;
  const dim3 grid(ceil_div(p.seqlen_q * args.s.group, Cfg::kBlockM), p.heads_kv * args.num_splits, p.batch);
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(args);
  check_launch("fwd_wgmma_kernel launch");
}

// Explicitly instantiated once per head-dim bucket (instantiations/flash_fwd_wgmma_hdim*.cu).
template <typename T, int D>
void launch_fwd_wgmma(const FwdArgs& args, cudaStream_t stream) {
  launch_fwd_wgmma_config<T, D, FwdWgmmaConfig<D>>(args, stream);
}

// CTAs of one split of a call and CTAs per SM (for the split heuristic).
template <typename T, int D>
FwdOccupancy fwd_wgmma_occupancy(const FwdArgs& args) {
  using Cfg = FwdWgmmaConfig<D>;
  const FlashFwdParams& p = args.p;
  return {static_cast<int64_t>(ceil_div(p.seqlen_q * args.s.group, Cfg::kBlockM)) * p.heads_kv * p.batch, Cfg::kCtasPerSm};
}

}  // namespace detail
}  // namespace cuda
}  // namespace flash
