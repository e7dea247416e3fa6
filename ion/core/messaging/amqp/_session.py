"""One live AMQP connection: handshake, control channel, publish channel, consumer channels."""

import contextlib

from twisted.internet import defer
from twisted.logger import Logger

from ion.core.messaging.amqp._consume import _Acks
from ion.core.messaging.amqp._publish import _Publisher
from ion.core.messaging.transport import ConnectionLost, TransportError

log = Logger()

CLOSE_TIMEOUT = 5.0


class _Session:
    """One live AMQP connection: handshake, a control channel for declarations, the publish
    channel, and one channel per consumer."""

    def __init__(self, transport, client_factory):
        self.transport = transport
        self.channel_max = 2047
        self.control = None
        self.control_lock = defer.DeferredLock()
        self.publisher = _Publisher(self)
        self.consumers = {}  # consumer tag -> _Consumer
        self.acks = {}  # channel -> _Acks, for channels that received deliveries
        self.is_lost = False
        self.closing = False
        self.prepared = False  # set up, as the ClientService's prepareConnection
        self.client = client_factory(self)

    async def open(self):
        """Authenticate, open the vhost and the publish channel."""
        await self.client.opened
        await self.publisher.open()

    def lost(self, reason):
        # State first, errbacks last: callers woken by a failed publish may act at once.
        self.is_lost = True
        for acks in self.acks.values():
            acks.discard()
        self.acks.clear()
        self.transport._session_lost(self, reason)
        for consumer in list(self.consumers.values()):
            consumer.detached(self)
        self.consumers.clear()
        self.publisher.connection_lost()

    async def open_channel(self):
        if self.is_lost:
            raise ConnectionLost("connection lost")
        numbers = range(1, self.channel_max + 1)
        number = next((n for n in numbers if n not in self.client.channels), None)
        if number is None:
            raise TransportError(f"all {self.channel_max} AMQP channels are in use")
        channel = self.client.channel(number)
        try:
            await channel.call("channel_open")
        except BaseException:
            self.release(channel)
            raise
        return channel

    def release(self, channel):
        """Forget a closed channel, so that its number can be used again. Releasing twice is
        harmless, also after the number went to a new channel."""
        if self.client.channels.get(channel.id) is channel:
            del self.client.channels[channel.id]
        acks = self.acks.pop(channel, None)
        if acks is not None:
            acks.discard()

    async def close_channel(self, channel):
        acks = self.acks.get(channel)
        if acks is not None:
            acks.flush()
        if not channel.closed and not self.is_lost:
            with contextlib.suppress(TransportError):
                await channel.call("channel_close", reply_code=200, reply_text="closed by client")
            channel.close(None)
        self.release(channel)

    def channel_failed(self, channel, reason):
        """The broker closed a channel (reason: its channel.close method, channel.error the
        error it means)."""
        self.release(channel)
        if channel is self.publisher.channel:
            self.publisher.channel_failed(reason)
            return
        for consumer in list(self.consumers.values()):
            if consumer.channel is channel:
                consumer.channel_failed(self, reason)

    async def control_call(self, method, **arguments):
        """Run one synchronous method on the control channel. One at a time, so that a
        refusal (which closes the channel) is charged to the call that caused it."""
        async with self.control_lock:
            if self.control is None or self.control.closed:
                self.control = await self.open_channel()
            return await self.control.call(method, **arguments)

    def _acks(self, channel):
        acks = self.acks.get(channel)
        if acks is None:
            acks = self.acks[channel] = _Acks(self, channel)
        return acks

    def deliver(self, channel, args, body, properties):
        """A basic.deliver on C{channel}: C{args} are its (consumer tag, delivery tag,
        redelivered, exchange, routing key), C{properties} its content properties (a dict
        keyed by spec name). Every delivery is counted for the channel's acks, also one that
        no consumer takes."""
        acks = self.acks.get(channel)
        if acks is None:
            acks = self._acks(channel)
        acks.unsettled.append(args[1])
        consumer = self.consumers.get(args[0])
        if consumer is not None:
            consumer.deliver(channel, acks, args, body, properties)

    def reject(self, channel, arguments, error):
        """Refuse a delivery whose properties cannot be decoded: nack without requeue (to the
        queue's dead-letter exchange, if it has one), log it once, keep the connection."""
        acks = self._acks(channel)
        tag = arguments["delivery_tag"]
        acks.unsettled.append(tag)
        acks.nack(tag, requeue=False)
        consumer = self.consumers.get(arguments["consumer_tag"])
        log.warn(
            "AMQP: rejected a message on queue {queue!r} (exchange {exchange!r}, routing key "
            "{routing_key!r}): its properties cannot be decoded: {error}",
            queue=consumer.queue if consumer is not None else None,
            exchange=arguments["exchange"],
            routing_key=arguments["routing_key"],
            error=error,
        )

    def cancelled_by_broker(self, tag):
        consumer = self.consumers.pop(tag, None)
        if consumer is not None:
            consumer.cancelled_by_broker(self)

    async def close(self):
        """Close the connection cleanly (connection.close, wait for close-ok)."""
        self.closing = True
        if self.is_lost:
            return
        for acks in list(self.acks.values()):
            acks.flush()
        closing = self.client.channels[0].call(
            "connection_close", reply_code=200, reply_text="closed by client"
        )
        closing.addTimeout(CLOSE_TIMEOUT, self.transport.reactor)
        with contextlib.suppress(Exception):
            await closing
        self.client.lose_connection()
