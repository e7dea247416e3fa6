"""The garbage collector's settings for a container's OS process, once it has booted.

Reference counting frees almost everything a running container makes; the cyclic collector
only looks for what it cannot. By default it looks often: a pass over the young objects every
700 allocations beyond the frees, and from time to time over every object alive, the modules,
classes and apps the boot made included. In a pump moving small files the young objects are
mostly the transfers in flight, there again at every pass. Even with no cycle left per file,
that cost 35-70 us of CPU per file in about 650 passes (bench/pump.py, 8,000 files of 4 KiB).

So, once booted, a container process collects once, sets what the boot made apart from the
collector's passes (`gc.freeze`), and passes over the young objects every L{YOUNG_THRESHOLD}
allocations beyond the frees. Its cycles are still collected: later, that is all, and anything
made at boot that becomes a cycle of garbage stays (an app stopped from the shell, say).
"""

import gc

# Allocations beyond frees between two passes over the young objects (Python's default: 700).
# At 5,000, a pump moving 8,000 small files made 3 passes, not about 650, and kept the same
# peak RSS.
YOUNG_THRESHOLD = 5000


def settle():
    """Call once the process has booted (its apps running): collect, freeze the survivors,
    and collect the young objects every L{YOUNG_THRESHOLD} allocations from now on."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
