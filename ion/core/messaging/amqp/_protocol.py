"""The protocol of one AMQP connection: txamqp's client with our frame codec and heartbeats,
and the mapping of txamqp's errors to ours."""

import functools
import struct

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from txamqp.client import Closed, TwistedDelegate
from txamqp.connection import Body, Frame, Header, Heartbeat, Method
from txamqp.content import Content
from txamqp.message import Message
from txamqp.protocol import AMQClient
from txamqp.queue import Closed as QueueClosed

from ion.core.messaging.amqp._wire import (
    _BODY_FRAME,
    _CONTENT_HEADER,
    _FRAME,
    _FRAME_END_OCTET,
    _HEADER_FRAME,
    _HEARTBEAT_FRAME,
    _METHOD_FRAME,
    _METHOD_ID,
    _PROTOCOL_HEADER,
    FieldTableError,
    _content_frames,
    _decode_fields,
    _decode_properties,
    _encode_properties,
    _field_names,
    _field_types,
    _frame,
    _method_frame,
    _ProtocolError,
)
from ion.core.messaging.transport import ConnectionLost, NotFound, QueueInUse, TransportError

log = Logger()


class _IncomingContent:
    """A content-carrying method (basic.deliver, basic.return) waiting for its header and body
    frames. `error` says why its properties could not be decoded: the body frames of such a
    delivery are counted and dropped."""

    __slots__ = ("method", "args", "properties", "size", "chunks", "received", "error")

    def __init__(self, method, args):
        self.method = method
        self.args = args
        self.properties = None
        self.size = 0
        self.chunks = []
        self.received = 0
        self.error = None


class _Client(AMQClient):
    """txamqp's protocol with our frame codec, the 0-9-1 protocol header, and hooks that tell
    the session about connection and channel events. txamqp still makes the synchronous calls
    (declarations, channel open and close, the handshake); frames in both directions go through
    the codec above."""

    def __init__(self, session, spec, vhost, heartbeat, clock):
        self.session = session
        super().__init__(_Delegate(session), vhost, spec, heartbeat=heartbeat, clock=clock)
        self._methods = {
            klass.id << 16 | method.id: method for klass in spec.classes for method in klass.methods
        }
        self._classes = {klass.id: klass for klass in spec.classes}
        basic = spec.classes.byname["basic"]
        self._basic = basic
        self._basic_publish = basic.methods.byname["publish"]
        self._basic_ack = basic.methods.byname["ack"]
        self._basic_nack = basic.methods.byname["nack"]
        self._basic_deliver = basic.methods.byname["deliver"]
        self._unread = b""
        self._incoming = {}  # channel number -> _IncomingContent
        self._last_read = clock.seconds()

    def send_init_string(self):
        self.transport.write(_PROTOCOL_HEADER)

    # Writing. txamqp writes the frames of its calls as soon as they are queued, so frames
    # written directly here keep their order with those.

    def _pack_frame(self, frame):
        payload = frame.payload
        if isinstance(payload, Method):
            return _method_frame(frame.channel, payload.method, payload.args)
        if isinstance(payload, Header):
            data = _CONTENT_HEADER.pack(payload.klass.id, payload.weight, payload.size)
            data += _encode_properties(payload.klass, payload.properties)
            return _frame(_HEADER_FRAME, frame.channel, data)
        if isinstance(payload, Body):
            return _frame(_BODY_FRAME, frame.channel, bytes(payload.content))
        if isinstance(payload, Heartbeat):
            return _frame(_HEARTBEAT_FRAME, frame.channel, b"")
        raise TypeError(f"cannot encode an AMQP frame of {payload!r}")

    def send_frame(self, frame):
        # Without txamqp's heartbeat reset: ours are sent every interval regardless of traffic.
        self.transport.write(self._pack_frame(frame))

    def writer(self, frame):
        try:
            self.send_frame(frame)
        except Exception:
            # A frame that cannot be encoded would leave the stream inconsistent (a method
            # without its content); drop the connection and let it be remade.
            log.failure("cannot encode an AMQP frame; dropping the connection")
            if self.transport is not None:
                self.transport.abortConnection()
        self.outgoing.get().addCallback(self.writer)

    def send_publish(self, channel, exchange, routing_key, mandatory, properties, body):
        """basic.publish with its content, in one write. Raises (before writing anything)
        when a field cannot be encoded."""
        data = _method_frame(
            channel, self._basic_publish, (0, exchange, routing_key, mandatory, False)
        ) + _content_frames(channel, self._basic, properties, body, self.MAX_LENGTH - 8)
        self.transport.write(data)

    def send_ack(self, channel, tag, multiple):
        self.transport.write(_method_frame(channel, self._basic_ack, (tag, multiple)))

    def send_nack(self, channel, tag, requeue):
        self.transport.write(_method_frame(channel, self._basic_nack, (tag, False, requeue)))

    # Reading.

    def dataReceived(self, data):
        self._last_read = self.clock.seconds()
        if self._unread:
            data = self._unread + data
        pos, size = 0, len(data)
        try:
            while size - pos > _FRAME.size:
                kind, channel, length = _FRAME.unpack_from(data, pos)
                if length > self.MAX_LENGTH:
                    raise _ProtocolError(f"a frame of {length} bytes exceeds frame_max")
                start = pos + _FRAME.size
                end = start + length
                if end >= size:
                    break
                if data[end] != _FRAME_END_OCTET:
                    raise _ProtocolError("a frame does not end with the frame-end octet")
                pos = end + 1
                self._frame_received(kind, channel, data, start, end)
                if self.transport.disconnecting:
                    break
        except Exception:
            log.failure("AMQP: cannot read what the broker sent; dropping the connection")
            self._unread = b""
            self.transport.abortConnection()
            return
        self._unread = data[pos:]

    def _frame_received(self, kind, channel, data, start, end):
        if kind == _METHOD_FRAME:
            (method_id,) = _METHOD_ID.unpack_from(data, start)
            method = self._methods.get(method_id)
            if method is None:
                raise _ProtocolError(f"unknown method {method_id >> 16}.{method_id & 0xFFFF}")
            args, pos = _decode_fields(_field_types(method), data, start + 4)
            if pos > end:
                raise _ProtocolError(f"truncated {method.klass.name}.{method.name}")
            if channel in self._incoming:
                raise _ProtocolError("a method arrived before the content it interrupts")
            if method.content:
                self._incoming[channel] = _IncomingContent(method, args)
            else:
                self._dispatch(channel, method, args, None)
        elif kind == _HEADER_FRAME:
            incoming = self._incoming.get(channel)
            if incoming is None or incoming.properties is not None:
                raise _ProtocolError("a content header without its method")
            class_id, _, incoming.size = _CONTENT_HEADER.unpack_from(data, start)
            klass = self._classes.get(class_id)
            if klass is None:
                raise _ProtocolError(f"a content header of unknown class {class_id}")
            # The properties were written by whoever published the message, not by the
            # broker: what we cannot read fails that message only. The frame's length, not
            # its properties, says where the next frame starts, so the stream stays in step.
            try:
                incoming.properties, pos = _decode_properties(
                    klass, data[start:end], _CONTENT_HEADER.size
                )
                if pos > end - start:
                    raise FieldTableError("the properties run past the end of the frame")
            except (FieldTableError, ValueError, IndexError, struct.error) as e:
                incoming.properties = {}
                incoming.error = str(e) if isinstance(e, FieldTableError) else f"malformed: {e}"
            if incoming.size == 0:
                self._content_received(channel, incoming)
        elif kind == _BODY_FRAME:
            incoming = self._incoming.get(channel)
            if incoming is None or incoming.properties is None:
                raise _ProtocolError("a content body without its header")
            if incoming.error is None or incoming.method is not self._basic_deliver:
                incoming.chunks.append(data[start:end])
            incoming.received += end - start
            if incoming.received > incoming.size:
                raise _ProtocolError("a content body longer than its header says")
            if incoming.received == incoming.size:
                self._content_received(channel, incoming)
        elif kind != _HEARTBEAT_FRAME:
            raise _ProtocolError(f"unknown frame type {kind}")

    def _content_received(self, channel, incoming):
        del self._incoming[channel]
        if incoming.error is not None:
            if incoming.method is self._basic_deliver:
                self._reject(channel, incoming)
                return
            # A basic.return of one of our publishes: its body, not its properties, matches
            # it to the publish, which must still learn that it was unroutable.
            log.warn(
                "AMQP: the properties of a {method} cannot be decoded ({error}); handled "
                "without them",
                method=f"{incoming.method.klass.name}.{incoming.method.name}",
                error=incoming.error,
            )
        chunks = incoming.chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        content = Content(body, [], incoming.properties)
        self._dispatch(channel, incoming.method, incoming.args, content)

    def _reject(self, number, incoming):
        channel = self.channels.get(number)
        if channel is not None:
            arguments = dict(zip(_field_names(incoming.method), incoming.args))
            self.session.reject(channel, arguments, incoming.error)

    def _dispatch(self, number, method, args, content):
        channel = self.channels.get(number)
        if channel is None:
            channel = self.channels[number] = self.channelFactory(number, self.outgoing, self)
        if method.response:
            # The reply to a call waiting in txamqp's AMQChannel.invoke, which reads frames.
            channel.responses.put(Frame(number, Method(method, *args)))
            if content is not None:
                size = len(content.body)
                header = Header(method.klass, 0, size, **content.properties)
                channel.responses.put(Frame(number, header))
                if size:
                    channel.responses.put(Frame(number, Body(content.body)))
            return
        message = Message(method, tuple(args), content)
        # Plain attributes: txamqp's Message looks each field up by name in the spec.
        message.__dict__.update(zip(_field_names(method), args))
        self.delegate.dispatch(channel, message)

    # Heartbeats: one sent every interval, and the connection dropped once nothing at all has
    # arrived for MAX_UNSEEN_HEARTBEAT intervals. txamqp restarts both timers on every frame.

    def reschedule_send_heartbeat(self):
        if self.heartbeatInterval > 0 and not self.sendHB.running:
            self.sendHB.start(self.heartbeatInterval, now=False)

    def reschedule_check_heartbeat(self):
        if self.checkHB.active():
            self.checkHB.cancel()
        self.checkHB = self.clock.callLater(
            self.heartbeatInterval * self.MAX_UNSEEN_HEARTBEAT, self.check_heartbeat
        )

    def check_heartbeat(self):
        limit = self.heartbeatInterval * self.MAX_UNSEEN_HEARTBEAT
        silent = self.clock.seconds() - self._last_read
        if silent < limit:
            self.checkHB = self.clock.callLater(limit - silent, self.check_heartbeat)
            return
        # The broker is unresponsive: no use closing cleanly or flushing what is pending.
        self.transport.abortConnection()

    # Connection and channel events.

    def connectionMade(self):
        # Small frames (acks, confirms, rpc requests) must not wait for the previous segment's
        # ACK (Nagle's algorithm); RabbitMQ sets the same on its side.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        super().connectionMade()

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.session.lost(reason)

    def do_close(self, reason):
        # txamqp's own iterates over self.channels while closing them, and closing a channel
        # fails its pending calls, whose handlers release channels: iterate over a copy.
        self.session.is_lost = True
        for channel in list(self.channels.values()):
            channel.close(reason)
        for queue in list(self.queues.values()):
            queue.close()
        self.delegate.close(reason)

    def channel_failed(self, channel, reason):
        self.session.channel_failed(channel, reason.value)


class _Delegate(TwistedDelegate):
    """Handles what the broker sends on its own: handshake, closes, confirms, returns,
    deliveries and consumer cancellations. Handlers must not raise: txamqp closes the whole
    connection when one does."""

    def __init__(self, session):
        super().__init__()
        self.session = session

    def dispatch(self, channel, message):
        try:
            return super().dispatch(channel, message)
        except Exception:
            log.failure(
                "AMQP: handling {method} from the broker failed",
                method=f"{message.method.klass.name}.{message.method.name}",
            )

    def connection_start(self, channel, message):
        mechanisms = message.mechanisms
        if isinstance(mechanisms, bytes):
            mechanisms = mechanisms.decode("ascii", "replace")
        if "PLAIN" not in mechanisms.split():
            log.error("AMQP: the broker offers no PLAIN authentication ({m})", m=mechanisms)
        channel.connection_start_ok(
            client_properties=self.session.client_properties(),
            mechanism="PLAIN",
            response=self.client.response,
            locale="en_US",
        )

    def connection_tune(self, channel, message):
        self.client.MAX_LENGTH = message.frame_max or 131072
        self.session.channel_max = message.channel_max or 2047
        channel.connection_tune_ok(
            channel_max=self.session.channel_max,
            frame_max=self.client.MAX_LENGTH,
            heartbeat=self.client.heartbeatInterval,
        )
        self.client.started.fire()

    def connection_close(self, channel, message):
        log.warn(
            "AMQP: the broker closed the connection: {code} {text}",
            code=message.reply_code,
            text=message.reply_text,
        )
        super().connection_close(channel, message)

    def connection_blocked(self, channel, message):
        log.warn("AMQP: the broker blocked publishing: {reason}", reason=message.reason)

    def connection_unblocked(self, channel, message):
        log.info("AMQP: the broker unblocked publishing")

    def basic_deliver(self, channel, message):
        self.session.deliver(channel, message)

    def basic_return_(self, channel, message):
        self.session.publisher.returned(channel, message)

    def basic_ack(self, channel, message):
        self.session.publisher.confirmed(channel, message.delivery_tag, message.multiple, None)

    def basic_nack(self, channel, message):
        error = TransportError("the broker could not take the message (basic.nack)")
        self.session.publisher.confirmed(channel, message.delivery_tag, message.multiple, error)

    def basic_cancel(self, channel, message):
        self.session.cancelled_by_broker(message.consumer_tag)


# Errors.


def _transport_error(exc):
    """Map what txamqp raises to our exceptions (others pass through unchanged)."""
    if isinstance(exc, TransportError):
        return exc
    if isinstance(exc, Closed):
        reason = exc.args[0] if exc.args else None
        if isinstance(reason, Message) and reason.method.name == "close":
            code, text = reason.reply_code, reason.reply_text
            if reason.method.klass.name == "channel":
                return {404: NotFound, 405: QueueInUse}.get(code, TransportError)(text)
            if code in (402, 403, 530):
                return TransportError(f"the broker refused the connection: {text}")
            return ConnectionLost(f"the broker closed the connection: {code} {text}")
        if isinstance(reason, Failure):
            reason = reason.value
        return ConnectionLost(f"connection lost ({reason or 'closed'})")
    if isinstance(exc, QueueClosed):
        return ConnectionLost("connection lost")
    return exc


async def _call(deferred):
    """Await a txamqp call, raising our exceptions instead of txamqp's."""
    try:
        return await deferred
    except (Closed, QueueClosed) as e:
        raise _transport_error(e) from None


def _spawn(coroutine, what):
    d = defer.Deferred.fromCoroutine(coroutine)
    d.addErrback(lambda f: log.failure("AMQP: {what} failed", f, what=what))
    return d


def _as_deferred(method):
    """Make an `async def` method return a Deferred, as ITransport callers expect."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        return defer.Deferred.fromCoroutine(method(*args, **kwargs))

    return wrapper
