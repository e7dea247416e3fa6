"""Tests for ion.core.messaging.codec: envelopes survive the wire, hostile input does not hurt."""

import os
import resource
import struct
import subprocess
import sys
import uuid

from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

import ion
from ion.core.cc.testing import make_container
from ion.core.messaging import names
from ion.core.messaging.memory import MemoryBroker
from ion.core.process import Process, ServiceProcess
from tests.broker import get_broker

from ion.core.messaging.codec import (
    DecodeError,
    EncodeError,
    Envelope,
    Limits,
    decode,
    decode_envelope,
    encode,
    encode_envelope,
)

# 16 MB: 1 million arrays of 15 empty maps, one byte each.
EMPTY_MAP_BOMB = b"\xdd" + struct.pack("!I", 1_000_000) + (b"\x9f" + b"\x80" * 15) * 1_000_000

SMALL = Limits(
    max_message_bytes=1000, max_str_len=10, max_bin_len=10, max_array_len=5, max_map_len=5
)


class RoundTripTests(unittest.SynchronousTestCase):
    def test_rpc_request_envelope(self):
        """An rpc request with the full ION header vocabulary comes back equal."""
        env = Envelope(
            headers={
                "sender": "c1.3",
                "sender-name": "pump",
                "receiver": "ion.datastore",
                "reply-to": "c1.3",
                "conv-id": "c1.3#42",
                "conv-seq": 1,
                "protocol": "rpc",
                "performative": "request",
                "op": "put",
                "user-id": "alice",
                "reply-by": 1700000015.25,
                "ts": 1700000000.0,
                "encoding": "msgpack",
            },
            content={"key": "k1", "value": b"\x00\xffbinary", "tags": ["a", "b"], "n": None},
        )
        self.assertEqual(decode_envelope(encode_envelope(env), Limits()), env)

    def test_failure_envelope(self):
        """A failure reply keeps its status and structured error body."""
        env = Envelope(
            headers={"performative": "failure", "status": "ERROR", "conv-seq": 2},
            content={"code": 404, "type": "NotFound", "message": "no such key"},
        )
        self.assertEqual(decode_envelope(encode_envelope(env), Limits()), env)

    def test_scalar_contents(self):
        """Content can be any msgpack value, including scalars and nested headers."""
        for content in [None, True, 0, -(2**63), 2**64 - 1, 1.5, "é", b"", [], {1: "int key"}]:
            env = Envelope(headers={"nested": {"a": [1, {"b": None}]}}, content=content)
            self.assertEqual(decode_envelope(encode_envelope(env), Limits()), env)

    def test_str_and_bytes_stay_distinct(self):
        """str decodes as str and bytes as bytes (use_bin_type, raw=False)."""
        self.assertEqual(decode(encode(["x", b"x"]), Limits()), ["x", b"x"])

    def test_tuples_become_lists(self):
        """msgpack has one sequence type: tuples come back as lists."""
        self.assertEqual(decode(encode((1, (2,))), Limits()), [1, [2]])


class LimitsTests(unittest.SynchronousTestCase):
    def assertRejected(self, data, limits, fragment):
        error = self.assertRaises(DecodeError, decode, data, limits)
        self.assertIn(fragment, str(error))
        return error

    def test_defaults(self):
        """Defaults: 16 MiB messages, strings and binaries; 1e6 array items; 1e5 map items;
        2e6 objects in all."""
        self.assertEqual(
            Limits(), Limits(16 * 2**20, 16 * 2**20, 16 * 2**20, 1_000_000, 100_000, 2_000_000)
        )

    def test_from_config(self):
        """A config section overrides limits by name, accepts digit strings, ignores the rest."""
        limits = Limits.from_config(
            {"max_map_len": "10", "max_str_len": 7, "rpc_timeout": 15, "max_objects": "5_000"}
        )
        self.assertEqual(limits.max_map_len, 10)
        self.assertEqual(limits.max_objects, 5_000)
        self.assertEqual(limits.max_str_len, 7)
        self.assertEqual(limits.max_message_bytes, 16 * 2**20)

    def test_from_config_bad_value(self):
        """A non-positive or non-numeric limit is refused with the key named."""
        for value in ["lots", 0, -1, 1.5]:
            error = self.assertRaises(ValueError, Limits.from_config, {"max_array_len": value})
            self.assertIn("max_array_len", str(error))

    def test_oversized_message(self):
        """The size check comes first and says how big the message was."""
        error = self.assertRaises(DecodeError, decode, b"\x00" * 20_000_000, Limits())
        self.assertEqual(str(error), "message too large: 20000000 bytes > limit 16777216")

    def test_oversized_str(self):
        """A string longer than max_str_len is refused."""
        self.assertRejected(encode("x" * 11), SMALL, "max_str_len")

    def test_oversized_bin(self):
        """A binary longer than max_bin_len is refused."""
        self.assertRejected(encode(b"x" * 11), SMALL, "max_bin_len")

    def test_oversized_array(self):
        """An array with more than max_array_len items is refused."""
        self.assertRejected(encode([0] * 6), SMALL, "max_array_len")

    def test_oversized_map(self):
        """A map with more than max_map_len entries is refused."""
        self.assertRejected(encode({str(i): i for i in range(6)}), SMALL, "max_map_len")

    def test_lying_length_prefix(self):
        """A header claiming 4 billion items is refused before anything is allocated."""
        self.assertRejected(b"\xdd\xff\xff\xff\xff", Limits(), "max_array_len")
        self.assertRejected(b"\xdf\xff\xff\xff\xff", Limits(), "max_map_len")

    def test_too_many_objects(self):
        """max_objects counts every value, containers included: exactly max_objects decode,
        one more is refused, however it is spread over arrays and maps."""
        limits = Limits(max_objects=10)
        fits = [[None, None], {"a": 1, "b": [2]}]  # 1 + 3 + 5 + 1 objects
        self.assertEqual(decode(encode(fits), limits), fits)
        for message in (fits + [None], [[{}, {}, {}]] * 3, {"a": {"b": {"c": {"d": {}}}}, "e": 1}):
            self.assertRejected(encode(message), limits, "more than 10 objects")

    def test_empty_map_bomb(self):
        """16 MB of 1 million arrays of 15 empty maps (one byte each on the wire, 64 bytes each
        once decoded) is refused with DecodeError after a bounded amount of work: the decoding
        process grows by less than 200 MB (it took 1.2 GB)."""
        script = """
import resource
from ion.core.messaging import codec
from tests.core.messaging.test_codec import EMPTY_MAP_BOMB
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    codec.decode(EMPTY_MAP_BOMB, codec.Limits())
except codec.DecodeError as e:
    print(e)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
        root = os.path.dirname(os.path.dirname(os.path.abspath(ion.__file__)))
        env = dict(os.environ, PYTHONPATH=root)
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        refusal, grown_mb = out.stdout.splitlines()
        self.assertEqual(refusal, "message exceeds a decode limit: more than 2000000 objects")
        self.assertLess(int(grown_mb), 200)

    def test_deeply_nested(self):
        """100k nested arrays are refused cleanly instead of crashing the interpreter."""
        self.assertRejected(b"\x91" * 100_000 + b"\xc0", Limits(), "nested too deeply")

    def test_truncated(self):
        """Data cut short, or empty, is a truncated message."""
        data = encode({"headers": {}, "content": "hello"})
        for cut in [data[:-1], data[:1], b""]:
            self.assertRejected(cut, Limits(), "truncated message")

    def test_trailing_garbage(self):
        """Bytes after the first value are refused: one message is one value."""
        self.assertRejected(encode([1]) + b"\x00junk", Limits(), "trailing data")

    def test_invalid_bytes(self):
        """A reserved msgpack byte and invalid UTF-8 in a str are refused."""
        self.assertRejected(b"\xc1", Limits(), "malformed")
        self.assertRejected(b"\xa2\xff\xfe", Limits(), "UTF-8")

    def test_unhashable_map_key(self):
        """A map keyed by an array (legal msgpack, not a Python dict) is refused."""
        self.assertRejected(b"\x81\x91\x01\x02", Limits(), "map key")

    def test_extension_types(self):
        """msgpack extension types (timestamps included) are not part of the wire format."""
        self.assertRejected(b"\xd4\x01\x00", Limits(), "extension types")
        self.assertRejected(b"\xd6\xff\x00\x00\x00\x01", Limits(), "extension types")

    def test_not_bytes(self):
        """Decoding something that is not bytes is a programming error, not bad input."""
        self.assertRaises(TypeError, decode, "text", Limits())


class EnvelopeShapeTests(unittest.SynchronousTestCase):
    def assertBadEnvelope(self, obj, fragment):
        error = self.assertRaises(DecodeError, decode_envelope, encode(obj), Limits())
        self.assertIn(fragment, str(error))

    def test_top_level_not_a_map(self):
        """Only a map can be an envelope."""
        for obj in [[1, 2], "headers", None, 3]:
            self.assertBadEnvelope(obj, "envelope must be a map with 'headers' and 'content'")

    def test_missing_or_extra_keys(self):
        """The envelope map has exactly the keys 'headers' and 'content'."""
        self.assertBadEnvelope({"headers": {}}, "got keys 'headers'")
        self.assertBadEnvelope({"content": 1}, "got keys 'content'")
        self.assertBadEnvelope({}, "got keys none")
        self.assertBadEnvelope({"headers": {}, "content": 1, "extra": 2}, "'extra'")

    def test_headers_not_a_map(self):
        """Headers must be a map."""
        self.assertBadEnvelope({"headers": ["op"], "content": 1}, "headers must be a map")

    def test_header_names_are_strings(self):
        """Header names must be strings."""
        self.assertBadEnvelope({"headers": {1: "x"}, "content": 1}, "header names")

    def test_header_values_are_plain(self):
        """Header values are str/int/float/bool/None/map/list, also when nested."""
        self.assertBadEnvelope({"headers": {"op": b"put"}, "content": 1}, "got bytes")
        self.assertBadEnvelope({"headers": {"x": [{"y": b"z"}]}, "content": 1}, "header 'x'")
        self.assertBadEnvelope({"headers": {"x": {1: 2}}, "content": 1}, "map keys")


class EncodeTests(unittest.SynchronousTestCase):
    def test_unsupported_type(self):
        """Encoding an unsupported object names its type; EncodeError is a TypeError."""
        error = self.assertRaises(EncodeError, encode, {"when": {1, 2}})
        self.assertIsInstance(error, TypeError)
        self.assertIn("set", str(error))

    def test_unsupported_class(self):
        """Instances of application classes are refused with their qualified name."""

        class Reading:
            pass

        error = self.assertRaises(EncodeError, encode, [Reading()])
        self.assertIn("Reading", str(error))

    def test_integer_too_big(self):
        """Integers beyond 64 bits cannot travel."""
        error = self.assertRaises(EncodeError, encode, 2**64)
        self.assertIn("64-bit", str(error))

    def test_bad_headers_on_encode(self):
        """The sender learns about bad headers before anything is sent."""
        self.assertRaises(EncodeError, encode_envelope, Envelope(headers={"op": object()}))
        self.assertRaises(EncodeError, encode_envelope, Envelope(headers={1: "x"}))
        self.assertRaises(EncodeError, encode_envelope, Envelope(headers=["op"]))


class Echo(ServiceProcess):
    service = "echo"

    def op_echo(self, content, headers):
        return content


class HostileMessageScenarios:
    """What arrives on the container's exchange from anyone who may publish there.
    Subclasses set `url` and `new_broker()`."""

    async def test_undecodable_messages_dropped_alone(self):
        """Messages to a service that are not envelopes - garbage, and 16 MB of arrays of
        empty maps that once took 1.2 GB - are each logged once with the queue and dropped
        (nacked without requeue); the service goes on serving, and the container grew by
        less than 200 MB."""
        sysname = f"hostile-{uuid.uuid4().hex[:8]}"
        container = await make_container(
            self, url=self.url, memory_broker=self.new_broker(), sysname=sysname
        )
        await container.spawn(Echo)
        caller = await container.spawn(Process)
        self.assertEqual(await caller.rpc("echo", "echo", "before"), "before")
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        exchange = container.messenger.exchange
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        await container.transport.publish(exchange, "echo", b"\xc1 not msgpack")
        await container.transport.publish(exchange, "echo", EMPTY_MAP_BOMB)
        self.assertEqual(await caller.rpc("echo", "echo", "after"), "after")
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024
        self.assertLess(grown_mb, 200)
        dropped = [formatEvent(e) for e in events if "undecodable" in formatEvent(e)]
        self.assertEqual(len(dropped), 2, dropped)
        self.assertIn("not valid msgpack", dropped[0])
        self.assertIn("more than 2000000 objects", dropped[1])
        for line in dropped:
            self.assertIn(names.service_queue(sysname, "echo"), line)
        self.assertEqual(await caller.rpc("echo", "echo", "still"), "still")


class MemoryHostileMessageTests(HostileMessageScenarios, unittest.TestCase):
    url = "memory://"

    def new_broker(self):
        return MemoryBroker()


class AmqpHostileMessageTests(HostileMessageScenarios, unittest.TestCase):
    def setUp(self):
        self.url = get_broker().url

    def new_broker(self):
        return None
