"""The protocol of one AMQP 0-9-1 connection: frames in and out (with C{_wire}), the handshake,
channels and their synchronous calls, and heartbeats. What the broker sends on its own
(deliveries, confirms, returns, closes, consumer cancellations) goes to the session."""

import collections
import functools
import platform
import struct

from twisted.internet import defer, task
from twisted.internet.abstract import FileDescriptor
from twisted.internet.protocol import Protocol
from twisted.logger import Logger, LogLevel

import ion
from ion.core.messaging.amqp._wire import (
    _ACK_ID,
    _BODY_FRAME,
    _CONTENT_HEADER,
    _DELIVER_ID,
    _FRAME,
    _FRAME_END_OCTET,
    _HEADER_FRAME,
    _HEARTBEAT_FRAME,
    _METHOD_FRAME,
    _METHOD_ID,
    _PROTOCOL_HEADER,
    FieldTableError,
    _content_parts,
    _decode_ack,
    _decode_deliver,
    _decode_fields,
    _decode_properties_kept,
    _frame,
    _method_frame,
    _ProtocolError,
    _publish_frame,
)
from ion.core.messaging.tls import describe_failure
from ion.core.messaging.transport import (
    ConnectionLost,
    NotFound,
    PreconditionFailed,
    QueueInUse,
    TransportError,
)

log = Logger()

FRAME_MIN_SIZE = 4096  # the largest frame either side may send before connection.tune
MAX_UNSEEN_HEARTBEATS = 3  # intervals without a byte from the broker before it is given up
PUBLISH_HEADS = 1024  # basic.publish method frames kept for reuse
# Deliveries taken in one read after which what they made us send (their acks) is written
# without waiting for the end of the read: the broker refills the prefetch window meanwhile.
EARLY_WRITE = 50
_DEFAULTS = {"bit": False, "shortstr": "", "longstr": b"", "table": {}}
# Who we are and what we can do, told to the broker in connection.start-ok.
CLIENT_PROPERTIES = {
    "product": "ION",
    "version": ion.__version__,
    "platform": f"Python {platform.python_version()} (Twisted)",
    "capabilities": {
        "publisher_confirms": True,
        "consumer_cancel_notify": True,
        "basic.nack": True,
        "exchange_exchange_bindings": True,
        "connection.blocked": True,
        "authentication_failure_close": True,
        "per_consumer_qos": True,
    },
}


@functools.cache
def _argument_layout(method):
    """name -> position of a method's arguments, and their defaults."""
    defaults = tuple(_DEFAULTS.get(kind, 0) for kind in method.types)
    return {name: i for i, name in enumerate(method.names)}, defaults


def _closed_error(klass, code, text):
    """The error for a channel.close or connection.close from the broker."""
    if klass == "channel":
        return {404: NotFound, 405: QueueInUse, 406: PreconditionFailed}.get(
            code, TransportError
        )(text)
    if code in (402, 403, 530):
        return TransportError(f"the broker refused the connection: {text}")
    return ConnectionLost(f"the broker closed the connection: {code} {text}")


class _IncomingContent:
    """A content-carrying method (basic.deliver, basic.return) waiting for its header and body
    frames. C{error} says why its properties could not be decoded: the body frames of such a
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


class _Message:
    """What the broker sent with a method: its arguments (as attributes named as in the
    spec's C{names}) and, for content, C{body} and C{properties}."""

    def __init__(self, names, args):
        self.__dict__.update(zip(names, args))


class _Channel:
    """One channel. Its synchronous calls get their replies in the order they were sent."""

    def __init__(self, protocol, number):
        self.protocol = protocol
        self.id = number
        self.closed = False
        self.error = None  # why it closed
        self._waiting = collections.deque()  # Deferreds of the calls sent, oldest first

    def call(self, name, **arguments):
        """Send a synchronous method ("queue_declare", ...) and fire with its reply, whose
        arguments are attributes. Fails with our TransportError subclasses."""
        if self.closed:
            return defer.fail(self.error or TransportError(f"channel {self.id} is closed"))
        try:
            self.protocol.send_method(self.id, self.protocol.method(name), arguments)
        except Exception:
            return defer.fail()
        waiting = defer.Deferred()
        self._waiting.append(waiting)
        return waiting

    def replied(self, reply):
        if not self._waiting:
            raise _ProtocolError(f"a reply on channel {self.id} that no call waits for")
        self._waiting.popleft().callback(reply)

    def close(self, error):
        """No more calls: those waiting fail with error."""
        self.closed = True
        self.error = error
        waiting, self._waiting = self._waiting, collections.deque()
        for call in waiting:
            call.errback(error)


class _Protocol(Protocol):
    """An AMQP 0-9-1 client connection. C{opened} fires once the vhost is open; C{channels}
    maps numbers to the open L{_Channel}s (0 is the connection's own)."""

    def __init__(self, session, spec, vhost, mechanism, response, heartbeat, clock):
        self.session = session
        self.vhost = vhost
        self.heartbeat = heartbeat
        self.clock = clock
        self.frame_max = FRAME_MIN_SIZE
        self.opened = defer.Deferred()
        self.channels = {0: _Channel(self, 0)}
        self._mechanism = mechanism
        self._response = response
        self._methods = {
            klass.id << 16 | method.id: method
            for klass in spec.classes.values()
            for method in klass.methods.values()
        }
        self._by_name = {
            f"{method.klass.name}_{method.name.replace('-', '_')}": method
            for method in self._methods.values()
        }
        self._classes = {klass.id: klass for klass in spec.classes.values()}
        self._basic = spec.classes["basic"]
        self._basic_publish = self.method("basic_publish")
        self._basic_ack = self.method("basic_ack")
        self._basic_nack = self.method("basic_nack")
        self._basic_deliver = self.method("basic_deliver")
        self._handlers = {
            self.method(name): handler
            for name, handler in (
                ("connection_start", self._start),
                ("connection_tune", self._tune),
                ("connection_close", self._connection_close),
                ("connection_blocked", self._blocked),
                ("connection_unblocked", self._unblocked),
                ("channel_close", self._channel_close),
                ("basic_return", session.publisher.returned),
                ("basic_nack", self._nacked),
                ("basic_cancel", self._cancelled),
            )
        }
        self._unread = b""
        self._publish_heads = {}  # (channel, exchange, routing key, mandatory) -> method frame
        self._batch = None  # frames to write at the end of dataReceived, or None
        self._after_read = []  # calls to make then, before they are written
        self._taken = 0  # deliveries taken in the read under way since its last write
        self._socket = False  # whether the transport writes to a socket itself (not TLS)
        self._incoming = {}  # channel number -> _IncomingContent
        self._last_read = clock.seconds()
        self._closed_by_broker = None  # the error of the broker's connection.close
        self._beat = None  # LoopingCall sending heartbeats
        self._check = None  # DelayedCall checking the broker's

    def method(self, name):
        """The spec's method called C{name} ("queue_declare", "basic_ack", ...)."""
        return self._by_name[name]

    def channel(self, number):
        """A new channel (not yet opened: call its "channel_open")."""
        channel = self.channels[number] = _Channel(self, number)
        return channel

    # Writing.

    def send_method(self, channel, method, arguments):
        """Write one method frame; raises (before writing anything) when an argument cannot be
        encoded."""
        positions, args = _argument_layout(method)
        args = list(args)
        for name, value in arguments.items():
            args[positions[name]] = value
        self._write(_method_frame(channel, method, args))

    def send_publish(self, channel, exchange, routing_key, mandatory, properties, body):
        """basic.publish with its content, in one write. Raises (before writing anything)
        when a field cannot be encoded."""
        # Most publishes go to a few routing keys: their method frames are made once.
        key = (channel, exchange, routing_key, mandatory)
        head = self._publish_heads.get(key)
        if head is None:
            head = _publish_frame(channel, exchange, routing_key, mandatory)
            if len(self._publish_heads) >= PUBLISH_HEADS:
                self._publish_heads.clear()
            self._publish_heads[key] = head
        parts = _content_parts(
            channel, self._basic, properties, body, self.frame_max - 8, head
        )
        batch = self._batch
        if batch is None:
            self.transport.writeSequence(parts)
        else:
            batch += parts

    def send_ack(self, channel, tag, multiple):
        self._write(_method_frame(channel, self._basic_ack, (tag, multiple)))

    def send_nack(self, channel, tag, requeue):
        self._write(_method_frame(channel, self._basic_nack, (tag, False, requeue)))

    def _write(self, data):
        # While the broker's bytes are handled, what they make us send (publishes, replies,
        # acks) waits in _batch for one write at the end; other writes go at once.
        batch = self._batch
        if batch is None:
            self.transport.write(data)
        else:
            batch.append(data)

    def _write_batch(self, now=False):
        batch, self._batch = self._batch, None
        if batch:
            self.transport.writeSequence(batch)
            if now:
                self._send_now()

    def _send_now(self):
        """Hand what was written to the socket now rather than at the reactor's next turn:
        a reply or an ack is on its way a turn sooner, and the broker works on it while we
        go on. Only on a plain TCP transport (its doWrite, which a TLS transport has not),
        never once it is closing (its doWrite then finishes the close, which is the
        reactor's to do); a failed send is left to the reactor too, which sees it again at
        its next turn."""
        transport = self.transport
        if self._socket and transport.connected and not transport.disconnecting:
            transport.doWrite()

    def after_read(self, call):
        """Call C{call()} once the broker's bytes being handled now are, just before what
        they make us send is written, and return True; return False outside such a read."""
        if self._batch is None:
            return False
        self._after_read.append(call)
        return True

    def _write_early(self):
        """Write what the read under way made us send so far, acks first settled, and hand
        it to the socket now (a plain TCP transport only writes at the next reactor turn)."""
        self._taken = 0
        after, self._after_read = self._after_read, []
        for call in after:
            call()
        batch = self._batch
        if batch:
            self._batch = []
            self.transport.writeSequence(batch)
            self._send_now()

    # Reading.

    def dataReceived(self, data):
        self._last_read = self.clock.seconds()
        if self._unread:
            data = self._unread + data
        pos, size = 0, len(data)
        self._batch = []
        self._taken = 0
        try:
            while size - pos > _FRAME.size:
                kind, channel, length = _FRAME.unpack_from(data, pos)
                if length > self.frame_max:
                    raise _ProtocolError(f"a frame of {length} bytes exceeds frame_max")
                start = pos + _FRAME.size
                end = start + length
                if end >= size:
                    break
                if data[end] != _FRAME_END_OCTET:
                    raise _ProtocolError("a frame does not end with the frame-end octet")
                after = self._frame_received(kind, channel, data, start, end, size)
                pos = end + 1 if after is None else after
                if self.transport.disconnecting:
                    break
                if self._taken >= EARLY_WRITE:
                    self._write_early()
        except Exception:
            log.failure("AMQP: cannot read what the broker sent; dropping the connection")
            self._unread = b""
            self._batch = None
            self._after_read = []
            self.transport.abortConnection()
            return
        after, self._after_read = self._after_read, []
        for call in after:
            call()
        self._write_batch(now=True)
        self._unread = data[pos:]

    def _frame_received(self, kind, channel, data, start, end, size):
        """Handle the frame in data[start:end]. Returns None, or for a delivery taken whole
        with the frames after it (data ends at C{size}), where the next frame starts."""
        if kind == _METHOD_FRAME:
            (method_id,) = _METHOD_ID.unpack_from(data, start)
            method = self._methods.get(method_id)
            if method is None:
                raise _ProtocolError(f"unknown method {method_id >> 16}.{method_id & 0xFFFF}")
            # The methods that come with every message, decoded without the general loop.
            if method_id == _DELIVER_ID:
                args, pos = _decode_deliver(data, start + 4)
            elif method_id == _ACK_ID:
                args, pos = _decode_ack(data, start + 4)
            else:
                args, pos = _decode_fields(method.types, data, start + 4)
            if pos > end:
                raise _ProtocolError(f"truncated {method.klass.name}.{method.name}")
            if channel in self._incoming:
                raise _ProtocolError("a method arrived before the content it interrupts")
            if method_id == _ACK_ID:
                # A publisher confirm (of several publishes when `multiple`), straight to
                # the publisher.
                confirmed = self.channels.get(channel)
                if confirmed is not None:
                    self._confirm(confirmed, args[0], args[1], None)
            elif method_id == _DELIVER_ID:
                after = self._whole_delivery(channel, args, data, end + 1, size)
                if after is None:
                    self._incoming[channel] = _IncomingContent(method, args)
                return after
            elif method.content:
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
                incoming.properties, pos = _decode_properties_kept(
                    klass, data, start + _CONTENT_HEADER.size, end
                )
                if pos > end:
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

    def _whole_delivery(self, channel, args, data, pos, size):
        """Take the basic.deliver whose arguments were just read together with its content
        when its header and its only body frame follow in data (up to C{size}), with
        properties that decode; returns where the next frame starts. Returns None, having
        taken nothing, for anything else: L{_frame_received} reads that frame by frame."""
        if size - pos <= _FRAME.size + _CONTENT_HEADER.size:
            return None
        kind, number, length = _FRAME.unpack_from(data, pos)
        start = pos + _FRAME.size
        end = start + length
        if (
            kind != _HEADER_FRAME
            or number != channel
            or length > self.frame_max
            or end >= size
            or data[end] != _FRAME_END_OCTET
        ):
            return None
        class_id, _, body_size = _CONTENT_HEADER.unpack_from(data, start)
        if class_id != self._basic.id:
            return None
        try:
            properties, after = _decode_properties_kept(
                self._basic, data, start + _CONTENT_HEADER.size, end
            )
        except (FieldTableError, ValueError, IndexError, struct.error):
            return None
        if after > end:
            return None
        pos = end + 1
        if body_size == 0:
            body = b""
        else:
            if size - pos <= _FRAME.size:
                return None
            kind, number, length = _FRAME.unpack_from(data, pos)
            start = pos + _FRAME.size
            end = start + length
            if (
                kind != _BODY_FRAME
                or number != channel
                or length != body_size
                or length > self.frame_max
                or end >= size
                or data[end] != _FRAME_END_OCTET
            ):
                return None
            body = data[start:end]
            pos = end + 1
        delivered = self.channels.get(channel)
        self._taken += 1
        if delivered is not None:
            try:
                self.session.deliver(delivered, args, body, properties)
            except Exception:
                log.failure("AMQP: handling basic.deliver from the broker failed")
        return pos

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
        if incoming.method is self._basic_deliver:
            # The method of every message received, straight to the session.
            delivered = self.channels.get(channel)
            self._taken += 1
            if delivered is not None:
                try:
                    self.session.deliver(delivered, incoming.args, body, incoming.properties)
                except Exception:
                    log.failure("AMQP: handling basic.deliver from the broker failed")
            return
        self._dispatch(channel, incoming.method, incoming.args, (body, incoming.properties))

    def _reject(self, number, incoming):
        channel = self.channels.get(number)
        if channel is not None:
            arguments = dict(zip(incoming.method.names, incoming.args))
            self.session.reject(channel, arguments, incoming.error)

    def _dispatch(self, number, method, args, content):
        channel = self.channels.get(number)
        if channel is None:
            # Released: the session closed it, and what the broker still sent on it (it
            # requeues deliveries) has no one to go to.
            return
        message = _Message(method.names, args)
        if content is not None:
            message.body, message.properties = content
        if method.response:
            channel.replied(message)
            return
        handler = self._handlers.get(method)
        if handler is None:
            log.warn(
                "AMQP: ignored {method} from the broker",
                method=f"{method.klass.name}.{method.name}",
            )
            return
        # A handler that raises must not cut the connection for the others.
        try:
            handler(channel, message)
        except Exception:
            log.failure(
                "AMQP: handling {method} from the broker failed",
                method=f"{method.klass.name}.{method.name}",
            )

    # The handshake, and what the broker sends on its own.

    def _start(self, channel, message):
        mechanisms = message.mechanisms
        if isinstance(mechanisms, bytes):
            mechanisms = mechanisms.decode("ascii", "replace")
        mechanism = self._mechanism
        if mechanism not in mechanisms.split():
            hint = ""
            if mechanism == "EXTERNAL":
                hint = (
                    "; a client certificate logs in with EXTERNAL, which RabbitMQ offers with "
                    "the rabbitmq_auth_mechanism_ssl plugin and EXTERNAL in auth_mechanisms"
                )
            error = TransportError(
                f"the broker does not offer {mechanism} authentication (it offers "
                f"{mechanisms or 'none'}){hint}"
            )
            self._closed_by_broker = error
            self._fail(error)
            # Nothing to say to a broker we cannot log in to (a TLS close would wait for its
            # answer).
            self.transport.abortConnection()
            return
        self.send_method(
            0,
            self.method("connection_start_ok"),
            {
                "client_properties": CLIENT_PROPERTIES,
                "mechanism": mechanism,
                "response": self._response,
                "locale": "en_US",
            },
        )

    def _tune(self, channel, message):
        self.frame_max = message.frame_max or 131072
        self.session.channel_max = message.channel_max or 2047
        self.send_method(
            0,
            self.method("connection_tune_ok"),
            {
                "channel_max": self.session.channel_max,
                "frame_max": self.frame_max,
                "heartbeat": self.heartbeat,
            },
        )
        self._start_heartbeats()
        channel.call("connection_open", virtual_host=self.vhost).chainDeferred(self.opened)

    def _connection_close(self, channel, message):
        # Before the connection is open (a refused login, say) the error is the attempt's
        # outcome, which its caller reports: said here too, it would be printed twice.
        log.emit(
            LogLevel.warn if self.opened.called else LogLevel.debug,
            "AMQP: the broker closed the connection: {code} {text}",
            code=message.reply_code,
            text=message.reply_text,
        )
        self._closed_by_broker = _closed_error("connection", message.reply_code, message.reply_text)
        self.send_method(0, self.method("connection_close_ok"), {})
        self._fail(self._closed_by_broker)
        self.lose_connection()

    def _blocked(self, channel, message):
        log.warn("AMQP: the broker blocked publishing: {reason}", reason=message.reason)

    def _unblocked(self, channel, message):
        log.info("AMQP: the broker unblocked publishing")

    def _channel_close(self, channel, message):
        self.send_method(channel.id, self.method("channel_close_ok"), {})
        channel.close(_closed_error("channel", message.reply_code, message.reply_text))
        if self.channels.get(channel.id) is channel:
            del self.channels[channel.id]
        self.session.channel_failed(channel, message)

    def _confirm(self, channel, tag, multiple, error):
        # A publisher's Deferred callbacks that raise stay in their Deferreds; this guards
        # the connection against the rest.
        try:
            self.session.publisher.confirmed(channel, tag, multiple, error)
        except Exception:
            log.failure("AMQP: handling a publisher confirm from the broker failed")

    def _nacked(self, channel, message):
        error = TransportError("the broker could not take the message (basic.nack)")
        self.session.publisher.confirmed(channel, message.delivery_tag, message.multiple, error)

    def _cancelled(self, channel, message):
        self.session.cancelled_by_broker(message.consumer_tag)

    # Heartbeats: one sent every interval, and the connection dropped once nothing at all has
    # arrived for MAX_UNSEEN_HEARTBEATS intervals.

    def _start_heartbeats(self):
        if self.heartbeat <= 0:
            return
        self._beat = task.LoopingCall(self.transport.write, _frame(_HEARTBEAT_FRAME, 0, b""))
        self._beat.clock = self.clock
        self._beat.start(self.heartbeat, now=False)
        self._check = self.clock.callLater(
            self.heartbeat * MAX_UNSEEN_HEARTBEATS, self._check_heartbeat
        )

    def _check_heartbeat(self):
        limit = self.heartbeat * MAX_UNSEEN_HEARTBEATS
        silent = self.clock.seconds() - self._last_read
        if silent < limit:
            self._check = self.clock.callLater(limit - silent, self._check_heartbeat)
            return
        # The broker is unresponsive: no use closing cleanly or flushing what is pending.
        self.transport.abortConnection()

    # The connection.

    def connectionMade(self):
        # Small frames (acks, confirms, rpc requests) must not wait for the previous segment's
        # ACK (Nagle's algorithm); RabbitMQ sets the same on its side.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        self._socket = isinstance(self.transport, FileDescriptor)
        self.transport.write(_PROTOCOL_HEADER)

    def lose_connection(self):
        """Close the connection once what was written is sent."""
        self._write_batch()
        self.transport.loseConnection()

    def connectionLost(self, reason):
        self._batch = None
        self._after_read = []
        if self._beat is not None and self._beat.running:
            self._beat.stop()
        if self._check is not None and self._check.active():
            self._check.cancel()
        error = self._closed_by_broker
        if error is None:
            error = ConnectionLost(
                describe_failure(reason.value) or f"connection lost ({reason.getErrorMessage()})"
            )
        self._fail(error)
        self.session.lost(reason)

    def _fail(self, error):
        # State first: callers woken by a failed call may look at the session at once.
        self.session.is_lost = True
        for channel in list(self.channels.values()):
            channel.close(error)
        if not self.opened.called:
            self.opened.errback(error)


def _spawn(coroutine, what):
    d = defer.Deferred.fromCoroutine(coroutine)
    d.addErrback(lambda f: log.failure("AMQP: {what} failed", f, what=what))
    return d


def _as_deferred(method):
    """Make an C{async def} method return a Deferred, as ITransport callers expect."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        return defer.Deferred.fromCoroutine(method(*args, **kwargs))

    return wrapper
