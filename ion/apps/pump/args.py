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
BLOCK_SIZE = _check(
    lambda v: _is_int(v) and v >= MIN_BLOCK_SIZE, f"bytes, an int >= {MIN_BLOCK_SIZE}",
    optional=True,
)
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


def _fixed_who(text):
    """The C{who} of a process kind that has no name."""
    return attrs.field(default=text, init=False, eq=False, repr=False)


def _derived(compute):
    return attrs.field(init=False, default=attrs.Factory(compute, takes_self=True))


def _max_size():
    """C{max_size}: the most bytes a get takes; None for no limit."""
    return attrs.field(default=MAX_SIZE, validator=OPTIONAL_COUNT)


def _min_rate():
    """C{min_rate}: C{{'bytes_per_s': n, 'window': s}} (either key may be left out for its
    default), a number (bytes per second over the default window), or C{0}/C{None} for none;
    a L{MinRate}, or None."""

    def convert(value, self):
        if isinstance(value, MinRate) or value is None:
            return value
        if not isinstance(value, bool) and value == 0:
            return None
        fields = value if isinstance(value, dict) else {"bytes_per_s": value}
        default = MinRate()
        rate = fields.get("bytes_per_s", default.bytes_per_s)
        window = fields.get("window", default.window)
        if set(fields) - {"bytes_per_s", "window"} or not all(
            _is_number(v) and v > 0 for v in (rate, window)
        ):
            raise BadArgument(
                f"{self.who}: min_rate must be {{'bytes_per_s': n, 'window': seconds}} (numbers "
                f"> 0), a number of bytes per second, or 0 for none, got {value!r}"
            )
        return MinRate(rate, window)

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
_EVENTS = _check(
    lambda v: isinstance(v, (list, tuple)) and set(v) <= set(WATCH_EVENTS),
    f"a list of {', '.join(WATCH_EVENTS)}",
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


# A consumer's C{retention}: None, or C{{'after_days': N, 'archive': dir or None}}
# (L{ion.apps.pump.retention}).
_RETENTION = _check(
    lambda v: isinstance(v, dict)
    and set(v) == {"after_days", "archive"}
    and _is_number(v["after_days"])
    and v["after_days"] > 0
    and (v["archive"] is None or (isinstance(v["archive"], str) and v["archive"] != "")),
    "{'after_days': days > 0, 'archive': a directory or None to remove}",
    optional=True,
)


def _check_directory(instance, attribute, value):
    if value is None and not instance.discard:
        raise BadArgument(
            f"{instance.who}: directory (where files go) is required unless discard is set"
        )
    if value is not None and (not isinstance(value, str) or not value):
        raise BadArgument(f"{instance.who}: directory must be a path, got {value!r}")


_REANNOUNCE = _check(
    lambda v: isinstance(v, dict)
    and set(v) == {"exchange", "base_url"}
    and all(isinstance(x, str) and x for x in v.values()),
    "{'exchange': ..., 'base_url': ...}",
    optional=True,
)


def _check_broker(instance, attribute, value):
    # Never quoted: the URL may hold a password.
    if value is not None and not (
        isinstance(value, str) and re.match(r"(amqps?|mqtts?)://", value, re.I | re.A)
    ):
        raise BadArgument(f"{instance.who}: broker must be an amqp[s]:// or mqtt[s]:// URL")


def _named_who(self):
    """The C{who} of a process with a name, C{<kind> <name>}, once the name is checked."""
    if not _is_name(self.name):
        raise BadArgument(
            f"{self.KIND} name must be letters, digits, '_' and '-' (dots between words), "
            f"got {self.name!r}"
        )
    return f"{self.KIND} {self.name}"


@attrs.frozen(kw_only=True)
class _Named(_Arguments):
    """A process with a C{name}: required, and checked first (every other message carries
    it in C{who})."""

    KIND = None

    name = attrs.field(default=None)
    who = attrs.field(
        init=False, default=attrs.Factory(_named_who, takes_self=True), eq=False, repr=False
    )

    @classmethod
    def _who_of(cls, args):
        name = args.get("name") if isinstance(args, dict) else None
        return f"{cls.KIND} {name!r}"


def _filter():
    """C{filter}: the L{Filter} of C{filters}, C{accept}, C{reject} and C{accept_unmatched}."""
    return _derived(
        lambda self: Filter.from_args(
            self.filters, self.accept, self.reject, self.accept_unmatched, self.who
        )
    )


@attrs.frozen(kw_only=True)
class _Flow(_Named):
    """What subscriptions, polls and watches share: a broker of their own, accept/reject
    rules (each kind adds its C{accept_unmatched} and C{filter}), the user, the state
    directory, the stop grace and the instances."""

    broker = attrs.field(default=None, validator=_check_broker)
    filters = attrs.field(default=None)
    accept = attrs.field(default=None)
    reject = attrs.field(default=None)
    user = attrs.field(default=None, validator=OPTIONAL_USER)
    state_dir = attrs.field(default=None, validator=OPTIONAL_PATH)
    stop_grace = attrs.field(default=10, validator=SECONDS_OR_ZERO)
    instances = attrs.field(default=1, validator=COUNT)
    shared_dir = attrs.field(default=None, validator=OPTIONAL_PATH)


def _check_sources(instance, attribute, value):
    UrlPolicy(value, who=instance.who)


def _is_command(value):
    # Strings without a NUL, the first (the program) not empty.
    return (
        isinstance(value, (list, tuple))
        and len(value) > 0
        and all(isinstance(a, str) and "\0" not in a for a in value)
        and value[0] != ""
    )


@attrs.frozen(kw_only=True)
class OnComplete(_Arguments):
    """A consumer's C{on_complete}, what it does once a file is complete in place
    (L{ion.apps.pump.completion}): a C{command}, a C{complete_exchange} or both."""

    UNKNOWN = "key"

    who = attrs.field(default="on_complete", eq=False, repr=False)
    command = attrs.field(
        default=None,
        validator=_check(
            _is_command,
            "a list of strings (the program, then its arguments; no shell)",
            optional=True,
        ),
    )
    complete_exchange = attrs.field(default=None, validator=OPTIONAL_EXCHANGE)
    timeout = attrs.field(default=60, validator=SECONDS)
    all_files = attrs.field(
        default=False, validator=_check(lambda v: isinstance(v, bool), "True or False")
    )

    def __attrs_post_init__(self):
        if self.command is None and self.complete_exchange is None:
            raise BadArgument(f"{self.who}: needs a command, a complete_exchange or both")

    def applies(self, result):
        """Whether the trigger runs for a delivered file's L{TransferResult}."""
        return self.all_files or result.blocks > 0


def _on_complete(value, self):
    return None if value is None else OnComplete.parse(value, who=f"{self.who}: on_complete")


@attrs.frozen(kw_only=True)
class ConsumerArgs(_Flow):
    """A subscription (L{ion.apps.pump.consumer}); C{name} is required, C{directory} too
    unless C{discard} is set."""

    KIND = "consumer"

    queue = attrs.field(default=None, validator=_check(_is_name, "a queue name", optional=True))
    exchange = attrs.field(default="xpublic", validator=EXCHANGE)
    topics = attrs.field(
        default=attrs.Factory(lambda: ["v03.#"]),
        validator=_check(_pattern_list, "a non-empty list of patterns"),
    )
    accept_unmatched = attrs.field(default=True, converter=bool)
    filter = _filter()
    directory = attrs.field(default=None, validator=_check_directory)
    mirror = attrs.field(default=True, converter=bool)
    strip = attrs.field(
        default=None, validator=_check(lambda v: _is_int(v) and v >= 0, "an int >= 0", True)
    )
    mode = _derived(_consumer_mode)
    events = attrs.field(default=WATCH_EVENTS, validator=_EVENTS)
    parallel = attrs.field(default=8, validator=COUNT)
    prefetch = attrs.field(default=100, validator=COUNT)
    queue_type = attrs.field(
        default=None,
        validator=_check(
            lambda v: v in ("auto", "classic", "quorum"), "'auto', 'classic' or 'quorum'", True
        ),
    )
    delivery_limit = attrs.field(default=None, validator=OPTIONAL_COUNT)
    discard = attrs.field(default=False, converter=bool)
    reannounce = attrs.field(default=None, validator=_REANNOUNCE)
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
    retention = attrs.field(default=None, validator=_RETENTION)
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
    # Set by the pump app when its report router reads report_exchange: a first delivery's
    # report goes straight to xr_<source> (ion.apps.pump.consumer, "Reports").
    report_direct = attrs.field(default=False, converter=bool)
    # Partitioned transfers (ion.apps.pump.transfer.blocks) and the completion trigger
    # (ion.apps.pump.completion).
    block_threshold = attrs.field(
        default=64 * 1024**2,
        validator=_check(lambda v: _is_int(v) and v >= 0, "bytes, an int >= 0 (0: off)"),
    )
    block_size = attrs.field(default=None, validator=BLOCK_SIZE)
    block_parallel = attrs.field(default=4, validator=COUNT)
    blocks = _derived(
        lambda self: BlockSettings(self.block_threshold, self.block_size, self.block_parallel)
    )
    on_complete = attrs.field(
        default=None, converter=attrs.Converter(_on_complete, takes_self=True)
    )


SENDER_SCHEMES = ("file", "sftp", "ftp", "http", "https")
# A consumer's arguments that a sender does not take (its C{events} are its own); it takes
# the others as they are (block_threshold, block_size and block_parallel too: its puts).
_NOT_FOR_SENDERS = (
    "directory", "discard", "reannounce", "retention", "events", "on_complete",
)
_SENDER_SHARED = [name for name in ConsumerArgs.names() if name not in _NOT_FOR_SENDERS]


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
    """A sender (L{ion.apps.pump.sender}): a consumer's arguments (but those of
    C{_NOT_FOR_SENDERS}) plus C{destination} (required), C{events} and C{post_exchange}."""

    KIND = "sender"

    destination = attrs.field(
        default=None, converter=attrs.Converter(_sender_destination, takes_self=True)
    )
    events = attrs.field(default=WATCH_EVENTS, validator=_EVENTS)
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


def _base_url(value, self):
    """A poll's or watch's C{base_url}, made a directory URL (None stays None)."""
    if value is not None and (not isinstance(value, str) or ":" not in value):
        raise BadArgument(f"{self.who}: base_url must be a URL, got {value!r}")
    return value and root_url(value)


@attrs.frozen(kw_only=True)
class _Announcer(_Flow):
    """What polls and watches share: the exchange they announce to, C{min_age},
    C{single_active}, and rules that, with C{accept} rules and no C{accept_unmatched}, leave
    out the files no rule matches."""

    exchange = attrs.field(default=None, validator=OPTIONAL_EXCHANGE)
    accept_unmatched = attrs.field(default=None)
    filter = _filter()
    min_age = attrs.field(default=0, validator=SECONDS_OR_ZERO)
    single_active = attrs.field(default=False, converter=bool)
    # A file bigger than this is announced in blocks, as sr3's blocksize (None: whole files).
    block_size = attrs.field(default=None, validator=BLOCK_SIZE)


@attrs.frozen(kw_only=True)
class PollArgs(_Announcer):
    """A poll (L{ion.apps.pump.poll}); C{name} and C{url} are required."""

    KIND = "poll"

    url = attrs.field(default=None, converter=attrs.Converter(_poll_url, takes_self=True))
    interval = attrs.field(default=2, validator=SECONDS)
    recursive = attrs.field(default=True, converter=bool)
    base_url = attrs.field(  # None: the polled url
        default=None,
        converter=attrs.Converter(lambda v, s: _base_url(v, s) or s.url, takes_self=True),
    )
    batch = attrs.field(default=100, validator=COUNT)
    list_timeout = attrs.field(default=60, validator=SECONDS)
    # Only the pump's own default source is created: a mistyped path is an error, not a new
    # and silently empty source.
    create = attrs.field(default=False, converter=bool)
    announce_removals = attrs.field(default=False, converter=bool)
    # What its listings may read from the server, bytes/s (ion.apps.pump.poll).
    byte_rate_max = attrs.field(default=None, validator=OPTIONAL_RATE)


@attrs.frozen(kw_only=True)
class WatchArgs(_Announcer):
    """A watch (L{ion.apps.pump.watch}); C{name} and C{path} are required."""

    KIND = "watch"

    path = attrs.field(default=None, validator=_check(lambda v: isinstance(v, str) and v, "a path"))
    events = attrs.field(default=WATCH_EVENTS, validator=_EVENTS)
    base_url = attrs.field(
        default=None, converter=attrs.Converter(_base_url, takes_self=True)
    )
    coalesce = attrs.field(default=1, validator=SECONDS_OR_ZERO)
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
