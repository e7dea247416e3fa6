"""Starts the pump app: one rest_for_one supervisor over, in this order, the report router, the
transfer service workers, the ingest, one consumer per subscription, one sender per
destination, one poll per source, one watch per watched tree, and the progress summary.

Each process is named and serves its name (L{ion.core.process.ServiceProcess}):
C{<app>.report_router}, C{<app>.ingest}, C{<app>.consumer.<subscription>}, C{<app>.poll.<poll>},
C{<app>.progress} (app C{pump}, or C{pump.2}... for a rel's C{mult}), so
C{ion rpc pump.consumer.pump stats} asks that consumer. The transfer workers serve C{transfer}.

Receivers come first, so a process never runs without someone to take what it sends: a poll
announces to C{xs_<user>} where the ingest already listens, the ingest passes notices on to
C{xpublic} where the consumers already listen, and every consumer has the transfer service
and the report router. With rest_for_one, a restarted process restarts the processes after it.

State lives under C{var/<app name>/} (C{var/pump/}; C{var/pump.2/} for the second copy of a rel's
C{mult}) unless a process is given its own C{state_dir}: each process claims its directory, so
two pumps never share one.

kwargs (from C{res/apps/pump.app}, a rel file's C{args} or C{-a "apparg_pump={...}"}):

  - C{polls}, C{subscriptions}: lists of poll and consumer args (L{ion.apps.pump.args}), each
    with a unique C{name};
  - C{senders}: sender args (L{ion.apps.pump.sender}): a subscription's args but C{directory},
    plus C{destination}, C{events}, C{post_exchange}; names unique among subscriptions and
    senders;
  - C{watches}: watch args (L{ion.apps.pump.watch}); names unique among polls and watches;
  - C{transfer}: {workers: N transfer service instances (default 2; the polls list through them),
    and the settings of L{ion.apps.pump.transfer.worker}}. Consumers fetch files themselves with
    the same timeouts, per_host and credentials (a subscription's own C{transfer} wins) and their
    own C{parallel}; C{max_size}, C{min_rate} and C{dead_time} given here are the subscriptions'
    defaults too (C{dead_time} the senders' too); C{byte_rate_max} here limits each transfer
    service instance only (a subscription or sender sets its own);
  - C{ingest}, C{report_router}, C{progress}: the args of those processes;
  - C{user}: the pump's broker user, naming its queues (C{q_<user>....}) and the exchange the
    polls announce to (C{xs_<user>}); default: see L{ion.apps.pump.user}.

The kwargs are L{ion.apps.pump.args.PumpArgs}; anything else is an error naming the valid ones.
"""

import os

from ion.apps.pump.args import (
    ConsumerArgs,
    IngestArgs,
    PollArgs,
    ProgressArgs,
    PumpArgs,
    ReportRouterArgs,
    SenderArgs,
    WatchArgs,
)
from ion.core.process import Supervisor

# Transfer settings that are consumer args of their own (a subscription may set its own).
_BOUNDS = ("max_size", "min_rate", "dead_time")
# The transfer services' own: a subscription or sender sets its own limit (a copy of the
# services' would multiply it).
_SERVICE_ONLY = ("parallel", "byte_rate_max")


def _child(app_name, child_id, module, args, named=True, **more):
    """A supervisor child running C{ion.apps.pump.<module>}, serving C{<app>.<child_id>} if
    C{named}."""
    child = {"id": child_id, "spec": f"ion.apps.pump.{module}", "args": args, **more}
    if named:
        child["name"] = f"{app_name}.{child_id}"
    return child


def _names(children):
    """The flow names of C{children} (an OS instance's are in the args it passes on)."""
    return {(child["args"].get("args") or child["args"])["name"] for child in children.values()}


def _named_children(app_name, entries, kind, check, prepare, plural, taken=(), clash=None,
                    os_instances=False):
    """The children for C{entries} (args of one kind, each given to C{prepare}), checked with
    C{check}; ValueError on a bad entry or a name used twice (here or in C{taken}). An entry
    with C{instances} N > 1 gives N children (L{_instances})."""
    children = {}
    for args in map(dict, entries):
        prepare(args)
        checked = check.parse(args)
        child_id = f"{kind}.{checked.name}"
        if child_id in children or checked.name in taken:
            clash = clash or f"two {plural} are named"
            raise ValueError(f"{app_name}: {clash} {checked.name!r}")
        # Messages in hand get the process's stop_grace (checked by now) to finish.
        shutdown = int(args.get("stop_grace", 10) * 1000) + 5000
        # Checked by now (a sender's, among the consumer arguments it takes).
        instances = args.get("instances", 1)
        if instances > 1:
            children.update(_instances(app_name, child_id, kind, args, instances, shutdown,
                                       os_instances))
        else:
            children[child_id] = _child(app_name, child_id, kind, args, shutdown=shutdown)
    return children


def _instances(app_name, child_id, kind, args, n, shutdown, os_instances):
    """The N children of a flow with C{instances} N: C{<child id>.<i>}, serving
    C{<app>.<child id>.<i>}, each with its own state directory C{<state_dir>.<i>} and the
    flow's C{state_dir} as their C{shared_dir} (the shared duplicate cache, a poll's shared
    seen-set). On a broker that other OS processes can reach, each runs in an OS process of
    its own (L{ion.core.process.instances.OSInstance}); on the embedded broker, in this
    container."""
    children = {}
    state_dir = args["state_dir"]
    for i in range(1, n + 1):
        own = dict(args, state_dir=f"{state_dir}.{i}")
        own.setdefault("shared_dir", state_dir)
        instance_id = f"{child_id}.{i}"
        if not os_instances:
            children[instance_id] = _child(app_name, instance_id, kind, own, shutdown=shutdown)
            continue
        name = f"{app_name}.{instance_id}"
        children[instance_id] = {
            "id": instance_id,
            "spec": "ion.core.process.instances:OSInstance",
            "name": name,
            "args": {"spec": f"ion.apps.pump.{kind}", "name": name, "args": own,
                     "shutdown": shutdown / 1000},
            # The instance's own shutdown comes first; then the supervisor abandons it.
            "shutdown": shutdown + 5000,
        }
    return children


def plan(app_name="pump", os_instances=False, **kwargs):
    """The supervisor args for these kwargs, checked; ValueError naming the problem. With
    C{os_instances}, the instances of a flow run in OS processes of their own."""
    pump = PumpArgs.parse(kwargs, who=app_name)
    transfer = pump.transfer_settings
    fetching = {k: v for k, v in transfer.items() if k not in (*_SERVICE_ONLY, *_BOUNDS)}
    # Every copy of the app (a rel's mult) keeps its state in a directory of its own.
    state_root = os.path.join("var", app_name)

    def prepare(args, prefix=""):
        if pump.user is not None:
            args.setdefault("user", pump.user)
        if isinstance(args.get("name"), str):
            args.setdefault("state_dir", os.path.join(state_root, prefix + args["name"]))

    def prepare_fetching(args, prefix="", bounds=_BOUNDS):
        """A subscription's or sender's args: the transfer settings and C{bounds} given
        here are its defaults."""
        prepare(args, prefix)
        if fetching:
            args["transfer"] = dict(fetching, **(args.get("transfer") or {}))
        for key in bounds:
            if key in transfer:
                args.setdefault(key, transfer[key])

    router_args = dict(pump.report_router)
    router_args.setdefault("state_dir", os.path.join(state_root, "report_router"))
    ingest_args = dict(pump.ingest)
    for args in (router_args, ingest_args):
        if pump.user is not None:
            args.setdefault("user", pump.user)
    router = ReportRouterArgs.parse(router_args)
    IngestArgs.parse(ingest_args)

    def prepare_subscription(args):
        prepare_fetching(args)
        # Reporting to this router's exchange on this broker as its user, a subscription
        # publishes its reports to xr_<source> itself (ion.apps.pump.consumer, "Reports").
        if (
            not args.get("broker")
            and args.get("report_exchange", "xreport") == router.exchange
            and args.get("user") == router.user
        ):
            args.setdefault("report_direct", True)

    consumers = _named_children(
        app_name, pump.subscriptions, "consumer", ConsumerArgs, prepare_subscription,
        "subscriptions", os_instances=os_instances,
    )
    senders = _named_children(
        app_name, pump.senders, "sender", SenderArgs,
        lambda args: prepare_fetching(args, "sender-", ("dead_time",)), "senders",
        taken=_names(consumers), clash="a subscription or sender is named",
        os_instances=os_instances,
    )
    polls = _named_children(
        app_name, pump.polls, "poll", PollArgs, lambda args: prepare(args, "poll-"), "polls",
        os_instances=os_instances,
    )
    watches = _named_children(
        app_name, pump.watches, "watch", WatchArgs, lambda args: prepare(args, "watch-"),
        "watches", taken=_names(polls), clash="a poll or another watch is named",
        os_instances=os_instances,
    )
    progress_args = dict(pump.progress)
    progress_args.setdefault("consumers", [*consumers, *senders])
    progress_args.setdefault("polls", list(polls))
    progress_args.setdefault("name", app_name)
    ProgressArgs.parse(progress_args)
    workers = [
        _child(app_name, f"transfer{i}", "transfer_service", dict(transfer), named=False)
        for i in range(1, pump.workers + 1)
    ]
    children = [
        _child(app_name, "report_router", "report_router", router_args),
        *workers,
        _child(app_name, "ingest", "ingest", ingest_args),
        *consumers.values(),
        *senders.values(),
        *polls.values(),
        *watches.values(),
        _child(app_name, "progress", "progress", progress_args),
    ]
    return {"children": children, "strategy": "rest_for_one"}


async def start(container, app, **kwargs):
    args = plan(app.name, os_instances=not container.embedded_broker, **kwargs)
    return await container.spawn(Supervisor, name=f"{app.name}-sup", args=args)
