"""Processes: what applications build on. Import from here, not from the submodules."""

from ion.core.conversation.errors import (
    ApplicationError,
    ConversationTimeout,
    NoSuchReceiver,
    ProcessTerminated,
    RemoteError,
)
from ion.core.conversation.conversation import Refused
from ion.core.messaging.transport import ConnectionLost, TransportError
from ion.core.process.lease import Lease
from ion.core.process.lifecycle import IllegalTransition
from ion.core.process.process import Process, ServiceProcess, explicit_agree, returns_of
from ion.core.process.registry import SpawnError
from ion.core.process.statedir import DirectoryInUse, EnvironmentFailure
from ion.core.process.supervisor import Supervisor

__all__ = [
    "ApplicationError",
    "ConnectionLost",
    "ConversationTimeout",
    "DirectoryInUse",
    "EnvironmentFailure",
    "IllegalTransition",
    "Lease",
    "NoSuchReceiver",
    "Process",
    "ProcessTerminated",
    "Refused",
    "RemoteError",
    "ServiceProcess",
    "SpawnError",
    "Supervisor",
    "TransportError",
    "explicit_agree",
    "returns_of",
]
