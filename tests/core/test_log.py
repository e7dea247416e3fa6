"""
Tests for L{ion.core.log}.
"""

import io
import os

from twisted.logger import Logger, LogLevel, LogPublisher, PredicateResult, textFileLogObserver
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from ion.core.config import ConfigError
from ion.core.log import (
    RedactedTextFileObserver,
    level_predicate,
    load_levels,
    make_observer,
    redact,
)


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def event(namespace, level):
    return {"log_namespace": namespace, "log_level": level, "log_format": "x", "log_time": 0}


def passes(predicate, namespace, level):
    return predicate(event(namespace, level)) != PredicateResult.no


class LoadLevelsTests(SynchronousTestCase):
    """
    L{load_levels} reads C{loglevels.cfg} and then C{loglevelslocal.cfg}.
    """

    def setUp(self):
        self.res = self.mktemp()
        self.levels = os.path.join(self.res, "config", "loglevels.cfg")
        self.local = os.path.join(self.res, "config", "loglevelslocal.cfg")

    def test_shippedFile(self):
        """
        The shipped C{res/config/loglevels.cfg} loads and sets C{ion} to warn.
        """
        here = os.path.dirname(os.path.abspath(__file__))
        levels = load_levels(os.path.join(here, os.pardir, os.pardir, "res"))
        self.assertIn(("ion", LogLevel.warn), levels)

    def test_levelNamesAnyCase(self):
        """
        Level names are Twisted's, in any case.
        """
        write(
            self.levels,
            "# levels\n[('a', 'DEBUG'), ('b', 'Info'), ('c', 'warn'), ('d', 'error'),"
            " ('e', 'critical')]",
        )
        self.assertEqual(
            load_levels(self.res),
            [
                ("a", LogLevel.debug),
                ("b", LogLevel.info),
                ("c", LogLevel.warn),
                ("d", LogLevel.error),
                ("e", LogLevel.critical),
            ],
        )

    def test_localFileAppended(self):
        """
        Entries of the local file come after (and so override) the main file.
        """
        write(self.levels, "[('ion', 'warn'), ('twisted', 'warn')]")
        write(self.local, "[('ion', 'debug')]")
        levels = load_levels(self.res)
        self.assertEqual(levels[-1], ("ion", LogLevel.debug))
        predicate = level_predicate(levels)
        self.assertTrue(passes(predicate, "ion.core.process", LogLevel.debug))
        self.assertFalse(passes(predicate, "twisted.internet", LogLevel.info))

    def test_mainFileRequired(self):
        """
        A missing C{loglevels.cfg} is a L{ConfigError} naming it.
        """
        error = self.assertRaises(ConfigError, load_levels, self.res)
        self.assertEqual(str(error), f"{self.levels}: no such file")

    def test_badLevelNamesFileLineAndEntry(self):
        """
        An unknown level name is reported with file, line and entry.
        """
        write(self.levels, "[('ion', 'warn')]")
        write(self.local, "[\n ('ion', 'warn'),\n ('ion.core', 'verbose'),\n]")
        error = self.assertRaises(ConfigError, load_levels, self.res)
        self.assertEqual((error.path, error.line), (self.local, 3))
        self.assertEqual(
            str(error),
            f"{self.local}:3: unknown log level 'verbose' in ('ion.core', 'verbose');"
            " valid levels are debug, info, warn, error, critical",
        )

    def test_badShape(self):
        """
        Entries that are not pairs of strings, or a top level that is not a
        list, are reported naming the file.
        """
        for text, problem in [
            ("[('ion',)]", "got ('ion',)"),
            ("[('ion', 'warn', 'x')]", "got ('ion', 'warn', 'x')"),
            ("['ion']", "got 'ion'"),
            ("[('ion', 30)]", "got ('ion', 30)"),
            ("{'ion': 'warn'}", "must be a list of (namespace, level) pairs, got dict"),
        ]:
            write(self.levels, text)
            error = self.assertRaises(ConfigError, load_levels, self.res)
            self.assertTrue(str(error).startswith(self.levels), str(error))
            self.assertIn(problem, str(error))


class LevelPredicateTests(SynchronousTestCase):
    """
    L{level_predicate} applies levels along the dotted namespace hierarchy.
    """

    def test_hierarchy(self):
        """
        With ion=warn and ion.core.cc=info, info passes below ion.core.cc only;
        warn passes everywhere under ion.
        """
        predicate = level_predicate([("ion", LogLevel.warn), ("ion.core.cc", LogLevel.info)])
        self.assertTrue(passes(predicate, "ion.core.cc.tap", LogLevel.info))
        self.assertFalse(passes(predicate, "ion.core.process", LogLevel.info))
        self.assertTrue(passes(predicate, "ion.core.process", LogLevel.warn))
        self.assertFalse(passes(predicate, "ion.core.cc.tap", LogLevel.debug))

    def test_laterWins(self):
        """
        When a namespace appears twice, the later entry wins.
        """
        predicate = level_predicate([("ion", LogLevel.debug), ("ion", LogLevel.error)])
        self.assertFalse(passes(predicate, "ion.x", LogLevel.warn))
        self.assertTrue(passes(predicate, "ion.x", LogLevel.error))

    def test_default(self):
        """
        Namespaces no entry covers use the default level.
        """
        predicate = level_predicate([("ion", LogLevel.debug)], default=LogLevel.error)
        self.assertFalse(passes(predicate, "other", LogLevel.warn))
        self.assertTrue(passes(predicate, "other", LogLevel.critical))
        self.assertTrue(passes(level_predicate([]), "other", LogLevel.info))


class RedactTests(SynchronousTestCase):
    """
    L{redact} hides URL passwords in any text.
    """

    def test_table(self):
        """
        Passwords of any scheme are replaced by C{***}; everything else is kept.
        """
        cases = [
            ("amqp://user:secret@host/vh", "amqp://user:***@host/vh"),
            ("amqps://user:secret@host:5671/vh", "amqps://user:***@host:5671/vh"),
            ("sftp://u:p@h/dir", "sftp://u:***@h/dir"),
            ("ftp://u:p@h", "ftp://u:***@h"),
            ("http://u:p@h:8080/x?y=1", "http://u:***@h:8080/x?y=1"),
            ("git+ssh://u:p@h/r", "git+ssh://u:***@h/r"),
            (
                "from amqp://a:s1@h1/ to sftp://b:s2@h2/d, done",
                "from amqp://a:***@h1/ to sftp://b:***@h2/d, done",
            ),
            ("url='amqp://u:pw@h'", "url='amqp://u:***@h'"),
            ("amqp://u:p@ss@h/", "amqp://u:***@h/"),
            ("amqp://u:p%40ss@h/", "amqp://u:***@h/"),
            ("amqp://user@host/vh", "amqp://user@host/vh"),
            ("amqp://host:5672/vh", "amqp://host:5672/vh"),
            ("http://user@host/a@b", "http://user@host/a@b"),
            ("http://host/a:b@c", "http://host/a:b@c"),
            ("http://host/?mail=a@b", "http://host/?mail=a@b"),
            # A port followed by an '@' on its line reads as a password: too much hidden,
            # never too little (the password could be '8080/a').
            ("http://user@host:8080/a@b", "http://user@host:***@b"),
            ("http://host:8080/?mail=a@b", "http://host:***@b"),
            ("amqp://u:p@h/\nmail a@b", "amqp://u:***@h/\nmail a@b"),
            ("x=amqp://u:a://b@h/", "x=amqp://u:***@h/"),
            ("memory://", "memory://"),
            ("no url here: a@b", "no url here: a@b"),
            ("", ""),
        ]
        for text, expected in cases:
            self.assertEqual(redact(text), expected, text)

    def test_nasty_passwords(self):
        """
        A password holding characters that end a URL in prose or a repr (quotes, space,
        C{@ / ? #}, brackets, braces, backslash, C{:}) is hidden whole, wherever the URL
        stands: alone, in a sentence, quoted, in a repr, with another URL after it.
        """
        for password in NASTY_PASSWORDS:
            url = f"amqp://pump:{password}@broker.example:5672/"
            for text in [
                url,
                f"cannot reach {url}: refused",
                f"url='{url}'",
                repr({"broker": url, "n": 1}),
                repr([url]),
                f"from {url} to sftp://b:x@h2/d",
            ]:
                shown = redact(text)
                assertHidden(self, password, shown)
                self.assertIn("amqp://pump:***@broker.example:5672/", shown)


# Passwords that end a regex for URLs early: a part of each (S3cr, 3tXy) must never show.
NASTY_PASSWORDS = [
    'S3cr"3tXy',
    "S3cr'3tXy",
    "S3cr@3tXy",
    "S3cr@@3tXy",
    "S3cr/3tXy",
    "S3cr?3tXy",
    "S3cr#3tXy",
    "S3cr 3tXy",
    "S3cr:3tXy",
    "S3cr[3tXy",
    "S3cr]3tXy",
    "S3cr(3tXy",
    "S3cr)3tXy",
    "S3cr<3tXy",
    "S3cr{3tXy}",
    "S3cr\\3tXy",
    "S3cr%223tXy",
    "S3cr\"'@/?# ([{3tXy",
]


def assertHidden(testcase, password, shown):
    """No piece of the password (split at its odd characters) shows in `shown`."""
    for piece in ("S3cr", "3tXy"):
        testcase.assertNotIn(piece, shown, (password, shown))


class ObserverTests(SynchronousTestCase):
    """
    L{make_observer} never writes a password.
    """

    def setUp(self):
        self.output = io.StringIO()
        self.publisher = LogPublisher()
        self.log = Logger(namespace="ion.core.messaging", observer=self.publisher)

    def observe(self, levels=(("ion", LogLevel.debug),)):
        self.publisher.addObserver(make_observer(self.output, list(levels)))

    def test_secretInField(self):
        """
        A password inside a field of the event is redacted in the line written.
        """
        self.observe()
        self.log.info("connecting to {url}", url="amqp://u:pw@h/")
        text = self.output.getvalue()
        self.assertNotIn("pw", text)
        self.assertIn("connecting to amqp://u:***@h/", text)
        self.assertIn("[ion.core.messaging#info]", text)

    def test_secretInFailure(self):
        """
        A password in a failure's message is redacted from the traceback written.
        """
        self.observe()
        try:
            raise ConnectionError("cannot reach amqp://u:hunter2@h/")
        except ConnectionError:
            self.log.failure("connection to {url} lost", url="amqp://u:hunter2@h/")
        text = self.output.getvalue()
        self.assertNotIn("hunter2", text)
        self.assertIn("connection to amqp://u:***@h/ lost", text)
        self.assertIn("ConnectionError: cannot reach amqp://u:***@h/", text)

    def test_secretInUnformattableEvent(self):
        """
        When an event cannot be formatted, the fallback text showing the event's
        fields is redacted too.
        """
        self.observe()
        self.log.info("{missing} {url}", url="amqp://u:pw@h/")
        text = self.output.getvalue()
        self.assertIn("Unable to format event", text)
        self.assertNotIn("pw", text)

    def test_nastyPasswordsInEvents(self):
        """
        Through the whole logging path, a broker URL's password is never written, whatever
        it holds: in a field, in a repr of the arguments, in a failure's message.
        """
        self.observe()
        for password in NASTY_PASSWORDS:
            url = f"amqp://pump:{password}@broker.example:5672/"
            self.log.info("connecting to {url}", url=url)
            self.log.info("args {args}", args={"broker": url, "sysname": "ion"})
            try:
                raise ConnectionError(f"cannot reach {url}")
            except ConnectionError:
                self.log.failure("connection to {url} lost", url=url)
        text = self.output.getvalue()
        assertHidden(self, "any", text)
        self.assertEqual(text.count("amqp://pump:***@broker.example:5672/"), 4 * 18)

    def test_unencodableText(self):
        """
        A line holding a lone surrogate (undecodable bytes of a file name) is written, with
        the surrogate escaped, to a strict UTF-8 stream; the observer does not fail.
        """
        raw = io.BytesIO()
        output = io.TextIOWrapper(raw, encoding="utf-8")
        self.publisher.addObserver(make_observer(output, [("ion", LogLevel.debug)]))
        self.log.info("got {path}", path="a\udcff.txt")
        output.flush()
        self.assertIn(b"got a\\udcff.txt", raw.getvalue())

    def test_bracesInFields(self):
        """
        Braces in field values are written literally, not treated as a format.
        """
        self.observe()
        self.log.info("got {content}", content={"a": "{b}"})
        self.assertIn("got {'a': '{b}'}", self.output.getvalue())

    def test_filteredByLevels(self):
        """
        Events below their namespace's level are not written.
        """
        self.observe([("ion", LogLevel.warn)])
        self.log.info("hidden")
        self.log.warn("shown")
        text = self.output.getvalue()
        self.assertNotIn("hidden", text)
        self.assertIn("shown", text)

    def test_linesAsTwistedWritesThem(self):
        """
        Events without secrets come out exactly as twisted's text file observer writes them:
        time, system (or namespace#level), text, tab-indented continuation lines.
        """
        try:
            raise ValueError("boom")
        except ValueError:
            failure = Failure()
        events = [
            {"log_format": "a {x} b", "x": 1, "log_level": LogLevel.info,
             "log_namespace": "ion.pump", "log_time": 1700000000.25},
            {"log_format": "same second", "log_level": LogLevel.warn,
             "log_namespace": "ion", "log_time": 1700000000.75},
            {"log_format": "failed", "log_failure": failure, "log_level": LogLevel.error,
             "log_system": "proc 1", "log_time": 1700000001.0},
            {"log_format": "no time or level"},
        ]
        ours, twisteds = io.StringIO(), io.StringIO()
        observer = RedactedTextFileObserver(ours)
        reference = textFileLogObserver(twisteds)
        for e in events:
            observer(dict(e))
            reference(dict(e))
        self.assertEqual(ours.getvalue(), twisteds.getvalue())
        self.assertIn("\n\tTraceback", ours.getvalue())
