"""Prefill and decode attention kernels against the plain-torch token_attention_ref."""

import pytest
import torch
from support.kernel_check import DTYPES, TOL, assert_close, check_int8_attention, make_batch

from lightllm_plugin.kernels.decode_attention import decode_attention
from lightllm_plugin.kernels.kv_scatter import quantize_kv_ref
from lightllm_plugin.kernels.prefill_attention import prefill_attention
from lightllm_plugin.kernels.token_attention import token_attention, token_attention_ref

# attention sums over many keys in a different order than SDPA
ATT_TOL = {**TOL, torch.float32: 1e-4}


def reference(q, kv_layer, meta, scale):
    return token_attention_ref(q, kv_layer, *meta, scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "seq_lens,heads,kv_heads,head_dim,num_splits",
    [
        ([1], 4, 4, 64, 1),
        ([17], 8, 2, 128, 3),
        ([300], 8, 1, 64, None),
        ([1, 17, 300, 64, 129], 8, 2, 64, 4),
        ([33, 250, 7], 12, 4, 128, 7),  # group 3: not a power of two
    ],
)
def test_decode_matches_reference(dtype, seq_lens, heads, kv_heads, head_dim, num_splits):
    q, kv, meta = make_batch(seq_lens, [1] * len(seq_lens), heads, kv_heads, head_dim, dtype, seed=len(seq_lens) + heads)
    scale = head_dim**-0.5
    req_to_token, b_req_idx, b_seq_len, b_q_start, _ = meta
    # poisoned output: an unwritten element fails the finiteness check
    out = torch.full_like(q, float("nan"))
    decode_attention(q, kv, req_to_token, b_req_idx, b_seq_len, b_q_start, scale, out=out, num_splits=num_splits)
    assert_close(out, reference(q, kv, meta, scale), dtype, ATT_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "seq_lens,q_lens,heads,kv_heads,head_dim",
    [
        ([1], [1], 2, 2, 64),
        ([17], [17], 4, 1, 128),
        ([200], [200], 4, 2, 64),
        ([150, 40], [30, 40], 8, 2, 64),  # the first request has a cached prefix of 120
        ([5, 90, 17, 64], [5, 1, 9, 64], 6, 2, 128),  # group 3, a decode row and two prefixes
    ],
)
def test_prefill_matches_reference(dtype, seq_lens, q_lens, heads, kv_heads, head_dim):
    q, kv, meta = make_batch(seq_lens, q_lens, heads, kv_heads, head_dim, dtype, seed=sum(seq_lens))
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))
    prefill_attention(q, kv, *meta, scale, out=out)
    assert_close(out, reference(q, kv, meta, scale), dtype, ATT_TOL[dtype])


@pytest.mark.parametrize("q_lens", [[1, 1, 1], [1, 12, 1]])
def test_token_attention_dispatches_decode_and_mixed_batches(q_lens):
    dtype = torch.bfloat16
    seq_lens = [40, 70, 5]
    q, kv, meta = make_batch(seq_lens, q_lens, 8, 2, 64, dtype, seed=sum(q_lens))
    out = token_attention(q, kv, *meta, 0.125)
    assert_close(out, reference(q, kv, meta, 0.125), dtype)


def test_group_wider_than_the_query_block():
    # 32 query heads on one kv head fold into a 32-row tile with a single token each
    q, kv, meta = make_batch([20, 9], [20, 3], 32, 1, 64, torch.float32, seed=5)
    out = prefill_attention(q, kv, *meta, 0.125, block_m=16)
    assert_close(out, reference(q, kv, meta, 0.125), torch.float32, ATT_TOL[torch.float32])


# ---- int8 KV cache ----------------------------------------------------------------------
INT8_DTYPES = [torch.float32, torch.bfloat16]


def _int8_case(seq_lens, q_lens, heads, kv_heads, head_dim, dtype, seed):
    q, kv, meta = make_batch(seq_lens, q_lens, heads, kv_heads, head_dim, dtype, seed=seed)
    values, scales = quantize_kv_ref(kv)  # the pool as kv_scatter would have stored it
    return q, kv, values, scales, meta


INT8_CASES = [
    # (seq_lens, q_lens for prefill, heads, kv_heads): GQA 1, 4, 8 and lengths 1, 17, 1000
    ([1], [1], 2, 2),
    ([17], [17], 4, 1),
    ([1000], [1000], 8, 1),
    ([1, 17, 1000], [1, 9, 200], 4, 1),  # a decode row and two cached prefixes
    ([33, 250], [33, 20], 8, 2),
]


@pytest.mark.parametrize("dtype", INT8_DTYPES)
@pytest.mark.parametrize("seq_lens,q_lens,heads,kv_heads", INT8_CASES)
def test_int8_decode_matches_int8_reference_and_full_precision(dtype, seq_lens, q_lens, heads, kv_heads):
    head_dim = 64
    q_lens = [1] * len(seq_lens)
    q, kv, values, scales, meta = _int8_case(seq_lens, q_lens, heads, kv_heads, head_dim, dtype, seed=len(seq_lens) + heads)
    req_to_token, b_req_idx, b_seq_len, b_q_start, _ = meta
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))
    decode_attention(q, values, req_to_token, b_req_idx, b_seq_len, b_q_start, scale, out=out, num_splits=3,
                     kv_scale=scales)
    check_int8_attention(out, q, kv, values, scales, meta, scale, dtype, ATT_TOL[dtype])


@pytest.mark.parametrize("dtype", INT8_DTYPES)
@pytest.mark.parametrize("seq_lens,q_lens,heads,kv_heads", INT8_CASES)
def test_int8_prefill_matches_int8_reference_and_full_precision(dtype, seq_lens, q_lens, heads, kv_heads):
    head_dim = 64
    q, kv, values, scales, meta = _int8_case(seq_lens, q_lens, heads, kv_heads, head_dim, dtype, seed=sum(seq_lens))
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))
    prefill_attention(q, values, *meta, scale, out=out, kv_scale=scales)
    check_int8_attention(out, q, kv, values, scales, meta, scale, dtype, ATT_TOL[dtype])


@pytest.mark.parametrize("q_lens", [[1, 1, 1], [1, 12, 1]])
def test_int8_token_attention_dispatch(q_lens):
    dtype = torch.float16
    q, kv, values, scales, meta = _int8_case([40, 70, 5], q_lens, 8, 2, 128, dtype, seed=sum(q_lens))
    out = token_attention(q, values, *meta, 0.125, kv_scale=scales)
    assert_close(out, token_attention_ref(q, values, *meta, 0.125, kv_scale=scales), dtype)
    with pytest.raises(ValueError):
        token_attention(q, kv, *meta, 0.125, kv_scale=scales)  # scales with a full-precision pool
