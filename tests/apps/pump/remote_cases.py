"""
Tests that the sftp and ftp schemes of L{ion.apps.pump.transfer} share: each scheme's
L{TestCase} mixes L{RemoteTransferCases} in and provides, from its C{setUp}, C{server} (a
server of L{tests.apps.pump.servers} on C{root}, with C{big-stall.bin} among its stalled
names), C{secret} (its password), C{local} (a local directory), C{data} (the bytes of
C{root/data.bin}), C{dest}, C{get(path, dest=None, **kwargs)} and C{options()} (the keyword
arguments a transfer of the scheme needs: credentials, known hosts).
"""

import base64
import hashlib
import os
import threading

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from ion.apps.pump import transfer
from ion.apps.pump.transfer import ChecksumMismatch, TransferError
from ion.apps.pump.transfer.errors import LocalFailure
from ion.apps.pump.transfer.inflight import BUFFER_LIMIT
from ion.apps.pump.transfer.outgoing import OutgoingFile
from ion.apps.pump.transfer.pacing import Pacers
from tests.apps.pump.servers import leftovers, partly_written, source_threads, write_file
from tests.waiting import until


def sha512(data):
    return base64.b64encode(hashlib.sha512(data).digest()).decode()


class RemoteTransferCases:
    """Behaviour a remote scheme's get and put keep whatever the protocol."""

    def put(self, src, path, **kwargs):
        return transfer.put(reactor, src, self.server.url + path, **self.options(), **kwargs)

    async def test_checksumMismatch(self):
        """
        A checksum mismatch leaves the previous file as it was.
        """
        write_file(self.dest, b"previous")
        with self.assertRaises(ChecksumMismatch):
            await self.get("/data.bin", expected_checksum=("sha512", sha512(b"other")))
        with open(self.dest, "rb") as f:
            self.assertEqual(f.read(), b"previous")
        self.assertEqual(leftovers(self.local), [])

    async def test_cancel(self):
        """
        Cancelling a transfer in progress removes its temporary file and closes the
        connection (a file bigger than C{BUFFER_LIMIT} streams to disk from the start).
        """
        with open(os.path.join(self.root, "big-stall.bin"), "wb") as f:
            f.truncate(2 * BUFFER_LIMIT)
        d = Deferred.fromCoroutine(self.get("/big-stall.bin"))
        await until(lambda: partly_written(self.local), 10, "a partly written file")
        d.cancel()
        with self.assertRaises(CancelledError):
            await d
        self.assertEqual(leftovers(self.local), [])
        self.assertFalse(os.path.exists(self.dest))

    async def test_putSourceReadInPool(self):
        """
        With a pool, a put opens and reads its source in the pool's threads, never in the
        reactor's: a slow disk does not hold up other transfers. The copy arrives whole,
        with the checksum of its bytes.
        """
        pool, threads = source_threads(self)
        src = write_file(os.path.join(self.local, "up.bin"), self.data)
        result = await self.put(src, "/sub/up.bin", pool=pool)
        with open(os.path.join(self.root, "sub", "up.bin"), "rb") as f:
            self.assertEqual(f.read(), self.data)
        self.assertEqual(result.checksum, {"sha512": sha512(self.data)})
        self.assertGreater(len(threads), 2)
        self.assertNotIn(threading.main_thread(), threads)

    async def test_putSourceReadFails(self):
        """
        A put whose source cannot be read part way fails with that error (not a hang on the
        connection), and leaves no temporary file at the server.
        """
        pool, _ = source_threads(self)
        reads = []
        reading = OutgoingFile.read

        def failing(outgoing, length):
            reads.append(length)
            if len(reads) > 1:
                raise LocalFailure("cannot read up.bin: disk gone")
            return reading(outgoing, length)

        self.patch(OutgoingFile, "read", failing)
        src = write_file(os.path.join(self.local, "up.bin"), os.urandom(3 * 1024 * 1024))
        with self.assertRaises(LocalFailure):
            await self.put(src, "/sub/up.bin", pool=pool)
        self.assertEqual(leftovers(os.path.join(self.root, "sub")), [])

    async def lost_put(self):
        """A put of 2 MiB at 256 KiB/s, once it has written part of its temporary file at
        the server: (the put, the server's directory)."""
        src = write_file(os.path.join(self.local, "up.bin"), os.urandom(2 * 1024 * 1024))
        putting = Deferred.fromCoroutine(
            self.put(src, "/sub/up.bin", pacers=Pacers(reactor, 256 * 1024))
        )
        sub = os.path.join(self.root, "sub")
        await until(lambda: partly_written(sub), 10, "a partly written file at the server")
        return putting, sub

    async def test_putLostRemovesTemporaryFile(self):
        """
        A put whose connection is lost mid-file fails transiently and removes its temporary
        file at the server on a new session (the lost one cannot): the retry sends to a new
        name, and nothing is left behind.
        """
        putting, sub = await self.lost_put()
        for protocol in list(self.server.factory.connections):
            protocol.transport.abortConnection()
        with self.assertRaises(TransferError) as caught:
            await putting
        self.assertTrue(caught.exception.transient)
        self.assertEqual(os.listdir(sub), [])

    async def test_putLostServerGone(self):
        """
        When the temporary file of a lost put cannot be removed (the server is gone too),
        the put fails with its own error and the removal's failure is logged, without the
        password.
        """
        putting, sub = await self.lost_put()
        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        await self.server.stop()
        with self.assertRaises(TransferError) as caught:
            await putting
        self.assertTrue(caught.exception.transient)
        self.assertNotIn("remove", caught.exception.message)
        self.assertEqual(len(leftovers(sub)), 1)
        warned = [formatEvent(e) for e in logged if e.get("log_level") == LogLevel.warn]
        self.assertTrue(any("cannot remove the temporary file" in w for w in warned), warned)
        self.assertFalse(any(self.secret in w for w in warned), warned)
