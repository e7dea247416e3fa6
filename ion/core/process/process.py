"""Processes: the unit of work in a container, addressed by pid and talking only by messages.

A process is a plain class with ops:

    class Greeter(ServiceProcess):
        service = "greeter"

        async def op_greet(self, content, headers):
            return f"hello {content}"

`op_<name>(content, headers)` may be sync or async; its return value is the reply. Raise
`ApplicationError(message, code=4xx)` for an expected failure; any other exception becomes a
500 for the caller (traceback logged here only). Ops run concurrently: a process may call others
while serving a request, and replies still reach it.

Lifecycle hooks `on_init`, `on_activate`, `on_deactivate`, `on_terminate` (sync or async) run on
the transitions of `ion.core.process.lifecycle`. A hook that raises moves the process to FAILED.

The process reaches its container through `self.container`, which offers `messenger`, `config`,
`clock`, `sysname`, `id` and `spawn(...)`.
"""

import inspect

from twisted.internet import defer
from twisted.logger import Logger

from ion.core.conversation.errors import ApplicationError, ProcessTerminated
from ion.core.conversation.rpc import INFORM, REPLIES, REQUEST, Calls, reply
from ion.core.messaging import names
from ion.core.messaging.transport import Unroutable
from ion.core.process.lifecycle import ACTIVE, IllegalTransition, Lifecycle

CONFIG = "ion.core.process"


async def _maybe_await(value):
    if inspect.isawaitable(value):
        return await value
    return value


class Process:
    """A lifecycle-managed process with its own queue (see the module docstring)."""

    def __init__(self, container, pid, name=None, args=None, parent=None):
        self.container = container
        self.pid = pid
        self.name = name or pid
        self.args = dict(args or {})
        self.parent = parent
        self.children = []
        self.lifecycle = Lifecycle()
        self.log = Logger(namespace=type(self).__module__, source=self)
        self.calls = Calls(container.messenger, container.clock, pid, self.name)
        self._own_consumer = None
        self._inflight = set()
        self._exit_observers = []

    def __repr__(self):
        return f"<{type(self).__name__} {self.name} ({self.pid}) {self.state}>"

    @property
    def state(self):
        return self.lifecycle.state

    def config(self, key, default=None, module=CONFIG):
        """A config value, looked up now (config layers may change while the container runs)."""
        return self.container.config.get(module, key, default)

    # -- lifecycle hooks (override) --------------------------------------------------------

    def on_init(self):
        pass

    def on_activate(self):
        pass

    def on_deactivate(self):
        pass

    def on_terminate(self):
        pass

    # -- lifecycle transitions ------------------------------------------------------------

    async def _run_hook(self, hook):
        try:
            await _maybe_await(hook())
        except BaseException:
            self.lifecycle.fail()
            self.log.failure("{proc!r}: lifecycle hook {hook} failed", proc=self, hook=hook.__name__)
            await self._release()
            self._notify_exit()
            raise

    async def initialize(self):
        """INIT -> READY: bind the process queue (it can receive from now on), run on_init."""
        self.lifecycle.initialize()
        messenger = self.container.messenger
        try:
            await messenger.declare_receiver(self.pid, self.pid, exclusive=True, auto_delete=True)
            self._own_consumer = await messenger.listen(self.pid, self._receive)
        except BaseException:
            self.lifecycle.fail()
            await self._release()
            raise
        await self._run_hook(self.on_init)

    async def activate(self):
        """READY -> ACTIVE: run on_activate, then serve ops."""
        self.lifecycle.activate()
        await self._run_hook(self.on_activate)

    async def deactivate(self):
        """ACTIVE -> READY: stop serving ops (replies to our own calls still arrive)."""
        self.lifecycle.deactivate()
        await self._run_hook(self.on_deactivate)

    async def terminate(self, timeout=None):
        """-> TERMINATED: stop serving, wait for in-flight ops (bounded), terminate children
        (last spawned first), run on_terminate, release the queue."""
        if self.lifecycle.final:
            raise IllegalTransition(self.state, "terminate")
        if self.state == ACTIVE:
            await self._stop_serving()
            await self._drain(self.config("terminate_timeout", 10) if timeout is None else timeout)
        for child in reversed(list(self.children)):
            if not child.lifecycle.final:
                try:
                    await child.terminate(timeout)
                except Exception:
                    self.log.failure("{proc!r}: child {child!r} failed to terminate", proc=self, child=child)
        try:
            await _maybe_await(self.on_terminate())
        except BaseException:
            self.lifecycle.fail()
            self.log.failure("{proc!r}: on_terminate failed", proc=self)
        else:
            self.lifecycle.terminate()
        await self._release()
        self._notify_exit()

    async def _stop_serving(self):
        """Hook for subclasses that consume more queues (services)."""

    async def _drain(self, timeout):
        pending = list(self._inflight)
        if not pending:
            return
        done = defer.DeferredList(pending, consumeErrors=True)
        done.addTimeout(timeout, self.container.clock)
        try:
            await done
        except defer.TimeoutError:
            self.log.warn(
                "{proc!r}: {n} ops still running after {t} s; terminating anyway",
                proc=self,
                n=len(pending),
                t=timeout,
            )

    async def _release(self):
        self.calls.fail_all(ProcessTerminated(f"{self.name} terminated"))
        consumer, self._own_consumer = self._own_consumer, None
        if consumer is not None:
            try:
                await consumer.cancel()
                await self.container.messenger.delete_receiver(self.pid)
            except Exception:
                self.log.failure("{proc!r}: could not release its queue", proc=self)

    def add_exit_observer(self, observer):
        """observer(process) is called once the process is TERMINATED or FAILED."""
        self._exit_observers.append(observer)

    def _notify_exit(self):
        observers, self._exit_observers = self._exit_observers, []
        for observer in observers:
            try:
                observer(self)
            except Exception:
                self.log.failure("exit observer of {proc!r} failed", proc=self)

    # -- messaging -------------------------------------------------------------------------

    def rpc(self, dest, op, content=None, timeout=None):
        """Call op on dest (a service name or pid). Returns a Deferred of the reply content,
        failing with RemoteError, ConversationTimeout or NoSuchReceiver. Cancel it to give up."""
        if timeout is None:
            timeout = self.config("rpc_timeout", 15)
        return self.calls.call(dest, op, content, timeout)

    async def send(self, dest, op, content=None):
        """One-way message to dest; raises NoSuchReceiver if nobody listens there."""
        await self.calls.inform(dest, op, content)

    async def spawn_child(self, spec, name=None, args=None):
        """Spawn a process supervised by this one; it is terminated before this one."""
        child = await self.container.spawn(spec, name=name, args=args, parent=self)
        self.children.append(child)
        child.add_exit_observer(self._child_exited)
        return child

    def _child_exited(self, child):
        if child in self.children and child.state != "FAILED":
            self.children.remove(child)

    def _receive(self, msg):
        performative = msg.headers.get("performative")
        if performative in REPLIES:
            self.calls.on_reply(msg.headers, msg.content)
            msg.ack()
        elif performative in (REQUEST, INFORM):
            d = defer.Deferred.fromCoroutine(self._serve(msg))
            d.addErrback(
                lambda f: self.log.failure("{proc!r}: serving a message failed", f, proc=self)
            )
        else:
            self.log.warn(
                "{proc!r}: dropped a message with performative {p!r} from {sender}",
                proc=self,
                p=performative,
                sender=msg.headers.get("sender"),
            )
            msg.ack()

    async def _serve(self, msg):
        headers = msg.headers
        # Registered before the op runs: the op may hand control to others (who may terminate
        # this process) before it returns.
        done = defer.Deferred()
        self._inflight.add(done)
        try:
            if msg.user_id is not None:
                headers["user-id"] = msg.user_id
            try:
                result = await self._dispatch(headers, msg.content)
                error = None
            except ApplicationError as e:
                result, error = None, e
            except Exception as e:
                self.log.failure(
                    "{proc!r}: op {op!r} raised; the caller gets a 500", proc=self, op=headers.get("op")
                )
                result, error = None, e
            if headers.get("performative") == REQUEST and headers.get("reply-to"):
                try:
                    await reply(self.container.messenger, self.pid, headers, result, error)
                except Unroutable:
                    self.log.info(
                        "{proc!r}: the caller {to} of op {op!r} is gone; reply dropped",
                        proc=self,
                        to=headers.get("reply-to"),
                        op=headers.get("op"),
                    )
                except Exception:
                    self.log.failure(
                        "{proc!r}: could not reply to {to}", proc=self, to=headers.get("reply-to")
                    )
        finally:
            self._inflight.discard(done)
            done.callback(None)
            msg.ack()

    async def _dispatch(self, headers, content):
        if self.state != ACTIVE:
            raise ApplicationError(f"{self.name} is not active ({self.state})", code=503)
        op = headers.get("op")
        method = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
        if method is None:
            raise ApplicationError(f"{self.name} has no op {op!r}", code=404)
        return await _maybe_await(method(content, headers))


class ServiceProcess(Process):
    """A process that also serves a named service: all instances of a service share the queue
    `<sysname>.<service>`, and each request goes to one of them (round robin)."""

    service = None

    def __init__(self, container, pid, name=None, args=None, parent=None):
        self.service = (args or {}).get("service") or self.service or name
        if not self.service:
            raise ValueError(f"{type(self).__name__} needs a service name")
        names.check_name("service", self.service)
        super().__init__(container, pid, name or self.service, args, parent)
        self._service_consumer = None

    async def activate(self):
        await super().activate()
        messenger = self.container.messenger
        queue = names.service_queue(messenger.sysname, self.service)
        await messenger.declare_receiver(queue, self.service, exclusive=False, auto_delete=True)
        prefetch = self.config("prefetch", 100, module="ion.core.messaging")
        self._service_consumer = await messenger.listen(queue, self._receive, prefetch=prefetch)

    async def deactivate(self):
        await self._stop_serving()
        await super().deactivate()

    async def _stop_serving(self):
        consumer, self._service_consumer = self._service_consumer, None
        if consumer is not None:
            await consumer.cancel()

    async def _release(self):
        await self._stop_serving()
        await super()._release()
