"""A flow's own broker: the connection of a subscription, sender, poll, watch or ingest on
another pump.

A flow given a C{broker} URL (C{amqp[s]://} or C{mqtt[s]://}) opens a connection of its own
there (L{ion.core.process.Process.open_broker}) and declares only what a read-only account of
an sr3 pump may: its queue C{q_<login>.<kind>.<name>} (or the C{queue} given) and its bindings,
never an exchange. An MQTT session is named after the queue and an instance tag kept in the
flow's state directory, so that it outlives restarts and two instances never share one.
The ingest, that pump's feeder, declares what it needs there (L{ion.apps.pump.ingest}); it
takes no MQTT broker, so it has no session and no state directory.
"""

import os
import secrets


def open_flow_broker(process, url, kind, name, state_dir, queue=None):
    """The flow's unconnected broker and its queue name (see the module docstring);
    C{state_dir} None: no session name (a flow that never speaks MQTT)."""
    broker = process.open_broker(url)
    queue = queue or f"q_{broker.user}.{kind}.{name}"
    if state_dir is not None:
        broker.session = f"{queue}_{instance_tag(state_dir)}"
    return broker, queue


def instance_tag(state_dir):
    """A random tag kept in C{<state_dir>/instance}, made on first use."""
    path = os.path.join(state_dir, "instance")
    try:
        with open(path, encoding="ascii") as f:
            tag = f.read().strip()
    except FileNotFoundError:
        tag = ""
    if not tag.isalnum():
        tag = secrets.token_hex(4)
        with open(path, "w", encoding="ascii") as f:
            f.write(tag + "\n")
    return tag
