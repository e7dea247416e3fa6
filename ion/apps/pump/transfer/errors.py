"""Typed errors a transfer ends with, each carrying an HTTP-like code and whether a retry may help.

A caller decides between "retry later" and "report the failure" from two attributes every
error has: C{transient} (a retry may succeed) and C{code} (the report code to publish, from the
pump's report codes: 4xx the request's fault, 5xx the remote side's or ours). Only codes of
that list are used: an HTTP 401 is reported as 403, an HTTP 502 as 503.

An error is transient exactly when its code is one of L{TRANSIENT_CODES} (499, 500, 503, 504),
so a caller that only sees the code (after it crossed the wire) decides the same way.

Messages never hold passwords: every URL in them went through L{ion.core.log.redact}.
"""

import errno

TRANSIENT_CODES = frozenset({499, 500, 503, 504})


class TransferError(Exception):
    """A transfer failed; C{code} is HTTP-like, C{transient} says whether a retry may succeed."""

    code = 499

    def __init__(self, message, code=None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = int(code)

    @property
    def transient(self):
        """Whether a retry may succeed: exactly when the code is one of L{TRANSIENT_CODES}."""
        return self.code in TRANSIENT_CODES

    def __repr__(self):
        return (
            f"{type(self).__name__}({self.message!r}, code={self.code}, transient={self.transient})"
        )


class NotFound(TransferError):
    """The remote file or directory does not exist (410 when the server says it is gone)."""

    code = 404


class AuthFailed(TransferError):
    """The server refused our credentials or the operation (HTTP 401 and 403 alike)."""

    code = 403


class ServerNotTrusted(TransferError):
    """The server's TLS certificate or SSH host key could not be verified; nothing was sent."""

    code = 403


class ChecksumMismatch(TransferError):
    """The received bytes do not hash to the expected value. Transient: the usual cause is a
    file rewritten upstream while it was fetched, which a later attempt gets right; a caller's
    retry horizon turns a mismatch that persists into a permanent failure."""


class SizeMismatch(TransferError):
    """The number of bytes received differs from the announced size."""


class ShortTransfer(SizeMismatch):
    """Fewer bytes arrived than announced: the body was cut short."""


class TooLarge(SizeMismatch):
    """More bytes than announced, or than the caller's C{max_size}, arrived or are announced:
    the transfer is cut at once, and a server sending more than it announced is not asked
    again (permanent)."""

    code = 413


class TransferTimeout(TransferError):
    """No connection within the connect timeout, no byte for the idle timeout, or slower
    than the caller's C{min_rate}."""

    code = 504


class ConnectionFailed(TransferError):
    """The server could not be reached, dropped the connection or is busy (HTTP 5xx, FTP 4xx)."""

    code = 503


class LocalFailure(TransferError):
    """Reading or writing a local file failed: the disk is full or failing (500), or the path
    is unusable (422, see L{from_os_error})."""

    code = 500

    @classmethod
    def from_os_error(cls, what, exc):
        """
        The error for an C{OSError} met while doing C{what} (a phrase naming the file): a full
        or failing disk is transient (500), anything else (permissions, missing directory, not
        a directory) makes the path unusable (422, permanent).
        """
        reason = exc.strerror or str(exc)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EAGAIN, errno.EIO):
            return cls(f"{what}: {reason}")
        return cls(f"{what}: {reason}", code=422)


class Refused(TransferError):
    """The server refuses the request for good (an HTTP 4xx or FTP 5xx reply that is neither
    "not found" nor "not allowed")."""

    code = 422


class BadRequest(TransferError):
    """The request itself is unusable: a bad URL, an unknown checksum method (417), an
    operation the server does not support."""

    code = 422


class RangeIgnored(TransferError):
    """The server answered a range request with the whole file: it cannot serve blocks (the
    partitioned transfer falls back to one stream)."""

    code = 503
