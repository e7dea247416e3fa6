"""
Tests for L{ion.apps.pump.transfer.policy}: what a notice's URL may reach, judged on the
normalized URL and on the addresses actually connected to, against real loopback servers.
"""

import ipaddress
import os
from types import SimpleNamespace

from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHostnameResolver
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import resource, server
from zope.interface import implementer

from ion.apps.pump import transfer
from ion.apps.pump.transfer import Credentials, ServerNotTrusted
from ion.apps.pump.transfer import ftp
from ion.apps.pump.transfer.errors import BadRequest
from ion.apps.pump.transfer.location import Settings, locate
from ion.apps.pump.transfer.policy import (
    Forbidden,
    OwnAddresses,
    UrlPolicy,
    normalize,
    special_address,
)
from tests.apps.pump.servers import (
    make_tls,
    settle,
    start_ftp,
    start_http,
    start_sftp,
    write_file,
)

PUMP = "pump"
BODY = b"the file's bytes\n"


class _Recorder(resource.Resource):
    """Serves BODY for any path and records (path, Authorization) of every request;
    C{/go/<port>/<path>} answers with a redirect to C{http://127.0.0.1:<port>/<path>}."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.seen = []

    def render_GET(self, request):
        self.seen.append((request.path.decode(), request.getHeader(b"authorization")))
        parts = request.path.decode().split("/")
        if parts[1:2] == ["go"]:
            request.redirect(f"http://127.0.0.1:{parts[2]}/{'/'.join(parts[3:])}".encode())
            return b""
        return BODY


def start_recorder(testcase):
    recorder = _Recorder()
    port = reactor.listenTCP(0, server.Site(recorder), interface="127.0.0.1")
    testcase.addCleanup(port.stopListening)
    recorder.port = port.getHost().port
    recorder.url = f"http://127.0.0.1:{recorder.port}"
    return recorder


class NormalizeTests(SynchronousTestCase):
    """The normalized URL every decision is made on."""

    def test_spellings_of_one_url(self):
        """Case, numeric IPv4 spellings, IPv4-mapped IPv6, default ports, unreserved escapes
        and dot segments all come out as one URL: a prefix cannot be dodged by respelling."""
        for url in (
            "HTTP://127.0.0.1:18080/a/b",
            "http://127.1:18080/a/b",
            "http://0x7f.1:18080/a/./b",
            "http://0177.0.0.1:18080/a/x/../b",
            "http://2130706433:18080/%61/b",
            "http://[::ffff:127.0.0.1]:18080/a/b",
            "http://127.0.0.1.:18080/a/c/%2e%2e/b",
        ):
            self.assertEqual(normalize(url).text(), "http://127.0.0.1:18080/a/b", url)
        self.assertEqual(normalize("https://Example.ORG/x").text(), "https://example.org:443/x")
        self.assertEqual(normalize("https://bücher.de/").host, "xn--bcher-kva.de")
        self.assertEqual(normalize("FILE:///etc/../etc/passwd").text(), "file:///etc/passwd")

    def test_escaped_step_up_refused(self):
        """A '..' a server could still decode out of the path is refused outright; a file
        path is decoded once, as it is opened, and then resolved."""
        for url in ("http://h/private/..%2Fok/x", "http://h/a/%252e%252e/b"):
            self.assertRaises(ValueError, normalize, url)
        self.assertEqual(normalize("file:///a/..%2fb").path, "/b")

    def test_plain_paths_as_they_are(self):
        """A path with nothing to decode and no dot segment is its own normal form; one step
        away from that (a dot segment, a backslash, an escape) is still resolved or refused."""
        for path in ("/", "/a/b.txt", "/obs/2026/12/08/x..y", "/a/.hidden/f", "/a//b/"):
            self.assertEqual(normalize("http://h" + path).path, path, path)
        self.assertEqual(normalize("http://h/a/./b").path, "/a/b")
        self.assertEqual(normalize("http://h/a/b/..").path, "/a/")
        self.assertEqual(normalize("http://h/%7Ea").path, "/~a")
        self.assertEqual(normalize("http://h/a/%2e%2e/b").path, "/b")
        for url in ("http://h/a\\..\\b", "http://h/a/..%5cb"):
            self.assertRaises(ValueError, normalize, url)

    def test_user_and_query_kept(self):
        self.assertEqual(normalize("http://u:p%40@H/x?a=1").text(), "http://u:p%40@h:80/x?a=1")


class AddressTests(SynchronousTestCase):
    def test_special_addresses(self):
        """Loopback, link-local, unspecified, multicast and own addresses are special, in
        IPv4-mapped form too; private LAN addresses are not."""
        own = {ipaddress.ip_address("192.0.2.2")}
        for address, why in (
            ("127.0.0.1", "loopback"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::1", "loopback"),
            ("169.254.169.254", "link-local"),
            ("fe80::1", "link-local"),
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "unspecified"),
            ("::", "unspecified"),
            ("224.0.0.1", "multicast"),
            ("192.0.2.2", "an address of this machine"),
            ("::ffff:192.0.2.2", "an address of this machine"),
        ):
            self.assertEqual(special_address(address, own), why, address)
        for address in ("10.1.2.3", "192.168.1.1", "93.184.216.34", "2001:db8::1"):
            self.assertIsNone(special_address(address, own), address)


class PolicyTests(SynchronousTestCase):
    """UrlPolicy.judge: the decision before any connection."""

    def test_file_refused_for_others(self):
        """file: URLs, in any case, are refused for a source other than the pump's user,
        and accepted for the pump's own."""
        policy = UrlPolicy(own_user=PUMP)
        for url in ("file:///etc/passwd", "FILE:///etc/passwd", "File://localhost/etc/passwd"):
            self.assertRaises(Forbidden, policy.judge, url, "bob")
            self.assertRaises(Forbidden, policy.judge, url, None)
        access = policy.judge("file:///etc/passwd", PUMP)
        self.assertTrue(access.trusted)
        self.assertTrue(access.credentials)

    def test_default_accepts_network_schemes_without_credentials(self):
        policy = UrlPolicy(own_user=PUMP)
        for url in ("http://h/x", "https://h/x", "sftp://u@h/x", "ftp://h/x"):
            access = policy.judge(url, "bob")
            self.assertFalse(access.trusted)
            self.assertFalse(access.credentials)

    def test_sources_is_an_allow_list(self):
        """With sources, only URLs under a prefix are accepted, matched on the normalized URL
        and on path segments; '..' cannot climb out of a prefix."""
        policy = UrlPolicy(
            [
                "http://127.0.0.1:18080/ok/",
                {"url": "http://127.0.0.1:18090/private/", "credentials": True},
            ],
            own_user=PUMP,
        )
        self.assertFalse(policy.judge("http://127.1:18080/ok/x", "bob").credentials)
        mapped = "HTTP://[::ffff:127.0.0.1]:18090/private/x"
        self.assertTrue(policy.judge(mapped, "bob").credentials)
        for url in (
            "http://127.0.0.1:18080/okay",
            "http://127.0.0.1:18080/ok/../x",
            "http://127.0.0.1:18090/private/../ok/x",
            "https://127.0.0.1:18080/ok/x",
            "file:///ok/x",
        ):
            self.assertRaises(Forbidden, policy.judge, url, "bob")

    def test_bad_sources(self):
        """A bad sources value is one clear ValueError naming the subscription."""
        for sources in (
            "http://h/",
            [42],
            ["h/x"],
            [{"url": "http://h/", "credentials": "yes"}],
            [{"url": "http://h/", "extra": 1}],
            ["http://u:p@h/"],
            ["gopher://h/"],
        ):
            with self.assertRaises(ValueError) as caught:
                UrlPolicy(sources, who="consumer sub")
            self.assertTrue(str(caught.exception).startswith("consumer sub: "), caught.exception)
            self.assertNotIn("\n", str(caught.exception))
            self.assertNotIn(":p@", str(caught.exception))

    def test_unusable_url(self):
        self.assertRaises(BadRequest, UrlPolicy().judge, "http://h:99999999/", "bob")


def _own(addresses=()):
    return OwnAddresses(read=lambda: frozenset(ipaddress.ip_address(a) for a in addresses))


class FetchTests(TestCase):
    """The policy where the connection is made: operations.get with an access."""

    def setUp(self):
        self.dest = os.path.join(os.path.abspath(self.mktemp()), "out")
        os.makedirs(os.path.dirname(self.dest))
        self.server = start_recorder(self)
        self.addCleanup(settle)

    def get(self, url, access, **kwargs):
        fetching = transfer.get(reactor, url, self.dest, access=access, **kwargs)
        return Deferred.fromCoroutine(fetching)

    def judge(self, url, sources=None, source="bob", own=()):
        policy = UrlPolicy(sources, own_user=PUMP, own_addresses=_own(own))
        return policy.judge(url, source)

    async def assertRefused(self, url, sources=None, **kwargs):
        with self.assertRaises(Forbidden) as caught:
            await self.get(url, self.judge(url, sources), **kwargs)
        self.assertEqual(caught.exception.code, 403)
        self.assertFalse(caught.exception.transient)
        self.assertFalse(os.path.exists(self.dest))
        return caught.exception

    async def test_loopback_refused_for_others(self):
        """http to a loopback server, in every spelling, is refused for another source: the
        server sees no request."""
        port = self.server.port
        for url in (
            f"http://127.0.0.1:{port}/f",
            f"http://127.1:{port}/f",
            f"http://0x7f.1:{port}/f",
            f"http://[::ffff:127.0.0.1]:{port}/f",
            f"http://LOCALHOST:{port}/f",
        ):
            error = await self.assertRefused(url)
            self.assertIn("loopback", error.message)
        self.assertEqual(self.server.seen, [])

    async def test_own_address_refused(self):
        """An address of this machine is refused like loopback (here one stands in for it)."""
        url = f"http://127.0.0.1:{self.server.port}/f"
        policy = UrlPolicy(None, own_user=PUMP, own_addresses=_own(["127.0.0.1"]))
        with self.assertRaises(Forbidden):
            await self.get(url, policy.judge(url, "bob"))

    async def test_loopback_allowed_by_sources_or_own_user(self):
        """The same server is fetched from when sources lists it, or for the pump's user."""
        url = f"http://127.1:{self.server.port}/data/f"
        result = await self.get(url, self.judge(url, [self.server.url + "/data/"]))
        self.assertEqual(result.size, len(BODY))
        os.unlink(self.dest)
        await self.get(url, self.judge(url, source=PUMP))
        self.assertEqual([path for path, _ in self.server.seen], ["/data/f", "/data/f"])

    async def test_redirect_to_loopback_refused(self):
        """A redirect from an allowed server to another local port is not followed."""
        other = start_recorder(self)
        url = f"{self.server.url}/go/{other.port}/secret"
        await self.assertRefused(url, [self.server.url + "/"])
        self.assertEqual(other.seen, [])
        self.assertEqual([path for path, _ in self.server.seen], [f"/go/{other.port}/secret"])

    async def test_redirect_within_sources_followed(self):
        other = start_recorder(self)
        url = f"{self.server.url}/go/{other.port}/f"
        await self.get(url, self.judge(url, [self.server.url + "/", other.url + "/"]))
        self.assertEqual(other.seen, [("/f", None)])

    async def test_credentials_stay_with_their_origin(self):
        """A redirect to another origin goes without the Authorization header, also for the
        pump's own user."""
        other = start_recorder(self)
        url = f"{self.server.url}/go/{other.port}/f"
        credentials = Credentials.parse(f"http://pumpuser:pw@127.0.0.1:{self.server.port}/\n")
        await self.get(url, self.judge(url, source=PUMP), credentials=credentials)
        self.assertTrue(self.server.seen[0][1].startswith(b"Basic "))
        self.assertEqual(other.seen, [("/f", None)])

    async def test_credentials_only_where_sources_allow(self):
        """A credentials line for /private/ is not used for another source's notice unless
        sources allows credentials there; '/private/../ok/x' never gets it."""
        base = self.server.url
        line = f"http://pumpuser:pw@127.0.0.1:{self.server.port}/private/\n"
        credentials = Credentials.parse(line)
        plain = [base + "/"]
        allowed = [{"url": base + "/private/", "credentials": True}, base + "/ok/"]
        for url, sources in (
            (f"{base}/private/x", plain),
            (f"{base}/private/../ok/x", plain),
            (f"{base}/private/../ok/x", allowed),
        ):
            await self.get(url, self.judge(url, sources), credentials=credentials)
            os.unlink(self.dest)
        url = f"{base}/private/x"
        await self.get(url, self.judge(url, allowed), credentials=credentials)
        headers = [auth for _, auth in self.server.seen]
        self.assertEqual(headers[:3], [None, None, None])
        self.assertTrue(headers[3].startswith(b"Basic "))
        self.assertEqual([path for path, _ in self.server.seen][1:3], ["/ok/x", "/ok/x"])

    async def test_sftp_and_ftp_to_loopback_refused(self):
        """sftp and ftp connections are checked too: the servers see no connection."""
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        sftp = start_sftp(self, root)
        ftp = start_ftp(self, root)
        built = []
        for listening in (sftp, ftp):
            build = listening.factory.buildProtocol
            listening.factory.buildProtocol = lambda a, build=build: built.append(a) or build(a)
        for url in (
            f"sftp://root@127.0.0.1:{sftp.port.getHost().port}/etc/shadow",
            f"ftp://127.0.0.1:{ftp.port.getHost().port}/f",
        ):
            await self.assertRefused(url)
        self.assertEqual(built, [])



    async def test_sftp_and_ftp_allowed_by_sources(self):
        """Listed in sources, the same servers are fetched from (connected by address), with
        the password the notice's URL carries."""
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        write_file(os.path.join(root, "f"), BODY)
        sftp = start_sftp(self, root, user="bob", password="pw")
        ftp_server = start_ftp(self, root, user="carol", password="pw")
        known_hosts = write_file(
            os.path.join(root, "known_hosts"), sftp.known_hosts_line().encode()
        )
        for listening, user in ((sftp, "bob"), (ftp_server, "carol")):
            scheme = "sftp" if listening is sftp else "ftp"
            prefix = f"{scheme}://127.0.0.1:{listening.port.getHost().port}/"
            url = prefix.replace("://", f"://{user}:pw@") + "f"
            result = await self.get(url, self.judge(url, [prefix]), known_hosts=known_hosts)
            self.assertEqual(result.size, len(BODY))
            os.unlink(self.dest)


class FTPDataConnectionTests(SynchronousTestCase):
    def test_passive_data_goes_to_the_control_peer(self):
        """The address in a PASV reply is ignored: the data connection goes to the control
        connection's peer (the checked address), only the port is taken from the reply."""
        memory = MemoryReactorClock()
        location = locate("ftp://198.51.100.7/f")
        session = ftp._Session(memory, location, Settings())
        session.control.makeConnection(
            StringTransport(peerAddress=IPv4Address("TCP", "198.51.100.7", 21))
        )
        session.connect_data("127.0.0.1", 2121, ClientFactory())
        self.assertEqual(memory.tcpClients[0][:2], ("198.51.100.7", 2121))


class HTTPSTests(TestCase):
    async def test_tls_verifies_the_name_while_connecting_to_the_checked_address(self):
        """Under a restricted access the connection goes to the address checked, and the
        certificate is still verified against the URL's host name."""
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        write_file(os.path.join(root, "small.txt"), b"hello")
        ca_file, options = make_tls(root)
        server = start_http(self, root, tls=options)
        self.addCleanup(settle)
        url = f"https://localhost:{server.port.getHost().port}/files/small.txt"
        access = UrlPolicy([url.rsplit("/", 2)[0] + "/"], own_user=PUMP).judge(url, "bob")
        dest = os.path.join(root, "out")
        result = await transfer.get(reactor, url, dest, access=access, ca_file=ca_file)
        self.assertEqual(result.size, 5)
        with self.assertRaises(ServerNotTrusted):
            await transfer.get(reactor, url, dest + "2", access=access)


@implementer(IHostnameResolver)
class _FakeResolver:
    """Answers every name with the given addresses, and counts the questions."""

    def __init__(self, addresses):
        self.addresses = addresses
        self.asked = 0

    def resolveHostName(self, receiver, hostName, portNumber=0, *args, **kwargs):
        self.asked += 1
        receiver.resolutionBegan(None)
        for address in self.addresses:
            kind = IPv6Address if ":" in address else IPv4Address
            receiver.addressResolved(kind("TCP", address, portNumber))
        receiver.resolutionComplete()


class ResolutionTests(TestCase):
    async def test_every_address_checked_once(self):
        """A name resolving to a public and a loopback address is refused; the name is
        resolved once per connection and the addresses handed out are the ones checked."""
        resolver = _FakeResolver(["93.184.216.34", "127.0.0.1"])
        fake = SimpleNamespace(
            nameResolver=resolver,
            getThreadPool=reactor.getThreadPool,
            callFromThread=reactor.callFromThread,
        )
        policy = UrlPolicy(own_user=PUMP, own_addresses=_own())
        access = policy.judge("http://mixed.example/f", "bob")
        with self.assertRaises(Forbidden):
            await access.addresses(fake, "http", "mixed.example", 80)
        resolver.addresses = ["93.184.216.34", "2001:db8::1"]
        found = await access.addresses(fake, "http", "mixed.example", 80)
        self.assertEqual(found, ["93.184.216.34", "2001:db8::1"])
        self.assertEqual(resolver.asked, 2)
