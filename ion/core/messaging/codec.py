"""Turns ION messages into bytes and back: msgpack with explicit limits on what a peer may send.

This is the only module that imports msgpack. Everything that decodes bytes from the wire goes
through L{decode} (or L{decode_envelope}), which refuses oversized, truncated, malformed or too
deeply nested input with a L{DecodeError} instead of letting the interpreter exhaust memory or
the C stack. Extension types are not part of ION's wire format: L{decode} rejects them.

Lengths alone do not bound memory: one byte of msgpack can become a 64-byte Python object (an
empty map), so 16 MB of C{[{}, {}, ...]} arrays took 1.2 GB. C{max_objects} bounds the objects
of one message. A message of N bytes holds at most N objects, so only messages longer than
C{max_objects} bytes are counted (hooks on every array and map, which cost time); smaller
ones decode at full speed.
"""

import threading

import attrs
import msgpack

MiB = 1024 * 1024

_HEADER_SCALARS = (str, int, float, bool)
_PLAIN_TYPES = frozenset([str, int, float, bool, type(None)])


class DecodeError(Exception):
    """Bytes received from the wire are not an acceptable ION message."""


class EncodeError(TypeError):
    """An object cannot be represented in msgpack (the message names the offending type)."""


def _digits(value):
    """A string of digits as an int; any other value as it is."""
    try:
        return int(value.strip().replace("_", "")) if isinstance(value, str) else value
    except ValueError:
        return value


def _positive_int(instance, attribute, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{attribute.name} must be a positive integer, got {value!r}")


@attrs.frozen
class Limits:
    """The most a single decoded message may contain. Lengths of str and bin are in bytes;
    lengths of arrays and maps in items. C{max_objects} bounds the values of a message: the
    top one, the items of arrays, the keys and values of maps (a 16 MB directory listing of
    150,000 entries holds 1.7 million). Each array or map is counted when it is complete, so
    decoding stops at the first one that takes the count past the limit. Nesting depth is
    bounded by msgpack itself."""

    max_message_bytes: int = attrs.field(default=16 * MiB, validator=_positive_int)
    max_str_len: int = attrs.field(default=16 * MiB, validator=_positive_int)
    max_bin_len: int = attrs.field(default=16 * MiB, validator=_positive_int)
    max_array_len: int = attrs.field(default=1_000_000, validator=_positive_int)
    max_map_len: int = attrs.field(default=100_000, validator=_positive_int)
    max_objects: int = attrs.field(default=2_000_000, validator=_positive_int)

    @classmethod
    def from_config(cls, section):
        """Build limits from a config section (a mapping). Keys named like the attributes
        override the defaults; other keys belong to other settings and are ignored. Values
        may be ints or strings of digits (C{"16_000_000"}); the validators refuse the rest."""
        names = {field.name for field in attrs.fields(cls)}
        return cls(**{key: _digits(value) for key, value in section.items() if key in names})


def _refuse(obj):
    if isinstance(obj, int):
        raise EncodeError(f"cannot encode integer outside the 64-bit range: {obj!r:.80}")
    kind = type(obj).__qualname__
    if type(obj).__module__ != "builtins":
        kind = f"{type(obj).__module__}.{kind}"
    raise EncodeError(
        f"cannot encode {kind} object {obj!r:.80}: "
        "msgpack carries None, bool, int, float, str, bytes, list/tuple and dict only"
    )


# A Packer per thread, made once: msgpack.packb makes a new one for every message.
_packers = threading.local()


def _packer():
    packer = _packers.__dict__.get("packer")
    if packer is None:
        packer = _packers.packer = msgpack.Packer(
            use_bin_type=True, datetime=False, default=_refuse
        )
    return packer


def encode(obj):
    """Pack obj into msgpack bytes (str as str, bytes as bin). Raises EncodeError for values
    msgpack cannot carry: unsupported types, integers beyond 64 bits, too deep nesting."""
    try:
        # A Packer starts afresh after a failed pack, and _refuse never packs: no reentry.
        return _packer().pack(obj)
    except EncodeError:
        raise
    except OverflowError as e:
        raise EncodeError(f"cannot encode integer outside the 64-bit range: {e}") from None
    except (TypeError, ValueError) as e:
        raise EncodeError(f"cannot encode object: {e}") from None


class _TooManyObjects(Exception):
    """A message holds more values than Limits.max_objects."""


def _object_counters(limit):
    """list_hook and object_hook for msgpack counting values as L{Limits} says."""
    left = limit - 1

    def counter(values_per_item):
        def count(items):
            nonlocal left
            left -= values_per_item * len(items)
            if left < 0:
                raise _TooManyObjects
            return items

        return count

    return counter(1), counter(2)


def decode(data, limits):
    """Unpack one msgpack value from data, enforcing limits. Raises DecodeError for any input
    that is not exactly one acceptable msgpack value."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode expects bytes, got {type(data).__name__}")
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > limits.max_message_bytes:
        raise DecodeError(f"message too large: {size} bytes > limit {limits.max_message_bytes}")
    count_array = count_map = None
    if size > limits.max_objects:
        count_array, count_map = _object_counters(limits.max_objects)
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=False,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_bin_len,
            max_array_len=limits.max_array_len,
            max_map_len=limits.max_map_len,
            max_ext_len=0,
            list_hook=count_array,
            object_hook=count_map,
        )
    except _TooManyObjects:
        raise DecodeError(
            f"message exceeds a decode limit: more than {limits.max_objects} objects"
        ) from None
    except msgpack.ExtraData as e:
        raise DecodeError(f"trailing data: {len(e.extra)} bytes after the message") from None
    except (msgpack.StackError, RecursionError):
        raise DecodeError("message nested too deeply") from None
    except msgpack.FormatError:
        raise DecodeError("malformed message: not valid msgpack") from None
    except UnicodeDecodeError as e:
        raise DecodeError(f"malformed message: string is not valid UTF-8 ({e.reason})") from None
    except ValueError as e:
        text = str(e)
        if "incomplete input" in text:
            raise DecodeError("truncated message") from None
        if "max_ext_len" in text:
            raise DecodeError("msgpack extension types are not accepted") from None
        if "exceeds max_" in text:
            raise DecodeError(f"message exceeds a decode limit: {text}") from None
        raise DecodeError(f"malformed message: {text}") from None
    except TypeError as e:
        raise DecodeError(f"malformed message: unusable map key ({e})") from None
    except Exception as e:
        raise DecodeError(f"malformed message: {type(e).__name__}: {e}") from None


@attrs.define
class Envelope:
    """One ION message: headers (a map of str to plain values; names in DESIGN section 5) and
    content (any msgpack value)."""

    headers: dict = attrs.field(factory=dict)
    content: object = None


def _header_problem(headers):
    """Describe why headers are not a map of str to plain values, or return None."""
    if not isinstance(headers, dict):
        return f"headers must be a map, got {type(headers).__name__}"
    for name, value in headers.items():
        if type(name) is not str and not isinstance(name, str):
            return f"header names must be strings, got {type(name).__name__} {name!r:.80}"
        if type(value) in _PLAIN_TYPES:
            continue
        pending = [value]
        while pending:
            item = pending.pop()
            if item is None or isinstance(item, _HEADER_SCALARS):
                continue
            if isinstance(item, (list, tuple)):
                pending.extend(item)
            elif isinstance(item, dict):
                for key, nested in item.items():
                    if not isinstance(key, str):
                        return f"header {name!r}: map keys must be strings, got {key!r:.80}"
                    pending.append(nested)
            else:
                return (
                    f"header {name!r}: values must be str, int, float, bool, None, map or list,"
                    f" got {type(item).__name__}"
                )
    return None


def encode_envelope(envelope):
    """Pack an Envelope. Raises EncodeError when headers are not a map of str to plain values
    or when any part cannot be encoded."""
    return encode_envelope_parts(envelope.headers, envelope.content)


def encode_envelope_parts(headers, content):
    """L{encode_envelope} of C{Envelope(headers, content)}, without making the Envelope."""
    data = encode({"headers": headers, "content": content})
    problem = _header_problem(headers)
    if problem is not None:
        raise EncodeError(f"cannot encode envelope: {problem}")
    return data


def decode_envelope(data, limits):
    """Unpack and validate an Envelope: a map with exactly the keys 'headers' and 'content',
    headers a map of str to plain values. Raises DecodeError otherwise."""
    headers, content = decode_envelope_parts(data, limits)
    return Envelope(headers=headers, content=content)


def decode_envelope_parts(data, limits):
    """L{decode_envelope}, as C{(headers, content)}: no Envelope made."""
    obj = decode(data, limits)
    if not isinstance(obj, dict):
        raise DecodeError(
            f"envelope must be a map with 'headers' and 'content', got {type(obj).__name__}"
        )
    if len(obj) != 2 or "headers" not in obj or "content" not in obj:
        keys = ", ".join(sorted(repr(k) for k in obj)[:5]) + (", ..." if len(obj) > 5 else "")
        raise DecodeError(
            f"envelope must be a map with 'headers' and 'content', got keys {keys or 'none'}"
        )
    headers = obj["headers"]
    problem = _header_problem(headers)
    if problem is not None:
        raise DecodeError(f"bad envelope: {problem}")
    return headers, obj["content"]
