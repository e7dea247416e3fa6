"""Which URLs a notice may make the pump fetch, and which addresses it may connect to.

A notice names its file with a URL chosen by whoever posted it. Fetched as it is, that URL
reads the pump's own files (C{file:}), asks services only this machine can reach (loopback,
link-local, its own addresses) and gets the pump's logins sent along. A L{UrlPolicy} decides,
for each notice and its C{source}, what it may reach; the consumer builds one from its
C{sources} argument.

C{sources}: a list of URL prefixes notices may point at. An entry is a string, or a dict
C{{'url': prefix, 'credentials': True}} that also lets the pump's credentials file serve URLs
under that prefix::

    sources = ['https://data.example.org/obs/',
               'http://10.2.0.7:8080/',
               {'url': 'https://feed.example.org/private/', 'credentials': True},
               'file:///srv/incoming/']

The decision, for a notice whose C{source} is not the pump's own user:

  - with C{sources}: the URL must be under one of the prefixes, else it is refused. A prefix names
    its origin (scheme, host, port): the addresses that origin's host resolves to are accepted
    whatever they are (the operator listed it), so a prefix is how a loopback or C{file:} source
    is allowed;
  - without C{sources}: C{http}, C{https}, C{sftp} and C{ftp} URLs to any host, except a host
    that resolves to a loopback, link-local, unspecified (C{0.0.0.0/8}, C{::}) or multicast
    address or to one of this machine's own addresses; C{file:} is refused;
  - the pump's credentials file serves the URL only under a prefix given with
    C{'credentials': True}. A user and password in the URL itself are the poster's and are used.

Notices from the pump's own user (its polls and watches) are trusted: any scheme the transfers
know, any address, the credentials file.

Matching is done on the normalized URL: scheme and host lower-cased, the host IDNA-encoded, a
numeric IPv4 host in any spelling (C{127.1}, C{0x7f.1}, C{2130706433}) and an IPv4-mapped IPv6
one (C{[::ffff:127.0.0.1]}) written as its dotted quad, the default port made explicit,
percent-escapes of unreserved characters decoded and C{.} and C{..} segments resolved (so
C{/private/../ok/x} is C{/ok/x}, not under C{/private/}). A path that still holds a C{..}
after decoding its escapes (C{..%2F}) is refused: a server could read it as one. The
normalized URL is the one fetched.

The address checked is the address connected to: the host is resolved once (through the
reactor's resolver, never blocking it), every address it resolves to is checked, and the
connection goes to a checked address (L{Access.addresses}); TLS still verifies the host name.
This machine's own addresses are those of C{/proc/net/fib_trie} (local IPv4) and
C{/proc/net/if_inet6}, with what C{gethostname()} resolves to, looked up in a thread at most
once a minute.
"""

import functools
import ipaddress
import re
import socket
import time
from urllib.parse import quote, unquote, urlsplit

import attrs
from twisted.internet import defer, threads
from twisted.internet import error as net_error
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    connectProtocol,
)
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IResolutionReceiver, IStreamClientEndpoint
from zope.interface import implementer

from ion.apps.pump.transfer import origin
from ion.apps.pump.transfer.errors import (
    BadRequest,
    ConnectionFailed,
    TransferError,
    TransferTimeout,
)
from ion.apps.pump.transfer.limits import SharedResult, cancellable
from ion.core.credentials import DEFAULT_PORTS, remove_dot_segments

# What a notice may name without being from the pump's own user.
DEFAULT_SCHEMES = ("http", "https", "sftp", "ftp")
KNOWN_SCHEMES = ("file",) + DEFAULT_SCHEMES
# Redirects followed for one request, at most.
MAX_REDIRECTS = 5
# How long a reading of this machine's own addresses is used.
OWN_ADDRESSES_TTL = 60.0

_UNRESERVED = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ZERO_NET = ipaddress.ip_network("0.0.0.0/8")


class Forbidden(TransferError):
    """The URL policy refuses the URL or the address it resolves to (403, never retried)."""

    code = 403


@attrs.frozen
class NormalUrl:
    """A URL in the normalized form the policy matches (see the module docstring)."""

    scheme: str
    host: str
    port: int
    path: str
    query: str = ""
    userinfo: str = attrs.field(default="", repr=False)

    @property
    def origin(self):
        return (self.scheme, self.host, self.port)

    def text(self):
        """The URL to fetch, with the user and password it came with."""
        if self.scheme == "file":
            return "file://" + quote(self.path, safe="/")
        host = f"[{self.host}]" if ":" in self.host else self.host
        userinfo = f"{self.userinfo}@" if self.userinfo else ""
        query = f"?{self.query}" if self.query else ""
        return f"{self.scheme}://{userinfo}{host}:{self.port}{self.path}{query}"

    def under(self, prefix):
        """Whether this URL is C{prefix} or below it (on path segment boundaries)."""
        if self.origin != prefix.origin:
            return False
        base = prefix.path.removesuffix("/")
        return self.path == base or self.path.startswith(base + "/")


def _ipv4_number(label):
    if re.fullmatch(r"0[xX][0-9A-Fa-f]*", label):
        return int(label[2:] or "0", 16)
    if re.fullmatch(r"0[0-7]+", label):
        return int(label, 8)
    if re.fullmatch(r"[0-9]+", label):
        return int(label, 10)
    return None


def _numeric_ipv4(host):
    """The dotted quad of a host written as an IPv4 number in any of the spellings resolvers
    accept (C{127.1}, C{0x7f.0.0.1}, C{0177.1}, C{2130706433}); None for a host name.
    ValueError for a host that looks numeric but is no address."""
    labels = host.split(".")
    if not labels or _ipv4_number(labels[-1]) is None:
        return None
    numbers = [_ipv4_number(label) for label in labels]
    if len(numbers) > 4 or None in numbers:
        raise ValueError(f"bad IPv4 address {host!r}")
    last = numbers.pop()
    if any(n > 255 for n in numbers) or last >= 256 ** (4 - len(numbers)):
        raise ValueError(f"bad IPv4 address {host!r}")
    value = last
    for index, n in enumerate(numbers):
        value += n << (8 * (3 - index))
    return str(ipaddress.IPv4Address(value))


# A pump fetches from few hosts: each spelling is worked out once (ValueErrors are not kept).
@functools.lru_cache(maxsize=1024)
def _normal_host(host):
    if not host:
        raise ValueError("no host")
    if "%" in host:
        raise ValueError("percent-escapes or a zone id in the host")
    if ":" in host:
        address = ipaddress.IPv6Address(host)
        mapped = _as_ipv4(address)
        return str(mapped if mapped is not None else address)
    try:
        host = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise ValueError("host name is not valid IDNA") from None
    if host.endswith("."):
        host = host[:-1]
    numeric = _numeric_ipv4(host)
    return numeric if numeric is not None else host


# A notice's host normalized once per host rather than once per notice (failures are not
# kept: they raise again).
_normal_host_of = functools.lru_cache(maxsize=256)(_normal_host)


def _decode_unreserved(segment):
    def one(match):
        char = chr(int(match.group(1), 16))
        return char if char in _UNRESERVED_CHARS else "%" + match.group(1).upper()

    return _UNRESERVED.sub(one, segment)


def _normal_path(path, decode_all):
    if (
        not decode_all
        and path[:1] == "/"
        and "%" not in path
        and "/." not in path
        and "\\" not in path
    ):
        # Nothing to decode, no "." or ".." segment, nothing a server could read as one:
        # already normal, as most URLs a notice names are (the steps below cost about 1.5%
        # of the pump container's time per 4 KiB file).
        return path
    if decode_all:
        # A local path: decoded once, as the file scheme opens it.
        path = unquote(path)
    else:
        path = "/".join(_decode_unreserved(s) for s in path.split("/"))
    # What stands before the first "/" is no part of the path (only file:x has something).
    normal = remove_dot_segments("/" + path.partition("/")[2])
    # What a server decodes further must not turn into a step up either.
    layer = normal
    for _ in range(8):
        decoded = unquote(layer)
        if any(part in ("..", ".") for part in re.split(r"[/\\]", decoded)[1:]):
            raise ValueError("a percent-encoded '.' or '..' segment in the path")
        if decoded == layer:
            break
        layer = decoded
    return normal


def normalize(url):
    """The L{NormalUrl} of C{url}; ValueError for a URL that cannot be normalized (the
    message never quotes the URL: it may hold a password)."""
    if not isinstance(url, str) or "\0" in url:
        raise ValueError("not a URL")
    split = origin.split(url)
    if split is not None:
        # http(s) with no login in it: the origin's parts were taken apart before.
        where, path, query = split
        host = _normal_host_of(where.host)
        path = _normal_path(path or "/", decode_all=False)
        return NormalUrl(where.scheme, host, where.port or DEFAULT_PORTS[where.scheme], path, query)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError("malformed URL (bad port, or unbalanced [] around the host)") from None
    scheme = parts.scheme.lower()
    if scheme not in KNOWN_SCHEMES:
        raise ValueError(f"unsupported scheme {scheme!r}")
    if scheme == "file":
        host = (parts.hostname or "").lower()
        if host not in ("", "localhost") or parts.port is not None:
            raise ValueError("a file URL names a local file only")
        path = _normal_path(parts.path or "/", decode_all=True)
        return NormalUrl("file", "", 0, path)
    userinfo = parts.netloc.rpartition("@")[0] if "@" in parts.netloc else ""
    host = _normal_host(parts.hostname or "")
    path = _normal_path(parts.path or "/", decode_all=False)
    return NormalUrl(scheme, host, port or DEFAULT_PORTS[scheme], path, parts.query, userinfo)


def _normalized(url, error, what):
    """The L{NormalUrl} of C{url}, else C{error("what: why")}."""
    try:
        return normalize(url)
    except ValueError as e:
        raise error(f"{what}: {e}") from None


def _as_ipv4(address):
    """The IPv4 address an IPv6 one stands for (mapped C{::ffff:a.b.c.d} or compatible
    C{::a.b.c.d}), else None."""
    if address.version != 6:
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if int(address) >> 32 == 0 and int(address) > 1:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def special_address(text, own=()):
    """Why the address C{text} is not for notices from others (C{'loopback'}, ...), or None.
    C{own}: this machine's own addresses (ipaddress objects)."""
    address = ipaddress.ip_address(text.split("%", 1)[0])
    address = _as_ipv4(address) or address
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_unspecified or address in (_ZERO_NET if address.version == 4 else ()):
        return "unspecified"
    if address.is_multicast:
        return "multicast"
    if address in own:
        return "an address of this machine"
    return None


def read_own_addresses():
    """This machine's own addresses, as a frozenset of ipaddress objects (blocking: run it in
    a thread)."""
    found = set()
    try:
        with open("/proc/net/fib_trie") as f:
            previous = None
            for line in f:
                words = line.split()
                if words[:2] == ["/32", "host"] and words[-1] == "LOCAL" and previous:
                    found.add(previous)
                elif len(words) == 2 and words[0] in ("|--", "+--"):
                    previous = words[1].split("/")[0]
    except OSError:
        pass
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                hexa = line.split()[0]
                found.add(":".join(hexa[i : i + 4] for i in range(0, 32, 4)))
    except (OSError, IndexError):
        pass
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            found.add(info[4][0])
    except OSError:
        pass
    addresses = set()
    for text in found:
        try:
            address = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            continue
        addresses.add(_as_ipv4(address) or address)
    return frozenset(addresses)


class OwnAddresses:
    """This machine's own addresses, read in a thread at most once every C{ttl} seconds."""

    def __init__(self, ttl=OWN_ADDRESSES_TTL, read=read_own_addresses):
        self.ttl = ttl
        self._read = read
        self._addresses = None
        self._when = None
        self._reading = None  # a SharedResult, for every caller that comes while it runs

    async def get(self, reactor):
        if self._addresses is not None and time.monotonic() - self._when < self.ttl:
            return self._addresses
        if self._reading is None or self._reading.done:
            reading = threads.deferToThreadPool(reactor, reactor.getThreadPool(), self._read)
            self._reading = SharedResult(reading.addCallback(self._fresh))
        return await self._reading.observe()

    def _fresh(self, addresses):
        self._addresses, self._when = addresses, time.monotonic()
        return addresses


@implementer(IResolutionReceiver)
class _Addresses:
    def __init__(self):
        self.found = []
        self.done = defer.Deferred()

    def resolutionBegan(self, resolution):
        pass

    def addressResolved(self, address):
        if address.host not in self.found:
            self.found.append(address.host)

    def resolutionComplete(self):
        self.done.callback(self.found)


async def resolve(reactor, host, port):
    """The addresses C{host} resolves to, through the reactor's resolver (an IP address is
    its own answer)."""
    try:
        ipaddress.ip_address(host)
        return [host]
    except ValueError:
        pass
    receiver = _Addresses()
    reactor.nameResolver.resolveHostName(receiver, host, port)
    found = await receiver.done
    if not found:
        raise ConnectionFailed(f"cannot resolve host {host!r}")
    return found


def _prefix(entry, who):
    credentials = False
    if isinstance(entry, dict):
        if set(entry) - {"url", "credentials"} or "url" not in entry:
            raise ValueError(
                f"{who}: a sources entry is a URL prefix or {{'url': ..., 'credentials': "
                f"True|False}}, got keys {sorted(entry)}"
            )
        credentials = entry.get("credentials", False)
        if not isinstance(credentials, bool):
            raise ValueError(f"{who}: sources credentials must be True or False")
        entry = entry["url"]
    if not isinstance(entry, str) or "://" not in entry:
        raise ValueError(f"{who}: a sources prefix must be a URL such as https://host/dir/")
    if "@" in urlsplit(entry).netloc:
        raise ValueError(
            f"{who}: a sources prefix holds no user or password (logins go in the "
            "credentials file)"
        )
    normal = _normalized(entry, ValueError, f"{who}: sources prefix {entry!r}")
    if normal.query:
        raise ValueError(f"{who}: sources prefix {entry!r} has a ?query")
    return _Prefix(normal, credentials)


@attrs.frozen
class _Prefix:
    url: NormalUrl
    credentials: bool


class UrlPolicy:
    """What notices may reach, from a subscription's C{sources} (see the module docstring).
    C{own_user}: the pump's user, whose notices are trusted. ValueError for a bad
    C{sources}, naming C{who}."""

    def __init__(self, sources=None, own_user=None, who="sources", own_addresses=None):
        if sources is not None and (
            isinstance(sources, (str, dict)) or not isinstance(sources, (list, tuple))
        ):
            raise ValueError(f"{who}: sources must be a list of URL prefixes, got {sources!r}")
        self.prefixes = None if sources is None else [_prefix(e, who) for e in sources]
        self.own_user = own_user
        self.own_addresses = own_addresses or OwnAddresses()

    def judge(self, url, source):
        """The L{Access} a notice from C{source} has to C{url}; L{Forbidden} when the policy
        refuses it, L{BadRequest} for a URL that cannot be normalized."""
        normal = _normalized(url, BadRequest, "unusable URL")
        if source is not None and source == self.own_user:
            return Access(self, normal, trusted=True, credentials=True)
        if self.prefixes is None:
            if normal.scheme not in DEFAULT_SCHEMES:
                raise Forbidden(
                    f"{normal.scheme}: URLs are not fetched for source {source!r} (list them "
                    "in the subscription's sources to allow them)"
                )
            return Access(self, normal, trusted=False, credentials=False)
        matched = [p for p in self.prefixes if normal.under(p.url)]
        if not matched:
            raise Forbidden(f"URL of source {source!r} is under none of the subscription's sources")
        return Access(self, normal, trusted=False, credentials=any(p.credentials for p in matched))

    async def addresses(self, reactor, scheme, host, port, trusted=False):
        """The addresses C{host} resolves to, once, each checked: any for a C{trusted}
        source or an origin C{sources} names, else none of the special ones (L{Forbidden}).
        The decision depends on the origin only, so connections may be shared by the
        notices of one policy."""
        addresses = await resolve(reactor, host, port)
        if trusted or self.names_origin((scheme, host, port)):
            return addresses
        own = await self.own_addresses.get(reactor)
        for address in addresses:
            why = special_address(address, own)
            if why is not None:
                shown = f"[{host}]" if ":" in host else host
                raise Forbidden(
                    f"{scheme}://{shown}:{port}: address {address} is {why}; not fetched for "
                    "notices from other sources unless the subscription's sources list it"
                )
        return addresses

    def names_origin(self, origin):
        """Whether a prefix of C{sources} names this (scheme, host, port)."""
        return self.prefixes is not None and any(p.url.origin == origin for p in self.prefixes)


@attrs.frozen
class Access:
    """What one notice may reach: its URL normalized (L{url}), whether its source is trusted
    (the pump's own user), and whether the credentials file may serve it."""

    policy: UrlPolicy = attrs.field(repr=False)
    normal: NormalUrl
    trusted: bool
    credentials: bool

    @property
    def url(self):
        return self.normal.text()

    def redirect(self, url):
        """The L{Access} for a redirect to C{url} (http or https only); L{Forbidden} when the
        policy refuses it. Credentials never follow a redirect."""
        normal = _normalized(url, Forbidden, "redirect to an unusable URL")
        if normal.scheme not in ("http", "https"):
            raise Forbidden(f"redirect to a {normal.scheme}: URL refused")
        if self.trusted:
            return Access(self.policy, normal, trusted=True, credentials=False)
        prefixes = self.policy.prefixes
        if prefixes is not None and not any(normal.under(p.url) for p in prefixes):
            raise Forbidden("redirect to a URL under none of the subscription's sources")
        return Access(self.policy, normal, trusted=False, credentials=False)

    async def addresses(self, reactor, scheme, host, port):
        """The addresses to connect to for C{host}: resolved once, every one checked;
        L{Forbidden} when one of them is not for this notice's source."""
        return await self.policy.addresses(reactor, scheme, host, port, self.trusted)


async def connect(reactor, location, settings, protocol):
    """Connect C{protocol} to C{location} (sftp, ftp): to the host name under a trusted
    access (or none), else to an address C{settings.access} checked. A failure to connect
    becomes a L{TransferError} (L{TransferTimeout}, or L{ConnectionFailed} for a host that
    does not resolve, a refused or failed connection)."""
    shown, host, port = location.shown, location.host, location.port
    timeout = settings.timeouts.connect
    access = settings.access
    try:
        if access is None or access.trusted:
            endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
        else:
            addresses = await access.addresses(reactor, location.scheme, host, port)
            endpoint = AddressesEndpoint(reactor, addresses, port, timeout)
        return await cancellable(connectProtocol(endpoint, protocol))
    except (net_error.TimeoutError, net_error.ConnectingCancelledError):
        raise TransferTimeout(
            f"{shown}: no connection within {settings.timeouts.connect:g} s"
        ) from None
    except net_error.DNSLookupError:
        # Not a ConnectError: without this it would reach the caller as a server fault.
        raise ConnectionFailed(f"{shown}: cannot resolve host {host!r}") from None
    except net_error.ConnectionRefusedError:
        raise ConnectionFailed(f"{shown}: connection refused") from None
    except net_error.ConnectError as exc:
        raise ConnectionFailed(f"{shown}: cannot connect: {exc}") from None


@implementer(IStreamClientEndpoint)
class AddressesEndpoint:
    """Connects to checked addresses (IP literals), trying each in turn until one answers;
    C{wrap} (TLS, say) is applied to each address's endpoint."""

    def __init__(self, reactor, addresses, port, timeout, wrap=None):
        self._reactor = reactor
        self._addresses = list(addresses)
        self._port = port
        self._timeout = timeout
        self._wrap = wrap

    def connect(self, factory):
        return defer.Deferred.fromCoroutine(self._connect(factory))

    async def _connect(self, factory):
        for index, address in enumerate(self._addresses):
            tcp = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
            endpoint = tcp(self._reactor, address, self._port, timeout=self._timeout)
            if self._wrap is not None:
                endpoint = self._wrap(endpoint)
            try:
                return await endpoint.connect(factory)
            except ConnectError:
                if index == len(self._addresses) - 1:
                    raise
