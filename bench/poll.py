"""Poll benchmark: entries/s of a poll over a large tree on its first pass (every file
announced) and on an unchanged re-poll, and its peak RSS, over file: and over HTTP.

    venv/bin/python bench/poll.py                          # 1,000,000 files, file: and http
    venv/bin/python bench/poll.py -n 100000 --dirs 100     # a smaller tree while iterating
    venv/bin/python bench/poll.py --schemes http --profile poll.prof   # poll.prof.http.first...
    venv/bin/python bench/poll.py --touch                  # a file changed in every directory

The tree: `-n` empty files spread evenly over `--dirs` directories (`dNNNN/fNNNNNNN.dat`), made
once under `--tree` (default /tmp/ion-bench-poll-<n>x<dirs>, kept for the next run: a file
`<tree>.complete` beside it says it was finished; remove both to make it again).

- file: the poll lists the tree itself (`file://<tree>/`).
- http: a twisted.web server in a child process of its own (its CPU is not the poll's) serves
  index pages generated from the same layout, in nginx's `autoindex` form (a `<pre>` of links
  each followed by `DD-Mon-YYYY HH:MM` and the size in bytes), which is what a poll of a real
  data server reads: the root page lists the directories, each directory's page its files.
  The files themselves are not served (a poll reads only the pages); every page is the same
  on every request, so the second pass sees nothing changed.

The re-poll of an unchanged tree finds every directory's listing as it was when its files were
recorded (the digest the poll keeps): it reads no rows and compares no entries. With `--touch`,
the first file of every directory has another mtime before the re-poll (file: `os.utime`, one
second later; http: the index server is asked for `/_touch`, after which its pages show that
file a minute later), so that every directory is read and compared with its rows, and one file
in each announced again: the re-poll line then says `announced=<dirs>`.

ION runs in a child process per scheme (so that its peak RSS is its own): a container on
memory:// with one transfer service, the poll (`interval` one day: the passes are asked for)
announcing to `xs_bench`, and a subscriber on that exchange that counts and acks every
notice. The first pass is timed from its start until the subscriber has every notice (each
one confirmed by the broker and its file recorded in the poll's seen-set); the re-poll from
its start to its end (nothing is announced). Prints one line per system, scheme and pass:

    poll system=ion scheme=file n=1000000 dirs=1000 pass=first seconds=...
        entries_per_s=... cpu_us_per_entry=... peak_rss_mb=... announced=1000000
    poll system=ion scheme=file n=1000000 dirs=1000 pass=repoll seconds=...
        entries_per_s=... cpu_us_per_entry=... peak_rss_mb=... unchanged=1000000 announced=0

cpu_us_per_entry is the child's CPU time over the pass (all its threads: the poll, the
transfer service, the broker, the subscriber; not the index server's) per file, a figure a
busy machine skews less than entries/s. peak_rss_mb is the child's VmHWM after that pass. With ION_ROOT=<checkout> in the environment
the child runs that checkout's ION (system=ion@<checkout>), for a before/after comparison in
one run.

sr3's poll is not run: it gathers the notices of a whole pass in one list in memory before
posting any (flowcb/poll: poll_directory extends one list over the tree), so a pass over
1,000,000 files holds a million notices at once, and on the first pass each one is checked
against its duplicate cache and posted to a broker (an AMQP node of its own), which is
bench/pump.py's and bench/consume.py's comparison to make, not this one's.
"""

import argparse
import cProfile
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.environ.get("ION_ROOT", ROOT))

EXCHANGE = "xs_bench"
STALL = 30.0  # seconds without progress before the bench gives up
MTIME = 1764979200  # 2025-12-06 00:00 UTC: the generated pages' date for every file

# The index server: prints its port, then serves generated nginx-style pages until killed.
HTTP_SERVER = """
import sys, time
from twisted.internet import reactor
from twisted.web import resource, server

n, dirs = int(sys.argv[1]), int(sys.argv[2])
stamp = time.strftime("%d-%b-%Y %H:%M", time.gmtime(int(sys.argv[3])))

def page(title, rows):
    head = f"<html>\\n<head><title>Index of {title}</title></head>\\n<body>\\n"
    head += f'<h1>Index of {title}</h1><hr><pre><a href="../">../</a>\\n'
    return (head + "".join(rows) + "</pre><hr></body>\\n</html>\\n").encode()

touched = time.strftime("%d-%b-%Y %H:%M", time.gmtime(int(sys.argv[3]) + 60))
state = {"touched": False}

def row(name, size, when=stamp):
    return f'<a href="{name}">{name}</a>{" " * (51 - len(name))}{when} {size:>19}\\n'

class Index(resource.Resource):
    isLeaf = True
    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/html")
        path = request.path.decode()
        if path == "/_touch":
            state["touched"] = True
            return b"touched"
        if path == "/":
            return page("/", [row(f"d{d:04d}/", "-") for d in range(dirs)])
        name = path.strip("/")
        if not name.startswith("d") or not name[1:].isdigit() or int(name[1:]) >= dirs:
            request.setResponseCode(404)
            return b"no such directory"
        d = int(name[1:])
        rows = [row(f"f{i:07d}.dat", 0) for i in range(d, n, dirs)]
        if state["touched"]:
            rows[0] = row(f"f{d:07d}.dat", 0, touched)
        return page(path, rows)

site = server.Site(Index())
site.log = lambda request: None
port = reactor.listenTCP(0, site, interface="127.0.0.1")
print(port.getHost().port, flush=True)
reactor.run()
"""


def make_tree(root, n, dirs):
    """n empty files over dirs directories under root (kept; done once)."""
    done = root + ".complete"  # beside the tree: the poll would announce it
    if os.path.exists(done):
        with open(done) as f:
            made = f.read().split()
        if made != [str(n), str(dirs)]:
            raise SystemExit(f"poll bench: {root} holds {' files in '.join(made)} directories, "
                             f"not {n} in {dirs}: use another --tree")
        return
    shutil.rmtree(root, ignore_errors=True)
    started = time.perf_counter()
    for d in range(dirs):
        directory = os.path.join(root, f"d{d:04d}")
        os.makedirs(directory)
        for i in range(d, n, dirs):
            os.mknod(os.path.join(directory, f"f{i:07d}.dat"), 0o644)
    with open(done, "w") as f:
        f.write(f"{n} {dirs}\n")
    print(f"poll bench: made {n} files in {dirs} directories under {root} in "
          f"{time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)


def peak_rss_mb(pid="self"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# -- the ION child ---------------------------------------------------------------------------


def run_ion_child(args):
    """In the child: poll args.url twice, print a JSON line per pass."""
    from twisted.internet import defer, task

    from ion.apps.pump.poll import PollService
    from ion.apps.pump.transfer_service import TransferService
    from ion.core.cc import heap
    from ion.core.cc.container import Container, make_transport
    from ion.core.cc.testing import test_config
    from ion.core.process import Process

    class Sink(Process):
        """Counts and acks every notice."""

        def on_init(self):
            self.received = 0

        def take(self, delivery):
            self.received += 1
            delivery.ack()

    async def wait(reactor, done, what):
        last, since = None, time.monotonic()
        while not done():
            await task.deferLater(reactor, 0.005, lambda: None)
            now = what()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since > STALL:
                raise SystemExit(f"poll bench: no progress for {STALL:.0f} s: {now}")

    async def touch(reactor, url):
        """Another mtime for the first file of every directory (--touch)."""
        if url.startswith("file://"):
            root = url[len("file://"):]
            for directory in sorted(os.listdir(root)):
                first = os.path.join(root, directory, f"f{int(directory[1:]):07d}.dat")
                mtime = os.stat(first).st_mtime + 1
                os.utime(first, (mtime, mtime))
            return
        from twisted.internet import threads

        with await threads.deferToThread(urllib.request.urlopen, url + "_touch") as reply:
            reply.read()

    async def run(reactor):
        container = Container(test_config(), reactor, make_transport("memory://", reactor),
                              sysname="bench")
        await container.start()
        state = tempfile.mkdtemp(prefix="ion-bench-poll-")
        profile = cProfile.Profile() if args.profile else None
        try:
            await container.spawn(TransferService)
            sink = await container.spawn(Sink)
            await sink.subscribe(EXCHANGE, ["v03.#"], sink.take, queue="q_bench.sink",
                                 prefetch=1000)
            poll = await container.spawn(PollService, args={
                "name": "bench", "url": args.url, "exchange": EXCHANGE, "state_dir": state,
                "interval": 86400,
            })
            heap.settle()  # as a booted container does
            if profile is not None:
                profile.enable()
            start, cpu = time.perf_counter(), time.process_time()
            await poll.poll_now()
            await wait(reactor, lambda: sink.received >= args.n,
                       lambda: (sink.received, dict(poll.stats), poll.last_failures.as_list()))
            seconds = time.perf_counter() - start
            if profile is not None:
                profile.disable()
                profile.dump_stats(f"{args.profile}.first")
                profile = cProfile.Profile()
                profile.enable()
            print(json.dumps({"pass": "first", "seconds": seconds, "rss": peak_rss_mb(),
                              "cpu": time.process_time() - cpu,
                              "announced": poll.last_pass["announced"],
                              "received": sink.received}), flush=True)
            if args.touch:
                await touch(reactor, args.url)
            start, cpu = time.perf_counter(), time.process_time()
            await poll.poll_now()
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
            if profile is not None:
                profile.disable()
                profile.dump_stats(f"{args.profile}.repoll")
            print(json.dumps({"pass": "repoll", "seconds": seconds, "rss": peak_rss_mb(),
                              "cpu": cpu,
                              "unchanged": poll.last_pass["unchanged"],
                              "announced": poll.last_pass["announced"]}), flush=True)
        finally:
            await container.stop()
            shutil.rmtree(state, ignore_errors=True)

    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))


def ion(args, scheme, url):
    command = [sys.executable, os.path.abspath(__file__), "--child", url, "-n", str(args.n)]
    # ION_ROOT: another checkout's code in the child (a before/after comparison).
    root = os.environ.get("ION_ROOT", ROOT)
    if args.profile:
        command += ["--profile", f"{args.profile}.{scheme}"]
    if args.touch:
        command.append("--touch")
    child = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=dict(
        os.environ, PYTHONPATH=root))
    if child.returncode != 0:
        raise SystemExit(f"poll bench: the ION child failed ({child.returncode})")
    for line in child.stdout.splitlines():
        result = json.loads(line)
        extra = (f"announced={result['announced']}" if result["pass"] == "first"
                 else f"unchanged={result['unchanged']} announced={result['announced']}")
        system = "ion" if root == ROOT else f"ion@{root}"
        print(f"poll system={system} scheme={scheme} n={args.n} dirs={args.dirs} "
              f"pass={result['pass']} seconds={result['seconds']:.2f} "
              f"entries_per_s={args.n / result['seconds']:.0f} "
              f"cpu_us_per_entry={result['cpu'] / args.n * 1e6:.1f} "
              f"peak_rss_mb={result['rss']:.0f} {extra}", flush=True)


def start_index_server(args):
    server = subprocess.Popen(
        [sys.executable, "-c", HTTP_SERVER, str(args.n), str(args.dirs), str(MTIME)],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, start_new_session=True,
    )
    line = server.stdout.readline()
    if not line.strip().isdigit():
        server.kill()
        raise SystemExit(f"poll bench: the index server did not start (said {line!r})")
    return server, f"http://127.0.0.1:{int(line)}/"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1_000_000, help="files (default 1,000,000)")
    parser.add_argument("--dirs", type=int, default=1000, help="directories (default 1000)")
    parser.add_argument("--tree", help="where the tree is (made if missing)")
    parser.add_argument("--schemes", default="file,http", help="file,http (default both)")
    parser.add_argument("--profile", metavar="FILE",
                        help="cProfile each ION child's passes to FILE.<scheme>.<pass>")
    parser.add_argument("--touch", action="store_true",
                        help="change one file in every directory before the re-poll")
    parser.add_argument("--child", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.url = args.child
        return run_ion_child(args)
    schemes = [s for s in args.schemes.split(",") if s]
    if not set(schemes) <= {"file", "http"} or not schemes:
        parser.error("--schemes takes file and/or http")
    if args.n < args.dirs or args.dirs < 1:
        parser.error("-n must be at least --dirs, and --dirs at least 1")
    tree = args.tree or os.path.join(tempfile.gettempdir(),
                                     f"ion-bench-poll-{args.n}x{args.dirs}")
    if "file" in schemes:
        make_tree(tree, args.n, args.dirs)
    load = os.getloadavg()[0]
    print(f"poll bench: load average {load:.2f} at the start", file=sys.stderr, flush=True)
    for scheme in schemes:
        if scheme == "file":
            ion(args, scheme, f"file://{tree}/")
            continue
        server, url = start_index_server(args)
        try:
            ion(args, scheme, url)
        finally:
            server.kill()
            server.wait()


if __name__ == "__main__":
    main()
