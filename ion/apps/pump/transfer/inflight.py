"""A file being received: written under a temporary name beside its destination and renamed
onto it only once its size and checksum are verified.

The disk work (create, write, fsync, rename, directory fsync) and the hashing run in a thread
pool given by the caller, so a transfer waiting for the disk never holds up the reactor; without
a pool they run at once in the calling thread. A body of up to C{BUFFER_LIMIT} bytes is kept in
memory and hashed and written in a single job at the end (a failed transfer then never touches
the disk); a bigger one streams to disk as it arrives (the first bytes at once, then in jobs of
at least C{WRITE_BATCH} bytes), its source paused (L{InflightFile.backlogged},
L{InflightFile.drained}) while C{BACKLOG_LIMIT} bytes wait for the disk or for the hashing.
Hashing and writing are two lanes (L{Lane}), each one job at a time per file, in order: the hash
of one batch runs in one thread while the write of another runs in a second, so a big file costs
the longer of the two (hashing sha512 is the slower), not their sum; a lane's job goes on with
the bytes that came while it worked, without a round trip through the reactor. Every
C{SYNC_BATCH} bytes written, a third job fdatasyncs them while the rest comes in, so the fsync
before the rename (which stays) finds little left to write. Renames into one directory that
finish close together share one fsync of the directory. Files received whole are committed
together by their pool's L{GroupCommit}: those waiting go in one job, and on a local disk's
file system one C{syncfs} before their renames and one after stand for their fsyncs and
their directories'. A streamed file of at least
C{DIRECT_MIN} bytes (or of an unknown size) is written with C{O_DIRECT} where its file system
is a block device's and allows it: its bytes are copied into an aligned buffer and written
from there straight to the device, the unaligned tail through the page cache at the end.

The writer holds an exclusive C{flock} on its temporary file from creation to rename, so a file
left behind by a killed process (the lock dies with it) can be told from one being written:
L{sweep} removes the former only. Creating the file and locking it are two system calls: a
file modified in the last C{SWEEP_MIN_AGE} seconds may be in between and is never swept.

Every path is reached from a directory descriptor of the destination root (a
L{DestinationRoot}, opened once and shared by a process's transfers; by default the
destination's own directory): each directory below the root is opened with C{O_NOFOLLOW}
relative to its parent's descriptor (and made when missing), the temporary file is created,
renamed and its directory fsynced through the descriptor of its directory. A symbolic link in
the destination tree, planted before or while a file is received, therefore makes the file fail
(422) and never redirects a write: a file streamed to disk checks again before its rename that
its directory is still the one its path leads to.
"""

import base64
import contextlib
import errno
import fcntl
import functools
import hashlib
import mmap
import os
import re
import secrets
import stat
import sys
import threading
import time
import weakref

from twisted.internet.defer import CancelledError, Deferred, DeferredList, maybeDeferred
from twisted.internet.protocol import Protocol
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
from ion.apps.pump.transfer.limits import SharedResult
from ion.apps.pump.transfer.results import TransferResult

CHECKSUM_METHODS = ("sha512", "md5")
INFLIGHT_SUFFIX = ".inflight"
# Seconds since its last change before an unlocked temporary file counts as abandoned.
SWEEP_MIN_AGE = 5
# The same for the part file and block record of a partitioned transfer, which a later
# attempt resumes (see ion.apps.pump.transfer.blocks).
RESUMABLE_SUFFIXES = (".part.inflight", ".blocks.inflight")
RESUMABLE_MIN_AGE = 2 * 24 * 3600
# Bodies up to this size are written in one go once complete; bigger ones stream to disk.
BUFFER_LIMIT = 1024 * 1024
# A streaming source is paused while this many bytes wait for the disk.
BACKLOG_LIMIT = 4 * 1024 * 1024
# Bytes gathered before a lane starts a job on them (a job per network read costs a thread
# hop each, paid by the reactor: measured, 512 KiB batches spent twice the reactor's CPU time
# of 1 MiB ones per GiB; much bigger ones fall out of the CPU's caches between the hashing and
# the write); the last ones go with the commit.
WRITE_BATCH = 1024 * 1024
# A streaming file's bytes are fdatasynced in the background each time this many more are
# written, so that the fsync before the rename has little left to write.
SYNC_BATCH = 32 * 1024 * 1024
# Buffers one os.writev call may take (IOV_MAX on Linux).
_IOV_MAX = 1024
# A streamed file of at least this many bytes (or of an unknown size) is written with
# O_DIRECT where the file system (of a block device: see _on_block_device) allows it: from
# an aligned buffer of DIRECT_BUFFER bytes straight to the device, not copied into the page
# cache and written back from there (measured: the copy into the page cache cost as much CPU
# as the sha512 of the bytes, and the writeback more; a file being verified and fsynced is
# not read back through the cache).
DIRECT_MIN = 16 * 1024 * 1024
DIRECT_BUFFER = 4 * 1024 * 1024
# What O_DIRECT asks of a write's length, offset and memory (the largest logical block size
# in common use; the buffer is page-aligned). The tail of a file shorter than this is written
# through the cache once O_DIRECT is turned off.
DIRECT_ALIGN = 4096


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


def is_inflight_name(name):
    """Whether the file name C{name} looks like a temporary file: L{sweep} would remove it."""
    return name.startswith(".") and name.endswith(INFLIGHT_SUFFIX)


def inflight_name(dest_path):
    """A fresh temporary name in C{dest_path}'s directory: C{.<name>.<random>.inflight}."""
    directory, name = os.path.split(dest_path)
    # Keep the temporary name within the usual 255-byte limit of a file name.
    name = name.encode("utf-8", "surrogateescape")[:200].decode("utf-8", "ignore")
    return os.path.join(directory, f".{name}.{_random_tag()}{INFLIGHT_SUFFIX}")


# Random tags of temporary names (12 hex digits each), drawn from the OS's generator
# _TAGS_AT_ONCE at a time: one system call per that many files rather than one per file.
_TAGS_AT_ONCE = 64
_tags = []
# A forked child draws its own: two processes must not share the tags left.
os.register_at_fork(after_in_child=_tags.clear)


def _random_tag():
    while True:
        try:
            return _tags.pop()
        except IndexError:  # none left (another thread may have taken the last)
            data = secrets.token_bytes(6 * _TAGS_AT_ONCE)
            _tags.extend(data[i : i + 6].hex() for i in range(0, len(data), 6))


def b64digest(hasher):
    return base64.b64encode(hasher.digest()).decode("ascii")


class SinkReceiver(Protocol):
    """
    Hands each chunk a connection receives to C{sink} (an L{InflightFile}, or anything with
    its C{write}, C{backlogged} and C{drained}), pausing the connection while the sink has
    too much waiting for the disk; each chunk is progress for the C{timer}. What the sink
    raises is kept as C{error} and ends the connection (L{abort}). A wait still running when
    the connection ends is cancelled (a bandwidth limit's timer does not outlive it).
    """

    def __init__(self, sink, timer):
        self.sink = sink
        self.timer = timer
        self.received = 0
        self.error = None
        self._draining = None  # the sink's drained() while the connection is paused

    def abort(self):
        self.transport.abortConnection()

    def receiving(self):
        return self.transport.connected

    def dataReceived(self, data):
        if self.error is not None:
            return
        self.timer.touch()
        self.received += len(data)
        try:
            self.sink.write(data)
        except Exception as exc:
            self.error = exc
            self.abort()
            return
        if self.sink.backlogged:
            self.transport.pauseProducing()
            if getattr(self.sink, "pacing", False):
                self.timer.hold()  # a bandwidth limit's wait is not the server's silence
            self._draining = self.sink.drained()
            self._draining.addCallback(self._resume)

    def _resume(self, _):
        self._draining = None
        if self.receiving():
            self.timer.touch()
            self.transport.resumeProducing()

    def connectionLost(self, reason):
        self.stop_waiting()

    def stop_waiting(self):
        """Cancel the wait for the sink, if one runs: nothing is to be resumed any more."""
        draining, self._draining = self._draining, None
        if draining is not None and not draining.called:
            draining.addErrback(lambda _: None)
            draining.cancel()


class Lane:
    """
    Chunks handed over by the reactor thread, given in order to C{work} by one job at a time
    in C{pool}; a job goes on with the chunks that came while it worked, so a busy lane costs
    no round trip through the reactor between batches. A job starts once C{batch} bytes wait
    (with C{eager}, also as long as no bytes were given yet); it takes all that wait each
    time, and ends when fewer than C{batch} are left or the lane is closed. Without a pool
    the jobs run at once in the calling thread.

    C{progress} is called in the reactor thread when a job takes bytes after L{watch} asked
    for it, and with the failure when a job fails.

    @ivar waiting: bytes put and not yet taken by a job.
    @ivar job: the L{SharedResult} of the job running, or C{None}.
    """

    def __init__(self, reactor, pool, work, batch, progress, eager=False):
        self._reactor = reactor
        self._pool = pool
        self._work = work
        self._batch = batch
        self._progress = progress
        self._eager = eager
        self._lock = threading.Lock()
        self._chunks = []
        self.waiting = 0
        self._given = 0  # bytes taken by jobs so far
        self._running = False
        self._closed = False
        self._watched = False
        self.job = None

    def put(self, data, hold=False):
        """Queue C{data}; unless C{hold}, start a job if a batch waits."""
        with self._lock:
            self._chunks.append(data)
            self.waiting += len(data)
        if not hold:
            self.poke()

    def poke(self):
        """Start a job if a batch waits and none runs."""
        with self._lock:
            if self._running or not self._due():
                return
            self._running = True
        self._start(False)

    def kick(self):
        """Start a job now, unless one runs: it gives C{work} what waits, even nothing."""
        with self._lock:
            if self._running or self._closed:
                return
            self._running = True
        self._start(True)

    def watch(self):
        """Have the next job to take bytes tell C{progress}."""
        with self._lock:
            self._watched = True

    def take(self):
        """The chunks waiting (no job runs: they are the caller's now)."""
        with self._lock:
            chunks, self._chunks, self.waiting = self._chunks, [], 0
        return chunks

    def close(self):
        """No job takes any more chunks; those waiting are dropped."""
        with self._lock:
            self._closed = True
            self._chunks, self.waiting = [], 0

    def _due(self):
        return not self._closed and (
            self.waiting >= self._batch or (self._eager and self._given == 0 and self._chunks)
        )

    def _start(self, forced):
        if self._pool is None:
            d = maybeDeferred(self._loop, forced)
        else:
            d = deferToThreadPool(self._reactor, self._pool, self._loop, forced)
        self.job = job = SharedResult(d)
        job.observe().addBoth(self._ended, job)

    def _loop(self, forced):
        """The job (a pool thread): give C{work} what waits until too little does."""
        try:
            while True:
                with self._lock:
                    if not (forced or self._due()):
                        self._running = False
                        return
                    forced = False
                    chunks, self._chunks = self._chunks, []
                    size, self.waiting = self.waiting, 0
                    self._given += size
                    tell, self._watched = self._watched and size > 0, False
                if tell and self._pool is not None:
                    self._reactor.callFromThread(self._progress)
                self._work(chunks)
        except BaseException:
            with self._lock:
                self._running = False
            raise

    def _ended(self, result, job):
        if self.job is job:
            self.job = None
        if isinstance(result, Failure):
            self._progress(result)


class DestinationRoot:
    """
    A directory that received files are placed under, held open: L{InflightFile}s reach their
    destinations from its descriptor, so the root stays the directory it was when first used
    and nothing below it is reached through a symbolic link. The root itself is opened by its
    path, links and all (it comes from the configuration, not from a notice).

    Thread-safe; the descriptor is opened by the first disk job that needs it and closed by
    L{close} once no job uses it any more.

    @param make: make the root directory (and its parents) when it is missing, as when an
        operator removed it while the process ran.
    """

    def __init__(self, path, make=False):
        self.path = path
        self.make = make
        self._lock = threading.Lock()
        self._fd = None
        self._stale = []  # descriptors replaced by a reopen, closed once no job uses them
        self._users = 0
        self._closed = False

    def acquire(self, reopen=False):
        """
        The root's descriptor, for a disk job that calls L{release} when done with it.
        C{reopen}: open the path again (the directory held may have been removed).

        @raise LocalFailure: the root cannot be opened (422), or L{close} was called (503).
        """
        with self._lock:
            if self._closed:
                raise LocalFailure(f"{self.path}: the destination is closed", code=503)
            if self._fd is None or reopen:
                try:
                    fd = self._open()
                except OSError as exc:
                    raise LocalFailure.from_os_error(
                        f"cannot open destination directory {self.path}", exc
                    ) from None
                if self._fd is not None:
                    self._stale.append(self._fd)
                self._fd = fd
            self._users += 1
            return self._fd

    def _open(self):
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        try:
            return os.open(self.path, flags)
        except FileNotFoundError:
            if not self.make:
                raise
        os.makedirs(self.path, exist_ok=True)
        return os.open(self.path, flags)

    def release(self):
        """A job is done with the descriptor L{acquire} gave it."""
        with self._lock:
            self._users -= 1
            if self._users == 0:
                for fd in self._stale:
                    os.close(fd)
                self._stale.clear()
                if self._closed and self._fd is not None:
                    os.close(self._fd)
                    self._fd = None

    def close(self):
        """Close the descriptor once the jobs using it are done; L{acquire} fails from now."""
        with self._lock:
            self._closed = True
            if self._users == 0 and self._fd is not None:
                os.close(self._fd)
                self._fd = None


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
    @param root: the L{DestinationRoot} (or the path of the directory) that C{dest_path} is
        under: the directories between them are reached without following links and made
        when missing. Default: the directory of C{dest_path}, which must exist.
    @param temp_name: the name of the temporary file (default: a fresh L{inflight_name}).
    @ivar declared_size: the size the server announced (Content-Length, stat), or C{None}.
    """

    # Whether a body received whole is committed by the pool's GroupCommit (which runs the
    # steps of _commit itself): not for a subclass with a _commit of its own.
    commits_in_groups = True

    def __init__(
        self,
        dest_path,
        methods=("sha512",),
        expected_size=None,
        what=None,
        reactor=None,
        pool=None,
        max_size=None,
        root=None,
        temp_name=None,
    ):
        self.dest_path = dest_path
        directory, self._name = os.path.split(dest_path)
        if temp_name is None:
            self.temp_path = inflight_name(dest_path)
        else:
            self.temp_path = os.path.join(directory, temp_name)
        self.what = what or dest_path
        self._directory = directory or "."
        self._temp_name = os.path.basename(self.temp_path)
        # A root of our own is opened by our first disk job and closed by our last.
        self._owns_root = not isinstance(root, DestinationRoot)
        if root is None:
            root = DestinationRoot(self._directory)
        elif self._owns_root:
            root = DestinationRoot(root)
        self._root = root
        self._below = _components(root.path, self._directory, dest_path)
        self.size = 0
        self.expected_size = expected_size
        self.declared_size = None
        self.max_size = max_size
        self._limit = min((n for n in (expected_size, max_size) if n is not None), default=None)
        self._hashers = {method: hashlib.new(check_method(method)) for method in methods}
        self._reactor = reactor
        self._pool = pool
        # The chunks received wait in _buffer until the commit. Once streaming, they go to two
        # lanes of pool jobs instead: written to disk, and hashed. (Lanes only then: theirs
        # and ours are references both ways, a cycle that only the garbage collector frees.)
        self._buffer = []
        self._buffered = 0
        self._writes = self._hashes = None
        # Set when streaming starts; read by the disk jobs: write with O_DIRECT if possible.
        self._direct_wanted = False
        self._sync_job = None  # the SharedResult of the running background fdatasync
        self._on_disk = 0  # bytes written (by the disk jobs)
        self._sync_asked = 0  # bytes written when the last background fdatasync was asked for
        self._synced = 0  # bytes written when the last background fdatasync started
        self._error = None  # the TransferError a streaming job failed with
        self._waiting = []  # Deferreds of drained()
        self._removal = None
        self._commit_job = None
        # Touched by the disk jobs only (one at a time), then read here once they are done;
        # the hashers likewise by the hashing jobs, then by the commit.
        self._fd = None
        self._created = False
        self._direct = None  # the aligned buffer of an O_DIRECT file (mmap), else None
        self._direct_fill = 0  # bytes in it not written yet
        self._direct_on = False  # whether the file is open with O_DIRECT
        self._root_fd = None  # acquired from the root while the directory is open
        self._dir_fd = None  # the directory of dest_path
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
        if self._streaming:
            # Each lane has a job running whenever a batch waits (the first bytes are written
            # at once: a file being received shows on disk).
            self._writes.put(data)
            self._hashes.put(data)
            return
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered > BUFFER_LIMIT:
            self._stream()

    @property
    def backlogged(self):
        """Whether the source should pause until L{drained} fires: too many bytes wait for
        the disk or for the hashing."""
        if not self._streaming:
            return False  # at most BUFFER_LIMIT bytes wait, for the commit
        return max(self._writes.waiting, self._hashes.waiting) >= BACKLOG_LIMIT

    def drained(self):
        """A Deferred that fires once the bytes waiting for the disk and the hashing have been
        handed to them (or the file failed or was discarded: the next L{write} says which)."""
        d = Deferred()
        self._waiting.append(d)
        self._wake()
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
            while running := self._running():
                await running[0].observe()
            if self._error is not None:
                raise self._error
        except BaseException:
            await self.discard()
            raise
        if self._streaming:
            chunks, unhashed = self._writes.take(), self._hashes.take()
        else:
            chunks = unhashed = self._take_buffer()
        args = (chunks, unhashed, expected_checksum, mtime, mode)
        if self._grouped:
            # Received whole: committed with the other small files of the moment.
            job = SharedResult(GroupCommit.of(self._reactor, self._pool).commit(self, args))
        else:
            job = self._run(self._commit, *args)
        self._commit_job = job
        try:
            return await job.observe()
        except CancelledError:
            with self._lock:
                self._abandoned = True
            return await job.observe()

    @property
    def _grouped(self):
        # Received whole: L{finish} hands it to its pool's GroupCommit.
        return self._pool is not None and not self._streaming and self.commits_in_groups

    def commit_waits_apart(self):
        """Whether L{finish} will leave this file to its pool's L{GroupCommit} with room
        there for it (L{GROUP_BACKLOG_MAX}, L{GROUP_BACKLOG_FILES}): the transfer that
        received it may give its server's slot up before the commit, its connection being
        free."""
        return (
            self._grouped
            and self._error is None
            and GroupCommit.of(self._reactor, self._pool).room_for(self.size)
        )

    def discard(self):
        """
        Stop receiving and remove the temporary file (idempotent). Returns a Deferred that
        fires once it is gone; the removal happens whether or not anyone waits for it.
        """
        if self._removal is None:
            if self._streaming:
                self._writes.close()
                self._hashes.close()
            else:
                self._take_buffer()
            self._release_waiting()
            # No job starts from now on: the removal follows those running.
            running = self._running() + [self._commit_job] * (self._commit_job is not None)
            idle = DeferredList([job.observe() for job in running], consumeErrors=True)
            idle.addCallback(lambda _: self._run(self._remove).observe())
            self._removal = SharedResult(idle)
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
        """Run C{work} in the pool (or at once without one); the L{SharedResult}."""
        if self._pool is None:
            return SharedResult(maybeDeferred(work, *args))
        return SharedResult(deferToThreadPool(self._reactor, self._pool, work, *args))

    def _stream(self):
        """From now on, write to disk as the bytes come (starting with creating the file)."""
        if not self._streaming:
            self._direct_wanted = self._limit is None or self._limit >= DIRECT_MIN
            pool, reactor = self._pool, self._reactor
            self._writes = Lane(reactor, pool, self._write, WRITE_BATCH, self._wake, eager=True)
            self._hashes = Lane(reactor, pool, self._hash, WRITE_BATCH, self._wake)
            for chunk in self._take_buffer():
                self._writes.put(chunk, hold=True)
                self._hashes.put(chunk, hold=True)
            self._writes.kick()
            self._hashes.poke()

    @property
    def _streaming(self):
        """Whether the bytes go to disk as they come (L{_stream}): the lanes exist."""
        return self._writes is not None

    def _take_buffer(self):
        """The chunks received before streaming (or a commit): the caller's from now on."""
        chunks, self._buffer, self._buffered = self._buffer, [], 0
        return chunks

    def _running(self):
        """The L{SharedResult}s of the jobs running: the lanes', the background sync's."""
        jobs = [self._sync_job]
        if self._streaming:
            jobs += [self._writes.job, self._hashes.job]
        return [job for job in jobs if job is not None]

    def _sync_early(self):
        """Once C{SYNC_BATCH} more bytes are written, fdatasync them in a job beside the
        writes (unless one runs): the disk writes them while the rest comes in, and the fsync
        before the rename has only the last ones left."""
        if (
            self._sync_job is not None
            or self._on_disk - self._synced < SYNC_BATCH
            or self._error is not None
            or self._removal is not None
        ):
            return
        self._synced = self._on_disk
        self._sync_job = self._run(self._sync)
        self._sync_job.observe().addBoth(self._synced_early)

    def _synced_early(self, result):
        self._sync_job = None
        if isinstance(result, Failure):
            self._failed(result)
            self._wake()
        else:
            self._sync_early()

    def _failed(self, failure):
        if self._error is None:
            error = failure.value
            self._error = error if isinstance(error, TransferError) else LocalFailure(str(error))

    def _wake(self, failure=None):
        """Fire L{drained}'s Deferreds once nothing holds the source back any more (a lane
        calls it when it takes bytes while asked to, or when its job fails: C{failure})."""
        if failure is not None:
            self._failed(failure)
        if not self._waiting:
            return
        if self._error is None and self._removal is None and self.backlogged:
            # Told when a lane takes its bytes from now on (backlogged: streaming); they may
            # be taken already.
            self._writes.watch()
            self._hashes.watch()
            if self.backlogged:
                return
        self._release_waiting()

    def _release_waiting(self):
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            if not d.called:  # not cancelled meanwhile
                d.callback(None)

    # -- the disk side (pool threads, one job at a time per file and lane) -------------------

    def _create(self):
        self._open_directory()
        try:
            self._fd = os.open(
                self._temp_name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o666,
                dir_fd=self._dir_fd,
            )
        except OSError as exc:
            raise LocalFailure.from_os_error(f"cannot create {self.temp_path}", exc) from None
        self._created = True
        # Held until the file is renamed into place: see sweep.
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def _open_directory(self):
        """Open the directory of C{dest_path} from the root, making what is missing; once more
        from a freshly opened root if a directory vanished on the way."""
        for retry in (False, True):
            root_fd = self._root.acquire(reopen=retry)
            try:
                self._dir_fd = walk_below(root_fd, self._below, make=True)
            except BaseException as exc:
                self._root.release()
                if isinstance(exc, NotADirectoryOnTheWay):
                    where = os.path.join(self._root.path, *self._below[: exc.depth + 1])
                    raise LocalFailure(
                        f"cannot write {self.dest_path}: {where} {exc}", code=422
                    ) from None
                if isinstance(exc, FileNotFoundError) and not retry:
                    continue
                if isinstance(exc, OSError):
                    raise LocalFailure.from_os_error(
                        f"cannot create {self.temp_path}", exc
                    ) from None
                raise
            self._root_fd = root_fd
            return

    def _check_directory(self):
        """
        Make sure the directory the file was created in is still the one its path leads to:
        one replaced by a link (or moved away) while the file streamed in fails the file.
        """
        try:
            fd = walk_below(self._root_fd, self._below, make=False)
        except (OSError, NotADirectoryOnTheWay) as exc:
            why = f" ({exc})" if isinstance(exc, NotADirectoryOnTheWay) else " (gone)"
        else:
            try:
                now, held = os.fstat(fd), os.fstat(self._dir_fd)
            finally:
                os.close(fd)
            if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                return
            why = ""
        raise LocalFailure(
            f"cannot finish {self.dest_path}: its directory was replaced during the transfer" + why,
            code=422,
        )

    def _close_directory(self):
        if self._dir_fd is not None:
            if self._dir_fd != self._root_fd:
                os.close(self._dir_fd)
            self._dir_fd = self._root_fd = None
            self._root.release()
        if self._owns_root:
            self._root.close()

    def _hash(self, chunks):
        for hasher in self._hashers.values():
            for chunk in chunks:
                hasher.update(chunk)

    def _sync(self):
        """fdatasync what is written so far (beside the disk jobs: the file is open)."""
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise LocalFailure.from_os_error(f"cannot write {self.temp_path}", exc) from None

    def _write(self, chunks):
        """Append C{chunks}, creating the file first if need be; ask for a background sync
        each C{SYNC_BATCH} bytes."""
        if self._fd is None:
            self._create()
            if self._direct_wanted:
                self._start_direct()
        try:
            if self._direct is None:
                _write_all(self._fd, chunks)
            else:
                self._write_direct(chunks)
        except OSError as exc:
            raise LocalFailure.from_os_error(f"cannot write {self.temp_path}", exc) from None
        self._on_disk += sum(map(len, chunks))
        if self._pool is not None and self._on_disk - self._sync_asked >= SYNC_BATCH:
            self._sync_asked = self._on_disk
            self._reactor.callFromThread(self._sync_early)

    def _start_direct(self):
        """Write the file with O_DIRECT from now on, if it is on a block device's file system
        and that allows it."""
        if not _on_block_device(self._fd):
            return
        buffer = mmap.mmap(-1, DIRECT_BUFFER)
        try:
            flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
            fcntl.fcntl(self._fd, fcntl.F_SETFL, flags | os.O_DIRECT)
        except OSError:
            buffer.close()
            return  # EINVAL: this file system writes through the page cache only
        self._direct, self._direct_fill, self._direct_on = buffer, 0, True

    def _write_direct(self, chunks):
        """Copy C{chunks} into the aligned buffer, writing it out each time it is full, and
        at the end all of it but an unaligned tail, kept for the next job (the bytes show on
        disk as they come)."""
        buffer, fill = self._direct, self._direct_fill
        for chunk in chunks:
            with memoryview(chunk) as view:
                start, end = 0, len(view)
                while start < end:
                    n = min(end - start, DIRECT_BUFFER - fill)
                    buffer[fill : fill + n] = view[start : start + n]
                    fill += n
                    start += n
                    if fill == DIRECT_BUFFER:
                        self._write_buffer(fill)
                        fill = 0
        aligned = fill - fill % DIRECT_ALIGN
        if aligned:
            self._write_buffer(aligned)
            buffer.move(0, aligned, fill - aligned)
            fill -= aligned
        self._direct_fill = fill

    def _write_buffer(self, length):
        """Write the first C{length} bytes of the aligned buffer at the end of the file: with
        O_DIRECT while C{length} is aligned and the file system takes it, else through the
        page cache (O_DIRECT turned off for good)."""
        with memoryview(self._direct) as view:
            start = 0
            while start < length:
                if self._direct_on and start % DIRECT_ALIGN == 0 and length % DIRECT_ALIGN == 0:
                    try:
                        start += os.write(self._fd, view[start:length])
                        continue
                    except OSError as exc:
                        if exc.errno != errno.EINVAL:
                            raise
                self._stop_direct()
                start += os.write(self._fd, view[start:length])

    def _stop_direct(self):
        """Write through the page cache from now on."""
        if self._direct_on:
            flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
            fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
            self._direct_on = False

    def _flush_direct(self):
        """Write out what the aligned buffer holds (its unaligned tail through the page
        cache) and free it."""
        fill, self._direct_fill = self._direct_fill, 0
        aligned = fill - fill % DIRECT_ALIGN
        if aligned:
            self._write_buffer(aligned)
        if fill > aligned:
            self._stop_direct()
            with memoryview(self._direct) as view:
                _write_all(self._fd, [view[aligned:fill]])
        self._free_direct()

    def _free_direct(self):
        if self._direct is not None:
            self._direct.close()
            self._direct = None

    def _commit(self, chunks, unhashed, expected_checksum, mtime, mode):
        """Hash the last C{unhashed} chunks and write the last C{chunks}, verify, then make the
        file durable at its name."""
        with self._finishing():
            streamed = self._fd is not None
            result = self._prepare(chunks, unhashed, expected_checksum, mtime, mode)
            self._durably_placed(streamed)
        return result

    def _durably_placed(self, streamed):
        """The commit from its fsync on: fsync, check a streamed file's directory, rename,
        fsync the directory, close it."""
        os.fsync(self._fd)
        if streamed and self._below:
            self._check_directory()
        self._place()
        directories.sync(self._directory, self._dir_fd)
        self._close_directory()

    @contextlib.contextmanager
    def _finishing(self):
        """Around the steps of a commit: one that fails removes the temporary file (and
        closes the directory); an OSError becomes a L{LocalFailure}."""
        try:
            yield
        except OSError as exc:
            self._remove()
            raise LocalFailure.from_os_error(f"cannot finish {self.dest_path}", exc) from None
        except BaseException:
            self._remove()
            raise

    def _prepare(self, chunks, unhashed, expected_checksum, mtime, mode):
        """The commit up to its fsync: hash and verify, write the last chunks (creating the
        file if it was not streamed), apply C{mode} and C{mtime}. Returns the
        L{TransferResult} the commit will have."""
        self._hash(unhashed)
        self._verify(expected_checksum)
        if self._fd is None:
            self._create()
        if self._direct is not None:
            self._write_direct(chunks)
            self._flush_direct()
        else:
            _write_all(self._fd, chunks)
        if mode is not None:
            os.fchmod(self._fd, mode)
        if mtime is not None:
            os.utime(self._fd, (mtime, mtime))
        checksum = {method: b64digest(hasher) for method, hasher in self._hashers.items()}
        return TransferResult(self.size, checksum, mtime, mode, self.dest_path)

    def _place(self):
        """Rename the written file onto its name, unless the commit was abandoned, and close
        it (the directory stays open for its fsync)."""
        with self._lock:
            if self._abandoned:
                raise CancelledError()
            os.rename(
                self._temp_name,
                self._name,
                src_dir_fd=self._dir_fd,
                dst_dir_fd=self._dir_fd,
            )
        # Closed (and unlocked) only once renamed: a sweep never takes a file in use.
        fd, self._fd = self._fd, None
        self._created = False
        os.close(fd)

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
        self._free_direct()
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        if self._created:
            self._created = False
            try:
                os.unlink(self._temp_name, dir_fd=self._dir_fd)
            except FileNotFoundError:
                pass
        self._close_directory()


_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class NotADirectoryOnTheWay(Exception):
    """The component at C{depth} below the root is a symbolic link or not a directory."""

    def __init__(self, depth, link):
        super().__init__(
            "is a symbolic link (links are not followed below the destination root)"
            if link
            else "is not a directory"
        )
        self.depth = depth


def _components(root, directory, dest_path):
    """The names of the directories from C{root} down to C{directory}.

    @raise BadRequest: C{directory} is not C{root} or below it.
    """
    root = root.rstrip(os.sep) or os.sep
    directory = directory.rstrip(os.sep) or os.sep
    if directory == root:
        return ()
    prefix = root if root.endswith(os.sep) else root + os.sep
    parts = tuple(directory[len(prefix) :].split(os.sep))
    if not directory.startswith(prefix) or any(p in ("", ".", "..") for p in parts):
        raise BadRequest(f"{dest_path} is not below the destination root {root}")
    return parts


def walk_below(root_fd, parts, make):
    """
    The descriptor of the directory C{parts} below C{root_fd} (C{root_fd} itself for no
    parts), each opened relative to its parent without following a link; missing ones made
    when C{make}. Runs blocking.

    @raise NotADirectoryOnTheWay: a component is a link or not a directory.
    @raise OSError: any other failure.
    """
    fd = root_fd
    try:
        for depth, part in enumerate(parts):
            try:
                child = _enter(fd, part, make)
            except OSError as exc:
                if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
                try:
                    link = stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode)
                except OSError:
                    link = False
                raise NotADirectoryOnTheWay(depth, link) from None
            if fd != root_fd:
                os.close(fd)
            fd = child
    except BaseException:
        if fd != root_fd:
            os.close(fd)
        raise
    return fd


def open_below(root_fd, parts, make=False):
    """
    The descriptor of the directory C{parts} (names) below C{root_fd}, each opened from its
    parent without following a link, missing ones made when C{make}; the caller closes it.
    Runs blocking; raises OSError (ENOTDIR for a link or a file on the way).
    """
    try:
        fd = walk_below(root_fd, parts, make)
    except NotADirectoryOnTheWay:
        raise NotADirectoryError(errno.ENOTDIR, "a link or a file on the way") from None
    return os.dup(fd) if fd == root_fd else fd


def _enter(parent, name, make):
    try:
        return os.open(name, _DIRECTORY_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        if not make:
            raise
    try:
        os.mkdir(name, 0o777, dir_fd=parent)
    except FileExistsError:
        pass  # made meanwhile by another transfer, or a link: the open tells
    return os.open(name, _DIRECTORY_FLAGS, dir_fd=parent)


def _on_block_device(fd):
    """Whether the file open as C{fd} is on a file system of a block device, where O_DIRECT
    writes go straight to the disk (see L{_block_device}); elsewhere O_DIRECT may mean a round
    trip per write, and files are written through the page cache."""
    return _block_device(fd) is not None


def _block_device(fd):
    """The device number of the file system of C{fd} if it is a block device's (ext4, xfs...:
    a number with a major), else None: network and virtual file systems (NFS, CIFS, FUSE,
    tmpfs, overlay; btrfs and ZFS too) have anonymous device numbers (major 0)."""
    device = os.fstat(fd).st_dev
    return device if os.major(device) != 0 else None


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


def _write_at(fd, chunks, offset):
    """Write all of C{chunks} at C{offset} in C{fd}, in as few system calls as the OS allows."""
    for start in range(0, len(chunks), _IOV_MAX):
        batch = chunks[start : start + _IOV_MAX]
        written = os.pwritev(fd, batch, offset)
        total = sum(map(len, batch))
        if written < total:
            data = memoryview(b"".join(batch))[written:]
            position = offset + written
            while data:
                n = os.pwrite(fd, data, position)
                data, position = data[n:], position + n
        offset += total


class DirectorySyncs:
    """
    fsync of directories, shared: a caller returns once an fsync of its directory that started
    after it called has succeeded, and callers that arrive while one runs share the next one
    (group commit). Called from the threads doing the renames.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._directories = {}

    def sync(self, key, fd):
        """Return once an fsync of the directory C{key} names (its path), open as C{fd},
        that started after this call has succeeded."""
        with self._lock:
            state = self._directories.get(key)
            if state is None:
                state = self._directories[key] = _Directory(threading.Condition(self._lock))
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
                        _fsync_directory(fd)
                    finally:
                        self._lock.acquire()
                        state.syncing = False
                        state.changed.notify_all()
                    state.synced = covered
            finally:
                state.callers -= 1
                if state.callers == 0:
                    del self._directories[key]


class _Directory:
    def __init__(self, changed):
        self.changed = changed
        self.callers = 0
        self.requested = 0  # renames announced
        self.synced = 0  # renames covered by a finished fsync
        self.syncing = False


directories = DirectorySyncs()


# Commits waiting for a job of their pool's group commit, at most this many per job.
GROUP_COMMIT_MAX = 64
# The bytes and the files waiting for (or in) a pool's group commit, held in memory, up to
# which a transfer gives its server's slot up once its file is received (see
# InflightFile.commit_waits_apart); beyond them it keeps the slot until its file is committed,
# so that the transfers of the moment, not a faster network, bound what waits for the disk.
# (bench/pump.py -n 4000: peak RSS 46.9-47.0 MB with 16 files, 47.2-47.4 with 48, 48.8-49.7
# without a count, for files/s within the machine's noise of each other.)
GROUP_BACKLOG_MAX = 16 * 1024 * 1024
GROUP_BACKLOG_FILES = 16


class GroupCommit:
    """
    The commits of files received whole (not streamed), done together: one pool job writes
    the files that are waiting, makes them durable with one C{syncfs} of their file system,
    renames them, and makes the renames durable with a second one, where a file and its
    directory fsynced one by one would cost two fsyncs each (each a journal commit and a
    cache flush of the device). On the 2-core test machine, while its disk's flushes were
    slow, that was about 1 ms of system CPU per file against 0.1-0.3 ms for its share of a
    group's syncfs; while they were fast, about the same either way.

    One job runs at a time per pool: the commits asked for while it runs wait for the next,
    so a lone file goes at once and a busy pump's files share their syncfs (group commit).
    C{syncfs} stands for the fsyncs only where it is as good, and cheap: on a block device's
    file system (ext4, xfs: L{_syncfs_device}) on Linux 5.8 or later, where it reports the
    write-back errors of the file system since the descriptor it is given was opened (that
    of the group's first file, opened before any of the files was written), and while the
    system holds little data not yet written (L{_little_dirty}: a syncfs writes out other
    programs' dirty pages too, and waits for them). Otherwise (NFS, FUSE, tmpfs, overlay,
    another OS, much dirty data) each file is committed as a streamed one is, fsyncs and
    all, in the same job.
    """

    _of = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, reactor, pool):
        """The group commit of C{pool}, made on first use."""
        group = cls._of.get(pool)
        if group is None:
            group = cls._of[pool] = cls(reactor, pool)
        return group

    def __init__(self, reactor, pool):
        self._reactor = reactor
        self._pool = weakref.ref(pool)  # not kept alive by its entry in _of
        self._waiting = []  # (InflightFile, args of _prepare, Deferred)
        self._running = False
        self.jobs = 0  # jobs run, and files committed by them: their mean batch
        self.files = 0
        self.held = 0  # bytes of the files waiting or being committed, and those files
        self.held_files = 0

    def room_for(self, size):
        """Whether one more file of C{size} bytes may wait for the commits
        (L{GROUP_BACKLOG_MAX}, L{GROUP_BACKLOG_FILES})."""
        return self.held + size <= GROUP_BACKLOG_MAX and self.held_files < GROUP_BACKLOG_FILES

    def commit(self, sink, args):
        """A Deferred with the L{TransferResult} of committing C{sink} (as
        L{InflightFile._commit} with C{args}), or its failure."""
        d = Deferred()
        self._waiting.append((sink, args, d))
        self.held += sink.size
        self.held_files += 1
        if not self._running:
            self._next()
        return d

    def _next(self, _=None):
        batch = self._waiting[:GROUP_COMMIT_MAX]
        del self._waiting[:GROUP_COMMIT_MAX]
        self._running = bool(batch)
        if not batch:
            return
        self.jobs += 1
        self.files += len(batch)
        files = [(sink, args) for sink, args, _ in batch]
        job = deferToThreadPool(self._reactor, self._pool(), _commit_together, files)
        job.addBoth(self._done, batch).addBoth(self._next)

    def _done(self, outcomes, batch):
        self.held -= sum(sink.size for sink, _, _ in batch)
        self.held_files -= len(batch)
        if isinstance(outcomes, Failure):  # _commit_together itself failed: every file did
            outcomes = [outcomes] * len(batch)
        for (_, _, d), outcome in zip(batch, outcomes):
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome)


def _commit_together(files):
    """
    Pool job of L{GroupCommit}: commit C{files} (L{InflightFile}, args of its C{_prepare});
    a list of their L{TransferResult}s or L{Failure}s, in order. Each file's steps are those
    of L{InflightFile._commit}; a step that fails fails that file alone, except a syncfs,
    which fails the files it was to make durable.
    """
    outcomes = [None] * len(files)
    devices = {}  # device -> [(index, sink, result)] of the files prepared there
    quiet = _little_dirty()
    for i, (sink, args) in enumerate(files):
        try:
            with sink._finishing():
                result = sink._prepare(*args)
                device = _syncfs_device(sink._dir_fd) if quiet else None
                if device is None:
                    sink._durably_placed(streamed=False)
                    outcomes[i] = result
                else:
                    devices.setdefault(device, []).append((i, sink, result))
        except BaseException:
            outcomes[i] = Failure()
    for prepared in devices.values():
        # Both syncfs go through the first file's own descriptor (a copy: the file is closed
        # once renamed), opened before any write of the group, so they report every write-back
        # error since. One shared with other jobs, such as the destination root's, might have
        # had an error reported to another job already.
        try:
            probe = os.dup(prepared[0][1]._fd)
        except OSError as exc:
            for i, sink, _ in prepared:
                outcomes[i] = _failed_commit(sink, exc)
            continue
        try:
            placed = _each(_synced(prepared, probe, outcomes), lambda s: s._place(), outcomes)
            closed = _each(
                _synced(placed, probe, outcomes), lambda s: s._close_directory(), outcomes
            )
        finally:
            os.close(probe)
        for i, _, result in closed:
            outcomes[i] = result
    return outcomes


def _synced(members, probe, outcomes):
    """C{members} (index, L{InflightFile}, result) once a syncfs through C{probe} has
    succeeded; none if it failed, each of them then failed with its error in C{outcomes}."""
    if members:
        try:
            _syncfs(probe)
        except OSError as exc:
            for i, sink, _ in members:
                outcomes[i] = _failed_commit(sink, exc)
            return []
    return members


def _each(members, step, outcomes):
    """Those of C{members} (index, L{InflightFile}, result) for which C{step(sink)} succeeded;
    each other one's failure in C{outcomes} (its temporary file removed)."""
    done = []
    for member in members:
        i, sink, _ = member
        try:
            with sink._finishing():
                step(sink)
            done.append(member)
        except BaseException:
            outcomes[i] = Failure()
    return done


def _failed_commit(sink, exc):
    """The L{Failure} of C{sink}'s commit failing with C{exc} (its temporary file removed)."""
    try:
        with sink._finishing():
            raise exc
    except BaseException:
        return Failure()


@functools.cache
def _syncfs_function():
    """C{syncfs(fd)} raising OSError, where it reports write-back errors (Linux 5.8 and later,
    through the C library); else None."""
    if not sys.platform.startswith("linux"):
        return None
    release = tuple(int(n) for n in re.findall(r"\d+", os.uname().release)[:2])
    if release < (5, 8):
        return None
    try:
        import ctypes

        function = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int

    def syncfs(fd):
        if function(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    return syncfs


def _syncfs(fd):
    _syncfs_function()(fd)


# A syncfs writes out every dirty page of its file system, other programs' too, and waits for
# them: a group takes it only while the whole system holds at most this much data not yet
# written (Dirty and Writeback in /proc/meminfo), else its files are fsynced one by one.
SYNCFS_DIRTY_MAX = 64 * 1024 * 1024


# How long the system's answer stands: reading /proc/meminfo takes about 50 us, most of it
# the kernel's, and a busy pump's group commits come every few milliseconds, a few files each.
DIRTY_CHECK_INTERVAL = 0.1
_dirty_checked = [float("-inf"), False]  # when /proc/meminfo was last read, and its answer
_monotonic = time.monotonic


def _little_dirty():
    """Whether the system's data waiting to be written is at most C{SYNCFS_DIRTY_MAX}
    (L{_read_little_dirty}), read again at most every L{DIRTY_CHECK_INTERVAL} seconds."""
    now = _monotonic()
    checked = _dirty_checked
    if not checked[0] <= now < checked[0] + DIRTY_CHECK_INTERVAL:
        checked[1] = _read_little_dirty()
        checked[0] = now
    return checked[1]


def _read_little_dirty(meminfo="/proc/meminfo"):
    """Whether C{meminfo}'s Dirty and Writeback come to at most C{SYNCFS_DIRTY_MAX} (False
    when that cannot be read)."""
    waiting, found = 0, False
    try:
        with open(meminfo, "rb") as f:
            for line in f:
                if line.startswith((b"Dirty:", b"Writeback:")):
                    waiting += int(line.split()[1]) * 1024
                    found = True
    except (OSError, ValueError, IndexError):
        return False
    return found and waiting <= SYNCFS_DIRTY_MAX


def _syncfs_device(fd):
    """The device number of the file system of C{fd} when a syncfs there makes its files and
    directories as durable as their fsyncs would, else None (see L{GroupCommit})."""
    return _block_device(fd) if _syncfs_function() is not None else None


def _fsync_directory(fd):
    os.fsync(fd)


def sweep(root, min_age=SWEEP_MIN_AGE):
    """
    Remove the temporary files (C{.<name>.<random>.inflight}) under C{root} that no process is
    writing any more: those whose writer was killed before it could remove them. A file whose
    C{flock} is held is being written and is left alone, and so is one modified less than
    C{min_age} seconds ago (its writer may have created it and not locked it yet): those are
    returned as young, for L{sweep_files} to look at again once C{min_age} has passed. The part
    file and block record of a partitioned transfer (L{RESUMABLE_SUFFIXES}) are left for
    C{RESUMABLE_MIN_AGE} since their last change, for the next attempt to resume. Runs
    blocking (call it in a thread). The tree is walked by directory descriptors (C{os.fwalk})
    and each file removed through its directory's: a link swapped into the tree meanwhile
    cannot send a removal elsewhere.

    @return: C{(removed, young)}, lists of paths.
    """
    removed, young = [], []
    for directory, subdirectories, names, dir_fd in os.fwalk(root):
        for name in names:
            if is_inflight_name(name):
                _sweep_one(dir_fd, name, os.path.join(directory, name), min_age, removed, young)
    return removed, young


def sweep_files(paths, min_age=SWEEP_MIN_AGE, root=None):
    """
    L{sweep} for the temporary files at C{paths}: C{(removed, young)}. With C{root} (the
    directory C{paths} are under), each file's directory is reached from it without
    following links, as L{InflightFile} does; a path crossing a link is left alone.
    """
    removed, young = [], []
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    try:
        root_fd = None if root is None else os.open(root, flags)
    except OSError:
        return removed, young  # the whole tree is gone
    try:
        for path in paths:
            directory, name = os.path.split(path)
            try:
                if root_fd is None:
                    dir_fd = os.open(directory or ".", flags)
                else:
                    dir_fd = walk_below(root_fd, _components(root, directory, path), make=False)
            except (OSError, BadRequest, NotADirectoryOnTheWay):
                continue  # gone already, or not reachable without a link
            try:
                _sweep_one(dir_fd, name, path, min_age, removed, young)
            finally:
                if dir_fd != root_fd:
                    os.close(dir_fd)
    finally:
        if root_fd is not None:
            os.close(root_fd)
    return removed, young


def _sweep_one(dir_fd, name, path, min_age, removed, young):
    try:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError:
        return  # gone already, or a link
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # its writer is alive
        age = time.time() - os.fstat(fd).st_mtime
        if name.endswith(RESUMABLE_SUFFIXES) and age < RESUMABLE_MIN_AGE:
            return  # a partitioned transfer's, resumed by its next attempt
        # Checked with the lock held: a writer that locks it from now on is too late.
        if os.fstat(fd).st_mtime > time.time() - min_age:
            young.append(path)  # maybe created a moment ago, its lock not taken yet
            return
        try:
            os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            return
        removed.append(path)
    finally:
        os.close(fd)
