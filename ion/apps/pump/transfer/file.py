"""The C{file} scheme: copy local files (C{file:///abs/path}, C{file:relative/path}) and list
local directories, with the same verify-then-rename delivery as the network schemes.

A source file is opened with C{O_NOFOLLOW | O_NONBLOCK}, so neither a symbolic link as its
last component nor a named pipe waiting for a writer can redirect or stall it, and is checked
with C{fstat} on the descriptor: only a regular file is copied (anything else is a permanent
422). The open and the reads run in the caller's thread pool, so a slow disk never holds up
the reactor (without a pool they run at once); directory listings are read there too, and so
is the source of a put (read and hashed a MiB at a time).

Copies keep to the caller's bandwidth limits (L{ion.apps.pump.transfer.pacing}) as the network
schemes do: a get's sink is a L{PacedSink} (made by L{ion.apps.pump.transfer.operations.get}),
a put writes through one over C{settings.pacers}, and L{copy} reads no further chunk while it
is backlogged. L{fetch_range} copies one block of a file announced in blocks.
"""

import errno
import hashlib
import os
import stat

from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool

from ion.apps.pump.transfer.errors import (
    AuthFailed, BadRequest, LocalFailure, NotFound, TransferError,
)
from ion.apps.pump.transfer.inflight import InflightFile
from ion.apps.pump.transfer.limits import SharedResult
from ion.apps.pump.transfer.outgoing import PUT_CHUNK_SIZE
from ion.apps.pump.transfer.pacing import PacedSink
from ion.apps.pump.transfer.results import Entry, Listing, entry_type

CHUNK_SIZE = 256 * 1024
# A local directory of more entries than this is refused by a poll's listing (413), as a
# remote listing past listings.MAX_LISTING_BYTES is: anyone who can write in the tree could
# otherwise make the poll hold any number of entries in memory at once.
MAX_LOCAL_ENTRIES = 250_000
# Give the reactor a turn after this many chunks (4 MiB) so a big copy does not starve it.
CHUNKS_PER_TURN = 16
_SOURCE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _source_error(shown, exc):
    if isinstance(exc, FileNotFoundError):
        return NotFound(f"{shown}: no such file or directory")
    if isinstance(exc, PermissionError):
        return AuthFailed(f"{shown}: permission denied")
    if exc.errno == errno.ELOOP:
        return BadRequest(f"{shown}: a symbolic link (not followed)")
    if exc.errno == errno.ENXIO:
        return BadRequest(f"{shown}: not a regular file")
    if exc.errno in (errno.EISDIR, errno.ENOTDIR):
        return BadRequest(f"{shown}: {exc.strerror}")
    return LocalFailure.from_os_error(shown, exc)


async def copy(reactor, read, sink, size=CHUNK_SIZE):
    """Move chunks from C{await read(size)} to C{sink} (an L{InflightFile}, or a L{PacedSink}
    over one) until C{read} returns nothing, waiting whenever the sink has too much waiting
    for the disk or its pacers are in debt."""
    chunks = 0
    while data := await read(size):
        sink.write(data)
        chunks += 1
        if sink.backlogged:
            await sink.drained()
        elif chunks % CHUNKS_PER_TURN == 0:
            await deferLater(reactor, 0, lambda: None)


class _Source:
    """
    A local regular file, opened and read by jobs in C{pool} (one at a time) or at once
    without a pool. The first chunk is read with the open, and a short read is the end: a
    small file costs one job. A job still running when its caller is cancelled runs to its
    end; L{close} then closes the file after it.
    """

    def __init__(self, reactor, pool, location, offset=0, end=None):
        self._reactor = reactor
        self._pool = pool
        self._location = location
        self._position = offset
        self._end = end  # None: read to the end of the file
        self._fd = None
        self._ahead = None  # the chunk read with the open
        self._job = None  # the pool job running, if any

    async def open(self):
        """The C{os.stat_result} of the opened file."""
        return await self._call(self._open)

    async def read(self, size):
        if self._ahead is not None:
            data, self._ahead = self._ahead, None
            return data
        if self._fd is None:
            return b""
        return await self._call(self._read, size)

    def close(self):
        if self._job is not None and not self._job.done:
            self._job.observe().addBoth(lambda _: self._close())
        else:
            self._close()

    async def _call(self, work, *args):
        if self._pool is None:
            return work(*args)
        self._job = SharedResult(deferToThreadPool(self._reactor, self._pool, work, *args))
        return await self._job.observe()

    # -- in the pool --------------------------------------------------------------------

    def _open(self):
        shown = self._location.shown
        try:
            self._fd = os.open(self._location.path, _SOURCE_FLAGS)
            info = os.fstat(self._fd)
        except OSError as exc:
            self._close()
            raise _source_error(shown, exc) from None
        if not stat.S_ISREG(info.st_mode):
            self._close()
            raise BadRequest(f"{shown}: not a regular file")
        if self._position:
            try:
                os.lseek(self._fd, self._position, os.SEEK_SET)
            except OSError as exc:
                self._close()
                raise LocalFailure.from_os_error(f"cannot read {shown}", exc) from None
        self._ahead = self._read(CHUNK_SIZE)
        return info

    def _read(self, size):
        if self._end is not None:
            size = min(size, self._end - self._position)
            if size <= 0:
                self._close()
                return b""
        try:
            data = os.read(self._fd, size)
            self._position += len(data)
        except OSError as exc:
            self._close()
            raise LocalFailure.from_os_error(f"cannot read {self._location.shown}", exc) from None
        if len(data) < size:
            self._close()  # the end: a regular file reads short only there
        return data

    def _close(self):
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


async def fetch(reactor, location, sink, settings):
    """Copy the local file at C{location} into C{sink}; returns its C{(mtime, mode)}."""
    source = _Source(reactor, settings.pool, location)
    try:
        info = await source.open()
        sink.declare(info.st_size)
        await copy(reactor, source.read, sink)
    finally:
        source.close()
    return info.st_mtime, stat.S_IMODE(info.st_mode)


async def fetch_range(reactor, location, sink, settings, offset, length):
    """Copy the C{length} bytes at C{offset} of the local file at C{location} into C{sink} (a
    block: L{ion.apps.pump.transfer.blocks.BlockSink}, which fails a short one)."""
    source = _Source(reactor, settings.pool, location, offset, offset + length)
    try:
        await source.open()
        await copy(reactor, source.read, sink)
    finally:
        source.close()


async def store(reactor, outgoing, location, settings):
    """Copy C{outgoing} to the local path of C{location} (inflight name, then rename), no
    faster than C{settings.pacers} allow. The source is read and hashed in the pool (at once
    without one: see L{OutgoingFile.take}); its caller closes it once no thread reads it."""
    pool = settings.pool
    sink = InflightFile(location.path, methods=(), what=location.shown, reactor=reactor, pool=pool)
    try:
        sink.declare(outgoing.size)
        pacers = settings.pacers
        target = PacedSink(sink, pacers, reactor) if pacers else sink
        await copy(reactor, outgoing.take, target, PUT_CHUNK_SIZE)
    except BaseException:
        await sink.discard()
        raise
    await sink.finish(mtime=outgoing.mtime, mode=outgoing.mode)


async def listdir(reactor, location, settings, unless=None):
    """The entries of the local directory at C{location} (symbolic links are not followed),
    read in the pool when there is one; C{unless} is ignored (no digest here)."""
    if settings.pool is None:
        return _listdir(location)
    return await deferToThreadPool(reactor, settings.pool, _listdir, location)


def _listdir(location):
    entries = []
    try:
        for name, info in _scan(location.path):
            entry = _entry(name, info)
            if entry is not None:
                entries.append(entry)
    except OSError as exc:
        raise _source_error(location.shown, exc) from None
    return entries


def list_local(path, shown, unless=None):
    """The entries of the local directory C{path} as the transfer service's C{list} op gives
    them, C{{name, size, mtime, mode, type}} sorted by name (symbolic links not followed),
    read on the calling thread: a poll of a local tree lists it in its own pool jobs, without
    the service's conversions. L{TransferError} as C{list}'s, C{shown} naming the directory;
    one of code 413 for a directory of more than L{MAX_LOCAL_ENTRIES} entries.

    @return: a L{Listing} of them (maps, not L{Entry} values), its C{digest} that of C{path}
        and of every entry's name, type, mode, size and mtime (in nanoseconds): all that the
        maps are made of. No entries, C{unchanged}, when that digest is C{unless}."""
    try:
        rows = _scan(path, MAX_LOCAL_ENTRIES, shown)
    except OSError as exc:
        raise _source_error(shown, exc) from None
    rows.sort()  # by name: no two are the same
    digest = hashlib.sha256(_LOCAL_LISTING)
    digest.update(path.encode("utf-8", "surrogateescape") + b"\0")
    # A name holds no "/" and no NUL: the fields and the entries are told apart.
    text = "\0".join([
        f"{name}/{info.st_mode}/{info.st_size}/{info.st_mtime_ns}" for name, info in rows
    ])
    digest.update(text.encode("utf-8", "surrogateescape"))
    digest = digest.hexdigest()
    if unless is not None and digest == unless:
        return Listing(digest=digest, unchanged=True)
    entries = Listing(digest=digest)
    for name, info in rows:
        kind = entry_type(info.st_mode)
        if kind is not None:
            entries.append({
                "name": name,
                "size": info.st_size if kind == "file" else None,
                "mtime": info.st_mtime,
                "mode": stat.S_IMODE(info.st_mode),
                "type": kind,
            })
    return entries


# Part of every local listing's digest: a change to what list_local gives for the same
# directory (a new version of it) changes every digest.
_LOCAL_LISTING = b"ion local listing 1\n"


def _scan(path, limit=None, shown=None):
    """[(name, lstat result)] of the entries of the directory C{path}; one removed between the
    directory's read and its lstat is left out (the directory is still there). Each lstat is
    relative to the directory's descriptor: the kernel does not walk the path again. More
    than C{limit} entries: L{TransferError} 413, C{shown} naming the directory."""
    rows = []
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with os.scandir(fd) as names:
            for name in names:
                if limit is not None and len(rows) >= limit:
                    raise TransferError(f"{shown}: more than {limit} entries", code=413)
                try:
                    rows.append((name.name, name.stat(follow_symlinks=False)))
                except FileNotFoundError:
                    continue
    finally:
        os.close(fd)
    return rows


def _entry(name, info):
    """The L{Entry} for a file, directory or symbolic link; C{None} for devices, fifos..."""
    kind = entry_type(info.st_mode)
    if kind is None:
        return None
    size = info.st_size if kind == "file" else None
    return Entry(name, size, info.st_mtime, stat.S_IMODE(info.st_mode), kind)
