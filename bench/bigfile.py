"""Big-file benchmark: one large file over loopback HTTP, fetched by ION in one stream and in
4 parallel blocks, by curl, and by sr3's downloader, in the same run; MB/s, CPU seconds and
peak RSS of each.

    venv/bin/python bench/bigfile.py                 # a 2 GiB file
    venv/bin/python bench/bigfile.py --size 256M     # smaller (K, M, G suffixes: binary)
    venv/bin/python bench/bigfile.py --no-sr3        # without sr3
    venv/bin/python bench/bigfile.py --repeat 3      # each system 3 times, in turn
    venv/bin/python bench/bigfile.py --no-floor      # without the py-floor baseline

The file (random bytes, written once, its sha512 computed as it is written) is served by
twisted.web (static.File, which serves ranges) in a process of its own, as in
C{bench/pump.py}, so the server's CPU is charged to nobody. Each system runs in a child
process of its own, writing into an empty directory; the file is checked against its sha512
after each run and removed before the next, and the disk synced (C{os.sync}) after the source
is written and between systems, so that no system runs beside another's writeback.

- C{ion-stream}, C{ion-blocks}: a child process runs the transfer library as a consumer does
  (L{ion.apps.pump.transfer.worker.Transfers}, its thread pool and kept-open connections)
  with the notice's size and sha512: ION verifies the checksum (hashing as it receives in one
  stream; reading the file back once at the end in blocks). C{ion-blocks}: block_threshold 1,
  block_parallel 4, the default block size (16 blocks of at least 8 MiB).
- C{curl}: C{curl -s -o <file> <url>}; curl verifies nothing, and its file may still be in
  the page cache only when it exits.
- C{curl-sync}: the same, then C{sync -d <file>} (fdatasync): the file as durable as ION
  leaves it (ION fdatasyncs as it receives and before the rename), timed to the sync's end.
- C{py-floor} (unless C{--no-floor}): the least a Python process verifying one stream does
  (see C{FLOOR_CHILD}): a plain socket read into reused page-aligned slabs, one thread
  hashing them (sha512, checked at the end), one writing them with O_DIRECT, fdatasync and
  rename; no Twisted, no limits, no checks along the way. What it reaches against curl
  bounds what any reworking of ION's receiving could reach on this machine.
- C{sr3}: a child process in sr3's venv (C{var/bench/sr3venv}, see C{bench/pump.py}) fetching
  with C{sarracenia.transfer.https.Https}, the class sr3 subscribe downloads http with (its
  C{get} into the local file), without a broker; sr3 verifies nothing on this path.

Times: ION and sr3 children time their own transfer (imports and start-up excluded); curl is
timed from spawn to exit. CPU is the child's user + system seconds (C{RUSAGE_CHILDREN} before
and after), peak RSS its C{VmHWM} (sampled every 20 ms while it runs). One line per system:

    bigfile system=curl size_mb=2048 mb_per_s=... cpu_s=... peak_rss_mb=... verified=yes

then one ratio line: ION's stream against curl (target >= 0.8) and against curl-sync, and
ION's best against sr3.
With C{--repeat N} the systems run in turn N times (a busy machine moves every figure: compare
figures of one round), each line and ratio line carrying C{round=}, then a budget line of
the median of each figure and a line of the median ratios. Each round starts one system
later than the one before (round 2 with the second system, and so on): the system that ran
just before moves a figure (sr3, the same code on the same file, measured 290 to 970 MB/s
and 0.65 to 3.2 CPU s by its place in the order), so use 6 rounds or more, one per system,
and quote the medians.

After each round's ratio line, a budget line says where one stream's CPU goes and why it
cannot go faster: the CPU seconds per GiB of ION's transfer (its own count, imports
excluded: the reactor thread, the sha512 jobs, the writing jobs, the rest: the pool's
hand-offs, syncs and commit), of the twisted.web server while it served ION (read from its
C{/proc} stat), of py-floor and curl and the server's for each;
then two ceilings of one stream on this machine: the MB/s at which ION and the server
together would keep all the cores busy, and the MB/s of the one thread hashing at the speed
it hashed; the target (0.8x curl) as a share of the lower one (over 100%: out of reach
whatever the scheduling; close to it, only with every core busy all the time), and
py-floor's MB/s against curl's. A round on a busy 2-core machine (one line):

    bigfile budget cpu_s_per_gib: ion-stream=2.27 (reactor=0.45 sha512=1.48 writes=0.24
        rest=0.10) server=0.88 | py-floor=1.62 server=0.68 | curl=1.32 server=0.94;
        one-stream ceiling mb_per_s: 2_cores=649 sha512_thread=693; target 0.8x curl=516
        (79% of the lower ceiling); py-floor/curl mb_per_s=0.54

Before them, the ceiling of verification on this machine: C{sha512} hashed in memory by one
thread (MB/s of its CPU time). ION hashes what it receives in one thread beside the writes, so
one stream cannot go faster than that, whatever the network; the machine's load average
(before and after) is printed too.
"""

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.pump import (  # noqa: E402  (child processes, /proc figures, sr3's venv)
    SR3_VENV,
    BenchError,
    Children,
    cpu_seconds,
    peak_rss_mb,
    start_http_server,
)

# The share of curl's MB/s that ION's one stream is to reach.
TARGET = 0.8

CHUNK = 8 * 1024 * 1024

# Fetches argv[1] into argv[2] with ION's transfers; prints {"seconds": s}.
ION_CHILD = """
import json, os, resource, sys, threading, time
from twisted.internet import defer, task
from ion.apps.pump.transfer.blocks import BlockSettings
from ion.apps.pump.transfer.inflight import InflightFile
from ion.apps.pump.transfer.worker import Transfers

# The CPU time of the hashing and of the writing jobs of the files received (the lock for
# parallel blocks').
spent = {"_hash": 0.0, "_write": 0.0}
spent_lock = threading.Lock()

def timed(name):
    work = getattr(InflightFile, name)

    def timed_work(self, chunks):
        started = time.thread_time()
        try:
            return work(self, chunks)
        finally:
            with spent_lock:
                spent[name] += time.thread_time() - started

    setattr(InflightFile, name, timed_work)

timed("_hash")
timed("_write")

profile = os.environ.get("ION_BENCH_PROFILE")
if profile:
    import cProfile, pstats
    profiler = cProfile.Profile()

async def main(reactor):
    url, dest, size, sha512, blocks = sys.argv[1:6]
    transfers = Transfers(reactor, {"max_size": None, "min_rate": 0,
                                    "timeouts": {"connect": 10, "idle": 120}})
    settings = BlockSettings(threshold=1, parallel=4) if blocks == "1" else None
    started = time.monotonic()
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    reactor_cpu = time.thread_time()
    if profile:
        profiler.enable()
    result = await transfers.get(url, dest, expected_size=int(size),
                                 expected_checksum=("sha512", sha512), blocks=settings)
    seconds = time.monotonic() - started
    reactor_cpu = time.thread_time() - reactor_cpu
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime + after.ru_stime) - (cpu.ru_utime + cpu.ru_stime)
    if profile:
        profiler.disable()
        with open(profile, "w") as out:
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(30)
    await transfers.close()
    print(json.dumps({"seconds": seconds, "blocks": result.blocks, "transfer_cpu": cpu,
                      "reactor_cpu": reactor_cpu, "hash_cpu": spent["_hash"],
                      "write_cpu": spent["_write"]}), flush=True)

task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor)))
"""

# The floor: what a process of this Python gets out of the same GET when it does only what
# one verified stream must (no Twisted, no checks, no pauses): fetches argv[1] (host),
# argv[2] (port), argv[3] (path) into argv[4], argv[5] bytes whose sha512 is argv[6], as
# ION does: the socket read into page-aligned slabs, one thread hashing them and one
# writing them with O_DIRECT, then fdatasync and rename. Prints what ION's child does.
FLOOR_CHILD = """
import base64, fcntl, hashlib, json, mmap, os, queue, resource, socket, sys, threading, time

host, port, path, dest, size, sha512 = sys.argv[1:7]
size, port = int(size), int(port)
SLAB = 4 * 1024 * 1024
started = time.monotonic()
cpu = resource.getrusage(resource.RUSAGE_SELF)
reactor_cpu = time.thread_time()
sock = socket.create_connection((host, port))
sock.sendall(b"GET %s HTTP/1.1\\r\\nHost: %s\\r\\nAccept-Encoding: identity\\r\\n\\r\\n"
             % (path.encode(), host.encode()))
head = b""
while b"\\r\\n\\r\\n" not in head:
    head += sock.recv(65536)
head, body = head.split(b"\\r\\n\\r\\n", 1)
assert head.split()[1] == b"200", head[:80]
temp = dest + ".floor"
fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o644)
slabs = queue.Queue()
for _ in range(3):
    slabs.put(mmap.mmap(-1, SLAB))
hashes, writes = queue.Queue(), queue.Queue()
hasher = hashlib.sha512()
users = {}
lock = threading.Lock()

def done(slab):
    with lock:
        users[id(slab)] -= 1
        if not users[id(slab)]:
            slabs.put(slab)

def hash_slabs():
    while (item := hashes.get()) is not None:
        with memoryview(item[0]) as view:
            hasher.update(view[:item[1]])
        done(item[0])

def write_slabs():
    offset = 0
    while (item := writes.get()) is not None:
        slab, n = item
        if n % 4096:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        with memoryview(slab) as view:
            offset += os.pwrite(fd, view[:n], offset)
        done(slab)

threads = [threading.Thread(target=hash_slabs), threading.Thread(target=write_slabs)]
for thread in threads:
    thread.start()
got = 0
while got < size:
    slab = slabs.get()
    with memoryview(slab) as view:
        fill = len(body)
        view[:fill] = body
        body = b""
        while fill < SLAB and got + fill < size:
            n = sock.recv_into(view[fill:], min(SLAB - fill, size - got - fill))
            if not n:
                sys.exit("connection lost")
            fill += n
    got += fill
    with lock:
        users[id(slab)] = 2
    hashes.put((slab, fill))
    writes.put((slab, fill))
hashes.put(None)
writes.put(None)
for thread in threads:
    thread.join()
sock.close()
if base64.b64encode(hasher.digest()).decode() != sha512:
    sys.exit("checksum mismatch")
os.fdatasync(fd)
os.close(fd)
os.rename(temp, dest)
directory = os.open(os.path.dirname(dest), os.O_RDONLY)
os.fsync(directory)
os.close(directory)
seconds = time.monotonic() - started
reactor_cpu = time.thread_time() - reactor_cpu
after = resource.getrusage(resource.RUSAGE_SELF)
cpu = (after.ru_utime + after.ru_stime) - (cpu.ru_utime + cpu.ru_stime)
print(json.dumps({"seconds": seconds, "transfer_cpu": cpu, "reactor_cpu": reactor_cpu}),
      flush=True)
"""

# Fetches argv[1] (base URL) + argv[2] (name) into argv[3] with sr3's http downloader.
SR3_CHILD = """
import json, sys, time
import sarracenia.config
from sarracenia.transfer.https import Https

base, name, dest, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
options = sarracenia.config.default_config()
options.sendTo = base
transfer = Https("http", options)
transfer.connect()
transfer.cd("d")
started = time.monotonic()
got = transfer.get({"baseUrl": base, "relPath": name, "size": size}, name, dest, 0, 0, size)
seconds = time.monotonic() - started
transfer.close()
print(json.dumps({"seconds": seconds, "bytes": got}), flush=True)
"""


def hash_ceiling(size=256 * 1024 * 1024):
    """MB/s of sha512 over C{size} bytes in memory, by this thread's CPU time."""
    data = os.urandom(CHUNK)
    hasher = hashlib.sha512()
    started = time.thread_time()
    for _ in range(size // CHUNK):
        hasher.update(data)
    return size / 1024**2 / (time.thread_time() - started)


def budget(size, results, costs):
    """The CPU budget of one stream in this round (CPU s per GiB; MB/s), by name: ION's
    transfer (its reactor thread, the sha512 jobs, the writing jobs, the rest: the pool's
    hand-offs, syncs and commit) and the server's while it served it, then the fastest one
    stream could go with all the machine's cores to the two of them, and that its one
    hashing thread allows at the speed it hashed, the target of L{TARGET} times curl's
    MB/s; the same CPU figures of C{py-floor} and curl, and how close to curl C{py-floor}
    came."""
    gib = size / 1024**3

    def cpu(name):
        total, served, printed = costs[name]
        return printed.get("transfer_cpu", total) / gib, served / gib, printed

    ion, server, printed = cpu("ion-stream")
    figures = {
        "ion": ion,
        "reactor": printed["reactor_cpu"] / gib,
        "sha512": printed["hash_cpu"] / gib,
        "writes": printed["write_cpu"] / gib,
        "server": server,
    }
    for name in ("py-floor", "curl"):
        if name in costs:
            figures[name], figures[name + " server"], _ = cpu(name)
    figures["cpu_bound"] = len(os.sched_getaffinity(0)) / (ion + server) * 1024
    figures["hash_bound"] = 1024 / figures["sha512"]
    figures["target"] = TARGET * results["curl"][0]
    if "py-floor" in results:
        figures["floor/curl"] = results["py-floor"][0] / results["curl"][0]
    return figures


def budget_line(tag, figures):
    """The budget line of L{budget}'s C{figures}."""
    f = figures
    line = (
        f"bigfile budget{tag} cpu_s_per_gib: ion-stream={f['ion']:.2f} (reactor="
        f"{f['reactor']:.2f} sha512={f['sha512']:.2f} writes={f['writes']:.2f} rest="
        f"{f['ion'] - f['reactor'] - f['sha512'] - f['writes']:.2f}) server={f['server']:.2f}"
    )
    for name in ("py-floor", "curl"):
        if name in f:
            line += f" | {name}={f[name]:.2f} server={f[name + ' server']:.2f}"
    lower = min(f["cpu_bound"], f["hash_bound"])
    line += (
        f"; one-stream ceiling mb_per_s: {len(os.sched_getaffinity(0))}_cores="
        f"{f['cpu_bound']:.0f} sha512_thread={f['hash_bound']:.0f}; target {TARGET}x curl="
        f"{f['target']:.0f} ({f['target'] / lower:.0%} of the lower ceiling)"
    )
    if "floor/curl" in f:
        line += f"; py-floor/curl mb_per_s={f['floor/curl']:.2f}"
    return line


def load():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def parse_size(text):
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    if text[-1:].upper() in units:
        return int(float(text[:-1]) * units[text[-1].upper()])
    return int(text)


def make_file(path, size):
    """Write C{size} random-looking bytes to C{path}; their sha512 (base64)."""
    import base64

    hasher = hashlib.sha512()
    seed = os.urandom(CHUNK)
    with open(path, "wb") as f:
        written = 0
        n = 0
        while written < size:
            # A different block each time (no two blocks alike), cheaply.
            chunk = (n.to_bytes(8, "big") + seed[8:])[: size - written]
            f.write(chunk)
            hasher.update(chunk)
            written += len(chunk)
            n += 1
    return base64.b64encode(hasher.digest()).decode()


def sha512_of(path):
    import base64

    hasher = hashlib.sha512()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)
    return base64.b64encode(hasher.digest()).decode()


def run_child(cmd, env=None, timed_by_child=True):
    """Run C{cmd}; (seconds, cpu seconds, peak RSS MiB, what it printed)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            stdin=subprocess.DEVNULL)
    # VmHWM of the process after exec: wait4's ru_maxrss would count the memory of this
    # script, which the child was forked from.
    peak = [0.0]

    def watch():
        while proc.poll() is None:
            try:
                peak[0] = max(peak[0], peak_rss_mb(proc.pid))
            except Exception:
                pass
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out, err = proc.communicate()
    watcher.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the child is reaped: counted
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-5:]
        raise BenchError(f"{cmd[0]} exited {proc.returncode}: {' | '.join(tail)}")
    printed = {}
    if timed_by_child:
        printed = json.loads(out.decode().strip().splitlines()[-1])
    seconds = printed.get("seconds", wall)
    return seconds, cpu, peak[0], printed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="2G", help="file size (default 2G)")
    parser.add_argument("--no-sr3", action="store_true", help="leave sr3 out")
    parser.add_argument("--no-floor", action="store_true", help="leave py-floor out")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of every system")
    parser.add_argument("--profile", metavar="FILE",
                        help="profile ION's reactor thread (cProfile) into FILE.stream and "
                        "FILE.blocks (slower: compare figures of unprofiled runs only)")
    args = parser.parse_args(argv)
    size = parse_size(args.size)
    children = Children()
    work = tempfile.mkdtemp(prefix="ion-bench-bigfile-")
    if not args.keep:
        children.cleanups.append(lambda: shutil.rmtree(work, ignore_errors=True))
    results = {}
    try:
        source = os.path.join(work, "source")
        dest_dir = os.path.join(work, "dest")
        os.makedirs(os.path.join(source, "d"))
        os.makedirs(dest_dir)
        checksum = make_file(os.path.join(source, "d", "big.bin"), size)
        os.sync()  # the source's writeback is not left to run during the first systems
        server, port = start_http_server(children, source)
        base = f"http://127.0.0.1:{port}"
        url = f"{base}/d/big.bin"
        dest = os.path.join(dest_dir, "big.bin")
        env = dict(os.environ, PYTHONPATH=ROOT)

        def ion_env(kind):
            if args.profile is None:
                return env
            return dict(env, ION_BENCH_PROFILE=f"{args.profile}.{kind}")

        systems = [
            ("curl", ["curl", "-s", "-o", dest, url], None, False),
            # As durable as ION leaves a file: its data on disk (fdatasync) before it counts.
            ("curl-sync", ["sh", "-c", 'curl -s -o "$0" "$1" && sync -d "$0"', dest, url],
             None, False),
            ("ion-stream", [sys.executable, "-c", ION_CHILD, url, dest, str(size), checksum, "0"],
             ion_env("stream"), True),
            ("ion-blocks", [sys.executable, "-c", ION_CHILD, url, dest, str(size), checksum, "1"],
             ion_env("blocks"), True),
        ]
        if not args.no_floor:
            systems.append(("py-floor", [sys.executable, "-c", FLOOR_CHILD, "127.0.0.1",
                                         str(port), "/d/big.bin", dest, str(size), checksum],
                            None, True))
        sr3_python = os.path.join(SR3_VENV, "bin", "python")
        if not args.no_sr3:
            if not os.path.exists(sr3_python):
                raise BenchError(f"no sr3 venv at {SR3_VENV} (bench/pump.py --vs-sr3 makes it)")
            sr3_env = dict(os.environ)
            sr3_env.pop("PYTHONPATH", None)
            systems.append(("sr3", [sr3_python, "-c", SR3_CHILD, base, "big.bin", dest,
                                    str(size)], sr3_env, True))
        print(f"bigfile ceiling sha512 mb_per_s={hash_ceiling():.1f} (one thread, in memory) "
              f"load={load()}", flush=True)
        ratios = []
        costs = {}
        budgets = []
        for round_ in range(1, args.repeat + 1):
            tag = f" round={round_}" if args.repeat > 1 else ""
            # Each round starts one system later: what runs just before a system moves its
            # figures (sr3's MB/s ranged 330-970 by its place), so rounds vary the order.
            shift = (round_ - 1) % len(systems)
            for name, cmd, child_env, timed in systems[shift:] + systems[:shift]:
                served = cpu_seconds(server.pid)
                seconds, cpu, rss, printed = run_child(cmd, child_env, timed)
                costs[name] = (cpu, cpu_seconds(server.pid) - served, printed)
                verified = os.path.exists(dest) and os.path.getsize(dest) == size \
                    and sha512_of(dest) == checksum
                results[name] = (size / 1024**2 / seconds, cpu, rss)
                print(
                    f"bigfile system={name}{tag} size_mb={size / 1024**2:.0f} "
                    f"mb_per_s={size / 1024**2 / seconds:.1f} cpu_s={cpu:.2f} "
                    f"peak_rss_mb={rss:.1f} verified={'yes' if verified else 'NO'}",
                    flush=True,
                )
                for leftover in os.listdir(dest_dir):
                    os.remove(os.path.join(dest_dir, leftover))
                os.sync()  # nor one system's writeback during the next
            ion_best = max(results["ion-stream"][0], results["ion-blocks"][0])
            ratio = (results["ion-stream"][0] / results["curl"][0],
                     ion_best / results["sr3"][0] if "sr3" in results else None,
                     results["ion-stream"][0] / results["curl-sync"][0])
            ratios.append(ratio)
            line = f"bigfile ratio{tag} ion-stream/curl mb_per_s={ratio[0]:.2f}"
            line += f" ion-stream/curl-sync mb_per_s={ratio[2]:.2f}"
            if ratio[1] is not None:
                line += f" ion-best/sr3 mb_per_s={ratio[1]:.2f}"
            print(line, flush=True)
            budgets.append(budget(size, results, costs))
            print(budget_line(tag, budgets[-1]), flush=True)
        if args.repeat > 1:
            medians = {key: statistics.median(b[key] for b in budgets) for key in budgets[0]}
            print(budget_line(" median", medians), flush=True)
            line = "bigfile ratio median ion-stream/curl mb_per_s="
            line += f"{statistics.median(r[0] for r in ratios):.2f}"
            line += f" ion-stream/curl-sync mb_per_s={statistics.median(r[2] for r in ratios):.2f}"
            if ratios[0][1] is not None:
                line += f" ion-best/sr3 mb_per_s={statistics.median(r[1] for r in ratios):.2f}"
            print(line, flush=True)
        print(f"bigfile load after={load()}", flush=True)
    except BenchError as e:
        print(f"bigfile bench: {e}", file=sys.stderr)
        return 1
    finally:
        children.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
