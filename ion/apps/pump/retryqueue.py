"""The consumer's on-disk queue of transfers to try again, with exponential backoff and a horizon.

A notice whose transfer failed transiently is added here (and the file fsynced) before its AMQP
message is acked, so the broker's copy can go: from then on this file is the only record of the
work. Each entry is tried again when it is due; a failure reschedules it C{initial * 2**(n-1)}
seconds later (n: failures so far), at most C{maximum} seconds, spread by C{±jitter} (a fraction)
so that entries failed together do not all come back together; no attempt is scheduled past
C{first failure + horizon}, and an entry failing at or after its horizon is given up.

File: JSON lines, appended; one record per event, replayed on open::

    {"op": "add", "entry": {id, key, body, routing_key, first_failed, attempts, due, code, message}}
    {"op": "update", "id": ..., "attempts": ..., "due": ..., "code": ..., "message": ...,
     "first_failed": ...}
    {"op": "done", "id": ...}

Only C{add} is fsynced. A lost C{update} makes an entry due earlier than planned, a lost C{done}
makes a finished entry come back once after a restart, where the consumer's duplicate cache
recognises it. The file is rewritten with the pending entries when it holds more than four times
as many records as entries.

Times come from C{clock.seconds()}; the fsyncs and rewrites run in threads of C{reactor}'s pool
(L{ion.apps.pump.journal}), and adds that wait for their fsync together share one.
"""

import heapq
import itertools
import random
import uuid

import attrs

from ion.apps.pump.journal import DiskQueue, Journal, json_line

COMPACT_MIN_LINES = 1000
# The fields an "update" record carries: those another failed attempt changes.
_UPDATED = ("attempts", "due", "code", "message", "first_failed")


@attrs.define
class RetryEntry:
    """One notice waiting for another transfer attempt.

    @ivar key: the notice's duplicate-suppression key.
    @ivar body: the notice's fields (a dict), as received.
    @ivar routing_key: the routing key it arrived with.
    @ivar first_failed: when the first attempt failed (clock seconds).
    @ivar attempts: attempts made so far.
    @ivar due: when to try again (clock seconds).
    @ivar code: the code of the last failure; @ivar message: its message.
    """

    id: str
    key: str
    body: dict
    routing_key: str
    first_failed: float
    attempts: int
    due: float
    code: int
    message: str


class RetryQueue:
    """Pending transfer retries, persisted at C{path} (see the module docstring)."""

    def __init__(
        self,
        path,
        clock,
        initial=2.0,
        maximum=300.0,
        horizon=3600.0,
        jitter=0.2,
        rng=None,
        reactor=None,
        compact_min_lines=COMPACT_MIN_LINES,
    ):
        self.path = path
        self.clock = clock
        self.initial = initial
        self.maximum = maximum
        self.horizon = horizon
        self.jitter = jitter
        self.rng = rng or random.Random()
        self.compact_min_lines = compact_min_lines
        self._entries = {}  # id -> RetryEntry, in insertion order
        self._by_key = {}  # key -> id
        self._heap = []  # (due, seq, id); stale items are skipped when popped
        self._seq = itertools.count()
        self._journal = Journal(path, DiskQueue(reactor))
        self._journal.replay(self._replay)
        for entry in self._entries.values():
            self._by_key[entry.key] = entry.id
            self._push(entry)
        if self._journal.lines > len(self._entries):
            self.compact()

    def __len__(self):
        return len(self._entries)

    def __iter__(self):
        return iter(list(self._entries.values()))

    def has_key(self, key):
        """Whether a notice with this duplicate key is waiting here already."""
        return key in self._by_key

    @property
    def skipped_lines(self):
        """Lines of the file that could not be read back (a torn last line, say)."""
        return self._journal.skipped_lines

    # -- reading the file back ---------------------------------------------------------------

    def _replay(self, record):
        op = record["op"]
        if op == "add":
            entry = RetryEntry(**record["entry"])
            self._entries[entry.id] = entry
        elif op == "update":
            entry = self._entries.get(record["id"])
            if entry is not None:
                record.setdefault("first_failed", entry.first_failed)  # not in older files
                for name in _UPDATED:
                    setattr(entry, name, record[name])
        elif op == "done":
            self._entries.pop(record["id"], None)
        else:
            raise ValueError(f"unknown record {op!r}")

    # -- changes ---------------------------------------------------------------------------

    def delay(self, attempts):
        """Seconds to wait after the C{attempts}-th failure (backoff, cap, then jitter)."""
        base = min(self.maximum, self.initial * 2 ** (attempts - 1))
        if self.jitter:
            base *= self.rng.uniform(1 - self.jitter, 1 + self.jitter)
        return base

    def add(self, key, body, routing_key, code, message, due=None):
        """Record a notice whose first attempt just failed. Returns a Deferred firing with its
        L{RetryEntry} once the record is fsynced (it is pending in memory at once). C{due}:
        when to try again, instead of the backoff (a link's next try)."""
        now = self.clock.seconds()
        entry = RetryEntry(
            id=uuid.uuid4().hex,
            key=key,
            body=body,
            routing_key=routing_key,
            first_failed=now,
            attempts=1,
            due=self._next_due(now, now, 1) if due is None else due,
            code=code,
            message=message,
        )
        self._write({"op": "add", "entry": attrs.asdict(entry)})
        self._entries[entry.id] = entry
        self._by_key[key] = entry.id
        self._push(entry)

        def not_kept(failure):
            # Not on disk for sure: the caller must not settle the message; its line may come
            # back at the next start, where the duplicate cache sorts it out.
            self._entries.pop(entry.id, None)
            if self._by_key.get(key) == entry.id:
                del self._by_key[key]
            return failure

        return self._journal.sync().addCallbacks(lambda _: entry, not_kept)

    def failed_again(self, entry, code, message, due=None):
        """Note another failed attempt. Returns True if the entry is rescheduled, False if its
        horizon has passed (the caller reports the failure and calls L{done}). With C{due}
        (a link's next try, while the link is down) the entry is due then, whatever its
        horizon: a file waiting for its link is never given up."""
        now = self.clock.seconds()
        entry.attempts += 1
        entry.code = code
        entry.message = message
        if due is None and now >= entry.first_failed + self.horizon:
            return False
        if due is not None:
            # The horizon counts from the link's return: its first failure after is a new one.
            entry.first_failed = now
        entry.due = self._next_due(now, entry.first_failed, entry.attempts) if due is None else due
        self._write({"op": "update", "id": entry.id, **{k: getattr(entry, k) for k in _UPDATED}})
        self._push(entry)
        return True

    def done(self, entry):
        """Forget an entry (delivered, given up, or found to be a duplicate)."""
        if self._entries.pop(entry.id, None) is None:
            return
        if self._by_key.get(entry.key) == entry.id:
            del self._by_key[entry.key]
        self._write({"op": "done", "id": entry.id})
        if self._journal.lines > max(self.compact_min_lines, 4 * len(self._entries)):
            self.compact()

    def _next_due(self, now, first_failed, attempts):
        return min(now + self.delay(attempts), first_failed + self.horizon)

    # -- what is due -------------------------------------------------------------------------

    def _push(self, entry):
        heapq.heappush(self._heap, (entry.due, next(self._seq), entry.id, entry))

    def _live(self, item):
        due, _, entry_id, entry = item
        return self._entries.get(entry_id) is entry and entry.due == due

    def next_due(self):
        """The time the next entry is due, or None when the queue is empty."""
        heap = self._heap
        while heap and not self._live(heap[0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def pop_due(self, now=None):
        """The entries due now, earliest first. They stay in the queue (and on disk) until
        L{failed_again} reschedules them or L{done} removes them."""
        now = self.clock.seconds() if now is None else now
        due = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            item = heapq.heappop(heap)
            if self._live(item):
                due.append(item[3])
        return due

    # -- the file -----------------------------------------------------------------------------

    def _write(self, record):
        self._journal.append(json_line(record))

    def compact(self):
        """Rewrite the file with the pending entries only (temporary file, fsync, rename); a
        Deferred firing when done."""
        return self._journal.rewrite(
            json_line({"op": "add", "entry": attrs.asdict(entry)})
            for entry in self._entries.values()
        )

    def close(self):
        """Close the file once its pending disk work is done; a Deferred."""
        return self._journal.close()
