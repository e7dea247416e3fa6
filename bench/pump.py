"""Pump benchmark: files/s, CPU seconds per file and peak RSS of a pump fetching files announced
by v03 notices from a local HTTP server, for ION and (with --vs-sr3) for MetPX-Sarracenia sr3
on the same workload, the same broker and the same server.

    venv/bin/python bench/pump.py                      # ION on a private RabbitMQ node
    venv/bin/python bench/pump.py --vs-sr3             # ION, then sr3, and the ratio
    venv/bin/python bench/pump.py --transport memory   # ION alone on memory:// (no RabbitMQ)
    venv/bin/python bench/pump.py --poll               # ION fed by its own poll of the server
    venv/bin/python bench/pump.py -n 500 --size 65536 --dirs 5 --keep
    venv/bin/python bench/pump.py --profile pump.prof  # cProfile the container (pstats file)
    venv/bin/python bench/pump.py --instances 1,2      # the subscription as 1, then 2 OS processes

The workload: `-n` files of `--size` random bytes spread over `--dirs` directories, served by
twisted.web (static.File on 127.0.0.1, port 0, no access log) in a process of its own, so the
server's CPU is not charged to the pump. One v03 notice per file (pubTime, baseUrl, relPath,
size, mtime, mode, identity sha512, and source `bench` as a pump's ingest stamps it, so that
ION's reports are routed back to `xr_bench`), published by this script with pika, persistent with
content type application/json, to the durable topic exchange `xpublic` with the notice's
topic (`v03.<dir>`) as routing key ("feed=post").

Before the clock starts, each subscriber gets one probe notice (published mandatory and
confirmed until a queue takes it) and must deliver the probe file: its queue is then bound,
it is consuming, and its first transfer (imports, first connections) is behind it.

- ION: `twistd -n cc` in a child process (working directory: the temp dir, where the pump
  keeps its state) runs the pump app from an .app file written there: one subscription to
  `xpublic` `v03.#`, mirror, 2 transfer workers, the consumer's defaults (8 transfers at a
  time). On memory:// (no broker outside the container) a second app in the same container,
  `bench.pump` itself (`start` below), publishes the notices once the pump is up, so the
  publishing CPU is charged to the container too, and there is no probe. With --poll the
  pump polls the HTTP server every second instead (poll -> xs_<user> -> ingest -> xpublic ->
  consumer); the files appear in the served tree (a rename of each directory) when the clock
  starts, so the figure includes up to one poll interval of waiting.
- sr3 (`--vs-sr3`, amqp only): a venv of its own (`var/bench/sr3venv`, made with
  `pip install 'metpx-sr3[amqp]' paramiko` on first use; paramiko is added to one made
  without it, such as the test suite's: sr3 then loads it at start, as an sr3 that can do
  sftp does, and its peak RSS is about 50 MB rather than 33), HOME set to a temp dir so sr3's
  config, credentials, state and logs stay there, one `subscribe` config (see `sr3_config`:
  instances 1, mirror on, accept .*, logLevel warning), `sr3 start` then `sr3 stop`. CPU and
  RSS are those of the instance processes named by sr3's pid files.

The clock runs from the first publish until every file exists at its final name with the
right size (the destination tree is scanned every 20 ms, less often once a scan takes over
2 ms of CPU: the scans take at most a tenth of a core); then every file's sha512 is
checked. CPU is utime+stime (all threads) from /proc/<pid>/stat over the same interval, and
kernel_cpu_share the part of it that is stime. Peak RSS is VmHWM from /proc/<pid>/status at
the end. The broker's (the RabbitMQ node's process group) and the HTTP server's CPU over the
interval are shown too.

Each system starts with the page cache written out (`sync`), the served tree included. On an
ext4 without a journal (this machine's root), creating a file shortly after many were deleted
makes the kernel look past each recently deleted inode: measured right after a previous run's
cleanup, the same code took up to twice the CPU per file. So a run first waits until the
files the last run removed are no longer recent (`after_deletions`: a minute after that
cleanup), and nothing is deleted between the systems.

Prints one result line per system, and with --vs-sr3 a ratio line (ion/sr3: above 1 means ION
is faster, or uses more CPU or memory):

    pump system=ion n=2000 files_per_s=... cpu_s_per_file=... peak_rss_mb=... transport=amqp
        feed=post verified=2000/2000 kernel_cpu_share=... broker_cpu_s_per_file=...
        http_cpu_s_per_file=... cpu_over_http_cpu=...

cpu_over_http_cpu is the pump's CPU over the HTTP server's in the same run. The server answers
the same requests whatever the pump does, so its CPU per file moves only with the machine's
speed: on a noisy machine, where CPU per file drifts by up to 1.3x between runs of the same
code, this ratio drifted by about 2%, and it is the figure to compare in an A/B of the pump's
code (stop 35: 2.57-2.66 before the lean HTTP client, 2.35-2.41 after).
    pump system=sr3 n=2000 files_per_s=... (the same fields)
    pump ratio ion/sr3 files_per_s=... cpu_s_per_file=... peak_rss_mb=...

With --instances 1,2 (a list) ION runs once per count, each in a fresh directory with its
subscription's `instances` set to it (on amqp, OS processes of their own: CPU and RSS are
summed over the container and its instance processes); each line then ends with
`instances=N`. (each result is one line; `incomplete=k/n` ends it when not every file arrived within
--timeout). Every child process (HTTP server, container, sr3 instances, RabbitMQ) is stopped
at the end, also on errors and on SIGTERM; --keep leaves the temp dir in place and prints
where.
"""

import argparse
import atexit
import base64
import glob
import hashlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from twisted.internet import defer  # noqa: E402

from ion.apps.pump.notice import Notice, format_time  # noqa: E402
from ion.core.process import Process  # noqa: E402

EXCHANGE = "xpublic"
SUBSCRIPTION = "pump"
SR3_CONFIG = "bench"
SR3_VENV = os.path.join(ROOT, "var", "bench", "sr3venv")
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SCAN_INTERVAL = 0.02
PROBE = "probe/probe.dat"  # fetched before the clock starts (see warm_up)
PUBLISH_WINDOW = 500  # unconfirmed publishes at most, for the in-container poster
# When this script last removed a run's files (see after_deletions).
DELETED_MARK = os.path.join(tempfile.gettempdir(), "ion-bench-pump.deleted")

# The HTTP server: static files, no access log, prints its port and serves until killed.
HTTP_SERVER = """
import sys
from twisted.internet import reactor
from twisted.web import server, static
port = reactor.listenTCP(0, server.Site(static.File(sys.argv[1])), interface="127.0.0.1")
print(port.getHost().port, flush=True)
reactor.run()
"""


class BenchError(Exception):
    """The benchmark could not run as asked; the message says why."""


# -- in-container poster (memory:// only) ----------------------------------------------------


class Poster(Process):
    """Publishes the notices of a JSON-lines file [routing key, body] to `xpublic`, after
    writing {time, cpu} (wall clock and this process's CPU seconds) to the mark file."""

    async def on_activate(self):
        self.container.reactor.callLater(0, lambda: defer.ensureDeferred(self._post()))

    async def _post(self):
        with open(self.args["notices"]) as f:
            notices = [json.loads(line) for line in f]
        mark = {"time": time.time(), "cpu": cpu_seconds(os.getpid())}
        with open(self.args["mark"] + ".tmp", "w") as f:
            json.dump(mark, f)
        os.rename(self.args["mark"] + ".tmp", self.args["mark"])
        window = []
        for key, body in notices:
            d = self.publish(
                EXCHANGE, key, body.encode(), content_type="application/json", declare="topic"
            )
            window.append(defer.ensureDeferred(d))
            if len(window) >= PUBLISH_WINDOW:
                await defer.gatherResults(window)
                window = []
        await defer.gatherResults(window)


async def start(container, app, notices, mark):
    """The app module entry point of the `benchpost` app (memory:// runs)."""
    return await container.spawn(
        Poster, name="bench-poster", args={"notices": notices, "mark": mark}
    )


# -- /proc --------------------------------------------------------------------------------------


def cpu_seconds(pid, kernel_only=False):
    """utime + stime of a process (all its threads), in seconds; stime alone if
    C{kernel_only}."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[12]) + (0 if kernel_only else int(fields[11]))) / CLOCK_TICKS


def peak_rss_mb(pid):
    """VmHWM of a process, in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise BenchError(f"no VmHWM in /proc/{pid}/status")


# -- child processes ---------------------------------------------------------------------------


class Children:
    """Child processes started by this script, each in a session of its own; `stop_all`
    sends SIGTERM to each one's process group, then SIGKILL to those still there, and runs
    the cleanups (broker, sr3 stop, temp dir)."""

    def __init__(self):
        self.procs = []
        self.cleanups = []

    def start(self, cmd, **kw):
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(cmd, start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def stop(self, proc, timeout=15):
        if proc.poll() is None:
            _killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self):
        """Stop the child processes, then run the cleanups, last registered first."""
        for proc in list(self.procs):
            self.stop(proc)
        while self.cleanups:
            try:
                self.cleanups.pop()()
            except Exception as e:  # cleanup goes on with the rest
                print(f"pump bench: cleanup failed: {e}", file=sys.stderr)


def _killpg(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def start_http_server(children, directory):
    proc = children.start(
        [sys.executable, "-c", HTTP_SERVER, directory], stdout=subprocess.PIPE, text=True
    )
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        raise BenchError(f"the HTTP server did not start (said {line!r})")
    return proc, int(line)


# -- workload ----------------------------------------------------------------------------------


def make_tree(root, n, size, dirs):
    """n files of `size` random bytes under root/dNN/, and the probe file;
    ([(relPath, sha512 base64, mtime)], the same for the probe)."""
    files = []
    for d in range(dirs):
        os.makedirs(os.path.join(root, f"d{d:02d}"), exist_ok=True)
    os.makedirs(os.path.join(root, os.path.dirname(PROBE)), exist_ok=True)
    for rel_path in [f"d{i % dirs:02d}/f{i:06d}.dat" for i in range(n)] + [PROBE]:
        data = os.urandom(size)
        path = os.path.join(root, rel_path)
        with open(path, "wb") as f:
            f.write(data)
        digest = base64.b64encode(hashlib.sha512(data).digest()).decode()
        files.append((rel_path, digest, os.stat(path).st_mtime))
    return files[:-1], files[-1]


def make_notices(files, size, base_url):
    """[(routing key, JSON body)] of one v03 notice per file."""
    now = format_time(time.time())
    notices = []
    for rel_path, digest, mtime in files:
        notice = Notice.from_dict(
            {
                "pubTime": now,
                "baseUrl": base_url,
                "relPath": rel_path,
                "size": size,
                "mtime": format_time(mtime),
                "mode": "644",
                "identity": {"method": "sha512", "value": digest},
                # As a pump's ingest stamps it on xpublic: the reports go back to xr_bench.
                "source": "bench",
            }
        ).validate()
        notices.append((notice.topic(), notice.to_json().decode()))
    return notices


def wait_delivered(dest, files, size, timeout, alive):
    """Time at which every file is at its final name with the right size, or None on timeout
    or when `alive()` turns false; also the number delivered."""
    pending = {}
    for rel_path, _, _ in files:
        directory, name = rel_path.split("/")
        pending.setdefault(directory, set()).add(name)
    remaining = len(files)
    deadline = time.monotonic() + timeout
    while True:
        scan_started = time.thread_time()
        for directory in list(pending):
            names = pending[directory]
            try:
                entries = list(os.scandir(os.path.join(dest, directory)))
            except FileNotFoundError:
                continue
            for entry in entries:
                if entry.name in names:
                    try:
                        if entry.stat().st_size == size:
                            names.discard(entry.name)
                            remaining -= 1
                    except FileNotFoundError:
                        pass
            if not names:
                del pending[directory]
        if remaining == 0:
            return time.time(), len(files)
        if time.monotonic() > deadline or not alive():
            return None, len(files) - remaining
        # A scan lists whole directories, about 1 us of CPU an entry (19 ms at 20,000 files):
        # scanning every 20 ms regardless took half a core of the two from the systems
        # measured. Now at most a tenth, for an end time known to a tenth of a second or so.
        time.sleep(max(SCAN_INTERVAL, 9 * (time.thread_time() - scan_started)))


def verify(dest, files):
    """How many files under dest have the expected sha512."""
    good = 0
    for rel_path, digest, _ in files:
        try:
            with open(os.path.join(dest, rel_path), "rb") as f:
                data = f.read()
        except OSError:
            continue
        if base64.b64encode(hashlib.sha512(data).digest()).decode() == digest:
            good += 1
    return good


# -- AMQP (pika, bench only) -------------------------------------------------------------------


def _pika():
    try:
        import pika
    except ImportError:
        raise BenchError(
            "pika is missing: venv/bin/pip install pika (a bench-only dependency)"
        ) from None
    return pika


def declare_exchange(url):
    pika = _pika()
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        connection.channel().exchange_declare(EXCHANGE, "topic", durable=True)
    finally:
        connection.close()


def warm_up(url, probe, dest, size, timeout, alive, what):
    """Publish the probe notice (mandatory, confirmed) until a queue takes it, then wait for
    the probe file at dest: the subscriber is then bound, consuming and has done a transfer.
    BenchError after timeout or when `alive()` turns false."""
    pika = _pika()
    key, body = probe
    deadline = time.monotonic() + timeout

    def check():
        if not alive():
            raise BenchError(f"{what} exited while starting")
        if time.monotonic() > deadline:
            raise BenchError(f"{what} bound no queue to {EXCHANGE} within {timeout} s")
        time.sleep(0.05)

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        properties = pika.BasicProperties(content_type="application/json", delivery_mode=2)
        while True:
            try:
                channel.basic_publish(EXCHANGE, key, body.encode(), properties, mandatory=True)
                break
            except pika.exceptions.UnroutableError:
                check()  # the subscriber has not bound its queue yet
    finally:
        connection.close()
    wait_probe(dest, size, deadline - time.monotonic(), alive, what)


def wait_probe(dest, size, timeout, alive, what, tail=lambda: ""):
    """Return once the probe file is at dest; BenchError after timeout or when `alive()`
    turns false (with `tail()`, the subscriber's last output, in the message)."""
    path = os.path.join(dest, PROBE)
    deadline = time.monotonic() + timeout
    while not (os.path.exists(path) and os.path.getsize(path) == size):
        if not alive():
            raise BenchError(f"{what} exited while starting\n{tail()}")
        if time.monotonic() > deadline:
            raise BenchError(
                f"{what} did not deliver the probe file within {timeout:.0f} s\n{tail()}"
            )
        time.sleep(0.05)


def delete_queue(url, queue):
    pika = _pika()
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        connection.channel().queue_delete(queue)
    finally:
        connection.close()


def publish(url, notices):
    """Publish every notice (persistent, JSON); the wall time of the first publish."""
    pika = _pika()
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        properties = pika.BasicProperties(content_type="application/json", delivery_mode=2)
        began = time.time()
        for key, body in notices:
            channel.basic_publish(EXCHANGE, key, body.encode(), properties)
    finally:
        connection.close()
    return began


# -- measurement -------------------------------------------------------------------------------


class Measurement:
    """The figures of one system's run."""

    def __init__(self, system, n, transport, feed):
        self.system = system
        self.n = n
        self.transport = transport
        self.feed = feed  # post: notices published by the bench; poll: ION's own poll
        self.seconds = None  # None: not every file arrived
        self.cpu = None
        self.kernel_cpu = None  # the part of cpu spent in the kernel (stime)
        self.rss = None
        self.support_cpu = {}  # CPU seconds of the broker and the HTTP server
        self.instances = None  # the subscription's instances, with --instances
        self.delivered = 0
        self.verified = 0

    @property
    def files_per_s(self):
        return self.n / self.seconds if self.seconds else 0.0

    def per_file(self, seconds):
        return f"{seconds / self.n:.5f}" if seconds is not None else "nan"

    def line(self):
        support = "".join(
            f" {name}_cpu_s_per_file={self.per_file(cpu)}"
            for name, cpu in self.support_cpu.items()
        )
        state = f" incomplete={self.delivered}/{self.n}" if self.seconds is None else ""
        rss = f"{self.rss:.1f}" if self.rss is not None else "nan"
        kernel = (
            f" kernel_cpu_share={self.kernel_cpu / self.cpu:.2f}"
            if self.kernel_cpu is not None and self.cpu else ""
        )
        http_cpu = self.support_cpu.get("http")
        if self.cpu is not None and http_cpu:
            # The HTTP server answers the same requests whatever the pump: its CPU is a
            # yardstick of the machine's speed during the run (see the module docstring).
            support += f" cpu_over_http_cpu={self.cpu / http_cpu:.2f}"
        return (
            f"pump system={self.system} n={self.n} files_per_s={self.files_per_s:.1f} "
            f"cpu_s_per_file={self.per_file(self.cpu)} peak_rss_mb={rss} "
            f"transport={self.transport} feed={self.feed} verified={self.verified}/{self.n}"
            f"{kernel}{support}{state}"
            + (f" instances={self.instances}" if self.instances else "")
        )


def measure(system, setup, dest, pids, alive, warm, publish_all):
    """One measurement. `warm()` returns once the subscriber is ready (with the CPU seconds of
    `pids()` at the first publish when it knows them, else None); `publish_all()` publishes
    the notices and returns the wall time of the first publish."""
    feed = "poll" if setup.args.poll and system == "ion" else "post"
    result = Measurement(system, len(setup.files), setup.args.transport, feed)
    # The tree this script wrote (and an earlier system's files) may still wait in the page
    # cache: written out now, not by the kernel's write-back in the middle of a run, nor by
    # the first syncfs of ION's group commits, which also falls back to an fsync per file
    # while the system holds over 64 MB not yet written (a tree of 16,000 files of 4 KiB).
    os.sync()
    cpu_at_start = warm()
    before = sum(cpu_seconds(pid) for pid in pids()) if cpu_at_start is None else cpu_at_start
    # Read here also when the start was marked inside the container (memory://): a little
    # early, which the share of a whole run can bear.
    kernel_before = sum(cpu_seconds(pid, kernel_only=True) for pid in pids())
    support_before = setup.support_cpu()
    began = publish_all()
    done, result.delivered = wait_delivered(
        dest, setup.files, setup.args.size, setup.args.timeout, alive
    )
    support_after = setup.support_cpu()
    result.support_cpu = {k: support_after[k] - support_before[k] for k in support_after}
    if alive():
        result.cpu = sum(cpu_seconds(pid) for pid in pids()) - before
        kernel = sum(cpu_seconds(pid, kernel_only=True) for pid in pids())
        result.kernel_cpu = kernel - kernel_before
        result.rss = sum(peak_rss_mb(pid) for pid in pids())
    if done is not None:
        result.seconds = done - began
    result.verified = verify(dest, setup.files)
    return result


class Setup:
    """What both systems share: options, child processes, temp dir, workload, broker, server."""

    def __init__(self, args, children, work):
        self.args = args
        self.children = children
        self.work = work
        self.source = self.base_url = None  # the served tree and its URL
        self.files = self.notices = self.probe = None
        self.broker = None
        self.http = None

    def directories(self):
        """The top directories of the files (not the probe's)."""
        return sorted({rel_path.split("/")[0] for rel_path, _, _ in self.files})

    def support_cpu(self):
        """CPU seconds used so far by the broker's processes and by the HTTP server."""
        cpu = {}
        if self.broker is not None:
            cpu["broker"] = sum(cpu_seconds(p) for p in group_pids(self.broker.process.pid))
        cpu["http"] = cpu_seconds(self.http.pid)
        return cpu


def _processes():
    """(pid, fields of /proc/<pid>/stat after the command name, /proc/<pid>/cmdline) of every
    process still there."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        yield int(name), stat[stat.rindex(")") + 2 :].split(), cmdline


def group_pids(pgid):
    """The processes of a process group."""
    return [pid for pid, fields, _ in _processes() if int(fields[2]) == pgid]


# -- ION -----------------------------------------------------------------------------------------


def instance_pids(parent):
    """The OS processes of the instances a container (pid `parent`) runs."""
    return [
        pid for pid, fields, cmdline in _processes()
        if int(fields[1]) == parent and b"ion.core.cc.instance" in cmdline
    ]


def ion_app(directory, base_url, poll_url=None, instances=1):
    """The pump app of res/apps/pump.app with its subscription writing to `directory` and
    fetching from `base_url` (the bench's notices come from source `bench`, not the pump's
    user: the URL policy needs it listed), and a poll of `poll_url` every second in place of
    the local poll when given. State goes to the container's working directory (the temp
    dir)."""
    kwargs = {
        "subscriptions": [
            {
                "name": SUBSCRIPTION,
                "exchange": EXCHANGE,
                "topics": ["v03.#"],
                "directory": directory,
                "mirror": True,
                "sources": [base_url],
                "instances": instances,
            }
        ],
        "transfer": {"workers": 2},
    }
    if poll_url is not None:
        kwargs["polls"] = [{"name": "bench", "url": poll_url, "interval": 1}]
    return {
        "type": "application",
        "name": "pump",
        "description": "pump benchmark: the pump app writing to a temp dir",
        "version": "0.1",
        "mod": ("ion.apps.pump.app", [], kwargs),
        "applications": ["ioncore"],
        "registered": [],
    }


def poster_app(notices_path, mark_path):
    return {
        "type": "application",
        "name": "benchpost",
        "description": "pump benchmark: publishes the notices inside the container",
        "version": "0.1",
        "mod": ("bench.pump", [], {"notices": notices_path, "mark": mark_path}),
        "applications": ["pump"],
        "registered": [],
    }


def write_literal(path, value):
    with open(path, "w") as f:
        f.write(repr(value) + "\n")


class ContainerOutput:
    """Collects a container's output lines in a thread; `ready` is set at 'running apps'."""

    def __init__(self, proc):
        self.lines = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc):
        for line in proc.stdout:
            self.lines.append(line)
            if "running apps" in line:
                self.ready.set()

    def tail(self, n=30):
        return "".join(self.lines[-n:])


def run_ion(setup, instances=1):
    args = setup.args
    work = os.path.join(setup.work, f"ion-{instances}" if args.instances else "ion")
    dest = os.path.join(work, "destination")
    os.makedirs(work, exist_ok=True)
    app_files = [os.path.join(work, "benchpump.app")]
    poll_url = setup.base_url if args.poll else None
    write_literal(app_files[0], ion_app(dest, setup.base_url, poll_url, instances))
    mark = os.path.join(work, "mark.json")
    url = "memory://" if args.transport == "memory" else setup.broker.url
    if args.transport == "memory" and not args.poll:
        notices_path = os.path.join(work, "notices.jsonl")
        with open(notices_path, "w") as f:
            for key, body in setup.notices:
                f.write(json.dumps([key, body]) + "\n")
        app_files.append(os.path.join(work, "benchpost.app"))
        write_literal(app_files[1], poster_app(notices_path, mark))
    staging = os.path.join(setup.work, "staging")
    if args.poll:
        # The files appear in the served tree only when the clock starts (publish_all).
        os.makedirs(staging)
        for directory in setup.directories():
            os.rename(os.path.join(setup.source, directory), os.path.join(staging, directory))
    profile = ["--profile", args.profile, "--savestats"] if args.profile else []
    cmd = [*TWISTD, "--pidfile=", *profile, "-n", "cc", "--no-shell", "--broker", url, *app_files]
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = setup.children.start(
        cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output = ContainerOutput(proc)
    started = {}

    def alive():
        return proc.poll() is None

    def warm():
        if args.poll:
            # The poll's first pass finds only the probe; once it is delivered, the poll,
            # the ingest and the consumer have all done their work once.
            wait_probe(dest, args.size, 60, alive, "the ION container", output.tail)
            return None
        if args.transport == "amqp":
            try:
                warm_up(url, setup.probe, dest, args.size, 60, alive, "the ION container")
            except BenchError as e:
                raise BenchError(f"{e}:\n{output.tail()}") from None
            return None
        # memory://: the poster in the container writes the mark as it starts publishing.
        deadline = time.monotonic() + 60
        while not os.path.exists(mark):
            if not alive() or time.monotonic() > deadline:
                raise BenchError("the ION container did not start:\n" + output.tail())
            time.sleep(0.01)
        with open(mark) as f:
            started.update(json.load(f))
        return started["cpu"]

    def publish_all():
        if args.poll:
            began = time.time()
            for directory in setup.directories():
                os.rename(os.path.join(staging, directory), os.path.join(setup.source, directory))
            return began
        if args.transport == "amqp":
            return publish(url, setup.notices)
        return started["time"]

    try:
        result = measure("ion", setup, dest, lambda: [proc.pid, *instance_pids(proc.pid)],
                         alive, warm, publish_all)
        if args.instances:
            result.instances = instances
        if result.seconds is None:
            print(output.tail(), file=sys.stderr)
    finally:
        setup.children.stop(proc)
    if args.transport == "amqp":
        delete_queue(url, f"q_guest.consumer.{SUBSCRIPTION}")
    return result


# -- sr3 -----------------------------------------------------------------------------------------


def sr3_command():
    sr3 = os.path.join(SR3_VENV, "bin", "sr3")
    if os.path.exists(sr3):
        _with_paramiko()
        return sr3
    print(f"pump bench: installing metpx-sr3 into {SR3_VENV}", file=sys.stderr)
    os.makedirs(os.path.dirname(SR3_VENV), exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", SR3_VENV], check=True)
    pip = os.path.join(SR3_VENV, "bin", "pip")
    installed = subprocess.run([pip, "install", "-q", "metpx-sr3[amqp]", "paramiko"])
    if installed.returncode != 0 or not os.path.exists(sr3):
        shutil.rmtree(SR3_VENV, ignore_errors=True)
        raise BenchError(f"could not install metpx-sr3 into {SR3_VENV}")
    return sr3


def _with_paramiko():
    """Install paramiko into an sr3 venv made without it (the test suite's, by .ci/run): sr3
    with sftp, as the pump can do sftp too. sr3 loads paramiko at start when it is there,
    which costs it about 17 MB of RSS (33 MB without, 50 MB with, on the same workload)."""
    python = os.path.join(SR3_VENV, "bin", "python")
    if subprocess.run([python, "-c", "import paramiko"], capture_output=True).returncode == 0:
        return
    print(f"pump bench: installing paramiko into {SR3_VENV}", file=sys.stderr)
    pip = os.path.join(SR3_VENV, "bin", "pip")
    if subprocess.run([pip, "install", "-q", "paramiko"]).returncode != 0:
        raise BenchError(f"could not install paramiko into {SR3_VENV}")


def sr3_config(broker_host, broker_port, dest, queue):
    return "\n".join(
        [
            f"broker amqp://guest@{broker_host}:{broker_port}/",
            f"exchange {EXCHANGE}",
            # Order matters: subtopic binds with the queue name and prefix given before it.
            f"queueName {queue}",
            "topicPrefix v03",
            "subtopic #",
            "instances 1",
            "logLevel warning",
            f"directory {dest}",
            "mirror on",
            "accept .*",
            "",
        ]
    )


def run_sr3(setup):
    args, children, broker = setup.args, setup.children, setup.broker
    sr3 = sr3_command()
    home = os.path.join(setup.work, "sr3", "home")
    dest = os.path.join(setup.work, "sr3", "destination")
    config_dir = os.path.join(home, ".config", "sr3")
    os.makedirs(os.path.join(config_dir, "subscribe"), exist_ok=True)
    # sr3 writes its subscription state here at start, and complains if the directory is missing.
    os.makedirs(os.path.join(home, ".cache", "sr3", "subscribe", SR3_CONFIG), exist_ok=True)
    os.makedirs(dest, exist_ok=True)
    credentials = os.path.join(config_dir, "credentials.conf")
    with open(credentials, "w") as f:
        f.write(f"amqp://guest:guest@{broker.host}:{broker.port}/\n")
    os.chmod(credentials, 0o600)
    queue = f"q_guest.subscribe.{SR3_CONFIG}"
    with open(os.path.join(config_dir, "subscribe", f"{SR3_CONFIG}.conf"), "w") as f:
        f.write(sr3_config(broker.host, broker.port, dest, queue))
    # sr3 finds its own instances by owner: USER must name the user we run as.
    env = dict(os.environ, HOME=home, USER=pwd.getpwuid(os.getuid()).pw_name)
    env.pop("VIRTUAL_ENV", None)
    log = os.path.join(setup.work, "sr3", "sr3.out")

    def sr3_run(*words):
        with open(log, "a") as out:
            subprocess.run(
                [sr3, *words, f"subscribe/{SR3_CONFIG}"], env=env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, timeout=120,
            )

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

    def stop():
        sr3_run("stop")
        for pid in pids():  # still there after sr3 stop: started (through sr3) by us
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    children.cleanups.append(stop)

    def alive():
        return bool(pids())

    def warm():
        sr3_run("start")
        deadline = time.monotonic() + 60
        while not pids():
            if time.monotonic() > deadline:
                raise BenchError(f"sr3 did not start an instance; see {log} and {home}/.cache/sr3")
            time.sleep(0.1)
        warm_up(broker.url, setup.probe, dest, args.size, 60, alive, "the sr3 instance")
        return None

    try:
        result = measure(
            "sr3", setup, dest, pids, alive, warm, lambda: publish(broker.url, setup.notices)
        )
        if result.seconds is None:
            logs = glob.glob(os.path.join(home, ".cache", "sr3", "log", "*.log"))
            for path in logs:
                with open(path, errors="replace") as f:
                    print("".join(f.readlines()[-20:]), file=sys.stderr)
    finally:
        children.cleanups.remove(stop)
        stop()
    delete_queue(broker.url, queue)
    return result


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=2000, help="number of files (default 2000)")
    parser.add_argument("--size", type=int, default=4096, help="bytes per file (default 4096)")
    parser.add_argument("--dirs", type=int, default=10, help="directories (default 10)")
    parser.add_argument("--transport", choices=("amqp", "memory"), default="amqp")
    parser.add_argument("--vs-sr3", action="store_true", help="run sr3 on the same workload")
    parser.add_argument(
        "--poll",
        action="store_true",
        help="ION only: the pump polls the HTTP server itself instead of getting posted notices",
    )
    parser.add_argument(
        "--instances",
        metavar="N,M",
        help="ION only: run once per count with the subscription's instances set to it (1,2)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dirs")
    parser.add_argument(
        "--profile", metavar="PATH", help="cProfile the ION container (twistd --profile) into PATH"
    )
    parser.add_argument(
        "--timeout", type=float, default=300, help="seconds each system gets (default 300)"
    )
    args = parser.parse_args(argv)
    if args.profile:
        args.profile = os.path.abspath(args.profile)
    if args.instances is not None:
        try:
            args.instances = [int(n) for n in args.instances.split(",")]
        except ValueError:
            parser.error(f"--instances must be counts separated by commas, got {args.instances!r}")
        if not args.instances or min(args.instances) < 1:
            parser.error("--instances: every count must be at least 1")
        if args.vs_sr3:
            parser.error("--instances compares ION with itself: leave out --vs-sr3")
    if args.n < 1 or args.size < 1 or args.dirs < 1:
        parser.error("-n, --size and --dirs must be at least 1")
    if args.vs_sr3 and args.poll:
        parser.error("--poll is ION's own feed while sr3 gets posted notices: use one or the other")
    if args.vs_sr3 and args.transport != "amqp":
        parser.error("--vs-sr3 needs --transport amqp (sr3 talks to a real broker)")
    return args


# How long ext4 without a journal keeps a deleted inode from being reused once the block of its
# inode table is written back (300 s while it is not): it looks past each such inode for every
# file created meanwhile (fs/ext4/ialloc.c, RECENTCY_MIN).
DELETION_MEMORY = 60


def after_deletions():
    """Wait until the files an earlier run of this script removed are no longer recently
    deleted (see the module docstring). Right after, ION's file creations took twice the CPU
    per file: kernel share 0.52-0.56, against 0.23-0.25 after a pause (the same code, 6,000
    files)."""
    try:
        left = os.stat(DELETED_MARK).st_mtime + DELETION_MEMORY + 1 - time.time()
    except OSError:
        return
    if left > 0:
        print(f"pump bench: waiting {left:.0f} s after the last run's deletions", file=sys.stderr)
        time.sleep(left)


def remove_tree(path):
    """Remove `path`, write the removals out (so the kernel remembers them DELETION_MEMORY
    seconds, not 300) and record when, for the next run's `after_deletions`."""
    shutil.rmtree(path, ignore_errors=True)
    os.sync()
    with open(DELETED_MARK, "w"):
        pass


def run(args, children):
    after_deletions()
    work = tempfile.mkdtemp(prefix="ion-bench-pump-")
    if args.keep:
        print(f"pump bench: temp dir {work}", file=sys.stderr)
    else:
        children.cleanups.append(lambda: remove_tree(work))
    setup = Setup(args, children, work)
    setup.source = os.path.join(work, "source")
    setup.files, probe_file = make_tree(setup.source, args.n, args.size, args.dirs)
    setup.http, port = start_http_server(children, setup.source)
    base_url = f"http://127.0.0.1:{port}/"
    setup.base_url = base_url
    setup.notices = make_notices(setup.files, args.size, base_url)
    setup.probe = make_notices([probe_file], args.size, base_url)[0]

    if args.transport == "amqp":
        from tests.broker import PrivateBroker, find_rabbitmq_server

        if find_rabbitmq_server() is None:
            raise BenchError("rabbitmq-server not found: install it, or use --transport memory")
        setup.broker = PrivateBroker()
        children.cleanups.append(setup.broker.cleanup)
        setup.broker.start()
        declare_exchange(setup.broker.url)

    if args.instances:
        for n in args.instances:
            print(run_ion(setup, n).line(), flush=True)
        return
    ion = run_ion(setup)
    print(ion.line(), flush=True)
    if not args.vs_sr3:
        return
    sr3 = run_sr3(setup)
    print(sr3.line(), flush=True)

    def ratio(a, b):
        return f"{a / b:.2f}" if a and b else "nan"

    print(
        f"pump ratio ion/sr3 files_per_s={ratio(ion.files_per_s, sr3.files_per_s)} "
        f"cpu_s_per_file={ratio(ion.cpu, sr3.cpu)} peak_rss_mb={ratio(ion.rss, sr3.rss)}",
        flush=True,
    )


def main(argv=None):
    args = parse_args(argv)
    children = Children()
    atexit.register(children.stop_all)

    def on_signal(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    try:
        run(args, children)
    except BenchError as e:
        print(f"pump bench: {e}", file=sys.stderr)
        return 1
    finally:
        children.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
