"""The amqp:// and amqps:// transports: RabbitMQ through txamqp, reconnecting on its own.

`AmqpTransport` keeps one AMQP 0-9-1 connection, made and remade by a `ClientService` with
exponential backoff and jitter. After every (re)connect it declares again each exchange, queue
and binding it declared before and re-attaches its consumers, so the layers above keep their
objects across a broker restart.

What it guarantees on the wire:
- publishes go out on one channel in confirm mode: `publish` fires when the broker acked the
  message, fails with `Unroutable` when a mandatory message reached no queue (basic.return),
  with `NotFound` when the exchange is missing, and with `ConnectionLost` when the connection
  (or the publish channel) went away before the broker confirmed;
- `user_id` is set to the connection's user on every message; RabbitMQ checks it, so receivers
  can trust it;
- each consumer has its own channel with its own prefetch (basic.qos); cancelling it closes the
  channel, which puts its unacked messages back at the head of the queue; the broker's consumer
  cancel notification (the queue was deleted) is logged and ends the consumer;
- a refused operation closes only its channel: 404 becomes `NotFound`, 405 `QueueInUse`, other
  codes `TransportError`; the connection stays up;
- heartbeats are on (10 s by default); TLS (amqps://) always verifies the broker's certificate
  and host name.

While the connection is down, operations fail at once with `ConnectionLost`; `whenConnected()`
tells when it is back. Queues with server-generated names cannot be declared again under the
same name, so they and their consumers do not survive a reconnect.

The modules, all private behind this one:
- `_wire`: field tables (bounded when decoding) and the frame codec;
- `_address`: AMQP URLs;
- `_protocol`: the connection's protocol, which reads and writes frames with `_wire`;
- `_session`: one live connection and its channels;
- `_publish`: the publish channel in confirm mode, with returns;
- `_consume`: consumers, deliveries and ack batching;
- `_transport`: `AmqpTransport`, the reconnecting connection and what it declared.

Only this package imports txamqp, and uses it for the synchronous calls (handshake,
declarations, channels). Frames are encoded and decoded here (see `_protocol`): txamqp's field
tables know only strings and unsigned 32-bit integers, and its Deferred queue, lock and timer
reset per frame cost more than the broker's own work per message. So a publish is one write,
deliveries, confirms and returns reach their handlers as soon as their last frame is read, and
the acks of a reactor turn go together (`_consume._Acks`).
"""

from ion.core.messaging.amqp._address import AmqpAddress
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
]
