"""AMQP URLs: where and as whom to connect."""

import re
import urllib.parse

import attrs

from ion.core.log import redact

DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671}

# A comma that starts another URL (the text after it has a scheme).
_NEXT_URL = re.compile(r"\s*,\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")


def split_urls(text):
    """The broker URLs of C{text}: several URLs separated by commas
    (C{amqp://u@h1/,amqp://u@h2/}), and a URL whose host part lists several hosts
    (C{amqp://u@h1:5672,h2:5673/vhost}, the same login and vhost on each) stands for one URL
    per host. Order is kept. ValueError (never quoting a password) for an empty entry."""
    urls = []
    for url in _NEXT_URL.split(text.strip()):
        scheme, sep, rest = url.partition("://")
        netloc, slash, path = rest.partition("/")
        userinfo, at, hosts = netloc.rpartition("@")
        if not sep or "," not in hosts:
            urls.append(url)
            continue
        for host in hosts.split(","):
            if not host.strip():
                raise ValueError(f"bad broker URL {redact(url)!r}: an empty host in its list")
            urls.append(f"{scheme}://{userinfo}{at}{host.strip()}{slash}{path}")
    if any(not url for url in urls):
        raise ValueError(f"bad broker URL list {redact(text)!r}: an empty entry")
    return urls


@attrs.frozen(repr=False)
class AmqpAddress:
    """Where and as whom to connect, from C{amqp[s]://user:password@host:port/vhost}.
    Its str() and repr() show the password as C{***}."""

    tls: bool
    host: str
    port: int
    user: str
    password: str
    vhost: str

    @classmethod
    def parse(cls, url):
        """Read an AMQP URL (RabbitMQ's URI spec: user, password and vhost percent-encoded;
        no path or C{/} means the vhost C{/}). Missing user and password mean guest/guest.
        Raises ValueError, whose message never contains the password."""
        shown = redact(url)
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise ValueError(f"bad AMQP URL {shown!r}: {_url_problem(e)}") from None
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise ValueError(f"bad AMQP URL {shown!r}: the scheme must be amqp or amqps")
        if not parts.hostname:
            raise ValueError(f"bad AMQP URL {shown!r}: no host")
        if parts.query or parts.fragment:
            raise ValueError(f"bad AMQP URL {shown!r}: query parameters are not supported")
        path = parts.path
        if path in ("", "/"):
            vhost = "/"
        else:
            if "/" in path[1:]:
                raise ValueError(
                    f"bad AMQP URL {shown!r}: write a '/' inside the vhost name as %2F"
                )
            vhost = urllib.parse.unquote(path[1:])
        unquote = urllib.parse.unquote
        return cls(
            tls=scheme == "amqps",
            host=parts.hostname,
            port=port or DEFAULT_PORTS[scheme],
            user=unquote(parts.username) if parts.username is not None else "guest",
            password=unquote(parts.password) if parts.password is not None else "guest",
            vhost=vhost,
        )

    def __str__(self):
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = urllib.parse.quote(self.user, safe="")
        vhost = urllib.parse.quote(self.vhost, safe="")
        return f"amqp{'s' if self.tls else ''}://{user}:***@{host}:{self.port}/{vhost}"

    def __repr__(self):
        return f"AmqpAddress({str(self)!r})"


def _url_problem(error):
    """What urllib found wrong with a URL, without the text it quotes: its port and netloc
    messages quote what it took for the port or host, which may be a piece of a password."""
    text = str(error)
    if text.startswith("Port out of range") or text == "Invalid IPv6 URL":
        return text
    return (
        "cannot read its host and port (a '/', '?', '#' or '@' in a user name or password "
        "must be written %2F, %3F, %23, %40)"
    )
