"""Our metrics again under vLLM's names, each with a `model_name` label, so that gateways and
autoscalers written for vLLM (llm-d's scheduler, the Gateway API inference extension, KServe,
Ray Serve's LLM dashboards) read this server unchanged. The values are the very same figures as
the `lightllm_*` series beside them, rendered from one ServerMetrics; nothing is counted twice.
"""

from __future__ import annotations

from lightllm_plugin.server.metrics import Counter, Gauge, ServerMetrics, _escape, _fmt

PREFIX = "vllm:"


def _head(name: str, kind: str, help_text: str) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


def _gauge(name: str, help_text: str, value: float, label: str) -> list[str]:
    return _head(name, "gauge", help_text) + [f"{name}{{{label}}} {_fmt(value)}"]


def _counter(name: str, source: Counter, label: str) -> list[str]:
    # vLLM's counters are named without _total; its exposition (prometheus_client's) adds it
    return _head(name + "_total", "counter", source.help) + [
        f"{name}_total{{{label}}} {_fmt(sum(source.values.values()))}"
    ]


def _usage(used: Gauge, total: Gauge) -> float:
    return used.value / total.value if total.value else 0.0


def render_vllm(m: ServerMetrics, model_name: str) -> str:
    label = f'model_name="{_escape(model_name)}"'
    lines = [
        *_gauge(PREFIX + "num_requests_running", m.num_running.help, m.num_running.value, label),
        *_gauge(PREFIX + "num_requests_waiting", m.num_waiting.help, m.num_waiting.value, label),
        *_gauge(PREFIX + "kv_cache_usage_perc", "KV cache usage: used token slots over the pool (1 = 100 percent).",
                _usage(m.kv_slots_used, m.kv_slots_total), label),
        *_counter(PREFIX + "prefix_cache_queries", m.prefix_cache_queries, label),
        *_counter(PREFIX + "prefix_cache_hits", m.prefix_cache_hits, label),
        *m.time_to_first_token.render(PREFIX + "time_to_first_token_seconds", label),
        *m.inter_token_latency.render(PREFIX + "inter_token_latency_seconds", label),
    ]
    return "\n".join(lines) + "\n"
