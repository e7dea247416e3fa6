"""Kept-open sftp and ftp sessions, logged out and closed after C{dead_time} seconds idle.

A push link (a sender's puts and file operations, a poll's listings through the transfer
service) sends file after file to one server: logging in for each costs an SSH handshake or an
FTP login every time. L{Sessions} keeps a session that finished its work cleanly open, idle,
for the next transfer to the same server with the same login; one left idle for C{dead_time}
seconds (default 180) is logged out (FTP C{QUIT}, SSH disconnect) and closed, so a link does
not stay logged in for hours, and the next file connects again. A session that failed, timed
out or was cancelled is closed at once, never kept; one the server closed while idle is
dropped when next looked at.

Sessions are kept only for URLs the caller trusts (no URL-policy C{access}): a transfer a
notice asked for never shares a connection with another (see
L{ion.apps.pump.transfer.policy}). At most C{per_key} idle sessions are kept per server and
login (the transfers' C{per_host}, the most that can be busy at once).
"""

import contextlib

from twisted.internet.defer import Deferred


class Sessions:
    """Idle sessions by key (see the module docstring); C{dead_time} 0 keeps none."""

    def __init__(self, reactor, dead_time, per_key=4):
        self.reactor = reactor
        self.dead_time = dead_time
        self.per_key = per_key
        self.opened = 0  # sessions made (counted by the schemes), for tests and stats
        self.expired = 0  # closed after dead_time idle
        self._idle = {}  # key -> [(session, delayed call)], the newest last
        self._closed = False

    def take(self, key):
        """An idle session for C{key} still open, or None."""
        parked = self._idle.get(key)
        while parked:
            session, call = parked.pop()
            if call.active():
                call.cancel()
            if session.usable():
                if not parked:
                    del self._idle[key]
                return session
            Deferred.fromCoroutine(session.close())
        self._idle.pop(key, None)
        return None

    def give(self, key, session):
        """Keep C{session} (whose work ended cleanly) idle for C{key}, or close it."""
        parked = self._idle.setdefault(key, [])
        if (
            self._closed
            or self.dead_time <= 0
            or not session.usable()
            or len(parked) >= self.per_key
        ):
            if not parked:
                del self._idle[key]
            return Deferred.fromCoroutine(session.close())
        call = self.reactor.callLater(self.dead_time, self._expire, key, session)
        parked.append((session, call))
        return None

    def _expire(self, key, session):
        parked = self._idle.get(key, [])
        self._idle[key] = [(s, c) for s, c in parked if s is not session]
        if not self._idle[key]:
            del self._idle[key]
        self.expired += 1
        Deferred.fromCoroutine(session.logout())

    def idle(self):
        """How many sessions are kept idle now."""
        return sum(len(parked) for parked in self._idle.values())

    async def close(self):
        """Log out and close every idle session; those given back later are closed."""
        self._closed = True
        idle, self._idle = self._idle, {}
        for parked in idle.values():
            for session, call in parked:
                if call.active():
                    call.cancel()
                await session.logout()


def session_key(location, settings):
    """What a kept session must match: scheme, server, login and host-key file."""
    return (
        location.scheme, location.host, location.port, location.user, location.password,
        location.ssh_key, settings.known_hosts,
    )


@contextlib.asynccontextmanager
async def borrowed(location, settings, make):
    """
    The session one piece of work runs in: an idle one of C{settings.sessions} for this server
    and login (rearmed with C{settings}), else C{make()}, a new one (counted in C{opened}).
    Only transfers of trusted URLs (no C{settings.access}) share sessions. On the way out its
    idle timer stops, and it is given back when the work ended cleanly, else closed.
    """
    sessions = settings.sessions if settings.access is None else None
    key = None if sessions is None else session_key(location, settings)
    session = None if sessions is None else sessions.take(key)
    if session is not None:
        session.rearm(settings)
    else:
        session = make()
        if sessions is not None:
            sessions.opened += 1
    clean = False
    try:
        yield session
        clean = True
    finally:
        session.timer.stop()
        if clean and sessions is not None:
            sessions.give(key, session)
        else:
            await session.close()
