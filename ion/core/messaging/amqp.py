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
  and host name; with a client certificate the login is EXTERNAL (the broker takes the user
  from the certificate), else PLAIN with the URL's user and password.

While the connection is down, operations fail at once with `ConnectionLost`; `whenConnected()`
tells when it is back. Queues with server-generated names cannot be declared again under the
same name, so they and their consumers do not survive a reconnect.

This is the only module that imports txamqp, and uses it for the synchronous calls (handshake,
declarations, channels). Frames are encoded and decoded here (see `_Client`): txamqp's field
tables know only strings and unsigned 32-bit integers, and its Deferred queue, lock and timer
reset per frame cost more than the broker's own work per message. So a publish is one write,
deliveries, confirms and returns reach their handlers as soon as their last frame is read, and
the acks of a reactor turn go together (`_Acks`).
"""

import collections
import decimal
import functools
import io
import os
import platform
import struct
import urllib.parse
import uuid

import attr
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer, task
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from txamqp import spec as txamqp_spec
from txamqp.client import Closed, TwistedDelegate
from txamqp.connection import Body, Frame, Header, Heartbeat, Method
from txamqp.content import Content
from txamqp.message import Message
from txamqp.protocol import AMQClient
from txamqp.queue import Closed as QueueClosed
from zope.interface import implementer

import ion
from ion.core.log import redact
from ion.core.messaging.tls import ClientTls, describe_failure
from ion.core.messaging.transport import (
    HEADER_DEPTH,
    HEADER_VALUES,
    ConnectionLost,
    IConsumer,
    IDelivery,
    ITransport,
    NotFound,
    Properties,
    QueueInUse,
    TransportError,
    Unroutable,
)

log = Logger()

SPEC_FILE = os.path.join(os.path.dirname(__file__), "amqp0-9-1.xml")
EXCHANGE_TYPES = ("topic", "direct", "fanout")
DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671}
TABLE_DEPTH = HEADER_DEPTH  # levels of nested tables and arrays, the top table included
TABLE_ENTRIES = HEADER_VALUES  # values in a field table, nested ones included
CLOSE_TIMEOUT = 5.0

CLIENT_CAPABILITIES = {
    "publisher_confirms": True,
    "consumer_cancel_notify": True,
    "basic.nack": True,
    "exchange_exchange_bindings": True,
    "connection.blocked": True,
    "authentication_failure_close": True,
    "per_consumer_qos": True,
}


@functools.cache
def load_spec():
    """The AMQP 0-9-1 spec with RabbitMQ's extensions, as txamqp objects (loaded once)."""
    return txamqp_spec.load(SPEC_FILE)


# URLs.


@attr.s(frozen=True, slots=True, repr=False)
class AmqpAddress:
    """Where and as whom to connect, from `amqp[s]://user:password@host:port/vhost`.

    Its str() and repr() show the password as `***`.
    """

    tls = attr.ib()
    host = attr.ib()
    port = attr.ib()
    user = attr.ib()
    password = attr.ib()
    vhost = attr.ib()

    @classmethod
    def parse(cls, url):
        """Read an AMQP URL (RabbitMQ's URI spec: user, password and vhost percent-encoded;
        no path or `/` means the vhost `/`). Missing user and password mean guest/guest.
        Raises ValueError, whose message never contains the password."""
        shown = redact(url)
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise ValueError(f"bad AMQP URL {shown!r}: {_url_problem(e)}") from None
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise ValueError(f"bad AMQP URL {shown!r}: the scheme must be amqp or amqps")
        if not parts.hostname:
            raise ValueError(f"bad AMQP URL {shown!r}: no host")
        if parts.query or parts.fragment:
            raise ValueError(f"bad AMQP URL {shown!r}: query parameters are not supported")
        path = parts.path
        if path in ("", "/"):
            vhost = "/"
        else:
            if "/" in path[1:]:
                raise ValueError(
                    f"bad AMQP URL {shown!r}: write a '/' inside the vhost name as %2F"
                )
            vhost = urllib.parse.unquote(path[1:])
        unquote = urllib.parse.unquote
        return cls(
            tls=scheme == "amqps",
            host=parts.hostname,
            port=port or DEFAULT_PORTS[scheme],
            user=unquote(parts.username) if parts.username is not None else "guest",
            password=unquote(parts.password) if parts.password is not None else "guest",
            vhost=vhost,
        )

    @property
    def scheme(self):
        return "amqps" if self.tls else "amqp"

    def __str__(self):
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = urllib.parse.quote(self.user, safe="")
        vhost = urllib.parse.quote(self.vhost, safe="")
        return f"{self.scheme}://{user}:***@{host}:{self.port}/{vhost}"

    def __repr__(self):
        return f"AmqpAddress({str(self)!r})"


def _url_problem(error):
    """What urllib found wrong with a URL, without the text it quotes: its port and netloc
    messages quote what it took for the port or host, which may be a piece of a password."""
    text = str(error)
    if text.startswith("Port out of range") or text == "Invalid IPv6 URL":
        return text
    return (
        "cannot read its host and port (a '/', '?', '#' or '@' in a user name or password "
        "must be written %2F, %3F, %23, %40)"
    )


# Field tables. Headers come from any user of the broker, so decoding is bounded: at most
# TABLE_DEPTH levels of nested tables and arrays (the decoder recurses once per level) and
# TABLE_ENTRIES values in all, whatever the frame size the broker negotiated.


class FieldTableError(ValueError):
    """A field table that is malformed or exceeds TABLE_DEPTH or TABLE_ENTRIES."""


class _EncodedTable(bytes):
    """A field table already encoded (length prefix included), checked before it is queued
    for the wire so that a bad header fails its publish, not the connection."""


def encode_table(table):
    """Encode a dict as an AMQP field table (with its 4-byte length). Raises ValueError or
    TypeError for what a table cannot hold, FieldTableError past the limits that receivers
    enforce (TABLE_DEPTH, TABLE_ENTRIES)."""
    return _encode_table(table, 1, [TABLE_ENTRIES])


def _encode_table(table, depth, budget):
    if depth > TABLE_DEPTH:
        raise FieldTableError(f"field table nested deeper than {TABLE_DEPTH} levels")
    out = io.BytesIO()
    for key, value in table.items():
        name = key.encode() if isinstance(key, str) else bytes(key)
        if len(name) > 255:
            raise ValueError(f"field table key {key!r} is longer than 255 bytes")
        out.write(bytes([len(name)]))
        out.write(name)
        _encode_value(out, value, depth, budget)
    data = out.getvalue()
    return struct.pack("!I", len(data)) + data


def _encode_value(out, value, depth, budget):
    budget[0] -= 1
    if budget[0] < 0:
        raise FieldTableError(f"field table holds more than {TABLE_ENTRIES} values")
    if value is None:
        out.write(b"V")
    elif isinstance(value, bool):
        out.write(b"t\x01" if value else b"t\x00")
    elif isinstance(value, int):
        if -(2**31) <= value < 2**31:
            out.write(b"I" + struct.pack("!i", value))
        elif -(2**63) <= value < 2**63:
            out.write(b"l" + struct.pack("!q", value))
        else:
            raise ValueError(f"integer {value} does not fit in 64 bits")
    elif isinstance(value, float):
        out.write(b"d" + struct.pack("!d", value))
    elif isinstance(value, str):
        data = value.encode()
        out.write(b"S" + struct.pack("!I", len(data)) + data)
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        out.write(b"x" + struct.pack("!I", len(data)) + data)
    elif isinstance(value, dict):
        out.write(b"F" + _encode_table(value, depth + 1, budget))
    elif isinstance(value, (list, tuple)):
        if depth >= TABLE_DEPTH:
            raise FieldTableError(f"field table nested deeper than {TABLE_DEPTH} levels")
        items = io.BytesIO()
        for item in value:
            _encode_value(items, item, depth + 1, budget)
        data = items.getvalue()
        out.write(b"A" + struct.pack("!I", len(data)) + data)
    elif isinstance(value, decimal.Decimal):
        sign, digits, exponent = value.as_tuple()
        if not isinstance(exponent, int) or not -255 <= exponent <= 0:
            raise ValueError(f"decimal {value} cannot be sent (scale 0..255 only)")
        out.write(b"D" + struct.pack("!Bi", -exponent, int(value.scaleb(-exponent))))
    else:
        raise TypeError(f"a field table cannot hold {type(value).__name__} values")


_SCALARS = {
    b"b": struct.Struct("!b"),
    b"B": struct.Struct("!B"),
    b"s": struct.Struct("!h"),
    b"u": struct.Struct("!H"),
    b"I": struct.Struct("!i"),
    b"i": struct.Struct("!I"),
    b"l": struct.Struct("!q"),
    b"L": struct.Struct("!Q"),
    b"f": struct.Struct("!f"),
    b"d": struct.Struct("!d"),
    b"T": struct.Struct("!Q"),
}
_LENGTH = struct.Struct("!I")


def decode_table(data):
    """Decode the entries of a field table (without its length prefix) into a dict. Raises
    FieldTableError when data is malformed or exceeds TABLE_DEPTH or TABLE_ENTRIES."""
    try:
        return _decode_table(data, 1, [TABLE_ENTRIES])
    except FieldTableError:
        raise
    except (ValueError, IndexError, struct.error) as e:
        raise FieldTableError(f"malformed field table: {e}") from None


def _decode_table(data, depth, budget):
    if depth > TABLE_DEPTH:
        raise FieldTableError(f"field table nested deeper than {TABLE_DEPTH} levels")
    table = {}
    pos = 0
    while pos < len(data):
        size = data[pos]
        key = _text(data[pos + 1 : pos + 1 + size])
        value, pos = _decode_value(data, pos + 1 + size, depth, budget)
        table[key] = value
    return table


def _decode_value(data, pos, depth, budget):
    budget[0] -= 1
    if budget[0] < 0:
        raise FieldTableError(f"field table holds more than {TABLE_ENTRIES} values")
    kind = data[pos : pos + 1]
    pos += 1
    scalar = _SCALARS.get(kind)
    if scalar is not None:
        return scalar.unpack_from(data, pos)[0], pos + scalar.size
    if kind == b"t":
        return data[pos] != 0, pos + 1
    if kind == b"V":
        return None, pos
    if kind == b"D":
        scale, value = struct.unpack_from("!Bi", data, pos)
        return decimal.Decimal(value).scaleb(-scale), pos + 5
    if kind in (b"S", b"x", b"A", b"F"):
        (size,) = _LENGTH.unpack_from(data, pos)
        pos += 4
        chunk = data[pos : pos + size]
        if len(chunk) != size:
            raise FieldTableError("field table value runs past its end")
        pos += size
        if kind == b"S":
            return _text(chunk), pos
        if kind == b"x":
            return bytes(chunk), pos
        if kind == b"F":
            return _decode_table(chunk, depth + 1, budget), pos
        if depth >= TABLE_DEPTH:
            raise FieldTableError(f"field table nested deeper than {TABLE_DEPTH} levels")
        items, at = [], 0
        while at < size:
            item, at = _decode_value(chunk, at, depth + 1, budget)
            items.append(item)
        return items, pos
    raise FieldTableError(f"unknown field type {kind!r} in a field table")


def _text(data):
    try:
        return bytes(data).decode()
    except UnicodeDecodeError:
        return bytes(data)


# Frames. txamqp's own path costs more than the broker's work per message: a Deferred queue hop
# and a locked channel lookup per frame, a stream codec call per field, a copy of the whole
# receive buffer per frame, and heartbeat timers restarted on every frame sent and received.
# Frames are therefore encoded and decoded here, and what the broker sends is handed to the
# delegate (or to the call waiting for it) as soon as it is complete.

_FRAME = struct.Struct("!BHI")
_FRAME_END = b"\xce"
_FRAME_END_OCTET = 0xCE
_METHOD_FRAME, _HEADER_FRAME, _BODY_FRAME, _HEARTBEAT_FRAME = 1, 2, 3, 8
_PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
_METHOD_ID = struct.Struct("!I")  # class id and method id
_CONTENT_HEADER = struct.Struct("!HHQ")  # class id, weight, body size
_FLAGS = struct.Struct("!H")
_NUMBERS = {
    "octet": struct.Struct("!B"),
    "short": struct.Struct("!H"),
    "long": struct.Struct("!I"),
    "longlong": struct.Struct("!Q"),
    "timestamp": struct.Struct("!Q"),
}


class _ProtocolError(Exception):
    """The broker sent bytes that are not AMQP 0-9-1 as we know it."""


@functools.cache
def _field_types(method_or_class):
    return tuple(field.type for field in method_or_class.fields)


@functools.cache
def _field_names(method):
    return tuple(txamqp_spec.pythonize(field.name) for field in method.fields)


def _encode_field(kind, value):
    number = _NUMBERS.get(kind)
    if number is not None:
        return number.pack(value)
    if kind == "shortstr":
        data = value.encode() if isinstance(value, str) else bytes(value)
        if len(data) > 255:
            raise ValueError(f"short string longer than 255 bytes: {data[:40]!r}...")
        return bytes((len(data),)) + data
    if kind == "longstr":
        if isinstance(value, dict):
            return encode_table(value)
        data = value.encode() if isinstance(value, str) else bytes(value)
        return _LENGTH.pack(len(data)) + data
    if kind == "table":
        return value if isinstance(value, _EncodedTable) else encode_table(value)
    raise TypeError(f"cannot encode AMQP fields of type {kind!r}")


def _encode_fields(kinds, values):
    """Method arguments as bytes; consecutive bits share octets, first bit lowest."""
    out = []
    bits = count = 0
    for kind, value in zip(kinds, values):
        if kind == "bit":
            if value:
                bits |= 1 << count
            count += 1
            if count == 8:
                out.append(bytes((bits,)))
                bits = count = 0
            continue
        if count:
            out.append(bytes((bits,)))
            bits = count = 0
        out.append(_encode_field(kind, value))
    if count:
        out.append(bytes((bits,)))
    return b"".join(out)


def _decode_field(kind, data, pos):
    number = _NUMBERS.get(kind)
    if number is not None:
        return number.unpack_from(data, pos)[0], pos + number.size
    if kind == "shortstr":
        end = pos + 1 + data[pos]
        return _text(data[pos + 1 : end]), end
    if kind in ("longstr", "table"):
        start = pos + 4
        end = start + _LENGTH.unpack_from(data, pos)[0]
        if kind == "table":
            return decode_table(data[start:end]), end
        return _text(data[start:end]), end
    raise _ProtocolError(f"cannot decode AMQP fields of type {kind!r}")


def _decode_fields(kinds, data, pos):
    """Method arguments from data[pos:]: (values, position after them)."""
    values = []
    bits, count = 0, 8
    for kind in kinds:
        if kind == "bit":
            if count == 8:
                bits, count = data[pos], 0
                pos += 1
            values.append(bool(bits >> count & 1))
            count += 1
            continue
        count = 8
        value, pos = _decode_field(kind, data, pos)
        values.append(value)
    return values, pos


@functools.cache
def _property_layout(klass):
    """name -> (position, type) of a class's content properties."""
    return {field.name: (i, field.type) for i, field in enumerate(klass.fields.items)}


def _encode_properties(klass, properties):
    """Content properties (a dict keyed by spec name, None meaning absent) as bytes: property
    flags, 15 per 16-bit word with the first property in the high bit and the low bit set when
    another word follows, then the values present in spec order."""
    layout = _property_layout(klass)
    present = []
    for name, value in properties.items():
        if value is not None:
            position, kind = layout[name]
            present.append((position, kind, value))
    present.sort()
    words = [0] * (len(layout) // 15 + 1)
    for position, _, _ in present:
        words[position // 15] |= 1 << (15 - position % 15)
    while len(words) > 1 and not words[-1]:
        words.pop()
    for i in range(len(words) - 1):
        words[i] |= 1
    flags = b"".join([_FLAGS.pack(word) for word in words])
    return flags + b"".join([_encode_field(kind, value) for _, kind, value in present])


def _decode_properties(klass, data, pos):
    """Content properties from data[pos:]: (dict keyed by spec name, position after them)."""
    words = []
    while True:
        (word,) = _FLAGS.unpack_from(data, pos)
        pos += 2
        words.append(word & 0xFFFE)
        if not word & 1:
            break
    fields = klass.fields.items
    properties = {}
    for i, word in enumerate(words):
        while word:
            top = word.bit_length() - 1
            field = fields[i * 15 + 15 - top]
            properties[field.name], pos = _decode_field(field.type, data, pos)
            word ^= 1 << top
    return properties, pos


def _frame(kind, channel, payload):
    return b"".join((_FRAME.pack(kind, channel, len(payload)), payload, _FRAME_END))


def _method_frame(channel, method, args):
    payload = _METHOD_ID.pack(method.klass.id << 16 | method.id) + _encode_fields(
        _field_types(method), args
    )
    return _frame(_METHOD_FRAME, channel, payload)


def _content_frames(channel, klass, properties, body, max_body):
    """The header frame and the body frames of one message, as one bytes object."""
    header = _CONTENT_HEADER.pack(klass.id, 0, len(body)) + _encode_properties(klass, properties)
    parts = [_FRAME.pack(_HEADER_FRAME, channel, len(header)), header, _FRAME_END]
    for start in range(0, len(body), max_body):
        chunk = body if len(body) <= max_body else body[start : start + max_body]
        parts += (_FRAME.pack(_BODY_FRAME, channel, len(chunk)), chunk, _FRAME_END)
    return b"".join(parts)


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
        self.session.connected()

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
        mechanism = self.client.mechanism
        if mechanism not in mechanisms.split():
            hint = ""
            if mechanism == "EXTERNAL":
                hint = (
                    "; a client certificate logs in with EXTERNAL, which RabbitMQ offers with "
                    "the rabbitmq_auth_mechanism_ssl plugin and EXTERNAL in auth_mechanisms"
                )
            self.client.started.fail(
                TransportError(
                    f"the broker does not offer {mechanism} authentication (it offers "
                    f"{mechanisms or 'none'}){hint}"
                )
            )
            return
        channel.connection_start_ok(
            client_properties=self.session.client_properties(),
            mechanism=mechanism,
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
        tls_problem = describe_failure(reason)
        if tls_problem is not None:
            return ConnectionLost(tls_problem)
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


def _shortstr(value, what):
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}")
    if len(value.encode()) > 255:
        raise ValueError(f"{what} is longer than 255 bytes: {value[:40]!r}...")
    return value


# One connection.


class _Session:
    """One live AMQP connection: handshake, a control channel for declarations, the publish
    channel, and one channel per consumer."""

    def __init__(self, transport, client_factory):
        self.transport = transport
        self.client = client_factory(self)
        self.channel_max = 2047
        self.control = None
        self.control_lock = defer.DeferredLock()
        self.publisher = _Publisher(self)
        self.consumers = {}  # consumer tag -> _Consumer
        self.acks = {}  # txamqp channel -> _Acks, for channels that received deliveries
        self.is_lost = False
        self.closing = False
        self._channels = {}  # number -> txamqp channel (None while being created)

    def client_properties(self):
        return {
            "product": "ION",
            "version": ion.__version__,
            "platform": f"Python {platform.python_version()} (Twisted, txamqp)",
            "capabilities": CLIENT_CAPABILITIES,
        }

    def connected(self):
        self.transport._session_started(self)

    async def open(self):
        """Authenticate, open the vhost and the publish channel."""
        if self.transport.external:
            # The broker takes the user from the client certificate it verified.
            mechanism, response = "EXTERNAL", b""
        else:
            address = self.transport.address
            mechanism = "PLAIN"
            response = b"\0" + address.user.encode() + b"\0" + address.password.encode()
        await _call(self.client.start(response, mechanism=mechanism, locale="en_US"))
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
        number = next((n for n in numbers if n not in self._channels), None)
        if number is None:
            raise TransportError(f"all {self.channel_max} AMQP channels are in use")
        self._channels[number] = None
        try:
            channel = await self.client.channel(number)
        except BaseException:
            del self._channels[number]
            raise
        self._channels[number] = channel
        try:
            await _call(channel.channel_open())
        except BaseException:
            self.release(channel)
            raise
        return channel

    def release(self, channel):
        """Forget a closed channel, so that its number can be used again. Releasing twice is
        harmless, also after the number went to a new channel."""
        if self._channels.get(channel.id) is channel:
            del self._channels[channel.id]
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
            try:
                await _call(channel.channel_close(reply_code=200, reply_text="closed by client"))
            except TransportError:
                pass
            channel.close(None)
        self.release(channel)

    def channel_failed(self, channel, reason):
        """The broker closed a channel (reason: its channel.close method)."""
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
            return await _call(getattr(self.control, method)(**arguments))

    def deliver(self, channel, message):
        if self._channels.get(channel.id) is not channel:
            return  # released: its consumer is gone and the broker has requeued the message
        acks = self.acks.get(channel)
        if acks is None:
            acks = self.acks[channel] = _Acks(self, channel)
        acks.received(message.delivery_tag)
        consumer = self.consumers.get(message.consumer_tag)
        if consumer is not None:
            consumer.deliver(channel, acks, message)

    def reject(self, channel, arguments, error):
        """Refuse a delivery whose properties cannot be decoded: nack without requeue (to the
        queue's dead-letter exchange, if it has one), log it once, keep the connection."""
        if self._channels.get(channel.id) is not channel:
            return  # released: the broker has requeued it, and will deliver it again
        acks = self.acks.get(channel)
        if acks is None:
            acks = self.acks[channel] = _Acks(self, channel)
        tag = arguments["delivery_tag"]
        acks.received(tag)
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
        channel0 = await self.client.channel(0)
        closing = channel0.connection_close(reply_code=200, reply_text="closed by client")
        closing.addTimeout(CLOSE_TIMEOUT, self.transport.reactor)
        try:
            await closing
        except Exception:
            pass
        self.client.transport.loseConnection()


@attr.s(slots=True)
class _Publish:
    exchange = attr.ib()
    routing_key = attr.ib()
    body = attr.ib()
    properties = attr.ib()
    mandatory = attr.ib()
    deferred = attr.ib(factory=defer.Deferred)


class _Publisher:
    """The publish channel in confirm mode: delivery tags count publishes from 1, and
    basic.ack/basic.nack (possibly `multiple`) settle them.

    basic.return carries no delivery tag. RabbitMQ sends it before the ack of the returned
    message and acks an unroutable message at once, so a return belongs to one of the
    publishes settled by the next ack; among those it is the first with the same exchange,
    routing key and body.

    Publishing to a missing exchange would close the channel and lose the confirms of every
    publish in flight, so an exchange not yet seen on this connection is first checked with a
    passive declare. Publishes wait in `backlog`, in order, while that check runs or while the
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
        await _call(channel.confirm_select())
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
                        self._discard(message)
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

    def _discard(self, message):
        if self.backlog and self.backlog[0] is message:
            self.backlog.popleft()
        elif self.backlog and message in self.backlog:
            self.backlog.remove(message)

    def returned(self, channel, message):
        if channel is self.channel:
            self.returns.append((message.exchange, message.routing_key, message.content.body))

    def confirmed(self, channel, tag, multiple, error):
        if channel is not self.channel:
            return
        if multiple:
            tags = []
            for t in self.unconfirmed:
                if t > tag:
                    break
                tags.append(t)
        else:
            tags = [tag] if tag in self.unconfirmed else []
        unroutable = self._match_returns(tags) if self.returns else ()
        settled = [(t, self.unconfirmed.pop(t)) for t in tags]
        for t, message in settled:
            if t in unroutable:
                message.deferred.errback(Unroutable(message.exchange, message.routing_key))
            elif error is not None:
                message.deferred.errback(error)
            else:
                message.deferred.callback(None)

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
        error = _transport_error(Closed(reason))
        text = getattr(reason, "reply_text", "")
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


# Consumers and deliveries.


class _Acks:
    """Sends the acks and nacks of one consumer channel.

    Acks wait for the end of the reactor turn. Then the run of settled messages at the head of
    the channel's unsettled ones goes as one basic.ack with `multiple`, and acks behind a
    message still being worked on go one by one, so that a slow message never holds back the
    prefetch window. A nack goes at once, after the acks before it. Every delivery on the
    channel is counted, also those no consumer takes, so that `multiple` never covers a message
    nobody settled."""

    def __init__(self, session, channel):
        self.session = session
        self.channel = channel
        self._unsettled = collections.deque()  # delivery tags received, oldest first
        self._acked = set()  # acked, not yet sent
        self._sent = set()  # acked or nacked on the wire, still in _unsettled
        self._flush = None

    def received(self, tag):
        self._unsettled.append(tag)

    def ack(self, tag):
        self._acked.add(tag)
        if self._flush is None:
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
        unsettled, sent = self._unsettled, self._sent
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
        if flush is not None and flush.active():
            flush.cancel()

    def _writable(self):
        return not self.session.is_lost and not self.channel.closed


@implementer(IDelivery)
class _Delivery:
    __slots__ = (
        "body",
        "exchange",
        "routing_key",
        "properties",
        "redelivered",
        "_acks",
        "_tag",
        "_settled",
    )

    def __init__(self, acks, message):
        content = message.content
        self.body = content.body
        self.exchange = message.exchange
        self.routing_key = message.routing_key
        self.properties = _properties_from_amqp(content.properties)
        self.redelivered = message.redelivered
        self._acks = acks
        self._tag = message.delivery_tag
        self._settled = False

    @property
    def settled(self):
        return self._settled

    def _settle(self, action):
        if self._settled:
            raise TransportError(
                f"cannot {action} message {self.routing_key!r}: it was already acked or nacked"
            )
        self._settled = True
        return not self._acks.channel.closed

    def ack(self):
        """Settle the message: it is gone from the queue. Acking or nacking twice raises
        TransportError. Once the consumer was cancelled or the connection lost the broker has
        put the message back in the queue, and a first ack or nack does nothing. The ack goes
        to the broker at the end of the reactor turn (before the consumer's channel closes)."""
        if self._settle("ack"):
            self._acks.ack(self._tag)

    def nack(self, requeue=True):
        """Refuse the message: with requeue it goes back to the head of its queue marked
        redelivered, otherwise it is dropped. Same double-settle rule as `ack`."""
        if self._settle("nack"):
            self._acks.nack(self._tag, requeue)


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
                await _call(channel.basic_qos(prefetch_count=self.prefetch))
            self._session, self.channel, self._tag = session, channel, tag
            session.consumers[tag] = self
            await _call(channel.basic_consume(queue=self.queue, consumer_tag=tag))
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

    def deliver(self, channel, acks, message):
        if not self.active or channel is not self.channel:
            return
        delivery = _Delivery(acks, message)
        try:
            result = self._callback(delivery)
        except Exception:
            self._failed(Failure(), delivery)
            return
        if isinstance(result, defer.Deferred) or hasattr(result, "__await__"):
            defer.ensureDeferred(result).addErrback(self._failed, delivery)

    def _failed(self, failure, delivery):
        if delivery.settled:
            log.failure(
                "consumer of queue {queue!r} failed after settling message {routing_key!r}",
                failure,
                queue=self.queue,
                routing_key=delivery.routing_key,
            )
            return
        log.failure(
            "consumer of queue {queue!r} failed on message {routing_key!r}; message dropped",
            failure,
            queue=self.queue,
            routing_key=delivery.routing_key,
        )
        delivery.nack(requeue=False)


def _amqp_properties(properties, user):
    """Our Properties as txamqp content properties, with user-id set to user."""
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


# The transport.


class _ClientFactory(Factory):
    noisy = False

    def __init__(self, transport):
        self.transport = transport

    def buildProtocol(self, addr):
        return _Session(self.transport, self.transport._make_client).client


_NEW, _OPEN, _CLOSED = "new", "open", "closed"


@implementer(ITransport)
class AmqpTransport:
    """One reconnecting connection to RabbitMQ at `url` (amqp:// or amqps://).

    `heartbeat` is the AMQP heartbeat in seconds (0 turns it off); `prefetch` is the default
    for `consume`. For amqps:// (see `ion.core.messaging.tls`): `tls_ca_file` is a PEM file
    with the CA certificates trusted for the broker (default: the system's); `tls_cert_file`
    and `tls_key_file` are a client certificate and its key (mode 0600), with which the
    connection logs in with EXTERNAL as the user the broker reads from the certificate: the
    URL's user when it names one (it must be that name: messages carry it as `user_id`),
    else the certificate's CN (RabbitMQ's `ssl_cert_login_from = common_name`). The files are
    read here: ValueError when they cannot be used, or are given for an amqp:// URL.
    `retry_policy(attempt) -> seconds` spaces reconnect attempts
    (default: exponential backoff from 0.5 s up to 30 s, plus up to 1 s of jitter).
    `connect_timeout` bounds the TCP connect and the AMQP handshake.

    Every method returns a Deferred, failed with a `TransportError` subclass on refusal.
    Operations before `connect()` fail with TransportError, while disconnected and after
    `close()` with ConnectionLost.

    Callback rule: an exception escaping a consumer callback (raised, or failing the Deferred
    or coroutine it returned) is logged and, if the callback had not acked or nacked the
    message, the message is nacked without requeue, i.e. dropped.
    """

    # RabbitMQ keeps the persistent messages of durable queues across its restarts.
    lost_messages = False

    def __init__(
        self,
        url,
        reactor,
        heartbeat=10,
        prefetch=100,
        tls_ca_file=None,
        tls_cert_file=None,
        tls_key_file=None,
        retry_policy=None,
        connect_timeout=30.0,
    ):
        self.address = AmqpAddress.parse(url)
        files = (tls_ca_file, tls_cert_file, tls_key_file)
        if not self.address.tls and any(f is not None for f in files):
            raise ValueError(
                f"{self.address}: a CA file, client certificate or key needs an amqps:// URL"
            )
        self._tls = ClientTls.load(*files) if self.address.tls else None
        self.external = self._tls is not None and self._tls.has_certificate
        if self.external and urllib.parse.urlsplit(url).username is None:
            if self._tls.user is None:
                raise ValueError(
                    f"the client certificate {tls_cert_file} has no CN: name the broker user "
                    "in the URL (amqps://user@host/)"
                )
            self.address = attr.evolve(self.address, user=self._tls.user)
        self.user = self.address.user
        self.reactor = reactor
        self.heartbeat = heartbeat
        self.prefetch = _check_prefetch(prefetch)
        self.connect_timeout = connect_timeout
        self._retry_policy = retry_policy or backoffPolicy(
            initialDelay=0.5, maxDelay=30.0, factor=1.6
        )
        self._state = _NEW
        self._service = None
        self._session = None
        # The session being set up once its consumers are re-attached: their handlers run at
        # once (redelivered messages first) and may publish, ack and declare on it.
        self._restoring = None
        self._failures = 0  # consecutive failed handshakes, added to the backoff attempt
        self._first = None  # what connect() returned
        self._stopping = None  # stopping the service after a failed first attempt
        self._connected_once = False
        self._waiters = []
        self._exchanges = {}  # name -> (type, durable, auto_delete)
        self._queues = {}  # name -> (durable, exclusive, auto_delete, server-named)
        self._bindings = {}  # (queue, exchange, routing key) -> None
        self._consumers = {}  # _Consumer -> None
        self._loss_listeners = []

    def __repr__(self):
        return f"<AmqpTransport {self.address} {self._state}>"

    # Connection.

    def _endpoint(self):
        address = self.address
        endpoint = HostnameEndpoint(
            self.reactor, address.host, address.port, timeout=self.connect_timeout
        )
        if not address.tls:
            return endpoint
        return wrapClientTLS(self._tls.creator(address.host), endpoint)

    def _make_client(self, session):
        return _Client(session, load_spec(), self.address.vhost, self.heartbeat, self.reactor)

    def connect(self):
        """Connect, authenticate and open the channels. Fires with this transport; fails
        (and gives up) if the first attempt fails. Later losses are repaired on their own."""
        if self._state is _CLOSED:
            return defer.fail(ConnectionLost(f"{self.address}: transport is closed"))
        if self._first is not None:
            return self.whenConnected()
        try:
            endpoint = self._endpoint()
        except (OSError, ValueError) as e:
            return defer.fail(TransportError(f"{self.address}: {e}"))
        self._state = _OPEN
        self._first = defer.Deferred()
        self._service = ClientService(
            endpoint,
            _ClientFactory(self),
            retryPolicy=lambda attempt: self._retry_policy(attempt + self._failures),
            clock=self.reactor,
        )
        self._service.startService()
        self._service.whenConnected(failAfterFailures=1).addErrback(self._first_attempt_failed)
        return self._first

    def _first_attempt_failed(self, failure):
        if failure.check(defer.CancelledError):
            return
        # Called from inside ClientService's state machine, which cannot be stopped from here.
        self._give_up(
            ConnectionLost(f"cannot connect to {self.address}: {failure.value}"),
            stop=lambda: task.deferLater(self.reactor, 0, self._service.stopService),
        )

    def _give_up(self, error, stop=None):
        """The first connection attempt failed: stop trying and report it."""
        self._state = _CLOSED
        self._stopping = (stop or self._service.stopService)()
        self._stopping.addErrback(lambda f: log.failure("AMQP: stopping failed", f))
        if not self._first.called:
            self._first.errback(error)
        self._fail_waiters(error)

    def whenConnected(self):
        """Fires with this transport once it is connected (at once if it is now)."""
        if self._state is _CLOSED:
            return defer.fail(ConnectionLost(f"{self.address}: transport is closed"))
        if self._session is not None and not self._session.is_lost:
            return defer.succeed(self)
        waiter = defer.Deferred()
        self._waiters.append(waiter)
        return waiter

    def _fail_waiters(self, error):
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(error)

    def _session_started(self, session):
        _spawn(self._set_up(session), "setting up an AMQP connection")

    async def _set_up(self, session):
        setup = defer.Deferred.fromCoroutine(self._handshake(session))
        setup.addTimeout(self.connect_timeout, self.reactor)
        try:
            await setup
        except Exception as e:
            # `_restoring` stays until the connection is gone (`_session_lost`), so that the
            # loss listeners learn of it: handlers may have sent requests on it.
            error = _transport_error(e)
            if isinstance(e, defer.TimeoutError):
                error = ConnectionLost(f"no AMQP handshake within {self.connect_timeout} s")
            if not session.is_lost:
                session.client.transport.abortConnection()
            if self._state is not _OPEN:
                return
            self._failures += 1
            if not self._connected_once:
                self._give_up(type(error)(f"cannot connect to {self.address}: {error}"))
            else:
                log.warn(
                    "AMQP: setting up the connection to {address} failed: {error}",
                    address=self.address,
                    error=error,
                )
            return
        self._restoring = None
        if self._state is not _OPEN:
            await session.close()
            return
        self._failures = 0
        self._session = session
        if self._connected_once:
            log.info("AMQP: reconnected to {address}", address=self.address)
        else:
            self._connected_once = True
            self._first.callback(self)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(self)

    async def _handshake(self, session):
        await session.open()
        await self._restore(session)

    async def _restore(self, session):
        """Declare again what this transport declared before, and re-attach consumers. A lock
        on an exclusive queue (the broker has not yet noticed the old connection died) or the
        loss of this connection fails the attempt, to be retried with everything; only what
        the broker refused on a live connection is dropped."""
        for name, (type, durable, auto_delete) in list(self._exchanges.items()):
            try:
                await self._declare_exchange_on(session, name, type, durable, auto_delete)
            except TransportError as e:
                self._forget("exchange", name, e, session)
                self._exchanges.pop(name, None)
        for name, (durable, exclusive, auto_delete, generated) in list(self._queues.items()):
            if generated:
                log.warn(
                    "AMQP: server-named queue {name!r} does not survive the reconnect", name=name
                )
                self._drop_queue(name)
                continue
            try:
                await self._declare_queue_on(session, name, durable, exclusive, auto_delete)
            except TransportError as e:
                self._forget("queue", name, e, session)
                self._drop_queue(name)
        for queue, exchange, key in list(self._bindings):
            try:
                await session.control_call(
                    "queue_bind", queue=queue, exchange=exchange, routing_key=key
                )
            except TransportError as e:
                self._forget("binding", f"{exchange}/{key} -> {queue}", e, session)
                self._bindings.pop((queue, exchange, key), None)
        # Everything a handler may use is declared again by now; from the first consumer on,
        # deliveries arrive and are handled while the others are attached.
        self._restoring = session
        for consumer in list(self._consumers):
            try:
                await consumer.attach(session)
            except TransportError as e:
                self._forget("consumer of", consumer.queue, e, session)
                consumer.active = False
                self._consumers.pop(consumer, None)

    def _forget(self, what, name, error, session):
        """Log that the broker refused to restore something, which the caller then drops.
        Raises error instead when it says nothing about the thing itself: the connection was
        lost (dropping then would lose one more consumer at every cut restore, until the
        transport is deaf) or an exclusive queue is still held by the previous connection."""
        if isinstance(error, (ConnectionLost, QueueInUse)) or session.is_lost:
            raise error
        log.error(
            "AMQP: after reconnecting, could not restore {what} {name!r}: {error}",
            what=what,
            name=name,
            error=error,
        )

    def _session_lost(self, session, reason):
        if session is self._restoring:
            # Lost while its consumers were being re-attached: handlers may have used it.
            self._restoring = None
        elif session is not self._session:
            return
        self._session = None
        if self._state is _OPEN and not session.closing:
            log.warn(
                "AMQP: connection to {address} lost ({reason}); reconnecting",
                address=self.address,
                reason=reason.getErrorMessage(),
            )
            error = ConnectionLost(f"connection to {self.address} lost: {reason.getErrorMessage()}")
            for listener in list(self._loss_listeners):
                try:
                    listener(error)
                except Exception:
                    log.failure("AMQP: a connection-loss listener failed")

    def on_connection_lost(self, listener):
        """listener(ConnectionLost) is called each time the connection is lost (not on close)."""
        self._loss_listeners.append(listener)

    def _live_session(self):
        if self._state is _NEW:
            raise TransportError("AMQP transport is not connected; call connect() first")
        if self._state is _CLOSED:
            raise ConnectionLost(f"{self.address}: transport is closed")
        session = self._session or self._restoring
        if session is None or session.is_lost:
            raise ConnectionLost(f"not connected to {self.address} (reconnecting)")
        return session

    @_as_deferred
    async def close(self):
        """Cancel this connection's consumers (the broker requeues their unacked messages),
        delete its exclusive queues and close the connection. Closing twice is harmless."""
        if self._state is _CLOSED:
            stopping, self._stopping = self._stopping, None
            if stopping is not None:
                await stopping
            return
        was_new = self._state is _NEW
        self._state = _CLOSED
        session, self._session = self._session, None
        consumers, self._consumers = list(self._consumers), {}
        for consumer in consumers:
            consumer.active = False
        if session is not None and not session.is_lost:
            session.closing = True
            await defer.gatherResults(
                [defer.Deferred.fromCoroutine(c._close_channel()) for c in consumers],
                consumeErrors=True,
            )
            for name, (_, exclusive, _, _) in list(self._queues.items()):
                if exclusive:
                    try:
                        await session.control_call("queue_delete", queue=name)
                    except TransportError:
                        pass
            await session.close()
        if not was_new:
            self._fail_waiters(ConnectionLost(f"{self.address}: transport is closed"))
            if not self._first.called:
                self._first.errback(ConnectionLost(f"{self.address}: closed while connecting"))
            await self._service.stopService()

    # Declarations.

    async def _declare_exchange_on(self, session, name, type, durable, auto_delete):
        await session.control_call(
            "exchange_declare",
            exchange=name,
            type=type,
            durable=durable,
            auto_delete=auto_delete,
        )
        session.publisher.known_exchanges.add(name)

    async def _declare_queue_on(self, session, name, durable, exclusive, auto_delete):
        result = await session.control_call(
            "queue_declare",
            queue=name,
            durable=durable,
            exclusive=exclusive,
            auto_delete=auto_delete,
        )
        return result.queue

    @_as_deferred
    async def declare_exchange(self, name, type="topic", durable=False, auto_delete=False):
        """Create the exchange if missing; fails with TransportError if it exists with other
        arguments."""
        session = self._live_session()
        _shortstr(name, "exchange name")
        if not name:
            raise TransportError("the default exchange '' cannot be declared")
        if type not in EXCHANGE_TYPES:
            raise TransportError(
                f"unknown exchange type {type!r} for {name!r}; "
                f"use one of {', '.join(EXCHANGE_TYPES)}"
            )
        await self._declare_exchange_on(session, name, type, durable, auto_delete)
        self._exchanges[name] = (type, durable, auto_delete)

    @_as_deferred
    async def delete_exchange(self, name, if_unused=False):
        """Delete the exchange and its bindings; missing is fine. With if_unused, fails with
        TransportError (the broker's 406 "in use") while a queue is bound to it."""
        session = self._live_session()
        if not _shortstr(name, "exchange name"):
            raise TransportError("the default exchange '' cannot be deleted")
        await session.control_call("exchange_delete", exchange=name, if_unused=if_unused)
        self._exchanges.pop(name, None)
        for binding in [b for b in self._bindings if b[1] == name]:
            del self._bindings[binding]

    @_as_deferred
    async def declare_queue(self, name="", durable=False, exclusive=False, auto_delete=False):
        """Create the queue if missing and fire with its name (generated when name is '')."""
        session = self._live_session()
        _shortstr(name, "queue name")
        declared = await self._declare_queue_on(session, name, durable, exclusive, auto_delete)
        self._queues[declared] = (durable, exclusive, auto_delete, not name)
        return declared

    @_as_deferred
    async def queue_depth(self, name):
        """Fire with the messages ready in the queue (a passive declare: nothing is created;
        NotFound when the queue does not exist)."""
        session = self._live_session()
        result = await session.control_call(
            "queue_declare", queue=_shortstr(name, "queue name"), passive=True
        )
        return result.message_count

    @_as_deferred
    async def delete_queue(self, name):
        """Delete the queue, its messages and bindings; its consumers stop. Missing is fine."""
        session = self._live_session()
        await session.control_call("queue_delete", queue=_shortstr(name, "queue name"))
        self._drop_queue(name)

    def _drop_queue(self, name):
        self._queues.pop(name, None)
        for binding in [b for b in self._bindings if b[0] == name]:
            del self._bindings[binding]
        for consumer in [c for c in self._consumers if c.queue == name]:
            consumer.active = False
            del self._consumers[consumer]
            _spawn(consumer._close_channel(), "closing the channel of a deleted queue's consumer")

    @_as_deferred
    async def bind(self, queue, exchange, routing_key):
        """Route messages matching routing_key on exchange into queue."""
        session = self._live_session()
        if not exchange:
            raise TransportError("queues cannot be bound to the default exchange ''")
        await session.control_call(
            "queue_bind",
            queue=_shortstr(queue, "queue name"),
            exchange=_shortstr(exchange, "exchange name"),
            routing_key=_shortstr(routing_key, "routing key"),
        )
        self._bindings[(queue, exchange, routing_key)] = None

    @_as_deferred
    async def unbind(self, queue, exchange, routing_key):
        """Remove a binding; removing a missing binding is fine."""
        session = self._live_session()
        if not exchange:
            raise TransportError("queues cannot be bound to the default exchange ''")
        await session.control_call(
            "queue_unbind",
            queue=_shortstr(queue, "queue name"),
            exchange=_shortstr(exchange, "exchange name"),
            routing_key=_shortstr(routing_key, "routing key"),
        )
        self._bindings.pop((queue, exchange, routing_key), None)

    # Messages.

    def publish(self, exchange, routing_key, body, properties=None, mandatory=True):
        """Publish body; fires with None once the broker confirmed it. Fails with Unroutable
        (mandatory and no queue matched), NotFound (no such exchange) or ConnectionLost (not
        confirmed before the connection went away: the message may or may not have arrived).
        `properties.user_id` is set to this connection's user."""
        try:
            session = self._live_session()
            if not isinstance(body, bytes):
                if not isinstance(body, (bytearray, memoryview)):
                    raise TypeError(f"body must be bytes, got {type(body).__name__}")
                body = bytes(body)
            message = _Publish(
                _shortstr(exchange, "exchange name"),
                _shortstr(routing_key, "routing key"),
                body,
                _amqp_properties(properties or Properties(), self.user),
                bool(mandatory),
            )
        except Exception:
            return defer.fail()
        return session.publisher.publish(message)

    @_as_deferred
    async def consume(self, queue, callback, prefetch=None):
        """Deliver messages of queue to callback(IDelivery), at most prefetch unacked at a time
        (0: no limit; default: the transport's). Fires with an IConsumer."""
        session = self._live_session()
        if not callable(callback):
            raise TypeError(f"consume needs a callable, got {callback!r}")
        prefetch = self.prefetch if prefetch is None else _check_prefetch(prefetch)
        consumer = _Consumer(self, _shortstr(queue, "queue name"), callback, prefetch)
        await consumer.attach(session)
        self._consumers[consumer] = None
        return consumer

    def _consumer_ended(self, consumer, queue_gone=False):
        """Forget a consumer; also forget its queue when it is gone or auto-deletes now."""
        self._consumers.pop(consumer, None)
        queue = consumer.queue
        flags = self._queues.get(queue)
        last = not any(c.queue == queue for c in self._consumers)
        if queue_gone or (flags is not None and flags[2] and last):
            self._drop_queue(queue)


def _check_prefetch(prefetch):
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or not 0 <= prefetch <= 65535:
        raise ValueError(f"prefetch must be an integer 0..65535 (0: no limit), got {prefetch!r}")
    return prefetch
