"""Numerics of the attention kernels against flash_attn_kernel.reference (DESIGN.md's convention).

For every case: fresh random inputs; a float64 reference; the same math in the inputs' dtype
(the reference run in fp16/bf16/fp32). The kernel's max error must be at most 2x (forward) /
3x (gradients) that low-precision error, plus a small absolute floor, and never NaN. Memory the
kernel must not read (cache rows past seqlen, unused pages, keys past seqused_k) is poisoned
with NaN, so reading it shows up in the output.

Runs on every device present through the `device_kernel` fixture (tests/conftest.py).
"""

from __future__ import annotations

import importlib
import itertools
import math
import zlib

import pytest
import torch

from flash_attn_kernel.reference import attention_ref, attention_varlen_ref, kvcache_ref

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Absolute floors: forward, gradients. They only matter when the low-precision error is tiny.
FLOORS = {torch.float32: (1e-5, 5e-5), torch.float16: (1e-3, 2e-3), torch.bfloat16: (4e-3, 1e-2)}


def _seed(*parts) -> None:
    torch.manual_seed(zlib.crc32(repr(parts).encode()))


def _supported(dtype: torch.dtype, device: str) -> None:
    if device == "cuda" and dtype == torch.float32:
        pytest.skip("the CUDA kernels take fp16/bf16")


def assert_close(name: str, got: torch.Tensor, ref: torch.Tensor, ref_lowp: torch.Tensor, factor: float,
                 floor: float) -> None:
    """got's max error against ref must be <= factor * ref_lowp's max error + floor."""
    assert not torch.isnan(got).any(), f"{name}: NaN in the kernel's result"
    ref64 = ref.double()
    err = (got.double() - ref64).abs().max().item() if got.numel() else 0.0
    err_lowp = (ref_lowp.double() - ref64).abs().max().item() if got.numel() else 0.0
    bound = factor * err_lowp + floor
    assert err <= bound, f"{name}: max error {err:.3g} > {factor} x {err_lowp:.3g} (input precision) + {floor:.1g}"


def expected_philox(device: torch.device, dropout_p: float) -> tuple[int, int]:
    """The (seed, offset) the API draws for its next call, per torch-ext/flash_attn/interface.py."""
    if dropout_p == 0:
        return 0, 0
    if device.type == "cuda":
        gen = torch.cuda.default_generators[device.index or 0]
        return gen.initial_seed(), gen.get_offset()
    state = torch.get_rng_state()
    seed = int(torch.randint(-(1 << 63), (1 << 63) - 1, (1,), dtype=torch.int64).item())
    torch.set_rng_state(state)
    return seed, 0


def _grads(loss_fn, leaves, retain_graph=False):
    for t in leaves:
        t.grad = None
    loss_fn().backward(retain_graph=retain_graph)
    return [t.grad for t in leaves]


# ---- dense ---------------------------------------------------------------------------------

# Feature sets crossed with every dtype; head dims cycle through _HEAD_DIMS, so each dtype sees
# each feature set at some head dim. Defaults: seqlen_q 113, seqlen_k 140, 3 heads, no mask.
_FEATURES = [
    dict(),
    dict(causal=True),
    dict(causal=True, sq=150, sk=97),  # more queries than keys: leading rows see no key
    dict(window=(31, 0)),
    dict(window=(17, 23)),
    dict(softcap=5.0),
    dict(alibi="head"),
    dict(alibi="batch", causal=True),
    dict(hq=6, hk=2),
    dict(hq=4, hk=1, causal=True),
    dict(sinks=True),
    dict(sinks=True, window=(40, 0), hq=4, hk=2),
    dict(dropout=0.17),
    dict(dropout=0.3, causal=True, sinks=True),
    dict(softcap=3.0, alibi="head", window=(50, 10), hq=4, hk=2),
]
_HEAD_DIMS = [64, 40, 128, 256, 59, 96]  # 59: padded to 64 in Python


def _dense_cases():
    cases = []
    for n, (dtype, features) in enumerate(itertools.product(DTYPES, _FEATURES)):
        cases.append(pytest.param(dtype, _HEAD_DIMS[n % len(_HEAD_DIMS)], features,
                                  id=f"{dtype}-d{_HEAD_DIMS[n % len(_HEAD_DIMS)]}-{n % len(_FEATURES)}"))
    return cases


def _alibi(kind, batch, heads, device):
    if kind is None:
        return None
    shape = (heads,) if kind == "head" else (batch, heads)
    return torch.rand(shape, device=device, dtype=torch.float32) * 0.3


@pytest.mark.parametrize("dtype_name,head_dim,features", _dense_cases())
def test_dense(device_kernel, dtype_name, head_dim, features):
    kernel, device = device_kernel
    dtype = DTYPES[dtype_name]
    _supported(dtype, device)
    _seed("dense", dtype_name, head_dim, sorted(features.items()))
    batch = 2
    sq, sk = features.get("sq", 113), features.get("sk", 140)
    hq, hk = features.get("hq", 3), features.get("hk", 3)
    causal = features.get("causal", False)
    window = features.get("window", (-1, -1))
    softcap = features.get("softcap", 0.0)
    dropout = features.get("dropout", 0.0)
    q = torch.randn(batch, sq, hq, head_dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, sk, hk, head_dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, sk, hk, head_dim, device=device, dtype=dtype, requires_grad=True)
    alibi = _alibi(features.get("alibi"), batch, hq, device)
    sinks = (torch.randn(hq, device=device) * 2).requires_grad_() if features.get("sinks") else None
    dout = torch.randn(batch, sq, hq, head_dim, device=device, dtype=dtype)

    seed, offset = expected_philox(q.device, dropout)
    out, lse, _ = kernel.flash_attn_func(q, k, v, dropout_p=dropout, causal=causal, window_size=window,
                                         softcap=softcap, alibi_slopes=alibi, return_attn_probs=True, sinks=sinks)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (batch, hq, sq)
    kw = dict(causal=causal, window_size=window, softcap=softcap, alibi_slopes=alibi, dropout_p=dropout,
              philox_seed=seed, philox_offset=offset)
    leaves = [q, k, v] + ([sinks] if sinks is not None else [])
    g = _grads(lambda: (out.float() * dout.float()).sum(), leaves)
    ref, ref_lse = attention_ref(q, k, v, sinks=sinks, compute_dtype=torch.float64, **kw)
    g_ref = _grads(lambda: (ref * dout.double()).sum(), leaves)
    lowp, _ = attention_ref(q, k, v, sinks=sinks, compute_dtype=None, **kw)
    g_lowp = _grads(lambda: (lowp.float() * dout.float()).sum(), leaves)

    floor_fwd, floor_bwd = FLOORS[dtype]
    assert_close("out", out, ref, lowp, 2, floor_fwd)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "rows without keys must have lse = +inf, others finite"
    assert (lse[finite] - ref_lse[finite]).abs().max().item() <= 1e-3 * math.sqrt(head_dim) if finite.any() else True
    for name, a, b, c in zip(("dq", "dk", "dv", "dsinks"), g, g_ref, g_lowp):
        assert_close(name, a, b, c, 3, floor_bwd * (10 if name == "dsinks" else 1))


# Long sequences: many query blocks per head, many key tiles, mask edges that cut tiles and
# register panels at every offset, the last panel partly padding rows, GQA rows packed in a block.
_LONG = [
    dict(sq=803, sk=803),
    dict(sq=803, sk=803, causal=True),
    dict(sq=517, sk=931, causal=True, hq=4, hk=2),  # fewer queries than keys
    dict(sq=931, sk=517, causal=True),  # more queries than keys: leading rows see no key
    dict(sq=700, sk=700, window=(131, 0), hq=6, hk=2),
    dict(sq=650, sk=720, window=(47, 90)),
    dict(sq=600, sk=600, causal=True, softcap=4.0, alibi="head"),
    dict(sq=600, sk=600, causal=True, dropout=0.1, sinks=True, hq=4, hk=1),
]


def _long_inputs(features, head_dim, device, dtype, requires_grad):
    """q, k, v (batch 1) of a _LONG case and the keyword arguments of its call."""
    sq, sk = features["sq"], features["sk"]
    hq, hk = features.get("hq", 2), features.get("hk", 2)
    q, k, v = (torch.randn(1, n, h, head_dim, device=device, dtype=dtype, requires_grad=requires_grad)
               for n, h in ((sq, hq), (sk, hk), (sk, hk)))
    sinks = torch.randn(hq, device=device) * 2 if features.get("sinks") else None
    if sinks is not None and requires_grad:
        sinks.requires_grad_()
    kw = dict(causal=features.get("causal", False), window_size=features.get("window", (-1, -1)),
              softcap=features.get("softcap", 0.0), alibi_slopes=_alibi(features.get("alibi"), 1, hq, device),
              dropout_p=features.get("dropout", 0.0), sinks=sinks)
    return q, k, v, kw


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 128, 40])
@pytest.mark.parametrize("case", range(len(_LONG)))
@pytest.mark.parametrize("cuda_forward", ["default", "portable"])
def test_long_forward(device_kernel, dtype_name, head_dim, case, cuda_forward, monkeypatch):
    kernel, device = device_kernel
    dtype = DTYPES[dtype_name]
    _supported(dtype, device)
    if cuda_forward == "portable":
        # On sm90 the default forward is the Hopper kernel; this keeps the mma.sync one tested there.
        if device != "cuda":
            pytest.skip("CUDA forward paths only")
        monkeypatch.setenv("FLASH_ATTN_CUDA_HOPPER", "0")
    _seed("long", dtype_name, head_dim, case)
    q, k, v, kw = _long_inputs(_LONG[case], head_dim, device, dtype, requires_grad=False)
    seed, offset = expected_philox(q.device, kw["dropout_p"])
    out, lse, _ = kernel.flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    kw.update(philox_seed=seed, philox_offset=offset)
    ref, ref_lse = attention_ref(q, k, v, compute_dtype=torch.float64, **kw)
    lowp, _ = attention_ref(q, k, v, compute_dtype=None, **kw)
    assert_close("out", out, ref, lowp, 2, FLOORS[dtype][0])
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "rows without keys must have lse = +inf, others finite"
    assert (lse[finite] - ref_lse[finite]).abs().max().item() <= 1e-3 * math.sqrt(head_dim)


@pytest.mark.parametrize("head_dim", [64, 128, 40])
@pytest.mark.parametrize("case", range(len(_LONG)))
@pytest.mark.parametrize("cuda_backward", ["default", "portable"])
def test_long_backward(device_kernel, head_dim, case, cuda_backward, monkeypatch):
    """Gradients of long sequences on each CUDA backward path (on sm90 the default is the Hopper
    kernel; softcap, ALiBi and dropout cases fall back to the portable one), run twice: dK and dV
    have no atomics and must come out bit-identical, so a race shows as a moving result."""
    kernel, device = device_kernel
    if cuda_backward == "portable":
        if device != "cuda":
            pytest.skip("CUDA backward paths only")
        monkeypatch.setenv("FLASH_ATTN_CUDA_HOPPER", "0")
    dtype = torch.bfloat16
    _seed("long-bwd", head_dim, case)
    q, k, v, kw = _long_inputs(_LONG[case], head_dim, device, dtype, requires_grad=True)
    dout = torch.randn_like(q)
    leaves = [q, k, v] + ([kw["sinks"]] if kw["sinks"] is not None else [])
    seed, offset = expected_philox(q.device, kw["dropout_p"])
    out = kernel.flash_attn_func(q, k, v, **kw)
    runs = [_grads(lambda: (out.float() * dout.float()).sum(), leaves, retain_graph=True) for _ in range(2)]
    kw.update(philox_seed=seed, philox_offset=offset)
    ref, _ = attention_ref(q, k, v, compute_dtype=torch.float64, **kw)
    g_ref = _grads(lambda: (ref * dout.double()).sum(), leaves)
    lowp, _ = attention_ref(q, k, v, compute_dtype=None, **kw)
    g_lowp = _grads(lambda: (lowp.float() * dout.float()).sum(), leaves)
    floor_bwd = FLOORS[dtype][1]
    for name, a, b, c in zip(("dq", "dk", "dv", "dsinks"), runs[0], g_ref, g_lowp):
        assert_close(name, a, b, c, 3, floor_bwd * (10 if name == "dsinks" else 1))
    for name, a, b in zip(("dk", "dv"), runs[0][1:3], runs[1][1:3]):
        assert torch.equal(a, b), f"{name} moved between two runs on the same inputs (a race)"


@pytest.mark.parametrize("causal", [False, True])
def test_deterministic_backward(device_kernel, causal):
    kernel, device = device_kernel
    _seed("det", causal)
    dtype = torch.bfloat16
    q = torch.randn(2, 200, 4, 64, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 230, 2, 64, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 230, 2, 64, device=device, dtype=dtype, requires_grad=True)
    sinks = torch.randn(4, device=device, requires_grad=True)
    dout = torch.randn_like(q)
    runs = []
    for _ in range(2):
        out = kernel.flash_attn_func(q, k, v, causal=causal, deterministic=True, sinks=sinks)
        runs.append(_grads(lambda: (out * dout).sum(), [q, k, v, sinks]))
    for a, b in zip(*runs):
        assert torch.equal(a, b), "deterministic=True must give bit-identical gradients"


def test_dropout_seed_advances(device_kernel):
    kernel, device = device_kernel
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q = torch.randn(1, 64, 2, 32, device=device, dtype=dtype)
    torch.manual_seed(0)
    a = kernel.flash_attn_func(q, q, q, dropout_p=0.5)
    b = kernel.flash_attn_func(q, q, q, dropout_p=0.5)
    torch.manual_seed(0)
    a2 = kernel.flash_attn_func(q, q, q, dropout_p=0.5)
    assert not torch.equal(a, b), "two calls must draw different dropout masks"
    assert torch.equal(a, a2), "torch.manual_seed must reproduce the dropout mask"


def test_packed_variants(device_kernel):
    kernel, device = device_kernel
    _seed("packed")
    dtype = torch.float32 if device == "cpu" else torch.float16
    qkv = torch.randn(2, 77, 3, 4, 64, device=device, dtype=dtype, requires_grad=True)
    q, k, v = qkv.unbind(2)
    base = kernel.flash_attn_func(q, k, v, causal=True)
    torch.testing.assert_close(kernel.flash_attn_qkvpacked_func(qkv, causal=True), base, rtol=0, atol=0)
    torch.testing.assert_close(kernel.flash_attn_kvpacked_func(q, qkv[:, :, 1:], causal=True), base, rtol=0, atol=0)
    cu = torch.tensor([0, 77, 154], dtype=torch.int32, device=device)
    flat = qkv.reshape(154, 3, 4, 64)
    varlen = kernel.flash_attn_varlen_qkvpacked_func(flat, cu, 77, causal=True)
    torch.testing.assert_close(varlen, base.reshape(154, 4, 64), rtol=0, atol=0)
    varlen_kv = kernel.flash_attn_varlen_kvpacked_func(flat[:, 0], flat[:, 1:], cu, cu, 77, 77, causal=True)
    torch.testing.assert_close(varlen_kv, varlen, rtol=0, atol=0)
    (kernel.flash_attn_qkvpacked_func(qkv, causal=True).sum()).backward()
    assert qkv.grad is not None and torch.isfinite(qkv.grad).all()


def test_s_aux_alias(device_kernel):
    kernel, device = device_kernel
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q = torch.randn(1, 33, 2, 64, device=device, dtype=dtype)
    s = torch.randn(2, device=device, dtype=torch.bfloat16)
    a = kernel.flash_attn_func(q, q, q, sinks=s)
    b = kernel.flash_attn_func(q, q, q, s_aux=s)
    assert torch.equal(a, b)
    assert not torch.equal(a, kernel.flash_attn_func(q, q, q))


# ---- varlen ------------------------------------------------------------------------------------

_VARLEN = [
    dict(),
    dict(causal=True),
    dict(causal=True, sinks=True, hq=4, hk=2),
    dict(window=(20, 5), softcap=4.0),
    dict(dropout=0.2, alibi="batch"),
    dict(seqused=True, causal=True),
]


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("case", range(len(_VARLEN)))
def test_varlen(device_kernel, dtype_name, case):
    kernel, device = device_kernel
    dtype = DTYPES[dtype_name]
    _supported(dtype, device)
    features = _VARLEN[case]
    _seed("varlen", dtype_name, case)
    lens_q = [37, 0, 130, 1, 64]  # includes an empty sequence
    lens_k = [50, 12, 130, 0, 70] if not features.get("causal") else [37, 12, 150, 5, 64]
    hq, hk, d = features.get("hq", 2), features.get("hk", 2), 64
    cu_q = torch.tensor([0] + list(itertools.accumulate(lens_q)), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + list(itertools.accumulate(lens_k)), dtype=torch.int32, device=device)
    q = torch.randn(cu_q[-1].item(), hq, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(cu_k[-1].item(), hk, d, device=device, dtype=dtype)
    v = torch.randn(cu_k[-1].item(), hk, d, device=device, dtype=dtype)
    seqused = None
    if features.get("seqused"):
        used = [min(n, u) for n, u in zip(lens_k, [20, 12, 100, 0, 64])]
        seqused = torch.tensor(used, dtype=torch.int32, device=device)
        with torch.no_grad():
            for b, (start, n) in enumerate(zip(cu_k.tolist(), used)):
                k[start + n: cu_k[b + 1]] = float("nan")  # keys past seqused_k must never be read
                v[start + n: cu_k[b + 1]] = float("nan")
    k.requires_grad_()
    v.requires_grad_()
    alibi = _alibi(features.get("alibi"), len(lens_q), hq, device)
    sinks = torch.randn(hq, device=device).requires_grad_() if features.get("sinks") else None
    dropout = features.get("dropout", 0.0)
    causal, window, softcap = features.get("causal", False), features.get("window", (-1, -1)), features.get(
        "softcap", 0.0)

    seed, offset = expected_philox(q.device, dropout)
    out, lse, _ = kernel.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), dropout_p=dropout,
                                                causal=causal, window_size=window, softcap=softcap,
                                                alibi_slopes=alibi, return_attn_probs=True, seqused_k=seqused,
                                                sinks=sinks)
    assert out.shape == q.shape and lse.shape == (hq, q.shape[0])
    kw = dict(seqused_k=seqused, causal=causal, window_size=window, softcap=softcap, alibi_slopes=alibi,
              dropout_p=dropout, philox_seed=seed, philox_offset=offset, sinks=sinks)
    dout = torch.randn_like(out)
    leaves = [q, k, v] + ([sinks] if sinks is not None else [])
    g = _grads(lambda: (out.float() * dout.float()).sum(), leaves)
    ref, _ = attention_varlen_ref(q, k, v, cu_q, cu_k, compute_dtype=torch.float64, **kw)
    g_ref = _grads(lambda: (ref * dout.double()).sum(), leaves)
    lowp, _ = attention_varlen_ref(q, k, v, cu_q, cu_k, compute_dtype=None, **kw)
    g_lowp = _grads(lambda: (lowp.float() * dout.float()).sum(), leaves)
    floor_fwd, floor_bwd = FLOORS[dtype]
    assert_close("out", out, ref, lowp, 2, floor_fwd)
    if seqused is not None:
        # rows of k/v past seqused_k get no gradient; compare the used rows only
        mask = torch.zeros(k.shape[0], dtype=torch.bool, device=device)
        for b, n in enumerate(seqused.tolist()):
            mask[cu_k[b]: cu_k[b] + n] = True
        for i in (1, 2):
            assert (g[i][~mask] == 0).all(), "gradients of unused keys must be zero"
            g[i], g_ref[i], g_lowp[i] = g[i][mask], g_ref[i][mask], g_lowp[i][mask]
    for name, a, b, c in zip(("dq", "dk", "dv", "dsinks"), g, g_ref, g_lowp):
        assert_close(name, a, b, c, 3, floor_bwd * (10 if name == "dsinks" else 1))


@pytest.mark.parametrize("page_size", [16, 5, 256])
def test_varlen_paged(device_kernel, page_size):
    kernel, device = device_kernel
    dtype = torch.bfloat16
    _seed("paged", page_size)
    lens_q, lens_k = [3, 40, 1], [100, 40, 257]
    hq, hk, d = 4, 2, 128
    pages_per_seq = max(math.ceil(n / page_size) for n in lens_k)
    num_pages = pages_per_seq * len(lens_k) + 3
    k_cache = torch.full((num_pages, page_size, hk, d), float("nan"), device=device, dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    perm = torch.randperm(num_pages, device=device)[: pages_per_seq * len(lens_k)]
    block_table = perm.reshape(len(lens_k), pages_per_seq).to(torch.int32)
    for b, n in enumerate(lens_k):
        for t in range(n):
            page, row = block_table[b, t // page_size], t % page_size
            k_cache[page, row] = torch.randn(hk, d, device=device, dtype=dtype)
            v_cache[page, row] = torch.randn(hk, d, device=device, dtype=dtype)
    cu_q = torch.tensor([0] + list(itertools.accumulate(lens_q)), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + list(itertools.accumulate(lens_k)), dtype=torch.int32, device=device)
    q = torch.randn(cu_q[-1].item(), hq, d, device=device, dtype=dtype)
    out = kernel.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, max(lens_q), max(lens_k), causal=True,
                                        block_table=block_table)
    kw = dict(block_table=block_table, causal=True)
    ref, _ = attention_varlen_ref(q, k_cache, v_cache, cu_q, cu_k, compute_dtype=torch.float64, **kw)
    lowp, _ = attention_varlen_ref(q, k_cache, v_cache, cu_q, cu_k, compute_dtype=None, **kw)
    assert_close("out", out, ref, lowp, 2, FLOORS[dtype][0])


# ---- KV cache ----------------------------------------------------------------------------------

_KVCACHE = [
    dict(),
    dict(new=1, causal=True),
    dict(new=3, causal=True, rotary="interleaved"),
    dict(new=2, rotary="halves", window=(30, 0)),
    dict(new=1, causal=True, cache_batch_idx=True),
    dict(new=4, causal=True, leftpad=True, sinks=True),
    dict(new=2, causal=True, paged=16, rotary="halves"),
    dict(new=1, paged=7, softcap=10.0, alibi="head", hq=8, hk=2),
]


@pytest.mark.parametrize("dtype_name", ["fp16", "bf16"])
@pytest.mark.parametrize("case", range(len(_KVCACHE)))
def test_kvcache(device_kernel, dtype_name, case):
    kernel, device = device_kernel
    dtype = DTYPES[dtype_name]
    f = _KVCACHE[case]
    _seed("kvcache", dtype_name, case)
    batch, sq, d = 3, f.get("new", 1) if f.get("new") else 2, 64
    hq, hk = f.get("hq", 4), f.get("hk", 4 if case % 2 else 2)
    capacity = 200
    new = f.get("new", 0)
    seqlens = torch.tensor([5, 150, 77], dtype=torch.int32, device=device)
    leftpad = torch.tensor([0, 20, 3], dtype=torch.int32, device=device) if f.get("leftpad") else None
    q = torch.randn(batch, sq, hq, d, device=device, dtype=dtype)
    paged = f.get("paged")
    if paged:
        pages_per_seq = math.ceil(capacity / paged)
        num_pages = pages_per_seq * batch + 2
        k_cache = torch.randn(num_pages, paged, hk, d, device=device, dtype=dtype)
        block_table = torch.randperm(num_pages, device=device)[: batch * pages_per_seq].reshape(batch, -1).to(
            torch.int32)
        cache_batch_idx = None
    else:
        rows = batch + 2 if f.get("cache_batch_idx") else batch
        k_cache = torch.randn(rows, capacity, hk, d, device=device, dtype=dtype)
        block_table = None
        cache_batch_idx = torch.tensor([2, 0, 4], dtype=torch.int32, device=device) if f.get(
            "cache_batch_idx") else None
    v_cache = torch.randn_like(k_cache)
    if not paged:
        # rows past each sequence's end (after the append) and before leftpad are never read
        for b in range(batch):
            cb = cache_batch_idx[b] if cache_batch_idx is not None else b
            k_cache[cb, seqlens[b] + new:] = float("nan")
            v_cache[cb, seqlens[b] + new:] = float("nan")
            if leftpad is not None:
                k_cache[cb, : leftpad[b]] = float("nan")
    k = torch.randn(batch, new, hk, d, device=device, dtype=dtype) if new else None
    v = torch.randn(batch, new, hk, d, device=device, dtype=dtype) if new else None
    cos = sin = None
    if f.get("rotary"):
        angles = torch.rand(capacity + 8, d // 4, device=device) * 2 * math.pi
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    interleaved = f.get("rotary") == "interleaved"
    alibi = _alibi(f.get("alibi"), batch, hq, device)
    sinks = torch.randn(hq, device=device) if f.get("sinks") else None
    kw = dict(rotary_cos=cos, rotary_sin=sin, cache_seqlens=seqlens, cache_batch_idx=cache_batch_idx,
              cache_leftpad=leftpad, block_table=block_table, causal=f.get("causal", False),
              window_size=f.get("window", (-1, -1)), rotary_interleaved=interleaved, alibi_slopes=alibi)
    ref, ref_lse, k_ref, v_ref = kvcache_ref(q, k_cache, v_cache, k, v, sinks=sinks, softcap=f.get("softcap", 0.0),
                                             compute_dtype=torch.float64, **kw)
    lowp, _, _, _ = kvcache_ref(q, k_cache, v_cache, k, v, sinks=sinks, softcap=f.get("softcap", 0.0),
                                compute_dtype=None, **kw)
    out, lse = kernel.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, softcap=f.get("softcap", 0.0),
                                              return_softmax_lse=True, sinks=sinks, **kw)
    assert_close("out", out, ref, lowp, 2, FLOORS[dtype][0])
    assert torch.allclose(lse, ref_lse, atol=1e-2, rtol=1e-3)
    torch.testing.assert_close(k_cache, k_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_ref, rtol=0, atol=0, equal_nan=True)


# ---- torch.library / torch.compile ---------------------------------------------------------------


def test_opcheck(device_kernel):
    """torch.library.opcheck on every op: schema, fake implementations, dispatch under compile."""
    kernel, device = device_kernel
    # Through sys.modules: when another loader imported the same variant first (the benchmark tests
    # load it from a scratch project), the package object kernels returns lacks the _ops attribute.
    ops = importlib.import_module(kernel.__name__ + "._ops").ops
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    _seed("opcheck", device)
    q = torch.randn(2, 19, 4, 64, device=device, dtype=dtype)
    k = torch.randn(2, 23, 2, 64, device=device, dtype=dtype)
    v = torch.randn(2, 23, 2, 64, device=device, dtype=dtype)
    sinks = torch.randn(4, device=device)
    torch.library.opcheck(ops.fwd, (q, k, v, None, sinks, 0.0, 0.125, True, -1, -1, 0.0, 0, 0))
    out, lse = ops.fwd(q, k, v, None, sinks, 0.0, 0.125, True, -1, -1, 0.0, 0, 0)
    torch.library.opcheck(ops.bwd, (torch.randn_like(out), q, k, v, out, lse, None, sinks, 0.0, 0.125, True, -1, -1,
                                    0.0, False, 0, 0))
    cu = torch.tensor([0, 7, 19], dtype=torch.int32, device=device)
    qv, kv = q[0], k[0, :19]
    torch.library.opcheck(ops.varlen_fwd, (qv, kv, kv, cu, cu, None, None, None, None, 12, 12, 0.0, 0.125, False,
                                           -1, -1, 0.0, 0, 0))
    out, lse = ops.varlen_fwd(qv, kv, kv, cu, cu, None, None, None, None, 12, 12, 0.0, 0.125, False, -1, -1, 0.0, 0,
                              0)
    torch.library.opcheck(ops.varlen_bwd, (torch.randn_like(out), qv, kv, kv, out, lse, cu, cu, None, None, None, 12,
                                           12, 0.0, 0.125, False, -1, -1, 0.0, False, 0, 0))
    seqused = torch.tensor([5, 23], dtype=torch.int32, device=device)
    torch.library.opcheck(ops.fwd_kvcache, (q, k, v, seqused, None, None, None, None, None, 0.125, True, -1, -1, 0.0,
                                            0))


def test_compile_fullgraph_cpu(kernel_cpu):
    _seed("compile")
    q = torch.randn(2, 33, 4, 64, requires_grad=True)
    k = torch.randn(2, 40, 2, 64, requires_grad=True)
    v = torch.randn(2, 40, 2, 64, requires_grad=True)

    def f(q, k, v):
        return kernel_cpu.flash_attn_func(q, k, v, causal=True, softcap=2.0) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    torch.testing.assert_close(out, f(q, k, v), rtol=0, atol=0)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
