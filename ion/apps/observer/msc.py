"""Message sequence charts: traced ION messages drawn as text (for a terminal) or as SVG.

Both renderers take a list of message header dicts, in time order, as the observer records
them (the ION headers C{sender}, C{sender-name}, C{receiver}, C{conv-id}, C{conv-seq}, C{op},
C{performative}, C{protocol}, ...). Each participant gets a lifeline, named C{sender-name/pid}; a
service name used as receiver is drawn on the lifeline of the process that answered in that
conversation. Each message is one arrow, labelled C{op request} for the message that opens a
conversation and with its performative for the others. These are pure functions: no I/O.
"""

from xml.sax.saxutils import escape, quoteattr

OPENING = ("request", "inform")

_MIN_COLUMN = 8
_MAX_COLUMN = 40


def conv_seq(message):
    """The conv-seq of a message (0 when missing): sort a conversation by it."""
    seq = message.get("conv-seq")
    return seq if isinstance(seq, int) else 0


def arrow_label(message):
    """C{op performative} for a conversation's opening message, the performative otherwise."""
    performative = str(message.get("performative") or "?")
    if performative in OPENING:
        return f"{message.get('op') or '?'} {performative}"
    return performative


def _shorten(text, room):
    """text cut in the middle to at most room characters (the ends say the most)."""
    if len(text) <= room:
        return text
    if room < 3:
        return text[:room]
    head = (room - 1) // 2
    return f"{text[:head]}~{text[len(text) - (room - 1 - head):]}"


def _fit_label(label, room):
    """A participant's C{name/pid} label in at most room characters: the name whole when it
    fits, with as much of the pid's end as is left (C{transfer/~62.4}), rather than both cut in
    the middle (C{trans~962.4})."""
    if len(label) <= room or "/" not in label:
        return _shorten(label, room)
    name, _, pid = label.rpartition("/")
    if len(name) > room:
        return _shorten(name, room)
    left = room - len(name) - 2  # for "/~"
    return f"{name}/~{pid[-left:]}" if left >= 2 else name


class Lifelines:
    """Who takes part in a list of messages: C{columns} (keys in order of appearance),
    C{labels} (key -> text) and C{ends} (for each message, its (sender key, receiver key))."""

    def __init__(self, messages):
        # A request to a service goes to a name; whoever answers in that conversation is the
        # process behind it.
        names, answered_by, opened_to = {}, {}, {}
        for m in messages:
            sender, conv_id = m.get("sender"), m.get("conv-id")
            if m.get("performative") in OPENING:
                opened_to.setdefault(conv_id, str(m.get("receiver")))
            elif sender is not None:
                answered_by.setdefault(conv_id, str(sender))
            if sender is not None:
                names.setdefault(str(sender), str(m.get("sender-name") or sender))

        self.columns = []
        self.labels = {}
        self.ends = []
        for m in messages:
            sender = str(m.get("sender", "?"))
            receiver = str(m.get("receiver", "?"))
            conv_id = m.get("conv-id")
            if receiver not in names and opened_to.get(conv_id) == receiver:
                receiver = answered_by.get(conv_id, receiver)
            for key in (sender, receiver):
                if key not in self.labels:
                    name = names.get(key, key)
                    self.labels[key] = key if name == key else f"{name}/{key}"
                    self.columns.append(key)
            self.ends.append((sender, receiver))

    def names(self):
        return [self.labels[key] for key in self.columns]


def _tags(messages):
    """The text before each arrow: conv-seq, prefixed by a short conv-id when several
    conversations are drawn together."""
    several = len({m.get("conv-id") for m in messages}) > 1
    tags = []
    for m in messages:
        seq = m.get("conv-seq", "?")
        tags.append(f"{str(m.get('conv-id') or '?')[:6]}:{seq}" if several else str(seq))
    return tags


def _title(messages):
    conversations = list(dict.fromkeys(m.get("conv-id") for m in messages))
    if len(conversations) == 1:
        first = min(messages, key=conv_seq)
        return (
            f"conversation {conversations[0]}  protocol={first.get('protocol')} "
            f"op={first.get('op')}  messages={len(messages)}"
        )
    return f"{len(messages)} messages in {len(conversations)} conversations"


def _text_arrow(label, length, rightwards):
    """An arrow of exactly length characters with label in its middle."""
    label = _shorten(label, max(length - 4, 0))
    dashes = length - 1 - len(label)
    left = dashes // 2
    shaft = "-" * left + label + "-" * (dashes - left)
    return shaft + ">" if rightwards else "<" + shaft


def render_text(messages, width=100):
    """The chart as lines of text at most C{width} wide (wider only when there are too many
    participants to fit): one column per participant, one line per message, in the order
    given, each line starting with its conv-seq."""
    if not messages:
        return "(no messages)"
    lanes = Lifelines(messages)
    tags = _tags(messages)
    heading = "conv:seq" if ":" in tags[0] else "seq"
    gutter = max(len(heading), *(len(t) for t in tags)) + 2
    n = len(lanes.columns)
    column = max(_MIN_COLUMN, min(_MAX_COLUMN, (width - gutter) // n))
    xs = [gutter + column // 2 + i * column for i in range(n)]
    line_width = gutter + n * column
    where = dict(zip(lanes.columns, xs))

    def blank():
        row = [" "] * line_width
        for x in xs:
            row[x] = "|"
        return row

    def put(row, x, text):
        row[x : x + len(text)] = text

    header = [" "] * line_width
    put(header, 0, heading.rjust(gutter - 2))
    for key, x in zip(lanes.columns, xs):
        label = _fit_label(lanes.labels[key], column - 1)
        start = max(0, min(x - len(label) // 2, line_width - len(label)))
        put(header, start, label)
    lines = [_title(messages), "".join(header).rstrip(), "".join(blank()).rstrip()]
    for tag, message, (sender, receiver) in zip(tags, messages, lanes.ends):
        row = blank()
        put(row, 0, tag.rjust(gutter - 2))
        a, b = where[sender], where[receiver]
        label = arrow_label(message)
        if a == b:
            # up to the next lifeline, or for the last one up to the full width
            room = (xs[xs.index(a) + 1] - 1 if a != xs[-1] else max(width, line_width)) - a
            put(row, a, ("+-- " + _shorten(label + " (to self)", max(room - 4, 0)))[:room])
        else:
            put(row, min(a, b) + 1, _text_arrow(label, abs(b - a) - 1, b > a))
        lines.append("".join(row).rstrip())
    lines.append("".join(blank()).rstrip())
    return "\n".join(lines)


# -- SVG -----------------------------------------------------------------------------------

_CHAR = 7.2  # width of a 12px monospace character
_ROW = 28
_TOP = 70
_GUTTER = 90
_COLORS = {
    "failure": "#c62828",
    "refuse": "#c62828",
    "agree": "#1565c0",
    "inform_result": "#2e7d32",
}


def render_svg(messages):
    """The chart as a standalone SVG document (a string): a box and a dashed lifeline per
    participant, one labelled arrow per message, in the order given."""
    lanes = Lifelines(messages)
    tags = _tags(messages)
    widest = max(
        [len(label) for label in lanes.names()] + [len(arrow_label(m)) for m in messages] + [10]
    )
    column = max(160, int(widest * _CHAR) + 30)
    n = max(len(lanes.columns), 1)
    width = _GUTTER + n * column
    bottom = _TOP + (len(messages) + 1) * _ROW
    height = bottom + 20
    xs = {key: _GUTTER + column // 2 + i * column for i, key in enumerate(lanes.columns)}
    title = _title(messages) if messages else "no messages"
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="monospace" font-size="12">',
        f"<title>{escape(title)}</title>",
        "<defs>",
        '<marker id="head" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" '
        'markerHeight="8" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z"/></marker>',
        "</defs>",
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="10" y="20" font-weight="bold">{escape(title)}</text>',
    ]
    for key, x in xs.items():
        box = int(len(lanes.labels[key]) * _CHAR) + 16
        out += [
            f'<rect x="{x - box // 2}" y="{_TOP - 34}" width="{box}" height="22" rx="3" '
            'fill="#f5f5f5" stroke="black"/>',
            f'<text x="{x}" y="{_TOP - 19}" text-anchor="middle">'
            f"{escape(lanes.labels[key])}</text>",
            f'<line x1="{x}" y1="{_TOP - 12}" x2="{x}" y2="{bottom}" stroke="#888" '
            'stroke-dasharray="4 4"/>',
        ]
    for i, (tag, message, (sender, receiver)) in enumerate(zip(tags, messages, lanes.ends)):
        y = _TOP + (i + 1) * _ROW
        color = _COLORS.get(message.get("performative"), "black")
        a, b = xs[sender], xs[receiver]
        label = escape(arrow_label(message))
        out.append(f'<text x="10" y="{y + 4}" fill="#555">{escape(tag)}</text>')
        if a == b:
            out += [
                f'<path d="M{a},{y - 8} h30 v16 h-30" fill="none" stroke={quoteattr(color)} '
                'marker-end="url(#head)"/>',
                f'<text x="{a + 36}" y="{y + 4}" fill={quoteattr(color)}>{label}</text>',
            ]
        else:
            out += [
                f'<line x1="{a}" y1="{y}" x2="{b}" y2="{y}" stroke={quoteattr(color)} '
                'marker-end="url(#head)"/>',
                f'<text x="{(a + b) // 2}" y="{y - 5}" text-anchor="middle" '
                f"fill={quoteattr(color)}>{label}</text>",
            ]
    out.append("</svg>")
    return "\n".join(out) + "\n"
