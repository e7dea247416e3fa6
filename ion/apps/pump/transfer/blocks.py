"""Partitioned transfers: a big file fetched as blocks, by range, several at a time, into one
temporary file, resumed after a crash from a record of the blocks already in.

A get of a file of at least C{threshold} bytes (L{BlockSettings}) over http(s), sftp or ftp is
split into blocks of C{size} bytes (by default the smallest size giving at most
C{DEFAULT_COUNT} blocks, and at least C{MIN_DEFAULT_SIZE}); C{parallel} blocks are fetched at a
time, each taking a slot of the caller's L{HostLimiter} like any transfer, each by range: an
HTTP C{Range} request, sftp reads at offsets, ftp C{REST} then C{RETR} cut at the block's end.
Whatever the notice claims, a file has at most L{MAX_BLOCKS} blocks (the block size grows to
fit), and a block streams to disk as it arrives (at most C{BLOCK_BACKLOG} bytes of it wait in
memory): a hostile size costs neither memory nor slots.

The bytes go into one L{PartialFile} beside the destination, C{.<name>.<key>.part.inflight},
written at each block's offset; C{<key>} names the file's version (URL, size, block size, and
its checksum or mtime), so a new version starts afresh. A block is done once its bytes are
fdatasynced; then its number is appended, fdatasynced, to the record
C{.<name>.<key>.blocks.inflight} (a JSON header line, one number a line; at most
L{RECORD_LIMIT} bytes are read back). A later attempt -- after a kill, a broker restart, a
lost link -- opens both and fetches only the blocks the record lacks. The sweep at start-up
leaves these two files for two days (L{ion.apps.pump.transfer.inflight.RESUMABLE_MIN_AGE}).
All disk work runs in the caller's thread pool; an exclusive C{flock} on the part file keeps
two transfers of one process or of two processes from writing it at once (the second fails
with 503, retried later).

The whole-file checksum is computed by reading the file back, block by block in order: in a
partitioned get, as soon as the blocks from the start of the file up to one are in (a pool
job hashes them while the next blocks arrive), so that once the last block is in only the
blocks not hashed yet are read; for an sr3 block notice, once the last block is in. It is
verified against the notice's; a mismatch removes both files (the next attempt starts from
nothing). Then mtime, mode, fsync and rename, as for any received file (L{InflightFile}).

A server that answers a range request with the whole file (200) is remembered in
L{BlockSettings.no_range}: the file is fetched in one stream, and so are the next ones from
that server; this is logged once per server.

sr3 sends a partitioned file as one notice per block, each with a C{blocks} field (see
L{sr3_block}); each such notice fetches its one block into the same part file and record, and
the notice that completes the record puts the file in place.

Puts in blocks (a sender's, to sftp and ftp) are in L{ion.apps.pump.transfer.sendblocks}; they
keep their record with L{BlockRecord} and run their blocks with L{run_blocks}, as gets do.
"""

import fcntl
import hashlib
import json
import os
import stat
import threading

import attrs
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from ion.apps.pump.transfer.errors import (
    BadRequest,
    ChecksumMismatch,
    LocalFailure,
    ShortTransfer,
    TransferError,
)
from ion.apps.pump.transfer.inflight import (
    RESUMABLE_SUFFIXES,
    InflightFile,
    Lane,
    _write_at,
    b64digest,
)
from ion.apps.pump.transfer.limits import slot
from ion.apps.pump.transfer.pacing import PacedSink
from ion.apps.pump.transfer.schemes import Schemes

log = Logger()

PART_SUFFIX, RECORD_SUFFIX = RESUMABLE_SUFFIXES
MAX_BLOCKS = 1024
DEFAULT_COUNT = 16
MIN_DEFAULT_SIZE = 8 * 1024 * 1024
# The smallest block size a setting may ask for.
MIN_BLOCK_SIZE = 64 * 1024
# A record holds a header and at most MAX_BLOCKS short lines: anything longer is not ours.
RECORD_LIMIT = 64 * 1024
_READ_SIZE = 1024 * 1024
# A block's source is paused while this many bytes wait for the disk, and its writes go in
# jobs of at least BLOCK_BATCH bytes: smaller than a single stream's (inflight.BACKLOG_LIMIT,
# WRITE_BATCH), as block_parallel blocks each hold that much at once.
BLOCK_BACKLOG = 2 * 1024 * 1024
BLOCK_BATCH = 512 * 1024
SCHEMES = Schemes(http="http", https="http", sftp="sftp", ftp="ftp")
SEND_SCHEMES = Schemes(sftp="sftp", ftp="ftp")
# A block named by a notice may be read from a local file too (a watch announces file: URLs);
# only the network schemes are partitioned by the consumer's own choice (SCHEMES).
RANGE_SCHEMES = Schemes(http="http", https="http", sftp="sftp", ftp="ftp", file="file")


@attrs.frozen
class BlockSettings:
    """
    When and how to partition a get.

    @ivar threshold: files of at least this many bytes are partitioned; 0: never.
    @ivar size: the block size, or C{None} for the default (see L{block_size}).
    @ivar parallel: blocks fetched at a time.
    @ivar no_range: hosts (C{scheme://host:port}) that ignored a range request; shared by
        the transfers of one owner.
    @ivar no_store_range: hosts that refused a write at an offset (ftp C{REST} before
        C{STOR}); files are sent to them in one stream.
    """

    threshold: int = 64 * 1024 * 1024
    size: int | None = None
    parallel: int = 4
    no_range: set = attrs.field(factory=set, eq=False)
    no_store_range: set = attrs.field(factory=set, eq=False)

    def applies(self, location, size):
        """Whether a file of C{size} bytes at C{location} is fetched in blocks."""
        return (
            self.threshold > 0
            and size is not None
            and size >= self.threshold
            and location.scheme in SCHEMES
            and _host(location) not in self.no_range
        )

    def sends(self, location, size):
        """Whether a file of C{size} bytes is sent to C{location} in blocks (sftp and ftp
        only: file copies and http PUTs go in one stream)."""
        return (
            self.threshold > 0
            and size >= self.threshold
            and location.scheme in SEND_SCHEMES
            and _host(location) not in self.no_store_range
        )


def _host(location):
    return f"{location.scheme}://{location.host}:{location.port}"


def block_size(size, wanted=None):
    """The block size for a file of C{size} bytes: C{wanted}, or the smallest giving at most
    C{DEFAULT_COUNT} blocks but at least C{MIN_DEFAULT_SIZE}; never so small that the file
    has more than L{MAX_BLOCKS} blocks."""
    if wanted is None:
        wanted = max(MIN_DEFAULT_SIZE, -(-size // DEFAULT_COUNT))
    return max(wanted, -(-size // MAX_BLOCKS), 1)


def ranges(size, size_of_block):
    """The C{(offset, length)} of each block of a file of C{size} bytes."""
    return [
        (offset, min(size_of_block, size - offset)) for offset in range(0, size, size_of_block)
    ] or [(0, 0)]


def version_key(url, size, size_of_block, version):
    """The C{<key>} of a part file: 16 hex digits of a hash of what names the file's version."""
    text = json.dumps([url, size, size_of_block, version])
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def human(n):
    """C{n} bytes as a short text: C{1.2 GiB}."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024


class BlockRecord:
    """
    The on-disk record of the blocks of one file that are done: a JSON header line (the file
    size, block size and block count: a record of another plan is not this file's), then one
    block number a line, each appended and fdatasynced. At most L{RECORD_LIMIT} bytes are read
    back, and only complete lines count. Its methods do disk work: pool threads only.

    Used by L{PartialFile} (beside the file received) and by the sender's record of blocks
    sent (L{ion.apps.pump.transfer.sendblocks}). A job whose caller was cancelled runs on in
    its thread: one lock orders the uses of the descriptor, so that it is never closed (and
    its number reused, or its C{flock} held on by the write still in the kernel) while an
    L{add} is writing through it.

    @ivar name: its file name, relative to the C{dir_fd} its methods are given.
    @ivar fd: the descriptor it is appended through, once L{open}.
    """

    def __init__(self, name, size, size_of_block, count, what):
        self.name = name
        self.count = count
        self.what = what
        self.fd = None
        self._lock = threading.Lock()
        self._header = json.dumps(
            {"size": size, "block_size": size_of_block, "blocks": count}
        ).encode()

    def read(self, dir_fd):
        """The numbers of the blocks recorded done; an empty set for no record, or one of
        another plan, or not a regular file."""
        try:
            fd = os.open(self.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError:
            return set()
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return set()
            data = os.read(fd, RECORD_LIMIT + 1)
        finally:
            os.close(fd)
        lines = data.split(b"\n")
        if len(data) > RECORD_LIMIT or lines[0] != self._header:
            return set()
        done = set()
        # The last line is complete only when followed by a newline.
        for line in lines[1:-1]:
            if line.isdigit() and int(line) < self.count:
                done.add(int(line))
        return done

    def open(self, dir_fd):
        """Open (or make) the record for appending; nothing is written."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        with self._lock:
            try:
                self.fd = os.open(self.name, flags, 0o666, dir_fd=dir_fd)
            except OSError as exc:
                raise LocalFailure.from_os_error(
                    f"cannot write the block record of {self.what}", exc
                ) from None

    def reset(self):
        """Empty the open record: its header only, durably."""
        with self._lock:
            try:
                os.ftruncate(self._open_fd(), 0)
                os.write(self.fd, self._header + b"\n")
                os.fdatasync(self.fd)
            except OSError as exc:
                raise LocalFailure.from_os_error(
                    f"cannot write the block record of {self.what}", exc
                ) from None

    def add(self, index):
        """Record block C{index} as done, durably."""
        with self._lock:
            try:
                os.write(self._open_fd(), b"%d\n" % index)
                os.fdatasync(self.fd)
            except OSError as exc:
                raise LocalFailure.from_os_error(
                    f"cannot record a block of {self.what}", exc
                ) from None

    def _open_fd(self):
        if self.fd is None:
            raise LocalFailure(f"the block record of {self.what} is closed")
        return self.fd

    def close(self):
        with self._lock:
            if self.fd is not None:
                fd, self.fd = self.fd, None
                os.close(fd)

    def drop(self, dir_fd):
        """Close and remove the record."""
        self.close()
        try:
            os.unlink(self.name, dir_fd=dir_fd)
        except FileNotFoundError:
            pass


class PartialFile(InflightFile):
    """
    A file received in blocks: its part file and block record (see the module docstring).
    L{open} it, write blocks through L{block}, L{mark} each done, then L{finish} (the whole
    file) or L{discard} (kept for a later attempt, unless L{keep} was set false).

    @ivar blocks: the C{(offset, length)} of each block.
    @ivar done: the numbers of the blocks in and recorded.
    @ivar size: bytes in the part file: those of the blocks done and of those arriving.
    """

    commits_in_groups = False  # its _commit hashes the part file and drops the record first

    def __init__(
        self, dest_path, size, size_of_block, key, methods, what, reactor, pool, root=None
    ):
        name = os.path.basename(dest_path)
        name = name.encode("utf-8", "surrogateescape")[:180].decode("utf-8", "ignore")
        super().__init__(
            dest_path,
            methods,
            None,
            what,
            reactor,
            pool,
            root=root,
            temp_name=f".{name}.{key}{PART_SUFFIX}",
        )
        self.expected_size = size
        self.block_size = size_of_block
        self.blocks = ranges(size, size_of_block)
        self.record_name = f".{name}.{key}{RECORD_SUFFIX}"
        self.done = set()
        self.resumed = 0
        self.keep = True
        self._record = BlockRecord(
            self.record_name, size, size_of_block, len(self.blocks), dest_path
        )
        self._hash_early = False
        self._hashed = 0  # bytes from the start hashed so far
        self._next_hash = 0  # the first block not yet handed to a hashing job
        self._hash_job = None  # the SharedResult of the hashing job running

    def progress(self):
        """C{3/16 blocks, 1.2 GiB of 4.0 GiB}."""
        return (
            f"{len(self.done)}/{len(self.blocks)} blocks, "
            f"{human(self.size)} of {human(self.expected_size)}"
        )

    async def open(self):
        """Open (or make) the part file and its record; L{done} says which blocks are in."""
        self.done = await self._run(self._open).observe()
        self.size = self.resumed = sum(self.blocks[i][1] for i in self.done)

    def hash_early(self):
        """From now on, hash the blocks in (those resumed too) as soon as those before them are,
        in a pool job beside the transfers: L{finish} then reads back only what is left."""
        self._hash_early = True
        self._hash_blocks()

    def block(self, index, methods=()):
        """The L{BlockSink} receiving block C{index}."""
        return BlockSink(self, index, methods)

    async def mark(self, index):
        """Record block C{index} as done, durably (its bytes first)."""
        await self._run(self._mark, index).observe()
        self.done.add(index)
        if self._hash_early:
            self._hash_blocks()

    @property
    def complete(self):
        return len(self.done) == len(self.blocks)

    def _running(self):
        jobs = super()._running()
        return jobs if self._hash_job is None else jobs + [self._hash_job]

    def _hash_blocks(self):
        """Hand the blocks done from where the hashing stands to a hashing job, unless one is
        running (its end starts the next)."""
        if self._hash_job is not None or self._error is not None or self._removal is not None:
            return
        first = self._next_hash
        while self._next_hash in self.done:
            self._next_hash += 1
        if self._next_hash == first:
            return
        offset, length = self.blocks[self._next_hash - 1]
        self._hash_job = self._run(self._hash_range, self._hashed, offset + length)
        self._hash_job.observe().addBoth(self._blocks_hashed)

    def _blocks_hashed(self, result):
        self._hash_job = None
        if isinstance(result, Failure):
            self._failed(result)
            return
        self._hashed = result
        self._hash_blocks()

    # -- the disk side (pool threads) --------------------------------------------------------

    def _open(self):
        self._open_directory()
        try:
            try:
                fd = os.open(
                    self._temp_name,
                    os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o666,
                    dir_fd=self._dir_fd,
                )
            except OSError as exc:
                raise LocalFailure.from_os_error(f"cannot open {self.temp_path}", exc) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise LocalFailure(f"{self.temp_path} is not a regular file", code=422)
            except BlockingIOError:
                os.close(fd)
                raise LocalFailure(
                    f"{self.dest_path}: another transfer is receiving it", code=503
                ) from None
            except BaseException:
                os.close(fd)
                raise
            self._fd, self._created = fd, True
            done = set()
            if os.fstat(fd).st_size == self.expected_size:
                done = self._record.read(self._dir_fd)
            self._record.open(self._dir_fd)
            if not done:
                self._record.reset()
                os.ftruncate(fd, 0)
            os.ftruncate(fd, self.expected_size)
            return done
        except BaseException:
            self._release()
            raise

    def _mark(self, index):
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise LocalFailure.from_os_error(f"cannot record a block of {self.dest_path}",
                                             exc) from None
        self._record.add(index)

    def _hash_range(self, offset, end):
        """Hash the bytes of the part file from C{offset} (where the hashing stands) to
        C{end}; C{end}."""
        try:
            while offset < end:
                data = os.pread(self._fd, min(_READ_SIZE, end - offset), offset)
                if not data:
                    raise LocalFailure(f"{self.temp_path}: shorter than {self.expected_size} bytes")
                self._hash([data])
                offset += len(data)
        except OSError as exc:
            raise LocalFailure.from_os_error(f"cannot read {self.temp_path}", exc) from None
        return end

    def _commit(self, chunks, unhashed, expected_checksum, mtime, mode):
        """Hash what is left of the file, verify it, then commit as any received file."""
        try:
            self._hash_range(self._hashed, self.expected_size)
            self._verify(expected_checksum)
        except ChecksumMismatch:
            self.keep = False  # bad bytes somewhere: start afresh next time
            self._remove()
            raise
        except BaseException:
            self._remove()
            raise
        self._drop_record()
        self.keep = False
        # Hashed and verified: the commit adds no bytes.
        return super()._commit([], [], None, mtime, mode)

    def _drop_record(self):
        self._record.drop(self._dir_fd)

    def _release(self):
        """Close both files (releasing the lock) and the directory, removing nothing."""
        self._record.close()
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        self._created = False
        self._close_directory()

    def _remove(self):
        if self.keep:
            self._release()
            return
        if self._dir_fd is not None:
            self._drop_record()
        super()._remove()


class BlockSink:
    """
    Receives one block of a L{PartialFile}: the chunks are written at their offset in the part
    file by a L{Lane} of pool jobs (one at a time, of at least C{BLOCK_BATCH} bytes but the
    last; a job goes on with the chunks that came while it wrote), the source paused while
    C{BLOCK_BACKLOG} bytes wait. Anything past the block's length fails it; L{close} fails it
    when bytes are missing or, given C{methods} and an expected checksum, when they do not hash
    to it.
    """

    def __init__(self, partial, index, methods=()):
        self.partial = partial
        self.index = index
        self.offset, self.length = partial.blocks[index]
        self.what = f"{partial.what} (block {index}: bytes {self.offset}-" \
                    f"{self.offset + self.length - 1})"
        self.received = 0
        self._written = 0  # by the lane's jobs, one at a time
        self._lane = Lane(partial._reactor, partial._pool, self._write_chunks, BLOCK_BATCH,
                          self._wake)
        self._error = None
        self._waiting = []
        self._hashers = {m: hashlib.new(m) for m in methods}

    def declare(self, size):
        """The server announces C{size} bytes for this block's request."""
        if size != self.length:
            raise TransferError(
                f"{self.what}: the server announces {size} bytes for the block, "
                f"{self.length} asked for"
            )

    def write(self, data):
        if self.received + len(data) > self.length:
            raise TransferError(f"{self.what}: the server sent more than the bytes asked for")
        if self._error is not None:
            raise self._error
        self.received += len(data)
        self.partial.size += len(data)
        self._lane.put(data)

    @property
    def backlogged(self):
        return self._lane.waiting >= BLOCK_BACKLOG

    def drained(self):
        if not self.backlogged or self._error is not None:
            return succeed(None)
        d = Deferred()
        self._waiting.append(d)
        # Told when the lane takes its bytes from now on; they may be taken already.
        self._lane.watch()
        self._wake()
        return d

    def _write_chunks(self, chunks):
        """The lane's work (a pool thread): hash C{chunks} and write them at their offset."""
        for hasher in self._hashers.values():
            for chunk in chunks:
                hasher.update(chunk)
        try:
            _write_at(self.partial._fd, chunks, self.offset + self._written)
        except OSError as exc:
            raise LocalFailure.from_os_error(f"cannot write {self.partial.temp_path}",
                                             exc) from None
        self._written += sum(map(len, chunks))

    def _wake(self, failure=None):
        """Fire L{drained}'s Deferreds once the source may go on: the lane took its bytes, or
        failed (C{failure}: the next L{write} raises it)."""
        if failure is not None and self._error is None:
            error = failure.value
            self._error = error if isinstance(error, TransferError) else LocalFailure(str(error))
        if self._error is None and self.backlogged:
            return
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            if not d.called:  # not cancelled meanwhile
                d.callback(None)

    async def settle(self):
        """Wait until the bytes received are written (or writing failed)."""
        while (job := self._lane.job) is not None or (self._lane.waiting and self._error is None):
            if job is None:
                self._lane.kick()
                job = self._lane.job
                if job is None:
                    return  # the lane is closed
            await job.observe().addErrback(lambda _: None)

    async def close(self, expected_checksum=None):
        """All bytes written, the block complete (and matching C{expected_checksum},
        C{(method, base64)}), or a L{TransferError}."""
        await self.settle()
        if self._error is not None:
            raise self._error
        if self.received < self.length:
            raise ShortTransfer(
                f"{self.what}: got {self.received} bytes of {self.length}: block cut short"
            )
        if expected_checksum is not None:
            method, value = expected_checksum
            actual = b64digest(self._hashers[method])
            if actual != value:
                raise ChecksumMismatch(
                    f"{self.what}: {method} checksum is {actual}, expected {value}"
                )

    async def abandon(self):
        """The block failed: its bytes no longer count."""
        self._lane.close()
        await self.settle()
        self.partial.size -= self.received


async def fetch_block(reactor, location, partial, index, settings, limiter, url,
                      expected_checksum=None, pacers=()):
    """Fetch block C{index} of C{partial} from C{location} and record it done; its bytes are
    spent from C{pacers} (L{ion.apps.pump.transfer.pacing}), shared with every other transfer
    of their scope."""
    methods = () if expected_checksum is None else (expected_checksum[0],)
    sink = partial.block(index, methods)
    fed = PacedSink(sink, pacers, reactor) if pacers else sink
    async with slot(limiter, url):
        try:
            await RANGE_SCHEMES[location.scheme].fetch_range(
                reactor, location, fed, settings, sink.offset, sink.length
            )
            await sink.close(expected_checksum)
        except BaseException:
            await sink.abandon()
            raise
    await partial.mark(index)


async def fetch_blocks(reactor, location, partial, blocks, settings, limiter, url, pacers=()):
    """
    Fetch the blocks C{partial} lacks, C{blocks.parallel} at a time, in order of offset. The
    first failure cancels the others and is raised once they have stopped.
    """
    missing = [i for i in range(len(partial.blocks)) if i not in partial.done]

    async def fetch(index):
        await fetch_block(
            reactor, location, partial, index, settings, limiter, url, pacers=pacers
        )

    await run_blocks(missing, blocks.parallel, fetch)


async def run_blocks(indexes, parallel, work):
    """
    Run C{work(index)} for each of C{indexes}, in order, C{parallel} at a time. The first
    failure cancels the others and is raised once they have stopped; cancelling this
    cancels them all.
    """
    queue = iter(indexes)
    failures = []

    async def worker():
        for index in queue:
            if failures:
                return
            await work(index)

    workers = [
        Deferred.fromCoroutine(worker()) for _ in range(min(parallel, len(indexes)))
    ]

    def failed(failure):
        if not failures:
            failures.append(failure)
            for d in workers:
                if not d.called:
                    d.cancel()
        return None

    for d in workers:
        d.addErrback(failed)
    try:
        await DeferredList(workers)
    except CancelledError:
        for d in workers:
            d.cancel()
        await DeferredList(workers)
        raise
    if failures:
        first = [f for f in failures if not f.check(CancelledError)] or failures
        first[0].raiseException()


def note_no_range(blocks, location):
    """Remember (and log, once) a server that ignores range requests."""
    host = _host(location)
    if host not in blocks.no_range:
        blocks.no_range.add(host)
        log.warn(
            "{host} ignores range requests: files from it are fetched in one stream",
            host=host,
        )


def note_no_store_range(blocks, location):
    """Remember (and log, once) a server that refuses writes at an offset."""
    host = _host(location)
    if host not in blocks.no_store_range:
        blocks.no_store_range.add(host)
        log.warn(
            "{host} refuses writes at an offset (REST before STOR): files to it are sent "
            "in one stream",
            host=host,
        )


def sr3_block(notice_blocks, size):
    """
    The block one sr3 notice carries: C{(file size, block size, number, block length)}.

    sr3 3.x (C{sarracenia/flowcb/gather/file.py}) writes C{blocks: {method: 'inplace', size:
    <block size>, number: <this block>, manifest: {<n>: {size, identity}}}} in the notice of
    each block, whose C{size} and C{identity} are then the block's; older posters wrote
    C{{method, size, count, remainder, number}} (sr3's v03 reader turns v2's C{parts} into
    that). Offsets follow from the block size: every block but the last has that size.

    @raise BadRequest: (417) a field missing or out of bounds (more than L{MAX_BLOCKS}).
    """
    def bad(why):
        return BadRequest(f"blocks: {why}", code=417)

    if not isinstance(notice_blocks, dict):
        raise bad("not an object")
    method = notice_blocks.get("method")
    if method not in ("inplace", "partitioned"):
        raise bad(f"method {method!r} is not inplace or partitioned")
    values = {}
    for key in ("size", "number"):
        value = notice_blocks.get(key)
        if type(value) is not int or value < 0:
            raise bad(f"{key} must be an int >= 0")
        values[key] = value
    step, number = values["size"], values["number"]
    if step == 0:
        raise bad("size must be > 0")
    manifest = notice_blocks.get("manifest")
    if manifest is not None:
        if not isinstance(manifest, dict) or not 0 < len(manifest) <= MAX_BLOCKS:
            raise bad(f"manifest must hold 1 to {MAX_BLOCKS} blocks")
        lengths = {}
        for key, entry in manifest.items():
            n = int(key) if isinstance(key, str) and key.isdigit() else key
            length = entry.get("size") if isinstance(entry, dict) else None
            if type(n) is not int or type(length) is not int or not 0 < length <= step:
                raise bad(f"manifest entry {key!r} is not {{size, identity}}")
            lengths[n] = length
        count = len(lengths)
        if sorted(lengths) != list(range(count)) or any(
            lengths[i] != step for i in range(count - 1)
        ):
            raise bad("manifest blocks must be numbered from 0, all but the last of size")
        total = step * (count - 1) + lengths[count - 1]
    else:
        count, remainder = notice_blocks.get("count"), notice_blocks.get("remainder")
        if type(count) is not int or type(remainder) is not int or not 0 < count <= MAX_BLOCKS \
                or not 0 <= remainder < step:
            raise bad("count and remainder (or a manifest) are required")
        total = step * count if remainder == 0 else step * (count - 1) + remainder
    if number >= count:
        raise bad(f"number {number} is not below the count {count}")
    length = min(step, total - number * step)
    if size is not None and size != length:
        raise bad(f"the notice's size {size} is not block {number}'s length {length}")
    return total, step, number, length

