"""Path safety for the pump: every relPath or remote name passes here before any filesystem call.

A notification message names files with a C{relPath} chosen by whoever published it, and a
listing returns names chosen by a remote server; neither may reach outside the directory tree
ION writes into. L{safe_relpath} and L{safe_name} look only at the text (they never touch the
filesystem) and raise L{UnsafePath} for:

  - C{..} components, also when percent-encoded once or several times (C{%2e%2e}, C{%252E%252e},
    C{..%2f}, C{..%5c}), since a later decoding step (an HTTP server, a plugin) would undo it;
  - C{.} and empty components (C{a/./b}, C{a//b}, C{a/}): they would shift C{strip=N} mappings;
  - absolute paths: sr3 3.3.1 writes relPaths without a leading C{/} (see the reference messages),
    so one is refused unless the caller passes C{allow_leading_slash=True}, which then reads it as
    relative to the destination root (for peers converting older v02 messages);
  - NUL (also as C{%00}), control characters (C0, DEL, C1), backslashes, a Windows drive letter
    (C{C:}) as first component, a component over 255 bytes or a path over 4096 bytes of UTF-8;
  - a component named like a temporary file of a transfer (C{.<name>.<random>.inflight}): the
    start-up sweep of the destination would remove it as left over by a killed transfer.

L{resolve_under} then places checked components under a root and refuses the result when a part
of it that already exists is a symbolic link resolving outside the root. It reads the filesystem
(one lstat per existing component; a caller that resolved the root once passes it as
C{real_root}) and never creates anything. Its answer holds at the moment of the call:
code that then creates directories or files must still not follow links planted afterwards.
"""

import os
import re
import stat
from urllib.parse import unquote

from ion.apps.pump.transfer.inflight import is_inflight_name

NAME_MAX_BYTES = 255
PATH_MAX_BYTES = 4096
_DECODE_ROUNDS = 16

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SEPARATORS = re.compile(r"[/\\]")
_DRIVE = re.compile(r"[A-Za-z]:")
_STRIP_MODE = re.compile(r"strip=(\d+)", re.ASCII)


class UnsafePath(ValueError):
    """A path or name could escape the destination tree or confuse the filesystem (report 422)."""

    code = 422


def _show(value, limit=80):
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_text(kind, text):
    """The checks shared by whole paths and single names; raise UnsafePath on the first failure."""

    def refuse(why):
        raise UnsafePath(f"unsafe {kind} {_show(text)}: {why}")

    if not isinstance(text, str):
        refuse(f"not a string but {type(text).__name__}")
    if not text:
        refuse("empty")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        refuse("not valid UTF-8")
    if size > PATH_MAX_BYTES:
        refuse(f"{size} bytes long (the limit is {PATH_MAX_BYTES})")
    if "\x00" in text:
        refuse("contains a NUL character")
    control = _CONTROL.search(text)
    if control:
        refuse(f"contains control character U+{ord(control.group()):04X}")
    if "\\" in text:
        refuse("contains a backslash")
    layer = text
    for _ in range(_DECODE_ROUNDS):
        decoded = unquote(layer)
        if decoded == layer:
            return
        if ".." in _SEPARATORS.split(decoded):
            refuse("contains a percent-encoded '..' component")
        if "\x00" in decoded:
            refuse("contains a percent-encoded NUL")
        layer = decoded
    refuse(f"more than {_DECODE_ROUNDS} layers of percent-encoding")


def _check_component(kind, text, part, first):
    def refuse(why):
        raise UnsafePath(f"unsafe {kind} {_show(text)}: {why}")

    if part == "":
        refuse("empty component (a doubled or trailing '/')")
    if part in (".", ".."):
        refuse(f"{part!r} component")
    size = len(part.encode("utf-8"))
    if size > NAME_MAX_BYTES:
        refuse(f"a component is {size} bytes long (the limit is {NAME_MAX_BYTES})")
    if first and _DRIVE.match(part):
        refuse("starts with a Windows drive letter")
    if is_inflight_name(part):
        refuse(f"{part!r} is named like a temporary file ('.<name>.<random>.inflight')")


def safe_relpath(rel_path, *, allow_leading_slash=False):
    """The components of a relPath, or UnsafePath saying why it cannot be used."""
    _check_text("path", rel_path)
    body = rel_path
    if body.startswith("/"):
        if not allow_leading_slash:
            raise UnsafePath(f"unsafe path {_show(rel_path)}: absolute (starts with '/')")
        body = body[1:]
    parts = body.split("/")
    for index, part in enumerate(parts):
        _check_component("path", rel_path, part, first=index == 0)
    return parts


def safe_name(name, first=True):
    """A single directory entry name (listing entry, link or rename name), or UnsafePath."""
    _check_text("name", name)
    if "/" in name:
        raise UnsafePath(f"unsafe name {_show(name)}: contains '/'")
    _check_component("name", name, name, first)
    return name


def _within(path, root):
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def resolve_under(root, rel_parts, *, real_root=None, known_dirs=None):
    """The absolute path of C{rel_parts} under the real path of C{root}, checked against symlinks.

    Raises UnsafePath if a component is unsafe or if an existing part of the result (a
    directory on the way, or the file itself) is a symbolic link resolving outside the root.
    C{real_root} is C{os.path.realpath(root)} when the caller knows it already.

    C{known_dirs}, a L{KnownDirectories} of the caller's, spares the lstat of a directory on
    the way that an earlier call found to be a directory, not a link. Only for a caller whose
    writes never follow a link below the root whatever this said (the consumer's transfers
    open each directory with C{O_NOFOLLOW}): a directory swapped for a link since is then
    refused there, not here.
    """
    if isinstance(rel_parts, (str, bytes)):
        raise TypeError("rel_parts must be a list of components (see safe_relpath)")
    rel_parts = list(rel_parts)
    if not rel_parts:
        raise UnsafePath("unsafe path '': no components to place under the root")
    for index, part in enumerate(rel_parts):
        safe_name(part, first=index == 0)
    return _resolve(root, rel_parts, real_root, known_dirs)


def _resolve(root, rel_parts, real_root, known_dirs):
    """L{resolve_under} of components already checked (a non-empty list)."""
    base = real_root if real_root is not None else os.path.realpath(root)
    # The components hold no separator: each probe is its parent's path, "/" and the name.
    prefix = base if base.endswith(os.sep) else base + os.sep
    last = len(rel_parts) - 1
    for index, part in enumerate(rel_parts):
        probe = prefix + part
        prefix = probe + os.sep
        if known_dirs is not None and index < last and probe in known_dirs:
            continue
        try:
            mode = os.lstat(probe).st_mode
        except (FileNotFoundError, NotADirectoryError):
            break  # nothing deeper exists: nothing to follow
        if stat.S_ISLNK(mode) and not _within(os.path.realpath(probe), base):
            raise UnsafePath(
                f"unsafe path {_show('/'.join(rel_parts))}: {_show(probe)} leads outside "
                f"{_show(base)} through a symbolic link"
            )
        if known_dirs is not None and index < last and stat.S_ISDIR(mode):
            known_dirs.add(probe)
    return os.path.join(base, *rel_parts)


class KnownDirectories:
    """The directories L{resolve_under} found to be directories (not links), at most C{limit}
    of them (all forgotten when full)."""

    def __init__(self, limit=4096):
        self.limit = limit
        self._paths = set()

    def __contains__(self, path):
        return path in self._paths

    def add(self, path):
        if len(self._paths) >= self.limit:
            self._paths.clear()
        self._paths.add(path)


def destination(
    root, notice, mode="mirror", *, allow_leading_slash=False, real_root=None, known_dirs=None
):
    """Where a consumer writes the file a notice announces, checked by the rules above.

    Modes: C{mirror} keeps relPath's directories under C{root}; C{directory} puts every file
    directly in C{root}; C{strip=N} drops the first N components of relPath (always keeping the
    file name, so a large N behaves like C{directory}). C{known_dirs}: see L{resolve_under}.
    """
    parts = safe_relpath(notice.rel_path, allow_leading_slash=allow_leading_slash)
    strip = _STRIP_MODE.fullmatch(mode) if isinstance(mode, str) else None
    if mode == "directory":
        parts = parts[-1:]
    elif strip:
        parts = parts[min(int(strip.group(1)), len(parts) - 1) :]
    elif mode != "mirror":
        raise ValueError(
            f"unknown destination mode {mode!r}; use 'mirror', 'directory' or 'strip=N'"
        )
    # safe_relpath checked every component; one that is now first is checked as a first one.
    _check_component("path", notice.rel_path, parts[0], True)
    return _resolve(root, parts, real_root, known_dirs)
