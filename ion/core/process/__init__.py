"""Processes: what applications build on. Import from here, not from the submodules."""

from ion.core.conversation.errors import (
    ApplicationError,
    ConversationTimeout,
    NoSuchReceiver,
    ProcessTerminated,
    RemoteError,
)
from ion.core.process.lifecycle import IllegalTransition
from ion.core.process.process import Process, ServiceProcess
from ion.core.process.registry import SpawnError
from ion.core.process.supervisor import Supervisor

__all__ = [
    "ApplicationError",
    "ConversationTimeout",
    "IllegalTransition",
    "NoSuchReceiver",
    "Process",
    "ProcessTerminated",
    "RemoteError",
    "ServiceProcess",
    "SpawnError",
    "Supervisor",
]
