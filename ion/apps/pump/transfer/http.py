"""The C{http} and C{https} schemes: GET streamed to disk, PUT streamed from disk, and
directory listings read from index pages (see L{ion.apps.pump.transfer.listings}).

Requests go through C{twisted.web.client.Agent}. A GET follows at most L{MAX_REDIRECTS}
redirects, each only to a URL the notice's L{Access} accepts (else L{Forbidden}, 403);
credentials are dropped on a redirect to another origin. With an access that is not trusted,
each connection goes to an address the access checked (resolved once; TLS still verifies the
host name): see L{ion.apps.pump.transfer.policy}. A PUT follows no redirect.

treq is not used for transfers: its client always asks for and decodes gzip
content-encoding, which would hand us other bytes than the file's (a C{.gz} file served with
C{Content-Encoding: gzip} arrives decompressed) and break sizes and checksums. We ask for the
identity encoding and refuse any other.

https certificates are verified by default against the system's trust store, or against the
certificate authorities of C{ca_file}; a failed verification is L{ServerNotTrusted}. TLS
support is loaded by the first https request (L{ion.core.lazytls}), not by plain http.
A partitioned transfer (L{ion.apps.pump.transfer.blocks}) GETs each block with a C{Range}
header (L{fetch_range}); the answer must be a 206 whose C{Content-Range} is the range asked
for, a 200 (the server ignores ranges) is L{RangeIgnored}.

GETs reuse the connections of the caller's L{HTTPConnections} when given: a connection goes back
to them only after a whole response that lets it be kept (one cut short, or broken, is
closed). A PUT always opens a connection of its own, through Twisted's C{Agent} (Twisted
retries only idempotent requests without a body on a kept connection the server has
meanwhile closed), and so does a GET without L{HTTPConnections}. Kept GETs do not go through
Twisted's HTTP client: L{ion.apps.pump.transfer.httpwire} writes each as one prepared string
and parses its response under its own limits, with half the instructions per GET (see
L{_KeptAgent}). A host name is resolved and encoded only when a connection is
made, and a URL's C{scheme://host:port} is parsed once (L{_Origin}), the request target cut
from the URL: Twisted's C{URI.fromBytes} and C{originForm} took about 25 us of the reactor's
time per GET (their module's deprecation proxy).
"""

import base64
import functools
import re
import sys
import weakref
from urllib.parse import urljoin, urlsplit

import attrs
from twisted.internet import error as net_error
from twisted.internet.abstract import FileDescriptor, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.defer import CancelledError, Deferred, fail, gatherResults
from twisted.internet.protocol import Protocol
from twisted.internet.task import Cooperator
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    FileBodyProducer,
    HTTPConnectionPool,
    PartialDownloadError,
    ResponseDone,
    ResponseFailed,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.http import PotentialDataLoss, stringToDatetime
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory
from zope.interface import implementer

from ion.apps.pump.transfer.errors import (
    AuthFailed,
    BadRequest,
    ConnectionFailed,
    LocalFailure,
    NotFound,
    RangeIgnored,
    Refused,
    ServerNotTrusted,
    ShortTransfer,
    TransferError,
    TransferTimeout,
)
from ion.apps.pump.transfer.httpwire import (
    BadResponse,
    Stale,
    Wire,
    WirePool,
    header_lines,
    request_bytes,
)
from ion.apps.pump.transfer.inflight import SinkReceiver
from ion.apps.pump.transfer.limits import IdleTimer, cancellable
from ion.apps.pump.transfer.listings import ListingBuffer, page_digest, parse_html_index
from ion.apps.pump.transfer.location import request_url
from ion.apps.pump.transfer.outgoing import ProgressReader
from ion.apps.pump.transfer.pacing import PacedSink
from ion.apps.pump.transfer.policy import MAX_REDIRECTS, AddressesEndpoint, Forbidden
from ion.apps.pump.transfer.results import Listing
from ion.core import lazytls

PUT_CHUNK_SIZE = 64 * 1024
# The most bytes a connection reads from its socket at a time (Twisted's default is 64 KiB):
# each read costs a pass through Twisted's HTTP parser and our receiver, and a big body
# arrives in fewer, bigger reads. A read takes what the socket holds, up to this; the
# receiver pauses the connection while its file has too much waiting (BACKLOG_LIMIT). Each
# read is a buffer of its own, up to one per connection more than the backlog waits. A
# whole-file GET reads up to READ_SIZE (measured: 1 MiB reads cut the reactor's CPU time per
# GiB by a quarter against 256 KiB ones, peak RSS unchanged). On connections of their own,
# the parallel blocks of a partitioned get read SMALL_READ_SIZE, since bigger reads there cost
# memory (1 MiB reads took 4 blocks of a 2 GiB file to 86-94 MB of peak RSS, 256 KiB ones to
# 75-80), and so does a GET under a bandwidth limit: a read can overdraw the limit by its size.
READ_SIZE = 1024 * 1024
SMALL_READ_SIZE = 256 * 1024
# A whole-file GET of a file announced at most this big reads this much at a time, on
# connections of its own: a read's buffer is allocated at its full size, and one over the C
# allocator's mapping threshold (128 KiB by default) is a fresh memory mapping, shrunk to the
# bytes read and unmapped again, three system calls and page faults per read, which for a
# small file cost more than the rest of its reading.
SMALL_FILE_READ_SIZE = 64 * 1024

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


def _trust_root(ca_file):
    if ca_file is None:
        return None
    try:
        with open(ca_file, "rb") as f:
            blocks = _PEM_CERTIFICATE.findall(f.read())
    except OSError as exc:
        raise LocalFailure.from_os_error(f"cannot read CA file {ca_file}", exc) from None
    if not blocks:
        raise BadRequest(f"CA file {ca_file} holds no PEM certificate")
    lazytls.load()
    from twisted.internet import ssl

    return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(pem) for pem in blocks])


def _restricted(settings):
    """The policy whose address rules the connections of C{settings} follow, or None."""
    access = settings.access
    return None if access is None or access.trusted else access.policy


def _large_reads(protocol, size):
    """Make the TCP connection under C{protocol} (under its TLS layer, if any) read up to
    C{size} bytes at a time; C{protocol}."""
    transport = protocol.transport
    for layer in (transport, getattr(transport, "transport", None)):
        if isinstance(layer, FileDescriptor):
            layer.bufferSize = size
    return protocol


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """Endpoints to a URI's host by name (TLS for https), as Twisted's agent makes them, whose
    connections read C{read_size} bytes at a time."""

    def __init__(self, reactor, tls, timeout, read_size=READ_SIZE):
        self._reactor = reactor
        self._tls = tls
        self._timeout = timeout
        self._read_size = read_size

    def endpointForURI(self, uri):
        if uri.scheme not in (b"http", b"https"):
            raise SchemeNotSupported(f"unsupported scheme {uri.scheme!r}")
        # The host name is checked and encoded (IDNA) when a connection is made, not for
        # each request on a kept one.
        return _Endpoint(functools.partial(self._connect, uri))

    def _connect(self, uri, factory):
        try:
            endpoint = HostnameEndpoint(
                self._reactor, uri.host.decode("ascii"), uri.port, timeout=self._timeout
            )
            if uri.scheme == b"https":
                lazytls.load()
                creator = self._tls.creatorForNetloc(uri.host, uri.port)
                endpoint = wrapClientTLS(creator, endpoint)
        except Exception:
            return fail()
        return endpoint.connect(factory).addCallback(_large_reads, self._read_size)


@implementer(IAgentEndpointFactory)
class _CheckedEndpoints:
    """Endpoints to the addresses the policy checked for a URI's host, not to the name."""

    def __init__(self, reactor, policy, tls, timeout, read_size=READ_SIZE):
        self._reactor = reactor
        self._policy = policy
        self._tls = tls
        self._timeout = timeout
        self._read_size = read_size

    def endpointForURI(self, uri):
        return _Endpoint(lambda factory: Deferred.fromCoroutine(self._connect(uri, factory)))

    async def _connect(self, uri, factory):
        scheme, host = uri.scheme.decode("ascii"), uri.host.decode("ascii")
        addresses = await self._policy.addresses(self._reactor, scheme, host, uri.port)
        wrap = None
        if scheme == "https":
            # TLS verifies the host name, whichever checked address answers.
            lazytls.load()
            wrap = functools.partial(wrapClientTLS, self._tls.creatorForNetloc(uri.host, uri.port))
        endpoint = AddressesEndpoint(self._reactor, addresses, uri.port, self._timeout, wrap)
        return _large_reads(await endpoint.connect(factory), self._read_size)


@implementer(IStreamClientEndpoint)
@attrs.frozen
class _Endpoint:
    connect: object


def _agent(reactor, settings, read_size=READ_SIZE):
    """An agent (redirects are followed by L{_request}) whose connections read C{read_size}
    bytes at a time and serve one request each."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    return Agent.usingEndpointFactory(reactor, _endpoints(reactor, settings, read_size), pool)


def _endpoints(reactor, settings, read_size):
    """The endpoint factory of C{settings}: under a restricted access, its connections go
    only to checked addresses."""
    tls = BrowserLikePolicyForHTTPS(trustRoot=_trust_root(settings.ca_file))
    restricted = _restricted(settings)
    timeout = settings.timeouts.connect
    if restricted is None:
        return _Endpoints(reactor, tls, timeout, read_size)
    return _CheckedEndpoints(reactor, restricted, tls, timeout, read_size)


class HTTPConnections:
    """
    http(s) connections kept open between the GETs of one owner (a process), at most
    C{per_host} idle ones to each server, each closed after C{idle_timeout} seconds unused.
    Connections made under different trust roots (C{ca_file}), or for trusted and restricted
    accesses (see L{ion.apps.pump.transfer.policy}), are never shared. L{close} when done.
    """

    def __init__(self, reactor, per_host=4, idle_timeout=60):
        self._reactor = reactor
        self.per_host = per_host
        self.idle_timeout = idle_timeout
        self._pools = {}
        self._agents = {}

    def agent(self, settings, read_size=READ_SIZE):
        """The agent for GETs made with C{settings} (its C{ca_file} and connect timeout),
        whose connections read C{read_size} bytes at a time."""
        # A connection a trusted transfer opened to a local service must not serve a
        # restricted one: the restricted agent checks addresses when it connects.
        restricted = _restricted(settings)
        key = (settings.ca_file, settings.timeouts.connect, restricted, read_size)
        agent = self._agents.get(key)
        if agent is None:
            kind = (settings.ca_file, restricted, read_size)
            pool = self._pools.get(kind)
            if pool is None:
                pool = self._pools[kind] = WirePool(
                    self._reactor, self.per_host, self.idle_timeout
                )
            endpoints = _endpoints(self._reactor, settings, read_size)
            agent = self._agents[key] = _KeptAgent(endpoints, pool)
        return agent

    def close(self):
        """Close the idle connections; a Deferred that fires once they are closed."""
        pools, self._pools, self._agents = list(self._pools.values()), {}, {}
        return gatherResults([pool.close() for pool in pools])


class _KeptAgent:
    """GETs (C{request}, as an Agent's) over the connections of C{pool} (a
    L{WirePool}, see L{ion.apps.pump.transfer.httpwire}), made through C{endpoints}
    (L{_Endpoints} or L{_CheckedEndpoints}). A URL's C{scheme://host:port} is parsed once
    (L{_Origin}, kept for L{_KEPT_ORIGINS} origins); the request target is the rest of the
    URL. A GET whose kept connection turns out to have been closed by the server (it ends
    before a byte of the answer) goes again once, on a new connection.

    Measured against Twisted's C{HTTP11ClientProtocol} on a persistent C{HTTPConnectionPool}
    (what this agent used before), on the pump's own GET path (C{bench/httpget.py}, 4 KiB
    files, 8 at a time, no disk): 362k against 766k instructions per GET (callgrind), 217
    against 366 us of CPU per GET in one run; in the pump (C{bench/pump.py}, 20,000 files,
    py-spy --gil), the container held the GIL 23.4 s against 26.8 s, the parse of the
    responses now 5% of it where Twisted's client took about 11%."""

    def __init__(self, endpoints, pool):
        self._endpoints = endpoints
        self._pool = pool
        self._origins = {}  # b"scheme://netloc" -> _Origin

    def request(self, method, uri, headers=None, bodyProducer=None):
        if method != b"GET" or bodyProducer is not None:
            raise ValueError("kept connections carry GETs without a body only")
        try:
            origin, target = self._parse(uri)
            if headers is _PLAIN_HEADERS:
                tail = origin.plain_tail
            else:
                lines = [(name, value) for name, values in headers.getAllRawHeaders()
                         for value in values]
                tail = origin.host_line + header_lines(lines) + b"\r\n"
            data = request_bytes(target, tail)
        except Exception:
            return fail()
        wire = self._pool.take(origin.key)
        if wire is None:
            return self._connect(origin, data)
        return wire.request(data).addErrback(self._again, origin, data)

    def _connect(self, origin, data):
        connecting = origin.endpoint.connect(self._pool.factory(origin.key))
        return connecting.addCallback(Wire.request, data)

    def _again(self, reason, origin, data):
        reason.trap(Stale)
        return self._connect(origin, data)

    def _parse(self, uri):
        """The L{_Origin} of C{uri} and its request target (origin form), as Twisted's
        C{URI} has them. A URL as L{request_url} writes it (a path, no user, no fragment) is
        cut after its authority; any other is parsed whole."""
        start = uri.find(b"://")
        cut = uri.find(b"/", start + 3) if start > 0 else -1
        if cut < 0 or b"#" in uri or any(c in uri[:cut] for c in b"?@ "):
            parsed = URI.fromBytes(uri)
            return self._origin(parsed), parsed.originForm
        prefix = uri[:cut]
        origin = self._origins.get(prefix)
        if origin is None:
            origin = self._origin(URI.fromBytes(prefix))
            if len(self._origins) < _KEPT_ORIGINS:
                self._origins[prefix] = origin
        return origin, uri[cut:]

    def _origin(self, uri):
        host = uri.host
        if isIPv6Address(host.decode("ascii", "replace")):
            host = b"[" + host + b"]"
        if (uri.scheme, uri.port) not in ((b"http", 80), (b"https", 443)):
            host = b"%b:%d" % (host, uri.port)
        host_line = header_lines([(b"Host", host)])
        plain = [(name, value) for name, values in _PLAIN_HEADERS.getAllRawHeaders()
                 for value in values]
        return _Origin(
            (uri.scheme, uri.host, uri.port),
            self._endpoints.endpointForURI(uri),
            host,
            host_line,
            host_line + header_lines(plain) + b"\r\n",
        )


@attrs.frozen
class _Origin:
    """What the requests to one C{scheme://host:port} share: the pool's key, the endpoint,
    C{Host} as Twisted's agent writes it (an IPv6 address in brackets, the port unless the
    scheme's own), its header line, and the header lines of a plain GET (L{_PLAIN_HEADERS})
    with the blank line that ends them."""

    key: tuple
    endpoint: object
    host: bytes
    host_line: bytes
    plain_tail: bytes


_KEPT_ORIGINS = 64  # origins parsed once and kept; the URLs of others are parsed each time


_PLAIN_HEADERS = Headers({b"Accept-Encoding": [b"identity"], b"User-Agent": [b"ion-pump"]})


def _headers(location, byte_range=None):
    """The headers of a request to C{location}: the shared plain ones when there is neither
    a login nor a range to add (never changed: the agent copies them to add C{Host}), else a
    copy of them with those added."""
    login = location.user is not None and location.password is not None
    if not login and byte_range is None:
        return _PLAIN_HEADERS
    headers = _PLAIN_HEADERS.copy()
    if login:
        token = f"{location.user}:{location.password}".encode("utf-8")
        headers.setRawHeaders(b"Authorization", [b"Basic " + base64.b64encode(token)])
    if byte_range is not None:
        headers.setRawHeaders(b"Range", [b"bytes=%d-%d" % byte_range])
    return headers


def _failures(reason):
    """The failure and, for Twisted's wrapper exceptions, the failures it wraps."""
    yield reason
    for inner in getattr(reason.value, "reasons", None) or ():
        yield from _failures(inner)


def _untrusted(reason):
    # Without OpenSSL.SSL loaded no TLS connection was made, so none failed verification.
    tls_error = getattr(sys.modules.get("OpenSSL.SSL"), "Error", None)
    return any(
        (tls_error is not None and failure.check(tls_error))
        or type(failure.value).__name__ == "VerificationError"
        for failure in _failures(reason)
    )


def _request_error(location, reason, timer, timeouts):
    """The L{TransferError} for a request that got no response."""
    if timer.expired:
        return TransferTimeout(
            f"{location.shown}: no response within {timeouts.connect + timeouts.idle:g} s"
        )
    if reason.check(net_error.TimeoutError):
        return TransferTimeout(f"{location.shown}: no connection within {timeouts.connect:g} s")
    if reason.check(BadResponse):
        return ConnectionFailed(f"{location.shown}: bad response: {reason.getErrorMessage()}")
    if _untrusted(reason):
        return ServerNotTrusted(
            f"{location.shown}: TLS certificate not verified (give the issuing CA as ca_file "
            f"if it is a private one)"
        )
    if reason.check(net_error.DNSLookupError):
        return ConnectionFailed(f"{location.shown}: cannot resolve host {location.host!r}")
    if reason.check(net_error.ConnectionRefusedError):
        return ConnectionFailed(f"{location.shown}: connection refused")
    return ConnectionFailed(f"{location.shown}: request failed: {reason.getErrorMessage()}")


def _status_error(location, response):
    """The L{TransferError} for a response with an unwanted status."""
    code = response.code
    text = f"{location.shown}: server answered {code} {response.phrase.decode('latin-1')}"
    if code == 404:
        return NotFound(text)
    if code == 410:
        return NotFound(text, code=410)
    if code in (401, 403, 407):
        return AuthFailed(text)
    if code in (408, 504):
        return TransferTimeout(text)
    if code == 429 or code >= 500:
        return ConnectionFailed(text)
    return Refused(text)


_REDIRECTS = (301, 302, 303, 307, 308)


def _origin(url):
    parts = urlsplit(url)
    return (parts.scheme, parts.hostname, parts.port)


async def _request(agent, location, settings, method, timer, body=None, byte_range=None):
    """Send a request, following a GET's redirects; returns the response once its headers
    are in. C{byte_range}: C{(first, last)} byte asked for."""
    url = location.request_url
    headers = _headers(location, byte_range)
    access = settings.access
    for _ in range(MAX_REDIRECTS + 1):
        response = await _send(agent, location, settings, method, url, headers, timer, body)
        target = response.headers.getRawHeaders(b"location")
        if method != b"GET" or response.code not in _REDIRECTS or not target:
            return response
        response.deliverBody(_Discard())
        timer.touch()
        following = urljoin(url, target[0].decode("latin-1"))
        if access is not None:
            access = access.redirect(following)
            following = access.url
        elif urlsplit(following).scheme.lower() not in ("http", "https"):
            raise Forbidden(f"{location.shown}: redirect to a non-http URL refused")
        following = request_url(following)
        if _origin(following) != _origin(url) and headers.hasHeader(b"Authorization"):
            headers.removeHeader(b"Authorization")
        url = following
    raise Refused(f"{location.shown}: more than {MAX_REDIRECTS} redirects")


async def _send(agent, location, settings, method, url, headers, timer, body):
    d = agent.request(method, url.encode("ascii"), headers, body)
    timer.expire = d.cancel
    try:
        return await cancellable(d)
    except (CancelledError, TransferError):
        raise
    except Exception:
        raise _request_error(location, Failure(), timer, settings.timeouts) from None


class _BodyReceiver(SinkReceiver):
    """Hands a response body to C{sink}; C{done} fires at the end."""

    def __init__(self, sink, timer):
        super().__init__(sink, timer)
        # Cancelling reaches the receiver by a weak reference: a strong one would make a
        # cycle (receiver, Deferred, canceller), left for the garbage collector each body.
        receiver = weakref.ref(self)
        self.done = Deferred(lambda _: _abort(receiver()))

    def abort(self):
        if self.transport is not None:
            self.transport.stopProducing()

    def receiving(self):
        return not self.done.called

    def connectionLost(self, reason):
        self.stop_waiting()
        if self.done.called:
            return
        if self.error is not None:
            self.done.errback(self.error)
        # isinstance, not Failure.check: check names every class of the value's MRO, a
        # cost on every response body received.
        elif isinstance(reason.value, (ResponseDone, PotentialDataLoss)):
            self.done.callback(None)
        else:
            self.done.errback(reason)


def _abort(receiver):
    if receiver is not None:
        receiver.abort()


class _Discard(Protocol):
    def connectionMade(self):
        self.transport.stopProducing()


async def _receive_body(location, response, sink, timer, idle):
    receiver = _BodyReceiver(sink, timer)
    timer.expire = receiver.abort
    response.deliverBody(receiver)
    try:
        await receiver.done
    except (ResponseFailed, PartialDownloadError, net_error.ConnectionLost):
        if timer.expired:
            raise TransferTimeout(
                f"{location.shown}: no data for {idle:g} s after {receiver.received} bytes"
            ) from None
        expected = "" if response.length == UNKNOWN_LENGTH else f" of {response.length}"
        raise ShortTransfer(
            f"{location.shown}: connection lost after {receiver.received}{expected} bytes"
        ) from None
    except BadResponse as exc:
        raise ConnectionFailed(
            f"{location.shown}: bad response after {receiver.received} bytes: {exc}"
        ) from None


def _check_encoding(location, response):
    encodings = response.headers.getRawHeaders(b"content-encoding") or [b"identity"]
    if any(value.strip().lower() not in (b"identity", b"") for value in encodings):
        raise Refused(
            f"{location.shown}: server sent an encoded body ({b', '.join(encodings).decode()}) "
            "although identity was asked for"
        )


def _last_modified(response):
    value = response.headers.getRawHeaders(b"last-modified")
    if not value:
        return None
    try:
        return float(stringToDatetime(value[0]))
    except (ValueError, IndexError):
        return None


def _check_range(location, response, byte_range):
    """A 206 answering C{byte_range}, or the error saying why not."""
    if response.code == 200:
        raise RangeIgnored(f"{location.shown}: the server ignores range requests")
    if response.code != 206:
        raise _status_error(location, response)
    content_range = (response.headers.getRawHeaders(b"content-range") or [b""])[0]
    match = re.fullmatch(rb"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", content_range)
    if match is None or (int(match.group(1)), int(match.group(2))) != byte_range:
        raise Refused(
            f"{location.shown}: asked for bytes {byte_range[0]}-{byte_range[1]}, the server "
            f"answered {content_range.decode('latin-1')[:80]!r}"
        )


async def _get(reactor, location, settings, sink, byte_range=None):
    """GET C{location} (C{byte_range}: only those bytes), feeding the body to C{sink};
    returns the response."""
    timeouts = settings.timeouts
    timer = IdleTimer(reactor, timeouts.idle, first=timeouts.connect + timeouts.idle)
    paced = isinstance(sink, PacedSink)
    expected = getattr(sink, "expected_size", None)
    if byte_range is not None or paced:
        read_size = SMALL_READ_SIZE
    elif expected is not None and expected <= SMALL_FILE_READ_SIZE:
        read_size = SMALL_FILE_READ_SIZE
    else:
        read_size = READ_SIZE
    if settings.http_connections is None:
        agent = _agent(reactor, settings, read_size=read_size)
    else:
        agent = settings.http_connections.agent(settings, read_size)
    try:
        response = await _request(
            agent, location, settings, b"GET", timer, byte_range=byte_range
        )
        timer.touch()
        try:
            if byte_range is not None:
                _check_range(location, response, byte_range)
            elif response.code != 200:
                raise _status_error(location, response)
            _check_encoding(location, response)
            if response.length != UNKNOWN_LENGTH:
                sink.declare(response.length)
        except BaseException:
            response.deliverBody(_Discard())
            raise
        await _receive_body(location, response, sink, timer, timeouts.idle)
        return response
    finally:
        timer.stop()


async def fetch(reactor, location, sink, settings):
    """Stream the body of a GET into C{sink}; returns C{(Last-Modified, None)}, the date as a
    function parsing it when called (most notices carry their own mtime: no date to parse)."""
    response = await _get(reactor, location, settings, sink)
    return functools.partial(_last_modified, response), None


async def fetch_range(reactor, location, sink, settings, offset, length):
    """Stream the C{length} bytes at C{offset} of the file into C{sink} (a block)."""
    await _get(reactor, location, settings, sink, (offset, offset + length - 1))


async def listdir(reactor, location, settings, unless=None):
    """The entries of the index page at C{location} (see L{parse_html_index}), with the
    page's L{page_digest}; none, C{unchanged}, when that is C{unless} (the page not parsed)."""
    buffer = ListingBuffer(f"{location.shown}: index page")
    response = await _get(reactor, location, settings, buffer)
    content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0].decode("latin-1")
    body = b"".join(buffer.chunks)
    digest = page_digest(location.request_url, content_type, body)
    if unless is not None and digest == unless:
        return Listing(bytes=buffer.size, digest=digest, unchanged=True)
    match = re.search(r"charset=([\w.:-]+)", content_type, re.IGNORECASE)
    charset = match.group(1) if match else "utf-8"
    try:
        text = body.decode(charset, "replace")
    except LookupError:
        text = body.decode("utf-8", "replace")
    return Listing(parse_html_index(text, location.request_url), buffer.size, digest)


class _BodyProducer(FileBodyProducer):
    """A L{FileBodyProducer} of what C{reader.take} gives (read in the pool): its task waits
    for each piece before writing it, and ends with the last of C{length} bytes. Not after
    one more read: the server may answer as soon as it has them all, and the request's end
    stops the cooperator while that read runs (which failed the put with SchedulerStopped)."""

    def _writeloop(self, consumer):
        left = self.length
        while left > 0:
            piece = []
            taking = Deferred.fromCoroutine(self._inputFile.take(min(self._readSize, left)))
            taking.addCallback(piece.append)
            yield taking
            if not piece[0]:
                break  # the file shrank: the request fails short of its Content-Length
            consumer.write(piece[0])
            left -= len(piece[0])
        self._inputFile.close()


async def store(reactor, outgoing, location, settings):
    """PUT C{outgoing} to C{location} (no temporary name: HTTP has no rename)."""
    timeouts = settings.timeouts
    timer = IdleTimer(reactor, timeouts.idle, first=timeouts.connect + timeouts.idle)
    pacers = settings.pacers

    def in_debt():
        # Not after the last chunk: the producer ends with its last write, in the same tick,
        # before the server's answer can stop the cooperator under it.
        return outgoing.sent < outgoing.size and any(pacer.delay() > 0 for pacer in pacers)

    def schedule(work):
        # The next chunks wait for the bandwidth limit, if any (a wait that is ours).
        delay = max((pacer.delay() for pacer in pacers), default=0)
        if delay:
            timer.hold()
        return reactor.callLater(delay, work)

    if pacers:
        # A tick of the cooperator ends as soon as the limit is reached.
        cooperator = Cooperator(terminationPredicateFactory=lambda: in_debt, scheduler=schedule)
    else:
        cooperator = Cooperator(scheduler=lambda work: reactor.callLater(0, work))
    reader = ProgressReader(outgoing, timer.touch, pacers)
    body = _BodyProducer(reader, cooperator, PUT_CHUNK_SIZE)
    body.length = outgoing.size
    agent = _agent(reactor, settings)
    try:
        response = await _request(agent, location, settings, b"PUT", timer, body)
        response.deliverBody(_Discard())
        if response.code not in (200, 201, 204):
            raise _status_error(location, response)
    finally:
        timer.stop()
        cooperator.stop()
