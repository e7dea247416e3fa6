"""The processes of one container: their pids, and how a spec becomes a process.

A spawn spec is a Process subclass, or a string: C{'pkg.module:Class'}, C{'pkg.module.Class'}, or
C{'pkg.module'} when that module names its process class in C{process_class} (or defines exactly
one Process subclass). Spawning returns only when the new process is ACTIVE and can receive.
"""

import importlib
import inspect
import itertools

from ion.core.process.process import Process


class SpawnError(Exception):
    """A spawn spec could not be turned into a process."""


def resolve(spec):
    """The Process subclass a spawn spec names; SpawnError with a clear message otherwise."""
    if inspect.isclass(spec):
        if issubclass(spec, Process):
            return spec
        raise SpawnError(f"{spec!r} is not a Process subclass")
    if not isinstance(spec, str) or not spec:
        raise SpawnError(f"cannot spawn {spec!r}: give a Process class or 'module[:Class]'")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if attr or "." not in module_name or e.name != module_name:
            raise SpawnError(f"cannot spawn {spec!r}: {e}") from None
        module_name, _, attr = module_name.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise SpawnError(f"cannot spawn {spec!r}: {e}") from None
    if attr:
        cls = getattr(module, attr, None)
        if cls is None:
            raise SpawnError(f"cannot spawn {spec!r}: {module_name} has no {attr!r}")
        return resolve(cls)
    cls = getattr(module, "process_class", None)
    if cls is not None:
        return resolve(cls)
    found = [
        c
        for c in vars(module).values()
        if inspect.isclass(c) and issubclass(c, Process) and c.__module__ == module.__name__
    ]
    if len(found) != 1:
        raise SpawnError(
            f"cannot spawn {spec!r}: the module defines {len(found)} process classes; "
            "name one as 'module:Class' or set process_class in the module"
        )
    return found[0]


class ProcessRegistry:
    """Pids and names of the live processes of one container."""

    def __init__(self, container_id):
        self.container_id = container_id
        self._counter = itertools.count(1)
        self._by_pid = {}
        # Bumped on every add and remove: a caller that derives something from the set of
        # processes (a consumer's sibling instances, looked up per message) can keep it
        # until this changes instead of scanning every process again.
        self.version = 0

    def next_pid(self):
        return f"{self.container_id}.{next(self._counter)}"

    def __iter__(self):
        return iter(list(self._by_pid.values()))

    def get(self, pid):
        """The live process with that pid, or None."""
        return self._by_pid.get(pid)

    def add(self, proc):
        self._by_pid[proc.pid] = proc
        self.version += 1
        proc.add_exit_observer(self.remove)

    def remove(self, proc):
        if self._by_pid.pop(proc.pid, None) is not None:
            self.version += 1

    def top_level(self):
        """Processes without a parent, in spawn order."""
        return [p for p in self._by_pid.values() if p.parent is None]
