"""`twistd cc` and `ion` with --broker-ca, --broker-cert, --broker-key: TLS files checked before
anything starts, passed down to the transport, and a broker that cannot be trusted refused in
one line."""

import json
import os
import subprocess
import time

from twisted.internet import threads
from twisted.trial import unittest

from tests.broker import get_broker, get_cert_broker, make_certificates
from tests.core.cc.test_cli import run_cli
from tests.core.cc.test_tap import RES, ROOT, TWISTD, OptionParsing, twistd


class OptionsTests(OptionParsing, unittest.SynchronousTestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        make_certificates(self.dir, "tess")
        self.url = "amqps://rabbit.example/"

    def path(self, name):
        return os.path.join(self.dir, name)

    def client_options(self):
        return ("--broker-ca", self.path("ca.pem"), "--broker-cert", self.path("client.pem"),
                "--broker-key", self.path("client.key"))

    def test_files_reach_the_transport(self):
        """The three options become the transport's TLS files."""
        opts = self.parse("--broker", self.url, *self.client_options())
        self.assertEqual(opts["broker_tls"], {
            "tls_ca_file": self.path("ca.pem"),
            "tls_cert_file": self.path("client.pem"),
            "tls_key_file": self.path("client.key"),
        })
        self.assertEqual(self.parse()["broker_tls"], {})

    def test_config_keys(self):
        """broker_ca, broker_cert, broker_key in ion.core.messaging serve amqps:// URLs (an
        option wins over its key) and are left unused for others."""
        defines = ["-D", f"ion.core.messaging:broker_ca={self.path('stranger-ca.pem')}",
                   "-D", f"ion.core.messaging:broker_cert={self.path('client.pem')}",
                   "-D", f"ion.core.messaging:broker_key={self.path('client.key')}"]
        opts = self.parse(*defines, "--broker", self.url, "--broker-ca", self.path("ca.pem"))
        self.assertEqual(opts["broker_tls"], {
            "tls_ca_file": self.path("ca.pem"),
            "tls_cert_file": self.path("client.pem"),
            "tls_key_file": self.path("client.key"),
        })
        self.assertEqual(self.parse(*defines)["broker_tls"], {})
        self.assertEqual(self.parse(*defines, "--broker", "amqp://h/")["broker_tls"], {})

    def test_client_certificate_names_the_user(self):
        """-h/-p with a client certificate and no --broker-user leave the user out of the URL
        (the certificate names it), where they would otherwise mean guest."""
        opts = self.parse("--broker", "amqps://h/", "--broker-port", "5999", *self.client_options())
        self.assertEqual(opts["broker_url"], "amqps://h:5999/")
        opts = self.parse("--broker", "amqps://h/", "--broker-port", "5999",
                          "--broker-ca", self.path("ca.pem"))
        self.assertEqual(opts["broker_url"], "amqps://guest@h:5999/")

    def test_key_open_to_others_exit_2(self):
        """A key file others may read: one line naming it and the chmod, exit status 2."""
        key = self.path("client.key")
        os.chmod(key, 0o644)
        line = self.bad("--broker", self.url, *self.client_options())
        self.assertEqual(line, f"cc: broker key file {key} is open to group or others "
                               f"(mode 0644); make it private with: chmod 600 {key}")

    def test_bad_files_exit_2(self):
        """A missing CA file, a certificate without its key, a config value that is no file
        name, files for a URL that is not amqps://: one line each, exit status 2."""
        missing = self.path("missing.pem")
        for argv, expected in [
            (("--broker-ca", missing), f"cannot read broker CA file {missing}"),
            (("--broker-cert", self.path("client.pem")), "--broker-cert and --broker-key"),
            (("--broker-ca", self.path("client.key")), "holds no PEM certificate"),
            (("-D", "ion.core.messaging:broker_key=5"), "broker_key: not a file name: 5"),
        ]:
            self.assertIn(expected, self.bad("--broker", self.url, *argv))
        for url in ("amqp://h/", "memory://"):
            line = self.bad("--broker", url, "--broker-ca", self.path("ca.pem"))
            self.assertIn("are for an amqps:// broker URL", line)


class TwistdTests(unittest.TestCase):
    """The real commands, as subprocesses, on the private RabbitMQ nodes."""

    async def test_untrusted_broker_exit_1(self):
        """A broker whose certificate the given CA did not sign: one line saying the
        certificate is not verified, exit status 1, no traceback."""
        broker = get_broker()
        url = f"amqps://alice:alice@localhost:{broker.tls_port}/"
        result = await threads.deferToThread(
            twistd, "--no-shell", "--broker", url,
            "--broker-ca", broker.tls_file("stranger-ca.pem"),
        )
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 1, output)
        # twistd -n logs what goes to stderr: the line is the last one logged.
        line = output.strip().splitlines()[-1]
        self.assertIn("cc: container failed to start: cannot connect to amqps://alice", line)
        self.assertIn("the broker's certificate is not verified (certificate verify failed",
                      line)
        self.assertNotIn("Traceback", output)

    async def test_client_certificate_end_to_end(self):
        """A container started with a client certificate logs in with EXTERNAL (its URL has
        no password) and serves hello; `ion rpc` with its own certificate reaches it. Its key
        open to others stops `ion` in one line, exit status 2."""
        broker = get_cert_broker()
        sysname = f"tls{os.getpid()}"
        url = f"amqps://localhost:{broker.tls_port}/"
        files = ["--broker-ca", broker.ca_file, "--broker-cert", broker.client_cert_file,
                 "--broker-key", broker.client_key_file]
        cmd = [*TWISTD, "--pidfile=", "-n", "cc", "--no-shell", "--broker", url, *files, "-s", sysname,
               os.path.join(RES, "apps", "hello.app")]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        self.addCleanup(proc.wait)
        self.addCleanup(proc.kill)
        lines = await threads.deferToThread(_read_until, proc, "running apps")
        self.assertIn("running apps", lines[-1], "".join(lines))
        call = ["rpc", "--broker", url, *files, "-s", sysname, "hello", "hello", '"tess"']
        result = await threads.deferToThread(run_cli, *call)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("Hello, tess!", json.loads(result.stdout))
        key = os.path.abspath(self.mktemp())
        with open(broker.client_key_file, "rb") as src, open(key, "wb") as dst:
            dst.write(src.read())
        os.chmod(key, 0o644)
        files[-1] = key
        call = ["ping", "--broker", url, *files, "-s", sysname, "hello"]
        result = await threads.deferToThread(run_cli, *call)
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertEqual(result.stderr.splitlines(), [
            f"ion: broker key file {key} is open to group or others (mode 0644); make it "
            f"private with: chmod 600 {key}"
        ])


def _read_until(proc, text, timeout=30):
    lines = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if text in line or not line:
            break
    return lines


class MakeTransportTests(unittest.SynchronousTestCase):
    def test_tls_files_need_amqps(self):
        """TLS files given for the embedded broker are a mistake, not silently ignored."""
        from twisted.internet import reactor

        from ion.core.cc.container import make_transport

        e = self.assertRaises(ValueError, make_transport, "memory://", reactor, tls_ca_file="x")
        self.assertIn("needs an amqps:// URL", str(e))
