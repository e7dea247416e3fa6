"""
Tests for the http and https schemes of L{ion.apps.pump.transfer}, against twisted.web on
loopback.
"""

import base64
import hashlib
import os
import json
import stat
import subprocess
import sys
import threading
import time
import weakref

from twisted.internet import reactor, threads
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase
from twisted.web.client import URI, BrowserLikePolicyForHTTPS

from ion.apps.pump import transfer
from ion.apps.pump.transfer import (
    AuthFailed,
    ChecksumMismatch,
    ConnectionFailed,
    Credentials,
    NotFound,
    ServerNotTrusted,
    ShortTransfer,
    Timeouts,
    TransferTimeout,
)
from ion.apps.pump.transfer import http, listings
from ion.apps.pump.transfer.blocks import BlockSettings
from ion.apps.pump.transfer.inflight import BUFFER_LIMIT
from tests.apps.pump.fixtures import without_collector
from tests.apps.pump.servers import (
    leftovers,
    make_tls,
    partly_written,
    settle,
    source_threads,
    start_http,
    write_file,
)
from tests.waiting import quiet, until

SECRET = "pa55-w0rd-XyZ"

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

# In a fresh Python, as in a container: TLS deferred (ion.core.lazytls) before the reactor and the
# transfers are imported; then one https GET with the CA (argv[2]) and one without.
DEFERRED_GET = """
import json, sys
from ion.core import lazytls
deferred = lazytls.defer()
from twisted.internet import defer, task
from ion.apps.pump import transfer
from ion.apps.pump.transfer import ServerNotTrusted
before = "OpenSSL" in sys.modules

async def main(reactor):
    url, ca_file, dest = sys.argv[1:4]
    size = (await transfer.get(reactor, url, dest + "/trusted", ca_file=ca_file)).size
    try:
        await transfer.get(reactor, url, dest + "/untrusted")
        untrusted = "fetched"
    except ServerNotTrusted as e:
        untrusted = "ServerNotTrusted" if not e.transient else "transient"
    print(json.dumps({"deferred": deferred, "before": before, "size": size,
                      "untrusted": untrusted}))

task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
"""


def sha512(data):
    return base64.b64encode(hashlib.sha512(data).digest()).decode()


async def connect(testcase, url, ca_file=None):
    """A connection to C{url}'s server as a transfer's agent makes it (closed at the end of
    C{testcase}); its protocol."""
    tls = BrowserLikePolicyForHTTPS(trustRoot=http._trust_root(ca_file))
    endpoints = http._Endpoints(reactor, tls, 10)
    protocol = await endpoints.endpointForURI(URI.fromBytes(url.encode())).connect(
        Factory.forProtocol(Protocol)
    )
    testcase.addCleanup(protocol.transport.loseConnection)
    return protocol


class HTTPTests(TestCase):
    """
    GET, PUT and listings over http.
    """

    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        self.dest_dir = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.root, "sub"))
        os.makedirs(self.dest_dir)
        self.data = os.urandom(200_000)
        write_file(os.path.join(self.root, "data.bin"), self.data)
        write_file(os.path.join(self.root, "small.txt"), b"hello")
        os.utime(os.path.join(self.root, "data.bin"), (1_500_000_000, 1_500_000_000))
        self.server = start_http(self, self.root, user="alice", password=SECRET)
        self.dest = os.path.join(self.dest_dir, "out.bin")
        self.addCleanup(settle)

    def assertNothingLeft(self):
        self.assertEqual(leftovers(self.dest_dir), [])

    async def test_get(self):
        """
        A file arrives whole with its Last-Modified as mtime and its checksums.
        """
        result = await transfer.get(
            reactor,
            self.server.url + "/files/data.bin",
            self.dest,
            expected_size=len(self.data),
            expected_checksum=("sha512", sha512(self.data)),
            cod="md5",
        )
        with open(self.dest, "rb") as f:
            self.assertEqual(f.read(), self.data)
        self.assertEqual(result.size, len(self.data))
        self.assertEqual(set(result.checksum), {"sha512", "md5"})
        self.assertEqual((result.mtime, result.mode), (1_500_000_000.0, None))
        self.assertEqual(os.stat(self.dest).st_mtime, 1_500_000_000)
        self.assertNothingLeft()

    async def test_bodyReceiverFreedAtOnce(self):
        """
        Once a GET is done, what received its body is freed: no cycle leaves it, per file,
        to the garbage collector's passes.
        """
        without_collector(self)
        made = []

        class Receiver(http._BodyReceiver):
            def __init__(self, *args):
                super().__init__(*args)
                made.append(weakref.ref(self))

        self.patch(http, "_BodyReceiver", Receiver)
        await transfer.get(reactor, self.server.url + "/files/small.txt", self.dest)
        await deferLater(reactor, 0, lambda: None)  # out of the calls that returned the body
        self.assertEqual(len(made), 1)
        self.assertIsNone(made[0]())

    async def test_nonAsciiName(self):
        """
        A URL with spaces and non-ASCII characters is percent-encoded on the wire.
        """
        write_file(os.path.join(self.root, "é x.txt"), b"accent")
        result = await transfer.get(reactor, self.server.url + "/files/é x.txt", self.dest)
        self.assertEqual(result.size, 6)

    async def test_mode(self):
        """
        http tells no mode: the caller's applies.
        """
        await transfer.get(reactor, self.server.url + "/files/small.txt", self.dest, mode=0o600)
        self.assertEqual(stat.S_IMODE(os.stat(self.dest).st_mode), 0o600)

    async def test_notFound(self):
        """
        A 404 is L{NotFound}, permanent, and leaves no file.
        """
        with self.assertRaises(NotFound) as caught:
            await transfer.get(reactor, self.server.url + "/files/missing", self.dest)
        self.assertFalse(caught.exception.transient)
        self.assertIn("404", str(caught.exception))
        self.assertEqual(os.listdir(self.dest_dir), [])

    async def test_authFailed(self):
        """
        Missing or wrong credentials are L{AuthFailed}, permanent, with no file and no
        password in the message.
        """
        for url in (
            self.server.url + "/auth/small.txt",
            self.server.url.replace("//", "//alice:wrong@") + "/auth/small.txt",
        ):
            with self.assertRaises(AuthFailed) as caught:
                await transfer.get(reactor, url, self.dest)
            self.assertEqual((caught.exception.code, caught.exception.transient), (403, False))
            self.assertNotIn("wrong", str(caught.exception))
        self.assertEqual(os.listdir(self.dest_dir), [])

    async def test_authFromUrl(self):
        """
        A password in the URL is sent as basic auth.
        """
        url = self.server.url.replace("//", f"//alice:{SECRET}@") + "/auth/small.txt"
        result = await transfer.get(reactor, url, self.dest)
        self.assertEqual(result.size, 5)

    async def test_authFromCredentials(self):
        """
        Without a password in the URL, the credentials file's line for the host is used.
        """
        creds = Credentials.parse(
            f"http://alice:{SECRET}@127.0.0.1:{self.server.port.getHost().port}/\n"
        )
        result = await transfer.get(
            reactor, self.server.url + "/auth/small.txt", self.dest, credentials=creds
        )
        self.assertEqual(result.size, 5)

    async def test_shortBody(self):
        """
        A body shorter than its Content-Length is a transient L{ShortTransfer}; the previous
        file stays.
        """
        write_file(self.dest, b"previous")
        with self.assertRaises(ShortTransfer) as caught:
            await transfer.get(reactor, self.server.url + "/short/100000", self.dest)
        self.assertTrue(caught.exception.transient)
        self.assertIn("50000 of 100000", str(caught.exception))
        with open(self.dest, "rb") as f:
            self.assertEqual(f.read(), b"previous")
        self.assertNothingLeft()

    async def test_checksumMismatch(self):
        """
        A checksum mismatch leaves the previous file untouched and no temporary file.
        """
        write_file(self.dest, b"previous")
        with self.assertRaises(ChecksumMismatch):
            await transfer.get(
                reactor,
                self.server.url + "/files/data.bin",
                self.dest,
                expected_checksum=("sha512", sha512(b"other")),
            )
        with open(self.dest, "rb") as f:
            self.assertEqual(f.read(), b"previous")
        self.assertNothingLeft()

    async def test_stalled(self):
        """
        A server that stops sending mid-body is abandoned after the idle timeout with a
        transient L{TransferTimeout}, while another transfer from it completes.
        """
        timeouts = Timeouts(connect=5, idle=0.5)
        start = time.monotonic()
        stalled = Deferred.fromCoroutine(
            transfer.get(reactor, self.server.url + "/stall/100000", self.dest, timeouts=timeouts)
        )
        other = os.path.join(self.dest_dir, "other.bin")
        result = await transfer.get(
            reactor, self.server.url + "/files/data.bin", other, timeouts=timeouts
        )
        self.assertEqual(result.size, len(self.data))
        self.assertFalse(stalled.called)
        with self.assertRaises(TransferTimeout) as caught:
            await stalled
        elapsed = time.monotonic() - start
        self.assertTrue(0.5 <= elapsed < 3, elapsed)
        self.assertTrue(caught.exception.transient)
        self.assertEqual(caught.exception.code, 504)
        self.assertFalse(os.path.exists(self.dest))
        self.assertNothingLeft()

    async def test_sizeDiffers(self):
        """
        A Content-Length other than the expected size stops the transfer before the body.
        """
        with self.assertRaises(transfer.SizeMismatch):
            await transfer.get(
                reactor, self.server.url + "/generated/100000000", self.dest, expected_size=10
            )
        self.assertEqual(os.listdir(self.dest_dir), [])

    async def test_cancel(self):
        """
        Cancelling a transfer in progress removes its temporary file (a body announced bigger
        than C{BUFFER_LIMIT} streams to disk from the start).
        """
        d = Deferred.fromCoroutine(
            transfer.get(reactor, self.server.url + f"/stall/{3 * BUFFER_LIMIT}", self.dest)
        )
        await until(lambda: partly_written(self.dest_dir, 50000), 10, "50000 bytes on disk")
        d.cancel()
        with self.assertRaises(CancelledError):
            await d
        self.assertEqual(os.listdir(self.dest_dir), [])

    async def test_cancelSmall(self):
        """
        A small body is kept in memory until complete: cancelled halfway, it never touched
        the disk.
        """
        d = Deferred.fromCoroutine(
            transfer.get(reactor, self.server.url + "/stall/100000", self.dest)
        )
        await until(lambda: self.server.site.connections, 10, "a connection")
        await quiet(0.1)
        self.assertEqual(os.listdir(self.dest_dir), [])
        d.cancel()
        with self.assertRaises(CancelledError):
            await d
        self.assertEqual(os.listdir(self.dest_dir), [])

    async def test_connectionRefused(self):
        """
        Nobody listening is a transient L{ConnectionFailed}.
        """
        port = reactor.listenTCP(0, self.server.site, interface="127.0.0.1")
        number = port.getHost().port
        await port.stopListening()
        with self.assertRaises(ConnectionFailed) as caught:
            await transfer.get(reactor, f"http://127.0.0.1:{number}/x", self.dest)
        self.assertTrue(caught.exception.transient)
        self.assertEqual(os.listdir(self.dest_dir), [])

    async def test_parallel(self):
        """
        Several transfers run at once under a host limiter.
        """
        limiter = transfer.HostLimiter(per_host=2)
        results = await gatherResults(
            [
                Deferred.fromCoroutine(
                    transfer.get(
                        reactor,
                        self.server.url + "/files/data.bin",
                        os.path.join(self.dest_dir, f"{n}.bin"),
                        limiter=limiter,
                    )
                )
                for n in range(5)
            ]
        )
        self.assertEqual([r.size for r in results], [len(self.data)] * 5)

    async def test_list(self):
        """
        twisted.web's directory listing gives files (exact sizes below 1 KiB) and directories.
        """
        entries = await transfer.list(reactor, self.server.url + "/files/")
        self.assertEqual(
            [(e.name, e.type, e.size) for e in entries],
            [("data.bin", "file", None), ("small.txt", "file", 5), ("sub", "dir", None)],
        )

    async def test_listUnless(self):
        """
        A listing has the digest of its page; asked for C{unless} that digest, an unchanged
        page gives no entries and says so; another page (a new file) gives its entries.
        """
        url = self.server.url + "/files/"
        first = await transfer.list(reactor, url)
        self.assertEqual(len(first.digest), 64)
        self.assertFalse(first.unchanged)
        again = await transfer.list(reactor, url, unless=first.digest)
        self.assertEqual((list(again), again.unchanged, again.digest), ([], True, first.digest))
        self.assertEqual(again.bytes, first.bytes)
        write_file(os.path.join(self.root, "new.txt"), b"new")
        changed = await transfer.list(reactor, url, unless=first.digest)
        self.assertFalse(changed.unchanged)
        self.assertNotEqual(changed.digest, first.digest)
        self.assertIn("new.txt", [e.name for e in changed])

    def test_pageDigest(self):
        """
        A page's digest is of all that its entries are read from: its bytes, its URL (links
        are relative to it) and its content type (the charset).
        """
        page = b"<a href=x>x</a>"
        digest = listings.page_digest("http://h/d/", "text/html", page)
        self.assertEqual(digest, listings.page_digest("http://h/d/", "text/html", page))
        for other in [
            listings.page_digest("http://h/d/", "text/html", b"<a href=y>y</a>"),
            listings.page_digest("http://h/e/", "text/html", b"<a href=x>x</a>"),
            listings.page_digest("http://h/d/", "text/html; charset=latin-1", b"<a href=x>x</a>"),
        ]:
            self.assertNotEqual(other, digest)

    async def test_listNotFound(self):
        """
        Listing a missing directory is L{NotFound}.
        """
        with self.assertRaises(NotFound):
            await transfer.list(reactor, self.server.url + "/files/nope/")

    async def test_put(self):
        """
        PUT streams a local file to the server.
        """
        src = write_file(os.path.join(self.dest_dir, "up.bin"), self.data)
        result = await transfer.put(reactor, src, self.server.url + "/upload/up.bin")
        with open(os.path.join(self.root, "up.bin"), "rb") as f:
            self.assertEqual(f.read(), self.data)
        self.assertEqual(result.checksum, {"sha512": sha512(self.data)})

    async def test_putSourceReadInPool(self):
        """
        With a pool, a PUT opens and reads its source in the pool's threads, never in the
        reactor's; the body arrives whole, with the checksum of its bytes.
        """
        pool, threads = source_threads(self)
        src = write_file(os.path.join(self.dest_dir, "up.bin"), self.data)
        result = await transfer.put(reactor, src, self.server.url + "/upload/up.bin", pool=pool)
        with open(os.path.join(self.root, "up.bin"), "rb") as f:
            self.assertEqual(f.read(), self.data)
        self.assertEqual(result.checksum, {"sha512": sha512(self.data)})
        self.assertGreater(len(threads), 1)
        self.assertNotIn(threading.main_thread(), threads)


class HTTPConnectionsTests(TestCase):
    """
    L{HTTPConnections} keeps connections open between a caller's GETs.
    """

    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        self.dest_dir = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        os.makedirs(self.dest_dir)
        self.data = os.urandom(4096)
        write_file(os.path.join(self.root, "f.bin"), self.data)
        self.server = start_http(self, self.root)
        self.url = self.server.url + "/files/f.bin"
        self.connections = transfer.HTTPConnections(reactor, per_host=2)
        self.addCleanup(settle)
        self.addCleanup(self.connections.close)
        self.pool = ThreadPool(minthreads=0, maxthreads=4)
        self.pool.start()
        self.addCleanup(self.pool.stop)

    def get(self, n, url=None, **kwargs):
        return Deferred.fromCoroutine(
            transfer.get(
                reactor,
                url or self.url,
                os.path.join(self.dest_dir, f"{n}.bin"),
                expected_checksum=("sha512", sha512(self.data)),
                http_connections=self.connections,
                pool=self.pool,
                **kwargs,
            )
        )

    async def test_largeReads(self):
        """
        A transfer's connection reads up to C{READ_SIZE} bytes at a time from its socket
        (Twisted's default is 64 KiB): a big body costs fewer passes through the parsers.
        """
        protocol = await connect(self, self.server.url)
        self.assertEqual(protocol.transport.bufferSize, http.READ_SIZE)
        self.assertGreater(http.READ_SIZE, 65536)

    def read_sizes(self):
        """The sizes the GETs from now on read at a time, as they ask for them."""
        sizes = []
        real = http._large_reads

        def recording(protocol, size):
            sizes.append(size)
            return real(protocol, size)

        self.patch(http, "_large_reads", recording)
        return sizes

    async def test_blockReadsSmaller(self):
        """
        A whole-file GET's connection reads up to C{READ_SIZE} bytes at a time; the blocks of
        a partitioned get, several connections at once, read up to the smaller
        C{SMALL_READ_SIZE} each (memory stays flat), on connections of their own.
        """
        sizes = self.read_sizes()
        await self.get(1)
        self.assertEqual(sizes, [http.READ_SIZE])
        sizes.clear()
        await self.get(2, expected_size=len(self.data),
                       blocks=BlockSettings(threshold=1, size=1024, parallel=2))
        self.assertEqual(set(sizes), {http.SMALL_READ_SIZE})
        self.assertGreater(http.READ_SIZE, http.SMALL_READ_SIZE)

    async def test_smallFileReadsSmaller(self):
        """
        The GET of a file announced at most C{SMALL_FILE_READ_SIZE} big reads that much at a
        time (a read's buffer under the allocator's mapping threshold), on connections of its
        own; one of unknown or larger size reads C{READ_SIZE}.
        """
        sizes = self.read_sizes()
        await self.get(1, expected_size=len(self.data))
        self.assertLessEqual(len(self.data), http.SMALL_FILE_READ_SIZE)
        self.assertEqual(sizes, [http.SMALL_FILE_READ_SIZE])
        await self.get(2, expected_size=len(self.data))
        self.assertEqual(sizes, [http.SMALL_FILE_READ_SIZE])  # the same connection again
        await self.get(3)
        self.assertEqual(sizes, [http.SMALL_FILE_READ_SIZE, http.READ_SIZE])
        self.assertLess(http.SMALL_FILE_READ_SIZE, 128 * 1024)

    async def test_sequentialGetsShareOneConnection(self):
        """
        Twenty GETs one after the other go over one connection, and every file arrives whole.
        """
        for n in range(20):
            await self.get(n)
        self.assertEqual(self.server.site.accepted, 1)
        for n in range(20):
            with open(os.path.join(self.dest_dir, f"{n}.bin"), "rb") as f:
                self.assertEqual(f.read(), self.data)
        self.assertNothingLeft()

    async def test_parallelGetsBoundedByPerHost(self):
        """
        Twenty GETs at once under a limiter of two per host use at most two connections.
        """
        limiter = transfer.HostLimiter(per_host=2)
        await gatherResults([self.get(n, limiter=limiter) for n in range(20)])
        self.assertIn(self.server.site.accepted, (1, 2))
        self.assertNothingLeft()

    async def test_serverClosedIdleConnection(self):
        """
        A kept connection the server has closed meanwhile costs nothing but a new connection.
        """
        await self.get(0)
        for protocol in list(self.server.site.connections):
            protocol.transport.loseConnection()
        await quiet()
        await self.get(1)
        self.assertEqual(self.server.site.accepted, 2)

    async def test_keptConnectionDroppedAsTheRequestArrives(self):
        """
        A kept connection the server drops as the next GET reaches it (its idle timeout and
        our request crossing): the GET is sent again on a new connection, and the file
        arrives.
        """
        await self.get(0)
        for protocol in list(self.server.site.connections):
            protocol.dataReceived = lambda data, p=protocol: p.transport.abortConnection()
        await self.get(1)
        self.assertEqual(self.server.site.accepted, 2)
        self.assertNothingLeft()

    async def test_ipv6Server(self):
        """
        GETs to a server named by an IPv6 address share a kept connection and name the
        server in C{Host} as the URL does, brackets kept.
        """
        port = reactor.listenTCP(0, self.server.site, interface="::1")
        self.addCleanup(port.stopListening)
        hosts = []
        self.server.site.log = lambda request: hosts.append(request.getHeader(b"host"))
        number = port.getHost().port
        for n in range(2):
            await self.get(f"v6-{n}", url=f"http://[::1]:{number}/files/f.bin")
        self.assertEqual(hosts, [b"[::1]:%d" % number] * 2)
        self.assertEqual(self.server.site.accepted, 1)

    async def test_originsPastTheKeptOnes(self):
        """
        Past the origins whose parse is kept, GETs still go to the right server with the
        right C{Host}, on kept connections.
        """
        self.patch(http, "_KEPT_ORIGINS", 1)
        hosts = []
        self.server.site.log = lambda request: hosts.append(request.getHeader(b"host"))
        number = URI.fromBytes(self.server.url.encode()).port
        for n, name in enumerate(["127.0.0.1", "localhost", "127.0.0.1", "localhost"]):
            await self.get(f"o-{n}", url=f"http://{name}:{number}/files/f.bin")
        names = [b"127.0.0.1", b"localhost", b"127.0.0.1", b"localhost"]
        self.assertEqual(hosts, [b"%b:%d" % (name, number) for name in names])
        self.assertEqual(self.server.site.accepted, 2)

    def test_requestTargetAsTwistedParses(self):
        """
        A kept GET's pool key, C{Host} and request target are those Twisted's C{URI} gives,
        whether the URL is cut after its authority or parsed whole.
        """
        agent = http._KeptAgent(http._Endpoints(reactor, None, 10), None)
        for url in [
            b"http://example.org/a/b%20c.txt",
            b"http://example.org:8080/a;p?q=1&r=/x",
            b"https://example.org/",
            b"https://example.org:443/x",
            b"http://[::1]:8000/v6",
            b"http://example.org?q=/a",
            b"http://example.org",
            b"http://u@example.org/x",
            b"http://example.org/a#frag",
        ]:
            parsed = URI.fromBytes(url)
            for _ in range(2):  # parsed, then kept
                origin, target = agent._parse(url)
                self.assertEqual(target, parsed.originForm, url)
                self.assertEqual(origin.key, (parsed.scheme, parsed.host, parsed.port), url)
        self.assertEqual(agent._parse(b"http://[::1]:8000/v6")[0].host, b"[::1]:8000")
        self.assertEqual(agent._parse(b"https://example.org:443/x")[0].host, b"example.org")

    async def test_failedResponseNotReused(self):
        """
        A connection whose response was cut short is closed, not reused; one whose refusal
        (404) came whole serves the next GET.
        """
        with self.assertRaises(NotFound):
            await transfer.get(
                reactor,
                self.server.url + "/files/missing",
                self.dest_dir + "/x",
                http_connections=self.connections,
            )
        await self.get(0)
        self.assertEqual(self.server.site.accepted, 1)
        with self.assertRaises(ShortTransfer):
            await transfer.get(
                reactor,
                self.server.url + "/short/1000",
                self.dest_dir + "/x",
                http_connections=self.connections,
            )
        await self.get(1)
        self.assertEqual(self.server.site.accepted, 2)
        self.assertNothingLeft()

    async def test_idleConnectionsClosed(self):
        """
        A kept connection unused for C{idle_timeout} seconds is closed by us: a server that
        never closes its side does not hold our sockets.
        """
        self.connections = transfer.HTTPConnections(reactor, per_host=2, idle_timeout=0.2)
        self.addCleanup(self.connections.close)
        await self.get(0)
        self.assertEqual(len(self.server.site.connections), 1)
        await until(
            lambda: not self.server.site.connections, timeout=10, what="the idle connection closed"
        )

    async def test_keptAtMostPerHost(self):
        """
        Twelve GETs at once (no limiter: each opens a connection) leave at most C{per_host}
        (here one, below Twisted's default of two) connections kept open to the server; the
        others are closed once their response is in.
        """
        self.connections = transfer.HTTPConnections(reactor, per_host=1)
        self.addCleanup(self.connections.close)
        await gatherResults([self.get(n) for n in range(12)])
        self.assertGreater(self.server.site.accepted, 1)
        await until(
            lambda: len(self.server.site.connections) <= 1,
            timeout=10,
            what="the connections past per_host closed",
        )
        await quiet()
        self.assertLessEqual(len(self.server.site.connections), 1)
        self.assertNothingLeft()

    async def test_close(self):
        """
        Closing the connections leaves none open.
        """
        await self.get(0)
        self.assertEqual(len(self.server.site.connections), 1)
        await self.connections.close()
        await settle()
        self.assertEqual(len(self.server.site.connections), 0)

    def assertNothingLeft(self):
        self.assertEqual(leftovers(self.dest_dir), [])


class HTTPSTests(TestCase):
    """
    https verifies the server's certificate by default.
    """

    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        write_file(os.path.join(self.root, "small.txt"), b"hello")
        self.ca_file, options = make_tls(self.root)
        self.server = start_http(self, self.root, tls=options)
        self.dest = os.path.abspath(self.mktemp())
        self.addCleanup(settle)

    async def test_trustedCA(self):
        """
        With the issuing CA given as C{ca_file}, the transfer works.
        """
        result = await transfer.get(
            reactor, self.server.url + "/files/small.txt", self.dest, ca_file=self.ca_file
        )
        self.assertEqual(result.size, 5)

    async def test_keptConnections(self):
        """
        Kept GETs over TLS: with C{ca_file}, two GETs share one connection and each file
        arrives; without it, the server is not trusted and no connection is kept for it.
        """
        connections = transfer.HTTPConnections(reactor)
        self.addCleanup(connections.close)
        os.makedirs(self.dest)
        for n in range(2):
            result = await transfer.get(
                reactor, self.server.url + "/files/small.txt", os.path.join(self.dest, f"{n}"),
                ca_file=self.ca_file, http_connections=connections,
            )
            self.assertEqual(result.size, 5)
        self.assertEqual(self.server.site.accepted, 1)
        with self.assertRaises(ServerNotTrusted):
            await transfer.get(
                reactor, self.server.url + "/files/small.txt", os.path.join(self.dest, "x"),
                http_connections=connections,
            )
        self.assertEqual(self.server.site.accepted, 2)
        self.assertEqual(sorted(os.listdir(self.dest)), ["0", "1"])

    async def test_largeReads(self):
        """
        Under TLS too, the connection reads up to C{READ_SIZE} bytes at a time.
        """
        protocol = await connect(self, self.server.url, self.ca_file)
        self.assertEqual(protocol.transport.transport.bufferSize, http.READ_SIZE)

    async def test_tls_loaded_by_first_request(self):
        """
        In a process that deferred TLS (a container, L{ion.core.lazytls}), pyOpenSSL is not
        loaded until the first https request, which then verifies the server: trusted with
        C{ca_file}, refused for good without it.
        """
        os.makedirs(self.dest)
        result = await threads.deferToThread(
            subprocess.run,
            [sys.executable, "-c", DEFERRED_GET, self.server.url + "/files/small.txt",
             self.ca_file, self.dest],
            cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
            timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(
            json.loads(result.stdout),
            {"deferred": True, "before": False, "size": 5, "untrusted": "ServerNotTrusted"},
        )

    async def test_untrusted(self):
        """
        A certificate from a CA not trusted is refused, permanently, with no file.
        """
        with self.assertRaises(ServerNotTrusted) as caught:
            await transfer.get(reactor, self.server.url + "/files/small.txt", self.dest)
        self.assertFalse(caught.exception.transient)
        self.assertIn("ca_file", str(caught.exception))
        self.assertFalse(os.path.exists(self.dest))
