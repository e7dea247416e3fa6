"""Raw subscriptions: the queues of non-envelope messages on any exchange, and their dead letters.

Besides envelopes on the system exchange (C{messenger.py}), applications speak other formats
on other exchanges: the pump's v03 JSON notifications on sr3-style exchanges (C{xpublic},
C{xs_<user>}...). The process layer subscribes to them (L{ion.core.process.Process.subscribe})
with the queue types and dead-lettering of these helpers, on the same transport.
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


def queue_arguments(queue, queue_type, delivery_limit):
    """C{(arguments of queue, arguments of <queue>.dead)} for a shared durable queue of
    C{queue_type}: a quorum queue gives up a message returned more than C{delivery_limit}
    times (the process gave it back, or died holding it) and dead-letters it to
    C{<queue>.dead}, itself a quorum queue; a classic queue has no arguments."""
    if queue_type != "quorum":
        return {}, {}
    return (
        {
            QUEUE_TYPE: "quorum",
            DELIVERY_LIMIT: delivery_limit,
            DEAD_LETTER_EXCHANGE: "",
            DEAD_LETTER_ROUTING_KEY: f"{queue}.dead",
        },
        {QUEUE_TYPE: "quorum"},
    )


def returns_of(delivery):
    """How many times the message of C{delivery} was returned to its queue before: a quorum
    queue's C{x-delivery-count}, else 1 when it is marked redelivered, else 0."""
    count = (delivery.properties.headers or {}).get(DELIVERY_COUNT)
    if isinstance(count, int) and not isinstance(count, bool) and count >= 0:
        return count
    return 1 if delivery.redelivered else 0


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
