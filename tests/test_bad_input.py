"""Every bad input gets a clear error naming the argument and what was expected, before any launch."""

from __future__ import annotations

import pytest
import torch


def _qkv(device="cpu", dtype=torch.float32, b=2, sq=10, sk=12, hq=4, hk=2, d=64):
    return (torch.randn(b, sq, hq, d, device=device, dtype=dtype), torch.randn(b, sk, hk, d, device=device, dtype=dtype),
            torch.randn(b, sk, hk, d, device=device, dtype=dtype))


def _fwd_args(q, k, v, alibi=None, sinks=None, dropout=0.0, wl=-1, wr=-1, softcap=0.0):
    return (q, k, v, alibi, sinks, dropout, 0.125, False, wl, wr, softcap, 0, 0)


# (description, call(kernel) -> None, expected error text)
def _cases():
    cases = []

    def add(name, fn, match):
        cases.append(pytest.param(fn, match, id=name))

    add("q-float64", lambda m: m.flash_attn_func(*[t.double() for t in _qkv()]),
        r"q must be float32, float16 or bfloat16 on CPU, got float64")
    add("k-dtype-mismatch", lambda m: (lambda q, k, v: m.flash_attn_func(q, k.half(), v))(*_qkv()),
        r"k must have q's dtype \(float32\), got float16")
    add("q-last-dim-strided",
        lambda m: (lambda q, k, v: m.flash_attn_func(torch.randn(2, 10, 64, 4).transpose(-1, -2), k, v))(*_qkv()),
        r"q must have a contiguous last dimension")
    add("q-rank", lambda m: (lambda q, k, v: m.flash_attn_func(q[0], k[0], v[0]))(*_qkv()),
        r"q must have 4 dimensions")
    add("head-dim-over-256", lambda m: m.flash_attn_func(*_qkv(d=264)), r"head_dim must be at most 256, got 264")
    add("head-dim-not-multiple-of-8-op", lambda m: m._ops.ops.fwd(*_fwd_args(*_qkv(d=12))),
        r"head_dim must be a multiple of 8 and at most 256 .* got 12")
    add("k-head-dim", lambda m: (lambda q, k, v: m.flash_attn_func(q, k[..., :32], v))(*_qkv()),
        r"k's head_dim must equal q's \(64\), got 32")
    add("gqa-ratio", lambda m: m.flash_attn_func(*_qkv(hq=3, hk=2)),
        r"q's heads \(3\) must be a multiple of k's heads \(2\)")
    add("v-seqlen", lambda m: (lambda q, k, v: m.flash_attn_func(q, k, v[:, :5]))(*_qkv()),
        r"v must have k's batch and seqlen \(2, 12\)")
    add("k-batch", lambda m: (lambda q, k, v: m.flash_attn_func(q, k[:1], v[:1]))(*_qkv()),
        r"k's batch must equal q's \(2\)")
    add("dropout-one", lambda m: m.flash_attn_func(*_qkv(), dropout_p=1.0), r"dropout_p must be in \[0, 1\), got 1")
    add("dropout-negative", lambda m: m.flash_attn_func(*_qkv(), dropout_p=-0.1), r"dropout_p must be in \[0, 1\)")
    add("softcap-negative", lambda m: m.flash_attn_func(*_qkv(), softcap=-1.0), r"softcap must be >= 0")
    add("window-left", lambda m: m.flash_attn_func(*_qkv(), window_size=(-2, 0)),
        r"window_size\[0\] \(left\) must be >= -1 \(-1: unbounded\), got -2")
    add("window-right", lambda m: m.flash_attn_func(*_qkv(), window_size=(3, -5)),
        r"window_size\[1\] \(right\) must be >= -1")
    add("window-arity", lambda m: m.flash_attn_func(*_qkv(), window_size=(1, 2, 3)),
        r"window_size must be \(left, right\)")
    add("alibi-dtype", lambda m: m.flash_attn_func(*_qkv(), alibi_slopes=torch.rand(4, dtype=torch.float16)),
        r"alibi_slopes must be float32, got float16")
    add("alibi-shape", lambda m: m.flash_attn_func(*_qkv(), alibi_slopes=torch.rand(3)),
        r"alibi_slopes must have shape \(4,\) or \(2, 4\), got \(3\)")
    add("sinks-shape", lambda m: m.flash_attn_func(*_qkv(), sinks=torch.rand(2)),
        r"sinks must have shape \(4,\) \(one per query head\), got \(2\)")
    add("sinks-dtype-op", lambda m: m._ops.ops.fwd(*_fwd_args(*_qkv(), sinks=torch.rand(4).half())),
        r"sinks must be float32, got float16")
    add("sinks-aliases", lambda m: m.flash_attn_func(*_qkv(), sinks=torch.rand(4), s_aux=torch.rand(4)),
        r"sinks, s_aux and learnable_sink are aliases")

    def varlen(m, cu_q=None, cu_k=None, seqused_k=None, block_table=None, k=None):
        q = torch.randn(10, 4, 64)
        k = k if k is not None else torch.randn(12, 2, 64)
        cu_q = cu_q if cu_q is not None else torch.tensor([0, 4, 10], dtype=torch.int32)
        cu_k = cu_k if cu_k is not None else torch.tensor([0, 5, 12], dtype=torch.int32)
        m.flash_attn_varlen_func(q, k, k, cu_q, cu_k, 6, 7, seqused_k=seqused_k, block_table=block_table)

    add("cu-seqlens-q-int64", lambda m: varlen(m, cu_q=torch.tensor([0, 4, 10])), r"cu_seqlens_q must be int32, got int64")
    add("cu-seqlens-k-length", lambda m: varlen(m, cu_k=torch.tensor([0, 12], dtype=torch.int32)),
        r"cu_seqlens_k must have shape \(3,\) \(batch \+ 1, like cu_seqlens_q\), got \(2\)")
    add("seqused-k-shape", lambda m: varlen(m, seqused_k=torch.tensor([1, 2, 3], dtype=torch.int32)),
        r"seqused_k must have shape \(2,\) \(batch\)")
    add("block-table-int64", lambda m: varlen(m, block_table=torch.zeros(2, 2, dtype=torch.int64),
                                              k=torch.randn(4, 8, 2, 64)), r"block_table must be int32, got int64")
    add("block-table-batch", lambda m: varlen(m, block_table=torch.zeros(3, 2, dtype=torch.int32),
                                              k=torch.randn(4, 8, 2, 64)),
        r"block_table must have shape \(batch=2, max_pages\), got \(3, 2\)")
    add("paged-k-rank", lambda m: varlen(m, block_table=torch.zeros(2, 2, dtype=torch.int32)),
        r"k must have 4 dimensions")

    def kvcache(m, **kwargs):
        q = torch.randn(2, 1, 4, 64, dtype=torch.bfloat16)
        cache = torch.randn(3, 16, 2, 64, dtype=torch.bfloat16)
        m.flash_attn_with_kvcache(q, cache, cache.clone(), **kwargs)

    add("cache-batch-idx-range",
        lambda m: kvcache(m, cache_batch_idx=torch.tensor([0, 9], dtype=torch.int32),
                          cache_seqlens=torch.tensor([1, 2], dtype=torch.int32)),
        r"cache_batch_idx\[1\] = 9 is out of range for k_cache with 3 rows")
    add("cache-batch-idx-dtype", lambda m: kvcache(m, cache_batch_idx=torch.tensor([0, 1])),
        r"cache_batch_idx must be int32, got int64")
    add("cache-seqlens-shape", lambda m: kvcache(m, cache_seqlens=torch.tensor([1, 2, 3], dtype=torch.int32)),
        r"cache_seqlens must have shape \(2,\) \(batch\)")
    add("cache-leftpad-dtype",
        lambda m: kvcache(m, cache_seqlens=torch.tensor([1, 2], dtype=torch.int32), cache_leftpad=torch.zeros(2)),
        r"cache_leftpad must be int32, got float32")
    add("kvcache-k-without-v", lambda m: kvcache(m, k=torch.randn(2, 1, 2, 64, dtype=torch.bfloat16)),
        r"k and v must be given together")
    add("kvcache-append-without-seqlens",
        lambda m: kvcache(m, k=torch.randn(2, 1, 2, 64, dtype=torch.bfloat16),
                          v=torch.randn(2, 1, 2, 64, dtype=torch.bfloat16)),
        r"cache_seqlens is required when appending")
    add("num-splits", lambda m: kvcache(m, num_splits=-1), r"num_splits must be >= 0")
    return cases


@pytest.mark.parametrize("call,match", _cases())
def test_bad_input_cpu(kernel_cpu, call, match):
    with pytest.raises(ValueError, match=match):
        call(kernel_cpu)


def test_bwd_lse_shape_cpu(kernel_cpu):
    q, k, v = _qkv()
    ops = kernel_cpu._ops.ops
    out, lse = ops.fwd(*_fwd_args(q, k, v))
    with pytest.raises(ValueError, match=r"softmax_lse must be a contiguous float32 tensor of shape \(2, 4, 10\)"):
        ops.bwd(out, q, k, v, out, lse[:, :2], None, None, 0.0, 0.125, False, -1, -1, 0.0, False, 0, 0)
    with pytest.raises(ValueError, match=r"out and dout must have q's shape"):
        ops.bwd(out[:, :5], q, k, v, out, lse, None, None, 0.0, 0.125, False, -1, -1, 0.0, False, 0, 0)


def test_bad_input_cuda(kernel_cuda):
    q, k, v = _qkv(device="cuda", dtype=torch.float32)
    with pytest.raises(ValueError, match=r"q must be float16 or bfloat16 on CUDA, got float32"):
        kernel_cuda.flash_attn_func(q, k, v)
    q, k, v = _qkv(device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"k must be on the same device as q \(cuda:0\), got cpu"):
        kernel_cuda.flash_attn_func(q, k.cpu(), v)
    with pytest.raises(ValueError, match=r"sinks must be on the same device as q"):
        kernel_cuda.flash_attn_func(q, k, v, sinks=torch.zeros(4))
