"""What a container is doing, for operators: its process tree and the counts of its workers.

L{Sampler} runs in the core process (C{cc_<containerid>}, L{ion.core.cc.coreapp}). Every
C{sample_interval} seconds (config C{ion.core.cc}, default 5) it asks each process that serves
an op C{stats} (the pump's consumers, polls, ingest and report router) for them, over rpc like
any client, and keeps an hour of samples: the rates of the last minute and the plots of the
web console come from them. L{Sampler.status} is what C{ion status} prints (op C{status} of
C{cc_<containerid>}) and C{/api/status} serves; L{Sampler.pump} is C{/api/pump}.

A worker's row says what it did (C{done}: files delivered, announced, published or reports
forwarded), what failed, its queue, its rates and its last error with its age. Its state is
shown as C{down (heartbeat past due)} when its stats carry a C{heartbeat} whose C{due} time
has passed (the pump's heartbeat files, L{ion.apps.pump.heartbeat}: the process answers but
its heartbeat stopped, a stuck disk say) and C{down (link)} when they say its C{link} is down.
"""

import collections
import json
import os

from twisted.internet import defer, task

CONFIG = "ion.core.cc"
HOUR = 3600
WINDOW = 60  # seconds the rates are taken over
# The counter that says what a worker did, by the first key its stats have.
DONE_KEYS = ("delivered", "announced", "published", "forwarded")
# Seconds past its due time before a heartbeat counts as missed.
HEARTBEAT_GRACE = 1.0


def process_tree(container):
    """Rows (dicts) of the live processes, each parent followed by its children, with the app
    it belongs to, its depth in the tree and how often its supervisor restarted it."""
    app_of = {app.state.pid: app.name for app in container.apps.running.values()
              if getattr(app.state, "pid", None)}
    rows = []

    def walk(proc, depth, app, restarts):
        app = app_of.get(proc.pid, app)
        rows.append({"pid": proc.pid, "name": proc.name, "class": type(proc).__name__,
                     "state": proc.state, "app": app, "depth": depth, "restarts": restarts,
                     "parent": proc.parent.pid if proc.parent else None})
        # A supervisor counts restarts by child id: child() has each of them.
        restarts = getattr(proc, "restarts", {})
        counts = {getattr(proc.child(c), "pid", None): n for c, n in restarts.items()}
        for child in list(proc.children):
            walk(child, depth + 1, app, counts.get(child.pid, 0))

    for proc in container.registry.top_level():
        walk(proc, 0, None, 0)
    return rows


def _failed(stats):
    if isinstance(stats.get("failures"), dict):
        return sum(n for n in stats["failures"].values() if isinstance(n, int))
    # A poll's failed passes, an ingest's invalid notices, a watch's errors.
    for key in ("failed_passes", "invalid", "errors"):
        if isinstance(stats.get(key), int):
            return stats[key]
    return 0


def _done(stats):
    return next((stats[k] for k in DONE_KEYS if isinstance(stats.get(k), int)), 0)


def _bytes(stats):
    return stats.get("bytes_received", stats.get("bytes", 0)) or 0


def _state(state, stats, now):
    """A worker's state as shown: C{down} when its heartbeat (C{stats['heartbeat']}, a dict
    with C{due}) is past due at C{now} or its link (C{stats['link']}) is down."""
    heartbeat = stats.get("heartbeat")
    due = heartbeat.get("due") if isinstance(heartbeat, dict) else None
    if isinstance(due, (int, float)) and now > due + HEARTBEAT_GRACE:
        return "down (heartbeat past due)"
    if stats.get("link") == "down":
        return "down (link)"
    return state


class Sampler:
    """Samples the stats of the container's workers (see the module docstring)."""

    def __init__(self, process, keep=HOUR):
        self.process = process
        self.container = process.container
        self.keep = keep
        self.samples = collections.deque()  # (time, {process name: stats})
        self.started = self.container.clock.seconds()
        self._loop = None

    @property
    def interval(self):
        return self.container.config.get(CONFIG, "sample_interval", 5)

    def start(self):
        self._loop = task.LoopingCall(self.sample)
        self._loop.clock = self.container.clock
        self._loop.start(self.interval, now=False).addErrback(
            lambda f: self.process.log.failure("status: sampling failed", f))

    def stop(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def workers(self):
        return [p for p in self.container.registry
                if callable(getattr(p, "op_stats", None)) and not p.lifecycle.final]

    async def sample(self):
        """Ask every worker for its stats (at once; one that does not answer is left out)."""
        workers = self.workers()
        timeout = max(self.interval, 1)
        answers = await defer.DeferredList(
            [self.process.rpc(p.pid, "stats", timeout=timeout) for p in workers],
            consumeErrors=True)
        now = self.container.clock.seconds()
        taken = {p.name: stats for p, (ok, stats) in zip(workers, answers)
                 if ok and isinstance(stats, dict)}
        self.samples.append((now, taken))
        while self.samples and self.samples[0][0] < now - self.keep:
            self.samples.popleft()
        metrics = self.container.metrics
        for p in workers:
            stats = taken.get(p.name, {})
            key = (p.name, stats.get("subscription") or p.name.rsplit(".", 1)[-1])
            if isinstance(stats.get("queued"), int):
                metrics.queue_depth.set(key, stats["queued"])
            if isinstance(stats.get("retrying"), int):
                metrics.retrying.set(key, stats["retrying"])
        return taken

    def _rates(self, name, window=WINDOW):
        """(files/s, bytes/s) of one worker over the last C{window} seconds (None: unknown)."""
        kept = [(t, s[name]) for t, s in self.samples if name in s]
        if len(kept) < 2:
            return None, None
        end_time, end = kept[-1]
        start_time, start = next(((t, s) for t, s in kept if t >= end_time - window), kept[0])
        if start_time == end_time:
            start_time, start = kept[-2]
        elapsed = end_time - start_time
        files, size = _done(end) - _done(start), _bytes(end) - _bytes(start)
        if files < 0 or size < 0:  # restarted: counting from zero again
            files, size = _done(end), _bytes(end)
        return files / elapsed, size / elapsed

    def status(self):
        """The container, its process tree, and one row per worker with its counts."""
        container = self.container
        now = container.clock.seconds()
        tree = process_tree(container)
        latest = self.samples[-1][1] if self.samples else {}
        rows = []
        for row in tree:
            stats = latest.get(row["name"])
            if stats is None:
                continue
            files, size = self._rates(row["name"])
            failures = stats.get("last_failures") or []
            last = failures[-1] if failures else None
            rows.append({
                # An instance in an OS process of its own names the class it runs there.
                "name": row["name"], "kind": stats.get("kind") or row["class"],
                "pid": row["pid"], "os_pid": stats.get("os_pid"),
                "state": _state(row["state"], stats, now), "restarts": row["restarts"],
                "queued": stats.get("queued"), "files_per_s": files, "bytes_per_s": size,
                "done": _done(stats), "failed": _failed(stats),
                "delivered": stats.get("delivered"),
                "retrying": stats.get("retrying"),
                "last_error": last and dict(last, age=round(now - last["time"], 1)),
            })
        return {
            "container": {
                "id": container.id, "sysname": container.sysname, "os_pid": os.getpid(),
                "uptime": round(now - self.started, 1), "apps": list(container.apps.running),
                "processes": len(tree),
                "restarts": sum(row["restarts"] for row in tree),
            },
            "processes": tree,
            "workers": rows,
            "sampled": self.samples[-1][0] if self.samples else None,
        }

    def pump(self):
        """The pump page's data: the workers' rows and stats, an hour of total rates, reports
        by code, the last 50 failures, the retry queues and the transfers under way."""
        status = self.status()
        latest = self.samples[-1][1] if self.samples else {}
        history, before = [], None
        for t, taken in self.samples:
            totals = (t, sum(_done(s) for s in taken.values() if "delivered" in s),
                      sum(_bytes(s) for s in taken.values() if "delivered" in s))
            if before is not None and t > before[0]:
                elapsed = t - before[0]
                history.append([t, max(totals[1] - before[1], 0) / elapsed,
                                max(totals[2] - before[2], 0) / elapsed])
            before = totals
        reports, failures, transfers = collections.Counter(), [], []
        for name, stats in latest.items():
            for codes in (stats.get("by_source") or {}).values():
                if isinstance(codes, dict):
                    reports.update({str(c): n for c, n in codes.items() if isinstance(n, int)})
            failures += [dict(f, process=name) for f in stats.get("last_failures") or []]
            transfers += [dict(t, process=name) for t in stats.get("transfers") or []]
        failures.sort(key=lambda f: f.get("time") or 0)
        return {
            "workers": status["workers"],
            "stats": latest,
            "history": history,
            "reports": dict(sorted(reports.items())),
            "failures": failures[-50:],
            "retrying": sum(s.get("retrying") or 0 for s in latest.values()),
            "transfers": transfers,
        }


def human(value, unit=""):
    """A rate or size for people: C{1.2 k}, C{3.4 MB}; C{-} for unknown."""
    if value is None:
        return "-"
    for prefix in ("", "k", "M", "G", "T"):
        if abs(value) < 1000 or prefix == "T":
            return f"{value:.1f} {prefix}{unit}".rstrip()
        value /= 1000


def status_table(statuses):
    """C{ion status}: the headings, rows and the total line of the statuses of containers
    (a list of what L{Sampler.status} returns), like C{sr3 status}."""
    rows, workers = [], 0
    totals = {"delivered": 0, "failed": 0, "files_per_s": 0.0, "bytes_per_s": 0.0, "queued": 0}
    for status in statuses:
        c = status["container"]
        rows.append((c["id"], "container", "running", c["restarts"], "", "", "", "", "",
                     f"{len(c['apps'])} apps, {c['processes']} processes"))
        for w in status["workers"]:
            workers += 1
            # What was delivered, and how fast, is the consumers'; what failed is anyone's.
            for key in totals if w.get("delivered") is not None else ("failed", "queued"):
                totals[key] += w.get(key) or 0
            error = w.get("last_error")
            rows.append((
                f"  {w['name']}", w["kind"], w["state"], w["restarts"],
                "-" if w.get("queued") is None else w["queued"], human(w["files_per_s"]),
                human(w["bytes_per_s"], "B"), w["done"], w["failed"],
                f"{error['code']} {error['reason']} ({error['age']:.0f} s ago)" if error else "",
            ))
    headings = ("NAME", "KIND", "STATE", "RESTARTS", "QUEUED", "FILES/S", "BYTES/S", "DONE",
                "FAILED", "LAST ERROR")
    total = (f"{len(statuses)} container{'s' * (len(statuses) != 1)}, {workers} workers: "
             f"{totals['delivered']} delivered, {totals['failed']} failed, "
             f"{totals['queued']} queued, "
             f"{human(totals['files_per_s'])} files/s, {human(totals['bytes_per_s'], 'B')}/s")
    return headings, rows, total


async def read_console(reactor, url, timeout, credentials=None):
    """The status (L{Sampler.status}) served by the web console at C{url}, with the token of
    its C{http://console@HOST:PORT/} line in the credentials file (C{credentials}, else the
    default one, when it exists). TransportError when it cannot be reached; ValueError when it
    refuses the token or C{url} is no console."""
    from urllib.parse import urlsplit

    from twisted.web.client import Agent, readBody
    from twisted.web.http_headers import Headers

    from ion.core.credentials import DEFAULT_CREDENTIALS, Credentials
    from ion.core.messaging.transport import TransportError

    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"--web: expected http://HOST:PORT, got {url!r}")
    headers = Headers()
    path = os.path.expanduser(credentials or DEFAULT_CREDENTIALS)
    if credentials or os.path.exists(path):
        token = Credentials.load(path).password(
            f"http://console@{parts.hostname}:{parts.port or 80}/")
        if token:
            headers.addRawHeader(b"authorization", f"Bearer {token}".encode())
    target = f"{url.rstrip('/')}/api/status".encode()
    try:
        asking = Agent(reactor).request(b"GET", target, headers)
        asking.addTimeout(timeout, reactor)
        response = await asking
        body = await readBody(response)
    except Exception as e:
        raise TransportError(
            f"cannot reach the web console at {url}: {e or 'timed out'} (is the container "
            "running with --web? give its address with --web URL)") from None
    if response.code == 401:
        raise ValueError(f"the web console at {url} needs a token: add the line for "
                         f"http://console@{parts.hostname}:{parts.port or 80}/ to {path}, "
                         "the token as its password (console:TOKEN)")
    try:
        status = json.loads(body)
        status["container"]["id"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{url} answered {response.code}, not an ION console status") from None
    return status
