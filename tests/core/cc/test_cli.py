"""`ion --credentials PATH`: the command line takes broker passwords from the same private file
as `twistd cc`, so none has to be on a command line (where `ps` shows it)."""

import json
import os
import subprocess
import sys

from twisted.internet import threads
from twisted.trial import unittest

import ion
from ion.apps.hello.service import HelloService
from ion.core.cc import cli
from ion.core.cc.testing import make_container
from ion.core.config import Config
from ion.core.credentials import CredentialsError
from tests.broker import get_broker

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
RES = os.path.join(ROOT, "res")


def write_private(path, text, mode=0o600):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


def run_cli(*args, home=None, timeout=30):
    env = dict(os.environ, PYTHONPATH=ROOT)
    if home is not None:
        env["HOME"] = home
    return subprocess.run(
        [sys.executable, "-m", "ion", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class BrokerUrlTests(unittest.SynchronousTestCase):
    """How the command line finds its broker URL's password."""

    def setUp(self):
        self.home = os.path.abspath(self.mktemp())
        self.patch(cli, "default_credentials", os.path.join(self.home, "credentials.conf"))
        self.config = Config.load(RES)

    def url(self, *argv):
        args = cli.build_parser().parse_args(["ping", *argv, "svc"])
        return cli.broker_url(args, self.config)

    def test_password_from_file(self):
        """--credentials gives the password of the line for the URL's user, host and port
        (percent-encoded in the URL); other URLs are left as they are."""
        path = write_private(
            os.path.join(self.home, "given.conf"),
            "sftp://alice:sftp-pw@rabbit.example/\namqp://alice:p%40ss:w@rabbit.example/\n",
        )
        self.assertEqual(
            self.url("--broker", "amqp://alice@rabbit.example/", "--credentials", path),
            "amqp://alice:p%40ss%3Aw@rabbit.example/",
        )
        for url in ("amqp://guest@rabbit.example/", "amqp://alice:given@rabbit.example/"):
            self.assertEqual(self.url("--broker", url, "--credentials", path), url)
        self.assertEqual(self.url(), "memory://")

    def test_default_file(self):
        """Without --credentials the default file is read when it exists; without it, a URL
        with a user and no password is refused naming the file."""
        url = "amqp://alice@rabbit.example/"
        e = self.assertRaises(CredentialsError, self.url, "--broker", url)
        self.assertIn(f"no password for alice@rabbit.example in {cli.default_credentials}", str(e))
        write_private(cli.default_credentials, "amqp://alice:pw@rabbit.example/\n")
        self.assertEqual(self.url("--broker", url), "amqp://alice:pw@rabbit.example/")

    def test_unusable_file(self):
        """A file others may read, or a missing one, is refused naming the file."""
        path = write_private(os.path.join(self.home, "open.conf"), "", mode=0o644)
        url = "amqp://alice@rabbit.example/"
        e = self.assertRaises(CredentialsError, self.url, "--broker", url, "--credentials", path)
        self.assertIn("open.conf", str(e))
        missing = os.path.join(self.home, "missing.conf")
        self.assertRaises(CredentialsError, self.url, "--broker", url, "--credentials", missing)


class CommandLineTests(unittest.TestCase):
    """`python -m ion` as a user runs it."""

    def test_unusable_file_exit_2(self):
        """A credentials file that cannot be used: one line on stderr, exit status 2, no
        traceback and no password."""
        home = os.path.abspath(self.mktemp())
        path = write_private(
            os.path.join(home, "open.conf"), "amqp://alice:s3cr3t@127.0.0.1/\n", mode=0o644
        )
        result = run_cli(
            "ping", "--broker", "amqp://alice@127.0.0.1:1/", "--credentials", path, "svc"
        )
        self.assertEqual(result.returncode, 2, result.stderr)
        (line,) = result.stderr.splitlines()
        self.assertIn("open.conf", line)
        self.assertNotIn("s3cr3t", line)

    async def test_rpc_with_password_from_file(self):
        """`ion rpc --broker amqp://alice@host:port/` reaches a service on the private broker
        with alice's password from --credentials, and from the default file under $HOME;
        without the file the broker refuses the login."""
        broker = get_broker()
        sysname = f"cli{os.getpid()}"
        c = await make_container(self, url=broker.url, sysname=sysname)
        await c.spawn(HelloService)
        home = os.path.abspath(self.mktemp())
        line = f"amqp://alice:alice@{broker.host}:{broker.port}/\n"
        path = write_private(os.path.join(home, "given.conf"), line)
        write_private(os.path.join(home, ".config", "ion", "credentials.conf"), line)
        url = f"amqp://alice@{broker.host}:{broker.port}/"
        call = ["rpc", "--broker", url, "-s", sysname, "--timeout", "10", "hello", "hello"]
        given = await threads.deferToThread(
            run_cli, *call, '"given"', "--credentials", path, home=self.mktemp()
        )
        self.assertEqual(given.returncode, 0, given.stderr)
        self.assertIn("Hello, given!", json.loads(given.stdout))
        default = await threads.deferToThread(run_cli, *call, '"default"', home=home)
        self.assertEqual(default.returncode, 0, default.stderr)
        self.assertIn("Hello, default!", json.loads(default.stdout))
        none = await threads.deferToThread(run_cli, *call, '"none"', home=self.mktemp())
        self.assertNotEqual(none.returncode, 0)
        self.assertNotIn("alice:alice", none.stderr)


class OneLineErrorTests(unittest.TestCase):
    """Issue 22: every mistake on the `ion` command line is one line on stderr with its exit
    status (2 bad input, 3 nothing answers), never a traceback."""

    def one_line(self, result, status):
        self.assertEqual(result.returncode, status, result.stderr)
        self.assertNotIn("Traceback", result.stdout + result.stderr)
        (line,) = result.stderr.splitlines()
        return line

    def test_bad_input_exit_2(self):
        """An unknown scheme, a timeout of 0, and no broker at all (the embedded memory://
        broker of a new process is empty: nothing there to talk to)."""
        home = os.path.abspath(self.mktemp())
        foo = run_cli("ping", "--broker", "foo://x", "hello", home=home)
        self.assertIn("unsupported broker URL scheme 'foo'", self.one_line(foo, 2))
        zero = run_cli("ping", "--broker", "amqp://127.0.0.1:1/", "--timeout", "0", "hello")
        self.assertIn("timeout must be > 0", self.one_line(zero, 2))
        nobroker = run_cli("ping", "hello", home=home)
        self.assertEqual(
            self.one_line(nobroker, 2),
            "ion: no broker: give --broker amqp://... (a container on the embedded memory:// "
            "broker cannot be reached from outside)",
        )

    def test_no_password(self):
        """A broker URL with a user and no password, and no line for it: say so, rather than
        trying some default password."""
        home = os.path.abspath(self.mktemp())
        result = run_cli("ping", "--broker", "amqp://alice@127.0.0.1:1/", "svc", home=home)
        default = os.path.join(home, ".config", "ion", "credentials.conf")
        self.assertEqual(
            self.one_line(result, 2),
            f"ion: no password for alice@127.0.0.1 in {default} (no such file)",
        )
        path = write_private(os.path.join(home, "c.conf"), "amqp://bob:pw@127.0.0.1/\n")
        result = run_cli("ping", "--broker", "amqp://alice@127.0.0.1:1/", "--credentials", path,
                         "svc", home=home)
        self.assertEqual(self.one_line(result, 2), f"ion: no password for alice@127.0.0.1 in {path}")

    def test_malformed_credentials_hint_readable(self):
        """The error for a malformed credentials line shows the expected format whole: the
        masking of passwords does not eat part of it."""
        home = os.path.abspath(self.mktemp())
        path = write_private(os.path.join(home, "c.conf"), "nonsense\n")
        result = run_cli("ping", "--broker", "amqp://alice@127.0.0.1:1/", "--credentials", path,
                         "svc", home=home)
        line = self.one_line(result, 2)
        self.assertIn("scheme://user@host[:port][/path]", line)
        self.assertIn("user:password", line)
        self.assertNotIn("***", line)

    def test_version(self):
        result = run_cli("--version")
        self.assertEqual((result.returncode, result.stdout.strip()), (0, f"ION {ion.__version__}"))

    async def test_ps_no_such_container(self):
        """`ion ps nosuch` names the container and the system, and the command listing them,
        not the internal name of the container's process."""
        broker = get_broker()
        sysname = f"clips{os.getpid()}"
        result = await threads.deferToThread(
            run_cli, "ps", "--broker", broker.url, "-s", sysname, "--timeout", "5", "nosuch"
        )
        self.assertEqual(
            self.one_line(result, 3),
            f"ion: no container nosuch in system {sysname} (ion containers lists them)",
        )
