"""Watch benchmark: announce rate, CPU seconds per file and peak RSS of an ION watch announcing
files as a writer creates them, and of `sr3 watch` on the same workload and broker.

    venv/bin/python bench/watch.py                 # ION, then sr3, and the ratio
    venv/bin/python bench/watch.py --only ion -n 2000
    venv/bin/python bench/watch.py --only ion --profile watch.prof   # cProfile the container

The workload: a writer process (started when the clock starts) creates `-n` files of `--size`
random bytes over `--dirs` directories of a watched tree, as fast as it can. Each system
watches a tree of its own and publishes its notices to an exchange of its own on one private
RabbitMQ node; this script counts the notices (pika, a queue bound with `#`) until every file
has been announced. Before the clock starts, a probe file must be announced (the watch is up).

- ION: `twistd -n cc` runs the pump app with one watch (coalesce 1 s, its default) and nothing
  else to do (no polls, no subscriptions; the ingest does not read the watch's exchange);
- sr3: `sr3 start watch/bench` from the venv of bench/pump.py (var/bench/sr3venv), HOME in the
  temp dir; sum sha512 (sr3's default), logLevel warning.

The rate is files / (last notice - writer start); `writer_files_per_s` is how fast the writer
wrote them, the most a watch can announce (plus its coalescing delay: 1 s for ION). The trees
are made under $TMPDIR: on a disk-backed /tmp the writer itself made only 2,500-16,000 files/s
on the project's 2-core machine, which then capped the figure, so compare with
`TMPDIR=/dev/shm` (tmpfs: about 50,000 files/s there, the watch's own rate shows). CPU is
utime+stime of the container or of the sr3 instances over the same interval; peak RSS is
their VmHWM. One line per system, then:

    watch ratio ion/sr3 files_per_s=... cpu_s_per_file=... peak_rss_mb=...
"""

import argparse
import atexit
import glob
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import pump as bench  # noqa: E402  (child processes, /proc figures, sr3's venv)

EXCHANGES = {"ion": "xwatch_ion", "sr3": "xwatch_sr3"}
PROBE = "probe.dat"
WRITER = """
import os, sys
root, n, size, dirs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
data = os.urandom(size)
for d in range(dirs):
    os.makedirs(os.path.join(root, "d%02d" % d), exist_ok=True)
for i in range(n):
    with open(os.path.join(root, "d%02d" % (i % dirs), "f%06d.dat" % i), "wb") as f:
        f.write(data)
"""


class Counter:
    """Counts the distinct relPaths announced on an exchange, in a thread of its own."""

    def __init__(self, url, exchange):
        pika = bench._pika()
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        channel = self.connection.channel()
        channel.exchange_declare(exchange, "topic", durable=True)
        queue = channel.queue_declare("", exclusive=True).method.queue
        channel.queue_bind(queue, exchange, "#")
        channel.basic_consume(queue, self._take, auto_ack=True)
        self.channel = channel
        self.seen = set()
        self.last = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _take(self, channel, method, properties, body):
        self.seen.add(json.loads(body)["relPath"])
        self.last = time.time()

    def _run(self):
        try:
            self.channel.start_consuming()
        except Exception:
            pass

    def wait(self, wanted, timeout, alive):
        deadline = time.monotonic() + timeout
        while not wanted(self.seen):
            if time.monotonic() > deadline or not alive():
                return False
            time.sleep(0.02)
        return True

    def close(self):
        self.connection.add_callback_threadsafe(self.channel.stop_consuming)
        self.thread.join(5)


def measure(system, args, children, broker, tree, pids, alive):
    counter = Counter(broker.url, EXCHANGES[system])
    try:
        with open(os.path.join(tree, PROBE), "wb") as f:
            f.write(b"probe")
        if not counter.wait(lambda s: any(p.endswith(PROBE) for p in s), 120, alive):
            raise bench.BenchError(f"{system}: the probe file was never announced")
        counter.seen.clear()
        cpu_before = sum(bench.cpu_seconds(p) for p in pids())
        began = time.time()
        writer = children.start(
            [sys.executable, "-c", WRITER, tree, str(args.n), str(args.size), str(args.dirs)]
        )
        writer.wait()
        written = time.time() - began
        done = counter.wait(lambda s: len(s) >= args.n, args.timeout, alive)
        cpu = sum(bench.cpu_seconds(p) for p in pids()) - cpu_before
        rss = sum(bench.peak_rss_mb(p) for p in pids())
        seconds = counter.last - began if done else None
    finally:
        counter.close()
    rate = args.n / seconds if seconds else 0.0
    state = "" if done else f" incomplete={len(counter.seen)}/{args.n}"
    print(
        f"watch system={system} n={args.n} files_per_s={rate:.1f} "
        f"cpu_s_per_file={cpu / args.n:.5f} peak_rss_mb={rss:.1f} "
        f"writer_files_per_s={args.n / written:.1f}{state}",
        flush=True,
    )
    return rate, cpu / args.n, rss


def run_ion(args, children, broker, work):
    tree = os.path.join(work, "ion", "tree")
    os.makedirs(tree)
    app = {
        "type": "application", "name": "pump", "description": "watch bench", "version": "0.1",
        "mod": ("ion.apps.pump.app", [], {
            "polls": [], "subscriptions": [], "transfer": {"workers": 1},
            "watches": [{"name": "bench", "path": tree, "exchange": EXCHANGES["ion"]}],
        }),
        "applications": ["ioncore"], "registered": [],
    }
    app_file = os.path.join(work, "ion", "watch.app")
    bench.write_literal(app_file, app)
    profile = ["--profile", args.profile, "--savestats"] if args.profile else []
    proc = children.start(
        [*bench.TWISTD, "--pidfile=", *profile, "-n", "cc", "--no-shell", "--broker", broker.url,
         app_file],
        cwd=os.path.join(work, "ion"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONPATH=bench.ROOT),
    )
    try:
        return measure(
            "ion", args, children, broker, tree, lambda: [proc.pid], lambda: proc.poll() is None
        )
    finally:
        children.stop(proc)


def run_sr3(args, children, broker, work):
    sr3 = bench.sr3_command()
    home = os.path.join(work, "sr3", "home")
    tree = os.path.join(work, "sr3", "tree")
    os.makedirs(tree)
    config_dir = os.path.join(home, ".config", "sr3")
    os.makedirs(os.path.join(config_dir, "watch"))
    credentials = os.path.join(config_dir, "credentials.conf")
    with open(credentials, "w") as f:
        f.write(f"amqp://guest:guest@{broker.host}:{broker.port}/\n")
    os.chmod(credentials, 0o600)
    with open(os.path.join(config_dir, "watch", "bench.conf"), "w") as f:
        f.write(
            f"post_broker amqp://guest@{broker.host}:{broker.port}/\n"
            f"post_exchange {EXCHANGES['sr3']}\npost_baseUrl file:{tree}/\n"
            f"post_baseDir {tree}\npath {tree}\nlogLevel warning\n"
        )
    env = dict(os.environ, HOME=home, USER=pwd.getpwuid(os.getuid()).pw_name)
    env.pop("VIRTUAL_ENV", None)

    def sr3_run(word):
        subprocess.run([sr3, word, "watch/bench"], env=env, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)

    def pids():
        found = []
        for path in glob.glob(os.path.join(home, ".cache", "sr3", "**", "*.pid"), recursive=True):
            try:
                with open(path) as f:
                    pid = int(f.read().strip())
            except (OSError, ValueError):
                continue
            if os.path.exists(f"/proc/{pid}"):
                found.append(pid)
        return found

    sr3_run("start")
    try:
        deadline = time.monotonic() + 60
        while not pids():
            if time.monotonic() > deadline:
                raise bench.BenchError(f"sr3 watch did not start; see {home}/.cache/sr3")
            time.sleep(0.1)
        return measure("sr3", args, children, broker, tree, pids, lambda: bool(pids()))
    finally:
        sr3_run("stop")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=10000, help="files (default 10000)")
    parser.add_argument("--size", type=int, default=1024, help="bytes per file (default 1024)")
    parser.add_argument("--dirs", type=int, default=10, help="directories (default 10)")
    parser.add_argument("--only", choices=("ion", "sr3"), help="run one system only")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per system")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    parser.add_argument(
        "--profile", metavar="PATH", help="cProfile the ION container (twistd --profile) into PATH"
    )
    args = parser.parse_args(argv)
    if args.profile:
        args.profile = os.path.abspath(args.profile)
    from tests.broker import PrivateBroker, find_rabbitmq_server

    if find_rabbitmq_server() is None:
        print("watch bench: rabbitmq-server not found", file=sys.stderr)
        return 1
    children = bench.Children()
    atexit.register(children.stop_all)
    work = tempfile.mkdtemp(prefix="ion-bench-watch-")
    if not args.keep:
        children.cleanups.append(lambda: shutil.rmtree(work, ignore_errors=True))
    try:
        broker = PrivateBroker()
        children.cleanups.append(broker.cleanup)
        broker.start()
        results = {}
        for system, run in (("ion", run_ion), ("sr3", run_sr3)):
            if args.only in (None, system):
                results[system] = run(args, children, broker, work)
        if len(results) == 2:
            (a, b) = results["ion"], results["sr3"]
            ratio = [f"{x / y:.2f}" if x and y else "nan" for x, y in zip(a, b)]
            print(f"watch ratio ion/sr3 files_per_s={ratio[0]} cpu_s_per_file={ratio[1]} "
                  f"peak_rss_mb={ratio[2]}", flush=True)
    except bench.BenchError as e:
        print(f"watch bench: {e}", file=sys.stderr)
        return 1
    finally:
        children.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
