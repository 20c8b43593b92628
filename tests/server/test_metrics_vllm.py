"""vLLM's metric names, scraped from a live server with Prometheus' own parser, agree with what
the server reports in its responses (usage, cached tokens) and with its own lightllm_* series."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from support.prometheus_scrape import scrape


def served_model(url: str) -> str:
    models = httpx.get(url + "/v1/models", timeout=10).json()["data"]
    assert len(models) == 1
    return models[0]["id"]


def check_vllm_figures(url: str, chat) -> None:
    """Two turns of one conversation through `chat` (a callable taking messages, returning an
    OpenAI chat completion): the vLLM counters grow by exactly what the responses' usage says."""
    model = served_model(url)
    assert httpx.get(url + "/health", timeout=10).status_code == 200  # a gateway's readiness probe
    before = scrape(url)
    assert before["model_name"] == model
    history = [{"role": "system", "content": "You are a terse assistant."},
               {"role": "user", "content": "Name three colours of the rainbow."}]
    first = chat(history)
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And two more?"}]
    second = chat(history)
    usages = [first.usage, second.usage]
    prompt = sum(u.prompt_tokens for u in usages)
    cached = sum(u.prompt_tokens_details.cached_tokens for u in usages)
    generated = sum(u.completion_tokens for u in usages)
    assert second.usage.prompt_tokens_details.cached_tokens > 0  # the second turn reused the first's KV

    deadline = time.monotonic() + 10  # the engine's figures reach the api a moment after the answer
    while True:
        after = scrape(url)
        grew = {k: after[k] - before[k] for k in after if k != "model_name" and k in before}
        idle = after["vllm:num_requests_running"] == 0 and after["vllm:num_requests_waiting"] == 0
        if (grew["vllm:prefix_cache_queries_total"] >= prompt and idle) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert grew["vllm:prefix_cache_queries_total"] == prompt
    assert grew["vllm:prefix_cache_hits_total"] == cached
    assert grew["vllm:time_to_first_token_seconds_count"] == 2
    assert grew["vllm:inter_token_latency_seconds_count"] == generated - 2
    # the same figures as ours, sample for sample
    for ours, theirs in [("lightllm_time_to_first_token_seconds", "vllm:time_to_first_token_seconds"),
                         ("lightllm_inter_token_latency_seconds", "vllm:inter_token_latency_seconds")]:
        for suffix in ("_sum", "_count", "_bucket{le=0.1}", "_bucket{le=+Inf}"):
            assert after[theirs + suffix] == after[ours + suffix], suffix
    assert after["vllm:prefix_cache_hits_total"] == after["lightllm_prefix_cache_hits_total"]
    assert after["vllm:num_requests_running"] == after["lightllm_num_requests_running"] == 0
    assert after["vllm:num_requests_waiting"] == after["lightllm_num_requests_waiting"] == 0
    assert after["vllm:kv_cache_usage_perc"] == pytest.approx(
        after["lightllm_kv_slots_used"] / after["lightllm_kv_slots_total"])


def test_vllm_metrics_match_the_responses_usage(default_server):
    client = openai.OpenAI(base_url=default_server.url + "/v1", api_key="none", max_retries=0)
    model = served_model(default_server.url)

    def chat(messages):
        return client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)

    check_vllm_figures(default_server.url, chat)


def test_a_running_stream_shows_in_num_requests_running_and_kv_usage(default_server):
    body = {"inputs": "Count slowly: one, two,", "parameters": {"max_new_tokens": 24, "ignore_eos": True}}
    with httpx.stream("POST", default_server.url + "/generate_stream", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data:")
        deadline = time.monotonic() + 10
        while True:
            m = scrape(default_server.url)
            if m["vllm:num_requests_running"] == 1 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert m["vllm:num_requests_running"] == 1 == m["lightllm_num_requests_running"]
        assert 0 < m["vllm:kv_cache_usage_perc"] == pytest.approx(m["lightllm_kv_slots_used"] / m["lightllm_kv_slots_total"])
        events = [json.loads(line[5:]) for line in lines if line]
    assert events[-1]["finished"]
