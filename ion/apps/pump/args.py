"""The arguments of the pump and its processes: one attrs class per kind, each argument
defined once with its default and its check.

C{<Kind>Args.parse(args)} takes the dict a process is given (from C{res/apps/pump.app}, a rel
file or the command line) and returns the checked arguments as typed attributes
(C{args.max_size}); C{args["max_size"]} reads the same. Anything wrong is a L{BadArgument}, a
ValueError, whose message is one line naming the process, the argument and the bad value
(C{consumer pump: parallel must be an int >= 1, got 0}): at boot that is exit status 2, not
a traceback. A key that is not an argument is refused the same way, listing the valid ones.

The message prefix is C{who}: C{<kind> <name>} for the processes that have a name (consumer,
poll; the name is checked first, since every other message carries it), the kind for the
others, the caller's for transfer settings (C{consumer pump}, C{pump: transfer}).

Arguments derived from others are attributes too: a consumer's and a poll's C{filter}
(L{ion.apps.pump.filters.Filter}), a consumer's destination C{mode} and its C{transfer}
settings (a L{TransferSettings} holding its own C{parallel}, C{max_size} and C{min_rate}), a
poll's C{url} and C{base_url} made directory URLs.
"""

import os
import re
from urllib.parse import quote, urlsplit

import attrs

from ion.apps.pump.completion import OnComplete
from ion.apps.pump.filters import Filter
from ion.apps.pump.notice import MAX_NOTICE_BYTES
from ion.apps.pump.transfer.blocks import MIN_BLOCK_SIZE, BlockSettings
from ion.apps.pump.transfer.limits import MinRate, Timeouts
from ion.apps.pump.transfer.policy import UrlPolicy

# Names of subscriptions, polls, exchanges and users: dot-separated words of letters, digits,
# '_' and '-', safe in queue names, routing keys and file names.
NAME = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*", re.ASCII)
MAX_SIZE = 10 * 1024**3
POLL_SCHEMES = ("file", "http", "https", "sftp", "ftp")
# The lowest bandwidth limit: slower, one chunk's wait would outlast the idle timeouts.
MIN_BYTE_RATE = 1024


class BadArgument(ValueError):
    """An argument that fails its check; the message names the process, the key and the
    value."""


def _is_number(value):
    return not isinstance(value, bool) and isinstance(value, (int, float))


def _is_int(value):
    return not isinstance(value, bool) and isinstance(value, int)


def _is_name(value):
    return isinstance(value, str) and NAME.fullmatch(value) is not None


def _check(test, what, optional=False):
    """An attrs validator: BadArgument C{<who>: <key> must be <what>, got <value>} unless
    C{test(value)} (or the value is None, when C{optional})."""

    def check(instance, attribute, value):
        if not (optional and value is None) and not test(value):
            raise BadArgument(f"{instance.who}: {attribute.name} must be {what}, got {value!r}")

    return check


SECONDS = _check(lambda v: _is_number(v) and v > 0, "seconds > 0")
SECONDS_OR_ZERO = _check(lambda v: _is_number(v) and v >= 0, "seconds >= 0")
COUNT = _check(lambda v: _is_int(v) and v >= 1, "an int >= 1")
OPTIONAL_COUNT = _check(lambda v: _is_int(v) and v >= 1, "an int >= 1", optional=True)
EXCHANGE = _check(_is_name, "an exchange name")
OPTIONAL_EXCHANGE = _check(_is_name, "an exchange name", optional=True)
OPTIONAL_USER = _check(_is_name, "a user name", optional=True)
OPTIONAL_PATH = _check(lambda v: isinstance(v, str) and v != "", "a path", optional=True)
OPTIONAL_RATE = _check(
    lambda v: _is_number(v) and v >= MIN_BYTE_RATE,
    f"bytes per second >= {MIN_BYTE_RATE} (or None for no limit)",
    optional=True,
)


def _pattern_list(value):
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(isinstance(item, str) and item for item in value)
    )


def _named(kind):
    """The C{who} of a process with a name, C{<kind> <name>}, once the name is checked."""

    def who(self):
        if not _is_name(self.name):
            raise BadArgument(
                f"{kind} name must be letters, digits, '_' and '-' (dots between words), "
                f"got {self.name!r}"
            )
        return f"{kind} {self.name}"

    return attrs.Factory(who, takes_self=True)


def _fixed_who(text):
    """The C{who} of a process kind that has no name."""
    return attrs.field(default=text, init=False, eq=False, repr=False)


def _derived(compute):
    return attrs.field(init=False, default=attrs.Factory(compute, takes_self=True))


def _max_size():
    """C{max_size}: the most bytes a get takes; None for no limit."""
    return attrs.field(default=MAX_SIZE, validator=OPTIONAL_COUNT)


def _min_rate():
    """C{min_rate}: see L{MinRate.parse} for its forms; a MinRate, or None for none."""

    def convert(value, self):
        if isinstance(value, MinRate):
            return value
        try:
            return MinRate.parse(value, self.who)
        except ValueError as e:
            raise BadArgument(str(e)) from None

    return attrs.field(
        default=attrs.Factory(MinRate), converter=attrs.Converter(convert, takes_self=True)
    )


class _Arguments:
    """What every argument class shares: L{parse} and the C{args[key]} view."""

    __slots__ = ()
    # Says what the keys are in the message refusing an unknown one.
    UNKNOWN = "argument"

    @classmethod
    def names(cls):
        """The names of the arguments, in the order they are documented."""
        return [a.alias for a in attrs.fields(cls) if a.init and a.name != "who"]

    @classmethod
    def parse(cls, args, who=None):
        """The checked arguments of the dict C{args} (C{who}: for the classes that are told
        it); BadArgument naming the bad one otherwise."""
        shown = who or cls._who_of(args)
        if not isinstance(args, dict):
            raise BadArgument(f"{shown}: arguments must be a dict, got {args!r}")
        names = cls.names()
        unknown = [key for key in args if key not in names]
        if unknown:
            raise BadArgument(
                f"{shown}: unknown {cls.UNKNOWN} {unknown[0]!r}; valid ones are {', '.join(names)}"
            )
        return cls(**args) if who is None else cls(who=who, **args)

    @classmethod
    def _who_of(cls, args):
        return attrs.fields(cls).who.default

    def __getitem__(self, key):
        return getattr(self, key)


class _Named(_Arguments):
    __slots__ = ()
    KIND = None

    @classmethod
    def _who_of(cls, args):
        name = args.get("name") if isinstance(args, dict) else None
        return f"{cls.KIND} {name!r}"


def _timeouts(value, self):
    if value is None:
        value = {}
    if isinstance(value, Timeouts):
        return value
    if not isinstance(value, dict) or set(value) - {"connect", "idle"}:
        raise BadArgument(
            f"{self.who}: timeouts must be a dict with keys connect and idle, got {value!r}"
        )
    for key in value:
        if not _is_number(value[key]) or value[key] <= 0:
            raise BadArgument(f"{self.who}: timeouts {key} must be seconds > 0, got {value[key]!r}")
    return Timeouts(**value)


@attrs.frozen(kw_only=True)
class TransferSettings(_Arguments):
    """The settings of a process's C{Transfers}; L{ion.apps.pump.transfer.worker} says what
    each one means."""

    UNKNOWN = "transfer setting"

    who = attrs.field(default="transfers", eq=False, repr=False)
    credentials = attrs.field(default=None, validator=OPTIONAL_PATH)
    max_size = _max_size()
    min_rate = _min_rate()
    parallel = attrs.field(default=8, validator=COUNT)
    per_host = attrs.field(default=4, validator=COUNT)
    timeouts = attrs.field(
        default=attrs.Factory(Timeouts), converter=attrs.Converter(_timeouts, takes_self=True)
    )
    # Bandwidth limits and kept-open sessions.
    byte_rate_max = attrs.field(default=None, validator=OPTIONAL_RATE)
    host_byte_rate_max = attrs.field(default=None, validator=OPTIONAL_RATE)
    dead_time = attrs.field(default=180, validator=SECONDS_OR_ZERO)

    def __attrs_post_init__(self):
        for key in ("byte_rate_max", "host_byte_rate_max"):
            rate = getattr(self, key)
            if rate is not None and self.min_rate is not None and rate < self.min_rate.bytes_per_s:
                raise BadArgument(
                    f"{self.who}: {key} {rate!r} is below min_rate's "
                    f"{self.min_rate.bytes_per_s:g} bytes/s: every transfer would fail as too slow"
                )

    @classmethod
    def parse(cls, args, who="transfers"):
        if isinstance(args, cls):
            return args
        if not isinstance(args, dict):
            raise BadArgument(f"{who}: transfer settings must be a dict, got {args!r}")
        return super().parse(args, who=who)


@attrs.frozen(kw_only=True)
class TransferServiceArgs(TransferSettings):
    """A transfer service instance (L{ion.apps.pump.transfer_service}): its transfer settings
    and C{service}, the name it serves under (C{transfer})."""

    UNKNOWN = "argument"

    service = attrs.field(default="transfer", validator=_check(_is_name, "a service name"))


WATCH_EVENTS = ("create", "modify", "delete", "rename", "link", "mkdir", "rmdir")


def _check_events(instance, attribute, value):
    if not isinstance(value, (list, tuple)) or not set(value) <= set(WATCH_EVENTS):
        raise BadArgument(
            f"{instance.who}: events must be a list of {', '.join(WATCH_EVENTS)}, got {value!r}"
        )


def _consumer_mode(self):
    if self.strip is not None:
        return f"strip={self.strip}"
    return "mirror" if self.mirror else "directory"


def _consumer_transfer(value, self):
    """A consumer's transfer settings: its C{transfer} dict with its own C{parallel},
    C{max_size} and C{min_rate}."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise BadArgument(
            f"{self.who}: transfer must be a dict of transfer settings, got {value!r}"
        )
    own = {"parallel": self.parallel, "max_size": self.max_size, "min_rate": self.min_rate,
           "byte_rate_max": self.byte_rate_max, "dead_time": self.dead_time}
    for key in own:
        if key in value:
            raise BadArgument(f"{self.who}: {key} is a consumer argument, not a transfer setting")
    return TransferSettings.parse(dict(value, **own), self.who)


def _retention(value, self):
    """A consumer's C{retention}: None, or C{{'after_days': N, 'archive': dir or None}}
    (L{ion.apps.pump.retention})."""
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or set(value) != {"after_days", "archive"}
        or not (_is_number(value["after_days"]) and value["after_days"] > 0)
        or not (
            value["archive"] is None
            or (isinstance(value["archive"], str) and value["archive"])
        )
    ):
        raise BadArgument(
            f"{self.who}: retention must be {{'after_days': days > 0, 'archive': a directory "
            f"or None to remove}}, got {value!r}"
        )
    return dict(value)


def _check_directory(instance, attribute, value):
    if value is None and not instance.discard:
        raise BadArgument(
            f"{instance.who}: directory (where files go) is required unless discard is set"
        )
    if value is not None and (not isinstance(value, str) or not value):
        raise BadArgument(f"{instance.who}: directory must be a path, got {value!r}")


def _check_reannounce(instance, attribute, value):
    if value is not None and (
        not isinstance(value, dict)
        or set(value) != {"exchange", "base_url"}
        or not all(isinstance(v, str) and v for v in value.values())
    ):
        raise BadArgument(
            f"{instance.who}: reannounce must be {{'exchange': ..., 'base_url': ...}}, "
            f"got {value!r}"
        )


def _check_broker(instance, attribute, value):
    # Never quoted: the URL may hold a password.
    if value is not None and not (
        isinstance(value, str) and re.match(r"(amqps?|mqtts?)://", value, re.I | re.A)
    ):
        raise BadArgument(f"{instance.who}: broker must be an amqp[s]:// or mqtt[s]:// URL")


BROKER = attrs.field(default=None, validator=_check_broker)
QUEUE = attrs.field(default=None, validator=_check(_is_name, "a queue name", optional=True))
OPTIONAL_COUNT_FIELD = attrs.field(default=None, validator=OPTIONAL_COUNT)


def _check_sources(instance, attribute, value):
    UrlPolicy(value, who=instance.who)


def _on_complete(value, self):
    try:
        return OnComplete.parse(value, self.who, _is_name)
    except ValueError as e:
        raise BadArgument(str(e)) from None


@attrs.frozen(kw_only=True)
class ConsumerArgs(_Named):
    """A subscription (L{ion.apps.pump.consumer}); C{name} is required, C{directory} too
    unless C{discard} is set."""

    KIND = "consumer"

    name = attrs.field(default=None)
    who = attrs.field(init=False, default=_named(KIND), eq=False, repr=False)
    broker = BROKER
    queue = QUEUE
    exchange = attrs.field(default="xpublic", validator=EXCHANGE)
    topics = attrs.field(
        default=attrs.Factory(lambda: ["v03.#"]),
        validator=_check(_pattern_list, "a non-empty list of patterns"),
    )
    filters = attrs.field(default=None)
    accept = attrs.field(default=None)
    reject = attrs.field(default=None)
    accept_unmatched = attrs.field(default=True)
    filter = _derived(
        lambda self: Filter.from_args(
            self.filters, self.accept, self.reject, bool(self.accept_unmatched), self.who
        )
    )
    directory = attrs.field(default=None, validator=_check_directory)
    mirror = attrs.field(default=True, converter=bool)
    strip = attrs.field(
        default=None, validator=_check(lambda v: _is_int(v) and v >= 0, "an int >= 0", True)
    )
    mode = _derived(_consumer_mode)
    events = attrs.field(default=WATCH_EVENTS, validator=_check_events)
    parallel = attrs.field(default=8, validator=COUNT)
    prefetch = attrs.field(default=100, validator=COUNT)
    queue_type = attrs.field(
        default=None,
        validator=_check(
            lambda v: v in ("auto", "classic", "quorum"), "'auto', 'classic' or 'quorum'", True
        ),
    )
    delivery_limit = OPTIONAL_COUNT_FIELD
    user = attrs.field(default=None, validator=OPTIONAL_USER)
    state_dir = attrs.field(default=None, validator=OPTIONAL_PATH)
    discard = attrs.field(default=False, converter=bool)
    reannounce = attrs.field(default=None, validator=_check_reannounce)
    retry_initial = attrs.field(default=2, validator=SECONDS)
    retry_max = attrs.field(default=300, validator=SECONDS)
    retry_horizon = attrs.field(default=3600, validator=SECONDS)
    retry_jitter = attrs.field(
        default=0.2,
        validator=_check(lambda v: _is_number(v) and 0 <= v < 1, "a fraction in [0, 1)"),
    )
    dup_ttl = attrs.field(default=3600, validator=SECONDS)
    transfer_timeout = attrs.field(default=600, validator=SECONDS)
    max_size = _max_size()
    min_rate = _min_rate()
    # Bandwidth, kept-open sessions, retry bursts, heartbeats, retention.
    byte_rate_max = attrs.field(default=None, validator=OPTIONAL_RATE)
    dead_time = attrs.field(default=180, validator=SECONDS_OR_ZERO)
    retry_burst = attrs.field(default=5, validator=COUNT)
    retry_burst_gap = attrs.field(default=3, validator=SECONDS)
    retry_pause = attrs.field(default=30, validator=SECONDS)
    heartbeat = attrs.field(default=None, validator=_check(
        lambda v: _is_number(v) and v > 0, "seconds > 0 (or None for none)", optional=True))
    heartbeat_remote = attrs.field(default=False, converter=bool)
    retention = attrs.field(default=None, converter=attrs.Converter(_retention, takes_self=True))
    transfer = attrs.field(
        default=None, converter=attrs.Converter(_consumer_transfer, takes_self=True)
    )
    sources = attrs.field(default=None, validator=_check_sources)
    max_notice_bytes = attrs.field(default=MAX_NOTICE_BYTES, validator=COUNT)
    # None: C{xs_<login>} on a broker of the consumer's own (as sr3 subscribers report).
    report_exchange = attrs.field(
        default=attrs.Factory(lambda self: None if self.broker else "xreport", takes_self=True),
        validator=OPTIONAL_EXCHANGE,
    )
    stop_grace = attrs.field(default=10, validator=SECONDS_OR_ZERO)
    # Partitioned transfers (ion.apps.pump.transfer.blocks) and the completion trigger
    # (ion.apps.pump.completion).
    block_threshold = attrs.field(
        default=64 * 1024**2,
        validator=_check(lambda v: _is_int(v) and v >= 0, "bytes, an int >= 0 (0: off)"),
    )
    block_size = attrs.field(
        default=None,
        validator=_check(
            lambda v: _is_int(v) and v >= MIN_BLOCK_SIZE, f"bytes, an int >= {MIN_BLOCK_SIZE}",
            optional=True,
        ),
    )
    block_parallel = attrs.field(default=4, validator=COUNT)
    blocks = _derived(
        lambda self: BlockSettings(self.block_threshold, self.block_size, self.block_parallel)
    )
    on_complete = attrs.field(
        default=None, converter=attrs.Converter(_on_complete, takes_self=True)
    )
    instances = attrs.field(default=1, validator=COUNT)
    shared_dir = attrs.field(default=None, validator=OPTIONAL_PATH)


SENDER_SCHEMES = ("file", "sftp", "ftp", "http", "https")
# A consumer's arguments that a sender takes as they are.
_SENDER_SHARED = (
    "name", "broker", "queue", "exchange", "topics", "filters", "accept", "reject",
    "accept_unmatched", "mirror", "strip", "parallel", "prefetch", "queue_type", "delivery_limit",
    "user", "state_dir", "retry_initial", "retry_max",
    "retry_horizon", "retry_jitter", "dup_ttl", "transfer_timeout", "max_size", "min_rate",
    "transfer", "sources", "max_notice_bytes", "report_exchange", "stop_grace", "instances",
    "shared_dir", "byte_rate_max", "dead_time", "retry_burst", "retry_burst_gap", "retry_pause",
    "heartbeat", "heartbeat_remote",
)


def _sender_destination(value, self):
    if not isinstance(value, str) or not value:
        raise BadArgument(f"{self.who}: destination (the URL to send to) is required")
    scheme = value.split(":", 1)[0].lower() if ":" in value else ""
    if scheme not in SENDER_SCHEMES:
        raise BadArgument(
            f"{self.who}: destination {value!r} must be a URL with scheme one of "
            f"{', '.join(SENDER_SCHEMES)} (a local directory is file:dir/)"
        )
    return root_url(value)


@attrs.frozen(kw_only=True)
class SenderArgs(_Named):
    """A sender (L{ion.apps.pump.sender}): a consumer's arguments (but C{directory},
    C{discard} and C{reannounce}) plus C{destination} (required), C{events} and
    C{post_exchange}."""

    KIND = "sender"

    name = attrs.field(default=None)
    who = attrs.field(init=False, default=_named(KIND), eq=False, repr=False)
    destination = attrs.field(
        default=None, converter=attrs.Converter(_sender_destination, takes_self=True)
    )
    events = attrs.field(default=WATCH_EVENTS, validator=_check_events)
    post_exchange = attrs.field(default=None, validator=OPTIONAL_EXCHANGE)

    @classmethod
    def names(cls):
        return super().names() + list(_SENDER_SHARED[1:])

    @classmethod
    def parse(cls, args, who=None):
        """The sender's own arguments, checked here; the consumer's, by L{ConsumerArgs}."""
        if not isinstance(args, dict):
            raise BadArgument(f"{cls._who_of(args)}: arguments must be a dict, got {args!r}")
        sender = super().parse({k: v for k, v in args.items() if k not in _SENDER_SHARED[1:]})
        try:
            ConsumerArgs.parse(cls.consumer_args(args, "staging"))
        except BadArgument as e:
            raise BadArgument(str(e).replace("consumer", "sender", 1)) from None
        return sender

    @staticmethod
    def consumer_args(args, directory):
        """The consumer arguments among a sender's C{args}, its files staged in C{directory}."""
        return dict({k: v for k, v in args.items() if k in _SENDER_SHARED}, directory=directory)


def root_url(url):
    """The directory URL a poll lists: with a trailing C{/}; a relative or bare C{file:} path made
    absolute (and percent-encoded, since the transfer library decodes file URLs)."""
    if url.startswith("file:") and not url.startswith("file://"):
        local = url[len("file:") :]
        url = "file://" + quote(os.path.abspath(local), safe="/")
    return url if url.endswith("/") else url + "/"


def _poll_url(value, self):
    if not isinstance(value, str) or not value:
        raise BadArgument(f"{self.who}: url (the directory to poll) is required")
    try:
        scheme = urlsplit(value).scheme.lower()
    except ValueError:  # the URL may hold a password: not quoted
        raise BadArgument(
            f"{self.who}: url is malformed (unbalanced [] around the host?)"
        ) from None
    if scheme not in POLL_SCHEMES:
        raise BadArgument(
            f"{self.who}: url {value!r} has scheme {scheme!r}; supported are "
            f"{', '.join(POLL_SCHEMES)} (a local directory is file:path/ or file:///abs/path/)"
        )
    return root_url(value)


def _poll_base_url(value, self):
    if value is None:
        return self.url
    if not isinstance(value, str) or ":" not in value:
        raise BadArgument(f"{self.who}: base_url must be a URL, got {value!r}")
    return root_url(value)


@attrs.frozen(kw_only=True)
class PollArgs(_Named):
    """A poll (L{ion.apps.pump.poll}); C{name} and C{url} are required. With C{accept} rules
    and no C{accept_unmatched}, files no rule matches are not announced."""

    KIND = "poll"

    name = attrs.field(default=None)
    who = attrs.field(init=False, default=_named(KIND), eq=False, repr=False)
    broker = BROKER
    url = attrs.field(default=None, converter=attrs.Converter(_poll_url, takes_self=True))
    interval = attrs.field(default=2, validator=SECONDS)
    filters = attrs.field(default=None)
    accept = attrs.field(default=None)
    reject = attrs.field(default=None)
    accept_unmatched = attrs.field(default=None)
    filter = _derived(
        lambda self: Filter.from_args(
            self.filters, self.accept, self.reject, self.accept_unmatched, self.who
        )
    )
    exchange = attrs.field(default=None, validator=OPTIONAL_EXCHANGE)
    user = attrs.field(default=None, validator=OPTIONAL_USER)
    min_age = attrs.field(default=0, validator=SECONDS_OR_ZERO)
    recursive = attrs.field(default=True, converter=bool)
    state_dir = attrs.field(default=None, validator=OPTIONAL_PATH)
    base_url = attrs.field(default=None, converter=attrs.Converter(_poll_base_url, takes_self=True))
    batch = attrs.field(default=100, validator=COUNT)
    list_timeout = attrs.field(default=60, validator=SECONDS)
    stop_grace = attrs.field(default=10, validator=SECONDS_OR_ZERO)
    # Only the pump's own default source is created: a mistyped path is an error, not a new
    # and silently empty source.
    create = attrs.field(default=False, converter=bool)
    announce_removals = attrs.field(default=False, converter=bool)
    instances = attrs.field(default=1, validator=COUNT)
    shared_dir = attrs.field(default=None, validator=OPTIONAL_PATH)
    single_active = attrs.field(default=False, converter=bool)
    # What its listings may read from the server, bytes/s (ion.apps.pump.poll).
    byte_rate_max = attrs.field(default=None, validator=OPTIONAL_RATE)


def _watch_base_url(value, self):
    if value is not None and (not isinstance(value, str) or ":" not in value):
        raise BadArgument(f"{self.who}: base_url must be a URL, got {value!r}")
    return value and root_url(value)


@attrs.frozen(kw_only=True)
class WatchArgs(_Named):
    """A watch (L{ion.apps.pump.watch}); C{name} and C{path} are required."""

    KIND = "watch"

    name = attrs.field(default=None)
    who = attrs.field(init=False, default=_named(KIND), eq=False, repr=False)
    path = attrs.field(default=None, validator=_check(lambda v: isinstance(v, str) and v, "a path"))
    broker = BROKER
    exchange = attrs.field(default=None, validator=OPTIONAL_EXCHANGE)
    user = attrs.field(default=None, validator=OPTIONAL_USER)
    filters = attrs.field(default=None)
    accept = attrs.field(default=None)
    reject = attrs.field(default=None)
    accept_unmatched = attrs.field(default=None)
    filter = _derived(
        lambda self: Filter.from_args(
            self.filters, self.accept, self.reject, self.accept_unmatched, self.who
        )
    )
    events = attrs.field(default=WATCH_EVENTS, validator=_check_events)
    base_url = attrs.field(
        default=None, converter=attrs.Converter(_watch_base_url, takes_self=True)
    )
    coalesce = attrs.field(default=1, validator=SECONDS_OR_ZERO)
    min_age = attrs.field(default=0, validator=SECONDS_OR_ZERO)
    state_dir = attrs.field(default=None, validator=OPTIONAL_PATH)
    stop_grace = attrs.field(default=10, validator=SECONDS_OR_ZERO)
    instances = attrs.field(default=1, validator=COUNT)
    shared_dir = attrs.field(default=None, validator=OPTIONAL_PATH)
    single_active = attrs.field(default=False, converter=bool)
    standby_interval = attrs.field(default=10, validator=SECONDS)


def _check_ingest_broker(instance, attribute, value):
    # Never quoted: the URL may hold a password.
    if value is None:
        return
    if isinstance(value, str) and re.match(r"mqtts?://", value, re.I | re.A):
        raise BadArgument(INGEST_MQTT)
    if not (isinstance(value, str) and re.match(r"amqps?://", value, re.I | re.A)):
        raise BadArgument(f"{instance.who}: broker must be an amqp[s]:// URL")


# Why the ingest takes no MQTT broker (README.txt says the same).
INGEST_MQTT = (
    "ingest: broker must be amqp[s]://, not MQTT: the ingest stamps source from the publisher "
    "the broker vouches for (AMQP user_id), which MQTT does not carry; give a subscription the "
    "MQTT broker instead"
)


@attrs.frozen(kw_only=True)
class IngestArgs(_Arguments):
    """The ingest (L{ion.apps.pump.ingest}); C{users} None: the pump's user only. C{broker}:
    the AMQP broker of the pump it feeds, when not the container's (MQTT: L{INGEST_MQTT})."""

    who = _fixed_who("ingest")
    broker = attrs.field(default=None, validator=_check_ingest_broker)
    users = attrs.field(
        default=None,
        validator=_check(
            lambda v: isinstance(v, (list, tuple)) and all(map(_is_name, v)),
            "a list of user names",
            optional=True,
        ),
    )
    user = attrs.field(default=None, validator=OPTIONAL_USER)
    exchange = attrs.field(default="xpublic", validator=EXCHANGE)
    report_exchange = attrs.field(default="xreport", validator=EXCHANGE)
    prefetch = attrs.field(default=100, validator=COUNT)
    max_notice_bytes = attrs.field(default=MAX_NOTICE_BYTES, validator=COUNT)


@attrs.frozen(kw_only=True)
class ReportRouterArgs(_Arguments):
    """The report router (L{ion.apps.pump.report_router})."""

    who = _fixed_who("report router")
    exchange = attrs.field(default="xreport", validator=EXCHANGE)
    user = attrs.field(default=None, validator=OPTIONAL_USER)
    state_dir = attrs.field(default=None, validator=OPTIONAL_PATH)
    dup_ttl = attrs.field(default=3600, validator=SECONDS)
    log_path = attrs.field(default=None, validator=OPTIONAL_PATH)
    log_max_bytes = attrs.field(default=64 * 1024 * 1024, validator=COUNT)
    log_keep = attrs.field(default=4, validator=COUNT)
    prefetch = attrs.field(default=100, validator=COUNT)


_CHILD_IDS = _check(
    lambda v: isinstance(v, (list, tuple)) and all(isinstance(c, str) for c in v),
    "a list of child ids",
)


@attrs.frozen(kw_only=True)
class ProgressArgs(_Arguments):
    """The progress line (L{ion.apps.pump.progress}): C{consumers} and C{polls} are child ids in
    the pump's supervisor, C{name} starts the line."""

    who = _fixed_who("progress")
    consumers = attrs.field(default=(), validator=_CHILD_IDS)
    polls = attrs.field(default=(), validator=_CHILD_IDS)
    interval = attrs.field(default=10, validator=SECONDS)
    name = attrs.field(default="pump", validator=_check(lambda v: isinstance(v, str), "a string"))
    timeout = attrs.field(default=5, validator=SECONDS)


def _entries(instance, attribute, value):
    if not isinstance(value, (list, tuple)):
        raise BadArgument(f"{instance.who}: {attribute.name} must be a list, got {value!r}")
    for entry in value:
        if not isinstance(entry, dict):
            raise BadArgument(
                f"{instance.who}: each of {attribute.name} must be a dict, got {entry!r}"
            )


def _app_transfer(instance, attribute, value):
    if not isinstance(value, dict):
        raise BadArgument(f"{instance.who}: transfer must be a dict, got {value!r}")
    workers = value.get("workers", 2)
    if not _is_int(workers) or workers < 1:
        raise BadArgument(f"{instance.who}: transfer workers must be an int >= 1, got {workers!r}")
    settings = {key: v for key, v in value.items() if key != "workers"}
    unknown = [key for key in settings if key not in TransferSettings.names()]
    if unknown:
        raise BadArgument(
            f"{instance.who}: unknown transfer argument {unknown[0]!r}; valid ones are "
            f"workers, {', '.join(TransferSettings.names())}"
        )
    TransferSettings.parse(settings, f"{instance.who}: transfer")


DEFAULT_SUBSCRIPTIONS = (
    {
        "name": "pump",
        "exchange": "xpublic",
        "topics": ["v03.#"],
        "directory": "pump/destination/",
        "mirror": True,
    },
)
_DICT = _check(lambda v: isinstance(v, dict), "a dict")


def _given_or(default, validator):
    """An app kwarg whose default C{default()} also stands for a None given."""
    return attrs.field(
        default=None,
        converter=attrs.converters.default_if_none(factory=default),
        validator=validator,
    )


@attrs.frozen(kw_only=True)
class PumpArgs(_Arguments):
    """The pump app's kwargs (L{ion.apps.pump.app}); C{who} is the app's name. The entries of
    C{polls}, C{watches}, C{subscriptions}, C{senders}, C{ingest}, C{report_router} and C{progress}
    are the dicts the processes are given (and check); C{transfer} holds the transfer settings and
    L{workers}."""

    who = attrs.field(default="pump", eq=False, repr=False)
    ingest = _given_or(dict, _DICT)
    polls = _given_or(tuple, _entries)
    progress = _given_or(dict, _DICT)
    report_router = _given_or(dict, _DICT)
    senders = _given_or(tuple, _entries)
    subscriptions = _given_or(lambda: DEFAULT_SUBSCRIPTIONS, _entries)
    transfer = _given_or(dict, _app_transfer)
    user = attrs.field(default=None, validator=OPTIONAL_USER)
    watches = _given_or(tuple, _entries)

    @property
    def workers(self):
        """How many transfer service instances run."""
        return self.transfer.get("workers", 2)

    @property
    def transfer_settings(self):
        """The transfer settings (a dict) of the transfer services, and the defaults of the
        subscriptions'."""
        return {key: value for key, value in self.transfer.items() if key != "workers"}
