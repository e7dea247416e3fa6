"""Loopback servers for the transfer tests (http, sftp, ftp), each on 127.0.0.1 port 0 and
stopped by the test's cleanup, and small file helpers."""

import os

from ion.apps.pump.transfer.inflight import INFLIGHT_SUFFIX


def write_file(path, data):
    """Write C{data} (bytes) to C{path}; returns C{path}."""
    with open(path, "wb") as f:
        f.write(data)
    return path


def leftovers(directory):
    """The temporary inflight files left in C{directory}."""
    return sorted(name for name in os.listdir(directory) if name.endswith(INFLIGHT_SUFFIX))
