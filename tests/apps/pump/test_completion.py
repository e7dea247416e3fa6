"""
Tests for L{ion.apps.pump.completion}: the on_complete command, run as a real child process
(the argument's checks are in test_args).
"""

import os

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from ion.apps.pump.completion import run_command


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
