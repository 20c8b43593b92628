"""Kernel timings on CUDA: each Triton kernel against its plain-torch reference and
against the device's ceilings measured in the same run.

    python benchmarks/kernel_bench.py [--sweep]

Memory-bound kernels report GB/s (bytes each must move at least once, listed per row)
over the device-to-device copy bandwidth (bytes read + written); prefill attention
reports TFLOP/s (4·H·D per visible query-key pair) over a bf16 8192³ matmul.
"""

from __future__ import annotations

import shlex
import sys

import torch
import triton.testing

from lightllm_plugin.kernels.decode_attention import decode_attention
from lightllm_plugin.kernels.kv_scatter import kv_scatter, kv_scatter_ref
from lightllm_plugin.kernels.prefill_attention import prefill_attention
from lightllm_plugin.kernels.rmsnorm import rmsnorm, rmsnorm_ref
from lightllm_plugin.kernels.rotary import rotary, rotary_ref
from lightllm_plugin.kernels.silu_and_mul import silu_and_mul, silu_and_mul_ref
from lightllm_plugin.kernels.token_attention import token_attention_ref

DEV = "cuda"
BF16 = torch.bfloat16


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")  # ms


def ceilings() -> tuple[float, float]:
    src = torch.randn(2**28, device=DEV, dtype=BF16)
    dst = torch.empty_like(src)
    copy_gbs = 2 * src.numel() * 2 / bench(lambda: dst.copy_(src)) / 1e6
    a = torch.randn(8192, 8192, device=DEV, dtype=BF16)
    b = torch.randn(8192, 8192, device=DEV, dtype=BF16)
    mm_tflops = 2 * 8192**3 / bench(lambda: a @ b) / 1e9
    return copy_gbs, mm_tflops


def attention_batch(seq_lens, q_lens, heads, kv_heads, d, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    total = sum(seq_lens)
    kv = torch.randn(total + 1, 2 * kv_heads, d, generator=g, device=DEV, dtype=BF16)
    perm = (torch.randperm(total, generator=g, device=DEV) + 1).to(torch.int32)
    table = torch.zeros(len(seq_lens), max(seq_lens), dtype=torch.int32, device=DEV)
    used = 0
    for row, n in enumerate(seq_lens):
        table[row, :n] = perm[used : used + n]
        used += n
    q = torch.randn(sum(q_lens), heads, d, generator=g, device=DEV, dtype=BF16)
    q_start = torch.tensor([0] + list(q_lens[:-1]), device=DEV).cumsum(0)
    meta = (table, torch.arange(len(seq_lens), device=DEV), torch.tensor(seq_lens, device=DEV), q_start,
            torch.tensor(q_lens, device=DEV))
    return q, kv, meta


def sweep(copy_gbs: float, mm_tflops: float) -> None:
    """Block shapes, warps and pipeline depth of the attention kernels, to pick defaults."""
    q, kv, meta = attention_batch([4096], [4096], 32, 8, 128, seed=1)
    flops = 4 * 32 * 128 * sum(i + 1 for i in range(4096))
    print("prefill B=1 q=4096 H=32/8 D=128: block_m block_n warps stages -> us TFLOP/s")
    for bm in (64, 128):
        for bn in (32, 64, 128):
            for warps in (4, 8):
                for stages in (1, 2, 3):
                    try:
                        t = bench(lambda: prefill_attention(q, kv, *meta, 0.088, block_m=bm, block_n=bn,
                                                            num_warps=warps, num_stages=stages))
                    except Exception as e:  # out of shared memory for the larger tiles
                        print(f"  {bm:4d} {bn:4d} {warps:2d} {stages:2d} failed: {type(e).__name__}")
                        continue
                    print(f"  {bm:4d} {bn:4d} {warps:2d} {stages:2d} -> {t * 1e3:8.1f} {flops / t / 1e9:6.1f}")
    for b, length in ((1, 1024), (1, 32768), (64, 1024)):
        q, kv, meta = attention_batch([length] * b, [1] * b, 32, 8, 128, seed=b)
        table, req, seq, qs, _ = meta
        kv_bytes = b * length * (2 * 8 * 128 * 2 + 4)
        print(f"decode B={b} L={length}: block_n warps stages splits -> us GB/s")
        for bn in (32, 64, 128):
            for warps in (2, 4, 8):
                for stages in (2, 3):
                    for splits in (None, 8, 32, 64):
                        t = bench(lambda: decode_attention(q, kv, table, req, seq, qs, 0.088, num_splits=splits,
                                                           block_n=bn, num_warps=warps, num_stages=stages))
                        print(f"  {bn:4d} {warps:2d} {stages:2d} {str(splits):>4} -> {t * 1e3:8.1f} {kv_bytes / t / 1e6:7.0f}")


def main() -> None:
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__)
    copy_gbs, mm_tflops = ceilings()
    if "--sweep" in sys.argv:
        sweep(copy_gbs, mm_tflops)
    rows = []

    def row(name, size, fn, ref, amount, unit):
        t, r = bench(fn), bench(ref) if ref is not None else float("nan")
        rate = amount / t / 1e6 if unit == "GB/s" else amount / t / 1e9
        ceil = copy_gbs if unit == "GB/s" else mm_tflops
        rows.append((name, size, t * 1e3, r * 1e3, rate, unit, 100 * rate / ceil))

    g = torch.Generator(device=DEV).manual_seed(0)
    for t, h in ((1, 4096), (256, 4096), (4096, 4096)):
        x, res = (torch.randn(t, h, generator=g, device=DEV, dtype=BF16) for _ in range(2))
        w = torch.randn(h, generator=g, device=DEV, dtype=BF16)
        row("rmsnorm+res", f"T={t} h={h}", lambda: rmsnorm(x, w, 1e-6, res), lambda: rmsnorm_ref(x, w, 1e-6, res),
            4 * x.numel() * 2, "GB/s")
    for t in (1, 4096):
        q = torch.randn(t, 32, 128, generator=g, device=DEV, dtype=BF16)
        k = torch.randn(t, 8, 128, generator=g, device=DEV, dtype=BF16)
        cos, sin = torch.rand(t, 64, device=DEV), torch.rand(t, 64, device=DEV)
        row("rotary", f"T={t} H=32/8 D=128", lambda: rotary(q, k, cos, sin), lambda: rotary_ref(q, k, cos, sin),
            2 * (q.numel() + k.numel()) * 2 + 2 * cos.numel() * 4, "GB/s")
    for t in (1, 256, 4096):
        gu = torch.randn(t, 2 * 14336, generator=g, device=DEV, dtype=BF16)
        row("silu_and_mul", f"T={t} I=14336", lambda: silu_and_mul(gu), lambda: silu_and_mul_ref(gu),
            3 * gu.numel() // 2 * 2, "GB/s")
    for t in (256, 4096):
        pool = torch.randn(200_001, 16, 128, device=DEV, dtype=BF16)
        k, v = (torch.randn(t, 8, 128, generator=g, device=DEV, dtype=BF16) for _ in range(2))
        slots = torch.randperm(200_000, generator=g, device=DEV)[:t] + 1
        row("kv_scatter", f"T={t} Hkv=8 D=128", lambda: kv_scatter(pool, k, v, slots),
            lambda: kv_scatter_ref(pool, k, v, slots), 4 * k.numel() * 2, "GB/s")
        del pool
    for b, length in ((1, 1024), (1, 32768), (64, 1024), (256, 512), (64, 4096)):
        q, kv, meta = attention_batch([length] * b, [1] * b, 32, 8, 128, seed=b)
        table, req, seq, qs, ql = meta
        kv_bytes = b * length * (2 * 8 * 128 * 2 + 4)
        ref = (lambda: token_attention_ref(q, kv, *meta, 0.088)) if b * length <= 65536 else None
        row("decode attn", f"B={b} L={length} H=32/8", lambda: decode_attention(q, kv, table, req, seq, qs, 0.088),
            ref, kv_bytes, "GB/s")
    for b, length, prefix in ((1, 4096, 0), (8, 1024, 0), (4, 1024, 3072)):
        q, kv, meta = attention_batch([length + prefix] * b, [length] * b, 32, 8, 128, seed=length)
        pairs = b * sum(prefix + i + 1 for i in range(length))
        row("prefill attn", f"B={b} q={length} prefix={prefix}", lambda: prefill_attention(q, kv, *meta, 0.088),
            lambda: token_attention_ref(q, kv, *meta, 0.088), 4 * 32 * 128 * pairs, "TFLOP/s")

    print(f"ceilings: copy {copy_gbs:.0f} GB/s (read+write), bf16 matmul {mm_tflops:.0f} TFLOP/s")
    print(f"{'kernel':<14} {'size':<28} {'triton us':>10} {'ref us':>10} {'rate':>9} {'unit':<8} {'% ceil':>6}")
    for name, size, t, r, rate, unit, pct in rows:
        print(f"{name:<14} {size:<28} {t:>10.1f} {r:>10.1f} {rate:>9.1f} {unit:<8} {pct:>6.1f}")


if __name__ == "__main__":
    main()
