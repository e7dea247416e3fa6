"""Interop with real sr3 on one private RabbitMQ node: ION's notices applied by an sr3
subscribe, and sr3's notices applied by an ION consumer (field names, fileOp shapes and
routing keys exactly sr3's); and over MQTT v5 on a private Mosquitto: sr3 post -> ION
consumer, ION poll -> sr3 subscribe (sr3's topic layout and properties)."""

import itertools
import os

from twisted.internet import threads
from twisted.trial import unittest

from ion.apps.pump.consumer import Consumer
from ion.apps.pump.poll import PollService
from ion.apps.pump.watch import Watch
from ion.core.cc.testing import make_container
from tests.apps.pump.fixtures import Collector, delete_queues
from tests.apps.pump.sr3 import Sr3, skip_or_fail_without_sr3
from tests.apps.pump.test_post import post
from tests.broker import get_broker, skip_or_fail_without_rabbitmq
from tests.mosquitto import get_mosquitto
from tests.waiting import until

_tags = itertools.count(1)


def tree_of(root):
    """{relPath: content, or '-> target' for a link, or '/' for a directory} below root."""
    found = {}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(top, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                found[rel] = "-> " + os.readlink(path)
            elif os.path.isdir(path):
                found[rel] = "/"
            else:
                try:
                    with open(path) as f:
                        found[rel] = f.read()
                except FileNotFoundError:
                    pass  # a temporary file renamed into place while we looked
    return found


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


class Sr3InteropTests(unittest.TestCase):
    timeout = 180

    async def setUp(self):
        skip_or_fail_without_rabbitmq()
        skip_or_fail_without_sr3()
        self.broker = get_broker()
        self.tag = f"i{os.getpid()}x{next(_tags)}"
        base = os.path.abspath(self.mktemp())
        self.sr3 = Sr3(os.path.join(base, "home"), self.broker)
        self.addCleanup(lambda: threads.deferToThread(self.sr3.stop))
        self.src = os.path.join(base, "src")
        self.dest = os.path.join(base, "dest")
        self.state = os.path.join(base, "state")
        os.makedirs(self.src)
        os.makedirs(self.dest)

    async def until_tree(self, wanted, what):
        try:
            await until(lambda: tree_of(self.dest) == wanted, timeout=60,
                        what=lambda _: f"{what}: {tree_of(self.dest)} != {wanted}")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.sr3.output()}") from None

    async def probe(self):
        """Write the probe file until it arrives: sr3 may bind its queue after the first."""
        for attempt in range(30):
            write(os.path.join(self.src, "probe"), "p")
            try:
                await until(lambda: tree_of(self.dest) == {"probe": "p"}, timeout=2)
                return
            except AssertionError:
                pass
        raise AssertionError(f"the probe never arrived\n{self.sr3.output()}")

    async def test_ion_watch_to_sr3_subscribe(self):
        """An sr3 subscribe mirrors what an ION watch announces: creates in new directories,
        a rewrite, a rename and a removal."""
        exchange = f"xs_{self.tag}"
        c = await make_container(self, url=self.broker.url)
        watch = await c.spawn(Watch, args={
            "name": "w", "path": self.src, "state_dir": self.state, "exchange": exchange,
            "coalesce": 0.2})
        self.addCleanup(lambda: None if watch.lifecycle.final else watch.terminate())
        config = self.sr3.configure("subscribe", self.tag, [
            f"exchange {exchange}", f"queueName q_guest.subscribe.{self.tag}",
            "topicPrefix v03", "subtopic #", "logLevel info", f"directory {self.dest}",
            "mirror on", "accept .*",
        ])
        self.sr3.foreground(config)
        await self.probe()
        write(os.path.join(self.src, "a", "b", "f1"), "one")
        await self.until_tree({"probe": "p", "a": "/", "a/b": "/", "a/b/f1": "one"}, "creates")
        os.rename(os.path.join(self.src, "a", "b", "f1"), os.path.join(self.src, "a", "f2"))
        await self.until_tree({"probe": "p", "a": "/", "a/b": "/", "a/f2": "one"}, "rename")
        os.remove(os.path.join(self.src, "a", "f2"))
        write(os.path.join(self.src, "probe"), "again")
        await self.until_tree({"probe": "again", "a": "/", "a/b": "/"}, "remove, rewrite")

    def reassembling_subscribe(self, exchange):
        """Start an sr3 subscribe of C{exchange} into dest that puts files announced in blocks
        together (its block_reassembly: each block fetched at its offset into a block file of
        its own, then written at its place in the file)."""
        skip_or_fail_without_sr3(reassemble=True)
        config = self.sr3.configure("subscribe", self.tag, [
            f"exchange {exchange}", f"queueName q_guest.subscribe.{self.tag}",
            "topicPrefix v03", "subtopic #", "logLevel info", f"directory {self.dest}",
            "mirror on", "accept .*", "inflight None", "callback_prepend block_reassembly",
        ])
        self.sr3.foreground(config)

    def big_file(self, rel):
        """Write a file of four blocks and a bit at C{rel} below src; its bytes."""
        data = os.urandom(4 * 64 * 1024 + 1000)
        path = os.path.join(self.src, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        return data

    async def until_arrived(self, rel, data):
        def arrived():
            try:
                with open(os.path.join(self.dest, rel), "rb") as f:
                    return f.read() == data
            except FileNotFoundError:
                return False

        try:
            await until(arrived, timeout=60, what=f"{rel} put together by sr3")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.sr3.output()}") from None

    async def test_ion_blocks_to_sr3_subscribe(self):
        """An sr3 subscribe puts together, byte for byte, a file that an ION watch announces
        in blocks."""
        exchange = f"xs_{self.tag}"
        self.reassembling_subscribe(exchange)
        c = await make_container(self, url=self.broker.url)
        watch = await c.spawn(Watch, args={
            "name": "w", "path": self.src, "state_dir": self.state, "exchange": exchange,
            "coalesce": 0.2, "block_size": 64 * 1024})
        self.addCleanup(lambda: None if watch.lifecycle.final else watch.terminate())
        await self.probe()
        data = self.big_file("big/f.dat")
        await self.until_arrived("big/f.dat", data)

    async def test_ion_post_blocks_to_sr3_subscribe(self):
        """Likewise for a file announced by C{ion post --block-size}."""
        exchange = f"xs_{self.tag}"
        self.reassembling_subscribe(exchange)
        # sr3 may bind its queue after the first notices: post a probe until it arrives.
        write(os.path.join(self.src, "probe"), "p")
        for attempt in range(30):
            done = await threads.deferToThread(
                post, self.src, "--broker", self.broker.url, "--exchange", exchange, "probe")
            self.assertEqual(done.returncode, 0, done.stderr)
            try:
                await until(lambda: os.path.exists(os.path.join(self.dest, "probe")), timeout=2)
                break
            except AssertionError:
                pass
        data = self.big_file("big/p.dat")
        done = await threads.deferToThread(
            post, self.src, "--broker", self.broker.url, "--exchange", exchange,
            "--block-size", "65536", "big/p.dat")
        self.assertEqual(done.returncode, 0, done.stderr)
        await self.until_arrived("big/p.dat", data)

    async def test_sr3_watch_to_ion_consumer(self):
        """An ION consumer mirrors what an sr3 watch announces: creates in new directories, a
        rename (sr3's fileOp, old name as sr3 writes it) and a removal."""
        exchange = f"xs_{self.tag}"
        c = await make_container(self, url=self.broker.url)
        collector = await c.spawn(Collector)
        await collector.listen(f"xreport_{self.tag}")
        consumer = await c.spawn(Consumer, args={
            "name": self.tag, "exchange": exchange, "directory": self.dest,
            "state_dir": self.state, "report_exchange": f"xreport_{self.tag}",
            "sources": ["file://" + self.src + "/"]})
        self.addCleanup(lambda: None if consumer.lifecycle.final else consumer.terminate())
        self.addCleanup(lambda: delete_queues(self.broker.url, [consumer.queue]))
        config = self.sr3.configure("watch", self.tag, [
            f"post_exchange {exchange}", f"post_baseUrl file:{self.src}",
            f"post_baseDir {self.src}", f"path {self.src}", "logLevel info",
        ])
        self.sr3.foreground(config)
        await self.probe()
        write(os.path.join(self.src, "a", "b", "f1"), "one")
        await self.until_tree({"probe": "p", "a": "/", "a/b": "/", "a/b/f1": "one"}, "creates")
        os.rename(os.path.join(self.src, "a", "b", "f1"), os.path.join(self.src, "a", "f2"))
        await self.until_tree({"probe": "p", "a": "/", "a/b": "/", "a/f2": "one"}, "rename")
        os.remove(os.path.join(self.src, "a", "f2"))
        await self.until_tree({"probe": "p", "a": "/", "a/b": "/"}, "remove")
        # The rename and the removal were carried out as such (not fetched again).
        def messages():
            return [b["report"]["message"] for b in collector.bodies()]

        await until(lambda: "removed" in messages(), what=lambda _: messages())
        self.assertIn("renamed from a/b/f1", messages())
        self.assertEqual(consumer.stats["delivered"], 2)


class Sr3MqttInteropTests(unittest.TestCase):
    """ION and sr3 on one MQTT broker: files arrive byte for byte both ways."""

    timeout = 180

    def setUp(self):
        self.mosquitto = get_mosquitto()
        skip_or_fail_without_sr3(mqtt=True)
        self.tag = f"m{os.getpid()}x{next(_tags)}"
        self.exchange = f"xs_{self.tag}"
        base = os.path.abspath(self.mktemp())
        self.sr3 = Sr3(os.path.join(base, "home"), self.mosquitto, scheme="mqtt")
        self.addCleanup(lambda: threads.deferToThread(self.sr3.stop))
        self.src = os.path.join(base, "src")
        self.dest = os.path.join(base, "dest")
        self.state = os.path.join(base, "state")
        os.makedirs(self.src)
        os.makedirs(self.dest)
        # Bytes that text handling would change: every byte value, CR LF, no final newline.
        self.files = {
            "a/f1.bin": bytes(range(256)) * 4,
            "a/b/f2.txt": b"line\r\nmore\xff\x00",
            "f3": os.urandom(70000),
        }
        for rel, data in self.files.items():
            path = os.path.join(self.src, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)

    def tree(self, root):
        found = {}
        for top, dirs, names in os.walk(root):
            for name in names:
                path = os.path.join(top, name)
                with open(path, "rb") as f:
                    found[os.path.relpath(path, root)] = f.read()
        return found

    async def until_files(self, wanted, what):
        try:
            await until(lambda: self.tree(self.dest) == wanted, timeout=60,
                        what=lambda _: f"{what}: got {sorted(self.tree(self.dest))}")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.sr3.output()}") from None

    async def test_sr3_post_to_ion_consumer(self):
        """Files that sr3 post announces over MQTT reach an ION consumer, byte for byte, each
        reported as delivered."""
        c = await make_container(self)
        consumer = await c.spawn(Consumer, args={
            "name": self.tag, "broker": self.mosquitto.url, "exchange": self.exchange,
            "directory": self.dest, "state_dir": self.state,
            "sources": ["file://" + self.src + "/"]})
        config = self.sr3.configure("post", self.tag, [
            f"post_exchange {self.exchange}", "post_topicPrefix v03",
            f"post_baseUrl file:{self.src}", f"post_baseDir {self.src}", "logLevel info",
            *(f"path {os.path.join(self.src, rel)}" for rel in sorted(self.files)),
        ])
        done = await threads.deferToThread(self.sr3.run, "foreground", config)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        await self.until_files(self.files, "sr3's files")
        await until(lambda: consumer.stats["delivered"] == 3, what="3 reports")
        self.assertEqual(consumer.stats["invalid"], 0)

    async def test_ion_poll_to_sr3_subscribe(self):
        """Files an ION poll announces over MQTT are downloaded by an sr3 subscribe, byte for
        byte."""
        config = self.sr3.configure("subscribe", self.tag, [
            f"queueName q_anonymous.subscribe.{self.tag}", f"exchange {self.exchange}",
            "topicPrefix v03", "subtopic #", "logLevel info", f"directory {self.dest}",
            "mirror on", "accept .*",
        ])
        self.sr3.foreground(config)
        probe = os.path.join(self.src, "probe")
        with open(probe, "w") as f:
            f.write("0")
        c = await make_container(self)
        await c.spawn("ion.apps.pump.transfer_service", args={})
        await c.spawn(PollService, args={
            "name": self.tag, "url": "file://" + self.src + "/", "broker": self.mosquitto.url,
            "exchange": self.exchange, "interval": 0.2, "state_dir": self.state})
        # The poll announces before sr3 may have subscribed: the probe is rewritten (and
        # announced again) until it arrives, then the files are announced again too.
        for attempt in range(1, 30):
            try:
                await until(lambda: self.tree(self.dest).get("probe") == str(attempt - 1).encode(),
                            timeout=2)
                break
            except AssertionError:
                with open(probe, "w") as f:
                    f.write(str(attempt))
        else:
            raise AssertionError(f"the probe never arrived\n{self.sr3.output()}")
        wanted = dict(self.files, probe=self.tree(self.dest)["probe"])
        for rel in self.files:
            os.utime(os.path.join(self.src, rel))
        await self.until_files(wanted, "the poll's files")
