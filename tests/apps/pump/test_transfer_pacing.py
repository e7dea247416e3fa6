"""
Tests for L{ion.apps.pump.transfer.pacing}: bandwidth limits shared by a scope's transfers.
"""

import os
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ion.apps.pump.args import BadArgument, ConsumerArgs, TransferSettings
from ion.apps.pump.transfer import sftp as sftp_scheme
from ion.apps.pump.transfer.limits import IdleTimer
from ion.apps.pump.transfer.pacing import MIN_BURST, PacedSink, Pacer, Pacers, take
from ion.apps.pump.transfer.worker import Transfers
from tests.apps.pump.servers import settle, start_ftp, start_http, start_sftp, write_file


class PacerTests(SynchronousTestCase):
    """The token bucket's arithmetic, on a fake clock."""

    def test_debt_is_paid_at_the_rate(self):
        """
        Bytes beyond the bucket are a debt: the wait is the debt over the rate, and it shrinks
        as the clock moves.
        """
        clock = Clock()
        pacer = Pacer(clock, 100_000, burst=100_000)
        self.assertEqual(pacer.spend(100_000), 0)
        self.assertAlmostEqual(pacer.spend(50_000), 0.5)
        clock.advance(0.2)
        self.assertAlmostEqual(pacer.delay(), 0.3)
        clock.advance(0.3)
        self.assertEqual(pacer.delay(), 0)

    def test_idle_bucket_holds_at_most_burst(self):
        """
        A scope idle for an hour may move one burst at once, not an hour's worth.
        """
        clock = Clock()
        pacer = Pacer(clock, 1_000_000)
        self.assertEqual(pacer.burst, 250_000)
        clock.advance(3600)
        self.assertEqual(pacer.tokens, 250_000)
        self.assertGreater(pacer.spend(250_001), 0)
        self.assertEqual(Pacer(clock, 10_000).burst, MIN_BURST)

    def test_take_waits_on_the_clock(self):
        """
        take() spends and then fires only once the debt is paid: two takers share the rate.
        """
        clock = Clock()
        pacer = Pacer(clock, 1000, burst=1000)
        fired = []
        first = Deferred.fromCoroutine(take(clock, [pacer], 2000))
        first.addCallback(fired.append)
        second = Deferred.fromCoroutine(take(clock, [pacer], 1000))
        second.addCallback(fired.append)
        clock.advance(0.999)
        self.assertEqual(fired, [])
        clock.advance(0.001)
        self.assertEqual(fired, [])  # 2000 bytes of debt: 2 s
        clock.advance(1)
        self.assertEqual(fired, [None, None])

    def test_paced_sink(self):
        """
        A paced sink says it is backlogged while its pacers are in debt, and drained()
        fires when the debt is paid; its other attributes are the file's.
        """
        clock = Clock()
        pacer = Pacer(clock, 1000, burst=1000)

        class File:
            size = 0
            backlogged = False

            def write(self, data):
                self.size += len(data)

            def drained(self):
                return Deferred.fromCoroutine(_nothing())

        sink = PacedSink(File(), [pacer], clock)
        sink.write(b"x" * 1500)
        self.assertEqual(sink.size, 1500)
        self.assertTrue(sink.backlogged)
        self.assertTrue(sink.pacing)
        done = []
        sink.drained().addCallback(done.append)
        clock.advance(0.4)
        self.assertEqual(done, [])
        clock.advance(0.1)
        self.assertEqual(done, [None])
        self.assertFalse(sink.backlogged)

    def test_pacers_per_host(self):
        """
        Transfers to one server share its pacer and the process's; idle servers are
        forgotten once many are known.
        """
        clock = Clock()
        pacers = Pacers(clock, rate=10_000, per_host=5000)
        a1, a2 = pacers.for_host(("http", "a", 80)), pacers.for_host(("http", "a", 80))
        b = pacers.for_host(("http", "b", 80))
        self.assertEqual(a1, a2)
        self.assertIs(a1[0], b[0])
        self.assertIsNot(a1[1], b[1])
        for n in range(300):
            pacers.for_host(("http", f"h{n}", 80))
        self.assertLessEqual(len(pacers._hosts), 256 + 1)
        self.assertEqual(Pacers(clock).for_host(("http", "a", 80)), ())

    def test_idle_timer_hold(self):
        """
        A held idle timer does not expire (the transfer waits for its limit, not the server);
        the next touch starts the countdown again.
        """
        clock = Clock()
        expired = []
        timer = IdleTimer(clock, 30, lambda: expired.append(True))
        timer.hold()
        clock.pump([10] * 10)
        self.assertEqual(expired, [])
        timer.touch()
        clock.advance(30)
        self.assertEqual(expired, [True])


async def _nothing():
    return None


class SettingsTests(SynchronousTestCase):
    """Bad limits are one line naming the key and the value."""

    def test_bad_rates(self):
        with self.assertRaises(BadArgument) as caught:
            ConsumerArgs.parse({"name": "s", "directory": "d", "byte_rate_max": "fast"})
        self.assertEqual(
            str(caught.exception),
            "consumer s: byte_rate_max must be bytes per second >= 1024 (or None for no "
            "limit), got 'fast'",
        )
        with self.assertRaises(BadArgument) as caught:
            TransferSettings.parse({"host_byte_rate_max": 2000, "min_rate": 4096}, "pump: transfer")
        self.assertIn("host_byte_rate_max 2000 is below min_rate", str(caught.exception))
        args = ConsumerArgs.parse({"name": "s", "directory": "d", "byte_rate_max": 2**20})
        self.assertEqual(args.transfer.byte_rate_max, 2**20)


RATE = 1024 * 1024
SECONDS = 4


class RealTransferTests(TestCase):
    """
    A limit holds over real loopback transfers (the issue's 2 MiB/s over 20 s is sized down
    to 1 MiB/s over 4 s to keep the suite fast; the bucket is the same).
    """

    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        self.dest = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        os.makedirs(self.dest)
        self.addCleanup(settle)

    def transfers(self, **settings):
        transfers = Transfers(reactor, dict({"byte_rate_max": RATE}, **settings), "test")
        self.addCleanup(lambda: Deferred.fromCoroutine(transfers.close()))
        return transfers

    async def test_http_limit_shared_by_two_transfers(self):
        """
        Two parallel http gets under one 1 MiB/s limit take together SECONDS s for
        SECONDS MiB, within 10 %, and both arrive whole.
        """
        half = RATE * SECONDS // 2
        for name in ("a", "b"):
            write_file(os.path.join(self.root, name), os.urandom(half))
        server = start_http(self, self.root)
        transfers = self.transfers()
        started = time.monotonic()
        results = await gatherResults([
            Deferred.fromCoroutine(transfers.get(
                f"{server.url}/files/{name}", os.path.join(self.dest, name),
                expected_size=half))
            for name in ("a", "b")
        ])
        elapsed = time.monotonic() - started
        self.assertEqual([r.size for r in results], [half, half])
        # The bucket lets one burst through at once: that much less time.
        expected = (2 * half - transfers.pacers.shared.burst) / RATE
        self.assertTrue(
            0.9 * expected <= elapsed <= 1.1 * expected + 0.2,
            f"{2 * half} bytes in {elapsed:.2f} s at {RATE} bytes/s (expected {expected:.2f} s)",
        )

    async def test_sftp_put_paced(self):
        """
        An sftp put keeps to the limit too (1 s for 1 MiB past the burst).
        """
        size = RATE + 256 * 1024
        source = os.path.join(self.dest, "up.bin")
        write_file(source, os.urandom(size))
        server = start_sftp(self, self.root, user="bob", password="pw")
        known = write_file(os.path.join(self.dest, "known_hosts"),
                           server.known_hosts_line().encode())
        self.patch(sftp_scheme, "DEFAULT_KNOWN_HOSTS", known)
        transfers = self.transfers()
        started = time.monotonic()
        await transfers.put(source, f"sftp://bob:pw@127.0.0.1:{server.port.getHost().port}/up.bin")
        elapsed = time.monotonic() - started
        expected = (size - transfers.pacers.shared.burst) / RATE
        self.assertTrue(0.9 * expected <= elapsed <= 1.1 * expected + 0.3, f"{elapsed:.2f} s")
        self.assertEqual(os.path.getsize(os.path.join(self.root, "up.bin")), size)

    async def test_http_put_paced(self):
        """
        An http PUT keeps to the limit too.
        """
        size = RATE + 256 * 1024
        source = os.path.join(self.dest, "up.bin")
        write_file(source, os.urandom(size))
        server = start_http(self, self.root)
        transfers = self.transfers()
        started = time.monotonic()
        await transfers.put(source, f"{server.url}/upload/up.bin")
        elapsed = time.monotonic() - started
        expected = (size - transfers.pacers.shared.burst) / RATE
        self.assertTrue(0.9 * expected <= elapsed <= 1.1 * expected + 0.3, f"{elapsed:.2f} s")
        self.assertEqual(os.path.getsize(os.path.join(self.root, "up.bin")), size)

    async def test_ftp_put_paced(self):
        """
        An ftp STOR keeps to the limit too.
        """
        size = RATE + 256 * 1024
        source = os.path.join(self.dest, "up.bin")
        write_file(source, os.urandom(size))
        server = start_ftp(self, self.root, user="carol", password="pw")
        transfers = self.transfers()
        started = time.monotonic()
        await transfers.put(source, f"ftp://carol:pw@127.0.0.1:{server.port.getHost().port}/up.bin")
        elapsed = time.monotonic() - started
        expected = (size - transfers.pacers.shared.burst) / RATE
        self.assertTrue(0.9 * expected <= elapsed <= 1.1 * expected + 0.3, f"{elapsed:.2f} s")
        self.assertEqual(os.path.getsize(os.path.join(self.root, "up.bin")), size)

    async def test_file_copies_paced(self):
        """
        Copies from a file: URL (a consumer's get) and to one (a sender's put) keep to the
        limit too (1 s for 1 MiB past the burst, each with a bucket of its own).
        """
        size = RATE + 256 * 1024
        source = os.path.join(self.root, "in.bin")
        data = os.urandom(size)
        write_file(source, data)
        for url_of, copy in (
            (lambda: "file://" + source,
             lambda t, url: t.get(url, os.path.join(self.dest, "got.bin"), expected_size=size)),
            (lambda: "file://" + os.path.join(self.dest, "put.bin"),
             lambda t, url: t.put(source, url)),
        ):
            transfers = self.transfers()
            started = time.monotonic()
            await copy(transfers, url_of())
            elapsed = time.monotonic() - started
            expected = (size - transfers.pacers.shared.burst) / RATE
            self.assertTrue(0.9 * expected <= elapsed <= 1.1 * expected + 0.3,
                            f"{url_of()}: {elapsed:.2f} s, expected {expected:.2f} s")
        for name in ("got.bin", "put.bin"):
            with open(os.path.join(self.dest, name), "rb") as f:
                self.assertEqual(f.read(), data, name)
