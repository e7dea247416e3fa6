"""A set of recently seen keys that survives restarts: the pump's duplicate suppression.

Each key is kept for `ttl` seconds after it was last added. The set lives in memory and in an
append-only file of JSON lines `{"key": ..., "expires": ...}`; opening the cache reads the file
back (a later line for a key wins, expired keys are dropped, a torn last line from a crash is
skipped). The file is rewritten with only the live keys (to a temporary name, fsynced, renamed)
when it holds more than twice as many lines as live keys, so it stays proportional to what is
remembered.

`add` writes the line through to the operating system before it returns (a crash of the
process loses nothing) but does not fsync it: callers that must survive a power loss call
`sync()`. The consumer relies on that choice: losing a key costs one extra download, whose
report the report router recognises by its id and drops. `add(key, flush=False)` leaves the
line in the process's buffer until `flush()`, for callers adding keys in bulk (the consumer's
discard mode flushes once per reactor turn).

Times come from `clock.seconds()` (the container's clock, a `task.Clock` in tests).
"""

import collections
import json
import os

COMPACT_MIN_LINES = 1000


class DupCache:
    """Keys seen within the last `ttl` seconds, persisted at `path` (see the module docstring)."""

    def __init__(self, path, ttl, clock, compact_min_lines=COMPACT_MIN_LINES):
        if not ttl > 0:
            raise ValueError(f"dup cache ttl must be a number of seconds > 0, got {ttl!r}")
        self.path = path
        self.ttl = ttl
        self.clock = clock
        self.compact_min_lines = compact_min_lines
        self.skipped_lines = 0
        # key -> expiry, oldest first: with one ttl, expiries grow along the order, so purging
        # only ever looks at the front.
        self._entries = collections.OrderedDict()
        self._lines = 0
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        self._load()
        self._file = open(path, "a", encoding="utf-8")
        if self._lines > len(self._entries):
            self.compact()

    def __repr__(self):
        return f"<DupCache {self.path} {len(self._entries)} keys>"

    def __len__(self):
        self.purge()
        return len(self._entries)

    def __contains__(self, key):
        expires = self._entries.get(key)
        return expires is not None and expires > self.clock.seconds()

    def _load(self):
        now = self.clock.seconds()
        try:
            f = open(self.path, encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return
        with f:
            for line in f:
                self._lines += 1
                try:
                    record = json.loads(line)
                    key, expires = record["key"], float(record["expires"])
                except (ValueError, KeyError, TypeError):
                    self.skipped_lines += 1
                    continue
                if not isinstance(key, str):
                    self.skipped_lines += 1
                    continue
                self._entries.pop(key, None)
                if expires > now:
                    self._entries[key] = expires

    def add(self, key, flush=True):
        """Remember `key` for `ttl` seconds from now (again, if it was already known).

        With `flush=False` the line may stay in this process's buffer until the next `flush()`
        (or an `add` that flushes): cheaper when many keys arrive together, but a crash of the
        process can lose it."""
        now = self.clock.seconds()
        expires = now + self.ttl
        entries = self._entries
        if key in entries:
            del entries[key]
        entries[key] = expires
        self._file.write(_line(key, expires))
        if flush:
            self._file.flush()
        self._lines += 1
        self.purge(now)
        if self._lines > self.compact_min_lines and self._lines > 2 * len(entries):
            self.compact()

    def flush(self):
        """Hand the lines added with `flush=False` to the operating system."""
        self._file.flush()

    def purge(self, now=None):
        """Forget the keys whose time is up (the file catches up at the next compaction)."""
        now = self.clock.seconds() if now is None else now
        entries = self._entries
        while entries:
            key, expires = next(iter(entries.items()))
            if expires > now:
                break
            del entries[key]

    def compact(self):
        """Rewrite the file with the live keys only (atomically: temporary file, rename)."""
        self.purge()
        temp = f"{self.path}.compact"
        with open(temp, "w", encoding="utf-8") as f:
            for key, expires in self._entries.items():
                f.write(_line(key, expires))
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, self.path)
        _fsync_directory(os.path.dirname(self.path) or ".")
        self._file.close()
        self._file = open(self.path, "a", encoding="utf-8")
        self._lines = len(self._entries)

    def sync(self):
        """Make the keys added so far survive a power loss (fsync)."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self):
        if not self._file.closed:
            self._file.close()


def _line(key, expires):
    """The file's line for a key: {"key": ..., "expires": ...} (formatted by hand: this runs
    for every message)."""
    return f'{{"key": {json.dumps(key)}, "expires": {float(expires)!r}}}\n'


def _fsync_directory(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
