"""
Tests for L{ion.apps.pump.heartbeat}: heartbeat files, their content and timing on a fake clock,
and a sender's heartbeat in its state directory and at its destination.
"""

import json
import os

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from ion.apps.pump.heartbeat import Heartbeat
from tests.waiting import until


def read(path):
    with open(path) as f:
        return json.load(f)


class HeartbeatTests(TestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "obs.heartbeat")
        self.pool = ThreadPool(0, 1)
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.clock = Clock()
        self.clock.advance(1_767_225_600)
        self.state = {"files_done": 0, "failures": 0, "link": "idle"}
        self.pushed = []

    def heartbeat(self, push=None):
        heartbeat = Heartbeat(self.clock, reactor, self.pool, self.path, 60, "sender obs",
                              lambda: dict(self.state), Logger(), push)
        self.addCleanup(heartbeat.stop)
        return heartbeat

    async def test_content_and_timing(self):
        """
        The file is written at start and every N seconds of the clock, never in between; it
        says when it was written, when the next is due, files done, failures and the link.
        """
        heartbeat = self.heartbeat()
        heartbeat.start()
        await until(lambda: heartbeat.last is not None, what="the first heartbeat")
        start = self.clock.seconds()
        self.assertEqual(read(self.path), {
            "name": "sender obs", "time": start, "next_within": 60, "due": start + 60,
            "files_done": 0, "failures": 0, "link": "idle",
        })
        self.state.update(files_done=12, failures=1, link="up")
        self.clock.advance(59)
        await until(lambda: heartbeat._busy is None)
        self.assertEqual(read(self.path)["time"], start)
        self.clock.advance(1)
        await until(lambda: heartbeat.last["time"] == start + 60, what="the second heartbeat")
        written = read(self.path)
        self.assertEqual((written["due"], written["files_done"], written["failures"],
                          written["link"]), (start + 120, 12, 1, "up"))
        self.assertEqual(sorted(os.listdir(self.dir)), ["obs.heartbeat"])

    async def test_stuck_write_skips_beats(self):
        """
        A beat whose previous write is still on its way is skipped: a stuck disk lets the
        file go past due instead of piling up writes.
        """
        heartbeat = self.heartbeat()
        gate = Deferred()

        async def slow_push(path):
            self.pushed.append(path)
            await gate

        heartbeat.push = slow_push
        heartbeat.start()
        await until(lambda: self.pushed, what="the first push")
        self.clock.advance(60)
        self.clock.advance(60)
        self.assertEqual((heartbeat.skipped, len(self.pushed)), (2, 1))
        gate.callback(None)
        self.clock.advance(60)
        await until(lambda: len(self.pushed) == 2, what="the next push")

    async def test_unwritable(self):
        """
        A directory that cannot be written is one warning per beat, no crash; no heartbeat
        counts as written.
        """
        self.path = os.path.join(self.dir, "missing", "obs.heartbeat")
        heartbeat = self.heartbeat()
        heartbeat.start()
        await until(lambda: heartbeat._busy is None)
        self.assertIsNone(heartbeat.last)
