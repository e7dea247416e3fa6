"""Tests for ion.apps.pump.paths: no relPath or remote name can write outside the destination."""

import os

from twisted.trial import unittest

from ion.apps.pump.notice import Notice
from ion.apps.pump import paths
from ion.apps.pump.paths import (
    KnownDirectories,
    UnsafePath,
    destination,
    resolve_under,
    safe_name,
    safe_relpath,
)

SENTINEL_TEXT = b"the file an attacker wants to overwrite\n"
SENTINEL_MTIME_NS = 1_000_000_000 * 1_000_000_000

HOSTILE = [
    ("..", "'..' component"),
    ("../x", "'..' component"),
    ("a/../../b", "'..' component"),
    ("a/b/..", "'..' component"),
    ("%2e%2e/x", "percent-encoded '..' component"),
    ("%2E%2E/x", "percent-encoded '..' component"),
    ("%2e%2E/x", "percent-encoded '..' component"),
    ("a/%2e./b", "percent-encoded '..' component"),
    ("..%2fetc%2fpasswd", "percent-encoded '..' component"),
    ("..%5c..%5cwindows", "percent-encoded '..' component"),
    ("%252e%252e/x", "percent-encoded '..' component"),
    ("%252E%252E", "percent-encoded '..' component"),
    ("%25252e%25252e/x", "percent-encoded '..' component"),
    ("a/%2e%2e%2f%2e%2e/b", "percent-encoded '..' component"),
    ("/abs", "absolute (starts with '/')"),
    ("/etc/passwd", "absolute (starts with '/')"),
    ("//server/share", "absolute (starts with '/')"),
    ("C:\\x", "contains a backslash"),
    ("a\\..\\b", "contains a backslash"),
    ("C:/x", "starts with a Windows drive letter"),
    ("c:", "starts with a Windows drive letter"),
    ("a\x00b", "contains a NUL character"),
    ("a/b\x00/../c", "contains a NUL character"),
    ("a%00.txt", "contains a percent-encoded NUL"),
    ("a\nb", "contains control character U+000A"),
    ("a\rb", "contains control character U+000D"),
    ("a\tb", "contains control character U+0009"),
    ("a\x1b[2Jb", "contains control character U+001B"),
    ("a\x7fb", "contains control character U+007F"),
    ("a\x85b", "contains control character U+0085"),
    ("x" * 300, "a component is 300 bytes long (the limit is 255)"),
    ("d/" + "é" * 128, "a component is 256 bytes long (the limit is 255)"),
    ("/".join(["abcdefgh"] * 500), "4499 bytes long (the limit is 4096)"),
    ("a/./b", "'.' component"),
    (".", "'.' component"),
    ("a//b", "empty component (a doubled or trailing '/')"),
    ("a/", "empty component (a doubled or trailing '/')"),
    ("", "empty"),
    ("a\ud800b", "not valid UTF-8"),
    (b"a/b", "not a string but bytes"),
    (None, "not a string but NoneType"),
    ("a/.x.txt.0123456789ab.inflight", "named like a temporary file"),
    (".f.inflight/x", "named like a temporary file"),
]

NORMAL = [
    ("d00/f000000.dat", ["d00", "f000000.dat"]),
    ("file", ["file"]),
    ("a/b/c/d/e.grib2", ["a", "b", "c", "d", "e.grib2"]),
    ("données/été.txt", ["données", "été.txt"]),
    ("with space/x y.txt", ["with space", "x y.txt"]),
    (".hidden/..more", [".hidden", "..more"]),
    ("a..b/...", ["a..b", "..."]),
    ("100%/%41%2e", ["100%", "%41%2e"]),
    ("xy:z/C:", ["xy:z", "C:"]),
    ("#/*/[x]", ["#", "*", "[x]"]),
    ("x" * 255, ["x" * 255]),
]


def touch_notice(rel_path):
    return Notice.from_dict(
        {"pubTime": "20261123T183935", "baseUrl": "http://h/", "relPath": rel_path}
    )


class TreeCase(unittest.SynchronousTestCase):
    """A destination root next to a sentinel file that no test may change."""

    def setUp(self):
        top = os.path.abspath(self.mktemp())
        self.root = os.path.join(top, "root")
        self.outside = os.path.join(top, "outside")
        os.makedirs(self.root)
        os.makedirs(self.outside)
        self.sentinel = os.path.join(self.outside, "sentinel.txt")
        with open(self.sentinel, "wb") as f:
            f.write(SENTINEL_TEXT)
        os.utime(self.sentinel, ns=(SENTINEL_MTIME_NS, SENTINEL_MTIME_NS))
        self.addCleanup(self.assertSentinelUnchanged)

    def assertSentinelUnchanged(self):
        with open(self.sentinel, "rb") as f:
            self.assertEqual(f.read(), SENTINEL_TEXT)
        self.assertEqual(os.stat(self.sentinel).st_mtime_ns, SENTINEL_MTIME_NS)
        self.assertEqual(os.listdir(self.outside), ["sentinel.txt"])

    def tree(self):
        """Every path under the root, to show nothing was created."""
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            found.extend(os.path.join(dirpath, n) for n in dirnames + filenames)
        return sorted(found)


class HostilePathTests(TreeCase):
    """Each hostile relPath is refused with a reason, before anything touches the filesystem."""

    def test_safe_relpath_refuses(self):
        """safe_relpath names the trick in a one-line reason."""
        for rel_path, reason in HOSTILE:
            with self.assertRaises(UnsafePath, msg=repr(rel_path)) as caught:
                safe_relpath(rel_path)
            self.assertIn(reason, str(caught.exception), repr(rel_path))
            self.assertNotIn("\n", str(caught.exception))

    def test_destination_refuses_in_every_mode(self):
        """No mapping mode lets a hostile relPath through, and the tree stays as it was."""
        before = self.tree()
        for mode in ("mirror", "directory", "strip=1", "strip=9"):
            for rel_path, reason in HOSTILE:
                with self.assertRaises(UnsafePath, msg=f"{rel_path!r} {mode}"):
                    destination(self.root, touch_notice(rel_path), mode)
        self.assertEqual(self.tree(), before)

    def test_unsafe_path_is_a_value_error_with_report_code(self):
        """Callers can catch ValueError, and the report code for it is 422 (unusable path)."""
        self.assertTrue(issubclass(UnsafePath, ValueError))
        self.assertEqual(UnsafePath.code, 422)

    def test_leading_slash_only_when_allowed(self):
        """With allow_leading_slash one leading '/' means the root; other tricks stay refused."""
        self.assertEqual(safe_relpath("/a/b", allow_leading_slash=True), ["a", "b"])
        self.assertEqual(
            destination(self.root, touch_notice("/etc/passwd"), allow_leading_slash=True),
            os.path.join(os.path.realpath(self.root), "etc", "passwd"),
        )
        for rel_path in ("//etc/passwd", "/../etc/passwd", "/", "/%2e%2e/x"):
            self.assertRaises(UnsafePath, safe_relpath, rel_path, allow_leading_slash=True)


class SymlinkTests(TreeCase):
    """A symbolic link in the destination tree cannot carry a write outside the root."""

    def test_directory_link_to_outside(self):
        """root/escape -> outside: writing root/escape/sentinel.txt is refused."""
        os.symlink(self.outside, os.path.join(self.root, "escape"))
        for rel_path in ("escape/sentinel.txt", "escape/new.txt", "escape/new/deeper.txt"):
            with self.assertRaises(UnsafePath) as caught:
                destination(self.root, touch_notice(rel_path))
            self.assertIn("leads outside", str(caught.exception))

    def test_relative_link_deeper_in_tree(self):
        """root/a/b -> ../../outside (relative) is caught too."""
        os.makedirs(os.path.join(self.root, "a"))
        os.symlink(os.path.join("..", "..", "outside"), os.path.join(self.root, "a", "b"))
        self.assertRaises(UnsafePath, destination, self.root, touch_notice("a/b/sentinel.txt"))

    def test_file_link_to_outside(self):
        """root/f.dat -> outside/sentinel.txt: a file that is such a link is refused."""
        os.symlink(self.sentinel, os.path.join(self.root, "f.dat"))
        self.assertRaises(UnsafePath, destination, self.root, touch_notice("f.dat"))

    def test_dangling_link_to_outside(self):
        """A link to a file outside that does not exist yet is refused as well."""
        os.symlink(os.path.join(self.outside, "new"), os.path.join(self.root, "f.dat"))
        self.assertRaises(UnsafePath, destination, self.root, touch_notice("f.dat"))

    def test_link_inside_root_allowed(self):
        """A link that stays inside the root is an ordinary directory for us."""
        os.makedirs(os.path.join(self.root, "real"))
        os.symlink(os.path.join(self.root, "real"), os.path.join(self.root, "alias"))
        path = destination(self.root, touch_notice("alias/f.dat"))
        self.assertEqual(path, os.path.join(os.path.realpath(self.root), "alias", "f.dat"))

    def test_root_itself_a_link(self):
        """The operator may configure a root that is a link; paths are given under its target."""
        link = os.path.join(os.path.dirname(self.root), "root-link")
        os.symlink(self.root, link)
        path = destination(link, touch_notice("d/f.dat"))
        self.assertEqual(path, os.path.join(os.path.realpath(self.root), "d", "f.dat"))


class NormalPathTests(TreeCase):
    """Ordinary relPaths are accepted and placed under the root, and nothing is created."""

    def test_accepted(self):
        """Nested, unicode, dotted and percent-bearing names are fine."""
        for rel_path, parts in NORMAL:
            self.assertEqual(safe_relpath(rel_path), parts, rel_path)

    def test_resolved_under_root(self):
        """Each accepted path resolves below the real root, without creating anything."""
        base = os.path.realpath(self.root)
        for rel_path, parts in NORMAL:
            path = destination(self.root, touch_notice(rel_path))
            self.assertEqual(path, os.path.join(base, *parts))
            self.assertTrue(path.startswith(base + os.sep))
        self.assertEqual(self.tree(), [])

    def test_existing_directories(self):
        """Existing ordinary directories in the way are fine."""
        os.makedirs(os.path.join(self.root, "d00", "sub"))
        path = destination(self.root, touch_notice("d00/sub/f.dat"))
        self.assertEqual(path, os.path.join(os.path.realpath(self.root), "d00", "sub", "f.dat"))

    def test_missing_root(self):
        """A root that does not exist yet is not created by resolving."""
        root = os.path.join(self.root, "later")
        self.assertEqual(
            destination(root, touch_notice("a/f")), os.path.join(os.path.realpath(root), "a", "f")
        )
        self.assertFalse(os.path.exists(root))


class ModeTests(TreeCase):
    """mirror, directory and strip=N map relPath the way sr3 subscribers expect."""

    def test_modes(self):
        """Each mode keeps the documented part of relPath."""
        base = os.path.realpath(self.root)
        notice = touch_notice("a/b/c/f.dat")
        cases = [
            ("mirror", "a/b/c/f.dat"),
            ("directory", "f.dat"),
            ("strip=0", "a/b/c/f.dat"),
            ("strip=1", "b/c/f.dat"),
            ("strip=3", "f.dat"),
            ("strip=4", "f.dat"),
            ("strip=40", "f.dat"),
        ]
        for mode, expected in cases:
            self.assertEqual(
                destination(self.root, notice, mode), os.path.join(base, *expected.split("/"))
            )

    def test_strip_cannot_hide_a_trick(self):
        """Stripping happens after the checks: a '..' in the dropped part still refuses."""
        self.assertRaises(UnsafePath, destination, self.root, touch_notice("../b/f"), "strip=1")

    def test_first_component_after_stripping(self):
        """The component a mode leaves first is checked as a first one: a file name such as
        C{C:f} that directory or strip=N would put first is refused as a drive letter."""
        notice = touch_notice("a/C:f")
        self.assertEqual(
            destination(self.root, notice, "mirror"),
            os.path.join(os.path.realpath(self.root), "a", "C:f"),
        )
        for mode in ("directory", "strip=1"):
            with self.assertRaises(UnsafePath) as caught:
                destination(self.root, notice, mode)
            self.assertIn("drive letter", str(caught.exception))

    def test_unknown_mode(self):
        """A misspelt mode names the valid ones."""
        for mode in ("flat", "strip=", "strip=-1", "strip=x", None):
            with self.assertRaises(ValueError) as caught:
                destination(self.root, touch_notice("a/f"), mode)
            self.assertIn("use 'mirror', 'directory' or 'strip=N'", str(caught.exception))


class NameTests(unittest.SynchronousTestCase):
    """Listing entries and link/rename names are single safe components."""

    def test_accepted(self):
        """Ordinary names come back unchanged."""
        accepted = ("f.dat", "été", "..x", "a b", "%41", "x" * 255, "x.inflight", ".x.inflight.gz")
        for name in accepted:
            self.assertEqual(safe_name(name), name)

    def test_refused(self):
        """Separators, dot names, drives and control characters are refused."""
        cases = [
            ("a/b", "contains '/'"),
            ("/", "contains '/'"),
            ("..", "'..' component"),
            (".", "'.' component"),
            ("", "empty"),
            ("C:", "Windows drive letter"),
            ("x\\y", "backslash"),
            ("x\x00", "NUL"),
            ("x\n", "U+000A"),
            ("%2e%2e", "percent-encoded '..'"),
            ("x" * 256, "256 bytes long"),
            (".x.txt.0123456789ab.inflight", "named like a temporary file"),
        ]
        for name, reason in cases:
            with self.assertRaises(UnsafePath) as caught:
                safe_name(name)
            self.assertIn(reason, str(caught.exception))
            self.assertTrue(str(caught.exception).startswith("unsafe name "))


class ResolveUnderTests(TreeCase):
    """resolve_under re-checks its components, so a caller cannot skip safe_relpath by accident."""

    def test_components_rechecked(self):
        """Unsafe components given directly are refused."""
        for parts in (["..", "x"], ["a/../..", "x"], ["a", ""], ["C:", "x"], [], ["a\x00"]):
            self.assertRaises(UnsafePath, resolve_under, self.root, parts)

    def test_string_refused(self):
        """A plain string is a mistake (it would be split into characters)."""
        self.assertRaises(TypeError, resolve_under, self.root, "a/b")

    def test_resolves(self):
        """Good components land under the real root."""
        self.assertEqual(
            resolve_under(self.root, ("a", "b.txt")),
            os.path.join(os.path.realpath(self.root), "a", "b.txt"),
        )


class KnownDirectoriesTests(TreeCase):
    """A caller whose writes never follow links (the consumer) looks at each directory of the
    tree once, not once per file; the file itself is looked at every time."""

    def lstats(self):
        """Count the lstat calls of paths from now on."""
        calls = []
        real = os.lstat

        def counting(path, *args, **kw):
            calls.append(path)
            return real(path, *args, **kw)

        self.patch(paths.os, "lstat", counting)
        return calls

    def test_directory_looked_at_once(self):
        """The second file of a directory costs one lstat (its own), not one per level."""
        os.makedirs(os.path.join(self.root, "a", "b"))
        known = KnownDirectories()
        real = os.path.realpath(self.root)  # as the consumer passes it
        destination(self.root, touch_notice("a/b/f1.dat"), real_root=real, known_dirs=known)
        calls = self.lstats()
        path = destination(
            self.root, touch_notice("a/b/f2.dat"), real_root=real, known_dirs=known
        )
        self.assertEqual(calls, [path])

    def test_file_link_still_refused(self):
        """A file planted as a link to outside after its directory is known is still refused."""
        os.makedirs(os.path.join(self.root, "a"))
        known = KnownDirectories()
        destination(self.root, touch_notice("a/f1.dat"), known_dirs=known)
        os.symlink(self.sentinel, os.path.join(self.root, "a", "f2.dat"))
        self.assertRaises(
            UnsafePath, destination, self.root, touch_notice("a/f2.dat"), known_dirs=known
        )

    def test_links_not_remembered(self):
        """A link inside the root is looked at for every file (only directories are known)."""
        os.makedirs(os.path.join(self.root, "real"))
        os.symlink(os.path.join(self.root, "real"), os.path.join(self.root, "alias"))
        known = KnownDirectories()
        real = os.path.realpath(self.root)
        destination(self.root, touch_notice("alias/f1.dat"), real_root=real, known_dirs=known)
        calls = self.lstats()
        destination(self.root, touch_notice("alias/f2.dat"), real_root=real, known_dirs=known)
        self.assertIn(os.path.join(real, "alias"), calls)

    def test_bounded(self):
        """At most `limit` directories are kept."""
        known = KnownDirectories(limit=2)
        for name in ("a", "b", "c"):
            known.add(name)
        self.assertNotIn("a", known)
        self.assertIn("c", known)
