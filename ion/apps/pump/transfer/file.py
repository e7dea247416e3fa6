"""The C{file} scheme: copy local files (C{file:///abs/path}, C{file:relative/path}) and list
local directories, with the same verify-then-rename delivery as the network schemes."""

import errno
import os
import stat

from twisted.internet.task import deferLater

from ion.apps.pump.transfer.errors import AuthFailed, BadRequest, LocalFailure, NotFound
from ion.apps.pump.transfer.inflight import InflightFile
from ion.apps.pump.transfer.results import Entry

CHUNK_SIZE = 256 * 1024
# Give the reactor a turn after this many chunks (4 MiB) so a big copy does not starve it.
CHUNKS_PER_TURN = 16


def _source_error(shown, exc):
    if isinstance(exc, FileNotFoundError):
        return NotFound(f"{shown}: no such file or directory")
    if isinstance(exc, PermissionError):
        return AuthFailed(f"{shown}: permission denied")
    if exc.errno in (errno.EISDIR, errno.ENOTDIR):
        return BadRequest(f"{shown}: {exc.strerror}")
    return LocalFailure.from_os_error(shown, exc)


async def copy(reactor, read, sink):
    """Move chunks from C{read(size)} to C{sink} (an L{InflightFile}) until C{read} returns
    nothing, waiting whenever the sink has too much waiting for the disk."""
    chunks = 0
    while data := read(CHUNK_SIZE):
        sink.write(data)
        chunks += 1
        if sink.backlogged:
            await sink.drained()
        elif chunks % CHUNKS_PER_TURN == 0:
            await deferLater(reactor, 0, lambda: None)


async def fetch(reactor, location, sink, settings):
    """Copy the local file at C{location} into C{sink}; returns its C{(mtime, mode)}."""
    try:
        source = open(location.path, "rb")
        info = os.fstat(source.fileno())
    except OSError as exc:
        raise _source_error(location.shown, exc) from None
    with source:
        if not stat.S_ISREG(info.st_mode):
            raise BadRequest(f"{location.shown}: not a regular file")
        sink.declare(info.st_size)

        def read(size):
            try:
                return source.read(size)
            except OSError as exc:
                raise LocalFailure.from_os_error(f"cannot read {location.shown}", exc) from None

        await copy(reactor, read, sink)
    return info.st_mtime, stat.S_IMODE(info.st_mode)


async def store(reactor, outgoing, location, settings):
    """Copy C{outgoing} to the local path of C{location} (inflight name, then rename)."""
    sink = InflightFile(
        location.path, methods=(), what=location.shown, reactor=reactor, pool=settings.pool
    )
    try:
        sink.declare(outgoing.size)
        await copy(reactor, outgoing.read, sink)
    except BaseException:
        await sink.discard()
        raise
    await sink.finish(mtime=outgoing.mtime, mode=outgoing.mode)


async def listdir(reactor, location, settings):
    """The entries of the local directory at C{location} (symbolic links are not followed)."""
    entries = []
    try:
        with os.scandir(location.path) as names:
            for name in names:
                entry = _entry(name.name, name.stat(follow_symlinks=False))
                if entry is not None:
                    entries.append(entry)
    except OSError as exc:
        raise _source_error(location.shown, exc) from None
    return entries


def _entry(name, info):
    """The L{Entry} for a file, directory or symbolic link; C{None} for devices, fifos..."""
    if stat.S_ISLNK(info.st_mode):
        kind = "link"
    elif stat.S_ISDIR(info.st_mode):
        kind = "dir"
    elif stat.S_ISREG(info.st_mode):
        kind = "file"
    else:
        return None
    size = info.st_size if kind == "file" else None
    return Entry(name, size, info.st_mtime, stat.S_IMODE(info.st_mode), kind)
