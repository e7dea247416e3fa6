"""An append-only file of JSON lines: the on-disk half of the pump's small stores (the duplicate
cache, the retry queue); and L{DiskQueue}, which keeps their blocking disk calls off the reactor.

A store keeps its state in memory and appends one line per change here; opening it replays the
lines in order (a line that does not parse or apply, such as a torn last line after a crash, is
counted in C{skipped_lines} and passed over); C{rewrite} replaces the whole file with the lines of
the current state (temporary file, fsync, rename, fsync of the directory) so that the file stays
proportional to what is kept. C{lines} counts the lines in the file, for the store to decide
when to rewrite.

C{append} hands its line to the operating system at once (a write to the page cache, on the
calling thread: the line survives a crash of the process). What waits on the disk runs in a
pool thread, one call at a time and in the order asked for: C{sync} (fsync) and C{rewrite}
return Deferreds. C{sync} is a group commit: the callers that ask while an earlier call is under
way share one fsync, which covers every line appended before it started. Lines appended while a
rewrite runs go to the old file and, once it is replaced, to the new one, so none is lost
whichever way the rewrite ends.
"""

import json
import os

from twisted.internet import defer, threads
from twisted.logger import Logger

log = Logger()


class DiskQueue:
    """Runs blocking calls one at a time, in the order they were asked for, in threads of the
    reactor's pool (on the calling thread when there is no reactor: unit tests, tools)."""

    def __init__(self, reactor=None):
        self._reactor = reactor
        self._lock = defer.DeferredLock()

    def run(self, function, *args):
        """A Deferred firing with C{function(*args)}, called in a pool thread once the calls
        asked for before have returned."""
        return self.turn(self.in_thread, function, *args)

    def turn(self, start, *args):
        """Call C{start(*args)} on the reactor thread once the calls asked for before have
        returned; the next call waits for the Deferred it returns (it may use L{in_thread}).
        Cancelling what this returns does not end the call early: a thread cannot be stopped,
        and the next call must not start beside it."""
        done = self._lock.run(start, *args)
        shield = defer.Deferred()
        done.addBoth(shield.callback)
        return shield

    def in_thread(self, function, *args):
        if self._reactor is None:
            return defer.execute(function, *args)
        return threads.deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), function, *args
        )


class Journal:
    """The JSON-lines file at C{path} (see the module docstring); its directory is created.
    Disk waits run through C{disk} (a L{DiskQueue}; by default one on the calling thread)."""

    def __init__(self, path, disk=None):
        self.path = path
        self.lines = 0
        self.skipped_lines = 0
        self._disk = disk or DiskQueue()
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        self._file = None
        self._sync_waiters = []
        self._rewrites = []  # per rewrite asked for, the lines appended since

    def replay(self, apply):
        """Call C{apply(record)} for each line's JSON value, in order; then open the file for
        appending. A line for which parsing or C{apply} raises ValueError, KeyError or
        TypeError is skipped."""
        try:
            f = open(self.path, encoding="utf-8", errors="replace")
        except FileNotFoundError:
            pass
        else:
            with f:
                for line in f:
                    self.lines += 1
                    try:
                        apply(json.loads(line))
                    except (ValueError, KeyError, TypeError):
                        self.skipped_lines += 1
        self.open_for_append()

    def open_for_append(self):
        """Open the file for appending without reading it (a log nobody replays)."""
        self._file = open(self.path, "a", encoding="utf-8")

    def append(self, line, flush=True):
        """Append C{line} (text ending in a newline). Handed to the operating system unless
        L{flush} is False (then at the next flush or sync)."""
        self._file.write(line)
        if flush:
            self._file.flush()
        for after in self._rewrites:
            after.append(line)
        self.lines += 1

    def flush(self):
        self._file.flush()

    def sync(self):
        """A Deferred firing once every line appended so far is on the disk (fsync)."""
        waiter = defer.Deferred()
        self._sync_waiters.append(waiter)
        if len(self._sync_waiters) == 1:
            self._disk.turn(self._start_sync)
        return waiter

    def _start_sync(self):
        waiters, self._sync_waiters = self._sync_waiters, []
        try:
            self._file.flush()
            fd = self._file.fileno()
        except ValueError as e:  # closed: the lines may not be on disk, say so
            syncing = defer.fail(e)
        else:
            syncing = self._disk.in_thread(os.fsync, fd)

        def synced(_):
            for waiter in waiters:
                waiter.callback(None)

        def failed(failure):
            for waiter in waiters:
                waiter.errback(failure)

        return syncing.addCallbacks(synced, failed)

    def rewrite(self, lines, count=None):
        """Replace the file's content with C{lines} (an iterable of text lines, taken now),
        atomically; returns a Deferred firing once the new file is in place (or, when that
        failed, logged, with the old file kept and appended to). Given their C{count}, the
        lines are taken later, in the disk's thread, off the reactor thread: C{lines} must
        then read only what nothing changes (a snapshot)."""
        snapshot = list(lines) if count is None else lines
        self.lines = len(snapshot) if count is None else count
        after = []  # lines appended from now on: the new file gets them too
        self._rewrites.append(after)

        def start():
            rewriting = self._disk.in_thread(_replace_file, self.path, snapshot)
            rewriting.addBoth(ended)
            return rewriting.addCallbacks(replaced, kept)

        def ended(result):
            self._rewrites.remove(after)
            return result

        def replaced(new_file):
            old, self._file = self._file, new_file
            old.close()
            new_file.writelines(after)
            new_file.flush()

        def kept(failure):
            log.failure("could not rewrite {path}; it is kept as it is", failure, path=self.path)

        return self._disk.turn(start)

    def close(self):
        """Close the file once the disk calls asked for so far are done; returns a Deferred."""
        return self._disk.turn(self._close)

    def _close(self):
        if self._file is not None and not self._file.closed:
            self._file.close()


def _replace_file(path, lines):
    """Write C{lines} to a temporary file, fsync it, rename it over C{path}, fsync the
    directory; the new file, opened for appending. Once the rename is done the new file is
    returned whatever happens next: the old one is gone from the directory."""
    temp = f"{path}.compact"
    with open(temp, "w", encoding="utf-8") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    new_file = open(temp, "a", encoding="utf-8")
    try:
        os.replace(temp, path)
    except BaseException:
        new_file.close()
        raise
    try:
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        log.warn("could not fsync the directory of {path}: {error}", path=path, error=e)
    return new_file


def json_line(record):
    """C{record} as one compact JSON line."""
    return json.dumps(record, separators=(",", ":")) + "\n"
