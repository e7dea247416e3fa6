"""The capability container: the composition root that wires config, transport and processes.

One container = one broker connection (transport), one system (sysname), a process registry
and the apps it runs. Several containers may live in one OS process (tests do this): nothing
here is global, the reactor and config are passed in.
"""

import os
import socket

from twisted.application.internet import backoffPolicy
from twisted.internet import task
from twisted.logger import Logger

from ion.core.app.controller import AppController
from ion.core.messaging import codec
from ion.core.messaging.messenger import Messenger
from ion.core.messaging.transport import TransportError
from ion.core.process.registry import ProcessRegistry, resolve

log = Logger()

MESSAGING = "ion.core.messaging"


def default_container_id():
    """C{<host>_<pid>}, the host's short name with characters that routing keys dislike replaced."""
    host = socket.gethostname().split(".")[0] or "localhost"
    host = "".join(c if c.isalnum() or c == "-" else "-" for c in host)
    return f"{host}_{os.getpid()}"


def check_broker_url(url):
    """The URL's scheme (C{memory}, C{amqp} or C{amqps}); ValueError (never quoting a password)
    when C{url} cannot name a broker. C{url} may list several amqp[s]:// brokers, tried in
    turn (see L{ion.core.messaging.amqp.split_urls}). No connection is made."""
    from ion.core.messaging.amqp import AmqpAddress, split_urls

    urls = split_urls(url)
    schemes = {one.split(":", 1)[0].lower() for one in urls}
    if len(urls) > 1 and (not schemes <= {"amqp", "amqps"} or len(schemes) > 1):
        raise ValueError(
            "a list of brokers must be all amqp:// or all amqps:// URLs (memory:// is one "
            "in-process broker)"
        )
    scheme = schemes.pop()
    if scheme == "memory":
        if url.lower() != "memory://":
            # the embedded broker has no host, port or path: anything there is a mistake
            raise ValueError("a memory:// broker URL takes no host or path: write memory://")
        return scheme
    if scheme not in ("amqp", "amqps"):
        raise ValueError(
            f"unsupported broker URL scheme {scheme!r}: use memory://, amqp:// or amqps://"
        )
    for one in urls:
        AmqpAddress.parse(one)
    return scheme


def make_transport(url, reactor, memory_broker=None, **tls_files):
    """The transport for a broker URL: C{memory://} or C{amqp[s]://user:pass@host:port/vhost}.
    C{tls_files} (C{tls_ca_file}, C{tls_cert_file}, C{tls_key_file}, see AmqpTransport) are read
    for amqps:// now: ValueError when they cannot be used or the URL is not amqps://."""
    if check_broker_url(url) == "memory":
        from ion.core.messaging.memory import MemoryBroker, MemoryTransport

        if any(path is not None for path in tls_files.values()):
            raise ValueError("a CA file, client certificate or key needs an amqps:// URL")
        return MemoryTransport(memory_broker or MemoryBroker(), reactor)
    from ion.core.messaging.amqp import AmqpTransport

    return AmqpTransport(url, reactor, **tls_files)


class Container:
    """A running container. Start with C{await start()}, stop with C{await stop()}."""

    def __init__(
        self, config, reactor, transport, container_id=None, sysname=None, res_dir="res", clock=None
    ):
        self.config = config
        self.reactor = reactor
        # Every timer and timestamp of the container and its processes (see
        # docs/ARCHITECTURE.md, "Time"); tests pass a task.Clock.
        self.clock = clock or reactor
        self.transport = transport
        self.id = container_id or default_container_id()
        self.sysname = sysname or config.get(MESSAGING, "sysname", "ion")
        self.res_dir = res_dir
        limits = codec.Limits.from_config(config.section(MESSAGING))
        self.messenger = Messenger(transport, self.sysname, self.clock, limits, config)
        self.metrics = self.messenger.metrics
        self.registry = ProcessRegistry(self.id)
        self.apps = AppController(self)
        self.running = False
        # How to reach the broker again (another connection, an instance's OS process): set
        # by whoever made the transport (the service, make_container); None for memory://.
        self.broker_url = None
        self.broker_tls = {}

    def __repr__(self):
        return f"<Container {self.id} sysname={self.sysname}>"

    async def start(self, connect_retry=0):
        """Connect, then open the messenger. A broker that cannot be reached fails the start,
        at once with C{connect_retry=0}, else after trying again with backoff (2 s doubling
        up to 30 s, one warning per failed attempt) for up to C{connect_retry} seconds: a
        pump started at machine boot before its broker then comes up once the broker does."""
        self.transport.on_connection_lost(self._connection_lost)
        await self._connect(connect_retry)
        await self.messenger.start()
        self.running = True
        log.info("container {id} started in system {sysname}", id=self.id, sysname=self.sysname)

    async def _connect(self, retry_for):
        policy = backoffPolicy(initialDelay=1.0, maxDelay=30.0, factor=2.0, jitter=lambda: 0)
        give_up = self.clock.seconds() + retry_for
        attempt = 0
        while True:
            try:
                return await self.transport.connect()
            except TransportError as e:
                attempt += 1
                delay = policy(attempt)
                if self.clock.seconds() + delay > give_up:
                    if attempt > 1:
                        raise type(e)(f"{e} (gave up after {attempt} attempts)") from None
                    raise
                log.warn("broker not reached (attempt {attempt}, next in {delay:.0f} s): {error}",
                         error=e, attempt=attempt, delay=delay)
                await task.deferLater(self.clock, delay, lambda: None)

    def _connection_lost(self, error):
        """Calls in flight cannot get their answers any more: fail them now."""
        for proc in self.registry:
            proc.conversations.fail_open(error)

    async def stop(self):
        """Stop apps (reverse start order), then remaining processes (newest first), then the
        connection; under twistd the services of ion.core.cc.service take these steps."""
        if not self.running:
            return
        self.running = False
        await self.apps.stop_all()
        await self.stop_processes()
        await self.close_connection()

    async def stop_processes(self):
        """Terminate the top-level processes still running, newest first."""
        for proc in reversed(self.registry.top_level()):
            if not proc.lifecycle.final:
                try:
                    await proc.terminate()
                except Exception:
                    log.failure("could not terminate {proc!r}", proc=proc)

    async def close_connection(self):
        """The last step of a stop: the last container of the system removes the system's
        exchanges, then the connection closes."""
        self.running = False
        if await self.messenger.remove_exchanges():
            log.info("system {sysname}: last container, exchanges removed", sysname=self.sysname)
        await self.transport.close()
        log.info("container {id} stopped", id=self.id)

    def open_broker(self, url):
        """A new, unconnected transport for one process (see
        L{ion.core.process.Process.open_broker}) working on another broker (a pump's flow on a
        remote pump): C{amqp[s]://} or C{mqtt[s]://}, the password from the default
        credentials file when the URL names a user and no password (see
        L{ion.core.cc.tap.broker_url_with_password}). ValueError (never quoting a password)
        for another scheme or an unusable URL."""
        from ion.core.cc.tap import broker_url_with_password

        scheme = url.split(":", 1)[0].lower()
        if scheme in ("mqtt", "mqtts"):
            from ion.core.messaging.mqtt import MqttTransport

            return MqttTransport(broker_url_with_password(url), self.reactor)
        if scheme not in ("amqp", "amqps"):
            raise ValueError(
                f"unsupported broker URL scheme {scheme!r} for a flow: use amqp[s]:// or mqtt[s]://"
            )
        return make_transport(broker_url_with_password(url), self.reactor)

    @property
    def embedded_broker(self):
        """True on memory://: the broker lives in this OS process, no other can reach it."""
        return getattr(self.transport, "broker", None) is not None

    def open_connection(self):
        """A new, unconnected transport to this container's own broker: the embedded one's
        when the transport is memory://, else one for C{broker_url} (TransportError when it was
        not given)."""
        broker = getattr(self.transport, "broker", None)
        if broker is not None:
            return make_transport("memory://", self.reactor, broker)
        if self.broker_url is None:
            raise TransportError(f"container {self.id}: no broker URL to open another connection")
        return make_transport(self.broker_url, self.reactor, **self.broker_tls)

    async def spawn(self, spec, name=None, args=None, parent=None):
        """Create, initialize and activate a process; returns it once it can receive."""
        cls = resolve(spec)
        proc = cls(self, self.registry.next_pid(), name=name, args=args, parent=parent)
        self.registry.add(proc)
        try:
            await proc.initialize()
            await proc.activate()
        except BaseException:
            if not proc.lifecycle.final:
                await proc.terminate()
            self.registry.remove(proc)
            raise
        log.info("spawned {proc!r}", proc=proc)
        return proc

    async def terminate(self, pid_or_name):
        proc = self.registry.get(pid_or_name)
        if proc is None:
            raise KeyError(f"no process {pid_or_name!r} in container {self.id}")
        await proc.terminate()
        return proc

    def ps(self):
        """Rows (pid, name, class, state, parent pid) of the live processes, in spawn order."""
        return [
            (p.pid, p.name, type(p).__name__, p.state, p.parent.pid if p.parent else "")
            for p in self.registry
        ]
