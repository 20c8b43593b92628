"""Embedding / reward-model throughput: embedded tokens/s of a batch of equal-length texts, against
the matmul ceiling and Hugging Face transformers' batched forward, all measured in this run.

    python benchmarks/embedding.py                                  # Qwen3-Embedding-8B shape
    python benchmarks/embedding.py --shape llama3-8b-reward         # Llama-3-8B with a one-label score head
    python benchmarks/embedding.py --shape tiny --device cpu --texts 8 --text-len 64   # smoke run

Random weights (seed 0) are built on the device as a transformers model (Qwen3Model, as
sentence-transformers saves Qwen3-Embedding; or LlamaForSequenceClassification) and handed to the
engine in memory (`InMemoryCheckpoint`): `--task embed` last-token pooling, or the score head.
`--texts` prompts of `--text-len` random token ids are added to one EngineCore at once and run
to the end (the scheduler packs `--batch-max-tokens` prompt tokens a step; each request frees its
slots the step its prefill ends); the best of `--repeats` timed rounds after a warm-up round.

Reported, side by side:
- ours: texts x text_len / wall seconds (embedded tokens/s);
- ceiling: the bf16 8192^3 matmul rate of this device over the workload's FLOPs per token
  (2 x decoder-layer parameters, plus causal attention 4 x layers x heads x head_dim x (L+1)/2,
  plus the head); target ours >= 60% of it;
- HF: the same texts through transformers' own forward in batches of `--hf-batch`, the last
  token's hidden state (or the score logits) read out, timed the same way;
- agreement: cosine of our embeddings with HF's (or the scores' largest relative difference).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import torch
import transformers

SHAPES = {
    # Qwen3-Embedding-8B: a Qwen3 decoder, last-token pooled, normalized
    "qwen3-embedding-8b": ("embed", lambda: transformers.Qwen3Config(
        vocab_size=151665, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0)),
    # Llama-3-8B with a score head of one label (the shape of Skywork-Reward-Llama-3.1-8B)
    "llama3-8b-reward": ("reward", lambda: transformers.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, num_labels=1,
        pad_token_id=128255)),
    # CPU smoke runs only
    "tiny": ("embed", lambda: transformers.Qwen3Config(
        vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)),
    "tiny-reward": ("reward", lambda: transformers.LlamaConfig(
        vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, num_labels=1, pad_token_id=2047)),
}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_flops(device: str, n: int = 8192) -> float:
    """FLOP/s of a bf16 n^3 matmul on random inputs (median of 10 after a warm-up)."""
    if device != "cuda":
        return float("nan")
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return 2 * n**3 / statistics.median(times)


def random_model(task: str, hf_cfg, device: str, dtype: torch.dtype):
    torch.manual_seed(0)
    with torch.device(device):
        if task == "embed":
            return transformers.AutoModel.from_config(hf_cfg, dtype=dtype).eval()
        return transformers.AutoModelForSequenceClassification.from_config(hf_cfg, dtype=dtype).eval()


def flops_per_token(hf, hf_cfg, text_len: int) -> float:
    decoder = hf if hasattr(hf, "layers") else hf.model
    layer_params = sum(p.numel() for p in decoder.layers.parameters())
    heads = hf_cfg.num_attention_heads
    head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // heads
    attention = 4 * hf_cfg.num_hidden_layers * heads * head_dim * (text_len + 1) / 2
    return 2 * layer_params + attention


def engine_over(hf, hf_cfg, task: str, args):
    from lightllm_plugin.config import EngineConfig
    from lightllm_plugin.engine.core import EngineCore
    from lightllm_plugin.models.loader import InMemoryCheckpoint

    config = hf_cfg.to_dict()
    # Qwen3-Embedding's folders declare the causal LM and hold the bare decoder's weights
    config["architectures"] = [type(hf).__name__.replace("Model", "ForCausalLM") if task == "embed" else type(hf).__name__]
    cfg = EngineConfig(device=args.device, data_type="bfloat16" if args.device == "cuda" else "float32",
                       task="embed" if task == "embed" else "auto", max_req_total_len=args.text_len + 8,
                       max_req_input_len=args.text_len + 4, batch_max_tokens=args.batch_max_tokens,
                       max_total_token_num=args.batch_max_tokens + 2 * (args.text_len + 8))
    return EngineCore(cfg, progress=False, with_tokenizer=False, checkpoint=InMemoryCheckpoint(config, hf.state_dict().items()))


def run_ours(core, prompts: list[list[int]], device: str) -> tuple[float, list[list[float]]]:
    from lightllm_plugin.sampling_params import SamplingParams

    params = SamplingParams(max_new_tokens=1)
    sync(device)
    start = time.perf_counter()
    ids = []
    for p in prompts:
        ids.append(core.new_request_id())
        core.add_request(ids[-1], p, params)
    out = {}
    while core.has_unfinished():
        for event in core.step():
            out[event.req_id] = event.data
    sync(device)
    return time.perf_counter() - start, [out[i] for i in ids]


@torch.inference_mode()
def run_hf(hf, task: str, prompts: list[list[int]], batch: int, device: str) -> tuple[float, torch.Tensor]:
    sync(device)
    start = time.perf_counter()
    outs = []
    for i in range(0, len(prompts), batch):
        ids = torch.tensor(prompts[i : i + batch], device=device)
        if task == "embed":
            last = hf(ids).last_hidden_state[:, -1].float()
            outs.append(torch.nn.functional.normalize(last, dim=-1))
        else:
            outs.append(hf(ids).logits.float())
    sync(device)
    return time.perf_counter() - start, torch.cat(outs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-embedding-8b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--text-len", type=int, default=512)
    parser.add_argument("--batch-max-tokens", type=int, default=32768, help="prompt tokens the engine runs a step")
    parser.add_argument("--hf-batch", type=int, default=64, help="texts per transformers forward")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()
    print("command:", shlex.join([sys.executable, *sys.argv]))
    task, make_cfg = SHAPES[args.shape]
    hf_cfg = make_cfg()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    mm = matmul_flops(args.device)
    t0 = time.perf_counter()
    hf = random_model(task, hf_cfg, args.device, dtype)
    core = engine_over(hf, hf_cfg, task, args)
    print(f"built {args.shape} ({task}) on {args.device} in {time.perf_counter() - t0:.1f} s; "
          f"engine task {core.config.resolved_task}, {core.total_slots} KV slots, batch_max_tokens {args.batch_max_tokens}")

    gen = torch.Generator().manual_seed(1)
    top = hf_cfg.vocab_size - 1  # the reward shape's pad id is the last one: never in a prompt
    prompts = torch.randint(100, top, (args.texts, args.text_len), generator=gen).tolist()
    run_ours(core, prompts[: max(1, args.texts // 4)], args.device)  # warm-up: kernels, allocator
    ours_s, ours_out = min((run_ours(core, prompts, args.device) for _ in range(args.repeats)), key=lambda r: r[0])
    tokens = args.texts * args.text_len
    ours_tps = tokens / ours_s
    per_token = flops_per_token(hf, hf_cfg, args.text_len)
    ceiling_tps = mm / per_token
    core.flush_cache()
    assert core.free_slots.num_free == core.total_slots, "KV slots leaked"

    print(f"workload: {args.texts} texts x {args.text_len} tokens = {tokens} tokens, "
          f"{per_token / 1e9:.2f} GFLOP/token")
    print(f"ceiling: bf16 8192^3 matmul {mm / 1e12:.0f} TFLOP/s -> {ceiling_tps:,.0f} tokens/s")
    print(f"ours:    {ours_s:.3f} s  {ours_tps:,.0f} tokens/s  = {ours_tps / ceiling_tps:.1%} of the ceiling "
          f"({ours_tps * per_token / 1e12:.0f} TFLOP/s)")
    if not args.skip_hf:
        run_hf(hf, task, prompts[: args.hf_batch], args.hf_batch, args.device)  # warm-up
        hf_s, hf_out = min((run_hf(hf, task, prompts, args.hf_batch, args.device) for _ in range(args.repeats)),
                           key=lambda r: r[0])
        hf_tps = tokens / hf_s
        print(f"HF:      {hf_s:.3f} s  {hf_tps:,.0f} tokens/s  = {hf_tps / ceiling_tps:.1%} of the ceiling "
              f"(batches of {args.hf_batch}, transformers {transformers.__version__})")
        print(f"ours / HF: {ours_tps / hf_tps:.2f}x")
        mine = torch.tensor(ours_out)
        if task == "embed":
            cos = torch.nn.functional.cosine_similarity(mine, hf_out.cpu(), dim=-1)
            print(f"agreement: cosine(ours, HF) min {cos.min():.4f}, mean {cos.mean():.4f}")
        else:
            diff = (mine - hf_out.cpu()).abs().max() / hf_out.abs().max()
            print(f"agreement: scores' largest difference / largest |score| = {diff:.4f}")


if __name__ == "__main__":
    main()
