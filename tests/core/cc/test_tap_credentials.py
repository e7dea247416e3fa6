"""`twistd -n cc --credentials PATH`: broker passwords from a private file, never echoed."""

import io
import os
import sys

from twisted.trial import unittest

from ion.core.cc import tap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
RES = os.path.join(ROOT, "res")
SECRET = "pa55:w/rd#1"
FILE = """\
# broker accounts
amqp://alice:pa55%3Aw%2Frd%231@rabbit.example/
amqp://alice:other@rabbit.example:5673/
amqps://bob:bob-tls@rabbit.example/
"""


class CredentialsOptionTests(unittest.SynchronousTestCase):
    def setUp(self):
        # Keep the default file of whoever runs the tests out of them.
        self.home = self.mktemp()
        os.makedirs(self.home)
        self.patch(tap.Options, "default_credentials", os.path.join(self.home, "credentials.conf"))

    def write(self, text=FILE, mode=0o600, path=None):
        path = path or self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        return path

    def parse(self, *argv):
        opts = tap.Options()
        opts.parseOptions(["--res", RES, *argv])
        return opts

    def test_password_from_file(self):
        """A broker URL with a user and no password gets the password of the matching line."""
        path = self.write()
        opts = self.parse("--broker", "amqp://alice@rabbit.example/", "--credentials", path)
        self.assertEqual(opts["broker_url"], "amqp://alice:pa55%3Aw%2Frd%231@rabbit.example/")
        opts = self.parse("--broker", "amqps://bob@rabbit.example/v", "--credentials", path)
        self.assertEqual(opts["broker_url"], "amqps://bob:bob-tls@rabbit.example/v")

    def test_broker_options_use_the_file(self):
        """-h/-p/--broker-user build the URL whose password is looked up."""
        path = self.write()
        opts = self.parse("--broker-host", "rabbit.example", "--broker-port", "5673", "--broker-user", "alice",
                          "--credentials", path)
        self.assertEqual(opts["broker_url"], "amqp://alice:other@rabbit.example:5673/")

    def test_default_file(self):
        """Without --credentials, the default file is used when it exists."""
        self.write(path=tap.Options.default_credentials)
        opts = self.parse("--broker", "amqp://alice@rabbit.example/")
        self.assertIn("alice:pa55", opts["broker_url"])

    def test_no_match_or_no_need(self):
        """No matching line stops the container (issue 22: no default password is tried); a
        URL with a password or without a user, or memory://, never reads the file (not even a
        refused one)."""
        path = self.write()
        line = self.bad("--broker", "amqp://carol@rabbit.example/", "--credentials", path)
        self.assertEqual(line, f"cc: no password for carol@rabbit.example in {path}")
        refused = self.write(mode=0o644)
        for url in ("amqp://alice:given@rabbit.example/", "amqp://rabbit.example/", "memory://"):
            opts = self.parse("--broker", url, "--credentials", refused)
            self.assertEqual(opts["broker_url"], url)
        self.assertEqual(self.parse()["broker_url"], "memory://")

    def bad(self, *argv):
        """Parse argv expecting a refusal: one line on stderr, exit status 2, no traceback."""
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        e = self.assertRaises(SystemExit, self.parse, *argv)
        self.assertEqual(e.code, 2)
        lines = err.getvalue().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertNotIn("Traceback", lines[0])
        self.assertNotIn(SECRET, lines[0])
        self.assertNotIn("pa55", lines[0])
        return lines[0]

    def test_readable_file_refused(self):
        """A credentials file that group or others can read stops the container before it
        starts, with a line naming the file and never the password."""
        path = self.write(mode=0o644)
        line = self.bad("--broker", "amqp://alice@rabbit.example/", "--credentials", path)
        self.assertIn(path, line)
        self.assertIn("chmod 600", line)
        self.write(mode=0o640, path=tap.Options.default_credentials)
        line = self.bad("--broker", "amqp://alice@rabbit.example/")
        self.assertIn("credentials.conf", line)

    def test_missing_or_malformed_file(self):
        """A given file that is missing, or a malformed line, is one line on stderr too."""
        missing = os.path.join(self.home, "missing.conf")
        line = self.bad("--broker", "amqp://alice@rabbit.example/", "--credentials", missing)
        self.assertIn("missing.conf", line)
        path = self.write("amqp://alice:pa55@rabbit.example/vhost\n")
        line = self.bad("--broker", "amqp://alice@rabbit.example/", "--credentials", path)
        self.assertIn("line 1", line)

    def test_pump_logins_in_the_same_file(self):
        """The file is also the pump's: sftp, ftp and https lines beside the amqp one (even
        for the broker's host and user) do not stop the container, which still finds its
        broker password, from --credentials or the default file."""
        text = (
            "# the pump's servers\n"
            "sftp://alice:sftp-pw@rabbit.example/\n"
            "sftp://bob@feed.example.org/ ssh_key=/keys/id_ed25519\n"
            "ftp://anon:p%40ss@ftp.example.org:2121/incoming/\n"
            "https://alice:https-pw@rabbit.example/private/\n"
            + FILE
        )
        path = self.write(text)
        opts = self.parse("--broker", "amqp://alice@rabbit.example/", "--credentials", path)
        self.assertEqual(opts["broker_url"], "amqp://alice:pa55%3Aw%2Frd%231@rabbit.example/")
        self.write(text, path=tap.Options.default_credentials)
        opts = self.parse("--broker", "amqps://bob@rabbit.example/v")
        self.assertEqual(opts["broker_url"], "amqps://bob:bob-tls@rabbit.example/v")

    def test_pump_logins_only(self):
        """A file with only the pump's lines gives no broker password: an sftp line for the
        broker's host and user is not one."""
        path = self.write(
            "sftp://alice:sftp-pw@rabbit.example/\nftp://alice:ftp-pw@rabbit.example/\n"
        )
        line = self.bad("--broker", "amqp://alice@rabbit.example/", "--credentials", path)
        self.assertEqual(line, f"cc: no password for alice@rabbit.example in {path}")
