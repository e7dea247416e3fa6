"""The observer app: tracing without breaking fail-fast routing, and sequence charts of it."""

import os
import xml.etree.ElementTree as ET

from twisted.internet import defer, task
from twisted.trial import unittest

from ion.apps.observer import msc
from ion.apps.observer.observer import Observer
from ion.core.cc.testing import make_container, test_config
from ion.core.messaging.memory import MemoryBroker
from ion.core.process import NoSuchReceiver, Process, ServiceProcess
from tests.waiting import until

SVG_TEXT = "{http://www.w3.org/2000/svg}text"
TRACE_ON = {"ion.core.messaging": {"trace": True}}


class Caller(Process):
    """A: calls B by rpc."""


class Middle(ServiceProcess):
    """B: while serving `work`, asks C by request and waits for agreement and result."""

    service = "obs_b"

    async def op_work(self, content, headers):
        conv = self.request("obs_c", "compute", content)
        await conv.when_agreed()
        return await conv.when_done()


class Worker(ServiceProcess):
    """C: agrees (automatically, as request ops do) and answers."""

    service = "obs_c"

    def op_compute(self, content, headers):
        return content * 2


def arrows(text):
    """(tag, from, to, label) for each arrow of a text chart, read back from its columns."""
    lines = text.splitlines()
    names = lines[1].split()[1:]  # after the heading of the conv-seq column
    xs = [i for i, c in enumerate(lines[2]) if c == "|"]
    column = dict(zip(xs, names))
    found = []
    for line in lines[3:-1]:
        tag = line.split()[0]
        if ">" in line:
            head = line.index(">")
            tail = line.index("-", len(tag))
            start, end = tail - 1, head + 1
        else:
            head = line.index("<")
            tail = line.rindex("-")
            start, end = tail + 1, head - 1
        label = line[min(head, tail) : max(head, tail) + 1].strip("<>-")
        found.append((tag, column[start], column[end], label))
    return found


class ObserverTests(unittest.TestCase):
    async def system(self, clock=None):
        """A container running the observer app and processes A, B and C."""
        self.broker = MemoryBroker()
        c = await make_container(self, memory_broker=self.broker, clock=clock)
        await c.apps.start_files(["observer.app"])
        observer = c.apps.running["observer"].state
        a = await c.spawn(Caller, name="a")
        b = await c.spawn(Middle)
        w = await c.spawn(Worker)
        return c, observer, a, b, w

    async def call_through(self, observer, a, b):
        """A -> B (rpc), B -> C (request); returns both conv-ids once all five are observed."""
        self.assertEqual(await a.rpc("obs_b", "work", 21), 42)
        outer = a.conversations.recent[-1].conv_id
        inner = [conv for conv in b.conversations.recent if conv.role == "initiator"][-1].conv_id
        await until(
            lambda: len(observer.by_conv.get(outer, ())) == 2
            and len(observer.by_conv.get(inner, ())) == 3
        )
        return outer, inner

    async def test_chart_of_each_conversation(self):
        """Each conversation's chart shows its two participants, its messages in order with
        their performatives and conv-seq, and arrows in the right direction."""
        c, observer, a, b, w = await self.system()
        outer, inner = await self.call_through(observer, a, b)
        A, B, C = f"a/{a.pid}", f"obs_b/{b.pid}", f"obs_c/{w.pid}"

        text = await a.rpc("observer", "msc", {"conv_id": outer})
        self.assertIn(f"conversation {outer}  protocol=rpc op=work", text)
        self.assertEqual(text.splitlines()[1].split()[1:], [A, B])
        self.assertEqual(arrows(text), [("1", A, B, "work request"), ("2", B, A, "inform_result")])

        text = await a.rpc("observer", "msc", {"conv_id": inner})
        self.assertEqual(text.splitlines()[1].split()[1:], [B, C])
        self.assertEqual(
            arrows(text),
            [("1", B, C, "compute request"), ("2", C, B, "agree"), ("3", C, B, "inform_result")],
        )
        self.assertIn("--->|", text)
        self.assertIn("|<--", text)
        self.assertTrue(all(len(line) <= 100 for line in text.splitlines()))

    async def test_chart_of_last_messages(self):
        """msc(last=n) draws the n latest messages in the order they happened, across
        conversations, each tagged with a short conv-id and its conv-seq."""
        c, observer, a, b, w = await self.system()
        outer, inner = await self.call_through(observer, a, b)
        A, B, C = f"a/{a.pid}", f"obs_b/{b.pid}", f"obs_c/{w.pid}"

        text = observer.chart(last=5)
        self.assertEqual(text.splitlines()[0], "5 messages in 2 conversations")
        self.assertEqual(text.splitlines()[1].split()[1:], [A, B, C])
        o, i = outer[:6], inner[:6]
        self.assertEqual(
            arrows(text),
            [
                (f"{o}:1", A, B, "work request"),
                (f"{i}:1", B, C, "compute request"),
                (f"{i}:2", C, B, "agree"),
                (f"{i}:3", C, B, "inform_result"),
                (f"{o}:2", B, A, "inform_result"),
            ],
        )
        self.assertEqual([t for t, *_ in arrows(observer.chart(last=2))], [f"{i}:3", f"{o}:2"])
        self.assertEqual(
            await a.rpc("observer", "msc", {"conv_id": inner}), observer.chart(conv_id=inner)
        )

    async def test_svg(self):
        """The SVG chart is well-formed XML naming the participants and the ops."""
        c, observer, a, b, w = await self.system()
        outer, inner = await self.call_through(observer, a, b)
        last = ET.fromstring(msc.render_svg(observer.select(last=5)))
        texts = [e.text for e in last.iter(SVG_TEXT)]
        self.assertIn("work request", texts)
        self.assertIn("compute request", texts)

        root = ET.fromstring(await a.rpc("observer", "svg", {"conv_id": inner}))
        texts = [e.text for e in root.iter(SVG_TEXT)]
        self.assertIn("compute request", texts)
        self.assertIn("agree", texts)
        self.assertIn("inform_result", texts)
        self.assertIn(f"obs_c/{w.pid}", texts)

    async def test_conversations(self):
        """`conversations` summarises each conversation kept."""
        c, observer, a, b, w = await self.system()
        outer, inner = await self.call_through(observer, a, b)
        rows = {row["conv_id"]: row for row in await a.rpc("observer", "conversations")}
        self.assertEqual(
            rows[outer],
            {
                "conv_id": outer,
                "protocol": "rpc",
                "op": "work",
                "final": "inform_result",
                "participants": [f"a/{a.pid}", f"obs_b/{b.pid}"],
                "messages": 2,
            },
        )
        self.assertEqual(
            rows[inner],
            {
                "conv_id": inner,
                "protocol": "request",
                "op": "compute",
                "final": "inform_result",
                "participants": [f"obs_b/{b.pid}", f"obs_c/{w.pid}"],
                "messages": 3,
            },
        )

    async def test_bad_requests(self):
        """Unknown conversations, bad arguments and bad paths are 4xx errors, not crashes."""
        c, observer, a, b, w = await self.system()
        from ion.core.process import RemoteError

        e = await self.assertFailure(a.rpc("observer", "msc", {"conv_id": "nope"}), RemoteError)
        self.assertEqual(e.code, 404)
        e = await self.assertFailure(a.rpc("observer", "msc", {"lats": 3}), RemoteError)
        self.assertEqual(e.code, 400)
        self.assertIn("valid keys", e.message)
        # No caller can make the observer write a file (any process of the system may call it).
        path = self.mktemp() + ".svg"
        e = await self.assertFailure(
            a.rpc("observer", "svg", {"path": path, "last": 3}), RemoteError
        )
        self.assertEqual(e.code, 400)
        self.assertFalse(os.path.exists(path))

    async def test_unknown_receiver_fails_fast_without_trace(self):
        """With tracing off (no observer), a call to an unknown receiver fails at once."""
        c = await make_container(self, clock=task.Clock())
        a = await c.spawn(Caller)
        self.assertFalse(c.messenger.tracing())
        await self.assertFailure(a.rpc("nobody_here", "op"), NoSuchReceiver)

    async def test_unknown_receiver_fails_fast_with_observer(self):
        """The observer's queue does not catch messages to unknown receivers: they still fail
        at once (the clock never moves, so this is not a timeout)."""
        c, observer, a, b, w = await self.system(clock=task.Clock())
        self.assertTrue(c.messenger.tracing())
        await self.assertFailure(a.rpc("nobody_here", "op"), NoSuchReceiver)
        await self.assertFailure(defer.ensureDeferred(a.send("nobody_here", "op")), NoSuchReceiver)
        self.assertEqual(await a.rpc("obs_b", "work", 1), 2)

    async def test_other_containers_traced_by_config(self):
        """A process in another container of the system shows up once that container traces
        (`-D ion.core.messaging:trace=True`); an untraced container stays invisible."""
        c, observer, a, b, w = await self.system()
        traced = await make_container(
            self, memory_broker=self.broker, config=test_config(**TRACE_ON)
        )
        quiet = await make_container(self, memory_broker=self.broker)
        d = await traced.spawn(Caller, name="d")
        q = await quiet.spawn(Caller, name="q")
        self.assertEqual(await q.rpc("obs_c", "compute", 1), 2)
        self.assertEqual(await d.rpc("obs_c", "compute", 2), 4)
        conv_id = d.conversations.recent[-1].conv_id
        await until(lambda: len(observer.by_conv.get(conv_id, ())) == 2)
        self.assertEqual(
            arrows(observer.chart(conv_id))[0],
            ("1", f"d/{d.pid}", f"obs_c/{w.pid}", "compute request"),
        )
        # the replies to q come from a traced container, q's own requests are not traced
        self.assertNotIn(q.pid, [m["sender"] for m in observer.messages])
        self.assertIn(q.pid, [m["receiver"] for m in observer.messages])

    async def test_stopping_the_app_stops_tracing(self):
        c, observer, a, b, w = await self.system()
        await c.apps.stop("observer")
        self.assertFalse(c.messenger.tracing())
        with self.assertRaises(NoSuchReceiver):
            await a.rpc("observer", "msc", {"last": 5}, timeout=5)

    async def test_keeps_the_last_n(self):
        """The store is bounded by `keep`; forgetting a message forgets it in its conversation."""
        config = test_config(**TRACE_ON, **{"ion.apps.observer": {"keep": 3}})
        c = await make_container(self, config=config)
        observer = await c.spawn(Observer)
        a = await c.spawn(Caller)
        await c.spawn(Worker)
        for i in range(4):
            await a.send("obs_c", "compute", i)
        last = a.conversations.recent[-1].conv_id
        await until(lambda: observer.messages and observer.messages[-1]["conv-id"] == last)
        firsts = [conv.conv_id for conv in a.conversations.recent]
        self.assertEqual(len(observer.messages), 3)
        self.assertEqual(list(observer.by_conv), firsts[1:])
        self.assertEqual([m["conv-id"] for m in observer.messages], firsts[1:])
        self.assertEqual(observer.messages[-1]["content-type"], "int")


class RenderTests(unittest.SynchronousTestCase):
    def message(self, seq, sender, receiver, performative, conv="c1", op="op", name=None):
        return {
            "conv-id": conv,
            "conv-seq": seq,
            "sender": sender,
            "sender-name": name or sender,
            "receiver": receiver,
            "performative": performative,
            "op": op,
            "protocol": "rpc",
        }

    def test_service_name_drawn_on_the_process_that_answered(self):
        messages = [
            self.message(1, "p1", "svc", "request", name="a"),
            self.message(2, "p2", "p1", "inform_result", name="svc"),
        ]
        lanes = msc.Lifelines(messages)
        self.assertEqual(lanes.names(), ["a/p1", "svc/p2"])
        self.assertEqual(lanes.ends, [("p1", "p2"), ("p2", "p1")])

    def test_unanswered_receiver_keeps_its_name(self):
        lanes = msc.Lifelines([self.message(1, "p1", "svc", "inform")])
        self.assertEqual(lanes.names(), ["p1", "svc"])

    def test_fits_in_100_columns(self):
        """Many participants and long names still give lines of at most 100 characters."""
        pids = [f"container_host_123456_{i}.{i}" for i in range(10)]
        messages = [
            self.message(
                1,
                pids[i],
                pids[i + 1],
                "request",
                conv=f"conv{i}",
                op="a_rather_long_operation_name",
                name=f"service_{i}",
            )
            for i in range(9)
        ]
        text = msc.render_text(messages)
        self.assertTrue(all(len(line) <= 100 for line in text.splitlines()), text)
        self.assertEqual(len(text.splitlines()), 3 + 9 + 1)

    def test_names_whole_in_narrow_columns(self):
        """Where a column is too narrow for C{name/pid}, the name stays whole and the pid
        gives way (C{transfer/~62.4}, not C{trans~962.4})."""
        pids = [f"vm_24683.{960 + i}" for i in range(8)]
        names = ["transfer", "pump", "poll", "ingest"] * 2
        messages = [
            self.message(1, pids[i], pids[i + 1], "request", conv=f"c{i}", op="get")
            for i in range(7)
        ]
        for message in messages:
            message["sender-name"] = names[pids.index(message["sender"])]
        messages.append(self.message(2, pids[7], pids[6], "inform_result", conv="c6"))
        messages[-1]["sender-name"] = names[7]
        header = msc.render_text(messages).splitlines()[1].split()[1:]
        self.assertEqual([label.split("/")[0] for label in header], names)
        for label, pid in zip(header, pids):
            self.assertTrue(label == label.split("/")[0] or pid.endswith(label.split("~")[-1]),
                            label)

    def test_message_to_self(self):
        text = msc.render_text([self.message(1, "p1", "p1", "inform", op="tick")])
        self.assertIn("+-- tick inform (to self)", text)
        ET.fromstring(msc.render_svg([self.message(1, "p1", "p1", "inform", op="tick")]))

    def test_svg_escapes_names(self):
        svg = msc.render_svg([self.message(1, "p<1>", "q&", "request", op='"x"')])
        root = ET.fromstring(svg)
        self.assertIn('"x" request', [e.text for e in root.iter(SVG_TEXT)])

    def test_empty(self):
        self.assertEqual(msc.render_text([]), "(no messages)")
        ET.fromstring(msc.render_svg([]))


class ShellMscTests(unittest.TestCase):
    """The shell's msc() prints the observer's chart, or says how to get one."""

    async def test_shell_msc(self):
        from ion.core.cc.shell import ShellHelpers

        c = await make_container(self)
        printed = []
        helpers = ShellHelpers(c, printed.append)
        await helpers.msc().when_done()
        self.assertEqual(
            printed[-1], "LookupError no observer in this system: start res/apps/observer.app\n"
        )
        await c.apps.start_files([os.path.join(c.res_dir, "apps", "observer.app")])
        await helpers.rpc("observer", "conversations").when_done()
        await helpers.msc(last=5).when_done()
        self.assertIn("conversations request", printed[-1])
        svg = self.mktemp() + ".svg"
        await helpers.msc(last=5, svg=svg).when_done()
        self.assertEqual(printed[-2], f"wrote {os.path.abspath(svg)}\n")
        self.assertIn("<svg", open(svg).read())
