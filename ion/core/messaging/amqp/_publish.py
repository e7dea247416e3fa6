"""Publishing on one channel in confirm mode, with mandatory returns matched to publishes."""

import collections

from twisted.internet import defer
from twisted.logger import Logger

from ion.core.messaging.amqp._protocol import _closed_error, _spawn
from ion.core.messaging.amqp._wire import _EncodedTable, _shortstr, encode_table
from ion.core.messaging.transport import ConnectionLost, TransportError, Unroutable

log = Logger()


class _Publish:
    """One message to publish, and the Deferred its confirm fires. A plain class: one is made
    per message, and an attrs class's __init__ takes twice as long."""

    __slots__ = ("exchange", "routing_key", "body", "properties", "mandatory", "deferred")

    def __init__(self, exchange, routing_key, body, properties, mandatory):
        self.exchange = exchange
        self.routing_key = routing_key
        self.body = body
        self.properties = properties  # AMQP content properties (a dict), or their encoding
        self.mandatory = mandatory
        self.deferred = defer.Deferred()


class _Publisher:
    """The publish channel in confirm mode: delivery tags count publishes from 1, and
    basic.ack/basic.nack (possibly C{multiple}) settle them.

    basic.return carries no delivery tag. RabbitMQ sends it before the ack of the returned
    message and acks an unroutable message at once, so a return belongs to one of the
    publishes settled by the next ack; among those it is the first with the same exchange,
    routing key and body.

    Publishing to a missing exchange would close the channel and lose the confirms of every
    publish in flight, so an exchange not yet seen on this connection is first checked with a
    passive declare. Publishes wait in C{backlog}, in order, while that check runs or while the
    channel is reopened."""

    def __init__(self, session):
        self.session = session
        self.channel = None
        self.next_tag = 1
        self.unconfirmed = collections.OrderedDict()  # delivery tag -> _Publish, in tag order
        self.returns = []  # (exchange, routing key, body) of returns not yet matched
        self.known_exchanges = {""}
        self.backlog = None  # deque of _Publish waiting to be sent, or None
        self._draining = False

    async def open(self):
        channel = await self.session.open_channel()
        await channel.call("confirm_select")
        self.channel = channel
        self.next_tag = 1

    def publish(self, message):
        if (
            self.backlog is None
            and self.channel is not None
            and message.exchange in self.known_exchanges
        ):
            self._send(message)
        else:
            self._enqueue([message])
        return message.deferred

    def _send(self, message):
        try:
            self.session.client.send_publish(
                self.channel.id,
                message.exchange,
                message.routing_key,
                message.mandatory,
                message.properties,
                message.body,
            )
        except Exception as e:
            message.deferred.errback(TransportError(f"cannot encode the message: {e}"))
            return
        self.unconfirmed[self.next_tag] = message
        self.next_tag += 1

    def _enqueue(self, messages, front=False):
        if self.backlog is None:
            self.backlog = collections.deque()
        if front:
            self.backlog.extendleft(reversed(messages))
        else:
            self.backlog.extend(messages)
        if not self._draining:
            self._draining = True
            _spawn(self._drain(), "publishing")

    async def _drain(self):
        try:
            while self.backlog:
                if self.channel is None:
                    await self.open()
                    continue
                message = self.backlog[0]
                if message.exchange not in self.known_exchanges:
                    try:
                        await self.session.control_call(
                            "exchange_declare", exchange=message.exchange, passive=True
                        )
                    except ConnectionLost:
                        raise
                    except TransportError as e:
                        if self.backlog and message in self.backlog:
                            self.backlog.remove(message)
                        message.deferred.errback(e)
                    else:
                        self.known_exchanges.add(message.exchange)
                    continue
                self.backlog.popleft()
                self._send(message)
            self.backlog = None
        except TransportError as e:
            if not self.session.is_lost:
                log.error("AMQP: cannot publish ({error}); dropping the connection", error=e)
                self.session.client.transport.abortConnection()
            self.connection_lost()
        finally:
            self._draining = False

    def returned(self, channel, message):
        if channel is self.channel:
            self.returns.append((message.exchange, message.routing_key, message.body))

    def confirmed(self, channel, tag, multiple, error):
        if channel is not self.channel:
            return
        unconfirmed = self.unconfirmed
        if multiple:
            tags = []
            for t in unconfirmed:
                if t > tag:
                    break
                tags.append(t)
        else:
            tags = [tag] if tag in unconfirmed else []
        if self.returns or error is not None:
            unroutable = self._match_returns(tags) if self.returns else ()
            settled = [(t, unconfirmed.pop(t)) for t in tags]
            for t, message in settled:
                if t in unroutable:
                    message.deferred.errback(Unroutable(message.exchange, message.routing_key))
                elif error is not None:
                    message.deferred.errback(error)
                else:
                    message.deferred.callback(None)
            return
        # The usual case: all taken. Every one leaves the table before any caller hears.
        settled = [unconfirmed.pop(t).deferred for t in tags]
        for deferred in settled:
            deferred.callback(None)

    def _match_returns(self, tags):
        matched = set()
        unmatched = []
        for returned in self.returns:
            for t in tags:
                m = self.unconfirmed[t]
                if t not in matched and (m.exchange, m.routing_key, m.body) == returned:
                    matched.add(t)
                    break
            else:
                unmatched.append(returned)
        self.returns = unmatched
        return matched

    def channel_failed(self, reason):
        """The broker closed the publish channel (an exchange vanished after it was checked,
        or access was refused), because of the first unconfirmed publish naming the exchange
        in the error, else the first unconfirmed one. Earlier publishes were taken but lost
        their confirms; later ones were never looked at, so they are sent again."""
        text = reason.reply_text
        error = _closed_error("channel", reason.reply_code, text)
        pending = list(self.unconfirmed.values())
        self.unconfirmed = collections.OrderedDict()
        self.returns = []
        self.channel = None
        culprit = next((i for i, m in enumerate(pending) if f"exchange '{m.exchange}'" in text), 0)
        if pending:
            self.known_exchanges.discard(pending[culprit].exchange)
        # State first, errbacks last: a caller woken by an errback may publish again at once.
        self._enqueue(pending[culprit + 1 :], front=True)
        for message in pending[:culprit]:
            message.deferred.errback(
                ConnectionLost(f"publish not confirmed: the publish channel closed ({text})")
            )
        if pending:
            pending[culprit].deferred.errback(error)

    def connection_lost(self):
        pending = list(self.unconfirmed.values()) + list(self.backlog or ())
        self.unconfirmed = collections.OrderedDict()
        self.backlog = None
        self.returns = []
        self.channel = None
        for message in pending:
            message.deferred.errback(
                ConnectionLost("connection lost before the broker confirmed the publish")
            )


def _amqp_properties(properties, user):
    """Our Properties as AMQP content properties (keyed by spec name), with user-id set to
    user."""
    amqp = {"user-id": user, "delivery-mode": properties.delivery_mode or 1}
    if properties.content_type is not None:
        amqp["content-type"] = _shortstr(properties.content_type, "content_type")
    if properties.message_id is not None:
        amqp["message-id"] = _shortstr(properties.message_id, "message_id")
    if properties.headers:
        amqp["headers"] = _EncodedTable(encode_table(properties.headers))
    if properties.timestamp is not None:
        amqp["timestamp"] = int(properties.timestamp)
    if properties.expiration is not None:
        amqp["expiration"] = _shortstr(str(properties.expiration), "expiration")
    return amqp
