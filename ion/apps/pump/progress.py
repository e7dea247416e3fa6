"""Progress: one summary line of the pump's deliveries every C{interval} seconds (default 10).

L{Progress} asks the consumers and polls named in C{consumers} and C{polls} (child ids in the
pump's supervisor, e.g. C{consumer.pump}) for their C{stats} each interval and logs, at info::

    pump: 12.4 files/s, 3.1 MB/s; 1240 delivered; 310 queued, 8 in hand, 0 retrying; failures: none

files/s counts deliveries since the previous line, bytes/s bytes received (of files delivered,
failed or on their way), followed by C{(limit 2.1 MB/s)} when consumers have a bandwidth limit
(C{byte_rate_max}; the sum of theirs); "queued" is the notices waiting on the broker; "in hand" the
messages taken and not settled yet, with the bytes being fetched, e.g. "2 in hand (1.3 GB
received)"; "retrying" the files in the retry queues; failures count the files given up on, by
report code, and each poll's failed passes (C{failures: poll.source=12}). While nothing moves and
nothing waits, one "idle" line is logged, then nothing until work arrives or the failures change. A
file coming in blocks (a partitioned transfer) adds its own progress, for at most three files: C{;
big.nc: 3/16 blocks, 1.2 GiB of 4.0 GiB}. A consumer not answering in C{timeout} seconds (broker
down, or stuck) is named by its process name instead of being counted as idle::

    pump: 0.0 files/s, 0 B/s; 1240 delivered; 0 queued, 0 in hand, 0 retrying; failures: none; not answering: pump.consumer.pump
"""

from twisted.internet import defer, task

from ion.apps.pump.args import ProgressArgs
from ion.core.process import ServiceProcess


# Files in blocks whose progress a line shows.
MAX_PARTITIONED = 3


def human_bytes(count):
    """A byte rate or size for people: 512 B, 3.1 kB, 12.0 MB..."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000


class Progress(ServiceProcess):
    """Logs the consumers' summary line every interval (see the module docstring)."""

    service_optional = True  # named by the pump app: its name is a service (ion rpc)

    def on_init(self):
        self.settings = ProgressArgs.parse(self.args)
        self._previous = {}  # child id -> (delivered, bytes) at the previous line
        self._last_time = None
        self._idle = False
        self._idle_failed = None
        self._loop = None
        self.last_line = None

    def on_activate(self):
        self._last_time = self.container.clock.seconds()
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.container.clock
        done = self._loop.start(self.settings["interval"], now=False)
        done.addErrback(lambda f: self.log.failure("progress: the loop failed", f))

    def on_terminate(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    async def crash(self, reason):
        self.on_terminate()
        await super().crash(reason)

    def _tick(self):
        d = defer.Deferred.fromCoroutine(self.summarize())
        d.addErrback(lambda f: self.log.failure("progress: summary failed", f))
        return d

    def _running(self, key):
        """(child id, process) of the consumers (C{key} "consumers") or polls running now."""
        parent = self.parent
        found = []
        for child_id in self.settings[key]:
            try:
                proc = parent.child(child_id) if hasattr(parent, "child") else None
            except KeyError:
                proc = None
            if proc is not None and not proc.lifecycle.final:
                found.append((child_id, proc))
        return found

    async def _stats(self, key, silent):
        """[(child id, stats)] of the running consumers or polls (C{key}) that answer; those
        that do not are named in C{silent} (a consumer by its process name)."""
        answers = []
        for child_id, proc in self._running(key):
            try:
                stats = await self.rpc(proc.pid, "stats", timeout=self.settings["timeout"])
            except Exception as e:
                self.log.debug("progress: no stats from {id}: {e}", id=child_id, e=e)
                silent.append(proc.name or child_id if key == "consumers" else child_id)
            else:
                answers.append((child_id, stats))
        return answers

    async def summarize(self):
        """Collect the consumers' stats and log the summary line; returns it (None when it
        was not logged: still idle)."""
        now = self.container.clock.seconds()
        elapsed = max(now - self._last_time, 1e-9)
        self._last_time = now
        totals = {
            "delivered": 0,
            "bytes": 0,
            "queued": 0,
            "in_hand": 0,
            "receiving": 0,
            "retrying": 0,
        }
        new_files = new_bytes = 0
        partitioned = []  # "name: 3/16 blocks, 1.2 GiB of 4.0 GiB" of the files coming in blocks
        limits = []
        failures = {}
        silent = []
        for child_id, stats in await self._stats("consumers", silent):
            delivered, size = stats.get("delivered", 0), stats.get("bytes", 0)
            # Received, not delivered, bytes make the rate: a long transfer shows its own.
            received = stats.get("bytes_received", 0)
            receiving = stats.get("bytes_in_flight", 0)
            before = self._previous.get(child_id, (0, 0))
            if delivered < before[0] or received < before[1]:
                before = (0, 0)  # a restarted consumer counts from zero again
            new_files += delivered - before[0]
            new_bytes += received - before[1]
            self._previous[child_id] = (delivered, received)
            totals["delivered"] += delivered
            totals["bytes"] += size
            totals["receiving"] += receiving
            if stats.get("byte_rate_max"):
                limits.append(stats["byte_rate_max"])
            for key in ("queued", "in_hand", "retrying"):
                totals[key] += stats.get(key) or 0
            for code, n in (stats.get("failures") or {}).items():
                failures[code] = failures.get(code, 0) + n
            for running in stats.get("transfers") or ():
                if running.get("blocks"):
                    name = str(running.get("file", "")).rsplit("/", 1)[-1]
                    partitioned.append(f"{name}: {running['blocks']}")
        for child_id, stats in await self._stats("polls", silent):
            if stats.get("failed_passes"):
                failures[child_id] = stats["failed_passes"]
        busy = new_files or totals["queued"] or totals["in_hand"] or totals["retrying"] or silent
        failed = ", ".join(f"{code}={n}" for code, n in sorted(failures.items(), key=str)) or "none"
        # Idle is said once, and again only when failures (a poll's, say) change it.
        if not busy and self._idle and failed == self._idle_failed:
            return None
        self._idle = not busy
        self._idle_failed = failed
        if busy:
            line = (
                f"{self.settings['name']}: {new_files / elapsed:.1f} files/s, "
                f"{human_bytes(new_bytes / elapsed)}/s"
                + (f" (limit {human_bytes(sum(limits))}/s)" if limits else "")
                + f"; {totals['delivered']} delivered; "
                f"{totals['queued']} queued, {totals['in_hand']} in hand"
                + (f" ({human_bytes(totals['receiving'])} received)" if totals["receiving"] else "")
                + f", {totals['retrying']} retrying; failures: {failed}"
            )
            if partitioned:
                shown = "; ".join(partitioned[:MAX_PARTITIONED])
                more = len(partitioned) - MAX_PARTITIONED
                line += f"; {shown}" + (f" (and {more} more)" if more > 0 else "")
            if silent:
                line += f"; not answering: {', '.join(silent)}"
        else:
            line = (
                f"{self.settings['name']}: idle; {totals['delivered']} delivered "
                f"({human_bytes(totals['bytes'])}); failures: {failed}"
            )
        self.last_line = line
        self.log.info("{line}", line=line)
        return line


process_class = Progress
