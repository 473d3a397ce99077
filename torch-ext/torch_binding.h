// The ops this extension registers (schemas in torch_binding.cpp). Tensors are flash-attn's
// layout: (batch, seqlen, heads, head_dim), or (total, heads, head_dim) for varlen.
#pragma once

#include <cstdint>
#include <tuple>

#include "tensor_adapter.h"

namespace flash_binding {

// -> (out, softmax_lse (batch, heads_q, seqlen_q))
std::tuple<Tensor, Tensor> fwd(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& alibi_slopes,
                               const OptTensor& sinks, double dropout_p, double softmax_scale, bool is_causal,
                               int64_t window_size_left, int64_t window_size_right, double softcap,
                               int64_t philox_seed, int64_t philox_offset);

// -> (dq, dk, dv, dsinks); dsinks is empty without sinks.
std::tuple<Tensor, Tensor, Tensor, Tensor> bwd(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                               const Tensor& out, const Tensor& softmax_lse,
                                               const OptTensor& alibi_slopes, const OptTensor& sinks, double dropout_p,
                                               double softmax_scale, bool is_causal, int64_t window_size_left,
                                               int64_t window_size_right, double softcap, bool deterministic,
                                               int64_t philox_seed, int64_t philox_offset);

// -> (out, softmax_lse (heads_q, total_q)). With block_table, k and v are paged caches.
std::tuple<Tensor, Tensor> varlen_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens_q,
                                      const Tensor& cu_seqlens_k, const OptTensor& seqused_k,
                                      const OptTensor& block_table, const OptTensor& alibi_slopes,
                                      const OptTensor& sinks, int64_t max_seqlen_q, int64_t max_seqlen_k,
                                      double dropout_p, double softmax_scale, bool is_causal,
                                      int64_t window_size_left, int64_t window_size_right, double softcap,
                                      int64_t philox_seed, int64_t philox_offset);

std::tuple<Tensor, Tensor, Tensor, Tensor> varlen_bwd(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& softmax_lse, const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k, const OptTensor& seqused_k,
    const OptTensor& alibi_slopes, const OptTensor& sinks, int64_t max_seqlen_q, int64_t max_seqlen_k,
    double dropout_p, double softmax_scale, bool is_causal, int64_t window_size_left, int64_t window_size_right,
    double softcap, bool deterministic, int64_t philox_seed, int64_t philox_offset);

// Attention of q over a KV cache whose new rows are already appended (the Python API appends
// and applies rotary first); seqused_k holds the keys in use per sequence.
std::tuple<Tensor, Tensor> fwd_kvcache(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                       const OptTensor& seqused_k, const OptTensor& cache_batch_idx,
                                       const OptTensor& leftpad_k, const OptTensor& block_table,
                                       const OptTensor& alibi_slopes, const OptTensor& sinks, double softmax_scale,
                                       bool is_causal, int64_t window_size_left, int64_t window_size_right,
                                       double softcap, int64_t num_splits);

// FP8 (float8_e4m3fn q, k, v; sm90 only) forward, out in bfloat16: dense (batch, seqlen, heads, d)
// or, with cu_seqlens_q / cu_seqlens_k, varlen (total, heads, d). Scores are
// (q . k) * q_descale * k_descale * softmax_scale and out is (P V) * v_descale, the descales
// (batch, heads_kv) float32 (absent: 1). No backward.
std::tuple<Tensor, Tensor> fwd_fp8(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& cu_seqlens_q,
                                   const OptTensor& cu_seqlens_k, const OptTensor& seqused_k,
                                   const OptTensor& q_descale, const OptTensor& k_descale, const OptTensor& v_descale,
                                   const OptTensor& sinks, int64_t max_seqlen_q, int64_t max_seqlen_k,
                                   double softmax_scale, bool is_causal, int64_t window_size_left,
                                   int64_t window_size_right, int64_t num_splits);

}  // namespace flash_binding
