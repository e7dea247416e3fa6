"""The broker credentials file: private files only, lines matched by scheme, host, port and
user, and passwords that never show up in an error."""

import os

from twisted.trial import unittest

from ion.core.credentials import CredentialsError, find_password, load_credentials

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


class CredentialsFileTests(unittest.SynchronousTestCase):
    def write(self, text, mode=0o600):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        return path

    def test_lookup_table(self):
        """A URL's user gets the password of the first line with the same scheme, host, port
        (default ports filled in; host case does not matter) and user."""
        credentials = load_credentials(self.write(LINES))
        for url, expected in LOOKUPS:
            self.assertEqual(find_password(credentials, url), expected, url)

    def test_group_or_world_readable_refused(self):
        """A file that group or others may read (or write) is refused, whatever it holds; the
        error names the file and the fix."""
        for mode in (0o644, 0o640, 0o604, 0o660, 0o602):
            path = self.write(LINES, mode)
            e = self.assertRaises(CredentialsError, load_credentials, path)
            self.assertIn(path, str(e))
            self.assertIn(f"{mode:04o}", str(e))
            self.assertIn("chmod 600", str(e))
            self.assertNotIn(SECRET, str(e))

    def test_owner_only_modes_accepted(self):
        for mode in (0o600, 0o400):
            self.assertEqual(len(load_credentials(self.write(LINES, mode))), 7)

    def test_bad_lines(self):
        """A line that is not amqp[s]://user:password@host[:port]/ names its line number, never
        its content."""
        bad = [
            f"http://alice:{SECRET}@h/",
            f"amqp://alice:{SECRET}@h/vhost",
            f"amqp://alice:{SECRET}@h:99999/",
            f"amqp://{SECRET}@h/",
            f"amqp://alice:{SECRET}@/",
            f"amqp://alice:{SECRET}@h/ trailing words",
            f"amqp://alice:{SECRET}@h/?heartbeat=5",
        ]
        for line in bad:
            path = self.write(f"# first\n\n{line}\n")
            e = self.assertRaises(CredentialsError, load_credentials, path)
            self.assertIn("line 3", str(e))
            self.assertNotIn(SECRET, str(e))
            self.assertNotIn(line, str(e))

    def test_password_never_in_error_text(self):
        """No error from reading the file repeats a password or the repr of a credential."""
        credentials = load_credentials(self.write(LINES))
        self.assertNotIn(SECRET, repr(credentials))
        errors = [
            self.assertRaises(CredentialsError, load_credentials, self.write(LINES, 0o644)),
            self.assertRaises(CredentialsError, load_credentials, self.write(f"{SECRET}\n")),
            self.assertRaises(CredentialsError, load_credentials, self.mktemp()),
            self.assertRaises(CredentialsError, load_credentials, self.write(f"amqp://a:{SECRET}@h/x")),
        ]
        for e in errors:
            self.assertNotIn(SECRET, str(e))

    def test_missing_and_unusable_files(self):
        path = self.mktemp()
        self.assertIn(path, str(self.assertRaises(CredentialsError, load_credentials, path)))
        os.mkdir(path, 0o700)
        self.assertIn("regular file", str(self.assertRaises(CredentialsError, load_credentials, path)))
        binary = self.mktemp()
        with open(binary, "wb") as f:
            f.write(b"amqp://a:\xff@h/\n")
        os.chmod(binary, 0o600)
        self.assertIn("UTF-8", str(self.assertRaises(CredentialsError, load_credentials, binary)))

    def test_comments_and_blank_lines_only(self):
        self.assertEqual(load_credentials(self.write("# nothing yet\n\n   \n\t# indented\n")), [])
