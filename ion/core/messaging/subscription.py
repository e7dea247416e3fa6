"""Raw subscriptions: consume and publish non-envelope messages on any exchange.

Processes talk to each other in envelopes on the system exchange (`messenger.py`). Some
applications also speak other formats on other exchanges — the pump exchanges v03 JSON
notifications on sr3-style exchanges (`xpublic`, `xs_<user>`, `xreport`...). These helpers do
that over the same transport: declare the exchange and a queue, bind topic patterns, consume
with a prefetch limit, publish with confirms.
"""

from ion.core.messaging.transport import Properties


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
    """Declare exchange and queue, bind each key, and deliver to callback(IDelivery).
    The callback acks or nacks each delivery itself. Returns the consumer."""
    await transport.declare_exchange(exchange, exchange_type, durable=durable)
    await transport.declare_queue(queue, durable=durable, exclusive=exclusive, auto_delete=auto_delete)
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
    `declare='topic'` (or another type) declares the exchange (durable) first."""
    if declare:
        await transport.declare_exchange(exchange, declare, durable=True)
    properties = Properties(
        content_type=content_type,
        delivery_mode=2 if persistent else 1,
        headers=dict(headers or {}),
    )
    await transport.publish(exchange, routing_key, body, properties, mandatory=mandatory)
