"""The engine's CPU branches of the kernel launchers against the plain-torch references (which the
Triton kernels are checked against in tests/kernels, where the launchers take Triton instead)."""

import pytest
import torch
from lightllm_plugin.kernels.kv_scatter import kv_scatter, kv_scatter_ref, quantize_kv_ref
from lightllm_plugin.kernels.rmsnorm import rmsnorm, rmsnorm_ref
from lightllm_plugin.kernels.rotary import rotary, rotary_ref
from lightllm_plugin.kernels.token_attention import token_attention, token_attention_ref
from support.kernel_check import assert_close, make_batch

# attention sums over many keys in a different order than the reference's SDPA call
ATT_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("with_residual", [False, True])
def test_float32_rmsnorm_is_the_reference_to_the_bit(with_residual):
    g = torch.Generator().manual_seed(0)
    x, w, r = (torch.randn(*shape, generator=g) for shape in ((7, 576), (576,), (7, 576)))
    residual = r if with_residual else None
    out, res = rmsnorm(x, w, 1e-5, residual)
    ref, ref_res = rmsnorm_ref(x, w, 1e-5, residual)
    assert torch.equal(out, ref) and torch.equal(res, ref_res)


def test_float32_rotary_is_the_reference_to_the_bit():
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(5, 12, 64, generator=g)
    q, k = qkv[:, :9].clone(), qkv[:, 9:].clone()
    cos, sin = torch.randn(5, 32, generator=g), torch.randn(5, 32, generator=g)
    q_ref, k_ref = q.clone(), k.clone()
    rotary(q, k, cos, sin)
    rotary_ref(q_ref, k_ref, cos, sin)
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref)


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
def test_kv_scatter_writes_what_the_reference_writes(pool_dtype):
    g = torch.Generator().manual_seed(2)
    pool = torch.randn(40, 6, 64, generator=g).to(pool_dtype)
    k, v = torch.randn(4, 3, 64, generator=g), torch.randn(4, 3, 64, generator=g)
    slots = torch.tensor([7, 3, 30, 12])
    ref = pool.clone()
    kv_scatter(pool, k, v, slots)
    kv_scatter_ref(ref, k, v, slots)
    assert torch.equal(pool, ref)


CASES = [
    # (seq_lens, q_lens, heads, kv_heads, head_dim)
    ([1], [1], 4, 4, 64),
    ([300], [1], 9, 3, 64),  # one long decode row
    ([17], [17], 8, 2, 128),  # a whole prompt
    ([1, 17, 300, 64, 129], [1] * 5, 8, 2, 64),  # a decode batch of mixed lengths (padded)
    ([150, 40], [30, 40], 8, 2, 64),  # a cached prefix of 120
    ([5, 90, 17, 64], [5, 1, 9, 64], 6, 2, 128),  # group 3, a decode row among prefills
]


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("own_lens", [[0, 0, 0], [1, 40, 7], [0, 3, 0]])
def test_decode_rows_sharing_a_cached_prefix_match_the_reference(own_lens, pool_dtype):
    """Rows whose first 100 keys are the same slots, as the prefix cache hands them out, then
    keys of their own (none, or of different lengths): the shared-prefix path, checked against
    the reference, which gathers every row's keys."""
    shared = 100
    seq_lens = [shared + n for n in own_lens]
    int8 = pool_dtype == torch.int8
    q, kv, meta = make_batch(seq_lens, [1] * 3, 8, 2, 64, torch.float32 if int8 else pool_dtype, seed=11)
    req_to_token, rows = meta[0], meta[1].tolist()
    prefix = req_to_token[rows[0], :shared].clone()
    for row in rows:
        req_to_token[row, :shared] = prefix
    kv_scale = None
    if int8:
        kv, kv_scale = quantize_kv_ref(kv)
    scale = 64**-0.5
    out = token_attention(q.float(), kv, *meta, scale, kv_scale=kv_scale)
    ref = token_attention_ref(q.float(), kv, *meta, scale, kv_scale=kv_scale)
    dtype = torch.float32 if int8 else pool_dtype
    assert_close(out, ref, dtype, ATT_TOL[dtype])


def _case(seq_lens, q_lens, heads, kv_heads, head_dim, pool_dtype, contiguous):
    q, kv, meta = make_batch(seq_lens, q_lens, heads, kv_heads, head_dim, pool_dtype, seed=sum(seq_lens) + heads)
    if contiguous:  # each request's slots one ascending run, as the free-list hands them out
        req_to_token, rows = meta[0], meta[1].tolist()
        start = 1
        for row, n in zip(rows, seq_lens):
            req_to_token[row, :n] = torch.arange(start, start + n, dtype=req_to_token.dtype)
            start += n
    # the model's queries are float32 whatever the pool holds
    return q.float(), kv, meta


@pytest.mark.parametrize("contiguous", [False, True])
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seq_lens,q_lens,heads,kv_heads,head_dim", CASES)
def test_cpu_attention_matches_the_reference(seq_lens, q_lens, heads, kv_heads, head_dim, pool_dtype, contiguous):
    q, kv, meta = _case(seq_lens, q_lens, heads, kv_heads, head_dim, pool_dtype, contiguous)
    scale = head_dim**-0.5
    out = token_attention(q, kv, *meta, scale)
    assert out.dtype == torch.float32
    assert_close(out, token_attention_ref(q, kv, *meta, scale), pool_dtype, ATT_TOL[pool_dtype])


@pytest.mark.parametrize("seq_lens,q_lens,heads,kv_heads,head_dim", CASES)
def test_cpu_attention_reads_an_int8_pool_as_the_reference_does(seq_lens, q_lens, heads, kv_heads, head_dim):
    q, kv, meta = _case(seq_lens, q_lens, heads, kv_heads, head_dim, torch.float32, contiguous=False)
    values, scales = quantize_kv_ref(kv)
    scale = head_dim**-0.5
    out = token_attention(q, values, *meta, scale, kv_scale=scales)
    ref = token_attention_ref(q, values, *meta, scale, kv_scale=scales)
    assert_close(out, ref, torch.float32, ATT_TOL[torch.float32])


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("contiguous", [False, True])
def test_a_decode_row_gets_the_same_bits_batched_as_alone(pool_dtype, contiguous):
    """A greedy stream's tokens must not depend on what else shares its step: each row of a decode
    batch (lengths that differ, two that are equal) equals, to the bit, that row decoded alone."""
    seq_lens = [7, 33, 33, 300, 129]
    q, kv, meta = _case(seq_lens, [1] * len(seq_lens), 9, 3, 64, pool_dtype, contiguous)
    req_to_token, rows, lens, q_start, q_len = meta
    scale = 64**-0.5
    batched = token_attention(q, kv, *meta, scale)
    for b in range(len(seq_lens)):
        alone = token_attention(q[b : b + 1], kv, req_to_token, rows[b : b + 1], lens[b : b + 1],
                                q_start[:1] * 0, q_len[b : b + 1], scale)
        assert torch.equal(batched[b : b + 1], alone), b
    assert_close(batched, token_attention_ref(q, kv, *meta, scale), pool_dtype, ATT_TOL[pool_dtype])
