"""A process of the container that runs another process in an OS process of its own: one
instance of a pump flow with C{instances: N}, for work one Python process cannot carry.

L{OSInstance} is an ordinary process to its supervisor. Activating it starts C{python -m
ion.core.cc.instance} (L{ion.core.cc.instance}) with the container's working directory and
environment, and writes one line to the child's stdin: a Python literal with the broker URL and TLS
files, the sysname, the config layers, the resource directory, and the spec, name and args of the
process to run (the URL's password travels there, never on the command line). The child starts a
container of its own on the same broker, spawns that process, and says C{READY <class>} on stdout;
only then is the instance active. A child that ends before that fails the activation with its last
line of stderr (exit status 2, bad input, fails it as a ValueError).

The pipe to the child's stdin stays open while the instance lives: the child stops when it
reads end-of-file, so it ends with the container however the container ends (a stop, SIGTERM,
or kill -9: the kernel closes the pipe). Terminating the instance closes the pipe and waits
for the child to stop its process (which takes the process's own stop grace), killing it after
C{shutdown} seconds (arg, default 30). A child that exits without being asked crashes the
instance: its supervisor restarts it (a new OS process) under its intensity rules.

The child's log lines come to the container's log, each under its own namespace and level
and led by the instance's name. The instance answers C{stats} with those of the process it
runs (asked over the broker by its name, which the child's process serves), plus C{kind} (its
class) and C{os_pid}: C{ion status} shows each instance as its own row.

Args: C{spec}, C{name}, C{args} (of the process to run), C{shutdown} and C{start_timeout}
(seconds, defaults 30 and 120: a child not ready by then is killed).
"""

import os
import re
import sys

from twisted.internet import defer, error, protocol
from twisted.logger import Logger, LogLevel

import ion
from ion.core.process.process import Process
from ion.core.process.statedir import EnvironmentFailure

_CODE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(ion.__file__)))

READY = b"READY"
_LINE = re.compile(r"^\S+ \[(?P<namespace>[^\]#]+)#(?P<level>\w+)\] (?P<text>.*)$", re.S)
_KEEP_ERRORS = 20


class _Child(protocol.ProcessProtocol):
    def __init__(self, instance):
        self.instance = instance
        self.ready = defer.Deferred()
        self.ended = defer.Deferred()
        self.errors = []  # the last lines of stderr
        self._buffers = {1: b"", 2: b""}

    def childDataReceived(self, fd, data):
        buffer = self._buffers.get(fd, b"") + data
        *lines, self._buffers[fd] = buffer.split(b"\n")
        for line in lines:
            self._line(fd, line.decode("utf-8", "replace"))

    def _line(self, fd, line):
        words = line.split()
        if fd == 1 and words[:1] == [READY.decode()] and not self.ready.called:
            self.ready.callback(words[1] if len(words) > 1 else None)
            return
        if fd == 2:
            self.errors = (self.errors + [line])[-_KEEP_ERRORS:]
        self.instance._relay(line)

    def processEnded(self, reason):
        for fd, rest in self._buffers.items():
            if rest:
                self._line(fd, rest.decode("utf-8", "replace"))
        self._buffers = {}
        code = getattr(reason.value, "exitCode", None)
        signal = getattr(reason.value, "signal", None)
        if not self.ready.called:
            self.ready.errback(_StartFailed(code, self.errors))
        self.ended.callback((code, signal))


class _StartFailed(Exception):
    def __init__(self, code, errors):
        self.code = code
        # The child's own error line, not one of its log lines.
        last = next((line for line in reversed(errors)
                     if line.strip() and not _LINE.match(line)), "")
        super().__init__(last or f"exited with status {code} before it was ready")


class InstanceFailed(EnvironmentFailure):
    """The child failed to start its process: its own error line, reported in one line."""


class InstanceRefused(InstanceFailed, ValueError):
    """The child refused its process for bad input (exit status 2: bad arguments, a state
    directory another live process owns): exit status 2 at boot, as in this process."""


class OSInstance(Process):
    """One process run in an OS process of its own (see the module docstring)."""

    def on_init(self):
        args = self.args
        if not isinstance(args.get("spec"), str) or not isinstance(args.get("args", {}), dict):
            raise ValueError(f"{self.name}: an OS instance needs spec (a string) and args")
        self.target = args.get("name") or self.name
        self.shutdown = args.get("shutdown", 30)
        self.start_timeout = args.get("start_timeout", 120)
        self.kind = None
        self.os_pid = None
        self._child = None
        self._transport = None
        self._stopping = False

    def _launch(self):
        container = self.container
        return {
            "broker_url": container.broker_url,
            "broker_tls": dict(container.broker_tls),
            "sysname": container.sysname,
            "config": container.config.layers,
            "res_dir": os.path.abspath(container.res_dir),
            "container_id": f"{container.id}-{self.target}",
            "spec": self.args["spec"],
            "name": self.target,
            "args": dict(self.args.get("args", {})),
        }

    async def on_activate(self):
        if self.container.broker_url is None:
            raise ValueError(f"{self.name}: OS instances need a broker URL (amqp://)")
        child = self._child = _Child(self)
        env = dict(os.environ)
        # The child runs the code this process runs, wherever it was imported from.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_CODE_ROOT, env.get("PYTHONPATH")) if p
        )
        self._transport = self.container.reactor.spawnProcess(
            child,
            sys.executable,
            [sys.executable, "-m", "ion.core.cc.instance"],
            env=env,
            path=os.getcwd(),
            childFDs={0: "w", 1: "r", 2: "r"},
        )
        self.os_pid = self._transport.pid
        self._transport.write(repr(self._launch()).encode("utf-8") + b"\n")
        reactor = self.container.reactor
        timer = reactor.callLater(self.start_timeout, self._kill, "start")
        try:
            self.kind = await child.ready
        except _StartFailed as e:
            raise (InstanceRefused if e.code == 2 else InstanceFailed)(str(e)) from None
        finally:
            if timer.active():
                timer.cancel()
        child.ended.addCallback(self._ended)
        self.log.info("{name}: running in OS process {pid}", name=self.target, pid=self.os_pid)

    def _ended(self, result):
        code, signal = result
        if self._stopping or self.lifecycle.final:
            return
        how = f"killed by signal {signal}" if signal else f"exited with status {code}"
        d = defer.Deferred.fromCoroutine(self.crash(f"OS process {self.os_pid} {how}"))
        d.addErrback(lambda f: self.log.failure("{name}: crash failed", f, name=self.target))

    def _relay(self, line):
        if not line.strip():
            return
        parsed = _LINE.match(line)
        namespace, level, text = "ion.instance", LogLevel.warn, line
        if parsed:
            namespace, text = parsed["namespace"], parsed["text"]
            try:
                level = LogLevel.levelWithName(parsed["level"])
            except Exception:
                level = LogLevel.info
        Logger(namespace=namespace).emit(level, "[{instance}] {text}", instance=self.target,
                                         text=text)

    async def on_terminate(self):
        """Close the child's stdin and wait for it to end, killing it after C{shutdown} s."""
        self._stopping = True
        child, transport = self._child, self._transport
        if child is None or child.ended.called:
            return
        transport.closeStdin()
        ended = defer.Deferred()
        child.ended.addBoth(lambda r: (ended.called or ended.callback(None), r)[1])
        timer = self.container.reactor.callLater(self.shutdown, self._kill, "stop")
        await ended
        if timer.active():
            timer.cancel()

    def _kill(self, why=None):
        try:
            self._transport.signalProcess("KILL")
        except error.ProcessExitedAlready:
            return
        if why == "stop":
            self.log.warn("{name}: OS process {pid} did not stop within {s} s; killed",
                          name=self.target, pid=self.os_pid, s=self.shutdown)
        elif why == "start":
            self.log.warn("{name}: OS process {pid} not ready within {s} s; killed",
                          name=self.target, pid=self.os_pid, s=self.start_timeout)

    async def crash(self, reason):
        if not self.lifecycle.final:
            # Its child must not outlive it: the supervisor starts another in its place.
            self._stopping = True
            if self._child is not None and not self._child.ended.called:
                self._kill()
        await super().crash(reason)

    async def op_stats(self, content, headers):
        """The stats of the process run in the child, with C{kind} and C{os_pid}."""
        stats = await self.rpc(self.target, "stats", content)
        if isinstance(stats, dict):
            stats = dict(stats, kind=self.kind, os_pid=self.os_pid)
        return stats
