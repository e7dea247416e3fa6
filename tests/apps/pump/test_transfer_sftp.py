"""
Tests for the sftp scheme of L{ion.apps.pump.transfer}, against a conch SFTP server on
loopback.
"""

import os
import stat
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from ion.apps.pump import transfer
from ion.apps.pump.transfer import (
    AuthFailed,
    BadRequest,
    Credentials,
    NotFound,
    ServerNotTrusted,
    Timeouts,
    TransferTimeout,
)
from tests.apps.pump.remote_cases import RemoteTransferCases, sha512
from tests.apps.pump.servers import leftovers, settle, ssh_key, start_sftp, write_file

SECRET = "sftp-Pa55-word"


class SFTPTests(RemoteTransferCases, TestCase):
    """
    get, put and list over sftp, with host keys checked.
    """

    secret = SECRET

    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        self.local = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.root, "sub"))
        os.makedirs(self.local)
        self.data = os.urandom(1_000_003)
        self.src = write_file(os.path.join(self.root, "data.bin"), self.data)
        os.utime(self.src, (1_500_000_000, 1_500_000_000))
        os.chmod(self.src, 0o640)
        write_file(os.path.join(self.root, "stall.bin"), b"s" * 200_000)
        os.symlink("data.bin", os.path.join(self.root, "link"))
        self.server = start_sftp(
            self,
            self.root,
            user="bob",
            password=SECRET,
            stalled_names=["stall.bin", "big-stall.bin"],
        )
        self.addCleanup(settle)
        self.known_hosts = write_file(
            os.path.join(self.local, "known_hosts"), self.server.known_hosts_line().encode()
        )
        self.port = self.server.port.getHost().port
        self.creds = Credentials.parse(f"sftp://bob:{SECRET}@127.0.0.1:{self.port}/\n")
        self.dest = os.path.join(self.local, "out.bin")

    def get(self, path, dest=None, **kwargs):
        kwargs.setdefault("credentials", self.creds)
        kwargs.setdefault("known_hosts", self.known_hosts)
        return transfer.get(reactor, self.server.url + path, dest or self.dest, **kwargs)

    def options(self):
        return {"credentials": self.creds, "known_hosts": self.known_hosts}

    async def test_getWithPassword(self):
        """
        A file arrives whole (many pipelined reads), with the server's mtime and mode.
        """
        result = await self.get("/data.bin", expected_checksum=("sha512", sha512(self.data)))
        with open(self.dest, "rb") as f:
            self.assertEqual(f.read(), self.data)
        self.assertEqual((result.size, result.mtime, result.mode), (len(self.data), 1.5e9, 0o640))
        info = os.stat(self.dest)
        self.assertEqual((info.st_mtime, stat.S_IMODE(info.st_mode)), (1.5e9, 0o640))
        self.assertEqual(leftovers(self.local), [])

    async def test_getWithKey(self):
        """
        A credentials line with C{ssh_key} logs in with that key, no password needed.
        """
        key = self.server.write_client_key(os.path.join(self.local, "id_ed25519"))
        creds = Credentials.parse(f"sftp://bob@127.0.0.1:{self.port}/ ssh_key={key}\n")
        result = await self.get("/data.bin", credentials=creds)
        self.assertEqual(result.size, len(self.data))

    async def test_emptyFile(self):
        """
        An empty file is delivered too.
        """
        write_file(os.path.join(self.root, "empty"), b"")
        result = await self.get("/empty")
        self.assertEqual(result.size, 0)
        self.assertEqual(os.path.getsize(self.dest), 0)

    async def test_wrongPassword(self):
        """
        A refused login is L{AuthFailed}, permanent, with no file and no password shown.
        """
        creds = Credentials.parse(f"sftp://bob:wrong-{SECRET}@127.0.0.1:{self.port}/\n")
        with self.assertRaises(AuthFailed) as caught:
            await self.get("/data.bin", credentials=creds)
        self.assertFalse(caught.exception.transient)
        self.assertNotIn(SECRET, str(caught.exception))
        self.assertEqual(os.listdir(self.local), ["known_hosts"])

    async def test_unknownHostKey(self):
        """
        A server whose key is not in known_hosts is refused, permanently, naming the file.
        """
        empty = write_file(os.path.join(self.local, "empty_hosts"), b"")
        with self.assertRaises(ServerNotTrusted) as caught:
            await self.get("/data.bin", known_hosts=empty)
        self.assertFalse(caught.exception.transient)
        self.assertIn("is not in " + empty, str(caught.exception))
        self.assertFalse(os.path.exists(self.dest))

    async def test_changedHostKey(self):
        """
        A server whose key differs from the known one is refused.
        """
        other = write_file(
            os.path.join(self.local, "other_hosts"),
            self.server.known_hosts_line(ssh_key("impostor")).encode(),
        )
        with self.assertRaises(ServerNotTrusted) as caught:
            await self.get("/data.bin", known_hosts=other)
        self.assertIn("does not match", str(caught.exception))
        self.assertFalse(os.path.exists(self.dest))

    async def test_notFound(self):
        """
        A missing file is L{NotFound} and leaves nothing.
        """
        with self.assertRaises(NotFound):
            await self.get("/missing.bin")
        self.assertEqual(leftovers(self.local), [])
        self.assertFalse(os.path.exists(self.dest))

    async def test_directory(self):
        """
        Getting a directory is a L{BadRequest}.
        """
        with self.assertRaises(BadRequest):
            await self.get("/sub")

    async def test_stalled(self):
        """
        Reads left unanswered end in L{TransferTimeout} after the idle time, while another
        transfer from the same server completes.
        """
        # An idle time a loaded machine's SSH handshakes and reads stay well within.
        timeouts = Timeouts(connect=5, idle=2)
        start = time.monotonic()
        stalled = Deferred.fromCoroutine(self.get("/stall.bin", timeouts=timeouts))
        result = await self.get(
            "/data.bin", os.path.join(self.local, "other.bin"), timeouts=timeouts
        )
        self.assertEqual(result.size, len(self.data))
        with self.assertRaises(TransferTimeout):
            await stalled
        self.assertTrue(2 <= time.monotonic() - start < 8)
        self.assertFalse(os.path.exists(self.dest))
        self.assertEqual(leftovers(self.local), [])

    async def test_list(self):
        """
        Listing gives files with size, mtime and mode, directories and links.
        """
        entries = await transfer.list(
            reactor, self.server.url + "/", credentials=self.creds, known_hosts=self.known_hosts
        )
        self.assertEqual(
            [(e.name, e.type) for e in entries],
            [("data.bin", "file"), ("link", "link"), ("stall.bin", "file"), ("sub", "dir")],
        )
        self.assertEqual(
            entries[0], transfer.Entry("data.bin", len(self.data), 1.5e9, 0o640, "file")
        )
        # What the listing read (a poll's byte_rate_max spends it): names and long names.
        self.assertGreater(entries.bytes, 2 * sum(len(e.name) for e in entries))

    async def test_listNotFound(self):
        """
        Listing a missing directory is L{NotFound}.
        """
        with self.assertRaises(NotFound):
            await transfer.list(
                reactor,
                self.server.url + "/nope",
                credentials=self.creds,
                known_hosts=self.known_hosts,
            )

    async def test_put(self):
        """
        Put writes a temporary name, sets mode and mtime, and renames it into place, also
        over an existing file.
        """
        src = write_file(os.path.join(self.local, "up.bin"), self.data)
        os.utime(src, (1_400_000_000, 1_400_000_000))
        os.chmod(src, 0o604)
        target = os.path.join(self.root, "sub", "up.bin")
        write_file(target, b"old")
        for _ in range(2):
            result = await transfer.put(
                reactor,
                src,
                self.server.url + "/sub/up.bin",
                credentials=self.creds,
                known_hosts=self.known_hosts,
            )
            with open(target, "rb") as f:
                self.assertEqual(f.read(), self.data)
        info = os.stat(target)
        self.assertEqual((info.st_mtime, stat.S_IMODE(info.st_mode)), (1.4e9, 0o604))
        self.assertEqual(os.listdir(os.path.join(self.root, "sub")), ["up.bin"])
        self.assertEqual(result.checksum, {"sha512": sha512(self.data)})

    async def test_putNoDirectory(self):
        """
        Putting into a missing remote directory makes it (and its parents); a directory that
        cannot be made (a file is in the way) is a L{TransferError}, nothing written.
        """
        src = write_file(os.path.join(self.local, "up.bin"), b"x")
        await transfer.put(
            reactor,
            src,
            self.server.url + "/nope/deeper/up.bin",
            credentials=self.creds,
            known_hosts=self.known_hosts,
        )
        self.assertEqual(os.listdir(os.path.join(self.root, "nope", "deeper")), ["up.bin"])
        with self.assertRaises(transfer.TransferError):
            await transfer.put(
                reactor,
                src,
                self.server.url + "/data.bin/up.bin",
                credentials=self.creds,
                known_hosts=self.known_hosts,
            )
