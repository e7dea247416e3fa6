"""The transfers of one long-running process: settings, limits and resources, start to close.

L{Transfers} holds what every transfer of a process shares: its timeouts, its credentials, its
bounds on a get, a limit of C{parallel} transfers at a time and of C{per_host} to one server
(L{HostLimiter}), a thread pool of C{parallel} threads for the local disk work (the reactor
thread never waits for the disk) and the kept-open http(s) connections (L{HTTPConnections}).
The transfer service and the consumers each own one.

Settings (L{ion.apps.pump.args.TransferSettings} checks them; C{who} names the owner in the
errors):

  - C{timeouts} {connect, idle}: seconds (defaults 10 and 30);
  - C{parallel}: transfers at a time (default 8);
  - C{per_host}: transfers at a time to one server (default 4), at most C{parallel - 1};
  - C{max_size}: the most bytes a get takes (default 10 GiB; None for no limit), as in
    L{ion.apps.pump.transfer.get};
  - C{min_rate}: {bytes_per_s, window} (default 1024 bytes/s over 60 s), a number of bytes per
    second, or 0/None for none: a slower get fails (504, retried later; see L{MinRate});
  - C{byte_rate_max}: bytes per second for all the owner's transfers together, and
    C{host_byte_rate_max} for those to one server (default None: no limit; at least 1024 and
    not below C{min_rate}); reads and sftp, ftp and http puts are paced
    (L{ion.apps.pump.transfer.pacing});
  - C{dead_time}: seconds an sftp or ftp session is kept open, idle, for the next transfer to
    the same server, then logged out and closed (default 180; 0: one session per transfer);
    see L{ion.apps.pump.transfer.sessions};
  - C{credentials}: path of the credentials file (default C{~/.config/ion/credentials.conf} when it
    exists). A file readable by group or others, unreadable or malformed, is refused.
"""

import os

from twisted.python.threadpool import ThreadPool

from ion.apps.pump.args import TransferSettings
from ion.apps.pump.transfer.http import HTTPConnections
from ion.apps.pump.transfer.limits import HostLimiter
from ion.apps.pump.transfer.operations import forget_put, get, list, operate, put
from ion.apps.pump.transfer.pacing import Pacers
from ion.apps.pump.transfer.sessions import Sessions
from ion.core.credentials import DEFAULT_CREDENTIALS, Credentials


def load_credentials(path):
    """The Credentials of C{path}, of the default file when C{path} is None and it exists, or
    None. Raises CredentialsError for an unusable file (missing, not private, malformed)."""
    if path is None:
        default = os.path.expanduser(DEFAULT_CREDENTIALS)
        if not os.path.exists(default):
            return None
        path = default
    return Credentials.load(os.path.expanduser(path))


def _received(sink):
    """Bytes C{sink} received in this run: a resumed partitioned file had some already."""
    return sink.size - getattr(sink, "resumed", 0)


class Received:
    """Bytes received by a process's gets: L{total} since it started (delivered, failed or
    still on their way; it only grows) and L{in_flight}, those of the gets running now."""

    def __init__(self):
        self._running = set()  # their InflightFiles
        self._ended = 0

    def add(self, sink):
        self._running.add(sink)

    def discard(self, sink):
        if sink in self._running:
            self._running.remove(sink)
            self._ended += _received(sink)

    @property
    def in_flight(self):
        return sum(_received(sink) for sink in self._running)

    @property
    def total(self):
        return self._ended + self.in_flight


class Transfers:
    """get, put and list with one process's shared settings and resources (see the module
    docstring; C{settings}: a TransferSettings or the dict of one). Raises ValueError for bad
    settings, CredentialsError for an unusable credentials file; L{close} releases the threads
    and connections."""

    def __init__(self, reactor, settings, who="transfers"):
        checked = TransferSettings.parse(settings, who)
        self.reactor = reactor
        self.timeouts = checked.timeouts
        self.credentials = load_credentials(checked.credentials)
        self.max_size = checked.max_size
        self.min_rate = checked.min_rate
        self.limiter = HostLimiter(checked.per_host, checked.parallel, reactor)
        self.pool = ThreadPool(minthreads=0, maxthreads=checked.parallel, name=who)
        self.pool.start()
        # An owner that crashes never calls close: its threads still stop with the reactor.
        self._trigger = reactor.addSystemEventTrigger("during", "shutdown", self.pool.stop)
        self.http_connections = HTTPConnections(reactor, checked.per_host)
        self.received = Received()
        self.sending = set()  # the puts in blocks running (OutgoingBlocks), for progress
        self.pacers = Pacers(reactor, checked.byte_rate_max, checked.host_byte_rate_max)
        self.sessions = Sessions(reactor, checked.dead_time, checked.per_host)
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
        await self.sessions.close()

    # The operations are coroutines handed back as they are: a coroutine layer of our own
    # around each would be passed through on every step of every transfer.
    def _run(self, operation, *args, **kwargs):
        # The limiter holds both the per-server and the `parallel` slots.
        return operation(
            self.reactor,
            *args,
            **kwargs,
            timeouts=self.timeouts,
            credentials=self.credentials,
            limiter=self.limiter,
            pool=self.pool,
            http_connections=self.http_connections,
            pacers=self.pacers if self.pacers.limited else None,
            sessions=self.sessions,
        )

    def get(self, url, path, **options):
        """L{ion.apps.pump.transfer.get} of C{url} into C{path} (options: expected_size,
        expected_checksum, cod, mtime, mode, dest_root), bounded by C{max_size} and C{min_rate}:
        the coroutine."""
        options.setdefault("max_size", self.max_size)
        options.setdefault("min_rate", self.min_rate)
        return self._run(get, url, path, active=self.received, **options)

    def put(self, path, url, **options):
        """L{ion.apps.pump.transfer.put} of C{path} to C{url} (options: blocks, record_dir,
        version); a put in blocks is in L{sending} while it runs. The coroutine."""
        return self._run(put, path, url, active=self.sending, **options)

    def forget_put(self, url, size, **options):
        """L{ion.apps.pump.transfer.operations.forget_put} of a put to C{url} of C{size} bytes
        given up for good (options: blocks, record_dir, version, as given to L{put}): the
        coroutine."""
        return self._run(forget_put, url, size, **options)

    def list(self, url, unless=None):
        """L{ion.apps.pump.transfer.list} of C{url} (C{unless}: a page digest): the
        coroutine."""
        return self._run(list, url, unless=unless)

    def operate(self, url, op, old=None, target=None):
        """L{ion.apps.pump.transfer.operate}: the coroutine."""
        return self._run(operate, url, op, old=old, target=target)
