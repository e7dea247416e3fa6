"""Chaos and soak benchmarks of the whole pump flow (the long versions of
tests/apps/pump/test_chaos.py), on private RabbitMQ nodes this script starts itself.

    venv/bin/python bench/chaos.py                          # 10,000 files, 3 + 3 kills
    venv/bin/python bench/chaos.py --files 2000 --broker-kills 1 --container-kills 1
    venv/bin/python bench/chaos.py --cluster                # 3 nodes, quorum queues
    venv/bin/python bench/chaos.py --soak                   # 30 minutes, RSS every 10 s
    venv/bin/python bench/chaos.py --soak --minutes 6       # a shorter soak

Chaos: the flow of tests/apps/pump/chaos.py (a poll of a `file:` tree -> ingest -> consumer
-> report router, the pump as a `twistd -n cc` child) moves `--files` files while the broker
(on a cluster: the node the pump is connected to) and the pump's container are each killed
with SIGKILL `--broker-kills` and `--container-kills` times, at random numbers of reported
files (`--seed` replays a run), each restarted at once. Then the exact accounting is checked
(every file once, byte-exact; one 201 report per file; no message left ready, unacked or
dead-lettered; no temporary file left) and one line printed:

    chaos files=10000 kills=broker:3,container:3 seconds=... duplicates_suppressed=...
        report_copies=... accounting=ok seed=...

(`accounting=FAILED: <why>` and exit status 1 when a check fails.)

Soak: the same pump, first timed on a burst of `--probe-files` files (its maximum rate), then
fed for `--minutes` at half that rate (a batch of files appears in the polled tree every
second, in a directory of its own; once all of a batch is reported, its directories are
removed from source and destination, so the trees keep a steady size), with `--dup-ttl`
300 s (the caches of keys seen then reach their steady size before the window: with the
default hour they would grow, as designed, through a 30-minute run). The pump's RSS
(VmRSS of the twistd child) is sampled every 10 s; the slope of a least-squares line through
the samples of the last 20 minutes (of the last two thirds of a shorter run) must stay under
1 MB per 10 minutes:

    soak minutes=30 rate_files_per_s=... max_files_per_s=... files=... rss_start_mb=...
        rss_end_mb=... slope_mb_per_10min=... window_min=20.0 samples=... most_behind=...
        load=.../... result=ok

(`result=FAILED` and exit status 1 above the limit, or when a file is not reported;
`most_behind`: the most files fed and not yet reported at once; `load`: the machine's
1-minute load average when the feed started and ended: a machine busier than during the
probe lowers the rate the pump can keep below the one it is fed at.)
"""

import argparse
import os
import random
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from twisted.internet import defer, task  # noqa: E402
from twisted.trial import unittest  # noqa: E402

from tests.apps.pump.chaos import ChaosFlow, random_events  # noqa: E402
from tests.apps.pump.test_restart import make_files, put_files  # noqa: E402

SAMPLE_INTERVAL = 10.0
SLOPE_LIMIT_MB = 1.0  # per 10 minutes
WINDOW_MINUTES = 20.0


class Run(unittest.SynchronousTestCase):
    """What ChaosFlow needs of a test case (temporary directories, cleanups, asserts),
    outside trial: cleanups run at the end of the run, newest first."""

    def __init__(self, base):
        super().__init__("run_nothing")
        self._base = base
        self._count = 0
        self._pending = []

    def run_nothing(self):
        pass

    def mktemp(self):
        self._count += 1
        return os.path.join(self._base, f"run{self._count}")

    def addCleanup(self, function, *args, **kwargs):
        self._pending.append((function, args, kwargs))

    async def clean_up(self):
        while self._pending:
            function, args, kwargs = self._pending.pop()
            try:
                result = function(*args, **kwargs)
                if isinstance(result, defer.Deferred) or hasattr(result, "__await__"):
                    await result
            except Exception as e:  # noqa: BLE001 - a cleanup must not hide the result
                print(f"chaos: cleanup failed: {type(e).__name__}: {e}", file=sys.stderr)


def start_brokers(cluster):
    from tests.broker import PrivateBroker, PrivateCluster, skip_or_fail_without_rabbitmq

    skip_or_fail_without_rabbitmq()
    brokers = PrivateCluster() if cluster else PrivateBroker()
    brokers.start()
    return brokers


async def chaos(reactor, args, run, brokers):
    seed = args.seed if args.seed is not None else random.randrange(1_000_000)
    rng = random.Random(seed)
    flow = ChaosFlow(run, brokers, args.files, seed, f"benchchaos{os.getpid()}")
    await flow.set_up()
    events = random_events(rng, args.files, args.broker_kills, args.container_kills)
    kills = f"broker:{args.broker_kills},container:{args.container_kills}"
    try:
        await flow.run(events, timeout=args.timeout)
        await flow.check()
    except Exception as e:  # noqa: BLE001 - reported as the result
        why = " ".join(str(e).split())[:300]
        print(f"chaos files={args.files} kills={kills} accounting=FAILED: {why} seed={seed}")
        return 1
    seconds = time.monotonic() - flow.started
    print(
        f"chaos files={args.files} kills={kills} seconds={seconds:.1f} "
        f"duplicates_suppressed={flow.duplicates} report_copies={flow.collector.copies} "
        f"accounting=ok seed={seed}"
    )
    return 0


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def slope_per_10_minutes(samples):
    """Least-squares slope of [(seconds, MB)], in MB per 10 minutes."""
    n = len(samples)
    if n < 2:
        return 0.0
    mean_t = sum(t for t, _ in samples) / n
    mean_m = sum(m for _, m in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    if not var:
        return 0.0
    cov = sum((t - mean_t) * (m - mean_m) for t, m in samples)
    return cov / var * 600


def trace_env(directory):
    """The environment that makes the pump child trace its memory into C{directory}
    (C{bench/memtrace/sitecustomize.py})."""
    os.makedirs(directory, exist_ok=True)
    hook = os.path.join(ROOT, "bench", "memtrace")
    return {"ION_MEMTRACE": os.path.abspath(directory), "PYTHONPATH": f"{hook}:{ROOT}"}


def compare(directory, top=25):
    """Print what grew between the first and the last snapshot of a traced soak."""
    import json
    import tracemalloc

    snaps = sorted(f for f in os.listdir(directory) if f.startswith("snap-"))
    if len(snaps) < 2:
        print(f"chaos: fewer than two snapshots in {directory}", file=sys.stderr)
        return 1
    first, last = (os.path.join(directory, snaps[i]) for i in (0, -1))
    old = tracemalloc.Snapshot.load(first)
    new = tracemalloc.Snapshot.load(last)
    print(f"{snaps[0]} -> {snaps[-1]}")
    for kind in ("lineno", "traceback"):
        print(f"-- growth by {kind}")
        for stat in new.compare_to(old, kind)[: top if kind == "lineno" else 8]:
            if stat.size_diff <= 0:
                continue
            print(f"{stat.size_diff / 1024:+10.1f} KiB {stat.count_diff:+8d} blocks  "
                  f"{stat.size / 1024:10.1f} KiB total")
            for line in stat.traceback.format()[-(2 if kind == "lineno" else 16):]:
                print("    " + line)
    types = sorted(f for f in os.listdir(directory) if f.startswith("types-"))
    with open(os.path.join(directory, types[0])) as f:
        before = json.load(f)
    with open(os.path.join(directory, types[-1])) as f:
        after = json.load(f)
    grown = sorted(((after[k] - before.get(k, 0), k) for k in after), reverse=True)
    print("-- live objects by type: " + ", ".join(f"{k} {d:+d}" for d, k in grown[:top] if d > 0))
    return 0


async def soak(reactor, args, run, brokers):
    flow = ChaosFlow(
        run, brokers, args.probe_files, 1, f"benchsoak{os.getpid()}", before_start=1,
        dup_ttl=args.dup_ttl, child_env=trace_env(args.trace) if args.trace else None,
    )
    await flow.set_up()
    began = time.monotonic()
    await flow.run([], timeout=args.timeout)
    max_rate = args.probe_files / (time.monotonic() - began)
    rate = max(1, int(max_rate / 2))
    pid = flow.children[-1].proc.pid
    samples, fed, batches, index, behind = [], set(), {}, 0, 0
    load_start = os.getloadavg()[0]
    probed = len(flow.collector.ok)
    started = time.monotonic()
    deadline = started + args.minutes * 60
    next_sample = started
    while time.monotonic() < deadline:
        batch = make_files(index, rate)
        top = f"soak/{index:07d}"
        batch = {f"{top}/{path}": data for path, data in batch.items()}
        put_files(flow.src, flow.staging, batch)
        fed.update(batch)
        batches[top] = set(batch)
        index += 1
        # A batch all reported goes, directories too: the trees keep a steady size (a tree
        # growing by 16 directories a second is not the steady state the soak measures).
        for top in [top for top, paths in batches.items() if paths <= flow.collector.ok]:
            del batches[top]
            for root in (flow.src, flow.dest):
                shutil.rmtree(os.path.join(root, *top.split("/")), ignore_errors=True)
        # Files fed and not reported yet: a pump that cannot keep up (a busy machine) shows here.
        behind = max(behind, len(fed) - (len(flow.collector.ok) - probed))
        if time.monotonic() >= next_sample:
            samples.append((time.monotonic() - started, rss_mb(pid)))
            if args.rss_log:
                with open(args.rss_log, "a") as f:
                    f.write(f"{samples[-1][0]:.0f} {samples[-1][1]:.2f} {behind}\n")
            next_sample += SAMPLE_INTERVAL
        await task.deferLater(reactor, 1, lambda: None)
    load_end = os.getloadavg()[0]
    missing = set(fed) - flow.collector.ok
    waited = time.monotonic()
    while missing and time.monotonic() - waited < args.timeout:
        await task.deferLater(reactor, 1, lambda: None)
        missing = set(fed) - flow.collector.ok
    window = min(WINDOW_MINUTES, args.minutes * 2 / 3) * 60
    recent = [(t, m) for t, m in samples if t >= args.minutes * 60 - window]
    slope = slope_per_10_minutes(recent)
    ok = slope < SLOPE_LIMIT_MB and not missing
    result = "ok" if ok else "FAILED" + (f" ({len(missing)} files not reported)" if missing else "")
    print(
        f"soak minutes={args.minutes:g} rate_files_per_s={rate} max_files_per_s={max_rate:.1f} "
        f"files={len(fed)} rss_start_mb={samples[0][1]:.1f} rss_end_mb={samples[-1][1]:.1f} "
        f"slope_mb_per_10min={slope:.2f} window_min={window / 60:.1f} samples={len(recent)} "
        f"most_behind={behind} load={load_start:.1f}/{load_end:.1f} result={result}"
    )
    flow.children[-1].stop()
    return 0 if ok else 1


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--broker-kills", type=int, default=3)
    parser.add_argument("--container-kills", type=int, default=3)
    parser.add_argument("--cluster", action="store_true", help="a 3-node cluster")
    parser.add_argument("--seed", type=int, help="replay the kill points of a run")
    parser.add_argument("--soak", action="store_true", help="the soak instead of the kills")
    parser.add_argument("--minutes", type=float, default=30.0, help="soak length")
    parser.add_argument("--probe-files", type=int, default=2000,
                        help="soak: the burst that measures the maximum rate")
    parser.add_argument("--dup-ttl", type=float, default=300.0,
                        help="soak: seconds the duplicate caches keep a key (default 300, so "
                        "that they are full, at their steady size, before the window)")
    parser.add_argument("--trace", metavar="DIR",
                        help="soak: trace the pump's memory, a snapshot a minute into DIR")
    parser.add_argument("--rss-log", metavar="FILE",
                        help="soak: append each sample to FILE (seconds, RSS MB, files behind)")
    parser.add_argument("--compare", metavar="DIR",
                        help="print what grew between the first and last snapshot in DIR")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds to wait for the files of a phase")
    args = parser.parse_args(argv)
    if args.files < 10 * (args.broker_kills + args.container_kills + 1):
        parser.error("--files: too few for that many kills")
    if args.minutes <= 0:
        parser.error("--minutes must be > 0")
    return args


def main(argv=None):
    args = parse(argv)
    if args.compare:
        sys.exit(compare(args.compare))
    base = tempfile.mkdtemp(prefix="ion-chaos-")
    brokers = start_brokers(args.cluster)
    run = Run(base)

    async def body(reactor):
        try:
            return await (soak if args.soak else chaos)(reactor, args, run, brokers)
        finally:
            await run.clean_up()

    status = [1]

    def record(reactor):
        d = defer.Deferred.fromCoroutine(body(reactor))
        return d.addCallback(lambda code: status.__setitem__(0, code))

    try:
        task.react(record)
    except SystemExit:
        pass
    finally:
        brokers.cleanup()
        shutil.rmtree(base, ignore_errors=True)
    sys.exit(status[0])


if __name__ == "__main__":
    main()
