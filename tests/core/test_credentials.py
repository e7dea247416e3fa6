"""The credentials file: private files only, one line format for every scheme (broker
accounts and the pump's server logins alike), lines matched by scheme, host, port, user and
path, and passwords that never show up in an error."""

import os
import threading

from twisted.trial import unittest

from ion.core.credentials import (
    Credential,
    Credentials,
    CredentialsError,
)

SECRET = "s3cr3t-Pa55"

LINES = f"""\
# ION broker accounts
amqp://alice:{SECRET}@broker.example/
amqp://alice:second-match@broker.example:5672/
amqps://alice:tls-pw@broker.example/
amqp://alice:other-port@broker.example:5673/   # test node
amqp://bob:bob-pw@broker.example/

amqp://us%40er:p%3Ass%2Fw%40rd@[::1]:5672/
amqp://carol:carol-pw@Broker.Example/
"""

# broker URL -> password found (None: no match)
LOOKUPS = [
    ("amqp://alice@broker.example/", SECRET),
    ("amqp://alice@broker.example:5672/vhost", SECRET),
    ("AMQP://alice@BROKER.example/", SECRET),
    ("amqps://alice@broker.example/", "tls-pw"),
    ("amqps://alice@broker.example:5671/", "tls-pw"),
    ("amqp://alice@broker.example:5673/", "other-port"),
    ("amqp://bob@broker.example/", "bob-pw"),
    ("amqp://us%40er@[::1]/", "p:ss/w@rd"),
    ("amqp://carol@broker.example/", "carol-pw"),
    ("amqp://dave@broker.example/", None),
    ("amqp://alice@elsewhere.example/", None),
    ("amqps://bob@broker.example/", None),
    ("amqp://broker.example/", None),
    ("memory://", None),
    ("amqp://alice@broker.example:notaport/", None),
]


class FileWriting:
    """Tests writing credentials files of their own."""

    def write(self, text, mode=0o600):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        return path


class CredentialsFileTests(FileWriting, unittest.SynchronousTestCase):

    def test_path_dots_resolved(self):
        """A line for /private/ does not serve /private/../ok/x, which a server reads as
        /ok/x; /ok/./../private/x is under /private/ and is served."""
        creds = Credentials.parse("http://pump:pw@127.0.0.1:18090/private/\n")
        self.assertIsNone(creds.find("http://127.0.0.1:18090/private/../ok/x"))
        self.assertIsNone(creds.find("http://127.0.0.1:18090/private/.."))
        self.assertEqual(creds.find("http://127.0.0.1:18090/ok/./../private/x").user, "pump")

    def test_lookup_table(self):
        """A URL's user gets the password of the first line with the same scheme, host, port
        (default ports filled in; host case does not matter) and user."""
        credentials = Credentials.load(self.write(LINES))
        for url, expected in LOOKUPS:
            self.assertEqual(credentials.password(url), expected, url)

    def test_group_or_world_readable_refused(self):
        """A file that group or others may read (or write) is refused, whatever it holds; the
        error names the file and the fix."""
        for mode in (0o644, 0o640, 0o604, 0o660, 0o602):
            path = self.write(LINES, mode)
            e = self.assertRaises(CredentialsError, Credentials.load, path)
            self.assertIn(path, str(e))
            self.assertIn(f"{mode:04o}", str(e))
            self.assertIn("chmod 600", str(e))
            self.assertNotIn(SECRET, str(e))

    def test_owner_only_modes_accepted(self):
        for mode in (0o600, 0o400):
            self.assertEqual(len(Credentials.load(self.write(LINES, mode))), 7)

    def test_bad_lines(self):
        """A malformed line, or a broker line that is not amqp[s]://user:password@host[:port]/,
        names its line number, never its content."""
        bad = [
            f"gopher://alice:{SECRET}@h/",
            f"amqp://alice:{SECRET}@h/vhost",
            f"amqp://alice:{SECRET}@h/ ssh_key=/k",
            "amqp://alice@h/",
            f"https://alice:{SECRET}@h/ colour=blue",
            f"https://alice:{SECRET}@h/ {SECRET}",
            f"https://alice:{SECRET}@h/ ssh_key=",
            f"https://alice:{SECRET}@h/#frag",
            f"sftp://alice:{SECRET}@h:{SECRET}/",
            f"alice:{SECRET}@h",
            f"https://alice:{SECRET}\uff03x@h/",  # urllib's own error would quote it
            f"https://alice:{SECRET}@[::1/",
            f"amqp://alice:{SECRET}@h:99999/",
            f"amqp://{SECRET}@h/",
            f"amqp://alice:{SECRET}@/",
            f"amqp://alice:{SECRET}@h/ trailing words",
            f"amqp://alice:{SECRET}@h/?heartbeat=5",
        ]
        for line in bad:
            path = self.write(f"# first\n\n{line}\n")
            e = self.assertRaises(CredentialsError, Credentials.load, path)
            self.assertIn("line 3", str(e))
            self.assertNotIn(SECRET, str(e))
            self.assertNotIn(line, str(e))

    def test_password_never_in_error_text(self):
        """No error from reading the file repeats a password or the repr of a credential."""
        credentials = Credentials.load(self.write(LINES))
        self.assertNotIn(SECRET, repr(credentials))
        errors = [
            self.assertRaises(CredentialsError, Credentials.load, self.write(LINES, 0o644)),
            self.assertRaises(CredentialsError, Credentials.load, self.write(f"{SECRET}\n")),
            self.assertRaises(CredentialsError, Credentials.load, self.mktemp()),
            self.assertRaises(CredentialsError, Credentials.load, self.write(f"amqp://a:{SECRET}@h/x")),
        ]
        for e in errors:
            self.assertNotIn(SECRET, str(e))

    def test_missing_and_unusable_files(self):
        path = self.mktemp()
        self.assertIn(path, str(self.assertRaises(CredentialsError, Credentials.load, path)))
        os.mkdir(path, 0o700)
        self.assertIn("regular file", str(self.assertRaises(CredentialsError, Credentials.load, path)))
        binary = self.mktemp()
        with open(binary, "wb") as f:
            f.write(b"amqp://a:\xff@h/\n")
        os.chmod(binary, 0o600)
        self.assertIn("UTF-8", str(self.assertRaises(CredentialsError, Credentials.load, binary)))

    def test_comments_and_blank_lines_only(self):
        path = self.write("# nothing yet\n\n   \n\t# indented\n")
        self.assertEqual(Credentials.load(path).entries, ())


# Broker accounts and the pump's logins, side by side in one file.
MIXED = f"""\
# the container's broker
amqp://ion:{SECRET}@rabbit.example/   # default vhost and any other
sftp://ion:sftp-pw@rabbit.example/
# the pump's servers
sftp://bob@feed.example.org/ ssh_key=/keys/id_ed25519
sftp://carol:pw1@feed.example.org/
sftp://carol:pw2@feed.example.org/incoming/
ftp://anon:p%40ss%20word@ftp.example.org:2121/
https://alice:https-pw@data.example.org/private/
"""


class OneFileForEverySchemeTests(FileWriting, unittest.SynchronousTestCase):
    """The container and the pump read the same file with the same reader."""

    def test_broker_and_pump_lookups(self):
        """A file with an amqp line and sftp, ftp and https lines serves the broker lookup
        (Credentials.password) and the pump's
        (Credentials.find)."""
        path = self.write(MIXED)
        lines = Credentials.load(path)
        self.assertEqual([c.scheme for c in lines], ["amqp"] + ["sftp"] * 4 + ["ftp", "https"])
        for url in ("amqp://ion@rabbit.example/", "amqp://ion@RABBIT.example:5672/vhost"):
            self.assertEqual(lines.password(url), SECRET)
        self.assertIsNone(lines.password("amqps://ion@rabbit.example/"))
        self.assertIsNone(lines.password("amqp://bob@rabbit.example/"))
        creds = Credentials.load(path)
        self.assertEqual(creds.password("amqp://ion@rabbit.example/"), SECRET)
        self.assertEqual(creds.password("sftp://ion@rabbit.example/x"), "sftp-pw")
        self.assertEqual(creds.find("sftp://rabbit.example/x").password, "sftp-pw")
        bob = creds.find("sftp://bob@feed.example.org/x")
        self.assertEqual((bob.port, bob.password, bob.ssh_key), (22, None, "/keys/id_ed25519"))
        self.assertEqual(creds.find("sftp://carol@feed.example.org/incoming/f").password, "pw2")
        self.assertEqual(creds.find("sftp://carol@feed.example.org/other/f").password, "pw1")
        self.assertEqual(creds.find("ftp://ftp.example.org:2121/a").password, "p@ss word")
        self.assertIsNone(creds.find("ftp://ftp.example.org/a"))
        self.assertEqual(creds.find("https://data.example.org/private/a").user, "alice")
        self.assertIsNone(creds.find("https://data.example.org/public/a"))
        self.assertIsNone(creds.find("http://data.example.org/private/a"))
        self.assertEqual(creds.find("amqp://rabbit.example/"), lines.entries[0])

    def test_default_ports(self):
        """Each scheme's default port is filled in, on the line and in the URL looked up."""
        text = "".join(
            f"{scheme}://u:pw-{port}@h.example/\n"
            for scheme, port in [("amqp", 5672), ("amqps", 5671), ("http", 80), ("https", 443),
                                 ("ftp", 21), ("sftp", 22)]
        )
        creds = Credentials.parse(text)
        self.assertEqual([c.port for c in creds], [5672, 5671, 80, 443, 21, 22])
        for c in creds:
            self.assertEqual(creds.password(f"{c.scheme}://u@h.example:{c.port}/"), f"pw-{c.port}")
            self.assertEqual(creds.password(f"{c.scheme}://u@h.example/"), f"pw-{c.port}")

    def test_parse_fields_and_options(self):
        """A line gives scheme, host, port, user, password, path and options; the password is
        optional outside broker lines, a blank then `#` starts a comment, `~` in ssh_key is
        expanded."""
        creds = Credentials.parse(
            "SFTP://bob@Feed.Example.org:2222/in/ ssh_key=~/k # bob's key\n"
            "https://data.example.org/\n"
        )
        self.assertEqual(
            creds.entries,
            (
                Credential("sftp", "feed.example.org", 2222, "bob", None, "/in/",
                           os.path.expanduser("~/k")),
                Credential("https", "data.example.org", 443, None),
            ),
        )

    def test_fifo_does_not_hang(self):
        """A FIFO named as the credentials file is refused at once, not waited on."""
        path = self.mktemp()
        os.mkfifo(path, 0o600)
        outcome = []

        def load():
            try:
                Credentials.load(path)
            except CredentialsError as e:
                outcome.append(str(e))

        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        thread.join(10)
        if thread.is_alive():
            # Unblock the reader so that the test run can end, then fail.
            with open(path, "w"):
                pass
            self.fail("loading a FIFO hung")
        self.assertEqual(len(outcome), 1)
        self.assertIn("regular file", outcome[0])

    def test_reprs_hide_passwords(self):
        creds = Credentials.load(self.write(MIXED))
        self.assertNotIn(SECRET, repr(creds))
        self.assertNotIn(SECRET, repr(creds.entries))
        self.assertNotIn(SECRET, repr(list(Credentials.load(self.write(MIXED)))))
