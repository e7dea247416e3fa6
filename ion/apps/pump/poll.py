"""The poll: announce the files of a directory tree, local or remote, as v03 notices.

A L{PollService} (one per source) lists C{url} every C{interval} seconds through the C{transfer}
service's C{list} op (a local C{file:} tree it reads itself, in pool threads, the same way),
and publishes one notice for every file that is new or changed since it
was last announced (changed: another size or mtime). Each notice carries C{pubTime}, C{baseUrl}
(C{base_url}, default the polled url), C{relPath} (relative to the polled directory), C{size},
C{mtime} and C{mode} when the listing tells them, and the identity C{{method: cod, value: sha512}}
(listings carry no checksums: the consumer computes one on download); with C{block_size}, a
file bigger than that whose size the listing gives is announced as one notice per block, as
sr3 writes them (L{ion.apps.pump.notice.block_notices}), its row written once every one of
them was confirmed. It goes to C{exchange}
(default C{xs_<user>}, where the pump's ingest picks it up) with the notice's topic, persistent
and confirmed by the broker.

Listings (L{ion.apps.pump.transfer.listings} reads them): C{file://} (or C{file:relative/dir/},
made absolute; symbolic links not followed; a missing directory is created only when C{create}
is true, as for the pump app's own default source, else each pass fails, saying so), C{sftp://},
C{ftp://} (mtimes to the minute at best), and C{http(s)://} index pages, where a change is what
the page shows changing: static.File pages give no dates and round sizes over 1 KiB, so only a
small file's change of size is seen (a larger file is announced once); pages with names only
(python's http.server) announce each file once.

Only files are announced: links (where the listing tells them apart) are skipped, and
directories are descended into when C{recursive} (the default). Every listed name passes
L{ion.apps.pump.paths.safe_name} (a hostile name -- C{..}, a C{/}, control characters,
percent-encoded tricks -- is skipped with a warning), and names that a URL cannot carry back
(C{?}, C{#}, a C{%XX} escape) are skipped too, since the consumer could not fetch them.
Temporary files of transfers (C{.<name>.<random>.inflight}, being written into the polled tree)
are skipped quietly: the file is listed under its own name once complete.

Filters (L{ion.apps.pump.filters}) match the whole relPath. A file whose mtime is less than
C{min_age} seconds old waits for a later pass (it may still be being written).

State: what was announced lives in C{<state_dir>/seen.sqlite3} (default state_dir
C{var/pump/poll-<name>}), one row per file (directory, name) -> (size, mtime), so a restart
does not announce unchanged files again. A file's row is written only after the broker
confirmed its notice, in batches of C{batch} files: a crash announces at most the batch in
flight again, and the consumers' duplicate suppression absorbs that. Files gone from the
listing are forgotten (announced again if they come back); so are whole directories that a
complete pass did not see. Changing C{url} starts from an empty state.

Unchanged directories (C{file:} and C{http(s):}): a listing comes with a digest of all it was
read from (an index page's bytes, URL and content type; a local directory's names and lstat
types, modes, sizes and mtimes); once every file of a directory was announced and recorded,
the store keeps that digest for it, with what its listing counts and its subdirectories'
names. The next pass asks with it (C{unless}): a directory whose listing still has it is
neither parsed into entries nor compared with the rows (no row is read), and its
subdirectories are walked from what was kept. Any change to a directory's rows (a file
recorded or forgotten, a standby's record, every file forgotten, the directory forgotten with
its parent's entry, a url change) drops its digest (a pass by a version of the poll that kept
none, every digest), and a directory with a file too young (C{min_age}) or rejected by the
filters, or whose pass ended before all its files were announced, keeps none: it is read
again, so that a skipped directory never hides a file that is new or changed since its row
was written. (sftp and ftp listings have no digest.)

Memory: a pass works through one directory at a time and looks up only that directory's
rows; the listing of the directory next in line and its rows are read meanwhile, and may wait
for their turn while a subtree is walked (one per level at most), so a tree of any size is
polled with memory bounded by its largest directory times its depth. A remote directory's
listing is one reply of the transfer service, so it must fit the messaging limits
(C{ion.core.messaging: max_message_bytes}, 16 MB by default: some 150,000 entries).

With C{announce_removals} (default False), a file announced before and gone from the listing
(its directory too) is announced as removed, C{fileOp} {remove: ''}, before it is forgotten;
a poll cannot tell a rename from a removal and a new file.

With C{byte_rate_max} (bytes/s, default None: no limit) the listings keep to that rate
together (L{ion.apps.pump.transfer.pacing}): the transfer service says how many bytes each
listing read from the server (index page, LIST/MLSD data, READDIR names; nothing for a local
directory), the poll spends them from its bucket and, in debt, waits before it lists the next
directory. A pass may start with a quarter second's worth (64 KiB at least) at once.

Single-active (C{single_active}, or C{instances} > 1): only the holder of the lease
L{ion.core.process.Lease} polls. A standby follows the holder's announcements so that a
takeover announces only what is new or changed, with or without a C{shared_dir}, across
hosts too: it subscribes to C{exchange} (on C{broker} when set) with an exclusive,
auto-delete queue of its own, C{q_<login>.poll.<name>.standby.<tag>} (the tag kept in its
state directory), bound with C{v03.#}, and records into its own seen-set, in
batches in the pool (at most C{batch} notices unacked), every notice that is the active
poll's: published by the poll's own broker user (the C{user_id} the broker checks: a notice
of another user, or of none, is refused and counted as C{refused}), with this poll's
C{baseUrl}, a relPath that is a safe name in the tree, and a valid size and mtime. A file
announced in blocks is recorded with its last block; a removal (C{fileOp} remove) forgets
the file. Two polls announcing the same C{baseUrl} are taken for one. On taking over, the
standby first records what is still queued for it, then ends the subscription and polls.
It knows it has read all of it when a marker comes back: it publishes one (a random token)
to C{xs_<login>.poll.<name>.standby}, an exchange its queue alone is bound to with its tag,
and the broker queues the marker behind every notice routed to it before, notices still on
their way over the connection included (a standby waits at most a minute for it). A standby
that was not running misses what was announced meanwhile (its queue went with it, which
leaves nothing to pile up on the broker): its rows are then older, never newer, than what
was announced, so after a takeover those files are announced again (the consumers drop the
duplicates) and none is skipped. Without C{announce_removals} a standby is not told of
removals: a file removed and put back unchanged (same size and mtime) while another polled
is taken, after the takeover, for the one announced before. On an MQTT C{broker}, which
does not say who published, a standby follows nothing.

A pass still running when the next one is due makes that one skip (counted as C{skipped}).
Op C{poll} runs a pass now (or waits for the running one) and returns the counters of the
last pass; op C{stats} returns the totals.
"""

import functools
import json
import os
import re
import secrets
import sqlite3
from json.encoder import encode_basestring
from urllib.parse import unquote, urlsplit

from twisted.internet import defer, task, threads

from ion.apps.pump import paths
from ion.apps.pump.args import PollArgs
from ion.apps.pump.journal import DiskQueue
from ion.apps.pump.notice import (
    Notice, block_lengths, block_notices, block_step, format_time, parse_time, topic_for,
)
from ion.apps.pump.outcome import RecentFailures, classify
from ion.apps.pump.transfer.blocks import sr3_block
from ion.apps.pump.transfer.errors import TransferError
from ion.apps.pump.transfer.file import list_local
from ion.apps.pump.transfer.inflight import is_inflight_name
from ion.apps.pump.transfer.pacing import Pacer, take
from ion.apps.pump.flow import instance_tag, open_flow_broker
from ion.apps.pump.user import own_prefix, pump_user
from ion.core.process import Lease, RemoteError, ServiceProcess

COD = {"method": "cod", "value": "sha512"}
_COD_TAIL = ',"identity":{"method":"cod","value":"sha512"}}'
_YEAR_10000 = 253402300800  # seconds since the epoch: format_time's fast range ends there
_STAMPS_KEPT = 4096

_MQTT = re.compile(r"mqtts?://", re.I | re.A)
_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
# A listed name of these characters only, not starting with a dot, passes every check of
# paths.safe_name and of unfetchable (no '%', '?', '#', ':', '/', '\\', control characters,
# no '.' or '..', no inflight name, at most 255 bytes): the usual name, told by one regex.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_+=,@~-][A-Za-z0-9_.+=,@~-]{0,254}", re.ASCII)
# Seconds a standby taking over waits for its marker to come back before it polls anyway.
_MARKER_TIMEOUT = 60
_PASS_COUNTERS = (
    "listed",
    "announced",
    "removed",
    "unchanged",
    "young",
    "rejected",
    "unsafe",
    "skipped_entries",
    "errors",
)
# What a pass over a listing adds to the pass's counters, kept with its digest
# (SeenFiles.page_read): "files" the files it lists, unchanged when the listing is.
_PAGE_COUNTERS = ("listed", "files", "unsafe", "skipped_entries")


class _Listed:
    """A directory listed for a pass: its C{entries} and the Deferred of its rows C{known},
    the C{digest} of its listing (None: the scheme gives none); or, for a listing unchanged
    since its rows were written, only the C{summary} L{SeenFiles.page_read} kept of it."""

    __slots__ = ("entries", "known", "digest", "summary")

    def __init__(self, entries, known, digest=None, summary=None):
        self.entries, self.known, self.digest, self.summary = entries, known, digest, summary

    def discard(self):
        """Not used after all (the pass ended first)."""
        if self.known is not None:
            self.known.addErrback(lambda _: None)


class PublishFailed(Exception):
    """The broker did not confirm an announcement; the pass ends, the next one retries."""


def local_directory(url):
    """The local path of a C{file://} root URL, or None for other schemes."""
    if not url.startswith("file://"):
        return None
    path = unquote(urlsplit(url).path)
    return path or "/"


def unfetchable(name):
    """Why a URL built from C{name} would not lead back to it, or None."""
    for char in "?#":
        if char in name:
            return f"contains {char!r}, which a URL cannot carry in a path"
    if _ESCAPE.search(name):
        return "contains a %XX escape, which a URL would decode"
    return None


def notice_head(pub_time, base_url):
    """The start of L{plain_notice_json}'s notices published at C{pub_time} (its text)."""
    return f'{{"pubTime":"{pub_time}","baseUrl":{encode_basestring(base_url)},"relPath":'


def plain_notice_json(head, rel_path, entry, stamps, block_size):
    """The JSON bytes of the notice announcing the usual listed file C{entry} at C{rel_path}
    (a size, mtime and mode each an int -- the mtime a float too, from 1970 to 9999 -- or
    None; one notice with C{block_size}): the bytes of C{Notice(notice_for(...)).to_json()},
    written at a fraction of its cost; None for any other entry, which goes that way.
    C{head}: L{notice_head}'s; C{stamps}: as for L{mtime_text}."""
    size, mtime, mode = entry.get("size"), entry.get("mtime"), entry.get("mode")
    text = [head, encode_basestring(rel_path)]
    if size is not None:
        if type(size) is not int or (block_size is not None and size > block_size):
            return None
        text.append(f',"size":{size}')
    if mtime is not None:
        if type(mtime) not in (float, int) or not 0 <= mtime < _YEAR_10000:
            return None
        text.append(f',"mtime":"{mtime_text(mtime, stamps)}"')
    if mode is not None:
        if type(mode) is not int:
            return None
        text.append(f',"mode":"{mode & 0o7777:o}"')
    text.append(_COD_TAIL)
    try:
        return "".join(text).encode("utf-8")
    except UnicodeEncodeError:
        return None  # a lone surrogate: Notice.to_json escapes it


def mtime_text(epoch, stamps):
    """C{format_time(epoch)} for a finite C{epoch} from 1970 to 9999, the text of its whole
    second kept in C{stamps} (a dict the caller keeps; files of a directory share their
    seconds, and format_time's calendar work is most of its cost)."""
    whole = int(epoch)
    nanos = round((epoch - whole) * 1_000_000_000)
    if nanos == 1_000_000_000:
        return format_time(epoch)
    stamp = stamps.get(whole)
    if stamp is None:
        if len(stamps) >= _STAMPS_KEPT:
            stamps.clear()
        stamp = stamps[whole] = format_time(whole)
    # Index pages and FTP give whole minutes: no fraction.
    return f"{stamp}.{nanos:09d}".rstrip("0") if nanos else stamp


class SeenFiles:
    """What a poll has announced: (directory, name) -> (size, mtime), in SQLite at C{path}
    (atomic commits; only the rows of the directory being looked at are read). Opening runs on
    the calling thread; the methods run in C{reactor}'s pool, one at a time in the order
    called, and return Deferreds."""

    def __init__(self, path, root, reactor=None):
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        self.path = path
        self._disk = DiskQueue(reactor)
        # Used by one thread at a time (the DiskQueue's), never by two at once.
        self.db = sqlite3.connect(path, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # A power loss may lose the last commits: those files are announced again, which the
        # consumers' duplicate suppression absorbs.
        self.db.execute("PRAGMA synchronous=NORMAL")
        with self.db:
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS files (dir TEXT, name TEXT, size INTEGER, "
                "mtime REAL, PRIMARY KEY (dir, name)) WITHOUT ROWID"
            )
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS dirs (dir TEXT PRIMARY KEY, pass INTEGER) "
                "WITHOUT ROWID"
            )
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS pages (dir TEXT PRIMARY KEY, digest TEXT, "
                "summary TEXT) WITHOUT ROWID"
            )
            row = self.db.execute("SELECT value FROM meta WHERE key = 'root'").fetchone()
            self.reset = row is not None and row[0] != root
            if self.reset:
                self.db.execute("DELETE FROM files")
                self.db.execute("DELETE FROM dirs")
                self.db.execute("DELETE FROM pages")
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('root', ?)", (root,))
            row = self.db.execute("SELECT value FROM meta WHERE key = 'pass'").fetchone()
            self.passes = int(row[0]) if row else 0
        self.known_at_open = self.db.execute("SELECT count(*) FROM files").fetchone()[0]

    def _in_thread(method):
        """The blocking C{method} run through the store's DiskQueue: callers get a Deferred."""

        @functools.wraps(method)
        def call(self, *args):
            return self._disk.run(method, self, *args)

        return call

    @_in_thread
    def count(self):
        """How many files are known."""
        return self.db.execute("SELECT count(*) FROM files").fetchone()[0]

    @_in_thread
    def directory(self, rel_dir):
        """{name: (size, mtime)} of the files announced in directory C{rel_dir} ('' the root)."""
        rows = self.db.execute("SELECT name, size, mtime FROM files WHERE dir = ?", (rel_dir,))
        return {name: (size, mtime) for name, size, mtime in rows}

    @_in_thread
    def get(self, rel_path):
        """(size, mtime) as last announced for C{rel_path}, or None."""
        rel_dir, _, name = rel_path.rpartition("/")
        row = self.db.execute(
            "SELECT size, mtime FROM files WHERE dir = ? AND name = ?", (rel_dir, name)
        ).fetchone()
        return None if row is None else tuple(row)

    @_in_thread
    def everything(self):
        """{relPath: (size, mtime)} of every file known."""
        rows = self.db.execute("SELECT dir, name, size, mtime FROM files")
        return {f"{d}/{n}" if d else n: (size, mtime) for d, n, size, mtime in rows}

    @_in_thread
    def start_pass(self):
        # Read again: the instances of a poll share the store, one pass after the other.
        row = self.db.execute("SELECT value FROM meta WHERE key = 'pass'").fetchone()
        last = int(row[0]) if row else 0
        # The pass that last kept the digests: a pass since by a version of the poll that
        # kept none (one before them) may have changed rows without dropping them.
        row = self.db.execute("SELECT value FROM meta WHERE key = 'pages_pass'").fetchone()
        self.passes = last + 1
        with self.db:
            if row is None or row[0] != str(last):
                self.db.execute("DELETE FROM pages")
            for key in ("pass", "pages_pass"):
                self.db.execute(
                    "INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, str(self.passes))
                )
        return self.passes

    @_in_thread
    def record(self, rel_dir, rows):
        """Remember [(name, size, mtime)] of C{rel_dir} as announced (one commit)."""
        with self.db:
            self.db.execute("DELETE FROM pages WHERE dir = ?", (rel_dir,))
            self.db.executemany(
                "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)",
                ((rel_dir, name, size, mtime) for name, size, mtime in rows),
            )

    @_in_thread
    def forget(self, rel_dir, names):
        with self.db:
            self.db.execute("DELETE FROM pages WHERE dir = ?", (rel_dir,))
            self.db.executemany(
                "DELETE FROM files WHERE dir = ? AND name = ?", ((rel_dir, n) for n in names)
            )

    @_in_thread
    def page(self, rel_dir):
        """C{(digest, summary)} of the listing of C{rel_dir} as L{page_read} wrote it, or
        None: none written since the directory's rows last changed (or unreadable)."""
        row = self.db.execute(
            "SELECT digest, summary FROM pages WHERE dir = ?", (rel_dir,)
        ).fetchone()
        if row is None:
            return None
        digest, summary = row
        try:
            summary = json.loads(summary)
        except (TypeError, ValueError):
            return None
        counts = [summary.get(key) for key in _PAGE_COUNTERS] if type(summary) is dict else [None]
        dirs = summary.get("dirs") if type(summary) is dict else None
        if (
            type(digest) is not str
            or any(type(n) is not int or n < 0 for n in counts)
            or type(dirs) is not list
            or any(type(name) is not str for name in dirs)
        ):
            return None
        return digest, summary

    @_in_thread
    def page_read(self, rel_dir, digest, summary):
        """Remember that the rows of C{rel_dir} are what its listing of C{digest} made of
        them, every file of it announced and recorded, with C{summary}: the counters of
        L{_PAGE_COUNTERS} a pass over that page adds, and its C{dirs} (names). Any later
        change to the directory's rows (L{record}, L{forget}, L{update}, L{forget_all},
        L{forget_unvisited}) forgets it."""
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO pages VALUES (?, ?, ?)",
                (rel_dir, digest, json.dumps(summary)),
            )

    @_in_thread
    def update(self, changes):
        """Remember or forget many files in one commit: {relPath: (size, mtime), or None to
        forget it} (a watch's group commit)."""
        remembered, forgotten = [], []
        for rel_path, state in changes.items():
            rel_dir, _, name = rel_path.rpartition("/")
            if state is None:
                forgotten.append((rel_dir, name))
            else:
                remembered.append((rel_dir, name, *state))
        touched = {rel_dir for rel_dir, _ in forgotten} | {row[0] for row in remembered}
        with self.db:
            self.db.executemany("DELETE FROM pages WHERE dir = ?", ((d,) for d in touched))
            self.db.executemany("DELETE FROM files WHERE dir = ? AND name = ?", forgotten)
            self.db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)", remembered)

    @_in_thread
    def visited(self, rel_dir, pass_number):
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO dirs VALUES (?, ?)", (rel_dir, pass_number))

    @_in_thread
    def forget_all(self):
        """Forget every announcement: the next pass announces every file again."""
        with self.db:
            self.db.execute("DELETE FROM files")
            self.db.execute("DELETE FROM dirs")
            self.db.execute("DELETE FROM pages")

    @_in_thread
    def unvisited(self, pass_number):
        """[(dir, name)] of the files of every directory pass C{pass_number} did not list."""
        return self.db.execute(
            "SELECT dir, name FROM files WHERE dir NOT IN (SELECT dir FROM dirs WHERE pass = ?)",
            (pass_number,),
        ).fetchall()

    @_in_thread
    def forget_unvisited(self, pass_number):
        """Forget the files of every directory a complete pass C{pass_number} did not list."""
        with self.db:
            for table in ("files", "pages"):
                self.db.execute(
                    f"DELETE FROM {table} WHERE dir NOT IN (SELECT dir FROM dirs WHERE pass = ?)",
                    (pass_number,),
                )
            self.db.execute("DELETE FROM dirs WHERE pass != ?", (pass_number,))

    @_in_thread
    def close(self):
        self.db.close()

    del _in_thread


class PollService(ServiceProcess):
    """Lists one source every interval and announces its new and changed files (see the module
    docstring)."""

    service_optional = True  # named by the pump app: its name is a service (ion rpc)

    def on_init(self):
        args = self.settings = PollArgs.parse(self.args)
        self.source = args.name
        self.url = args.url
        self.base_url = args.base_url
        self.filter = args.filter
        self.user = pump_user(self, args.user)
        self.exchange = args.exchange or f"xs_{self.user}"
        local = local_directory(self.url)
        if local is not None and args.create and not os.path.isdir(local):
            os.makedirs(local, exist_ok=True)
            # Said aloud: a mistyped path would otherwise be a new, silently empty source.
            self.log.info(
                "poll {name}: created {path}, which did not exist", name=self.source, path=local
            )
        state_dir = args.state_dir or os.path.join("var", "pump", f"poll-{self.source}")
        self.claim_directory(state_dir)
        self.broker = None
        queue = f"q_{own_prefix(self, self.user)}poll.{self.source}"  # its flow queue's name
        if args.broker:
            # Announced there, to xs_<login> (or exchange), which that pump declares.
            self.broker, queue = open_flow_broker(
                self, args.broker, "poll", self.source, state_dir
            )
            self.exchange = args.exchange or f"xs_{self.broker.user}"
        # The instances of a poll share what was announced; one of them polls at a time.
        self.store = SeenFiles(
            os.path.join(args.shared_dir or state_dir, "seen.sqlite3"), self.url,
            self.container.reactor,
        )
        self.lease = None
        if args.single_active or args.instances > 1:
            self.lease = Lease(self, f"poll.{self.user}.{self.source}", on_lost=self._lease_lost)
        # The queue a standby follows the active poll with: named as the flow's own queue
        # (an sr3 pump's account may declare only those), one per state directory. MQTT
        # says nothing of who published: nothing there could be trusted.
        self._standby_queue = None
        if self.lease is not None and not _MQTT.match(args.broker or ""):
            self._standby_tag = instance_tag(state_dir)
            self._standby_queue = f"{queue}.standby.{self._standby_tag}"
            # Where its markers go: an exchange of the same account (xs_<login>...: it may
            # declare and write those), bound to each standby's queue by the standby's tag.
            self._marker_exchange = f"xs_{queue[2:]}.standby"
        if self.store.reset:
            self.log.warn(
                "poll {name}: url changed to {url}; every file will be announced again",
                name=self.source,
                url=self.url,
            )
        elif self.container.transport.lost_messages and self.store.known_at_open:
            # Notices announced before may have died in the embedded broker's queues before
            # a consumer took them: announced again, they are delivered now, and the
            # consumers' duplicate suppression skips those they already delivered.
            self.store.forget_all()
            self.log.warn(
                "poll {name}: the broker lost queued notices when it last stopped; every file "
                "will be announced again (files already delivered are skipped as duplicates)",
                name=self.source,
            )
        self.pacers = ()
        if args.byte_rate_max is not None:
            self.pacers = (Pacer(self.container.clock, args.byte_rate_max),)
        self.stats = dict.fromkeys(
            ("passes", "failed_passes", "skipped", "standby", "followed", "refused",
             *_PASS_COUNTERS), 0
        )
        self.last_pass = None
        self._loop = None
        self._pass = None
        self._declared = self.broker is not None
        self._local = local_directory(self.url)
        self._stamps = {}  # whole second -> its text in notices' mtimes (mtime_text)
        self._stopping = False
        self._last_error = None
        self.last_failures = RecentFailures(self.container.clock)  # ion status, the console
        self._acquiring = False
        # Standby: the subscription to the active poll's announcements, what came from it
        # and awaits its write (relPath -> (size, mtime), or None: forget it), the
        # deliveries settled once written, the write under way, deliveries so far.
        self._following = None
        self._follow_error = None
        self._followed = {}
        self._followed_deliveries = []
        self._writing = None
        self._marker = None  # taking over: (token, Deferred fired when it comes back)

    async def on_activate(self):
        if self.broker is not None:
            await self.broker.connect()
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.container.clock
        done = self._loop.start(self.settings["interval"], now=True)
        done.addErrback(
            lambda f: self.log.failure("poll {name}: the poll loop failed", f, name=self.source)
        )

    def stop_timeout(self):
        """The pass under way gets C{stop_grace} seconds to finish on terminate."""
        return self.settings["stop_grace"]

    async def terminate(self, timeout=None):
        """Stop polling; the pass under way is work in hand: it gets C{stop_grace} seconds to
        finish, then it is cancelled (its unconfirmed files are announced again by the next
        run)."""
        if not self.lifecycle.final:
            self._stop_polling()
        await super().terminate(timeout)

    async def crash(self, reason):
        if not self.lifecycle.final:
            self._stop_polling()
            self._cancel_pass()
            self._followed = {}  # not written: the store closes now
            await self._release_lease()
            await self.store.close()
        await super().crash(reason)

    async def on_terminate(self):
        self._cancel_pass()
        await self._release_lease()
        await self.store.close()

    async def _release_lease(self):
        if self.lease is not None:
            await self.lease.release()

    def _lease_lost(self):
        # Another instance may hold it by now: the pass under way announces no more.
        self.log.warn("poll {name}: no longer the active poll", name=self.source)
        self._cancel_pass()

    def _stop_polling(self):
        self._stopping = True
        if self._marker is not None:
            self._marker[1].cancel()  # a takeover under way polls no more
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def _cancel_pass(self):
        if self._pass is not None:
            self._pass.cancel()

    def _tick(self):
        # Nothing returned: the loop keeps its rhythm, and a pass still running makes this
        # tick skip.
        if self._acquiring:
            return  # trying for the lease, or taking over
        if self.lease is not None and not self.lease.held:
            if not self._stopping:
                self._acquiring = True  # cleared when the attempt ends, maybe at once
                self.track(self._acquire_and_poll()).addErrback(
                    lambda f: self.log.failure("poll {name}: standby failed", f, name=self.source)
                )
            return
        if self._pass is not None:
            self.stats["skipped"] += 1
            self.log.debug("poll {name}: previous pass still running; skipped", name=self.source)
            return
        self.poll_now()

    async def _acquire_and_poll(self):
        """Standby: try for the lease, following the active poll meanwhile; once it is held,
        record what the last holder announced, then poll now."""
        try:
            if not await self.lease.try_acquire():
                self.stats["standby"] += 1
                if not self._stopping:
                    await self._follow()
                return
            if not self._stopping:
                await self._stop_following()
        finally:
            self._acquiring = False
        if self._stopping:
            return
        self.log.info("poll {name}: now the active poll", name=self.source)
        await self.poll_now()

    def poll_now(self):
        """Start a pass unless one is running; returns a Deferred firing (with None) when the
        pass under way, new or not, has ended, whatever its outcome. A standby poll (another
        holds the lease), or one taking over, runs none."""
        standby = self.lease is not None and (not self.lease.held or self._acquiring)
        if standby and self._pass is None:
            return defer.succeed(None)
        if self._pass is None and not self._stopping:
            d = self.track(self._run_pass())
            d.addErrback(self._pass_failed)
            self._pass = d

            def done(result):
                self._pass = None
                return result

            d.addBoth(done)
        if self._pass is None:
            return defer.succeed(None)
        return self._chain(self._pass)

    @staticmethod
    def _chain(d):
        follower = defer.Deferred()

        def follow(result):
            if not follower.called:
                follower.callback(None)
            return result

        d.addBoth(follow)
        return follower

    def _pass_failed(self, failure):
        if failure.check(defer.CancelledError):
            return None
        self.stats["errors"] += 1
        self.stats["failed_passes"] += 1
        self.last_failures.add(500, f"pass failed: {failure.getErrorMessage()}")
        self.log.failure("poll {name}: pass failed", failure, name=self.source)
        return None

    async def op_poll(self, content, headers):
        """Run a pass now (or wait for the one running); the counters of the last pass."""
        await self.poll_now()
        return dict(self.last_pass or {})

    async def op_stats(self, content, headers):
        """Totals: passes, failed_passes (passes with an error), skipped (passes not run
        because one was running), listed, announced, removed (with announce_removals),
        unchanged, young (waiting for min_age), rejected (filters), unsafe (names skipped),
        skipped_entries (links and the like), errors (listings or publishes that failed),
        standby (tries for the lease lost), followed (the active poll's announcements a
        standby recorded), refused (notices a standby refused: another user's, or unsafe),
        C{known}: files in the state, and C{last_failures}: the latest failed passes' first
        errors, each {time, code, reason} (L{RecentFailures})."""
        stats = dict(self.stats)
        stats["last_failures"] = self.last_failures.as_list()
        stats["known"] = await self.store.count()
        return stats

    # -- standby: following the active poll ----------------------------------------------

    async def _follow(self):
        """Subscribe to the announcements of the active poll, unless subscribed already
        (see the module docstring)."""
        if self._following is not None or self._standby_queue is None:
            return
        consumer = None
        try:
            consumer = await self.subscribe(
                self.exchange, ["v03.#"], self._take_followed, queue=self._standby_queue,
                transport=self.broker, exchange_type=None if self.broker is not None else "topic",
                durable=True, exclusive=True, auto_delete=True, prefetch=self.settings.batch,
            )
            await self.bind(
                self._standby_queue, self._marker_exchange, self._standby_tag,
                transport=self.broker,
            )
            self._following = consumer
        except Exception as e:
            if consumer is not None:
                await self.unsubscribe(consumer)
            # Tried again at the next interval; said once while the same error repeats.
            why = str(e)
            level = self.log.warn if why != self._follow_error else self.log.debug
            level(
                "poll {name}: standby cannot follow the active poll on {exchange}: {why}",
                name=self.source, exchange=self.exchange, why=why,
            )
            self._follow_error = why
            return
        self._follow_error = None

    def _take_followed(self, delivery):
        headers = delivery.properties.headers
        if headers and "marker" in headers:
            # A marker: this poll's own, back after what was queued before it, or a stale
            # or forged one (nothing happens).
            marker = self._marker
            if marker is not None and headers["marker"] == marker[0] and not marker[1].called:
                marker[1].callback(None)
            delivery.ack()
            return
        try:
            change = self._followed_change(delivery)
        except (ValueError, TypeError, paths.UnsafePath, TransferError) as e:
            # Not the active poll's notice (an anonymous or hostile poster): never recorded.
            # Said aloud the first time; counted always.
            self.stats["refused"] += 1
            level = self.log.warn if self.stats["refused"] == 1 else self.log.debug
            level(
                "poll {name}: standby refused a notice on {exchange}: {why}",
                name=self.source, exchange=self.exchange, why=e,
            )
            change = None
        if change is None:
            delivery.ack()
            return
        rel_path, state = change
        self._followed[rel_path] = state
        self._followed_deliveries.append(delivery)
        if self._writing is None:
            self._writing = self.track(self._write_followed())

    def _followed_change(self, delivery):
        """C{(relPath, (size, mtime))} that a notice of the active poll announced, or
        C{(relPath, None)} when it announced the file removed; None for a notice of another
        flow (or a block but the last); ValueError (or UnsafePath, a TransferError) for one
        that the poll cannot have published."""
        user = delivery.properties.user_id
        own = (self.broker or self.container.messenger.transport).user
        if user is None or user != own:
            raise ValueError(f"published by {user!r}, not by the poll's user {own!r}")
        notice = Notice.from_json(delivery.body).validate()
        if notice.base_url != self.base_url or "retrievePath" in notice or "report" in notice:
            return None
        rel_path = notice.rel_path
        paths.safe_relpath(rel_path)
        name = rel_path.rpartition("/")[2]
        why = unfetchable(name)
        if why is not None or is_inflight_name(name):
            raise ValueError(f"relPath {rel_path!r} cannot be a polled file")
        file_op = notice.file_op
        if file_op is not None:
            return (rel_path, None) if list(file_op) == ["remove"] else None
        size = notice.size
        if "blocks" in notice:
            size, step, number, _ = sr3_block(notice["blocks"], size)
            if number != (size - 1) // step:
                return None  # the file is recorded with its last block
        mtime = None if notice.mtime is None else parse_time(notice.mtime)
        return rel_path, (size, mtime)

    async def _write_followed(self):
        """Write what was followed, in batches, settling each batch's deliveries after."""
        try:
            while self._followed:
                changes, self._followed = self._followed, {}
                deliveries, self._followed_deliveries = self._followed_deliveries, []
                try:
                    await self.store.update(changes)
                except Exception:
                    # Not remembered: those files are announced again after a takeover.
                    self.log.failure("poll {name}: standby could not record the active "
                                     "poll's announcements", name=self.source)
                else:
                    self.stats["followed"] += len(changes)
                for delivery in deliveries:
                    if not delivery.settled:
                        delivery.ack()
        finally:
            self._writing = None

    async def _stop_following(self):
        """Now the holder: record what the last one announced and is still queued for this
        poll, up to a marker published now (see the module docstring), then end the
        subscription."""
        consumer, self._following = self._following, None
        if consumer is None:
            return
        token = secrets.token_hex(16)
        back = defer.Deferred()
        back.addTimeout(_MARKER_TIMEOUT, self.container.clock)
        self._marker = (token, back)
        try:
            await self.publish(
                self._marker_exchange, self._standby_tag, b"{}", transport=self.broker,
                headers={"marker": token}, persistent=False, mandatory=True,
            )
            await back
        except defer.CancelledError:
            pass  # stopping
        except Exception as e:
            why = f"no marker back in {_MARKER_TIMEOUT} s" if isinstance(
                e, defer.TimeoutError) else str(e)
            self.log.warn(
                "poll {name}: could not take in all the last holder announced ({why}); "
                "some files may be announced again",
                name=self.source, why=why,
            )
        finally:
            self._marker = None
            if not back.called:
                back.cancel()
            back.addErrback(lambda _: None)  # ended one way or another: nothing left to say
        if self._writing is not None:
            await self._chain(self._writing)
        await self.unsubscribe(consumer)
        if self._writing is not None:
            await self._chain(self._writing)

    # -- one pass ------------------------------------------------------------------------

    async def _run_pass(self):
        clock = self.container.clock
        started = clock.seconds()
        number = await self.store.start_pass()
        counts = dict.fromkeys(_PASS_COUNTERS, 0)
        pending = [""]
        # The listing of the directory next in line, and its rows known, are asked for while
        # this one is worked through (one at a time: paced listings still read one after the
        # other).
        ahead = {}
        visits = []
        try:
            complete, first_error, first_code = await self._walk(
                number, pending, ahead, visits, counts
            )
        finally:
            for listing in ahead.values():
                listing.addCallbacks(_Listed.discard, lambda _: None)
                listing.cancel()
            if visits:
                await defer.gatherResults(visits, consumeErrors=True)
        if complete and not self._stopping:
            try:
                if self.settings.announce_removals:
                    counts["removed"] += await self._announce_removals(
                        await self.store.unvisited(number)
                    )
                await self.store.forget_unvisited(number)
            except PublishFailed as e:
                counts["errors"] += 1
                if first_error is None:
                    first_error, first_code = str(e), 503
        self._note_errors(first_error, counts["errors"])
        if first_error is not None:
            self.last_failures.add(first_code, first_error)
        elapsed = clock.seconds() - started
        self.stats["passes"] += 1
        if first_error is not None:
            self.stats["failed_passes"] += 1
        for key, value in counts.items():
            self.stats[key] += value
        self.last_pass = dict(counts, seconds=elapsed, complete=complete and not self._stopping)
        if counts["announced"]:
            self.log.info(
                "poll {name}: announced {n} new or changed files ({listed} listed) in {t:.2f} s",
                name=self.source,
                n=counts["announced"],
                listed=counts["listed"],
                t=elapsed,
            )

    async def _walk(self, number, pending, ahead, visits, counts):
        """List the directories of C{pending} (a stack) and announce what changed: (whether
        every directory was listed and announced, the first error, its code)."""
        complete = True
        first_error = first_code = None
        while pending and not self._stopping:
            rel_dir = pending.pop()
            listing = ahead.pop(rel_dir, None) or self._ask(rel_dir)
            try:
                listed = await listing
            except defer.CancelledError:
                raise
            except Exception as e:
                remote = isinstance(e, (RemoteError, TransferError))
                if remote and e.code == 404 and rel_dir:
                    # Gone since its parent was listed: its files are forgotten below.
                    continue
                complete = False
                counts["errors"] += 1
                if first_error is None:
                    failure = classify(e)
                    first_code = failure.code
                    why = f"{e.code} {e.message}" if remote else e
                    first_error = f"cannot list {self._dir_url(rel_dir)}: {why}"
                continue
            visits.append(self.store.visited(rel_dir, number))
            if pending and pending[-1] not in ahead:
                ahead[pending[-1]] = self._ask(pending[-1])
            if listed.summary is not None:
                pending.extend(reversed(self._unchanged_page(rel_dir, listed.summary, counts)))
                continue
            try:
                subdirs = await self._directory(
                    rel_dir, listed.entries, counts, listed.known, listed.digest
                )
            except PublishFailed as e:
                # The broker refused or went away: the next pass tries again.
                complete = False
                counts["errors"] += 1
                if first_error is None:
                    first_error, first_code = str(e), 503
                break
            pending.extend(reversed(subdirs))
        return complete, first_error, first_code

    def _ask(self, rel_dir):
        """The Deferred of the L{_Listed} of C{rel_dir}."""
        return defer.Deferred.fromCoroutine(self._listed(rel_dir))

    async def _listed(self, rel_dir):
        """The L{_Listed} of C{rel_dir}: first the digest of its listing when last read whole
        (L{SeenFiles.page}), then its listing, asked for C{unless} that digest: when the
        listing still has it, only the summary kept with it, and no row is read; else the
        listing and the rows (at once when there was no digest to ask with)."""
        page = await self.store.page(rel_dir)
        known = None if page is not None else self.store.directory(rel_dir)
        try:
            entries, digest, unchanged = await self._list(rel_dir, page and page[0])
        except BaseException:
            if known is not None:
                known.addErrback(lambda _: None)  # not needed after all
            raise
        if unchanged:
            return _Listed(None, None, digest, page[1])
        if known is None:
            known = self.store.directory(rel_dir)
        return _Listed(entries, known, digest)

    def _unchanged_page(self, rel_dir, summary, counts):
        """Count a directory whose listing is the one read last time, every file of it
        announced then (its C{summary}, L{SeenFiles.page_read}); its subdirectories."""
        counts["listed"] += summary["listed"]
        counts["unchanged"] += summary["files"]
        counts["unsafe"] += summary["unsafe"]
        counts["skipped_entries"] += summary["skipped_entries"]
        if not self.settings["recursive"]:
            return []
        prefix = f"{rel_dir}/" if rel_dir else ""
        room = paths.PATH_MAX_BYTES - len(prefix.encode("utf-8"))
        subdirs = []
        for name in summary["dirs"]:
            # As _directory took them (the rows are the poll's own, but checked all the same).
            if _PLAIN_NAME.fullmatch(name) and len(name) <= room:
                subdirs.append(prefix + name)
            else:
                rel_path = self._checked(rel_dir, name)
                if rel_path is not None:
                    subdirs.append(rel_path)
        return subdirs

    def _note_errors(self, first, count):
        """Warn about a pass's failures, once while the same first failure repeats (then at
        debug: the progress line counts the failed passes)."""
        more = f" (and {count - 1} more)" if count > 1 else ""
        if first is not None and first != self._last_error:
            self.log.warn("poll {name}: {what}{more}", name=self.source, what=first, more=more)
        elif first is not None:
            self.log.debug("poll {name}: {what}{more}", name=self.source, what=first, more=more)
        elif first is None and self._last_error is not None:
            self.log.info("poll {name}: passes work again", name=self.source)
        self._last_error = first

    def _dir_url(self, rel_dir):
        return self.url + (rel_dir + "/" if rel_dir else "")

    async def _list(self, rel_dir, unless=None):
        """(entries, the listing's digest or None, whether that is C{unless}: then no
        entries) of C{rel_dir}."""
        if self._local is not None:
            # A local directory is read here, in a pool thread: through the transfer service
            # each entry would be made an Entry, then a dict, then a message and back.
            reactor, shown = self.container.reactor, self._dir_url(rel_dir)
            listing = threads.deferToThreadPool(
                reactor, reactor.getThreadPool(), list_local,
                os.path.join(self._local, rel_dir), shown, unless,
            )
            timeout = self.settings["list_timeout"]
            listing.addTimeout(timeout, self.container.clock)
            try:
                listed = await listing
            except defer.TimeoutError:
                # A hung file system (NFS): the pass fails, saying so, as a remote one would.
                raise TransferError(f"{shown}: not listed in {timeout} s", code=504) from None
            return listed, listed.digest, listed.unchanged
        request = {"url": self._dir_url(rel_dir), "digest": True}
        if self.pacers:
            request["with_bytes"] = True
        if unless is not None:
            request["unless"] = unless
        reply = await self.rpc(
            "transfer", "list", request, timeout=self.settings["list_timeout"]
        )
        digest, unchanged = None, False
        if isinstance(reply, dict):
            entries, size = reply.get("entries"), reply.get("bytes")
            if "digest" in reply:
                digest, unchanged = reply.get("digest"), reply.get("unchanged")
                if digest is not None and (type(digest) is not str or not digest):
                    raise ValueError("the transfer service's listing has a bad digest")
                if unchanged is not False and (unchanged is not True or digest != unless):
                    raise ValueError("the transfer service says an unknown page is unchanged")
        else:
            entries, size = reply, None  # a transfer service that gives no digest
        if not unchanged and not isinstance(entries, list):
            raise ValueError("the transfer service's listing is no list of entries")
        if self.pacers:
            if type(size) is not int or size < 0:
                raise ValueError("the transfer service's listing does not say its size in bytes")
            await take(self.container.clock, self.pacers, size)
        return entries, digest, unchanged

    async def _directory(self, rel_dir, entries, counts, known=None, digest=None):
        """Announce what changed among one directory's entries; returns its subdirectories.
        C{known}: the Deferred of its rows in the store, when already asked for. C{digest}:
        its listing's; once every file it lists is announced and recorded, the rows are
        marked as that listing's (L{SeenFiles.page_read}), and a later pass that finds the
        same listing skips it."""
        before = dict(counts)
        now = self.container.clock.seconds()
        min_age = self.settings["min_age"]
        recursive = self.settings["recursive"]
        accepts = None if self.filter.accepts_everything else self.filter.accepts
        known = await (known if known is not None else self.store.directory(rel_dir))
        prefix = f"{rel_dir}/" if rel_dir else ""
        room = paths.PATH_MAX_BYTES - len(prefix.encode("utf-8"))
        plain = _PLAIN_NAME.fullmatch
        present = set()
        subdirs = []
        dirs = []
        wanted = []
        listed = unchanged = 0
        for entry in entries:
            listed += 1
            name = entry.get("name") if type(entry) is dict else None
            # The usual name passes every check of _checked at once (see _PLAIN_NAME).
            if type(name) is str and plain(name) and len(name) <= room:
                rel_path = prefix + name
            else:
                if isinstance(name, str) and is_inflight_name(name):
                    counts["skipped_entries"] += 1
                    continue
                rel_path = self._checked(rel_dir, name)
                if rel_path is None:
                    counts["unsafe"] += 1
                    continue
            kind = entry.get("type")
            if kind != "file":
                if kind == "dir":
                    dirs.append(name)
                    if recursive:
                        subdirs.append(rel_path)
                else:
                    counts["skipped_entries"] += 1
                continue
            present.add(name)
            if accepts is not None and not accepts(rel_path):
                counts["rejected"] += 1
                continue
            size, mtime = entry.get("size"), entry.get("mtime")
            if known.get(name) == (size, mtime):
                unchanged += 1
                continue
            if min_age and mtime is not None and now - mtime < min_age:
                counts["young"] += 1
                continue
            wanted.append((name, rel_path, entry))
        counts["listed"] += listed
        counts["unchanged"] += unchanged
        gone = [name for name in known if name not in present]
        if gone:
            if self.settings.announce_removals:
                counts["removed"] += await self._announce_removals([(rel_dir, n) for n in gone])
            await self.store.forget(rel_dir, gone)
        size = self.settings["batch"]
        # A batch's rows are written while the next batch is published: each one only once
        # its own notices are confirmed, the pass on only once all are written.
        recording = []
        try:
            for start in range(0, len(wanted), size):
                if self._stopping:
                    break
                announced, written = await self._announce(rel_dir, wanted[start : start + size])
                counts["announced"] += announced
                if written is not None:
                    recording.append(written)
        finally:
            if recording:
                await defer.gatherResults(recording, consumeErrors=True)
        if digest is not None and not self._stopping:
            added = {key: counts[key] - before[key] for key in counts}
            # Only a listing all of whose files are recorded as listed: one with a file too
            # young or rejected (filters may change) is read again the next time.
            if added["announced"] == len(wanted) and not (added["young"] or added["rejected"]):
                summary = {key: added.get(key, 0) for key in _PAGE_COUNTERS}
                summary["files"] = added["unchanged"] + added["announced"]
                summary["dirs"] = dirs
                await self.store.page_read(rel_dir, digest, summary)
        return subdirs

    def _checked(self, rel_dir, name):
        """The relPath of a listed name, or None (with a warning) when it is unusable."""
        try:
            paths.safe_name(name)
            why = unfetchable(name)
            if why is not None:
                raise paths.UnsafePath(f"unusable name {name!r}: {why}")
            rel_path = f"{rel_dir}/{name}" if rel_dir else name
            paths.safe_relpath(rel_path)
        except paths.UnsafePath as e:
            self.log.warn(
                "poll {name}: skipped a name listed in {url}: {reason}",
                name=self.source,
                url=self._dir_url(rel_dir),
                reason=e,
            )
            return None
        return rel_path

    def notice_for(self, rel_path, entry, now, pub_time=None):
        """The v03 notice fields announcing the listed file C{entry} at C{rel_path}
        (C{pub_time}: C{now} formatted, when the caller has it)."""
        fields = {
            "pubTime": pub_time or format_time(now),
            "baseUrl": self.base_url,
            "relPath": rel_path,
        }
        if entry.get("size") is not None:
            fields["size"] = entry["size"]
        if entry.get("mtime") is not None:
            fields["mtime"] = format_time(entry["mtime"])
        if entry.get("mode") is not None:
            fields["mode"] = f"{entry['mode'] & 0o7777:o}"
        fields["identity"] = dict(COD)
        return fields

    async def _announce(self, rel_dir, batch):
        """Publish a batch of notices (files of one directory), then record the confirmed
        ones; raises PublishFailed after recording them when some were not confirmed. Returns
        how many were, and the Deferred of their recording (None when none was)."""
        now = self.container.clock.seconds()
        pub_time = format_time(now)
        # Until a publish has declared the exchange, each one of the batch declares it.
        declare = None if self._declared else "topic"
        topic = topic_for(batch[0][1])  # the files of one directory share it
        head = notice_head(pub_time, self.base_url)
        stamps = self._stamps
        block_size = self.settings.block_size
        exchange, broker, publish = self.exchange, self.broker, self.publish
        publishing = []
        for _, rel_path, entry in batch:
            body = plain_notice_json(head, rel_path, entry, stamps, block_size)
            if body is None:
                d = defer.Deferred.fromCoroutine(
                    self._publish(rel_path, entry, now, declare, topic, pub_time)
                )
            else:
                d = defer.ensureDeferred(
                    publish(exchange, topic, body, persistent=True, declare=declare,
                            transport=broker)
                )
            publishing.append(d)
        results = await defer.DeferredList(publishing, consumeErrors=True)
        confirmed = [
            (name, entry.get("size"), entry.get("mtime"))
            for (ok, _), (name, _, entry) in zip(results, batch)
            if ok
        ]
        written = None
        if confirmed:
            self._declared = True
            written = self.store.record(rel_dir, confirmed)
        if not all(ok for ok, _ in results) and written is not None:
            await written
        for ok, failure in results:
            if not ok:
                if failure.check(defer.CancelledError):
                    raise defer.CancelledError()
                raise PublishFailed(
                    f"cannot publish to {self.exchange}: {failure.getErrorMessage()}"
                )
        return len(confirmed), written

    async def _announce_removals(self, rows):
        """Announce the files [(directory, name)] announced before and gone now as removed
        (fileOp remove); how many. PublishFailed when one is not confirmed: they stay known,
        and the next pass announces them again."""
        now = self.container.clock.seconds()
        declare = None if self._declared else "topic"
        notices = [
            Notice({"pubTime": format_time(now), "baseUrl": self.base_url,
                    "relPath": f"{rel_dir}/{name}" if rel_dir else name,
                    "fileOp": {"remove": ""}})
            for rel_dir, name in rows
        ]
        results = await defer.DeferredList(
            [
                defer.ensureDeferred(self.publish(
                    self.exchange, n.topic(), n.to_json(), persistent=True, declare=declare
                ))
                for n in notices
            ],
            consumeErrors=True,
        )
        for ok, failure in results:
            if not ok:
                raise PublishFailed(
                    f"cannot publish to {self.exchange}: {failure.getErrorMessage()}"
                )
        return len(notices)

    async def _publish(self, rel_path, entry, now, declare, topic=None, pub_time=None):
        """Announce one listed file: one notice, or with C{block_size} one per block of a
        bigger file whose size the listing gives (each block's identity the file's C{cod}:
        no checksum is known). Raises what the first publish not confirmed raised.
        C{topic}, C{pub_time}: its batch's (one directory's), when the caller has them."""
        fields = self.notice_for(rel_path, entry, now, pub_time)
        step = block_step(fields.get("size"), self.settings.block_size)
        if step is None:
            notice = Notice(fields)
            await self.publish(
                self.exchange, topic or notice.topic(), notice.to_json(), persistent=True,
                declare=declare, transport=self.broker,
            )
            return
        lengths = block_lengths(fields["size"], step)
        notices = [Notice(one) for one in block_notices(fields, step, [(n, None) for n in lengths])]
        topic = notices[0].topic()
        results = await defer.DeferredList(
            [defer.ensureDeferred(self.publish(
                self.exchange, topic, notice.to_json(), persistent=True, declare=declare,
                transport=self.broker,
            )) for notice in notices],
            consumeErrors=True,
        )
        for ok, failure in results:
            if not ok:
                failure.raiseException()


process_class = PollService
