"""The pump's arguments: every default, and one clear line for every bad value."""

from twisted.trial import unittest

from ion.apps.pump.args import (
    MAX_SIZE,
    BadArgument,
    ConsumerArgs,
    IngestArgs,
    PollArgs,
    ProgressArgs,
    PumpArgs,
    ReportRouterArgs,
    TransferServiceArgs,
    TransferSettings,
)
from ion.apps.pump.transfer.limits import MinRate, Timeouts

CONSUMER = {"name": "c", "directory": "/d"}
POLL = {"name": "p", "url": "file:///src/"}


class ArgumentsCase(unittest.SynchronousTestCase):
    def assertRefused(self, parse, args, message, **context):
        """`parse(args)` raises BadArgument (a ValueError) with exactly `message`."""
        e = self.assertRaises(BadArgument, parse, args, **context)
        self.assertIsInstance(e, ValueError)
        self.assertEqual(str(e), message)
        self.assertNotIn("\n", str(e))


class ConsumerArgsTests(ArgumentsCase):
    def test_defaults(self):
        """A subscription needs a name and a directory; the rest is documented defaults."""
        args = ConsumerArgs.parse(CONSUMER)
        self.assertEqual(
            (args.exchange, args.topics, args.mode, args.parallel, args.prefetch),
            ("xpublic", ["v03.#"], "mirror", 8, 100),
        )
        self.assertEqual(
            (args.retry_initial, args.retry_max, args.retry_horizon, args.retry_jitter),
            (2, 300, 3600, 0.2),
        )
        self.assertEqual(
            (args.dup_ttl, args.transfer_timeout, args.stop_grace, args.report_exchange),
            (3600, 600, 10, "xreport"),
        )
        self.assertEqual((args.max_size, args.min_rate), (MAX_SIZE, MinRate(1024, 60)))
        self.assertEqual((args.sources, args.reannounce, args.user), (None, None, None))
        self.assertFalse(args.discard)
        self.assertTrue(args.filter.accepts("http://h/anything"))
        self.assertEqual(args.who, "consumer c")
        self.assertEqual(args["parallel"], args.parallel)

    def test_transfer_settings(self):
        """The consumer's transfers get its transfer dict plus its own parallel, max_size
        and min_rate."""
        args = ConsumerArgs.parse(
            dict(CONSUMER, parallel=3, max_size=None, min_rate=0, transfer={"per_host": 1})
        )
        self.assertEqual(
            args.transfer,
            TransferSettings(parallel=3, max_size=None, min_rate=None, per_host=1),
        )

    def test_bad_values(self):
        """Each bad value: one line naming the consumer, the key and the value."""
        table = [
            (
                {"name": "a b"},
                "consumer name must be letters, digits, '_' and '-' (dots "
                "between words), got 'a b'",
            ),
            (
                {"directory": "/d"},
                "consumer name must be letters, digits, '_' and '-' (dots "
                "between words), got None",
            ),
            # The name is checked first: every other message carries it.
            (
                {"name": 5, "min_rate": "x"},
                "consumer name must be letters, digits, '_' and '-' (dots between words), got 5",
            ),
            (
                dict(CONSUMER, colour=1),
                "consumer 'c': unknown argument 'colour'; valid ones "
                "are " + ", ".join(ConsumerArgs.names()),
            ),
            (
                {"name": "c"},
                "consumer c: directory (where files go) is required unless discard is set",
            ),
            (dict(CONSUMER, directory=3), "consumer c: directory must be a path, got 3"),
            (
                dict(CONSUMER, exchange="a b"),
                "consumer c: exchange must be an exchange name, got 'a b'",
            ),
            (
                dict(CONSUMER, report_exchange=""),
                "consumer c: report_exchange must be an exchange name, got ''",
            ),
            (
                dict(CONSUMER, topics="v03.#"),
                "consumer c: topics must be a non-empty list of patterns, got 'v03.#'",
            ),
            (
                dict(CONSUMER, topics=[]),
                "consumer c: topics must be a non-empty list of patterns, got []",
            ),
            (dict(CONSUMER, strip=-1), "consumer c: strip must be an int >= 0, got -1"),
            (dict(CONSUMER, parallel=0), "consumer c: parallel must be an int >= 1, got 0"),
            (
                dict(CONSUMER, prefetch=True),
                "consumer c: prefetch must be an int >= 1, got True",
            ),
            (dict(CONSUMER, user="a/b"), "consumer c: user must be a user name, got 'a/b'"),
            (dict(CONSUMER, state_dir=1), "consumer c: state_dir must be a path, got 1"),
            (
                dict(CONSUMER, retry_initial=0),
                "consumer c: retry_initial must be seconds > 0, got 0",
            ),
            (
                dict(CONSUMER, retry_jitter=1),
                "consumer c: retry_jitter must be a fraction in [0, 1), got 1",
            ),
            (dict(CONSUMER, dup_ttl="1h"), "consumer c: dup_ttl must be seconds > 0, got '1h'"),
            (
                dict(CONSUMER, transfer_timeout=-5),
                "consumer c: transfer_timeout must be seconds > 0, got -5",
            ),
            (
                dict(CONSUMER, stop_grace=-1),
                "consumer c: stop_grace must be seconds >= 0, got -1",
            ),
            (
                dict(CONSUMER, max_notice_bytes=0),
                "consumer c: max_notice_bytes must be an int >= 1, got 0",
            ),
            (
                dict(CONSUMER, max_size="1G"),
                "consumer c: max_size must be an int >= 1, got '1G'",
            ),
            (
                dict(CONSUMER, min_rate={"bytes": 1}),
                "consumer c: min_rate must be "
                "{'bytes_per_s': n, 'window': seconds} (numbers > 0), a number of bytes per "
                "second, or 0 for none, got {'bytes': 1}",
            ),
            (
                dict(CONSUMER, reannounce={"exchange": "x"}),
                "consumer c: reannounce must be "
                "{'exchange': ..., 'base_url': ...}, got {'exchange': 'x'}",
            ),
            (
                dict(CONSUMER, transfer=[]),
                "consumer c: transfer must be a dict of transfer settings, got []",
            ),
            (
                dict(CONSUMER, transfer={"parallel": 2}),
                "consumer c: parallel is a consumer argument, not a transfer setting",
            ),
            (
                dict(CONSUMER, transfer={"per_host": 0}),
                "consumer c: per_host must be an int >= 1, got 0",
            ),
            (
                dict(CONSUMER, transfer={"speed": 1}),
                "consumer c: unknown transfer setting "
                "'speed'; valid ones are credentials, max_size, min_rate, parallel, per_host, "
                "timeouts, byte_rate_max, host_byte_rate_max, dead_time",
            ),
        ]
        for args, message in table:
            self.assertRefused(ConsumerArgs.parse, args, message)

    def test_filter_and_sources_errors_name_the_consumer(self):
        """Bad filter rules and sources are refused naming the consumer."""
        for args, start in [
            (dict(CONSUMER, accept="x"), "consumer c: accept must be a list of regexes"),
            (dict(CONSUMER, filters=[("accept", "(")]), "consumer c: rule 0 (accept '(')"),
            (dict(CONSUMER, sources="http://h/"), "consumer c: sources must be a list"),
        ]:
            e = self.assertRaises(ValueError, ConsumerArgs.parse, args)
            self.assertTrue(str(e).startswith(start), str(e))

    def test_frozen(self):
        """Checked arguments cannot be changed behind their checks."""
        args = ConsumerArgs.parse(CONSUMER)
        self.assertRaises(AttributeError, setattr, args, "parallel", 0)


class OnCompleteTests(ArgumentsCase):
    """A consumer's on_complete argument (ion.apps.pump.completion runs it)."""

    def test_parse(self):
        """A command is a list of strings; timeout and all_files have defaults; no
        on_complete is None."""
        parsed = ConsumerArgs.parse(dict(CONSUMER, on_complete={"command": ["/bin/true", "-x"]}))
        on_complete = parsed.on_complete
        self.assertEqual(
            (on_complete.command, on_complete.complete_exchange, on_complete.timeout),
            (["/bin/true", "-x"], None, 60),
        )
        self.assertFalse(on_complete.all_files)
        self.assertIsNone(ConsumerArgs.parse(CONSUMER).on_complete)

    def test_refused(self):
        """A shell string, an empty or non-string command, a bad exchange, timeout or key is
        one line naming the process, the key and the value."""
        who = "consumer c: on_complete: "
        command = "command must be a list of strings (the program, then its arguments; no shell)"
        for value, message in [
            ({"command": "rm -rf /tmp/x"}, f"{command}, got 'rm -rf /tmp/x'"),
            ({"command": []}, f"{command}, got []"),
            ({"command": ["ok", 3]}, f"{command}, got ['ok', 3]"),
            ({"command": [""]}, f"{command}, got ['']"),
            ({"command": ["a\0b"]}, f"{command}, got ['a\\x00b']"),
            (
                {"complete_exchange": "no spaces"},
                "complete_exchange must be an exchange name, got 'no spaces'",
            ),
            ({"command": ["x"], "timeout": 0}, "timeout must be seconds > 0, got 0"),
            ({"command": ["x"], "all_files": "yes"}, "all_files must be True or False, got 'yes'"),
            (
                {"command": ["x"], "shell": True},
                "unknown key 'shell'; valid ones are command, complete_exchange, timeout, "
                "all_files",
            ),
            ({}, "needs a command, a complete_exchange or both"),
            ("x", "arguments must be a dict, got 'x'"),
        ]:
            self.assertRefused(ConsumerArgs.parse, dict(CONSUMER, on_complete=value), who + message)


class PollArgsTests(ArgumentsCase):
    def test_defaults(self):
        args = PollArgs.parse(POLL)
        self.assertEqual(
            (args.url, args.base_url, args.interval, args.min_age, args.recursive),
            ("file:///src/", "file:///src/", 2, 0, True),
        )
        self.assertEqual(
            (args.batch, args.list_timeout, args.stop_grace, args.exchange),
            (100, 60, 10, None),
        )
        self.assertTrue(args.filter.accepts("a/b"))
        accepts = PollArgs.parse(dict(POLL, accept=[r".*\.txt"])).filter
        self.assertFalse(accepts.accepts("a.dat"))
        everything = PollArgs.parse(dict(POLL, accept=[r".*\.txt"], accept_unmatched=True))
        self.assertTrue(everything.filter.accepts("a.dat"))

    def test_bad_values(self):
        table = [
            (
                {"url": "file:x"},
                "poll name must be letters, digits, '_' and '-' (dots between words), got None",
            ),
            ({"name": "p"}, "poll p: url (the directory to poll) is required"),
            (
                {"name": "p", "url": "gopher://h/"},
                "poll p: url 'gopher://h/' has scheme "
                "'gopher'; supported are file, http, https, sftp, ftp (a local directory is "
                "file:path/ or file:///abs/path/)",
            ),
            # The URL may hold a password: not repeated.
            (
                {"name": "p", "url": "http://u:pw@[::1/"},
                "poll p: url is malformed (unbalanced [] around the host?)",
            ),
            (dict(POLL, base_url="mirror"), "poll p: base_url must be a URL, got 'mirror'"),
            (dict(POLL, interval=0), "poll p: interval must be seconds > 0, got 0"),
            (dict(POLL, min_age=-1), "poll p: min_age must be seconds >= 0, got -1"),
            (dict(POLL, batch=2.5), "poll p: batch must be an int >= 1, got 2.5"),
            (
                dict(POLL, list_timeout=None),
                "poll p: list_timeout must be seconds > 0, got None",
            ),
            (dict(POLL, exchange="a b"), "poll p: exchange must be an exchange name, got 'a b'"),
            (dict(POLL, user=""), "poll p: user must be a user name, got ''"),
            (dict(POLL, state_dir=[]), "poll p: state_dir must be a path, got []"),
            (
                dict(POLL, colour=1),
                "poll 'p': unknown argument 'colour'; valid ones are "
                + ", ".join(PollArgs.names()),
            ),
        ]
        for args, message in table:
            self.assertRefused(PollArgs.parse, args, message)


class ProcessArgsTests(ArgumentsCase):
    def test_defaults(self):
        ingest = IngestArgs.parse({})
        self.assertEqual(
            (ingest.users, ingest.user, ingest.exchange, ingest.report_exchange, ingest.prefetch),
            (None, None, "xpublic", "xreport", 100),
        )
        router = ReportRouterArgs.parse({})
        self.assertEqual(
            (router.exchange, router.dup_ttl, router.prefetch, router.log_path),
            ("xreport", 3600, 100, None),
        )
        progress = ProgressArgs.parse({})
        self.assertEqual(
            (progress.consumers, progress.interval, progress.name, progress.timeout),
            ((), 10, "pump", 5),
        )

    def test_bad_values(self):
        table = [
            (
                IngestArgs,
                {"users": "alice"},
                "ingest: users must be a list of user names, got 'alice'",
            ),
            (
                IngestArgs,
                {"users": ["a b"]},
                "ingest: users must be a list of user names, got ['a b']",
            ),
            (IngestArgs, {"exchange": ""}, "ingest: exchange must be an exchange name, got ''"),
            (IngestArgs, {"prefetch": 0}, "ingest: prefetch must be an int >= 1, got 0"),
            (
                IngestArgs,
                {"colour": 1},
                "ingest: unknown argument 'colour'; valid ones are "
                "broker, users, user, exchange, report_exchange, prefetch, max_notice_bytes",
            ),
            (
                ReportRouterArgs,
                {"exchange": "x y"},
                "report router: exchange must be an exchange name, got 'x y'",
            ),
            (
                ReportRouterArgs,
                {"dup_ttl": 0},
                "report router: dup_ttl must be seconds > 0, got 0",
            ),
            (ReportRouterArgs, {"log_path": 1}, "report router: log_path must be a path, got 1"),
            (
                ProgressArgs,
                {"consumers": "consumer.pump"},
                "progress: consumers must be a list of child ids, got 'consumer.pump'",
            ),
            (ProgressArgs, {"interval": 0}, "progress: interval must be seconds > 0, got 0"),
            (ProgressArgs, {"name": None}, "progress: name must be a string, got None"),
        ]
        for cls, args, message in table:
            self.assertRefused(cls.parse, args, message)


class TransferSettingsTests(ArgumentsCase):
    def test_defaults(self):
        settings = TransferSettings.parse({})
        self.assertEqual(settings.timeouts, Timeouts(connect=10, idle=30))
        self.assertEqual(
            (settings.parallel, settings.per_host, settings.credentials),
            (8, 4, None),
        )
        self.assertEqual(TransferSettings.parse({"timeouts": {"idle": 5}}).timeouts.idle, 5)
        service = TransferServiceArgs.parse({}, who="transfer service 1")
        self.assertEqual((service.service, service.parallel), ("transfer", 8))

    def test_bad_values(self):
        table = [
            ([], "transfer settings must be a dict, got []"),
            ({"timeouts": 5}, "timeouts must be a dict with keys connect and idle, got 5"),
            ({"timeouts": {"connect": 0}}, "timeouts connect must be seconds > 0, got 0"),
            ({"credentials": ""}, "credentials must be a path, got ''"),
            ({"parallel": True}, "parallel must be an int >= 1, got True"),
            ({"max_size": 0}, "max_size must be an int >= 1, got 0"),
        ]
        for args, message in table:
            self.assertRefused(
                TransferSettings.parse, args, "pump: transfer: " + message, who="pump: transfer"
            )
        self.assertRefused(
            TransferServiceArgs.parse,
            {"workers": 2},
            "transfer service 1: unknown argument 'workers'; valid ones are credentials, "
            "max_size, min_rate, parallel, per_host, timeouts, byte_rate_max, host_byte_rate_max, "
            "dead_time, service",
            who="transfer service 1",
        )


class PumpArgsTests(ArgumentsCase):
    def test_defaults(self):
        """No kwargs: one subscription `pump`, two transfer workers; None stands for the
        default."""
        args = PumpArgs.parse({"polls": None, "transfer": None}, who="pump")
        self.assertEqual([s["name"] for s in args.subscriptions], ["pump"])
        self.assertEqual((args.polls, args.workers, args.transfer_settings), ((), 2, {}))
        args = PumpArgs.parse({"transfer": {"workers": 3, "per_host": 2}}, who="pump")
        self.assertEqual((args.workers, args.transfer_settings), (3, {"per_host": 2}))

    def test_bad_values(self):
        table = [
            (
                {"pols": []},
                "pump: unknown argument 'pols'; valid ones are ingest, polls, "
                "progress, report_router, senders, subscriptions, transfer, user, watches",
            ),
            ({"polls": {}}, "pump: polls must be a list, got {}"),
            ({"subscriptions": ["c"]}, "pump: each of subscriptions must be a dict, got 'c'"),
            ({"ingest": []}, "pump: ingest must be a dict, got []"),
            ({"transfer": {"workers": 0}}, "pump: transfer workers must be an int >= 1, got 0"),
            (
                {"transfer": {"speed": 1}},
                "pump: unknown transfer argument 'speed'; valid ones "
                "are workers, credentials, max_size, min_rate, parallel, per_host, timeouts, "
                "byte_rate_max, host_byte_rate_max, dead_time",
            ),
            (
                {"transfer": {"per_host": 0}},
                "pump: transfer: per_host must be an int >= 1, got 0",
            ),
            ({"user": "a b"}, "pump: user must be a user name, got 'a b'"),
        ]
        for args, message in table:
            self.assertRefused(PumpArgs.parse, args, message, who="pump")
