"""Loopback servers for the transfer tests (http, sftp, ftp), each on 127.0.0.1 port 0 and
stopped by the test's cleanup, and small file helpers."""

import datetime
import ipaddress
import os
import posixpath
import stat
import threading
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID
from twisted.conch import avatar
from twisted.conch.checkers import InMemorySSHKeyDB, SSHPublicKeyChecker
from twisted.conch.ls import lsLine
from twisted.conch.ssh import factory, filetransfer, keys, session, userauth
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet import reactor, ssl, tcp
from twisted.internet import defer
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.protocols import ftp
from twisted.python import components
from twisted.python.filepath import FilePath
from twisted.python.threadpool import ThreadPool
from twisted.web import resource, server, static
from zope.interface import implementer

from ion.apps.pump.transfer.inflight import INFLIGHT_SUFFIX
from ion.apps.pump.transfer.outgoing import OutgoingFile
from tests.waiting import until


def write_file(path, data):
    """Write C{data} (bytes) to C{path}; returns C{path}."""
    with open(path, "wb") as f:
        f.write(data)
    return path


def source_threads(testcase):
    """
    A pool of two threads for puts, and the list of the threads that open and read the
    sources of puts (L{OutgoingFile}) during C{testcase}.
    """
    pool = ThreadPool(minthreads=0, maxthreads=2)
    pool.start()
    testcase.addCleanup(pool.stop)
    threads = []
    opening, reading = OutgoingFile.__init__, OutgoingFile.read

    def opened(outgoing, *args, **kwargs):
        threads.append(threading.current_thread())
        opening(outgoing, *args, **kwargs)

    def read(outgoing, length):
        threads.append(threading.current_thread())
        return reading(outgoing, length)

    testcase.patch(OutgoingFile, "__init__", opened)
    testcase.patch(OutgoingFile, "read", read)
    return pool, threads


def leftovers(directory):
    """The temporary inflight files left in C{directory}."""
    return sorted(name for name in os.listdir(directory) if name.endswith(INFLIGHT_SUFFIX))


def partly_written(directory, size=1):
    """Whether a temporary inflight file of at least C{size} bytes is in C{directory}."""
    names = leftovers(directory)
    return bool(names) and os.path.getsize(os.path.join(directory, names[0])) >= size


async def settle(timeout=2.0):
    """Wait until no TCP connection is left open in the reactor (closing is asynchronous); one
    still open after `timeout` s is left to the test's own cleanup checks."""

    def closed():
        readers_writers = reactor.getReaders() + reactor.getWriters()
        return not any(isinstance(s, tcp.Connection) for s in readers_writers)

    try:
        await until(closed, timeout, "the TCP connections to close", interval=0.005)
    except AssertionError:
        pass


class _TrackingSite(server.Site):
    """A Site that counts the connections it accepted and can abort those it still has."""

    def __init__(self, resource):
        super().__init__(resource)
        self.connections = set()
        self.accepted = 0

    def buildProtocol(self, addr):
        self.accepted += 1
        protocol = super().buildProtocol(addr)
        made, lost = protocol.makeConnection, protocol.connectionLost
        self.connections.add(protocol)

        def makeConnection(transport):
            # The protocol is a wrapper that does not keep the transport: we do, to close it.
            protocol.transport = transport
            return made(transport)

        def connectionLost(reason):
            self.connections.discard(protocol)
            return lost(reason)

        protocol.makeConnection = makeConnection
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
        await maybeDeferred(self.port.stopListening)  # stopped before: None
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


def _sftp_attrs(info):
    return {
        "size": info.st_size,
        "uid": info.st_uid,
        "gid": info.st_gid,
        "permissions": info.st_mode,
        "atime": int(info.st_atime),
        "mtime": int(info.st_mtime),
    }


def _apply_attrs(path, attrs):
    if "permissions" in attrs:
        os.chmod(path, stat.S_IMODE(attrs["permissions"]))
    if "atime" in attrs and "mtime" in attrs:
        os.utime(path, (attrs["atime"], attrs["mtime"]))


def _sftp_call(function, *args):
    """Run C{function}, turning C{OSError} into the matching C{SFTPError}."""
    try:
        return function(*args)
    except FileNotFoundError as exc:
        raise filetransfer.SFTPError(filetransfer.FX_NO_SUCH_FILE, exc.strerror)
    except PermissionError as exc:
        raise filetransfer.SFTPError(filetransfer.FX_PERMISSION_DENIED, exc.strerror)
    except OSError as exc:
        raise filetransfer.SFTPError(filetransfer.FX_FAILURE, exc.strerror or str(exc))


@implementer(filetransfer.ISFTPFile)
class _SFTPFile:
    def __init__(self, server, path, flags):
        self.server = server
        self.path = path
        self.stall = os.path.basename(path) in server.stalled_names
        mode = os.O_RDONLY
        if flags & filetransfer.FXF_WRITE:
            mode = os.O_RDWR if flags & filetransfer.FXF_READ else os.O_WRONLY
        for sftp_flag, os_flag in (
            (filetransfer.FXF_APPEND, os.O_APPEND),
            (filetransfer.FXF_CREAT, os.O_CREAT),
            (filetransfer.FXF_TRUNC, os.O_TRUNC),
            (filetransfer.FXF_EXCL, os.O_EXCL),
        ):
            if flags & sftp_flag:
                mode |= os_flag
        self.fd = _sftp_call(os.open, path, mode, 0o644)
        self.first_write = None
        self.written = 0
        self.writing = bool(flags & filetransfer.FXF_WRITE)
        if self.writing:
            server.sftp.writing += 1
            server.sftp.most_writing = max(server.sftp.most_writing, server.sftp.writing)

    def readChunk(self, offset, length):
        if self.stall and offset > 0:
            return Deferred()
        data = _sftp_call(os.pread, self.fd, length, offset)
        if not data:
            raise EOFError()
        return data

    def writeChunk(self, offset, data):
        stall = self.server.sftp.stall_writes_from
        if stall is not None and offset >= stall:
            return Deferred()  # never answered
        if self.first_write is None:
            self.first_write = offset
        _sftp_call(os.pwrite, self.fd, data, offset)
        self.written += len(data)

    def getAttrs(self):
        return _sftp_attrs(_sftp_call(os.fstat, self.fd))

    def setAttrs(self, attrs):
        _apply_attrs(self.path, attrs)

    def close(self):
        os.close(self.fd)
        if self.writing:
            self.server.sftp.writing -= 1
        if self.first_write is not None:
            self.server.sftp.writes.append(
                (os.path.basename(self.path), self.first_write, self.written)
            )


class _SFTPDirectory:
    def __init__(self, path):
        self.path = path
        self.names = iter(sorted(_sftp_call(os.listdir, path)))

    def __iter__(self):
        return self

    def __next__(self):
        name = next(self.names)
        info = os.lstat(os.path.join(self.path, name))
        return name.encode(), lsLine(name, info).encode(), _sftp_attrs(info)

    def close(self):
        pass


@implementer(filetransfer.ISFTPServer)
class _RootedSFTPServer:
    """SFTP over one directory: paths are resolved below it and cannot leave it."""

    def __init__(self, avatar):
        self.root = avatar.root
        self.stalled_names = avatar.stalled_names
        self.sftp = avatar.sftp  # the SFTPServer: its writes and stall_writes_from

    def _path(self, path):
        relative = posixpath.normpath("/" + path.decode()).lstrip("/")
        return os.path.join(self.root, relative)

    def gotVersion(self, otherVersion, extData):
        return {}

    def openFile(self, filename, flags, attrs):
        return _SFTPFile(self, self._path(filename), flags)

    def removeFile(self, filename):
        _sftp_call(os.remove, self._path(filename))

    def renameFile(self, oldpath, newpath):
        # Like OpenSSH's SFTP v3 rename: an existing target is an error.
        new = self._path(newpath)
        if os.path.lexists(new):
            raise filetransfer.SFTPError(filetransfer.FX_FAILURE, "target exists")
        _sftp_call(os.rename, self._path(oldpath), new)

    def makeDirectory(self, path, attrs):
        _sftp_call(os.mkdir, self._path(path))

    def removeDirectory(self, path):
        _sftp_call(os.rmdir, self._path(path))

    def openDirectory(self, path):
        return _SFTPDirectory(self._path(path))

    def getAttrs(self, path, followLinks):
        get = os.stat if followLinks else os.lstat
        return _sftp_attrs(_sftp_call(get, self._path(path)))

    def setAttrs(self, path, attrs):
        _sftp_call(_apply_attrs, self._path(path), attrs)

    def readLink(self, path):
        return _sftp_call(os.readlink, self._path(path)).encode()

    def makeLink(self, linkPath, targetPath):
        # As OpenSSH's server reads SSH_FXP_SYMLINK: the first path is the link's target.
        _sftp_call(os.symlink, linkPath.decode(), self._path(targetPath))

    def realPath(self, path):
        return ("/" + posixpath.normpath("/" + path.decode()).lstrip("/")).encode()

    def extendedRequest(self, extendedName, extendedData):
        raise NotImplementedError()


class _SFTPAvatar(avatar.ConchUser):
    def __init__(self, root, stalled_names, sftp):
        super().__init__()
        self.root = root
        self.stalled_names = stalled_names
        self.sftp = sftp
        self.channelLookup[b"session"] = session.SSHSession
        self.subsystemLookup[b"sftp"] = filetransfer.FileTransferServer

    def logout(self):
        pass


components.registerAdapter(_RootedSFTPServer, _SFTPAvatar, filetransfer.ISFTPServer)


@implementer(IRealm)
class _SFTPRealm:
    def __init__(self, root, stalled_names, sftp):
        self.root = root
        self.stalled_names = stalled_names
        self.sftp = sftp

    def requestAvatar(self, avatarId, mind, *interfaces):
        user = _SFTPAvatar(self.root, self.stalled_names, self.sftp)
        return interfaces[0], user, user.logout


class _QuickUserAuth(userauth.SSHUserAuthServer):
    """No delay after a wrong password: the tests need not wait."""

    passwordDelay = 0


class _TrackingSSHFactory(factory.SSHFactory):
    def __init__(self):
        self.connections = set()
        self.accepted = 0

    def buildProtocol(self, addr):
        self.accepted += 1
        protocol = super().buildProtocol(addr)
        lost = protocol.connectionLost
        self.connections.add(protocol)

        def connectionLost(reason):
            self.connections.discard(protocol)
            return lost(reason)

        protocol.connectionLost = connectionLost
        return protocol


_KEYS = {}


def ssh_key(name):
    """An ed25519 key made once per test run and kept under C{name}."""
    if name not in _KEYS:
        _KEYS[name] = keys.Key(ed25519.Ed25519PrivateKey.generate())
    return _KEYS[name]


class SFTPServer:
    """
    A conch SFTP server on 127.0.0.1 over C{root}: user C{user} logs in with C{password} or
    with the key L{ssh_key}C{("client")}. Reads of files named in C{stalled_names} are never
    answered past their first chunk; writes at or past offset C{stall_writes_from} (when
    set) are never answered. Each file handle closed after writes is listed in C{writes}:
    C{(name, offset of its first write, bytes written)}; C{most_writing} is the most
    handles open for writing at once.
    """

    def __init__(self, root, user="bob", password="secret", stalled_names=()):
        self.root = root
        self.user = user
        self.writes = []
        self.stall_writes_from = None
        self.writing = self.most_writing = 0
        self.host_key = ssh_key("host")
        checkers = [
            InMemoryUsernamePasswordDatabaseDontUse(**{user: password.encode()}),
            SSHPublicKeyChecker(InMemorySSHKeyDB({user.encode(): [ssh_key("client").public()]})),
        ]
        self.factory = _TrackingSSHFactory()
        self.factory.portal = Portal(_SFTPRealm(root, set(stalled_names), self), checkers)
        self.factory.publicKeys = {b"ssh-ed25519": self.host_key.public()}
        self.factory.privateKeys = {b"ssh-ed25519": self.host_key}
        self.factory.services = dict(self.factory.services)
        self.factory.services[b"ssh-userauth"] = _QuickUserAuth
        self.port = None

    def start(self):
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.url = f"sftp://{self.user}@127.0.0.1:{self.port.getHost().port}"
        return self

    def known_hosts_line(self, key=None):
        """A known_hosts line for this server (with another C{key} to fake a change)."""
        key = (key or self.host_key).public().toString("openssh").decode()
        return f"[127.0.0.1]:{self.port.getHost().port} {key}\n"

    def write_client_key(self, path):
        """Write the client's private key to C{path} (mode 0600); returns C{path}."""
        write_file(path, ssh_key("client").toString("openssh"))
        os.chmod(path, 0o600)
        return path

    async def stop(self):
        await maybeDeferred(self.port.stopListening)  # stopped before: None
        for protocol in list(self.factory.connections):
            protocol.transport.abortConnection()
        await settle()


def start_sftp(testcase, root, **kwargs):
    """A started L{SFTPServer}, stopped when C{testcase} is cleaned up."""
    sftp_server = SFTPServer(root, **kwargs).start()
    testcase.addCleanup(lambda: Deferred.fromCoroutine(sftp_server.stop()))
    return sftp_server


@implementer(ftp.IReadFile)
class _StallingReader:
    """Sends some bytes, then nothing, forever."""

    def send(self, consumer):
        consumer.write(b"s" * 50000)
        return Deferred()


class _FTPShell(ftp.FTPShell):
    def __init__(self, root, stalled_names):
        super().__init__(root)
        self.stalled_names = stalled_names
        self.restart_at = 0  # set by REST, for the next RETR

    def openForWriting(self, path):
        """As twisted's, but after C{REST n} the file is kept and written from offset n."""
        offset, self.restart_at = self.restart_at, 0
        if not offset:
            return super().openForWriting(path)
        target = self._path(path)
        try:
            fd = os.open(target.path, os.O_WRONLY | os.O_CREAT, 0o644)
        except OSError as e:
            return ftp.errnoToFailure(e.errno, path)
        f = os.fdopen(fd, "wb")
        f.seek(offset)
        return succeed(ftp._FileWriter(f))

    def openForReading(self, path):
        if path and path[-1] in self.stalled_names:
            return succeed(_StallingReader())
        offset, self.restart_at = self.restart_at, 0
        d = super().openForReading(path)
        d.addCallback(_EarlyClose)
        if offset:
            d.addCallback(lambda reader: (reader.fObj.seek(offset), reader)[1])
        return d


@implementer(ftp.IReadFile)
class _EarlyClose:
    """A file reader whose client may close the data connection before the end (as a client
    fetching one block of a file does): that ends the transfer, it is no error to log."""

    def __init__(self, reader):
        self.fObj = reader.fObj
        self._reader = reader

    def send(self, consumer):
        d = self._reader.send(consumer)
        d.addErrback(lambda failure: failure.trap(Exception) and None)
        return d


@implementer(IRealm)
class _FTPRealm:
    def __init__(self, root, stalled_names):
        self.root = FilePath(root)
        self.stalled_names = stalled_names

    def requestAvatar(self, avatarId, mind, *interfaces):
        for interface in interfaces:
            if interface is ftp.IFTPShell:
                return interface, _FTPShell(self.root, self.stalled_names), lambda: None
        raise NotImplementedError()


class _RestartRefused(ftp.FTPCmdError):
    def response(self):
        return "451 Append/Restart not permitted, try again"


class _Unavailable(ftp.FTPCmdError):
    def response(self):
        return "450 Requested file action not taken"


class _RestFTP(ftp.FTP):
    """twisted's FTP server plus C{REST} (a RETR or STOR starting at an offset), each offset
    asked for kept in the factory's C{restarts}, and the offset of each C{STOR} in C{stores}.
    Without the factory's C{store_rest}, a STOR after REST is refused as ProFTPD does by
    default (451)."""

    FEATURES = ftp.FTP.FEATURES + ["REST STREAM"]

    def ftp_STOR(self, path):
        factory = self.factory
        offset = self.shell.restart_at if self.shell is not None else 0
        if offset and not factory.store_rest:
            self.shell.restart_at = 0
            return fail(_RestartRefused())
        if factory.refuse_stores_after is not None \
                and len(factory.stores) >= factory.refuse_stores_after:
            self.shell.restart_at = 0
            return fail(_Unavailable())
        factory.stores.append((path, offset))
        factory.storing += 1
        factory.most_storing = max(factory.most_storing, factory.storing)

        def ended(result):
            factory.storing -= 1
            return result

        return defer.maybeDeferred(super().ftp_STOR, path).addBoth(ended)

    def ftp_REST(self, value):
        if not value.isdigit():
            return fail(ftp.CmdSyntaxError(value))
        self.shell.restart_at = int(value)
        self.factory.restarts.append(int(value))
        return (ftp.REQ_FILE_ACTN_PENDING_FURTHER_INFO,)


class _MLSDFTP(_RestFTP):
    """twisted's FTP server plus C{MLSD} (RFC 3659), listed in C{FEAT}."""

    FEATURES = _RestFTP.FEATURES + ["MLSD"]

    def ftp_MLSD(self, path=""):
        if self.dtpInstance is None or not self.dtpInstance.isConnected:
            return fail(ftp.BadCmdSequenceError("must send PASV before MLSD"))
        try:
            segments = ftp.toSegments(self.workingDirectory, path)
        except ftp.InvalidPath:
            return fail(ftp.FileNotFoundError(path))
        directory = self.shell.filesystemRoot.descendant(segments).path
        if not os.path.isdir(directory):
            return fail(ftp.FileNotFoundError(path))
        self.reply(ftp.DATA_CNX_ALREADY_OPEN_START_XFR)
        for name in sorted(os.listdir(directory)):
            info = os.lstat(os.path.join(directory, name))
            kind = "dir" if stat.S_ISDIR(info.st_mode) else "file"
            modify = time.strftime("%Y%m%d%H%M%S", time.gmtime(info.st_mtime))
            facts = f"type={kind};size={info.st_size};modify={modify};UNIX.mode=0{stat.S_IMODE(info.st_mode):o};"
            self.dtpInstance.sendLine(f"{facts} {name}".encode())
        self.dtpInstance.transport.loseConnection()
        return succeed((ftp.TXFR_COMPLETE_OK,))


class _TrackingFTPFactory(ftp.FTPFactory):
    protocol = _RestFTP

    def __init__(self, portal):
        super().__init__(portal)
        self.connections = set()
        self.restarts = []
        self.stores = []
        self.store_rest = True
        self.refuse_stores_after = None  # then every STOR is refused (450)
        self.storing = self.most_storing = 0

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        if protocol is not None:
            lost = protocol.connectionLost
            inner = getattr(protocol, "wrappedProtocol", protocol)
            self.connections.add(protocol)

            def connectionLost(reason):
                self.connections.discard(protocol)
                result = lost(reason)
                # A STOR whose data connection ends after the control connection was cut
                # would reply (rearm the idle timeout, read on) on the lost connection.
                inner.reply = inner.setTimeout = inner.resumeProducing = lambda *args: None
                return result

            protocol.connectionLost = connectionLost
        return protocol


class FTPServer:
    """
    A twisted FTP server on 127.0.0.1 over C{root}: user C{user} logs in with C{password};
    anonymous logins are refused. Files named in C{stalled_names} send 50000 bytes, then stall.
    With C{mlsd=True} the server also answers C{MLSD}; it answers C{REST} unless C{rest=False}
    (twisted's own server has no REST); with C{store_rest=False} it refuses a STOR after REST
    (451, as ProFTPD does by default).
    """

    def __init__(
        self, root, user="carol", password="secret", stalled_names=(), mlsd=False, rest=True,
        store_rest=True,
    ):
        checker = InMemoryUsernamePasswordDatabaseDontUse()
        # twisted's FTP server hands the checker text, not bytes.
        checker.addUser(user, password)
        portal = Portal(_FTPRealm(root, set(stalled_names)), [checker])
        self.factory = _TrackingFTPFactory(portal)
        self.factory.allowAnonymous = False
        self.factory.store_rest = store_rest
        if mlsd:
            self.factory.protocol = _MLSDFTP
        elif not rest:
            self.factory.protocol = ftp.FTP
        self.user = user
        self.port = None

    def start(self):
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.url = f"ftp://{self.user}@127.0.0.1:{self.port.getHost().port}"
        return self

    async def stop(self):
        await maybeDeferred(self.port.stopListening)  # stopped before: None
        for protocol in list(self.factory.connections):
            protocol.transport.abortConnection()
        await settle()


def start_ftp(testcase, root, **kwargs):
    """A started L{FTPServer}, stopped when C{testcase} is cleaned up."""
    ftp_server = FTPServer(root, **kwargs).start()
    testcase.addCleanup(lambda: Deferred.fromCoroutine(ftp_server.stop()))
    return ftp_server
