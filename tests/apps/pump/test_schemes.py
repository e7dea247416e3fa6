"""The scheme modules are imported on first use (ion.apps.pump.transfer.schemes)."""

import os
import subprocess
import sys

from twisted.trial import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


class SchemesTests(unittest.TestCase):
    def test_imported_on_first_lookup(self):
        """A pump that never sees an sftp or ftp URL does not import conch or twisted's ftp
        (a fresh process: this one may have imported them); asking whether a scheme is known
        imports nothing; the first lookup imports the module."""
        code = """
import sys
from ion.apps.pump import transfer
from ion.apps.pump.transfer.blocks import SCHEMES, SEND_SCHEMES

def loaded():
    return [m for m in ("twisted.conch", "twisted.protocols.ftp") if m in sys.modules]

at_start = loaded()
known = "sftp" in SCHEMES and "ftp" in SEND_SCHEMES and "gopher" not in SCHEMES
after_membership = loaded()
module = SCHEMES["sftp"]
print(at_start, known, after_membership, module.__name__, loaded())
"""
        done = subprocess.run(
            [sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=ROOT),
            capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(
            done.stdout.strip(),
            "[] True [] ion.apps.pump.transfer.sftp ['twisted.conch']",
            done.stderr,
        )
