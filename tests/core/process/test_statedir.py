"""One owner per state directory: two processes never share one, wherever they run."""

import os
import subprocess
import sys

from twisted.trial import unittest

from ion.core.cc.testing import make_container
from ion.core.process import DirectoryInUse, Process
from ion.core.process.statedir import OWNER_FILE, claim


class Keeper(Process):
    """Keeps its state in the directory given as arg `state_dir`."""

    def on_init(self):
        self.claim_directory(self.args["state_dir"])


class ClaimTests(unittest.TestCase):
    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())

    async def test_second_process_refused_until_the_first_ends(self):
        """A second process on the same state directory fails to start with a message naming
        the directory and the owner; once the owner has terminated the directory is free."""
        container = await make_container(self)
        first = await container.spawn(Keeper, args={"state_dir": self.directory})
        with self.assertRaises(DirectoryInUse) as caught:
            await container.spawn(Keeper, args={"state_dir": self.directory})
        message = str(caught.exception)
        self.assertIn(self.directory, message)
        self.assertIn(f"process {os.getpid()} (container {container.id})", message)
        self.assertEqual(len(self.flushLoggedErrors()), 0)
        await first.terminate()
        again = await container.spawn(Keeper, args={"state_dir": self.directory})
        await again.crash("test")
        # A crashed owner lets go too (its supervisor restarts it on the same directory).
        await container.spawn(Keeper, args={"state_dir": self.directory})

    async def test_two_containers_in_one_os_process(self):
        a = await make_container(self)
        b = await make_container(self)
        await a.spawn(Keeper, args={"state_dir": self.directory})
        with self.assertRaises(DirectoryInUse):
            await b.spawn(Keeper, args={"state_dir": self.directory})

    def test_owner_in_another_os_process(self):
        """A live owner in another OS process is named by its pid; once it has died (killed,
        nothing cleaned up) the directory can be claimed."""
        holder = subprocess.Popen(
            [sys.executable, "-c",
             "import sys; from ion.core.process.statedir import claim; "
             "claim(sys.argv[1], 'other'); print('held', flush=True); sys.stdin.read()",
             self.directory],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + _ROOT),
        )
        self.addCleanup(holder.wait)
        self.addCleanup(holder.kill)
        self.assertEqual(holder.stdout.readline().strip(), "held")
        with self.assertRaises(DirectoryInUse) as caught:
            claim(self.directory, "me")
        self.assertIn("in use by process other", str(caught.exception))
        holder.kill()
        holder.wait()
        mine = claim(self.directory, "4242 me")
        with open(os.path.join(self.directory, OWNER_FILE)) as f:
            self.assertEqual(f.read(), "4242 me\n")
        mine.release()


_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
