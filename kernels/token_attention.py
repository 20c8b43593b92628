"""Attention over the token-slot KV pool, read through `req_to_token`.

One call serves prefill (many new tokens per request, with any cached prefix) and
decode (one new token per request): request b's q_len new queries sit at positions
seq_len-q_len .. seq_len-1 and attend causally to its first seq_len tokens, whose K/V
live in the slots `req_to_token[req_idx, :seq_len]`.

The launcher picks the kernel from shapes alone, never from values on the device: when
there are as many new tokens as requests every row is a decode row (each has at least
one) and the split-KV decode kernel runs; otherwise the prefill kernel takes the whole
batch, its q_len == 1 rows included.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from lightllm_plugin.kernels._triton import use_triton
from lightllm_plugin.kernels.decode_attention import decode_attention
from lightllm_plugin.kernels.prefill_attention import prefill_attention


def _expand_kv_heads(x: torch.Tensor, group: int) -> torch.Tensor:
    # [.., Hkv, L, D] -> [.., H, L, D] for grouped-query attention
    return x if group == 1 else x.repeat_interleave(group, dim=-3)


def _gather(kv_layer: torch.Tensor, kv_scale: torch.Tensor | None, slots: torch.Tensor) -> torch.Tensor:
    # one batch's keys and values (the reference gathers them either way); int8 ones dequantized
    kv = kv_layer[slots]
    return kv if kv_scale is None else kv.float() * kv_scale[slots].float()[..., None]


def token_attention_ref(
    q: torch.Tensor,  # [T, H, D] packed new tokens
    kv_layer: torch.Tensor,  # [slots+1, 2*Hkv, D]
    req_to_token: torch.Tensor,  # [max_reqs, max_len] slot index per (request row, position)
    b_req_idx: torch.Tensor,  # [B]
    b_seq_len: torch.Tensor,  # [B] tokens in KV after this step
    b_q_start: torch.Tensor,  # [B] offset of the request's first new token in q
    b_q_len: torch.Tensor,  # [B] new tokens of the request
    scale: float,
    kv_scale: torch.Tensor | None = None,  # [slots+1, 2*Hkv]: kv_layer is int8 (quantized by kv_scatter)
) -> torch.Tensor:
    num_heads = q.shape[1]
    kv_heads = kv_layer.shape[1] // 2
    group = num_heads // kv_heads
    out = torch.empty_like(q)
    req_idx, seq_len = b_req_idx.tolist(), b_seq_len.tolist()
    q_start, q_len = b_q_start.tolist(), b_q_len.tolist()

    # decode rows (one query each) are batched with padding; prefill rows run one by one
    decode = [b for b in range(len(req_idx)) if q_len[b] == 1]
    prefill = [b for b in range(len(req_idx)) if q_len[b] > 1]

    if decode:
        max_len = max(seq_len[b] for b in decode)
        rows = torch.tensor([req_idx[b] for b in decode], device=q.device)
        lens = torch.tensor([seq_len[b] for b in decode], device=q.device)
        slots = req_to_token[rows, :max_len].long()  # [Bd, L]
        kv = _gather(kv_layer, kv_scale, slots)  # [Bd, L, 2Hkv, D]
        k = _expand_kv_heads(kv[:, :, :kv_heads].transpose(1, 2).float(), group)  # [Bd, H, L, D]
        v = _expand_kv_heads(kv[:, :, kv_heads:].transpose(1, 2).float(), group)
        qpos = torch.tensor([q_start[b] for b in decode], device=q.device)
        qd = q[qpos].float().unsqueeze(2)  # [Bd, H, 1, D]
        valid = torch.arange(max_len, device=q.device)[None, :] < lens[:, None]  # [Bd, L]
        o = F.scaled_dot_product_attention(qd, k, v, attn_mask=valid[:, None, None, :], scale=scale)
        out[qpos] = o.squeeze(2).to(q.dtype)

    for b in prefill:
        n, length = q_len[b], seq_len[b]
        slots = req_to_token[req_idx[b], :length].long()
        kv = _gather(kv_layer, kv_scale, slots)  # [L, 2Hkv, D]
        k = _expand_kv_heads(kv[:, :kv_heads].transpose(0, 1).float(), group)  # [H, L, D]
        v = _expand_kv_heads(kv[:, kv_heads:].transpose(0, 1).float(), group)
        qb = q[q_start[b] : q_start[b] + n].transpose(0, 1).float()  # [H, n, D]
        # query j sits at position length-n+j and sees keys 0..length-n+j
        qpos = torch.arange(length - n, length, device=q.device)
        mask = torch.arange(length, device=q.device)[None, :] <= qpos[:, None]
        o = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scale)
        out[q_start[b] : q_start[b] + n] = o.transpose(0, 1).to(q.dtype)
    return out


# ---- the CPU implementation: SDPA on each request's K/V, read in place or gathered ----
def _read_kv(kv_layer: torch.Tensor, kv_scale: torch.Tensor | None, slots: torch.Tensor, dtype: torch.dtype,
             may_be_a_run: bool = True) -> torch.Tensor:
    """The K and V of `slots` as [2*Hkv, len(slots), D] in `dtype` (int8 ones dequantized). A run
    of consecutive slots (the free-list hands them out in ascending runs) is read in place: the
    pool's [slots, 2*Hkv, D] layout makes it a strided view; other slots are gathered."""
    first, n = int(slots[0]), slots.shape[0]
    if may_be_a_run and torch.equal(slots, torch.arange(first, first + n, dtype=slots.dtype)):
        return _read_run(kv_layer, kv_scale, first, n, dtype)
    scales = None if kv_scale is None else kv_scale.index_select(0, slots)
    return _heads_first(kv_layer.index_select(0, slots), scales, dtype)


def _read_run(kv_layer, kv_scale, first: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Slots first .. first+n-1, read in place."""
    scales = None if kv_scale is None else kv_scale[first : first + n]
    return _heads_first(kv_layer[first : first + n], scales, dtype)


def _heads_first(kv: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    # [n, 2*Hkv, D] (with int8 scales [n, 2*Hkv]) -> [2*Hkv, n, D] in dtype
    if scales is not None:
        kv = kv.to(dtype) * scales.to(dtype)[..., None]
    return kv.to(dtype).transpose(0, 1)


# CPU decode pads each row's keys to a multiple of this many, the padding masked, whether the row
# runs alone or batched: SDPA's sums change with the padded length, and a greedy row's tokens must
# not depend on what else shares its step. Rows of one padded length share an SDPA call (one call
# per row would cost ~30 us each per layer at 64 streams; the mask costs ~8 us a call).
KV_LENGTH_BUCKET = 128


class _DecodeGroup(NamedTuple):
    """Rows of one padded key length, and how their keys are read."""

    members: torch.Tensor | None  # their rows in the batch; None: every row, in order
    lens: list[int]
    run_first: int | None  # a lone row whose slots form one run, read in place from this slot
    slots: torch.Tensor | None  # otherwise [G * P] flat slot ids, gathered
    padded: int
    mask: torch.Tensor  # [G, 1, 1, P]


class _DecodePlan(NamedTuple):
    key: tuple
    table: torch.Tensor  # [B, max len]
    shared: int
    groups: list[_DecodeGroup]


# A decode step calls attention once per layer with the same rows, lengths and table: what depends
# on those alone (the grouping by padded length, masks, slot lists, the run checks) is worked out
# at the first layer and reused by the others, about 100 us a layer of Python and small ops. The
# key includes the table's version counter, which every write to it (each step's new slots) bumps.
_last_plan: list[_DecodePlan] = []


def _decode_plan(req_to_token: torch.Tensor, rows: torch.Tensor, lens: list[int], pool_slots: int) -> _DecodePlan:
    key = (id(req_to_token), req_to_token.data_ptr(), req_to_token._version, tuple(rows.tolist()), tuple(lens),
           pool_slots)
    cached = _last_plan[0] if _last_plan else None  # one read: another engine's thread may replace it
    if cached is not None and cached.key == key:
        return cached
    table = req_to_token[rows, : max(lens)]
    shared = _shared_prefix_length(table, min(lens)) if len(lens) > 1 else 0
    width = req_to_token.shape[1]
    by_padded: dict[int, list[int]] = {}
    for b, n in enumerate(lens):
        by_padded.setdefault(min(-(-n // KV_LENGTH_BUCKET) * KV_LENGTH_BUCKET, width), []).append(b)
    groups = []
    for padded, members in by_padded.items():
        member_lens = [lens[b] for b in members]
        padded_table = req_to_token[rows[members], :padded]
        run_first = None
        if len(members) == 1:
            first, n = int(padded_table[0, 0]), member_lens[0]
            if first + padded <= pool_slots and torch.equal(
                    padded_table[0, :n], torch.arange(first, first + n, dtype=padded_table.dtype)):
                run_first = first
        slots = padded_table.reshape(-1).long() if run_first is None else None
        mask = (torch.arange(padded)[None, :] < torch.tensor(member_lens)[:, None])[:, None, None, :]
        everyone = len(by_padded) == 1
        groups.append(_DecodeGroup(None if everyone else torch.tensor(members), member_lens, run_first, slots, padded,
                                   mask))
    plan = _DecodePlan(key, table, shared, groups)
    _last_plan[:] = [plan]
    return plan


def _decode_cpu(q: torch.Tensor, kv_layer, kv_scale, req_to_token, rows: torch.Tensor, lens: list[int],
                scale) -> torch.Tensor:
    """q: [B, H, D], one query per request -> [B, H, D]. A GQA group's query heads are the rows of
    one SDPA "sequence" over its kv head (no causal mask: every key is visible), so K/V are never
    repeated per head."""
    kv_heads, head_dim = kv_layer.shape[1] // 2, q.shape[-1]
    plan = _decode_plan(req_to_token, rows, lens, kv_layer.shape[0])
    if plan.shared >= SHARED_PREFIX_MIN_TOKENS:
        return _decode_shared_prefix_cpu(q, kv_layer, kv_scale, plan.table, lens, plan.shared, scale)
    # the pool's dtype for SDPA: a bfloat16 pool is read as it is, half the bytes of float32
    dtype = q.dtype if kv_scale is not None else kv_layer.dtype
    out = None if len(plan.groups) == 1 else torch.empty_like(q)
    for group in plan.groups:
        count = len(group.lens)
        if group.run_first is not None:
            kv = _read_run(kv_layer, kv_scale, group.run_first, group.padded, dtype)[None]
        else:
            kv = _read_kv(kv_layer, kv_scale, group.slots, dtype, may_be_a_run=False)
            kv = kv.view(kv.shape[0], count, group.padded, kv.shape[-1]).transpose(0, 1)
        qd = (q if group.members is None else q[group.members]).view(count, kv_heads, -1, head_dim).to(dtype)
        o = F.scaled_dot_product_attention(qd, kv[:, :kv_heads], kv[:, kv_heads:], attn_mask=group.mask, scale=scale)
        o = o.view(count, -1, head_dim).to(q.dtype)
        if out is None:
            return o
        out[group.members] = o
    return out


# Decode rows whose first keys are the same slots (the prefix cache gives every request with one
# system prompt the same slots for it) attend to those keys in one matmul over all the rows'
# queries: the shared K/V are read once a step instead of once a row. Below this length the
# gather of the padded batch costs less than the extra operations.
SHARED_PREFIX_MIN_TOKENS = 32


def _shared_prefix_length(table: torch.Tensor, limit: int) -> int:
    """How many leading positions hold the same slot in every row of table [B, L], at most limit."""
    same = (table[:, :limit] == table[:1, :limit]).all(0)
    return int(same.cumprod(0).sum())


def _decode_shared_prefix_cpu(q: torch.Tensor, kv_layer, kv_scale, table: torch.Tensor, lens: list[int],
                              shared: int, scale) -> torch.Tensor:
    """Decode attention, float32, split at `shared`: the common prefix's scores for every query in
    one matmul per KV head, each row's own keys (padded, masked) in a batched one, and one softmax
    over both, so the result is the attention over all of a row's keys."""
    batch, kv_heads, head_dim = len(lens), kv_layer.shape[1] // 2, q.shape[-1]
    group = q.shape[1] // kv_heads
    queries = q.float().view(batch, kv_heads, group, head_dim).transpose(0, 1)  # [Hkv, B, g, D]
    prefix = _read_kv(kv_layer, kv_scale, table[0, :shared], torch.float32)  # [2Hkv, P, D]
    k_pre, v_pre = prefix[:kv_heads], prefix[kv_heads:]
    scores = torch.matmul(queries.reshape(kv_heads, batch * group, head_dim), k_pre.transpose(1, 2))
    scores = scores.view(kv_heads, batch, group, shared)
    own = table.shape[1] - shared
    if own:
        rest = _read_kv(kv_layer, kv_scale, table[:, shared:].reshape(-1), torch.float32, may_be_a_run=False)
        rest = rest.reshape(2 * kv_heads, batch, own, head_dim)
        k_own, v_own = rest[:kv_heads], rest[kv_heads:]  # [Hkv, B, R, D]
        own_scores = torch.matmul(queries, k_own.transpose(2, 3))  # [Hkv, B, g, R]
        valid = torch.arange(own)[None, :] < (torch.tensor(lens) - shared)[:, None]  # [B, R]
        own_scores = own_scores.masked_fill(~valid[None, :, None, :], float("-inf"))
        scores = torch.cat([scores, own_scores], dim=-1)
    probs = torch.softmax(scores * scale, dim=-1)
    out = torch.matmul(probs[..., :shared].reshape(kv_heads, batch * group, shared), v_pre)
    out = out.view(kv_heads, batch, group, head_dim)
    if own:
        out = out + torch.matmul(probs[..., shared:], v_own)
    return out.transpose(0, 1).reshape(batch, -1, head_dim).to(q.dtype)


def _prefill_cpu(q, kv_layer, kv_scale, slots: torch.Tensor, start: int, n: int, scale, out):
    # n queries at positions len-n .. len-1, causal; float32 math (on AVX-512 the float32 flash
    # kernel outruns the bfloat16 one), K/V repeated per query head (SDPA's GQA mode is slower)
    length, kv_heads, group = slots.shape[0], kv_layer.shape[1] // 2, q.shape[1] // (kv_layer.shape[1] // 2)
    kv = _read_kv(kv_layer, kv_scale, slots, torch.float32)
    # 4-d: SDPA takes its flash kernel only for [batch, heads, len, dim]
    k, v = kv[None, :kv_heads].repeat_interleave(group, 1), kv[None, kv_heads:].repeat_interleave(group, 1)
    qb = q[None, start : start + n].transpose(1, 2).float()  # [1, H, n, D]
    if n == length:
        o = F.scaled_dot_product_attention(qb, k, v, is_causal=True, scale=scale)
    else:  # a cached prefix: SDPA's is_causal aligns top-left, this mask bottom-right
        mask = torch.arange(length)[None, :] <= torch.arange(length - n, length)[:, None]
        o = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scale)
    out[start : start + n] = o[0].transpose(0, 1).to(out.dtype)


def token_attention_cpu(
    q: torch.Tensor,  # [T, H, D]
    kv_layer: torch.Tensor,  # [slots+1, 2*Hkv, D]; may be of a lower dtype than q
    req_to_token: torch.Tensor,
    b_req_idx: torch.Tensor,
    b_seq_len: torch.Tensor,
    b_q_start: torch.Tensor,
    b_q_len: torch.Tensor,
    scale: float,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The engine's attention on CPU, the same results as token_attention_ref: decode rows in one
    SDPA call (padded to the longest), each prefill row in one causal SDPA call."""
    req_idx, seq_len = b_req_idx.tolist(), b_seq_len.tolist()
    if len(req_idx) == q.shape[0]:  # a decode step: every row one query, in order
        return _decode_cpu(q, kv_layer, kv_scale, req_to_token, b_req_idx, seq_len, scale)
    out = torch.empty_like(q)
    q_start, q_len = b_q_start.tolist(), b_q_len.tolist()
    decode = [b for b in range(len(req_idx)) if q_len[b] == 1]
    if decode:
        at = torch.tensor([q_start[b] for b in decode])
        out[at] = _decode_cpu(q[at], kv_layer, kv_scale, req_to_token, b_req_idx[decode],
                              [seq_len[b] for b in decode], scale)
    for b in range(len(req_idx)):
        if q_len[b] > 1:
            slots = req_to_token[req_idx[b], : seq_len[b]]
            _prefill_cpu(q, kv_layer, kv_scale, slots, q_start[b], q_len[b], scale, out)
    return out


def token_attention(
    q: torch.Tensor,
    kv_layer: torch.Tensor,
    req_to_token: torch.Tensor,
    b_req_idx: torch.Tensor,
    b_seq_len: torch.Tensor,
    b_q_start: torch.Tensor,
    b_q_len: torch.Tensor,
    scale: float,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """`kv_scale` ([slots+1, 2*Hkv]) marks an int8 `kv_layer`; K/V are dequantized as they are read."""
    if q.dim() != 3 or kv_layer.dim() != 3 or kv_layer.shape[2] != q.shape[2]:
        raise ValueError(f"token_attention: q {tuple(q.shape)} and kv {tuple(kv_layer.shape)} do not fit")
    if q.shape[1] % (kv_layer.shape[1] // 2):
        raise ValueError("token_attention: query heads must be a multiple of kv heads")
    if kv_scale is not None and (kv_layer.dtype != torch.int8 or kv_scale.shape != kv_layer.shape[:2]):
        raise ValueError(f"token_attention: scales {tuple(kv_scale.shape)} need an int8 kv {tuple(kv_layer.shape)}")
    unit_stride = q.stride(-1) == 1 and kv_layer.stride(-1) == 1 and req_to_token.stride(-1) == 1
    if kv_scale is not None:
        unit_stride = unit_stride and kv_scale.stride(-1) == 1
    if use_triton(q) and unit_stride:
        if q.shape[0] == b_req_idx.shape[0]:
            return decode_attention(q, kv_layer, req_to_token, b_req_idx, b_seq_len, b_q_start, scale,
                                    kv_scale=kv_scale)
        return prefill_attention(q, kv_layer, req_to_token, b_req_idx, b_seq_len, b_q_start, b_q_len, scale,
                                 kv_scale=kv_scale)
    if q.device.type == "cpu":
        return token_attention_cpu(q, kv_layer, req_to_token, b_req_idx, b_seq_len, b_q_start, b_q_len, scale, kv_scale)
    return token_attention_ref(q, kv_layer, req_to_token, b_req_idx, b_seq_len, b_q_start, b_q_len, scale, kv_scale)
