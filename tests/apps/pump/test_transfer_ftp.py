"""
Tests for the ftp scheme of L{ion.apps.pump.transfer}, against twisted's FTP server on loopback.
"""

import os
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from ion.apps.pump import transfer
from ion.apps.pump.transfer import AuthFailed, Credentials, NotFound, Timeouts, TransferTimeout
from tests.apps.pump.remote_cases import RemoteTransferCases, sha512
from tests.apps.pump.servers import leftovers, settle, start_ftp, write_file

SECRET = "ftp-Pa55-word"


class FTPTests(RemoteTransferCases, TestCase):
    """
    get, put and list over ftp.
    """

    secret = SECRET

    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        self.local = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.root, "sub"))
        os.makedirs(self.local)
        self.data = os.urandom(700_001)
        src = write_file(os.path.join(self.root, "data.bin"), self.data)
        os.utime(src, (1_500_000_000, 1_500_000_000))
        os.chmod(src, 0o640)
        write_file(os.path.join(self.root, "stall.bin"), b"s" * 100_000)
        self.server = start_ftp(
            self,
            self.root,
            user="carol",
            password=SECRET,
            stalled_names=["stall.bin", "big-stall.bin"],
        )
        self.addCleanup(settle)
        port = self.server.port.getHost().port
        self.creds = Credentials.parse(f"ftp://carol:{SECRET}@127.0.0.1:{port}/\n")
        self.dest = os.path.join(self.local, "out.bin")

    def get(self, path, dest=None, **kwargs):
        kwargs.setdefault("credentials", self.creds)
        return transfer.get(reactor, self.server.url + path, dest or self.dest, **kwargs)

    def options(self):
        return {"credentials": self.creds}

    async def test_get(self):
        """
        A file arrives whole, with the mtime MDTM gives.
        """
        result = await self.get("/data.bin", expected_checksum=("sha512", sha512(self.data)))
        with open(self.dest, "rb") as f:
            self.assertEqual(f.read(), self.data)
        self.assertEqual((result.size, result.mtime), (len(self.data), 1.5e9))
        self.assertEqual(os.stat(self.dest).st_mtime, 1.5e9)
        self.assertEqual(leftovers(self.local), [])

    async def test_wrongPassword(self):
        """
        A refused login is L{AuthFailed}, permanent, with no file and no password shown.
        """
        url = self.server.url.replace("carol@", f"carol:not-{SECRET}@") + "/data.bin"
        with self.assertRaises(AuthFailed) as caught:
            await transfer.get(reactor, url, self.dest)
        self.assertFalse(caught.exception.transient)
        self.assertNotIn(SECRET, str(caught.exception))
        self.assertEqual(os.listdir(self.local), [])

    async def test_anonymousRefused(self):
        """
        Without credentials the login is anonymous, which this server refuses.
        """
        with self.assertRaises(AuthFailed):
            await transfer.get(
                reactor, self.server.url.replace("carol@", "") + "/data.bin", self.dest
            )

    async def test_notFound(self):
        """
        A missing file is L{NotFound} and leaves nothing.
        """
        with self.assertRaises(NotFound) as caught:
            await self.get("/missing.bin")
        self.assertIn("550", str(caught.exception))
        self.assertEqual(os.listdir(self.local), [])

    async def test_stalled(self):
        """
        A data connection that goes quiet ends in L{TransferTimeout} after the idle time, while
        another transfer from the same server completes.
        """
        timeouts = Timeouts(connect=5, idle=0.5)
        start = time.monotonic()
        stalled = Deferred.fromCoroutine(self.get("/stall.bin", timeouts=timeouts))
        result = await self.get(
            "/data.bin", os.path.join(self.local, "other.bin"), timeouts=timeouts
        )
        self.assertEqual(result.size, len(self.data))
        with self.assertRaises(TransferTimeout):
            await stalled
        self.assertTrue(0.5 <= time.monotonic() - start < 3)
        self.assertFalse(os.path.exists(self.dest))
        self.assertEqual(leftovers(self.local), [])

    async def test_list(self):
        """
        LIST (this server has no MLSD) gives files with exact sizes and modes, and directories.
        """
        entries = await transfer.list(reactor, self.server.url + "/", credentials=self.creds)
        self.assertEqual(
            [(e.name, e.type, e.size) for e in entries],
            [
                ("data.bin", "file", len(self.data)),
                ("stall.bin", "file", 100_000),
                ("sub", "dir", None),
            ],
        )
        self.assertEqual(entries[0].mode, 0o640)
        self.assertIsNotNone(entries[0].mtime)
        # What the listing read (a poll's byte_rate_max spends it): a line per name.
        self.assertGreater(entries.bytes, sum(len(e.name) + 20 for e in entries))

    async def test_listMLSD(self):
        """
        A server with MLSD gives exact mtimes and modes through it.
        """
        server = start_ftp(self, self.root, user="carol", password=SECRET, mlsd=True)
        url = server.url.replace("carol@", f"carol:{SECRET}@") + "/"
        entries = await transfer.list(reactor, url)
        self.assertEqual(
            entries[0], transfer.Entry("data.bin", len(self.data), 1.5e9, 0o640, "file")
        )
        self.assertEqual(
            [(e.name, e.type) for e in entries[1:]], [("stall.bin", "file"), ("sub", "dir")]
        )
        with self.assertRaises(NotFound):
            await transfer.list(reactor, url + "nope/")

    async def test_listNotFound(self):
        """
        Listing a missing directory is L{NotFound}.
        """
        with self.assertRaises(NotFound):
            await transfer.list(reactor, self.server.url + "/nope/", credentials=self.creds)

    async def test_put(self):
        """
        STOR goes to a temporary name renamed into place, also over an existing file.
        """
        src = write_file(os.path.join(self.local, "up.bin"), self.data)
        target = os.path.join(self.root, "sub", "up.bin")
        write_file(target, b"old")
        for _ in range(2):
            result = await transfer.put(
                reactor, src, self.server.url + "/sub/up.bin", credentials=self.creds
            )
            with open(target, "rb") as f:
                self.assertEqual(f.read(), self.data)
        self.assertEqual(os.listdir(os.path.join(self.root, "sub")), ["up.bin"])
        self.assertEqual(result.size, len(self.data))

    async def test_putNoDirectory(self):
        """
        Putting into a missing directory makes it (and its parents); one that cannot be made
        (a file is in the way) fails permanently and leaves nothing.
        """
        src = write_file(os.path.join(self.local, "up.bin"), b"x")
        await transfer.put(
            reactor, src, self.server.url + "/nope/deeper/up.bin", credentials=self.creds
        )
        self.assertEqual(os.listdir(os.path.join(self.root, "nope", "deeper")), ["up.bin"])
        with self.assertRaises(NotFound):
            await transfer.put(
                reactor, src, self.server.url + "/data.bin/up.bin", credentials=self.creds
            )
