// Hopper backward (sm90a, warpgroup MMA): FlashAttention-2's fused backward on wgmma. One CTA of
// two warpgroups per (key block, KV head, batch); K and V stay in shared memory while the CTA walks
// the packed query rows that see its keys, BM per step, through a ring of Q / dO / lse / Di buffers.
// Q and dO of dense (not varlen) layouts come by TMA from one thread (tma.cuh), lse / Di and every
// other layout by cp.async; with TMA each buffer completes on an mbarrier, and at head dim 64 the
// steps overlap (no CTA barrier at a step's start: BwdWgmmaConfig::kOverlap). The warpgroups share
// the dK / dV accumulators (KvSplit) by keys at head dims 64 and 128 (128 keys per CTA, 64 per
// warpgroup) and by head-dim columns at 256 (64 keys per CTA, 128 columns per warpgroup: 64 keys x
// 256 columns of both would not fit one warpgroup's registers). Per step and warpgroup:
//   S^T = K Q^T, dP^T = V dO^T       wgmma, both operands from shared memory (K-major), two
//                                    groups: P^T's exponentials run while dP^T is in flight
//                                    (at head dim 256, half the step's query rows each)
//   P^T = 2^(S^T scale log2e - lse log2e), dS^T = P^T (dP^T - Di) scale   in registers
//   dV += P^T dO, dK += dS^T Q       wgmma, A = P^T / dS^T from registers (kRsDkv: head dims 64
//                                    and 128), issued as each is ready, so that they run under
//                                    dS^T's arithmetic and the CTA barrier; at 256 from shared
//                                    memory after dQ, K-major; dO / Q MN-major
//   dS^T -> shared memory, CTA barrier (dQ reads both warpgroups' keys)
//   dQ  = dS K                       wgmma, dS^T and K MN-major, one block per warpgroup (DqSplit)
//                                    into the float32 workspace (DqBlocked): 64 x 64 through
//                                    shared memory and one bulk reduction per warp, or (head dim
//                                    256, no shared memory left for it) 64 x 128 by 8-byte
//                                    atomics; dq_convert_blocked_kernel then writes dq
//
// Calls it takes (hopper_bwd_supported, flash_bwd.cu): head dims 33..256 (run at 64, 128 or 256,
// the columns past head_dim zero), not deterministic, no dropout, softcap or ALiBi, softmax_scale
// > 0; causal, window, GQA/MQA, varlen, seqused/leftpad and sinks (dsinks comes from dsinks_kernel)
// are covered. Everything else runs on the sm80-class kernels (flash_bwd_mma.cuh).
#pragma once

#include "cuda/flash_bwd_mma.cuh"
#include "cuda/hopper/tma.cuh"
#include "cuda/hopper/wgmma_tiles.cuh"

namespace flash {
namespace cuda {
namespace detail {

// How the warpgroups share dK / dV: kKeys, warpgroup w owns keys 64w.. over all D columns; kCols,
// every key of the CTA (64) over columns (D / warpgroups) w.., each warpgroup then computing S^T
// and dP^T for its share of the step's query rows.
enum class KvSplit { kKeys, kCols };
// How they share dQ = dS K of a step, each computing a 64-row block over every key of the CTA:
// kCols, warpgroup w takes columns (D / warpgroups) w.. (BM = 64); kRows, query rows 64w.. (D = 64,
// BM = 64 x warpgroups). (Each warpgroup taking all of dQ over its own keys, with twice the
// atomics, measured 5-8% slower at D = 64.)
enum class DqSplit { kCols, kRows };

template <int D, int BM_ = (D == 64 ? 128 : 64), int kWarpgroups_ = 2, bool kTmaQdo_ = true, bool kOverlap_ = (D == 64),
          bool kRsDkv_ = true>
struct BwdWgmmaConfig {
  static constexpr int kWarpgroups = kWarpgroups_;
  // Q / dO tiles by TMA where the layout allows (bwd_qdo_tma_maps); false: always cp.async from
  // every thread (kept as a flash_cuda_tune candidate).
  static constexpr bool kTmaQdo = kTmaQdo_;
  static constexpr int kThreads = 128 * kWarpgroups;
  static constexpr KvSplit kKvSplit = D > 128 ? KvSplit::kCols : KvSplit::kKeys;
  static constexpr bool kSplitKeys = kKvSplit == KvSplit::kKeys;
  static constexpr int kBlockN = kSplitKeys ? 64 * kWarpgroups : 64;  // keys per CTA
  static constexpr int kBlockM = BM_;                                 // packed query rows per step
  static constexpr int kKvCols = kSplitKeys ? D : D / kWarpgroups;    // dK / dV columns per warpgroup
  static constexpr int kSRows = kSplitKeys ? BM_ : BM_ / kWarpgroups;  // query rows of S^T / dP^T per warpgroup
  static constexpr DqSplit kDqSplit = D == 64 ? DqSplit::kRows : DqSplit::kCols;
  static constexpr int kDqCols = kDqSplit == DqSplit::kCols ? D / kWarpgroups : D;
  static_assert(kDqSplit == DqSplit::kCols ? BM_ == 64 && kDqCols % 64 == 0 : BM_ == 64 * kWarpgroups,
                "dQ splits into one 64-row block of whole 64-column blocks per warpgroup");
  static_assert(kKvCols % 64 == 0 && kSRows % 16 == 0, "warpgroup shares of whole wgmma tiles");
  // dQ reaches the workspace through shared memory and bulk reductions where a 64 x 64 block per
  // warpgroup fits beside the tiles, else by atomics from registers.
  static constexpr bool kDqAtomics = kDqCols > 64;
  // dV += P^T dO and dK += dS^T Q with A from registers (the warpgroup's own S^T / dP^T
  // accumulators packed to 16 bits) where a warpgroup owns whole key rows (kKeys): P^T never goes
  // to shared memory, and both products are issued before the step's CTA barrier, so they run while
  // it waits. Under kCols a warpgroup holds half of P^T's query rows: both come from shared memory.
  static constexpr bool kRsDkv = kRsDkv_ && kSplitKeys;
  static constexpr int kDsTiles = kRsDkv ? 1 : 2;                  // dS^T (and P^T) per buffer
  static constexpr uint32_t kKVBytes = kBlockN * D * 2;            // the K or the V tile
  static constexpr uint32_t kQBytes = kBlockM * D * 2;             // one Q or dO tile
  static constexpr uint32_t kDsBytes = kBlockN * kBlockM * 2;      // P^T or dS^T, rows = keys
  static constexpr uint32_t kStageBytes = 2 * kQBytes + 2 * kBlockM * 4;  // Q, dO, lse, Di
  static constexpr uint32_t kDqBytes = kDqAtomics ? 0 : kWarpgroups * 64 * 64 * 4;  // float32 dQ blocks
  static constexpr size_t kSmemLimit = 227 * 1024;
  // Overlapped steps (with TMA, where two stages and two dS^T (and P^T) buffers fit): no CTA
  // barrier at a step's start, so one warpgroup's S^T / dP^T and exponentials of step m + 1 run
  // while the other's dQ / dV / dK of step m do; the last warp done with a stage refills it.
  // Default at head dim 64 (+1-4% over the step barrier with kRsDkv); at 128, where it gained 3-6%
  // before kRsDkv, the step barrier with three stages now measures 1-2% faster; at 256, 25-30%
  // slower (notes v13, v14). Three steps in flight where they fit an sm90 SM's 227 KB, else two;
  // + 1 KB to align the tiles.
  static constexpr bool kOverlap =
      kOverlap_ && kTmaQdo && 2 * kKVBytes + 2 * kDsTiles * kDsBytes + kDqBytes + 1024 + 2 * kStageBytes <= kSmemLimit;
  static constexpr int kDsBuffers = kOverlap ? 2 : 1;
  static constexpr size_t kFixedBytes = 2 * kKVBytes + kDsBuffers * kDsTiles * kDsBytes + kDqBytes + 1024;
  static constexpr int kStages = kFixedBytes + 3 * kStageBytes <= kSmemLimit ? 3 : 2;
  static constexpr size_t kSmemBytes = kFixedBytes + kStages * kStageBytes;
  static_assert(kSmemBytes <= kSmemLimit, "tiles fit the shared memory");
};

// The Hopper backward's float32 dQ accumulator (in the workspace, after Di): (KV head, 64-column
// block, packed row, 64 columns), packed row (q row) x group + head offset, q row = b * seqlen_q + i
// or the varlen row, so that the packed rows of a sequence are contiguous; the 16-byte chunks of a
// row XOR-swizzled by swizzle(its packed row within the sequence). A warp then writes its 16 x 64
// block to shared memory without bank conflicts and hands it on with one bulk reduction (per-row
// reductions measured 2-5% slower than float32 atomics at head dim 128, the uniform datapath
// issuing one row at a time; per-thread atomics need shuffles and an address per 16 bytes).
struct DqBlocked {
  int64_t packed_rows;  // of the whole batch: the rows of one (KV head, column block)
  int col_blocks, group, seqlen_q, heads_kv;
  bool varlen;
  __host__ __device__ DqBlocked(const FlashBwdParams& p, int group_)
      : packed_rows(dq_accum_q_rows(p) * group_),
        col_blocks((p.head_dim + 63) / 64),
        group(group_),
        seqlen_q(p.seqlen_q),
        heads_kv(p.heads_kv),
        varlen(p.cu_seqlens_q != nullptr) {}
  // The XOR key of row r's 16-byte chunks. A half warp's 64-bit stores of the accumulator cover
  // rows g = 0..3 (or 4..7) at chunks 2t and 2t + 1: the key 2g puts those 8 (row, chunk) pairs on 8
  // distinct chunk positions, so each half warp's 128 bytes take one wavefront (the key g left two
  // pairs on each position: twice the ideal wavefronts, Nsight Compute v15).
  __host__ __device__ static int swizzle(int r) { return (2 * r) & 7; }
  // Floats from dq_accum(p) to the start of packed row r of sequence b in column block cb of KV head hk.
  __device__ __forceinline__ int64_t offset(int hk, int cb, int b, const SeqInfo& si, int r) const {
    const int64_t q_row0 = varlen ? si.q_row0 : static_cast<int64_t>(b) * seqlen_q;
    return ((static_cast<int64_t>(hk) * col_blocks + cb) * packed_rows + q_row0 * group + r) * 64;
  }
};

// Q and dO as 4-d tensors (head_dim, heads_q, seqlen_q, batch), a box of 64 columns x group heads x
// box_rows query rows: its 128-byte rows land in packed-row order (query row, then head of the
// group), BM = group x box_rows packed rows per step. box_rows 0: the cp.async copies.
struct QdoTmaMaps {
  CUtensorMap q, dout;
  int box_rows;
};

__device__ __forceinline__ void st_shared_u32(uint32_t addr, uint32_t value) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(value) : "memory");
}
__device__ __forceinline__ void st_shared_f32x2(uint32_t addr, float x, float y) {
  asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(addr), "f"(x), "f"(y) : "memory");
}

template <typename T, int D, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    bwd_wgmma_kernel(const BwdArgs args, const __grid_constant__ QdoTmaMaps qdo_maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int NT = Cfg::kThreads;
  constexpr int BN = Cfg::kBlockN;
  constexpr int BM = Cfg::kBlockM;
  constexpr int kStages = Cfg::kStages;
  constexpr int kSRows = Cfg::kSRows;
  constexpr int kKvCols = Cfg::kKvCols;
  constexpr int kDqCols = Cfg::kDqCols;
  constexpr int kMT = kSRows / 8;   // 8-row column tiles of this warpgroup's S^T
  constexpr int kDT = kKvCols / 8;  // 8-column tiles of its dK / dV
  extern __shared__ __align__(16) uint8_t wgmma_smem[];
  const uint32_t smem0 = smem_addr(wgmma_smem);
  const uint32_t sK = (smem0 + 1023u) & ~1023u;
  const uint32_t sV = sK + Cfg::kKVBytes;
  const uint32_t sQ = sV + Cfg::kKVBytes;             // [kStages]
  const uint32_t sdO = sQ + kStages * Cfg::kQBytes;   // [kStages]
  // [kDsBuffers] {P^T (without kRsDkv), dS^T} of a step: BN key rows x BM query rows each
  // (overlapped steps alternate between two).
  const uint32_t sDs = sdO + kStages * Cfg::kQBytes;
  const uint32_t sRows = sDs + Cfg::kDsBuffers * Cfg::kDsTiles * Cfg::kDsBytes;  // [kStages] lse rows, then [kStages] Di rows
  const uint32_t sDq = sRows + 2 * kStages * BM * 4;  // [warpgroups] dQ blocks of the step
  const float* rows_f = reinterpret_cast<const float*>(wgmma_smem + (sRows - smem0));
  // With TMA, per stage: Q / dO / lse / Di landed (one arrival with the tile bytes from the issuing
  // thread, one per lse / Di copy as it lands); overlapped steps: warps done with the stage.
  __shared__ __align__(8) uint64_t stage_full[kStages];
  __shared__ uint32_t stage_done[kStages];
  const uint32_t full0 = smem_addr(stage_full);

  const FlashBwdParams& p = args.p;
  const ScoreArgs& sa = args.s;
  const int b = blockIdx.z;
  const int hk = blockIdx.y;
  const int j0 = blockIdx.x * BN;
  const SeqInfo si = seq_info(p, b);
  const int group = sa.group;
  const GroupSplit gs(group);
  const int rows = si.sq * group;
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int offset = si.sk - si.sq;

  zero_unused_key_rows<T>(p, si, b, hk, j0, BN);
  if (j0 >= si.sk) return;

  const BlockRange steps = visible_row_blocks(sa, si, j0, BN, BM);
  const int m_begin = steps.begin, m_end = steps.end;

  const int tid = threadIdx.x;
  const bool tma_qdo = Cfg::kTmaQdo && qdo_maps.box_rows > 0;
  const bool overlap = Cfg::kOverlap && tma_qdo;  // (the cp.async fallback keeps the step barrier)
  if (tma_qdo) {
    if (tid == 0) {
      for (int st = 0; st < kStages; ++st) {
        mbar_init(full0 + 8u * st, 1 + 2 * BM);
        stage_done[st] = 0;
      }
      fence_mbar_init();
    }
    __syncthreads();
  }
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane >> 2;
  const int tq = lane & 3;
  const int wg = warp / 4;
  // This warpgroup's share (KvSplit): keys wg_key0.., S^T / dP^T query rows s_row0.. of the step,
  // dK / dV columns kv_col0...
  const int wg_key0 = Cfg::kSplitKeys ? wg * 64 : 0;
  const int s_row0 = Cfg::kSplitKeys ? 0 : wg * kSRows;
  const int kv_col0 = Cfg::kSplitKeys ? 0 : wg * kKvCols;
  const int key_row = wg_key0 + (warp % 4) * 16 + g;  // this thread's accumulator rows: key_row + 8e

  const T* q = static_cast<const T*>(p.q);
  const T* dout = static_cast<const T*>(p.dout);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);

  // Step mb into its buffers: Q and dO rows (one address per tile when the packed rows are query
  // rows, i.e. without GQA), and lse / Di of each packed row (zeros past the end: those rows have
  // zero Q and dO, so they add nothing).
  auto stage_of = [&](int mb) { return (mb - m_begin) % kStages; };
  // Q and dO by TMA from the calling thread: a box per 64-column block, from packed row mb BM, i.e.
  // query row mb BM / group of head hk * group (rows past seqlen_q read zero).
  auto load_qdo_tma = [&](int mb) {
    const int st = stage_of(mb);
    const uint32_t full = full0 + 8u * st;
    mbar_arrive_expect_tx(full, 2 * Cfg::kQBytes);
#pragma unroll
    for (int cb = 0; cb < D / 64; ++cb) {
      tma_load_4d(sQ + st * Cfg::kQBytes + cb * BM * 128, &qdo_maps.q, cb * 64, hk * group, mb * BM / group, b, full);
      tma_load_4d(sdO + st * Cfg::kQBytes + cb * BM * 128, &qdo_maps.dout, cb * 64, hk * group, mb * BM / group, b, full);
    }
  };
  auto load_rows = [&](int mb) {
    const int st = stage_of(mb);
    if (tid < 2 * BM) {
      const int rr = tid % BM;
      const int r = mb * BM + rr;
      const bool ok = r < rows;
      const int i = ok ? gs.row(r) : 0;
      const int h = hk * group + (ok ? gs.head(r) : 0);
      const bool is_lse = tid < BM;
      const float* src = is_lse ? p.softmax_lse + lse_offset(p, si, b, i, h) : p.workspace + di_offset(p, b, h, i);
      cp_async4_shared(sRows + ((is_lse ? 0 : kStages) + st) * BM * 4 + rr * 4, src, ok ? 4 : 0);
      if (tma_qdo) cp_async_mbar_arrive(full0 + 8u * st);
    }
  };
  auto load_step = [&](int mb) {
    const int st = stage_of(mb);
    const int r0 = mb * BM;
    const uint32_t dst_q = sQ + st * Cfg::kQBytes;
    const uint32_t dst_do = sdO + st * Cfg::kQBytes;
    if (tma_qdo) {
      if (tid == 0) load_qdo_tma(mb);
    } else if (group == 1) {
      cp_async_rows_sw128<T, D, BM, NT>(
          dst_q, q + q_offset(varlen, p.q_batch_stride, p.q_row_stride, p.q_head_stride, si, b, r0, hk), p.q_row_stride,
          rows - r0, p.head_dim);
      cp_async_rows_sw128<T, D, BM, NT>(
          dst_do, dout + q_offset(varlen, p.do_batch_stride, p.do_row_stride, p.do_head_stride, si, b, r0, hk),
          p.do_row_stride, rows - r0, p.head_dim);
    } else {
      auto rows_of = [&](const T* base, int64_t bs, int64_t rst, int64_t hs) {
        return [=, &si, &gs](int rr) -> const T* {
          const int r = r0 + rr;
          if (r >= rows) return nullptr;
          return base + q_offset(varlen, bs, rst, hs, si, b, gs.row(r), hk * group + gs.head(r));
        };
      };
      cp_async_tile_sw128<T, D, BM, NT>(dst_q, rows_of(q, p.q_batch_stride, p.q_row_stride, p.q_head_stride),
                                        p.head_dim, q);
      cp_async_tile_sw128<T, D, BM, NT>(dst_do, rows_of(dout, p.do_batch_stride, p.do_row_stride, p.do_head_stride),
                                        p.head_dim, dout);
    }
    load_rows(mb);
  };

  // Prologue groups: {K, V, step m_begin}, then one group per further step, kStages - 1 in all
  // (overlapped steps: kStages; with TMA the steps complete on their mbarriers, the groups hold K
  // and V).
  if (m_begin < m_end) {
    cp_async_rows_sw128<T, D, BN, NT>(
        sK, k + kv_offset(p, p.k_batch_stride, p.k_row_stride, p.k_head_stride, si, b, j0, hk), p.k_row_stride,
        si.sk - j0, p.head_dim);
    cp_async_rows_sw128<T, D, BN, NT>(
        sV, v + kv_offset(p, p.v_batch_stride, p.v_row_stride, p.v_head_stride, si, b, j0, hk), p.v_row_stride,
        si.sk - j0, p.head_dim);
    load_step(m_begin);
    cp_async_commit();
#pragma unroll
    for (int t = 1; t < kStages; ++t) {
      if (t == kStages - 1 && !overlap) break;
      if (m_begin + t < m_end) load_step(m_begin + t);
      cp_async_commit();
    }
  }

  float dv[kKvCols / 2], dk[kKvCols / 2];  // this warpgroup's 64 keys x kKvCols: [4t + c] (wgmma_ops.cuh)
#pragma unroll
  for (int i = 0; i < kKvCols / 2; ++i) dv[i] = dk[i] = 0.f;
  const float scale = p.softmax_scale;
  const float scale_log2 = scale * kLog2e;
  const uint32_t sK_wg = sK + wg_key0 * 128;  // this warpgroup's key rows in every column block
  const uint32_t sV_wg = sV + wg_key0 * 128;
  // This warpgroup's dQ block: query rows dq_row0.., head-dim columns dq_col0.. of the step.
  constexpr DqSplit kSplit = Cfg::kDqSplit;
  const int dq_row0 = kSplit == DqSplit::kRows ? wg * 64 : 0;
  const int dq_col0 = kSplit == DqSplit::kCols ? wg * kDqCols : 0;
  // This warp's 16 rows of it in shared memory, and where they go for step 0 (+ 64 r0 floats per
  // step; with atomics, this thread's row (warp % 4) * 16 + g).
  const uint32_t sDq_warp = sDq + (wg * 64 + (warp % 4) * 16) * 256;
  const DqBlocked dq_layout(p, group);
  float* const dq_dst = dq_accum(p) + dq_layout.offset(hk, dq_col0 / 64, b, si,
                                                       dq_row0 + (warp % 4) * 16 + (Cfg::kDqAtomics ? g : 0));

  for (int mb = m_begin; mb < m_end; ++mb) {
    const int st = (mb - m_begin) % kStages;
    const uint32_t cQ = sQ + st * Cfg::kQBytes;
    const uint32_t cdO = sdO + st * Cfg::kQBytes;
    const uint32_t cP = sDs + (overlap ? (mb - m_begin) % 2 : 0) * Cfg::kDsTiles * Cfg::kDsBytes;  // P^T, then dS^T
    const uint32_t cdS = cP + (Cfg::kDsTiles - 1) * Cfg::kDsBytes;
    if (tma_qdo) {
      if (mb == m_begin) cp_async_wait_all();  // K and V
      mbar_wait(full0 + 8u * st, ((mb - m_begin) / kStages) & 1);
    } else {
      cp_async_wait_group<kStages - 2>();
    }
    fence_proxy_async();
    // Step mb landed; every thread is done with step mb - 1 and its buffers. Overlapped steps need
    // this only for K and V: step mb's P^T / dS^T buffer was last read in step mb - 2, which every
    // thread finished before step mb - 1's barrier.
    if (!overlap || mb == m_begin) __syncthreads();

    // S^T = K Q^T, then dP^T = V dO^T in a group of its own: P's exponentials run while it is in flight.
    float s[kSRows / 2], dp[kSRows / 2];
    wgmma_fence();
    wgmma_ss_k_major<T, kSRows, D>(s, sK_wg, BN, cQ + s_row0 * 128, BM);
    wgmma_commit();
    wgmma_ss_k_major<T, kSRows, D>(dp, sV_wg, BN, cdO + s_row0 * 128, BM);
    wgmma_commit();
    // The copies' address math runs while the tensor cores work: step mb + kStages - 1 into the
    // buffers of step mb - 1 (overlapped steps refill later, below).
    if (!overlap && mb + kStages - 1 < m_end) load_step(mb + kStages - 1);
    cp_async_commit();
    wgmma_wait<1>();  // S^T done
    pin_registers(s);

    // P^T into s: accumulator rows are keys, columns packed query rows. The step needs the mask
    // unless every (row, key) pair of it is visible (rows past the end add nothing); masked scores
    // become -inf (softmax_scale > 0), so that the probabilities below need no branch.
    const int r0 = mb * BM;
    const bool need_mask = tile_needs_mask(sa, si.sk, offset, j0, BN, gs.row(r0), gs.row(min(r0 + BM, rows) - 1));
    if (need_mask) {
#pragma unroll
      for (int t = 0; t < kMT; ++t) {
#pragma unroll
        for (int c1 = 0; c1 < 2; ++c1) {
          // Keys j_lo .. j_hi of packed row r (visible(): bottom-right aligned window, j < sk).
          const int r = r0 + s_row0 + t * 8 + tq * 2 + c1;
          const int diag = gs.row(r) + offset;
          const int j_lo = r >= rows ? si.sk : (sa.window_left >= 0 ? diag - sa.window_left : 0);
          const int j_hi = sa.window_right >= 0 ? min(si.sk - 1, diag + sa.window_right) : si.sk - 1;
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int j = j0 + key_row + 8 * e;
            if (j < j_lo || j > j_hi) s[4 * t + 2 * e + c1] = neg_inf();
          }
        }
      }
    }
    const float* lse_row = rows_f + st * BM + s_row0;
    const float* di_row = rows_f + (kStages + st) * BM + s_row0;
#pragma unroll
    for (int t = 0; t < kMT; ++t) {
      const float2 lse = *reinterpret_cast<const float2*>(lse_row + t * 8 + tq * 2);
      const float lse2[2] = {lse.x * kLog2e, lse.y * kLog2e};
#pragma unroll
      for (int c = 0; c < 4; ++c) s[4 * t + c] = fast_exp2(fmaf(s[4 * t + c], scale_log2, -lse2[c & 1]));
    }
    // P^T and dS^T in 16 bits as A operands: the accumulators of column tiles 2kk, 2kk+1 hold query
    // rows s_row0 + 16kk .. + 15, so word c of K-step kk holds key row key_row + 8 (c & 1), query
    // rows s_row0 + 16kk + 8 (c >> 1) + 2tq, +1 (mma.sync's A fragment, which wgmma's register A
    // operand shares). In shared memory (row = key, 64 query rows per 128-byte row block, swizzled)
    // for dQ, and for dV / dK without kRsDkv.
    constexpr int kKSteps = kSRows / 16;
    auto pack_a = [&](uint32_t (&a)[kKSteps][4], const float* x) {
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) {
#pragma unroll
        for (int c = 0; c < 4; ++c) a[kk][c] = pack2<T>(x[8 * kk + 2 * c], x[8 * kk + 2 * c + 1]);
      }
    };
    auto store_a = [&](uint32_t tile, const uint32_t (&a)[kKSteps][4]) {
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          st_shared_u32(tile + sw128_offset(key_row + 8 * (c & 1), s_row0 / 8 + 2 * kk + (c >> 1), BN) + 4 * tq, a[kk][c]);
        }
      }
    };
    // acc += A B with A from registers (kRsDkv): K-step kk takes B's 16 rows (2048 bytes) into the
    // tile, whose column blocks are BM rows apart.
    auto issue_rs = [&](float (&acc)[kKvCols / 2], uint32_t (&a)[kKSteps][4], uint32_t b_tile) {
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) pin_registers(a[kk]);
      pin_registers(acc);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) {
        if constexpr (Cfg::kRsDkv) WgmmaRs<T, kKvCols>::rs(acc, a[kk], sw128_desc(b_tile + kk * 16 * 128, BM * 128));
      }
      wgmma_commit();
    };
    uint32_t pa[kKSteps][4], dsa[kKSteps][4];  // P^T, dS^T
    pack_a(pa, s);
    if constexpr (Cfg::kRsDkv) {
      issue_rs(dv, pa, cdO);  // dV += P^T dO, while dS^T is computed
      wgmma_wait<1>();        // dP^T done
    } else {
      store_a(cP, pa);
      wgmma_wait<0>();  // dP^T done
    }
    pin_registers(dp);
    // dS^T into dp.
#pragma unroll
    for (int t = 0; t < kMT; ++t) {
      const float2 di = *reinterpret_cast<const float2*>(di_row + t * 8 + tq * 2);
      const float di_scaled[2] = {di.x * scale, di.y * scale};
#pragma unroll
      for (int c = 0; c < 4; ++c) dp[4 * t + c] = s[4 * t + c] * fmaf(dp[4 * t + c], scale, -di_scaled[c & 1]);
    }
    pack_a(dsa, dp);
    if constexpr (Cfg::kRsDkv) issue_rs(dk, dsa, cQ);  // dK += dS^T Q, while the CTA barrier waits
    store_a(cdS, dsa);
    fence_proxy_async();
    __syncthreads();  // dS^T (and P^T) of every warpgroup written
    // Overlapped steps: every thread is past step mb's lse / Di, refill them for step mb + kStages.
    if (overlap && mb + kStages < m_end) load_rows(mb + kStages);

    // dQ (64 x kDqCols block) = dS K: A = dS^T (MN-major: column block = 64 query rows), B = K
    // (MN-major: column block = 64 head-dim columns); K-step kk covers keys key0 .. key0 + 15.
    float dq[kDqCols / 2];
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const uint32_t key0 = kk * 16;
      Wgmma<T, kDqCols>::template ss<1, 1>(dq, sw128_desc(cdS + (dq_row0 / 64) * BN * 128 + key0 * 128, BN * 128),
                                           sw128_desc(sK + (dq_col0 / 64) * BN * 128 + key0 * 128, BN * 128), kk > 0);
    }
    wgmma_commit();
    if constexpr (!Cfg::kRsDkv) {
      // dV += P^T dO and dK += dS^T Q from shared memory, queued behind dQ so that they run while
      // its rows are handed on. K-step kk: A (this warpgroup's 64 key rows) 32 bytes into the rows
      // of column block kk / 4; B (from column block kv_col0 / 64 on) 16 rows (2048 bytes) into the
      // tiles, whose column blocks are BM rows apart.
      pin_registers(dv);
      pin_registers(dk);
      wgmma_fence();
      const uint32_t b_col = (kv_col0 / 64) * BM * 128;
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk) {
        const uint32_t a = (kk / 4) * BN * 128 + wg_key0 * 128 + (kk % 4) * 32;
        Wgmma<T, kKvCols>::template ss<0, 1>(dv, sw128_desc(cP + a, 16), sw128_desc(cdO + b_col + kk * 16 * 128, BM * 128), 1);
      }
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk) {
        const uint32_t a = (kk / 4) * BN * 128 + wg_key0 * 128 + (kk % 4) * 32;
        Wgmma<T, kKvCols>::template ss<0, 1>(dk, sw128_desc(cdS + a, 16), sw128_desc(cQ + b_col + kk * 16 * 128, BM * 128), 1);
      }
      wgmma_commit();
    }
    wgmma_wait<Cfg::kRsDkv ? 0 : 1>();  // dQ done (and, with kRsDkv, dV / dK queued before it)
    pin_registers(dq);
    if constexpr (Cfg::kRsDkv) {
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) {  // (register A operands live until their products are done)
        pin_registers(pa[kk]);
        pin_registers(dsa[kk]);
      }
    }
    // dQ into the float32 accumulator (DqBlocked: dq[4t + c] is row dq_row0 + (warp % 4) * 16 + g +
    // 8 (c >> 1), column dq_col0 + 8t + 2tq + (c & 1); the row's swizzle key is DqBlocked::swizzle(g)).
    if constexpr (Cfg::kDqAtomics) {
      // Two adjacent columns per atomic, in the column blocks the accumulator has (head_dim rounded
      // up to 64), for the rows before the end.
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        if (r0 + dq_row0 + (warp % 4) * 16 + g + 8 * e >= rows) continue;
        float* const row_dst = dq_dst + (static_cast<int64_t>(r0) + 8 * e) * 64 + 2 * (tq & 1);
#pragma unroll
        for (int t = 0; t < kDqCols / 8; ++t) {
          if (dq_col0 / 64 + t / 8 >= dq_layout.col_blocks) break;
          const int chunk = (2 * (t % 8) + (tq >> 1)) ^ DqBlocked::swizzle(g);
          atomicAdd(reinterpret_cast<float2*>(row_dst + (t / 8) * dq_layout.packed_rows * 64 + chunk * 4),
                    make_float2(dq[4 * t + 2 * e], dq[4 * t + 2 * e + 1]));
        }
      }
    } else {
      // Each warp's 16 rows to shared memory in the accumulator's layout, then one bulk reduction
      // of the warp's valid rows from lane 0, which first waits until the previous step's
      // reduction has read them.
      if (lane == 0) bulk_wait_read<0>();
      __syncwarp();
#pragma unroll
      for (int t = 0; t < 8; ++t) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int chunk = (2 * t + (tq >> 1)) ^ DqBlocked::swizzle(g);
          st_shared_f32x2(sDq_warp + (g + 8 * e) * 256 + chunk * 16 + (tq & 1) * 8, dq[4 * t + 2 * e], dq[4 * t + 2 * e + 1]);
        }
      }
      fence_proxy_async();
      __syncwarp();  // the warp's rows written
      if (lane == 0) {
        const int valid = min(16, rows - (r0 + dq_row0 + (warp % 4) * 16));
        if (valid > 0) bulk_reduce_add_f32(dq_dst + static_cast<int64_t>(r0) * 64, sDq_warp, valid * 256);
        bulk_commit();
      }
    }
    wgmma_wait<0>();  // dV, dK done (without kRsDkv): P^T, dS^T and the step's buffers are free
    pin_registers(dv);
    pin_registers(dk);
    // Overlapped steps: the last warp done with the stage's Q / dO refills it for step mb + kStages.
    if (overlap && mb + kStages < m_end && lane == 0) {
      __threadfence_block();
      if (atomicAdd(&stage_done[st], 1u) % (NT / 32) == NT / 32 - 1) load_qdo_tma(mb + kStages);
    }
  }
  if (!Cfg::kDqAtomics && lane == 0) bulk_wait<0>();  // shared memory stays until the last reduction has read it
  cp_async_wait_all();

#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int j = j0 + key_row + 8 * e;
    if (j >= si.sk) continue;
    T* dkp = static_cast<T*>(p.dk) + kv_offset(p, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride, si, b, j, hk);
    T* dvp = static_cast<T*>(p.dv) + kv_offset(p, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride, si, b, j, hk);
#pragma unroll
    for (int t = 0; t < kDT; ++t) {
      const int d = kv_col0 + t * 8 + tq * 2;
      if (d < p.head_dim) {
        *reinterpret_cast<uint32_t*>(dkp + d) = pack2<T>(dk[4 * t + 2 * e], dk[4 * t + 2 * e + 1]);
        *reinterpret_cast<uint32_t*>(dvp + d) = pack2<T>(dv[4 * t + 2 * e], dv[4 * t + 2 * e + 1]);
      }
    }
  }
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

// dq = the blocked float32 accumulator (DqBlocked) by 16-byte chunks: 16 lanes per (query row, head)
// at one 64-column block (two rows per warp), a warp per row above.
__host__ __device__ inline int dq_convert_lanes(int col_blocks) { return col_blocks > 1 ? 32 : 16; }
template <typename T>
__global__ void __launch_bounds__(kThreads) dq_convert_blocked_kernel(const BwdArgs args) {
  const FlashBwdParams& p = args.p;
  const int b = blockIdx.z;
  const int h = blockIdx.y;
  const int group = args.s.group;
  const DqBlocked layout(p, group);
  const int lanes = dq_convert_lanes(layout.col_blocks);
  const int lane = threadIdx.x % 32;
  const int i = (blockIdx.x * (kThreads / 32) + threadIdx.x / 32) * (32 / lanes) + lane / lanes;
  const SeqInfo si = seq_info(p, b);
  if (i >= si.sq) return;
  const int r = i * group + h % group;  // packed row within the sequence
  const float* acc = dq_accum(p) + layout.offset(h / group, 0, b, si, r);
  T* dq = static_cast<T*>(p.dq) +
          q_offset(p.cu_seqlens_q != nullptr, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride, si, b, i, h);
  // 16-byte chunk c of column block cb (columns 4c .. 4c + 3, whole or past head_dim: a multiple of 8).
  for (int q = lane % lanes; q < 16 * layout.col_blocks; q += lanes) {
    const int cb = q / 16, c = q % 16;
    if (cb * 64 + 4 * c >= p.head_dim) break;
    const float4 x =
        *reinterpret_cast<const float4*>(acc + cb * layout.packed_rows * 64 + (c ^ DqBlocked::swizzle(r)) * 4);
    *reinterpret_cast<uint2*>(dq + cb * 64 + 4 * c) = make_uint2(pack2<T>(x.x, x.y), pack2<T>(x.z, x.w));
  }
}

// The Q and dO maps where a step's packed rows are whole query rows of one batch entry's dense
// tensor: not varlen (rows past a sequence would be the next one's, not zeros), the group dividing
// BM, the head dim reaching the bucket's last 64-column block (no box wholly past the columns);
// box_rows 0 (the cp.async copies) otherwise or where the maps cannot be made.
template <typename T, typename Cfg>
QdoTmaMaps bwd_qdo_tma_maps(const FlashBwdParams& p, int group, int bucket) {
  QdoTmaMaps maps{};
  if (!Cfg::kTmaQdo || p.cu_seqlens_q != nullptr || Cfg::kBlockM % group != 0 || (p.head_dim + 63) / 64 != bucket / 64)
    return maps;
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(p.head_dim), static_cast<cuuint64_t>(p.heads_q),
                              static_cast<cuuint64_t>(p.seqlen_q), static_cast<cuuint64_t>(p.batch)};
  // (A batch stride of 0, one batch entry, is never stepped: any multiple of 16 bytes will do.)
  auto make = [&](CUtensorMap& map, const void* base, int64_t batch_stride, int64_t row_stride, int64_t head_stride) {
    const int64_t strides[3] = {head_stride, row_stride, batch_stride > 0 ? batch_stride : row_stride};
    return encode_tma_4d<T>(map, base, dims, strides, group, Cfg::kBlockM / group);
  };
  if (make(maps.q, p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride) &&
      make(maps.dout, p.dout, p.do_batch_stride, p.do_row_stride, p.do_head_stride))
    maps.box_rows = Cfg::kBlockM / group;
  return maps;
}

// Run the kernel (one CTA per BN keys, KV head and batch) into the accumulator dot_do_o_kernel has
// zeroed, convert dQ.
template <typename T, int D, typename Cfg>
void launch_bwd_wgmma_config(const BwdArgs& args, cudaStream_t stream) {
  auto kernel = bwd_wgmma_kernel<T, D, Cfg>;
  set_smem(kernel, Cfg::kSmemBytes, "cudaFuncSetAttribute(bwd_wgmma_kernel)");
  const FlashBwdParams& p = args.p;
  const QdoTmaMaps qdo_maps = bwd_qdo_tma_maps<T, Cfg>(p, args.s.group, D);
  if (p.seqlen_k > 0) {
    kernel<<<dim3(ceil_div(p.seqlen_k, Cfg::kBlockN), p.heads_kv, p.batch), Cfg::kThreads, Cfg::kSmemBytes, stream>>>(args, qdo_maps);
    check_launch("bwd_wgmma_kernel launch");
  }
  if (p.seqlen_q > 0) {
    const int rows = (kThreads / 32) * (32 / dq_convert_lanes((p.head_dim + 63) / 64));
    dq_convert_blocked_kernel<T><<<dim3(ceil_div(p.seqlen_q, rows), p.heads_q, p.batch), kThreads, 0, stream>>>(args);
    check_launch("dq_convert_blocked_kernel launch");
  }
}

// Explicitly instantiated once per head-dim bucket (instantiations/flash_bwd_wgmma_hdim*.cu).
template <typename T, int D>
void launch_bwd_wgmma(const BwdArgs& args, cudaStream_t stream) {
  launch_bwd_wgmma_config<T, D, BwdWgmmaConfig<D>>(args, stream);
}

}  // namespace detail
}  // namespace cuda
}  // namespace flash
