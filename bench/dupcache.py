"""Duplicate cache benchmark: memory per key, adds/s and lookups/s of the pump's duplicate
cache (ion/apps/pump/dupcache.py) holding n keys like the consumer's (a sha512 identity and a
path), and the reactor thread's time in one compaction, against a baseline in the same run:
the layout the cache had before (each whole key in an ordered dict, compaction lines formatted
on the calling thread).

    venv/bin/python bench/dupcache.py              # 200,000 keys
    venv/bin/python bench/dupcache.py -n 1000000

Memory is what tracemalloc sees allocated by the cache while the keys are added (the keys
themselves counted: the consumer makes a new key string per notice, which only the cache
keeps). The file is written to a temp dir, its disk work inline (no reactor): the compaction
figure is the time until the lines are handed to the disk (ION: two lists of references;
baseline: the list of formatted lines). Prints one result line:

    dupcache n=200000 bytes_per_key=... baseline_bytes_per_key=... adds_per_s=...
        baseline_adds_per_s=... lookups_per_s=... compact_ms=... baseline_compact_ms=...
"""

import argparse
import base64
import collections
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import tracemalloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from twisted.internet import task  # noqa: E402
from twisted.python.failure import Failure  # noqa: E402

from ion.apps.pump import dupcache  # noqa: E402


def key(i):
    """A consumer's key: a sha512 identity, then the file's relPath."""
    value = base64.b64encode(hashlib.sha512(b"%d" % i).digest()).decode()
    return f"sha512:{value}\n/bench/dir{i % 100}/file{i:08d}.dat"


_quote = json.encoder.encode_basestring_ascii


def whole_key_line(k, expires):
    return f'{{"key": {_quote(k)}, "expires": {expires!r}}}\n'


class OrderedKeys:
    """The layout before: whole keys in an ordered dict, purged from the front, a line per
    key written to a buffered file."""

    def __init__(self, ttl, clock, path):
        self.ttl, self.clock = ttl, clock
        self.entries = collections.OrderedDict()
        self.file = open(path, "w", encoding="utf-8")

    def add(self, k, flush=False):
        self.entries.pop(k, None)
        expires = self.entries[k] = self.clock.seconds() + self.ttl
        self.file.write(whole_key_line(k, expires))

    def __contains__(self, k):
        expires = self.entries.get(k)
        return expires is not None and expires > self.clock.seconds()

    def compact_lines(self):
        return [whole_key_line(k, e) for k, e in self.entries.items()]


class HeldPool:
    """A reactor and its thread pool in one, holding the work handed to the pool until
    L{run_all}: what the reactor thread spends is then timed apart from the disk's work."""

    def __init__(self):
        self.held = []

    def getThreadPool(self):
        return self

    def callInThreadWithCallback(self, on_result, function, *args, **kwargs):
        self.held.append((on_result, function, args, kwargs))

    def callFromThread(self, function, *args, **kwargs):
        function(*args, **kwargs)

    def run_all(self):
        while self.held:
            on_result, function, args, kwargs = self.held.pop(0)
            try:
                result = function(*args, **kwargs)
            except BaseException:
                on_result(False, Failure())
            else:
                on_result(True, result)


def measure(make, n, keys):
    """(bytes per key, adds/s, lookups/s) of the cache C{make()} given n keys."""
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    cache = make()
    start = time.perf_counter()
    for i in range(n):
        cache.add(keys(i), flush=False)  # as the consumer adds
    adds = n / (time.perf_counter() - start)
    size = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    probes = [keys(i) for i in range(0, n, 7)]
    start = time.perf_counter()
    found = sum(1 for k in probes if k in cache)
    lookups = len(probes) / (time.perf_counter() - start)
    assert found == len(probes), f"{len(probes) - found} keys missing"
    return cache, size / n, adds, lookups


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=200_000, help="keys (default 200,000)")
    args = parser.parse_args()
    temp = tempfile.mkdtemp(prefix="bench-dupcache-")
    try:
        clock = task.Clock()
        clock.advance(1_000_000_000)
        path = os.path.join(temp, "dupcache.jsonl")

        pool = HeldPool()

        def make():
            # One compaction only, the one timed below: a threshold above n keeps add() from
            # compacting on its own.
            return dupcache.DupCache(path, 3600, clock, pool, compact_min_lines=args.n * 4)

        cache, ion_bytes, ion_adds, ion_lookups = measure(make, args.n, key)
        start = time.perf_counter()
        cache.compact()  # the reactor thread's part: the lines are written by the pool
        compact_ms = (time.perf_counter() - start) * 1000
        pool.run_all()
        cache.close()
        pool.run_all()
        del cache

        base_path = os.path.join(temp, "baseline.jsonl")
        base, base_bytes, base_adds, _ = measure(
            lambda: OrderedKeys(3600, clock, base_path), args.n, key)
        start = time.perf_counter()
        base.compact_lines()
        base_compact_ms = (time.perf_counter() - start) * 1000
        base.file.close()
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    print(
        f"dupcache n={args.n} bytes_per_key={ion_bytes:.0f} baseline_bytes_per_key={base_bytes:.0f}"
        f" adds_per_s={ion_adds:.0f} baseline_adds_per_s={base_adds:.0f}"
        f" lookups_per_s={ion_lookups:.0f} compact_ms={compact_ms:.1f}"
        f" baseline_compact_ms={base_compact_ms:.1f}"
    )


if __name__ == "__main__":
    main()
