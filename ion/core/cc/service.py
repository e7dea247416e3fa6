"""The container as twistd runs it: a tree of services, built at boot::

    ContainerService     boots once the reactor runs, reports a daemon's start, sets the exit
                         status, stops the reactor on SIGTERM/SIGINT
      WebConsole         (with --web or config ion.core.cc web) the web console, ion.core.cc.web
      TransportService   the broker connection: the boot awaits its connect; closed last
      ProcessesService   on stop, ends the processes no app owns (a shell's, an agent's spawns)
      AppsService        starts the apps in dependency order; stops them in reverse

Children start in this order and stop in reverse, each once the one after it has stopped
(L{MultiService} would stop them all at once: the connection would close under the apps). A
C{Container} without twistd (tests, the C{ion} command line) does the same in C{start}/C{stop}.
"""

import atexit
import os
import signal
import sys

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.logger import ILogObserver, Logger, LoggingFile, LogLevel

import ion
from ion.core import log as ionlog
from ion.core.app.appfile import AppFileError
from ion.core.cc import heap

log = Logger()

CORE_APPS = ["ioncore", "ccagent"]


def _expected_cause(error):
    """The bad input or unreachable broker behind a failed start (through the supervisors that
    could not start a child), or None when it looks like a bug."""
    from ion.core.messaging.transport import TransportError
    from ion.core.process.statedir import EnvironmentFailure
    from ion.core.process.supervisor import ChildStartError

    while isinstance(error, ChildStartError):
        error = error.__cause__
    if isinstance(error, (ValueError, AppFileError, TransportError, EnvironmentFailure)):
        return error
    return None


class LogOutput:
    """Where the container's log lines go: stdout, a file, or above the shell's prompt."""

    def __init__(self, stream):
        self.stream = stream
        self.divert = None

    def write(self, text):
        if self.divert is not None:
            self.divert(text)
        else:
            self.stream.write(text)
            self.stream.flush()

    def flush(self):
        if self.divert is None:
            self.stream.flush()


class ContainerService(MultiService):
    """Boots a Container after the reactor runs, as the children below it, and stops them on
    shutdown, the last started first."""

    def __init__(self, options, reactor):
        super().__init__()
        self.options = options
        self.reactor = reactor
        self.container = None
        self.exit_code = 0
        self.output = LogOutput(sys.stdout)
        self._logfile = None
        self._stop_requested = False
        self.memory_broker = None
        self._twistd = getattr(options, "parent", None) or {}
        self._caller_stderr = None
        self._status_pipe = None

    @property
    def daemon(self):
        """Whether twistd runs us as a daemon (no C{-n}/C{--nodaemon})."""
        return "nodaemon" in self._twistd and not self._twistd["nodaemon"]

    def setServiceParent(self, parent):
        super().setServiceParent(parent)
        # twistd asks the application for a log observer before it starts logging: ours filters
        # by the per-module levels of res/config/loglevels.cfg and redacts passwords.
        if hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.log_observer())
        if self.daemon:
            # Still in the process the caller started: keep its stderr for the one line that
            # says why a boot failed (the daemon's own stderr is /dev/null).
            self._caller_stderr = os.dup(2)

    def log_observer(self):
        from ion.core.cc.tap import fail_input  # bad twistd options, found here

        logfile = self._twistd.get("logfile")
        if self.daemon and logfile == "-":
            fail_input("--logfile -: a daemon cannot log to stdout; name a file or run twistd -n")
        if self.daemon and not logfile:
            logfile = "twistd.log"  # twistd's own default for a daemon
        if logfile and logfile != "-":
            from twisted.python.logfile import LogFile

            try:
                self._logfile = LogFile.fromFullPath(logfile)
            except OSError as e:
                fail_input(f"--logfile {logfile}: {e.strerror}")
            self.output = LogOutput(self._logfile)
        return ionlog.make_observer(self.output, self.options["levels"])

    def startService(self):
        super().startService()
        # A daemon: twistd's parent process, the `twistd` command the caller waits for, exits
        # when the daemon writes to twistd's status pipe, which twistd does itself right after
        # this method returns, before the reactor runs and so before the boot. Taking the pipe
        # from twistd's options here makes twistd skip its report; ours follows the boot
        # (`_report_start`, at exit after a failed boot), so a failed boot makes `twistd`
        # exit 1.
        self._status_pipe = self._twistd.get("statusPipe")
        if self._status_pipe is not None:
            self._twistd["statusPipe"] = None
        self.reactor.callWhenRunning(self._install_signal_handlers)
        self.reactor.callWhenRunning(self._boot)

    def _report_start(self, code=0, why=None):
        """Tell the caller of a daemon how the boot went, once: the reason on its stderr, then
        twistd's status pipe ("0" lets C{twistd} exit 0; anything else makes it exit 1 and
        print the text after the first two bytes)."""
        stderr, self._caller_stderr = self._caller_stderr, None
        pipe, self._status_pipe = self._status_pipe, None
        if stderr is not None:
            if why is not None:
                _write_all(stderr, f"cc: container failed to start: {why}\n")
            os.close(stderr)
        if pipe is not None:
            kind = " (bad input)" if code == 2 else ""
            status = "0" if code == 0 else f"1 container failed to start, status {code}{kind}"
            _write_all(pipe, status)
            os.close(pipe)

    def _install_signal_handlers(self):
        # A container stopped by SIGTERM/SIGINT has done its job: stop gracefully and exit 0.
        # twistd's own handlers get this wrong for us: the reactor records the signal and,
        # after shutdown, twistd.runApp re-sends it to the process (app._exitWithSignal), so
        # the exit status would be that of a killed process, not 0.
        def stop(signum, frame):
            log.info("{signal}: stopping the container", signal=signal.Signals(signum).name)
            self.reactor.callFromThread(self._stop_reactor)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        if self._logfile is not None:
            # Log rotation (logrotate, newsyslog): the file was moved away, SIGUSR1 opens a new
            # one at the configured path. twistd's own SIGUSR1 handler serves only its logger.
            def reopen(signum, frame):
                self.reactor.callFromThread(self._logfile.reopen)

            signal.signal(signal.SIGUSR1, reopen)

    def _stop_reactor(self):
        """Stop the reactor once: a second signal (Ctrl-C pressed again, a supervisor's
        repeated SIGTERM) or a failed boot during the shutdown changes nothing."""
        if self._stop_requested:
            return
        self._stop_requested = True
        if self.reactor.running:
            self.reactor.stop()

    def _boot(self):
        d = defer.Deferred.fromCoroutine(self.boot())
        d.addCallbacks(lambda _: heap.settle(), self._boot_failed)

    async def boot(self):
        """Build the tree, awaiting each child as it is added, then open the shell (a tty)."""
        opts = self.options
        self.container = self._make_container()
        if opts.get("web_console"):
            self._start_console(*opts["web_console"])
        transport = TransportService(self.container, opts["broker_retry"])
        transport.setServiceParent(self)
        await transport.connected
        if not self.running:  # stopped (a signal) while connecting
            return
        ProcessesService(self.container).setServiceParent(self)
        apps = AppsService(self.container, CORE_APPS + opts["files"])
        apps.setServiceParent(self)
        await apps.started
        if not self.running:
            return
        log.info("container {id} running apps: {apps}", id=self.container.id,
                 apps=", ".join(self.container.apps.running))
        self._report_start()
        if not opts["no-shell"] and os.isatty(0) and os.isatty(1):
            from ion.core.cc.shell import start_shell

            done = start_shell(self.container, self.reactor, self.output)
            done.addCallback(lambda _: self._stop_reactor())

    def _start_console(self, host, port, token, explicit):
        """The web console (first: a port given and taken fails the boot before anything
        starts; the default port taken leaves the container without a console)."""
        from twisted.internet.error import CannotListenError

        from ion.core.cc.web import WebConsole

        console = WebConsole(self.container, self.reactor, host, port, token)
        try:
            console.setServiceParent(self)
        except CannotListenError as e:
            console.disownServiceParent()
            why = f"web console: cannot listen on {host}:{port}: {e.socketError}"
            if explicit:
                raise ValueError(why) from None
            log.warn("{why}; running without it", why=why)

    def _make_container(self):
        """The Container of the options, with the embedded broker of a memory:// URL."""
        from ion.core.cc.container import Container, check_broker_url, make_transport

        opts = self.options
        if check_broker_url(opts["broker_url"]) == "memory":
            from ion.core.messaging.memory import MemoryBroker

            record = opts["config"].get("ion.core.messaging", "memory_run_record", None)
            self.memory_broker = MemoryBroker(run_record=record)
            if self.memory_broker.lost_messages:
                log.warn(
                    "the embedded broker's previous run ended with messages still queued "
                    "(stopped with a backlog, or killed): they are gone; processes that "
                    "depend on them recover now (polls announce their files again)"
                )
        transport = make_transport(
            opts["broker_url"], self.reactor, self.memory_broker, **opts["broker_tls"]
        )
        container = Container(
            opts["config"],
            self.reactor,
            transport,
            sysname=opts["sysname"],
            res_dir=opts["res"],
        )
        container.apps.apparg = opts["apparg"]
        container.broker_url = opts["broker_url"]
        container.broker_tls = dict(opts["broker_tls"])
        log.info(
            "ION {version}: container {id}, broker {url}, sysname {sysname}",
            version=ion.__version__,
            id=container.id,
            url=ionlog.redact(opts["broker_url"]),
            sysname=opts["sysname"],
        )
        return container

    def _boot_failed(self, failure):
        cause = _expected_cause(failure.value)
        code = 2 if isinstance(cause, (ValueError, AppFileError)) else 1
        why = ionlog.redact(str(failure.value))
        self.exit_code = code
        if cause is None:  # a bug: its traceback helps
            log.failure("container failed to start", failure, level=LogLevel.critical)
        elif not isinstance(sys.stderr, LoggingFile):
            # Else twistd sends stderr to the log: the line below is the log's record of it.
            log.critical("container failed to start: {why}", why=why)
        sys.stderr.write(f"cc: container failed to start: {why}\n")

        # twistd has no way to set the exit status; this runs after twistd has cleaned up (the
        # pid file is gone), and only then is a daemon's caller told: it may start again.
        def leave():
            self._report_start(code, why)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

        atexit.register(leave)
        self._stop_reactor()

    def stopService(self):
        Service.stopService(self)
        if self._status_pipe is not None and not self.exit_code:  # a signal during the boot
            atexit.register(self._report_start, 1, "stopped before it finished starting")
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self):
        for child in reversed(list(self)):
            try:
                await defer.maybeDeferred(child.stopService)
            except Exception:
                log.failure("{child} failed to stop", child=type(child).__name__)
        if self.memory_broker is not None:
            left = self.memory_broker.record_stop()
            if left:
                log.warn(
                    "{n} messages still queued die with the embedded broker; the next start "
                    "recovers them where it can (polls announce their files again)",
                    n=left,
                )


class TransportService(Service):
    """The container's broker connection. Started, it connects (C{connected} fires once the
    container can send and receive); stopped, the last container of the system removes the
    system's exchanges and the connection closes. A connect still under way when it stops is
    left to end with the reactor."""

    def __init__(self, container, retry=0):
        self.container = container
        self.retry = retry  # seconds to keep trying an unreachable broker (Container.start)
        self.connected = None

    def startService(self):
        super().startService()
        self.connected = defer.Deferred.fromCoroutine(self.container.start(self.retry))

    def stopService(self):
        super().stopService()
        if not self.container.running:
            return defer.succeed(None)
        return defer.Deferred.fromCoroutine(self.container.close_connection())


class ProcessesService(Service):
    """Stopped, it terminates the processes still running once the apps have stopped."""

    def __init__(self, container):
        self.container = container

    def stopService(self):
        super().stopService()
        return defer.Deferred.fromCoroutine(self.container.stop_processes())


class AppsService(Service):
    """The application controller: started, it starts C{files} (apps and releases) in
    dependency order (C{started} fires once they run); stopped, it stops them in reverse."""

    def __init__(self, container, files):
        self.container = container
        self.files = files
        self.started = None

    def startService(self):
        super().startService()
        self.started = defer.Deferred.fromCoroutine(self.container.apps.start_files(self.files))

    def stopService(self):
        super().stopService()
        return defer.Deferred.fromCoroutine(self.container.apps.stop_all())


def _write_all(fd, text):
    """Write text to fd; a caller gone meanwhile (a closed pipe) is no error of ours."""
    data = text.encode("utf-8", "backslashreplace")
    try:
        while data:
            data = data[os.write(fd, data) :]
    except OSError:
        pass


