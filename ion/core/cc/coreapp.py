"""The core app (C{res/apps/ioncore.app}): the container's own process.

It serves the service C{cc_<containerid>} with ops C{ping} (who and where am I) and C{ps} (the
processes of this container), so tools and other containers can ask a container about itself.
"""

import os

from ion.core.process import ServiceProcess


class ContainerProcess(ServiceProcess):
    def __init__(self, container, pid, name=None, args=None, parent=None):
        args = dict(args or {}, service=f"cc_{container.id}")
        super().__init__(container, pid, name, args, parent)
        self.started = container.clock.seconds()

    def op_ping(self, content, headers):
        return {
            "container": self.container.id,
            "sysname": self.container.sysname,
            "os_pid": os.getpid(),
            "uptime": round(self.container.clock.seconds() - self.started, 3),
        }

    def op_ps(self, content, headers):
        return [list(row) for row in self.container.ps()]


def start(container, app):
    return container.spawn(ContainerProcess)
