"""Envelopes on a system exchange: what processes use to send and receive messages.

A L{Messenger} binds one transport to one system (sysname). It encodes envelopes with the
codec, publishes them with the receiver name as routing key (mandatory, so an unknown receiver
fails at once with C{Unroutable}), and decodes what arrives on a queue. A message that fails to
decode is logged and dropped (nacked without requeue), and the listener keeps going.

Tracing: with config C{ion.core.messaging: {'trace': True}} (looked up at every send), each sent
envelope is also published, without its content, to the fanout exchange C{ion.<sysname>.trace}
for observers (L{ion.apps.observer}). The copy keeps every header; its content is
C{{'type': <type name of the content>, 'size': <bytes of the whole message>}}. Observers bind
their own queues to that exchange, never to the system exchange, so a send to an unknown
receiver still fails at once (its trace copy is published all the same: the send was tried).
The copy is not mandatory and its failures are only logged (at debug): tracing never fails a
send.
"""

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from ion.core.messaging import codec, names
from ion.core.messaging.transport import Properties, TransportError
from ion.core.metrics import Metrics

log = Logger()

MESSAGING = "ion.core.messaging"


@attrs.define
class Message:
    """A decoded envelope as received: C{user_id} is the broker-validated sender identity."""

    headers: dict
    content: object
    user_id: str | None
    delivery: object = attrs.field(repr=False)

    def ack(self):
        self.delivery.ack()


class Messenger:
    """Sends and receives the envelopes of one system over C{transport}; a send is stamped
    C{ts} (milliseconds) from C{clock} (the container's). C{limits} bound what is decoded
    (L{codec.Limits}); C{config} is the container's."""

    def __init__(self, transport, sysname, clock, limits, config):
        self.transport = transport
        self.clock = clock
        self.sysname = sysname
        self.exchange = names.system_exchange(sysname)
        self.trace_exchange = f"{self.exchange}.trace"
        self.limits = limits
        self.config = config
        self.metrics = Metrics()  # the container's (ion.core.metrics)

    async def start(self):
        await self.transport.declare_exchange(self.exchange, "topic")
        await self.transport.declare_exchange(self.trace_exchange, "fanout")

    async def remove_exchanges(self):
        """Delete the system's exchanges if this was the last container of the system: the
        system exchange only while no queue is bound to it (every running container keeps its
        agent's queue bound there, so the broker itself answers "is anyone left?" atomically),
        and the trace exchange only after it, so that a running container never loses the
        exchange it traces to. Returns whether they were removed; a refusal is not an error."""
        try:
            await self.transport.delete_exchange(self.exchange, if_unused=True)
            await self.transport.delete_exchange(self.trace_exchange, if_unused=True)
        except TransportError as e:
            log.debug("system exchanges kept: {error}", error=e)
            return False
        return True

    def tracing(self):
        """Whether sends are traced now (config C{ion.core.messaging: {'trace': ...}})."""
        return bool(self.config.get(MESSAGING, "trace", False))

    async def declare_receiver(self, queue, key, exclusive=False, auto_delete=True):
        """Create queue (if missing) and route messages addressed to C{key} into it."""
        await self.transport.declare_queue(queue, exclusive=exclusive, auto_delete=auto_delete)
        await self.transport.bind(queue, self.exchange, key)

    async def declare_trace_receiver(self, queue):
        """Create an exclusive queue that gets the trace copy of every traced send of this
        system (read it with L{listen})."""
        await self.transport.declare_queue(queue, exclusive=True, auto_delete=True)
        await self.transport.bind(queue, self.trace_exchange, "")

    def send(self, receiver, headers, content):
        """Publish an envelope to receiver. Returns a Deferred, failed with Unroutable if
        nobody listens there, or with the error that kept the envelope from being sent."""
        headers["receiver"] = receiver
        if "ts" not in headers:
            headers["ts"] = int(self.clock.seconds() * 1000)
        if "encoding" not in headers:
            headers["encoding"] = "msgpack"
        try:
            body = codec.encode_envelope_parts(headers, content)
        except Exception:
            return defer.fail()
        self.metrics.published.inc((headers.get("sender-name", ""),))
        if self.tracing():
            # Before the message itself: then an observer never sees a reply before its request.
            defer.Deferred.fromCoroutine(self._trace(receiver, headers, content, len(body)))
        return self.transport.publish(self.exchange, receiver, body, None, mandatory=True)

    async def _trace(self, receiver, headers, content, size):
        """Publish the trace copy of a sent envelope. Not awaited by L{send} and never fails:
        tracing must not slow down or break the traffic it watches."""
        summary = {"type": type(content).__name__, "size": size}
        try:
            body = codec.encode_envelope(codec.Envelope(headers=headers, content=summary))
            await self.transport.publish(
                self.trace_exchange, receiver, body, Properties(), mandatory=False
            )
        except Exception as e:
            log.debug("trace copy to {receiver} not published: {error}", receiver=receiver, error=e)

    async def listen(self, queue, handler, prefetch=100):
        """Call handler(Message) for each decodable message on queue; returns the consumer.
        The handler acks (through L{Message.ack}) when it is done with the message."""

        def on_delivery(delivery):
            try:
                headers, content = codec.decode_envelope_parts(delivery.body, self.limits)
            except codec.DecodeError as e:
                log.warn("dropped an undecodable message on {queue}: {error}", queue=queue, error=e)
                delivery.nack(requeue=False)
                return
            handler(Message(headers, content, delivery.user_id, delivery))

        return await self.transport.consume(queue, on_delivery, prefetch=prefetch)
