"""Partitioned puts: a big file sent to an sftp or ftp server as blocks written at their
offsets into one temporary file there, several at a time, resumed after a crash from a local
record of the blocks the server acknowledged.

A put of a file of at least C{threshold} bytes (L{BlockSettings.sends}) to C{sftp://} or
C{ftp://}, given a C{record_dir}, is cut into blocks as a get is
(L{ion.apps.pump.transfer.blocks.block_size}); C{parallel} blocks are sent at a time, each
taking a slot of the caller's L{HostLimiter} and a session of its own (kept sessions are
borrowed: L{ion.apps.pump.transfer.sessions}), each reading its bytes from the local file at
its offset, paced by the same pacers as any put. On the server the bytes go to one temporary
file beside the target, C{.<name>.<key>.inflight}, C{<key>} naming the file's version
(destination URL, size, block size, and the notice's identity or else the local mtime): over
sftp each block opens it and writes at its offset; over ftp each block is C{REST <offset>} then
C{STOR} (block 0 a plain C{STOR}, which truncates: it goes first, alone).

A block is done once the server acknowledged it (every sftp write's status reply and the
close; ftp's 226): then its number is appended, fdatasynced, to the record
C{<record_dir>/<key>.blocks} (L{BlockRecord}: a JSON header line, one number a line), held
under an exclusive C{flock} for the put (a second put of the same file fails with 503, retried
later). The next attempt -- after a kill, a lost link, a restart -- sends only the blocks the
record lacks, if the temporary file is still on the server with at least the bytes of the
blocks recorded (else it starts afresh). When the last block is in, the file's mode and mtime
are set, it is renamed into place and its size checked on the server, as for any put; then
the record is removed. A permanent failure removes the temporary file and the record; a
transient one keeps both, for the next attempt; when the caller gives the file up for good
(its retry horizon passed), L{forget_blocks} removes them. Records left behind otherwise (a
process killed for good) are removed by L{sweep_records} after L{RESUMABLE_MIN_AGE}.

The whole file's checksum (of the local file, read once in the pool while the blocks go) is
the result's, as a single-stream put's is of the bytes it read.

A server that refuses a write at an offset (ftp C{REST} then C{STOR}: L{ftp.REST_REFUSED}) is
remembered in L{BlockSettings.no_store_range}, logged once, and the file (and every later one
to it) is sent in one stream. File destinations and http(s) PUTs are always one stream.
"""

import fcntl
import os
import posixpath
import time

from twisted.internet.defer import maybeDeferred
from twisted.internet.threads import deferToThreadPool

from ion.apps.pump.transfer.blocks import (
    SEND_SCHEMES,
    BlockRecord,
    block_size,
    human,
    note_no_store_range,
    ranges,
    run_blocks,
    version_key,
)
from ion.apps.pump.transfer.errors import LocalFailure, RangeIgnored
from ion.apps.pump.transfer.inflight import INFLIGHT_SUFFIX, RESUMABLE_MIN_AGE
from ion.apps.pump.transfer.limits import slot
from ion.apps.pump.transfer.outgoing import BlockReader, remove_left
from ion.apps.pump.transfer.results import TransferResult

RECORD_SUFFIX = ".blocks"


class OutgoingBlocks:
    """
    A put in blocks under way, for progress figures (as L{PartialFile} is for a get).

    @ivar what: the destination, redacted.
    @ivar blocks: the C{(offset, length)} of each block.
    @ivar done: the numbers of the blocks acknowledged and recorded.
    @ivar size: bytes at the server: of the blocks done and of those being sent.
    @ivar resumed: bytes of the blocks done by earlier attempts.
    """

    def __init__(self, what, size, size_of_block):
        self.what = what
        self.expected_size = size
        self.blocks = ranges(size, size_of_block)
        self.done = set()
        self.size = 0
        self.resumed = 0

    def progress(self):
        """C{3/16 blocks, 1.2 GiB of 4.0 GiB}."""
        return (
            f"{len(self.done)}/{len(self.blocks)} blocks, "
            f"{human(self.size)} of {human(self.expected_size)}"
        )

    def count(self, n):
        self.size += n


class SendRecord:
    """The local record of a put in blocks (see the module docstring); its disk work runs in
    C{pool} (or at once without one)."""

    def __init__(self, directory, key, size, size_of_block, count, what, reactor, pool):
        self.directory = directory
        self.what = what
        self._reactor = reactor
        self._pool = pool
        self._dir_fd = None
        self._record = BlockRecord(key + RECORD_SUFFIX, size, size_of_block, count, what)

    def _run(self, work, *args):
        if self._pool is None:
            return maybeDeferred(work, *args)
        return deferToThreadPool(self._reactor, self._pool, work, *args)

    async def open(self):
        """Open (or make) the record, locked; the numbers of the blocks it holds."""
        return await self._run(self._open)

    async def reset(self):
        """Start afresh: no block done."""
        await self._run(self._record.reset)

    async def add(self, index):
        await self._run(self._record.add, index)

    async def drop(self):
        """Remove the record (the file is in place, or will never be)."""
        await self._run(self._drop)

    async def close(self):
        """Close the record (releasing the lock), keeping it."""
        await self._run(self._close)

    def _open(self):
        try:
            os.makedirs(self.directory, exist_ok=True)
            self._dir_fd = os.open(
                self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
            )
        except OSError as exc:
            raise LocalFailure.from_os_error(
                f"cannot use the block record directory {self.directory}", exc
            ) from None
        try:
            self._record.open(self._dir_fd)
            try:
                fcntl.flock(self._record.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LocalFailure(
                    f"{self.what}: another transfer is sending this file", code=503
                ) from None
            return self._record.read(self._dir_fd)
        except BaseException:
            self._close()
            raise

    def _drop(self):
        if self._dir_fd is not None:
            self._record.drop(self._dir_fd)
        self._close()

    def _close(self):
        self._record.close()
        if self._dir_fd is not None:
            fd, self._dir_fd = self._dir_fd, None
            os.close(fd)


def sweep_records(directory, min_age=RESUMABLE_MIN_AGE, now=None):
    """Remove the records in C{directory} unchanged for C{min_age} seconds (puts given up
    on); blocking: call it in a thread. Returns the names removed."""
    now = time.time() if now is None else now
    removed = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed
    for name in names:
        if not name.endswith(RECORD_SUFFIX):
            continue
        path = os.path.join(directory, name)
        try:
            if now - os.lstat(path).st_mtime >= min_age:
                os.unlink(path)
                removed.append(name)
        except FileNotFoundError:
            pass
    return removed


def temp_path(path, key):
    """The server path of the temporary file of a put in blocks to C{path}."""
    directory, name = posixpath.split(path)
    name = name.encode("utf-8", "surrogateescape")[:180].decode("utf-8", "ignore")
    return posixpath.join(directory, f".{name}.{key}{INFLIGHT_SUFFIX}")


async def put_blocks(reactor, location, url, outgoing, settings, blocks, record_dir, version,
                     limiter, active=None):
    """
    Send the open L{OutgoingFile} C{outgoing} to C{location} in blocks (see the module
    docstring); C{None} when the server refuses writes at an offset (send it whole).

    @param version: what names the file's version besides its URL and size (the notice's
        identity); C{None}: the local file's mtime.
    @param active: told C{add} and C{discard} of the L{OutgoingBlocks}, for progress.
    @return: a L{TransferResult} (C{blocks}: the block count), or C{None}.
    """
    scheme = SEND_SCHEMES[location.scheme]
    size = outgoing.size
    step = block_size(size, blocks.size)
    if version is None:
        version = repr(outgoing.mtime)
    key = version_key(location.shown, size, step, version)
    temp = temp_path(location.path, key)
    state = OutgoingBlocks(location.shown, size, step)
    record = SendRecord(
        record_dir, key, size, step, len(state.blocks), location.shown, reactor,
        settings.pool,
    )
    done = await record.open()
    if active is not None:
        active.add(state)
    try:
        try:
            if getattr(scheme, "FIRST_BLOCK_ALONE", False) and 0 not in done:
                done = set()
            needed = max((sum(state.blocks[i]) for i in done), default=None)
            async with slot(limiter, url):
                kept = await scheme.store_begin(reactor, location, settings, temp, needed)
            if not kept:
                done = set()
                await record.reset()
            state.done = set(done)
            state.size = state.resumed = sum(state.blocks[i][1] for i in done)
            # The whole file's checksum, read in the pool while the blocks go; waited for
            # however they end (the file is closed after).
            hashing = _in_pool(reactor, settings.pool, outgoing.whole_hash())
            try:
                await _send_missing(reactor, location, url, outgoing, settings, blocks, scheme,
                                    temp, state, record, limiter)
            except BaseException:
                await hashing.addErrback(lambda _: None)
                raise
            checksum = await hashing
            async with slot(limiter, url):
                await scheme.store_end(reactor, location, settings, temp, outgoing)
        except RangeIgnored:
            note_no_store_range(blocks, location)
            await _forget(reactor, location, settings, scheme, temp, record, limiter, url)
            return None
        except BaseException as exc:
            if not getattr(exc, "transient", True):
                await _forget(reactor, location, settings, scheme, temp, record, limiter, url)
            raise
        await record.drop()
        return TransferResult(
            size, checksum, outgoing.mtime, outgoing.mode & 0o777, location.shown,
            blocks=len(state.blocks),
        )
    finally:
        await record.close()
        if active is not None:
            active.discard(state)


async def forget_blocks(reactor, location, url, size, settings, blocks, record_dir, version,
                        limiter):
    """
    A put of C{size} bytes to C{location} is given up for good: if it went in blocks (a record
    of it is in C{record_dir}; C{version} as for L{put_blocks}, which must be given), remove
    its temporary file at the server (best effort, logged when it fails) and its record. A put
    of it running now (its record locked) is left alone.

    @return: whether a put in blocks was forgotten.
    """
    scheme = SEND_SCHEMES.get(location.scheme)
    if scheme is None or version is None or not blocks.sends(location, size):
        return False
    step = block_size(size, blocks.size)
    key = version_key(location.shown, size, step, version)
    path = os.path.join(record_dir, key + RECORD_SUFFIX)
    if not await _in_pool(reactor, settings.pool, lambda: os.path.lexists(path)):
        return False
    record = SendRecord(
        record_dir, key, size, step, len(ranges(size, step)), location.shown, reactor,
        settings.pool,
    )
    try:
        await record.open()
    except LocalFailure:
        return False  # being sent again, or its directory unusable: the sweep gets it
    try:
        await _forget(reactor, location, settings, scheme, temp_path(location.path, key), record,
                      limiter, url)
    finally:
        await record.close()
    return True


def _in_pool(reactor, pool, work):
    if pool is None:
        return maybeDeferred(work)
    return deferToThreadPool(reactor, pool, work)


async def _send_missing(reactor, location, url, outgoing, settings, blocks, scheme, temp, state,
                        record, limiter):
    """Send the blocks not done, C{blocks.parallel} at a time (block 0 first, alone, where
    the scheme needs it)."""

    async def send(index):
        offset, length = state.blocks[index]
        source = BlockReader(outgoing, offset, length, state.count)
        async with slot(limiter, url):
            try:
                await scheme.store_range(reactor, location, settings, temp, source, offset)
                if source.sent != length:
                    raise LocalFailure(
                        f"{outgoing.path}: shrank while being sent (block {index} at "
                        f"{offset}: {source.sent} bytes of {length})"
                    )
            except BaseException:
                state.size -= source.sent
                raise
        await record.add(index)
        state.done.add(index)

    missing = [i for i in range(len(state.blocks)) if i not in state.done]
    if missing and missing[0] == 0 and getattr(scheme, "FIRST_BLOCK_ALONE", False):
        await send(0)
        missing = missing[1:]
    await run_blocks(missing, blocks.parallel, send)


async def _forget(reactor, location, settings, scheme, temp, record, limiter, url):
    """Remove the temporary file on the server (best effort, logged when it fails) and the
    record."""
    async with slot(limiter, url):
        await remove_left(scheme.store_discard, reactor, location, settings, temp)
    await record.drop()
