"""The `twistd -n cc` command line: options, clean errors for bad input, boot and stop."""

import io
import os
import signal
import subprocess
import sys
import time

from twisted.internet import threads
from twisted.python import usage
from twisted.trial import unittest

import ion
from ion.core.cc import tap
from ion.core.messaging.amqp import AmqpAddress
from tests.broker import get_broker
from tests.core.test_log import NASTY_PASSWORDS, assertHidden

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
RES = os.path.join(ROOT, "res")
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def twistd(*args, cwd=None, timeout=60, **kw):
    """Run `twistd --pidfile= -n cc ...` (the installed plugin) and return the CompletedProcess."""
    cmd = [*TWISTD, "--pidfile=", "-n", "cc", *args]
    env = kw.pop("env", None) or dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(
        cmd, cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL, **kw
    )


class OptionParsing:
    """For test cases of `cc`'s options: parse them as twistd does."""

    def parse(self, *argv):
        opts = tap.Options()
        opts.parseOptions(["--res", RES, *argv])
        return opts

    def bad(self, *argv):
        """Parse argv expecting bad input: returns the single stderr line (exit status 2)."""
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        e = self.assertRaises(SystemExit, self.parse, *argv)
        self.assertEqual(e.code, 2)
        lines = err.getvalue().splitlines()
        self.assertEqual(len(lines), 1, lines)
        return lines[0]


class OptionsTests(OptionParsing, unittest.SynchronousTestCase):

    def test_defaults(self):
        """With no options the container runs on memory:// as system 'ion' with the core app."""
        opts = self.parse()
        self.assertEqual(opts["broker_url"], "memory://")
        self.assertEqual(opts["sysname"], "ion")
        self.assertEqual(opts["files"], [])

    def test_defines_reach_config(self):
        """-D module:key=value overrides config; values are literals when they parse."""
        opts = self.parse("-D", "ion.core.process:rpc_timeout=3", "-D", "ion.apps.hello:greeting=Hi there")
        self.assertEqual(opts["config"].get("ion.core.process", "rpc_timeout"), 3)
        self.assertEqual(opts["config"].get("ion.apps.hello", "greeting"), "Hi there")

    def test_bad_define(self):
        self.assertIn("module:key=value", self.bad("-D", "nocolon"))

    def test_broker_options(self):
        """Broker host/port/user/vhost options build an amqp URL; --broker is taken as is."""
        opts = self.parse("--broker-host", "rabbit.example", "--broker-port", "5673", "--broker-vhost", "v1")
        self.assertEqual(opts["broker_url"], "amqp://guest@rabbit.example:5673/v1")
        opts = self.parse("--broker", "amqp://u:p@h:1/x", "-s", "sys2")
        self.assertEqual((opts["broker_url"], opts["sysname"]), ("amqp://u:p@h:1/x", "sys2"))

    def test_bad_broker_url(self):
        """A broker URL that cannot work is one line, status 2, the password never shown."""
        for argv, expected in [
            (("--broker", "amqp://h:99999/"), "Port out of range"),
            (("--broker", "amqp://h:99999/", "--broker-host", "x"), "Port out of range"),
            (("--broker", "amqp://u:sekrit@[::1/"), "Invalid IPv6 URL"),
            (("--broker", "amqp://u:sekrit@[::1/", "--broker-user", "bob"), "Invalid IPv6 URL"),
            (("--broker", "mqtt://h/"), "unsupported broker URL scheme 'mqtt'"),
        ]:
            line = self.bad(*argv)
            self.assertIn(expected, line)
            self.assertNotIn("sekrit", line)

    def test_nasty_broker_passwords(self):
        """A broker password holding characters that end a URL early (a quote, a space,
        '/', '?', '#', '@', brackets) is not shown by the error for a URL that cannot work."""
        for password in NASTY_PASSWORDS:
            for url in (
                f"amqp://pump:{password}@broker.example:99999/",
                f"amqp://pump:{password}@broker.example/?heartbeat=5",
                f"amqp://pump:{password}@broker.example:5672/a/b",
            ):
                line = self.bad("--broker", url)
                assertHidden(self, password, line)
                self.assertIn("bad AMQP URL", line)
            url = f"amqp://pump:{password}@broker.example:5672/"
            try:
                address = AmqpAddress.parse(url)
            except ValueError as e:
                assertHidden(self, password, str(e))
            else:
                assertHidden(self, password, f"{address} {address!r}")

    def test_args(self):
        """-a takes k=v pairs or a dict literal; apparg_<app> becomes that app's kwargs."""
        opts = self.parse("-a", "sysname=s3,apparg_hello={'instances': 2}")
        self.assertEqual(opts["sysname"], "s3")
        self.assertEqual(opts["apparg"], {"hello": {"instances": 2}})
        self.assertRaises(usage.UsageError, self.parse, "-a", "{'unclosed'")
        opts = self.parse("-a", "apparg_hello={'instances': 2, 'x': [1, 2]},sysname=s4")
        self.assertEqual(opts["apparg"], {"hello": {"instances": 2, "x": [1, 2]}})
        self.assertEqual(opts["sysname"], "s4")

    def test_missing_app_file(self):
        """A missing app file is one line naming it, exit status 2."""
        line = self.bad(os.path.join(RES, "apps", "missing.app"))
        self.assertIn("missing.app", line)
        self.assertIn("no such file", line)

    def test_malformed_app_file(self):
        """A malformed app file is one line naming the file and line."""
        path = self.mktemp() + ".app"
        with open(path, "w") as f:
            f.write("{\n 'type': 'application',\n 'name': 'x'\n 'mod': ('m',),\n}\n")
        line = self.bad(path)
        self.assertTrue(line.startswith(f"cc: {path}:"), line)

    def test_unknown_app_key(self):
        path = self.mktemp() + ".app"
        with open(path, "w") as f:
            f.write("{'type': 'application', 'name': 'x', 'mod': ('ion.apps.hello.app',), 'aplications': []}")
        line = self.bad(path)
        self.assertIn("unknown key 'aplications'", line)
        self.assertIn("valid keys are", line)


class TwistdTests(unittest.TestCase):
    """The real command, as a subprocess."""

    def test_version(self):
        result = twistd("--version")
        self.assertEqual((result.returncode, result.stdout.strip()), (0, f"ION {ion.__version__}"))

    def test_short_options_do_not_collide(self):
        """-h is help (not the broker host); -n is twistd's "no daemon" only: cc has
        --no-shell, --broker-host and --broker-port in their long forms."""
        result = twistd("-h")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("--broker-host=", result.stdout)
        self.assertNotIn("-p, --broker-port", result.stdout)
        for short in ("-n", "-p"):
            result = twistd(short, "5672", "--no-shell")
            self.assertNotEqual(result.returncode, 0)
            self.assertIn(f"option {short} not recognized", result.stdout + result.stderr)

    def test_missing_file_exit_2_no_traceback(self):
        result = twistd("res/apps/missing.app")
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stderr.strip().count("\n"), 0, result.stderr)
        self.assertIn("res/apps/missing.app", result.stderr)
        self.assertNotIn("Traceback", result.stderr + result.stdout)

    def test_bad_app_kwargs_exit_2_no_traceback(self):
        """Pump kwargs that fail their checks when the app starts: the reason in one line,
        status 2, no traceback."""
        cwd = self.mktemp()
        os.makedirs(cwd)
        for bad, expected in [
            (
                "apparg_pump={'subscriptions': [{'name': 's', 'directory': 5}]}",
                "consumer s: directory must be a path",
            ),
            (  # found by a process of the pump as it starts, below a supervisor
                "apparg_pump={'transfer': {'credentials': '/nonexistent/credentials.conf'}}",
                "cannot read credentials file /nonexistent/credentials.conf",
            ),
        ]:
            pump = os.path.join(RES, "apps", "pump.app")
            result = twistd("--res", RES, "--no-shell", "-a", bad, pump, cwd=cwd)
            output = result.stdout + result.stderr
            self.assertEqual(result.returncode, 2, output)
            self.assertIn("cc: container failed to start: ", output)
            self.assertIn(expected, output)
            self.assertNotIn("Traceback", output)

    def test_bad_input_one_line_exit_2(self):
        """An empty .app file, a memory:// URL with a host, and a broker user without a
        password (no credentials line for it): one line each, status 2, nothing started."""
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        empty = os.path.join(cwd, "empty.app")
        open(empty, "w").close()
        home = os.path.join(cwd, "home")
        default = os.path.join(home, ".config", "ion", "credentials.conf")
        for args, expected in [
            ((empty,), f"cc: {empty}: empty file"),
            (("--broker", "memory://foo"),
             "cc: a memory:// broker URL takes no host or path: write memory://"),
            (("--broker-retry", "-1"),
             "cc: --broker-retry / broker_retry: seconds >= 0 expected, got -1.0"),
            (("--broker", "amqp://alice@127.0.0.1:1/"),
             f"cc: no password for alice@127.0.0.1 in {default} (no such file)"),
        ]:
            result = twistd("--res", RES, "--no-shell", *args, cwd=cwd,
                            env=dict(os.environ, PYTHONPATH=ROOT, HOME=home))
            self.assertEqual(result.returncode, 2, result.stderr)
            self.assertEqual(result.stderr.splitlines(), [expected])
            self.assertNotIn("Traceback", result.stdout)

    def test_unreachable_broker_exit_1_no_traceback(self):
        result = twistd("--no-shell", "--broker", "amqp://127.0.0.1:1/")
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("cannot connect to amqp://guest:***@127.0.0.1:1/", result.stdout + result.stderr)
        self.assertNotIn("Traceback", result.stderr + result.stdout)

    def test_malformed_config_exit_2(self):
        """A malformed ionlocal.config stops the container before it starts: one line, status 2."""
        res = self.mktemp()
        os.makedirs(os.path.join(res, "config"))
        for name in ("ion.config", "loglevels.cfg"):
            with open(os.path.join(RES, "config", name)) as src, open(os.path.join(res, "config", name), "w") as dst:
                dst.write(src.read())
        with open(os.path.join(res, "config", "ionlocal.config"), "w") as f:
            f.write("{'ion.core.process': {'rpc_timeout': 5,}\n")
        result = twistd("--res", os.path.abspath(res))
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertIn("ionlocal.config:", result.stderr)
        self.assertNotIn("Traceback", result.stderr + result.stdout)

    def test_bad_config_value_exit_2_no_traceback(self):
        """A known config key given a value of the wrong type or out of range (-D, or an app
        config a -D leaves alone) stops the container before it starts: one line naming the
        option, module, key and value, status 2."""
        for args, expected in [
            (("-D", "ion.core.process:rpc_timeout=abc"),
             "cc: -D/--define: ion.core.process:rpc_timeout must be a number > 0, got 'abc'"),
            (("-D", "ion.core.cc.agent:missed_heartbeats=0", "res/apps/hello.app"),
             "cc: -D/--define: ion.core.cc.agent:missed_heartbeats must be an integer > 0, got 0"),
        ]:
            result = twistd("--no-shell", *args)
            self.assertEqual(result.returncode, 2, result.stderr)
            self.assertEqual(result.stderr.splitlines(), [expected])
            self.assertNotIn("Traceback", result.stdout)

    def test_unused_define_and_apparg_warned_once(self):
        """A -D of a module nothing reads and an apparg_ of an app not started are one warn
        line each at start; the container still starts and stops cleanly."""
        lines = self.boot_and_stop(
            signal.SIGTERM, args=("-D", "nosuch.module:key=1", "-D", "ion.core.process:rpc_timout=3",
                                  "-a", "{'apparg_pmp': {}}")
        )
        warned = [line for line in lines if "#warn]" in line]
        self.assertEqual(len(warned), 3, lines)
        self.assertIn("-D/--define: no module 'nosuch.module' reads config", warned[0])
        self.assertIn("-D/--define: ion.core.process has no key 'rpc_timout'", warned[1])
        self.assertIn("-a/--args: apparg_pmp: no app 'pmp' among those started", warned[2])

    def test_second_pump_on_one_directory_exit_2(self):
        """A second container started from the working directory of a running pump refuses
        to start: one line naming the state directory and the owner's pid, status 2."""
        cwd = self.mktemp()
        os.makedirs(cwd)
        pump = os.path.join(RES, "apps", "pump.app")
        cmd = [*TWISTD, "--pidfile=", "-n", "cc", "--no-shell", "--res", RES, pump]
        env = dict(os.environ, PYTHONPATH=ROOT)
        first = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.addCleanup(first.wait)
        self.addCleanup(first.kill)
        deadline = time.time() + 30
        while time.time() < deadline:
            line = first.stdout.readline()
            if "running apps" in line or not line:
                break
        self.assertIn("running apps", line)
        result = twistd("--no-shell", "--res", RES, pump, cwd=cwd)
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 2, output)
        self.assertIn(f"is in use by process {first.pid}", output)
        self.assertIn("state directory var/pump/", output)
        self.assertNotIn("Traceback", output)
        first.send_signal(signal.SIGTERM)
        self.assertEqual(first.wait(timeout=30), 0)

    def test_boot_and_sigterm(self):
        """The hello app boots on memory:// and a SIGTERM stops the container cleanly (status 0)."""
        self.boot_and_stop(signal.SIGTERM)

    def test_repeated_signals(self):
        """A second signal while stopping (Ctrl-C after a SIGTERM, a repeated SIGTERM) changes
        nothing: the same clean stop, status 0, no traceback."""
        self.boot_and_stop(signal.SIGTERM, signal.SIGTERM, signal.SIGINT)

    def boot_and_stop(self, *signals, args=()):
        """Boot the hello app, send the signals, check a clean stop; returns the output lines."""
        cmd = [*TWISTD, "--pidfile=", "-n", "cc", "--no-shell", *args, "res/apps/hello.app"]
        env = dict(os.environ, PYTHONPATH=ROOT)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        deadline = time.time() + 30
        while time.time() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "running apps" in line or not line:
                break
        self.assertIn("ioncore, hello", "".join(lines))
        for signum in signals:
            proc.send_signal(signum)
        out, _ = proc.communicate(timeout=30)
        self.assertEqual(proc.returncode, 0, "".join(lines) + out)
        self.assertIn("stopped", out)
        self.assertNotIn("Traceback", "".join(lines) + out)
        return "".join(lines + [out]).splitlines()


class DaemonTests(unittest.TestCase):
    """`twistd --logfile var/ion.log --pidfile var/ion.pid cc ...` without `-n`: a daemon."""

    def daemon(self, *args, logfile="var/ion.log"):
        """Start the daemon from a fresh working directory; returns (CompletedProcess of the
        `twistd` command, working directory). A daemon left running is killed at cleanup."""
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(cwd, "var"))
        cmd = [*TWISTD, "--logfile", logfile, "--pidfile", "var/ion.pid", "cc", "--res", RES, *args]
        result = subprocess.run(cmd, cwd=cwd, env=dict(os.environ, PYTHONPATH=ROOT),
                                capture_output=True, text=True, timeout=60,
                                stdin=subprocess.DEVNULL)
        self.addCleanup(_kill_if_running, os.path.join(cwd, "var", "ion.pid"))
        return result, cwd

    def read(self, cwd, name):
        with open(os.path.join(cwd, "var", name)) as f:
            return f.read()

    def test_run_rotate_stop(self):
        """The command returns once the apps run, with the pid file written and ION's log
        observer writing the file (twistd's own info lines filtered out by loglevels.cfg);
        SIGUSR1 after moving the log away opens a new one at the same path; SIGTERM stops the
        container cleanly and removes the pid file."""
        result, cwd = self.daemon(os.path.join(RES, "apps", "hello.app"))
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        with open(os.path.join(cwd, "var", "ion.pid")) as f:
            pid = int(f.read())
        self.assertIn("running apps: ioncore, hello, ccagent", self.read(cwd, "ion.log"))
        self.assertNotIn("starting up", self.read(cwd, "ion.log"))

        os.rename(os.path.join(cwd, "var", "ion.log"), os.path.join(cwd, "var", "ion.log.1"))
        os.kill(pid, signal.SIGUSR1)
        _wait_for(lambda: os.path.exists(os.path.join(cwd, "var", "ion.log")), "a new log file")
        os.kill(pid, signal.SIGTERM)
        _wait_for(lambda: not _alive(pid), "the daemon to exit")
        self.assertFalse(os.path.exists(os.path.join(cwd, "var", "ion.pid")))
        new, old = self.read(cwd, "ion.log"), self.read(cwd, "ion.log.1")
        self.assertIn("SIGTERM: stopping the container", new)
        self.assertIn("stopped", new)
        self.assertNotIn("SIGTERM", old)
        self.assertNotIn("Traceback", new + old)

    def test_failed_start(self):
        """A boot that fails in the daemon makes the `twistd` command exit 1 with the reason
        as the first line on stderr (bad input marked as status 2), passwords hidden in it and
        in the log; no daemon is left and no pid file. Bad input found before the daemon
        starts is one line and status 2 as with -n."""
        result, cwd = self.daemon(
            "-a", "apparg_pump={'subscriptions': [{'name': 's', 'directory': 5}]}",
            os.path.join(RES, "apps", "pump.app"),
        )
        lines = result.stderr.splitlines()
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertEqual(
            lines[0], "cc: container failed to start: consumer s: directory must be a path, got 5"
        )
        self.assertIn("status 2 (bad input)", lines[1])
        self.assertFalse(os.path.exists(os.path.join(cwd, "var", "ion.pid")))

        result, cwd = self.daemon("--broker", "amqp://pump:sekrit@127.0.0.1:1/")
        lines = result.stderr.splitlines()
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertTrue(
            lines[0].startswith("cc: container failed to start: cannot connect to "
                                "amqp://pump:***@127.0.0.1:1/"), lines)
        self.assertIn("status 1", lines[1])
        self.assertIn("cannot connect to amqp://pump:***@", self.read(cwd, "ion.log"))
        self.assertNotIn("sekrit", result.stderr + self.read(cwd, "ion.log"))
        self.assertNotIn("Traceback", result.stderr)
        self.assertFalse(os.path.exists(os.path.join(cwd, "var", "ion.pid")))

        result, cwd = self.daemon(logfile="-")
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertEqual(result.stderr,
                         "cc: --logfile -: a daemon cannot log to stdout; name a file or run twistd -n\n")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _kill_if_running(pidfile):
    """Kill the daemon of a test that failed half-way (its pid file is removed as it exits)."""
    try:
        with open(pidfile) as f:
            os.kill(int(f.read()), signal.SIGKILL)
    except (FileNotFoundError, ProcessLookupError):
        pass


def _wait_for(condition, what, timeout=20):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class BrokerRetryTests(unittest.TestCase):
    """--broker-retry: a pump started before its broker (at machine boot) comes up once the
    broker does, each failed attempt logged once."""

    def start(self, port, retry):
        url = f"amqp://guest:guest@127.0.0.1:{port}/"
        cmd = [*TWISTD, "--pidfile=", "-n", "cc", "--no-shell", "--res", RES,
               "--broker-retry", str(retry), "--broker", url, "-s", f"retry{os.getpid()}"]
        cwd = self.mktemp()
        os.makedirs(cwd)
        proc = subprocess.Popen(cmd, cwd=cwd, env=dict(os.environ, PYTHONPATH=ROOT),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        self.addCleanup(lambda: proc.poll() is None and (proc.kill(), proc.wait()))
        self.addCleanup(proc.stdout.close)
        return proc

    async def read_until(self, proc, lines, text):
        while True:
            line = await threads.deferToThread(proc.stdout.readline)
            lines.append(line)
            if text in line:
                return
            if not line:
                self.fail(f"{text!r} never came:\n{''.join(lines)}")

    async def test_broker_appearing(self):
        """The broker's port refuses, then answers: the boot goes on, after one warning."""
        from twisted.internet import reactor
        from twisted.protocols.portforward import ProxyFactory

        from tests.broker import _free_port

        broker = get_broker()
        port = _free_port()
        proc = self.start(port, 30)
        lines = []
        await self.read_until(proc, lines, "broker not reached (attempt 1, next in 2 s)")
        # the broker appears on that port
        listening = reactor.listenTCP(port, ProxyFactory(broker.host, broker.port),
                                      interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        await self.read_until(proc, lines, "running apps")
        proc.send_signal(signal.SIGTERM)
        rest, _ = await threads.deferToThread(proc.communicate, timeout=30)
        output = "".join(lines) + rest
        self.assertEqual(proc.returncode, 0, output)
        self.assertEqual(output.count("broker not reached"), 1, output)
        self.assertNotIn("Traceback", output)

    async def test_gives_up(self):
        """A broker that stays away: one warning per attempt, then the boot fails (status 1)
        saying how many attempts were made."""
        from tests.broker import _free_port

        proc = self.start(_free_port(), 3)
        output, _ = await threads.deferToThread(proc.communicate, timeout=30)
        self.assertEqual(proc.returncode, 1, output)
        self.assertEqual(output.count("broker not reached (attempt 1, next in 2 s)"), 1, output)
        self.assertEqual(output.count("broker not reached"), 1, output)
        self.assertIn("(gave up after 2 attempts)", output)
        self.assertNotIn("Traceback", output)
