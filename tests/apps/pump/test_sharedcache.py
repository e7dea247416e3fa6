"""The shared duplicate cache: many writers, one file, nothing lost."""

import json
import os
import sys
import time

from twisted.internet import defer, task, utils
from twisted.trial import unittest

from ion.apps.pump.dupcache import digest
from ion.apps.pump.sharedcache import SharedDupCache, SharedFile

WRITER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shared_writer.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(WRITER))))


def keys_in(path):
    """The live keys of the file at path (their digests), as a fresh reader sees them."""
    reader = SharedFile(path)
    try:
        _, records = reader.exchange()
    finally:
        reader.close()
    latest = {}
    for key, expires in records:
        latest[key] = max(expires, latest.get(key, 0))
    return latest


class TwoWriterProcessesTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_two_writers_lose_nothing(self):
        """Two OS processes, 10,000 random operations between them on one file, each
        compacting it many times: every key either added lives on, no expired one does."""
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        cache = os.path.join(path, "dupcache.jsonl")
        env = dict(os.environ, PYTHONPATH=ROOT)
        runs = []
        for seed in (1, 2):
            result = os.path.join(path, f"result{seed}.json")
            runs.append(utils.getProcessOutputAndValue(
                sys.executable, [WRITER, cache, str(seed), "5000", result], env=env))
        outcomes = yield defer.gatherResults(runs)
        for out, err, code in outcomes:
            self.assertEqual(code, 0, err.decode(errors="replace"))
        results = [json.load(open(os.path.join(path, f"result{s}.json"))) for s in (1, 2)]
        kept = keys_in(cache)
        for result in results:
            self.assertGreater(result["compactions"], 3)
            missing = {k for k in result["live"] if digest(k) not in kept}
            self.assertEqual(missing, set(), f"{len(missing)} keys lost")
            self.assertEqual(
                {k for k in result["expired"] if kept.get(digest(k), 0) > time.time()}, set())
        # The file holds little besides the live keys: the compactions kept it short.
        with open(cache) as f:
            lines = sum(1 for _ in f)
        self.assertLess(lines, 2 * len(kept) + 400)


class SharedDupCacheTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1000)
        self.path = os.path.join(os.path.abspath(self.mktemp()), "dupcache.jsonl")

    def cache(self, **kw):
        cache = SharedDupCache(self.path, 60, self.clock, None, **kw)
        self.addCleanup(cache.close)
        return cache

    @defer.inlineCallbacks
    def test_other_writer_seen_after_refresh(self):
        a, b = self.cache(), self.cache()
        yield a.add("k1")
        self.assertIn("k1", a)
        self.assertNotIn("k1", b)
        yield b.refresh()
        self.assertIn("k1", b)

    @defer.inlineCallbacks
    def test_lookup_refreshes_periodically(self):
        a, b = self.cache(refresh_every=1.0), self.cache(refresh_every=1.0)
        yield a.add("k1")
        self.clock.advance(1.5)
        # The lookup starts a turn (on this thread here: no reactor), so the next one sees it.
        "k1" in b
        self.assertIn("k1", b)

    @defer.inlineCallbacks
    def test_expiry(self):
        a = self.cache()
        yield a.add("old")
        self.clock.advance(61)
        self.assertNotIn("old", a)
        b = self.cache()
        self.assertNotIn("old", b)
        self.assertEqual(len(b), 0)

    @defer.inlineCallbacks
    def test_compaction_keeps_other_writers_keys(self):
        a, b = self.cache(compact_min_lines=10), self.cache(compact_min_lines=10)
        for i in range(5):
            yield b.add(f"b{i}")
        for i in range(30):
            yield a.add("same")  # the same key again: the file grows, the live set does not
        self.assertGreater(a.compactions, 0)
        yield b.add("b-last")  # b finds the file replaced, reads it again, appends
        c = self.cache()
        for key in ["same", "b-last"] + [f"b{i}" for i in range(5)]:
            self.assertIn(key, c)
        with open(self.path) as f:
            self.assertLess(sum(1 for _ in f), 12)

    @defer.inlineCallbacks
    def test_torn_line_spoils_only_itself(self):
        a = self.cache()
        yield a.add("before")
        with open(self.path, "a") as f:
            f.write('{"key": "torn", "exp')  # a writer killed mid-line
        b = self.cache()
        yield b.add("after")
        c = self.cache()
        self.assertIn("before", c)
        self.assertIn("after", c)
        self.assertEqual(c.skipped_lines, 1)
