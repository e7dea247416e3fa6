"""File operations announced by notices (C{fileOp}), carried out under a local destination.

A notice with a C{fileOp} asks for an operation rather than a download (sr3's shapes, see
L{ion.apps.pump.notice}): L{operation} names it with the event names a subscription's
C{events} selects from (C{delete}, C{rename}, C{link}, C{mkdir}, C{rmdir}); L{apply} does it.

Every path involved has passed the relPath rules (L{ion.apps.pump.paths}) before it gets here:
the notice's relPath and a rename's old name are placed under the destination like any file,
and a link's target must be relative and stay inside the destination once joined to the
link's directory (L{check_link_target}), else 422 and nothing is written. L{apply} runs
blocking (in a pool thread) and reaches every directory from the destination root's
descriptor, opening each one without following a symbolic link, so a link planted below the
root cannot send an operation elsewhere.
"""

import errno
import os
import posixpath
import shutil
import stat
from urllib.parse import unquote, urlsplit

from ion.apps.pump import paths
from ion.apps.pump.transfer.errors import LocalFailure

_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def operation(file_op):
    """The event name of a valid C{fileOp}: delete, rmdir, rename, link, hlink or mkdir."""
    if "remove" in file_op:
        return "rmdir" if "directory" in file_op else "delete"
    if "rename" in file_op:
        return "rename"
    if "hlink" in file_op:
        return "hlink"
    return "link" if "link" in file_op else "mkdir"


def renamed_from(base_url, old_rel):
    """The C{fileOp} C{rename} value for a file that was at C{old_rel}: as sr3 writes it, the
    old file's path in the URL's terms, baseUrl's path followed by the old relPath."""
    return unquote(urlsplit(base_url).path).rstrip("/") + "/" + old_rel


def old_relpath(base_url, value):
    """The old relPath a C{rename} (or C{hlink}) value names: the value with baseUrl's path
    taken off (sr3's form), or the value itself when it is relative; UnsafePath for an
    absolute path elsewhere, which cannot be placed under the destination."""
    if not value.startswith("/"):
        return value
    base = unquote(urlsplit(base_url).path).rstrip("/") + "/"
    if not value.startswith(base):
        raise paths.UnsafePath(f"unsafe old name {value!r}: not below baseUrl's path {base!r}")
    return value[len(base) :]


def check_link_target(target, link_parts):
    """UnsafePath unless the symbolic link target C{target}, for a link at C{link_parts} (below
    the destination root), is relative and resolves inside the destination."""
    if not isinstance(target, str) or not target or target.startswith("/"):
        raise paths.UnsafePath(f"unsafe link target {target!r}: absolute or empty")
    for part in target.split("/"):
        if part != "..":
            paths.safe_name(part)
    joined = posixpath.normpath(posixpath.join(*link_parts[:-1], target))
    if joined == ".." or joined.startswith("../"):
        raise paths.UnsafePath(f"unsafe link target {target!r}: leads outside the destination")


def _parent(root_fd, parts, make):
    """The descriptor of the directory holding C{parts[-1]}, reached from C{root_fd} without
    following links (made when missing if C{make}); None when missing and not C{make}."""
    fd = root_fd
    try:
        for part in parts[:-1]:
            try:
                child = os.open(part, _DIRECTORY, dir_fd=fd)
            except FileNotFoundError:
                if not make:
                    return None
                try:
                    os.mkdir(part, dir_fd=fd)
                except FileExistsError:
                    pass
                child = os.open(part, _DIRECTORY, dir_fd=fd)
            if fd != root_fd:
                os.close(fd)
            fd = child
    except OSError as e:
        if fd != root_fd:
            os.close(fd)
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise paths.UnsafePath(
                f"unsafe path {'/'.join(parts)!r}: a directory on the way is a symbolic link "
                "or a file"
            ) from None
        raise
    return os.dup(fd) if fd == root_fd else fd


def apply(root, op, parts, old=None, target=None):
    """Carry out C{op} at C{parts} (the components below the L{DestinationRoot} C{root});
    C{old}: the components of a rename's or hard link's old name; C{target}: a link's target
    (checked here). Returns what was done (a phrase for the report), or None for a rename or
    hard link whose old file is missing (the caller downloads the new one instead).

    @raise paths.UnsafePath: a path or target that could leave the destination (422).
    @raise LocalFailure: the filesystem refused (422, or 500 when transient).
    """
    if op == "link":
        check_link_target(target, parts)
    root_fd = root.acquire()
    fds = []
    try:
        make = op in ("link", "mkdir", "rename", "hlink")
        parent = _parent(root_fd, parts, make)
        name = parts[-1]
        if parent is None:
            return "already gone"
        fds.append(parent)
        if op == "mkdir":
            try:
                os.mkdir(name, dir_fd=parent)
            except FileExistsError:
                if not stat.S_ISDIR(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
                    raise LocalFailure(f"mkdir {'/'.join(parts)}: not a directory", code=422,
                                       transient=False) from None
            return "directory made"
        if op == "delete":
            try:
                os.unlink(name, dir_fd=parent)
            except FileNotFoundError:
                return "already gone"
            return "removed"
        if op == "rmdir":
            try:
                shutil.rmtree(name, dir_fd=parent)
            except FileNotFoundError:
                return "already gone"
            return "directory removed"
        if op == "link":
            temp = f".{name}.link.inflight"
            os.symlink(target, temp, dir_fd=parent)
            os.rename(temp, name, src_dir_fd=parent, dst_dir_fd=parent)
            return f"linked to {target}"
        old_parent = _parent(root_fd, old, False)
        if old_parent is None:
            return None
        fds.append(old_parent)
        try:
            if op == "hlink":
                os.link(old[-1], name, src_dir_fd=old_parent, dst_dir_fd=parent,
                        follow_symlinks=False)
            else:
                os.rename(old[-1], name, src_dir_fd=old_parent, dst_dir_fd=parent)
        except FileNotFoundError:
            return None
        return f"{'linked' if op == 'hlink' else 'renamed'} from {'/'.join(old)}"
    except OSError as e:
        raise LocalFailure.from_os_error(f"{op} {'/'.join(parts)}", e) from None
    finally:
        for fd in fds:
            os.close(fd)
        root.release()

