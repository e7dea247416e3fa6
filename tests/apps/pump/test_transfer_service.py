"""The transfer service: get, put and list as ops, with the library's error codes kept.

The op scenarios run on the memory:// transport and on the private RabbitMQ node."""

import base64
import contextlib
import hashlib
import os

import attrs
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from ion.apps.pump import outcome, transfer
from ion.apps.pump.transfer import CredentialsError
from ion.apps.pump.transfer import file as local_file
from ion.apps.pump.transfer.errors import NotFound, TransferError
from ion.apps.pump.transfer.file import list_local
from ion.apps.pump.transfer.results import Entry
from ion.apps.pump.transfer.worker import Transfers
from ion.apps.pump.transfer_service import TransferService
from ion.core.cc.testing import make_container
from ion.core.process import (
    ConversationTimeout,
    NoSuchReceiver,
    Process,
    RemoteError,
)
from tests.apps.pump.fixtures import write_source
from tests.apps.pump.servers import settle, start_http
from tests.waiting import until
from tests.apps.pump.test_consumer import OnMemory, OnPrivateRabbitMQ


class Caller(Process):
    pass


def sha512(data):
    return base64.b64encode(hashlib.sha512(data).digest()).decode()


class TransferServiceScenarios:
    """Scenarios every transport must pass, written against the hooks of `OnMemory`."""

    async def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        self.src = os.path.join(self.base, "src")
        self.dest = os.path.join(self.base, "dest")
        os.makedirs(self.src)
        os.makedirs(self.dest)
        self.credentials = os.path.join(self.base, "credentials.conf")
        with open(self.credentials, "w") as f:
            f.write("# none\n")
        os.chmod(self.credentials, 0o600)
        self.container = await make_container(
            self, url=self.url, memory_broker=self.new_broker(), sysname=self.name("test")
        )
        self.service = await self.container.spawn(
            TransferService, args={"credentials": self.credentials, "per_host": 2}
        )
        self.caller = await self.container.spawn(Caller)

    async def test_get_file(self):
        """get fetches a file:// URL into the given path, verified against size and sha512,
        with the notice's mtime and mode applied, and says what it delivered."""
        data = b"hello pump\n" * 100
        write_source(self.src, "a/f.dat", data)
        path = os.path.join(self.dest, "f.dat")
        result = await self.caller.rpc(
            "transfer",
            "get",
            {
                "url": "file://" + os.path.join(self.src, "a", "f.dat"),
                "path": path,
                "size": len(data),
                "identity": {"method": "sha512", "value": sha512(data)},
                "mtime": 1700000000.5,
                "mode": 0o640,
            },
        )
        self.assertEqual(result["size"], len(data))
        self.assertEqual(result["checksum"], {"sha512": sha512(data)})
        self.assertEqual(result["path"], path)
        self.assertEqual(result["mode"], 0o640)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), data)
        self.assertEqual(os.stat(path).st_mtime, 1700000000.5)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o640)

    async def test_get_cod_computes_checksum(self):
        """A `cod` identity names the checksum to compute on download; it comes back."""
        data = b"x" * 10
        src = write_source(self.src, "c.dat", data)
        result = await self.caller.rpc(
            "transfer",
            "get",
            {
                "url": "file://" + src,
                "path": os.path.join(self.dest, "c.dat"),
                "identity": {"method": "cod", "value": "md5"},
            },
        )
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
        self.assertEqual(result["checksum"]["md5"], md5)

    async def test_get_missing_is_404(self):
        """A missing source file is a RemoteError with code 404 (permanent)."""
        e = await self.assertFailure(
            self.caller.rpc(
                "transfer",
                "get",
                {"url": "file://" + os.path.join(self.src, "nope"), "path": self.dest + "/x"},
            ),
            RemoteError,
        )
        self.assertEqual(e.code, 404)
        self.assertFalse(outcome.is_transient(e.code))
        self.assertEqual(os.listdir(self.dest), [])

    async def test_get_checksum_mismatch_is_499(self):
        """Bytes that do not match the announced checksum: 499 (transient: the file may have
        been rewritten while it was read); nothing appears at the destination."""
        src = write_source(self.src, "m.dat", b"actual")
        e = await self.assertFailure(
            self.caller.rpc(
                "transfer",
                "get",
                {
                    "url": "file://" + src,
                    "path": os.path.join(self.dest, "m.dat"),
                    "identity": {"method": "sha512", "value": sha512(b"announced")},
                },
            ),
            RemoteError,
        )
        self.assertEqual(e.code, 499)
        self.assertTrue(outcome.is_transient(e.code))
        self.assertEqual(os.listdir(self.dest), [])

    async def test_put_and_list(self):
        """put copies a local file to a URL; list returns the entries of a remote directory
        as maps {name, size, mtime, mode, type}, sorted by name."""
        data = b"outgoing"
        src = write_source(self.src, "out.dat", data)
        os.makedirs(os.path.join(self.dest, "sub"))
        result = await self.caller.rpc(
            "transfer", "put", {"path": src, "url": "file://" + self.dest + "/out.dat"}
        )
        self.assertEqual(result["size"], len(data))
        with open(os.path.join(self.dest, "out.dat"), "rb") as f:
            self.assertEqual(f.read(), data)
        entries = await self.caller.rpc("transfer", "list", {"url": "file://" + self.dest})
        self.assertEqual(
            [(e["name"], e["type"], e["size"]) for e in entries],
            [("out.dat", "file", len(data)), ("sub", "dir", None)],
        )
        # Every field of an Entry, and no other key.
        fields = {field.name for field in attrs.fields(Entry)}
        self.assertEqual([set(e) for e in entries], [fields, fields])
        # A poll of a local tree reads it itself: the same entries (links not followed,
        # fifos left out).
        os.symlink("out.dat", os.path.join(self.dest, "link"))
        os.mkfifo(os.path.join(self.dest, "fifo"))
        entries = await self.caller.rpc("transfer", "list", {"url": "file://" + self.dest})
        self.assertEqual([e["name"] for e in entries], ["link", "out.dat", "sub"])
        self.assertEqual(list_local(self.dest, "shown"), entries)
        e = self.assertRaises(NotFound, list_local, self.dest + "/nope", "the/nope")
        self.assertIn("the/nope", str(e))
        # A directory of more entries than the bound is refused, not held in memory.
        self.patch(local_file, "MAX_LOCAL_ENTRIES", 2)
        e = self.assertRaises(TransferError, list_local, self.dest, "the/dest")
        self.assertEqual((e.code, str(e)), (413, "the/dest: more than 2 entries"))

    def test_local_listing_digest(self):
        """A local listing's digest is the same while nothing listed changes; anything a
        listing tells changing changes it (a file's mtime alone, its mode, its size, a new
        name); asked for C{unless} the current digest, no entries are made."""
        path = write_source(self.src, "f", b"f")
        first = list_local(self.src, "shown")
        self.assertEqual(len(first.digest), 64)
        again = list_local(self.src, "shown", first.digest)
        self.assertEqual((list(again), again.unchanged, again.digest), ([], True, first.digest))
        digests = {first.digest}
        for change in [
            lambda: os.utime(path, ns=(1, os.stat(path).st_mtime_ns + 1)),
            lambda: os.chmod(path, 0o600),
            lambda: write_source(self.src, "f", b"g"),  # the same size, another mtime
            lambda: write_source(self.src, "f", b"longer"),
            lambda: write_source(self.src, "g", b""),
        ]:
            change()
            listed = list_local(self.src, "shown", first.digest)
            self.assertFalse(listed.unchanged)
            self.assertNotIn(listed.digest, digests)
            digests.add(listed.digest)
            self.assertEqual(listed, list_local(self.src, "shown"))

    async def test_list_digest(self):
        """Asked for a digest, list answers {entries, bytes, digest, unchanged}: a local
        directory has no digest, and is listed whatever C{unless} says."""
        write_source(self.src, "f", b"f")
        reply = await self.caller.rpc(
            "transfer", "list", {"url": "file://" + self.src, "digest": True, "unless": "ab"}
        )
        self.assertEqual(
            (reply["digest"], reply["unchanged"], [e["name"] for e in reply["entries"]]),
            (None, False, ["f"]),
        )

    async def test_list_missing_is_404(self):
        e = await self.assertFailure(
            self.caller.rpc("transfer", "list", {"url": "file://" + self.base + "/nope"}),
            RemoteError,
        )
        self.assertEqual(e.code, 404)

    async def test_bad_requests_are_400(self):
        """Content that is not a usable request is refused with 400, naming the problem."""
        for op, content in [
            ("get", None),
            ("get", {"url": "file:///x"}),
            ("get", {"url": "file:///x", "path": "/tmp/y", "size": -1}),
            ("put", {"path": 3, "url": "file:///x"}),
            ("list", {}),
            ("list", {"url": "file:///x", "with_bytes": "yes"}),
            ("list", {"url": "file:///x", "digest": 1}),
            ("list", {"url": "file:///x", "unless": "ab"}),  # without digest
            ("list", {"url": "file:///x", "digest": True, "unless": 5}),
            ("list", {"url": "file:///x", "digest": True, "unless": "a" * 129}),
        ]:
            e = await self.assertFailure(self.caller.rpc("transfer", op, content), RemoteError)
            self.assertEqual(e.code, 400, (op, content))

    async def test_unsupported_scheme_is_permanent(self):
        """An unsupported URL scheme is a 4xx: reported, never retried."""
        e = await self.assertFailure(
            self.caller.rpc("transfer", "get", {"url": "gopher://h/x", "path": self.dest + "/x"}),
            RemoteError,
        )
        self.assertFalse(outcome.is_transient(e.code))

    async def test_instances_share_the_service(self):
        """Several instances serve `transfer` together; a request reaches one of them."""
        await self.container.spawn(TransferService, args={"credentials": self.credentials})
        src = write_source(self.src, "s.dat", b"s")
        for i in range(4):
            await self.caller.rpc(
                "transfer", "get", {"url": "file://" + src, "path": f"{self.dest}/s{i}"}
            )
        self.assertEqual(len(os.listdir(self.dest)), 4)


class MemoryTransferServiceTests(OnMemory, TransferServiceScenarios, unittest.TestCase):
    """The scenarios on the memory:// transport."""


class AmqpTransferServiceTests(OnPrivateRabbitMQ, TransferServiceScenarios, unittest.TestCase):
    """The same scenarios on the private RabbitMQ node."""


class TransferServiceStartTests(unittest.TestCase):
    async def test_private_credentials_required(self):
        """A credentials file readable by group or others stops the service from starting."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("https://alice:secret@example.org/\n")
        os.chmod(path, 0o640)
        container = await make_container(self)
        e = await self.assertFailure(
            defer.ensureDeferred(container.spawn(TransferService, args={"credentials": path})),
            CredentialsError,
        )
        self.assertIn("chmod 600", str(e))
        self.assertNotIn("secret", str(e))
        self.flushLoggedErrors(CredentialsError)

    async def test_bad_args(self):
        """Unknown or malformed args are a clear error at start."""
        container = await make_container(self)
        for args, text in [
            ({"workers": 2}, "unknown argument 'workers'"),
            ({"per_host": 0}, "per_host"),
            ({"parallel": 0}, "parallel"),
            ({"parallel": True}, "parallel"),
            ({"timeouts": {"connect": -1}}, "timeouts connect"),
        ]:
            e = await self.assertFailure(
                defer.ensureDeferred(container.spawn(TransferService, args=args)), ValueError
            )
            self.assertIn(text, str(e))
        self.flushLoggedErrors(ValueError)


class TransferServiceResourceTests(unittest.TestCase):
    """Each instance owns a disk thread pool and kept-open http connections, from start to
    terminate."""

    async def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        self.dest = os.path.join(self.base, "dest")
        os.makedirs(os.path.join(self.base, "src"))
        os.makedirs(self.dest)
        self.data = os.urandom(4096)
        write_source(os.path.join(self.base, "src"), "f.dat", self.data)
        self.server = start_http(self, os.path.join(self.base, "src"))
        self.addCleanup(settle)
        credentials = os.path.join(self.base, "credentials.conf")
        with open(credentials, "w") as f:
            f.write("# none\n")
        os.chmod(credentials, 0o600)
        self.container = await make_container(self)
        self.service = await self.container.spawn(
            TransferService, args={"credentials": credentials, "per_host": 2, "parallel": 3}
        )
        self.caller = await self.container.spawn(Caller)

    async def test_gets_share_connections(self):
        """Files fetched one after the other from one server go over one connection, and
        their disk work runs in the instance's pool of `parallel` threads."""
        for i in range(10):
            result = await self.caller.rpc(
                "transfer",
                "get",
                {
                    "url": self.server.url + "/files/f.dat",
                    "path": os.path.join(self.dest, f"{i}.dat"),
                    "identity": {"method": "sha512", "value": sha512(self.data)},
                },
            )
            self.assertEqual(result["size"], len(self.data))
        self.assertEqual(self.server.site.accepted, 1)
        self.assertEqual(self.service.transfers.pool.max, 3)
        self.assertTrue(self.service.transfers.pool.started)

    async def test_list_says_the_bytes_it_read(self):
        """With with_bytes, a listing says how many bytes it read from the server: an index
        page's length (what a poll's byte_rate_max spends); a local directory reads none."""
        url = self.server.url + "/files/"
        page = os.path.join(self.dest, "index.html")
        await self.caller.rpc("transfer", "get", {"url": url, "path": page})
        reply = await self.caller.rpc("transfer", "list", {"url": url, "with_bytes": True})
        self.assertEqual([e["name"] for e in reply["entries"]], ["f.dat"])
        self.assertEqual(reply["bytes"], os.path.getsize(page))
        local = await self.caller.rpc(
            "transfer", "list", {"url": "file://" + self.dest, "with_bytes": True}
        )
        self.assertEqual(([e["name"] for e in local["entries"]], local["bytes"]),
                         (["index.html"], 0))

    async def test_terminate_releases(self):
        """Terminating an instance stops its threads and closes its connections."""
        await self.caller.rpc(
            "transfer",
            "get",
            {"url": self.server.url + "/files/f.dat", "path": os.path.join(self.dest, "f.dat")},
        )
        self.assertEqual(len(self.server.site.connections), 1)
        await self.service.terminate()
        await settle()
        self.assertFalse(self.service.transfers.pool.started)
        self.assertFalse(any(thread.is_alive() for thread in self.service.transfers.pool.threads))
        self.assertEqual(len(self.server.site.connections), 0)

    async def test_parallel_bounds_transfers(self):
        """At most `parallel` transfers run at once in an instance (to as many servers);
        the others wait."""
        gate = defer.Deferred()
        running = []

        async def held(reactor, url, limiter, **kwargs):
            key = await limiter.acquire(url)
            running.append(url)
            await gate
            limiter.release(key)

        calls = [
            defer.ensureDeferred(self.service.transfers._run(held, f"http://h{i}/"))
            for i in range(5)
        ]
        self.assertEqual(len(running), 3)
        gate.callback(None)
        await defer.gatherResults(calls)
        self.assertEqual(len(running), 5)


class TransfersTests(unittest.TestCase):
    """The transfers of one process (ion.apps.pump.transfer.worker.Transfers)."""

    timeout = 30

    async def test_many_failing_at_once(self):
        """Hundreds of transfers queued behind a few slots that all fail at once each get
        their error; none is left waiting and every slot comes back (released in a chain,
        they used to hit the recursion limit and hang). Half go to one server (queued for
        its slot), half to as many servers (queued for one of the `parallel` slots)."""
        transfers = Transfers(reactor, {"parallel": 2})
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(transfers.close()))
        gate = defer.Deferred()

        async def held(reactor, url, limiter, **kwargs):
            key = await limiter.acquire(url)
            await gate
            limiter.release(key)

        async def failing(reactor, url, limiter, **kwargs):
            key = await limiter.acquire(url)
            try:
                raise transfer.TransferError("refused", code=422)
            finally:
                limiter.release(key)

        first = [
            defer.Deferred.fromCoroutine(transfers._run(held, f"http://busy{i}/"))
            for i in range(2)
        ]
        calls = [
            defer.Deferred.fromCoroutine(
                transfers._run(failing, f"http://h{i if i % 2 else ''}/{i}")
            )
            for i in range(1000)
        ]
        gate.callback(None)
        await defer.gatherResults(first)
        results = await defer.DeferredList(calls, consumeErrors=True)
        codes = {result.value.code for ok, result in results if not ok}
        self.assertEqual((sum(ok for ok, _ in results), codes), (0, {422}))
        await task.deferLater(reactor, 0, lambda: None)  # releases run through the reactor
        self.assertEqual(transfers.limiter.active("http://h/"), 0)
        self.assertEqual(transfers.limiter._total.tokens, 2)


    async def test_bytes_received(self):
        """Bytes received count while a file is on its way and stay counted once its transfer
        ends, delivered or not; in flight are only those of the transfers running."""
        root = os.path.abspath(self.mktemp())
        write_source(root, "a.bin", b"a" * 3000)
        server = start_http(self, root)
        transfers = Transfers(reactor, {})
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(transfers.close()))
        dest = os.path.abspath(self.mktemp())
        os.makedirs(dest)
        await transfers.get(f"{server.url}/files/a.bin", os.path.join(dest, "a.bin"))
        self.assertEqual((transfers.received.total, transfers.received.in_flight), (3000, 0))
        stalled = defer.Deferred.fromCoroutine(
            transfers.get(f"{server.url}/stall/100000", os.path.join(dest, "s.bin"))
        )
        await until(lambda: transfers.received.in_flight >= 50000, 10, "50000 bytes in flight")
        self.assertEqual((transfers.received.total, transfers.received.in_flight), (53000, 50000))
        stalled.cancel()
        with self.assertRaises(defer.CancelledError):
            await stalled
        self.assertEqual((transfers.received.total, transfers.received.in_flight), (53000, 0))


class OutcomeTests(unittest.SynchronousTestCase):
    def test_is_transient(self):
        """499, 500, 503 and 504 are retried; every other code is final."""
        for code in (499, 500, 503, 504):
            self.assertTrue(outcome.is_transient(code), code)
        for code in (201, 400, 403, 404, 410, 413, 417, 422, 501, 502):
            self.assertFalse(outcome.is_transient(code), code)

    def test_classify(self):
        """No reply in time is a 504, no transfer service a 503, a remote error keeps its code,
        anything else is a local failure (500); all but the 404 are retried."""
        cases = [
            (RemoteError(404, "ApplicationError", "gone"), 404, False),
            (RemoteError(503, "ApplicationError", "down"), 503, True),
            (ConversationTimeout("transfer", "get", 600), 504, True),
            (NoSuchReceiver("transfer"), 503, True),
            (transfer.NotFound("gone"), 404, False),
            (transfer.ConnectionFailed("refused"), 503, True),
            (OSError("disk"), 500, True),
        ]
        for error, code, transient in cases:
            failure = outcome.classify(error)
            self.assertEqual((failure.code, failure.transient), (code, transient), error)


class LocalListingTests(unittest.SynchronousTestCase):
    def test_entry_removed_while_listed(self):
        """A file removed between the directory's read and its lstat is left out of the
        listing (a poll would otherwise take the whole directory for removed)."""
        from unittest import mock

        from ion.apps.pump.transfer import file

        directory = self.mktemp()
        os.makedirs(directory)
        for name in ("a", "b", "c"):
            write_source(directory, name, b"x")
        real = os.scandir

        def removing(path):
            entries = list(real(path))
            os.remove(os.path.join(directory, "b"))
            return contextlib.nullcontext(entries)

        with mock.patch.object(file.os, "scandir", removing):
            entries = list_local(directory, "shown")
        self.assertEqual([e["name"] for e in entries], ["a", "c"])
