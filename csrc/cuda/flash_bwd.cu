// Backward attention for the portable CUDA path:
//   1. dot_do_o_kernel   Di = rowsum(dO_i * O_i) per (b, h, i), float32 in the workspace; zeroes
//                        the float32 dQ accumulator of the fused kernels (3, 4) in the same pass.
//   2. dsinks_kernel     dsink_h = -sum_{b,i} exp(sink_h - lse_i) * Di, one CTA per head, fixed order.
//   3. on sm90, the Hopper kernel (hopper/flash_bwd_wgmma.cuh) for the calls it takes
//      (hopper_bwd_supported): one wgmma pass per key block that adds dQ into a float32
//      accumulator by bulk reductions (cp.reduce.async.bulk; 8-byte atomics at head dim 256).
//   4. the tensor-core kernels (flash_bwd_mma.cuh) for calls without dropout: by default one pass
//      per key block that accumulates dQ with float32 atomics; deterministic calls (and SIMT)
//      take dQ and dK/dV from two kernels without atomics, bit-identical from run to run.
//   5. otherwise the SIMT kernels:
//      dq_kernel         one CTA per (packed query block, KV head, batch) walks the key blocks:
//                        dQ_i = scale * sum_j dS_ij * cap'_ij * K_j.
//      dkdv_kernel       one CTA per (key block, KV head, batch) walks the packed query rows of every
//                        query head of the KV group, so dK / dV are summed over the group in registers:
//                        dV_j = sum_i Z_ij P_ij dO_i,  dK_j = scale * sum_i dS_ij * cap'_ij * Q_i.
// with P_ij = exp(s_ij - lse_i) recomputed from softmax_lse, Z_ij = keep / (1 - p) (dropout),
// dP_ij = Z_ij * dO_i . V_j, dS_ij = P_ij (dP_ij - Di) and cap' = 1 - tanh^2 the softcap derivative.
// Query rows are packed over the GQA group as in the forward (flash_fwd.cu). FLASH_ATTN_CUDA_SIMT=1
// forces the SIMT kernels, FLASH_ATTN_CUDA_HOPPER=0 keeps sm90 devices on the sm80-class ones.
#include "flash_common.cuh"
#include "flash_api.h"

namespace flash {
namespace cuda {
namespace detail {

// The tensor-core backward (flash_bwd_mma.cuh), instantiated per head dim in instantiations/, and
// whether it covers a call.
template <typename T, int D>
void launch_bwd_mma(const BwdArgs& args, cudaStream_t stream);
template <int D>
bool bwd_mma_covers(const FlashBwdParams& p);
// The Hopper backward (hopper/flash_bwd_wgmma.cuh), tile widths 64, 128 and 256.
template <typename T, int D>
void launch_bwd_wgmma(const BwdArgs& args, cudaStream_t stream);

namespace {

// Whether a backward call runs on the Hopper kernel: the Hopper kernels are enabled, head dim in
// (32, 256] (run at 64, 128 or 256: launch_bwd), and a fused call (not deterministic, no dropout)
// without softcap or ALiBi, with softmax_scale > 0 (masked scores are -inf).
bool hopper_bwd_supported(const FlashBwdParams& p) {
  if (!hopper_kernels_enabled() || p.head_dim <= 32 || p.head_dim > 256) return false;
  return bwd_fused_dq(p) && p.softcap == 0.f && p.alibi_slopes == nullptr && p.softmax_scale > 0.f;
}

// The backward kernels a call runs on (bwd_kernel_name reports it).
enum class BwdKernel { kWgmma, kMma, kSimt };
BwdKernel choose_bwd_kernel(const FlashBwdParams& p) {
  if (env_flag("FLASH_ATTN_CUDA_SIMT")) return BwdKernel::kSimt;
  if (hopper_bwd_supported(p)) return BwdKernel::kWgmma;
  bool mma = false;
  dispatch_head_dim(p.head_dim, [&](auto d) { mma = bwd_mma_covers<decltype(d)::value>(p); });
  return mma ? BwdKernel::kMma : BwdKernel::kSimt;
}

// Lanes per row of dot_do_o_kernel: one 16-byte chunk (8 elements) each, the row's chunk count
// rounded up to a power of two, at most a warp.
__host__ __device__ inline int di_lanes(int head_dim) {
  int lanes = 1;
  while (lanes < 32 && lanes * 8 < head_dim) lanes *= 2;
  return lanes;
}

// Di for 32 / di_lanes rows per warp, by 16-byte loads (a warp per row of 4-byte loads left a
// head-dim-64 call at a third of the copy bandwidth); and, in the same pass, zeroes the fused
// backward's float32 dQ accumulator: `zero4` 16-byte chunks from `zero`, an even share per CTA.
template <typename T>
__global__ void __launch_bounds__(kThreads) dot_do_o_kernel(const BwdArgs args, float4* zero, int64_t zero4) {
  const int64_t ctas = static_cast<int64_t>(gridDim.x) * gridDim.y * gridDim.z;
  const int64_t cta = (static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  const int64_t share = (zero4 + ctas - 1) / ctas;
  const int64_t zero_end = min(zero4, (cta + 1) * share);
  for (int64_t c = cta * share + threadIdx.x; c < zero_end; c += kThreads) zero[c] = make_float4(0.f, 0.f, 0.f, 0.f);

  const FlashBwdParams& p = args.p;
  const int b = blockIdx.z;
  const int h = blockIdx.y;
  const int lanes = di_lanes(p.head_dim);
  const int lane = threadIdx.x % 32;
  const int i = (blockIdx.x * (kThreads / 32) + threadIdx.x / 32) * (32 / lanes) + lane / lanes;
  const SeqInfo si = seq_info(p, b);
  const bool ok = i < si.sq;
  float sum = 0.f;
  if (ok) {
    const bool varlen = p.cu_seqlens_q != nullptr;
    const T* o = static_cast<const T*>(p.out) + q_offset(varlen, p.o_batch_stride, p.o_row_stride, p.o_head_stride, si, b, i, h);
    const T* dout =
        static_cast<const T*>(p.dout) + q_offset(varlen, p.do_batch_stride, p.do_row_stride, p.do_head_stride, si, b, i, h);
    for (int d = 8 * (lane % lanes); d < p.head_dim; d += 8 * lanes) {
      const uint4 a = *reinterpret_cast<const uint4*>(o + d);
      const uint4 g = *reinterpret_cast<const uint4*>(dout + d);
      const uint32_t aw[4] = {a.x, a.y, a.z, a.w}, gw[4] = {g.x, g.y, g.z, g.w};
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const float2 x = unpack2<T>(aw[w]), y = unpack2<T>(gw[w]);
        sum = fmaf(x.x, y.x, fmaf(x.y, y.y, sum));
      }
    }
  }
  for (int off = lanes / 2; off > 0; off >>= 1) sum += __shfl_xor_sync(0xFFFFFFFFu, sum, off);
  if (ok && lane % lanes == 0) p.workspace[di_offset(p, b, h, i)] = sum;
}

// dsinks[h] (overwritten, not accumulated). Each thread sums a fixed subset of rows in a fixed
// order and the block reduces in a fixed tree, so the result is bit-reproducible.
__global__ void __launch_bounds__(256) dsinks_kernel(const BwdArgs args) {
  const FlashBwdParams& p = args.p;
  const int h = blockIdx.x;
  const float sink = p.sinks[h];
  float sum = 0.f;
  for (int b = 0; b < p.batch; ++b) {
    const SeqInfo si = seq_info(p, b);
    for (int i = threadIdx.x; i < si.sq; i += blockDim.x) {
      // lse = +inf (the row saw no key) gives exp(-inf) = 0.
      sum += __expf(sink - p.softmax_lse[lse_offset(p, si, b, i, h)]) * p.workspace[di_offset(p, b, h, i)];
    }
  }
  __shared__ float partial[256];
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = 128; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) p.dsinks[h] = -partial[0];
}

// Per-row state of a packed query row: the row, its head, and what the backward needs of it.
struct RowState {
  bool ok;
  int i, h;
  int64_t bh;
  float lse, di, slope;
};

__device__ __forceinline__ RowState row_state(const FlashBwdParams& p, const SeqInfo& si, int b, int hk, int group,
                                              int r) {
  RowState rs;
  rs.ok = r < si.sq * group;
  rs.i = rs.ok ? r / group : 0;
  rs.h = hk * group + (rs.ok ? r % group : 0);
  rs.bh = static_cast<int64_t>(b) * p.heads_q + rs.h;
  rs.lse = rs.ok ? p.softmax_lse[lse_offset(p, si, b, rs.i, rs.h)] : 0.f;
  rs.di = rs.ok ? p.workspace[di_offset(p, b, rs.h, rs.i)] : 0.f;
  rs.slope = p.alibi_slopes != nullptr ? p.alibi_slopes[b * p.alibi_batch_stride + rs.h] : 0.f;
  return rs;
}

// For the 8 keys of this thread (key_of) of the key block starting at j0: s = Q_r . K_j and
// dp = dO_r . V_j from the tiles, then pz = Z * P (for dV) and ds = scale * cap' * P (Z dp - Di)
// (for dQ and dK).
template <typename T, int D>
__device__ __forceinline__ void probs_and_grads(const BwdArgs& args, const SeqInfo& si, const RowState& rs,
                                                const uint32_t* sQ, const uint32_t* sdO, const uint32_t* sK,
                                                const uint32_t* sV, int rl, int quad, int j0, float pz[8],
                                                float ds[8]) {
  constexpr int kPitch = Tile<D>::kPitch;
  const FlashBwdParams& p = args.p;
  const ScoreArgs& sa = args.s;
  float s[8], dp[8];
#pragma unroll
  for (int c = 0; c < 8; ++c) s[c] = dp[c] = 0.f;
#pragma unroll 8
  for (int d2 = 0; d2 < D / 2; ++d2) {
    const float2 qv = unpack2<T>(sQ[rl * kPitch + d2]);
    const float2 gv = unpack2<T>(sdO[rl * kPitch + d2]);
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      const int key = key_of(quad, c);
      const float2 kv = unpack2<T>(sK[key * kPitch + d2]);
      const float2 vv = unpack2<T>(sV[key * kPitch + d2]);
      s[c] = fmaf(qv.x, kv.x, fmaf(qv.y, kv.y, s[c]));
      dp[c] = fmaf(gv.x, vv.x, fmaf(gv.y, vv.y, dp[c]));
    }
  }
  bool keep[8];
#pragma unroll
  for (int c = 0; c < 8; ++c) keep[c] = true;
  if (sa.dropout) {
    dropout_keep4(p, sa, rs.bh, rs.i, j0 + quad * 4, keep);
    dropout_keep4(p, sa, rs.bh, rs.i, j0 + 16 + quad * 4, keep + 4);
  }
#pragma unroll
  for (int c = 0; c < 8; ++c) {
    const int j = j0 + key_of(quad, c);
    float prob = 0.f, dcap = 1.f;
    if (rs.ok && visible(sa, rs.i, j, si.sq, si.sk)) {
      const float x = modify_score(sa, s[c] * p.softmax_scale, rs.slope, rs.i, j, si.sq, si.sk, dcap);
      prob = __expf(x - rs.lse);
    }
    const float z = keep[c] ? sa.drop_scale : 0.f;
    pz[c] = prob * z;
    ds[c] = prob * (z * dp[c] - rs.di) * dcap * p.softmax_scale;
  }
}

template <int D>
constexpr size_t dq_smem_bytes() {
  return sizeof(uint32_t) * 2 * (kBlockM + kBlockN) * Tile<D>::kPitch + sizeof(float) * kBlockM * (kBlockN + 1);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, kMinBlocks) dq_kernel(const BwdArgs args) {
  constexpr int kPitch = Tile<D>::kPitch;
  constexpr int kWords = D / 8;
  extern __shared__ __align__(16) uint32_t smem[];
  uint32_t* sQ = smem;
  uint32_t* sdO = sQ + kBlockM * kPitch;
  uint32_t* sK = sdO + kBlockM * kPitch;
  uint32_t* sV = sK + kBlockN * kPitch;
  float* sdS = reinterpret_cast<float*>(sV + kBlockN * kPitch);  // [kBlockM][kBlockN + 1]

  const FlashBwdParams& p = args.p;
  const ScoreArgs& sa = args.s;
  const int b = blockIdx.z;
  const int hk = blockIdx.y;
  const SeqInfo si = seq_info(p, b);
  const int group = sa.group;
  const int rows = si.sq * group;
  const int r0 = blockIdx.x * kBlockM;
  if (r0 >= rows) return;
  const bool varlen = p.cu_seqlens_q != nullptr;

  const int i_lo = r0 / group;
  const int i_hi = (min(r0 + kBlockM, rows) - 1) / group;
  int j_begin = 0, j_end = si.sk;
  if (sa.window_right >= 0) j_end = min(j_end, i_hi + si.sk - si.sq + sa.window_right + 1);
  if (sa.window_left >= 0) j_begin = max(j_begin, i_lo + si.sk - si.sq - sa.window_left);
  const int n_begin = j_begin / kBlockN;
  const int n_end = j_end > j_begin ? ceil_div(j_end, kBlockN) : n_begin;

  const int tid = threadIdx.x;
  const int rl = tid >> 2;
  const int quad = tid & 3;
  const RowState rs = row_state(p, si, b, hk, group, r0 + rl);

  auto q_rows = [&](const void* base, int64_t bs, int64_t rst, int64_t hs) {
    return [=, &si](int row) -> const T* {
      const int rr = r0 + row;
      if (rr >= rows) return nullptr;
      return static_cast<const T*>(base) + q_offset(varlen, bs, rst, hs, si, b, rr / group, hk * group + rr % group);
    };
  };
  load_tile<T, D, kBlockM>(sQ, q_rows(p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride), p.head_dim);
  load_tile<T, D, kBlockM>(sdO, q_rows(p.dout, p.do_batch_stride, p.do_row_stride, p.do_head_stride), p.head_dim);

  float acc[kWords][2];
#pragma unroll
  for (int w = 0; w < kWords; ++w) acc[w][0] = acc[w][1] = 0.f;

  for (int n = n_begin; n < n_end; ++n) {
    const int j0 = n * kBlockN;
    auto k_rows = [&](const void* base, int64_t bs, int64_t rst, int64_t hs) {
      return [=, &si, &p](int row) -> const T* {
        if (j0 + row >= si.sk) return nullptr;
        return static_cast<const T*>(base) + kv_offset(p, bs, rst, hs, si, b, j0 + row, hk);
      };
    };
    load_tile<T, D, kBlockN>(sK, k_rows(p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride), p.head_dim);
    load_tile<T, D, kBlockN>(sV, k_rows(p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride), p.head_dim);
    __syncthreads();

    float pz[8], ds[8];
    probs_and_grads<T, D>(args, si, rs, sQ, sdO, sK, sV, rl, quad, j0, pz, ds);
#pragma unroll
    for (int c = 0; c < 8; ++c) sdS[rl * (kBlockN + 1) + key_of(quad, c)] = ds[c];
    __syncthreads();

#pragma unroll 8
    for (int jj = 0; jj < kBlockN; ++jj) {
      const float g = sdS[rl * (kBlockN + 1) + jj];
#pragma unroll
      for (int w = 0; w < kWords; ++w) {
        const float2 kv = unpack2<T>(sK[jj * kPitch + quad + 4 * w]);
        acc[w][0] = fmaf(g, kv.x, acc[w][0]);
        acc[w][1] = fmaf(g, kv.y, acc[w][1]);
      }
    }
    __syncthreads();
  }

  if (!rs.ok) return;
  T* dq = static_cast<T*>(p.dq) + q_offset(varlen, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride, si, b, rs.i, rs.h);
#pragma unroll
  for (int w = 0; w < kWords; ++w) {
    const int d = 2 * (quad + 4 * w);
    if (d < p.head_dim) *reinterpret_cast<uint32_t*>(dq + d) = pack2<T>(acc[w][0], acc[w][1]);
  }
}

template <int D>
constexpr size_t dkdv_smem_bytes() {
  return sizeof(uint32_t) * 2 * (kBlockM + kBlockN) * Tile<D>::kPitch + sizeof(float) * 2 * kBlockM * (kBlockN + 1);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, kMinBlocks) dkdv_kernel(const BwdArgs args) {
  constexpr int kPitch = Tile<D>::kPitch;
  constexpr int kWords = D / 8;
  extern __shared__ __align__(16) uint32_t smem[];
  uint32_t* sK = smem;
  uint32_t* sV = sK + kBlockN * kPitch;
  uint32_t* sQ = sV + kBlockN * kPitch;
  uint32_t* sdO = sQ + kBlockM * kPitch;
  float* sP = reinterpret_cast<float*>(sdO + kBlockM * kPitch);  // [kBlockM][kBlockN + 1], Z * P
  float* sdS = sP + kBlockM * (kBlockN + 1);                      // [kBlockM][kBlockN + 1]

  const FlashBwdParams& p = args.p;
  const ScoreArgs& sa = args.s;
  const int b = blockIdx.z;
  const int hk = blockIdx.y;
  const int j0 = blockIdx.x * kBlockN;
  const SeqInfo si = seq_info(p, b);
  const int group = sa.group;
  const int rows = si.sq * group;
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int tid = threadIdx.x;

  zero_unused_key_rows<T>(p, si, b, hk, j0, kBlockN);
  if (j0 >= si.sk) return;

  auto k_rows = [&](const void* base, int64_t bs, int64_t rst, int64_t hs) {
    return [=, &si, &p](int row) -> const T* {
      if (j0 + row >= si.sk) return nullptr;
      return static_cast<const T*>(base) + kv_offset(p, bs, rst, hs, si, b, j0 + row, hk);
    };
  };
  load_tile<T, D, kBlockN>(sK, k_rows(p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride), p.head_dim);
  load_tile<T, D, kBlockN>(sV, k_rows(p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride), p.head_dim);

  // Query rows that can see a key of this block, as packed rows [r_begin, r_end).
  const int j_last = min(si.sk, j0 + kBlockN) - 1;
  int i_lo = 0, i_hi = si.sq - 1;
  if (sa.window_right >= 0) i_lo = max(i_lo, j0 - (si.sk - si.sq) - sa.window_right);
  if (sa.window_left >= 0) i_hi = min(i_hi, j_last - (si.sk - si.sq) + sa.window_left);
  const int m_begin = i_lo <= i_hi ? i_lo * group / kBlockM : 0;
  const int m_end = i_lo <= i_hi ? ceil_div((i_hi + 1) * group, kBlockM) : 0;

  const int rl = tid >> 2;  // query row of the S tile / key row of the accumulators
  const int quad = tid & 3;
  float dk[kWords][2], dv[kWords][2];
#pragma unroll
  for (int w = 0; w < kWords; ++w) dk[w][0] = dk[w][1] = dv[w][0] = dv[w][1] = 0.f;

  for (int mb = m_begin; mb < m_end; ++mb) {
    const int r0 = mb * kBlockM;
    auto q_rows = [&](const void* base, int64_t bs, int64_t rst, int64_t hs) {
      return [=, &si](int row) -> const T* {
        const int rr = r0 + row;
        if (rr >= rows) return nullptr;
        return static_cast<const T*>(base) + q_offset(varlen, bs, rst, hs, si, b, rr / group, hk * group + rr % group);
      };
    };
    load_tile<T, D, kBlockM>(sQ, q_rows(p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride), p.head_dim);
    load_tile<T, D, kBlockM>(sdO, q_rows(p.dout, p.do_batch_stride, p.do_row_stride, p.do_head_stride), p.head_dim);
    const RowState rs = row_state(p, si, b, hk, group, r0 + rl);
    __syncthreads();

    float pz[8], ds[8];
    probs_and_grads<T, D>(args, si, rs, sQ, sdO, sK, sV, rl, quad, j0, pz, ds);
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      sP[rl * (kBlockN + 1) + key_of(quad, c)] = pz[c];
      sdS[rl * (kBlockN + 1) + key_of(quad, c)] = ds[c];
    }
    __syncthreads();

#pragma unroll 8
    for (int rr = 0; rr < kBlockM; ++rr) {
      const float pr = sP[rr * (kBlockN + 1) + rl];
      const float gr = sdS[rr * (kBlockN + 1) + rl];
#pragma unroll
      for (int w = 0; w < kWords; ++w) {
        const float2 go = unpack2<T>(sdO[rr * kPitch + quad + 4 * w]);
        const float2 qv = unpack2<T>(sQ[rr * kPitch + quad + 4 * w]);
        dv[w][0] = fmaf(pr, go.x, dv[w][0]);
        dv[w][1] = fmaf(pr, go.y, dv[w][1]);
        dk[w][0] = fmaf(gr, qv.x, dk[w][0]);
        dk[w][1] = fmaf(gr, qv.y, dk[w][1]);
      }
    }
    __syncthreads();
  }

  const int j = j0 + rl;
  if (j >= si.sk) return;
  T* dkp = static_cast<T*>(p.dk) + kv_offset(p, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride, si, b, j, hk);
  T* dvp = static_cast<T*>(p.dv) + kv_offset(p, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride, si, b, j, hk);
#pragma unroll
  for (int w = 0; w < kWords; ++w) {
    const int d = 2 * (quad + 4 * w);
    if (d < p.head_dim) {
      *reinterpret_cast<uint32_t*>(dkp + d) = pack2<T>(dk[w][0], dk[w][1]);
      *reinterpret_cast<uint32_t*>(dvp + d) = pack2<T>(dv[w][0], dv[w][1]);
    }
  }
}

template <typename T, int D>
void launch_bwd(const BwdArgs& args, cudaStream_t stream) {
  const FlashBwdParams& p = args.p;
  // With seqlen_q == 0 only the dK/dV kernel (zero gradients) and the sink kernel (zero) run.
  const BwdKernel kernel = choose_bwd_kernel(p);
  if (p.seqlen_q > 0) {
    // The fused tensor-core kernels add dQ into a float32 accumulator that starts at zero.
    const bool accum = kernel != BwdKernel::kSimt && bwd_fused_dq(p);
    const int rows = (kThreads / 32) * (32 / di_lanes(p.head_dim));
    const dim3 grid(ceil_div(p.seqlen_q, rows), p.heads_q, p.batch);
    dot_do_o_kernel<T><<<grid, kThreads, 0, stream>>>(args, accum ? reinterpret_cast<float4*>(dq_accum(p)) : nullptr,
                                                      accum ? dq_accum_floats(p) / 4 : 0);
    check_launch("dot_do_o_kernel launch");
  }
  if (p.sinks != nullptr && p.dsinks != nullptr) {
    dsinks_kernel<<<p.heads_q, 256, 0, stream>>>(args);
    check_launch("dsinks_kernel launch");
  }
  switch (kernel) {
    case BwdKernel::kWgmma:  // head dims 33..256 (hopper_bwd_supported), at the next tile width
      if (p.head_dim <= 64) {
        launch_bwd_wgmma<T, 64>(args, stream);
      } else if (p.head_dim <= 128) {
        launch_bwd_wgmma<T, 128>(args, stream);
      } else {
        launch_bwd_wgmma<T, 256>(args, stream);
      }
      return;
    case BwdKernel::kMma:
      launch_bwd_mma<T, D>(args, stream);
      return;
    case BwdKernel::kSimt:
      break;
  }
  if (p.seqlen_q > 0) {
    constexpr size_t smem = dq_smem_bytes<D>();
    set_smem(dq_kernel<T, D>, smem, "cudaFuncSetAttribute(dq_kernel)");
    const dim3 grid(ceil_div(p.seqlen_q * args.s.group, kBlockM), p.heads_kv, p.batch);
    dq_kernel<T, D><<<grid, kThreads, smem, stream>>>(args);
    check_launch("dq_kernel launch");
  }
  if (p.seqlen_k > 0) {
    constexpr size_t smem = dkdv_smem_bytes<D>();
    set_smem(dkdv_kernel<T, D>, smem, "cudaFuncSetAttribute(dkdv_kernel)");
    const dim3 grid(ceil_div(p.seqlen_k, kBlockN), p.heads_kv, p.batch);
    dkdv_kernel<T, D><<<grid, kThreads, smem, stream>>>(args);
    check_launch("dkdv_kernel launch");
  }
}

void validate_bwd(const FlashBwdParams& p) {
  const std::string where = "run_bwd";
  validate_common(p, where);
  auto need = [&](bool ok, const std::string& what) {
    if (!ok) throw_invalid(where, what);
  };
  const bool has_q = p.batch > 0 && p.seqlen_q > 0;
  const bool has_k = p.batch > 0 && p.seqlen_k > 0;
  need(!has_q || (p.dout != nullptr && p.dq != nullptr), "dout and dq must be set");
  need(!has_k || (p.dk != nullptr && p.dv != nullptr), "dk and dv must be set");
  need(aligned16(p.dout) && aligned16(p.dq) && aligned16(p.dk) && aligned16(p.dv),
       "dout, dq, dk and dv must be 16-byte aligned");
  const int64_t strides[] = {p.do_batch_stride, p.do_row_stride, p.do_head_stride, p.dq_batch_stride,
                             p.dq_row_stride,   p.dq_head_stride, p.dk_batch_stride, p.dk_row_stride,
                             p.dk_head_stride, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride};
  for (int64_t s : strides) {
    need(s % 8 == 0, "dout/dq/dk/dv strides must be multiples of 8 elements (16 bytes), got " + std::to_string(s));
  }
  need(!has_q || p.softmax_lse != nullptr, "softmax_lse (from the forward) must be set");
  need(p.block_table == nullptr && p.cache_batch_idx == nullptr,
       "the backward does not support block_table or cache_batch_idx (KV-cache inference only)");
  const size_t needed = bwd_workspace_bytes(p);
  need(needed == 0 || p.workspace != nullptr,
       "workspace must be set (" + std::to_string(needed) + " bytes, see bwd_workspace_bytes)");
}

}  // namespace
}  // namespace detail

size_t bwd_workspace_bytes(const FlashBwdParams& params) {
  // Di per (batch, head, query row), padded to max seqlen_q for varlen; then the fused backward's
  // float32 dQ.
  const size_t dq = detail::bwd_fused_dq(params) ? static_cast<size_t>(detail::dq_accum_floats(params)) : 0;
  return (static_cast<size_t>(detail::di_floats(params)) + dq) * sizeof(float);
}

const char* bwd_kernel_name(const FlashBwdParams& params) {
  detail::validate_common(params, "bwd_kernel_name");
  switch (detail::choose_bwd_kernel(params)) {
    case detail::BwdKernel::kWgmma: return "wgmma";
    case detail::BwdKernel::kMma: return "mma";
    default: return "simt";
  }
}

void run_bwd(const FlashBwdParams& params, void* stream) {
  using namespace detail;
  validate_bwd(params);
  if (params.batch == 0) return;
  BwdArgs args{params, make_score_args(params)};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  dispatch_dtype(params.dtype, [&](auto t) {
    using T = decltype(t);
    dispatch_head_dim(params.head_dim, [&](auto d) { launch_bwd<T, decltype(d)::value>(args, s); });
  });
}

}  // namespace cuda
}  // namespace flash
