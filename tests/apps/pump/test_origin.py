"""Tests for ion.apps.pump.transfer.origin: an http(s) URL taken apart with its origin parsed
once gives what the whole parse gives, in every user of it."""

from urllib.parse import urlsplit

from twisted.trial.unittest import SynchronousTestCase

from ion.apps.pump.transfer import limits, location, origin, policy
from ion.apps.pump.transfer.errors import TransferError

TAKEN = [
    "http://example.org/a/b.txt",
    "http://Example.ORG:8080/a%20b/c?x=1&y=2",
    "https://example.org",
    "https://example.org?q",
    "https://example.org#frag",
    "http://example.org/a#frag?not-query",
    "http://example.org/a?q#f",
    "http://example.org/a?",
    "http://127.0.0.1:43211/d0/f12.dat",
    "http://[::1]:8080/x",
    "http://[::ffff:127.0.0.1]/x",
    "http://0x7f.1/x",
    "http://bücher.example/ü",
    "http://example.org./x/../y",
    "http://example.org/%2e%2e/x",
    "http://example.org:/x",
    "HTTP://example.org/x",
]

NOT_TAKEN = [
    "http://user:secret@example.org/x",  # a login: redacted in messages, parsed whole
    "ftp://example.org/x",
    "sftp://example.org/x",
    "file:///etc/passwd",
    " http://example.org/x",
    "http://example.org/a\tb",
    "http://example.org/a\nb",
    "http://example.org:99999/x",
    "http://example.org:port/x",
    "http://[::1/x",
    "http:///x",
    "http:/example.org/x",
    "example.org/x",
    "",
]


class SplitTests(SynchronousTestCase):
    def test_same_as_urlsplit(self):
        """The parts of a URL split takes are urlsplit's (the fragment dropped)."""
        for url in TAKEN:
            split = origin.split(url)
            self.assertIsNotNone(split, url)
            where, path, query = split
            parts = urlsplit(url)
            self.assertEqual(
                (where.scheme, where.host, where.port, where.netloc, path, query),
                (parts.scheme, parts.hostname, parts.port, parts.netloc, parts.path, parts.query),
                url,
            )

    def test_not_taken(self):
        """A URL with a login, of another scheme, or one urlsplit would change or refuse is
        left to the whole parse."""
        for url in NOT_TAKEN:
            self.assertIsNone(origin.split(url), url)


def outcome(function, *args):
    try:
        return function(*args)
    except (ValueError, TransferError) as e:
        return type(e), str(e)


class UsersTests(SynchronousTestCase):
    """locate, request_url, host_key and normalize answer the same with and without it."""

    def both(self, function, url):
        fast = outcome(function, url)
        self.patch(origin, "split", lambda url: None)
        try:
            slow = outcome(function, url)
        finally:
            self.patch(origin, "split", split)
        self.assertEqual(fast, slow, url)

    def test_same_answers(self):
        for url in TAKEN + NOT_TAKEN:
            for function in (
                location.locate,
                location.request_url,
                limits.host_key,
                policy.normalize,
            ):
                self.both(function, url)


split = origin.split
