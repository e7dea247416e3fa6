"""C{ion} (or C{python -m ion}): talk to a running ION system from a terminal.

Usage::

    ion rpc [--broker URL] [--credentials PATH] [--sysname S] [--timeout T] <service> <op> [json]
    ion ping [--broker URL] [--credentials PATH] [--sysname S] [--timeout T] <service>
    ion containers            the containers of the system (from their agents)
    ion ps [container]        processes of one container (or of every container)
    ion status [--web URL]    every container and worker: state, queue, rates, counts, last
                              error (like sr3 status); --web reads a container's web console
                              instead of the broker (memory://: default http://127.0.0.1:8580)
    ion spawn <module> [--container ID]
    ion post [--broker URL] [--exchange X] [--base-url URL] [--topic-prefix v03] [--user NAME]
             [--block-size BYTES]
             PATH...          announce files once (a directory: every file below it), on
                              an AMQP or an MQTT (mqtt[s]://, sr3's layout) broker; exit
                              status 0, 1 broker unreachable or a publish not confirmed, 2 bad
                              arguments or an unreadable path (see ion.apps.pump.post)
    ion broker-setup --user NAME --role subscriber|source|feeder|admin [--apply]
                              the rabbitmqctl commands giving a user a pump role (see
                              ion.core.cc.roles); --apply runs them on the local broker

The broker options are those of C{twistd cc}. A broker URL with a user and no password gets
it from the credentials file (C{--credentials}), so no password is on the command line, where
C{ps} shows it to every user of the machine; a user without one there is an error (but
C{guest}, and a C{--broker-cert} login), as is a memory:// broker: it lives in its container's
process, out of reach.

C{containers}, C{ps} and C{status} print aligned tables, the other commands JSON; C{--json}
prints any result as JSON (one line, for scripts). Exit status: 0 ok, 1 the remote side
answered with an error (message on stderr), 2 usage error, 3 timeout, no such service, or no
broker.
"""

import argparse
import base64
import importlib
import json
import os
import sys

from twisted.internet import defer, task
from twisted.python.failure import Failure

import ion

from ion.core.cc.container import Container, check_broker_url, make_transport
from ion.core.config import Config, ConfigError
from ion.core.credentials import DEFAULT_CREDENTIALS
from ion.core.conversation.errors import ConversationTimeout, NoSuchReceiver, RemoteError
from ion.core.log import redact
from ion.core.messaging.transport import TransportError
from ion.core.process import Process

OK, REMOTE_ERROR, USAGE, UNREACHABLE = 0, 1, 2, 3


class UsageError(Exception):
    pass


class NoSuchContainer(LookupError):
    """C{ion ps <container>}: no container of that id answers."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def _to_json(value):
    def default(obj):
        if isinstance(obj, bytes):
            try:
                return obj.decode("utf-8")
            except UnicodeDecodeError:
                return {"base64": base64.b64encode(obj).decode("ascii")}
        return repr(obj)

    return json.dumps(value, default=default, indent=None, sort_keys=True)


def _positive_seconds(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:  # also NaN
        raise argparse.ArgumentTypeError(f"timeout must be > 0, got {text}")
    return value


def build_parser():
    common = _Parser(add_help=False)
    common.add_argument("--broker", action="append",
                        help="broker URL (default: config ion.core.messaging broker); several "
                        "(a cluster's nodes, tried in turn): comma-separated or repeated")
    # The options C{twistd cc} shares, as it explains them.
    from ion.core.cc.tap import Options

    for name, short, _default, text, *_ in Options.optParameters:
        if name in ("credentials", "broker-ca", "broker-cert", "broker-key", "sysname", "res"):
            flags = [f"-{short}", f"--{name}"] if short else [f"--{name}"]
            common.add_argument(*flags, help=text)
    common.add_argument("--timeout", type=_positive_seconds, default=10.0,
                        help="seconds (default 10)")
    common.add_argument("--json", action="store_true", help="print the result as JSON")
    parser = _Parser(prog="ion", description="Talk to a running ION system.")
    parser.add_argument("--version", action="version", version=f"ION {ion.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("rpc", parents=[common], help="call an op and print the result")
    p.add_argument("service")
    p.add_argument("op")
    p.add_argument("content", nargs="?", help="JSON content (default null)")
    p = sub.add_parser("ping", parents=[common], help="check that a service answers")
    p.add_argument("service")
    sub.add_parser("containers", parents=[common], help="list the containers of the system")
    p = sub.add_parser("ps", parents=[common], help="list processes")
    p.add_argument("container", nargs="?")
    p = sub.add_parser("status", parents=[common], help="containers and workers at a glance")
    p.add_argument("--web", metavar="URL", help="a container's web console, e.g. "
                   "http://127.0.0.1:8580 (token: the credentials file's http://console@ line)")
    p = sub.add_parser("spawn", parents=[common], help="spawn a process in a container")
    p.add_argument("module")
    p.add_argument("--container", help="container id (default: any one)")
    p = sub.add_parser("post", parents=[common], help="announce files once (sr3's post)")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--exchange", help="exchange to post to (default xs_<user>)")
    p.add_argument("--base-url", help="the URL the files are fetched from (default: the file: "
                   "URL of the current directory; relPaths are relative to it)")
    p.add_argument("--topic-prefix", default="v03", help="routing key prefix (default v03)")
    p.add_argument("--user", help="the user whose xs_<user> is posted to (default: the broker "
                   "URL's user)")
    p.add_argument("--block-size", type=int, metavar="BYTES",
                   help="announce a file bigger than this as one notice per block, as sr3's "
                   "blocksize (default: whole files)")
    p = sub.add_parser(
        "broker-setup",
        help="print (or --apply) the rabbitmqctl commands giving a user a role on a shared pump",
    )
    p.add_argument("--user", required=True, help="the broker user (letters, digits, _ and -)")
    p.add_argument("--role", required=True, metavar="{subscriber,source,feeder,admin}",
                   help="what the user may do (README: Broker roles)")
    p.add_argument("--vhost", default="/", help="the pump's vhost (default /)")
    p.add_argument(
        "--public-exchange", default="xpublic",
        help="the exchange subscribers read, the ingest's exchange (default xpublic)",
    )
    p.add_argument("--existing", action="store_true",
                   help="the user exists: set its role only, its password stays")
    p.add_argument("--no-password", action="store_true",
                   help="a user without a password (logs in with a client certificate)")
    p.add_argument("--apply", action="store_true",
                   help="run the commands (password asked for, or the first line of stdin)")
    p.add_argument("--rabbitmqctl", help="the rabbitmqctl to run (default: the one on PATH)")
    p.add_argument("--node", help="the RabbitMQ node (rabbitmqctl -n; default its own)")
    return parser


# Commands an application provides, by module name: the module is imported only when its
# command runs (the core never imports an app; without the app the command says so). It has
# prepare(args) (check the arguments before connecting: ValueError) and async run(client,
# args) returning the line to print.
APP_COMMANDS = {"post": "ion.apps.pump.post"}


def app_command(name):
    """The module of the application command C{name}; UsageError when it is not installed."""
    try:
        return importlib.import_module(APP_COMMANDS[name])
    except ImportError as e:
        raise UsageError(f"{name}: the application providing it is not installed ({e})")


# The file read when --credentials is not given (tests point it elsewhere).
default_credentials = DEFAULT_CREDENTIALS


def broker_url(args, config):
    """The broker URL to use: --broker, else config; with the password from the credentials
    file when it names a user and no password. CredentialsError when the file is unusable."""
    from ion.core.cc.tap import broker_url_with_password

    url = ",".join(args.broker) if args.broker else None
    url = url or config.get("ion.core.messaging", "broker", "memory://")
    if isinstance(url, list):
        url = ",".join(url)
    certificate = args.broker_cert or config.get("ion.core.messaging", "broker_cert", None)
    return broker_url_with_password(url, args.credentials, default_credentials, bool(certificate))


async def _run(reactor, args):
    from ion.core.cc.tap import broker_tls, find_res_dir

    config = Config.load(args.res or find_res_dir())
    url = broker_url(args, config)
    if args.command == "status" and (args.web or check_broker_url(url) == "memory"):
        from ion.core.cc.status import read_console

        web = args.web or "http://127.0.0.1:8580"
        return [await read_console(reactor, web, args.timeout, args.credentials)]
    if args.command == "post" and url.split(":", 1)[0].lower() in ("mqtt", "mqtts"):
        # Posted through a connection of the command's process (an MQTT broker cannot carry
        # the container's own messages): the container itself runs on memory://.
        args.post_broker, url = url, "memory://"
    elif check_broker_url(url) == "memory":
        # A memory:// broker lives inside one process: this one's would be new and empty.
        raise UsageError(
            "no broker: give --broker amqp://... (a container on the embedded memory:// "
            "broker cannot be reached from outside)"
        )
    tls = broker_tls(url, args.broker_ca, args.broker_cert, args.broker_key, config)
    sysname = args.sysname or config.get("ion.core.messaging", "sysname", "ion")
    container = Container(config, reactor, make_transport(url, reactor, **tls), sysname=sysname,
                          container_id=f"cli_{os.getpid()}")
    try:
        connecting = defer.Deferred.fromCoroutine(container.start())
        connecting.addTimeout(args.timeout, reactor)
        await connecting
    except (defer.TimeoutError, TransportError, OSError) as e:
        raise TransportError(f"cannot reach broker {redact(url)}: {e or 'timed out'}") from None
    try:
        client = await container.spawn(Process, name="ion-cli")  # what the CLI talks through
        return await _command(client, args)
    finally:
        await container.stop()


async def _command(client, args):
    t = args.timeout
    if args.command == "rpc":
        try:
            content = json.loads(args.content) if args.content is not None else None
        except json.JSONDecodeError as e:
            raise UsageError(f"content is not JSON: {e}") from None
        return await client.rpc(args.service, args.op, content, timeout=t)
    if args.command == "ping":
        return await client.rpc(args.service, "ping", None, timeout=t)
    if args.command == "containers":
        return await client.rpc("ccagent", "containers", None, timeout=t)
    if args.command == "ps":
        if args.container:
            try:
                return await client.rpc(f"cc_{args.container}", "ps", None, timeout=t)
            except NoSuchReceiver:
                raise NoSuchContainer(
                    f"no container {args.container} in system {client.container.sysname} "
                    "(ion containers lists them)"
                ) from None
        peers = await client.rpc("ccagent", "containers", None, timeout=t)
        return {p["container"]: await client.rpc(f"cc_{p['container']}", "ps", None, timeout=t)
                for p in peers}
    if args.command == "status":
        peers = await client.rpc("ccagent", "containers", None, timeout=t)
        return [await client.rpc(f"cc_{p['container']}", "status", None, timeout=t)
                for p in peers]
    if args.command in APP_COMMANDS:
        return await app_command(args.command).run(client, args)
    if args.command == "spawn":
        dest = f"ccagent_{args.container}" if args.container else "ccagent"
        return await client.rpc(dest, "spawn", {"module": args.module}, timeout=t)
    raise UsageError(f"unknown command {args.command}")


def format_table(headings, rows):
    """Rows of cells as text columns under their headings, each as wide as its widest cell."""
    cells = [list(headings)] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headings))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def containers_table(peers, args=None):
    """The containers of a system (the agents' C{containers} rows) as a table and a count."""
    rows = [
        (
            p.get("container"),
            p.get("host"),
            p.get("os_pid"),
            f"{p.get('uptime', 0):.0f} s",
            f"{p.get('last_heartbeat', 0):.1f} s ago",
            ", ".join(p.get("apps") or ()),
        )
        for p in peers
    ]
    table = format_table(("CONTAINER", "HOST", "PID", "UP", "HEARTBEAT", "APPS"), rows)
    return f"{table}\n{len(rows)} container{'s' if len(rows) != 1 else ''}"


def _ps_table(result, args):
    by_container = {args.container: result} if args.container else result
    rows = [
        (cid, *row)
        for cid, processes in sorted(by_container.items())
        for row in processes
    ]
    table = format_table(("CONTAINER", "PID", "NAME", "CLASS", "STATE", "PARENT"), rows)
    return f"{table}\n{len(rows)} process{'es' if len(rows) != 1 else ''}"


def _status_table(statuses, args):
    from ion.core.cc.status import status_table

    headings, rows, total = status_table(statuses)
    return f"{format_table(headings, rows)}\n{total}"


_TABLES = {"containers": containers_table, "ps": _ps_table, "status": _status_table}


def main(argv=None):
    """Run one command. A usage error and C{broker-setup} return the exit status; a command that
    talks to the system runs under C{task.react}, which ends with SystemExit(status)."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        sys.stderr.write(f"ion: error: {e} (ion -h for help)\n")
        return USAGE
    if args.command == "broker-setup":
        # Nothing to connect to: rabbitmqctl does the work.
        from ion.core.cc.roles import broker_setup

        return broker_setup(args, sys.stdin, sys.stdout, sys.stderr)
    try:
        if args.command in APP_COMMANDS:
            app_command(args.command).prepare(args)
    except (UsageError, ValueError) as e:
        sys.stderr.write(f"ion: {e}\n")
        return USAGE
    task.react(_react, [args])


async def _react(reactor, args):
    """The command under C{task.react}: print its result, or one line saying why it failed and
    leave with that status (SystemExit, which react turns into the exit status)."""
    try:
        result = await _run(reactor, args)
    except (UsageError, ConfigError, ValueError) as e:
        # Also a config file, credentials file or broker URL that cannot be used.
        raise _fail(e, USAGE)
    except RemoteError as e:
        raise _fail(e, REMOTE_ERROR)
    except (ConversationTimeout, NoSuchReceiver, NoSuchContainer, TransportError) as e:
        raise _fail(e, REMOTE_ERROR if args.command == "post" else UNREACHABLE)
    except Exception as e:
        if args.command == "post":  # a publish the broker did not confirm
            raise _fail(f"not all files announced: {e}", REMOTE_ERROR)
        raise _fail(Failure().getTraceback(), REMOTE_ERROR)
    if args.command in APP_COMMANDS:
        return print(result)
    table = None if args.json else _TABLES.get(args.command)
    print(_to_json(result) if table is None else table(result, args))


def _fail(error, code):
    sys.stderr.write(f"ion: {redact(str(error))}\n")
    return SystemExit(code)
