"""The watch: announce the changes of a local directory tree as they happen, with inotify.

A L{Watch} (one per C{watches} entry of the pump app) watches every directory of C{path} with
Twisted's L{twisted.internet.inotify}, directories made later included, and publishes a v03
notice (persistent, confirmed) to C{exchange} (default C{xs_<user>}, where the ingest takes it)
for each change that C{events} selects. With C{broker}, the notices go to that broker
through the watch's own connection (L{ion.apps.pump.flow}), to C{exchange} or C{xs_<login>}
there, and no exchange is declared:

  - C{create}, C{modify}: a regular file once it is closed after writing, with C{identity}
    sha512, C{size}, C{mtime} and C{mode}. A file is announced C{coalesce} seconds (default 1)
    after its last close: rewrites within that time give one notice, of the last content. One
    still open for writing is not announced; a file whose mtime is less than C{min_age} seconds
    old waits until it is that old;
  - C{delete}: C{fileOp} {remove: ''} for an announced file removed, or moved out of the tree;
  - C{rename}: the new name's notice with C{fileOp} {rename: <old>}, full metadata, where
    <old> is the old file's path in baseUrl's terms as sr3 writes it (baseUrl's path, then
    the old relPath); a directory renamed: {rename: <old>, directory: ''}. A file never
    announced under its old name (written as a temporary name, then renamed) is announced
    as created;
  - C{link}: a symbolic link, C{fileOp} {link: <its target, as readlink gives it>};
  - C{mkdir}, C{rmdir}: C{fileOp} {directory: ''} and {remove: '', directory: ''}.

Filters (C{accept}, C{reject}, C{filters}; see L{ion.apps.pump.filters}) match the relPath.
A name that a consumer would refuse (L{ion.apps.pump.paths}) or a URL cannot carry (C{?},
C{#}, C{%XX}) is skipped with a warning, as the poll does.
C{baseUrl} is C{base_url}, by default the C{file:} URL of the watched directory (written
without a trailing C{/}, as sr3 does).

What was announced is kept in C{<state_dir>/seen.sqlite3} (the poll's store; default state_dir
C{var/pump/watch-<name>}). On start the watch lists the tree and announces what changed while
it was stopped: files new or changed since announced, and files announced then removed since
(as removed). So a stop loses nothing; at worst a file is announced again. A notice the
broker does not take (it is down) is logged once, and the same catch-up pass runs every
L{RETRY} seconds until the broker takes them again.

inotify gives no pairing of the two halves of a rename through Twisted (it drops the cookie):
a C{IN_MOVED_FROM} followed at once by a C{IN_MOVED_TO} is a rename, which is what the kernel
queues. Events beyond the kernel's queue (C{fs.inotify.max_queued_events}) are lost without a
word from Twisted; a restart catches up with them.
"""

import base64
import collections
import hashlib
import heapq
import os
import stat

from twisted.internet import inotify, task, threads
from twisted.python import failure
from twisted.python.filepath import FilePath

from ion.apps.pump.args import WatchArgs, root_url
from ion.apps.pump.fileops import renamed_from
from ion.apps.pump.flow import open_flow_broker
from ion.apps.pump.notice import Notice, block_notices, block_step, format_time
from ion.apps.pump.outcome import RecentFailures
from ion.apps.pump import paths
from ion.apps.pump.poll import COD, SeenFiles, unfetchable
from ion.apps.pump.transfer.inflight import is_inflight_name
from ion.apps.pump.user import pump_user
from ion.core.process import EnvironmentFailure, Lease, ServiceProcess

MASK = (
    inotify.IN_CREATE
    | inotify.IN_CLOSE_WRITE
    | inotify.IN_DELETE
    | inotify.IN_MOVED_FROM
    | inotify.IN_MOVED_TO
    | inotify.IN_DONT_FOLLOW
    | inotify.IN_ONLYDIR
)
# How long an IN_MOVED_FROM waits for its IN_MOVED_TO before it is a move out of the tree.
PAIRING = 0.05
LINK = -1  # the size kept for a symbolic link
UNSENT = -2  # the size kept for a file whose removal is still to be announced
BATCH = 256  # files read and hashed by one thread job
BATCHES = 2  # such jobs at a time
MAX_TOPICS = 10_000  # routing keys of directories kept
RETRY = 5  # seconds from a failed publish to the catch-up pass that announces again
READ_SIZE = 1024 * 1024  # bytes read at a time to hash a file in blocks


class _TreeNotify(inotify.INotify):
    """Twisted's INotify, left open when a watched subdirectory goes: Twisted closes the whole
    descriptor on any watched directory's IN_DELETE_SELF (it expects one watched path), and a
    tree loses subdirectories every day. Only L{close} ends it."""

    closing = False

    def loseConnection(self):
        if self.closing:
            super().loseConnection()

    def close(self):
        self.closing = True
        self.loseConnection()


def _listing(directory):
    """[(name, kind, size, mtime)] of a directory (kind file, dir or link); [] when gone."""
    found = []
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                kind = _kind(st.st_mode)
                if kind is not None:
                    found.append((entry.name, kind, st.st_size, st.st_mtime))
    except (FileNotFoundError, NotADirectoryError):
        pass
    return found


def _kind(mode):
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "link"
    return None


def describe(path, block_size=None):
    """(size, mtime, mode, sha512 base64, blocks) of a regular file, or None when it is not one
    (gone, replaced by a link...). C{blocks} is None, or for a file to be announced in blocks
    (L{block_step} of its size and C{block_size}) C{(step, [(length, sha512 base64)])} of each
    block, the file's own digest then None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        step = block_step(st.st_size, block_size)
        if step is not None:
            blocks = _block_digests(f, step)
            return st.st_size, st.st_mtime, st.st_mode, None, (step, blocks)
        digest = hashlib.file_digest(f, "sha512").digest()
    return st.st_size, st.st_mtime, st.st_mode, base64.b64encode(digest).decode("ascii"), None


def _block_digests(f, step):
    """[(length, sha512 base64)] of each C{step} bytes of the open file C{f}, read once to its
    end (a file growing meanwhile is announced again once closed)."""
    found = []
    buffer = memoryview(bytearray(READ_SIZE))
    hasher, length = hashlib.sha512(), 0
    while True:
        n = f.readinto(buffer[: min(READ_SIZE, step - length)])
        if n:
            hasher.update(buffer[:n])
            length += n
        if length and (length == step or not n):
            found.append((length, base64.b64encode(hasher.digest()).decode("ascii")))
            hasher, length = hashlib.sha512(), 0
        if not n:
            return found


def _describe_all(paths, block_size=None):
    """L{describe} of each path, or the OSError reading it raised: one thread job for the
    files that came due together, rather than a job, a Deferred and a thread hop for each."""
    found = []
    for path in paths:
        try:
            found.append(describe(path, block_size))
        except OSError as e:
            found.append(e)
    return found


def _link(path):
    """(target, mtime) of a symbolic link, or None."""
    try:
        return os.readlink(path), os.lstat(path).st_mtime
    except OSError:
        return None


class Watch(ServiceProcess):
    """Announces the changes of one local tree as they happen (see the module docstring)."""

    service_optional = True  # named by the pump app: its name is a service (ion rpc)

    def on_init(self):
        args = self.settings = WatchArgs.parse(self.args)
        self.root = os.path.abspath(args.path)
        if not os.path.isdir(self.root):
            raise EnvironmentFailure(f"{args.who}: path {args.path} is not a directory")
        # Without a trailing '/', as sr3 writes baseUrls: an sr3 subscriber finds a rename's
        # old file by replacing baseUrl's path in it with its own directory.
        self.base_url = (args.base_url or root_url("file:" + self.root)).rstrip("/")
        self.events = set(args.events)
        self.user = pump_user(self, args.user)
        self.exchange = args.exchange or f"xs_{self.user}"
        state_dir = args.state_dir or os.path.join("var", "pump", f"watch-{args.name}")
        self.claim_directory(state_dir)
        self.broker = None
        if args.broker:
            # Announced there, to xs_<login> (or exchange), which that pump declares.
            self.broker, _ = open_flow_broker(self, args.broker, "watch", args.name, state_dir)
            self.exchange = args.exchange or f"xs_{self.broker.user}"
        # The instances of a watch share what was announced; one of them watches at a time.
        self.store = SeenFiles(
            os.path.join(args.shared_dir or state_dir, "seen.sqlite3"),
            root_url("file:" + self.root), self.container.reactor,
        )
        self.lease = None
        self._standby = None
        if args.single_active or args.instances > 1:
            self.lease = Lease(self, f"watch.{self.user}.{args.name}", on_lost=self._lease_lost)
        self.known = {}  # relPath -> (size or LINK, mtime) as announced
        self.dirs = set()  # relPaths of the watched directories ('' the root)
        self.writing = set()  # files created and not closed yet
        # relPath -> when it is due to be announced. One timer (for the earliest) serves
        # them all: a burst of thousands of files is not thousands of DelayedCalls.
        self.pending = {}
        self._due_heap = []  # (when, relPath), also of some no longer pending (superseded)
        self._timer = None
        self._to_describe = collections.deque()  # relPaths due, waiting for a thread job
        self._describing = 0  # thread jobs running
        self._unstored = {}  # relPath -> (size, mtime) or None, for the next state commit
        self._storing = False
        self.moved_from = None  # (relPath, is_dir, DelayedCall) waiting for its pair
        self.stats = dict.fromkeys(
            ("announced", "removed", "renamed", "links", "dirs", "errors"), 0
        )
        self.last_failures = RecentFailures(self.container.clock)  # ion status, the console
        self.notifier = None
        self._outbox = collections.deque()  # (relPath, Notice, state) to publish, in order
        self._declaring = False  # the first publish, which declares the exchange, is out
        self._topics = {}  # directory relPath -> routing key
        self._retry = None
        self._declare = None if self.broker is not None else "topic"

    async def on_activate(self):
        if self.broker is not None:
            await self.broker.connect()
        if self.lease is not None:
            self._stand_by()
            return
        await self._start_watching()

    async def _start_watching(self):
        self.known = await self.store.everything()
        self.notifier = _TreeNotify(reactor=self.container.reactor)
        self.notifier.startReading()
        await self._catch_up()

    def _stand_by(self):
        """Try for the lease now and every C{standby_interval} seconds until it is held."""
        self._standby = task.LoopingCall(lambda: self.track(self._try_lease()))
        self._standby.clock = self.container.clock
        self._standby.start(self.settings.standby_interval, now=True).addErrback(
            lambda f: self.log.failure("watch {name}: standby failed", f, name=self.settings.name)
        )

    async def _try_lease(self):
        if not await self.lease.try_acquire() or self._standby is None:
            return
        standby, self._standby = self._standby, None
        if standby.running:
            standby.stop()
        self.log.info("watch {name}: now the active watch", name=self.settings.name)
        await self._start_watching()

    def _lease_lost(self):
        self.log.warn("watch {name}: no longer the active watch", name=self.settings.name)
        self._stop_watching()
        self.notifier = None
        if not self.lifecycle.final and self._standby is None:
            self._stand_by()

    async def _catch_up(self):
        """Announce what differs between the tree and what was announced (at start, and
        after a publish failed)."""
        self._retry = None
        seen = set()
        await self._watch_tree("", seen)
        for rel in sorted(set(self.known) - seen, reverse=True):
            self._removed(rel)

    def _unsent(self, rel, state, error):
        """A notice the broker did not take: C{rel} is no longer taken as announced (a removal
        as still to announce), and a catch-up pass runs in L{RETRY} seconds."""
        self.stats["errors"] += 1
        self.last_failures.add(503, f"cannot publish to {self.exchange}: {error}")
        if state is None:
            self.known[rel] = (UNSENT, 0)
        elif state is not False:
            self.known.pop(rel, None)
        if self._retry is None:
            self.log.warn(
                "watch {name}: cannot publish to {exchange} ({error}); trying again in {s} s",
                name=self.settings.name, exchange=self.exchange, error=error, s=RETRY,
            )
            self._retry = self.container.clock.callLater(
                RETRY, lambda: self._follow(self._catch_up())
            )

    def stop_timeout(self):
        """Notices not yet confirmed get C{stop_grace} seconds on terminate."""
        return self.settings.stop_grace

    async def terminate(self, timeout=None):
        """Stop watching (no event or timer starts an announcement), then stop as every
        process does: the announcements in hand get C{stop_grace} seconds. What is left
        unannounced is found by the catch-up pass of the next start."""
        if not self.lifecycle.final:
            self._stop_watching()
        await super().terminate(timeout)

    async def crash(self, reason):
        if not self.lifecycle.final:
            self._stop_watching()
            if self.lease is not None:
                await self.lease.release()
        await super().crash(reason)

    def _stop_watching(self):
        standby, self._standby = self._standby, None
        if standby is not None and standby.running:
            standby.stop()
        calls = [self._retry, self._timer, self.moved_from and self.moved_from[2]]
        for call in calls:
            if call is not None and call.active():
                call.cancel()
        self._timer = None
        self.pending.clear()
        self._due_heap.clear()
        self._to_describe.clear()
        self.moved_from = None
        if self.notifier is not None:
            self.notifier.close()

    async def on_terminate(self):
        if self._unstored:  # confirmed since the last commit
            changes, self._unstored = self._unstored, {}
            await self.store.update(changes)
        if self.lease is not None:
            await self.lease.release()
        await self.store.close()

    async def op_stats(self, content, headers):
        """Counters: announced (files), removed, renamed, links, dirs (made or removed),
        errors; C{known}: files announced and present, C{watched}: directories;
        C{last_failures}: the latest errors, each {time, code, reason} and the C{file} of a
        name skipped (L{RecentFailures})."""
        return dict(self.stats, known=len(self.known), watched=len(self.dirs),
                    last_failures=self.last_failures.as_list())

    # -- the tree ------------------------------------------------------------------------

    def _path(self, rel):
        return os.path.join(self.root, rel) if rel else self.root

    def _rel(self, filepath):
        path = os.fsdecode(filepath.path)
        prefix = self.root.rstrip(os.sep) + os.sep
        if path.startswith(prefix):  # every event's path: cheaper than relpath
            return path[len(prefix):].replace(os.sep, "/")
        return os.path.relpath(path, self.root).replace(os.sep, "/")

    async def _watch_tree(self, rel_dir, seen=None):
        """Watch C{rel_dir} and every directory below, then list each one: files new or changed
        since announced are scheduled (C{seen} collects the relPaths found)."""
        pending = [rel_dir]
        while pending:
            rel_dir = pending.pop()
            try:
                self.notifier.watch(
                    FilePath(os.fsencode(self._path(rel_dir))), MASK, callbacks=[self._event]
                )
            except inotify.INotifyError:
                continue  # gone (or never a directory) by now
            self.dirs.add(rel_dir)
            entries = await threads.deferToThreadPool(
                self.container.reactor, self.container.reactor.getThreadPool(),
                _listing, self._path(rel_dir),
            )
            for name, kind, size, mtime in entries:
                rel = f"{rel_dir}/{name}" if rel_dir else name
                if kind == "dir":
                    if seen is None:  # made with its parent, before its parent was watched
                        self._announce_op(rel, {"directory": ""}, "mkdir")
                    pending.append(rel)
                    continue
                if seen is not None:
                    seen.add(rel)
                if self.known.get(rel) == (LINK if kind == "link" else size, mtime):
                    continue
                if kind == "link":
                    self._announce_link(rel)
                elif rel not in self.writing:
                    self._schedule(rel)

    def _unwatch(self, rel_dir):
        """Forget the directory C{rel_dir} and those below it."""
        for rel in [d for d in self.dirs if d == rel_dir or d.startswith(rel_dir + "/")]:
            self.dirs.discard(rel)
            try:
                self.notifier.ignore(FilePath(os.fsencode(self._path(rel))))
            except KeyError:
                pass

    def _event(self, watch, filepath, mask):
        # An exception here would end Twisted's reading of every event.
        try:
            self._dispatch_event(filepath, mask)
        except Exception as e:
            self.stats["errors"] += 1
            self.last_failures.add(500, f"an event failed: {type(e).__name__}: {e}")
            self.log.failure("watch {name}: an event failed", name=self.settings.name)

    def _dispatch_event(self, filepath, mask):
        rel = self._rel(filepath)
        if rel == "." or rel.startswith("../") or mask & inotify.IN_IGNORED:
            return
        is_dir = bool(mask & inotify.IN_ISDIR)
        if self.moved_from is not None:
            old, old_is_dir, call = self.moved_from
            self.moved_from = None
            call.cancel()
            if mask & inotify.IN_MOVED_TO and old_is_dir == is_dir:
                return self._renamed(old, rel, is_dir)
            self._moved_out(old, old_is_dir)
        if is_inflight_name(os.path.basename(rel)):
            return
        if mask & inotify.IN_MOVED_FROM:
            call = self.container.reactor.callLater(PAIRING, self._unpaired)
            self.moved_from = (rel, is_dir, call)
        elif is_dir and mask & (inotify.IN_CREATE | inotify.IN_MOVED_TO):
            self._announce_op(rel, {"directory": ""}, "mkdir")
            self._follow(self._watch_tree(rel))
        elif is_dir and mask & inotify.IN_DELETE:
            self._unwatch(rel)
            self._removed(rel, directory=True)
        elif mask & inotify.IN_DELETE:
            self._removed(rel)
        elif mask & inotify.IN_CREATE:
            self._created(rel)
        elif mask & (inotify.IN_CLOSE_WRITE | inotify.IN_MOVED_TO):
            self.writing.discard(rel)
            self._schedule(rel)

    def _created(self, rel):
        try:
            st = os.lstat(self._path(rel))
        except OSError:
            return
        if stat.S_ISLNK(st.st_mode):
            self._announce_link(rel)
        elif stat.S_ISREG(st.st_mode):
            if st.st_nlink > 1:  # a hard link: no writer will close it
                self._schedule(rel)
            else:
                self.writing.add(rel)

    def _unpaired(self):
        old, is_dir, _ = self.moved_from
        self.moved_from = None
        self._moved_out(old, is_dir)

    def _moved_out(self, rel, is_dir):
        if is_dir:
            inside = [d for d in self.dirs if d.startswith(rel + "/")]
            for name in sorted(n for n in self.known if n.startswith(rel + "/")):
                self._removed(name)
            self._unwatch(rel)
            for name in sorted(inside, reverse=True) + [rel]:
                self._removed(name, directory=True)
        else:
            self._removed(rel)

    def _renamed(self, old, new, is_dir):
        if is_dir:
            self._unwatch(old)
            prefix = old + "/"
            for name in [n for n in self.known if n.startswith(prefix)]:
                value = self.known[new + name[len(old):]] = self.known.pop(name)
                self._store(name)
                self._store(new + name[len(old):], value)
            if "rename" in self.events:
                file_op = {"rename": renamed_from(self.base_url, old), "directory": ""}
                self._announce_op(new, file_op, "rename")
            self._follow(self._watch_tree(new))
            return
        self.pending.pop(old, None)
        self.writing.discard(old)
        if old not in self.known or "rename" not in self.events:
            self._removed(old)
            return self._schedule(new)
        self.known.pop(old)
        self._store(old)
        file_op = {"rename": renamed_from(self.base_url, old)}
        if os.path.islink(self._path(new)):
            return self._announce_link(new, file_op)
        self._follow(self._announce_file(new, file_op))

    def _follow(self, coroutine):
        d = self.track(coroutine)
        d.addErrback(self._failed)

    def _failed(self, failure):
        self.stats["errors"] += 1
        self.last_failures.add(500, f"an announcement failed: {failure.getErrorMessage()}")
        self.log.failure("watch {name}: an announcement failed", failure, name=self.settings.name)

    # -- announcing ----------------------------------------------------------------------

    def _wanted(self, rel, event):
        if event not in self.events or not self.settings.filter.accepts(rel):
            return False
        try:  # a name a consumer would refuse, or a URL could not carry, is not announced
            paths.safe_relpath(rel)
            why = unfetchable(rel)
            if why is not None:
                raise paths.UnsafePath(f"unusable name {rel!r}: {why}")
        except paths.UnsafePath as e:
            self.stats["errors"] += 1
            self.last_failures.add(422, f"skipped: {e}", rel)
            self.log.warn("watch {name}: skipped: {reason}", name=self.settings.name, reason=e)
            return False
        return True

    def _schedule(self, rel, delay=None):
        """Announce the file C{rel} C{coalesce} seconds from now, unless changed again before
        (a later call supersedes this one)."""
        clock = self.container.clock
        delay = self.settings.coalesce if delay is None else delay
        when = self.pending[rel] = clock.seconds() + delay
        heapq.heappush(self._due_heap, (when, rel))
        if self._timer is None:
            self._timer = clock.callLater(delay, self._fire)
        elif when < self._timer.getTime():
            self._timer.reset(delay)

    def _fire(self):
        """The files due now, described together (L{_describe_next}); the timer is set again
        for the next one due."""
        self._timer = None
        clock = self.container.clock
        now = clock.seconds()
        heap = self._due_heap
        while heap and heap[0][0] <= now:
            when, rel = heapq.heappop(heap)
            if self.pending.get(rel) == when:
                del self.pending[rel]
                if rel not in self.writing:
                    self._to_describe.append(rel)
        if heap:
            self._timer = clock.callLater(max(heap[0][0] - now, 0), self._fire)
        self._describe_next()

    def _describe_next(self):
        while self._to_describe and self._describing < BATCHES:
            batch = [self._to_describe.popleft()
                     for _ in range(min(BATCH, len(self._to_describe)))]
            self._describing += 1
            self._follow(self._describe_batch(batch))

    async def _describe_batch(self, rels):
        try:
            found = await threads.deferToThreadPool(
                self.container.reactor, self.container.reactor.getThreadPool(),
                _describe_all, [self._path(rel) for rel in rels], self.settings.block_size,
            )
        finally:
            self._describing -= 1
        try:
            for rel, one in zip(rels, found):
                try:
                    if isinstance(one, OSError):
                        raise one
                    self._announce_found(rel, one)
                except Exception:  # one file's failure is not the others'
                    self._failed(failure.Failure())
        finally:
            self._describe_next()

    async def _announce_file(self, rel, file_op=None):
        found = await threads.deferToThreadPool(
            self.container.reactor, self.container.reactor.getThreadPool(),
            describe, self._path(rel), self.settings.block_size,
        )
        self._announce_found(rel, found, file_op)

    def _announce_found(self, rel, found, file_op=None):
        """Announce the file C{rel} as L{describe} C{found} it, unless it is gone, changed
        since (due again), or unchanged since announced."""
        if found is None or rel in self.pending:
            return
        size, mtime, mode, digest, blocks = found
        if file_op is None and self.known.get(rel) == (size, mtime):
            return
        young = self.settings.min_age - (self.container.clock.seconds() - mtime)
        if young > 0 and file_op is None:
            return self._schedule(rel, young)
        event = "rename" if file_op else "modify" if rel in self.known else "create"
        if not self._wanted(rel, event):
            return
        fields = {
            # A file hashed in blocks has no digest of its own: a rename of it, carried out
            # as such, fetches nothing; where the old file is missing, the consumer fetches
            # the new one and computes its checksum (cod).
            "identity": {"method": "sha512", "value": digest} if digest else dict(COD),
            "size": size,
            "mtime": format_time(mtime),
            "mode": f"{mode & 0o7777:o}",
        }
        if file_op:
            fields["fileOp"] = file_op
            self.stats["renamed"] += 1
        elif blocks is not None:
            step, digests = blocks
            if sum(length for length, _ in digests) != size:
                return self._schedule(rel)  # changed while read: described again
            fields["identity"] = {"method": "sha512", "value": None}  # each block's own
            for one in block_notices(fields, step, digests):
                self._publish(rel, one, (size, mtime))
            self.stats["announced"] += 1
            return
        self._publish(rel, fields, (size, mtime))
        self.stats["announced"] += 1

    def _announce_link(self, rel, file_op=None):
        found = _link(self._path(rel))
        if found is None or not self._wanted(rel, "rename" if file_op else "link"):
            return
        target, mtime = found
        self.stats["links"] += 1
        fields = {"mtime": format_time(mtime), "fileOp": dict(file_op or {}, link=target)}
        self._publish(rel, fields, (LINK, mtime))

    def _announce_op(self, rel, file_op, event):
        if self._wanted(rel, event):
            self.stats["dirs" if "directory" in file_op else "renamed"] += 1
            self._publish(rel, {"fileOp": file_op})

    def _removed(self, rel, directory=False):
        self.pending.pop(rel, None)
        self.writing.discard(rel)
        if directory:
            self.dirs.discard(rel)
            return self._announce_op(rel, {"remove": "", "directory": ""}, "rmdir")
        if self.known.pop(rel, None) is None:
            return
        if not self._wanted(rel, "delete"):
            return self._store(rel)
        self.stats["removed"] += 1
        self._publish(rel, {"fileOp": {"remove": ""}}, None)

    def _publish(self, rel, fields, state=False):
        """Queue one notice; L{_send} publishes the queue in order. Once it is confirmed,
        C{state} (size, mtime) is stored as announced for C{rel}, or with None, C{rel} is
        forgotten."""
        if state:
            self.known[rel] = state
        notice = Notice(
            {"pubTime": format_time(self.container.clock.seconds()), "baseUrl": self.base_url,
             "relPath": rel, **fields}
        )
        self._outbox.append((rel, notice, state))
        self._send()

    def _send(self):
        """Publish the queued notices in order, without waiting for each confirm (publishes on
        one channel keep their order), and without a coroutine of its own for each: the
        first one declares the exchange and is waited for, so that the exchange exists
        before any other is published; until then the others wait in the outbox."""
        while self._outbox and not self._declaring:
            rel, notice, state = self._outbox.popleft()
            rel_dir = rel.rpartition("/")[0]
            topic = self._topics.get(rel_dir)
            if topic is None:
                if len(self._topics) >= MAX_TOPICS:
                    self._topics.clear()
                topic = self._topics[rel_dir] = notice.topic()
            publishing = self.track(
                self.publish(self.exchange, topic, notice.to_json(), persistent=True,
                             declare=self._declare, transport=self.broker)
            )
            if self._declare is None:
                publishing.addCallbacks(
                    self._sent, self._unsent_failure, (rel, state), None, (rel, state))
            else:
                self._declaring = True
                publishing.addCallbacks(
                    self._declared, self._declare_failed, (rel, state), None, (rel, state))

    def _declared(self, _, rel, state):
        self._declaring = False
        self._declare = None
        self._sent(None, rel, state)
        self._send()

    def _declare_failed(self, failure, rel, state):
        self._declaring = False  # the next notice declares again
        self._unsent(rel, state, failure.value)
        self._send()

    def _sent(self, _, rel, state):
        if state is None or (state is not False and self.known.get(rel) == state):
            # Not a file's state that a failed publish (one of its blocks) or a newer
            # announcement of it has replaced since.
            self._store(rel, state)

    def _unsent_failure(self, failure, rel, state):
        self._unsent(rel, state, failure.value)

    def _store(self, rel, state=None):
        """Keep C{state} (size, mtime) as announced for C{rel} on disk, or forget C{rel}.
        Written by L{_write_states}: what comes in while one commit runs is the next one."""
        self._unstored[rel] = state
        if not self._storing:
            self._follow(self._write_states())

    async def _write_states(self):
        self._storing = True
        try:
            while self._unstored:
                changes, self._unstored = self._unstored, {}
                await self.store.update(changes)
        finally:
            self._storing = False


process_class = Watch
