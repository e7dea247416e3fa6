"""Loopback servers for the transfer tests (http, sftp, ftp), each on 127.0.0.1 port 0 and
stopped by the test's cleanup, and small file helpers."""

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor, ssl, tcp
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.web import resource, server, static

from ion.apps.pump.transfer.inflight import INFLIGHT_SUFFIX


def write_file(path, data):
    """Write C{data} (bytes) to C{path}; returns C{path}."""
    with open(path, "wb") as f:
        f.write(data)
    return path


def leftovers(directory):
    """The temporary inflight files left in C{directory}."""
    return sorted(name for name in os.listdir(directory) if name.endswith(INFLIGHT_SUFFIX))


async def settle(timeout=2.0):
    """Wait until no TCP connection is left open in the reactor (closing is asynchronous)."""
    deadline = reactor.seconds() + timeout
    while reactor.seconds() < deadline:
        open_connections = [
            selectable
            for selectable in reactor.getReaders() + reactor.getWriters()
            if isinstance(selectable, tcp.Connection)
        ]
        if not open_connections:
            return
        await deferLater(reactor, 0.005, lambda: None)


class _TrackingSite(server.Site):
    """A Site that can abort the connections it still has."""

    def __init__(self, resource):
        super().__init__(resource)
        self.connections = set()

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        lost = protocol.connectionLost
        self.connections.add(protocol)

        def connectionLost(reason):
            self.connections.discard(protocol)
            return lost(reason)

        protocol.connectionLost = connectionLost
        return protocol


def pattern(size):
    """The bytes C{/generated/<size>} serves."""
    return (BLOCK * (size // len(BLOCK) + 1))[:size]


BLOCK = bytes(range(256)) * 256


class _Generated(resource.Resource):
    """C{/generated/<size>}: C{size} bytes made on the fly, as fast as the client reads."""

    isLeaf = True

    def render_GET(self, request):
        size = int(request.postpath[0])
        request.setHeader(b"content-length", b"%d" % size)
        request.registerProducer(_PatternProducer(request, size), False)
        return server.NOT_DONE_YET


class _PatternProducer:
    def __init__(self, request, size):
        self.request = request
        self.remaining = size

    def resumeProducing(self):
        if self.remaining <= 0:
            return
        chunk = BLOCK[: min(len(BLOCK), self.remaining)]
        self.remaining -= len(chunk)
        self.request.write(chunk)
        if self.remaining == 0:
            self.request.unregisterProducer()
            self.request.finish()

    def stopProducing(self):
        self.remaining = 0


class _Partial(resource.Resource):
    """C{/stall/<size>} and C{/short/<size>}: announce C{size} bytes, send half, then stall
    forever or drop the connection."""

    isLeaf = True

    def __init__(self, stall):
        super().__init__()
        self.stall = stall

    def render_GET(self, request):
        size = int(request.postpath[0])
        request.setHeader(b"content-length", b"%d" % size)
        request.write(b"x" * (size // 2))
        if not self.stall:
            request.channel.transport.loseConnection()
        return server.NOT_DONE_YET


class _Upload(resource.Resource):
    """C{PUT /upload/<name>} stores the body as C{<root>/<name>}."""

    isLeaf = True

    def __init__(self, root):
        super().__init__()
        self.root = root

    def render_PUT(self, request):
        name = request.postpath[0].decode()
        with open(os.path.join(self.root, name), "wb") as f:
            while chunk := request.content.read(65536):
                f.write(chunk)
        request.setResponseCode(201)
        return b""


class _BasicAuth(resource.Resource):
    """The wrapped resource for one user and password; 401 for anybody else."""

    def __init__(self, wrapped, user, password):
        super().__init__()
        self.wrapped = wrapped
        self.user = user.encode()
        self.password = password.encode()

    def getChildWithDefault(self, path, request):
        if (request.getUser(), request.getPassword()) == (self.user, self.password):
            return self.wrapped.getChildWithDefault(path, request)
        return _Unauthorized()

    def render(self, request):
        return _Unauthorized().render(request)


class _Unauthorized(resource.Resource):
    isLeaf = True

    def render(self, request):
        request.setResponseCode(401)
        request.setHeader(b"www-authenticate", b'Basic realm="pump"')
        return b"authentication required"


class HTTPServer:
    """
    twisted.web on 127.0.0.1: C{/files/} serves C{root} (with directory listings), C{/auth/}
    the same behind basic auth, C{/generated/<n>}, C{/stall/<n>}, C{/short/<n>}, and
    C{PUT /upload/<name>} into C{root}. With C{tls=(certificate, key)} it speaks https.
    """

    def __init__(self, root, user="alice", password="secret", tls=None):
        self.root = root
        top = resource.Resource()
        top.putChild(b"files", static.File(root))
        top.putChild(b"auth", _BasicAuth(static.File(root), user, password))
        top.putChild(b"generated", _Generated())
        top.putChild(b"stall", _Partial(stall=True))
        top.putChild(b"short", _Partial(stall=False))
        top.putChild(b"upload", _Upload(root))
        self.site = _TrackingSite(top)
        self.site.displayTracebacks = False
        self.tls = tls
        self.port = None

    def start(self):
        if self.tls is None:
            self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        else:
            self.port = reactor.listenSSL(0, self.site, self.tls, interface="127.0.0.1")
        scheme = "http" if self.tls is None else "https"
        self.url = f"{scheme}://127.0.0.1:{self.port.getHost().port}"
        return self

    async def stop(self):
        await self.port.stopListening()
        for protocol in list(self.site.connections):
            protocol.transport.abortConnection()
        await settle()


def start_http(testcase, root, **kwargs):
    """A started L{HTTPServer}, stopped when C{testcase} is cleaned up."""
    http_server = HTTPServer(root, **kwargs).start()
    testcase.addCleanup(lambda: Deferred.fromCoroutine(http_server.stop()))
    return http_server


def make_tls(directory):
    """
    A private CA and a certificate for 127.0.0.1 and localhost signed by it.

    @return: C{(ca_file, server_options)}: the CA's PEM file written in C{directory}, and
        the TLS options for L{HTTPServer}.
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ion test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_file = os.path.join(directory, "ca.pem")
    write_file(ca_file, ca_cert.public_bytes(serialization.Encoding.PEM))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    pem = key_pem + cert.public_bytes(serialization.Encoding.PEM)
    return ca_file, ssl.PrivateCertificate.loadPEM(pem).options()
