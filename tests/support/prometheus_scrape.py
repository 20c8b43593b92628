"""Scraping /metrics the way Prometheus does: through prometheus_client's own text parser."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

VLLM_FAMILIES = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
}


def scrape(url: str) -> dict[str, float]:
    return parse(httpx.get(url + "/metrics", timeout=10).text)


def parse(text: str) -> dict:
    """Every sample as 'name{label=value,...}' -> value, through prometheus_client's parser (and
    'model_name' -> the vLLM series' label); checks each vLLM family's type and that its
    samples carry model_name."""
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name in VLLM_FAMILIES:
            assert family.type == VLLM_FAMILIES[family.name], family
            assert family.samples and all("model_name" in s.labels for s in family.samples), family
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            samples[s.name + (f"{{{labels}}}" if labels else "")] = s.value
            if "model_name" in s.labels:
                samples["model_name"] = s.labels["model_name"]
    assert VLLM_FAMILIES.keys() <= {f.name for f in text_string_to_metric_families(text)}
    return samples
