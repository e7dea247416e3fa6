"""Raw subscriptions: consume and publish non-envelope messages on any exchange.

Besides envelopes on the system exchange (C{messenger.py}), applications speak other formats
on other exchanges: the pump's v03 JSON notifications on sr3-style exchanges (C{xpublic},
C{xs_<user>}...). The process layer does that through these helpers, on the same transport.
"""

from ion.core.messaging.transport import (
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_ROUTING_KEY,
    DELIVERY_COUNT,
    DELIVERY_LIMIT,
    QUEUE_TYPE,
    QUEUE_TYPES,
    Properties,
)

# Headers of a dead-lettered message: why, and where it was published.
DEAD_REASON = "dead-reason"
DEAD_EXCHANGE = "dead-exchange"
DEAD_ROUTING_KEY = "dead-routing-key"
REASON_CHARS = 1000  # of the reason kept

# Returns of a message before it is dead-lettered, on a quorum queue (classic queues tell
# only whether a message was delivered before: their limit is 1).
DEFAULT_DELIVERY_LIMIT = 10


def queue_type_for(asked, cluster):
    """The queue type of a shared durable queue: C{asked} ('classic', 'quorum', or 'auto' /
    None: quorum on a cluster (C{cluster}: the broker URL names several hosts), else classic).
    ValueError for another value."""
    if asked in (None, "auto"):
        return "quorum" if cluster else "classic"
    if asked not in QUEUE_TYPES:
        raise ValueError(f"queue_type must be 'auto', 'classic' or 'quorum', got {asked!r}")
    return asked


# The queue a quorum queue dead-letters to by itself (a message returned more than its
# delivery limit: its process died holding it each time): C{<queue>.poison}. The process
# consuming the queue also consumes that one and moves each message to C{<queue>.dead}, with a
# reason, telling its C{on_dead_letter} hook (L{ion.core.process.Process.subscribe}).
POISON_SUFFIX = ".poison"
# Returns of a message of a poison queue before it is dropped (should moving it kill its
# process each time); more than the queue's own limit, which a message reaches by the
# processes that die or stop holding it, possibly while it is on its way to the poison queue.
POISON_DELIVERY_LIMIT = 20


def queue_arguments(queue, queue_type, delivery_limit):
    """C{(arguments of queue, arguments of <queue>.dead, arguments of <queue>.poison)} for a
    shared durable queue of C{queue_type}: a quorum queue gives up a message returned more
    than C{delivery_limit} times (the process gave it back, or died holding it) and
    dead-letters it to C{<queue>.poison}, a quorum queue that itself drops a message returned
    more than L{POISON_DELIVERY_LIMIT} times (nothing loops forever); C{<queue>.dead} is a
    quorum queue too. A classic queue has no arguments (and no poison queue: None)."""
    if queue_type != "quorum":
        return {}, {}, None
    return (
        {
            QUEUE_TYPE: "quorum",
            DELIVERY_LIMIT: delivery_limit,
            DEAD_LETTER_EXCHANGE: "",
            DEAD_LETTER_ROUTING_KEY: f"{queue}{POISON_SUFFIX}",
        },
        {QUEUE_TYPE: "quorum"},
        {QUEUE_TYPE: "quorum", DELIVERY_LIMIT: POISON_DELIVERY_LIMIT},
    )


def given_up(delivery):
    """C{(exchange, routing key)} a message taken from a poison queue was first published
    with, from the headers the broker added when it dead-lettered it (C{x-death}, else the
    C{x-first-death-exchange}); the delivery's own where the headers say nothing usable."""
    headers = delivery.properties.headers or {}
    exchange, key = headers.get("x-first-death-exchange"), None
    deaths = headers.get("x-death")
    if isinstance(deaths, (list, tuple)) and deaths and isinstance(deaths[-1], dict):
        first = deaths[-1]  # the newest death first: the last is the first one
        exchange = first.get("exchange", exchange)
        keys = first.get("routing-keys")
        if isinstance(keys, (list, tuple)) and keys:
            key = keys[0]
    if isinstance(exchange, bytes):
        exchange = exchange.decode("utf-8", "replace")
    if isinstance(key, bytes):
        key = key.decode("utf-8", "replace")
    if not isinstance(exchange, str):
        exchange = delivery.exchange
    if not isinstance(key, str):
        key = delivery.routing_key
    return exchange, key


class GivenUp:
    """A message taken from a poison queue, seen as the message its queue gave up: the
    exchange and routing key it was first published with (L{given_up}), returned
    C{returns} times (its C{x-delivery-count}); settling it settles the poison queue's
    delivery."""

    def __init__(self, delivery, returns):
        self._delivery = delivery
        self.body = delivery.body
        self.exchange, self.routing_key = given_up(delivery)
        props = delivery.properties
        self.properties = Properties(
            content_type=props.content_type,
            delivery_mode=props.delivery_mode,
            message_id=props.message_id,
            user_id=props.user_id,
            headers={**(props.headers or {}), DELIVERY_COUNT: returns},
            timestamp=props.timestamp,
            expiration=props.expiration,
        )
        self.redelivered = True

    @property
    def settled(self):
        return self._delivery.settled

    def ack(self):
        self._delivery.ack()

    def nack(self, requeue=True):
        self._delivery.nack(requeue)


def returns_of(delivery):
    """How many times the message of C{delivery} was returned to its queue before: a quorum
    queue's C{x-delivery-count}, else 1 when it is marked redelivered, else 0."""
    count = (delivery.properties.headers or {}).get(DELIVERY_COUNT)
    if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
        return count
    return 1 if delivery.redelivered else 0


async def subscribe(
    transport,
    exchange,
    queue,
    keys,
    callback,
    *,
    exchange_type="topic",
    durable=True,
    exclusive=False,
    auto_delete=False,
    prefetch=100,
    arguments=None,
    dead_arguments=None,
):
    """Declare exchange (unless C{exchange_type} is None) and queue (with C{arguments}; when
    they name a dead-letter routing key, that queue is declared first, with
    C{dead_arguments}), bind each key (none: C{keys} empty), and deliver to
    callback(IDelivery). The callback acks or nacks each delivery itself. Returns the
    consumer."""
    if exchange_type:
        await transport.declare_exchange(exchange, exchange_type, durable=durable)
    dead = (arguments or {}).get(DEAD_LETTER_ROUTING_KEY)
    if dead:
        await transport.declare_queue(dead, durable=True, arguments=dead_arguments)
    await transport.declare_queue(
        queue, durable=durable, exclusive=exclusive, auto_delete=auto_delete, arguments=arguments
    )
    for key in keys:
        await transport.bind(queue, exchange, key)
    return await transport.consume(queue, callback, prefetch=prefetch)


async def publish(
    transport,
    exchange,
    routing_key,
    body,
    *,
    headers=None,
    content_type="application/json",
    persistent=True,
    mandatory=False,
    declare=None,
):
    """Publish body; fires once the broker has taken it (publisher confirm).
    C{declare='topic'} (or another type) declares the exchange (durable) first."""
    if declare:
        await transport.declare_exchange(exchange, declare, durable=True)
    properties = Properties(
        content_type=content_type,
        delivery_mode=2 if persistent else 1,
        headers=dict(headers or {}),
    )
    await transport.publish(exchange, routing_key, body, properties, mandatory=mandatory)


async def dead_letter(
    transport, delivery, queue, reason, durable=True, exclusive=False, arguments=None
):
    """Publish a copy of C{delivery} (taken from C{queue}) to the queue C{<queue>.dead}, declared
    first (C{durable}, C{exclusive}, C{arguments}), through the default exchange, with its
    headers (less C{x-delivery-count}) plus DEAD_REASON, DEAD_EXCHANGE and DEAD_ROUTING_KEY;
    fires once the broker confirmed it. The same on every transport, and with a report: the
    queue's own dead-lettering (quorum queues) is for a process that dies holding a message.
    Settling C{delivery} is the caller's."""
    dead = f"{queue}.dead"
    props = delivery.properties
    key = delivery.routing_key
    if not isinstance(key, str):
        key = bytes(key).decode("utf-8", "replace")
    headers = dict(props.headers or {})
    headers.pop(DELIVERY_COUNT, None)
    headers[DEAD_REASON] = reason[:REASON_CHARS]
    headers[DEAD_EXCHANGE] = delivery.exchange
    headers[DEAD_ROUTING_KEY] = key
    properties = Properties(
        content_type=props.content_type,
        delivery_mode=2 if durable else 1,
        message_id=props.message_id,
        headers=headers,
        timestamp=props.timestamp,
    )
    await transport.declare_queue(
        dead, durable=durable, exclusive=exclusive, arguments=arguments
    )
    await transport.publish("", dead, delivery.body, properties, mandatory=True)
