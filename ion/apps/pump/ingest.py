"""Ingest: how a notice posted by a user enters the pump (the pump's sarra/shovel step).

L{Ingest} consumes the durable queues C{q_<user>.ingest.xs_<u>}, one per exchange C{xs_<u>} for
each user C{u} in C{users} (default: the pump's user), bound with C{#}, and declares each user's
report exchange C{xr_<u>} on start. For each message:

  1. check who published it, and to which exchange (below);
  2. decode and validate the v03 notice, and set its C{source} to that publisher;
  3. publish it, persistent and confirmed, to C{exchange} (default C{xpublic}) with the routing key
     it came with, then ack.

An invalid notice (undecodable, over C{max_notice_bytes}, failing validation, or posted with a
routing key that is not UTF-8) is logged and acked, and its source gets a 417 report on
C{report_exchange} (default C{xreport}; the report router passes it to C{xr_<source>}). A
message whose handling fails (the publish failed: the broker went away) goes back to its queue
once; failing again, it goes to C{<queue>.dead} (L{ion.core.process.Process.subscribe}).

A message is taken only when it was published to C{xs_<u>}, for one of C{users}, by C{u}
itself (L{source_of}, below); everything else is acked, counted as C{refused} and logged (one
line, then at most one a minute with the count), never passed on. The notice's C{source} is
that C{u}, never what the body said: on a multi-user pump the source decides who gets its
reports (C{xr_<source>}), and anyone can write anything in a body. Both halves of the check
are things the broker vouches for:

  - the delivery's exchange is the exchange the message was I{published to}, not one it was
    routed through. On RabbitMQ anyone who may read C{xpublic} and write C{xs_<self>} may bind
    C{xs_<self>} to C{xpublic} (exchange.bind); the ingest's own output would then come back to
    it, and be passed on again, for ever. Such a copy arrives with exchange C{xpublic}: refused;
  - the AMQP C{user_id} property, which RabbitMQ checks against the publisher's login when it is
    set, must be C{u}: permissions normally let only C{u} (and administrators) write C{xs_<u>}.
    The pump's own processes publish as its broker login, which may differ from the pump's user
    name (C{user}), so a message on the pump's own C{xs_<user>} from that login is taken too. A
    message without C{user_id} (clients need not set it, and then nothing is checked) is taken
    only on a single-user pump, where C{users} is just the pump's own user.

Given a C{broker} (C{amqp[s]://}), the ingest feeds the pump on that broker instead of the
container's: with a connection of its own (L{ion.apps.pump.flow.open_flow_broker}) it declares
the C{xr_<u>} exchanges there, consumes C{xs_<u>} there through the queues
C{q_<login>.ingest.xs_<u>}, and publishes notices and reports there; its login stands for the
pump's user unless C{user} is given. It is that pump's feeder, so its login needs the rights
to declare and write those exchanges and queues. The checks above hold as they are: RabbitMQ
checks C{user_id} on any node. Dead letters go to the container's broker, as every flow's.
An MQTT broker is refused (L{ion.apps.pump.args.INGEST_MQTT}): MQTT carries no publisher the
broker vouches for.
"""

import hashlib

from ion.apps.pump.args import IngestArgs
from ion.apps.pump.consumer import make_report, report_id
from ion.apps.pump.flow import open_flow_broker
from ion.apps.pump.notice import InvalidNotice, Notice, format_time
from ion.apps.pump.outcome import RecentFailures
from ion.apps.pump.user import pump_user
from ion.core.process import ServiceProcess

# After a refusal is logged, further ones are only counted, and summed up in one line at most
# this often (a routing loop or a flood must not turn into one log line per message).
REFUSAL_LOG_INTERVAL = 60.0


class NotPostedHere(ValueError):
    """A message that was not published to C{xs_<u>} by C{u} (see the module docstring)."""


def source_of(exchange, user_id, users, pump=None, login=None):
    """The user who posted a message: C{u} when it was published to exchange C{xs_<u>}, C{u} one
    of C{users}, with broker-validated user id C{u}. The pump's own user C{pump} may also post to
    its C{xs_<pump>} as its broker C{login}; a message without a user id is accepted only when
    C{users} is just C{[pump]}. NotPostedHere, saying why, otherwise."""
    user = exchange[3:] if isinstance(exchange, str) and exchange.startswith("xs_") else None
    if user not in users:
        raise NotPostedHere(
            f"published to exchange {exchange!r}, not to the xs_ exchange of one of this "
            "pump's users (a binding between exchanges brought it here)"
        )
    if user_id == user or (user == pump and user_id is not None and user_id == login):
        return user
    if user_id is None:
        if list(users) == [pump]:
            return user
        raise NotPostedHere(
            f"no user_id on a message to {exchange}: on a pump with several users, set the "
            "AMQP user_id property to the user you log in as"
        )
    raise NotPostedHere(f"published to {exchange} by {user_id!r}, not by {user!r}")


class Ingest(ServiceProcess):
    """Takes notices from users' C{xs_} exchanges, stamps their source, passes them on to
    C{xpublic} (see the module docstring)."""

    service_optional = True  # named by the pump app: its name is a service (ion rpc)

    def on_init(self):
        args = self.settings = IngestArgs.parse(self.args)
        self.broker = None
        if args.broker:
            self.broker, _ = open_flow_broker(self, args.broker, "ingest", "ingest", None)
            # There the feeder's queues are its login's, and the login stands for the pump's
            # user unless told.
            self.login = self.broker.user
            self.user = args.user or self.login
            self.queue_prefix = f"q_{self.login}.ingest"
        else:
            self.user = pump_user(self, args.user)
            self.login = self.container.transport.user
            self.queue_prefix = f"q_{self.user}.ingest"
        users = self.settings.users
        self.users = list(users) if users is not None else [self.user]
        self.subscriber = f"{self.user}.ingest"
        counters = ("received", "published", "invalid", "refused")
        self.stats = dict(dict.fromkeys(counters, 0), by_source={})
        self._declared = set()
        self.last_failures = RecentFailures(self.container.clock)  # ion status, the console
        self._refusals_unlogged = 0
        self._refusal_logged_at = None

    async def on_activate(self):
        if self.broker is not None:
            await self.broker.connect()
        transport = self.broker or self.container.transport
        for user in self.users:
            # Declared before any report goes there: a source may read its xr_ exchange but
            # not declare it (ion.core.cc.roles), so it can subscribe to its reports
            # before its first post only if the pump declared the exchange.
            await transport.declare_exchange(f"xr_{user}", "topic", durable=True)
            exchange = f"xs_{user}"
            await self.subscribe(
                exchange,
                ["#"],
                self._on_delivery,
                queue=f"{self.queue_prefix}.{exchange}",
                durable=True,
                prefetch=self.settings["prefetch"],
                transport=self.broker,
            )

    def op_stats(self, content, headers):
        """Counters: received, published, invalid, refused (not posted by the user of the
        exchange they were published to), by_source {source: notices published};
        C{last_failures}: the latest refused (403) and invalid (417) notices, each {time,
        code, reason} (L{RecentFailures})."""
        return dict(self.stats, by_source=dict(self.stats["by_source"]),
                    last_failures=self.last_failures.as_list())

    async def _on_delivery(self, delivery):
        self.stats["received"] += 1
        user_id = getattr(delivery.properties, "user_id", None)
        try:
            source = source_of(
                delivery.exchange,
                user_id,
                self.users,
                pump=self.user,
                login=self.login,
            )
        except NotPostedHere as e:
            self.stats["refused"] += 1
            self.last_failures.add(403, f"refused {delivery.routing_key!r}: {e}")
            delivery.ack()
            self._log_refusal(delivery, e)
            return
        if not isinstance(delivery.routing_key, str):
            # The transports hand over a key that is not UTF-8 as bytes; it could not be
            # published again.
            await self._refuse(delivery, source, InvalidNotice("routing key", "not UTF-8"))
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

    def _log_refusal(self, delivery, reason):
        """One line for a refused message; then, while refusals keep coming, one line at most
        every REFUSAL_LOG_INTERVAL seconds with how many there were since."""
        now = self.container.clock.seconds()
        last = self._refusal_logged_at
        if last is not None and now - last < REFUSAL_LOG_INTERVAL:
            self._refusals_unlogged += 1
            return
        more, self._refusals_unlogged = self._refusals_unlogged, 0
        self._refusal_logged_at = now
        self.log.warn(
            "ingest: message {key!r} refused, not passed on: {reason}{more}",
            key=delivery.routing_key,
            reason=reason,
            more=f" ({more} more refused since the last such line)" if more else "",
        )

    async def _publish(self, exchange, routing_key, body):
        declare = None if exchange in self._declared else "topic"
        await self.publish(
            exchange, routing_key, body, persistent=True, declare=declare, transport=self.broker
        )
        self._declared.add(exchange)

    async def _refuse(self, delivery, source, error):
        """Log an invalid notice and send its source a 417 report (the fields it had, when it
        was a JSON object within the size limit)."""
        self.stats["invalid"] += 1
        self.last_failures.add(
            417, f"invalid notice {delivery.routing_key!r} from {source}: {error}")
        self.log.warn(
            "ingest: invalid notice {key!r} from {source} on {exchange} ({reason}); reported",
            key=delivery.routing_key,
            source=source,
            exchange=delivery.exchange,
            reason=error,
        )
        now = self.container.clock.seconds()
        try:
            notice = Notice.from_json(delivery.body, max_bytes=self.settings["max_notice_bytes"])
        except InvalidNotice:  # not a JSON object within the size limit
            notice = Notice({"pubTime": format_time(now)})
        notice.source = source
        key = hashlib.sha256(delivery.body).hexdigest()
        report = make_report(notice, 417, f"invalid notice: {error}", now)
        report["report_id"] = report_id(self.subscriber, source, key, 417)
        key = delivery.routing_key
        if not isinstance(key, str):
            key = bytes(key).decode("utf-8", "replace")
        await self._publish(self.settings["report_exchange"], key, report.to_json())
        delivery.ack()


process_class = Ingest
