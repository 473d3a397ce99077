// Forward attention for the portable CUDA path: one CTA per (query block, KV head, batch[, split]).
//
// Query rows are packed over the GQA group: packed row r of KV head hk is query row i = r / group
// of query head h = hk * group + r % group, so a CTA loads each K/V tile once for all the query
// heads that share it (decode with GQA fills a whole tile from one query row).
//
// Kernels with the same contract: fwd_mma_kernel (tensor cores, flash_fwd_mma.cuh) runs by
// default; on sm90 fwd_wgmma_kernel (hopper/flash_fwd_wgmma.cuh) and, for decode-like calls,
// fwd_decode_tma_kernel (hopper/flash_decode_tma.cuh) run ahead of it for the calls they take
// (choose_fwd_kernel); fwd_kernel (SIMT, fp32 math, the straightforward reference) runs
// when the environment sets FLASH_ATTN_CUDA_SIMT=1. The mma and SIMT kernels cover every feature of
// FlashFwdParams. Split-KV: with num_splits > 1 each split handles a contiguous share of the CTA's
// key blocks and writes its normalized partial output and log-sum-exp (without the sink) to
// out_accum / lse_accum; a combine kernel merges the splits, adds the sink and writes out and
// softmax_lse.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "flash_common.cuh"
#include "flash_api.h"

namespace flash {
namespace cuda {
namespace detail {

// The tensor-core forward (flash_fwd_mma.cuh), instantiated per head dim in instantiations/.
template <typename T, int D>
void launch_fwd_mma(const FwdArgs& args, cudaStream_t stream);
template <typename T, int D>
FwdOccupancy fwd_mma_occupancy(const FwdArgs& args);
// The Hopper forward (hopper/flash_fwd_wgmma.cuh), tile widths 64, 128, 192, 256.
template <typename T, int D>
void launch_fwd_wgmma(const FwdArgs& args, cudaStream_t stream);
template <typename T, int D>
FwdOccupancy fwd_wgmma_occupancy(const FwdArgs& args);
// The Hopper decode (hopper/flash_decode_tma.cuh), tile widths 128, 192, 256; false (nothing
// launched) where the driver gives no TMA tensor maps for the call.
template <typename T, int D>
bool launch_fwd_decode_tma(const FwdArgs& args, cudaStream_t stream);
template <typename T, int D>
FwdOccupancy fwd_decode_tma_occupancy(const FwdArgs& args);

// 1 in the sm_90a code of this library, 0 in every other target's: tells whether the current
// device runs the wgmma kernels (an sm90 device could be running code built for sm80).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ int g_sm90a_code = 1;
#else
__device__ int g_sm90a_code = 0;
#endif

bool hopper_kernels_enabled() {
  const char* hopper = std::getenv("FLASH_ATTN_CUDA_HOPPER");
  if ((hopper != nullptr && hopper[0] == '0') || env_flag("FLASH_ATTN_CUDA_SIMT")) return false;
  return sm90a_code_available();
}

bool sm90a_code_available() {
  static int8_t known[kMaxDevices] = {};  // 0 unknown, 1 yes, -1 no
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  if (device < kMaxDevices && known[device] != 0) return known[device] > 0;
  int major = 0, minor = 0, flag = 0;
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute");
  check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), "cudaDeviceGetAttribute");
  if (major == 9 && minor == 0) {
    check_cuda(cudaMemcpyFromSymbol(&flag, g_sm90a_code, sizeof(int)), "cudaMemcpyFromSymbol(g_sm90a_code)");
  }
  if (device < kMaxDevices) known[device] = flag == 1 ? 1 : -1;
  return flag == 1;
}

namespace {

// Whether a forward call runs on the Hopper kernel: the Hopper kernels are enabled, head dim above
// 32 (run at the next multiple of 64: dispatch_hopper_head_dim), more than 64 packed rows (fewer go
// to the decode kernels), and none of softcap, ALiBi or dropout.
bool hopper_fwd_supported(const FlashFwdParams& p) {
  if (!hopper_kernels_enabled() || p.head_dim <= 32) return false;
  const int group = p.heads_q / p.heads_kv;
  return static_cast<int64_t>(p.seqlen_q) * group > 64 && p.softcap == 0.f && p.alibi_slopes == nullptr &&
         p.dropout_p == 0.f && p.softmax_scale > 0.f;
}

// Whether a forward call runs on the Hopper decode kernel: the Hopper kernels are enabled, 16-bit,
// head dims above 64 (at 64 the key-warps kernel reads as fast: flash_cuda_tune's decode section),
// at most 16 packed rows, none of softcap, ALiBi or dropout, K / V as TMA tensors (base pointers
// and every stride multiples of 16 bytes), paged KV only with pages of 16 keys or more that divide
// or are divided by the 64-key tile, without leftpad_k (a box never crosses a page), and no varlen
// keys without pages (a box could read past the buffer's last row: its row count is not a param).
bool hopper_decode_supported(const FlashFwdParams& p) {
  if (!hopper_kernels_enabled() || p.dtype == DType::kFloat8E4M3 || p.head_dim <= 64) return false;
  const int group = p.heads_q / p.heads_kv;
  if (static_cast<int64_t>(p.seqlen_q) * group > 16 || p.softcap != 0.f || p.alibi_slopes != nullptr ||
      p.dropout_p != 0.f || p.softmax_scale <= 0.f) {
    return false;
  }
  if (p.block_table == nullptr ? p.cu_seqlens_k != nullptr
                               : p.page_size < 16 || (p.page_size % 64 != 0 && 64 % p.page_size != 0) ||
                                     p.leftpad_k != nullptr) {
    return false;
  }
  auto aligned = [](const void* ptr, int64_t batch_stride, int64_t row_stride, int64_t head_stride) {
    constexpr int64_t kElems = 16 / 2;  // 16 bytes of 16-bit elements
    return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && batch_stride % kElems == 0 && row_stride % kElems == 0 &&
           head_stride % kElems == 0;
  };
  return aligned(p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride) &&
         aligned(p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
}

// The forward kernel a call runs on (fwd_kernel_name reports it). FP8 calls have one, the Hopper
// kernel (check_fp8_device).
enum class FwdKernel { kWgmma, kDecode, kMma, kSimt };
FwdKernel choose_fwd_kernel(const FlashFwdParams& p) {
  if (p.dtype == DType::kFloat8E4M3 || hopper_fwd_supported(p)) return FwdKernel::kWgmma;
  if (hopper_decode_supported(p)) return FwdKernel::kDecode;
  return env_flag("FLASH_ATTN_CUDA_SIMT") ? FwdKernel::kSimt : FwdKernel::kMma;
}

template <int D>
constexpr size_t fwd_smem_bytes() {
  return sizeof(uint32_t) * (kBlockM + 2 * kBlockN) * Tile<D>::kPitch + sizeof(float) * kBlockM * (kBlockN + 1);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, kMinBlocks) fwd_kernel(const FwdArgs args) {
  constexpr int kPitch = Tile<D>::kPitch;
  constexpr int kWords = D / 8;  // output words (2 elements) per thread: words quad + 4*k
  extern __shared__ __align__(16) uint32_t smem[];
  uint32_t* sQ = smem;
  uint32_t* sK = sQ + kBlockM * kPitch;
  uint32_t* sV = sK + kBlockN * kPitch;
  float* sP = reinterpret_cast<float*>(sV + kBlockN * kPitch);  // [kBlockM][kBlockN + 1]

  const FlashFwdParams& p = args.p;
  const ScoreArgs& sa = args.s;
  const int b = blockIdx.z;
  const int hk = blockIdx.y / args.num_splits;
  const int split = blockIdx.y % args.num_splits;
  const SeqInfo si = seq_info(p, b);
  const int group = sa.group;
  const int rows = si.sq * group;
  const int r0 = blockIdx.x * kBlockM;
  if (r0 >= rows) return;

  const bool varlen = p.cu_seqlens_q != nullptr;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);

  // Key blocks any row of this tile can see, then this split's share of them.
  const int i_lo = r0 / group;
  const int i_hi = (min(r0 + kBlockM, rows) - 1) / group;
  int j_begin = 0, j_end = si.sk;
  if (sa.window_right >= 0) j_end = min(j_end, i_hi + si.sk - si.sq + sa.window_right + 1);
  if (sa.window_left >= 0) j_begin = max(j_begin, i_lo + si.sk - si.sq - sa.window_left);
  const int n_begin = j_begin / kBlockN;
  const int n_end = j_end > j_begin ? ceil_div(j_end, kBlockN) : n_begin;
  const int per_split = ceil_div(n_end - n_begin, args.num_splits);
  const int n_lo = min(n_end, n_begin + split * per_split);
  const int n_hi = min(n_end, n_lo + per_split);

  const int tid = threadIdx.x;
  const int rl = tid >> 2;  // tile row of this thread
  const int quad = tid & 3;
  const int r = r0 + rl;
  const bool row_ok = r < rows;
  const int i = row_ok ? r / group : 0;
  const int h = hk * group + (row_ok ? r % group : 0);
  const int64_t bh = static_cast<int64_t>(b) * p.heads_q + h;
  const float slope = p.alibi_slopes != nullptr ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.f;

  load_tile<T, D, kBlockM>(sQ, [&](int row) -> const T* {
    const int rr = r0 + row;
    if (rr >= rows) return nullptr;
    return q + q_offset(varlen, p.q_batch_stride, p.q_row_stride, p.q_head_stride, si, b, rr / group,
                        hk * group + rr % group);
  }, p.head_dim);

  float m = neg_inf();  // running max of the modified scores
  float l = 0.f;        // running sum of exp(score - m) (without dropout)
  float acc[kWords][2];
#pragma unroll
  for (int w = 0; w < kWords; ++w) acc[w][0] = acc[w][1] = 0.f;

  for (int n = n_lo; n < n_hi; ++n) {
    const int j0 = n * kBlockN;
    load_tile<T, D, kBlockN>(sK, [&](int row) -> const T* {
      if (j0 + row >= si.sk) return nullptr;
      return k + kv_offset(p, p.k_batch_stride, p.k_row_stride, p.k_head_stride, si, b, j0 + row, hk);
    }, p.head_dim);
    load_tile<T, D, kBlockN>(sV, [&](int row) -> const T* {
      if (j0 + row >= si.sk) return nullptr;
      return v + kv_offset(p, p.v_batch_stride, p.v_row_stride, p.v_head_stride, si, b, j0 + row, hk);
    }, p.head_dim);
    __syncthreads();

    float s[8];
#pragma unroll
    for (int c = 0; c < 8; ++c) s[c] = 0.f;
#pragma unroll 8
    for (int d2 = 0; d2 < D / 2; ++d2) {
      const float2 qv = unpack2<T>(sQ[rl * kPitch + d2]);
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        const float2 kv = unpack2<T>(sK[key_of(quad, c) * kPitch + d2]);
        s[c] = fmaf(qv.x, kv.x, fmaf(qv.y, kv.y, s[c]));
      }
    }

    float tile_max = neg_inf();
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      const int j = j0 + key_of(quad, c);
      if (row_ok && visible(sa, i, j, si.sq, si.sk)) {
        float dcap;
        s[c] = modify_score(sa, s[c] * p.softmax_scale, slope, i, j, si.sq, si.sk, dcap);
      } else {
        s[c] = neg_inf();
      }
      tile_max = fmaxf(tile_max, s[c]);
    }
    tile_max = quad_max(tile_max);
    const float m_new = fmaxf(m, tile_max);
    // A row that has seen no key yet keeps m = -inf; subtracting 0 instead avoids inf - inf.
    const float m_use = m_new == neg_inf() ? 0.f : m_new;
    const float corr = __expf(m - m_use);
    float row_sum = 0.f;
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      s[c] = __expf(s[c] - m_use);
      row_sum += s[c];
    }
    l = l * corr + quad_sum(row_sum);
    m = m_new;
#pragma unroll
    for (int w = 0; w < kWords; ++w) {
      acc[w][0] *= corr;
      acc[w][1] *= corr;
    }
    if (sa.dropout) {
#pragma unroll
      for (int g = 0; g < 2; ++g) {
        bool keep[4];
        dropout_keep4(p, sa, bh, i, j0 + g * 16 + quad * 4, keep);
#pragma unroll
        for (int e = 0; e < 4; ++e) s[g * 4 + e] = keep[e] ? s[g * 4 + e] * sa.drop_scale : 0.f;
      }
    }
#pragma unroll
    for (int c = 0; c < 8; ++c) sP[rl * (kBlockN + 1) + key_of(quad, c)] = s[c];
    __syncthreads();

#pragma unroll 8
    for (int jj = 0; jj < kBlockN; ++jj) {
      const float pj = sP[rl * (kBlockN + 1) + jj];
#pragma unroll
      for (int w = 0; w < kWords; ++w) {
        const float2 vv = unpack2<T>(sV[jj * kPitch + quad + 4 * w]);
        acc[w][0] = fmaf(pj, vv.x, acc[w][0]);
        acc[w][1] = fmaf(pj, vv.y, acc[w][1]);
      }
    }
    __syncthreads();  // sK, sV, sP are overwritten by the next block
  }

  if (!row_ok) return;
  if (args.num_splits > 1) {
    const int64_t row = ((static_cast<int64_t>(split) * p.batch + b) * p.heads_q + h) * p.seqlen_q + i;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    float* oa = p.out_accum + row * p.head_dim;
#pragma unroll
    for (int w = 0; w < kWords; ++w) {
      const int d = 2 * (quad + 4 * w);
      if (d < p.head_dim) *reinterpret_cast<float2*>(oa + d) = make_float2(acc[w][0] * inv, acc[w][1] * inv);
    }
    if (quad == 0) p.lse_accum[row] = l > 0.f ? m + logf(l) : neg_inf();
    return;
  }

  // l == 0 exactly when the row saw no key (the max score contributes exp(0) = 1 otherwise).
  float out_scale, lse;
  if (l == 0.f) {
    out_scale = 0.f;
    lse = pos_inf();
  } else if (p.sinks != nullptr) {
    const float sink = p.sinks[h];
    const float mx = fmaxf(m, sink);
    const float total = l * expf(m - mx) + expf(sink - mx);
    out_scale = expf(m - mx) / total;
    lse = mx + logf(total);
  } else {
    out_scale = 1.f / l;
    lse = m + logf(l);
  }
  T* out = static_cast<T*>(p.out) +
           q_offset(varlen, p.o_batch_stride, p.o_row_stride, p.o_head_stride, si, b, i, h);
#pragma unroll
  for (int w = 0; w < kWords; ++w) {
    const int d = 2 * (quad + 4 * w);
    if (d < p.head_dim) {
      *reinterpret_cast<uint32_t*>(out + d) = pack2<T>(acc[w][0] * out_scale, acc[w][1] * out_scale);
    }
  }
  if (quad == 0 && p.softmax_lse != nullptr) p.softmax_lse[lse_offset(p, si, b, i, h)] = lse;
}

// Merges the splits of one row per warp: lse = log(sum_s exp(lse_s) [+ exp(sink)]),
// out = sum_s exp(lse_s - lse) * out_s. A row no split saw a key in gets out = 0, lse = +inf.
template <typename T>
__global__ void __launch_bounds__(kThreads) combine_kernel(const FwdArgs args) {
  const FlashFwdParams& p = args.p;
  const int b = blockIdx.z;
  const int h = blockIdx.y;
  const int i = blockIdx.x * (kThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const SeqInfo si = seq_info(p, b);
  if (i >= si.sq) return;

  const int64_t split_stride = static_cast<int64_t>(p.batch) * p.heads_q * p.seqlen_q;
  const int64_t row = (static_cast<int64_t>(b) * p.heads_q + h) * p.seqlen_q + i;
  float mx = neg_inf();
  for (int s = 0; s < args.num_splits; ++s) mx = fmaxf(mx, p.lse_accum[s * split_stride + row]);
  const bool seen = mx != neg_inf();
  float lse = pos_inf();
  if (seen) {
    const float sink = p.sinks != nullptr ? p.sinks[h] : neg_inf();
    mx = fmaxf(mx, sink);
    float total = p.sinks != nullptr ? expf(sink - mx) : 0.f;
    for (int s = 0; s < args.num_splits; ++s) total += expf(p.lse_accum[s * split_stride + row] - mx);
    lse = mx + logf(total);
  }
  T* out = static_cast<T*>(p.out) +
           q_offset(p.cu_seqlens_q != nullptr, p.o_batch_stride, p.o_row_stride, p.o_head_stride, si, b, i, h);
  for (int d = 2 * lane; d < p.head_dim; d += 64) {
    float2 o = make_float2(0.f, 0.f);
    if (seen) {
      for (int s = 0; s < args.num_splits; ++s) {
        const float wgt = expf(p.lse_accum[s * split_stride + row] - lse);
        const float2 part = *reinterpret_cast<const float2*>(p.out_accum + (s * split_stride + row) * p.head_dim + d);
        o.x = fmaf(wgt, part.x, o.x);
        o.y = fmaf(wgt, part.y, o.y);
      }
    }
    *reinterpret_cast<uint32_t*>(out + d) = pack2<T>(o.x, o.y);
  }
  if (lane == 0 && p.softmax_lse != nullptr) p.softmax_lse[lse_offset(p, si, b, i, h)] = lse;
}

int device_sm_count() {
  int device = 0, sms = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  return sms;
}

// Split count that fills the device best. Splits pay off where the CTAs of one split leave the
// SMs' slots (SMs x CTAs per SM) under two waves: the smallest count whose wave efficiency (CTAs
// over whole waves) is within 90% of the best, skipping counts that do not shorten the longest split.
int split_heuristic(const FlashFwdParams& p) {
  const int group = p.heads_q / p.heads_kv;
  FwdOccupancy occ{static_cast<int64_t>(ceil_div(p.seqlen_q * group, kBlockM)) * p.heads_kv * p.batch, 1};
  const FwdKernel kernel = choose_fwd_kernel(p);
  if (p.dtype == DType::kFloat8E4M3) {
    const FwdArgs args{p, make_score_args(p), 1};
    dispatch_fp8_head_dim(p.head_dim, [&](auto d) { occ = fwd_wgmma_occupancy<__nv_fp8_e4m3, decltype(d)::value>(args); });
  } else if (kernel != FwdKernel::kSimt) {
    const FwdArgs args{p, make_score_args(p), 1};
    dispatch_dtype(p.dtype, [&](auto t) {
      using T = decltype(t);
      if (kernel == FwdKernel::kWgmma) {
        dispatch_hopper_head_dim(p.head_dim, [&](auto d) { occ = fwd_wgmma_occupancy<T, decltype(d)::value>(args); });
      } else if (kernel == FwdKernel::kDecode) {
        dispatch_hopper_head_dim(p.head_dim, [&](auto d) {
          if constexpr (decltype(d)::value > 64) occ = fwd_decode_tma_occupancy<T, decltype(d)::value>(args);
        });
      } else {
        dispatch_head_dim(p.head_dim, [&](auto d) { occ = fwd_mma_occupancy<T, decltype(d)::value>(args); });
      }
    });
  }
  const int n_blocks = ceil_div(p.seqlen_k, kBlockN);
  const int sms = device_sm_count();
  const int64_t slots = static_cast<int64_t>(sms) * occ.per_sm;
  if (occ.ctas == 0 || n_blocks <= 1 || occ.ctas >= 2 * slots) return 1;
  const int max_splits = std::min({kMaxSplits, sms, n_blocks});
  auto efficiency = [&](int s) {
    const double waves = static_cast<double>(occ.ctas * s) / slots;
    return waves / std::ceil(waves);
  };
  auto useful = [&](int s) { return s == 1 || ceil_div(n_blocks, s) != ceil_div(n_blocks, s - 1); };
  double best = 0.0;
  for (int s = 1; s <= max_splits; ++s) {
    if (useful(s)) best = std::max(best, efficiency(s));
  }
  for (int s = 1; s <= max_splits; ++s) {
    if (useful(s) && efficiency(s) >= 0.9 * best) return s;
  }
  return 1;
}

// Split-KV: merges the splits' partial outputs into out (element type TO).
template <typename TO>
void launch_combine(const FwdArgs& args, cudaStream_t stream) {
  if (args.num_splits <= 1) return;
  const FlashFwdParams& p = args.p;
  const dim3 cgrid(ceil_div(p.seqlen_q, kThreads / 32), p.heads_q, p.batch);
  combine_kernel<TO><<<cgrid, kThreads, 0, stream>>>(args);
  check_launch("combine_kernel launch");
}

template <typename T, int D>
void launch_fwd(const FwdArgs& args, cudaStream_t stream) {
  const FlashFwdParams& p = args.p;
  const int rows = p.seqlen_q * args.s.group;
  const FwdKernel kernel = choose_fwd_kernel(p);
  if (kernel == FwdKernel::kWgmma) {
    dispatch_hopper_head_dim(p.head_dim, [&](auto d) { launch_fwd_wgmma<T, decltype(d)::value>(args, stream); });
  } else if (kernel == FwdKernel::kDecode) {
    bool launched = false;
    dispatch_hopper_head_dim(p.head_dim, [&](auto d) {
      if constexpr (decltype(d)::value > 64) launched = launch_fwd_decode_tma<T, decltype(d)::value>(args, stream);
    });
    if (!launched) launch_fwd_mma<T, D>(args, stream);
  } else if (kernel == FwdKernel::kMma) {
    launch_fwd_mma<T, D>(args, stream);
  } else if (kernel == FwdKernel::kSimt) {
    constexpr size_t smem = fwd_smem_bytes<D>();
    set_smem(fwd_kernel<T, D>, smem, "cudaFuncSetAttribute(fwd_kernel)");
    const dim3 grid(ceil_div(rows, kBlockM), p.heads_kv * args.num_splits, p.batch);
    fwd_kernel<T, D><<<grid, kThreads, smem, stream>>>(args);
    check_launch("fwd_kernel launch");
  }
  launch_combine<T>(args, stream);
}

// FP8 runs on the Hopper kernel only.
void check_fp8_device(const FlashFwdParams& p, const std::string& where) {
  if (p.dtype == DType::kFloat8E4M3 && !sm90a_code_available()) {
    throw_invalid(where, "float8_e4m3 attention needs an sm90 device (H100 / H200) and this library's sm_90a code");
  }
}

// The FP8 forward's copy of V, transposed (fp8_vt_keys): 64 keys x head_dim per CTA through shared
// memory. Position l of every 16 keys holds key (l >> 2) * 2 + (l & 1) + ((l >> 1) & 1) * 8 of
// them, the order in which the S accumulators become P's A fragments (flash_fwd_wgmma.cuh); keys
// past the sequence's are zero.
__global__ void __launch_bounds__(256) fp8_transpose_v_kernel(const FlashFwdParams p) {
  __shared__ __align__(16) uint8_t tile[64][256 + 16];  // [key][head-dim column], rows padded
  const int b = blockIdx.z;
  const int hk = blockIdx.y;
  const int j0 = blockIdx.x * 64;
  const SeqInfo si = seq_info(p, b);
  const uint8_t* v = static_cast<const uint8_t*>(p.v);
  const int chunks = p.head_dim / 16;
  for (int x = threadIdx.x; x < 64 * chunks; x += blockDim.x) {
    const int r = x / chunks, c = x % chunks;
    uint4 w = make_uint4(0u, 0u, 0u, 0u);
    if (j0 + r < si.sk) {
      w = *reinterpret_cast<const uint4*>(
          v + kv_offset(p, p.v_batch_stride, p.v_row_stride, p.v_head_stride, si, b, j0 + r, hk) + c * 16);
    }
    *reinterpret_cast<uint4*>(&tile[r][c * 16]) = w;
  }
  __syncthreads();
  const int vt_keys = fp8_vt_keys(p);
  uint8_t* vt = static_cast<uint8_t*>(p.fp8_scratch) + (static_cast<int64_t>(b) * p.heads_kv + hk) * p.head_dim * vt_keys + j0;
  for (int x = threadIdx.x; x < p.head_dim * 4; x += blockDim.x) {
    const int d = x >> 2, k0 = (x & 3) * 16;  // column d, keys k0 .. k0 + 15
    uint32_t w[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {  // positions 4q .. 4q + 3: keys 2q, 2q + 1, 2q + 8, 2q + 9
      const int k = k0 + 2 * q;
      w[q] = tile[k][d] | (tile[k + 1][d] << 8) | (tile[k + 8][d] << 16) | (static_cast<uint32_t>(tile[k + 9][d]) << 24);
    }
    *reinterpret_cast<uint4*>(vt + static_cast<int64_t>(d) * vt_keys + k0) = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// FP8: V transposed into fp8_scratch, the Hopper kernel, and for splits the combine kernel (which
// writes the bfloat16 output).
void launch_fwd_fp8(const FwdArgs& args, cudaStream_t stream) {
  const FlashFwdParams& p = args.p;
  if (p.seqlen_k > 0) {
    if (p.fp8_scratch == nullptr) throw_invalid("run_fwd", "float8_e4m3 calls need fp8_scratch (fwd_fp8_scratch_bytes)");
    fp8_transpose_v_kernel<<<dim3(fp8_vt_keys(p) / 64, p.heads_kv, p.batch), 256, 0, stream>>>(p);
    check_launch("fp8_transpose_v_kernel launch");
  }
  dispatch_fp8_head_dim(p.head_dim, [&](auto d) { launch_fwd_wgmma<__nv_fp8_e4m3, decltype(d)::value>(args, stream); });
  launch_combine<__nv_bfloat16>(args, stream);
}

}  // namespace
}  // namespace detail

int fwd_num_splits(const FlashFwdParams& params) {
  detail::validate_common(params, "fwd_num_splits");
  detail::check_fp8_device(params, "fwd_num_splits");
  if (params.num_splits < 0 || params.num_splits > detail::kMaxSplits) {
    detail::throw_invalid("fwd_num_splits", "num_splits must be in [0, " + std::to_string(detail::kMaxSplits) +
                                                "], got " + std::to_string(params.num_splits));
  }
  if (params.num_splits > 0) return params.num_splits;
  return detail::split_heuristic(params);
}

size_t fwd_workspace_bytes(const FlashFwdParams& params) {
  const int splits = fwd_num_splits(params);
  if (splits <= 1) return 0;
  const size_t rows = static_cast<size_t>(splits) * params.batch * params.heads_q * params.seqlen_q;
  return rows * (static_cast<size_t>(params.head_dim) + 1) * sizeof(float);
}

size_t fwd_fp8_scratch_bytes(const FlashFwdParams& params) {
  if (params.dtype != DType::kFloat8E4M3) return 0;
  return static_cast<size_t>(params.batch) * params.heads_kv * params.head_dim * detail::fp8_vt_keys(params);
}

const char* fwd_kernel_name(const FlashFwdParams& params) {
  detail::validate_common(params, "fwd_kernel_name");
  switch (detail::choose_fwd_kernel(params)) {
    case detail::FwdKernel::kWgmma: return "wgmma";
    case detail::FwdKernel::kDecode: return "decode";
    case detail::FwdKernel::kSimt: return "simt";
    default: return "mma";
  }
}

void run_fwd(const FlashFwdParams& params, void* stream) {
  using namespace detail;
  int splits = fwd_num_splits(params);
  if (splits > 1 && (params.out_accum == nullptr || params.lse_accum == nullptr)) {
    // The heuristic's choice is an optimization; an explicit request needs its buffers.
    if (params.num_splits > 1) {
      throw_invalid("run_fwd", "num_splits=" + std::to_string(params.num_splits) +
                                   " needs out_accum and lse_accum (shapes in flash_params.h)");
    }
    splits = 1;
  }
  if (static_cast<int64_t>(params.heads_kv) * splits > 65535) {
    throw_invalid("run_fwd", "heads_kv * num_splits must be <= 65535, got " +
                                 std::to_string(static_cast<int64_t>(params.heads_kv) * splits));
  }
  if (params.batch == 0 || params.seqlen_q == 0) return;
  FwdArgs args{params, make_score_args(params), splits};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (params.dtype == DType::kFloat8E4M3) return launch_fwd_fp8(args, s);
  dispatch_dtype(params.dtype, [&](auto t) {
    using T = decltype(t);
    dispatch_head_dim(params.head_dim, [&](auto d) { launch_fwd<T, decltype(d)::value>(args, s); });
  });
}

}  // namespace cuda
}  // namespace flash
