"""The transport interface: what every wire (memory://, amqp://) offers the layers above.

A transport owns exchanges, queues and bindings on one broker connection and moves opaque
byte bodies with a small set of AMQP-like properties. Everything above it (envelopes,
conversations, processes) is written against this interface only, so that the same tests
run on every transport.

Semantics every transport keeps:

  - exchanges are C{topic}, C{direct} or C{fanout}; topic bindings use C{*} (one word) and C{#}
    (zero or more words), words separated by dots;
  - C{publish(..., mandatory=True)} of a message that no queue receives raises L{Unroutable}
    at once (the caller learns that the receiver does not exist);
  - a consumer gets at most C{prefetch} unacknowledged deliveries; C{nack(requeue=True)} puts the
    message back at the head of its queue with C{redelivered} set;
  - exclusive queues belong to the connection that declared them; auto-delete queues vanish
    when their last consumer is cancelled;
  - message headers hold at most HEADER_DEPTH levels of nested maps and lists and HEADER_VALUES
    values in all (AMQP field tables from any broker user are decoded within these bounds): a
    publish past them fails with ValueError.
"""

import inspect

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface

log = Logger()

EXCHANGE_TYPES = ("topic", "direct", "fanout")

# The queue arguments ION uses, with RabbitMQ's meaning: a quorum queue (replicated on a
# cluster) returns a message at most `x-delivery-limit` times, then dead-letters it through
# `x-dead-letter-exchange` with `x-dead-letter-routing-key`; redelivered messages carry
# DELIVERY_COUNT, the number of earlier returns.
QUEUE_TYPE = "x-queue-type"
DELIVERY_LIMIT = "x-delivery-limit"
DEAD_LETTER_EXCHANGE = "x-dead-letter-exchange"
DEAD_LETTER_ROUTING_KEY = "x-dead-letter-routing-key"
DELIVERY_COUNT = "x-delivery-count"
QUEUE_ARGUMENTS = (QUEUE_TYPE, DELIVERY_LIMIT, DEAD_LETTER_EXCHANGE, DEAD_LETTER_ROUTING_KEY)
QUEUE_TYPES = ("classic", "quorum")

HEADER_DEPTH = 16  # levels of nested maps and lists in headers, the headers map included
HEADER_VALUES = 10_000  # values in headers, nested ones included


def check_headers(headers):
    """Raise ValueError when headers exceed HEADER_DEPTH or HEADER_VALUES."""
    values = 0
    pending = [(headers, 1)]
    while pending:
        container, depth = pending.pop()
        if depth > HEADER_DEPTH:
            raise ValueError(f"headers nested deeper than {HEADER_DEPTH} levels")
        items = container.values() if isinstance(container, dict) else container
        values += len(items)
        if values > HEADER_VALUES:
            raise ValueError(f"headers hold more than {HEADER_VALUES} values")
        for item in items:
            if isinstance(item, (dict, list, tuple)):
                pending.append((item, depth + 1))


def check_exchange(name, type):
    """Raise TransportError unless an exchange C{name} of C{type} may be declared."""
    if not name:
        raise TransportError("the default exchange '' cannot be declared")
    if type not in EXCHANGE_TYPES:
        raise TransportError(
            f"unknown exchange type {type!r} for {name!r}; use one of {', '.join(EXCHANGE_TYPES)}"
        )


def check_queue_arguments(name, durable, exclusive, auto_delete, arguments):
    """The queue arguments as a dict (None: {}); PreconditionFailed when they are not ones
    ION uses, or ask for a quorum queue that is not durable, or exclusive or auto-delete
    (RabbitMQ refuses those too)."""
    arguments = dict(arguments or {})
    unknown = sorted(set(arguments) - set(QUEUE_ARGUMENTS))
    if unknown:
        raise PreconditionFailed(f"queue {name!r}: unsupported arguments {', '.join(unknown)}")
    kind = arguments.get(QUEUE_TYPE, "classic")
    if kind not in QUEUE_TYPES:
        raise PreconditionFailed(f"queue {name!r}: unknown {QUEUE_TYPE} {kind!r}")
    limit = arguments.get(DELIVERY_LIMIT)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise PreconditionFailed(f"queue {name!r}: {DELIVERY_LIMIT} must be an int >= 0")
    if kind == "quorum" and (not durable or exclusive or auto_delete):
        raise PreconditionFailed(
            f"queue {name!r}: a quorum queue must be durable, not exclusive nor auto-delete"
        )
    return arguments


def body_bytes(body):
    """The body of a publish as bytes; TypeError when it is not bytes-like."""
    if type(body) is bytes:
        return body
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise TypeError(f"body must be bytes, got {type(body).__name__}")
    return bytes(body)


def call_consumer(callback, delivery, queue, requeued=None):
    """Hand delivery to a consumer's callback, which may return a Deferred or a coroutine.

    An exception escaping it (raised, or failing what it returned) is logged; if the message
    is not settled, nor back in the queue (C{requeued()}), it is nacked without requeue, i.e.
    dropped, so that a poison message cannot loop forever."""
    try:
        result = callback(delivery)
    except Exception:
        consumer_failed(Failure(), delivery, queue, requeued)
        return
    if result is not None and inspect.isawaitable(result):
        defer.ensureDeferred(result).addErrback(consumer_failed, delivery, queue, requeued)


def consumer_failed(failure, delivery, queue, requeued):
    """What L{call_consumer} does with a C{failure} of the consumer of C{queue} on
    C{delivery} (for transports that make that call inline)."""
    if delivery.settled:
        outcome = "it had already been settled"
    elif requeued is not None and requeued():
        outcome = "it had already returned to the queue"
    else:
        outcome = "message dropped"
        delivery.nack(requeue=False)
    log.failure(
        "consumer of queue {queue!r} failed on message {routing_key!r}; {outcome}",
        failure,
        queue=queue,
        routing_key=delivery.routing_key,
        outcome=outcome,
    )


class TransportError(Exception):
    """Something went wrong on the wire (connection lost, broker refused an operation)."""


class Unroutable(TransportError):
    """A mandatory message matched no queue: nobody is there to receive it."""

    def __init__(self, exchange, routing_key):
        super().__init__(f"no queue for routing key {routing_key!r} on exchange {exchange!r}")
        self.exchange = exchange
        self.routing_key = routing_key


class ConnectionLost(TransportError):
    """The broker connection went away before the operation completed."""


class QueueInUse(TransportError):
    """An exclusive queue is owned by another connection, or already has a consumer."""


class NotFound(TransportError):
    """The named exchange or queue does not exist."""


class PreconditionFailed(TransportError):
    """A declare asked for other properties or arguments than those the broker holds (the
    queue exists as a classic queue and a quorum one is asked for, say)."""


@attrs.frozen
class Properties:
    """AMQP basic properties a transport carries. C{user_id} is set by the transport on publish
    to the connection's authenticated user; receivers may trust it."""

    content_type: str = "application/msgpack"
    delivery_mode: int = 1  # 1 transient, 2 persistent
    message_id: str | None = None
    user_id: str | None = None
    headers: dict = attrs.field(factory=dict)
    timestamp: int | None = None
    expiration: str | None = None

    def copied(self, user_id):
        """A copy as a queue keeps it: C{user_id} set and a headers dict of its own. What
        C{attrs.evolve} makes, written out: evolve looks the fields up on every call, and the
        in-memory exchange copies the properties of every message it routes (1.1 us a copy
        against 3.0)."""
        return Properties(
            self.content_type,
            self.delivery_mode,
            self.message_id,
            user_id,
            dict(self.headers),
            self.timestamp,
            self.expiration,
        )


class IDelivery(Interface):
    """One message handed to a consumer."""

    body = Attribute("bytes")
    exchange = Attribute("name of the exchange it was published to")
    routing_key = Attribute("str")
    properties = Attribute("Properties")
    user_id = Attribute("C{properties.user_id}, read without making the whole Properties")
    redelivered = Attribute("bool: this message was delivered before and not acked")
    settled = Attribute("bool: ack() or nack() was called")

    def ack():
        """Settle the message: it is gone from the queue. Acking or nacking a second time
        raises TransportError; once the consumer was cancelled or its connection closed, the
        message is back in the queue and a first ack or nack does nothing."""

    def nack(requeue=True):
        """Refuse the message: with requeue it goes back to the head of its queue marked
        redelivered, otherwise it is dropped. Same double-settle rule as L{ack}."""


class IConsumer(Interface):
    queue = Attribute("name of the queue consumed")

    def cancel():
        """Stop delivering; unacked messages return to the queue. Returns a Deferred."""


class ITransport(Interface):
    """One connection to a broker. All methods return Deferreds (or are coroutines)."""

    user = Attribute("the authenticated user name of this connection")
    lost_messages = Attribute(
        "True when messages of durable queues may have been lost before this connection: the "
        "embedded broker's previous run crashed or stopped with messages queued (RabbitMQ "
        "keeps persistent messages: always False there)"
    )

    def connect():
        """Open the connection; fires with this transport."""

    def close():
        """Cancel this connection's consumers (their unacked messages are requeued), delete
        its exclusive queues and close. Closing twice is harmless."""

    def declare_exchange(name, type="topic", durable=False, auto_delete=False):
        """Create the exchange if missing; fails with TransportError if it exists with other
        arguments."""

    def delete_exchange(name, if_unused=False):
        """Delete the exchange and its bindings (missing is fine); with if_unused, fails with
        TransportError instead while a queue is bound to it."""

    def declare_queue(name, durable=False, exclusive=False, auto_delete=False, arguments=None):
        """Create the queue if missing and fire with its name (generated when name is '').
        C{arguments} are RabbitMQ's optional queue arguments (L{QUEUE_ARGUMENTS}); a redeclare
        with other flags or arguments fails with L{PreconditionFailed}."""

    def delete_queue(name):
        """Delete the queue, its messages and bindings; its consumers stop. Missing is fine."""

    def queue_depth(name):
        """Fires with the number of messages ready in the queue (those delivered and not yet
        acked are not counted); fails with NotFound when there is no such queue."""

    def bind(queue, exchange, routing_key):
        """Route messages matching routing_key on exchange into queue."""

    def unbind(queue, exchange, routing_key):
        """Remove a binding; removing a missing binding is fine."""

    def publish(exchange, routing_key, body, properties=None, mandatory=True):
        """Publish bytes. Fires when the broker has accepted the message (confirmed);
        fails with Unroutable when mandatory and no queue matched."""

    def consume(queue, callback, prefetch=100):
        """Deliver messages of queue to callback(IDelivery), at most prefetch unacked at a time
        (0: no limit); fires with an IConsumer. See L{call_consumer} for callback errors."""

    def on_connection_lost(listener):
        """Call listener(ConnectionLost) whenever the connection is lost unexpectedly (a
        reconnecting transport then restores its exchanges, queues and consumers). Replies
        that were on their way are gone: callers waiting for them should fail now."""
