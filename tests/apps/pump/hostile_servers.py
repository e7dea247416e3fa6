"""Loopback servers that misbehave, for the tests of the pump's transfer bounds: one that
accepts connections and never says a word, and http resources with an endless body or one
that trickles a byte at a time."""

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.web import resource, server

from tests.apps.pump.servers import settle, start_http


class _Silent(Protocol):
    def connectionMade(self):
        self.factory.connections.add(self)

    def connectionLost(self, reason):
        self.factory.connections.discard(self)


class SilentServer:
    """A TCP server on 127.0.0.1 that accepts every connection and never sends a byte (no
    FTP greeting, no SSH banner, no HTTP response)."""

    def __init__(self):
        self.factory = Factory.forProtocol(_Silent)
        self.factory.connections = set()
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.address = f"127.0.0.1:{self.port.getHost().port}"

    async def stop(self):
        await self.port.stopListening()
        for protocol in list(self.factory.connections):
            protocol.transport.abortConnection()
        await settle()


def start_silent(testcase):
    """A started L{SilentServer}, stopped when C{testcase} is cleaned up."""
    silent = SilentServer()
    testcase.addCleanup(lambda: Deferred.fromCoroutine(silent.stop()))
    return silent


class _Endless(resource.Resource):
    """C{/endless}: a body without Content-Length that never ends, as fast as the client
    reads; C{sent} counts its bytes."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.sent = 0

    def render_GET(self, request):
        request.registerProducer(_EndlessProducer(self, request), False)
        return server.NOT_DONE_YET


class _EndlessProducer:
    CHUNK = b"e" * 65536

    def __init__(self, counter, request):
        self.counter = counter
        self.request = request
        self.stopped = False

    def resumeProducing(self):
        if not self.stopped:
            self.counter.sent += len(self.CHUNK)
            self.request.write(self.CHUNK)

    def stopProducing(self):
        self.stopped = True


class _Trickle(resource.Resource):
    """C{/trickle/<size>}: announces C{size} bytes and sends one every C{interval} seconds."""

    isLeaf = True

    def __init__(self, interval):
        super().__init__()
        self.interval = interval

    def render_GET(self, request):
        size = int(request.postpath[0])
        request.setHeader(b"content-length", b"%d" % size)
        calls = []

        def send(left):
            if left == 0:
                request.finish()
                return
            request.write(b"t")
            calls.append(reactor.callLater(self.interval, send, left - 1))

        def stop(_):
            for call in calls:
                if call.active():
                    call.cancel()

        request.notifyFinish().addBoth(stop)
        send(size)
        return server.NOT_DONE_YET


def start_hostile_http(testcase, root, trickle_interval=0.1):
    """The L{tests.apps.pump.servers.HTTPServer} of C{root} with C{/endless} and
    C{/trickle/<size>} (one byte every C{trickle_interval} s) added; C{endless} is the
    former resource (its C{sent} counts the bytes it sent)."""
    http_server = start_http(testcase, root)
    http_server.endless = _Endless()
    http_server.site.resource.putChild(b"endless", http_server.endless)
    http_server.site.resource.putChild(b"trickle", _Trickle(trickle_interval))
    return http_server
