"""A running pump with its web console, for the tests of `ion status`, the console and
/metrics: a container with the core app and agent, the pump app polling a temporary source,
its console on a free loopback port, and an HTTP client."""

import itertools
import json
import os
import types

from twisted.internet import defer, reactor
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from ion.apps.pump import app as pump_app
from ion.core.cc.coreapp import ContainerProcess
from ion.core.cc.testing import make_container, test_config
from ion.core.cc.web import WebConsole
from ion.core.messaging.memory import MemoryBroker
from tests.apps.pump.fixtures import write_source
from tests.waiting import until

_tags = itertools.count(1)
SAMPLE = 0.2  # seconds between samples, to keep the tests short


async def get(url, token=None, header=False, headers=None):
    """(status code, body bytes, content type) of GET url."""
    headers = Headers({k: [v] for k, v in (headers or {}).items()})
    if token is not None and header:
        headers.addRawHeader(b"authorization", f"Bearer {token}".encode())
    elif token is not None:
        url += ("&" if "?" in url else "?") + f"token={token}"
    response = await Agent(reactor).request(b"GET", url.encode(), headers)
    body = await readBody(response)
    kind = (response.headers.getRawHeaders(b"content-type") or [b""])[0].decode()
    return response.code, body, kind


async def get_json(url, **kw):
    code, body, _ = await get(url, **kw)
    assert code == 200, (code, body)
    return json.loads(body)


class RunningPump:
    """The pump of a test (see the module docstring); C{url} is its broker."""

    async def start(self, testcase, url="memory://", tag=None, apps=(), host="127.0.0.1",
                    token=None, polls=()):
        self.tag = tag = tag or f"{os.getpid()}-{next(_tags)}"
        self.user, self.sysname = f"ops-{tag}", f"ops-{tag}"
        base = os.path.abspath(testcase.mktemp())
        self.src, self.dest = os.path.join(base, "src"), os.path.join(base, "dest")
        os.makedirs(self.src)
        config = test_config(**{"ion.core.cc": {"sample_interval": SAMPLE}})
        self.c = c = await make_container(
            testcase, url=url, sysname=self.sysname,
            memory_broker=MemoryBroker() if url == "memory://" else None, config=config)
        await c.apps.start_files(["ioncore", "ccagent", *apps])
        self.core = next(p for p in c.registry if isinstance(p, ContainerProcess))
        credentials = os.path.join(base, "credentials.conf")
        write_source(base, "credentials.conf", b"")
        os.chmod(credentials, 0o600)
        xpublic, xreport = f"xpublic-{tag}", f"xreport-{tag}"
        self.sup = await pump_app.start(
            c, types.SimpleNamespace(name="pump"), user=self.user,
            polls=[{"name": "src", "url": "file://" + self.src, "interval": 0.2,
                    "state_dir": os.path.join(base, "poll")},
                   *[dict(p, state_dir=os.path.join(base, f"poll-{p['name']}")) for p in polls]],
            ingest={"exchange": xpublic, "report_exchange": xreport},
            subscriptions=[{"name": "sub", "directory": self.dest, "exchange": xpublic,
                            "report_exchange": xreport,
                            "state_dir": os.path.join(base, "consumer")}],
            transfer={"workers": 1, "credentials": credentials},
            report_router={"state_dir": os.path.join(base, "router"), "exchange": xreport},
        )
        testcase.addCleanup(self.sup.terminate)
        self.console = WebConsole(c, reactor, host, 0, token)
        self.console.startService()
        testcase.addCleanup(self.console.stopService)
        self.url = f"http://127.0.0.1:{self.console.port}"
        await self.sampled(lambda row: True)  # then the rates count every file delivered
        return self

    def consumer(self):
        return self.sup.child("consumer.sub")

    async def deliver(self, *names):
        """Drop files into the source; wait until they are delivered and sampled."""
        target = self.consumer().stats["delivered"] + len(names)
        for name in names:
            write_source(self.src, name, f"data of {name}".encode())
            os.utime(os.path.join(self.src, name), (1, 1))
        await until(lambda: self.consumer().stats["delivered"] >= target, timeout=20,
                    what=f"{target} deliveries")
        await self.sampled(lambda row: row["delivered"] >= target)

    async def sampled(self, check, name=None):
        """Wait for a sample whose consumer row (or the row of the worker named C{name})
        passes C{check}."""
        sampler = self.core.sampler

        def seen():
            rows = [w for w in sampler.status()["workers"]
                    if (w["name"] == name if name else w["kind"] == "Consumer")]
            return rows and check(rows[0])

        await until(seen, timeout=10, what=f"a sample of {name or 'the consumer'}")
        # One more: the rates need two samples that both hold the new counts.
        count = len(sampler.samples)
        await until(lambda: len(sampler.samples) > count + 1, timeout=10)


def drop_queues(testcase, broker, tag):
    """Delete, now and at the end, the durable queues of the pump of C{tag} on the shared
    broker."""
    from tests.apps.pump.fixtures import delete_queues

    user = sysname = f"ops-{tag}"
    queues = [f"q_{user}.{sysname}.consumer.sub", f"q_xreport-{tag}.report_router",
              f"q_{user}.{sysname}.report_router.sent", f"q_{user}.ingest.xs_{user}"]
    testcase.addCleanup(lambda: defer.Deferred.fromCoroutine(delete_queues(broker.url, queues)))
    return defer.Deferred.fromCoroutine(delete_queues(broker.url, queues))
