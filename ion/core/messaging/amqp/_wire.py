"""The AMQP 0-9-1 wire format: the spec of its methods, field tables (bounded when decoding)
and the frame codec.

decimal and xml.etree are imported when first needed (a decimal in a table, the spec read at
the first connection): a container on memory:// never loads them."""

import functools
import io
import keyword
import os
import struct
import sys

from ion.core.messaging.transport import HEADER_DEPTH, HEADER_VALUES

SPEC_FILE = os.path.join(os.path.dirname(__file__), "amqp0-9-1.xml")
TABLE_DEPTH = HEADER_DEPTH  # levels of nested tables and arrays, the top table included
TABLE_ENTRIES = HEADER_VALUES  # values in a field table, nested ones included


class _Part:
    """A part of the spec, its attributes given by name."""

    def __init__(self, **attributes):
        self.__dict__.update(attributes)


@functools.cache
def load_spec():
    """The AMQP 0-9-1 spec with RabbitMQ's extensions, from SPEC_FILE (loaded once).

    C{classes} maps names to classes: C{name}, C{id}, C{fields} (the content properties) and
    C{methods}, which maps names to methods: C{klass}, C{name}, C{id}, C{fields}, C{content} (a
    message follows) and C{response} (it answers a call). A field has a C{name} as the spec
    writes it ("delivery-tag") and a primitive C{type} ("octet", "shortstr", "table", ...); a
    method's C{types} are those of its fields, its C{names} theirs as identifiers
    ("delivery_tag", "global_")."""
    from xml.etree import ElementTree

    root = ElementTree.parse(SPEC_FILE).getroot()
    domains = {domain.get("name"): domain.get("type") for domain in root.iter("domain")}

    def fields(element):
        return tuple(
            _Part(name=field.get("name"), type=domains[field.get("domain")])
            for field in element.findall("field")
        )

    classes = {}
    for element in root.iter("class"):
        name, id = element.get("name"), int(element.get("index"))
        klass = classes[name] = _Part(name=name, id=id, fields=fields(element), methods={})
        methods = element.findall("method")
        answers = {response.get("name") for m in methods for response in m.findall("response")}
        for method in methods:
            name = method.get("name")
            arguments = fields(method)
            klass.methods[name] = _Part(
                klass=klass,
                name=name,
                id=int(method.get("index")),
                fields=arguments,
                types=tuple(field.type for field in arguments),
                names=tuple(_python_name(field.name) for field in arguments),
                content=method.get("content") == "1",
                response=name in answers,
            )
    return _Part(classes=classes)


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
    elif _is_decimal(value):
        sign, digits, exponent = value.as_tuple()
        if not isinstance(exponent, int) or not -255 <= exponent <= 0:
            raise ValueError(f"decimal {value} cannot be sent (scale 0..255 only)")
        out.write(b"D" + struct.pack("!Bi", -exponent, int(value.scaleb(-exponent))))
    else:
        raise TypeError(f"a field table cannot hold {type(value).__name__} values")


def _is_decimal(value):
    decimal = sys.modules.get("decimal")  # not imported: nothing can be a Decimal
    return decimal is not None and isinstance(value, decimal.Decimal)


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
        import decimal

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


# Frames. Each is encoded in one piece and decoded in place from the receive buffer: at
# thousands of messages a second, a codec call per field or a copy of the buffer per frame
# costs more than the broker's own work per message.

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


def _python_name(name):
    """A spec name as an identifier: "delivery-tag" -> "delivery_tag", "global" -> "global_"."""
    name = name.replace("-", "_")
    return name + "_" if keyword.iskeyword(name) else name


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
    return {field.name: (i, field.type) for i, field in enumerate(klass.fields)}


def _encode_properties(klass, properties):
    """Content properties (a dict keyed by spec name, None meaning absent) as bytes: property
    flags, 15 per 16-bit word with the first property in the high bit and the low bit set when
    another word follows, then the values present in spec order."""
    layout = _property_layout(klass)
    present = sorted(
        (*layout[name], value) for name, value in properties.items() if value is not None
    )
    words = [0] * (len(layout) // 15 + 1)
    for position, _, _ in present:
        words[position // 15] |= 1 << (15 - position % 15)
    while len(words) > 1 and not words[-1]:
        words.pop()
    for i in range(len(words) - 1):
        words[i] |= 1
    flags = b"".join([_FLAGS.pack(word) for word in words])
    return flags + b"".join([_encode_field(kind, value) for _, kind, value in present])


# Most messages on a connection carry the same few properties (user-id, delivery-mode,
# content-type), so their encoded bytes are kept, keyed by the values, and their decoded form by
# the bytes. Only properties without headers, message-id or timestamp are kept (those differ per
# message), and at most _KEPT of each: a peer sending ever new values only refills the cache.
_KEPT = 256
_PER_MESSAGE = ("headers", "message-id", "timestamp")
_encoded_kept = {}
_decoded_kept = {}


def _encode_properties_kept(klass, properties):
    """L{_encode_properties}, from the cache when the same values were encoded before."""
    if any(name in properties for name in _PER_MESSAGE):
        return _encode_properties(klass, properties)
    key = (klass.id, *properties.items())
    encoded = _encoded_kept.get(key)
    if encoded is None:
        encoded = _encode_properties(klass, properties)
        if len(_encoded_kept) >= _KEPT:
            _encoded_kept.clear()
        _encoded_kept[key] = encoded
    return encoded


def _decode_properties_kept(klass, data, pos, end):
    """The content properties in data[pos:end] (as L{_decode_properties}, which raises the
    same errors) as a new dict each time, decoded once per distinct bytes."""
    raw = data[pos:end]
    key = (klass.id, raw)
    kept = _decoded_kept.get(key)
    if kept is not None:
        return dict(kept), end
    properties, after = _decode_properties(klass, raw, 0)
    if after == len(raw) and not any(name in properties for name in _PER_MESSAGE):
        if len(_decoded_kept) >= _KEPT:
            _decoded_kept.clear()
        _decoded_kept[key] = dict(properties)
    return properties, pos + after


def _decode_properties(klass, data, pos):
    """Content properties from data[pos:]: (dict keyed by spec name, position after them)."""
    words = []
    while True:
        (word,) = _FLAGS.unpack_from(data, pos)
        pos += 2
        words.append(word & 0xFFFE)
        if not word & 1:
            break
    fields = klass.fields
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
        method.types, args
    )
    return _frame(_METHOD_FRAME, channel, payload)


_PUBLISH_HEAD = struct.pack("!IH", 60 << 16 | 40, 0)  # basic.publish, ticket 0
_DELIVER_ID = 60 << 16 | 60  # basic.deliver
_ACK_ID = 60 << 16 | 80  # basic.ack
_TAG_AND_BITS = struct.Struct("!QB")


def _publish_frame(channel, exchange, routing_key, mandatory):
    """The method frame of basic.publish (immediate off), as L{_method_frame} makes it, in
    fewer steps: it is sent for every message."""
    name, key = exchange.encode(), routing_key.encode()
    if len(name) > 255 or len(key) > 255:
        raise ValueError(f"short string longer than 255 bytes: {max(name, key, key=len)[:40]!r}...")
    payload = b"".join(
        (
            _PUBLISH_HEAD, bytes((len(name),)), name, bytes((len(key),)), key,
            b"\x01" if mandatory else b"\x00",
        )
    )
    return b"".join((_FRAME.pack(_METHOD_FRAME, channel, len(payload)), payload, _FRAME_END))


def _decode_deliver(data, pos):
    """The arguments of basic.deliver (consumer-tag, delivery-tag, redelivered, exchange,
    routing-key) as L{_decode_fields} decodes them: (values, position after them)."""
    end = pos + 1 + data[pos]
    consumer_tag = data[pos + 1 : end]
    delivery_tag, bits = _TAG_AND_BITS.unpack_from(data, end)
    pos = end + 9
    end = pos + 1 + data[pos]
    exchange = data[pos + 1 : end]
    pos = end
    end = pos + 1 + data[pos]
    routing_key = data[pos + 1 : end]
    try:
        # The three names at once (every message has them); one that is not UTF-8 stays
        # bytes, as _text leaves it.
        consumer_tag, exchange, routing_key = (
            consumer_tag.decode(), exchange.decode(), routing_key.decode()
        )
    except (UnicodeDecodeError, AttributeError):
        consumer_tag, exchange, routing_key = (
            _text(consumer_tag), _text(exchange), _text(routing_key)
        )
    return [consumer_tag, delivery_tag, bool(bits & 1), exchange, routing_key], end


def _decode_ack(data, pos):
    """The arguments of basic.ack (delivery-tag, multiple): (values, position after them)."""
    delivery_tag, bits = _TAG_AND_BITS.unpack_from(data, pos)
    return [delivery_tag, bool(bits & 1)], pos + 9


# Bodies up to this size are copied into the frames around them; larger ones are written as
# they are, so that a message's body is copied once on its way out (into the socket buffer).
_JOIN_BODY_MAX = 1024


def _content_parts(channel, klass, properties, body, max_body, head=b""):
    """The header frame and the body frames of one message, after C{head}, as a list of
    bytes to write in order: a large body that fits one frame is not copied. C{properties} is
    a dict for L{_encode_properties}, or bytes it made."""
    if type(properties) is not bytes:
        properties = _encode_properties_kept(klass, properties)
    size = len(body)
    header = _CONTENT_HEADER.pack(klass.id, 0, size) + properties
    frames = [head, _FRAME.pack(_HEADER_FRAME, channel, len(header)), header, _FRAME_END]
    if not size:  # no body frame
        return [b"".join(frames)]
    if size <= max_body:
        frames.append(_FRAME.pack(_BODY_FRAME, channel, size))
        if size <= _JOIN_BODY_MAX:
            frames += (body, _FRAME_END)
            return [b"".join(frames)]
        return [b"".join(frames), body, _FRAME_END]
    parts = []
    for start in range(0, size, max_body):
        chunk = body[start : start + max_body]  # bytes: a transport takes no memoryview
        frames.append(_FRAME.pack(_BODY_FRAME, channel, len(chunk)))
        parts += (b"".join(frames), chunk)
        frames = [_FRAME_END]
    parts.append(_FRAME_END)
    return parts


def _content_frames(channel, klass, properties, body, max_body):
    """The header frame and the body frames of one message, as one bytes object (see
    L{_content_parts})."""
    return b"".join(_content_parts(channel, klass, properties, body, max_body))


def _shortstr(value, what):
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}")
    if len(value) <= 255 and value.isascii():
        return value
    if len(value.encode()) > 255:
        raise ValueError(f"{what} is longer than 255 bytes: {value[:40]!r}...")
    return value
