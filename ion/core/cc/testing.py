"""Helpers for testing services on a real container: part of the product, not just our tests.

For example::

    container = await make_container(self)             # memory://, stopped at test end
    proc = await container.spawn(MyService)
    result = await call_op(proc, "greet", "Ann")        # runs the op directly, no messages

Containers made with the same C{broker} share it (so they form one system when they share a
sysname, and stay isolated when they don't).
"""

import itertools
import os
import pathlib

from twisted.internet import defer

from ion.core.cc.container import Container, default_container_id, make_transport
from ion.core.config import Config

_RES = os.fspath(pathlib.Path(__file__).parents[3] / "res")
_ids = itertools.count(1)


def test_config(**sections):
    """The shipped config (res/config) with extra sections layered on top."""
    config = Config.load(_RES)
    if sections:
        config.add_layer("test", sections)
    return config


async def make_container(testcase, url="memory://", memory_broker=None, sysname="test",
                         config=None, reactor=None, clock=None):
    """Start a container for a test and stop it in the test's cleanup."""
    if reactor is None:
        from twisted.internet import reactor
    transport = make_transport(url, reactor, memory_broker)
    container = Container(
        config or test_config(),
        reactor,
        transport,
        container_id=f"{default_container_id()}_{next(_ids)}",
        sysname=sysname,
        res_dir=_RES,
        clock=clock,
    )
    container.broker_url = url
    await container.start()
    testcase.addCleanup(lambda: defer.Deferred.fromCoroutine(container.stop()))
    return container


async def call_op(process, op, content=None, headers=None):
    """Run process.op_<op> directly (no messaging), as a unit test of the op."""
    return await process._dispatch(dict(headers or {}, op=op), content)
