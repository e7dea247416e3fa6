"""
Tests for L{ion.apps.pump.retention}: old delivered files archived by day or removed.
"""

import calendar
import os

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ion.apps.pump.args import BadArgument, ConsumerArgs
from ion.apps.pump.retention import DAY, Retention, expire
from tests.apps.pump.servers import write_file
from tests.waiting import until

# 2026-03-05 12:00 UTC, and a "now" forty days later.
OLD = calendar.timegm((2026, 3, 5, 12, 0, 0))
NOW = OLD + 40 * DAY


def make(path, data=b"x", mtime=OLD):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_file(path, data)
    os.utime(path, (mtime, mtime))
    return path


def tree_of(root):
    found = []
    for directory, _, files in os.walk(root):
        for name in files:
            found.append(os.path.relpath(os.path.join(directory, name), root))
    return sorted(found)


class ExpireTests(SynchronousTestCase):
    def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        self.tree = os.path.join(self.base, "tree")
        self.archive = os.path.join(self.base, "archive")
        os.makedirs(self.tree)

    def test_old_files_archived_by_day(self):
        """
        Files older than the cutoff move to archive/YYYYMM/DD/<their path>; newer ones and
        transfers' temporary files stay.
        """
        make(os.path.join(self.tree, "obs", "a.txt"), b"a")
        make(os.path.join(self.tree, "new.txt"), mtime=NOW - DAY)
        make(os.path.join(self.tree, "obs", ".b.txt.0123456789ab.inflight"))
        done = expire(self.tree, self.archive, NOW - 30 * DAY)
        self.assertEqual(done.moved, [("obs/a.txt", "202603/05/obs/a.txt")])
        self.assertEqual(done.errors, [])
        self.assertEqual(tree_of(self.tree), ["new.txt", "obs/.b.txt.0123456789ab.inflight"])
        with open(os.path.join(self.archive, "202603", "05", "obs", "a.txt"), "rb") as f:
            self.assertEqual(f.read(), b"a")

    def test_clash_gets_a_number(self):
        """
        A name already in the archive is never overwritten: the newcomer gets .1, then .2.
        """
        for n in range(3):
            make(os.path.join(self.tree, "a.txt"), str(n).encode())
            expire(self.tree, self.archive, NOW)
        day = os.path.join(self.archive, "202603", "05")
        self.assertEqual(sorted(os.listdir(day)), ["a.txt", "a.txt.1", "a.txt.2"])
        contents = [open(os.path.join(day, n), "rb").read() for n in ("a.txt", "a.txt.1", "a.txt.2")]
        self.assertEqual(contents, [b"0", b"1", b"2"])

    def test_links_not_followed(self):
        """
        A link to a directory outside the tree is not entered and a link to a file is left
        alone: nothing outside the tree is moved or removed.
        """
        outside = os.path.join(self.base, "outside")
        make(os.path.join(outside, "precious"))
        os.symlink(outside, os.path.join(self.tree, "dirlink"))
        os.symlink(os.path.join(outside, "precious"), os.path.join(self.tree, "filelink"))
        done = expire(self.tree, None, NOW)
        self.assertEqual((done.moved, done.removed), ([], []))
        self.assertTrue(os.path.exists(os.path.join(outside, "precious")))
        self.assertTrue(os.path.islink(os.path.join(self.tree, "filelink")))

    def test_archive_link_refused(self):
        """
        A day directory in the archive that is a link (planted by someone) is not written
        through: the file stays and the error is named.
        """
        outside = os.path.join(self.base, "outside")
        os.makedirs(outside)
        os.makedirs(os.path.join(self.archive, "202603"))
        os.symlink(outside, os.path.join(self.archive, "202603", "05"))
        make(os.path.join(self.tree, "a.txt"))
        done = expire(self.tree, self.archive, NOW)
        self.assertEqual(done.moved, [])
        self.assertEqual(len(done.errors), 1)
        self.assertEqual(os.listdir(outside), [])
        self.assertEqual(tree_of(self.tree), ["a.txt"])

    def test_remove_and_batches(self):
        """
        With no archive, old files are removed, at most a batch at a time; 'more' says
        another batch is needed.
        """
        for n in range(5):
            make(os.path.join(self.tree, f"f{n}"))
        done = expire(self.tree, None, NOW, batch=3)
        self.assertEqual((len(done.removed), done.more), (3, True))
        done = expire(self.tree, None, NOW, batch=3)
        self.assertEqual((len(done.removed), done.more), (2, False))
        self.assertEqual(tree_of(self.tree), [])

    def test_archive_inside_tree_skipped(self):
        """
        An archive inside the tree is not archived again.
        """
        inner = os.path.join(self.tree, "archive")
        make(os.path.join(self.tree, "a"))
        expire(self.tree, inner, NOW)
        done = expire(self.tree, inner, NOW + 100 * DAY)
        self.assertEqual(done.moved, [])
        self.assertEqual(tree_of(self.tree), ["archive/202603/05/a"])


class RetentionTests(TestCase):
    async def test_passes_on_the_clock(self):
        """
        A pass runs at start, then every interval of the container's clock, batch after
        batch; files becoming old between passes go at the next one.
        """
        base = os.path.abspath(self.mktemp())
        tree = os.path.join(base, "tree")
        for n in range(5):
            make(os.path.join(tree, f"f{n}"))
        make(os.path.join(tree, "young"), mtime=NOW - 5 * DAY)
        pool = ThreadPool(0, 2)
        pool.start()
        self.addCleanup(pool.stop)
        clock = Clock()
        clock.advance(NOW)
        retention = Retention(clock, reactor, pool, tree, 30, os.path.join(base, "archive"),
                              Logger(), "consumer t", interval=3600, batch=2)
        self.addCleanup(retention.stop)
        retention.start()
        for _ in range(3):
            clock.advance(0)
            await until(lambda: retention._running is None, what="a batch")
        self.assertEqual(retention.moved, 5)
        self.assertEqual(tree_of(tree), ["young"])
        clock.advance(26 * DAY)  # one pass (the clock jumps): "young" is 31 days old now
        await until(lambda: retention.moved == 6, what="the young file archived")


class ArgsTests(SynchronousTestCase):
    def test_bad_retention(self):
        """
        A bad retention is one line naming the consumer, the key and the value.
        """
        with self.assertRaises(BadArgument) as caught:
            ConsumerArgs.parse({"name": "c", "directory": "d", "retention": {"after_days": 0}})
        self.assertEqual(
            str(caught.exception),
            "consumer c: retention must be {'after_days': days > 0, 'archive': a directory or "
            "None to remove}, got {'after_days': 0}",
        )
