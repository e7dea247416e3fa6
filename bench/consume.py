"""Consumer benchmark: notices/s through the pump consumer's decoding, filtering and duplicate
suppression, with downloads off (`discard`), against a baseline measured in the same run: a raw
subscriber that only acks.

    venv/bin/python bench/consume.py --transport memory
    venv/bin/python bench/consume.py --transport amqp            # on a private RabbitMQ node
    venv/bin/python bench/consume.py --transport amqp --vs-sr3   # and sr3 on the same notices
    venv/bin/python bench/consume.py --transport amqp --broker amqp://guest:guest@127.0.0.1:5672/
    venv/bin/python bench/consume.py --transport amqp --profile consume.prof   # cProfile the drain
    venv/bin/python bench/consume.py --transport mqtt            # on a private Mosquitto
    venv/bin/python bench/consume.py --transport mqtt --vs-sr3 --broker mqtt://127.0.0.1:1883/

cpu_us and baseline_cpu_us are this process's CPU microseconds per notice over the same drains
(all its threads; the broker's are not counted): a figure that a busy machine skews less than
the rates.

Without --broker the script starts a broker of its own: a private RabbitMQ node for amqp
(tests/broker.py), a private Mosquitto for mqtt (tests/mosquitto.py).

Over MQTT the container runs on memory:// and the consumer is a flow with its own `broker`
(a persistent session, QoS 1, manual acks); the baseline is a raw MQTT subscriber on the same
broker. The broker must queue n messages for an offline session (Mosquitto's
max_queued_messages defaults to 1000; the private one allows 100000). In the same run, unless
--no-amqp, the same ION consumer drains the same notices over AMQP on a private RabbitMQ node,
added to the line as `amqp=... msgs/s`.

The queue is filled first (n v03 notices, one in ten a repeat of an earlier one, one in ten
rejected by the filter), then drained. Prints one result line:

    consume transport=memory n=20000 rate=... msgs/s baseline=... msgs/s cpu_us=...
        baseline_cpu_us=...
    consume transport=mqtt n=20000 rate=... msgs/s baseline=... msgs/s amqp=... msgs/s sr3=...

With --vs-sr3 (amqp or mqtt) an sr3 `subscribe` (the venv of bench/pump.py, `download off`,
the same reject/accept rules, duplicate suppression on, prefetch as given, over MQTT also as
its Receive Maximum) drains the same notices on the same broker from a queue (over MQTT: a
persistent session, `expire 10m`) of its own, declared and filled while it is stopped. Its
rate counts the notices it took between the first look that finds it started and the look
that finds all n taken: on AMQP, looking at the queue's count of ready messages (the last
prefetch window may still be in its hands); on MQTT, which does not tell what waits for a
session, at the metrics file sr3 writes after each pass of its loop (every 0.05 s here,
acks sent). It is added to the line as `sr3=... msgs/s`. sr3 takes at most `batch` notices
per pass of its loop, and a pass lasts at least its `sleep` (0.1 s); --sr3-batch N sets that
batch (default: sr3's own).
"""

import argparse
import base64
import cProfile
import glob
import hashlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from urllib.parse import urlsplit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task, threads  # noqa: E402

from ion.apps.pump.consumer import Consumer  # noqa: E402
from ion.apps.pump.notice import CONTENT_TYPE, format_time  # noqa: E402
from ion.core.cc import heap  # noqa: E402
from ion.core.cc.container import Container, make_transport  # noqa: E402
from ion.core.cc.testing import test_config  # noqa: E402
from ion.core.messaging.transport import Properties, TransportError  # noqa: E402
from ion.core.process import Process  # noqa: E402

EXCHANGE = "bench_xpublic"
# v03 notices say so: sr3 reads a body by its content type.
JSON = Properties(content_type=CONTENT_TYPE)
FILTERS = [("reject", r".*/tmp/.*"), ("reject", r".*\.part"), ("accept", r".*")]


class RawSink(Process):
    """The baseline: acks whatever arrives."""

    def on_init(self):
        self.received = 0

    def take(self, delivery):
        self.received += 1
        delivery.ack()


def _digest(j):
    return base64.b64encode(hashlib.sha512(str(j).encode()).digest()).decode()


def notices(n):
    """(routing key, body) of n notices: every 10th repeats an earlier one, every 10th
    (offset) is under tmp/ and rejected."""
    now = format_time(time.time())
    for i in range(n):
        j = i - 5 if i % 10 == 9 else i
        directory = "tmp" if j % 10 == 4 else f"d{j % 50}"
        rel_path = f"{directory}/f{j:07d}.dat"
        body = {
            "pubTime": now,
            "baseUrl": "http://127.0.0.1:8000/data/",
            "relPath": rel_path,
            "source": "bench",
            "size": 4096,
            "mtime": now,
            "mode": "644",
            "identity": {"method": "sha512", "value": _digest(j)},
        }
        yield f"v03.{directory}", json.dumps(body).encode()


async def fill(publish, n):
    """Publish the n L{notices} with C{publish(routing key, body)}, 500 in flight at most."""
    window = []
    for key, body in notices(n):
        window.append(defer.ensureDeferred(publish(key, body)))
        if len(window) >= 500:
            await defer.gatherResults(window)
            window = []
    await defer.gatherResults(window)


async def wait(reactor, done):
    while not done():
        await task.deferLater(reactor, 0.001, lambda: None)


async def end_mqtt_session(reactor, url, session):
    """End the persistent MQTT C{session} and drop what the broker holds for it."""
    from ion.core.messaging.mqtt import MqttTransport

    ending = MqttTransport(url, reactor, session=session, session_expiry=0)
    await ending.connect()
    await ending.close()


async def run_mqtt(reactor, args):
    """ION over MQTT (a flow with its own broker) and a raw MQTT subscriber; then, unless
    --no-amqp, the same ION drain over AMQP; then, with --vs-sr3, sr3 over MQTT."""
    from ion.core.messaging.mqtt import MqttTransport

    container = Container(test_config(), reactor, make_transport("memory://", reactor),
                          sysname="bench")
    await container.start()
    state = tempfile.mkdtemp(prefix="ion-bench-consume-")
    tag = f"{os.getpid()}"
    publisher = MqttTransport(args.broker, reactor, session=f"bench_pub_{tag}")
    await publisher.connect()

    def publish(key, body):
        return publisher.publish(EXCHANGE, key, body, JSON, mandatory=False)

    try:
        sink = MqttTransport(args.broker, reactor, session=f"bench_sink_{tag}",
                             session_expiry=600)
        await sink.connect()
        await sink.bind(f"q_bench.baseline{tag}", EXCHANGE, "v03.#")
        await sink.close()
        await fill(publish, args.n)
        received = []
        sink = MqttTransport(args.broker, reactor, session=f"bench_sink_{tag}",
                             session_expiry=0, prefetch=args.prefetch)
        start = time.perf_counter()
        await sink.connect()
        await sink.consume("q", lambda d: (received.append(1), d.ack()), args.prefetch)
        await wait(reactor, lambda: len(received) >= args.n)
        baseline = args.n / (time.perf_counter() - start)
        await sink.close()

        consumer_args = {"name": f"bench{tag}", "broker": args.broker, "exchange": EXCHANGE,
                         "topics": ["v03.#"], "filters": FILTERS, "discard": True,
                         "state_dir": state, "prefetch": args.prefetch}
        consumer = await container.spawn(Consumer, args=consumer_args)
        await consumer.terminate()
        await fill(publish, args.n)
        start = time.perf_counter()
        consumer = await container.spawn(Consumer, args=consumer_args)
        await wait(reactor, lambda: consumer.stats["received"] >= args.n)
        rate = args.n / (time.perf_counter() - start)
        session = consumer.broker.session
        await consumer.terminate()
        # Its session would otherwise keep a copy of every notice published for sr3.
        await end_mqtt_session(reactor, args.broker, session)
        line = (f"consume transport=mqtt n={args.n} rate={rate:.0f} msgs/s "
                f"baseline={baseline:.0f} msgs/s")
        if args.amqp_broker:
            amqp = await drain(reactor, args, args.amqp_broker, with_baseline=False)
            line += f" amqp={amqp['rate']:.0f} msgs/s"
        if args.vs_sr3:
            sr3_rate = await run_sr3(reactor, args, args.broker, publish, Sr3Mqtt())
            line += f" sr3={sr3_rate:.0f} msgs/s"
        print(line, flush=True)
    finally:
        await publisher.close()
        await container.stop()
        shutil.rmtree(state, ignore_errors=True)


async def run(reactor, args):
    try:
        if args.transport == "mqtt":
            return await run_mqtt(reactor, args)
        return await run_queued(reactor, args)
    except TransportError as e:
        raise SystemExit(f"consume: {e}") from None


async def run_queued(reactor, args):
    """memory:// or amqp: the consumer, the baseline and with --vs-sr3 sr3."""
    url = "memory://" if args.transport == "memory" else args.broker
    result = await drain(reactor, args, url, with_sr3=args.vs_sr3)
    line = (
        f"consume transport={args.transport} n={args.n} rate={result['rate']:.0f} msgs/s "
        f"baseline={result['baseline']:.0f} msgs/s cpu_us={result['cpu'] * 1e6:.1f} "
        f"baseline_cpu_us={result['baseline_cpu'] * 1e6:.1f}"
    )
    if args.vs_sr3:
        line += f" sr3={result['sr3']:.0f} msgs/s"
    print(line, flush=True)


async def drain(reactor, args, url, with_baseline=True, with_sr3=False):
    """The ION consumer's drain of n notices on a container at C{url} (memory:// or amqp://):
    a dict of its C{rate}, with C{with_baseline} the raw subscriber's (C{baseline}), with
    C{with_sr3} sr3's on the same broker (C{sr3})."""
    container = Container(test_config(), reactor, make_transport(url, reactor), sysname="bench")
    await container.start()
    heap.settle()  # as a booted container does
    state = tempfile.mkdtemp(prefix="ion-bench-consume-")
    baseline_queue = "q_bench.baseline"
    consumer_queue = "q_bench.consumer.bench"
    result = {}
    try:
        # Durable queues left by an earlier run on the same broker would skew the counts.
        for queue in (baseline_queue, consumer_queue):
            await container.transport.delete_queue(queue)
        publisher = await container.spawn(Process)
        await publisher.publish(EXCHANGE, "v03", b"{}", declare="topic")

        def publish(key, body):
            return publisher.publish(EXCHANGE, key, body, content_type=CONTENT_TYPE)

        if with_baseline:
            # A raw subscriber on its own durable queue, filled while nobody consumes.
            sink = await container.spawn(RawSink)
            await sink.subscribe(EXCHANGE, ["v03.#"], sink.take, queue=baseline_queue)
            await sink.terminate()
            await fill(publish, args.n)
            sink = await container.spawn(RawSink)
            start, cpu = time.perf_counter(), time.process_time()
            await sink.subscribe(
                EXCHANGE, ["v03.#"], sink.take, queue=baseline_queue, prefetch=args.prefetch
            )
            await wait(reactor, lambda: sink.received >= args.n)
            result["baseline"] = args.n / (time.perf_counter() - start)
            result["baseline_cpu"] = (time.process_time() - cpu) / args.n
            await sink.terminate()

        consumer_args = {
            "name": "bench",
            "user": "bench",
            "exchange": EXCHANGE,
            "topics": ["v03.#"],
            "filters": FILTERS,
            "discard": True,
            "state_dir": state,
            "prefetch": args.prefetch,
        }
        # Declare and bind the consumer's queue, then fill it while nobody consumes.
        consumer = await container.spawn(Consumer, args=consumer_args)
        await consumer.terminate()
        shutil.rmtree(state)
        await fill(publish, args.n)
        profile = cProfile.Profile() if args.profile else None
        if profile is not None:
            profile.enable()
        start, cpu = time.perf_counter(), time.process_time()
        consumer = await container.spawn(Consumer, args=consumer_args)
        await wait(reactor, lambda: consumer.stats["received"] >= args.n and not consumer.in_hand)
        result["rate"] = args.n / (time.perf_counter() - start)
        result["cpu"] = (time.process_time() - cpu) / args.n
        if profile is not None:
            profile.disable()
            profile.dump_stats(args.profile)
        stats = consumer.stats
        expected = (stats["discarded"] + stats["duplicates"] + stats["rejected"]) == args.n
        await consumer.terminate()
        if not expected:
            raise SystemExit(f"consume: counts do not add up: {stats}")
        for queue in (baseline_queue, consumer_queue):
            await container.transport.delete_queue(queue)
        if with_sr3:
            result["sr3"] = await run_sr3(
                reactor, args, url, publish, Sr3Amqp(container.transport)
            )
        return result
    finally:
        await container.stop()
        shutil.rmtree(state, ignore_errors=True)


SR3_CONFIG = "consume"
STALL = 60.0  # seconds sr3 may go without taking a notice before the bench gives up
LOOK = 0.01  # seconds between looks at sr3's progress: often enough, and no load on sr3's cores


class Sr3Amqp:
    """sr3 on an AMQP broker: its progress is its queue's count of ready messages."""

    env = {}

    def __init__(self, transport):
        self.transport = transport

    def queue_lines(self, prefetch):
        return []

    async def reset(self, queue, sr3_run):
        await self.transport.delete_queue(queue)

    async def taken(self, queue, home, n):
        return n - await self.transport.queue_depth(queue)


class Sr3Mqtt:
    """sr3 on an MQTT broker, which does not tell how many messages wait for a session: its
    progress is what sr3 writes in its metrics file (every 0.05 s here), the notices it took
    in the loop passes it has finished, acks sent. Its session is ended with C{sr3 cleanup}.
    The sitecustomize of tests/apps/pump/sr3_fixes is on sr3's path, as in the tests."""

    def __init__(self):
        from tests.apps.pump.sr3 import SR3_FIXES

        self.env = {"PYTHONPATH": SR3_FIXES}

    def queue_lines(self, prefetch):
        # Without an expiry sr3's session ends when `sr3 declare` disconnects, and what is
        # published before `sr3 start` is lost. metrics_writeInterval is not a queue
        # setting, but harmless here.
        return [f"receiveMaximum {prefetch}", "expire 10m", "metrics_writeInterval 0.05"]

    async def reset(self, queue, sr3_run):
        await threads.deferToThread(sr3_run, "cleanup")

    async def taken(self, queue, home, n):
        pattern = os.path.join(home, ".cache", "sr3", "metrics", f"subscribe_{SR3_CONFIG}_*.json")
        count = 0
        for path in glob.glob(pattern):
            try:
                with open(path) as f:
                    metrics = json.load(f)
            except (OSError, ValueError):  # not written yet, or being rewritten
                continue
            for moth in metrics.get("gather.message", {}).values():
                count += moth.get("rxGoodCount", 0) + moth.get("rxBadCount", 0)
        return count


def sr3_config(url, queue, prefetch, batch, wire):
    """An sr3 subscribe that takes the notices without downloading, with the ION consumer's
    filters and duplicate suppression."""
    parts = urlsplit(url)
    lines = [
        f"broker {parts.scheme}://{sr3_user(url)}@{parts.hostname}:{parts.port}/",
        f"exchange {EXCHANGE}",
        # Order matters: subtopic binds with the queue name, prefix and queue settings given
        # before it.
        f"queueName {queue}",
        "topicPrefix v03",
        f"prefetch {prefetch}",
        *wire.queue_lines(prefetch),
        "subtopic #",
        "instances 1",
        "logLevel warning",
        "download off",
        "nodupe_ttl 300",
        *([f"batch {batch}"] if batch else []),
    ]
    lines += [f"{kind} {pattern}" for kind, pattern in FILTERS]
    return "\n".join(lines) + "\n"


def sr3_user(url):
    """The login sr3 uses at C{url}: its own, else anonymous (an MQTT broker open to all)."""
    return urlsplit(url).username or "anonymous"


async def run_sr3(reactor, args, url, publish, wire):
    """sr3's rate on the same notices at C{url} (see the module docstring), published with
    C{publish}; C{wire} (L{Sr3Amqp} or L{Sr3Mqtt}) tells how to see its progress."""
    from bench.pump import sr3_command

    sr3 = sr3_command()
    home = tempfile.mkdtemp(prefix="ion-bench-consume-sr3-")
    config_dir = os.path.join(home, ".config", "sr3")
    os.makedirs(os.path.join(config_dir, "subscribe"))
    os.makedirs(os.path.join(home, ".cache", "sr3", "subscribe", SR3_CONFIG))
    parts = urlsplit(url)
    user = sr3_user(url)
    queue = f"q_{user}.subscribe.{SR3_CONFIG}"
    credentials = os.path.join(config_dir, "credentials.conf")
    with open(credentials, "w") as f:
        f.write(f"{parts.scheme}://{user}:{parts.password or user}@{parts.hostname}:"
                f"{parts.port}/\n")
    os.chmod(credentials, 0o600)
    with open(os.path.join(config_dir, "subscribe", f"{SR3_CONFIG}.conf"), "w") as f:
        f.write(sr3_config(url, queue, args.prefetch, args.sr3_batch, wire))
    # sr3 finds its own instances by owner: USER must name the user we run as.
    env = dict(os.environ, HOME=home, USER=pwd.getpwuid(os.getuid()).pw_name, **wire.env)
    env.pop("VIRTUAL_ENV", None)
    log = os.path.join(home, "sr3.out")

    def sr3_run(word):
        with open(log, "a") as out:
            subprocess.run(
                [sr3, word, f"subscribe/{SR3_CONFIG}"], env=env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, timeout=120,
            )

    async def progress(last, stalled):
        """Wait until more than C{last} were taken: the count and when it was seen."""
        since = time.perf_counter()
        while (taken := await wire.taken(queue, home, args.n)) <= last:
            if time.perf_counter() - since > STALL:
                raise SystemExit(f"consume: sr3 {stalled} for {STALL:.0f} s; see {home}")
            await task.deferLater(reactor, LOOK, lambda: None)
        return taken, time.perf_counter()

    failed = True
    try:
        await wire.reset(queue, sr3_run)
        await threads.deferToThread(sr3_run, "declare")
        await fill(publish, args.n)
        if await wire.taken(queue, home, args.n) != 0:
            raise SystemExit(f"consume: sr3's queue was not filled; see {home}")
        starting = threads.deferToThread(sr3_run, "start")
        first, start = await progress(0, "took no notice")
        taken, end = first, start
        while taken < args.n:
            taken, end = await progress(taken, f"stopped at {taken} of {args.n} notices")
        await starting
        if taken == first:
            raise SystemExit(f"consume: sr3 took all {args.n} notices between two looks; "
                             "raise -n")
        failed = False
        # Those seen taken at the start were taken before it: they do not count.
        return (taken - first) / (end - start)
    finally:
        await threads.deferToThread(sr3_run, "stop")
        await wire.reset(queue, sr3_run)
        if not failed:
            shutil.rmtree(home, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transport", choices=["memory", "amqp", "mqtt"], default="memory")
    parser.add_argument(
        "--broker",
        help="the broker URL (default: a private RabbitMQ node for amqp, a private Mosquitto "
        "for mqtt)",
    )
    parser.add_argument("-n", type=int, default=20000)
    parser.add_argument("--prefetch", type=int, default=100)
    parser.add_argument(
        "--profile", metavar="FILE", help="write a cProfile of the consumer's drain to FILE"
    )
    parser.add_argument(
        "--vs-sr3", action="store_true", help="sr3 on the same notices and the same broker"
    )
    parser.add_argument(
        "--sr3-batch", type=int, metavar="N", help="sr3's batch (default: its own)"
    )
    parser.add_argument(
        "--no-amqp", action="store_true", help="mqtt: skip the same drain over AMQP"
    )
    args = parser.parse_args()
    if args.vs_sr3 and args.transport == "memory":
        parser.error("--vs-sr3 needs --transport amqp or mqtt")
    if args.sr3_batch is not None and not args.vs_sr3:
        parser.error("--sr3-batch needs --vs-sr3")
    if args.no_amqp and args.transport != "mqtt":
        parser.error("--no-amqp needs --transport mqtt")
    if args.profile and args.transport == "mqtt":
        parser.error("--profile needs --transport memory or amqp")
    if args.transport == "mqtt" and args.vs_sr3:
        from tests.apps.pump.sr3 import sr3_missing

        missing = sr3_missing(mqtt=True)
        if missing:
            raise SystemExit(f"consume: --vs-sr3 over MQTT: {missing}")
    started = []
    try:
        start_brokers(args, started)
        task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor, args)))
    finally:
        for broker in reversed(started):
            broker.cleanup()


def start_brokers(args, started):
    """Start the private brokers the run needs (appended to C{started}); C{args.broker} and
    C{args.amqp_broker} say where to connect. Exits with one line if one cannot start."""
    from tests.broker import BrokerError, PrivateBroker
    from tests.mosquitto import PrivateMosquitto

    args.amqp_broker = None
    try:
        if args.transport == "mqtt" and not args.broker:
            mosquitto = PrivateMosquitto()
            started.append(mosquitto)
            mosquitto.start()
            args.broker = mosquitto.url
        if args.transport == "amqp" and not args.broker or (
            args.transport == "mqtt" and not args.no_amqp
        ):
            rabbit = PrivateBroker()
            started.append(rabbit)
            rabbit.start()
            if args.transport == "amqp":
                args.broker = rabbit.url
            else:
                args.amqp_broker = rabbit.url
    except (BrokerError, RuntimeError, OSError) as e:
        raise SystemExit(f"consume: cannot start a private broker: {e}") from None


if __name__ == "__main__":
    main()
