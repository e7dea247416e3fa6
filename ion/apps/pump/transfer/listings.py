"""Directory listings as servers send them, read into L{Entry} values.

HTML index pages (http and https), recognised by their links and the text that follows each:

  - twisted.web's C{static.File} listing (a table: name, size like C{123B}/C{4K}, type);
  - Apache C{mod_autoindex}, table or C{<pre>} (fancy) layout: name, C{YYYY-MM-DD HH:MM}, size
    like C{1.2K} or C{-};
  - nginx C{autoindex} (C{<pre>}): name, C{DD-Mon-YYYY HH:MM}, size in bytes or C{-};
  - and any page whose links name the directory's children followed by such a date and size.

Only links to direct children of the listed directory count (sort links with a query, the
parent link, absolute links elsewhere are skipped); a link ending in C{/} is a directory.
Dates are read as UTC (nginx's default; Apache prints server local time). A size is exact only
when printed as plain digits (optionally followed by C{B}); rounded sizes (C{1.2K}) give
C{size=None} so that a poller never mistakes rounding for a change. Links cannot be told from
files over http.

FTP: C{MLSD} lines (RFC 3659 facts C{type}, C{size}, C{modify}, C{UNIX.mode}), and C{LIST}
lines in the Unix C{ls -l} layout (year or time of day, as servers print them; a time of day
means within the last year) or the DOS/IIS layout (C{MM-DD-YY HH:MMAM <DIR>|size name}).
LIST times have minute precision at best and are read as UTC.
"""

import calendar
import hashlib
import re
import time
from html import unescape
from html.parser import HTMLParser
from urllib.parse import unquote, urljoin, urlsplit

from ion.apps.pump.transfer.errors import TransferError
from ion.apps.pump.transfer.results import Entry

# A listing larger than this is not one we want to hold in memory.
MAX_LISTING_BYTES = 32 * 1024 * 1024

_MONTHS = {name: number for number, name in enumerate(calendar.month_abbr) if name}

_HTML_DATE = re.compile(
    r"(?P<iso>\d{4}-\d{2}-\d{2})[ T](?P<isotime>\d{2}:\d{2}(?::\d{2})?)"
    r"|(?P<dmy>\d{1,2}-[A-Za-z]{3}-\d{4})[ :](?P<dmytime>\d{2}:\d{2}(?::\d{2})?)"
)
_HTML_SIZE = re.compile(r"^(?P<number>\d+(?:\.\d+)?)(?P<unit>[KMGTP]i?B?|B)?$", re.IGNORECASE)
# The usual text after a link: a date, then an exact size in bytes or '-', in spaces. What
# _html_mtime and _html_size read from it, read at once.
_HTML_DETAILS = re.compile(
    rf"[ \t\r\n]*(?P<date>{_HTML_DATE.pattern})[ \t\r\n]+(?:(?P<bytes>\d+)[Bb]?|-)[ \t\r\n]*"
)


class ListingBuffer:
    """A listing received in memory (a sink for the schemes' receivers), refused as too
    large (413) past C{limit} bytes received or announced; C{what} names it in that error."""

    backlogged = False

    def __init__(self, what, limit=MAX_LISTING_BYTES):
        self.chunks = []
        self.size = 0
        self.what = what
        self.limit = limit

    def write(self, data):
        self.size += len(data)
        self.declare(self.size)
        self.chunks.append(data)

    def declare(self, size):
        if size > self.limit:
            raise TransferError(f"{self.what} larger than {self.limit} bytes", code=413)


# The tags of a page, one match each: the usual link, C{<a href="...">text</a>}, whole (group
# 1 its href: two tags in one match, the text between them being no link's), comments,
# declarations and processing instructions (groups 1 and 3 None), or a start or end tag
# (group 2 '/' or '', group 3 its name, group 4 its attributes, quoted values kept whole).
_TAG = re.compile(
    r'<a href="([^"]*)">[^<]*</a>'
    r"|<!--.*?(?:-->|\Z)|<[!?][^>]*>"
    r"|<(/?)([A-Za-z][^\t\n\r\f />]*)((?:[^>\"']|\"[^\"]*\"|'[^']*')*)>",
    re.DOTALL,
)
_HREF = re.compile(
    r"""(?:^|[\s/"'])href\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s>]+))""", re.IGNORECASE
)


def scan_links(text):
    """Each link's href with the pieces of text that follow it, up to the next link or the end
    of its table row (a tag in between counts as a space), as L{_IndexScanner} collects them,
    read with regular expressions: a few times faster on the pages of a large directory. A
    page where some C{<} starts no tag those read (broken markup) goes to L{_IndexScanner},
    whose ways with broken markup are html.parser's."""
    tags = list(_TAG.finditer(text))
    whole_links = sum(1 for match in tags if match.group(1) is not None)  # two "<" each
    if len(tags) + whole_links != text.count("<"):
        scanner = _IndexScanner()
        scanner.feed(text)
        scanner.close()
        return scanner.links
    links = []
    in_anchor = row_closed = False
    pos = 0
    for match in tags:
        start = match.start()
        if start > pos and links and not in_anchor and not row_closed:
            links[-1][1].append(unescape(text[pos:start]))
        pos = match.end()
        href = match.group(1)
        if href is not None:
            links.append((unescape(href), []))
            in_anchor = row_closed = False
            continue
        tag = match.group(3)
        if tag is None:
            continue
        tag = tag.lower()
        if match.group(2):
            if tag == "a":
                in_anchor = False
            elif tag == "tr":
                row_closed = True
            elif links:
                links[-1][1].append(" ")
        elif tag == "a":
            href = _HREF.search(match.group(4))
            if href is not None:
                value = href.group(1)
                if value is None:
                    value = href.group(2) if href.group(2) is not None else href.group(3)
                links.append((unescape(value), []))
                in_anchor, row_closed = True, False
        elif links:
            links[-1][1].append(" ")
    if pos < len(text) and links and not in_anchor and not row_closed:
        links[-1][1].append(unescape(text[pos:]))
    return links


class _IndexScanner(HTMLParser):
    """Collects each link's href with the text that follows it, up to the next link or row."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.links = []
        self._in_anchor = False
        self._row_closed = False

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            href = dict(attrs).get("href")
            if href is not None:
                self.links.append((href, []))
                self._in_anchor = True
                self._row_closed = False
        elif self.links:
            self.links[-1][1].append(" ")

    def handle_endtag(self, tag):
        if tag == "a":
            self._in_anchor = False
        elif tag == "tr":
            self._row_closed = True
        elif self.links:
            self.links[-1][1].append(" ")

    def handle_data(self, data):
        if self.links and not self._in_anchor and not self._row_closed:
            self.links[-1][1].append(data)


# A link to a direct child, made of characters that urljoin and urlsplit leave alone and not
# starting with a dot: its URL is the page's URL followed by it (the usual link of an index).
_CHILD_HREF = re.compile(r"[A-Za-z0-9_~+=,@!$&'()*-][A-Za-z0-9_.~+=,@!$&'()*%-]*/?", re.ASCII)
# Dates read from index pages: a page repeats them, and strptime is slow.
_MTIMES = {}
_MTIMES_KEPT = 4096


def _html_details(text):
    """(mtime, exact size or None) read from the text after a link."""
    match = _HTML_DETAILS.fullmatch(text)
    if match is None:
        mtime, rest = _html_mtime(text)
        return mtime, _html_size(rest)
    size = match.group("bytes")
    return _date(match, match.group("date")), None if size is None else int(size)


def _html_mtime(text):
    match = _HTML_DATE.search(text)
    if match is None:
        return None, text
    rest = text[: match.start()] + " " + text[match.end() :]
    return _date(match, match.group()), rest


def _date(match, when):
    """The seconds of the date C{when} that C{match} found (L{_read_date}), remembered."""
    mtime = _MTIMES.get(when)
    if mtime is None:
        mtime = _read_date(match)
        if len(_MTIMES) >= _MTIMES_KEPT:
            _MTIMES.clear()
        _MTIMES[when] = mtime
    return mtime


def _read_date(match):
    """Seconds since the epoch of an L{_HTML_DATE} match, or None when it is no date."""
    try:
        if match.group("iso"):
            clock = match.group("isotime")
            form = "%Y-%m-%d %H:%M:%S" if clock.count(":") == 2 else "%Y-%m-%d %H:%M"
            stamp = time.strptime(f"{match.group('iso')} {clock}", form)
        else:
            day, month, year = match.group("dmy").split("-")
            hour, minute, *second = match.group("dmytime").split(":")
            month = _MONTHS[month.title()]
            stamp = (int(year), month, int(day), int(hour), int(minute), int((second or [0])[0]))
        return float(calendar.timegm(stamp))
    except (ValueError, KeyError):
        return None


def _html_size(text):
    for token in text.split():
        if token == "-":
            return None
        match = _HTML_SIZE.match(token)
        if match:
            unit = (match.group("unit") or "").upper()
            exact = unit in ("", "B") and "." not in match.group("number")
            return int(match.group("number")) if exact else None
    return None


# Part of every page digest: a change to what parse_html_index reads from a page (a new
# version of it) changes every digest, so that no page is taken as read the same as before.
_PAGE_READER = b"ion index page reader 1\n"


def page_digest(url, content_type, body):
    """A digest of the index page C{body} fetched from C{url} with C{content_type}: all that
    L{parse_html_index} reads it from (a page with the same digest lists the same entries)."""
    digest = hashlib.sha256(_PAGE_READER)
    digest.update(url.encode("utf-8", "surrogatepass") + b"\n")
    digest.update(content_type.encode("latin-1", "replace") + b"\n")
    digest.update(body)
    return digest.hexdigest()


def parse_html_index(text, base_url):
    """
    The entries of the HTML index page C{text} fetched from C{base_url}.

    @rtype: a list of L{Entry}, in page order, one per name.
    """
    if not base_url.endswith("/"):
        base_url += "/"
    base = urlsplit(base_url)
    entries = {}
    for href, after in scan_links(text):
        href = href.strip()
        if _CHILD_HREF.fullmatch(href):
            rest = href  # what the general case below finds, without parsing two URLs
        else:
            target = urlsplit(urljoin(base_url, href))
            if (target.scheme, target.netloc) != (base.scheme, base.netloc) or target.query:
                continue
            if not target.path.startswith(base.path):
                continue
            rest = target.path[len(base.path) :]
        kind = "dir" if rest.endswith("/") else "file"
        rest = rest.rstrip("/")
        name = unquote(rest)
        if not rest or "/" in rest or name in (".", ".."):
            continue
        mtime, size = _html_details("".join(after))
        if kind != "file":
            size = None
        entry = Entry(name, size, mtime, None, kind)
        known = entries.get(name)
        # Apache can link the icon and the name: keep the link followed by the details.
        if known is None or (known.mtime, known.size) == (None, None):
            entries[name] = entry
    return list(entries.values())


def parse_mlsd_line(line):
    """The L{Entry} of one C{MLSD} line (C{fact=value;...; name}), or C{None}."""
    facts, sep, name = line.partition(" ")
    if not sep or not name:
        return None
    values = {}
    for fact in facts.split(";"):
        key, _, value = fact.partition("=")
        if key:
            values[key.lower()] = value
    kind = values.get("type", "").lower()
    # cdir and pdir (the directory itself and its parent) are no entries.
    kind = {"file": "file", "dir": "dir"}.get(kind, "link" if "link" in kind else None)
    if kind is None:
        return None
    size = values.get("size")
    size = int(size) if size and size.isdigit() and kind == "file" else None
    return Entry(
        name, size, _mlsd_time(values.get("modify")), _octal(values.get("unix.mode")), kind
    )


def _mlsd_time(value):
    if not value:
        return None
    whole, _, fraction = value.partition(".")
    try:
        seconds = calendar.timegm(time.strptime(whole, "%Y%m%d%H%M%S"))
    except ValueError:
        return None
    return seconds + (float("0." + fraction) if fraction.isdigit() else 0.0)


def _octal(value):
    try:
        return int(value, 8) & 0o7777 if value else None
    except ValueError:
        return None


_UNIX_LIST = re.compile(
    r"^(?P<type>[-dlbcps])(?P<perms>[-rwxsStT]{9})[.+@]?\s+\d+\s+(?:\S+\s+){1,2}?"
    r"(?P<size>\d+)\s+(?P<month>[A-Za-z]{3})\s+(?P<day>\d{1,2})\s+"
    r"(?:(?P<hour>\d{1,2}):(?P<minute>\d{2})|(?P<year>\d{4}))\s(?P<name>.+)$"
)
_DOS_LIST = re.compile(
    r"^(?P<month>\d{2})-(?P<day>\d{2})-(?P<year>\d{2}|\d{4})\s+"
    r"(?P<hour>\d{1,2}):(?P<minute>\d{2})(?P<ampm>[AaPp][Mm])?\s+"
    r"(?P<size><DIR>|\d+)\s+(?P<name>.+)$"
)


def _permissions(text):
    """Mode bits from C{rwxr-xr-x}-style text (with s/S/t/T)."""
    mode = 0
    for index, char in enumerate(text):
        if char not in "-STl":
            mode |= 1 << (8 - index)
    for index, special in ((2, 0o4000), (5, 0o2000), (8, 0o1000)):
        if text[index] in "sStT":
            mode |= special
    return mode


def parse_list_line(line, now):
    """
    The L{Entry} of one C{LIST} line (Unix or DOS layout), or C{None} for lines that name no
    file (C{total 12}, devices, blank).

    @param now: the current time (seconds since the epoch), to date entries printed with a
        time of day and no year.
    """
    line = line.rstrip("\r\n")
    match = _UNIX_LIST.match(line)
    if match:
        kind = {"-": "file", "d": "dir", "l": "link"}.get(match.group("type"))
        if kind is None:
            return None
        name = match.group("name")
        if kind == "link":
            name = name.split(" -> ", 1)[0]
        month = _MONTHS.get(match.group("month").title())
        if month is None:
            return None
        day = int(match.group("day"))
        if match.group("year"):
            mtime = calendar.timegm((int(match.group("year")), month, day, 0, 0, 0))
        else:
            hour, minute = int(match.group("hour")), int(match.group("minute"))
            year = time.gmtime(now).tm_year
            mtime = calendar.timegm((year, month, day, hour, minute, 0))
            if mtime > now + 86400:
                mtime = calendar.timegm((year - 1, month, day, hour, minute, 0))
        size = int(match.group("size")) if kind == "file" else None
        return Entry(name, size, float(mtime), _permissions(match.group("perms")), kind)
    match = _DOS_LIST.match(line)
    if match:
        year, month, day, minute = map(int, match.group("year", "month", "day", "minute"))
        if year < 100:
            year += 2000 if year < 70 else 1900
        hour = int(match.group("hour")) % 12 if match.group("ampm") else int(match.group("hour"))
        if (match.group("ampm") or "").upper() == "PM":
            hour += 12
        mtime = float(calendar.timegm((year, month, day, hour, minute, 0)))
        if match.group("size") == "<DIR>":
            return Entry(match.group("name"), None, mtime, None, "dir")
        return Entry(match.group("name"), int(match.group("size")), mtime, None, "file")
    return None
