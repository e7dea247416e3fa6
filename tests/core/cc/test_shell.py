"""The container shell: its helpers, printing above the prompt, and the real thing in a terminal."""

import os
import re
import sys
import termios

from twisted.conch.insults import insults
from twisted.internet import defer, main, protocol, reactor, task
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.testing import StringTransport
from twisted.python import failure
from twisted.trial import unittest

from ion.apps.hello.service import HelloService
from ion.core.cc import shell
from ion.core.cc.testing import make_container
from ion.core.process import ServiceProcess
from tests.waiting import until

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class Stuck(ServiceProcess):
    """Answers `wait` only when the test says so."""

    service = "stuck"

    def on_init(self):
        self.answers = []

    def op_wait(self, content, headers):
        d = defer.Deferred()
        self.answers.append(d)
        return d


class Printed:
    """A print function for the helpers that keeps what they print."""

    def __init__(self):
        self.texts = []

    def __call__(self, text):
        self.texts.append(text)

    def take(self):
        text, self.texts = "".join(self.texts), []
        return text


class HelperTests(unittest.TestCase):
    """The helpers against a container on the memory transport (no terminal)."""

    async def make(self, clock=None):
        self.container = await make_container(self, clock=clock)
        self.printed = Printed()
        self.helpers = shell.ShellHelpers(self.container, self.printed)
        return self.helpers

    async def finish(self, pending):
        """Wait for what a helper started; returns what it printed."""
        await pending.when_done()
        return self.printed.take()

    @defer.inlineCallbacks
    def test_ps(self):
        """ps() prints the process tree: children indented under their parent, with states,
        restart counts of supervised children, and the app a top process belongs to."""
        from ion.core.process import Supervisor

        helpers = yield defer.Deferred.fromCoroutine(self.make())
        parent = yield defer.Deferred.fromCoroutine(self.container.spawn(HelloService))
        child = yield defer.Deferred.fromCoroutine(parent.spawn_child(HelloService, name="kid"))
        sup = yield defer.Deferred.fromCoroutine(self.container.spawn(
            Supervisor, name="sup", args={"children": [{"id": "w", "spec": HelloService}]}))
        worker = sup.child("w")
        yield defer.Deferred.fromCoroutine(worker.crash("test"))
        self.flushLoggedErrors()
        yield defer.Deferred.fromCoroutine(sup.settled())
        self.assertIsNone(helpers.ps())
        lines = self.printed.take().splitlines()
        self.assertEqual(lines[0].split(), ["name", "pid", "class", "state", "restarts", "app"])
        self.assertEqual(lines[1].split(), ["hello", parent.pid, "HelloService", "ACTIVE"])
        self.assertEqual(lines[2].split(), ["kid", child.pid, "HelloService", "ACTIVE"])
        self.assertTrue(lines[2].startswith("  kid"))
        self.assertEqual(lines[3].split(), ["sup", sup.pid, "Supervisor", "ACTIVE"])
        self.assertEqual(lines[4].split(), ["hello", sup.child("w").pid, "HelloService", "ACTIVE", "1"])
        self.assertEqual(len(lines), 5)

    @defer.inlineCallbacks
    def test_spawn(self):
        """spawn() spawns by module name, with a name and args; prints and keeps the pid."""
        helpers = yield defer.Deferred.fromCoroutine(self.make())
        pending = helpers.spawn("ion.apps.hello.service", name="greeter", service="greeter")
        self.assertIsInstance(pending, shell.Pending)
        printed = yield defer.Deferred.fromCoroutine(self.finish(pending))
        proc = self.container.registry.get(pending.result)
        self.assertEqual(printed, repr(proc.pid) + "\n")
        self.assertEqual((proc.name, proc.service, proc.state), ("greeter", "greeter", "ACTIVE"))
        self.assertEqual(repr(pending), f"<spawn('ion.apps.hello.service'): {proc.pid!r}>")

    @defer.inlineCallbacks
    def test_spawn_error(self):
        """A spawn that fails prints one line and leaves the error on the Pending."""
        helpers = yield defer.Deferred.fromCoroutine(self.make())
        pending = helpers.spawn("no.such.module")
        printed = yield defer.Deferred.fromCoroutine(self.finish(pending))
        self.assertTrue(printed.startswith("SpawnError cannot spawn 'no.such.module'"), printed)
        self.assertEqual(printed.count("\n"), 1)
        self.assertIsNotNone(pending.error)

    @defer.inlineCallbacks
    def test_rpc(self):
        """rpc() prints the reply; calls come from one process named 'shell', spawned once."""
        helpers = yield defer.Deferred.fromCoroutine(self.make())
        hello = yield defer.Deferred.fromCoroutine(self.container.spawn(HelloService))
        first, second = helpers.rpc("hello", "hello", "Hi"), helpers.rpc("hello", "hello", "Ann")
        yield first.when_done()
        yield second.when_done()
        self.assertEqual(first.result, f"Hello, Hi! (from {hello.pid})")
        self.assertEqual(
            self.printed.take(),
            f"'Hello, Hi! (from {hello.pid})'\n'Hello, Ann! (from {hello.pid})'\n",
        )
        shells = [row for row in self.container.ps() if row[1] == "shell"]
        self.assertEqual([row[2] for row in shells], ["ShellProcess"])

    @defer.inlineCallbacks
    def test_rpc_structured_reply(self):
        """Replies are printed like Python values."""
        helpers = yield defer.Deferred.fromCoroutine(self.make())
        hello = yield defer.Deferred.fromCoroutine(self.container.spawn(HelloService))
        pending = helpers.rpc(hello.pid, "ping")
        printed = yield defer.Deferred.fromCoroutine(self.finish(pending))
        self.assertEqual(printed, repr(pending.result) + "\n")
        self.assertEqual(pending.result["pid"], hello.pid)

    @defer.inlineCallbacks
    def test_rpc_errors(self):
        """Errors are one line: type, code and message; the shell goes on."""
        helpers = yield defer.Deferred.fromCoroutine(self.make())
        yield defer.Deferred.fromCoroutine(self.container.spawn(HelloService))
        printed = yield defer.Deferred.fromCoroutine(self.finish(helpers.rpc("hello", "nope")))
        self.assertTrue(printed.startswith("RemoteError 404 "), printed)
        self.assertIn("no op 'nope'", printed)
        printed = yield defer.Deferred.fromCoroutine(self.finish(helpers.rpc("hello", "hello", 42)))
        self.assertTrue(printed.startswith("RemoteError 400 "), printed)
        printed = yield defer.Deferred.fromCoroutine(self.finish(helpers.rpc("nobody", "x")))
        self.assertTrue(printed.startswith("NoSuchReceiver "), printed)
        self.assertEqual(printed.count("\n"), 1)

    @defer.inlineCallbacks
    def test_rpc_timeout(self):
        """An rpc nobody answers in time prints ConversationTimeout."""
        clock = task.Clock()
        helpers = yield defer.Deferred.fromCoroutine(self.make(clock))
        stuck = yield defer.Deferred.fromCoroutine(self.container.spawn(Stuck))
        pending = helpers.rpc("stuck", "wait", timeout=30)
        yield defer.Deferred.fromCoroutine(until(lambda: stuck.answers, what="the request"))
        clock.advance(30)
        printed = yield defer.Deferred.fromCoroutine(self.finish(pending))
        self.assertTrue(printed.startswith("ConversationTimeout "), printed)
        for answer in stuck.answers:
            answer.callback("late")

    @defer.inlineCallbacks
    def test_shell_process_respawned(self):
        """Killing the shell's process is harmless: the next call spawns a new one."""
        helpers = yield defer.Deferred.fromCoroutine(self.make())
        yield defer.Deferred.fromCoroutine(self.container.spawn(HelloService))
        yield helpers.rpc("hello", "hello", "Hi").when_done()
        old = yield defer.Deferred.fromCoroutine(helpers.shell_process())
        yield helpers.kill("shell").when_done()
        pending = helpers.rpc("hello", "hello", "again")
        yield pending.when_done()
        self.assertIsNone(pending.error)
        new = yield defer.Deferred.fromCoroutine(helpers.shell_process())
        self.assertNotEqual(new.pid, old.pid)

    @defer.inlineCallbacks
    def test_send(self):
        """send() is one-way: it says it sent, or why it could not."""
        helpers = yield defer.Deferred.fromCoroutine(self.make())
        yield defer.Deferred.fromCoroutine(self.container.spawn(HelloService))
        printed = yield defer.Deferred.fromCoroutine(
            self.finish(helpers.send("hello", "hello", "x"))
        )
        self.assertEqual(printed, "sent 'hello' to 'hello'\n")
        printed = yield defer.Deferred.fromCoroutine(self.finish(helpers.send("nobody", "x")))
        self.assertTrue(printed.startswith("NoSuchReceiver "), printed)

    @defer.inlineCallbacks
    def test_kill(self):
        """kill() terminates by pid or by a name only one process has."""
        helpers = yield defer.Deferred.fromCoroutine(self.make())
        one = yield defer.Deferred.fromCoroutine(self.container.spawn(HelloService, name="one"))
        two = yield defer.Deferred.fromCoroutine(self.container.spawn(HelloService, name="two"))
        printed = yield defer.Deferred.fromCoroutine(self.finish(helpers.kill(one.pid)))
        self.assertEqual(printed, f"terminated {one!r}\n")
        self.assertEqual(one.state, "TERMINATED")
        yield defer.Deferred.fromCoroutine(self.finish(helpers.kill("two")))
        self.assertEqual(two.state, "TERMINATED")
        printed = yield defer.Deferred.fromCoroutine(self.finish(helpers.kill("two")))
        self.assertEqual(printed, f"KeyError no process 'two' in container {self.container.id}\n")

    @defer.inlineCallbacks
    def test_kill_ambiguous_name(self):
        """A name several processes share is not enough to kill one."""
        helpers = yield defer.Deferred.fromCoroutine(self.make())
        for _ in range(2):
            yield defer.Deferred.fromCoroutine(self.container.spawn(HelloService))
        printed = yield defer.Deferred.fromCoroutine(self.finish(helpers.kill("hello")))
        self.assertEqual(printed, "KeyError 2 processes are named 'hello': give a pid\n")

    @defer.inlineCallbacks
    def test_apps(self):
        """start_app() starts an app and what it needs; apps() lists them; stop_app() stops one."""
        helpers = yield defer.Deferred.fromCoroutine(self.make())
        printed = yield defer.Deferred.fromCoroutine(self.finish(helpers.start_app("hello")))
        self.assertEqual(printed, "started ioncore, hello\n")
        helpers.apps()
        rows = [line.split()[:2] for line in self.printed.take().splitlines()]
        self.assertEqual(rows, [["app", "version"], ["ioncore", "0.1"], ["hello", "0.1"]])
        printed = yield defer.Deferred.fromCoroutine(self.finish(helpers.stop_app("hello")))
        self.assertEqual(printed, "stopped hello\n")
        printed = yield defer.Deferred.fromCoroutine(self.finish(helpers.stop_app("hello")))
        self.assertEqual(printed, "KeyError no app 'hello' is running (running: ioncore)\n")

    @defer.inlineCallbacks
    def test_help(self):
        """help() has one line per helper; the namespace offers them all."""
        helpers = yield defer.Deferred.fromCoroutine(self.make())
        helpers.help()
        lines = self.printed.take().splitlines()
        namespace = helpers.namespace()
        for name in ("ps", "spawn", "send", "rpc", "kill", "apps", "start_app", "stop_app"):
            self.assertEqual(len([line for line in lines if line.startswith(name + "(")]), 1, name)
            self.assertTrue(callable(namespace[name]))
        self.assertIs(namespace["container"], self.container)
        self.assertIn(self.container.id, helpers.banner())

    @defer.inlineCallbacks
    def test_print_failure_is_contained(self):
        """A print function that fails is logged; the helper still completes."""
        helpers = yield defer.Deferred.fromCoroutine(self.make())

        def broken(text):
            raise OSError("terminal gone")

        helpers.show = broken
        pending = helpers.spawn(HelloService)
        yield pending.when_done()
        self.assertIsNone(pending.error)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)


class TerminalTests(unittest.SynchronousTestCase):
    """The line editor (conch's manhole) on a fake terminal."""

    def connect(self, namespace=None, width=None):
        self.left = []
        self.transport = StringTransport()
        server = insults.ServerProtocol(
            shell.ShellTerminal,
            dict(namespace or {}),
            banner="Welcome\n",
            on_leave=lambda: self.left.append(True),
            terminal_width=width,
        )
        server.makeConnection(self.transport)
        self.server = server
        self.terminal = server.terminalProtocol
        return self.terminal

    def written(self):
        data = self.transport.value()
        self.transport.clear()
        return data

    def type(self, data):
        self.server.dataReceived(data)

    def test_tab_completion(self):
        """TAB completes helper names and attributes; with several candidates it lists them
        above the prompt."""

        class Obj:
            alpha = 1
            alphabet = 2

        terminal = self.connect({"containers": 1, "obj": Obj()})
        self.type(b"conta\t")
        self.assertEqual(b"".join(terminal.lineBuffer), b"containers")
        terminal = self.connect({"containers": 1, "obj": Obj()})
        self.type(b"obj.al\t")
        self.assertEqual(b"".join(terminal.lineBuffer), b"obj.alpha")
        self.written()
        self.type(b"\t")
        self.assertIn(b"alpha  alphabet", self.written())
        self.assertEqual(b"".join(terminal.lineBuffer), b"obj.alpha")

    def test_completions_table(self):
        """completions() looks names up in the namespace and attributes with getattr only;
        private names only when asked for."""
        ns = {"ps": 1, "print_it": 2, "obj": type("O", (), {"x1": 1, "x2": 2, "_p": 3})()}
        self.assertEqual(shell.completions(ns, "ps"), ["ps"])
        self.assertIn("print_it", shell.completions(ns, "pr"))
        self.assertEqual(shell.completions(ns, "obj.x"), ["obj.x1", "obj.x2"])
        self.assertEqual(shell.completions(ns, "nope.x"), [])
        self.assertNotIn("obj._p", shell.completions(ns, "obj."))
        self.assertIn("obj._p", shell.completions(ns, "obj._"))

    def test_banner_then_prompt(self):
        """The banner and the prompt are written without clearing the screen."""
        self.connect()
        data = self.written()
        self.assertTrue(data.startswith(b"Welcome\r\n>>> "), data)
        self.assertNotIn(b"\x1bc", data)

    def test_show_above_prompt(self):
        """Text goes above the prompt; the line being typed is redrawn with the cursor where it
        was."""
        terminal = self.connect()
        self.type(b"abcd\x1b[D\x1b[D")  # two left arrows: the cursor is after "ab"
        self.written()
        terminal.show_above("log line one\nlog line two\n")
        self.assertEqual(
            self.written(),
            b"\r\x1b[J" + b"log line one\r\nlog line two\r\n" + b">>> abcd" + b"\x1b[2D",
        )
        self.type(b"X\r")
        self.assertEqual(terminal.historyLines, [b"abXcd"])

    def test_show_above_adds_missing_newline(self):
        """Text without a final newline still leaves the prompt on its own line."""
        terminal = self.connect()
        self.written()
        terminal.show_above("no newline")
        self.assertEqual(self.written(), b"\r\x1b[J" + b"no newline\r\n" + b">>> ")

    def test_show_above_wrapped_input(self):
        """An input line wrapped over several rows is erased from its first row."""
        terminal = self.connect(width=lambda: 10)
        self.type(b"x" * 20)  # 24 columns with the prompt: the cursor is on the third row
        self.written()
        terminal.show_above("log\n")
        self.assertEqual(self.written(), b"\r\x1b[2A\x1b[J" + b"log\r\n" + b">>> " + b"x" * 20)

    def test_output_while_a_line_runs(self):
        """What is shown while a line runs (a helper printing) is written as it is, and the
        prompt comes once, after it."""
        terminal = self.connect({"say": lambda: terminal.show_above("said\n")})
        self.written()
        self.type(b"say()\r")
        data = self.written()
        self.assertTrue(data.endswith(b"\r\nsaid\r\n>>> "), data)
        self.assertNotIn(b"\x1b[J", data)

    def test_pending_not_echoed(self):
        """The Pending a helper returns is not echoed; it is in `_`, and echoed later on."""
        done = shell.Pending("rpc('a', 'b')")
        done._finish(result="ok")
        terminal = self.connect({"call": lambda: shell.Pending("rpc('a', 'b')"), "done": done})
        self.written()
        self.type(b"call()\r")
        data = self.written()
        self.assertTrue(data.endswith(b"\r\n>>> "), data)
        self.assertNotIn(b"<rpc", data)
        self.assertIsInstance(terminal.namespace["_"], shell.Pending)
        self.type(b"done\r")
        self.assertIn(b"<rpc('a', 'b'): 'ok'>", self.written())

    def test_errors_do_not_end_the_shell(self):
        """An exception in a line is printed; the shell carries on."""
        self.connect()
        self.written()
        self.type(b"1/0\r")
        self.assertIn(b"ZeroDivisionError", self.written())
        self.type(b"6*7\r")
        self.assertIn(b"42", self.written())
        self.assertFalse(self.transport.disconnecting)

    def test_ctrl_d_leaves(self):
        """Ctrl-D on an empty line leaves (without resetting the screen); on a line with text it
        only beeps."""
        self.connect()
        self.type(b"1\x04")
        self.assertFalse(self.transport.disconnecting)
        self.type(b"\x7f\x04")
        self.assertTrue(self.transport.disconnecting)
        self.assertNotIn(b"\x1bc", self.written())
        self.server.connectionLost(None)
        self.assertEqual(self.left, [True])

    def test_ctrl_c_leaves(self):
        """Ctrl-C leaves the shell (which stops the container), whatever is typed on the line,
        rather than printing KeyboardInterrupt and staying."""
        self.connect()
        self.written()
        self.type(b"1 +\x03")
        self.assertTrue(self.transport.disconnecting)
        self.assertNotIn(b"KeyboardInterrupt", self.written())
        self.server.connectionLost(None)
        self.assertEqual(self.left, [True])

    def test_exit_leaves(self):
        """exit() and raising SystemExit leave once the line has run."""
        for line in (b"exit()\r", b"quit()\r", b"raise SystemExit(3)\r"):
            self.connect()
            self.type(line)
            self.assertTrue(self.transport.disconnecting, line)


class ReactorProxy:
    """The real reactor, except that shutdown triggers are kept for the test to run."""

    def __init__(self, reactor):
        self._reactor = reactor
        self.triggers = {}

    def addSystemEventTrigger(self, phase, event, f, *args, **kwargs):
        handle = object()
        self.triggers[handle] = (phase, event, f)
        return handle

    def removeSystemEventTrigger(self, handle):
        del self.triggers[handle]

    def __getattr__(self, name):
        return getattr(self._reactor, name)


class Output:
    """Stands in for the tap's LogOutput."""

    def __init__(self):
        self.divert = None
        self.written = []

    def write(self, text):
        if self.divert is not None:
            self.divert(text)
        else:
            self.written.append(text)


class PseudoTerminal:
    """A pty pair: the shell gets the slave side, the test types and reads on the master."""

    def __init__(self, testcase):
        self.master, slave = os.openpty()
        self.stdin, self.stdout = slave, os.dup(slave)
        self.cooked = termios.tcgetattr(slave)
        self.output = b""
        os.set_blocking(self.master, False)
        for fd in (self.master, self.stdin, self.stdout):
            testcase.addCleanup(os.close, fd)

    def modes(self):
        return termios.tcgetattr(self.stdin)

    def type(self, data):
        os.write(self.master, data)

    async def read_until(self, text, timeout=10):
        """Read what the shell wrote until `text` appears; returns everything read so far."""

        def seen():
            try:
                self.output += os.read(self.master, 65536)
            except BlockingIOError:
                pass
            return text in self.output

        await until(seen, timeout, lambda _: f"{text!r}; got {self.output!r}", interval=0.02)
        return self.output


class StartShellTests(unittest.TestCase):
    """start_shell on a pseudo-terminal, in this process."""

    async def start(self):
        self.container = await make_container(self)
        self.pty = PseudoTerminal(self)
        self.output = Output()
        self.reactor = ReactorProxy(reactor)
        self.done = shell.start_shell(
            self.container, self.reactor, self.output, stdin=self.pty.stdin, stdout=self.pty.stdout
        )
        self.addCleanup(self.shut_down)
        await self.pty.read_until(b">>> ")

    @defer.inlineCallbacks
    def shut_down(self):
        """What the reactor does at shutdown: run the triggers (waiting for them), then
        disconnect what is left."""
        for _, _, trigger in list(self.reactor.triggers.values()):
            yield trigger()
        for selectable in reactor.getReaders() + reactor.getWriters():
            if getattr(selectable, "fd", None) in (self.pty.stdin, self.pty.stdout):
                reactor.removeReader(selectable)
                reactor.removeWriter(selectable)
                selectable.connectionLost(failure.Failure(main.CONNECTION_LOST))

    @defer.inlineCallbacks
    def test_session(self):
        """Raw mode and diverted logs while the shell runs; both restored on Ctrl-D, and the
        Deferred fires."""
        yield defer.Deferred.fromCoroutine(self.start())
        self.assertNotEqual(self.pty.modes(), self.pty.cooked)
        self.assertIsNotNone(self.output.divert)
        self.assertEqual(list(self.reactor.triggers.values())[0][:2], ("before", "shutdown"))
        yield defer.Deferred.fromCoroutine(self.container.spawn(HelloService))
        self.pty.type(b"rpc('hello', 'hello', 'Hi')\r")
        yield defer.Deferred.fromCoroutine(self.pty.read_until(b"'Hello, Hi! (from "))
        self.output.write("a log line\n")
        yield defer.Deferred.fromCoroutine(self.pty.read_until(b"\r\x1b[Ja log line\r\n>>> "))
        self.pty.type(b"\x04")
        result = yield self.done
        self.assertIsNone(result)
        self.assertEqual(self.pty.modes(), self.pty.cooked)
        self.assertIsNone(self.output.divert)
        self.assertEqual(self.reactor.triggers, {})
        self.output.write("after\n")
        self.assertEqual(self.output.written, ["after\n"])

    @defer.inlineCallbacks
    def test_reactor_stops_first(self):
        """When the reactor shuts down while the shell runs, the last log lines still reach the
        terminal, and then it is restored."""
        yield defer.Deferred.fromCoroutine(self.start())
        self.output.write("last words\n")
        yield self.shut_down()
        self.assertEqual(self.pty.modes(), self.pty.cooked)
        self.assertIsNone(self.output.divert)
        self.assertFalse(self.done.called)
        seen = yield defer.Deferred.fromCoroutine(self.pty.read_until(b"\x1b[4l"))
        self.assertIn(b"last words\r\n>>> \x1b[4l", seen)


class TerminalSession(protocol.ProcessProtocol):
    """A child process on a pseudo-terminal: what it wrote, and how it ended."""

    def __init__(self):
        self.output = b""
        self.seen = 0
        self.waiting = None
        self.reason = None
        self._ended = []

    def outReceived(self, data):
        self.output += data
        self._check()

    def wait_for(self, pattern, timeout=20):
        """A Deferred firing with the regex match of `pattern` in the output after the last
        match; fails after `timeout` seconds."""
        d = defer.Deferred()
        self.waiting = (re.compile(pattern), d)
        self._check()
        return d.addTimeout(timeout, reactor).addErrback(self._timed_out, pattern)

    def _timed_out(self, failure, pattern):
        failure.trap(defer.TimeoutError)
        self.waiting = None
        raise AssertionError(f"{pattern!r} not seen; the terminal showed {self.output!r}")

    def _check(self):
        if self.waiting is None:
            return
        regex, d = self.waiting
        match = regex.search(self.output, self.seen)
        if match:
            self.waiting, self.seen = None, match.end()
            d.callback(match)

    def when_ended(self):
        """A Deferred firing with the reason the process ended (ProcessDone: exit status 0)."""
        if self.reason is not None:
            return defer.succeed(self.reason)
        d = defer.Deferred()
        self._ended.append(d)
        return d

    def processEnded(self, reason):
        self.reason = reason.value
        ended, self._ended = self._ended, []
        for d in ended:
            d.callback(self.reason)


class EndToEndTests(unittest.TestCase):
    """`twistd -n cc res/apps/hello.app` with a terminal: the shell an operator sees."""

    timeout = 90

    @defer.inlineCallbacks
    def test_shell_in_terminal(self):
        session = TerminalSession()
        env = dict(os.environ, PYTHONPATH=ROOT, TERM="xterm")
        process = reactor.spawnProcess(
            session,
            sys.executable,
            [*TWISTD, "--pidfile=", "-n", "cc", "res/apps/hello.app"],
            env=env,
            path=ROOT,
            usePTY=True,
        )

        def kill_if_running():
            if process.pid is not None:
                process.signalProcess("KILL")
                return session.when_ended()

        self.addCleanup(kill_if_running)

        yield session.wait_for(rb">>> ")
        process.write(b"rpc('hello', 'hello', 'Hi')\r")
        yield session.wait_for(rb"'Hello, Hi! \(from [^)]+\)'")
        process.write(b"spawn('ion.apps.hello.service')\r")
        yield session.wait_for(rb"\r\n'[^'\r\n]+\.\d+'\r\n")
        process.write(b"ps()\r")
        yield session.wait_for(rb"name +pid +class +state +restarts +app\r\n")
        table = yield session.wait_for(rb"((?:[^\r\n]+\r\n)+)>>> ")
        rows = table.group(1).decode().splitlines()
        self.assertEqual(len([row for row in rows if " HelloService " in row]), 2, rows)

        process.write(b"\x04")
        ended = yield session.when_ended().addTimeout(10, reactor)
        if not isinstance(ended, ProcessDone):
            self.assertIsInstance(ended, ProcessTerminated)
            self.fail(f"exit status {ended.exitCode}, signal {ended.signal}: {session.output!r}")
        self.assertIn(b"\x1b[4l", session.output)  # the terminal left insert mode

    @defer.inlineCallbacks
    def test_ctrl_c_stops_the_container(self):
        """Ctrl-C at the prompt stops the container cleanly (status 0), as the README says."""
        session = TerminalSession()
        env = dict(os.environ, PYTHONPATH=ROOT, TERM="xterm")
        process = reactor.spawnProcess(
            session, sys.executable, [*TWISTD, "--pidfile=", "-n", "cc", "res/apps/hello.app"],
            env=env, path=ROOT, usePTY=True,
        )

        def kill_if_running():
            if process.pid is not None:
                process.signalProcess("KILL")
                return session.when_ended()

        self.addCleanup(kill_if_running)
        yield session.wait_for(rb">>> ")
        process.write(b"ps(\x03")
        ended = yield session.when_ended().addTimeout(20, reactor)
        self.assertIsInstance(ended, ProcessDone, session.output)
        self.assertIn(b"stopped", session.output)
        self.assertNotIn(b"KeyboardInterrupt", session.output)
        self.assertNotIn(b"Traceback", session.output)
