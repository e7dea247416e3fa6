"""The metrics a container's processes share (ion.core.metrics), as Prometheus reads them."""

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial import unittest

from ion.core.metrics import Counter, Histogram, Metrics, MetricsCollector


def scrape(metrics, container="c1"):
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MetricsCollector(metrics, container))
    text = generate_latest(registry).decode()
    return {s.name + repr(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


class MetricsTests(unittest.SynchronousTestCase):
    def test_counters_gauges_probes(self):
        """Counters add, gauges are set, probes are read at the scrape; every sample has its
        labels and the container's."""
        m = Metrics()
        m.delivered.inc(("p", "s"))
        m.delivered.inc(("p", "s"))
        m.bytes.inc(("p", "s"), 300)
        m.queue_depth.set(("p", "s"), 7)
        m.probes.append(lambda: [(m.conversations, ("p",), 3)])
        found = scrape(m)
        labels = "[('container', 'c1'), ('process', 'p'), ('subscription', 's')]"
        self.assertEqual(found["ion_files_delivered_total" + labels], 2)
        self.assertEqual(found["ion_bytes_delivered_total" + labels], 300)
        self.assertEqual(found["ion_queue_depth" + labels], 7)
        self.assertEqual(
            found["ion_conversations_open[('container', 'c1'), ('process', 'p')]"], 3)

    def test_histogram(self):
        """Observations land in the first bucket whose bound holds them (le), cumulative
        as Prometheus wants, with their count and sum."""
        h = Histogram("x_seconds", "x", ["op"], buckets=(0.1, 1))
        for value in (0.05, 0.1, 0.5, 3):
            h.observe(("a",), value)
        m = Metrics()
        m.rpc_latency = h
        found = scrape(m)
        bucket = "x_seconds_bucket[('container', 'c1'), ('le', '{}'), ('op', 'a')]"
        self.assertEqual([found[bucket.format(le)] for le in ("0.1", "1.0", "+Inf")], [2, 3, 4])
        self.assertEqual(found["x_seconds_count[('container', 'c1'), ('op', 'a')]"], 4)
        self.assertAlmostEqual(found["x_seconds_sum[('container', 'c1'), ('op', 'a')]"], 3.65)

    def test_counter_is_cheap(self):
        """Counting is a plain dict update: no lock object anywhere in a family."""
        c = Counter("n", "n", ["k"])
        c.inc(("a",))
        self.assertEqual(c.values, {("a",): 1})
        self.assertFalse(hasattr(c, "_lock"))
