"""Every row of the GPU performance table in one run, the table printed last.

    python benchmarks/perf_table.py [--parts decode_llama,decode_qwen,offline_llama,offline_1000,serving,int8]
                                    [--budget-s 560] [--hf]

Each part is one benchmark script of this folder run in its own process under its own time
limit (a part whose limit no longer fits the budget is skipped and says so); its full output
goes to $OUT/<part>.log (or ./gpu_logs). The table quotes each script's own numbers, every
ratio measured against ceilings measured in that script's run; the exact commands are printed
above it. --hf adds HF transformers' generate to the decode and offline parts (slower).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# part -> (seconds allowed, script and arguments, arguments added with --hf)
PARTS = {
    "decode_llama": (150, ["decode_latency.py", "--shape", "llama3-8b", "--prompt-len", "128", "--new-tokens", "256",
                           "--repeats", "3"], ["--hf-tokens", "32"]),
    "decode_qwen": (110, ["decode_latency.py", "--shape", "qwen3-0.6b", "--prompt-len", "128", "--new-tokens", "256",
                          "--repeats", "3"], ["--hf-tokens", "32"]),
    "offline_llama": (160, ["offline_throughput.py", "--shape", "llama3-8b"], ["--hf-batch", "16", "--hf-requests", "16"]),
    "offline_1000": (160, ["offline_throughput.py", "--shape", "llama3-8b", "--num-requests", "1000",
                           "--min-len", "256", "--max-len", "256"], ["--hf-batch", "64", "--hf-requests", "64"]),
    # a lever, not a row of the issue's table: the same workload with four times the running requests
    "offline_1000_r1024": (160, ["offline_throughput.py", "--shape", "llama3-8b", "--num-requests", "1000",
                                 "--min-len", "256", "--max-len", "256", "--engine", "running_max_req_size=1024"],
                           ["--hf-batch", "64", "--hf-requests", "64"]),
    "serving": (220, ["serving.py", "--shape", "qwen3-0.6b", "--num-requests", "512", "--rates", "4,inf",
                      "--rate-requests", "48", "--repeats", "2", "--out-json", "serving_results.json"], []),
    "int8": (200, ["int8_kv.py", "--shape", "llama3-8b", "--skip-overflow", "--decode-tokens", "128"], []),
}


def run_part(name: str, limit: float, args: list[str], out_dir: str) -> str:
    cmd = [sys.executable, os.path.join(HERE, args[0]), *args[1:]]
    print(f"=== {name}: {' '.join(cmd[1:])} (limit {limit:.0f} s)", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, cwd=out_dir)
        text, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        text += f"\nTIMEOUT after {limit:.0f} s"
        rc = "timeout"
    with open(os.path.join(out_dir, f"{name}.log"), "w") as f:
        f.write(text)
    print(f"=== {name}: rc={rc} in {time.perf_counter() - t0:.0f} s", flush=True)
    return text


def grab(pattern: str, text: str, group: int = 1) -> float | None:
    m = re.search(pattern, text, re.M)
    return float(m.group(group).replace(",", "")) if m else None


def fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def table(logs: dict[str, str]) -> list[str]:
    rows = []
    t = logs.get("decode_llama", "")
    ms = grab(r"^\| engine \(CUDA graphs\) \| ([\d.]+) \| [\d.]+ \| ([\d.]+) \|", t)
    ratio = grab(r"^\| engine \(CUDA graphs\) \| [\d.]+ \| [\d.]+ \| ([\d.]+) \|", t)
    replay = grab(r"\(([\d.]+)x the floor without embedding\)", t)
    host = grab(r"host and sampling between steps: ([-\d.]+) ms", t)
    idle = grab(r"GPU idle between steps: ([-\d.]+) ms", t)
    rows.append(f"| Llama-3-8B shape, batch-1 decode, ms/token / floor (non-embedding weights over copy bandwidth) | "
                f"{fmt(ms, '.2f')} ms, {fmt(ratio, '.2f')}x (graph replay alone {fmt(replay, '.2f')}x; ms/token less "
                f"replay {fmt(host, '.2f')} ms, of it GPU idle {fmt(idle, '.2f')} ms) | <= 1.10x |")
    t = logs.get("decode_qwen", "")
    ms = grab(r"^\| engine \(CUDA graphs\) \| ([\d.]+) \|", t)
    ratio = grab(r"^\| engine \(CUDA graphs\) \| [\d.]+ \| ([\d.]+) \|", t)
    rows.append(f"| Qwen3-0.6B shape, batch-1 decode | {fmt(ms, '.2f')} ms/token, {fmt(ratio, '.1f')}x its floor | "
                f"<= 0.80 ms |")
    for part, what in (("offline_llama", "U[100,1024] x 256 requests"), ("offline_1000", "1,000 x 256/256"),
                       ("offline_1000_r1024", "1,000 x 256/256, --running_max_req_size 1024")):
        if part not in logs and part == "offline_1000_r1024":
            continue
        t = logs.get(part, "")
        tps = grab(r"^\| engine \| ([\d.]+) \|", t)
        share = grab(r"^\| engine \| [\d.]+ \| [\d.]+ \| [\w.]+ \| ([\d.]+)% \|", t)
        rows.append(f"| offline throughput, Llama-3-8B shape, {what} | {fmt(tps, ',.0f')} out tok/s, "
                    f"{fmt(share, '.1f')}% of its floor | >= 75% of the floor |")
    t = logs.get("serving", "")
    ttft = grab(r"^\| 4 \| [\d.]+ \| [\d.]+ \| ([\d.]+) \|", t)
    ratio = grab(r"server at saturation / offline, medians: [\d.]+ / [\d.]+ = ([\d.]+)", t)
    rows.append(f"| server TTFT p50 at low load (4 req/s), Qwen3-0.6B shape, U[64,512]-token prompts | "
                f"{fmt(ttft, '.1f')} ms | <= 12 ms |")
    rows.append(f"| server at saturation / offline engine | {fmt(ratio, '.3f')} | >= 0.95 |")
    t = logs.get("int8", "")
    ratio = grab(r"^\| decode tok/s at batch \d+ [^|]*\| \d+ \| \d+ \| ([\d.]+) \|", t)
    floors = re.search(r"^\| decode step time / bandwidth floor \| ([\d.]+) \| ([\d.]+) \|", t, re.M)
    fl = f" (step at {floors.group(2)}x its floor, bf16 {floors.group(1)}x)" if floors else ""
    rows.append(f"| int8 KV decode at batch 64 / bf16 KV decode | {fmt(ratio, '.3f')}{fl} | >= 0.95 |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default=",".join(p for p in PARTS if p != "offline_1000_r1024"))
    ap.add_argument("--budget-s", type=float, default=560.0, help="skip parts whose limit would pass this")
    ap.add_argument("--hf", action="store_true", help="also time HF transformers in the decode and offline parts")
    args = ap.parse_args()
    out_dir = os.environ.get("OUT") or os.path.abspath("gpu_logs")
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    logs: dict[str, str] = {}
    commands = []
    for name in args.parts.split(","):
        limit, cmd, hf = PARTS[name]
        cmd = cmd + (hf if args.hf else (["--skip-hf"] if cmd[0] == "offline_throughput.py" else
                                         ["--hf-tokens", "0"] if cmd[0] == "decode_latency.py" else []))
        left = args.budget_s - (time.perf_counter() - t0)
        if left < 45:
            print(f"=== {name}: skipped, {left:.0f} s of the budget left")
            continue
        logs[name] = run_part(name, min(limit, left), cmd, out_dir)
        commands.append(f"python benchmarks/{' '.join(cmd)}")
    for text in logs.values():
        m = re.search(r"device[=:] ?(NVIDIA[^,]*?)(?:,| torch| dtype)", text)
        if m:
            print(f"device: {m.group(1).strip()}")
            break
    print("commands:")
    for c in commands:
        print(f"  {c}")
    print("| what | now | target |")
    print("| --- | --- | --- |")
    for row in table(logs):
        print(row)


if __name__ == "__main__":
    main()
