"""The counters, gauges and histograms a container's processes share, and their Prometheus view.

One L{Metrics} per container (C{container.metrics}, also C{messenger.metrics}). Counting is a
dict update on the reactor thread, where everything that counts runs: no lock, no thread hop,
nothing formatted. Keys are tuples of label values (the family's C{labels}, in order);
L{MetricsCollector} adds the label C{container} and hands the values to C{prometheus_client}
only when C{/metrics} is read. Gauges that are cheaper to read than to keep (conversations
open, restarts) come from C{probes}: functions called at that moment, each returning
C{(family, key, value)} triples.
"""

import bisect

# Seconds: an rpc on loopback takes about a millisecond, a large transfer minutes.
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
TRANSFER_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900)


class Counter:
    """Values by label key; C{inc} adds (a counter), C{set} replaces (a gauge)."""

    __slots__ = ("name", "doc", "labels", "kind", "values")

    def __init__(self, name, doc, labels=(), kind="counter"):
        self.name, self.doc, self.labels, self.kind = name, doc, tuple(labels), kind
        self.values = {}

    def inc(self, key=(), amount=1):
        values = self.values
        values[key] = values.get(key, 0) + amount

    def set(self, key, value):
        self.values[key] = value


class Histogram:
    """Observations by label key, counted in the buckets' upper bounds (and +Inf) with a sum."""

    __slots__ = ("name", "doc", "labels", "bounds", "values")
    kind = "histogram"

    def __init__(self, name, doc, labels=(), buckets=RPC_BUCKETS):
        self.name, self.doc, self.labels, self.bounds = name, doc, tuple(labels), tuple(buckets)
        self.values = {}  # key -> [count per bucket..., count above the last, sum]

    def observe(self, key, value):
        counts = self.values.get(key)
        if counts is None:
            counts = self.values[key] = [0] * (len(self.bounds) + 1) + [0.0]
        counts[bisect.bisect_left(self.bounds, value)] += 1
        counts[-1] += value


class Metrics:
    """The families every container has (names as Prometheus shows them, C{ion_} first)."""

    def __init__(self):
        self.published = Counter(
            "ion_messages_published", "Messages published, by sending process", ["process"])
        self.consumed = Counter(
            "ion_messages_consumed", "Messages received, by receiving process", ["process"])
        self.rpc_latency = Histogram(
            "ion_rpc_latency_seconds", "Time from an rpc's request to its outcome", ["op"])
        self.delivered = Counter(
            "ion_files_delivered", "Files delivered", ["process", "subscription"])
        self.failed = Counter(
            "ion_files_failed", "Files given up on, by report code",
            ["process", "subscription", "code"])
        self.bytes = Counter(
            "ion_bytes_delivered", "Bytes of the files delivered", ["process", "subscription"])
        self.transfer_duration = Histogram(
            "ion_transfer_duration_seconds", "Time to fetch and verify one file",
            ["process", "subscription"], TRANSFER_BUCKETS)
        self.queue_depth = Counter(
            "ion_queue_depth", "Messages waiting in a subscription's queue (last sample)",
            ["process", "subscription"], kind="gauge")
        self.retrying = Counter(
            "ion_retry_queue_size", "Files in a subscription's retry queue (last sample)",
            ["process", "subscription"], kind="gauge")
        self.conversations = Counter(
            "ion_conversations_open", "Conversations open", ["process"], kind="gauge")
        self.restarts = Counter(
            "ion_restarts", "Times a supervisor started a child again", ["app", "process"])
        self.probes = []

    def families(self):
        """Every family, each with the values of this moment (probes read now)."""
        found = [v for v in vars(self).values() if isinstance(v, (Counter, Histogram))]
        fresh = {}
        for probe in self.probes:
            for family, key, value in probe():
                fresh.setdefault(family.name, {})[key] = value
        for family in found:
            yield family, dict(fresh.get(family.name, family.values))


class MetricsCollector:
    """A C{prometheus_client} collector reading a L{Metrics} when scraped, with the label
    C{container} added to every sample."""

    def __init__(self, metrics, container_id):
        self.metrics = metrics
        self.container_id = container_id

    def collect(self):
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        kinds = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily}
        for family, values in self.metrics.families():
            labels = ["container", *family.labels]
            if family.kind == "histogram":
                out = HistogramMetricFamily(family.name, family.doc, labels=labels)
                for key, counts in sorted(values.items()):
                    cumulative, buckets = 0, []
                    for bound, n in zip((*family.bounds, float("inf")), counts):
                        cumulative += n
                        buckets.append((_bound(bound), cumulative))
                    out.add_metric([self.container_id, *key], buckets, counts[-1])
            else:
                out = kinds[family.kind](family.name, family.doc, labels=labels)
                for key, value in sorted(values.items()):
                    out.add_metric([self.container_id, *key], value)
            yield out


def _bound(value):
    return "+Inf" if value == float("inf") else repr(float(value))
