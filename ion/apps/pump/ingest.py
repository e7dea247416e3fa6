"""Ingest: how a notice posted by a user enters the pump (the pump's sarra/shovel step).

`Ingest` consumes the durable queues `q_<user>.ingest.xs_<u>`, one per exchange `xs_<u>` for
each user `u` in `users` (default: the pump's user), bound with `#`. For each message:

1. decode and validate the v03 notice;
2. stamp its `source` (`stamp_source`, below) from the exchange it arrived on and the
   broker-validated publisher, replacing whatever the body said;
3. publish it, persistent and confirmed, to `exchange` (default `xpublic`) with the routing key
   it came with, then ack.

An invalid notice (undecodable, over `max_notice_bytes`, or failing validation) is logged and
acked; when its source is known, that source gets a 417 report on `report_exchange` (default
`xreport`; the report router passes it to `xr_<source>`). A publish that fails (the broker
went away) leaves the message unacked: it goes back to its queue.

On a multi-user pump a notice's `source` decides who gets its reports (`xr_<source>`), so it is
never taken from the body: anyone can write anything there. It comes from what the broker
vouches for instead:

- the exchange the notice arrived on, `xs_<user>` (or `xs_<user>_<suffix>`): broker
  permissions let only that user (and the pump's own administrative user) write to it;
- otherwise the broker-validated user that published it (the AMQP `user_id` property, which
  RabbitMQ checks against the connection's login).

When both are known and the exchange is `xs_<user_id>` or `xs_<user_id>_...`, the user id is
the source (user names may contain `_`, which makes the exchange name alone ambiguous);
otherwise the exchange's first word after `xs_` is.
"""

import copy
import hashlib
import json
import re

from ion.apps.pump.consumer import make_report, report_id
from ion.apps.pump.notice import MAX_NOTICE_BYTES, InvalidNotice, Notice, format_time
from ion.apps.pump.user import pump_user
from ion.core.process import Process

_SOURCE = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*", re.ASCII)


class UnknownSource(ValueError):
    """Neither the exchange nor the publisher tells who posted a notice (report 417)."""

    code = 417


def source_of(exchange, user_id):
    """The source vouched for by the exchange a notice arrived on and its publisher's user id;
    UnknownSource when neither gives a usable name."""
    if isinstance(exchange, str) and exchange.startswith("xs_"):
        if user_id and (exchange == f"xs_{user_id}" or exchange.startswith(f"xs_{user_id}_")):
            candidate = user_id
        else:
            candidate = exchange[3:].split("_", 1)[0]
    else:
        candidate = user_id
    if isinstance(candidate, str) and _SOURCE.fullmatch(candidate):
        return candidate
    raise UnknownSource(
        f"cannot tell who posted a notice on exchange {exchange!r} "
        f"(publisher user id {user_id!r}): post to xs_<user> as that user"
    )


def stamp_source(notice, exchange, user_id):
    """Set `notice.source` from the exchange it arrived on and its publisher's broker-validated
    user id, replacing whatever the body said. Returns the notice (changed in place)."""
    notice.source = source_of(exchange, user_id)
    return notice


DEFAULTS = {
    "users": None,
    "user": None,
    "exchange": "xpublic",
    "report_exchange": "xreport",
    "prefetch": 100,
    "max_notice_bytes": MAX_NOTICE_BYTES,
}


def check_args(args):
    """The ingest's args with defaults filled in; ValueError naming the bad one otherwise."""
    unknown = sorted(set(args) - set(DEFAULTS))
    if unknown:
        raise ValueError(
            f"ingest: unknown argument {unknown[0]!r}; valid ones are {', '.join(DEFAULTS)}"
        )
    merged = copy.deepcopy(DEFAULTS)
    merged.update(args)
    users = merged["users"]
    if users is not None and (
        isinstance(users, str)
        or not isinstance(users, (list, tuple))
        or not all(isinstance(u, str) and _SOURCE.fullmatch(u) for u in users)
    ):
        raise ValueError(f"ingest: users must be a list of user names, got {users!r}")
    for key in ("exchange", "report_exchange"):
        if not isinstance(merged[key], str) or not _SOURCE.fullmatch(merged[key]):
            raise ValueError(f"ingest: {key} must be an exchange name, got {merged[key]!r}")
    if merged["user"] is not None and (
        not isinstance(merged["user"], str) or not _SOURCE.fullmatch(merged["user"])
    ):
        raise ValueError(f"ingest: user must be a user name, got {merged['user']!r}")
    for key in ("prefetch", "max_notice_bytes"):
        value = merged[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"ingest: {key} must be an int >= 1, got {value!r}")
    return merged


class Ingest(Process):
    """Takes notices from users' `xs_` exchanges, stamps their source, passes them on to
    `xpublic` (see the module docstring)."""

    def on_init(self):
        self.settings = check_args(self.args)
        self.user = pump_user(self, self.settings["user"])
        users = self.settings["users"]
        self.users = list(users) if users is not None else [self.user]
        self.subscriber = f"{self.user}.ingest"
        self.stats = {"received": 0, "published": 0, "invalid": 0, "by_source": {}}
        self._declared = set()

    async def on_activate(self):
        for user in self.users:
            exchange = f"xs_{user}"
            await self.subscribe(
                exchange,
                ["#"],
                self._on_delivery,
                queue=f"q_{self.user}.ingest.{exchange}",
                durable=True,
                prefetch=self.settings["prefetch"],
            )

    def op_stats(self, content, headers):
        """Counters: received, published, invalid, by_source {source: notices published}."""
        return dict(self.stats, by_source=dict(self.stats["by_source"]))

    async def _on_delivery(self, delivery):
        self.stats["received"] += 1
        try:
            await self._ingest(delivery)
        except Exception:
            requeue = not delivery.redelivered
            self.log.failure(
                "ingest: message {key!r} on {exchange} failed; {what}",
                key=delivery.routing_key,
                exchange=delivery.exchange,
                what="requeued" if requeue else "dropped (it had been redelivered)",
            )
            try:
                delivery.nack(requeue=requeue)
            except Exception:
                pass

    async def _ingest(self, delivery):
        user_id = getattr(delivery.properties, "user_id", None)
        try:
            source = source_of(delivery.exchange, user_id)
        except UnknownSource as e:
            self.stats["invalid"] += 1
            self.log.warn(
                "ingest: message {key!r} dropped: {reason}", key=delivery.routing_key, reason=e
            )
            delivery.ack()
            return
        limit = self.settings["max_notice_bytes"]
        try:
            notice = Notice.from_json(delivery.body, max_bytes=limit)
            notice.source = source
            notice.validate()
        except InvalidNotice as e:
            await self._refuse(delivery, source, e)
            return
        await self._publish(self.settings["exchange"], delivery.routing_key, notice.to_json())
        self.stats["published"] += 1
        self.stats["by_source"][source] = self.stats["by_source"].get(source, 0) + 1
        delivery.ack()

    async def _publish(self, exchange, routing_key, body):
        declare = None if exchange in self._declared else "topic"
        await self.publish(exchange, routing_key, body, persistent=True, declare=declare)
        self._declared.add(exchange)

    async def _refuse(self, delivery, source, error):
        """Log an invalid notice and send its source a 417 report (the fields it had, when it
        was a JSON object within the size limit)."""
        self.stats["invalid"] += 1
        self.log.warn(
            "ingest: invalid notice {key!r} from {source} on {exchange} ({reason}); reported",
            key=delivery.routing_key,
            source=source,
            exchange=delivery.exchange,
            reason=error,
        )
        fields = None
        if len(delivery.body) <= self.settings["max_notice_bytes"]:
            try:
                fields = json.loads(delivery.body)
            except (ValueError, RecursionError):
                pass
        if not isinstance(fields, dict):
            fields = {"pubTime": format_time(self.container.clock.seconds())}
        notice = Notice(fields)
        notice.source = source
        key = hashlib.sha256(delivery.body).hexdigest()
        report = make_report(notice, 417, f"invalid notice: {error}")
        report["report_id"] = report_id(self.subscriber, source, key, 417)
        await self._publish(
            self.settings["report_exchange"], delivery.routing_key, report.to_json()
        )
        delivery.ack()


process_class = Ingest
