"""
Metrics in the Prometheus text format, and a health check, over HTTP.

The broker keeps plain integer counters on its objects (the hot path pays an
addition, nothing more); a collector reads them when Prometheus scrapes.

    twistd zaichik --metrics-port 9102
    curl localhost:9102/metrics
    curl localhost:9102/healthz

Per-topic series are capped (C{--metrics-max-topics}, L{DEFAULT_MAX_TOPICS}):
the first topics by name have series of their own, and the rest are summed
into series labelled C{topic="_other"}, so that a broker with 100,000 topics
still answers a scrape with a few thousand lines.  Name order keeps the set
stable: a topic's series do not come and go with its traffic (which would
make counters jump between it and C{_other}); only a new topic whose name
sorts among the first ones moves the last of them into C{_other}.
"""

from __future__ import annotations

from typing import Iterator, List, Tuple, Union

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.twisted import MetricsResource
from twisted.web.resource import Resource
from twisted.web.server import Site

from zaichik.codec import ErrorCode
from zaichik.service import BrokerService

DEFAULT_MAX_TOPICS = 1000
OTHER = "_other"


class BrokerCollector:
    """
    Reads a L{BrokerService}'s counters at scrape time.

    @ivar max_topics: topics with per-topic series of their own (the first
        ones by name); the others are summed into C{topic="_other"}.  A
        topic actually named C{_other} is always in the sum.  The commit lag
        has at most as many series, by client and topic, for the topics
        shown; the rest is summed into C{client_id="_other", topic="_other"}.
    """

    def __init__(self, service: BrokerService, max_topics: int = DEFAULT_MAX_TOPICS) -> None:
        self.service = service
        self.max_topics = max_topics

    def _shown(self) -> List[str]:
        """The names of the topics with series of their own."""
        shown: List[str] = []
        if self.max_topics <= 0:
            return shown
        for name in self.service.topic_names:  # kept sorted by the service
            if name != OTHER:
                shown.append(name)
                if len(shown) == self.max_topics:
                    break
        return shown

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
        writer = getattr(storage, "writer", None)  # (the disk's writer thread: --fsync never or interval)
        if writer is not None:
            yield GaugeMetricFamily("zaichik_write_queue_bytes",
                                    "Bytes appended and waiting to be written to disk (at most 8 MiB: then "
                                    "publishers wait for the disk).", value=writer.queued)
        engine = service.engine
        if engine is not None:
            yield CounterMetricFamily("zaichik_engine_offset_resets",
                                      "Topics found lost or behind in the shared engine (Redis restarted empty, "
                                      "failover): continued past every offset this broker saw.",
                                      value=engine.offset_resets)
            yield CounterMetricFamily("zaichik_engine_resyncs",
                                      "Times the engine's pub/sub connection came back and every topic caught up.",
                                      value=engine.resyncs)
        store_errors = CounterMetricFamily("zaichik_store_errors",
                                           "Appends storage refused (a full disk, an I/O error), by topic.",
                                           labels=["topic"])
        shown = self._shown()
        shown_set = set(shown)
        others = [topic for name, topic in topics.items() if name not in shown_set]
        yield GaugeMetricFamily("zaichik_metrics_topics_other",
                                f'Topics without per-topic series of their own: summed in topic="{OTHER}" '
                                "(see --metrics-max-topics).", value=len(others))
        for name in shown:
            topic = topics[name]
            if topic.store_errors:
                store_errors.add_metric([name], topic.store_errors)
        other_errors = sum(topic.store_errors for topic in others)
        if other_errors:
            store_errors.add_metric([OTHER], other_errors)
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
        families: Tuple[Union[CounterMetricFamily, GaugeMetricFamily], ...] = (
            messages_in, messages_out, duplicates, expired, retained, retained_bytes, subscribers)
        for name in shown:
            for family, number in zip(families, _per_topic(topics[name])):
                family.add_metric([name], number)
        if others:
            sums = [0] * len(families)
            for topic in others:
                for i, number in enumerate(_per_topic(topic)):
                    sums[i] += number
            for family, number in zip(families, sums):
                family.add_metric([OTHER], number)
        yield from families

        lag = GaugeMetricFamily(
            "zaichik_commit_lag",
            "Messages stored after a durable client's committed offset, by client and topic "
            f'(at most --metrics-max-topics series; the rest summed in client_id="{OTHER}", topic="{OTHER}").',
            labels=["client_id", "topic"],
        )
        series, other_lag, any_other = 0, 0, False
        positions_of = service.durable_positions()
        for client_id in sorted(positions_of):
            positions = positions_of[client_id]
            for name in sorted(positions):
                committed_on = topics.get(name)
                if committed_on is None:
                    continue
                behind = max(0, committed_on.next_offset - 1 - positions[name])
                if name in shown_set and series < self.max_topics:
                    lag.add_metric([client_id, name], behind)
                    series += 1
                else:
                    other_lag += behind
                    any_other = True
        if any_other:
            lag.add_metric([OTHER, OTHER], other_lag)
        yield lag
        yield from self._groups(shown_set)
        yield from self._patterns()

    def _groups(self, shown: set) -> Iterator[Metric]:
        """Consumer groups: lag, outstanding, members, redeliveries (capped like the topics)."""
        labels = ["topic", "group"]
        lag = GaugeMetricFamily("zaichik_group_lag", "Messages from a group's position on, by topic and group.",
                                labels=labels)
        outstanding = GaugeMetricFamily("zaichik_group_outstanding",
                                        "Messages sent to a group's members and not acknowledged.", labels=labels)
        members = GaugeMetricFamily("zaichik_group_members", "Members of a group.", labels=labels)
        redelivered = CounterMetricFamily("zaichik_group_redeliveries",
                                          "Messages a group sent again (not acknowledged in time, or their "
                                          "member left).", labels=labels)
        series = 0
        other = [0, 0, 0, 0]
        any_other = False
        families: Tuple[Union[GaugeMetricFamily, CounterMetricFamily], ...] = (lag, outstanding, members, redelivered)
        for (name, group_name), group in sorted(self.service.groups.items()):
            values = (group.lag, group.outstanding, len(group.members), group.redelivered)
            if name in shown and series < self.max_topics:
                for family, value in zip(families, values):
                    family.add_metric([name, group_name], value)
                series += 1
            else:
                any_other = True
                other = [a + b for a, b in zip(other, values)]
        if any_other:
            for family, value in zip(families, other):
                family.add_metric([OTHER, OTHER], value)
        yield from families

    def _patterns(self) -> Iterator[Metric]:
        """Wildcard subscriptions, by pattern (the first --metrics-max-topics patterns by name)."""
        family = GaugeMetricFamily("zaichik_pattern_subscriptions", "Wildcard subscriptions, by pattern.",
                                   labels=["pattern"])
        counts = self.service.patterns.counts()
        names = sorted(counts)
        for pattern in names[: self.max_topics]:
            family.add_metric([pattern], counts[pattern])
        rest = sum(counts[p] for p in names[self.max_topics :])
        if rest:
            family.add_metric([OTHER], rest)
        yield family


def _per_topic(topic) -> tuple:
    """A topic's numbers, in the order of the per-topic families."""
    return (topic.next_offset, topic.messages_out, topic.duplicates, topic.expired, topic.retained,
            topic.retained_bytes, len(topic.subscribers))


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


def metrics_site(service: BrokerService, max_topics: int = DEFAULT_MAX_TOPICS) -> Site:
    """An HTTP site with C{/metrics} and C{/healthz} for C{service}."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(service, max_topics))
    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry))
    root.putChild(b"healthz", Health(service))
    site = Site(root)
    site.noisy = False
    return site
