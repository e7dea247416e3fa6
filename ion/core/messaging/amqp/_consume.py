"""Consumers that outlive connections, their deliveries, and acks batched per reactor turn."""

import collections
import inspect
import uuid

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ion.core.messaging.amqp._protocol import _as_deferred, _spawn
from ion.core.messaging.transport import (
    IConsumer,
    IDelivery,
    Properties,
    TransportError,
    consumer_failed,
)

log = Logger()


_AFTER_READ = object()  # _Acks._flush: flushed at the end of the read under way


class _Acks:
    """Sends the acks and nacks of one consumer channel.

    Acks made while the broker's bytes are handled wait for the end of that read, or, in a long
    read, for every C{EARLY_WRITE} (50) deliveries, and go out with what else it makes us send;
    others wait for the end of the reactor turn. Then the run of settled messages at the head of the
    channel's unsettled ones goes as one basic.ack with C{multiple}, and acks behind a message still
    being worked on go one by one, so that a slow message never holds back the prefetch window. A
    nack goes at once, after the acks before it. Every delivery on the channel is counted, also
    those no consumer takes, so that C{multiple} never covers a message nobody settled."""

    def __init__(self, session, channel):
        self.session = session
        self.channel = channel
        # The delivery tags received, oldest first: the session appends each one.
        self.unsettled = collections.deque()
        self._acked = set()  # acked, not yet sent
        self._sent = set()  # acked or nacked on the wire, still in unsettled
        self._flush = None

    def ack(self, tag):
        self._acked.add(tag)
        if self._flush is None:
            if self.session.client.after_read(self.flush):
                self._flush = _AFTER_READ
            else:
                self._flush = self.session.transport.reactor.callLater(0, self.flush)

    def nack(self, tag, requeue):
        self.flush()
        if self._writable():
            self.session.client.send_nack(self.channel.id, tag, requeue)
            self._sent.add(tag)

    def flush(self):
        """Send the acks waiting now."""
        self._cancel()
        acked = self._acked
        if not acked or not self._writable():
            acked.clear()
            return
        unsettled, sent = self.unsettled, self._sent
        last = None
        while unsettled:
            tag = unsettled[0]
            if tag in acked:
                acked.remove(tag)
                last = tag
            elif tag in sent:
                sent.remove(tag)
            else:
                break
            unsettled.popleft()
        client, number = self.session.client, self.channel.id
        if last is not None:
            client.send_ack(number, last, True)
        for tag in sorted(acked):
            client.send_ack(number, tag, False)
        sent.update(acked)
        acked.clear()

    def discard(self):
        """The channel or the connection is gone, and with it what was not sent."""
        self._cancel()
        self._acked.clear()

    def _cancel(self):
        flush, self._flush = self._flush, None
        if flush is not None and flush is not _AFTER_READ and flush.active():
            flush.cancel()

    def _writable(self):
        return not self.session.is_lost and not self.channel.closed


@implementer(IDelivery)
class _Delivery:
    __slots__ = ("body", "exchange", "routing_key", "_amqp_properties", "_properties")
    __slots__ += ("redelivered", "_acks", "_tag", "settled")

    def __init__(self, acks, args, body, properties):
        # args: those of basic.deliver (consumer tag, delivery tag, redelivered, exchange,
        # routing key).
        _, self._tag, self.redelivered, self.exchange, self.routing_key = args
        self.body = body
        self._amqp_properties = properties
        self._properties = None
        self._acks = acks
        self.settled = False

    @property
    def properties(self):
        # Made when first asked for: many consumers (a pump's) never look at them.
        if self._properties is None:
            self._properties = _properties_from_amqp(self._amqp_properties)
        return self._properties

    @property
    def user_id(self):
        return self._amqp_properties.get("user-id")

    def _settled_twice(self, action):
        return TransportError(
            f"cannot {action} message {self.routing_key!r}: it was already acked or nacked"
        )

    def ack(self):
        # Sent at the end of the read or reactor turn (before the consumer's channel closes).
        if self.settled:
            raise self._settled_twice("ack")
        self.settled = True
        acks = self._acks
        if not acks.channel.closed:
            acks.ack(self._tag)

    def nack(self, requeue=True):
        if self.settled:
            raise self._settled_twice("nack")
        self.settled = True
        acks = self._acks
        if not acks.channel.closed:
            acks.nack(self._tag, requeue)


@implementer(IConsumer)
class _Consumer:
    """A consumer that outlives connections: each (re)connect attaches it on a new channel."""

    def __init__(self, transport, queue, callback, prefetch):
        self.queue = queue
        self.prefetch = prefetch
        self.active = True
        self.channel = None
        self._transport = transport
        self._callback = callback
        self._session = None
        self._tag = None

    def __repr__(self):
        return f"<consumer of {self.queue!r} on {self._transport.address}>"

    async def attach(self, session):
        channel = await session.open_channel()
        tag = f"ion.{uuid.uuid4().hex}"
        try:
            if self.prefetch:
                await channel.call("basic_qos", prefetch_count=self.prefetch)
            self._session, self.channel, self._tag = session, channel, tag
            session.consumers[tag] = self
            await channel.call("basic_consume", queue=self.queue, consumer_tag=tag)
        except BaseException:
            session.consumers.pop(tag, None)
            if self.channel is channel:
                self._session = self.channel = None
            await session.close_channel(channel)
            raise

    @_as_deferred
    async def cancel(self):
        """Stop delivering; the broker puts unacked messages back at the head of the queue,
        marked redelivered."""
        if not self.active:
            return
        self.active = False
        self._transport._consumer_ended(self)
        await self._close_channel()

    async def _close_channel(self):
        session, channel = self._session, self.channel
        self._session = self.channel = None
        if session is not None:
            session.consumers.pop(self._tag, None)
            await session.close_channel(channel)

    def detached(self, session):
        """The connection went away: the broker requeues what we held."""
        if self._session is session:
            self._session = self.channel = None

    def channel_failed(self, session, reason):
        session.consumers.pop(self._tag, None)
        self._session = self.channel = None
        if not self.active:
            return
        log.warn(
            "AMQP: consumer of {queue!r} lost its channel ({code} {text}); attaching again",
            queue=self.queue,
            code=getattr(reason, "reply_code", None),
            text=getattr(reason, "reply_text", reason),
        )
        _spawn(self._reattach(session), f"re-attaching the consumer of {self.queue!r}")

    async def _reattach(self, session):
        try:
            await self.attach(session)
        except TransportError as e:
            if not session.is_lost:
                log.error("AMQP: consumer of {queue!r} ended: {error}", queue=self.queue, error=e)
                self.active = False
                self._transport._consumer_ended(self)

    def cancelled_by_broker(self, session):
        log.warn(
            "AMQP: the broker cancelled the consumer of {queue!r} (queue deleted?)",
            queue=self.queue,
        )
        self.active = False
        self._transport._consumer_ended(self, queue_gone=True)
        if self._session is session:
            _spawn(self._close_channel(), "closing a cancelled consumer's channel")

    def deliver(self, channel, acks, args, body, properties):
        """Hand a basic.deliver (see L{_Session.deliver}) to the callback, as
        L{ion.core.messaging.transport.call_consumer} does: that call, inlined, since it is
        made for every message."""
        if not self.active or channel is not self.channel:
            return
        delivery = _Delivery(acks, args, body, properties)
        try:
            result = self._callback(delivery)
        except Exception:
            consumer_failed(Failure(), delivery, self.queue, None)
            return
        if result is not None and inspect.isawaitable(result):
            defer.ensureDeferred(result).addErrback(consumer_failed, delivery, self.queue, None)


def _properties_from_amqp(amqp):
    return Properties(
        content_type=amqp.get("content-type"),
        delivery_mode=amqp.get("delivery-mode") or 1,
        message_id=amqp.get("message-id"),
        user_id=amqp.get("user-id"),
        headers=amqp.get("headers") or {},
        timestamp=amqp.get("timestamp"),
        expiration=amqp.get("expiration"),
    )
