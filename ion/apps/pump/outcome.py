"""What a failed transfer means for the pump: retry it later, or report it as failed for good.

One rule, used by the consumer for every failure whatever its origin (a L{TransferError} of its
own transfers, or a transfer service's code carried by L{RemoteError}, no answer in time, no
transfer service yet):

  - transient (retry with backoff until the horizon): 499 transfer failed, 500 local failure,
    503 unavailable, 504 timed out;
  - permanent (one failure report, no retry): every other code, in practice the 4xx ones (404 not
    found, 403 refused, 417 unusable checksum method, 422 unusable path, ...).

L{RecentFailures} keeps a worker's last failures for C{ion status} and the web console.
"""

import collections

import attrs

from ion.apps.pump.transfer.errors import TRANSIENT_CODES, TransferError
from ion.core.log import redact
from ion.core.process import ConversationTimeout, NoSuchReceiver, RemoteError


def is_transient(code):
    """Whether a failure with this HTTP-like code may succeed when tried again later."""
    return code in TRANSIENT_CODES


@attrs.frozen
class Failure:
    """A classified failure: the report code, a one-line message, and whether to retry."""

    code: int
    message: str

    @property
    def transient(self):
        return is_transient(self.code)


def classify(error):
    """The L{Failure} for an exception raised by a transfer or a call to the transfer service.

    L{TransferError} and L{RemoteError} keep their code; no answer in time is a 504 and no transfer
    service listening (none started yet, or all restarting) a 503. Anything else is a local
    failure (500).
    """
    if isinstance(error, (TransferError, RemoteError)):
        return Failure(error.code, error.message)
    if isinstance(error, ConversationTimeout):
        return Failure(504, str(error))
    if isinstance(error, NoSuchReceiver):
        return Failure(503, f"no transfer service is running ({error})")
    return Failure(500, f"{type(error).__name__}: {error}")


class RecentFailures:
    """The last failures of one worker (consumer, sender, poll, watch, ingest), which its
    C{stats} op returns as C{last_failures}: C{ion status} shows the newest as the worker's
    last error with its age, the web console lists them.

    Each is a dict {time, code, reason} (and C{file} when one file failed); the reason is
    redacted, since a URL in it may carry a password. The same failure again (same code,
    reason and file, as a poll that cannot list its server meets it every pass) does not
    push the others out: the newest entry takes the later time and counts it in C{times}.
    """

    def __init__(self, clock, keep=50):
        self.clock = clock
        self._kept = collections.deque(maxlen=keep)

    def add(self, code, reason, file=None):
        entry = {"time": self.clock.seconds(), "code": code, "reason": redact(str(reason))}
        if file is not None:
            entry["file"] = file
        last = self._kept[-1] if self._kept else None
        same = ("code", "reason", "file")
        if last is not None and all(last.get(k) == entry.get(k) for k in same):
            last["time"] = entry["time"]
            last["times"] = last.get("times", 1) + 1
            return
        self._kept.append(entry)

    def __len__(self):
        return len(self._kept)

    def as_list(self):
        """Copies of the failures kept, oldest first (what C{stats} returns)."""
        return [dict(entry) for entry in self._kept]
