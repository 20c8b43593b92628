"""Decode latency at batch 1 against the memory-bandwidth floor, and against HF transformers.

    python benchmarks/decode_latency.py --shape llama3-8b --prompt-len 128 --new-tokens 256 --hf-tokens 32

A random-weight model of the shape is built on the GPU in bf16 and handed to the engine in
memory (no checkpoint on disk). At batch 1 every decode step reads every weight once, so the
floor is weight bytes / device copy bandwidth, both measured in this run (the copy counts
bytes read plus bytes written). The engine's decode ms/token is timed over steps 2..N (the
first step is the prefill); HF's as (generate(1 + n) - generate(1)) / n on the same prompt.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import torch

from offline_throughput import SHAPES, copy_bandwidth, engine_from_hf, random_model


def graph_replay_breakdown(engine, replays: int = 50) -> tuple[float, list[tuple[str, int, float]]]:
    """GPU time of the batch-1 graph alone (no host work between steps), and where it goes:
    (kernel name, launches per step, us per step), longest first."""
    graphs = engine.runner.decode_graphs
    # a padding row: it writes only the scratch slot
    graphs.run([0], [0], [engine.runner.req_table.scratch_row], [engine.total_slots])
    graph = graphs.graphs[1]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    replay_ms = start.elapsed_time(end) / replays
    steps = 5
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            graph.replay()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", 0.0) or getattr(e, "cuda_time_total", 0.0)
        if us > 0:
            rows.append((e.key[:70], e.count // steps, us / steps))
    rows.sort(key=lambda r: -r[2])
    return replay_ms, rows


def steady_step_profile(engine, prompt, steps: int = 20) -> tuple[float, float, list[tuple[str, int, float]]]:
    """Wall ms per step, GPU-busy ms per step and the kernels and copies of `steps` steady batch-1
    engine steps (graph replay, input copies, sampling, read-back), longest first: the wall time
    the GPU is not busy is the host's."""
    from lightllm_plugin.sampling_params import SamplingParams

    engine.add_request(1, prompt, SamplingParams(temperature=0, max_new_tokens=steps + 8, ignore_eos=True))
    for _ in range(4):
        engine.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t) / steps * 1e3
    while engine.has_unfinished():
        engine.step()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", 0.0) or getattr(e, "cuda_time_total", 0.0)
        if us > 0:
            rows.append((e.key[:70], round(e.count / steps), us / steps))
    rows.sort(key=lambda r: -r[2])
    return wall_ms, sum(us for _, _, us in rows) / 1e3, rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--hf-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from lightllm_plugin.sampling_params import SamplingParams

    device = "cuda"
    bw = copy_bandwidth()
    hf_cfg = SHAPES[args.shape]()
    hf = random_model(hf_cfg, device, torch.bfloat16)
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    embed_bytes = hf.get_input_embeddings().weight.numel() * 2
    # the input embedding is only gathered (one row per token) unless it is tied to the head
    read_bytes = weight_bytes - (0 if hf_cfg.tie_word_embeddings else embed_bytes)
    floor_ms = weight_bytes / bw * 1e3
    floor_read_ms = read_bytes / bw * 1e3

    t0 = time.perf_counter()
    engine = engine_from_hf(hf, hf_cfg, max_len=args.prompt_len + args.new_tokens + 8,
                            max_input=args.prompt_len, max_total_tokens=16384)
    init_s = time.perf_counter() - t0
    prompt = torch.randint(0, hf_cfg.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()

    def engine_decode_ms(eager: bool) -> float:
        engine.config.enforce_eager = eager
        engine.add_request(0, prompt, SamplingParams(temperature=0, max_new_tokens=args.new_tokens, ignore_eos=True))
        engine.step()  # prefill and first token
        torch.cuda.synchronize()
        t = time.perf_counter()
        steps = 0
        while engine.has_unfinished():
            engine.step()
            steps += 1
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / steps * 1e3

    engine_decode_ms(False)  # warm-up
    ours = [engine_decode_ms(False) for _ in range(args.repeats)]
    eager = [engine_decode_ms(True) for _ in range(1)]
    engine.config.enforce_eager = False
    replay_ms, kernels = graph_replay_breakdown(engine)
    step_wall_ms, step_busy_ms, step_kernels = steady_step_profile(engine, prompt)
    del engine
    torch.cuda.empty_cache()

    hf.generation_config.pad_token_id = 0
    ids = torch.tensor([prompt], device=device)
    mask = torch.ones_like(ids)

    def hf_time(n: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    hf_ms = float("nan")
    if args.hf_tokens > 0:  # 0: no HF row
        hf_time(4)  # warm-up
        hf_ms = (hf_time(1 + args.hf_tokens) - hf_time(1)) / args.hf_tokens * 1e3

    ours_ms = statistics.median(ours)
    print(f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(f"device={torch.cuda.get_device_name()} torch={torch.__version__} shape={args.shape} bf16 batch=1 "
          f"prompt={args.prompt_len} new_tokens={args.new_tokens}")
    print(f"copy bandwidth (read+write) {bw / 1e9:.0f} GB/s; weights {weight_bytes / 1e9:.3f} GB "
          f"({read_bytes / 1e9:.3f} GB read per step without the input embedding); engine init {init_s:.1f} s")
    print(f"engine graphs ms/token runs: {', '.join(f'{x:.3f}' for x in ours)}; eager: {eager[0]:.3f}")
    print(f"| what | ms/token | x floor ({floor_ms:.2f} ms) | x floor without embedding ({floor_read_ms:.2f} ms) |")
    print("| --- | ---: | ---: | ---: |")
    for name, ms in (("engine (CUDA graphs)", ours_ms), ("engine (eager)", eager[0]), (f"HF generate ({args.hf_tokens} tok)", hf_ms)):
        print(f"| {name} | {ms:.3f} | {ms / floor_ms:.3f} | {ms / floor_read_ms:.3f} |")
    print(f"HF / engine = {hf_ms / ours_ms:.1f}x")
    print(f"batch-1 graph replayed back to back: {replay_ms:.3f} ms/step on the GPU "
          f"({replay_ms / floor_read_ms:.3f}x the floor without embedding); host and sampling between steps: "
          f"{ours_ms - replay_ms:.3f} ms")
    total_us = sum(us for _, _, us in kernels)
    print(f"kernels of one replay (profiler, {total_us / 1e3:.3f} ms busy):")
    for name, count, us in kernels[:14]:
        print(f"  {us:8.1f} us  x{count:<4d} {name}")
    in_graph = {name for name, _, _ in kernels}
    print(f"steady engine steps under the profiler: {step_wall_ms:.3f} ms wall/step, GPU busy {step_busy_ms:.3f} ms/step "
          f"(idle {step_wall_ms - step_busy_ms:.3f} ms); outside the graph's kernels:")
    for name, count, us in [r for r in step_kernels if r[0] not in in_graph][:10]:
        print(f"  {us:8.1f} us  x{count:<4d} {name}")
    # the replay above attends to one padding token; the steady steps to the real context
    print(f"GPU idle between steps: {ours_ms - step_busy_ms:.3f} ms/token (engine ms/token {ours_ms:.3f} less the "
          f"{step_busy_ms:.3f} ms of kernels and copies of a steady step at context {args.prompt_len}+)")


if __name__ == "__main__":
    main()
