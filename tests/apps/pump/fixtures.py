"""Helpers for the pump process tests: real source files and the notices announcing them, a
process that collects what arrives on an exchange, and waiting for a condition."""

import base64
import gc
import hashlib
import json
import os
import threading
import time

from twisted.internet import reactor

from ion.apps.pump.notice import format_time
from ion.core.cc.container import make_transport
from ion.core.process import Process
from tests.waiting import quiet, until  # noqa: F401 (the pump tests import them from here)

MTIME = 1700000000.25


def write_source(directory, rel_path, data):
    """Write `data` at `directory/rel_path` (directories made); returns the path."""
    path = os.path.join(directory, *rel_path.split("/"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def notice_fields(base_url, rel_path, data=None, source="alice", **extra):
    """The fields of a v03 notice for a file holding `data` (size and sha512 identity), with
    `mtime` MTIME and mode 644; `extra` adds or replaces fields (None removes one)."""
    fields = {
        "pubTime": format_time(time.time()),
        "baseUrl": base_url,
        "relPath": rel_path,
        "mtime": format_time(MTIME),
        "mode": "644",
    }
    if data is not None:
        fields["size"] = len(data)
        digest = hashlib.sha512(data).digest()
        fields["identity"] = {"method": "sha512", "value": base64.b64encode(digest).decode()}
    if source is not None:
        fields["source"] = source
    for key, value in extra.items():
        if value is None:
            fields.pop(key, None)
        else:
            fields[key] = value
    return fields


def encode(fields):
    return json.dumps(fields).encode("utf-8")


def topic(rel_path):
    return ".".join(["v03"] + rel_path.split("/")[:-1])


def file_url(directory):
    return "file://" + os.path.abspath(directory) + "/"


def without_collector(testcase):
    """Turn the garbage collector off for the test: what a test then sees freed was freed by
    its reference count, held by no cycle."""
    if gc.isenabled():
        gc.disable()
        testcase.addCleanup(gc.enable)


def unblock_after(testcase, fifo, seconds):
    """
    Open the named pipe C{fifo} for writing after C{seconds}, in a thread: a reader stuck in
    C{open()} then goes on, so a test of a reader that blocks fails instead of hanging. The
    returned event is set once that happened.
    """
    came = threading.Event()

    def writer():
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass  # no reader waiting
        came.set()

    timer = threading.Timer(seconds, writer)
    timer.daemon = True
    timer.start()
    testcase.addCleanup(timer.cancel)
    return came


class Collector(Process):
    """Collects the JSON bodies of the messages arriving on the exchanges it listens to, and
    publishes for the tests."""

    def on_init(self):
        self.got = []

    async def listen(self, exchange, keys=("#",)):
        # durable: the exchange is declared as the pump declares it (the queue is still ours).
        await self.subscribe(exchange, list(keys), self._take, durable=True)

    def _take(self, delivery):
        self.got.append((delivery.exchange, delivery.routing_key, json.loads(delivery.body)))
        delivery.ack()

    def bodies(self, exchange=None):
        return [body for ex, _, body in self.got if exchange is None or ex == exchange]

    async def post(self, fields, exchange="xpublic", routing_key=None):
        """Publish a notice (a dict, or raw bytes with routing_key)."""
        if isinstance(fields, dict):
            body = encode(fields)
            routing_key = routing_key or topic(fields.get("relPath", "x"))
        else:
            body = fields
        await self.publish(exchange, routing_key or "v03", body, declare="topic")


async def delete_queues(url, queues):
    """Delete C{queues} on the broker at C{url} (a queue that does not exist is fine): the
    durable queues a test on the private broker leaves behind."""
    transport = make_transport(url, reactor)
    await transport.connect()
    try:
        for queue in queues:
            await transport.delete_queue(queue)
    finally:
        await transport.close()
