"""Prometheus metrics of the service, all named ``kvservice_*``.

One ``Metrics`` object per coordinator, on its own registry (so tests can build many).
Counters and histograms are updated as calls happen; usage and live sequences are read
from the coordinator at scrape time, so they are never stale and cost nothing between
scrapes. Exported names (the deploy files and dashboards refer to these):

    kvservice_blocks{worker,tier,state}            gauge: blocks per state (total|used|cached|free)
    kvservice_usage_ratio{worker,tier}             gauge: used / total
    kvservice_sequences_live                       gauge: sequences currently allocated
    kvservice_sequences_created_total              counter
    kvservice_prefix_cache_queries_total           counter: prompts looked up (sequences created)
    kvservice_prefix_cache_hits_total              counter: of those, prompts with a cached prefix
    kvservice_prefix_cache_query_tokens_total      counter: prompt tokens looked up
    kvservice_prefix_cache_hit_tokens_total        counter: prompt tokens found cached
    kvservice_swaps_total{direction}               counter: swap commands, direction = out|in
    kvservice_swap_blocks_total{direction}         counter: blocks moved
    kvservice_swap_bytes_total{direction}          counter: bytes moved
    kvservice_cow_blocks_total                     counter: blocks copied on write
    kvservice_attention_read_bytes_total{tier}     counter: K/V bytes that attention over long
                                                   (multi-segment) sequences read, tier = hot|cold
    kvservice_long_sequences                       gauge: sequences held as several segments
    kvservice_long_sequence_bytes{tier}            gauge: their blocks' bytes, tier = hot|cold
    kvservice_tiered_stream_seconds_total          counter: worker device time streaming cold
                                                   blocks for attention (counted at stats())
    kvservice_rpc_latency_seconds{method}          histogram: service call latency
    kvservice_rpc_errors_total{method,code}        counter: failed calls by status code name
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

DEFAULT_METRICS_PORT = 9108

_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)
_TIER_NAMES = {0: "gpu", 1: "cpu"}

# A snapshot the coordinator gives at scrape time:
#   {"usage": {worker_id: {tier_name: {"total": n, "used": n, "cached": n, "free": n}}},
#    "sequences_live": n, "long_sequences": {"count": n, "bytes": {"hot": n, "cold": n}}}
Snapshot = Mapping[str, Any]


class _SnapshotCollector(Collector):
    def __init__(self, source: Callable[[], Snapshot]) -> None:
        self._source = source

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            snap = self._source()
        except Exception:  # a scrape must never take the server down
            log.exception("metrics snapshot failed")
            return
        blocks = GaugeMetricFamily(
            "kvservice_blocks", "KV blocks per worker, tier and state", labels=["worker", "tier", "state"]
        )
        ratio = GaugeMetricFamily(
            "kvservice_usage_ratio", "Used blocks / total blocks", labels=["worker", "tier"]
        )
        for worker_id, tiers in sorted(snap.get("usage", {}).items()):
            for tier, counts in tiers.items():
                tier_name = _TIER_NAMES.get(tier, str(tier))
                for state in ("total", "used", "cached", "free"):
                    blocks.add_metric([str(worker_id), tier_name, state], counts.get(state, 0))
                total = counts.get("total", 0)
                ratio.add_metric(
                    [str(worker_id), tier_name], counts.get("used", 0) / total if total else 0.0
                )
        yield blocks
        yield ratio
        live = GaugeMetricFamily("kvservice_sequences_live", "Sequences currently allocated")
        live.add_metric([], snap.get("sequences_live", 0))
        yield live
        long_seqs = snap.get("long_sequences", {})
        count = GaugeMetricFamily("kvservice_long_sequences", "Sequences held as several segments")
        count.add_metric([], long_seqs.get("count", 0))
        yield count
        held = GaugeMetricFamily(
            "kvservice_long_sequence_bytes", "Bytes of long sequences per tier", labels=["tier"]
        )
        for tier in ("hot", "cold"):
            held.add_metric([tier], long_seqs.get("bytes", {}).get(tier, 0))
        yield held


class Metrics:
    """The service's metrics on one registry; ``bind`` attaches the scrape-time snapshot."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.sequences_created = Counter(
            "kvservice_sequences_created", "Sequences created", registry=r
        )
        self.prefix_queries = Counter(
            "kvservice_prefix_cache_queries", "Prompts looked up in the prefix cache", registry=r
        )
        self.prefix_hits = Counter(
            "kvservice_prefix_cache_hits", "Prompts that found a cached prefix", registry=r
        )
        self.prefix_query_tokens = Counter(
            "kvservice_prefix_cache_query_tokens", "Prompt tokens looked up", registry=r
        )
        self.prefix_hit_tokens = Counter(
            "kvservice_prefix_cache_hit_tokens", "Prompt tokens found cached", registry=r
        )
        self.swaps = Counter(
            "kvservice_swaps", "Swap commands sent to workers", ["direction"], registry=r
        )
        self.swap_blocks = Counter(
            "kvservice_swap_blocks", "Blocks swapped", ["direction"], registry=r
        )
        self.swap_bytes = Counter(
            "kvservice_swap_bytes", "Bytes swapped", ["direction"], registry=r
        )
        self.cow_blocks = Counter(
            "kvservice_cow_blocks", "Blocks copied on write", registry=r
        )
        self.rpc_latency = Histogram(
            "kvservice_rpc_latency_seconds",
            "Service call latency",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.attention_read_bytes = Counter(
            "kvservice_attention_read_bytes",
            "K/V bytes read by attention over long sequences",
            ["tier"],
            registry=r,
        )
        self.tiered_stream_seconds = Counter(
            "kvservice_tiered_stream_seconds",
            "Worker device time streaming cold blocks for attention",
            registry=r,
        )
        self._stream_seen: dict[int, float] = {}
        self.rpc_errors = Counter(
            "kvservice_rpc_errors", "Failed service calls", ["method", "code"], registry=r
        )
        for direction in ("out", "in"):  # so dashboards see zeros, not gaps
            self.swaps.labels(direction)
            self.swap_blocks.labels(direction)
            self.swap_bytes.labels(direction)
        for tier in ("hot", "cold"):
            self.attention_read_bytes.labels(tier)
        self._collector: _SnapshotCollector | None = None
        # Plain totals beside the Prometheus counters, for ``stats()`` (JSON).
        self.totals: dict[str, int] = dict.fromkeys(
            (
                "sequences_created", "prefix_queries", "prefix_hits", "prefix_query_tokens",
                "prefix_hit_tokens", "swaps_out", "swaps_in", "swap_blocks_out",
                "swap_blocks_in", "swap_bytes_out", "swap_bytes_in", "cow_blocks",
                "attention_read_bytes_hot", "attention_read_bytes_cold",
            ),
            0,
        )  # fmt: skip

    def bind(self, source: Callable[[], Snapshot]) -> None:
        """Read usage and live sequences from ``source`` at every scrape."""
        if self._collector is not None:
            self.registry.unregister(self._collector)
        self._collector = _SnapshotCollector(source)
        self.registry.register(self._collector)

    @contextmanager
    def time_call(self, method: str) -> Iterator[None]:
        """Observe one call's latency; a raised error is counted by its class name."""
        start = time.perf_counter()
        try:
            yield
        except Exception as exc:
            self.rpc_errors.labels(method, error_code(exc)).inc()
            raise
        finally:
            self.rpc_latency.labels(method).observe(time.perf_counter() - start)

    def count_created(self, num_tokens: int, num_hit_tokens: int) -> None:
        """A sequence was created: one prefix-cache query of ``num_tokens`` prompt tokens."""
        t = self.totals
        self.sequences_created.inc()
        self.prefix_queries.inc()
        self.prefix_query_tokens.inc(num_tokens)
        t["sequences_created"] += 1
        t["prefix_queries"] += 1
        t["prefix_query_tokens"] += num_tokens
        if num_hit_tokens > 0:
            self.prefix_hits.inc()
            self.prefix_hit_tokens.inc(num_hit_tokens)
            t["prefix_hits"] += 1
            t["prefix_hit_tokens"] += num_hit_tokens

    def count_swap(self, direction: str, num_blocks: int, block_bytes: int) -> None:
        t = self.totals
        self.swaps.labels(direction).inc()
        self.swap_blocks.labels(direction).inc(num_blocks)
        self.swap_bytes.labels(direction).inc(num_blocks * block_bytes)
        t[f"swaps_{direction}"] += 1
        t[f"swap_blocks_{direction}"] += num_blocks
        t[f"swap_bytes_{direction}"] += num_blocks * block_bytes

    def count_cow(self, num_blocks: int) -> None:
        self.cow_blocks.inc(num_blocks)
        self.totals["cow_blocks"] += num_blocks

    def count_attention_reads(self, hot_bytes: int, cold_bytes: int) -> None:
        self.attention_read_bytes.labels("hot").inc(hot_bytes)
        self.attention_read_bytes.labels("cold").inc(cold_bytes)
        self.totals["attention_read_bytes_hot"] += hot_bytes
        self.totals["attention_read_bytes_cold"] += cold_bytes

    def observe_stream_seconds(self, worker_id: int, seconds: float) -> None:
        """A worker's running total of streaming time (from its stats): count the growth."""
        last = self._stream_seen.get(worker_id, 0.0)
        grown = seconds - last if seconds >= last else seconds  # a restarted worker
        self._stream_seen[worker_id] = seconds
        if grown > 0:
            self.tiered_stream_seconds.inc(grown)

    def render(self) -> bytes:
        """The text exposition of every metric (what the HTTP endpoint serves)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def error_code(exc: BaseException) -> str:
    """A status-code name for an error: NOT_FOUND, RESOURCE_EXHAUSTED, ..., or INTERNAL.

    The names come from the one error table in ``kvservice.status``.
    """
    from kvservice.status import status_code

    return status_code(exc).name


def start_metrics_server(metrics: Metrics, port: int = DEFAULT_METRICS_PORT, addr: str = "0.0.0.0"):
    """Serve ``/metrics`` over HTTP on a daemon thread; returns the server (``.server_port``)."""
    result = start_http_server(port, addr=addr, registry=metrics.registry)
    server = result[0] if isinstance(result, tuple) else result
    log.info("metrics on http://%s:%d/metrics", addr, server.server_port)
    return server
