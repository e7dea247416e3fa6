"""Tests for L{ion.apps.pump.transfer.httpwire}: the HTTP/1.1 client of kept connections,
fed a server's bytes over a string transport (every split of a response, every limit, every
framing a hostile server may try), then over loopback against real and scripted servers."""

import os

from twisted.internet import reactor
from twisted.internet.error import ConnectionAborted
from twisted.internet.defer import CancelledError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH

from ion.apps.pump import transfer
from ion.apps.pump.transfer import httpwire
from ion.apps.pump.transfer.errors import ConnectionFailed
from ion.apps.pump.transfer.httpwire import BadResponse, NoResponse, Stale, WirePool
from tests.apps.pump.servers import leftovers, settle

KEY = (b"http", b"example.org", 80)
GET = b"GET /f HTTP/1.1\r\nHost: example.org\r\n\r\n"


class Body(Protocol):
    """Collects a response body and how it ended."""

    def __init__(self):
        self.chunks = []
        self.reason = None

    def dataReceived(self, data):
        self.chunks.append(data)

    def connectionLost(self, reason):
        self.reason = reason

    @property
    def data(self):
        return b"".join(self.chunks)


class WireTests(TestCase):
    """
    L{Wire} reads responses whatever way their bytes are cut, keeps the connection only
    after a whole response that allows it, and refuses what breaks HTTP/1.1's framing.
    """

    def setUp(self):
        self.clock = Clock()
        self.pool = WirePool(self.clock, per_host=2, idle_timeout=60)

    def wire(self, reused=False):
        wire = self.pool.factory(KEY).buildProtocol(None)
        wire.makeConnection(StringTransport())
        wire.reused = reused
        return wire

    def answered(self, head):
        """A new wire whose GET got C{head} (a response's first bytes): the wire and the
        response, its body not taken yet."""
        wire = self.wire()
        responses = []
        wire.request(GET).addCallback(responses.append)
        wire.dataReceived(head)
        return wire, responses[0]

    def exchange(self, pieces, wire=None):
        """Send a GET over a (new) wire, feed it C{pieces}; the wire, the response (or the
        failure) and the body's collector."""
        wire = wire or self.wire()
        outcome = []
        wire.request(GET).addBoth(outcome.append)
        for piece in pieces:
            wire.dataReceived(piece)
        body = Body()
        if outcome and not isinstance(outcome[0], Failure):
            outcome[0].deliverBody(body)
        return wire, (outcome[0] if outcome else None), body

    def assertWhole(self, wire, response, body, data, kept=True):
        self.assertEqual(response.code, 200)
        self.assertEqual(body.data, data)
        self.assertIsInstance(body.reason.value, ResponseDone)
        self.assertIs(self.pool.take(KEY), wire if kept else None)
        self.assertEqual(wire.transport.disconnecting, not kept)

    def assertRefused(self, outcome, wire, words):
        self.assertIsInstance(outcome, Failure)
        outcome.trap(BadResponse)
        self.assertIn(words, str(outcome.value))
        self.assertTrue(wire.transport.disconnecting)
        self.assertIsNone(self.pool.take(KEY))

    def test_requestWritten(self):
        """
        The request goes out as given, in one write.
        """
        wire = self.wire()
        wire.request(GET)
        self.assertEqual(wire.transport.value(), GET)

    def test_lengthCutAnywhere(self):
        """
        A response with Content-Length arrives whole however its bytes are cut, and its
        connection is kept for the next request.
        """
        data = b"0123456789" * 5
        raw = b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\nX-A: 1\r\nX-A: 2\r\n\r\n" + data
        for cut in range(1, len(raw)):
            wire, response, body = self.exchange([raw[:cut], raw[cut:]])
            self.assertEqual(response.length, 50)
            self.assertEqual(response.headers.getRawHeaders(b"X-A"), [b"1", b"2"])
            self.assertWhole(wire, response, body, data)

    def test_byteAtATime(self):
        """
        A chunked body with chunk extensions and trailers, fed a byte at a time, arrives
        whole; the connection is kept.
        """
        raw = (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;name=value\r\nhello\r\n1A\r\n" + b"z" * 26 + b"\r\n0\r\nX-Sum: 1\r\n\r\n"
        )
        wire, response, body = self.exchange([raw[i : i + 1] for i in range(len(raw))])
        self.assertEqual(response.length, UNKNOWN_LENGTH)
        self.assertWhole(wire, response, body, b"hello" + b"z" * 26)

    def test_chunkedAtOnce(self):
        """
        A chunked response in one read, its body held until a protocol takes it.
        """
        raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        wire, response, body = self.exchange([raw])
        self.assertWhole(wire, response, body, b"abc")

    def test_tinyChunksHandedOverTogether(self):
        """
        The chunks of one read reach the body's protocol in one call, however small: a
        server sending a byte per chunk does not cost a call per byte.
        """
        wire, response = self.answered(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        body = Body()
        response.deliverBody(body)
        wire.dataReceived(b"1\r\nx\r\n" * 1000)
        wire.dataReceived(b"1\r\ny\r\n" * 1000 + b"0\r\n\r\n")
        self.assertEqual(body.chunks, [b"x" * 1000, b"y" * 1000])
        self.assertIsInstance(body.reason.value, ResponseDone)

    def test_bareLineFeeds(self):
        """
        Lines ended by LF alone are read as CRLF ones.
        """
        raw = b"HTTP/1.1 200 OK\nContent-Length: 3\n\nabc"
        wire, response, body = self.exchange([raw])
        self.assertWhole(wire, response, body, b"abc")

    def test_interimResponsesSkipped(self):
        """
        100 Continue and 103 Early Hints before the answer are passed over; more than
        C{MAX_INTERIM} of them are refused.
        """
        final = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        wire, response, body = self.exchange([interim + final])
        self.assertWhole(wire, response, body, b"ok")
        many = b"HTTP/1.1 100 Continue\r\n\r\n" * (httpwire.MAX_INTERIM + 1)
        wire, outcome, _ = self.exchange([many + final])
        self.assertRefused(outcome, wire, "interim response 100")

    def test_noBody(self):
        """
        204 and 304 have no body, whatever length they name; the connection is kept.
        """
        for code in (b"204 No Content", b"304 Not Modified"):
            raw = b"HTTP/1.1 " + code + b"\r\nContent-Length: 10\r\n\r\n"
            wire, response, body = self.exchange([raw])
            self.assertEqual(body.data, b"")
            self.assertIsInstance(body.reason.value, ResponseDone)
            self.assertIs(self.pool.take(KEY), wire)

    def test_untilClose(self):
        """
        A body without length ends with the connection (PotentialDataLoss, as Twisted's
        client says it); such a connection is never kept.
        """
        wire, response, body = self.exchange([b"HTTP/1.0 200 OK\r\n\r\nsome", b" more"])
        self.assertIsNone(body.reason)
        wire.connectionLost(Failure(ConnectionFailed("closed")))
        self.assertEqual(body.data, b"some more")
        self.assertIsInstance(body.reason.value, PotentialDataLoss)
        self.assertIsNone(self.pool.take(KEY))

    def test_untilCloseStopped(self):
        """
        A body without length whose protocol stopped it (a timeout) ends failed, not whole:
        the connection's end is then no proof that the body was all there.
        """
        wire, response, body = self.exchange([b"HTTP/1.0 200 OK\r\n\r\nsome"])
        response.stopProducing()
        wire.connectionLost(Failure(ConnectionAborted()))
        body.reason.trap(ResponseFailed)
        self.assertEqual(body.data, b"some")

    def test_notKept(self):
        """
        C{Connection: close}, an HTTP/1.0 response, and bytes past the end of a response
        each close the connection once the body is in; the body still arrives whole.
        """
        for raw in [
            b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, close\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\nextra",
        ]:
            wire, response, body = self.exchange([raw])
            self.assertWhole(wire, response, body, b"ok", kept=False)

    def test_hostileHeads(self):
        """
        A response head that breaks the framing or the limits fails the request with
        L{BadResponse}, saying what was wrong, and closes the connection.
        """
        many = b"".join(b"X-%d: 1\r\n" % n for n in range(httpwire.MAX_HEADERS + 1))
        for raw, words in [
            (b"HTTP/1.1 200 OK\r\n" + b"X: " + b"a" * httpwire.MAX_HEAD, "response head over"),
            (b"HTTP/1.1 200 OK\r\n" + many + b"\r\n", "header lines"),
            (b"SSH-2.0-OpenSSH\r\n\r\n", "malformed status line"),
            (b"HTTP/2 200 OK\r\n\r\n", "malformed status line"),
            (b"HTTP/1.1 20 OK\r\n\r\n", "malformed status line"),
            (b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n", "malformed header line"),
            (b"HTTP/1.1 200 OK\r\nNo colon\r\n\r\n", "malformed header line"),
            (b"HTTP/1.1 200 OK\r\nA b: c\r\n\r\n", "malformed header line"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
             "both Content-Length and Transfer-Encoding"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
             "unusable Content-Length"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: -3\r\n\r\n", "unusable Content-Length"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 19 + b"\r\n\r\n",
             "unusable Content-Length"),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "transfer coding"),
            (b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "HTTP/1.0"),
            (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "interim response 101"),
        ]:
            wire, outcome, _ = self.exchange([raw])
            self.assertRefused(outcome, wire, words)

    def test_endlessHeadHeldBounded(self):
        """
        A head that never ends, sent in small pieces, is refused once it passes
        C{MAX_HEAD} bytes: what the wire holds stays under that.
        """
        wire = self.wire()
        outcome = []
        wire.request(GET).addBoth(outcome.append)
        wire.dataReceived(b"HTTP/1.1 200 OK\r\n")
        sent = 0
        while not outcome:
            wire.dataReceived(b"X-Pad: " + b"a" * 1000 + b"\r\n")
            sent += 1009
            self.assertLessEqual(len(wire._buffer), httpwire.MAX_HEAD)
        self.assertRefused(outcome[0], wire, "response head over")
        self.assertLess(sent, httpwire.MAX_HEAD + 2000)

    def test_hostileBodies(self):
        """
        A chunked body that breaks its framing or the limits ends with L{BadResponse} after
        the bytes that were right; the connection is closed.
        """
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        for raw, words in [
            (b"2\r\nokzz\r\n", "chunk longer than its size"),
            (b"2\r\nok\r\nxyz\r\n", "malformed chunk-size line"),
            (b"-1\r\n", "malformed chunk-size line"),
            (b"1" * 17 + b"\r\n", "malformed chunk-size line"),
            (b"2\r\nok\r\n1" + b";x" * httpwire.MAX_CHUNK_LINE, "line too long"),
            (b"2\r\nok\r\n0\r\n" + b"X: y\r\n" * (httpwire.MAX_TRAILER // 5 + 1),
             "line too long"),
            (b"2\r\nok\r\n0\r\nX: " + b"y" * httpwire.MAX_CHUNK_LINE, "line too long"),
        ]:
            wire, response, body = self.exchange([head, raw])
            self.assertEqual(body.data, b"ok"[: body.data.__len__()])
            self.assertIsInstance(body.reason, Failure, str(raw[:20]))
            body.reason.trap(BadResponse)
            self.assertIn(words, str(body.reason.value))
            self.assertTrue(wire.transport.disconnecting)
            self.assertIsNone(self.pool.take(KEY))

    def test_cutShort(self):
        """
        A connection lost in the middle of a body with a length ends it with
        C{ResponseFailed}; the connection is not kept.
        """
        wire, response, body = self.exchange([b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc"])
        wire.connectionLost(Failure(ConnectionFailed("reset")))
        self.assertEqual(body.data, b"abc")
        body.reason.trap(ResponseFailed)
        self.assertIsNone(self.pool.take(KEY))

    def test_unaskedBytes(self):
        """
        Bytes on a kept connection while no request waits close it: it leaves the pool at
        once.
        """
        wire, response, body = self.exchange([b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"])
        wire.dataReceived(b"HTTP/1.1 200 OK\r\n")
        self.assertTrue(wire.transport.disconnecting)
        self.assertIsNone(self.pool.take(KEY))  # at once, not when the end comes
        wire.connectionLost(Failure(ConnectionFailed("closed")))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stale(self):
        """
        A kept connection that ends before a byte of the answer fails the request with
        L{Stale} (it may go again); a new connection, or one that had begun to answer,
        fails it with L{NoResponse}, which holds why the connection ended.
        """
        for reused, pieces, error in [
            (True, [], Stale),
            (False, [], NoResponse),
            (True, [b"HTTP/1.1 2"], NoResponse),
        ]:
            wire = self.wire(reused=reused)
            outcome = []
            wire.request(GET).addBoth(outcome.append)
            for piece in pieces:
                wire.dataReceived(piece)
            wire.connectionLost(Failure(ConnectionFailed("closed")))
            outcome[0].trap(error)
            if error is NoResponse:
                self.assertEqual(outcome[0].value.reasons[0].getErrorMessage(), "closed")

    def test_earlyBodyBounded(self):
        """
        Body bytes that come before a protocol takes them are held; past C{MAX_EARLY} the
        connection is paused, and resumed once they are handed over.
        """
        size = httpwire.MAX_EARLY + 10
        wire, response = self.answered(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (size + 5)
        )
        wire.dataReceived(b"x" * size)
        self.assertEqual(wire.transport.producerState, "paused")
        body = Body()
        response.deliverBody(body)
        self.assertEqual(wire.transport.producerState, "producing")
        wire.dataReceived(b"y" * 5)
        self.assertEqual(body.data, b"x" * size + b"y" * 5)
        self.assertIsInstance(body.reason.value, ResponseDone)

    def test_pausedThenKept(self):
        """
        A connection its body's protocol paused is resumed when the response ends and goes
        back to the pool producing.
        """
        wire, response, body = self.exchange([b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab"])
        response.pauseProducing()
        self.assertEqual(wire.transport.producerState, "paused")
        wire.dataReceived(b"cd")
        self.assertIs(self.pool.take(KEY), wire)
        self.assertEqual(wire.transport.producerState, "producing")
        response.resumeProducing()  # the protocol's late resume touches nothing
        response.pauseProducing()
        self.assertEqual(wire.transport.producerState, "producing")

    def test_stopProducing(self):
        """
        A body's protocol that stops the transfer aborts the connection; its body ends with
        C{ResponseFailed} once the connection is closed. A protocol that stops while held
        bytes are handed over, or as it is given a response whose bytes are all in, gets
        nothing more.
        """
        wire, response, body = self.exchange([b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab"])
        response.stopProducing()
        self.assertTrue(wire.transport.disconnecting)
        wire.dataReceived(b"cd")
        self.assertIsNone(body.reason)
        wire.connectionLost(Failure(ConnectionAborted()))
        body.reason.trap(ResponseFailed)
        self.assertEqual(body.data, b"ab")

        class StopAtOnce(Body):
            def dataReceived(self, data):
                super().dataReceived(data)
                self.transport.stopProducing()

        wire, response = self.answered(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab")
        wire.dataReceived(b"cd")
        stopping = StopAtOnce()
        response.deliverBody(stopping)
        self.assertEqual(stopping.data, b"ab")  # not the bytes held after those

        class Discard(Body):
            def connectionMade(self):
                self.transport.stopProducing()

        wire, response = self.answered(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found"
        )
        discard = Discard()
        response.deliverBody(discard)
        self.assertEqual(discard.data, b"")
        self.assertIsInstance(discard.reason.value, ResponseDone)
        self.assertIs(self.pool.take(KEY), wire)  # the refusal came whole

    def test_cancel(self):
        """
        Cancelling a request that has no answer yet closes its connection.
        """
        wire = self.wire()
        request = wire.request(GET)
        request.addErrback(lambda f: f.trap(CancelledError))
        request.cancel()
        self.assertTrue(wire.transport.disconnecting)
        wire.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertIsNone(self.pool.take(KEY))

    def test_poolBounds(self):
        """
        The pool keeps at most C{per_host} idle connections an origin, the last kept the
        first taken, and closes each after C{idle_timeout} seconds unused.
        """
        wires = [self.wire() for _ in range(3)]
        for wire in wires:
            self.pool.put(wire)
        self.assertTrue(wires[2].transport.disconnecting)
        self.assertIs(self.pool.take(KEY), wires[1])
        self.pool.put(wires[1])
        self.clock.advance(59)
        self.assertFalse(wires[0].transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(wires[0].transport.disconnecting)
        self.assertTrue(wires[1].transport.disconnecting)
        self.assertIsNone(self.pool.take(KEY))

    def test_poolClose(self):
        """
        Closing the pool closes its idle connections (its Deferred fires once they are
        lost), and each busy one as its response ends.
        """
        wire = self.wire()
        self.pool.put(wire)
        closed = []
        self.pool.close().addCallback(closed.append)
        self.assertTrue(wire.transport.disconnecting)
        self.assertEqual(closed, [])
        wire.connectionLost(Failure(ConnectionFailed("closed")))
        self.assertEqual(len(closed), 1)
        busy = self.wire()
        self.pool.put(busy)  # its response ended after the close
        self.assertTrue(busy.transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_requestBytesChecked(self):
        """
        A request target or header value that would break the request's head is refused
        before anything is sent.
        """
        self.assertEqual(
            httpwire.request_bytes(b"/a%20b?x=1", b"Host: h\r\n\r\n"),
            b"GET /a%20b?x=1 HTTP/1.1\r\nHost: h\r\n\r\n",
        )
        for target in [b"/a b", b"/a\r\nX: y", b"/\x00", b"/\xc3\xa9"]:
            self.assertRaises(ValueError, httpwire.request_bytes, target, b"\r\n")
        self.assertRaises(ValueError, httpwire.header_lines, [(b"Range", b"1\r\nX: y")])
        self.assertRaises(ValueError, httpwire.header_lines, [(b"A B", b"1")])


class _Scripted(Protocol):
    """Answers the first request with the factory's C{answer}, then counts what it reads."""

    def connectionMade(self):
        self.factory.connections.append(self)
        self.answered = False

    def dataReceived(self, data):
        if not self.answered:
            self.answered = True
            self.factory.answer(self.transport)

    def connectionLost(self, reason):
        self.factory.lost.append(self)


class LoopbackTests(TestCase):
    """
    Kept GETs over loopback: a chunked body from a real server, and a hostile one refused
    after a bounded read.
    """

    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        self.dest = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        os.makedirs(self.dest)
        self.connections = transfer.HTTPConnections(reactor, per_host=2)
        self.addCleanup(settle)
        self.addCleanup(self.connections.close)

    def scripted(self, answer):
        factory = Factory.forProtocol(_Scripted)
        factory.connections, factory.lost, factory.answer = [], [], answer
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return factory, f"http://127.0.0.1:{port.getHost().port}/f"

    async def test_chunkedFromTwisted(self):
        """
        twisted.web's chunked body (a resource that names no length) arrives whole, and two
        GETs share the connection.
        """
        from twisted.web import resource, server

        class Chunked(resource.Resource):
            isLeaf = True

            def render_GET(self, request):
                for n in range(50):
                    request.write(b"%04d" % n)
                request.finish()
                return server.NOT_DONE_YET

        site = server.Site(Chunked())
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        accepted = []
        real = site.buildProtocol
        site.buildProtocol = lambda addr: accepted.append(addr) or real(addr)
        expected = b"".join(b"%04d" % n for n in range(50))
        for n in range(2):
            path = os.path.join(self.dest, f"{n}")
            await transfer.get(
                reactor, f"http://127.0.0.1:{port.getHost().port}/c", path,
                http_connections=self.connections,
            )
            with open(path, "rb") as f:
                self.assertEqual(f.read(), expected)
        self.assertEqual(len(accepted), 1)

    async def test_endlessHead(self):
        """
        A server that answers with a head that never ends: the GET fails as a bad response
        once the head passes C{MAX_HEAD}, nothing is left in the destination, and the
        connection is closed.
        """

        def answer(transport):
            transport.write(b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"a" * (4 << 20))

        factory, url = self.scripted(answer)
        with self.assertRaises(ConnectionFailed) as caught:
            await transfer.get(reactor, url, os.path.join(self.dest, "x"),
                               http_connections=self.connections)
        self.assertIn("bad response: response head over", str(caught.exception))
        await settle()
        self.assertEqual(len(factory.lost), 1)
        self.assertEqual(leftovers(self.dest), [])
