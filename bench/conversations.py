"""Conversation benchmark: pipelined rpcs, then memory back at its baseline once tombstones expire.

    venv/bin/python bench/conversations.py --transport memory
    venv/bin/python bench/conversations.py --transport amqp --broker amqp://guest:guest@127.0.0.1:5672/

Two processes in one container make `n` rpcs (default 100000) with `--window` (200) calls in
flight at all times, with config `ion.core.conversation: {'tombstone_ttl': 1}`. After a run it
waits past the TTL, collects the tombstones of both processes and runs `gc.collect()`.

- `rate` comes from a first run without tracemalloc (tracemalloc slows allocation down).
- Memory is measured with tracemalloc, started after that run: one more run brings every table
  to its working size, then `mem_baseline_kb` is what is still allocated (since tracemalloc
  started) once its tombstones are gone; a last run follows, and `mem_after_kb` is the same
  figure after it. `delta_kb` near zero means conversations leave nothing behind.

Prints one line per transport:
    conversations transport=memory n=100000 rate=... calls/s open_after=0 tombstones_after=0
    mem_baseline_kb=... mem_after_kb=... delta_kb=...
"""

import argparse
import gc
import os
import sys
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task  # noqa: E402

from ion.core.cc.container import Container, make_transport  # noqa: E402
from ion.core.cc.testing import test_config  # noqa: E402
from ion.core.process import Process, ServiceProcess  # noqa: E402


class Echo(ServiceProcess):
    service = "bench_echo"

    def op_echo(self, content, headers):
        return content


class Caller(Process):
    pass


def pipelined(caller, dest, n, window, payload):
    """Make n rpcs to dest, keeping `window` of them in flight; a Deferred fired when all are
    answered (or failed with the first error)."""
    done = defer.Deferred()
    counts = {"sent": 0, "answered": 0}

    def launch():
        counts["sent"] += 1
        caller.rpc(dest, "echo", payload).addCallbacks(answered, failed)

    def answered(_):
        counts["answered"] += 1
        if counts["sent"] < n:
            launch()
        elif counts["answered"] == n and not done.called:
            done.callback(None)

    def failed(f):
        if not done.called:
            done.errback(f)

    for _ in range(min(window, n)):
        launch()
    return done


async def settle(reactor, procs, ttl):
    """Let every tombstone expire, collect them and the garbage; returns (open, tombstones)."""
    await task.deferLater(reactor, ttl + 0.5, lambda: None)
    for proc in procs:
        proc.conversations.collect()
    gc.collect()
    return (
        sum(len(p.conversations) for p in procs),
        sum(len(p.conversations.tombstones) for p in procs),
    )


async def run(reactor, args):
    url = "memory://" if args.transport == "memory" else args.broker
    config = test_config(**{"ion.core.conversation": {"tombstone_ttl": args.ttl}})
    container = Container(config, reactor, make_transport(url, reactor), sysname="bench")
    await container.start()
    try:
        echo = await container.spawn(Echo)
        caller = await container.spawn(Caller)
        procs = [echo, caller]
        payload = b"x" * 200

        await pipelined(caller, echo.pid, args.window * 10, args.window, payload)
        start = time.perf_counter()
        await pipelined(caller, echo.pid, args.n, args.window, payload)
        rate = args.n / (time.perf_counter() - start)
        await settle(reactor, procs, args.ttl)

        tracemalloc.start()
        await pipelined(caller, echo.pid, args.n, args.window, payload)
        await settle(reactor, procs, args.ttl)
        baseline = tracemalloc.get_traced_memory()[0]
        await pipelined(caller, echo.pid, args.n, args.window, payload)
        open_after, tombstones_after = await settle(reactor, procs, args.ttl)
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        print(
            f"conversations transport={args.transport} n={args.n} rate={rate:.0f} calls/s "
            f"open_after={open_after} tombstones_after={tombstones_after} "
            f"mem_baseline_kb={baseline / 1024:.0f} mem_after_kb={after / 1024:.0f} "
            f"delta_kb={(after - baseline) / 1024:.0f}",
            flush=True,
        )
    finally:
        await container.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transport", choices=["memory", "amqp"], default="memory")
    parser.add_argument("--broker", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("-n", type=int, default=100_000)
    parser.add_argument("--window", type=int, default=200, help="rpcs in flight")
    parser.add_argument("--ttl", type=float, default=1, help="tombstone TTL in seconds")
    args = parser.parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor, args)))


if __name__ == "__main__":
    main()
