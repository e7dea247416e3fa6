"""Request/reply conversations between processes: the caller side and the replies.

Every call opens a conversation (`conv-id`, a uuid) whose reply comes back to the caller's own
queue (`reply-to`). `Calls` correlates replies with open calls, fires the caller's Deferred with
the result or a typed error, and enforces the deadline with the injected clock. A reply for a
conversation that is no longer open (late after a timeout, a duplicate, cancelled) is dropped
and logged at info, never delivered twice.
"""

import uuid

from twisted.internet import defer
from twisted.logger import Logger

from ion.core.conversation.errors import (
    ConversationTimeout,
    NoSuchReceiver,
    error_from_wire,
    error_to_wire,
)
from ion.core.messaging.transport import Unroutable

log = Logger()

REQUEST = "request"
INFORM = "inform"
INFORM_RESULT = "inform_result"
FAILURE = "failure"
REPLIES = (INFORM_RESULT, FAILURE)


class _Call:
    __slots__ = ("deferred", "receiver", "op", "timer")

    def __init__(self, deferred, receiver, op, timer):
        self.deferred = deferred
        self.receiver = receiver
        self.op = op
        self.timer = timer


class Calls:
    """The open rpc conversations of one process."""

    def __init__(self, messenger, clock, sender, sender_name=None):
        self.messenger = messenger
        self.clock = clock
        self.sender = sender
        self.sender_name = sender_name or sender
        self._open = {}

    def __len__(self):
        return len(self._open)

    def _headers(self, receiver, op, protocol, performative, user_id):
        headers = {
            "sender": self.sender,
            "sender-name": self.sender_name,
            "reply-to": self.sender,
            "conv-id": uuid.uuid4().hex,
            "conv-seq": 1,
            "protocol": protocol,
            "performative": performative,
            "op": op,
        }
        if user_id is not None:
            headers["user-id"] = user_id
        return headers

    def call(self, receiver, op, content, timeout, user_id=None):
        """Send a request; the Deferred fires with the reply content or a typed error.
        Cancelling it ends the conversation (a late reply is then dropped)."""
        headers = self._headers(receiver, op, "rpc", REQUEST, user_id)
        conv_id = headers["conv-id"]
        headers["reply-by"] = int((self.clock.seconds() + timeout) * 1000)

        def cancel(d):
            self._close(conv_id)

        d = defer.Deferred(cancel)
        timer = self.clock.callLater(timeout, self._expire, conv_id, timeout)
        self._open[conv_id] = _Call(d, receiver, op, timer)

        def sent_failed(f):
            call = self._close(conv_id)
            if call is not None:
                if f.check(Unroutable):
                    call.deferred.errback(NoSuchReceiver(receiver))
                else:
                    call.deferred.errback(f)

        sent = defer.Deferred.fromCoroutine(self.messenger.send(receiver, headers, content))
        sent.addErrback(sent_failed)
        return d

    async def inform(self, receiver, op, content, user_id=None):
        """One-way message; raises NoSuchReceiver if nobody listens on receiver."""
        headers = self._headers(receiver, op, "inform", INFORM, user_id)
        try:
            await self.messenger.send(receiver, headers, content)
        except Unroutable:
            raise NoSuchReceiver(receiver) from None

    def _close(self, conv_id):
        call = self._open.pop(conv_id, None)
        if call is not None and call.timer.active():
            call.timer.cancel()
        return call

    def _expire(self, conv_id, timeout):
        call = self._open.pop(conv_id, None)
        if call is not None:
            call.deferred.errback(ConversationTimeout(call.receiver, call.op, timeout))

    def on_reply(self, headers, content):
        """Deliver a reply to its open call; returns False if it belongs to none."""
        call = self._close(headers.get("conv-id"))
        if call is None:
            log.info(
                "dropped a reply for a conversation that is not open: conv-id {conv} "
                "from {sender} ({performative})",
                conv=headers.get("conv-id"),
                sender=headers.get("sender"),
                performative=headers.get("performative"),
            )
            return False
        if headers.get("performative") == INFORM_RESULT:
            call.deferred.callback(content)
        else:
            call.deferred.errback(error_from_wire(content, call.receiver, call.op))
        return True

    def fail_all(self, exc):
        """End every open call with exc (the process is going away)."""
        for conv_id in list(self._open):
            call = self._close(conv_id)
            call.deferred.errback(exc)


async def reply(messenger, sender, request_headers, result=None, error=None):
    """Answer a request: inform_result with result, or failure with the error as data."""
    headers = {
        "sender": sender,
        "conv-id": request_headers.get("conv-id"),
        "conv-seq": int(request_headers.get("conv-seq", 1)) + 1,
        "protocol": request_headers.get("protocol", "rpc"),
        "op": request_headers.get("op"),
    }
    if error is None:
        headers.update(performative=INFORM_RESULT, status="OK")
        content = result
    else:
        headers.update(performative=FAILURE, status="ERROR")
        content = error_to_wire(error)
    await messenger.send(request_headers["reply-to"], headers, content)
