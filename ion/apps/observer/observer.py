"""The Observer: records the trace of a system's traffic and draws it as sequence charts.

L{Observer} (service C{observer}) reads the trace exchange of its system through a queue of its
own (exclusive, deleted with it) and keeps the headers of the last C{keep} messages (config
C{ion.apps.observer}, read when it starts; default 10000), indexed by conv-id. Ops:

  - C{msc} C{{'conv_id': id}} or C{{'last': n}} (default: the last 20 messages) -> the text chart;
  - C{svg} the same -> the SVG text (the web console's and the shell's charts). The observer
    never writes files for its callers: any process of the system may call it;
  - C{conversations} (optionally C{{'last': n}}) -> one summary dict per conversation kept.
The shell's C{msc()} asks for its charts over rpc, like any other client.
"""

import collections

from ion.apps.observer import msc
from ion.core.process import ApplicationError, ServiceProcess

CONFIG = "ion.apps.observer"
DEFAULT_LAST = 20


class Observer(ServiceProcess):
    """Keeps the traced messages of its system and answers chart requests about them."""

    service = "observer"

    def on_init(self):
        keep = self.config("keep", 10000, module=CONFIG)
        if isinstance(keep, bool) or not isinstance(keep, int) or keep <= 0:
            raise ValueError(f"{CONFIG}: keep must be a positive integer, got {keep!r}")
        self.keep = keep
        self.messages = collections.deque()  # header dicts, in the order they arrived
        self.by_conv = {}  # conv-id -> deque of the same dicts
        self._trace_consumer = None

    async def on_activate(self):
        messenger = self.container.messenger
        queue = f"{self.pid}.trace"
        await messenger.declare_trace_receiver(queue)
        self._trace_consumer = await messenger.listen(queue, self._observe)

    async def on_deactivate(self):
        # The queue is auto-delete: it goes with its consumer.
        consumer, self._trace_consumer = self._trace_consumer, None
        if consumer is not None:
            await consumer.cancel()

    on_terminate = on_deactivate

    def _observe(self, msg):
        record = dict(msg.headers)
        if isinstance(msg.content, dict):
            record["content-type"] = msg.content.get("type")
            record["size"] = msg.content.get("size")
        msg.ack()
        if len(self.messages) >= self.keep:
            self._forget(self.messages.popleft())
        self.messages.append(record)
        conv_id = record.get("conv-id")
        if isinstance(conv_id, str):
            self.by_conv.setdefault(conv_id, collections.deque()).append(record)

    def _forget(self, record):
        conv_id = record.get("conv-id")
        kept = self.by_conv.get(conv_id) if isinstance(conv_id, str) else None
        if kept:
            kept.popleft()  # the oldest message overall is the oldest of its conversation
            if not kept:
                del self.by_conv[conv_id]

    # -- queries ---------------------------------------------------------------------------

    def select(self, conv_id=None, last=DEFAULT_LAST):
        """The messages of one conversation (by conv-seq), or the last C{last} ones."""
        if conv_id is not None:
            kept = self.by_conv.get(conv_id)
            if not kept:
                raise ApplicationError(
                    f"no messages of conversation {conv_id!r} kept "
                    f"(this observer keeps the last {self.keep} messages)",
                    code=404,
                )
            return sorted(kept, key=msc.conv_seq)
        return list(self.messages)[-_positive(last) :]

    def chart(self, conv_id=None, last=DEFAULT_LAST):
        """The text chart of one conversation or of the last messages."""
        return msc.render_text(self.select(conv_id, last))

    def summaries(self, last=None):
        """One dict per conversation kept, oldest first: conv_id, protocol, op, participants,
        final (the performative of its latest message) and messages (how many are kept)."""
        rows = []
        for conv_id, kept in self.by_conv.items():
            ordered = sorted(kept, key=msc.conv_seq)
            rows.append(
                {
                    "conv_id": conv_id,
                    "protocol": ordered[0].get("protocol"),
                    "op": ordered[0].get("op"),
                    "participants": msc.Lifelines(ordered).names(),
                    "final": ordered[-1].get("performative"),
                    "messages": len(ordered),
                }
            )
        return rows if last is None else rows[-last:]

    # -- ops -------------------------------------------------------------------------------

    def op_msc(self, content, headers):
        return self.chart(**_chart_args(content))

    def op_svg(self, content, headers):
        return msc.render_svg(self.select(**_chart_args(content)))

    def op_conversations(self, content, headers):
        last = _chart_args(content).get("last")
        return self.summaries(None if last is None else _positive(last))


def _positive(last):
    if isinstance(last, bool) or not isinstance(last, int) or last <= 0:
        raise ApplicationError(f"last must be a positive integer, got {last!r}")
    return last


def _chart_args(content):
    if content is None:
        return {}
    if not isinstance(content, dict):
        example = "{'conv_id': ...} or {'last': 20}"
        raise ApplicationError(f"expected a dict like {example}, got {type(content).__name__}")
    allowed = ("conv_id", "last")
    unknown = sorted(str(k) for k in content if k not in allowed)
    if unknown:
        raise ApplicationError(f"unknown keys {unknown}; valid keys are {list(allowed)}")
    return dict(content)


process_class = Observer
