"""Per-namespace log levels and password redaction on top of L{twisted.logger}.

Levels come from C{res/config/loglevels.cfg} (and an optional C{loglevelslocal.cfg}): a literal
list of C{(namespace, level)} pairs where a namespace covers the dotted names below it. Every
line written through L{make_observer} has the passwords of URLs replaced by C{***}.
"""

import os
import re

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    InvalidLogLevelError,
    LogLevel,
    LogLevelFilterPredicate,
    eventAsText,
    formatTime,
)
from zope.interface import implementer

from ion.core.config import ConfigError, node_line, read_literal_tree

LEVELS_FILES = ("loglevels.cfg", "loglevelslocal.cfg")

_PAIRS = "a list of (namespace, level) pairs"
_LEVEL_NAMES = ", ".join(level.name for level in LogLevel.iterconstants())


def read_levels_file(path):
    """The C{(namespace, LogLevel)} pairs of one log levels file, in file order.

    @raise ConfigError: the file is missing or malformed, or names an unknown level.
    """
    entries, node = read_literal_tree(path, (list, tuple), _PAIRS)
    levels = []
    for index, entry in enumerate(entries):
        line = node_line(node, index)
        if (
            not isinstance(entry, (tuple, list))
            or len(entry) != 2
            or not all(isinstance(part, str) for part in entry)
        ):
            raise ConfigError(
                f"each entry must be a (namespace, level) pair of strings, got {entry!r}",
                path,
                line,
            )
        namespace, name = entry
        try:
            level = LogLevel.levelWithName(name.lower())
        except InvalidLogLevelError:
            raise ConfigError(
                f"unknown log level {name!r} in {entry!r}; valid levels are {_LEVEL_NAMES}",
                path,
                line,
            ) from None
        levels.append((namespace, level))
    return levels


def load_levels(res_dir="res"):
    """The C{(namespace, LogLevel)} pairs of C{<res_dir>/config/loglevels.cfg} (required),
    then C{loglevelslocal.cfg} (if present); later entries win.

    @raise ConfigError: a file is missing or malformed, or names an unknown level.
    """
    required, local = (os.path.join(res_dir, "config", name) for name in LEVELS_FILES)
    levels = read_levels_file(required)
    if os.path.exists(local):
        levels += read_levels_file(local)
    return levels


def level_predicate(levels, default=LogLevel.info):
    """A filter predicate passing events at or above their namespace's level.

    @param levels: C{(namespace, LogLevel)} pairs; later pairs win. A namespace
        covers the dotted names below it unless they have their own pair.
    @param default: the level for namespaces no pair covers.
    @rtype: L{LogLevelFilterPredicate}
    """
    predicate = LogLevelFilterPredicate(defaultLogLevel=default)
    for namespace, level in levels:
        predicate.setLogLevelForNamespace(namespace, level)
    return predicate


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# A scheme:// right after one of these (or at the start of a line) begins another URL; one
# after anything else (a password holding "x://") may be inside the previous URL's password.
_BEFORE_URL = frozenset(" \t'\"<([{,;=")
# A user name runs up to the first ':'; one of these before it means that ':' is not in the
# authority (a path like /a:b@c), so there is no password.
_NOT_IN_USER = frozenset("/?#") | frozenset(" \t")


def redact(text):
    """Replace the password of every URL with credentials in C{text} by C{***}.

    C{amqp://user:secret@host/vh} becomes C{amqp://user:***@host/vh}; URLs without a password
    are left alone.

    The text is free (a message, a repr, a traceback), so where a URL ends is a guess, and the
    guess is made so that no part of a password shows: a password may hold any character but a
    line break (a quote, a space, C{@}, C{/}, C{?}, C{#}, brackets, as written unescaped by
    someone), so it is taken to run from the C{:} after the user name to the I{last} C{@}
    before the end of the line or the start of the next URL. A URL without a password but with
    a port, followed later on its line by an C{@} (C{http://h:80/a@b}), is therefore shown as
    C{http://h:***@b}: hidden too much rather than too little.
    """
    starts = list(_SCHEME.finditer(text))
    if not starts:
        return text
    out = []
    done = 0  # text[:done] is in out
    for index, match in enumerate(starts):
        begin = match.end()
        if begin <= done:
            continue  # inside a password already hidden
        end = len(text)
        for later in starts[index + 1 :]:
            at = later.start()
            if text[at - 1] in _BEFORE_URL or text[at - 1] in "\r\n":
                end = at
                break
        newline = text.find("\n", begin, end)
        if newline >= 0:
            end = newline
        at = text.rfind("@", begin, end)
        if at < 0:
            continue
        colon = text.find(":", begin, at)
        if colon < 0 or any(ch in _NOT_IN_USER for ch in text[begin:colon]):
            continue
        out.append(text[done : colon + 1])
        out.append("***")
        done = at
    out.append(text[done:])
    return "".join(out)


@implementer(ILogObserver)
class RedactedTextFileObserver:
    """Write each event to C{file} as one classic text line, C{<time> [<system>] <text>}
    (continuation lines indented by a tab), with every password redacted. The lines of a
    L{textFileLogObserver}, at half the cost: the event is formatted once, and the timestamp
    text (whole seconds) is reused for the events of the same second."""

    def __init__(self, file):
        self._file = file
        self._second = None
        self._stamp = "-"

    def _timestamp(self, when):
        if when is None:
            return "-"
        second = int(when)
        if second != self._second:
            self._second, self._stamp = second, formatTime(when)
        return self._stamp

    def __call__(self, event):
        text = redact(eventAsText(event, includeTimestamp=False, includeSystem=False))
        if not text:
            return
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            namespace = event.get("log_namespace", "-")
            system = f"{namespace}#{'-' if level is None else level.name}"
        else:
            try:
                system = redact(str(system))
            except Exception:  # noqa: BLE001 -- a log line must never raise
                system = "UNFORMATTABLE"
        line = f"{self._timestamp(event.get('log_time'))} [{system}] {text}"
        line = line.replace("\n", "\n\t") + "\n"
        try:
            self._file.write(line)
        except UnicodeEncodeError:
            # A lone surrogate (undecodable bytes of a file name) cannot be encoded: write it
            # as a backslash escape rather than lose the line.
            self._file.write(line.encode("utf-8", "backslashreplace").decode("utf-8"))
        self._file.flush()


def make_observer(file, levels, default=LogLevel.info):
    """An observer writing redacted text lines to C{file}, filtered by C{levels}.

    @param file: a text file, as for L{textFileLogObserver}.
    @param levels: C{(namespace, LogLevel)} pairs, e.g. from L{load_levels}.
    @param default: the level for namespaces no pair covers.
    """
    return FilteringLogObserver(RedactedTextFileObserver(file), [level_predicate(levels, default)])
