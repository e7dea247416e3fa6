"""The transfer service: the pump's file transfers (L{ion.apps.pump.transfer}) offered as ops.

Service C{transfer}; any number of instances may run, in any container of the system, and each
request goes to one of them. Ops (content -> reply):

  - C{get} {url, path, size?, identity?: {method, value}, mtime?, mode?} ->
    {size, checksum: {method: base64}, mtime, mode, path}: fetch C{url} into the local file C{path}
    (its directory must exist). C{size} and a C{sha512}/C{md5} identity are verified; a C{cod}
    identity names the checksum to compute; C{arbitrary} and C{random} identities are not
    checked. C{mtime} (seconds since the epoch) and C{mode} (permission bits) are applied when
    given, else the server's when it tells them. Nothing unverified ever appears at C{path}.
  - C{put} {path, url} -> the same map, for the bytes sent.
  - C{list} {url} -> [{name, size, mtime, mode, type}], sorted by name; with C{with_bytes:
    True}, {entries: that list, bytes: what the listing took to read from the server} (a
    poll with a C{byte_rate_max} paces its listings by it).

A failed transfer is an L{ApplicationError} with the library's HTTP-like code (404 missing, 403
refused, 499 short or corrupt, 503 unreachable, 504 timed out, ...); callers decide between
retrying and reporting with C{ion.apps.pump.outcome.is_transient(code)}. Bad requests are 400.

Args (L{ion.apps.pump.args.TransferServiceArgs}): the transfer settings of
L{ion.apps.pump.transfer.worker}, and C{service} (default C{transfer}). N instances run at most
N * C{parallel} transfers, N * C{per_host} to one server. A credentials file readable by group
or others, or unreadable, stops the service from starting. Each instance owns its L{Transfers}
(thread pool, kept-open connections) from start to terminate.
"""

from ion.apps.pump import transfer
from ion.apps.pump.args import TransferServiceArgs
from ion.apps.pump.transfer.worker import Transfers
from ion.core.process import ApplicationError, ServiceProcess


class TransferService(ServiceProcess):
    """Ops C{get}, C{put} and C{list} over the transfer library (see the module docstring)."""

    service = "transfer"

    def on_init(self):
        who = f"transfer service {self.pid}"
        self.transfers = Transfers(
            self.container.reactor, TransferServiceArgs.parse(self.args, who=who), who=who
        )

    async def on_terminate(self):
        # In-flight ops are over (or given up on): this waits only for a disk job still running.
        await self.transfers.close()

    async def _run(self, operation, *args):
        try:
            return await operation(*args)
        except transfer.TransferError as e:
            raise ApplicationError(e.message, code=e.code) from None

    async def op_get(self, content, headers):
        url, path = _strings(content, "get", "url", "path")
        options = {}
        for key, (option, valid, what) in _GET_OPTIONS.items():
            value = content.get(key)
            if value is not None:
                if isinstance(value, bool) or not valid(value):
                    raise ApplicationError(f"get: {key} must be {what}, got {value!r}")
                options[option] = value
        identity = content.get("identity")
        if identity is not None:
            if not isinstance(identity, dict):
                raise ApplicationError(f"get: identity must be {{method, value}}, got {identity!r}")
            method, value = identity.get("method"), identity.get("value")
            if method == "cod":
                options["cod"] = value
            elif method in ("sha512", "md5"):
                options["expected_checksum"] = (method, value)
        result = await self._run(lambda: self.transfers.get(url, path, **options))
        return _result(result)

    async def op_put(self, content, headers):
        path, url = _strings(content, "put", "path", "url")
        return _result(await self._run(self.transfers.put, path, url))

    async def op_list(self, content, headers):
        """The entries of directory C{url}: a list of {name, size, mtime, mode, type}. With
        C{with_bytes} (true), {entries, bytes}: the bytes read from the server too. With
        C{digest} (true), {entries, bytes, digest, unchanged}: the digest of an index page
        (None for other schemes); with C{unless}, a digest the page had before, an unchanged
        page is not read into entries (C{entries} None, C{unchanged} true)."""
        (url,) = _strings(content, "list", "url")
        flags = {}
        for key in ("with_bytes", "digest"):
            flags[key] = content.get(key, False)
            if not isinstance(flags[key], bool):
                raise ApplicationError(f"list: {key} must be true or false, got {flags[key]!r}")
        unless = content.get("unless")
        if unless is not None and not (
            isinstance(unless, str) and 0 < len(unless) <= _DIGEST_MAX and flags["digest"]
        ):
            raise ApplicationError(
                f"list: unless must be a digest (with digest true), got {unless!r}"[:200]
            )
        entries = await self._run(self.transfers.list, url, unless)
        if entries.unchanged:
            return {"entries": None, "bytes": entries.bytes, "digest": entries.digest,
                    "unchanged": True}
        # Written out rather than attrs.asdict: a large directory's listing is built here.
        listed = [
            {"name": e.name, "size": e.size, "mtime": e.mtime, "mode": e.mode, "type": e.type}
            for e in entries
        ]
        if flags["digest"]:
            return {"entries": listed, "bytes": entries.bytes, "digest": entries.digest,
                    "unchanged": False}
        return {"entries": listed, "bytes": entries.bytes} if flags["with_bytes"] else listed


# The longest digest a list's C{unless} may be (a sha256 in hex is 64 characters).
_DIGEST_MAX = 128

# The optional numbers of a get: key -> (transfer option, check (bools fail), what it must be).
_GET_OPTIONS = {
    "size": ("expected_size", lambda v: isinstance(v, int) and v >= 0, "an int >= 0"),
    "mtime": ("mtime", lambda v: isinstance(v, (int, float)), "seconds since the epoch"),
    "mode": ("mode", lambda v: isinstance(v, int) and 0 <= v <= 0o7777, "permission bits (int)"),
}


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
