"""Fake (meta) implementations of the compiled ops, so torch.compile and opcheck can trace them.

Shapes and dtypes mirror torch_binding.cpp: outputs are fresh contiguous tensors.
"""

from typing import Optional

import torch

from ._ops import add_op_namespace_prefix


@torch.library.register_fake(add_op_namespace_prefix("fwd"))
def _fwd_fake(q, k, v, alibi_slopes, sinks, dropout_p, softmax_scale, is_causal, window_size_left,
              window_size_right, softcap, philox_seed, philox_offset):
    batch, seqlen_q, heads_q, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads_q, seqlen_q), dtype=torch.float32)


def _dsinks(q: torch.Tensor, sinks: Optional[torch.Tensor]) -> torch.Tensor:
    return q.new_empty((sinks.shape[0] if sinks is not None else 0,), dtype=torch.float32)


@torch.library.register_fake(add_op_namespace_prefix("bwd"))
def _bwd_fake(dout, q, k, v, out, softmax_lse, alibi_slopes, sinks, dropout_p, softmax_scale, is_causal,
              window_size_left, window_size_right, softcap, deterministic, philox_seed, philox_offset):
    return q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(v.shape), _dsinks(q, sinks)


@torch.library.register_fake(add_op_namespace_prefix("varlen_fwd"))
def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table, alibi_slopes, sinks,
                     max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, is_causal, window_size_left,
                     window_size_right, softcap, philox_seed, philox_offset):
    total_q, heads_q, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((heads_q, total_q), dtype=torch.float32)


@torch.library.register_fake(add_op_namespace_prefix("varlen_bwd"))
def _varlen_bwd_fake(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi_slopes, sinks,
                     max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, is_causal, window_size_left,
                     window_size_right, softcap, deterministic, philox_seed, philox_offset):
    return q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(v.shape), _dsinks(q, sinks)


@torch.library.register_fake(add_op_namespace_prefix("fwd_kvcache"))
def _fwd_kvcache_fake(q, k_cache, v_cache, seqused_k, cache_batch_idx, leftpad_k, block_table, alibi_slopes, sinks,
                      softmax_scale, is_causal, window_size_left, window_size_right, softcap, num_splits):
    batch, seqlen_q, heads_q, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads_q, seqlen_q), dtype=torch.float32)


@torch.library.register_fake(add_op_namespace_prefix("fwd_fp8"))
def _fwd_fp8_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, q_descale, k_descale, v_descale, sinks,
                  max_seqlen_q, max_seqlen_k, softmax_scale, is_causal, window_size_left, window_size_right,
                  num_splits):
    out = q.new_empty(q.shape, dtype=torch.bfloat16)
    if cu_seqlens_q is not None:
        total_q, heads_q, _ = q.shape
        return out, q.new_empty((heads_q, total_q), dtype=torch.float32)
    batch, seqlen_q, heads_q, _ = q.shape
    return out, q.new_empty((batch, heads_q, seqlen_q), dtype=torch.float32)
