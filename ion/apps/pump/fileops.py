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

import os
import posixpath
import shutil
import stat
from urllib.parse import unquote, urlsplit

from twisted.internet import threads

from ion.apps.pump import paths
from ion.apps.pump.transfer.errors import LocalFailure, TransferError
from ion.apps.pump.transfer.inflight import NotADirectoryOnTheWay, walk_below

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
    try:
        fd = walk_below(root_fd, parts[:-1], make)
    except FileNotFoundError:
        if make:
            raise
        return None
    except NotADirectoryOnTheWay:
        raise paths.UnsafePath(
            f"unsafe path {'/'.join(parts)!r}: a directory on the way is a symbolic link "
            "or a file"
        ) from None
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
                    raise LocalFailure(
                        f"mkdir {'/'.join(parts)}: not a directory", code=422
                    ) from None
            return "directory made"
        if op in ("delete", "rmdir"):
            try:
                (os.unlink if op == "delete" else shutil.rmtree)(name, dir_fd=parent)
            except FileNotFoundError:
                return "already gone"
            return "removed" if op == "delete" else "directory removed"
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



class AppliesFileOps:
    """What a consumer (and a sender) does with a notice that has a C{fileOp}: the operation,
    if C{events} allows it, on the file where the notice's relPath places it, reported to the
    source (201, or the refusal's code) and remembered in the duplicate cache. A rename or
    hard link whose old file is missing downloads the new file instead (a renamed directory
    or link is made anew). C{_operate} does the operation (a consumer: L{apply} under its
    directory, in its transfer thread pool)."""

    def placed(self, notice, rel_path=None):
        """The components of where the notice's file (or C{rel_path}) goes below the
        destination; paths.UnsafePath when it would leave it."""
        if rel_path is not None:
            notice = notice.copy()
            notice.rel_path = rel_path
        path = paths.destination(
            self.real_directory, notice, self.mode, real_root=self.real_directory
        )
        return os.path.relpath(path, self.real_directory).split(os.sep)

    async def _operate(self, op, parts, old, target):
        return await threads.deferToThreadPool(
            self.container.reactor, self.transfers.pool, apply, self.root, op, parts, old, target
        )

    async def _file_op(self, delivery, notice, url):
        file_op = notice.file_op
        op = operation(file_op)
        key = f"fileOp {op}\n{notice.rel_path}\n{notice.pub_time}"
        if key in self.dupcache or self.retries.has_key(key):
            self.stats["duplicates"] += 1
            return self._ack(delivery)
        if ("link" if op == "hlink" else op) not in self.events:
            self.stats["unsupported"] += 1
            return self._ack(delivery)
        if await self._carry_out(notice, key, delivery.routing_key) is None:
            # The old file is missing: the new one is fetched instead.
            notice.file_op = None
            return await self._deliver_new(delivery, notice, url, key)
        self._ack(delivery)

    async def _carry_out(self, notice, key, routing_key, entry=None):
        """Carry out a notice's fileOp: C{settled} once reported (201 or the refusal),
        C{retrying} when a transient failure is kept in the retry queue (C{entry}: the retry
        being run), None when a rename's old file is missing."""
        file_op = notice.file_op
        op = operation(file_op)
        try:
            parts = self.placed(notice)
            old = None
            if op == "link":
                check_link_target(file_op["link"], parts)
            if op in ("rename", "hlink"):
                old = self.placed(notice, old_relpath(notice.base_url, file_op[op]))
            done = await self._operate(op, parts, old, file_op.get("link"))
            if done is None and ("link" in file_op or "directory" in file_op):
                done = await self._operate(
                    "link" if "link" in file_op else "mkdir", parts, None, file_op.get("link")
                )
        except paths.UnsafePath as e:
            self.log.warn("{name}: {reason}", name=self.label, reason=e)
            await self._fail(notice, key, 422, str(e), routing_key)
            return "settled"
        except TransferError as e:
            if e.transient and entry is None:
                await self.retries.add(key, notice.to_dict(), routing_key, e.code, e.message)
                self.stats["retrying"] = len(self.retries)
                self._schedule_retries()
                return "retrying"
            if e.transient and self.retries.failed_again(entry, e.code, e.message):
                return "retrying"
            await self._fail(notice, key, e.code, e.message, routing_key)
            return "settled"
        if done is None:
            return None
        await self._report(notice, key, 201, done)
        added = self.dupcache.add(key)
        if added is not None:  # a shared cache (instances)
            await added
        self.stats["file_ops"] += 1
        self.log.info(
            "{name}: {op} {path}: {done}",
            name=self.label, op=op, path="/".join(parts), done=done,
        )
        return "settled"
