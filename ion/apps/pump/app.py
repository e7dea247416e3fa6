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

  - C{polls}: a list of poll args (see L{ion.apps.pump.poll}), each with a unique C{name}: C{url},
    C{interval}, C{accept}, C{reject}, C{exchange}, C{min_age}, C{recursive}, C{state_dir},
    C{base_url}...;
  - C{subscriptions}: a list of consumer args (see L{ion.apps.pump.consumer}), each with a unique
    C{name}: C{exchange}, C{topics}, C{accept}, C{reject}, C{directory}, C{mirror}, C{strip}...;
  - C{senders}: a list of sender args (see L{ion.apps.pump.sender}), each with a unique C{name}
    (among subscriptions and senders): a subscription's args but C{directory}, plus
    C{destination}, C{events} and C{post_exchange};
  - C{watches}: a list of watch args (see L{ion.apps.pump.watch}), each with a unique C{name}
    (among polls and watches): C{path}, C{exchange}, C{accept}, C{reject}, C{events},
    C{base_url}, C{coalesce}, C{min_age}, C{state_dir};
  - C{transfer}: {workers: N transfer service instances (default 2; the polls list through them),
    timeouts, per_host, credentials, parallel, max_size, min_rate}: the settings of
    L{ion.apps.pump.transfer.worker}. Consumers fetch files themselves with the same timeouts,
    per_host and credentials (a subscription's own C{transfer} wins) and their own C{parallel};
    C{max_size} and C{min_rate} given here are the subscriptions' defaults too;
  - C{ingest}: ingest args (see L{ion.apps.pump.ingest}), e.g. {users: ['alice', 'bob']} for the
    exchanges C{xs_alice}, C{xs_bob} (default: the pump's user's only);
  - C{report_router}: report router args (see L{ion.apps.pump.report_router}), e.g. C{log_path};
  - C{progress}: {interval: seconds between summary lines (default 10)};
  - C{user}: the pump's broker user: it names the queues (C{q_<user>....}) and the exchange the
    polls announce to (C{xs_<user>}); default the config C{ion.apps.pump: user}, else the
    container's broker login (C{ion} on the embedded broker); see L{ion.apps.pump.user}.

The kwargs are L{ion.apps.pump.args.PumpArgs}; anything else is an error naming the valid
kwargs.
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
_BOUNDS = ("max_size", "min_rate")


def plan(app_name="pump", **kwargs):
    """The supervisor args for these kwargs, checked; ValueError naming the problem."""
    pump = PumpArgs.parse(kwargs, who=app_name)
    user = pump.user
    transfer = pump.transfer_settings
    fetching = {k: v for k, v in transfer.items() if k not in ("parallel", *_BOUNDS)}
    # Every copy of the app (a rel's mult) keeps its state in a directory of its own.
    state_root = os.path.join("var", app_name)
    router_args = dict(pump.report_router)
    router_args.setdefault("state_dir", os.path.join(state_root, "report_router"))
    ingest_args = dict(pump.ingest)
    if user is not None:
        router_args.setdefault("user", user)
        ingest_args.setdefault("user", user)
    ReportRouterArgs.parse(router_args)
    IngestArgs.parse(ingest_args)
    progress_args = dict(pump.progress)

    children = [
        {
            "id": "report_router",
            "name": f"{app_name}.report_router",
            "spec": "ion.apps.pump.report_router",
            "args": router_args,
        }
    ]
    for i in range(1, pump.workers + 1):
        children.append(
            {"id": f"transfer{i}", "spec": "ion.apps.pump.transfer_service", "args": dict(transfer)}
        )
    children.append(
        {"id": "ingest", "name": f"{app_name}.ingest", "spec": "ion.apps.pump.ingest",
         "args": ingest_args}
    )
    names = set()
    consumer_ids = []
    for args in map(dict, pump.subscriptions):
        if user is not None:
            args.setdefault("user", user)
        if isinstance(args.get("name"), str):
            args.setdefault("state_dir", os.path.join(state_root, args["name"]))
        if fetching:
            args["transfer"] = dict(fetching, **(args.get("transfer") or {}))
        for key in _BOUNDS:
            if key in transfer:
                args.setdefault(key, transfer[key])
        checked = ConsumerArgs.parse(args)
        if checked.name in names:
            raise ValueError(f"{app_name}: two subscriptions are named {checked.name!r}")
        names.add(checked.name)
        consumer_ids.append(f"consumer.{checked.name}")
        children.append(
            {
                "id": consumer_ids[-1],
                "name": f"{app_name}.{consumer_ids[-1]}",
                "spec": "ion.apps.pump.consumer",
                "args": args,
                # Messages in hand get the consumer's stop_grace to finish.
                "shutdown": int(checked.stop_grace * 1000) + 5000,
            }
        )
    for args in map(dict, pump.senders):
        if user is not None:
            args.setdefault("user", user)
        if isinstance(args.get("name"), str):
            args.setdefault("state_dir", os.path.join(state_root, f"sender-{args['name']}"))
        if fetching:
            args["transfer"] = dict(fetching, **(args.get("transfer") or {}))
        checked = SenderArgs.parse(args)
        if checked.name in names:
            raise ValueError(f"{app_name}: a subscription or sender is named {checked.name!r}")
        names.add(checked.name)
        consumer_ids.append(f"sender.{checked.name}")
        children.append(
            {
                "id": consumer_ids[-1],
                "name": f"{app_name}.{consumer_ids[-1]}",
                "spec": "ion.apps.pump.sender",
                "args": args,
                "shutdown": int(args.get("stop_grace", 10) * 1000) + 5000,
            }
        )
    names = set()
    poll_ids = []
    for args in map(dict, pump.polls):
        if user is not None:
            args.setdefault("user", user)
        if isinstance(args.get("name"), str):
            args.setdefault("state_dir", os.path.join(state_root, f"poll-{args['name']}"))
        checked = PollArgs.parse(args)
        if checked.name in names:
            raise ValueError(f"{app_name}: two polls are named {checked.name!r}")
        names.add(checked.name)
        poll_ids.append(f"poll.{checked.name}")
        children.append(
            {
                "id": poll_ids[-1],
                "name": f"{app_name}.poll.{checked.name}",
                "spec": "ion.apps.pump.poll",
                "args": args,
                "shutdown": int(checked.stop_grace * 1000) + 5000,
            }
        )
    for args in map(dict, pump.watches):
        if user is not None:
            args.setdefault("user", user)
        if isinstance(args.get("name"), str):
            args.setdefault("state_dir", os.path.join(state_root, f"watch-{args['name']}"))
        checked = WatchArgs.parse(args)
        if checked.name in names:
            raise ValueError(f"{app_name}: a poll or another watch is named {checked.name!r}")
        names.add(checked.name)
        children.append(
            {
                "id": f"watch.{checked.name}",
                "name": f"{app_name}.watch.{checked.name}",
                "spec": "ion.apps.pump.watch",
                "args": args,
                "shutdown": int(checked.stop_grace * 1000) + 5000,
            }
        )
    progress_args.setdefault("consumers", consumer_ids)
    progress_args.setdefault("polls", poll_ids)
    progress_args.setdefault("name", app_name)
    ProgressArgs.parse(progress_args)
    children.append(
        {"id": "progress", "name": f"{app_name}.progress", "spec": "ion.apps.pump.progress",
         "args": progress_args}
    )
    return {"children": children, "strategy": "rest_for_one"}


async def start(container, app, **kwargs):
    args = plan(app.name, **kwargs)
    return await container.spawn(Supervisor, name=f"{app.name}-sup", args=args)
