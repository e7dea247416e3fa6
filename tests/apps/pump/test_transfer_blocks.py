"""
Tests for partitioned transfers (L{ion.apps.pump.transfer.blocks}): files fetched in blocks by
range over http, sftp and ftp from loopback servers, resumed after a failure, and sr3's
C{blocks} notices.
"""

import base64
import hashlib
import os
import re
import signal
import subprocess
import sys
import time

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import resource, server, static

import ion
from ion.apps.pump import transfer
from ion.apps.pump.transfer import ChecksumMismatch, ConnectionFailed, Credentials, TransferError
from ion.apps.pump.transfer.blocks import (
    MAX_BLOCKS,
    BlockSettings,
    PartialFile,
    block_size,
    human,
    sr3_block,
)
from ion.apps.pump.transfer.errors import BadRequest, LocalFailure
from ion.apps.pump.transfer.operations import forget_put
from ion.apps.pump.transfer.sendblocks import SendRecord, sweep_records
from ion.apps.pump.transfer.inflight import sweep
from tests.waiting import until
from tests.apps.pump.servers import (
    leftovers,
    pattern,
    settle,
    start_ftp,
    start_http,
    start_sftp,
    write_file,
)

SECRET = "pa55-w0rd-XyZ"
SIZE = 8 * 1024 * 1024 + 12345
BLOCK = 1024 * 1024  # 9 blocks, the last one short
# Puts: 9 blocks too, smaller (sftp writes cost more than reads).
PUT_BLOCK = 256 * 1024
PUT_SIZE = 8 * PUT_BLOCK + 12345


def sha512(data):
    return base64.b64encode(hashlib.sha512(data).digest()).decode()


def start_pool(testcase):
    pool = ThreadPool(minthreads=0, maxthreads=4, name="test-blocks")
    pool.start()
    testcase.addCleanup(pool.stop)
    return pool


class _Ranged(resource.Resource):
    """C{/<name>} from C{root} (twisted.web serves ranges), counting each Range asked for in
    C{ranges}; a request for the first block waits C{delay} s before being served, so the
    blocks after it arrive first; after C{fail_after} range requests, every one is a 503."""

    isLeaf = True

    def __init__(self, root):
        super().__init__()
        self.root = root
        self.ranges = []
        self.served = []  # the first byte of each range, in the order the answers started
        self.delay = 0
        self.fail_after = None
        self.stall = False
        self.fail_code = 503

    def render_GET(self, request):
        asked = request.getHeader(b"range")
        if asked is not None:
            asked = asked.decode()
            self.ranges.append(asked)
            if self.fail_after is not None and len(self.ranges) > self.fail_after:
                if self.stall:
                    return server.NOT_DONE_YET  # never answered
                request.setResponseCode(self.fail_code)
                return b"down"
        first = int(re.search(r"bytes=(\d+)-", asked).group(1)) if asked else 0
        path = os.path.join(self.root, *(p.decode() for p in request.postpath))
        serve = static.File(path)
        if first == 0 and self.delay:
            reactor.callLater(self.delay, self._serve, serve, request, first)
            return server.NOT_DONE_YET
        return self._serve(serve, request, first)

    def _serve(self, serve, request, first):
        self.served.append(first)
        result = serve.render_GET(request)
        if result is not server.NOT_DONE_YET:
            request.write(result)
            request.finish()
        return server.NOT_DONE_YET


class BlockPlanTests(SynchronousTestCase):
    """
    How a file is cut into blocks, and sr3's C{blocks} field.
    """

    def test_defaultSize(self):
        """
        By default a file has at most 16 blocks of at least 8 MiB; a hostile size never gives
        more than MAX_BLOCKS blocks, whatever block size is asked for.
        """
        self.assertEqual(block_size(4 * 1024**3), 256 * 1024**2)
        self.assertEqual(block_size(70 * 1024**2), 8 * 1024**2)
        self.assertEqual(block_size(2**60, 65536), 2**60 // MAX_BLOCKS)

    def test_human(self):
        """
        Progress shows sizes the way operators read them.
        """
        self.assertEqual(human(1288490188), "1.2 GiB")
        self.assertEqual(human(512), "512 bytes")

    def test_sr3Manifest(self):
        """
        A notice as sr3 3.x writes it for one block (manifest with string keys, as JSON
        has them) gives the file size, block size, number and length.
        """
        blocks = {
            "method": "inplace",
            "size": 100,
            "number": 2,
            "manifest": {"0": {"size": 100, "identity": "a"}, "1": {"size": 100, "identity": "b"},
                         "2": {"size": 42, "identity": "c"}},
        }
        self.assertEqual(sr3_block(blocks, 42), (242, 100, 2, 42))

    def test_sr3CountRemainder(self):
        """
        The older form (count and remainder, as sr3 reads v2's parts header) works too.
        """
        blocks = {"method": "inplace", "size": 100, "count": 3, "remainder": 42, "number": 0}
        self.assertEqual(sr3_block(blocks, 100), (242, 100, 0, 100))

    def test_sr3Hostile(self):
        """
        A blocks field out of bounds or inconsistent is refused (417), never trusted.
        """
        bad = [
            "x",
            {"method": "inplace", "size": 100, "count": MAX_BLOCKS + 1, "remainder": 0,
             "number": 0},
            {"method": "inplace", "size": 100, "count": 3, "remainder": 0, "number": 3},
            {"method": "inplace", "size": 0, "count": 3, "remainder": 0, "number": 0},
            {"method": "inplace", "size": 100, "number": 0,
             "manifest": {"0": {"size": 100}, "2": {"size": 1}}},
            {"method": "nonsense", "size": 100, "count": 1, "remainder": 0, "number": 0},
        ]
        for blocks in bad:
            with self.assertRaises(BadRequest) as caught:
                sr3_block(blocks, None)
            self.assertEqual(caught.exception.code, 417)
        with self.assertRaises(BadRequest):
            sr3_block({"method": "inplace", "size": 100, "count": 3, "remainder": 42,
                       "number": 2}, 100)


class _BlockTests:
    """Scenarios every scheme passes; C{get(name, dest, **kw)} fetches from the server."""

    blocks = BlockSettings(threshold=BLOCK, size=BLOCK, parallel=4)

    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        self.local = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        os.makedirs(self.local)
        self.data = os.urandom(SIZE)
        write_file(os.path.join(self.root, "big.bin"), self.data)
        self.dest = os.path.join(self.local, "big.bin")
        self.pool = start_pool(self)
        self.addCleanup(settle)

    async def test_blocks(self):
        """
        A file above the threshold arrives in blocks, verified whole, with nothing left.
        """
        result = await self.get(
            "big.bin", expected_size=SIZE, expected_checksum=("sha512", sha512(self.data))
        )
        with open(self.dest, "rb") as f:
            self.assertEqual(f.read(), self.data)
        self.assertEqual((result.size, result.blocks), (SIZE, 9))
        self.assertEqual(result.checksum["sha512"], sha512(self.data))
        self.assertEqual(leftovers(self.local), [])
        self.assertEqual(self.requests(), 9)

    async def test_belowThreshold(self):
        """
        A file below the threshold, or of unknown size, comes in one stream.
        """
        small = BlockSettings(threshold=SIZE + 1, size=BLOCK)
        result = await self.get("big.bin", expected_size=SIZE, blocks=small)
        self.assertEqual((result.size, result.blocks), (SIZE, 0))
        result = await self.get("big.bin", dest=self.dest + "2")
        self.assertEqual(result.blocks, 0)

    async def test_checksumMismatch(self):
        """
        Blocks that do not add up to the announced checksum fail the file, and both the part
        file and its record go: the next attempt starts afresh.
        """
        with self.assertRaises(ChecksumMismatch):
            await self.get(
                "big.bin", expected_size=SIZE, expected_checksum=("sha512", sha512(b"other"))
            )
        self.assertFalse(os.path.exists(self.dest))
        self.assertEqual(leftovers(self.local), [])


class HTTPBlockTests(_BlockTests, TestCase):
    """
    Blocks over http: Range requests.
    """

    def setUp(self):
        super().setUp()
        self.server = start_http(self, self.root)
        self.ranged = _Ranged(self.root)
        self.server.site.resource.putChild(b"ranged", self.ranged)

    def get(self, name, dest=None, prefix="/ranged/", **kwargs):
        kwargs.setdefault("blocks", self.blocks)
        kwargs.setdefault("pool", self.pool)
        return transfer.get(reactor, self.server.url + prefix + name, dest or self.dest, **kwargs)

    def requests(self):
        return len(self.ranged.ranges)

    async def test_outOfOrder(self):
        """
        Blocks arriving out of order (the first one last) make the same file: each is written
        at its offset, and the whole-file checksum is verified once they are all in.
        """
        self.ranged.delay = 0.3
        seen = []
        active = type("Active", (), {"add": lambda _, sink: seen.append(sink),
                                      "discard": lambda _, sink: None})()
        await self.get(
            "big.bin", expected_size=SIZE, expected_checksum=("sha512", sha512(self.data)),
            active=active,
        )
        self.assertEqual(seen[0].progress(), "9/9 blocks, 8.0 MiB of 8.0 MiB")
        with open(self.dest, "rb") as f:
            self.assertEqual(f.read(), self.data)
        self.assertNotEqual(self.ranged.served[0], 0)
        self.assertEqual(sorted(self.ranged.ranges), sorted(
            f"bytes={o}-{min(o + BLOCK, SIZE) - 1}" for o in range(0, SIZE, BLOCK)
        ))

    async def test_hashedAsBlocksCome(self):
        """
        The whole-file checksum is computed as the blocks from the start of the file come in,
        not all after the last one: every byte is read back once, the first ones while later
        blocks are still to be asked for.
        """
        read = []
        original = PartialFile._hash_range

        def hash_range(partial, offset, end):
            read.append((offset, end, len(self.ranged.ranges)))
            return original(partial, offset, end)

        self.patch(PartialFile, "_hash_range", hash_range)
        single = BlockSettings(threshold=BLOCK, size=BLOCK, parallel=1)
        result = await self.get(
            "big.bin", expected_size=SIZE, expected_checksum=("sha512", sha512(self.data)),
            blocks=single,
        )
        self.assertEqual(result.checksum["sha512"], sha512(self.data))
        spans = [(offset, end) for offset, end, _ in read if end > offset]
        self.assertEqual([offset for offset, _ in spans], [0] + [end for _, end in spans[:-1]])
        self.assertEqual(spans[-1][1], SIZE)
        self.assertLess(read[0][2], 9)

    async def test_resumedBlocksHashed(self):
        """
        A resumed file's blocks from the first attempt are read back for the checksum with the
        new ones: a block spoiled on disk meanwhile fails the file, which starts afresh.
        """
        self.ranged.fail_after = 4
        checksum = ("sha512", sha512(self.data))
        single = BlockSettings(threshold=BLOCK, size=BLOCK, parallel=1)
        with self.assertRaises(ConnectionFailed):
            await self.get("big.bin", expected_size=SIZE, expected_checksum=checksum,
                           blocks=single)
        [part] = [name for name in leftovers(self.local) if name.endswith(".part.inflight")]
        with open(os.path.join(self.local, part), "r+b") as f:
            f.seek(BLOCK + 10)
            f.write(b"spoiled")
        self.ranged.fail_after = None
        with self.assertRaises(ChecksumMismatch):
            await self.get("big.bin", expected_size=SIZE, expected_checksum=checksum)
        self.assertEqual(leftovers(self.local), [])
        await self.get("big.bin", expected_size=SIZE, expected_checksum=checksum)
        with open(self.dest, "rb") as f:
            self.assertEqual(f.read(), self.data)

    async def test_resume(self):
        """
        After a link failure half way, only the blocks missing are fetched again (counted
        at the server); the part file and its record survive the start-up sweep meanwhile.
        """
        self.ranged.fail_after = 4
        checksum = ("sha512", sha512(self.data))
        single = BlockSettings(threshold=BLOCK, size=BLOCK, parallel=1)
        with self.assertRaises(ConnectionFailed):
            await self.get("big.bin", expected_size=SIZE, expected_checksum=checksum,
                           blocks=single)
        self.assertEqual(len(leftovers(self.local)), 2)  # the part file and its record
        removed, young = sweep(self.local, min_age=0)
        self.assertEqual((removed, young), ([], []))
        self.ranged.ranges.clear()
        self.ranged.fail_after = None
        result = await self.get("big.bin", expected_size=SIZE, expected_checksum=checksum)
        self.assertEqual(len(self.ranged.ranges), 9 - 4)
        self.assertNotIn("bytes=0-%d" % (BLOCK - 1), self.ranged.ranges)
        with open(self.dest, "rb") as f:
            self.assertEqual(f.read(), self.data)
        self.assertEqual(result.size, SIZE)
        self.assertEqual(leftovers(self.local), [])

    async def test_resumeAfterKill(self):
        """
        A process killed (SIGKILL) half way through leaves its part file and record; the next
        attempt fetches only the blocks the record lacks (counted at the server).
        """
        self.ranged.fail_after, self.ranged.stall = 4, True
        checksum = sha512(self.data)
        script = (
            "import sys\n"
            "from twisted.internet import task\n"
            "from twisted.python.threadpool import ThreadPool\n"
            "from ion.apps.pump import transfer\n"
            "from ion.apps.pump.transfer.blocks import BlockSettings\n"
            "def main(reactor):\n"
            "    pool = ThreadPool(0, 2); pool.start()\n"
            "    return transfer.get(reactor, sys.argv[1], sys.argv[2], pool=pool,\n"
            "        expected_size=int(sys.argv[3]), expected_checksum=('sha512', sys.argv[4]),\n"
            f"        blocks=BlockSettings({BLOCK}, {BLOCK}, 1))\n"
            "task.react(lambda reactor: __import__('twisted.internet.defer').internet.defer"
            ".Deferred.fromCoroutine(main(reactor)))\n"
        )
        url = self.server.url + "/ranged/big.bin"
        checkout = os.path.dirname(os.path.dirname(os.path.abspath(ion.__file__)))
        env = dict(os.environ, PYTHONPATH=checkout)
        child = subprocess.Popen(
            [sys.executable, "-c", script, url, self.dest, str(SIZE), checksum],
            env=env, stdin=subprocess.DEVNULL,
        )
        self.addCleanup(lambda: child.poll() is None and child.kill())

        def record_lines():
            names = [n for n in leftovers(self.local) if n.endswith(".blocks.inflight")]
            if not names:
                return 0
            with open(os.path.join(self.local, names[0]), "rb") as f:
                return f.read().count(b"\n")

        # The header and four blocks recorded; the fifth request hangs.
        def four_recorded():
            self.assertIsNone(child.poll(), "the child ended early")
            return record_lines() == 5 and len(self.ranged.ranges) == 5

        await until(four_recorded, 30, "four blocks recorded by the child")
        child.send_signal(signal.SIGKILL)
        await until(lambda: child.poll() is not None, 10, "the child to die")
        self.ranged.ranges.clear()
        self.ranged.fail_after = None
        await self.get("big.bin", expected_size=SIZE, expected_checksum=("sha512", checksum))
        self.assertEqual(len(self.ranged.ranges), 9 - 4)
        with open(self.dest, "rb") as f:
            self.assertEqual(f.read(), self.data)
        self.assertEqual(leftovers(self.local), [])

    async def test_newVersion(self):
        """
        Blocks of an earlier version of a file (another checksum) are never mixed with the
        new one's.
        """
        self.ranged.fail_after = 4
        with self.assertRaises(ConnectionFailed):
            await self.get("big.bin", expected_size=SIZE,
                           expected_checksum=("sha512", sha512(b"old version")))
        self.ranged.ranges.clear()
        self.ranged.fail_after = None
        await self.get("big.bin", expected_size=SIZE,
                       expected_checksum=("sha512", sha512(self.data)))
        self.assertEqual(len(self.ranged.ranges), 9)
        with open(self.dest, "rb") as f:
            self.assertEqual(f.read(), self.data)

    async def test_permanentFailure(self):
        """
        A permanent failure (the file is gone) leaves no part file behind: no attempt will
        resume it.
        """
        self.ranged.fail_after = 2
        self.ranged.fail_code = 404
        with self.assertRaises(TransferError) as caught:
            await self.get("big.bin", expected_size=SIZE)
        self.assertEqual(caught.exception.code, 404)
        self.assertEqual(leftovers(self.local), [])

    async def test_noRange(self):
        """
        A server that ignores Range (it answers 200 with the whole file) gets the file in one
        stream, and so does every later file from it.
        """
        size = 3 * BLOCK + 5
        blocks = BlockSettings(threshold=BLOCK, size=BLOCK)
        checksum = ("sha512", sha512(pattern(size)))
        result = await self.get(f"{size}", prefix="/generated/", expected_size=size,
                                expected_checksum=checksum, blocks=blocks)
        self.assertEqual((result.size, result.blocks), (size, 0))
        self.assertEqual(len(blocks.no_range), 1)
        result = await self.get(f"{size}", dest=self.dest + "2", prefix="/generated/",
                                expected_size=size, blocks=blocks)
        self.assertEqual(result.blocks, 0)
        self.assertEqual(leftovers(self.local), [])

    async def test_wrongRange(self):
        """
        A server answering another range than the one asked fails the transfer; nothing is
        put in place.
        """
        class Liar(resource.Resource):
            isLeaf = True

            def render_GET(self, request):
                request.setResponseCode(206)
                request.setHeader(b"content-range", b"bytes 0-9/%d" % SIZE)
                return b"0123456789"

        self.server.site.resource.putChild(b"liar", Liar())
        with self.assertRaises(TransferError):
            await self.get("big.bin", prefix="/liar/", expected_size=SIZE)
        self.assertFalse(os.path.exists(self.dest))

    async def test_sr3Blocks(self):
        """
        sr3's notices of one file's blocks, in any order, each fetch their block (verified
        against the block's own checksum); the last one puts the file in place.
        """
        size, step = 5 * 100_000 + 7, 100_000
        data = self.data[:size]
        write_file(os.path.join(self.root, "sr3.bin"), data)
        count = 6
        results = []
        for number in (3, 0, 5, 1, 4, 2):
            part = data[number * step:(number + 1) * step]
            results.append(await self.get(
                "sr3.bin", block=(size, step, number, len(part)),
                expected_checksum=("sha512", sha512(part)), mtime=1_500_000_000.0,
            ))
            self.assertEqual(os.path.exists(self.dest), len(results) == count)
        self.assertEqual([r.complete for r in results], [False] * 5 + [True])
        self.assertEqual(results[-1].size, size)
        with open(self.dest, "rb") as f:
            self.assertEqual(f.read(), data)
        self.assertEqual(os.stat(self.dest).st_mtime, 1_500_000_000.0)
        self.assertEqual(leftovers(self.local), [])

    async def test_sr3BadBlock(self):
        """
        A block whose bytes do not match its checksum is not recorded.
        """
        size, step = 300_000, 100_000
        write_file(os.path.join(self.root, "sr3.bin"), self.data[:size])
        with self.assertRaises(ChecksumMismatch):
            await self.get("sr3.bin", block=(size, step, 1, step),
                           expected_checksum=("sha512", sha512(b"not it")))
        self.ranged.ranges.clear()
        part = self.data[step:2 * step]
        result = await self.get("sr3.bin", block=(size, step, 1, step),
                                expected_checksum=("sha512", sha512(part)))
        self.assertFalse(result.complete)
        self.assertEqual(len(self.ranged.ranges), 1)


class SFTPBlockTests(_BlockTests, TestCase):
    """
    Blocks over sftp: reads at offsets, one connection per block.
    """

    def setUp(self):
        super().setUp()
        self.server = start_sftp(self, self.root, user="bob", password=SECRET)
        self.known_hosts = write_file(
            os.path.join(self.mktemp() + "-known_hosts"), self.server.known_hosts_line().encode()
        )
        port = self.server.port.getHost().port
        self.creds = Credentials.parse(f"sftp://bob:{SECRET}@127.0.0.1:{port}/\n")

    def get(self, name, dest=None, **kwargs):
        kwargs.setdefault("blocks", self.blocks)
        kwargs.setdefault("pool", self.pool)
        kwargs.setdefault("credentials", self.creds)
        kwargs.setdefault("known_hosts", self.known_hosts)
        return transfer.get(reactor, self.server.url + "/" + name, dest or self.dest, **kwargs)

    def requests(self):
        return self.server.factory.accepted


class FTPBlockTests(_BlockTests, TestCase):
    """
    Blocks over ftp: REST then RETR, cut at the block's end.
    """

    def setUp(self):
        super().setUp()
        self.server = start_ftp(self, self.root, user="carol", password=SECRET)
        port = self.server.port.getHost().port
        self.creds = Credentials.parse(f"ftp://carol:{SECRET}@127.0.0.1:{port}/\n")

    def get(self, name, dest=None, **kwargs):
        kwargs.setdefault("blocks", self.blocks)
        kwargs.setdefault("pool", self.pool)
        kwargs.setdefault("credentials", self.creds)
        return transfer.get(reactor, self.server.url + "/" + name, dest or self.dest, **kwargs)

    def requests(self):
        # Block 0 starts at 0: its RETR needs no REST.
        return len(self.server.factory.restarts) + 1

    async def test_noRest(self):
        """
        A server without REST gets the file in one stream, and so does every later file
        from it.
        """
        server = start_ftp(self, self.root, user="carol", password=SECRET, rest=False)
        port = server.port.getHost().port
        creds = Credentials.parse(f"ftp://carol:{SECRET}@127.0.0.1:{port}/\n")
        blocks = BlockSettings(threshold=BLOCK, size=BLOCK)
        for dest in (self.dest, self.dest + "2"):
            result = await transfer.get(
                reactor, server.url + "/big.bin", dest, credentials=creds, pool=self.pool,
                expected_size=SIZE, expected_checksum=("sha512", sha512(self.data)),
                blocks=blocks,
            )
            self.assertEqual((result.size, result.blocks), (SIZE, 0))
        self.assertEqual(len(blocks.no_range), 1)
        self.assertEqual(leftovers(self.local), [])

    async def test_restOffsets(self):
        """
        Each block but the first is asked for at its own offset.
        """
        await self.get("big.bin", expected_size=SIZE)
        self.assertEqual(sorted(self.server.factory.restarts), list(range(BLOCK, SIZE, BLOCK)))


class _PutBlockTests:
    """
    Puts in blocks (L{ion.apps.pump.transfer.sendblocks}); hooks: C{url(name)}, C{options()},
    C{block_offsets()} (the offset each block was written at, as the server saw it) and
    C{cut_after(n)} / C{uncut()} (the server fails or stalls every block after the n-th).
    """

    blocks = BlockSettings(threshold=PUT_BLOCK, size=PUT_BLOCK, parallel=4)

    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        self.local = os.path.abspath(self.mktemp())
        self.records = os.path.join(self.local, "records")
        os.makedirs(os.path.join(self.root, "in"))
        os.makedirs(self.local)
        self.data = os.urandom(PUT_SIZE)
        self.src = write_file(os.path.join(self.local, "big.bin"), self.data)
        self.pool = start_pool(self)
        self.active = set()  # the puts in blocks under way
        self.addCleanup(settle)

    def put(self, name="in/big.bin", **kwargs):
        kwargs.setdefault("blocks", self.blocks)
        kwargs.setdefault("record_dir", self.records)
        kwargs.setdefault("pool", self.pool)
        kwargs.setdefault("active", self.active)
        kwargs.update(self.options())
        return Deferred.fromCoroutine(transfer.put(reactor, self.src, self.url(name), **kwargs))

    def arrived(self):
        with open(os.path.join(self.root, "in", "big.bin"), "rb") as f:
            return f.read()

    def record_lines(self):
        names = os.listdir(self.records) if os.path.isdir(self.records) else []
        if not names:
            return 0
        with open(os.path.join(self.records, names[0]), "rb") as f:
            return f.read().count(b"\n")

    async def test_putBlocks(self):
        """
        A file above the threshold is sent in blocks, each written at its own offset into
        one temporary file, parallel; it arrives byte-exact under its name, with nothing
        left at the server or in the record directory; progress counts the blocks.
        """
        seen = []
        active = type("Active", (), {"add": lambda _, state: seen.append(state),
                                      "discard": lambda _, state: None})()
        result = await self.put(active=active)
        self.assertEqual(self.arrived(), self.data)
        self.assertEqual((result.size, result.blocks), (PUT_SIZE, 9))
        self.assertEqual(result.checksum["sha512"], sha512(self.data))
        self.assertEqual(sorted(self.block_offsets()), list(range(0, PUT_SIZE, PUT_BLOCK)))
        self.assertEqual(seen[0].progress(), "9/9 blocks, 2.0 MiB of 2.0 MiB")
        self.assertEqual(os.listdir(os.path.join(self.root, "in")), ["big.bin"])
        self.assertEqual(os.listdir(self.records), [])
        self.assertGreater(self.most_at_once(), 1)

    async def test_putBelowThreshold(self):
        """
        A file below the threshold, or a put given no record directory, goes in one stream.
        """
        result = await self.put(blocks=BlockSettings(threshold=PUT_SIZE + 1, size=PUT_BLOCK))
        self.assertEqual(result.blocks, 0)
        result = await self.put(record_dir=None)
        self.assertEqual(result.blocks, 0)
        self.assertEqual(self.arrived(), self.data)
        self.assertEqual(self.block_offsets(), [0, 0])

    async def test_putResume(self):
        """
        A put cut after four blocks keeps its record; the next sends only the five blocks
        missing (counted at the server), and the file arrives whole.
        """
        single = BlockSettings(threshold=PUT_BLOCK, size=PUT_BLOCK, parallel=1)
        self.cut_after(4)
        putting = self.put(blocks=single)
        await self.until_cut(putting)
        self.assertEqual(self.record_lines(), 5)  # the header and four blocks
        self.assertFalse(os.path.exists(os.path.join(self.root, "in", "big.bin")))
        self.uncut()
        result = await self.put()
        self.assertEqual(sorted(self.block_offsets()),
                         list(range(4 * PUT_BLOCK, PUT_SIZE, PUT_BLOCK)))
        self.assertEqual(result.blocks, 9)
        self.assertEqual(self.arrived(), self.data)
        self.assertEqual(os.listdir(self.records), [])

    async def test_forgetGivenUp(self):
        """
        A put cut after four blocks keeps its temporary file at the server and its record, for
        the next attempt to resume; once the caller gives the file up for good, L{forget_put}
        removes both. The record of another version is not this file's: nothing is removed.
        """
        single = BlockSettings(threshold=PUT_BLOCK, size=PUT_BLOCK, parallel=1)
        self.cut_after(4)
        putting = self.put(blocks=single, version="v1")
        await self.until_cut(putting)
        self.uncut()
        incoming = os.path.join(self.root, "in")
        self.assertEqual(len(leftovers(incoming)), 1)

        def forget(version):
            return forget_put(
                reactor, self.url("in/big.bin"), PUT_SIZE, blocks=self.blocks,
                record_dir=self.records, version=version, pool=self.pool, **self.options()
            )

        self.assertFalse(await forget("v2"))
        self.assertEqual(len(leftovers(incoming)), 1)
        self.assertEqual(len(os.listdir(self.records)), 1)
        self.assertTrue(await forget("v1"))
        self.assertEqual(os.listdir(incoming), [])
        self.assertEqual(os.listdir(self.records), [])

    async def test_putNewVersion(self):
        """
        Blocks recorded for another version of the file (another identity) are not reused.
        """
        self.cut_after(4)
        single = BlockSettings(threshold=PUT_BLOCK, size=PUT_BLOCK, parallel=1)
        putting = self.put(blocks=single, version="old identity")
        await self.until_cut(putting)
        self.uncut()
        await self.put(version="new identity")
        self.assertEqual(len(self.block_offsets()), 9)
        self.assertEqual(self.arrived(), self.data)


class SFTPPutBlockTests(_PutBlockTests, TestCase):
    """
    Puts in blocks over sftp: each block written at its offset on a connection of its own.
    """

    def setUp(self):
        super().setUp()
        self.server = start_sftp(self, self.root, user="bob", password=SECRET)
        self.known_hosts = write_file(
            os.path.join(self.mktemp() + "-known_hosts"), self.server.known_hosts_line().encode()
        )
        port = self.server.port.getHost().port
        self.creds = Credentials.parse(f"sftp://bob:{SECRET}@127.0.0.1:{port}/\n")

    def url(self, name):
        return self.server.url + "/" + name

    def options(self):
        return {"credentials": self.creds, "known_hosts": self.known_hosts}

    def block_offsets(self):
        return [offset for _, offset, _ in self.server.writes]

    def most_at_once(self):
        return self.server.most_writing

    def cut_after(self, n):
        self.server.stall_writes_from = n * PUT_BLOCK

    def uncut(self):
        self.server.stall_writes_from = None
        self.server.writes.clear()

    async def until_cut(self, putting):
        await until(lambda: self.record_lines() == 5, 30, "four blocks recorded")
        putting.cancel()
        with self.assertRaises(CancelledError):
            await putting
        # A cancelled coroutine's Deferred fires at once; its record is closed after.
        await until(lambda: not self.active, 10, "the cancelled put to end")
        await settle()

    async def test_putResumeAfterKill(self):
        """
        A process killed (SIGKILL) after four blocks were acknowledged leaves its record; the
        next put sends only the blocks the record lacks (counted at the server).
        """
        self.server.stall_writes_from = 4 * PUT_BLOCK
        script = (
            "import sys\n"
            "from twisted.internet import task\n"
            "from twisted.internet.defer import Deferred\n"
            "from twisted.python.threadpool import ThreadPool\n"
            "from ion.apps.pump import transfer\n"
            "from ion.apps.pump.transfer import Credentials\n"
            "from ion.apps.pump.transfer.blocks import BlockSettings\n"
            "def main(reactor):\n"
            "    pool = ThreadPool(0, 2); pool.start()\n"
            "    return Deferred.fromCoroutine(transfer.put(reactor, sys.argv[1], sys.argv[2],\n"
            "        pool=pool, record_dir=sys.argv[3], known_hosts=sys.argv[4],\n"
            "        credentials=Credentials.parse(sys.argv[5]),\n"
            f"        blocks=BlockSettings({PUT_BLOCK}, {PUT_BLOCK}, 1)))\n"
            "task.react(main)\n"
        )
        port = self.server.port.getHost().port
        checkout = os.path.dirname(os.path.dirname(os.path.abspath(ion.__file__)))
        child = subprocess.Popen(
            [sys.executable, "-c", script, self.src, self.url("in/big.bin"), self.records,
             self.known_hosts, f"sftp://bob:{SECRET}@127.0.0.1:{port}/\n"],
            env=dict(os.environ, PYTHONPATH=checkout), stdin=subprocess.DEVNULL,
        )
        self.addCleanup(lambda: child.poll() is None and child.kill())

        def four_recorded():
            self.assertIsNone(child.poll(), "the child ended early")
            return self.record_lines() == 5

        await until(four_recorded, 30, "four blocks recorded by the child")
        child.send_signal(signal.SIGKILL)
        await until(lambda: child.poll() is not None, 10, "the child to die")
        self.uncut()
        result = await self.put()
        self.assertEqual(sorted(self.block_offsets()),
                         list(range(4 * PUT_BLOCK, PUT_SIZE, PUT_BLOCK)))
        self.assertEqual(result.blocks, 9)
        self.assertEqual(self.arrived(), self.data)
        self.assertEqual(os.listdir(os.path.join(self.root, "in")), ["big.bin"])


class FTPPutBlockTests(_PutBlockTests, TestCase):
    """
    Puts in blocks over ftp: block 0 a STOR, then each other block REST + STOR.
    """

    def setUp(self):
        super().setUp()
        self.server = start_ftp(self, self.root, user="carol", password=SECRET)
        port = self.server.port.getHost().port
        self.creds = Credentials.parse(f"ftp://carol:{SECRET}@127.0.0.1:{port}/\n")

    def url(self, name):
        return self.server.url + "/" + name

    def options(self):
        return {"credentials": self.creds}

    def block_offsets(self):
        return [offset for _, offset in self.server.factory.stores]

    def most_at_once(self):
        return self.server.factory.most_storing

    def cut_after(self, n):
        self.server.factory.refuse_stores_after = n

    def uncut(self):
        self.server.factory.refuse_stores_after = None
        self.server.factory.stores.clear()

    async def until_cut(self, putting):
        with self.assertRaises(ConnectionFailed):
            await putting

    async def test_noRestInFeatures(self):
        """
        A server whose FEAT lists no REST gets the file in one stream (no block tried), and
        so does every later file to it.
        """
        server = start_ftp(self, self.root, user="carol", password=SECRET, rest=False)
        port = server.port.getHost().port
        creds = Credentials.parse(f"ftp://carol:{SECRET}@127.0.0.1:{port}/\n")
        blocks = BlockSettings(threshold=PUT_BLOCK, size=PUT_BLOCK)
        for _ in range(2):
            result = await transfer.put(
                reactor, self.src, server.url + "/in/big.bin", credentials=creds,
                pool=self.pool, blocks=blocks, record_dir=self.records,
            )
            self.assertEqual((result.size, result.blocks), (PUT_SIZE, 0))
        self.assertEqual(len(blocks.no_store_range), 1)
        self.assertEqual(self.arrived(), self.data)
        self.assertEqual(os.listdir(os.path.join(self.root, "in")), ["big.bin"])

    async def test_storeRestRefused(self):
        """
        A server refusing a STOR after REST (451, as ProFTPD does by default) makes the put
        fall back to one stream: the file arrives whole, the blocks' temporary file and
        record are removed, and the next file to it goes in one stream at once.
        """
        self.server.factory.store_rest = False
        blocks = BlockSettings(threshold=PUT_BLOCK, size=PUT_BLOCK)
        result = await self.put(blocks=blocks)
        self.assertEqual((result.size, result.blocks), (PUT_SIZE, 0))
        self.assertEqual(self.arrived(), self.data)
        self.assertEqual(os.listdir(os.path.join(self.root, "in")), ["big.bin"])
        self.assertEqual(os.listdir(self.records), [])
        self.assertEqual(len(blocks.no_store_range), 1)
        self.server.factory.stores.clear()
        await self.put(blocks=blocks)
        self.assertEqual(self.block_offsets(), [0])


class SendRecordTests(SynchronousTestCase):
    """
    The sender's local record of a put in blocks.
    """

    def setUp(self):
        self.directory = os.path.join(os.path.abspath(self.mktemp()), "blocks")

    def record(self):
        return SendRecord(self.directory, "k" * 16, 10, 4, 3, "sftp://h/f", reactor, None)

    def test_locked(self):
        """
        Two puts of one file at once: the second fails with 503 (retried later) and leaves
        the first one's record alone.
        """
        first = self.record()
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(first.open())), set())
        self.successResultOf(Deferred.fromCoroutine(first.reset()))
        self.successResultOf(Deferred.fromCoroutine(first.add(1)))
        failure = self.failureResultOf(Deferred.fromCoroutine(self.record().open()), LocalFailure)
        self.assertEqual(failure.value.code, 503)
        self.successResultOf(Deferred.fromCoroutine(first.close()))
        again = self.record()
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(again.open())), {1})
        self.successResultOf(Deferred.fromCoroutine(again.drop()))
        self.assertEqual(os.listdir(self.directory), [])

    def test_sweep(self):
        """
        Records unchanged for two days (sends given up on) are removed; younger ones and
        other files stay.
        """
        os.makedirs(self.directory)
        now = time.time()
        for name, age in (("old.blocks", 3 * 86400), ("young.blocks", 3600),
                          ("other", 3 * 86400)):
            path = write_file(os.path.join(self.directory, name), b"{}\n")
            os.utime(path, (now - age, now - age))
        self.assertEqual(sweep_records(self.directory, now=now), ["old.blocks"])
        self.assertEqual(sorted(os.listdir(self.directory)), ["other", "young.blocks"])
        self.assertEqual(sweep_records(self.directory + "-none"), [])
