"""
Metrics in the Prometheus text format, and a health check, over HTTP.

The broker keeps plain integer counters on its objects (the hot path pays an
addition, nothing more); a collector reads them when Prometheus scrapes.

    twistd zaichik --metrics-port tcp:9102
    curl localhost:9102/metrics
    curl localhost:9102/healthz
"""

from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.twisted import MetricsResource
from twisted.web.resource import Resource
from twisted.web.server import Site

from zaichik.codec import ErrorCode
from zaichik.service import BrokerService


class BrokerCollector:
    """Reads a L{BrokerService}'s counters at scrape time."""

    def __init__(self, service: BrokerService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        service = self.service
        stats = service.stats
        topics = service.topics

        yield GaugeMetricFamily("zaichik_connections", "Open client connections.", value=service.connections)
        yield GaugeMetricFamily("zaichik_topics", "Topics.", value=len(topics))
        yield CounterMetricFamily("zaichik_bytes_in", "Bytes received from clients.", value=stats.bytes_in)
        yield CounterMetricFamily("zaichik_bytes_out", "Bytes sent to clients.", value=stats.bytes_out)
        yield CounterMetricFamily("zaichik_slow_consumer_disconnects",
                                  "Connections closed as slow consumers.",
                                  value=stats.slow_consumer_disconnects)
        errors = CounterMetricFamily("zaichik_errors", "ERROR frames sent, by code.", labels=["code"])
        for code in ErrorCode:
            errors.add_metric([code.name], stats.errors.get(int(code), 0))
        yield errors

        storage = service.storage
        yield CounterMetricFamily("zaichik_storage_damaged",
                                  "Damaged ranges found in storage and skipped (see `zaichik check`).",
                                  value=storage.damaged)
        yield CounterMetricFamily("zaichik_storage_torn_tails",
                                  "Writes found torn by a crash at start (their offsets are skipped).",
                                  value=storage.torn)
        yield GaugeMetricFamily("zaichik_storage_cache_bytes",
                                "Bytes of recent messages cached in memory by storage.", value=storage.cache_bytes)
        store_errors = CounterMetricFamily("zaichik_store_errors",
                                           "Appends storage refused (a full disk, an I/O error), by topic.",
                                           labels=["topic"])
        for name, topic in topics.items():
            if topic.store_errors:
                store_errors.add_metric([name], topic.store_errors)
        yield store_errors

        messages_in = CounterMetricFamily("zaichik_messages_in", "Messages stored, by topic.",
                                          labels=["topic"])
        messages_out = CounterMetricFamily("zaichik_messages_out", "Messages sent to subscribers, by topic.",
                                           labels=["topic"])
        duplicates = CounterMetricFamily("zaichik_duplicates_dropped",
                                         "Publishes dropped by compaction, by topic.", labels=["topic"])
        expired = CounterMetricFamily("zaichik_messages_expired",
                                      "Retained messages expired (by time or by bytes), by topic.",
                                      labels=["topic"])
        retained = GaugeMetricFamily("zaichik_retained_messages", "Messages retained, by topic.",
                                     labels=["topic"])
        retained_bytes = GaugeMetricFamily("zaichik_retained_bytes",
                                           "Bytes retained (encoded messages), by topic.", labels=["topic"])
        subscribers = GaugeMetricFamily("zaichik_subscribers", "Subscriptions, by topic.", labels=["topic"])
        for name, topic in topics.items():
            label = [name]
            messages_in.add_metric(label, topic.next_offset)
            messages_out.add_metric(label, topic.messages_out)
            duplicates.add_metric(label, topic.duplicates)
            expired.add_metric(label, topic.expired)
            retained.add_metric(label, topic.retained)
            retained_bytes.add_metric(label, topic.retained_bytes)
            subscribers.add_metric(label, len(topic.subscribers))
        yield from (messages_in, messages_out, duplicates, expired, retained, retained_bytes, subscribers)

        lag = GaugeMetricFamily(
            "zaichik_commit_lag",
            "Messages stored after a durable client's committed offset, by client and topic.",
            labels=["client_id", "topic"],
        )
        for client_id, positions in service.durable_positions().items():
            for name, offset in positions.items():
                topic = topics.get(name)
                if topic is not None:
                    lag.add_metric([client_id, name], max(0, topic.next_offset - 1 - offset))
        yield lag


class Health(Resource):
    """C{/healthz}: 200 "ok" while the broker service runs, 503 otherwise."""

    isLeaf = True

    def __init__(self, service: BrokerService) -> None:
        super().__init__()
        self.service = service

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if self.service.running:
            return b"ok\n"
        request.setResponseCode(503)
        return b"stopped\n"


def metrics_site(service: BrokerService) -> Site:
    """An HTTP site with C{/metrics} and C{/healthz} for C{service}."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(service))
    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry))
    root.putChild(b"healthz", Health(service))
    site = Site(root)
    site.noisy = False
    return site
