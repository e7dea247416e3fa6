"""Processes: the unit of work in a container, addressed by pid and talking only by messages.

A process is a plain class with ops::

    class Greeter(ServiceProcess):
        service = "greeter"

        async def op_greet(self, content, headers):
            return f"hello {content}"

C{op_<name>(content, headers)} may be sync or async; its return value is the reply. Raise
C{ApplicationError(message, code=4xx)} for an expected failure; any other exception becomes a
500 for the caller (traceback logged here only). Ops run concurrently: a process may call others
while serving a request, and replies still reach it.

Lifecycle hooks C{on_init}, C{on_activate}, C{on_deactivate}, C{on_terminate} (sync or async) run on
the transitions of L{ion.core.process.lifecycle}. A hook that raises moves the process to FAILED.

Raw messages from other exchanges come through C{subscribe(exchange, keys, handler)}: the
handler settles each delivery; the process tracks the deliveries in hand, lets them finish when
it stops and applies the failure policy (one redelivery, then the queue's dead-letter queue).

The process reaches its container through C{self.container}, which offers C{messenger}, C{config},
C{clock}, C{sysname}, C{id} and C{spawn(...)}.
"""

import contextlib
import contextvars
import inspect
import os

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from ion.core.conversation.conversation import Conversations
from ion.core.conversation.errors import ApplicationError, ProcessTerminated
from ion.core.log import redact
from ion.core.messaging import names, subscription
from ion.core.messaging.transport import ConnectionLost, PreconditionFailed
from ion.core.process import statedir
from ion.core.process.lifecycle import ACTIVE, IllegalTransition, Lifecycle

CONFIG = "ion.core.process"
MESSAGING = "ion.core.messaging"

# The participant conversation being served in the current task (identity flows from it).
_serving = contextvars.ContextVar("ion_serving", default=None)


def explicit_agree(op):
    """Mark a request op that calls C{self.conversation.agree()} or C{.refuse(reason)} itself;
    other ops agree automatically when they start."""
    op.explicit_agree = True
    return op


async def _maybe_await(value):
    if inspect.isawaitable(value):
        return await value
    return value


async def _cancel(consumer):
    """Cancel C{consumer} (if any); a consumer whose connection was lost is ended already."""
    if consumer is not None:
        with contextlib.suppress(ConnectionLost):
            await consumer.cancel()


@attrs.define(eq=False)
class _Subscription:
    """One subscription of a process: where its dead letters go, after how many returns, and
    whether it still holds its messages (once cancelled, the unsettled ones are back in the
    queue)."""

    queue: str
    durable: bool
    exclusive: bool
    delivery_limit: int = 1
    dead_arguments: object = None  # of <queue>.dead (None: none)
    consumer: object = None


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
        self._inflight = set()  # ops being served
        self._in_hand = set()  # deliveries being handled, work started with track()
        self._draining = False
        self._exit_observers = []
        self._claims = []
        self._brokers = []  # connections of the process's own (open_broker)

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

    def on_dead_letter(self, delivery, reason):
        """A message of a subscription failed for good and is now in C{<queue>.dead} (see
        L{subscribe}); C{reason} is the handler's error, or says that the quorum queue gave
        the message up (its C{routing_key} then the one it was published with). Sync or
        async; the message is acked once this returns. Override to tell someone (a failure
        report)."""

    def stop_timeout(self):
        """Seconds the work in hand (ops, deliveries, tracked work) gets to finish when the
        process terminates: config C{ion.core.process: terminate_timeout} (default 10).
        Override where the process has its own setting."""
        return self.config("terminate_timeout", 10)

    # -- lifecycle transitions ------------------------------------------------------------

    async def _run_hook(self, hook):
        try:
            await _maybe_await(hook())
        except BaseException as e:
            self.lifecycle.fail()
            if statedir.expected(e):
                # Its message says it all, and the caller (the boot, a supervisor's restart)
                # reports it: said here too, it would be printed twice.
                self.log.debug(
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
        """-> TERMINATED: stop taking work, wait for the ops, deliveries and tracked work in
        hand (at most C{timeout} seconds, default C{stop_timeout()}; what still runs then is
        abandoned), end the subscriptions (unsettled messages go back to their queues),
        terminate children (last spawned first), run on_terminate, release the queue."""
        if self.lifecycle.final:
            raise IllegalTransition(self.state, "terminate")
        if self.state == ACTIVE:
            # Deliveries arriving from now on are left unsettled; the subscriptions stay until
            # those in hand are done, since ending one hands its unsettled messages back.
            self._draining = True
            await self._stop_service()
            await self._drain(self.stop_timeout() if timeout is None else timeout)
            await self._stop_serving()
        await self._terminate_children(timeout)
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
        await self._terminate_children()
        self._notify_exit()

    async def _terminate_children(self, timeout=None):
        for child in reversed(list(self.children)):
            if not child.lifecycle.final:
                try:
                    await child.terminate(timeout)
                except Exception:
                    self.log.failure("{proc!r}: {child!r} failed to stop", proc=self, child=child)

    async def _stop_service(self):
        """Stop taking requests from a service queue (see ServiceProcess)."""

    async def _stop_serving(self):
        """Stop taking new work: cancel subscriptions (unacked messages go back to their
        queues). Services also stop consuming their service queue."""
        await self._stop_service()
        subscriptions, self._subscriptions = self._subscriptions, []
        for sub in subscriptions:
            sub.consumer, consumer = None, sub.consumer
            await _cancel(consumer)

    async def _drain(self, timeout):
        pending = list(self._inflight) + list(self._in_hand)
        if not pending:
            return
        # Waited for through a Deferred of our own: a timeout cancelling the DeferredList
        # would cancel the work itself, which is to be abandoned, not interrupted.
        done = defer.Deferred()
        defer.DeferredList(pending, consumeErrors=True).addCallback(
            lambda _: None if done.called else done.callback(None)
        )
        done.addTimeout(timeout, self.container.clock)
        try:
            await done
        except defer.TimeoutError:
            running = sum(1 for d in pending if not d.called)
            self.log.warn(
                "{proc!r}: {n} ops or messages still in hand after {t} s; abandoned (their "
                "messages go back to the queue)",
                proc=self,
                n=running,
                t=timeout,
            )

    async def _release(self):
        claims, self._claims = self._claims, []
        for claim in claims:
            claim.release()
        await self._stop_serving()
        brokers, self._brokers = self._brokers, []
        for broker in brokers:
            try:
                await broker.close()
            except Exception:
                self.log.failure("{proc!r}: could not close {broker!r}", proc=self, broker=broker)
        self.conversations.fail_open(ProcessTerminated(f"{self.name} terminated"))
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
        """Start a FIPA request. Returns the Conversation: C{await conv.when_agreed()} (fails
        with Refused), C{await conv.when_done()} for the result."""
        return self._open("request", dest, op, content, timeout)

    async def send(self, dest, op, content=None):
        """One-way message (inform) to dest; raises NoSuchReceiver if nobody listens there."""
        await self._open("inform", dest, op, content, None).when_done()

    def open_broker(self, url):
        """A connection of this process's own to the broker at C{url} (C{amqp[s]://} or
        C{mqtt[s]://}; a password from the credentials file), not yet connected, closed when
        the process ends: for work on another broker than the container's (a pump's flow on a
        remote pump). Pass it as C{transport} to L{subscribe} and L{publish}; C{await
        broker.connect()} first (an MQTT one names its persistent session by its C{session},
        set before). Its C{user} is the login. ValueError for a URL that names no such broker."""
        broker = self.container.open_broker(url)
        self._brokers.append(broker)
        return broker

    async def subscribe(self, exchange, keys, handler, queue=None, transport=None, **options):
        """Consume raw (non-envelope) messages from C{exchange} bound with topic patterns
        C{keys}: handler(delivery) gets C{body}, C{routing_key}, C{properties} (with the trusted
        C{user_id}), C{redelivered}, and must C{ack()} or C{nack(requeue)} each one. It may return
        an awaitable: the message is in hand until that finishes. The queue is durable and
        named C{queue} (default: an exclusive one named after this process). Options:
        exchange_type, durable, exclusive, auto_delete, prefetch, queue_type, delivery_limit.

        A named durable queue that is neither exclusive nor auto-delete is shared: its
        C{queue_type} (default config C{ion.core.messaging: queue_type}, 'auto': quorum when
        the broker URL names several hosts, else classic) may be 'quorum', replicated on a
        RabbitMQ cluster, which also dead-letters to C{<queue>.poison} a message returned
        more than C{delivery_limit} times (default config C{delivery_limit}, 10): a message
        that kills its process each time cannot loop forever. The process consumes
        C{<queue>.poison} too: each message there is moved to C{<queue>.dead} (as below, its
        C{dead-exchange} and C{dead-routing-key} those it was first published with), then
        C{on_dead_letter} runs, then it is acked. A queue that exists with another type is
        a ValueError naming it (nothing is changed on the broker).

        The process owns the rest. A handler that raises (or whose awaitable fails) before settling
        its message gets it back (requeued, C{redelivered} set) until it was returned
        C{delivery_limit} times (on a classic queue, which only tells whether a message was
        delivered before: once); when it fails then too, the message is published, confirmed, to the
        queue C{<queue>.dead} (declared then, durable like C{queue}; through the default exchange)
        with the headers C{dead-reason}, C{dead-exchange} and C{dead-routing-key}, then
        C{on_dead_letter(delivery, reason)} runs, then the message is acked. On terminate no new
        message is taken (those arriving go back to the queue), those in hand get C{stop_timeout()}
        seconds, then the subscription ends.

        C{transport}: a connection of L{open_broker} to consume from instead of the
        container's; with C{exchange_type=None} the exchange is not declared (a remote pump's
        exchanges are its own). Dead letters still go to the container's broker."""
        asked_type = options.pop("queue_type", None)
        limit = options.pop("delivery_limit", None)
        if queue is None:
            queue = f"{self.pid}.sub{len(self._subscriptions) + 1}"
            options.setdefault("exclusive", True)
            options.setdefault("auto_delete", True)
            options.setdefault("durable", False)
        sub = _Subscription(queue, options.get("durable", True), options.get("exclusive", False))
        transport = transport or self.container.messenger.transport
        shared = sub.durable and not sub.exclusive and not options.get("auto_delete", False)
        if shared:
            if asked_type is None:
                asked_type = self.config("queue_type", "auto", module=MESSAGING)
            if limit is None:
                limit = self.config(
                    "delivery_limit", subscription.DEFAULT_DELIVERY_LIMIT, module=MESSAGING
                )
            kind = subscription.queue_type_for(asked_type, getattr(transport, "cluster", False))
            arguments, sub.dead_arguments, poison_arguments = subscription.queue_arguments(
                queue, kind, limit
            )
            if kind == "quorum":
                sub.delivery_limit = limit
            # The queue's own dead-letter target (the poison queue) is declared before it.
            options.update(arguments=arguments, dead_arguments=poison_arguments)
        else:
            poison_arguments = None
        try:
            sub.consumer = await subscription.subscribe(
                transport,
                exchange,
                queue,
                list(keys),
                self._delivery_handler(handler, sub),
                **options,
            )
        except PreconditionFailed as e:
            raise ValueError(
                f"{self.name}: queue {queue!r} exists on the broker with other properties than "
                f"asked (queue_type {asked_type!r}): {e}; delete the queue (its messages go "
                f"with it) or ask for its present type"
            ) from None
        self._subscriptions.append(sub)
        if poison_arguments is not None:
            poison = _Subscription(f"{queue}{subscription.POISON_SUFFIX}", True, False)
            poison.consumer = await subscription.subscribe(
                transport, None, poison.queue, [], self._poison_handler(sub), durable=True,
                exchange_type=None, prefetch=options.get("prefetch", 100),
                arguments=poison_arguments,
            )
            self._subscriptions.append(poison)
        return sub.consumer

    def _poison_handler(self, sub):
        def deliver(delivery):
            if not self._draining:
                self._hold(defer.Deferred.fromCoroutine(self._bury(delivery, sub)))

        return deliver

    async def _bury(self, delivery, sub):
        """A message the quorum queue of C{sub} gave up by itself (returned more than its
        delivery limit: its process died holding it, or gave it back, each time), taken from
        C{<queue>.poison}: moved to C{<queue>.dead} with a reason, C{on_dead_letter} told,
        then acked. Told once: a crash before the ack tells again (the hook's reports are
        known by their id)."""
        given = subscription.GivenUp(delivery, sub.delivery_limit)
        reason = (
            f"the broker gave it up after it was returned more than {sub.delivery_limit} "
            f"times (delivery_limit): its consumer died or gave it back each time"
        )
        self.log.warn(
            "{proc!r}: message {key!r} of {queue} {reason}; moving it to {queue}.dead",
            proc=self,
            key=given.routing_key,
            queue=sub.queue,
            reason=reason,
        )
        try:
            await subscription.dead_letter(
                self.container.messenger.transport, given, sub.queue, reason, sub.durable,
                sub.exclusive, sub.dead_arguments,
            )
        except ConnectionLost:
            # Back in the poison queue: with its connection, or given back here when the
            # connection lost was the container's (a no-op when it was its own).
            if not delivery.settled:
                delivery.nack(requeue=True)
            return
        except Exception:
            self.log.failure("{proc!r}: could not dead-letter {key!r}; it stays in "
                             "{queue}.poison", proc=self, key=given.routing_key, queue=sub.queue)
            if not delivery.settled:
                delivery.nack(requeue=True)  # counted: dropped past the limit
            return
        try:
            await _maybe_await(self.on_dead_letter(given, reason))
        except Exception:
            self.log.failure("{proc!r}: on_dead_letter failed", proc=self)
        if not delivery.settled:
            delivery.ack()

    def _delivery_handler(self, handler, sub):
        consumed, key = self.container.metrics.consumed, (self.name,)

        def deliver(delivery):
            if self._draining:
                return  # left unsettled: back to the queue when the subscription ends
            consumed.inc(key)
            try:
                result = handler(delivery)
            except Exception:
                self._hold(defer.Deferred.fromCoroutine(self._failed(Failure(), delivery, sub)))
                return
            # Messages settled at once cost no Deferred; the others are in hand until done.
            if result is not None and inspect.isawaitable(result):
                self._hold(defer.Deferred.fromCoroutine(self._finish(result, delivery, sub)))

        return deliver

    async def _finish(self, work, delivery, sub):
        try:
            await work
        except Exception:
            await self._failed(Failure(), delivery, sub)

    async def _failed(self, failure, delivery, sub):
        """The failure policy of subscriptions: requeue until the delivery limit, then
        dead-letter. A lost broker connection says nothing about the message: it is given
        back (a no-op when it was the subscription's connection that went) and not counted."""
        if failure.check(ConnectionLost) and not delivery.settled and sub.consumer is not None:
            self.log.warn(
                "{proc!r}: message {key!r} from {queue} not finished ({error}); requeued",
                proc=self,
                key=delivery.routing_key,
                queue=sub.queue,
                error=redact(failure.getErrorMessage()),
            )
            delivery.nack(requeue=True)
            return
        if delivery.settled:
            outcome = "it was settled already"
        elif sub.consumer is None:
            outcome = "it is back in the queue already"
        elif subscription.returns_of(delivery) < sub.delivery_limit:
            outcome = "requeued"
        else:
            outcome = f"it had been redelivered: moving it to {sub.queue}.dead"
        key = delivery.routing_key
        self.log.failure(
            "{proc!r}: message {key!r} from {queue} failed; {outcome}",
            failure,
            proc=self,
            key=key,
            queue=sub.queue,
            outcome=outcome,
        )
        if delivery.settled or sub.consumer is None:
            return
        returns = subscription.returns_of(delivery)
        if returns < sub.delivery_limit:
            delivery.nack(requeue=True)
            return
        reason = redact(f"{failure.type.__name__}: {failure.getErrorMessage()}")
        try:
            await subscription.dead_letter(
                self.container.messenger.transport, delivery, sub.queue, reason, sub.durable,
                sub.exclusive, sub.dead_arguments,
            )
        except ConnectionLost:
            return  # the message is back in its queue
        except Exception:
            self.log.failure("{proc!r}: could not dead-letter {key!r}; dropped", proc=self, key=key)
            delivery.nack(requeue=False)
            return
        try:
            await _maybe_await(self.on_dead_letter(delivery, reason))
        except Exception:
            self.log.failure("{proc!r}: on_dead_letter failed", proc=self)
        if not delivery.settled:
            delivery.ack()

    def track(self, work):
        """Run C{work} (a coroutine or Deferred) as work in hand: counted in L{in_hand}, and
        waited for (within C{stop_timeout()}) when the process terminates. Returns its
        Deferred; failures are the caller's to handle."""
        d = defer.ensureDeferred(work)
        self._hold(d)
        return d

    def _hold(self, d):
        if not d.called:
            self._in_hand.add(d)
            d.addBoth(self._release_hold, d)

    def _release_hold(self, result, d):
        self._in_hand.discard(d)
        return result

    @property
    def in_hand(self):
        """How many deliveries and tracked works are in hand now."""
        return len(self._in_hand)

    async def publish(self, exchange, routing_key, body, transport=None, **options):
        """Publish a raw message (bytes) to exchange; fires when the broker confirmed it.
        Options: headers, content_type, persistent (default True), mandatory, declare;
        C{transport}: a connection of L{open_broker} instead of the container's."""
        await subscription.publish(
            transport or self.container.messenger.transport, exchange, routing_key, body,
            **options,
        )
        self.container.metrics.published.inc((self.name,))

    async def bind(self, queue, exchange, keys, exchange_type="topic", durable=True):
        """Bind the existing C{queue} to C{exchange} (declared first: C{exchange_type}, C{durable})
        with each routing pattern of C{keys}, so that the queue's one consumer also receives
        what is published there."""
        transport = self.container.messenger.transport
        await transport.declare_exchange(exchange, exchange_type, durable=durable)
        for key in [keys] if isinstance(keys, str) else keys:
            await transport.bind(queue, exchange, key)

    async def queue_depth(self, queue, transport=None):
        """The number of messages waiting in C{queue} on the broker (not counting those
        delivered and not yet acked); NotFound when it does not exist."""
        return await (transport or self.container.messenger.transport).queue_depth(queue)

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
        self.container.metrics.consumed.inc((self.name,))
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
        headers, op = msg.headers, msg.headers.get("op")
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
                method = self._op(op)
                if conv.protocol == "request" and not getattr(method, "explicit_agree", False):
                    await conv.agree()
                result, error = await _maybe_await(method(msg.content, headers)), None
            except ApplicationError as e:
                result, error = None, e
            except Exception as e:
                self.log.failure("{proc!r}: {op!r} raised; the caller gets a 500", proc=self, op=op)
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
        if self.state != ACTIVE or self._draining:
            # Stopping: an op now could run while on_terminate closes what it needs.
            state = "stopping" if self.state == ACTIVE else self.state
            raise ApplicationError(f"{self.name} is not active ({state})", code=503)
        method = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
        if method is None:
            raise ApplicationError(f"{self.name} has no op {op!r}", code=404)
        return method

    async def _dispatch(self, headers, content):
        return await _maybe_await(self._op(headers.get("op"))(content, headers))


class ServiceProcess(Process):
    """A process that also serves a named service: all instances of a service share the queue
    C{<sysname>.<service>}, and each request goes to one of them (round robin)."""

    service = None
    # True: without a service name (spawned unnamed) it is a plain process, serving nothing.
    service_optional = False

    def __init__(self, container, pid, name=None, args=None, parent=None):
        self.service = (args or {}).get("service") or self.service or name
        if not self.service and not self.service_optional:
            raise ValueError(f"{type(self).__name__} needs a service name")
        if self.service:
            names.check_name("service", self.service)
        super().__init__(container, pid, name or self.service, args, parent)
        self._service_consumer = None

    async def activate(self):
        await super().activate()
        if not self.service:
            return
        messenger = self.container.messenger
        queue = names.service_queue(messenger.sysname, self.service)
        await messenger.declare_receiver(queue, self.service, exclusive=False, auto_delete=True)
        prefetch = self.config("prefetch", 100, module="ion.core.messaging")
        self._service_consumer = await messenger.listen(queue, self._receive, prefetch=prefetch)

    async def deactivate(self):
        await self._stop_serving()
        await super().deactivate()

    async def _stop_service(self):
        consumer, self._service_consumer = self._service_consumer, None
        await _cancel(consumer)
