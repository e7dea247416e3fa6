"""A boot that fails, through the real command: the reason once, in one line, no traceback."""

import os

from twisted.internet import threads
from twisted.trial import unittest

from tests.broker import get_broker
from tests.core.cc.test_tap import RES, twistd

PUMP = os.path.join(RES, "apps", "pump.app")


class BootErrorTests(unittest.TestCase):
    def failed(self, *args, cwd=None, status=1):
        """Run the command, check its status and no traceback; the output's lines."""
        if cwd is None:
            cwd = self.mktemp()
            os.makedirs(cwd)
        result = twistd("--no-shell", "--res", RES, *args, cwd=cwd)
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, status, output)
        self.assertNotIn("Traceback", output)
        return output.splitlines()

    def mentioning(self, lines, text):
        return [line for line in lines if text in line]

    def test_read_only_working_directory(self):
        """A working directory where var/ cannot be written (here: var is a regular file,
        which root cannot write under either): one line naming the file and the reason,
        status 1."""
        cwd = self.mktemp()
        os.makedirs(cwd)
        open(os.path.join(cwd, "var"), "w").close()
        lines = self.failed(PUMP, cwd=cwd)
        said = self.mentioning(lines, "Not a directory")
        self.assertEqual(len(said), 1, lines)
        self.assertIn(
            "container failed to start: the embedded broker cannot keep its run record "
            "var/memory-broker.run: Not a directory",
            said[0],
        )

    def test_unwritable_destination(self):
        """A subscription whose directory cannot be created (under a regular file): one line
        naming the subscription and the directory, status 1."""
        bad = "apparg_pump={'subscriptions': [{'name': 'd', 'directory': '/etc/hostname/dest/'}]}"
        lines = self.failed("-a", bad, PUMP)
        said = self.mentioning(lines, "/etc/hostname")
        self.assertEqual(len(said), 1, lines)
        self.assertIn(
            "consumer d: cannot create directory /etc/hostname/dest/: Not a directory", said[0]
        )
        self.assertNotIn("lifecycle hook", "\n".join(lines))

    def test_bad_pump_args_once(self):
        """Pump args found bad by a process as it starts: said once (not by the process, its
        supervisor and the boot each), status 2."""
        bad = "apparg_pump={'transfer': {'credentials': '/nonexistent/credentials.conf'}}"
        lines = self.failed("-a", bad, PUMP, status=2)
        said = self.mentioning(lines, "/nonexistent/credentials.conf")
        self.assertEqual(len(said), 1, lines)
        self.assertIn("cc: container failed to start: ", said[0])

    async def test_wrong_password_once(self):
        """A wrong broker password: said once (not as a warning, a critical line and a stderr
        line), status 1, the password hidden."""
        broker = get_broker()
        url = f"amqp://alice:wrongsekrit@{broker.host}:{broker.port}/"
        cwd = self.mktemp()
        os.makedirs(cwd)
        result = await threads.deferToThread(twistd, "--no-shell", "--broker", url, cwd=cwd)
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 1, output)
        self.assertNotIn("Traceback", output)
        self.assertNotIn("wrongsekrit", output)
        said = self.mentioning(output.splitlines(), "ACCESS_REFUSED")
        self.assertEqual(len(said), 1, output)
        self.assertIn("cc: container failed to start: cannot connect to", said[0])
