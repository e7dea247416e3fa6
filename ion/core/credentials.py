"""The credentials file: every login ION uses, kept out of command lines and config files.

One private file, by default C{~/.config/ion/credentials.conf}, holds the broker accounts of
the container and the server logins of the pump's transfers. One login per line, blank lines
and lines starting with C{#} ignored; after the URL, a blank followed by C{#} starts a
comment::

    scheme://user[:password]@host[:port][/path] [option=value ...]

    amqp://ion:s3cret@rabbit.example.org/           # the container's broker
    amqps://ion:tls-pw@rabbit.example.org/
    https://alice:s3cret@data.example.org/
    ftp://anonymous:guest@ftp.example.org:2121/
    sftp://bob@feed.example.org/ ssh_key=~/.ssh/id_ed25519
    sftp://carol:pw@other.example.org/incoming/

  - Schemes: amqp, amqps, mqtt, mqtts, http, https, ftp, sftp. The port defaults to the
    scheme's (amqp 5672, amqps 5671, mqtt 1883, mqtts 8883, http 80, https 443, ftp 21, sftp
    22); host names are not case sensitive.
  - The user and password are percent-encoded as in any URL (C{p%40ss} is C{p@ss}; encode
    C{@ : / ? # %} and blanks). The password is optional, e.g. for an sftp line with a key.
  - A path other than C{/} restricts the line to URLs under that path; the longest match wins,
    the first line among equals.
  - Option C{ssh_key=PATH}: a private key file (OpenSSH or PEM format, without passphrase)
    tried before the password for sftp; C{~} is expanded.
  - A broker line (amqp, amqps, mqtt, mqtts) is exactly C{amqp[s]://user:password@host[:port]/}: its
    password serves that user on every virtual host, so it takes no path and no option.

The file must be a regular file readable by its owner only (C{chmod 600}): a file that group
or others may read or write is refused, as the passwords in it may already have leaked. A
malformed line makes the whole file unusable. No error message or repr ever contains a
password, or a line of the file (which may hold one); errors name the file and line number.

For example::

    credentials = Credentials.load(os.path.expanduser("~/.config/ion/credentials.conf"))
    credentials.find("sftp://feed.example.org/data/x.bin")       # a Credential, or None
    credentials.password("amqp://ion@rabbit.example.org/")       # "s3cret", or None
"""

import itertools
import os
import stat
from urllib.parse import unquote, urlsplit

import attrs

DEFAULT_CREDENTIALS = "~/.config/ion/credentials.conf"
DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671, "mqtt": 1883, "mqtts": 8883, "http": 80,
                 "https": 443, "ftp": 21, "sftp": 22}
BROKER_SCHEMES = ("amqp", "amqps", "mqtt", "mqtts")
OPTIONS = ("ssh_key",)
# Shown in errors, which go through ion.core.log.redact: written so that no part of it looks
# like a password in a URL (redact would mask "[:password]@host" too).
LINE_FORMAT = (
    "scheme://user@host[:port][/path] [option=value ...], "
    "a password (if any) after the user as user:password"
)
BROKER_LINE_FORMAT = "amqp[s]|mqtt[s]://user:password@host[:port]/"


class CredentialsError(ValueError):
    """The credentials file cannot be used (unreadable, not private, or malformed). The
    message names the file (and line), never a password. A ValueError: bad input, like bad
    arguments."""


@attrs.frozen
class Credential:
    """One line of the credentials file; repr() leaves the password out."""

    scheme: str
    host: str
    port: int
    user: str | None
    password: str | None = attrs.field(default=None, repr=False)
    path: str = "/"
    ssh_key: str | None = None

    def matches(self, scheme, host, port, user, path="/"):
        """Whether this line serves a URL with these parts (C{user=None}: any user)."""
        return (
            self.scheme == scheme
            and self.host == host
            and self.port == port
            and (user is None or self.user == user)
            and _under(path, self.path)
        )


def remove_dot_segments(path):
    """C{path} (absolute) with its C{.} and C{..} segments resolved, as a server reads it: a
    line for C{/private/} must not serve C{/private/../ok/x}; a C{..} never climbs above
    C{/}; a path ending in C{.} or C{..} ends in C{/}."""
    kept = []
    segments = path.split("/")
    for segment in segments:
        if segment == "..":
            if len(kept) > 1:
                kept.pop()
        elif segment != ".":
            kept.append(segment)
    if segments[-1] in (".", "..") and kept[-1:] != [""]:
        kept.append("")
    return "/".join(kept) or "/"


def _under(path, prefix):
    if prefix in ("", "/"):
        return True
    prefix = prefix.rstrip("/")
    return path == prefix or path.startswith(prefix + "/")


def url_parts(url):
    """C{(scheme, host, port, user, password, path)} of a URL: scheme and host lower-cased,
    the scheme's default port filled in (0 for a scheme not listed), user and password
    percent-decoded (C{None} when absent), path C{/} when empty. Raises ValueError for a
    malformed URL or a bad port number (the message may quote the URL: do not show it)."""
    try:
        parts = urlsplit(url)
    except ValueError:  # its message may quote the URL, password and all
        raise ValueError("malformed URL (unbalanced [] around the host?)") from None
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        raise ValueError("bad port number") from None
    user = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    port = port or DEFAULT_PORTS.get(scheme, 0)
    return scheme, (parts.hostname or "").lower(), port, user, password, parts.path or "/"


@attrs.frozen(repr=False)
class Credentials:
    """The lines of a credentials file, in file order, looked up by URL."""

    entries: tuple = attrs.field(default=(), converter=tuple)

    def __repr__(self):
        return f"<Credentials: {len(self.entries)} entries>"

    def __iter__(self):
        return iter(self.entries)

    def __len__(self):
        return len(self.entries)

    @classmethod
    def load(cls, path):
        """Read the credentials file at C{path}.

        @raise CredentialsError: the file is missing or unreadable, not a regular file, open
            to group or others, not UTF-8, or has a malformed line.
        """
        try:
            text = read_private_file(path).decode("utf-8")
        except UnicodeDecodeError:
            raise CredentialsError(f"credentials file {path} is not UTF-8 text") from None
        return cls.parse(text, path)

    @classmethod
    def parse(cls, text, path="<credentials>"):
        """The credentials in C{text} (the file's content); C{path} only names it in errors."""
        entries = []
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            entries.append(_parse_line(line, f"{path}, line {number}"))
        return cls(entries)

    def find(self, url):
        """The credential for C{url}, or C{None}: the longest path match among the lines of
        the same scheme, host and port (and user, when the URL names one)."""
        try:
            scheme, host, port, user, _, path = url_parts(url)
        except ValueError:
            return None
        return _best(self.entries, scheme, host, port, user, remove_dot_segments(path))

    def password(self, url):
        """The password of the line for the scheme, host, port (default ports filled in) and
        user of C{url} (a broker URL, say); C{None} when the URL names no user, or no line
        serves it (L{find}'s line, when the URL names a user)."""
        try:
            user = url_parts(url)[3]
        except ValueError:
            return None
        best = None if user is None else self.find(url)
        return None if best is None else best.password


def _best(entries, scheme, host, port, user, path):
    best = None
    for entry in entries:
        if entry.matches(scheme, host, port, user, path):
            if best is None or len(entry.path) > len(best.path):
                best = entry
    return best


def read_private_file(path, what="credentials file"):
    """
    The bytes of the file at C{path}, after checking that it is a regular file only its owner
    has access to. Any file holding a secret is read this way: the credentials file, the
    broker's TLS client key.

    @param what: names the file in error messages ("credentials file", "broker key file").
    @raise CredentialsError: one line naming the file, and for a file open to group or
        others the C{chmod} that fixes it.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not hang us
    except OSError as e:
        raise CredentialsError(f"cannot read {what} {path}: {e.strerror}") from None
    # Checked on the open file, so that the file read is the file checked.
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise CredentialsError(f"{what} {path} is not a regular file")
        if mode & 0o077:
            raise CredentialsError(
                f"{what} {path} is open to group or others (mode "
                f"{stat.S_IMODE(mode):04o}); make it private with: chmod 600 {path}"
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    except OSError as e:
        raise CredentialsError(f"cannot read {what} {path}: {e.strerror}") from None
    finally:
        os.close(fd)


def _parse_line(line, where):
    """The L{Credential} of one line, stripped, neither blank nor a comment. Error messages
    show nothing of the line: any part of it may be (or hold) a password."""
    # A URL has no blanks, so a blank ends it; what follows is options, then maybe a comment.
    url, *words = line.split()
    options = list(itertools.takewhile(lambda word: not word.startswith("#"), words))
    try:
        scheme, host, port, user, password, path = url_parts(url)
    except ValueError as e:  # url_parts says what, never quoting the URL
        raise CredentialsError(f"{where}: {e}; expected {LINE_FORMAT}") from None
    parts = urlsplit(url)  # it has parsed already
    if "://" not in url or not scheme or not host:
        raise CredentialsError(f"{where}: expected {LINE_FORMAT}")
    if scheme not in DEFAULT_PORTS:
        known = ", ".join(DEFAULT_PORTS)
        raise CredentialsError(f"{where}: unknown scheme; the schemes are {known}")
    if parts.query or parts.fragment:
        raise CredentialsError(
            f"{where}: a credentials URL has no ?query or #fragment "
            "(in a user or password, write ? as %3F and # as %23)"
        )
    if scheme in BROKER_SCHEMES:
        if user is None or password is None or path != "/" or options:
            raise CredentialsError(
                f"{where}: expected {BROKER_LINE_FORMAT} (no path or option on a broker line)"
            )
        return Credential(scheme, host, port, user, password)
    values = {}
    for option in options:
        name, sep, value = option.partition("=")
        if name not in OPTIONS or not sep or not value:
            # Nothing of it is echoed: text after the URL may be part of a password.
            raise CredentialsError(
                f"{where}: unknown option after the URL; options are "
                f"{', '.join(name + '=...' for name in OPTIONS)}"
            )
        values[name] = os.path.expanduser(value)
    return Credential(scheme, host, port, user, password, path, **values)
