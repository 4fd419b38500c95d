"""The engine's serving metrics with vLLM's names (prefix `jinfer:`), in Prometheus text format.

`EngineMetrics` is written by the engine thread only (jinfer.api.async_llm) and rendered by the
server's `/metrics`; a lock keeps a rendering consistent with one step's updates. Token counts
of the prefix cache are in tokens, as vLLM's (the block manager counts blocks).
"""

from __future__ import annotations

import bisect
import math
import threading
from typing import Iterable

PREFIX = "jinfer:"

# vLLM's histogram buckets (vllm/v1/metrics/loggers.py), with finer ITL buckets for a GPU's
# millisecond steps.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
               0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
FINISHED_REASONS = ("stop", "length", "abort", "error")


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{str(v)}"'.replace("\n", " ") for k, v in labels.items())
    return "{" + body + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str):
        self.name, self.help = PREFIX + name, help_text

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name: str, help_text: str):
        super().__init__(name, help_text)
        self.value = 0.0

    def render(self, labels: dict) -> list[str]:
        return self.header() + [f"{self.name}{_labels(labels)} {_number(self.value)}"]


class Counter(_Metric):
    """A counter; `by` names one label whose values are counted apart (e.g. finished_reason)."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, by: str = "", values: Iterable[str] = ()):
        super().__init__(name, help_text)
        self.by = by
        self.values = {v: 0.0 for v in values} if by else {"": 0.0}

    def inc(self, amount: float = 1.0, label: str = "") -> None:
        self.values[label] = self.values.get(label, 0.0) + amount

    @property
    def total(self) -> float:
        return sum(self.values.values())

    def render(self, labels: dict) -> list[str]:
        return self.header() + [
            f"{self.name}_total{_labels({**labels, self.by: v} if self.by else labels)} "
            f"{_number(count)}" for v, count in self.values.items()]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]):
        super().__init__(name, help_text)
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one: above every bucket
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def render(self, labels: dict) -> list[str]:
        lines, cumulative = self.header(), 0
        for bound, count in zip((*self.buckets, math.inf), self.counts):
            cumulative += count
            lines.append(f"{self.name}_bucket{_labels({**labels, 'le': _number(bound)})} "
                         f"{cumulative}")
        lines.append(f"{self.name}_sum{_labels(labels)} {_number(self.sum)}")
        lines.append(f"{self.name}_count{_labels(labels)} {cumulative}")
        return lines


class EngineMetrics:
    """vLLM's serving metrics for one model (`model_name` label on every sample)."""

    def __init__(self, model_name: str):
        self.labels = {"model_name": model_name}
        self.lock = threading.Lock()
        self.num_requests_running = Gauge(
            "num_requests_running", "Number of requests in model execution batches.")
        self.num_requests_waiting = Gauge(
            "num_requests_waiting", "Number of requests waiting to be processed.")
        self.kv_cache_usage_perc = Gauge(
            "kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.prefix_cache_queries = Counter(
            "prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.")
        self.prefix_cache_hits = Counter(
            "prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.")
        self.num_preemptions = Counter("num_preemptions", "Cumulative number of preemptions.")
        self.prompt_tokens = Counter("prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = Counter("generation_tokens",
                                         "Number of generation tokens processed.")
        self.request_success = Counter(
            "request_success", "Count of finished requests by their finish reason.",
            by="finished_reason", values=FINISHED_REASONS)
        self.time_to_first_token = Histogram(
            "time_to_first_token_seconds", "Histogram of time to first token in seconds.",
            TTFT_BUCKETS)
        self.inter_token_latency = Histogram(
            "inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
            ITL_BUCKETS)
        self.e2e_request_latency = Histogram(
            "e2e_request_latency_seconds", "Histogram of end-to-end request latency in seconds.",
            REQUEST_BUCKETS)
        self.request_queue_time = Histogram(
            "request_queue_time_seconds",
            "Histogram of time spent in the WAITING phase before the first schedule.",
            REQUEST_BUCKETS)

    def update_engine_state(self, stats: dict, block_size: int) -> None:
        """Gauges and the prefix-cache and preemption counters from `LLMEngine.stats()`-style
        figures (cumulative counts become counter values)."""
        self.num_requests_running.value = stats["num_running"]
        self.num_requests_waiting.value = stats["num_waiting"]
        total = max(stats["num_total_blocks"], 1)
        self.kv_cache_usage_perc.value = stats["num_used_blocks"] / total
        self.prefix_cache_queries.values[""] = stats["prefix_cache_queried_blocks"] * block_size
        self.prefix_cache_hits.values[""] = stats["prefix_cache_hit_blocks"] * block_size
        self.num_preemptions.values[""] = stats["num_preemptions"]

    def render(self) -> str:
        with self.lock:
            metrics = [value for value in vars(self).values() if isinstance(value, _Metric)]
            lines = [line for metric in metrics for line in metric.render(self.labels)]
        return "\n".join(lines) + "\n"
