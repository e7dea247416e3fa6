"""One owner per state directory: a process claims the directories it keeps its state in.

A claim is an exclusive C{flock} on C{<directory>/.owner}, which also holds the owner's OS pid
and container id for the error a second claimant gets. The kernel drops the lock when its file
is closed, so a killed owner never leaves its directory claimed; a live one, in this OS process
or another, makes L{claim} fail with L{DirectoryInUse}.
"""

import errno
import fcntl
import os

OWNER_FILE = ".owner"


class DirectoryInUse(ValueError):
    """Another live process owns the state directory (a ValueError: bad configuration, one
    line and exit status 2 at boot)."""


class EnvironmentFailure(Exception):
    """The machine does not allow what a process needs (a directory that cannot be written:
    read-only, under a regular file); the message names the path and the reason. Reported in
    one line without a traceback, exit status 1 at boot."""


def expected(error):
    """Whether C{error} is bad input (a ValueError or C{bad_input}) or an environment failure
    (C{environment}): its message says it all, without a traceback."""
    return (
        isinstance(error, (ValueError, EnvironmentFailure))
        or getattr(error, "bad_input", False)
        or getattr(error, "environment", False)
    )


class DirectoryClaim:
    """A claimed directory; L{release} gives it up (idempotent)."""

    def __init__(self, path, fd):
        self.path = path
        self._fd = fd

    def release(self):
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def claim(path, owner):
    """Claim the directory C{path} (created if missing) for C{owner}, a short text naming the
    claimant (e.g. C{"<os pid> <container id>"}).

    @raise DirectoryInUse: a live process holds it; the message names the directory and that
        process.
    @raise EnvironmentFailure: the directory or its owner file cannot be created.
    """
    try:
        os.makedirs(path, exist_ok=True)
        fd = os.open(
            os.path.join(path, OWNER_FILE),
            os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
            0o644,
        )
    except OSError as e:
        why = e.strerror or e
        raise EnvironmentFailure(f"cannot create state directory {path}: {why}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 256, 0).decode("utf-8", "replace").split()
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        pid = holder[0] if holder else "unknown"
        where = f" (container {holder[1]})" if len(holder) > 1 else ""
        raise DirectoryInUse(
            f"state directory {path} is in use by process {pid}{where}; start this container "
            "from another working directory, or give it another state_dir"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{owner}\n".encode("utf-8"), 0)
    except OSError:
        os.close(fd)
        raise
    return DirectoryClaim(path, fd)
