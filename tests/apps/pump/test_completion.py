"""
Tests for L{ion.apps.pump.completion}: the on_complete argument and its command, run as a real
child process.
"""

import os

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ion.apps.pump.completion import OnComplete, run_command


def is_name(value):
    return isinstance(value, str) and value.isidentifier()


class OnCompleteArgTests(SynchronousTestCase):
    """
    The on_complete argument.
    """

    def test_parse(self):
        """
        A command is a list of strings; timeout and all_files have defaults.
        """
        parsed = OnComplete.parse({"command": ["/bin/true", "-x"]}, "consumer c", is_name)
        self.assertEqual(parsed, OnComplete(("/bin/true", "-x"), None, 60, False))
        self.assertIsNone(OnComplete.parse(None, "consumer c", is_name))

    def test_refused(self):
        """
        A shell string, an empty or non-string command, a bad exchange, timeout or key is
        one line naming the process and the key.
        """
        for value, text in [
            ({"command": "rm -rf /tmp/x"}, "command must be a list of strings"),
            ({"command": []}, "command must be a list"),
            ({"command": ["ok", 3]}, "command must be a list"),
            ({"complete_exchange": "no spaces"}, "complete_exchange"),
            ({"command": ["x"], "timeout": 0}, "timeout"),
            ({"command": ["x"], "all_files": "yes"}, "all_files"),
            ({"command": ["x"], "shell": True}, "keys"),
            ({}, "needs a command"),
        ]:
            with self.assertRaises(ValueError) as caught:
                OnComplete.parse(value, "consumer c", is_name)
            self.assertIn("consumer c: on_complete", str(caught.exception))
            self.assertIn(text, str(caught.exception))


class RunCommandTests(TestCase):
    """
    The command, as a real child process.
    """

    async def test_path_argument(self):
        """
        The path is the command's last argument, passed as it is (no shell reads it).
        """
        out = os.path.abspath(self.mktemp())
        path = "/data/a file; $(touch /tmp/pwned).nc"
        outcome = await run_command(
            reactor, ["/bin/sh", "-c", f'printf "%s" "$1" > {out}', "hook"], path, 10
        )
        self.assertTrue(outcome.ok)
        with open(out) as f:
            self.assertEqual(f.read(), path)

    async def test_timeout(self):
        """
        A command still running after its timeout is killed, and says so.
        """
        outcome = await run_command(reactor, ["/bin/sleep"], "30", 0.2)
        self.assertFalse(outcome.ok)
        self.assertEqual(outcome.describe(), "was killed after its timeout")

    async def test_missing_program(self):
        """
        A program that cannot be started is a failure saying why.
        """
        outcome = await run_command(reactor, ["/no/such/program"], "/x", 10)
        self.assertFalse(outcome.ok)
        self.assertIn("No such file", outcome.describe())
