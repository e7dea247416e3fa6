"""A duplicate cache that several OS processes write at once: the instances of one flow.

The keys live in one file of JSON lines (C{{"id": ..., "expires": ...}}, a key's digest and
its expiry, as in L{ion.apps.pump.dupcache}) that every writer appends to, and a lock file
beside it (C{<path>.lock}) that is never replaced. Every read-modify-write of the file holds
an exclusive C{flock} on the lock file:

  - a writer that finds the lock held sleeps a random, growing while (1 ms doubling up to 50 ms,
    uniformly drawn below it, so that writers out of step do not keep meeting) and tries again,
    for up to C{LOCK_PATIENCE} seconds;
  - holding the lock, it checks that the file at C{path} is still the one it has open (a
    compaction by another writer replaces it): if not, it reopens it and reads it from the
    start; then it reads the lines the others appended since its last turn (only whole lines;
    a torn last line, from a writer killed mid-write, is ended with a newline before anything
    is appended, so it spoils only itself), appends its own, and notes where the file ends;
  - a compaction happens under the same lock: the whole file is read again, the latest expiry
    of each key kept, the expired ones dropped, and the rest written to a temporary file that is
    fsynced and renamed over C{path}. Every writer appends only while holding the lock and
    after reading to the end, so the file read is all there is: no writer's key is lost.

The blocking half is L{SharedFile}, usable on its own (the tests' writer processes use it);
L{SharedDupCache} puts it behind the interface of L{ion.apps.pump.dupcache.DupCache} with its
disk work in the reactor's thread pool (one call at a time, through a L{DiskQueue}), never on
the reactor thread. C{add} returns a Deferred that fires once the key is in the file (written
to the operating system, not fsynced: as with DupCache, a lost key costs one download); keys
added meanwhile share one turn with the lock. What the other writers added becomes visible at
the next turn: after any C{add}, after L{SharedDupCache.refresh}, and at least every
C{refresh_every} seconds while keys are looked up.
"""

import errno
import fcntl
import json
import os
import random
import time

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from ion.apps.pump.dupcache import digest, key_line, parse_record
from ion.apps.pump.journal import DiskQueue, _replace_file as replace_file

log = Logger()

COMPACT_MIN_LINES = 1000
LOCK_PATIENCE = 30.0  # seconds a writer waits for the lock before its turn fails
_FIRST_BACKOFF = 0.001
_MAX_BACKOFF = 0.05


class LockTimeout(OSError):
    """The lock of a shared cache stayed held by another writer for C{LOCK_PATIENCE} s."""


def _parse(raw):
    """(digest, expires) of one line, or None when it does not parse (a torn line)."""
    try:
        return parse_record(json.loads(raw))
    except (ValueError, KeyError, TypeError):
        return None


class SharedFile:
    """The blocking half of a shared cache file at C{path} (see the module docstring). Not
    thread-safe: one call at a time."""

    def __init__(self, path, compact_min_lines=COMPACT_MIN_LINES, patience=LOCK_PATIENCE):
        self.path = path
        self.compact_min_lines = compact_min_lines
        self.patience = patience
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._lock_fd = os.open(
            path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644
        )
        self._fd = None
        self._offset = 0  # where the lines this writer has read end
        self.lines = 0  # lines in the file, as far as this writer has read
        self.skipped_lines = 0
        self.compactions = 0
        self._compacted_to = 0  # lines left by the last compaction this writer saw
        self.waits = 0  # turns that found the lock held at least once

    def close(self):
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._lock_fd = None

    # -- the lock ----------------------------------------------------------------------

    def _lock(self):
        deadline = time.monotonic() + self.patience
        backoff = _FIRST_BACKOFF
        waited = False
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.waits += waited
                return
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
            waited = True
            if time.monotonic() > deadline:
                raise LockTimeout(
                    errno.EWOULDBLOCK, f"lock of {self.path} held for over {self.patience} s"
                )
            time.sleep(random.uniform(0, backoff))
            backoff = min(backoff * 2, _MAX_BACKOFF)

    def _unlock(self):
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    # -- one turn ----------------------------------------------------------------------

    def _current(self):
        """Make C{_fd} the file now at C{path} (created if missing); True if it was reopened."""
        try:
            at_path = os.stat(self.path)
        except FileNotFoundError:
            at_path = None
        if self._fd is not None and at_path is not None:
            mine = os.fstat(self._fd)
            if (mine.st_dev, mine.st_ino) == (at_path.st_dev, at_path.st_ino):
                return False
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(
            self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644
        )
        self._offset = 0
        self.lines = 0
        return True

    def _read_new(self):
        """The (key, expires) of the whole lines past C{_offset}; C{_offset} moves past them.
        Returns (records, end of file, whether the file ends inside a line)."""
        end = os.fstat(self._fd).st_size
        records = []
        if end > self._offset:
            data = os.pread(self._fd, end - self._offset, self._offset)
            whole = data.rfind(b"\n") + 1
            for raw in data[:whole].splitlines():
                self.lines += 1
                parsed = _parse(raw)
                if parsed is None:
                    self.skipped_lines += 1
                else:
                    records.append(parsed)
            self._offset += whole
        return records, end, end > self._offset

    def exchange(self, lines=(), now=None, live=None, compact=False):
        """One turn under the lock: read what the others appended, append C{lines} (text
        lines ending in newlines), compact when the file holds more than twice C{live} (the
        writer's count of live keys) lines and over C{compact_min_lines}, or when
        C{compact}.

        @return: C{(reopened, records)}: whether the file was replaced since the last turn
            (C{records} then start from its beginning) and the (key, expires) read.
        """
        self._lock()
        try:
            reopened = self._current()
            records, end, torn = self._read_new()
            if lines:
                data = "".join(lines).encode("utf-8")
                if torn:
                    data = b"\n" + data
                os.write(self._fd, data)
                self.lines += len(lines)
                self._offset = end + len(data)
            if compact or live is not None and self.lines > self.compact_min_lines and (
                self.lines > 2 * max(live, self._compacted_to, 1)
            ):
                self._compact(time.time() if now is None else now)
                reopened, records = True, self._read_all()
            if reopened:
                self._compacted_to = self.lines
            return reopened, records
        finally:
            self._unlock()

    def _read_all(self):
        self._offset, self.lines = 0, 0
        records, _, _ = self._read_new()
        return records

    def _compact(self, now):
        """Rewrite the file with its live keys (lock held)."""
        latest = {}
        for key, expires in self._read_all():
            latest.pop(key, None)
            latest[key] = expires
        # As a journal's rewrite: a temporary file, fsynced, renamed over path.
        live = (key_line(key, expires) for key, expires in latest.items() if expires > now)
        replace_file(self.path, live).close()
        self.compactions += 1
        self._current()


class SharedDupCache:
    """Keys seen within the last C{ttl} seconds, shared by every process using C{path} (see
    the module docstring); the interface of L{ion.apps.pump.dupcache.DupCache}, but C{add}
    returns a Deferred."""

    shared = True

    def __init__(self, path, ttl, clock, reactor=None, compact_min_lines=COMPACT_MIN_LINES,
                 refresh_every=1.0):
        self.path = path
        self.ttl = ttl
        self.clock = clock
        self.refresh_every = refresh_every
        self._file = SharedFile(path, compact_min_lines)
        self._disk = DiskQueue(reactor)
        self._entries = {}  # key digest -> expiry
        self._pending = []  # lines not yet in a turn
        self._waiting = []  # Deferreds of the keys in _pending
        self._turn = None  # the turn under way
        self._last_turn = None
        self._closed = False
        # Opening reads the file on the calling thread, as DupCache does.
        self._merge(*self._file.exchange())
        self._last_turn = clock.seconds()

    def __len__(self):
        now = self.clock.seconds()
        return sum(1 for expires in self._entries.values() if expires > now)

    def __contains__(self, key):
        now = self.clock.seconds()
        if now - self._last_turn >= self.refresh_every and self._turn is None and (
            not self._closed
        ):
            self._start_turn()
        expires = self._entries.get(digest(key))
        return expires is not None and expires > now

    @property
    def skipped_lines(self):
        return self._file.skipped_lines

    @property
    def compactions(self):
        return self._file.compactions

    def _merge(self, reopened, records):
        now = self.clock.seconds()
        if reopened:
            # The file was replaced (compacted): its content is everything; what this
            # process added is in it too (appended under the lock before the rewrite).
            self._entries = {}
        entries = self._entries
        for key, expires in records:
            if expires > now:
                if expires > entries.get(key, 0):
                    entries[key] = expires
            else:
                entries.pop(key, None)

    def add(self, key, flush=True):
        """Remember C{key} for C{ttl} seconds from now; a Deferred firing once it is in the
        shared file (C{flush} is accepted for DupCache's interface: keys are always batched)."""
        key = digest(key)
        expires = self.clock.seconds() + self.ttl
        self._entries[key] = expires
        self._pending.append(key_line(key, expires))
        d = defer.Deferred()
        self._waiting.append(d)
        if self._turn is None:
            self._start_turn()
        return d

    def flush(self):
        """Nothing to do: L{add} starts its own turn."""

    def refresh(self):
        """A Deferred firing once what the other writers added so far is known here."""
        if self._turn is not None:
            # The turn under way may have read before their last add: wait, then take one more.
            d = defer.Deferred()
            self._turn.addBoth(lambda _: self.refresh().chainDeferred(d))
            return d
        return self._start_turn()

    def _start_turn(self):
        lines, self._pending = self._pending, []
        waiting, self._waiting = self._waiting, []
        now = self.clock.seconds()
        self._last_turn = now
        live = len(self._entries) + len(lines)
        turn = self._disk.run(self._file.exchange, lines, now, live)
        self._turn = defer.Deferred()

        def done(result):
            self._turn, finished = None, self._turn
            if isinstance(result, Failure):
                log.failure("shared cache {path}: a turn failed", result, path=self.path)
                for d in waiting:
                    d.errback(result)
            else:
                self._merge(*result)
                if result[0]:
                    # Keys added while the turn ran are pending still: keep them known.
                    for line in self._pending:
                        key, expires = _parse(line)
                        self._entries[key] = expires
                for d in waiting:
                    d.callback(None)
            finished.callback(None)
            if self._pending and not self._closed:
                self._start_turn()
            return None

        turn.addBoth(done)
        return turn

    def purge(self, now=None):
        """Forget the expired keys here (the file drops them at its next compaction)."""
        now = self.clock.seconds() if now is None else now
        self._entries = {k: e for k, e in self._entries.items() if e > now}

    def sync(self):
        """A Deferred firing once the keys added so far are in the file."""
        return self.refresh()

    @defer.inlineCallbacks
    def close(self):
        """Write what is pending, then close the files; a Deferred."""
        if self._closed:
            return
        while self._turn is not None or self._pending:
            if self._turn is None:
                self._start_turn()
            finished = defer.Deferred()
            self._turn.addBoth(lambda _: finished.callback(None))
            yield finished
        self._closed = True
        yield self._disk.run(self._file.close)
