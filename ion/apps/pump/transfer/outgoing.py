"""A local file being sent: read in chunks and hashed on the way."""

import hashlib
import os
import stat

from ion.apps.pump.transfer.errors import LocalFailure
from ion.apps.pump.transfer.inflight import b64digest


class OutgoingFile:
    """
    The local source of a put. C{size}, C{mtime} and C{mode} are those of the open file;
    L{read} hashes what it returns so the checksum of exactly the bytes sent is known.
    """

    def __init__(self, path, methods=("sha512",)):
        self.path = path
        try:
            # Non-blocking: a named pipe at the path must not wait for a writer.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise LocalFailure.from_os_error(f"cannot open {path}", exc) from None
        self._file = open(fd, "rb")
        info = os.fstat(self._file.fileno())
        if not stat.S_ISREG(info.st_mode):
            self._file.close()
            raise LocalFailure(f"cannot send {path}: not a regular file", code=422)
        self.size = info.st_size
        self.mtime = info.st_mtime
        self.mode = stat.S_IMODE(info.st_mode)
        self.sent = 0
        self._hashers = {method: hashlib.new(method) for method in methods}

    def read(self, length):
        """Up to C{length} next bytes; C{b""} at the end."""
        try:
            data = self._file.read(length)
        except OSError as exc:
            raise LocalFailure.from_os_error(f"cannot read {self.path}", exc) from None
        for hasher in self._hashers.values():
            hasher.update(data)
        self.sent += len(data)
        return data

    def checksum(self):
        """C{{method: base64 digest}} of the bytes read so far."""
        return {method: b64digest(hasher) for method, hasher in self._hashers.items()}

    def close(self):
        self._file.close()


class ProgressReader:
    """
    A file-like view of an L{OutgoingFile} for a producer (http PUT, FTP STOR): each read is
    noted with C{touch} (progress for the idle timer) and spent from C{pacers} (bandwidth
    limits: the producer's driver waits for them), the error a read fails with is kept as
    C{error} (the producer calling it may swallow it), and closing is left to the caller.
    """

    def __init__(self, outgoing, touch, pacers=()):
        self._outgoing = outgoing
        self._touch = touch
        self._pacers = pacers
        self.error = None

    def read(self, length):
        self._touch()
        try:
            data = self._outgoing.read(length)
        except Exception as exc:
            self.error = exc
            raise
        for pacer in self._pacers:
            pacer.spend(len(data))
        return data

    def close(self):
        """The caller closes the file."""
