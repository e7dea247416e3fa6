"""Messaging benchmark: one-way messages/s and rpc round trips/s between two ION processes.

    venv/bin/python bench/messaging.py --transport memory
    venv/bin/python bench/messaging.py --transport amqp
    venv/bin/python bench/messaging.py --transport amqp --broker amqp://guest:guest@127.0.0.1:5672/
    venv/bin/python bench/messaging.py --transport amqp --profile messaging.prof  # cProfile ION

On amqp the script starts a private RabbitMQ node of its own (tests/broker.py) unless --broker
names one, and interleaves the ION measurements with a raw pika baseline doing the same work on
the same broker: one `SelectConnection` (in a thread, while the reactor waits) with a publish
channel in confirm mode and consumers that ack each message.

- oneway: publishes of `size` bytes, mandatory and confirmed, at most 500 unconfirmed; the
  receiver (prefetch 100) counts and acks. The rate counts deliveries at the receiver.
- rpc_sequential: one request of 200 bytes at a time, the next once its reply arrived.
- rpc_inflight100: batches of 100 requests; the next batch once all 100 replies arrived.
  pika's rpc sends requests and replies over two queues, matched by correlation id.

Each measurement runs for about --seconds, --repeat times (ION, pika, pika, ION, ... so that
both see the same share of whatever else loads the machine); the best rate of each is shown.
Prints one result line per measurement:
    messaging transport=memory test=oneway size=200 rate=... msgs/s
    messaging transport=amqp test=oneway size=200 ion=... pika=... ratio=0.xx msgs/s
        cpu_us ion=... pika=... cpu_ratio=0.xx
On amqp it also gives the CPU time each side took per message (one-way) or per call (rpc,
both ends), the least of the repeats, and their ratio: on a machine others load too, the
rates move with their load, the CPU per message much less. Each side is charged for its
sending and receiving ends (both live in this process), not for the broker's work.
"""

import argparse
import cProfile
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task, threads  # noqa: E402

from ion.core.cc import heap  # noqa: E402
from ion.core.cc.container import Container, make_transport  # noqa: E402
from ion.core.cc.testing import test_config  # noqa: E402
from ion.core.process import Process, ServiceProcess  # noqa: E402

WINDOW = 500  # unconfirmed one-way publishes at most
PREFETCH = 100  # ION's default per consumer
RPC_SIZE = 200


class Sink(ServiceProcess):
    service = "bench_sink"

    def on_init(self):
        self.count = 0
        self.target = None
        self.reached = None

    def op_take(self, content, headers):
        self.count += 1
        if self.count == self.target:
            self.reached.callback(None)

    def op_echo(self, content, headers):
        return content


class Source(Process):
    pass


# ION.


async def ion_oneway(sink, source, size, seconds):
    """Send confirmed one-way messages for about `seconds`; (delivered, elapsed seconds)."""
    payload = b"x" * size
    sink.count, sink.target, sink.reached = 0, None, defer.Deferred()
    sent = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        await defer.gatherResults(
            [defer.ensureDeferred(source.send(sink.pid, "take", payload)) for _ in range(WINDOW)]
        )
        sent += WINDOW
    sink.target = sent
    if sink.count < sent:
        await sink.reached
    return sent, time.perf_counter() - start


async def ion_rpc(sink, source, in_flight, seconds):
    """Round trips in batches of `in_flight` for about `seconds`; (calls, elapsed seconds)."""
    payload = b"x" * RPC_SIZE
    done = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        if in_flight == 1:
            await source.rpc(sink.pid, "echo", payload)
        else:
            await defer.gatherResults(
                [source.rpc(sink.pid, "echo", payload) for _ in range(in_flight)]
            )
        done += in_flight
    return done, time.perf_counter() - start


# The pika baseline.


class PikaRun:
    """One baseline measurement on its own pika SelectConnection; `run()` blocks until done
    and returns (count, elapsed seconds)."""

    EXCHANGE = "bench.pika"

    def __init__(self, url, test, size, seconds, in_flight=1):
        self.url = url
        self.test = test
        self.body = b"x" * size
        self.seconds = seconds
        self.in_flight = in_flight
        self.connection = None
        self.error = None
        self.result = None

    def run(self):
        import pika

        self.pika = pika
        self.connection = pika.SelectConnection(
            pika.URLParameters(self.url),
            on_open_callback=self._opened,
            on_open_error_callback=self._failed,
            on_close_callback=self._closed,
        )
        self.connection.ioloop.start()
        if self.error is not None:
            raise RuntimeError(f"pika baseline {self.test}: {self.error}")
        return self.result

    def _failed(self, connection, error):
        self.error = error
        connection.ioloop.stop()

    def _closed(self, connection, reason):
        if self.result is None and self.error is None:
            self.error = reason
        connection.ioloop.stop()

    def _finish(self):
        self.result = (self.count, time.perf_counter() - self.start)
        self.connection.close()

    # Setup: a publish channel in confirm mode, a consumer channel per queue.

    def _opened(self, connection):
        self.user = self.pika.URLParameters(self.url).credentials.username
        connection.channel(on_open_callback=self._publish_channel_open)

    def _publish_channel_open(self, channel):
        self.pub = channel
        channel.confirm_delivery(self._confirmed, callback=lambda _: self._declare())

    def _declare(self):
        self.pub.exchange_declare(
            self.EXCHANGE, "topic", auto_delete=True, callback=lambda _: self._queues()
        )

    def _queues(self):
        names = ["sink"] if self.test == "oneway" else ["requests", "replies"]
        self.queues = {}
        self.channels = {}
        for name in names:
            self.connection.channel(
                on_open_callback=lambda ch, name=name: self._consumer_channel_open(ch, name, names)
            )

    def _consumer_channel_open(self, channel, name, names):
        self.channels[name] = channel

        def declared(frame):
            queue = frame.method.queue
            self.queues[name] = queue
            channel.queue_bind(queue, self.EXCHANGE, routing_key=queue, callback=bound)

        def bound(_):
            channel.basic_qos(prefetch_count=PREFETCH, callback=qos)

        def qos(_):
            handler = {"sink": self._take, "requests": self._serve, "replies": self._reply}[name]
            channel.basic_consume(self.queues[name], handler, callback=consuming)

        def consuming(_):
            self._ready.add(name)
            if len(self._ready) == len(names):
                self._begin()

        if not hasattr(self, "_ready"):
            self._ready = set()
        channel.queue_declare("", exclusive=True, auto_delete=True, callback=declared)

    def _begin(self):
        self.count = 0
        self.sent = 0
        self.next_tag = 1
        self.unconfirmed = 0
        self.pending = set()
        self.stopping = False
        self.properties = self.pika.BasicProperties(user_id=self.user, delivery_mode=1)
        self.start = time.perf_counter()
        if self.test == "oneway":
            self._publish_window()
        else:
            self._call_batch()

    def _confirmed(self, frame):
        method = frame.method
        if method.NAME != "Basic.Ack":
            self.error = f"the broker refused a publish: {method.NAME}"
            self.connection.close()
            return
        tag = method.delivery_tag
        settled = tag - self.confirmed_up_to if method.multiple else 1
        self.confirmed_up_to = max(self.confirmed_up_to, tag)
        self.unconfirmed -= settled
        if self.test == "oneway" and self.unconfirmed == 0:
            if time.perf_counter() - self.start < self.seconds:
                self._publish_window()
            else:
                self.stopping = True
                self._maybe_done()

    confirmed_up_to = 0

    # One-way.

    def _publish_window(self):
        queue = self.queues["sink"]
        for _ in range(WINDOW):
            self.pub.basic_publish(
                self.EXCHANGE, queue, self.body, properties=self.properties, mandatory=True
            )
        self.unconfirmed += WINDOW
        self.sent += WINDOW

    def _take(self, channel, method, properties, body):
        self.count += 1
        channel.basic_ack(method.delivery_tag)
        self._maybe_done()

    def _maybe_done(self):
        if self.stopping and self.count == self.sent:
            self._finish()

    # Request/reply.

    def _call_batch(self):
        queue, reply_to = self.queues["requests"], self.queues["replies"]
        for _ in range(self.in_flight):
            self.sent += 1
            correlation = str(self.sent)
            self.pending.add(correlation)
            self.pub.basic_publish(
                self.EXCHANGE,
                queue,
                self.body,
                properties=self.pika.BasicProperties(
                    user_id=self.user,
                    delivery_mode=1,
                    correlation_id=correlation,
                    reply_to=reply_to,
                ),
                mandatory=True,
            )
        self.unconfirmed += self.in_flight

    def _serve(self, channel, method, properties, body):
        self.pub.basic_publish(
            self.EXCHANGE,
            properties.reply_to,
            body,
            properties=self.pika.BasicProperties(
                user_id=self.user, delivery_mode=1, correlation_id=properties.correlation_id
            ),
            mandatory=True,
        )
        self.unconfirmed += 1
        channel.basic_ack(method.delivery_tag)

    def _reply(self, channel, method, properties, body):
        channel.basic_ack(method.delivery_tag)
        self.pending.discard(properties.correlation_id)
        self.count += 1
        if self.pending:
            return
        if time.perf_counter() - self.start < self.seconds:
            self._call_batch()
        else:
            self._finish()


def cpu_seconds():
    """CPU time (user and system) of this process so far. Each side runs while the other
    waits (pika in a thread while the reactor waits for it; ION on the reactor while no pika
    connection is open), so the difference over a measurement is that side's alone: unlike
    a rate, it hardly moves with the load other processes put on the machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def pika_measure(url, test, size, seconds, in_flight=1):
    """Run one baseline in a thread (the reactor only waits meanwhile); a Deferred of
    (count, elapsed seconds)."""
    return threads.deferToThread(PikaRun(url, test, size, seconds, in_flight).run)


# Running and reporting.


async def run(reactor, args, url):
    profile = cProfile.Profile() if args.profile else None
    container = Container(test_config(), reactor, make_transport(url, reactor), sysname="bench")
    await container.start()
    heap.settle()  # as a booted container does
    try:
        sink = await container.spawn(Sink)
        source = await container.spawn(Source)
        tests = [("oneway", size, ion_oneway, (sink, source, size)) for size in args.sizes]
        tests += [
            ("rpc_sequential", RPC_SIZE, ion_rpc, (sink, source, 1)),
            ("rpc_inflight100", RPC_SIZE, ion_rpc, (sink, source, 100)),
        ]
        tests = [test for test in tests if test[0] in args.tests]
        for test, size, measure, measure_args in tests:
            unit = "msgs/s" if test == "oneway" else "calls/s"

            async def ion():
                before = cpu_seconds()
                if profile is not None:
                    profile.enable()
                try:
                    count, seconds = await measure(*measure_args, args.seconds)
                finally:
                    if profile is not None:
                        profile.disable()
                return count / seconds, (cpu_seconds() - before) / count

            if args.transport == "memory":
                rate = max([(await ion())[0] for _ in range(args.repeat)])
                print(
                    f"messaging transport=memory test={test} size={size} rate={rate:.0f} {unit}",
                    flush=True,
                )
                continue
            in_flight = 100 if test == "rpc_inflight100" else 1
            kind = "oneway" if test == "oneway" else "rpc"

            async def pika():
                before = cpu_seconds()
                count, seconds = await pika_measure(url, kind, size, args.seconds, in_flight)
                return count / seconds, (cpu_seconds() - before) / count

            # ION, pika, pika, ION, ...: both see the same share of the machine's other load.
            ion_runs, pika_runs = [], []
            order = [(ion, ion_runs), (pika, pika_runs)]
            for i in range(args.repeat):
                for run_one, runs in order if i % 2 == 0 else order[::-1]:
                    runs.append(await run_one())
            ion_rate, pika_rate = max(r for r, _ in ion_runs), max(r for r, _ in pika_runs)
            ion_cpu, pika_cpu = min(c for _, c in ion_runs), min(c for _, c in pika_runs)
            print(
                f"messaging transport=amqp test={test} size={size} ion={ion_rate:.0f} "
                f"pika={pika_rate:.0f} ratio={ion_rate / pika_rate:.2f} {unit} "
                f"cpu_us ion={ion_cpu * 1e6:.0f} pika={pika_cpu * 1e6:.0f} "
                f"cpu_ratio={ion_cpu / pika_cpu:.2f}",
                flush=True,
            )
    finally:
        await container.stop()
        if profile is not None:
            profile.dump_stats(args.profile)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transport", choices=["memory", "amqp"], default="memory")
    parser.add_argument(
        "--broker", help="amqp only: use this broker URL instead of starting a private node"
    )
    parser.add_argument("--seconds", type=float, default=2.5, help="length of each measurement")
    parser.add_argument(
        "--repeat", type=int, default=2, help="measurements of each kind; the best one is shown"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 4096])
    parser.add_argument(
        "--profile", metavar="FILE", help="write a cProfile of the ION measurements to FILE"
    )
    parser.add_argument(
        "--tests", nargs="+", default=["oneway", "rpc_sequential", "rpc_inflight100"],
        help="the measurements to run",
    )
    args = parser.parse_args()

    broker = None
    if args.transport == "memory":
        url = "memory://"
    elif args.broker:
        url = args.broker
    else:
        from tests.broker import PrivateBroker

        broker = PrivateBroker()
        broker.start()
        url = broker.url
    try:
        task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor, args, url)))
    finally:
        if broker is not None:
            broker.cleanup()


if __name__ == "__main__":
    main()
