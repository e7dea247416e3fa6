"""Waiting on the real reactor, for tests where real I/O has to happen: one helper for all.

Timers of the code under test run on a `task.Clock` (the container's `clock`) and are moved
with `advance`, never waited for. What a socket, a thread, a child process or the broker brings
cannot be advanced: `until` lets the reactor run until it has come, with a bound.
"""

import inspect

from twisted.internet import reactor
from twisted.internet.task import deferLater


async def until(predicate, timeout=5.0, what="the condition", interval=0.002):
    """Let the reactor run until `predicate()` (a value, or an awaitable of one) is true, and
    return it; AssertionError naming `what` after `timeout` seconds. `what` may be a function
    of the last value, for a message that says what was seen instead."""
    deadline = reactor.seconds() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if reactor.seconds() > deadline:
            wanted = what(value) if callable(what) else what
            raise AssertionError(f"timed out after {timeout} s waiting for {wanted}")
        await deferLater(reactor, interval, lambda: None)


async def quiet(seconds=0.05):
    """Let the reactor run a little, so that anything still on its way arrives (before asserting
    that something did not happen)."""
    await deferLater(reactor, seconds, lambda: None)
