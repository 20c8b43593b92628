"""The cost of structured outputs: N requests all held to one JSON schema against the same N
unconstrained, per output token, measured side by side in one run (target on the GPU: at most
10% slower).

    python benchmarks/structured_output.py --tokenizer DIR [--shape smollm-135m] [--num-requests 64] \
        [--prompt-len 128] [--output-len 256] [--repeats 5] [--device cuda]
    python benchmarks/structured_output.py --tokenizer DIR --compare-libraries   # CPU, no model

DIR holds a Hugging Face tokenizer (the default model's: ~/.cache/lightllm_plugin/tokenizers/...);
the model is random-weight, of the shape's size, with that tokenizer's vocabulary, saved with it
into a temporary folder. The schema's last field is a string of at least 4000 characters, so
every constrained request runs to --output-len exactly as the unconstrained ones (ignore_eos)
do and each of its steps fills a mask. Runs alternate (plain, constrained, plain, ...); the best
and the median of --repeats of each are reported, with three ratios: of the best runs, of the
medians, and the median of each constrained run's ratio to the plain run just before it (on the
H200's host a single run was off by up to a third; the pairs share the host's slow spells).

--compare-libraries times, per token, the mask fill of xgrammar (the engine's) and llguidance
over one valid answer to the schema, for the library choice.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import shutil
import statistics
import sys
import tempfile
import time

import torch
import transformers

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "bio": {"type": "string", "minLength": 4000},
    },
    "required": ["name", "age", "tags", "bio"],
}
SHAPES = {
    "smollm-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                        num_key_value_heads=3, tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, tie_word_embeddings=True),
}


def run(engine, prompts, params) -> tuple[int, float, int, int]:
    """(output tokens, seconds, steps, steps queued ahead)"""
    for i, p in enumerate(prompts):
        engine.add_request(engine.new_request_id(), p, params)
    ahead0 = engine.steps_queued_ahead
    if engine.runner.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    produced = steps = 0
    while engine.has_unfinished():
        produced += len(engine.step())
        steps += 1
    seconds = time.perf_counter() - t0
    engine.flush_cache()
    return produced, seconds, steps, engine.steps_queued_ahead - ahead0


def compare_libraries(tokenizer_dir: str) -> None:
    import llguidance
    import llguidance.hf
    import llguidance.torch
    import xgrammar

    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = len(tok)
    schema = dict(SCHEMA, properties=dict(SCHEMA["properties"], bio={"type": "string", "minLength": 10}))
    answer = json.dumps({"name": "Ada Lovelace", "age": 36, "tags": ["math", "poet"],
                         "bio": "Wrote the first program for the Analytical Engine. " * 8})
    ids = tok.encode(answer, add_special_tokens=False) + [tok.eos_token_id]

    t0 = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=[tok.eos_token_id])
    compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    t1 = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
    t2 = time.perf_counter()
    xgr_mask = xgrammar.allocate_token_bitmask(1, vocab)
    xgr_times = []
    matcher = xgrammar.GrammarMatcher(compiled)
    for t in ids:
        s = time.perf_counter()
        matcher.fill_next_token_bitmask(xgr_mask)
        xgr_times.append(time.perf_counter() - s)
        assert matcher.accept_token(t)
    xgr = (t1 - t0, t2 - t1, xgr_times)

    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
    t1 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
    ll_matcher = llguidance.LLMatcher(lltok, grammar)
    t2 = time.perf_counter()
    ll_mask = llguidance.torch.allocate_token_bitmask(1, vocab)
    ll_times = []
    for t in ids:
        s = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(ll_matcher, ll_mask, 0)
        ll_times.append(time.perf_counter() - s)
        assert ll_matcher.consume_token(t), ll_matcher.get_error()
    ll = (t1 - t0, t2 - t1, ll_times)

    print(f"one valid answer of {len(ids)} tokens, vocabulary {vocab}, one CPU thread")
    print(f"{'library':<12}{'tokenizer s':>12}{'compile ms':>12}{'mask us/token mean':>20}{'median':>10}{'max':>10}")
    for name, (tok_s, comp_s, times) in (("xgrammar", xgr), ("llguidance", ll)):
        times = sorted(times)
        print(f"{name:<12}{tok_s:>12.2f}{comp_s * 1e3:>12.1f}{sum(times) / len(times) * 1e6:>20.1f}"
              f"{times[len(times) // 2] * 1e6:>10.1f}{times[-1] * 1e6:>10.1f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm-135m")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compare-libraries", action="store_true")
    args = ap.parse_args()
    print("command:", shlex.join([sys.executable, *sys.argv]))
    if args.compare_libraries:
        compare_libraries(args.tokenizer)
        return

    from lightllm_plugin.config import EngineConfig
    from lightllm_plugin.engine.core import EngineCore
    from lightllm_plugin.sampling_params import SamplingParams

    tok = transformers.AutoTokenizer.from_pretrained(args.tokenizer)
    hf_cfg = transformers.LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096,
                                      eos_token_id=tok.eos_token_id, **SHAPES[args.shape])
    rng = random.Random(0)
    prompts = [[rng.randrange(len(tok)) for _ in range(args.prompt_len)] for _ in range(args.num_requests)]
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(hf_cfg).to(torch.bfloat16).save_pretrained(folder)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            try:
                shutil.copy(f"{args.tokenizer}/{name}", folder)
            except FileNotFoundError:
                pass
        max_len = args.prompt_len + args.output_len + 8
        engine = EngineCore(EngineConfig(model_dir=folder, device=args.device, max_req_total_len=max_len,
                                         max_req_input_len=args.prompt_len + 1,
                                         max_total_token_num=args.num_requests * max_len + 64,
                                         running_max_req_size=max(args.num_requests, 8)), progress=False)
    plain = SamplingParams(temperature=0, max_new_tokens=args.output_len, ignore_eos=True)
    constrained = SamplingParams(temperature=0, max_new_tokens=args.output_len, ignore_eos=True,
                                 structured_outputs={"json": SCHEMA})
    t0 = time.perf_counter()
    engine.add_request(-1, prompts[0], SamplingParams(max_new_tokens=2, structured_outputs={"json": SCHEMA}))
    while engine.has_unfinished():
        engine.step()  # compiles the schema (cached for the timed runs) and warms both paths up
    first_compile_s = time.perf_counter() - t0
    run(engine, prompts[:4], plain)

    results: dict[str, list[tuple[int, float, int, int]]] = {"unconstrained": [], "json schema": []}
    for _ in range(args.repeats):
        results["unconstrained"].append(run(engine, prompts, plain))
        results["json schema"].append(run(engine, prompts, constrained))
    assert engine.free_slots.num_free == engine.total_slots

    print(f"shape {args.shape} (random weights, vocabulary {len(tok)}), {args.device}, "
          f"{engine.config.resolved_dtype}, CUDA graphs {engine.runner.decode_graphs is not None}; "
          f"{args.num_requests} requests x {args.prompt_len} prompt + {args.output_len} output tokens; "
          f"first request with the schema (compile + warm-up) {first_compile_s:.2f} s")
    print(f"{'requests':<16}{'tokens':>8}{'best s':>9}{'median s':>10}{'tok/s':>10}{'ms/step':>10}"
          f"{'median ms/step':>16}{'steps':>7}{'queued ahead':>14}  all s")
    best, median = {}, {}
    for name, runs in results.items():
        tokens, seconds, steps, ahead = min(runs, key=lambda r: r[1])
        middle = statistics.median(r[1] for r in runs)
        best[name], median[name] = seconds / tokens, middle / tokens
        all_s = ", ".join(f"{r[1]:.3f}" for r in runs)
        print(f"{name:<16}{tokens:>8}{seconds:>9.3f}{middle:>10.3f}{tokens / seconds:>10.0f}"
              f"{seconds / steps * 1e3:>10.3f}{middle / steps * 1e3:>16.3f}{steps:>7}{ahead:>14}  {all_s}")
    ratio = best["json schema"] / best["unconstrained"]
    ratio_median = median["json schema"] / median["unconstrained"]
    # each constrained run against the plain run just before it: a slow spell of the host hits both
    paired = statistics.median(j[1] / j[0] / (u[1] / u[0])
                               for u, j in zip(results["unconstrained"], results["json schema"]))
    print(f"time per output token, json schema / unconstrained: {ratio:.3f} "
          f"({(ratio - 1) * 100:+.1f}%; target <= +10%), of the medians {ratio_median:.3f} "
          f"({(ratio_median - 1) * 100:+.1f}%), median of the {len(results['json schema'])} back-to-back pairs "
          f"{paired:.3f} ({(paired - 1) * 100:+.1f}%)")


if __name__ == "__main__":
    main()
