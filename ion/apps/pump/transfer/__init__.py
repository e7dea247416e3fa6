"""Move files between this machine and file, http(s), sftp and ftp servers.

Three operations, each an C{async def} taking the reactor first:

  - L{get}C{(reactor, url, dest_path, ...)} -> L{TransferResult}: stream a remote file to a
    temporary name beside C{dest_path}, verify size and checksum, apply mtime and mode, fsync and
    rename into place. Nothing unverified ever appears at C{dest_path}.
  - L{put}C{(reactor, src_path, url, ...)} -> L{TransferResult}: send a local file, to a
    temporary remote name renamed into place where the scheme allows it.
  - L{list}C{(reactor, url, ...)} -> [L{Entry}]: the entries of a remote directory.

Failures raise L{TransferError} subclasses whose C{transient} and C{code} tell a caller whether
to retry and what to report. Supporting pieces: L{Timeouts}, L{HostLimiter}, L{Credentials}
(the file shared with the container: L{ion.core.credentials}) and L{HTTPConnections}. A
long-running caller also passes a started C{ThreadPool} as C{pool=}: the local disk work then
runs there instead of blocking the reactor (see L{ion.apps.pump.transfer.worker}).
"""

from ion.apps.pump.transfer.errors import (
    AuthFailed,
    BadRequest,
    ChecksumMismatch,
    ConnectionFailed,
    LocalFailure,
    NotFound,
    Refused,
    ServerNotTrusted,
    ShortTransfer,
    SizeMismatch,
    TRANSIENT_CODES,
    TooLarge,
    TransferError,
    TransferTimeout,
)
from ion.apps.pump.transfer.http import HTTPConnections
from ion.apps.pump.transfer.limits import HostLimiter, Timeouts
from ion.apps.pump.transfer.operations import get, list, put
from ion.apps.pump.transfer.results import Entry, TransferResult
from ion.core.credentials import Credential, Credentials, CredentialsError

__all__ = [
    "AuthFailed",
    "BadRequest",
    "ChecksumMismatch",
    "ConnectionFailed",
    "Credential",
    "Credentials",
    "CredentialsError",
    "Entry",
    "HTTPConnections",
    "HostLimiter",
    "LocalFailure",
    "NotFound",
    "Refused",
    "ServerNotTrusted",
    "ShortTransfer",
    "SizeMismatch",
    "TRANSIENT_CODES",
    "Timeouts",
    "TooLarge",
    "TransferError",
    "TransferResult",
    "TransferTimeout",
    "get",
    "list",
    "put",
]
