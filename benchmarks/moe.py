"""Mixture-of-experts on one GPU: the fused MoE kernel and the engine against the ceilings measured
in the same run, and offline throughput against HF transformers.

    python benchmarks/moe.py --shapes qwen3-30b-a3b,mixtral-8x7b --offline-layers 8 --hf-requests 8

Random bf16 weights of the real shapes, built on the GPU from transformers configs and handed to
the engine in memory. For each shape:
- batch-1 decode ms/token (CUDA graphs) against the floor: the bytes a step must read (the chosen
  experts, the router, attention, the context's K/V, the lm_head, one embedding row) over the
  device copy bandwidth of this run (bytes read plus written, as benchmarks/offline_throughput.py);
- the kernel at one token over every layer's experts in one CUDA graph (launch overhead out, no
  layer's weights left in L2), for each config of a small sweep: bytes/s of the k chosen experts;
- the kernel alone (routing, sorting, both grouped GEMMs, the sum) on layer 0's experts, L2 flushed
  between calls, for each block config of a small sweep: at 256 tokens the bytes/s of the expert
  weights it reads (each distinct chosen expert once) against the copy bandwidth; at a 16,384-token
  prefill batch its TFLOP/s (6 * tokens * k * I * H) against a bf16 8192^3 matmul.
Offline throughput: the offline benchmark's workload (U[100,1024] prompt and output lengths,
seed 0) through the engine, and HF generate on the first --hf-requests of it, on the first shape
cut to --offline-layers layers so that HF's per-expert loop finishes in the run.
"""

from __future__ import annotations

import argparse
import gc
import random
import shlex
import statistics
import sys
import time
import traceback

import torch
import transformers
from decode_latency import graph_replay_breakdown
from offline_throughput import copy_bandwidth, engine_from_hf, matmul_flops, random_model

SHAPES = {
    "qwen3-30b-a3b": lambda layers=48: transformers.Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, max_position_embeddings=40960, num_experts=128, num_experts_per_tok=8,
        moe_intermediate_size=768, norm_topk_prob=True, rope_theta=1e6, tie_word_embeddings=False),
    "mixtral-8x7b": lambda layers=32: transformers.MixtralConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=32768, num_local_experts=8, num_experts_per_tok=2,
        rope_theta=1e6),
}

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) tried at each token count
SWEEP = {
    256: [(16, 64, 128, 4, 4), (32, 64, 128, 4, 4), (64, 64, 64, 4, 4)],
    16384: [(64, 64, 64, 4, 4), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3), (128, 128, 64, 8, 3)],
}


DECODE_SWEEP = [(16, 32, 128, 4, 4), (16, 16, 128, 4, 4), (16, 64, 128, 4, 4), (16, 32, 256, 4, 3)]


def decode_kernel_rows(shape: str, model, bw: float) -> list[str]:
    """The kernel at one token over every layer's experts in one CUDA graph, as a decode step runs
    it (no launch overhead, no layer's weights still in L2 when it comes round again): us per layer
    and the bytes/s of the k chosen experts' weights, for each config of a small sweep."""
    from lightllm_plugin.kernels.fused_moe import _config, fused_moe

    moes = [layer.moe for layer in model.layers if layer.moe is not None]
    experts, two_i, hidden = moes[0].w_gate_up.shape
    k = moes[0].top_k
    expert_bytes = 3 * (two_i // 2) * hidden * moes[0].w_gate_up.element_size()
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, hidden, generator=g, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(len(moes), 1, experts, generator=g, device="cuda", dtype=torch.bfloat16)
    table = _config(k, experts)
    timings = {}
    for config in sorted(set(DECODE_SWEEP) | {table}):
        def step():
            for i, moe in enumerate(moes):
                fused_moe(x, logits[i], moe.w_gate_up, moe.w_down, k, True, block_config=config)
        step()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        timings[config] = bench_ms(graph.replay) / len(moes)
        del graph
    for config, ms in sorted(timings.items(), key=lambda kv: kv[1]):
        print(f"  {shape} tokens=1 config={config}{' (table)' if config == table else ''}, all layers in a graph: "
              f"{ms * 1e3:.1f} us/layer, {k * expert_bytes / (ms * 1e-3) / 1e9:.0f} GB/s")
    best = min(timings, key=timings.get)
    gbs = k * expert_bytes / (timings[best] * 1e-3)
    return [f"| {shape} kernel, batch 1 decode {best}, all {len(moes)} layers in a graph | "
            f"{timings[best] * 1e3:.1f} us/layer, {gbs / 1e9:.0f} GB/s | {gbs / bw:.1%} of copy {bw / 1e9:.0f} GB/s | "
            f"table {table}: {timings[table] * 1e3:.1f} us |"]


def bench_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=60, return_mode="median")


def kernel_rows(shape: str, moe, bw: float, mm: float) -> list[str]:
    from lightllm_plugin.kernels.fused_moe import _config, fused_moe, moe_route_ref

    w1, w2 = moe.w_gate_up, moe.w_down
    experts, two_i, hidden = w1.shape
    inter, k = two_i // 2, moe.top_k
    expert_bytes = 3 * inter * hidden * w1.element_size()
    rows = []
    for tokens, configs in SWEEP.items():
        g = torch.Generator(device="cuda").manual_seed(tokens)
        x = torch.randn(tokens, hidden, generator=g, device="cuda", dtype=torch.bfloat16)
        logits = torch.randn(tokens, experts, generator=g, device="cuda", dtype=torch.bfloat16)
        distinct = int(moe_route_ref(logits, k, True)[1].unique().numel())
        table = _config(tokens * k, experts)
        timings = {}
        for config in sorted(set(configs) | {table}):
            try:
                timings[config] = bench_ms(lambda: fused_moe(x, logits, w1, w2, k, True, block_config=config))
            except Exception as exc:  # a config the shared memory cannot hold
                print(f"  {shape} tokens={tokens} config={config}: {type(exc).__name__}: {str(exc)[:120]}")
        for config, ms in sorted(timings.items(), key=lambda kv: kv[1]):
            gbs = distinct * expert_bytes / (ms * 1e-3)
            tflops = 6 * tokens * k * inter * hidden / (ms * 1e-3)
            print(f"  {shape} tokens={tokens} config={config}{' (table)' if config == table else ''}: "
                  f"{ms * 1e3:.1f} us, experts read {distinct} = {distinct * expert_bytes / 1e6:.1f} MB -> "
                  f"{gbs / 1e9:.0f} GB/s, {tflops / 1e12:.1f} TFLOP/s")
        best = min(timings, key=timings.get)
        ms = timings[best]
        if tokens == 16384:
            tflops = 6 * tokens * k * inter * hidden / (ms * 1e-3)
            rows.append(f"| {shape} kernel, {tokens}-token prefill batch {best} | {ms:.2f} ms, {tflops / 1e12:.0f} "
                        f"TFLOP/s | {tflops / mm:.1%} of bf16 matmul {mm / 1e12:.0f} TFLOP/s | table {table}: "
                        f"{timings.get(table, float('nan')):.2f} ms |")
        else:
            gbs = distinct * expert_bytes / (ms * 1e-3)
            rows.append(f"| {shape} kernel, batch {tokens} decode {best} ({distinct} experts) | {ms * 1e3:.1f} us, "
                        f"{gbs / 1e9:.0f} GB/s | {gbs / bw:.1%} of copy {bw / 1e9:.0f} GB/s | table {table}: "
                        f"{timings.get(table, float('nan')) * 1e3:.1f} us |")
    return rows


def decode_floor_bytes(hf_cfg, context: float) -> float:
    h, v, layers = hf_cfg.hidden_size, hf_cfg.vocab_size, hf_cfg.num_hidden_layers
    heads, kv = hf_cfg.num_attention_heads, hf_cfg.num_key_value_heads
    d = getattr(hf_cfg, "head_dim", None) or h // heads
    experts = getattr(hf_cfg, "num_experts", None) or hf_cfg.num_local_experts
    inter = getattr(hf_cfg, "moe_intermediate_size", None) or hf_cfg.intermediate_size
    k = hf_cfg.num_experts_per_tok
    attention = h * (heads + 2 * kv) * d + heads * d * h
    per_layer = attention + experts * h + k * 3 * inter * h + 2 * h + 2 * d
    kv_bytes = layers * context * 2 * kv * d
    return 2 * (layers * per_layer + v * h + h + h + kv_bytes)


def decode_row(shape: str, engine, hf_cfg, bw: float, prompt_len: int = 128, new_tokens: int = 64) -> str:
    from lightllm_plugin.sampling_params import SamplingParams

    prompt = torch.randint(0, hf_cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()

    def run() -> float:
        engine.add_request(0, prompt, SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True))
        engine.step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        steps = 0
        while engine.has_unfinished():
            engine.step()
            steps += 1
        torch.cuda.synchronize()
        engine.flush_cache()
        return (time.perf_counter() - t) / steps * 1e3

    run()
    ms = statistics.median(run() for _ in range(3))
    floor_ms = decode_floor_bytes(hf_cfg, prompt_len + new_tokens / 2) / bw * 1e3
    return (f"| {shape} batch-1 decode, CUDA graphs | {ms:.2f} ms/token | floor {floor_ms:.2f} ms "
            f"({decode_floor_bytes(hf_cfg, prompt_len + new_tokens / 2) / 1e9:.2f} GB read) | {ms / floor_ms:.2f}x floor |")


def offline_rows(shape: str, layers: int, requests: int, hf_requests: int) -> list[str]:
    from lightllm_plugin.sampling_params import SamplingParams

    hf_cfg = SHAPES[shape](layers)
    rng = random.Random(0)
    lengths = [(rng.randint(100, 1024), rng.randint(100, 1024)) for _ in range(requests)]
    prompts = [[rng.randrange(hf_cfg.vocab_size) for _ in range(p)] for p, _ in lengths]
    hf = random_model(hf_cfg, "cuda", torch.bfloat16)
    engine = engine_from_hf(hf, hf_cfg, 2056, 1024, batch_max_tokens=8192)
    for warm in (True, False):
        reqs = prompts[:2] if warm else prompts
        for i, (p, (_, o)) in enumerate(zip(reqs, lengths)):
            engine.add_request(i, p, SamplingParams(temperature=0, max_new_tokens=o, ignore_eos=True))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        produced = 0
        while engine.has_unfinished():
            produced += len(engine.step())
        torch.cuda.synchronize()
        ours_s = time.perf_counter() - t0
        engine.flush_cache()
    total_out = sum(o for _, o in lengths)
    assert produced == total_out, (produced, total_out)
    ours_tps = total_out / ours_s
    slots = engine.total_slots
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    hf.generation_config.pad_token_id = 0
    chunk = prompts[:hf_requests]
    outs = [o for _, o in lengths[:hf_requests]]
    width = max(len(p) for p in chunk)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device="cuda")
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device="cuda")
    with torch.no_grad():
        hf.generate(ids[:1, -8:], attention_mask=mask[:1, -8:], do_sample=False, max_new_tokens=2)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max(outs), min_new_tokens=max(outs))
        torch.cuda.synchronize()
    hf_s = time.perf_counter() - t0
    hf_tps = sum(outs) / hf_s
    del hf
    gc.collect()
    torch.cuda.empty_cache()
    return [
        f"| offline {shape} cut to {layers} layers, {requests} requests U[100,1024] ({slots} KV slots) | "
        f"{ours_tps:.0f} out tok/s | {ours_s:.1f} s | {ours_tps / hf_tps:.1f}x HF |",
        f"| HF generate, first {hf_requests} requests in one batch | {hf_tps:.0f} out tok/s | {hf_s:.1f} s | 1.0x |",
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="qwen3-30b-a3b,mixtral-8x7b")
    ap.add_argument("--offline-layers", type=int, default=8)
    ap.add_argument("--offline-requests", type=int, default=256)
    ap.add_argument("--hf-requests", type=int, default=8)
    ap.add_argument("--skip-offline", action="store_true")
    ap.add_argument("--decode-only", action="store_true", help="batch-1 rows only (no 256/16384-token sweeps)")
    ap.add_argument("--breakdown", action="store_true", help="profile the batch-1 graph's kernels")
    args = ap.parse_args()
    print(f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(f"device={torch.cuda.get_device_name()} torch={torch.__version__} transformers={transformers.__version__}")
    bw, mm = copy_bandwidth(), matmul_flops()
    print(f"ceilings: copy {bw / 1e9:.0f} GB/s (read+write), bf16 matmul {mm / 1e12:.0f} TFLOP/s", flush=True)
    rows = []
    for shape in args.shapes.split(","):
        try:
            hf_cfg = SHAPES[shape]()
            t0 = time.perf_counter()
            hf = random_model(hf_cfg, "cuda", torch.bfloat16)
            params = sum(p.numel() for p in hf.parameters())
            engine = engine_from_hf(hf, hf_cfg, 256, 128, max_total_tokens=4096, running_max_req_size=1,
                                    batch_max_tokens=256)
            print(f"{shape}: {params / 1e9:.1f}B parameters ({params * 2 / 2**30:.1f} GiB bf16), built and loaded in "
                  f"{time.perf_counter() - t0:.1f} s; GPU memory {torch.cuda.memory_allocated() / 2**30:.1f} GiB",
                  flush=True)
            rows.append(decode_row(shape, engine, hf_cfg, bw))
            print(rows[-1], flush=True)
            if args.breakdown:
                replay_ms, kernels = graph_replay_breakdown(engine)
                print(f"  {shape} batch-1 graph replay {replay_ms:.2f} ms; kernels per step (launches, us):")
                for name, count, us in kernels[:14]:
                    print(f"    {us:8.1f} us  x{count:<4d} {name}")
            rows += decode_kernel_rows(shape, engine.runner.model, bw)
            if not args.decode_only:
                rows += kernel_rows(shape, engine.runner.model.layers[0].moe, bw, mm)
            print("\n".join(rows[-3:]), flush=True)
        except Exception:
            traceback.print_exc()
            rows.append(f"| {shape} | failed: see the traceback above | | |")
        engine = hf = None  # the next shape needs the memory, also after a failure
        gc.collect()
        torch.cuda.empty_cache()
    if not args.skip_offline:
        try:
            rows += offline_rows(args.shapes.split(",")[0], args.offline_layers, args.offline_requests,
                                 args.hf_requests)
        except Exception:
            traceback.print_exc()
            rows.append("| offline | failed: see the traceback above | | |")
    print("| what | measured | against | note |")
    print("| --- | ---: | ---: | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
