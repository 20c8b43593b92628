"""The Triton kernels against their plain-torch references at real sizes on CUDA
(the CPU interpreter tests in tests/kernels/ cover odd shapes at small sizes)."""

import pytest
import torch

# the comparison helpers and the scattered-slot batch builder are shared with the interpreter tests
from support.kernel_check import TOL, assert_close, check_int8_attention, check_int8_scatter, make_batch, rel_err

from lightllm_plugin.kernels import _triton
from lightllm_plugin.kernels.decode_attention import decode_attention
from lightllm_plugin.kernels.kv_scatter import kv_scatter, kv_scatter_ref, quantize_kv_ref
from lightllm_plugin.kernels.one_row_linear import _chosen, one_row_linear
from lightllm_plugin.kernels.prefill_attention import prefill_attention
from lightllm_plugin.kernels.qk_rope_store import qk_rope_store, qk_rope_store_ref
from lightllm_plugin.kernels.rmsnorm import rmsnorm, rmsnorm_ref
from lightllm_plugin.kernels.rotary import rotary, rotary_ref
from lightllm_plugin.kernels.silu_and_mul import silu_and_mul, silu_and_mul_ref
from lightllm_plugin.kernels.token_attention import token_attention, token_attention_ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

DTYPES = [torch.bfloat16, torch.float16]
DEV = "cuda"


def _gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


def test_triton_path_is_taken_on_cuda():
    assert _triton.HAVE_TRITON and not _triton.INTERPRETED
    assert _triton.use_triton(torch.empty(1, device=DEV))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", [(1, 4096), (4096, 4096), (4099, 1024), (64, 5120)])
def test_rmsnorm_cuda(dtype, tokens, hidden):
    g = _gen(tokens)
    x = torch.randn(tokens, hidden, generator=g, device=DEV, dtype=dtype)
    res = torch.randn(tokens, hidden, generator=g, device=DEV, dtype=dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=g, device=DEV)).to(dtype)
    out, new_res = rmsnorm(x, w, 1e-6, res)
    ref, ref_res = rmsnorm_ref(x, w, 1e-6, res)
    assert_close(out, ref, dtype)
    assert_close(new_res, ref_res, dtype)
    assert_close(rmsnorm(x, w, 1e-5)[0], rmsnorm_ref(x, w, 1e-5)[0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_head_rmsnorm_cuda(dtype):
    g = _gen(1)
    tokens, heads, kv_heads, d = 4096, 32, 8, 128
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d, generator=g, device=DEV, dtype=dtype)
    q = qkv[:, : heads * d].reshape(tokens, heads, d)
    w = (1 + 0.1 * torch.randn(d, generator=g, device=DEV)).to(dtype)
    assert_close(rmsnorm(q, w, 1e-6)[0], rmsnorm_ref(q, w, 1e-6)[0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim", [(1, 32, 8, 128), (4096, 32, 8, 128), (1000, 16, 16, 64)])
def test_rotary_cuda(dtype, tokens, heads, kv_heads, head_dim):
    g = _gen(tokens)
    q = torch.randn(tokens, heads, head_dim, generator=g, device=DEV, dtype=dtype)
    k = torch.randn(tokens, kv_heads, head_dim, generator=g, device=DEV, dtype=dtype)
    inv = 1.0 / (500000 ** (torch.arange(0, head_dim, 2, device=DEV).float() / head_dim))
    freqs = torch.outer(torch.randint(0, 8192, (tokens,), generator=g, device=DEV).float(), inv)
    q_ref, k_ref = q.clone(), k.clone()
    rotary_ref(q_ref, k_ref, freqs.cos(), freqs.sin())
    rotary(q, k, freqs.cos(), freqs.sin())
    assert_close(q, q_ref, dtype)
    assert_close(k, k_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("tokens,heads,kv_heads", [(1, 32, 8), (1, 16, 8), (256, 32, 8), (4096, 16, 8)])
def test_qk_rope_store_cuda(dtype, norm, tokens, heads, kv_heads):
    """Against the references, and bit for bit (but for the norm's rounding) against the unfused
    kernels it replaces."""
    g, d = _gen(tokens + heads), 128
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d, generator=g, device=DEV, dtype=dtype)
    weights = [(1 + 0.3 * torch.randn(d, generator=g, device=DEV)).to(dtype) for _ in range(2)] if norm else [None, None]
    pos = torch.randint(0, 8192, (tokens,), generator=g, device=DEV).float()
    freqs = torch.outer(pos, 1.0 / (500000 ** (torch.arange(0, d, 2, device=DEV, dtype=torch.float32) / d)))
    cos, sin = freqs.cos(), freqs.sin()
    pool = torch.randn(3 * tokens + 9, 2 * kv_heads, d, generator=g, device=DEV, dtype=dtype)
    slots = torch.randperm(3 * tokens + 8, generator=g, device=DEV)[:tokens] + 1
    ref_pool, unfused_pool = pool.clone(), pool.clone()
    q_ref = qk_rope_store_ref(qkv, heads, kv_heads, d, *weights, 1e-6, cos, sin, ref_pool, slots)
    q = qk_rope_store(qkv, heads, kv_heads, d, *weights, 1e-6, cos, sin, pool, slots)
    assert_close(q, q_ref, dtype)
    assert_close(pool, ref_pool, dtype)
    qv, kv, vv = (qkv[:, a:b].reshape(tokens, -1, d) for a, b in
                  ((0, heads * d), (heads * d, (heads + kv_heads) * d), ((heads + kv_heads) * d, None)))
    if norm:
        qv, kv = rmsnorm(qv, weights[0], 1e-6)[0], rmsnorm(kv, weights[1], 1e-6)[0]
    else:
        qv, kv = qv.contiguous(), kv.contiguous()
    rotary(qv, kv, cos, sin)
    kv_scatter(unfused_pool, kv, vv, slots)
    if norm:
        # the norm's sum of squares is added up in another order: a rare last-bit difference
        assert (q != qv).float().mean() < 1e-3 and (pool != unfused_pool).float().mean() < 1e-3
    else:
        assert torch.equal(q, qv) and torch.equal(pool, unfused_pool)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,inter", [(1, 14336), (4096, 14336), (1000, 3072)])
def test_silu_and_mul_cuda(dtype, tokens, inter):
    gate_up = 2 * torch.randn(tokens, 2 * inter, generator=_gen(tokens), device=DEV, dtype=dtype)
    assert_close(silu_and_mul(gate_up), silu_and_mul_ref(gate_up), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_scatter_cuda(dtype):
    g = _gen(2)
    tokens, kv_heads, d, pool_slots = 4096, 8, 128, 200_000
    pool = torch.randn(pool_slots + 1, 2 * kv_heads, d, generator=g, device=DEV, dtype=dtype)
    slots = torch.randperm(pool_slots, generator=g, device=DEV)[:tokens] + 1
    k = torch.randn(tokens, kv_heads, d, generator=g, device=DEV, dtype=dtype)
    v = torch.randn(tokens, kv_heads, d, generator=g, device=DEV, dtype=dtype)
    ref = pool.clone()
    kv_scatter_ref(ref, k, v, slots)
    kv_scatter(pool, k, v, slots)
    assert torch.equal(pool, ref)


def _lens(n, lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, (n,), generator=g).tolist()


DECODE_CASES = [
    # (seq_lens, heads, kv_heads, head_dim): GQA ratios 1, 4, 8; one long request; batch 64
    ([32768], 32, 8, 128),
    ([1], 32, 8, 128),
    (_lens(64, 1, 4096, 0), 32, 4, 128),
    (_lens(64, 17, 1000, 1), 16, 16, 64),
    (_lens(7, 100, 9000, 2), 64, 8, 128),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(DECODE_CASES)))
def test_decode_attention_cuda(dtype, case):
    seq_lens, heads, kv_heads, d = DECODE_CASES[case]
    q, kv, meta = make_batch(seq_lens, [1] * len(seq_lens), heads, kv_heads, d, dtype, seed=case, device=DEV)
    req_to_token, b_req_idx, b_seq_len, b_q_start, _ = meta
    out = torch.full_like(q, float("nan"))
    decode_attention(q, kv, req_to_token, b_req_idx, b_seq_len, b_q_start, d**-0.5, out=out)
    ref = token_attention_ref(q, kv, *meta, d**-0.5)
    assert_close(out, ref, dtype)
    print(f"decode case {case} {dtype}: rel err {rel_err(out, ref):.2e}")


PREFILL_CASES = [
    # (seq_lens, q_lens, heads, kv_heads, head_dim); the last case has cached prefixes
    ([1000, 17, 1, 2048], [1000, 17, 1, 2048], 32, 8, 128),
    ([1024] * 8, [1024] * 8, 16, 8, 128),
    ([3000, 600, 129], [512, 600, 1], 32, 4, 128),
    ([777, 1], [777, 1], 16, 16, 64),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(PREFILL_CASES)))
def test_prefill_attention_cuda(dtype, case):
    seq_lens, q_lens, heads, kv_heads, d = PREFILL_CASES[case]
    q, kv, meta = make_batch(seq_lens, q_lens, heads, kv_heads, d, dtype, seed=10 + case, device=DEV)
    out = torch.full_like(q, float("nan"))
    prefill_attention(q, kv, *meta, d**-0.5, out=out)
    ref = token_attention_ref(q, kv, *meta, d**-0.5)
    assert_close(out, ref, dtype)
    print(f"prefill case {case} {dtype}: rel err {rel_err(out, ref):.2e}")


@pytest.mark.parametrize("dtype", DTYPES + [torch.float32])
def test_token_attention_mixed_batch_cuda(dtype):
    seq_lens, q_lens = [500, 1200, 64, 3000], [1, 300, 1, 1]
    q, kv, meta = make_batch(seq_lens, q_lens, 32, 8, 128, dtype, seed=99, device=DEV)
    out = token_attention(q, kv, *meta, 128**-0.5)
    tol = 1e-4 if dtype == torch.float32 else TOL[dtype]
    assert_close(out, token_attention_ref(q, kv, *meta, 128**-0.5), dtype, tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k", [(4096, 4096), (1024, 4096), (4096, 14336), (5000, 3000)])
def test_one_row_linear_cuda(dtype, n, k):
    """Whichever of the kernel and cuBLAS was picked for the shape, the answer is F.linear's in float64."""
    g = _gen(n + k)
    x = torch.randn(1, k, device=DEV, generator=g).to(dtype)
    w = (torch.randn(n, k, device=DEV, generator=g) / k**0.5).to(dtype)
    out = one_row_linear(x, w)
    assert (tuple(w.shape), dtype, w.device) in _chosen
    print(f"one_row_linear {n}x{k} {dtype}: kernel config {_chosen[(tuple(w.shape), dtype, w.device)]}")
    assert_close(out, torch.nn.functional.linear(x.double(), w.double()), dtype)


# ---- int8 KV cache ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_kv_scatter_cuda(dtype):
    g = _gen(3)
    tokens, kv_heads, d, pool_slots = 4096, 8, 128, 200_000
    values = torch.randint(-127, 128, (pool_slots + 1, 2 * kv_heads, d), generator=g, device=DEV, dtype=torch.int8)
    scales = torch.rand(pool_slots + 1, 2 * kv_heads, generator=g, device=DEV).to(torch.float16)
    slots = torch.randperm(pool_slots, generator=g, device=DEV)[:tokens] + 1
    mag = torch.logspace(-3, 1, kv_heads, device=DEV)[None, :, None]
    k = (torch.randn(tokens, kv_heads, d, generator=g, device=DEV) * mag).to(dtype)
    v = (torch.randn(tokens, kv_heads, d, generator=g, device=DEV) * mag).to(dtype)
    check_int8_scatter(values, scales, k, v, slots)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(DECODE_CASES)))
def test_int8_decode_attention_cuda(dtype, case):
    seq_lens, heads, kv_heads, d = DECODE_CASES[case]
    q, kv, meta = make_batch(seq_lens, [1] * len(seq_lens), heads, kv_heads, d, dtype, seed=case, device=DEV)
    values, scales = quantize_kv_ref(kv)
    req_to_token, b_req_idx, b_seq_len, b_q_start, _ = meta
    out = torch.full_like(q, float("nan"))
    decode_attention(q, values, req_to_token, b_req_idx, b_seq_len, b_q_start, d**-0.5, out=out, kv_scale=scales)
    err_int8, err_full = check_int8_attention(out, q, kv, values, scales, meta, d**-0.5, dtype)
    print(f"int8 decode case {case} {dtype}: rel err {err_int8:.2e} vs int8 ref, {err_full:.2e} vs full precision")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(PREFILL_CASES)))
def test_int8_prefill_attention_cuda(dtype, case):
    seq_lens, q_lens, heads, kv_heads, d = PREFILL_CASES[case]
    q, kv, meta = make_batch(seq_lens, q_lens, heads, kv_heads, d, dtype, seed=10 + case, device=DEV)
    values, scales = quantize_kv_ref(kv)
    out = torch.full_like(q, float("nan"))
    prefill_attention(q, values, *meta, d**-0.5, out=out, kv_scale=scales)
    err_int8, err_full = check_int8_attention(out, q, kv, values, scales, meta, d**-0.5, dtype)
    print(f"int8 prefill case {case} {dtype}: rel err {err_int8:.2e} vs int8 ref, {err_full:.2e} vs full precision")
