"""Offline throughput: the engine against Hugging Face transformers' batched `generate`,
on a random-weight model of a real shape, measured side by side in one run.

    python benchmarks/offline_throughput.py --shape qwen3-0.6b --num-requests 64 \
        --min-len 32 --max-len 256 [--hf-batch 32] [--device cuda]

Prompt and output lengths are uniform in [min-len, max-len] (seed 0), outputs run to their
length (ignore_eos). Prints output tokens/s of both and their ratio.
"""

from __future__ import annotations

import argparse
import random
import shlex
import sys
import tempfile
import time

import torch
import transformers

SHAPES = {
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


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm-135m")
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args()

    from lightllm_plugin.config import EngineConfig
    from lightllm_plugin.engine.core import EngineCore
    from lightllm_plugin.sampling_params import SamplingParams

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    hf_cfg = SHAPES[args.shape]()
    rng = random.Random(0)
    lengths = [(rng.randint(args.min_len, args.max_len), rng.randint(args.min_len, args.max_len)) for _ in range(args.num_requests)]
    prompts = [[rng.randrange(hf_cfg.vocab_size) for _ in range(p)] for p, _ in lengths]
    total_out = sum(o for _, o in lengths)

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        with torch.device(args.device):
            hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype).eval()
        hf.save_pretrained(tmp)

        cfg = EngineConfig(model_dir=tmp, device=args.device, data_type=str(dtype).removeprefix("torch."),
                           max_req_total_len=2 * args.max_len + 8, max_req_input_len=args.max_len)
        engine = EngineCore(cfg, progress=False, with_tokenizer=False)
        for warm in (True, False):
            reqs = prompts[:2] if warm else prompts
            for i, (p, (_, o)) in enumerate(zip(reqs, lengths)):
                engine.add_request(i, p, SamplingParams(temperature=0, max_new_tokens=o, ignore_eos=True))
            sync(args.device)
            t0 = time.perf_counter()
            produced = 0
            while engine.has_unfinished():
                produced += len(engine.step())
            sync(args.device)
            ours_s = time.perf_counter() - t0
        assert produced == total_out, (produced, total_out)
        ours_tps = total_out / ours_s

        hf_tps = float("nan")
        if not args.skip_hf:
            hf.generation_config.pad_token_id = 0
            sync(args.device)
            t0 = time.perf_counter()
            for start in range(0, len(prompts), args.hf_batch):
                chunk = prompts[start : start + args.hf_batch]
                outs = [o for _, o in lengths[start : start + args.hf_batch]]
                width = max(len(p) for p in chunk)
                ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=args.device)
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=args.device)
                with torch.no_grad():
                    hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max(outs), min_new_tokens=max(outs))
            sync(args.device)
            hf_tps = total_out / (time.perf_counter() - t0)

    print(f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(f"device={args.device} dtype={dtype} shape={args.shape} requests={args.num_requests} output_tokens={total_out}")
    print(f"{'engine':>10} {ours_tps:10.1f} out tok/s  ({ours_s:.2f} s)")
    print(f"{'hf':>10} {hf_tps:10.1f} out tok/s")
    print(f"ratio engine/hf = {ours_tps / hf_tps:.2f}x")


if __name__ == "__main__":
    main()
