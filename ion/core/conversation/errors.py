"""Errors a conversation can end with, and how they cross the wire as data.

On the wire an error is a map C{{code, type, message}} (HTTP-like codes: 4xx the caller's
fault, 5xx the receiver's). Callers get typed exceptions:

  - L{RemoteError}: the receiver answered with a failure (has C{code}, C{type}, C{message});
  - L{ConversationTimeout}: no answer before the deadline;
  - L{NoSuchReceiver}: nobody listens on that name (known at once, not after a timeout);
  - C{ConnectionLost} (from the transport) when the broker went away mid-call.

Ops raise C{ApplicationError(message, code=4xx)} for expected failures; any other exception is
reported to the caller as a 500 with its type and message, and its traceback stays in the
receiver's log.
"""


class ConversationError(Exception):
    """Base class of the errors a conversation ends with."""


class ApplicationError(ConversationError):
    """An expected failure an op reports to its caller, with an HTTP-like code (default 400)."""

    def __init__(self, message, code=400):
        super().__init__(message)
        self.message = message
        self.code = int(code)


class RemoteError(ConversationError):
    """The receiver answered with a failure."""

    def __init__(self, code, type, message, receiver=None, op=None):
        where = f" from {receiver}.{op}" if receiver and op else ""
        super().__init__(f"{code} {type}{where}: {message}")
        self.code = code
        self.type = type
        self.message = message


class ConversationTimeout(ConversationError):
    """No answer arrived before the deadline."""

    def __init__(self, receiver, op, timeout):
        super().__init__(f"no reply from {receiver!r} to {op!r} within {timeout:g} s")


class NoSuchReceiver(ConversationError):
    """Nobody listens on that name in this system."""

    def __init__(self, receiver):
        super().__init__(f"no process or service named {receiver!r} in this system")


class ProcessTerminated(ConversationError):
    """The calling process terminated while the conversation was open."""


def error_to_wire(exc):
    """The C{{code, type, message}} map for an exception raised by an op."""
    if isinstance(exc, ApplicationError):
        return {"code": exc.code, "type": type(exc).__name__, "message": exc.message}
    if isinstance(exc, RemoteError):
        # A failure of a call we made while handling: pass its code on, name where it came from.
        return {"code": exc.code, "type": exc.type, "message": exc.message}
    return {"code": 500, "type": type(exc).__name__, "message": str(exc)}


def error_from_wire(content, receiver=None, op=None):
    """The L{RemoteError} for a failure map received from C{receiver}; tolerant of bad maps."""
    if not isinstance(content, dict):
        content = {"message": repr(content)}
    code = content.get("code", 500)
    if not isinstance(code, int):
        code = 500
    type_, message = str(content.get("type", "Error")), str(content.get("message", ""))
    return RemoteError(code, type_, message, receiver, op)
