"""C{ion post}: announce files once, as sr3's C{post} does, from a shell or a script.

L{files_to_post} turns the paths given (a directory: every regular file below it, symbolic
links not followed) into (path, relPath) pairs, relPath relative to the current directory;
L{post_files} publishes one v03 notice per file through a process, with sha512 identity, size,
mtime and mode, persistent and confirmed by the broker; with C{--block-size}, a bigger file is
announced as one notice per block, as sr3 does (L{ion.apps.pump.notice.block_notices}). The
command line (L{ion.core.cc.cli}) calls L{prepare} before it connects and L{run} once
connected, and prints what run returns.
"""

import os
from urllib.parse import quote

from twisted.internet import defer, threads

from ion.apps.pump.notice import Notice, block_notices, format_time
from ion.apps.pump.transfer.blocks import MIN_BLOCK_SIZE
from ion.apps.pump.watch import describe
from ion.core.process import TransportError

# Notices in flight (published, not yet confirmed) at a time.
WINDOW = 100


class Unpostable(ValueError):
    """A path that cannot be announced (missing, unreadable, outside the current directory)."""


def files_to_post(paths, base_dir=None):
    """[(path, relPath)] of the files named by C{paths}, relative to C{base_dir} (default the
    current directory); Unpostable naming the first path that cannot be announced."""
    base = os.path.abspath(base_dir or os.curdir)
    found = []
    for given in paths:
        path = os.path.abspath(given)
        if os.path.relpath(path, base).split(os.sep)[0] == os.pardir:
            raise Unpostable(f"{given}: not below the current directory {base}")
        if os.path.isdir(path) and not os.path.islink(path):
            for top, dirs, names in os.walk(path):
                dirs.sort()
                below = (os.path.join(top, name) for name in sorted(names))
                found += [p for p in below if os.path.isfile(p) and not os.path.islink(p)]
        elif os.path.isfile(path):
            found.append(path)
        else:
            raise Unpostable(f"{given}: not a file or directory")
    for path in found:
        if not os.access(path, os.R_OK):
            raise Unpostable(f"{path}: not readable")
    return [(path, os.path.relpath(path, base).replace(os.sep, "/")) for path in found]


async def post_files(process, files, exchange, base_url, prefix="v03", transport=None,
                     block_size=None):
    """Announce C{files} [(path, relPath)] to C{exchange} through C{process} (on C{transport},
    a connection of its own, when given); returns how many were confirmed. A file gone or unreadable
    by the time it is read is skipped (not counted). Raises what the first publish that failed
    raised, after the others in flight ended. With C{block_size}, a file bigger than that is
    announced as one notice per block (L{ion.apps.pump.notice.block_notices}), as sr3's
    C{post} does with C{blocksize}: it counts once every one of them was confirmed."""
    reactor = process.container.reactor
    now = process.container.clock.seconds
    confirmed = 0

    async def one(path, rel):
        found = await threads.deferToThreadPool(
            reactor, reactor.getThreadPool(), describe, path, block_size
        )
        if found is None:
            return 0
        size, mtime, mode, digest, blocks = found
        fields = {"pubTime": format_time(now()), "baseUrl": base_url, "relPath": rel,
                  "identity": {"method": "sha512", "value": digest}, "size": size,
                  "mtime": format_time(mtime), "mode": f"{mode & 0o7777:o}"}
        notices = [Notice(fields)] if blocks is None else [
            Notice(one) for one in block_notices(fields, *blocks)
        ]
        topic = notices[0].topic(prefix)
        for notice in notices:  # in order, each confirmed before the next
            await process.publish(
                exchange, topic, notice.to_json(), persistent=True,
                declare=None if transport is not None else "topic", transport=transport,
            )
        return 1

    for start in range(0, len(files), WINDOW):
        results = await defer.DeferredList(
            [defer.ensureDeferred(one(*f)) for f in files[start : start + WINDOW]],
            consumeErrors=True,
        )
        confirmed += sum(value for ok, value in results if ok)
        for ok, failure in results:
            if not ok:
                failure.raiseException()
    return confirmed


def prepare(args):
    """C{ion post}: the files of C{args.paths} into C{args.files}; Unpostable (exit 2), also
    for a C{--block-size} below L{MIN_BLOCK_SIZE}."""
    block_size = getattr(args, "block_size", None)
    if block_size is not None and block_size < MIN_BLOCK_SIZE:
        raise Unpostable(f"--block-size must be at least {MIN_BLOCK_SIZE} bytes, got {block_size}")
    args.files = files_to_post(args.paths)


async def run(client, args):
    """C{ion post}: announce C{args.files} through the CLI's process C{client}; to an MQTT
    broker (C{args.post_broker}, set by the CLI) through a connection of the process's own,
    declaring nothing there."""
    transport = None
    if getattr(args, "post_broker", None):
        transport = client.open_broker(args.post_broker)
        connecting = transport.connect()
        connecting.addTimeout(args.timeout, client.container.reactor)
        try:
            await connecting
        except defer.TimeoutError:
            raise TransportError(f"cannot reach broker {transport.address}: timed out") from None
    login = (transport or client.container.transport).user
    exchange = args.exchange or f"xs_{args.user or login}"
    base_url = args.base_url or "file://" + quote(os.path.abspath(os.curdir), safe="/") + "/"
    count = await post_files(client, args.files, exchange, base_url, args.topic_prefix, transport,
                             getattr(args, "block_size", None))
    return f"announced {count} files to {exchange}"
