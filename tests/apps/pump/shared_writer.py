"""A writer process for the shared cache tests: random operations on one shared cache file.

Run as C{python shared_writer.py PATH SEED OPS RESULT}: C{OPS} operations drawn with C{SEED}
(a new key, the same key again, a key already expired, a turn with nothing to add), compacting
the file when it holds over 200 lines and twice its live keys, and at random one turn in
500; then the keys it expects to live on, its
compactions and its lock waits are written to C{RESULT} as JSON.
"""

import json
import random
import sys
import time

from ion.apps.pump.dupcache import digest, key_line
from ion.apps.pump.sharedcache import SharedFile


def main(path, seed, ops, result):
    rng = random.Random(seed)
    shared = SharedFile(path, compact_min_lines=200)
    live, expired = {}, set()
    for i in range(ops):
        now = time.time()
        draw = rng.random()
        lines = []
        if draw < 0.7 or not live:
            key = f"{seed}-{i}"
            live[key] = now + 3600
            lines.append(key_line(digest(key), live[key]))
        elif draw < 0.8:
            key = rng.choice(list(live))
            live[key] = now + 3600
            lines.append(key_line(digest(key), live[key]))
        elif draw < 0.9:
            key = f"{seed}-gone-{i}"
            expired.add(key)
            lines.append(key_line(digest(key), now - 1))
        shared.exchange(lines, now, live=len(live), compact=rng.random() < 0.002)
    shared.close()
    with open(result, "w") as f:
        json.dump({"live": sorted(live), "expired": sorted(expired),
                   "compactions": shared.compactions, "waits": shared.waits}, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
