"""C{twistd -n cc [options] [app and rel files]}: command line options and L{makeService}.

Bad input (a missing or malformed .app/.rel/config file, a bad -D) is one line on stderr and
exit status 2; nothing starts. The container boots once the reactor runs: transport, the core
app, then the given apps in dependency order. A failed boot is logged and the process exits
with status 1. SIGTERM/SIGINT (and Ctrl-D in the shell) stop apps in reverse order.

Without twistd's C{-n} the container runs as a daemon: the log goes to C{--logfile} (default
twistd.log), SIGUSR1 reopens it, and the C{twistd} command returns only once the boot is over
(see C{ContainerService.startService}). The service tree twistd runs is in
ion.core.cc.service.
"""

import ast
import ipaddress
import os
import sys
from types import SimpleNamespace
from urllib.parse import quote, urlsplit

from ion.core import lazytls

# First, before anything imports Twisted's reactor or endpoints: a container that makes no TLS
# connection never loads pyOpenSSL.
lazytls.defer()

from twisted.logger import Logger  # noqa: E402
from twisted.python import usage  # noqa: E402

import ion  # noqa: E402
from ion.core import log as ionlog  # noqa: E402
from ion.core.app.appfile import AppFileError  # noqa: E402
from ion.core.app.controller import AppController  # noqa: E402
from ion.core.cc.container import check_broker_url  # noqa: E402
from ion.core.cc.service import CORE_APPS, ContainerService  # noqa: E402
from ion.core.config import SCHEMA, Config, ConfigError, parse_define  # noqa: E402
from ion.core.credentials import (  # noqa: E402
    DEFAULT_CREDENTIALS,
    Credentials,
    CredentialsError,
)
from ion.core.messaging.amqp import split_urls  # noqa: E402
from ion.core.messaging.tls import ClientTls  # noqa: E402

log = Logger()


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
    # Pairs are split at the commas outside brackets and quotes: a value may hold commas
    # ([1, 2], {'a': 1, 'b': 2}).
    pairs, start, depth, quote = [], 0, 0, None
    for i, ch in enumerate(text + ","):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth <= 0:
            pairs.append(text[start:i])
            start = i + 1
    pairs.append(text[start:])  # what an unclosed bracket or quote left
    result = {}
    for pair in filter(str.strip, pairs):
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise usage.UsageError(f"-a/--args: expected key=value, got {pair!r}")
        try:
            result[key.strip()] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            result[key.strip()] = raw
    return result


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
    optFlags = [["no-shell", None, "Do not open the interactive shell."]]
    optParameters = [
        ["broker-host", None, None, "Broker host (amqp)."],
        ["broker-port", None, None, "Broker port (amqp).", int],
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
        ["broker-retry", None, None, "Seconds to keep trying to reach the broker at boot, with "
         "backoff (for a pump started before its broker); default: config ion.core.messaging "
         "broker_retry, else 0: an unreachable broker fails the boot at once.", float],
        ["sysname", "s", None, "System name: containers with the same sysname on one broker form one system."],
        ["args", "a", None, "Container args: k=v,k=v or a dict literal; apparg_<app>={...} sets an app's kwargs."],
        ["res", None, None, "The res/ directory (default ./res, else the one shipped with ION)."],
        ["web", None, None, "Serve the web console on [ADDRESS:]PORT (address default 127.0.0.1; "
         "default: config ion.core.cc web). Off loopback it needs a token: the password of the "
         "line http://console:TOKEN@ADDRESS:PORT/ of the credentials file."],
    ]

    def __init__(self):
        super().__init__()
        self["broker"] = None
        self["defines"] = []
        self["files"] = []
        self["container_args"] = {}

    def opt_version(self):
        """Print the ION version and exit."""
        print(f"ION {ion.__version__}")
        sys.exit(0)

    def opt_broker(self, url):
        """Broker URL: memory:// (default, in-process), amqp://user@host:port/vhost,
        amqps://...; several amqp[s] brokers (the nodes of a cluster), tried in turn on
        connect and reconnect: comma-separated, amqp://user@host1,host2:5673/vhost, or
        --broker repeated."""
        self["broker"] = f"{self['broker']},{url}" if self["broker"] else url

    def opt_define(self, text):
        """Override config: module:key=value (repeatable)."""
        try:
            self["defines"].append(parse_define(text))
        except ValueError as e:
            fail_input(f"-D/--define: {e}")

    opt_D = opt_define

    # -h is help everywhere (the broker host is --broker-host only)
    opt_h = usage.Options.opt_help

    def parseArgs(self, *files):
        self["files"] = list(files)

    def postOptions(self):
        """Read and check everything the container needs; bad input is one line on stderr and
        exit status 2 (L{fail_input})."""
        try:
            self._check()
        except (AppFileError, ConfigError, ValueError) as e:
            fail_input(e)

    def _check(self):
        if self["args"]:
            self["container_args"] = parse_args_option(self["args"])
        res = self["res"] or find_res_dir()
        self["res"] = res
        config = Config.load(res)
        for module, key, value in self["defines"]:
            config.define(module, key, value)
        self["config"] = config
        self["levels"] = ionlog.load_levels(res)
        cargs = self["container_args"]
        self["sysname"] = self["sysname"] or cargs.get("sysname") or config.get(
            "ion.core.messaging", "sysname", "ion"
        )
        # A client certificate names its user itself, and logs in without a password.
        certificate = self["broker-cert"] or config.get("ion.core.messaging", "broker_cert", None)
        self["broker_url"] = broker_url_with_password(
            self._broker_url(config, certificate), self["credentials"],
            self.default_credentials, bool(certificate))
        check_broker_url(self["broker_url"])
        self["broker_tls"] = broker_tls(
            self["broker_url"], self["broker-ca"], self["broker-cert"], self["broker-key"],
            config,
        )
        retry = self["broker-retry"]
        if retry is None:
            retry = config.get("ion.core.messaging", "broker_retry", 0)
        if isinstance(retry, bool) or not isinstance(retry, (int, float)) or not retry >= 0:
            raise ValueError(f"--broker-retry / broker_retry: seconds >= 0 expected, got {retry!r}")
        self["broker_retry"] = retry
        apparg = {k[len("apparg_") :]: v for k, v in cargs.items() if k.startswith("apparg_")}
        self["apparg"] = apparg
        # AppController.plan checks the files before any container exists.
        context = SimpleNamespace(config=config, res_dir=res)
        plan = AppController(context, apparg).plan(CORE_APPS + self["files"])
        layers = [layer for _spec, _kwargs, app_layers, _mult in plan for layer in app_layers]
        config.check_with(layers)
        _warn_unused(config, apparg, plan, layers)
        self["web_console"] = self._web(config, layers)

    def _web(self, config, app_layers):
        """C{(host, port, token, explicit)} of the web console, or None: off. C{explicit}: given
        by the user (C{--web}, C{-D}, a config file), not by an app's defaults, so that a port
        taken is an error rather than a console left out."""
        spec, explicit = self["web"], True
        if spec is None:
            from_apps = [layer["ion.core.cc"]["web"] for _name, layer in app_layers
                         if "web" in (layer.get("ion.core.cc") or {})]
            defined = any(m == "ion.core.cc" and k == "web" for m, k, _v in self["defines"])
            spec = config.get("ion.core.cc", "web", None)
            if from_apps and not defined:
                spec, explicit = from_apps[-1], False
        if spec is None or spec is False:
            return None
        host, port = parse_address(spec)
        token = None
        if not is_loopback(host):
            path = os.path.expanduser(self["credentials"] or self.default_credentials)
            url = f"http://console@{host}:{port}/"
            token = Credentials.load(path).password(url) if os.path.exists(path) else None
            if not token:
                raise ValueError(f"web console on {host}:{port} (not loopback) needs a token: "
                                 f"add the line for {url} to {path}, the token as its "
                                 "password (console:TOKEN)")
        return host, port, token, explicit

    def _broker_url(self, config, certificate):
        url = self["broker"] or config.get("ion.core.messaging", "broker", "memory://")
        if isinstance(url, list):
            url = ",".join(url)
        parts = ("broker-host", "broker-port", "broker-user", "broker-vhost")
        if not any(self[part] for part in parts):
            return url
        check_broker_url(url)  # the parts below are then safe to take
        if len(split_urls(url)) > 1:
            raise ValueError("--broker-host, --broker-port, --broker-user and --broker-vhost "
                             "change one broker URL: write each broker's URL in --broker")
        base = urlsplit(url if url.startswith("amqp") else "amqp://guest@localhost:5672/")
        host = self["broker-host"] or base.hostname or "localhost"
        port = self["broker-port"] or base.port or (5671 if base.scheme == "amqps" else 5672)
        user = self["broker-user"] or base.username
        if user is None and not certificate:
            user = "guest"
        auth = ""
        if user is not None:
            auth = quote(user, safe="") + (f":{base.password}" if base.password else "") + "@"
        vhost = self["broker-vhost"] if self["broker-vhost"] is not None else base.path.lstrip("/")
        return f"{base.scheme}://{auth}{host}:{port}/{quote(vhost, safe='')}"

    default_credentials = DEFAULT_CREDENTIALS


def _warn_unused(config, apparg, plan, layers):
    """Warn (once, at start) of a -D module and of an apparg_<app> that nothing will read:
    most likely a typo, which would otherwise be silently ignored."""
    known = {module for _name, mapping in layers for module in mapping}
    for module in config.unknown_modules(known):
        log.warn("-D/--define: no module {module!r} reads config (not in res/config/ion.config "
                 "nor in the apps started); ignored", module=module)
    for module, key in config.unknown_keys():
        log.warn("-D/--define: {module} has no key {key!r} (it has {keys}); ignored",
                 module=module, key=key, keys=", ".join(SCHEMA[module]))
    starting = {spec.name for spec, _kwargs, _layers, _mult in plan}
    for name in sorted(set(apparg) - starting):
        log.warn("-a/--args: apparg_{name}: no app {name!r} among those started ({apps}); "
                 "ignored", name=name, apps=", ".join(sorted(starting)))


def broker_tls(url, ca_file=None, cert_file=None, key_file=None, config=None):
    """The TLS files for the broker at C{url}, as C{make_transport}'s keywords (C{tls_ca_file},
    C{tls_cert_file}, C{tls_key_file}): each one given (on a command line), else the config's
    C{broker_ca}, C{broker_cert}, C{broker_key} (section ion.core.messaging), which serve
    amqps:// URLs only; C{~} is expanded. The files are read once here to check them.
    ValueError (one line naming the file) when they cannot be used, or are given for a URL
    that is not amqps://. C{twistd cc} and the C{ion} command line both use this."""
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


def broker_url_with_password(url, path=None, default=DEFAULT_CREDENTIALS, certificate=False):
    """The broker URL with the password from the credentials file C{path} (None: C{default},
    when it exists) when the URL names a user but no password; the file is read only then.
    The file is the one the pump reads too: its lines for other schemes (sftp, ftp, http(s))
    are checked like any other, and only an amqp[s] line of the URL's host, port and user
    gives the password. CredentialsError (a ValueError naming the file, never a password)
    when the file cannot be used, or has no password for the user: a login bound to fail is
    not tried with some default password. Exceptions: user C{guest} (RabbitMQ's default
    account, password guest) and a C{certificate} login (EXTERNAL, no password). C{twistd cc}
    and the C{ion} command line both use this."""
    try:
        urls = split_urls(url)
    except ValueError:
        return url  # reported when the transport parses it
    if len(urls) > 1:
        return ",".join(
            broker_url_with_password(one, path, default, certificate) for one in urls
        )
    try:
        parts = urlsplit(url)
        needs_password = parts.username is not None and parts.password is None
    except ValueError:
        return url  # reported when the transport parses it
    if not needs_password or parts.scheme.lower() not in ("amqp", "amqps", "mqtt", "mqtts"):
        return url
    if certificate or parts.username == "guest":
        return url
    if path is None and not os.path.exists(os.path.expanduser(default)):
        password, where = None, f"{os.path.expanduser(default)} (no such file)"
    else:
        where = path or os.path.expanduser(default)
        password = Credentials.load(where).password(url)
    if password is None:
        raise CredentialsError(f"no password for {parts.username}@{parts.hostname} in {where}")
    userinfo, _, host = parts.netloc.rpartition("@")
    netloc = f"{userinfo}:{quote(password, safe='')}@{host}"
    return parts._replace(netloc=netloc).geturl()


def parse_address(text):
    """C{(host, port)} of C{[HOST:]PORT} (host default 127.0.0.1; C{[::1]:8580} for IPv6);
    ValueError naming what is wrong."""
    host, sep, port = str(text).rpartition(":")
    host = host.strip("[]") if sep else "127.0.0.1"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"web: expected [ADDRESS:]PORT, got {text!r}")
    return host or "127.0.0.1", int(port)


def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def makeService(options):
    from twisted.internet import reactor

    return ContainerService(options, reactor)
