"""Offline throughput: the engine against Hugging Face transformers' batched `generate`,
on a random-weight model of a real shape, measured side by side in one run.

    python benchmarks/offline_throughput.py --shape llama3-8b [--num-requests 256] \
        [--min-len 100 --max-len 1024] [--hf-batch 16 --hf-requests 16] [--device cuda]

Prompt and output lengths are uniform in [min-len, max-len] (seed 0; the defaults are the
GPU target's workload), outputs run to their length (ignore_eos). On CUDA the model is built there in bf16
and handed to the engine in memory; on CPU it goes through a safetensors folder. HF's batched
generate may be timed on the first --hf-requests requests only (it pads every batch to its
longest prompt and output); tok/s counts each request's own output tokens either way.

The floor is the larger of two times, each over a ceiling measured in this run: the matmul and
attention FLOPs of the workload over a bf16 8192^3 matmul's rate, and the bytes that must move
(the weights once per decode step, over the fewest steps the engine's KV pool allows: at least
max(output length), and at least the tokens held summed over every request's steps over the pool
size; every decode token's context K/V; every new token's K/V written) over the device copy
bandwidth. vLLM's benchmark_throughput default workload is `--num-requests 1000 --min-len 256
--max-len 256`.
"""

from __future__ import annotations

import argparse
import gc
import random
import shlex
import sys
import statistics
import tempfile
import time

import torch
import transformers

SHAPES = {
    # CPU smoke runs only: a real architecture at toy size
    "tiny": lambda: transformers.LlamaConfig(
        vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
    ),
    "smollm-135m": lambda: transformers.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True,
    ),
    "qwen3-0.6b": lambda: transformers.Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        tie_word_embeddings=True,
    ),
    "llama3-8b": lambda: transformers.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
    ),
}


def random_model(hf_cfg, device: str, dtype: torch.dtype):
    """A transformers model of the config (one of SHAPES) with random weights (seed 0), built on device."""
    torch.manual_seed(0)
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype).eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _median_ms(fn, repeats: int = 10) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src))
    del src, dst
    return 2 * nbytes / (ms * 1e-3)


def matmul_flops(n: int = 8192) -> float:
    """FLOP/s of a bf16 n^3 matmul on random inputs."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    ms = _median_ms(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3)


def engine_from_hf(hf, hf_cfg, max_len: int, max_input: int, max_total_tokens: int | None = None, **kw):
    """An EngineCore over the weights of a transformers model that is already on the GPU."""
    from lightllm_plugin.config import EngineConfig
    from lightllm_plugin.engine.core import EngineCore
    from lightllm_plugin.models.loader import InMemoryCheckpoint

    config = hf_cfg.to_dict()
    config["architectures"] = [type(hf).__name__]
    cfg = EngineConfig(device="cuda", data_type="bfloat16", max_req_total_len=max_len, max_req_input_len=max_input,
                       max_total_token_num=max_total_tokens, **kw)
    checkpoint = InMemoryCheckpoint(config, hf.state_dict().items())
    return EngineCore(cfg, progress=False, with_tokenizer=False, checkpoint=checkpoint)


def min_decode_steps(lengths, slots: int | None) -> int:
    """Fewest decode steps the workload can take: every request's outputs come one a step, and
    a step holds at most `slots` tokens of K/V, while request i holds p_i + k of them at its k-th
    output step, so the steps are at least the sum of those holdings over the pool size."""
    steps = max(o for _, o in lengths)
    if slots:
        held = sum(p * o + o * (o + 1) // 2 for p, o in lengths)
        steps = max(steps, -(-held // slots))
    return steps


def workload_floor(hf_cfg, hf, lengths, flops_rate: float, bw: float, slots: int | None = None) -> tuple[float, float]:
    """(seconds of arithmetic, seconds of memory traffic) the workload cannot go below; the
    weights are read once a decode step, over the steps a pool of `slots` tokens allows."""
    h, v, layers = hf_cfg.hidden_size, hf_cfg.vocab_size, hf_cfg.num_hidden_layers
    heads = hf_cfg.num_attention_heads
    head_dim = getattr(hf_cfg, "head_dim", None) or h // heads
    kv_heads = hf_cfg.num_key_value_heads
    layer_params = sum(p.numel() for p in hf.model.layers.parameters())
    head_bytes = v * h * 2
    kv_token_bytes = layers * 2 * kv_heads * head_dim * 2
    flops = 0.0
    kv_read_tokens = 0
    new_tokens = 0
    for p, o in lengths:
        processed = p + o - 1  # the prompt, then each output token but the last is fed back
        new_tokens += processed
        flops += 2 * layer_params * processed + 2 * h * v * o
        # token at position j attends to j + 1 keys: QK and PV, 2 FLOPs per multiply-add each
        ctx_sum = processed * (processed + 1) // 2
        flops += 4 * layers * heads * head_dim * ctx_sum
        kv_read_tokens += sum(range(p + 1, p + o))  # decode token at position j reads j + 1
    steps = min_decode_steps(lengths, slots)
    bytes_moved = steps * (layer_params * 2 + head_bytes) + (kv_read_tokens + new_tokens) * kv_token_bytes
    return flops / flops_rate, bytes_moved / bw


def _config_field(item: str) -> tuple[str, object]:
    name, _, text = item.partition("=")
    value: object = text
    if text.lower() in ("true", "false"):
        value = text.lower() == "true"
    elif text.lstrip("-").isdigit():
        value = int(text)
    return name, value


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-0.6b")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--min-len", type=int, default=100)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--batch-max-tokens", type=int, default=8192)
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--hf-requests", type=int, default=None, help="time HF on the first K requests (default all)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--engine", action="append", default=[], metavar="FIELD=VALUE",
                    help="an EngineConfig field for our engine, e.g. chunked_prefill_size=2048 (repeatable)")
    args = ap.parse_args()
    engine_kw = dict(_config_field(item) for item in args.engine)

    from lightllm_plugin.config import EngineConfig
    from lightllm_plugin.engine.core import EngineCore
    from lightllm_plugin.sampling_params import SamplingParams

    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    hf_cfg = SHAPES[args.shape]()
    rng = random.Random(0)
    lengths = [(rng.randint(args.min_len, args.max_len), rng.randint(args.min_len, args.max_len)) for _ in range(args.num_requests)]
    prompts = [[rng.randrange(hf_cfg.vocab_size) for _ in range(p)] for p, _ in lengths]
    total_out = sum(o for _, o in lengths)
    bw = copy_bandwidth() if cuda else float("nan")
    mm = matmul_flops() if cuda else float("nan")
    max_len = 2 * args.max_len + 8
    batch_max_tokens = max(args.batch_max_tokens, args.max_len)

    with tempfile.TemporaryDirectory() as tmp:
        hf = random_model(hf_cfg, args.device, dtype)
        t0 = time.perf_counter()
        if cuda:
            engine = engine_from_hf(hf, hf_cfg, max_len, args.max_len, batch_max_tokens=batch_max_tokens, **engine_kw)
        else:
            hf.save_pretrained(tmp)
            cfg = EngineConfig(model_dir=tmp, device=args.device, data_type="float32", max_req_total_len=max_len,
                               max_req_input_len=args.max_len, batch_max_tokens=batch_max_tokens, **engine_kw)
            engine = EngineCore(cfg, progress=False, with_tokenizer=False)
        init_s = time.perf_counter() - t0
        for warm in (True, False):
            reqs = prompts[:2] if warm else prompts
            for i, (p, (_, o)) in enumerate(zip(reqs, lengths)):
                engine.add_request(i, p, SamplingParams(temperature=0, max_new_tokens=o, ignore_eos=True))
            graphs = engine.runner.decode_graphs
            replays0 = graphs.replays if graphs is not None else 0
            sync(args.device)
            t0 = time.perf_counter()
            produced = steps = peak = 0
            while engine.has_unfinished():
                produced += len(engine.step())
                steps += 1
                peak = max(peak, engine.num_running)
            sync(args.device)
            ours_s = time.perf_counter() - t0
            engine.flush_cache()  # the timed run must not read the warm-up's prompts from the cache
        assert produced == total_out, (produced, total_out)
        ours_tps = total_out / ours_s
        slots = engine.total_slots
        max_running = engine.config.running_max_req_size
        replays = graphs.replays - replays0 if graphs is not None else 0
        del engine, graphs  # the graphs hold the KV pool
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

        hf_tps, hf_s = float("nan"), float("nan")
        k = min(args.hf_requests or len(prompts), len(prompts))
        hf_out = sum(o for _, o in lengths[:k])
        if not args.skip_hf:
            hf.generation_config.pad_token_id = 0
            sync(args.device)
            t0 = time.perf_counter()
            for start in range(0, k, args.hf_batch):
                chunk = prompts[start : min(start + args.hf_batch, k)]
                outs = [o for _, o in lengths[start : start + len(chunk)]]
                width = max(len(p) for p in chunk)
                ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=args.device)
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=args.device)
                with torch.no_grad():
                    hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max(outs), min_new_tokens=max(outs))
            sync(args.device)
            hf_s = time.perf_counter() - t0
            hf_tps = hf_out / hf_s

    compute_s, memory_s = workload_floor(hf_cfg, hf, lengths, mm, bw, slots) if cuda else (float("nan"), float("nan"))
    floor_s = max(compute_s, memory_s)
    dev = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(f"device={dev} dtype={dtype} shape={args.shape} requests={args.num_requests} "
          f"lengths=U[{args.min_len},{args.max_len}] seed 0 prompt_tokens={sum(p for p, _ in lengths)} output_tokens={total_out}")
    print(f"ceilings: copy {bw / 1e9:.0f} GB/s (read+write), bf16 matmul {mm / 1e12:.0f} TFLOP/s; "
          f"floor: compute {compute_s:.2f} s, memory {memory_s:.2f} s "
          f"(weights read over {min_decode_steps(lengths, slots)} steps, what {slots} KV slots allow)")
    print(f"engine: init {init_s:.1f} s, {slots} KV slots, {steps} steps ({replays} graph replays), "
          f"batch_max_tokens={batch_max_tokens}, running_max_req_size={max_running}, most running at once {peak}")
    hf_note = f"HF on the first {k} of {len(prompts)} requests, batches of {args.hf_batch}" if k < len(prompts) else f"HF on all requests, batches of {args.hf_batch}"
    print("| what | out tok/s | seconds | x HF | of floor |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print(f"| engine | {ours_tps:.1f} | {ours_s:.2f} | {ours_tps / hf_tps:.2f} | {floor_s / ours_s:.1%} |")
    print(f"| {hf_note} ({hf_out} out tokens) | {hf_tps:.1f} | {hf_s:.2f} | 1.00 | - |")


if __name__ == "__main__":
    main()
