"""The container agent (C{res/apps/ccagent.app}): containers of one system know each other.

Every container runs one agent. It announces the container when it starts and stops, sends a
heartbeat every C{heartbeat_interval} seconds (config C{ion.core.cc.agent}, default 5) and keeps a
peer table (container id, host, OS pid, apps, uptime, last heartbeat). A peer silent for
C{missed_heartbeats} intervals (default 3) is dropped, with a log line.

Addresses: C{ccagent} reaches any agent of the system (all keep the whole table);
C{ccagent_<containerid>} reaches one container's agent; broadcasts go to key C{ccagent.events}.
Ops: C{containers}, C{ping}, C{spawn} ({module, name, args} -> pid, in this container),
C{stop_app} (name).
"""

import os
import socket

from twisted.internet import defer, task

from ion.core.process import ApplicationError, ServiceProcess, SpawnError

CONFIG = "ion.core.cc.agent"
EVENTS = "ccagent.events"


class ContainerAgent(ServiceProcess):
    service = "ccagent"

    def on_init(self):
        self.peers = {}
        self.started = self.container.clock.seconds()
        self._beat = None

    async def on_activate(self):
        messenger = self.container.messenger
        for key in (f"ccagent_{self.container.id}", EVENTS):
            await messenger.declare_receiver(self.pid, key, exclusive=True, auto_delete=True)
        await self._broadcast("announce")
        self._beat = task.LoopingCall(self._tick)
        self._beat.clock = self.container.clock
        self._beat.start(self._interval(), now=False)

    async def on_terminate(self):
        if self._beat is not None and self._beat.running:
            self._beat.stop()
        try:
            await self._broadcast("leave")
        except Exception as e:
            self.log.info("could not announce leaving: {e}", e=e)

    def _apps(self):
        """The apps running here, this agent's own included (it announces itself while its
        app is still starting)."""
        apps = list(self.container.apps.running)
        own = self.args.get("app")
        if own and own not in apps:
            apps.append(own)
        return apps

    def _interval(self):
        return self.config("heartbeat_interval", 5, module=CONFIG)

    def info(self):
        return {
            "container": self.container.id,
            "agent": self.pid,
            "host": socket.gethostname(),
            "os_pid": os.getpid(),
            "sysname": self.container.sysname,
            "apps": self._apps(),
            "started": self.started,
        }

    async def _broadcast(self, op):
        await self.send(EVENTS, op, self.info())

    def _tick(self):
        now = self.container.clock.seconds()
        missed = self.config("missed_heartbeats", 3, module=CONFIG)
        limit = self._interval() * missed
        for cid, peer in list(self.peers.items()):
            if cid != self.container.id and now - peer["seen"] > limit:
                del self.peers[cid]
                self.log.warn(
                    "container {cid} missed {n} heartbeats: dropped from the peer table",
                    cid=cid,
                    n=missed,
                )
        d = defer.Deferred.fromCoroutine(self._broadcast("heartbeat"))
        d.addErrback(lambda f: self.log.info("heartbeat not sent: {e}", e=f.value))
        return d

    def _update(self, content):
        if not isinstance(content, dict) or not isinstance(content.get("container"), str):
            raise ApplicationError("agent event without a container id", code=400)
        cid = content["container"]
        is_new = cid not in self.peers
        self.peers[cid] = dict(content, seen=self.container.clock.seconds())
        if is_new and cid != self.container.id:
            self.log.info("container {cid} joined the system", cid=cid)
        return is_new

    async def op_announce(self, content, headers):
        if self._update(content) and content["container"] != self.container.id:
            # Tell the newcomer about us now rather than at our next heartbeat.
            await self.send(content["agent"], "heartbeat", self.info())

    def op_heartbeat(self, content, headers):
        self._update(content)

    def op_leave(self, content, headers):
        if isinstance(content, dict) and self.peers.pop(content.get("container"), None):
            self.log.info("container {cid} left the system", cid=content.get("container"))

    def op_containers(self, content, headers):
        now = self.container.clock.seconds()
        return [
            {
                "container": p["container"],
                "host": p.get("host"),
                "os_pid": p.get("os_pid"),
                "apps": p.get("apps", []),
                "uptime": round(now - p.get("started", now), 1),
                "last_heartbeat": round(now - p["seen"], 1),
            }
            for p in sorted(self.peers.values(), key=lambda p: p["container"])
        ]

    def op_ping(self, content, headers):
        return dict(self.info(), uptime=round(self.container.clock.seconds() - self.started, 3))

    async def op_spawn(self, content, headers):
        if not isinstance(content, dict) or not isinstance(content.get("module"), str):
            raise ApplicationError("spawn wants {'module': 'pkg.module[:Class]', ...}", code=400)
        try:
            proc = await self.container.spawn(
                content["module"], name=content.get("name"), args=content.get("args")
            )
        except SpawnError as e:
            raise ApplicationError(str(e), code=422) from None
        return proc.pid

    async def op_stop_app(self, content, headers):
        if content not in self.container.apps.running:
            raise ApplicationError(f"no app {content!r} runs in {self.container.id}", code=404)
        await self.container.apps.stop(content)
        return content


def start(container, app):
    return container.spawn(ContainerAgent, args={"app": app.name})
