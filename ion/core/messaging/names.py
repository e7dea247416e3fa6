"""Names on the broker: one topic exchange per system; receivers are routing keys on it.

  - the system exchange is C{ion.<sysname>};
  - a process listens on queue C{<pid>} bound with key C{<pid>} (pid = C{<containerid>.<n>});
  - a service's instances share queue C{<sysname>.<service>} bound with key C{<service>}.
So C{send('hello', ...)} reaches one instance of service hello, C{send(pid, ...)} one process.
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
