"""The reference itself: Philox known answers and a few identities the kernel tests rely on."""

from __future__ import annotations

import pytest
import torch

from flash_attn_kernel.reference import attention_ref, dropout_keep_mask, dropout_threshold, philox4x32_10

# Random123's known-answer vectors for Philox4x32-10: (counter, key) -> output.
_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", _KAT)
def test_philox_known_answers(counter, key, expected):
    words = philox4x32_10(*[torch.tensor([c], dtype=torch.int64) for c in counter], *key)
    assert tuple(int(w) for w in words) == expected


def test_dropout_threshold():
    assert dropout_threshold(0.0) == 0
    assert dropout_threshold(0.5) == 1 << 31
    assert dropout_threshold(0.9999999999) == 0xFFFFFFFF


def test_dropout_keep_rate():
    keep = dropout_keep_mask(1234, 8, torch.arange(4), 64, 256, 0.25)
    assert keep.shape == (4, 64, 256)
    assert abs(keep.float().mean().item() - 0.75) < 0.01
    other = dropout_keep_mask(1234, 12, torch.arange(4), 64, 256, 0.25)
    assert not torch.equal(keep, other), "a new offset must give a new mask"


def test_reference_matches_sdpa():
    torch.manual_seed(0)
    q = torch.randn(2, 17, 4, 32, dtype=torch.float64)
    k = torch.randn(2, 17, 2, 32, dtype=torch.float64)
    v = torch.randn(2, 17, 2, 32, dtype=torch.float64)
    out, lse = attention_ref(q, k, v, causal=True, compute_dtype=torch.float64)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(2, 2).transpose(1, 2), v.repeat_interleave(2, 2).transpose(1, 2),
        is_causal=True).transpose(1, 2)
    torch.testing.assert_close(out, expected)
    assert lse.shape == (2, 4, 17) and torch.isfinite(lse).all()


def test_reference_empty_rows_and_sinks():
    q = torch.randn(1, 6, 2, 8, dtype=torch.float64)
    k = torch.randn(1, 3, 2, 8, dtype=torch.float64)
    out, lse = attention_ref(q, k, k, causal=True, sinks=torch.zeros(2), compute_dtype=torch.float64)
    # bottom-right causal with 6 queries over 3 keys: the first 3 rows see nothing
    assert torch.isinf(lse[..., :3]).all() and (out[:, :3] == 0).all()
    # a sink of logit 0 adds exp(0) = 1 to each denominator
    s = torch.einsum("bqhd,bkhd->bhqk", q, k)[..., 3:, :] * 8 ** -0.5
    mask = torch.ones(3, 3, dtype=torch.bool).tril()
    expected_lse = torch.logaddexp(torch.logsumexp(s.masked_fill(~mask, float("-inf")), -1), torch.zeros(()))
    torch.testing.assert_close(lse[..., 3:], expected_lse.float())
