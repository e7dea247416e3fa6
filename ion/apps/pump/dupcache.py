"""A set of recently seen keys that survives restarts: the pump's duplicate suppression.

Each key is kept for C{ttl} seconds after it was last added, in memory and in a journal
(L{ion.apps.pump.journal}) of lines C{{"key": ..., "expires": ...}}: a later line for a key
wins, expired keys are dropped on reading, and the file is rewritten with the live keys when it
holds more than twice as many lines.

C{add} writes the line through to the operating system before it returns (a crash of the
process loses nothing) but does not fsync it: callers that must survive a power loss wait for
C{sync()}. The consumer relies on that choice: losing a key costs one extra download, whose
report the report router recognises by its id and drops. C{add(key, flush=False)} leaves the
line in the process's buffer until C{flush()}, for callers adding keys in bulk (the consumer's
discard mode flushes once per reactor turn).

Times come from C{clock.seconds()}; the disk waits run in threads of C{reactor}'s pool.
"""

import collections
import json

from ion.apps.pump.journal import DiskQueue, Journal

COMPACT_MIN_LINES = 1000


class DupCache:
    """Keys seen within the last C{ttl} seconds, persisted at C{path} (see the module docstring)."""

    def __init__(self, path, ttl, clock, reactor=None, compact_min_lines=COMPACT_MIN_LINES):
        self.path = path
        self.ttl = ttl
        self.clock = clock
        self.compact_min_lines = compact_min_lines
        # key -> expiry, oldest first: with one ttl, expiries grow along the order, so purging
        # only ever looks at the front.
        self._entries = collections.OrderedDict()
        # At most the expiry of the oldest entry: until then L{purge} has nothing to do
        # (looked at on every add). Lower is harmless: purge looks and sets it again.
        self._purge_at = float("-inf")
        self._journal = Journal(path, DiskQueue(reactor))
        self._now = clock.seconds()
        self._journal.replay(self._replay)
        if self._journal.lines > len(self._entries):
            self.compact()

    def __len__(self):
        self.purge()
        return len(self._entries)

    def __contains__(self, key):
        expires = self._entries.get(key)
        return expires is not None and expires > self.clock.seconds()

    @property
    def skipped_lines(self):
        """Lines of the file that could not be read back (a torn last line, say)."""
        return self._journal.skipped_lines

    def _replay(self, record):
        key, expires = record["key"], float(record["expires"])
        if not isinstance(key, str):
            raise TypeError("key must be a string")
        self._entries.pop(key, None)
        if expires > self._now:
            self._entries[key] = expires

    def add(self, key, flush=True):
        """Remember C{key} for C{ttl} seconds from now (again, if it was already known).

        With C{flush=False} the line may stay in this process's buffer until the next C{flush()}
        (or an L{add} that flushes): cheaper when many keys arrive together, but a crash of the
        process can lose it."""
        now = self.clock.seconds()
        expires = now + self.ttl
        entries = self._entries
        if key in entries:
            del entries[key]
        entries[key] = expires
        if expires < self._purge_at:  # a clock set back: this one may expire first
            self._purge_at = expires
        self._journal.append(key_line(key, expires), flush=flush)
        if now >= self._purge_at:
            self.purge(now)
        lines = self._journal.lines
        if lines > self.compact_min_lines and lines > 2 * len(entries):
            self.compact()

    def flush(self):
        """Hand the lines added with C{flush=False} to the operating system."""
        self._journal.flush()

    def purge(self, now=None):
        """Forget the keys whose time is up (the file catches up at the next compaction)."""
        now = self.clock.seconds() if now is None else now
        entries = self._entries
        while entries:
            key, expires = next(iter(entries.items()))
            if expires > now:
                self._purge_at = expires
                return
            del entries[key]
        self._purge_at = float("inf")

    def compact(self):
        """Rewrite the file with the live keys only (atomically: temporary file, rename); a
        Deferred firing when done."""
        self.purge()
        return self._journal.rewrite(key_line(key, expires) for key, expires in self._entries.items())

    def sync(self):
        """A Deferred firing once the keys added so far survive a power loss (fsync)."""
        return self._journal.sync()

    def close(self):
        """Close the file once its pending disk work is done; a Deferred."""
        return self._journal.close()


# json.dumps of a string, without its per-call set-up: this runs for every message.
_quote = json.encoder.encode_basestring_ascii


def key_line(key, expires):
    """The file's line for a key: {"key": ..., "expires": ...} (formatted by hand: this runs
    for every message)."""
    return f'{{"key": {_quote(key)}, "expires": {float(expires)!r}}}\n'
