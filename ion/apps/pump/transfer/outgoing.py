"""A local file being sent: read in chunks and hashed on the way; the removal of what a send
that failed left at the server."""

import hashlib
import os
import stat

from twisted.internet.defer import CancelledError
from twisted.logger import Logger

from ion.apps.pump.transfer.errors import LocalFailure
from ion.apps.pump.transfer.inflight import b64digest

_HASH_READ = 1024 * 1024
log = Logger()


async def remove_left(discard, reactor, location, settings, temp):
    """
    Remove the temporary file C{temp} a failed send left at the server with C{discard} (a
    scheme's C{store_discard}, on a session of its own), best effort: a failure is logged,
    never raised (the send's own error is the one that matters).

    @return: whether the file is gone (or was never there).
    """
    try:
        await discard(reactor, location, settings, temp)
    except CancelledError:
        raise
    except Exception as exc:
        log.warn(
            "{what}: cannot remove the temporary file {temp} a failed send left at the "
            "server: {why}",
            what=location.shown, temp=temp, why=getattr(exc, "message", None) or str(exc),
        )
        return False
    return True


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

    def read_at(self, offset, length):
        """Up to C{length} bytes at C{offset} (a block of a put in blocks; not hashed)."""
        try:
            return os.pread(self._file.fileno(), length, offset)
        except OSError as exc:
            raise LocalFailure.from_os_error(f"cannot read {self.path}", exc) from None

    def whole_hash(self):
        """A job computing the C{{method: base64 digest}} of the whole file's C{size} bytes,
        read once (a put in blocks reads them out of order), to run in a thread. It reads
        through a descriptor of its own, which it closes: the file may be closed (its
        descriptor's number reused) while the job runs on after its caller gave up.

        @raise LocalFailure: (from the job) the file is shorter than it was when opened.
        """
        fd = os.dup(self._file.fileno())
        hashers = {method: hashlib.new(method) for method in self._hashers}

        def job():
            try:
                offset = 0
                while offset < self.size:
                    try:
                        data = os.pread(fd, min(_HASH_READ, self.size - offset), offset)
                    except OSError as exc:
                        raise LocalFailure.from_os_error(
                            f"cannot read {self.path}", exc
                        ) from None
                    if not data:
                        raise LocalFailure(f"{self.path} shrank while being sent")
                    for hasher in hashers.values():
                        hasher.update(data)
                    offset += len(data)
                return {method: b64digest(hasher) for method, hasher in hashers.items()}
            finally:
                os.close(fd)

        return job

    def close(self):
        self._file.close()


class BlockReader:
    """
    The bytes of one block of an L{OutgoingFile}, from C{offset} for C{length} bytes, read in
    order through L{read} (as L{OutgoingFile.read}); C{sent} counts them, C{counted} (when
    given) is told each read's length (progress).
    """

    def __init__(self, outgoing, offset, length, counted=None):
        self._outgoing = outgoing
        self._position = offset
        self._end = offset + length
        self._counted = counted
        self.sent = 0

    def read(self, length):
        length = min(length, self._end - self._position)
        if length <= 0:
            return b""
        data = self._outgoing.read_at(self._position, length)
        self._position += len(data)
        self.sent += len(data)
        if self._counted is not None:
            self._counted(len(data))
        return data


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
