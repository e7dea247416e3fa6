"""Raw subscriptions: consume and publish non-envelope messages on any exchange.

Besides envelopes on the system exchange (C{messenger.py}), applications speak other formats
on other exchanges: the pump's v03 JSON notifications on sr3-style exchanges (C{xpublic},
C{xs_<user>}...). The process layer does that through these helpers, on the same transport.
"""

from ion.core.messaging.transport import Properties

# Headers of a dead-lettered message: why, and where it was published.
DEAD_REASON = "dead-reason"
DEAD_EXCHANGE = "dead-exchange"
DEAD_ROUTING_KEY = "dead-routing-key"
REASON_CHARS = 1000  # of the reason kept


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
):
    """Declare exchange (unless C{exchange_type} is None) and queue, bind each key, and
    deliver to callback(IDelivery). The callback acks or nacks each delivery itself. Returns
    the consumer."""
    if exchange_type:
        await transport.declare_exchange(exchange, exchange_type, durable=durable)
    await transport.declare_queue(
        queue, durable=durable, exclusive=exclusive, auto_delete=auto_delete
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


async def dead_letter(transport, delivery, queue, reason, durable=True, exclusive=False):
    """Publish a copy of C{delivery} (taken from C{queue}) to the queue C{<queue>.dead}, declared
    first (C{durable}, C{exclusive}), through the default exchange, with its headers plus
    DEAD_REASON, DEAD_EXCHANGE and DEAD_ROUTING_KEY; fires once the broker confirmed it. The
    same on every transport (RabbitMQ's own dead-lettering has no counterpart in memory://).
    Settling C{delivery} is the caller's."""
    dead = f"{queue}.dead"
    props = delivery.properties
    key = delivery.routing_key
    if not isinstance(key, str):
        key = bytes(key).decode("utf-8", "replace")
    headers = dict(props.headers or {})
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
    await transport.declare_queue(dead, durable=durable, exclusive=exclusive)
    await transport.publish("", dead, delivery.body, properties, mandatory=True)
