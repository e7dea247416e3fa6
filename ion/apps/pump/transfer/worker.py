"""The transfers of one long-running process: settings, limits and resources, start to close.

`Transfers` holds what every transfer of a process shares: its timeouts, its credentials, a
limit of `parallel` transfers at a time and of `per_host` at a time to one server, a thread
pool of `parallel` threads for the local disk work (create, write, fsync, rename: the reactor
thread never waits for the disk) and the kept-open http(s) connections (at most `per_host` idle
ones to a server). The transfer service and the consumers each own one.

Settings (`check_settings` validates them; `who` names the owner in the errors):

- `timeouts` {connect, idle}: seconds (defaults 10 and 30);
- `parallel`: transfers at a time (default 8);
- `per_host`: transfers at a time to one server (default 4);
- `credentials`: path of the credentials file (default `~/.config/ion/credentials.conf` when it
  exists). A file readable by group or others, unreadable or malformed, is refused.
"""

import os

from twisted.internet.defer import DeferredSemaphore
from twisted.python.threadpool import ThreadPool

from ion.apps.pump.transfer.credentials import Credentials
from ion.core.credentials import DEFAULT_CREDENTIALS
from ion.apps.pump.transfer.http import HTTPConnections
from ion.apps.pump.transfer.limits import HostLimiter, Timeouts
from ion.apps.pump.transfer.operations import get, list, put

SETTINGS = ("credentials", "parallel", "per_host", "timeouts")


def load_credentials(path):
    """The Credentials of `path`, of the default file when `path` is None and it exists, or
    None. Raises CredentialsError for an unusable file (missing, not private, malformed)."""
    if path is None:
        default = os.path.expanduser(DEFAULT_CREDENTIALS)
        if not os.path.exists(default):
            return None
        path = default
    return Credentials.load(os.path.expanduser(path))


def _number(value, what, who):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{who}: {what} must be a number > 0, got {value!r}")
    return value


def _count(value, what, who):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{who}: {what} must be an int >= 1, got {value!r}")
    return value


def check_settings(settings, who="transfers"):
    """`settings` with defaults filled in; ValueError naming the bad one otherwise."""
    if not isinstance(settings, dict):
        raise ValueError(f"{who}: transfer settings must be a dict, got {settings!r}")
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ValueError(
            f"{who}: unknown transfer setting {unknown[0]!r}; valid ones are {', '.join(SETTINGS)}"
        )
    timeouts = settings.get("timeouts") or {}
    if not isinstance(timeouts, dict) or set(timeouts) - {"connect", "idle"}:
        raise ValueError(
            f"{who}: timeouts must be a dict with keys connect and idle, got {timeouts!r}"
        )
    credentials = settings.get("credentials")
    if credentials is not None and (not isinstance(credentials, str) or not credentials):
        raise ValueError(f"{who}: credentials must be a file path, got {credentials!r}")
    return {
        "timeouts": Timeouts(
            connect=_number(timeouts.get("connect", 10), "timeouts connect", who),
            idle=_number(timeouts.get("idle", 30), "timeouts idle", who),
        ),
        "parallel": _count(settings.get("parallel", 8), "parallel", who),
        "per_host": _count(settings.get("per_host", 4), "per_host", who),
        "credentials": credentials,
    }


class Received:
    """Bytes received by a process's gets: `total` since it started (delivered, failed or
    still on their way; it only grows) and `in_flight`, those of the gets running now."""

    def __init__(self):
        self._running = set()  # their InflightFiles
        self._ended = 0

    def add(self, sink):
        self._running.add(sink)

    def discard(self, sink):
        if sink in self._running:
            self._running.remove(sink)
            self._ended += sink.size

    @property
    def in_flight(self):
        return sum(sink.size for sink in self._running)

    @property
    def total(self):
        return self._ended + self.in_flight


class Transfers:
    """get, put and list with one process's shared settings and resources (see the module
    docstring). Raises ValueError for bad settings, CredentialsError for an unusable
    credentials file; `close` releases the threads and connections."""

    def __init__(self, reactor, settings, who="transfers"):
        checked = check_settings(settings, who)
        self.reactor = reactor
        self.timeouts = checked["timeouts"]
        self.credentials = load_credentials(checked["credentials"])
        self.limiter = HostLimiter(checked["per_host"])
        self.slots = DeferredSemaphore(checked["parallel"])
        self.pool = ThreadPool(minthreads=0, maxthreads=checked["parallel"], name=who)
        self.pool.start()
        # An owner that crashes never calls close: its threads still stop with the reactor.
        self._trigger = reactor.addSystemEventTrigger("during", "shutdown", self.pool.stop)
        self.http_connections = HTTPConnections(reactor, checked["per_host"])
        self.received = Received()
        self._closed = False

    async def close(self):
        """Stop the thread pool (waiting only for a disk job still running) and close the
        kept-open connections. Transfers still running are the caller's to cancel first."""
        if self._closed:
            return
        self._closed = True
        self.reactor.removeSystemEventTrigger(self._trigger)
        self.pool.stop()
        await self.http_connections.close()

    async def _run(self, operation, *args, **kwargs):
        await self.slots.acquire()
        try:
            return await operation(
                self.reactor,
                *args,
                **kwargs,
                timeouts=self.timeouts,
                credentials=self.credentials,
                limiter=self.limiter,
                pool=self.pool,
                http_connections=self.http_connections,
            )
        finally:
            if self.slots.waiting:
                # Through the reactor: released here, the next waiter would run inside this
                # call, and a queue of transfers failing at once (a bad URL) would nest one
                # frame deeper each, up to the recursion limit.
                self.reactor.callLater(0, self.slots.release)
            else:
                self.slots.release()

    async def get(self, url, path, **options):
        """`ion.apps.pump.transfer.get` of `url` into `path` (options: expected_size,
        expected_checksum, cod, mtime, mode, dest_root)."""
        return await self._run(get, url, path, active=self.received, **options)

    async def put(self, path, url):
        return await self._run(put, path, url)

    async def list(self, url):
        return await self._run(list, url)
