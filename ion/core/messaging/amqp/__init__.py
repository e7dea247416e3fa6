"""The amqp:// and amqps:// transports: RabbitMQ over AMQP 0-9-1, reconnecting on its own.

L{AmqpTransport} keeps one AMQP 0-9-1 connection, made and remade by a C{ClientService} with
exponential backoff and jitter. Its C{prepareConnection} does the handshake, then declares again
each exchange, queue and binding declared before and re-attaches the consumers, so the layers
above keep their objects across a broker restart; a failed prepare is a failed attempt.

What it guarantees on the wire:

  - publishes go out on one channel in confirm mode: C{publish} fires when the broker acked the
    message, fails with C{Unroutable} when a mandatory message reached no queue (basic.return),
    with C{NotFound} when the exchange is missing, and with C{ConnectionLost} when the connection
    (or the publish channel) went away before the broker confirmed;
  - C{user_id} is set to the connection's user on every message; RabbitMQ checks it, so receivers
    can trust it;
  - each consumer has its own channel with its own prefetch (basic.qos); cancelling it closes the
    channel, which puts its unacked messages back at the head of the queue; the broker's consumer
    cancel notification (the queue was deleted) is logged and ends the consumer;
  - a refused operation closes only its channel: 404 becomes C{NotFound}, 405 C{QueueInUse}, other
    codes C{TransportError}; the connection stays up;
  - heartbeats are on (10 s by default); TLS (amqps://) always verifies the broker's certificate
    and host name.

Given several brokers (a cluster's nodes; L{split_urls}), each connection attempt tries them in
turn from the one that worked last, so a lost node costs one reconnect to the next.

While the connection is down, operations fail at once with C{ConnectionLost}; C{whenConnected()}
tells when it is back. Queues with server-generated names cannot be declared again under the
same name, so they and their consumers do not survive a reconnect.

Its modules are private behind this one. No AMQP library is used, so none of its internals
can break this package: the protocol class (C{_protocol}), the codec and the spec loader
(C{_wire}) are ours. A publish is one write; deliveries, confirms
and returns reach their handlers as soon as their last frame is read; the acks of a reactor
turn go together (C{_consume._Acks}).
"""

from ion.core.messaging.amqp._address import AmqpAddress, split_urls
from ion.core.messaging.amqp._transport import AmqpTransport
from ion.core.messaging.amqp._wire import (
    TABLE_DEPTH,
    TABLE_ENTRIES,
    FieldTableError,
    decode_table,
    encode_table,
    load_spec,
)

__all__ = [
    "TABLE_DEPTH",
    "TABLE_ENTRIES",
    "AmqpAddress",
    "AmqpTransport",
    "FieldTableError",
    "decode_table",
    "encode_table",
    "load_spec",
    "split_urls",
]
