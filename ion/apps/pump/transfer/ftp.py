"""The C{ftp} scheme: twisted.protocols.ftp's client in passive mode, binary type.

One control connection per operation (or kept open between operations for C{dead_time} seconds, then
C{QUIT}: L{ion.apps.pump.transfer.sessions}), logged in as the URL's or credentials file's user
(C{anonymous} when none is given). A get asks C{SIZE} and C{MDTM} (when the server answers them) for
the announced size and mtime, then streams C{RETR} to disk; a block of a partitioned transfer is
C{REST} then C{RETR}, its data connection closed at the block's end (a server answering REST with
500-504 cannot serve blocks: L{RangeIgnored}). A put sends C{STOR} to C{.<name>.<random>.inflight}
beside the target, then renames it with C{RNFR}/C{RNTO} (removing an existing target first if the
server refuses to replace it); the mtime follows with C{MFMT} when the server lists it in C{FEAT}. A
put in blocks (L{ion.apps.pump.transfer.sendblocks}) sends block 0 as a C{STOR}, then each other
block as C{REST <offset>} + C{STOR} of one temporary file, on a session each (L{store_range}). A
list uses C{MLSD} when C{FEAT} lists it, else C{LIST} (see L{ion.apps.pump.transfer.listings} for
the formats read).

Passive data connections go to the control connection's peer address, whatever address the
PASV reply names.

Reply codes: 530 is L{AuthFailed}, 550 L{NotFound}, other 4xx replies L{ConnectionFailed}
(transient), other 5xx L{Refused} (permanent).
"""

import calendar
import functools
import posixpath
import time

from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPullProducer
from twisted.protocols.ftp import CommandFailed, FTPClient, FTPError
from twisted.python.failure import Failure
from zope.interface import implementer

from ion.apps.pump.transfer.errors import (
    AuthFailed,
    BadRequest,
    ConnectionFailed,
    NotFound,
    RangeIgnored,
    Refused,
    SizeMismatch,
    TransferError,
    TransferTimeout,
)
from ion.apps.pump.transfer.inflight import SinkReceiver, inflight_name
from ion.apps.pump.transfer.limits import IdleTimer
from ion.apps.pump.transfer.policy import connect
from ion.apps.pump.transfer.listings import ListingBuffer, parse_list_line, parse_mlsd_line
from ion.apps.pump.transfer.outgoing import ProgressReader, store_or_remove_left
from ion.apps.pump.transfer.results import Listing
from ion.apps.pump.transfer.sessions import borrowed


def _wire(text, what="the path"):
    """C{text} as the client sends it: UTF-8 bytes (the client writes latin-1 text)."""
    if "\r" in text or "\n" in text:
        # The text itself is left out: it may be a password.
        raise BadRequest(f"{what} holds a line break, which FTP cannot send")
    return text.encode("utf-8").decode("latin-1")


class _Session:
    """The control connection, the current data connection, and the idle timer over both."""

    def __init__(self, reactor, location, settings):
        self.reactor = reactor
        self.location = location
        self.settings = settings
        self.data_transport = None
        self.connected = False
        self.logged_in = False
        self.closed = Deferred()
        timeouts = settings.timeouts
        self.timer = IdleTimer(
            reactor, timeouts.idle, self.abort, first=timeouts.connect + timeouts.idle
        )
        self.control = _Control(self)

    def abort(self):
        for transport in (self.control.transport, self.data_transport):
            if transport is not None:
                transport.abortConnection()

    def connect_data(self, host, port, factory):
        # The PASV reply's address is the server's say: data goes to the control connection's
        # peer, the address that was checked (see ion.apps.pump.transfer.policy).
        peer = self.control.transport.getPeer().host
        return self.reactor.connectTCP(peer, port, factory, timeout=self.settings.timeouts.connect)

    async def close(self):
        if self.control.transport is not None and not self.closed.called:
            self.control.transport.loseConnection()
            await self.closed

    def usable(self):
        """Whether the session may carry another transfer (logged in, still connected)."""
        return self.logged_in and self.connected and not self.closed.called

    def rearm(self, settings):
        """Start another transfer on this kept session: its settings and a new idle timer."""
        self.settings = settings
        self.data_transport = None
        self.timer = IdleTimer(self.reactor, settings.timeouts.idle, self.abort)

    async def logout(self):
        """Say C{QUIT} and close the control connection."""
        if self.usable():
            self.control.quit().addErrback(lambda _: None)
        await self.close()


class _Control(FTPClient):
    """An FTP client that logs in when told to, and reports activity and loss to its session."""

    def __init__(self, session):
        self.session = session
        super().__init__(passive=1)
        self.connectFactory = session.connect_data

    def queueLogin(self, username, password):
        """Logging in is done by L{_login}, which can tell a refused login from other errors."""

    def connectionMade(self):
        self.session.connected = True
        super().connectionMade()

    def lineReceived(self, line):
        self.session.timer.touch()
        super().lineReceived(line)

    def fail(self, error):
        # The client gives up on the connection: commands queued from now on would wait forever.
        self.session.connected = False
        return super().fail(error)

    def connectionLost(self, reason):
        self.session.connected = False
        try:
            super().connectionLost(reason)
        finally:
            # The timer runs on until the operation ends (a data connection may outlive this).
            self.session.closed.callback(None)


class _Receiver(SinkReceiver):
    """Hands a data connection's bytes to C{sink}."""

    def __init__(self, session, sink):
        super().__init__(sink, session.timer)
        self.session = session

    def connectionMade(self):
        self.session.data_transport = self.transport

    async def receive(self, transfer):
        """Wait for the data C{transfer} (a Deferred) feeding this receiver; an error met by
        the sink (the disk, a size bound) wins over the one the connection ends with."""
        try:
            await transfer
        except Exception:
            if self.error is not None:
                raise self.error from None
            raise
        if self.error is not None:
            raise self.error


def _reply(exc):
    """The last reply line of a failed command."""
    lines = exc.args[0] if exc.args else []
    return lines[-1] if isinstance(lines, list) and lines else str(exc)


def _command_error(location, exc, what):
    reply = _reply(exc)
    text = f"{location.shown}: {what}: server replied {reply!r}"
    code = reply[:3]
    if code == "530":
        return AuthFailed(text)
    if code == "550":
        return NotFound(text)
    if code.startswith("4"):
        return ConnectionFailed(text)
    return Refused(text)


def _inner_command_failure(exc):
    """The C{CommandFailed} a C{ConnectionLost("FTP connection lost", failure)} wraps."""
    for arg in exc.args:
        value = getattr(arg, "value", None)
        if isinstance(value, CommandFailed):
            return value
    return None


async def _login(session, location):
    control = session.control
    user = location.user or "anonymous"
    password = location.password
    if password is None and user == "anonymous":
        password = "anonymous@"
    try:
        # Public commands, unlike Twisted's own login: only those fail when the connection is
        # lost (a server that never greets, cut by the idle timer, would leave them waiting).
        reply = await control.queueStringCommand("USER " + _wire(user, "the user name"))
        if reply[-1].startswith("331"):
            if password is None:
                raise AuthFailed(
                    f"{location.shown}: server asks a password for {user!r}; none in the URL "
                    "or the credentials file"
                )
            await control.queueStringCommand("PASS " + _wire(password, "the password"))
    except CommandFailed as exc:
        if _reply(exc).startswith("530"):
            raise AuthFailed(f"{location.shown}: server refused the login of user {user!r}")
        raise
    await control.queueStringCommand("TYPE I")


async def _with_session(reactor, location, settings, work):
    """Connect and log in (or take a kept session: L{ion.apps.pump.transfer.sessions}), run
    C{work(session)}, then keep the session or disconnect; errors become L{TransferError}s."""
    new = functools.partial(_Session, reactor, location, settings)
    async with borrowed(location, settings, new) as session:
        try:
            if not session.logged_in:
                await connect(reactor, location, settings, session.control)
                await _login(session, location)
                session.logged_in = True
            return await work(session)
        except (CancelledError, TransferError):
            raise
        except CommandFailed as exc:
            raise _command_error(location, exc, "command failed") from None
        except (FTPError, net_error.ConnectionLost, net_error.ConnectionDone) as exc:
            if session.timer.expired:
                raise TransferTimeout(
                    f"{location.shown}: no data for {settings.timeouts.idle:g} s"
                ) from None
            inner = _inner_command_failure(exc)
            if inner is not None:
                raise _command_error(location, inner, "command failed") from None
            raise ConnectionFailed(f"{location.shown}: connection lost") from None


async def _optional(session, command):
    """The reply to a command the server may not support, or C{None} (also when the
    connection is gone)."""
    if not session.connected:
        return None
    try:
        return await session.control.queueStringCommand(command)
    except CommandFailed:
        return None


def _mdtm(reply):
    if not reply:
        return None
    value = reply[-1][4:].strip()
    try:
        return float(calendar.timegm(time.strptime(value[:14], "%Y%m%d%H%M%S")))
    except ValueError:
        return None


async def fetch(reactor, location, sink, settings):
    """Stream C{RETR} into C{sink}; returns C{(MDTM, None)}."""

    async def work(session):
        control = session.control
        path = _wire(location.path)
        size = await _optional(session, "SIZE " + path)
        if size and size[-1][4:].strip().isdigit():
            sink.declare(int(size[-1][4:].strip()))
        mtime = _mdtm(await _optional(session, "MDTM " + path))
        receiver = _Receiver(session, sink)
        await receiver.receive(control.retrieveFile(path, receiver))
        return mtime, None

    return await _with_session(reactor, location, settings, work)


class _RangeReceiver(_Receiver):
    """Hands the first C{length} bytes of a data connection to C{sink}, then closes it;
    C{finished} fires then, or with the transfer's own end."""

    def __init__(self, session, sink, length):
        super().__init__(session, sink)
        self.remaining = length
        self.finished = Deferred()

    def dataReceived(self, data):
        if self.remaining <= 0:
            return
        data = data[: self.remaining]
        self.remaining -= len(data)
        super().dataReceived(data)
        if self.remaining == 0 and self.error is None:
            self.transport.abortConnection()
            self._finish(None)

    def _finish(self, result):
        if not self.finished.called:
            self.finished.callback(result)

    def ended(self, result):
        """The transfer's own end: its error, unless the range was complete by then."""
        if self.finished.called:
            return None
        if isinstance(result, Failure) and self.error is None:
            self.finished.errback(result)
        else:
            self._finish(None)
        return None


async def fetch_range(reactor, location, sink, settings, offset, length):
    """C{REST offset} then C{RETR}, C{length} bytes of it into C{sink} (a block); the data
    connection is closed once they are in."""

    async def work(session):
        receiver = _RangeReceiver(session, sink, length)
        transfer = session.control.retrieveFile(_wire(location.path), receiver, offset)
        transfer.addBoth(receiver.ended)
        try:
            await receiver.receive(receiver.finished)
        except CommandFailed as exc:
            # 500-504: REST not understood or not implemented (550 and others stay errors).
            if offset and _reply(exc)[:3] in ("500", "501", "502", "504"):
                raise RangeIgnored(
                    f"{location.shown}: the server does not restart transfers (REST): "
                    f"{_reply(exc)!r}"
                ) from None
            raise

    return await _with_session(reactor, location, settings, work)


async def _features(session):
    reply = await _optional(session, "FEAT") or []
    return {line.strip().split(" ")[0].upper() for line in reply[1:-1]}


def _lines(text):
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError:
        decoded = text.decode("latin-1")
    return [line.rstrip("\r") for line in decoded.split("\n") if line.strip()]


async def listdir(reactor, location, settings, unless=None):
    """The entries of the remote directory, from C{MLSD} or C{LIST}; C{unless} is ignored
    (no digest here)."""

    async def work(session):
        control = session.control
        use_mlsd = "MLSD" in await _features(session)
        buffer = ListingBuffer(f"{location.shown}: listing")
        receiver = _Receiver(session, buffer)
        command = ("MLSD " if use_mlsd else "LIST ") + _wire(location.path)
        await receiver.receive(control.receiveFromConnection([command], receiver))
        now = reactor.seconds()
        entries = Listing(bytes=buffer.size)
        for line in _lines(b"".join(buffer.chunks)):
            entry = parse_mlsd_line(line) if use_mlsd else parse_list_line(line, now)
            if entry is not None:
                entries.append(entry)
        return entries

    return await _with_session(reactor, location, settings, work)


async def _rename(session, old, new):
    control = session.control
    try:
        await control.rename(old, new)
    except CommandFailed:
        # Some servers refuse to replace an existing file: remove it and try again.
        await _optional(session, "DELE " + new)
        await control.rename(old, new)


def _fail_with(consumer_ready, done):
    """Make C{consumer_ready} fail when C{done} fails first (the data connection never came:
    PASV or STOR refused, connection lost)."""

    def failed(failure):
        if not consumer_ready.called:
            consumer_ready.errback(failure)
        return failure

    done.addErrback(failed)


# A STOR writes its source to the data connection in pieces of this size.
CHUNK_SIZE = 64 * 1024


@implementer(IPullProducer)
class _Sender:
    """
    A pull producer writing what C{reader.take} gives (pieces of C{CHUNK_SIZE}, read in the
    pool) to a consumer, one piece per request. Before taking the next piece it waits while
    C{pacers} are in debt (the reader spends them); C{timer}, the idle timer, is held
    meanwhile.
    """

    def __init__(self, reactor, pacers, timer):
        self._reactor = reactor
        self._pacers = pacers
        self._timer = timer
        self._call = None
        self._taking = False
        self.deferred = None

    def beginFileTransfer(self, reader, consumer):
        """Send all of C{reader} to C{consumer}; a Deferred fired at its end."""
        self._reader, self._consumer = reader, consumer
        self.deferred = Deferred()
        consumer.registerProducer(self, False)
        return self.deferred

    def resumeProducing(self):
        if self.deferred is None or self._taking or self._call is not None:
            return
        delay = max((pacer.delay() for pacer in self._pacers), default=0)
        if delay > 0:
            # A pull producer is asked again only after it wrote: the wait ends with a call.
            self._timer.hold()
            self._call = self._reactor.callLater(delay, self._resume)
            return
        self._taking = True
        taking = Deferred.fromCoroutine(self._reader.take(CHUNK_SIZE))
        taking.addCallbacks(self._took, self._failed)

    def _resume(self):
        self._call = None
        self.resumeProducing()

    def _took(self, data):
        self._taking = False
        if self.deferred is None:
            return
        if not data:
            self._consumer.unregisterProducer()
            self._end(None)
            return
        self._consumer.write(data)

    def _failed(self, failure):
        # The data connection ends with what was sent: the caller discards it.
        if self.deferred is not None:
            self._consumer.unregisterProducer()
            self._consumer.finish()
        self._end(failure)

    def _end(self, result):
        self._taking = False
        if self.deferred is not None:
            d, self.deferred = self.deferred, None
            if result is None:
                d.callback(None)
            else:
                d.errback(result)

    def stopProducing(self):
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._end(Failure(ConnectionFailed("the data connection asked to stop")))


async def _send(reactor, session, location, name, source, offset=0):
    """C{STOR} C{source} (C{read(n)}) as C{name}, after C{REST offset} when not 0; done once
    the server replied 226. A refusal of the write at an offset (L{REST_REFUSED}) is
    L{RangeIgnored}."""
    try:
        await _stor(reactor, session, location, name, source, offset)
    except (CommandFailed, FTPError, net_error.ConnectionLost) as exc:
        failed = exc if isinstance(exc, CommandFailed) else _inner_command_failure(exc)
        if offset and failed is not None and _reply(failed)[:3] in REST_REFUSED:
            raise RangeIgnored(
                f"{location.shown}: the server does not take writes at an offset "
                f"(REST before STOR): {_reply(failed)!r}"
            ) from None
        raise


async def _stor(reactor, session, location, name, source, offset):
    control = session.control
    directory = posixpath.dirname(location.path) or "/"
    consumer_ready, done = control.storeFile(name, offset)
    _fail_with(consumer_ready, done)
    try:
        try:
            consumer = await consumer_ready
        except CommandFailed as exc:
            if offset:
                raise  # _send tells a refused REST from other failures
            raise _command_error(location, exc, f"cannot write in {directory}") from None
        session.data_transport = consumer.transport
        pacers = session.settings.pacers
        reader = ProgressReader(source, session.timer.touch, pacers)
        sender = _Sender(reactor, pacers, session.timer)
        try:
            await sender.beginFileTransfer(reader, consumer)
        except Exception:
            # The data connection ended early: the reader or the control reply says why.
            if reader.error is not None:
                raise reader.error from None
            await done
            raise ConnectionFailed(f"{location.shown}: data connection closed early") from None
        consumer.finish()
        await done
    finally:
        done.addErrback(lambda _: None)


async def _commit(session, location, temp, outgoing, size, features):
    """MFMT (when the server has it), rename C{temp} onto the target, check its C{size}."""
    path = _wire(location.path)
    if "MFMT" in features:
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(outgoing.mtime))
        await _optional(session, f"MFMT {stamp} {temp}")
    await _rename(session, temp, path)
    arrived = _size(await _optional(session, "SIZE " + path))
    if arrived is not None and arrived != size:
        raise SizeMismatch(f"{location.shown}: {arrived} bytes arrived of {size}")


async def _make_directory(session, location):
    directory = posixpath.dirname(location.path) or "/"
    if directory != "/" and await _optional(session, "CWD " + _wire(directory)) is None:
        await _makedirs(session, directory)


async def store(reactor, outgoing, location, settings):
    """C{STOR} to a temporary name beside the target, then C{RNFR}/C{RNTO} into place. A
    failed send removes its temporary file: on its session, or on a new one when the session
    is lost (not when cancelled: that must end at once); a retry sends to a new name."""
    temp = inflight_name(location.path)
    left = []  # the temporary file, while a failure may leave it behind

    async def work(session):
        name = _wire(temp)
        features = await _features(session)
        await _make_directory(session, location)
        left.append(temp)
        try:
            await _send(reactor, session, location, name, outgoing)
            await _commit(session, location, name, outgoing, outgoing.sent, features)
            left.clear()
        except BaseException:
            if session.connected:
                try:
                    await _optional(session, "DELE " + name)
                except Exception:
                    pass  # the session died meanwhile: a new one removes the file
                if session.connected:
                    left.clear()  # removed, or refused: not there, or not ours to remove
            raise

    await store_or_remove_left(
        _with_session(reactor, location, settings, work), left, store_discard, reactor,
        location, settings, temp,
    )


# A put in blocks (L{ion.apps.pump.transfer.sendblocks}): block 0 is a plain STOR (which
# truncates: it goes first, alone), every other block REST <offset> then STOR, each on a
# session of its own; a server refusing that cannot take blocks (L{RangeIgnored}).

# Replies refusing a STOR at an offset: REST not understood (500-504), an invalid REST
# parameter (554, RFC 959), or ProFTPD's "Append/Restart not permitted" (451, its default
# unless AllowStoreRestart is on).
REST_REFUSED = ("451", "500", "501", "502", "504", "554")
# Block 0 is sent alone, before the others: its STOR (no REST) truncates the file.
FIRST_BLOCK_ALONE = True


async def store_begin(reactor, location, settings, temp, needed=None):
    """Ready the server for the temporary file C{temp} of a put in blocks: its directory made
    when missing; with C{needed}, whether C{temp} is there with at least C{needed} bytes
    (blocks sent before: kept). Returns whether it was kept. A server whose C{FEAT} lists no
    C{REST} is L{RangeIgnored}."""

    async def work(session):
        if "REST" not in await _features(session):
            # No REST STREAM in FEAT (RFC 3659): not even tried, for a refused REST would
            # not stop the STOR queued after it, which would truncate the file.
            raise RangeIgnored(f"{location.shown}: the server lists no REST in FEAT")
        if needed is not None:
            size = _size(await _optional(session, "SIZE " + _wire(temp)))
            if size is not None and size >= needed:
                return True
        await _make_directory(session, location)
        return False

    return await _with_session(reactor, location, settings, work)


async def store_range(reactor, location, settings, temp, source, offset):
    """C{REST offset} (none for 0) then C{STOR temp} of C{source} (a block's bytes); done once
    the server replied 226."""

    async def work(session):
        await _send(reactor, session, location, _wire(temp), source, offset)

    await _with_session(reactor, location, settings, work)


async def store_end(reactor, location, settings, temp, outgoing):
    """Commit the temporary file C{temp} of a put in blocks (MFMT, rename, size)."""

    async def work(session):
        features = await _features(session)
        await _commit(session, location, _wire(temp), outgoing, outgoing.size, features)

    await _with_session(reactor, location, settings, work)


async def store_discard(reactor, location, settings, temp):
    """Remove the temporary file C{temp} of a put in blocks (gone already: fine)."""

    async def work(session):
        await _optional(session, "DELE " + _wire(temp))

    await _with_session(reactor, location, settings, work)


def _size(reply):
    """The size in a C{SIZE} reply, or None."""
    try:
        return int(reply[-1][4:].strip()) if reply else None
    except ValueError:
        return None


async def _makedirs(session, directory):
    """C{MKD} each directory of the path C{directory} (failures are the next command's)."""
    parts = [p for p in directory.split("/") if p]
    for depth in range(1, len(parts) + 1):
        await _optional(session, "MKD " + _wire("/" * directory.startswith("/")
                                                + "/".join(parts[:depth])))


async def operate(reactor, location, settings, op, old=None, target=None):
    """The file operation C{op} on the server at C{location}: delete, rmdir, mkdir or rename
    (from the path C{old}); a phrase saying what was done, or None for a rename whose old file
    is missing. Links are refused: FTP has no command for them."""

    async def work(session):
        path = _wire(location.path)
        if op == "mkdir":
            await _makedirs(session, location.path)
            return "directory made"
        if op == "rename":
            if await _optional(session, "RNFR " + _wire(old)) is None:
                return None
            await _makedirs(session, posixpath.dirname(location.path))
            await session.control.queueStringCommand("RNTO " + path)
            return f"renamed from {old}"
        if op in ("delete", "rmdir"):
            done = await _optional(session, ("DELE " if op == "delete" else "RMD ") + path)
            return "already gone" if done is None else "removed"
        raise BadRequest(f"{location.shown}: ftp has no command for a {op}")

    return await _with_session(reactor, location, settings, work)
