"""Memory tracing of a pump child for `bench/chaos.py --soak --trace DIR` (a debugging aid,
never imported by ION itself): with C{ION_MEMTRACE=DIR} in the environment, Python's
allocations are traced (C{tracemalloc}, 8 frames; from C{ION_MEMTRACE_DELAY} seconds on,
default 20, so that the container boots at full speed) and every C{ION_MEMTRACE_EVERY} seconds
(default 60) a thread writes C{DIR/snap-<seconds>.pickle} (a tracemalloc snapshot) and
C{DIR/types-<seconds>.json} (the live objects by type, from the garbage collector's lists).
Compare two with C{bench/chaos.py --compare DIR}."""

import os

_DIR = os.environ.get("ION_MEMTRACE")

if _DIR:
    import collections
    import gc
    import json
    import threading
    import time
    import tracemalloc

    _EVERY = float(os.environ.get("ION_MEMTRACE_EVERY", "60"))
    _START = time.monotonic()

    def _dump():
        time.sleep(float(os.environ.get("ION_MEMTRACE_DELAY", "20")))
        tracemalloc.start(8)
        while True:
            time.sleep(_EVERY)
            at = int(time.monotonic() - _START)
            snapshot = tracemalloc.take_snapshot()
            snapshot.dump(os.path.join(_DIR, f"snap-{at:05d}.pickle"))
            counts = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
            with open(os.path.join(_DIR, f"types-{at:05d}.json"), "w") as f:
                json.dump(dict(counts.most_common(300)), f)

    threading.Thread(target=_dump, name="memtrace", daemon=True).start()
