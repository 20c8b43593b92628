#!/usr/bin/env bash
# One device session: the GPU tests, then the decode-latency, offline-throughput, serving and
# int8 KV benchmarks, each under its own time limit so one failure does not cost the others.
# Logs go to $OUT (or ./gpu_logs); the tables are printed again at the end.
# Usage: benchmarks/run_gpu.sh [tests] [default] [latency] [llama] [qwen] [serving] [int8]
#        [prefix] [chunks] [chat] [structured] [before_after] [moe] [vision] [table]
#        (default: all but structured and table; table is benchmarks/perf_table.py, issue 23's rows)
# before_after times the offline throughput of the tree in $OLD_TREE (installed in $OLD_SITE)
# against this one: a workload without sharing, where the prefix cache may only cost.
# `default` needs the default model's GGUF in $LIGHTLLM_PLUGIN_CACHE (the GPU machine has no network).
set -u
OUT=${OUT:-gpu_logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
parts=${*:-tests default latency llama qwen serving int8 prefix chunks chat before_after moe vision}
run() {  # name, seconds, command...
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $*"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "=== $name: rc=$? in $((SECONDS - t0)) s"
    tail -n 25 "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
for part in $parts; do
    case $part in
        tests) run tests 240 python -m pytest -q -rs tests/gpu -p no:cacheprovider -s -k "not default_model" ;;
        default) run default 200 python -m pytest -q -rs -s tests/gpu -p no:cacheprovider -k default_model ;;
        latency) run latency 170 python benchmarks/decode_latency.py --shape llama3-8b --prompt-len 128 --new-tokens 256 --hf-tokens 32 ;;
        llama) run llama 230 python benchmarks/offline_throughput.py --shape llama3-8b --hf-batch 16 --hf-requests 16 ;;
        qwen) run qwen 200 python benchmarks/offline_throughput.py --shape qwen3-0.6b --hf-batch 32 --hf-requests 32 ;;
        int8) run int8 300 python benchmarks/int8_kv.py --shape llama3-8b ;;
        prefix) run prefix 200 python benchmarks/prefix_cache.py --workload shared --device cuda --shape llama8b ;;
        chunks) run chunks 300 python benchmarks/prefix_cache.py --workload longprompt --device cuda --shape llama8b --chunk_sizes 256,512,1024,2048 ;;
        structured) run structured 150 python benchmarks/structured_output.py --tokenizer "$TOKENIZER_DIR" --repeats 3 ;;
        chat) run chat 240 python benchmarks/prefix_cache.py --workload multiturn --device cuda --shape llama1b ;;
        before_after)
            run before 200 env PYTHONPATH="$OLD_SITE" python "$OLD_TREE/benchmarks/offline_throughput.py" --shape llama3-8b --skip-hf
            run after 200 python benchmarks/offline_throughput.py --shape llama3-8b --skip-hf ;;
        moe) run moe 400 python benchmarks/moe.py --shapes qwen3-30b-a3b,mixtral-8x7b --offline-layers 8 --hf-requests 8 ;;
        table) run table 560 python benchmarks/perf_table.py ;;
        vision) run vision 300 python benchmarks/vision.py --shape qwen2.5-vl-7b --image-size 1024 --text-tokens 64 --batch 16 ;;
        serving) run serving 330 python benchmarks/serving.py --shape qwen3-0.6b --num-requests 256 --rates 8,24,48,inf --repeats 2 --out-json "$OUT/serving_results.json" ;;
    esac
done
echo "=== summary"
grep -h -E '^(command|device|shared|multiturn|longprompt|speedup|hit|TTFT|TPOT|chunk|ceilings|engine|server|offline|overflow|profiled slots|int8 KV greedy|float32: int8|bfloat16: int8|float32 logit gap|\||HF /|[0-9]+ passed|FAILED|SKIPPED|bf16 relative|prompts where|batch-1 graph|encoder|request:)' "$OUT"/*.log
