// Hopper backward (sm90a, warpgroup MMA): FlashAttention-2's fused backward on wgmma. One CTA of
// two warpgroups per (128 keys, KV head, batch), each warpgroup owning 64 keys; K and V stay in
// shared memory while the CTA walks the packed query rows that see its keys, BM per step (64 at
// head dim 128, 128 at 64), through a ring of Q / dO / lse / Di buffers filled with cp.async. Per
// step and warpgroup:
//   S^T = K Q^T, dP^T = V dO^T       wgmma, both operands from shared memory (K-major)
//   P^T = 2^(S^T scale log2e - lse log2e), dS^T = P^T (dP^T - Di) scale   in registers
//   P^T, dS^T -> shared memory       (so that no A operand holds registers while products run)
//   dQ  = dS K                       wgmma, dS^T and K MN-major, one 64 x 64 block per warpgroup
//                                    (DqSplit); float32 atomics into the workspace while dV / dK
//                                    run; dq_convert_kernel then writes dq
//   dV += P^T dO, dK += dS^T Q       wgmma, P^T / dS^T K-major, dO / Q MN-major
//
// Calls it takes (hopper_bwd_supported, flash_bwd.cu): head dims 33..128 (run at 64 or 128, the
// columns past head_dim zero), not deterministic, no dropout, softcap or ALiBi, softmax_scale > 0;
// causal, window, GQA/MQA, varlen, seqused/leftpad and sinks (dsinks comes from dsinks_kernel) are
// covered. Everything else runs on the sm80-class kernels (flash_bwd_mma.cuh).
#pragma once

#include "cuda/flash_bwd_mma.cuh"
#include "cuda/hopper/wgmma_tiles.cuh"

namespace flash {
namespace cuda {
namespace detail {

// How the warpgroups share dQ = dS K of a step, each computing a 64 x 64 block over every key of
// the CTA: kCols, warpgroup w takes columns 64w.. (D = 64 x warpgroups, BM = 64); kRows, query rows
// 64w.. (D = 64, BM = 64 x warpgroups). (Each warpgroup taking all of dQ over its own keys, with
// twice the atomics, measured 5-8% slower at D = 64.)
enum class DqSplit { kCols, kRows };

template <int D, int BM_ = (D == 64 ? 128 : 64), int kWarpgroups_ = 2>
struct BwdWgmmaConfig {
  static constexpr int kWarpgroups = kWarpgroups_;
  static constexpr int kThreads = 128 * kWarpgroups;
  static constexpr int kBlockN = 64 * kWarpgroups;  // keys per CTA, 64 per warpgroup
  static constexpr int kBlockM = BM_;               // packed query rows per step
  static constexpr DqSplit kDqSplit = D == 64 * kWarpgroups ? DqSplit::kCols : DqSplit::kRows;
  static_assert(kDqSplit == DqSplit::kCols ? BM_ == 64 : D == 64 && BM_ == 64 * kWarpgroups,
                "dQ splits into one 64 x 64 block per warpgroup");
  static constexpr uint32_t kKVBytes = kBlockN * D * 2;            // the K or the V tile
  static constexpr uint32_t kQBytes = kBlockM * D * 2;             // one Q or dO tile
  static constexpr uint32_t kDsBytes = kBlockN * kBlockM * 2;      // P^T or dS^T, rows = keys
  static constexpr uint32_t kStageBytes = 2 * kQBytes + 2 * kBlockM * 4;  // Q, dO, lse, Di
  // Three steps in flight where they fit an sm90 SM's 227 KB, else two; + 1 KB to align the tiles.
  static constexpr size_t kSmemLimit = 227 * 1024;
  static constexpr int kStages = 2 * kKVBytes + 3 * kStageBytes + 2 * kDsBytes + 1024 <= kSmemLimit ? 3 : 2;
  static constexpr size_t kSmemBytes = 2 * kKVBytes + kStages * kStageBytes + 2 * kDsBytes + 1024;
  static_assert(kSmemBytes <= kSmemLimit, "tiles fit the shared memory");
};

__device__ __forceinline__ void st_shared_u32(uint32_t addr, uint32_t value) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(value) : "memory");
}

template <typename T, int D, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) bwd_wgmma_kernel(const BwdArgs args) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int NT = Cfg::kThreads;
  constexpr int BN = Cfg::kBlockN;
  constexpr int BM = Cfg::kBlockM;
  constexpr int kStages = Cfg::kStages;
  constexpr int kMT = BM / 8;  // 8-row column tiles of S^T
  constexpr int kDT = D / 8;   // 8-column tiles of dK / dV
  extern __shared__ __align__(16) uint8_t wgmma_smem[];
  const uint32_t smem0 = smem_addr(wgmma_smem);
  const uint32_t sK = (smem0 + 1023u) & ~1023u;
  const uint32_t sV = sK + Cfg::kKVBytes;
  const uint32_t sQ = sV + Cfg::kKVBytes;             // [kStages]
  const uint32_t sdO = sQ + kStages * Cfg::kQBytes;   // [kStages]
  const uint32_t sP = sdO + kStages * Cfg::kQBytes;   // P^T of the step: BN key rows x BM query rows
  const uint32_t sdS = sP + Cfg::kDsBytes;            // dS^T of the step, likewise
  const uint32_t sRows = sdS + Cfg::kDsBytes;         // [kStages] lse rows, then [kStages] Di rows
  const float* rows_f = reinterpret_cast<const float*>(wgmma_smem + (sRows - smem0));

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
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane >> 2;
  const int tq = lane & 3;
  const int wg = warp / 4;
  const int key_row = wg * 64 + (warp % 4) * 16 + g;  // this thread's accumulator rows: key_row + 8e

  const T* q = static_cast<const T*>(p.q);
  const T* dout = static_cast<const T*>(p.dout);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);

  // Step mb into its buffers: Q and dO rows (one address per tile when the packed rows are query
  // rows, i.e. without GQA), and lse / Di of each packed row (zeros past the end: those rows have
  // zero Q and dO, so they add nothing).
  auto load_step = [&](int mb) {
    const int st = (mb - m_begin) % kStages;
    const int r0 = mb * BM;
    const uint32_t dst_q = sQ + st * Cfg::kQBytes;
    const uint32_t dst_do = sdO + st * Cfg::kQBytes;
    if (group == 1) {
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
    if (tid < 2 * BM) {
      const int rr = tid % BM;
      const int r = r0 + rr;
      const bool ok = r < rows;
      const int i = ok ? gs.row(r) : 0;
      const int h = hk * group + (ok ? gs.head(r) : 0);
      const bool is_lse = tid < BM;
      const float* src = is_lse ? p.softmax_lse + lse_offset(p, si, b, i, h) : p.workspace + di_offset(p, b, h, i);
      cp_async4_shared(sRows + ((is_lse ? 0 : kStages) + st) * BM * 4 + rr * 4, src, ok ? 4 : 0);
    }
  };

  // Prologue groups: {K, V, step m_begin}, then one group per further step, kStages - 1 in all.
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
    for (int t = 1; t < kStages - 1; ++t) {
      if (m_begin + t < m_end) load_step(m_begin + t);
      cp_async_commit();
    }
  }

  float dv[D / 2], dk[D / 2];  // this warpgroup's 64 keys x D: [4t + c] (wgmma_ops.cuh)
#pragma unroll
  for (int i = 0; i < D / 2; ++i) dv[i] = dk[i] = 0.f;
  const float scale = p.softmax_scale;
  const float scale_log2 = scale * kLog2e;
  const uint32_t sK_wg = sK + wg * 64 * 128;  // this warpgroup's 64 rows in every column block
  const uint32_t sV_wg = sV + wg * 64 * 128;

  for (int mb = m_begin; mb < m_end; ++mb) {
    const int st = (mb - m_begin) % kStages;
    const uint32_t cQ = sQ + st * Cfg::kQBytes;
    const uint32_t cdO = sdO + st * Cfg::kQBytes;
    cp_async_wait_group<kStages - 2>();
    fence_proxy_async();
    __syncthreads();  // step mb landed; every thread is done with step mb - 1 and its buffers

    // S^T = K Q^T and dP^T = V dO^T.
    float s[BM / 2], dp[BM / 2];
    wgmma_fence();
    wgmma_ss_k_major<T, BM, D>(s, sK_wg, BN, cQ, BM);
    wgmma_ss_k_major<T, BM, D>(dp, sV_wg, BN, cdO, BM);
    wgmma_commit();
    // The copies' address math runs while the tensor cores work: step mb + kStages - 1 into the
    // buffers of step mb - 1.
    if (mb + kStages - 1 < m_end) load_step(mb + kStages - 1);
    cp_async_commit();
    wgmma_wait<0>();
    pin_registers(s);
    pin_registers(dp);

    // P^T into s, dS^T into dp: accumulator rows are keys, columns packed query rows. The step needs
    // the mask unless every (row, key) pair of it is visible (rows past the end add nothing); masked
    // scores become -inf (softmax_scale > 0), so that the probabilities below need no branch.
    const int r0 = mb * BM;
    const bool need_mask = j0 + BN > si.sk ||
                           (sa.window_right >= 0 && j0 + BN - 1 > gs.row(r0) + offset + sa.window_right) ||
                           (sa.window_left >= 0 && j0 < gs.row(min(r0 + BM, rows) - 1) + offset - sa.window_left);
    if (need_mask) {
#pragma unroll
      for (int t = 0; t < kMT; ++t) {
#pragma unroll
        for (int c1 = 0; c1 < 2; ++c1) {
          // Keys j_lo .. j_hi of packed row r (visible(): bottom-right aligned window, j < sk).
          const int r = r0 + t * 8 + tq * 2 + c1;
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
    const float* lse_row = rows_f + st * BM;
    const float* di_row = rows_f + (kStages + st) * BM;
#pragma unroll
    for (int t = 0; t < kMT; ++t) {
      const int col = t * 8 + tq * 2;
      const float2 lse = *reinterpret_cast<const float2*>(lse_row + col);
      const float2 di = *reinterpret_cast<const float2*>(di_row + col);
      const float lse2[2] = {lse.x * kLog2e, lse.y * kLog2e};
      const float di_scaled[2] = {di.x * scale, di.y * scale};
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int x = 4 * t + c;
        const float prob = fast_exp2(fmaf(s[x], scale_log2, -lse2[c & 1]));
        s[x] = prob;
        dp[x] = prob * fmaf(dp[x], scale, -di_scaled[c & 1]);
      }
    }
    // P^T and dS^T in 16 bits, grouped as the 16-row A fragments of mma.sync (the accumulators of
    // column tiles 2kk, 2kk+1 hold query rows 16kk..16kk+15).
    uint32_t pa[BM / 16][4], da[BM / 16][4];
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        pa[kk][c] = pack2<T>(s[8 * kk + 2 * c], s[8 * kk + 2 * c + 1]);
        da[kk][c] = pack2<T>(dp[8 * kk + 2 * c], dp[8 * kk + 2 * c + 1]);
      }
    }
    // P^T and dS^T to shared memory (row = key, 64 query rows per 128-byte row block, swizzled):
    // pa / da[kk][c] hold key rows key_row + 8 (c & 1), query rows 16kk + 8 (c >> 1) + 2tq, +1.
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const uint32_t at = sw128_offset(key_row + 8 * (c & 1), 2 * kk + (c >> 1), BN) + 4 * tq;
        st_shared_u32(sP + at, pa[kk][c]);
        st_shared_u32(sdS + at, da[kk][c]);
      }
    }
    fence_proxy_async();
    __syncthreads();  // P^T and dS^T of every warpgroup written

    // dQ (64 x 64 block) = dS K: A = dS^T (MN-major: column block = 64 query rows), B = K
    // (MN-major: column block = 64 head-dim columns); K-step kk covers keys key0 .. key0 + 15.
    constexpr DqSplit kSplit = Cfg::kDqSplit;
    const int dq_row0 = kSplit == DqSplit::kRows ? wg * 64 : 0;
    const int dq_col0 = kSplit == DqSplit::kCols ? wg * 64 : 0;
    float dq[32];
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const uint32_t key0 = kk * 16;
      Wgmma<T, 64>::template ss<1, 1>(dq, sw128_desc(sdS + (dq_row0 / 64) * BN * 128 + key0 * 128, BN * 128),
                                      sw128_desc(sK + (dq_col0 / 64) * BN * 128 + key0 * 128, BN * 128), kk > 0);
    }
    wgmma_commit();
    // dV += P^T dO and dK += dS^T Q, queued behind dQ so that they run while its atomics are issued.
    // K-step kk: A (this warpgroup's 64 key rows) 32 bytes into the rows of column block kk / 4; B
    // 16 rows (2048 bytes) into the tiles, whose column blocks are BM rows apart.
    pin_registers(dv);
    pin_registers(dk);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      const uint32_t a = (kk / 4) * BN * 128 + wg * 64 * 128 + (kk % 4) * 32;
      Wgmma<T, D>::template ss<0, 1>(dv, sw128_desc(sP + a, 16), sw128_desc(cdO + kk * 16 * 128, BM * 128), 1);
    }
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      const uint32_t a = (kk / 4) * BN * 128 + wg * 64 * 128 + (kk % 4) * 32;
      Wgmma<T, D>::template ss<0, 1>(dk, sw128_desc(sdS + a, 16), sw128_desc(cQ + kk * 16 * 128, BM * 128), 1);
    }
    wgmma_commit();
    wgmma_wait<1>();  // dQ done
    pin_registers(dq);
    // dQ into the float32 accumulator, four columns per atomic: lanes 2q and 2q + 1 swap halves, so
    // that the even lane holds row g, the odd one row g + 8, of columns 8t + 4q .. 8t + 4q + 3.
    {
      const bool odd = tq & 1;
      const int r = r0 + dq_row0 + (warp % 4) * 16 + g + (odd ? 8 : 0);
      float* acc = r < rows ? dq_accum_row(p, si, b, gs.row(r), hk * group + gs.head(r)) + dq_col0 : nullptr;
#pragma unroll
      for (int t = 0; t < 8; ++t) {
        const float* c = dq + 4 * t;
        const float y0 = __shfl_xor_sync(0xFFFFFFFFu, odd ? c[0] : c[2], 1);
        const float y1 = __shfl_xor_sync(0xFFFFFFFFu, odd ? c[1] : c[3], 1);
        const int col = t * 8 + (tq >> 1) * 4;
        if (acc != nullptr && dq_col0 + col < p.head_dim) {
          atomic_add4(acc + col, odd ? make_float4(y0, y1, c[2], c[3]) : make_float4(c[0], c[1], y0, y1));
        }
      }
    }
    wgmma_wait<0>();  // dV, dK done: P^T, dS^T and the step's buffers are free
    pin_registers(dv);
    pin_registers(dk);
  }
  cp_async_wait_all();

#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int j = j0 + key_row + 8 * e;
    if (j >= si.sk) continue;
    T* dkp = static_cast<T*>(p.dk) + kv_offset(p, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride, si, b, j, hk);
    T* dvp = static_cast<T*>(p.dv) + kv_offset(p, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride, si, b, j, hk);
#pragma unroll
    for (int t = 0; t < kDT; ++t) {
      const int d = t * 8 + tq * 2;
      if (d < p.head_dim) {
        *reinterpret_cast<uint32_t*>(dkp + d) = pack2<T>(dk[4 * t + 2 * e], dk[4 * t + 2 * e + 1]);
        *reinterpret_cast<uint32_t*>(dvp + d) = pack2<T>(dv[4 * t + 2 * e], dv[4 * t + 2 * e + 1]);
      }
    }
  }
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

template <typename T, int D, typename Cfg>
void launch_bwd_wgmma_config(const BwdArgs& args, cudaStream_t stream) {
  auto kernel = bwd_wgmma_kernel<T, D, Cfg>;
  set_smem(kernel, Cfg::kSmemBytes, "cudaFuncSetAttribute(bwd_wgmma_kernel)");
  launch_fused_bwd<T>(args, kernel, ceil_div(args.p.seqlen_k, Cfg::kBlockN), Cfg::kThreads, Cfg::kSmemBytes,
                      "bwd_wgmma_kernel launch", stream);
}

// Explicitly instantiated once per head-dim bucket (instantiations/flash_bwd_wgmma_hdim*.cu).
template <typename T, int D>
void launch_bwd_wgmma(const BwdArgs& args, cudaStream_t stream) {
  launch_bwd_wgmma_config<T, D, BwdWgmmaConfig<D>>(args, stream);
}

}  // namespace detail
}  // namespace cuda
}  // namespace flash
