"""The FP8 (float8_e4m3fn) forward against the float64 reference of its dequantized inputs.

FlashAttention-3's convention: scores are (q . k) * q_descale * k_descale * softmax_scale, out is
(P V) * v_descale in bfloat16, the descales one per (batch, kv head). The kernel rounds P to e4m3
for the P V product, so the low-precision estimate here is the same math with P rounded that way
(in float32); the kernel's max error must be at most 2x that estimate's plus bfloat16's rounding
of the output, and never NaN. GPU cases run on sm90 only; the argument checks run everywhere.
"""

from __future__ import annotations

import importlib
import itertools
import math
import zlib

import pytest
import torch

from flash_attn_kernel.reference import attention_ref

FP8 = torch.float8_e4m3fn


def _seed(*parts) -> None:
    torch.manual_seed(zlib.crc32(repr(parts).encode()))


@pytest.fixture(scope="module")
def kernel_fp8(kernel_cuda):
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the FP8 forward runs on sm90 (H100 / H200)")
    return kernel_cuda


def _fp8(shape, scale=1.0):
    return (torch.randn(shape, device="cuda") * scale).to(FP8)


def _per_query_head(descale: torch.Tensor, heads_q: int) -> torch.Tensor:
    """(batch, heads_kv) -> (batch, 1, heads_q, 1), broadcast over rows and head dim."""
    group = heads_q // descale.shape[1]
    return descale.repeat_interleave(group, dim=1)[:, None, :, None].double()


def _references(q, k, v, qd, kd, vd, **kw):
    """float64 reference of the dequantized inputs, and the estimate with P rounded to e4m3."""
    hq = q.shape[2]
    qf = q.double() * _per_query_head(qd, hq)
    kf = k.double() * _per_query_head(kd, k.shape[2])
    vf = v.double() * _per_query_head(vd, v.shape[2])
    ref, lse = attention_ref(qf, kf, vf, compute_dtype=torch.float64, **kw)
    lowp = _p_rounded(qf.float(), kf.float(), vf.float(), **kw)
    return ref, lse, lowp


def _p_rounded(q, k, v, softmax_scale, causal=False, window_size=(-1, -1), sinks=None):
    """Attention in float32 with P = exp(s - rowmax) * 256 rounded to e4m3 for P V and the row sums
    from the unrounded P, as the kernel computes it (there with a running row max)."""
    b, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    k = k.repeat_interleave(hq // hk, dim=2)
    v = v.repeat_interleave(hq // hk, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * softmax_scale
    i = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
    j = torch.arange(sk, device=q.device)[None, :]
    wl, wr = window_size
    if causal:
        wr = 0
    visible = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if wr >= 0:
        visible &= j <= i + wr
    if wl >= 0:
        visible &= j >= i - wl
    s = s.masked_fill(~visible, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    if sinks is not None:
        l = l + torch.exp(sinks.float()[None, :, None, None] - m)
    p_q = (p * 256).to(FP8).float() / 256
    out = torch.einsum("bhij,bjhd->bihd", p_q, v) / l.transpose(1, 2).clamp_min(1e-30)
    return torch.where(l.transpose(1, 2) > 0, out, torch.zeros_like(out))


def _check(out, ref, lowp, lse=None, ref_lse=None):
    assert out.dtype == torch.bfloat16
    assert not torch.isnan(out).any(), "NaN in the kernel's result"
    err = (out.double() - ref).abs().max().item()
    err_lowp = (lowp.double() - ref).abs().max().item()
    bf16_rounding = ref.abs().max().item() * 2 ** -8
    bound = 2 * err_lowp + 2 * bf16_rounding + 1e-3
    assert err <= bound, f"max error {err:.3g} > 2 x {err_lowp:.3g} (P in e4m3) + 2 x {bf16_rounding:.3g} (bfloat16)"
    if lse is None:
        return
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "rows without keys must have lse = +inf, others finite"
    if finite.any():
        assert (lse[finite] - ref_lse[finite]).abs().max().item() <= 1e-3 * math.sqrt(ref.shape[-1])


_CASES = [
    dict(d=128),
    dict(d=128, causal=True, sq=150, sk=300),
    dict(d=64, hq=6, hk=2),
    dict(d=64, causal=True, sq=300, sk=200),  # more queries than keys: leading rows see no key
    dict(d=256, window=(40, 0)),
    dict(d=256, hq=4, hk=1, causal=True),
    dict(d=96, sinks=True),  # run at the 128 tile width, columns past 96 zero
    dict(d=200, window=(30, 17)),  # padded to 208 in Python, run at 256
    dict(d=128, sq=1, sk=3000, hq=8, hk=2),  # decode: a split count from the heuristic
    dict(d=128, sq=1000, sk=1000, causal=True, batch=1),  # the K/V ring wraps many times
]


@pytest.mark.parametrize("case", range(len(_CASES)))
def test_fp8_dense(kernel_fp8, case):
    c = dict(batch=2, sq=113, sk=140, hq=4, hk=4, causal=False, window=(-1, -1), sinks=False)
    c.update(_CASES[case])
    _seed("fp8", case)
    q = _fp8((c["batch"], c["sq"], c["hq"], c["d"]))
    k = _fp8((c["batch"], c["sk"], c["hk"], c["d"]))
    v = _fp8((c["batch"], c["sk"], c["hk"], c["d"]))
    qd, kd, vd = (torch.rand(c["batch"], c["hk"], device="cuda") * 2 + 0.25 for _ in range(3))
    sinks = torch.randn(c["hq"], device="cuda") if c["sinks"] else None
    scale = c["d"] ** -0.5
    out, lse, _ = kernel_fp8.flash_attn_func(q, k, v, softmax_scale=scale, causal=c["causal"],
                                             window_size=c["window"], sinks=sinks, return_attn_probs=True,
                                             q_descale=qd, k_descale=kd, v_descale=vd)
    kw = dict(softmax_scale=scale, causal=c["causal"], window_size=c["window"], sinks=sinks)
    ref, ref_lse, lowp = _references(q, k, v, qd, kd, vd, **kw)
    _check(out, ref, lowp, lse, ref_lse)


def test_fp8_varlen(kernel_fp8):
    """Packed sequences (one empty), seqused_k, GQA, causal, one descale value for all heads."""
    _seed("fp8-varlen")
    lens_q, lens_k = [0, 130, 64, 257], [5, 200, 64, 300]
    used_k = [5, 150, 64, 300]
    hq, hk, d = 4, 2, 128
    cu_q = torch.tensor([0, *itertools.accumulate(lens_q)], dtype=torch.int32, device="cuda")
    cu_k = torch.tensor([0, *itertools.accumulate(lens_k)], dtype=torch.int32, device="cuda")
    seqused = torch.tensor(used_k, dtype=torch.int32, device="cuda")
    q = _fp8((sum(lens_q), hq, d))
    k = _fp8((sum(lens_k), hk, d))
    v = _fp8((sum(lens_k), hk, d))
    qd, kd, vd = (torch.tensor(x, device="cuda") for x in (0.7, 1.3, 2.0))
    out, lse, _ = kernel_fp8.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=True,
                                                    return_attn_probs=True, seqused_k=seqused, q_descale=qd,
                                                    k_descale=kd, v_descale=vd)
    for b in range(len(lens_q)):
        if lens_q[b] == 0:
            continue
        rows = slice(sum(lens_q[:b]), sum(lens_q[:b + 1]))
        keys = slice(sum(lens_k[:b]), sum(lens_k[:b]) + used_k[b])
        ones = torch.ones(1, hk, device="cuda")
        ref, ref_lse, lowp = _references(q[rows][None], k[keys][None], v[keys][None], ones * qd, ones * kd, ones * vd,
                                         softmax_scale=d ** -0.5, causal=True)
        _check(out[rows][None], ref, lowp, lse[:, rows][None], ref_lse)


def test_fp8_without_descales_is_unscaled(kernel_fp8):
    """No descales means 1 (the raw e4m3 values)."""
    _seed("fp8-nodescale")
    q, k, v = (_fp8((1, 200, 2, 64)) for _ in range(3))
    out = kernel_fp8.flash_attn_func(q, k, v, causal=True)
    ones = torch.ones(1, 2, device="cuda")
    ref, _, lowp = _references(q, k, v, ones, ones, ones, softmax_scale=64 ** -0.5, causal=True)
    _check(out, ref, lowp)


def test_fp8_opcheck(kernel_fp8):
    """torch.library.opcheck on fwd_fp8: schema, fake implementation, dispatch under compile."""
    ops = importlib.import_module(kernel_fp8.__name__ + "._ops").ops
    _seed("fp8-opcheck")
    q, k, v = (_fp8((2, 70, 2, 64)) for _ in range(3))
    descale = torch.rand(2, 2, device="cuda") + 0.5
    # (test_schema's checks compute on the inputs, which torch cannot for float8)
    torch.library.opcheck(ops.fwd_fp8, (q, k, v, None, None, None, descale, descale, descale, None, 0, 0, 0.125, True,
                                        -1, -1, 0), test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))


# ---- argument checks (every device: they fail before any kernel runs) ----------------------------

@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_fp8_bad_input(request, backend):
    kernel = request.getfixturevalue("kernel_cpu" if backend == "cpu" else "kernel_cuda")
    q, k, v = (torch.randn(1, 32, 2, 64, device=backend).to(FP8) for _ in range(3))
    with pytest.raises(ValueError, match="k and v must be float8_e4m3fn"):
        kernel.flash_attn_func(q, k.to(torch.bfloat16), v)
    with pytest.raises(ValueError, match="does not support dropout_p, softcap"):
        kernel.flash_attn_func(q, k, v, dropout_p=0.1, softcap=5.0)
    with pytest.raises(ValueError, match="apply to float8_e4m3fn inputs only"):
        kernel.flash_attn_func(*(t.to(torch.bfloat16) for t in (q, k, v)),
                               q_descale=torch.ones(1, 2, device=backend))
    with pytest.raises(ValueError, match=r"q_descale must have shape \(batch=1, heads_kv=2\)"):
        kernel.flash_attn_func(q, k, v, q_descale=torch.ones(2, 2, device=backend))
    with pytest.raises(ValueError, match="k_descale must be float32"):
        importlib.import_module(kernel.__name__ + "._ops").ops.fwd_fp8(q, k, v, None, None, None, None, torch.ones(1, 2, dtype=torch.float64, device=backend),
                           None, None, 0, 0, 0.125, False, -1, -1, 0)
    with pytest.raises(ValueError, match="flash_attn_with_kvcache takes float16 / bfloat16"):
        kernel.flash_attn_with_kvcache(q, k, v)
    if backend == "cpu":
        with pytest.raises(ValueError, match="runs on CUDA"):
            kernel.flash_attn_func(q, k, v)
