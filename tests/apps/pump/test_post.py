"""`ion post`: files announced once from the command line, and its exit statuses."""

import base64
import hashlib
import json
import os
import subprocess
import sys

from twisted.internet import reactor, threads
from twisted.trial import unittest

from ion.apps.pump.post import Unpostable, files_to_post
from ion.apps.pump.transfer.blocks import sr3_block
from ion.core.cc.testing import make_container
from tests.apps.pump.fixtures import Collector
from ion.core.messaging.mqtt import MqttTransport
from tests.broker import get_broker, skip_or_fail_without_rabbitmq
from tests.mosquitto import get_mosquitto
from tests.waiting import quiet, until

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def post(cwd, *args):
    """Run `ion post ARGS` in C{cwd}: the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", "ion", "post", *args], cwd=cwd, capture_output=True, text=True,
        env=dict(os.environ, PYTHONPATH=ROOT, HOME=cwd), timeout=60,
    )


class FilesTests(unittest.SynchronousTestCase):
    def test_files_below(self):
        """A directory gives every regular file below it (links not followed), relPaths
        relative to the current directory; a path outside it or missing is refused."""
        base = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(base, "d", "e"))
        for rel in ("d/a", "d/e/b", "c"):
            with open(os.path.join(base, rel), "w") as f:
                f.write(rel)
        os.symlink("a", os.path.join(base, "d", "ln"))
        got = files_to_post([os.path.join(base, "d"), os.path.join(base, "c")], base)
        self.assertEqual([rel for _, rel in got], ["d/a", "d/e/b", "c"])
        for bad in (os.path.dirname(base), os.path.join(base, "missing")):
            self.assertRaises(Unpostable, files_to_post, [bad], base)


class PostTests(unittest.TestCase):
    timeout = 120

    async def setUp(self):
        skip_or_fail_without_rabbitmq()
        self.broker = get_broker()
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.dir, "data", "sub"))
        for rel, data in (("data/one", b"1"), ("data/sub/two", b"22")):
            with open(os.path.join(self.dir, rel), "wb") as f:
                f.write(data)

    async def test_announces_with_confirms(self):
        """Every file below the directory is announced once, with sha512 identity, size, mtime
        and mode, on sr3's topic; the command prints how many and exits 0."""
        exchange = f"xs_post{os.getpid()}"
        c = await make_container(self, url=self.broker.url)
        collector = await c.spawn(Collector)
        await collector.listen(exchange)
        result = await threads.deferToThread(
            post, self.dir, "--broker", self.broker.url, "--exchange", exchange,
            "--base-url", "http://files.example/", "data",
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.strip(), f"announced 2 files to {exchange}")
        await until(lambda: len(collector.got) == 2)
        await quiet(0.2)
        got = {body["relPath"]: (key, body) for _, key, body in collector.got}
        self.assertEqual(sorted(got), ["data/one", "data/sub/two"])
        key, body = got["data/sub/two"]
        self.assertEqual(key, "v03.data.sub")
        digest = base64.b64encode(hashlib.sha512(b"22").digest()).decode()
        self.assertEqual(body["identity"], {"method": "sha512", "value": digest})
        self.assertEqual((body["size"], body["baseUrl"]), (2, "http://files.example/"))
        self.assertIn("mtime", body)
        self.assertIn("mode", body)

    async def test_block_size(self):
        """With --block-size, a file bigger than that is announced as one notice per block,
        as sr3 writes them (each with its block's sha512, read by the accept side as its
        block); a smaller file whole. A block size under 64 KiB is refused (exit 2)."""
        exchange = f"xs_postb{os.getpid()}"
        data = os.urandom(3 * 65536 + 5)
        with open(os.path.join(self.dir, "data", "big"), "wb") as f:
            f.write(data)
        c = await make_container(self, url=self.broker.url)
        collector = await c.spawn(Collector)
        await collector.listen(exchange)
        result = await threads.deferToThread(
            post, self.dir, "--broker", self.broker.url, "--exchange", exchange,
            "--block-size", "65536", "data",
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.strip(), f"announced 3 files to {exchange}")
        await until(lambda: len(collector.got) == 2 + 4)
        await quiet(0.2)
        bodies = [body for _, _, body in collector.got]
        big = sorted((b for b in bodies if b["relPath"] == "data/big"),
                     key=lambda b: b["blocks"]["number"])
        for number, body in enumerate(big):
            part = data[number * 65536:(number + 1) * 65536]
            self.assertEqual(sr3_block(body["blocks"], body["size"]),
                             (len(data), 65536, number, len(part)))
            digest = base64.b64encode(hashlib.sha512(part).digest()).decode()
            self.assertEqual(body["identity"], {"method": "sha512", "value": digest})
        self.assertEqual(len(big), 4)
        self.assertFalse([b for b in bodies if b["relPath"] != "data/big" and "blocks" in b])
        result = await threads.deferToThread(
            post, self.dir, "--broker", self.broker.url, "--block-size", "1000", "data")
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertEqual(result.stderr.strip().splitlines(), [result.stderr.strip()])
        self.assertIn("--block-size must be at least 65536", result.stderr)

    async def test_exit_statuses(self):
        """1: broker unreachable, or a publish the broker refuses (not confirmed); 2: a bad
        argument or a path that cannot be read. One line on stderr each."""
        cases = [
            (("--broker", "amqp://127.0.0.1:1/", "--timeout", "3", "data"), 1),
            (("--broker", self.broker.url_for("rita"), "--exchange", "xs_ross", "data"), 1),
            (("--broker", self.broker.url, "missing"), 2),
            (("--broker", self.broker.url, "/etc/hostname"), 2),
            (("--broker", self.broker.url, "--bogus", "data"), 2),
        ]
        for args, status in cases:
            result = await threads.deferToThread(post, self.dir, *args)
            self.assertEqual(result.returncode, status, (args, result.stderr))
            self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
            self.assertNotIn("Traceback", result.stderr)


class MqttPostTests(unittest.TestCase):
    timeout = 60

    async def test_post_over_mqtt(self):
        """With an mqtt:// broker the files are announced there in sr3's layout (exchange
        xs_anonymous as the first topic level), confirmed; an unreachable one is exit 1."""
        mosquitto = get_mosquitto()
        base = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(base, "data", "sub"))
        with open(os.path.join(base, "data", "sub", "two"), "wb") as f:
            f.write(b"22")
        got = []
        queue = f"q_post{os.getpid()}"
        watcher = MqttTransport(mosquitto.url, reactor, session=queue)
        self.addCleanup(watcher.close)
        await watcher.connect()
        await watcher.bind(queue, "xs_anonymous", "v03.#")

        def take(delivery):
            got.append((delivery.exchange, delivery.routing_key, json.loads(delivery.body)))
            delivery.ack()

        await watcher.consume(queue, take)
        result = await threads.deferToThread(post, base, "--broker", mosquitto.url, "data")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.strip(), "announced 1 files to xs_anonymous")
        await until(lambda: len(got) == 1)
        exchange, key, body = got[0]
        self.assertEqual((exchange, key, body["relPath"], body["size"]),
                         ("xs_anonymous", "v03.data.sub", "data/sub/two", 2))
        result = await threads.deferToThread(
            post, base, "--broker", "mqtt://127.0.0.1:1/", "--timeout", "3", "data")
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
