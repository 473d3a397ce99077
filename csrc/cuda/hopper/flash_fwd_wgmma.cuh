// Hopper forward (sm90a, warpgroup MMA), warp-specialized: one CTA per (kConsumers x 64 packed query
// rows, KV head, batch[, split]). Warpgroup 0 is the producer: it copies Q and a ring of K/V tiles
// into the 128-byte swizzled layout wgmma reads from shared memory (cp.async from its 128 threads;
// K/V of plain dense layouts by TMA from one thread, tma.cuh), each buffer completing on an
// mbarrier, and gives most of its registers to the consumers (setmaxnreg). Each
// consumer warpgroup owns 64 rows: S = Q K^T is a shared-memory x shared-memory wgmma, O += P V takes
// P from registers (the S accumulators converted in place: wgmma's accumulator layout is mma.sync's
// C fragment, its register A operand mma.sync's A fragment). The consumers take turns on the tensor
// cores (named barriers), so one warpgroup's softmax runs while the other's products do. The softmax,
// masks and epilogue are those of the sm80-class kernel (flash_fwd_mma.cuh), on two rows per thread.
//
// Calls it takes (hopper_fwd_supported, flash_fwd.cu): head dims above 32 (run at the next multiple
// of 64, the columns past head_dim zero), more than 64 packed rows, no softcap, ALiBi or dropout,
// softmax_scale > 0; every other call runs on the sm80-class kernels. Everything else of
// FlashFwdParams is covered (causal, window, GQA, varlen, seqused/leftpad, paged KV with any page
// size, cache_batch_idx, sinks, split-KV).
//
// FP8 (T = __nv_fp8_e4m3, every FP8 call, any row count; out in bfloat16): 8-bit wgmma takes both
// operands K-major, so O += P V reads V transposed (fp8_transpose_v_kernel, flash_fwd.cu, writes
// it to FlashFwdParams::fp8_scratch before the launch). Its key columns are permuted within every
// 16 keys so that the S accumulators, rounded to e4m3 in place, are already P's A fragments (no
// shuffles): word w of a k32 A fragment holds keys 4t .. 4t+3 of the fragment, which the S
// accumulators of thread t hold as keys 2t, 2t+1, 2t+8, 2t+9. q_descale * k_descale joins the
// softmax scale, v_descale the output scale; P is computed as 2^(s - max + 8), in [0, 256], to
// use more of e4m3's range (FlashAttention-3's offset; the row sums carry the same factor).
#pragma once

#include "cuda/hopper/tma.cuh"
#include "cuda/hopper/wgmma_tiles.cuh"

namespace flash {
namespace cuda {
namespace detail {

// Tile shape of a head-dim bucket D: kConsumers warpgroups of 64 query rows plus the producer
// warpgroup, BN keys per tile, kCtas CTAs per SM (shared memory and registers are split between
// them). Defaults: three consumers at head dim 64 (160 registers each with ~150 bytes spilled, still
// 15-25% faster than two from 2048 rows on: flash_cuda_tune), two above (232 registers each);
// 128-key tiles up to head dim 128, 64 above so that the S accumulators (BN / 2 registers) next to
// O's (D / 2) fit. Short head-dim-64 calls take FwdWgmmaShortConfig64 (below).
template <int D, int kConsumers_ = (D == 64 ? 3 : 2), int BN = (D <= 128 ? 128 : 64), int kCtas = 1,
          int kElemBytes = 2, bool kTmaKv_ = true>
struct FwdWgmmaConfig {
  static_assert(D % 64 == 0 && D <= 256, "head-dim bucket: whole 128-byte swizzle rows");
  static_assert(kElemBytes == 2 || BN % 32 == 0, "FP8 key tiles: whole k32 steps of P V");
  static constexpr int kConsumers = kConsumers_;
  static constexpr int kProducerThreads = 128;
  static constexpr int kThreads = kProducerThreads + 128 * kConsumers;
  static constexpr int kBlockM = 64 * kConsumers;
  static constexpr int kBlockN = BN;
  static constexpr int kCtasPerSm = kCtas;
  // K / V tiles of plain dense layouts by TMA from one producer thread (fwd_kv_tma_layout; FP8: V^T
  // tiles of 128 keys, one box); false: always the producer warpgroup's cp.async copies (kept as a
  // flash_cuda_tune candidate).
  static constexpr bool kTmaKv = kTmaKv_ && (kElemBytes == 2 || BN == 128);
  // Registers: every thread starts with the launch share; the producer drops to kProducerRegs and
  // the consumers split what it gave back (setmaxnreg counts are multiples of 8, at most 256).
  static constexpr int kLaunchRegs = 65536 / (kThreads * kCtas) / 8 * 8;
  static constexpr int kProducerRegs = kCtas > 1 ? 24 : kConsumers == 2 ? 40 : 32;
  static constexpr int kConsumerRegs =
      (kLaunchRegs * kThreads - kProducerThreads * kProducerRegs) / (128 * kConsumers) / 8 * 8 > 240
          ? 240
          : (kLaunchRegs * kThreads - kProducerThreads * kProducerRegs) / (128 * kConsumers) / 8 * 8;
  // Q and K rows take whole 128-byte rows of the swizzled layout (FP8 at D = 64: half used).
  static constexpr uint32_t kRowBytes = (D * kElemBytes + 127) / 128 * 128;
  static constexpr uint32_t kQBytes = kBlockM * kRowBytes;
  static constexpr uint32_t kKBytes = kBlockN * kRowBytes;  // one K tile
  // One V tile; FP8: transposed, D rows of BN keys in whole 128-byte rows.
  static constexpr uint32_t kVBytes = kElemBytes == 2 ? kKBytes : D * ((kBlockN + 127) / 128) * 128;
  // K/V buffers each: three where they fit next to Q in an sm90 SM's 228 KB (1 KB of it reserved per
  // CTA, and the mbarriers' bytes), else two. + 1 KB to align the tiles to the swizzle period.
  static constexpr size_t kSmemLimit = 228 * 1024 / kCtas - 1024 - 128;
  static constexpr int kStages = kQBytes + 3 * (kKBytes + kVBytes) + 1024 <= kSmemLimit ? 3 : 2;
  static constexpr size_t kSmemBytes = kQBytes + kStages * (kKBytes + kVBytes) + 1024;
  static_assert(kSmemBytes <= kSmemLimit, "tiles fit the shared memory");
};

// The output's element type: the input's, bfloat16 for FP8.
template <typename T>
using FwdOut = std::conditional_t<sizeof(T) == 1, __nv_bfloat16, T>;

// Four floats as e4m3 bytes, a in the lowest.
__device__ __forceinline__ uint32_t pack4_e4m3(float a, float b, float c, float d) {
  const uint32_t lo = __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);
  const uint32_t hi = __nv_cvt_float2_to_fp8x2(make_float2(c, d), __NV_SATFINITE, __NV_E4M3);
  return lo | (hi << 16);
}

template <typename T, int D, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kCtasPerSm)
    fwd_wgmma_kernel(const FwdArgs args, const __grid_constant__ KvTmaMaps kv_maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr bool kFp8 = sizeof(T) == 1;
  using TO = FwdOut<T>;
  constexpr int kStages = Cfg::kStages;
  constexpr int kLoaders = Cfg::kProducerThreads;
  constexpr int kConsumers = Cfg::kConsumers;
  constexpr int BM = Cfg::kBlockM;
  constexpr int BN = Cfg::kBlockN;
  constexpr int kNT = BN / 8;  // 8-key column tiles of S
  constexpr int kDT = D / 8;   // 8-column tiles of O
  extern __shared__ __align__(16) uint8_t wgmma_smem[];
  const uint32_t sQ = (smem_addr(wgmma_smem) + 1023u) & ~1023u;
  const uint32_t sK = sQ + Cfg::kQBytes;            // [kStages] K tiles
  const uint32_t sV = sK + kStages * Cfg::kKBytes;  // [kStages] V tiles (FP8: transposed)
  // mbarriers: Q landed; per buffer, K / V landed (cp.async: the producer's threads arrive as their
  // copies complete; TMA: one arrival and the tile's bytes) and K / V read (one arrival per
  // consumer warp).
  __shared__ __align__(8) uint64_t barriers[1 + 4 * kStages];
  const uint32_t q_full = smem_addr(barriers);
  auto k_full = [&](int st) { return q_full + 8u * (1 + st); };
  auto v_full = [&](int st) { return q_full + 8u * (1 + kStages + st); };
  auto k_empty = [&](int st) { return q_full + 8u * (1 + 2 * kStages + st); };
  auto v_empty = [&](int st) { return q_full + 8u * (1 + 3 * kStages + st); };

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
  const int i_lo = gs.row(r0);
  const int i_hi = gs.row(min(r0 + BM, rows) - 1);
  const int offset = si.sk - si.sq;
  const BlockRange blocks = split_share(visible_key_blocks(sa, si, i_lo, i_hi, BN), split, args.num_splits);
  const int n_lo = blocks.begin, n_hi = blocks.end;
  auto stage = [&](int n) { return (n - n_lo) % kStages; };                             // buffer of tile n
  auto parity = [&](int n) { return static_cast<uint32_t>((n - n_lo) / kStages) & 1u; };  // its use count's

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int wg = warp / 4;
  const bool tma_kv = Cfg::kTmaKv && kv_maps.box_rows > 0;
  if (tid == 0) {
    mbar_init(q_full, kLoaders);
    for (int st = 0; st < kStages; ++st) {
      mbar_init(k_full(st), tma_kv ? 1 : kLoaders);
      mbar_init(v_full(st), tma_kv ? 1 : kLoaders);
      mbar_init(k_empty(st), 4 * kConsumers);
      mbar_init(v_empty(st), 4 * kConsumers);
    }
    if (tma_kv) fence_mbar_init();
  }
  __syncthreads();

  if (wg == 0) {
    // ---- producer: Q, then K(n) and V(n) for every tile, each into its buffer once the consumers
    // have released the tile that used it kStages tiles before.
    release_registers<Cfg::kProducerRegs>();
    if (n_lo >= n_hi) return;
    const T* q = static_cast<const T*>(p.q);
    const T* k = static_cast<const T*>(p.k);
    const T* v = static_cast<const T*>(p.v);
    // Tile n of K or V into its buffer: one address per tile where the rows are evenly strided.
    auto load_kv = [&](uint32_t dst, const T* base, int64_t bs, int64_t rst, int64_t hs, int n) {
      const int j0 = n * BN;
      const int64_t tile = kv_tile_offset(p, bs, rst, hs, si, b, j0, BN, hk);
      if (tile >= 0) return cp_async_rows_sw128<T, D, BN, kLoaders>(dst, base + tile, rst, si.sk - j0, p.head_dim);
      cp_async_tile_sw128<T, D, BN, kLoaders>(dst, [&](int rr) -> const T* {
        if (j0 + rr >= si.sk) return nullptr;
        return base + kv_offset(p, bs, rst, hs, si, b, j0 + rr, hk);
      }, p.head_dim, base);
    };
    cp_async_tile_sw128<T, D, BM, kLoaders>(sQ, [&](int rr) -> const T* {
      const int r = r0 + rr;
      if (r >= rows) return nullptr;
      return q + q_offset(varlen, p.q_batch_stride, p.q_row_stride, p.q_head_stride, si, b, gs.row(r), hk * group + gs.head(r));
    }, p.head_dim, q);
    cp_async_mbar_arrive(q_full);
    if (tma_kv) {
      // One thread issues every tile: a box per 128-byte column block (rows past the keys read zero);
      // FP8's V^T tile is one box of head_dim rows x 128 keys.
      constexpr int kBlocks = Cfg::kRowBytes / 128;
      constexpr int kBoxCols = 128 / static_cast<int>(sizeof(T));
      if (tid == 0) {
        for (int n = n_lo; n < n_hi; ++n) {
          const int st = stage(n);
          const bool reuse = n - n_lo >= kStages;
          if (reuse) mbar_wait(k_empty(st), parity(n) ^ 1u);
          mbar_arrive_expect_tx(k_full(st), Cfg::kKBytes);
#pragma unroll
          for (int cb = 0; cb < kBlocks; ++cb)
            tma_load_4d(sK + st * Cfg::kKBytes + cb * BN * 128, &kv_maps.k, cb * kBoxCols, n * BN, hk, si.kv_batch, k_full(st));
          if (reuse) mbar_wait(v_empty(st), parity(n) ^ 1u);
          mbar_arrive_expect_tx(v_full(st), Cfg::kVBytes);
          if constexpr (kFp8) {
            tma_load_4d(sV + st * Cfg::kVBytes, &kv_maps.v, n * BN, 0, hk, b, v_full(st));
          } else {
#pragma unroll
            for (int cb = 0; cb < kBlocks; ++cb)
              tma_load_4d(sV + st * Cfg::kVBytes + cb * BN * 128, &kv_maps.v, cb * kBoxCols, n * BN, hk, si.kv_batch, v_full(st));
          }
        }
      }
      cp_async_drain();
      return;
    }
    // FP8: V transposed, rows = head-dim columns fp8_vt_keys(p) apart (zero past head_dim), every key
    // column of a tile present (zero-padded to whole tiles).
    const int vt_keys = fp8_vt_keys(p);
    const T* vt = static_cast<const T*>(p.fp8_scratch) + (static_cast<int64_t>(b) * p.heads_kv + hk) * p.head_dim * vt_keys;
    for (int n = n_lo; n < n_hi; ++n) {
      const int st = stage(n);
      const bool reuse = n - n_lo >= kStages;
      if (reuse) mbar_wait(k_empty(st), parity(n) ^ 1u);
      load_kv(sK + st * Cfg::kKBytes, k, p.k_batch_stride, p.k_row_stride, p.k_head_stride, n);
      cp_async_mbar_arrive(k_full(st));
      if (reuse) mbar_wait(v_empty(st), parity(n) ^ 1u);
      if constexpr (kFp8) {
        cp_async_rows_sw128<T, BN, D, kLoaders>(sV + st * Cfg::kVBytes, vt + n * BN, vt_keys, p.head_dim, BN);
      } else {
        load_kv(sV + st * Cfg::kVBytes, v, p.v_batch_stride, p.v_row_stride, p.v_head_stride, n);
      }
      cp_async_mbar_arrive(v_full(st));
    }
    cp_async_drain();  // no copy outlives its thread
    return;
  }

  // ---- consumers
  claim_registers<Cfg::kConsumerRegs>();
  const int cw = wg - 1;  // consumer warpgroup: rows 64 cw .. 64 cw + 63 of the tile
  const int g = lane >> 2;
  const int tq = lane & 3;
  const int warp_row0 = cw * 64 + (warp % 4) * 16;  // first tile row of this warp
  auto packed_row = [&](int e) { return r0 + warp_row0 + g + 8 * e; };  // e = 0, 1: c0,c1 / c2,c3
  auto release = [&](uint32_t bar) {
    if (lane == 0) mbar_arrive(bar);
  };
  // Turns on the tensor cores, round robin over the consumers (named barriers 1..kConsumers, each
  // of a warpgroup waiting and the one before it arriving). The last consumer opens the first turn
  // and skips its final hand-over, so that every arrival is waited for.
  auto take_turn = [&]() { named_barrier_sync(1 + cw, 256); };
  auto pass_turn = [&](bool final_turn) {
    if (!(final_turn && cw == kConsumers - 1)) named_barrier_arrive(1 + (cw + 1) % kConsumers, 256);
  };

  float o[D / 2];  // this warpgroup's 64 x D accumulators: o[4t + c] (wgmma_ops.cuh)
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
  float m[2] = {neg_inf(), neg_inf()};  // running row max (log2 domain)
  float l[2] = {0.f, 0.f};              // this thread's share of the row sums
  float corr[2];                        // O's rescale for the tile whose softmax ran last
  bool moved = false;                   // whether a row max of the warp moved in that tile
  // FP8: the descales of this (batch, KV head); P's exponent offset (log2 of 256).
  const int64_t descale_at = static_cast<int64_t>(b) * p.heads_kv + hk;
  const float qk_descale = kFp8 ? (p.q_descale != nullptr ? p.q_descale[descale_at] : 1.f) *
                                      (p.k_descale != nullptr ? p.k_descale[descale_at] : 1.f)
                                : 1.f;
  const float v_descale = kFp8 && p.v_descale != nullptr ? p.v_descale[descale_at] : 1.f;
  constexpr float kPOffset = kFp8 ? 8.f : 0.f;
  constexpr float kPUnit = kFp8 ? 1.f / 256.f : 1.f;  // 2^-kPOffset: true P over computed P (and O)
  const float scale_log2 = p.softmax_scale * qk_descale * kLog2e;
  const uint32_t sQ_wg = sQ + cw * 64 * 128;  // this warpgroup's 64 rows in every column block

  constexpr int kKSteps = BN * static_cast<int>(sizeof(T)) / 32;  // K-steps of O += P V
  float s[BN / 2];              // S of one tile, then its probabilities P (fp32)
  uint32_t pa[kKSteps][4];      // P as the A operand of O += P V
  // S = Q K^T of tile n.
  auto issue_s = [&](int n) {
    const uint32_t cK = sK + stage(n) * Cfg::kKBytes;
    wgmma_fence();
    wgmma_ss_k_major<T, BN, D>(s, sQ_wg, BM, cK, BN);
    wgmma_commit();
  };
  // O += P V of tile n. 16-bit: K-step kk starts 16 rows (2048 bytes) into the V tile, whose column
  // blocks are BN rows apart. FP8 (V transposed, K-major): 32 bytes into the rows of block kk / 4.
  auto issue_pv = [&](int n) {
    const uint32_t cV = sV + stage(n) * Cfg::kVBytes;
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) pin_registers(pa[kk]);
    pin_registers(o);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      const uint64_t desc = kFp8 ? sw128_desc(cV + (kk / 4) * D * 128 + (kk % 4) * 32, 16)
                                 : sw128_desc(cV + kk * 16 * 128, BN * 128);
      WgmmaRs<T, D>::rs(o, pa[kk], desc);
    }
    wgmma_commit();
  };
  // Waits until the producer's copies into a buffer have landed; cp.async wrote them through the
  // generic proxy, wgmma reads through the async proxy.
  auto wait_full = [&](uint32_t bar, int n) {
    mbar_wait(bar, parity(n));
    fence_proxy_async();
  };
  // Masks tile n's S, updates the running max and sum and leaves P (fp32) in s; O's rescale is
  // left to the caller (corr, moved), which applies it once the previous O += P V has completed.
  auto softmax = [&](int n) {
    const int j0 = n * BN;
    // The tile needs the mask unless every row of the CTA sees every key of it.
    const bool need_mask = tile_needs_mask(sa, si.sk, offset, j0, BN, i_lo, i_hi);
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
      m_use[e] = m_new == neg_inf() ? 0.f : m_new - kPOffset;  // no key seen yet: avoid inf - inf
      corr[e] = m_new == m[e] ? 1.f : fast_exp2(m[e] - kPOffset - m_use[e]);
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
  // Rescales O (when a row max moved) and converts P to the A operand. 16-bit: the S accumulators
  // of column tiles 2kk, 2kk+1 are the A fragment of keys 16kk..16kk+15. FP8: those of column
  // tiles 4kk..4kk+3, words in the order of V's permuted key columns (top of this file).
  auto rescale_and_pack = [&]() {
    if (__any_sync(0xFFFFFFFFu, moved)) {
#pragma unroll
      for (int i = 0; i < D / 2; ++i) o[i] *= corr[(i >> 1) & 1];
    }
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      if constexpr (kFp8) {
        const float* x = s + 16 * kk;
        pa[kk][0] = pack4_e4m3(x[0], x[1], x[4], x[5]);
        pa[kk][1] = pack4_e4m3(x[2], x[3], x[6], x[7]);
        pa[kk][2] = pack4_e4m3(x[8], x[9], x[12], x[13]);
        pa[kk][3] = pack4_e4m3(x[10], x[11], x[14], x[15]);
      } else {
        pa[kk][0] = pack2<T>(s[8 * kk + 0], s[8 * kk + 1]);
        pa[kk][1] = pack2<T>(s[8 * kk + 2], s[8 * kk + 3]);
        pa[kk][2] = pack2<T>(s[8 * kk + 4], s[8 * kk + 5]);
        pa[kk][3] = pack2<T>(s[8 * kk + 6], s[8 * kk + 7]);
      }
    }
  };

  // Pipeline (after FlashAttention-3's intra-warpgroup overlap): iteration n issues S of tile n+1
  // and O += P V of tile n back to back in one turn, runs tile n+1's softmax while the second product
  // is in flight (and the other consumers' products follow on the tensor cores), then rescales O.
  // K(n+1) goes back to the producer once S(n+1) is done, V(n) once P V(n) is.
  if (n_lo < n_hi) {
    if (cw == kConsumers - 1) named_barrier_arrive(1, 256);  // the first consumer's first turn
    mbar_wait(q_full, 0);
    wait_full(k_full(stage(n_lo)), n_lo);
    take_turn();
    issue_s(n_lo);
    pass_turn(false);
    wgmma_wait<0>();
    release(k_empty(stage(n_lo)));
    pin_registers(s);
    softmax(n_lo);
    rescale_and_pack();
  }
  // No branch between a wgmma and its wait: ptxas serializes the products it cannot follow (C7514),
  // so the last tile's product is peeled off the loop.
  for (int n = n_lo; n + 1 < n_hi; ++n) {
    wait_full(k_full(stage(n + 1)), n + 1);
    wait_full(v_full(stage(n)), n);
    take_turn();
    issue_s(n + 1);
    issue_pv(n);
    pass_turn(false);
    wgmma_wait<1>();  // S(n+1) done; P V of tile n may still run
    release(k_empty(stage(n + 1)));
    pin_registers(s);
    softmax(n + 1);
    wgmma_wait<0>();
    release(v_empty(stage(n)));
    pin_registers(o);
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) pin_registers(pa[kk]);  // P of tile n stays put until its product is done
    rescale_and_pack();
  }
  if (n_lo < n_hi) {
    wait_full(v_full(stage(n_hi - 1)), n_hi - 1);
    take_turn();
    issue_pv(n_hi - 1);
    pass_turn(true);
    wgmma_wait<0>();
    pin_registers(o);
  }

  // True row sums (m holds the true row max); O still carries 2^kPOffset, undone with v_descale.
#pragma unroll
  for (int e = 0; e < 2; ++e) l[e] = quad_sum(l[e]) * kPUnit;
  const float o_unit = v_descale * kPUnit;

  // Epilogue (as the sm80-class kernel's): natural-log lse, the sink, split partials.
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int r = packed_row(e);
    if (r >= rows) continue;
    const int i = gs.row(r);
    const int h = hk * group + gs.head(r);
    if (args.num_splits > 1) {
      const int64_t ar = ((static_cast<int64_t>(split) * p.batch + b) * p.heads_q + h) * p.seqlen_q + i;
      const float inv = l[e] > 0.f ? o_unit / l[e] : 0.f;
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
      out_scale = o_unit * exp2f(m[e] - mx) / total;
      lse = (mx + log2f(total)) * kLn2;
    } else {
      out_scale = o_unit / l[e];
      lse = (m[e] + log2f(l[e])) * kLn2;
    }
    TO* out = static_cast<TO*>(p.out) + q_offset(varlen, p.o_batch_stride, p.o_row_stride, p.o_head_stride, si, b, i, h);
#pragma unroll
    for (int t = 0; t < kDT; ++t) {
      const int d = t * 8 + tq * 2;
      if (d < p.head_dim) {
        *reinterpret_cast<uint32_t*>(out + d) = pack2<TO>(o[4 * t + 2 * e] * out_scale, o[4 * t + 2 * e + 1] * out_scale);
      }
    }
    if (tq == 0 && p.softmax_lse != nullptr) p.softmax_lse[lse_offset(p, si, b, i, h)] = lse;
  }
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

// Whether K / V tiles can come by TMA: every row of a tile below seqlen_k is a key or the tile's
// zero fill, as the masks and P V need (not so with varlen, paged or left-padded keys, or
// seqused_k, whose rows past the keys may hold anything), and the head dim fills its bucket in
// whole 128-byte boxes.
inline bool fwd_kv_tma_layout(const FlashFwdParams& p, int bucket, int elem_bytes) {
  return p.block_table == nullptr && p.cu_seqlens_k == nullptr && p.seqused_k == nullptr && p.leftpad_k == nullptr &&
         p.head_dim == bucket && p.head_dim * elem_bytes % 128 == 0;
}
// The maps of K and V (FP8: K and the transposed V in fp8_scratch, (batch, heads_kv, head_dim,
// fp8_vt_keys), a box of head_dim rows x 128 keys); box_rows 0 (the cp.async copies) where the
// call does not qualify or the maps cannot be made.
template <typename T, typename Cfg>
KvTmaMaps fwd_kv_tma_maps(const FlashFwdParams& p, int bucket) {
  KvTmaMaps maps{};
  if (!Cfg::kTmaKv || !fwd_kv_tma_layout(p, bucket, sizeof(T))) return maps;
  bool ok = encode_kv_tma_maps<T>(p, Cfg::kBlockN, maps, /*with_v=*/sizeof(T) == 2);
  if (ok && sizeof(T) == 1) {
    const int64_t keys = fp8_vt_keys(p);
    const cuuint64_t dims[4] = {static_cast<cuuint64_t>(keys), static_cast<cuuint64_t>(p.head_dim),
                                static_cast<cuuint64_t>(p.heads_kv), static_cast<cuuint64_t>(p.batch)};
    const int64_t strides[3] = {keys, p.head_dim * keys, p.heads_kv * p.head_dim * keys};
    ok = encode_tma_4d<T>(maps.v, p.fp8_scratch, dims, strides, p.head_dim);
  }
  if (!ok) maps.box_rows = 0;
  return maps;
}

template <typename T, int D, typename Cfg>
void launch_fwd_wgmma_config(const FwdArgs& args, cudaStream_t stream) {
  auto kernel = fwd_wgmma_kernel<T, D, Cfg>;
  set_smem(kernel, Cfg::kSmemBytes, "cudaFuncSetAttribute(fwd_wgmma_kernel)");
  const FlashFwdParams& p = args.p;
  const KvTmaMaps kv_maps = fwd_kv_tma_maps<T, Cfg>(p, D);
  const dim3 grid(ceil_div(p.seqlen_q * args.s.group, Cfg::kBlockM), p.heads_kv * args.num_splits, p.batch);
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(args, kv_maps);
  check_launch("fwd_wgmma_kernel launch");
}

// Head dim 64 has a second tile shape for short calls, where the three-consumer CTAs are too few
// or too unevenly loaded: two CTAs per SM of two consumers x 64-key tiles (measured in
// flash_cuda_tune's candidate section, kernel alone: at 512-1024 rows 250-298 against 222-295
// TFLOP/s, causal 133-197 against 90-141; from 2048 rows (4096 causal) on the three consumers win).
// (16-bit only: FP8 calls take the default shape.)
template <typename T, int D>
bool fwd_wgmma_short_tiles(const FwdArgs& args) {
  const int rows = args.p.seqlen_q * args.s.group;
  return D == 64 && sizeof(T) == 2 && (rows <= 1024 || (args.s.window_right >= 0 && rows <= 2048));
}
using FwdWgmmaShortConfig64 = FwdWgmmaConfig<64, 2, 64, 2>;
// The default shape of a head-dim bucket for element type T (16-bit or FP8).
// FP8 at D = 256 takes 128-key tiles (116 bytes of spill, still 4-8% faster than 64 keys:
// flash_cuda_tune's fp8 section). 16-bit D = 256 takes 80-key tiles (no spill, 3-5% faster than
// 64 at 2k-16k; 176 keys at D = 128 measured even at 16k and -12% at 2k: notes v12).
template <int D, int kElemBytes>
constexpr int fwd_wgmma_default_block_n() {
  if (D <= 128 || kElemBytes == 1) return 128;
  return D == 256 ? 80 : 64;
}
template <typename T, int D>
using FwdWgmmaDefaultConfig =
    FwdWgmmaConfig<D, (D == 64 ? 3 : 2), fwd_wgmma_default_block_n<D, sizeof(T)>(), 1, sizeof(T)>;

// Explicitly instantiated once per head-dim bucket (instantiations/flash_fwd_wgmma_hdim*.cu).
template <typename T, int D>
void launch_fwd_wgmma(const FwdArgs& args, cudaStream_t stream) {
  if constexpr (D == 64 && sizeof(T) == 2) {
    if (fwd_wgmma_short_tiles<T, D>(args)) return launch_fwd_wgmma_config<T, D, FwdWgmmaShortConfig64>(args, stream);
  }
  launch_fwd_wgmma_config<T, D, FwdWgmmaDefaultConfig<T, D>>(args, stream);
}

// CTAs of one split of a call and CTAs per SM (for the split heuristic).
template <typename T, int D>
FwdOccupancy fwd_wgmma_occupancy(const FwdArgs& args) {
  using Cfg = FwdWgmmaDefaultConfig<T, D>;
  const bool short_tiles = fwd_wgmma_short_tiles<T, D>(args);
  const int block_m = short_tiles ? FwdWgmmaShortConfig64::kBlockM : Cfg::kBlockM;
  const int ctas_per_sm = short_tiles ? FwdWgmmaShortConfig64::kCtasPerSm : Cfg::kCtasPerSm;
  const FlashFwdParams& p = args.p;
  return {static_cast<int64_t>(ceil_div(p.seqlen_q * args.s.group, block_m)) * p.heads_kv * p.batch, ctas_per_sm};
}

}  // namespace detail
}  // namespace cuda
}  // namespace flash
