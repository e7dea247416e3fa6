"""The mqtt:// and mqtts:// transport: a flow's connection to an MQTT v5 broker, laid out as sr3's.

sr3 maps its AMQP names onto MQTT topics: the exchange is the first topic level, then the
routing key with C{/} for C{.} (C{xpublic/v03/a/b} is exchange C{xpublic}, key C{v03.a.b});
C{#} and C{*} patterns become C{#} and C{+}; a queue is a shared subscription group
(C{$share/<queue>/<exchange>/<pattern>}), so that every session subscribed with the same queue
name gets a share of the messages. Bodies carry the v03 JSON with C{ContentType} and
C{PayloadFormatIndicator} 1 (UTF-8); other headers travel as user properties.

L{MqttTransport} speaks MQTT v5 through paho-mqtt's external-loop API, driven by the reactor:
the socket is a reactor reader (and a writer while paho has bytes queued), C{loop_misc} runs
every second for keepalives. Only the blocking connect (name lookup, TCP, TLS handshake) runs in
a thread of the reactor's pool, once per attempt. Reconnects back off from 0.5 s to 30 s.

What it keeps:

  - QoS 1 both ways. C{publish} fires on the broker's PUBACK (a reason code of 0x80 or more fails
    it, with "not authorized" for 0x87); with C{mandatory}, "no matching subscribers" raises
    L{Unroutable};
  - deliveries are acknowledged only by C{ack()} (paho's manual acks); C{nack(requeue=True)}
    hands the message to the consumer again (MQTT cannot give it back to the broker); C{nack
    (requeue=False)} acks it. An ack after the connection was lost is dropped: the broker sends
    the message again to the same session;
  - a persistent session: clean start false and a session expiry (C{session_expiry}, default a
    day), under the client id C{session} (set before C{connect}; stable across restarts, one
    per instance), so that what is published while the subscriber is away waits for it;
  - at most C{receive_maximum} unacknowledged messages from the broker (MQTT's Receive
    Maximum), and at most C{prefetch} of them in the consumer's hands.

One consumer per transport (a flow's queue); exchanges and queues need no declaring (both are
accepted and recorded); C{queue_depth} is unknown (NotFound).
"""

import collections
import ssl
from urllib.parse import unquote, urlsplit

import attrs
from paho.mqtt import client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as MqttProperties
from paho.mqtt.subscribeoptions import SubscribeOptions
from twisted.application.internet import backoffPolicy
from twisted.internet import defer, task, threads
from twisted.logger import Logger

from ion.core.messaging.transport import (
    ConnectionLost,
    NotFound,
    Properties,
    TransportError,
    Unroutable,
)

log = Logger()

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
NO_MATCHING_SUBSCRIBERS = 0x10


def topic_of(exchange, routing_key):
    """The MQTT topic of an AMQP-style exchange and routing key (sr3's layout)."""
    words = routing_key.split(".") if routing_key else []
    return "/".join([exchange] + [w.replace("+", "%2B") for w in words])


def filter_of(queue, exchange, pattern):
    """The shared-subscription filter for binding C{queue} to C{exchange} with C{pattern}."""
    words = ["+" if w == "*" else w for w in pattern.split(".")]
    return "/".join(["$share", queue, exchange] + words)


@attrs.frozen
class MqttAddress:
    """A parsed C{mqtt[s]://[user[:password]@]host[:port]/} URL; repr() shows no password."""

    host: str
    port: int
    user: str | None
    password: str | None = attrs.field(repr=False)
    tls: bool

    @classmethod
    def parse(cls, url):
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise ValueError("malformed MQTT broker URL (bad port or brackets)") from None
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS or not parts.hostname:
            raise ValueError("an MQTT broker URL is mqtt[s]://[user[:password]@]host[:port]/")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("an MQTT broker URL takes no path or query: mqtt[s]://host[:port]/")
        user = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else None
        return cls(parts.hostname, port or DEFAULT_PORTS[scheme], user, password, scheme == "mqtts")

    def __str__(self):
        who = f"{self.user}@" if self.user else ""
        return f"mqtt{'s' if self.tls else ''}://{who}{self.host}:{self.port}/"


@attrs.define(eq=False)
class _Delivery:
    """One message from the broker (L{IDelivery})."""

    _transport: object
    _generation: int
    mid: int
    body: bytes
    exchange: str
    routing_key: str
    properties: Properties
    redelivered: bool
    settled: bool = False

    @property
    def user_id(self):
        return self.properties.user_id

    def ack(self):
        if not self.settled:
            self.settled = True
            self._transport._settle(self)

    def nack(self, requeue=True):
        if self.settled:
            return
        if requeue:
            self._transport._requeue(self)
        else:
            self.ack()


@attrs.define(eq=False)
class _Consumer:
    queue: str
    _transport: object
    callback: object
    prefetch: int

    def cancel(self):
        self._transport._cancel(self)
        return defer.succeed(None)


class _Socket:
    """The socket of one connection as a reactor reader and writer."""

    def __init__(self, transport, sock):
        self._transport = transport
        self._sock = sock

    def fileno(self):
        return self._sock.fileno()

    def logPrefix(self):
        return "mqtt"

    def doRead(self):
        self._transport._client.loop_read()
        self._transport._flush()

    def doWrite(self):
        self._transport._client.loop_write()
        self._transport._flush()

    def connectionLost(self, reason):
        pass


class MqttTransport:
    """One reconnecting MQTT v5 connection at C{url} (see the module docstring)."""

    lost_messages = False

    def __init__(
        self, url, reactor, session=None, prefetch=100, receive_maximum=100, session_expiry=86400
    ):
        self.address = MqttAddress.parse(url)
        self.user = self.address.user or "anonymous"
        self.reactor = reactor
        self.session = session
        self.prefetch = prefetch
        self.receive_maximum = receive_maximum
        self.session_expiry = session_expiry
        self._client = None
        self._socket = None
        self._generation = 0
        self._connected = False
        self._closed = False
        self._attempt = 0
        self._retry_call = None
        self._misc = None
        self._waiting = []  # Deferreds of connect() and calls waiting for a connection
        self._publishes = {}  # mid -> (Deferred, mandatory, exchange, routing key)
        self._subscribing = {}  # mid -> Deferred
        self._filters = []  # the subscription filters of every bind
        self._consumer = None
        self._ready = collections.deque()  # deliveries not yet handed to the consumer
        self._unsettled = 0
        self._loss_listeners = []
        self._events = collections.deque()  # paho's callbacks, run in order on a later turn
        self._policy = backoffPolicy(initialDelay=0.5, maxDelay=30.0, factor=1.6)

    def __repr__(self):
        return f"<MqttTransport {self.address} session={self.session!r}>"

    # Connection.

    def _make_client(self):
        client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=self.session or "",
            protocol=paho.MQTTv5,
            manual_ack=True,
        )
        if self.address.user is not None:
            client.username_pw_set(self.address.user, self.address.password)
        if self.address.tls:
            client.tls_set_context(ssl.create_default_context())
        # paho holds a lock while it calls these: what they start runs on a later turn.
        client.on_connect = self._later(self._on_connect)
        client.on_disconnect = self._later(self._on_disconnect)
        client.on_message = self._later(self._on_message)
        client.on_publish = self._later(self._on_publish)
        client.on_subscribe = self._later(self._on_subscribe)
        client.on_socket_close = self._on_socket_close
        props = MqttProperties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.session_expiry
        props.ReceiveMaximum = self.receive_maximum
        client.connect_async(
            self.address.host, self.address.port, keepalive=30, clean_start=False,
            properties=props,
        )
        return client

    def _later(self, handler):
        def queue(*args):
            self._events.append((handler, args))
            if len(self._events) == 1:
                self.reactor.callFromThread(self._run_events)

        return queue

    def _run_events(self):
        while self._events:
            handler, args = self._events[0]
            try:
                handler(*args)
            except Exception:
                log.failure("{address}: handling an MQTT event failed", address=self.address)
            self._events.popleft()

    def connect(self):
        """Connect and subscribe what was bound. Fires with this transport; the first attempt
        failing fails it (TransportError naming the broker); later losses are repaired."""
        if self._client is None:
            if not self.session:
                self.session = f"ion_{id(self):x}"
            self._client = self._make_client()
            self._misc = task.LoopingCall(self._loop_misc)
            self._misc.clock = self.reactor
            self._misc.start(1.0, now=False)
            self._start_attempt(first_attempt=True)
        return self.whenConnected()

    def whenConnected(self):
        if self._closed:
            return defer.fail(ConnectionLost(f"{self.address}: transport is closed"))
        if self._connected:
            return defer.succeed(self)
        waiting = defer.Deferred()
        self._waiting.append(waiting)
        return waiting

    def _start_attempt(self, first_attempt=False):
        self._retry_call = None
        if self._closed:
            return
        pool = self.reactor.getThreadPool()
        attempt = threads.deferToThreadPool(self.reactor, pool, self._client.reconnect)
        attempt.addCallbacks(self._socket_open, self._attempt_failed, errbackArgs=(first_attempt,))

    def _socket_open(self, rc):
        if self._closed:
            self._client.socket().close()
            return
        self._socket = _Socket(self, self._client.socket())
        self.reactor.addReader(self._socket)
        self._flush()

    def _attempt_failed(self, failure, first_attempt):
        error = TransportError(f"cannot connect to {self.address}: {failure.getErrorMessage()}")
        if first_attempt:
            self._fail_waiting(error)
            self._stop_timers()
            self._client = None
            return
        self._retry(error)

    def _retry(self, error):
        if self._closed or self._retry_call is not None:
            return
        self._attempt += 1
        delay = self._policy(self._attempt)
        log.warn("{address}: {error}; next attempt in {delay:.1f} s", address=self.address,
                 error=error, delay=delay)
        self._retry_call = self.reactor.callLater(delay, self._start_attempt)

    def _on_connect(self, client, userdata, flags, reason, properties):
        if reason.is_failure:
            error = TransportError(f"{self.address} refused the connection: {reason}")
            if self._attempt == 0 and any(not d.called for d in self._waiting):
                self._fail_waiting(error)
                self._closed = True
                self._stop_timers()
                client.disconnect()
            return
        self._attempt = 0
        self._generation += 1
        self._unsettled = 0
        # The session kept the subscriptions; subscribing again is harmless and covers an
        # expired one.
        d = defer.gatherResults([self._subscribe(f) for f in self._filters], consumeErrors=True)
        d.addCallbacks(self._subscribed, self._subscribe_failed)

    def _subscribed(self, _):
        self._connected = True
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(self)
        self._deliver()

    def _subscribe_failed(self, failure):
        error = failure.value.subFailure.value if hasattr(failure.value, "subFailure") else failure
        self._fail_waiting(TransportError(f"{self.address}: {error}"))
        if self._client is not None:
            self._client.disconnect()

    def _fail_waiting(self, error):
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            if not d.called:
                d.errback(error)

    def _on_disconnect(self, client, userdata, flags, reason, properties):
        was_connected, self._connected = self._connected, False
        self._generation += 1
        lost = ConnectionLost(f"{self.address}: connection lost ({reason})")
        publishes, self._publishes = self._publishes, {}
        for d, *_ in publishes.values():
            d.errback(lost)
        subscribing, self._subscribing = self._subscribing, {}
        for d in subscribing.values():
            d.errback(lost)
        # Deliveries not yet handed out come again from the broker, to this session.
        self._ready = collections.deque(d for d in self._ready if d.settled)
        if self._closed:
            return
        if was_connected:
            log.warn("{address}: connection lost ({reason}); reconnecting",
                     address=self.address, reason=reason)
            for listener in self._loss_listeners:
                listener(lost)
        self._retry(lost)

    def _on_socket_close(self, client, userdata, sock):
        if self._socket is not None:
            self.reactor.removeReader(self._socket)
            self.reactor.removeWriter(self._socket)
            self._socket = None

    def _flush(self):
        """Write what paho has queued; watch for writability while some remains."""
        client = self._client
        if client is None or self._socket is None:
            return
        if client.want_write():
            client.loop_write()
        if self._socket is not None:
            if client.want_write():
                self.reactor.addWriter(self._socket)
            else:
                self.reactor.removeWriter(self._socket)

    def _loop_misc(self):
        if self._client is not None and self._socket is not None:
            self._client.loop_misc()
            self._flush()

    def _stop_timers(self):
        if self._misc is not None and self._misc.running:
            self._misc.stop()
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None

    def on_connection_lost(self, listener):
        self._loss_listeners.append(listener)

    async def close(self):
        """Disconnect (the session and its subscriptions stay on the broker until they
        expire); unconfirmed publishes fail with ConnectionLost."""
        if self._closed:
            return
        self._closed = True
        self._stop_timers()
        client = self._client
        if client is not None and self._socket is not None:
            client.disconnect()  # paho closes the socket once DISCONNECT is written
            self._flush()
        if self._socket is not None:
            sock = client.socket()
            self._on_socket_close(client, None, sock)
            sock.close()
        self._on_disconnect(client, None, None, "closed", None)
        self._fail_waiting(ConnectionLost(f"{self.address}: transport is closed"))

    # Exchanges, queues, bindings: sr3's mapping needs nothing declared.

    async def declare_exchange(self, name, type="topic", durable=False, auto_delete=False):
        pass

    async def delete_exchange(self, name, if_unused=False):
        pass

    async def declare_queue(
        self, name, durable=False, exclusive=False, auto_delete=False, arguments=None
    ):
        # A queue is the session's subscriptions; RabbitMQ's queue arguments have no MQTT
        # counterpart (the broker's own settings bound redeliveries there).
        return name

    async def delete_queue(self, name):
        pass

    async def queue_depth(self, name):
        raise NotFound(f"an MQTT broker does not tell how many messages wait for {name!r}")

    async def bind(self, queue, exchange, routing_key):
        topic = filter_of(queue, exchange, routing_key)
        if topic not in self._filters:
            self._filters.append(topic)
            if self._connected:
                await self._subscribe(topic)

    async def unbind(self, queue, exchange, routing_key):
        topic = filter_of(queue, exchange, routing_key)
        if topic in self._filters:
            self._filters.remove(topic)
            if self._connected:
                self._client.unsubscribe(topic)
                self._flush()

    def _subscribe(self, topic):
        rc, mid = self._client.subscribe(topic, options=SubscribeOptions(qos=1))
        self._flush()
        if rc != paho.MQTT_ERR_SUCCESS:
            return defer.fail(ConnectionLost(f"{self.address}: cannot subscribe: {rc}"))
        d = self._subscribing[mid] = defer.Deferred()
        return d.addCallback(self._check_granted, topic)

    def _check_granted(self, reasons, topic):
        for reason in reasons:
            if reason.is_failure:
                raise TransportError(f"{self.address} refused the subscription {topic}: {reason}")

    def _on_subscribe(self, client, userdata, mid, reasons, properties):
        d = self._subscribing.pop(mid, None)
        if d is not None:
            d.callback(reasons)

    # Publishing.

    def publish(self, exchange, routing_key, body, properties=None, mandatory=True):
        """Publish with QoS 1; fires on the broker's PUBACK (see the module docstring)."""
        if not self._connected:
            return defer.fail(ConnectionLost(f"{self.address}: not connected"))
        properties = properties or Properties()
        props = MqttProperties(PacketTypes.PUBLISH)
        props.PayloadFormatIndicator = 1
        props.ContentType = properties.content_type
        headers = [(str(k), str(v)) for k, v in (properties.headers or {}).items()]
        if headers:
            props.UserProperty = headers
        topic = topic_of(exchange, routing_key)
        info = self._client.publish(topic, body, qos=1, properties=props)
        self._flush()
        if info.rc != paho.MQTT_ERR_SUCCESS:
            return defer.fail(ConnectionLost(f"{self.address}: cannot publish: {info.rc}"))
        d = defer.Deferred()
        self._publishes[info.mid] = (d, mandatory, exchange, routing_key)
        return d

    def _on_publish(self, client, userdata, mid, reason, properties):
        entry = self._publishes.pop(mid, None)
        if entry is None:
            return  # confirmed after we gave up on it (connection lost): a duplicate at worst
        d, mandatory, exchange, routing_key = entry
        if reason.is_failure:
            d.errback(TransportError(f"{self.address} refused a publish to {exchange}: {reason}"))
        elif mandatory and reason.value == NO_MATCHING_SUBSCRIBERS:
            d.errback(Unroutable(exchange, routing_key))
        else:
            d.callback(None)

    # Consuming.

    async def consume(self, queue, callback, prefetch=None):
        if self._consumer is not None:
            raise TransportError(f"{self.address}: one consumer per MQTT transport")
        self._consumer = _Consumer(queue, self, callback, prefetch or self.prefetch)
        self.reactor.callLater(0, self._deliver)
        return self._consumer

    def _cancel(self, consumer):
        if self._consumer is consumer:
            self._consumer = None

    def _on_message(self, client, userdata, message):
        exchange, _, rest = message.topic.partition("/")
        props = message.properties
        headers = dict(getattr(props, "UserProperty", None) or [])
        properties = Properties(
            content_type=getattr(props, "ContentType", None) or "application/json",
            delivery_mode=2,
            headers=headers,
        )
        delivery = _Delivery(
            self, self._generation, message.mid, message.payload, exchange,
            rest.replace("/", "."), properties, bool(message.dup),
        )
        self._ready.append(delivery)
        self._deliver()

    def _deliver(self):
        consumer = self._consumer
        while consumer is not None and self._ready and self._unsettled < consumer.prefetch:
            delivery = self._ready.popleft()
            self._unsettled += 1
            try:
                consumer.callback(delivery)
            except Exception:
                log.failure("{address}: consumer callback failed", address=self.address)
                delivery.ack()
            consumer = self._consumer

    def _settle(self, delivery):
        if delivery._generation == self._generation:
            self._unsettled -= 1
            if self._connected:
                self._client.ack(delivery.mid, 1)
                self._flush()
        self._deliver()

    def _requeue(self, delivery):
        if delivery._generation != self._generation:
            return
        self._unsettled -= 1
        delivery.redelivered = True
        self._ready.appendleft(delivery)
        self.reactor.callLater(0, self._deliver)
