"""The completion trigger: what a subscription does once a file is complete in place.

The C{on_complete} argument of a consumer (L{OnComplete}):

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
class OnComplete:
    """A checked C{on_complete} argument (see the module docstring)."""

    command: tuple | None = None
    complete_exchange: str | None = None
    timeout: float = 60
    all_files: bool = False

    @classmethod
    def parse(cls, value, who, is_exchange):
        """The L{OnComplete} of the argument C{value} (None stays None); ValueError naming
        C{who}, the key and the value otherwise. C{is_exchange} checks an exchange name."""
        if value is None:
            return None
        keys = ("command", "complete_exchange", "timeout", "all_files")
        if not isinstance(value, dict) or set(value) - set(keys):
            raise ValueError(
                f"{who}: on_complete must be a dict with keys {', '.join(keys)}, got {value!r}"
            )
        command = value.get("command")
        if command is not None and (
            not isinstance(command, (list, tuple))
            or not command
            or not all(isinstance(a, str) and "\0" not in a for a in command)
            or not command[0]
        ):
            raise ValueError(
                f"{who}: on_complete command must be a list of strings (the program, then its "
                f"arguments; no shell), got {command!r}"
            )
        exchange = value.get("complete_exchange")
        if exchange is not None and not is_exchange(exchange):
            raise ValueError(
                f"{who}: on_complete complete_exchange must be an exchange name, got {exchange!r}"
            )
        if command is None and exchange is None:
            raise ValueError(f"{who}: on_complete needs a command, a complete_exchange or both")
        timeout = value.get("timeout", 60)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f"{who}: on_complete timeout must be seconds > 0, got {timeout!r}")
        all_files = value.get("all_files", False)
        if not isinstance(all_files, bool):
            raise ValueError(
                f"{who}: on_complete all_files must be True or False, got {all_files!r}"
            )
        return cls(None if command is None else tuple(command), exchange, timeout, all_files)

    def applies(self, result):
        """Whether the trigger runs for a delivered file's L{TransferResult}."""
        return self.all_files or result.blocks > 0


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
