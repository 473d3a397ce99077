// Hopper decode (sm90a): forward calls of at most 16 packed query rows (seqlen_q x group <= 16, as in
// decode), which are bound by reading K and V. One CTA per (KV head, batch[, split]) of 16 packed
// rows. One thread of the last warp is the producer: it loads each K / V tile with TMA tensor copies
// (cp.async.bulk.tensor: one instruction moves a 64-column block of up to a page of key rows, the
// 128-byte swizzle applied on the way) into a ring of shared-memory buffers, each completing on an
// mbarrier that counts its bytes. Four consumer warps each take a quarter of every tile's keys for
// all 16 rows (mma.sync, as the key-warps kernel of flash_fwd_mma.cuh), release the buffer with one
// mbarrier arrival per warp, and merge their partial softmax states at the end (merge_key_warps).
//
// K and V are described to the copy engine as 4-d tensors (head_dim, rows, heads_kv, units): a unit
// is a page (paged KV) or a cache batch row. A tile of BN keys is BN / box_rows boxes per 64-column
// block (KvTmaMaps), a box never crossing a page; rows past a cache row's end read zero.
//
// Calls it takes (hopper_decode_supported, flash_fwd.cu): 16-bit, head dims above 64, at most 16
// packed rows, no softcap, ALiBi or dropout, softmax_scale > 0, K / V addresses and strides
// multiples of 16 bytes, and paged KV only with pages of 16 keys or more that divide or are divided
// by the tile, without leftpad_k, and varlen keys only through pages. Everything else of
// FlashFwdParams is covered (causal, window, GQA, varlen queries, seqused, leftpad unpaged,
// cache_batch_idx, sinks, split-KV).
#pragma once

#include <algorithm>
#include <type_traits>

#include "cuda/flash_fwd_mma.cuh"
#include "cuda/hopper/tma.cuh"
#include "cuda/hopper/wgmma_tiles.cuh"

namespace flash {
namespace cuda {
namespace detail {

// Tile shape of head-dim bucket D (a multiple of 64): BN keys per tile (BN / 4 per consumer warp),
// kStages K / V buffers, kCtas CTAs per SM. Tiles are column blocks of BN rows x 128 bytes in the
// 128-byte swizzle (sw128_offset), Q a padded row-major tile (mma_pitch).
template <int D, int BN = 64, int kStages_ = 3, int kCtas = (D <= 128 ? 2 : 1)>
struct DecodeTmaConfig {
  static constexpr int kConsumerWarps = 4;
  static constexpr int kThreads = 32 * (kConsumerWarps + 1);
  static constexpr int kBlockM = 16;  // packed rows
  static constexpr int kBlockN = BN;
  static constexpr int kWarpKeys = BN / kConsumerWarps;
  static constexpr int kStages = kStages_;
  static constexpr int kCtasPerSm = kCtas;
  static constexpr int kQPitch = mma_pitch(D);
  static constexpr uint32_t kTileBytes = BN * D * 2;  // one K or V tile
  static constexpr uint32_t kQBytes = (kBlockM * kQPitch * 2 + 1023) / 1024 * 1024;
  // + 1 KB to align the tiles to the swizzle period.
  static constexpr size_t kSmemBytes = kQBytes + 2 * kStages * kTileBytes + 1024;
  static_assert(D % 64 == 0 && kWarpKeys % 16 == 0, "whole column blocks, 16-key steps per consumer warp");
  static_assert(kSmemBytes * kCtas <= 227 * 1024, "the tiles of kCtas CTAs fit an SM's shared memory");
  static_assert(sizeof(float) * kConsumerWarps * 16 * (D + 10) <= 2 * kStages * kTileBytes, "the merge reuses the tiles");
};

template <typename T, int D, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kCtasPerSm)
    fwd_decode_tma_kernel(const FwdArgs args, const __grid_constant__ KvTmaMaps maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int BM = Cfg::kBlockM;
  constexpr int BN = Cfg::kBlockN;
  constexpr int kStages = Cfg::kStages;
  constexpr int kQPitch = Cfg::kQPitch;
  constexpr int kWarps = Cfg::kConsumerWarps;
  constexpr int kNT = Cfg::kWarpKeys / 8;  // 8-key column tiles of S per consumer warp
  constexpr int kDT = D / 8;               // 8-column tiles of O
  constexpr int kBlocks = D / 64;          // 128-byte column blocks of a tile
  extern __shared__ __align__(16) uint8_t decode_smem[];
  const uint32_t smem0 = smem_addr(decode_smem);
  const uint32_t sQ = (smem0 + 1023u) & ~1023u;
  const uint32_t sK = sQ + Cfg::kQBytes;              // [kStages] K tiles
  const uint32_t sV = sK + kStages * Cfg::kTileBytes;  // [kStages] V tiles
  T* const sQ_ptr = reinterpret_cast<T*>(decode_smem + (sQ - smem0));
  // Per buffer: K and V landed (the producer's arrival and the copies' bytes) and read (one
  // arrival per consumer warp).
  __shared__ __align__(8) uint64_t barriers[2 * kStages];
  auto full = [&](int st) { return smem_addr(barriers + st); };
  auto empty = [&](int st) { return smem_addr(barriers + kStages + st); };

  const FlashFwdParams& p = args.p;
  const ScoreArgs& sa = args.s;
  const int b = blockIdx.z;
  const int hk = blockIdx.y / args.num_splits;
  const int split = blockIdx.y % args.num_splits;
  const SeqInfo si = seq_info(p, b);
  const int group = sa.group;
  const GroupSplit gs(group);
  const int rows = si.sq * group;
  const int r0 = blockIdx.x * BM;
  if (r0 >= rows) return;

  const int i_lo = gs.row(r0);
  const int i_hi = gs.row(min(r0 + BM, rows) - 1);
  const BlockRange blocks = split_share(visible_key_blocks(sa, si, i_lo, i_hi, BN), split, args.num_splits);
  const int n_lo = blocks.begin, n_hi = blocks.end;
  auto stage = [&](int n) { return (n - n_lo) % kStages; };
  auto parity = [&](int n) { return static_cast<uint32_t>((n - n_lo) / kStages) & 1u; };

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  if (tid == 0) {
    for (int st = 0; st < kStages; ++st) {
      mbar_init(full(st), 1);
      mbar_init(empty(st), kWarps);
    }
    fence_mbar_init();
  }
  // Q's 16 rows, zero past the call's rows and head_dim.
  const bool varlen = p.cu_seqlens_q != nullptr;
  const T* q = static_cast<const T*>(p.q);
  for (int x = tid; x < BM * kDT; x += Cfg::kThreads) {
    const int rr = x / kDT, c = x % kDT;
    const int r = r0 + rr;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (r < rows && c * 8 < p.head_dim) {
      const int64_t at = q_offset(varlen, p.q_batch_stride, p.q_row_stride, p.q_head_stride, si, b, gs.row(r),
                                  hk * group + gs.head(r));
      val = *reinterpret_cast<const uint4*>(q + at + c * 8);
    }
    *reinterpret_cast<uint4*>(sQ_ptr + rr * kQPitch + c * 8) = val;
  }
  __syncthreads();

  if (warp == kWarps) {
    // ---- producer (one thread): K(n) and V(n) of every tile into buffer n % kStages, once the
    // consumers have released the tile that used it kStages tiles before. Boxes that start at or
    // past the last key are skipped (their block-table entries may not exist); their rows are
    // masked, and V's are zeroed by the consumers.
    if (lane != 0) return;
    const int box_rows = maps.box_rows;
    const uint32_t box_bytes = box_rows * 128;
    for (int n = n_lo; n < n_hi; ++n) {
      const int st = stage(n);
      if (n - n_lo >= kStages) mbar_wait(empty(st), parity(n) ^ 1u);
      const int j0 = n * BN;
      const int boxes = min(BN / box_rows, ceil_div(si.sk - j0, box_rows));
      mbar_arrive_expect_tx(full(st), 2u * kBlocks * boxes * box_bytes);
      for (int bx = 0; bx < boxes; ++bx) {
        // The box's first key: its row in its unit (page or cache row), and the unit.
        const int pos = j0 + bx * box_rows + si.k_first;
        int row = pos, unit = si.kv_batch;
        if (p.block_table != nullptr) {
          row = pos % p.page_size;
          unit = p.block_table[b * p.block_table_batch_stride + pos / p.page_size];
        }
        const uint32_t at = bx * box_bytes;
#pragma unroll
        for (int cb = 0; cb < kBlocks; ++cb) {
          tma_load_4d(sK + st * Cfg::kTileBytes + cb * BN * 128 + at, &maps.k, cb * 64, row, hk, unit, full(st));
          tma_load_4d(sV + st * Cfg::kTileBytes + cb * BN * 128 + at, &maps.v, cb * 64, row, hk, unit, full(st));
        }
      }
    }
    return;
  }

  // ---- consumers: warp w computes keys kw .. kw + BN / 4 - 1 of every tile for all 16 rows.
  const int g = lane >> 2;
  const int tq = lane & 3;
  const int mi = lane >> 3;  // which of the four ldmatrix matrices this lane addresses
  const int rr = lane & 7;
  const int kw = warp * Cfg::kWarpKeys;
  const int offset = si.sk - si.sq;
  auto packed_row = [&](int e) { return r0 + g + 8 * e; };
  uint32_t qa[D / 16][4];  // Q as the A operand, every K-step
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    ldmatrix_x4(qa[kk], sQ_ptr + (rr + (mi & 1) * 8) * kQPitch + kk * 16 + (mi >> 1) * 8);
  }
  float o[1][kDT][4];
#pragma unroll
  for (int t = 0; t < kDT; ++t) o[0][t][0] = o[0][t][1] = o[0][t][2] = o[0][t][3] = 0.f;
  float m[2] = {neg_inf(), neg_inf()};  // running max (log2 domain)
  float l[2] = {0.f, 0.f};              // this thread's share of the row sums
  const float scale_log2 = p.softmax_scale * kLog2e;
  // Address of the 16-byte chunk `chunk` (8 elements) of key row `row` in a swizzled tile.
  auto tile_at = [&](uint32_t tile, int row, int chunk) {
    return decode_smem + (tile - smem0) + sw128_offset(row, chunk, BN);
  };

  for (int n = n_lo; n < n_hi; ++n) {
    const int st = stage(n);
    mbar_wait(full(st), parity(n));
    const uint32_t cK = sK + st * Cfg::kTileBytes;
    const uint32_t cV = sV + st * Cfg::kTileBytes;
    const int j0 = n * BN;
    // V rows past the last key zero: their probabilities are 0, but 0 x NaN (a cache slot never
    // written, or not loaded) would be NaN. Only this warp reads its rows.
    if (j0 + kw + Cfg::kWarpKeys > si.sk) {
      for (int x = lane; x < Cfg::kWarpKeys * kDT; x += 32) {
        const int row = kw + x / kDT;
        if (j0 + row >= si.sk) *reinterpret_cast<uint4*>(tile_at(cV, row, x % kDT)) = make_uint4(0u, 0u, 0u, 0u);
      }
      fence_proxy_async();  // (generic writes to a buffer the copy engine fills again)
      __syncwarp();
    }

    float s[1][kNT][4];  // this warp's scores of the tile, then P
#pragma unroll
    for (int t = 0; t < kNT; ++t) s[0][t][0] = s[0][t][1] = s[0][t][2] = s[0][t][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int t2 = 0; t2 < kNT / 2; ++t2) {
        uint32_t bk[4];
        ldmatrix_x4(bk, tile_at(cK, kw + t2 * 16 + rr + (mi >> 1) * 8, 2 * kk + (mi & 1)));
        mma_16816<T>(s[0][2 * t2], qa[kk], bk[0], bk[1]);
        mma_16816<T>(s[0][2 * t2 + 1], qa[kk], bk[2], bk[3]);
      }
    }
    // Masked scores -inf where some row of the CTA may not see some key of the tile.
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
            const int j = j0 + kw + t * 8 + tq * 2 + (c & 1);
            if (!(r < rows && visible(sa, i, j, si.sq, si.sk))) s[0][t][c] = neg_inf();
          }
      }
    }
    float corr[2];
    const bool moved = online_softmax<1, kNT>(s, m, l, corr, scale_log2);
    if (__any_sync(0xFFFFFFFFu, moved)) {
#pragma unroll
      for (int t = 0; t < kDT; ++t) {
        o[0][t][0] *= corr[0];
        o[0][t][1] *= corr[0];
        o[0][t][2] *= corr[1];
        o[0][t][3] *= corr[1];
      }
    }
    // O += P V: the S accumulators of column tiles 2kk, 2kk+1 are the A fragment of keys kk*16..+15.
#pragma unroll
    for (int kk = 0; kk < kNT / 2; ++kk) {
      const float(&x)[4] = s[0][2 * kk];
      const float(&y)[4] = s[0][2 * kk + 1];
      const uint32_t a[4] = {pack2<T>(x[0], x[1]), pack2<T>(x[2], x[3]), pack2<T>(y[0], y[1]), pack2<T>(y[2], y[3])};
#pragma unroll
      for (int t2 = 0; t2 < kDT / 2; ++t2) {
        uint32_t bv[4];
        ldmatrix_x4_trans(bv, tile_at(cV, kw + kk * 16 + rr + (mi & 1) * 8, 2 * t2 + (mi >> 1)));
        mma_16816<T>(o[0][2 * t2], a, bv[0], bv[1]);
        mma_16816<T>(o[0][2 * t2 + 1], a, bv[2], bv[3]);
      }
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(empty(st));
  }

#pragma unroll
  for (int e = 0; e < 2; ++e) l[e] = quad_sum(l[e]);
  // Every consumer warp done with the tiles (and so every copy landed): the merge reuses them.
  auto consumers_sync = [] { named_barrier_sync(1, 32 * kWarps); };
  consumers_sync();
  if (!merge_key_warps<kWarps, D>(reinterpret_cast<float*>(decode_smem + (sK - smem0)), warp, m, l, o[0],
                                  consumers_sync)) {
    return;
  }
  store_fwd_rows<T, 1, kDT>(args, si, b, hk, split, rows, packed_row, m, l, o);
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

// Launches the kernel; false (nothing launched) where the tensor maps could not be made.
template <typename T, int D, typename Cfg>
bool launch_fwd_decode_tma_config(const FwdArgs& args, cudaStream_t stream) {
  KvTmaMaps maps;
  if (!encode_kv_tma_maps<T>(args.p, Cfg::kBlockN, maps)) return false;
  auto kernel = fwd_decode_tma_kernel<T, D, Cfg>;
  set_smem(kernel, Cfg::kSmemBytes, "cudaFuncSetAttribute(fwd_decode_tma_kernel)");
  const FlashFwdParams& p = args.p;
  const dim3 grid(ceil_div(p.seqlen_q * args.s.group, Cfg::kBlockM), p.heads_kv * args.num_splits, p.batch);
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(args, maps);
  check_launch("fwd_decode_tma_kernel launch");
  return true;
}

// Explicitly instantiated for head-dim buckets 128, 192 and 256 (instantiations/
// flash_fwd_wgmma_hdim*.cu).
template <typename T, int D>
bool launch_fwd_decode_tma(const FwdArgs& args, cudaStream_t stream) {
  return launch_fwd_decode_tma_config<T, D, DecodeTmaConfig<D>>(args, stream);
}
template <typename T, int D>
FwdOccupancy fwd_decode_tma_occupancy(const FwdArgs& args) {
  using Cfg = DecodeTmaConfig<D>;
  const FlashFwdParams& p = args.p;
  return {static_cast<int64_t>(ceil_div(p.seqlen_q * args.s.group, Cfg::kBlockM)) * p.heads_kv * p.batch, Cfg::kCtasPerSm};
}

}  // namespace detail
}  // namespace cuda
}  // namespace flash
