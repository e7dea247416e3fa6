"""The state of a process's link to its server, and retry bursts for a push link that is down.

A L{Link} is C{idle} until its first transfer, then C{up} or C{down}. A connection failure
(code 503: refused, reset, unreachable, host unknown) takes it down. A sender then tries the
link again in bursts: C{burst} tries C{gap} seconds apart, then a C{pause}, then another
burst, and so on for as long as the link stays down (the defaults, 5 tries 3 s apart then
30 s, follow the pysubtask design in the seeds). Only one transfer at a time tries a link
that is down (the probe): the files arriving or falling due meanwhile wait for its outcome
instead of each spending a try, and go back to the retry queue, due at the link's next try,
when it fails. Nothing is given up while the link is down: its files wait in the on-disk
retry queue however long it lasts (the retry horizon counts only other failures).
"""

from twisted.internet import defer

from ion.apps.pump.outcome import Failure

LINK_DOWN = 503


class Link:
    """See the module docstring; C{clock} gives the time."""

    def __init__(self, clock, burst=5, gap=3.0, pause=30.0):
        self.clock = clock
        self.burst = burst
        self.gap = gap
        self.pause = pause
        self.state = "idle"
        self.tries = 0  # failed tries since the link went down
        self.next_try = None  # when the next try may go (while down)
        self.reason = None  # the last failure's message
        self.since = None  # when the state last changed
        self._probe = None  # Deferreds of those waiting for the probe's outcome

    def _set(self, state):
        if state != self.state:
            self.state = state
            self.since = self.clock.seconds()

    def succeeded(self):
        """A transfer went through: the link is up."""
        self.tries = 0
        self.next_try = None
        self.reason = None
        self._set("up")

    def failed(self, message, counted=True):
        """A connection failure: down, and the next try C{gap} later, or C{pause} after a
        whole burst. C{counted}: the failure was a try of a link that was up or a probe (a
        parallel transfer failing with it is not another try). Returns C{next_try}."""
        self.reason = message
        if counted or self.state != "down":
            self.tries += 1
            wait = self.pause if self.tries % self.burst == 0 else self.gap
            self.next_try = self.clock.seconds() + wait
        self._set("down")
        return self.next_try

    def note(self, failure, probing=False):
        """Record the outcome of a transfer (a consumer's fetch is not gated; L{attempt}'s
        are, C{probing} for the probe's): None for success, else its L{Failure}."""
        if failure is None or failure.code < 500:
            self.succeeded()  # a 4xx is the server's answer: the link works
        elif failure.code == LINK_DOWN:
            self.failed(failure.message, counted=probing or self.state != "down")

    def due(self):
        """When a file that could not go should come back: the next try, or, when that has
        come and another transfer is trying the link now, C{gap} from now (never a time
        past, which would bring it straight back while the try goes on)."""
        now = self.clock.seconds()
        if self.next_try is None or self.next_try <= now:
            return now + self.gap
        return self.next_try

    def blocked(self):
        """The L{Failure} of a transfer that may not try yet (the link is down and its next
        try has not come), else None: a caller with work to do before the transfer (staging a
        file) asks first. (A transfer arriving while another tries the link waits for that
        try's outcome in L{attempt}.)"""
        if self.state == "down" and self.clock.seconds() < self.next_try:
            return self._down()
        return None

    def _down(self):
        return Failure(LINK_DOWN, f"link down: {self.reason}")

    async def attempt(self, work):
        """
        Run C{work()} (an async callable returning C{(result, Failure or None)}) through the
        link: at once while it is up; while it is down, only as the probe once C{next_try}
        has come, else C{(None, Failure(503, ...))} without trying (the caller retries it at
        C{next_try}).
        """
        if self.state == "down":
            if self._probe is not None:
                waiting = defer.Deferred()
                self._probe.append(waiting)
                await waiting
            if self.state == "down" and (
                self._probe is not None or self.clock.seconds() < self.next_try
            ):
                return None, self._down()
        probing = self.state == "down"
        if probing:
            self._probe = []
        try:
            result, failure = await work()
        except BaseException:
            self._wake(probing)
            raise
        self.note(failure, probing)
        self._wake(probing)
        return result, failure

    def _wake(self, probing):
        if not probing:
            return
        waiting, self._probe = self._probe, None
        for d in waiting:
            d.callback(None)

    def describe(self):
        """The link for a heartbeat or the stats: C{{'link': state, ...}}."""
        return {"link": self.state, "link_since": self.since, "link_next_try": self.next_try}
