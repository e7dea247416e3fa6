"""The journal behind the pump's duplicate cache and retry queue: its disk waits run in pool
threads, in order, without losing a line."""

import os
import threading

from twisted.internet import defer, reactor
from twisted.trial import unittest

from ion.apps.pump import journal
from ion.apps.pump.journal import DiskQueue, Journal


class HeldDisk(DiskQueue):
    """A DiskQueue whose thread calls wait until the test releases them, one by one."""

    def __init__(self):
        super().__init__()
        self.held = []

    def in_thread(self, function, *args):
        d = defer.Deferred()
        self.held.append((d, function, args))
        return d

    def release(self):
        d, function, args = self.held.pop(0)
        try:
            result = function(*args)
        except Exception:
            d.errback()
        else:
            d.callback(result)


def failing(error):
    def fail(*args):
        raise error

    return fail


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


class JournalTests(unittest.TestCase):
    def setUp(self):
        self.path = os.path.join(os.path.abspath(self.mktemp()), "j.jsonl")
        self.fsyncs = []
        fsync = os.fsync

        def recording(fd):
            self.fsyncs.append(threading.current_thread())
            fsync(fd)

        self.patch(journal.os, "fsync", recording)

    def open(self, disk):
        j = Journal(self.path, disk)
        j.replay(lambda record: None)
        return j

    async def test_fsync_in_a_pool_thread(self):
        """An fsync never blocks the reactor: it runs in a pool thread, and sync() fires once
        it has returned."""
        j = self.open(DiskQueue(reactor))
        j.append('{"a": 1}\n')
        await j.sync()
        await j.close()
        self.assertEqual(len(self.fsyncs), 1)
        self.assertIsNot(self.fsyncs[0], threading.main_thread())

    def test_group_commit(self):
        """Callers asking for an fsync while one is under way share the next one, which covers
        all their lines; none of them is told before its line is synced."""
        disk = HeldDisk()
        j = self.open(disk)
        j.append("1\n")
        first = j.sync()
        waiting = []
        for n in range(2, 6):
            j.append(f"{n}\n")
            waiting.append(j.sync())
        self.assertNoResult(first)
        disk.release()
        self.successResultOf(first)
        for d in waiting:
            self.assertNoResult(d)
        disk.release()
        for d in waiting:
            self.successResultOf(d)
        self.assertEqual((len(self.fsyncs), disk.held), (2, []))

    def test_lines_appended_during_a_rewrite_are_kept(self):
        """A line appended while the file is being rewritten lands in the new file."""
        disk = HeldDisk()
        j = self.open(disk)
        for n in range(5):
            j.append(f"{n}\n")
        done = j.rewrite(["4\n"])
        j.append("5\n")
        self.assertNoResult(done)
        disk.release()
        self.successResultOf(done)
        j.append("6\n")
        self.assertEqual(read(self.path), "4\n5\n6\n")
        self.assertEqual(j.lines, 3)

    def test_failed_rewrite_keeps_the_old_file(self):
        """A rewrite that fails (full disk, say) is logged and leaves the old file, with every
        line appended meanwhile."""
        disk = HeldDisk()
        j = self.open(disk)
        j.append("0\n")
        self.patch(journal.os, "replace", failing(OSError(28, "full")))
        done = j.rewrite([])
        j.append("1\n")
        disk.release()
        self.successResultOf(done)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        j.append("2\n")
        self.assertEqual(read(self.path), "0\n1\n2\n")

    def test_failed_fsync_fails_its_callers(self):
        """An fsync that fails is not reported as success to anyone waiting for it."""
        disk = HeldDisk()
        j = self.open(disk)
        j.append("0\n")
        self.patch(journal.os, "fsync", failing(OSError(5, "EIO")))
        d = j.sync()
        disk.release()
        self.failureResultOf(d, OSError)

    def test_sync_after_close_fails(self):
        """Lines appended after the journal closed are not reported as synced."""
        j = self.open(HeldDisk())
        j.close()
        d = j.sync()
        self.failureResultOf(d, ValueError)
