"""
Tests for L{ion.apps.pump.transfer}: errors, credentials, limits, delivery, and the file scheme.

The network schemes have their own modules (C{test_transfer_http}, C{..._sftp}, C{..._ftp});
constant memory is checked in C{test_transfer_memory}.
"""

import base64
import errno
import fcntl
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
import weakref

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, DeferredList, gatherResults
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

import ion.apps.pump.transfer as transfer
from ion.apps.pump.transfer import (
    AuthFailed,
    BadRequest,
    ChecksumMismatch,
    ConnectionFailed,
    Credentials,
    CredentialsError,
    Entry,
    HostLimiter,
    LocalFailure,
    NotFound,
    Refused,
    ServerNotTrusted,
    ShortTransfer,
    SizeMismatch,
    TRANSIENT_CODES,
    Timeouts,
    TooLarge,
    TransferError,
    TransferTimeout,
)
from ion.apps.pump.transfer import file as file_scheme
from ion.apps.pump.transfer import inflight
from ion.apps.pump.transfer.inflight import (
    BACKLOG_LIMIT,
    BUFFER_LIMIT,
    DIRECT_MIN,
    DestinationRoot,
    DirectorySyncs,
    InflightFile,
)
from ion.apps.pump.transfer.limits import IdleTimer
from ion.apps.pump.transfer.outgoing import OutgoingFile
from ion.core import credentials as core_credentials
from tests.apps.pump.fixtures import unblock_after, without_collector
from tests.apps.pump.servers import leftovers, write_file
from tests.waiting import until

SECRET = "s3cr3t-Pa55"


def sha512(data):
    return base64.b64encode(hashlib.sha512(data).digest()).decode()


def md5(data):
    return base64.b64encode(hashlib.md5(data).digest()).decode()


class ExportsTests(SynchronousTestCase):
    """
    The package exports its public API and nothing else.
    """

    def test_all(self):
        """
        Every name in C{__all__} exists; the operations are coroutine functions.
        """
        for name in transfer.__all__:
            self.assertTrue(hasattr(transfer, name), name)
        import inspect

        for name in ("get", "put", "list"):
            self.assertTrue(inspect.iscoroutinefunction(getattr(transfer, name)))


class ErrorTests(SynchronousTestCase):
    """
    Each error says whether a retry may help and which report code applies.
    """

    def test_table(self):
        """
        Codes and transience follow the documented table.
        """
        table = [
            (NotFound, 404, False),
            (AuthFailed, 403, False),
            (ServerNotTrusted, 403, False),
            (ChecksumMismatch, 499, True),
            (ShortTransfer, 499, True),
            (SizeMismatch, 499, True),
            (TooLarge, 413, False),
            (TransferTimeout, 504, True),
            (ConnectionFailed, 503, True),
            (LocalFailure, 500, True),
            (BadRequest, 422, False),
            (Refused, 422, False),
        ]
        for cls, code, transient in table:
            error = cls("x")
            self.assertIsInstance(error, TransferError)
            self.assertEqual((error.code, error.transient), (code, transient), cls)

    def test_codeTellsTransience(self):
        """
        Every error class is transient exactly when its code is in C{TRANSIENT_CODES}, so the
        code alone, once it crossed the wire, gives the same decision.
        """
        import ion.apps.pump.transfer.errors as errors

        classes = [
            value
            for value in vars(errors).values()
            if isinstance(value, type) and issubclass(value, TransferError)
        ]
        self.assertGreater(len(classes), 10)
        for cls in classes:
            error = cls("x")
            self.assertEqual(error.transient, error.code in TRANSIENT_CODES, cls)
        self.assertFalse(LocalFailure("x", code=422).transient)

    def test_override(self):
        """
        The code can be given per instance (transience follows it); the message is the str.
        """
        error = TransferError("server answered 502", code=503)
        self.assertEqual(
            (str(error), error.code, error.transient), ("server answered 502", 503, True)
        )
        self.assertIn("code=503", repr(error))

    def test_diskFullIsTransient(self):
        """
        A full disk is worth retrying (500); a permission problem is not (422).
        """
        import errno

        full = LocalFailure.from_os_error("x", OSError(errno.ENOSPC, "No space left on device"))
        denied = LocalFailure.from_os_error("x", OSError(errno.EACCES, "Permission denied"))
        self.assertEqual((full.code, full.transient), (500, True))
        self.assertEqual((denied.code, denied.transient), (422, False))
        self.assertIn("No space left", full.message)


class CredentialsTests(SynchronousTestCase):
    """
    L{Credentials} reads the sr3-style credentials file and finds the line for a URL. It is
    L{ion.core.credentials}' reader: the file the container takes its broker password from.
    """

    TEXT = (
        "# pump credentials\n"
        "\n"
        f"https://alice:{SECRET}@data.example.org/\n"
        "ftp://anon:p%40ss%20word@ftp.example.org:2121/\n"
        "sftp://bob@feed.example.org/ ssh_key=/keys/id_ed25519\n"
        "sftp://carol:pw1@feed.example.org/\n"
        "sftp://carol:pw2@feed.example.org/incoming/\n"
    )

    def write(self, text, mode=0o600):
        path = self.mktemp()
        write_file(path, text.encode())
        os.chmod(path, mode)
        return path

    def test_load(self):
        """
        A private file loads; each line gives scheme, host, port, user, password, options.
        """
        creds = Credentials.load(self.write(self.TEXT))
        self.assertEqual(len(creds.entries), 5)
        alice = creds.find("https://data.example.org/some/file")
        self.assertEqual((alice.user, alice.password, alice.port), ("alice", SECRET, 443))
        bob = creds.find("sftp://bob@feed.example.org/x")
        self.assertEqual((bob.user, bob.password, bob.ssh_key), ("bob", None, "/keys/id_ed25519"))

    def test_percentEncoding(self):
        """
        Passwords are percent-decoded; the port must match.
        """
        creds = Credentials.parse(self.TEXT)
        self.assertEqual(creds.find("ftp://ftp.example.org:2121/a").password, "p@ss word")
        self.assertIsNone(creds.find("ftp://ftp.example.org/a"))

    def test_longestPathWins(self):
        """
        A line with a path serves URLs under it, before a line for the whole host.
        """
        creds = Credentials.parse(self.TEXT)
        self.assertEqual(creds.find("sftp://carol@feed.example.org/incoming/f").password, "pw2")
        self.assertEqual(creds.find("sftp://carol@feed.example.org/other/f").password, "pw1")
        self.assertEqual(creds.find("sftp://feed.example.org/incomingx").user, "bob")

    def test_noMatch(self):
        """
        Another host, scheme or user finds nothing.
        """
        creds = Credentials.parse(self.TEXT)
        self.assertIsNone(creds.find("http://data.example.org/"))
        self.assertIsNone(creds.find("https://other.example.org/"))
        self.assertIsNone(creds.find("sftp://dave@feed.example.org/"))

    def test_groupReadableRefused(self):
        """
        A file readable by group or others is refused, and the error names the fix without
        showing any password.
        """
        for mode in (0o644, 0o640, 0o604):
            path = self.write(self.TEXT, mode)
            error = self.assertRaises(CredentialsError, Credentials.load, path)
            self.assertIn("chmod 600", str(error))
            self.assertIn(f"{mode:04o}", str(error))
            self.assertNotIn(SECRET, str(error))

    def test_missingFile(self):
        """
        A missing file is a L{CredentialsError} naming it.
        """
        error = self.assertRaises(CredentialsError, Credentials.load, "/nonexistent/creds")
        self.assertIn("/nonexistent/creds", str(error))

    def test_badLines(self):
        """
        Malformed lines are refused with their line number and without their password.
        """
        cases = [
            f"gopher://u:{SECRET}@h/\n",
            f"https://u:{SECRET}@h/ colour=blue\n",
            f"https://u:{SECRET}@h/ {SECRET}\n",
            f"https://u:{SECRET}@h:{SECRET}/\n",
            f"u:{SECRET}@h\n",
        ]
        for text in cases:
            error = self.assertRaises(CredentialsError, Credentials.parse, "\n" + text, "f")
            self.assertIn("f, line 2", str(error))
            self.assertNotIn(SECRET, str(error))

    def test_reprHidesPassword(self):
        """
        Neither a credential's repr nor the collection's shows a password.
        """
        creds = Credentials.parse(self.TEXT)
        self.assertNotIn(SECRET, repr(creds))
        self.assertNotIn(SECRET, repr(creds.entries))

    def test_oneReader(self):
        """
        The pump's names are the core reader's: one class of error, one of credentials.
        """
        self.assertIs(Credentials, core_credentials.Credentials)
        self.assertIs(CredentialsError, core_credentials.CredentialsError)
        self.assertIs(transfer.Credential, core_credentials.Credential)

    def test_brokerLineBeside(self):
        """
        A file that also holds the container's broker account (an amqp line) loads for the
        pump, whose lookups are unchanged, and serves the broker lookup from the same file.
        """
        path = self.write("amqp://ion:broker-pw@rabbit.example.org/  # the broker\n" + self.TEXT)
        creds = Credentials.load(path)
        self.assertEqual(len(creds.entries), 6)
        self.assertEqual(creds.find("sftp://carol@feed.example.org/incoming/f").password, "pw2")
        self.assertEqual(creds.find("ftp://ftp.example.org:2121/a").password, "p@ss word")
        self.assertEqual(creds.find("https://data.example.org/x").password, SECRET)
        broker = "amqp://ion@rabbit.example.org/"
        self.assertEqual(creds.password(broker), "broker-pw")
        self.assertIsNone(creds.find("sftp://rabbit.example.org/"))


class HostLimiterTests(TestCase):
    """
    L{HostLimiter} bounds concurrent transfers per scheme, host and port.
    """

    def test_limit(self):
        """
        Past C{per_host}, a transfer waits for a slot on the same host; other hosts are free.
        """
        limiter = HostLimiter(per_host=2)
        url = "sftp://h.example.org/a"
        held = [Deferred.fromCoroutine(limiter.acquire(url)) for _ in range(3)]
        self.assertEqual([d.called for d in held], [True, True, False])
        other = Deferred.fromCoroutine(limiter.acquire("sftp://h.example.org:2222/a"))
        self.assertTrue(other.called)
        self.assertEqual(limiter.active(url), 2)
        limiter.release(self.successResultOf(held[0]))
        self.assertTrue(held[2].called)
        for d in held[1:] + [other]:
            limiter.release(self.successResultOf(d))
        self.assertEqual(limiter.active(url), 0)
        self.assertEqual(limiter._semaphores, {})

    def test_sameHostDefaultPort(self):
        """
        A URL with the default port and one without it share slots.
        """
        limiter = HostLimiter(per_host=1)
        first = Deferred.fromCoroutine(limiter.acquire("https://H.example.org/a"))
        second = Deferred.fromCoroutine(limiter.acquire("https://h.example.org:443/b"))
        self.assertTrue(first.called)
        self.assertFalse(second.called)
        second.cancel()
        self.failureResultOf(second, CancelledError)

    def test_badLimit(self):
        """
        A limit below 1 is refused.
        """
        self.assertRaises(ValueError, HostLimiter, 0)


class IdleTimerTests(SynchronousTestCase):
    """
    L{IdleTimer} fires after C{seconds} without a touch.
    """

    def test_touchPostpones(self):
        """
        Each touch restarts the countdown; the timer fires once, C{seconds} after the last.
        """
        clock = Clock()
        fired = []
        timer = IdleTimer(clock, 5, lambda: fired.append(clock.seconds()))
        for _ in range(3):
            clock.advance(4)
            timer.touch()
        clock.advance(4.9)
        self.assertEqual(fired, [])
        clock.advance(0.1)
        self.assertEqual(fired, [17])
        self.assertTrue(timer.expired)
        clock.advance(100)
        self.assertEqual(fired, [17])

    def test_firstDelay(self):
        """
        A longer first delay (to connect) is cut short by the first touch.
        """
        clock = Clock()
        fired = []
        IdleTimer(clock, 1, lambda: fired.append(clock.seconds()), first=10).touch()
        clock.advance(1)
        self.assertEqual(fired, [1])

    def test_firstDelayUntouched(self):
        """
        Without a touch, the longer first delay holds: the timer fires only once it is over.
        """
        clock = Clock()
        fired = []
        IdleTimer(clock, 1, lambda: fired.append(clock.seconds()), first=10)
        for _ in range(9):
            clock.advance(1)
        self.assertEqual(fired, [])
        clock.advance(1)
        self.assertEqual(fired, [10])

    def test_stop(self):
        """
        A stopped timer never fires and leaves no call pending.
        """
        clock = Clock()
        timer = IdleTimer(clock, 5, self.fail)
        timer.stop()
        clock.advance(10)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_stoppedLetsItsUserGo(self):
        """
        Stopped, a timer no longer holds what it was to call: a transfer holding its timer,
        whose method that was, is freed once dropped, not left in a cycle for the garbage
        collector.
        """
        without_collector(self)

        class Transfer:
            def __init__(self):
                self.timer = IdleTimer(Clock(), 5, self.abort)

            def abort(self):
                pass

        user = Transfer()
        user.timer.stop()
        freed = weakref.ref(user)
        del user
        self.assertIsNone(freed())


class InflightFileTests(SynchronousTestCase):
    """
    L{InflightFile} writes beside the destination and renames only verified files.
    """

    def setUp(self):
        self.dir = self.mktemp()
        os.mkdir(self.dir)
        self.dest = os.path.join(self.dir, "data.bin")

    def test_temporaryNamesDrawnInBulk(self):
        """
        Temporary names are all different, their random parts drawn from the OS's generator
        64 at a time (one system call per 64 files, not one per file).
        """
        draws = []
        real = inflight.secrets.token_bytes

        def counting(n):
            draws.append(n)
            return real(n)

        self.patch(inflight.secrets, "token_bytes", counting)
        self.patch(inflight, "_tags", [])
        names = {inflight.inflight_name(self.dest) for _ in range(128)}
        self.assertEqual(len(names), 128)
        self.assertEqual(draws, [6 * 64, 6 * 64])
        for name in names:
            self.assertTrue(inflight.is_inflight_name(os.path.basename(name)))
            self.assertEqual(os.path.dirname(name), self.dir)

    def test_temporaryName(self):
        """
        Bytes go to C{.<name>.<random>.inflight} in the destination directory.
        """
        sink = InflightFile(self.dest)
        sink.write(b"abc")
        name = os.path.basename(sink.temp_path)
        self.assertTrue(name.startswith(".data.bin.") and name.endswith(".inflight"), name)
        self.assertFalse(os.path.exists(self.dest))
        sink.discard()
        self.assertEqual(os.listdir(self.dir), [])

    def test_longName(self):
        """
        A destination name near the 255-byte limit still gets a usable temporary name.
        """
        sink = InflightFile(os.path.join(self.dir, "é" * 127))
        sink.write(b"x")
        result = self.successResultOf(Deferred.fromCoroutine(sink.finish()))
        self.assertEqual(result.size, 1)

    def test_finish(self):
        """
        Finishing applies mode and mtime, returns the checksums and leaves only the file.
        """
        sink = InflightFile(self.dest, ["sha512", "md5"], expected_size=11)
        sink.write(b"hello ")
        sink.write(b"world")
        finished = sink.finish(("md5", md5(b"hello world")), 1_000_000_000.5, 0o640)
        result = self.successResultOf(Deferred.fromCoroutine(finished))
        self.assertEqual(
            result.checksum, {"sha512": sha512(b"hello world"), "md5": md5(b"hello world")}
        )
        self.assertEqual((result.size, result.path), (11, self.dest))
        info = os.stat(self.dest)
        self.assertEqual((stat.S_IMODE(info.st_mode), info.st_mtime), (0o640, 1_000_000_000.5))
        self.assertEqual(os.listdir(self.dir), ["data.bin"])

    def test_sizeChecks(self):
        """
        Fewer bytes than announced is a L{ShortTransfer} when finishing; more is a
        permanent L{TooLarge} as soon as they arrive; either way the temporary file goes.
        """
        sink = InflightFile(self.dest)
        sink.write(b"abc")
        sink.declare(4)
        self.failureResultOf(Deferred.fromCoroutine(sink.finish()), ShortTransfer)
        self.assertEqual(os.listdir(self.dir), [])
        sink = InflightFile(self.dest, what="http://h/x")
        sink.declare(2)
        error = self.assertRaises(TooLarge, sink.write, b"abc")
        self.assertFalse(error.transient)
        self.assertIn("http://h/x", str(error))
        self.assertEqual(sink.size, 3)
        sink.discard()
        self.assertEqual(os.listdir(self.dir), [])

    def test_expectedSize(self):
        """
        The caller's size bounds the transfer: a server announcing another size is refused at
        once, and so is a byte beyond it.
        """
        sink = InflightFile(self.dest, expected_size=3)
        self.assertRaises(SizeMismatch, sink.declare, 4)
        sink.write(b"abc")
        self.assertRaises(TooLarge, sink.write, b"d")
        sink.discard()


class InflightFileDiskTests(SynchronousTestCase):
    """
    Small bodies are written in one go at the end; big ones stream to disk as they come.
    """

    def setUp(self):
        self.dir = self.mktemp()
        os.mkdir(self.dir)
        self.dest = os.path.join(self.dir, "data.bin")

    def finish(self, sink, *args):
        return self.successResultOf(Deferred.fromCoroutine(sink.finish(*args)))

    def test_smallBodyWrittenAtTheEnd(self):
        """
        Up to C{BUFFER_LIMIT} bytes, nothing is on disk before L{InflightFile.finish}.
        """
        sink = InflightFile(self.dest)
        sink.declare(BUFFER_LIMIT)
        for _ in range(4):
            sink.write(b"x" * (BUFFER_LIMIT // 4))
        self.assertEqual(os.listdir(self.dir), [])
        self.assertEqual(self.finish(sink).size, BUFFER_LIMIT)
        self.assertEqual(os.listdir(self.dir), ["data.bin"])

    def test_bigBodyStreams(self):
        """
        A body announced bigger than C{BUFFER_LIMIT} goes to the temporary file as it comes.
        """
        data = os.urandom(BUFFER_LIMIT + 10)
        sink = InflightFile(self.dest, expected_size=len(data))
        sink.write(data[:10])
        self.assertEqual(leftovers(self.dir), [os.path.basename(sink.temp_path)])
        sink.write(data[10:])
        self.assertGreater(os.path.getsize(sink.temp_path), BUFFER_LIMIT // 2)
        result = self.finish(sink, ("sha512", sha512(data)))
        self.assertEqual(result.checksum, {"sha512": sha512(data)})
        with open(self.dest, "rb") as f:
            self.assertEqual(f.read(), data)
        self.assertEqual(leftovers(self.dir), [])

    def test_bigFileBypassesThePageCache(self):
        """
        A file of at least C{DIRECT_MIN} bytes streams to disk with O_DIRECT (not copied into
        the page cache): every byte arrives, the unaligned tail and pieces of odd sizes
        too, and the file is verified and renamed as any other.
        """
        if os.major(os.stat(self.dir).st_dev) == 0:
            raise SkipTest("the test directory is not on a block device's file system")
        data = os.urandom(DIRECT_MIN + 4096 * 3 + 77)
        sink = InflightFile(self.dest, expected_size=len(data))
        sizes = [10, 4095, 1024 * 1024 + 3, 5 * 1024 * 1024 - 1]
        offset = 0
        while offset < len(data):
            size = sizes[offset % len(sizes)]
            sink.write(data[offset : offset + size])
            offset += size
            self.assertTrue(fcntl.fcntl(sink._fd, fcntl.F_GETFL) & os.O_DIRECT)
        self.assertEqual(os.path.getsize(sink.temp_path) % 4096, 0)
        result = self.finish(sink, ("sha512", sha512(data)))
        self.assertEqual(result.size, len(data))
        with open(self.dest, "rb") as f:
            self.assertEqual(f.read(), data)
        self.assertEqual(leftovers(self.dir), [])

    def test_noDirectWritesOffBlockDevices(self):
        """
        On a file system without a block device of its own (NFS, FUSE, tmpfs...), where
        O_DIRECT can cost a round trip per write, a big file is written through the page
        cache.
        """
        self.patch(inflight, "_on_block_device", lambda fd: False)
        data = os.urandom(DIRECT_MIN + 5)
        sink = InflightFile(self.dest, expected_size=len(data))
        sink.write(data)
        self.assertFalse(fcntl.fcntl(sink._fd, fcntl.F_GETFL) & os.O_DIRECT)
        self.finish(sink, ("sha512", sha512(data)))
        with open(self.dest, "rb") as f:
            self.assertEqual(f.read(), data)

    def test_directWritesRefused(self):
        """
        A file system that takes the O_DIRECT flag but refuses the writes (EINVAL) gets the
        file through the page cache: every byte arrives.
        """
        write = os.write

        def refusing(fd, data):
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument")
            return write(fd, data)

        self.patch(os, "write", refusing)
        data = os.urandom(DIRECT_MIN + 4096 + 5)
        sink = InflightFile(self.dest, expected_size=len(data))
        for offset in range(0, len(data), 3 * 1024 * 1024):
            sink.write(data[offset : offset + 3 * 1024 * 1024])
        self.assertFalse(fcntl.fcntl(sink._fd, fcntl.F_GETFL) & os.O_DIRECT)
        self.finish(sink, ("sha512", sha512(data)))
        with open(self.dest, "rb") as f:
            self.assertEqual(f.read(), data)

    def test_unannouncedBodyStreamsPastTheLimit(self):
        """
        A body of unknown size starts streaming once it grows past C{BUFFER_LIMIT}.
        """
        sink = InflightFile(self.dest)
        sink.write(b"x" * BUFFER_LIMIT)
        self.assertEqual(leftovers(self.dir), [])
        sink.write(b"y")
        self.assertGreater(os.path.getsize(sink.temp_path), BUFFER_LIMIT // 2)
        self.successResultOf(sink.discard())
        self.assertEqual(os.listdir(self.dir), [])

    def test_streamingFailureStopsTheTransfer(self):
        """
        A streaming body whose temporary file cannot be created fails at the next write.
        """
        sink = InflightFile(os.path.join(self.dir, "missing", "x"))
        sink.declare(BUFFER_LIMIT * 2)
        error = self.assertRaises(LocalFailure, sink.write, b"x")
        self.assertEqual((error.code, error.transient), (422, False))
        self.successResultOf(sink.discard())


class SweepTests(SynchronousTestCase):
    """
    L{inflight.sweep} removes the temporary files of killed writers and nothing else.
    """

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.dir, "sub"))

    def killed_writer(self, dest):
        """The temporary file of a writer in another process killed with -9 mid-file."""
        script = (
            "import os, sys\n"
            "from ion.apps.pump.transfer.inflight import InflightFile, BUFFER_LIMIT\n"
            "sink = InflightFile(sys.argv[1])\n"
            "sink.declare(2 * BUFFER_LIMIT)\n"
            "sink.write(b'x' * (BUFFER_LIMIT + 1))\n"
            "print(sink.temp_path, flush=True)\n"
            "sys.stdin.read()\n"
        )
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
        child = subprocess.Popen(
            [sys.executable, "-c", script, dest],
            env=dict(os.environ, PYTHONPATH=os.path.abspath(root)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        temp_path = child.stdout.readline().strip()
        # The child is alive and writing: its file is not swept.
        self.assertEqual(inflight.sweep(self.dir), ([], []))
        child.kill()
        child.wait()
        child.stdout.close()
        child.stdin.close()
        # Younger files are left alone (see test_freshUnlockedFileKept): this one was killed
        # a while ago.
        old = time.time() - inflight.SWEEP_MIN_AGE - 1
        os.utime(temp_path, (old, old))
        return temp_path

    def test_freshUnlockedFileKept(self):
        """
        A temporary file nobody has locked yet but modified within the last
        C{SWEEP_MIN_AGE} seconds is kept: its writer may be between creating and locking it
        (a consumer's first file while the start-up sweep runs). Older, it is swept.
        """
        path = os.path.join(self.dir, "sub", ".f.dat.0123abcd" + inflight.INFLIGHT_SUFFIX)
        write_file(path, b"just created")
        self.assertEqual(inflight.sweep(self.dir), ([], [path]))
        self.assertTrue(os.path.exists(path))
        old = time.time() - inflight.SWEEP_MIN_AGE - 1
        os.utime(path, (old, old))
        self.assertEqual(inflight.sweep_files([path]), ([path], []))
        self.assertFalse(os.path.exists(path))

    def test_killedWriterSwept(self):
        """
        A temporary file whose writer was killed is removed; a file being written by a live
        writer, regular files, and a link named like a temporary file are kept.
        """
        stale = self.killed_writer(os.path.join(self.dir, "sub", "f.dat"))
        self.assertTrue(os.path.exists(stale))
        live = InflightFile(os.path.join(self.dir, "g.dat"))
        live.declare(2 * BUFFER_LIMIT)
        live.write(b"y" * (BUFFER_LIMIT + 1))
        write_file(os.path.join(self.dir, "sub", "kept.dat"), b"kept")
        write_file(os.path.join(self.dir, ".kept.inflight.txt"), b"kept")
        os.symlink(os.path.join(self.dir, "sub", "kept.dat"), os.path.join(self.dir, ".l.inflight"))
        self.assertEqual(inflight.sweep(self.dir), ([stale], []))
        self.assertFalse(os.path.exists(stale))
        self.assertTrue(os.path.exists(live.temp_path))
        live.write(b"y" * (BUFFER_LIMIT - 1))
        result = self.successResultOf(Deferred.fromCoroutine(live.finish()))
        self.assertEqual(result.size, 2 * BUFFER_LIMIT)
        self.assertEqual(
            sorted(os.listdir(self.dir)), [".kept.inflight.txt", ".l.inflight", "g.dat", "sub"]
        )
        self.assertEqual(os.listdir(os.path.join(self.dir, "sub")), ["kept.dat"])


class SweepLinkTests(SynchronousTestCase):
    """
    The sweep removes files through directory descriptors: a directory of the tree replaced by
    a link never sends a removal outside the tree.
    """

    def setUp(self):
        base = os.path.abspath(self.mktemp())
        self.root = os.path.join(base, "root")
        self.outside = os.path.join(base, "outside")
        os.makedirs(os.path.join(self.root, "sub"))
        os.makedirs(self.outside)

    def old_file(self, directory, name):
        path = write_file(os.path.join(directory, name), b"left over")
        old = time.time() - inflight.SWEEP_MIN_AGE - 1
        os.utime(path, (old, old))
        return path

    def test_secondLookThroughSwappedDirectory(self):
        """
        A young file looked at again after its directory was replaced by a link to a
        directory holding a file of the same name: that file stays; the real tree's old
        temporary files are removed.
        """
        name = ".f.dat.0123456789ab" + inflight.INFLIGHT_SUFFIX
        young = write_file(os.path.join(self.root, "sub", name), b"young")
        self.assertEqual(inflight.sweep(self.root), ([], [young]))
        os.rename(os.path.join(self.root, "sub"), os.path.join(self.root, "moved"))
        os.symlink(self.outside, os.path.join(self.root, "sub"))
        victim = self.old_file(self.outside, name)
        self.assertEqual(inflight.sweep_files([young], 0, root=self.root), ([], []))
        self.assertTrue(os.path.exists(victim))
        top = self.old_file(self.root, name)
        self.assertEqual(inflight.sweep_files([top], 0, root=self.root), ([top], []))
        moved = os.path.join(self.root, "moved", name)
        old = time.time() - inflight.SWEEP_MIN_AGE - 1
        os.utime(moved, (old, old))
        self.assertEqual(inflight.sweep(self.root), ([moved], []))
        self.assertTrue(os.path.exists(victim))


class InflightFilePoolTests(TestCase):
    """
    With a thread pool, the disk work runs in its threads; cancelling a commit either stops it
    before the rename or returns its result.
    """

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.mkdir(self.dir)
        self.dest = os.path.join(self.dir, "data.bin")
        self.pool = ThreadPool(minthreads=0, maxthreads=2)
        self.pool.start()
        self.addCleanup(self.pool.stop)

    def sink(self, *args, **kwargs):
        return InflightFile(self.dest, *args, reactor=reactor, pool=self.pool, **kwargs)

    def block(self, cls_or_obj, name):
        """Make C{name} wait in its thread until the returned C{release} event is set;
        C{reached} is set once a thread waits there."""
        reached, release = threading.Event(), threading.Event()
        original = getattr(cls_or_obj, name)

        def blocked(*args, **kwargs):
            reached.set()
            release.wait(10)
            return original(*args, **kwargs)

        self.patch(cls_or_obj, name, blocked)
        self.addCleanup(release.set)
        return reached, release

    async def until(self, event):
        await until(event.is_set, 10, "the blocked call to be reached")

    async def test_diskWorkInPoolThreads(self):
        """
        Creating, writing, fsyncing and renaming happen outside the reactor thread.
        """
        threads = []
        original = inflight.directories.sync

        def sync(key, fd):
            threads.append(threading.current_thread())
            original(key, fd)

        self.patch(inflight.directories, "sync", sync)
        data = os.urandom(3 * BUFFER_LIMIT)
        sink = self.sink(expected_size=len(data))
        for start in range(0, len(data), 65536):
            sink.write(data[start : start + 65536])
        result = await sink.finish(("sha512", sha512(data)), 1234.0, 0o600)
        self.assertEqual((result.size, result.mtime, result.mode), (len(data), 1234.0, 0o600))
        with open(self.dest, "rb") as f:
            self.assertEqual(f.read(), data)
        self.assertEqual(len(threads), 1)
        self.assertIsNot(threads[0], threading.main_thread())
        self.assertEqual(leftovers(self.dir), [])

    async def test_checksumMismatchInPool(self):
        """
        A mismatch found in the pool leaves the previous file and no temporary file.
        """
        write_file(self.dest, b"previous")
        sink = self.sink()
        sink.write(b"actual")
        with self.assertRaises(ChecksumMismatch):
            await sink.finish(("sha512", sha512(b"announced")))
        with open(self.dest, "rb") as f:
            self.assertEqual(f.read(), b"previous")
        self.assertEqual(leftovers(self.dir), [])

    async def test_backlogPausesTheSource(self):
        """
        While the disk is slow, a streaming body reports itself backlogged once
        C{BACKLOG_LIMIT} bytes wait; L{InflightFile.drained} fires once they went to disk.
        """
        reached, release = self.block(InflightFile, "_write")
        data = os.urandom(BACKLOG_LIMIT + 4 * 65536)
        sink = self.sink(expected_size=len(data))
        await self.until(reached)
        for start in range(0, BACKLOG_LIMIT, 65536):
            self.assertFalse(sink.backlogged)
            sink.write(data[start : start + 65536])
        self.assertTrue(sink.backlogged)
        drained = sink.drained()
        self.assertNoResult(drained)
        release.set()
        await drained
        self.assertFalse(sink.backlogged)
        for start in range(BACKLOG_LIMIT, len(data), 65536):
            sink.write(data[start : start + 65536])
        await sink.finish(("sha512", sha512(data)))
        with open(self.dest, "rb") as f:
            self.assertEqual(f.read(), data)

    async def test_hashingBesideWriting(self):
        """
        A streaming body is hashed in a pool thread while its writes are held up: the two run
        side by side, not one after the other.
        """
        hashed = []
        original = InflightFile._hash

        def hash_chunks(sink, chunks):
            hashed.append((threading.current_thread(), sum(map(len, chunks))))
            original(sink, chunks)

        self.patch(InflightFile, "_hash", hash_chunks)
        reached, release = self.block(InflightFile, "_write")
        data = os.urandom(BACKLOG_LIMIT)
        sink = self.sink(expected_size=len(data))
        await self.until(reached)
        for start in range(0, len(data) - 65536, 65536):
            sink.write(data[start : start + 65536])
        # Hashed while the write is still held.
        await until(lambda: sum(n for _, n in hashed) >= inflight.WRITE_BATCH, 10, "hashing")
        self.assertNotIn(threading.current_thread(), [thread for thread, _ in hashed])
        release.set()
        sink.write(data[len(data) - 65536 :])
        await sink.finish(("sha512", sha512(data)))
        with open(self.dest, "rb") as f:
            self.assertEqual(f.read(), data)

    async def test_slowHashingPausesTheSource(self):
        """
        While the hashing is behind, the source is paused once C{BACKLOG_LIMIT} bytes wait for
        it, however fast the disk is; L{InflightFile.drained} fires once they were handed over.
        """
        reached, release = self.block(InflightFile, "_hash")
        data = os.urandom(inflight.WRITE_BATCH + BACKLOG_LIMIT + 65536)
        sink = self.sink(expected_size=len(data))
        written = inflight.WRITE_BATCH
        sink.write(data[:written])
        await self.until(reached)  # a hashing job took these bytes, and is held up
        while written < inflight.WRITE_BATCH + BACKLOG_LIMIT:
            sink.write(data[written : written + 65536])
            written += 65536
        drained = sink.drained()
        # The disk takes the bytes (all but less than a batch); the source stays paused for
        # the hashing.
        await until(
            lambda: os.path.getsize(sink.temp_path) > written - inflight.WRITE_BATCH,
            10,
            "the writes",
        )
        self.assertTrue(sink.backlogged)
        self.assertNoResult(drained)
        release.set()
        await drained
        sink.write(data[written:])
        await sink.finish(("sha512", sha512(data)))
        with open(self.dest, "rb") as f:
            self.assertEqual(f.read(), data)

    async def test_syncedWhileStreaming(self):
        """
        A streaming file is fdatasynced each C{SYNC_BATCH} bytes while it arrives, not only
        before its rename.
        """
        self.patch(inflight, "SYNC_BATCH", BUFFER_LIMIT)
        synced = []
        original = InflightFile._sync

        def sync(sink):
            synced.append(os.path.getsize(sink.temp_path))
            original(sink)

        self.patch(InflightFile, "_sync", sync)
        data = os.urandom(4 * BUFFER_LIMIT)
        sink = self.sink(expected_size=len(data))
        for start in range(0, len(data) - 65536, 65536):
            sink.write(data[start : start + 65536])
            if sink.backlogged:
                await sink.drained()
        await until(lambda: synced, 10, "a background sync")
        sink.write(data[len(data) - 65536 :])
        await sink.finish(("sha512", sha512(data)))
        self.assertGreaterEqual(synced[0], BUFFER_LIMIT)
        with open(self.dest, "rb") as f:
            self.assertEqual(f.read(), data)

    async def test_backgroundSyncFails(self):
        """
        A background fdatasync that fails (the disk) fails the file with a local failure and
        leaves nothing behind.
        """
        self.patch(inflight, "SYNC_BATCH", BUFFER_LIMIT)

        def fdatasync(fd):
            raise OSError(errno.EIO, "Input/output error")

        self.patch(inflight.os, "fdatasync", fdatasync)
        data = os.urandom(4 * BUFFER_LIMIT)
        sink = self.sink(expected_size=len(data))
        with self.assertRaises(LocalFailure) as caught:
            for start in range(0, len(data), 65536):
                sink.write(data[start : start + 65536])
                if sink.backlogged:
                    await sink.drained()
            await sink.finish(("sha512", sha512(data)))
        self.assertIn("Input/output error", str(caught.exception))
        await sink.discard()
        self.assertEqual(os.listdir(self.dir), [])

    async def test_bigChunkOfUnknownSize(self):
        """
        One chunk bigger than the backlog, of a body of unknown size, is hashed and written:
        the source never waits for nothing.
        """
        data = os.urandom(BACKLOG_LIMIT + BUFFER_LIMIT)
        sink = self.sink()
        sink.write(data)
        await sink.drained()
        self.assertFalse(sink.backlogged)
        result = await sink.finish(("sha512", sha512(data)))
        self.assertEqual(result.size, len(data))
        with open(self.dest, "rb") as f:
            self.assertEqual(f.read(), data)

    async def test_cancelBeforeRename(self):
        """
        A commit cancelled before its rename ends with C{CancelledError}, the previous file
        in place and no temporary file.
        """
        write_file(self.dest, b"previous")
        reached, release = self.block(InflightFile, "_verify")
        sink = self.sink()
        sink.write(b"new")
        d = Deferred.fromCoroutine(sink.finish())
        await self.until(reached)
        d.cancel()
        self.assertNoResult(d)
        release.set()
        with self.assertRaises(CancelledError):
            await d
        with open(self.dest, "rb") as f:
            self.assertEqual(f.read(), b"previous")
        self.assertEqual(leftovers(self.dir), [])

    async def test_cancelAfterRename(self):
        """
        A commit cancelled after its rename returns its result: the file is in place.
        """
        # Its directory is closed once the rename is durable, whichever way it was made so.
        reached, release = self.block(InflightFile, "_close_directory")
        sink = self.sink()
        sink.write(b"new")
        d = Deferred.fromCoroutine(sink.finish())
        await self.until(reached)
        d.cancel()
        release.set()
        result = await d
        self.assertEqual(result.size, 3)
        with open(self.dest, "rb") as f:
            self.assertEqual(f.read(), b"new")
        self.assertEqual(leftovers(self.dir), [])

    async def test_discardWaitsForTheDisk(self):
        """
        Discarding while a write is in the pool removes the temporary file once it is done.
        """
        reached, release = self.block(InflightFile, "_write")
        sink = self.sink(expected_size=2 * BUFFER_LIMIT)
        await self.until(reached)
        sink.write(b"x" * 1000)
        gone = sink.discard()
        self.assertNoResult(gone)
        release.set()
        await gone
        self.assertEqual(os.listdir(self.dir), [])


class GroupCommitTests(TestCase):
    """
    Files received whole that are committed while a commit job runs share the next job, and
    where syncfs can stand for fsyncs, its two syncfs; each file's failure stays its own.
    """

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.mkdir(self.dir)
        self.pool = ThreadPool(minthreads=0, maxthreads=2)
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.syncfs = []
        original = inflight._syncfs

        def syncfs(fd):
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
            self.syncfs.append((threading.current_thread(), regular))
            original(fd)

        self.patch(inflight, "_syncfs", syncfs)
        self.fsyncs = []
        fsync = os.fsync
        self.patch(inflight.os, "fsync", lambda fd: (self.fsyncs.append(fd), fsync(fd))[1])

    def syncfs_everywhere(self):
        """Let syncfs stand for fsyncs whatever the test directory's file system and the
        dirty data of the machine: the grouping is what is tested, not those choices."""
        self.patch(inflight, "_syncfs_device", lambda fd: os.fstat(fd).st_dev)
        self.patch(inflight, "_little_dirty", lambda: True)

    def sink(self, name):
        return InflightFile(os.path.join(self.dir, name), reactor=reactor, pool=self.pool)

    async def test_committedFileFreedAtOnce(self):
        """
        A file received whole and committed is freed as soon as it is dropped: no cycle
        leaves it, per file, to the garbage collector's passes.
        """
        self.syncfs_everywhere()
        without_collector(self)
        sink = self.sink("a")
        sink.write(b"data")
        await sink.finish()
        freed = weakref.ref(sink)
        del sink
        await deferLater(reactor, 0, lambda: None)  # out of the calls that returned the result
        self.assertIsNone(freed())
        with open(os.path.join(self.dir, "a"), "rb") as f:
            self.assertEqual(f.read(), b"data")

    def hold_first(self):
        """Hold the commit of the file named C{first} in its job; two Events: the job has
        reached it, and (set by the test) let it go on."""
        reached, release = threading.Event(), threading.Event()
        prepare = InflightFile._prepare

        def held(sink, *args):
            if sink.dest_path.endswith("first"):
                reached.set()
                release.wait(10)
            return prepare(sink, *args)

        self.patch(InflightFile, "_prepare", held)
        self.addCleanup(release.set)
        return reached, release

    async def commit_while_one_runs(self, bodies, announced=None):
        """Commit a first file, held in its job, then C{bodies} ({name: bytes}, each with the
        checksum C{announced} gives for it, else its own) while it is; release the first.
        Returns {name: result or Failure} of those."""
        reached, release = self.hold_first()
        first = self.sink("first")
        first.write(b"1")
        done = [Deferred.fromCoroutine(first.finish(("sha512", sha512(b"1"))))]
        await until(reached.is_set, 10, "the first commit to run")
        for name, body in bodies.items():
            sink = self.sink(name)
            sink.write(body)
            checksum = (announced or {}).get(name, sha512(body))
            done.append(Deferred.fromCoroutine(sink.finish(("sha512", checksum))))
        release.set()
        outcomes = await DeferredList(done, consumeErrors=True)
        return dict(zip(["first", *bodies], (outcome for _, outcome in outcomes)))

    async def test_filesWaitingShareOneJob(self):
        """
        Three files committed while a commit job runs go together in the next job, with one
        syncfs before their renames and one after, no fsync at all, in a pool thread. Each
        syncfs goes through a file's own descriptor (not a directory's, which may be shared:
        another job's syncfs may have taken the report of a write-back error from it).
        """
        self.syncfs_everywhere()
        bodies = {"a": b"aa", "b": b"bbb", "c": os.urandom(BUFFER_LIMIT)}
        results = await self.commit_while_one_runs(bodies)
        for name, body in bodies.items():
            self.assertEqual(results[name].size, len(body))
            with open(os.path.join(self.dir, name), "rb") as f:
                self.assertEqual(f.read(), body)
        group = inflight.GroupCommit.of(reactor, self.pool)
        self.assertEqual((group.jobs, group.files), (2, 4))
        self.assertEqual(len(self.syncfs), 4)
        for thread, regular in self.syncfs:
            self.assertIsNot(thread, threading.main_thread())
            self.assertTrue(regular)
        self.assertEqual(self.fsyncs, [])
        self.assertEqual(leftovers(self.dir), [])

    async def test_oneBadFileFailsAlone(self):
        """
        A checksum mismatch in a group fails that file alone: the others are in place, the
        previous version of the bad one too, and no temporary file is left.
        """
        self.syncfs_everywhere()
        write_file(os.path.join(self.dir, "b"), b"previous")
        bodies = {"a": b"aa", "b": b"tampered", "c": b"cc"}
        results = await self.commit_while_one_runs(bodies, {"b": sha512(b"announced")})
        self.assertIsInstance(results["b"], Failure)
        results["b"].trap(ChecksumMismatch)
        self.assertEqual((results["a"].size, results["c"].size), (2, 2))
        for name, body in {"a": b"aa", "b": b"previous", "c": b"cc"}.items():
            with open(os.path.join(self.dir, name), "rb") as f:
                self.assertEqual(f.read(), body)
        self.assertEqual(leftovers(self.dir), [])

    async def held_gets(self, sizes):
        """Get, through one server's single slot, a first file whose commit is held in its
        job, then files of C{sizes} (bytes) one after the other; returns the first's
        Deferred, the others' Deferreds, the limiter, the source URL prefix and the
        Event that releases the held commit."""
        reached, release = self.hold_first()
        source = os.path.join(self.dir, "source")
        os.mkdir(source)
        limiter = HostLimiter(per_host=1)
        bodies = {"first": b"1"} | {f"f{n}": os.urandom(size) for n, size in enumerate(sizes)}
        gets = {}
        for name, body in bodies.items():
            write_file(os.path.join(source, name), body)
            gets[name] = Deferred.fromCoroutine(
                transfer.get(
                    reactor,
                    "file://" + os.path.join(source, name),
                    os.path.join(self.dir, name),
                    expected_checksum=("sha512", sha512(body)),
                    limiter=limiter,
                    pool=self.pool,
                )
            )
        await until(reached.is_set, 10, "the first commit to run")
        return gets.pop("first"), gets, limiter, "file://" + source, release

    async def test_slotFreedForTheCommit(self):
        """
        A file received whole gives its server's slot up while it waits for the disk: the
        transfers after it from that server go on meanwhile (through a single slot, the
        server is not held by a commit), and each file is in place, verified, once done.
        """
        first, others, limiter, url, release = await self.held_gets([10, 20, 30])
        group = inflight.GroupCommit.of(reactor, self.pool)
        await until(lambda: group.held == 61, 10, "the later files to wait for the commit")
        self.assertEqual(limiter.active(url + "/first"), 0)
        self.assertFalse(first.called)
        release.set()
        await first
        results = await gatherResults(list(others.values()))
        self.assertEqual([r.size for r in results], [10, 20, 30])
        for name in ["first", *others]:
            self.assertTrue(os.path.exists(os.path.join(self.dir, name)))
        self.assertEqual((group.held, group.held_files, leftovers(self.dir)), (0, 0, []))

    def test_slotKeptPastTheBacklog(self):
        """
        Past C{GROUP_BACKLOG_MAX} bytes waiting for the commits, a transfer keeps its
        server's slot until its file is committed: what a fast server can send piles up in
        memory no further than that.
        """
        self.patch(inflight, "GROUP_BACKLOG_MAX", 25)
        return Deferred.fromCoroutine(self.slot_kept())

    def test_slotKeptPastTheFiles(self):
        """
        Past C{GROUP_BACKLOG_FILES} files waiting for the commits, likewise.
        """
        self.patch(inflight, "GROUP_BACKLOG_FILES", 2)
        return Deferred.fromCoroutine(self.slot_kept())

    async def slot_kept(self):
        """A first file's commit held, the second file (10 bytes) waits for the commits
        without its slot and the third (20) with it, the fourth (30) waits for the slot."""
        first, others, limiter, url, release = await self.held_gets([10, 20, 30])
        group = inflight.GroupCommit.of(reactor, self.pool)
        await until(lambda: group.held == 31, 10, "the second and third files to be received")
        self.assertEqual(limiter.active(url + "/first"), 1)
        self.assertEqual(group.held, 31)  # the fourth file waits for the slot, not received
        release.set()
        results = await gatherResults([first] + list(others.values()))
        self.assertEqual([r.size for r in results], [1, 10, 20, 30])
        self.assertEqual((group.held, group.held_files, leftovers(self.dir)), (0, 0, []))

    async def test_syncfsFailureFailsItsFiles(self):
        """
        A syncfs that fails before the renames fails every file it was to make durable, as
        a local failure naming the error: none is renamed, none is left behind.
        """
        self.syncfs_everywhere()
        write_file(os.path.join(self.dir, "a"), b"previous")

        def failing(fd):
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        self.patch(inflight, "_syncfs", failing)
        results = await self.commit_while_one_runs({"a": b"new", "b": b"bb"})
        for name in ("first", "a", "b"):
            results[name].trap(LocalFailure)
            self.assertIn("Input/output error", str(results[name].value))
        self.assertEqual(os.listdir(self.dir), ["a"])
        with open(os.path.join(self.dir, "a"), "rb") as f:
            self.assertEqual(f.read(), b"previous")

    async def test_fsyncsWhileMuchIsDirty(self):
        """
        While the machine holds much data not yet written, a group's files are fsynced one
        by one: a syncfs would have to write and wait for all of it.
        """
        self.syncfs_everywhere()
        self.patch(inflight, "_little_dirty", lambda: False)
        results = await self.commit_while_one_runs({"a": b"aa", "b": b"bb"})
        self.assertEqual((results["a"].size, results["b"].size), (2, 2))
        self.assertEqual(self.syncfs, [])
        self.assertEqual(len(self.fsyncs), 6)  # three files, each and its directory

    def test_littleDirtyReadsMeminfo(self):
        """
        Dirty and Writeback together decide; an unreadable or odd meminfo means "not
        little", so that the fsyncs are kept.
        """
        meminfo = os.path.join(self.dir, "meminfo")
        limit_kb = inflight.SYNCFS_DIRTY_MAX // 1024
        for text, little in [
            ("MemFree: 5 kB\nDirty: 2324 kB\nWriteback: 0 kB\n", True),
            (f"Dirty: {limit_kb - 10} kB\nWriteback: 10 kB\n", True),
            (f"Dirty: {limit_kb - 10} kB\nWriteback: 11 kB\n", False),
            ("MemFree: 5 kB\n", False),
            ("Dirty: lots\n", False),
        ]:
            write_file(meminfo, text.encode())
            self.assertEqual(inflight._read_little_dirty(meminfo), little, text)
        self.assertFalse(inflight._read_little_dirty(os.path.join(self.dir, "none")))

    def test_littleDirtyAskedOnceAWhile(self):
        """
        The system's answer is read again only once L{inflight.DIRTY_CHECK_INTERVAL} has
        passed: a busy pump's group commits, milliseconds apart, do not each read meminfo.
        """
        reads = []

        def read(meminfo="/proc/meminfo"):
            reads.append(meminfo)
            return len(reads) == 1

        now = [1000.0]
        self.patch(inflight, "_read_little_dirty", read)
        self.patch(inflight, "_dirty_checked", [float("-inf"), False])
        self.patch(inflight, "_monotonic", lambda: now[0])
        self.assertTrue(inflight._little_dirty())
        now[0] += inflight.DIRTY_CHECK_INTERVAL / 2
        self.assertTrue(inflight._little_dirty())
        self.assertEqual(reads, ["/proc/meminfo"])
        now[0] += inflight.DIRTY_CHECK_INTERVAL
        self.assertFalse(inflight._little_dirty())
        self.assertEqual(len(reads), 2)

    async def test_fsyncsWhereSyncfsWillNotDo(self):
        """
        On a file system where syncfs cannot stand for fsyncs, each file of a group is
        fsynced, and its directory too, as a streamed one is.
        """
        self.patch(inflight, "_little_dirty", lambda: True)
        self.patch(inflight, "_syncfs_device", lambda fd: None)
        results = await self.commit_while_one_runs({"a": b"aa", "b": b"bb"})
        self.assertEqual((results["a"].size, results["b"].size), (2, 2))
        self.assertEqual(self.syncfs, [])
        self.assertEqual(len(self.fsyncs), 6)  # three files, each and its directory
        self.assertEqual(leftovers(self.dir), [])


class DirectorySyncsTests(SynchronousTestCase):
    """
    Renames into one directory share its fsyncs.
    """

    def test_groupCommit(self):
        """
        Callers arriving while an fsync of their directory runs share the next one; each
        returns only after an fsync that started after it called.
        """
        syncs = DirectorySyncs()
        calls = []
        started, release = threading.Event(), threading.Event()

        def fsync(fd):
            calls.append(fd)
            if len(calls) == 1:
                started.set()
                release.wait(10)

        self.patch(inflight, "_fsync_directory", fsync)
        leader = threading.Thread(target=syncs.sync, args=("d", 7))
        leader.start()
        started.wait(10)
        followers = [threading.Thread(target=syncs.sync, args=("d", 7)) for _ in range(5)]
        for thread in followers:
            thread.start()
        deadline = time.monotonic() + 10
        while syncs._directories["d"].requested < 6 and time.monotonic() < deadline:
            time.sleep(0.001)
        self.assertEqual(len(calls), 1)
        release.set()
        for thread in [leader] + followers:
            thread.join(10)
        self.assertEqual(calls, [7, 7])
        self.assertEqual(syncs._directories, {})

    def test_failure(self):
        """
        A failed fsync fails its caller; the next caller fsyncs again.
        """
        syncs = DirectorySyncs()
        outcomes = [OSError(5, "Input/output error"), None]

        def fsync(fd):
            error = outcomes.pop(0)
            if error is not None:
                raise error

        self.patch(inflight, "_fsync_directory", fsync)
        self.assertRaises(OSError, syncs.sync, "d", 7)
        syncs.sync("d", 7)
        self.assertEqual((outcomes, syncs._directories), ([], {}))


class FileSchemeTests(TestCase):
    """
    C{file:} URLs: local copies with the same delivery guarantees as the network schemes.
    """

    def setUp(self):
        self.src_dir = os.path.abspath(self.mktemp())
        self.dest_dir = os.path.abspath(self.mktemp())
        os.makedirs(self.src_dir)
        os.makedirs(self.dest_dir)
        self.data = os.urandom(300_000)
        self.src = write_file(os.path.join(self.src_dir, "a file.bin"), self.data)
        os.utime(self.src, (1_600_000_000, 1_600_000_000.25))
        os.chmod(self.src, 0o604)
        self.url = "file://" + self.src.replace(" ", "%20")
        self.dest = os.path.join(self.dest_dir, "copy.bin")

    async def test_get(self):
        """
        A file is copied with its mtime and mode; the result names the checksums computed.
        """
        result = await transfer.get(
            reactor, self.url, self.dest, expected_checksum=("sha512", sha512(self.data)), cod="md5"
        )
        with open(self.dest, "rb") as f:
            self.assertEqual(f.read(), self.data)
        self.assertEqual(result.checksum, {"sha512": sha512(self.data), "md5": md5(self.data)})
        self.assertEqual(
            (result.size, result.mtime, result.mode), (300_000, 1_600_000_000.25, 0o604)
        )
        info = os.stat(self.dest)
        self.assertEqual((info.st_mtime, stat.S_IMODE(info.st_mode)), (1_600_000_000.25, 0o604))
        self.assertEqual(leftovers(self.dest_dir), [])

    async def test_modeAndMtimeOverride(self):
        """
        An mtime and mode given by the caller (from the message) win over the source's.
        """
        result = await transfer.get(reactor, self.url, self.dest, mtime=1234.0, mode=0o4755)
        info = os.stat(self.dest)
        self.assertEqual((info.st_mtime, stat.S_IMODE(info.st_mode)), (1234.0, 0o755))
        self.assertEqual(result.mode, 0o755)

    async def test_relativeUrl(self):
        """
        C{file:relative/path} is relative to the working directory.
        """
        relative = os.path.relpath(self.src)
        await transfer.get(reactor, "file:" + relative, self.dest)
        self.assertEqual(os.path.getsize(self.dest), len(self.data))

    async def test_checksumMismatch(self):
        """
        A wrong checksum leaves no file, and an existing destination untouched.
        """
        write_file(self.dest, b"previous")
        with self.assertRaises(ChecksumMismatch) as caught:
            await transfer.get(reactor, self.url, self.dest, expected_checksum=("md5", md5(b"x")))
        self.assertTrue(caught.exception.transient)
        with open(self.dest, "rb") as f:
            self.assertEqual(f.read(), b"previous")
        self.assertEqual(leftovers(self.dest_dir), [])

    async def test_expectedSize(self):
        """
        A size differing from the caller's is refused.
        """
        with self.assertRaises(SizeMismatch):
            await transfer.get(reactor, self.url, self.dest, expected_size=len(self.data) + 1)
        self.assertFalse(os.path.exists(self.dest))
        self.assertEqual(leftovers(self.dest_dir), [])

    async def test_missing(self):
        """
        A missing source is L{NotFound}, permanent, and leaves nothing.
        """
        with self.assertRaises(NotFound) as caught:
            await transfer.get(reactor, self.url + ".missing", self.dest)
        self.assertEqual((caught.exception.code, caught.exception.transient), (404, False))
        self.assertEqual(os.listdir(self.dest_dir), [])

    async def test_directoryIsNotAFile(self):
        """
        Getting a directory is a L{BadRequest}.
        """
        with self.assertRaises(BadRequest):
            await transfer.get(reactor, "file://" + self.src_dir, self.dest)
        self.assertEqual(os.listdir(self.dest_dir), [])

    async def test_unknownChecksumMethod(self):
        """
        Only sha512 and md5 can be verified: another method is a 417 before anything starts.
        """
        with self.assertRaises(BadRequest) as caught:
            await transfer.get(reactor, self.url, self.dest, expected_checksum=("arbitrary", "x"))
        self.assertEqual(caught.exception.code, 417)
        with self.assertRaises(BadRequest):
            await transfer.get(reactor, self.url, self.dest, cod="sha1")
        self.assertEqual(os.listdir(self.dest_dir), [])

    async def test_badUrls(self):
        """
        Unknown schemes and remote file hosts are refused without touching the disk; a
        password in the URL never shows in the message.
        """
        for url, why in (
            (f"gopher://u:{SECRET}@h/x", "unsupported scheme 'gopher'"),
            ("file://elsewhere/x", "local files only"),
            ("file:", "no usable path"),
            (f"http://u:{SECRET}@[::1/x", "malformed URL"),
            (f"sftp://u:{SECRET}@h:99999/x", "bad port number"),
        ):
            with self.assertRaises(BadRequest) as caught:
                await transfer.get(reactor, url, self.dest)
            self.assertNotIn(SECRET, str(caught.exception))
            self.assertIn(why, str(caught.exception))
        self.assertEqual(os.listdir(self.dest_dir), [])

    async def test_cancel(self):
        """
        Cancelling a transfer in progress removes the temporary file.
        """
        big = write_file(os.path.join(self.src_dir, "big"), b"\0" * (32 * 1024 * 1024))
        d = Deferred.fromCoroutine(transfer.get(reactor, "file://" + big, self.dest))
        self.assertEqual(len(leftovers(self.dest_dir)), 1)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(os.listdir(self.dest_dir), [])

    async def test_limiter(self):
        """
        With a limiter, transfers beyond the per-host limit wait their turn.
        """
        limiter = HostLimiter(per_host=1)
        key = await limiter.acquire(self.url)
        d = Deferred.fromCoroutine(transfer.get(reactor, self.url, self.dest, limiter=limiter))
        self.assertFalse(d.called)
        self.assertFalse(os.path.exists(self.dest))
        limiter.release(key)
        result = await d
        self.assertEqual(result.size, len(self.data))
        self.assertEqual(limiter.active(self.url), 0)

    async def test_put(self):
        """
        Put copies to the destination path with mtime and mode, via an inflight name.
        """
        result = await transfer.put(reactor, self.src, "file://" + self.dest)
        with open(self.dest, "rb") as f:
            self.assertEqual(f.read(), self.data)
        self.assertEqual(result.checksum, {"sha512": sha512(self.data)})
        self.assertEqual(os.stat(self.dest).st_mtime, 1_600_000_000.25)
        self.assertEqual(leftovers(self.dest_dir), [])

    async def test_putMissingSource(self):
        """
        Putting a missing local file is a L{LocalFailure}.
        """
        with self.assertRaises(LocalFailure) as caught:
            await transfer.put(reactor, self.src + ".missing", "file://" + self.dest)
        self.assertEqual((caught.exception.code, caught.exception.transient), (422, False))

    async def test_putFifoSource(self):
        """
        Putting a named pipe fails at once (422 "not a regular file") instead of waiting for
        a writer with the reactor stopped.
        """
        fifo = os.path.join(self.src_dir, "pipe")
        os.mkfifo(fifo)
        writer_came = unblock_after(self, fifo, 2)
        with self.assertRaises(LocalFailure) as caught:
            await transfer.put(reactor, fifo, "file://" + self.dest)
        self.assertFalse(writer_came.is_set(), "the open waited for a writer")
        self.assertEqual(caught.exception.code, 422)
        self.assertIn("not a regular file", caught.exception.message)

    async def test_destinationDirectoryMissing(self):
        """
        A destination whose directory is missing is a permanent L{LocalFailure} (422).
        """
        with self.assertRaises(LocalFailure) as caught:
            await transfer.get(reactor, self.url, os.path.join(self.dest_dir, "no", "x"))
        self.assertEqual((caught.exception.code, caught.exception.transient), (422, False))

    async def test_list(self):
        """
        Listing gives files, directories and links (not followed), sorted by name.
        """
        os.mkdir(os.path.join(self.src_dir, "sub"))
        os.symlink("a file.bin", os.path.join(self.src_dir, "link"))
        entries = await transfer.list(reactor, "file://" + self.src_dir)
        self.assertEqual(
            [(e.name, e.type) for e in entries],
            [("a file.bin", "file"), ("link", "link"), ("sub", "dir")],
        )
        self.assertEqual(entries[0], Entry("a file.bin", 300_000, 1_600_000_000.25, 0o604, "file"))

    async def test_listMissing(self):
        """
        Listing a missing directory is L{NotFound}.
        """
        with self.assertRaises(NotFound):
            await transfer.list(reactor, "file://" + self.src_dir + "/nope")


def descriptors_to(path):
    """How many of this process's file descriptors are open on C{path}."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == path
        except OSError:
            pass
    return count


class SwapOnWrite:
    """
    An C{active} set for L{transfer.get} that calls C{swap(sink)} right after the first bytes
    (or, with C{on_disk}, the first bytes once the temporary file exists) reached the
    transfer's sink: a deterministic moment "while the file is being fetched".
    """

    def __init__(self, swap, on_disk=False):
        self.swap = swap
        self.on_disk = on_disk
        self.swapped = False

    def add(self, sink):
        write = sink.write

        def hooked(data):
            write(data)
            if not self.swapped and (not self.on_disk or os.path.exists(sink.temp_path)):
                self.swapped = True
                self.swap(sink)

        sink.write = hooked

    def discard(self, sink):
        pass


class LocalSafetyTests(TestCase):
    """
    Local files are opened without following a final link or waiting on a pipe, and files
    are written below a destination root without ever following a link planted in it.
    """

    def setUp(self):
        base = os.path.abspath(self.mktemp())
        self.src_dir = os.path.join(base, "src")
        self.root = os.path.join(base, "root")
        self.outside = os.path.join(base, "outside")
        for path in (self.src_dir, self.root, self.outside):
            os.makedirs(path)
        self.data = os.urandom(300_000)
        self.src = write_file(os.path.join(self.src_dir, "f.bin"), self.data)
        self.big = os.urandom(3 * BUFFER_LIMIT)
        self.big_src = write_file(os.path.join(self.src_dir, "big.bin"), self.big)
        self.pool = ThreadPool(minthreads=0, maxthreads=2)
        self.pool.start()
        self.addCleanup(self.pool.stop)

    async def test_fifoRefusedAtOnce(self):
        """
        A named pipe (or a device) as source fails at once with a permanent 422 "not a
        regular file", with or without a pool: opening it never waits for a writer, which
        would freeze the reactor.
        """
        fifo = os.path.join(self.src_dir, "pipe")
        os.mkfifo(fifo)
        writer_came = unblock_after(self, fifo, 2)
        dest = os.path.join(self.root, "x")
        for url, pool in (
            ("file://" + fifo, None),
            ("file://" + fifo, self.pool),
            ("file:///dev/null", self.pool),
        ):
            with self.assertRaises(BadRequest) as caught:
                await transfer.get(reactor, url, dest, pool=pool)
            self.assertFalse(writer_came.is_set(), "the open waited for a writer")
            error = caught.exception
            self.assertEqual((error.code, error.transient), (422, False))
            self.assertIn("not a regular file", error.message)
        self.assertEqual(os.listdir(self.root), [])

    async def test_finalLinkNotFollowed(self):
        """
        A file: URL whose last component is a symbolic link is refused (422), even one to a
        readable regular file.
        """
        link = os.path.join(self.src_dir, "link")
        os.symlink(self.src, link)
        dest = os.path.join(self.root, "x")
        with self.assertRaises(BadRequest) as caught:
            await transfer.get(reactor, "file://" + link, dest, pool=self.pool)
        self.assertEqual(caught.exception.code, 422)
        self.assertIn("symbolic link", caught.exception.message)
        self.assertEqual(os.listdir(self.root), [])

    async def test_sourceReadInPool(self):
        """
        With a pool, the source file is opened and read in its threads, not the reactor's.
        """
        threads = []
        source_fds = set()
        real_open, real_read = os.open, os.read

        def opening(path, *args, **kwargs):
            fd = real_open(path, *args, **kwargs)
            if path == self.big_src:
                threads.append(threading.current_thread())
                source_fds.add(fd)
            return fd

        def reading(fd, size):
            if fd in source_fds:
                threads.append(threading.current_thread())
            return real_read(fd, size)

        self.patch(os, "open", opening)
        self.patch(os, "read", reading)
        dest = os.path.join(self.root, "x")
        result = await transfer.get(reactor, "file://" + self.big_src, dest, pool=self.pool)
        self.assertEqual(result.size, len(self.big))
        self.assertGreater(len(threads), 2)
        self.assertNotIn(threading.main_thread(), threads)

    async def test_putSourceReadInPool(self):
        """
        With a pool, a put to a file: URL reads and hashes its source in the pool's threads,
        in chunks of a MiB, never in the reactor's; the copy arrives whole with its checksum.
        """
        reads = []
        real_read = OutgoingFile.read

        def reading(outgoing, size):
            reads.append((threading.current_thread(), size))
            return real_read(outgoing, size)

        self.patch(OutgoingFile, "read", reading)
        dest = os.path.join(self.root, "out.bin")
        result = await transfer.put(reactor, self.big_src, "file://" + dest, pool=self.pool)
        with open(dest, "rb") as f:
            self.assertEqual(f.read(), self.big)
        self.assertEqual(result.checksum, {"sha512": sha512(self.big)})
        self.assertNotIn(threading.main_thread(), [thread for thread, _ in reads])
        self.assertEqual({size for _, size in reads}, {1024 * 1024})

    async def test_putCancelledWaitsForRead(self):
        """
        A put cancelled while the pool reads its source ends once that read is done (the
        source is closed after it, never under it), leaving nothing in the destination.
        """
        reached, release = threading.Event(), threading.Event()
        real_read = OutgoingFile.read
        closed_under_read = []

        def blocked(outgoing, size):
            reached.set()
            release.wait(10)
            closed_under_read.append(outgoing._file.closed)
            return real_read(outgoing, size)

        self.patch(OutgoingFile, "read", blocked)
        self.addCleanup(release.set)
        dest = os.path.join(self.root, "out.bin")
        d = Deferred.fromCoroutine(
            transfer.put(reactor, self.big_src, "file://" + dest, pool=self.pool)
        )
        await until(reached.is_set, 10, "the read to be reached")
        ended = []
        d.addBoth(lambda result: ended.append(True) or result)
        d.cancel()
        self.assertEqual(ended, [])
        release.set()
        with self.assertRaises(CancelledError):
            await d
        self.assertEqual(closed_under_read, [False])
        self.assertEqual(os.listdir(self.root), [])

    async def test_cancelWhileOpeningInPool(self):
        """
        A get cancelled while the pool opens its source ends without waiting for the open;
        the source is closed once the open is done, and nothing is left in the destination.
        """
        reached, release = threading.Event(), threading.Event()
        original = file_scheme._Source._open

        def blocked(source):
            reached.set()
            release.wait(10)
            return original(source)

        self.patch(file_scheme._Source, "_open", blocked)
        self.addCleanup(release.set)
        dest = os.path.join(self.root, "x")
        d = Deferred.fromCoroutine(
            transfer.get(reactor, "file://" + self.big_src, dest, pool=self.pool)
        )
        await until(reached.is_set, 10, "the open to be reached")
        d.cancel()
        with self.assertRaises(CancelledError):
            await d  # without waiting for the open
        release.set()
        await until(lambda: descriptors_to(self.big_src) == 0, 5, "the source to be closed")
        self.assertEqual(os.listdir(self.root), [])

    async def test_directoriesMadeBelowRoot(self):
        """
        With a destination root, the directories between it and the file are made; small and
        streamed files alike land in place.
        """
        for name, data in (("f.bin", self.data), ("big.bin", self.big)):
            dest = os.path.join(self.root, "a", "b", name)
            result = await transfer.get(
                reactor,
                "file://" + os.path.join(self.src_dir, name),
                dest,
                dest_root=self.root,
                expected_checksum=("sha512", sha512(data)),
                pool=self.pool,
            )
            self.assertEqual(result.path, dest)
            with open(dest, "rb") as f:
                self.assertEqual(f.read(), data)
        made = os.path.join(self.root, "a", "b")
        self.assertEqual(sorted(os.listdir(made)), ["big.bin", "f.bin"])

    async def test_rootHeldOpen(self):
        """
        A L{DestinationRoot} is opened once for all the files placed under it; one made with
        C{make} is made again if it was removed, and a closed one refuses new files (503).
        """
        opened = []
        real_open = os.open

        def opening(path, *args, **kwargs):
            if path == self.root:
                opened.append(path)
            return real_open(path, *args, **kwargs)

        self.patch(os, "open", opening)
        root = DestinationRoot(self.root, make=True)
        url = "file://" + self.src
        for name in ("1", "2"):
            await transfer.get(reactor, url, os.path.join(self.root, "a", name), dest_root=root)
        self.assertEqual(len(opened), 1)
        shutil.rmtree(self.root)
        await transfer.get(reactor, url, os.path.join(self.root, "a", "3"), dest_root=root)
        self.assertEqual(os.listdir(os.path.join(self.root, "a")), ["3"])
        root.close()
        with self.assertRaises(LocalFailure) as caught:
            await transfer.get(reactor, url, os.path.join(self.root, "a", "4"), dest_root=root)
        self.assertEqual((caught.exception.code, caught.exception.transient), (503, True))

    async def test_linkBelowRootRefused(self):
        """
        A symbolic link between the root and the file (to a directory outside, or even
        inside) is never followed: 422, nothing written.
        """
        os.symlink(self.outside, os.path.join(self.root, "out"))
        os.makedirs(os.path.join(self.root, "in"))
        os.symlink(os.path.join(self.root, "in"), os.path.join(self.root, "inlink"))
        for rel in ("out/x", "out/new/x", "inlink/x"):
            with self.assertRaises(LocalFailure) as caught:
                await transfer.get(
                    reactor,
                    "file://" + self.src,
                    os.path.join(self.root, *rel.split("/")),
                    dest_root=self.root,
                    pool=self.pool,
                )
            self.assertEqual((caught.exception.code, caught.exception.transient), (422, False))
            self.assertIn("is a symbolic link", caught.exception.message)
        self.assertEqual(os.listdir(self.outside), [])
        self.assertEqual(os.listdir(os.path.join(self.root, "in")), [])

    def swap_to_outside(self, directory):
        """Replace C{directory} by a symbolic link to the outside directory (the attack)."""
        os.rename(directory, directory + ".old")
        os.symlink(self.outside, directory)

    async def test_directorySwappedWhileBuffered(self):
        """
        A small file's directory replaced by a link to the outside while the bytes arrive:
        the file fails with 422 when it is written, and nothing is written outside.
        """
        directory = os.path.join(self.root, "a")
        os.makedirs(directory)
        hook = SwapOnWrite(lambda sink: self.swap_to_outside(directory))
        with self.assertRaises(LocalFailure) as caught:
            await transfer.get(
                reactor,
                "file://" + self.src,
                os.path.join(directory, "x"),
                dest_root=self.root,
                active=hook,
                pool=self.pool,
            )
        self.assertTrue(hook.swapped)
        self.assertEqual(caught.exception.code, 422)
        self.assertEqual(os.listdir(self.outside), [])
        self.assertEqual(os.listdir(directory + ".old"), [])

    async def test_directorySwappedWhileStreaming(self):
        """
        A streamed file's directory replaced by a link to the outside after its temporary
        file was created there: the file is not renamed into the old directory as if
        delivered, it fails with 422; nothing is written outside and no temporary file stays.
        """
        directory = os.path.join(self.root, "a")

        def swap(sink):
            self.assertEqual(len(leftovers(directory)), 1)
            self.swap_to_outside(directory)

        hook = SwapOnWrite(swap, on_disk=True)
        with self.assertRaises(LocalFailure) as caught:
            await transfer.get(
                reactor,
                "file://" + self.big_src,
                os.path.join(directory, "x"),
                dest_root=self.root,
                active=hook,
            )
        self.assertTrue(hook.swapped)
        self.assertEqual(caught.exception.code, 422)
        self.assertIn("replaced during the transfer", caught.exception.message)
        self.assertEqual(os.listdir(self.outside), [])
        self.assertEqual(os.listdir(directory + ".old"), [])

    async def test_destinationOutsideRootRefused(self):
        """
        A destination path that is not below the root given is refused before any disk work.
        """
        for dest in (os.path.join(self.outside, "x"), os.path.join(self.root, "..", "x")):
            with self.assertRaises(BadRequest):
                await transfer.get(reactor, "file://" + self.src, dest, dest_root=self.root)
        self.assertEqual(os.listdir(self.outside), [])


class TimeoutsTests(SynchronousTestCase):
    """
    L{Timeouts} defaults.
    """

    def test_defaults(self):
        """
        Ten seconds to connect, thirty without a byte.
        """
        self.assertEqual((Timeouts().connect, Timeouts().idle), (10, 30))
