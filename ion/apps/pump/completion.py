"""The completion trigger: what a subscription does once a file is complete in place.

The C{on_complete} argument of a consumer (L{ion.apps.pump.args.OnComplete}):

  - C{command}: a local command as a list of strings (never a shell string), run with the
    file's path appended as its last argument, stdin closed, in the pump's environment;
  - C{complete_exchange}: an exchange the file's notice is published to (confirmed, with its
    usual topic), so a downstream process can start on it;
  - C{timeout}: seconds the command may run (default 60) before it is killed;
  - C{all_files}: run for every delivered file, not only for partitioned ones (default False).

The command runs through C{reactor.spawnProcess} (no thread, no shell); its exit status is
logged, and a non-zero exit, a signal or the timeout is a failure report (500) for the file
carrying the last line the command wrote to stderr (only the last 4 KiB of stderr are kept).
The consumer acks the file's notice only once its trigger has run, so the command runs at
least once for each file delivered, and once in the usual case.
"""

import os

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol

# The tail of a command's stderr that is kept, for its last line.
STDERR_TAIL = 4096
MAX_LINE = 300


@attrs.frozen
class Outcome:
    """How a command ended: C{code} (its exit status, or None when killed by C{signal}),
    C{timed_out}, and the C{last_line} it wrote to stderr."""

    code: int | None
    signal: int | None
    timed_out: bool
    last_line: str

    @property
    def ok(self):
        return self.code == 0 and not self.timed_out

    def describe(self):
        if self.timed_out:
            how = "was killed after its timeout"
        elif self.code is None and self.signal is None:
            how = "did not run"
        elif self.code is None:
            how = f"was killed by signal {self.signal}"
        else:
            how = f"exited {self.code}"
        return how + (f": {self.last_line}" if self.last_line else "")


class _Command(ProcessProtocol):
    def __init__(self):
        self.ended = Deferred()
        self.tail = b""

    def connectionMade(self):
        self.transport.closeStdin()

    def errReceived(self, data):
        self.tail = (self.tail + data)[-STDERR_TAIL:]

    def processEnded(self, reason):
        self.ended.callback(reason.value)

    def last_line(self):
        lines = [line.strip() for line in self.tail.decode("utf-8", "replace").splitlines()]
        lines = [line for line in lines if line]
        return lines[-1][:MAX_LINE] if lines else ""


async def run_command(reactor, command, path, timeout):
    """Run C{command} (a list of strings) with C{path} appended; its L{Outcome}. Killed
    (SIGKILL) after C{timeout} seconds."""
    protocol = _Command()
    argv = [*command, path]
    try:
        reactor.spawnProcess(protocol, argv[0], argv, env=dict(os.environ))
    except OSError as exc:
        return Outcome(None, None, False, f"cannot start {argv[0]}: {exc.strerror or exc}")
    timed_out = []

    def kill():
        timed_out.append(True)
        try:
            protocol.transport.signalProcess("KILL")
        except Exception:
            pass  # ended meanwhile

    call = reactor.callLater(timeout, kill)
    try:
        status = await protocol.ended
    finally:
        if call.active():
            call.cancel()
    return Outcome(
        getattr(status, "exitCode", None),
        getattr(status, "signal", None),
        bool(timed_out),
        protocol.last_line(),
    )
