"""Timeouts and per-host concurrency limits for transfers."""

import attrs
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore
from twisted.python.failure import Failure

from ion.core.credentials import url_parts


@attrs.frozen
class Timeouts:
    """
    @ivar connect: seconds to set up a connection (TCP, TLS or SSH handshake, login).
    @ivar idle: seconds without a byte from the server before a transfer is abandoned.
    """

    connect: float = 10
    idle: float = 30


class IdleTimer:
    """
    Calls C{expire} once when C{touch} has not been called for C{seconds} (C{first} seconds
    before the first touch, when given: e.g. connect plus idle timeouts).

    C{expire} may be replaced as the transfer goes from one phase to the next. Touching only
    records the time: the timer is rescheduled when it fires early, so a transfer delivering
    many small chunks costs no timer churn.
    """

    def __init__(self, reactor, seconds, expire=None, first=None):
        self.expire = expire
        self.expired = False
        self._reactor = reactor
        self._seconds = seconds
        self._deadline = reactor.seconds() + (seconds if first is None else first)
        self._call = reactor.callLater(self._deadline - reactor.seconds(), self._check)

    def touch(self):
        """Note activity: the countdown starts again."""
        self._deadline = self._reactor.seconds() + self._seconds
        if self._call is not None and self._call.getTime() > self._deadline:
            # Only after a longer first delay can the new deadline come before the call.
            self._call.reset(self._seconds)

    def stop(self):
        """Never fire."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _check(self):
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


def host_key(url):
    """The C{(scheme, host, port)} a URL connects to; local files all share one key."""
    scheme, host, port, *_ = url_parts(url)  # the URL was checked when it was located
    if scheme == "file":
        return ("file", "", 0)
    return (scheme, host, port)


class HostLimiter:
    """
    At most C{per_host} transfers at a time to each C{(scheme, host, port)}.

    One limiter is shared by all the transfers of a process; pass it as C{limiter=}.
    """

    def __init__(self, per_host=4):
        if per_host < 1:
            raise ValueError(f"per_host must be at least 1, got {per_host!r}")
        self.per_host = per_host
        self._semaphores = {}

    async def acquire(self, url):
        """Wait for a slot for C{url}'s host; returns the key to give to L{release}."""
        key = host_key(url)
        semaphore = self._semaphores.get(key)
        if semaphore is None:
            semaphore = self._semaphores[key] = DeferredSemaphore(self.per_host)
        await semaphore.acquire()
        return key

    def release(self, key):
        """Free the slot taken by L{acquire}."""
        semaphore = self._semaphores[key]
        semaphore.release()
        # Idle hosts are forgotten so a long-running pump does not collect one per host seen.
        # (Releasing may have run a waiter to completion, which already forgot this one.)
        if semaphore.tokens == semaphore.limit and self._semaphores.get(key) is semaphore:
            del self._semaphores[key]

    def active(self, url):
        """How many transfers to C{url}'s host hold a slot now."""
        semaphore = self._semaphores.get(host_key(url))
        return 0 if semaphore is None else semaphore.limit - semaphore.tokens
