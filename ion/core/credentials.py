"""Broker passwords kept out of command lines and config files, in a private credentials file.

The file has one broker account per line, `amqp[s]://user:password@host[:port]/` (user and
password percent-encoded as in any URL), blank lines and `#` comments. It must be readable by
its owner only (`chmod 600`): a file that group or others may read or write is refused, as the
passwords in it may already have leaked.

    creds = load_credentials(os.path.expanduser("~/.config/ion/credentials.conf"))
    password = find_password(creds, "amqp://alice@broker.example/")

No error message ever contains a password, or a line of the file (which would hold one).
"""

import os
import stat
import urllib.parse

import attr

DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671}
LINE_FORMAT = "amqp[s]://user:password@host[:port]/"


class CredentialsError(Exception):
    """The credentials file cannot be used (unreadable, not private, or malformed)."""


@attr.s(frozen=True, slots=True)
class Credential:
    """One line of a credentials file; repr() leaves the password out."""

    scheme = attr.ib()
    host = attr.ib()
    port = attr.ib()
    user = attr.ib()
    password = attr.ib(repr=False)

    def matches(self, scheme, host, port, user):
        return (self.scheme, self.host, self.port, self.user) == (scheme, host, port, user)


def load_credentials(path):
    """Read the credentials file at path: a list of Credential, in file order. Raises
    CredentialsError if it cannot be read, group or others have any access to it, or a line
    is neither blank, a comment, nor `amqp[s]://user:password@host[:port]/`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not hang us
    except OSError as e:
        raise CredentialsError(f"cannot read credentials file {path}: {e.strerror}") from None
    # Checked on the open file, so that the file read is the file checked.
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise CredentialsError(f"credentials file {path} is not a regular file")
        if mode & 0o077:
            raise CredentialsError(
                f"credentials file {path} is open to group or others (mode "
                f"{stat.S_IMODE(mode):04o}); make it private with: chmod 600 {path}"
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read()
    except OSError as e:
        raise CredentialsError(f"cannot read credentials file {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise CredentialsError(f"credentials file {path} is not UTF-8 text") from None
    credentials = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        credential = _parse_line(line)
        if credential is None:
            raise CredentialsError(f"{path}, line {number}: expected {LINE_FORMAT}")
        credentials.append(credential)
    return credentials


def _parse_line(line):
    # A URL has no blanks, so a blank ends it and may start a comment.
    url, *rest = line.split(None, 1)
    if rest and not rest[0].startswith("#"):
        return None
    address = _address(url)
    if address is None:
        return None
    scheme, host, port, user, password, path = address
    if user is None or password is None or path not in ("", "/"):
        return None
    return Credential(scheme, host, port, user, password)


def _address(url):
    """(scheme, host, port, user, password, path) of an amqp[s] URL, None for anything else."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname or parts.query or parts.fragment:
        return None
    unquote = urllib.parse.unquote
    return (
        scheme,
        parts.hostname,
        port or DEFAULT_PORTS[scheme],
        unquote(parts.username) if parts.username is not None else None,
        unquote(parts.password) if parts.password is not None else None,
        parts.path,
    )


def find_password(credentials, url):
    """The password of the first credential with the scheme, host, port (default ports
    filled in) and user of the broker URL; None when none matches or the URL names no user."""
    address = _address(url)
    if address is None:
        return None
    scheme, host, port, user, _, _ = address
    if user is None:
        return None
    for credential in credentials:
        if credential.matches(scheme, host, port, user):
            return credential.password
    return None
