"""Where a transfer goes: a URL taken apart, with the login that applies to it."""

from urllib.parse import quote, unquote, urlsplit, urlunsplit

import attrs

from ion.apps.pump.transfer import origin
from ion.apps.pump.transfer.errors import BadRequest
from ion.apps.pump.transfer.limits import Timeouts
from ion.core.credentials import DEFAULT_PORTS, url_parts
from ion.core.log import redact

SCHEMES = ("file", "http", "https", "sftp", "ftp")
_URL_SAFE = ":/?#[]@!$&'()*+,;=%~"


@attrs.frozen
class Settings:
    """How to reach a server, beyond its URL: each field is the argument of that name of
    L{ion.apps.pump.transfer.get}, where it is described; C{None} for the default."""

    timeouts: Timeouts = Timeouts()
    ca_file: str | None = None
    known_hosts: str | None = None
    http_connections: object = None
    pool: object = None
    access: object = None
    pacers: tuple = ()
    sessions: object = None


@attrs.frozen
class Location:
    """
    A URL taken apart. C{shown} is the URL with its password redacted, for messages; C{path}
    is percent-decoded (a local path for C{file}).
    """

    shown: str
    scheme: str
    host: str
    port: int
    path: str
    user: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    ssh_key: str | None = None
    request_url: str = attrs.field(default="", repr=False)


def locate(url, credentials=None):
    """
    The L{Location} of C{url}, with the login from the URL or else from C{credentials}.

    @raise BadRequest: unknown scheme or malformed URL.
    """
    split = origin.split(url)
    if split is not None:
        # An http(s) URL without a login in it (nothing to redact), its origin parsed before.
        where, path, query = split
        user = password = ssh_key = None
        if credentials is not None:
            entry = credentials.find(url)
            if entry is not None:
                user, password, ssh_key = entry.user, entry.password, entry.ssh_key
        port = where.port or DEFAULT_PORTS[where.scheme]
        return Location(
            url, where.scheme, where.host, port, unquote(path or "/"), user, password, ssh_key,
            _request_url(where, path, query),
        )
    shown = redact(url)
    try:
        scheme, host, port, user, password, path = url_parts(url)
    except ValueError as e:
        raise BadRequest(f"{shown}: {e}") from None
    if scheme not in SCHEMES:
        raise BadRequest(
            f"{shown}: unsupported scheme {scheme!r}; supported are {', '.join(SCHEMES)}"
        )
    if scheme == "file":
        return Location(shown, "file", "", 0, _local_path(url, shown))
    if not host:
        raise BadRequest(f"{shown}: no host in URL")
    ssh_key = None
    if password is None and credentials is not None:
        entry = credentials.find(url)
        if entry is not None:
            user, password, ssh_key = entry.user, entry.password, entry.ssh_key
    return Location(
        shown, scheme, host, port, unquote(path), user, password, ssh_key, request_url(url)
    )


def request_url(url):
    """C{url} as an http request names it: no user, password or fragment, ASCII only."""
    split = origin.split(url)
    if split is not None:
        return _request_url(*split)
    parts = urlsplit(url)
    if not parts.hostname:
        raise BadRequest(f"{redact(url)}: no host in URL")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    # Agents send ASCII: percent-encode what is not, leave existing escapes alone.
    return quote(
        urlunsplit((parts.scheme.lower(), netloc, parts.path or "/", parts.query, "")),
        safe=_URL_SAFE,
    )


def _request_url(where, path, query):
    """L{request_url} of the parts of L{origin.split}."""
    host = f"[{where.host}]" if ":" in where.host else where.host
    netloc = host if where.port is None else f"{host}:{where.port}"
    text = f"{where.scheme}://{netloc}{path or '/'}"
    if query:
        text = f"{text}?{query}"
    return quote(text, safe=_URL_SAFE)


def _local_path(url, shown):
    rest = url[len("file:") :]
    if rest.startswith("//"):
        host, slash, path = rest[2:].partition("/")
        if host not in ("", "localhost"):
            raise BadRequest(f"{shown}: file URLs name local files only, not host {host!r}")
        path = slash + path
    else:
        path = rest
    path = unquote(path.split("?", 1)[0].split("#", 1)[0])
    if not path or "\0" in path:
        raise BadRequest(f"{shown}: no usable path")
    return path
