"""Supervisor: a process that starts child processes in order and stops them in reverse.

Child specs are dicts: `{'id': 'worker1', 'spec': 'pkg.module[:Class]', 'name': None,
'args': {}}`. Children are spawned one at a time, in list order, when the supervisor
initializes; terminating the supervisor terminates them last-first, one at a time.
(Restart strategies and intensity limits are the subject of the supervision issue.)
"""

from ion.core.process.process import Process

CHILD_KEYS = {"id", "spec", "name", "args", "restart", "shutdown"}


class Supervisor(Process):
    async def on_init(self):
        specs = self.args.get("children", [])
        for child in specs:
            unknown = set(child) - CHILD_KEYS
            if unknown or "spec" not in child:
                raise ValueError(
                    f"bad child spec {child!r}: needs 'spec'; valid keys are {sorted(CHILD_KEYS)}"
                )
        for child in specs:
            await self.spawn_child(child["spec"], name=child.get("name"), args=child.get("args"))
