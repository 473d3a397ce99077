"""flash-attn 2's Python API over this kernel's ops: same names, argument order and defaults.

Tensors are (batch, seqlen, heads, head_dim), or (total_tokens, heads, head_dim) for the varlen
functions; causal masks are aligned bottom-right; window_size=(left, right) with -1 unbounded.
Additions: `sinks` (alias `s_aux`, `learnable_sink`: one logit per query head that joins the
softmax denominator, GPT-OSS style) and `seqused_k` / `block_table` on the varlen function.

FP8 (FlashAttention-3's convention): q, k, v in torch.float8_e4m3fn run a forward-only kernel on
sm90 (H100 / H200) and return bfloat16; `q_descale`, `k_descale`, `v_descale` (float32, shape
(batch, heads_kv) or one value for all) scale the scores by q_descale * k_descale and the output
by v_descale. No dropout, softcap, ALiBi, paged KV or backward with FP8.

Dropout draws its Philox (seed, offset) pair in Python, from torch's default generator of the
device, and passes them to the kernel as numbers; the backward reuses the same pair:
  - CUDA: seed = generator.initial_seed(), offset = generator.get_offset(), then the generator's
    offset is advanced by 4, so every call gets a fresh counter range and torch.manual_seed
    reproduces a run;
  - CPU (whose generator has no offset): a 64-bit seed drawn with torch.randint, offset 0.
"""

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from . import _meta  # noqa: F401  (registers the fake implementations)
from ._ops import ops

_INT64_WRAP = 1 << 64


def _philox_seed_offset(device: torch.device, dropout_p: float) -> Tuple[int, int]:
    """The (seed, offset) pair for one dropout call; (0, 0) without dropout."""
    if dropout_p == 0.0:
        return 0, 0
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        generator = torch.cuda.default_generators[index]
        seed, offset = generator.initial_seed(), generator.get_offset()
        generator.set_offset(offset + 4)
    else:
        seed = int(torch.randint(-(1 << 63), (1 << 63) - 1, (1,), dtype=torch.int64).item())
        offset = 0
    # the op takes int64; the kernel reads the bits back as uint64
    return (seed - _INT64_WRAP if seed >= 1 << 63 else seed), offset


def _resolve_sinks(sinks: Optional[torch.Tensor], s_aux: Optional[torch.Tensor],
                   learnable_sink: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    given = [t for t in (sinks, s_aux, learnable_sink) if t is not None]
    if len(given) > 1:
        raise ValueError("pass attention sinks once: sinks, s_aux and learnable_sink are aliases")
    return given[0].float() if given else None


def _window(window_size: Sequence[int]) -> Tuple[int, int]:
    if len(window_size) != 2:
        raise ValueError(f"window_size must be (left, right), got {tuple(window_size)}")
    return int(window_size[0]), int(window_size[1])


def _pad_head_dim(x: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """Pads the last dim to a multiple of 8 (16 for FP8: the kernels' granularity), as flash-attn does."""
    d = x.shape[-1]
    if d % multiple == 0:
        return x
    if x.dtype != torch.float8_e4m3fn:
        return F.pad(x, (0, multiple - d % multiple))
    padded = x.new_zeros(x.shape[:-1] + (d + multiple - d % multiple,))  # (F.pad has no float8 kernel)
    padded[..., :d] = x
    return padded


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_head_dim(q: torch.Tensor) -> None:
    if q.shape[-1] > 256:
        raise ValueError(f"q's head_dim must be at most 256, got {q.shape[-1]}")


def _descale(t: Optional[torch.Tensor], batch: int, heads_kv: int) -> Optional[torch.Tensor]:
    """A descale factor as the kernel takes it: float32 (batch, heads_kv); one value is broadcast."""
    if t is None:
        return None
    t = t.to(torch.float32)
    if t.numel() == 1:
        t = t.reshape(1, 1).expand(batch, heads_kv)
    return t.contiguous()


def _fp8_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, descales,
                 softmax_scale, causal, window_size, sinks, dropout_p, softcap, alibi_slopes, block_table=None):
    """The FP8 forward (no autograd): returns (out in bfloat16, softmax_lse)."""
    if k.dtype != torch.float8_e4m3fn or v.dtype != torch.float8_e4m3fn:
        raise ValueError(f"with q in float8_e4m3fn, k and v must be float8_e4m3fn too, got {k.dtype} and {v.dtype}")
    unsupported = {"dropout_p": dropout_p != 0.0, "softcap": softcap != 0.0, "alibi_slopes": alibi_slopes is not None,
                   "block_table": block_table is not None}
    given = [name for name, on in unsupported.items() if on]
    if given:
        raise ValueError(f"float8_e4m3fn attention does not support {', '.join(given)}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError("float8_e4m3fn attention is forward only: call it without requires_grad inputs")
    batch = q.shape[0] if cu_seqlens_q is None else cu_seqlens_q.shape[0] - 1
    heads_kv = k.shape[-2]
    wl, wr = _window(window_size)
    return ops.fwd_fp8(_pad_head_dim(q, 16), _pad_head_dim(k, 16), _pad_head_dim(v, 16), cu_seqlens_q, cu_seqlens_k,
                       seqused_k, *(_descale(t, batch, heads_kv) for t in descales), sinks, int(max_seqlen_q),
                       int(max_seqlen_k), float(softmax_scale), bool(causal), wl, wr, 0)


def _check_descales(q: torch.Tensor, descales) -> None:
    if q.dtype != torch.float8_e4m3fn and any(t is not None for t in descales):
        raise ValueError(f"q_descale, k_descale and v_descale apply to float8_e4m3fn inputs only, got q in {q.dtype}")


def _no_zero_grads(ctx) -> None:
    """Hands backward None for lse's gradient (lse is not differentiable) instead of a zero tensor
    that autograd would allocate and fill on every call, before the backward's first kernel."""
    ctx.set_materialize_grads(False)


class _FlashAttnFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, alibi_slopes, dropout_p, softmax_scale, causal, window_left, window_right,
                softcap, deterministic, seed, offset):
        out, lse = ops.fwd(q, k, v, alibi_slopes, sinks, dropout_p, softmax_scale, causal, window_left, window_right,
                           softcap, seed, offset)
        ctx.save_for_backward(q, k, v, out, lse, sinks, alibi_slopes)
        ctx.args = (dropout_p, softmax_scale, causal, window_left, window_right, softcap, deterministic, seed, offset)
        ctx.mark_non_differentiable(lse)
        _no_zero_grads(ctx)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        if dout is None:
            return (None,) * 14
        q, k, v, out, lse, sinks, alibi_slopes = ctx.saved_tensors
        dropout_p, scale, causal, wl, wr, softcap, deterministic, seed, offset = ctx.args
        dq, dk, dv, dsinks = ops.bwd(_last_dim_contiguous(dout), q, k, v, out, lse, alibi_slopes, sinks, dropout_p,
                                     scale, causal, wl, wr, softcap, deterministic, seed, offset)
        return dq, dk, dv, (dsinks if sinks is not None else None), None, None, None, None, None, None, None, None, \
            None, None


class _FlashAttnVarlenFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table, alibi_slopes, max_seqlen_q,
                max_seqlen_k, dropout_p, softmax_scale, causal, window_left, window_right, softcap, deterministic, seed,
                offset):
        out, lse = ops.varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table, alibi_slopes, sinks,
                                  max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, window_left,
                                  window_right, softcap, seed, offset)
        ctx.save_for_backward(q, k, v, out, lse, sinks, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi_slopes)
        ctx.args = (max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, window_left, window_right, softcap,
                    deterministic, seed, offset)
        ctx.mark_non_differentiable(lse)
        _no_zero_grads(ctx)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        if dout is None:
            return (None,) * 20
        q, k, v, out, lse, sinks, cu_q, cu_k, seqused_k, alibi_slopes = ctx.saved_tensors
        max_q, max_k, dropout_p, scale, causal, wl, wr, softcap, deterministic, seed, offset = ctx.args
        dq, dk, dv, dsinks = ops.varlen_bwd(_last_dim_contiguous(dout), q, k, v, out, lse, cu_q, cu_k, seqused_k,
                                            alibi_slopes, sinks, max_q, max_k, dropout_p, scale, causal, wl, wr,
                                            softcap, deterministic, seed, offset)
        return (dq, dk, dv, dsinks if sinks is not None else None) + (None,) * 16


def _finish(out: torch.Tensor, lse: torch.Tensor, head_dim: int, return_attn_probs: bool):
    out = out[..., :head_dim]
    # S_dmask (the dropout pattern of flash-attn's debug path) is not materialized: None.
    return (out, lse, None) if return_attn_probs else out


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    sinks: Optional[torch.Tensor] = None,
    s_aux: Optional[torch.Tensor] = None,
    learnable_sink: Optional[torch.Tensor] = None,
    q_descale: Optional[torch.Tensor] = None,
    k_descale: Optional[torch.Tensor] = None,
    v_descale: Optional[torch.Tensor] = None,
):
    """Attention of q (batch, seqlen_q, heads, d) over k, v (batch, seqlen_k, heads_kv, d).

    Returns out (batch, seqlen_q, heads, d), or (out, softmax_lse, None) when return_attn_probs.
    float8_e4m3fn q, k, v: the FP8 forward (module docstring), out in bfloat16.
    """
    _check_head_dim(q)
    descales = (q_descale, k_descale, v_descale)
    _check_descales(q, descales)
    head_dim = q.shape[-1]
    scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
    if q.dtype == torch.float8_e4m3fn:
        out, lse = _fp8_forward(q, k, v, None, None, None, 0, 0, descales, scale, causal, window_size,
                                _resolve_sinks(sinks, s_aux, learnable_sink), dropout_p, softcap, alibi_slopes)
        return _finish(out, lse, head_dim, return_attn_probs)
    wl, wr = _window(window_size)
    seed, offset = _philox_seed_offset(q.device, dropout_p)
    out, lse = _FlashAttnFunc.apply(
        _pad_head_dim(q), _pad_head_dim(k), _pad_head_dim(v), _resolve_sinks(sinks, s_aux, learnable_sink),
        alibi_slopes, float(dropout_p), float(scale), bool(causal), wl, wr, float(softcap), bool(deterministic), seed,
        offset)
    return _finish(out, lse, head_dim, return_attn_probs)


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: Optional[torch.Tensor] = None,
    *,
    seqused_k: Optional[torch.Tensor] = None,
    sinks: Optional[torch.Tensor] = None,
    s_aux: Optional[torch.Tensor] = None,
    learnable_sink: Optional[torch.Tensor] = None,
    q_descale: Optional[torch.Tensor] = None,
    k_descale: Optional[torch.Tensor] = None,
    v_descale: Optional[torch.Tensor] = None,
):
    """Attention over packed sequences: q (total_q, heads, d), k, v (total_k, heads_kv, d).

    Sequence b owns rows [cu_seqlens_q[b], cu_seqlens_q[b+1]) of q (int32 offsets, batch + 1).
    With block_table (batch, max_pages), k and v are paged caches (num_pages, page_size,
    heads_kv, d) and cu_seqlens_k / seqused_k give each sequence's key count (forward only).
    float8_e4m3fn q, k, v: the FP8 forward (module docstring), out in bfloat16.
    """
    _check_head_dim(q)
    descales = (q_descale, k_descale, v_descale)
    _check_descales(q, descales)
    head_dim = q.shape[-1]
    scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
    if q.dtype == torch.float8_e4m3fn:
        out, lse = _fp8_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, descales,
                                scale, causal, window_size, _resolve_sinks(sinks, s_aux, learnable_sink), dropout_p,
                                softcap, alibi_slopes, block_table)
        return _finish(out, lse, head_dim, return_attn_probs)
    wl, wr = _window(window_size)
    seed, offset = _philox_seed_offset(q.device, dropout_p)
    out, lse = _FlashAttnVarlenFunc.apply(
        _pad_head_dim(q), _pad_head_dim(k), _pad_head_dim(v), _resolve_sinks(sinks, s_aux, learnable_sink),
        cu_seqlens_q, cu_seqlens_k, seqused_k, block_table, alibi_slopes, int(max_seqlen_q), int(max_seqlen_k),
        float(dropout_p), float(scale), bool(causal), wl, wr, float(softcap), bool(deterministic), seed, offset)
    return _finish(out, lse, head_dim, return_attn_probs)


def flash_attn_qkvpacked_func(qkv: torch.Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                              causal: bool = False, window_size: Sequence[int] = (-1, -1), softcap: float = 0.0,
                              alibi_slopes: Optional[torch.Tensor] = None, deterministic: bool = False,
                              return_attn_probs: bool = False, **kwargs):
    """flash_attn_func with q, k, v packed as qkv (batch, seqlen, 3, heads, d)."""
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal, window_size,
                           softcap, alibi_slopes, deterministic, return_attn_probs, **kwargs)


def flash_attn_kvpacked_func(q: torch.Tensor, kv: torch.Tensor, dropout_p: float = 0.0,
                             softmax_scale: Optional[float] = None, causal: bool = False,
                             window_size: Sequence[int] = (-1, -1), softcap: float = 0.0,
                             alibi_slopes: Optional[torch.Tensor] = None, deterministic: bool = False,
                             return_attn_probs: bool = False, **kwargs):
    """flash_attn_func with k, v packed as kv (batch, seqlen_k, 2, heads_kv, d)."""
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs, **kwargs)


def flash_attn_varlen_qkvpacked_func(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                                     dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                                     causal: bool = False, window_size: Sequence[int] = (-1, -1),
                                     softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
                                     deterministic: bool = False, return_attn_probs: bool = False, **kwargs):
    """flash_attn_varlen_func with q, k, v packed as qkv (total, 3, heads, d)."""
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs, **kwargs)


def flash_attn_varlen_kvpacked_func(q: torch.Tensor, kv: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                    cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                                    dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                                    causal: bool = False, window_size: Sequence[int] = (-1, -1),
                                    softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
                                    deterministic: bool = False, return_attn_probs: bool = False, **kwargs):
    """flash_attn_varlen_func with k, v packed as kv (total_k, 2, heads_kv, d)."""
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs, **kwargs)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                 interleaved: bool) -> torch.Tensor:
    """Rotates the first 2 * cos.shape[-1] features of x (batch, seqlen, heads, d) at `positions`
    (batch, seqlen) of the cos/sin tables (seqlen_ro, rotary_dim / 2), in float32.

    interleaved rotates pairs (0, 1), (2, 3), ... (GPT-J); otherwise the two halves (GPT-NeoX).
    """
    rotary_dim = 2 * cos.shape[-1]
    c = cos[positions].unsqueeze(2).float()
    s = sin[positions].unsqueeze(2).float()
    x_ro = x[..., :rotary_dim].float()
    if interleaved:
        x1, x2 = x_ro[..., 0::2], x_ro[..., 1::2]
        rotated = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = x_ro.chunk(2, dim=-1)
        rotated = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., rotary_dim:]), dim=-1)


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: Optional[torch.Tensor] = None,
    v: Optional[torch.Tensor] = None,
    rotary_cos: Optional[torch.Tensor] = None,
    rotary_sin: Optional[torch.Tensor] = None,
    cache_seqlens: Optional[Union[int, torch.Tensor]] = None,
    cache_batch_idx: Optional[torch.Tensor] = None,
    cache_leftpad: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: Optional[torch.Tensor] = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
    *,
    sinks: Optional[torch.Tensor] = None,
    s_aux: Optional[torch.Tensor] = None,
    learnable_sink: Optional[torch.Tensor] = None,
):
    """Decoding attention over a KV cache, appending k, v (batch, seqlen_new, heads_kv, d) in place.

    k_cache, v_cache: (batch_cache, seqlen_cache, heads_kv, d), or paged (num_pages, page_size,
    heads_kv, d) with block_table (batch, max_pages). The new rows go to positions
    cache_seqlens[b] .. cache_seqlens[b] + seqlen_new - 1 (absolute rows, leftpad included);
    with rotary_cos/sin, k is rotated at those positions and q at cache_seqlens + i when causal
    or local, else at cache_seqlens. The append and rotary run here as torch ops (no host
    synchronization); the attention runs in the kernel. No autograd.
    """
    _check_head_dim(q)
    if q.dtype == torch.float8_e4m3fn:
        raise ValueError("flash_attn_with_kvcache takes float16 / bfloat16; float8_e4m3fn runs through "
                         "flash_attn_func and flash_attn_varlen_func")
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (the new keys and values to append)")
    head_dim = q.shape[-1]
    batch, seqlen_q = q.shape[0], q.shape[1]
    scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
    wl, wr = _window(window_size)
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device)
    seqused_k = cache_seqlens
    if k is not None:
        if cache_seqlens is None:
            raise ValueError("cache_seqlens is required when appending k and v to the cache")
        seqlen_new = k.shape[1]
        positions = cache_seqlens.long()[:, None] + torch.arange(seqlen_new, device=q.device)
        if rotary_cos is not None:
            k = apply_rotary(k, rotary_cos, rotary_sin, positions, rotary_interleaved)
        _append(k_cache, k, positions, cache_batch_idx, block_table)
        _append(v_cache, v, positions, cache_batch_idx, block_table)
        seqused_k = (cache_seqlens + seqlen_new).to(torch.int32)
    if rotary_cos is not None and cache_seqlens is not None:
        local = causal or wl >= 0 or wr >= 0
        offsets = torch.arange(seqlen_q, device=q.device) if local else torch.zeros(seqlen_q, dtype=torch.long,
                                                                                      device=q.device)
        q = apply_rotary(q, rotary_cos, rotary_sin, cache_seqlens.long()[:, None] + offsets, rotary_interleaved)
    out, lse = ops.fwd_kvcache(
        _pad_head_dim(q), _pad_head_dim(k_cache), _pad_head_dim(v_cache), seqused_k, cache_batch_idx, cache_leftpad,
        block_table, alibi_slopes, _resolve_sinks(sinks, s_aux, learnable_sink), float(scale), bool(causal), wl, wr,
        float(softcap), int(num_splits))
    out = out[..., :head_dim]
    return (out, lse) if return_softmax_lse else out


def _append(cache: torch.Tensor, new: torch.Tensor, positions: torch.Tensor, cache_batch_idx: Optional[torch.Tensor],
            block_table: Optional[torch.Tensor]) -> None:
    """Writes new (batch, seqlen_new, heads_kv, d) into the cache rows at `positions` (batch, seqlen_new)."""
    if block_table is not None:
        page_size = cache.shape[1]
        pages = torch.gather(block_table.long(), 1, positions // page_size)
        cache[pages, positions % page_size] = new.to(cache.dtype)
    else:
        rows = cache_batch_idx.long() if cache_batch_idx is not None else torch.arange(new.shape[0],
                                                                                        device=new.device)
        cache[rows[:, None], positions] = new.to(cache.dtype)
