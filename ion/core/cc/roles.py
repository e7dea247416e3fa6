"""Broker roles of a pump shared by several users on RabbitMQ, and the C{rabbitmqctl} commands
that give a user one of them (C{ion broker-setup}).

The ingest stamps each notice with the user who published it to C{xs_<user>}, and that stamp
decides who gets the reports (C{xr_<user>}). RabbitMQ vouches for the publisher (it checks the
AMQP user_id against the login) but not for where a user may publish or read: that takes
permissions, three regular expressions per user and vhost (configure, write, read) matched
against exchange and queue names. The roles, after sr3's (U is the user):

  - C{admin}: everything, and the C{administrator} tag (rabbitmqctl, management).
  - C{feeder}: everything, no tag: the pump's own user. It declares C{xpublic}, C{xreport}, the
    C{xr_} exchanges, its system's exchanges and queues, and reads every user's C{xs_} exchange.
  - C{source}: posts files. Configure and write its own queues C{q_U.*} and its exchange C{xs_U};
    read its queues, the public exchange and its reports C{xr_U}. It may not write C{xpublic},
    another user's C{xs_}, or C{xreport}, nor read another user's C{xr_}; it may not configure
    (so delete) C{xr_U}, which the pump's report router publishes to.
  - C{subscriber}: only reads. Configure and write its own queues, read them and the public
    exchange. sr3 lets a subscriber write C{xs_U} to send reports upstream; this pump takes no
    reports from outside (its own consumers report through C{xreport} as the pump's user), and
    the ingest would take them for notices, so a subscriber writes no exchange at all. That
    also keeps it from binding an exchange of its own to C{xpublic}.

Unlike sr3's expressions, these are anchored at both ends and a queue prefix ends with its
dot, so user C{bob} gets nothing of user C{bobby}'s (C{^q_bob.*} would give it C{q_bobby...}).
For the same reason a user name has no dots: C{q_a.} would cover user C{a.b}'s queues.
"""

import getpass as _getpass
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass

ROLES = ("subscriber", "source", "feeder", "admin")
PUBLIC_EXCHANGE = "xpublic"

_USER = re.compile(r"[A-Za-z0-9_-]+", re.ASCII)
_EXCHANGE = re.compile(r"[A-Za-z0-9_.-]+", re.ASCII)


class RoleError(ValueError):
    """A user name, role, vhost or exchange name that cannot be used (one line)."""


@dataclass(frozen=True)
class Permissions:
    """What one role grants one user: RabbitMQ's three expressions and the user's tags."""

    configure: str
    write: str
    read: str
    tags: tuple = ()


def check_user(user):
    if not isinstance(user, str) or not _USER.fullmatch(user):
        raise RoleError(
            f"user name {user!r} must be letters, digits, '_' and '-' (it is part of the "
            "names q_<user>.*, xs_<user>, xr_<user>)"
        )
    return user


def _either(*alternatives):
    return "^(" + "|".join(alternatives) + ")$"


def permissions(role, user, public=PUBLIC_EXCHANGE):
    """The Permissions of C{role} for C{user}; C{public} is the exchange subscribers read (the
    ingest's C{exchange}). RoleError for an unknown role or a bad name."""
    check_user(user)
    if not isinstance(public, str) or not _EXCHANGE.fullmatch(public):
        raise RoleError(f"public exchange {public!r} must be letters, digits, '_', '.' and '-'")
    queues, public = rf"q_{user}\..*", re.escape(public)
    if role == "admin":
        return Permissions(".*", ".*", ".*", ("administrator",))
    if role == "feeder":
        return Permissions(".*", ".*", ".*")
    if role == "source":
        own = _either(queues, f"xs_{user}")
        return Permissions(own, own, _either(queues, public, f"xr_{user}"))
    if role == "subscriber":
        own = _either(queues)
        return Permissions(own, own, _either(queues, public))
    raise RoleError(f"role {role!r} is not one of {', '.join(ROLES)}")


def check_vhost(vhost):
    if not isinstance(vhost, str) or not vhost or not vhost.isprintable():
        raise RoleError(f"vhost {vhost!r} must be a non-empty printable name")
    return vhost


@dataclass(frozen=True)
class Step:
    """One rabbitmqctl command: what it does (for people), its arguments, and whether it
    reads the password on its standard input."""

    what: str
    args: tuple
    password: bool = False


def steps(user, role, vhost="/", public=PUBLIC_EXCHANGE, add=True, password=True):
    """The rabbitmqctl commands (after C{rabbitmqctl [-n node]}) that give C{user} C{role} on
    C{vhost}: add the user (unless C{add} is false: it exists, its password stays), set its tags
    (none but admin's, so a user moved off admin loses the tag), set its permissions. The
    password is never an argument: rabbitmqctl reads it from its standard input (it asks for
    it on a terminal); with C{password} false the user gets none and can only log in another
    way (EXTERNAL, with a client certificate)."""
    perms = permissions(role, user, public)
    check_vhost(vhost)
    result = []
    if add:
        if password:
            result.append(Step(f"add user {user}", ("add_user", user), password=True))
        else:
            result.append(Step(f"add user {user} (no password)", ("add_user", user, "")))
    tags = ", ".join(perms.tags) or "none"
    result.append(Step(f"tags of {user}: {tags}", ("set_user_tags", user, *perms.tags)))
    result.append(
        Step(
            f"permissions of {user} ({role}) on vhost {vhost}",
            ("set_permissions", "-p", vhost, user, perms.configure, perms.write, perms.read),
        )
    )
    return result


def _argv(rabbitmqctl, node, step):
    return [rabbitmqctl] + (["-n", node] if node else []) + list(step.args)


# Exit statuses of `ion broker-setup` (as the other `ion` commands: 2 is a usage error).
OK, FAILED, USAGE = 0, 1, 2


def broker_setup(args, stdin, stdout, stderr, getpass=None):
    """C{ion broker-setup}: print the commands for args.user and args.role, or with args.apply
    run them one by one, a line for each; the exit status. The password is asked for on a
    terminal (twice), else read as the first line of stdin, and goes to rabbitmqctl on its
    stdin: never an argument, never printed."""
    try:
        todo = steps(
            args.user,
            args.role,
            args.vhost,
            args.public_exchange,
            add=not args.existing,
            password=not args.no_password,
        )
    except RoleError as e:
        stderr.write(f"ion broker-setup: {e}\n")
        return USAGE
    if not args.apply:
        ctl = args.rabbitmqctl or "rabbitmqctl"
        stdout.write(
            f"# {args.user}: broker role {args.role} on vhost {args.vhost}, to run as the "
            "broker's administrator\n"
        )
        if any(step.password for step in todo):
            stdout.write("# (add_user asks for the password; or use --apply)\n")
        for step in todo:
            stdout.write(shlex.join(_argv(ctl, args.node, step)) + "\n")
        return OK
    ctl = args.rabbitmqctl or shutil.which("rabbitmqctl")
    if ctl is None or not (os.path.isfile(ctl) and os.access(ctl, os.X_OK)):
        where = repr(args.rabbitmqctl) if args.rabbitmqctl else "rabbitmqctl on PATH"
        stderr.write(f"ion broker-setup: no {where} to run; give --rabbitmqctl PATH\n")
        return USAGE
    secret = None
    if any(step.password for step in todo):
        try:
            secret = _read_password(args.user, stdin, getpass)
        except RoleError as e:
            stderr.write(f"ion broker-setup: {e}\n")
            return USAGE
    for step in todo:
        error = _run(ctl, args.node, step, secret)
        if error is not None:
            stderr.write(f"ion broker-setup: {step.what}: failed: {error}\n")
            return FAILED
        stdout.write(f"ion broker-setup: {step.what}: done\n")
        stdout.flush()
    return OK


def _read_password(user, stdin, getpass=None):
    if stdin.isatty():
        getpass = getpass or _getpass.getpass
        try:
            first = getpass(f"Password for {user}: ")
            again = getpass("Again: ")
        except (EOFError, KeyboardInterrupt):
            raise RoleError("no password given") from None
        if first != again:
            raise RoleError("the two passwords differ")
    else:
        first = stdin.readline().rstrip("\r\n")
    if not first:
        raise RoleError(
            "no password (a line on standard input, or typed at the prompt); give "
            "--no-password for a user who logs in with a client certificate only"
        )
    if "\n" in first or "\r" in first:
        raise RoleError("the password is more than one line")
    return first


def _run(ctl, node, step, secret):
    """Run one step; None when it succeeded, else why not (rabbitmqctl's own words)."""
    try:
        done = subprocess.run(
            _argv(ctl, node, step),
            input=f"{secret}\n" if step.password else "",
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        return "rabbitmqctl did not finish within 120 s"
    except OSError as e:
        return f"cannot run {ctl}: {e.strerror or e}"
    if done.returncode == 0:
        return None
    return f"exit status {done.returncode}: {_said(done.stderr or done.stdout)}"


def _said(output):
    """What rabbitmqctl said went wrong, on one line: the text after its last 'Error:'."""
    text = output.rsplit("Error:", 1)[-1]
    words = " ".join(text.split())
    if "already exists" in words:
        words += " (give --existing to set the role of an existing user)"
    return words[:500] or "(no message)"
