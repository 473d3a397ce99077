// The one description of an attention call, shared by every backend.
//
// Kernel translation units include this header and no torch header, so one
// compiled kernel object serves every torch version; torch-ext/torch_binding.cpp
// is the only place that fills it.
//
// Layout conventions (flash-attn's):
//   q    (batch, seqlen_q, heads_q,  head_dim)        or varlen (total_q, heads_q,  head_dim)
//   k, v (batch, seqlen_k, heads_kv, head_dim)        or varlen (total_k, heads_kv, head_dim)
//        paged: (num_pages, page_size, heads_kv, head_dim), rows found through block_table
//   out  like q;  softmax_lse (batch, heads_q, seqlen_q) float32, varlen (heads_q, total_q)
//   A row that sees no key (fully masked, or an empty key sequence) gets out = 0 and
//   softmax_lse = +inf (flash-attn's convention: the backward's exp(s - lse) is then 0).
// Strides are in elements; the last dimension is always contiguous.
// Masks are aligned bottom-right: query row i sees key column j when
//   j <= i + (seqlen_k - seqlen_q) + window_right   and   j >= i + (seqlen_k - seqlen_q) - window_left
// where a window side of -1 is unbounded and causal means window_right = 0.
#pragma once

#include <cstdint>

namespace flash {

// kFloat8E4M3: q, k, v in float8 e4m3 (sm90 forward only); out is then bfloat16.
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat8E4M3 = 3 };

struct FlashFwdParams {
  // ---- tensors -------------------------------------------------------------
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* softmax_lse = nullptr;

  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;

  // ---- sizes ---------------------------------------------------------------
  int batch = 0;
  int seqlen_q = 0;   // max over the batch for varlen
  int seqlen_k = 0;   // max over the batch for varlen / cache capacity for kvcache
  int total_q = 0;    // varlen: rows of q (softmax_lse is (heads_q, total_q))
  int heads_q = 0;
  int heads_kv = 0;   // heads_q % heads_kv == 0 (GQA/MQA)
  int head_dim = 0;   // multiple of 8, <= 256
  DType dtype = DType::kBFloat16;

  // ---- score modifiers -----------------------------------------------------
  float softmax_scale = 1.0f;
  bool is_causal = false;
  int window_left = -1;   // -1: unbounded
  int window_right = -1;  // -1: unbounded; causal sets 0
  // Score of (i, j): s = q_i . k_j * softmax_scale; with softcap s = softcap * tanh(s / softcap);
  // then the ALiBi bias is added and the mask applied.
  float softcap = 0.0f;   // 0: off

  // ALiBi: bias -slope * |i + seqlen_k - seqlen_q - j| added to scaled scores.
  const float* alibi_slopes = nullptr;  // (heads_q) or (batch, heads_q)
  int64_t alibi_batch_stride = 0;       // 0 when slopes are per head only

  // Attention sinks: one learnable logit per query head that joins the softmax
  // denominator without contributing a value (GPT-OSS). softmax_lse includes it.
  const float* sinks = nullptr;         // (heads_q) float32

  // ---- dropout: the stream contract is in philox.h ---------------------------
  float dropout_p = 0.0f;               // probability of dropping
  uint64_t philox_seed = 0;
  uint64_t philox_offset = 0;

  // ---- variable length -----------------------------------------------------
  const int32_t* cu_seqlens_q = nullptr;  // (batch + 1): q rows of sequence b are [cu[b], cu[b+1])
  const int32_t* cu_seqlens_k = nullptr;  // (batch + 1)
  const int32_t* seqused_k = nullptr;     // (batch): keys actually used per sequence
  // (batch): first valid key row per sequence (kvcache); the keys of sequence b are then rows
  // [leftpad_k[b], seqused_k[b]) and masks align on their count seqused_k[b] - leftpad_k[b].
  const int32_t* leftpad_k = nullptr;

  // ---- KV cache ------------------------------------------------------------
  const int32_t* block_table = nullptr;   // (batch, max_pages): page index per block of keys
  int64_t block_table_batch_stride = 0;
  int page_size = 0;                      // rows per page when block_table is set
  const int32_t* cache_batch_idx = nullptr;  // (batch): cache row used by sequence b

  // ---- FP8 (dtype kFloat8E4M3) -----------------------------------------------
  // Scores are (q . k) * q_descale * k_descale * softmax_scale and out is (P V) * v_descale, with
  // one factor per (batch, kv head): contiguous (batch, heads_kv) float32; null means 1. P is
  // rounded to e4m3 for the P V product (FlashAttention-3's convention).
  const float* q_descale = nullptr;
  const float* k_descale = nullptr;
  const float* v_descale = nullptr;
  // Scratch of cuda::fwd_fp8_scratch_bytes: V transposed by the forward (fp8 products need both
  // operands K-major).
  void* fp8_scratch = nullptr;

  // ---- split-KV (decode) ---------------------------------------------------
  int num_splits = 1;
  float* out_accum = nullptr;   // (num_splits, batch, heads_q, seqlen_q, head_dim) float32
  float* lse_accum = nullptr;   // (num_splits, batch, heads_q, seqlen_q) float32

  bool is_varlen() const { return cu_seqlens_q != nullptr; }
};

struct FlashBwdParams : FlashFwdParams {
  const void* dout = nullptr;   // like out
  void* dq = nullptr;           // like q
  void* dk = nullptr;           // like k
  void* dv = nullptr;           // like v
  float* dsinks = nullptr;      // (heads_q) float32, when sinks is set

  int64_t do_batch_stride = 0, do_row_stride = 0, do_head_stride = 0;
  int64_t dq_batch_stride = 0, dq_row_stride = 0, dq_head_stride = 0;
  int64_t dk_batch_stride = 0, dk_row_stride = 0, dk_head_stride = 0;
  int64_t dv_batch_stride = 0, dv_row_stride = 0, dv_head_stride = 0;

  bool deterministic = false;
  float* workspace = nullptr;   // backend-specific scratch, sized by *_bwd_workspace_bytes
};

}  // namespace flash
