"""The transfer operations -- get, put, list, and operate (file operations on a server) --
dispatched to the scheme modules."""

import attrs
from twisted.internet.defer import Deferred

from ion.apps.pump.transfer.blocks import (
    PartialFile,
    block_size,
    fetch_block,
    fetch_blocks,
    note_no_range,
    version_key,
)
from ion.apps.pump.transfer.errors import BadRequest, RangeIgnored, TooLarge, TransferTimeout
from ion.apps.pump.transfer.inflight import InflightFile, check_method
from ion.apps.pump.transfer.limits import RateWatch, Timeouts, host_key, slot
from ion.apps.pump.transfer.pacing import PacedSink
from ion.apps.pump.transfer.location import Settings, locate
from ion.apps.pump.transfer.outgoing import open_outgoing
from ion.apps.pump.transfer.results import Listing, TransferResult
from ion.apps.pump.transfer.schemes import Schemes
from ion.apps.pump.transfer.sendblocks import forget_blocks, put_blocks

_SCHEMES = Schemes(file="file", http="http", https="http", sftp="sftp", ftp="ftp")

# Only permission bits travel; set-id bits from a remote server are never applied.
MODE_MASK = 0o777


async def get(
    reactor,
    url,
    dest_path,
    *,
    expected_size=None,
    expected_checksum=None,
    cod=None,
    mtime=None,
    mode=None,
    timeouts=Timeouts(),
    credentials=None,
    limiter=None,
    ca_file=None,
    known_hosts=None,
    pool=None,
    http_connections=None,
    active=None,
    max_size=None,
    min_rate=None,
    dest_root=None,
    access=None,
    blocks=None,
    block=None,
    pacers=None,
    sessions=None,
):
    """
    Fetch C{url} into the local file C{dest_path}.

    The bytes go to C{.<name>.<random>.inflight} beside C{dest_path} while being hashed; once
    complete the size and checksum are verified, mtime and mode applied, the file fsynced and
    renamed onto C{dest_path}. On any failure or cancellation the temporary file is removed and
    C{dest_path} is left as it was.

    @param expected_size: bytes announced by the caller, verified.
    @param expected_checksum: C{(method, base64 value)} with method C{sha512} or C{md5}, verified.
    @param cod: C{sha512} or C{md5}: compute this checksum too (checksum on download).
    @param mtime: modification time to apply (default: the server's, when it tells it).
    @param mode: permission bits to apply (default: the server's, when it tells them).
    @param timeouts: a L{Timeouts}.
    @param credentials: L{Credentials} consulted when C{url} holds no password.
    @param limiter: a L{HostLimiter} shared by the caller's transfers.
    @param ca_file: https: PEM file of trusted certificate authorities.
    @param known_hosts: sftp: known_hosts file (default C{~/.ssh/known_hosts}).
    @param pool: a started C{ThreadPool} for the local disk work (create, write, fsync,
        rename), shared by the caller's transfers; without one that work blocks the reactor.
    @param http_connections: L{HTTPConnections} kept open between the caller's http(s)
        transfers; without them each request opens and closes its own connection.
    @param active: told C{add(sink)} when the transfer's L{InflightFile} is made and
        C{discard(sink)} when the transfer ends, however it ends (C{sink.size} is the bytes
        received so far), for the caller's progress figures; a set will do.
    @param max_size: the most bytes to take: a larger C{expected_size} is refused before
        connecting, a larger size announced by the server as soon as it says so, and the
        transfer is cut as soon as more arrive (L{TooLarge}, 413, permanent).
    @param min_rate: a L{MinRate}: a transfer that received fewer bytes than it asks over its
        window fails as too slow (L{TransferTimeout}, 504, transient).
    @param dest_root: the L{DestinationRoot} (or directory path) that C{dest_path} is under:
        the directories in between are made when missing and never reached through a
        symbolic link (a link there fails the transfer with 422). Default: the directory of
        C{dest_path}, which must exist.
    @param blocks: L{BlockSettings}: a file of C{expected_size} at least their C{threshold}
        is fetched in blocks (see L{ion.apps.pump.transfer.blocks}); C{None}: never.
    @param block: C{(file size, block size, number, length)} of the one block an sr3 notice
        names (L{ion.apps.pump.transfer.blocks.sr3_block}): only that block is fetched, its
        C{expected_checksum} checked, and the file is put in place once its last block is
        in; until then the result has C{complete} false.
    @param access: the L{Access} the URL policy gave the notice naming C{url}
        (L{ion.apps.pump.transfer.policy}): its normalized URL is fetched, the credentials
        file serves it only when the access allows, and connections (redirects included) go
        only to addresses it accepts. C{None}: a URL the caller trusts, fetched as it is.
    @param pacers: the caller's L{ion.apps.pump.transfer.pacing.Pacers}: the bytes are read
        no faster than their limits allow.
    @param sessions: the caller's L{ion.apps.pump.transfer.sessions.Sessions}: sftp and ftp
        sessions kept open between transfers to trusted URLs (no C{access}).
    @return: a L{TransferResult}; its checksum holds every method computed (C{sha512} when
        none was asked for).
    @raise TransferError: see L{ion.apps.pump.transfer.errors}.
    """
    if access is not None:
        url = access.url
        if not access.credentials:
            credentials = None
    location = locate(url, credentials)
    if max_size is not None and expected_size is not None and expected_size > max_size:
        raise TooLarge(
            f"{location.shown}: announced size {expected_size} bytes is over max_size {max_size}"
        )
    wanted = (expected_checksum[0] if expected_checksum else None, cod)
    methods = [check_method(method) for method in dict.fromkeys(wanted) if method is not None]
    settings = Settings(
        timeouts, ca_file, known_hosts, http_connections, pool, access, sessions=sessions
    )
    chosen = () if pacers is None else pacers.for_host(host_key(url))
    checksum = tuple(expected_checksum) if expected_checksum else None
    mode = None if mode is None else mode & MODE_MASK
    if block is not None:
        if max_size is not None and block[0] > max_size:
            raise TooLarge(
                f"{location.shown}: announced file size {block[0]} bytes is over max_size "
                f"{max_size}"
            )
        return await _get_block(
            reactor, location, url, dest_path, block, checksum, mtime, mode, settings,
            limiter, active, dest_root, chosen,
        )
    if blocks is not None and blocks.applies(location, expected_size):
        result = await _get_blocks(
            reactor, location, url, dest_path, expected_size, methods or ["sha512"],
            checksum, mtime, mode, settings, limiter, active, dest_root, blocks, min_rate,
            chosen,
        )
        if result is not None:
            return result
    async with slot(limiter, url) as taken:
        sink = InflightFile(
            dest_path,
            methods or ["sha512"],
            expected_size,
            location.shown,
            reactor,
            pool,
            max_size=max_size,
            root=dest_root,
        )
        if active is not None:
            active.add(sink)
        try:
            try:
                fed = sink if not chosen else PacedSink(sink, chosen, reactor)
                source_mtime, source_mode = await _fetch(
                    reactor, location, fed, settings, min_rate
                )
            except BaseException:
                await sink.discard()
                raise
            if mtime is None:
                # A scheme may give the source's mtime as a function: parsed only when needed.
                mtime = source_mtime() if callable(source_mtime) else source_mtime
            mode = source_mode & MODE_MASK if mode is None and source_mode is not None else mode
            if sink.commit_waits_apart():
                # Received whole, the file waits for the disk without the server: the next
                # transfer takes its slot meanwhile.
                taken.leave()
            return await sink.finish(checksum, mtime, mode)
        finally:
            if active is not None:
                active.discard(sink)


async def _get_blocks(
    reactor, location, url, dest_path, size, methods, checksum, mtime, mode, settings,
    limiter, active, dest_root, blocks, min_rate, pacers,
):
    """A partitioned get; None when the server ignores ranges (fetch the file whole)."""
    step = block_size(size, blocks.size)
    version = checksum[1] if checksum else mtime
    key = version_key(location.shown, size, step, version)
    partial = PartialFile(
        dest_path, size, step, key, methods, location.shown, reactor, settings.pool, dest_root
    )
    if active is not None:
        active.add(partial)
    try:
        try:
            await partial.open()
            partial.hash_early()
            fetching = Deferred.fromCoroutine(
                fetch_blocks(
                    reactor, location, partial, blocks, settings, limiter, url, pacers
                )
            )
            await _watched(reactor, location, fetching, min_rate, lambda: partial.size)
        except RangeIgnored:
            partial.keep = False
            await partial.discard()
            note_no_range(blocks, location)
            return None
        except BaseException as exc:
            # Kept for the next attempt, unless there will be none (a permanent failure).
            partial.keep = getattr(exc, "transient", True)
            await partial.discard()
            raise
        result = await partial.finish(checksum, mtime, mode)
        return attrs.evolve(result, blocks=len(partial.blocks))
    finally:
        if active is not None:
            active.discard(partial)


async def _get_block(
    reactor, location, url, dest_path, block, checksum, mtime, mode, settings, limiter,
    active, dest_root, pacers,
):
    """The one block of an sr3 block notice; the file is put in place with its last block."""
    total, step, number, _ = block
    key = version_key(location.shown, total, step, mtime)
    partial = PartialFile(
        dest_path, total, step, key, ["sha512"], location.shown, reactor, settings.pool,
        dest_root,
    )
    if active is not None:
        active.add(partial)
    try:
        try:
            await partial.open()
            if number not in partial.done:
                await fetch_block(
                    reactor, location, partial, number, settings, limiter, url, checksum,
                    pacers,
                )
            if not partial.complete:
                await partial.discard()
                return TransferResult(
                    partial.blocks[number][1], {}, mtime, mode, dest_path,
                    blocks=len(partial.blocks), complete=False,
                )
        except BaseException as exc:
            partial.keep = getattr(exc, "transient", True)
            await partial.discard()
            raise
        # Each block was verified against its own checksum as it came.
        result = await partial.finish(None, mtime, mode)
        return attrs.evolve(result, blocks=len(partial.blocks))
    finally:
        if active is not None:
            active.discard(partial)


async def _fetch(reactor, location, sink, settings, min_rate):
    """The scheme's fetch into C{sink}, cancelled as too slow when it falls below C{min_rate}."""
    fetching = Deferred.fromCoroutine(
        _SCHEMES[location.scheme].fetch(reactor, location, sink, settings)
    )
    return await _watched(reactor, location, fetching, min_rate, lambda: sink.size)


async def _watched(reactor, location, fetching, min_rate, count):
    """The result of C{fetching}, cancelled as too slow when C{count()} grows slower than
    C{min_rate}."""
    if min_rate is None:
        return await fetching
    watch = RateWatch(reactor, min_rate, count, fetching.cancel)
    try:
        return await fetching
    except BaseException:
        if watch.slow is None:
            raise
        # Whatever the cancelled scheme ended with, the reason is the rate.
        raise TransferTimeout(
            f"{location.shown}: too slow: {watch.slow} bytes in {min_rate.window:g} s "
            f"(min_rate {min_rate.bytes_per_s:g} bytes/s)"
        ) from None
    finally:
        watch.stop()


async def put(reactor, src_path, url, *, credentials=None, limiter=None, pacers=None,
              blocks=None, record_dir=None, version=None, active=None, **settings):
    """
    Send the local file C{src_path} to C{url}.

    The remote file is written under a temporary name and renamed into place where the scheme
    allows it (file, sftp, ftp); mtime and mode follow where the scheme can set them (file, sftp).
    C{pool} is used as in L{get} by the file scheme; an http PUT always opens a connection of
    its own (a request with a body is not retried on a kept connection the server closed).

    @param settings: C{timeouts}, C{ca_file}, C{known_hosts}, C{pool} and C{http_connections},
        as in L{get} (the fields of L{Settings}).
    @param pacers: as in L{get}; every scheme's puts keep to them.
    @param blocks: L{BlockSettings}: with C{record_dir}, a file of at least their
        C{threshold} bytes sent to sftp or ftp goes in blocks, resumed from a record in
        C{record_dir} (see L{ion.apps.pump.transfer.sendblocks}); C{None}: one stream.
    @param version: what names the file's version in that record (the notice's identity);
        C{None}: the local mtime.
    @param active: told C{add(state)} and C{discard(state)} of a put in blocks
        (L{ion.apps.pump.transfer.sendblocks.OutgoingBlocks}), for progress figures.
    @return: a L{TransferResult} for the bytes sent (C{path} is the redacted URL).
    @raise TransferError: see L{ion.apps.pump.transfer.errors}.
    """
    location = locate(url, credentials)
    chosen = () if pacers is None else pacers.for_host(host_key(url))
    settings = Settings(**settings, pacers=chosen)
    outgoing = await open_outgoing(reactor, settings.pool, src_path)
    try:
        if (
            blocks is not None
            and record_dir is not None
            and blocks.sends(location, outgoing.size)
        ):
            result = await put_blocks(
                reactor, location, url, outgoing, settings, blocks, record_dir, version,
                limiter, active,
            )
            if result is not None:
                return result
            await outgoing.settled()
            outgoing.close()
            outgoing = await open_outgoing(reactor, settings.pool, src_path)
        async with slot(limiter, url):
            await _SCHEMES[location.scheme].store(reactor, outgoing, location, settings)
        return TransferResult(
            outgoing.sent,
            outgoing.checksum(),
            outgoing.mtime,
            outgoing.mode & MODE_MASK,
            location.shown,
        )
    finally:
        # A read the pool is doing when the put fails or is cancelled ends first.
        await outgoing.settled()
        outgoing.close()


async def forget_put(reactor, url, size, *, blocks, record_dir, version, credentials=None,
                     limiter=None, pacers=None, **settings):
    """
    The put of a file of C{size} bytes to C{url} is given up for good (no attempt follows):
    what a put of it in blocks left -- its temporary file at the server, its record in
    C{record_dir} -- is removed (see L{ion.apps.pump.transfer.sendblocks.forget_blocks};
    C{blocks}, C{record_dir} and C{version} as given to L{put}). C{settings} as in L{put}.

    @return: whether a put in blocks was forgotten.
    """
    location = locate(url, credentials)
    settings = Settings(**settings)  # no data moves: pacers do not apply
    return await forget_blocks(
        reactor, location, url, size, settings, blocks, record_dir, version, limiter
    )


async def list(reactor, url, *, unless=None, credentials=None, limiter=None, pacers=None,
               **settings):
    """
    The entries of the remote directory C{url}, sorted by name (C{.} and C{..} left out).
    C{settings} as in L{put}; C{pool} reads local (file) directories. C{unless}: a digest an
    index page (http) had before (the listing's C{digest}): a page that still has it is not
    parsed, and the listing says C{unchanged} (other schemes give no digest: always listed).

    @rtype: a L{Listing} (a list of L{Entry}, and the bytes read)
    @raise TransferError: see L{ion.apps.pump.transfer.errors}.
    """
    location = locate(url, credentials)
    settings = Settings(**settings)
    async with slot(limiter, url):
        entries = await _SCHEMES[location.scheme].listdir(reactor, location, settings, unless)
    return Listing(
        sorted((entry for entry in entries if entry.name not in (".", "..")), key=lambda e: e.name),
        getattr(entries, "bytes", 0),
        getattr(entries, "digest", None),
        getattr(entries, "unchanged", False),
    )


async def operate(
    reactor, url, op, *, old=None, target=None, credentials=None, limiter=None, pacers=None,
    **settings
):
    """
    A file operation at C{url} on an sftp or ftp server: C{delete}, C{rmdir}, C{mkdir},
    C{rename} (from C{old}, a path on the same server) or C{link} (to C{target}; sftp only).
    C{settings} as in L{put}.

    @return: a phrase saying what was done, or None for a rename whose old file is missing.
    @raise TransferError: see L{ion.apps.pump.transfer.errors}; BadRequest for an operation
        the scheme has no request for.
    """
    location = locate(url, credentials)
    if location.scheme not in ("sftp", "ftp"):
        raise BadRequest(f"{location.shown}: no file operations over {location.scheme}")
    scheme = _SCHEMES[location.scheme]
    settings = Settings(**settings)  # no data moves: pacers do not apply
    async with slot(limiter, url):
        return await scheme.operate(reactor, location, settings, op, old, target)
