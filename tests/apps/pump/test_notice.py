"""Tests for ion.apps.pump.notice: sr3's v03 messages decode, check, encode and route like sr3's."""

import calendar
import glob
import json
import os

from twisted.trial import unittest

from ion.apps.pump.notice import (
    CONTENT_TYPE,
    REPORT_CODES,
    TOPIC_MAX_BYTES,
    InvalidNotice,
    Notice,
    format_time,
    parse_time,
    topic_for,
)

DATA = os.path.join(os.path.dirname(__file__), "data")
FIXTURES = sorted(glob.glob(os.path.join(DATA, "sr3_*.json")))

SHA512 = "x+yPlVLy1WxQ144v7dshcOnDB5tRea65lzC4vcHvgoopeW9Ay913tZWEoCWc20YXIb0I0TK76XU706vG4C9gLw=="
MD5 = "1B2M2Y8AsgTpgAmY7PhCfg=="
T0 = calendar.timegm((2026, 11, 23, 18, 39, 35))
DELETE = object()


def load(name):
    with open(os.path.join(DATA, name)) as f:
        return json.load(f)


def base_fields():
    return dict(load("sr3_file_message_1.json")["body"])


class ReferenceMessageTests(unittest.SynchronousTestCase):
    """Every message recorded from a real sr3 3.3.1 `sr3 post` is understood as sr3 meant it."""

    def test_fixtures_present(self):
        """The interop tests below really run on the recorded messages."""
        self.assertEqual(len(FIXTURES), 4)

    def test_decode_and_validate(self):
        """The raw bodies sr3 put on the wire decode to the recorded JSON objects and validate."""
        for path in FIXTURES:
            with open(path) as f:
                fixture = json.load(f)
            notice = Notice.from_json(fixture["body_raw"].encode("utf-8"))
            self.assertIs(notice.validate(), notice)
            self.assertEqual(notice.to_dict(), fixture["body"], path)

    def test_round_trip(self):
        """to_json then from_json gives back exactly the same fields, for every message."""
        for path in FIXTURES:
            with open(path) as f:
                body = json.load(f)["body"]
            notice = Notice.from_dict(body)
            again = Notice.from_json(notice.to_json())
            self.assertEqual(again.to_dict(), body, path)
            self.assertEqual(again, notice)

    def test_unknown_fields_forwarded(self):
        """Fields ION does not know (sr3 extensions, future keys) survive decode and re-encode."""
        for path in FIXTURES:
            with open(path) as f:
                body = json.load(f)["body"]
            body["blocks"] = {"method": "inplace", "size": 1024, "count": 4, "number": 2}
            body["x-site"] = ["é", 1, None, {"deep": True}]
            again = Notice.from_json(Notice.from_dict(body).validate().to_json())
            self.assertEqual(again.to_dict(), body)

    def test_topic_is_sr3s_routing_key(self):
        """The routing key derived from relPath is the one sr3 published the message with."""
        for path in FIXTURES:
            with open(path) as f:
                fixture = json.load(f)
            notice = Notice.from_json(fixture["body_raw"])
            self.assertEqual(notice.topic(), fixture["routing_key"], path)

    def test_amqp_properties(self):
        """sr3 sends JSON bodies with our content type, persistent, with no application headers."""
        for path in FIXTURES:
            with open(path) as f:
                properties = json.load(f)["properties"]
            self.assertEqual(properties["content_type"], CONTENT_TYPE)
            self.assertEqual(properties["delivery_mode"], 2)
            self.assertEqual(properties["application_headers"], {})

    def test_file_message_fields(self):
        """The properties expose a file announcement's fields with their wire values."""
        notice = Notice.from_json(load("sr3_file_message_1.json")["body_raw"])
        self.assertEqual(notice.rel_path, "d00/f000000.dat")
        self.assertEqual(notice.base_url, "http://127.0.0.1:56821/")
        self.assertEqual(notice.size, 4096)
        self.assertEqual(notice.mode, "644")
        self.assertEqual(notice.source, "guest")
        self.assertEqual(notice.identity["method"], "sha512")
        self.assertEqual(notice.pub_time, "20261123T184037.266878605")
        self.assertIsNone(notice.file_op)
        self.assertEqual(notice.url(), "http://127.0.0.1:56821/d00/f000000.dat")
        self.assertAlmostEqual(parse_time(notice.mtime), T0 + 0.00977921486, places=6)

    def test_directory_message_fields(self):
        """sr3 announces directories with fileOp directory and contentType text/directory."""
        notice = Notice.from_json(load("sr3_dir_message.json")["body_raw"])
        self.assertEqual(notice.file_op, {"directory": ""})
        self.assertEqual(notice.content_type, "text/directory")
        self.assertEqual(notice.mode, "755")
        self.assertIsNone(notice.size)


class TimeTests(unittest.SynchronousTestCase):
    """Times in sr3's format read correctly, including sr3's odd fractions; ours are plain."""

    ACCEPTED = (
        ("20261123T183935", T0),
        ("20261123T183935.5", T0 + 0.5),
        ("20261123T183935.267355442", T0 + 0.267355442),
        ("20261123T183935.00977921486", T0 + 0.00977921486),
        ("20261123T183935.000123456789", T0 + 0.000123456789),
        # sr3 writes '%.9g' of the fraction minus its first character; read it as sr3 does.
        ("20261123T183935.23977661e-05", T0 + 0.23977661e-05),
        ("20261123T183935.5E-07", T0 + 0.5e-07),
        ("19700101T000000", 0.0),
        ("20240229T120000", calendar.timegm((2024, 2, 29, 12, 0, 0))),
    )

    REJECTED = (
        ("2026-11-23T18:39:35", "is not a time of the form YYYYMMDDTHHMMSS[.fraction] (UTC)"),
        ("20261123183935", "is not a time of the form"),
        ("20261123T183935.", "is not a time of the form"),
        ("20261123T183935Z", "is not a time of the form"),
        ("20261123T183935.5Z", "is not a time of the form"),
        ("20261123T183935.e-05", "is not a time of the form"),
        ("20261123T183935.5e+05", "is not a time of the form"),
        ("20261123T183935.1234567890123456", "is not a time of the form"),
        (" 20261123T183935", "is not a time of the form"),
        ("２０２６1123T183935", "is not a time of the form"),
        ("20261323T183935", "is not a valid date and time (month must be in 1..12)"),
        ("20250229T000000", "is not a valid date and time (day is out of range for month)"),
        ("20261123T246000", "is not a valid date and time (hour must be in 0..23)"),
        (20261123, "is not a time of the form"),
        ("", "is not a time of the form"),
    )

    def test_accepted(self):
        """Every form sr3 emits (0 to 12 fraction digits, exponent form) parses to the epoch."""
        for text, expected in self.ACCEPTED:
            self.assertAlmostEqual(parse_time(text), expected, places=6, msg=text)

    def test_rejected(self):
        """Anything else is refused with the expected form in the message."""
        for text, reason in self.REJECTED:
            with self.assertRaises(ValueError, msg=text) as caught:
                parse_time(text)
            self.assertIn(reason, str(caught.exception), text)

    def test_format(self):
        """format_time writes UTC with at most 9 fraction digits, none when the time is whole."""
        self.assertEqual(format_time(0), "19700101T000000")
        self.assertEqual(format_time(1.5), "19700101T000001.5")
        self.assertEqual(format_time(T0 + 0.25), "20261123T183935.25")
        self.assertEqual(format_time(-0.5), "19691231T235959.5")
        self.assertEqual(format_time(0.9999999999), "19700101T000001")

    def test_format_parse_round_trip(self):
        """A formatted time parses back to the same instant (within float precision)."""
        for epoch in (0.0, 1.0, T0, T0 + 0.266878605, T0 + 2.2e-05, 4102444799.999999):
            self.assertAlmostEqual(parse_time(format_time(epoch)), epoch, places=6)

    def test_format_refuses_non_finite(self):
        """NaN and infinities are programming errors, not times."""
        for value in (float("nan"), float("inf")):
            self.assertRaises(ValueError, format_time, value)


class ValidationTests(unittest.SynchronousTestCase):
    """A malformed message is refused with one line naming the field, so a 417 report says why."""

    def check(self, fields, reason):
        with self.assertRaises(InvalidNotice) as caught:
            Notice.from_dict(fields).validate()
        self.assertEqual(str(caught.exception), reason)
        self.assertNotIn("\n", str(caught.exception))
        self.assertEqual(caught.exception.code, 417)
        self.assertTrue(reason.startswith(caught.exception.field + ": "))

    def mutated(self, **changes):
        fields = base_fields()
        for key, value in changes.items():
            if value is DELETE:
                del fields[key]
            else:
                fields[key] = value
        return fields

    BAD = (
        ({"pubTime": DELETE}, "pubTime: missing"),
        ({"baseUrl": DELETE}, "baseUrl: missing"),
        ({"relPath": DELETE}, "relPath: missing"),
        ({"relPath": ""}, "relPath: must be a non-empty string, got ''"),
        ({"baseUrl": 5}, "baseUrl: must be a non-empty string, got 5"),
        ({"baseUrl": "//host/"}, "baseUrl: '//host/' is not a URL (no scheme such as http:)"),
        (
            {"pubTime": "yesterday"},
            "pubTime: 'yesterday' is not a time of the form YYYYMMDDTHHMMSS[.fraction] (UTC)",
        ),
        (
            {"pubTime": "20261123T18393"},
            "pubTime: '20261123T18393' is not a time of the form YYYYMMDDTHHMMSS[.fraction] (UTC)",
        ),
        (
            {"mtime": "20261131T000000"},
            "mtime: '20261131T000000' is not a valid date and time (day is out of range for month)",
        ),
        (
            {"atime": 1700000000},
            "atime: 1700000000 is not a time of the form YYYYMMDDTHHMMSS[.fraction] (UTC)",
        ),
        (
            {"identity": "sha512"},
            "identity: must be an object {method, value}, got 'sha512'",
        ),
        (
            {"identity": {"method": "sha1", "value": SHA512}},
            "identity.method: 'sha1' is not one of arbitrary, cod, md5, random, sha512",
        ),
        (
            {"identity": {"method": "sha512"}},
            "identity.value: must be a non-empty string, got None",
        ),
        (
            {"identity": {"method": "sha512", "value": "not base64!"}},
            "identity.value: not base64: 'not base64!'",
        ),
        (
            {"identity": {"method": "sha512", "value": MD5}},
            "identity.value: a sha512 digest is 64 bytes, this one is 16",
        ),
        (
            {"identity": {"method": "md5", "value": SHA512}},
            "identity.value: a md5 digest is 16 bytes, this one is 64",
        ),
        (
            {"identity": {"method": "cod", "value": "sha1"}},
            "identity.value: cod names the checksum to compute: one of md5, sha512, got 'sha1'",
        ),
        ({"size": -1}, "size: must be a non-negative integer, got -1"),
        ({"size": "4096"}, "size: must be a non-negative integer, got '4096'"),
        ({"size": 1.5}, "size: must be a non-negative integer, got 1.5"),
        ({"size": True}, "size: must be a non-negative integer, got True"),
        ({"mode": 644}, "mode: must be an octal string such as '644', got 644"),
        ({"mode": "0o644"}, "mode: must be an octal string such as '644', got '0o644'"),
        ({"mode": "rw-r--r--"}, "mode: must be an octal string such as '644', got 'rw-r--r--'"),
        ({"mode": "68"}, "mode: must be an octal string such as '644', got '68'"),
        ({"fileOp": "remove"}, "fileOp: must be an object, got 'remove'"),
        (
            {"fileOp": {}},
            (
                "fileOp: keys [] are not one of the known shapes {link}, {hlink}, {rename}, "
                "{remove}, {directory}, {directory+remove}, {directory+rename}, {link+rename}"
            ),
        ),
        (
            {"fileOp": {"delete": ""}},
            (
                "fileOp: keys ['delete'] are not one of the known shapes {link}, {hlink}, "
                "{rename}, {remove}, {directory}, {directory+remove}, {directory+rename}, "
                "{link+rename}"
            ),
        ),
        (
            {"fileOp": {"link": "a", "remove": ""}},
            (
                "fileOp: keys ['link', 'remove'] are not one of the known shapes {link}, "
                "{hlink}, {rename}, {remove}, {directory}, {directory+remove}, "
                "{directory+rename}, {link+rename}"
            ),
        ),
        ({"fileOp": {"link": ""}}, "fileOp.link: must name a path, got ''"),
        ({"fileOp": {"rename": None}}, "fileOp.rename: must be a string, got None"),
        ({"fileOp": {"remove": 1}}, "fileOp.remove: must be a string, got 1"),
        (
            {"content": "hello"},
            "content: must be an object {encoding, value}, got 'hello'",
        ),
        (
            {"content": {"encoding": "latin-1", "value": "x"}},
            "content.encoding: 'latin-1' is not one of base64, utf-8",
        ),
        (
            {"content": {"encoding": "base64", "value": "%%%"}},
            "content.value: not base64: '%%%'",
        ),
        (
            {"content": {"encoding": "utf-8", "value": "hello"}},
            "content.value: holds 5 bytes but size says 4096",
        ),
        ({"source": ["guest"]}, "source: must be a string, got ['guest']"),
        ({"to_clusters": 3}, "to_clusters: must be a string, got 3"),
        ({"contentType": None}, "contentType: must be a string, got None"),
        (
            {"report": {"code": 999, "timeCompleted": "20261123T183935", "message": "x"}},
            "report.code: must be an HTTP-like integer code, got 999",
        ),
        (
            {"report": {"code": 201, "message": "x"}},
            "report.timeCompleted: missing",
        ),
        (
            {"report": {"code": 201, "timeCompleted": "now", "message": "x"}},
            (
                "report.timeCompleted: 'now' is not a time of the form "
                "YYYYMMDDTHHMMSS[.fraction] (UTC)"
            ),
        ),
        (
            {"report": {"code": 201, "timeCompleted": "20261123T183935"}},
            "report.message: must be a string, got None",
        ),
    )

    def test_invalid_messages(self):
        """Each bad field gives its own one-line reason starting with the field's name."""
        for changes, reason in self.BAD:
            self.check(self.mutated(**changes), reason)

    def test_long_values_shortened(self):
        """A huge bad value does not make a huge reason."""
        with self.assertRaises(InvalidNotice) as caught:
            Notice.from_dict(self.mutated(mode="7" * 10000)).validate()
        self.assertLess(len(str(caught.exception)), 120)

    GOOD = (
        {"mtime": "20261123T183935.23977661e-05", "atime": "20261123T183935"},
        {"identity": {"method": "md5", "value": MD5}},
        {"identity": {"method": "cod", "value": "sha512"}},
        {"identity": {"method": "arbitrary", "value": "site-specific value"}},
        {"identity": {"method": "random", "value": "Zm9v"}},
        {"mode": "4755"},
        {"mode": "0"},
        {"size": 0, "content": {"encoding": "utf-8", "value": ""}},
        {"size": 6, "content": {"encoding": "utf-8", "value": "héllo"}},
        {"size": 3, "content": {"encoding": "base64", "value": "AP8A"}},
        {"fileOp": {"link": "../target"}},
        {"fileOp": {"hlink": "d00/other.dat"}},
        {"fileOp": {"rename": "d00/old.dat"}},
        {"fileOp": {"remove": ""}},
        {"fileOp": {"directory": ""}},
        {"fileOp": {"remove": "", "directory": ""}},
        {"fileOp": {"rename": "old", "directory": ""}},
        {"fileOp": {"rename": "old", "link": "target"}},
        {"retrievePath": "get?id=1", "from_cluster": "c1", "to_clusters": "c2,c3"},
        {"report": {"code": 201, "timeCompleted": "20261123T183935.1", "message": "ok"}},
    )

    def test_valid_variants(self):
        """Every documented shape of the optional fields is accepted."""
        for changes in self.GOOD:
            Notice.from_dict(self.mutated(**changes)).validate()

    def test_legacy_names(self):
        """Older sr3 names (integrity, retPath) are read as identity and retrievePath."""
        fields = base_fields()
        fields["integrity"] = fields.pop("identity")
        fields["retPath"] = "other/path"
        notice = Notice.from_dict(fields).validate()
        self.assertEqual(notice.identity["method"], "sha512")
        self.assertEqual(notice.retrieve_path, "other/path")
        self.assertNotIn("integrity", notice)
        self.assertNotIn("retPath", notice)


class DecodeTests(unittest.SynchronousTestCase):
    """Bytes that are not a JSON object of sane size are refused before anything looks inside."""

    def check(self, data, reason, **kwargs):
        with self.assertRaises(InvalidNotice) as caught:
            Notice.from_json(data, **kwargs)
        self.assertEqual(caught.exception.field, "message")
        self.assertIn(reason, str(caught.exception))

    def test_not_json(self):
        """Garbage gives the JSON parser's position."""
        self.check(b"{not json", "message: not JSON (Expecting property name")

    def test_not_an_object(self):
        """A JSON list or string is not a message."""
        self.check(b"[1, 2]", "message: expected a JSON object, got list")
        self.check('"pubTime"', "message: expected a JSON object, got str")

    def test_bad_utf8(self):
        """Bytes that are not UTF-8 are refused with the offset."""
        self.check(b'{"relPath": "\xff"}', "message: not valid UTF-8 (byte 13)")

    def test_too_big(self):
        """The size limit applies before decoding, for bytes and str alike."""
        self.check(b"{}" + b" " * 100, "message: 102 bytes is over the limit of 100", max_bytes=100)
        self.check("{}" + "é" * 50, "message: 102 bytes is over the limit of 100", max_bytes=100)
        self.assertEqual(Notice.from_json(b"{}" + b" " * 98, max_bytes=100).to_dict(), {})

    def test_non_standard_constants(self):
        """NaN and Infinity are not JSON; Python's parser would accept them, we do not."""
        self.check(b'{"size": NaN}', "NaN is not a JSON value")
        self.check(b'{"size": -Infinity}', "-Infinity is not a JSON value")

    def test_deep_nesting(self):
        """A deeply nested body is refused, not a crash."""
        self.check(
            b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}", "message: JSON nested too deeply"
        )


class EncodeTests(unittest.SynchronousTestCase):
    """What we publish is compact UTF-8 JSON that keeps the original key order."""

    def test_compact_utf8(self):
        """No spaces after separators; non-ASCII characters written as UTF-8, not escapes."""
        notice = Notice.from_dict({"pubTime": "20261123T183935", "relPath": "été/f", "n": 1})
        self.assertEqual(
            notice.to_json(), '{"pubTime":"20261123T183935","relPath":"été/f","n":1}'.encode()
        )

    def test_lone_surrogate(self):
        """A lone surrogate (legal as a JSON escape) is written escaped and decodes the same."""
        notice = Notice.from_json(b'{"relPath": "a\\ud800b"}')
        data = notice.to_json()
        data.decode("ascii")
        self.assertEqual(Notice.from_json(data), notice)

    def test_from_dict_copies(self):
        """A Notice does not share structure with the dict it was built from."""
        fields = base_fields()
        notice = Notice.from_dict(fields)
        fields["identity"]["method"] = "md5"
        self.assertEqual(notice.identity["method"], "sha512")
        copied = notice.to_dict()
        copied["identity"]["method"] = "md5"
        self.assertEqual(notice.identity["method"], "sha512")


class AccessTests(unittest.SynchronousTestCase):
    """Known fields read and write through properties, any field through item access."""

    def test_properties_write_wire_keys(self):
        """Setting a property writes its camelCase key; setting None removes it."""
        notice = Notice.from_dict(base_fields())
        notice.source = "alice"
        notice.file_op = {"remove": ""}
        notice.retrieve_path = "x/y"
        self.assertEqual(notice["source"], "alice")
        self.assertEqual(notice["fileOp"], {"remove": ""})
        self.assertEqual(notice["retrievePath"], "x/y")
        notice.size = None
        self.assertNotIn("size", notice)
        self.assertIsNone(notice.size)

    def test_item_access(self):
        """Unknown fields are reachable by key."""
        notice = Notice.from_dict(base_fields())
        notice["x-custom"] = 1
        self.assertEqual(notice.get("x-custom"), 1)
        self.assertIsNone(notice.get("absent"))
        del notice["x-custom"]
        self.assertNotIn("x-custom", notice)

    def test_url_joins_with_one_slash(self):
        """url() never doubles or drops the slash between baseUrl and the path."""
        cases = [
            ("http://h/", "a/b", "http://h/a/b"),
            ("http://h", "a/b", "http://h/a/b"),
            ("http://h/", "/a/b", "http://h/a/b"),
            ("http://h", "/a/b", "http://h/a/b"),
            ("sftp://u@h/data", "a b/c", "sftp://u@h/data/a b/c"),
        ]
        for base, path, expected in cases:
            notice = Notice.from_dict({"baseUrl": base, "relPath": path})
            self.assertEqual(notice.url(), expected)

    def test_url_prefers_retrieve_path(self):
        """When retrievePath is present the file is fetched from there, as sr3 does."""
        notice = Notice.from_dict(base_fields())
        notice.retrieve_path = "/cgi/get?f=000"
        self.assertEqual(notice.url(), "http://127.0.0.1:56821/cgi/get?f=000")

    def test_url_needs_fields(self):
        """Without baseUrl there is no URL: the reason names the field."""
        with self.assertRaises(InvalidNotice) as caught:
            Notice.from_dict({"relPath": "a"}).url()
        self.assertEqual(str(caught.exception), "baseUrl: missing")


class TopicTests(unittest.SynchronousTestCase):
    """Routing keys match sr3's, so bindings written for an sr3 pump work on ION unchanged."""

    TABLE = (
        ("d00/f000000.dat", "v03.d00"),
        ("d09", "v03"),
        ("", "v03"),
        ("a/b/c/file.txt", "v03.a.b.c"),
        ("/a/b/file.txt", "v03.a.b"),
        ("a/b#c/f", "v03.a.b%23c"),
        ("a/*/f", "v03.a.%22"),
        ("#/*/f", "v03.%23.%22"),
        ("x#y*z/f#*", "v03.x%23y%22z"),
        ("a.b/c/f", "v03.a.b.c"),
        ("données/été/f", "v03.données.été"),
        ("a b/c%20d/f", "v03.a b.c%20d"),
    )

    def test_table(self):
        """Directories become words; the file name is not in the key; # and * are escaped."""
        for rel_path, topic in self.TABLE:
            self.assertEqual(topic_for(rel_path), topic, rel_path)

    def test_prefix(self):
        """The prefix is configurable (sr3's topicPrefix)."""
        self.assertEqual(topic_for("a/b/f", prefix="v03.post"), "v03.post.a.b")
        self.assertEqual(Notice.from_dict({"relPath": "a/f"}).topic("v02.post"), "v02.post.a")

    def test_limit_at_word_boundary(self):
        """Over 255 bytes, whole trailing words are dropped: the key stays a prefix of the full one."""
        rel_path = "/".join(f"dir{i:04d}" for i in range(100)) + "/file"
        topic = topic_for(rel_path)
        full = "v03." + ".".join(f"dir{i:04d}" for i in range(100))
        self.assertLessEqual(len(topic.encode()), TOPIC_MAX_BYTES)
        self.assertTrue(full.startswith(topic + "."))
        self.assertGreater(len(topic.encode()), TOPIC_MAX_BYTES - len(".dir0000"))

    def test_limit_exact(self):
        """A key of exactly 255 bytes is kept whole; one more byte drops the last word."""
        word = "w" * (TOPIC_MAX_BYTES - len("v03.") - len(".x"))
        self.assertEqual(topic_for(f"{word}/x/f"), f"v03.{word}.x")
        self.assertEqual(len(topic_for(f"{word}/x/f").encode()), 255)
        self.assertEqual(topic_for(f"{word}/xy/f"), f"v03.{word}")

    def test_limit_counts_utf8_bytes(self):
        """The limit is in bytes: 200 'é' are 400 bytes, so that word cannot fit at all."""
        self.assertEqual(topic_for("a/" + "é" * 200 + "/b/f"), "v03.a")
        self.assertEqual(topic_for("é" * 125 + "/f"), "v03." + "é" * 125)

    def test_escapes_count_toward_limit(self):
        """The limit applies to the escaped words that go on the wire (each # is 3 bytes)."""
        self.assertEqual(topic_for("#" * 83 + "/f"), "v03." + "%23" * 83)
        self.assertEqual(topic_for("#" * 83 + "/#/f"), "v03." + "%23" * 83)
        self.assertEqual(topic_for("#" * 84 + "/f"), "v03")

    def test_prefix_too_long(self):
        """A prefix that alone breaks the limit is a configuration error."""
        self.assertRaises(ValueError, topic_for, "a/f", prefix="p" * 256)


class ReportTests(unittest.SynchronousTestCase):
    """Reports are copies of the message with report {code, timeCompleted, message} added."""

    def test_with_report(self):
        """The copy carries the report; the original message is not changed."""
        notice = Notice.from_dict(base_fields())
        reported = notice.with_report(201, "delivered to /data/d00", time=T0 + 0.5)
        self.assertEqual(
            reported.report,
            {
                "code": 201,
                "timeCompleted": "20261123T183935.5",
                "message": "delivered to /data/d00",
            },
        )
        self.assertIsNone(notice.report)
        self.assertEqual(reported.rel_path, notice.rel_path)
        reported.validate()

    def test_unknown_code(self):
        """A code outside the table is a programming error."""
        with self.assertRaises(ValueError) as caught:
            Notice.from_dict(base_fields()).with_report(299, "??", T0)
        self.assertIn("unknown report code 299", str(caught.exception))

    def test_code_table(self):
        """The codes of DESIGN section 8, each with a short meaning."""
        self.assertEqual(
            sorted(REPORT_CODES),
            [201, 202, 205, 206, 304, 404, 406, 410, 413, 417, 422, 425, 499, 500, 503, 504],
        )
        self.assertEqual(REPORT_CODES[201], "delivered")
        self.assertEqual(REPORT_CODES[417], "invalid message")
        self.assertEqual(REPORT_CODES[422], "unusable path")
        self.assertEqual(REPORT_CODES[499], "transfer failed")
