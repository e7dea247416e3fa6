"""Messaging benchmark: one-way messages/s and rpc round trips/s between two processes.

    venv/bin/python bench/messaging.py --transport memory
    venv/bin/python bench/messaging.py --transport amqp --broker amqp://guest:guest@127.0.0.1:5672/

Prints one result line per measurement:
    messaging transport=memory test=oneway size=200 n=20000 rate=... msgs/s
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task  # noqa: E402

from ion.core.cc.container import Container, make_transport  # noqa: E402
from ion.core.cc.testing import test_config  # noqa: E402
from ion.core.process import Process, ServiceProcess  # noqa: E402


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


async def run(reactor, args):
    url = "memory://" if args.transport == "memory" else args.broker
    container = Container(test_config(), reactor, make_transport(url, reactor), sysname="bench")
    await container.start()
    try:
        sink = await container.spawn(Sink)
        source = await container.spawn(Source)
        for size in args.sizes:
            payload = b"x" * size
            n = args.n
            sink.count, sink.target, sink.reached = 0, n, defer.Deferred()
            start = time.perf_counter()
            window = []
            for _ in range(n):
                window.append(defer.ensureDeferred(source.send(sink.pid, "take", payload)))
                if len(window) >= 500:
                    await defer.gatherResults(window)
                    window = []
            await defer.gatherResults(window)
            await sink.reached
            report(args.transport, "oneway", size, n, time.perf_counter() - start, "msgs/s")

        payload = b"x" * 200
        n = args.n // 10
        start = time.perf_counter()
        for _ in range(n):
            await source.rpc(sink.pid, "echo", payload)
        report(args.transport, "rpc_sequential", 200, n, time.perf_counter() - start, "calls/s")

        n = args.n // 2
        start = time.perf_counter()
        in_flight = 100
        done = 0
        while done < n:
            batch = min(in_flight, n - done)
            await defer.gatherResults([source.rpc(sink.pid, "echo", payload) for _ in range(batch)])
            done += batch
        report(args.transport, "rpc_pipelined100", 200, n, time.perf_counter() - start, "calls/s")
    finally:
        await container.stop()


def report(transport, test, size, n, seconds, unit):
    print(
        f"messaging transport={transport} test={test} size={size} n={n} "
        f"rate={n / seconds:.0f} {unit}",
        flush=True,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transport", choices=["memory", "amqp"], default="memory")
    parser.add_argument("--broker", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("-n", type=int, default=20000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 4096])
    args = parser.parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor, args)))


if __name__ == "__main__":
    main()
