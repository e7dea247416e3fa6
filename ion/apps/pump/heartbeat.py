"""Heartbeat files: a consumer or sender says, every N seconds, that it is alive and how it does.

With C{heartbeat: N} a consumer or sender writes C{<state_dir>/<name>.heartbeat} every N
seconds of the container's clock, a JSON object::

    {"name": "sender obs", "time": 1767225600.0, "next_within": 60, "due": 1767225660.0,
     "files_done": 1200, "failures": 3, "link": "up"}

C{time} is when it was written (epoch seconds), C{due} when the next one will be there at the
latest (C{time + next_within}): a file past due means the process, its machine or (for a remote
copy) the link is down. C{files_done} counts the files delivered since the process started,
C{failures} those given up on, C{link} the state of its link (L{ion.apps.pump.link}: C{up},
C{down}, or C{idle} before the first transfer).

The file is written to a temporary name beside it and renamed over it, in a thread of the
process's pool (never on the reactor thread), so a reader never sees half of one. A beat whose
previous write has not finished is skipped (a stuck disk makes the file go past due, which is
the point). With C{heartbeat_remote: True} a sender then puts the file at its destination
(C{<destination>/<name>.heartbeat}), through the same transfers as its files, so a monitor on
the server sees the link itself; a failed push is logged at debug and tried at the next beat.

The process's C{stats} carry the last heartbeat written (C{heartbeat}); C{ion status} and
the console show a process whose heartbeat is past due, or whose link is down, as down.
"""

import json
import os

from twisted.internet import defer, task, threads
from twisted.python.failure import Failure

def write_atomically(path, data):
    """Write C{data} (bytes) to C{path} through a temporary file renamed over it. Blocking."""
    directory, name = os.path.split(path)
    temp = os.path.join(directory, f".{name}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(temp, path)


class Heartbeat:
    """
    Writes C{path} every C{every} seconds of C{clock} with what C{state()} returns (a dict
    with files_done, failures, link) and, with C{push}, calls C{push(path)} (an awaitable)
    after each write. See the module docstring.
    """

    def __init__(self, clock, reactor, pool, path, every, name, state, log, push=None):
        self.clock = clock
        self.reactor = reactor
        self.pool = pool
        self.path = path
        self.every = every
        self.name = name
        self.state = state
        self.log = log
        self.push = push
        self.last = None  # the last heartbeat written
        self.skipped = 0
        self._busy = None
        self._loop = None

    def start(self):
        """The first beat now, then one every C{every} seconds."""
        self._loop = task.LoopingCall(self.beat)
        self._loop.clock = self.clock
        self._loop.start(self.every, now=True)

    def stop(self):
        """No more beats; a Deferred firing once a write under way is done."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return self._busy or defer.succeed(None)

    def content(self):
        """The heartbeat to write now."""
        now = self.clock.seconds()
        return dict(
            {"name": self.name, "time": now, "next_within": self.every, "due": now + self.every},
            **self.state(),
        )

    def beat(self):
        """Write (and push) one heartbeat unless the last one is still on its way."""
        if self._busy is not None:
            self.skipped += 1
            return
        heartbeat = self.content()
        data = json.dumps(heartbeat).encode("ascii") + b"\n"
        busy = self._busy = defer.Deferred.fromCoroutine(self._write(heartbeat, data))
        busy.addBoth(self._done)

    async def _write(self, heartbeat, data):
        try:
            await threads.deferToThreadPool(
                self.reactor, self.pool, write_atomically, self.path, data
            )
        except OSError as e:
            self.log.warn("{name}: cannot write {path}: {error}", name=self.name,
                          path=self.path, error=e.strerror or e)
            return
        self.last = heartbeat
        if self.push is not None:
            try:
                await self.push(self.path)
            except Exception as e:
                self.log.debug("{name}: heartbeat not pushed: {error}", name=self.name, error=e)

    def _done(self, result):
        self._busy = None
        if isinstance(result, Failure):
            self.log.failure("{name}: heartbeat failed", result, name=self.name)
