"""Starts the pump app: one rest_for_one supervisor over, in this order, the report router, the
transfer service workers, and one consumer per subscription.

Receivers come first, so a consumer never runs without someone to take its reports and do its
transfers; with rest_for_one, a restarted router or transfer worker restarts the processes
after it, and a restarted consumer restarts alone.

kwargs (from `res/apps/pump.app`, a rel file or `-a apparg_pump=...`):

- `subscriptions`: a list of consumer args (see `ion.apps.pump.consumer`), each with a unique
  `name`;
- `transfer`: {workers: N (default 2), and the transfer service args: timeouts, per_host,
  credentials};
- `report_router`: report router args (see `ion.apps.pump.report_router`);
- `user`: broker user naming the queues (`q_<user>....`); default the container's.

Anything else is an error naming the valid kwargs.
"""

from ion.apps.pump import consumer, report_router
from ion.core.process import Supervisor

KWARGS = ("report_router", "subscriptions", "transfer", "user")
DEFAULT_SUBSCRIPTIONS = [
    {
        "name": "pump",
        "exchange": "xpublic",
        "topics": ["v03.#"],
        "directory": "pump/destination/",
        "mirror": True,
    }
]


def plan(app_name="pump", **kwargs):
    """The supervisor args for these kwargs, checked; ValueError naming the problem."""
    unknown = sorted(set(kwargs) - set(KWARGS))
    if unknown:
        raise ValueError(
            f"{app_name}: unknown argument {unknown[0]!r}; valid arguments are {', '.join(KWARGS)}"
        )
    user = kwargs.get("user")
    subscriptions = kwargs.get("subscriptions")
    if subscriptions is None:
        subscriptions = DEFAULT_SUBSCRIPTIONS
    if not isinstance(subscriptions, (list, tuple)):
        raise ValueError(f"{app_name}: subscriptions must be a list, got {subscriptions!r}")
    transfer = dict(kwargs.get("transfer") or {})
    workers = transfer.pop("workers", 2)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"{app_name}: transfer workers must be an int >= 1, got {workers!r}")
    bad = sorted(set(transfer) - {"credentials", "per_host", "timeouts"})
    if bad:
        raise ValueError(
            f"{app_name}: unknown transfer argument {bad[0]!r}; valid ones are workers, "
            "timeouts, per_host, credentials"
        )
    router_args = dict(kwargs.get("report_router") or {})
    if user is not None:
        router_args.setdefault("user", user)
    report_router.check_args(router_args)

    children = [{"id": "report_router", "spec": "ion.apps.pump.report_router", "args": router_args}]
    for i in range(1, workers + 1):
        children.append(
            {"id": f"transfer{i}", "spec": "ion.apps.pump.transfer_service", "args": dict(transfer)}
        )
    names = set()
    for entry in subscriptions:
        if not isinstance(entry, dict):
            raise ValueError(f"{app_name}: each subscription must be a dict, got {entry!r}")
        args = dict(entry)
        if user is not None:
            args.setdefault("user", user)
        checked = consumer.check_args(args)
        if checked["name"] in names:
            raise ValueError(f"{app_name}: two subscriptions are named {checked['name']!r}")
        names.add(checked["name"])
        children.append(
            {
                "id": f"consumer.{checked['name']}",
                "spec": "ion.apps.pump.consumer",
                "args": args,
                # Messages in hand get the consumer's stop_grace to finish.
                "shutdown": int(checked["stop_grace"] * 1000) + 5000,
            }
        )
    return {"children": children, "strategy": "rest_for_one"}


async def start(container, app, **kwargs):
    args = plan(app.name, **kwargs)
    return await container.spawn(Supervisor, name=f"{app.name}-sup", args=args)
