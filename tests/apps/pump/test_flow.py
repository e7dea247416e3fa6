"""Flows on a broker of their own: a container on memory:// subscribing to a remote pump with a
read-only sr3 account (AMQP), and polls and subscriptions over MQTT v5 (Mosquitto)."""

import datetime
import itertools
import json
import os

from twisted.internet import reactor, threads
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from ion.apps.pump.consumer import Consumer
from ion.apps.pump.ingest import Ingest
from ion.apps.pump.poll import PollService
from ion.apps.pump.sender import Sender
from ion.apps.pump.watch import Watch
from ion.core.cc.container import make_transport
from ion.core.cc.testing import make_container
from ion.core.messaging.mqtt import MqttTransport
from ion.core.messaging.transport import ConnectionLost, Properties
from tests.apps.pump.fixtures import delete_queues, encode, file_url, notice_fields, topic, until
from tests.apps.pump.fixtures import quiet, write_source
from tests.broker import BrokerError, get_broker, skip_or_fail_without_rabbitmq
from tests.mosquitto import get_mosquitto

_names = itertools.count(1)


class FlowScenario:
    def setUp(self):
        self.tag = f"f{os.getpid()}x{next(_names)}"
        self.root = os.path.abspath(self.mktemp())
        self.source = os.path.join(self.root, "source")
        self.files = {}

    def write(self, n, start=0):
        for i in range(start, start + n):
            rel = f"d{i % 3}/f{i}.dat"
            self.files[rel] = f"file {i} {self.tag}".encode()
            write_source(self.source, rel, self.files[rel])

    def delivered(self, directory):
        found = {}
        for rel in self.files:
            path = os.path.join(directory, rel)
            if os.path.exists(path):
                with open(path, "rb") as f:
                    found[rel] = f.read()
        return found

    def tree(self, directory):
        """{relPath: bytes} of the files below C{directory}; a file renamed or removed while
        the tree is read (a temporary name going into place) is left out."""
        found = {}
        for top, dirs, names in os.walk(directory):
            for name in names:
                path = os.path.join(top, name)
                try:
                    with open(path, "rb") as f:
                        found[os.path.relpath(path, directory)] = f.read()
                except FileNotFoundError:
                    continue
        return found

    async def sender(self, container, broker, **args):
        args = dict(
            {"name": self.tag, "broker": broker, "retry_initial": 0.1,
             "destination": "file:" + os.path.join(self.root, "sent") + "/",
             "state_dir": os.path.join(self.root, "state", "sender"),
             "sources": [file_url(self.source)]},
            **args,
        )
        return await container.spawn(Sender, name=f"sender.{self.tag}", args=args)

    async def watch(self, container, broker, **args):
        os.makedirs(self.source, exist_ok=True)
        args = dict(
            {"name": self.tag, "broker": broker, "path": self.source, "coalesce": 0.1,
             "state_dir": os.path.join(self.root, "state", "watch")},
            **args,
        )
        return await container.spawn(Watch, name=f"watch.{self.tag}", args=args)

    async def consumer(self, container, broker, name=None, **args):
        name = name or self.tag
        args = dict(
            {"name": self.tag, "broker": broker, "directory": os.path.join(self.root, name),
             "state_dir": os.path.join(self.root, "state", name), "retry_initial": 0.1,
             "sources": [file_url(self.source)]},
            **args,
        )
        return await container.spawn(Consumer, name=f"consumer.{name}", args=args)


class RemoteAmqpPumpTests(FlowScenario, unittest.TestCase):
    """A container on memory:// subscribes to a pump on RabbitMQ as its user C{anonymous}."""

    timeout = 120

    async def setUp(self):
        skip_or_fail_without_rabbitmq()
        FlowScenario.setUp(self)
        self.broker = await threads.deferToThread(get_broker)
        self.url = self.broker.url_for("anonymous")
        # The remote pump's own side, as its feeder declares it.
        self.pump = make_transport(self.broker.url, reactor)
        await self.pump.connect()
        self.addCleanup(self.pump.close)
        await self.pump.declare_exchange("xpublic", "topic", durable=True)
        await self.pump.declare_exchange("xs_anonymous", "topic", durable=True)
        self.reports = f"pump_reports.{self.tag}"
        await self.pump.declare_queue(self.reports, durable=True)
        await self.pump.bind(self.reports, "xs_anonymous", "#")
        self.got_reports = []
        await self.pump.consume(self.reports, self._report)
        queue = f"q_anonymous.consumer.{self.tag}"
        self.addCleanup(delete_queues, self.broker.url, [self.reports, queue, queue + ".dead"])
        self.container = await make_container(self)

    def _report(self, delivery):
        self.got_reports.append(json.loads(delivery.body))
        delivery.ack()

    async def announce(self, rels):
        for rel in rels:
            fields = notice_fields(file_url(self.source), rel, self.files[rel])
            await self.pump.publish("xpublic", topic(rel), encode(fields),
                                    Properties(content_type="application/json", delivery_mode=2),
                                    mandatory=False)

    def refusals(self, since):
        """The node's log lines saying it refused anonymous something, stamped C{since} (a
        UTC datetime) or later. Chosen by their stamps: the node writes its log up to a few
        seconds late, so an earlier test's refusals may reach the files during this one. A
        line with no stamp is kept."""
        text = ""
        for name in os.listdir(self.broker.log_dir):
            path = os.path.join(self.broker.log_dir, name)
            if os.path.isfile(path):
                with open(path, errors="replace") as f:
                    text += f.read()
        found = []
        for line in text.splitlines():
            if "access_refused" not in line.lower() or "anonymous" not in line:
                continue
            try:
                stamp = datetime.datetime.fromisoformat(line[:32])
            except ValueError:
                stamp = None
            if stamp is None or stamp.tzinfo is None or stamp >= since:
                found.append(line)
        return found

    async def test_subscribe_to_a_public_pump(self):
        """Files announced on the remote xpublic are delivered; the account's permissions are
        never refused; reports go to xs_anonymous; a restart of the remote node loses
        nothing."""
        since = datetime.datetime.now(datetime.timezone.utc)
        self.write(40)
        proc = await self.consumer(self.container, self.url)
        self.assertEqual(proc.queue, f"q_anonymous.consumer.{self.tag}")
        rels = sorted(self.files)
        await self.announce(rels[:20])
        directory = os.path.join(self.root, self.tag)
        await until(lambda: len(self.delivered(directory)) == 20, timeout=20, what="20 files")
        await threads.deferToThread(self.broker.restart)
        await until(lambda: self.pump._session is not None, timeout=30, what="the pump back")
        await self.announce(rels[20:])
        await until(lambda: self.delivered(directory) == self.files, timeout=40,
                    what=lambda _: f"40 files, got {len(self.delivered(directory))}")
        await until(lambda: {r["relPath"] for r in self.got_reports} >= set(rels), timeout=30,
                    what="a report for every file")
        self.assertEqual({r["report"]["code"] for r in self.got_reports}, {201})
        # A report on its way when the node went down fails its message, which comes back
        # (Process.subscribe's failure policy logs it).
        self.flushLoggedErrors(ConnectionLost)
        self.assertEqual(self.refusals(since), [])
        self.assertFalse(os.path.exists(os.path.join(self.root, "state", self.tag,
                                                     "reports.jsonl")))

    async def test_reports_kept_locally(self):
        """Reports to an exchange the account may not write are kept in the local report log,
        with one warning."""
        self.write(3)
        await self.consumer(self.container, self.url, report_exchange="xreport")
        warnings = []
        globalLogPublisher.addObserver(warnings.append)
        self.addCleanup(globalLogPublisher.removeObserver, warnings.append)
        await self.announce(sorted(self.files))
        log = os.path.join(self.root, "state", self.tag, "reports.jsonl")

        def kept():
            if not os.path.exists(log):
                return 0
            with open(log) as f:
                return len(f.readlines())

        await until(lambda: kept() == 3, timeout=20, what="3 reports kept")
        said = [e for e in warnings if "reports cannot go to" in e.get("log_format", "")]
        self.assertEqual(len(said), 1)
        self.assertEqual(len(self.delivered(os.path.join(self.root, self.tag))), 3)


    async def test_sender_from_a_public_pump(self):
        """A sender takes the notices of the remote xpublic through its own queue there and
        sends the files to its destination; its reports go to xs_anonymous."""
        since = datetime.datetime.now(datetime.timezone.utc)
        self.write(6)
        proc = await self.sender(self.container, self.url)
        self.assertEqual(proc.queue, f"q_anonymous.sender.{self.tag}")
        self.addCleanup(delete_queues, self.broker.url, [proc.queue, proc.queue + ".dead"])
        await self.announce(sorted(self.files))
        sent = os.path.join(self.root, "sent")
        await until(lambda: self.tree(sent) == self.files, timeout=20,
                    what=lambda _: f"6 files sent, got {sorted(self.tree(sent))}")
        await until(lambda: len(self.got_reports) == 6, timeout=20, what="6 reports")
        self.assertEqual({r["report"]["code"] for r in self.got_reports}, {201})
        self.assertEqual(self.refusals(since), [])

    async def test_watch_to_a_remote_pump(self):
        """A watch announces to the remote pump's xs_anonymous, declaring nothing there."""
        since = datetime.datetime.now(datetime.timezone.utc)
        await self.watch(self.container, self.url)
        self.write(4)
        # got_reports reads xs_anonymous: here it holds the watch's notices (the directories
        # made come as fileOp notices).
        def files():
            return {n["relPath"]: n for n in self.got_reports if "fileOp" not in n}

        await until(lambda: set(files()) == set(self.files), timeout=20,
                    what=lambda _: f"4 file notices, got {sorted(files())}")
        self.assertEqual({n["size"] for n in files().values()},
                         {len(data) for data in self.files.values()})
        self.assertEqual({n["baseUrl"] for n in self.got_reports}, {file_url(self.source)[:-1]})
        self.assertEqual(self.refusals(since), [])

    async def test_ingest_feeds_a_remote_pump(self):
        """An ingest given the remote pump's broker (its feeder's login) takes what anonymous
        and rita post to their xs_ exchanges there and publishes it to that pump's xpublic,
        stamped with the poster whatever the body says; a notice claiming another user_id is
        refused by RabbitMQ, one without user_id by the ingest; an invalid one is reported
        (417) on that pump's xreport; nothing goes to the container's own broker."""
        queues = [f"q_guest.ingest.xs_{user}" for user in ("anonymous", "rita")]
        await delete_queues(self.broker.url, queues)  # an earlier run's
        self.addCleanup(delete_queues, self.broker.url, queues + [q + ".dead" for q in queues])
        got = {}
        await self.pump.declare_exchange("xreport", "topic", durable=True)
        for exchange in ("xpublic", "xreport"):
            queue = f"pump_{exchange}.{self.tag}"
            self.addCleanup(delete_queues, self.broker.url, [queue])
            await self.pump.declare_queue(queue, durable=True)
            await self.pump.bind(queue, exchange, f"v03.{self.tag}.#")
            got[exchange] = []

            def take(delivery, into=got[exchange]):
                into.append(json.loads(delivery.body))
                delivery.ack()

            await self.pump.consume(queue, take)
        ingest = await self.container.spawn(
            Ingest, args={"broker": self.broker.url, "users": ["anonymous", "rita"]}
        )
        self.assertEqual((ingest.user, ingest.broker.user), ("guest", "guest"))
        posters = {}
        for user in ("anonymous", "rita"):
            posters[user] = make_transport(self.broker.url_for(user), reactor)
            await posters[user].connect()
            self.addCleanup(posters[user].close)

        def notice(name, **fields):
            return notice_fields("file:///x/", f"{self.tag}/{name}", b"d", **fields)

        async def post(user, fields):
            await posters[user].publish(f"xs_{user}", topic(fields["relPath"]), encode(fields),
                                        Properties(), mandatory=False)

        await post("anonymous", notice("a", source="rita"))
        await post("rita", notice("b", source="anonymous"))
        key, body = f"v03.{self.tag}", encode(notice("c"))
        with self.assertRaises(BrokerError) as caught:
            await threads.deferToThread(
                self.broker.publish_raw, "anonymous", "xs_anonymous", key, body, user_id="rita"
            )
        self.assertIn("PRECONDITION_FAILED", str(caught.exception))
        await threads.deferToThread(self.broker.publish_raw, "anonymous", "xs_anonymous", key,
                                    body)
        # JSON (the setUp's reader of xs_anonymous decodes it), but no notice.
        await posters["anonymous"].publish("xs_anonymous", key, b'{"relPath": 5}', Properties())
        await until(lambda: len(got["xpublic"]) == 2 and got["xreport"]
                    and ingest.stats["refused"] == 1, timeout=20,
                    what=lambda _: f"2 notices, 1 report, 1 refused: {got}, {ingest.stats}")
        await quiet()
        self.assertEqual(sorted((n["relPath"], n["source"]) for n in got["xpublic"]),
                         [(f"{self.tag}/a", "anonymous"), (f"{self.tag}/b", "rita")])
        (report,) = got["xreport"]
        self.assertEqual((report["source"], report["report"]["code"]), ("anonymous", 417))
        self.assertEqual(ingest.stats["by_source"], {"anonymous": 1, "rita": 1})
        local = set(self.container.transport.broker.exchanges())
        self.assertEqual(local & {"xpublic", "xreport", "xs_anonymous", "xr_anonymous"}, set())


class MqttFlowTests(FlowScenario, unittest.TestCase):
    """Polls and subscriptions over a private Mosquitto."""

    timeout = 60

    def setUp(self):
        self.mosquitto = get_mosquitto()
        FlowScenario.setUp(self)

    async def poll(self, container):
        await container.spawn("ion.apps.pump.transfer_service", args={})
        args = {"name": self.tag, "url": file_url(self.source), "broker": self.mosquitto.url,
                "interval": 0.2, "state_dir": os.path.join(self.root, "state", "poll")}
        return await container.spawn(PollService, name=f"poll.{self.tag}", args=args)

    async def test_poll_to_consumer(self):
        """poll -> MQTT -> consumer: every file arrives, byte for byte."""
        container = await make_container(self)
        self.write(30)
        await self.consumer(container, self.mosquitto.url, exchange="xs_anonymous")
        await self.poll(container)
        directory = os.path.join(self.root, self.tag)
        await until(lambda: self.delivered(directory) == self.files, timeout=20,
                    what=lambda _: f"30 files, got {len(self.delivered(directory))}")

    async def test_shared_subscription(self):
        """Two instances of one subscription (one queue, two state directories) split the
        work: 200 files, each delivered once and reported once, both instances busy. They
        report to the exchange they read (xs_anonymous): the reports come back to them and
        are not taken for announcements."""
        container = await make_container(self)
        reports = []
        watcher = MqttTransport(self.mosquitto.url, reactor, session=f"reports_{self.tag}")
        self.addCleanup(watcher.close)
        await watcher.connect()
        await watcher.bind(f"reports_{self.tag}", "xs_anonymous", "v03.#")

        def report(delivery):
            fields = json.loads(delivery.body)
            if "report" in fields:
                reports.append((fields["relPath"], fields["report"]["code"]))
            delivery.ack()

        await watcher.consume(f"reports_{self.tag}", report)
        self.write(200)
        queue = f"q_anonymous.consumer.{self.tag}"
        a = await self.consumer(container, self.mosquitto.url, name="a", queue=queue,
                                exchange="xs_anonymous")
        b = await self.consumer(container, self.mosquitto.url, name="b", queue=queue,
                                exchange="xs_anonymous")
        poll = await self.poll(container)

        def both():
            found = self.delivered(os.path.join(self.root, "a"))
            found.update(self.delivered(os.path.join(self.root, "b")))
            return found

        await until(lambda: both() == self.files, timeout=40, what="200 files")
        await until(lambda: len(reports) >= 200, timeout=20,
                    what=lambda _: f"200 reports, got {len(reports)}")
        # Every report back at the instances: nothing more can be on its way.
        await until(lambda: a.stats["reports"] + b.stats["reports"] == len(reports),
                    timeout=20, what="the reports back at the instances")
        self.assertEqual(poll.stats["announced"], 200)
        self.assertEqual(a.stats["delivered"] + b.stats["delivered"], 200)
        self.assertEqual(sorted(reports), sorted((rel, 201) for rel in self.files))
        self.assertGreater(a.stats["delivered"], 0)
        self.assertGreater(b.stats["delivered"], 0)

    async def test_watch_to_consumer(self):
        """watch -> MQTT -> consumer: every file written arrives, byte for byte."""
        container = await make_container(self)
        await self.consumer(container, self.mosquitto.url, exchange="xs_anonymous")
        await self.watch(container, self.mosquitto.url)
        self.write(12)
        directory = os.path.join(self.root, self.tag)
        await until(lambda: self.delivered(directory) == self.files, timeout=20,
                    what=lambda _: f"12 files, got {len(self.delivered(directory))}")

    async def test_poll_to_sender(self):
        """poll -> MQTT -> sender: every file is sent to the destination, byte for byte."""
        container = await make_container(self)
        self.write(12)
        await self.sender(container, self.mosquitto.url, exchange="xs_anonymous")
        await self.poll(container)
        sent = os.path.join(self.root, "sent")
        await until(lambda: self.tree(sent) == self.files, timeout=20,
                    what=lambda _: f"12 files sent, got {len(self.tree(sent))}")


class BrokerArgTests(unittest.SynchronousTestCase):
    def test_bad_broker_url(self):
        """A broker that is not amqp[s]:// or mqtt[s]:// is one line that never quotes the
        URL (it may hold a password); the queue is a name."""
        from ion.apps.pump.args import BadArgument, ConsumerArgs, PollArgs, SenderArgs, WatchArgs

        for cls, extra in ((ConsumerArgs, {"directory": "/x"}), (PollArgs, {"url": "file:/x"}),
                           (SenderArgs, {"destination": "file:/x/"}), (WatchArgs, {"path": "/x"})):
            with self.assertRaises(BadArgument) as caught:
                cls.parse(dict(name="t", broker="ftp://u:s3cret@h/", **extra))
            self.assertNotIn("s3cret", str(caught.exception))
            self.assertIn("broker must be an amqp[s]:// or mqtt[s]:// URL", str(caught.exception))
        with self.assertRaises(BadArgument):
            ConsumerArgs.parse({"name": "t", "directory": "/x", "queue": "a/b"})
        args = ConsumerArgs.parse({"name": "t", "directory": "/x", "broker": "mqtt://h/"})
        self.assertIsNone(args.report_exchange)  # xs_<login> on that broker

    def test_ingest_takes_no_mqtt_broker(self):
        """An ingest given an MQTT broker is refused with one line saying why and what to use
        instead, never quoting the URL; another URL that is not amqp[s]:// is refused too; an
        amqp[s]:// one is taken."""
        from ion.apps.pump.args import BadArgument, IngestArgs

        for url in ("mqtt://u:s3cret@h/", "MQTTS://u:s3cret@h/"):
            with self.assertRaises(BadArgument) as caught:
                IngestArgs.parse({"broker": url})
            message = str(caught.exception)
            self.assertTrue(message.startswith("ingest: broker must be amqp[s]://, not MQTT"))
            self.assertIn("give a subscription the MQTT broker", message)
            self.assertNotIn("s3cret", message)
            self.assertNotIn("\n", message)
        with self.assertRaises(BadArgument) as caught:
            IngestArgs.parse({"broker": "ftp://u:s3cret@h/"})
        self.assertEqual(str(caught.exception), "ingest: broker must be an amqp[s]:// URL")
        for url in ("amqp://u@h/", "amqps://u@h/v"):
            self.assertEqual(IngestArgs.parse({"broker": url}).broker, url)
