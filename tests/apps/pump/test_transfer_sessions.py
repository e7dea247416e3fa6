"""
Tests for L{ion.apps.pump.transfer.sessions}: sftp and ftp sessions kept open between
transfers, logged out after C{dead_time} idle, against real conch and twisted FTP servers.
"""

import os

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ion.apps.pump.transfer import sftp as sftp_scheme
from ion.apps.pump.transfer.sessions import Sessions
from ion.apps.pump.transfer.worker import Transfers
from tests.apps.pump.servers import settle, start_ftp, start_sftp, write_file
from tests.waiting import until


class _FakeSession:
    def __init__(self):
        self.open = True
        self.logged_out = False

    def usable(self):
        return self.open

    async def close(self):
        self.open = False

    async def logout(self):
        self.logged_out = True
        self.open = False


class SessionsTests(SynchronousTestCase):
    """The bookkeeping, on a fake clock."""

    def test_kept_then_logged_out(self):
        """
        A session given back is taken by the next transfer (its dead time starts again once
        it is given back); one idle for dead_time is logged out.
        """
        clock = Clock()
        sessions = Sessions(clock, 180)
        session = _FakeSession()
        sessions.give("k", session)
        clock.advance(179)
        self.assertIs(sessions.take("k"), session)
        self.assertIsNone(sessions.take("k"))
        sessions.give("k", session)
        clock.advance(179)
        self.assertFalse(session.logged_out)
        clock.advance(1)
        self.assertTrue(session.logged_out)
        self.assertEqual((sessions.idle(), sessions.expired), (0, 1))
        self.assertIsNone(sessions.take("k"))

    def test_closed_or_none_kept(self):
        """
        A session the server closed while idle is not handed out; dead_time 0 keeps none;
        at most per_key are kept.
        """
        clock = Clock()
        sessions = Sessions(clock, 180, per_key=2)
        gone = _FakeSession()
        sessions.give("k", gone)
        gone.open = False
        self.assertIsNone(sessions.take("k"))
        kept = [_FakeSession() for _ in range(3)]
        for session in kept:
            sessions.give("k", session)
        self.assertEqual(sessions.idle(), 2)
        self.assertFalse(kept[2].open)
        none = Sessions(clock, 0)
        session = _FakeSession()
        none.give("k", session)
        self.assertEqual((none.idle(), session.open), (0, False))

    def test_given_back_after_close(self):
        """
        A session whose transfer ends after the sessions were closed (the owner stopping)
        is closed, not kept with a timer.
        """
        clock = Clock()
        sessions = Sessions(clock, 180)
        self.successResultOf(Deferred.fromCoroutine(sessions.close()))
        session = _FakeSession()
        sessions.give("k", session)
        self.assertEqual((sessions.idle(), session.open, clock.getDelayedCalls()), (0, False, []))


class DeadTimeTests(TestCase):
    """Real servers on loopback; the dead time runs on a fake clock."""

    def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        self.remote = os.path.join(self.base, "remote")
        os.makedirs(self.remote)
        self.source = write_file(os.path.join(self.base, "a.bin"), b"a" * 50_000)
        self.clock = Clock()
        self.addCleanup(settle)

    def transfers(self):
        transfers = Transfers(reactor, {"dead_time": 180}, "test")
        transfers.sessions = Sessions(self.clock, 180)
        self.addCleanup(lambda: Deferred.fromCoroutine(transfers.close()))
        return transfers

    async def check_dead_time(self, server, url):
        transfers = self.transfers()
        await transfers.put(self.source, url + "/one.bin")
        await transfers.put(self.source, url + "/two.bin")
        await transfers.list(url + "/")
        self.assertEqual(transfers.sessions.opened, 1)
        self.assertEqual(len(server.factory.connections), 1)
        self.clock.advance(179)
        await transfers.put(self.source, url + "/three.bin")
        self.assertEqual(transfers.sessions.opened, 1)
        self.clock.advance(180)  # idle for dead_time: logged out and closed
        await until(lambda: not server.factory.connections, what="the session closed")
        await transfers.put(self.source, url + "/four.bin")
        self.assertEqual(transfers.sessions.opened, 2)
        self.assertEqual(
            sorted(os.listdir(self.remote)), ["four.bin", "one.bin", "three.bin", "two.bin"]
        )

    async def test_sftp(self):
        """
        sftp: files sent one after the other share one SSH session; idle for dead_time it is
        closed, and the next file connects again.
        """
        server = start_sftp(self, self.remote, user="bob", password="pw")
        known = write_file(os.path.join(self.base, "known_hosts"),
                           server.known_hosts_line().encode())
        self.patch(sftp_scheme, "DEFAULT_KNOWN_HOSTS", known)
        await self.check_dead_time(server, f"sftp://bob:pw@127.0.0.1:{server.port.getHost().port}")

    async def test_ftp(self):
        """
        ftp: the same with one logged-in control connection (QUIT at the dead time).
        """
        server = start_ftp(self, self.remote, user="carol", password="pw")
        await self.check_dead_time(server, f"ftp://carol:pw@127.0.0.1:{server.port.getHost().port}")

    async def test_failure_not_kept(self):
        """
        A session whose transfer failed is closed, not kept: the next transfer logs in anew.
        """
        server = start_sftp(self, self.remote, user="bob", password="pw")
        known = write_file(os.path.join(self.base, "known_hosts"),
                           server.known_hosts_line().encode())
        self.patch(sftp_scheme, "DEFAULT_KNOWN_HOSTS", known)
        url = f"sftp://bob:pw@127.0.0.1:{server.port.getHost().port}"
        transfers = self.transfers()
        await transfers.put(self.source, url + "/one.bin")
        with self.assertRaises(Exception):
            await transfers.get(url + "/missing.bin", os.path.join(self.base, "m"))
        self.assertEqual(transfers.sessions.opened, 1)
        await transfers.put(self.source, url + "/two.bin")
        self.assertEqual(transfers.sessions.opened, 2)
