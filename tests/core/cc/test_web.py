"""The web console (ion.core.cc.web): its JSON API and /metrics against a running pump on both
transports, its pages, the observer's charts, the token off loopback, and the port at boot."""

import os
import socket

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import threads
from twisted.trial import unittest

from tests.broker import get_broker
from tests.core.cc.console import RunningPump, drop_queues, get, get_json
from tests.core.cc.test_tap import OptionParsing, twistd


def samples(text, name):
    """{labels minus container: value} of the samples of C{name} in a /metrics page."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                labels = dict(sample.labels)
                labels.pop("container")
                found[tuple(sorted(labels.items()))] = sample.value
    return found


def restarts(text, process):
    (value,) = [v for labels, v in samples(text, "ion_restarts_total").items()
                if ("process", process) in labels]
    return value


class ConsoleApi:
    """The API and /metrics of a pump that delivered files; C{url()} is the broker."""

    async def start(self, **kw):
        return await RunningPump().start(self, url=self.url(), **kw)

    async def test_status_and_pump(self):
        """/api/status shows the container, the supervision tree and the consumer's row with
        the files delivered; /api/pump the rates over time, the reports by code; after more
        files the counts grow."""
        pump = await self.start()
        await pump.deliver("a.txt", "b.txt")
        status = await get_json(pump.url + "/api/status")
        self.assertEqual(status["container"]["id"], pump.c.id)
        self.assertIn(pump.c.id, [p["container"] for p in status["containers"]])
        names = [p["name"] for p in status["processes"]]
        self.assertIn("pump.consumer.sub", names)
        self.assertEqual(status["processes"][names.index("pump.consumer.sub")]["depth"], 1)
        (consumer,) = [w for w in status["workers"] if w["kind"] == "Consumer"]
        self.assertEqual((consumer["delivered"], consumer["failed"], consumer["queued"]),
                         (2, 0, 0))
        self.assertEqual(consumer["state"], "ACTIVE")
        self.assertGreater(consumer["files_per_s"], 0)
        self.assertEqual(await get_json(pump.url + "/api/processes"), status["processes"])
        await pump.deliver("c.txt")
        page = await get_json(pump.url + "/api/pump")
        (consumer,) = [w for w in page["workers"] if w["kind"] == "Consumer"]
        self.assertEqual(consumer["delivered"], 3)
        self.assertTrue(page["history"])
        self.assertGreater(max(point[1] for point in page["history"]), 0)
        self.assertEqual(page["reports"], {"201": 3})
        self.assertEqual((page["failures"], page["retrying"]), ([], 0))

    async def test_metrics(self):
        """/metrics, read with prometheus-client's parser: files and bytes delivered by
        subscription, messages published and consumed, rpc latencies, transfer durations,
        queue depth, retry queue size, conversations open and restarts."""
        pump = await self.start()
        await pump.deliver("a.txt", "b.txt")
        code, body, kind = await get(pump.url + "/metrics")
        self.assertEqual(code, 200)
        self.assertTrue(kind.startswith("text/plain"))
        text = body.decode()
        labels = (("process", "pump.consumer.sub"), ("subscription", "sub"))
        self.assertEqual(samples(text, "ion_files_delivered_total"), {labels: 2})
        size = len(b"data of a.txt") * 2
        self.assertEqual(samples(text, "ion_bytes_delivered_total"), {labels: size})
        self.assertEqual(samples(text, "ion_transfer_duration_seconds_count"), {labels: 2})
        self.assertEqual(samples(text, "ion_queue_depth")[labels], 0)
        self.assertEqual(samples(text, "ion_retry_queue_size")[labels], 0)
        self.assertGreater(samples(text, "ion_messages_published_total")[
            (("process", "pump.poll.src"),)], 0)
        self.assertGreater(samples(text, "ion_messages_consumed_total")[
            (("process", "pump.consumer.sub"),)], 0)
        self.assertGreater(samples(text, "ion_rpc_latency_seconds_count")[(("op", "stats"),)], 0)
        self.assertIn((("process", "pump.consumer.sub"),),
                      samples(text, "ion_conversations_open"))
        self.assertEqual(restarts(text, "pump.consumer.sub"), 0)


class MemoryConsoleTests(ConsoleApi, unittest.TestCase):
    def url(self):
        return "memory://"

    async def test_failures_and_restarts(self):
        """A file the consumer gives up on is among the last failures with its code and
        reason, counted by code in /metrics; a crashed consumer's restart shows in the tree
        and in /metrics."""
        pump = await self.start()
        await pump.deliver("a.txt")
        consumer = pump.consumer()

        async def refuse(url, path, options):
            from ion.apps.pump.transfer import TransferError

            raise TransferError("no such file at the source", code=404)

        consumer._get = refuse
        with open(os.path.join(pump.src, "gone.txt"), "w") as f:
            f.write("x")
        await pump.sampled(lambda row: row["failed"] == 1)
        page = await get_json(pump.url + "/api/pump")
        (failure,) = page["failures"]
        self.assertEqual((failure["code"], failure["file"]), (404, "gone.txt"))
        self.assertIn("no such file", failure["reason"])
        (row,) = [w for w in page["workers"] if w["kind"] == "Consumer"]
        self.assertEqual(row["last_error"]["code"], 404)
        _, body, _ = await get(pump.url + "/metrics")
        self.assertEqual(samples(body.decode(), "ion_files_failed_total"), {
            (("code", "404"), ("process", "pump.consumer.sub"), ("subscription", "sub")): 1})
        await consumer.crash(RuntimeError("a test crash"))
        self.flushLoggedErrors(RuntimeError)
        await pump.sampled(lambda row: row["restarts"] == 1)
        status = await get_json(pump.url + "/api/status")
        (tree_row,) = [p for p in status["processes"] if p["name"] == "pump.consumer.sub"]
        self.assertEqual(tree_row["restarts"], 1)
        _, body, _ = await get(pump.url + "/metrics")
        self.assertEqual(restarts(body.decode(), "pump.consumer.sub"), 1)

    async def test_conversations_and_chart(self):
        """/api/conversations lists this container's recent conversations and those the
        observer kept; the chart of one is the observer's SVG; an unknown or malformed id is
        404."""
        pump = await self.start(apps=["observer"])
        await pump.deliver("a.txt")
        page = await get_json(pump.url + "/api/conversations")
        self.assertIn("stats", [c["op"] for c in page["recent"]])
        stats = [c for c in page["observed"] if c["op"] == "stats"]
        self.assertTrue(stats)
        code, body, kind = await get(
            f"{pump.url}/api/conversations/{stats[0]['conv_id']}/msc.svg")
        self.assertEqual((code, kind), (200, "image/svg+xml"))
        self.assertIn(b"<svg", body[:200])
        self.assertIn(b"stats", body)
        for bad in ("0123abcd", "..%2f..%2fetc", "<script>"):
            code, _, _ = await get(f"{pump.url}/api/conversations/{bad}/msc.svg")
            self.assertEqual(code, 404, bad)

    async def test_pages(self):
        """The pages are HTML that load the console's own script (nothing from elsewhere);
        an unknown path is 404."""
        pump = await self.start()
        for path in ("/", "/pump", "/conversations"):
            code, body, kind = await get(pump.url + path)
            self.assertEqual((code, kind), (200, "text/html; charset=utf-8"), path)
            self.assertIn(b'<script src="/console.js">', body)
            self.assertNotIn(b"http", body.replace(b"http://www.w3.org", b""))
        code, body, _ = await get(pump.url + "/console.js")
        self.assertEqual(code, 200)
        self.assertIn(b"setInterval(refresh, 2000)", body)
        self.assertEqual((await get(pump.url + "/nosuch"))[0], 404)
        self.assertEqual((await get(pump.url + "/api/nosuch"))[0], 404)
        page = await get_json(pump.url + "/api/conversations")
        self.assertIsNone(page["observed"])  # no observer app: the page says how to start one


class AmqpConsoleTests(ConsoleApi, unittest.TestCase):
    def url(self):
        return get_broker().url

    async def start(self, **kw):
        tag = f"{os.getpid()}-amqp-{self.id().rsplit('.', 1)[-1]}"
        await drop_queues(self, get_broker(), tag)
        return await RunningPump().start(self, url=self.url(), tag=tag, **kw)


class TokenTests(unittest.TestCase):
    async def test_token_off_loopback(self):
        """Bound to all addresses, the console answers only requests with the token, as
        ?token= or Authorization: Bearer; a wrong or missing one is 401 with nothing else."""
        pump = await RunningPump().start(self, host="0.0.0.0", token="s3cret-t0ken")
        for path in ("/", "/api/status", "/metrics", "/console.js"):
            code, body, _ = await get(pump.url + path)
            self.assertEqual(code, 401, path)
            self.assertNotIn(b"ion_", body)
            self.assertEqual((await get(pump.url + path, token="wrong"))[0], 401)
        self.assertEqual((await get(pump.url + "/api/status", token="s3cret-t0ken"))[0], 200)
        self.assertEqual(
            (await get(pump.url + "/metrics", token="s3cret-t0ken", header=True))[0], 200)

    async def test_loopback_host_names_only(self):
        """On loopback without a token, a request for another host name (a page that
        rebound its own name to 127.0.0.1) is refused."""
        pump = await RunningPump().start(self)
        self.assertEqual((await get(pump.url + "/api/status"))[0], 200)
        headers = {"host": f"evil.example:{pump.console.port}"}
        self.assertEqual((await get(pump.url + "/api/status", headers=headers))[0], 401)


def write_private(path, text):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)
    return path


class WebOptionTests(OptionParsing, unittest.SynchronousTestCase):
    def test_default_off_and_pump_on(self):
        """No console by default; res/apps/pump.app turns it on at 127.0.0.1:8580, as a
        default (a port taken is no error); --web is explicit."""
        self.assertIsNone(self.parse()["web_console"])
        self.assertEqual(self.parse("pump")["web_console"], ("127.0.0.1", 8580, None, False))
        self.assertEqual(self.parse("--web", "9000", "pump")["web_console"],
                         ("127.0.0.1", 9000, None, True))
        self.assertEqual(self.parse("-D", "ion.core.cc:web=None", "pump")["web_console"], None)
        self.assertEqual(self.parse("-D", "ion.core.cc:web='[::1]:81'")["web_console"],
                         ("::1", 81, None, True))

    def test_bad_address(self):
        self.assertIn("[ADDRESS:]PORT", self.bad("--web", "localhost:http"))
        self.assertIn("[ADDRESS:]PORT", self.bad("--web", "70000"))

    def test_token_needed_off_loopback(self):
        """Off loopback the console needs a token from the credentials file: without one,
        one line naming the line to add, exit 2; with it, the token is the password of
        http://console@ADDRESS:PORT/."""
        path = write_private(os.path.abspath(self.mktemp()), "")
        line = self.bad("--credentials", path, "--web", "0.0.0.0:8600")
        self.assertIn("http://console@0.0.0.0:8600/", line)
        self.assertIn("console:TOKEN", line)
        write_private(path, "http://console:t0k%40en@0.0.0.0:8600/\n")
        opts = self.parse("--credentials", path, "--web", "0.0.0.0:8600")
        self.assertEqual(opts["web_console"], ("0.0.0.0", 8600, "t0k@en", True))


class PortTakenTests(unittest.TestCase):
    def setUp(self):
        self.taken = socket.socket()
        self.taken.bind(("127.0.0.1", 0))
        self.taken.listen()
        self.addCleanup(self.taken.close)
        self.port = self.taken.getsockname()[1]

    async def test_explicit_port_taken(self):
        """--web with a port that is taken: one line (twistd -n logs stderr), exit 2, nothing
        started."""
        result = await threads.deferToThread(twistd, "--web", str(self.port), "--no-shell")
        self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
        output = result.stdout + result.stderr
        lines = [line for line in output.splitlines() if "cannot listen" in line]
        self.assertEqual(len(lines), 1, output)
        self.assertIn(f"web console: cannot listen on 127.0.0.1:{self.port}", lines[0])
        self.assertNotIn("Traceback", output)
        self.assertNotIn("running apps", output)

    async def test_default_port_taken(self):
        """An app's default console port taken: one warning line, and the container runs."""
        from tests.core.cc.running import run_for

        app = os.path.abspath(self.mktemp()) + ".app"
        with open(app, "w") as f:
            f.write(repr({"type": "application", "name": "webdefault", "version": "1",
                          "description": "a console by default", "mod": ("ion.apps.hello.app",),
                          "applications": ["ioncore"], "registered": [],
                          "config": {"ion.core.cc": {"web": f"127.0.0.1:{self.port}"}}}))
        out = await threads.deferToThread(run_for, 1, app, until="running apps")
        warned = [line for line in out.splitlines() if "web console" in line]
        self.assertEqual(len(warned), 1, out)
        self.assertIn("running without it", warned[0])
        self.assertIn("running apps", out)
