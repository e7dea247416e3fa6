"""Envelopes on a system exchange: what processes use to send and receive messages.

A `Messenger` binds one transport to one system (sysname). It encodes envelopes with the
codec, publishes them with the receiver name as routing key (mandatory, so an unknown receiver
fails at once with `Unroutable`), and decodes what arrives on a queue. A message that fails to
decode is logged and dropped (nacked without requeue), and the listener keeps going.
"""

import time

import attr
from twisted.logger import Logger

from ion.core.messaging import codec, names
from ion.core.messaging.transport import Properties

log = Logger()


@attr.s(auto_attribs=True, slots=True)
class Message:
    """A decoded envelope as received: `user_id` is the broker-validated sender identity."""

    headers: dict
    content: object
    user_id: str | None
    delivery: object = attr.ib(repr=False)

    def ack(self):
        self.delivery.ack()


class Messenger:
    def __init__(self, transport, sysname, limits=None):
        self.transport = transport
        self.sysname = sysname
        self.exchange = names.system_exchange(sysname)
        self.limits = limits or codec.Limits()

    async def start(self):
        await self.transport.declare_exchange(self.exchange, "topic")

    async def declare_receiver(self, queue, key, exclusive=False, auto_delete=True):
        """Create queue (if missing) and route messages addressed to `key` into it."""
        await self.transport.declare_queue(queue, exclusive=exclusive, auto_delete=auto_delete)
        await self.transport.bind(queue, self.exchange, key)

    async def delete_receiver(self, queue):
        await self.transport.delete_queue(queue)

    async def send(self, receiver, headers, content):
        """Publish an envelope to receiver; fails with Unroutable if nobody listens there."""
        headers["receiver"] = receiver
        headers.setdefault("ts", int(time.time() * 1000))
        headers.setdefault("encoding", "msgpack")
        body = codec.encode_envelope(codec.Envelope(headers=headers, content=content))
        await self.transport.publish(self.exchange, receiver, body, Properties(), mandatory=True)

    async def listen(self, queue, handler, prefetch=100):
        """Call handler(Message) for each decodable message on queue; returns the consumer.
        The handler acks (through `Message.ack`) when it is done with the message."""

        def on_delivery(delivery):
            try:
                env = codec.decode_envelope(delivery.body, self.limits)
            except codec.DecodeError as e:
                log.warn(
                    "dropped an undecodable message on {queue}: {error}", queue=queue, error=e
                )
                delivery.nack(requeue=False)
                return
            handler(Message(env.headers, env.content, delivery.properties.user_id, delivery))

        return await self.transport.consume(queue, on_delivery, prefetch=prefetch)
