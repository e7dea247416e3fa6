"""A set of recently seen keys that survives restarts: the pump's duplicate suppression.

Each key is kept for C{ttl} seconds after it was last added (up to a second more: expiries are
rounded up to whole seconds), in memory and in a journal
(L{ion.apps.pump.journal}) of lines C{{"id": ..., "expires": ...}}: a later line for a key
wins, expired keys are dropped on reading, and the file is rewritten with the live keys when it
holds more than twice as many lines.

A key is kept as its L{digest} (16 bytes of BLAKE2b; C{"id"} is its hex): the cache holds one
entry per file delivered within C{ttl} (an hour by default), and a notice's key (its checksum
and path, over a hundred characters) would cost twice the memory. 128 bits keep both
an accidental match and a made-up notice whose key matches a given file's out of reach.
Lines of the older form C{{"key": ..., "expires": ...}} are read too (and digested).

C{add} writes the line through to the operating system before it returns (a crash of the
process loses nothing) but does not fsync it: callers that must survive a power loss wait for
C{sync()}. The consumer relies on that choice: losing a key costs one extra download, whose
report the report router recognises by its id and drops. C{add(key, flush=False)} leaves the
line in the process's buffer until C{flush()}, for callers adding keys in bulk (the consumer's
discard mode flushes once per reactor turn).

Times come from C{clock.seconds()}; the disk waits run in threads of C{reactor}'s pool.
"""

import collections
import hashlib
import math

from ion.apps.pump.journal import DiskQueue, Journal

COMPACT_MIN_LINES = 1000
BATCH_SPAN = 1 / 16  # of the ttl: the keys added within it are forgotten together


class DupCache:
    """Keys seen within the last C{ttl} seconds, persisted at C{path} (see the module docstring)."""

    def __init__(self, path, ttl, clock, reactor=None, compact_min_lines=COMPACT_MIN_LINES):
        self.path = path
        self.ttl = ttl
        self.clock = clock
        self.compact_min_lines = compact_min_lines
        self._entries = {}  # key digest -> expiry
        # The digests in the order added, in batches of BATCH_SPAN of the ttl: a deque of
        # [latest expiry, [digests]]. Purging forgets a whole batch once its latest expiry is
        # past: a sixteenth of the keys at a time on the reactor thread, with 8 bytes a key
        # here where an ordered dict's links took about 50.
        self._batches = collections.deque()
        self._batch_ends = float("-inf")  # when the newest batch stops taking keys
        self._last_expiry = None  # the float the keys added lately share (see _expiry)
        self._journal = Journal(path, DiskQueue(reactor))
        self._now = clock.seconds()
        self._journal.replay(self._replay)
        if self._entries:
            self._batches.append([max(self._entries.values()), list(self._entries)])
        if self._journal.lines > len(self._entries):
            self.compact()

    def __len__(self):
        now = self.clock.seconds()
        return sum(1 for expires in self._entries.values() if expires > now)

    def __contains__(self, key):
        expires = self._entries.get(digest(key))
        return expires is not None and expires > self.clock.seconds()

    @property
    def skipped_lines(self):
        """Lines of the file that could not be read back (a torn last line, say)."""
        return self._journal.skipped_lines

    def _replay(self, record):
        key, expires = parse_record(record)
        if expires > self._now:
            self._entries[key] = expires
        else:
            self._entries.pop(key, None)

    def add(self, key, flush=True):
        """Remember C{key} for C{ttl} seconds from now (again, if it was already known).

        With C{flush=False} the line may stay in this process's buffer until the next C{flush()}
        (or an L{add} that flushes): cheaper when many keys arrive together, but a crash of the
        process can lose it."""
        key = digest(key)
        now = self.clock.seconds()
        expires = self._expiry(now)
        self._entries[key] = expires
        batches = self._batches
        span = self.ttl * BATCH_SPAN
        if not now < self._batch_ends <= now + span:  # the newest batch is full (or the clock
            batches.append([expires, [key]])  # was set back)
            self._batch_ends = now + span
        else:
            batch = batches[-1]
            batch[1].append(key)
            if expires > batch[0]:
                batch[0] = expires
        self._journal.append(key_line(key, expires), flush=flush)
        if batches[0][0] <= now:
            self.purge(now)
        lines = self._journal.lines
        if lines > self.compact_min_lines and lines > 2 * len(self._entries):
            self.compact()

    def _expiry(self, now):
        """C{now + ttl} rounded up to a whole second: the keys added within one second share
        one float object (24 bytes a key, a sixth of what the cache holds per key: about a
        megabyte for the 20,000 files of the pump's bench, over the consumer's cache and the
        report router's). A key lives at most a second longer than C{ttl}."""
        whole = math.ceil(now + self.ttl)
        if whole != self._last_expiry:
            self._last_expiry = float(whole)
        return self._last_expiry

    def flush(self):
        """Hand the lines added with C{flush=False} to the operating system."""
        self._journal.flush()

    def purge(self, now=None):
        """Forget the keys of the batches whose time is up (the file catches up at the next
        compaction); a key added again since lives on."""
        now = self.clock.seconds() if now is None else now
        entries, batches = self._entries, self._batches
        while batches and batches[0][0] <= now:
            for key in batches.popleft()[1]:
                if entries.get(key, now + 1) <= now:
                    del entries[key]

    def compact(self):
        """Rewrite the file with the live keys only (atomically: temporary file, rename); a
        Deferred firing when done. The lines are written in a thread of the pool."""
        self.purge()
        # Two lists of references: a list of pairs (or of lines) would cost a tuple (or a
        # string) per key while the file is written.
        keys, expiries = list(self._entries), list(self._entries.values())
        return self._journal.rewrite(map(key_line, keys, expiries), count=len(keys))

    def sync(self):
        """A Deferred firing once the keys added so far survive a power loss (fsync)."""
        return self._journal.sync()

    def close(self):
        """Close the file once its pending disk work is done; a Deferred."""
        return self._journal.close()


def digest(key):
    """What the cache keeps of the string C{key}: 16 bytes of its BLAKE2b."""
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def key_line(key_digest, expires):
    """The file's line for a key's L{digest}: {"id": ..., "expires": ...} (formatted by hand:
    this runs for every message)."""
    return f'{{"id": "{key_digest.hex()}", "expires": {float(expires)!r}}}\n'


def parse_record(record):
    """The (digest, expiry) of a line's JSON value: an C{id} of 32 hex digits, or a C{key}
    string (the older form); ValueError, KeyError or TypeError when it is neither."""
    expires = float(record["expires"])
    if "id" in record:
        key_id = record["id"]
        if not isinstance(key_id, str) or len(key_id) != 32:
            raise ValueError("id must be 32 hex digits")
        return bytes.fromhex(key_id), expires
    key = record["key"]
    if not isinstance(key, str):
        raise TypeError("key must be a string")
    return digest(key), expires
