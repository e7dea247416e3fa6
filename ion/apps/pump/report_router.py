"""The report router: every report goes back to the source that published the data, and only
to it.

L{ReportRouter} consumes C{exchange} (default C{xreport}) with C{#} from the durable queue
C{q_<exchange>.report_router} (C{q_xreport.report_router}), which every report router on the
broker shares, whoever its user and whatever its system: each report goes to one of them, so
it is routed once however many pumps run (creating it takes the configure permission on it,
which the feeder role has). For each report:

  - a body that is not a JSON object with a C{report} {code: int, ...}: logged, acked, counted
    as C{invalid} (reports of invalid notices carry little else, so nothing more is required);
  - no usable C{source} (a name of letters, digits, C{_}, C{-}, C{.}): logged, acked, counted as
    C{unroutable}. The source is the body's C{source} field: on C{xpublic} the pump's ingest stamped
    it from the broker-validated publisher (L{ion.apps.pump.ingest.source_of}), so a report
    cannot be sent to someone else by a body that lies;
  - a C{report_id} forwarded before (within C{dup_ttl} seconds, remembered on disk in
    C{<state_dir>/report_ids.jsonl} across restarts): acked, counted as C{duplicates};
  - otherwise published, persistent and confirmed, to C{xr_<source>} (declared topic, durable) with
    the routing key it came with and a C{report_id} header, then its id remembered, then acked.
    Counted per source and code.

A report whose routing fails (the broker went away) goes back to the queue once; failing
again, it goes to C{q_<exchange>.report_router.dead} (L{ion.core.process.Process.subscribe}).

With C{log_path}, each report handled is also written to that file as one JSON line
{time, source, code, routing_key, relPath, report_id, message, outcome}, in ASCII (other
characters, unencodable ones included, as JSON escapes). Once it holds C{log_max_bytes}
(default 64 MiB) it is renamed C{<log_path>.1} (the older ones shifted up to
C{<log_path>.<log_keep>}, default 4, the oldest dropped) and a new one started, so a pump
running for months keeps at most C{(log_keep + 1) * log_max_bytes} of it.

Exactly once across crashes. The order (publish, remember, ack) leaves one gap: a crash after
the broker took the publish but before the id was written down. The broker's own record closes
it: the router's own durable queue C{q_<user>.report_router.sent} (C{q_<user>.<sysname>....} in
a system other than C{ion}: L{ion.apps.pump.user.own_prefix}) is bound (C{#}) to every C{xr_}
exchange the router publishes to, so each forwarded report lands there too, in the same
routing step as at the source's queues. The router consumes that queue and remembers the
C{report_id} header of whatever it finds. A report that comes back redelivered with an id not
remembered may be such a case: the router then publishes a marker to its
C{x_<user>.report_router.sent} (also bound to that queue) and waits until the marker comes
through, by which time every copy the broker took earlier has been read and remembered, and
only then decides. Reports without a C{report_id} are forwarded at least once.

Reports that skip the hop. A subscription of the pump app publishes the report of a first
delivery straight to C{xr_<source>} (L{ion.apps.pump.consumer}, C{report_direct}), having
bound this router's sent queue there first: the router reads the copy there, remembers its id,
counts it as forwarded and logs it (a copy carrying a C{direct} header naming this sent queue;
copies naming another router's are only remembered). The reports of that subscription that
may repeat one (a redelivered message's, a retry's) come through C{xreport} with a
C{maybe_sent} header, and are read like a redelivered report: after a marker, so a copy the
consumer published before it crashed is known first. One marked C{unconfirmed} (the
consumer's publish to C{xr_<source>} got no confirm) is forwarded whatever the sent queue
holds.

Several routers on one queue. Each sent queue is bound to every C{xr_} exchange its router
has published to, so it also gets the forwards of the other routers to those sources: a
router knows their ids too, and drops a report another router forwarded. One gap remains: a
report redelivered to a router that has never forwarded to its source, after another router
forwarded it and crashed before acking, is forwarded again (with the same C{report_id}).

A broker crash is the other gap: RabbitMQ keeps an unconfirmed message in some of the queues it
was routed to and not in others, so the sent queue's copy of a forward that was never confirmed
does not prove the source has it. So the copy of a forward of this run is held unacked until
the forward's confirm (then the id is written down and the copy acked), and a forward that
failed unconfirmed is forwarded again when its report comes back, whatever the sent queue says:
across a broker crash a source may receive a report again, with the same C{report_id} (at
least once, never lost). The ids of such forwards are written down as the failure is known
(C{<state_dir>/unsure_ids.jsonl}, for C{dup_ttl}): a router killed after the broker came back
and before the report did leaves them to the next one. A broker and a router dying at the same
instant (the power of a machine running both) is not covered: the router never learns that its
forward failed.
"""

import json
import os
import uuid

from twisted.internet import defer

from ion.apps.pump.args import NAME, ReportRouterArgs
from ion.apps.pump.dupcache import DupCache
from ion.apps.pump.user import own_prefix, pump_user
from ion.core.process import ServiceProcess

# How long a redelivered report waits for the marker before it is forwarded anyway.
CATCH_UP_TIMEOUT = 30


class ReportRouter(ServiceProcess):
    """Routes reports from C{xreport} to C{xr_<source>} (see the module docstring)."""

    service_optional = True  # named by the pump app: its name is a service (ion rpc)

    def on_init(self):
        self.settings = ReportRouterArgs.parse(self.args)
        self.user = pump_user(self, self.settings["user"])
        # One queue for every router on the broker reading this exchange: each report is
        # routed once, however many pumps run. The bookkeeping is each router's own.
        self.queue = f"q_{self.settings['exchange']}.report_router"
        own = own_prefix(self, self.user)
        self.sent_queue = sent_queue(self, self.user)
        self.marker_exchange = f"x_{own}report_router.sent"
        state_dir = self.settings["state_dir"] or os.path.join("var", "pump", "report_router")
        self.claim_directory(state_dir)
        self.seen = DupCache(
            os.path.join(state_dir, "report_ids.jsonl"),
            self.settings["dup_ttl"],
            self.container.clock,
            self.container.reactor,
        )
        self._log_file = None
        if self.settings["log_path"]:
            directory = os.path.dirname(self.settings["log_path"])
            if directory:
                os.makedirs(directory, exist_ok=True)
            self._log_file = open(self.settings["log_path"], "a", encoding="utf-8")
        self._declared = set()
        self._routing = {}  # report id being forwarded -> Deferreds of its later copies
        # Ids whose forward failed unconfirmed (the connection went): the broker may or may not
        # have kept it at the source, so a copy seen on the sent queue proves nothing. On disk:
        # a router killed before the report came back leaves them to the next one.
        self._unsure = DupCache(
            os.path.join(state_dir, "unsure_ids.jsonl"),
            self.settings["dup_ttl"],
            self.container.clock,
            self.container.reactor,
        )
        self._held = {}  # report id being forwarded -> its copies from the sent queue, unacked
        self._markers = {}  # marker published -> Deferred fired when it comes back
        # Copies read from the sent queue this reactor turn, to ack, each with how to log it
        # (None: not at all) once its id is written down.
        self._copies = []
        self._settle_call = None
        counters = ("received", "forwarded", "duplicates", "unroutable", "invalid")
        self.stats = dict(dict.fromkeys(counters, 0), by_source={})

    async def on_activate(self):
        # What the broker took from earlier runs is read first (see the module docstring).
        await self.subscribe(
            self.marker_exchange,
            ["#"],
            self._on_sent,
            queue=self.sent_queue,
            durable=True,
            prefetch=self.settings["prefetch"],
        )
        await self.subscribe(
            self.settings["exchange"],
            ["#"],
            self._on_delivery,
            queue=self.queue,
            durable=True,
            prefetch=self.settings["prefetch"],
        )

    async def on_terminate(self):
        self._settle_copies()  # logs what it settles: before the log closes
        if self._log_file is not None:
            self._log_file.close()
        await self.seen.close()
        await self._unsure.close()

    def op_stats(self, content, headers):
        """Counters: received, forwarded, duplicates, unroutable, invalid, and
        by_source {source: {code: n}} for the reports forwarded."""
        stats = dict(self.stats)
        stats["by_source"] = {s: dict(codes) for s, codes in self.stats["by_source"].items()}
        return stats

    async def _on_delivery(self, delivery):
        self.stats["received"] += 1
        fields, code = _parse_report(delivery.body)
        if code is None:
            self.stats["invalid"] += 1
            self.log.warn(
                "report router: not a report (a JSON object with report.code), key {key!r}; "
                "dropped",
                key=delivery.routing_key,
            )
            delivery.ack()
            return
        source = fields.get("source")
        if not isinstance(source, str) or not NAME.fullmatch(source):
            self.stats["unroutable"] += 1
            self.log.warn(
                "report router: report {code} for {path!r} has no usable source ({source!r}); "
                "dropped",
                code=code,
                path=fields.get("relPath"),
                source=source,
            )
            self._write_log(fields, delivery, None, code, "unroutable")
            delivery.ack()
            return
        rid = fields.get("report_id")
        if not isinstance(rid, str):
            rid = None
        headers = delivery.properties.headers or {}
        # A consumer's report to xr_<source> that got no confirm: forwarded whatever the sent
        # queue says (the broker may have kept it there and not at the source).
        forced = rid is not None and headers.get("unconfirmed") is True
        if forced:
            self._unsure.add(rid)
        if (
            rid is not None
            and (delivery.redelivered or headers.get("maybe_sent") is True)
            and rid not in self.seen
            and rid not in self._unsure
        ):
            # Perhaps forwarded by a run that did not live to write the id down.
            await self._catch_up()
        # The same id may arrive again while its first copy waits for the broker's confirm.
        while rid is not None and rid in self._routing:
            waiter = defer.Deferred()
            self._routing[rid].append(waiter)
            await waiter
        if rid is not None and rid in self.seen and not forced:
            self.stats["duplicates"] += 1
            self.log.info(
                "report router: report {rid} already forwarded to {source}; dropped",
                rid=rid,
                source=source,
            )
            self._write_log(fields, delivery, source, code, "duplicate")
            delivery.ack()
            return
        exchange = f"xr_{source}"
        if rid is not None:
            self._routing[rid] = []
        try:
            if exchange not in self._declared:
                await self._declare_route(exchange)
            headers = {"report_id": rid} if rid is not None else None
            try:
                await self.publish(exchange, delivery.routing_key, delivery.body, headers=headers)
            except Exception:
                if rid is not None:
                    self._unsure.add(rid)
                raise
            # Still in _unsure, which no longer matters: what is in seen is decided by seen.
            if rid is not None and rid not in self.seen:
                self.seen.add(rid)
            self.stats["forwarded"] += 1
            codes = self.stats["by_source"].setdefault(source, {})
            codes[str(code)] = codes.get(str(code), 0) + 1
            self._write_log(fields, delivery, source, code, "forwarded")
            delivery.ack()
        finally:
            if rid is not None:
                for held in self._held.pop(rid, ()):
                    try:
                        held.ack()
                    except Exception:
                        pass  # the connection went: the copy comes back, rid is unsure
                # Later copies are looked at once this one is done with (and logged first).
                for waiter in self._routing.pop(rid):
                    waiter.callback(None)

    async def _declare_route(self, exchange):
        """Declare a source's exchange and bind the sent queue to it, before the first report
        goes there (a binding, not another subscription: the sent queue keeps one consumer,
        and its order)."""
        await self.bind(self.sent_queue, exchange, "#")
        self._declared.add(exchange)

    def _on_sent(self, delivery):
        """A copy of a report the broker took from us or from one of our consumers (or a
        marker): remember its id."""
        headers = delivery.properties.headers or {}
        rid = headers.get("report_id")
        if isinstance(rid, str) and rid in self._routing:
            # Our forward waiting for its confirm: settled with it (see _on_delivery). Acked now, a
            # crash before the confirm would lose both the copy and the id.
            self._held.setdefault(rid, []).append(delivery)
            return
        # A copy of a forward whose confirm never came (the connection went) is no proof that
        # the source has it: the broker persists queue by queue.
        outcome = None
        if isinstance(rid, str) and rid not in self.seen and rid not in self._unsure:
            # Written down with the other ids of this reactor turn, then logged and acked
            # (_settle_copies): a run killed in between reads the copy again and logs it then,
            # never twice.
            self.seen.add(rid, flush=False)
            if headers.get("direct") == self.sent_queue:
                outcome = "forwarded"
        elif delivery.redelivered and headers.get("direct") == self.sent_queue:
            # Perhaps not logged: the run that remembered its id may have died just then.
            outcome = "duplicate"
        self._copies.append((delivery, outcome))
        if self._settle_call is None:
            self._settle_call = self.container.reactor.callLater(0, self._settle_copies)
        marker = headers.get("marker")
        waiter = self._markers.pop(marker, None) if isinstance(marker, str) else None
        if waiter is not None:
            # What was read up to the marker is written down and logged before the report
            # waiting for it is decided.
            self._settle_copies()
            waiter.callback(None)

    def _settle_copies(self):
        """Write down the ids of the copies read this reactor turn (one write for all of
        them), then count and log them and ack them: a copy is logged and acked only once its
        id is in the file."""
        call, self._settle_call = self._settle_call, None
        if call is not None and call.active():
            call.cancel()
        copies, self._copies = self._copies, []
        if not copies:
            return
        self.seen.flush()
        for delivery, outcome in copies:
            if outcome is not None:
                self._count_direct(delivery, outcome)
            try:
                delivery.ack()
            except Exception:
                pass  # the connection went: the copy comes back, its id is known by then

    def _count_direct(self, delivery, outcome):
        """Count and log a report one of our consumers published to its source itself (its
        C{code} header spares reading the body, unless the body goes to the log)."""
        code = None if self._log_file is not None else delivery.properties.headers.get("code")
        if type(code) is int:
            fields = None
        else:
            fields, code = _parse_report(delivery.body)
        source = delivery.exchange[len("xr_"):]
        if code is None or not delivery.exchange.startswith("xr_"):
            return
        self.stats["received"] += 1
        if outcome == "forwarded":
            self.stats["forwarded"] += 1
            codes = self.stats["by_source"].setdefault(source, {})
            codes[str(code)] = codes.get(str(code), 0) + 1
        else:
            self.stats["duplicates"] += 1
        self._write_log(fields, delivery, source, code, outcome)

    async def _catch_up(self):
        """Return once the sent queue has been read up to now: every report the broker took
        from an earlier run is remembered by then."""
        marker = uuid.uuid4().hex
        waiter = self._markers[marker] = defer.Deferred()
        waiter.addTimeout(CATCH_UP_TIMEOUT, self.container.clock)
        try:
            await self.publish(self.marker_exchange, "marker", b"{}", headers={"marker": marker})
            await waiter
        except defer.TimeoutError:
            self.log.warn(
                "report router: no marker back from {queue} after {timeout} s; deciding on "
                "what is known",
                queue=self.sent_queue,
                timeout=CATCH_UP_TIMEOUT,
            )
        finally:
            self._markers.pop(marker, None)
            # Not published (the connection went): the wait ends here, and its timeout with it.
            if not waiter.called:
                waiter.cancel()
            waiter.addErrback(lambda _: None)

    def _write_log(self, fields, delivery, source, code, outcome):
        if self._log_file is None:
            return
        report = fields.get("report") or {}
        line = {
            "time": self.container.clock.seconds(),
            "source": source,
            "code": code,
            "routing_key": delivery.routing_key,
            "relPath": fields.get("relPath"),
            "report_id": fields.get("report_id"),
            "message": report.get("message"),
            "outcome": outcome,
        }
        # ASCII with escapes: a lone surrogate (undecodable bytes in a file name) cannot be
        # written as UTF-8, and would cost the line; escaped, it reads back as it came.
        self._log_file.write(json.dumps(line) + "\n")
        self._log_file.flush()
        if self._log_file.tell() >= self.settings["log_max_bytes"]:
            self._log_file.close()
            rotate(self.settings["log_path"], self.settings["log_keep"])
            self._log_file = open(self.settings["log_path"], "a", encoding="utf-8")


def sent_queue(process, user):
    """The name of the sent queue of the report router of C{user} in C{process}'s system."""
    return f"q_{own_prefix(process, user)}report_router.sent"


def rotate(path, keep):
    """Rename C{path} to C{path.1}, shifting C{path.1}... up to C{path.<keep>} (the oldest
    is dropped); what is missing is skipped."""
    for n in range(keep - 1, 0, -1):
        try:
            os.replace(f"{path}.{n}", f"{path}.{n + 1}")
        except FileNotFoundError:
            pass
    os.replace(path, f"{path}.1")


process_class = ReportRouter


def _parse_report(body):
    """C{(fields, code)} of a report's body: its JSON object and its C{report}'s integer
    C{code}; C{code} is None for anything else (then C{fields} may be None too)."""
    try:
        fields = json.loads(body)
    except (ValueError, RecursionError):
        return None, None
    report = fields.get("report") if isinstance(fields, dict) else None
    code = report.get("code") if isinstance(report, dict) else None
    if isinstance(code, bool) or not isinstance(code, int):
        return fields, None
    return fields, code
