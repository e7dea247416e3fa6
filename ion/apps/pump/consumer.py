"""The consumer: one subscription of the pump, from notices on an exchange to verified files.

A L{Consumer} consumes a durable queue C{q_<user>.consumer.<name>}
(C{q_<user>.<sysname>.consumer.<name>} in a system other than C{ion}:
L{ion.apps.pump.user.own_prefix}) bound to C{exchange} (default C{xpublic}) with the topic
patterns C{topics}. For each message, in this order:

  1. decode and validate the v03 notice. Undecodable: logged and acked. Valid JSON that fails
     validation: a 417 report when the body names its C{source} (on C{xpublic} the pump's ingest
     stamped it); a body over C{max_notice_bytes}: likewise with 413;
  2. a message carrying C{report} is someone's outcome, not an announcement: acked, counted
     (C{reports}), nothing fetched (sr3 takes C{report} out of what it announces);
  3. filter the notice's URL (C{notice.url()}) through the accept/reject rules (first full match
     wins; unmatched URLs are accepted unless C{accept_unmatched} is False); rejected: acked,
     counted, no report. A notice with a C{fileOp} (rename, remove, link, mkdir, rmdir) is
     carried out under C{directory} when C{events} (default all) allows it, else acked and
     counted as C{unsupported}: see L{ion.apps.pump.fileops.AppliesFileOps};
  4. suppress duplicates (L{dup_key}: identity and relPath, or relPath, mtime and size) with a
     cache kept on disk (C{dupcache.py}) for C{dup_ttl} seconds: acked, counted, no report. A
     copy of a notice being fetched now is a duplicate too, but a redelivered one (perhaps
     that fetch's own message, handed out again after a broker restart) waits for the fetch
     to end and is fetched itself if that one did not deliver. With C{discard} (benchmarks)
     the message ends here: its key is remembered (written to the file once per reactor
     turn) and it is acked;
  5. a C{size} over C{max_size}: one 413 report, nothing fetched; place it under C{directory}
     (L{ion.apps.pump.paths}; a C{retrievePath} passes the same rules): a path that could leave
     the tree, one 422 report, nothing touched on disk. Its URL is judged by the policy of
     C{sources} and the notice's C{source} (L{ion.apps.pump.transfer.policy}): refused, a 403
     report, never retried;
  6. fetch the file (L{ion.apps.pump.transfer.worker.Transfers} with the C{transfer} settings),
     verified against the notice's size and checksum, at most C{parallel} at a time (a file
     received whole waits for its commit to disk without its slot, within a bound), each
     given up after C{transfer_timeout} seconds, cut past the announced size or C{max_size}
     (413) or under C{min_rate} (504, retried). Delivered: optional re-announce (sarra mode),
     a 201 report, the key added to the duplicate cache. A transient failure
     (L{ion.apps.pump.outcome}) goes to the on-disk retry queue; a permanent one gets one
     report. The fetch runs in the consumer's own process, not as a call to the C{transfer}
     service, which doubled the broker messages of every delivery; to fetch more at a time,
     run more consumers of the subscription (they share its queue). Directories are made and
     the file written from a descriptor of C{directory} held open (L{DestinationRoot}), never
     through a symbolic link: a link below C{directory}, also one planted during the fetch,
     fails the file with 422.

On start, temporary files (C{.<name>.<random>.inflight}) a killed earlier run left in the tree
are removed in a thread (those being written are kept; recently changed ones looked at later).
With C{retention}, delivered files older than its C{after_days} are archived or removed
(L{ion.apps.pump.retention}); with C{heartbeat}, a heartbeat file is written
(L{ion.apps.pump.heartbeat}); C{byte_rate_max} limits the downloads together
(L{ion.apps.pump.transfer.pacing}). The link's state (L{ion.apps.pump.link}) follows the
fetches' outcomes.

The message is acked only once its outcome is durable, so a crash at any point leaves the
message in the broker or its outcome on disk:

  - delivered: file renamed into place (fsynced) -> re-announce
    confirmed -> report confirmed -> key in the duplicate cache -> ack;
  - transient failure: retry entry fsynced -> ack (the retry queue owns the work from then on);
  - permanent failure and 4xx outcomes: report confirmed -> ack.

A message whose handling fails (a bug, a poison message) is handed back once (on a quorum
queue, C{queue_type}: until returned C{delivery_limit} times); failing again, it goes to the
queue C{<queue>.dead} and its source gets a 500 report (L{ion.core.process.Process.subscribe}).
A failure because the broker connection went is not counted: the message comes back.

A crash after the report but before the ack redelivers the message; the duplicate cache then
says it was delivered and it is acked without a second report. A crash between the report and
the cache write downloads again and reports again under the same C{report_id}, which the report
router drops: each outcome reaches its source once.

Reports are copies of the notice with C{report} {code, timeCompleted, message} and C{report_id},
published persistent and confirmed to C{report_exchange} with the notice's topic. With
C{report_direct} (the pump app sets it for a subscription reporting to its own report router's
exchange on the container's broker, as the router's user), the report of a first delivery (not
redelivered) whose C{source} is a usable name goes instead straight to C{xr_<source>} (declared
topic, durable), with C{report_id} and C{code} headers: one publish, routed by the broker, instead
of a hop through the router. Such reports wait up to C{REPORT_WINDOW} (50 ms) for others and go
together (a stopping consumer publishes those waiting at once); the message waits unacked meanwhile,
as it does for any confirm. Before the first report to a source the router's sent queue
(L{ion.apps.pump.report_router}) is bound to C{xr_<source>}, so the router sees a copy of each such
report in the same routing step, remembers its id, counts and logs it. Every other report (a
redelivered message's, a retry's, a file op's, a dead letter's, an invalid notice's) goes to
C{report_exchange} with a C{maybe_sent} header: the router reads its sent queue up to now before it
decides, and drops a report already there, so a crash between the report and the cache write still
reaches the source once. A report to C{xr_<source>} whose confirm never came (the broker may have
kept it in the sent queue and not at the source) goes to the router again, marked C{unconfirmed},
and is forwarded whatever the sent queue says (at least once); its id is kept in
C{<state_dir>/unconfirmed.jsonl} for C{dup_ttl}, so a consumer killed before the message came back
leaves it to the next one on that directory. Op C{stats} returns the counters. Args:
L{ion.apps.pump.args.ConsumerArgs}, checked before anything starts.
"""

import copy
import hashlib
import json
import os

import attrs
from twisted.internet import defer, threads

from ion.apps.pump import paths
from ion.apps.pump.args import NAME, BadArgument, ConsumerArgs
from ion.apps.pump.completion import run_command
from ion.apps.pump.dupcache import DupCache
from ion.apps.pump.sharedcache import SharedDupCache
from ion.apps.pump.flow import open_flow_broker
from ion.apps.pump.journal import DiskQueue, Journal, json_line
from ion.apps.pump.fileops import AppliesFileOps
from ion.apps.pump.heartbeat import Heartbeat
from ion.apps.pump.link import Link
from ion.apps.pump.notice import (
    REPORT_CODES,
    InvalidNotice,
    Notice,
    format_time,
    parse_time,
)
from ion.apps.pump.outcome import Failure, RecentFailures, classify
from ion.apps.pump.report_router import sent_queue
from ion.apps.pump.retention import Retention
from ion.apps.pump.retryqueue import RetryQueue
from ion.apps.pump.transfer import TransferError
from ion.apps.pump.transfer.blocks import sr3_block
from ion.apps.pump.transfer.inflight import (
    SWEEP_MIN_AGE,
    DestinationRoot,
    sweep,
    sweep_files,
)
from ion.apps.pump.transfer.policy import UrlPolicy, normalize
from ion.apps.pump.transfer.worker import Transfers
from ion.apps.pump.user import own_prefix, pump_user
from ion.core.log import redact
from ion.core.process import (
    ConnectionLost,
    EnvironmentFailure,
    ServiceProcess,
    TransportError,
    returns_of,
)

# A report straight to its source waits up to REPORT_WINDOW seconds for others, or until
# REPORT_BATCH wait (at most half the prefetch, so that held reports never stop deliveries),
# and they are published together in one reactor turn: one write, one fsync and one confirm
# at the broker for all of them, and the router's copies come and are acked together
# (bench/pump.py: the broker's CPU per file about 40% lower).
REPORT_WINDOW = 0.05
REPORT_BATCH = 64

# Fields copied into the report of an oversized message (the rest could be what is too big).
_OVERSIZE_KEEP = ("pubTime", "baseUrl", "relPath", "retrievePath", "source", "size", "mtime")


def check_retrieve_path(notice):
    """UnsafePath unless a notice's retrievePath (its path part, before any ?query) passes the
    relPath rules and the joined URL stays under baseUrl's path once normalized."""
    path = notice.retrieve_path.split("?", 1)[0].split("#", 1)[0]
    paths.safe_relpath(path, allow_leading_slash=True)
    try:
        base, joined = normalize(notice.base_url), normalize(notice.url())
    except ValueError:
        return  # an unusable URL is the policy's to refuse
    if not joined.under(attrs.evolve(base, path=base.path.rstrip("/") + "/")):
        raise paths.UnsafePath(
            f"unsafe retrievePath {notice.retrieve_path!r}: leaves baseUrl's directory"
        )


def dup_key(notice):
    """The duplicate-suppression key of a valid notice: its identity (unless C{cod}, whose value
    names an algorithm) with its relPath, else relPath, mtime and size. The relPath is part of
    the key so that the same bytes announced under two names are delivered twice. A notice
    of one block (sr3's C{blocks}) adds the block's number, the block size and the file's
    mtime: two blocks of equal bytes or length are not copies of each other, nor is an
    unchanged block of a file's new version (its other blocks go to a new part file)."""
    identity = notice.identity
    if identity is not None and identity.get("method") != "cod":
        key = f"{identity['method']}:{identity['value']}\n{notice.rel_path}"
    else:
        key = f"{notice.rel_path}\n{notice.mtime}\n{notice.size}"
    blocks = notice.get("blocks")
    if isinstance(blocks, dict):
        number, size = blocks.get("number"), blocks.get("size")
        if type(number) is int and type(size) is int:
            key += f"\nblock {number} of {size}\n{notice.mtime}"
    return key


def whole_file(notice, result):
    """The notice of a delivered file: C{notice}, or when it named the block that completed a
    file announced in blocks, a copy naming the whole file (no C{blocks}, the file's size,
    its sha512 from C{result} when computed), for what is said of the file downstream (the
    re-announce, the completion trigger's notice, the 201 report)."""
    if "blocks" not in notice:
        return notice
    whole = notice.copy()
    del whole["blocks"]
    whole.size = result.size
    sha512 = result.checksum.get("sha512")
    whole.identity = {"method": "sha512", "value": sha512} if sha512 else None
    return whole


def report_id(subscriber, source, key, code):
    """The stable id of a report: the same outcome of the same notice for the same subscriber
    always has the same id, so the report router can drop repeats."""
    text = "\n".join((subscriber, source or "", key, str(code)))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _fire(result, waiter):
    """Hand C{result} (a value or a Failure) on to C{waiter}, unless it was cancelled."""
    if not waiter.called:
        if isinstance(result, defer.Failure):
            waiter.errback(result)
        else:
            waiter.callback(result)


def make_report(notice, code, message, when):
    """A copy of C{notice} carrying C{report} {code, timeCompleted (C{when}, seconds since the
    epoch), message}."""
    if code in REPORT_CODES:
        return notice.with_report(code, message, when)
    # A transfer code outside the report table (403 refused): reported as it is.
    reported = notice.copy()
    reported["report"] = {
        "code": code,
        "timeCompleted": format_time(when),
        "message": message,
    }
    return reported


# Seconds the keys added to the duplicate cache wait before their lines are written: a
# write per file (one per reactor turn, each turn settling one file) cost the reactor thread
# a system call per file, and waiting for the GIL after it.
DUPCACHE_FLUSH_DELAY = 0.1


class Consumer(AppliesFileOps, ServiceProcess):
    """One subscription: notices in, verified files and reports out (see the module docstring)."""

    service_optional = True  # named by the pump app: its name is a service (ion rpc)
    _siblings = None  # (registry version, the other Consumers then): see instances()
    kind = "consumer"  # the component in its queue's name, q_<user>.<kind>.<name>

    def on_init(self):
        args = self.settings = ConsumerArgs.parse(self.args)
        self.subscription = args.name
        self.label = args.who  # starts its log lines: "consumer <name>" (a sender's: "sender")
        self.filter = args.filter
        self._max_notice_bytes = args.max_notice_bytes
        self.discard = args.discard
        self.directory = os.path.abspath(args.directory) if args.directory else None
        self.mode = args.mode
        self.events = set(args.events)
        self.user = pump_user(self, args.user)
        self.queue = args.queue or f"q_{own_prefix(self, self.user)}{self.kind}.{self.subscription}"
        self.subscriber = f"{self.user}.{self.subscription}"
        self.policy = UrlPolicy(args.sources, own_user=self.user, who=args.who)
        self.state_dir = args.state_dir or os.path.join("var", "pump", self.subscription)
        self.claim_directory(self.state_dir)
        self.broker, self.report_exchange = None, args.report_exchange
        if args.broker:
            self.broker, self.queue = open_flow_broker(
                self, args.broker, self.kind, self.subscription, self.state_dir, args.queue
            )
            self.report_exchange = args.report_exchange or f"xs_{self.broker.user}"
        self._kept_reports = None  # the local report log, once the broker refused a report
        # Reports straight to xr_<source> (see "Reports" in the module docstring): the report
        # router's sent queue, bound to each xr_ exchange before the first report goes there.
        self._copy_queue = None
        if getattr(args, "report_direct", False) and self.broker is None:
            self._copy_queue = sent_queue(self, self.user)
        self._routes = set()  # the xr_ exchanges the copy queue is bound to
        self._first = set()  # keys being handled from a first delivery (not redelivered)
        self._held_reports = []  # direct reports waiting to go together: (publish args, Deferred)
        self._held_call = None
        clock = self.container.clock
        self.real_directory = None
        if self.directory is not None:
            try:
                os.makedirs(self.directory, exist_ok=True)
            except OSError as e:  # read-only, or under a regular file
                raise EnvironmentFailure(
                    f"{args.who}: cannot create directory {args.directory}: {e.strerror or e}"
                ) from None
            # Resolved once: the files go where the directory was when the consumer started.
            self.real_directory = os.path.realpath(self.directory)
        reactor = self.container.reactor
        if args.shared_dir:
            # Instances of one subscription: one cache file that all of them write.
            self.dupcache = SharedDupCache(
                os.path.join(args.shared_dir, "dupcache.jsonl"), args.dup_ttl, clock, reactor
            )
        else:
            self.dupcache = DupCache(
                os.path.join(self.state_dir, "dupcache.jsonl"), args.dup_ttl, clock, reactor
            )
        # Ids of reports whose publish to xr_<source> got no confirm, kept on disk (for dup_ttl):
        # a consumer killed before the message comes back still has the router forward its
        # report whatever the sent queue says (the broker may have kept it there only).
        self._unconfirmed = DupCache(
            os.path.join(self.state_dir, "unconfirmed.jsonl"), args.dup_ttl, clock, reactor
        )
        self.retries = RetryQueue(
            os.path.join(self.state_dir, "retries.jsonl"),
            clock,
            initial=args.retry_initial,
            maximum=args.retry_max,
            horizon=args.retry_horizon,
            jitter=args.retry_jitter,
            reactor=reactor,
        )
        self.stats = {
            "received": 0,
            "accepted": 0,
            "rejected": 0,
            "invalid": 0,
            "duplicates": 0,
            "discarded": 0,
            "unsupported": 0,
            "reports": 0,
            "file_ops": 0,
            "delivered": 0,
            "bytes": 0,
            "retrying": len(self.retries),
            "retried": 0,
            "failures": {},
        }
        self.last_failures = RecentFailures(self.container.clock)  # ion status, the console
        self._labels = (self.name, self.subscription)  # of its metrics
        self.transfers = None
        self.root = None
        if not self.discard:
            self.root = DestinationRoot(self.real_directory, make=True)
            self.transfers = Transfers(self.container.reactor, args.transfer, who=args.who)
        # Directories of the tree seen to be no links: not looked at again per file (the
        # transfers never follow a link below the root: one planted later fails there, 422).
        self._known_dirs = None
        if self.root is not None and self.writes_below_root:
            self._known_dirs = paths.KnownDirectories()
        # Duplicate keys of the messages being fetched -> Deferreds of the redelivered copies
        # waiting for the fetch to be over (_after_holder).
        self._working = {}
        self._block_turns = {}  # destination path -> DeferredLock (see _block_turn)
        self._declared = set()
        self._retry_call = self._flush_call = self._sweep_call = None
        self._stopping = False
        self.link = Link(clock, args.retry_burst, args.retry_burst_gap, args.retry_pause)
        self.heartbeat = None
        if args.heartbeat is not None:
            push = None
            if args.heartbeat_remote:
                push = self._push_heartbeat
                if not self.pushes_heartbeats:
                    raise BadArgument(
                        f"{args.who}: heartbeat_remote is for senders (a consumer's heartbeat "
                        f"is in its state_dir already), got {args.heartbeat_remote!r}"
                    )
            self.heartbeat = Heartbeat(
                clock, reactor,
                reactor.getThreadPool() if self.transfers is None else self.transfers.pool,
                os.path.join(self.state_dir, f"{self.subscription}.heartbeat"),
                args.heartbeat, args.who, self._heartbeat_state, self.log, push,
            )
        self.retention = None
        if args.retention is not None and self.transfers is not None:
            self.retention = Retention(
                clock, reactor, self.transfers.pool, self.real_directory,
                args.retention["after_days"], args.retention["archive"], self.log, args.who,
            )

    async def on_activate(self):
        if self.broker is not None:
            await self.broker.connect()
        await self.subscribe(
            self.settings["exchange"],
            self.settings["topics"],
            self._on_delivery,
            queue=self.queue,
            durable=True,
            prefetch=self.settings["prefetch"],
            queue_type=self.settings["queue_type"],
            delivery_limit=self.settings["delivery_limit"],
            transport=self.broker,
            exchange_type=None if self.broker else "topic",
        )
        self._schedule_retries()
        self._sweep(sweep, self.real_directory)
        if self.retention is not None:
            self.retention.start()
        if self.heartbeat is not None:
            self.heartbeat.start()

    def _sweep(self, function, *args):
        """Remove the temporary files of killed earlier runs, in a pool thread."""
        self._sweep_call = None
        if self.transfers is None or self._stopping:
            return
        sweeping = threads.deferToThreadPool(
            self.container.reactor, self.transfers.pool, function, *args
        )
        sweeping.addCallbacks(self._swept, self._sweep_failed)

    def _swept(self, result):
        removed, young = result
        if removed:
            self.log.info(
                "{name}: removed {n} temporary files left by an earlier run",
                name=self.label,
                n=len(removed),
            )
        if young and not self._stopping:
            # Unlocked but just modified: looked at again once they are old enough to tell.
            self._sweep_call = self.container.clock.callLater(
                SWEEP_MIN_AGE, self._sweep, sweep_files, young, SWEEP_MIN_AGE, self.real_directory
            )

    def _sweep_failed(self, failure):
        self.log.failure(
            "{name}: looking for old temporary files failed",
            failure,
            name=self.label,
        )

    def stop_timeout(self):
        """Messages and retries in hand get C{stop_grace} seconds to finish on terminate."""
        return self.settings["stop_grace"]

    async def terminate(self, timeout=None):
        """Stop the timers (no retry or sweep starts), then stop as every process does:
        messages arriving go back to the queue, those in hand get C{stop_grace} seconds."""
        if not self.lifecycle.final:
            self._stop_timers()
        await super().terminate(timeout)

    async def crash(self, reason):
        if not self.lifecycle.final:
            self._stop_timers()
            self._close_transfers()
            # The stores' queued disk work ends before the state directory is let go: a
            # consumer restarted on it must not see a rewrite of ours land after it opened.
            self._flush_dupcache()
            await self.dupcache.close()
            await self._unconfirmed.close()
            await self.retries.close()
        await super().crash(reason)

    async def on_terminate(self):
        if self._kept_reports is not None:
            await self._kept_reports.close()
        self._flush_dupcache()
        await self.dupcache.close()
        await self._unconfirmed.close()
        await self.retries.close()
        await self._close_transfers()

    def _close_transfers(self):
        if self.root is not None:
            self.root.close()
        transfers, self.transfers = self.transfers, None
        if transfers is None:
            return defer.succeed(None)
        return defer.Deferred.fromCoroutine(transfers.close())

    def _remember(self, key):
        """Add C{key} to the duplicate cache; its line reaches the file at most
        L{DUPCACHE_FLUSH_DELAY} seconds later, with those of the other messages settled
        meanwhile (one write, not one per message). A crash in between loses only what the
        cache is there to save: the message of a lost key is not acked yet, or it is and never
        comes back; redelivered, it is fetched again and its report goes through the report
        router, which drops a repeat. What C{add} returns: a Deferred for a shared cache (in
        its file once it fires)."""
        added = self.dupcache.add(key, flush=False)
        if self._flush_call is None:
            self._flush_call = self.container.reactor.callLater(
                DUPCACHE_FLUSH_DELAY, self._flush_dupcache
            )
        return added

    def _flush_dupcache(self):
        call, self._flush_call = self._flush_call, None
        if call is not None and call.active():
            call.cancel()
        self.dupcache.flush()

    def _stop_timers(self):
        self._stopping = True
        self._publish_held()  # no report waits for a timer any more
        if self.retention is not None:
            self.retention.stop()
        if self.heartbeat is not None:
            self.heartbeat.stop()
        if self._flush_call is not None and self._flush_call.active():
            self.dupcache.flush()
        for call in (self._flush_call, self._retry_call, self._sweep_call):
            if call is not None and call.active():
                call.cancel()
        self._flush_call = self._retry_call = self._sweep_call = None

    async def op_stats(self, content, headers):
        """The counters: received, accepted, rejected, invalid, duplicates, discarded,
        unsupported (fileOps not in events), reports (messages that were reports, not
        announcements: skipped), file_ops (carried out), delivered, bytes,
        retrying, retried, failures {code: n}, in_hand (messages and retries being worked on
        now), bytes_received (by all transfers since the start, delivered or not),
        bytes_in_flight (those of the files being fetched now), queued (messages waiting
        in the subscription's queue on the broker; None when the broker did not say) and
        byte_rate_max (the bandwidth limit, None for none), link, link_since and
        link_next_try (L{Link.describe}) and, with C{heartbeat}, the last heartbeat written."""
        try:
            queued = await self.queue_depth(self.queue, self.broker)
        except Exception as e:
            self.log.debug("{name}: no queue depth: {e}", name=self.label, e=e)
            queued = None
        stats = dict(self.stats)
        stats["failures"] = dict(self.stats["failures"])
        stats["in_hand"] = self.in_hand
        received = None if self.transfers is None else self.transfers.received
        stats["bytes_received"] = 0 if received is None else received.total
        stats["bytes_in_flight"] = 0 if received is None else received.in_flight
        stats["queued"] = queued
        stats["last_failures"] = self.last_failures.as_list()
        stats["byte_rate_max"] = self.settings.transfer.byte_rate_max
        stats.update(self.link.describe())
        if self.heartbeat is not None:
            stats["heartbeat"] = self.heartbeat.last
        running = [] if received is None else received._running
        stats["transfers"] = [
            {"file": redact(sink.what), "received": sink.size,
             "size": sink.expected_size or sink.declared_size}
            | ({"blocks": sink.progress()} if hasattr(sink, "progress") else {})
            for sink in running
        ]
        return stats

    # -- one message ---------------------------------------------------------------------

    def _ack(self, delivery):
        """Settle a message whose outcome is durable (a separate method: tests simulate a
        crash before the ack by overriding it)."""
        delivery.ack()

    async def on_dead_letter(self, delivery, reason):
        """A message that failed on every delivery (a bug, or the broker went away while
        reporting): its source gets a 500 report when the message was a notice naming one."""
        try:
            notice = Notice.from_json(delivery.body, max_bytes=self.settings["max_notice_bytes"])
            notice.validate()
        except InvalidNotice:
            return
        if isinstance(notice.source, str) and notice.source:
            times = returns_of(delivery) + 1
            message = f"failed {times} times, moved to {self.queue}.dead: {reason}"
            await self._fail(notice, dup_key(notice), 500, message, delivery.routing_key)

    def _on_delivery(self, delivery):
        """Settle what needs no waiting (undecodable, filtered, fileOp, duplicate, discarded)
        and return None: most messages, without a coroutine or a Deferred; otherwise return
        the coroutine that finishes the message."""
        self.stats["received"] += 1
        body = delivery.body
        limit = self._max_notice_bytes
        if len(body) > limit:
            return self._refuse_oversized(delivery, limit)
        try:
            notice = Notice.from_json(body, max_bytes=limit)
        except InvalidNotice as e:
            self.stats["invalid"] += 1
            self.log.warn(
                "{name}: undecodable message {key!r} dropped: {reason}",
                name=self.label,
                key=delivery.routing_key,
                reason=e,
            )
            self._ack(delivery)
            return None
        try:
            notice.validate()
        except InvalidNotice as e:
            return self._refuse_invalid(delivery, notice, e)
        if notice.report is not None:
            # Someone's outcome, not an announcement: fetching it would deliver the file
            # again (a flow reading the exchange its own instances report to gets them all).
            self.stats["reports"] += 1
            self._ack(delivery)
            return None
        url = notice.url()
        if not self.filter.accepts(url):
            # Counted, not logged (as sr3 without logReject): a line per message, even one
            # filtered out at debug, cost a tenth of the consumer's work per message.
            self.stats["rejected"] += 1
            self._ack(delivery)
            return None
        self.stats["accepted"] += 1
        if notice.file_op is not None and not self.discard:
            return self._file_op(delivery, notice, url)
        key = dup_key(notice)
        others = self.instances()
        if delivery.redelivered and self._holder(key, others) is not None:
            return self._after_holder(delivery, notice, url, key)
        # A copy arriving while the first is still being fetched is a duplicate too: the first
        # one's message stays unacked until its outcome is durable. (Unless the copy is that
        # message, handed out again after the connection it came on went: see _after_holder.)
        if self._known(key, others):
            self.stats["duplicates"] += 1
            self._ack(delivery)
            return None
        if self.discard:
            # Written out once per reactor turn rather than once per message.
            added = self._remember(key)
            if added is not None:  # a shared cache: a failed turn is logged there
                added.addErrback(lambda _: None)
            self.stats["discarded"] += 1
            self._ack(delivery)
            return None
        self._working[key] = []
        # A redelivered message may have been delivered by another instance that died before
        # its ack: its key is then in the shared cache, which is read again first.
        shared = delivery.redelivered and getattr(self.dupcache, "shared", False)
        return self._deliver_new(delivery, notice, url, key, shared)

    def _holder(self, key, others):
        """The instance (this one or another of C{others}) fetching C{key} now, or None."""
        if key in self._working:
            return self
        for other in others:
            if key in getattr(other, "_working", ()):
                return other
        return None

    async def _after_holder(self, delivery, notice, url, key):
        """A redelivered copy of a notice an instance is fetching now: decided once that
        fetch is over. The copy may be the very message of that fetch, handed out again when
        the connection it came on went (a broker restart): acked at once as a duplicate, it
        would leave nothing to try again with if that fetch then failed (its report unpublished
        on the lost connection, say), and the file would never be reported."""
        while True:
            others = self.instances()
            holder = self._holder(key, others)
            if holder is None:
                break
            waiter = defer.Deferred()
            holder._working[key].append(waiter)
            await waiter
        if self._known(key, others):
            self.stats["duplicates"] += 1
            self._ack(delivery)
            return
        self._working[key] = []
        shared = getattr(self.dupcache, "shared", False)
        await self._deliver_new(delivery, notice, url, key, shared)

    def _known(self, key, others):
        """Whether this instance or one of C{others} L{knows} C{key}."""
        return self.knows(key) or any(other.knows(key) for other in others)

    def knows(self, key):
        """Whether this instance delivered C{key} (within C{dup_ttl}), is fetching it now or
        will retry it."""
        return key in self.dupcache or key in self._working or self.retries.has_key(key)

    def instances(self):
        """The other running instances of this subscription in this container: consumers of
        the same queue on the same broker. A copy of a notice one of them holds is a
        duplicate here too: on MQTT a shared subscription may hand one message to two of
        them (a session taken over, or ended with the message unacknowledged)."""
        registry = self.container.registry
        version = getattr(registry, "version", None)
        cached = self._siblings
        if version is None or cached is None or cached[0] != version:
            # The other consumers, scanned for again only when a process was added or
            # removed (this is asked for each new message). Which queue one reads is known
            # once it started, which may be after it joined the registry: told below.
            cached = self._siblings = (version, [
                proc for proc in registry if proc is not self and isinstance(proc, Consumer)
            ])
        if not cached[1]:
            return []
        mine = (self.settings.broker, self.queue)
        return [
            proc for proc in cached[1]
            if not proc.lifecycle.final and hasattr(proc, "retries")
            and (proc.settings.broker, proc.queue) == mine
        ]

    async def _deliver_new(self, delivery, notice, url, key, refresh=False):
        if not delivery.redelivered:
            self._first.add(key)
        try:
            if refresh:
                await self.dupcache.refresh()
                if key in self.dupcache:
                    self.stats["duplicates"] += 1
                    self._ack(delivery)
                    return
            await self._deliver(delivery, notice, url, key)
        finally:
            # Redelivered copies waiting for this fetch decide now (see _after_holder).
            for waiter in self._working.pop(key, ()):
                if not waiter.called:
                    waiter.callback(None)
            self._first.discard(key)

    async def _deliver(self, delivery, notice, url, key):
        max_size = self.settings["max_size"]
        if max_size is not None and notice.size is not None and notice.size > max_size:
            message = f"announced size {notice.size} bytes is over max_size {max_size}"
            self.log.warn(
                "{name}: {url} refused: {message}",
                name=self.label,
                url=url,
                message=message,
            )
            await self._fail(notice, key, 413, message, delivery.routing_key)
            failure = None
        else:
            failure = await self._attempt(notice, url, key, delivery.routing_key)
        if failure is None:
            pass
        elif failure.transient:
            await self.retries.add(
                key, notice.to_dict(), delivery.routing_key, failure.code, failure.message,
                due=self._retry_due(failure),
            )
            self.stats["retrying"] = len(self.retries)
            self.log.info(
                "{name}: {url} failed ({code} {message}); will retry",
                name=self.label,
                url=url,
                code=failure.code,
                message=failure.message,
            )
            self._schedule_retries()
        else:
            if failure.code == 403:
                self._refused(url, failure.code, failure.message)
            await self._fail(notice, key, failure.code, failure.message, delivery.routing_key)
        self._ack(delivery)

    async def _attempt(self, notice, url, key, routing_key):
        """Place, judge and fetch a notice's file: None once it is delivered or refused
        (reported), else the outcome.Failure of the fetch."""
        try:
            path = self.destination_for(notice)
        except paths.UnsafePath as e:
            self.log.warn("{name}: {reason}", name=self.label, reason=e)
            await self._fail(notice, key, 422, str(e), routing_key)
            return None
        try:
            access = self.policy.judge(url, notice.source)
        except TransferError as e:
            self._refused(url, e.code, e.message)
            await self._fail(notice, key, e.code, e.message, routing_key)
            return None
        result, failure = await self._fetch(notice, url, path, access)
        self._note_link(failure)
        if failure is None and not result.complete:
            await self._block_in(notice, key, path, result)
        elif failure is None:
            notice = whole_file(notice, result)
            await self._delivered(notice, key, path, result)
            on_complete = getattr(self.settings, "on_complete", None)
            if on_complete is not None and on_complete.applies(result):
                await self._on_complete(on_complete, notice, key, path, routing_key)
        return failure

    def _note_link(self, failure):
        """The link's state follows the outcome of each fetch (a sender's follows its sends)."""
        self.link.note(failure)

    def _retry_due(self, failure):
        """When a file that failed transiently is due again: None for the retry queue's
        backoff (a sender's link that is down says otherwise: L{ion.apps.pump.link})."""
        return None

    # Whether heartbeat_remote is possible (a sender's destination is remote).
    pushes_heartbeats = False
    # Whether the files of destination_for are written through self.root (never following a
    # link below it): then a directory on the way is looked at once, not per file.
    writes_below_root = True

    def _heartbeat_state(self):
        failures = sum(self.stats["failures"].values())
        return dict(
            {"files_done": self.stats["delivered"], "failures": failures}, **self.link.describe()
        )

    async def _push_heartbeat(self, path):
        raise NotImplementedError("a consumer's heartbeat stays in its state_dir")

    def _refused(self, url, code, message):
        self.log.warn(
            "{name}: {url} refused ({code} {message})",
            name=self.label,
            url=redact(url),
            code=code,
            message=message,
        )

    def destination_for(self, notice):
        """The checked local path for a notice's file (raises paths.UnsafePath). A
        retrievePath, which names the file at the source, passes the same path rules as a
        relPath (a leading C{/} allowed: it is relative to baseUrl all the same)."""
        if notice.retrieve_path:
            check_retrieve_path(notice)
        return paths.destination(
            self.directory, notice, self.mode, real_root=self.real_directory,
            known_dirs=self._known_dirs,
        )

    async def _fetch(self, notice, url, path, access=None):
        """(TransferResult, None) when the file is in place, else (None, outcome.Failure).
        C{access}: what the URL policy allows the notice (see L{UrlPolicy.judge})."""
        options = {} if access is None else {"access": access}
        if notice.size is not None:
            options["expected_size"] = notice.size
        identity = notice.identity
        if identity is not None:
            method = identity.get("method")
            if method == "cod":
                options["cod"] = identity["value"]
            elif method in ("sha512", "md5"):
                options["expected_checksum"] = (method, identity["value"])
        if notice.mtime is not None:
            options["mtime"] = parse_time(notice.mtime)
        if notice.mode is not None:
            options["mode"] = int(notice.mode, 8)
        # The directories of `path` are made by the transfer, from the root's descriptor.
        options["dest_root"] = self.root
        blocks = getattr(self.settings, "blocks", None)
        if blocks is not None:
            options["blocks"] = blocks
        turn = None
        try:
            if "blocks" in notice:
                # One block of a file sr3 announced in blocks: its size and identity are the
                # block's.
                options["block"] = sr3_block(notice["blocks"], notice.size)
                options.pop("cod", None)
                waiting = self._block_turn(path)
                await waiting.acquire()
                turn = waiting
            fetching = defer.Deferred.fromCoroutine(self._get(url, path, options))
            fetching.addTimeout(self.settings["transfer_timeout"], self.container.clock)
            started = self.container.clock.seconds()
            result = await fetching
            self.container.metrics.transfer_duration.observe(
                self._labels, self.container.clock.seconds() - started)
            return result, None
        except defer.TimeoutError:
            timeout = self.settings["transfer_timeout"]
            return None, Failure(504, f"transfer not done after {timeout} s")
        except Exception as e:
            return None, classify(e)
        finally:
            if turn is not None:
                turn.release()
                if not turn.locked and not turn.waiting:
                    del self._block_turns[path]

    def _block_turn(self, path):
        """The lock the notices of one file's blocks take in turn: each block is written
        into the file's one part file, which a transfer holds under an exclusive lock while
        it writes (L{ion.apps.pump.transfer.blocks.PartialFile}); blocks arriving together
        would otherwise fail all but one (503) and wait out the retry queue's backoff."""
        turn = self._block_turns.get(path)
        if turn is None:
            turn = self._block_turns[path] = defer.DeferredLock()
        return turn

    async def _get(self, url, path, options):
        """One transfer (a separate method: tests make transfers fail by overriding it)."""
        if self.transfers is None:
            raise TransferError("the consumer is stopping", code=503)
        return await self.transfers.get(url, path, **options)

    async def _delivered(self, notice, key, path, result):
        if self.settings["reannounce"] is not None:
            await self._reannounce(notice, path, result)
        size = result.size
        await self._report(notice, key, 201, f"delivered ({size} bytes)")
        added = self._remember(key)
        if added is not None:  # a shared cache: in its file before the message is acked
            await added
        self.stats["delivered"] += 1
        self.stats["bytes"] += size
        self.container.metrics.delivered.inc(self._labels)
        self.container.metrics.bytes.inc(self._labels, size)
        # A line per file at debug: at info it cost more than the broker's work per file, and
        # the progress process sums the deliveries up at info every interval.
        self.log.debug(
            "{name}: delivered {path} ({size} bytes)",
            name=self.label,
            path=path,
            size=size,
        )

    async def _block_in(self, notice, key, path, result):
        """One block of an sr3 block notice is in, not yet the whole file: a 206 report."""
        await self._report(notice, key, 206, f"block in ({result.size} bytes)")
        self._remember(key)
        self.log.info("{name}: {path}: a block is in ({size} bytes)", name=self.label,
                      path=path, size=result.size)

    async def _on_complete(self, on_complete, notice, key, path, routing_key):
        """The completion trigger (L{ion.apps.pump.completion}): the notice to
        C{complete_exchange}, then the command; a failed command is a 500 report."""
        if on_complete.complete_exchange is not None:
            done = notice.copy()
            done.report = None
            await self._publish(on_complete.complete_exchange, done.topic(), done.to_json())
        if on_complete.command is None:
            return
        outcome = await run_command(
            self.container.reactor, on_complete.command, path, on_complete.timeout
        )
        program = on_complete.command[0]
        if outcome.ok:
            self.log.info("{name}: on_complete {program} {path}: exited 0", name=self.label,
                          program=program, path=path)
            return
        message = f"on_complete {program} {outcome.describe()}"
        self.log.warn("{name}: {path}: {message}", name=self.label, path=path, message=message)
        await self._fail(notice, key, 500, message, routing_key)

    async def _fail(self, notice, key, code, message, routing_key=None):
        failures = self.stats["failures"]
        failures[str(code)] = failures.get(str(code), 0) + 1
        self.container.metrics.failed.inc((*self._labels, str(code)))
        self.last_failures.add(code, message, notice.rel_path)
        await self._report(notice, key, code, message, routing_key)

    # -- reports and re-announcements ----------------------------------------------------

    async def _publish(self, exchange, routing_key, body, headers=None):
        declare = None
        if exchange not in self._declared:
            declare = "topic"
        await self.publish(exchange, routing_key, body, headers=headers, declare=declare)
        self._declared.add(exchange)

    async def _report(self, notice, key, code, message, routing_key=None):
        """Publish a report (confirmed) for C{notice}; the routing key is the notice's topic,
        or C{routing_key} when it has no usable relPath."""
        reported = make_report(notice, code, message, self.container.clock.seconds())
        rid = reported["report_id"] = report_id(self.subscriber, notice.source, key, code)
        try:
            topic = notice.topic()
        except (InvalidNotice, ValueError):
            topic = routing_key or "v03"
        if self._copy_queue is not None:
            source = notice.source
            if (
                key in self._first
                and rid not in self._unconfirmed
                and isinstance(source, str)
                and NAME.fullmatch(source)
            ):
                await self._report_direct(source, topic, reported, rid)
                return
            # Perhaps reported before (a redelivery, a retry): the router decides.
            headers = {"report_id": rid, "maybe_sent": True}
            if rid in self._unconfirmed:
                headers["unconfirmed"] = True
            await self._publish(self.report_exchange, topic, reported.to_json(), headers)
        elif self.broker is None:
            await self._publish(self.report_exchange, topic, reported.to_json())
        elif self._kept_reports is None:
            try:
                await self.publish(self.report_exchange, topic, reported.to_json(),
                                   transport=self.broker)
                return
            except ConnectionLost:
                raise  # the message is not acked: it comes back
            except TransportError as e:
                self._keep_reports(e)
        if self._kept_reports is not None:
            self._kept_reports.append(json_line(reported.to_dict()))
            await self._kept_reports.sync()

    async def _report_direct(self, source, topic, reported, rid):
        """Publish a report (confirmed) to C{xr_<source>}, the router's sent queue bound there
        first, so that the router knows of it."""
        exchange = f"xr_{source}"
        if exchange not in self._routes:
            await self.bind(self._copy_queue, exchange, "#")
            self._routes.add(exchange)
        # The code: the router counts the report by it without reading the body.
        headers = {"report_id": rid, "direct": self._copy_queue, "code": reported.report["code"]}
        try:
            await self._publish_soon(exchange, topic, reported.to_json(), headers)
        except Exception:
            # The broker may have kept it in some queues and not in others: when the notice
            # comes back, the router forwards its report whatever its sent queue says.
            self._unconfirmed.add(rid)
            raise

    def _publish_soon(self, exchange, routing_key, body, headers):
        """Publish with the other direct reports of the next C{REPORT_WINDOW} seconds (see
        there); a Deferred fired once the broker confirmed this one. The message stays unacked
        meanwhile, so a crash before the publish only means a report through the router."""
        waiter = defer.Deferred()
        self._held_reports.append(((exchange, routing_key, body, headers), waiter))
        batch = min(REPORT_BATCH, max(1, self.settings["prefetch"] // 2))
        if len(self._held_reports) >= batch or self._stopping:
            self._publish_held()
        elif self._held_call is None:
            self._held_call = self.container.reactor.callLater(REPORT_WINDOW, self._publish_held)
        return waiter

    def _publish_held(self):
        """Publish the direct reports waiting, all in this reactor turn."""
        call, self._held_call = self._held_call, None
        if call is not None and call.active():
            call.cancel()
        held, self._held_reports = self._held_reports, []
        for (exchange, routing_key, body, headers), waiter in held:
            published = defer.ensureDeferred(
                self.publish(exchange, routing_key, body, headers=headers)
            )
            published.addBoth(_fire, waiter)

    def _keep_reports(self, error):
        """The broker refused a report: this one and the next go to the local report log."""
        if self._kept_reports is not None:
            return  # refused too while the first refusal was on its way
        path = os.path.join(self.state_dir, "reports.jsonl")
        self._kept_reports = Journal(path, DiskQueue(self.container.reactor))
        self._kept_reports.open_for_append()
        self.log.warn(
            "{name}: reports cannot go to {exchange} ({error}); they are kept in {path}",
            name=self.label, exchange=self.report_exchange, error=error, path=path,
        )

    async def _reannounce(self, notice, path, result):
        """Announce the delivered file downstream with our own baseUrl (sarra mode)."""
        target = self.settings["reannounce"]
        rel_path = os.path.relpath(path, self.real_directory).replace(os.sep, "/")
        announced = notice.copy()
        announced.base_url = target["base_url"]
        announced.rel_path = rel_path
        announced.retrieve_path = None
        announced.report = None
        identity = notice.identity
        sha512 = result.checksum.get("sha512")
        if (identity is None or identity.get("method") == "cod") and sha512:
            announced.identity = {"method": "sha512", "value": sha512}
        await self._publish(target["exchange"], announced.topic(), announced.to_json())

    async def _refuse_invalid(self, delivery, notice, error):
        what = f"invalid notice {delivery.routing_key!r} ({error})"
        await self._refuse(delivery, notice, 417, f"invalid notice: {error}", what)

    async def _refuse_oversized(self, delivery, limit):
        size = len(delivery.body)
        fields = None
        # The bytes are in memory already; decoding them once finds whom to tell.
        try:
            fields = json.loads(delivery.body)
        except (ValueError, RecursionError):
            pass
        if not isinstance(fields, dict):
            fields = {}
        kept = {
            k: fields[k]
            for k in _OVERSIZE_KEEP
            if k in fields and len(json.dumps(fields[k])) <= 4096
        }
        message = f"message of {size} bytes is over the limit of {limit}"
        what = f"message {delivery.routing_key!r} of {size} bytes is over the limit of {limit}"
        await self._refuse(delivery, Notice(kept), 413, message, what)

    async def _refuse(self, delivery, notice, code, message, what):
        """Count, log and ack a message refused as it is; its source, when the notice names
        one, gets a C{code} report."""
        self.stats["invalid"] += 1
        source = notice.source
        known = isinstance(source, str) and source
        self.log.warn(
            "{name}: {what}{told}",
            name=self.label,
            what=what,
            told=" (reported to its source)" if known else "; no source to report to",
        )
        if known:
            key = hashlib.sha256(delivery.body).hexdigest()
            await self._fail(notice, key, code, message, delivery.routing_key)
        self._ack(delivery)

    # -- retries -------------------------------------------------------------------------

    def _schedule_retries(self):
        """Make sure a timer fires when the earliest retry entry is due."""
        if self._stopping:
            return
        due = self.retries.next_due()
        call = self._retry_call
        if call is not None and call.active():
            if due is not None and call.getTime() <= due:
                return
            call.cancel()
        self._retry_call = None
        if due is not None:
            clock = self.container.clock
            self._retry_call = clock.callLater(max(0, due - clock.seconds()), self._run_retries)

    def _run_retries(self):
        self._retry_call = None
        if self._stopping:
            return
        for entry in self.retries.pop_due():
            self.track(self._retry(entry))
        self._schedule_retries()

    async def _retry(self, entry):
        self.stats["retried"] += 1
        try:
            await self._try_again(entry)
        except Exception as e:
            self.log.failure(
                "{name}: retrying {path!r} failed", name=self.label, path=entry.key
            )
            if not self.retries.failed_again(entry, 500, f"{type(e).__name__}: {e}"):
                self.retries.done(entry)
        finally:
            self.stats["retrying"] = len(self.retries)
            self._schedule_retries()

    async def _try_again(self, entry):
        if entry.key in self.dupcache or any(
            entry.key in other.dupcache for other in self.instances()
        ):
            self.retries.done(entry)
            return
        notice = Notice(copy.deepcopy(entry.body))
        if notice.file_op is not None:
            outcome = await self._carry_out(notice, entry.key, entry.routing_key, entry)
            if outcome == "settled":
                self.retries.done(entry)
            if outcome is not None:
                return
            notice.file_op = None  # the old file is missing: the new one is fetched below
        url = notice.url()
        failure = await self._attempt(notice, url, entry.key, entry.routing_key)
        if failure is None:
            self.retries.done(entry)
            return
        if failure.transient and self.retries.failed_again(
            entry, failure.code, failure.message, due=self._retry_due(failure)
        ):
            # While a link is down its files all wait for it: one line per try would flood.
            log = self.log.debug if self.link.state == "down" else self.log.info
            log(
                "{name}: {url} failed again ({code} {message}); attempt {n}",
                name=self.label,
                url=url,
                code=failure.code,
                message=failure.message,
                n=entry.attempts,
            )
            return
        why = "gave up after the retry horizon" if failure.transient else "failed"
        self.log.warn(
            "{name}: {url} {why}: {code} {message}",
            name=self.label,
            url=url,
            why=why,
            code=failure.code,
            message=failure.message,
        )
        await self._fail(notice, entry.key, failure.code, failure.message, entry.routing_key)
        self.retries.done(entry)
        await self._given_up(notice, url)

    async def _given_up(self, notice, url):
        """The file of C{notice} is given up for good: no attempt follows (a sender removes
        what its puts in blocks left at the destination)."""


process_class = Consumer
