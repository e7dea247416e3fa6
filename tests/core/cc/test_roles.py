"""Broker roles: what `ion broker-setup` prints and runs, and that on a real broker the roles
hold what the ingest's source stamping relies on."""

import io
import itertools
import json
import os
import re
import stat
import subprocess
import sys
import types

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from ion.apps.pump import app as pump_app
from ion.core.cc.roles import RoleError, broker_setup, permissions
from ion.core.cc import cli
from ion.core.cc.container import make_transport
from ion.core.cc.testing import make_container
from ion.core.messaging.transport import Properties, TransportError
from tests.apps.pump.fixtures import encode, file_url, notice_fields, quiet, topic, until
from tests.apps.pump.fixtures import write_source
from tests.broker import (
    BrokerError,
    exchange_bind,
    find_rabbitmq_server,
    get_broker,
    publish_raw,
)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
_tags = itertools.count(1)


def allowed(pattern, name):
    """Whether RabbitMQ grants `name` under a permission expression: it searches the name
    for the pattern, anchored only where the pattern anchors itself."""
    return re.search(pattern, name) is not None


class PermissionTests(unittest.SynchronousTestCase):
    def check(self, role, table, public="xpublic"):
        perms = permissions(role, "bob", public)
        for kind, name, expected in table:
            got = allowed(getattr(perms, kind), name)
            self.assertEqual(got, expected, f"{role}: {kind} {name}")

    def test_source(self):
        """A source writes only its own queues and its xs_ exchange, reads those queues, the
        public exchange and its own reports, and cannot declare (so delete) its xr_
        exchange, which the report router publishes to. Another user's names that begin
        with its own (bobby) are not its."""
        self.check(
            "source",
            [
                ("write", "xs_bob", True),
                ("write", "q_bob.sub.x", True),
                ("write", "xs_alice", False),
                ("write", "xpublic", False),
                ("write", "xreport", False),
                ("write", "xr_bob", False),
                ("write", "xs_bobby", False),
                ("write", "q_bobby.sub", False),
                ("write", "q_bob", False),
                ("write", "xxs_bob", False),
                ("configure", "xs_bob", True),
                ("configure", "q_bob.sub", True),
                ("configure", "xr_bob", False),
                ("configure", "xpublic", False),
                ("read", "xpublic", True),
                ("read", "xr_bob", True),
                ("read", "q_bob.sub", True),
                ("read", "xr_alice", False),
                ("read", "xr_bobby", False),
                ("read", "xs_alice", False),
                ("read", "xreport", False),
                ("read", "xpublicx", False),
                ("read", "q_alice.sub", False),
            ],
        )

    def test_subscriber(self):
        """A subscriber writes no exchange at all (neither posts nor binds an exchange of its
        own to the public one) and reads only its queues and the public exchange."""
        self.check(
            "subscriber",
            [
                ("configure", "q_bob.sub", True),
                ("write", "q_bob.sub", True),
                ("read", "q_bob.sub", True),
                ("read", "xpublic", True),
                ("write", "xs_bob", False),
                ("configure", "xs_bob", False),
                ("write", "xpublic", False),
                ("read", "xr_bob", False),
                ("read", "xs_bob", False),
                ("read", "q_bobby.sub", False),
            ],
        )

    def test_public_exchange_named(self):
        """The public exchange is the one given, its dots taken literally."""
        self.check(
            "subscriber",
            [("read", "x.pub", True), ("read", "xapub", False), ("read", "xpublic", False)],
            public="x.pub",
        )

    def test_feeder_and_admin(self):
        """The pump's own user (feeder) and an admin may do anything; only the admin gets
        the administrator tag."""
        for role, tags in (("feeder", ()), ("admin", ("administrator",))):
            perms = permissions(role, "bob")
            self.assertEqual((perms.configure, perms.write, perms.read, perms.tags),
                             (".*", ".*", ".*", tags))

    def test_bad_names(self):
        """A user name with a dot (q_a. would cover user a.b's queues) or other characters,
        an unknown role, a public exchange that is not a name: RoleError."""
        for role, user, public in [
            ("source", "a.b", "xpublic"),
            ("source", "a b", "xpublic"),
            ("source", "", "xpublic"),
            ("source", "a*", "xpublic"),
            ("publisher", "bob", "xpublic"),
            ("source", "bob", "x*"),
        ]:
            self.assertRaises(RoleError, permissions, role, user, public)


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


class CommandTests(unittest.TestCase):
    """`ion broker-setup` without a broker: what it prints, and what it runs (a stand-in
    rabbitmqctl that writes down its arguments and its standard input)."""

    def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.log = os.path.join(self.base, "calls.jsonl")
        self.ctl = os.path.join(self.base, "rabbitmqctl")
        self.fail = os.path.join(self.base, "fail")  # holds the command to fail, if any
        with open(self.ctl, "w") as f:
            f.write(
                f"#!{sys.executable}\n"
                "import json, os, sys\n"
                "stdin = sys.stdin.read()\n"
                f"with open({self.log!r}, 'a') as f:\n"
                "    f.write(json.dumps({'argv': sys.argv[1:], 'stdin': stdin}) + '\\n')\n"
                f"fail = {self.fail!r}\n"
                "if os.path.exists(fail) and open(fail).read() in sys.argv:\n"
                "    sys.stdout.write('Adding user ...\\n')\n"
                "    sys.stderr.write('Error:\\nUser \"src1\" already exists\\n')\n"
                "    sys.exit(70)\n"
            )
        os.chmod(self.ctl, stat.S_IRWXU)

    def run_command(self, argv, stdin=""):
        """(exit status, stdout, stderr) of `ion broker-setup argv`."""
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        self.patch(sys, "stdin", stdin if isinstance(stdin, io.StringIO) else io.StringIO(stdin))
        code = cli.main(["broker-setup"] + argv)
        return code, out.getvalue(), err.getvalue()

    def calls(self):
        if not os.path.exists(self.log):
            return []
        with open(self.log) as f:
            return [json.loads(line) for line in f]

    def test_prints_commands(self):
        """Without --apply: the commands to paste, quoted for a shell, no password in them
        (rabbitmqctl add_user asks for it)."""
        code, out, err = self.run_command(
            ["--user", "src1", "--role", "source", "--vhost", "/pump", "--node", "rabbit@h"]
        )
        self.assertEqual((code, err), (0, ""))
        commands = [line for line in out.splitlines() if not line.startswith("#")]
        self.assertEqual(
            commands,
            [
                "rabbitmqctl -n rabbit@h add_user src1",
                "rabbitmqctl -n rabbit@h set_user_tags src1",
                "rabbitmqctl -n rabbit@h set_permissions -p /pump src1 "
                r"'^(q_src1\..*|xs_src1)$' '^(q_src1\..*|xs_src1)$' "
                r"'^(q_src1\..*|xpublic|xr_src1)$'",
            ],
        )

    def test_bad_input(self):
        """A bad user name, role or vhost, or no rabbitmqctl to run: one line, status 2,
        nothing run."""
        for argv in [
            ["--user", "a.b", "--role", "source"],
            ["--user", "bob", "--role", "publisher"],
            ["--user", "bob", "--role", "source", "--vhost", ""],
            ["--user", "bob", "--role", "source", "--apply", "--rabbitmqctl", "/nonexistent"],
        ]:
            code, out, err = self.run_command(argv, "pw\n")
            self.assertEqual((code, out), (2, ""), argv)
            self.assertEqual(len(err.splitlines()), 1, err)
            self.assertTrue(err.startswith("ion broker-setup: "), err)
        self.assertEqual(self.calls(), [])

    def test_apply(self):
        """--apply runs each command (on the node given) with a line saying so; the password,
        read from standard input, reaches add_user on its standard input only: never an
        argument, never printed."""
        code, out, err = self.run_command(
            ["--user", "src1", "--role", "subscriber", "--apply", "--rabbitmqctl", self.ctl,
             "--node", "n@h"],
            "s3cret-pw\n",
        )
        self.assertEqual((code, err), (0, ""))
        calls = self.calls()
        self.assertEqual([c["argv"][:3] for c in calls],
                         [["-n", "n@h", "add_user"], ["-n", "n@h", "set_user_tags"],
                          ["-n", "n@h", "set_permissions"]])
        self.assertEqual([c["stdin"] for c in calls], ["s3cret-pw\n", "", ""])
        self.assertEqual(calls[2]["argv"][3:],
                         ["-p", "/", "src1", r"^(q_src1\..*)$", r"^(q_src1\..*)$",
                          r"^(q_src1\..*|xpublic)$"])
        self.assertNotIn("s3cret", json.dumps([c["argv"] for c in calls]) + out + err)
        self.assertEqual(len(out.splitlines()), 3)
        self.assertTrue(all(line.endswith(": done") for line in out.splitlines()), out)

    def test_password_at_a_terminal(self):
        """On a terminal the password is asked for twice; two that differ stop everything."""
        parser = cli.build_parser()
        args = parser.parse_args(
            ["broker-setup", "--user", "src1", "--role", "feeder", "--apply",
             "--rabbitmqctl", self.ctl]
        )
        answers = iter(["one", "two"])
        out, err = io.StringIO(), io.StringIO()
        code = broker_setup(args, FakeTerminal(), out, err, getpass=lambda _: next(answers))
        self.assertEqual((code, self.calls()), (2, []))
        self.assertIn("differ", err.getvalue())
        answers = iter(["same", "same"])
        code = broker_setup(args, FakeTerminal(), out, err, getpass=lambda _: next(answers))
        self.assertEqual(code, 0)
        self.assertEqual(self.calls()[0]["stdin"], "same\n")

    def test_no_password_and_existing(self):
        """--no-password gives the user none (certificate logins only), reading nothing;
        --existing leaves out add_user and the password."""
        code, out, err = self.run_command(
            ["--user", "src1", "--role", "source", "--apply", "--rabbitmqctl", self.ctl,
             "--no-password"]
        )
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(self.calls()[0]["argv"], ["add_user", "src1", ""])
        os.remove(self.log)
        code, out, err = self.run_command(
            ["--user", "src1", "--role", "admin", "--apply", "--rabbitmqctl", self.ctl,
             "--existing"]
        )
        self.assertEqual((code, err), (0, ""))
        self.assertEqual([c["argv"][0] for c in self.calls()], ["set_user_tags", "set_permissions"])
        self.assertEqual(self.calls()[0]["argv"], ["set_user_tags", "src1", "administrator"])

    def test_failure(self):
        """A command that fails stops the rest: one line with rabbitmqctl's reason (and, for
        a user that exists, what to do), status 1."""
        with open(self.fail, "w") as f:
            f.write("add_user")
        code, out, err = self.run_command(
            ["--user", "src1", "--role", "source", "--apply", "--rabbitmqctl", self.ctl], "pw\n"
        )
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn('User "src1" already exists', err)
        self.assertIn("--existing", err)
        self.assertEqual(len(self.calls()), 1)


class BrokerRoleTests(unittest.TestCase):
    """Users set up with `ion broker-setup --apply` on the private RabbitMQ node, talking to
    a pump that runs as a feeder: sources src1 and src2 (src2 plays the one who cheats), and
    subscriber sub1."""

    async def setUp(self):
        self.broker = get_broker()
        n = next(_tags)
        tag = f"roles{os.getpid()}n{n}"
        self.public, self.xreport = f"xpublic-{tag}", f"xreport-{tag}"
        names = {"feeder": f"pump{n}x", "src1": f"src1x{n}", "src2": f"src2x{n}",
                 "sub1": f"sub1x{n}"}
        self.names = names
        roles = {"feeder": "feeder", "src1": "source", "src2": "source", "sub1": "subscriber"}
        await defer.gatherResults(
            [threads.deferToThread(self.setup_user, names[who], roles[who]) for who in names],
            consumeErrors=True,
        )
        self.base = os.path.abspath(self.mktemp())
        self.src, dest = os.path.join(self.base, "src"), os.path.join(self.base, "dest")
        os.makedirs(self.src)
        credentials = os.path.join(self.base, "credentials.conf")
        open(credentials, "w").close()
        os.chmod(credentials, 0o600)
        pump = names["feeder"]
        c = await make_container(self, url=self.url(pump), sysname=tag)
        sup = await pump_app.start(
            c,
            types.SimpleNamespace(name="pump"),
            user=pump,
            ingest={"users": [names["src1"], names["src2"]], "exchange": self.public,
                    "report_exchange": self.xreport},
            subscriptions=[{"name": "sub", "exchange": self.public,
                            "report_exchange": self.xreport, "directory": dest,
                            # The sources post files of this machine: listed, as they must be.
                            "sources": [file_url(self.src)],
                            "state_dir": os.path.join(self.base, "consumer")}],
            transfer={"credentials": credentials, "workers": 1},
            report_router={"exchange": self.xreport, "state_dir": os.path.join(self.base, "rr")},
        )
        self.addCleanup(sup.terminate)

    def setup_user(self, user, role):
        """`ion broker-setup --apply` in a process of its own, the password on its stdin."""
        ctl = os.path.join(os.path.dirname(find_rabbitmq_server()), "rabbitmqctl")
        done = subprocess.run(
            [sys.executable, "-m", "ion", "broker-setup", "--user", user, "--role", role,
             "--public-exchange", self.public, "--apply", "--rabbitmqctl", ctl,
             "--node", self.broker.nodename],
            input=f"pw-{user}\n",
            env=dict(self.broker._environment(), PYTHONPATH=REPO),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise AssertionError(f"broker-setup {user} {role}: {done.stderr}")
        return done.stdout

    def url(self, who):
        return f"amqp://{who}:pw-{who}@{self.broker.host}:{self.broker.port}/"

    async def connect(self, who):
        transport = make_transport(self.url(self.names[who]), reactor)
        await transport.connect()
        self.addCleanup(transport.close)
        return transport

    async def collect(self, who, queue, exchange):
        """A queue of `who`'s bound to `exchange`; the list its JSON bodies arrive in."""
        transport = await self.connect(who)
        got = []

        def take(delivery):
            got.append(json.loads(delivery.body))
            delivery.ack()

        queue = f"q_{self.names[who]}.{queue}"
        await transport.declare_queue(queue, exclusive=True, auto_delete=True)
        await transport.bind(queue, exchange, "#")
        await transport.consume(queue, take)
        return got

    async def refused(self, who, action):
        """Run action(transport) on a connection of its own; the broker's refusal."""
        transport = await self.connect(who)
        e = await self.assertFailure(defer.Deferred.fromCoroutine(action(transport)),
                                     TransportError)
        self.assertIn("ACCESS_REFUSED", str(e))

    async def post(self, who, rel_path, claimed_source):
        data = f"{rel_path} by {who}".encode()
        write_source(self.src, rel_path, data)
        fields = notice_fields(file_url(self.src), rel_path, data, source=claimed_source)
        transport = await self.connect(who)
        await transport.publish(f"xs_{self.names[who]}", topic(rel_path), encode(fields),
                                Properties(content_type="application/json"))

    async def test_roles_hold(self):
        """src2 cannot post to src1's exchange or to the public one, nor read src1's
        reports; sub1 cannot post at all. A notice src2 posts claiming to be src1's reaches
        the subscriber stamped as src2's, and its report goes to src2 only, while src1's
        own notice and report are src1's."""
        src1, src2 = self.names["src1"], self.names["src2"]
        seen = await self.collect("sub1", "all", self.public)
        reports1 = await self.collect("src1", "reports", f"xr_{src1}")
        reports2 = await self.collect("src2", "reports", f"xr_{src2}")

        def publish(exchange):
            async def action(transport):
                await transport.publish(exchange, "v03.x", b"{}", Properties())
            return action

        async def steal(transport):
            queue = f"q_{src2}.steal"
            await transport.declare_queue(queue, exclusive=True, auto_delete=True)
            await transport.bind(queue, f"xr_{src1}", "#")

        await self.refused("src2", publish(f"xs_{src1}"))
        await self.refused("src2", publish(self.public))
        await self.refused("src2", steal)
        await self.refused("sub1", publish(self.public))
        sub1, broker = self.names["sub1"], self.broker
        for attempt in (
            # basic.publish with nothing checked first (ours asks whether the exchange exists)
            lambda: publish_raw(broker.host, broker.port, sub1, f"pw-{sub1}", f"xs_{sub1}",
                                "v03.x", b"{}"),
            # the binding that would bring the public exchange's notices back to the ingest
            lambda: exchange_bind(broker.host, broker.port, sub1, f"pw-{sub1}", f"xs_{sub1}",
                                  self.public, "#"),
        ):
            e = await self.assertFailure(threads.deferToThread(attempt), BrokerError)
            self.assertIn("ACCESS_REFUSED", str(e))

        await self.post("src1", "a/own.txt", claimed_source=None)
        await self.post("src2", "b/claimed.txt", claimed_source=src1)
        await until(lambda: len(seen) == 2 and reports1 and reports2, timeout=15,
                    what="both notices and their reports")
        await quiet(0.5)
        self.assertEqual({body["relPath"]: body["source"] for body in seen},
                         {"a/own.txt": src1, "b/claimed.txt": src2})
        self.assertEqual([(r["relPath"], r["source"], r["report"]["code"]) for r in reports1],
                         [("a/own.txt", src1, 201)])
        self.assertEqual([(r["relPath"], r["source"], r["report"]["code"]) for r in reports2],
                         [("b/claimed.txt", src2, 201)])
