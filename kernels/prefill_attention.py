"""Prefill attention over packed variable-length new tokens, reading every key
(cached prefix and new) through `req_to_token`.

Request b's q_len new queries sit at positions seq_len-q_len .. seq_len-1 and attend
causally. One program handles one (query block, request, kv head): the query heads
of a GQA group are folded into the rows of its tile (row r = token r // GROUP, head
r % GROUP), so each key/value block is gathered once for the whole group. Rows with
q_len == 1 are handled too, so a mixed prefill/decode batch needs a single launch.
"""

from __future__ import annotations

import torch

from lightllm_plugin.kernels._attention_block import LOG2E, attend_kv_block, attention_dims, dot_precision, upcast_dot
from lightllm_plugin.kernels._triton import cdiv, jit, next_pow2, tl


@jit
def _prefill_attention_kernel(
    Q, KV, KS, Out, ReqToToken, BReqIdx, BSeqLen, BQStart, BQLen,
    qk_scale, head_dim, kv_heads,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kvs, stride_kvh, stride_kss, stride_req,
    GROUP: tl.constexpr, Q_TOKENS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, QUANT: tl.constexpr,
):
    tl.static_assert(Q_TOKENS * GROUP <= BLOCK_M)
    q_block = tl.program_id(0)
    b = tl.program_id(1)
    kvh = tl.program_id(2)
    q_len = tl.load(BQLen + b)
    # the grid is sized for the longest request without reading lengths back to the host
    if q_block * Q_TOKENS < q_len:
        seq_len = tl.load(BSeqLen + b)
        q_start = tl.load(BQStart + b)
        slot_row = ReqToToken + tl.load(BReqIdx + b).to(tl.int64) * stride_req
        prefix = seq_len - q_len

        rows = tl.arange(0, BLOCK_M)
        tok = q_block * Q_TOKENS + rows // GROUP
        head = kvh * GROUP + rows % GROUP
        row_ok = (rows < Q_TOKENS * GROUP) & (tok < q_len)
        dims = tl.arange(0, BLOCK_D)
        io_mask = row_ok[:, None] & (dims < head_dim)[None, :]
        tok64 = (q_start + tok).to(tl.int64)
        q = tl.load(Q + tok64[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :], mask=io_mask, other=0.0)
        q_pos = prefix + tok

        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        k_off = kvh * stride_kvh
        v_off = (kv_heads + kvh) * stride_kvh
        # keys before the block's first query position are visible to every row: no causal mask
        first_pos = prefix + q_block * Q_TOKENS
        n_full = (first_pos + 1) // BLOCK_N * BLOCK_N
        n_end = tl.minimum(seq_len, first_pos + Q_TOKENS)
        for n0 in range(0, n_full, BLOCK_N):
            acc, m_i, l_i = attend_kv_block(
                q, acc, m_i, l_i, KV, slot_row, n0, n_end, k_off, v_off, stride_kvs, head_dim, q_pos, qk_scale,
                KS, kvh, kv_heads + kvh, stride_kss, False, BLOCK_N, BLOCK_D, DOT_PRECISION, UPCAST_DOT, QUANT,
            )
        for n0 in range(n_full, n_end, BLOCK_N):
            acc, m_i, l_i = attend_kv_block(
                q, acc, m_i, l_i, KV, slot_row, n0, n_end, k_off, v_off, stride_kvs, head_dim, q_pos, qk_scale,
                KS, kvh, kv_heads + kvh, stride_kss, True, BLOCK_N, BLOCK_D, DOT_PRECISION, UPCAST_DOT, QUANT,
            )
        out = acc / l_i[:, None]
        tl.store(Out + tok64[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :], out, mask=io_mask)


def prefill_attention(
    q: torch.Tensor,  # [T, H, D]
    kv_layer: torch.Tensor,  # [slots+1, 2*Hkv, D]
    req_to_token: torch.Tensor,  # [max_reqs, max_len]
    b_req_idx: torch.Tensor,
    b_seq_len: torch.Tensor,
    b_q_start: torch.Tensor,
    b_q_len: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int = 64,
    num_warps: int | None = None,
    num_stages: int = 2,
    kv_scale: torch.Tensor | None = None,  # [slots+1, 2*Hkv]: kv_layer is int8, dequantized as it is read
) -> torch.Tensor:
    """Every row must have q_len >= 1; q, kv_layer and req_to_token rows unit-stride in the last dim.

    Default tiles from an H100 sweep (bf16, D=128, 4096-token causal prefill, GQA 4):
    128x64 with 8 warps ran 480 us against 927 us for 64x64 with 8 warps. float32 keeps
    64-row tiles so its doubled operand size still fits in shared memory.
    """
    tokens, num_heads, head_dim, kv_heads, group, batch = attention_dims(q, kv_layer, b_req_idx)
    out = torch.empty_like(q) if out is None else out
    if tokens == 0 or batch == 0:
        return out
    if block_m is None:
        block_m = 128 if q.element_size() <= 2 else 64
    q_tokens = max(1, block_m // group)
    block_m = max(block_m, next_pow2(group))
    # the longest request has at most tokens - (batch - 1) new tokens, each other row at least one
    grid = (cdiv(tokens - batch + 1, q_tokens), batch, kv_heads)
    block_d = next_pow2(head_dim)
    if num_warps is None:
        num_warps = 8 if block_m * block_d >= 128 * 128 else 4
    _prefill_attention_kernel[grid](
        q, kv_layer, kv_layer if kv_scale is None else kv_scale, out, req_to_token, b_req_idx, b_seq_len, b_q_start,
        b_q_len, scale * LOG2E, head_dim, kv_heads,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), kv_layer.stride(0), kv_layer.stride(1),
        0 if kv_scale is None else kv_scale.stride(0), req_to_token.stride(0),
        GROUP=group, Q_TOKENS=q_tokens, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_PRECISION=dot_precision(q.dtype), UPCAST_DOT=upcast_dot(q.dtype), QUANT=kv_scale is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
