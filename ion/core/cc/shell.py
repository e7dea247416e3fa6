"""The interactive shell of a container: a Python prompt on the terminal with helpers for it.

C{twistd -n cc} opens it when stdin is a terminal (not with C{--no-shell}):

    >>> rpc('hello', 'hello', 'Hi')
    'Hello, Hi! (from host_123.3)'
    >>> spawn('ion.apps.hello.service')
    'host_123.6'
    >>> ps()

The container keeps running while you type. A helper starts its operation and returns at once;
the outcome is printed above the prompt when it arrives, like the container's log lines, without
disturbing the line being typed. Ctrl-D, Ctrl-C, C{exit()} or C{quit()} leave the shell, which
stops the container. L{ShellHelpers} are the commands (no terminal); L{start_shell} runs them
on the terminal.
"""

import builtins
import fcntl
import inspect
import itertools
import os
import pprint
import re
import struct
import termios
import tty

from twisted.conch.insults import insults
from twisted.conch.manhole import ColoredManhole, ManholeInterpreter
from twisted.internet import defer, fdesc, stdio, threads
from twisted.logger import Logger
from twisted.python import threadable

from ion.core.cc.cli import containers_table, format_table
from ion.core.cc.status import process_tree
from ion.core.process import NoSuchReceiver, Process

log = Logger()

# How long a stopping reactor waits for the terminal to take the last output.
FLUSH_TIMEOUT = 2

# The helpers the shell offers, in the order help() and the banner list them. The first line of
# each one's docstring is its line in help().
HELPERS = "ps containers msc apps spawn send rpc kill start_app stop_app help".split()


class ShellProcess(Process):
    """The process the shell's C{rpc()} and C{send()} speak from (spawned on first use)."""


_numbers = itertools.count()  # orders Pending handles and the lines typed


class Pending:
    """What a helper started. Its outcome is printed when it arrives; then C{done} is true and
    C{result} (or C{error}) holds it. C{when_done()} is a Deferred firing with this object."""

    def __init__(self, what):
        self.what = what
        self.done = False
        self.result = None
        self.error = None
        self._done = defer.Deferred()
        # Lets the shell tell the handle a helper just returned (not echoed) from an old one.
        self.number = next(_numbers)

    def __repr__(self):
        if not self.done:
            outcome = "waiting"
        elif self.error is not None:
            outcome = describe_error(self.error)
        else:
            outcome = repr(self.result)
        return f"<{self.what}: {outcome}>"

    def when_done(self):
        d = defer.Deferred()
        self._done.addCallback(lambda _: d.callback(self))
        return d

    def _finish(self, result=None, error=None):
        self.done, self.result, self.error = True, result, error
        self._done.callback(None)


def describe_error(error):
    """One line for an error: its type and message (C{RemoteError 404 ...})."""
    if isinstance(error, KeyError) and len(error.args) == 1:
        message = str(error.args[0])
    else:
        message = str(error)
    return f"{type(error).__name__} {message}" if message else type(error).__name__


def format_value(value):
    return pprint.pformat(value, width=100, sort_dicts=False)


class ShellHelpers:
    """The shell's commands, working against one container.

    C{show(text)} prints text for the user (in the shell: above the prompt). Helpers that wait
    for the container return a L{Pending} at once and print the outcome when it arrives; a
    failure is printed as one line and never raised.
    """

    def __init__(self, container, show):
        self.container = container
        self.show = show
        self._process = None
        self._process_lock = defer.DeferredLock()

    def namespace(self):
        """The names the shell offers."""
        namespace = {name: getattr(self, name) for name in HELPERS}
        namespace["container"] = self.container
        return namespace

    def banner(self):
        apps = ", ".join(self.container.apps.running) or "none"
        return (
            f"ION shell: container {self.container.id}, system {self.container.sysname}, "
            f"apps: {apps}\n"
            f"Helpers: {' '.join(name + '()' for name in HELPERS)}; "
            "Ctrl-D or Ctrl-C leaves (and stops the container).\n"
        )

    def print(self, text):
        try:
            self.show(text if text.endswith("\n") else text + "\n")
        except Exception:
            log.failure("shell: could not print {text!r}", text=text)

    # -- what runs in the background ---------------------------------------------------------

    def _start(self, what, work, report=format_value):
        """Run the coroutine C{work}; print C{report(result)} (unless None) or the error."""
        pending = Pending(what)
        d = defer.Deferred.fromCoroutine(work)

        def succeeded(result):
            try:
                text = report(result)
                if text is not None:
                    self.print(text)
            finally:
                pending._finish(result=result)

        def failed(failure):
            try:
                self.print(describe_error(failure.value))
            finally:
                pending._finish(error=failure.value)

        d.addCallbacks(succeeded, failed)
        d.addErrback(lambda f: log.failure("shell: reporting {what} failed", f, what=what))
        return pending

    async def shell_process(self):
        """The process calls are made from, spawned on first use (again if it was killed)."""
        async with self._process_lock:
            if self._process is None or self._process.lifecycle.final:
                self._process = await self.container.spawn(ShellProcess, name="shell")
            return self._process

    async def _rpc(self, dest, op, content=None, timeout=None):
        proc = await self.shell_process()
        return await proc.rpc(dest, op, content, timeout=timeout)

    # -- the helpers ------------------------------------------------------------------------

    def help(self):
        """Print this list: each helper and what it does."""
        helpers = [getattr(self, name) for name in HELPERS]
        rows = [(f"{h.__name__}{inspect.signature(h)}", h.__doc__.split("\n")[0]) for h in helpers]
        rows += [("container", "the Container itself"),
                 ("exit(), Ctrl-D, Ctrl-C", "leave the shell and stop the container")]
        width = max(len(usage) for usage, _ in rows)
        self.print("\n".join(f"{usage.ljust(width)}  {text}" for usage, text in rows))

    def ps(self):
        """Print the process tree: app > supervisor > process, with states and restarts."""
        rows = [
            ("  " * r["depth"] + r["name"], r["pid"], r["class"], r["state"],
             r["restarts"] or "", r["app"])
            for r in process_tree(self.container)
        ]
        self.print(format_table(("name", "pid", "class", "state", "restarts", "app"), rows))

    def containers(self):
        """Print the containers of this system, as the container agents know them."""
        return self._start("containers()", self._rpc("ccagent", "containers"), containers_table)

    def msc(self, conv_id=None, last=20, svg=None):
        """Print a message sequence chart from the observer app (svg='x.svg' also writes SVG).

        The chart comes from the system's C{observer} service, asked over rpc; the SVG file
        is written on the shell's host."""
        request = {"last": last} if conv_id is None else {"conv_id": conv_id}

        async def chart():
            try:
                if svg is not None:
                    text = await self._rpc("observer", "svg", request)
                    path = os.path.abspath(svg)
                    await threads.deferToThreadPool(
                        self.container.reactor, self.container.reactor.getThreadPool(),
                        _write_text, path, text,
                    )
                    self.print(f"wrote {path}")
                return await self._rpc("observer", "msc", request)
            except NoSuchReceiver:
                raise LookupError(
                    "no observer in this system: start res/apps/observer.app"
                ) from None

        return self._start("msc()", chart(), lambda text: text)

    def apps(self):
        """Print the running apps."""
        rows = [(name, app.spec.version, getattr(app.state, "pid", ""), app.spec.description)
                for name, app in self.container.apps.running.items()]
        self.print(format_table(("app", "version", "top process", "description"), rows))

    def spawn(self, module_or_class, name=None, container=None, **args):
        """Spawn a process, here or in another container; prints its pid.

        With container=<id>, through that container's agent. The pid is also C{.result} of
        what it returns."""

        async def spawn():
            if container not in (None, self.container.id):
                if not isinstance(module_or_class, str):
                    raise ValueError("to spawn in another container, name the module as a string")
                request = {"module": module_or_class, "name": name, "args": args or None}
                return await self._rpc(f"ccagent_{container}", "spawn", request)
            proc = await self.container.spawn(module_or_class, name=name, args=args or None)
            return proc.pid

        return self._start(f"spawn({module_or_class!r})", spawn())

    def send(self, dest, op, content=None):
        """Send a one-way message from the shell process to a service or pid."""

        async def send():
            proc = await self.shell_process()
            await proc.send(dest, op, content)

        return self._start(f"send({dest!r}, {op!r})", send(), lambda _: f"sent {op!r} to {dest!r}")

    def rpc(self, dest, op, content=None, timeout=None):
        """Call an op on a service or pid; prints the reply.

        The call is made from the shell process; the reply is also C{.result} of what it
        returns."""
        return self._start(f"rpc({dest!r}, {op!r})", self._rpc(dest, op, content, timeout))

    def kill(self, pid_or_name):
        """Terminate a process, given its pid or a name only one process has."""

        async def kill():
            return await self.container.terminate(self._find_process(pid_or_name))

        return self._start(f"kill({pid_or_name!r})", kill(), lambda proc: f"terminated {proc!r}")

    def start_app(self, path_or_name):
        """Start an app (and the apps it needs) from a .app/.rel file or an app name."""
        apps = self.container.apps

        async def start():
            before = set(apps.running)
            await apps.start_files([path_or_name])
            return [name for name in apps.running if name not in before]

        return self._start(
            f"start_app({path_or_name!r})",
            start(),
            lambda started: f"started {', '.join(started)}" if started else "already running",
        )

    def stop_app(self, name):
        """Stop a running app."""
        apps = self.container.apps

        async def stop():
            if name not in apps.running:
                running = ", ".join(apps.running) or "none"
                raise KeyError(f"no app {name!r} is running (running: {running})")
            await apps.stop(name)

        return self._start(f"stop_app({name!r})", stop(), lambda _: f"stopped {name}")

    def _find_process(self, pid_or_name):
        if self.container.registry.get(pid_or_name) is not None:
            return pid_or_name
        pids = [pid for pid, name, *_ in self.container.ps() if name == pid_or_name]
        if len(pids) == 1:
            return pids[0]
        if pids:
            raise KeyError(f"{len(pids)} processes are named {pid_or_name!r}: give a pid")
        raise KeyError(f"no process {pid_or_name!r} in container {self.container.id}")


# -- terminal plumbing --------------------------------------------------------------------


class Leave:
    """C{exit()} and C{quit()} in the shell. (Python's own would close sys.stdin, the terminal.)"""

    def __repr__(self):
        return "Use exit() or Ctrl-D to leave the shell (this stops the container)"

    def __call__(self, code=None):
        raise SystemExit(code)


class ShellInterpreter(ManholeInterpreter):
    """The manhole's interpreter, where C{exit()} leaves the shell and the L{Pending} a helper
    just returned is not echoed (its outcome is printed when it arrives)."""

    line_started = -1  # the number the Pending handles made by the current line start after

    def runcode(self, *args, **kwargs):
        self.line_started = next(_numbers)
        try:
            super().runcode(*args, **kwargs)
        except SystemExit:
            self.handler.leave()

    def displayhook(self, obj):
        if isinstance(obj, Pending) and obj.number > self.line_started:
            self.locals["_"] = obj
            return
        super().displayhook(obj)


def completions(namespace, word):
    """Names that complete C{word} (C{name} or C{obj.attr.partial}) from the namespace, without
    calling or evaluating anything: attributes are looked up with getattr only."""
    *path, partial = word.split(".")
    if not path:
        candidates = set(namespace) | set(dir(builtins))
        prefix = ""
    else:
        if path[0] not in namespace:
            return []
        obj = namespace[path[0]]
        for part in path[1:]:
            try:
                obj = getattr(obj, part)
            except Exception:
                return []
        candidates = set(dir(obj))
        prefix = ".".join(path) + "."
    hide_private = not partial.startswith("_")
    return sorted(
        prefix + name
        for name in candidates
        if name.startswith(partial) and not (hide_private and name.startswith("_"))
    )


class ShellTerminal(ColoredManhole):
    """Conch's colored manhole that keeps the terminal's history (no screen reset), leaves
    on Ctrl-D, Ctrl-C or C{exit()} by calling C{on_leave()}, and can print above the prompt."""

    def __init__(self, namespace, banner="", on_leave=None, terminal_width=None):
        super().__init__({"exit": Leave(), "quit": Leave(), **namespace})
        self.banner = banner
        self.on_leave = on_leave
        self.terminal_width = terminal_width
        self._executing = False
        self._leaving = False

    def connectionMade(self):
        super().connectionMade()
        self.interpreter = ShellInterpreter(self, self.namespace)

    def initializeScreen(self):
        if self.banner:
            self.terminal.write(self.banner.encode("utf-8"))
        self.terminal.write(self.ps[self.pn])
        self.setInsertMode()

    def connectionLost(self, reason):
        if self.on_leave is not None:
            on_leave, self.on_leave = self.on_leave, None
            on_leave()

    def handle_TAB(self):
        """Complete the name before the cursor; with several candidates, list them above
        the prompt. At the start of a line, TAB indents as usual."""
        before = b"".join(self.lineBuffer[: self.lineBufferIndex]).decode("utf-8", "replace")
        match = re.search(r"[A-Za-z_][\w.]*$", before)
        if match is None:
            return super().handle_TAB()
        word = match.group(0)
        matches = completions(self.namespace, word)
        if not matches:
            self.terminal.write(b"\x07")
            return
        common = os.path.commonprefix(matches)
        if len(common) > len(word):
            for ch in common[len(word) :]:
                self.characterReceived(ch.encode("utf-8"), False)
        elif len(matches) > 1:
            self.show_above("  ".join(m.rsplit(".", 1)[-1] for m in matches) + "\n")

    def lineReceived(self, line):
        self._executing = True
        try:
            more = self.interpreter.push(line)
        finally:
            self._executing = False
        if self._leaving:
            self.handle_QUIT()
            return
        self.pn = bool(more)
        if self._needsNewline():
            self.terminal.nextLine()
        self.terminal.write(self.ps[self.pn])

    def leave(self):
        """Leave once the line being run has finished."""
        self._leaving = True

    def handle_INT(self):
        # The terminal is raw, so Ctrl-C is a key here, not SIGINT: make it stop the container
        # as SIGINT does without a shell (and as the README says), not clear the line.
        self.terminal.write(b"^C")
        self.handle_QUIT()

    def handle_QUIT(self):
        # Not terminal.loseConnection(): that resets the terminal, clearing the screen.
        self.terminal.transport.loseConnection()

    def show_above(self, text):
        """Print text above the prompt: erase the input line, write the text, redraw the prompt
        and the input with the cursor where it was. While a line runs, the cursor is at the
        start of an empty line and the prompt comes after: the text is just written."""
        data = text.replace("\r\n", "\n").encode("utf-8", "replace")
        if not data:
            return
        terminal = self.terminal
        # The terminal is raw: ServerProtocol.write turns each "\n" into "\r\n".
        if self._executing:
            terminal.write(data)
            return
        if self.terminal_width is not None:
            self.width = self.terminal_width() or self.width
        terminal.write(b"\r")
        row = self._cursor_row()
        if row:
            terminal.cursorUp(row)
        terminal.eraseToDisplayEnd()
        terminal.write(data if data.endswith(b"\n") else data + b"\n")
        self.drawInputLine()
        behind = len(self.lineBuffer) - self.lineBufferIndex
        if behind:
            terminal.cursorBackward(behind)

    def _cursor_row(self):
        """The row of the cursor within an input line that wraps over several rows."""
        column = len(self.ps[self.pn]) + self.lineBufferIndex
        at_end = self.lineBufferIndex == len(self.lineBuffer)
        if column and at_end and column % self.width == 0:
            return (column - 1) // self.width  # still on the full row, waiting to wrap
        return column // self.width


def terminal_width(fd):
    """The terminal's width in columns (None when unknown)."""
    try:
        _, columns, _, _ = struct.unpack("hhhh", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return None
    return columns or None


class TerminalShell:
    """The shell on a local terminal: raw mode, conch's manhole on stdio, the container's log
    lines above the prompt, and the terminal restored however the shell ends."""

    def __init__(self, container, reactor, output, stdin=0, stdout=1):
        self.reactor = reactor
        self.output = output
        self.stdin = stdin
        self.stdout = stdout
        self.done = defer.Deferred()
        self.helpers = ShellHelpers(container, self.show)
        self.server = None
        self.restored = False
        self._saved_modes = None
        self._previous_divert = None
        self._shutdown_trigger = None
        self._flushed = None
        self._flush_timer = None

    @property
    def terminal(self):
        """The ShellTerminal while it is connected, else None."""
        return self.server.terminalProtocol if self.server is not None else None

    def start(self):
        self._saved_modes = termios.tcgetattr(self.stdin)
        tty.setraw(self.stdin)
        self._shutdown_trigger = self.reactor.addSystemEventTrigger(
            "before", "shutdown", self._reactor_stopping
        )
        self.server = insults.ServerProtocol(
            ShellTerminal,
            self.helpers.namespace(),
            banner=self.helpers.banner(),
            on_leave=self._user_left,
            terminal_width=lambda: terminal_width(self.stdout),
        )
        try:
            stdio.StandardIO(
                self.server, stdin=self.stdin, stdout=self.stdout, reactor=self.reactor
            )
        except BaseException:
            self.reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self.restore()
            raise
        self._previous_divert = self.output.divert
        self.output.divert = self.show

    def show(self, text):
        """Print text above the prompt (or, once the shell is gone, where output goes)."""
        if threadable.ioThread is not None and not threadable.isInIOThread():
            self.reactor.callFromThread(self.show, text)
            return
        terminal = self.terminal
        if terminal is not None and not self.restored:
            terminal.show_above(text)
        else:
            self.output.write(text)

    def restore(self):
        """Put the terminal and the log output back as they were (once)."""
        if self.restored:
            return
        self.restored = True
        if self.output.divert == self.show:
            self.output.divert = self._previous_divert
        for fd in {self.stdin, self.stdout}:
            fdesc.setBlocking(fd)
        try:
            termios.tcsetattr(self.stdin, termios.TCSANOW, self._saved_modes)
            # Leave the line editor's insert mode and start a fresh line.
            os.write(self.stdout, b"\x1b[4l\r\n")
        except (OSError, termios.error):
            pass
        if self._flush_timer is not None and self._flush_timer.active():
            self._flush_timer.cancel()
        if self._flushed is not None:
            self._flushed.callback(None)

    def _user_left(self):
        trigger, self._shutdown_trigger = self._shutdown_trigger, None
        self.restore()
        if trigger is not None:
            self.reactor.removeSystemEventTrigger(trigger)
            self.done.callback(None)

    def _reactor_stopping(self):
        # The terminal may still hold the container's last log lines: let it write them out,
        # then restore it (when the connection is lost). The reactor waits, but not for long.
        self._shutdown_trigger = None
        if self.terminal is None or self.restored:
            self.restore()
            return None
        self._flushed = defer.Deferred()
        self._flush_timer = self.reactor.callLater(FLUSH_TIMEOUT, self.restore)
        self.server.transport.loseConnection()
        return self._flushed


def start_shell(container, reactor, output, stdin=0, stdout=1):
    """Run the shell on the terminal C{stdin}/C{stdout} until the user leaves.

    Returns a Deferred fired (with None) when the user leaves (Ctrl-D, C{exit()}). While the
    shell runs, the lines C{output} would write (C{output.divert}) go above the prompt. The
    terminal is put back as it was when the user leaves, and also when the reactor stops
    first (then the Deferred never fires: the process is ending anyway).
    """
    shell = TerminalShell(container, reactor, output, stdin, stdout)
    shell.start()
    return shell.done


def _write_text(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
