"""Conversations of one process: open ones, their deadlines, and the tombstones they leave.

L{Conversations} is what a process talks through. As initiator it opens rpc, request and inform
conversations; as participant it answers requests. Every message carries C{conv-id} and
C{conv-seq}; every state change goes through the protocol tables (C{protocols.py}), including
timeouts (driven by the injected clock) and cancellation.

A finished conversation leaves a tombstone for C{tombstone_ttl} seconds (config
C{ion.core.conversation}, default 60): a late or duplicate message for it is dropped and logged
at info, never dispatched. (A sent inform leaves none on its sender's side: nothing answers it,
so whatever comes for it is dropped as for an unknown conversation.) Tombstones are collected
as new ones are laid, so memory stays bounded by the traffic of one TTL. The TTL is read from
the config at most once a second.

Deadlines (the initiator's timeout, the participant's copy of its caller's reply-by) share one
clock timer per process (L{Deadlines}).
"""

import collections
import heapq
import math
import os

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from ion.core.conversation import protocols as P
from ion.core.conversation.errors import (
    ConversationTimeout,
    NoSuchReceiver,
    RemoteError,
    error_from_wire,
    error_to_wire,
)
from ion.core.messaging.transport import Unroutable

log = Logger()

CONFIG = "ion.core.conversation"
LOG_LIMIT = 16  # messages kept per conversation log (headers only)
TICKS = 20  # deadlines are kept in buckets of 1/TICKS s (they still fire at their own time)
SLACK = 1e-6  # a deadline this close is due: clock arithmetic may land a hair before it
# A participant keeps working this long past the caller's reply-by, for clock skew.
PARTICIPANT_GRACE = 1.0
ID_POOL = 256  # conversation ids drawn from the kernel at once


class _Ids:
    """Conversation ids: 16 random bytes from C{os.urandom}, as 32 hex digits. The bytes of
    L{ID_POOL} ids are drawn at once: a system call per message cost more than the rest of
    opening a conversation. A forked child draws its own (it never reuses its parent's)."""

    def __init__(self):
        self._pool = ""
        self._pos = 0
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forget)

    def _forget(self):
        self._pool, self._pos = "", 0

    def next(self):
        pos = self._pos
        if pos >= len(self._pool):
            self._pool, pos = os.urandom(16 * ID_POOL).hex(), 0
        self._pos = pos + 32
        return self._pool[pos : pos + 32]


_ids = _Ids()


class Refused(RemoteError):
    """The participant of a request refused it."""


class Conversation:
    """One conversation seen from one side. C{state} follows the protocol table. C{log}
    holds the last L{LOG_LIMIT} messages, as C{(direction, headers without ts)}."""

    __slots__ = ("owner", "conv_id", "protocol", "role", "peer", "op", "state", "seq", "log")
    __slots__ += ("deadline", "started", "user_id", "_agreement", "_outcome", "_waiters")
    __slots__ += ("_table",)

    def __init__(self, owner, conv_id, protocol, role, peer, op):
        self.owner = owner
        self.conv_id = conv_id
        self.protocol = protocol
        self.role = role
        self.peer = peer
        self.op = op
        self.state = P.START
        self._table = P.TABLES[(protocol, role)]
        self.seq = 0
        self.log = []  # a list: most conversations log one or two messages
        self.deadline = None  # (when, timeout, its bucket) while one is set
        self.started = owner.clock.seconds()  # for the rpc latency metric
        self.user_id = None  # the identity this conversation acts for
        # Initiator side: what the peer said, as (ok, value), once known, and the Deferreds
        # of those waiting for it. A participant never waits, so it makes none.
        self._agreement = None  # agreed, refused, or ended before agreeing
        self._outcome = None  # the conversation's result
        self._waiters = None  # [(wants the outcome, Deferred)]

    def __repr__(self):
        return f"<Conversation {self.protocol} {self.role} {self.conv_id} {self.state}>"

    @property
    def final(self):
        return self.state in P.FINAL

    def transition(self, event):
        """Move to the state the protocol table says (as L{P.next_state}: ProtocolViolation
        for an event it does not allow); a final one ends the conversation."""
        try:
            state = self.state = self._table[self.state][event]
        except KeyError:
            raise P.ProtocolViolation(self.protocol, self.role, self.state, event) from None
        if state in P.FINAL:
            self.owner._finished(self)

    def _record(self, direction, headers):
        kept = dict(headers)
        kept.pop("ts", None)
        log = self.log
        log.append((direction, kept))
        if len(log) > LOG_LIMIT:
            del log[0]

    # -- initiator side --------------------------------------------------------------------

    def when_agreed(self):
        """A Deferred: True once the participant agreed; fails if it refused or the
        conversation ended first."""
        return self._wait(False, self._agreement)

    def when_done(self):
        """A Deferred of the outcome: the result content, or a typed error. Cancelling it
        cancels the conversation (a late answer is then dropped)."""
        return self._wait(True, self._outcome)

    def _wait(self, outcome, known):
        waiter = defer.Deferred(self._cancel_waiter)
        if known is not None:
            _answer(waiter, known)
        elif self._waiters is None:
            self._waiters = [(outcome, waiter)]
        else:
            self._waiters.append((outcome, waiter))
        return waiter

    def _cancel_waiter(self, waiter):
        self.cancel()

    def cancel(self):
        """Give up on this conversation (initiator): final state C{cancelled}."""
        if not self.final:
            self.transition(P.CANCEL)
            self._settle(False, defer.CancelledError(f"conversation {self.conv_id} cancelled"))

    def _agree(self, ok, value):
        if self._agreement is None:
            self._agreement = (ok, value)
            self._answer_waiters(False, self._agreement)

    def _settle(self, ok, value):
        """Record the outcome and fire the waiters (an error also answers agreement)."""
        if not ok:
            self._agree(False, value)
        if self._outcome is None:
            self._outcome = (ok, value)
            self._answer_waiters(True, self._outcome)

    def _answer_waiters(self, outcome, answer):
        waiters = self._waiters
        if not waiters:
            return
        # Those answered now leave the list first: a waiter's callbacks may wait again.
        self._waiters = [w for w in waiters if w[0] is not outcome] or None
        for wants, waiter in waiters:
            if wants is outcome:
                _answer(waiter, answer)

    # -- participant side ------------------------------------------------------------------

    async def agree(self):
        """Tell the initiator of a request that it will be done (explicit agree)."""
        await self.owner._say(self, P.AGREE, None)

    async def refuse(self, reason, code=403):
        """Refuse a request; final. The initiator gets L{Refused} with the reason."""
        await self.owner._say(self, P.REFUSE, {"code": code, "type": "Refused", "message": reason})


def _answer(waiter, answer):
    ok, value = answer
    if not waiter.called:  # else cancelled
        waiter.callback(value) if ok else waiter.errback(value)


class Deadlines:
    """The deadlines of many conversations on one clock timer.

    A timer per conversation costs a C{callLater} and a C{cancel} per message; most are
    cancelled long before they would fire. Here deadlines sit in buckets of 1/L{TICKS} s, so
    clearing one is a dict removal, and a single C{DelayedCall} is armed for the earliest
    deadline of the earliest bucket still holding any: each deadline still fires at its own
    time, never earlier, and the clock wakes about once per timeout while none are missed.
    """

    def __init__(self, clock, expire):
        self.clock = clock
        self._expire = expire  # called with (conv, timeout) once its deadline passed
        self._buckets = {}  # tick -> {conv: None}
        self._ticks = []  # heap of the ticks of _buckets (and of some emptied since)
        self._alarm = None  # the DelayedCall, when armed
        self._alarm_at = None

    def set(self, conv, timeout):
        """Expire conv in timeout seconds unless L{clear}ed first."""
        when = self.clock.seconds() + timeout
        tick = math.ceil(when * TICKS)
        bucket = self._buckets.get(tick)
        if bucket is None:
            bucket = self._buckets[tick] = {}
            heapq.heappush(self._ticks, tick)
        bucket[conv] = None
        conv.deadline = (when, timeout, tick)
        if self._alarm_at is None or when < self._alarm_at:
            self._arm(when)

    def clear(self, conv):
        """Forget conv's deadline, if any."""
        if conv.deadline is None:
            return
        tick = conv.deadline[2]
        conv.deadline = None
        bucket = self._buckets.get(tick)
        if bucket is not None:
            bucket.pop(conv, None)
            if not bucket:
                del self._buckets[tick]

    def stop(self):
        """Forget every deadline and disarm the timer."""
        for bucket in self._buckets.values():
            for conv in bucket:
                conv.deadline = None
        self._buckets.clear()
        self._ticks.clear()
        if self._alarm is not None and self._alarm.active():
            self._alarm.cancel()
        self._alarm = self._alarm_at = None

    def _arm(self, when):
        if self._alarm is not None and self._alarm.active():
            self._alarm.cancel()
        self._alarm_at = when
        delay = max(0.0, when - SLACK - self.clock.seconds())
        self._alarm = self.clock.callLater(delay, self._ring)

    def _ring(self):
        self._alarm = self._alarm_at = None
        now = self.clock.seconds() + SLACK
        due = []
        ticks = self._ticks
        while ticks:
            bucket = self._buckets.get(ticks[0])
            if bucket is None:  # emptied since
                heapq.heappop(ticks)
                continue
            passed = [conv for conv in bucket if conv.deadline[0] <= now]
            for conv in passed:
                due.append((conv, conv.deadline[1]))
                self.clear(conv)
            if bucket:  # some of its deadlines are yet to come
                self._arm(min(conv.deadline[0] for conv in bucket))
                break
            heapq.heappop(ticks)
        for conv, timeout in due:
            self._expire(conv, timeout)


class Conversations:
    """The conversation table of one process (see the module docstring)."""

    def __init__(self, messenger, clock, config, sender, sender_name=None):
        self.messenger = messenger
        self.clock = clock
        self.config = config
        self.sender = sender
        self.sender_name = sender_name or sender
        self.open = {}
        self.tombstones = collections.OrderedDict()
        self.recent = collections.deque(maxlen=LOG_LIMIT)
        self.deadlines = Deadlines(clock, self._expire)
        self._ttl = None  # tombstone_ttl, looked up again once a second of the clock has passed
        self._ttl_until = None
        self._collect_at = None  # no tombstone expires before this (None: none is kept)

    def __len__(self):
        return len(self.open)

    def _finished(self, conv):
        self.recent.append(conv)
        if conv.role == P.INITIATOR and conv.protocol == "inform":
            # Sent and over: never open, and no tombstone, as nothing answers an inform (what
            # comes for it is dropped all the same, as for an unknown conversation).
            return
        key = (conv.conv_id, conv.role)
        self.open.pop(key, None)
        if conv.deadline is not None:
            self.deadlines.clear(conv)
        now = self.clock.seconds()
        if self._ttl_until is None or not now < self._ttl_until:
            self._ttl = self.config.get(CONFIG, "tombstone_ttl", 60)
            self._ttl_until = now + 1.0
        expires = now + self._ttl
        tombstones = self.tombstones
        tombstones[key] = expires
        tombstones.move_to_end(key)
        if self._collect_at is None:
            self._collect_at = expires
        if conv.role == P.INITIATOR and conv.protocol == "rpc":
            self.messenger.metrics.rpc_latency.observe((conv.op,), now - conv.started)
        if not now < self._collect_at:
            self.collect(now)

    def collect(self, now=None):
        """Forget tombstones whose TTL has passed."""
        now = self.clock.seconds() if now is None else now
        if self._collect_at is None or now < self._collect_at:
            return
        tombstones = self.tombstones
        while tombstones:
            key, expires = next(iter(tombstones.items()))
            if expires > now:
                self._collect_at = expires
                return
            del tombstones[key]
        self._collect_at = None

    # -- sending ---------------------------------------------------------------------------

    def _headers(self, conv, performative):
        conv.seq += 1
        headers = {
            "sender": self.sender,
            "sender-name": self.sender_name,
            "conv-id": conv.conv_id,
            "conv-seq": conv.seq,
            "protocol": conv.protocol,
            "performative": performative,
            "op": conv.op,
        }
        if conv.role == P.INITIATOR:
            headers["reply-to"] = self.sender
        return headers

    def _say(self, conv, performative, content):
        """Send performative in conv (participant side), moving its state first. Returns a
        Deferred that fires once it was sent, or dropped because its initiator is gone."""
        if conv.final:
            log.info("{conv!r}: {p} not sent: the conversation ended", conv=conv, p=performative)
            return defer.succeed(None)
        conv.transition(performative)
        headers = self._headers(conv, performative)
        headers["status"] = "ERROR" if performative in (P.FAILURE, P.REFUSE) else "OK"
        conv._record("out", headers)
        return self.messenger.send(conv.peer, headers, content).addErrback(
            _initiator_gone, conv, performative
        )

    def initiate(self, protocol, receiver, op, content, timeout=None, user_id=None):
        """Open a conversation as initiator and send its first message. Returns the
        Conversation; C{conv.when_done()} gives the outcome (for inform: once sent)."""
        conv, headers = self._opened(protocol, receiver, op, timeout, user_id)
        sent = self.messenger.send(receiver, headers, content)
        if protocol == "inform":
            sent.addCallbacks(_inform_sent, _not_sent, (conv,), None, (conv, receiver))
        else:
            sent.addErrback(_not_sent, conv, receiver)
        return conv

    def inform(self, receiver, op, content, user_id=None):
        """Send a one-way message: an inform conversation, over once sent. Returns a Deferred
        firing with None once the transport took it, failing with L{NoSuchReceiver} if nobody
        listens at C{receiver}, or with the error that kept it from being sent: what
        C{initiate("inform", ...).when_done()} gives, without the Deferred and callbacks that
        record the outcome in the Conversation (kept in C{recent}, done once sent)."""
        _conv, headers = self._opened("inform", receiver, op, None, user_id)
        return self.messenger.send(receiver, headers, content).addErrback(
            _inform_not_sent, receiver
        )

    def _opened(self, protocol, receiver, op, timeout, user_id):
        """A new initiator Conversation, moved past its first message, and that message's
        headers."""
        conv = Conversation(self, _ids.next(), protocol, P.INITIATOR, receiver, op)
        first = P.INFORM if protocol == "inform" else P.REQUEST
        headers = self._headers(conv, first)
        if user_id is not None:
            headers["user-id"] = user_id
        if timeout is not None:
            headers["reply-by"] = int((self.clock.seconds() + timeout) * 1000)
        conv._record("out", headers)
        conv.transition(first)
        if not conv.final:
            self.open[(conv.conv_id, P.INITIATOR)] = conv
            if timeout is not None:
                self.deadlines.set(conv, timeout)
        return conv, headers

    def _expire(self, conv, timeout):
        if conv.final:
            return
        conv.transition(P.TIMEOUT)
        if conv.role == P.INITIATOR:
            conv._settle(False, ConversationTimeout(conv.peer, conv.op, timeout))
        else:
            log.info("{conv!r}: the caller's deadline passed; its answer will not be sent",
                     conv=conv)

    def fail_open(self, error):
        """End every open initiator conversation with error (e.g. the connection was lost,
        so the answers they wait for are gone)."""
        for conv in list(self.open.values()):
            if conv.role != P.INITIATOR or conv.final:
                continue
            conv.transition(P.CANCEL)
            conv._settle(False, error)

    def close(self):
        """The process is gone: stop every timer and forget open conversations."""
        self.deadlines.stop()
        self.open.clear()

    # -- receiving -------------------------------------------------------------------------

    def receive(self, headers, content):
        """Route an incoming message. Returns a new participant Conversation when the message
        starts one (request or inform) for the process to serve, else None (handled here)."""
        conv_id = headers.get("conv-id")
        performative = headers.get("performative")
        protocol = headers.get("protocol")
        if (type(conv_id) is not str or type(performative) is not str
                or not (protocol is None or type(protocol) is str)):
            # Hostile or broken: ids, performatives and protocols are strings (a list or a
            # map could not even be looked up).
            log.warn(
                "dropped a message from {sender}: conv-id, performative and protocol must be "
                "strings (got {types})",
                sender=headers.get("sender"),
                types=", ".join(type(v).__name__ for v in (conv_id, performative, protocol)),
            )
            return None
        starts = performative in (P.REQUEST, P.INFORM)
        role = P.PARTICIPANT if starts else P.INITIATOR
        conv = self.open.get((conv_id, role))
        if conv is not None and not starts:
            conv._record("in", headers)
            self._initiator_event(conv, performative, content)
            return None
        self.collect()
        if (conv_id, role) not in self.tombstones:
            if starts and conv is None and conv_id:
                return self._participate(conv_id, performative, headers)
        log.info(
            "dropped {p} for {what} conversation {conv} from {sender}",
            p=performative,
            what="finished" if (conv_id, role) in self.tombstones else "unknown",
            conv=conv_id,
            sender=headers.get("sender"),
        )
        return None

    def _participate(self, conv_id, performative, headers):
        """The participant Conversation that a request or inform starts, or None."""
        protocol = headers.get("protocol") or "rpc"
        if (protocol, P.PARTICIPANT) not in P.TABLES:
            log.warn(
                "dropped a message of unknown protocol {protocol!r} from {sender}",
                protocol=protocol,
                sender=headers.get("sender"),
            )
            return None
        conv = Conversation(
            self, conv_id, protocol, P.PARTICIPANT, headers.get("reply-to"), headers.get("op")
        )
        seq = headers.get("conv-seq")
        conv.seq = seq if isinstance(seq, int) else 1
        conv._record("in", headers)
        try:
            conv.transition(performative)
        except P.ProtocolViolation as e:
            log.warn("{conv!r}: {error}", conv=conv, error=e)
            return None
        if conv.final:
            return conv
        self.open[(conv_id, P.PARTICIPANT)] = conv
        reply_by = headers.get("reply-by")
        if isinstance(reply_by, (int, float)):
            delay = reply_by / 1000.0 - self.clock.seconds() + PARTICIPANT_GRACE
            if delay <= 0:
                log.info("{conv!r}: dropped: its caller's deadline had passed", conv=conv)
                conv.transition(P.TIMEOUT)
                return None
            self.deadlines.set(conv, delay)
        return conv

    def _initiator_event(self, conv, performative, content):
        try:
            conv.transition(performative)
        except P.ProtocolViolation as e:
            log.warn("{conv!r} failed: {error}", conv=conv, error=e)
            conv.state = P.FAILED
            self._finished(conv)
            conv._settle(False, RemoteError(500, "ProtocolViolation", str(e), conv.peer, conv.op))
            return
        if performative == P.AGREE:
            conv._agree(True, True)
        elif performative == P.REFUSE:
            wire = error_from_wire(content, conv.peer, conv.op)
            conv._settle(False, Refused(wire.code, wire.type, wire.message, conv.peer, conv.op))
        elif performative == P.INFORM_RESULT:
            conv._agree(True, True)
            conv._settle(True, content)
        elif performative == P.FAILURE:
            conv._settle(False, error_from_wire(content, conv.peer, conv.op))

    # -- participant outcome ---------------------------------------------------------------

    def finish(self, conv, result=None, error=None):
        """Send the outcome of a served request (inform_result or failure). For a request
        not yet agreed, agree first (FIPA: agree precedes the result). Returns a Deferred
        that fires once it was sent."""
        if conv.protocol == "inform" or conv.final:
            if conv.final and conv.state != P.REFUSED and conv.protocol != "inform":
                log.info("{conv!r}: outcome not sent: the conversation already ended", conv=conv)
            return defer.succeed(None)
        if error is not None:
            return self._say(conv, P.FAILURE, error_to_wire(error))
        if conv.protocol == "request" and conv.state == "received":
            agreed = self._say(conv, P.AGREE, None)
            return agreed.addCallback(lambda _: self._say(conv, P.INFORM_RESULT, result))
        return self._say(conv, P.INFORM_RESULT, result)


def _inform_sent(_, conv):
    conv._settle(True, None)


def _not_sent(failure, conv, receiver):
    error = NoSuchReceiver(receiver) if failure.check(Unroutable) else failure.value
    if not conv.final:
        conv.transition(P.FAILURE)
    conv._settle(False, error)


def _inform_not_sent(failure, receiver):
    if failure.check(Unroutable):
        return Failure(NoSuchReceiver(receiver))
    return failure


def _initiator_gone(failure, conv, performative):
    failure.trap(Unroutable)
    log.info("{conv!r}: the initiator {to} is gone; {p} dropped", conv=conv, to=conv.peer,
             p=performative)
