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
from ion.core.messaging import names
from ion.core.messaging.transport import (
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_ROUTING_KEY,
    DELIVERY_COUNT,
    DELIVERY_LIMIT,
    QUEUE_TYPE,
    QUEUE_TYPES,
    ConnectionLost,
    PreconditionFailed,
    Properties,
)
from ion.core.process import statedir
from ion.core.process.lifecycle import ACTIVE, IllegalTransition, Lifecycle

CONFIG = "ion.core.process"
MESSAGING = "ion.core.messaging"

# The participant conversation being served in the current task (identity flows from it).
_serving = contextvars.ContextVar("ion_serving", default=None)
# What ops return most, none of them awaitable.
_PLAIN_RESULTS = frozenset([type(None), str, bytes, int, float, bool, dict, list, tuple])

# Headers of a dead-lettered message: why, and where it was published.
DEAD_REASON = "dead-reason"
DEAD_EXCHANGE = "dead-exchange"
DEAD_ROUTING_KEY = "dead-routing-key"
REASON_CHARS = 1000  # of the reason kept

# Returns of a message before it is dead-lettered, on a quorum queue (classic queues tell
# only whether a message was delivered before: their limit is 1).
DEFAULT_DELIVERY_LIMIT = 10


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


def queue_type_for(asked, cluster):
    """The queue type of a shared durable queue: C{asked} ('classic', 'quorum', or 'auto' /
    None: quorum on a cluster (C{cluster}: the broker URL names several hosts), else classic).
    ValueError for another value."""
    if asked in (None, "auto"):
        return "quorum" if cluster else "classic"
    if asked not in QUEUE_TYPES:
        raise ValueError(f"queue_type must be 'auto', 'classic' or 'quorum', got {asked!r}")
    return asked


# The queue a quorum queue dead-letters to by itself (a message returned more than its
# delivery limit: its process died holding it each time): C{<queue>.poison}. The process
# consuming the queue also consumes that one and moves each message to C{<queue>.dead}, with a
# reason, telling its C{on_dead_letter} hook (L{ion.core.process.Process.subscribe}).
POISON_SUFFIX = ".poison"
# Returns of a message of a poison queue before it is dropped (should moving it kill its
# process each time); more than the queue's own limit, which a message reaches by the
# processes that die or stop holding it, possibly while it is on its way to the poison queue.
POISON_DELIVERY_LIMIT = 20


def queue_arguments(queue, queue_type, delivery_limit):
    """C{(arguments of queue, arguments of <queue>.dead, arguments of <queue>.poison)} for a
    shared durable queue of C{queue_type}: a quorum queue gives up a message returned more
    than C{delivery_limit} times (the process gave it back, or died holding it) and
    dead-letters it to C{<queue>.poison}, a quorum queue that itself drops a message returned
    more than L{POISON_DELIVERY_LIMIT} times (nothing loops forever); C{<queue>.dead} is a
    quorum queue too. A classic queue has no arguments (and no poison queue: None)."""
    if queue_type != "quorum":
        return {}, {}, None
    return (
        {
            QUEUE_TYPE: "quorum",
            DELIVERY_LIMIT: delivery_limit,
            DEAD_LETTER_EXCHANGE: "",
            DEAD_LETTER_ROUTING_KEY: f"{queue}{POISON_SUFFIX}",
        },
        {QUEUE_TYPE: "quorum"},
        {QUEUE_TYPE: "quorum", DELIVERY_LIMIT: POISON_DELIVERY_LIMIT},
    )


def given_up(delivery):
    """C{(exchange, routing key)} a message taken from a poison queue was first published
    with, from the headers the broker added when it dead-lettered it (C{x-death}, else the
    C{x-first-death-exchange}); the delivery's own where the headers say nothing usable."""
    headers = delivery.properties.headers or {}
    exchange, key = headers.get("x-first-death-exchange"), None
    deaths = headers.get("x-death")
    if isinstance(deaths, (list, tuple)) and deaths and isinstance(deaths[-1], dict):
        first = deaths[-1]  # the newest death first: the last is the first one
        exchange = first.get("exchange", exchange)
        keys = first.get("routing-keys")
        if isinstance(keys, (list, tuple)) and keys:
            key = keys[0]
    if isinstance(exchange, bytes):
        exchange = exchange.decode("utf-8", "replace")
    if isinstance(key, bytes):
        key = key.decode("utf-8", "replace")
    if not isinstance(exchange, str):
        exchange = delivery.exchange
    if not isinstance(key, str):
        key = delivery.routing_key
    return exchange, key


class GivenUp:
    """A message taken from a poison queue, seen as the message its queue gave up: the
    exchange and routing key it was first published with (L{given_up}), returned
    C{returns} times (its C{x-delivery-count}); settling it settles the poison queue's
    delivery."""

    def __init__(self, delivery, returns):
        self._delivery = delivery
        self.body = delivery.body
        self.exchange, self.routing_key = given_up(delivery)
        props = delivery.properties
        self.properties = Properties(
            content_type=props.content_type,
            delivery_mode=props.delivery_mode,
            message_id=props.message_id,
            user_id=props.user_id,
            headers={**(props.headers or {}), DELIVERY_COUNT: returns},
            timestamp=props.timestamp,
            expiration=props.expiration,
        )
        self.redelivered = True

    @property
    def settled(self):
        return self._delivery.settled

    def ack(self):
        self._delivery.ack()

    def nack(self, requeue=True):
        self._delivery.nack(requeue)


def returns_of(delivery):
    """How many times the message of C{delivery} was returned to its queue before: a quorum
    queue's C{x-delivery-count}, else 1 when it is marked redelivered, else 0."""
    count = (delivery.properties.headers or {}).get(DELIVERY_COUNT)
    if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
        return count
    return 1 if delivery.redelivered else 0


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
        self._inflight = {}  # conversation of each op being served -> Deferred once waited for
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
        for conv, done in self._inflight.items():
            if done is None:
                self._inflight[conv] = defer.Deferred()
        pending = list(self._inflight.values()) + list(self._in_hand)
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
                await self.container.messenger.transport.delete_queue(self.pid)
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

    def send(self, dest, op, content=None):
        """One-way message (inform) to dest. Returns a Deferred firing with None once the
        broker took it, failing with NoSuchReceiver if nobody listens there."""
        serving = _serving.get()
        user_id = serving.user_id if serving is not None else None
        return self.conversations.inform(dest, op, content, user_id)

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

    async def subscribe(self, exchange, keys, handler, queue=None, transport=None,
                        exchange_type="topic", durable=None, exclusive=None, auto_delete=None,
                        prefetch=100, queue_type=None, delivery_limit=None):
        """Consume raw (non-envelope) messages from C{exchange} bound with topic patterns
        C{keys}: handler(delivery) gets C{body}, C{routing_key}, C{properties} (with the trusted
        C{user_id}), C{redelivered}, and must C{ack()} or C{nack(requeue)} each one. It may return
        an awaitable: the message is in hand until that finishes. The queue is durable and
        named C{queue} (default: an exclusive, auto-delete, transient one named after this
        process); C{exchange_type} (durable like the queue) is declared first.

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
        unnamed = queue is None
        if unnamed:
            queue = f"{self.pid}.sub{len(self._subscriptions) + 1}"
        durable = not unnamed if durable is None else durable
        exclusive = unnamed if exclusive is None else exclusive
        auto_delete = unnamed if auto_delete is None else auto_delete
        sub = _Subscription(queue, durable, exclusive)
        transport = transport or self.container.messenger.transport
        arguments = poison = poison_arguments = None
        if durable and not exclusive and not auto_delete:  # shared
            if queue_type is None:
                queue_type = self.config("queue_type", "auto", module=MESSAGING)
            if delivery_limit is None:
                delivery_limit = self.config(
                    "delivery_limit", DEFAULT_DELIVERY_LIMIT, module=MESSAGING
                )
            kind = queue_type_for(queue_type, getattr(transport, "cluster", False))
            arguments, sub.dead_arguments, poison_arguments = queue_arguments(
                queue, kind, delivery_limit
            )
            if kind == "quorum":  # it dead-letters to <queue>.poison, declared first
                sub.delivery_limit = delivery_limit
                poison = f"{queue}{POISON_SUFFIX}"
        try:
            if poison is not None:
                await transport.declare_queue(poison, durable=True, arguments=poison_arguments)
            await transport.declare_queue(
                queue, durable=durable, exclusive=exclusive, auto_delete=auto_delete,
                arguments=arguments,
            )
            await self.bind(queue, exchange, keys, exchange_type, durable, transport)
            sub.consumer = await transport.consume(
                queue, self._delivery_handler(handler, sub), prefetch=prefetch
            )
        except PreconditionFailed as e:
            raise ValueError(
                f"{self.name}: queue {queue!r} exists on the broker with other properties than "
                f"asked (queue_type {queue_type!r}): {e}; delete the queue (its messages go "
                f"with it) or ask for its present type"
            ) from None
        self._subscriptions.append(sub)
        if poison is not None:
            buried = _Subscription(poison, True, False)
            buried.consumer = await transport.consume(
                poison, self._poison_handler(sub), prefetch=prefetch
            )
            self._subscriptions.append(buried)
        return sub.consumer

    async def unsubscribe(self, consumer):
        """End the subscription whose consumer L{subscribe} returned (and that of its
        C{<queue>.poison}) before the process ends: no more deliveries, and its unsettled
        messages go back to the queue (an auto-delete queue goes away). Ending one already
        ended does nothing."""
        ended = [sub for sub in self._subscriptions if sub.consumer is consumer]
        if not ended:
            return
        poison = f"{ended[0].queue}{POISON_SUFFIX}"
        ended += [sub for sub in self._subscriptions if sub.queue == poison]
        for sub in ended:
            self._subscriptions.remove(sub)
            sub.consumer, cancelled = None, sub.consumer
            await _cancel(cancelled)

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
        given = GivenUp(delivery, sub.delivery_limit)
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
            await self._dead_letter(given, sub, reason)
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
        retry = returns_of(delivery) < sub.delivery_limit
        if delivery.settled:
            outcome = "it was settled already"
        elif sub.consumer is None:
            outcome = "it is back in the queue already"
        elif retry:
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
        if retry:
            delivery.nack(requeue=True)
            return
        reason = redact(f"{failure.type.__name__}: {failure.getErrorMessage()}")
        try:
            await self._dead_letter(delivery, sub, reason)
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

    async def _dead_letter(self, delivery, sub, reason):
        """Publish a copy of C{delivery} to the queue C{<queue>.dead} of its subscription
        C{sub}, declared first (durable and exclusive as the subscription's queue), through the
        default exchange of the container's broker, with its headers (less
        C{x-delivery-count}) plus DEAD_REASON, DEAD_EXCHANGE and DEAD_ROUTING_KEY; fires once
        the broker confirmed it. The same on every transport, and with a report: the queue's
        own dead-lettering (quorum queues) is for a process that dies holding a message.
        Settling C{delivery} is the caller's."""
        dead = f"{sub.queue}.dead"
        props = delivery.properties
        key = delivery.routing_key
        if not isinstance(key, str):
            key = bytes(key).decode("utf-8", "replace")
        headers = dict(props.headers or {})
        headers.pop(DELIVERY_COUNT, None)
        headers[DEAD_REASON] = reason[:REASON_CHARS]
        headers[DEAD_EXCHANGE] = delivery.exchange
        headers[DEAD_ROUTING_KEY] = key
        properties = Properties(
            content_type=props.content_type,
            delivery_mode=2 if sub.durable else 1,
            message_id=props.message_id,
            headers=headers,
            timestamp=props.timestamp,
        )
        transport = self.container.messenger.transport
        await transport.declare_queue(
            dead, durable=sub.durable, exclusive=sub.exclusive, arguments=sub.dead_arguments
        )
        await transport.publish("", dead, delivery.body, properties, mandatory=True)

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

    async def publish(self, exchange, routing_key, body, transport=None, headers=None,
                      content_type="application/json", persistent=True, mandatory=False,
                      declare=None):
        """Publish a raw message (bytes) to exchange; fires when the broker confirmed it.
        C{declare='topic'} (or another type) declares the exchange (durable) first;
        C{transport}: a connection of L{open_broker} instead of the container's."""
        transport = transport or self.container.messenger.transport
        if declare:
            await transport.declare_exchange(exchange, declare, durable=True)
        delivery_mode = 2 if persistent else 1
        properties = Properties(content_type, delivery_mode, headers=dict(headers or {}))
        await transport.publish(exchange, routing_key, body, properties, mandatory=mandatory)
        self.container.metrics.published.inc((self.name,))

    async def bind(self, queue, exchange, keys, exchange_type="topic", durable=True,
                   transport=None):
        """Bind the existing C{queue} to C{exchange} (declared first: C{exchange_type}, C{durable};
        None: not declared) with each routing pattern of C{keys}, so that the queue's one
        consumer also receives what is published there."""
        transport = transport or self.container.messenger.transport
        if exchange_type:
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
        conv.user_id = self._identity(msg)
        msg.headers["user-id"] = conv.user_id
        # Registered before the op runs: the op may hand control to others (who may terminate
        # this process) before it returns. Its Deferred is made only when _drain waits for it:
        # most ops are done before anyone could.
        self._inflight[conv] = None
        # The op runs in a copy of the context, so that the conversation it serves (and what
        # else it sets) never leaks to other tasks.
        try:
            pending = contextvars.copy_context().run(self._serve, msg, conv)
        except Exception:
            self.log.failure("{proc!r}: serving a message failed", proc=self)
            pending = None
        if pending is None:
            self._served(None, msg, conv)
        else:
            pending.addBoth(self._served, msg, conv)

    def _served(self, result, msg, conv):
        if isinstance(result, Failure):
            self.log.failure("{proc!r}: serving a message failed", result, proc=self)
        done = self._inflight.pop(conv, None)
        if done is not None:
            done.callback(None)
        msg.ack()

    def _identity(self, msg):
        """Who this request acts for: the broker-validated sender, or, from a peer of our own
        system (same broker user), the identity it was acting for."""
        claimed = msg.headers.get("user-id")
        if claimed and msg.user_id == self.container.transport.user:
            return claimed
        return msg.user_id

    def _serve(self, msg, conv):
        """Run the op that conv asks for and answer it. Returns None when that is done, else
        a Deferred: most ops are plain functions, run and answered without a coroutine."""
        _serving.set(conv)
        op = msg.headers.get("op")
        try:
            method = self._op(op)
            if conv.protocol == "request" and not getattr(method, "explicit_agree", False):
                return defer.Deferred.fromCoroutine(self._serve_later(msg, conv, method, None))
            result = method(msg.content, msg.headers)
        except ApplicationError as e:
            return self._answer(conv, None, e)
        except Exception as e:
            self.log.failure("{proc!r}: {op!r} raised; the caller gets a 500", proc=self, op=op)
            return self._answer(conv, None, e)
        # inspect.isawaitable asks the Awaitable ABC: costly for every plain result.
        if type(result) not in _PLAIN_RESULTS and inspect.isawaitable(result):
            return defer.Deferred.fromCoroutine(self._serve_later(msg, conv, None, result))
        return self._answer(conv, result, None)

    async def _serve_later(self, msg, conv, method, work):
        """The rest of L{_serve} for a request (agreed before its op runs, unless the op
        agrees itself) or an op that is a coroutine (C{work})."""
        op = msg.headers.get("op")
        try:
            if method is not None:
                await conv.agree()
                work = method(msg.content, msg.headers)
            result, error = (await work if inspect.isawaitable(work) else work), None
        except ApplicationError as e:
            result, error = None, e
        except Exception as e:
            self.log.failure("{proc!r}: {op!r} raised; the caller gets a 500", proc=self, op=op)
            result, error = None, e
        answered = self._answer(conv, result, error)
        if answered is not None:
            await answered

    def _answer(self, conv, result, error):
        """Send the outcome of an op (an inform has none). Returns the Deferred of the send,
        which logs a failure to answer, or None."""
        if conv.protocol == "inform":
            return None
        try:
            answered = self.conversations.finish(conv, result, error)
        except Exception:
            self.log.failure("{proc!r}: could not answer {to}", proc=self, to=conv.peer)
            return None
        return answered.addErrback(self._not_answered, conv)

    def _not_answered(self, failure, conv):
        if failure.check(ConnectionLost):
            # The broker went away, or the container is closing its connection: the caller
            # gets no answer and times out or asks again, as after any loss. Nothing to debug.
            self.log.warn(
                "{proc!r}: could not answer {to}: {error}",
                proc=self, to=conv.peer, error=failure.value,
            )
            return
        self.log.failure("{proc!r}: could not answer {to}", failure, proc=self, to=conv.peer)

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
