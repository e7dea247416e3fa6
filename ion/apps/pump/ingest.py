"""Ingest: how a notice posted by a user enters the pump. For now, the rule that stamps its
source (the ingest process itself comes later).

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

import re

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
