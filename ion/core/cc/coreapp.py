"""The core app (C{res/apps/ioncore.app}): the container's own process.

It serves the service C{cc_<containerid>} with ops C{ping} (who and where am I), C{ps} (the
processes of this container) and C{status} (the process tree and the counts of the workers, see
L{ion.core.cc.status}), so tools and other containers can ask a container about itself. It
samples the workers' stats and tells the container's metrics what is cheaper read than kept.
"""

import os

from ion.core.cc.status import Sampler, process_tree
from ion.core.process import ServiceProcess


class ContainerProcess(ServiceProcess):
    def __init__(self, container, pid, name=None, args=None, parent=None):
        args = dict(args or {}, service=f"cc_{container.id}")
        super().__init__(container, pid, name, args, parent)
        self.started = container.clock.seconds()
        self.sampler = Sampler(self)

    def on_activate(self):
        self.sampler.start()
        self.container.metrics.probes.append(self._probe)

    def on_terminate(self):
        self.sampler.stop()
        if self._probe in self.container.metrics.probes:
            self.container.metrics.probes.remove(self._probe)

    def _probe(self):
        metrics = self.container.metrics
        for row in process_tree(self.container):
            yield metrics.restarts, (row["app"] or "", row["name"]), row["restarts"]
        for proc in self.container.registry:
            yield metrics.conversations, (proc.name,), len(proc.conversations)

    def op_ping(self, content, headers):
        return {
            "container": self.container.id,
            "sysname": self.container.sysname,
            "os_pid": os.getpid(),
            "uptime": round(self.container.clock.seconds() - self.started, 3),
        }

    def op_ps(self, content, headers):
        return [list(row) for row in self.container.ps()]

    def op_status(self, content, headers):
        return self.sampler.status()


def start(container, app):
    return container.spawn(ContainerProcess)
