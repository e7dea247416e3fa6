"""C{twistd -n cc [options] [app and rel files]}: command line options and the container service.

Bad input (a missing or malformed .app/.rel/config file, a bad -D) is one line on stderr and
exit status 2; nothing starts. The container boots once the reactor runs: transport, the core
app, then the given apps in dependency order. A failed boot is logged and the process exits
with status 1. SIGTERM/SIGINT (and Ctrl-D in the shell) stop apps in reverse order.

Without twistd's C{-n} the container runs as a daemon: the log goes to C{--logfile} (default
twistd.log), SIGUSR1 reopens it, and the C{twistd} command returns only once the boot is over
(see L{ContainerService.startService}).
"""

import ast
import atexit
import os
import signal
import sys

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.python import usage

import ion
from ion.core import log as ionlog
from ion.core.app.appfile import AppFileError
from ion.core.app.controller import AppController
from ion.core.config import Config, ConfigError, parse_define
from ion.core.credentials import DEFAULT_CREDENTIALS

log = Logger()

CORE_APPS = ["ioncore", "ccagent"]


def _expected_cause(error):
    """The bad input or unreachable broker behind a failed start (through the supervisors that
    could not start a child), or None when it looks like a bug."""
    from ion.core.messaging.transport import TransportError
    from ion.core.process.supervisor import ChildStartError

    while isinstance(error, ChildStartError):
        error = error.__cause__
    if isinstance(error, (ValueError, AppFileError, TransportError)):
        return error
    return None


def find_res_dir():
    """C{./res} when run from a checkout (the README's way), else the res/ shipped with ION:
    C{ion/_res} of an installed package, or the checkout's res/ beside an editable one."""
    if os.path.isfile(os.path.join("res", "config", "ion.config")):
        return "res"
    package = os.path.dirname(os.path.abspath(ion.__file__))
    shipped = os.path.join(package, "_res")
    if os.path.isdir(shipped):
        return shipped
    return os.path.join(os.path.dirname(package), "res")


def parse_args_option(text):
    """C{-a k=v,k2=v2} or C{-a "{'k': v}"} -> dict; values are literals when they parse."""
    text = text.strip()
    if text.startswith("{"):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError) as e:
            raise usage.UsageError(f"-a/--args: not a dict literal: {e}") from None
        if not isinstance(value, dict):
            raise usage.UsageError("-a/--args: not a dict literal")
        return value
    result = {}
    parts = text.split(",")
    i = 0
    while i < len(parts):
        if not parts[i].strip():
            i += 1
            continue
        key, sep, raw = parts[i].partition("=")
        if not sep or not key.strip():
            raise usage.UsageError(f"-a/--args: expected key=value, got {parts[i]!r}")
        i += 1
        # a value may itself hold commas ([1, 2], {'a': 1, 'b': 2}): take more parts until
        # its brackets and quotes are closed
        while i < len(parts) and _open_brackets(raw):
            raw += "," + parts[i]
            i += 1
        try:
            result[key.strip()] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            result[key.strip()] = raw
    return result


def _open_brackets(text):
    depth, quote = 0, None
    for ch in text:
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
    return depth > 0 or quote is not None


def fail_input(message):
    """Bad input: one line on stderr, exit status 2, no traceback."""
    sys.stderr.write(f"cc: {ionlog.redact(str(message))}\n")
    sys.stderr.flush()
    raise SystemExit(2)


class Options(usage.Options):
    synopsis = "[options] [app and rel files]"
    longdesc = (
        "Start an ION capability container running the given .app/.rel files (looked up by "
        "path, or by name in res/apps and res/deploy). With a tty on stdin and no --no-shell, "
        "an interactive shell opens."
    )
    optFlags = [["no-shell", "n", "Do not open the interactive shell."]]
    optParameters = [
        ["broker", None, None, "Broker URL: memory:// (default, in-process), amqp://user@host:port/vhost, amqps://..."],
        ["broker-host", "h", None, "Broker host (amqp)."],
        ["broker-port", "p", None, "Broker port (amqp).", int],
        ["broker-vhost", None, None, "Broker virtual host (amqp)."],
        ["broker-user", None, None, "Broker user (amqp)."],
        ["broker-ca", None, None, "amqps://: PEM file of the CA certificates trusted for the broker "
         "(default: config ion.core.messaging broker_ca, else the system's)."],
        ["broker-cert", None, None, "amqps://: PEM client certificate (with --broker-key); the login is "
         "then EXTERNAL, as the user the broker reads from it (its CN, unless the URL names the user)."],
        ["broker-key", None, None, "amqps://: the unencrypted PEM private key of --broker-cert, "
         "readable by its owner only (mode 0600)."],
        ["credentials", None, None, "The credentials file, read for a broker URL with a user and no password "
         "(default ~/.config/ion/credentials.conf when it exists; the pump reads its server logins there "
         "too): broker lines amqp[s]://user:password@host[:port]/, readable by its owner only."],
        ["sysname", "s", None, "System name: containers with the same sysname on one broker form one system."],
        ["args", "a", None, "Container args: k=v,k=v or a dict literal; apparg_<app>={...} sets an app's kwargs."],
        ["res", None, None, "The res/ directory (default ./res, else the one shipped with ION)."],
    ]

    def __init__(self):
        super().__init__()
        self["defines"] = []
        self["files"] = []
        self["container_args"] = {}

    def opt_version(self):
        """Print the ION version and exit."""
        print(f"ION {ion.__version__}")
        sys.exit(0)

    def opt_define(self, text):
        """Override config: module:key=value (repeatable)."""
        try:
            self["defines"].append(parse_define(text))
        except ValueError as e:
            fail_input(f"-D/--define: {e}")

    opt_D = opt_define

    def parseArgs(self, *files):
        self["files"] = list(files)

    def postOptions(self):
        if self["args"]:
            self["container_args"] = parse_args_option(self["args"])
        res = self["res"] or find_res_dir()
        self["res"] = res
        try:
            config = Config.load(res)
            for module, key, value in self["defines"]:
                config.define(module, key, value)
            levels = ionlog.load_levels(res)
        except (ConfigError, ValueError) as e:
            fail_input(e)
        self["config"] = config
        self["levels"] = levels
        cargs = self["container_args"]
        self["sysname"] = self["sysname"] or cargs.get("sysname") or config.get(
            "ion.core.messaging", "sysname", "ion"
        )
        from ion.core.cc.container import check_broker_url

        try:
            self["broker_url"] = self._with_password(self._broker_url(config))
            check_broker_url(self["broker_url"])
            self["broker_tls"] = broker_tls(
                self["broker_url"], self["broker-ca"], self["broker-cert"], self["broker-key"],
                config,
            )
        except ValueError as e:
            fail_input(e)
        apparg = {k[len("apparg_") :]: v for k, v in cargs.items() if k.startswith("apparg_")}
        self["apparg"] = apparg
        try:
            AppController(_PlanContext(config, res), apparg).plan(CORE_APPS + self["files"])
        except AppFileError as e:
            fail_input(e)

    def _broker_url(self, config):
        url = self["broker"] or config.get("ion.core.messaging", "broker", "memory://")
        if not (self["broker-host"] or self["broker-port"] or self["broker-user"] or self["broker-vhost"]):
            return url
        from urllib.parse import quote, urlsplit

        from ion.core.cc.container import check_broker_url

        check_broker_url(url)  # the parts below are then safe to take
        base = urlsplit(url if url.startswith("amqp") else "amqp://guest@localhost:5672/")
        host = self["broker-host"] or base.hostname or "localhost"
        port = self["broker-port"] or base.port or (5671 if base.scheme == "amqps" else 5672)
        user = self["broker-user"] or base.username
        certificate = self["broker-cert"] or config.get("ion.core.messaging", "broker_cert", None)
        if user is None and not certificate:
            user = "guest"  # a client certificate names its user itself
        auth = ""
        if user is not None:
            auth = quote(user, safe="") + (f":{base.password}" if base.password else "") + "@"
        vhost = self["broker-vhost"] if self["broker-vhost"] is not None else base.path.lstrip("/")
        return f"{base.scheme}://{auth}{host}:{port}/{quote(vhost, safe='')}"

    default_credentials = DEFAULT_CREDENTIALS

    def _with_password(self, url):
        """The broker URL with the password from the credentials file (see
        L{broker_url_with_password}); a file that cannot be used stops here."""
        try:
            return broker_url_with_password(url, self["credentials"], self.default_credentials)
        except ValueError as e:
            fail_input(e)


def broker_tls(url, ca_file=None, cert_file=None, key_file=None, config=None):
    """The TLS files for the broker at C{url}, as C{make_transport}'s keywords (C{tls_ca_file},
    C{tls_cert_file}, C{tls_key_file}): each one given (on a command line), else the config's
    C{broker_ca}, C{broker_cert}, C{broker_key} (section ion.core.messaging), which serve
    amqps:// URLs only; C{~} is expanded. The files are read once here to check them.
    ValueError (one line naming the file) when they cannot be used, or are given for a URL
    that is not amqps://. C{twistd cc} and the C{ion} command line both use this."""
    from ion.core.messaging.tls import ClientTls

    given = {"tls_ca_file": ca_file, "tls_cert_file": cert_file, "tls_key_file": key_file}
    if url.split(":", 1)[0].lower() != "amqps":
        if any(path is not None for path in given.values()):
            raise ValueError(
                "--broker-ca, --broker-cert and --broker-key are for an amqps:// broker URL"
            )
        return {}
    files = {}
    for keyword, key in [("tls_ca_file", "broker_ca"), ("tls_cert_file", "broker_cert"),
                         ("tls_key_file", "broker_key")]:
        path = given[keyword]
        if path is None and config is not None:
            path = config.get("ion.core.messaging", key, None)
            if path is not None and not isinstance(path, str):
                raise ValueError(f"config ion.core.messaging {key}: not a file name: {path!r}")
        files[keyword] = None if path is None else os.path.expanduser(path)
    ClientTls.load(files["tls_ca_file"], files["tls_cert_file"], files["tls_key_file"])
    return files


def broker_url_with_password(url, path=None, default=DEFAULT_CREDENTIALS):
    """The broker URL with the password from the credentials file C{path} (None: C{default},
    when it exists) when the URL names a user but no password; the file is read only then.
    The file is the one the pump reads too: its lines for other schemes (sftp, ftp, http(s))
    are checked like any other, and only an amqp[s] line of the URL's host, port and user
    gives the password. CredentialsError (a ValueError naming the file, never a password)
    when the file cannot be used. C{twistd cc} and the C{ion} command line both use this."""
    from urllib.parse import quote, urlsplit

    from ion.core.credentials import find_password, load_credentials

    try:
        parts = urlsplit(url)
        needs_password = parts.username is not None and parts.password is None
    except ValueError:
        return url  # reported when the transport parses it
    if not needs_password or parts.scheme.lower() not in ("amqp", "amqps"):
        return url
    if path is None:
        path = os.path.expanduser(default)
        if not os.path.exists(path):
            return url
    password = find_password(load_credentials(path), url)
    if password is None:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    netloc = f"{userinfo}:{quote(password, safe='')}@{host}"
    return parts._replace(netloc=netloc).geturl()


class _PlanContext:
    """What AppController.plan needs to check files before any container exists."""

    def __init__(self, config, res_dir):
        self.config = config
        self.res_dir = res_dir


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
    """Boots a Container after the reactor runs and stops it on shutdown."""

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
        # A container stopped by SIGTERM/SIGINT has done its job: stop gracefully and exit 0
        # (twistd's own handlers would re-raise the signal after shutdown).
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
        d.addErrback(self._boot_failed)

    async def boot(self):
        from ion.core.cc.container import Container, check_broker_url, make_transport
        from ion.core.messaging.memory import MemoryBroker

        opts = self.options
        if check_broker_url(opts["broker_url"]) == "memory":
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
        self.container = Container(
            opts["config"],
            self.reactor,
            transport,
            sysname=opts["sysname"],
            res_dir=opts["res"],
        )
        self.container.apps.apparg = opts["apparg"]
        log.info(
            "ION {version}: container {id}, broker {url}, sysname {sysname}",
            version=ion.__version__,
            id=self.container.id,
            url=ionlog.redact(opts["broker_url"]),
            sysname=opts["sysname"],
        )
        await self.container.start()
        await self.container.apps.start_files(CORE_APPS + opts["files"])
        log.info("container {id} running apps: {apps}", id=self.container.id,
                 apps=", ".join(self.container.apps.running))
        self._report_start()
        if not opts["no-shell"] and os.isatty(0) and os.isatty(1):
            from ion.core.cc.shell import start_shell

            done = start_shell(self.container, self.reactor, self.output)
            done.addCallback(lambda _: self._stop_reactor())

    def _boot_failed(self, failure):
        cause = _expected_cause(failure.value)
        code = 2 if isinstance(cause, (ValueError, AppFileError)) else 1
        self.exit_code = code
        if cause is None:  # a bug: its traceback helps
            log.failure("container failed to start", failure, level=LogLevel.critical)
        else:
            log.critical("container failed to start: {why}", why=ionlog.redact(str(failure.value)))
        sys.stderr.write(f"cc: container failed to start: {ionlog.redact(str(failure.value))}\n")
        self._exit_after_shutdown(code, ionlog.redact(str(failure.value)))
        self._stop_reactor()

    def _exit_after_shutdown(self, code, why):
        # twistd has no way to set the exit status; this runs after twistd has cleaned up (the
        # pid file is gone), and only then is a daemon's caller told: it may start again.
        def leave():
            self._report_start(code, why)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)

        atexit.register(leave)

    def stopService(self):
        super().stopService()
        if self._status_pipe is not None and not self.exit_code:  # a signal during the boot
            atexit.register(self._report_start, 1, "stopped before it finished starting")
        if self.container is None:
            return defer.succeed(None)
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self):
        await self.container.stop()
        if self.memory_broker is not None:
            left = self.memory_broker.record_stop()
            if left:
                log.warn(
                    "{n} messages still queued die with the embedded broker; the next start "
                    "recovers them where it can (polls announce their files again)",
                    n=left,
                )


def _write_all(fd, text):
    """Write text to fd; a caller gone meanwhile (a closed pipe) is no error of ours."""
    data = text.encode("utf-8", "backslashreplace")
    try:
        while data:
            data = data[os.write(fd, data) :]
    except OSError:
        pass


def makeService(options):
    from twisted.internet import reactor

    return ContainerService(options, reactor)
