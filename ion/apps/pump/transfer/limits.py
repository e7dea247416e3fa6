"""Timeouts, the minimum rate, per-host concurrency limits, and Deferred helpers for transfers."""

import collections

import attrs
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore
from twisted.python.failure import Failure

from ion.apps.pump.transfer import origin
from ion.core.credentials import DEFAULT_PORTS, url_parts


@attrs.frozen
class Timeouts:
    """
    @ivar connect: seconds to set up a connection (TCP, TLS or SSH handshake, login).
    @ivar idle: seconds without a byte from the server before a transfer is abandoned.
    """

    connect: float = 10
    idle: float = 30


@attrs.frozen
class MinRate:
    """
    The slowest a transfer may go: at least C{bytes_per_s} on average over every C{window}
    seconds, else it fails as too slow (see L{RateWatch}).
    """

    bytes_per_s: float = 1024
    window: float = 60


class RateWatch:
    """
    Calls C{expire} once when C{count()} (bytes so far) grew by less than C{min_rate.window}
    times C{min_rate.bytes_per_s} over the last C{window} seconds; C{slow} then holds that
    growth. Looked at every quarter of the window, so a transfer that slows down is cut at
    most a quarter window after a whole window went by too slowly.
    """

    STEPS = 4

    def __init__(self, reactor, min_rate, count, expire):
        self.min_rate = min_rate
        self.slow = None
        self._reactor = reactor
        self._count = count
        self._expire = expire
        self._samples = collections.deque([(reactor.seconds(), count())])
        self._step = min_rate.window / self.STEPS
        self._call = reactor.callLater(self._step, self._check)

    def stop(self):
        """Never fire."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _check(self):
        now, count = self._reactor.seconds(), self._count()
        samples = self._samples
        samples.append((now, count))
        window = self.min_rate.window
        # (A little slack: a quarter window added four times may fall a hair short of one.)
        oldest = now - window * (1 - 1e-9)
        # Keep the newest sample at least a window old: the growth since it covers the window.
        while len(samples) > 1 and samples[1][0] <= oldest:
            samples.popleft()
        start, counted = samples[0]
        if start <= oldest and count - counted < self.min_rate.bytes_per_s * window:
            self._call = None
            self.slow = count - counted
            self._expire()
            return
        self._call = self._reactor.callLater(self._step, self._check)


class IdleTimer:
    """
    Calls C{expire} once when C{touch} has not been called for C{seconds} (C{first} seconds
    before the first touch, when given: e.g. connect plus idle timeouts).

    C{expire} may be replaced as the transfer goes from one phase to the next. Touching only
    records the time: the timer is rescheduled when it fires early, so a transfer delivering
    many small chunks costs no timer churn. Its first call comes after C{seconds} at most
    (even when C{first} is longer), so no touch ever has to move it sooner.
    """

    def __init__(self, reactor, seconds, expire=None, first=None):
        self.expire = expire
        self.expired = False
        self._held = False
        self._reactor = reactor
        self._seconds = seconds
        delay = seconds if first is None else first
        self._deadline = reactor.seconds() + delay
        self._call = reactor.callLater(min(delay, seconds), self._check)

    def touch(self):
        """Note activity: the countdown starts again (and a L{hold} ends)."""
        self._held = False
        self._deadline = self._reactor.seconds() + self._seconds

    def hold(self):
        """Do not count the time until the next L{touch}: the transfer is waiting on purpose
        (a bandwidth limit), not for the server."""
        self._held = True

    def stop(self):
        """Never fire (and let C{expire} go: it often refers back to the timer's user)."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self.expire = None

    def _check(self):
        if self._held:
            self._deadline = self._reactor.seconds() + self._seconds
        remaining = self._deadline - self._reactor.seconds()
        if remaining > 0:
            self._call = self._reactor.callLater(remaining, self._check)
            return
        self._call = None
        self.expired = True
        if self.expire is not None:
            self.expire()


def cancellable(d):
    """
    A Deferred with C{d}'s result that fails with C{CancelledError} when cancelled, whatever
    C{d} fails with once cancelled in turn (Twisted's clients fail with their own errors).
    """

    def cancel(outer):
        outer.errback(CancelledError())
        d.cancel()

    outer = Deferred(cancel)

    def forward(result):
        if outer.called:
            return
        if isinstance(result, Failure):
            outer.errback(result)
        else:
            outer.callback(result)

    d.addBoth(forward)
    return outer


class SharedResult:
    """The result of C{d} (a disk job, say) for any number of observers: cancelling an
    observer leaves C{d} running (a thread cannot be stopped) and the others waiting for it."""

    def __init__(self, d):
        self._observers = []
        self._result = None
        self.done = False
        d.addBoth(self._fire)

    def _fire(self, result):
        self.done, self._result = True, result
        observers, self._observers = self._observers, []
        for d in observers:
            self._tell(d)

    def _tell(self, d):
        if d.called:
            return
        if isinstance(self._result, Failure):
            d.errback(self._result)
        else:
            d.callback(self._result)

    def observe(self):
        """A new Deferred with the job's result."""
        d = Deferred()
        if self.done:
            self._tell(d)
        else:
            self._observers.append(d)
        return d


def host_key(url):
    """The C{(scheme, host, port)} a URL connects to; local files all share one key."""
    split = origin.split(url)
    if split is not None:
        where = split[0]
        return (where.scheme, where.host, where.port or DEFAULT_PORTS[where.scheme])
    scheme, host, port, *_ = url_parts(url)  # the URL was checked when it was located
    if scheme == "file":
        return ("file", "", 0)
    return (scheme, host, port)


class HostLimiter:
    """
    At most C{per_host} transfers at a time to each C{(scheme, host, port)} and, with
    C{parallel}, at most C{parallel} in all.

    A transfer takes its server's slot first and one of the C{parallel} ones second, so
    transfers waiting for a busy server hold none of those and transfers to other servers go
    ahead. C{per_host} is lowered to C{parallel - 1} at most (1 when C{parallel} is 1): with
    C{parallel} > 1, one server never holds every slot. With a C{reactor}, a slot someone
    waits for is handed on in the next reactor turn (a queue of transfers failing at once
    would otherwise nest a frame deeper each, up to the recursion limit).

    One limiter is shared by all the transfers of a process; pass it as C{limiter=}.
    """

    def __init__(self, per_host=4, parallel=None, reactor=None):
        if per_host < 1:
            raise ValueError(f"per_host must be at least 1, got {per_host!r}")
        if parallel is not None and parallel < 1:
            raise ValueError(f"parallel must be at least 1, got {parallel!r}")
        if parallel is not None:
            per_host = min(per_host, max(1, parallel - 1))
        self.per_host = per_host
        self.parallel = parallel
        self._total = None if parallel is None else DeferredSemaphore(parallel)
        self._reactor = reactor
        self._semaphores = {}

    async def acquire(self, url):
        """Wait for a slot for C{url}'s host, then for one of all; returns the key to give to
        L{release}."""
        key = host_key(url)
        semaphore = self._semaphores.get(key)
        if semaphore is None:
            semaphore = self._semaphores[key] = DeferredSemaphore(self.per_host)
        await semaphore.acquire()
        if self._total is not None:
            try:
                await self._total.acquire()
            except BaseException:
                self._release_host(key, semaphore)
                raise
        return key

    def release(self, key):
        """Free the slots taken by L{acquire}."""
        if self._total is not None:
            self._hand_on(self._total, self._total.release)
        semaphore = self._semaphores[key]
        self._hand_on(semaphore, self._release_host, key, semaphore)

    def _hand_on(self, semaphore, release, *args):
        if semaphore.waiting and self._reactor is not None:
            self._reactor.callLater(0, release, *args)
        else:
            release(*args)

    def _release_host(self, key, semaphore):
        semaphore.release()
        # Idle hosts are forgotten so a long-running pump does not collect one per host seen.
        # (Releasing may have run a waiter to completion, which already forgot this one.)
        if semaphore.tokens == semaphore.limit and self._semaphores.get(key) is semaphore:
            del self._semaphores[key]

    def active(self, url):
        """How many transfers to C{url}'s host hold a slot now."""
        semaphore = self._semaphores.get(host_key(url))
        return 0 if semaphore is None else semaphore.limit - semaphore.tokens


def slot(limiter, url):
    """Hold one of C{limiter}'s slots for the server of C{url} (none when C{limiter} is None):
    an async context manager."""
    return _Slot(limiter, url)


class _Slot:
    # A class, not an asynccontextmanager generator: one is entered per transfer, and the
    # generator's machinery cost more than the slot itself.
    __slots__ = ("_limiter", "_url", "_key")

    def __init__(self, limiter, url):
        self._limiter = limiter
        self._url = url
        self._key = None

    async def __aenter__(self):
        if self._limiter is not None:
            self._key = await self._limiter.acquire(self._url)
        return self

    async def __aexit__(self, *exc_info):
        self.leave()
        return False

    def leave(self):
        """Give the slot up before the end of the block (once: the end then frees nothing)."""
        if self._limiter is not None:
            limiter, self._limiter = self._limiter, None
            limiter.release(self._key)
