"""Tests for the amqp:// transport: URL parsing and field tables without a broker; the shared
transport semantics, confirms, returns, identity and reconnection on a private RabbitMQ node
(tests/broker.py), which these tests may kill, pause and restart."""

import decimal
import os
import socket
import struct
import types

from twisted.internet import defer, reactor, task, threads
from twisted.internet.abstract import FileDescriptor
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from ion.core.messaging.amqp import (
    AmqpAddress,
    TABLE_DEPTH,
    TABLE_ENTRIES,
    AmqpTransport,
    FieldTableError,
    decode_table,
    encode_table,
    load_spec,
)
from ion.core.messaging.amqp import _wire
from ion.core.messaging.amqp._consume import _Acks
from ion.core.messaging.amqp._protocol import EARLY_WRITE, _Protocol
from ion.core.messaging.transport import (
    ConnectionLost,
    NotFound,
    Properties,
    QueueInUse,
    TransportError,
    Unroutable,
)
from tests.broker import (
    get_broker,
    get_cert_broker,
    issue_certificate,
    new_key,
    skip_or_fail_without_rabbitmq,
    write_pem,
)
from tests.core.messaging.test_transport import Inbox, TransportSemantics

# url -> (tls, host, port, user, password, vhost)
URL_CASES = [
    ("amqp://guest:guest@localhost:5672/", (False, "localhost", 5672, "guest", "guest", "/")),
    ("amqp://localhost", (False, "localhost", 5672, "guest", "guest", "/")),
    ("amqps://u:p@broker.example", (True, "broker.example", 5671, "u", "p", "/")),
    ("amqps://u:p@broker.example:1234/prod", (True, "broker.example", 1234, "u", "p", "prod")),
    ("amqp://u:p@h/%2F", (False, "h", 5672, "u", "p", "/")),
    ("amqp://u:p@h/a%2Fb", (False, "h", 5672, "u", "p", "a/b")),
    ("amqp://us%40er:p%3Ass%2Fw%40rd@h/", (False, "h", 5672, "us@er", "p:ss/w@rd", "/")),
    ("amqp://u@h/", (False, "h", 5672, "u", "guest", "/")),
    ("AMQP://u:p@H:5/", (False, "h", 5, "u", "p", "/")),
    ("amqp://u:p@[::1]:5673/v", (False, "::1", 5673, "u", "p", "v")),
]

BAD_URLS = [
    "http://u:p@h/",
    "amqp://",
    "amqp://u:sekrit@h:notaport/",
    "amqp://u:sekrit@h/a/b",
    "amqp://u:sekrit@h/?heartbeat=5",
    "amqp://u:sekrit@h:99999/",
]


class AddressTests(unittest.SynchronousTestCase):
    def test_parse_table(self):
        """URLs follow RabbitMQ's URI spec: percent-encoded parts, default ports, vhost '/'
        when there is no path."""
        for url, expected in URL_CASES:
            a = AmqpAddress.parse(url)
            self.assertEqual((a.tls, a.host, a.port, a.user, a.password, a.vhost), expected, url)

    def test_bad_urls(self):
        """Bad URLs raise ValueError naming the problem, with the password hidden."""
        for url in BAD_URLS:
            error = self.assertRaises(ValueError, AmqpAddress.parse, url)
            self.assertNotIn("sekrit", str(error), url)
            self.assertIn("AMQP URL", str(error))

    def test_password_never_shown(self):
        """str() and repr() of addresses and transports show the password as ***."""
        url = "amqps://alice:s3cr%40t@broker.example:5671/prod"
        address = AmqpAddress.parse(url)
        self.assertEqual(address.password, "s3cr@t")
        self.assertEqual(str(address), "amqps://alice:***@broker.example:5671/prod")
        transport = AmqpTransport(url, reactor)
        for text in (str(address), repr(address), str(transport), repr(transport)):
            self.assertNotIn("s3cr", text)
            self.assertIn("alice", text)

    def test_transport_user(self):
        """The transport's user is the one it authenticates as."""
        self.assertEqual(AmqpTransport("amqp://bob:x@h/", reactor).user, "bob")


class FieldTableTests(unittest.SynchronousTestCase):
    def test_round_trip(self):
        """Every value type ION puts in headers survives encoding, including the ones txamqp's
        own codec cannot carry (booleans, negative and 64-bit integers, nesting, bytes)."""
        table = {
            "s": "text é",
            "i": -5,
            "big": 2**40,
            "t": True,
            "f": False,
            "d": 1.5,
            "none": None,
            "bin": b"\xff\x00",
            "list": [1, "two", [3], {"four": 4}],
            "nested": {"capabilities": {"basic.nack": True}},
            "dec": decimal.Decimal("1.25"),
        }
        encoded = encode_table(table)
        self.assertEqual(decode_table(encoded[4:]), table)

    def test_rabbitmq_types(self):
        """Types other clients and RabbitMQ send (x-death has arrays and timestamps) decode."""
        data = (
            b"\x01a" + b"b\xff"
            + b"\x01b" + b"s\xff\xfe"
            + b"\x01c" + b"T\x00\x00\x00\x00\x65\x00\x00\x00"
            + b"\x01e" + b"A\x00\x00\x00\x0bS\x00\x00\x00\x01xI\x00\x00\x00\x07"
            + b"\x01f" + b"f\x3f\xc0\x00\x00"
        )  # fmt: skip
        self.assertEqual(
            decode_table(data),
            {"a": -1, "b": -2, "c": 0x65000000, "e": ["x", 7], "f": 1.5},
        )

    def test_unencodable(self):
        """A value a table cannot hold raises TypeError before anything is sent."""
        self.assertRaises(TypeError, encode_table, {"x": object()})
        self.assertRaises(ValueError, encode_table, {"x": 2**70})


def nested_table(depth):
    """The entries of a field table holding `depth` levels of tables, the top one included."""
    entries = b""
    for _ in range(depth - 1):
        entries = b"\x01k" + b"F" + struct.pack("!I", len(entries)) + entries
    return entries


def _frame(kind, channel, payload):
    return struct.pack("!BHI", kind, channel, len(payload)) + payload + b"\xce"


def _method(channel, class_id, method_id, arguments=b""):
    return _frame(1, channel, struct.pack("!HH", class_id, method_id) + arguments)


def _short(data):
    return bytes([len(data)]) + data


def _expect(sock, method):
    """Read frames until a method frame; fail unless it is `method` (class id, method id)."""
    while True:
        header = b""
        while len(header) < 7:
            chunk = sock.recv(7 - len(header))
            if not chunk:
                raise AssertionError(f"the broker closed the connection, waiting for {method}")
            header += chunk
        kind, _, size = struct.unpack("!BHI", header)
        payload = b""
        while len(payload) < size + 1:
            chunk = sock.recv(size + 1 - len(payload))
            if not chunk:
                raise AssertionError(f"the broker closed the connection, waiting for {method}")
            payload += chunk
        if kind != 1:
            continue
        got = struct.unpack("!HH", payload[:4])
        if got != method:
            raise AssertionError(f"expected method {method}, got {got}: {payload[4:80]!r}")
        return payload[4:-1]


def _raw_channel(broker, user):
    """A socket with an AMQP connection as `user` (password = name) and channel 1 open, and
    the frame size the broker allows."""
    sock = socket.create_connection((broker.host, broker.port), timeout=10)
    sock.sendall(b"AMQP\x00\x00\x09\x01")
    _expect(sock, (10, 10))
    response = f"\0{user}\0{user}".encode()
    start_ok = b"\0\0\0\0" + _short(b"PLAIN") + struct.pack("!I", len(response)) + response
    sock.sendall(_method(0, 10, 11, start_ok + _short(b"en_US")))
    channel_max, frame_max, _ = struct.unpack("!HIH", _expect(sock, (10, 30)))
    sock.sendall(_method(0, 10, 31, struct.pack("!HIH", channel_max, frame_max, 0)))
    sock.sendall(_method(0, 10, 40, _short(b"/") + _short(b"") + b"\0"))
    _expect(sock, (10, 41))
    sock.sendall(_method(1, 20, 10, _short(b"")))
    _expect(sock, (20, 11))
    return sock, frame_max


def raw_declare_queue(broker, user, queue, dead_letter_exchange):
    """Declare a queue whose rejected messages go to dead_letter_exchange (our transport
    declares queues without arguments). Blocking: run it in a thread."""
    sock, _ = _raw_channel(broker, user)
    with sock:
        dlx = dead_letter_exchange.encode()
        table = _short(b"x-dead-letter-exchange") + b"S" + struct.pack("!I", len(dlx)) + dlx
        arguments = b"\0\0" + _short(queue.encode()) + b"\0" + struct.pack("!I", len(table))
        sock.sendall(_method(1, 50, 10, arguments + table))
        _expect(sock, (50, 11))


def raw_publish(broker, user, exchange, routing_key, header_entries, body):
    """Publish one message as `user` with a hand-made headers table (its entries as bytes), as
    any AMQP client of the broker can, and wait for the broker's confirm. Blocking: run it in
    a thread."""
    sock, frame_max = _raw_channel(broker, user)
    with sock:
        sock.sendall(_method(1, 85, 10, b"\0"))  # confirm.select
        _expect(sock, (85, 11))
        arguments = b"\0\0" + _short(exchange.encode()) + _short(routing_key.encode()) + b"\0"
        header = struct.pack("!HHQH", 60, 0, len(body), 0x2000)  # property flags: headers
        header += struct.pack("!I", len(header_entries)) + header_entries
        frames = [_method(1, 60, 40, arguments), _frame(2, 1, header)]
        step = frame_max - 8
        frames += [_frame(3, 1, body[i : i + step]) for i in range(0, len(body), step)]
        sock.sendall(b"".join(frames))
        _expect(sock, (60, 80))  # basic.ack: the broker has routed it


class FieldTableLimitTests(unittest.SynchronousTestCase):
    def test_deep_table(self):
        """A table nested 2,000 deep (any user of the broker can publish one in headers) is
        refused with FieldTableError, never RecursionError; TABLE_DEPTH levels decode."""
        self.assertEqual(TABLE_DEPTH, 16)
        table = decode_table(nested_table(TABLE_DEPTH))
        for _ in range(TABLE_DEPTH - 1):
            table = table["k"]
        self.assertEqual(table, {})
        for depth in (TABLE_DEPTH + 1, 2_000):
            error = self.assertRaises(FieldTableError, decode_table, nested_table(depth))
            self.assertIn("nested deeper than 16 levels", str(error))

    def test_deep_arrays(self):
        """Arrays count as levels, also arrays of arrays."""
        value = []
        for _ in range(TABLE_DEPTH - 2):
            value = [value]
        self.assertEqual(decode_table(encode_table({"a": value})[4:]), {"a": value})
        self.assertRaises(FieldTableError, encode_table, {"a": [value]})
        nested = b"A\x00\x00\x00\x00"
        for _ in range(3_000):
            nested = b"A" + struct.pack("!I", len(nested)) + nested
        self.assertRaises(FieldTableError, decode_table, b"\x01a" + nested)

    def test_too_many_values(self):
        """At most TABLE_ENTRIES values in all, nested ones included."""
        def array_of(count):
            return b"\x01a" + b"A" + struct.pack("!I", count) + b"V" * count

        # The array itself is one value.
        self.assertEqual(decode_table(array_of(TABLE_ENTRIES - 1)), {"a": [None] * 9_999})
        error = self.assertRaises(FieldTableError, decode_table, array_of(TABLE_ENTRIES))
        self.assertIn("more than 10000 values", str(error))
        self.assertRaises(FieldTableError, encode_table, {"a": [None] * TABLE_ENTRIES})

    def test_encoder_keeps_the_limits(self):
        """Our own publishes never carry what receivers refuse: a header nested deeper than
        TABLE_DEPTH fails to encode with FieldTableError (a ValueError), 2,000 deep too."""
        for depth in (TABLE_DEPTH + 1, 2_000):
            table = {}
            for _ in range(depth - 1):
                table = {"k": table}
            self.assertRaises(FieldTableError, encode_table, table)

    def test_malformed(self):
        """Truncated values and unknown types are FieldTableErrors too."""
        for data in (b"\x01aS\x00\x00\x00\x09abc", b"\x01a?", b"\x01aI\x00", b"\x05a"):
            self.assertRaises(FieldTableError, decode_table, data)


class SpecTests(unittest.SynchronousTestCase):
    def test_rabbitmq_extensions(self):
        """The spec file has what ION uses beyond plain 0-9-1, at RabbitMQ's indices."""
        spec = load_spec()
        self.assertEqual(spec.classes["confirm"].id, 85)
        basic = spec.classes["basic"]
        self.assertEqual(basic.methods["nack"].id, 120)
        self.assertEqual(spec.classes["exchange"].methods["unbind-ok"].id, 51)
        # Broker-initiated methods must reach their handlers, not a waiting caller.
        for name in ("ack", "nack", "cancel", "deliver", "return"):
            self.assertFalse(basic.methods[name].response, name)
        self.assertTrue(spec.classes["confirm"].methods["select-ok"].response)


class FrameFastPathTests(unittest.SynchronousTestCase):
    """The per-message frames take short cuts (basic.publish, basic.deliver, basic.ack, kept
    content properties); the bytes and values must be those of the general codec."""

    def setUp(self):
        self.spec = load_spec()
        self.basic = self.spec.classes["basic"]

    def test_publish_frame(self):
        """basic.publish is encoded byte for byte as the general method encoder does, also
        with non-ASCII names; a name over 255 bytes is a ValueError."""
        publish = self.basic.methods["publish"]
        for channel, exchange, key, mandatory in (
            (1, "ion.bench", "host_1.2", True),
            (7, "", "q_bench.consumer", False),
            (2047, "xr_é", "v03.données.#", True),
        ):
            self.assertEqual(
                _wire._publish_frame(channel, exchange, key, mandatory),
                _wire._method_frame(channel, publish, (0, exchange, key, mandatory, False)),
            )
        self.assertRaises(ValueError, _wire._publish_frame, 1, "x", "é" * 128, True)

    def test_deliver_and_ack_arguments(self):
        """basic.deliver and basic.ack decode to the values of the general decoder, a routing
        key that is not UTF-8 included (kept as bytes)."""
        for method, args in (
            ("deliver", ("ion.abc", 2**63 + 5, True, "xpublic", "v03.a.b")),
            ("deliver", ("", 1, False, "", b"v03.\xff")),
            ("ack", (12345, True)),
            ("ack", (1, False)),
        ):
            spec_method = self.basic.methods[method]
            kinds = spec_method.types
            payload = _wire._encode_fields(kinds, args)
            fast = {"deliver": _wire._decode_deliver, "ack": _wire._decode_ack}[method]
            self.assertEqual(fast(payload, 0), _wire._decode_fields(kinds, payload, 0))

    def test_kept_properties(self):
        """Content properties seen before encode to the same bytes and decode to equal, fresh
        dicts (a receiver changing one changes no other message); those with headers are
        decoded each time."""
        plain = {"user-id": "guest", "delivery-mode": 2, "content-type": "application/json"}
        with_headers = dict(plain, headers={"report_id": "abc"})
        for properties in (plain, with_headers, plain):
            encoded = _wire._encode_properties_kept(self.basic, properties)
            self.assertEqual(encoded, _wire._encode_properties(self.basic, properties))
            data = b"\0\0" + encoded + b"tail"
            first, end = _wire._decode_properties_kept(self.basic, data, 2, 2 + len(encoded))
            self.assertEqual(end, 2 + len(encoded))
            self.assertEqual(first, properties)
            first["user-id"] = "someone else"
            if "headers" in first:
                first["headers"]["report_id"] = "changed"
            second, _ = _wire._decode_properties_kept(self.basic, data, 2, 2 + len(encoded))
            self.assertEqual(second, properties)

    def test_kept_properties_truncated(self):
        """Properties cut short end past the frame (which the protocol refuses), as with the
        general decoder, also when the whole of them was decoded before; a cut in the flags
        raises."""
        plain = {"user-id": "guest", "delivery-mode": 1}
        encoded = _wire._encode_properties_kept(self.basic, plain)
        _wire._decode_properties_kept(self.basic, encoded, 0, len(encoded))
        cut = len(encoded) - 3
        for _ in range(2):
            _, end = _wire._decode_properties_kept(self.basic, encoded, 0, cut)
            self.assertGreater(end, cut)
            self.assertEqual(end, _wire._decode_properties(self.basic, encoded[:cut], 0)[1])
        with self.assertRaises(struct.error):
            _wire._decode_properties_kept(self.basic, encoded, 0, 1)


class _RecordingSession:
    """What a protocol hands its session of the deliveries it reads."""

    def __init__(self):
        self.seen = []
        self.publisher = types.SimpleNamespace(returned=None, confirmed=None)

    def deliver(self, channel, args, body, properties):
        consumer_tag, delivery_tag, redelivered, exchange, routing_key = args
        self.seen.append(
            (
                "delivered",
                channel.id,
                consumer_tag,
                delivery_tag,
                redelivered,
                exchange,
                routing_key,
                bytes(body),
                properties,
            )
        )

    def reject(self, channel, arguments, error):
        self.seen.append(("rejected", channel.id, arguments["delivery_tag"], error))


class DeliveryReadingTests(unittest.SynchronousTestCase):
    """A delivery is read the same whether its frames arrive together (taken whole, in one
    step) or cut anywhere across reads (taken frame by frame)."""

    def stream(self):
        basic = load_spec().classes["basic"]
        deliver = basic.methods["deliver"]
        bad_headers = _wire._EncodedTable(b"\x00\x00\x00\x03\x01aZ")  # an unknown type
        messages = [
            (1, {"user-id": "guest", "delivery-mode": 1}, b"x" * 200),
            (2, {"user-id": "guest", "headers": {"sum": "abc", "n": [1, 2]}}, b"{}"),
            (1, {"content-type": "application/json"}, b""),
            (2, {"user-id": "guest"}, bytes(range(256)) * 40),  # several body frames
            (1, {"user-id": "guest", "headers": bad_headers}, b"refused"),
            (1, {"user-id": "guest", "delivery-mode": 2}, b"after"),
            (2, {"user-id": "guest"}, b"m" * 2000),  # written apart from its frame
        ]
        data = b""
        for tag, (channel, properties, body) in enumerate(messages, 1):
            args = (f"ion.c{channel}", tag, tag % 2 == 0, "xpublic", f"v03.k{tag}")
            data += _wire._method_frame(channel, deliver, args)
            data += _wire._content_frames(channel, basic, properties, body, 4096 - 8)
        return data

    def read(self, data, step):
        session = _RecordingSession()
        protocol = _Protocol(session, load_spec(), "/", "PLAIN", b"", 0, task.Clock())
        protocol.makeConnection(StringTransport())
        protocol.channel(1)
        protocol.channel(2)
        for start in range(0, len(data), step):
            protocol.dataReceived(data[start : start + step])
        self.assertEqual(protocol._unread, b"")
        self.assertFalse(protocol.transport.disconnecting)
        return session.seen

    def test_whole_and_cut_alike(self):
        """Deliveries with small, empty and multi-frame bodies, headers, and properties that
        cannot be decoded (refused), read whole or cut at every 1, 7, ... bytes."""
        data = self.stream()
        whole = self.read(data, len(data))
        kinds = ["delivered"] * 4 + ["rejected", "delivered", "delivered"]
        self.assertEqual([seen[0] for seen in whole], kinds)
        properties = {"user-id": "guest", "delivery-mode": 1}
        self.assertEqual(
            whole[0][1:], (1, "ion.c1", 1, False, "xpublic", "v03.k1", b"x" * 200, properties)
        )
        self.assertEqual(whole[1][-1]["headers"], {"sum": "abc", "n": [1, 2]})
        self.assertEqual(whole[2][-2], b"")
        self.assertEqual(whole[3][-2], bytes(range(256)) * 40)
        self.assertEqual(whole[4][:3], ("rejected", 1, 5))
        self.assertEqual(whole[6][-2], b"m" * 2000)
        for step in (1, 7, 19, 213, 4096):
            self.assertEqual(self.read(data, step), whole, f"read {step} bytes at a time")


class _CountingTransport(StringTransport):
    def __init__(self):
        super().__init__()
        self.calls = []  # ("write" or "writeSequence", bytes written)
        self.sequences = []  # the pieces of each writeSequence

    def write(self, data):
        self.calls.append(("write", data))
        super().write(data)

    def writeSequence(self, seq):
        self.sequences.append(list(seq))
        self.calls.append(("writeSequence", b"".join(seq)))
        super().writeSequence(seq)

    def loseConnection(self):
        self.calls.append(("loseConnection", b""))
        super().loseConnection()


class _SocketTransport(_CountingTransport, FileDescriptor):
    """A transport that writes to a socket itself, as TCP's: C{doWrite} hands its buffer to
    the socket (counted here)."""

    connected = True

    def doWrite(self):
        self.calls.append(("doWrite", b""))


class BatchedWriteTests(unittest.SynchronousTestCase):
    """What handling the broker's bytes makes us send goes out in one write, in order, before
    the connection is closed; other writes go at once."""

    def setUp(self):
        self.session = _RecordingSession()
        self.protocol = _Protocol(self.session, load_spec(), "/", "PLAIN", b"", 0, task.Clock())
        self.transport = _CountingTransport()
        self.protocol.makeConnection(self.transport)
        self.protocol.channel(1)
        self.transport.calls.clear()
        self.basic = load_spec().classes["basic"]

    def deliveries(self, n):
        deliver = self.basic.methods["deliver"]
        data = b""
        for tag in range(1, n + 1):
            data += _wire._method_frame(1, deliver, ("ion.c", tag, False, "x", "k"))
            data += _wire._content_frames(1, self.basic, {}, b"body", 4088)
        return data

    def ack_frame(self, tag):
        return _wire._method_frame(1, self.basic.methods["ack"], (tag, False))

    def test_acks_of_one_read_in_one_write(self):
        """The acks that three deliveries of one read make go out in one write, in order."""
        self.session.deliver = lambda channel, args, body, properties: self.protocol.send_ack(
            1, args[1], False
        )
        self.protocol.dataReceived(self.deliveries(3))
        acks = b"".join(self.ack_frame(tag) for tag in (1, 2, 3))
        self.assertEqual(self.transport.calls, [("writeSequence", acks)])
        self.protocol.send_ack(1, 4, False)
        self.assertEqual(self.transport.calls[-1], ("write", self.ack_frame(4)))

    def test_publish_in_one_write(self):
        """A publish outside a read is written at once in one call: its method, header and
        body frames; a large body goes to the transport as it is, not copied."""
        self.protocol.frame_max = 4096
        bodies = [b"s" * 200, b"b" * 4000, b"m" * 9000]
        for body in bodies:
            self.transport.calls.clear()
            self.protocol.send_publish(1, "x", "k", True, {}, body)
            frames = _wire._publish_frame(1, "x", "k", True) + _wire._content_frames(
                1, self.basic, {}, body, 4088
            )
            self.assertEqual(self.transport.calls, [("writeSequence", frames)])
        self.assertTrue(any(part is bodies[1] for part in self.transport.sequences[1]))

    def test_publish_frames_reused_exactly(self):
        """The method frames kept for reuse are those of their own publish: the same bytes
        for each (channel, exchange, routing key, mandatory), also past the number kept;
        a routing key too long is refused every time."""
        from ion.core.messaging.amqp._protocol import PUBLISH_HEADS

        targets = [(1 + i % 3, f"x{i % 5}", f"k.{i}", bool(i % 2))
                   for i in range(PUBLISH_HEADS + 10)]
        for channel, exchange, key, mandatory in targets + targets[:20] + targets[-20:]:
            self.transport.calls.clear()
            self.protocol.send_publish(channel, exchange, key, mandatory, {}, b"b")
            frames = _wire._publish_frame(channel, exchange, key, mandatory) + (
                _wire._content_frames(channel, self.basic, {}, b"b", 4088)
            )
            self.assertEqual(self.transport.calls, [("writeSequence", frames)])
        self.transport.calls.clear()
        for _ in range(2):
            self.assertRaises(
                ValueError, self.protocol.send_publish, 1, "x", "é" * 128, True, {}, b"b"
            )
        self.assertEqual(self.transport.calls, [])

    def test_acks_sent_with_the_read(self):
        """Deliveries acked while their read is handled are acked at its end, in one
        basic.ack with multiple, with no timer; an ack outside a read waits for the turn."""
        clock = task.Clock()
        self.session.transport = types.SimpleNamespace(reactor=clock)
        self.session.client = self.protocol
        self.session.is_lost = False
        acks = _Acks(self.session, self.protocol.channels[1])

        def deliver(channel, args, body, properties):
            acks.unsettled.append(args[1])
            acks.ack(args[1])

        self.session.deliver = deliver
        self.protocol.dataReceived(self.deliveries(3))
        multiple = _wire._method_frame(1, self.basic.methods["ack"], (3, True))
        self.assertEqual(self.transport.calls, [("writeSequence", multiple)])
        self.assertEqual(clock.getDelayedCalls(), [])
        acks.unsettled.append(4)
        acks.ack(4)
        self.assertEqual(len(self.transport.calls), 1)
        clock.advance(0)
        last = _wire._method_frame(1, self.basic.methods["ack"], (4, True))
        self.assertEqual(self.transport.calls[-1], ("write", last))

    def acking(self):
        """A session.deliver that acks each delivery through the channel's L{_Acks}, with the
        number of writes made before each delivery."""
        clock = task.Clock()
        self.session.transport = types.SimpleNamespace(reactor=clock)
        self.session.client = self.protocol
        self.session.is_lost = False
        acks = _Acks(self.session, self.protocol.channels[1])
        writes_before = []

        def deliver(channel, args, body, properties):
            writes_before.append(len(self.transport.calls))
            acks.unsettled.append(args[1])
            acks.ack(args[1])

        self.session.deliver = deliver
        return writes_before

    def test_acks_written_early_in_a_long_read(self):
        """In a read of many deliveries, the acks of the first EARLY_WRITE are written before
        the next one is handled (the broker refills the prefetch window meanwhile); the rest
        at the end of the read."""
        writes_before = self.acking()
        self.protocol.dataReceived(self.deliveries(EARLY_WRITE + 10))
        ack = self.basic.methods["ack"]
        self.assertEqual(
            self.transport.calls,
            [
                ("writeSequence", _wire._method_frame(1, ack, (EARLY_WRITE, True))),
                ("writeSequence", _wire._method_frame(1, ack, (EARLY_WRITE + 10, True))),
            ],
        )
        self.assertEqual(writes_before, [0] * EARLY_WRITE + [1] * 10)

    def test_sent_now_on_a_socket(self):
        """On a transport that writes to a socket itself, what a read made us send is handed
        to the socket at once (early in a long read too), not at the reactor's next turn;
        never once the transport is closing (closing is the reactor's to finish)."""
        self.transport = _SocketTransport()
        self.protocol.makeConnection(self.transport)
        self.transport.calls.clear()
        self.acking()
        self.protocol.dataReceived(self.deliveries(EARLY_WRITE + 1))
        self.assertEqual(
            [kind for kind, _ in self.transport.calls],
            ["writeSequence", "doWrite", "writeSequence", "doWrite"],
        )
        self.transport.loseConnection()
        self.transport.calls.clear()
        self.protocol.dataReceived(self.deliveries(1))
        self.assertEqual([kind for kind, _ in self.transport.calls], ["writeSequence"])

    def test_written_before_closing(self):
        """A handler that sends, then closes the connection: what it sent is written first."""
        def deliver(channel, args, body, properties):
            self.protocol.send_ack(1, args[1], False)
            self.protocol.lose_connection()

        self.session.deliver = deliver
        self.protocol.dataReceived(self.deliveries(1))
        self.assertEqual(
            self.transport.calls,
            [("writeSequence", self.ack_frame(1)), ("loseConnection", b"")],
        )


class BrokerTestCase(unittest.TestCase):
    """Runs on the private RabbitMQ node; skipped (or failed under CI) without RabbitMQ."""

    users = ("alice", "bob", "carol", "dave")

    def setUp(self):
        skip_or_fail_without_rabbitmq()
        self.broker = get_broker()

    async def connect(self, user="alice", **options):
        transport = AmqpTransport(self.broker.url_for(user), reactor, **options)
        self.assertIs(await transport.connect(), transport)
        self.addCleanup(transport.close)
        return transport


class AmqpTransportTests(TransportSemantics, BrokerTestCase):
    async def make_transports(self, n):
        return [await self.connect(user) for user in self.users[:n]]


class AmqpTests(BrokerTestCase):
    def unique(self, label):
        return TransportSemantics.unique(self, label)

    async def queue(self, transport, **flags):
        name = await transport.declare_queue(self.unique("q"), **flags)
        self.addCleanup(self._delete_quietly, transport, name)
        return name

    async def _delete_quietly(self, transport, name):
        try:
            await transport.delete_queue(name)
        except TransportError:
            pass

    async def test_confirms_and_returns_interleaved(self):
        """Many publishes in flight at once, routable and not: each one's Deferred learns its
        own fate, although basic.return carries no delivery tag."""
        t = await self.connect()
        ex = self.unique("topic")
        await t.declare_exchange(ex, "topic")
        q = await self.queue(t)
        await t.bind(q, ex, "yes.#")
        inbox = Inbox()
        await t.consume(q, inbox, prefetch=0)
        keys = ["yes.%d" % i if i % 3 else "no.%d" % i for i in range(90)]
        results = await defer.DeferredList(
            [t.publish(ex, key, key.encode()) for key in keys], consumeErrors=True
        )
        for key, (ok, result) in zip(keys, results):
            if key.startswith("yes"):
                self.assertTrue(ok, key)
            else:
                self.assertFalse(ok, key)
                result.trap(Unroutable)
                self.assertEqual(result.value.routing_key, key)
        await inbox.wait(60)
        self.assertEqual(inbox.bodies, [k.encode() for k in keys if k.startswith("yes")])

    async def test_missing_exchange_does_not_hurt_others(self):
        """A publish to a missing exchange fails with NotFound; the publishes around it,
        in flight on the same channel, are still delivered and confirmed."""
        t = await self.connect()
        q = await self.queue(t)
        inbox = Inbox()
        await t.consume(q, inbox)
        before = t.publish("", q, b"before")
        bad = t.publish(self.unique("missing"), "k", b"lost")
        after = [t.publish("", q, b"after%d" % i) for i in range(5)]
        await self.assertFailure(bad, NotFound)
        await before
        await defer.gatherResults(after)
        await inbox.wait(6)
        self.assertEqual(inbox.bodies, [b"before"] + [b"after%d" % i for i in range(5)])

    async def test_exchange_gone_after_first_use(self):
        """An exchange that vanishes after it was used (here: auto-deleted with its last
        binding) fails the next publish to it with NotFound; publishes sent after it on the
        same channel are sent again and arrive."""
        t = await self.connect()
        ex = self.unique("fanout")
        await t.declare_exchange(ex, "fanout", auto_delete=True)
        doomed = await t.declare_queue(self.unique("q"))
        await t.bind(doomed, ex, "")
        await t.publish(ex, "", b"routed")
        await t.delete_queue(doomed)
        q = await self.queue(t)
        inbox = Inbox()
        await t.consume(q, inbox)
        bad = t.publish(ex, "", b"lost")
        after = [t.publish("", q, b"%d" % i) for i in range(3)]
        await self.assertFailure(bad, NotFound)
        await defer.gatherResults(after)
        await inbox.wait(3)
        self.assertEqual(inbox.bodies, [b"0", b"1", b"2"])

    async def test_server_named_queue_deleted_at_close(self):
        """Exclusive queues are deleted by close(), server-named ones included, so another
        connection sees them gone at once."""
        t = await self.connect("alice")
        other = await self.connect("bob")
        named = await t.declare_queue("", exclusive=True)
        await t.close()
        await self.assertFailure(other.consume(named, Inbox()), NotFound)

    async def test_user_id_is_the_connection_user(self):
        """user_id on the wire is the authenticated user, whatever the caller put there;
        RabbitMQ verifies it, so receivers can trust it."""
        alice = await self.connect("alice")
        bob = await self.connect("bob")
        q = await self.queue(bob)
        inbox = Inbox()
        await bob.consume(q, inbox)
        await alice.publish("", q, b"x", Properties(user_id="bob"))
        (delivery,) = await inbox.wait(1)
        self.assertEqual(delivery.properties.user_id, "alice")

    async def test_headers_of_every_type(self):
        """Headers keep their types end to end (booleans, nested tables, lists, bytes)."""
        t = await self.connect()
        q = await self.queue(t)
        inbox = Inbox()
        await t.consume(q, inbox)
        headers = {"flag": True, "n": -3, "big": 2**40, "list": [1, "a"], "map": {"k": b"\0"}}
        await t.publish("", q, b"x", Properties(headers=headers, expiration="60000"))
        (delivery,) = await inbox.wait(1)
        self.assertEqual(delivery.properties.headers, headers)
        self.assertEqual(delivery.properties.expiration, "60000")

    async def test_bad_header_fails_only_its_publish(self):
        """A header value no field table can hold fails that publish at once; the
        connection goes on."""
        t = await self.connect()
        q = await self.queue(t)
        bad = t.publish("", q, b"x", Properties(headers={"x": object()}))
        self.failureResultOf(bad, TypeError)
        await t.publish("", q, b"fine")

    def capture_log(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    async def test_undecodable_headers_rejected_alone(self):
        """A message whose headers nest tables 2,000 deep, published by another user with a
        plain AMQP client, is rejected alone: nacked without requeue (RabbitMQ dead-letters
        it: this queue has a dead-letter exchange), logged once with its queue and the
        reason. The connection stays up and the messages after it arrive; its
        body, over several frames, is skipped. (It used to raise RecursionError in the frame
        reader and drop the connection, again at every redelivery.)"""
        t = await self.connect("alice")
        losses = []
        t.on_connection_lost(losses.append)
        ex = self.unique("topic")
        await t.declare_exchange(ex, "topic")
        dlx = self.unique("dlx")
        await t.declare_exchange(dlx, "fanout")
        dead = await self.queue(t)
        await t.bind(dead, dlx, "")
        q = self.unique("q")
        await threads.deferToThread(raw_declare_queue, self.broker, "alice", q, dlx)
        self.addCleanup(self._delete_quietly, t, q)
        await t.bind(q, ex, "#")
        inbox = Inbox()
        consumer = await t.consume(q, inbox)
        logged = self.capture_log()
        poison = b"p" * 300_000
        await threads.deferToThread(
            raw_publish, self.broker, "bob", ex, "a", nested_table(2_000), poison
        )
        bob = await self.connect("bob")
        await bob.publish(ex, "b", b"after", Properties(headers={"k": [1, {"x": True}]}))
        (delivery,) = await inbox.wait(1)
        self.assertEqual(delivery.body, b"after")
        self.assertEqual(delivery.properties.headers, {"k": [1, {"x": True}]})
        self.assertEqual(losses, [])
        # Gone from the queue, not held unacked (cancelling would requeue it), and
        # dead-lettered.
        await consumer.cancel()
        self.assertEqual(await t.queue_depth(q), 0)
        for _ in range(100):  # dead-lettering goes through the broker's queue processes
            if await t.queue_depth(dead):
                break
            await task.deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(await t.queue_depth(dead), 1)
        rejected = [formatEvent(e) for e in logged if "rejected a message" in formatEvent(e)]
        self.assertEqual(len(rejected), 1, rejected)
        self.assertIn(repr(q), rejected[0])
        self.assertIn("nested deeper than 16 levels", rejected[0])
        self.assertNotIn("RecursionError", "".join(formatEvent(e) for e in logged))

    async def test_every_consumer_restored_after_every_reconnect(self):
        """50 reconnects in a row, every other one cut again while the consumers are being
        re-attached (by a message that drops the connection whenever it is delivered, as an
        undecodable one used to): after each, every consumer - of a process queue, a service
        queue and a durable pump queue - gets a message. (A connection lost during the
        restore used to make the transport forget the consumers not yet re-attached, for
        good: after a few such loops the pump was deaf.)"""
        t = await self.connect("alice", retry_policy=lambda attempt: 0.01)
        losses = []
        t.on_connection_lost(losses.append)

        def drop_connection():
            # What the broker, a proxy or a decoding failure can do at any moment.
            session = t._session
            session.client.transport.abortConnection()

        # Re-attached first: its message comes back during every restore.
        trap = await self.queue(t, durable=True)
        await t.publish("", trap, b"trap", Properties(delivery_mode=2))
        armed = []

        def trap_handler(delivery):
            if armed:
                armed.clear()
                drop_connection()

        await t.consume(trap, trap_handler)
        ex = self.unique("topic")
        await t.declare_exchange(ex, "topic")
        process = await self.queue(t, exclusive=True, auto_delete=True)
        service = await self.queue(t, auto_delete=True)
        pump = await self.queue(t, durable=True)
        inboxes = {}
        for name, key in ((process, "process"), (service, "service"), (pump, "v03.pump.#")):
            await t.bind(name, ex, key)
            inboxes[name] = Inbox()
            await t.consume(name, inboxes[name])

        expected_losses = 0
        for round in range(1, 51):
            if round % 2:
                armed.append(True)
                expected_losses += 2
            else:
                expected_losses += 1
            drop_connection()
            for _ in range(1000):
                if len(losses) >= expected_losses and not armed:
                    break
                await task.deferLater(reactor, 0.005, lambda: None)
            await t.whenConnected().addTimeout(10, reactor)
            self.assertEqual(len(losses), expected_losses)
            body = b"%d" % round
            for key in ("process", "service", "v03.pump.x"):
                await t.publish(ex, key, body)
            for _ in range(1000):
                if all(body in inbox.bodies for inbox in inboxes.values()):
                    break
                await task.deferLater(reactor, 0.005, lambda: None)
            for name, inbox in inboxes.items():
                self.assertIn(body, inbox.bodies, f"round {round}: nothing on {name}")

    async def test_large_and_utf8_bodies(self):
        """Bodies are bytes whatever they contain, also when split over many frames."""
        t = await self.connect()
        q = await self.queue(t)
        inbox = Inbox()
        await t.consume(q, inbox)
        bodies = [b"", "héllo".encode(), b"\xff" * 10, ("é" * 200_000).encode(), b"x" * 300_001]
        for body in bodies:
            await t.publish("", q, body)
        await inbox.wait(len(bodies))
        self.assertEqual(inbox.bodies, bodies)
        self.assertTrue(all(type(b) is bytes for b in inbox.bodies))

    async def test_refusal_closes_only_a_channel(self):
        """A refused declaration fails with the mapped error and the connection stays up."""
        t = await self.connect()
        other = await self.connect("bob")
        q = await self.queue(t, exclusive=True)
        await self.assertFailure(other.declare_queue(q), QueueInUse)
        await self.assertFailure(t.declare_queue(q, durable=True), TransportError)
        await self.assertFailure(t.bind(q, self.unique("nope"), "k"), NotFound)
        self.assertEqual(await t.declare_queue(q, exclusive=True), q)
        await t.publish("", q, b"still connected")

    async def test_bad_password(self):
        """Wrong credentials fail connect() with a TransportError that does not show the
        password, and no retry follows."""
        url = f"amqp://alice:wrong-sekrit@127.0.0.1:{self.broker.port}/"
        transport = AmqpTransport(url, reactor)
        error = await self.assertFailure(transport.connect(), TransportError)
        self.assertNotIn("sekrit", str(error))
        self.assertIn("refused", str(error))
        await self.assertFailure(transport.declare_queue("q"), ConnectionLost)

    async def test_nobody_listening(self):
        """connect() to a port where nobody listens fails with ConnectionLost."""
        from tests.broker import _free_port

        transport = AmqpTransport(f"amqp://u:p@127.0.0.1:{_free_port()}/", reactor)
        await self.assertFailure(transport.connect(), ConnectionLost)
        await transport.close()

    async def test_not_connected_and_closed(self):
        """Operations before connect() fail with TransportError, after close() with
        ConnectionLost."""
        t = AmqpTransport(self.broker.url_for("alice"), reactor)
        self.failureResultOf(t.declare_queue("q"), TransportError)
        await t.connect()
        await t.close()
        self.failureResultOf(t.declare_queue("q"), ConnectionLost)
        self.failureResultOf(t.publish("", "q", b"x"), ConnectionLost)
        self.failureResultOf(t.whenConnected(), ConnectionLost)

    async def test_broker_cancels_consumer(self):
        """When another connection deletes the queue, the broker cancels our consumer
        (consumer cancel notification); the transport logs it and ends the consumer."""
        t = await self.connect("alice")
        other = await self.connect("bob")
        q = await other.declare_queue(self.unique("q"))
        consumer = await t.consume(q, Inbox())
        await other.delete_queue(q)
        for _ in range(50):
            if not consumer.active:
                break
            await task.deferLater(reactor, 0.02, lambda: None)
        self.assertFalse(consumer.active)
        await consumer.cancel()

    async def test_reconnect_after_broker_restart(self):
        """When the broker dies, unconfirmed publishes fail with ConnectionLost and so does
        everything tried while it is away; once it is back the transport reconnects on its
        own, declares its exchanges, queues and bindings again and re-attaches consumers."""
        retry = lambda attempt: 0.2  # noqa: E731
        t = await self.connect("alice", retry_policy=retry)
        ex = self.unique("topic")
        await t.declare_exchange(ex, "topic")
        q = await t.declare_queue(self.unique("q"))
        self.addCleanup(self._delete_quietly, t, q)
        await t.bind(q, ex, "a.*")
        inbox = Inbox()
        consumer = await t.consume(q, inbox)
        await t.publish(ex, "a.b", b"before")
        await inbox.wait(1)

        self.broker.kill()
        await self.assertFailure(t.publish(ex, "a.b", b"lost"), ConnectionLost)
        await self.assertFailure(t.declare_queue(self.unique("q")), ConnectionLost)
        waiting = t.whenConnected()
        self.assertNoResult(waiting)
        self.broker.start()
        self.assertIs(await waiting.addTimeout(30, reactor), t)

        await t.publish(ex, "a.b", b"after")
        await inbox.wait(2)
        self.assertEqual(inbox.bodies, [b"before", b"after"])
        self.assertTrue(consumer.active)

    async def test_redelivered_during_restore(self):
        """After a broker restart the messages handed out again reach their consumer while the
        transport is still re-attaching the consumers after it; the handler can publish and ack
        at once (it used to fail with ConnectionLost, and the pump's processes drop a message
        that fails after a redelivery)."""
        t = await self.connect("alice", retry_policy=lambda attempt: 0.2)
        first = await self.queue(t, durable=True)
        outbox = await self.queue(t, durable=True)
        for i in range(5):
            await t.publish("", first, b"%d" % i, Properties(delivery_mode=2))
        held, outcomes = [], []

        def handler(delivery):
            if not delivery.redelivered:
                held.append(delivery)  # left unacked until the broker dies
                return
            d = t.publish("", outbox, delivery.body)
            d.addCallback(lambda _: delivery.ack())
            d.addCallbacks(lambda _: outcomes.append("ok"), lambda f: outcomes.append(f.value))

        await t.consume(first, handler)
        # Consumers re-attached after `first`, one round trip each.
        for _ in range(5):
            await t.consume(await self.queue(t), Inbox())
        for _ in range(250):
            if len(held) == 5:
                break
            await task.deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(len(held), 5)

        self.broker.kill()
        self.broker.start()
        await t.whenConnected().addTimeout(30, reactor)
        for _ in range(250):
            if len(outcomes) == 5:
                break
            await task.deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(outcomes, ["ok"] * 5)
        inbox = Inbox()
        await t.consume(outbox, inbox)
        await inbox.wait(5)
        self.assertEqual(sorted(inbox.bodies), [b"%d" % i for i in range(5)])

    async def test_heartbeat_detects_a_frozen_broker(self):
        """A broker that stops answering (SIGSTOP) is given up after three missed heartbeats;
        the transport reconnects once the broker runs again."""
        t = await self.connect("alice", heartbeat=1, retry_policy=lambda attempt: 0.2)
        q = await self.queue(t)
        self.broker.pause()
        try:
            lost = t.publish("", q, b"x")
            await self.assertFailure(lost.addTimeout(10, reactor), ConnectionLost)
        finally:
            self.broker.resume()
        await t.whenConnected().addTimeout(30, reactor)
        await t.publish("", q, b"y")


class TlsTests(BrokerTestCase):
    async def test_amqps_with_ca_file(self):
        """amqps:// verifies the broker's certificate against the given CA file and its host
        name; then everything works as over amqp://."""
        t = AmqpTransport(
            self.broker.tls_url_for("alice"), reactor, tls_ca_file=self.broker.ca_file
        )
        await t.connect()
        self.addCleanup(t.close)
        q = await t.declare_queue("", exclusive=True)
        inbox = Inbox()
        await t.consume(q, inbox)
        await t.publish("", q, b"secret")
        (delivery,) = await inbox.wait(1)
        self.assertEqual((delivery.body, delivery.properties.user_id), (b"secret", "alice"))

    async def test_wrong_host_name(self):
        """A certificate that does not name the host connected to is refused."""
        url = self.broker.tls_url_for("alice", host="127.0.0.1")
        t = AmqpTransport(url, reactor, tls_ca_file=self.broker.ca_file)
        await self.assertFailure(t.connect(), ConnectionLost)
        await t.close()

    async def test_unknown_ca(self):
        """Without the test CA (the system's trust store only) the broker is refused."""
        t = AmqpTransport(self.broker.tls_url_for("alice"), reactor)
        await self.assertFailure(t.connect(), ConnectionLost)
        await t.close()

    async def test_wrong_ca(self):
        """A CA file of another CA: the broker's certificate is not verified, and the error
        says so in one line."""
        t = AmqpTransport(
            self.broker.tls_url_for("alice"), reactor,
            tls_ca_file=self.broker.tls_file("stranger-ca.pem"),
        )
        error = await self.assertFailure(t.connect(), ConnectionLost)
        await t.close()
        self.assertIn("TLS: the broker's certificate is not verified (certificate verify "
                      "failed", str(error))
        self.assertNotIn("\n", str(error))

    async def test_client_certificate_needs_external(self):
        """A client certificate logs in with EXTERNAL: a broker that does not offer it (no
        rabbitmq_auth_mechanism_ssl) is refused at once, saying what it lacks."""
        t = AmqpTransport(
            self.broker.tls_url_for("tess"), reactor, tls_ca_file=self.broker.ca_file,
            tls_cert_file=self.broker.client_cert_file, tls_key_file=self.broker.client_key_file,
        )
        error = await self.assertFailure(t.connect(), TransportError)
        await t.close()
        self.assertIn("the broker does not offer EXTERNAL authentication", str(error))
        self.assertIn("rabbitmq_auth_mechanism_ssl", str(error))

    def test_tls_files_need_amqps(self):
        """TLS files for an amqp:// URL are a mistake, not silently ignored."""
        error = self.assertRaises(
            ValueError, AmqpTransport, self.broker.url_for("alice"), reactor,
            tls_ca_file=self.broker.ca_file,
        )
        self.assertIn("needs an amqps:// URL", str(error))


class ClientCertificateTests(unittest.TestCase):
    """On the private node whose TLS listener verifies client certificates (verify_peer,
    fail_if_no_peer_cert) and offers EXTERNAL login."""

    def setUp(self):
        skip_or_fail_without_rabbitmq()
        self.broker = get_cert_broker()

    def transport(self, url=None, cert="client.pem", key="client.key", **options):
        b = self.broker
        files = {}
        if cert is not None:
            files = dict(tls_cert_file=b.tls_file(cert), tls_key_file=b.tls_file(key))
        return AmqpTransport(
            url or f"amqps://localhost:{b.tls_port}/", reactor, tls_ca_file=b.ca_file,
            **files, **options,
        )

    async def test_external_login(self):
        """With a client certificate and a URL without user or password, the connection logs
        in with EXTERNAL as the certificate's CN; messages carry that user, checked by the
        broker."""
        for url in (None, self.broker.tls_url_for("tess")):
            t = self.transport(url)
            self.assertEqual(t.user, "tess")
            self.assertIn("amqps://tess:***@localhost", str(t))
            await t.connect()
            self.addCleanup(t.close)
            q = await t.declare_queue("", exclusive=True)
            inbox = Inbox()
            await t.consume(q, inbox)
            await t.publish("", q, b"signed")
            (delivery,) = await inbox.wait(1)
            self.assertEqual((delivery.body, delivery.properties.user_id), (b"signed", "tess"))

    async def test_no_client_certificate(self):
        """The broker asks for a client certificate: without one the connection is refused,
        saying what is missing."""
        t = self.transport(self.broker.tls_url_for("alice"), cert=None)
        error = await self.assertFailure(t.connect(), ConnectionLost)
        await t.close()
        self.assertIn("TLS: the broker asks for a client certificate", str(error))

    async def test_certificate_of_another_ca(self):
        """A client certificate the broker's CA did not sign is refused."""
        t = self.transport(cert="stranger.pem", key="stranger.key")
        error = await self.assertFailure(t.connect(), ConnectionLost)
        await t.close()
        self.assertIn("TLS: the broker refused the client certificate", str(error))

    async def test_certificate_with_its_chain(self):
        """A certificate issued by an intermediate CA is accepted when its file carries the
        intermediate's certificate too: the broker trusts only the root."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        with open(self.broker.ca_file, "rb") as f:
            root = x509.load_pem_x509_certificate(f.read())
        with open(self.broker.tls_file("ca.key"), "rb") as f:
            root_key = serialization.load_pem_private_key(f.read(), None)
        middle_key, key = new_key(), new_key()
        middle = issue_certificate("ION test intermediate", middle_key, root, root_key, ca=True)
        own = issue_certificate("tess", key, middle, middle_key)
        directory = self.mktemp()
        os.makedirs(directory)
        cert = write_pem(os.path.join(directory, "chain.pem"), [own, middle])
        key_file = write_pem(os.path.join(directory, "chain.key"), key=key)
        t = AmqpTransport(
            f"amqps://localhost:{self.broker.tls_port}/", reactor,
            tls_ca_file=self.broker.ca_file, tls_cert_file=cert, tls_key_file=key_file,
        )
        await t.connect()
        self.addCleanup(t.close)
        self.assertEqual(t.user, "tess")
