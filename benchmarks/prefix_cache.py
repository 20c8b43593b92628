"""The prefix cache and chunked prefill, each measured on and off side by side in one run.

    python benchmarks/prefix_cache.py --workload all                       # CPU, the default model
    python benchmarks/prefix_cache.py --workload all --device cuda --shape llama8b
    python benchmarks/prefix_cache.py --workload longprompt --device cuda --chunk_sizes 256,512,1024,2048

Three workloads (random prompt token ids from a seeded generator; greedy; ignore_eos):

- shared (offline EngineCore): N requests whose prompts share a long system prefix (prefix_len
  shared + unique_len own tokens each), max_new_tokens each, all added at once. Requests/s with the
  cache on against `disable_dynamic_prompt_cache=True`, and the hit ratio: sum of the requests'
  cached_len over the sum of their prompt_len (target: speedup >= 5x on the GPU).
- multiturn (the real server, streamed POST /v1/chat/completions over httpx): C conversations
  run concurrently, each T turns; a turn resends the whole history (one system prompt shared by
  all conversations, the earlier user messages and replies) plus a new user message. TTFT = send
  -> the first chunk carrying a token (logprobs on, so every token has a chunk). p50 and p90
  over all turns, a server with the cache against one with `--disable_dynamic_prompt_cache`, one
  after the other (target: >= 3x lower p50 with the cache).
- longprompt (offline EngineCore): S streams decode; once all of them decode and 8 more steps
  have run, one prompt of long_len tokens is added (max_new_tokens=1, so after its first token
  the batch is the streams alone again; 16 steps later the streams are aborted). Every step's
  return time is recorded; a stream's TPOT is the time between its consecutive tokens (what a
  client sees: step() returns when the tokens are on the host). Reported, for each --chunk_sizes
  value and with `disable_chunked_prefill=True`: the streams' TPOT p50 from the moment all of
  them decode to the end, TPOT p99 over the gaps that end while the long prompt is prefilled (its
  add -> its first token, inclusive), their ratio (target: <= 2x with chunking) and the long
  prompt's TTFT. The whole run's p50 holds the prefill's gaps too, so with small chunks (many
  prefill steps) it rises toward them: the p50 of the gaps outside the prefill ("steady") and
  p99 over it are printed beside. batch_max_tokens is long_len + S in every mode, so only the
  chunk size limits a step's prefill tokens.

Engines are built one at a time from the same weights: `--model` (a HF folder or GGUF file;
default: the default model), or `--shape` random weights (seed 0) built on the device, handed to
the engine in memory; the server gets them in a temporary folder with a word-level tokenizer (the
word `w<i>` is token i, see serving.py) and a small chat template. On CUDA `--shape` defaults to
llama8b. Sizes default per device (DEFAULTS); each CPU workload takes about 1-2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import math
import random
import shlex
import signal
import sys
import tempfile
import time

import httpx
import torch
import transformers
from serving import SPECIAL_TOKENS, Server, percentile, word_tokenizer

# the low ids of real vocabularies are special tokens; random prompts avoid them
FIRST_PLAIN_ID = 100
WORKLOADS = ("shared", "multiturn", "longprompt")

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
SHAPES = {
    # CPU smoke runs only: a real architecture at toy size
    "tiny": lambda: transformers.LlamaConfig(
        vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32768,
    ),
    "llama1b": lambda: transformers.LlamaConfig(  # Llama-3.2-1B
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rope_theta=500000.0,
        tie_word_embeddings=True, rope_scaling={**_LLAMA3_ROPE, "factor": 32.0},
    ),
    "llama8b": lambda: transformers.LlamaConfig(  # Llama-3.1-8B
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE, "factor": 8.0},
    ),
}

DEFAULTS = {
    "cpu": {"num_requests": 32, "prefix_len": 1520, "unique_len": 80, "max_new_tokens": 32, "batch_max_tokens": 8192,
            "conversations": 4, "turns": 8, "system_words": 300, "user_words": 20, "chat_max_tokens": 16,
            "max_total_token_num": 16384, "streams": 32, "stream_prompt_len": 64, "long_len": 2048},
    "cuda": {"num_requests": 256, "prefix_len": 950, "unique_len": 50, "max_new_tokens": 32, "batch_max_tokens": 8192,
             "conversations": 16, "turns": 8, "system_words": 1000, "user_words": 40, "chat_max_tokens": 32,
             "max_total_token_num": None, "streams": 32, "stream_prompt_len": 128, "long_len": 16384},
}

# role markers of the word tokenizer's chat template are words too, so a rendered chat is one token a word
WORD_CHAT_TEMPLATE = (
    "{% for m in messages %}w1 {% if m['role'] == 'system' %}w2{% elif m['role'] == 'user' %}w3{% else %}w4{% endif %} "
    "{{ m['content'] }} w5 {% endfor %}{% if add_generation_prompt %}w1 w4 {% endif %}"
)
ENGLISH = [
    "the", "model", "reads", "every", "token", "of", "a", "prompt", "once", "and", "keeps", "its", "keys", "values",
    "so", "that", "later", "request", "with", "same", "beginning", "can", "skip", "work", "while", "new", "questions",
    "about", "servers", "caches", "memory", "batches", "latency", "throughput", "users", "arrive", "at", "any", "time",
]


# ---- models --------------------------------------------------------------------------------
class ModelSource:
    """Builds engines from --model, or from random --shape weights kept on the device between engines."""

    def __init__(self, device: str, model: str | None = None, shape: str | None = None, data_type: str | None = None):
        self.device, self.model, self.shape = device, model, shape
        self.data_type = data_type or ("bfloat16" if device == "cuda" else "auto")
        self.hf = None
        if shape is not None:
            torch.manual_seed(0)
            dtype = torch.bfloat16 if device == "cuda" else torch.float32
            hf_cfg = SHAPES[shape]()
            hf_cfg.bos_token_id, hf_cfg.eos_token_id = hf_cfg.vocab_size - 2, hf_cfg.vocab_size - 1
            with torch.device(device):
                self.hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype).eval()

    @property
    def name(self) -> str:
        return f"random {self.shape} (seed 0)" if self.shape else (self.model or "default model")

    def engine(self, **config_fields):
        from lightllm_plugin.config import EngineConfig
        from lightllm_plugin.engine.core import EngineCore
        from lightllm_plugin.models.loader import InMemoryCheckpoint

        cfg = EngineConfig(model_dir=self.model, device=self.device, data_type=self.data_type, **config_fields)
        if self.hf is None:
            return EngineCore(cfg, progress=False, with_tokenizer=False)
        config = self.hf.config.to_dict()
        config["architectures"] = [type(self.hf).__name__]
        checkpoint = InMemoryCheckpoint(config, self.hf.state_dict().items())
        return EngineCore(cfg, progress=False, with_tokenizer=False, checkpoint=checkpoint)

    def server_flags(self, folder: str) -> list[str]:
        """Flags naming the model for a server; random weights are written into `folder` first and then
        dropped from this process, so the server can have the device's memory."""
        flags = ["--device", self.device] + (["--data_type", self.data_type] if self.data_type != "auto" else [])
        if self.hf is None:
            return flags + (["--model_dir", self.model] if self.model else [])
        self.hf.save_pretrained(folder)
        tok = word_tokenizer(self.hf.config.vocab_size)
        tok.chat_template = WORD_CHAT_TEMPLATE
        tok.save_pretrained(folder)
        self.hf = None
        release()
        return flags + ["--model_dir", folder]

    def words(self) -> list[str]:
        """What chat messages are made of: words that are one token each for the word tokenizer."""
        return [f"w{i}" for i in range(6, 2000)] if self.shape else list(ENGLISH)


def release() -> None:
    """Let go of engines (their KV pools and CUDA graphs) before the next one is built."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def random_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(FIRST_PLAIN_ID, vocab - len(SPECIAL_TOKENS)) for _ in range(n)]


def greedy(max_new_tokens: int):
    from lightllm_plugin.sampling_params import SamplingParams

    return SamplingParams(temperature=0, max_new_tokens=max_new_tokens, ignore_eos=True)


# ---- shared: many requests, one long system prefix --------------------------------------------
def shared_prompts(n: int, prefix_len: int, unique_len: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = random_ids(rng, prefix_len, vocab)
    return [prefix + random_ids(rng, unique_len, vocab) for _ in range(n)]


def run_all_at_once(engine, prompts: list[list[int]], max_new_tokens: int, device: str) -> dict:
    """Every prompt added at once, stepped until all finish: wall time, tokens, cache hits."""
    ids = [engine.new_request_id() for _ in prompts]
    sync(device)
    t0 = time.perf_counter()
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, p, greedy(max_new_tokens))
    finished = {}
    produced = steps = 0
    while engine.has_unfinished():
        for e in engine.step():
            produced += 1
            if e.finish_reason is not None:
                finished[e.req_id] = e
        steps += 1
    sync(device)
    wall = time.perf_counter() - t0
    if produced != len(prompts) * max_new_tokens or len(finished) != len(prompts):
        raise RuntimeError(f"got {produced} tokens from {len(finished)} requests, expected {max_new_tokens} from each")
    prompt_tokens = sum(e.prompt_len for e in finished.values())
    cached = sum(e.cached_len for e in finished.values())
    return {"wall_s": wall, "req_s": len(prompts) / wall, "out_tok_s": produced / wall, "steps": steps,
            "prompt_tokens": prompt_tokens, "cached_tokens": cached, "hit_ratio": cached / prompt_tokens}


def bench_shared(source: ModelSource, a) -> dict:
    total_len = a.prefix_len + a.unique_len + a.max_new_tokens
    fields = {"max_req_input_len": a.prefix_len + a.unique_len, "max_req_total_len": total_len + 1,
              "max_total_token_num": (a.num_requests + 1) * total_len, "running_max_req_size": a.num_requests,
              "batch_max_tokens": max(a.batch_max_tokens, total_len + 1),
              "chunked_prefill_size": a.chunked_prefill_size}
    rows = {}
    for label, off in (("cache on", False), ("cache off", True)):
        engine = source.engine(disable_dynamic_prompt_cache=off, **fields)
        vocab = engine.model_cfg.vocab_size
        warm = shared_prompts(4, a.prefix_len, a.unique_len, vocab, a.seed + 1)
        run_all_at_once(engine, warm, 2, a.device)
        engine.flush_cache()  # the timed run computes its prefix once, like a cold start
        rows[label] = run_all_at_once(engine, shared_prompts(a.num_requests, a.prefix_len, a.unique_len, vocab, a.seed),
                                      a.max_new_tokens, a.device)
        print(f"shared, {label}: {rows[label]['req_s']:.2f} req/s", flush=True)
        del engine
        release()
    on, off = rows["cache on"], rows["cache off"]
    speedup = on["req_s"] / off["req_s"]
    print(f"\n## shared: {a.num_requests} requests at once, prompt = {a.prefix_len} shared + {a.unique_len} own tokens "
          f"({a.prefix_len / (a.prefix_len + a.unique_len):.0%} shared), max_new_tokens={a.max_new_tokens}; "
          f"{fields}")
    print("| cache | req/s | out tok/s | wall s | steps | prompt tokens | from cache | hit ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, r in rows.items():
        print(f"| {label} | {r['req_s']:.2f} | {r['out_tok_s']:.1f} | {r['wall_s']:.2f} | {r['steps']} | "
              f"{r['prompt_tokens']} | {r['cached_tokens']} | {r['hit_ratio']:.3f} |")
    print(f"speedup (req/s, cache on / off): {on['req_s']:.2f} / {off['req_s']:.2f} = {speedup:.2f}x "
          f"(target >= 5x: {'met' if speedup >= 5 else 'NOT met'}); hit ratio {on['hit_ratio']:.3f}")
    return {"speedup": speedup, "hit_ratio": on["hit_ratio"], "rows": rows}


# ---- multiturn: chat histories resent to the real server ----------------------------------------
def conversation_script(words: list[str], conversations: int, turns: int, system_words: int, user_words: int,
                        seed: int) -> tuple[str, list[list[str]]]:
    """One system prompt shared by every conversation, and each conversation's user messages."""
    rng = random.Random(seed)
    system = " ".join(rng.choice(words) for _ in range(system_words))
    users = [[" ".join(rng.choice(words) for _ in range(user_words)) for _ in range(turns)]
             for _ in range(conversations)]
    return system, users


async def chat_turn(client: httpx.AsyncClient, model: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed chat completion: TTFT, the reply's text and the counts the server reports."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "logprobs": True, "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first, tokens, text, usage = None, 0, [], {}
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:300]}")
        async for line in resp.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data:"):])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                n = len((choice.get("logprobs") or {}).get("content") or [])
                if n and first is None:
                    first = time.perf_counter()
                tokens += n
                text.append(choice.get("delta", {}).get("content") or "")
    if tokens != max_tokens:
        raise RuntimeError(f"got {tokens} tokens, asked for {max_tokens}")
    details = usage.get("prompt_tokens_details") or {}
    return {"ttft_s": first - sent, "text": "".join(text), "prompt_tokens": usage.get("prompt_tokens"),
            "cached_tokens": details.get("cached_tokens")}


async def run_conversation(client, model: str, system: str, users: list[str], max_tokens: int) -> list[dict]:
    messages = [{"role": "system", "content": system}]
    turns = []
    for i, user in enumerate(users):
        messages.append({"role": "user", "content": user})
        turn = await chat_turn(client, model, messages, max_tokens)
        messages.append({"role": "assistant", "content": turn["text"]})
        turns.append({**turn, "turn": i})
    return turns


async def run_conversations(url: str, script: tuple[str, list[list[str]]], warm: tuple[str, list[list[str]]],
                            max_tokens: int) -> list[dict]:
    """The warm-up conversations, then the script's: each script's conversations all at once. The warm-up has its
    own system prompt, so it leaves nothing the measured turns could hit, but it runs the same batch shapes (its
    second turn: the cached-prefix path) once, so kernels are compiled before the measured turns."""
    timeout = httpx.Timeout(connect=30.0, read=600.0, write=30.0, pool=None)
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        for (system, users), tokens in ((warm, 2), (script, max_tokens)):
            runs = await asyncio.gather(*(run_conversation(client, model, system, u, tokens) for u in users))
    return [turn for conv in runs for turn in conv]


def summarize_turns(turns: list[dict]) -> dict:
    ttft = [t["ttft_s"] * 1e3 for t in turns]
    later = [t["ttft_s"] * 1e3 for t in turns if t["turn"] > 0]
    prompts = [t["prompt_tokens"] for t in turns if t["prompt_tokens"] is not None]
    cached = [t["cached_tokens"] for t in turns if t["cached_tokens"] is not None]
    by_turn = [percentile([t["ttft_s"] * 1e3 for t in turns if t["turn"] == i], 50)
               for i in range(max(t["turn"] for t in turns) + 1)]
    return {"ttft_p50_ms": percentile(ttft, 50), "ttft_p90_ms": percentile(ttft, 90), "by_turn_p50_ms": by_turn,
            "later_p50_ms": percentile(later, 50), "turns": len(turns),
            "prompt_tokens": sum(prompts), "max_prompt": max(prompts, default=0),
            "hit_ratio": sum(cached) / sum(prompts) if cached and len(cached) == len(prompts) else None}


def bench_multiturn(source: ModelSource, a) -> dict:
    script = conversation_script(source.words(), a.conversations, a.turns, a.system_words, a.user_words, a.seed)
    warm = conversation_script(source.words(), a.conversations, 2, a.system_words, a.user_words, a.seed + 1)
    # a generous bound in tokens: a real tokenizer may need two tokens for a word
    max_input = 2 * (a.system_words + a.turns * (a.user_words + a.chat_max_tokens + 16)) + 256
    rows = {}
    with tempfile.TemporaryDirectory(prefix="prefix-cache-bench-") as folder:
        flags = source.server_flags(folder) + [
            "--max_req_input_len", str(max_input), "--max_req_total_len", str(max_input + a.chat_max_tokens + 1),
            "--batch_max_tokens", str(max(a.batch_max_tokens, max_input + a.chat_max_tokens + 1)),
            "--chunked_prefill_size", str(a.chunked_prefill_size)]
        if a.max_total_token_num:
            flags += ["--max_total_token_num", str(a.max_total_token_num)]
        for label, extra in (("cache on", []), ("cache off", ["--disable_dynamic_prompt_cache"])):
            server = Server(flags + extra)
            try:
                t0 = time.perf_counter()
                server.wait_ready()
                print(f"multiturn, {label}: server ready in {time.perf_counter() - t0:.1f} s", flush=True)
                t0 = time.perf_counter()
                turns = asyncio.run(run_conversations(server.url, script, warm, a.chat_max_tokens))
                rows[label] = {**summarize_turns(turns), "wall_s": time.perf_counter() - t0}
            except BaseException:
                print(server.log_tail(), file=sys.stderr)
                raise
            finally:
                server.stop()
            print(f"multiturn, {label}: TTFT p50 {rows[label]['ttft_p50_ms']:.1f} ms", flush=True)
    on, off = rows["cache on"], rows["cache off"]
    ratio = off["ttft_p50_ms"] / on["ttft_p50_ms"]
    print(f"\n## multiturn: {a.conversations} conversations at once x {a.turns} turns, streamed chat completions; "
          f"system prompt {a.system_words} words (shared), user messages {a.user_words} words, "
          f"max_tokens={a.chat_max_tokens}; server flags: {' '.join(flags)}")
    print("| cache | TTFT p50 ms | TTFT p90 ms | TTFT p50 turns 2+ ms | wall s | prompt tokens | longest prompt "
          "| hit ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, r in rows.items():
        hits = "n/a" if r["hit_ratio"] is None else f"{r['hit_ratio']:.3f}"
        print(f"| {label} | {r['ttft_p50_ms']:.1f} | {r['ttft_p90_ms']:.1f} | {r['later_p50_ms']:.1f} | "
              f"{r['wall_s']:.2f} | {r['prompt_tokens']} | {r['max_prompt']} | {hits} |")
    for label, r in rows.items():
        print(f"{label}: TTFT p50 by turn, ms: {', '.join(f'{x:.0f}' for x in r['by_turn_p50_ms'])}")
    print(f"TTFT p50 ratio (cache off / on): {off['ttft_p50_ms']:.1f} / {on['ttft_p50_ms']:.1f} = {ratio:.2f}x "
          f"(target >= 3x: {'met' if ratio >= 3 else 'NOT met'}); p90: "
          f"{off['ttft_p90_ms'] / on['ttft_p90_ms']:.2f}x")
    return {"ttft_ratio": ratio, "rows": rows}


# ---- longprompt: one long prompt arrives among decoding streams -----------------------------------
class StepClock:
    """Steps an engine and keeps, per request, the time each of its tokens reached the host."""

    def __init__(self, engine):
        self.engine = engine
        self.times: dict[int, list[float]] = {}
        self.finished: set[int] = set()

    def step(self) -> None:
        events = self.engine.step()
        now = time.perf_counter()
        for e in events:
            self.times.setdefault(e.req_id, []).append(now)
            if e.finish_reason is not None:
                self.finished.add(e.req_id)


def stream_budget(streams: int, stream_prompt_len: int, long_len: int, smallest_chunk: int, warm: int,
                  tail: int) -> int:
    """Tokens a stream needs to keep decoding until the end: through the streams' own chunked
    admission, the warm steps, the long prompt's chunks and the tail, with room to spare."""
    return (math.ceil(streams * stream_prompt_len / smallest_chunk) + warm + math.ceil(long_len / smallest_chunk)
            + tail + 16)


def run_longprompt(engine, streams: int, stream_prompt_len: int, long_len: int, budget: int, warm: int, tail: int,
                   seed: int, device: str) -> dict:
    """S streams decode; after `warm` steps of all of them, the long prompt arrives (max_new_tokens=1); `tail`
    steps after its first token the streams are aborted. TPOTs in ms and the long prompt's TTFT in s."""
    rng = random.Random(seed)
    vocab = engine.model_cfg.vocab_size
    clock = StepClock(engine)
    ids = [engine.new_request_id() for _ in range(streams)]
    for rid in ids:
        engine.add_request(rid, random_ids(rng, stream_prompt_len, vocab), greedy(budget))
    long_prompt = random_ids(rng, long_len, vocab)
    sync(device)
    while not all(len(clock.times.get(rid, ())) > 0 for rid in ids):
        clock.step()
    t_decoding = time.perf_counter()
    for _ in range(warm):
        clock.step()
    long_id = engine.new_request_id()
    t_add = time.perf_counter()
    engine.add_request(long_id, long_prompt, greedy(1))  # only its first token: the batch is the streams again
    steps_before = len(clock.times[ids[0]])
    while long_id not in clock.times:
        clock.step()
    t_first = clock.times[long_id][0]
    prefill_steps = len(clock.times[ids[0]]) - steps_before
    for _ in range(tail):
        clock.step()
    for rid in ids + [long_id]:
        engine.abort(rid)
    if clock.finished.intersection(ids):
        raise RuntimeError(f"{len(clock.finished.intersection(ids))} streams ran out of tokens before the end")
    gaps, window, steady = [], [], []  # after all decode; ending in the prefill; after all decode, not in it
    for rid in ids:
        ts = clock.times[rid]
        for prev, cur in itertools.pairwise(ts):
            gap = (cur - prev) * 1e3
            in_prefill = t_add < cur <= t_first
            if cur > t_decoding:
                gaps.append(gap)
                (window if in_prefill else steady).append(gap)
    p50, steady_p50, p99 = percentile(gaps, 50), percentile(steady, 50), percentile(window, 99)
    return {"tpot_p50_ms": p50, "steady_p50_ms": steady_p50, "prefill_p50_ms": percentile(window, 50),
            "prefill_tpot_p99_ms": p99, "ratio": p99 / p50, "steady_ratio": p99 / steady_p50,
            "ttft_s": t_first - t_add, "prefill_steps": prefill_steps, "window_gaps": len(window),
            "max_gap_ms": max(window)}


def bench_longprompt(source: ModelSource, a) -> dict:
    chunks = a.chunk_sizes or [a.chunked_prefill_size]
    warm, tail = 8, 16
    budget = stream_budget(a.streams, a.stream_prompt_len, a.long_len, min(chunks), warm, tail)
    total = max(a.long_len + 2, a.stream_prompt_len + budget + 1)
    fields = {"max_req_input_len": a.long_len, "max_req_total_len": total, "batch_max_tokens": a.long_len + a.streams,
              "running_max_req_size": a.streams + 1,
              "max_total_token_num": a.streams * (a.stream_prompt_len + budget) + 2 * total}
    modes = [(f"chunked {c}", {"chunked_prefill_size": c}) for c in chunks]
    modes.append(("not chunked", {"disable_chunked_prefill": True}))
    rows = {}
    for label, mode in modes:
        engine = source.engine(**fields, **mode)
        # warm-up: the same shapes once (kernels compile, graphs are captured), then a cold cache
        run_longprompt(engine, a.streams, a.stream_prompt_len, a.long_len, budget, 2, 2, a.seed + 1, a.device)
        engine.flush_cache()
        rows[label] = run_longprompt(engine, a.streams, a.stream_prompt_len, a.long_len, budget, warm, tail, a.seed,
                                     a.device)
        print(f"longprompt, {label}: p99/p50 {rows[label]['ratio']:.2f}", flush=True)
        del engine
        release()
    print(f"\n## longprompt: {a.streams} streams decoding (prompts {a.stream_prompt_len} tokens), then one prompt of "
          f"{a.long_len} tokens; {fields}")
    print("TPOT ms: p50 whole run = every gap once all streams decode (the more prefill steps, the more of them are "
          "prefill gaps); p50 steady = the gaps outside the prefill; in prefill = gaps ending in add -> first token")
    print("| mode | p50 whole run | p50 steady | p50 in prefill | p99 in prefill | p99 / p50 whole | p99 / p50 steady "
          "| long TTFT s | prefill steps |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, r in rows.items():
        print(f"| {label} | {r['tpot_p50_ms']:.2f} | {r['steady_p50_ms']:.2f} | {r['prefill_p50_ms']:.2f} | "
              f"{r['prefill_tpot_p99_ms']:.2f} | {r['ratio']:.2f} | {r['steady_ratio']:.2f} | {r['ttft_s']:.3f} | "
              f"{r['prefill_steps']} |")
    for label, r in rows.items():
        if label != "not chunked":
            verdict = ", ".join(f"{name} {x:.2f} {'met' if x <= 2 else 'NOT met'}"
                                for name, x in (("whole run", r["ratio"]), ("steady", r["steady_ratio"])))
            print(f"{label}: p99 in prefill / p50 (target <= 2x): {verdict}; long TTFT {r['ttft_s']:.3f} s vs "
                  f"{rows['not chunked']['ttft_s']:.3f} s not chunked")
    return {"rows": rows}


BENCHES = {"shared": bench_shared, "multiturn": bench_multiturn, "longprompt": bench_longprompt}


# ---- main ---------------------------------------------------------------------------------------
def int_list(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from lightllm_plugin.config import EngineConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", choices=WORKLOADS + ("all",), default="all")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default=None, help="HF folder or GGUF file (default: the default model)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="random weights (default on cuda: llama8b)")
    ap.add_argument("--data_type", default=None, help="default: bfloat16 on cuda, the engine's auto on cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunked_prefill_size", type=int, default=EngineConfig.chunked_prefill_size,
                    help="for shared and multiturn, and longprompt's default chunk size")
    sizes = ap.add_argument_group("sizes (default: per device, see DEFAULTS)")
    for name, value in DEFAULTS["cpu"].items():
        sizes.add_argument(f"--{name}", type=int, default=None, help=f"cpu {value}, cuda {DEFAULTS['cuda'][name]}")
    ap.add_argument("--chunk_sizes", type=int_list, default=None, help="longprompt: chunk sizes to sweep, e.g. 256,512")
    args = ap.parse_args(argv)
    for name, value in DEFAULTS[args.device].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.device == "cuda" and args.model is None and args.shape is None:
        args.shape = "llama8b"
    if args.model and args.shape:
        ap.error("--model and --shape are exclusive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (a timeout, a job runner) takes Ctrl+C's path, so a server is always stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    command = "python " + " ".join(shlex.quote(x) for x in [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    print(f"command: {command}", flush=True)
    workloads = WORKLOADS if args.workload == "all" else (args.workload,)
    # the server workload last: it takes the random weights off this process's device
    workloads = sorted(workloads, key=lambda w: w == "multiturn")
    t0 = time.perf_counter()
    source = ModelSource(args.device, args.model, args.shape, args.data_type)
    print(f"model: {source.name}, built in {time.perf_counter() - t0:.1f} s", flush=True)
    results = {}
    for w in workloads:
        t0 = time.perf_counter()
        results[w] = BENCHES[w](source, args)
        print(f"({w} took {time.perf_counter() - t0:.0f} s)\n", flush=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"command: {command}")
    print(f"device={device} torch={torch.__version__} model={source.name} data_type={source.data_type} "
          f"seed={args.seed}")
    if "shared" in results:
        r = results["shared"]
        print(f"shared: cache on / off = {r['speedup']:.2f}x req/s, hit ratio {r['hit_ratio']:.3f}")
    if "multiturn" in results:
        print(f"multiturn: TTFT p50 cache off / on = {results['multiturn']['ttft_ratio']:.2f}x")
    if "longprompt" in results:
        for label, r in results["longprompt"]["rows"].items():
            print(f"longprompt {label}: TPOT p99 in prefill / p50 = {r['ratio']:.2f} (whole run), "
                  f"{r['steady_ratio']:.2f} (steady); long TTFT {r['ttft_s']:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
