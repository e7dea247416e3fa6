"""The web console: a container's processes, pump and conversations in a browser, and /metrics.

L{WebConsole} is a child service of the container (L{ion.core.cc.service}), on twisted.web in
the container's own process. Pages (live: they ask the JSON API every 2 s)::

    /                 overview: the containers of the system, apps, the supervision tree
    /pump             files/s and bytes/s over the last hour, queues, reports by code, the
                      last 50 failures, retry queues, transfers under way
    /conversations    open and recent conversations; the observer's chart of one
    /api/status  /api/processes  /api/pump  /api/conversations
    /api/conversations/<id>/msc.svg     the observer's chart (res/apps/observer.app)
    /metrics          Prometheus text format (L{ion.core.metrics})

The data come from the core process (its L{ion.core.cc.status.Sampler}) and, over rpc, from the
container agent and the observer: the console imports no app. Nothing is loaded from outside
the console (no CDN). Bound to anything but loopback, every request needs the token (the
password of the line C{http://console:TOKEN@HOST:PORT/} of the credentials file) as
C{Authorization: Bearer TOKEN} or C{?token=TOKEN}. Without a token, on loopback, a request
must name the console's own host (C{127.0.0.1}, C{localhost}, C{[::1]}): a web page a browser
opened elsewhere cannot read the console through a host name of its own (DNS rebinding).
Everything is read-only.
"""

import hmac
import json
import re

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server

from ion.core.cc.coreapp import ContainerProcess
from ion.core.cc.status import process_tree

log = Logger()

CONV_ID = re.compile(r"[0-9a-f]{1,64}")
HEADERS = {
    b"content-security-policy": b"default-src 'self'; style-src 'self' 'unsafe-inline'",
    b"x-content-type-options": b"nosniff",
    b"cache-control": b"no-store",
}


class WebConsole(Service):
    """Serves the console of C{container} on C{host}:C{port} while running. C{token}: required
    of every request (None: none, for loopback)."""

    def __init__(self, container, reactor, host, port, token=None):
        self.container = container
        self.reactor = reactor
        self.host, self.port, self.token = host, port, token
        self.listening = None

    def startService(self):
        """Listen (CannotListenError when the port is taken)."""
        site = server.Site(_Root(self))
        site.displayTracebacks = False
        site.noisy = False
        self.listening = self.reactor.listenTCP(self.port, site, interface=self.host)
        self.port = self.listening.getHost().port
        super().startService()
        log.info("web console on http://{host}:{port}/", host=self.host, port=self.port)

    def stopService(self):
        super().stopService()
        if self.listening is not None:
            return self.listening.stopListening()

    def core(self):
        """The container's core process (it samples and makes the calls), or None."""
        return next((p for p in self.container.registry
                     if isinstance(p, ContainerProcess) and not p.lifecycle.final), None)

    async def api(self, path):
        """The JSON document (or SVG text) of an API path; LookupError when there is none."""
        core = self.core()
        if core is None:
            raise _Unavailable("the container is not running (yet)")
        if path == ["status"]:
            status = core.sampler.status()
            try:
                status["containers"] = await core.rpc("ccagent", "containers", timeout=5)
            except Exception as e:
                status["containers"] = None
                status["containers_error"] = str(e)
            return status
        if path == ["processes"]:
            return process_tree(self.container)
        if path == ["pump"]:
            return core.sampler.pump()
        if path == ["conversations"]:
            return await self.conversations(core)
        if len(path) == 3 and path[0] == "conversations" and path[2] == "msc.svg":
            if not CONV_ID.fullmatch(path[1]):
                raise LookupError("no such conversation")
            return await core.rpc("observer", "svg", {"conv_id": path[1]}, timeout=5)
        raise LookupError("no such page")

    async def conversations(self, core):
        """Open and recently finished conversations of this container's processes, and the
        conversations the observer kept (None when no observer runs)."""
        rows = {"open": [], "recent": []}
        for proc in self.container.registry:
            table = proc.conversations
            for kind, convs in (("open", table.open.values()), ("recent", table.recent)):
                rows[kind] += [{"conv_id": c.conv_id, "process": proc.name, "role": c.role,
                                "protocol": c.protocol, "op": c.op, "peer": c.peer,
                                "state": c.state} for c in convs]
        rows["recent"] = rows["recent"][-50:]
        try:
            rows["observed"] = (await core.rpc("observer", "conversations", {"last": 50},
                                               timeout=5))[::-1]
        except Exception as e:
            rows["observed"], rows["observer_error"] = None, str(e)
        return rows

    def allowed(self, request):
        if self.token is None:
            host = (request.getHeader(b"host") or b"").decode("latin-1").lower()
            return host.rsplit(":", 1)[0] in ("127.0.0.1", "localhost", "[::1]", self.host)
        given = request.args.get(b"token", [b""])[0]
        header = request.getHeader(b"authorization") or b""
        if header.startswith(b"Bearer "):
            given = header[7:]
        return hmac.compare_digest(given, self.token.encode())


class _Unavailable(Exception):
    pass


class _Root(resource.Resource):
    isLeaf = True

    def __init__(self, console):
        super().__init__()
        self.console = console

    def render(self, request):
        for name, value in HEADERS.items():
            request.setHeader(name, value)
        if not self.console.allowed(request):
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", b"Bearer")
            return b"a token is needed (?token= or Authorization: Bearer)\n"
        path = [p.decode("utf-8", "replace") for p in request.postpath if p]
        if path == ["metrics"]:
            return self._metrics(request)
        if path and path[0] == "api":
            d = defer.Deferred.fromCoroutine(self.console.api(path[1:]))
            d.addCallbacks(self._answer, self._failed, [request], None, [request])
            request.notifyFinish().addErrback(lambda _: None)
            return server.NOT_DONE_YET
        if path == ["console.js"]:
            request.setHeader(b"content-type", b"text/javascript; charset=utf-8")
            return SCRIPT.encode()
        if path in ([], ["pump"], ["conversations"]):
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            return PAGE.format(page=(path or ["overview"])[0]).encode()
        request.setResponseCode(404)
        return b"no such page\n"

    def _metrics(self, request):
        from prometheus_client import CollectorRegistry
        from prometheus_client.exposition import generate_latest

        from ion.core.metrics import MetricsCollector

        registry = CollectorRegistry(auto_describe=False)
        registry.register(MetricsCollector(self.console.container.metrics,
                                           self.console.container.id))
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        return generate_latest(registry)

    def _answer(self, result, request):
        if isinstance(result, str) and result.startswith("<svg"):
            request.setHeader(b"content-type", b"image/svg+xml")
            request.setHeader(b"content-security-policy", b"default-src 'none'; style-src "
                              b"'unsafe-inline'")
            body = result.encode()
        else:
            request.setHeader(b"content-type", b"application/json")
            body = json.dumps(result, default=str).encode()
        self._finish(request, body)

    def _failed(self, failure, request):
        from ion.core.process import RemoteError

        code = 503
        if failure.check(LookupError) or getattr(failure.value, "code", None) == 404:
            code = 404
        elif not failure.check(_Unavailable, RemoteError):
            log.debug("web console: {error}", error=failure.value)
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        self._finish(request, json.dumps({"error": str(failure.value)}).encode())

    @staticmethod
    def _finish(request, body):
        if not request.finished and not request._disconnected:
            request.write(body)
            request.finish()


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>ION console</title>
<style>
body {{ font: 14px sans-serif; margin: 0; color: #222; }}
nav {{ background: #234; padding: 8px 16px; }} nav a {{ color: #fff; margin-right: 16px; }}
main {{ padding: 8px 16px; }} h2 {{ font-size: 16px; margin: 16px 0 4px; }}
table {{ border-collapse: collapse; }} td, th {{ padding: 2px 10px 2px 0; text-align: left; }}
th {{ border-bottom: 1px solid #999; }} .num {{ text-align: right; }}
.FAILED, .bad {{ color: #b00; }} .ACTIVE {{ color: #070; }} svg.plot {{ background: #f6f6f6; }}
#updated {{ color: #777; font-size: 12px; }}
</style></head>
<body data-page="{page}">
<nav><a href="/">overview</a><a href="/pump">pump</a><a href="/conversations">conversations</a>
<span id="updated"></span></nav>
<main id="main">loading...</main>
<script src="/console.js"></script>
</body></html>
"""

SCRIPT = r"""
"use strict";
const token = new URLSearchParams(location.search).get("token");
const q = token ? "?token=" + encodeURIComponent(token) : "";
for (const a of document.querySelectorAll("nav a")) a.href += q;
const page = document.body.dataset.page;

function el(tag, props, ...kids) {
  const e = document.createElement(tag);
  Object.assign(e, props || {});
  for (const k of kids) e.append(k instanceof Node ? k : String(k ?? ""));
  return e;
}
function table(head, rows, id) {
  return el("table", {id: id || ""}, el("tr", {}, ...head.map(h => el("th", {}, h))),
            ...rows.map(r => el("tr", {}, ...r.map(c => c instanceof Node ? el("td", {}, c)
              : el("td", {className: typeof c === "number" ? "num" : ""}, c)))));
}
function rate(v, unit) {
  if (v === null || v === undefined) return "-";
  for (const p of ["", "k", "M", "G"]) {
    if (v < 1000 || p === "G") return (v.toFixed(1) + " " + p + unit).trim();
    v /= 1000;
  }
}
function age(s) { return s < 120 ? Math.round(s) + " s" : Math.round(s / 60) + " min"; }
function plot(points, title, unit) {
  const ns = "http://www.w3.org/2000/svg", w = 600, h = 120;
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "plot");
  svg.setAttribute("width", w);
  svg.setAttribute("height", h + 20);
  const max = Math.max(1e-9, ...points.map(p => p[1]));
  const t0 = points.length ? points[0][0] : 0;
  const t1 = points.length ? points[points.length - 1][0] : 1;
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("fill", "none"); line.setAttribute("stroke", "#25a");
  line.setAttribute("points", points.map(p => ((p[0] - t0) / Math.max(t1 - t0, 1) * w).toFixed(1)
    + "," + (h + 10 - p[1] / max * h).toFixed(1)).join(" "));
  const label = document.createElementNS(ns, "text");
  label.setAttribute("x", 4); label.setAttribute("y", 14);
  label.textContent = title + " (max " + rate(max, unit) + ", last hour)";
  svg.append(line, label);
  return svg;
}

const render = {
  async overview(main) {
    const s = await api("status");
    const c = s.container;
    main.append(el("h2", {}, "Containers"));
    main.append(s.containers ? table(["container", "host", "pid", "uptime", "apps"],
      s.containers.map(p => [p.container, p.host, p.os_pid, age(p.uptime || 0),
                             (p.apps || []).join(", ")]), "containers")
      : el("p", {}, "this container only: " + c.id));
    main.append(el("h2", {}, "Container " + c.id), el("p", {},
      "system " + c.sysname + ", up " + age(c.uptime) + ", apps: " + c.apps.join(", ")
      + ", " + c.processes + " processes, " + c.restarts + " restarts"));
    main.append(el("h2", {}, "Supervision tree"));
    main.append(table(["name", "pid", "class", "state", "restarts", "app"], s.processes.map(p =>
      [el("span", {style: "padding-left:" + 16 * p.depth + "px", className: "proc"}, p.name), p.pid,
       p["class"], el("span", {className: p.state}, p.state), p.restarts, p.app || ""]), "tree"));
    main.append(el("h2", {}, "Workers"), workers(s.workers));
  },
  async pump(main) {
    const p = await api("pump");
    const done = p.workers.filter(w => w.kind === "Consumer").reduce((n, w) => n + w.done, 0);
    main.append(el("h2", {}, "Delivered: ", el("span", {id: "delivered"}, done),
                   ", retrying: ", el("span", {id: "retrying"}, p.retrying)));
    main.append(plot(p.history.map(h => [h[0], h[1]]), "files/s", "files/s"), el("br"),
                plot(p.history.map(h => [h[0], h[2]]), "bytes/s", "B/s"));
    main.append(el("h2", {}, "Workers"), workers(p.workers));
    main.append(el("h2", {}, "Reports by code"),
                table(["code", "reports"], Object.entries(p.reports), "reports"));
    main.append(el("h2", {}, "Transfers under way"), table(["file", "received", "size", "process"],
      p.transfers.map(t => [t.file, t.received, t.size ?? "?", t.process])));
    main.append(el("h2", {}, "Last failures"), table(["when", "code", "file", "reason", "process"],
      p.failures.slice().reverse().map(f => [new Date(f.time * 1000).toISOString(), f.code,
                                             f.file ?? "", f.reason, f.process]), "failures"));
  },
  async conversations(main) {
    const c = await api("conversations");
    const row = v => [v.conv_id, v.process, v.role, v.protocol, v.op, v.peer, v.state];
    const head = ["conversation", "process", "role", "protocol", "op", "peer", "state"];
    const observed = c.observed || [];
    // By default the newest finished conversation that is not the console's own asking.
    const shown = observed.find(o => o.messages > 1 && !["conversations", "svg"].includes(o.op));
    const id = location.hash.slice(1) || (shown ? shown.conv_id : "");
    if (/^[0-9a-f]+$/.test(id)) main.append(el("h2", {}, "Chart of " + id),
      el("img", {src: "/api/conversations/" + id + "/msc.svg" + q, alt: "chart of " + id}));
    main.append(el("h2", {}, "Observed (newest first)"));
    if (!c.observed) main.append(el("p", {}, "no observer: start res/apps/observer.app"));
    else main.append(table(["conversation", "protocol", "op", "participants", "final", "messages"],
      observed.slice(0, 20).map(o => [el("a", {href: "#" + o.conv_id}, o.conv_id), o.protocol, o.op,
        (o.participants || []).join(", "), o.final, o.messages]), "observed"));
    main.append(el("h2", {}, "Open here"), table(head, c.open.map(row), "open"));
    main.append(el("h2", {}, "Recent here"), table(head, c.recent.slice(-20).map(row), "recent"));
  },
};
function workers(rows) {
  const head = ["name", "kind", "state", "restarts", "queued", "files/s", "bytes/s", "done",
                "failed", "last error"];
  return table(head, rows.map(w => [w.name, w.kind, el("span", {className: w.state}, w.state),
      w.restarts, w.queued ?? "-",
      rate(w.files_per_s, ""), rate(w.bytes_per_s, "B"), w.done, w.failed,
      w.last_error ? w.last_error.code + " " + w.last_error.reason + " ("
        + age(w.last_error.age) + " ago)" : ""]), "workers");
}
async function api(path) {
  const r = await fetch("/api/" + path + q);
  if (!r.ok) throw new Error(path + ": " + r.status + " " + (await r.text()));
  return r.json();
}
async function refresh() {
  const main = el("main", {id: "main"});
  try {
    await render[page](main);
  } catch (e) {
    main.append(el("p", {className: "bad"}, String(e)));
  }
  document.getElementById("main").replaceWith(main);
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
}
window.addEventListener("hashchange", refresh);
refresh();
setInterval(refresh, 2000);
"""
