"""Serving: the real server (HTTP api, tokenizer, router, detokenizer processes) under Poisson
arrivals at several rates, against the offline engine on the same requests, in one run.

    python benchmarks/serving.py --shape qwen3-0.6b --num-requests 256 --rates 4,8,16,32,64,inf

A random-weight model of the shape (bf16 on CUDA, float32 on CPU) is saved with its tokenizer
into a temporary folder. The tokenizer is a word-level one over the model's vocabulary: the word
`w<i>` is token i, so a prompt of n words is exactly n tokens. Each request (seed 0) has a
prompt length and an output length drawn uniformly from --prompt-len and --output-len; it asks
for max_new_tokens = its output length, greedy, ignore_eos, on POST /generate_stream. At each
rate the same requests are sent at Poisson arrival times (inf: all at once, saturation).

Per request: TTFT = send -> first token event; TPOT = (last event - first event) / (tokens - 1).
Every request must get exactly its max_new_tokens tokens. Output tok/s at a rate = tokens
received / (first send -> last token); achieved req/s = requests / that same time, so it includes
the drain after the last arrival. The requests are dealt over --client-procs asyncio processes:
on an H100 one process saturated near 16k tok/s and two near 19k; "busiest client CPU" is the
busiest one's CPU time over the wall time, and near 100% the client, not the server, is the limit.

Then, with the server shut down, the offline EngineCore runs the same requests all at once, in
this process, with the server's KV pool size; the ratio server-at-saturation / offline is the
cost of the multi-process pipeline (target >= 0.90).

Raw results go to --out-json; benchmarks/plot_serving.py turns them into a PNG of latency
against load (run here when matplotlib is importable).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import random
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass

import httpx
import torch
import transformers

from offline_throughput import SHAPES

READY_TIMEOUT_S = 600  # a cold GPU start loads the model, profiles memory and captures CUDA graphs
STOP_TIMEOUT_S = 30
# The last ids of the vocabulary are the tokenizer's special tokens; prompts use the words before.
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


# ---- model folder --------------------------------------------------------------------------
def word_tokenizer(vocab_size: int):
    """A fast tokenizer where the whitespace-separated word `w<i>` is token i."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = vocab_size - len(SPECIAL_TOKENS)
    vocab = {f"w{i}": i for i in range(words)}
    vocab.update({tok: words + k for k, tok in enumerate(SPECIAL_TOKENS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # no post-processor: nothing is added to a prompt, so its length in tokens is its word count
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def prompt_text(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


def write_model_folder(folder: str, shape: str, device: str, dtype: torch.dtype) -> transformers.PretrainedConfig:
    """Random weights of the shape plus the word tokenizer, in a folder the server can load."""
    from lightllm_plugin.models.tokenizer import load_tokenizer

    cfg = SHAPES[shape]()
    v = cfg.vocab_size
    cfg.bos_token_id, cfg.eos_token_id = v - 2, v - 1
    torch.manual_seed(0)
    with torch.device(device):  # random init of a real shape takes ~40 s on a CPU, ~1 s on a GPU
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    model.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # the server profiles free memory for its KV pool
    word_tokenizer(v).save_pretrained(folder)
    loaded = load_tokenizer(folder)  # what the server's tokenizer process will load
    probe = [0, 1, v // 2, v - len(SPECIAL_TOKENS) - 1]
    got = loaded.encode(prompt_text(probe), add_special_tokens=True)
    if got != probe or len(loaded) != v:
        raise RuntimeError(f"word tokenizer does not round-trip: {probe} -> {got}, {len(loaded)} tokens for vocab {v}")
    return cfg


# ---- workload ------------------------------------------------------------------------------
@dataclass
class Request:
    index: int
    prompt_ids: list[int]
    output_len: int


def make_workload(n: int, prompt_range: tuple[int, int], output_range: tuple[int, int], vocab_words: int,
                  seed: int) -> list[Request]:
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        p, o = rng.randint(*prompt_range), rng.randint(*output_range)
        reqs.append(Request(i, [rng.randrange(vocab_words) for _ in range(p)], o))
    return reqs


def arrival_times(n: int, rate: float, seed: int) -> list[float]:
    """Seconds after the start at which each request is sent: a Poisson process of the rate."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(f"{seed}-{rate}")
    t, times = 0.0, []
    for _ in range(n):
        times.append(t)
        t += rng.expovariate(rate)
    return times


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# ---- server ----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m lightllm_plugin.server` in its own process group; stop() always leaves none of it."""

    def __init__(self, flags: list[str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "lightllm_plugin.server", "--host", "127.0.0.1", "--port", str(self.port), *flags]
        self.lines: list[str] = []
        self._ready = threading.Event()
        # its own session: a Ctrl+C here reaches only us, and we stop it in order
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                     start_new_session=True)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if f"Uvicorn running on {self.url}" in line:
                self._ready.set()

    def log_tail(self, n: int = 40) -> str:
        return "".join(self.lines[-n:])

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self._ready.wait(0.5):
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before it was ready:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready after {READY_TIMEOUT_S} s:\n{self.log_tail()}")

    def kv_slots(self) -> int | None:
        for line in self.lines:
            m = re.search(r"(\d+) KV token slots", line)
            if m:
                return int(m.group(1))
        return None

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                print(f"server ignored SIGINT for {STOP_TIMEOUT_S} s; killing it", file=sys.stderr)
        # whatever is left of the group we started (pgid = the launcher's pid)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        return self.proc.returncode


# ---- client ----------------------------------------------------------------------------------
@dataclass
class Result:
    index: int
    prompt_len: int
    output_len: int
    send_s: float = float("nan")  # since the start of the rate's run
    ttft_s: float = float("nan")
    tpot_s: float = float("nan")
    end_s: float = float("nan")
    tokens: int = 0
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None


async def send_one(client: httpx.AsyncClient, req: Request, start: float, at: float) -> Result:
    res = Result(req.index, len(req.prompt_ids), req.output_len)
    await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
    body = {"inputs": prompt_text(req.prompt_ids),
            "parameters": {"do_sample": False, "max_new_tokens": req.output_len, "ignore_eos": True}}
    sent = time.perf_counter()
    res.send_s = sent - start
    first = last = None
    try:
        async with client.stream("POST", "/generate_stream", json=body) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:300]}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                now = time.perf_counter()
                event = json.loads(line[len("data:"):])
                first = first if first is not None else now
                last = now
                res.tokens += 1
                res.prompt_tokens = event["token"]["prompt_tokens"]
                if event["finished"]:
                    res.finish_reason = event["finish_reason"]
    except httpx.HTTPError as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    if first is not None:
        res.ttft_s = first - sent
        res.end_s = last - start
        if res.tokens > 1:
            res.tpot_s = (last - first) / (res.tokens - 1)
    if res.error is None:
        if res.tokens != req.output_len or res.finish_reason != "length":
            res.error = f"got {res.tokens} tokens (finish_reason {res.finish_reason}), asked for {req.output_len}"
        elif res.prompt_tokens != len(req.prompt_ids):
            res.error = f"server counted {res.prompt_tokens} prompt tokens, sent {len(req.prompt_ids)}"
    return res


async def send_all(url: str, reqs: list[Request], times: list[float], start: float) -> list[Result]:
    # no connection cap: httpx's default of 100 would hold back requests the server should see
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(connect=30.0, read=300.0, write=30.0, pool=None)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        return await asyncio.gather(*(send_one(client, r, start, t) for r, t in zip(reqs, times)))


def client_worker(url: str, reqs: list[Request], times: list[float], start_epoch: float) -> tuple[list[Result], float]:
    """One client process's share: its results and the CPU seconds it spent.

    The start is given as wall-clock time, the one clock every process agrees on; the
    schedule itself runs on perf_counter."""
    cpu0 = time.process_time()
    start = time.perf_counter() + (start_epoch - time.time())
    results = asyncio.run(send_all(url, reqs, times, start))
    return results, time.process_time() - cpu0


def ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the pool; no traceback per worker


def run_load(pool, procs: int, url: str, reqs: list[Request], rate: float, seed: int) -> tuple[list[Result], float]:
    """All requests at their Poisson times, dealt round-robin over the client processes (one
    asyncio process tops out near a server's saturation rate); the results and the busiest
    client process's CPU seconds. The prefix cache is emptied first: every run sends the same
    requests, and a run must not read the previous one's prompts from the cache."""
    httpx.post(url + "/flush_cache", timeout=60).raise_for_status()
    times = arrival_times(len(reqs), rate, seed)
    start_epoch = time.time() + 0.5  # time for every worker to receive its share
    shares = [(url, reqs[k::procs], times[k::procs], start_epoch) for k in range(procs)]
    outs = pool.starmap(client_worker, shares, chunksize=1)
    results = sorted((r for rs, _ in outs for r in rs), key=lambda r: r.index)
    return results, max(cpu for _, cpu in outs)


def summarize(rate: float, results: list[Result], client_cpu_s: float) -> dict:
    ok = [r for r in results if r.error is None]
    wall = max((r.end_s for r in results if not math.isnan(r.end_s)), default=float("nan"))
    tokens = sum(r.tokens for r in results)
    ttft = [r.ttft_s * 1e3 for r in ok]
    tpot = [r.tpot_s * 1e3 for r in ok if not math.isnan(r.tpot_s)]
    return {
        "rate": f"{rate:g}",  # a string: JSON has no inf
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "wall_s": wall,
        "achieved_rps": len(ok) / wall,
        "output_tok_s": tokens / wall,
        # near 1.0 the client, not the server, would be what limits the load
        "client_cpu_share": client_cpu_s / wall,
        "ttft_ms": {"p50": percentile(ttft, 50), "p99": percentile(ttft, 99)},
        "tpot_ms": {"p50": percentile(tpot, 50), "p99": percentile(tpot, 99)},
        "requests": [asdict(r) for r in results],
    }


# ---- offline engine --------------------------------------------------------------------------
def run_offline(folder: str, engine_kw: dict, reqs: list[Request], warm: list[Request], repeats: int) -> dict:
    """The requests all at once, `repeats` times on one engine after a warm-up."""
    from lightllm_plugin.config import EngineConfig
    from lightllm_plugin.engine.core import EngineCore
    from lightllm_plugin.sampling_params import SamplingParams

    engine = EngineCore(EngineConfig(model_dir=folder, **engine_kw), progress=False, with_tokenizer=False)
    cuda = engine_kw["device"] == "cuda"
    expected = sum(r.output_len for r in reqs)
    runs = []
    for batch in [warm] + [reqs] * repeats:
        engine.flush_cache()  # the same requests each time: none may hit the previous run's
        for r in batch:
            engine.add_request(engine.new_request_id(), r.prompt_ids,
                               SamplingParams(temperature=0, max_new_tokens=r.output_len, ignore_eos=True))
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        produced = 0
        while engine.has_unfinished():
            produced += len(engine.step())
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        if batch is reqs:
            if produced != expected:
                raise RuntimeError(f"offline engine produced {produced} tokens, expected {expected}")
            runs.append(produced / wall)
    return {"kv_slots": engine.total_slots, "output_tok_s_runs": runs, "output_tok_s": statistics.median(runs)}


# ---- main ------------------------------------------------------------------------------------
def int_range(text: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in text.split(","))
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected LO,HI with 1 <= LO <= HI, got {text!r}")
    return lo, hi


def rate_list(text: str) -> list[float]:
    rates = [float(x) for x in text.split(",")]
    if any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError("rates must be > 0 (inf: all at once)")
    return rates


def out_path(name: str) -> str:
    """Relative paths land in $OUT when it is set (the GPU machine's result folder)."""
    return os.path.join(os.environ["OUT"], name) if os.environ.get("OUT") and not os.path.isabs(name) else name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-0.6b")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--rates", type=rate_list, default=rate_list("4,8,16,32,64,inf"), help="req/s, comma-separated")
    ap.add_argument("--prompt-len", type=int_range, default=(64, 512), help="LO,HI tokens, uniform")
    ap.add_argument("--output-len", type=int_range, default=(64, 512), help="LO,HI tokens, uniform")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup-requests", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-req-total-len", type=int, default=None, help="default: longest prompt + longest output")
    ap.add_argument("--batch-max-tokens", type=int, default=8192)
    ap.add_argument("--running-max-req-size", type=int, default=256)
    ap.add_argument("--max-total-token-num", type=int, default=None, help="KV slots (default: the server profiles memory)")
    ap.add_argument("--mem-fraction", type=float, default=0.9)
    ap.add_argument("--tokenizer-workers", type=int, default=1)
    ap.add_argument("--client-procs", type=int, default=min(8, os.cpu_count() or 1), help="processes sending the requests")
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs of the saturation rate and of the offline engine; their medians make the ratio")
    ap.add_argument("--skip-offline", action="store_true")
    ap.add_argument("--rate-requests", type=int, default=None,
                    help="send only the first N requests at each finite rate (low-load latency without a long run)")
    ap.add_argument("--out-json", default="serving_results.json")
    ap.add_argument("--out-png", default="serving_latency.png")
    args = ap.parse_args()
    if args.repeats < 1 or args.client_procs < 1:
        ap.error("--repeats and --client-procs must be >= 1")

    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    vocab_words = SHAPES[args.shape]().vocab_size - len(SPECIAL_TOKENS)
    reqs = make_workload(args.num_requests, args.prompt_len, args.output_len, vocab_words, args.seed)
    warm = make_workload(args.warmup_requests, args.prompt_len, (8, 16), vocab_words, args.seed + 1)
    max_total_len = args.max_req_total_len or args.prompt_len[1] + args.output_len[1]
    engine_kw = dict(device=args.device, data_type="bfloat16" if cuda else "float32", max_req_total_len=max_total_len,
                     max_req_input_len=args.prompt_len[1], batch_max_tokens=max(args.batch_max_tokens, args.prompt_len[1]),
                     running_max_req_size=args.running_max_req_size, max_total_token_num=args.max_total_token_num,
                     mem_fraction=args.mem_fraction)
    # SIGTERM (timeout, a job runner) takes the same path as Ctrl+C, so the server is always stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    rows: list[dict] = []
    # forked now, while this process has no threads and no CUDA context; idle until the server is up
    client_pool = multiprocessing.get_context("fork").Pool(args.client_procs, initializer=ignore_sigint)
    with client_pool as pool, tempfile.TemporaryDirectory(prefix="serving-bench-") as folder:
        t0 = time.perf_counter()
        write_model_folder(folder, args.shape, args.device, dtype)
        print(f"model folder written in {time.perf_counter() - t0:.1f} s", flush=True)
        flags = ["--model_dir", folder, "--tokenizer_workers", str(args.tokenizer_workers)]
        for key, value in engine_kw.items():
            if value is not None:
                flags += [f"--{key}", str(value)]
        server = Server(flags)
        try:
            t0 = time.perf_counter()
            server.wait_ready()
            slots = server.kv_slots()
            print(f"server ready in {time.perf_counter() - t0:.1f} s, {slots} KV slots", flush=True)
            warm_results, _ = run_load(pool, args.client_procs, server.url, warm, math.inf, args.seed)
            bad = [r.error for r in warm_results if r.error]
            if bad:
                raise RuntimeError(f"warm-up requests failed: {bad[:3]}\n{server.log_tail()}")
            for rate in args.rates:
                sent = reqs if math.isinf(rate) or args.rate_requests is None else reqs[: args.rate_requests]
                row = summarize(rate, *run_load(pool, args.client_procs, server.url, sent, rate, args.seed))
                rows.append(row)
                print(f"rate {row['rate']}: {row['output_tok_s']:.0f} out tok/s, {row['failed']} failed", flush=True)
            # a run of a few seconds varies by several percent: the ratio compares medians
            saturation_rate = max(args.rates)
            repeats = [summarize(saturation_rate, *run_load(pool, args.client_procs, server.url, reqs, saturation_rate,
                                                            args.seed)) for _ in range(args.repeats - 1)]
        finally:
            code = server.stop()
        print(f"server stopped (exit code {code})", flush=True)
        offline = None
        if not args.skip_offline:
            offline = run_offline(folder, {**engine_kw, "max_total_token_num": slots}, reqs, warm, args.repeats)

    device = torch.cuda.get_device_name() if cuda else "cpu"
    saturation_runs = [row["output_tok_s"] for row in rows if float(row["rate"]) == saturation_rate]
    saturation_runs += [row["output_tok_s"] for row in repeats]
    saturation_tok_s = statistics.median(saturation_runs)
    ratio = saturation_tok_s / offline["output_tok_s"] if offline else float("nan")
    failures = [(row["rate"], r) for row in rows + repeats for r in row["requests"] if r["error"]]

    print(f"command: {command}")
    print(f"device={device} dtype={dtype} shape={args.shape} requests={args.num_requests} seed={args.seed} "
          f"prompt=U[{args.prompt_len[0]},{args.prompt_len[1]}] output=U[{args.output_len[0]},{args.output_len[1]}] "
          f"prompt_tokens={sum(len(r.prompt_ids) for r in reqs)} output_tokens={sum(r.output_len for r in reqs)}")
    print(f"server: {slots} KV slots, max_req_total_len={max_total_len}, batch_max_tokens={engine_kw['batch_max_tokens']}, "
          f"running_max_req_size={args.running_max_req_size}, tokenizer_workers={args.tokenizer_workers}")
    print("| rate req/s | achieved req/s | out tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms | wall s "
          "| busiest client CPU | failed |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['rate']} | {row['achieved_rps']:.2f} | {row['output_tok_s']:.1f} | {row['ttft_ms']['p50']:.1f} | "
              f"{row['ttft_ms']['p99']:.1f} | {row['tpot_ms']['p50']:.2f} | {row['tpot_ms']['p99']:.2f} | "
              f"{row['wall_s']:.2f} | {row['client_cpu_share']:.0%} | {row['failed']} |")
    listed = lambda xs: ", ".join(f"{x:.1f}" for x in xs)  # noqa: E731
    print(f"server at rate {saturation_rate:g}, {len(saturation_runs)} runs: {listed(saturation_runs)} out tok/s")
    if offline:
        print(f"offline engine, same requests all at once, {offline['kv_slots']} KV slots, {len(offline['output_tok_s_runs'])} "
              f"runs: {listed(offline['output_tok_s_runs'])} out tok/s")
        verdict = "met" if ratio >= 0.90 else "NOT met"
        print(f"server at saturation / offline, medians: {saturation_tok_s:.1f} / {offline['output_tok_s']:.1f} = "
              f"{ratio:.3f} (target >= 0.90: {verdict})")

    json_path, png_path = out_path(args.out_json), out_path(args.out_png)
    with open(json_path, "w") as f:
        json.dump({"command": command, "device": device, "dtype": str(dtype), "kv_slots": slots,
                   "args": {**vars(args), "rates": [f"{r:g}" for r in args.rates]}, "rates": rows,
                   "saturation_repeats": repeats, "saturation_output_tok_s_runs": saturation_runs,
                   "offline": offline, "saturation_over_offline": ratio}, f, indent=1)
    print(f"raw results: {json_path}")
    plot_cmd = f"python {os.path.join(os.path.dirname(__file__), 'plot_serving.py')} {json_path} --out {png_path}"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"matplotlib is not installed; plot with: {plot_cmd}")
    else:
        from plot_serving import plot

        plot(json_path, png_path)
        print(f"plot: {png_path}")

    if failures:
        print(f"FAILED: {len(failures)} requests did not complete as asked; first ones:", file=sys.stderr)
        for rate, r in failures[:10]:
            print(f"  rate {rate} request {r['index']}: {r['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
