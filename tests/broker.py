"""A private RabbitMQ node for the integration tests, which they may stop, kill and restart.

The node runs as a child process with its own node name, AMQP port, distribution port, data
and log directories, plugins file, config files and Erlang cookie, all under a temporary
directory, so it never touches (or is touched by) a system RabbitMQ on the default ports.
`get_broker()` hands every test in the process the same node, started on first use.
"""

import atexit
import base64
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import unittest

START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
_FORBIDDEN_PORTS = {4369, 5672, 15672, 25672}  # epmd and the default RabbitMQ ports


def find_rabbitmq_server():
    """Path of the real `rabbitmq-server` script, or None when RabbitMQ is not installed.

    Debian's `/usr/sbin/rabbitmq-server` is a wrapper that switches to the `rabbitmq` user and
    directory; the script it wraps lives next to it and honours our environment.
    """
    candidates = ["/usr/lib/rabbitmq/bin/rabbitmq-server"]
    on_path = shutil.which("rabbitmq-server")
    if on_path:
        real = os.path.realpath(on_path)
        if os.path.basename(real) == "rabbitmq-script-wrapper":
            real = os.path.join(os.path.dirname(real), "rabbitmq-server")
        candidates.append(real)
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def skip_or_fail_without_rabbitmq():
    """Skip the calling test when RabbitMQ is not installed; fail instead when `CI` is set."""
    if find_rabbitmq_server() is not None:
        return
    reason = (
        "rabbitmq-server is not installed (looked for /usr/lib/rabbitmq/bin/rabbitmq-server "
        "and rabbitmq-server on PATH); install it (apt-get install rabbitmq-server) to run "
        "the AMQP integration tests"
    )
    if os.environ.get("CI"):
        raise AssertionError(f"CI is set and {reason}")
    raise unittest.SkipTest(reason)


# The node's ports lie below the kernel's ephemeral range (32768-60999 by default), so a port
# the node gives up while it is killed cannot go to a socket bound to port 0 in the meantime,
# and they are picked from the pid, so that the nodes of parallel trial workers never choose
# the same ones (with ports from bind(0), two workers could, and the second node's tests then
# talked to the first node: a pause() of their own node did not stop it).
_PORT_BASE = 20000
_PORT_SLOTS = 3000  # four ports each: 20000-31999


def _free_port():
    """A port nothing listens on now (for tests that need one nobody answers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _can_bind(port):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count=3, offset=0):
    first = (os.getpid() + offset) % _PORT_SLOTS
    for i in range(_PORT_SLOTS):
        base = _PORT_BASE + 4 * ((first + i) % _PORT_SLOTS)
        ports = list(range(base, base + count))
        if all(p not in _FORBIDDEN_PORTS and _can_bind(p) for p in ports):
            return ports
    raise BrokerError(f"no {count} free ports between {_PORT_BASE} and {_PORT_BASE + 4 * _PORT_SLOTS}")


class BrokerError(Exception):
    """The private node did not start or stop as asked."""


class PrivateBroker:
    """One RabbitMQ node owned by the test process.

    Ports and the data directory are chosen once, so `restart()` brings back the same node
    with its durable state. The node runs in its own process group: `kill()` and `pause()`
    reach beam.smp and its helpers, not just the shell script that started them.
    """

    user = "guest"
    password = "guest"
    host = "127.0.0.1"
    # Extra users (password = name) with full rights on vhost '/', for tests that need
    # connections with distinct identities.
    users = ("alice", "bob", "carol", "dave")
    # Users (password = name) restricted as on a shared sr3 pump: each may configure and write
    # only its own queues `q_<user>...` and exchange `xs_<user>...`, and read those, its
    # `xl_`/`xr_`/`xs_` exchanges and the public ones (`xpublic`). The pump itself runs as
    # one of the full-rights users and declares xpublic, xreport and the xr_ exchanges.
    restricted_users = ("rita", "ross")
    # The read-only account of a public sr3 pump (password = name), with the permissions sr3's
    # documentation gives it: its own queues, read xpublic, write xs_anonymous.
    public_user = "anonymous"
    # A user with no password (full rights on '/'), who logs in with EXTERNAL and the client
    # certificate `client_cert_file` / `client_key_file` (CN tess, signed by `ca_file`).
    cert_user = "tess"

    def __init__(
        self, server=None, nodename=None, client_certificates=False, cookie=None, port_offset=None
    ):
        """With `client_certificates`, the TLS listener asks every client for a certificate
        signed by `ca_file` (verify_peer, fail_if_no_peer_cert) and offers EXTERNAL login (the
        rabbitmq_auth_mechanism_ssl plugin, user from the certificate's CN); else it takes any
        client, as most brokers do (verify_none)."""
        self.server = server or find_rabbitmq_server()
        if self.server is None:
            raise BrokerError("rabbitmq-server not found")
        self.client_certificates = client_certificates
        suffix = "-certs" if client_certificates else ""
        self.nodename = nodename or f"iontest-{os.getpid()}{suffix}@localhost"
        # The second node of a process looks for ports half the range away, so that it never
        # takes those of a parallel worker's node that has not started listening yet.
        offset = _PORT_SLOTS // 2 if client_certificates else 0
        if port_offset is not None:
            offset = port_offset
        self.port, self.dist_port, self.tls_port = _free_ports(3, offset)
        self.cookie = cookie or secrets.token_hex(20).upper()
        self.base = tempfile.mkdtemp(prefix="ion-rabbitmq-")
        self.process = None
        self.start_seconds = None
        self._prepare()

    def __repr__(self):
        return (
            f"<PrivateBroker {self.nodename} amqp={self.port} amqps={self.tls_port}"
            f" dist={self.dist_port}>"
        )

    @property
    def url(self):
        return f"amqp://{self.user}:{self.password}@{self.host}:{self.port}/"

    def url_for(self, user):
        """The URL for one of `users` or `restricted_users` (its password is its name)."""
        if user not in self.users + self.restricted_users + (self.public_user,):
            raise ValueError(
                f"{user!r} is not one of the broker's users {self.users + self.restricted_users}"
            )
        return f"amqp://{user}:{user}@{self.host}:{self.port}/"

    def exchange_bind(self, user, destination, source, routing_key):
        """exchange.bind as one of `users` or `restricted_users` (see `exchange_bind`)."""
        self.url_for(user)
        exchange_bind(self.host, self.port, user, user, destination, source, routing_key)

    def publish_raw(self, user, exchange, routing_key, body, user_id=None):
        """basic.publish as one of the users, as another client may (see `publish_raw`)."""
        self.url_for(user)
        publish_raw(self.host, self.port, user, user, exchange, routing_key, body, user_id)

    def tls_url_for(self, user, host="localhost"):
        """The amqps:// URL for one of `users` (for `cert_user`: with no password). The
        broker's certificate (signed by the CA in `ca_file`) names only `localhost`, so any
        other host name fails verification."""
        if user == self.cert_user:
            return f"amqps://{user}@{host}:{self.tls_port}/"
        self.url_for(user)
        return f"amqps://{user}:{user}@{host}:{self.tls_port}/"

    def tls_file(self, name):
        """A file made by `make_certificates`: ca.pem, ca.key, server.pem, client.pem, client.key
        (mode 0600), stranger-ca.pem (a CA that signed nothing of this node) and stranger.pem,
        stranger.key (a client certificate for `cert_user` signed by that CA)."""
        return os.path.join(self.base, "tls", name)

    @property
    def ca_file(self):
        return self.tls_file("ca.pem")

    @property
    def client_cert_file(self):
        return self.tls_file("client.pem")

    @property
    def client_key_file(self):
        return self.tls_file("client.key")

    @property
    def log_dir(self):
        return os.path.join(self.base, "log")

    def _prepare(self):
        home = os.path.join(self.base, "home")
        for d in ("home", "mnesia", "log"):
            os.makedirs(os.path.join(self.base, d), exist_ok=True)
        cookie = os.path.join(home, ".erlang.cookie")
        with open(cookie, "w") as f:
            f.write(self.cookie)
        os.chmod(cookie, 0o400)
        plugins = "rabbitmq_auth_mechanism_ssl" if self.client_certificates else ""
        with open(os.path.join(self.base, "enabled_plugins"), "w") as f:
            f.write(f"[{plugins}].\n")
        definitions = os.path.join(self.base, "definitions.json")
        with open(definitions, "w") as f:
            json.dump(self._definitions(), f)
        tls = os.path.join(self.base, "tls")
        make_certificates(tls, self.cert_user)
        with open(os.path.join(self.base, "rabbitmq.conf"), "w") as f:
            f.write(f"listeners.tcp.default = {self.host}:{self.port}\n")
            f.write(f"listeners.ssl.default = {self.host}:{self.tls_port}\n")
            f.write(f"ssl_options.cacertfile = {tls}/ca.pem\n")
            f.write(f"ssl_options.certfile = {tls}/server.pem\n")
            f.write(f"ssl_options.keyfile = {tls}/server.key\n")
            if self.client_certificates:
                f.write("ssl_options.verify = verify_peer\n")
                f.write("ssl_options.fail_if_no_peer_cert = true\n")
                f.write("auth_mechanisms.1 = PLAIN\n")
                f.write("auth_mechanisms.2 = EXTERNAL\n")
                f.write("ssl_cert_login_from = common_name\n")
            else:
                f.write("ssl_options.verify = verify_none\n")
                f.write("ssl_options.fail_if_no_peer_cert = false\n")
            f.write(f"load_definitions = {definitions}\n")
        with open(os.path.join(self.base, "advanced.config"), "w") as f:
            f.write("[].\n")
        # An empty env file, so the system's rabbitmq-env.conf (node name, ERL_FLAGS) is not read.
        open(os.path.join(self.base, "rabbitmq-env.conf"), "w").close()

    def _definitions(self):
        accounts = [(self.user, self.password, "administrator")]
        accounts += [(name, name, "") for name in self.users]
        restricted = [(name, name, "") for name in self.restricted_users]
        public = self.public_user
        return {
            "vhosts": [{"name": "/"}],
            "users": [
                {
                    "name": name,
                    "password_hash": _password_hash(password),
                    "hashing_algorithm": "rabbit_password_hashing_sha256",
                    "tags": tags,
                }
                for name, password, tags in accounts + restricted + [(public, public, "")]
            ]
            + [
                {
                    "name": self.cert_user,
                    "password_hash": "",  # no password: no PLAIN login
                    "hashing_algorithm": "rabbit_password_hashing_sha256",
                    "tags": "",
                }
            ],
            "permissions": [
                {"user": name, "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}
                for name, _, _ in accounts + [(self.cert_user, None, None)]
            ]
            + [
                {
                    "user": name,
                    "vhost": "/",
                    "configure": f"^q_{name}.*|^xs_{name}.*",
                    "write": f"^q_{name}.*|^xs_{name}.*",
                    "read": f"^q_{name}.*|^x[lrs]_{name}.*|^x.*public$",
                }
                for name, _, _ in restricted
            ]
            + [
                {
                    "user": public,
                    "vhost": "/",
                    "configure": f"^q_{public}.*",
                    "write": f"^q_{public}.*|^xs_{public}$",
                    "read": f"^q_{public}.*|^xpublic$",
                }
            ],
        }

    def _environment(self):
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RABBITMQ_", "ERL_")) and k != "CONF_ENV_FILE"
        }
        env.update(
            HOME=os.path.join(self.base, "home"),
            RABBITMQ_CONF_ENV_FILE=os.path.join(self.base, "rabbitmq-env.conf"),
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_NODE_IP_ADDRESS=self.host,
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=os.path.join(self.base, "mnesia"),
            RABBITMQ_LOG_BASE=self.log_dir,
            RABBITMQ_ENABLED_PLUGINS_FILE=os.path.join(self.base, "enabled_plugins"),
            RABBITMQ_CONFIG_FILE=os.path.join(self.base, "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=os.path.join(self.base, "advanced.config"),
            RABBITMQ_PID_FILE=os.path.join(self.base, "rabbitmq.pid"),
            # Keep Erlang distribution (and an epmd this node may have to start) on loopback.
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            ERL_EPMD_ADDRESS="127.0.0.1",
        )
        return env

    @property
    def running(self):
        return self.process is not None and self.process.poll() is None

    def start(self, timeout=START_TIMEOUT):
        """Start the node; return once it accepts AMQP connections and opens the vhost."""
        if self.running:
            raise BrokerError(f"{self!r} is already running")
        began = time.monotonic()
        self._output = open(os.path.join(self.log_dir, "console.log"), "ab")
        self.process = subprocess.Popen(
            [self.server],
            env=self._environment(),
            cwd=self.base,
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = began + timeout
        while True:
            if self.process.poll() is not None:
                self._close_output()
                raise BrokerError(
                    f"{self!r} exited with status {self.process.returncode} while starting; "
                    f"see {self.log_dir}:\n{self._console_tail()}"
                )
            if amqp_ready(self.host, self.port, self.user, self.password):
                break
            if time.monotonic() > deadline:
                self.kill()
                raise BrokerError(
                    f"{self!r} not ready after {timeout:.0f} s; see {self.log_dir}:\n"
                    f"{self._console_tail()}"
                )
            time.sleep(0.1)
        self.start_seconds = time.monotonic() - began

    def stop(self, timeout=STOP_TIMEOUT):
        """Stop the node cleanly (SIGTERM), or kill it if it does not stop within timeout."""
        if not self.running:
            return
        self._signal(signal.SIGCONT)
        self._signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self.kill()

    def kill(self):
        """SIGKILL the whole node (beam.smp and its port programs) without any shutdown."""
        if self.process is None:
            return
        self._signal(signal.SIGKILL)
        self.process.wait()
        self._close_output()

    def restart(self, timeout=START_TIMEOUT):
        """Stop the node if it runs, then start it again with the same ports and data."""
        self.stop()
        self.start(timeout)

    def pause(self, timeout=5.0):
        """Freeze the node (SIGSTOP): the socket stays open but nothing answers, not even
        heartbeats. Returns once every process of the node is stopped: a stop signal takes
        effect when a thread is next scheduled, and a busy machine may let the node answer
        one more frame meanwhile."""
        self._signal(signal.SIGSTOP)
        deadline = time.monotonic() + timeout
        while not self._all_stopped():
            if time.monotonic() > deadline:
                raise BrokerError(f"{self.nodename} did not stop within {timeout} s")
            time.sleep(0.01)

    def _all_stopped(self):
        """Whether every thread of every process in the node's process group is stopped."""
        group = self.process.pid
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[2]) != group:  # pgrp
                    continue
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{tid}/stat") as f:
                        state = f.read().rsplit(")", 1)[1].split()[0]
                    if state not in ("T", "t", "Z", "X"):
                        return False
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
        return True

    def resume(self):
        """Let a paused node run again (SIGCONT)."""
        self._signal(signal.SIGCONT)

    def ctl(self, *args, timeout=120):
        """Run the real `rabbitmqctl` (next to the server script) against this node; returns
        its output, BrokerError with it when it fails."""
        ctl = os.path.join(os.path.dirname(self.server), "rabbitmqctl")
        out = subprocess.run(
            [ctl, "-n", self.nodename, "-q", *args],
            env=self._environment(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if out.returncode != 0:
            raise BrokerError(f"rabbitmqctl {' '.join(args)} on {self.nodename}: {out.stderr}")
        return out.stdout

    def cleanup(self):
        """Stop the node and remove its directory."""
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def _signal(self, signum):
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass

    def _close_output(self):
        output, self._output = getattr(self, "_output", None), None
        if output is not None:
            output.close()

    def _console_tail(self, lines=30):
        try:
            with open(os.path.join(self.log_dir, "console.log"), "rb") as f:
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def make_certificates(directory, client):
    """A throwaway CA (ca.pem, ca.key) and, signed by it, a server certificate for `localhost`
    (server.pem, server.key) and a client certificate with CN `client` (client.pem,
    client.key); another CA (stranger-ca.pem) and a client certificate it signed with the
    same CN (stranger.pem, stranger.key). Files are PEM, mode 0600."""
    os.makedirs(directory, exist_ok=True)
    for prefix, ca_name, issued in [
        ("", "ION test CA", [("server", "localhost", ["localhost"]), ("client", client, [])]),
        ("stranger-", "Stranger CA", [("stranger", client, [])]),
    ]:
        ca_key = new_key()
        ca = issue_certificate(ca_name, ca_key, ca=True)
        write_pem(os.path.join(directory, f"{prefix}ca.pem"), [ca])
        write_pem(os.path.join(directory, f"{prefix}ca.key"), key=ca_key)
        for name, subject, names in issued:
            key = new_key()
            certificate = issue_certificate(subject, key, ca, ca_key, names=names)
            write_pem(os.path.join(directory, f"{name}.pem"), [certificate])
            write_pem(os.path.join(directory, f"{name}.key"), key=key)


def new_key():
    """A new private key (EC P-256: quick to make)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def issue_certificate(subject, key, issuer=None, issuer_key=None, ca=False, names=(), days=30):
    """A certificate with CN `subject` for `key`'s public key, signed by `issuer` (a
    certificate) with `issuer_key`, else self-signed; for the DNS `names`; valid from yesterday
    for `days` days (0: expired since yesterday)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer is not None else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days - 1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
        )
    return builder.sign(issuer_key if issuer_key is not None else key, hashes.SHA256())


def write_pem(path, certificates=(), key=None, mode=0o600):
    """Write `certificates` and/or `key` (unencrypted PKCS#8) as PEM to a new file `path`."""
    from cryptography.hazmat.primitives import serialization

    pem = serialization.Encoding.PEM
    data = b"".join(c.public_bytes(pem) for c in certificates)
    if key is not None:
        data += key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as f:
        f.write(data)
    os.chmod(path, mode)
    return path


def _password_hash(password):
    """RabbitMQ's salted SHA-256 password hash, as its definitions files carry it."""
    salt = secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def amqp_ready(host, port, user, password, timeout=2.0):
    """True when an AMQP 0-9-1 server at host:port lets user open the default vhost.

    A bare TCP connect is not enough: RabbitMQ opens its listener before every boot step has
    run, so this performs the handshake up to connection.open-ok and then closes.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            if not _open_connection(s, user, password):
                return False
            _close_connection(s)
            return True
    except (OSError, struct.error):
        return False


def exchange_bind(host, port, user, password, destination, source, routing_key, timeout=5.0):
    """Bind exchange `destination` to exchange `source` as `user` (RabbitMQ's exchange.bind,
    which needs write permission on the destination and read on the source), as any AMQP
    client of the broker could. Raises BrokerError with the broker's reply when refused."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        if not _open_connection(s, user, password):
            raise BrokerError(f"{user} could not log in to {host}:{port}")
        s.sendall(_method_frame(20, 10, _shortstr(b""), channel=1))  # channel.open
        if _read_method(s)[0] != (20, 11):
            raise BrokerError("channel.open refused")
        arguments = (
            b"\0\0"
            + _shortstr(destination.encode())
            + _shortstr(source.encode())
            + _shortstr(routing_key.encode())
            + b"\0"  # no-wait off
            + _longstr(b"")  # no arguments
        )
        s.sendall(_method_frame(40, 30, arguments, channel=1))
        method, reply = _read_method(s)
        if method != (40, 31):  # exchange.bind-ok; else channel.close with code and text
            raise BrokerError(f"exchange.bind refused {_reply_text(reply)}")
        _close_connection(s)


def publish_raw(host, port, user, password, exchange, routing_key, body, user_id=None,
                timeout=5.0):
    """Publish `body` as `user` as a client other than ours may: with no properties but
    `user_id` (None: none at all, and RabbitMQ then checks nothing), and any routing key
    (bytes: not necessarily UTF-8). Returns once the broker has handled it; raises BrokerError
    with the broker's reply when refused."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        if not _open_connection(s, user, password):
            raise BrokerError(f"{user} could not log in to {host}:{port}")
        s.sendall(_method_frame(20, 10, _shortstr(b""), channel=1))  # channel.open
        if _read_method(s)[0] != (20, 11):
            raise BrokerError("channel.open refused")
        if isinstance(routing_key, str):
            routing_key = routing_key.encode()
        arguments = b"\0\0" + _shortstr(exchange.encode()) + _shortstr(routing_key)
        header = struct.pack("!HHQ", 60, 0, len(body))  # class basic, weight, body size
        if user_id is None:
            header += struct.pack("!H", 0)  # no property flags
        else:
            header += struct.pack("!H", 1 << 4) + _shortstr(user_id.encode())  # user-id only
        s.sendall(
            _method_frame(60, 40, arguments + b"\0", channel=1)  # basic.publish
            + _frame(2, 1, header)
            + _frame(3, 1, body)
            # channel.close: its close-ok comes after the publish was handled
            + _method_frame(20, 40, struct.pack("!H", 200) + _shortstr(b"") + b"\0" * 4, 1)
        )
        method, reply = _read_method(s)
        if method != (20, 41):
            raise BrokerError(f"basic.publish refused: {_reply_text(reply)}")
        _close_connection(s)


def _reply_text(reply):
    """'(code): text' of a channel.close or connection.close."""
    if len(reply) < 3:
        return "(no reply)"
    code = struct.unpack("!H", reply[:2])[0]
    return f"({code}): {reply[3 : 3 + reply[2]].decode(errors='replace')}"


def _open_connection(s, user, password):
    """The AMQP handshake on socket s, up to connection.open-ok; False when refused."""
    s.sendall(b"AMQP\x00\x00\x09\x01")
    if _read_method(s)[0] != (10, 10):  # connection.start
        return False
    response = f"\0{user}\0{password}".encode()
    s.sendall(
        _method_frame(
            10,
            11,
            b"\0\0\0\0" + _shortstr(b"PLAIN") + _longstr(response) + _shortstr(b"en_US"),
        )
    )
    method, tune = _read_method(s)
    if method != (10, 30):  # connection.tune: answer with the broker's limits
        return False
    channel_max, frame_max, _heartbeat = struct.unpack("!HIH", tune)
    s.sendall(_method_frame(10, 31, struct.pack("!HIH", channel_max, frame_max, 0)))
    s.sendall(_method_frame(10, 40, _shortstr(b"/") + _shortstr(b"") + b"\0"))
    return _read_method(s)[0] == (10, 41)  # connection.open-ok


def _close_connection(s):
    s.sendall(_method_frame(10, 50, struct.pack("!H", 200) + _shortstr(b"") + b"\0" * 4))


def _shortstr(b):
    return bytes([len(b)]) + b


def _longstr(b):
    return struct.pack("!I", len(b)) + b


def _method_frame(class_id, method_id, arguments, channel=0):
    return _frame(1, channel, struct.pack("!HH", class_id, method_id) + arguments)


def _frame(kind, channel, payload):
    return struct.pack("!BHI", kind, channel, len(payload)) + payload + b"\xce"


def _read_exactly(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise OSError("connection closed during the AMQP handshake")
        data += chunk
    return data


def _read_method(s):
    """Read one frame; return ((class id, method id), arguments) for a method frame."""
    kind, _channel, size = struct.unpack("!BHI", _read_exactly(s, 7))
    payload = _read_exactly(s, size + 1)[:-1]
    if kind != 1:
        return None, b""
    return struct.unpack("!HH", payload[:4]), payload[4:]


class PrivateCluster:
    """`size` private nodes on this machine joined into one RabbitMQ cluster (one Erlang
    cookie; `rabbitmqctl join_cluster` to the first), each with its own node name, ports and
    data, so a test may kill -9 one node and start it again (it rejoins by itself). `url` lists
    every node's AMQP URL, for a container given the whole cluster."""

    def __init__(self, size=3):
        cookie = secrets.token_hex(20).upper()
        pid = os.getpid()
        # Slots a quarter of the range away from the single node's, spread so that the
        # clusters of parallel workers do not pick the same ports before they listen.
        self.nodes = [
            PrivateBroker(
                nodename=f"iontest-{pid}-c{i}@localhost",
                cookie=cookie,
                port_offset=_PORT_SLOTS // 4 + 97 * i,
            )
            for i in range(size)
        ]
        self.start_seconds = None

    def __repr__(self):
        return f"<PrivateCluster {', '.join(n.nodename for n in self.nodes)}>"

    @property
    def url(self):
        return ",".join(node.url for node in self.nodes)

    def url_for(self, user):
        return ",".join(node.url_for(user) for node in self.nodes)

    def start(self):
        """Start every node (at once), then join the others to the first."""
        import concurrent.futures

        began = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda node: node.start(), self.nodes))
        first = self.nodes[0].nodename
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", first)
            node.ctl("start_app")
            deadline = time.monotonic() + START_TIMEOUT
            while not amqp_ready(node.host, node.port, node.user, node.password):
                if time.monotonic() > deadline:
                    raise BrokerError(f"{node!r} not ready after joining {first}")
                time.sleep(0.1)
        self.start_seconds = time.monotonic() - began

    def running_node(self):
        """A node that runs (to ask with rabbitmqctl)."""
        for node in self.nodes:
            if node.running:
                return node
        raise BrokerError(f"no node of {self!r} runs")

    def cleanup(self):
        for node in self.nodes:
            node.cleanup()


_shared = None
_certs = None
_cluster = None


def get_cluster():
    """A 3-node cluster of private nodes shared like `get_broker()`'s node, started on first
    use (some 20-30 s), so only the tests that need it pay for it. Tests that kill a node
    must start it again."""
    global _cluster
    skip_or_fail_without_rabbitmq()
    if _cluster is None:
        cluster = PrivateCluster()
        atexit.register(cluster.cleanup)
        cluster.start()
        _cluster = cluster
    for node in _cluster.nodes:
        if not node.running:
            node.start()
    return _cluster


def get_cert_broker():
    """A second private node, whose TLS listener takes only clients with a certificate
    signed by its CA and offers EXTERNAL login (see `PrivateBroker`), shared like
    `get_broker()`'s; started on first use, so that only the tests that need it pay for it."""
    global _certs
    skip_or_fail_without_rabbitmq()
    if _certs is None:
        broker = PrivateBroker(client_certificates=True)
        atexit.register(broker.cleanup)
        broker.start()
        _certs = broker
    elif not _certs.running:
        _certs.start()
    return _certs


def get_broker():
    """The private node shared by every test in this process, started on first use and
    stopped when the process exits. Tests that stop or kill it must start it again."""
    global _shared
    skip_or_fail_without_rabbitmq()
    if _shared is None:
        broker = PrivateBroker()
        atexit.register(broker.cleanup)
        broker.start()
        _shared = broker
    elif not _shared.running:
        _shared.start()
    return _shared
