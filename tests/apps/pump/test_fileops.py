"""File operations under a destination: what they do, and what a hostile notice cannot make
them do."""

import os

from twisted.trial import unittest

from ion.apps.pump import fileops
from ion.apps.pump.paths import UnsafePath
from ion.apps.pump.transfer.errors import LocalFailure
from ion.apps.pump.transfer.inflight import DestinationRoot


class ApplyTests(unittest.SynchronousTestCase):
    def setUp(self):
        base = os.path.abspath(self.mktemp())
        self.dest = os.path.join(base, "dest")
        self.outside = os.path.join(base, "outside")
        os.makedirs(os.path.join(self.dest, "d"))
        os.makedirs(self.outside)
        self.write("d/f", "data")
        with open(os.path.join(self.outside, "secret"), "w") as f:
            f.write("secret")
        self.root = DestinationRoot(self.dest)
        self.addCleanup(self.root.close)

    def write(self, rel, text):
        with open(os.path.join(self.dest, rel), "w") as f:
            f.write(text)

    def apply(self, op, rel, old=None, target=None):
        return fileops.apply(
            self.root, op, rel.split("/"), old and old.split("/"), target
        )

    def test_operation_names(self):
        """Each fileOp shape of sr3 has its event name."""
        table = [({"remove": ""}, "delete"), ({"remove": "", "directory": ""}, "rmdir"),
                 ({"rename": "a"}, "rename"), ({"rename": "a", "directory": ""}, "rename"),
                 ({"link": "a"}, "link"), ({"hlink": "a"}, "hlink"),
                 ({"directory": ""}, "mkdir")]
        for file_op, name in table:
            self.assertEqual(fileops.operation(file_op), name)

    def test_operations(self):
        """rename, link, mkdir, remove and rmdir do what they say; a rename whose old file is
        missing says so (None) and touches nothing."""
        self.assertEqual(self.apply("rename", "e/g", old="d/f"), "renamed from d/f")
        self.assertFalse(os.path.exists(os.path.join(self.dest, "d", "f")))
        self.assertIsNone(self.apply("rename", "e/h", old="d/f"))
        self.assertEqual(self.apply("link", "d/ln", target="../e/g"), "linked to ../e/g")
        with open(os.path.join(self.dest, "d", "ln")) as f:
            self.assertEqual(f.read(), "data")
        self.apply("mkdir", "m/n")
        self.assertTrue(os.path.isdir(os.path.join(self.dest, "m", "n")))
        self.apply("delete", "e/g")
        self.assertEqual(self.apply("delete", "e/g"), "already gone")
        self.apply("rmdir", "m")
        self.assertEqual(sorted(os.listdir(self.dest)), ["d", "e"])

    def test_hostile_link_targets(self):
        """A link target that is absolute or leads outside the destination is refused, and
        nothing is written."""
        for target in ("/etc/passwd", "../../outside/secret", "../..", "a/../../..", "x\x00y"):
            self.assertRaises(UnsafePath, self.apply, "link", "d/ln", target=target)
        self.assertEqual(os.listdir(os.path.join(self.dest, "d")), ["f"])

    def test_planted_link_on_the_way(self):
        """A symbolic link below the destination is never followed: a rename or remove through
        it is refused, and the file it leads to stays."""
        os.symlink(self.outside, os.path.join(self.dest, "trap"))
        self.assertRaises(UnsafePath, self.apply, "delete", "trap/secret")
        self.assertRaises(UnsafePath, self.apply, "rename", "d/stolen", old="trap/secret")
        self.assertRaises(UnsafePath, self.apply, "rename", "trap/x", old="d/f")
        self.assertTrue(os.path.exists(os.path.join(self.outside, "secret")))
        self.assertTrue(os.path.exists(os.path.join(self.dest, "d", "f")))

    def test_mkdir_over_a_file(self):
        """mkdir where a file is: 422, not retried."""
        e = self.assertRaises(LocalFailure, self.apply, "mkdir", "d/f")
        self.assertEqual((e.code, e.transient), (422, False))


class RenameValueTests(unittest.SynchronousTestCase):
    def test_sr3_form(self):
        """A rename's old name is written as sr3 writes it (baseUrl's path, then the old
        relPath) and read back from that form or a relative one; an absolute path elsewhere
        is refused."""
        base = "file:///data/my%20tree/"
        self.assertEqual(fileops.renamed_from(base, "a/f"), "/data/my tree/a/f")
        self.assertEqual(fileops.old_relpath(base, "/data/my tree/a/f"), "a/f")
        self.assertEqual(fileops.old_relpath("http://h/", "/a/f"), "a/f")
        self.assertEqual(fileops.old_relpath(base, "a/f"), "a/f")
        self.assertRaises(UnsafePath, fileops.old_relpath, base, "/etc/passwd")
