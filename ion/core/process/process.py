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

import contextvars
import inspect
import os

from twisted.internet import defer
from twisted.logger import Logger

from ion.core.conversation.conversation import Conversations
from ion.core.conversation.errors import ApplicationError
from ion.core.messaging import names, subscription
from ion.core.messaging.transport import ConnectionLost
from ion.core.process import statedir
from ion.core.process.lifecycle import ACTIVE, IllegalTransition, Lifecycle

CONFIG = "ion.core.process"

# The participant conversation being served in the current task (identity flows from it).
_serving = contextvars.ContextVar("ion_serving", default=None)


def explicit_agree(op):
    """Mark a request op that calls `self.conversation.agree()` or `.refuse(reason)` itself;
    other ops agree automatically when they start."""
    op.explicit_agree = True
    return op


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
        self.conversations = Conversations(
            container.messenger, container.clock, container.config, pid, self.name
        )
        self._own_consumer = None
        self._subscriptions = []
        self._inflight = set()
        self._exit_observers = []
        self._claims = []

    def __repr__(self):
        return f"<{type(self).__name__} {self.name} ({self.pid}) {self.state}>"

    @property
    def state(self):
        return self.lifecycle.state

    def config(self, key, default=None, module=CONFIG):
        """A config value, looked up now (config layers may change while the container runs)."""
        return self.container.config.get(module, key, default)

    def claim_directory(self, path):
        """Make the directory C{path} (created if missing) this process's own until it ends,
        however it ends: a second process claiming it meanwhile, in this container or in any
        other process, fails with L{statedir.DirectoryInUse} naming the owner. For state that
        two writers would corrupt (caches, journals, queues kept on disk)."""
        owner = f"{os.getpid()} {self.container.id}"
        self._claims.append(statedir.claim(path, owner))

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
        except BaseException as e:
            self.lifecycle.fail()
            if isinstance(e, ValueError) or getattr(e, "bad_input", False):
                # Bad arguments or configuration (the convention of every check, also for a
                # supervisor's child): the message says it all, a traceback would hide it.
                self.log.error(
                    "{proc!r}: lifecycle hook {hook} failed: {error}",
                    proc=self,
                    hook=hook.__name__,
                    error=e,
                )
            else:
                self.log.failure(
                    "{proc!r}: lifecycle hook {hook} failed", proc=self, hook=hook.__name__
                )
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

    async def crash(self, reason):
        """-> FAILED now, without running on_terminate: what a crash looks like to the
        supervisor. Releases the queue (open calls fail), terminates the children (last spawned
        first), then tells the exit observers. IllegalTransition if already TERMINATED/FAILED."""
        self.lifecycle.fail()
        self.log.error("{proc!r} crashed: {reason}", proc=self, reason=reason)
        await self._release()
        for child in reversed(list(self.children)):
            if not child.lifecycle.final:
                try:
                    await child.terminate()
                except Exception:
                    self.log.failure("{proc!r}: child {child!r} failed to terminate", proc=self, child=child)
        self._notify_exit()

    async def _stop_serving(self):
        """Stop taking new work: cancel subscriptions (unacked messages go back to their
        queues). Services also stop consuming their service queue."""
        subscriptions, self._subscriptions = self._subscriptions, []
        for consumer in subscriptions:
            try:
                await consumer.cancel()
            except ConnectionLost:
                pass

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
        claims, self._claims = self._claims, []
        for claim in claims:
            claim.release()
        await self._stop_serving()
        self.conversations.fail_all(f"{self.name} terminated")
        self.conversations.close()
        consumer, self._own_consumer = self._own_consumer, None
        if consumer is not None:
            try:
                await consumer.cancel()
                await self.container.messenger.delete_receiver(self.pid)
            except ConnectionLost:
                pass  # the queue went with the connection
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

    def op_ping(self, content, headers):
        """Every process answers ping: who and where it is."""
        return {"pid": self.pid, "name": self.name, "state": self.state,
                "container": self.container.id}

    @property
    def conversation(self):
        """The conversation being served by the op running now (None outside ops)."""
        return _serving.get()

    def _open(self, protocol, dest, op, content, timeout):
        serving = _serving.get()
        user_id = serving.user_id if serving is not None else None
        if timeout is None and protocol != "inform":
            timeout = self.config("rpc_timeout", 15)
        return self.conversations.initiate(protocol, dest, op, content, timeout, user_id)

    def rpc(self, dest, op, content=None, timeout=None):
        """Call op on dest (a service name or pid). Returns a Deferred of the reply content,
        failing with RemoteError, ConversationTimeout or NoSuchReceiver. Many calls may be in
        flight; cancelling the Deferred ends the conversation (a late reply is dropped)."""
        return self._open("rpc", dest, op, content, timeout).when_done()

    def request(self, dest, op, content=None, timeout=None):
        """Start a FIPA request. Returns the Conversation: `await conv.when_agreed()` (fails
        with Refused), `await conv.when_done()` for the result."""
        return self._open("request", dest, op, content, timeout)

    async def send(self, dest, op, content=None):
        """One-way message (inform) to dest; raises NoSuchReceiver if nobody listens there."""
        await self._open("inform", dest, op, content, None).when_done()

    async def subscribe(self, exchange, keys, handler, queue=None, **options):
        """Consume raw (non-envelope) messages from `exchange` bound with topic patterns
        `keys`: handler(delivery) gets `body`, `routing_key`, `properties` (with the trusted
        `user_id`), `redelivered`, and must `ack()` or `nack(requeue)` each one. The queue is
        durable and named `queue` (default: an exclusive one named after this process).
        Options: exchange_type, durable, exclusive, auto_delete, prefetch. The subscription
        ends when the process stops serving."""
        if queue is None:
            queue = f"{self.pid}.sub{len(self._subscriptions) + 1}"
            options.setdefault("exclusive", True)
            options.setdefault("auto_delete", True)
            options.setdefault("durable", False)
        consumer = await subscription.subscribe(
            self.container.messenger.transport, exchange, queue, list(keys), handler, **options
        )
        self._subscriptions.append(consumer)
        return consumer

    async def publish(self, exchange, routing_key, body, **options):
        """Publish a raw message (bytes) to exchange; fires when the broker confirmed it.
        Options: headers, content_type, persistent (default True), mandatory, declare."""
        await subscription.publish(
            self.container.messenger.transport, exchange, routing_key, body, **options
        )

    async def bind(self, queue, exchange, keys, exchange_type="topic", durable=True):
        """Bind the existing `queue` to `exchange` (declared first: `exchange_type`, `durable`)
        with each routing pattern of `keys`, so that the queue's one consumer also receives
        what is published there."""
        transport = self.container.messenger.transport
        await transport.declare_exchange(exchange, exchange_type, durable=durable)
        for key in [keys] if isinstance(keys, str) else keys:
            await transport.bind(queue, exchange, key)

    async def queue_depth(self, queue):
        """The number of messages waiting in `queue` on the broker (not counting those
        delivered and not yet acked); NotFound when it does not exist."""
        return await self.container.messenger.transport.queue_depth(queue)

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
        conv = self.conversations.receive(msg.headers, msg.content)
        if conv is None:
            msg.ack()
            return
        d = defer.Deferred.fromCoroutine(self._serve(msg, conv))
        d.addErrback(lambda f: self.log.failure("{proc!r}: serving a message failed", f, proc=self))

    def _identity(self, msg):
        """Who this request acts for: the broker-validated sender, or, from a peer of our own
        system (same broker user), the identity it was acting for."""
        claimed = msg.headers.get("user-id")
        if claimed and msg.user_id == self.container.transport.user:
            return claimed
        return msg.user_id

    async def _serve(self, msg, conv):
        headers = msg.headers
        conv.user_id = self._identity(msg)
        headers["user-id"] = conv.user_id
        # This coroutine runs in its own copy of the context (Deferred.fromCoroutine), so the
        # value never leaks to other tasks and needs no reset.
        _serving.set(conv)
        # Registered before the op runs: the op may hand control to others (who may terminate
        # this process) before it returns.
        done = defer.Deferred()
        self._inflight.add(done)
        try:
            try:
                method = self._op(headers.get("op"))
                if conv.protocol == "request" and not getattr(method, "explicit_agree", False):
                    await conv.agree()
                result, error = await _maybe_await(method(msg.content, headers)), None
            except ApplicationError as e:
                result, error = None, e
            except Exception as e:
                self.log.failure(
                    "{proc!r}: op {op!r} raised; the caller gets a 500", proc=self, op=headers.get("op")
                )
                result, error = None, e
            try:
                await self.conversations.finish(conv, result, error)
            except Exception:
                self.log.failure("{proc!r}: could not answer {to}", proc=self, to=conv.peer)
        finally:
            self._inflight.discard(done)
            done.callback(None)
            msg.ack()

    def _op(self, op):
        if self.state != ACTIVE:
            raise ApplicationError(f"{self.name} is not active ({self.state})", code=503)
        method = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
        if method is None:
            raise ApplicationError(f"{self.name} has no op {op!r}", code=404)
        return method

    async def _dispatch(self, headers, content):
        return await _maybe_await(self._op(headers.get("op"))(content, headers))


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
            try:
                await consumer.cancel()
            except ConnectionLost:
                pass
        await super()._stop_serving()
