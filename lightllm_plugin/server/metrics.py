"""Prometheus metrics of the api process, rendered in the text exposition format (0.0.4).

Written by hand: the format is a few lines per metric, not worth a dependency. All
updates happen on the api's event loop, so no locking.
"""

from __future__ import annotations

import bisect
import math

PREFIX = "lightllm_"


def _fmt(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)
    return "{" + body + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str):
        self.name = PREFIX + name
        self.help = help_text

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str):
        super().__init__(name, help_text)
        self.values: dict[tuple[tuple[str, str], ...], float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        return self.values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> list[str]:
        values = self.values or {(): 0.0}
        return self.header() + [f"{self.name}{_labels(k)} {_fmt(v)}" for k, v in sorted(values.items())]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name: str, help_text: str):
        super().__init__(name, help_text)
        self.value = 0.0

    def set(self, value: float) -> None:
        self.value = value

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {_fmt(self.value)}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]):
        super().__init__(name, help_text)
        self.bounds = sorted(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def render(self, name: str | None = None, label: str = "") -> list[str]:
        """The exposition lines; `name` and a `label` (`key="value"`) render the same figures as
        another series (the vLLM-named one)."""
        name = name or self.name
        lines = [f"# HELP {name} {self.help}", f"# TYPE {name} {self.kind}"]
        before_le = f"{label}," if label else ""
        labels = f"{{{label}}}" if label else ""
        cumulative = 0
        for bound, n in zip([*self.bounds, math.inf], self.counts):
            cumulative += n
            lines.append(f'{name}_bucket{{{before_le}le="{_fmt(bound)}"}} {cumulative}')
        lines.append(f"{name}_sum{labels} {_fmt(self.sum)}")
        lines.append(f"{name}_count{labels} {self.count}")
        return lines


_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ServerMetrics:
    def __init__(self):
        self.requests_finished = Counter("requests_finished_total", "Finished requests (one per sample), by finish reason.")
        self.requests_rejected = Counter("requests_rejected_total", "Requests refused for bad input, by HTTP status.")
        self.prompt_tokens = Counter("prompt_tokens_total", "Prompt tokens of started requests.")
        self.generation_tokens = Counter("generation_tokens_total", "Generated tokens.")
        self.num_running = Gauge("num_requests_running", "Requests in the running batch.")
        self.num_waiting = Gauge("num_requests_waiting", "Requests queued for admission.")
        self.kv_slots_used = Gauge("kv_slots_used", "KV cache token slots in use.")
        self.kv_slots_total = Gauge("kv_slots_total", "KV cache token slots in the pool.")
        # vLLM's prefix_cache_queries / prefix_cache_hits, in tokens, so a hit rate is hits / queries
        self.prefix_cache_queries = Counter(
            "prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache (admitted requests)."
        )
        self.prefix_cache_hits = Counter(
            "prefix_cache_hits_total", "Prompt tokens read from the prefix cache instead of computed."
        )
        self.kv_slots_cached = Gauge(
            "kv_slots_cached", "KV cache token slots the prefix cache holds (shared by running requests or evictable)."
        )
        self.time_to_first_token = Histogram(
            "time_to_first_token_seconds", "Time from request arrival to its first token.", _TTFT_BUCKETS
        )
        self.inter_token_latency = Histogram(
            "inter_token_latency_seconds", "Time between consecutive tokens of one request.", _ITL_BUCKETS
        )

    def all(self) -> list[_Metric]:
        return [m for m in vars(self).values() if isinstance(m, _Metric)]

    def render(self) -> str:
        lines: list[str] = []
        for metric in self.all():
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"
