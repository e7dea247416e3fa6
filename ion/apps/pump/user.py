"""The pump's user: the broker user whose name the pump's queues and exchanges carry."""

CONFIG = "ion.apps.pump"
# The sysname of a container not given one (config ion.core.messaging: sysname).
DEFAULT_SYSNAME = "ion"


def pump_user(process, given=None):
    """The user a pump process works as: C{given} (its C{user} arg), else the config value
    C{ion.apps.pump: user}, else the broker user of its container's connection (C{ion} on the
    embedded broker). Polls announce to C{xs_<user>}, the ingest reads it, and the queues are
    named C{q_<user>....}: one name throughout, the one the pump logs in with unless told."""
    return given or process.config("user", None, module=CONFIG) or process.container.transport.user


def own_prefix(process, user):
    """The start of the names of a pump's own queues: C{<user>.}, then C{<sysname>.} when the
    container's system is not the default C{ion}. Containers of one system with one config
    share their queues, and so the work (sr3's instances); two pumps of one user started as
    two systems (C{-s sA}, C{-s sB}) never share one by accident."""
    sysname = process.container.messenger.sysname
    return f"{user}." if sysname == DEFAULT_SYSNAME else f"{user}.{sysname}."
