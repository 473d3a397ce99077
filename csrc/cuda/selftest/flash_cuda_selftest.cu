// Standalone GPU self-test of the CUDA kernels against a float64 reference written from the
// contracts (flash_params.h, philox.h, flash_common.cuh's key positions), without torch or the
// binding: it tells a kernel bug from a binding bug in seconds. Not part of the build.
//
//   nvcc -std=c++17 -O2 --expt-relaxed-constexpr -arch=sm_90a -I csrc csrc/cuda/selftest/flash_cuda_selftest.cu \
//        csrc/cuda/flash_fwd.cu csrc/cuda/flash_bwd.cu csrc/cuda/instantiations/*.cu -o /tmp/flash_selftest
//   /tmp/flash_selftest            # every case; exit status 1 when one fails
//   FLASH_SELFTEST_ONLY=wgmma /tmp/flash_selftest   # the cases whose name contains "wgmma" (or a|b: either)
// (ci/gpu-kernel-check.sh builds it one object per translation unit in parallel and runs it.)
//
// Each forward case runs on the SIMT kernel (FLASH_ATTN_CUDA_SIMT=1), the sm80-class tensor-core kernel
// (FLASH_ATTN_CUDA_HOPPER=0) and, where it takes the call on this device, the Hopper kernel; each
// backward case on the SIMT kernels and, where they apply, the tensor-core ones (the default).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "check_cuda.h"
#include "flash_api.h"
#include "flash_params.h"
#include "philox.h"

namespace {

using flash::DType;

// Element bits of q / k / v in dtype dt (FP8: one byte, in the low bits), and of out (bfloat16 for FP8).
uint16_t to_bits(float x, DType dt) {
  if (dt == DType::kFloat8E4M3) return __nv_fp8_e4m3(x).__x;
  if (dt == DType::kFloat16) return __half_as_ushort(__float2half_rn(x));
  return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}
float from_bits(uint16_t b, DType dt) {
  if (dt == DType::kFloat8E4M3) {
    __nv_fp8_e4m3 f;
    f.__x = static_cast<__nv_fp8_storage_t>(b);
    return static_cast<float>(f);
  }
  if (dt == DType::kFloat16) return __half2float(__ushort_as_half(b));
  return __bfloat162float(__ushort_as_bfloat16(b));
}
DType out_dtype(DType dt) { return dt == DType::kFloat8E4M3 ? DType::kBFloat16 : dt; }
const char* dtype_label(DType dt) {
  return dt == DType::kFloat8E4M3 ? "fp8" : dt == DType::kFloat16 ? "fp16" : "bf16";
}

struct Case {
  std::string name;
  DType dtype = DType::kBFloat16;
  int batch = 1, hq = 1, hkv = 1, d = 64;
  std::vector<int> sq, sk;  // per sequence: query rows, stored key rows
  bool varlen = false;
  bool causal = false;
  int wl = -1, wr = -1;
  float softcap = 0.f;
  int alibi = 0;  // 0 off, 1 per head, 2 per (batch, head)
  float dropout = 0.f;
  bool sinks = false;
  std::vector<int> seqused, leftpad;  // empty: not given
  int page_size = 0;                  // > 0: paged KV through a shuffled block table
  bool cache_batch_idx = false;       // sequence b reads cache row batch - 1 - b
  int num_splits = 1;                 // 0: heuristic
  bool bwd = true;
  bool fp8 = false;  // also run the FP8 forward (head dims that are multiples of 16)
};

struct Host {
  std::vector<float> q, k, v, dout, alibi, sinks;
  std::vector<int32_t> cu_q, cu_k, block_table, cache_idx;
  int total_q = 0, cap_k = 0, kv_rows = 0, max_pages = 0, num_pages = 0;
  int max_sq = 0, max_sk = 0;
};

// Where sequence b's cache position pos lives in the k / v buffers (elements, head 0).
int64_t kv_index(const Case& c, const Host& h, int b, int pos) {
  const int64_t row_elems = static_cast<int64_t>(c.hkv) * c.d;
  if (c.page_size > 0) {
    const int page = h.block_table[b * h.max_pages + pos / c.page_size];
    return (static_cast<int64_t>(page) * c.page_size + pos % c.page_size) * row_elems;
  }
  if (c.varlen) return (h.cu_k[b] + pos) * row_elems;
  const int kb = c.cache_batch_idx ? h.cache_idx[b] : b;
  return (static_cast<int64_t>(kb) * h.cap_k + pos) * row_elems;
}
int64_t q_index(const Case& c, const Host& h, int b, int i) {
  const int64_t row_elems = static_cast<int64_t>(c.hq) * c.d;
  return c.varlen ? (h.cu_q[b] + i) * row_elems : (static_cast<int64_t>(b) * h.max_sq + i) * row_elems;
}

struct Ref {
  std::vector<double> out, lse, dq, dk, dv, dsinks;
};

// float64 reference of forward and backward, straight from the contracts.
Ref reference(const Case& c, const Host& h) {
  Ref r;
  const size_t q_elems = h.q.size(), k_elems = h.k.size();
  r.out.assign(q_elems, 0.0);
  r.dq.assign(q_elems, 0.0);
  r.dk.assign(k_elems, 0.0);
  r.dv.assign(k_elems, 0.0);
  r.dsinks.assign(c.hq, 0.0);
  r.lse.assign(static_cast<size_t>(c.batch) * c.hq * h.max_sq, 0.0);  // indexed (b, h, i)
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.d));
  const int group = c.hq / c.hkv;
  const uint32_t thr = flash::dropout_threshold(c.dropout);
  const int wr = c.causal ? 0 : c.wr;
  for (int b = 0; b < c.batch; ++b) {
    const int sq = c.sq[b];
    const int stored = c.sk[b];
    const int end = c.seqused.empty() ? stored : std::min(c.seqused[b], stored);
    const int first = c.leftpad.empty() ? 0 : c.leftpad[b];
    const int sk = std::max(end - first, 0);
    for (int hh = 0; hh < c.hq; ++hh) {
      const int hk = hh / group;
      const double slope = c.alibi == 0 ? 0.0 : h.alibi[(c.alibi == 2 ? b * c.hq : 0) + hh];
      for (int i = 0; i < sq; ++i) {
        const float* qi = &h.q[q_index(c, h, b, i) + hh * c.d];
        const float* doi = &h.dout[q_index(c, h, b, i) + hh * c.d];
        std::vector<double> s(sk, -INFINITY), t(sk, 0.0), z(sk, 0.0);
        double mx = -INFINITY;
        for (int j = 0; j < sk; ++j) {
          const long diag = static_cast<long>(i) + sk - sq;
          if ((wr >= 0 && j > diag + wr) || (c.wl >= 0 && j < diag - c.wl)) continue;
          const float* kj = &h.k[kv_index(c, h, b, j + first) + hk * c.d];
          double dot = 0;
          for (int e = 0; e < c.d; ++e) dot += static_cast<double>(qi[e]) * kj[e];
          double x = dot * scale;
          if (c.softcap > 0) {
            t[j] = std::tanh(x / c.softcap);
            x = c.softcap * t[j];
          }
          x -= slope * std::fabs(static_cast<double>(i + sk - sq - j));
          s[j] = x;
          mx = std::max(mx, x);
          const bool keep = c.dropout == 0.f ||
                            flash::dropout_keep(0x1234567890ABCDEFull, 0x300000007ull,
                                                static_cast<int64_t>(b) * c.hq + hh, i, j, thr);
          z[j] = keep ? 1.0 / (1.0 - c.dropout) : 0.0;
        }
        const size_t li = (static_cast<size_t>(b) * c.hq + hh) * h.max_sq + i;
        if (mx == -INFINITY) {
          r.lse[li] = INFINITY;
          continue;  // out = 0, no gradient
        }
        double total = 0;
        for (int j = 0; j < sk; ++j) total += s[j] == -INFINITY ? 0.0 : std::exp(s[j] - mx);
        if (c.sinks) total += std::exp(h.sinks[hh] - mx);
        const double lse = mx + std::log(total);
        r.lse[li] = lse;
        std::vector<double> p(sk, 0.0), dp(sk, 0.0);
        double* oi = &r.out[q_index(c, h, b, i) + hh * c.d];
        for (int j = 0; j < sk; ++j) {
          if (s[j] == -INFINITY) continue;
          p[j] = std::exp(s[j] - lse);
          const float* vj = &h.v[kv_index(c, h, b, j + first) + hk * c.d];
          for (int e = 0; e < c.d; ++e) oi[e] += p[j] * z[j] * vj[e];
        }
        // Backward of this row: dP = Z * dO . V, Di = sum_j P dP, dS = P (dP - Di).
        double di = 0;
        for (int j = 0; j < sk; ++j) {
          if (p[j] == 0.0) continue;
          const float* vj = &h.v[kv_index(c, h, b, j + first) + hk * c.d];
          double dot = 0;
          for (int e = 0; e < c.d; ++e) dot += static_cast<double>(doi[e]) * vj[e];
          dp[j] = z[j] * dot;
          di += p[j] * dp[j];
        }
        if (c.sinks) r.dsinks[hh] -= std::exp(h.sinks[hh] - lse) * di;
        for (int j = 0; j < sk; ++j) {
          if (p[j] == 0.0) continue;
          const int64_t kvi = kv_index(c, h, b, j + first) + hk * c.d;
          const double ds = p[j] * (dp[j] - di) * (c.softcap > 0 ? 1.0 - t[j] * t[j] : 1.0) * scale;
          for (int e = 0; e < c.d; ++e) {
            r.dq[q_index(c, h, b, i) + hh * c.d + e] += ds * h.k[kvi + e];
            r.dk[kvi + e] += ds * qi[e];
            r.dv[kvi + e] += p[j] * z[j] * doi[e];
          }
        }
      }
    }
  }
  return r;
}

template <typename V>
V* to_device(const std::vector<V>& host) {
  if (host.empty()) return nullptr;
  V* ptr = nullptr;
  CHECK_CUDA(cudaMalloc(&ptr, host.size() * sizeof(V)));
  CHECK_CUDA(cudaMemcpy(ptr, host.data(), host.size() * sizeof(V), cudaMemcpyHostToDevice));
  return ptr;
}
void* to_device_elems(const std::vector<float>& host, DType dt) {
  if (dt == DType::kFloat8E4M3) {
    std::vector<uint8_t> bytes(host.size());
    for (size_t e = 0; e < host.size(); ++e) bytes[e] = static_cast<uint8_t>(to_bits(host[e], dt));
    return to_device(bytes);
  }
  std::vector<uint16_t> bits(host.size());
  for (size_t e = 0; e < host.size(); ++e) bits[e] = to_bits(host[e], dt);
  return to_device(bits);
}
uint16_t* poisoned(size_t n) {
  uint16_t* ptr = nullptr;
  CHECK_CUDA(cudaMalloc(&ptr, std::max<size_t>(n, 1) * sizeof(uint16_t)));
  CHECK_CUDA(cudaMemset(ptr, 0xFF, std::max<size_t>(n, 1) * sizeof(uint16_t)));  // NaN in both dtypes
  return ptr;
}
std::vector<float> from_device_elems(const uint16_t* dev, size_t n, DType dt) {
  std::vector<uint16_t> bits(n);
  CHECK_CUDA(cudaMemcpy(bits.data(), dev, n * sizeof(uint16_t), cudaMemcpyDeviceToHost));
  std::vector<float> out(n);
  for (size_t e = 0; e < n; ++e) out[e] = from_bits(bits[e], dt);
  return out;
}

// max |got - ref| / max(1, max |ref|); NaN anywhere gives +inf.
double rel_err(const std::vector<float>& got, const std::vector<double>& ref) {
  double err = 0, mag = 1;
  for (size_t e = 0; e < ref.size(); ++e) {
    if (std::isnan(got[e])) return INFINITY;
    err = std::max(err, std::fabs(got[e] - ref[e]));
    mag = std::max(mag, std::fabs(ref[e]));
  }
  return err / mag;
}

int failures = 0;

void report(const Case& c, const char* what, double err, double tol) {
  const bool ok = err <= tol;
  if (!ok) ++failures;
  std::printf("  %-5s %-8s err %.3e (tol %.1e)%s\n", ok ? "ok" : "FAIL", what, err, tol, ok ? "" : "   <<<<<");
  (void)c;
}

void run_case(const Case& c) {
  std::printf("%s [%s]\n", c.name.c_str(), dtype_label(c.dtype));
  const bool fp8 = c.dtype == DType::kFloat8E4M3;
  std::mt19937 rng(1234);
  std::normal_distribution<float> normal(0.f, 1.f);
  auto rnd = [&](std::vector<float>& vec, size_t n, float sd) {
    vec.resize(n);
    for (auto& x : vec) x = from_bits(to_bits(sd * normal(rng), c.dtype), c.dtype);  // exactly representable
  };
  Host h;
  h.max_sq = *std::max_element(c.sq.begin(), c.sq.end());
  h.max_sk = *std::max_element(c.sk.begin(), c.sk.end());
  h.cu_q.assign(1, 0);
  h.cu_k.assign(1, 0);
  for (int b = 0; b < c.batch; ++b) {
    h.cu_q.push_back(h.cu_q.back() + c.sq[b]);
    h.cu_k.push_back(h.cu_k.back() + c.sk[b]);
  }
  h.total_q = c.varlen ? h.cu_q.back() : c.batch * h.max_sq;
  h.cap_k = h.max_sk;
  if (c.page_size > 0) {
    h.max_pages = (h.max_sk + c.page_size - 1) / c.page_size;
    h.num_pages = h.max_pages * c.batch + 3;
    std::vector<int32_t> pages(h.num_pages);
    for (int e = 0; e < h.num_pages; ++e) pages[e] = e;
    std::shuffle(pages.begin(), pages.end(), rng);
    h.block_table.assign(pages.begin(), pages.begin() + h.max_pages * c.batch);
    h.kv_rows = h.num_pages * c.page_size;
  } else {
    h.kv_rows = c.varlen ? h.cu_k.back() : c.batch * h.cap_k;
  }
  if (c.cache_batch_idx) {
    for (int b = 0; b < c.batch; ++b) h.cache_idx.push_back(c.batch - 1 - b);
  }
  rnd(h.q, static_cast<size_t>(h.total_q) * c.hq * c.d, 1.f);
  rnd(h.k, static_cast<size_t>(h.kv_rows) * c.hkv * c.d, 1.f);
  rnd(h.v, static_cast<size_t>(h.kv_rows) * c.hkv * c.d, 1.f);
  rnd(h.dout, h.q.size(), 1.f);
  if (c.alibi) {
    h.alibi.resize(static_cast<size_t>(c.alibi == 2 ? c.batch : 1) * c.hq);
    for (auto& x : h.alibi) x = 0.05f + 0.2f * std::fabs(normal(rng));
  }
  if (c.sinks) {
    h.sinks.resize(c.hq);
    for (auto& x : h.sinks) x = normal(rng);
  }
  // FP8 descales, (batch, heads_kv): per KV head, q's also per batch; the reference sees the
  // scaled values.
  std::vector<float> q_descale, k_descale, v_descale;
  Host scaled = h;
  if (fp8) {
    for (int b = 0; b < c.batch; ++b) {
      for (int hk = 0; hk < c.hkv; ++hk) {
        q_descale.push_back((0.5f + 0.25f * hk) * (1.f + 0.5f * b));
        k_descale.push_back(1.5f - 0.25f * hk);
        v_descale.push_back(0.75f + 0.5f * hk);
      }
    }
    const int group = c.hq / c.hkv;
    for (size_t e = 0; e < h.q.size(); ++e) {
      const int row = static_cast<int>(e / (static_cast<size_t>(c.hq) * c.d));
      const int hh = static_cast<int>(e / c.d) % c.hq;
      int b = c.varlen ? 0 : row / h.max_sq;
      while (c.varlen && row >= h.cu_q[b + 1]) ++b;
      scaled.q[e] *= q_descale[b * c.hkv + hh / group];
    }
    for (size_t e = 0; e < h.k.size(); ++e) {
      const int hk = static_cast<int>(e / c.d) % c.hkv;
      scaled.k[e] *= k_descale[hk];  // the same for every batch
      scaled.v[e] *= v_descale[hk];
    }
  }
  const Ref ref = reference(c, scaled);

  void* dq_ = to_device_elems(h.q, c.dtype);
  void* dk_ = to_device_elems(h.k, c.dtype);
  void* dv_ = to_device_elems(h.v, c.dtype);
  void* ddo = fp8 ? nullptr : to_device_elems(h.dout, c.dtype);
  float* dq_descale = to_device(q_descale);
  float* dk_descale = to_device(k_descale);
  float* dv_descale = to_device(v_descale);
  uint16_t* dout = poisoned(h.q.size());
  float* dalibi = to_device(h.alibi);
  float* dsinks_in = to_device(h.sinks);
  int32_t* dcu_q = c.varlen ? to_device(h.cu_q) : nullptr;
  int32_t* dcu_k = c.varlen ? to_device(h.cu_k) : nullptr;
  int32_t* dseqused = to_device(std::vector<int32_t>(c.seqused.begin(), c.seqused.end()));
  int32_t* dleftpad = to_device(std::vector<int32_t>(c.leftpad.begin(), c.leftpad.end()));
  int32_t* dbt = to_device(h.block_table);
  int32_t* dcache = to_device(h.cache_idx);
  const size_t lse_n = c.varlen ? static_cast<size_t>(c.hq) * h.total_q : static_cast<size_t>(c.batch) * c.hq * h.max_sq;
  float* dlse = nullptr;
  CHECK_CUDA(cudaMalloc(&dlse, std::max<size_t>(lse_n, 1) * sizeof(float)));

  flash::FlashBwdParams p;
  p.q = dq_;
  p.k = dk_;
  p.v = dv_;
  p.out = dout;
  p.softmax_lse = dlse;
  const int64_t q_row = static_cast<int64_t>(c.hq) * c.d, k_row = static_cast<int64_t>(c.hkv) * c.d;
  p.q_row_stride = p.o_row_stride = p.do_row_stride = p.dq_row_stride = q_row;
  p.q_head_stride = p.o_head_stride = p.do_head_stride = p.dq_head_stride = c.d;
  p.q_batch_stride = p.o_batch_stride = p.do_batch_stride = p.dq_batch_stride = c.varlen ? 0 : q_row * h.max_sq;
  p.k_row_stride = p.v_row_stride = p.dk_row_stride = p.dv_row_stride = k_row;
  p.k_head_stride = p.v_head_stride = p.dk_head_stride = p.dv_head_stride = c.d;
  const int64_t kb = c.page_size > 0 ? k_row * c.page_size : (c.varlen ? 0 : k_row * h.cap_k);
  p.k_batch_stride = p.v_batch_stride = p.dk_batch_stride = p.dv_batch_stride = kb;
  p.batch = c.batch;
  p.total_q = h.total_q;
  p.seqlen_q = h.max_sq;
  p.seqlen_k = c.page_size > 0 ? h.max_pages * c.page_size : h.max_sk;
  p.heads_q = c.hq;
  p.heads_kv = c.hkv;
  p.head_dim = c.d;
  p.dtype = c.dtype;
  p.softmax_scale = 1.f / std::sqrt(static_cast<float>(c.d));
  p.is_causal = c.causal;
  p.window_left = c.wl;
  p.window_right = c.causal ? 0 : c.wr;
  p.softcap = c.softcap;
  p.alibi_slopes = dalibi;
  p.alibi_batch_stride = c.alibi == 2 ? c.hq : 0;
  p.sinks = dsinks_in;
  p.dropout_p = c.dropout;
  p.philox_seed = 0x1234567890ABCDEFull;
  p.philox_offset = 0x300000007ull;
  p.cu_seqlens_q = dcu_q;
  p.cu_seqlens_k = dcu_k;
  p.seqused_k = dseqused;
  p.leftpad_k = dleftpad;
  p.block_table = dbt;
  p.block_table_batch_stride = h.max_pages;
  p.page_size = c.page_size;
  p.cache_batch_idx = dcache;
  p.num_splits = c.num_splits;
  p.q_descale = dq_descale;
  p.k_descale = dk_descale;
  p.v_descale = dv_descale;

  // FP8: P is rounded to e4m3 (3 mantissa bits) for the P V product.
  const double tol_out = fp8 ? 8e-2 : c.dtype == DType::kFloat16 ? 4e-3 : 2e-2;
  // Forward modes: SIMT, the sm80-class tensor-core kernels, and the default (the Hopper forward or
  // decode kernel where one takes the call; skipped where the default is the sm80-class kernel again).
  for (int mode = fp8 ? 2 : 0; mode < 3; ++mode) {  // FP8 has one kernel
    setenv("FLASH_ATTN_CUDA_SIMT", mode == 0 ? "1" : "0", 1);
    setenv("FLASH_ATTN_CUDA_HOPPER", mode == 1 ? "0" : "1", 1);
    const std::string kernel = flash::cuda::fwd_kernel_name(p);
    if (mode == 2 && (kernel == "mma" || kernel == "simt")) continue;
    flash::FlashFwdParams fp = p;
    fp.num_splits = flash::cuda::fwd_num_splits(fp);
    float* accum = nullptr;
    if (fp.num_splits > 1) {
      CHECK_CUDA(cudaMalloc(&accum, flash::cuda::fwd_workspace_bytes(fp)));
      fp.out_accum = accum;
      fp.lse_accum = accum + static_cast<size_t>(fp.num_splits) * c.batch * c.hq * h.max_sq * c.d;
    }
    // FP8: the transposed V's scratch poisoned with NaN (0xFF in e4m3), like the outputs.
    void* scratch = nullptr;
    if (const size_t bytes = flash::cuda::fwd_fp8_scratch_bytes(fp)) {
      CHECK_CUDA(cudaMalloc(&scratch, bytes));
      CHECK_CUDA(cudaMemset(scratch, 0xFF, bytes));
      fp.fp8_scratch = scratch;
    }
    CHECK_CUDA(cudaMemset(dout, 0xFF, h.q.size() * sizeof(uint16_t)));
    CHECK_CUDA(cudaMemset(dlse, 0xFF, std::max<size_t>(lse_n, 1) * sizeof(float)));
    flash::cuda::run_fwd(fp, nullptr);
    CHECK_CUDA(cudaDeviceSynchronize());
    if (accum) CHECK_CUDA(cudaFree(accum));
    if (scratch) CHECK_CUDA(cudaFree(scratch));
    const std::vector<float> out = from_device_elems(dout, h.q.size(), out_dtype(c.dtype));
    std::vector<float> lse(std::max<size_t>(lse_n, 1));
    CHECK_CUDA(cudaMemcpy(lse.data(), dlse, lse.size() * sizeof(float), cudaMemcpyDeviceToHost));
    double lse_err = 0;
    for (int b = 0; b < c.batch; ++b) {
      for (int hh = 0; hh < c.hq; ++hh) {
        for (int i = 0; i < c.sq[b]; ++i) {
          const double want = ref.lse[(static_cast<size_t>(b) * c.hq + hh) * h.max_sq + i];
          const size_t at = c.varlen ? static_cast<size_t>(hh) * h.total_q + h.cu_q[b] + i
                                     : (static_cast<size_t>(b) * c.hq + hh) * h.max_sq + i;
          const double got = lse[at];
          if (std::isinf(want) || std::isinf(got) || std::isnan(got)) {
            if (!(std::isinf(want) && std::isinf(got) && got > 0)) lse_err = INFINITY;
          } else {
            lse_err = std::max(lse_err, std::fabs(got - want));
          }
        }
      }
    }
    char label[32];
    std::snprintf(label, sizeof(label), "out/%s/s%d", kernel.c_str(), fp.num_splits);
    report(c, label, rel_err(out, ref.out), tol_out);
    // (FP8 wgmma accumulates S with less than fp32's precision.)
    report(c, "lse", lse_err, fp8 ? 5e-3 : 1e-3);
  }

  // Backward: SIMT kernels, the deterministic tensor-core kernels (head dims <= 128), the fused
  // tensor-core kernel with atomic dQ (no dropout on either tensor-core path) and, where it takes
  // the call (the default on sm90), the Hopper kernel.
  const char* const bwd_modes[] = {"simt", "mma-det", "mma", "wgmma"};
  for (int mode = 0; c.bwd && !fp8 && mode < 4; ++mode) {  // (FP8: forward only)
    if (mode > 0 && c.dropout > 0.f) break;
    if (mode == 1 && c.d > 128) continue;
    setenv("FLASH_ATTN_CUDA_SIMT", mode == 0 ? "1" : "0", 1);
    setenv("FLASH_ATTN_CUDA_HOPPER", mode == 3 ? "1" : "0", 1);
    uint16_t* ddq = poisoned(h.q.size());
    uint16_t* ddk = poisoned(h.k.size());
    uint16_t* ddv = poisoned(h.v.size());
    float* ddsinks = nullptr;
    if (c.sinks) CHECK_CUDA(cudaMalloc(&ddsinks, c.hq * sizeof(float)));
    flash::FlashBwdParams bp = p;
    bp.num_splits = 1;
    bp.dout = ddo;
    bp.dq = ddq;
    bp.dk = ddk;
    bp.dv = ddv;
    bp.dsinks = ddsinks;
    bp.deterministic = mode == 1;
    if (mode == 3 && std::string(flash::cuda::bwd_kernel_name(bp)) != "wgmma") {
      for (uint16_t* ptr : {ddq, ddk, ddv}) CHECK_CUDA(cudaFree(ptr));
      if (ddsinks) CHECK_CUDA(cudaFree(ddsinks));
      continue;
    }
    const size_t ws = flash::cuda::bwd_workspace_bytes(bp);
    float* dws = nullptr;
    CHECK_CUDA(cudaMalloc(&dws, std::max<size_t>(ws, 4)));
    CHECK_CUDA(cudaMemset(dws, 0xFF, std::max<size_t>(ws, 4)));  // NaN: run_bwd initializes what it reads
    bp.workspace = dws;
    flash::cuda::run_bwd(bp, nullptr);
    CHECK_CUDA(cudaDeviceSynchronize());
    const double tol_g = 3 * tol_out;
    const std::string m = bwd_modes[mode];
    report(c, ("dq/" + m).c_str(), rel_err(from_device_elems(ddq, h.q.size(), c.dtype), ref.dq), tol_g);
    report(c, ("dk/" + m).c_str(), rel_err(from_device_elems(ddk, h.k.size(), c.dtype), ref.dk), tol_g);
    report(c, ("dv/" + m).c_str(), rel_err(from_device_elems(ddv, h.v.size(), c.dtype), ref.dv), tol_g);
    if (c.sinks) {
      std::vector<float> ds(c.hq);
      CHECK_CUDA(cudaMemcpy(ds.data(), ddsinks, c.hq * sizeof(float), cudaMemcpyDeviceToHost));
      report(c, "dsinks", rel_err(ds, ref.dsinks), tol_g);  // Di comes from the rounded output
      CHECK_CUDA(cudaFree(ddsinks));
    }
    CHECK_CUDA(cudaFree(ddq));
    CHECK_CUDA(cudaFree(ddk));
    CHECK_CUDA(cudaFree(ddv));
    CHECK_CUDA(cudaFree(dws));
  }
  for (void* ptr : {static_cast<void*>(dq_), static_cast<void*>(dk_), static_cast<void*>(dv_), static_cast<void*>(ddo),
                    static_cast<void*>(dout), static_cast<void*>(dalibi), static_cast<void*>(dsinks_in),
                    static_cast<void*>(dcu_q), static_cast<void*>(dcu_k), static_cast<void*>(dseqused),
                    static_cast<void*>(dleftpad), static_cast<void*>(dbt), static_cast<void*>(dcache),
                    static_cast<void*>(dlse), static_cast<void*>(dq_descale), static_cast<void*>(dk_descale),
                    static_cast<void*>(dv_descale)}) {
    if (ptr) CHECK_CUDA(cudaFree(ptr));
  }
}

Case make(const std::string& name, int batch, int sq, int sk, int hq, int hkv, int d) {
  Case c;
  c.name = name;
  c.batch = batch;
  c.sq.assign(batch, sq);
  c.sk.assign(batch, sk);
  c.hq = hq;
  c.hkv = hkv;
  c.d = d;
  return c;
}

}  // namespace

int main() {
  std::vector<Case> cases;
  // Line-buffered even into a pipe (ci/gpu-kernel-check.sh tees it): a run cut short by a hang or a
  // timeout still shows the case it stopped in.
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  { Case c = make("basic", 2, 77, 77, 2, 2, 64); c.fp8 = true; cases.push_back(c); }
  { Case c = make("causal sq<sk", 2, 40, 100, 2, 2, 128); c.causal = true; cases.push_back(c); }
  { Case c = make("causal sq>sk (masked rows)", 1, 100, 40, 2, 1, 64); c.causal = true; cases.push_back(c); }
  { Case c = make("window(16,8)", 2, 90, 130, 2, 2, 96); c.wl = 16; c.wr = 8; c.fp8 = true; cases.push_back(c); }
  { Case c = make("gqa 6/2 causal", 2, 50, 70, 6, 2, 32); c.causal = true; cases.push_back(c); }
  { Case c = make("mqa 4/1 local", 1, 64, 64, 4, 1, 64); c.wl = 5; c.wr = 0; cases.push_back(c); }
  { Case c = make("softcap+alibi(b,h) d=80", 2, 45, 61, 2, 2, 80); c.softcap = 30.f; c.alibi = 2; cases.push_back(c); }
  { Case c = make("alibi(h) causal d=40", 1, 33, 33, 3, 3, 40); c.alibi = 1; c.causal = true; cases.push_back(c); }
  { Case c = make("dropout 0.17", 2, 70, 90, 2, 1, 64); c.dropout = 0.17f; cases.push_back(c); }
  { Case c = make("dropout+causal+softcap", 1, 64, 64, 2, 2, 32); c.dropout = 0.3f; c.causal = true; c.softcap = 5.f; cases.push_back(c); }
  { Case c = make("sinks causal", 2, 60, 60, 4, 2, 64); c.sinks = true; c.causal = true; cases.push_back(c); }
  { Case c = make("sinks masked rows", 1, 50, 20, 2, 2, 64); c.sinks = true; c.causal = true; cases.push_back(c); }
  { Case c = make("d=256", 1, 70, 70, 2, 2, 256); c.causal = true; cases.push_back(c); }
  // Long enough for unmasked interior tiles, two m-tiles per warp (the plain fast path) and many
  // key-block CTAs adding to one dQ row (the fused backward).
  { Case c = make("long causal d=128", 1, 300, 300, 2, 2, 128); c.causal = true; c.fp8 = true; cases.push_back(c); }
  { Case c = make("long gqa 4/2 d=64", 2, 200, 260, 4, 2, 64); cases.push_back(c); }
  { Case c = make("long window(100,0) d=256", 1, 260, 260, 2, 2, 256); c.wl = 100; c.wr = 0; cases.push_back(c); }
  // At most 64 packed rows over many key tiles (decode and short prompts on long caches).
  { Case c = make("decode long cache d=128 page=16", 2, 1, 1000, 8, 2, 128); c.causal = true; c.page_size = 16; c.seqused = {1000, 777}; c.bwd = false; cases.push_back(c); }
  { Case c = make("sq=16 long k d=64", 1, 16, 700, 2, 2, 64); c.causal = true; c.bwd = false; cases.push_back(c); }
  { Case c = make("sq=8 long k d=256 window", 1, 8, 400, 2, 1, 256); c.wl = 300; c.wr = 0; c.bwd = false; cases.push_back(c); }
  { Case c = make("d=8", 1, 40, 50, 2, 2, 8); cases.push_back(c); }
  { Case c = make("d=200 window", 1, 50, 80, 2, 1, 200); c.wl = 20; c.wr = 3; cases.push_back(c); }
  // More than 64 packed rows at head-dim buckets 64/128/192/256: the Hopper kernel's calls (on sm90).
  { Case c = make("wgmma paged page=16 gqa 4/2 causal d=128", 2, 100, 300, 4, 2, 128); c.causal = true; c.page_size = 16; c.seqused = {300, 250}; c.bwd = false; c.fp8 = true; cases.push_back(c); }
  { Case c = make("wgmma paged page=256 d=64", 2, 130, 600, 2, 2, 64); c.page_size = 256; c.seqused = {600, 333}; c.bwd = false; cases.push_back(c); }
  { Case c = make("wgmma window(40,0) mqa 4/1 d=192", 1, 150, 150, 4, 1, 192); c.wl = 40; c.wr = 0; c.bwd = false; c.fp8 = true; cases.push_back(c); }
  { Case c = make("wgmma splits=2 sinks d=128", 1, 70, 600, 2, 2, 128); c.num_splits = 2; c.sinks = true; c.bwd = false; c.fp8 = true; cases.push_back(c); }
  { Case c = make("wgmma d=120 causal", 1, 200, 260, 1, 1, 120); c.causal = true; cases.push_back(c); }
  { Case c = make("wgmma leftpad+cache_batch_idx d=256", 2, 90, 150, 2, 2, 256); c.leftpad = {7, 0}; c.cache_batch_idx = true; c.causal = true; c.bwd = false; c.fp8 = true; cases.push_back(c); }
  {
    Case c = make("wgmma varlen causal d=128", 4, 1, 1, 2, 2, 128);
    c.varlen = true;
    c.fp8 = true;
    c.sq = {0, 130, 64, 257};
    c.sk = {5, 200, 64, 300};
    c.causal = true;
    cases.push_back(c);
  }
  // Enough key tiles that the forward's K/V ring wraps several times (each buffer reused, its
  // mbarrier phases alternating), with three consumer-warpgroup row blocks in flight.
  { Case c = make("wgmma ring wraps gqa 2/1 causal d=192", 1, 300, 900, 2, 1, 192); c.causal = true; c.bwd = false; c.fp8 = true; cases.push_back(c); }
  { Case c = make("wgmma ring wraps d=64", 2, 140, 1100, 2, 2, 64); c.fp8 = true; cases.push_back(c); }
  // Head dim 64 above 1024 packed rows: the three-consumer tiles (shorter calls take two CTAs per SM).
  { Case c = make("wgmma three consumers gqa 8/1 paged page=16 d=64", 1, 200, 700, 8, 1, 64); c.page_size = 16; c.seqused = {650}; c.bwd = false; cases.push_back(c); }
  // The Hopper backward's calls (head-dim buckets 64 / 128, fused): odd GQA groups, windows,
  // masked rows, leftpad and seqused.
  { Case c = make("wgmma bwd gqa 3/1 sinks window(70,20) d=128", 2, 150, 333, 3, 1, 128); c.wl = 70; c.wr = 20; c.sinks = true; cases.push_back(c); }
  { Case c = make("wgmma bwd causal sq>sk d=120", 1, 260, 200, 2, 2, 120); c.causal = true; cases.push_back(c); }
  { Case c = make("wgmma bwd leftpad+seqused d=64", 2, 100, 300, 2, 2, 64); c.leftpad = {7, 0}; c.seqused = {300, 201}; c.causal = true; cases.push_back(c); }
  // Head dims between the Hopper tile widths run at the next multiple of 64, columns zero-padded.
  { Case c = make("wgmma bwd padded d=96 gqa 4/2 causal", 2, 130, 200, 4, 2, 96); c.causal = true; cases.push_back(c); }
  // Head dim 256 (and 129..256 padded to it): the warpgroups split dK / dV by columns, dQ by atomics.
  { Case c = make("wgmma bwd d=256 gqa 4/2 causal", 1, 150, 230, 4, 2, 256); c.causal = true; cases.push_back(c); }
  { Case c = make("wgmma bwd padded d=136 mqa 3/1 window(50,10)", 2, 90, 170, 3, 1, 136); c.wl = 50; c.wr = 10; cases.push_back(c); }
  { Case c = make("wgmma bwd leftpad+seqused sinks d=192", 2, 100, 200, 2, 2, 192); c.leftpad = {7, 0}; c.seqused = {200, 131}; c.sinks = true; c.causal = true; cases.push_back(c); }
  // Q / dO by TMA: boxes of 8 heads x 8 query rows (GQA 8/1), six steps per key block, so that the
  // overlapped steps' stages and dS^T buffers each come round two or three times.
  { Case c = make("wgmma bwd tma gqa 8/1 d=128", 2, 48, 200, 8, 1, 128); c.wl = 90; cases.push_back(c); }
  // Head dim 64: six 128-row steps per key block through its three stages, masked rows at the end.
  { Case c = make("wgmma bwd tma gqa 4/1 causal d=64", 2, 170, 150, 4, 1, 64); c.causal = true; cases.push_back(c); }
  {
    Case c = make("wgmma bwd varlen d=256", 3, 1, 1, 2, 1, 256);
    c.varlen = true;
    c.sq = {0, 70, 129};
    c.sk = {5, 64, 150};
    c.causal = true;
    cases.push_back(c);
  }
  { Case c = make("wgmma padded d=160 window(60,5)", 1, 150, 190, 2, 2, 160); c.wl = 60; c.wr = 5; cases.push_back(c); }
  // K / V by TMA (dense layouts): cache rows picked by cache_batch_idx; 80-key tiles at d = 256
  // with a partial last tile.
  { Case c = make("wgmma tma cache_batch_idx gqa 4/2 d=128", 3, 130, 333, 4, 2, 128); c.cache_batch_idx = true; c.bwd = false; c.fp8 = true; cases.push_back(c); }
  { Case c = make("wgmma tma gqa 2/1 d=256", 2, 140, 410, 2, 1, 256); c.bwd = false; c.fp8 = true; cases.push_back(c); }
  {
    Case c = make("varlen", 4, 1, 1, 4, 2, 64);
    c.varlen = true;
    c.sq = {0, 1, 37, 64};
    c.sk = {5, 0, 50, 64};
    c.causal = true;
    cases.push_back(c);
  }
  {
    Case c = make("varlen seqused+leftpad+dropout", 3, 1, 1, 2, 2, 64);
    c.varlen = true;
    c.sq = {20, 33, 7};
    c.sk = {40, 33, 70};
    c.seqused = {35, 33, 10};
    c.leftpad = {3, 0, 2};
    c.dropout = 0.2f;
    c.causal = true;
    cases.push_back(c);
  }
  for (int ps : {1, 16, 256}) {
    Case c = make("paged decode page=" + std::to_string(ps), 3, 1, 300, 8, 1, 128);
    c.page_size = ps;
    c.seqused = {300, 17, 1};
    c.fp8 = ps == 16;  // decode: few rows, the split heuristic's count
    c.causal = true;
    c.num_splits = 0;
    c.bwd = false;
    cases.push_back(c);
  }
  {
    // Hopper decode: head dim 96 (tile columns past it zero), 16 packed rows, a window whose first
    // tile starts before it, a sequence without keys, partial last tiles, three splits.
    Case c = make("decode window(50,0) gqa 16/1 d=96 splits=3 empty seq", 3, 1, 333, 16, 1, 96);
    c.page_size = 16;
    c.seqused = {333, 0, 70};
    c.wl = 50;
    c.wr = 0;
    c.num_splits = 3;
    c.bwd = false;
    cases.push_back(c);
  }
  {
    // Decode over varlen keys (the key-warps kernel: the Hopper decode takes varlen keys only
    // through pages): an empty sequence, one without queries, two query rows of a group.
    Case c = make("decode varlen gqa 4/1 causal d=128", 4, 1, 1, 8, 2, 128);
    c.varlen = true;
    c.sq = {1, 2, 0, 1};
    c.sk = {300, 0, 70, 129};
    c.causal = true;
    c.bwd = false;
    cases.push_back(c);
  }
  {
    Case c = make("kvcache cache_batch_idx+leftpad splits=4 sinks", 3, 4, 200, 4, 2, 64);
    c.fp8 = true;
    c.cache_batch_idx = true;
    c.seqused = {200, 90, 5};
    c.leftpad = {10, 0, 5};
    c.num_splits = 4;
    c.causal = true;
    c.sinks = true;
    c.bwd = false;
    cases.push_back(c);
  }
  {
    Case c = make("splits=3 alibi window", 2, 8, 500, 2, 2, 96);
    c.num_splits = 3;
    c.alibi = 1;
    c.wl = 100;
    c.wr = 10;
    c.bwd = false;
    cases.push_back(c);
  }
  // FLASH_SELFTEST_ONLY=<text>[|<text>...]: only the cases whose name contains one of the texts (a
  // small grid for the sanitizers).
  const char* only = std::getenv("FLASH_SELFTEST_ONLY");
  auto selected = [&](const std::string& name) {
    if (only == nullptr) return true;
    const std::string texts = only;
    for (size_t start = 0;;) {
      const size_t bar = texts.find('|', start);
      if (name.find(texts.substr(start, bar - start)) != std::string::npos) return true;
      if (bar == std::string::npos) return false;
      start = bar + 1;
    }
  };
  // The FP8 forward runs on sm90 (compute capability 9.0) only.
  int major = 0, minor = 0;
  CHECK_CUDA(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0));
  CHECK_CUDA(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0));
  const bool sm90 = major == 9 && minor == 0;
  for (const Case& base : cases) {
    if (!selected(base.name)) continue;
    for (DType dt : {DType::kBFloat16, DType::kFloat16, DType::kFloat8E4M3}) {
      if (dt == DType::kFloat8E4M3 && !(base.fp8 && sm90)) continue;
      Case c = base;
      c.dtype = dt;
      run_case(c);
    }
  }
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "PASSED", failures);
  return failures ? 1 : 0;
}
