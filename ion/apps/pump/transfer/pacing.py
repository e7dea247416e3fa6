"""Bandwidth limits: token buckets on the reactor's clock, shared by every transfer of a scope.

A L{Pacer} holds C{rate} bytes per second for one scope (a subscription, a sender, a
transfer service, or one server of theirs). Transfers spend what they move as it moves
(L{Pacer.spend}); a pacer in debt says how long to wait before moving more, and the
transfer waits that long without reading (its connection paused, or no further request
sent), never by sleeping in a thread. Every transfer of the scope, parallel blocks of one
file included, spends from the same bucket, so together they keep to the rate: each one
ahead of its share simply waits longer.

The bucket holds at most C{burst} bytes (a quarter second of the rate, at least 64 KiB), so
a scope idle for a while starts with that much and no more. A chunk is spent after it was
read, so the scope goes at most one chunk per transfer past the bucket before waiting.

L{PacedSink} wraps a receiving file (an L{ion.apps.pump.transfer.inflight.InflightFile}):
it reports itself backlogged while its pacers are in debt, so every scheme's existing pause
(an http or ftp connection's C{pauseProducing}, the next sftp read waiting) paces it. L{take}
is the same for a sender's writes and for anything that moves bytes in steps.
"""

from twisted.internet.defer import gatherResults, succeed
from twisted.internet.task import deferLater

MIN_BURST = 64 * 1024
# Hosts with an idle pacer are forgotten once this many are known.
MAX_IDLE_HOSTS = 256


class Pacer:
    """A token bucket of C{rate} bytes per second on C{clock} (see the module docstring)."""

    def __init__(self, clock, rate, burst=None):
        if rate <= 0:
            raise ValueError(f"rate must be > 0 bytes/s, got {rate!r}")
        self.clock = clock
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(MIN_BURST, rate / 4))
        self._tokens = self.burst
        self._stamp = clock.seconds()

    def _refill(self):
        now = self.clock.seconds()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    @property
    def tokens(self):
        """Bytes that may move now without waiting (negative: the debt)."""
        self._refill()
        return self._tokens

    def spend(self, count):
        """Note C{count} bytes moved; the seconds to wait before moving more (0: none)."""
        self._refill()
        self._tokens -= count
        return self.delay()

    def delay(self):
        """Seconds until the debt is paid (0 when there is none)."""
        self._refill()
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    @property
    def idle(self):
        """Whether the bucket is full: nobody moved anything for a while."""
        return self.tokens >= self.burst


def wait(clock, pacers):
    """A Deferred that fires once none of C{pacers} is in debt (at once when none is)."""
    delay = max((pacer.delay() for pacer in pacers), default=0.0)
    if delay <= 0:
        return succeed(None)
    # Several transfers may wake together and spend again: each wakes, looks again, and
    # waits on if another one took the tokens first.
    return deferLater(clock, delay, lambda: None).addCallback(lambda _: wait(clock, pacers))


async def take(clock, pacers, count):
    """Spend C{count} bytes from each of C{pacers}, then wait until none is in debt."""
    for pacer in pacers:
        pacer.spend(count)
    await wait(clock, pacers)


class PacedSink:
    """
    A receiving file whose source is paced: L{write} spends the bytes from C{pacers} and,
    while any is in debt, L{backlogged} is true and L{drained} waits for it to be paid (and
    for the file's own disk backlog). Everything else is the file's own.

    @ivar pacing: whether the last backlog was the pacers' (not the disk's): the scheme's
        idle timer does not count that wait as the server's silence.
    """

    def __init__(self, sink, pacers, clock):
        self._sink = sink
        self._pacers = tuple(pacers)
        self._clock = clock
        self.pacing = False

    def __getattr__(self, name):
        return getattr(self._sink, name)

    def write(self, data):
        self._sink.write(data)
        for pacer in self._pacers:
            pacer.spend(len(data))

    @property
    def backlogged(self):
        in_debt = any(pacer.delay() > 0 for pacer in self._pacers)
        self.pacing = in_debt and not self._sink.backlogged
        return in_debt or self._sink.backlogged

    def drained(self):
        return gatherResults(
            [self._sink.drained(), wait(self._clock, self._pacers)], consumeErrors=True
        ).addCallback(lambda _: None)


class Pacers:
    """
    The pacers of one process's transfers: one for all of them (C{rate}, bytes/s) and one per
    server (C{per_host}); either may be None for no limit. L{for_host} gives those a transfer
    to C{(scheme, host, port)} spends from.
    """

    def __init__(self, clock, rate=None, per_host=None):
        self.clock = clock
        self.rate = rate
        self.per_host = per_host
        self.shared = None if rate is None else Pacer(clock, rate)
        self._hosts = {}

    @property
    def limited(self):
        return self.rate is not None or self.per_host is not None

    def for_host(self, key):
        """The pacers (a tuple, maybe empty) of a transfer to the server C{key}."""
        pacers = () if self.shared is None else (self.shared,)
        if self.per_host is None:
            return pacers
        pacer = self._hosts.get(key)
        if pacer is None:
            if len(self._hosts) >= MAX_IDLE_HOSTS:
                # A long-running pump sees many servers: forget those nobody is using.
                for other in [k for k, p in self._hosts.items() if p.idle]:
                    del self._hosts[other]
            pacer = self._hosts[key] = Pacer(self.clock, self.per_host)
        return pacers + (pacer,)
