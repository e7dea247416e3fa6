"""Starts the pump app: one rest_for_one supervisor over, in this order, the report router, the
transfer service workers, the ingest, one consumer per subscription, one poll per source, and
the progress summary.

Receivers come first, so a process never runs without someone to take what it sends: a poll
announces to `xs_<user>` where the ingest already listens, the ingest passes notices on to
`xpublic` where the consumers already listen, and every consumer has the transfer service
and the report router. With rest_for_one, a restarted process restarts the processes after it.

State lives under `var/<app name>/` (`var/pump/`; `var/pump.2/` for the second copy of a rel's
`mult`) unless a process is given its own `state_dir`: each process claims its directory, so
two pumps never share one.

kwargs (from `res/apps/pump.app`, a rel file's `args` or `-a "apparg_pump={...}"`):

- `polls`: a list of poll args (see `ion.apps.pump.poll`), each with a unique `name`: `url`,
  `interval`, `accept`, `reject`, `exchange`, `min_age`, `recursive`, `state_dir`,
  `base_url`...;
- `subscriptions`: a list of consumer args (see `ion.apps.pump.consumer`), each with a unique
  `name`: `exchange`, `topics`, `accept`, `reject`, `directory`, `mirror`, `strip`...;
- `transfer`: {workers: N transfer service instances (default 2; the polls list through them),
  timeouts, per_host, credentials, parallel, max_size, min_rate}: the settings of
  `ion.apps.pump.transfer.worker`. Consumers fetch files themselves with the same timeouts,
  per_host and credentials (a subscription's own `transfer` wins) and their own `parallel`;
  `max_size` and `min_rate` given here are the subscriptions' defaults too;
- `ingest`: ingest args (see `ion.apps.pump.ingest`), e.g. {users: ['alice', 'bob']} for the
  exchanges `xs_alice`, `xs_bob` (default: the pump's user's only);
- `report_router`: report router args (see `ion.apps.pump.report_router`), e.g. `log_path`;
- `progress`: {interval: seconds between summary lines (default 10)};
- `user`: the pump's broker user: it names the queues (`q_<user>....`) and the exchange the
  polls announce to (`xs_<user>`); default the config `ion.apps.pump: user`, else the
  container's broker login (`ion` on the embedded broker); see `ion.apps.pump.user`.

The kwargs are `ion.apps.pump.args.PumpArgs`; anything else is an error naming the valid
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

    children = [{"id": "report_router", "spec": "ion.apps.pump.report_router", "args": router_args}]
    for i in range(1, pump.workers + 1):
        children.append(
            {"id": f"transfer{i}", "spec": "ion.apps.pump.transfer_service", "args": dict(transfer)}
        )
    children.append({"id": "ingest", "spec": "ion.apps.pump.ingest", "args": ingest_args})
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
                "spec": "ion.apps.pump.consumer",
                "args": args,
                # Messages in hand get the consumer's stop_grace to finish.
                "shutdown": int(checked.stop_grace * 1000) + 5000,
            }
        )
    names = set()
    for args in map(dict, pump.polls):
        if user is not None:
            args.setdefault("user", user)
        if isinstance(args.get("name"), str):
            args.setdefault("state_dir", os.path.join(state_root, f"poll-{args['name']}"))
        checked = PollArgs.parse(args)
        if checked.name in names:
            raise ValueError(f"{app_name}: two polls are named {checked.name!r}")
        names.add(checked.name)
        children.append(
            {
                "id": f"poll.{checked.name}",
                "spec": "ion.apps.pump.poll",
                "args": args,
                "shutdown": int(checked.stop_grace * 1000) + 5000,
            }
        )
    progress_args.setdefault("consumers", consumer_ids)
    progress_args.setdefault("name", app_name)
    ProgressArgs.parse(progress_args)
    children.append({"id": "progress", "spec": "ion.apps.pump.progress", "args": progress_args})
    return {"children": children, "strategy": "rest_for_one"}


async def start(container, app, **kwargs):
    args = plan(app.name, **kwargs)
    return await container.spawn(Supervisor, name=f"{app.name}-sup", args=args)
