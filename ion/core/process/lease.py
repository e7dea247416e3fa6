"""Single-active work: one holder at a time of a named lease, among processes of any container
on one broker (the instances of a poll, or the same poll in several containers).

The lease is an exclusive queue, C{lease.<sysname>.<name>}, declared on a connection of the
lease's own (L{Lease} opens it through C{container.open_connection()}): the broker lets one
connection at a time hold an exclusive queue and drops it the moment that connection ends, a
killed holder included (its socket closes). Everyone else gets L{QueueInUse} and tries again
at its next L{Lease.try_acquire}. A separate connection, rather than the container's, because
within one container every process shares that one: on memory:// the instances of a poll live
in one container, each with its own L{MemoryTransport} on the embedded broker.

The holder loses the lease when its connection does: its transport is then closed (no
reconnect: once reconnected, another process may hold the queue) and L{Lease.held} is false
until a later L{Lease.try_acquire} wins it again; C{on_lost} is called. A holder that must not
act twice with another (a poll announcing) checks L{Lease.held} before each step.
"""

from twisted.logger import Logger

from ion.core.messaging.transport import QueueInUse, TransportError

log = Logger()


class Lease:
    """The lease C{name} for C{process} (see the module docstring); C{on_lost()} is called
    when a held lease is lost with the connection."""

    def __init__(self, process, name, on_lost=None):
        self.process = process
        self.name = name
        self.queue = f"lease.{process.container.sysname}.{name}"
        self.on_lost = on_lost
        self.held = False
        self._connection = None
        self._closed = False

    async def try_acquire(self):
        """Hold the lease if no one else does; True when held (now or already)."""
        if self.held or self._closed:
            return self.held
        try:
            if self._connection is None:
                connection = self.process.container.open_connection()
                await connection.connect()
                if self._closed:
                    await connection.close()
                    return False
                connection.on_connection_lost(lambda error: self._lost(connection, error))
                self._connection = connection
            await self._connection.declare_queue(self.queue, exclusive=True)
        except QueueInUse:
            return False
        except TransportError as e:
            log.debug("lease {name}: not acquired: {e}", name=self.name, e=e)
            await self._drop_connection()
            return False
        if self._closed:
            await self._drop_connection()
            return False
        self.held = True
        return True

    def _lost(self, connection, error):
        if connection is not self._connection:
            return
        was_held, self.held = self.held, False
        self._connection = None
        connection.close()
        if was_held:
            log.warn("lease {name}: lost with the broker connection: {e}", name=self.name, e=error)
            if self.on_lost is not None:
                self.on_lost()

    async def _drop_connection(self):
        connection, self._connection = self._connection, None
        self.held = False
        if connection is not None:
            try:
                await connection.close()
            except Exception:
                log.failure("lease {name}: could not close its connection", name=self.name)

    async def release(self):
        """Give the lease up (close its connection: the broker drops the queue); for good."""
        self._closed = True
        await self._drop_connection()
