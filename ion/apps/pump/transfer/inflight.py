"""A file being received: written under a temporary name beside its destination and renamed
onto it only once its size and checksum are verified."""

import base64
import hashlib
import os
import secrets

from ion.apps.pump.transfer.errors import (
    BadRequest,
    ChecksumMismatch,
    LocalFailure,
    ShortTransfer,
    SizeMismatch,
)
from ion.apps.pump.transfer.results import TransferResult

CHECKSUM_METHODS = ("sha512", "md5")
INFLIGHT_SUFFIX = ".inflight"


def check_method(method):
    """
    C{method} if this module can compute it.

    @raise BadRequest: (417) any other method; C{arbitrary} and C{random} identities cannot be
        verified, C{cod} names its algorithm in its value.
    """
    if method not in CHECKSUM_METHODS:
        raise BadRequest(
            f"cannot verify checksum method {method!r}; use one of {', '.join(CHECKSUM_METHODS)}",
            code=417,
        )
    return method


def inflight_name(dest_path):
    """A fresh temporary name in C{dest_path}'s directory: C{.<name>.<random>.inflight}."""
    directory, name = os.path.split(dest_path)
    # Keep the temporary name within the usual 255-byte limit of a file name.
    name = name.encode("utf-8", "surrogateescape")[:200].decode("utf-8", "ignore")
    return os.path.join(directory, f".{name}.{secrets.token_hex(6)}{INFLIGHT_SUFFIX}")


def b64digest(hasher):
    return base64.b64encode(hasher.digest()).decode("ascii")


class InflightFile:
    """
    Receive a file for C{dest_path}: L{write} the bytes as they come, then L{finish} (verify,
    apply mtime and mode, fsync, rename onto C{dest_path}) or L{discard}.

    Nothing ever appears at C{dest_path} but a complete, verified file; a file already there is
    replaced only by L{finish}. A transfer stops as soon as it goes past the size announced by
    the caller (C{expected_size}) or the server (L{declare}), so an endless body cannot fill
    the disk.

    @ivar declared_size: the size the server announced (Content-Length, stat), or C{None}.
    """

    def __init__(self, dest_path, methods=("sha512",), expected_size=None, what=None):
        self.dest_path = dest_path
        self.temp_path = inflight_name(dest_path)
        self.what = what or dest_path
        self.size = 0
        self.expected_size = expected_size
        self.declared_size = None
        self._limit = expected_size
        self._hashers = {method: hashlib.new(check_method(method)) for method in methods}
        try:
            self._file = open(self.temp_path, "xb")
        except OSError as exc:
            raise LocalFailure.from_os_error(f"cannot create {self.temp_path}", exc) from None

    def declare(self, size):
        """
        The server announces C{size} bytes.

        @raise SizeMismatch: the caller expects another size.
        """
        self.declared_size = size
        if self.expected_size is not None and size != self.expected_size:
            raise SizeMismatch(
                f"{self.what}: the server announces {size} bytes, {self.expected_size} expected"
            )
        self._limit = size

    def write(self, data):
        """
        Append C{data} and hash it.

        @raise SizeMismatch: more bytes than announced arrived.
        """
        self.size += len(data)
        if self._limit is not None and self.size > self._limit:
            raise SizeMismatch(f"{self.what}: more than the {self._limit} bytes announced arrived")
        try:
            self._file.write(data)
        except OSError as exc:
            raise LocalFailure.from_os_error(f"cannot write {self.temp_path}", exc) from None
        for hasher in self._hashers.values():
            hasher.update(data)

    def finish(self, expected_checksum=None, mtime=None, mode=None):
        """
        Verify, apply C{mtime} and C{mode}, fsync and rename onto the destination.

        @param expected_checksum: C{(method, base64 value)} or C{None}.
        @return: the L{TransferResult}.
        @raise TransferError: a size or checksum mismatch, or a local failure; the temporary
            file is gone.
        """
        try:
            self._verify(expected_checksum)
            self._file.flush()
            fd = self._file.fileno()
            if mode is not None:
                os.fchmod(fd, mode)
            if mtime is not None:
                os.utime(fd, (mtime, mtime))
            os.fsync(fd)
            self._file.close()
            os.replace(self.temp_path, self.dest_path)
            _fsync_directory(os.path.dirname(self.dest_path) or ".")
        except OSError as exc:
            self.discard()
            raise LocalFailure.from_os_error(f"cannot finish {self.dest_path}", exc) from None
        except BaseException:
            self.discard()
            raise
        checksum = {method: b64digest(hasher) for method, hasher in self._hashers.items()}
        return TransferResult(self.size, checksum, mtime, mode, self.dest_path)

    def _verify(self, expected_checksum):
        for announced, by in (
            (self.declared_size, "the server"),
            (self.expected_size, "the caller"),
        ):
            if announced is not None and self.size < announced:
                raise ShortTransfer(
                    f"{self.what}: got {self.size} bytes, {by} announced {announced}: "
                    "body cut short"
                )
        if expected_checksum is not None:
            method, value = expected_checksum
            actual = b64digest(self._hashers[method])
            if actual != value:
                raise ChecksumMismatch(
                    f"{self.what}: {method} checksum of the {self.size} bytes received is "
                    f"{actual}, expected {value}"
                )

    def discard(self):
        """Close and remove the temporary file (idempotent)."""
        if not self._file.closed:
            self._file.close()
        try:
            os.unlink(self.temp_path)
        except FileNotFoundError:
            pass


def _fsync_directory(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
