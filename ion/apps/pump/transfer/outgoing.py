"""A local file being sent: opened, read in chunks and hashed on the way by jobs in the
caller's thread pool (at once without one), so a slow disk never holds up the reactor; the
removal of what a send that failed left at the server."""

import hashlib
import os
import stat

from twisted.internet.defer import CancelledError, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from ion.apps.pump.transfer.errors import LocalFailure
from ion.apps.pump.transfer.inflight import b64digest
from ion.apps.pump.transfer.limits import SharedResult

_HASH_READ = 1024 * 1024
# A put reads (and hashes) its source in chunks of this size, each a job in the pool; a
# chunk is read only once the one before it was taken: one chunk in memory per reader.
PUT_CHUNK_SIZE = 1024 * 1024
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


async def open_outgoing(reactor, pool, path, methods=("sha512",)):
    """
    The L{OutgoingFile} at C{path}, opened in C{pool} (at once without one). Cancelled
    while the pool opens it, the file is closed once the open is done.
    """
    if pool is None:
        return OutgoingFile(path, methods)
    job = SharedResult(
        deferToThreadPool(reactor, pool, OutgoingFile, path, methods, reactor, pool)
    )
    try:
        return await job.observe()
    except CancelledError:
        job.observe().addCallbacks(lambda outgoing: outgoing.close(), lambda _: None)
        raise


class _Chunks:
    """
    Bytes taken in pieces of any size from chunks read by C{read_chunk()} (a job in the
    pool), one chunk at a time: the next is read once this one was taken.
    """

    def __init__(self, outgoing, read_chunk):
        self._outgoing = outgoing
        self._read_chunk = read_chunk
        self._chunk = b""
        self._taken = 0

    async def take(self, length):
        if self._taken >= len(self._chunk):
            self._chunk = await self._outgoing.in_pool(self._read_chunk)
            self._taken = 0
        data = self._chunk[self._taken:self._taken + length]
        self._taken += len(data)
        return data


async def store_or_remove_left(attempt, left, discard, reactor, location, settings, temp):
    """
    Await C{attempt} (a whole-file send to the temporary file C{temp}); if it fails while
    C{left} is not empty (its session was lost before the file could be removed there),
    remove C{temp} on a session of its own (L{remove_left}) and raise the send's error. A
    cancelled send ends at once, leaving it.
    """
    try:
        return await attempt
    except CancelledError:
        raise
    except BaseException:
        if left:
            await remove_left(discard, reactor, location, settings, temp)
        raise


class OutgoingFile:
    """
    The local source of a put. C{size}, C{mtime} and C{mode} are those of the open file;
    L{read} hashes what it returns so the checksum of exactly the bytes sent is known.
    L{take} is the way to read it from the reactor: its disk work runs in C{pool}.
    """

    def __init__(self, path, methods=("sha512",), reactor=None, pool=None):
        self.path = path
        self._reactor = reactor
        self._pool = pool
        self._jobs = set()  # the pool jobs running (SharedResult)
        self._closing = False
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
        self._chunks = _Chunks(self, lambda: self.read(PUT_CHUNK_SIZE))

    async def take(self, length):
        """Up to C{length} next bytes (read and hashed in the pool); C{b""} at the end.
        C{sent} counts the bytes taken."""
        data = await self._chunks.take(length)
        self.sent += len(data)
        return data

    def in_pool(self, work):
        """A Deferred of C{work()} run in the pool (at once without one). A job still running
        when the file is closed is let end first."""
        if self._pool is None:
            return maybeDeferred(work)
        job = SharedResult(deferToThreadPool(self._reactor, self._pool, work))
        self._jobs.add(job)
        job.observe().addBoth(lambda _: self._ended(job))
        return job.observe()

    def _ended(self, job):
        self._jobs.discard(job)
        if self._closing and not self._jobs:
            self._file.close()

    async def settled(self):
        """Once no pool job reads the file."""
        for job in list(self._jobs):
            await job.observe().addErrback(lambda _: None)

    def read(self, length):
        """Up to C{length} next bytes; C{b""} at the end (disk work: a pool thread)."""
        try:
            data = self._file.read(length)
        except OSError as exc:
            raise LocalFailure.from_os_error(f"cannot read {self.path}", exc) from None
        for hasher in self._hashers.values():
            hasher.update(data)
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
        """Close the file, after the pool jobs reading it, if any."""
        self._closing = True
        if not self._jobs:
            self._file.close()


class BlockReader:
    """
    The bytes of one block of an L{OutgoingFile}, from C{offset} for C{length} bytes, read in
    order through L{take} (as L{OutgoingFile.take}); C{sent} counts them, C{counted} (when
    given) is told each piece's length (progress).
    """

    def __init__(self, outgoing, offset, length, counted=None):
        self._outgoing = outgoing
        self._position = offset
        self._end = offset + length
        self._counted = counted
        self._chunks = _Chunks(outgoing, self._read_chunk)
        self.sent = 0

    def _read_chunk(self):
        """The next chunk of the block (disk work: a pool thread)."""
        length = min(PUT_CHUNK_SIZE, self._end - self._position)
        if length <= 0:
            return b""
        data = self._outgoing.read_at(self._position, length)
        self._position += len(data)
        return data

    async def take(self, length):
        data = await self._chunks.take(length)
        self.sent += len(data)
        if self._counted is not None:
            self._counted(len(data))
        return data


class ProgressReader:
    """
    A view of an L{OutgoingFile} (its L{take}) for a producer (http PUT, FTP STOR): each
    piece taken is noted with C{touch} (progress for the idle timer) and spent from C{pacers} (bandwidth
    limits: the producer's driver waits for them), the error a take fails with is kept as
    C{error} (the producer calling it may swallow it), and closing is left to the caller.
    """

    def __init__(self, outgoing, touch, pacers=()):
        self._outgoing = outgoing
        self._touch = touch
        self._pacers = pacers
        self.error = None

    async def take(self, length):
        self._touch()
        try:
            data = await self._outgoing.take(length)
        except Exception as exc:
            self.error = exc
            raise
        for pacer in self._pacers:
            pacer.spend(len(data))
        return data

    def close(self):
        """The caller closes the file."""
