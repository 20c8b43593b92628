"""The default model on CPU: our engine against HF transformers and llama.cpp, in one run.

    python benchmarks/cpu_speed.py                                  # every row, a few minutes on 2 cores
    python benchmarks/cpu_speed.py --decode 32,1024 --prefill 1024 --systems ours,hf --batch ""

All systems read the same GGUF file (the default model's Q4_1 unless --gguf names another):
ours through the offline engine at its default CPU dtype and at float32, HF transformers
dequantized to float32 (`from_pretrained(dir, gguf_file=name)`), llama.cpp (llama-cpp-python)
as the file is. Every system gets the same prompts (seeded random token ids) and the same
thread count, and runs alone: one is loaded, timed and freed before the next.

- decode: greedy tokens per second over `--new-tokens` tokens after a prompt of each context
  length, timed from the first token (which the prefill gives) to the last;
- prefill: seconds from a prompt of each length to its first token;
- batch (ours only): tokens per second of B concurrent greedy streams through `LLM.generate`
  (prompts of 32 tokens), and their ratio to one stream.
"""

from __future__ import annotations

import argparse
import gc
import os
import shlex
import sys
import time

import torch

import lightllm_plugin  # noqa: F401  before torch: the package bounds OpenMP's spin-waiting, as users get it

# the low ids of the default model's vocabulary are special tokens; prompts avoid them
_FIRST_PLAIN_ID = 100
_BATCH_PROMPT = 32


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def prompt_ids(length: int, vocab: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(_FIRST_PLAIN_ID, vocab, (length,), generator=gen).tolist()


# ---- ours -----------------------------------------------------------------------------------
def ours_engine(gguf: str, data_type: str, max_len: int):
    from lightllm_plugin import LLM

    return LLM(gguf, data_type=data_type, max_req_total_len=max_len, max_req_input_len=max_len - 1,
               max_total_token_num=8 * max_len, progress=False)


def _ours_token_times(llm, prompt: list[int], new_tokens: int) -> list[float]:
    """Wall-clock time of each generated token, from the request's submission."""
    from lightllm_plugin.sampling_params import SamplingParams

    engine = llm.engine
    engine.flush_cache()  # prompts of one seed share their beginnings: nothing may come from the cache
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    rid = engine.new_request_id()
    t0 = time.perf_counter()
    engine.add_request(rid, prompt, params)
    times = []
    while engine.has_unfinished():
        times += [time.perf_counter() - t0 for _ in engine.step()]
    return times


def ours_decode(llm, prompt: list[int], new_tokens: int) -> float:
    times = _ours_token_times(llm, prompt, new_tokens)
    return (len(times) - 1) / (times[-1] - times[0])


def ours_prefill(llm, prompt: list[int]) -> float:
    return _ours_token_times(llm, prompt, 1)[0]


def ours_batch(llm, streams: int, new_tokens: int, vocab: int) -> float:
    from lightllm_plugin.sampling_params import SamplingParams

    prompts = [prompt_ids(_BATCH_PROMPT, vocab, seed=100 + i) for i in range(streams)]
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    llm.engine.flush_cache()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed


# ---- HF transformers ----------------------------------------------------------------------
def hf_model(gguf: str):
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(os.path.abspath(gguf))
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


@torch.inference_mode()
def hf_decode(model, prompt: list[int], new_tokens: int) -> float:
    out = model(torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    t0 = time.perf_counter()
    for _ in range(new_tokens - 1):
        out = model(token, past_key_values=out.past_key_values, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    return (new_tokens - 1) / (time.perf_counter() - t0)


@torch.inference_mode()
def hf_prefill(model, prompt: list[int]) -> float:
    t0 = time.perf_counter()
    model(torch.tensor([prompt]), use_cache=True, logits_to_keep=1).logits.argmax(-1)
    return time.perf_counter() - t0


# ---- llama.cpp -------------------------------------------------------------------------------
def llamacpp_model(gguf: str, threads: int, max_len: int):
    import llama_cpp

    return llama_cpp.Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=max_len,
                           verbose=False)


def _llamacpp_next(llm) -> int:
    import llama_cpp
    import numpy as np

    # the last evaluated token's logits (Llama.eval keeps none itself unless logits_all)
    return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(llm.n_vocab(),)).argmax())


def llamacpp_decode(llm, prompt: list[int], new_tokens: int) -> float:
    llm.reset()
    llm.eval(prompt)
    token = _llamacpp_next(llm)
    t0 = time.perf_counter()
    for _ in range(new_tokens - 1):
        llm.eval([token])
        token = _llamacpp_next(llm)
    return (new_tokens - 1) / (time.perf_counter() - t0)


def llamacpp_prefill(llm, prompt: list[int]) -> float:
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    _llamacpp_next(llm)
    return time.perf_counter() - t0


# ---- the run -------------------------------------------------------------------------------------
def measure(system: str, args, vocab: int) -> dict:
    """{"dtype": str, "decode": {ctx: tok/s}, "prefill": {len: s}, "batch": {B: tok/s}} of one system."""
    max_len = max(args.decode + args.prefill + [_BATCH_PROMPT]) + args.new_tokens + 1
    result = {"decode": {}, "prefill": {}, "batch": {}}
    if system in ("ours", "ours-fp32"):
        model = ours_engine(args.gguf, "float32" if system == "ours-fp32" else "bfloat16", max_len)
        result["dtype"] = model.config.resolved_dtype
        decode, prefill = ours_decode, ours_prefill
    elif system == "hf":
        model = hf_model(args.gguf)
        result["dtype"] = "float32"
        decode, prefill = hf_decode, hf_prefill
    else:
        model = llamacpp_model(args.gguf, args.threads, max_len)
        result["dtype"] = "gguf"
        decode, prefill = llamacpp_decode, llamacpp_prefill
    decode(model, prompt_ids(16, vocab, seed=0), 8)  # warm-up: first-call allocations, thread pools
    for ctx in args.decode:
        result["decode"][ctx] = decode(model, prompt_ids(ctx, vocab, seed=ctx), args.new_tokens)
        print(f"  {system}: decode at context {ctx}: {result['decode'][ctx]:.1f} tok/s", flush=True)
    for length in args.prefill:
        result["prefill"][length] = prefill(model, prompt_ids(length, vocab, seed=length))
        print(f"  {system}: prefill of {length}: {result['prefill'][length]:.2f} s", flush=True)
    if system == "ours":
        for streams in args.batch:
            result["batch"][streams] = ours_batch(model, streams, args.new_tokens, vocab)
            print(f"  {system}: {streams} streams: {result['batch'][streams]:.1f} tok/s", flush=True)
    del model
    gc.collect()
    return result


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _cell(value: float | None, fmt: str) -> str:
    return format(value, fmt) if value is not None else "-"


def report(results: dict[str, dict], args) -> None:
    names = list(results)
    header = [f"{n}({results[n]['dtype']})" for n in names]
    ratios = [("ours/hf", "ours", "hf"), ("ours/llama.cpp", "ours", "llama.cpp"), ("fp32/hf", "ours-fp32", "hf")]
    ratios = [r for r in ratios if r[1] in results and r[2] in results]

    def table(title: str, key: str, rows: list[int], fmt: str, faster) -> None:
        if not rows:
            return
        print(f"\n{title}")
        print("  ".join([f"{'':>8}"] + [f"{h:>18}" for h in header] + [f"{r[0]:>15}" for r in ratios]))
        for row in rows:
            vals = {n: results[n][key].get(row) for n in names}
            cells = [f"{_cell(vals[n], fmt):>18}" for n in names]
            cells += [f"{_ratio(*faster(vals[a], vals[b])):>15}" for _, a, b in ratios]
            print("  ".join([f"{row:>8}"] + cells))

    table(f"decode tok/s ({args.new_tokens} greedy tokens after a prompt of the context length)",
          "decode", args.decode, ".1f", lambda a, b: (a, b))
    # ratios of speed: time of the other over ours
    table("prefill seconds to the first token (ratios: speed, the other's time / ours)",
          "prefill", args.prefill, ".2f", lambda a, b: (b, a))
    if "ours" in results and args.batch:
        batch = results["ours"]["batch"]
        one = batch.get(1)
        print(f"\nbatch decode, ours ({results['ours']['dtype']}), {_BATCH_PROMPT}-token prompts, "
              f"{args.new_tokens} tokens each")
        for streams, tps in batch.items():
            print(f"  {streams:>3} streams: {tps:8.1f} tok/s  ({_ratio(tps, one)} one stream)")


def main() -> None:
    from lightllm_plugin.models.default_model import default_model_path

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=None, help="GGUF file (default: the default model's)")
    ap.add_argument("--systems", default="ours,ours-fp32,hf,llama.cpp")
    ap.add_argument("--decode", type=_ints, default="32,1024,4096", help="context lengths, comma-separated")
    ap.add_argument("--prefill", type=_ints, default="1024,2048,4096", help="prompt lengths, comma-separated")
    ap.add_argument("--batch", type=_ints, default="1,8", help="concurrent streams (ours), comma-separated")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    args.gguf = args.gguf or default_model_path()
    torch.set_num_threads(args.threads)

    print("command:", shlex.join(["python"] + sys.argv))
    print(f"torch {torch.__version__}, {args.threads} threads, {args.gguf}")
    from lightllm_plugin.models.gguf import gguf_model_config

    vocab = gguf_model_config(args.gguf)["vocab_size"]
    results = {}
    for system in args.systems.split(","):
        if system == "llama.cpp":
            try:
                import llama_cpp  # noqa: F401
            except ImportError:
                print("llama.cpp: skipped, llama-cpp-python is not installed (pip install llama-cpp-python)")
                continue
        elif system not in ("ours", "ours-fp32", "hf"):
            raise SystemExit(f"unknown system {system!r}")
        results[system] = measure(system, args, vocab)
    report(results, args)


if __name__ == "__main__":
    main()
