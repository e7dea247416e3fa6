"""The HTTP/1.1 client side of kept connections: a GET written as one prepared string, its
response read by a small parser, the connection kept for the next GET of the same origin.

Twisted's C{HTTP11ClientProtocol} (with C{Request}, C{Headers}, C{HTTPClientParser} and its
pool) took about 11% of the pump container's Python time for 4 KiB files (self time, py-spy
--gil, 20,000 files): building a request's headers object, a line-by-line parse of each response with a
callback per header, and a chain of Deferreds per response. A kept GET needs less: the
request's bytes are the origin's prepared tail after the target, and a response head is
found, split and checked in one go.

What a server sends is read under limits, since any server a notice names may be hostile:
a response head of at most L{MAX_HEAD} bytes and L{MAX_HEADERS} header lines, at most
L{MAX_INTERIM} interim (1xx) responses before it, chunk-size and trailer lines of at most
L{MAX_CHUNK_LINE} bytes, trailers of at most L{MAX_TRAILER} bytes in all. Framing that is not
HTTP/1.1's (a malformed status line or header, a folded header, Content-Length and
Transfer-Encoding together, Content-Lengths that differ, a transfer coding other than
chunked) ends the connection with L{BadResponse}. Bytes a server sends past the end of a
response, or while no request is waiting, cost it the connection: nothing is pipelined, so
such bytes can only be a broken or hostile server's.

A response body goes to the protocol given to L{Response.deliverBody}, which gets the
L{Response} as its transport (C{pauseProducing}, C{resumeProducing}, C{stopProducing});
it ends with C{ResponseDone}, with C{PotentialDataLoss} when only the end of the connection
ends the body, or with the failure that cut it (C{ResponseFailed} or L{BadResponse}).
"""

import re

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH

MAX_HEAD = 64 * 1024  # a response's status line and headers
MAX_HEADERS = 100  # header lines in a response head
MAX_INTERIM = 10  # 1xx responses before the final one
MAX_CHUNK_LINE = 8 * 1024  # a chunk-size line (extensions included) or a trailer line
MAX_TRAILER = 64 * 1024  # the trailer lines after the last chunk, in all
MAX_EARLY = 1024 * 1024  # body bytes held for a response not yet given a protocol

_HEAD_END = re.compile(rb"\n\r?\n")
_STATUS = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: ([^\r\n]*))?\r?")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_UNSAFE_TARGET = re.compile(rb"[\x00-\x20\x7f-\xff]")

# The parser's states for a chunked body.
_SIZE, _DATA, _DATA_END, _TRAILER = range(4)


class BadResponse(Exception):
    """A server's answer breaks HTTP/1.1's framing or one of this module's limits."""


def request_bytes(target, tail):
    """The bytes of a GET of C{target} (origin form) whose header lines, with the blank line
    that ends them, are C{tail}.

    @raise ValueError: C{target} holds a byte a request line must not (a space, a control
    character, a byte past ASCII).
    """
    if _UNSAFE_TARGET.search(target) is not None:
        raise ValueError(f"request target {target[:80]!r} is not printable ASCII")
    return b"GET " + target + b" HTTP/1.1\r\n" + tail


def header_lines(pairs):
    """C{name: value} lines, each ending with CRLF, of C{pairs}; a value holding CR or LF is
    refused (it would end the request's head early)."""
    lines = []
    for name, value in pairs:
        if b"\r" in value or b"\n" in value or not _TOKEN.fullmatch(name):
            raise ValueError(f"header {name!r} cannot be written on one line")
        lines.append(name + b": " + value + b"\r\n")
    return b"".join(lines)


class Headers(dict):
    """A response's headers: lower-cased name to the list of its values, in order."""

    __slots__ = ()

    def getRawHeaders(self, name, default=None):
        return self.get(name.lower(), default)


class Response:
    """
    The answer to a kept GET, once its head is in: C{code}, C{phrase}, C{headers}
    (L{Headers}) and C{length} (the body's size, or C{UNKNOWN_LENGTH}), as Twisted's
    responses have them. The body goes to one protocol
    (L{deliverBody}); until then what arrives of it is held, up to L{MAX_EARLY} bytes before
    the connection is paused.
    """

    __slots__ = ("code", "phrase", "headers", "length", "_wire", "_protocol",
                 "_early", "_early_size", "_end", "_stopped")

    def __init__(self, code, phrase, headers, length, wire):
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length
        self._wire = wire  # until the body ends
        self._protocol = None
        self._early = []
        self._early_size = 0
        self._end = None  # the reason the body ended, before a protocol took it
        self._stopped = False

    def deliverBody(self, protocol):
        if self._protocol is not None:
            raise RuntimeError("a response body goes to one protocol only")
        self._protocol = protocol
        protocol.makeConnection(self)
        early, self._early = self._early, None
        for data in early:
            if self._stopped or self._protocol is not protocol:
                break
            protocol.dataReceived(data)
        if self._early_size > MAX_EARLY and self._wire is not None:
            self._wire.resume()
        if self._end is not None:
            self._finish(self._end)

    # The transport of the body's protocol.

    def pauseProducing(self):
        if self._wire is not None:
            self._wire.pause()

    def resumeProducing(self):
        if self._wire is not None:
            self._wire.resume()

    def stopProducing(self):
        """Give up the rest of the body: the connection is aborted, and the body ends with
        C{ResponseFailed} once it is closed (not at once: as with Twisted's client, a
        transfer cancelled while its body comes ends cancelled)."""
        self._stopped = True  # nothing more is handed over, held bytes included
        if self._wire is not None:
            self._wire.abort()

    # Called by the connection.

    def _data(self, data):
        protocol = self._protocol
        if protocol is not None:
            protocol.dataReceived(data)
            return
        self._early.append(data)
        self._early_size += len(data)
        if self._early_size > MAX_EARLY and self._wire is not None:
            self._wire.pause()

    def _ended(self, reason):
        """The body ended (C{reason}: why); the connection is no longer this response's."""
        self._wire = None
        if self._protocol is None or self._early is not None:
            self._end = reason  # for deliverBody to hand over
        else:
            self._finish(reason)

    def _finish(self, reason):
        protocol, self._protocol = self._protocol, _Ended
        self._end = None
        protocol.connectionLost(reason)


class _EndedProtocol:
    """Where a response's body goes once it ended: nowhere."""

    def dataReceived(self, data):
        pass


_Ended = _EndedProtocol()


class Wire(Protocol):
    """
    One HTTP/1.1 connection of a L{WirePool}: one request at a time (L{request}), its
    response parsed as it arrives, the connection given back to the pool once a response
    that lets it be kept has ended.

    @ivar key: the pool's key of the connection's origin.
    @ivar reused: whether a response came over this connection before.
    """

    def __init__(self, pool, key):
        self.pool = pool
        self.key = key
        self.reused = False
        self.idle_call = None
        self._parse = self._unasked
        self._buffer = b""
        self._waiting = None  # the Deferred of the response asked for
        self._heard = False  # a byte came since the request
        self._interim = 0
        self._response = None  # the response whose body is coming
        self._keep = False
        self._left = 0
        self._chunk = _SIZE
        self._trailer = 0
        self._paused = False
        self._lost = None  # Deferreds waiting for the connection's end

    def request(self, data):
        """Send C{data} (a GET's bytes); a Deferred that fires with the L{Response} once its
        head is in. Cancelling it closes the connection. It fails with L{Stale} when a kept
        connection ends before a byte of the response came: the request may be sent again."""
        waiting = self._waiting = Deferred(self._cancel)
        self._heard = False
        self._interim = 0
        self._parse = self._head
        self.transport.write(data)
        return waiting

    def dataReceived(self, data):
        self._parse(data)

    # Reading a response.

    def _unasked(self, data):
        # Bytes nobody asked for: the server is not speaking HTTP/1.1 to us.
        self.abort()

    def _head(self, data):
        self._heard = True
        held = len(self._buffer)
        buffer = self._buffer + data if held else data
        # The bytes held were searched before: a head sent a byte at a time costs no more
        # than one sent at once.
        end = _HEAD_END.search(buffer, max(held - 2, 0), MAX_HEAD + 3)
        if end is None:
            if len(buffer) > MAX_HEAD:
                self._fail(f"response head over {MAX_HEAD} bytes")
            else:
                self._buffer = buffer
            return
        self._buffer = b""
        lines = buffer[: end.start()].split(b"\n")
        status = _STATUS.fullmatch(lines[0])
        if status is None:
            self._fail(f"malformed status line {lines[0][:80]!r}")
            return
        if len(lines) > MAX_HEADERS + 1:
            self._fail(f"over {MAX_HEADERS} header lines")
            return
        headers = Headers()
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not _TOKEN.fullmatch(name):
                self._fail(f"malformed header line {line[:80]!r}")
                return
            name = name.lower()
            value = value.strip(b" \t\r")
            values = headers.get(name)
            if values is None:
                headers[name] = [value]
            else:
                values.append(value)
        rest = buffer[end.end():]
        code = int(status.group(2))
        if code < 200:
            if code == 101 or self._interim == MAX_INTERIM:
                self._fail(f"interim response {code} refused")
                return
            self._interim += 1  # 100 Continue, 103 Early Hints: the answer is still to come
            if rest:
                self._head(rest)
            return
        self._start_body(status, code, headers, rest)

    def _start_body(self, status, code, headers, rest):
        http10 = status.group(1) == b"0"
        connection = headers.get(b"connection")
        self._keep = not http10 and not (
            connection is not None and b"close" in b",".join(connection).lower()
        )
        encoding = headers.get(b"transfer-encoding")
        lengths = headers.get(b"content-length")
        if code in (204, 304):
            length, parse = 0, None
        elif encoding is not None:
            codings = b",".join(encoding).lower().replace(b" ", b"").replace(b"\t", b"")
            if codings != b"chunked":
                self._fail(f"transfer coding {codings[:80]!r} not supported")
                return
            if lengths is not None:
                self._fail("both Content-Length and Transfer-Encoding")
                return
            if http10:
                self._fail("Transfer-Encoding in an HTTP/1.0 response")
                return
            length, parse = UNKNOWN_LENGTH, self._chunked
            self._chunk, self._trailer = _SIZE, 0
        elif lengths is not None:
            values = {value.strip(b" \t") for value in b",".join(lengths).split(b",")}
            value = values.pop()
            if values or not value.isdigit() or len(value) > 18:
                self._fail(f"unusable Content-Length {b', '.join(lengths)[:80]!r}")
                return
            length = int(value)
            parse = self._fixed if length else None
            self._left = length
        else:
            length, parse = UNKNOWN_LENGTH, self._until_close
            self._keep = False
        waiting, self._waiting = self._waiting, None
        phrase = status.group(3) or b""
        response = self._response = Response(code, phrase, headers, length, self)
        if parse is None:
            if rest:
                self._keep = False  # bytes after a response without a body
            self._complete()
        else:
            self._parse = parse
            if rest:
                parse(rest)
        waiting.callback(response)

    def _fixed(self, data):
        left = self._left
        size = len(data)
        if size < left:
            self._left = left - size
            self._response._data(data)
            return
        if size > left:
            self._keep = False  # the server sent more than it announced
            data = data[:left]
        self._left = 0
        self._response._data(data)
        if self._parse is not _ignore:  # not stopped
            self._complete()

    def _until_close(self, data):
        self._response._data(data)

    def _chunked(self, data):
        buffer = self._buffer + data if self._buffer else data
        self._buffer = b""
        position, size = 0, len(buffer)
        pieces = []  # the chunks of this read, handed over at once: tiny chunks cost one call
        failure = None
        complete = False
        while position < size:
            if self._chunk == _DATA:
                take = min(self._left, size - position)
                pieces.append(buffer if take == size else buffer[position : position + take])
                position += take
                self._left -= take
                if not self._left:
                    self._chunk = _DATA_END
                continue
            limit = MAX_CHUNK_LINE
            if self._chunk == _TRAILER:
                limit = min(limit, MAX_TRAILER - self._trailer)
            newline = buffer.find(b"\n", position, position + limit + 1)
            if newline < 0:
                if size - position > limit:
                    failure = "chunk-size or trailer line too long"
                else:
                    self._buffer = buffer[position:]
                break
            line = buffer[position:newline]
            position = newline + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if self._chunk == _SIZE:
                digits = line.split(b";", 1)[0].strip(b" \t")
                if _CHUNK_SIZE.fullmatch(digits) is None:
                    failure = f"malformed chunk-size line {line[:80]!r}"
                    break
                self._left = int(digits, 16)
                self._chunk = _DATA if self._left else _TRAILER
            elif self._chunk == _DATA_END:
                if line:
                    failure = "chunk longer than its size"
                    break
                self._chunk = _SIZE
            elif line:
                self._trailer += len(line) + 1
            else:
                if position < size:
                    self._keep = False  # bytes after the response
                complete = True
                break
        if pieces:
            self._response._data(pieces[0] if len(pieces) == 1 else b"".join(pieces))
            if self._parse is _ignore:
                return  # stopped
        if failure is not None:
            self._fail(failure)
        elif complete:
            self._complete()

    def _complete(self):
        """The response ended whole: keep the connection or close it, then end its body."""
        response, self._response = self._response, None
        self._parse = self._unasked
        if self._keep:
            self.reused = True
            if self._paused:
                self.resume()
            self.pool.put(self)
        else:
            self.transport.loseConnection()
        response._ended(_DONE)

    def _fail(self, message):
        """The server broke the protocol: the connection closes, the request or the body
        fails with L{BadResponse}."""
        waiting, self._waiting = self._waiting, None
        response, self._response = self._response, None
        self.abort()
        error = BadResponse(message)
        if waiting is not None:
            waiting.errback(error)
        elif response is not None:
            response._ended(Failure(error))

    # Flow control and the end of the connection.

    def pause(self):
        if not self._paused:
            self._paused = True
            self.transport.pauseProducing()

    def resume(self):
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()

    def abort(self):
        """Close the connection at once; nothing more is read from it. A body that was
        coming ends when the connection is closed (L{connectionLost})."""
        self._parse = _ignore
        self._keep = False
        self.pool.lost(self)  # an idle one is not handed out while its end is on its way
        self.transport.abortConnection()

    def _cancel(self, waiting):
        self._waiting = None
        self.abort()

    def close(self):
        """Close the (idle) connection; a Deferred that fires once it is closed."""
        if self._lost is None:
            self._lost = []
        lost = Deferred()
        self._lost.append(lost)
        self._parse = _ignore
        self.transport.loseConnection()
        return lost

    def connectionLost(self, reason=None):
        self.pool.lost(self)
        # Only a body read until the end, and not stopped, ends whole with the connection.
        closing_ends = self._parse == self._until_close
        self._parse = _ignore
        waiting, self._waiting = self._waiting, None
        response, self._response = self._response, None
        if waiting is not None:
            waiting.errback(Stale() if self.reused and not self._heard else NoResponse(reason))
        elif response is not None:
            if closing_ends:
                response._ended(Failure(PotentialDataLoss()))
            else:
                response._ended(Failure(ResponseFailed([reason])))
        for lost in self._lost or ():
            lost.callback(None)


def _ignore(data):
    pass


_DONE = Failure(ResponseDone())


class NoResponse(Exception):
    """The connection ended before a response came (a TLS handshake that failed, a server
    that closed without a word). C{reasons}: the failure that ended it, as Twisted's
    C{ResponseNeverReceived} has them."""

    def __init__(self, reason):
        super().__init__(f"the connection ended before a response: {reason.getErrorMessage()}")
        self.reasons = [reason]


class Stale(Exception):
    """A kept connection ended before a byte of the response to a request sent over it: the
    server had closed it meanwhile, and the GET may go again on a new connection."""


class WirePool:
    """
    The idle L{Wire}s to each origin (C{key}), at most C{per_host} each, each closed after
    C{idle_timeout} seconds unused.
    """

    def __init__(self, reactor, per_host, idle_timeout):
        self._reactor = reactor
        self.per_host = per_host
        self.idle_timeout = idle_timeout
        self._idle = {}  # key -> [Wire], the last one put the first taken
        self._closed = False

    def factory(self, key):
        """The protocol factory of the connections to the origin of C{key}."""
        return _WireFactory(self, key)

    def take(self, key):
        """An idle connection to the origin of C{key}, or None."""
        wires = self._idle.get(key)
        if not wires:
            return None
        wire = wires.pop()
        wire.idle_call.cancel()
        wire.idle_call = None
        return wire

    def put(self, wire):
        """Keep C{wire}, idle, unless C{per_host} are kept already or the pool is closed."""
        wires = self._idle.get(wire.key)
        if wires is None:
            wires = self._idle[wire.key] = []
        if len(wires) >= self.per_host or self._closed:
            wire.transport.loseConnection()
            return
        wire.idle_call = self._reactor.callLater(self.idle_timeout, self._expire, wire)
        wires.append(wire)

    def _expire(self, wire):
        wire.idle_call = None
        self._idle[wire.key].remove(wire)
        wire.close()

    def lost(self, wire):
        """C{wire}'s connection ends: it is no longer kept."""
        if wire.idle_call is not None:
            wire.idle_call.cancel()
            wire.idle_call = None
            wires = self._idle.get(wire.key)
            if wires is not None and wire in wires:
                wires.remove(wire)

    def close(self):
        """Close the idle connections, and each busy one as its response ends; a Deferred
        that fires once the idle ones are closed."""
        self._closed = True
        closing = []
        for wires in self._idle.values():
            for wire in list(wires):
                self.lost(wire)
                closing.append(wire.close())
        self._idle = {}
        return gatherResults(closing)


class _WireFactory(Factory):
    noisy = False

    def __init__(self, pool, key):
        self._pool = pool
        self._key = key

    def buildProtocol(self, addr):
        return Wire(self._pool, self._key)
