"""v03 notification messages: decode, check, encode, and derive their AMQP routing key.

A L{Notice} keeps the whole JSON object as a dict, so fields ION does not know about travel on
unchanged; properties give snake_case access to the known camelCase keys. Decoding
(L{Notice.from_json}) only checks that the bytes are a JSON object of acceptable size;
L{Notice.validate} then checks the known fields and raises L{InvalidNotice} naming the first
bad one. The two steps are separate so a consumer can still build a 417 report (which needs
the message's relPath and source) for a message that fails validation.

Times are C{YYYYMMDDTHHMMSS[.fraction]} in UTC. sr3 writes the fraction as C{'%.9g' % (t % 1)}
minus its first character, so it has 0 to 12 digits and, when the fraction is below 1e-4, an
exponent whose leading digit has been cut off (C{20261123T183935.23977661e-05}). L{parse_time}
reads every form the way sr3 reads it back, as C{0.} + the fraction text (for the exponent form
that is off by less than 1e-4 s); L{format_time} writes a plain fraction of at most 9 digits.

Routing keys (L{topic_for}): the prefix, then one word per directory of relPath (the file name
is not part of the key), joined with dots. Like sr3, C{#} is written C{%23} and C{*} is written
C{%22} (sic: sr3's choice, kept so keys match), and a dot inside a directory name is left alone,
so C{a.b/f} gives C{v03.a.b} exactly as sr3 does. A key longer than 255 bytes (the AMQP limit)
loses whole words from its end, never part of one, so it stays a valid, coarser key that
bindings such as C{v03.a.#} still match (sr3 cuts at the byte limit, splitting the last word).

A file bigger than a poster's C{block_size} is announced in blocks (L{block_notices}), the way
sr3 3.x posts with C{blocksize}: one notice per block, each with the file's other fields, its
own C{size} and C{identity} (the block's), and C{blocks: {method: 'inplace', size: <block
size>, number: <n>, manifest: {'<i>': {size, identity}}}}, the manifest naming every block of
the file (C{identity} there is the block's identity value). Every block but the last has the
block size; a consumer fetches block C{n} at offset C{n * size}.
"""

import base64
import binascii
import calendar
import copy
import datetime
import json
import math
import re
import time

CONTENT_TYPE = "application/json"
MAX_NOTICE_BYTES = 1024 * 1024
TOPIC_MAX_BYTES = 255

REPORT_CODES = {
    201: "delivered",
    202: "accepted (no-op)",
    205: "checksum recomputed",
    206: "partial block",
    304: "not modified (duplicate or same checksum)",
    404: "rejected by filter",
    406: "not acceptable (too old or mtime not newer)",
    410: "gone upstream",
    413: "too large",
    417: "invalid message",
    422: "unusable path",
    425: "too early",
    499: "transfer failed",
    500: "local failure",
    503: "unavailable",
    504: "message too old",
}

IDENTITY_METHODS = ("arbitrary", "cod", "md5", "random", "sha512")
DIGEST_BYTES = {"md5": 16, "sha512": 64}
CONTENT_ENCODINGS = ("base64", "utf-8")

# fileOp key sets accepted: the single operations, a directory removal, and a rename of a
# directory or of a symbolic link (the old name plus what the new entry is), as sr3 reads them.
FILE_OP_SHAPES = (
    frozenset(["link"]),
    frozenset(["hlink"]),
    frozenset(["rename"]),
    frozenset(["remove"]),
    frozenset(["directory"]),
    frozenset(["remove", "directory"]),
    frozenset(["rename", "directory"]),
    frozenset(["rename", "link"]),
)
_FILE_OP_TARGETS = ("link", "hlink", "rename")

# Older sr3 releases used these names; they are read as the current ones.
_LEGACY_KEYS = {"integrity": "identity", "retPath": "retrievePath"}

_TIME = re.compile(
    r"(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})(?:\.(\d{1,15})(?:[eE](-\d{1,3}))?)?", re.ASCII
)
# What _TIME matches with a valid time of day (no leap second): on a date parse_time
# accepted, a time parse_time accepts, told without a calendar or captured groups.
_TIME_FAST = re.compile(
    r"\d{8}T(?:[01]\d|2[0-3])[0-5]\d[0-5]\d(?:\.\d{1,15}(?:[eE]-\d{1,3})?)?", re.ASCII
)
_TIME_FORM = "YYYYMMDDTHHMMSS[.fraction] (UTC)"
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:", re.ASCII)
_MODE = re.compile(r"[0-7]{1,4}", re.ASCII)
_TOPIC_ESCAPES = {"#": "%23", "*": "%22"}
# A file is announced in at most this many blocks: ION's consumers take no more (the same
# limit as L{ion.apps.pump.transfer.blocks.MAX_BLOCKS}, which a test checks).
MAX_BLOCKS = 1024


class InvalidNotice(ValueError):
    """A notification message is malformed; C{str()} is one line starting with the field name."""

    code = 417

    def __init__(self, field, problem):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def _show(value, limit=60):
    """A one-line, bounded repr of a value for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_YEAR_10000 = 253402300800  # seconds since the epoch


def format_time(epoch):
    """Seconds since the epoch -> C{YYYYMMDDTHHMMSS[.fraction]} in UTC (fraction up to 9 digits)."""
    if not math.isfinite(epoch):
        raise ValueError(f"cannot format {epoch!r} as a time")
    whole = math.floor(epoch)
    nanos = round((epoch - whole) * 1_000_000_000)
    if nanos == 1_000_000_000:
        whole, nanos = whole + 1, 0
    if 0 <= whole < _YEAR_10000:
        # A fraction of the cost of datetime arithmetic, which the other years need.
        year, month, day, hour, minute, second = time.gmtime(whole)[:6]
    else:
        when = datetime.datetime(1970, 1, 1) + datetime.timedelta(seconds=whole)
        year, month, day = when.year, when.month, when.day
        hour, minute, second = when.hour, when.minute, when.second
    stamp = f"{year:04d}{month:02d}{day:02d}T{hour:02d}{minute:02d}{second:02d}"
    fraction = f"{nanos:09d}".rstrip("0")
    return f"{stamp}.{fraction}" if fraction else stamp


def parse_time(text):
    """C{YYYYMMDDTHHMMSS[.fraction]} (UTC, sr3's exponent form included) -> seconds since the epoch.

    Raises ValueError naming the expected form.
    """
    match = _TIME.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"{_show(text)} is not a time of the form {_TIME_FORM}")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    try:
        datetime.datetime(year, month, day, hour, minute, second)
    except ValueError as e:
        raise ValueError(f"{_show(text)} is not a valid date and time ({e})") from None
    whole = calendar.timegm((year, month, day, hour, minute, second))
    digits, exponent = match.group(7), match.group(8)
    if digits is None:
        return float(whole)
    return whole + float(f"0.{digits}" + (f"e{exponent}" if exponent else ""))


def topic_for(rel_path, prefix="v03"):
    """The AMQP routing key for a file at C{rel_path}: prefix + its directories, at most 255 bytes.

    See the module docstring for the escaping and truncation rules.
    """
    limit = TOPIC_MAX_BYTES - len(prefix.encode("utf-8"))
    if limit < 0:
        raise ValueError(f"topic prefix {_show(prefix)} is longer than {TOPIC_MAX_BYTES} bytes")
    words = [prefix]
    for directory in rel_path.lstrip("/").split("/")[:-1]:
        word = "".join(_TOPIC_ESCAPES.get(c, c) for c in directory)
        limit -= 1 + len(word.encode("utf-8"))
        if limit < 0:
            break
        words.append(word)
    return ".".join(words)


def block_step(size, block_size):
    """The block size a file of C{size} bytes is announced in, given a poster's
    C{block_size}: None (one whole-file notice) when C{block_size} is None or the file is not
    bigger than it; else C{block_size}, grown when needed so the file has at most
    L{MAX_BLOCKS} blocks."""
    if block_size is None or size is None or size <= block_size:
        return None
    return max(block_size, -(-size // MAX_BLOCKS))


def block_lengths(size, step):
    """The length of each block of a file of C{size} bytes in blocks of C{step}."""
    return [min(step, size - offset) for offset in range(0, size, step)]


def block_notices(fields, step, blocks):
    """
    The notice fields announcing a file in blocks, one dict per block, as sr3 3.x writes them
    (see the module docstring).

    @param fields: the file's notice fields (C{pubTime}, C{baseUrl}, C{relPath}, C{mtime},
        C{mode}, C{identity}...); their C{size} and C{identity} are replaced by each block's.
    @param step: the block size (L{block_step}).
    @param blocks: C{[(length, identity value)]} of each block, in order; an identity value
        of None keeps the file's identity (a poll's C{cod}: no checksum is known) and puts
        its value in the manifest.
    @return: a list of new dicts (C{fields} is not changed); they share one manifest, which
        nobody may change (a file of many blocks would otherwise cost the square of their
        count).
    """
    identity = fields.get("identity")
    method = identity.get("method") if isinstance(identity, dict) else None
    manifest = {}
    for number, (length, value) in enumerate(blocks):
        if value is None and isinstance(identity, dict):
            value = identity.get("value")
        manifest[str(number)] = {"size": length, "identity": value}
    notices = []
    for number, (length, value) in enumerate(blocks):
        one = _copy_fields(fields)
        one["size"] = length
        if value is not None and method is not None:
            one["identity"] = {"method": method, "value": value}
        one["blocks"] = {
            "method": "inplace", "size": step, "number": number,
            "manifest": manifest,
        }
        notices.append(one)
    return notices


class _Field:
    """A Notice property for one top-level key; reads None when absent, assigning None removes it."""

    def __init__(self, key):
        self.key = key
        self.__doc__ = f"The `{key}` field (None when absent)."

    def __get__(self, notice, owner=None):
        if notice is None:
            return self
        return notice._fields.get(self.key)

    def __set__(self, notice, value):
        if value is None:
            notice._fields.pop(self.key, None)
        else:
            notice._fields[self.key] = value


def _copy_fields(value):
    """A deep copy of JSON-like data (dicts, lists, scalars), faster than copy.deepcopy;
    anything else goes through copy.deepcopy."""
    kind = type(value)
    if kind is dict:
        return {key: _copy_fields(item) for key, item in value.items()}
    if kind is list:
        return [_copy_fields(item) for item in value]
    if kind in (str, int, float, bool) or value is None:
        return value
    return copy.deepcopy(value)


class Notice:
    """One v03 notification message: the decoded JSON object plus typed views of known fields.

    Build one with L{from_json} (bytes off the wire) or L{from_dict}; C{Notice(fields)} adopts the
    given dict without copying. Item access (C{notice["anyKey"]}) reaches every field.
    """

    __slots__ = ("_fields",)
    __hash__ = None

    pub_time = _Field("pubTime")
    base_url = _Field("baseUrl")
    rel_path = _Field("relPath")
    retrieve_path = _Field("retrievePath")
    identity = _Field("identity")
    size = _Field("size")
    mtime = _Field("mtime")
    atime = _Field("atime")
    mode = _Field("mode")
    file_op = _Field("fileOp")
    content = _Field("content")
    content_type = _Field("contentType")
    source = _Field("source")
    from_cluster = _Field("from_cluster")
    to_clusters = _Field("to_clusters")
    report = _Field("report")

    def __init__(self, fields):
        self._fields = fields

    @classmethod
    def from_dict(cls, fields):
        """A Notice holding a deep copy of C{fields} (legacy sr3 key names read as current ones)."""
        return cls._adopt(copy.deepcopy(fields))

    @classmethod
    def _adopt(cls, fields):
        """A Notice owning C{fields} (nobody else holds it), legacy key names renamed in place."""
        if not isinstance(fields, dict):
            raise InvalidNotice("message", f"expected a JSON object, got {type(fields).__name__}")
        if "integrity" in fields or "retPath" in fields:
            for old, new in _LEGACY_KEYS.items():
                if old in fields and new not in fields:
                    fields[new] = fields.pop(old)
        return cls(fields)

    @classmethod
    def from_json(cls, data, max_bytes=MAX_NOTICE_BYTES):
        """Decode a message body (bytes or str) into a Notice; call L{validate} to check its fields.

        Raises InvalidNotice (field C{message}) for oversized input, bad UTF-8, bad JSON, the
        non-standard constants NaN/Infinity, or anything but a JSON object.
        """
        if isinstance(data, str):
            size = len(data.encode("utf-8", "surrogatepass"))
        else:
            if type(data) is not bytes:
                data = bytes(data)
            size = len(data)
        if size > max_bytes:
            raise InvalidNotice("message", f"{size} bytes is over the limit of {max_bytes}")
        if isinstance(data, bytes):
            try:
                data = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InvalidNotice("message", f"not valid UTF-8 (byte {e.start})") from None
        try:
            # The decoder's scanner at once: a message is one object with nothing around it.
            # Anything else (whitespace, errors) goes through decode, which says what is wrong.
            fields, end = _SCAN(data, 0)
            if end != len(data):
                fields = _DECODER.decode(data)
        except RecursionError:
            raise InvalidNotice("message", "JSON nested too deeply") from None
        except (ValueError, StopIteration):
            try:
                fields = _DECODER.decode(data)
            except RecursionError:
                raise InvalidNotice("message", "JSON nested too deeply") from None
            except ValueError as e:
                raise InvalidNotice("message", f"not JSON ({e})") from None
        # Freshly decoded: nobody else holds these objects, so no copy is needed. The common
        # case (an object without legacy keys) is adopted as it is, without the call.
        if type(fields) is dict and "integrity" not in fields and "retPath" not in fields:
            return cls(fields)
        return cls._adopt(fields)

    def to_json(self):
        """The message as compact UTF-8 JSON bytes, keys in their original order."""
        try:
            return _ENCODER.encode(self._fields).encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate (legal in JSON text as an escape) cannot be written as UTF-8:
            # escape every non-ASCII character instead, which decodes to the same value.
            return _ASCII_ENCODER.encode(self._fields).encode("ascii")

    def to_dict(self):
        """A deep copy of every field of the message."""
        return _copy_fields(self._fields)

    def copy(self):
        """An independent copy of this Notice."""
        return Notice(_copy_fields(self._fields))

    def get(self, key, default=None):
        return self._fields.get(key, default)

    def __getitem__(self, key):
        return self._fields[key]

    def __setitem__(self, key, value):
        self._fields[key] = value

    def __delitem__(self, key):
        del self._fields[key]

    def __contains__(self, key):
        return key in self._fields

    def __eq__(self, other):
        if not isinstance(other, Notice):
            return NotImplemented
        return self._fields == other._fields

    def __repr__(self):
        return f"<Notice relPath={self.rel_path!r} pubTime={self.pub_time!r}>"

    def url(self):
        """Where to fetch the file: baseUrl joined with retrievePath when present, else relPath.

        The join puts exactly one C{/} between the two; nothing is percent-encoded.
        """
        fields = self._fields
        base, rel_path = fields.get("baseUrl"), fields.get("relPath")
        if type(base) is not str or type(rel_path) is not str or not base or not rel_path:
            for key in ("baseUrl", "relPath"):
                _require_string(fields, key)
        path = fields.get("retrievePath") or rel_path
        return base.removesuffix("/") + "/" + path.removeprefix("/")

    def topic(self, prefix="v03"):
        """The routing key to publish this message with (see L{topic_for})."""
        _require_string(self._fields, "relPath")
        return topic_for(self.rel_path, prefix)

    def with_report(self, code, message, time):
        """A copy of this message carrying C{report} {code, timeCompleted, message}.

        C{code} must be one of REPORT_CODES; C{time} is when it completed (seconds since the
        epoch, from the caller's clock). The copy is of the top level only (a report per
        delivered file is made, sent and dropped): set its fields, do not change the values
        it shares with this message in place.
        (Named L{with_report} because C{report} is the property holding a received report.)
        """
        if code not in REPORT_CODES:
            known = ", ".join(str(c) for c in REPORT_CODES)
            raise ValueError(f"unknown report code {code!r}; known codes are {known}")
        reported = Notice(dict(self._fields))
        reported._fields["report"] = {
            "code": code,
            "timeCompleted": format_time(time),
            "message": message,
        }
        return reported

    def validate(self):
        """Check every known field; return self, or raise InvalidNotice naming the first bad one."""
        fields = self._fields
        get = fields.get
        pub_time, base_url, rel_path = get("pubTime"), get("baseUrl"), get("relPath")
        if (
            type(pub_time) is not str or not pub_time
            or type(base_url) is not str or not base_url
            or type(rel_path) is not str or not rel_path
        ):
            for key in ("pubTime", "baseUrl", "relPath"):
                _require_string(fields, key)
        # The times' common case told here, without a call per time (see _check_time).
        if not (_TIME_FAST.fullmatch(pub_time) and pub_time[:8] in _VALID_DATES):
            _check_time(pub_time, "pubTime")
        if not _URL_SCHEME.match(base_url):
            raise InvalidNotice(
                "baseUrl", f"{_show(base_url)} is not a URL (no scheme such as http:)"
            )
        if "retrievePath" in fields:
            _require_string(fields, "retrievePath")
        if "identity" in fields:
            _check_identity(fields["identity"])
        if "size" in fields:
            size = fields["size"]
            if type(size) is not int or size < 0:
                raise InvalidNotice("size", f"must be a non-negative integer, got {_show(size)}")
        for key in ("mtime", "atime"):
            if key in fields:
                value = fields[key]
                if not (
                    type(value) is str and _TIME_FAST.fullmatch(value)
                    and value[:8] in _VALID_DATES
                ):
                    _check_time(value, key)
        if "mode" in fields:
            mode = fields["mode"]
            if not isinstance(mode, str) or not _MODE.fullmatch(mode):
                raise InvalidNotice(
                    "mode", f"must be an octal string such as '644', got {_show(mode)}"
                )
        if "fileOp" in fields:
            _check_file_op(fields["fileOp"])
        if "content" in fields:
            _check_content(fields["content"], fields.get("size"))
        for key in ("contentType", "source", "from_cluster", "to_clusters"):
            if key in fields and not isinstance(fields[key], str):
                raise InvalidNotice(key, f"must be a string, got {_show(fields[key])}")
        if "report" in fields:
            _check_report(fields["report"])
        return self


def _refuse_constant(name):
    raise ValueError(f"{name} is not a JSON value")


# One decoder for every message (json.loads builds a new one per call when given options).
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)
_SCAN = _DECODER.scan_once
# And one encoder of each kind (json.dumps with options builds one per call).
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_ASCII_ENCODER = json.JSONEncoder(separators=(",", ":"))


def _require_string(fields, key):
    if key not in fields:
        raise InvalidNotice(key, "missing")
    value = fields[key]
    if not isinstance(value, str) or not value:
        raise InvalidNotice(key, f"must be a non-empty string, got {_show(value)}")


def _require_object(field, value, shape=""):
    if not isinstance(value, dict):
        what = f"an object {shape}" if shape else "an object"
        raise InvalidNotice(field, f"must be {what}, got {_show(value)}")


def _check_time(value, field):
    # Fast path for the common case, a well-formed time on a date seen recently; anything
    # else goes through parse_time, which says what is wrong.
    if isinstance(value, str) and _TIME_FAST.fullmatch(value) and value[:8] in _VALID_DATES:
        return
    try:
        parse_time(value)
    except ValueError as e:
        raise InvalidNotice(field, str(e)) from None
    if len(_VALID_DATES) >= 4096:
        _VALID_DATES.clear()
    _VALID_DATES.add(value[:8])


# Dates (YYYYMMDD) that parse_time accepted: checking a time on one of them needs no calendar.
_VALID_DATES = set()


def _decode_base64(value):
    """The bytes of a standard base64 string, or None if it is not one."""
    if not isinstance(value, str):
        return None
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        return None


# The base64 text of an md5 or sha512 digest (16 or 64 bytes: 22 or 86 characters and '=='):
# what L{_check_identity} accepts for them, told without decoding.
_DIGEST_TEXT = {
    "md5": re.compile(r"[A-Za-z0-9+/]{22}==", re.ASCII),
    "sha512": re.compile(r"[A-Za-z0-9+/]{86}==", re.ASCII),
}


def _check_identity(identity):
    if type(identity) is dict:
        digest = _DIGEST_TEXT.get(identity.get("method"))
        value = identity.get("value")
        if digest is not None and type(value) is str and digest.fullmatch(value):
            return
    _require_object("identity", identity, "{method, value}")
    method, value = identity.get("method"), identity.get("value")
    if method not in IDENTITY_METHODS:
        raise InvalidNotice(
            "identity.method", f"{_show(method)} is not one of {', '.join(IDENTITY_METHODS)}"
        )
    if not isinstance(value, str) or not value:
        raise InvalidNotice("identity.value", f"must be a non-empty string, got {_show(value)}")
    if method == "cod":
        if value not in DIGEST_BYTES:
            raise InvalidNotice(
                "identity.value",
                f"cod names the checksum to compute: one of {', '.join(DIGEST_BYTES)}, "
                f"got {_show(value)}",
            )
    elif method in DIGEST_BYTES:
        digest = _decode_base64(value)
        if digest is None:
            raise InvalidNotice("identity.value", f"not base64: {_show(value)}")
        if len(digest) != DIGEST_BYTES[method]:
            raise InvalidNotice(
                "identity.value",
                f"a {method} digest is {DIGEST_BYTES[method]} bytes, this one is {len(digest)}",
            )


def _check_file_op(file_op):
    _require_object("fileOp", file_op)
    if frozenset(file_op) not in FILE_OP_SHAPES:
        shapes = ", ".join("{" + "+".join(sorted(s)) + "}" for s in FILE_OP_SHAPES)
        raise InvalidNotice(
            "fileOp", f"keys {sorted(file_op)} are not one of the known shapes {shapes}"
        )
    for key, value in file_op.items():
        if not isinstance(value, str):
            raise InvalidNotice(f"fileOp.{key}", f"must be a string, got {_show(value)}")
        if key in _FILE_OP_TARGETS and not value:
            raise InvalidNotice(f"fileOp.{key}", "must name a path, got ''")


def _check_content(content, size):
    _require_object("content", content, "{encoding, value}")
    encoding, value = content.get("encoding"), content.get("value")
    if encoding not in CONTENT_ENCODINGS:
        raise InvalidNotice(
            "content.encoding", f"{_show(encoding)} is not one of {', '.join(CONTENT_ENCODINGS)}"
        )
    if not isinstance(value, str):
        raise InvalidNotice("content.value", f"must be a string, got {_show(value)}")
    if encoding == "base64":
        data = _decode_base64(value)
        if data is None:
            raise InvalidNotice("content.value", f"not base64: {_show(value)}")
        length = len(data)
    else:
        try:
            length = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            raise InvalidNotice("content.value", "not encodable as UTF-8") from None
    if type(size) is int and length != size:
        raise InvalidNotice("content.value", f"holds {length} bytes but size says {size}")


def _check_report(report):
    _require_object("report", report, "{code, timeCompleted, message}")
    code = report.get("code")
    if type(code) is not int or not 100 <= code <= 599:
        raise InvalidNotice("report.code", f"must be an HTTP-like integer code, got {_show(code)}")
    if "timeCompleted" not in report:
        raise InvalidNotice("report.timeCompleted", "missing")
    _check_time(report["timeCompleted"], "report.timeCompleted")
    if not isinstance(report.get("message"), str):
        raise InvalidNotice(
            "report.message", f"must be a string, got {_show(report.get('message'))}"
        )
