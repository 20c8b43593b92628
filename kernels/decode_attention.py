"""Decode attention (one new query per request) with split-KV flash-decoding.

Stage 1 runs one program per (request, kv head, split): it gathers its split's share
of the request's keys through `req_to_token` once for all GROUP query heads of that kv
head, and writes a partial result normalized by its own softmax sum, plus the base-2
log-sum-exp. Stage 2 merges the splits per (request, head). Splitting the sequence lets a
batch of one long request still occupy every SM. The grid depends only on the batch
size and the split count, never on sequence lengths, so no length is read back to the
host (and the launch can be captured in a CUDA graph).
"""

from __future__ import annotations

import functools

import torch

from lightllm_plugin.kernels._attention_block import LOG2E, attend_kv_block, attention_dims, dot_precision, upcast_dot
from lightllm_plugin.kernels._triton import cdiv, jit, next_pow2, tl


@jit
def _decode_split_kernel(
    Q, KV, KS, MidO, MidLse, ReqToToken, BReqIdx, BSeqLen, BQStart,
    qk_scale, head_dim, kv_heads, num_splits,
    stride_qt, stride_qh, stride_kvs, stride_kvh, stride_kss, stride_req,
    stride_mo_b, stride_mo_h, stride_mo_s, stride_ml_b, stride_ml_h,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, QUANT: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(BSeqLen + b)
    q_start = tl.load(BQStart + b).to(tl.int64)
    slot_row = ReqToToken + tl.load(BReqIdx + b).to(tl.int64) * stride_req
    # whole key blocks per split, so only a split's last block is partly masked
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    g = tl.arange(0, BLOCK_G)
    head = kvh * GROUP + g
    g_ok = g < GROUP
    dims = tl.arange(0, BLOCK_D)
    io_mask = g_ok[:, None] & (dims < head_dim)[None, :]
    q = tl.load(Q + q_start * stride_qt + head[:, None] * stride_qh + dims[None, :], mask=io_mask, other=0.0)

    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        acc, m_i, l_i = attend_kv_block(
            q, acc, m_i, l_i, KV, slot_row, n0, end, kvh * stride_kvh, (kv_heads + kvh) * stride_kvh,
            stride_kvs, head_dim, 0, qk_scale, KS, kvh, kv_heads + kvh, stride_kss,
            False, BLOCK_N, BLOCK_D, DOT_PRECISION, UPCAST_DOT, QUANT,
        )
    # a split past the end of a short sequence holds no keys: weight zero in stage 2
    has_keys = l_i > 0
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    part = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    mo = MidO + b * stride_mo_b + head[:, None] * stride_mo_h + split * stride_mo_s + dims[None, :]
    tl.store(mo, part, mask=io_mask)
    tl.store(MidLse + b * stride_ml_b + head * stride_ml_h + split, lse, mask=g_ok)


@jit
def _decode_reduce_kernel(
    MidO, MidLse, Out, BQStart,
    head_dim, num_splits,
    stride_mo_b, stride_mo_h, stride_mo_s, stride_ml_b, stride_ml_h, stride_ot, stride_oh,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    s_ok = splits < num_splits
    dims = tl.arange(0, BLOCK_D)
    lse = tl.load(MidLse + b * stride_ml_b + h * stride_ml_h + splits, mask=s_ok, other=float("-inf"))
    # split 0 always holds a key (seq_len >= 1), so the max is finite
    w = tl.exp2(lse - tl.max(lse, axis=0))
    mask = s_ok[:, None] & (dims < head_dim)[None, :]
    part = tl.load(MidO + b * stride_mo_b + h * stride_mo_h + splits[:, None] * stride_mo_s + dims[None, :],
                   mask=mask, other=0.0)
    out = tl.sum(w[:, None] * part, axis=0) / tl.sum(w, axis=0)
    q_start = tl.load(BQStart + b).to(tl.int64)
    tl.store(Out + q_start * stride_ot + h * stride_oh + dims, out, mask=dims < head_dim)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_num_splits(batch: int, kv_heads: int, max_len: int, device: torch.device, block_n: int = 64) -> int:
    """Enough (request, kv head, split) programs for about two waves on the device; never
    more splits than key blocks fit in the longest possible sequence."""
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else 4
    # the batch rounded up as the engine's CUDA-graph ladder pads it, so an eager decode and a
    # padded graph replay split each sequence the same way and give the same numbers
    want = cdiv(2 * sms, max(1, next_pow2(batch) * kv_heads))
    return max(1, min(want, cdiv(max_len, block_n), 64))


def decode_attention(
    q: torch.Tensor,  # [T, H, D]; the rows named by b_q_start, one per request
    kv_layer: torch.Tensor,  # [slots+1, 2*Hkv, D]
    req_to_token: torch.Tensor,  # [max_reqs, max_len]
    b_req_idx: torch.Tensor,
    b_seq_len: torch.Tensor,
    b_q_start: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    kv_scale: torch.Tensor | None = None,  # [slots+1, 2*Hkv]: kv_layer is int8, dequantized as it is read
) -> torch.Tensor:
    """Every request must have exactly one new query token and seq_len >= 1."""
    tokens, num_heads, head_dim, kv_heads, group, batch = attention_dims(q, kv_layer, b_req_idx)
    out = torch.empty_like(q) if out is None else out
    if batch == 0:
        return out
    if num_splits is None:
        num_splits = default_num_splits(batch, kv_heads, req_to_token.shape[1], q.device, block_n)
    mid_o = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    block_d = next_pow2(head_dim)
    _decode_split_kernel[(batch, kv_heads, num_splits)](
        q, kv_layer, kv_layer if kv_scale is None else kv_scale, mid_o, mid_lse, req_to_token, b_req_idx, b_seq_len,
        b_q_start, scale * LOG2E, head_dim, kv_heads, num_splits,
        q.stride(0), q.stride(1), kv_layer.stride(0), kv_layer.stride(1), 0 if kv_scale is None else kv_scale.stride(0),
        req_to_token.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        # tensor-core dots need at least 16 rows: a GQA group is padded up to that
        GROUP=group, BLOCK_G=max(16, next_pow2(group)), BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_PRECISION=dot_precision(q.dtype), UPCAST_DOT=upcast_dot(q.dtype), QUANT=kv_scale is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    _decode_reduce_kernel[(batch, num_heads)](
        mid_o, mid_lse, out, b_q_start,
        head_dim, num_splits,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_S=next_pow2(num_splits), BLOCK_D=block_d, num_warps=4,
    )
    return out
