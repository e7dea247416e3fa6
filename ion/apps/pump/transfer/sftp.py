"""The sftp scheme (not written yet)."""

from ion.apps.pump.transfer.errors import BadRequest


async def fetch(reactor, location, sink, settings):
    raise BadRequest(f"{location.shown}: sftp is not supported yet")


store = listdir = fetch
