"""Retention: delivered files older than a number of days are archived or removed.

A subscription with C{retention: {'after_days': N, 'archive': 'dir'}} moves each regular file
below its C{directory} whose mtime is more than N days before now into
C{dir/YYYYMM/DD/<its path below directory>} (the UTC day of its mtime); with C{'archive':
None} it removes it instead. A relative archive directory is taken from the working directory.

  - Nothing is overwritten: a name already taken in the archive gets a numbered suffix
    (C{a.txt.1}, C{a.txt.2}...). The move is a hard link then an unlink, so a name another
    writer takes meanwhile is never replaced; the archive must be on the file system of the
    destination (another one fails the pass with one warning: nothing is copied).
  - No link is followed: the tree is walked with C{os.fwalk} (links to directories are not
    entered, links to files are left alone), every file is reached from its directory's
    descriptor, and the archive's directories are opened one by one with C{O_NOFOLLOW}
    (L{ion.apps.pump.transfer.inflight.open_below}). An archive inside the tree is skipped.
  - Temporary files of transfers (C{.<name>.<random>.inflight}) are never touched.
  - The work is blocking and runs in a thread of the consumer's pool, in batches of at most
    C{batch} files; a pass that found more starts the next batch on a later reactor turn, so
    a tree of millions of old files never holds a thread (or the disk) for long.

L{Retention} runs a pass every C{interval} seconds (an hour by default) on the container's
clock; L{expire} is one batch, callable on its own.
"""

import errno
import os
import stat
import time

import attrs
from twisted.internet import threads

from ion.apps.pump.transfer.inflight import is_inflight_name, open_below

DAY = 86400
INTERVAL = 3600
BATCH = 500
_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@attrs.define
class Expired:
    """What one batch did: files C{moved} and C{removed} (paths below the tree), C{more}
    (the batch was full: call again), C{errors} (one line each)."""

    moved: list = attrs.Factory(list)
    removed: list = attrs.Factory(list)
    errors: list = attrs.Factory(list)
    more: bool = False


def day_directory(mtime):
    """C{('YYYYMM', 'DD')} of the UTC day of C{mtime}."""
    day = time.gmtime(mtime)
    return f"{day.tm_year:04d}{day.tm_mon:02d}", f"{day.tm_mday:02d}"


def expire(tree, archive, cutoff, batch=BATCH):
    """
    Archive (or, with C{archive} None, remove) the regular files below C{tree} last modified
    before C{cutoff} (seconds since the epoch), at most C{batch} of them. Runs blocking.

    @return: an L{Expired}.
    """
    done = Expired()
    archive_fd = None
    skip = None
    try:
        if archive is not None:
            os.makedirs(archive, exist_ok=True)
            archive_fd = os.open(archive, _DIRECTORY_FLAGS)
            info = os.fstat(archive_fd)
            skip = (info.st_dev, info.st_ino)
        for directory, subdirs, files, dir_fd in os.fwalk(tree, follow_symlinks=False):
            if skip is not None:
                # Never walk into the archive (it may be inside the tree).
                kept = []
                for name in subdirs:
                    try:
                        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                    except OSError:
                        continue
                    if (info.st_dev, info.st_ino) != skip:
                        kept.append(name)
                subdirs[:] = kept
            below = os.path.relpath(directory, tree)
            parts = () if below == os.curdir else tuple(below.split(os.sep))
            for name in sorted(files):
                if is_inflight_name(name):
                    continue
                try:
                    info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(info.st_mode) or info.st_mtime >= cutoff:
                    continue
                if len(done.moved) + len(done.removed) >= batch:
                    done.more = True
                    return done
                rel = "/".join(parts + (name,))
                try:
                    if archive_fd is None:
                        os.unlink(name, dir_fd=dir_fd)
                        done.removed.append(rel)
                    else:
                        target = _archive_one(archive_fd, dir_fd, name, parts, info.st_mtime)
                        done.moved.append((rel, target))
                except OSError as exc:
                    if exc.errno == errno.EXDEV:
                        done.errors.append(
                            f"cannot archive into {archive}: not on the file system of {tree}"
                        )
                        return done
                    done.errors.append(f"{rel}: {exc.strerror or exc}")
    except OSError as exc:
        done.errors.append(f"{tree}: {exc.strerror or exc}")
    finally:
        if archive_fd is not None:
            os.close(archive_fd)
    return done


def _archive_one(archive_fd, dir_fd, name, parts, mtime):
    """Link C{name} (in C{dir_fd}) into the archive under a free name, then unlink it; the
    path it got below the archive."""
    month, day = day_directory(mtime)
    place = (month, day) + parts
    target_fd = open_below(archive_fd, place, make=True)
    try:
        candidate, n = name, 0
        while True:
            try:
                os.link(name, candidate, src_dir_fd=dir_fd, dst_dir_fd=target_fd,
                        follow_symlinks=False)
                break
            except FileExistsError:
                n += 1
                candidate = f"{name}.{n}"
        os.unlink(name, dir_fd=dir_fd)
    finally:
        os.close(target_fd)
    return "/".join(place + (candidate,))


class Retention:
    """
    Runs L{expire} over C{tree} every C{interval} seconds of C{clock}, in C{pool}'s threads,
    batch after batch until a pass finds no more; C{log} gets one info line per pass that did
    something and one warning per error.
    """

    def __init__(self, clock, reactor, pool, tree, after_days, archive, log, who,
                 interval=INTERVAL, batch=BATCH):
        self.clock = clock
        self.reactor = reactor
        self.pool = pool
        self.tree = tree
        self.after = after_days * DAY
        self.archive = None if archive is None else os.path.abspath(archive)
        self.log = log
        self.who = who
        self.interval = interval
        self.batch = batch
        self.moved = self.removed = 0
        self._call = None
        self._running = None
        self._stopped = False

    def start(self):
        """The first pass now, then one every C{interval} seconds."""
        self._schedule(0)

    def stop(self):
        """No pass starts any more; a Deferred firing when the batch running (if any) ends."""
        self._stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        return self._running

    def _schedule(self, delay):
        if not self._stopped:
            self._call = self.clock.callLater(delay, self._pass)

    def _pass(self):
        self._call = None
        cutoff = self.clock.seconds() - self.after
        running = self._running = threads.deferToThreadPool(
            self.reactor, self.pool, expire, self.tree, self.archive, cutoff, self.batch
        )
        running.addCallbacks(self._done, self._failed)

    def _done(self, result):
        self._running = None
        self.moved += len(result.moved)
        self.removed += len(result.removed)
        if result.moved or result.removed:
            self.log.info(
                "{who}: retention: {moved} files archived, {removed} removed",
                who=self.who, moved=len(result.moved), removed=len(result.removed),
            )
        for error in result.errors:
            self.log.warn("{who}: retention: {error}", who=self.who, error=error)
        # A full batch: the next one on a later reactor turn, else the next pass.
        self._schedule(0 if result.more and not result.errors else self.interval)

    def _failed(self, failure):
        self._running = None
        self.log.failure("{who}: retention pass failed", failure, who=self.who)
        self._schedule(self.interval)
