"""The transfer service: the pump's file transfers (`ion.apps.pump.transfer`) offered as ops.

Service `transfer`; any number of instances may run, in any container of the system, and each
request goes to one of them. Ops (content -> reply):

- `get` {url, path, size?, identity?: {method, value}, mtime?, mode?} ->
  {size, checksum: {method: base64}, mtime, mode, path}: fetch `url` into the local file `path`
  (its directory must exist). `size` and a `sha512`/`md5` identity are verified; a `cod`
  identity names the checksum to compute; `arbitrary` and `random` identities are not
  checked. `mtime` (seconds since the epoch) and `mode` (permission bits) are applied when
  given, else the server's when it tells them. Nothing unverified ever appears at `path`.
- `put` {path, url} -> the same map, for the bytes sent.
- `list` {url} -> [{name, size, mtime, mode, type}], sorted by name.

A failed transfer is an `ApplicationError` with the library's HTTP-like code (404 missing, 403
refused, 499 short or corrupt, 503 unreachable, 504 timed out, ...); callers decide between
retrying and reporting with `ion.apps.pump.outcome.is_transient(code)`. Bad requests are 400.

Args: `timeouts` {connect, idle} (seconds; defaults 10 and 30), `parallel` (transfers at a
time, per instance; default 8), `per_host` (transfers at a time to one server, per instance;
default 4), `credentials` (path of the credentials file; default
`~/.config/ion/credentials.conf` when it exists). A credentials file readable by group or
others, or unreadable, stops the service from starting. N instances thus run at most
N * `parallel` transfers, N * `per_host` to one server.

Each instance owns, from start to terminate, a thread pool of `parallel` threads doing the local
disk work of its transfers (create, write, fsync, rename: the reactor thread never waits for
the disk) and its kept-open http(s) connections (at most `per_host` idle ones to a server).
"""

import os

from twisted.internet.defer import DeferredSemaphore
from twisted.python.threadpool import ThreadPool

from ion.apps.pump import transfer
from ion.core.process import ApplicationError, ServiceProcess

DEFAULT_CREDENTIALS = "~/.config/ion/credentials.conf"
ARGS = ("credentials", "parallel", "per_host", "service", "timeouts")


def load_credentials(path):
    """The Credentials of `path`, of the default file when `path` is None and it exists, or
    None. Raises CredentialsError for an unusable file (missing, not private, malformed)."""
    if path is None:
        default = os.path.expanduser(DEFAULT_CREDENTIALS)
        if not os.path.exists(default):
            return None
        path = default
    return transfer.Credentials.load(os.path.expanduser(path))


def _number(value, what):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"transfer service: {what} must be a number > 0, got {value!r}")
    return value


class TransferService(ServiceProcess):
    """Ops `get`, `put` and `list` over the transfer library (see the module docstring)."""

    service = "transfer"

    def on_init(self):
        unknown = sorted(set(self.args) - set(ARGS))
        if unknown:
            raise ValueError(
                f"transfer service: unknown argument {unknown[0]!r}; "
                f"valid ones are {', '.join(ARGS)}"
            )
        timeouts = self.args.get("timeouts") or {}
        if not isinstance(timeouts, dict) or set(timeouts) - {"connect", "idle"}:
            raise ValueError(
                f"transfer service: timeouts must be a dict with keys connect and idle, "
                f"got {timeouts!r}"
            )
        self.timeouts = transfer.Timeouts(
            connect=_number(timeouts.get("connect", 10), "timeouts connect"),
            idle=_number(timeouts.get("idle", 30), "timeouts idle"),
        )
        per_host = _count(self.args.get("per_host", 4), "per_host")
        parallel = _count(self.args.get("parallel", 8), "parallel")
        self.limiter = transfer.HostLimiter(per_host)
        self.slots = DeferredSemaphore(parallel)
        self.credentials = load_credentials(self.args.get("credentials"))
        reactor = self.container.reactor
        self.pool = ThreadPool(minthreads=0, maxthreads=parallel, name=f"transfer-{self.pid}")
        self.pool.start()
        # A crashed process gets no on_terminate: its threads still stop with the reactor.
        self._pool_trigger = reactor.addSystemEventTrigger("during", "shutdown", self.pool.stop)
        self.http_connections = transfer.HTTPConnections(reactor, per_host)

    async def on_terminate(self):
        self.container.reactor.removeSystemEventTrigger(self._pool_trigger)
        # In-flight ops are over (or given up on): this waits only for a disk job still running.
        self.pool.stop()
        await self.http_connections.close()

    def _options(self):
        return {
            "timeouts": self.timeouts,
            "credentials": self.credentials,
            "limiter": self.limiter,
            "pool": self.pool,
            "http_connections": self.http_connections,
        }

    async def _run(self, operation, *args, **kwargs):
        await self.slots.acquire()
        try:
            return await operation(self.container.reactor, *args, **kwargs, **self._options())
        except transfer.TransferError as e:
            raise ApplicationError(e.message, code=e.code) from None
        finally:
            self.slots.release()

    async def op_get(self, content, headers):
        url, path = _strings(content, "get", "url", "path")
        options = {}
        size = content.get("size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise ApplicationError(f"get: size must be an int >= 0, got {size!r}")
            options["expected_size"] = size
        identity = content.get("identity")
        if identity is not None:
            if not isinstance(identity, dict):
                raise ApplicationError(f"get: identity must be {{method, value}}, got {identity!r}")
            method, value = identity.get("method"), identity.get("value")
            if method == "cod":
                options["cod"] = value
            elif method in ("sha512", "md5"):
                options["expected_checksum"] = (method, value)
        mtime = content.get("mtime")
        if mtime is not None:
            if isinstance(mtime, bool) or not isinstance(mtime, (int, float)):
                raise ApplicationError(f"get: mtime must be seconds since the epoch, got {mtime!r}")
            options["mtime"] = mtime
        mode = content.get("mode")
        if mode is not None:
            if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
                raise ApplicationError(f"get: mode must be permission bits (int), got {mode!r}")
            options["mode"] = mode
        result = await self._run(transfer.get, url, path, **options)
        return _result(result)

    async def op_put(self, content, headers):
        path, url = _strings(content, "put", "path", "url")
        return _result(await self._run(transfer.put, path, url))

    async def op_list(self, content, headers):
        (url,) = _strings(content, "list", "url")
        entries = await self._run(transfer.list, url)
        return [
            {"name": e.name, "size": e.size, "mtime": e.mtime, "mode": e.mode, "type": e.type}
            for e in entries
        ]


def _count(value, what):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"transfer service: {what} must be an int >= 1, got {value!r}")
    return value


def _strings(content, op, *keys):
    if not isinstance(content, dict):
        raise ApplicationError(f"{op}: content must be a map with {', '.join(keys)}")
    values = []
    for key in keys:
        value = content.get(key)
        if not isinstance(value, str) or not value:
            raise ApplicationError(f"{op}: {key} must be a non-empty string, got {value!r}")
        values.append(value)
    return values


def _result(result):
    return {
        "size": result.size,
        "checksum": dict(result.checksum),
        "mtime": result.mtime,
        "mode": result.mode,
        "path": result.path,
    }


process_class = TransferService
