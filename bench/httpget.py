"""Kept-connection GET benchmark: the client's CPU per GET of a small file over loopback, for
the pump's kept GETs (L{ion.apps.pump.transfer.httpwire}) and for Twisted's HTTP client on a
persistent C{HTTPConnectionPool} (what the pump used before), in one run.

    venv/bin/python bench/httpget.py                 # 20,000 GETs of 4 KiB, 8 at a time
    venv/bin/python bench/httpget.py -n 5000 --size 65536 --parallel 4 --rounds 3

The server is twisted.web (static.File on 127.0.0.1, no access log) in a process of its own,
so its CPU is not the client's. Each client GETs every file once through the pump's own
path (`ion.apps.pump.transfer.http.fetch`: the URL policy's parse, the idle timer, the
status, encoding and size checks) into a sink that only counts bytes: no disk. The two
clients differ only in the agent that carries the GET. They run alternately, `--rounds`
times each (the first GETs of each round open the connections); CPU is this process's
utime+stime over each round. `--client wire` (or `twisted`) runs one only, as for counting
instructions per GET under callgrind (two runs of different `-n`, the difference divided by
the difference of `-n`). Prints one line per client (the median round) and a ratio line:

    httpget client=wire n=20000 size=4096 gets_per_s=... cpu_us_per_get=...
    httpget client=twisted n=20000 size=4096 gets_per_s=... cpu_us_per_get=...
    httpget ratio wire/twisted cpu_us_per_get=... gets_per_s=...
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, task  # noqa: E402
from twisted.web.client import HTTPConnectionPool  # noqa: E402

from ion.apps.pump.transfer import http  # noqa: E402
from ion.apps.pump.transfer.location import Settings, locate  # noqa: E402

SERVER = """
import sys
from twisted.internet import reactor
from twisted.web import server, static
site = server.Site(static.File(sys.argv[1]))
site.log = lambda request: None
port = reactor.listenTCP(0, site, interface="127.0.0.1")
print(port.getHost().port, flush=True)
reactor.run()
"""


class _Count:
    """A sink that counts bytes."""

    expected_size = None

    def __init__(self):
        self.size = 0
        self.backlogged = False

    def declare(self, size):
        pass

    def write(self, data):
        self.size += len(data)


class _TwistedConnections(http.HTTPConnections):
    """The kept GETs of before: Twisted's Agent on a persistent pool."""

    def agent(self, settings, read_size=http.READ_SIZE):
        agent = self._agents.get(read_size)
        if agent is None:
            pool = HTTPConnectionPool(self._reactor, persistent=True)
            pool.maxPersistentPerHost = self.per_host
            self._pools[read_size] = _Closing(pool)
            endpoints = http._endpoints(self._reactor, settings, read_size)
            agent = self._agents[read_size] = http.Agent.usingEndpointFactory(
                self._reactor, endpoints, pool
            )
        return agent


class _Closing:
    def __init__(self, pool):
        self._pool = pool

    def close(self):
        return self._pool.closeCachedConnections()


def _cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _round(reactor, connections, urls, parallel, size):
    settings = Settings(http_connections=connections)
    queue = iter(urls)

    async def worker():
        for url in queue:
            sink = _Count()
            await http.fetch(reactor, locate(url), sink, settings)
            if sink.size != size:
                raise RuntimeError(f"{url}: {sink.size} bytes, {size} expected")

    started, cpu = time.perf_counter(), _cpu()
    await defer.gatherResults(
        [defer.Deferred.fromCoroutine(worker()) for _ in range(parallel)], consumeErrors=True
    )
    elapsed, used = time.perf_counter() - started, _cpu() - cpu
    await connections.close()
    return len(urls) / elapsed, used / len(urls) * 1e6


async def _main(reactor, args):
    root = tempfile.mkdtemp(prefix="httpget-")
    data = os.urandom(args.size)
    names = [f"f{n:06d}" for n in range(args.n)]
    for name in names:
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, root], stdout=subprocess.PIPE, text=True
    )
    try:
        port = int(server.stdout.readline())
        urls = [f"http://127.0.0.1:{port}/{name}" for name in names]
        clients = [
            (client, kind)
            for client, kind in (("wire", http.HTTPConnections), ("twisted", _TwistedConnections))
            if args.client in ("both", client)
        ]
        results = {client: [] for client, _ in clients}
        for _ in range(args.rounds):
            for client, kind in clients:
                connections = kind(reactor, per_host=args.parallel)
                results[client].append(
                    await _round(reactor, connections, urls, args.parallel, args.size)
                )
        medians = {}
        for client, rounds in results.items():
            rate, cpu = sorted(rounds, key=lambda r: r[1])[len(rounds) // 2]
            medians[client] = (rate, cpu)
            print(
                f"httpget client={client} n={args.n} size={args.size} parallel={args.parallel} "
                f"gets_per_s={rate:.0f} cpu_us_per_get={cpu:.1f} "
                f"rounds_cpu_us={','.join(f'{r[1]:.1f}' for r in rounds)}"
            )
        if len(medians) < 2:
            return
        wire, twisted = medians["wire"], medians["twisted"]
        print(
            f"httpget ratio wire/twisted cpu_us_per_get={wire[1] / twisted[1]:.2f} "
            f"gets_per_s={wire[0] / twisted[0]:.2f}"
        )
    finally:
        server.terminate()
        server.wait()
        for name in names:
            os.unlink(os.path.join(root, name))
        os.rmdir(root)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=20000, help="GETs per round (default 20000)")
    parser.add_argument("--size", type=int, default=4096, help="bytes per file (default 4096)")
    parser.add_argument("--parallel", type=int, default=8, help="GETs at a time (default 8)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per client (default 3)")
    parser.add_argument(
        "--client", choices=("both", "wire", "twisted"), default="both",
        help="run one client only (for callgrind: instructions per GET)",
    )
    args = parser.parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(_main(reactor, args)))


if __name__ == "__main__":
    main()
