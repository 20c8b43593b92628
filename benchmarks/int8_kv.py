"""Int8 KV cache against bf16 KV on one model, measured side by side in one run.

    python benchmarks/int8_kv.py --shape llama3-8b

A random-weight model of the shape is built on the GPU in bf16 and handed to each engine in
memory. Three measurements, each once with `kv_cache_dtype="auto"` (bf16) and once with "int8":

1. slots: the KV pool the engine sizes at `--mem-fraction` (default 0.9) of the free memory.
2. decode at batch `--batch` (64): that many requests of `--prompt-len` tokens decode
   `--decode-tokens` tokens each; tok/s over the decode steps only (the steps after every
   prompt is in). The floor of a step is (weight bytes + the K/V bytes the batch reads) over the
   device copy bandwidth measured in this run; both dtypes are printed against their own floor.
3. overflow: at the small `--overflow-mem-fraction`, `--overflow-requests` requests of
   prompt + output tokens need several times bf16's pool. The memory-aware scheduler admits
   only what fits, so the int8 pool runs more requests at once; tok/s over the whole workload.
"""

from __future__ import annotations

import argparse
import gc
import random
import shlex
import sys
import time

import torch

from offline_throughput import SHAPES, copy_bandwidth, engine_from_hf, random_model


def free_engine() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def kv_bytes_per_token(engine) -> int:
    """Bytes of K/V (values plus scales) one token occupies in this engine's pool."""
    from lightllm_plugin.engine import memory

    cfg = engine.runner.model_cfg
    return memory.kv_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, engine.runner.kv_dtype)


def run_to_end(engine, prompts, outputs) -> tuple[int, int]:
    """(tokens produced, most requests running at once) of the requests run to their lengths."""
    from lightllm_plugin.sampling_params import SamplingParams

    engine.flush_cache()  # measured without the prefix cache's help from an earlier run
    for i, (p, o) in enumerate(zip(prompts, outputs)):
        engine.add_request(i, p, SamplingParams(temperature=0, max_new_tokens=o, ignore_eos=True))
    produced = peak = 0
    while engine.has_unfinished():
        produced += len(engine.step())
        peak = max(peak, engine.num_running)
    return produced, peak


def decode_at_batch(engine, prompts, new_tokens: int) -> tuple[float, int, int]:
    """(seconds, tokens, steps) of the decode steps after every prompt of the batch is in."""
    from lightllm_plugin.sampling_params import SamplingParams

    engine.flush_cache()  # measured without the prefix cache's help from an earlier run
    for i, p in enumerate(prompts):
        engine.add_request(10_000 + i, p, SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True))
    produced = 0
    while engine.num_waiting or produced < len(prompts):  # prefill (one token per request)
        produced += len(engine.step())
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    decoded = steps = 0
    while engine.has_unfinished():
        decoded += len(engine.step())
        steps += 1
    torch.cuda.synchronize()
    return time.perf_counter() - t0, decoded, steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--mem-fraction", type=float, default=0.9)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--overflow-mem-fraction", type=float, default=0.05)
    ap.add_argument("--overflow-requests", type=int, default=192)
    ap.add_argument("--overflow-prompt-len", type=int, default=512)
    ap.add_argument("--overflow-output-len", type=int, default=512)
    ap.add_argument("--skip-overflow", action="store_true", help="measure the slots and the batch decode only")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("int8_kv.py measures GPU memory and speed: it needs CUDA")

    hf_cfg = SHAPES[args.shape]()
    rng = random.Random(0)
    batch_prompts = [[rng.randrange(hf_cfg.vocab_size) for _ in range(args.prompt_len)] for _ in range(args.batch)]
    overflow_prompts = [[rng.randrange(hf_cfg.vocab_size) for _ in range(args.overflow_prompt_len)]
                        for _ in range(args.overflow_requests)]
    overflow_outputs = [args.overflow_output_len] * args.overflow_requests
    bw = copy_bandwidth()
    hf = random_model(hf_cfg, "cuda", torch.bfloat16)
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    # the model's whole context: the engine caps its pool at running_max_req_size x max_req_total_len,
    # and the slot count at mem_fraction must not meet that cap
    max_len = hf_cfg.max_position_embeddings
    max_input = max_len // 2
    assert max(args.prompt_len + args.decode_tokens, args.overflow_prompt_len + args.overflow_output_len) <= max_len

    results: dict[str, dict] = {}
    for kv in ("auto", "int8"):
        r = results.setdefault(kv, {})
        engine = engine_from_hf(hf, hf_cfg, max_len, max_input, mem_fraction=args.mem_fraction, kv_cache_dtype=kv,
                                running_max_req_size=max(args.batch, 256), batch_max_tokens=8192)
        r["slots"] = engine.total_slots
        r["token_bytes"] = kv_bytes_per_token(engine)
        run_to_end(engine, batch_prompts[:2], [4, 4])  # warm-up
        seconds, decoded, steps = decode_at_batch(engine, batch_prompts, args.decode_tokens)
        # each step reads every weight once and the batch's K/V so far (mean context over the steps)
        mean_ctx = args.prompt_len + args.decode_tokens / 2
        step_floor = (weight_bytes + args.batch * mean_ctx * r["token_bytes"]) / bw
        r["decode_tps"] = decoded / seconds
        r["decode_floor_ratio"] = (seconds / steps) / step_floor
        del engine
        free_engine()
        if args.skip_overflow:
            continue

        engine = engine_from_hf(hf, hf_cfg, max_len, max_input, mem_fraction=args.overflow_mem_fraction,
                                kv_cache_dtype=kv, running_max_req_size=256, batch_max_tokens=8192)
        r["overflow_slots"] = engine.total_slots
        run_to_end(engine, batch_prompts[:2], [4, 4])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        produced, peak = run_to_end(engine, overflow_prompts, overflow_outputs)
        torch.cuda.synchronize()
        r["overflow_s"] = time.perf_counter() - t0
        assert produced == sum(overflow_outputs), (produced, sum(overflow_outputs))
        r["overflow_tps"] = produced / r["overflow_s"]
        r["overflow_peak_running"] = peak
        del engine
        free_engine()

    b, q = results["auto"], results["int8"]
    need = args.overflow_requests * (args.overflow_prompt_len + args.overflow_output_len)
    print(f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth {bw / 1e9:.0f} GB/s, "
          f"weights {weight_bytes / 2**30:.2f} GiB")
    print(f"overflow workload: {args.overflow_requests} requests x ({args.overflow_prompt_len} + "
          f"{args.overflow_output_len}) tokens = {need} tokens of KV if all ran at once")
    print("| measure | bf16 KV | int8 KV | int8 / bf16 |")
    print("| --- | --- | --- | --- |")
    rows = [
        ("KV bytes per token (values + scales)", b["token_bytes"], q["token_bytes"], "{:.0f}"),
        (f"slots at mem_fraction {args.mem_fraction}", b["slots"], q["slots"], "{:d}"),
        (f"decode tok/s at batch {args.batch} (ctx {args.prompt_len}..{args.prompt_len + args.decode_tokens})",
         b["decode_tps"], q["decode_tps"], "{:.0f}"),
        ("decode step time / bandwidth floor", b["decode_floor_ratio"], q["decode_floor_ratio"], "{:.3f}"),
    ]
    rows += [] if args.skip_overflow else [
        (f"slots at mem_fraction {args.overflow_mem_fraction}", b["overflow_slots"], q["overflow_slots"], "{:d}"),
        ("overflow: most requests running at once", b["overflow_peak_running"], q["overflow_peak_running"], "{:d}"),
        ("overflow: seconds", b["overflow_s"], q["overflow_s"], "{:.2f}"),
        ("overflow: tok/s", b["overflow_tps"], q["overflow_tps"], "{:.0f}"),
    ]
    for name, x, y, fmt in rows:
        print(f"| {name} | {fmt.format(x)} | {fmt.format(y)} | {y / x:.3f} |")


if __name__ == "__main__":
    main()
