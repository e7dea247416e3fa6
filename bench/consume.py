"""Consumer benchmark: notices/s through the pump consumer's decoding, filtering and duplicate
suppression, with downloads off (`discard`), against a baseline measured in the same run: a raw
subscriber that only acks.

    venv/bin/python bench/consume.py --transport memory
    venv/bin/python bench/consume.py --transport amqp            # on a private RabbitMQ node
    venv/bin/python bench/consume.py --transport amqp --vs-sr3   # and sr3 on the same notices
    venv/bin/python bench/consume.py --transport amqp --broker amqp://guest:guest@127.0.0.1:5672/
    venv/bin/python bench/consume.py --transport amqp --profile consume.prof   # cProfile the drain
    venv/bin/python bench/consume.py --transport mqtt --broker mqtt://127.0.0.1:1883/

On amqp without --broker the script starts a private RabbitMQ node of its own (tests/broker.py).

Over MQTT the container runs on memory:// and the consumer is a flow with its own `broker`
(a persistent session, QoS 1, manual acks); the baseline is a raw MQTT subscriber on the same
broker. The broker must queue n messages for an offline session (Mosquitto's
max_queued_messages defaults to 1000).

The queue is filled first (n v03 notices, one in ten a repeat of an earlier one, one in ten
rejected by the filter), then drained. Prints one result line:

    consume transport=memory n=20000 rate=... msgs/s baseline=... msgs/s

With --vs-sr3 (amqp only) an sr3 `subscribe` (the venv of bench/pump.py, `download off`, the
same reject/accept rules, duplicate suppression on, prefetch as given) drains the same notices
from a queue of its own on the same broker, filled while it is stopped; its rate runs from the
first message taken until the queue holds none ready (the last prefetch window may still be in
its hands), and is added to the line as `sr3=... msgs/s`.
"""

import argparse
import cProfile
import base64
import hashlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task, threads  # noqa: E402

from ion.apps.pump.consumer import Consumer  # noqa: E402
from ion.apps.pump.notice import format_time  # noqa: E402
from ion.core.cc.container import Container, make_transport  # noqa: E402
from ion.core.cc.testing import test_config  # noqa: E402
from ion.core.process import Process  # noqa: E402

EXCHANGE = "bench_xpublic"
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


async def fill(proc, n):
    window = []
    for key, body in notices(n):
        window.append(defer.ensureDeferred(proc.publish(EXCHANGE, key, body)))
        if len(window) >= 500:
            await defer.gatherResults(window)
            window = []
    await defer.gatherResults(window)


async def wait(reactor, done):
    while not done():
        await task.deferLater(reactor, 0.001, lambda: None)


async def run_mqtt(reactor, args):
    from ion.core.messaging.mqtt import MqttTransport

    container = Container(test_config(), reactor, make_transport("memory://", reactor),
                          sysname="bench")
    await container.start()
    state = tempfile.mkdtemp(prefix="ion-bench-consume-")
    tag = f"{os.getpid()}"
    publisher = MqttTransport(args.broker, reactor, session=f"bench_pub_{tag}")
    await publisher.connect()

    async def fill_mqtt():
        window = []
        for key, body in notices(args.n):
            window.append(publisher.publish(EXCHANGE, key, body, mandatory=False))
            if len(window) >= 500:
                await defer.gatherResults(window)
                window = []
        await defer.gatherResults(window)

    try:
        sink = MqttTransport(args.broker, reactor, session=f"bench_sink_{tag}",
                             session_expiry=600)
        await sink.connect()
        await sink.bind(f"q_bench.baseline{tag}", EXCHANGE, "v03.#")
        await sink.close()
        await fill_mqtt()
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
        await fill_mqtt()
        start = time.perf_counter()
        consumer = await container.spawn(Consumer, args=consumer_args)
        await wait(reactor, lambda: consumer.stats["received"] >= args.n)
        rate = args.n / (time.perf_counter() - start)
        await consumer.terminate()
        print(f"consume transport=mqtt n={args.n} rate={rate:.0f} msgs/s "
              f"baseline={baseline:.0f} msgs/s", flush=True)
    finally:
        await publisher.close()
        await container.stop()
        shutil.rmtree(state, ignore_errors=True)


async def run(reactor, args):
    if args.transport == "mqtt":
        return await run_mqtt(reactor, args)
    url = "memory://" if args.transport == "memory" else args.broker
    container = Container(test_config(), reactor, make_transport(url, reactor), sysname="bench")
    await container.start()
    state = tempfile.mkdtemp(prefix="ion-bench-consume-")
    baseline_queue = "q_bench.baseline"
    consumer_queue = "q_bench.consumer.bench"
    try:
        # Durable queues left by an earlier run on the same broker would skew the counts.
        for queue in (baseline_queue, consumer_queue):
            await container.transport.delete_queue(queue)
        publisher = await container.spawn(Process)
        await publisher.publish(EXCHANGE, "v03", b"{}", declare="topic")

        # Baseline: a raw subscriber on its own durable queue, filled while nobody consumes.
        sink = await container.spawn(RawSink)
        await sink.subscribe(EXCHANGE, ["v03.#"], sink.take, queue=baseline_queue)
        await sink.terminate()
        await fill(publisher, args.n)
        sink = await container.spawn(RawSink)
        start = time.perf_counter()
        await sink.subscribe(
            EXCHANGE, ["v03.#"], sink.take, queue=baseline_queue, prefetch=args.prefetch
        )
        await wait(reactor, lambda: sink.received >= args.n)
        baseline = args.n / (time.perf_counter() - start)
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
        await fill(publisher, args.n)
        profile = cProfile.Profile() if args.profile else None
        if profile is not None:
            profile.enable()
        start = time.perf_counter()
        consumer = await container.spawn(Consumer, args=consumer_args)
        await wait(reactor, lambda: consumer.stats["received"] >= args.n and not consumer.in_hand)
        rate = args.n / (time.perf_counter() - start)
        if profile is not None:
            profile.disable()
            profile.dump_stats(args.profile)
        stats = consumer.stats
        expected = (stats["discarded"] + stats["duplicates"] + stats["rejected"]) == args.n
        await consumer.terminate()
        if not expected:
            raise SystemExit(f"consume: counts do not add up: {stats}")
        line = (
            f"consume transport={args.transport} n={args.n} rate={rate:.0f} msgs/s "
            f"baseline={baseline:.0f} msgs/s"
        )
        for queue in (baseline_queue, consumer_queue):
            await container.transport.delete_queue(queue)
        if args.vs_sr3:
            sr3_rate = await run_sr3(reactor, container, publisher, args, url)
            line += f" sr3={sr3_rate:.0f} msgs/s"
        print(line, flush=True)
    finally:
        await container.stop()
        shutil.rmtree(state, ignore_errors=True)


SR3_CONFIG = "consume"
SR3_QUEUE = f"q_guest.subscribe.{SR3_CONFIG}"


def sr3_config(url, prefetch):
    """An sr3 subscribe that takes the notices without downloading, with the ION consumer's
    filters and duplicate suppression."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    lines = [
        f"broker amqp://{parts.username}@{parts.hostname}:{parts.port}/",
        f"exchange {EXCHANGE}",
        # Order matters: subtopic binds with the queue name and prefix given before it.
        f"queueName {SR3_QUEUE}",
        "topicPrefix v03",
        "subtopic #",
        "instances 1",
        "logLevel warning",
        "download off",
        "nodupe_ttl 300",
        f"prefetch {prefetch}",
    ]
    lines += [f"{kind} {pattern}" for kind, pattern in FILTERS]
    return "\n".join(lines) + "\n"


async def run_sr3(reactor, container, publisher, args, url):
    """sr3's rate on the same notices (see the module docstring)."""
    from bench.pump import sr3_command

    sr3 = sr3_command()
    home = tempfile.mkdtemp(prefix="ion-bench-consume-sr3-")
    config_dir = os.path.join(home, ".config", "sr3")
    os.makedirs(os.path.join(config_dir, "subscribe"))
    os.makedirs(os.path.join(home, ".cache", "sr3", "subscribe", SR3_CONFIG))
    credentials = os.path.join(config_dir, "credentials.conf")
    with open(credentials, "w") as f:
        f.write(url + "\n")
    os.chmod(credentials, 0o600)
    with open(os.path.join(config_dir, "subscribe", f"{SR3_CONFIG}.conf"), "w") as f:
        f.write(sr3_config(url, args.prefetch))
    # sr3 finds its own instances by owner: USER must name the user we run as.
    env = dict(os.environ, HOME=home, USER=pwd.getpwuid(os.getuid()).pw_name)
    env.pop("VIRTUAL_ENV", None)
    log = os.path.join(home, "sr3.out")

    def sr3_run(word):
        with open(log, "a") as out:
            subprocess.run(
                [sr3, word, f"subscribe/{SR3_CONFIG}"], env=env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, timeout=120,
            )

    transport = container.transport
    try:
        await transport.delete_queue(SR3_QUEUE)
        await threads.deferToThread(sr3_run, "declare")
        await fill(publisher, args.n)
        if await transport.queue_depth(SR3_QUEUE) != args.n:
            raise SystemExit(f"consume: sr3's queue was not filled; see {log}")
        starting = threads.deferToThread(sr3_run, "start")
        while await transport.queue_depth(SR3_QUEUE) == args.n:
            await task.deferLater(reactor, 0.001, lambda: None)
        start = time.perf_counter()
        while await transport.queue_depth(SR3_QUEUE) > 0:
            await task.deferLater(reactor, 0.001, lambda: None)
        rate = args.n / (time.perf_counter() - start)
        await starting
        return rate
    finally:
        await threads.deferToThread(sr3_run, "stop")
        await transport.delete_queue(SR3_QUEUE)
        shutil.rmtree(home, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transport", choices=["memory", "amqp", "mqtt"], default="memory")
    parser.add_argument(
        "--broker",
        help="the broker URL (mqtt: required; amqp: default a private RabbitMQ node)",
    )
    parser.add_argument("-n", type=int, default=20000)
    parser.add_argument("--prefetch", type=int, default=100)
    parser.add_argument(
        "--profile", metavar="FILE", help="write a cProfile of the consumer's drain to FILE"
    )
    parser.add_argument("--vs-sr3", action="store_true", help="amqp: sr3 on the same notices")
    args = parser.parse_args()
    if args.vs_sr3 and args.transport != "amqp":
        parser.error("--vs-sr3 needs --transport amqp")
    if args.transport == "mqtt" and not args.broker:
        parser.error("--transport mqtt needs --broker mqtt://...")
    broker = None
    if args.transport == "amqp" and not args.broker:
        from tests.broker import PrivateBroker

        broker = PrivateBroker()
        broker.start()
        args.broker = broker.url
    try:
        task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor, args)))
    finally:
        if broker is not None:
            broker.cleanup()


if __name__ == "__main__":
    main()
