"""Supervisor: a process that starts child processes, restarts them when they end, and gives up
(which its own parent sees as a crash) when they end too often.

For example::

    container.spawn(Supervisor, name="pump-sup", args={
        "children": [
            {"id": "reader", "spec": "ion.apps.pump.reader"},
            {"id": "writer", "spec": "ion.apps.pump.writer:Writer", "args": {"dir": "out"},
             "restart": "transient", "shutdown": 10000},
        ],
        "strategy": "rest_for_one",      # default one_for_one
        "intensity": 3, "period": 10,    # the defaults: over 3 restarts within 10 s is too many
    })

Child spec keys: C{id} (required, unique among the siblings), C{spec} (required: a Process
subclass or C{'module[:Class]'}), C{name} and C{args} (passed to spawn), C{restart} and C{shutdown}
(below). Specs and arguments are checked when the supervisor is created: a bad one is a
ValueError saying which child and which key.

Start: children start in list order, one at a time, while the supervisor initializes. If one
fails to start, those already started are stopped in reverse and the supervisor fails to start
with ChildStartError naming the child.

Stop: terminating the supervisor stops its children in reverse order, one at a time, before it
stops itself. A child gets C{shutdown} ms (default 5000; None waits for ever, as a child that is a
supervisor may need) to terminate; after that its terminate is cancelled, it is abandoned as
FAILED and the supervisor carries on. Children ending while the supervisor stops are not
restarted.

How a child ended decides whether it is restarted: FAILED (a hook raised, or it crashed) is an
abnormal exit; TERMINATED without the supervisor asking is a normal exit. C{permanent} children
(the default) are restarted after either, C{transient} ones only after an abnormal exit,
C{temporary} ones never. A child that is not restarted stays stopped, also when a later restart
of its siblings' group happens.

Strategies, for a child that is to be restarted:

  - one_for_one: restart just that child;
  - one_for_all: stop all the other children (in reverse order), then start them all in order;
  - rest_for_one: stop the children listed after it (in reverse), then start it and them in order.

Intensity: each such restart is counted (a group restart counts once, a restart that fails to
start counts again and is retried). More than C{intensity} restarts within C{period} seconds of
C{container.clock} and the supervisor gives up: it stops its children in reverse and crashes,
so that its parent supervisor restarts it by its own rules (escalation) or, at the top of an
app, the app is reported failed.

A restarted child is a new process with a new pid; C{child(id)} is the current one and
C{restarts[id]} counts how often that child was started again.
"""

import attrs
from twisted.internet import defer, task

from ion.core.process.lifecycle import FAILED, IllegalTransition
from ion.core.process.process import Process
from ion.core.process.statedir import EnvironmentFailure

RESTART_TYPES = ("permanent", "transient", "temporary")
STRATEGIES = ("one_for_one", "one_for_all", "rest_for_one")


def _non_negative(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


# key -> (default, check, what is valid), in the order of the checks (and of ChildSpec's fields).
CHILD_KEYS = {
    "id": (None, lambda v: isinstance(v, str) and v, "a non-empty string"),
    "spec": (None, lambda v: isinstance(v, (str, type)), "a Process class or 'module[:Class]'"),
    "name": (None, lambda v: v is None or isinstance(v, str), "a string"),
    "args": ({}, lambda v: isinstance(v, dict), "a dict"),
    "restart": ("permanent", lambda v: v in RESTART_TYPES, f"one of {', '.join(RESTART_TYPES)}"),
    "shutdown": (5000, lambda v: v is None or _non_negative(v), "milliseconds (>= 0) or None"),
}
SUPERVISOR_KEYS = {
    "strategy": ("one_for_one", lambda v: v in STRATEGIES, f"one of {', '.join(STRATEGIES)}"),
    "intensity": (3, lambda v: isinstance(v, int) and _non_negative(v), "an int >= 0"),
    "period": (10, lambda v: _non_negative(v) and v > 0, "seconds (> 0)"),
    "children": ([], lambda v: isinstance(v, (list, tuple)), "a list of child specs"),
}


class ChildStartError(Exception):
    """A supervisor could not start one of its children (C{child_id}); the cause is chained.
    C{bad_input} is true when the cause was bad arguments or configuration (a ValueError),
    C{environment} when it was an L{EnvironmentFailure}."""

    def __init__(self, supervisor, child_id, error):
        self.child_id = child_id
        self.bad_input = isinstance(error, ValueError) or getattr(error, "bad_input", False)
        self.environment = isinstance(error, EnvironmentFailure) or getattr(
            error, "environment", False
        )
        # An expected error's message says it all; a bug's type helps.
        kind = "" if self.bad_input or self.environment else f"{type(error).__name__}: "
        super().__init__(
            f"supervisor {supervisor}: child {child_id!r} failed to start: {kind}{error}"
        )


@attrs.frozen
class ChildSpec:
    """One checked child spec (see the module docstring for the keys)."""

    id: str
    spec: object
    name: object
    args: dict = attrs.field(converter=dict)
    restart: str
    shutdown: object


def _checked(given, checks, prefix, noun, plural):
    """The values of C{given} for the keys of C{checks}, in order, defaults filled in; a
    ValueError starting with C{prefix} for the first unknown key or invalid value."""
    unknown = sorted(set(given) - set(checks), key=str)
    if unknown:
        valid = ", ".join(sorted(checks))
        raise ValueError(f"{prefix}unknown {noun} {unknown[0]!r}; valid {plural} are {valid}")
    values = []
    for key, (default, check, what) in checks.items():
        values.append(given.get(key, default))
        if not check(values[-1]):
            raise ValueError(f"{prefix}{noun} {key!r} must be {what}, got {values[-1]!r}")
    return values


def check_child_specs(children):
    """The child specs (a list) as [ChildSpec], in order; ValueError naming the child and key
    otherwise."""
    checked = []
    for i, child in enumerate(children):
        where = f"child spec {i}"
        if not isinstance(child, dict):
            raise ValueError(f"{where}: must be a dict, got {child!r}")
        if isinstance(child.get("id"), str):
            where = f"child spec {i} ({child['id']!r})"
        for key in ("id", "spec"):
            if key not in child:
                raise ValueError(f"{where}: missing key {key!r}")
        spec = ChildSpec(*_checked(child, CHILD_KEYS, f"{where}: ", "key", "keys"))
        if any(spec.id == other.id for other in checked):
            raise ValueError(f"{where}: duplicate id {spec.id!r}; ids must be unique")
        checked.append(spec)
    return checked


class Supervisor(Process):
    """Starts, watches and restarts child processes (see the module docstring)."""

    def __init__(self, container, pid, name=None, args=None, parent=None):
        super().__init__(container, pid, name, args, parent)
        self.strategy, self.intensity, self.period, children = _checked(
            self.args, SUPERVISOR_KEYS, "", "supervisor argument", "ones"
        )
        self.child_specs = check_child_specs(children)
        self.restarts = {spec.id: 0 for spec in self.child_specs}
        self._running = {}  # child id -> its live process
        self._ended = set()  # ids of children that ended and are not to be restarted
        self._restart_times = []
        # Starts, restarts and stops happen one at a time: child exits seen meanwhile wait.
        self._busy = defer.DeferredLock()
        self._stopping = False

    def child(self, child_id):
        """The current process of child C{child_id}, or None while it is not running."""
        if child_id not in self.restarts:
            raise KeyError(f"supervisor {self.name} has no child {child_id!r}")
        return self._running.get(child_id)

    async def settled(self):
        """Wait until the child exits seen so far are handled (restarts done, or given up)."""
        async with self._busy:
            pass

    # -- starting and stopping --------------------------------------------------------------

    async def on_init(self):
        async with self._busy:
            for spec in self.child_specs:
                try:
                    await self._start_child(spec)
                except Exception as e:
                    self._stopping = True
                    await self._stop_children()
                    raise ChildStartError(self.name, spec.id, e) from e

    async def terminate(self, timeout=None):
        """Stop the children (last first, each within its shutdown time), then this process."""
        await self._stop_for("terminate")
        await super().terminate(timeout)

    async def crash(self, reason):
        """Stop the children (last first, each within its shutdown time), then crash."""
        await self._stop_for("crash")
        await super().crash(reason)

    async def _stop_for(self, event):
        if self.lifecycle.final:
            raise IllegalTransition(self.state, event)
        self._stopping = True
        async with self._busy:
            await self._stop_children()

    async def _start_child(self, spec):
        proc = await self.container.spawn(
            spec.spec, name=spec.name, args=dict(spec.args), parent=self
        )
        self._running[spec.id] = proc
        self._list_children()
        if proc.lifecycle.final:
            self._child_exited(spec.id, proc)
        else:
            proc.add_exit_observer(lambda p: self._child_exited(spec.id, p))

    async def _stop_children(self):
        for spec in reversed(self.child_specs):
            await self._stop_child(spec)

    async def _stop_child(self, spec):
        # Forgotten before it is asked to stop, so that its exit is not taken for a crash.
        proc = self._running.pop(spec.id, None)
        self._list_children()
        if proc is None or proc.lifecycle.final:
            return
        stopping = defer.Deferred.fromCoroutine(proc.terminate())
        stopping.addErrback(self._stop_failed, spec, proc)
        if spec.shutdown is None:
            await stopping
            return
        deadline = task.deferLater(self.container.clock, spec.shutdown / 1000)
        winner, _ = await defer.race([stopping, deadline])
        if winner == 1:
            self.log.error(
                "{sup!r}: child {id!r} ({pid}) did not stop within {ms} ms; abandoned",
                sup=self,
                id=spec.id,
                pid=proc.pid,
                ms=spec.shutdown,
            )
            if not proc.lifecycle.final:
                await proc.crash(f"did not stop within {spec.shutdown} ms")

    def _stop_failed(self, failure, spec, proc):
        # A cancelled terminate is one that overran its shutdown time: logged as abandoned.
        if not failure.check(defer.CancelledError):
            self.log.failure(
                "{sup!r}: child {id!r} ({pid}) failed to terminate",
                failure,
                sup=self,
                id=spec.id,
                pid=proc.pid,
            )

    def _list_children(self):
        self.children = [
            self._running[spec.id] for spec in self.child_specs if spec.id in self._running
        ]

    # -- restarting --------------------------------------------------------------------------

    def _child_exited(self, child_id, proc):
        if self._stopping or self._running.get(child_id) is not proc:
            return
        handling = defer.Deferred.fromCoroutine(self._handle_exit(child_id, proc))
        handling.addErrback(
            lambda f: self.log.failure(
                "{sup!r}: handling the exit of child {id!r} failed", f, sup=self, id=child_id
            )
        )

    async def _handle_exit(self, child_id, proc):
        async with self._busy:
            # Checked again: a group restart or a stop may have replaced it meanwhile.
            if self._stopping or self._running.get(child_id) is not proc:
                return
            del self._running[child_id]
            self._list_children()
            spec = self._spec(child_id)
            abnormal = proc.state == FAILED
            how = "crashed" if abnormal else "exited normally"
            if spec.restart == "temporary" or (spec.restart == "transient" and not abnormal):
                self._ended.add(child_id)
                self.log.info(
                    "{sup!r}: {restart} child {id!r} {how}; not restarted",
                    sup=self,
                    restart=spec.restart,
                    id=child_id,
                    how=how,
                )
                return
            self.log.warn(
                "{sup!r}: child {id!r} ({pid}) {how}", sup=self, id=child_id, pid=proc.pid, how=how
            )
            await self._restart(child_id)

    async def _restart(self, child_id):
        while not self._stopping:
            if not self._count_restart():
                await self._give_up(child_id)
                return
            group = self._group(child_id)
            self.log.info(
                "{sup!r}: restarting {ids} ({strategy})",
                sup=self,
                ids=", ".join(spec.id for spec in group),
                strategy=self.strategy,
            )
            for spec in reversed(group):
                await self._stop_child(spec)
            failed = None
            for spec in group:
                try:
                    await self._start_child(spec)
                except Exception as e:
                    # How it failed is logged where it failed (the child's hook, spawn).
                    self.log.warn(
                        "{sup!r}: child {id!r} failed to restart: {error}",
                        sup=self,
                        id=spec.id,
                        error=e,
                    )
                    failed = spec.id
                    break
                self.restarts[spec.id] += 1
            if failed is None:
                return
            child_id = failed

    def _group(self, child_id):
        """The children restarted along with child_id, in start order."""
        if self.strategy == "one_for_one":
            return [self._spec(child_id)]
        live = [s for s in self.child_specs if s.id not in self._ended]
        if self.strategy == "rest_for_one":
            ids = [s.id for s in live]
            return live[ids.index(child_id) :]
        return live

    def _count_restart(self):
        """Record a restart now; False if that makes too many within the period."""
        now = self.container.clock.seconds()
        self._restart_times = [t for t in self._restart_times if now - t < self.period]
        self._restart_times.append(now)
        return len(self._restart_times) <= self.intensity

    async def _give_up(self, child_id):
        reason = (
            f"more than {self.intensity} restarts within {self.period} s "
            f"(the last for child {child_id!r})"
        )
        self.log.error("{sup!r}: {reason}; giving up", sup=self, reason=reason)
        self._stopping = True
        await self._stop_children()
        # Process.crash: the busy lock is held here, and the children are already stopped.
        await super().crash(reason)

    def _spec(self, child_id):
        return next(spec for spec in self.child_specs if spec.id == child_id)
