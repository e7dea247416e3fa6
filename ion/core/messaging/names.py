"""Names on the broker: one topic exchange per system; receivers are routing keys on it.

- the system exchange is `ion.<sysname>`;
- a process listens on queue `<pid>` bound with key `<pid>` (pid = `<containerid>.<n>`);
- a service's instances share queue `<sysname>.<service>` bound with key `<service>`.
So `send('hello', ...)` reaches one instance of service hello, `send(pid, ...)` one process.
"""

import re

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


def system_exchange(sysname):
    return f"ion.{sysname}"


def service_queue(sysname, service):
    return f"{sysname}.{service}"


def check_name(kind, name):
    """Raise ValueError unless name is usable as a routing key word sequence (no wildcards)."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name or name.endswith("."):
        raise ValueError(
            f"invalid {kind} name {name!r}: use letters, digits, '_', '-' and '.' between words"
        )
    return name
