"""Files announced in blocks (sr3's C{blocks} field) by a watch, a poll and C{ion post}'s
encoder, and an ION consumer putting them together: the notices as sr3 3.x writes them, the
accept side (L{ion.apps.pump.transfer.blocks.sr3_block}) agreeing with them, and a watch ->
consumer flow on memory:// and on the private RabbitMQ node, each block fetched by range."""

import base64
import hashlib
import json
import os

from twisted.trial import unittest

from ion.apps.pump import notice as notice_module
from ion.apps.pump.args import BadArgument, PollArgs, WatchArgs
from ion.apps.pump.consumer import dup_key
from ion.apps.pump.notice import Notice, block_lengths, block_notices, block_step
from ion.apps.pump.transfer import blocks as transfer_blocks
from ion.apps.pump.transfer.blocks import sr3_block
from ion.apps.pump.poll import PollService
from ion.apps.pump.transfer_service import TransferService
from ion.apps.pump.watch import Watch, describe
from tests.apps.pump.fixtures import until, write_source
from tests.apps.pump.servers import start_http
from tests.apps.pump.test_consumer import ConsumerScenarios, OnMemory, OnPrivateRabbitMQ
from tests.apps.pump.test_transfer_blocks import _Ranged

BLOCK = 64 * 1024


def sha512(data):
    return base64.b64encode(hashlib.sha512(data).digest()).decode("ascii")


class BlockNoticeTests(unittest.SynchronousTestCase):
    """The notices of a file announced in blocks."""

    def test_block_step(self):
        """A file bigger than block_size is announced in blocks of it; one not bigger, or
        no block_size, whole; a file that would have more blocks than a consumer takes gets
        bigger blocks (at most MAX_BLOCKS, the consumers' limit)."""
        self.assertIsNone(block_step(10 * BLOCK, None))
        self.assertIsNone(block_step(BLOCK, BLOCK))
        self.assertEqual(block_step(BLOCK + 1, BLOCK), BLOCK)
        huge = 4096 * BLOCK + 1
        step = block_step(huge, BLOCK)
        self.assertEqual(len(block_lengths(huge, step)), notice_module.MAX_BLOCKS)
        self.assertEqual(notice_module.MAX_BLOCKS, transfer_blocks.MAX_BLOCKS)
        self.assertEqual(block_lengths(2 * BLOCK + 5, BLOCK), [BLOCK, BLOCK, 5])

    def test_notices_as_sr3_writes_them(self):
        """One notice per block: the file's fields, the block's size and sha512 identity,
        and blocks {method inplace, size, number, manifest of every block {size, identity}}
        with string keys (sr3's JSON); the accept side reads each as its block."""
        data = os.urandom(2 * BLOCK + 10)
        parts = [data[i:i + BLOCK] for i in range(0, len(data), BLOCK)]
        fields = {"pubTime": "20261206T120000", "baseUrl": "http://h/", "relPath": "a/f",
                  "identity": {"method": "sha512", "value": None}, "size": len(data),
                  "mtime": "20261206T115959.5", "mode": "644"}
        notices = block_notices(fields, BLOCK, [(len(p), sha512(p)) for p in parts])
        self.assertEqual(fields["size"], len(data))  # not changed
        manifest = {str(n): {"size": len(p), "identity": sha512(p)} for n, p in enumerate(parts)}
        self.assertEqual(len(notices), 3)
        for number, (one, part) in enumerate(zip(notices, parts)):
            body = json.loads(Notice(one).to_json())
            Notice(body).validate()
            self.assertEqual(body["blocks"], {"method": "inplace", "size": BLOCK,
                                              "number": number, "manifest": manifest})
            self.assertEqual(body["size"], len(part))
            self.assertEqual(body["identity"], {"method": "sha512", "value": sha512(part)})
            for key in ("pubTime", "baseUrl", "relPath", "mtime", "mode"):
                self.assertEqual(body[key], fields[key])
            self.assertEqual(sr3_block(body["blocks"], body["size"]),
                             (len(data), BLOCK, number, len(part)))

    def test_cod_blocks(self):
        """Without block checksums (a poll), each block keeps the file's cod identity, whose
        value the manifest carries."""
        fields = {"pubTime": "20261206T120000", "baseUrl": "http://h/", "relPath": "f",
                  "identity": {"method": "cod", "value": "sha512"}, "size": BLOCK + 1}
        notices = block_notices(fields, BLOCK, [(BLOCK, None), (1, None)])
        self.assertEqual([n["identity"] for n in notices],
                         [{"method": "cod", "value": "sha512"}] * 2)
        self.assertEqual(notices[1]["blocks"]["manifest"],
                         {"0": {"size": BLOCK, "identity": "sha512"},
                          "1": {"size": 1, "identity": "sha512"}})
        self.assertEqual(sr3_block(notices[1]["blocks"], 1), (BLOCK + 1, BLOCK, 1, 1))

    def test_dup_keys_of_blocks(self):
        """Blocks of equal bytes (or, without checksums, equal length) are not duplicates of
        each other, nor of the same block of the file's next version; a copy of one is."""
        fields = {"pubTime": "20261206T120000", "baseUrl": "http://h/", "relPath": "f",
                  "identity": {"method": "sha512", "value": None}, "size": 2 * BLOCK,
                  "mtime": "20261206T115959"}
        same = sha512(bytes(BLOCK))
        first = block_notices(fields, BLOCK, [(BLOCK, same), (BLOCK, same)])
        keys = [dup_key(Notice(n)) for n in first]
        self.assertNotEqual(keys[0], keys[1])
        self.assertEqual(dup_key(Notice(json.loads(Notice(first[0]).to_json()))), keys[0])
        later = block_notices(dict(fields, mtime="20261206T120001"), BLOCK,
                              [(BLOCK, same), (BLOCK, same)])
        self.assertNotEqual(dup_key(Notice(later[0])), keys[0])
        whole = dict(fields, identity={"method": "sha512", "value": same})
        self.assertEqual(dup_key(Notice(whole)), f"sha512:{same}\nf")  # as before

    def test_describe_in_blocks(self):
        """describe() reads a bigger file once into each block's sha512; a file not bigger
        gets its own."""
        path = os.path.abspath(self.mktemp())
        data = os.urandom(3 * BLOCK + 7)
        with open(path, "wb") as f:
            f.write(data)
        size, _, _, digest, blocks = describe(path, BLOCK)
        self.assertEqual((size, digest), (len(data), None))
        self.assertEqual(blocks, (BLOCK, [(len(data[i:i + BLOCK]), sha512(data[i:i + BLOCK]))
                                          for i in range(0, len(data), BLOCK)]))
        size, _, _, digest, blocks = describe(path, len(data))
        self.assertEqual((digest, blocks), (sha512(data), None))

    def test_block_size_argument(self):
        """block_size of a watch and a poll: None (whole files) or bytes, at least 64 KiB."""
        self.assertIsNone(WatchArgs.parse({"name": "w", "path": "/x"}).block_size)
        self.assertEqual(
            PollArgs.parse({"name": "p", "url": "file:///x/", "block_size": BLOCK}).block_size,
            BLOCK)
        for bad in (1000, "1M", 0):
            e = self.assertRaises(BadArgument, WatchArgs.parse,
                                  {"name": "w", "path": "/x", "block_size": bad})
            self.assertIn("block_size must be bytes, an int >= 65536", str(e))


class WatchedBlocksScenarios:
    """A watch announcing in blocks, a consumer putting the file together (the consumer
    scenarios' hooks, not their tests)."""

    container = ConsumerScenarios.container
    setUp = ConsumerScenarios.setUp
    receivers = ConsumerScenarios.receivers
    spawn_consumer = ConsumerScenarios.spawn_consumer
    pump = ConsumerScenarios.pump

    async def start_watch(self, container, **args):
        args = dict({"name": "w", "path": self.src, "exchange": self.xpublic,
                     "state_dir": os.path.join(self.base, "watch"), "coalesce": 0.1,
                     "block_size": BLOCK}, **args)
        watch = await container.spawn(Watch, args=args)
        self.addCleanup(lambda: None if watch.lifecycle.final else watch.terminate())
        return watch

    def content(self, rel):
        try:
            with open(os.path.join(self.dest, rel), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    async def test_blocks_fetched_by_range(self):
        """A file of five blocks arrives whole, byte for byte, each block fetched once by an
        HTTP Range request (its checksum verified), and is delivered once; a file no bigger
        than a block is announced and fetched whole."""
        server = start_http(self, self.src)
        ranged = _Ranged(self.src)
        server.site.resource.putChild(b"ranged", ranged)
        base = f"{server.url}/ranged/"
        c = await self.pump(sources=[base], retry_initial=0.1)
        await self.collector.listen(self.xpublic)
        watch = await self.start_watch(c, base_url=base)
        data = os.urandom(4 * BLOCK + 1000)
        small = os.urandom(BLOCK)
        write_source(self.src, "big/f.dat", data)
        write_source(self.src, "small.dat", small)
        await until(lambda: self.content("big/f.dat") == data and self.content("small.dat")
                    == small, timeout=30, what="the files to arrive")
        self.assertEqual(sorted(ranged.ranges), sorted(
            f"bytes={o}-{min(o + BLOCK, len(data)) - 1}" for o in range(0, len(data), BLOCK)))
        await until(lambda: self.consumer.stats["delivered"] == 2, what="2 deliveries")
        self.assertEqual(watch.stats["announced"], 2)
        announced = [b for b in self.collector.bodies(self.xpublic) if "fileOp" not in b]
        self.assertEqual(
            sorted((b["blocks"]["number"], b["size"], b["identity"]["value"])
                   for b in announced if b["relPath"] == "big/f.dat"),
            [(n, len(data[o:o + BLOCK]), sha512(data[o:o + BLOCK]))
             for n, o in enumerate(range(0, len(data), BLOCK))])
        self.assertEqual({b["identity"]["method"] for b in announced}, {"sha512"})
        [whole] = [b for b in announced if b["relPath"] == "small.dat"]
        self.assertEqual((whole["size"], whole["identity"]["value"]), (BLOCK, sha512(small)))
        self.assertNotIn("blocks", whole)
        await self.quiet()
        self.assertEqual(sorted(os.listdir(os.path.join(self.dest, "big"))), ["f.dat"])

    async def test_blocks_of_local_files(self):
        """A watch's file: URLs: each block is read from the local file at its offset."""
        c = await self.pump(retry_initial=0.1)
        await self.start_watch(c)
        data = os.urandom(3 * BLOCK + 1)
        write_source(self.src, "f.dat", data)
        await until(lambda: self.content("f.dat") == data, timeout=30, what="the file")
        await until(lambda: self.consumer.stats["delivered"] == 1, what="one delivery")

    async def test_poll_blocks(self):
        """A poll's blocks (equal lengths, no checksums) are each fetched, none taken for a
        copy of another, and the file arrives whole."""
        credentials = os.path.join(self.base, "poll-credentials.conf")
        with open(credentials, "w"):
            pass
        os.chmod(credentials, 0o600)
        c = await self.pump(retry_initial=0.1)
        await c.spawn(TransferService, args={"credentials": credentials})
        data = os.urandom(3 * BLOCK + 2)
        write_source(self.src, "p/f.dat", data)
        os.utime(os.path.join(self.src, "p", "f.dat"), (1700000000, 1700000000))
        poll = await c.spawn(PollService, args={
            "name": "p", "url": "file://" + self.src + "/", "exchange": self.xpublic,
            "state_dir": os.path.join(self.base, "poll"), "interval": 3600,
            "block_size": BLOCK})
        self.addCleanup(lambda: None if poll.lifecycle.final else poll.terminate())
        await poll.poll_now()
        await until(lambda: self.content("p/f.dat") == data, timeout=30, what="the file")
        await until(lambda: self.consumer.stats["delivered"] == 1, what="one delivery")
        self.assertEqual(self.consumer.stats["duplicates"], 0)

    async def test_whole_file_reannounced(self):
        """A consumer in sarra mode announces a file put together from blocks once, whole:
        its size and sha512, no blocks field; so does its completion trigger."""
        xsarra, xdone = self.name("xsarra"), self.name("xdone")
        c = await self.pump(retry_initial=0.1,
                            reannounce={"exchange": xsarra, "base_url": "http://me/"},
                            on_complete={"complete_exchange": xdone})
        await self.collector.listen(xsarra)
        await self.collector.listen(xdone)
        await self.start_watch(c)
        data = os.urandom(2 * BLOCK + 3)
        write_source(self.src, "f.dat", data)
        await until(lambda: self.collector.bodies(xsarra) and self.collector.bodies(xdone),
                    timeout=30, what="a re-announce and a completion notice")
        await self.quiet()
        for exchange in (xsarra, xdone):
            [announced] = self.collector.bodies(exchange)
            self.assertEqual((announced["size"], announced["identity"]),
                             (len(data), {"method": "sha512", "value": sha512(data)}))
            self.assertNotIn("blocks", announced)
        self.assertEqual(self.content("f.dat"), data)


class MemoryWatchedBlocksTests(OnMemory, WatchedBlocksScenarios, unittest.TestCase):
    """On the memory:// transport."""


class AmqpWatchedBlocksTests(OnPrivateRabbitMQ, WatchedBlocksScenarios, unittest.TestCase):
    """On the private RabbitMQ node."""
