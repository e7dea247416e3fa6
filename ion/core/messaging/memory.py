"""The memory:// transport: an in-process broker with RabbitMQ's semantics for what ION uses.

This is the embedded default transport, not a test double. One L{MemoryBroker} holds exchanges,
queues and bindings; any number of L{MemoryTransport} connections attach to it, each with its
own user name, consumers and exclusive queues.

Beyond what L{ion.core.messaging.transport} says every transport keeps, it keeps from RabbitMQ:
the default exchange C{''} routes to the queue named by the routing key; topic words may be
empty (C{*.b} matches C{.b}) and the empty routing key has zero words; redeclaring with other
arguments fails; a queue's consumers take turns (round robin); cancelled-while-unacked messages
go back to the head of the queue with C{redelivered} set.

Queue arguments (L{QUEUE_ARGUMENTS}) are kept as RabbitMQ keeps them: a quorum queue counts
the returns of each message (nack with requeue, a consumer cancelled or a connection closed
while holding it), marks a redelivery with the C{x-delivery-count} header, and past its
C{x-delivery-limit} dead-letters the message (through C{x-dead-letter-exchange} with
C{x-dead-letter-routing-key}, with the C{x-first-death-*} and C{x-death} headers) or drops
it when it has no dead-letter exchange; a message nacked without requeue is dead-lettered
the same way.

What it does not do: persistence (C{durable} is recorded only: everything dies with the
process), message TTL (C{expiration} is carried but not enforced). So
that a process depending on queued messages can tell it needs to recover, a broker given a
C{run_record} file notes there how its run ended; when the previous run crashed or stopped with
messages still in durable queues, C{lost_messages} is true (on every transport: always false
on RabbitMQ, which keeps them).

Callbacks are never run from inside C{publish}, C{ack}, C{nack} or C{cancel}: a message assigned to
a consumer is queued on that consumer's connection and handed over from a C{callLater(0)} drain,
in batches. A callback may return a Deferred or a coroutine; it need not ack before returning.
The rules for consumers are L{call_consumer}'s and L{IDelivery}'s; once a delivery's queue is
deleted, a first ack or nack of it does nothing either (a handler finishing during shutdown is
not an error).
"""

import collections
import functools
import os
import re
import uuid

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from ion.core.messaging.transport import (
    ConnectionLost,
    IConsumer,
    IDelivery,
    ITransport,
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_ROUTING_KEY,
    DELIVERY_COUNT,
    DELIVERY_LIMIT,
    QUEUE_TYPE,
    NotFound,
    PreconditionFailed,
    Properties,
    QueueInUse,
    TransportError,
    Unroutable,
    body_bytes,
    call_consumer,
    check_exchange,
    check_headers,
    check_queue_arguments,
)

log = Logger()

# Deliveries handed to callbacks per reactor turn: large enough for throughput, small enough
# that a busy queue does not starve the rest of the reactor.
_DELIVERY_BATCH = 10_000

# Routing keys remembered per topic exchange; cleared when full, since sr3-style keys can be
# unique per message.
_ROUTE_CACHE_SIZE = 10_000


@functools.lru_cache(maxsize=4096)
def _topic_regex(pattern):
    """Compile a topic binding key, or return None when it has no wildcard word.

    Keys are matched in the form '.w1.w2...wn' (empty for zero words) so that an empty
    routing key (zero words) differs from a key made of one empty word."""
    words = pattern.split(".") if pattern else []
    if "*" not in words and "#" not in words:
        return None
    parts = []
    for i, word in enumerate(words):
        if word == "#":
            if i and words[i - 1] == "#":
                continue
            parts.append(r"(?:\.[^.]*)*")
        elif word == "*":
            parts.append(r"\.[^.]*")
        else:
            parts.append(r"\." + re.escape(word))
    return re.compile("".join(parts))


def topic_matches(pattern, routing_key):
    """Whether a topic binding key matches a routing key, as RabbitMQ decides it."""
    regex = _topic_regex(pattern)
    if regex is None:
        return pattern == routing_key
    return regex.fullmatch("." + routing_key if routing_key else "") is not None


@attrs.define(eq=False)
class _Message:
    """A message sitting in one queue (each queue gets its own, for C{redelivered}).

    C{properties} is None for a message published without any: each delivery then gets fresh
    default Properties, so a backlog does not hold one Properties object per message."""

    body: bytes
    exchange: str
    routing_key: str
    properties: Properties | None
    user_id: str
    redelivered: bool = False
    returns: int = 0  # counted by quorum queues (x-delivery-count)


@attrs.define(eq=False, slots=False)  # the routing index is built in _reindex
class _Exchange:
    name: str
    type: str
    durable: bool
    auto_delete: bool
    bindings: dict = attrs.Factory(dict)  # (queue name, binding key) -> _Queue
    _stale: bool = True

    def add_binding(self, queue, key):
        self.bindings[(queue.name, key)] = queue
        queue.bindings.add((self.name, key))
        self._stale = True

    def remove_binding(self, queue, key):
        self.bindings.pop((queue.name, key), None)
        queue.bindings.discard((self.name, key))
        self._stale = True

    def _reindex(self):
        exact, wild, everyone = {}, [], {}
        for (_, key), queue in self.bindings.items():
            everyone[queue] = None
            regex = _topic_regex(key) if self.type == "topic" else None
            if regex is None:
                exact.setdefault(key, {})[queue] = None
            else:
                wild.append((regex, queue))
        self._exact = {key: tuple(queues) for key, queues in exact.items()}
        self._wild = wild
        self._everyone = tuple(everyone)
        self._cache = {}
        self._stale = False

    def route(self, routing_key):
        """The queues that receive a message with this routing key, each once."""
        if self._stale:
            self._reindex()
        if self.type == "fanout":
            return self._everyone
        if not self._wild:
            return self._exact.get(routing_key, ())
        queues = self._cache.get(routing_key)
        if queues is None:
            found = dict.fromkeys(self._exact.get(routing_key, ()))
            dotted = "." + routing_key if routing_key else ""
            for regex, queue in self._wild:
                if queue not in found and regex.fullmatch(dotted):
                    found[queue] = None
            queues = tuple(found)
            if len(self._cache) >= _ROUTE_CACHE_SIZE:
                self._cache.clear()
            self._cache[routing_key] = queues
        return queues


class _DefaultExchange:
    """The nameless direct exchange every queue is implicitly bound to by its own name."""

    name = ""
    type = "direct"

    def __init__(self, queues):
        self._queues = queues

    def route(self, routing_key):
        queue = self._queues.get(routing_key)
        return () if queue is None else (queue,)


@attrs.define(eq=False)
class _Queue:
    name: str
    durable: bool
    owner: object  # the MemoryTransport of an exclusive queue, else None
    auto_delete: bool
    messages: collections.deque = attrs.Factory(collections.deque)
    consumers: list = attrs.Factory(list)
    bindings: set = attrs.Factory(set)  # (exchange name, binding key)
    arguments: dict = attrs.Factory(dict)
    broker: object = None  # the MemoryBroker, which dead-letters
    _turn: int = 0

    @property
    def quorum(self):
        return self.arguments.get(QUEUE_TYPE) == "quorum"

    def put(self, message):
        self.messages.append(message)
        if self.consumers:
            self.dispatch()

    def requeue(self, messages):
        """Put messages back at the head, in their original order, marked redelivered; a
        quorum queue counts the return and dead-letters a message past its delivery limit."""
        limit = self.arguments.get(DELIVERY_LIMIT) if self.quorum else None
        for message in reversed(messages):
            message.redelivered = True
            message.returns += 1
            if limit is not None and message.returns > limit:
                self.broker._dead_letter(self, message, "delivery_limit")
                continue
            self.messages.appendleft(message)
        self.dispatch()

    def dispatch(self):
        """Assign waiting messages to consumers with room, taking turns."""
        messages, consumers = self.messages, self.consumers
        while messages and consumers:
            count = len(consumers)
            for _ in range(count):
                consumer = consumers[self._turn]
                self._turn = (self._turn + 1) % count
                if not consumer.prefetch or len(consumer.unacked) < consumer.prefetch:
                    break
            else:
                return
            consumer.assign(messages.popleft())


@implementer(IDelivery)
class _Delivery:
    __slots__ = ("body", "exchange", "routing_key", "properties", "redelivered", "_consumer")

    def __init__(self, message, consumer):
        self.body = message.body
        self.exchange = message.exchange
        self.routing_key = message.routing_key
        properties = message.properties or Properties(user_id=message.user_id)
        if message.returns and consumer.queue_state.quorum:
            headers = dict(properties.headers, **{DELIVERY_COUNT: message.returns})
            properties = attrs.evolve(properties, headers=headers)
        self.properties = properties
        self.redelivered = message.redelivered
        self._consumer = consumer

    @property
    def settled(self):
        return self._consumer is None

    @property
    def user_id(self):
        return self.properties.user_id

    def _settle(self, action):
        consumer = self._consumer
        if consumer is None:
            raise TransportError(
                f"cannot {action} message {self.routing_key!r}: it was already acked or nacked"
            )
        self._consumer = None
        return consumer if consumer.active else None  # a gone consumer's messages are back

    def ack(self):
        consumer = self._settle("ack")
        if consumer is not None:
            del consumer.unacked[self]
            consumer.queue_state.dispatch()

    def nack(self, requeue=True):
        consumer = self._settle("nack")
        if consumer is not None:
            message = consumer.unacked.pop(self)
            queue = consumer.queue_state
            if requeue:
                queue.requeue([message])
            else:
                queue.broker._dead_letter(queue, message, "rejected")
                queue.dispatch()


@implementer(IConsumer)
class _Consumer:
    def __init__(self, transport, queue, callback, prefetch):
        self.queue = queue.name
        self.queue_state = queue
        self.prefetch = prefetch
        self.unacked = {}  # _Delivery -> _Message, in delivery order
        self.active = True
        self._transport = transport
        self._callback = callback

    def __repr__(self):
        return f"<consumer of {self.queue!r} for {self._transport.user!r}>"

    def cancel(self):
        """Stop delivering; unacked messages return to the head of the queue, redelivered."""
        self._transport.broker._cancel(self)
        return defer.succeed(None)

    def assign(self, message):
        delivery = _Delivery(message, self)
        self.unacked[delivery] = message
        self._transport._hand_over(delivery)

    def inactive(self):
        return not self.active


STOPPED_EMPTY = "stopped with nothing queued"


class MemoryBroker:
    """Exchanges, queues and bindings shared by the L{MemoryTransport}s attached to it.

    The query methods (L{queues}, L{queue_depth}, ...) are for tests and the ops console;
    everything else goes through a transport."""

    def __init__(self, run_record=None):
        """C{run_record}: a file where the broker notes whether its run ended with durable
        messages still queued (see C{lost_messages}); None keeps no record."""
        self._queues = {}
        self._exchanges = {"": _DefaultExchange(self._queues)}
        self.run_record = run_record
        self.lost_messages = False
        if run_record is not None:
            try:
                try:
                    with open(run_record, encoding="utf-8") as f:
                        previous = f.read().strip()
                except FileNotFoundError:
                    previous = STOPPED_EMPTY  # the first run
                self.lost_messages = previous != STOPPED_EMPTY
                self._write_record("running")
            except OSError as e:
                # A read-only or mistaken working directory: the environment, not a bug.
                raise TransportError(
                    f"the embedded broker cannot keep its run record {run_record}: "
                    f"{e.strerror or e}"
                ) from None

    def _write_record(self, text):
        directory = os.path.dirname(self.run_record)
        if directory:
            os.makedirs(directory, exist_ok=True)
        # Its own temporary name: two containers started in one working directory each
        # replace the record whole, never one the other's half-written file.
        temporary = f"{self.run_record}.{os.getpid()}.tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, self.run_record)

    def record_stop(self):
        """Note in the run record how this run ended: with nothing left in durable queues
        (waiting, or delivered and not yet acked), or with messages that die with the process
        (the next run's C{lost_messages})."""
        if self.run_record is None:
            return 0
        left = sum(
            len(q.messages) + self.unacked(q.name) for q in self._queues.values() if q.durable
        )
        self._write_record(STOPPED_EMPTY if not left else f"stopped with {left} messages queued")
        return left

    # Inspection.

    def queues(self):
        """Names of all queues, sorted."""
        return sorted(self._queues)

    def exchanges(self):
        """{name: type} of the declared exchanges (the default exchange '' is not listed)."""
        return {name: ex.type for name, ex in sorted(self._exchanges.items()) if name}

    def bindings(self):
        """(exchange, queue, binding key) triples, sorted."""
        return sorted(
            (name, queue, key)
            for name, ex in self._exchanges.items()
            if name
            for (queue, key) in ex.bindings
        )

    def queue_depth(self, name):
        """Messages waiting in the queue (not counting those delivered and unacked)."""
        return len(self._queue(name).messages)

    def unacked(self, name):
        """Messages of the queue delivered to consumers and not yet acked or nacked."""
        return sum(len(c.unacked) for c in self._queue(name).consumers)

    def consumer_count(self, name):
        """Consumers currently attached to the queue."""
        return len(self._queue(name).consumers)

    # Operations, called by MemoryTransport on behalf of a connection (`owner`).

    def _queue(self, name):
        queue = self._queues.get(name)
        if queue is None:
            raise NotFound(f"no queue {name!r}")
        return queue

    def _exchange(self, name):
        exchange = self._exchanges.get(name)
        if exchange is None:
            raise NotFound(f"no exchange {name!r}")
        return exchange

    def _accessible_queue(self, name, owner):
        queue = self._queue(name)
        if queue.owner is not None and queue.owner is not owner:
            raise QueueInUse(f"queue {name!r} is exclusive to another connection")
        return queue

    def _declare_exchange(self, name, type, durable, auto_delete):
        check_exchange(name, type)
        exchange = self._exchanges.get(name)
        if exchange is None:
            self._exchanges[name] = _Exchange(name, type, durable, auto_delete)
        else:
            _check_same("exchange", exchange, type=type, durable=durable, auto_delete=auto_delete)

    def _delete_exchange(self, name, if_unused):
        if not name:
            raise TransportError("the default exchange '' cannot be deleted")
        exchange = self._exchanges.get(name)
        if exchange is None:
            return
        if if_unused and exchange.bindings:
            raise TransportError(f"exchange {name!r} in use: {len(exchange.bindings)} bindings")
        for (_queue, key), queue in exchange.bindings.items():
            queue.bindings.discard((name, key))
        del self._exchanges[name]

    def _declare_queue(self, owner, name, durable, exclusive, auto_delete, arguments=None):
        if not name:
            name = f"amq.gen-{uuid.uuid4().hex}"
        arguments = check_queue_arguments(name, durable, exclusive, auto_delete, arguments)
        queue = self._queues.get(name)
        if queue is None:
            self._queues[name] = _Queue(
                name, durable, owner if exclusive else None, auto_delete, arguments=arguments,
                broker=self,
            )
            return name
        self._accessible_queue(name, owner)
        if exclusive and queue.owner is None:
            raise QueueInUse(f"queue {name!r} already exists and is not exclusive")
        _check_same("queue", queue, durable=durable, auto_delete=auto_delete)
        if queue.arguments != arguments:
            raise PreconditionFailed(
                f"queue {name!r} already declared with arguments {queue.arguments!r}, "
                f"not {arguments!r}"
            )
        return name

    def _dead_letter(self, queue, message, reason):
        """Route a message a queue gives up (C{reason}: delivery_limit, rejected) through the
        queue's dead-letter exchange, with RabbitMQ's x-first-death headers; without one (or
        when that exchange is gone, or routes nowhere) the message is dropped, as there."""
        exchange_name = queue.arguments.get(DEAD_LETTER_EXCHANGE)
        if exchange_name is None:
            return
        exchange = self._exchanges.get(exchange_name)
        if exchange is None:
            return
        key = queue.arguments.get(DEAD_LETTER_ROUTING_KEY, message.routing_key)
        properties = message.properties or Properties(user_id=message.user_id)
        headers = dict(properties.headers)
        headers.pop(DELIVERY_COUNT, None)
        headers.setdefault("x-first-death-reason", reason)
        headers.setdefault("x-first-death-queue", queue.name)
        headers.setdefault("x-first-death-exchange", message.exchange)
        # The deaths so far, newest first, with where the message was published (RabbitMQ's
        # x-death, less its time stamp).
        deaths = [d for d in headers.get("x-death", []) if isinstance(d, dict)]
        deaths.insert(0, {
            "count": 1, "reason": reason, "queue": queue.name, "exchange": message.exchange,
            "routing-keys": [message.routing_key],
        })
        headers["x-death"] = deaths
        for target in exchange.route(key):
            target.put(
                _Message(
                    message.body,
                    exchange_name,
                    key,
                    attrs.evolve(properties, headers=dict(headers)),
                    message.user_id,
                )
            )

    def _delete_queue(self, owner, name):
        if name in self._queues:
            self._remove_queue(self._accessible_queue(name, owner))

    def _remove_queue(self, queue):
        del self._queues[queue.name]
        for exchange_name, key in list(queue.bindings):
            self._remove_binding(self._exchanges[exchange_name], queue, key)
        for consumer in queue.consumers:
            consumer.active = False
            consumer.unacked.clear()
            consumer._transport._consumers.pop(consumer, None)
        queue.consumers.clear()
        queue.messages.clear()

    def _remove_binding(self, exchange, queue, key):
        exchange.remove_binding(queue, key)
        if exchange.auto_delete and not exchange.bindings:
            del self._exchanges[exchange.name]

    def _binding_parties(self, owner, queue, exchange):
        if not exchange:
            raise TransportError("queues cannot be bound to the default exchange ''")
        return self._accessible_queue(queue, owner), self._exchange(exchange)

    def _bind(self, owner, queue, exchange, routing_key):
        queue, exchange = self._binding_parties(owner, queue, exchange)
        exchange.add_binding(queue, routing_key)

    def _unbind(self, owner, queue, exchange, routing_key):
        queue, exchange = self._binding_parties(owner, queue, exchange)
        if (queue.name, routing_key) in exchange.bindings:
            self._remove_binding(exchange, queue, routing_key)

    def _consume(self, transport, name, callback, prefetch):
        if not callable(callback):
            raise TypeError(f"consume needs a callable, got {callback!r}")
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"prefetch must be an integer >= 0 (0: no limit), got {prefetch!r}")
        queue = self._accessible_queue(name, transport)
        consumer = _Consumer(transport, queue, callback, prefetch)
        queue.consumers.append(consumer)
        transport._consumers[consumer] = None
        queue.dispatch()
        return consumer

    def _cancel(self, consumer):
        if not consumer.active:
            return
        consumer.active = False
        consumer._transport._consumers.pop(consumer, None)
        queue = consumer.queue_state
        queue.consumers.remove(consumer)
        queue._turn = 0
        unacked = list(consumer.unacked.values())
        consumer.unacked.clear()
        if queue.auto_delete and not queue.consumers:
            self._remove_queue(queue)
        elif unacked:
            queue.requeue(unacked)

    def _disconnect(self, transport):
        for consumer in list(transport._consumers):
            self._cancel(consumer)
        for queue in [q for q in self._queues.values() if q.owner is transport]:
            self._remove_queue(queue)


def _check_same(kind, declared, **wanted):
    """Raise PreconditionFailed unless a redeclare asks for what was declared."""
    for key, value in wanted.items():
        if getattr(declared, key) != value:
            raise PreconditionFailed(
                f"{kind} {declared.name!r} already declared with {key}={getattr(declared, key)!r},"
                f" not {value!r}"
            )


_NEW, _OPEN, _CLOSED = "new", "open", "closed"


@implementer(ITransport)
class MemoryTransport:
    """One connection to a L{MemoryBroker}, authenticated as C{user}.

    C{reactor} is anything with C{callLater}; deliveries are handed to callbacks from it.
    Every method returns a Deferred, failed with a L{TransportError} subclass on refusal.
    Operations before C{connect()} fail with TransportError, after C{close()} with
    ConnectionLost."""

    def __init__(self, broker, reactor, user="ion"):
        self.broker = broker
        self.user = user
        self._reactor = reactor
        self._state = _NEW
        self._consumers = {}  # _Consumer -> None, in creation order
        self._outbox = collections.deque()
        self._drain_call = None
        self._draining = False

    def __repr__(self):
        return f"<MemoryTransport user={self.user!r} {self._state}>"

    @property
    def lost_messages(self):
        """True when the broker's previous run ended with messages in durable queues (they
        died with it): see the module docstring."""
        return self.broker.lost_messages

    def _unavailable(self):
        if self._state is _NEW:
            return TransportError("memory transport is not connected; call connect() first")
        return ConnectionLost(f"memory transport of user {self.user!r} is closed")

    def _do(self, operation, *args):
        if self._state is not _OPEN:
            return defer.fail(self._unavailable())
        try:
            return defer.succeed(operation(*args))
        except Exception:
            return defer.fail()

    def on_connection_lost(self, listener):
        """An in-process broker connection is never lost, only closed: nothing to report."""

    def connect(self):
        if self._state is _CLOSED:
            return defer.fail(self._unavailable())
        self._state = _OPEN
        return defer.succeed(self)

    def close(self):
        if self._state is _OPEN:
            self.broker._disconnect(self)
        self._state = _CLOSED
        self._outbox.clear()
        if self._drain_call is not None:
            self._drain_call.cancel()
            self._drain_call = None
        return defer.succeed(None)

    def declare_exchange(self, name, type="topic", durable=False, auto_delete=False):
        return self._do(self.broker._declare_exchange, name, type, durable, auto_delete)

    def delete_exchange(self, name, if_unused=False):
        return self._do(self.broker._delete_exchange, name, if_unused)

    def declare_queue(
        self, name="", durable=False, exclusive=False, auto_delete=False, arguments=None
    ):
        return self._do(
            self.broker._declare_queue, self, name, durable, exclusive, auto_delete, arguments
        )

    def delete_queue(self, name):
        return self._do(self.broker._delete_queue, self, name)

    def queue_depth(self, name):
        return self._do(self.broker.queue_depth, name)

    def bind(self, queue, exchange, routing_key):
        return self._do(self.broker._bind, self, queue, exchange, routing_key)

    def unbind(self, queue, exchange, routing_key):
        return self._do(self.broker._unbind, self, queue, exchange, routing_key)

    def publish(self, exchange, routing_key, body, properties=None, mandatory=True):
        """Route body to every matching queue once. Fires with None at once (the broker has
        it), or fails with NotFound (no such exchange) or, when mandatory, Unroutable.
        C{properties.user_id} is set to this connection's user."""
        return self._do(self._publish, exchange, routing_key, body, properties, mandatory)

    def _publish(self, exchange, routing_key, body, properties, mandatory):
        # Every queued copy gets its own Properties and headers dict, as if it had crossed a
        # wire: neither the publisher nor another receiver can change it afterwards.
        if properties is not None:
            if properties.headers:
                check_headers(properties.headers)
            properties = properties.copied(self.user)
        body = body_bytes(body)
        queues = self.broker._exchange(exchange).route(routing_key)
        if not queues and mandatory:
            raise Unroutable(exchange, routing_key)
        for i, queue in enumerate(queues):
            if i and properties is not None:
                properties = properties.copied(self.user)
            queue.put(_Message(body, exchange, routing_key, properties, self.user))

    def consume(self, queue, callback, prefetch=100):
        return self._do(self.broker._consume, self, queue, callback, prefetch)

    def _hand_over(self, delivery):
        self._outbox.append(delivery)
        if self._drain_call is None and not self._draining:
            self._drain_call = self._reactor.callLater(0, self._drain)

    def _drain(self):
        self._drain_call = None
        self._draining = True
        outbox = self._outbox
        try:
            for _ in range(_DELIVERY_BATCH):
                if not outbox:
                    break
                delivery = outbox.popleft()
                consumer = delivery._consumer
                if consumer is not None and consumer.active:
                    call_consumer(consumer._callback, delivery, consumer.queue, consumer.inactive)
        finally:
            self._draining = False
        if outbox and self._state is _OPEN:
            self._drain_call = self._reactor.callLater(0, self._drain)
