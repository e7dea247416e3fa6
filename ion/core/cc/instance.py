"""C{python -m ion.core.cc.instance}: the OS process of one instance (see
L{ion.core.process.instances}, which starts it).

Reads one line from stdin, a Python literal (read with C{ast.literal_eval}) with C{broker_url},
C{broker_tls}, C{sysname}, C{config} (the container's config layers), C{res_dir}, C{container_id},
C{spec}, C{name} and C{args}; starts a container on that broker, spawns the process, and writes
C{READY <class>} to stdout. It stops (the process, then the container, exit status 0) when stdin
reaches end-of-file -- the parent closed it or died -- or on SIGTERM (SIGINT is ignored: a Ctrl-C
reaches the container, which stops its instances); it exits 1 when the process ends by itself, and 2
when it could not start it for bad input (bad args, a state directory in use), with one line on
stderr. Log lines go to stderr, filtered by the levels of C{res_dir}, for the parent to relay.
"""

import ast
import signal
import sys

from twisted.internet import defer, error, protocol, stdio
from twisted.logger import Logger, globalLogBeginner

from ion.core.cc import heap

log = Logger()


class _Watch(protocol.Protocol):
    """Stdin: its end is the signal to stop."""

    def __init__(self):
        self.closed = defer.Deferred()

    def dataReceived(self, data):
        pass

    def connectionLost(self, reason=None):
        if not self.closed.called:
            self.closed.callback(None)


async def run(reactor, launch):
    from ion.core import log as ionlog
    from ion.core.cc.container import Container, make_transport
    from ion.core.config import Config

    res_dir = launch["res_dir"]
    globalLogBeginner.beginLoggingTo(
        [ionlog.make_observer(sys.stderr, ionlog.load_levels(res_dir))],
        redirectStandardIO=False,
    )
    config = Config()
    for name, mapping in launch["config"]:
        config.add_layer(name, mapping)
    transport = make_transport(launch["broker_url"], reactor, **launch["broker_tls"])
    container = Container(config, reactor, transport, container_id=launch["container_id"],
                          sysname=launch["sysname"], res_dir=res_dir)
    container.broker_url = launch["broker_url"]
    container.broker_tls = dict(launch["broker_tls"])
    watch = _Watch()
    stdio.StandardIO(watch, reactor=reactor)
    stop = defer.Deferred()
    finished = defer.Deferred()
    watch.closed.addCallback(lambda _: stop.called or stop.callback("stop"))

    def shutting_down():
        # SIGTERM/SIGINT: the reactor waits for the process and the container to stop.
        if not stop.called:
            stop.callback("signal")
        return finished

    reactor.addSystemEventTrigger("before", "shutdown", shutting_down)
    try:
        return await _serve(container, launch, watch, stop)
    finally:
        finished.callback(None)


async def _serve(container, launch, watch, stop):
    from ion.core.process.statedir import expected

    try:
        await container.start()
        proc = await container.spawn(launch["spec"], name=launch["name"], args=launch["args"])
    except Exception as e:
        cause = e.__cause__ if e.__cause__ is not None else e
        line = None
        if expected(e) or expected(cause):
            line = f"{launch['name']}: {e}\n"
            code = 2 if isinstance(e, ValueError) or getattr(e, "bad_input", False) else 1
        else:
            log.failure("{name}: could not start", name=launch["name"])
            code = 1
        await container.stop()
        if line is not None:  # last: the parent takes the last line of stderr for the reason
            sys.stderr.write(line)
            sys.stderr.flush()
        return code
    proc.add_exit_observer(lambda p: stop.called or stop.callback("ended"))
    heap.settle()
    watch.transport.write(f"READY {type(proc).__name__}\n".encode())
    why = await stop
    if why == "ended":
        log.error("{name}: its process ended ({state})", name=launch["name"], state=proc.state)
        await container.stop()
        return 1
    if not proc.lifecycle.final:
        await proc.terminate()
    await container.stop()
    return 0


def main():
    line = sys.stdin.buffer.readline()
    try:
        launch = ast.literal_eval(line.decode("utf-8"))
        launch["spec"], launch["name"], launch["args"]
    except (ValueError, SyntaxError, KeyError, TypeError):
        sys.stderr.write("ion.core.cc.instance: expected one launch line on stdin\n")
        raise SystemExit(2)
    from ion.core import lazytls

    lazytls.defer()  # before the reactor's import (see ion.core.lazytls)
    from twisted.internet import reactor

    code = [1]

    def go():
        d = defer.ensureDeferred(run(reactor, launch))
        d.addCallbacks(lambda result: code.__setitem__(0, result),
                       lambda f: log.failure("{name}: failed", f, name=launch["name"]))
        d.addBoth(lambda _: reactor.running and _stop(reactor))

    reactor.callWhenRunning(go)
    # Its container decides when it stops (the pipe): a Ctrl-C meant for the container's
    # terminal, sent to the whole process group, must not end it behind the supervisor's
    # back. SIGTERM (someone asking this process) stops it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(_stop, reactor))
    reactor.run(installSignalHandlers=False)
    sys.exit(code[0])


def _stop(reactor):
    try:
        reactor.stop()
    except error.ReactorNotRunning:  # already stopping (a signal)
        pass


if __name__ == "__main__":
    main()
