"""An http(s) URL taken apart with its origin (scheme, host, port) parsed once per distinct
origin: a pump fetches many files from few servers, and taking the origin apart (the host,
the port, their checks) is most of what C{urlsplit} costs per URL.

L{split} gives the same parts as C{urllib.parse.urlsplit} for the URLs it takes: http and
https URLs with no user or password (no C{@}), nothing C{urlsplit} would strip or drop (no
tab, CR or LF, no leading control character or space) and a well-formed origin. For any
other URL it returns None, and the caller takes the URL apart the usual way (which also
raises the usual errors).
"""

import functools
from urllib.parse import urlsplit

_SCHEMES = ("http", "https")
_ORIGIN_ENDS = "/?#"


class Origin:
    """The origin of a URL: C{scheme} and C{host} lower-cased, C{port} as written (None when
    absent), C{netloc} as written, C{text} the URL up to the end of its netloc."""

    __slots__ = ("scheme", "host", "port", "netloc", "text")

    def __init__(self, scheme, host, port, netloc, text):
        self.scheme = scheme
        self.host = host
        self.port = port
        self.netloc = netloc
        self.text = text


@functools.lru_cache(maxsize=256)
def _origin(text):
    """The L{Origin} of C{text} (C{scheme://netloc}), or None when it is not one L{split}
    takes (the caller's own parse then says why)."""
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme
    if scheme not in _SCHEMES or text[: len(scheme) + 3].lower() != scheme + "://":
        return None
    if parts.path or parts.query or parts.fragment or not parts.hostname:
        return None
    return Origin(scheme, parts.hostname, port, parts.netloc, text)


def split(url):
    """C{(origin, path, query)} of an http(s) URL, as C{urlsplit} would give them (the
    fragment dropped), or None for a URL this does not take (see the module docstring)."""
    if (
        not isinstance(url, str)
        or not url
        or url[0] <= " "
        or "@" in url
        or "\t" in url
        or "\r" in url
        or "\n" in url
    ):
        return None
    start = url.find("://")
    if start <= 0:
        return None
    end = len(url)
    for char in _ORIGIN_ENDS:
        at = url.find(char, start + 3)
        if 0 <= at < end:
            end = at
    origin = _origin(url[:end])
    if origin is None:
        return None
    rest = url[end:].partition("#")[0]
    path, _, query = rest.partition("?")
    return origin, path, query
