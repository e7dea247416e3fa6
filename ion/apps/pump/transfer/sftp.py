"""The C{sftp} scheme: twisted.conch's SSH client and SFTP (version 3) file transfer client.

One SSH connection per operation, or kept open between operations for C{dead_time} seconds
(L{ion.apps.pump.transfer.sessions}). The server's host key must be in the known_hosts file
(C{known_hosts=}, default C{~/.ssh/known_hosts}; entries for a port other than 22 are written
C{[host]:port}, as OpenSSH does): an unknown or changed key is refused with
L{ServerNotTrusted} before any credential is sent. Authentication tries the C{ssh_key} of the
credentials file first, then the password (also answering keyboard-interactive prompts with
it), each once.

A partitioned transfer reads each block on a connection of its own (L{fetch_range}); a put in
blocks writes each at its offset into one temporary file, likewise (L{store_range}).

Reads and writes are pipelined: at most C{WINDOW} requests of C{CHUNK_SIZE} bytes are in
flight, so memory stays bounded whatever the file size. A put writes C{.<name>.<random>.inflight}
in the target directory, sets mode and mtime, and renames it onto the target (with the
C{posix-rename@openssh.com} extension when the server offers it, else remove-then-rename).
"""

import functools
import os
import posixpath
import stat
from collections import deque

from twisted.conch.client.knownhosts import KnownHostsFile
from twisted.conch.error import HostKeyChanged
from twisted.conch.ssh import channel, common, connection, filetransfer, keys, transport, userauth
from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath

from ion.apps.pump.transfer.errors import (
    AuthFailed,
    BadRequest,
    ConnectionFailed,
    LocalFailure,
    NotFound,
    ServerNotTrusted,
    SizeMismatch,
    TransferError,
    TransferTimeout,
)
from ion.apps.pump.transfer.inflight import inflight_name
from ion.apps.pump.transfer.limits import IdleTimer, cancellable
from ion.apps.pump.transfer.outgoing import store_or_remove_left
from ion.apps.pump.transfer.pacing import wait
from ion.apps.pump.transfer.sessions import borrowed
from ion.apps.pump.transfer.policy import connect
from ion.apps.pump.transfer.results import Entry, Listing, entry_type

CHUNK_SIZE = 32 * 1024
WINDOW = 16
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"
POSIX_RENAME = b"posix-rename@openssh.com"


class _Session:
    """One SSH connection carrying one SFTP channel, and what went wrong with it."""

    def __init__(self, reactor, location, settings):
        self.reactor = reactor
        self.location = location
        self.settings = settings
        self.ready = Deferred()
        self.closed = Deferred()
        self.failure = None
        self.transport = None
        self.connected = False
        self.key = _load_key(location) if location.ssh_key else None
        self.server_extensions = {}
        self.client = None
        timeouts = settings.timeouts
        self.timer = IdleTimer(
            reactor, timeouts.idle, self.abort, first=timeouts.connect + timeouts.idle
        )

    def usable(self):
        """Whether the session may carry another transfer (kept open, nothing failed)."""
        return self.connected and self.failure is None and self.client is not None

    def rearm(self, settings):
        """Start another transfer on this kept session: its settings and a new idle timer."""
        self.settings = settings
        self.timer = IdleTimer(self.reactor, settings.timeouts.idle, self.abort)

    async def logout(self):
        """End the session (SSH disconnect)."""
        await self.close()

    def fail(self, error):
        """Record the first error that explains the end of the connection."""
        if self.failure is None:
            self.failure = error
        if not self.ready.called:
            self.ready.errback(error)

    def abort(self):
        if self.transport is not None:
            self.transport.transport.abortConnection()

    def lost(self, reason):
        """Called first thing when the connection is gone: explain it before anybody asks."""
        self.connected = False
        self.fail(self._lost_error(reason))
        self.timer.stop()

    def _lost_error(self, reason):
        shown = self.location.shown
        if self.timer.expired:
            if self.ready.called:
                return TransferTimeout(f"{shown}: no data for {self.settings.timeouts.idle:g} s")
            timeouts = self.settings.timeouts
            return TransferTimeout(
                f"{shown}: SSH session not ready within {timeouts.connect + timeouts.idle:g} s"
            )
        return ConnectionFailed(f"{shown}: connection lost ({reason.getErrorMessage()})")

    async def close(self):
        if self.connected:
            self.transport.loseConnection()
            await self.closed


class _ClientTransport(transport.SSHClientTransport):
    def __init__(self, session):
        self.session = session

    def connectionMade(self):
        self.session.transport = self
        self.session.connected = True
        super().connectionMade()

    def dataReceived(self, data):
        self.session.timer.touch()
        super().dataReceived(data)

    def verifyHostKey(self, hostKey, fingerprint):
        location = self.session.location
        path = os.path.expanduser(self.session.settings.known_hosts or DEFAULT_KNOWN_HOSTS)
        name = location.host if location.port == 22 else f"[{location.host}]:{location.port}"
        try:
            key = keys.Key.fromString(hostKey)
            known = KnownHostsFile.fromPath(FilePath(path)).hasHostKey(name.encode(), key)
        except HostKeyChanged as changed:
            error = ServerNotTrusted(
                f"{location.shown}: host key of {name} does not match the one in {path} "
                f"(line {changed.lineno}): refusing to connect"
            )
        except (keys.BadKeyError, OSError) as exc:
            error = ServerNotTrusted(f"{location.shown}: cannot check host key: {exc}")
        else:
            if known:
                return succeed(True)
            error = ServerNotTrusted(
                f"{location.shown}: host key of {name} ({key.sshType().decode()} "
                f"{fingerprint.decode() if isinstance(fingerprint, bytes) else fingerprint}) "
                f"is not in {path}: refusing to connect; add it there once verified"
            )
        self.session.fail(error)
        return fail(error)

    def connectionSecure(self):
        location = self.session.location
        self.requestService(_UserAuth(location, self.session.key, _Connection(self.session)))

    def sendDisconnect(self, reason, desc):
        if reason == transport.DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE:
            self.session.fail(
                AuthFailed(
                    f"{self.session.location.shown}: server refused the login of user "
                    f"{self.session.location.user!r}"
                )
            )
        super().sendDisconnect(reason, desc)

    def receiveError(self, reasonCode, description):
        text = description.decode("utf-8", "replace")
        self.session.fail(
            ConnectionFailed(f"{self.session.location.shown}: server disconnected: {text}")
        )

    def connectionLost(self, reason):
        self.session.lost(reason)
        try:
            super().connectionLost(reason)
        finally:
            self.session.closed.callback(None)


class _UserAuth(userauth.SSHUserAuthClient):
    """Offers the key, then the password, each once."""

    def __init__(self, location, key, instance):
        super().__init__(location.user.encode("utf-8"), instance)
        self._password = location.password
        self._key = key
        self._offered = set()

    def _once(self, what):
        if what in self._offered:
            return False
        self._offered.add(what)
        return True

    def getPublicKey(self):
        if self._key is None or not self._once("key"):
            return None
        return self._key.public()

    def getPrivateKey(self):
        return succeed(self._key)

    def getPassword(self, prompt=None):
        if self._password is None or not self._once("password"):
            return None
        return succeed(self._password.encode("utf-8"))

    def getGenericAnswers(self, name, instruction, prompts):
        if self._password is None or not self._once("keyboard-interactive"):
            return fail(AuthFailed("no more answers"))
        return succeed([self._password.encode("utf-8") for _ in prompts])


def _load_key(location):
    try:
        return keys.Key.fromFile(location.ssh_key)
    except OSError as exc:
        raise LocalFailure.from_os_error(f"cannot read ssh_key {location.ssh_key}", exc) from None
    except (keys.BadKeyError, keys.EncryptedKeyError) as exc:
        raise BadRequest(
            f"ssh_key {location.ssh_key} is not a usable private key ({exc}); keys with a "
            "passphrase are not supported"
        ) from None


class _Connection(connection.SSHConnection):
    def __init__(self, session):
        super().__init__()
        self.session = session

    def serviceStarted(self):
        super().serviceStarted()
        self.openChannel(_SFTPChannel(self.session, conn=self))


class _Client(filetransfer.FileTransferClient):
    def __init__(self, session):
        super().__init__()
        self.session = session

    def gotServerVersion(self, serverVersion, extData):
        self.session.server_extensions = extData
        if not self.session.ready.called:
            self.session.ready.callback(self)


class _SFTPChannel(channel.SSHChannel):
    name = b"session"

    def __init__(self, session, **kwargs):
        super().__init__(localWindow=4 * 1024 * 1024, **kwargs)
        self.session = session
        self.client = None

    def openFailed(self, reason):
        self.session.fail(
            ConnectionFailed(f"{self.session.location.shown}: server refused a session: {reason}")
        )

    async def _start(self):
        try:
            await self.conn.sendRequest(self, b"subsystem", common.NS(b"sftp"), wantReply=True)
        except Exception:
            self.session.fail(
                ConnectionFailed(f"{self.session.location.shown}: server refused sftp")
            )
            self.loseConnection()
            return
        self.client = _Client(self.session)
        self.client.makeConnection(self)

    def channelOpen(self, specificData):
        Deferred.fromCoroutine(self._start())

    def dataReceived(self, data):
        if self.client is not None:
            self.client.dataReceived(data)

    def closed(self):
        if self.client is not None:
            self.client.connectionLost(Failure(net_error.ConnectionDone()))
        if self.session.connected:
            self.session.transport.loseConnection()


def _sftp_error(location, exc, path):
    shown = location.shown
    code = exc.code
    if code == filetransfer.FX_NO_SUCH_FILE:
        return NotFound(f"{shown}: no such file or directory: {path}")
    if code == filetransfer.FX_PERMISSION_DENIED:
        return AuthFailed(f"{shown}: permission denied: {path}")
    if code in (filetransfer.FX_NO_CONNECTION, filetransfer.FX_CONNECTION_LOST):
        return ConnectionFailed(f"{shown}: {exc.message}")
    return ConnectionFailed(f"{shown}: server failed on {path}: {exc.message}")


async def _with_session(reactor, location, settings, work):
    """Connect (or take a kept session: L{ion.apps.pump.transfer.sessions}), run
    C{work(client, session)}, then keep the session or disconnect; errors become
    L{TransferError}s."""
    if not location.user:
        raise BadRequest(f"{location.shown}: no user name (give it in the URL or credentials)")
    new = functools.partial(_Session, reactor, location, settings)
    async with borrowed(location, settings, new) as session:
        try:
            if session.client is None:
                await connect(reactor, location, settings, _ClientTransport(session))
                session.client = await cancellable(session.ready)
            return await work(session.client, session)
        except (CancelledError, TransferError):
            raise
        except filetransfer.SFTPError as exc:
            raise _sftp_error(location, exc, location.path) from None
        except NotImplementedError:
            raise BadRequest(f"{location.shown}: operation not supported by the server") from None
        except (net_error.ConnectionLost, net_error.ConnectionDone, EOFError):
            raise session.failure or ConnectionFailed(
                f"{location.shown}: connection lost"
            ) from None


async def _drain(pending):
    """Wait out requests in flight whose answers no longer matter."""
    while pending:
        d = pending.popleft()[2]
        try:
            await d
        except CancelledError:
            raise
        except Exception:
            pass


async def _read_into(handle, sink, timer=None, offset=0, end=None):
    """Read the open file C{handle} from C{offset} to C{end} (default: its end) into C{sink},
    C{WINDOW} reads in flight (their answers wait while the sink has too much waiting for the
    disk, or while its bandwidth limit says so: then C{timer}, the idle timer, is held)."""
    pending = deque()
    try:
        while True:
            while len(pending) < WINDOW and (end is None or offset < end):
                size = CHUNK_SIZE if end is None else min(CHUNK_SIZE, end - offset)
                pending.append((offset, size, handle.readChunk(offset, size)))
                offset += size
            if not pending:
                return
            start, length, d = pending.popleft()
            try:
                data = await d
            except EOFError:
                await _drain(pending)
                return
            sink.write(data)
            if sink.backlogged:
                if timer is not None and getattr(sink, "pacing", False):
                    timer.hold()
                await sink.drained()
                if timer is not None:
                    timer.touch()
            if len(data) < length:
                # A short read (end of file, or a server with smaller reads): what is in
                # flight beyond it is useless; carry on from where this read ended.
                await _drain(pending)
                offset = start + len(data)
    finally:
        _ignore_failures(d for _, _, d in pending)


def _ignore_failures(deferreds):
    """Requests left in flight by a failure fail too (connection lost): nobody waits for them."""
    for d in deferreds:
        d.addErrback(lambda _: None)


async def fetch(reactor, location, sink, settings):
    """Stream the remote file into C{sink}; returns its C{(mtime, mode)}."""

    async def work(client, session):
        path = location.path.encode("utf-8")
        attrs = await client.getAttrs(path, followLinks=1)
        if stat.S_ISDIR(attrs.get("permissions", 0)):
            raise BadRequest(f"{location.shown}: is a directory")
        if "size" in attrs:
            sink.declare(attrs["size"])
        handle = await client.openFile(path, filetransfer.FXF_READ, {})
        try:
            await _read_into(handle, sink, session.timer)
        finally:
            if session.connected:
                await handle.close()
        mode, mtime = attrs.get("permissions"), attrs.get("mtime")
        return (
            None if mtime is None else float(mtime),
            None if mode is None else stat.S_IMODE(mode),
        )

    return await _with_session(reactor, location, settings, work)


async def fetch_range(reactor, location, sink, settings, offset, length):
    """Stream the C{length} bytes at C{offset} of the remote file into C{sink} (a block)."""

    async def work(client, session):
        handle = await client.openFile(location.path.encode("utf-8"), filetransfer.FXF_READ, {})
        try:
            await _read_into(handle, sink, session.timer, offset, offset + length)
        finally:
            if session.connected:
                await handle.close()

    await _with_session(reactor, location, settings, work)


async def listdir(reactor, location, settings, unless=None):
    """The entries of the remote directory; C{unless} is ignored (no digest here)."""

    async def work(client, session):
        directory = await client.openDirectory(location.path.encode("utf-8"))
        entries = Listing()
        try:
            while True:
                try:
                    names = await directory.read()
                except EOFError:
                    break
                for name, long_name, attrs in names:
                    entries.bytes += len(name) + len(long_name)
                    entry = _entry(name.decode("utf-8", "surrogateescape"), attrs)
                    if entry is not None:
                        entries.append(entry)
        finally:
            await directory.close()
        return entries

    return await _with_session(reactor, location, settings, work)


def _entry(name, attrs):
    mode = attrs.get("permissions")
    mtime = attrs.get("mtime")
    mtime = None if mtime is None else float(mtime)
    if mode is None:
        return Entry(name, attrs.get("size"), mtime, None, "file")
    kind = entry_type(mode)
    if kind is None:
        return None
    size = attrs.get("size") if kind == "file" else None
    return Entry(name, size, mtime, stat.S_IMODE(mode), kind)


async def _write_from(handle, outgoing, session, offset=0):
    """Write C{outgoing} (anything with an async C{take(n)}) to the open file C{handle} from C{offset}
    on, C{WINDOW} writes in flight, at the pace of the session's bandwidth limits
    (C{settings.pacers}); each write's reply is waited for."""
    pending = deque()
    pacers = session.settings.pacers
    try:
        while data := await outgoing.take(CHUNK_SIZE):
            pending.append(handle.writeChunk(offset, data))
            offset += len(data)
            if len(pending) >= WINDOW:
                await pending.popleft()
            if pacers:
                for pacer in pacers:
                    pacer.spend(len(data))
                session.timer.hold()
                await wait(session.reactor, pacers)
                session.timer.touch()
        while pending:
            await pending.popleft()
    finally:
        _ignore_failures(pending)


async def _rename(client, session, old, new):
    if POSIX_RENAME in session.server_extensions:
        await client.extendedRequest(POSIX_RENAME, common.NS(old) + common.NS(new))
        return
    try:
        await client.renameFile(old, new)
    except filetransfer.SFTPError:
        # SFTP v3 rename refuses an existing target: replace it (not atomic, but brief).
        try:
            await client.removeFile(new)
        except filetransfer.SFTPError:
            pass
        await client.renameFile(old, new)


async def _open_new(client, location, temp, flags):
    """Open C{temp} with C{flags} (creating it), making its directory when missing."""
    directory = posixpath.dirname(location.path) or "/"
    try:
        return await client.openFile(temp, flags, {})
    except filetransfer.SFTPError as exc:
        if exc.code != filetransfer.FX_NO_SUCH_FILE:
            raise _sftp_error(location, exc, directory) from None
    await _makedirs(client, directory)
    try:
        return await client.openFile(temp, flags, {})
    except filetransfer.SFTPError as exc:
        raise _sftp_error(location, exc, directory) from None


async def _commit(client, session, location, temp, outgoing, size):
    """Mode and mtime on C{temp}, renamed onto the target, whose size must be C{size}."""
    path = location.path
    mtime = int(outgoing.mtime)
    attrs = {"permissions": outgoing.mode, "atime": mtime, "mtime": mtime}
    await client.setAttrs(temp, attrs)
    await _rename(client, session, temp, path.encode("utf-8"))
    arrived = (await client.getAttrs(path.encode("utf-8"))).get("size")
    if arrived is not None and arrived != size:
        raise SizeMismatch(f"{location.shown}: {arrived} bytes arrived of {size}")


async def store(reactor, outgoing, location, settings):
    """Send C{outgoing} to a temporary name beside the target, then rename it into place. A
    failed send removes its temporary file: on its session, or on a new one when the session
    is lost (not when cancelled: that must end at once); a retry sends to a new name."""
    temp = inflight_name(location.path)
    left = []  # the temporary file, while a failure may leave it behind

    async def work(client, session):
        name = temp.encode("utf-8")
        flags = filetransfer.FXF_WRITE | filetransfer.FXF_CREAT | filetransfer.FXF_EXCL
        handle = await _open_new(client, location, name, flags)
        left.append(temp)
        try:
            try:
                await _write_from(handle, outgoing, session)
            finally:
                if session.connected:
                    await handle.close()
            await _commit(client, session, location, name, outgoing, outgoing.sent)
            left.clear()
        except BaseException:
            if session.connected:
                try:
                    await client.removeFile(name)
                    left.clear()
                except filetransfer.SFTPError:
                    left.clear()  # not there (any more)
                except Exception:
                    pass
            raise

    await store_or_remove_left(
        _with_session(reactor, location, settings, work), left, store_discard, reactor,
        location, settings, temp,
    )


# A put in blocks (L{ion.apps.pump.transfer.sendblocks}): the temporary file is made (or found
# again), each block written at its offset on a session of its own, then the file committed.


async def store_begin(reactor, location, settings, temp, needed=None):
    """Make the temporary file C{temp} (a server path beside the target) of a put in blocks,
    empty, its directory made when missing; with C{needed}, keep it instead when it is there
    with at least C{needed} bytes (blocks sent before). Returns whether it was kept."""

    async def work(client, session):
        name = temp.encode("utf-8")
        if needed is not None:
            try:
                size = (await client.getAttrs(name)).get("size")
            except filetransfer.SFTPError:
                size = -1
            if size is None or size >= needed:
                return True
        flags = filetransfer.FXF_WRITE | filetransfer.FXF_CREAT | filetransfer.FXF_TRUNC
        handle = await _open_new(client, location, name, flags)
        await handle.close()
        return False

    return await _with_session(reactor, location, settings, work)


async def store_range(reactor, location, settings, temp, source, offset):
    """Write C{source} (C{read(n)}: a block's bytes) into C{temp} from C{offset}; done once
    the server acknowledged every write and the close."""

    async def work(client, session):
        name = temp.encode("utf-8")
        try:
            handle = await client.openFile(name, filetransfer.FXF_WRITE, {})
        except filetransfer.SFTPError as exc:
            raise _sftp_error(location, exc, temp) from None
        try:
            await _write_from(handle, source, session, offset)
        finally:
            if session.connected:
                await handle.close()

    await _with_session(reactor, location, settings, work)


async def store_end(reactor, location, settings, temp, outgoing):
    """Commit the temporary file C{temp} of a put in blocks (mode, mtime, rename, size)."""

    async def work(client, session):
        await _commit(client, session, location, temp.encode("utf-8"), outgoing, outgoing.size)

    await _with_session(reactor, location, settings, work)


async def store_discard(reactor, location, settings, temp):
    """Remove the temporary file C{temp} of a put in blocks (gone already: fine)."""

    async def work(client, session):
        try:
            await client.removeFile(temp.encode("utf-8"))
        except filetransfer.SFTPError:
            pass

    await _with_session(reactor, location, settings, work)


async def _makedirs(client, directory):
    """Make each directory of the path C{directory} (failures are the next request's)."""
    parts = [p for p in directory.split("/") if p]
    for depth in range(1, len(parts) + 1):
        name = "/" * directory.startswith("/") + "/".join(parts[:depth])
        try:
            await client.makeDirectory(name.encode("utf-8"), {})
        except filetransfer.SFTPError:
            pass


async def operate(reactor, location, settings, op, old=None, target=None):
    """The file operation C{op} on the server at C{location}: delete, rmdir, mkdir, rename
    (from the path C{old}) or link (to C{target}); a phrase saying what was done, or None for
    a rename whose old file is missing."""

    async def work(client, session):
        path = location.path.encode("utf-8")
        try:
            if op == "mkdir":
                await _makedirs(client, location.path)
                return "directory made"
            if op in ("delete", "rmdir"):
                await (client.removeFile if op == "delete" else client.removeDirectory)(path)
                return "removed"
            await _makedirs(client, posixpath.dirname(location.path))
            if op == "rename":
                await _rename(client, session, old.encode("utf-8"), path)
                return f"renamed from {old}"
        except filetransfer.SFTPError as exc:
            if exc.code != filetransfer.FX_NO_SUCH_FILE:
                raise
            return None if op == "rename" else "already gone"
        if op == "link":
            try:
                await client.removeFile(path)
            except filetransfer.SFTPError:
                pass
            # OpenSSH reads SSH_FXP_SYMLINK's paths the other way round from the draft
            # (target first), and the servers met are OpenSSH's: sent in its order.
            await client.makeLink(target.encode("utf-8"), path)
            return f"linked to {target}"
        raise BadRequest(f"{location.shown}: sftp has no request for a {op}")

    return await _with_session(reactor, location, settings, work)
