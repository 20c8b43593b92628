"""The inner step shared by prefill and decode attention: one block of keys, gathered
through a request's row of `req_to_token`, folded into an online softmax. Also the host-side
pieces both launchers share (dot precision, the sizes they read off their inputs).

Scores are kept in base 2 (the caller folds log2(e) into `qk_scale`) so the update
uses exp2. Callers start the running max at -1e30, a finite value rather than -inf:
a row whose keys in this block are all masked then gets p = 0 and alpha = 1 instead
of NaN from (-inf) - (-inf). (A literal in the kernels: compiled Triton refuses plain
Python globals.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lightllm_plugin.kernels._triton import INTERPRETED, jit, tl


@jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        # the Triton interpreter stores bfloat16 as raw uint16 and multiplies the bit patterns in
        # tl.dot (triton 3.9); float32 operands give the same products the tensor cores form
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@jit
def attend_kv_block(
    q, acc, m_i, l_i,
    KV, slot_row, n0, n_end, k_head_off, v_head_off, stride_kvs, head_dim, q_pos, qk_scale,
    KS, k_scale_off, v_scale_off, stride_kss,
    CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr, QUANT: tl.constexpr,
):
    # QUANT: KV holds int8 and KS one scale per (slot, K-or-V head). The int8 values are exact in
    # every float dtype, so the dots run on them as they are and the scales are applied after:
    # K's to the scores (one per key column), V's to the probabilities, never to a copy of K/V.
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_end
    dims = tl.arange(0, BLOCK_D)
    slots = tl.load(slot_row + offs_n, mask=n_ok, other=0).to(tl.int64)
    # masked rows load zeros, not whatever the pad slot holds: 0 * NaN would poison acc
    kv_mask = n_ok[:, None] & (dims < head_dim)[None, :]
    base = KV + slots[:, None] * stride_kvs + dims[None, :]
    k = tl.load(base + k_head_off, mask=kv_mask, other=0.0)
    v = tl.load(base + v_head_off, mask=kv_mask, other=0.0)
    if QUANT:
        if UPCAST_DOT:  # the interpreter's bfloat16 is raw bits (see _dot): go through float32
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        else:
            k = k.to(q.dtype)
            v = v.to(q.dtype)
    s = _dot(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT)
    if QUANT:
        k_scale = tl.load(KS + slots * stride_kss + k_scale_off, mask=n_ok, other=0.0).to(tl.float32)
        s = s * k_scale[None, :]
    s = s * qk_scale
    keep = n_ok[None, :]
    if CAUSAL:
        keep = keep & (offs_n[None, :] <= q_pos[:, None])
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if QUANT:
        v_scale = tl.load(KS + slots * stride_kss + v_scale_off, mask=n_ok, other=0.0).to(tl.float32)
        p = p * v_scale[None, :]
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, UPCAST_DOT)
    return acc, m_new, l_i


def dot_precision(dtype: torch.dtype) -> str:
    # float32 models are the accuracy baseline (tests compare them with HF in float32):
    # keep their dots in full precision instead of Triton's tf32 default
    return "ieee" if dtype == torch.float32 else "tf32"


def upcast_dot(dtype: torch.dtype) -> bool:
    return INTERPRETED and dtype == torch.bfloat16


LOG2E = 1.4426950408889634


class AttentionDims(NamedTuple):
    """The sizes both attention launchers read off their inputs."""

    tokens: int  # rows of q (new tokens of the whole batch)
    num_heads: int
    head_dim: int
    kv_heads: int  # kv_layer holds the K heads, then the V heads: 2 * kv_heads rows per slot
    group: int  # query heads per kv head (GQA)
    batch: int  # requests


def attention_dims(q: torch.Tensor, kv_layer: torch.Tensor, b_req_idx: torch.Tensor) -> AttentionDims:
    tokens, num_heads, head_dim = q.shape
    kv_heads = kv_layer.shape[1] // 2
    return AttentionDims(tokens, num_heads, head_dim, kv_heads, num_heads // kv_heads, b_req_idx.shape[0])
