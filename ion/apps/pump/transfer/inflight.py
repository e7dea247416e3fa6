"""A file being received: written under a temporary name beside its destination and renamed
onto it only once its size and checksum are verified.

The disk work (create, write, hash, fsync, rename, directory fsync) runs in a thread pool given
by the caller, one job at a time per file, so a transfer waiting for the disk never holds up the
reactor; without a pool it runs at once in the calling thread. A body of up to
C{BUFFER_LIMIT} bytes is kept in memory and written in a single job at the end (a failed
transfer then never touches the disk); a bigger one streams to disk as it arrives, its source
paused (L{InflightFile.backlogged}, L{InflightFile.drained}) while C{BACKLOG_LIMIT} bytes wait
for the disk. Renames into one directory that finish close together share one fsync of the
directory.

The writer holds an exclusive C{flock} on its temporary file from creation to rename, so a file
left behind by a killed process (the lock dies with it) can be told from one being written:
L{sweep} removes the former only. Creating the file and locking it are two system calls: a
file modified in the last C{SWEEP_MIN_AGE} seconds may be in between and is never swept.
"""

import base64
import fcntl
import hashlib
import os
import stat
import secrets
import threading
import time

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

from ion.apps.pump.transfer.errors import (
    BadRequest,
    ChecksumMismatch,
    LocalFailure,
    ShortTransfer,
    SizeMismatch,
    TooLarge,
    TransferError,
)
from ion.apps.pump.transfer.results import TransferResult

CHECKSUM_METHODS = ("sha512", "md5")
INFLIGHT_SUFFIX = ".inflight"
# Seconds since its last change before an unlocked temporary file counts as abandoned.
SWEEP_MIN_AGE = 5
# Bodies up to this size are written in one go once complete; bigger ones stream to disk.
BUFFER_LIMIT = 1024 * 1024
# A streaming source is paused while this many bytes wait for the disk.
BACKLOG_LIMIT = 2 * 1024 * 1024
# Buffers one os.writev call may take (IOV_MAX on Linux).
_IOV_MAX = 1024


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


def _lowest(*limits):
    """The lowest of the C{limits} that are not C{None}, or C{None}."""
    return min((limit for limit in limits if limit is not None), default=None)


def inflight_name(dest_path):
    """A fresh temporary name in C{dest_path}'s directory: C{.<name>.<random>.inflight}."""
    directory, name = os.path.split(dest_path)
    # Keep the temporary name within the usual 255-byte limit of a file name.
    name = name.encode("utf-8", "surrogateescape")[:200].decode("utf-8", "ignore")
    return os.path.join(directory, f".{name}.{secrets.token_hex(6)}{INFLIGHT_SUFFIX}")


def b64digest(hasher):
    return base64.b64encode(hasher.digest()).decode("ascii")


class _Outcome:
    """The outcome of a disk job for any number of observers: cancelling an observer leaves
    the job running (a thread cannot be stopped) and the others waiting for it."""

    def __init__(self, d):
        self._observers = []
        self._result = None
        self.done = False
        d.addBoth(self._fire)

    def _fire(self, result):
        self.done, self._result = True, result
        observers, self._observers = self._observers, []
        for d in observers:
            self._tell(d)

    def _tell(self, d):
        if d.called:
            return
        if isinstance(self._result, Failure):
            d.errback(self._result)
        else:
            d.callback(self._result)

    def observe(self):
        """A new Deferred with the job's result."""
        d = Deferred()
        if self.done:
            self._tell(d)
        else:
            self._observers.append(d)
        return d


class InflightFile:
    """
    Receive a file for C{dest_path}: L{write} the bytes as they come, then L{finish} (verify,
    apply mtime and mode, fsync, rename onto C{dest_path}) or L{discard}.

    Nothing ever appears at C{dest_path} but a complete, verified, fsynced file; a file already
    there is replaced only by L{finish}. A transfer stops as soon as it goes past the size
    announced by the caller (C{expected_size}) or the server (L{declare}), or past
    C{max_size}, so an endless body cannot fill the disk.

    @param pool: a started C{twisted.python.threadpool.ThreadPool} for the disk work (then
        C{reactor} is needed too), or C{None} to do it in the calling thread.
    @ivar declared_size: the size the server announced (Content-Length, stat), or C{None}.
    """

    def __init__(
        self,
        dest_path,
        methods=("sha512",),
        expected_size=None,
        what=None,
        reactor=None,
        pool=None,
        max_size=None,
    ):
        self.dest_path = dest_path
        self.temp_path = inflight_name(dest_path)
        self.what = what or dest_path
        self.size = 0
        self.expected_size = expected_size
        self.declared_size = None
        self.max_size = max_size
        self._limit = _lowest(expected_size, max_size)
        self._hashers = {method: hashlib.new(check_method(method)) for method in methods}
        self._reactor = reactor
        self._pool = pool
        # Chunks received and not yet handed to a disk job, and their size.
        self._pending = []
        self._pending_bytes = 0
        self._streaming = False
        self._job = None  # the _Outcome of the last disk job
        self._error = None  # the TransferError a streaming job failed with
        self._waiting = []  # Deferreds of drained()
        self._removal = None
        # Touched by the disk jobs only (one at a time), then read here once they are done.
        self._fd = None
        self._created = False
        # Cancelling a commit: checked and set under the lock, so the rename happens or not.
        self._lock = threading.Lock()
        self._abandoned = False
        if expected_size is not None and expected_size > BUFFER_LIMIT:
            self._stream()

    # -- the receiving side (reactor thread) ------------------------------------------------

    def declare(self, size):
        """
        The server announces C{size} bytes.

        @raise SizeMismatch: the caller expects another size.
        @raise TooLarge: C{size} is over C{max_size}.
        """
        self.declared_size = size
        if self.max_size is not None and size > self.max_size:
            raise TooLarge(
                f"{self.what}: the server announces {size} bytes, over max_size {self.max_size}"
            )
        if self.expected_size is not None and size != self.expected_size:
            raise SizeMismatch(
                f"{self.what}: the server announces {size} bytes, {self.expected_size} expected"
            )
        self._limit = size
        if size > BUFFER_LIMIT:
            self._stream()

    def write(self, data):
        """
        Take the next C{data}. Bytes arriving after L{discard} are dropped.

        @raise TooLarge: more bytes than announced, or than C{max_size}, arrived.
        @raise LocalFailure: writing the bytes so far to disk failed.
        """
        if self._removal is not None:
            return
        self.size += len(data)
        if self._limit is not None and self.size > self._limit:
            what = "max_size" if self._limit == self.max_size else "announced"
            raise TooLarge(f"{self.what}: more than the {self._limit} bytes {what} arrived")
        if self._error is not None:
            raise self._error
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._streaming:
            self._flush()
        elif self._pending_bytes > BUFFER_LIMIT:
            self._stream()

    @property
    def backlogged(self):
        """Whether the source should pause until L{drained} fires: too many bytes wait for
        the disk."""
        return self._pending_bytes >= BACKLOG_LIMIT

    def drained(self):
        """A Deferred that fires once the bytes waiting for the disk have been handed to it
        (or the file failed or was discarded: the next L{write} says which)."""
        if not self.backlogged or self._error is not None or self._removal is not None:
            return succeed(None)
        d = Deferred()
        self._waiting.append(d)
        return d

    async def finish(self, expected_checksum=None, mtime=None, mode=None):
        """
        Verify, apply C{mtime} and C{mode}, fsync and rename onto the destination.

        Cancelled before the rename, the temporary file is removed and C{CancelledError}
        raised; cancelled too late to stop the rename, the result is returned all the same.

        @param expected_checksum: C{(method, base64 value)} or C{None}.
        @return: the L{TransferResult}.
        @raise TransferError: a size or checksum mismatch, or a local failure; the temporary
            file is gone.
        """
        try:
            self._check_size()
            # Each streaming job done may start the next with what came meanwhile.
            while self._job is not None:
                await self._job.observe()
            if self._error is not None:
                raise self._error
        except BaseException:
            await self.discard()
            raise
        chunks, self._pending, self._pending_bytes = self._pending, [], 0
        job = self._job = self._run(self._commit, chunks, expected_checksum, mtime, mode)
        try:
            return await job.observe()
        except CancelledError:
            with self._lock:
                self._abandoned = True
            return await job.observe()

    def discard(self):
        """
        Stop receiving and remove the temporary file (idempotent). Returns a Deferred that
        fires once it is gone; the removal happens whether or not anyone waits for it.
        """
        if self._removal is None:
            self._pending, self._pending_bytes = [], 0
            self._release_waiting()
            idle = succeed(None) if self._job is None else self._job.observe()
            idle.addErrback(lambda _: None)
            idle.addCallback(lambda _: self._run(self._remove).observe())
            self._removal = _Outcome(idle)
        return self._removal.observe()

    def _check_size(self):
        for announced, by in (
            (self.declared_size, "the server"),
            (self.expected_size, "the caller"),
        ):
            if announced is not None and self.size < announced:
                raise ShortTransfer(
                    f"{self.what}: got {self.size} bytes, {by} announced {announced}: "
                    "body cut short"
                )

    def _run(self, work, *args):
        """Run C{work} in the pool (or at once without one); the L{_Outcome}."""
        if self._pool is None:
            try:
                d = succeed(work(*args))
            except BaseException:
                d = fail()
        else:
            d = deferToThreadPool(self._reactor, self._pool, work, *args)
        return _Outcome(d)

    def _stream(self):
        """From now on, write to disk as the bytes come (starting with creating the file)."""
        if not self._streaming:
            self._streaming = True
            self._flush()

    def _flush(self):
        """Hand the pending bytes to a disk job, unless one is running."""
        if self._job is not None or self._error is not None or self._removal is not None:
            return
        chunks, self._pending, self._pending_bytes = self._pending, [], 0
        self._job = self._run(self._write, chunks)
        self._job.observe().addBoth(self._written)

    def _written(self, result):
        self._job = None
        if isinstance(result, Failure):
            error = result.value
            self._error = error if isinstance(error, TransferError) else LocalFailure(str(error))
        elif self._pending:
            self._flush()
        self._release_waiting()

    def _release_waiting(self):
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    # -- the disk side (a pool thread, one job at a time per file) --------------------------

    def _create(self):
        try:
            self._fd = os.open(self.temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except OSError as exc:
            raise LocalFailure.from_os_error(f"cannot create {self.temp_path}", exc) from None
        self._created = True
        # Held until the file is renamed into place: see sweep.
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def _hash(self, chunks):
        for hasher in self._hashers.values():
            for chunk in chunks:
                hasher.update(chunk)

    def _write(self, chunks):
        """Hash and append C{chunks}, creating the file first if need be."""
        self._hash(chunks)
        if self._fd is None:
            self._create()
        try:
            _write_all(self._fd, chunks)
        except OSError as exc:
            raise LocalFailure.from_os_error(f"cannot write {self.temp_path}", exc) from None

    def _commit(self, chunks, expected_checksum, mtime, mode):
        """Write the last C{chunks}, verify, then make the file durable at its name."""
        try:
            self._hash(chunks)
            self._verify(expected_checksum)
            if self._fd is None:
                self._create()
            fd = self._fd
            _write_all(fd, chunks)
            if mode is not None:
                os.fchmod(fd, mode)
            if mtime is not None:
                os.utime(fd, (mtime, mtime))
            os.fsync(fd)
            with self._lock:
                if self._abandoned:
                    raise CancelledError()
                os.replace(self.temp_path, self.dest_path)
            # Closed (and unlocked) only once renamed: a sweep never takes a file in use.
            self._fd = None
            self._created = False
            os.close(fd)
            directories.sync(os.path.dirname(self.dest_path) or ".")
        except OSError as exc:
            self._remove()
            raise LocalFailure.from_os_error(f"cannot finish {self.dest_path}", exc) from None
        except BaseException:
            self._remove()
            raise
        checksum = {method: b64digest(hasher) for method, hasher in self._hashers.items()}
        return TransferResult(self.size, checksum, mtime, mode, self.dest_path)

    def _verify(self, expected_checksum):
        if expected_checksum is not None:
            method, value = expected_checksum
            actual = b64digest(self._hashers[method])
            if actual != value:
                raise ChecksumMismatch(
                    f"{self.what}: {method} checksum of the {self.size} bytes received is "
                    f"{actual}, expected {value}"
                )

    def _remove(self):
        """Close and remove the temporary file, if it was created."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        if self._created:
            try:
                os.unlink(self.temp_path)
            except FileNotFoundError:
                pass


def _write_all(fd, chunks):
    """Write all of C{chunks} at the end of C{fd}, in as few system calls as the OS allows."""
    for start in range(0, len(chunks), _IOV_MAX):
        batch = chunks[start : start + _IOV_MAX]
        written = os.writev(fd, batch)
        rest = sum(map(len, batch)) - written
        if rest:
            # A short write (a signal, a nearly full disk): write the remainder, or fail trying.
            data = memoryview(b"".join(batch))[written:]
            while data:
                data = data[os.write(fd, data) :]


class DirectorySyncs:
    """
    fsync of directories, shared: a caller returns once an fsync of its directory that started
    after it called has succeeded, and callers that arrive while one runs share the next one
    (group commit). Called from the threads doing the renames.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._directories = {}

    def sync(self, path):
        with self._lock:
            state = self._directories.get(path)
            if state is None:
                state = self._directories[path] = _Directory(threading.Condition(self._lock))
            state.callers += 1
            state.requested += 1
            ticket = state.requested
            try:
                while state.synced < ticket:
                    if state.syncing:
                        state.changed.wait()
                        continue
                    state.syncing = True
                    covered = state.requested
                    self._lock.release()
                    try:
                        _fsync_directory(path)
                    finally:
                        self._lock.acquire()
                        state.syncing = False
                        state.changed.notify_all()
                    state.synced = covered
            finally:
                state.callers -= 1
                if state.callers == 0:
                    del self._directories[path]


class _Directory:
    def __init__(self, changed):
        self.changed = changed
        self.callers = 0
        self.requested = 0  # renames announced
        self.synced = 0  # renames covered by a finished fsync
        self.syncing = False


directories = DirectorySyncs()


def _fsync_directory(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sweep(root, min_age=SWEEP_MIN_AGE):
    """
    Remove the temporary files (C{.<name>.<random>.inflight}) under C{root} that no process is
    writing any more: those whose writer was killed before it could remove them. A file whose
    C{flock} is held is being written and is left alone, and so is one modified less than
    C{min_age} seconds ago (its writer may have created it and not locked it yet): those are
    returned as young, for L{sweep_files} to look at again once C{min_age} has passed. Runs
    blocking (call it in a thread).

    @return: C{(removed, young)}, lists of paths.
    """
    found = []
    for directory, subdirectories, names in os.walk(root):
        for name in names:
            if name.startswith(".") and name.endswith(INFLIGHT_SUFFIX):
                found.append(os.path.join(directory, name))
    return sweep_files(found, min_age)


def sweep_files(paths, min_age=SWEEP_MIN_AGE):
    """L{sweep} for the temporary files at C{paths}: C{(removed, young)}."""
    removed, young = [], []
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue  # gone already, or a link
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its writer is alive
            # Checked with the lock held: a writer that locks it from now on is too late.
            if os.fstat(fd).st_mtime > time.time() - min_age:
                young.append(path)  # maybe created a moment ago, its lock not taken yet
                continue
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue
            removed.append(path)
        finally:
            os.close(fd)
    return removed, young
