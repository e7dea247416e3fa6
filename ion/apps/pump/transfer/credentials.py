"""The credentials file: user names, passwords and SSH keys for the servers a pump talks to.

Format: one server per line, blank lines and lines starting with `#` ignored::

    scheme://user:password@host[:port][/path] [option=value ...]

    https://alice:s3cret@data.example.org/
    ftp://anonymous:guest@ftp.example.org:2121/
    sftp://bob@feed.example.org/ ssh_key=/home/pump/.ssh/id_ed25519
    sftp://carol:pw@other.example.org/incoming/

- The password is optional (an sftp line may give only a key). Characters that would end the
  user or password (`@`, `:`, `/`, `%`, space) are percent-encoded: `p%40ss` is `p@ss`.
- The port defaults to the scheme's (http 80, https 443, ftp 21, sftp 22).
- A path other than `/` restricts the line to URLs under that path; the longest match wins.
- Options: `ssh_key=/absolute/path` -- a private key file (OpenSSH or PEM format, without
  passphrase) tried before the password for sftp.

The file must be readable by its owner only (mode 0600 or stricter): `Credentials.load` refuses
a file that is group- or world-readable. No message or repr ever shows a password.
"""

import os
import stat
from urllib.parse import unquote, urlsplit

import attrs

from ion.apps.pump.transfer.limits import DEFAULT_PORTS

OPTIONS = ("ssh_key",)


class CredentialsError(Exception):
    """The credentials file is unusable; the message names the file and line, never a secret."""


@attrs.frozen
class Credential:
    """One line of the credentials file (its password is left out of the repr)."""

    scheme: str
    host: str
    port: int
    user: str | None
    password: str | None = attrs.field(default=None, repr=False)
    path: str = "/"
    ssh_key: str | None = None

    def matches(self, scheme, host, port, user, path):
        """Whether this line serves a URL with these parts (C{user=None}: any user)."""
        return (
            self.scheme == scheme
            and self.host == host
            and self.port == port
            and (user is None or self.user == user)
            and _under(path, self.path)
        )


def _under(path, prefix):
    if prefix in ("", "/"):
        return True
    prefix = prefix.rstrip("/")
    return path == prefix or path.startswith(prefix + "/")


def url_parts(url):
    """C{(scheme, host, port, user, password, path)} of a URL, percent-decoded."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError("bad port number") from exc
    user = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    port = port or DEFAULT_PORTS.get(scheme, 0)
    return scheme, (parts.hostname or "").lower(), port, user, password, parts.path or "/"


class Credentials:
    """The lines of a credentials file, looked up by URL."""

    def __init__(self, entries=()):
        self.entries = tuple(entries)

    def __repr__(self):
        return f"<Credentials: {len(self.entries)} entries>"

    @classmethod
    def load(cls, path):
        """
        Read a credentials file.

        @raise CredentialsError: the file is missing, readable by group or others, or has a
            malformed line.
        """
        try:
            with open(path, encoding="utf-8") as f:
                mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
                if mode & 0o077:
                    raise CredentialsError(
                        f"{path}: credentials file is readable by group or others "
                        f"(mode {mode:04o}); make it private with: chmod 600 {path}"
                    )
                text = f.read()
        except OSError as exc:
            raise CredentialsError(
                f"{path}: cannot read credentials file: {exc.strerror}"
            ) from None
        except UnicodeDecodeError:
            raise CredentialsError(f"{path}: credentials file is not UTF-8 text") from None
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
        best = None
        for entry in self.entries:
            if entry.matches(scheme, host, port, user, path):
                if best is None or len(entry.path) > len(best.path):
                    best = entry
        return best


def _parse_line(line, where):
    url, *options = line.split()
    try:
        scheme, host, port, user, password, path = url_parts(url)
    except ValueError as exc:
        raise CredentialsError(f"{where}: {exc}") from None
    if "://" not in url or not scheme or not host:
        raise CredentialsError(f"{where}: expected scheme://user:password@host[:port]/")
    if scheme not in DEFAULT_PORTS:
        known = ", ".join(sorted(DEFAULT_PORTS))
        raise CredentialsError(f"{where}: unknown scheme {scheme!r}; known schemes are {known}")
    values = {}
    for option in options:
        name, sep, value = option.partition("=")
        if name not in OPTIONS or not sep or not value:
            # Only an identifier is echoed: stray text after the URL may be part of a password.
            shown = repr(name) if name.isidentifier() else "(text after the URL)"
            raise CredentialsError(
                f"{where}: unknown option {shown}; options are {', '.join(OPTIONS)} (name=value)"
            )
        values[name] = os.path.expanduser(value)
    return Credential(scheme, host, port, user, password, path, **values)
