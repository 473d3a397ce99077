// Op schemas, input checks, parameter filling and dispatch to the CPU or CUDA kernels.
//
// One source for both ABIs (tensor_adapter.h): CPU variants build it against torch's full
// ABI with CPU_KERNEL, CUDA variants against the stable ABI with CUDA_KERNEL. Every check
// runs before any launch and names the argument, its value and what was expected.
#include "torch_binding.h"

#include <algorithm>
#include <exception>
#include <limits>

#include "flash_api.h"
#include "flash_params.h"
#include "registration.h"

namespace flash_binding {
namespace {

constexpr int kMaxHeadDim = 256;

// ---- checks -----------------------------------------------------------------------------

void check_dtype(const char* name, const Tensor& t) {
#if defined(CUDA_KERNEL)
  const bool ok = dtype(t) == ScalarType::Half || dtype(t) == ScalarType::BFloat16;
  FLASH_CHECK(ok, name, " must be float16 or bfloat16 on CUDA, got ", dtype_name(dtype(t)));
#else
  const bool ok = dtype(t) == ScalarType::Half || dtype(t) == ScalarType::BFloat16 || dtype(t) == ScalarType::Float;
  FLASH_CHECK(ok, name, " must be float32, float16 or bfloat16 on CPU, got ", dtype_name(dtype(t)));
#endif
}

std::string device_str(const Tensor& t) { return is_cuda(t) ? "cuda:" + std::to_string(device_index(t)) : "cpu"; }

void check_same_device(const char* name, const Tensor& t, const Tensor& q) {
  FLASH_CHECK(is_cuda(t) == is_cuda(q) && device_index(t) == device_index(q), name,
              " must be on the same device as q (", device_str(q), "), got ", device_str(t));
}

// A q/k/v-like tensor: dtype equal to q's, same device, rank `rank`, last dim contiguous.
void check_operand(const char* name, const Tensor& t, const Tensor& q, int64_t rank) {
  check_dtype(name, t);
  FLASH_CHECK(dtype(t) == dtype(q), name, " must have q's dtype (", dtype_name(dtype(q)), "), got ",
              dtype_name(dtype(t)));
  check_same_device(name, t, q);
  FLASH_CHECK(t.dim() == rank, name, " must have ", rank, " dimensions, got shape ", shape_str(t));
  FLASH_CHECK(t.stride(t.dim() - 1) == 1, name, " must have a contiguous last dimension, got stride ",
              t.stride(t.dim() - 1));
}

void check_head_dims(const Tensor& q, const Tensor& k, const Tensor& v) {
  const int64_t d = q.size(q.dim() - 1);
  FLASH_CHECK(d > 0 && d <= kMaxHeadDim && d % 8 == 0, "q's head_dim must be a multiple of 8 and at most ", kMaxHeadDim,
              " (the Python API pads other sizes), got ", d);
  FLASH_CHECK(k.size(k.dim() - 1) == d, "k's head_dim must equal q's (", d, "), got ", k.size(k.dim() - 1));
  FLASH_CHECK(v.size(v.dim() - 1) == d, "v's head_dim must equal q's (", d, "), got ", v.size(v.dim() - 1));
  const int64_t hq = q.size(q.dim() - 2), hk = k.size(k.dim() - 2);
  FLASH_CHECK(hk > 0 && hq % hk == 0, "q's heads (", hq, ") must be a multiple of k's heads (", hk, ")");
  FLASH_CHECK(v.size(v.dim() - 2) == hk, "v's heads must equal k's (", hk, "), got ", v.size(v.dim() - 2));
}

// An int32, 1-D contiguous tensor of `length` elements on q's device.
void check_index_vector(const char* name, const Tensor& t, const Tensor& q, int64_t length, const char* meaning) {
  check_same_device(name, t, q);
  FLASH_CHECK(dtype(t) == ScalarType::Int, name, " must be int32, got ", dtype_name(dtype(t)));
  FLASH_CHECK(t.dim() == 1 && t.size(0) == length, name, " must have shape (", length, ",) (", meaning, "), got ",
              shape_str(t));
  FLASH_CHECK(t.stride(0) == 1, name, " must be contiguous");
}

void check_scores(const Tensor& q, const OptTensor& alibi_slopes, const OptTensor& sinks, int64_t batch,
                  int64_t heads_q, double dropout_p, double softcap, int64_t window_left, int64_t window_right) {
  FLASH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
  FLASH_CHECK(softcap >= 0.0, "softcap must be >= 0 (0 disables it), got ", softcap);
  FLASH_CHECK(window_left >= -1, "window_size[0] (left) must be >= -1 (-1: unbounded), got ", window_left);
  FLASH_CHECK(window_right >= -1, "window_size[1] (right) must be >= -1 (-1: unbounded), got ", window_right);
  if (alibi_slopes) {
    const Tensor& a = *alibi_slopes;
    check_same_device("alibi_slopes", a, q);
    FLASH_CHECK(dtype(a) == ScalarType::Float, "alibi_slopes must be float32, got ", dtype_name(dtype(a)));
    const bool per_head = a.dim() == 1 && a.size(0) == heads_q;
    const bool per_batch = a.dim() == 2 && a.size(0) == batch && a.size(1) == heads_q;
    FLASH_CHECK(per_head || per_batch, "alibi_slopes must have shape (", heads_q, ",) or (", batch, ", ", heads_q,
                "), got ", shape_str(a));
    FLASH_CHECK(a.stride(a.dim() - 1) == 1, "alibi_slopes must have a contiguous last dimension");
  }
  if (sinks) {
    const Tensor& s = *sinks;
    check_same_device("sinks", s, q);
    FLASH_CHECK(dtype(s) == ScalarType::Float, "sinks must be float32, got ", dtype_name(dtype(s)));
    FLASH_CHECK(s.dim() == 1 && s.size(0) == heads_q, "sinks must have shape (", heads_q,
                ",) (one per query head), got ", shape_str(s));
    FLASH_CHECK(s.stride(0) == 1, "sinks must be contiguous");
  }
}

void check_block_table(const Tensor& block_table, const Tensor& q, int64_t batch) {
  check_same_device("block_table", block_table, q);
  FLASH_CHECK(dtype(block_table) == ScalarType::Int, "block_table must be int32, got ", dtype_name(dtype(block_table)));
  FLASH_CHECK(block_table.dim() == 2 && block_table.size(0) == batch, "block_table must have shape (batch=", batch,
              ", max_pages), got ", shape_str(block_table));
  FLASH_CHECK(block_table.stride(1) == 1, "block_table must have a contiguous last dimension");
}

// ---- parameters ---------------------------------------------------------------------------

flash::DType kernel_dtype(const Tensor& q) {
  switch (dtype(q)) {
    case ScalarType::Float: return flash::DType::kFloat32;
    case ScalarType::Half: return flash::DType::kFloat16;
    case ScalarType::Float8_e4m3fn: return flash::DType::kFloat8E4M3;
    default: return flash::DType::kBFloat16;
  }
}

template <typename T>
const T* opt_ptr(const OptTensor& t) {
  return t ? static_cast<const T*>(data_ptr(*t)) : nullptr;
}

// Strides of a 4-D (batch, row, head, dim) or 3-D (row, head, dim) tensor.
void strides_of(const Tensor& t, int64_t& batch_stride, int64_t& row_stride, int64_t& head_stride) {
  const int64_t r = t.dim();
  batch_stride = r == 4 ? t.stride(0) : 0;
  row_stride = t.stride(r - 3);
  head_stride = t.stride(r - 2);
}

// Fills everything FlashFwdParams holds that q, k, v, out, lse and the score options define.
void fill_fwd(flash::FlashFwdParams& p, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
              const Tensor& lse, const OptTensor& alibi_slopes, const OptTensor& sinks, double dropout_p,
              double softmax_scale, bool is_causal, int64_t window_left, int64_t window_right, double softcap,
              int64_t philox_seed, int64_t philox_offset) {
  p.q = data_ptr(q);
  p.k = data_ptr(k);
  p.v = data_ptr(v);
  p.out = data_ptr(out);
  p.softmax_lse = static_cast<float*>(data_ptr(lse));
  strides_of(q, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  strides_of(k, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  strides_of(v, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  strides_of(out, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
  p.heads_q = static_cast<int>(q.size(q.dim() - 2));
  p.heads_kv = static_cast<int>(k.size(k.dim() - 2));
  p.head_dim = static_cast<int>(q.size(q.dim() - 1));
  p.dtype = kernel_dtype(q);
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.is_causal = is_causal;
  p.window_left = static_cast<int>(window_left);
  p.window_right = is_causal ? 0 : static_cast<int>(window_right);
  p.softcap = static_cast<float>(softcap);
  if (alibi_slopes) {
    p.alibi_slopes = opt_ptr<float>(alibi_slopes);
    p.alibi_batch_stride = alibi_slopes->dim() == 2 ? alibi_slopes->stride(0) : 0;
  }
  p.sinks = opt_ptr<float>(sinks);
  p.dropout_p = static_cast<float>(dropout_p);
  p.philox_seed = static_cast<uint64_t>(philox_seed);
  p.philox_offset = static_cast<uint64_t>(philox_offset);
}

void fill_bwd(flash::FlashBwdParams& p, const Tensor& dout, const Tensor& dq, const Tensor& dk, const Tensor& dv,
              const Tensor& dsinks, const OptTensor& sinks, bool deterministic) {
  p.dout = data_ptr(dout);
  p.dq = data_ptr(dq);
  p.dk = data_ptr(dk);
  p.dv = data_ptr(dv);
  p.dsinks = sinks ? static_cast<float*>(data_ptr(dsinks)) : nullptr;
  strides_of(dout, p.do_batch_stride, p.do_row_stride, p.do_head_stride);
  strides_of(dq, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride);
  strides_of(dk, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride);
  strides_of(dv, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride);
  p.deterministic = deterministic;
}

// ---- dispatch -----------------------------------------------------------------------------

// Kernel errors (std::invalid_argument / std::runtime_error) reach Python as RuntimeError
// with their message; the prefix says which layer raised them.
[[noreturn]] void rethrow_kernel_error(const std::exception& e) {
  throw std::runtime_error(std::string("flash_attn kernel: ") + e.what());
}

void launch_fwd(flash::FlashFwdParams& p, const Tensor& q) {
  try {
#if defined(CUDA_KERNEL)
    DeviceGuard guard(q);
    // split-KV: the kernel picks the count (params.num_splits when > 0, else its heuristic);
    // for more than one split it needs the float32 partial outputs of flash_params.h
    const int splits = flash::cuda::fwd_num_splits(p);
    p.num_splits = splits;  // run_fwd takes the count as chosen here instead of choosing again
    Tensor out_accum, lse_accum;
    if (splits > 1) {
      out_accum = new_tensor(q, {splits, p.batch, p.heads_q, p.seqlen_q, p.head_dim}, ScalarType::Float, false);
      lse_accum = new_tensor(q, {splits, p.batch, p.heads_q, p.seqlen_q}, ScalarType::Float, false);
      p.out_accum = static_cast<float*>(data_ptr(out_accum));
      p.lse_accum = static_cast<float*>(data_ptr(lse_accum));
    }
    // FP8: the kernel's transposed copy of V
    Tensor fp8_scratch;
    if (const size_t bytes = flash::cuda::fwd_fp8_scratch_bytes(p)) {
      fp8_scratch = new_tensor(q, {static_cast<int64_t>(bytes)}, ScalarType::Byte, false);
      p.fp8_scratch = data_ptr(fp8_scratch);
    }
    flash::cuda::run_fwd(p, current_cuda_stream(device_index(q)));
#elif defined(CPU_KERNEL)
    (void)q;
    flash::cpu::run_fwd(p, &parallel_for);
#endif
  } catch (const std::exception& e) {
    rethrow_kernel_error(e);
  }
}

void launch_bwd(flash::FlashBwdParams& p, const Tensor& q) {
  try {
#if defined(CUDA_KERNEL)
    DeviceGuard guard(q);
    const size_t bytes = flash::cuda::bwd_workspace_bytes(p);
    Tensor workspace = new_tensor(q, {static_cast<int64_t>((bytes + 3) / 4)}, ScalarType::Float, /*zero=*/false);
    p.workspace = bytes ? static_cast<float*>(data_ptr(workspace)) : nullptr;
    flash::cuda::run_bwd(p, current_cuda_stream(device_index(q)));
#elif defined(CPU_KERNEL)
    (void)q;
    flash::cpu::run_bwd(p, &parallel_for);
#endif
  } catch (const std::exception& e) {
    rethrow_kernel_error(e);
  }
}

int as_int(int64_t value, const char* name) {
  FLASH_CHECK(value >= 0 && value <= std::numeric_limits<int>::max(), name, " must fit in int32, got ", value);
  return static_cast<int>(value);
}

Tensor dsinks_like(const Tensor& q, const OptTensor& sinks) {
  return new_tensor(q, {sinks ? sinks->size(0) : 0}, ScalarType::Float, /*zero=*/true);
}

}  // namespace

// ---- ops ------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> fwd(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& alibi_slopes,
                               const OptTensor& sinks, double dropout_p, double softmax_scale, bool is_causal,
                               int64_t window_size_left, int64_t window_size_right, double softcap,
                               int64_t philox_seed, int64_t philox_offset) {
  check_operand("q", q, q, 4);
  check_operand("k", k, q, 4);
  check_operand("v", v, q, 4);
  check_head_dims(q, k, v);
  const int64_t batch = q.size(0), seqlen_q = q.size(1), seqlen_k = k.size(1), heads_q = q.size(2);
  FLASH_CHECK(k.size(0) == batch, "k's batch must equal q's (", batch, "), got shape ", shape_str(k));
  FLASH_CHECK(v.size(0) == batch && v.size(1) == seqlen_k, "v must have k's batch and seqlen (", batch, ", ", seqlen_k,
              "), got shape ", shape_str(v));
  check_scores(q, alibi_slopes, sinks, batch, heads_q, dropout_p, softcap, window_size_left, window_size_right);

  Tensor out = new_tensor(q, {batch, seqlen_q, heads_q, q.size(3)}, dtype(q), /*zero=*/false);
  Tensor lse = new_tensor(q, {batch, heads_q, seqlen_q}, ScalarType::Float, /*zero=*/false);
  flash::FlashFwdParams p;
  fill_fwd(p, q, k, v, out, lse, alibi_slopes, sinks, dropout_p, softmax_scale, is_causal, window_size_left,
           window_size_right, softcap, philox_seed, philox_offset);
  p.batch = as_int(batch, "batch");
  p.seqlen_q = as_int(seqlen_q, "seqlen_q");
  p.seqlen_k = as_int(seqlen_k, "seqlen_k");
  if (batch > 0 && seqlen_q > 0) launch_fwd(p, q);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bwd(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                               const Tensor& out, const Tensor& softmax_lse,
                                               const OptTensor& alibi_slopes, const OptTensor& sinks, double dropout_p,
                                               double softmax_scale, bool is_causal, int64_t window_size_left,
                                               int64_t window_size_right, double softcap, bool deterministic,
                                               int64_t philox_seed, int64_t philox_offset) {
  check_operand("q", q, q, 4);
  check_operand("k", k, q, 4);
  check_operand("v", v, q, 4);
  check_operand("out", out, q, 4);
  check_operand("dout", dout, q, 4);
  check_head_dims(q, k, v);
  const int64_t batch = q.size(0), seqlen_q = q.size(1), seqlen_k = k.size(1), heads_q = q.size(2);
  FLASH_CHECK(k.size(0) == batch && v.size(0) == batch && v.size(1) == seqlen_k, "k and v must have shape (", batch,
              ", seqlen_k, heads_kv, head_dim), got ", shape_str(k), " and ", shape_str(v));
  FLASH_CHECK(shape_str(out) == shape_str(q) && shape_str(dout) == shape_str(q), "out and dout must have q's shape ",
              shape_str(q), ", got ", shape_str(out), " and ", shape_str(dout));
  check_same_device("softmax_lse", softmax_lse, q);
  FLASH_CHECK(dtype(softmax_lse) == ScalarType::Float && softmax_lse.dim() == 3 && softmax_lse.size(0) == batch &&
                  softmax_lse.size(1) == heads_q && softmax_lse.size(2) == seqlen_q && softmax_lse.is_contiguous(),
              "softmax_lse must be a contiguous float32 tensor of shape (", batch, ", ", heads_q, ", ", seqlen_q,
              "), got ", dtype_name(dtype(softmax_lse)), " ", shape_str(softmax_lse));
  check_scores(q, alibi_slopes, sinks, batch, heads_q, dropout_p, softcap, window_size_left, window_size_right);

  // The CUDA kernels write every element of dq / dk / dv (key rows outside seqused / leftpad as
  // zeros; the CUDA self-test poisons them to check), so only the CPU kernels and a call that
  // launches nothing need them zeroed first (three memsets of the q / k / v size otherwise).
  const bool launches = batch > 0 && seqlen_q > 0 && seqlen_k > 0;
  const bool zero = !launches || is_cpu(q);
  Tensor dq = new_tensor(q, {batch, seqlen_q, heads_q, q.size(3)}, dtype(q), zero);
  Tensor dk = new_tensor(q, {batch, seqlen_k, k.size(2), k.size(3)}, dtype(q), zero);
  Tensor dv = new_tensor(q, {batch, seqlen_k, v.size(2), v.size(3)}, dtype(q), zero);
  Tensor dsinks = dsinks_like(q, sinks);
  flash::FlashBwdParams p;
  fill_fwd(p, q, k, v, out, softmax_lse, alibi_slopes, sinks, dropout_p, softmax_scale, is_causal, window_size_left,
           window_size_right, softcap, philox_seed, philox_offset);
  fill_bwd(p, dout, dq, dk, dv, dsinks, sinks, deterministic);
  p.batch = as_int(batch, "batch");
  p.seqlen_q = as_int(seqlen_q, "seqlen_q");
  p.seqlen_k = as_int(seqlen_k, "seqlen_k");
  if (launches) launch_bwd(p, q);
  return {dq, dk, dv, dsinks};
}

namespace {

// Checks shared by the varlen forward and backward; returns the batch size.
int64_t check_varlen(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens_q,
                     const Tensor& cu_seqlens_k, const OptTensor& seqused_k, const OptTensor& block_table) {
  check_operand("q", q, q, 3);
  const int64_t kv_rank = block_table ? 4 : 3;
  check_operand("k", k, q, kv_rank);
  check_operand("v", v, q, kv_rank);
  check_head_dims(q, k, v);
  FLASH_CHECK(cu_seqlens_q.dim() == 1 && cu_seqlens_q.size(0) >= 1, "cu_seqlens_q must have shape (batch + 1,), got ",
              shape_str(cu_seqlens_q));
  const int64_t batch = cu_seqlens_q.size(0) - 1;
  check_index_vector("cu_seqlens_q", cu_seqlens_q, q, batch + 1, "batch + 1");
  check_index_vector("cu_seqlens_k", cu_seqlens_k, q, batch + 1, "batch + 1, like cu_seqlens_q");
  if (seqused_k) check_index_vector("seqused_k", *seqused_k, q, batch, "batch");
  for (int i = 0; i < kv_rank - 1; ++i)
    FLASH_CHECK(v.size(i) == k.size(i), "v must have k's shape ", shape_str(k), ", got ", shape_str(v));
  if (block_table) check_block_table(*block_table, q, batch);
  return batch;
}

}  // namespace

std::tuple<Tensor, Tensor> varlen_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens_q,
                                      const Tensor& cu_seqlens_k, const OptTensor& seqused_k,
                                      const OptTensor& block_table, const OptTensor& alibi_slopes,
                                      const OptTensor& sinks, int64_t max_seqlen_q, int64_t max_seqlen_k,
                                      double dropout_p, double softmax_scale, bool is_causal,
                                      int64_t window_size_left, int64_t window_size_right, double softcap,
                                      int64_t philox_seed, int64_t philox_offset) {
  const int64_t batch = check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table);
  const int64_t total_q = q.size(0), heads_q = q.size(1);
  FLASH_CHECK(max_seqlen_q >= 0, "max_seqlen_q must be >= 0, got ", max_seqlen_q);
  FLASH_CHECK(max_seqlen_k >= 0, "max_seqlen_k must be >= 0, got ", max_seqlen_k);
  check_scores(q, alibi_slopes, sinks, batch, heads_q, dropout_p, softcap, window_size_left, window_size_right);

  Tensor out = new_tensor(q, {total_q, heads_q, q.size(2)}, dtype(q), /*zero=*/true);
  Tensor lse = new_tensor(q, {heads_q, total_q}, ScalarType::Float, /*zero=*/false);
  flash::FlashFwdParams p;
  fill_fwd(p, q, k, v, out, lse, alibi_slopes, sinks, dropout_p, softmax_scale, is_causal, window_size_left,
           window_size_right, softcap, philox_seed, philox_offset);
  p.batch = as_int(batch, "batch");
  p.seqlen_q = as_int(max_seqlen_q, "max_seqlen_q");
  p.seqlen_k = as_int(max_seqlen_k, "max_seqlen_k");
  p.total_q = as_int(total_q, "total_q");
  p.cu_seqlens_q = static_cast<const int32_t*>(data_ptr(cu_seqlens_q));
  p.cu_seqlens_k = static_cast<const int32_t*>(data_ptr(cu_seqlens_k));
  p.seqused_k = opt_ptr<int32_t>(seqused_k);
  if (block_table) {
    p.block_table = opt_ptr<int32_t>(block_table);
    p.block_table_batch_stride = block_table->stride(0);
    p.page_size = static_cast<int>(k.size(1));
  }
  if (batch > 0 && total_q > 0) launch_fwd(p, q);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> varlen_bwd(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& softmax_lse, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k, const OptTensor& seqused_k,
    const OptTensor& alibi_slopes, const OptTensor& sinks, int64_t max_seqlen_q, int64_t max_seqlen_k,
    double dropout_p, double softmax_scale, bool is_causal, int64_t window_size_left, int64_t window_size_right,
    double softcap, bool deterministic, int64_t philox_seed, int64_t philox_offset) {
  const int64_t batch = check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, std::nullopt);
  const int64_t total_q = q.size(0), heads_q = q.size(1);
  check_operand("out", out, q, 3);
  check_operand("dout", dout, q, 3);
  FLASH_CHECK(shape_str(out) == shape_str(q) && shape_str(dout) == shape_str(q), "out and dout must have q's shape ",
              shape_str(q), ", got ", shape_str(out), " and ", shape_str(dout));
  check_same_device("softmax_lse", softmax_lse, q);
  FLASH_CHECK(dtype(softmax_lse) == ScalarType::Float && softmax_lse.dim() == 2 && softmax_lse.size(0) == heads_q &&
                  softmax_lse.size(1) == total_q && softmax_lse.is_contiguous(),
              "softmax_lse must be a contiguous float32 tensor of shape (", heads_q, ", ", total_q, "), got ",
              dtype_name(dtype(softmax_lse)), " ", shape_str(softmax_lse));
  check_scores(q, alibi_slopes, sinks, batch, heads_q, dropout_p, softcap, window_size_left, window_size_right);

  Tensor dq = new_tensor(q, {total_q, heads_q, q.size(2)}, dtype(q), /*zero=*/true);
  Tensor dk = new_tensor(q, {k.size(0), k.size(1), k.size(2)}, dtype(q), /*zero=*/true);
  Tensor dv = new_tensor(q, {v.size(0), v.size(1), v.size(2)}, dtype(q), /*zero=*/true);
  Tensor dsinks = dsinks_like(q, sinks);
  flash::FlashBwdParams p;
  fill_fwd(p, q, k, v, out, softmax_lse, alibi_slopes, sinks, dropout_p, softmax_scale, is_causal, window_size_left,
           window_size_right, softcap, philox_seed, philox_offset);
  fill_bwd(p, dout, dq, dk, dv, dsinks, sinks, deterministic);
  p.batch = as_int(batch, "batch");
  p.seqlen_q = as_int(max_seqlen_q, "max_seqlen_q");
  p.seqlen_k = as_int(max_seqlen_k, "max_seqlen_k");
  p.total_q = as_int(total_q, "total_q");
  p.cu_seqlens_q = static_cast<const int32_t*>(data_ptr(cu_seqlens_q));
  p.cu_seqlens_k = static_cast<const int32_t*>(data_ptr(cu_seqlens_k));
  p.seqused_k = opt_ptr<int32_t>(seqused_k);
  if (batch > 0 && total_q > 0) launch_bwd(p, q);
  return {dq, dk, dv, dsinks};
}

std::tuple<Tensor, Tensor> fwd_kvcache(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                       const OptTensor& seqused_k, const OptTensor& cache_batch_idx,
                                       const OptTensor& leftpad_k, const OptTensor& block_table,
                                       const OptTensor& alibi_slopes, const OptTensor& sinks, double softmax_scale,
                                       bool is_causal, int64_t window_size_left, int64_t window_size_right,
                                       double softcap, int64_t num_splits) {
  check_operand("q", q, q, 4);
  check_operand("k_cache", k_cache, q, 4);
  check_operand("v_cache", v_cache, q, 4);
  check_head_dims(q, k_cache, v_cache);
  for (int i = 0; i < 3; ++i)
    FLASH_CHECK(v_cache.size(i) == k_cache.size(i), "v_cache must have k_cache's shape ", shape_str(k_cache), ", got ",
                shape_str(v_cache));
  const int64_t batch = q.size(0), seqlen_q = q.size(1), heads_q = q.size(2);
  FLASH_CHECK(num_splits >= 0, "num_splits must be >= 0 (0: automatic), got ", num_splits);
  int64_t seqlen_k = k_cache.size(1);
  if (block_table) {
    check_block_table(*block_table, q, batch);
    FLASH_CHECK(!cache_batch_idx, "cache_batch_idx cannot be combined with block_table");
    seqlen_k = block_table->size(1) * k_cache.size(1);
  } else if (!cache_batch_idx) {
    FLASH_CHECK(k_cache.size(0) >= batch, "k_cache must have at least batch=", batch, " rows, got shape ",
                shape_str(k_cache));
  }
  if (seqused_k) check_index_vector("cache_seqlens", *seqused_k, q, batch, "batch");
  if (leftpad_k) check_index_vector("cache_leftpad", *leftpad_k, q, batch, "batch");
  if (cache_batch_idx) {
    check_index_vector("cache_batch_idx", *cache_batch_idx, q, batch, "batch");
    // Reading the indices needs them on the host: checked on CPU, trusted on CUDA (a check
    // there would synchronize the stream).
    if (is_cpu(*cache_batch_idx)) {
      const int32_t* idx = static_cast<const int32_t*>(data_ptr(*cache_batch_idx));
      for (int64_t b = 0; b < batch; ++b)
        FLASH_CHECK(idx[b] >= 0 && idx[b] < k_cache.size(0), "cache_batch_idx[", b, "] = ", idx[b],
                    " is out of range for k_cache with ", k_cache.size(0), " rows");
    }
  }
  check_scores(q, alibi_slopes, sinks, batch, heads_q, 0.0, softcap, window_size_left, window_size_right);

  Tensor out = new_tensor(q, {batch, seqlen_q, heads_q, q.size(3)}, dtype(q), /*zero=*/false);
  Tensor lse = new_tensor(q, {batch, heads_q, seqlen_q}, ScalarType::Float, /*zero=*/false);
  flash::FlashFwdParams p;
  fill_fwd(p, q, k_cache, v_cache, out, lse, alibi_slopes, sinks, 0.0, softmax_scale, is_causal, window_size_left,
           window_size_right, softcap, 0, 0);
  p.batch = as_int(batch, "batch");
  p.seqlen_q = as_int(seqlen_q, "seqlen_q");
  p.seqlen_k = as_int(seqlen_k, "seqlen_k");
  p.seqused_k = opt_ptr<int32_t>(seqused_k);
  p.leftpad_k = opt_ptr<int32_t>(leftpad_k);
  p.cache_batch_idx = opt_ptr<int32_t>(cache_batch_idx);
  if (block_table) {
    p.block_table = opt_ptr<int32_t>(block_table);
    p.block_table_batch_stride = block_table->stride(0);
    p.page_size = static_cast<int>(k_cache.size(1));
  }
  p.num_splits = static_cast<int>(num_splits);  // 0: the backend chooses
  if (batch > 0 && seqlen_q > 0) launch_fwd(p, q);
  return {out, lse};
}

namespace {

// An FP8 operand: float8_e4m3fn on q's device, rank `rank`, last dim contiguous.
void check_fp8_operand(const char* name, const Tensor& t, const Tensor& q, int64_t rank) {
  FLASH_CHECK(dtype(t) == ScalarType::Float8_e4m3fn, name, " must be float8_e4m3fn, got ", dtype_name(dtype(t)));
  check_same_device(name, t, q);
  FLASH_CHECK(t.dim() == rank, name, " must have ", rank, " dimensions, got shape ", shape_str(t));
  FLASH_CHECK(t.stride(t.dim() - 1) == 1, name, " must have a contiguous last dimension, got stride ",
              t.stride(t.dim() - 1));
}

// A descale factor tensor: float32, contiguous (batch, heads_kv), on q's device.
void check_descale(const char* name, const OptTensor& t, const Tensor& q, int64_t batch, int64_t heads_kv) {
  if (!t) return;
  check_same_device(name, *t, q);
  FLASH_CHECK(dtype(*t) == ScalarType::Float, name, " must be float32, got ", dtype_name(dtype(*t)));
  FLASH_CHECK(t->dim() == 2 && t->size(0) == batch && t->size(1) == heads_kv, name, " must have shape (batch=", batch,
              ", heads_kv=", heads_kv, "), got ", shape_str(*t));
  FLASH_CHECK(t->is_contiguous(), name, " must be contiguous");
}

}  // namespace

std::tuple<Tensor, Tensor> fwd_fp8(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& cu_seqlens_q,
                                   const OptTensor& cu_seqlens_k, const OptTensor& seqused_k,
                                   const OptTensor& q_descale, const OptTensor& k_descale, const OptTensor& v_descale,
                                   const OptTensor& sinks, int64_t max_seqlen_q, int64_t max_seqlen_k,
                                   double softmax_scale, bool is_causal, int64_t window_size_left,
                                   int64_t window_size_right, int64_t num_splits) {
  const bool varlen = cu_seqlens_q.has_value();
  FLASH_CHECK(varlen == cu_seqlens_k.has_value(), "cu_seqlens_q and cu_seqlens_k must be given together (varlen)");
  FLASH_CHECK(!seqused_k || varlen, "seqused_k needs cu_seqlens_q / cu_seqlens_k (varlen)");
  const int64_t rank = varlen ? 3 : 4;
  check_fp8_operand("q", q, q, rank);
  check_fp8_operand("k", k, q, rank);
  check_fp8_operand("v", v, q, rank);
  check_head_dims(q, k, v);
  const int64_t d = q.size(rank - 1);
  FLASH_CHECK(d % 16 == 0, "float8_e4m3fn head_dim must be a multiple of 16 (the Python API pads it), got ", d);
  FLASH_CHECK(num_splits >= 0, "num_splits must be >= 0 (0: automatic), got ", num_splits);
  int64_t batch, seqlen_q, seqlen_k;
  if (varlen) {
    FLASH_CHECK(cu_seqlens_q->dim() == 1 && cu_seqlens_q->size(0) >= 1, "cu_seqlens_q must have shape (batch + 1,), got ",
                shape_str(*cu_seqlens_q));
    batch = cu_seqlens_q->size(0) - 1;
    check_index_vector("cu_seqlens_q", *cu_seqlens_q, q, batch + 1, "batch + 1");
    check_index_vector("cu_seqlens_k", *cu_seqlens_k, q, batch + 1, "batch + 1, like cu_seqlens_q");
    if (seqused_k) check_index_vector("seqused_k", *seqused_k, q, batch, "batch");
    FLASH_CHECK(v.size(0) == k.size(0), "v must have k's shape ", shape_str(k), ", got ", shape_str(v));
    FLASH_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0, "max_seqlen_q / max_seqlen_k must be >= 0, got ", max_seqlen_q,
                " / ", max_seqlen_k);
    seqlen_q = max_seqlen_q;
    seqlen_k = max_seqlen_k;
  } else {
    batch = q.size(0);
    seqlen_q = q.size(1);
    seqlen_k = k.size(1);
    FLASH_CHECK(k.size(0) == batch, "k's batch must equal q's (", batch, "), got shape ", shape_str(k));
    FLASH_CHECK(v.size(0) == batch && v.size(1) == seqlen_k, "v must have k's batch and seqlen (", batch, ", ",
                seqlen_k, "), got shape ", shape_str(v));
  }
  const int64_t heads_q = q.size(rank - 2), heads_kv = k.size(rank - 2);
  check_scores(q, std::nullopt, sinks, batch, heads_q, 0.0, 0.0, window_size_left, window_size_right);
  check_descale("q_descale", q_descale, q, batch, heads_kv);
  check_descale("k_descale", k_descale, q, batch, heads_kv);
  check_descale("v_descale", v_descale, q, batch, heads_kv);

  std::vector<int64_t> out_shape(q.dim());
  for (int64_t i = 0; i < q.dim(); ++i) out_shape[i] = q.size(i);
  Tensor out = new_tensor(q, out_shape, ScalarType::BFloat16, /*zero=*/varlen);
  Tensor lse = varlen ? new_tensor(q, {heads_q, q.size(0)}, ScalarType::Float, false)
                      : new_tensor(q, {batch, heads_q, seqlen_q}, ScalarType::Float, false);
  flash::FlashFwdParams p;
  fill_fwd(p, q, k, v, out, lse, std::nullopt, sinks, 0.0, softmax_scale, is_causal, window_size_left,
           window_size_right, 0.0, 0, 0);
  p.batch = as_int(batch, "batch");
  p.seqlen_q = as_int(seqlen_q, "seqlen_q");
  p.seqlen_k = as_int(seqlen_k, "seqlen_k");
  if (varlen) {
    p.total_q = as_int(q.size(0), "total_q");
    p.cu_seqlens_q = static_cast<const int32_t*>(data_ptr(*cu_seqlens_q));
    p.cu_seqlens_k = static_cast<const int32_t*>(data_ptr(*cu_seqlens_k));
    p.seqused_k = opt_ptr<int32_t>(seqused_k);
  }
  p.q_descale = opt_ptr<float>(q_descale);
  p.k_descale = opt_ptr<float>(k_descale);
  p.v_descale = opt_ptr<float>(v_descale);
  p.num_splits = static_cast<int>(num_splits);
#if defined(CUDA_KERNEL)
  if (batch > 0 && seqlen_q > 0) launch_fwd(p, q);
#else
  FLASH_CHECK(false, "float8_e4m3fn attention runs on CUDA (sm90: H100 / H200) only, got q on ", device_str(q));
#endif
  return {out, lse};
}

}  // namespace flash_binding

// ---- registration ------------------------------------------------------------------------------

namespace {

constexpr const char* kFwdSchema =
    "fwd(Tensor q, Tensor k, Tensor v, Tensor? alibi_slopes, Tensor? sinks, float dropout_p, float softmax_scale, "
    "bool is_causal, int window_size_left, int window_size_right, float softcap, int philox_seed, "
    "int philox_offset) -> (Tensor out, Tensor softmax_lse)";
constexpr const char* kBwdSchema =
    "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor softmax_lse, Tensor? alibi_slopes, "
    "Tensor? sinks, float dropout_p, float softmax_scale, bool is_causal, int window_size_left, "
    "int window_size_right, float softcap, bool deterministic, int philox_seed, int philox_offset) "
    "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dsinks)";
constexpr const char* kVarlenFwdSchema =
    "varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, Tensor? seqused_k, "
    "Tensor? block_table, Tensor? alibi_slopes, Tensor? sinks, int max_seqlen_q, int max_seqlen_k, "
    "float dropout_p, float softmax_scale, bool is_causal, int window_size_left, int window_size_right, "
    "float softcap, int philox_seed, int philox_offset) -> (Tensor out, Tensor softmax_lse)";
constexpr const char* kVarlenBwdSchema =
    "varlen_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor softmax_lse, Tensor cu_seqlens_q, "
    "Tensor cu_seqlens_k, Tensor? seqused_k, Tensor? alibi_slopes, Tensor? sinks, int max_seqlen_q, "
    "int max_seqlen_k, float dropout_p, float softmax_scale, bool is_causal, int window_size_left, "
    "int window_size_right, float softcap, bool deterministic, int philox_seed, int philox_offset) "
    "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dsinks)";
constexpr const char* kFwdFp8Schema =
    "fwd_fp8(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? seqused_k, "
    "Tensor? q_descale, Tensor? k_descale, Tensor? v_descale, Tensor? sinks, int max_seqlen_q, int max_seqlen_k, "
    "float softmax_scale, bool is_causal, int window_size_left, int window_size_right, int num_splits) "
    "-> (Tensor out, Tensor softmax_lse)";
constexpr const char* kFwdKvcacheSchema =
    "fwd_kvcache(Tensor q, Tensor k_cache, Tensor v_cache, Tensor? seqused_k, Tensor? cache_batch_idx, "
    "Tensor? leftpad_k, Tensor? block_table, Tensor? alibi_slopes, Tensor? sinks, float softmax_scale, "
    "bool is_causal, int window_size_left, int window_size_right, float softcap, int num_splits) "
    "-> (Tensor out, Tensor softmax_lse)";

}  // namespace

#ifdef TORCH_TARGET_VERSION

STABLE_TORCH_LIBRARY_EXPAND(TORCH_EXTENSION_NAME, ops) {
  ops.def(kFwdSchema);
  ops.def(kBwdSchema);
  ops.def(kVarlenFwdSchema);
  ops.def(kVarlenBwdSchema);
  ops.def(kFwdKvcacheSchema);
  ops.def(kFwdFp8Schema);
}

#define FLASH_REGISTER_IMPLS(ops)                                    \
  ops.impl("fwd", TORCH_BOX(&flash_binding::fwd));                   \
  ops.impl("bwd", TORCH_BOX(&flash_binding::bwd));                   \
  ops.impl("varlen_fwd", TORCH_BOX(&flash_binding::varlen_fwd));     \
  ops.impl("varlen_bwd", TORCH_BOX(&flash_binding::varlen_bwd));     \
  ops.impl("fwd_kvcache", TORCH_BOX(&flash_binding::fwd_kvcache)); \
  ops.impl("fwd_fp8", TORCH_BOX(&flash_binding::fwd_fp8))

#if defined(CUDA_KERNEL)
STABLE_TORCH_LIBRARY_IMPL_EXPAND(TORCH_EXTENSION_NAME, CUDA, ops) { FLASH_REGISTER_IMPLS(ops); }
#elif defined(CPU_KERNEL)
STABLE_TORCH_LIBRARY_IMPL_EXPAND(TORCH_EXTENSION_NAME, CPU, ops) { FLASH_REGISTER_IMPLS(ops); }
#endif

#else

TORCH_LIBRARY_EXPAND(TORCH_EXTENSION_NAME, ops) {
  ops.def(kFwdSchema);
  ops.def(kBwdSchema);
  ops.def(kVarlenFwdSchema);
  ops.def(kVarlenBwdSchema);
  ops.def(kFwdKvcacheSchema);
  ops.def(kFwdFp8Schema);
#if defined(CUDA_KERNEL)
  const auto key = c10::kCUDA;
#elif defined(CPU_KERNEL)
  const auto key = c10::kCPU;
#endif
#if defined(CUDA_KERNEL) || defined(CPU_KERNEL)
  ops.impl("fwd", key, &flash_binding::fwd);
  ops.impl("bwd", key, &flash_binding::bwd);
  ops.impl("varlen_fwd", key, &flash_binding::varlen_fwd);
  ops.impl("varlen_bwd", key, &flash_binding::varlen_bwd);
  ops.impl("fwd_kvcache", key, &flash_binding::fwd_kvcache);
  ops.impl("fwd_fp8", key, &flash_binding::fwd_fp8);
#endif
}

#endif

REGISTER_EXTENSION(TORCH_EXTENSION_NAME)
