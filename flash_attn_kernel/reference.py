"""Reference attention every kernel test compares against (DESIGN.md's correctness convention).

Plain torch, written for clarity rather than speed: it materializes the full score matrix.
It implements every feature of the kernels with the same conventions (csrc/flash_params.h):
bottom-right aligned causal/window masks, softcap, ALiBi, attention sinks, GQA/MQA, varlen,
paged KV, KV-cache append with rotary, and dropout with the Philox stream of csrc/philox.h,
computed bit for bit in int64 arithmetic. `compute_dtype` picks the precision: float64 or
float32 for the reference itself, or the inputs' dtype (None) to measure the error of "the
same math done in the input precision". Gradients come from autograd through these functions.

torch is imported inside functions (this package's convention), so importing this module is cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence, Tuple

if TYPE_CHECKING:
    import torch

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF


def _mul_hi_lo(a: int, b: "torch.Tensor") -> Tuple["torch.Tensor", "torch.Tensor"]:
    """High and low 32 bits of the 64-bit product of the constant a and uint32 values b (int64)."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    p_lo = b * a_lo  # < 2^48
    p_hi = b * a_hi  # < 2^48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = ((p_hi & 0xFFFF) << 16) + p_lo
    return hi & _U32, lo & _U32


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox 4x32-10 over int64 tensors holding uint32 counters; keys are Python ints."""
    for _ in range(10):
        hi0, lo0 = _mul_hi_lo(_M0, c0)
        hi1, lo1 = _mul_hi_lo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _W0) & _U32
        k1 = (k1 + _W1) & _U32
    return c0, c1, c2, c3


def dropout_threshold(p: float) -> int:
    """philox.h's threshold: min(uint32(p * 2^32), 2^32 - 1), p rounded to float32 first."""
    import struct

    p32 = struct.unpack("f", struct.pack("f", p))[0]
    t = p32 * 4294967296.0
    return _U32 if t >= 4294967295.0 else int(t)


def dropout_keep_mask(seed: int, offset: int, bh: "torch.Tensor", seqlen_q: int, seqlen_k: int,
                      p: float) -> "torch.Tensor":
    """Keep flags (len(bh), seqlen_q, seqlen_k) of the scores of the (sequence * heads_q + head)
    indices `bh` (int64), per csrc/philox.h."""
    import torch

    seed &= (1 << 64) - 1
    offset &= (1 << 64) - 1
    dev = bh.device
    i = torch.arange(seqlen_q, dtype=torch.int64, device=dev)[None, :, None]
    j = torch.arange(seqlen_k, dtype=torch.int64, device=dev)[None, None, :]
    shape = (bh.shape[0], seqlen_q, seqlen_k)
    c0 = (j >> 2).expand(shape)
    c1 = (i & _U32).expand(shape)
    c2 = (bh[:, None, None] & _U32).expand(shape)
    c3 = torch.full(shape, offset & _U32, dtype=torch.int64, device=dev)
    k0 = seed & _U32
    k1 = ((seed >> 32) ^ (offset >> 32)) & _U32
    words = torch.stack(philox4x32_10(c0, c1, c2, c3, k0, k1), dim=-1)
    word = torch.gather(words, -1, (j & 3).expand(shape).unsqueeze(-1)).squeeze(-1)
    return word >= dropout_threshold(p)


def attention_ref(
    q: "torch.Tensor",
    k: "torch.Tensor",
    v: "torch.Tensor",
    *,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional["torch.Tensor"] = None,
    sinks: Optional["torch.Tensor"] = None,
    dropout_p: float = 0.0,
    philox_seed: int = 0,
    philox_offset: int = 0,
    batch_ids: Optional["torch.Tensor"] = None,
    compute_dtype: Optional["torch.dtype"] = None,
) -> Tuple["torch.Tensor", "torch.Tensor"]:
    """Dense attention: q (b, sq, hq, d), k, v (b, sk, hk, d) -> out (b, sq, hq, d) in
    compute_dtype, lse (b, hq, sq) (+inf for rows that see no key, whose out is 0).

    alibi_slopes: (hq) or (b, hq); sinks: (hq); batch_ids: the sequence index of each batch row
    for the dropout stream (default 0..b-1).
    """
    import torch

    dt = compute_dtype or q.dtype
    b, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    qf, kf, vf = q.to(dt), k.to(dt), v.to(dt)
    if hq != hk:
        kf = kf.repeat_interleave(hq // hk, dim=2)
        vf = vf.repeat_interleave(hq // hk, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    row = torch.arange(sq, device=q.device)[:, None]
    col = torch.arange(sk, device=q.device)[None, :]
    diag = sk - sq
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(dt)
        slopes = slopes.expand(b, hq) if slopes.dim() == 1 else slopes
        s = s - slopes[:, :, None, None] * (row + diag - col).abs().to(dt)
    wl, wr = window_size
    if causal:
        wr = 0
    visible = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if wl >= 0:
        visible &= col >= row + diag - wl
    if wr >= 0:
        visible &= col <= row + diag + wr
    has_key = visible.any(-1)  # (sq,)
    s = s.masked_fill(~visible, float("-inf"))
    # rows without keys get finite logits for the logsumexp (their result is replaced below),
    # so autograd sees no inf - inf
    s_lse = torch.where(has_key[:, None], s, torch.zeros((), dtype=dt, device=q.device))
    if sinks is not None:
        sink_col = sinks.to(dt)[None, :, None, None].expand(b, hq, sq, 1)
        s_lse = torch.cat((s_lse, sink_col), dim=-1)
    lse = torch.logsumexp(s_lse, dim=-1)
    p = torch.exp(s - lse[..., None]) * has_key[:, None].to(dt)
    if dropout_p > 0:
        ids = batch_ids if batch_ids is not None else torch.arange(b, device=q.device)
        bh = (ids[:, None].long() * hq + torch.arange(hq, device=q.device)).reshape(-1)
        keep = dropout_keep_mask(philox_seed, philox_offset, bh, sq, sk, dropout_p).reshape(b, hq, sq, sk)
        p = p * keep.to(dt) / (1.0 - dropout_p)
    out = torch.einsum("bhqk,bkhd->bqhd", p, vf)
    lse = torch.where(has_key, lse.float(), torch.full((), float("inf"), device=q.device))
    return out, lse


def _gather_pages(cache: "torch.Tensor", pages: "torch.Tensor", rows: "torch.Tensor") -> "torch.Tensor":
    """Rows `rows` (logical) of a paged cache (num_pages, page_size, h, d) through the page list."""
    page_size = cache.shape[1]
    return cache[pages.long()[rows // page_size], rows % page_size]


def attention_varlen_ref(
    q: "torch.Tensor",
    k: "torch.Tensor",
    v: "torch.Tensor",
    cu_seqlens_q: "torch.Tensor",
    cu_seqlens_k: "torch.Tensor",
    *,
    seqused_k: Optional["torch.Tensor"] = None,
    block_table: Optional["torch.Tensor"] = None,
    alibi_slopes: Optional["torch.Tensor"] = None,
    **kwargs,
) -> Tuple["torch.Tensor", "torch.Tensor"]:
    """Varlen attention: q (total_q, hq, d), k, v (total_k, hk, d) or paged with block_table ->
    out (total_q, hq, d), lse (hq, total_q). Other keywords as attention_ref."""
    import torch

    cu_q = cu_seqlens_q.tolist()
    cu_k = cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(cu_q) - 1):
        len_k = int(seqused_k[b]) if seqused_k is not None else cu_k[b + 1] - cu_k[b]
        qb = q[cu_q[b]:cu_q[b + 1]][None]
        if block_table is not None:
            rows = torch.arange(len_k, device=q.device)
            kb, vb = _gather_pages(k, block_table[b], rows)[None], _gather_pages(v, block_table[b], rows)[None]
        else:
            kb, vb = k[cu_k[b]:cu_k[b] + len_k][None], v[cu_k[b]:cu_k[b] + len_k][None]
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b:b + 1]
        out, lse = attention_ref(qb, kb, vb, alibi_slopes=slopes,
                                 batch_ids=torch.tensor([b], device=q.device), **kwargs)
        outs.append(out[0])
        lses.append(lse[0])
    return torch.cat(outs, 0), torch.cat(lses, 1)


def rotary_ref(x: "torch.Tensor", cos: "torch.Tensor", sin: "torch.Tensor", positions: "torch.Tensor",
               interleaved: bool) -> "torch.Tensor":
    """Rotary embedding of x (b, s, h, d) at positions (b, s), computed in float32, back in x's dtype."""
    rd = 2 * cos.shape[-1]
    out = x.float().clone()
    c = cos.float()[positions][:, :, None, :]  # (b, s, 1, rd/2)
    sn = sin.float()[positions][:, :, None, :]
    if interleaved:
        even, odd = out[..., 0:rd:2].clone(), out[..., 1:rd:2].clone()
        out[..., 0:rd:2] = even * c - odd * sn
        out[..., 1:rd:2] = even * sn + odd * c
    else:
        first, second = out[..., : rd // 2].clone(), out[..., rd // 2: rd].clone()
        out[..., : rd // 2] = first * c - second * sn
        out[..., rd // 2: rd] = first * sn + second * c
    return out.to(x.dtype)


def kvcache_ref(
    q: "torch.Tensor",
    k_cache: "torch.Tensor",
    v_cache: "torch.Tensor",
    k: Optional["torch.Tensor"] = None,
    v: Optional["torch.Tensor"] = None,
    *,
    rotary_cos: Optional["torch.Tensor"] = None,
    rotary_sin: Optional["torch.Tensor"] = None,
    cache_seqlens: Optional["torch.Tensor"] = None,
    cache_batch_idx: Optional["torch.Tensor"] = None,
    cache_leftpad: Optional["torch.Tensor"] = None,
    block_table: Optional["torch.Tensor"] = None,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    rotary_interleaved: bool = True,
    alibi_slopes: Optional["torch.Tensor"] = None,
    **kwargs,
) -> Tuple["torch.Tensor", "torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """flash_attn_with_kvcache's semantics, one sequence at a time: returns
    (out (b, sq, hq, d), lse (b, hq, sq), k_cache', v_cache') where the caches are updated copies."""
    import torch

    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    batch, sq = q.shape[0], q.shape[1]
    seqlens = cache_seqlens.tolist() if cache_seqlens is not None else None
    new = k.shape[1] if k is not None else 0
    local = causal or window_size[0] >= 0 or window_size[1] >= 0
    outs, lses = [], []
    for b in range(batch):
        start = int(cache_leftpad[b]) if cache_leftpad is not None else 0
        end = (seqlens[b] + new) if seqlens is not None else (
            block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[1])
        qb = q[b:b + 1]
        if k is not None:
            kb, vb = k[b:b + 1], v[b:b + 1]
            if rotary_cos is not None:
                pos = torch.arange(seqlens[b], seqlens[b] + new, device=q.device)[None]
                kb = rotary_ref(kb, rotary_cos, rotary_sin, pos, rotary_interleaved)
            for t in range(new):
                row = seqlens[b] + t
                if block_table is not None:
                    page = int(block_table[b, row // k_cache.shape[1]])
                    k_cache[page, row % k_cache.shape[1]] = kb[0, t]
                    v_cache[page, row % k_cache.shape[1]] = vb[0, t]
                else:
                    cb = int(cache_batch_idx[b]) if cache_batch_idx is not None else b
                    k_cache[cb, row] = kb[0, t]
                    v_cache[cb, row] = vb[0, t]
        if rotary_cos is not None and seqlens is not None:
            offs = torch.arange(sq, device=q.device) if local else torch.zeros(sq, dtype=torch.long, device=q.device)
            qb = rotary_ref(qb, rotary_cos, rotary_sin, (seqlens[b] + offs)[None], rotary_interleaved)
        rows = torch.arange(start, end, device=q.device)
        if block_table is not None:
            kb_all, vb_all = _gather_pages(k_cache, block_table[b], rows), _gather_pages(v_cache, block_table[b], rows)
        else:
            cb = int(cache_batch_idx[b]) if cache_batch_idx is not None else b
            kb_all, vb_all = k_cache[cb, start:end], v_cache[cb, start:end]
        slopes = None
        if alibi_slopes is not None:
            slopes = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b:b + 1]
        out, lse = attention_ref(qb, kb_all[None], vb_all[None], causal=causal, window_size=window_size,
                                 alibi_slopes=slopes, **kwargs)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, 0), torch.cat(lses, 0), k_cache, v_cache
