"""The pump's user: the broker user whose name the pump's queues and exchanges carry."""

CONFIG = "ion.apps.pump"


def pump_user(process, given=None):
    """The user a pump process works as: C{given} (its C{user} arg), else the config value
    C{ion.apps.pump: user}, else the broker user of its container's connection (C{ion} on the
    embedded broker). Polls announce to C{xs_<user>}, the ingest reads it, and the queues are
    named C{q_<user>....}: one name throughout, the one the pump logs in with unless told."""
    return given or process.config("user", None, module=CONFIG) or process.container.transport.user
