"""L{AmqpTransport}: the reconnecting connection and what it declared, behind ITransport."""

import contextlib
import urllib.parse

import attrs
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer, task
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.logger import Logger
from zope.interface import implementer

from ion.core.messaging.amqp._address import AmqpAddress, split_urls
from ion.core.messaging.amqp._consume import _Consumer
from ion.core.messaging.amqp._protocol import _as_deferred, _Protocol, _spawn
from ion.core.messaging.amqp._publish import _amqp_properties, _Publish
from ion.core.messaging.amqp._session import _Session
from ion.core.messaging.amqp._wire import _encode_properties, _shortstr, load_spec
from ion.core.messaging.tls import ClientTls
from ion.core.messaging.transport import (
    ConnectionLost,
    ITransport,
    Properties,
    QueueInUse,
    TransportError,
    body_bytes,
    check_exchange,
    check_queue_arguments,
)

log = Logger()


class _ProtocolFactory(Factory):
    """Builds the protocol of each connection, with its session."""

    noisy = False

    def __init__(self, transport):
        self.transport = transport
        self.built = None  # the protocol built last

    def buildProtocol(self, addr):
        self.built = _Session(self.transport, self.transport._make_client).client
        return self.built


class _BrokerList:
    """The endpoint of a transport given several brokers (the nodes of a cluster): each
    C{connect} tries them in turn, from the one that worked last, until one accepts the TCP
    (and TLS) connection, and fails only when none does, naming each one's error. So the
    ClientService stays the one reconnect loop, and its backoff applies to a whole round.

    The transport's C{address} is set to the broker being tried before each attempt: the
    protocol built for it logs in with that broker's user, password and vhost."""

    def __init__(self, transport, choices):
        self._transport = transport
        self._choices = choices  # [(AmqpAddress, endpoint)]
        self._first = 0  # where the next round starts

    def __repr__(self):
        return ", ".join(str(address) for address, _ in self._choices)

    @_as_deferred
    async def connect(self, factory):
        errors = []
        count = len(self._choices)
        for step in range(count):
            index = (self._first + step) % count
            address, endpoint = self._choices[index]
            self._transport.address = address
            try:
                connected = await endpoint.connect(factory)
            except defer.CancelledError:
                raise
            except Exception as e:
                errors.append(f"{address}: {e}")
                continue
            self._first = index
            return connected
        raise ConnectionLost("; ".join(errors))

    def failed(self, address):
        """The broker at C{address} took the connection but the handshake or restore failed:
        start the next round with the one after it."""
        for index, (candidate, _) in enumerate(self._choices):
            if candidate is address:
                self._first = (index + 1) % len(self._choices)


class _ShieldedEndpoint(Factory):
    """The endpoint the ClientService connects through, keeping from it the loss of a
    connection that it does not take as connected.

    ClientService learns of lost connections from a wrapper around the protocol, and its state
    machine (Twisted 26.10) has no transition for a connection lost while C{prepareConnection}
    runs or after it failed: automat raises NoTransition out of connectionLost. Both happen
    here: the broker closes a connection it refused, a restore is cut. The loss of such a
    connection goes to our protocol only; a failed prepare already counts as a failed attempt."""

    noisy = False

    def __init__(self, endpoint, factory):
        self._endpoint = endpoint
        self._factory = factory
        self._service_factory = None  # the ClientService's, for the attempt under way

    def __repr__(self):
        return repr(self._endpoint)  # ClientService names it in its retry log lines

    def connect(self, service_factory):
        self._service_factory = service_factory
        return self._endpoint.connect(self).addCallback(lambda shield: shield.wrapper)

    def buildProtocol(self, addr):
        wrapper = self._service_factory.buildProtocol(addr)  # builds through self._factory
        return _Shield(wrapper, self._factory.built)


class _Shield(Protocol):
    def __init__(self, wrapper, protocol):
        self.wrapper = wrapper
        self.protocol = protocol

    def makeConnection(self, transport):
        self.wrapper.makeConnection(transport)

    def dataReceived(self, data):
        self.protocol.dataReceived(data)

    def connectionLost(self, reason):
        if self.protocol.session.prepared:
            self.wrapper.connectionLost(reason)
        else:
            self.protocol.connectionLost(reason)


@implementer(ITransport)
class AmqpTransport:
    """One reconnecting connection to RabbitMQ at C{url} (amqp:// or amqps://), or to the
    first that answers of several brokers (the nodes of a cluster): C{url} may list URLs
    separated by commas, or hosts (L{split_urls}). They are tried in turn on connect and on
    every reconnect, each with its own login; C{address} is the one in use (or last tried),
    C{cluster} is true when there are several.

    C{heartbeat} is the AMQP heartbeat in seconds (0 turns it off); C{prefetch} is the default
    for L{consume}. For amqps:// (see L{ion.core.messaging.tls}): C{tls_ca_file} is a PEM file
    with the CA certificates trusted for the broker (default: the system's); C{tls_cert_file}
    and C{tls_key_file} are a client certificate and its key (mode 0600), with which the
    connection logs in with EXTERNAL as the user the broker reads from the certificate: the
    URL's user when it names one (it must be that name: messages carry it as C{user_id}),
    else the certificate's CN (RabbitMQ's C{ssl_cert_login_from = common_name}). The files are
    read here: ValueError when they cannot be used, or are given for an amqp:// URL.
    C{retry_policy(attempt) -> seconds} spaces reconnect attempts
    (default: exponential backoff from 0.5 s up to 30 s, plus up to 1 s of jitter).
    C{connect_timeout} bounds the TCP connect and the AMQP handshake.

    Every method returns a Deferred, failed with a L{TransportError} subclass on refusal.
    Operations before C{connect()} fail with TransportError, while disconnected and after
    C{close()} with ConnectionLost. Consumer callbacks follow L{call_consumer}'s rule."""

    # RabbitMQ keeps the persistent messages of durable queues across its restarts.
    lost_messages = False

    def __init__(
        self,
        url,
        reactor,
        heartbeat=10,
        prefetch=100,
        tls_ca_file=None,
        tls_cert_file=None,
        tls_key_file=None,
        retry_policy=None,
        connect_timeout=30.0,
    ):
        urls = split_urls(url)
        self.addresses = [AmqpAddress.parse(one) for one in urls]
        self.address = self.addresses[0]
        self.cluster = len(self.addresses) > 1
        if len({address.tls for address in self.addresses}) > 1:
            raise ValueError("the broker URLs of a list must all be amqp:// or all amqps://")
        files = (tls_ca_file, tls_cert_file, tls_key_file)
        if not self.address.tls and any(f is not None for f in files):
            raise ValueError(
                f"{self.address}: a CA file, client certificate or key needs an amqps:// URL"
            )
        self._tls = ClientTls.load(*files) if self.address.tls else None
        self.external = self._tls is not None and self._tls.has_certificate
        if self.external:
            for i, one in enumerate(urls):
                if urllib.parse.urlsplit(one).username is not None:
                    continue
                if self._tls.user is None:
                    raise ValueError(
                        f"the client certificate {tls_cert_file} has no CN: name the broker "
                        "user in the URL (amqps://user@host/)"
                    )
                self.addresses[i] = attrs.evolve(self.addresses[i], user=self._tls.user)
            self.address = self.addresses[0]
        if len({address.user for address in self.addresses}) > 1:
            # Messages carry the connection's user as user_id: it must not change on failover.
            raise ValueError("the broker URLs of a list must all name the same user")
        self.user = self.address.user
        self.reactor = reactor
        self.heartbeat = heartbeat
        self.prefetch = _check_prefetch(prefetch)
        self.connect_timeout = connect_timeout
        self._retry_policy = retry_policy or backoffPolicy(
            initialDelay=0.5, maxDelay=30.0, factor=1.6
        )
        self._service = None  # the ClientService, from connect() on
        self._brokers = None  # its _BrokerList
        self._may_retry = False  # the first connect() failed: connect() may try again
        self._connected = None  # what connect() returned
        # The session in use: from the moment its consumers are re-attached (their handlers
        # run at once, redelivered messages first, and may publish, ack and declare on it)
        # until it is lost.
        self._session = None
        self._exchanges = {}  # name -> (type, durable, auto_delete)
        self._queues = {}  # name -> (durable, exclusive, auto_delete, server-named, arguments)
        self._bindings = {}  # (queue, exchange, routing key) -> None
        self._consumers = {}  # _Consumer -> None
        self._loss_listeners = []
        self._default_properties = None  # those of Properties(), encoded when first used

    def __repr__(self):
        state = "new" if self._service is None else "open" if self._service.running else "closed"
        return f"<AmqpTransport {self.address} {state}>"

    @property
    def brokers(self):
        """The broker URLs, passwords hidden, as one text (for messages)."""
        return ", ".join(str(address) for address in self.addresses)

    # Connection.

    def _endpoint(self):
        choices = []
        for address in self.addresses:
            endpoint = HostnameEndpoint(
                self.reactor, address.host, address.port, timeout=self.connect_timeout
            )
            if address.tls:
                endpoint = wrapClientTLS(self._tls.creator(address.host), endpoint)
            choices.append((address, endpoint))
        if len(choices) == 1:
            return choices[0][1]
        self._brokers = _BrokerList(self, choices)
        return self._brokers

    def _make_client(self, session):
        address = self.address
        if self.external:
            # The broker takes the user from the client certificate it verified.
            mechanism, response = "EXTERNAL", b""
        else:
            mechanism = "PLAIN"
            response = b"\0" + address.user.encode() + b"\0" + address.password.encode()
        return _Protocol(
            session, load_spec(), address.vhost, mechanism, response, self.heartbeat, self.reactor
        )

    def connect(self):
        """Connect, authenticate and open the channels. Fires with this transport; fails
        (and gives up) if the first attempt fails (given several brokers: after as many
        attempts, so that each may refuse the handshake once); called again then, it tries
        once more.
        Later losses are repaired on their own."""
        if self._service is not None and not self._may_retry:
            return self.whenConnected()
        self._may_retry = False
        try:
            endpoint = self._endpoint()
        except (OSError, ValueError) as e:
            return defer.fail(TransportError(f"{self.address}: {e}"))
        factory = _ProtocolFactory(self)
        self._service = ClientService(
            _ShieldedEndpoint(endpoint, factory),
            factory,
            retryPolicy=self._retry_policy,
            clock=self.reactor,
            prepareConnection=lambda protocol: defer.Deferred.fromCoroutine(
                self._prepare(protocol.session)
            ),
        )
        self._service.startService()
        # With several brokers, each may refuse the handshake once before connect() fails.
        self._connected = self._service.whenConnected(failAfterFailures=len(self.addresses))
        self._connected.addCallbacks(lambda _: self, self._first_attempt_failed)
        return self._connected

    def _first_attempt_failed(self, failure):
        if failure.check(defer.CancelledError):
            raise ConnectionLost(f"{self.address}: closed while connecting")
        error = failure.value
        if not isinstance(error, TransportError):
            error = ConnectionLost(error)
        error = type(error)(f"cannot connect to {self.brokers}: {error}")
        # Failed from inside the ClientService's state machine, which cannot stop from there.
        stopping = task.deferLater(self.reactor, 0, self._service.stopService)
        return stopping.addCallback(self._forget_service, error)

    def _forget_service(self, _, error):
        # Stopped before it ever connected: a later connect() (a boot retrying, see
        # Container.start) starts afresh; other operations fail as on a closed transport.
        self._may_retry = True
        return Failure(error)

    def whenConnected(self):
        """Fires with this transport once it is connected (on the next turn if it is now)."""
        try:
            self._check_open()
        except TransportError:
            return defer.fail()
        # The ClientService learns of a lost connection after our protocol, whose errbacks may
        # call here first, and it refuses calls from its own callbacks: ask on the next turn.
        waiting = task.deferLater(self.reactor, 0, self._service.whenConnected)
        waiting.addCallback(lambda _: self)
        waiting.addErrback(self._closed_while_waiting)
        return waiting

    def _closed_while_waiting(self, failure):
        failure.trap(defer.CancelledError)
        raise ConnectionLost(f"{self.address}: transport is closed")

    async def _prepare(self, session):
        """Set up a new connection: the ClientService's prepareConnection. A failure fails
        the attempt, which the ClientService retries after its backoff."""
        setup = defer.Deferred.fromCoroutine(self._restore(session))
        setup.addTimeout(self.connect_timeout, self.reactor)
        try:
            await setup
        except Exception as e:
            # `_session` stays until the connection is gone (`_session_lost`), so that the
            # loss listeners learn of it: handlers may have sent requests on it.
            error = e
            if isinstance(e, defer.TimeoutError):
                error = ConnectionLost(f"no AMQP handshake within {self.connect_timeout} s")
            if not session.is_lost:
                session.client.transport.abortConnection()
            if self._brokers is not None:
                self._brokers.failed(self.address)
            if self._connected.called:
                log.warn(
                    "AMQP: setting up the connection to {address} failed: {error}",
                    address=self.address,
                    error=error,
                )
            raise error from None
        session.prepared = True
        if self._connected.called:
            log.info("AMQP: reconnected to {address}", address=self.address)

    async def _restore(self, session):
        """Open the session, declare again what this transport declared before, and re-attach
        consumers; only what the broker refused on a live connection is dropped (see
        L{_redo})."""
        await session.open()
        for name, (type, durable, auto_delete) in list(self._exchanges.items()):
            step = self._declare_exchange_on(session, name, type, durable, auto_delete)
            if not await self._redo(session, step, "exchange", name):
                self._exchanges.pop(name, None)
        for name, declared in list(self._queues.items()):
            durable, exclusive, auto_delete, generated, arguments = declared
            if generated:
                log.warn(
                    "AMQP: server-named queue {name!r} does not survive the reconnect", name=name
                )
                self._drop_queue(name)
                continue
            step = self._declare_queue_on(
                session, name, durable, exclusive, auto_delete, arguments
            )
            if not await self._redo(session, step, "queue", name):
                self._drop_queue(name)
        for queue, exchange, key in list(self._bindings):
            step = session.control_call(
                "queue_bind", queue=queue, exchange=exchange, routing_key=key
            )
            if not await self._redo(session, step, "binding", f"{exchange}/{key} -> {queue}"):
                self._bindings.pop((queue, exchange, key), None)
        # Everything a handler may use is declared again by now; from the first consumer on,
        # deliveries arrive and are handled while the others are attached.
        self._session = session
        for consumer in list(self._consumers):
            step = consumer.attach(session)
            if not await self._redo(session, step, "consumer of", consumer.queue):
                consumer.active = False
                self._consumers.pop(consumer, None)

    async def _redo(self, session, step, what, name):
        """Await step (restoring something); when the broker refuses it, log that and return
        False: the caller drops the thing. Raises instead when the error says nothing about the
        thing itself: the connection was lost (dropping then would lose one more consumer at
        every cut restore, until the transport is deaf) or an exclusive queue is still held by
        the previous connection (the broker has not yet noticed it died): the attempt fails,
        to be retried with everything."""
        try:
            await step
        except TransportError as error:
            if isinstance(error, (ConnectionLost, QueueInUse)) or session.is_lost:
                raise
            log.error(
                "AMQP: after reconnecting, could not restore {what} {name!r}: {error}",
                what=what,
                name=name,
                error=error,
            )
            return False
        return True

    def _session_lost(self, session, reason):
        if session is not self._session:
            return
        self._session = None
        if self._service.running and not session.closing:
            log.warn(
                "AMQP: connection to {address} lost ({reason}); reconnecting",
                address=self.address,
                reason=reason.getErrorMessage(),
            )
            error = ConnectionLost(f"connection to {self.address} lost: {reason.getErrorMessage()}")
            for listener in list(self._loss_listeners):
                try:
                    listener(error)
                except Exception:
                    log.failure("AMQP: a connection-loss listener failed")

    def on_connection_lost(self, listener):
        """listener(ConnectionLost) is called each time the connection is lost (not on close)."""
        self._loss_listeners.append(listener)

    def _check_open(self):
        if self._service is None:
            raise TransportError("AMQP transport is not connected; call connect() first")
        if not self._service.running:
            raise ConnectionLost(f"{self.address}: transport is closed")

    def _live_session(self):
        self._check_open()
        session = self._session
        if session is None or session.is_lost:
            raise ConnectionLost(f"not connected to {self.address} (reconnecting)")
        return session

    @_as_deferred
    async def close(self):
        self._may_retry = False
        if self._service is None:
            return
        session, self._session = self._session, None
        consumers, self._consumers = list(self._consumers), {}
        for consumer in consumers:
            consumer.active = False
        if session is not None and not session.is_lost:
            session.closing = True
            await defer.gatherResults(
                [defer.Deferred.fromCoroutine(c._close_channel()) for c in consumers],
                consumeErrors=True,
            )
            for name, (_, exclusive, _, _, _) in list(self._queues.items()):
                if exclusive:
                    with contextlib.suppress(TransportError):
                        await session.control_call("queue_delete", queue=name)
            await session.close()
        await self._service.stopService()

    # Declarations.

    async def _declare_exchange_on(self, session, name, type, durable, auto_delete):
        await session.control_call(
            "exchange_declare",
            exchange=name,
            type=type,
            durable=durable,
            auto_delete=auto_delete,
        )
        session.publisher.known_exchanges.add(name)

    async def _declare_queue_on(self, session, name, durable, exclusive, auto_delete, arguments):
        result = await session.control_call(
            "queue_declare",
            queue=name,
            durable=durable,
            exclusive=exclusive,
            auto_delete=auto_delete,
            arguments=arguments,
        )
        return result.queue

    @_as_deferred
    async def declare_exchange(self, name, type="topic", durable=False, auto_delete=False):
        session = self._live_session()
        check_exchange(_shortstr(name, "exchange name"), type)
        await self._declare_exchange_on(session, name, type, durable, auto_delete)
        self._exchanges[name] = (type, durable, auto_delete)

    @_as_deferred
    async def delete_exchange(self, name, if_unused=False):
        session = self._live_session()
        if not _shortstr(name, "exchange name"):
            raise TransportError("the default exchange '' cannot be deleted")
        await session.control_call("exchange_delete", exchange=name, if_unused=if_unused)
        self._exchanges.pop(name, None)
        for binding in [b for b in self._bindings if b[1] == name]:
            del self._bindings[binding]

    @_as_deferred
    async def declare_queue(
        self, name="", durable=False, exclusive=False, auto_delete=False, arguments=None
    ):
        session = self._live_session()
        _shortstr(name, "queue name")
        arguments = check_queue_arguments(name, durable, exclusive, auto_delete, arguments)
        declared = await self._declare_queue_on(
            session, name, durable, exclusive, auto_delete, arguments
        )
        self._queues[declared] = (durable, exclusive, auto_delete, not name, arguments)
        return declared

    @_as_deferred
    async def queue_depth(self, name):
        """A passive declare: nothing is created."""
        session = self._live_session()
        result = await session.control_call(
            "queue_declare", queue=_shortstr(name, "queue name"), passive=True
        )
        return result.message_count

    @_as_deferred
    async def delete_queue(self, name):
        session = self._live_session()
        await session.control_call("queue_delete", queue=_shortstr(name, "queue name"))
        self._drop_queue(name)

    def _drop_queue(self, name):
        self._queues.pop(name, None)
        for binding in [b for b in self._bindings if b[0] == name]:
            del self._bindings[binding]
        for consumer in [c for c in self._consumers if c.queue == name]:
            consumer.active = False
            del self._consumers[consumer]
            _spawn(consumer._close_channel(), "closing the channel of a deleted queue's consumer")

    @_as_deferred
    async def bind(self, queue, exchange, routing_key):
        await self._binding("queue_bind", queue, exchange, routing_key)
        self._bindings[(queue, exchange, routing_key)] = None

    @_as_deferred
    async def unbind(self, queue, exchange, routing_key):
        await self._binding("queue_unbind", queue, exchange, routing_key)
        self._bindings.pop((queue, exchange, routing_key), None)

    async def _binding(self, method, queue, exchange, routing_key):
        session = self._live_session()
        if not exchange:
            raise TransportError("queues cannot be bound to the default exchange ''")
        await session.control_call(
            method,
            queue=_shortstr(queue, "queue name"),
            exchange=_shortstr(exchange, "exchange name"),
            routing_key=_shortstr(routing_key, "routing key"),
        )

    # Messages.

    def publish(self, exchange, routing_key, body, properties=None, mandatory=True):
        """Publish body; fires with None once the broker confirmed it. Fails with Unroutable
        (mandatory and no queue matched), NotFound (no such exchange) or ConnectionLost (not
        confirmed before the connection went away: the message may or may not have arrived).
        C{properties.user_id} is set to this connection's user."""
        try:
            session = self._live_session()
            if properties is None:
                amqp = self._default_properties
                if amqp is None:
                    amqp = self._default_properties = _encode_properties(
                        load_spec().classes["basic"], _amqp_properties(Properties(), self.user)
                    )
            else:
                amqp = _amqp_properties(properties, self.user)
            message = _Publish(
                _shortstr(exchange, "exchange name"),
                _shortstr(routing_key, "routing key"),
                body_bytes(body),
                amqp,
                bool(mandatory),
            )
        except Exception:
            return defer.fail()
        return session.publisher.publish(message)

    @_as_deferred
    async def consume(self, queue, callback, prefetch=None):
        """As L{ITransport.consume}; prefetch defaults to the transport's."""
        session = self._live_session()
        if not callable(callback):
            raise TypeError(f"consume needs a callable, got {callback!r}")
        prefetch = self.prefetch if prefetch is None else _check_prefetch(prefetch)
        consumer = _Consumer(self, _shortstr(queue, "queue name"), callback, prefetch)
        await consumer.attach(session)
        self._consumers[consumer] = None
        return consumer

    def _consumer_ended(self, consumer, queue_gone=False):
        """Forget a consumer; also forget its queue when it is gone or auto-deletes now."""
        self._consumers.pop(consumer, None)
        queue = consumer.queue
        flags = self._queues.get(queue)
        last = not any(c.queue == queue for c in self._consumers)
        if queue_gone or (flags is not None and flags[2] and last):
            self._drop_queue(queue)


def _check_prefetch(prefetch):
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or not 0 <= prefetch <= 65535:
        raise ValueError(f"prefetch must be an integer 0..65535 (0: no limit), got {prefetch!r}")
    return prefetch
