"""Fused mixture-of-experts MLP: route each token to its top-k experts, run the experts' gated
MLPs as grouped GEMMs over the tokens sorted by expert, and add the weighted results back in
token order.

Shapes: x [T, H], router logits [T, E], w_gate_up [E, 2I, H] (gate rows then up rows, as
F.linear takes them), w_down [E, H, I]. An "entry" is one (token, choice) pair, entry = t*k + j.

The Triton path is five launches, none of which needs the host to read a device value (so a
decode step under a CUDA graph captures it):
1. `_route_kernel`: per token, softmax over the experts in float32, the top k, renormalized when
   asked, and each chosen expert's token count (atomic);
2. `_align_kernel` (one program): each expert's entries padded to a multiple of BLOCK_M, where
   each expert's run of padded rows starts, and which expert each block of BLOCK_M rows is;
3. `_sort_kernel`: each entry's row in the sorted order (an atomic cursor per expert);
4. `_expert_gemm_kernel` twice: a program takes BLOCK_M sorted rows of one expert and BLOCK_N of
   its output columns, so it reads only that expert's weights; the first GEMM gathers the rows of
   x and applies SiLU-and-mul to its gate and up tiles, the second multiplies by the routing weight;
5. the k results of a token summed (torch).
The number of row blocks is bounded on the host by cdiv(T*k, BLOCK_M) + min(E, T*k) (each
non-empty expert wastes at most one partly filled block); blocks past the real ones exit at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightllm_plugin.kernels._triton import INTERPRETED, cdiv, jit, next_pow2, tl, use_triton


# ---- reference ------------------------------------------------------------------------
def moe_route_ref(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights float32 [T, k], expert ids int64 [T, k]): softmax in float32, then the top k."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def fused_moe_ref(x: torch.Tensor, router_logits: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                  top_k: int, renormalize: bool) -> torch.Tensor:
    weights, ids = moe_route_ref(router_logits, top_k, renormalize)
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w_gate_up.shape[0]).tolist()
    start = 0
    for expert, count in enumerate(counts):
        if not count:
            continue
        entries = order[start : start + count]
        start += count
        tokens = entries // top_k
        gate, up = F.linear(x[tokens], w_gate_up[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w_down[expert])
        out.index_add_(0, tokens, y.float() * weights.flatten()[entries, None])
    return out.to(x.dtype)


# ---- Triton ---------------------------------------------------------------------------
@jit
def _route_kernel(LOGITS, WEIGHTS, IDS, COUNTS, E, stride_t, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
                  BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    logits = tl.load(LOGITS + t * stride_t + cols, mask=cols < E, other=-float("inf")).to(tl.float32)
    p = tl.exp(logits - tl.max(logits, axis=0))
    p = p / tl.sum(p, axis=0)
    ks = tl.arange(0, BLOCK_K)
    chosen_w = tl.zeros([BLOCK_K], dtype=tl.float32)
    chosen_id = tl.zeros([BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(p, axis=0)
        # the lowest index among equal maxima, as torch.topk picks on CPU
        idx = tl.min(tl.where(p == best, cols, BLOCK_E), axis=0)
        chosen_w = tl.where(ks == j, best, chosen_w)
        chosen_id = tl.where(ks == j, idx, chosen_id)
        p = tl.where(cols == idx, -1.0, p)
    kmask = ks < TOP_K
    tl.atomic_add(COUNTS + chosen_id, tl.full([BLOCK_K], 1, tl.int32), mask=kmask)
    if RENORMALIZE:
        chosen_w = chosen_w / tl.sum(chosen_w, axis=0)
    tl.store(WEIGHTS + t * TOP_K + ks, chosen_w, mask=kmask)
    tl.store(IDS + t * TOP_K + ks, chosen_id, mask=kmask)


@jit
def _align_kernel(COUNTS, STARTS, CURSOR, BLOCK_EXPERT, E, NUM_BLOCKS, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
                  BLOCK_B: tl.constexpr):
    e = tl.arange(0, BLOCK_E)
    emask = e < E
    counts = tl.load(COUNTS + e, mask=emask, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    tl.store(STARTS + e, starts, mask=emask)
    tl.store(CURSOR + e, starts, mask=emask)
    for b0 in range(0, NUM_BLOCKS, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        row = b * BLOCK_M
        # the expert holding `row` is the number of experts whose padded run ends at or before it
        before = (ends[None, :] <= row[:, None]) & emask[None, :]
        expert = tl.sum(before.to(tl.int32), axis=1)  # E: past the last real block
        tl.store(BLOCK_EXPERT + b, expert, mask=b < NUM_BLOCKS)


@jit
def _sort_kernel(IDS, CURSOR, SORTED, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < N
    ids = tl.load(IDS + i, mask=mask, other=0)
    pos = tl.atomic_add(CURSOR + ids, 1, mask=mask)
    tl.store(SORTED + pos, i, mask=mask)


@jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        # the Triton interpreter keeps bfloat16 as raw uint16 and multiplies the bit patterns in
        # tl.dot (triton 3.9); float32 operands give the products the tensor cores form
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@jit
def _expert_gemm_kernel(
    A, W, OUT, SORTED, BLOCK_EXPERT, STARTS, COUNTS, ROUTE_W,
    N, K, E,
    stride_am, stride_we, stride_wn, stride_om,
    A_ROWS_PER_ENTRY: tl.constexpr,  # k for the first GEMM (rows of x by token), 1 for the second
    GATED: tl.constexpr,  # first GEMM: gate tile at n, up tile at n + N, SiLU(gate) * up stored
    WEIGHTED: tl.constexpr,  # second GEMM: the result times the entry's routing weight
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    expert = tl.load(BLOCK_EXPERT + pid_m)
    if expert >= E:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    end = tl.load(STARTS + expert) + tl.load(COUNTS + expert)
    valid = rows < end
    entry = tl.load(SORTED + rows, mask=valid, other=0).to(tl.int64)
    a_rows = A + (entry // A_ROWS_PER_ENTRY)[:, None] * stride_am
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w_base = W + expert.to(tl.int64) * stride_we
    w_cols = w_base + cols.to(tl.int64)[None, :] * stride_wn  # [1, BLOCK_N], read as W^T tiles
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if GATED:
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(a_rows + ks[None, :], mask=valid[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_cols + ks[:, None], mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = _dot(a, w, acc, PRECISION, UPCAST)
        if GATED:
            w_up = tl.load(w_cols + N * stride_wn + ks[:, None], mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            acc_up = _dot(a, w_up, acc_up, PRECISION, UPCAST)
    # kept in float32 up to the one rounding of the store
    if GATED:
        acc = acc * tl.sigmoid(acc) * acc_up
    if WEIGHTED:
        acc = acc * tl.load(ROUTE_W + entry, mask=valid, other=0.0)[:, None]
    out = OUT + entry[:, None] * stride_om + cols[None, :]
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=valid[:, None] & col_mask[None, :])


# Block sizes by the rows an expert gets on average (entries / experts), measured on an H200 with
# bf16 Qwen3-30B-A3B (128 experts, k=8, H=2048, I=768) and Mixtral-8x7B (8 experts, k=2, H=4096,
# I=14336) experts, best of the sweep in benchmarks/moe.py:
# - 1 row (batch-1 decode): (16, 32, 128): 16 rows is tl.dot's least; narrow column tiles give
#   the most programs to stream the chosen experts' weights (Mixtral 350 us, 2.0 TB/s);
# - 16 rows (Qwen3 at batch 256): (32, 64, 128) 341 us, 3.5 TB/s of expert weights (84% of copy);
# - 64 rows (Mixtral at batch 256): (64, 64, 64) 813 us, 3.5 TB/s (82%); (16, 64, 128) took 1515 us;
# - 1024+ rows (16,384-token prefill): (128, 128, 64, 8 warps, 3 stages) 389 TFLOP/s (Qwen3) and
#   485 TFLOP/s (Mixtral), against 298-394 for the smaller tiles.
# (max rows per expert, BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
_CONFIGS = (
    (4, 16, 32, 128, 4, 4),
    (32, 32, 64, 128, 4, 4),
    (256, 64, 64, 64, 4, 4),
    (None, 128, 128, 64, 8, 3),
)


def _config(entries: int, experts: int) -> tuple[int, int, int, int, int]:
    rows_per_expert = cdiv(entries, experts)
    for limit, *config in _CONFIGS:
        if limit is None or rows_per_expert <= limit:
            return tuple(config)
    raise AssertionError("unreachable")


# the table's tiles are sized for 2-byte weights; a float32 model's tiles take twice the shared
# memory, which Hopper's 227 KiB per block cannot always hold at the table's pipeline depth
_SHARED_MEMORY = 200 * 1024


def _fit_stages(block_m: int, block_n: int, block_k: int, stages: int, element_size: int) -> int:
    # the gated GEMM buffers an A tile and two weight tiles in each of stages - 1 pipeline slots
    per_stage = (block_m * block_k + 2 * block_k * block_n) * element_size
    while stages > 2 and (stages - 1) * per_stage > _SHARED_MEMORY:
        stages -= 1
    return stages


def workspace_bytes(tokens: int, top_k: int, experts: int, hidden: int, inter: int, dtype: torch.dtype) -> int:
    """Bytes the launcher allocates for one call on `tokens` tokens (besides its output), which
    exist only during the call: the KV pool's sizing sets them aside."""
    entries = tokens * top_k
    block_m = _config(entries, experts)[0]
    num_blocks = cdiv(entries, block_m) + min(experts, entries)
    routing = entries * (4 + 4) + experts * 3 * 4 + num_blocks * (1 + block_m) * 4
    return routing + entries * (inter + hidden) * torch.empty((), dtype=dtype).element_size()


def fused_moe(x: torch.Tensor, router_logits: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
              top_k: int, renormalize: bool, block_config: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """The experts' weighted MLP output [T, H] for x [T, H]; see the module docstring.
    `block_config` (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) overrides the table, for sweeps."""
    t, h = x.shape
    e, two_i, h_w = w_gate_up.shape
    inter = two_i // 2
    assert h_w == h and w_down.shape == (e, h, inter), (x.shape, w_gate_up.shape, w_down.shape)
    assert router_logits.shape == (t, e) and 0 < top_k <= e, (router_logits.shape, top_k)
    if not use_triton(x):
        return fused_moe_ref(x, router_logits, w_gate_up, w_down, top_k, renormalize)
    x = x.contiguous()
    router_logits = router_logits.contiguous()
    assert w_gate_up.stride(-1) == 1 and w_down.stride(-1) == 1
    out = torch.empty_like(x)
    if t == 0:
        return out
    dev = x.device
    entries = t * top_k
    block_m, block_n, block_k, warps, stages = block_config or _config(entries, e)
    stages = _fit_stages(block_m, block_n, block_k, stages, x.element_size())
    num_blocks = cdiv(entries, block_m) + min(e, entries)
    weights = torch.empty(t, top_k, dtype=torch.float32, device=dev)
    ids = torch.empty(t, top_k, dtype=torch.int32, device=dev)
    counts = torch.zeros(e, dtype=torch.int32, device=dev)
    starts = torch.empty(e, dtype=torch.int32, device=dev)
    cursor = torch.empty(e, dtype=torch.int32, device=dev)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=dev)
    sorted_entries = torch.empty(num_blocks * block_m, dtype=torch.int32, device=dev)
    _route_kernel[(t,)](router_logits, weights, ids, counts, e, router_logits.stride(0), TOP_K=top_k,
                        RENORMALIZE=renormalize, BLOCK_E=next_pow2(e), BLOCK_K=next_pow2(top_k), num_warps=1)
    _align_kernel[(1,)](counts, starts, cursor, block_expert, e, num_blocks, BLOCK_M=block_m,
                        BLOCK_E=next_pow2(e), BLOCK_B=64, num_warps=4)
    _sort_kernel[(cdiv(entries, 256),)](ids, cursor, sorted_entries, entries, BLOCK=256, num_warps=4)
    # float32 models are the accuracy baseline (compared with HF in float32): no tf32
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    upcast = INTERPRETED and x.dtype == torch.bfloat16
    act = torch.empty(entries, inter, dtype=x.dtype, device=dev)
    _expert_gemm_kernel[(num_blocks, cdiv(inter, block_n))](
        x, w_gate_up, act, sorted_entries, block_expert, starts, counts, weights,
        inter, h, e, x.stride(0), w_gate_up.stride(0), w_gate_up.stride(1), act.stride(0),
        A_ROWS_PER_ENTRY=top_k, GATED=True, WEIGHTED=False, PRECISION=precision, UPCAST=upcast,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )
    per_entry = torch.empty(entries, h, dtype=x.dtype, device=dev)
    _expert_gemm_kernel[(num_blocks, cdiv(h, block_n))](
        act, w_down, per_entry, sorted_entries, block_expert, starts, counts, weights,
        h, inter, e, act.stride(0), w_down.stride(0), w_down.stride(1), per_entry.stride(0),
        A_ROWS_PER_ENTRY=1, GATED=False, WEIGHTED=True, PRECISION=precision, UPCAST=upcast,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )
    if top_k == 1:
        return per_entry
    torch.sum(per_entry.view(t, top_k, h), dim=1, out=out)
    return out
